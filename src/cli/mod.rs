//! The `ccmgr` command line: argument parsing, the exit-code contract, and one small function
//! per verb that calls into the library and prints the result.
//!
//! Exit codes (documented in the README and tested):
//! - 0: success;
//! - 1: an operation failed (for `stop`: something of the instance still runs, named; for
//!   `status`: the instance's state cannot be read, a damaged segment);
//! - 2: bad usage or bad configuration (nothing was started or changed);
//! - 3: `status`, `reload`, `upgrade`, `events` or a per-service verb of an instance that is
//!   not running (as `systemctl status`);
//! - 4: not permitted: a verb that changes something, by anyone but the instance's owner.

mod check;
mod cluster;
mod events;
mod lifecycle;
mod logs;
mod operate;
mod reload;
mod status;
mod stop_driver;
mod upgrade;
mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, LoadOptions};
use crate::control::protocol::Verb;

pub use lifecycle::segment_spec;

/// What the process exits with; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    BadConfig = 2,
    NotRunning = 3,
    /// The caller may not do that to the instance: only its owner may start, stop or restart
    /// it (the members of its group may read its status).
    NotPermitted = 4,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// ccmgr: a bootstrap supervisor and dependency-ordered service manager.
#[derive(Parser, Debug)]
#[command(name = "ccmgr", version, about, long_about = None)]
pub struct Cli {
    /// The global configuration file [default: $CCMGR_CONFIG, else /etc/ccmgr/ccmgr.toml].
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The instance to act on, overriding the configuration file.
    #[arg(long, global = true, value_name = "NAME")]
    pub instance: Option<String>,
    /// The directory of service files, overriding the configuration file.
    #[arg(long, global = true, value_name = "DIR")]
    pub services_dir: Option<PathBuf>,
    /// Machine-readable output: one JSON document (for `events` and `logs`, one JSON object
    /// per line) on stdout; messages for people stay on stderr. Every verb that reports.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the configuration and print the startup and shutdown sequences and the levels.
    Check,
    /// Print the dependency graph.
    Graph {
        /// dot: Graphviz (`ccmgr graph | dot -Tsvg > graph.svg`); text: one line per edge;
        /// json: the services and the edges with their kinds (also with `--json`).
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Start the stack and wait until every service is up (or stop it again and say why); with
    /// SERVICEs, start those (and what they require) in the running stack.
    Start {
        /// Run the coordinator in the foreground (containers, init systems, demos): log to
        /// stderr, stop the stack in order on SIGINT or SIGTERM.
        #[arg(long, conflicts_with = "services")]
        foreground: bool,
        #[command(flatten)]
        operate: OperateArgs,
    },
    /// Stop the stack in shutdown order, whatever state it is in; with SERVICEs, stop those
    /// (and what requires them) and keep them down until started again.
    Stop {
        #[command(flatten)]
        operate: OperateArgs,
    },
    /// Stop, then start; with SERVICEs, restart those (and what requires them) in order.
    Restart {
        #[arg(long, conflicts_with = "services")]
        foreground: bool,
        #[command(flatten)]
        operate: OperateArgs,
    },
    /// Show the state of the instance and of every service, and why a service is not up
    /// (exit 3 when not running); with SERVICE names, explain those, with their last log lines.
    Status {
        /// Services to explain.
        #[arg(value_name = "SERVICE")]
        services: Vec<String>,
    },
    /// Follow the instance's lifecycle events as they happen (until it stops).
    Events {
        /// Begin with the last N events the instance still holds (at most 1024).
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 0)]
        backlog: u64,
    },
    /// Show what services wrote (none named: ccmgr's own event log): the last lines, then
    /// with -f what follows, across rotations.
    Logs {
        /// The services whose output to show; with several, each line starts with its name.
        services: Vec<String>,
        /// How many of the last lines to show first.
        #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 10)]
        lines: usize,
        /// Keep following the logs (across rotations) until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Compare the configuration on disk with the running one and print the plan of the
    /// reload, in the order it would be carried out: what stops, what starts, what changes in
    /// place, and which settings need a full restart.
    Reload {
        /// Print the plan and change nothing (with `--json`: the plan as one JSON object).
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace the running keeper, coordinator and standby with this ccmgr binary, keeping
    /// every service's process (refused, changing nothing, when this binary cannot read the
    /// running instance's state; exit 3 when the instance is not running).
    Upgrade,
    /// The cluster layer: runs ccmgr-cluster (installed beside ccmgr) with this configuration
    /// file, `--instance` if given, and ARGS (`ccmgr cluster --help` for its verbs).
    #[command(disable_help_flag = true)]
    Cluster {
        /// ccmgr-cluster's verb and arguments, passed on as they are.
        #[arg(
            value_name = "ARGS",
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// The roles ccmgr runs itself as (not for direct use).
    #[command(hide = true)]
    Internal {
        #[arg(value_enum)]
        role: InternalRole,
        #[arg(long)]
        foreground: bool,
        /// The instance's run directory, where its shared state is (the caller's default
        /// run directory if not given).
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
        /// A keeper re-executed by `ccmgr upgrade`: the memfd holding its previous image's
        /// state.
        #[arg(long, value_name = "FD")]
        resume_state: Option<i32>,
        /// With --resume-state: the previous image's binary, to roll back to.
        #[arg(long, value_name = "FD", requires = "resume_state")]
        previous_exe: Option<i32>,
        /// With --resume-state: this image is a roll-back, and why.
        #[arg(long, value_name = "WHY", requires = "resume_state")]
        rollback_reason: Option<String>,
    },
}

/// The per-service form of `start`, `stop` and `restart`.
#[derive(clap::Args, Debug, Default)]
pub struct OperateArgs {
    /// Act on these services of the running stack only, through the coordinator's control
    /// socket.
    #[arg(value_name = "SERVICE")]
    pub services: Vec<String>,
    /// Return once the coordinator has accepted the request, without waiting for its work.
    #[arg(long, requires = "services")]
    pub no_wait: bool,
}

/// A process role of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InternalRole {
    Keeper,
    Coordinator,
    Standby,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Text,
    Json,
}

impl Cli {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            config_path: self.config.clone(),
            instance: self.instance.clone(),
            services_dir: self.services_dir.clone(),
        }
    }
}

/// Loads the configuration (printing its warnings), or prints every problem and says how many
/// there were.
fn load_or_report(cli: &Cli) -> Result<Config, Exit> {
    report_load(Config::load(&cli.load_options()))
}

/// Prints a load's warnings, or every problem and how many there were.
fn report_load(loaded: Result<Config, crate::diag::Diagnostics>) -> Result<Config, Exit> {
    if let Ok(config) = &loaded {
        for w in config.warnings.iter() {
            eprintln!("warning: {w}");
        }
    }
    loaded.map_err(|diags| {
        if JSON_OUTPUT.get().copied().unwrap_or(false) {
            check::print_errors_json(&diags);
        }
        for d in diags.iter() {
            eprintln!("error: {d}");
        }
        let n = diags.len();
        eprintln!(
            "ccmgr: the configuration has {n} error{}; nothing was changed",
            if n == 1 { "" } else { "s" }
        );
        Exit::BadConfig
    })
}

/// `--json` was given: stdout carries only the JSON document; what would have been printed
/// there for people goes to stderr (see [`say`]).
static JSON_OUTPUT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Prints a line meant for people: on stdout, or on stderr under `--json` (stdout then
/// carries only the JSON document).
pub(crate) fn say(line: &str) {
    if JSON_OUTPUT.get().copied().unwrap_or(false) {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// The JSON document of a verb whose outcome is its exit code (`stop`): `{"instance", "verb",
/// "ok", "exit_code"}`.
fn print_outcome_json(instance: Option<&str>, verb: &str, exit: Exit) {
    let doc = serde_json::json!({
        "instance": instance,
        "verb": verb,
        "ok": exit == Exit::Ok,
        "exit_code": exit as u8,
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // clap exits with 2 on usage errors, which is our code for bad usage too.
    let cli = Cli::parse();
    let _ = JSON_OUTPUT.set(cli.json);
    let supervises = matches!(
        cli.command,
        Command::Internal { .. }
            | Command::Start {
                foreground: true,
                ..
            }
            | Command::Restart {
                foreground: true,
                ..
            }
    );
    // A stop must finish whatever happens to the output it reports to (`ccmgr stop | head -1`,
    // a terminal closed meanwhile): killed by SIGPIPE or panicking in `eprintln!` in the
    // middle, it would leave the keeper frozen and the stack half stopped. `start` stops what
    // it started when it fails, so it is one of these too.
    let must_finish = matches!(
        cli.command,
        Command::Stop { .. }
            | Command::Start {
                foreground: false,
                ..
            }
            | Command::Restart {
                foreground: false,
                ..
            }
    );
    let _shield = if must_finish {
        OutputShield::install()
    } else {
        if !supervises {
            crate::spawn::default_sigpipe();
        }
        None
    };
    // A bad `--instance` is bad usage (exit 2) for every verb, not an operation that failed.
    if let Some(Err(msg)) = cli
        .instance
        .as_deref()
        .map(crate::config::check_instance_name)
    {
        eprintln!("error: --instance: {msg}");
        return Exit::BadConfig.into();
    }
    let result = match &cli.command {
        Command::Check => load_or_report(&cli).map(|c| check::check(&c, cli.json)),
        Command::Graph { format } => {
            load_or_report(&cli).map(|c| check::graph(&c, *format, cli.json))
        }
        Command::Start { operate, .. } if !operate.services.is_empty() => {
            Ok(operate::operate(&cli, Verb::Start, operate))
        }
        Command::Stop { operate } if !operate.services.is_empty() => {
            Ok(operate::operate(&cli, Verb::Stop, operate))
        }
        Command::Restart { operate, .. } if !operate.services.is_empty() => {
            Ok(operate::operate(&cli, Verb::Restart, operate))
        }
        Command::Start { foreground, .. } => Ok(lifecycle::start(&cli, *foreground)),
        Command::Stop { .. } => {
            let exit = lifecycle::stop(&cli);
            if cli.json {
                let instance = lifecycle::instance_of(&cli).ok().map(|(i, _)| i);
                print_outcome_json(instance.as_deref(), "stop", exit);
            }
            Ok(exit)
        }
        Command::Restart { foreground, .. } => Ok(lifecycle::restart(&cli, *foreground)),
        Command::Status { services } => Ok(status::status(&cli, cli.json, services)),
        Command::Events { backlog } => Ok(events::events(&cli, cli.json, *backlog)),
        Command::Logs {
            services,
            lines,
            follow,
        } => Ok(logs::logs(&cli, services, *lines, *follow)),
        Command::Reload { dry_run } => Ok(reload::reload(&cli, *dry_run, cli.json)),
        Command::Upgrade => Ok(upgrade::upgrade(&cli)),
        Command::Cluster { args } => Ok(cluster::cluster(&cli, args)),
        Command::Internal {
            role: InternalRole::Keeper,
            run_dir,
            resume_state: Some(state_fd),
            previous_exe,
            rollback_reason,
            ..
        } => {
            let (instance, run_dir) = internal_target(&cli, run_dir.as_ref());
            Ok(upgrade::internal_keeper_resume(
                &run_dir,
                &instance,
                *state_fd,
                *previous_exe,
                rollback_reason.clone(),
            ))
        }
        Command::Internal {
            role,
            foreground,
            run_dir,
            ..
        } => {
            let (instance, run_dir) = internal_target(&cli, run_dir.as_ref());
            Ok(match role {
                InternalRole::Keeper => lifecycle::internal_keeper(&run_dir, &instance),
                InternalRole::Coordinator => lifecycle::internal_coordinator(
                    &run_dir,
                    &instance,
                    *foreground,
                    crate::coordinator::Role::Coordinator,
                ),
                InternalRole::Standby => lifecycle::internal_coordinator(
                    &run_dir,
                    &instance,
                    *foreground,
                    crate::coordinator::Role::Standby,
                ),
            })
        }
    };
    result.unwrap_or_else(|e| e).into()
}

/// Whether stderr was a terminal when the command began (before [`OutputShield`] put a pipe
/// in its place): progress lines are drawn only there.
static STDERR_IS_TERMINAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether this command's stderr is a terminal.
pub(crate) fn stderr_is_terminal() -> bool {
    *STDERR_IS_TERMINAL.get_or_init(|| std::io::IsTerminal::is_terminal(&std::io::stderr()))
}

/// Stdout and stderr behind pipes that a thread each drains into the real ones, ignoring
/// their errors: the command's own writes then never fail (no EPIPE, so no SIGPIPE and no
/// panic in `println!`), whatever became of the reader. Dropped at the end of `main`: the
/// pipes are closed and what is in them is forwarded before the process exits.
struct OutputShield {
    /// Per stream redirected (false: stdout, true: stderr), its forwarder.
    forwarders: Vec<(bool, std::thread::JoinHandle<()>)>,
}

impl OutputShield {
    fn install() -> Option<OutputShield> {
        use std::io::{Read as _, Write as _};
        // Looked at while stderr is still the real one.
        stderr_is_terminal();
        let mut forwarders = Vec::new();
        // Signals are the main thread's business (`start` reads SIGINT and SIGTERM from a
        // signalfd once it has blocked them there): one reaching a forwarder unblocked would
        // take its default action and end the process. The forwarders are born with every
        // signal blocked (a thread inherits its creator's mask); ours is put back after.
        let previous_mask = nix::sys::signal::SigSet::all()
            .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
            .ok();
        for is_stderr in [false, true] {
            let real = if is_stderr {
                nix::unistd::dup(std::io::stderr())
            } else {
                nix::unistd::dup(std::io::stdout())
            };
            let Ok(real) = real else {
                continue;
            };
            // Close-on-exec: the keeper `start` spawns must not hold our caller's pipe open.
            let cloexec = nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC);
            if nix::fcntl::fcntl(&real, cloexec).is_err() {
                continue;
            }
            let Ok((read, write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
                continue;
            };
            let redirected = if is_stderr {
                nix::unistd::dup2_stderr(&write)
            } else {
                nix::unistd::dup2_stdout(&write)
            };
            if redirected.is_err() {
                continue;
            }
            drop(write);
            forwarders.push((
                is_stderr,
                std::thread::spawn(move || {
                    let mut from = std::fs::File::from(read);
                    let mut to = Some(std::fs::File::from(real));
                    let mut buf = [0u8; 4096];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                // Once the reader is gone, the rest is drained and dropped.
                                if to.as_mut().is_some_and(|t| t.write_all(&buf[..n]).is_err()) {
                                    to = None;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => return,
                        }
                    }
                }),
            ));
        }
        if let Some(mask) = previous_mask {
            let _ = mask.thread_set_mask();
        }
        Some(OutputShield { forwarders })
    }
}

impl Drop for OutputShield {
    fn drop(&mut self) {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // Closing our ends of the pipes (fds 1 and 2 now point to /dev/null) ends the
        // forwarders once they have passed on everything.
        // Only the streams redirected: with stdout closed from the start, fd 1 may be a
        // forwarder's own copy of the real stderr.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            for (is_stderr, _) in &self.forwarders {
                let _ = if *is_stderr {
                    nix::unistd::dup2_stderr(&null)
                } else {
                    nix::unistd::dup2_stdout(&null)
                };
            }
        }
        for (_, forwarder) in self.forwarders.drain(..) {
            let _ = forwarder.join();
        }
    }
}

/// The instance and run directory an `internal` role acts on (its run directory given by the
/// process that started it, else the default one).
fn internal_target(cli: &Cli, run_dir: Option<&PathBuf>) -> (String, PathBuf) {
    let instance = cli.instance.clone().unwrap_or_default();
    let run_dir = run_dir
        .cloned()
        .unwrap_or_else(crate::shm::state_dir::default_run_dir);
    (instance, run_dir)
}

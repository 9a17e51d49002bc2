//! The keeper: the small, long-lived parent of every process of an instance.
//!
//! Only a parent can reap a child and learn how it ended, and Linux hands orphans to the
//! nearest subreaper ancestor, never to a sibling. So the processes that must outlive a
//! coordinator (the services, their log pipes, the sd_notify socket) hang under one process
//! that does nothing clever and so has little reason to die: the keeper. It is the "hands";
//! the coordinator is the "brain" (see [`crate::engine`]). The keeper:
//!
//! - starts services when the coordinator asks ([`ToKeeper::Spawn`]) and signals their process
//!   groups ([`ToKeeper::Signal`]), refusing any pid that is not a live service of its own;
//! - reaps every child, and when a service's main process ends, kills what is left of its
//!   process group *before* reaping it (while the zombie pins the group id, so the id cannot
//!   have been reused), and of its cgroup where the machine offers cgroup v2 (which also
//!   holds the daemons that escaped the group with `setsid`; see [`crate::cgroup`]), then
//!   reports the exit ([`FromKeeper::Exited`]);
//! - drains every service's output pipe into its rotated log, so a flood never blocks;
//! - owns the notify socket, so `READY=1` datagrams wait in it while no coordinator reads,
//!   and the control socket ([`crate::control`]), listening, so that an operator's request
//!   made during a takeover waits in its backlog for the successor;
//! - starts the coordinator (and standbys), queues service events while no coordinator is
//!   connected, and is a child subreaper, so nothing a service leaves behind becomes a zombie
//!   of init;
//! - keeps each service's latest exit until a coordinator acknowledges that it has published
//!   it ([`ToKeeper::AckExit`]), and hands every unacknowledged one to a coordinator that takes
//!   over: an exit the dead coordinator received but never published is not lost;
//! - never leaves the instance without a coordinator while it lives: when the coordinator dies
//!   and no standby can take over, it starts a successor (a process in the standby role, which
//!   finds the daemon standby mutex free and takes over at once). Only when successors keep
//!   dying ([`SUCCESSOR_LIMIT`] deaths within [`SUCCESSOR_SPAN`]), or a stop signal comes while
//!   none can be started, does it stop the stack itself: in order, driven by
//!   [`Engine::stopping`], the same engine every ordered stop runs on;
//! - writes the [`ProcessRecord`] of the instance's processes to `run_dir` whenever that set
//!   changes, for a `ccmgr stop` that cannot read the segment;
//! - as `start --foreground` under an init system, is the one process that talks to it: it
//!   relays the coordinators' `READY=1`/`STATUS=` to systemd's `$NOTIFY_SOCKET`
//!   ([`crate::sd_notify`]); and as PID 1 of a PID namespace it reads every signal init
//!   systems and container runtimes send ([`crate::init_signals`]);
//! - switches the instance to the next segment and configuration of a live reload
//!   ([`ToKeeper::Reload`]; see the `reload` submodule), since it owns the per-service
//!   tables that must follow the services to their new indices;
//! - re-executes itself into a new binary on `ccmgr upgrade`, served on its own upgrade
//!   socket, keeping its pid, its children and its state across the exec, and has a
//!   coordinator of the new binary adopt the stack (see the `reexec` submodule).
//!
//! Its event loop blocks in `epoll` on a signalfd, the coordinators' sockets, the log pipes, the
//! upgrade socket and one timerfd (armed only for the deadlines of its own ordered stop); it
//! never sleeps or polls.

pub mod protocol;
pub mod reexec;
mod reload;
mod run_cgroups;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use crate::cgroup;
use crate::config::Config;
use crate::engine::{Action, Engine, EngineParams, Event};
use crate::logsink::{self, LogSink};
use crate::notify::NotifySocket;
use crate::process_identity::ProcessIdentity;
use crate::records::{self, ProcessRecord, Recorded, RecordedService};
use crate::shm::Segment;
use crate::spawn::{self, ExecStage, ProcessExit, SpawnError, SpawnRequest};
use protocol::{FromKeeper, ToKeeper, recv_message};

/// Where a keeper's coordinator finds the fds it is handed.
pub const COORDINATOR_CHANNEL_FD: RawFd = 3;
pub const COORDINATOR_NOTIFY_FD: RawFd = 4;
pub const COORDINATOR_REPORT_FD: RawFd = 5;
/// The control socket's listening fd ([`crate::control`]), handed to every coordinator.
pub const COORDINATOR_CONTROL_FD: RawFd = 6;

/// Successors (coordinators the keeper starts because no standby could take over) that die
/// within [`SUCCESSOR_QUICK`] of their start, this many times within [`SUCCESSOR_SPAN`], are
/// given up on: the keeper stops the stack. A successor that lived longer did its job, and
/// deaths a standby took over from are no failure of the keeper's.
pub const SUCCESSOR_LIMIT: usize = 5;
pub const SUCCESSOR_SPAN: Duration = Duration::from_secs(60);
pub const SUCCESSOR_QUICK: Duration = Duration::from_secs(2);
/// How long a standby (or a successor) may take, after the coordinator's death, to tell the
/// keeper it takes over. A frozen (SIGSTOPped) or wedged standby never does: it is killed, and
/// a successor started in its place. A takeover tells the keeper within milliseconds; this is
/// longer than the standby's own bounded waits before it does (5 s for the daemon mutex, 5 s
/// for the daemon component), so a standby that is merely slow is never killed for it.
pub const TAKEOVER_DEADLINE: Duration = Duration::from_secs(12);

/// The process record is written once no event has come for this long after a change (a burst
/// of spawns and exits is written once, after it)...
const RECORD_SETTLE: Duration = Duration::from_millis(5);
/// ...or once a change is this old, however busy the keeper is (a service flooding its log).
const RECORD_MAX_LAG: Duration = Duration::from_millis(100);

/// Rotation of service logs: the current file and this many older ones, each up to the size.
pub const LOG_MAX_BYTES: u64 = 4 << 20;
pub const LOG_KEEP: u32 = 3;

/// Why the keeper could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot create {}: {source}", .path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the keeper's event loop: {0}")]
    Setup(Errno),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// A new binary cannot rebuild the keeper from the state its previous image handed over
    /// (`ccmgr upgrade`; see [`reexec`]).
    #[error("cannot resume the keeper from the state handed over: {0}")]
    Resume(String),
    #[error("cannot start the coordinator ({}): {source}", .exe.display())]
    StartCoordinator {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the keeper is started with.
pub struct KeeperSetup {
    pub config: Config,
    /// Run in the foreground: the coordinator logs to our stderr too, and the keeper's exit
    /// code is the stack's outcome.
    pub foreground: bool,
    /// The write end of `ccmgr start`'s report pipe, handed on to the first coordinator.
    pub report: Option<OwnedFd>,
    /// The ccmgr binary, to start coordinators with.
    pub exe: PathBuf,
    /// The instance's segment: the keeper, the last process of an instance to exit, removes
    /// it then.
    pub segment: Segment,
}

/// The path of an instance's notify socket.
pub fn notify_socket_path(config: &Config) -> PathBuf {
    notify_socket_path_in(&config.global.run_dir, &config.global.instance)
}

/// [`notify_socket_path`] from its parts (a `stop` that may have no configuration).
pub fn notify_socket_path_in(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.notify"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Coordinator,
    Standby,
    Service(usize),
    /// A failure command (`on_failure_command`), killed at its deadline.
    Hook,
}

/// The prefix of a failure command's cgroup in the instance's tree (one per run:
/// `.failure-commands.<n>`): it starts with a `.`, which no service id may.
const HOOKS_CGROUP: &str = ".failure-commands";

/// One run of a failure command.
struct HookRun {
    /// Its main process, until reaped.
    pid: Option<i32>,
    /// When it is killed, whole; None once it has been.
    due: Option<Instant>,
    /// Its own cgroup (where the machine offers them): what it leaves running, even out of
    /// its process group (`setsid cmd &`), is killed at its deadline with it.
    cgroup: Option<String>,
}

/// At most this many spawns are launched before they are confirmed and reported. The
/// coordinator keeps a READY=1 that comes before the report of its sender's spawn, but only so
/// many (64): a batch must stay well below that. 16 forks are enough to keep the other core
/// busy with execs meanwhile.
const SPAWN_BATCH: usize = 16;

/// A run of a service forked but not confirmed yet (see [`spawn::launch_service`]).
struct PendingSpawn {
    launched: spawn::Launched,
    /// The output pipe: the keeper's end, and the write end the child has a copy of (kept
    /// until the exec is confirmed, for a retry outside cgroups).
    read_end: OwnedFd,
    write_end: OwnedFd,
    /// The name of the run's cgroup, if it has one.
    run_cgroup: Option<String>,
}

/// At most this many failure commands run at once: a crash loop with a slow command must not
/// pile up processes. One asked for beyond it is skipped, with a warning.
const MAX_RUNNING_HOOKS: usize = 8;

/// A coordinator or standby and the keeper's end of its socket.
struct Peer {
    socket: OwnedFd,
    /// Its socket reached end-of-file (it exited or closed it).
    closed: bool,
    /// Messages its socket could not take yet.
    outbox: protocol::Outbox,
    /// The socket is in the epoll set for writability too.
    watching_writable: bool,
}

/// What an epoll event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Signals,
    Timer,
    Watchdog,
    Peer(i32),
    LogPipe(usize),
    /// The output of a running failure command.
    HookPipe,
    /// The upgrade socket ([`reexec`]), and the connection of the client it serves.
    UpgradeListener,
    UpgradeClient,
    /// The `cgroup.events` of an ended run's cgroup changed (see [`run_cgroups`]).
    CgroupEvents,
}

/// The output pipe of a failure command: read line by line into ccmgr's own log (which is
/// size-capped and rotated, so a command that floods cannot fill the disk).
struct HookOutput {
    pipe: OwnedFd,
    /// Whose command it is ("the instance", or a service's id), for the log lines.
    of: String,
    /// The start of a line not yet ended.
    partial: Vec<u8>,
}

/// The most a failure command's output is read at one readiness (the next comes at once:
/// epoll is level-triggered), so that a flood cannot starve the keeper's other work.
const HOOK_OUTPUT_BUDGET: usize = 64 * 1024;
/// A line longer than this is logged in pieces.
const HOOK_LINE_MAX: usize = 4096;

struct Keeper {
    config: Config,
    foreground: bool,
    exe: PathBuf,
    epoll: Epoll,
    signals: SignalFd,
    timer: TimerFd,
    notify: NotifySocket,
    /// The control socket, listening: bound here so that it outlives each coordinator (a
    /// request made during a takeover waits in its backlog for the successor).
    control: OwnedFd,
    sources: HashMap<RawFd, Source>,
    children: HashMap<i32, Role>,
    /// The main process of each service, while it runs.
    service_pids: Vec<Option<i32>>,
    logs: Vec<Option<LogSink>>,
    pipes: HashMap<RawFd, OwnedFd>,
    /// The output pipes of running failure commands, by their read end.
    hook_outputs: HashMap<RawFd, HookOutput>,
    peers: HashMap<i32, Peer>,
    /// The pid of the peer that is the coordinator now.
    coordinator: Option<i32>,
    /// Service events waiting for a coordinator to take over.
    queued: Vec<FromKeeper>,
    /// Each service's latest exit (pid, how), until a coordinator acknowledges that it has
    /// published it; sent again to whoever takes over.
    unacked_exits: Vec<Option<(i32, ProcessExit)>>,
    /// A coordinator said the stack is stopped.
    shutdown_requested: bool,
    /// The successors the keeper started, with when, until they die.
    successors: HashMap<i32, Instant>,
    /// Quick deaths of successors, for the successor limit.
    successor_deaths: RecentDeaths,
    /// A stop signal came while only a standby or successor was on its way: it is passed on
    /// to it once it has taken over.
    stop_after_takeover: bool,
    /// Standbys killed on the coordinator's request ([`ToKeeper::StopStandby`]): their end is
    /// no death to report or to replace.
    retired_standbys: HashSet<i32>,
    /// The keeper's own ordered stop, when no coordinator can do it.
    last_resort: Option<LastResortStop>,
    /// The coordinator is dead and a standby or successor is to take over: by then it must
    /// have said so ([`TAKEOVER_DEADLINE`]), or it is killed and replaced.
    takeover_due: Option<Instant>,
    /// The (pid, start time) of each child, read once when it starts, for the process record.
    identities: HashMap<i32, ProcessIdentity>,
    /// The set of processes changed since the record was last written.
    record_dirty: bool,
    /// When the loop first saw the record changed and not yet written.
    record_changed_at: Option<Instant>,
    /// With `[coordinator] watchdog`: the check of the coordinator's signs of life.
    watchdog: Option<Watchdog>,
    /// The instance's segment: the keeper publishes its own ordered stop there, and removes
    /// it at the end.
    segment: Segment,
    /// How the last coordinator exited.
    coordinator_exit: Option<ProcessExit>,
    /// The instance's cgroups, one per service, where the machine offers cgroup v2.
    cgroups: Option<cgroup::Tree>,
    /// The cgroup of each service's run, and the removal of ended runs' cgroups.
    run_cgroups: run_cgroups::RunCgroups,
    /// Spawns launched in a row of the coordinator's requests, not confirmed yet, in the
    /// order asked (see [`Keeper::queue_spawn`]).
    launching: Vec<(usize, Result<PendingSpawn, String>)>,
    /// Failure commands running (or whose main process ended while what it started lives on
    /// in its cgroup), and when each is killed.
    hooks: Vec<HookRun>,
    /// Runs of failure commands so far: names each one's cgroup.
    hook_runs: u64,
    /// Whether new service processes are moved into their cgroups. Cleared for good the first
    /// time a move fails: a machine (a container, a sandbox) may let the tree be made yet
    /// refuse to move processes into it, and a service must not fail to start for that.
    join_cgroups: bool,
    /// The coordinator that handed the stack over for a reload: its exit is expected, and a
    /// successor takes over on the new segment.
    reload_handover: Option<i32>,
    /// The init system's notify socket (systemd's `$NOTIFY_SOCKET`), for a foreground keeper
    /// started by one: the coordinators' `READY=1`/`STATUS=` are relayed there.
    init_system: Option<crate::sd_notify::SdRelay>,
    /// `ccmgr upgrade`'s socket and progress ([`reexec`]).
    upgrade: reexec::UpgradeSide,
}

/// Runs the keeper until the stack is stopped; returns the process exit code.
pub fn run(setup: KeeperSetup) -> Result<i32, KeeperError> {
    let KeeperSetup {
        config,
        foreground,
        report,
        exe,
        segment,
    } = setup;
    for dir in [&config.global.run_dir, &config.global.log_dir] {
        std::fs::create_dir_all(dir).map_err(|source| KeeperError::Directory {
            path: dir.clone(),
            source,
        })?;
    }
    // A pipe and a log file per service: raise the open-files limit (services get the old one
    // back at exec).
    if let Err(e) = spawn::raise_fd_limit() {
        warn!(error = %e, "cannot raise the open-files limit");
    }
    // Orphans of services (daemons that double-forked) come to us, not to init: we reap them.
    nix::sys::prctl::set_child_subreaper(true).map_err(KeeperError::Setup)?;
    // Those that also left the process group (setsid) are found through the cgroups.
    let cgroups = cgroup::Tree::for_instance(&config.global.instance)
        .inspect_err(|e| info!("cgroups not available: {e}; only process groups are used"))
        .ok();
    if let Some(tree) = &cgroups {
        // For `ccmgr stop`, should the keeper be killed: it runs elsewhere and cannot find
        // the tree from its own cgroup.
        let record = cgroup::Tree::record_path(&config.global.run_dir, &config.global.instance);
        let text = format!("{}\n{}\n", tree.dir().display(), tree.path().display());
        if let Err(e) = std::fs::write(&record, text) {
            warn!(error = %e, "cannot record where the instance's cgroups are");
        }
    }
    if crate::init_signals::is_pid1() {
        info!(
            "running as PID 1 of a PID namespace: orphans are reaped here, and stop signals stop the stack"
        );
    }
    let (epoll, signals, timer) = event_core()?;
    let notify = NotifySocket::bind(&notify_socket_path(&config))?;
    let control = crate::control::bind(
        &crate::control::socket_path(&config.global.run_dir, &config.global.instance),
        config.global.group.as_ref().map(|g| g.id),
    )?;
    // After the mask: the relay's thread inherits it.
    let init_system = init_system_relay(foreground);
    let n = config.services.len();
    let successor_deaths = RecentDeaths::new(SUCCESSOR_SPAN, SUCCESSOR_LIMIT);
    let mut keeper = Keeper {
        config,
        foreground,
        exe,
        epoll,
        signals,
        timer,
        notify,
        control,
        sources: HashMap::new(),
        children: HashMap::new(),
        service_pids: vec![None; n],
        logs: (0..n).map(|_| None).collect(),
        pipes: HashMap::new(),
        hook_outputs: HashMap::new(),
        peers: HashMap::new(),
        coordinator: None,
        queued: Vec::new(),
        unacked_exits: vec![None; n],
        shutdown_requested: false,
        successors: HashMap::new(),
        successor_deaths,
        stop_after_takeover: false,
        retired_standbys: HashSet::new(),
        last_resort: None,
        identities: HashMap::new(),
        record_dirty: true,
        record_changed_at: None,
        watchdog: None,
        takeover_due: None,
        segment,
        coordinator_exit: None,
        join_cgroups: cgroups.is_some(),
        run_cgroups: run_cgroups::RunCgroups::new(cgroups.as_ref(), n),
        launching: Vec::new(),
        hooks: Vec::new(),
        hook_runs: 0,
        cgroups,
        reload_handover: None,
        init_system,
        upgrade: reexec::UpgradeSide::default(),
    };
    keeper.watch_core()?;
    keeper.bind_upgrade_socket();
    let pid = keeper.start_coordinator(Role::Coordinator, report)?;
    keeper.coordinator = Some(pid);
    keeper.heard_from_coordinator();
    info!(pid, "keeper started the coordinator");
    Ok(finish(keeper))
}

/// Runs the keeper's loop until the stack is stopped, then removes what the instance leaves;
/// returns the process exit code. (A keeper resumed after `ccmgr upgrade` comes here too.)
fn finish(mut keeper: Keeper) -> i32 {
    keeper.run_loop();
    keeper.remove_upgrade_socket();
    keeper.remove_upgrade_marker();
    keeper.remove_cgroups();
    // Nothing of the instance is left to record.
    ProcessRecord::remove(&keeper.record_path());
    crate::control::remove(&crate::control::socket_path(
        &keeper.config.global.run_dir,
        &keeper.config.global.instance,
    ));
    // Nothing of the instance is left alive: its shared state goes with it. (`status` reads
    // the outcome the coordinator left in run_dir.)
    let _ = crate::shm::api::ControlSegment::remove(
        &keeper.config.global.run_dir,
        &keeper.config.global.instance,
    );
    let _ = std::fs::remove_file(crate::coordinator::reload_marker_path(&keeper.config));
    if let Ok(staged) = Segment::staged_path(
        &keeper.config.global.run_dir,
        &keeper.config.global.instance,
    ) {
        let _ = std::fs::remove_file(staged);
    }
    // The event ring's readers see its name go, after the last events, and end.
    let _ = std::fs::remove_file(crate::coordinator::events_path(&keeper.config));
    if let Err(e) = keeper.segment.unlink() {
        warn!(error = %e, "cannot remove the instance's segment");
    }
    info!("the keeper is done");
    if let Some(init) = keeper.init_system.take() {
        init.finish();
    }
    keeper.exit_code()
}

/// The relay to the init system's notify socket (systemd's `$NOTIFY_SOCKET`), for a
/// foreground keeper started by one; made anew by every image of the keeper (the socket's
/// address stays in the keeper's own environment across `ccmgr upgrade`'s exec). Called after
/// the signal mask is set: the relay's thread inherits it.
pub(crate) fn init_system_relay(foreground: bool) -> Option<crate::sd_notify::SdRelay> {
    if !foreground {
        return None;
    }
    crate::sd_notify::SdNotifier::from_env()
        .and_then(|made| made.inspect_err(|e| warn!("{e}")).ok())
        .and_then(|notifier| {
            crate::sd_notify::SdRelay::start(notifier)
                .inspect_err(|e| warn!(error = %e, "cannot start the init system's relay"))
                .ok()
        })
}

/// The keeper's own event sources, made anew by every image of it: its epoll set, the
/// signalfd of the signals it handles (blocked, so that they come only through it), and the
/// timer of its deadlines.
fn event_core() -> Result<(Epoll, SignalFd, TimerFd), KeeperError> {
    // Every signal of the table (stops, halt/poweroff/reboot, reload, SIGCHLD): as PID 1 the
    // kernel would drop the ones left at their default; blocked, none is.
    let mask = crate::init_signals::mask();
    // Blocked signals are delivered through the signalfd only. Children start with an empty
    // mask (spawn resets it; std's Command does too), so none of this leaks into them.
    mask.thread_block().map_err(KeeperError::Setup)?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(KeeperError::Setup)?;
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
    )
    .map_err(KeeperError::Setup)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(KeeperError::Setup)?;
    Ok((epoll, signals, timer))
}

impl Keeper {
    /// Watches the signalfd and the timer, and sets up the watchdog if configured.
    fn watch_core(&mut self) -> Result<(), KeeperError> {
        watch(
            &self.epoll,
            &mut self.sources,
            self.signals.as_fd(),
            Source::Signals,
        )?;
        watch(
            &self.epoll,
            &mut self.sources,
            self.timer.as_fd(),
            Source::Timer,
        )?;
        if let Some(fd) = self.run_cgroups.events_fd() {
            watch(&self.epoll, &mut self.sources, fd, Source::CgroupEvents)?;
        }
        if let Some(period) = self.config.global.coordinator.watchdog {
            let watchdog = Watchdog::new(period.as_duration())?;
            watch(
                &self.epoll,
                &mut self.sources,
                watchdog.timer.as_fd(),
                Source::Watchdog,
            )?;
            self.watchdog = Some(watchdog);
        }
        Ok(())
    }
}

impl Keeper {
    /// Starts a coordinator (or a standby) with its socket, the notify socket and, for the
    /// first coordinator, the report pipe, on fixed fd numbers.
    fn start_coordinator(
        &mut self,
        role: Role,
        report: Option<OwnedFd>,
    ) -> Result<i32, KeeperError> {
        let (ours, theirs) = protocol::channel().map_err(KeeperError::Setup)?;
        let mut mappings = vec![
            FdMapping {
                parent_fd: theirs,
                child_fd: COORDINATOR_CHANNEL_FD,
            },
            FdMapping {
                parent_fd: self.notify.as_fd().try_clone_to_owned().map_err(|e| {
                    KeeperError::StartCoordinator {
                        exe: self.exe.clone(),
                        source: e,
                    }
                })?,
                child_fd: COORDINATOR_NOTIFY_FD,
            },
            FdMapping {
                parent_fd: self
                    .control
                    .try_clone()
                    .map_err(|e| KeeperError::StartCoordinator {
                        exe: self.exe.clone(),
                        source: e,
                    })?,
                child_fd: COORDINATOR_CONTROL_FD,
            },
        ];
        if let Some(report) = report {
            mappings.push(FdMapping {
                parent_fd: report,
                child_fd: COORDINATOR_REPORT_FD,
            });
        }
        let mut command = Command::new(&self.exe);
        command
            .arg("--instance")
            .arg(&self.config.global.instance)
            .arg("internal")
            .arg(if role == Role::Standby {
                "standby"
            } else {
                "coordinator"
            })
            .arg("--run-dir")
            .arg(&self.config.global.run_dir)
            .stdin(Stdio::null())
            // Its own process group: a Ctrl-C at the terminal reaches the keeper, which then
            // asks the coordinator for an orderly stop.
            .process_group(0);
        // systemd's socket is the keeper's alone (the unit's main process); coordinators learn
        // only that someone listens, and send through the keeper.
        command.env_remove(crate::sd_notify::NOTIFY_SOCKET_ENV);
        if self.init_system.is_some() {
            command.env(crate::sd_notify::LISTENING_ENV, "1");
        }
        if self.foreground {
            command.arg("--foreground");
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        command
            .fd_mappings(mappings)
            .map_err(|e| KeeperError::StartCoordinator {
                exe: self.exe.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let child = command
            .spawn()
            .map_err(|source| KeeperError::StartCoordinator {
                exe: self.exe.clone(),
                source,
            })?;
        let pid = child.id() as i32;
        // The Child handle is dropped without waiting: the keeper reaps through waitid.
        drop(child);
        self.children.insert(pid, role);
        self.remember(pid);
        // Non-blocking: the loop reads every waiting message and must not wait for the next.
        protocol::set_nonblocking(ours.as_fd()).map_err(KeeperError::Setup)?;
        watch(
            &self.epoll,
            &mut self.sources,
            ours.as_fd(),
            Source::Peer(pid),
        )?;
        self.peers.insert(
            pid,
            Peer {
                socket: ours,
                closed: false,
                outbox: protocol::Outbox::default(),
                watching_writable: false,
            },
        );
        Ok(pid)
    }

    fn run_loop(&mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        while !self.done() {
            self.watch_writability();
            self.arm_timer();
            // The record is written once the burst that changed it has settled (no event for
            // RECORD_SETTLE), or once it is RECORD_MAX_LAG old: never on the path of a restart,
            // whose spawn request follows the exit within a fraction of a millisecond. An idle
            // keeper, its record written, blocks with no timeout at all.
            let wait = match self.record_dirty_since(Instant::now()) {
                Some(age) if age >= RECORD_MAX_LAG => {
                    self.write_record();
                    EpollTimeout::NONE
                }
                Some(age) => {
                    let left = RECORD_SETTLE.min(RECORD_MAX_LAG - age);
                    EpollTimeout::try_from(left).unwrap_or(EpollTimeout::NONE)
                }
                None => EpollTimeout::NONE,
            };
            let n = match self.epoll.wait(&mut events, wait) {
                Ok(0) if wait != EpollTimeout::NONE => {
                    self.write_record();
                    continue;
                }
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "the keeper's epoll failed; stopping everything");
                    self.kill_everything();
                    break;
                }
            };
            for event in &events[..n] {
                let fd = event.data() as RawFd;
                match self.sources.get(&fd).copied() {
                    Some(Source::Signals) => self.on_signals(),
                    Some(Source::Timer) => self.on_timer(),
                    Some(Source::Watchdog) => self.on_watchdog(),
                    Some(Source::Peer(pid)) => self.on_peer(pid),
                    Some(Source::LogPipe(service)) => self.on_log_pipe(fd, service),
                    Some(Source::HookPipe) => self.on_hook_output(fd),
                    Some(Source::UpgradeListener) => self.on_upgrade_listener(),
                    Some(Source::UpgradeClient) => self.on_upgrade_client(),
                    Some(Source::CgroupEvents) => self.run_cgroups.on_events(self.cgroups.as_ref()),
                    None => {}
                }
            }
        }
        // Whatever the services wrote last is still in their pipes.
        let fds: Vec<RawFd> = self.pipes.keys().copied().collect();
        for fd in fds {
            if let Some(Source::LogPipe(service)) = self.sources.get(&fd).copied() {
                self.on_log_pipe(fd, service);
            }
        }
        let fds: Vec<RawFd> = self.hook_outputs.keys().copied().collect();
        for fd in fds {
            self.on_hook_output(fd);
        }
    }

    /// The keeper's work is over: no coordinator, no standby, no service left, and either a
    /// coordinator said so or nothing is left to keep.
    fn done(&self) -> bool {
        self.children.is_empty()
            && (self.shutdown_requested || self.last_resort.is_some() || self.coordinator.is_none())
    }

    fn exit_code(&self) -> i32 {
        match self.coordinator_exit {
            Some(ProcessExit::Exited(code)) if self.last_resort.is_none() => code,
            _ => 1,
        }
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            use crate::init_signals::SignalAction;
            match crate::init_signals::action_of(info.ssi_signo as i32) {
                Some(SignalAction::Reap) => self.reap_children(),
                Some(SignalAction::Stop(name)) => {
                    info!(signal = name, from = info.ssi_pid, "a stop signal");
                    self.on_stop_signal()
                }
                Some(SignalAction::Ignore(name)) => {
                    info!(
                        signal = name,
                        from = info.ssi_pid,
                        "ignored: it means nothing to ccmgr"
                    )
                }
                // A reload is the coordinator's to carry out (`start --foreground` is the
                // keeper: its SIGHUP is passed on).
                Some(SignalAction::Reload) => match self
                    .coordinator
                    .filter(|pid| self.children.contains_key(pid))
                {
                    Some(pid) => {
                        info!(
                            pid,
                            "SIGHUP: asking the coordinator to reload the configuration"
                        );
                        let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
                    }
                    None => {
                        info!("SIGHUP ignored: no coordinator lives to reload the configuration")
                    }
                },
                None => {}
            }
        }
        // A SIGCHLD can merge with another; reaping is idempotent, so check every time.
        self.reap_children();
    }

    /// SIGTERM/SIGINT: the coordinator stops the stack in order; while a standby or successor
    /// is on its way to take over, it does once it has; with neither, the keeper does.
    fn on_stop_signal(&mut self) {
        self.tell_init_system("STOPPING=1\nSTATUS=stopping: a stop signal came");
        // A coordinator that died but is not reaped yet (SIGTERM is read before SIGCHLD) must
        // not be the one the stop is passed to.
        self.reap_children();
        match self
            .coordinator
            .filter(|pid| self.children.contains_key(pid))
        {
            // It is handing over for a reload and exits without reading signals: the stop
            // is for its successor.
            Some(pid) if self.reload_handover == Some(pid) => {
                info!(
                    "a stop signal came during a reload's handover: passed on once the successor takes over"
                );
                self.stop_after_takeover = true;
            }
            Some(pid) => {
                info!(pid, "asking the coordinator to stop the stack");
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            None if self.standby_alive() && self.last_resort.is_none() => {
                info!(
                    "a stop signal came while no coordinator lived: passed on once one takes over"
                );
                self.stop_after_takeover = true;
            }
            None => self.begin_last_resort_stop(),
        }
    }

    /// Relays `state` to the init system's notify socket, if there is one.
    fn tell_init_system(&self, state: &str) {
        if let Some(init) = &self.init_system {
            init.send(state);
        }
    }

    /// A successor the keeper started (at `since`) died: a quick death counts towards the
    /// successor limit.
    fn count_successor_death(&mut self, since: Option<Instant>) {
        if since.is_some_and(|t| t.elapsed() < SUCCESSOR_QUICK) {
            self.successor_deaths.record(Instant::now());
        }
    }

    /// A standby (or a successor) lives and will take over: one being retired will not.
    fn standby_alive(&self) -> bool {
        self.children
            .iter()
            .any(|(pid, r)| *r == Role::Standby && !self.retired_standbys.contains(pid))
    }

    /// The coordinator is gone and nothing can take over: start a successor, unless they keep
    /// dying (then, or if none can be started, stop the stack in order here).
    fn ensure_coordinator(&mut self) {
        if self.shutdown_requested || self.last_resort.is_some() || self.coordinator.is_some() {
            return;
        }
        if !self.segment.intact() {
            // The standby waits on a mutex inside the truncated segment: the kernel cannot
            // mark it at the coordinator's death, so it never wakes; a successor would die of
            // SIGBUS. Nobody can take over: stop the stack here.
            error!(
                "the instance's segment is truncated: no coordinator can take over; the keeper stops the stack in order"
            );
            for (&pid, role) in &self.children {
                if *role == Role::Standby {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    self.retired_standbys.insert(pid);
                }
            }
            self.begin_last_resort_stop();
            return;
        }
        if self.standby_alive() {
            self.takeover_due
                .get_or_insert_with(|| Instant::now() + TAKEOVER_DEADLINE);
            return;
        }
        let deaths = self.successor_deaths.count(Instant::now());
        if deaths >= SUCCESSOR_LIMIT {
            error!(
                deaths,
                span_s = SUCCESSOR_SPAN.as_secs(),
                "coordinators keep dying: the keeper stops the stack in order"
            );
            self.begin_last_resort_stop();
            return;
        }
        match self.start_coordinator(Role::Standby, None) {
            Ok(pid) => {
                warn!(
                    pid,
                    "no standby can take over: started a new coordinator to adopt the stack"
                );
                self.successors.insert(pid, Instant::now());
                self.takeover_due = Some(Instant::now() + TAKEOVER_DEADLINE);
            }
            Err(e) => {
                error!(error = %e, "cannot start a new coordinator: the keeper stops the stack in order");
                self.begin_last_resort_stop();
            }
        }
    }

    /// No coordinator can stop the stack: stop it here, in shutdown order, with each service's
    /// stop signal and timeout, on the same engine a coordinator stops it with.
    fn begin_last_resort_stop(&mut self) {
        if self.last_resort.is_some() {
            return;
        }
        warn!("no coordinator is alive: the keeper stops the services in order");
        self.tell_init_system(
            "STOPPING=1\nSTATUS=stopping: no coordinator could run; the keeper stops the stack",
        );
        let epoch = Instant::now();
        let epoch_ms = crate::shm::monotonic_ms();
        let (engine, actions) = Engine::stopping(
            EngineParams::from_config(&self.config),
            Duration::ZERO,
            &self.service_pids,
        );
        self.last_resort = Some(LastResortStop {
            engine,
            epoch,
            epoch_ms,
        });
        self.perform_stop(actions);
        self.publish_stop();
    }

    /// Writes the keeper's ordered stop into the segment, as a coordinator publishes its own,
    /// so that `status` says what is going on: stopping, and each service's state.
    fn publish_stop(&self) {
        let Some(stop) = &self.last_resort else {
            return;
        };
        // A truncated segment is the likeliest reason no coordinator could run: touching it
        // would kill the keeper with SIGBUS in the middle of its stop, leaving the rest of the
        // services to init.
        if !self.segment.intact() {
            return;
        }
        // The stopping engine starts every slot's clock at the keeper's time zero: a service
        // still in the state the segment shows keeps that state's time (an `up` service's
        // uptime is not reset by the keeper's taking over the stop).
        let shown: Vec<Option<crate::vocab::ServiceState>> = (0..stop.engine.slots().len())
            .map(|i| self.segment.service_status(i).ok().map(|st| st.state))
            .collect();
        let Ok(w) = self.segment.write() else {
            return;
        };
        let ms = |t: Duration| stop.epoch_ms + t.as_millis() as u64;
        w.set_instance_state(stop.engine.phase(), ms(stop.engine.phase_since()));
        for (i, slot) in stop.engine.slots().iter().enumerate() {
            if shown[i] != Some(slot.state()) {
                let _ = w.set_service_state(i, slot.state(), ms(slot.since));
            }
            let identity = slot
                .pid()
                .and_then(|pid| self.identities.get(&pid).copied());
            let _ = w.set_service_process(i, identity);
            if let Some(exit) = slot.last_exit {
                let _ = w.set_last_exit(i, Some(exit.into()));
            }
        }
    }

    /// Feeds the keeper's ordered stop, if it runs.
    fn feed_stop(&mut self, event: Event) {
        let Some(stop) = self.last_resort.as_mut() else {
            return;
        };
        let actions = stop.engine.handle(event, stop.epoch.elapsed());
        self.perform_stop(actions);
        self.publish_stop();
    }

    /// Carries out what the keeper's ordered stop decides.
    fn perform_stop(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Signal { service, signal } => {
                    if let Some(pid) = self.service_pids[service] {
                        info!(service = %self.config.services[service].id, pid, signal = signal.as_str(), "stopping");
                        let _ = spawn::signal_group(Pid::from_raw(pid), signal);
                    }
                }
                Action::Kill { service } => {
                    if let Some(pid) = self.service_pids[service] {
                        warn!(service = %self.config.services[service].id, pid, "timed out: killing its process group");
                        let _ = spawn::signal_group(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    self.kill_service_cgroup(service);
                }
                // The service API's shutdown gate is the coordinator's: without one, its
                // services get their stop signal at their turn like any other.
                Action::ShutdownRequested { services } => {
                    let more: Vec<Action> = match self.last_resort.as_mut() {
                        Some(stop) => services
                            .into_iter()
                            .flat_map(|s| stop.engine.not_cooperative(s))
                            .collect(),
                        None => Vec::new(),
                    };
                    self.perform_stop(more);
                }
                Action::Finished(_) => {
                    info!("the keeper's ordered stop is over");
                    self.kill_all_cgroups();
                    self.record_outcome();
                }
                // A stopping engine starts nothing.
                Action::Spawn { .. } | Action::StartupComplete | Action::ShutdownOver => {}
            }
        }
    }

    /// For `status` once everything is gone: the stack was stopped by the keeper, and why.
    fn record_outcome(&self) {
        let at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = crate::coordinator::LastOutcome {
            outcome: "stopped by the keeper: no coordinator could run".into(),
            service: None,
            how: None,
            restarts: None,
            at_unix,
        };
        if let Ok(text) = serde_json::to_string_pretty(&last) {
            let path = crate::coordinator::last_outcome_path(&self.config);
            if let Err(e) = std::fs::write(&path, text) {
                warn!(error = %e, path = %path.display(), "cannot record how the run ended");
            }
        }
    }

    /// The timer is armed only for the keeper's ordered stop and a takeover under way: their
    /// nearest deadline. An idle stack arms nothing.
    fn arm_timer(&self) {
        let stop = self.last_resort.as_ref().and_then(|stop| {
            stop.engine
                .next_deadline()
                .map(|d| d.saturating_sub(stop.epoch.elapsed()))
        });
        let takeover = self
            .takeover_due
            .map(|due| due.saturating_duration_since(Instant::now()));
        let hook = self
            .hooks
            .iter()
            .filter_map(|run| run.due)
            .min()
            .map(|due| due.saturating_duration_since(Instant::now()));
        let next = [stop, takeover, hook].into_iter().flatten().min();
        match next {
            Some(wait) => {
                let _ = self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(
                        wait.max(Duration::from_micros(1)),
                    )),
                    TimerSetTimeFlags::empty(),
                );
            }
            None => {
                let _ = self.timer.unset();
            }
        }
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.check_takeover();
        self.kill_overdue_hooks();
        self.feed_stop(Event::Tick);
    }

    /// The coordinator died and the standby (or successor) that is to take over has not said
    /// so in time: it is frozen or wedged, and while it lives the keeper would wait for it
    /// forever. Kill it; its death then starts a successor, as any standby's death would.
    fn check_takeover(&mut self) {
        let Some(due) = self.takeover_due else {
            return;
        };
        if self.coordinator.is_some() || self.shutdown_requested || self.last_resort.is_some() {
            self.takeover_due = None;
            return;
        }
        if Instant::now() < due {
            return;
        }
        self.takeover_due = None;
        for (&pid, role) in &self.children {
            if *role == Role::Standby {
                error!(
                    pid,
                    deadline_ms = TAKEOVER_DEADLINE.as_millis() as u64,
                    "the standby has not taken over in time (frozen or wedged): killing it"
                );
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// The keeper's own loop broke: nothing can be stopped in order any more.
    fn kill_everything(&mut self) {
        for pid in self.service_pids.iter().flatten() {
            let _ = spawn::signal_group(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        self.kill_all_cgroups();
    }

    /// Reaps every child that has ended.
    fn reap_children(&mut self) {
        loop {
            // WNOWAIT: look at the zombie without reaping it, so the service's process group
            // id stays ours while we kill what is left in it.
            let peek = waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            );
            let pid = match peek {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => return,
                },
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitid failed");
                    return;
                }
            };
            let role = self.children.remove(&pid.as_raw());
            if let Some(Role::Service(_)) = role {
                // Leftovers of the service (children it forked and left) die with it: its
                // process group now, while the zombie keeps the group id ours; its run's
                // cgroup once the coordinator has heard of the exit (below), as the
                // replacement is born in a cgroup of its own.
                let _ = spawn::signal_group(pid, Signal::SIGKILL);
            }
            let exit = match spawn::reap(pid) {
                Ok(exit) => exit,
                Err(_) => continue,
            };
            match role {
                Some(Role::Service(service)) => {
                    self.on_service_exit(service, pid.as_raw(), exit);
                    self.end_run_cgroup(service);
                }
                Some(role @ (Role::Coordinator | Role::Standby)) => {
                    // What it sent before it died is all in its socket: read it first (a
                    // coordinator's last words are "stop the standby" and "shut down"; lost,
                    // its orderly end would look like a death).
                    self.on_peer(pid.as_raw());
                    let role = self.children.get(&pid.as_raw()).copied().unwrap_or(role);
                    self.children.remove(&pid.as_raw());
                    self.on_peer_exit(pid.as_raw(), role, exit)
                }
                Some(Role::Hook) => {
                    if let Some(run) = self.hooks.iter_mut().find(|r| r.pid == Some(pid.as_raw())) {
                        run.pid = None;
                    }
                    self.forget_finished_hooks();
                    if exit.success() {
                        info!(pid = pid.as_raw(), "the failure command ended");
                    } else {
                        warn!(pid = pid.as_raw(), %exit, "the failure command failed");
                    }
                }
                // An orphan a service (or a failure command) left behind: reaped, nothing to
                // report; a failure command's cgroup it was the last of can go.
                None => self.forget_finished_hooks(),
            }
        }
    }

    fn on_service_exit(&mut self, service: usize, pid: i32, exit: ProcessExit) {
        self.service_pids[service] = None;
        self.identities.remove(&pid);
        self.record_dirty = true;
        self.unacked_exits[service] = Some((pid, exit));
        self.tell_coordinator(FromKeeper::Exited { service, pid, exit });
        self.feed_stop(Event::Exited { service, exit });
    }

    /// A coordinator or a standby ended. `role` is what it was when it died: a coordinator
    /// that a standby has already replaced (its death woke the standby before we reaped it) is
    /// neither the current coordinator nor a standby to replace.
    fn on_peer_exit(&mut self, pid: i32, role: Role, exit: ProcessExit) {
        let was_coordinator = self.coordinator == Some(pid);
        let retired = self.retired_standbys.remove(&pid);
        let successor_since = self.successors.remove(&pid);
        self.identities.remove(&pid);
        self.record_dirty = true;
        self.upgrade_on_peer_exit(pid);
        if let Some(mut peer) = self.peers.remove(&pid) {
            unwatch(&self.epoll, &mut self.sources, peer.socket.as_fd());
            if was_coordinator {
                // What it never read waits, in order, for whoever takes over.
                let unsent: Vec<FromKeeper> = peer.outbox.drain_unsent();
                let later = std::mem::take(&mut self.queued);
                self.queued = unsent;
                self.queued.extend(later);
            }
        }
        if was_coordinator {
            self.coordinator = None;
            self.coordinator_exit = Some(exit);
            if self.reload_handover == Some(pid) {
                self.reload_handover = None;
                info!(
                    pid,
                    "the coordinator handed over for a reload: starting its successor"
                );
                self.ensure_coordinator();
            } else if !self.shutdown_requested {
                warn!(pid, %exit, "the coordinator died");
                self.count_successor_death(successor_since);
                // A standby that lives takes over; otherwise a successor must.
                self.ensure_coordinator();
            }
        } else if role == Role::Standby && !retired {
            if self.coordinator.is_some() {
                self.tell_coordinator(FromKeeper::StandbyExited { pid });
            } else if exit == ProcessExit::Exited(0) {
                // A standby exits 0 only to retire: it found the stack stopped in order (the
                // coordinator died after publishing that, before telling us).
                info!(pid, "the stack was stopped in order: nothing to take over");
                if self.service_pids.iter().any(Option::is_some) {
                    // Stopped, says the segment, yet something runs: stop it here.
                    self.begin_last_resort_stop();
                } else {
                    self.shutdown_requested = true;
                }
            } else if !self.shutdown_requested {
                // It was to take over from a dead coordinator (or was a successor).
                if successor_since.is_some() {
                    warn!(pid, %exit, "the successor coordinator died before it took over");
                } else {
                    warn!(pid, %exit, "the standby died while no coordinator lived");
                }
                self.count_successor_death(successor_since);
                self.ensure_coordinator();
            }
        }
    }

    /// Sends a service event to the coordinator, or queues it until one takes over.
    fn tell_coordinator(&mut self, message: FromKeeper) {
        let coordinator = self.coordinator;
        if let Some(peer) = coordinator
            .and_then(|pid| self.peers.get_mut(&pid))
            .filter(|p| !p.closed)
        {
            match peer.outbox.push(peer.socket.as_fd(), &message) {
                Ok(()) => return,
                Err(_) => {
                    // Gone: what it never got waits, in order, for whoever takes over.
                    peer.closed = true;
                    let unsent: Vec<FromKeeper> = peer.outbox.drain_unsent();
                    self.queued.extend(unsent);
                }
            }
        }
        self.queued.push(message);
    }

    /// Watches a peer's socket for room exactly while messages wait in its outbox.
    fn watch_writability(&mut self) {
        for (&pid, peer) in &mut self.peers {
            let want = !peer.outbox.is_empty() && !peer.closed;
            if want == peer.watching_writable || peer.closed {
                continue;
            }
            let flags = if want {
                EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
            } else {
                EpollFlags::EPOLLIN
            };
            let fd = peer.socket.as_raw_fd();
            if self
                .epoll
                .modify(peer.socket.as_fd(), &mut EpollEvent::new(flags, fd as u64))
                .is_ok()
            {
                peer.watching_writable = want;
            } else {
                warn!(pid, "cannot watch a coordinator's socket for room");
            }
        }
    }

    fn on_peer(&mut self, pid: i32) {
        if let Some(peer) = self.peers.get_mut(&pid) {
            if peer.outbox.flush(peer.socket.as_fd()).is_err() {
                peer.closed = true;
            }
        }
        while let Some(peer) = self.peers.get_mut(&pid) {
            let message = match recv_message::<ToKeeper>(peer.socket.as_fd()) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => {
                    // It closed its end (or exited): stop watching; its exit is reaped apart.
                    peer.closed = true;
                    unwatch(&self.epoll, &mut self.sources, peer.socket.as_fd());
                    break;
                }
            };
            // The coordinator's spawn requests in a row are launched together and confirmed
            // at the first other message, or once none is left to read.
            let from_coordinator =
                self.coordinator == Some(pid) && !self.retired_standbys.contains(&pid);
            match message {
                ToKeeper::Spawn { service } if from_coordinator => {
                    self.heard_from_coordinator();
                    self.queue_spawn(service);
                }
                message => {
                    self.confirm_launched();
                    self.on_request(pid, message);
                }
            }
        }
        self.confirm_launched();
    }

    fn on_request(&mut self, from: i32, message: ToKeeper) {
        let is_coordinator = self.coordinator == Some(from);
        if is_coordinator || message == ToKeeper::TakeOver {
            self.heard_from_coordinator();
        }
        match message {
            // A retired standby (of a segment a reload replaced) is killed, not promoted: it
            // may have woken to its coordinator's exit before its SIGKILL landed.
            _ if self.retired_standbys.contains(&from) => {
                info!(pid = from, ?message, "ignoring a retired standby's request")
            }
            ToKeeper::TakeOver => {
                info!(pid = from, "a standby takes over as coordinator");
                self.upgrade_on_takeover();
                self.takeover_due = None;
                self.coordinator = Some(from);
                self.children.insert(from, Role::Coordinator);
                self.record_dirty = true;
                // First what happened while nobody listened, then every exit no coordinator
                // has published (the dead one may have read it and died before publishing),
                // then what runs now. The exits queued are among the unacknowledged ones.
                for message in std::mem::take(&mut self.queued) {
                    if !matches!(message, FromKeeper::Exited { .. }) {
                        self.tell_coordinator(message);
                    }
                }
                let unacked: Vec<FromKeeper> = self
                    .unacked_exits
                    .iter()
                    .enumerate()
                    .filter_map(|(service, e)| {
                        e.map(|(pid, exit)| FromKeeper::Exited { service, pid, exit })
                    })
                    .collect();
                for message in unacked {
                    self.tell_coordinator(message);
                }
                let services = self
                    .service_pids
                    .iter()
                    .enumerate()
                    .filter_map(|(s, pid)| pid.map(|p| (s, p)))
                    .collect();
                self.tell_coordinator(FromKeeper::Running { services });
                if std::mem::take(&mut self.stop_after_takeover) {
                    info!(pid = from, "asking the new coordinator to stop the stack");
                    let _ = kill(Pid::from_raw(from), Signal::SIGTERM);
                }
            }
            // Everything else comes from the coordinator only.
            _ if !is_coordinator => warn!(
                pid = from,
                ?message,
                "ignoring a request from a process that is not the coordinator"
            ),
            ToKeeper::Spawn { service } => self.spawn_service(service),
            ToKeeper::Signal {
                service,
                pid,
                signal,
            } => {
                let ours = self.service_pids.get(service).copied().flatten() == Some(pid)
                    && self.children.get(&pid) == Some(&Role::Service(service));
                match (ours, Signal::try_from(signal)) {
                    (true, Ok(sig)) => {
                        let _ = spawn::signal_group(Pid::from_raw(pid), sig);
                        if sig == Signal::SIGKILL {
                            self.kill_service_cgroup(service);
                        }
                    }
                    _ => info!(
                        service,
                        pid, signal, "not signalling: that process is no longer the service's"
                    ),
                }
            }
            ToKeeper::SpawnStandby => {
                // Nothing new starts once the stack is stopped.
                let pid = if self.shutdown_requested {
                    None
                } else {
                    self.start_coordinator(Role::Standby, None).ok()
                };
                self.tell_coordinator(FromKeeper::StandbySpawned { pid });
                // A standby is asked for once a startup is over: the keeper settles here, and
                // what the burst of spawns allocated and let go of goes back.
                crate::heap::release_free_memory();
            }
            ToKeeper::StopStandby => {
                for (&pid, role) in &self.children {
                    if *role == Role::Standby {
                        info!(pid, "stopping the standby");
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        self.retired_standbys.insert(pid);
                    }
                }
            }
            ToKeeper::Shutdown => self.shutdown_requested = true,
            ToKeeper::AckExit { service, pid } => {
                let slot = self.unacked_exits.get_mut(service);
                if let Some(slot) = slot.filter(|e| e.is_some_and(|(p, _)| p == pid)) {
                    *slot = None;
                }
            }
            // A sign of life for the watchdog, noted above; it needs no answer.
            ToKeeper::Alive => {}
            ToKeeper::SdNotify { state } => self.tell_init_system(&state),
            ToKeeper::RunHook { service, env } => self.run_hook(service, env),
            ToKeeper::Reload => {
                let applied = self.apply_reload(from);
                // Straight to the one that asked (its events now wait for the successor).
                if let Some(peer) = self.peers.get_mut(&from) {
                    let _ = peer
                        .outbox
                        .push(peer.socket.as_fd(), &FromKeeper::ReloadDone { applied });
                }
            }
        }
    }

    /// Starts a failure command in its own process group, as the keeper's user, its output
    /// in ccmgr's own log, and arms its deadline. It never delays the coordinator: the
    /// request is fire-and-forget, and a command that hangs is killed at its timeout.
    fn run_hook(&mut self, service: Option<usize>, extra: Vec<(String, String)>) {
        let command = match service {
            Some(s) => self
                .config
                .services
                .get(s)
                .and_then(|spec| spec.on_failure_command.clone()),
            None => self.config.global.coordinator.on_failure_command.clone(),
        };
        let Some(command) = command else { return };
        let whose = service.map_or("the instance", |s| self.config.services[s].id.as_str());
        if self.hooks.iter().filter(|r| r.due.is_some()).count() >= MAX_RUNNING_HOOKS {
            warn!(
                of = whose,
                running = self.hooks.len(),
                "too many failure commands still running: this one is skipped"
            );
            return;
        }
        // A clean environment, as for services: the basics, the instance, then the event.
        let mut env: Vec<(String, String)> = ["PATH", "HOME", "LANG", "TZ"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
            .collect();
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), crate::config::service::defaults::PATH.into()));
        }
        env.push(("CCMGR_INSTANCE".into(), self.config.global.instance.clone()));
        env.extend(extra.into_iter().filter(|(k, _)| k.starts_with("CCMGR_")));
        // Its output goes through a pipe into ccmgr's own log (the keeper's stderr is
        // /dev/null unless in the foreground).
        let (read_end, write_end) = match logsink::make_output_pipe() {
            Ok(pipe) => pipe,
            Err(e) => {
                warn!(of = whose, error = %e, "cannot run the failure command");
                return;
            }
        };
        // In the instance's cgroup tree (its own cgroup, `HOOKS_CGROUP`, a name no service id
        // can take), so that what a failure command leaves running, even out of its process
        // group (`setsid cmd &`, or a command that ignores SIGTERM past a killed keeper), is
        // killed with the rest of the instance at a stop, which then never says "stopped"
        // with it alive.
        self.hook_runs += 1;
        let cgroup_id = format!("{HOOKS_CGROUP}.{}", self.hook_runs);
        let hooks_procs = self
            .cgroups
            .as_ref()
            .filter(|_| self.join_cgroups)
            .and_then(|tree| tree.open_procs(&cgroup_id).ok());
        let mut in_cgroup = hooks_procs.is_some();
        let mut request = SpawnRequest {
            program: PathBuf::from("/bin/sh"),
            argv: vec!["sh".into(), "-c".into(), command],
            env,
            working_dir: PathBuf::from("/"),
            credentials: None,
            output: write_end.as_fd(),
            cgroup_procs: hooks_procs.as_ref().map(|fd| fd.as_fd()),
            cgroup_dir: None,
        };
        let mut spawned = spawn::spawn_service(&request);
        if let Err(SpawnError::Exec {
            stage: ExecStage::Cgroup,
            ..
        }) = &spawned
        {
            // It could not join the cgroup (and was reaped): run it without.
            request.cgroup_procs = None;
            spawned = spawn::spawn_service(&request);
            in_cgroup = false;
        }
        match spawned {
            Ok(spawned) => {
                let pid = spawned.pid.as_raw();
                let timeout = self
                    .config
                    .global
                    .coordinator
                    .on_failure_timeout
                    .as_duration();
                self.children.insert(pid, Role::Hook);
                self.hooks.push(HookRun {
                    pid: Some(pid),
                    due: Some(Instant::now() + timeout),
                    cgroup: in_cgroup.then_some(cgroup_id),
                });
                info!(of = whose, pid, "running the failure command");
                drop(request);
                drop(write_end); // only the command holds it now: its end means EOF
                match watch(
                    &self.epoll,
                    &mut self.sources,
                    read_end.as_fd(),
                    Source::HookPipe,
                ) {
                    Ok(()) => {
                        self.hook_outputs.insert(
                            read_end.as_raw_fd(),
                            HookOutput {
                                pipe: read_end,
                                of: whose.to_owned(),
                                partial: Vec::new(),
                            },
                        );
                    }
                    Err(e) => {
                        warn!(of = whose, error = %e, "cannot read the failure command's output")
                    }
                }
            }
            Err(e) => warn!(of = whose, error = %e, "cannot run the failure command"),
        }
    }

    /// Reads what a failure command wrote (at most [`HOOK_OUTPUT_BUDGET`] now) into ccmgr's
    /// log, a line each; at its end, the unfinished line too, and forgets the pipe.
    fn on_hook_output(&mut self, fd: RawFd) {
        let Some(output) = self.hook_outputs.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; 8192];
        let mut read_so_far = 0;
        let mut ended = false;
        while read_so_far < HOOK_OUTPUT_BUDGET {
            match nix::unistd::read(&output.pipe, &mut buf) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    read_so_far += n;
                    output.partial.extend_from_slice(&buf[..n]);
                    while let Some(end) = output.partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = output.partial.drain(..=end).collect();
                        let text = String::from_utf8_lossy(&line[..end]);
                        info!(of = %output.of, "failure command: {text}");
                    }
                    if output.partial.len() > HOOK_LINE_MAX {
                        let text = String::from_utf8_lossy(&output.partial);
                        info!(of = %output.of, "failure command: {text}");
                        output.partial.clear();
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        if ended && let Some(output) = self.hook_outputs.remove(&fd) {
            if !output.partial.is_empty() {
                let text = String::from_utf8_lossy(&output.partial);
                info!(of = %output.of, "failure command: {text}");
            }
            unwatch(&self.epoll, &mut self.sources, output.pipe.as_fd());
        }
    }

    /// Kills every failure command past its deadline: its cgroup (with whatever it started,
    /// in its process group or not), else its process group.
    fn kill_overdue_hooks(&mut self) {
        let now = Instant::now();
        let timeout_ms = self
            .config
            .global
            .coordinator
            .on_failure_timeout
            .as_duration()
            .as_millis() as u64;
        for run in &mut self.hooks {
            if run.due.is_none_or(|due| due > now) {
                continue;
            }
            // Killed: no deadline any more (its reaping needs no timer).
            run.due = None;
            warn!(
                pid = run.pid,
                timeout_ms,
                "the failure command ran past its timeout: killing it and what it started"
            );
            match (&run.cgroup, &self.cgroups) {
                (Some(id), Some(tree)) => {
                    if let Err(e) = tree.kill(id) {
                        warn!(error = %e, "cannot kill the failure command's cgroup");
                    }
                }
                _ => {
                    if let Some(pid) = run.pid {
                        let _ = spawn::signal_group(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
        }
        self.forget_finished_hooks();
    }

    /// Forgets the runs of failure commands that are over: the main process reaped and,
    /// with a cgroup, nothing left in it (whose directory goes). A run whose main process
    /// ended while something it started lives on in its cgroup keeps its deadline.
    fn forget_finished_hooks(&mut self) {
        let tree = self.cgroups.as_ref();
        self.hooks.retain(|run| {
            if run.pid.is_some() {
                return true;
            }
            let Some(id) = &run.cgroup else {
                return false;
            };
            let Some(tree) = tree else { return false };
            if tree.populated(id).unwrap_or(false) {
                return true;
            }
            let _ = std::fs::remove_dir(tree.service_dir(id));
            false
        });
    }

    fn spawn_service(&mut self, service: usize) {
        let launched = self.launch_spawn(service);
        self.finish_spawn(service, launched);
    }

    /// Starts every spawn the coordinator asked for in a row before confirming any (see
    /// [`spawn::launch_service`]): `launching` holds them, in order, until
    /// [`confirm_launched`](Keeper::confirm_launched).
    fn queue_spawn(&mut self, service: usize) {
        let launched = if self.launching.iter().any(|(s, _)| *s == service) {
            Err("it is already starting".into())
        } else {
            self.launch_spawn(service)
        };
        self.launching.push((service, launched));
        if self.launching.len() >= SPAWN_BATCH {
            self.confirm_launched();
        }
    }

    /// Confirms the spawns [`queue_spawn`](Keeper::queue_spawn) launched, and tells the
    /// coordinator how each went, in the order it asked.
    fn confirm_launched(&mut self) {
        for (service, launched) in std::mem::take(&mut self.launching) {
            self.finish_spawn(service, launched);
        }
    }

    fn finish_spawn(&mut self, service: usize, launched: Result<PendingSpawn, String>) {
        let reply = match launched.and_then(|p| self.confirm_spawn(service, p)) {
            Ok(pid) => FromKeeper::Spawned { service, pid },
            Err(error) => FromKeeper::SpawnFailed { service, error },
        };
        self.tell_coordinator(reply);
    }

    /// The request to start `service`, its output going to `output`.
    fn request_for<'a>(
        &self,
        service: usize,
        output: BorrowedFd<'a>,
    ) -> Result<SpawnRequest<'a>, String> {
        let spec = &self.config.services[service];
        let env = spawn::build_environment(
            spec,
            &self.config.global.instance,
            &self.config.global.run_dir,
            &[self.notify.env_var()],
        )
        .map_err(|e| e.to_string())?;
        SpawnRequest::for_service(spec, env, output).map_err(|e| e.to_string())
    }

    /// Forks `service`'s next run, in a cgroup of its own (see [`run_cgroups`]); its exec is
    /// confirmed by [`confirm_spawn`](Keeper::confirm_spawn).
    fn launch_spawn(&mut self, service: usize) -> Result<PendingSpawn, String> {
        if service >= self.config.services.len() {
            return Err("no such service".into());
        }
        if self.service_pids[service].is_some() {
            return Err("it is already running".into());
        }
        if self.logs[service].is_none() {
            let sink = LogSink::open(
                &self.config.global.log_dir,
                &self.config.services[service].id,
                LOG_MAX_BYTES,
                LOG_KEEP,
            )
            .map_err(|e| e.to_string())?;
            self.logs[service] = Some(sink);
        }
        let (read_end, write_end) = logsink::make_output_pipe().map_err(|e| e.to_string())?;
        let mut request = self.request_for(service, write_end.as_fd())?;
        let run_cgroup = self.open_run_cgroup(service);
        request.cgroup_procs = run_cgroup.as_ref().map(|c| c.procs.as_fd());
        if self.run_cgroups.born_in_cgroup() {
            request.cgroup_dir = run_cgroup.as_ref().map(|c| c.dir.as_fd());
        }
        let launched = spawn::launch_service(&request);
        drop(request);
        match launched {
            Ok(launched) => Ok(PendingSpawn {
                launched,
                read_end,
                write_end,
                run_cgroup: run_cgroup.map(|c| c.name),
            }),
            Err(e) => {
                self.retire_run_cgroup(run_cgroup.map(|run| run.name));
                Err(e.to_string())
            }
        }
    }

    /// Waits for the exec of a launched run, and takes it in as `service`'s main process.
    fn confirm_spawn(&mut self, service: usize, pending: PendingSpawn) -> Result<i32, String> {
        let PendingSpawn {
            launched,
            read_end,
            write_end,
            run_cgroup,
        } = pending;
        let spawned = match launched.confirm() {
            Err(
                e @ SpawnError::Exec {
                    stage: ExecStage::Cgroup,
                    ..
                },
            ) => {
                // The child failed before exec and was reaped: start it again, outside
                // cgroups.
                stop_joining_cgroups(&mut self.join_cgroups, &e);
                self.request_for(service, write_end.as_fd())
                    .and_then(|request| spawn::spawn_service(&request).map_err(|e| e.to_string()))
            }
            other => other.map_err(|e| e.to_string()),
        };
        let in_cgroup = self.join_cgroups;
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                // Nothing runs in the run's cgroup (the failed child was reaped): it goes.
                self.retire_run_cgroup(run_cgroup);
                return Err(e);
            }
        };
        match run_cgroup {
            Some(name) if in_cgroup => self.run_cgroups.started(service, name),
            unused => self.retire_run_cgroup(unused),
        }
        drop(write_end); // only the service holds the write end now: its exit means EOF
        let spec = &self.config.services[service];
        let pid = spawned.pid.as_raw();
        self.children.insert(pid, Role::Service(service));
        self.service_pids[service] = Some(pid);
        if let Ok(identity) = ProcessIdentity::of(pid) {
            self.identities.insert(pid, identity);
        }
        self.record_dirty = true;
        if let Err(e) = watch(
            &self.epoll,
            &mut self.sources,
            read_end.as_fd(),
            Source::LogPipe(service),
        ) {
            warn!(error = %e, service = %spec.id, "cannot watch the service's output");
        }
        self.pipes.insert(read_end.as_raw_fd(), read_end);
        info!(service = %spec.id, pid, "started");
        Ok(pid)
    }

    fn on_log_pipe(&mut self, fd: RawFd, service: usize) {
        let Some(pipe) = self.pipes.get(&fd) else {
            return;
        };
        let Some(sink) = self.logs[service].as_mut() else {
            return;
        };
        let eof = match sink.drain(pipe.as_fd()) {
            Ok(outcome) => outcome.eof,
            Err(e) => {
                warn!(error = %e, service = %self.config.services[service].id, "cannot write the service's log");
                false
            }
        };
        if eof && let Some(pipe) = self.pipes.remove(&fd) {
            unwatch(&self.epoll, &mut self.sources, pipe.as_fd());
        }
    }
}

/// The keeper's record of the instance's processes ([`crate::records`]).
impl Keeper {
    fn record_path(&self) -> PathBuf {
        records::record_path(&self.config.global.run_dir, &self.config.global.instance)
    }

    /// Notes a new child's identity (read now, while it surely exists) for the record.
    fn remember(&mut self, pid: i32) {
        if let Ok(identity) = ProcessIdentity::of(pid) {
            self.identities.insert(pid, identity);
        }
        self.record_dirty = true;
    }

    /// How long the record has waited to be written, if it has changed since it last was.
    fn record_dirty_since(&mut self, now: Instant) -> Option<Duration> {
        if !self.record_dirty {
            self.record_changed_at = None;
            return None;
        }
        Some(now.duration_since(*self.record_changed_at.get_or_insert(now)))
    }

    /// Writes the record if the set of processes changed since it was last written.
    fn write_record(&mut self) {
        self.record_changed_at = None;
        if !std::mem::take(&mut self.record_dirty) {
            return;
        }
        let recorded = |pid: i32| self.identities.get(&pid).copied().map(Recorded::from);
        let standby = self
            .children
            .iter()
            .find(|(_, role)| **role == Role::Standby)
            .and_then(|(&pid, _)| recorded(pid));
        let services = self
            .config
            .shutdown_sequence
            .iter()
            .filter_map(|&s| {
                let process = recorded(self.service_pids[s]?)?;
                let spec = &self.config.services[s];
                let timeout: Duration = spec.shutdown_timeout.into();
                Some(RecordedService {
                    id: spec.id.clone(),
                    process,
                    stop_signal: spec.stop_signal.0 as i32,
                    shutdown_timeout_ms: timeout.as_millis() as u64,
                })
            })
            .collect();
        let record = ProcessRecord {
            keeper: ProcessIdentity::current().ok().map(Recorded::from),
            coordinator: self.coordinator.and_then(recorded),
            standby,
            services,
        };
        if let Err(e) = record.write(&self.record_path()) {
            warn!(error = %e, "cannot record the instance's processes");
        }
    }
}

/// The keeper's uses of the instance's cgroups ([`crate::cgroup`]). Each does nothing where the
/// machine offers none; a failure to kill is logged, as the process group was killed anyway.
impl Keeper {
    /// The cgroup of `service`'s next run, made and opened for its main process to be born
    /// in it (or to join it); `None` where services are not put in cgroups (any more).
    fn open_run_cgroup(&mut self, service: usize) -> Option<cgroup::RunCgroup> {
        let tree = self.cgroups.as_ref().filter(|_| self.join_cgroups)?;
        let id = &self.config.services[service].id;
        match self.run_cgroups.open_next(tree, id) {
            Ok(run) => Some(run),
            Err(e) => {
                stop_joining_cgroups(&mut self.join_cgroups, &e);
                None
            }
        }
    }

    /// Kills everything in the cgroup of `service`'s current run: what it left behind,
    /// escaped daemons too.
    fn kill_service_cgroup(&self, service: usize) {
        let (Some(tree), Some(name)) = (&self.cgroups, self.run_cgroups.current(service)) else {
            return;
        };
        if let Err(e) = tree.kill(name) {
            let id = &self.config.services[service].id;
            warn!(error = %e, service = %id, "cannot kill the service's cgroup");
        }
    }

    /// `service`'s main process ended (and was reaped): kills what is left in its run's
    /// cgroup, and removes the cgroup once empty.
    fn end_run_cgroup(&mut self, service: usize) {
        self.kill_service_cgroup(service);
        let ended = self.run_cgroups.ended(service);
        self.retire_run_cgroup(ended);
    }

    /// Removes the cgroup `name` of a run that ended or never ran, once it is empty.
    fn retire_run_cgroup(&mut self, name: Option<String>) {
        if let (Some(name), Some(tree)) = (name, &self.cgroups) {
            self.run_cgroups.retire(tree, name);
        }
    }

    fn kill_all_cgroups(&self) {
        if let Some(Err(e)) = self.cgroups.as_ref().map(cgroup::Tree::kill_all) {
            warn!(error = %e, "cannot kill the instance's cgroups");
        }
    }

    /// At exit: kills whatever is still in the cgroups, removes them, and reaps what died.
    fn remove_cgroups(&mut self) {
        let Some(mut tree) = self.cgroups.take() else {
            return;
        };
        if let Err(e) = tree.remove(CGROUP_REMOVE_TIMEOUT) {
            warn!(error = %e, "cannot remove the instance's cgroups");
        } else {
            let global = &self.config.global;
            let _ =
                std::fs::remove_file(cgroup::Tree::record_path(&global.run_dir, &global.instance));
        }
        self.reap_children();
    }
}

/// Clears the keeper's `join_cgroups` for good: from now on, services start outside cgroups;
/// those already in one stay there, and the tree is still killed and removed at the end. Said
/// once, as a warning: the stack runs, but a daemon that leaves its process group can outlive
/// its service. (A function of the flag alone, so that it can be called while the service's
/// spec is borrowed from the keeper's config.)
fn stop_joining_cgroups(join_cgroups: &mut bool, reason: &dyn std::fmt::Display) {
    if std::mem::replace(join_cgroups, false) {
        warn!(
            "cannot move services into their cgroups ({reason}); only process groups are used from now on"
        );
    }
}

/// How long the keeper waits at exit for its cgroups to empty after killing what was in them.
const CGROUP_REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Adds an fd the keeper owns to the epoll set, remembering what it is.
fn watch(
    epoll: &Epoll,
    sources: &mut HashMap<RawFd, Source>,
    fd: BorrowedFd<'_>,
    source: Source,
) -> Result<(), KeeperError> {
    epoll
        .add(
            fd,
            EpollEvent::new(EpollFlags::EPOLLIN, fd.as_raw_fd() as u64),
        )
        .map_err(KeeperError::Setup)?;
    sources.insert(fd.as_raw_fd(), source);
    Ok(())
}

/// Removes an fd from the epoll set before it is closed.
fn unwatch(epoll: &Epoll, sources: &mut HashMap<RawFd, Source>, fd: BorrowedFd<'_>) {
    if sources.remove(&fd.as_raw_fd()).is_some() {
        let _ = epoll.delete(fd);
    }
}

/// The keeper's end of `[coordinator] watchdog`: a coordinator that sends no sign of life for
/// two periods is wedged (frozen, deadlocked, looping) and is killed, so that a standby or a
/// successor takes over as from any death.
struct Watchdog {
    period: Duration,
    timer: TimerFd,
    last_heard: Instant,
}

impl Watchdog {
    fn new(period: Duration) -> Result<Watchdog, KeeperError> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )
        .map_err(KeeperError::Setup)?;
        // Checked twice per period: a silence is noticed between two and two and a half.
        let every = (period / 2).max(Duration::from_millis(1));
        timer
            .set(
                Expiration::Interval(TimeSpec::from_duration(every)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(KeeperError::Setup)?;
        Ok(Watchdog {
            period,
            timer,
            last_heard: Instant::now(),
        })
    }
}

impl Keeper {
    /// The coordinator spoke (any message is a sign of life), or a new one took over.
    fn heard_from_coordinator(&mut self) {
        if let Some(watchdog) = self.watchdog.as_mut() {
            watchdog.last_heard = Instant::now();
        }
    }

    /// A watchdog check: kill a coordinator silent for two periods.
    fn on_watchdog(&mut self) {
        let Some(watchdog) = self.watchdog.as_mut() else {
            return;
        };
        let _ = watchdog.timer.wait();
        let silent = watchdog.last_heard.elapsed();
        let Some(pid) = self
            .coordinator
            .filter(|pid| self.children.get(pid) == Some(&Role::Coordinator))
        else {
            return;
        };
        if self.shutdown_requested || silent < 2 * watchdog.period {
            return;
        }
        error!(
            pid,
            silent_ms = silent.as_millis() as u64,
            "the coordinator has sent no sign of life for two watchdog periods: killing it"
        );
        // Counted once: its death is handled as any other when it is reaped.
        watchdog.last_heard = Instant::now();
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The keeper's own ordered stop: the engine every ordered stop runs on, and its time zero.
struct LastResortStop {
    engine: Engine,
    epoch: Instant,
    /// `epoch` on the segment's monotonic clock, in milliseconds.
    epoch_ms: u64,
}

/// Deaths counted in a sliding window: something that died `limit` times within `span` is
/// given up on, and one that stays quiet for `span` starts afresh (its old deaths fall out).
#[derive(Debug)]
pub struct RecentDeaths {
    span: Duration,
    limit: usize,
    deaths: VecDeque<Instant>,
}

impl RecentDeaths {
    pub fn new(span: Duration, limit: usize) -> Self {
        RecentDeaths {
            span,
            limit,
            deaths: VecDeque::new(),
        }
    }

    /// Counts a death at `now`; true when `limit` deaths now fall within the span.
    pub fn record(&mut self, now: Instant) -> bool {
        self.deaths.push_back(now);
        self.count(now) >= self.limit
    }

    /// The deaths within the span before `now`.
    pub fn count(&mut self, now: Instant) -> usize {
        while self
            .deaths
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.span)
        {
            self.deaths.pop_front();
        }
        self.deaths.len()
    }

    /// The deaths counted now, oldest first (handed across an upgrade's exec).
    pub fn times(&self) -> Vec<Instant> {
        self.deaths.iter().copied().collect()
    }

    /// When the window is quiet again (every death counted now has fallen out of it).
    pub fn quiet_at(&self) -> Option<Instant> {
        self.deaths.back().map(|&t| t + self.span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_deaths_give_up_at_the_limit_and_forget_after_a_quiet_span() {
        let t0 = Instant::now();
        let span = Duration::from_secs(10);
        let mut deaths = RecentDeaths::new(span, 3);
        assert!(!deaths.record(t0));
        assert!(!deaths.record(t0 + Duration::from_secs(1)));
        assert!(
            deaths.record(t0 + Duration::from_secs(2)),
            "third in the span"
        );
        // The first falls out of the window: two left, one more is not yet the limit.
        assert_eq!(deaths.count(t0 + Duration::from_secs(10)), 2);
        assert_eq!(deaths.quiet_at(), Some(t0 + Duration::from_secs(12)));
        assert_eq!(
            deaths.count(t0 + Duration::from_secs(12)),
            0,
            "a quiet span forgets"
        );
        assert!(!deaths.record(t0 + Duration::from_secs(13)));
    }
}

//! `ccmgr start`, `stop`, `restart`, and the hidden `internal` roles the binary re-executes
//! itself as (the keeper and the coordinator).
//!
//! `start` (FIG. 7A of the original design): check the config, refuse if the instance runs,
//! reclaim a stale segment left by a killed run, create the segment holding the manager
//! mutex, start the keeper (which starts the coordinator), and wait on the report pipe for
//! "up" or "failed" — the pipe also shows at once if the coordinator died, which a semaphore
//! could not — while watching the keeper's pidfd (its death is named as such) and SIGINT and
//! SIGTERM (an interrupted start stops what it started). "Up" is checked once more when it is
//! printed: each service as the segment says it is then, its pid checked against its start
//! time.
//!
//! `stop` (FIG. 9) works in every situation and says "stopped" only once it has proven that no
//! process of the instance lives. A live coordinator is asked to stop in order, and `stop`
//! watches the keeper and the coordinator through pidfds; when the keeper dies, the coordinator
//! dies with no standby to follow, or it does not answer within [`ANSWER_DEADLINE`], or the
//! segment is damaged, the command does the stop itself with the driver of
//! [`super::stop_driver`]; with nothing running it says so and succeeds.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{Pid, pipe2};

use super::stop_driver::{self, Inventory, Party};
use super::{Cli, Exit, load_or_report};
use crate::config::{Config, LoadOptions};
use crate::coordinator::{self, StartReport};
use crate::keeper::{self, COORDINATOR_REPORT_FD, KeeperSetup};
use crate::logsink;
use crate::membership::Role;
use crate::process_identity::ProcessIdentity;
use crate::records::ProcessRecord;
use crate::shm::api::{ApiSpec, ControlSegment};
use crate::shm::{
    InstanceState, Probe, Segment, SegmentSpec, ServiceState, ServiceStatic, ShmError,
};
use crate::spawn;

/// How long past the configured timeouts the command waits before it concludes something is
/// wedged: time for processes to be scheduled and to report.
const GRACE: Duration = Duration::from_secs(10);

/// What goes into a new segment for `config`.
pub fn segment_spec(config: &Config) -> SegmentSpec {
    let ms = |d: crate::duration::ConfigDuration| d.as_duration().as_millis() as u64;
    SegmentSpec {
        instance: config.global.instance.clone(),
        run_dir: config.global.run_dir.clone(),
        group: config.global.group.as_ref().map(|g| g.id),
        services: config
            .services
            .iter()
            .map(|s| ServiceStatic {
                id: s.id.clone(),
                startup_timeout_ms: ms(s.startup_timeout),
                shutdown_timeout_ms: ms(s.shutdown_timeout),
            })
            .collect(),
        startup_sequence: config.startup_sequence.iter().map(|&s| s as u32).collect(),
        shutdown_sequence: config.shutdown_sequence.iter().map(|&s| s as u32).collect(),
        config_blob: config.to_image(),
    }
}

fn exe() -> std::path::PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "ccmgr".into())
}

/// Refuses to start over a live instance; reclaims a stale one. `Err` carries the exit code.
fn clear_the_way(instance: &str, run_dir: &std::path::Path) -> Result<(), Exit> {
    match probe_settled(run_dir, instance) {
        Ok(Probe::Absent) => refuse_recorded_survivors(instance, run_dir),
        Ok(Probe::Live { coordinator }) => {
            let pid = coordinator.map_or_else(|| "unknown".to_owned(), |c| c.pid.to_string());
            eprintln!("ccmgr: instance {instance} is already running (coordinator pid {pid})");
            Err(Exit::Failed)
        }
        Ok(Probe::Starting { manager }) => {
            let pid = manager.map_or_else(|| "unknown".to_owned(), |m| m.pid.to_string());
            eprintln!("ccmgr: instance {instance} is being started by another ccmgr (pid {pid})");
            Err(Exit::Failed)
        }
        Ok(Probe::Abandoned { survivors }) => {
            let list: Vec<String> = survivors.iter().map(ToString::to_string).collect();
            eprintln!(
                "ccmgr: instance {instance} still has processes but no coordinator: {}; run `ccmgr stop` first",
                list.join(", ")
            );
            Err(Exit::Failed)
        }
        Ok(Probe::Stale) => match refuse_recorded_survivors(instance, run_dir).and_then(|()| {
            reclaim(run_dir, instance).map_err(|e| {
                eprintln!("ccmgr: {e}");
                Exit::Failed
            })
        }) {
            Ok(_) => {
                eprintln!(
                    "ccmgr: removed the state of an earlier run of instance {instance} that was killed"
                );
                Ok(())
            }
            Err(exit) => Err(exit),
        },
        Err(e) => {
            eprintln!("ccmgr: {e}");
            Err(Exit::Failed)
        }
    }
}

/// The segment is not the only witness of a running instance: when it was removed (or its
/// name now leads nowhere) while the keeper and its services live, the keeper's process record
/// still names them. Starting a second stack beside them would run every service twice, and
/// the two keepers would kill each other's services through the shared cgroups.
fn refuse_recorded_survivors(instance: &str, run_dir: &std::path::Path) -> Result<(), Exit> {
    let path = crate::records::record_path(run_dir, instance);
    let record = match ProcessRecord::read(&path) {
        Ok(Some(record)) => record,
        // No record, or one nobody can read: the segment's probe decides alone.
        Ok(None) | Err(_) => return Ok(()),
    };
    let survivors = record.survivors();
    if survivors.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = survivors
        .iter()
        .map(|(who, p)| format!("{who} (pid {})", p.pid))
        .collect();
    eprintln!(
        "ccmgr: instance {instance} is still running according to its process record {}: {}; run `ccmgr stop` first",
        path.display(),
        list.join(", ")
    );
    Err(Exit::Failed)
}

pub fn start(cli: &Cli, foreground: bool) -> Exit {
    if foreground {
        // The keeper's signals are blocked from the first moment, not only once the keeper's
        // loop is set up: as PID 1 of a PID namespace (a container's entrypoint) the kernel
        // drops a signal left at its default disposition, so a `docker stop` during the
        // configuration's loading would be lost (and the container SIGKILLed later); blocked,
        // it waits for the keeper's signalfd, which then stops the stack in order.
        let _ = crate::init_signals::mask().thread_block();
    }
    let config = match load_or_report(cli) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let instance = config.global.instance.clone();
    // The run directory first: the instance's state lives there, and is looked for there.
    if let Err(e) = crate::shm::state_dir::create_run_dir(&config.global.run_dir) {
        eprintln!(
            "ccmgr: cannot create {}: {e}",
            config.global.run_dir.display()
        );
        return Exit::Failed;
    }
    if let Err(e) = refuse_non_owner(&instance, &config.global.run_dir) {
        return e;
    }
    if let Err(e) = clear_the_way(&instance, &config.global.run_dir) {
        return e;
    }
    if let Err(e) = std::fs::create_dir_all(&config.global.log_dir) {
        eprintln!(
            "ccmgr: cannot create {}: {e}",
            config.global.log_dir.display()
        );
        return Exit::Failed;
    }
    let _ = std::fs::remove_file(coordinator::last_outcome_path(&config));
    let (segment, manager) = match Segment::create(&segment_spec(&config)) {
        Ok(created) => created,
        Err(ShmError::AlreadyExists { .. }) => {
            eprintln!("ccmgr: instance {instance} was started by someone else just now");
            return Exit::Failed;
        }
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    // The service API's control segment and API file, beside the main segment.
    let _ = ControlSegment::remove(&config.global.run_dir, &instance);
    if let Err(e) = ControlSegment::create(&ApiSpec::from_config(&config)) {
        eprintln!("ccmgr: {e}");
        return cleanup_failed_start(&segment);
    }
    if let Ok(w) = segment.write() {
        w.set_manager(ProcessIdentity::current().ok());
        w.set_instance_state(InstanceState::Initializing, crate::shm::monotonic_ms());
    }
    if foreground {
        // This process becomes the keeper: it is no "start under way" any more.
        if let Ok(w) = segment.write() {
            w.set_manager(None);
        }
        drop(manager);
        return run_keeper(config, segment, true, None);
    }
    let started = Instant::now();
    // SIGINT and SIGTERM while we wait are read from a signalfd: an interrupted start stops
    // what it started. (The keeper starts with an empty signal mask: std resets it at spawn.)
    let interruptions = match block_interruptions() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("ccmgr: cannot watch for SIGINT and SIGTERM: {e}");
            return cleanup_failed_start(&segment);
        }
    };
    let (report_read, report_write) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ccmgr: cannot create a pipe: {e}");
            return cleanup_failed_start(&segment);
        }
    };
    let mut command = Command::new(exe());
    command
        .arg("--instance")
        .arg(&instance)
        .arg("internal")
        .arg("keeper")
        .arg("--run-dir")
        .arg(&config.global.run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Err(e) = command.fd_mappings(vec![FdMapping {
        parent_fd: report_write,
        child_fd: COORDINATOR_REPORT_FD,
    }]) {
        eprintln!("ccmgr: cannot hand the report pipe on: {e}");
        return cleanup_failed_start(&segment);
    }
    let mut keeper = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("ccmgr: cannot start the keeper: {e}");
            return cleanup_failed_start(&segment);
        }
    };
    // Our copy of the write end went with `command`; dropping it lets EOF reach us if the
    // keeper or the coordinator dies without a word.
    drop(command);
    let keeper_pid = keeper.id() as i32;
    let keeper_fd = spawn::pidfd_open(Pid::from_raw(keeper_pid)).ok();
    let timeout = config.global.coordinator.startup_timeout.as_duration() + GRACE;
    let parties = Parties {
        segment: &segment,
        keeper: ProcessIdentity::of(keeper_pid).ok(),
    };
    let waited = wait_for_report(
        report_read,
        keeper_fd.as_ref(),
        &interruptions,
        timeout,
        &parties,
    );
    if let Ok(w) = segment.write() {
        w.set_manager(None);
    }
    drop(manager);
    let run_dir = config.global.run_dir.clone();
    // Stops what was started; true once nothing of the instance runs (proven by `stop`).
    let stop_what_started = || stop_instance(&instance, &run_dir) == Exit::Ok;
    let say_how_it_ended = |clean: bool| {
        if clean {
            eprintln!("ccmgr: everything that was started has been stopped again");
        } else {
            eprintln!(
                "ccmgr: not everything that was started could be stopped (see above; `ccmgr stop` tries again)"
            );
        }
    };
    let outcome = match waited {
        Waited::Report(Some(StartReport::Up)) => {
            let not_up = print_up_summary(&config, &segment, started.elapsed(), cli.json);
            // The keeper lives on (re-parented when we exit); nothing of ours to reap.
            if not_up.is_empty() {
                return Exit::Ok;
            }
            eprintln!(
                "ccmgr: instance {instance} started, but {} no longer up: the coordinator is handling it (see `ccmgr status`)",
                match not_up.as_slice() {
                    [one] => format!("service `{one}` is"),
                    many => format!(
                        "services {} are",
                        many.iter()
                            .map(|id| format!("`{id}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            );
            return Exit::Failed;
        }
        Waited::Report(Some(StartReport::Failed { service, how })) => {
            // The coordinator is stopping what it started; wait for the keeper to finish so
            // the log is complete and nothing is left.
            let shutdown = config.global.coordinator.shutdown_timeout.as_duration() + GRACE;
            let finished = wait_for_exit(keeper_pid, shutdown);
            eprintln!("ccmgr: instance {instance} failed to start: service `{service}` {how}");
            if cli.json {
                print_start_failure_json(
                    &instance,
                    Some((&service, &how)),
                    "a service failed to start",
                );
            }
            print_log_tail(&config, &service);
            // The keeper removes the segment last; if it is still there, finish the job.
            let left =
                !finished || !matches!(Segment::probe(&run_dir, &instance), Ok(Probe::Absent));
            say_how_it_ended(!left || stop_what_started());
            Exit::Failed
        }
        Waited::Report(None) | Waited::KeeperEnded => {
            // Which one died: the keeper is our child, so its status says. (A killed keeper's
            // socket closes before it has finished dying, so the coordinator can end first.)
            if let Some(fd) = &keeper_fd {
                let _ = spawn::wait_pidfd(fd.as_fd(), Duration::from_millis(500));
            }
            match keeper.try_wait() {
                Ok(Some(status)) => eprintln!(
                    "ccmgr: the keeper of instance {instance} died during startup ({}); stopping what it started",
                    describe_status(status)
                ),
                _ => eprintln!(
                    "ccmgr: the coordinator of instance {instance} died during startup; stopping what it started"
                ),
            }
            if cli.json {
                print_start_failure_json(
                    &instance,
                    None,
                    "the keeper or the coordinator died during startup",
                );
            }
            say_how_it_ended(stop_what_started());
            Exit::Failed
        }
        Waited::Interrupted(signal) => {
            eprintln!(
                "ccmgr: interrupted by {} while instance {instance} was starting; stopping what was started",
                signal.as_str()
            );
            if cli.json {
                print_start_failure_json(
                    &instance,
                    None,
                    &format!("interrupted by {}", signal.as_str()),
                );
            }
            say_how_it_ended(stop_what_started());
            Exit::Failed
        }
        Waited::Failed(e) => {
            eprintln!("ccmgr: instance {instance} did not come up: {e}; stopping what was started");
            if cli.json {
                print_start_failure_json(&instance, None, &e.to_string());
            }
            say_how_it_ended(stop_what_started());
            Exit::Failed
        }
    };
    // The start failed and the keeper has finished (or was stopped): it is our child, so we
    // reap it rather than leave a zombie to whoever inherits it.
    if matches!(keeper.try_wait(), Ok(None)) && wait_for_exit(keeper_pid, GRACE) {
        let _ = keeper.wait();
    }
    outcome
}

/// How a child process ended, in words.
fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

/// Blocks SIGINT and SIGTERM in this process and returns a signalfd that reads them.
fn block_interruptions() -> Result<SignalFd, Errno> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
}

/// What waiting for the coordinator's report ended with.
enum Waited {
    /// The report; `None` at EOF (whoever held the pipe died without a word).
    Report(Option<StartReport>),
    /// The keeper ended before any report.
    KeeperEnded,
    /// SIGINT or SIGTERM reached `ccmgr start`.
    Interrupted(Signal),
    /// No report in time, or an unreadable one.
    Failed(String),
}

/// Waits for the coordinator's one-line report, the keeper's end or an interruption, whichever
/// comes first.
fn wait_for_report(
    fd: OwnedFd,
    keeper: Option<&OwnedFd>,
    interruptions: &SignalFd,
    timeout: Duration,
    parties: &Parties<'_>,
) -> Waited {
    let deadline = Instant::now() + timeout;
    let mut freezes = FreezeWatch::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Waited::Failed(format!("no report within {timeout:?}"));
        }
        // A frozen (SIGSTOPped) keeper or coordinator would make us wait out the whole
        // startup timeout for a report that cannot come: check once a second.
        if let Some(why) = freezes.check(parties.current()) {
            return Waited::Failed(why);
        }
        let left = left.min(Duration::from_secs(1));
        let mut fds = vec![
            PollFd::new(fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(interruptions.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(keeper) = keeper {
            fds.push(PollFd::new(keeper.as_fd(), PollFlags::POLLIN));
        }
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Waited::Failed(e.to_string()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            break;
        }
        if ready[1] {
            if let Ok(Some(info)) = interruptions.read_signal() {
                let signal = Signal::try_from(info.ssi_signo as i32).unwrap_or(Signal::SIGTERM);
                return Waited::Interrupted(signal);
            }
        }
        if ready.get(2).copied().unwrap_or(false) {
            return Waited::KeeperEnded;
        }
    }
    let mut line = String::new();
    if let Err(e) = BufReader::new(File::from(fd)).read_line(&mut line) {
        return Waited::Failed(e.to_string());
    }
    if line.trim().is_empty() {
        return Waited::Report(None);
    }
    match serde_json::from_str(line.trim()) {
        Ok(report) => Waited::Report(Some(report)),
        Err(e) => Waited::Failed(format!("unreadable report: {e}")),
    }
}

/// The keeper and the coordinator of a start under way, for [`FreezeWatch`].
struct Parties<'a> {
    segment: &'a Segment,
    keeper: Option<ProcessIdentity>,
}

impl Parties<'_> {
    /// The keeper and the coordinator the segment names now, with their roles.
    fn current(&self) -> Vec<(&'static str, ProcessIdentity)> {
        let coordinator = self
            .segment
            .instance_status()
            .ok()
            .and_then(|s| s.coordinator);
        [("keeper", self.keeper), ("coordinator", coordinator)]
            .into_iter()
            .filter_map(|(role, who)| who.map(|w| (role, w)))
            .collect()
    }
}

/// Notices a party that stays frozen (state `T`: SIGSTOPped, or `t` under a tracer) for
/// [`ANSWER_DEADLINE`]: it holds its locks but does nothing, so waiting for it is waiting for
/// ever.
#[derive(Default)]
struct FreezeWatch {
    since: Vec<(ProcessIdentity, Instant)>,
}

impl FreezeWatch {
    /// Why waiting is pointless, once one of `parties` has been frozen for the deadline.
    fn check(&mut self, parties: Vec<(&'static str, ProcessIdentity)>) -> Option<String> {
        let now = Instant::now();
        let mut still = Vec::new();
        for (role, who) in parties {
            if !who.is_frozen() {
                continue;
            }
            let since = self
                .since
                .iter()
                .find(|(w, _)| *w == who)
                .map_or(now, |(_, t)| *t);
            if now.duration_since(since) >= ANSWER_DEADLINE {
                return Some(format!(
                    "the {role} (pid {}) has been stopped (frozen) for {} s",
                    who.pid,
                    ANSWER_DEADLINE.as_secs()
                ));
            }
            still.push((who, since));
        }
        self.since = still;
        None
    }
}

fn cleanup_failed_start(segment: &Segment) -> Exit {
    let _ = segment.unlink();
    if let Some(run_dir) = segment.path().parent() {
        let _ = ControlSegment::remove(run_dir, segment.instance());
    }
    Exit::Failed
}

/// Only the owner of an instance (the owner of its `run_dir`, who alone can write its shared
/// state) may start, stop, restart or reload it, whole or service by service; the members of
/// its group may read its status. One rule for every verb that changes something.
pub(super) fn refuse_non_owner(instance: &str, run_dir: &std::path::Path) -> Result<(), Exit> {
    use std::os::unix::fs::MetadataExt as _;
    let me = nix::unistd::geteuid().as_raw();
    match std::fs::metadata(run_dir) {
        Ok(meta) if meta.uid() != me => {
            let owner = meta.uid();
            let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(owner))
                .ok()
                .flatten()
                .map_or_else(|| owner.to_string(), |u| u.name);
            eprintln!(
                "ccmgr: only uid {owner} may control instance {instance} (its run directory {} is theirs; you are uid {me}); `ccmgr status` is readable by the instance's group",
                run_dir.display()
            );
            if me == 0 {
                // Root is refused too, so that no one drives another user's instance by
                // mistake; it can act as that user.
                eprintln!("  note: run it as its owner: runuser -u {name} -- ccmgr ...");
            }
            Err(Exit::NotPermitted)
        }
        _ => Ok(()),
    }
}

/// Removes what an instance leaves in its run directory once nothing of it lives: the main
/// segment (only if stale: a live coordinator's is refused) and the service API's two files.
fn reclaim(run_dir: &std::path::Path, instance: &str) -> Result<(), ShmError> {
    // A concurrent probe holds the manager or daemon mutex for a moment: look again (see
    // `probe_settled`).
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match Segment::reclaim_stale(run_dir, instance) {
            Err(
                ShmError::BeingStarted {
                    manager_pid: None, ..
                }
                | ShmError::AlreadyRunning {
                    coordinator_pid: None,
                    ..
                },
            ) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            other => {
                other?;
                break;
            }
        }
    }
    let _ = ControlSegment::remove(run_dir, instance);
    Ok(())
}

/// Waits up to `timeout` for `pid` (a process we may not be the parent of) to end.
fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    match spawn::pidfd_open(Pid::from_raw(pid)) {
        Ok(fd) => spawn::wait_pidfd(fd.as_fd(), timeout).unwrap_or(false),
        Err(_) => true, // already gone
    }
}

fn print_log_tail(config: &Config, service: &str) {
    let lines = logsink::tail(&config.global.log_dir, service, 10);
    if lines.is_empty() {
        return;
    }
    let path = logsink::log_path(&config.global.log_dir, service);
    eprintln!("ccmgr: the last lines of {}:", path.display());
    for line in lines {
        eprintln!("    {line}");
    }
}

/// Prints the stack as it is now (read from the segment, every pid checked against its start
/// time, not as it was when the coordinator reported); returns the services not up any more.
fn print_up_summary(
    config: &Config,
    segment: &Segment,
    elapsed: Duration,
    json: bool,
) -> Vec<String> {
    let coordinator_pid = segment
        .instance_status()
        .ok()
        .and_then(|s| s.coordinator)
        .map(|c| c.pid);
    let coordinator = coordinator_pid.map_or_else(|| "?".to_owned(), |pid| pid.to_string());
    let width = config
        .services
        .iter()
        .map(|s| s.id.len())
        .max()
        .unwrap_or(0);
    let mut lines = Vec::new();
    let mut not_up = Vec::new();
    let mut services_json = Vec::new();
    for &s in &config.startup_sequence {
        let spec = &config.services[s];
        let status = segment.service_status(s);
        let (text, up) = match &status {
            Ok(st) => service_now(spec.ready, *st),
            Err(e) => (format!("unreadable: {e}"), false),
        };
        if !up {
            not_up.push(spec.id.clone());
        }
        services_json.push(serde_json::json!({
            "id": spec.id,
            "up": up,
            "pid": status.ok().and_then(|st| st.process).filter(|p| p.is_alive()).map(|p| p.pid),
            "state": text,
        }));
        lines.push(format!("  {:<width$}  {text}", spec.id));
    }
    if json {
        let doc = serde_json::json!({
            "instance": config.global.instance,
            "verb": "start",
            "ok": not_up.is_empty(),
            "elapsed_ms": elapsed.as_millis() as u64,
            "coordinator_pid": coordinator_pid,
            "services": services_json,
            "not_up": not_up,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return not_up;
    }
    let n = config.services.len();
    let services = format!("{n} service{}", if n == 1 { "" } else { "s" });
    if not_up.is_empty() {
        println!(
            "ccmgr: instance {} is up: {services} in {:.2} s (coordinator pid {coordinator})",
            config.global.instance,
            elapsed.as_secs_f64()
        );
    } else {
        println!(
            "ccmgr: instance {} started {services} in {:.2} s (coordinator pid {coordinator}), but not all are up now:",
            config.global.instance,
            elapsed.as_secs_f64()
        );
    }
    for line in lines {
        println!("{line}");
    }
    not_up
}

/// `start --json` when the start failed: `{"instance", "verb": "start", "ok": false,
/// "failed": {"service", "how"} | null, "error": "..."}` (the sentences stay on stderr).
fn print_start_failure_json(instance: &str, failed: Option<(&str, &str)>, error: &str) {
    let doc = serde_json::json!({
        "instance": instance,
        "verb": "start",
        "ok": false,
        "failed": failed.map(|(service, how)| serde_json::json!({"service": service, "how": how})),
        "error": error,
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
}

/// What a service is now, in words, and whether it is up: its state in the segment, and for a
/// service with a process, that the process still lives (a finished one-shot has none).
fn service_now(ready: crate::config::ReadyKind, st: crate::shm::ServiceStatus) -> (String, bool) {
    let exit = st
        .last_exit
        .map(|e| crate::vocab::ProcessExit::from(e).to_string());
    match (st.state, st.process) {
        (ServiceState::Up, Some(p)) if p.is_alive() => (format!("pid {}", p.pid), true),
        (ServiceState::Up, Some(p)) => (format!("dead (pid {} is gone)", p.pid), false),
        (ServiceState::Up, None) if ready == crate::config::ReadyKind::Exit => {
            ("done".into(), true)
        }
        (ServiceState::Up, None) => ("dead (no process)".into(), false),
        (state, _) => (
            match exit {
                Some(exit) => format!("{state} ({exit})"),
                None => state.to_string(),
            },
            false,
        ),
    }
}

/// How a service's last process ended, in words.
/// Runs the keeper in this process (foreground) or as the `internal keeper` role.
fn run_keeper(config: Config, segment: Segment, foreground: bool, report: Option<OwnedFd>) -> Exit {
    let log = coordinator::coordinator_log_path(&config);
    let _span = crate::logging::init(Some(&log), foreground, "keeper");
    if let Ok(w) = segment.write() {
        w.set_keeper(ProcessIdentity::current().ok());
    }
    let setup = KeeperSetup {
        config,
        foreground,
        report,
        exe: exe(),
        segment,
    };
    match keeper::run(setup) {
        Ok(0) => Exit::Ok,
        Ok(_) => Exit::Failed,
        Err(e) => {
            tracing::error!(error = %e, "the keeper could not run");
            eprintln!("ccmgr: {e}");
            Exit::Failed
        }
    }
}

/// The `internal keeper` role: started by `ccmgr start` with the report pipe on fd 5.
pub fn internal_keeper(run_dir: &std::path::Path, instance: &str) -> Exit {
    // Its own session: the terminal `ccmgr start` ran in can close without touching it. And
    // none of its caller's fds: only the report pipe was meant for it.
    let _ = nix::unistd::setsid();
    keeper::protocol::close_inherited_fds(&[COORDINATOR_REPORT_FD]);
    let report = keeper::protocol::take_inherited_fd(COORDINATOR_REPORT_FD);
    let (segment, config) = match open_instance(run_dir, instance) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    run_keeper(config, segment, false, report)
}

/// The `internal coordinator` role: started by the keeper with its fds on 3, 4 (and 5).
pub fn internal_coordinator(
    run_dir: &std::path::Path,
    instance: &str,
    foreground: bool,
    role: coordinator::Role,
) -> Exit {
    keeper::protocol::close_inherited_fds(&[
        keeper::COORDINATOR_CHANNEL_FD,
        keeper::COORDINATOR_NOTIFY_FD,
        COORDINATOR_REPORT_FD,
        keeper::COORDINATOR_CONTROL_FD,
    ]);
    // Before anything opens a file that could land on one of their numbers.
    let handed = coordinator::Handed::take();
    // Only the log's path, from the image's global settings: the services are decoded once,
    // by `coordinator::run` (a standby's only when it takes over), not held twice.
    let log_path = match global_of_instance(run_dir, instance) {
        Ok(global) => coordinator::coordinator_log_path_in(&global.log_dir, &global.instance),
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    let name = match role {
        coordinator::Role::Coordinator => "coordinator",
        coordinator::Role::Standby => "standby",
    };
    let _span = crate::logging::init(Some(&log_path), foreground, name);
    match coordinator::run(run_dir, instance, handed, role) {
        Ok(0) => Exit::Ok,
        Ok(_) => Exit::Failed,
        Err(e) => {
            tracing::error!(error = %e, "the coordinator could not run");
            Exit::Failed
        }
    }
}

/// The segment of a running instance (in `run_dir`) and the config image it holds.
pub fn open_instance(
    run_dir: &std::path::Path,
    instance: &str,
) -> Result<(Segment, Config), String> {
    let segment = Segment::open(run_dir, instance).map_err(|e| e.to_string())?;
    let blob = segment.config_blob().map_err(|e| e.to_string())?;
    let config = Config::from_image(&blob)?;
    Ok((segment, config))
}

/// The global settings of the instance's running configuration, from its segment's image,
/// without its services.
fn global_of_instance(
    run_dir: &std::path::Path,
    instance: &str,
) -> Result<crate::config::GlobalConfig, String> {
    let segment = Segment::open(run_dir, instance).map_err(|e| e.to_string())?;
    let blob = segment.config_blob().map_err(|e| e.to_string())?;
    Config::global_from_image(&blob)
}

/// The instance the command line names: `--instance`, else the one in the config file. Only
/// the global file is read, so `stop` and `status` work even when a service file is broken.
pub fn instance_of(cli: &Cli) -> Result<(String, Option<crate::config::GlobalConfig>), Exit> {
    let options = LoadOptions {
        config_path: cli.config.clone(),
        instance: cli.instance.clone(),
        services_dir: cli.services_dir.clone(),
    };
    match crate::config::load_global_only(&options) {
        Ok(global) => Ok((global.instance.clone(), Some(global))),
        Err(diags) => match &cli.instance {
            Some(name) => Ok((name.clone(), None)),
            None => {
                for d in diags.iter() {
                    eprintln!("error: {d}");
                }
                Err(Exit::BadConfig)
            }
        },
    }
}

pub fn stop(cli: &Cli) -> Exit {
    let (instance, global) = match instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let run_dir = run_dir_of(&instance, global.as_ref());
    if let Err(e) = refuse_non_owner(&instance, &run_dir) {
        return e;
    }
    // Nothing in a directory others could write is believed (a record there could name any
    // process), nor removed.
    match crate::shm::trusted_dir(&run_dir, Some(nix::unistd::geteuid().as_raw())) {
        Ok(_) | Err(crate::shm::DirTrustError::Missing { .. }) => {}
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    }
    stop_instance(&instance, &run_dir)
}

/// The run directory of `instance`: the configuration's, or, when the configuration could not
/// be loaded (`--instance` given), the default for the caller, which is then said when nothing
/// is found there.
pub fn run_dir_of(
    instance: &str,
    global: Option<&crate::config::GlobalConfig>,
) -> std::path::PathBuf {
    match global {
        Some(g) => g.run_dir.clone(),
        None => {
            let dir = crate::shm::state_dir::default_run_dir();
            let seg = crate::shm::segment_path(&dir, instance).unwrap_or_default();
            if !seg.exists() {
                eprintln!(
                    "ccmgr: the configuration could not be loaded: looked for instance {instance} in the default run directory {} (its state is not there)",
                    dir.display()
                );
            }
            dir
        }
    }
}

/// How long a coordinator asked to stop has to show that it heard (the instance's state in the
/// segment becomes `stopping`), and how long it may stay frozen (state `T` in
/// `/proc/<pid>/stat`) during the stop, before `stop` concludes that it is wedged and does the
/// stop itself.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(3);

/// The segment of `instance` and the configuration it holds, as far as they can be read, and
/// why not, if they cannot (a damaged segment: truncated, corrupt, of another version).
fn read_segment(
    run_dir: &std::path::Path,
    instance: &str,
) -> (Option<Segment>, Option<Config>, Option<String>) {
    match Segment::open(run_dir, instance) {
        Ok(segment) => match segment
            .config_blob()
            .map_err(|e| e.to_string())
            .and_then(|b| Config::from_image(&b))
        {
            Ok(config) => (Some(segment), Some(config), None),
            Err(e) => (Some(segment), None, Some(e)),
        },
        Err(ShmError::NotFound { .. })
        | Err(ShmError::UntrustedDir(crate::shm::DirTrustError::Missing { .. })) => {
            (None, None, None)
        }
        Err(e) => (None, None, Some(e.to_string())),
    }
}

/// Stops `instance` whatever state it is in, and says "stopped" only once it has proven that
/// no process of the instance lives: every process recorded in the segment and in the keeper's
/// record is dead (pid and start time), and the instance's cgroups are gone. `run_dir` is where
/// the instance's state and records are (from the global configuration file, or the caller's
/// default).
pub fn stop_instance(instance: &str, dir: &std::path::Path) -> Exit {
    let (segment, config, damage) = read_segment(dir, instance);
    // The records' readers below take an optional directory.
    let run_dir = Some(dir);
    let mut inventory = Inventory::gather(instance, segment.as_ref(), config.as_ref(), run_dir);
    // Why the command does the stop itself, if it must.
    let mut reason = None;
    let mut existed = segment.is_some() || damage.is_some();
    let mut coordinator_stopped_it = false;
    if let Some(why) = &damage {
        reason = Some(if inventory.has_record {
            format!("{why}; going by the keeper's record and the cgroups")
        } else {
            format!(
                "{why}, and the keeper left no usable process record; going by /proc and the cgroups"
            )
        });
    } else if segment.is_some() {
        match probe_settled(dir, instance) {
            // A `ccmgr start` frozen by SIGSTOP (Ctrl-Z) never finishes while it is: the stack
            // it started is not to be left unstoppable for that.
            Ok(Probe::Starting {
                manager: Some(manager),
            }) if manager.is_frozen() => {
                eprintln!(
                    "ccmgr: the `ccmgr start` of instance {instance} (pid {}) is frozen (stopped): stopping the instance all the same",
                    manager.pid
                );
                let coordinator = segment
                    .as_ref()
                    .and_then(|s| s.instance_status().ok())
                    .and_then(|s| s.coordinator)
                    .filter(ProcessIdentity::is_alive);
                match (segment.as_ref(), config.as_ref(), coordinator) {
                    (Some(segment), Some(config), Some(coordinator)) => {
                        reason = stop_through_coordinator(
                            instance,
                            segment,
                            config,
                            coordinator,
                            &inventory,
                        );
                        coordinator_stopped_it = reason.is_none();
                    }
                    _ => {
                        reason = Some(format!(
                            "no coordinator of instance {instance} lives under the frozen start"
                        ));
                    }
                }
            }
            Ok(Probe::Starting { manager }) => {
                let pid = manager.map_or_else(|| "unknown".to_owned(), |m| m.pid.to_string());
                eprintln!(
                    "ccmgr: instance {instance} is being started (by pid {pid}); stop it once the start has finished"
                );
                return Exit::Failed;
            }
            Ok(Probe::Live {
                coordinator: Some(coordinator),
            }) => {
                let (segment, config) = (segment.as_ref(), config.as_ref());
                if let (Some(segment), Some(config)) = (segment, config) {
                    reason = stop_through_coordinator(
                        instance,
                        segment,
                        config,
                        coordinator,
                        &inventory,
                    );
                    coordinator_stopped_it = reason.is_none();
                }
            }
            Ok(Probe::Live { coordinator: None }) => {
                reason = Some(format!(
                    "instance {instance}'s coordinator lock is held, but no recorded coordinator lives"
                ));
            }
            Ok(Probe::Abandoned { .. }) => {
                reason = Some(format!("no coordinator supervises instance {instance}"));
            }
            Ok(Probe::Stale) => {}
            // Removed meanwhile (a concurrent stop finished first): what is left is checked
            // below all the same.
            Ok(Probe::Absent) => existed = false,
            Err(e) => reason = Some(e.to_string()),
        }
    }
    // Look again: a process may have started since the first look (a restart under way).
    if let Some(segment) = &segment {
        inventory.add_segment(segment);
    }
    inventory.merge(Inventory::gather(instance, None, config.as_ref(), run_dir));
    let mut acted = false;
    if !inventory.survivors().is_empty() {
        let why = reason.unwrap_or_else(|| {
            format!("processes of instance {instance} are still running without a coordinator")
        });
        eprintln!("ccmgr: {why}: stopping the instance's processes directly, in shutdown order");
        stop_driver::disarm_parties(&inventory);
        stop_driver::stop_services(&inventory, instance, run_dir);
        // A coordinator started meanwhile (by a keeper that saw its coordinator die) goes too.
        if let Some(segment) = &segment {
            inventory.add_segment(segment);
        }
        stop_driver::finish_parties(&inventory);
        acted = true;
    }
    let had_cgroups = inventory.cgroups.as_ref().is_some_and(|(d, _)| d.exists());
    acted |= stop_driver::remove_cgroups(&inventory, run_dir, instance);
    let survivors = inventory.survivors();
    if !survivors.is_empty() {
        eprintln!(
            "ccmgr: instance {instance} is NOT stopped; still running: {}",
            survivors.join(", ")
        );
        return Exit::Failed;
    }
    if damage.is_some() && !inventory.has_record && !inventory.searched_proc {
        // Only the cgroups were left to go by: the keeper, the coordinator and the standby
        // run outside them, and nothing readable names them.
        eprintln!(
            "ccmgr: instance {instance} may not be stopped: its shared state is damaged and the keeper left no process record, so its keeper, coordinator and standby cannot be found"
        );
        return Exit::Failed;
    }
    // Nothing of the instance lives: its state goes.
    if let Err(e) = remove_state(instance, damage.is_some(), run_dir) {
        eprintln!("ccmgr: {e}");
        return Exit::Failed;
    }
    if acted || coordinator_stopped_it {
        super::say(&format!("ccmgr: instance {instance} stopped"));
    } else if existed || had_cgroups {
        super::say(&format!(
            "ccmgr: instance {instance} is not running (removed the state a killed run left behind)"
        ));
    } else {
        super::say(&format!("ccmgr: instance {instance} is not running"));
    }
    Exit::Ok
}

/// [`Segment::probe`], looked at again while what it found may be another prober: a probe
/// try-locks the manager and daemon mutexes for a moment, so a concurrent `stop` or `status`
/// can look like a start under way or a live coordinator that recorded nobody. A real start
/// or coordinator records itself within moments; a prober lets go within microseconds. There
/// is no event to wait for here, so the look is repeated, for at most a second.
fn probe_settled(run_dir: &std::path::Path, instance: &str) -> Result<Probe, ShmError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let probe = Segment::probe(run_dir, instance)?;
        let unsettled = matches!(
            probe,
            Probe::Starting { manager: None } | Probe::Live { coordinator: None }
        );
        if !unsettled || Instant::now() >= deadline {
            return Ok(probe);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes the instance's shared state and records, once nothing of it lives. A damaged
/// segment cannot be checked as stale, but nothing lives, so its name goes all the same.
fn remove_state(
    instance: &str,
    damaged: bool,
    run_dir: Option<&std::path::Path>,
) -> Result<(), ShmError> {
    let Some(run_dir) = run_dir else {
        return Ok(());
    };
    if !run_dir.exists() {
        return Ok(());
    }
    if damaged {
        Segment::remove(run_dir, instance)?;
        let _ = ControlSegment::remove(run_dir, instance);
    } else {
        match reclaim(run_dir, instance) {
            Ok(()) => {}
            // The segment names live processes, but the stop has proven that none of the
            // instance's lives: those it names are not the instance's (a forged or stale
            // record, reported above). Its state must not stay, or no start would follow.
            Err(e @ ShmError::StillInUse { .. }) => {
                eprintln!(
                    "ccmgr: {e}; none of them is this instance's process (see above): removing its state all the same"
                );
                if let Ok(segment) = Segment::open(run_dir, instance) {
                    segment.unlink()?;
                }
                let _ = ControlSegment::remove(run_dir, instance);
            }
            Err(e) => return Err(e),
        }
    }
    {
        ProcessRecord::remove(&crate::records::record_path(run_dir, instance));
        remove_dead_notify_socket(&crate::keeper::notify_socket_path_in(run_dir, instance));
        // Its readers (`ccmgr events`) see the name go and end.
        let _ = std::fs::remove_file(crate::coordinator::events_path_in(run_dir, instance));
        crate::control::remove_if_dead(&crate::control::socket_path(run_dir, instance));
        crate::socket_file::remove_if_dead(
            &crate::upgrade::socket_path(run_dir, instance),
            crate::socket_file::Kind::SeqPacket,
        );
        let _ = std::fs::remove_file(crate::upgrade::marker_path(run_dir, instance));
        // What a reload cut short (its keeper killed) leaves: its marker and staged segment.
        let _ = std::fs::remove_file(crate::coordinator::reload_marker_path_in(run_dir, instance));
        if let Ok(staged) = Segment::staged_path(run_dir, instance) {
            let _ = std::fs::remove_file(staged);
        }
    }
    Ok(())
}

/// A keeper killed by `stop` (or by anyone) leaves its notify socket behind. It goes once
/// nobody is bound to it (a datagram sent there is refused), so that a keeper a concurrent
/// `start` has just started keeps its own.
fn remove_dead_notify_socket(path: &std::path::Path) {
    crate::socket_file::remove_if_dead(path, crate::socket_file::Kind::Datagram);
}

/// Asks the live `coordinator` to stop the stack, and waits for the keeper (which exits last,
/// once every service is reaped) while watching the keeper and the coordinator at once.
/// Returns `None` once the keeper is done, else why the command must do the stop itself: the
/// keeper died, the coordinator died with no standby to take over, or it did not answer (see
/// [`ANSWER_DEADLINE`]), or the whole stop overran its timeout.
///
/// The keeper, the coordinator and its successors are read from the segment, which can be
/// forged: each is signalled (and watched) only once proven the instance's process
/// ([`Inventory::prove`]); the keeper's and coordinator's records in `run_dir` are tried when
/// the segment's are not.
fn stop_through_coordinator(
    instance: &str,
    segment: &Segment,
    config: &Config,
    coordinator: ProcessIdentity,
    inventory: &Inventory,
) -> Option<String> {
    let Some(keeper) = inventory.proven_party(Party::Keeper) else {
        let recorded_alive = inventory
            .parties
            .iter()
            .any(|(p, who)| *p == Party::Keeper && who.is_alive());
        return Some(if recorded_alive {
            format!("no live keeper of instance {instance} is proven to be the instance's")
        } else {
            format!("the keeper of instance {instance} is dead")
        });
    };
    let keeper_fd = keeper.pidfd();
    let keeper = keeper.identity();
    let Some(first) = inventory
        .prove(coordinator, Role::Coordinator, "the coordinator")
        .or_else(|| inventory.proven_party(Party::Coordinator))
    else {
        return Some(if coordinator.is_alive() {
            format!("no coordinator of instance {instance} is proven to be the instance's")
        } else {
            format!(
                "the coordinator (pid {}) died before it could be asked to stop",
                coordinator.pid
            )
        });
    };
    let mut current = first.identity();
    if first.signal(Signal::SIGTERM).is_err() {
        return Some(format!(
            "the coordinator (pid {}) died before it could be asked to stop",
            current.pid
        ));
    }
    let timeout = config.global.coordinator.shutdown_timeout.as_duration() + GRACE;
    let overall = Instant::now() + timeout;
    let mut asked_at = Instant::now();
    // A successor is asked to stop once it has taken over (a standby still waiting for its
    // turn is not a coordinator yet); `true` once `current` was asked.
    let mut current_asked = true;
    let mut freezes = FreezeWatch::default();
    let progress = super::stderr_is_terminal();
    let clear_progress = || {
        if progress {
            eprint!("\r\x1b[K");
        }
    };
    // The coordinator's pidfd, until it has finished its stop and exited.
    let mut coordinator_fd = Some(first);
    // When the coordinator finished: the keeper follows within moments.
    let mut coordinator_done: Option<Instant> = None;
    loop {
        let mut fds = vec![PollFd::new(keeper_fd.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = &coordinator_fd {
            fds.push(PollFd::new(fd.pidfd(), PollFlags::POLLIN));
        }
        // Once a second: the answer and freeze checks, and the progress line.
        let ready = match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) => {
                let ready = |i: usize| {
                    fds.get(i)
                        .and_then(PollFd::revents)
                        .is_some_and(|r| !r.is_empty())
                };
                [ready(0), ready(1)]
            }
            Err(Errno::EINTR) => [false, false],
            Err(e) => {
                clear_progress();
                return Some(format!("cannot wait for the keeper: {e}"));
            }
        };
        if ready[0] {
            clear_progress();
            // The keeper exits last, after an orderly stop; if anything still lives, it died.
            let state = segment.instance_status().map(|s| s.state).ok();
            return match state {
                Some(InstanceState::Stopped | InstanceState::Failed) => None,
                _ => Some(format!(
                    "the keeper (pid {}) of instance {instance} died before the stop was over",
                    keeper.pid
                )),
            };
        }
        drop(fds);
        let status = segment.instance_status().ok();
        let finished = matches!(
            status.map(|s| s.state),
            Some(InstanceState::Stopped | InstanceState::Failed)
        );
        if ready[1] && finished {
            // It finished its stop and exited; the keeper exits next, once it has reaped
            // everything and removed the state.
            coordinator_fd = None;
            coordinator_done = Some(Instant::now());
            continue;
        }
        if let Some(done) = coordinator_done {
            if done.elapsed() >= GRACE {
                clear_progress();
                return Some(format!(
                    "the keeper (pid {}) did not exit within {GRACE:?} after the coordinator finished",
                    keeper.pid
                ));
            }
            continue;
        }
        if ready[1] {
            // A standby takes over at once, and finishes the stop if it had begun.
            let standby = status
                .and_then(|s| s.standby)
                .filter(|s| *s != current && s.is_alive());
            let promoted = status
                .and_then(|s| s.coordinator)
                .filter(|c| *c != current && c.is_alive());
            let next = promoted
                .and_then(|c| inventory.prove(c, Role::Coordinator, "the coordinator"))
                .or_else(|| standby.and_then(|s| inventory.prove(s, Role::Standby, "the standby")));
            match next {
                Some(fd) => {
                    let next = fd.identity();
                    // The progress line is erased only where one was drawn (a terminal): a
                    // log file gets no escape codes.
                    clear_progress();
                    eprintln!(
                        "ccmgr: the coordinator (pid {}) died during the stop; following its successor (pid {})",
                        current.pid, next.pid
                    );
                    current = next;
                    current_asked = false;
                    coordinator_fd = Some(fd);
                    asked_at = Instant::now();
                    continue;
                }
                None => {
                    clear_progress();
                    return Some(format!(
                        "the coordinator (pid {}) died during the stop and no standby took over",
                        current.pid
                    ));
                }
            }
        }
        let state = status.map(|s| s.state);
        let took_over = status.and_then(|s| s.coordinator) == Some(current);
        if !current_asked && took_over {
            // Told to stop too: harmless if it already finishes its predecessor's stop.
            if let Some(proven) = &coordinator_fd {
                let _ = proven.signal(Signal::SIGTERM);
            }
            current_asked = true;
            asked_at = Instant::now();
        }
        let answered = matches!(
            state,
            Some(InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed)
        );
        if !answered && asked_at.elapsed() >= ANSWER_DEADLINE {
            clear_progress();
            return Some(format!(
                "the coordinator (pid {}) did not answer within {} s (the instance is still {})",
                current.pid,
                ANSWER_DEADLINE.as_secs(),
                state.map_or_else(|| "unreadable".to_owned(), |s| s.to_string())
            ));
        }
        // FreezeWatch keys on the identity, so a successor starts with a clean slate.
        if let Some(why) = freezes.check(vec![("keeper", keeper), ("coordinator", current)]) {
            clear_progress();
            return Some(why);
        }
        if Instant::now() >= overall {
            clear_progress();
            return Some(format!(
                "the coordinator did not finish stopping within {timeout:?}"
            ));
        }
        if progress {
            if let Some(line) = coordinator_progress(segment, config) {
                eprint!("\r\x1b[K{line}");
            }
        }
    }
}

/// What the coordinator's stop waits for, from the segment's per-service state and `since`:
/// "waiting for web: SIGTERM sent 3 s ago, SIGKILL in 7 s".
fn coordinator_progress(segment: &Segment, config: &Config) -> Option<String> {
    let now = crate::shm::monotonic_ms();
    let parts: Vec<String> = config
        .services
        .iter()
        .enumerate()
        .filter_map(|(s, spec)| {
            let st = segment.service_status(s).ok()?;
            (st.state == ServiceState::Stopping).then(|| {
                let ago = Duration::from_millis(now.saturating_sub(st.last_transition_ms));
                let what = if spec.cc_arg || spec.ready == crate::config::ReadyKind::Cc {
                    "asked to stop".to_owned()
                } else {
                    format!("{} sent", spec.stop_signal.0.as_str())
                };
                stop_driver::waiting_line(&spec.id, &what, ago, spec.shutdown_timeout.as_duration())
            })
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

pub fn restart(cli: &Cli, foreground: bool) -> Exit {
    match stop(cli) {
        Exit::Ok => start(cli, foreground),
        other => other,
    }
}

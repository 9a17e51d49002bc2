//! `ccmgr start`, `stop`, `restart`, and the hidden `internal` roles the binary re-executes
//! itself as (the keeper and the coordinator).
//!
//! `start` (FIG. 7A of the original design): check the config, refuse if the instance runs,
//! reclaim a stale segment left by a killed run, create the segment holding the manager
//! mutex, start the keeper (which starts the coordinator), and wait on the report pipe for
//! "up" or "failed" — the pipe also shows at once if the coordinator died, which a semaphore
//! could not. `stop` (FIG. 9) works in every situation: a live coordinator is asked to stop
//! in order; if it is dead, the command stops the services itself, in shutdown order, from
//! the segment; with nothing running it says so and succeeds.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, pipe2};

use super::{Cli, Exit, load_or_report};
use crate::cgroup::Tree;
use crate::config::{Config, LoadOptions};
use crate::coordinator::{self, StartReport};
use crate::keeper::{self, COORDINATOR_REPORT_FD, KeeperSetup};
use crate::logsink;
use crate::process_identity::ProcessIdentity;
use crate::shm::api::{ApiSpec, ControlSegment};
use crate::shm::{Deadline, InstanceState, Probe, Segment, SegmentSpec, ServiceStatic, ShmError};
use crate::spawn;

/// How long past the configured timeouts the command waits before it concludes something is
/// wedged: time for processes to be scheduled and to report.
const GRACE: Duration = Duration::from_secs(10);

/// What goes into a new segment for `config`.
pub fn segment_spec(config: &Config) -> SegmentSpec {
    let ms = |d: crate::duration::ConfigDuration| d.as_duration().as_millis() as u64;
    SegmentSpec {
        instance: config.global.instance.clone(),
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
fn clear_the_way(instance: &str) -> Result<(), Exit> {
    match Segment::probe(instance) {
        Ok(Probe::Absent) => Ok(()),
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
        Ok(Probe::Stale) => match reclaim(instance) {
            Ok(_) => {
                eprintln!(
                    "ccmgr: removed the state of an earlier run of instance {instance} that was killed"
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("ccmgr: {e}");
                Err(Exit::Failed)
            }
        },
        Err(e) => {
            eprintln!("ccmgr: {e}");
            Err(Exit::Failed)
        }
    }
}

pub fn start(cli: &Cli, foreground: bool) -> Exit {
    let config = match load_or_report(cli) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let instance = config.global.instance.clone();
    if let Err(e) = clear_the_way(&instance) {
        return e;
    }
    for dir in [&config.global.run_dir, &config.global.log_dir] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("ccmgr: cannot create {}: {e}", dir.display());
            return Exit::Failed;
        }
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
    let _ = ControlSegment::remove(&instance);
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
    let timeout = config.global.coordinator.startup_timeout.as_duration() + GRACE;
    let report = read_report(report_read, timeout);
    if let Ok(w) = segment.write() {
        w.set_manager(None);
    }
    drop(manager);
    let outcome = match report {
        Ok(Some(StartReport::Up)) => {
            print_up_summary(&config, &segment, started.elapsed());
            // The keeper lives on (re-parented when we exit); nothing of ours to reap.
            return Exit::Ok;
        }
        Ok(Some(StartReport::Failed { service, how })) => {
            // The coordinator is stopping what it started; wait for the keeper to finish so
            // the log is complete and nothing is left.
            let shutdown = config.global.coordinator.shutdown_timeout.as_duration() + GRACE;
            wait_for_exit(keeper_pid, shutdown);
            eprintln!("ccmgr: instance {instance} failed to start: service `{service}` {how}");
            print_log_tail(&config, &service);
            eprintln!("ccmgr: everything that was started has been stopped again");
            Exit::Failed
        }
        Ok(None) => {
            eprintln!(
                "ccmgr: the coordinator of instance {instance} died during startup; stopping what it started"
            );
            stop_instance(&instance);
            Exit::Failed
        }
        Err(e) => {
            eprintln!("ccmgr: instance {instance} did not come up: {e}; stopping what was started");
            stop_instance(&instance);
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

fn cleanup_failed_start(segment: &Segment) -> Exit {
    let _ = segment.unlink();
    let _ = ControlSegment::remove(segment.instance());
    Exit::Failed
}

/// Removes what an instance leaves in /dev/shm once nothing of it lives: the main segment
/// (only if stale: a live coordinator's is refused) and the service API's two files.
fn reclaim(instance: &str) -> Result<(), ShmError> {
    Segment::reclaim_stale(instance)?;
    let _ = ControlSegment::remove(instance);
    Ok(())
}

/// Reads the coordinator's one-line report: `Ok(None)` at EOF (it died without a word).
fn read_report(fd: OwnedFd, timeout: Duration) -> Result<Option<StartReport>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no report within {timeout:?}"));
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut line = String::new();
    BufReader::new(File::from(fd))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(line.trim())
        .map(Some)
        .map_err(|e| format!("unreadable report: {e}"))
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

fn print_up_summary(config: &Config, segment: &Segment, elapsed: Duration) {
    let coordinator = segment
        .instance_status()
        .ok()
        .and_then(|s| s.coordinator)
        .map_or_else(|| "?".to_owned(), |c| c.pid.to_string());
    println!(
        "ccmgr: instance {} is up: {} service{} in {:.2} s (coordinator pid {coordinator})",
        config.global.instance,
        config.services.len(),
        if config.services.len() == 1 { "" } else { "s" },
        elapsed.as_secs_f64()
    );
    let width = config
        .services
        .iter()
        .map(|s| s.id.len())
        .max()
        .unwrap_or(0);
    for &s in &config.startup_sequence {
        let pid = segment
            .service_status(s)
            .ok()
            .and_then(|st| st.process)
            .map_or_else(|| "done".to_owned(), |p| format!("pid {}", p.pid));
        println!("  {:<width$}  {pid}", config.services[s].id);
    }
}

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
pub fn internal_keeper(instance: &str) -> Exit {
    // Its own session: the terminal `ccmgr start` ran in can close without touching it. And
    // none of its caller's fds: only the report pipe was meant for it.
    let _ = nix::unistd::setsid();
    keeper::protocol::close_inherited_fds(&[COORDINATOR_REPORT_FD]);
    let report = keeper::protocol::take_inherited_fd(COORDINATOR_REPORT_FD);
    let (segment, config) = match open_instance(instance) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    run_keeper(config, segment, false, report)
}

/// The `internal coordinator` role: started by the keeper with its fds on 3, 4 (and 5).
pub fn internal_coordinator(instance: &str, foreground: bool, role: coordinator::Role) -> Exit {
    keeper::protocol::close_inherited_fds(&[
        keeper::COORDINATOR_CHANNEL_FD,
        keeper::COORDINATOR_NOTIFY_FD,
        COORDINATOR_REPORT_FD,
    ]);
    // Before anything opens a file that could land on one of their numbers.
    let handed = coordinator::Handed::take();
    let config = match open_instance(instance) {
        Ok((_, config)) => config,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    let name = match role {
        coordinator::Role::Coordinator => "coordinator",
        coordinator::Role::Standby => "standby",
    };
    let _span = crate::logging::init(
        Some(&coordinator::coordinator_log_path(&config)),
        foreground,
        name,
    );
    match coordinator::run(instance, handed, role) {
        Ok(0) => Exit::Ok,
        Ok(_) => Exit::Failed,
        Err(e) => {
            tracing::error!(error = %e, "the coordinator could not run");
            Exit::Failed
        }
    }
}

/// The segment of a running instance and the config image it holds.
pub fn open_instance(instance: &str) -> Result<(Segment, Config), String> {
    let segment = Segment::open(instance).map_err(|e| e.to_string())?;
    let blob = segment.config_blob().map_err(|e| e.to_string())?;
    let config = Config::from_image(&blob)?;
    Ok((segment, config))
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
    let instance = match instance_of(cli) {
        Ok((i, _)) => i,
        Err(e) => return e,
    };
    stop_instance(&instance)
}

/// Stops `instance` whatever state it is in; returns how it went.
pub fn stop_instance(instance: &str) -> Exit {
    let probe = match Segment::probe(instance) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    match probe {
        Probe::Absent => {
            println!("ccmgr: instance {instance} is not running");
            Exit::Ok
        }
        Probe::Stale => {
            let _ = reclaim(instance);
            println!(
                "ccmgr: instance {instance} is not running (removed the state a killed run left behind)"
            );
            Exit::Ok
        }
        Probe::Starting { manager } => {
            let pid = manager.map_or_else(|| "unknown".to_owned(), |m| m.pid.to_string());
            eprintln!(
                "ccmgr: instance {instance} is being started (by pid {pid}); stop it once the start has finished"
            );
            Exit::Failed
        }
        Probe::Live { coordinator } => match coordinator {
            Some(c) => stop_through_coordinator(instance, c),
            None => stop_without_coordinator(instance),
        },
        Probe::Abandoned { .. } => stop_without_coordinator(instance),
    }
}

/// A pidfd on the process `who`, if that pid still names it (pid and start time).
fn pidfd_of(who: ProcessIdentity) -> Option<OwnedFd> {
    let fd = spawn::pidfd_open(Pid::from_raw(who.pid)).ok()?;
    // The pidfd now pins whatever process has that pid: check it is the one we mean.
    who.is_alive().then_some(fd)
}

/// Sends `signal` to the process `who` if it is still that process; returns a pidfd on it.
fn signal_identity(who: ProcessIdentity, signal: Signal) -> Option<OwnedFd> {
    let fd = pidfd_of(who)?;
    spawn::signal_pidfd(fd.as_fd(), signal).ok()?;
    Some(fd)
}

fn stop_through_coordinator(instance: &str, coordinator: ProcessIdentity) -> Exit {
    let (segment, config) = match open_instance(instance) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    let keeper = segment.instance_status().ok().and_then(|s| s.keeper);
    drop(segment);
    let Some(coordinator_fd) = signal_identity(coordinator, Signal::SIGTERM) else {
        return stop_without_coordinator(instance);
    };
    let timeout = config.global.coordinator.shutdown_timeout.as_duration() + GRACE;
    // The keeper exits last, once every service is reaped and the segment is removed.
    let finished = match keeper.and_then(|k| {
        spawn::pidfd_open(Pid::from_raw(k.pid))
            .ok()
            .filter(|_| k.is_alive())
    }) {
        Some(keeper_fd) => spawn::wait_pidfd(keeper_fd.as_fd(), timeout).unwrap_or(false),
        None => spawn::wait_pidfd(coordinator_fd.as_fd(), timeout).unwrap_or(false),
    };
    if !finished {
        eprintln!(
            "ccmgr: the coordinator did not finish stopping within {timeout:?}; stopping the rest directly"
        );
        return stop_without_coordinator(instance);
    }
    let _ = reclaim(instance);
    println!("ccmgr: instance {instance} stopped");
    Exit::Ok
}

/// The coordinator is dead: stop the services in shutdown order from the segment's records,
/// then the keeper and standby, then remove the segment.
fn stop_without_coordinator(instance: &str) -> Exit {
    let (segment, config) = match open_instance(instance) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    eprintln!(
        "ccmgr: no coordinator supervises instance {instance}: stopping its services directly, in shutdown order"
    );
    // The services that use the service API stop themselves, in shutdown order, once asked:
    // take the dead coordinator's daemon component and release it asking every service.
    let mut gate = ControlSegment::open(instance).ok().and_then(|c| {
        c.hold_daemon_component(Deadline::after(Duration::from_secs(5)))
            .ok()
    });
    if let Some(g) = gate.as_mut() {
        let all: Vec<usize> = (0..config.services.len()).collect();
        if g.release_for_shutdown(&all).is_ok() {
            eprintln!("ccmgr: asked the services that use the service API to shut down in order");
        }
    }
    for &s in &config.shutdown_sequence {
        let spec = &config.services[s];
        let Some(who) = segment
            .service_status(s)
            .ok()
            .and_then(|st| st.process)
            .filter(ProcessIdentity::is_alive)
        else {
            continue;
        };
        let pgid = Pid::from_raw(who.pid);
        let registered = gate
            .as_ref()
            .and_then(|g| g.control().component_registered(s).ok().flatten())
            == Some(true);
        let Some(fd) = pidfd_of(who) else {
            continue;
        };
        if !registered {
            // The stop signal goes to the whole group, as the coordinator would send it. (A
            // service of the API was asked above and stops at its turn: a signal now would
            // end it out of turn.)
            let _ = spawn::signal_pidfd(fd.as_fd(), spec.stop_signal.0);
            let _ = spawn::signal_group(pgid, spec.stop_signal.0);
        }
        let ended =
            spawn::wait_pidfd(fd.as_fd(), spec.shutdown_timeout.as_duration()).unwrap_or(false);
        if !ended {
            eprintln!(
                "ccmgr: service `{}` ignored {}: killing it",
                spec.id, spec.stop_signal
            );
            let _ = spawn::signal_pidfd(fd.as_fd(), Signal::SIGKILL);
            let _ = spawn::wait_pidfd(fd.as_fd(), GRACE);
        }
        // What the service left in its group goes too (the group id stays taken while any
        // member lives, so this cannot reach another group).
        let _ = spawn::signal_group(pgid, Signal::SIGKILL);
        println!("ccmgr: stopped `{}` (pid {})", spec.id, who.pid);
    }
    let status = segment.instance_status().ok();
    for party in [
        status.and_then(|s| s.standby),
        status.and_then(|s| s.keeper),
        status.and_then(|s| s.coordinator),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(fd) = signal_identity(party, Signal::SIGTERM) {
            if !spawn::wait_pidfd(fd.as_fd(), GRACE).unwrap_or(false) {
                let _ = spawn::signal_pidfd(fd.as_fd(), Signal::SIGKILL);
                let _ = spawn::wait_pidfd(fd.as_fd(), GRACE);
            }
        }
    }
    drop(segment);
    remove_recorded_cgroups(&config);
    match reclaim(instance) {
        Ok(_) => {
            println!("ccmgr: instance {instance} stopped");
            Exit::Ok
        }
        Err(e) => {
            eprintln!("ccmgr: {e}");
            Exit::Failed
        }
    }
}

/// A keeper that was killed could not remove its cgroups: kill what is still in them (daemons
/// that escaped their process group with setsid) and remove them, from what it recorded.
fn remove_recorded_cgroups(config: &Config) {
    let record = Tree::record_path(&config.global.run_dir, &config.global.instance);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return;
    };
    let mut lines = text.lines();
    if let (Some(dir), Some(path)) = (lines.next(), lines.next()) {
        let dir = std::path::Path::new(dir);
        if dir.is_dir() {
            match Tree::existing(dir, std::path::Path::new(path)).remove(GRACE) {
                Ok(()) => println!("ccmgr: removed the instance's cgroups {}", dir.display()),
                Err(e) => eprintln!("ccmgr: {e}"),
            }
        }
    }
    let _ = std::fs::remove_file(record);
}

pub fn restart(cli: &Cli, foreground: bool) -> Exit {
    match stop(cli) {
        Exit::Ok => start(cli, foreground),
        other => other,
    }
}

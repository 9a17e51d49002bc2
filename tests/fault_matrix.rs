//! The fault matrix: every party of an instance (keeper, coordinator, standby, and each pair of
//! them) killed with SIGKILL or frozen with SIGSTOP, in every phase (startup, steady, a failure
//! sequence, a stop), under both takeover modes, through the real binary.
//!
//! After each cell:
//! - `status` agrees with `/proc`: every service it calls up has a live pid; every live process
//!   of the instance is one it lists; `supervised` is false while the coordinator is dead or
//!   frozen;
//! - with the keeper alive and nothing frozen, the stack ends fully up with the dependency order
//!   respected (no dependent older than a dependency it requires, i.e. nothing still running
//!   on a dependency that restarted under it) or fully stopped with a reason;
//! - `stop` then leaves no process, no segment and no cgroup of the instance, and a new `start`
//!   works (and is stopped again).
//!
//! One test per (party, fault) runs its cells (phases × takeover modes) in parallel threads, so
//! the whole matrix fits in CI's time on a small machine: the cells mostly wait.
//!
//! The stack: `gate` (a one-shot that finishes once a file exists: it holds the startup phase
//! open) ← `base` ← `mid` ← `top`, where `top` ignores SIGTERM and has a 2 s shutdown timeout, so
//! that a failure sequence and a stop each last long enough to be hit in the middle.

mod stack_support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{Running, Stack, service_of as service, text};

const LONG: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Party {
    Keeper,
    Coordinator,
    Standby,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Freeze,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Startup,
    Steady,
    FailureSequence,
    Stop,
}

const PHASES: [Phase; 4] = [
    Phase::Startup,
    Phase::Steady,
    Phase::FailureSequence,
    Phase::Stop,
];

#[derive(Clone, Copy, Debug)]
struct Cell {
    parties: &'static [Party],
    fault: Fault,
    phase: Phase,
    restart_all: bool,
}

impl Cell {
    /// A short name that is also a valid instance name: `fm-kc-kill-failure-adopt`.
    fn name(&self) -> String {
        let parties: String = self
            .parties
            .iter()
            .map(|p| match p {
                Party::Keeper => 'k',
                Party::Coordinator => 'c',
                Party::Standby => 's',
            })
            .collect();
        let fault = match self.fault {
            Fault::Kill => "kill",
            Fault::Freeze => "stop",
        };
        let phase = match self.phase {
            Phase::Startup => "startup",
            Phase::Steady => "steady",
            Phase::FailureSequence => "failure",
            Phase::Stop => "stopping",
        };
        let mode = if self.restart_all { "restart" } else { "adopt" };
        format!("fm-{parties}-{fault}-{phase}-{mode}")
    }
}

/// Every service of the stack, as (id, what it requires).
const SERVICES: [(&str, &[&str]); 4] = [
    ("gate", &[]),
    ("base", &["gate"]),
    ("mid", &["base"]),
    ("top", &["mid"]),
];

fn new_stack(cell: &Cell) -> Stack {
    let takeover = if cell.restart_all { "restart" } else { "adopt" };
    let global = format!(
        "[coordinator]\ntakeover = \"{takeover}\"\nrestart_retry_counter = 5\nrestart_time_span = \"60s\"\nstartup_timeout = \"30s\"\nshutdown_timeout = \"15s\"\n"
    );
    let stack = Stack::new(&cell.name(), &global, &[]);
    let gate = stack.file("gate-open");
    stack.write_service(
        "gate",
        &format!(
            "command = [\"sh\", \"-c\", \"while [ ! -e {gate} ]; do sleep 0.02; done\"]\nready = \"exit\"\nstartup_timeout = \"30s\"\n"
        ),
    );
    stack.write_service(
        "base",
        "command = [\"sleep\", \"100000\"]\nrequires = [\"gate\"]\nrestart_delay = \"0ms\"\n",
    );
    stack.write_service(
        "mid",
        "command = [\"sleep\", \"100000\"]\nrequires = [\"base\"]\nrestart_delay = \"0ms\"\n",
    );
    stack.write_service(
        "top",
        "command = [\"sh\", \"-c\", \"trap '' TERM; exec sleep 100000\"]\nrequires = [\"mid\"]\nrestart_delay = \"0ms\"\nshutdown_timeout = \"2s\"\n",
    );
    stack
}

fn open_gate(stack: &Stack) {
    std::fs::write(stack.file("gate-open"), b"").unwrap();
}

fn pid_at(v: &Value, key: &str) -> Option<i32> {
    v[key]["pid"].as_i64().map(|p| p as i32)
}

/// The live processes of the instance: services (their environment names the instance) and
/// the keeper, coordinator and standby (their command line does). Zombies are left out.
fn processes_of(instance: &str) -> Vec<(i32, &'static str)> {
    let env_mark = format!("CCMGR_INSTANCE={instance}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !Stack::alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let names_instance = args
            .windows(2)
            .any(|w| w[0] == b"--instance" && w[1] == instance.as_bytes());
        if names_instance && args.iter().any(|a| *a == b"internal") {
            out.push((pid, "ccmgr"));
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ
            .split(|&b| b == 0)
            .any(|kv| kv == env_mark.as_bytes())
        {
            out.push((pid, "service"));
        }
    }
    out
}

/// Field 22 of /proc/<pid>/stat.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Frozen: state T (stopped) in /proc.
fn frozen(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// `status` agrees with /proc: what it calls up lives; every live process of the instance is
/// listed; `supervised` is false without a live, unfrozen coordinator and keeper. A process
/// the keeper is starting this very moment (a new standby) cannot be listed yet, so an unlisted
/// one is looked for again, for a short while, before it counts.
fn check_status_is_true(stack: &Stack, cell: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_status_once(stack, cell)
        })) {
            Ok(()) => return,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn check_status_once(stack: &Stack, cell: &str) {
    let Some(status) = stack.status_relaxed() else {
        // Not running: nothing of the instance may live.
        let left = processes_of(&stack.instance);
        assert!(
            left.is_empty(),
            "{cell}: status says not running, but these live: {left:?}"
        );
        return;
    };
    let mut listed: Vec<i32> = ["keeper", "coordinator", "standby"]
        .iter()
        .filter_map(|k| pid_at(&status, k))
        .collect();
    for s in status["services"].as_array().unwrap() {
        let pid = s["pid"].as_i64().map(|p| p as i32);
        if s["state"] == "up" {
            if let Some(pid) = pid {
                assert!(
                    Stack::alive(pid),
                    "{cell}: status calls {} up with pid {pid}, which is dead: {status}",
                    s["id"]
                );
            }
        }
        listed.extend(pid);
    }
    let answers =
        |key: &str| pid_at(&status, key).is_some_and(|pid| Stack::alive(pid) && !frozen(pid));
    if !answers("coordinator") || !answers("keeper") {
        assert_ne!(
            status["supervised"],
            Value::Bool(true),
            "{cell}: status says supervised without a live, answering coordinator and keeper: {status}"
        );
    }
    for (pid, what) in processes_of(&stack.instance) {
        assert!(
            listed.contains(&pid) || !Stack::alive(pid),
            "{cell}: {what} pid {pid} of the instance lives but status does not list it: {status}"
        );
    }
}

/// With the keeper alive and nothing frozen: fully up, in dependency order, or fully stopped.
fn settle_up_or_stopped(stack: &Stack, cell: &str) -> bool {
    let status =
        stack.wait_for_relaxed(&format!("{cell}: the stack to settle"), LONG, |s| match s {
            None => true,
            Some(s) => {
                (s["state"] == "steady"
                    && s["supervised"] == Value::Bool(true)
                    && s["services"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|x| x["state"] == "up"))
                    || s["state"] == "stopped"
                    || s["state"] == "failed"
            }
        });
    let Some(status) = status else {
        return false;
    };
    if status["state"] != "steady" {
        return false;
    }
    // Dependency order: nothing runs on a dependency that started after it.
    for (id, requires) in SERVICES {
        let Some(pid) = service(&status, id)["pid"].as_i64() else {
            continue;
        };
        let mine = start_time(pid as i32).unwrap_or(0);
        for dep in requires {
            if let Some(dep_pid) = service(&status, dep)["pid"].as_i64() {
                let theirs = start_time(dep_pid as i32).unwrap_or(0);
                assert!(
                    mine >= theirs,
                    "{cell}: {id} (started at tick {mine}) runs on {dep}, which restarted under it (tick {theirs}): {status}"
                );
            }
        }
    }
    true
}

/// `stop` leaves no process, no segment and no cgroup of the instance.
fn stop_leaves_nothing(stack: &Stack, cell: &str) {
    let cgroups = recorded_cgroup(stack);
    let out = stack.stop();
    assert!(
        matches!(out.status.code(), Some(0)),
        "{cell}: stop failed:\n{}",
        text(&out)
    );
    let left = processes_of(&stack.instance);
    assert!(
        left.is_empty(),
        "{cell}: stop left {left:?}:\n{}",
        text(&out)
    );
    let state = stack.state_files();
    assert!(state.is_empty(), "{cell}: stop left {state:?}");
    if let Some(dir) = cgroups {
        assert!(
            !dir.exists(),
            "{cell}: stop left the cgroups {}",
            dir.display()
        );
    }
    let status = stack.status_relaxed();
    assert!(status.is_none(), "{cell}: status after stop: {status:?}");
}

/// The instance's cgroup directory, as the keeper recorded it.
fn recorded_cgroup(stack: &Stack) -> Option<std::path::PathBuf> {
    let record = ccmgr::cgroup::Tree::record_path(&stack.path().join("run"), &stack.instance);
    let text = std::fs::read_to_string(record).ok()?;
    text.lines().next().map(std::path::PathBuf::from)
}

fn signal_parties(status: &Value, cell: &Cell) -> Vec<i32> {
    let mut hit = Vec::new();
    for party in cell.parties {
        let key = match party {
            Party::Keeper => "keeper",
            Party::Coordinator => "coordinator",
            Party::Standby => "standby",
        };
        let pid = pid_at(status, key)
            .unwrap_or_else(|| panic!("{}: no {key} to hit: {status}", cell.name()));
        hit.push(pid);
    }
    let signal = match cell.fault {
        Fault::Kill => Signal::SIGKILL,
        Fault::Freeze => Signal::SIGSTOP,
    };
    // A party may end by itself just before it is hit (a coordinator finishing its stop):
    // the cell then checks the end of that phase instead, and says so.
    hit.retain(|&pid| match kill(Pid::from_raw(pid), signal) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => {
            eprintln!("{}: pid {pid} ended before the fault", cell.name());
            false
        }
        Err(e) => panic!("{}: kill {pid}: {e}", cell.name()),
    });
    // A signal is delivered asynchronously: wait until /proc shows it took effect, so that
    // what follows is checked against the fault, not against the instant before it.
    let deadline = Instant::now() + LONG;
    for &pid in &hit {
        while !match cell.fault {
            Fault::Kill => !Stack::alive(pid),
            Fault::Freeze => frozen(pid),
        } {
            assert!(
                Instant::now() < deadline,
                "{}: pid {pid} never took {signal:?}",
                cell.name()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    hit
}

fn run_cell(cell: Cell) {
    let name = cell.name();
    let stack = new_stack(&cell);
    let needs_standby = cell.parties.contains(&Party::Standby);
    let mut pending: Option<(Running, &str)> = None;
    let status = match cell.phase {
        Phase::Startup => {
            let start = Running::spawn(&stack, &["start"]);
            let status = stack
                .wait_for_relaxed(&format!("{name}: the startup to be under way"), LONG, |s| {
                    s.as_ref().is_some_and(|s| {
                        s["state"] == "initializing"
                            && pid_at(s, "coordinator").is_some()
                            && pid_at(s, "keeper").is_some()
                    })
                })
                .unwrap();
            pending = Some((start, "start"));
            status
        }
        _ => {
            open_gate(&stack);
            stack.start_ok();
            let status = stack
                .wait_for_relaxed(&format!("{name}: a steady stack"), LONG, |s| {
                    s.as_ref().is_some_and(|s| {
                        s["state"] == "steady" && (!needs_standby || pid_at(s, "standby").is_some())
                    })
                })
                .unwrap();
            match cell.phase {
                Phase::FailureSequence => {
                    let base = service(&status, "base")["pid"].as_i64().unwrap() as i32;
                    kill(Pid::from_raw(base), Signal::SIGKILL).unwrap();
                    stack
                        .wait_for_relaxed(&format!("{name}: top stopping"), LONG, |s| {
                            s.as_ref()
                                .is_some_and(|s| service(s, "top")["state"] == "stopping")
                        })
                        .unwrap()
                }
                Phase::Stop => {
                    let mut stop = Running::spawn(&stack, &["stop"]);
                    let seen =
                        stack.wait_for_relaxed(&format!("{name}: the stop under way"), LONG, |s| {
                            s.as_ref().is_some_and(|s| s["state"] == "stopping") || stop.has_ended()
                        });
                    let Some(seen) = seen.filter(|s| s["state"] == "stopping") else {
                        // On a loaded machine the whole stop can slip between two looks.
                        eprintln!("{name}: the stop was over before it could be hit");
                        let out = stop.finish(LONG);
                        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out));
                        stop_leaves_nothing(&stack, &name);
                        return;
                    };
                    pending = Some((stop, "stop"));
                    seen
                }
                _ => status,
            }
        }
    };
    let hit = signal_parties(&status, &cell);
    stack.remember(&hit);
    if cell.phase == Phase::Startup {
        open_gate(&stack);
    }
    let keeper_hit = cell.parties.contains(&Party::Keeper);
    match cell.fault {
        Fault::Kill if !keeper_hit => {
            if let Some((child, what)) = pending.take() {
                let out = child.finish(LONG * 2);
                // Whatever `start` or `stop` said, the stack must agree with it.
                let up = settle_up_or_stopped(&stack, &name);
                if what == "start" && out.status.code() == Some(0) {
                    assert!(
                        up,
                        "{name}: start said up, but the stack is not:\n{}",
                        text(&out)
                    );
                }
                if what == "stop" {
                    assert_eq!(out.status.code(), Some(0), "{name}: stop:\n{}", text(&out));
                    assert!(!up, "{name}: stop succeeded but the stack runs");
                }
            } else {
                settle_up_or_stopped(&stack, &name);
            }
            check_status_is_true(&stack, &name);
        }
        _ => {
            // A dead keeper, or a frozen party: status must still tell the truth now, and
            // a pending verb must end (honestly) rather than hang.
            check_status_is_true(&stack, &name);
            if let Some((child, what)) = pending.take() {
                let out = child.finish(LONG * 2);
                if what == "stop" {
                    let left = processes_of(&stack.instance);
                    assert!(
                        out.status.code() != Some(0) || left.is_empty(),
                        "{name}: stop said stopped while {left:?} live:\n{}",
                        text(&out)
                    );
                }
            }
        }
    }
    stop_leaves_nothing(&stack, &name);
    // And the instance can start again.
    stack.start_ok();
    stack.wait_steady(LONG);
    stop_leaves_nothing(&stack, &format!("{name} (second run)"));
}

/// Runs every phase × takeover mode of one (parties, fault) pair in parallel threads and
/// reports every failed cell by name.
fn run_row(parties: &'static [Party], fault: Fault) {
    let mut cells = Vec::new();
    for phase in PHASES {
        // No standby exists before the startup sequence is done.
        if phase == Phase::Startup && parties.contains(&Party::Standby) {
            continue;
        }
        for restart_all in [false, true] {
            cells.push(Cell {
                parties,
                fault,
                phase,
                restart_all,
            });
        }
    }
    let started = Instant::now();
    let handles: Vec<_> = cells
        .iter()
        .map(|&cell| (cell.name(), std::thread::spawn(move || run_cell(cell))))
        .collect();
    let mut failed = Vec::new();
    for (name, handle) in handles {
        if let Err(panic) = handle.join() {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("{name}: {why}"));
        }
    }
    eprintln!(
        "fault matrix row {parties:?} {fault:?}: {} cells in {:.1} s",
        cells.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} of {} cells failed:\n{}",
        failed.len(),
        cells.len(),
        failed.join("\n\n")
    );
}

macro_rules! row {
    ($name:ident, [$($party:ident),+], $fault:ident) => {
        #[test]
        fn $name() {
            run_row(&[$(Party::$party),+], Fault::$fault);
        }
    };
}

row!(kill_keeper, [Keeper], Kill);
row!(kill_coordinator, [Coordinator], Kill);
row!(kill_standby, [Standby], Kill);
row!(kill_keeper_and_coordinator, [Keeper, Coordinator], Kill);
row!(kill_keeper_and_standby, [Keeper, Standby], Kill);
row!(kill_coordinator_and_standby, [Coordinator, Standby], Kill);
row!(freeze_keeper, [Keeper], Freeze);
row!(freeze_coordinator, [Coordinator], Freeze);
row!(freeze_standby, [Standby], Freeze);
row!(freeze_keeper_and_coordinator, [Keeper, Coordinator], Freeze);
row!(freeze_keeper_and_standby, [Keeper, Standby], Freeze);
row!(
    freeze_coordinator_and_standby,
    [Coordinator, Standby],
    Freeze
);

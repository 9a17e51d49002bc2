//! Issue 9, item 1, defence in depth: no ccmgr process signals a pid read from shared memory
//! or a record without proving it is the instance's process.
//!
//! Each test starts an innocent process (a `sleep` in its own process group, no part of any
//! stack), forges one of the instance's records (the segment's coordinator or service pid and
//! start time, or the cgroup record in `run_dir`) to point at it, as a writer of those records
//! could, and checks that `ccmgr stop` (or a takeover) leaves it alone, finishes promptly, and
//! still stops the real stack. On main `stop` SIGTERMed (or cgroup-killed) the innocent.

mod stack_support;

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ccmgr::process_identity::ProcessIdentity;
use ccmgr::shm::Segment;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stack_support::{Running, Stack, pids_in, text, up_anew};

const SLEEP: &str = r#"command = ["sleep", "100000"]"#;
const LONG: Duration = Duration::from_secs(30);
/// How long `stop` may take here: the frozen-coordinator cases wait out the 3 s answer
/// deadline first; on main the forged coordinator made it hang.
const STOP_LIMIT: Duration = Duration::from_secs(25);

/// A process no stack knows, in its own process group; killed and reaped on drop.
struct Innocent {
    child: Child,
    id: ProcessIdentity,
}

impl Innocent {
    fn start() -> Innocent {
        let child = Command::new("sleep")
            .arg("100000")
            .process_group(0)
            .spawn()
            .unwrap();
        let id = ProcessIdentity::of(child.id() as i32).unwrap();
        Innocent { child, id }
    }

    fn alive(&self) -> bool {
        self.id.is_alive()
    }
}

impl Drop for Innocent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops `pid` (SIGSTOP) and waits until /proc shows it stopped.
fn freeze(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ProcessIdentity::of(pid).is_ok_and(|p| p.is_frozen()) {
        assert!(Instant::now() < deadline, "pid {pid} did not stop");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `ccmgr stop`, which must end within [`STOP_LIMIT`].
fn stop_promptly(stack: &Stack) -> std::process::Output {
    Running::spawn(stack, &["stop"]).finish(STOP_LIMIT)
}

/// Every pid of the stack is gone (or a zombie left to the test process to reap).
fn assert_all_gone(pids: &[i32], out: &std::process::Output) {
    let alive: Vec<i32> = pids.iter().copied().filter(|&p| Stack::alive(p)).collect();
    assert!(
        alive.is_empty(),
        "the stack's processes {alive:?} survived the stop:\n{}",
        text(out)
    );
}

/// The exploit of issue 9: the segment's coordinator pid and start time rewritten to another
/// process's. `stop` must not signal it (on main it SIGTERMed it and then hung), must say so,
/// and must stop the real stack (through the coordinator the keeper's record names).
#[test]
fn a_forged_coordinator_in_the_segment_is_not_signalled() {
    let stack = Stack::new("pp-coordinator", "", &[("a", SLEEP)]);
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let pids = pids_in(&status);
    stack.remember(&pids);
    let innocent = Innocent::start();
    let segment = Segment::open(&stack.run_dir(), &stack.instance).unwrap();
    segment.write().unwrap().set_coordinator(Some(innocent.id));
    drop(segment);

    stop_spares(&stack, &innocent, &pids, "the coordinator");
}

/// A service's pid in the segment forged to another process's while the coordinator is
/// frozen, so `stop` stops the services itself: the forged one is refused, the real one (the
/// keeper's record names it) is stopped.
#[test]
fn a_forged_service_pid_is_not_signalled_by_the_stop_driver() {
    let stack = Stack::new(
        "pp-service",
        "[coordinator]\nstandby = false",
        &[("a", SLEEP)],
    );
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let pids = pids_in(&status);
    stack.remember(&pids);
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let innocent = Innocent::start();
    // Frozen first, so that it cannot publish the real pid again over the forged one.
    freeze(coordinator);
    let segment = Segment::open(&stack.run_dir(), &stack.instance).unwrap();
    let a = segment.service_index("a").unwrap().unwrap();
    segment
        .write()
        .unwrap()
        .set_service_process(a, Some(innocent.id))
        .unwrap();
    drop(segment);

    stop_spares(&stack, &innocent, &pids, "service `a`");
}

/// The cgroup record in `run_dir` forged to name another cgroup, holding an innocent process:
/// `stop` must not kill what that cgroup holds (on main it killed it and removed the cgroup).
#[test]
fn a_forged_cgroup_record_is_not_used() {
    let stack = Stack::new("pp-cgroup", "", &[("a", SLEEP)]);
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let pids = pids_in(&status);
    stack.remember(&pids);
    let record = stack
        .path()
        .join("run")
        .join(format!("{}.cgroup", stack.instance));
    let Ok(text_of_record) = std::fs::read_to_string(&record) else {
        eprintln!("no cgroups on this machine: nothing to forge");
        return;
    };
    let mut lines = text_of_record.lines();
    let (dir, path) = (
        std::path::PathBuf::from(lines.next().unwrap()),
        std::path::PathBuf::from(lines.next().unwrap()),
    );
    // A sibling of the instance's cgroup, holding the innocent.
    let name = format!("pp-innocent-{}", std::process::id());
    let other_dir = dir.parent().unwrap().join(&name);
    let other_path = path.parent().unwrap().join(&name);
    std::fs::create_dir(&other_dir).unwrap();
    struct RemoveCgroup(std::path::PathBuf);
    impl Drop for RemoveCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _cleanup = RemoveCgroup(other_dir.clone());
    let innocent = Innocent::start();
    std::fs::write(other_dir.join("cgroup.procs"), innocent.id.pid.to_string()).unwrap();
    std::fs::write(
        &record,
        format!("{}\n{}\n", other_dir.display(), other_path.display()),
    )
    .unwrap();

    let out = stop_promptly(&stack);
    assert!(
        innocent.alive(),
        "stop killed what the forged cgroup record's cgroup held:\n{}",
        text(&out)
    );
    assert!(other_dir.exists(), "stop removed a cgroup not its own");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("which is not this instance's cgroup"),
        "{}",
        text(&out)
    );
    assert_all_gone(&pids, &out);
    // The innocent goes before its cgroup is removed (drop order: innocent first).
    drop(innocent);
}

/// A service's pid in the segment forged to another process's, then the coordinator killed
/// under `takeover = "restart"`, which restarts every service: the successor (through the
/// keeper, which signals only its own children) must leave the innocent alone and restart the
/// real service.
#[test]
fn a_takeover_does_not_signal_a_forged_service_pid() {
    let stack = Stack::new(
        "pp-takeover",
        "[coordinator]\ntakeover = \"restart\"",
        &[("a", SLEEP)],
    );
    stack.start_ok();
    let status = stack.wait_steady_with_standby(LONG);
    stack.remember(&pids_in(&status));
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let old_a = stack_support::service_of(&status, "a")["pid"]
        .as_i64()
        .unwrap() as i32;
    let innocent = Innocent::start();
    freeze(coordinator);
    let segment = Segment::open(&stack.run_dir(), &stack.instance).unwrap();
    let a = segment.service_index("a").unwrap().unwrap();
    segment
        .write()
        .unwrap()
        .set_service_process(a, Some(innocent.id))
        .unwrap();
    drop(segment);
    kill(Pid::from_raw(coordinator), Signal::SIGKILL).unwrap();

    let status = stack
        .wait_for("the successor restarted a", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                s["coordinator"]["pid"]
                    .as_i64()
                    .is_some_and(|c| c as i32 != coordinator)
                    && stack_support::steady_and_all_up(s)
                    && up_anew(s, "a", old_a)
                    && up_anew(s, "a", innocent.id.pid)
            })
        })
        .unwrap();
    stack.remember(&pids_in(&status));
    assert!(
        innocent.alive(),
        "the takeover signalled the process the forged segment named as service a"
    );
    let out = stop_promptly(&stack);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        innocent.alive(),
        "stop signalled the innocent:\n{}",
        text(&out)
    );
}

/// The keeper killed (its services live on, orphaned), then the keeper's process record in
/// `run_dir` forged to name another process as the keeper: `stop` must stop the orphaned
/// services (proven by their cgroup or their environment) and leave the innocent alone (on
/// main it froze it with SIGSTOP, then killed it).
#[test]
fn a_forged_keeper_in_the_process_record_is_not_signalled() {
    use ccmgr::records::{ProcessRecord, record_path};
    let stack = Stack::new(
        "pp-record",
        "[coordinator]\nstandby = false",
        &[("a", SLEEP)],
    );
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let pids = pids_in(&status);
    stack.remember(&pids);
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    let keeper_id = ProcessIdentity::of(keeper).unwrap();
    let path = record_path(&stack.path().join("run"), &stack.instance);
    // The keeper writes its record once a burst of changes has settled: wait for it.
    let deadline = Instant::now() + LONG;
    let mut record = loop {
        match ProcessRecord::read(&path).unwrap() {
            Some(record) if !record.services.is_empty() => break record,
            _ => {
                assert!(Instant::now() < deadline, "the keeper wrote no record");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    kill(Pid::from_raw(keeper), Signal::SIGKILL).unwrap();
    while keeper_id.is_alive() {
        assert!(Instant::now() < deadline, "the keeper did not die");
        std::thread::sleep(Duration::from_millis(5));
    }
    let innocent = Innocent::start();
    record.keeper = Some(innocent.id.into());
    record.write(&path).unwrap();

    stop_spares(&stack, &innocent, &pids, "the keeper");
}

/// `stop` finishes promptly and well (exit 0, everything of the stack gone) without
/// signalling `innocent`, which a forged record named as `recorded_as`, and says so.
fn stop_spares(stack: &Stack, innocent: &Innocent, pids: &[i32], recorded_as: &str) {
    let out = stop_promptly(stack);
    assert!(
        innocent.alive(),
        "stop signalled the process a forged record named as {recorded_as}:\n{}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "pid {} recorded as {recorded_as} is not this instance's process",
            innocent.id.pid
        )),
        "{}",
        text(&out)
    );
    assert_all_gone(pids, &out);
}

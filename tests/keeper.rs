//! The keeper's promises, with real processes through the real binary: an exit the coordinator
//! never published survives a takeover; while the keeper lives the instance is never without a
//! coordinator (a successor adopts the stack when no standby can), and when successors keep
//! dying the keeper stops the stack in order itself; the process record in `run_dir` follows
//! the processes; a standby that keeps dying is given up on with a word in `status`; and
//! nothing new starts once the stack is stopping.

mod stack_support;

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{CCMGR, Stack, lines, text, up_anew, wait_lines};

const LONG: Duration = Duration::from_secs(20);

fn recorder(id: &str, log: &str, deps: &str) -> String {
    format!(
        r#"command = ["sh", "-c", "echo start {id} >> {log}; trap 'echo stop {id} >> {log}; exit 0' TERM; while :; do sleep 1; done"]
{deps}
"#
    )
}

fn pid(v: &Value) -> Option<i32> {
    v["pid"].as_i64().map(|p| p as i32)
}

fn service_pid(status: &Value, id: &str) -> Option<i32> {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .and_then(pid)
}

fn signal(p: i32, s: Signal) {
    kill(Pid::from_raw(p), s).unwrap();
}

/// Polls until `pid` is gone from /proc (reaped by its parent).
fn wait_reaped(pid: i32) {
    let deadline = Instant::now() + LONG;
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "{pid} was never reaped");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls until the (single-threaded) process `pid` is blocked in epoll_wait: it has finished
/// handling whatever woke it.
fn wait_blocked_in_epoll(pid: i32) {
    let deadline = Instant::now() + LONG;
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("epoll_wait") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pid} never went back to epoll_wait (in {wchan})"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A stack of db <- api, up and steady (with a standby unless `global` says otherwise).
fn two_tier(test: &str, global: &str) -> (Stack, String, Value) {
    let stack = Stack::new(test, global, &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    stack.start_ok();
    let want_standby = !global.contains("standby = false");
    let status = stack
        .wait_for("a steady stack", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                s["state"] == "steady" && (!want_standby || pid(&s["standby"]).is_some())
            })
        })
        .unwrap();
    wait_lines(&log, 2, LONG);
    (stack, log, status)
}

/// Waits for a coordinator other than every pid in `dead` to run a steady stack.
fn wait_new_coordinator(stack: &Stack, dead: &[i32]) -> Value {
    stack
        .wait_for("a new coordinator over a steady stack", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                pid(&s["coordinator"]).is_some_and(|c| !dead.contains(&c))
                    && s["state"] == "steady"
                    && s["supervised"] == true
            })
        })
        .unwrap()
}

/// The stack is supervised: a killed service is restarted.
fn assert_supervised(stack: &Stack) {
    let api = stack.pid_of("api").unwrap();
    signal(api, Signal::SIGKILL);
    stack.wait_for("api to be restarted", LONG, |s| {
        s.as_ref().is_some_and(|s| up_anew(s, "api", api))
    });
}

#[test]
fn an_exit_the_frozen_coordinator_never_read_survives_its_death() {
    let stack = Stack::new("exit-kept", "", &[]);
    let fifo = stack.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    stack.write_service(
        "seven",
        &format!(
            r#"command = ["sh", "-c", "read x < {}; exit 7"]
restart_delay = "0ms"
"#,
            fifo.display()
        ),
    );
    stack.start_ok();
    let before = stack
        .wait_for("a steady stack with a standby", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| s["state"] == "steady" && pid(&s["standby"]).is_some())
        })
        .unwrap();
    let coordinator = pid(&before["coordinator"]).unwrap();
    let keeper = pid(&before["keeper"]).unwrap();
    let seven = stack.pid_of("seven").unwrap();
    signal(coordinator, Signal::SIGSTOP);
    // The service exits 7 while the coordinator is frozen: the keeper reaps it and writes the
    // exit into the coordinator's socket, where nobody reads it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    wait_reaped(seven);
    wait_blocked_in_epoll(keeper);
    signal(coordinator, Signal::SIGKILL);
    let after = stack
        .wait_for("the service restarted under a new coordinator", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                pid(&s["coordinator"]).is_some_and(|c| c != coordinator)
                    && up_anew(s, "seven", seven)
            })
        })
        .unwrap();
    let service = after["services"][0].clone();
    assert_eq!(service["last_exit"]["code"], 7, "{after}");
    assert_eq!(service["restarts"], 1, "the failure sequence ran: {after}");
    let human = text(&stack.ccmgr(&["status"]));
    assert!(
        human.contains("exit 7") || human.contains("exited with status 7"),
        "{human}"
    );
}

#[test]
fn background_both_killed_at_once_a_new_coordinator_adopts_the_stack() {
    let (stack, log, before) = two_tier("both-killed-bg", "");
    let coordinator = pid(&before["coordinator"]).unwrap();
    let standby = pid(&before["standby"]).unwrap();
    // Both at once: the standby is frozen first, so it cannot take over in the instant
    // between the two kills (it would then ask for a new standby, and no successor would be
    // needed).
    signal(standby, Signal::SIGSTOP);
    signal(coordinator, Signal::SIGKILL);
    signal(standby, Signal::SIGKILL);
    let after = wait_new_coordinator(&stack, &[coordinator, standby]);
    for id in ["db", "api"] {
        assert_eq!(
            service_pid(&after, id),
            service_pid(&before, id),
            "{id} kept its process"
        );
    }
    assert_eq!(
        lines(&log).len(),
        2,
        "nothing was stopped: {:?}",
        lines(&log)
    );
    assert_supervised(&stack);
    // The keeper logs the successor's start after forking it, so the successor can publish
    // (and the waits above end) before the line is written: poll for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log_text = stack.coordinator_log();
        if log_text.contains("started a new coordinator to adopt the stack") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log_text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn without_a_standby_a_dead_coordinator_is_replaced() {
    let (stack, log, before) = two_tier("no-standby", "[coordinator]\nstandby = false");
    let coordinator = pid(&before["coordinator"]).unwrap();
    signal(coordinator, Signal::SIGKILL);
    wait_new_coordinator(&stack, &[coordinator]);
    assert_eq!(
        lines(&log).len(),
        2,
        "nothing was stopped: {:?}",
        lines(&log)
    );
    assert_supervised(&stack);
}

/// `ccmgr start --foreground`, killed and reaped on drop.
struct Foreground(Child);

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn foreground_both_killed_at_once_a_new_coordinator_adopts_the_stack() {
    let stack = Stack::new("both-killed-fg", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    let mut foreground = Foreground(
        Command::new(CCMGR)
            .arg("--config")
            .arg(stack.path().join("ccmgr.toml"))
            .args(["start", "--foreground"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let before = stack
        .wait_for("a steady stack with a standby", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| s["state"] == "steady" && pid(&s["standby"]).is_some())
        })
        .unwrap();
    let coordinator = pid(&before["coordinator"]).unwrap();
    let standby = pid(&before["standby"]).unwrap();
    // Frozen first, so the standby cannot take over between the two kills.
    signal(standby, Signal::SIGSTOP);
    signal(coordinator, Signal::SIGKILL);
    signal(standby, Signal::SIGKILL);
    wait_new_coordinator(&stack, &[coordinator, standby]);
    assert!(
        foreground.0.try_wait().unwrap().is_none(),
        "the foreground keeper stayed"
    );
    assert_eq!(
        lines(&log).len(),
        2,
        "nothing was stopped: {:?}",
        lines(&log)
    );
    assert_supervised(&stack);
    // And the foreground stack still stops in order on SIGTERM, through its new coordinator.
    signal(foreground.0.id() as i32, Signal::SIGTERM);
    let status = foreground.0.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        stack.coordinator_log()
    );
    let l = lines(&log);
    assert_eq!(&l[l.len() - 2..], ["stop api", "stop db"], "{l:?}");
}

#[test]
fn when_successors_keep_dying_the_keeper_stops_the_stack_in_order() {
    let stack = Stack::new("successors-die", "[coordinator]\nstandby = false", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    // api takes half a second to stop and says so at the end: were db signalled at the same
    // time, its line would come first.
    stack.write_service(
        "api",
        &format!(
            r#"command = ["sh", "-c", "echo start api >> {log}; trap 'sleep 0.5; echo stop api >> {log}; exit 0' TERM; while :; do sleep 1; done"]
requires = ["db"]
shutdown_timeout = "5s"
"#
        ),
    );
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let keeper = pid(&status["keeper"]).unwrap();
    let mut killed = Vec::new();
    // Kill the coordinator, then every successor (even before it takes over) as it shows up.
    while killed.len() < keeper_successor_limit() + 1 {
        let deadline = Instant::now() + LONG;
        let victim = loop {
            let s = stack.status();
            let found = s.as_ref().and_then(|s| {
                [pid(&s["coordinator"]), pid(&s["standby"])]
                    .into_iter()
                    .flatten()
                    .find(|p| !killed.contains(p) && Stack::alive(*p))
            });
            if let Some(p) = found {
                break p;
            }
            assert!(Instant::now() < deadline, "no new coordinator showed up");
            std::thread::sleep(Duration::from_millis(5));
        };
        signal(victim, Signal::SIGKILL);
        killed.push(victim);
    }
    // api takes at least half a second to stop: meanwhile `status` shows the keeper's stop.
    let during = stack.wait_for("the keeper's stop to show", LONG, |s| {
        s.is_none() || s.as_ref().is_some_and(|s| s["state"] == "stopping")
    });
    assert!(during.is_some(), "the stop was over before status saw it");
    let deadline = Instant::now() + LONG;
    while Stack::alive(keeper) {
        assert!(
            Instant::now() < deadline,
            "the keeper never finished its stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let l = lines(&log);
    assert_eq!(
        &l[l.len() - 2..],
        ["stop api", "stop db"],
        "stopped in shutdown order: {l:?}"
    );
    let own_log = stack.coordinator_log();
    assert!(own_log.contains("coordinators keep dying"), "{own_log}");
    assert!(stack.status().is_none(), "fully stopped");
    let human = text(&stack.ccmgr(&["status"]));
    assert!(human.contains("last run: stopped by the keeper"), "{human}");
}

fn keeper_successor_limit() -> usize {
    ccmgr::keeper::SUCCESSOR_LIMIT
}

#[test]
fn the_process_record_follows_the_processes_and_goes_with_the_stack() {
    let (stack, _log, status) = two_tier("record", "");
    let path = ccmgr::records::record_path(&stack.path().join("run"), &stack.instance);
    let read = || {
        ccmgr::records::ProcessRecord::read(&path)
            .unwrap()
            .expect("a record")
    };
    // The keeper writes the record once a burst of changes has settled (a few ms after the
    // standby's start): poll until it names the standby.
    let deadline = Instant::now() + LONG;
    let record = loop {
        let record = ccmgr::records::ProcessRecord::read(&path).unwrap();
        match record {
            Some(r) if r.standby.map(|s| s.pid) == pid(&status["standby"]) => break r,
            other => assert!(Instant::now() < deadline, "record: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(record.keeper.map(|r| r.pid), pid(&status["keeper"]));
    assert_eq!(
        record.coordinator.map(|r| r.pid),
        pid(&status["coordinator"])
    );
    assert_eq!(record.standby.map(|r| r.pid), pid(&status["standby"]));
    let ids: Vec<&str> = record.services.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["api", "db"], "in shutdown order");
    assert_eq!(record.services[1].process.pid, stack.pid_of("db").unwrap());
    assert_eq!(record.services[1].stop_signal, Signal::SIGTERM as i32);
    assert!(record.survivors().len() == 5, "{record:?}");
    // A restarted service is recorded under its new process.
    let db = stack.pid_of("db").unwrap();
    signal(db, Signal::SIGKILL);
    stack.wait_for("db restarted", LONG, |s| {
        s.as_ref().is_some_and(|s| up_anew(s, "db", db))
    });
    let deadline = Instant::now() + LONG;
    loop {
        let new_db = stack.pid_of("db").unwrap();
        let record = read();
        if record.services.iter().any(|s| s.process.pid == new_db) {
            assert!(!record.services.iter().any(|s| s.process.pid == db));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "record never updated: {record:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!path.exists(), "the record went with the stack");
}

#[test]
fn a_standby_that_keeps_dying_is_given_up_on_and_status_says_so() {
    let (stack, _log, mut status) = two_tier("standby-keeps-dying", "");
    let coordinator = pid(&status["coordinator"]).unwrap();
    for round in 0..5 {
        let standby = pid(&status["standby"]).unwrap();
        signal(standby, Signal::SIGKILL);
        if round == 4 {
            break;
        }
        status = stack
            .wait_for("a new standby", LONG, |s| {
                s.as_ref()
                    .is_some_and(|s| pid(&s["standby"]).is_some_and(|p| p != standby))
            })
            .unwrap();
    }
    let deadline = Instant::now() + LONG;
    loop {
        let human = text(&stack.ccmgr(&["status"]));
        if human.contains("warning: the standby keeps dying") {
            break;
        }
        assert!(Instant::now() < deadline, "no warning: {human}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = stack.status().unwrap();
    assert_eq!(
        pid(&status["standby"]),
        None,
        "no standby is started: {status}"
    );
    assert_eq!(pid(&status["coordinator"]), Some(coordinator));
    let own_log = stack.coordinator_log();
    assert!(own_log.contains("the standby keeps dying"), "{own_log}");
}

#[test]
fn a_standby_that_dies_while_a_give_up_stops_the_stack_is_not_replaced() {
    // db ignores SIGTERM: the stop after the give-up lasts its shutdown timeout, and the
    // standby is killed meanwhile.
    let stack = Stack::new(
        "giveup-standby-dies",
        "[coordinator]\nrestart_retry_counter = 1\nrestart_time_span = \"60s\"",
        &[],
    );
    stack.write_service(
        "db",
        "command = [\"sh\", \"-c\", \"trap '' TERM; exec sleep 100000\"]\nshutdown_timeout = \"3s\"\n",
    );
    stack.write_service(
        "crashy",
        "command = [\"sh\", \"-c\", \"sleep 0.3; exit 7\"]\nrequires = [\"db\"]\nrestart_delay = \"10ms\"\nrestart_delay_max = \"10ms\"\n",
    );
    stack.start_ok();
    let stopping = stack
        .wait_for("the give-up's stop with a standby alive", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| s["state"] == "stopping" && pid(&s["standby"]).is_some())
        })
        .unwrap();
    signal(pid(&stopping["standby"]).unwrap(), Signal::SIGKILL);
    let deadline = Instant::now() + LONG;
    while !stack.coordinator_log().contains("the keeper is done") {
        assert!(Instant::now() < deadline, "{}", stack.coordinator_log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let own_log = stack.coordinator_log();
    // The give-up's stop begins with db's stop signal (the "gave up" line comes at its end).
    let after_give_up: Vec<&str> = own_log
        .lines()
        .skip_while(|l| !l.contains("stopping service=db"))
        .collect();
    assert!(!after_give_up.is_empty(), "{own_log}");
    assert!(
        !after_give_up
            .iter()
            .any(|l| l.contains("starting another") || l.contains("standby started")),
        "a standby was started while the stack was stopping:\n{own_log}"
    );
}

#[test]
fn nothing_starts_once_a_give_up_is_stopping_the_stack() {
    // The end of the standby the keeper stops at the end of the stop can reach the coordinator
    // while it still reads the keeper's socket: it must not start another. The race is
    // narrow, so the give-up is run a few times over, in parallel stacks.
    let runs: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                for round in 0..2 {
                    give_up_once(&format!("giveup-{i}-{round}"));
                }
            })
        })
        .collect();
    for run in runs {
        run.join().unwrap();
    }
}

fn give_up_once(test: &str) {
    let stack = Stack::new(
        test,
        "[coordinator]\nrestart_retry_counter = 1\nrestart_time_span = \"60s\"",
        &[],
    );
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service(
        "crashy",
        "command = [\"sh\", \"-c\", \"sleep 0.3; exit 7\"]\nrequires = [\"db\"]\nrestart_delay = \"10ms\"\nrestart_delay_max = \"10ms\"\n",
    );
    stack.start_ok();
    stack.wait_for("the coordinator to give up", LONG, |s| s.is_none());
    let deadline = Instant::now() + LONG;
    while !stack.coordinator_log().contains("the keeper is done") {
        assert!(Instant::now() < deadline, "{}", stack.coordinator_log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let own_log = stack.coordinator_log();
    // From the give-up on, the stack is stopping. (The keeper usually stops the standby at the
    // end; a standby that saw the coordinator exit first retires by itself.)
    let after_stop: Vec<&str> = own_log
        .lines()
        .skip_while(|l| !l.contains("too many restarts: gave up"))
        .collect();
    assert!(
        !after_stop.is_empty(),
        "the coordinator gave up:\n{own_log}"
    );
    assert!(
        !after_stop.iter().any(|l| l.contains("starting another")
            || l.contains("standby started")
            || l.contains("started a new coordinator")),
        "a standby was started after the stop began:\n{own_log}"
    );
}

#[test]
fn with_a_watchdog_a_frozen_coordinator_is_killed_and_replaced() {
    let (stack, log, before) = two_tier("watchdog", "[coordinator]\nwatchdog = \"1s\"");
    let coordinator = pid(&before["coordinator"]).unwrap();
    let standby = pid(&before["standby"]).unwrap();
    signal(coordinator, Signal::SIGSTOP);
    let after = stack
        .wait_for("the standby to take over from the frozen one", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| pid(&s["coordinator"]) == Some(standby) && s["state"] == "steady")
        })
        .unwrap();
    assert!(
        !Stack::alive(coordinator),
        "the frozen coordinator was killed"
    );
    assert_eq!(
        lines(&log).len(),
        2,
        "nothing was stopped: {:?}",
        lines(&log)
    );
    let own_log = stack.coordinator_log();
    assert!(own_log.contains("no sign of life"), "{own_log}");
    assert_eq!(after["supervised"], true);
    assert_supervised(&stack);
}

/// Voluntary plus involuntary context switches of `pid`: a process that does not wake up
/// does not switch.
fn switches(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("ctxt_switches"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn without_a_watchdog_an_idle_stack_makes_no_wakeups() {
    let (_stack, _log, status) = two_tier("idle", "");
    let parties: Vec<i32> = ["keeper", "coordinator", "standby"]
        .iter()
        .filter_map(|k| pid(&status[*k]))
        .collect();
    assert_eq!(parties.len(), 3);
    // Let the start's last work settle: wait until every party is blocked.
    for &p in &parties[..2] {
        wait_blocked_in_epoll(p);
    }
    let before: Vec<u64> = parties.iter().map(|&p| switches(p)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let after: Vec<u64> = parties.iter().map(|&p| switches(p)).collect();
    assert_eq!(
        before, after,
        "keeper, coordinator, standby woke up while idle"
    );
}

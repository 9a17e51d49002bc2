//! The standby coordinator with real processes: takeover on kill -9 of the coordinator in
//! both modes, in steady state and in the middle of a failure sequence; replacement of a dead
//! standby; a start whose coordinator dies; and `stop` after both are killed.

mod stack_support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{Stack, lines, text, up_anew, wait_lines};

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

fn service_pids(status: &Value) -> Vec<(String, Option<i32>)> {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_owned(), pid(s)))
        .collect()
}

fn sigkill(p: i32) {
    kill(Pid::from_raw(p), Signal::SIGKILL).unwrap();
}

/// A stack of db <- api <- web with a standby, up and steady with its standby recorded.
fn three_tier(test: &str, global: &str) -> (Stack, String, Value) {
    let stack = Stack::new(test, global, &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, "restart_delay = \"0ms\""));
    stack.write_service(
        "api",
        &recorder("api", &log, "requires = [\"db\"]\nrestart_delay = \"0ms\""),
    );
    stack.write_service(
        "web",
        &recorder("web", &log, "requires = [\"api\"]\nrestart_delay = \"0ms\""),
    );
    stack.start_ok();
    let status = stack
        .wait_for("a steady stack with a standby", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| s["state"] == "steady" && pid(&s["standby"]).is_some())
        })
        .unwrap();
    wait_lines(&log, 3, LONG);
    (stack, log, status)
}

#[test]
fn adopt_keeps_every_service_and_the_new_coordinator_handles_later_crashes() {
    let (stack, log, before) = three_tier("adopt", "");
    let coordinator = pid(&before["coordinator"]).unwrap();
    let standby = pid(&before["standby"]).unwrap();
    sigkill(coordinator);
    let after = stack
        .wait_for("the standby to take over with a new standby", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                pid(&s["coordinator"]) == Some(standby)
                    && pid(&s["standby"]).is_some_and(|p| p != standby)
                    && s["state"] == "steady"
            })
        })
        .unwrap();
    assert_eq!(
        service_pids(&after),
        service_pids(&before),
        "every service kept its process"
    );
    assert_eq!(
        lines(&log).len(),
        3,
        "nothing was stopped or started: {:?}",
        lines(&log)
    );
    // From the takeover on, the former standby's lines say it is the coordinator.
    let own_log = stack.coordinator_log();
    let its_lines: Vec<&str> = own_log
        .lines()
        .filter(|l| l.contains(&format!(" pid={standby}}}")))
        .skip_while(|l| !l.contains("the standby took over as coordinator"))
        .collect();
    assert!(!its_lines.is_empty(), "no takeover line:\n{own_log}");
    assert!(
        its_lines.iter().all(|l| l.contains("role=\"coordinator\"")),
        "{its_lines:#?}"
    );
    // The new coordinator watches: a crash of db restarts db, api and web in order.
    let db = pid(&stack.service("db")).unwrap();
    sigkill(db);
    let events = wait_lines(&log, 3 + 5, LONG)[3..].to_vec();
    assert_eq!(
        &events[..2],
        ["stop web", "stop api"],
        "dependents stopped in order"
    );
    stack.wait_steady(LONG);
    let order = stack.start_order();
    assert_eq!(
        &order[order.len() - 3..],
        ["db", "api", "web"],
        "restarted in order"
    );
}

#[test]
fn takeover_restart_stops_and_starts_the_services_in_order() {
    let (stack, log, before) =
        three_tier("takeover-restart", "[coordinator]\ntakeover = \"restart\"");
    let standby = pid(&before["standby"]).unwrap();
    sigkill(pid(&before["coordinator"]).unwrap());
    let events = wait_lines(&log, 3 + 6, LONG)[3..].to_vec();
    assert_eq!(&events[..3], ["stop web", "stop api", "stop db"]);
    let after = stack.wait_steady(LONG);
    let order = stack.start_order();
    assert_eq!(
        &order[order.len() - 3..],
        ["db", "api", "web"],
        "started again in order"
    );
    assert_eq!(pid(&after["coordinator"]), Some(standby));
    for ((id, old), (_, new)) in service_pids(&before).into_iter().zip(service_pids(&after)) {
        assert_ne!(old, new, "{id} was restarted");
    }
}

#[test]
fn a_dead_standby_is_replaced() {
    let (stack, _log, before) = three_tier("standby-dies", "");
    let standby = pid(&before["standby"]).unwrap();
    sigkill(standby);
    stack.wait_for("a new standby", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| pid(&s["standby"]).is_some_and(|p| p != standby))
    });
    let after = stack.status().unwrap();
    assert_eq!(pid(&after["coordinator"]), pid(&before["coordinator"]));
    assert_eq!(service_pids(&after), service_pids(&before));
}

#[test]
fn after_both_are_killed_a_successor_adopts_and_stop_leaves_nothing() {
    let (stack, log, before) = three_tier("both-die", "");
    let coordinator = pid(&before["coordinator"]).unwrap();
    let standby = pid(&before["standby"]).unwrap();
    sigkill(standby);
    sigkill(coordinator);
    // The keeper starts a successor, which adopts the stack (tests/keeper.rs proves it stays
    // supervised); `stop` through it must leave nothing.
    stack.wait_for("a successor to adopt the stack", LONG, |s| {
        s.as_ref().is_some_and(|s| {
            pid(&s["coordinator"]).is_some_and(|c| c != coordinator && c != standby)
                && s["state"] == "steady"
        })
    });
    let services: Vec<i32> = service_pids(&before)
        .into_iter()
        .filter_map(|(_, p)| p)
        .collect();
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for p in services {
        assert!(!Stack::alive(p), "service {p} outlived stop");
    }
    assert!(!Stack::alive(standby) && !Stack::alive(coordinator));
    assert!(stack.status().is_none());
    let l = lines(&log);
    assert_eq!(
        &l[l.len() - 3..],
        ["stop web", "stop api", "stop db"],
        "in shutdown order"
    );
}

#[test]
fn a_coordinator_killed_in_the_middle_of_a_failure_sequence_is_finished_by_the_standby() {
    // db restarts only after a 1.5 s delay: kill the coordinator while it waits.
    let stack = Stack::new("mid-failure", "", &[]);
    let log = stack.file("events.log");
    stack.write_service(
        "db",
        &recorder(
            "db",
            &log,
            "restart_delay = \"1500ms\"\nrestart_delay_max = \"1500ms\"",
        ),
    );
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    stack.start_ok();
    let before = stack
        .wait_for("a standby", LONG, |s| {
            s.as_ref().is_some_and(|s| pid(&s["standby"]).is_some())
        })
        .unwrap();
    // Let db run a moment so that its restart is not immediate; then crash it at once.
    std::thread::sleep(Duration::from_millis(50));
    sigkill(pid(&stack.service("db")).unwrap());
    stack.wait_for("the failure sequence to begin", LONG, |s| {
        s.as_ref().is_some_and(|s| s["state"] == "recovery")
    });
    sigkill(pid(&before["coordinator"]).unwrap());
    let after = stack.wait_steady(LONG);
    assert_eq!(pid(&after["coordinator"]), pid(&before["standby"]));
    let events = lines(&log);
    assert_eq!(events[2], "stop api", "{events:?}");
    let order = stack.start_order();
    assert_eq!(
        &order[order.len() - 2..],
        ["db", "api"],
        "finished the failure sequence in order"
    );
}

#[test]
fn a_coordinator_killed_during_startup_leaves_the_stack_fully_stopped_with_a_reason() {
    // `slow` says READY=1 only when a file appears; the test kills the coordinator meanwhile.
    let stack = Stack::new("mid-startup", "", &[]);
    let log = stack.file("events.log");
    let gate = stack.file("gate");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service(
        "slow",
        &format!(
            r#"command = ["sh", "-c", "while [ ! -e {gate} ]; do sleep 0.02; done; exec sleep 1000"]
ready = "notify"
requires = ["db"]
startup_timeout = "30s"
"#
        ),
    );
    let config = stack.path().join("ccmgr.toml");
    let start = std::thread::spawn(move || {
        std::process::Command::new(stack_support::CCMGR)
            .arg("--config")
            .arg(config)
            .arg("start")
            .output()
            .unwrap()
    });
    let status = stack.wait_for("slow to be starting", LONG, |s| {
        s.as_ref().is_some_and(|s| {
            s["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["id"] == "slow" && x["state"] == "starting")
        })
    });
    let coordinator = pid(&status.unwrap()["coordinator"]).unwrap();
    sigkill(coordinator);
    let out = start.join().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("died during startup"), "{t}");
    assert!(stack.status().is_none(), "fully stopped");
    assert_eq!(lines(&log), ["start db", "stop db"]);
}

/// The standby processes of `instance` other than `coordinator` (a promoted standby keeps
/// its command line), counted from /proc by their own instance name, never acted on by name.
fn standby_processes(instance: &str, coordinator: i32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
                .is_some_and(|p| p != coordinator)
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&format!("--instance {instance} internal standby")))
        .count()
}

#[test]
fn repeated_takeovers_keep_exactly_one_standby() {
    // Regression: when the standby's takeover reached the keeper before the dead coordinator
    // was reaped, the keeper reported that coordinator as a dead standby, and a second
    // standby was started.
    let (stack, _log, mut status) = three_tier("repeated", "");
    let services = service_pids(&status);
    for _ in 0..8 {
        let standby = pid(&status["standby"]).unwrap();
        sigkill(pid(&status["coordinator"]).unwrap());
        status = stack
            .wait_for(
                "the standby to take over and a new one to be recorded",
                LONG,
                |s| {
                    s.as_ref().is_some_and(|s| {
                        pid(&s["coordinator"]) == Some(standby)
                            && pid(&s["standby"]).is_some_and(|p| p != standby)
                    })
                },
            )
            .unwrap();
    }
    assert_eq!(
        service_pids(&status),
        services,
        "every service kept its process through 8 takeovers"
    );
    // Give a wrongly started second standby time to show up before counting.
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        let coordinator = pid(&status["coordinator"]).unwrap();
        assert_eq!(standby_processes(&stack.instance, coordinator), 1);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The restart window the coordinator published: (restarts in it, its start in monotonic ms).
fn published_window(stack: &Stack) -> (u32, u64) {
    let segment = ccmgr::shm::Segment::open(&stack.run_dir(), &stack.instance).unwrap();
    let instance = segment.instance_status().unwrap();
    (instance.restarts_in_window, instance.window_start_ms)
}

/// SIGKILLs service `id` and waits until it runs again under a new pid.
fn crash_and_wait_for_restart(stack: &Stack, id: &str) {
    let old = pid(&stack.service(id)).unwrap();
    sigkill(old);
    stack.wait_for(&format!("{id} to be restarted"), LONG, |s| {
        s.as_ref()
            .is_some_and(|s| s["state"] == "steady" && up_anew(s, id, old))
    });
}

#[test]
fn a_takeover_keeps_the_restart_window_where_it_began() {
    // The window is published on the monotonic clock and the successor goes on with it: same
    // start, same count. (Restarting the window at the takeover would keep counting restarts
    // whose span has run out, and give up on a service the policy would still restart.)
    let (stack, _log, before) = three_tier("window", "[coordinator]\nrestart_time_span = \"1h\"");
    crash_and_wait_for_restart(&stack, "web");
    crash_and_wait_for_restart(&stack, "web");
    let (count, start) = published_window(&stack);
    assert_eq!(count, 2);

    let standby = pid(&stack.status().unwrap()["standby"]).unwrap();
    sigkill(pid(&before["coordinator"]).unwrap());
    stack.wait_for("the standby to take over", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| pid(&s["coordinator"]) == Some(standby) && s["state"] == "steady")
    });
    assert_eq!(
        published_window(&stack),
        (2, start),
        "the successor's window"
    );
    crash_and_wait_for_restart(&stack, "web");
    assert_eq!(
        published_window(&stack),
        (3, start),
        "counted in the same window"
    );
}

//! The service API end to end, through the real `ccmgr` binary: services built on it (the
//! Rust example twice and the C example) shut down in shutdown order through the API on
//! `ccmgr stop`; after a kill -9 of the coordinator they shut down in order by themselves
//! under `takeover = "restart"` (and are started again by the standby), and keep running
//! under `takeover = "adopt"`, until `ccmgr stop` shuts them down in order.

mod api_support;
mod stack_support;

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{Stack, lines, steady_and_all_up, text};

const LONG: Duration = Duration::from_secs(30);

/// db (Rust) <- api (C) <- web (Rust), all using the service API, logging to `api.log`.
fn api_stack(test: &str, global: &str) -> (Stack, String) {
    let built = api_support::artifacts();
    let stack = Stack::new(test, global, &[]);
    let log = stack.file("api.log");
    let service = |program: &std::path::Path, requires: &str| {
        format!(
            "command = [\"{}\", \"--log\", \"{log}\"]\ncc_arg = true\nready = \"cc\"\nenv = {{ CC_SERVICE_HEARTBEAT_MS = \"60000\" }}\n{requires}\nshutdown_timeout = \"5s\"\n",
            program.display()
        )
    };
    stack.write_service("db", &service(&built.rust_service, ""));
    stack.write_service("api", &service(&built.c_service, "requires = [\"db\"]"));
    stack.write_service("web", &service(&built.rust_service, "requires = [\"api\"]"));
    (stack, log)
}

/// The ids of the `shutdown <id> ...` lines, in the order the callbacks finished.
fn shutdowns(log: &str) -> Vec<String> {
    lines(log)
        .into_iter()
        .filter(|l| l.starts_with("shutdown "))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

fn wait_shutdowns(log: &str, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let s = shutdowns(log);
        if s.len() >= n {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {s:?} shut down; log: {:?}",
            lines(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid(v: &Value) -> Option<i32> {
    v["pid"].as_i64().map(|p| p as i32)
}

fn service_pids(status: &Value) -> Vec<Option<i32>> {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(pid)
        .collect()
}

fn with_standby(stack: &Stack) -> Value {
    stack
        .wait_for("a steady stack with a standby", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| steady_and_all_up(s) && pid(&s["standby"]).is_some())
        })
        .unwrap()
}

#[test]
fn stop_shuts_api_services_down_in_order_through_the_api() {
    let (stack, log) = api_stack("api-stop", "");
    stack.start_ok();
    with_standby(&stack);
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        shutdowns(&log),
        ["web", "api", "db"],
        "in shutdown order, through their callbacks"
    );
    let clog = stack.coordinator_log();
    assert!(
        !clog.contains("stopping service="),
        "no API service got a stop signal:\n{clog}"
    );
    assert!(
        !clog.contains("killing its process group"),
        "none had to be killed:\n{clog}"
    );
}

#[test]
fn takeover_restart_api_services_shut_down_in_order_by_themselves_then_restart() {
    let (stack, log) = api_stack("api-restart", "[coordinator]\ntakeover = \"restart\"");
    stack.start_ok();
    let before = with_standby(&stack);
    kill(
        Pid::from_raw(pid(&before["coordinator"]).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    // In order, whether a service saw the death itself or the standby (taking over within a
    // millisecond) asked it first: both lead through the protocol.
    assert_eq!(wait_shutdowns(&log, 3), ["web", "api", "db"]);
    // The standby, now coordinator, starts them again in order.
    let after = with_standby(&stack);
    assert_eq!(pid(&after["coordinator"]), pid(&before["standby"]));
    for (old, new) in service_pids(&before).into_iter().zip(service_pids(&after)) {
        assert_ne!(old, new, "restarted");
    }
    let order = stack.start_order();
    assert_eq!(&order[order.len() - 3..], ["db", "api", "web"]);
}

#[test]
fn takeover_adopt_api_services_keep_running_until_the_new_coordinator_stops_them() {
    let (stack, log) = api_stack("api-adopt", "");
    stack.start_ok();
    let before = with_standby(&stack);
    kill(
        Pid::from_raw(pid(&before["coordinator"]).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let after = stack
        .wait_for("the standby to take over", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                pid(&s["coordinator"]) == pid(&before["standby"]) && pid(&s["standby"]).is_some()
            })
        })
        .unwrap();
    assert_eq!(
        service_pids(&after),
        service_pids(&before),
        "every API service kept running"
    );
    // Give a wrongful shutdown time to show before checking there was none.
    std::thread::sleep(Duration::from_millis(300));
    assert!(shutdowns(&log).is_empty(), "{:?}", lines(&log));
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        shutdowns(&log),
        ["web", "api", "db"],
        "the new coordinator stops them in order"
    );
}

#[test]
fn stop_after_the_coordinator_died_with_no_standby_goes_through_the_api() {
    let (stack, log) = api_stack("api-orphans", "[coordinator]\nstandby = false");
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    kill(
        Pid::from_raw(pid(&status["coordinator"]).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    // No standby: the keeper starts a successor, which adopts the stack.
    let dead = pid(&status["coordinator"]);
    stack.wait_for("a successor to adopt the stack", LONG, |s| {
        s.as_ref().is_some_and(|s| {
            pid(&s["coordinator"]).is_some_and(|c| Some(c) != dead) && s["state"] == "steady"
        })
    });
    // adopt (the default): the services are still up, under the new coordinator.
    assert!(shutdowns(&log).is_empty());
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        shutdowns(&log),
        ["web", "api", "db"],
        "the successor's stop asked them in order"
    );
    for p in service_pids(&status).into_iter().flatten() {
        assert!(!Stack::alive(p));
    }
}

#[test]
fn with_no_one_to_take_over_the_coordinators_death_alone_shuts_them_down_in_order() {
    // FIG. 12 as in the original design: takeover = "restart", no standby. The kernel marks the
    // dead coordinator's daemon component; the services see it and shut down in turn with no
    // coordinator alive.
    let (stack, log) = api_stack(
        "api-fig12",
        "[coordinator]\ntakeover = \"restart\"\nstandby = false",
    );
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    kill(
        Pid::from_raw(pid(&status["coordinator"]).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait_shutdowns(&log, 3), ["web", "api", "db"]);
    // Every service logs why its turn came (the C one through ccmgr_shutdown_reason).
    let reasons: Vec<String> = lines(&log)
        .into_iter()
        .filter(|l| l.starts_with("shutdown "))
        .collect();
    assert_eq!(reasons.len(), 3);
    assert!(
        reasons.iter().all(|l| l.ends_with("coordinator-died")),
        "the death alone asked them: {reasons:?}"
    );
    for p in service_pids(&status).into_iter().flatten() {
        let deadline = std::time::Instant::now() + LONG;
        while Stack::alive(p) {
            assert!(
                std::time::Instant::now() < deadline,
                "{p} did not exit after its callback"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

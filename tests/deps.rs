//! The dependency kinds `wants` and `before` through the real `ccmgr` binary: a wanted service
//! that fails to start leaves its dependent up (and does not keep it from starting), and
//! `before`, written in the file of the service that comes first, orders exactly as the
//! mirrored `after` does, at start and at stop. Each test runs its own instance in its own
//! directory; the `Stack` guard stops and reaps everything even when a test fails.

mod stack_support;

use std::time::Duration;

use stack_support::{Stack, service_of, text, wait_lines};

const LONG: Duration = Duration::from_secs(20);

/// A service that appends "start <id>" to `log` when it starts and "stop <id>" when SIGTERM
/// ends it, and otherwise sleeps.
fn recorder(id: &str, log: &str, deps: &str) -> String {
    format!(
        r#"command = ["sh", "-c", "echo start {id} >> {log}; trap 'echo stop {id} >> {log}; exit 0' TERM; while :; do sleep 1; done"]
{deps}
"#
    )
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn pid_in(status: &serde_json::Value, id: &str) -> Option<i32> {
    service_of(status, id)["pid"].as_i64().map(|p| p as i32)
}

#[test]
fn a_wanted_service_that_fails_and_stays_down_leaves_its_dependent_running() {
    let stack = Stack::new("wants-down", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("metrics", &recorder("metrics", &log, "restart = \"never\""));
    stack.write_service("web", &recorder("web", &log, "wants = [\"metrics\"]"));
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let web = pid_in(&status, "web").unwrap();
    kill9(pid_in(&status, "metrics").unwrap());
    // The failure is handled in one pass of the engine: a web taken down with metrics (as
    // `requires` would) is already stopping in the status that shows metrics failed.
    let status = stack
        .wait_for("metrics failed", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| service_of(s, "metrics")["state"] == "failed")
        })
        .unwrap();
    assert_eq!(service_of(&status, "web")["state"], "up", "{status}");
    assert_eq!(pid_in(&status, "web"), Some(web), "web kept its process");
    assert!(Stack::alive(web));
    assert_eq!(status["state"], "steady", "{status}");
    assert!(
        !stack_support::lines(&log).contains(&"stop web".to_owned()),
        "web was never told to stop"
    );
}

#[test]
fn a_wanted_service_that_fails_to_start_does_not_keep_its_dependent_down() {
    // db <- metrics (requires), db <- web (requires), web wants metrics. kill -9 db takes both
    // down and starts them again; metrics' new start fails (it exits at once, before its
    // min_uptime) and, restart = "never", it stays down. web starts anyway and stays up.
    let stack = Stack::new("wants-fails", "", &[]);
    let log = stack.file("events.log");
    let marker = stack.file("metrics-ran");
    stack.write_service("db", &recorder("db", &log, "restart_delay = \"0ms\""));
    stack.write_service(
        "metrics",
        &format!(
            r#"command = ["sh", "-c", "if [ -e {marker} ]; then echo metrics fails >> {log}; exit 1; fi; touch {marker}; exec sleep 1000"]
requires = ["db"]
restart = "never"
min_uptime = "300ms"
"#
        ),
    );
    stack.write_service(
        "web",
        &recorder("web", &log, "requires = [\"db\"]\nwants = [\"metrics\"]"),
    );
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let web = pid_in(&status, "web").unwrap();
    kill9(pid_in(&status, "db").unwrap());
    let status = stack
        .wait_for("web up again, metrics failed", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                s["state"] == "steady"
                    && service_of(s, "metrics")["state"] == "failed"
                    && service_of(s, "web")["state"] == "up"
                    && pid_in(s, "web").is_some_and(|p| p != web)
            })
        })
        .unwrap();
    assert_eq!(service_of(&status, "db")["state"], "up", "{status}");
    assert!(Stack::alive(pid_in(&status, "web").unwrap()));
    assert!(
        stack_support::lines(&log).contains(&"metrics fails".to_owned()),
        "metrics' second start failed"
    );
    let order = stack.start_order();
    assert_eq!(
        order.iter().filter(|s| *s == "metrics").count(),
        2,
        "metrics started twice: {order:?}"
    );
}

/// Starts and stops a stack where `x` must start before `web` (declared by `declare`: either
/// `before` in x's file or `after` in web's), and returns the coordinator's start order and
/// the stop lines the services wrote.
fn start_and_stop_order(name: &str, x_before_web: bool) -> (Vec<String>, Vec<String>) {
    let stack = Stack::new(name, "", &[]);
    let log = stack.file("events.log");
    // Unordered, web would start first (same level, ids in order) and x would stop first.
    // x is up only once it has run 300 ms, so web's start proves it waited.
    let (x_deps, web_deps) = if x_before_web {
        ("before = [\"web\"]\nmin_uptime = \"300ms\"", "")
    } else {
        ("min_uptime = \"300ms\"", "after = [\"x\"]")
    };
    stack.write_service("x", &recorder("x", &log, x_deps));
    stack.write_service("web", &recorder("web", &log, web_deps));
    let check = stack.ccmgr(&["check"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(
        text(&check).contains("startup sequence: x, web\n"),
        "{}",
        text(&check)
    );
    stack.start_ok();
    stack.wait_steady(LONG);
    wait_lines(&log, 2, LONG);
    let started = stack.start_order();
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stops = stack_support::lines(&log)
        .into_iter()
        .filter(|l| l.starts_with("stop "))
        .collect();
    (started, stops)
}

#[test]
fn before_orders_as_the_mirrored_after_does() {
    let (started, stopped) = start_and_stop_order("before", true);
    assert_eq!(started, ["x", "web"]);
    assert_eq!(stopped, ["stop web", "stop x"]);
    let mirrored = start_and_stop_order("mirrored-after", false);
    assert_eq!((started, stopped), mirrored);
}

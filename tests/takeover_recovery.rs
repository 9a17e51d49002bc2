//! A coordinator killed in the middle of a failure sequence: the standby must finish the same
//! sequence, in order, with the deadlines the dead coordinator had set (issue 8, defect 1).
//!
//! `base`; `mid` requires base; `top` requires mid, ignores SIGTERM and has a 4 s shutdown
//! timeout. base is killed, so top is told to stop (and will not), mid waits for it, base waits
//! for mid. One second in, the coordinator is killed. The successor must kill top at its
//! original deadline (4 s after the SIGTERM, not 4 s after the takeover), then stop mid, then
//! start base, mid and top in that order. Before the fix it restarted base at once while top
//! was still stopping, and kept the mid from before the failure under the new base.

mod stack_support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{Stack, lines, wait_lines};

const LONG: Duration = Duration::from_secs(30);

/// A service that logs its start and its SIGTERM, and exits at SIGTERM unless `stubborn`.
fn recorder(id: &str, log: &str, stubborn: bool, rest: &str) -> String {
    let on_term = if stubborn {
        format!("echo term {id} >> {log}")
    } else {
        format!("echo stop {id} >> {log}; exit 0")
    };
    format!(
        r#"command = ["sh", "-c", "echo start {id} $$ >> {log}; trap '{on_term}' TERM; while :; do sleep 1; done"]
restart_delay = "0ms"
{rest}
"#
    )
}

fn pid(v: &Value) -> Option<i32> {
    v["pid"].as_i64().map(|p| p as i32)
}

fn service<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()
}

/// Polls until `pid` is gone (or a zombie), returning when that was seen.
fn wait_gone(pid: i32, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    while Stack::alive(pid) {
        assert!(Instant::now() < deadline, "pid {pid} is still alive");
        std::thread::sleep(Duration::from_millis(5));
    }
    Instant::now()
}

/// The events of the log from the first line equal to `from` on, without the pids.
fn events_from(log: &str, from: &str) -> Vec<String> {
    lines(log)
        .into_iter()
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .skip_while(|l| l != from)
        .collect()
}

fn failure_sequence_survives_the_coordinators_death(test: &str, takeover: &str) {
    let stack = Stack::new(
        test,
        &format!("[coordinator]\ntakeover = \"{takeover}\""),
        &[],
    );
    let log = stack.file("events.log");
    stack.write_service("base", &recorder("base", &log, false, ""));
    stack.write_service(
        "mid",
        &recorder("mid", &log, false, "requires = [\"base\"]"),
    );
    stack.write_service(
        "top",
        &recorder(
            "top",
            &log,
            true,
            "requires = [\"mid\"]\nshutdown_timeout = \"4s\"",
        ),
    );
    stack.start_ok();
    let before = stack
        .wait_for("a steady stack with a standby", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| s["state"] == "steady" && pid(&s["standby"]).is_some())
        })
        .unwrap();
    wait_lines(&log, 3, LONG);
    let [base0, mid0, top0] = ["base", "mid", "top"].map(|id| pid(service(&before, id)).unwrap());
    let coordinator = pid(&before["coordinator"]).unwrap();
    let standby = pid(&before["standby"]).unwrap();

    kill(Pid::from_raw(base0), Signal::SIGKILL).unwrap();
    // top got its SIGTERM (it says so): its kill deadline is 4 s from now.
    let term_lines = wait_lines(&log, 4, LONG);
    let sigterm_at = Instant::now();
    assert!(
        term_lines.iter().any(|l| l == "term top"),
        "top was told to stop first: {term_lines:?}"
    );
    // One second into the stop, the coordinator dies.
    std::thread::sleep(Duration::from_secs(1));
    kill(Pid::from_raw(coordinator), Signal::SIGKILL).unwrap();

    // top is killed at its original deadline (4 s after the SIGTERM), not at a fresh one
    // (5 s after it): the successor loaded the deadline.
    let top_gone = wait_gone(top0, LONG);
    let took = top_gone.duration_since(sigterm_at);
    assert!(
        took < Duration::from_millis(4_600),
        "top was killed {took:?} after its SIGTERM, not at its original 4 s deadline"
    );
    let after = stack.wait_steady(LONG);
    assert_eq!(
        pid(&after["coordinator"]),
        Some(standby),
        "the standby took over"
    );

    // The same failure sequence, finished in order: top down, then mid (the services' own
    // lines: mid is signalled only once top has ended), then base, mid and top up again in
    // startup order (the coordinator's "started" lines: a service's own "start" line is no
    // proof of order, as a dependent may print before its dependency's shell does).
    let stops: Vec<String> = events_from(&log, "term top")
        .into_iter()
        .filter(|e| !e.starts_with("start "))
        .collect();
    assert_eq!(stops, ["term top", "stop mid"], "top went down before mid");
    let started = stack.start_order();
    assert_eq!(
        started[started.len().saturating_sub(3)..],
        ["base", "mid", "top"],
        "then base, mid and top started again, in order: {started:?}"
    );
    // Every service runs a new process, alive, as status says; the old ones are gone.
    for (id, old) in [("base", base0), ("mid", mid0), ("top", top0)] {
        let now = pid(service(&after, id)).unwrap();
        assert_ne!(now, old, "{id} was restarted: {after}");
        assert!(Stack::alive(now), "{id} (pid {now}) runs");
        assert!(!Stack::alive(old), "{id}'s old process (pid {old}) is gone");
    }
    let recorded: Vec<i32> = lines(&log)
        .iter()
        .filter_map(|l| l.strip_prefix("start mid "))
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(
        recorded.last().copied(),
        pid(service(&after, "mid")),
        "the mid that runs is the one started last"
    );
    assert_eq!(service(&after, "base")["restarts"], 1, "{after}");
    assert!(
        stack
            .coordinator_log()
            .contains("the standby took over as coordinator"),
        "the log says the standby took over"
    );
}

#[test]
fn adopt_finishes_a_failure_sequence_cut_short_in_order() {
    failure_sequence_survives_the_coordinators_death("recovery-adopt", "adopt");
}

#[test]
fn restart_finishes_a_failure_sequence_cut_short_in_order() {
    failure_sequence_survives_the_coordinators_death("recovery-restart", "restart");
}

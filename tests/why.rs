//! The "why" view through the real binary (issue 10, item 5): `status SERVICE...` explains a
//! service that is not up in one sentence, with its last log lines; the table has the same
//! reasons; plain text when stdout is no terminal; an unknown service is bad usage with a
//! "did you mean".

mod stack_support;

use std::time::Duration;

use stack_support::{Running, Stack, service_of, text};

#[test]
fn status_explains_why_a_service_is_not_up() {
    let stack = Stack::new(
        "why",
        "",
        &[
            (
                // Never says READY=1: starting for its whole timeout.
                "db",
                "command = [\"sh\", \"-c\", \"echo db is warming up; exec sleep 100000\"]\nready = \"notify\"\nstartup_timeout = \"60s\"\n",
            ),
            (
                "web",
                "command = [\"sleep\", \"100000\"]\nrequires = [\"db\"]\n",
            ),
        ],
    );
    let _start = Running::spawn(&stack, &["start"]);
    stack.wait_for("db starting", Duration::from_secs(10), |s| {
        s.as_ref()
            .is_some_and(|s| service_of(s, "db")["pid"].as_i64().is_some())
    });
    // Its log line is written by then or soon after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let explained = loop {
        let out = stack.ccmgr(&["status", "db", "web"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.contains("db is warming up") {
            break stdout;
        }
        assert!(std::time::Instant::now() < deadline, "{stdout}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        explained.contains("db: starting: not ready yet (")
            && explained.contains("of its 60 s startup timeout) (pid "),
        "{explained}"
    );
    assert!(
        explained.contains("web: stopped: waiting for db (starting)"),
        "{explained}"
    );
    assert!(explained.contains("  | db is warming up"), "{explained}");
    assert!(
        !explained.contains('\x1b'),
        "no colour into a pipe: {explained:?}"
    );

    // The table carries the same reasons.
    let table = String::from_utf8_lossy(&stack.ccmgr(&["status"]).stdout).into_owned();
    assert!(table.contains("WHY"), "{table}");
    assert!(table.contains("waiting for db (starting)"), "{table}");
    let json = stack.status().unwrap();
    assert_eq!(
        service_of(&json, "web")["reason"],
        "waiting for db (starting)"
    );

    // A typo is bad usage, with the likely name.
    let out = stack.ccmgr(&["status", "wbe"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("did you mean `web`?"), "{}", text(&out));
    let _ = stack.stop();
}

#[test]
fn a_failed_service_says_how_it_ended() {
    let stack = Stack::new(
        "why-failed",
        "",
        &[
            ("anchor", "command = [\"sleep\", \"100000\"]\n"),
            (
                "once",
                "command = [\"sh\", \"-c\", \"sleep 0.3; echo giving up >&2; exit 4\"]\nrestart = \"never\"\n",
            ),
        ],
    );
    stack.start_ok();
    stack.wait_for("once failed", Duration::from_secs(10), |s| {
        s.as_ref()
            .is_some_and(|s| service_of(s, "once")["state"] == "failed")
    });
    let out = stack.ccmgr(&["status", "once"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("once: failed: exited with status 4"),
        "{stdout}"
    );
    assert!(stdout.contains("giving up"), "{stdout}");
    let _ = stack.stop();
}

/// `status SERVICE` reads the service's last log lines as `start`'s failure report does: a
/// FIFO found at the log's name (planted by whoever may write `log_dir`) neither hangs it
/// (an open for reading waits for a writer) nor is read.
#[test]
fn a_fifo_at_the_log_name_does_not_hang_status() {
    let stack = Stack::new(
        "why-fifo",
        "",
        &[("web", "command = [\"sleep\", \"100000\"]\n")],
    );
    stack.start_ok();
    stack.wait_steady(Duration::from_secs(10));
    let log = stack.log_dir().join("web.log");
    std::fs::remove_file(&log).unwrap();
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = Running::spawn(&stack, &["status", "web"]).finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("web: up"), "{}", text(&out));
    let _ = stack.stop();
}

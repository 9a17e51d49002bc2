//! `ccmgr logs` through the real binary: the last lines (`-n`, also reaching into the rotated
//! file), several services prefixed with their names, ccmgr's own log, an unknown service, and
//! `-f` following a service's output across a rotation of its log (4 MiB written after the
//! follower started: every line arrives once, in order), and `RUST_LOG` choosing what ccmgr
//! writes to its own log (a level, a level per module path). Each test runs its own instance in
//! its own directory; the guards stop and reap everything even when a test fails.

mod stack_support;

use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stack_support::{Running, Stack, ccmgr_bin, text};

const LONG: Duration = Duration::from_secs(30);

/// The lines of `ccmgr logs ARGS` (which must exit 0).
fn logs(stack: &Stack, args: &[&str]) -> Vec<String> {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    let out = stack.ccmgr(&all);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Polls until the service's log holds `n` lines.
fn wait_for_log_lines(stack: &Stack, id: &str, n: usize) {
    let path = stack.log_dir().join(format!("{id}.log"));
    let deadline = Instant::now() + LONG;
    loop {
        let have = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .count();
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}.log has {have} lines, not {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_last_lines_of_one_or_several_services_and_of_ccmgr_itself() {
    let stack = Stack::new("logs-tail", "", &[]);
    stack.write_service(
        "web",
        "command = [\"sh\", \"-c\", \"seq -f 'web %g' 1 30; exec sleep 1000\"]\n",
    );
    stack.write_service(
        "worker",
        "command = [\"sh\", \"-c\", \"seq -f 'worker %g' 1 3; exec sleep 1000\"]\n",
    );
    stack.start_ok();
    wait_for_log_lines(&stack, "web", 30);
    wait_for_log_lines(&stack, "worker", 3);

    let expected: Vec<String> = (21..=30).map(|i| format!("web {i}")).collect();
    assert_eq!(logs(&stack, &["web"]), expected, "10 lines by default");
    assert_eq!(logs(&stack, &["web", "-n", "2"]), ["web 29", "web 30"]);
    assert_eq!(logs(&stack, &["worker", "-n", "50"]).len(), 3);
    assert_eq!(
        logs(&stack, &["web", "worker", "-n", "2"]),
        [
            "web    | web 29",
            "web    | web 30",
            "worker | worker 2",
            "worker | worker 3"
        ]
    );

    // No service: ccmgr's own event log.
    let own = logs(&stack, &["-n", "1000"]);
    assert!(
        own.iter().any(|l| l.contains("started service=web")),
        "{own:?}"
    );
    assert_eq!(logs(&stack, &["-n", "3"]).len(), 3);

    let out = stack.ccmgr(&["logs", "wbe"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no service has the id `wbe`"), "{err}");
    assert!(err.contains("did you mean `web`?"), "{err}");
}

/// Lines of 64 bytes (newline included): 80,000 of them are 5.1 MB, past the 4 MiB at which
/// a service's log is rotated.
const LINES: u32 = 80_000;

fn flood_line(i: u32) -> String {
    format!("line {i:08} {}", "x".repeat(49))
}

#[test]
fn follow_goes_on_across_a_rotation() {
    let stack = Stack::new("logs-follow", "", &[]);
    let fifo = stack.path().join("go");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // It says it is ready, waits for the go, then floods its log and says done.
    stack.write_service(
        "talker",
        &format!(
            "command = [\"sh\", \"-c\", \"echo ready; read go < {fifo}; seq -f 'line %08g {pad}' 1 {LINES}; echo done; exec sleep 1000\"]\n",
            fifo = fifo.display(),
            pad = "x".repeat(49),
        ),
    );
    stack.start_ok();
    wait_for_log_lines(&stack, "talker", 1);

    let mut follower = Running::spawn(&stack, &["logs", "-f", "talker", "-n", "1"]);
    let stdout = follower.child.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower prints the last line once its watch is in place.
    let first = rx
        .recv_timeout(LONG)
        .expect("the follower prints the last line");
    assert_eq!(first, "ready");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let deadline = Instant::now() + LONG;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `done` from the follower after {} lines", got.len()));
        if line == "done" {
            break;
        }
        got.push(line);
    }
    assert_eq!(got.len(), LINES as usize, "every line once");
    for (i, line) in got.iter().enumerate() {
        assert_eq!(*line, flood_line(i as u32 + 1), "line {} in order", i + 1);
    }
    // The lines it followed were in two files: the rotated one and the new one.
    let dir = stack.log_dir();
    let rotated = std::fs::read_to_string(dir.join("talker.log.1")).expect("the log rotated");
    let current = std::fs::read_to_string(dir.join("talker.log")).unwrap();
    assert!(
        rotated.starts_with("ready\nline 00000001 "),
        "the rotated file holds the start"
    );
    assert!(current.ends_with("done\n") && !current.contains("ready"));
    assert!(
        follower
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "still following"
    );
    drop(follower);

    // -n reaches back into the rotated file when the current one holds fewer lines.
    let current_lines = current.lines().count();
    let n = current_lines + 10;
    let last = logs(&stack, &["talker", "-n", &n.to_string()]);
    assert_eq!(last.len(), n);
    assert_eq!(last[0], flood_line(LINES - n as u32 + 2));
    assert_eq!(last[n - 1], "done");
    assert_eq!(
        logs(&stack, &["talker", "-n", "2"]),
        [flood_line(LINES), "done".into()]
    );
}

/// ccmgr's own log after the stack was started with `RUST_LOG` as given (None: unset) and
/// stopped again.
fn own_log_with(rust_log: Option<&str>, test: &str) -> String {
    let stack = Stack::new(test, "", &[]);
    stack.write_service("a", "command = [\"/bin/sleep\", \"1000\"]\n");
    let mut start = std::process::Command::new(ccmgr_bin());
    start
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .arg("start")
        .env_remove("CCMGR_CONFIG")
        .env_remove("RUST_LOG");
    if let Some(value) = rust_log {
        start.env("RUST_LOG", value);
    }
    let out = start.output().expect("ccmgr runs");
    // Through the stack's own runner, so its guard knows the processes to reap.
    let _ = stack.status();
    assert_eq!(out.status.code(), Some(0), "start failed:\n{}", text(&out));
    // `stop` returns once the stack is stopped: every line about it is written by then.
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "stop failed:\n{}", text(&out));
    let path = stack
        .log_dir()
        .join(format!("ccmgr-{}.log", stack.instance));
    std::fs::read_to_string(&path).unwrap_or_default()
}

#[test]
fn rust_log_sets_the_level_overall_and_per_module_path() {
    let default = own_log_with(None, "logs-rust-log-unset");
    assert!(
        default.contains("keeper started the coordinator"),
        "{default}"
    );
    assert!(default.contains("every service is up"), "{default}");

    let quiet = own_log_with(Some("warn"), "logs-rust-log-warn");
    assert!(!quiet.contains(" INFO "), "no info line at warn:\n{quiet}");

    // The coordinator's lines at info, the keeper's (module ccmgr::keeper) only from warn.
    let mixed = own_log_with(Some("warn,ccmgr::coordinator=info"), "logs-rust-log-mixed");
    assert!(mixed.contains("every service is up"), "{mixed}");
    assert!(!mixed.contains("keeper started the coordinator"), "{mixed}");

    let ours = own_log_with(Some("ccmgr=debug"), "logs-rust-log-ours");
    assert!(ours.contains("every service is up"), "{ours}");
}

//! `ccmgr events` and the failure commands through the real binary (issue 10, item 4): the
//! events of a crash and its restart reach two readers at once, in order; a reader that never
//! reads does not hold the coordinator back and is told what it lost; `on_failure_command`
//! runs with the failure in its environment, and one that hangs is killed at its timeout
//! while the coordinator keeps working.

mod stack_support;

use std::io::{BufRead, BufReader};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{Running, Stack, service_of, text, up_anew};

/// A `ccmgr events --json` reader whose lines arrive on a channel.
struct Reader {
    running: Running,
    lines: Receiver<String>,
}

impl Reader {
    fn spawn(stack: &Stack, args: &[&str]) -> Reader {
        let mut running = Running::spawn(stack, args);
        let stdout = running.child.as_mut().unwrap().stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Reader { running, lines }
    }

    /// Events until one satisfies `last` (included); panics at the deadline with what came.
    fn until(&self, limit: Duration, mut last: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let event: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                    let done = last(&event);
                    got.push(event);
                    if done {
                        return got;
                    }
                }
                Err(_) => panic!("no matching event within {limit:?}; got {got:#?}"),
            }
        }
    }
}

fn kind(e: &Value) -> &str {
    e["event"].as_str().unwrap_or("")
}

#[test]
fn two_readers_see_a_crash_and_its_restart_in_order() {
    let stack = Stack::new(
        "events-crash",
        "",
        &[
            (
                "db",
                "command = [\"sleep\", \"100000\"]\nrestart_delay = 0\n",
            ),
            (
                "web",
                "command = [\"sleep\", \"100000\"]\nrequires = [\"db\"]\n",
            ),
        ],
    );
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    let db = service_of(&status, "db")["pid"].as_i64().unwrap() as i32;
    // With the backlog, a reader that attaches late still sees everything since the start.
    let readers = [
        Reader::spawn(&stack, &["events", "--json", "-n", "1024"]),
        Reader::spawn(&stack, &["events", "--json", "-n", "1024"]),
    ];
    kill(Pid::from_raw(db), Signal::SIGKILL).unwrap();
    stack.wait_for("db up anew", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| up_anew(s, "db", db))
    });
    let mut seen = Vec::new();
    for reader in &readers {
        // Up to the stack's return to steady after the crash.
        let mut crashed = false;
        let events = reader.until(Duration::from_secs(10), |e| {
            crashed |= kind(e) == "exited" && e["service"] == "db";
            crashed && kind(e) == "stack" && e["state"] == "steady"
        });
        seen.push(events);
    }
    for events in &seen {
        assert!(
            events
                .iter()
                .all(|e| e["instance"] == stack.instance.as_str()
                    && e["time"].as_str().is_some_and(|t| t.ends_with('Z'))
                    && e["unix_ms"].as_u64().is_some()),
            "every event names the instance and has a timestamp: {events:#?}"
        );
        let crash = events
            .iter()
            .position(|e| kind(e) == "exited" && e["service"] == "db" && e["pid"] == db)
            .unwrap_or_else(|| panic!("db's exit: {events:#?}"));
        assert_eq!(events[crash]["signal"], "SIGKILL", "{events:#?}");
        let after: Vec<(&str, &str)> = events[crash..]
            .iter()
            .map(|e| (kind(e), e["service"].as_str().unwrap_or("")))
            .collect();
        // (web's `stopping` is seen only when its stop does not end within the same batch of
        // the coordinator's loop: events are what each publication shows.)
        let expect_in_order = [
            ("exited", "db"),
            ("restarting", "db"),
            ("stopped", "web"),
            ("started", "db"),
            ("up", "db"),
            ("started", "web"),
            ("up", "web"),
            ("stack", ""),
        ];
        let mut at = 0;
        for want in expect_in_order {
            at += after[at..]
                .iter()
                .position(|got| *got == want)
                .unwrap_or_else(|| panic!("{want:?} after {:?} in {after:?}", &after[..at]));
        }
        let restarting = &events[crash..]
            .iter()
            .find(|e| kind(e) == "restarting")
            .unwrap();
        assert_eq!(restarting["attempt"], 1, "{restarting}");
        assert_eq!(restarting["of"], 5, "{restarting}");
    }
    assert_eq!(
        seen[0], seen[1],
        "both readers see the same events in the same order"
    );
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for reader in readers {
        let out = reader.running.finish(Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(0), "a reader ends with the stack");
    }
}

#[test]
fn a_reader_that_never_reads_does_not_hold_the_coordinator_back() {
    // A service that fails at once, restarted without delay, far below the give-up limit:
    // a stream of events much longer than the ring.
    let stack = Stack::new(
        "events-stalled",
        "[coordinator]\nrestart_retry_counter = 1000\nrestart_time_span = \"3h\"\n",
        &[
            ("anchor", "command = [\"sleep\", \"100000\"]\n"),
            (
                "flap",
                "command = [\"sh\", \"-c\", \"sleep 0.01; exit 1\"]\nrestart_delay = 0\nrestart_delay_max = 0\n",
            ),
        ],
    );
    stack.start_ok();
    let stalled = Reader::spawn(&stack, &["events", "--json"]);
    // It is attached once it has printed something; then it stops reading (SIGSTOP).
    stalled.until(Duration::from_secs(10), |e| kind(e) == "exited");
    kill(Pid::from_raw(stalled.running.pid()), Signal::SIGSTOP).unwrap();
    let restarts = |s: &Option<Value>| {
        s.as_ref().map_or(0, |s| {
            service_of(s, "flap")["restarts"].as_u64().unwrap_or(0)
        })
    };
    let before = restarts(&stack.status());
    // Each restart makes at least four events (exited, restarting, started, up): 300
    // restarts overrun the 1024-slot ring.
    stack.wait_for("300 more restarts", Duration::from_secs(60), |s| {
        restarts(s) >= before + 300
    });
    kill(Pid::from_raw(stalled.running.pid()), Signal::SIGCONT).unwrap();
    let events = stalled.until(Duration::from_secs(10), |e| kind(e) == "lost");
    let lost = events.last().unwrap()["lost"].as_u64().unwrap();
    assert!(lost > 0, "{events:#?}");
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn failure_commands_run_with_the_failure_in_their_environment() {
    let stack = Stack::new("events-hooks", "", &[]);
    let record = stack.file("hooks");
    std::fs::create_dir_all(&record).unwrap();
    let global = format!(
        "instance = \"{}\"\nlog_dir = \"log\"\nrun_dir = \"run\"\n[coordinator]\non_failure_command = \"env | grep ^CCMGR_ | sort > {record}/instance.$CCMGR_RESTARTS\"\n",
        stack.instance
    );
    std::fs::write(stack.path().join("ccmgr.toml"), global).unwrap();
    let marker = stack.file("crashed-once");
    stack.write_service(
        "svc",
        &format!(
            "command = [\"sh\", \"-c\", \"if [ -e {marker} ]; then exec sleep 100000; fi; touch {marker}; sleep 0.2; exit 3\"]\nrestart_delay = 0\non_failure_command = \"env | grep ^CCMGR_ | sort > {record}/svc.$CCMGR_RESTARTS\"\n"
        ),
    );
    // Up at once (ready when started); 0.2 s later its first run exits 3, a failure.
    stack.start_ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    let files = loop {
        let mut names: Vec<String> = std::fs::read_dir(&record)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if names.len() >= 2 {
            break names;
        }
        assert!(Instant::now() < deadline, "hooks ran: {names:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |name: &str| {
        // The command writes its file with a redirection: wait until it is complete.
        let path = format!("{record}/{name}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("CCMGR_TIME=") {
                return text;
            }
            assert!(Instant::now() < deadline, "{path}: {text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let svc = files.iter().find(|f| f.starts_with("svc.")).unwrap();
    let env = read(svc);
    for want in [
        "CCMGR_SERVICE=svc",
        "CCMGR_EXIT_STATUS=3",
        &format!("CCMGR_INSTANCE={}", stack.instance),
    ] {
        assert!(env.contains(want), "{want} in\n{env}");
    }
    assert!(env.contains("CCMGR_EVENT="), "{env}");
    let instance = files.iter().find(|f| f.starts_with("instance.")).unwrap();
    assert!(read(instance).contains("CCMGR_SERVICE=svc"));
    let _ = stack.stop();
}

#[test]
fn a_failure_command_that_hangs_is_killed_and_the_coordinator_keeps_working() {
    let stack = Stack::new("events-hang", "", &[]);
    let pids = stack.file("hook-pids");
    let global = format!(
        "instance = \"{}\"\nlog_dir = \"log\"\nrun_dir = \"run\"\n[coordinator]\non_failure_timeout = \"1s\"\n",
        stack.instance
    );
    std::fs::write(stack.path().join("ccmgr.toml"), global).unwrap();
    stack.write_service(
        "svc",
        &format!(
            "command = [\"sleep\", \"100000\"]\nrestart_delay = 0\non_failure_command = \"echo $$ >> {pids}; exec sleep 100000\"\n"
        ),
    );
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    let first = service_of(&status, "svc")["pid"].as_i64().unwrap() as i32;
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let hook = stack_support::wait_lines(&pids, 1, Duration::from_secs(10))[0]
        .trim()
        .parse::<i32>()
        .unwrap();
    stack.remember(&[hook]);
    // The coordinator goes on while the command hangs: the service is back at once.
    let status = stack
        .wait_for("svc up anew", Duration::from_secs(10), |s| {
            s.as_ref().is_some_and(|s| up_anew(s, "svc", first))
        })
        .unwrap();
    let second = service_of(&status, "svc")["pid"].as_i64().unwrap() as i32;
    assert!(
        Stack::alive(hook),
        "the command is still within its timeout"
    );
    // Killed at its timeout (1 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Stack::alive(hook) {
        assert!(
            Instant::now() < deadline,
            "the hanging command was not killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = stack.coordinator_log();
    assert!(log.contains("ran past its timeout"), "{log}");
    // And still working: another crash, another restart.
    kill(Pid::from_raw(second), Signal::SIGKILL).unwrap();
    stack.wait_for("svc up again", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| up_anew(s, "svc", second))
    });
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn check_refuses_a_failure_command_that_cannot_run() {
    let stack = Stack::new(
        "events-check",
        "[coordinator]\non_failure_timeout = \"0s\"\n",
        &[(
            "svc",
            "command = [\"sleep\", \"100\"]\non_failure_command = \"  \"\n",
        )],
    );
    let out = stack.ccmgr(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let svc = stack.path().join("services.d").join("svc.toml");
    assert!(
        stderr.contains(&format!("{}:2:", svc.display())) && stderr.contains("on_failure_command"),
        "{stderr}"
    );
    assert!(stderr.contains("on_failure_timeout"), "{stderr}");
}

/// A member of the configured group follows the events (the ring is 0640 owner:group,
/// mapped read-only); anyone else cannot open it.
#[test]
fn a_group_member_follows_the_events_and_a_stranger_cannot() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the tests as root"
        );
        eprintln!("skipped: needs root to act as nobody");
        return;
    }
    let stack = Stack::new(
        "events-group",
        "group = \"nogroup\"",
        &[("a", "command = [\"sleep\", \"100000\"]\n")],
    );
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = stack.path().join("ccmgr");
    std::fs::copy(stack_support::ccmgr_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    stack.start_ok();
    stack.wait_steady(Duration::from_secs(10));
    let ring = stack.run_dir().join(format!("{}.events", stack.instance));
    let meta = std::fs::metadata(&ring).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o640, 65534));
    let config = stack.path().join("ccmgr.toml");
    // `events` follows until the stack stops: `timeout` ends it once the backlog is out.
    let follow = |gid: u32| {
        std::process::Command::new("timeout")
            .arg("2")
            .arg(&bin)
            .arg("--config")
            .arg(&config)
            .args(["events", "--json", "-n", "100"])
            .uid(65534)
            .gid(gid)
            .current_dir("/")
            .output()
            .unwrap()
    };
    let member = follow(65534);
    let lines = String::from_utf8_lossy(&member.stdout).into_owned();
    assert!(
        lines
            .lines()
            .any(|l| l.contains("\"event\":\"up\"") && l.contains("\"service\":\"a\"")),
        "{lines}\n{}",
        String::from_utf8_lossy(&member.stderr)
    );
    // Not in the group (gid 1, daemon): refused, and says why.
    let stranger = follow(1);
    assert_eq!(stranger.status.code(), Some(1), "{}", text(&stranger));
    assert!(stranger.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("Permission denied"),
        "{}",
        text(&stranger)
    );
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn an_operator_stop_is_an_event() {
    let stack = Stack::new(
        "events-operator",
        "",
        &[
            ("a", "command = [\"sleep\", \"100000\"]\n"),
            (
                "b",
                "command = [\"sleep\", \"100000\"]\nrequires = [\"a\"]\n",
            ),
        ],
    );
    stack.start_ok();
    stack.wait_steady(Duration::from_secs(10));
    let out = stack.ccmgr(&["stop", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let reader = Reader::spawn(&stack, &["events", "--json", "-n", "1024"]);
    let events = reader.until(Duration::from_secs(10), |e| {
        kind(e) == "operator-stopped" && e["service"] == "b"
    });
    assert!(
        !events
            .iter()
            .any(|e| kind(e) == "operator-stopped" && e["service"] == "a"),
        "{events:#?}"
    );
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

//! `ccmgr start|stop|restart SERVICE...` through the real binary: the operator acts on some
//! services of a running stack, in order, while the rest keeps its pids; what the operator
//! stopped stays down through failure sequences until started again; unknown services and
//! strangers are refused. Each test runs its own instance; the `Stack` guard stops and reaps
//! everything even when a test fails.

mod stack_support;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use stack_support::{Running, Stack, service_of, text};

const LONG: Duration = Duration::from_secs(20);

/// The acceptance chain: c requires b requires a; each a shell that sleeps (and ends at once
/// on SIGTERM, sleeping in the background so the shell is there to take it).
fn chain(test: &str) -> Stack {
    let sleeper = |deps: &str| {
        format!(
            "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\nrestart_delay = \"10ms\"\n{deps}\n"
        )
    };
    let stack = Stack::new(test, "", &[]);
    stack.write_service("a", &sleeper(""));
    stack.write_service("b", &sleeper("requires = [\"a\"]"));
    stack.write_service("c", &sleeper("requires = [\"b\"]"));
    stack.start_ok();
    stack.wait_steady(LONG);
    stack
}

fn pid(status: &Value, id: &str) -> Option<i64> {
    service_of(status, id)["pid"].as_i64()
}

fn state(status: &Value, id: &str) -> String {
    service_of(status, id)["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn restart_of_a_service_restarts_it_then_what_requires_it_and_leaves_the_rest() {
    let stack = chain("op-restart");
    let before = stack.status().unwrap();
    let mark = stack.log_len();
    let out = stack.ccmgr(&["restart", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("restarted b, c"), "{}", text(&out));
    // Waited until done: both are up again, under new pids, as soon as it returns.
    let after = stack.status().unwrap();
    for id in ["b", "c"] {
        assert_eq!(state(&after, id), "up", "{after}");
        assert_ne!(pid(&after, id), pid(&before, id), "{id} was not restarted");
    }
    assert_eq!(pid(&after, "a"), pid(&before, "a"), "a was touched");
    assert_eq!(stack.logged(mark, "stopping"), ["c", "b"]);
    assert_eq!(stack.logged(mark, "started"), ["b", "c"]);
    // An operator's restart is no failure.
    assert_eq!(service_of(&after, "b")["restarts"], 0);
    assert_eq!(after["restart_window"]["restarts"], 0, "{after}");
}

#[test]
fn stop_holds_a_service_and_its_dependents_down_until_started_again() {
    let stack = chain("op-stop");
    let a_before = pid(&stack.status().unwrap(), "a");
    let mark = stack.log_len();
    let out = stack.ccmgr(&["stop", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("stopped c, b"), "{}", text(&out));
    assert_eq!(stack.logged(mark, "stopping"), ["c", "b"]);
    let status = stack.status().unwrap();
    for id in ["b", "c"] {
        assert_eq!(state(&status, id), "stopped by the operator", "{status}");
        assert_eq!(pid(&status, id), None);
    }
    assert_eq!(pid(&status, "a"), a_before);
    let table = text(&stack.ccmgr(&["status"]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("b ") && l.contains("stopped by the operator")),
        "{table}"
    );
    // `status b`: that service alone, in text and in JSON.
    let one = stack.ccmgr(&["status", "b"]);
    assert_eq!(one.status.code(), Some(0), "{}", text(&one));
    let table = String::from_utf8_lossy(&one.stdout).into_owned();
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| ["a:", "b:", "c:"].iter().any(|p| l.starts_with(p)))
        .collect();
    assert_eq!(rows.len(), 1, "{table}");
    assert!(rows[0].contains("stopped by the operator"), "{table}");
    let one = stack.ccmgr(&["status", "--json", "b"]);
    let json: Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(json["services"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(
        json["services"][0]["state"], "stopped by the operator",
        "{json}"
    );
    let wrong = stack.ccmgr(&["status", "bb"]);
    assert_eq!(wrong.status.code(), Some(2), "{}", text(&wrong));
    assert!(
        text(&wrong).contains("did you mean `b`?"),
        "{}",
        text(&wrong)
    );

    // A failure sequence (a killed) brings back a, and neither b nor c.
    let a = a_before.unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = stack.wait_for("a restarted", LONG, |s| {
        s.as_ref().is_some_and(|s| {
            s["state"] == "steady" && state(s, "a") == "up" && pid(s, "a") != a_before
        })
    });
    let status = status.unwrap();
    assert_eq!(service_of(&status, "a")["restarts"], 1, "{status}");
    for id in ["b", "c"] {
        assert_eq!(state(&status, id), "stopped by the operator", "{status}");
    }
    let starts_since = stack.logged(mark, "started");
    assert_eq!(starts_since, ["a"], "only a came back");

    // start c brings b and c back, in order.
    let mark = stack.log_len();
    let out = stack.ccmgr(&["start", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("started b, c"), "{}", text(&out));
    assert_eq!(stack.logged(mark, "started"), ["b", "c"]);
    let status = stack.status().unwrap();
    assert!(stack_support::steady_and_all_up(&status), "{status}");
}

#[test]
fn an_unknown_service_is_bad_usage_with_a_suggestion() {
    let stack = chain("op-unknown");
    let before = stack.status().unwrap();
    for verb in ["start", "stop", "restart"] {
        let out = stack.ccmgr(&[verb, "bb"]);
        assert_eq!(out.status.code(), Some(2), "{verb}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("no service `bb`"), "{t}");
        assert!(t.contains("did you mean `b`?"), "{t}");
    }
    let after = stack.status().unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(pid(&after, id), pid(&before, id));
    }
}

#[test]
fn no_wait_returns_once_accepted() {
    let stack = chain("op-nowait");
    let out = stack.ccmgr(&["stop", "--no-wait", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("under way"), "{}", text(&out));
    stack.wait_for("c held down", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| state(s, "c") == "stopped by the operator")
    });
}

#[test]
fn a_failed_start_exits_1_naming_the_service() {
    let stack = Stack::new("op-fail", "", &[]);
    let flag = stack.file("c-fails");
    stack.write_service(
        "a",
        "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\n",
    );
    // c fails at once (status 7) once the flag file exists; it counts as up only after
    // 300 ms, so the failure is a failed start; and it is not restarted.
    stack.write_service(
        "c",
        &format!(
            "command = [\"sh\", \"-c\", \"test -e {flag} && exit 7; trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\nrequires = [\"a\"]\nmin_uptime = \"300ms\"\nrestart = \"never\"\n"
        ),
    );
    stack.start_ok();
    stack.wait_steady(LONG);
    let out = stack.ccmgr(&["stop", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::write(&flag, "").unwrap();
    let out = stack.ccmgr(&["start", "c"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("c failed: exited with status 7"), "{t}");
    // a was not touched by c's failure.
    assert_eq!(state(&stack.status().unwrap(), "a"), "up");
}

/// The coordinator dies while a `stop b` waits for b (which takes its time to stop): the
/// standby takes over, continues the stop, and the waiting command ends with "stopped"; what
/// the operator stopped stays stopped under the new coordinator.
#[test]
fn a_stop_survives_a_takeover_in_the_middle() {
    let stack = Stack::new("op-takeover", "", &[]);
    let gate = stack.file("b-may-stop");
    let sleeper = "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\nrestart_delay = \"10ms\"\n";
    stack.write_service("a", sleeper);
    // b stops only once the test opens the gate (a file), however long that takes.
    stack.write_service(
        "b",
        &format!(
            "command = [\"sh\", \"-c\", \"trap 'while [ ! -e {gate} ]; do sleep 0.02; done; exit 0' TERM; while :; do sleep 1 & wait; done\"]\nrequires = [\"a\"]\nshutdown_timeout = \"60s\"\n"
        ),
    );
    stack.write_service("c", &format!("{sleeper}requires = [\"b\"]\n"));
    stack.start_ok();
    stack.wait_steady(LONG);
    let status = stack.wait_for("a standby", LONG, |s| {
        s.as_ref().is_some_and(|s| s["standby"]["pid"].is_i64())
    });
    let coordinator = status.unwrap()["coordinator"]["pid"].as_i64().unwrap() as i32;
    let stop = Running::spawn(&stack, &["stop", "b"]);
    stack.wait_for("b stopping", LONG, |s| {
        s.as_ref().is_some_and(|s| {
            state(s, "c") == "stopped by the operator" && state(s, "b") == "stopping"
        })
    });
    stack.kill_coordinator_until_successor(coordinator, LONG);
    std::fs::write(&gate, "").unwrap();
    let out = stop.finish(LONG);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("stopped c, b"), "{}", text(&out));
    // It did lose its coordinator in the middle, and asked the successor.
    assert!(
        text(&out).contains("asking its successor"),
        "{}",
        text(&out)
    );
    let status = stack.status().unwrap();
    for id in ["b", "c"] {
        assert_eq!(state(&status, id), "stopped by the operator", "{status}");
    }
    // Under the new coordinator, a failure sequence of a still leaves them down.
    let a = pid(&status, "a").unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = stack
        .wait_for("a restarted", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                s["state"] == "steady"
                    && state(s, "a") == "up"
                    && pid(s, "a").is_some_and(|p| p as i32 != a)
            })
        })
        .unwrap();
    for id in ["b", "c"] {
        assert_eq!(state(&status, id), "stopped by the operator", "{status}");
    }
}

/// The coordinator dies while a `restart b` waits for c to stop: the standby takes over and
/// finishes the restart; the waiting command ends with "restarted b, c" once both are up
/// again, and a keeps its pid.
#[test]
fn a_restart_survives_a_takeover_in_the_middle() {
    let stack = Stack::new("op-takeover-restart", "", &[]);
    let gate = stack.file("c-may-stop");
    let sleeper =
        "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\n";
    stack.write_service("a", sleeper);
    stack.write_service("b", &format!("{sleeper}requires = [\"a\"]\n"));
    // c stops only once the test opens the gate (a file), however long that takes.
    stack.write_service(
        "c",
        &format!(
            "command = [\"sh\", \"-c\", \"trap 'while [ ! -e {gate} ]; do sleep 0.02; done; exit 0' TERM; while :; do sleep 1 & wait; done\"]\nrequires = [\"b\"]\nshutdown_timeout = \"60s\"\n"
        ),
    );
    stack.start_ok();
    stack.wait_steady(LONG);
    let before = stack
        .wait_for("a standby", LONG, |s| {
            s.as_ref().is_some_and(|s| s["standby"]["pid"].is_i64())
        })
        .unwrap();
    let coordinator = before["coordinator"]["pid"].as_i64().unwrap() as i32;
    let restart = Running::spawn(&stack, &["restart", "b"]);
    stack.wait_for("c stopping", LONG, |s| {
        s.as_ref().is_some_and(|s| state(s, "c") == "stopping")
    });
    stack.kill_coordinator_until_successor(coordinator, LONG);
    std::fs::write(&gate, "").unwrap();
    let out = restart.finish(LONG);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("restarted b, c"), "{}", text(&out));
    assert!(
        text(&out).contains("asking its successor"),
        "{}",
        text(&out)
    );
    // Done means done: both up again under new pids as soon as it returns; a untouched.
    let after = stack.status().unwrap();
    for id in ["b", "c"] {
        assert_eq!(state(&after, id), "up", "{after}");
        assert_ne!(pid(&after, id), pid(&before, id), "{id} was not restarted");
    }
    assert_eq!(pid(&after, "a"), pid(&before, "a"));
}

/// The keeper killed, then `stop`: its control socket goes too; and while nothing listens,
/// a per-service verb says the instance is not running.
#[test]
fn stop_after_the_keeper_was_killed_leaves_no_control_socket() {
    let stack = chain("op-keeper-killed");
    let status = stack.status().unwrap();
    stack.remember(&stack_support::pids_in(&status));
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.sock", stack.instance));
    assert!(socket.exists(), "the keeper binds {}", socket.display());
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The coordinator (and the standby) end once the keeper is gone: then nothing holds the
    // listening socket.
    let parties: Vec<i32> = ["keeper", "coordinator", "standby"]
        .iter()
        .filter_map(|k| status[*k]["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    let deadline = std::time::Instant::now() + LONG;
    while parties.iter().any(|&p| Stack::alive(p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "a party outlived the keeper: {parties:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = stack.ccmgr(&["restart", "b"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("is not running"), "{}", text(&out));
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!socket.exists(), "stop left {}", socket.display());
}

/// A client that connects and says nothing does not hold the coordinator: a restart goes
/// through meanwhile, and the silent connection is closed at its read deadline; a malformed
/// request, or two in one connection, get a `bad` reply and are closed.
#[test]
fn silent_or_malformed_clients_never_hold_the_coordinator() {
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::UnixStream;
    let stack = chain("op-silent");
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.sock", stack.instance));
    let mut silent = UnixStream::connect(&socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let out = stack.ccmgr(&["restart", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The coordinator closes it (2 s): end of file, with nothing said.
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    silent.read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(started.elapsed() < Duration::from_secs(9));

    for request in [
        &b"stop b\n"[..],
        b"{\"verb\":\"stop\",\"services\":[\"b\"],\"force\":true}\n",
        b"{\"verb\":\"stop\",\"services\":[\"b\"]}\n{\"verb\":\"stop\",\"services\":[\"a\"]}\n",
    ] {
        let mut conn = UnixStream::connect(&socket).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn.write_all(request).unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("{\"reply\":\"bad\""), "{reply}");
        assert_eq!(reply.lines().count(), 1, "{reply}");
    }
    // Nothing was stopped.
    let status = stack.status().unwrap();
    assert!(stack_support::steady_and_all_up(&status), "{status}");
}

/// The coordinator out of file descriptors: accepting on the control socket fails (EMFILE).
/// It must neither spin on the still-readable socket nor lose the channel: it pauses, says
/// why once, and serves the waiting requests once it has descriptors again.
#[test]
fn a_coordinator_out_of_descriptors_does_not_spin_on_the_control_socket() {
    use std::os::unix::net::UnixStream;
    let stack = chain("op-emfile");
    let status = stack.status().unwrap();
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.sock", stack.instance));
    let limits = Command::new("prlimit")
        .args([
            "--pid",
            &coordinator.to_string(),
            "--nofile",
            "--output=SOFT,HARD",
            "--noheadings",
        ])
        .output()
        .expect("prlimit runs");
    let original: Vec<String> = String::from_utf8_lossy(&limits.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(original.len(), 2, "{}", text(&limits));
    let open = std::fs::read_dir(format!("/proc/{coordinator}/fd"))
        .unwrap()
        .count();
    let set = |limit: &str| {
        let out = Command::new("prlimit")
            .args([
                "--pid",
                &coordinator.to_string(),
                &format!("--nofile={limit}"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    // Room for one more descriptor: the first connection is accepted, the next is not.
    set(&format!("{}:{}", open + 1, original[1]));
    let waiting: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + LONG;
    while !stack
        .coordinator_log()
        .contains("cannot accept on the control socket")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed accept was logged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Over a second with accepts failing, the coordinator sleeps between pauses.
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{coordinator}/stat")).unwrap();
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields[0] + fields[1]
    };
    let before = ticks();
    let measured = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = ticks() - before;
    let spent = measured.elapsed();
    assert!(
        used < 20,
        "the coordinator used {used} ticks of CPU in {spent:?} while it could not accept"
    );
    set(&format!("{}:{}", original[0], original[1]));
    drop(waiting);
    let out = stack.ccmgr(&["restart", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let warnings = stack
        .coordinator_log()
        .matches("cannot accept on the control socket")
        .count();
    assert_eq!(warnings, 1, "a spell of failed accepts is reported once");
}

/// Runs `ccmgr <args>` on `stack` as nobody.
fn as_nobody(stack: &Stack, args: &[&str]) -> std::process::Output {
    stack.ccmgr_as_nobody(args)
}

fn needs_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: needs root to run a command as nobody");
    }
    root
}

/// Nothing changed: every service up under the pid it had.
fn unchanged(stack: &Stack, before: &Value) {
    let after = stack.status().unwrap();
    for id in ["a", "b", "c"] {
        assert_eq!(state(&after, id), "up", "{after}");
        assert_eq!(pid(&after, id), pid(before, id));
    }
}

/// A member of the instance's `group` may connect to the control socket (mode 0660), but only
/// the owner may control: `ccmgr` refuses before it connects, with the whole-stack verbs' rule
/// and exit code 4; and a client that connects anyway (here python, as nobody) is refused by
/// the coordinator by its credentials.
#[test]
fn a_group_member_who_is_not_the_owner_is_refused_by_the_coordinator() {
    if !needs_root() {
        return;
    }
    let stack = Stack::new("op-group", "group = \"nogroup\"", &[]);
    let sleeper =
        "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\n";
    stack.write_service("a", sleeper);
    stack.write_service("b", &format!("{sleeper}requires = [\"a\"]\n"));
    stack.write_service("c", &format!("{sleeper}requires = [\"b\"]\n"));
    stack.start_ok();
    let before = stack.wait_steady(LONG);
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.sock", stack.instance));
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    for verb in ["stop", "start", "restart"] {
        let out = as_nobody(&stack, &[verb, "b"]);
        assert_eq!(out.status.code(), Some(4), "{}", text(&out));
        let t = text(&out);
        assert!(t.contains("only uid 0 may control instance"), "{t}");
    }
    // Past the command line: the coordinator itself refuses the group member.
    // The coordinator answers a refused peer as soon as it accepts it, and may close before
    // the request is written: a failed send is fine, the reply is what counts.
    let client = "import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_STREAM)\ns.connect(sys.argv[1])\ntry:\n  s.sendall(b'{\"verb\":\"stop\",\"services\":[\"b\"]}\\n')\nexcept OSError:\n  pass\nsys.stdout.write(s.makefile().readline())\n";
    let out = Command::new("python3")
        .args(["-c", client])
        .arg(&socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("\"reply\":\"refused\""), "{t}");
    assert!(t.contains("uid 65534 may not control this instance"), "{t}");
    unchanged(&stack, &before);
}

/// Without a `group`, the socket is 0600: anyone else is refused by the file system.
#[test]
fn a_stranger_is_refused() {
    if !needs_root() {
        return;
    }
    let stack = chain("op-stranger");
    let before = stack.status().unwrap();
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.sock", stack.instance));
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let out = as_nobody(&stack, &["stop", "b"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("only uid 0 may control instance"), "{t}");
    unchanged(&stack, &before);
}

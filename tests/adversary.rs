//! Faults an outside tester found after issue 8 landed, each through the real binary: the
//! instance's shared state removed or truncated under a running stack.

mod stack_support;

use std::time::{Duration, Instant};

use stack_support::{Stack, pids_in, text};

const SLEEP: &str = r#"command = ["sleep", "100000"]"#;

/// Two sleepers, b requiring a, with the defaults: the stack most of these tests attack.
fn ab_stack(test: &str) -> Stack {
    Stack::new(
        test,
        "",
        &[("a", SLEEP), ("b", &format!("{SLEEP}\nrequires = [\"a\"]"))],
    )
}

/// Every live (non-zombie) process whose environment names `instance`: the services and
/// whatever they forked.
fn processes_of(instance: &str) -> Vec<i32> {
    let needle = format!("CCMGR_INSTANCE={instance}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes())
            && Stack::alive(pid)
        {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// SIGSTOP is delivered asynchronously: waits until `/proc` shows `pid` stopped.
fn freeze(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned));
        if matches!(state.as_deref(), Some("T" | "t")) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not stop: {stat}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The segment removed (`rm <run_dir>/<instance>.seg`) while the stack runs: the keeper's
/// process record still names the live keeper and services, so `start` must refuse instead of
/// starting a second stack beside the first (on main it did: every service ran twice, the two
/// keepers killed each other's services through the shared cgroups, and the first stack's
/// coordinator restarted them out of everyone's reach).
#[test]
fn start_refuses_while_the_process_record_names_live_processes() {
    let stack = ab_stack("adv-rm-segment");
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    let pids = pids_in(&status);
    stack.remember(&pids);
    let services_before = processes_of(&stack.instance);
    assert_eq!(services_before.len(), 2, "{services_before:?}");

    std::fs::remove_file(stack.segment_path()).unwrap();
    let out = stack.start();
    let services_after = processes_of(&stack.instance);
    stack.remember(&services_after);
    assert_eq!(
        out.status.code(),
        Some(1),
        "start over a live instance whose segment was removed must refuse:\n{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still running"),
        "{}",
        text(&out)
    );
    assert_eq!(
        services_after, services_before,
        "the refused start must leave the running services alone and start none"
    );

    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for pid in pids {
        assert!(!Stack::alive(pid), "pid {pid} survived the stop");
    }
    assert_eq!(processes_of(&stack.instance), Vec::<i32>::new());
}

/// The segment truncated under a running stack without a standby, then a service killed: the
/// coordinator dies of SIGBUS as it publishes the death, so the keeper stops the stack itself.
/// It must not touch the truncated segment while it does (on main its successors died five
/// times, then it published its own stop there and died of SIGBUS after the first services,
/// leaving the rest to init, unsupervised): every service ends, and so does the keeper.
#[test]
fn the_keeper_finishes_its_stop_over_a_truncated_segment() {
    let chain: Vec<(String, String)> = (1..=4)
        .map(|i| {
            let requires = if i > 1 {
                format!("\nrequires = [\"s{}\"]", i - 1)
            } else {
                String::new()
            };
            (format!("s{i}"), format!("{SLEEP}{requires}"))
        })
        .collect();
    let services: Vec<(&str, &str)> = chain
        .iter()
        .map(|(id, toml)| (id.as_str(), toml.as_str()))
        .collect();
    let stack = Stack::new(
        "adv-truncated-keeper",
        "[coordinator]\nstandby = false",
        &services,
    );
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    let pids = pids_in(&status);
    stack.remember(&pids);
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;

    std::fs::OpenOptions::new()
        .write(true)
        .open(stack.segment_path())
        .unwrap()
        .set_len(0)
        .unwrap();
    // An idle coordinator touches nothing; a death makes it publish.
    let top = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "s4")
        .and_then(|s| s["pid"].as_i64())
        .unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(top),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_of(&stack.instance);
        stack.remember(&left);
        if left.is_empty() && !Stack::alive(keeper) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with a truncated segment the keeper must stop every service and end; still alive: \
             services {left:?}, keeper {keeper} alive: {}\n{}",
            Stack::alive(keeper),
            stack.coordinator_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        stack
            .coordinator_log()
            .contains("the keeper's ordered stop is over"),
        "{}",
        stack.coordinator_log()
    );
}

/// The segment truncated, then the coordinator killed: the standby waits on a mutex inside
/// the truncated segment, which the kernel cannot mark at the coordinator's death, so it never
/// wakes. On main the keeper waited for it forever and the services ran on with nothing to
/// supervise them; the keeper must see that nobody can take over and stop the stack itself.
#[test]
fn a_standby_stuck_in_a_truncated_segment_does_not_hold_the_stack_forever() {
    let stack = ab_stack("adv-truncated-standby");
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    let pids = pids_in(&status);
    stack.remember(&pids);
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;

    std::fs::OpenOptions::new()
        .write(true)
        .open(stack.segment_path())
        .unwrap()
        .set_len(0)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_of(&stack.instance);
        stack.remember(&left);
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| Stack::alive(p)).collect();
        if left.is_empty() && alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "with a truncated segment and the coordinator dead, the keeper must stop the stack; \
             still alive: services {left:?}, recorded {alive:?} (keeper {keeper})\n{}",
            stack.coordinator_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A damaged segment and a process record that exists but is not one: `status` must say the
/// record is unusable, not that there is none (on main: "no process record was found").
#[test]
fn status_names_an_unusable_process_record_as_such() {
    let stack = Stack::new("adv-bad-record", "", &[("a", SLEEP)]);
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    stack.remember(&pids_in(&status));
    let record = stack.record_path();
    // Once written (naming the standby, the last of the start): else a later write of the
    // keeper replaces the garbage.
    stack.wait_record_names(status["standby"]["pid"].as_i64().unwrap());
    std::fs::write(&record, b"{garbage").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(stack.segment_path())
        .unwrap()
        .set_len(0)
        .unwrap();

    let out = stack.ccmgr(&["status"]);
    let stop = stack.ccmgr(&["stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr.contains("process record is unusable") && stderr.contains("is not a process record"),
        "{}",
        text(&out)
    );
}

/// Everything of the instance still runs, but its segment is truncated and the keeper's record
/// is gone: nothing names the keeper, the coordinator and the standby. On main `stop` gave up
/// ("may not be stopped ... cannot be found", exit 1) every time, and `start` refused the
/// truncated segment: a dead end. `stop` must find the parties in /proc (by the command line
/// they run with) and the rest by the environment, stop them, and let a new `start` work.
#[test]
fn stop_finds_the_parties_without_a_segment_or_a_record() {
    let stack = ab_stack("adv-no-record");
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    let pids = pids_in(&status);
    stack.remember(&pids);
    // Once written (naming the standby, the last of the start): else the keeper's delayed
    // write would bring it back.
    stack.wait_record_names(status["standby"]["pid"].as_i64().unwrap());
    std::fs::remove_file(stack.record_path()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(stack.segment_path())
        .unwrap()
        .set_len(0)
        .unwrap();

    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for pid in &pids {
        assert!(
            !Stack::alive(*pid),
            "pid {pid} survived the stop:\n{}",
            text(&out)
        );
    }
    assert_eq!(processes_of(&stack.instance), Vec::<i32>::new());
    assert_eq!(
        stack.state_files(),
        Vec::<std::path::PathBuf>::new(),
        "left behind"
    );
    stack.start_ok();
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The standby frozen (SIGSTOP), then the coordinator killed: the standby cannot take over,
/// yet it lives, so on main the keeper waited for it forever and the stack stayed unsupervised
/// (with or without the watchdog, which killed a frozen coordinator only to wait on a frozen
/// standby). The keeper must give the standby a deadline, then kill it and start a successor.
#[test]
fn a_frozen_standby_is_replaced_when_it_does_not_take_over() {
    let stack = ab_stack("adv-frozen-standby");
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    stack.remember(&pids_in(&status));
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let standby = status["standby"]["pid"].as_i64().unwrap() as i32;
    let pid = nix::unistd::Pid::from_raw;
    freeze(standby);
    nix::sys::signal::kill(pid(coordinator), nix::sys::signal::Signal::SIGKILL).unwrap();

    let status = stack.wait_for(
        "a new coordinator other than the frozen standby",
        Duration::from_secs(30),
        |s| {
            s.as_ref().is_some_and(|s| {
                let c = s["coordinator"]["pid"].as_i64().map(|p| p as i32);
                c.is_some_and(|c| c != coordinator && c != standby)
                    && s["supervised"] == true
                    && stack_support::steady_and_all_up(s)
            })
        },
    );
    stack.remember(&pids_in(status.as_ref().unwrap()));
    assert!(!Stack::alive(standby), "the frozen standby must be gone");
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// kill -9 of every process of the instance: the segment is left, still saying "steady". On
/// main `status` said the instance was steady and exited 0 (as for a running instance) though
/// nothing of it lived; it must say it is not running (exit 3) and why.
#[test]
fn status_after_everything_was_killed_says_not_running() {
    let stack = ab_stack("adv-all-killed");
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    let pids = pids_in(&status);
    stack.remember(&pids);
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    kill(keeper);
    for pid in pids.iter().copied().chain(processes_of(&stack.instance)) {
        kill(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| Stack::alive(p)) || !processes_of(&stack.instance).is_empty() {
        assert!(Instant::now() < deadline, "SIGKILL did not end them");
        std::thread::sleep(Duration::from_millis(10));
    }

    let out = stack.ccmgr(&["status", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "nothing of the instance lives: status must say it does not run\n{}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "stopped", "{json}");
    assert!(
        json["last_run"]["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("killed")),
        "{json}"
    );
    let human = stack.ccmgr(&["status"]);
    assert_eq!(human.status.code(), Some(3), "{}", text(&human));

    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    stack.start_ok();
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The coordinator killed during a `stop` whose stderr is not a terminal: `stop` follows the
/// standby and says so, and writes no terminal escape codes into the log it is piped to (on
/// main the line began with "\r\x1b[K").
#[test]
fn stop_writes_no_escape_codes_when_not_on_a_terminal() {
    let stack = Stack::new(
        "adv-stop-escapes",
        "",
        &[
            ("a", SLEEP),
            (
                "b",
                "command = [\"sh\", \"-c\", \"trap '' TERM; exec sleep 100000\"]\nrequires = [\"a\"]\nshutdown_timeout = \"3s\"",
            ),
        ],
    );
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    stack.remember(&pids_in(&status));
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let stop = std::process::Command::new(stack_support::ccmgr_bin())
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .arg("stop")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    stack.wait_for_relaxed("the stop to begin", Duration::from_secs(10), |s| {
        s.as_ref().is_none_or(|s| s["state"] == "stopping")
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator),
        nix::sys::signal::Signal::SIGKILL,
    );
    let out = stop.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("following its successor"), "{}", text(&out));
    assert!(
        !stderr.contains('\x1b') && !stderr.contains('\r'),
        "escape codes in a piped stderr: {stderr:?}"
    );
}

/// The keeper frozen (SIGSTOP) under a healthy coordinator: `status` must blame the keeper,
/// not the coordinator (on main: "the coordinator (pid N) is frozen", which it was not).
#[test]
fn status_blames_a_frozen_keeper_not_the_coordinator() {
    let stack = Stack::new("adv-frozen-keeper", "", &[("a", SLEEP)]);
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    stack.remember(&pids_in(&status));
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let pid = nix::unistd::Pid::from_raw(keeper);
    freeze(keeper);
    let out = stack.ccmgr(&["status"]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("the keeper (pid {keeper}) is frozen")),
        "{}",
        text(&out)
    );
    assert!(
        !stdout.contains(&format!("the coordinator (pid {coordinator}) is frozen")),
        "{}",
        text(&out)
    );
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The standby frozen: `status` must say so (on main it listed the frozen standby as any
/// other, though it cannot take over).
#[test]
fn status_warns_of_a_frozen_standby() {
    let stack = Stack::new("adv-frozen-standby-status", "", &[("a", SLEEP)]);
    stack.start_ok();
    let status = stack.wait_steady_with_standby(Duration::from_secs(10));
    stack.remember(&pids_in(&status));
    let standby = status["standby"]["pid"].as_i64().unwrap() as i32;
    let pid = nix::unistd::Pid::from_raw(standby);
    freeze(standby);
    let out = stack.ccmgr(&["status"]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("the standby (pid {standby}) is frozen")),
        "{}",
        text(&out)
    );
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The keeper killed, then `stop`: nothing of the instance may be left, its notify socket in
/// `run_dir` included (on main the dead keeper's `<instance>.notify` stayed for good).
#[test]
fn stop_after_the_keeper_was_killed_leaves_no_notify_socket() {
    let stack = Stack::new("adv-notify-left", "", &[("a", SLEEP)]);
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    stack.remember(&pids_in(&status));
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.notify", stack.instance));
    assert!(socket.exists(), "the keeper binds {}", socket.display());
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Stack::alive(keeper) {
        assert!(Instant::now() < deadline, "the keeper outlived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !socket.exists(),
        "stop left the dead keeper's notify socket {}",
        socket.display()
    );
}

/// `ccmgr start` frozen (SIGSTOP, as Ctrl-Z does) while the stack comes up: it holds the
/// "start under way" lock for as long as it is frozen. On main `stop` refused ("is being
/// started ...; stop it once the start has finished") for as long as that lasted, leaving a
/// running stack nobody could stop; it must stop it all the same.
#[test]
fn a_frozen_start_does_not_make_the_stack_unstoppable() {
    let stack = Stack::new("adv-frozen-start", "", &[]);
    let gate = stack.file("open");
    stack.write_service(
        "gate",
        &format!(
            "command = [\"sh\", \"-c\", \"while [ ! -e {gate} ]; do sleep 0.02; done\"]\nready = \"exit\""
        ),
    );
    stack.write_service("a", &format!("{SLEEP}\nrequires = [\"gate\"]"));
    let mut start = std::process::Command::new(stack_support::ccmgr_bin())
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .arg("start")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start_pid = nix::unistd::Pid::from_raw(start.id() as i32);
    stack.wait_for_relaxed("the start to begin", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| s["keeper"]["pid"].is_i64())
    });
    freeze(start_pid.as_raw());
    std::fs::write(&gate, b"").unwrap();
    let status = stack.wait_steady(Duration::from_secs(10));
    stack.remember(&pids_in(&status));

    let out = stack.ccmgr(&["stop"]);
    nix::sys::signal::kill(start_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let _ = start.wait();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for pid in pids_in(&status) {
        assert!(!Stack::alive(pid), "pid {pid} survived the stop");
    }
    assert_eq!(processes_of(&stack.instance), Vec::<i32>::new());
}

/// The coordinator processes of `instance` (the coordinator, standbys, successors), found by
/// the command line the keeper starts them with.
fn coordinators_of(instance: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.windows(4).any(|w| {
            w[0] == b"--instance"
                && w[1] == instance.as_bytes()
                && w[2] == b"internal"
                && (w[3] == b"coordinator" || w[3] == b"standby")
        }) && Stack::alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Coordinators that keep dying: the keeper stops the stack itself and publishes its stop.
/// A service still up keeps its uptime (on main the keeper's stop reset every service's
/// state time to its own start, so `status` showed an up service with an uptime of 0).
#[test]
fn the_keepers_stop_keeps_the_uptime_of_a_service_still_up() {
    let stack = Stack::new(
        "adv-keeper-stop-uptime",
        "[coordinator]\nstandby = false",
        &[
            ("a", SLEEP),
            (
                "b",
                "command = [\"sh\", \"-c\", \"trap '' TERM; exec sleep 100000\"]\nrequires = [\"a\"]\nshutdown_timeout = \"4s\"",
            ),
        ],
    );
    stack.start_ok();
    let status = stack.wait_for("a up for 1.5 s", Duration::from_secs(10), |s| {
        s.as_ref().is_some_and(|s| {
            s["services"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["id"] == "a" && x["uptime_ms"].as_u64().is_some_and(|u| u >= 1500))
        })
    });
    stack.remember(&pids_in(status.as_ref().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stack.coordinator_log().contains("coordinators keep dying") {
        for pid in coordinators_of(&stack.instance) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        assert!(
            Instant::now() < deadline,
            "the keeper did not take over the stop:\n{}",
            stack.coordinator_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = stack
        .wait_for_relaxed("the keeper's stop", Duration::from_secs(5), |s| {
            s.as_ref().is_some_and(|s| s["state"] == "stopping")
        })
        .unwrap();
    let a = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "a")
        .unwrap()
        .clone();
    // The keeper's log names what died: successors (or coordinators, once they took over),
    // never a standby: there is none.
    let log = stack.coordinator_log();
    assert!(
        !log.contains("the standby died while no coordinator lived"),
        "{log}"
    );
    assert_eq!(a["state"], "up", "{status}");
    assert!(
        a["uptime_ms"].as_u64().is_some_and(|u| u >= 1500),
        "a has been up for more than 1.5 s: {status}"
    );
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// `ccmgr stop | head -1`: the reader of stop's output goes away while stop works. On main
/// stop died of SIGPIPE at its next line, right after freezing the keeper, leaving the stack
/// frozen and half stopped. It must finish the stop whatever became of its output.
#[test]
fn stop_finishes_when_its_output_pipe_closes() {
    let stack = ab_stack("adv-stop-sigpipe");
    stack.start_ok();
    let status = stack.wait_steady(Duration::from_secs(10));
    let pids = pids_in(&status);
    stack.remember(&pids);
    // A frozen coordinator: stop does the stop itself, saying what it does line by line.
    freeze(status["coordinator"]["pid"].as_i64().unwrap() as i32);
    let mut stop = std::process::Command::new(stack_support::ccmgr_bin())
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .arg("stop")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(stop.stdout.take());
    drop(stop.stderr.take());
    let exit = stop.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "stop ended with {exit:?}");
    for pid in pids {
        assert!(!Stack::alive(pid), "pid {pid} survived the stop");
    }
    assert_eq!(processes_of(&stack.instance), Vec::<i32>::new());
}

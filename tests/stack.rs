//! The coordinator with real processes, through the real `ccmgr` binary: start and stop
//! order, the failure sequences, timeouts, floods, giving up, and `stop` in every situation.
//! Each test runs its own instance in its own directory; the `Stack` guard stops and reaps
//! everything even when a test fails.

mod stack_support;

use std::time::Duration;

use stack_support::{Stack, lines, pids_in, steady_and_all_up, text, up_anew, wait_lines};

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

#[test]
fn starts_in_dependency_order_and_stops_in_reverse() {
    let stack = Stack::new("order", "", &[]);
    let log = stack.file("order.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("cache", &recorder("cache", &log, ""));
    stack.write_service(
        "api",
        &recorder("api", &log, "requires = [\"db\"]\nafter = [\"cache\"]"),
    );
    stack.write_service("web", &recorder("web", &log, "requires = [\"api\"]"));
    stack.start_ok();
    wait_lines(&log, 4, LONG);
    // The order the coordinator started them in (each service's own "start" line only shows
    // when its shell ran, and two services whose dependencies are up run concurrently).
    let started = stack.start_order();
    let pos = |id: &str| {
        started
            .iter()
            .position(|l| l == id)
            .unwrap_or_else(|| panic!("{id} missing: {started:?}"))
    };
    assert!(pos("db") < pos("api") && pos("cache") < pos("api"));
    assert!(pos("api") < pos("web"));

    let status = stack.wait_steady(LONG);
    for s in status["services"].as_array().unwrap() {
        assert_eq!(s["state"], "up", "{s}");
        let pid = s["pid"].as_i64().expect("a running service has a pid") as i32;
        assert!(Stack::alive(pid));
    }
    assert!(status["coordinator"]["pid"].is_i64());
    // A standby is started once the startup sequence is done.
    stack.wait_for("a standby", LONG, |s| {
        s.as_ref().is_some_and(|s| s["standby"]["pid"].is_i64())
    });

    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let all = lines(&log);
    let stops: Vec<&str> = all[4..].iter().map(String::as_str).collect();
    let spos = |line: &str| {
        stops
            .iter()
            .position(|l| *l == line)
            .unwrap_or_else(|| panic!("{line} missing: {stops:?}"))
    };
    assert!(spos("stop web") < spos("stop api"));
    assert!(spos("stop api") < spos("stop db") && spos("stop api") < spos("stop cache"));
    assert!(stack.status().is_none(), "not running after stop");
}

#[test]
fn services_of_one_level_start_in_parallel() {
    // Each of a and b says READY=1 only once it has seen the other one started: one at a time,
    // neither would ever be ready and start would time out.
    let stack = Stack::new("parallel", "[coordinator]\nstartup_timeout = \"10s\"", &[]);
    let dir = stack.path().display().to_string();
    for (me, other) in [("a", "b"), ("b", "a")] {
        stack.write_service(
            me,
            &format!(
                r#"command = ["sh", "-c", "touch {dir}/{me}.started; while [ ! -e {dir}/{other}.started ]; do sleep 0.01; done; exec /usr/bin/python3 -c 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ[\"NOTIFY_SOCKET\"]); s.send(b\"READY=1\"); time.sleep(1000)'"]
ready = "notify"
startup_timeout = "8s"
"#
            ),
        );
    }
    stack.start_ok();
}

#[test]
fn an_explicit_startup_sequence_starts_one_at_a_time() {
    // With an explicit sequence, b (listed second) starts only once a is up; a, a notify
    // service, becomes ready only after 300 ms, so b's start line must come after a's ready.
    let stack = Stack::new(
        "explicit",
        "[coordinator]\nstartup_sequence = [\"a\", \"b\"]",
        &[],
    );
    let log = stack.file("seq.log");
    stack.write_service(
        "a",
        &format!(
            r#"command = ["sh", "-c", "echo start a >> {log}; sleep 0.3; echo ready a >> {log}; exec /usr/bin/python3 -c 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ[\"NOTIFY_SOCKET\"]); s.send(b\"READY=1\"); time.sleep(1000)'"]
ready = "notify"
"#
        ),
    );
    stack.write_service("b", &recorder("b", &log, ""));
    stack.start_ok();
    assert_eq!(wait_lines(&log, 3, LONG), ["start a", "ready a", "start b"]);
}

#[test]
fn kill_9_runs_the_failure_sequence_and_spares_unrelated_services() {
    let stack = Stack::new("restart-dependents", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, "restart_delay = \"0ms\""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    stack.write_service("other", &recorder("other", &log, ""));
    stack.start_ok();
    stack.wait_steady(LONG);
    let db = stack.pid_of("db").unwrap();
    let api = stack.pid_of("api").unwrap();
    let other = stack.pid_of("other").unwrap();
    let before = lines(&log).len();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(db),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = stack.wait_for("db and api restarted", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| steady_and_all_up(s) && up_anew(s, "db", db))
    });
    let status = status.unwrap();
    let svc = |id: &str| {
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()
            .clone()
    };
    assert_ne!(
        svc("api")["pid"].as_i64().unwrap() as i32,
        api,
        "api, which requires db, was restarted"
    );
    assert_eq!(
        svc("other")["pid"].as_i64().unwrap() as i32,
        other,
        "other kept its process"
    );
    assert_eq!(svc("db")["restarts"], 1);
    assert_eq!(svc("db")["last_exit"]["signal"], 9);
    let clog = stack.coordinator_log();
    assert!(
        clog.contains("restarting service=db restarts=1 last_exit=killed by SIGKILL"),
        "{clog}"
    );
    // The failure sequence: api stopped, then db and api started again, in that order.
    let events: Vec<String> = wait_lines(&log, before + 3, LONG)[before..].to_vec();
    assert_eq!(events[0], "stop api");
    let order = stack.start_order();
    assert_eq!(&order[order.len() - 2..], ["db", "api"]);
}

#[test]
fn restart_all_stops_everything_in_order_and_starts_everything() {
    let stack = Stack::new(
        "restart-all",
        "[coordinator]\non_failure = \"restart-all\"",
        &[],
    );
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, "restart_delay = \"0ms\""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    stack.write_service("web", &recorder("web", &log, "requires = [\"api\"]"));
    stack.start_ok();
    stack.wait_steady(LONG);
    let before = wait_lines(&log, 3, LONG).len();
    let api = stack.pid_of("api").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(api),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let events: Vec<String> = wait_lines(&log, before + 5, LONG)[before..].to_vec();
    // api is dead already, so nothing running depends on db: web and db stop together.
    let mut stops = events[..2].to_vec();
    stops.sort();
    assert_eq!(stops, ["stop db", "stop web"]);
    stack.wait_steady(LONG);
    let order = stack.start_order();
    assert_eq!(
        &order[order.len() - 3..],
        ["db", "api", "web"],
        "all started again in order"
    );
}

#[test]
fn a_service_that_exits_at_once_fails_the_start_and_says_why() {
    let stack = Stack::new("exits-at-once", "", &[]);
    let log = stack.file("events.log");
    // db says it is ready only once it has written its start and set its trap: else the stop
    // that follows broken's failure may come before its shell ran a line, and nothing is
    // written (seen under CI's load).
    stack.write_service(
        "db",
        &format!(
            r#"command = ["sh", "-c", "echo start db >> {log}; trap 'echo stop db >> {log}; exit 0' TERM; systemd-notify --ready; while :; do sleep 1; done"]
ready = "notify"
"#
        ),
    );
    stack.write_service(
        "broken",
        "command = [\"sh\", \"-c\", \"echo 'config file missing' >&2; exit 3\"]\nready = \"exit\"\nrequires = [\"db\"]\n",
    );
    let out = stack.start();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("service `broken` exited with status 3"), "{t}");
    assert!(
        t.contains("config file missing"),
        "the last lines of its log: {t}"
    );
    // db was started, then stopped again; nothing is left.
    assert_eq!(lines(&log), ["start db", "stop db"]);
    assert!(stack.status().is_none());
}

#[test]
fn a_notify_service_that_never_says_ready_is_killed_at_its_startup_timeout() {
    let stack = Stack::new("never-ready", "", &[]);
    stack.write_service(
        "mute",
        "command = [\"sleep\", \"1000\"]\nready = \"notify\"\nstartup_timeout = \"300ms\"\n",
    );
    let started = std::time::Instant::now();
    let out = stack.start();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("`mute` was not ready within its startup timeout"),
        "{t}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(stack.status().is_none());
}

#[test]
fn a_service_ignoring_sigterm_is_killed_after_its_shutdown_timeout() {
    let stack = Stack::new("ignores-term", "", &[]);
    stack.write_service(
        "stubborn",
        "command = [\"sh\", \"-c\", \"trap '' TERM; while :; do sleep 1; done\"]\nshutdown_timeout = \"400ms\"\n",
    );
    stack.start_ok();
    let pid = stack.pid_of("stubborn").unwrap();
    let started = std::time::Instant::now();
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "it was given its timeout"
    );
    assert!(!Stack::alive(pid), "SIGKILL ended it");
    let log = std::fs::read_to_string(
        stack
            .log_dir()
            .join(format!("ccmgr-{}.log", stack.instance)),
    )
    .unwrap();
    assert!(
        log.contains("timed out: killing its process group service=stubborn"),
        "{log}"
    );
}

#[test]
fn what_a_service_forks_and_leaves_behind_dies_with_it() {
    let stack = Stack::new("grandchild", "", &[]);
    let pidfile = stack.file("grandchild.pid");
    stack.write_service(
        "parent",
        &format!("command = [\"sh\", \"-c\", \"sleep 1000 & echo $! > {pidfile}; sleep 0.2; exit 1\"]\nrestart = \"never\"\n"),
    );
    stack.start_ok();
    let grandchild: i32 = wait_lines(&pidfile, 1, LONG)[0].trim().parse().unwrap();
    stack.wait_for("the parent to fail", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| s["services"][0]["state"] == "failed")
    });
    let deadline = std::time::Instant::now() + LONG;
    while Stack::alive(grandchild) {
        assert!(
            std::time::Instant::now() < deadline,
            "the grandchild {grandchild} outlived its service"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_flood_of_output_is_rotated_and_blocks_nothing() {
    let stack = Stack::new("flood", "", &[]);
    // 100 MB of lines, then exit 0: a one-shot, so start returns only after it has all gone
    // through the log pipe.
    stack.write_service(
        "flood",
        "command = [\"sh\", \"-c\", \"yes 'a line of a flood of output' | head -c 100000000; printf '\\ndone\\n'\"]\nready = \"exit\"\nstartup_timeout = \"60s\"\n",
    );
    stack.start_ok();
    let mut total = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(stack.log_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name.starts_with("flood.log") {
            files += 1;
            total += entry.metadata().unwrap().len();
        }
    }
    let cap = (ccmgr::keeper::LOG_KEEP as u64 + 1) * ccmgr::keeper::LOG_MAX_BYTES;
    assert!(files >= 2, "the log was rotated");
    assert!(
        total <= cap,
        "{total} bytes on disk, more than the cap {cap}"
    );
    let tail = ccmgr::logsink::tail(&stack.log_dir(), "flood", 1);
    assert_eq!(tail, ["done"]);
}

#[test]
fn a_service_that_always_crashes_makes_the_coordinator_give_up() {
    let stack = Stack::new(
        "gives-up",
        "[coordinator]\nrestart_retry_counter = 3\nrestart_time_span = \"60s\"",
        &[],
    );
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service(
        "crashy",
        "command = [\"sh\", \"-c\", \"sleep 0.1; exit 7\"]\nrequires = [\"db\"]\nrestart_delay = \"10ms\"\nrestart_delay_max = \"50ms\"\n",
    );
    stack.start_ok();
    stack.wait_for("the coordinator to give up", LONG, |s| s.is_none());
    let out = stack.ccmgr(&["status"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(
        t.contains("last run: gave up: service `crashy` exited with status 7, after 3 restarts"),
        "{t}"
    );
    assert_eq!(
        lines(&log),
        ["start db", "stop db"],
        "db was stopped in order"
    );
}

#[test]
fn stop_after_kill_9_of_the_coordinator_stops_everything() {
    // No standby: the keeper starts a successor that adopts the stack, and `stop` goes through
    // it as through any coordinator.
    let stack = Stack::new("stop-orphans", "[coordinator]\nstandby = false", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let coordinator = status["coordinator"]["pid"].as_i64().unwrap() as i32;
    let pids: Vec<i32> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_i64().unwrap() as i32)
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    stack.wait_for("a successor to adopt the stack", LONG, |s| {
        s.as_ref().is_some_and(|s| {
            s["coordinator"]["pid"]
                .as_i64()
                .is_some_and(|p| p as i32 != coordinator)
                && s["supervised"] == true
                && s["state"] == "steady"
        })
    });
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for pid in pids {
        assert!(!Stack::alive(pid), "service {pid} was left running");
    }
    assert_eq!(
        &lines(&log)[2..],
        ["stop api", "stop db"],
        "stopped in shutdown order"
    );
    assert!(stack.status().is_none());
}

#[test]
fn stop_twice_and_start_twice() {
    let stack = Stack::new("twice", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.start_ok();
    let pid = stack.pid_of("db").unwrap();
    let second = stack.start();
    let t = text(&second);
    assert_eq!(second.status.code(), Some(1), "{t}");
    assert!(t.contains("is already running (coordinator pid"), "{t}");
    assert_eq!(
        stack.pid_of("db"),
        Some(pid),
        "the first stack is untouched"
    );
    assert_eq!(stack.stop().status.code(), Some(0));
    let again = stack.stop();
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stdout).contains("is not running"));
}

#[test]
fn a_bad_config_starts_nothing_and_leaves_nothing() {
    let stack = Stack::new(
        "bad-config",
        "",
        &[("a", "command = \"sleep 1\"\nrequires = [\"nope\"]\n")],
    );
    let out = stack.start();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!stack.segment_path().exists());
}

#[test]
fn redis_counts_as_up_only_after_ready_and_its_dependent_waits_for_it() {
    if !std::path::Path::new("/usr/bin/redis-server").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install redis-server"
        );
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
        return;
    }
    let stack = Stack::new("redis", "", &[]);
    let dir = stack.path().display().to_string();
    let log = stack.file("events.log");
    stack.write_service(
        "redis",
        &format!(
            "command = [\"/usr/bin/redis-server\", \"--port\", \"0\", \"--unixsocket\", \"{dir}/redis.sock\", \"--supervised\", \"systemd\", \"--save\", \"\", \"--appendonly\", \"no\", \"--dir\", \"{dir}\"]\nready = \"notify\"\nstartup_timeout = \"20s\"\n"
        ),
    );
    // The dependent proves redis was ready when it started: its socket must already answer.
    stack.write_service(
        "client",
        &format!(
            "command = [\"sh\", \"-c\", \"/usr/bin/redis-cli -s {dir}/redis.sock ping >> {log}; exec sleep 1000\"]\nrequires = [\"redis\"]\n"
        ),
    );
    stack.start_ok();
    assert_eq!(wait_lines(&log, 1, LONG), ["PONG"]);
    let coordinator_log = std::fs::read_to_string(
        stack
            .log_dir()
            .join(format!("ccmgr-{}.log", stack.instance)),
    )
    .unwrap();
    let ready = coordinator_log
        .find("ready service=redis")
        .expect("redis said READY=1");
    let client = coordinator_log
        .find("started service=client")
        .expect("client started");
    assert!(
        ready < client,
        "the client started only after redis was ready"
    );
    assert_eq!(stack.stop().status.code(), Some(0));
}

#[test]
fn services_get_the_usual_open_files_limit_back() {
    // The keeper raises its own limit to hold a pipe and a log per service; a service must
    // still start with the limit the keeper was started with.
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let stack = Stack::new("nofile", "", &[]);
    let out = stack.file("nofile.txt");
    stack.write_service(
        "probe",
        &format!("command = [\"sh\", \"-c\", \"ulimit -n > {out}; exec sleep 1000\"]\n"),
    );
    stack.start_ok();
    assert_eq!(wait_lines(&out, 1, LONG), [soft.to_string()]);
}

/// Whether a machine without usable cgroups fails the cgroup tests instead of skipping them:
/// set `CCMGR_TEST_REQUIRE_CGROUPS=1` where cgroups are known to work, so that a regression
/// cannot hide as a skip. Not by default: a CI machine may be a container that refuses them.
fn cgroups_required() -> bool {
    std::env::var_os("CCMGR_TEST_REQUIRE_CGROUPS").is_some_and(|v| v == "1")
}

/// The directory the keeper of `stack` makes its cgroups in (the keeper inherits this test
/// process's cgroup), or `None` when the machine offers no usable cgroup2: found the way the
/// keeper finds it, by trying, and then by moving a real process in, as the keeper does.
fn instance_cgroup(stack: &Stack) -> Option<std::path::PathBuf> {
    let probe = format!("{}-probe", stack.instance);
    let usable = ccmgr::cgroup::Tree::for_instance(&probe)
        .map_err(|e| e.to_string())
        .and_then(|mut tree| {
            let joined = move_a_process_into(&tree);
            tree.remove(Duration::from_secs(5)).unwrap();
            joined
        });
    match usable {
        Ok(()) => {
            let (dir, _) = ccmgr::cgroup::own_cgroup().unwrap();
            Some(dir.join(format!("ccmgr.{}", stack.instance)))
        }
        Err(e) => {
            assert!(!cgroups_required(), "cgroups are required, yet: {e}");
            eprintln!("skipped: no usable cgroup2 ({e})");
            None
        }
    }
}

/// Moves a child process into a cgroup of `tree`; kills and reaps it whatever happens.
fn move_a_process_into(tree: &ccmgr::cgroup::Tree) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .map_err(|e| format!("cannot start sleep: {e}"))?;
    let moved = tree
        .open_procs("probe")
        .map_err(|e| e.to_string())
        .and_then(|fd| {
            std::fs::File::from(fd)
                .write_all(child.id().to_string().as_bytes())
                .map_err(|e| format!("moving a process into a cgroup: {e}"))
        });
    let _ = child.kill();
    let _ = child.wait();
    moved
}

/// The cgroup2 path of process `pid`, from `/proc/<pid>/cgroup`.
fn cgroup_of(pid: i32) -> Option<std::path::PathBuf> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| ccmgr::cgroup::v2_path(&text))
}

/// Whether `cgroup` (a cgroup2 path) is the cgroup of a run of service `id` of `stack`:
/// `.../ccmgr.<instance>/<id>.<run>`.
fn is_run_cgroup_of(cgroup: &std::path::Path, stack: &Stack, id: &str) -> bool {
    let instance = format!("ccmgr.{}", stack.instance);
    let parent_ok = cgroup
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == instance.as_str());
    let name = cgroup.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let run_ok = name
        .strip_prefix(id)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_digit()));
    parent_ok && run_ok
}

#[test]
fn a_daemon_that_escaped_with_setsid_dies_with_its_service() {
    // The service double-forks a daemon that calls setsid: it leaves the service's process
    // group and session, and the keeper's killpg cannot reach it; its cgroup can.
    let stack = Stack::new("escaped-daemon", "", &[]);
    let Some(cgroup_dir) = instance_cgroup(&stack) else {
        return;
    };
    let pidfile = stack.file("daemon.pid");
    stack.write_service(
        "parent",
        &format!(
            "command = [\"sh\", \"-c\", \"(setsid sh -c 'echo $$ > {pidfile}; exec sleep 1000' &); while [ ! -s {pidfile} ]; do sleep 0.01; done; sleep 0.3; exit 1\"]\nrestart = \"never\"\n"
        ),
    );
    stack.start_ok();
    let parent = stack.pid_of("parent");
    let daemon: i32 = wait_lines(&pidfile, 1, LONG)[0].trim().parse().unwrap();
    assert!(Stack::alive(daemon));
    // It did escape the process group, and did not escape the cgroup.
    let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(daemon))).unwrap();
    assert_eq!(pgid.as_raw(), daemon, "the daemon leads its own group");
    let service_cgroup = cgroup_of(daemon).expect("the daemon has a cgroup2 path");
    assert!(
        is_run_cgroup_of(&service_cgroup, &stack, "parent"),
        "the daemon is in {}",
        service_cgroup.display()
    );
    if let Some(parent) = parent.filter(|p| Stack::alive(*p)) {
        assert_eq!(cgroup_of(parent), Some(service_cgroup.clone()));
    }
    assert!(
        cgroup_dir
            .join(service_cgroup.file_name().unwrap())
            .is_dir()
    );

    stack.wait_for("the parent to fail", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| s["services"][0]["state"] == "failed")
    });
    let deadline = std::time::Instant::now() + LONG;
    while Stack::alive(daemon) {
        if std::time::Instant::now() >= deadline {
            // Leave nothing behind even when failing.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("the daemon {daemon} outlived its service");
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !cgroup_dir.exists(),
        "the instance's cgroup {} was removed at stop",
        cgroup_dir.display()
    );
}

#[test]
fn after_kill_9_of_the_keeper_stop_still_stops_everything_even_escaped_daemons() {
    let stack = Stack::new("keeper-dies", "[coordinator]\nstandby = false", &[]);
    let cgroup_dir = instance_cgroup(&stack);
    let pidfile = stack.file("daemon.pid");
    let log = stack.file("events.log");
    // db writes nothing to its output: once the keeper is dead its log pipe has no reader, and
    // a write there would kill it with SIGPIPE before `stop` reached it (see the README).
    stack.write_service(
        "db",
        &format!(
            r#"command = ["sh", "-c", "exec >/dev/null 2>&1; echo start db >> {log}; trap 'echo stop db >> {log}; exit 0' TERM; while :; do sleep 1; done"]
"#
        ),
    );
    // A service that leaves a daemon behind outside its process group, then stays.
    stack.write_service(
        "escaper",
        &format!(
            "command = [\"sh\", \"-c\", \"(setsid sh -c 'echo $$ > {pidfile}; exec sleep 1000' &); exec sleep 1000\"]\nrequires = [\"db\"]\n"
        ),
    );
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let daemon: i32 = wait_lines(&pidfile, 1, LONG)[0].trim().parse().unwrap();
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    let services: Vec<i32> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The coordinator cannot go on without the keeper: it ends, and says why.
    let after = stack.wait_for("the coordinator to end", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| s["coordinator"]["pid"].is_null())
    });
    assert_eq!(after.unwrap()["supervised"], false);
    assert!(stack.coordinator_log().contains("lost the keeper"));
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for p in services {
        assert!(!Stack::alive(p), "service {p} outlived stop");
    }
    assert!(
        lines(&log).ends_with(&["stop db".to_owned()]),
        "db was stopped: {:?}\n{}",
        lines(&log),
        text(&out)
    );
    if let Some(dir) = cgroup_dir {
        let deadline = std::time::Instant::now() + LONG;
        while Stack::alive(daemon) {
            assert!(
                std::time::Instant::now() < deadline,
                "the escaped daemon {daemon} outlived stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!dir.exists(), "the instance's cgroups were removed");
    } else {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Removes a cgroup directory a test made, even when the test fails.
struct CgroupDirGuard(std::path::PathBuf);

impl Drop for CgroupDirGuard {
    fn drop(&mut self) {
        // After a clean stop the keeper removed it already.
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn services_start_outside_cgroups_where_the_machine_refuses_them() {
    // A machine may let the instance's cgroup be made and yet refuse what comes next (a
    // container's delegation, a sandbox). Here: the instance's cgroup exists with
    // cgroup.max.depth 0, so the keeper takes it over but cannot make a service's cgroup below
    // it. The services must start all the same, and the keeper must say why, once.
    let stack = Stack::new("cgroup-refused", "", &[]);
    let Some(cgroup_dir) = instance_cgroup(&stack) else {
        return;
    };
    std::fs::create_dir(&cgroup_dir).unwrap();
    let _guard = CgroupDirGuard(cgroup_dir.clone());
    std::fs::write(cgroup_dir.join("cgroup.max.depth"), "0").unwrap();
    stack.write_service("first", "command = [\"sleep\", \"1000\"]\n");
    stack.write_service(
        "second",
        "command = [\"sleep\", \"1000\"]\nrequires = [\"first\"]\n",
    );
    stack.start_ok();

    let own = cgroup_of(std::process::id() as i32).expect("this test has a cgroup2 path");
    for id in ["first", "second"] {
        let pid = stack
            .pid_of(id)
            .unwrap_or_else(|| panic!("{id} has no pid"));
        assert_eq!(
            cgroup_of(pid),
            Some(own.clone()),
            "{id} stayed in the keeper's cgroup"
        );
    }
    let log = stack.coordinator_log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("cannot move services into their cgroups"))
        .count();
    assert_eq!(warnings, 1, "one warning, not one per service:\n{log}");
    assert!(log.contains("Resource temporarily unavailable"), "{log}");

    assert!(stack.stop().status.success());
    assert!(
        !cgroup_dir.exists(),
        "the keeper removed the instance's cgroup"
    );
}

#[test]
fn every_run_of_a_crash_looping_service_is_born_alive_in_a_cgroup_of_its_own() {
    // A service that leaves an escaped daemon behind and exits at once, restarted with no
    // delay 50 times: each run's cgroup is killed when the run ends, and the next run starts
    // right then. Every run must live to write its line (a child born into a cgroup that was
    // killed is SIGKILLed at birth), each in a cgroup no other run used, and every daemon of
    // an ended run must die with its run; the ended runs' cgroups go.
    const RUNS: usize = 50;
    let stack = Stack::new(
        "respawn-cgroups",
        "[coordinator]\nrestart_retry_counter = 1000\nrestart_time_span = \"1h\"",
        &[],
    );
    let Some(cgroup_dir) = instance_cgroup(&stack) else {
        return;
    };
    let log = stack.file("runs.log");
    let daemons = stack.file("daemons.log");
    stack.write_service(
        "crashy",
        &format!(
            "command = [\"sh\", \"-c\", \"echo $$ $(sed -n 's/^0:://p' /proc/self/cgroup) >> {log}; (setsid sh -c 'echo $$ >> {daemons}; exec sleep 1000' &); n=$(wc -l < {log}); until [ $(cat {daemons} | wc -l) -ge $n ]; do :; done; exit 1\"]\nrestart_delay = \"0ms\"\n"
        ),
    );
    start_crash_looping(&stack);
    let runs = wait_lines(&log, RUNS, LONG * 4);
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let daemon_pids: Vec<i32> = lines(&daemons)
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    stack.remember(&daemon_pids);
    let mut seen = std::collections::HashSet::new();
    for run in &runs {
        let (pid, cgroup) = run.split_once(' ').expect("a line of `pid cgroup`");
        let cgroup = std::path::Path::new(cgroup);
        assert!(
            is_run_cgroup_of(cgroup, &stack, "crashy"),
            "run {pid} was in {}, not in a cgroup of its own",
            cgroup.display()
        );
        assert!(
            seen.insert(cgroup.to_path_buf()),
            "run {pid} was in {}, which an earlier run used",
            cgroup.display()
        );
    }
    // No run was killed at birth: every exit the coordinator saw was the service's own.
    let log_text = stack.coordinator_log();
    assert!(
        !log_text.contains("SIGKILL") && !log_text.contains("signal 9"),
        "a run was killed:\n{log_text}"
    );
    let deadline = std::time::Instant::now() + LONG;
    for pid in daemon_pids {
        while Stack::alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon {pid} outlived its run"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(
        !cgroup_dir.exists(),
        "the instance's cgroups were removed at stop"
    );
}

#[test]
fn the_cgroups_of_ended_runs_are_removed_while_the_stack_runs() {
    // A service whose runs each leave a daemon behind: when a run ends its cgroup is killed,
    // and removed once the daemon is gone, without waiting for the stack to stop.
    let stack = Stack::new(
        "ended-run-cgroups",
        "[coordinator]\nrestart_retry_counter = 1000\nrestart_time_span = \"1h\"",
        &[],
    );
    let Some(cgroup_dir) = instance_cgroup(&stack) else {
        return;
    };
    let log = stack.file("runs.log");
    let daemons = stack.file("daemons.log");
    // Five quick runs, then one that stays.
    stack.write_service(
        "flaky",
        &format!(
            "command = [\"sh\", \"-c\", \"echo $$ >> {log}; (setsid sh -c 'echo $$ >> {daemons}; exec sleep 1000' &); n=$(wc -l < {log}); until [ $(cat {daemons} | wc -l) -ge $n ]; do :; done; [ $n -ge 6 ] && exec sleep 1000; exit 1\"]\nrestart_delay = \"0ms\"\n"
        ),
    );
    start_crash_looping(&stack);
    wait_lines(&log, 6, LONG);
    let daemon_pids: Vec<i32> = wait_lines(&daemons, 6, LONG)
        .iter()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    stack.remember(&daemon_pids);
    let run_cgroups = || -> Vec<String> {
        std::fs::read_dir(&cgroup_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with("flaky."))
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + LONG;
    while run_cgroups().len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the cgroups of ended runs are still there: {:?}",
            run_cgroups()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The one left is the running service's, with its daemon.
    let pid = stack.pid_of("flaky").expect("flaky runs");
    let left = cgroup_dir.join(&run_cgroups()[0]);
    assert_eq!(cgroup_of(pid), cgroup_of_dir(&left));
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !cgroup_dir.exists(),
        "the instance's cgroups were removed at stop"
    );
}

/// Starts a stack whose service crash-loops: `start` may find it up (exit 0) or between two
/// runs ("started, but not all are up now", exit 1); anything else is a failure.
fn start_crash_looping(stack: &Stack) {
    let out = stack.start();
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "start failed:\n{}",
        text(&out)
    );
}

/// The cgroup2 path of the cgroup directory `dir`: the path of this test's own cgroup, with
/// what `dir` adds below this test's cgroup directory.
fn cgroup_of_dir(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let (own_dir, own_path) = ccmgr::cgroup::own_cgroup().ok()?;
    Some(own_path.join(dir.strip_prefix(own_dir).ok()?))
}

#[test]
fn where_children_cannot_be_born_in_a_cgroup_services_move_into_their_runs_cgroups() {
    // The keeper runs in a cgroup that `cgroup.kill` reached once (empty, before the keeper
    // came): Linux 6.14+ then SIGKILLs at birth every child it clones into a fresh cgroup
    // (the kill counts differ). The keeper's probe must notice, and its services must be
    // forked and move into their runs' cgroups instead: they start, restart, and each run is
    // in a cgroup of its own. (On a kernel without that behaviour, births just work.)
    let stack = Stack::new(
        "killed-keeper-cgroup",
        "[coordinator]\nrestart_retry_counter = 1000\nrestart_time_span = \"1h\"",
        &[],
    );
    if instance_cgroup(&stack).is_none() {
        return;
    }
    let (own_dir, _) = ccmgr::cgroup::own_cgroup().unwrap();
    let killed = own_dir.join(format!("killed-once-{}", stack.instance));
    std::fs::create_dir(&killed).unwrap();
    let _guard = CgroupDirGuard(killed.clone());
    std::fs::write(killed.join("cgroup.kill"), "1").unwrap();
    let log = stack.file("runs.log");
    stack.write_service(
        "svc",
        &format!(
            "command = [\"sh\", \"-c\", \"echo $$ $(sed -n 's/^0:://p' /proc/self/cgroup) >> {log}; exec sleep 1000\"]\nrestart_delay = \"0ms\"\n"
        ),
    );
    // `ccmgr start` from inside the killed cgroup: the keeper it forks is born there.
    let config = stack.path().join("ccmgr.toml");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" --config {} start",
            killed.display(),
            config.display()
        ))
        .arg(stack_support::ccmgr_bin())
        .env_remove("CCMGR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "start failed:\n{}", text(&out));
    // Four restarts: each run killed, each replacement a new run.
    for n in 1..5 {
        let last = wait_lines(&log, n, LONG).pop().unwrap();
        let pid: i32 = last.split(' ').next().unwrap().parse().unwrap();
        stack.remember(&[pid]);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let runs = wait_lines(&log, 5, LONG);
    let status = stack.wait_steady(LONG);
    stack.remember(&pids_in(&status));
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    assert!(
        cgroup_of(keeper).is_some_and(|c| c.ends_with(killed.file_name().unwrap())),
        "the keeper runs in the killed-once cgroup"
    );
    let mut seen = std::collections::HashSet::new();
    for run in &runs {
        let (pid, cgroup) = run.split_once(' ').expect("a line of `pid cgroup`");
        let cgroup = std::path::Path::new(cgroup);
        let instance = format!("ccmgr.{}", stack.instance);
        assert!(
            cgroup.parent().and_then(|p| p.file_name()) == Some(instance.as_ref())
                && cgroup
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("svc.")),
            "run {pid} was in {}, not in a cgroup of its own",
            cgroup.display()
        );
        assert!(
            seen.insert(cgroup.to_path_buf()),
            "run {pid} reused a cgroup"
        );
    }
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

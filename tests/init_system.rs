//! ccmgr under an init system and as one: `ccmgr start --foreground` tells a listening
//! `$NOTIFY_SOCKET` (systemd's sd_notify protocol) when the stack is ready, how it is, and
//! when it stops; and as PID 1 of a PID namespace it reaps orphans and turns signals into an
//! orderly stop with a documented exit code.

mod stack_support;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stack_support::{Stack, ccmgr_bin, lines, service_of, steady_and_all_up};

const LONG: Duration = Duration::from_secs(30);

/// `ccmgr start --foreground`, killed and reaped on drop.
struct Foreground(Child);

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test's end of `$NOTIFY_SOCKET`: every datagram received, in order.
struct Listener {
    socket: UnixDatagram,
    got: Vec<String>,
}

impl Listener {
    fn bind(path: &std::path::Path) -> Listener {
        let socket = UnixDatagram::bind(path).unwrap();
        Listener {
            socket,
            got: Vec::new(),
        }
    }

    /// Reads every datagram waiting now, without blocking.
    fn drain(&mut self) {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.got
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }

    /// Reads datagrams until one has the assignment `line` (returns its index), or panics at
    /// `limit`.
    fn wait_for(&mut self, line: &str, limit: Duration) -> usize {
        self.wait_for_after(line, 0, limit)
    }

    /// [`Listener::wait_for`], among the messages from index `from` on.
    fn wait_for_after(&mut self, line: &str, from: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut buf = vec![0u8; 4096];
        self.socket.set_nonblocking(false).unwrap();
        loop {
            if let Some(i) = self.position(line, from) {
                return i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {line:?} within {limit:?}; got {:?}",
                self.got
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.got
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// The first message from `from` on that carries the assignment `line`.
    fn position(&self, line: &str, from: usize) -> Option<usize> {
        (from..self.got.len()).find(|&i| self.got[i].lines().any(|l| l == line))
    }

    fn statuses(&self) -> Vec<String> {
        self.got
            .iter()
            .flat_map(|m| m.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_owned)
            .collect()
    }
}

/// A service that writes `start ID $NOTIFY_SOCKET` once its SIGTERM trap is set (so a test
/// that saw the line knows its stop will be written too), and `stop ID` at SIGTERM.
fn recorder(id: &str, log: &str, rest: &str) -> String {
    format!(
        r#"command = ["sh", "-c", "trap 'echo stop {id} >> {log}; exit 0' TERM; echo start {id} $NOTIFY_SOCKET >> {log}; while :; do sleep 1; done"]
{rest}
"#
    )
}

#[test]
fn sd_notify_says_ready_only_once_every_service_is_up_then_reloading_and_stopping() {
    let stack = Stack::new("sd-notify", "", &[]);
    let log = stack.file("events.log");
    let go = stack.file("go");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    // The last to come up: a one-shot that is up when it exits 0, which it does only once the
    // test has seen the stack without it.
    stack.write_service(
        "migrate",
        &format!(
            r#"command = ["sh", "-c", "while [ ! -e {go} ]; do sleep 0.02; done; echo start migrate $NOTIFY_SOCKET >> {log}"]
ready = "exit"
restart = "never"
requires = ["api"]
"#
        ),
    );
    let socket_path = stack.path().join("systemd-notify");
    let mut init = Listener::bind(&socket_path);
    let mut foreground = Foreground(
        Command::new(ccmgr_bin())
            .arg("--config")
            .arg(stack.path().join("ccmgr.toml"))
            .args(["start", "--foreground"])
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // db and api up, migrate still waiting for the test.
    stack
        .wait_for("db and api up, migrate starting", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                service_of(s, "db")["state"] == "up"
                    && service_of(s, "api")["state"] == "up"
                    && service_of(s, "migrate")["state"] == "starting"
            })
        })
        .unwrap();
    init.wait_for("STATUS=starting: 2 of 3 up, migrate starting", LONG);
    init.drain();
    assert_eq!(
        init.position("READY=1", 0),
        None,
        "READY=1 before migrate was up: {:?}",
        init.got
    );
    std::fs::write(&go, "").unwrap();
    let ready = init.wait_for("READY=1", LONG);
    // The coordinator publishes before it tells: the segment says all up by now.
    let status = stack.status().expect("the stack runs");
    assert!(steady_and_all_up(&status), "{status}");
    assert!(
        init.got[ready]
            .lines()
            .any(|l| l == "STATUS=running: 3 of 3 up"),
        "{:?}",
        init.got
    );
    let statuses = init.statuses();
    assert!(
        statuses.iter().any(|s| s.starts_with("starting: ")),
        "STATUS= lines during the startup: {statuses:?}"
    );
    // systemd's socket is ccmgr's alone: the services got ccmgr's own.
    let ours = socket_path.display().to_string();
    for line in wait_lines(&log, 3) {
        assert!(
            !line.contains(&ours),
            "a service saw systemd's socket: {line}"
        );
        assert!(line.contains(".notify"), "{line}");
    }

    // A reload (a new service): RELOADING=1 with MONOTONIC_USEC=, then READY=1 again.
    stack.write_service("web", &recorder("web", &log, "requires = [\"api\"]"));
    let out = stack.ccmgr(&["reload"]);
    assert!(out.status.success(), "{}", stack_support::text(&out));
    let reloading = init.wait_for("RELOADING=1", LONG);
    assert!(
        init.got[reloading]
            .lines()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{:?}",
        init.got
    );
    init.wait_for_after("READY=1", reloading + 1, LONG);
    let status = stack.status().expect("the stack runs");
    assert!(steady_and_all_up(&status), "{status}");

    // A takeover: the successor goes on telling systemd through the keeper.
    let before = stack.wait_steady_with_standby(LONG);
    let coordinator = before["coordinator"]["pid"].as_i64().unwrap() as i32;
    let told = init.got.len();
    kill(Pid::from_raw(coordinator), Signal::SIGKILL).unwrap();
    let after = init.wait_for_after("STATUS=running: 4 of 4 up", told, LONG);
    assert!(
        init.got[after].lines().any(|l| l == "READY=1"),
        "{:?}",
        init.got
    );
    let status = stack.status().expect("the stack runs");
    assert_ne!(
        status["coordinator"]["pid"].as_i64(),
        Some(coordinator as i64)
    );

    // SIGTERM: STOPPING=1, then an orderly stop, exit 0.
    kill(Pid::from_raw(foreground.0.id() as i32), Signal::SIGTERM).unwrap();
    init.wait_for("STOPPING=1", LONG);
    let exit = foreground.0.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", stack.coordinator_log());
}

#[test]
fn a_bogus_notify_socket_is_said_once_and_the_stack_runs_and_stops_as_without_one() {
    // Each is an address nobody can send to: a missing path, a regular file, a directory,
    // an abstract name nobody listens on, a stream socket.
    let stack = Stack::new("sd-notify-bogus", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    let regular = stack.path().join("regular");
    std::fs::write(&regular, "").unwrap();
    let directory = stack.path().join("a-directory");
    std::fs::create_dir(&directory).unwrap();
    let stream = stack.path().join("stream");
    let _listener = std::os::unix::net::UnixListener::bind(&stream).unwrap();
    let abstract_name = format!("@ccmgr-test-nobody-{}", std::process::id());
    let targets = [
        stack.path().join("missing").into_os_string(),
        regular.into_os_string(),
        directory.into_os_string(),
        abstract_name.into(),
        stream.into_os_string(),
    ];
    for (i, target) in targets.iter().enumerate() {
        let stderr = stack.file(&format!("stderr-{i}"));
        let mut foreground = Foreground(
            Command::new(ccmgr_bin())
                .arg("--config")
                .arg(stack.path().join("ccmgr.toml"))
                .args(["start", "--foreground"])
                .env("NOTIFY_SOCKET", target)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .unwrap(),
        );
        stack.wait_steady(LONG);
        kill(Pid::from_raw(foreground.0.id() as i32), Signal::SIGTERM).unwrap();
        let exit = foreground.0.wait().unwrap();
        let text = std::fs::read_to_string(&stderr).unwrap();
        assert_eq!(exit.code(), Some(0), "{target:?}: {text}");
        // Every state change (starting, ready, stopping, stopped) was refused: said once.
        let said = text.matches("cannot send").count();
        assert_eq!(said, 1, "{target:?}: said {said} times: {text}");
    }
}

// ---- PID 1 of a PID namespace ----------------------------------------------------------

/// `unshare --pid --fork --mount-proc --kill-child ccmgr ... start --foreground`: ccmgr is PID
/// 1 of a new PID namespace. Dropped, unshare is killed, and with it (`--kill-child`) PID 1,
/// and with PID 1 the kernel kills the whole namespace.
struct Namespace {
    unshare: Child,
}

impl Namespace {
    fn start(dir: &std::path::Path) -> Namespace {
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
            .arg(ccmgr_bin())
            .arg("--config")
            .arg(dir.join("ccmgr.toml"))
            .args(["start", "--foreground"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) runs");
        Namespace { unshare }
    }

    /// The host's pid of the namespace's PID 1 (unshare's only child).
    fn pid1(&self) -> i32 {
        let path = format!("/proc/{0}/task/{0}/children", self.unshare.id());
        let deadline = Instant::now() + LONG;
        loop {
            let children = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                return pid.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "unshare started no child");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The host pids of every process in the namespace, with their state letter and parent.
    fn processes(&self, pid1: i32) -> Vec<(i32, char, i32, String)> {
        let ns = std::fs::read_link(format!("/proc/{pid1}/ns/pid")).ok();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if ns.is_none() || std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() != ns {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // After the command's closing parenthesis: state, ppid.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap().chars().next().unwrap();
            let ppid: i32 = fields.next().unwrap().parse().unwrap();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, state, ppid, cmdline));
        }
        found
    }

    /// Waits for the namespace to end; its exit code (unshare passes PID 1's on).
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.unshare.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "the namespace did not end within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Whether this machine lets us make a PID namespace (root, and a container that allows
/// it); where it does not, the PID 1 tests skip, saying so (and fail in CI, which must run
/// them).
fn can_make_pid_namespace() -> bool {
    if !stack_support::need_root("to make a PID namespace (unshare --pid)") {
        return false;
    }
    let made = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the PID 1 tests: `unshare --pid --fork --mount-proc` (util-linux) fails here"
        );
        eprintln!("skipped: `unshare --pid --fork --mount-proc true` fails on this machine");
    }
    made
}

/// A directory with a ccmgr.toml naming its own instance, and an empty services.d.
fn namespace_dir(test: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("cc-{test}-"))
        .tempdir()
        .unwrap();
    let instance = format!("t-{test}-{}", std::process::id());
    std::fs::write(
        dir.path().join("ccmgr.toml"),
        format!("instance = \"{instance}\"\nlog_dir = \"log\"\nrun_dir = \"run\"\n"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("services.d")).unwrap();
    dir
}

fn write_service(dir: &tempfile::TempDir, id: &str, text: &str) {
    std::fs::write(dir.path().join(format!("services.d/{id}.toml")), text).unwrap();
}

/// Polls `path` until it has at least `n` lines.
fn wait_lines(path: &str, n: usize) -> Vec<String> {
    stack_support::wait_lines(path, n, LONG)
}

/// Sends signal number `signo` (real-time ones included, which nix's `Signal` lacks).
fn send_signal(pid: i32, signo: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signo) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signo}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn as_pid1_it_reaps_orphans_and_halts_in_shutdown_order_on_sigrtmin_3() {
    if !can_make_pid_namespace() {
        return;
    }
    let dir = namespace_dir("pid1");
    let log = dir.path().join("events.log").display().to_string();
    let go = dir.path().join("grandchild.go").display().to_string();
    write_service(&dir, "db", &recorder("db", &log, ""));
    write_service(&dir, "api", &recorder("api", &log, "requires = [\"db\"]"));
    // A daemon that double-forks: its child starts a grandchild and exits at once, so the
    // grandchild is an orphan, re-parented to PID 1; it exits when the test says so.
    write_service(
        &dir,
        "forker",
        &format!(
            r#"command = ["sh", "-c", "echo start forker >> {log}; sh -c 'sh -c \"while [ ! -e {go} ]; do sleep 0.02; done\" &'; trap 'echo stop forker >> {log}; exit 0' TERM; while :; do sleep 1; done"]
requires = ["api"]
"#
        ),
    );
    let mut ns = Namespace::start(dir.path());
    let pid1 = ns.pid1();
    wait_lines(&log, 3);
    // The grandchild, found in the namespace by its command line, an orphan of PID 1's.
    let deadline = Instant::now() + LONG;
    let grandchild = loop {
        let found = ns
            .processes(pid1)
            .into_iter()
            .find(|(_, _, _, cmd)| cmd.starts_with("sh -c while [ ! -e") && cmd.contains(&go));
        if let Some((pid, _, ppid, _)) = found {
            assert_eq!(ppid, pid1, "the grandchild is an orphan of PID 1's");
            break pid;
        }
        assert!(Instant::now() < deadline, "no grandchild in the namespace");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::fs::write(&go, "").unwrap();
    // It exits, and PID 1 reaps it: its /proc entry goes (a zombie would keep it, state Z).
    let deadline = Instant::now() + LONG;
    while std::path::Path::new(&format!("/proc/{grandchild}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the orphaned grandchild {grandchild} was not reaped: {:?}",
            ns.processes(pid1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphan_zombies: Vec<_> = ns
        .processes(pid1)
        .into_iter()
        .filter(|(_, state, ppid, _)| *state == 'Z' && *ppid == pid1)
        .collect();
    assert!(orphan_zombies.is_empty(), "{orphan_zombies:?}");

    // systemd's halt signal: an orderly stop, in shutdown order, and exit 0.
    send_signal(pid1, libc::SIGRTMIN() + 3);
    let code = ns.wait(LONG);
    let l = stack_support::lines(&log);
    assert_eq!(code, Some(0), "{l:?}");
    assert_eq!(
        &l[l.len() - 3..],
        ["stop forker", "stop api", "stop db"],
        "{l:?}"
    );
}

#[test]
fn as_pid1_sigterm_from_inside_the_namespace_stops_in_order_and_a_failed_stack_exits_1() {
    if !can_make_pid_namespace() {
        return;
    }
    // SIGTERM from a process of the namespace itself (the kernel drops it unless PID 1
    // handles it): an orderly stop, exit 0.
    let dir = namespace_dir("pid1-term");
    let log = dir.path().join("events.log").display().to_string();
    let go = dir.path().join("halt.go").display().to_string();
    write_service(&dir, "db", &recorder("db", &log, ""));
    write_service(
        &dir,
        "halter",
        &format!(
            r#"command = ["sh", "-c", "echo start halter >> {log}; trap 'echo stop halter >> {log}; exit 0' TERM; while [ ! -e {go} ]; do sleep 0.02; done; kill -TERM 1; while :; do sleep 1; done"]
requires = ["db"]
"#
        ),
    );
    let mut ns = Namespace::start(dir.path());
    wait_lines(&log, 2);
    std::fs::write(&go, "").unwrap();
    let code = ns.wait(LONG);
    let l = stack_support::lines(&log);
    assert_eq!(code, Some(0), "{l:?}");
    assert_eq!(&l[l.len() - 2..], ["stop halter", "stop db"], "{l:?}");

    // A stack that fails to start (a required service exits 3, and is not restarted): the
    // namespace ends with 1.
    let dir = namespace_dir("pid1-fail");
    let log = dir.path().join("events.log").display().to_string();
    // db's trap is set before it says it started, and broken fails only after that: the
    // stop of db is certain to be written.
    write_service(
        &dir,
        "db",
        &format!(
            r#"command = ["sh", "-c", "trap 'echo stop db >> {log}; exit 0' TERM; echo start db >> {log}; while :; do sleep 1; done"]"#
        ),
    );
    write_service(
        &dir,
        "broken",
        &format!(
            r#"command = ["sh", "-c", "until grep -q 'start db' {log} 2>/dev/null; do sleep 0.02; done; exit 3"]
restart = "never"
ready = "exit"
requires = ["db"]
"#
        ),
    );
    let mut ns = Namespace::start(dir.path());
    let code = ns.wait(LONG);
    let l = stack_support::lines(&log);
    assert_eq!(code, Some(1), "{l:?}");
    assert!(
        l.len() == 2 && l[0].starts_with("start db") && l[1] == "stop db",
        "{l:?}"
    );
}

// ---- the other init systems' scripts, driven for real ------------------------------------

/// Runs a packaging script with the built ccmgr and the stack's configuration.
fn script(stack: &Stack, path: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new("sh")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .args(args)
        .env("CCMGR", ccmgr_bin())
        .env("CCMGR_CONFIG", stack.path().join("ccmgr.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    stack.remember(&stack_support::pids_in(
        &stack.status_relaxed().unwrap_or_default(),
    ));
    out
}

#[test]
fn the_sysv_script_drives_the_stack_with_lsb_exit_codes() {
    let stack = Stack::new("sysv", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    let sysv = "packaging/sysv/ccmgr";
    let code = |out: std::process::Output| (out.status.code(), stack_support::text(&out));
    assert_eq!(code(script(&stack, sysv, &["status"])).0, Some(3));
    let (started, text) = code(script(&stack, sysv, &["start"]));
    assert_eq!(started, Some(0), "{text}");
    stack_support::wait_lines(&log, 2, LONG);
    assert!(steady_and_all_up(&stack.status().unwrap()));
    let (again, text) = code(script(&stack, sysv, &["start"]));
    assert_eq!(again, Some(0), "already running is success for LSB: {text}");
    assert!(text.contains("already running"), "{text}");
    assert_eq!(code(script(&stack, sysv, &["status"])).0, Some(0));
    let (reloaded, text) = code(script(&stack, sysv, &["reload"]));
    assert_eq!(reloaded, Some(0), "{text}");
    let (stopped, text) = code(script(&stack, sysv, &["stop"]));
    assert_eq!(stopped, Some(0), "{text}");
    let l = lines(&log);
    assert_eq!(&l[l.len() - 2..], ["stop api", "stop db"], "{l:?}");
    assert_eq!(code(script(&stack, sysv, &["status"])).0, Some(3));
    // Not running: a reload says so (LSB 7); a broken configuration is "not configured" (6).
    assert_eq!(code(script(&stack, sysv, &["reload"])).0, Some(7));
    stack.write_service("bad", "command = [\"true\"]\nrequires = [\"nothing\"]\n");
    assert_eq!(code(script(&stack, sysv, &["start"])).0, Some(6));
}

#[test]
fn the_sysv_script_keeps_the_stack_running_when_restart_meets_a_bad_configuration() {
    let stack = Stack::new("sysv-bad", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    let sysv = "packaging/sysv/ccmgr";
    let code = |out: std::process::Output| (out.status.code(), stack_support::text(&out));
    let (started, text) = code(script(&stack, sysv, &["start"]));
    assert_eq!(started, Some(0), "{text}");
    let pid_of = |id: &str| {
        let status = stack.status().expect("the stack runs");
        service_of(&status, id)["pid"].as_i64()
    };
    let db = pid_of("db");
    assert!(db.is_some());
    // A typo in a service file, then each way of applying it: "not configured" (6), and the
    // stack runs on untouched, not stopped with no way to start again.
    stack.write_service("bad", "command = [\"true\"]\nrequires = [\"nothing\"]\n");
    for action in ["restart", "try-restart", "force-reload"] {
        let (rc, text) = code(script(&stack, sysv, &[action]));
        assert_eq!(rc, Some(6), "{action}: {text}");
        assert!(text.contains("nothing"), "{action} says why: {text}");
        assert_eq!(pid_of("db"), db, "{action} touched the running stack");
    }
    // force-reload of a good configuration is ccmgr's live reload: only what changed restarts.
    std::fs::remove_file(stack.path().join("services.d/bad.toml")).unwrap();
    stack.write_service(
        "api",
        &recorder("api", &log, "requires = [\"db\"]\nenv = { X = \"1\" }"),
    );
    let (rc, text) = code(script(&stack, sysv, &["force-reload"]));
    assert_eq!(rc, Some(0), "{text}");
    let status = stack.wait_steady(LONG);
    assert_eq!(service_of(&status, "db")["pid"].as_i64(), db, "{status}");
    let (stopped, text) = code(script(&stack, sysv, &["stop"]));
    assert_eq!(stopped, Some(0), "{text}");
}

#[test]
fn the_runit_run_script_runs_ccmgr_in_the_foreground_and_sigterm_stops_it_in_order() {
    let stack = Stack::new("runit", "", &[]);
    let log = stack.file("events.log");
    stack.write_service("db", &recorder("db", &log, ""));
    stack.write_service("api", &recorder("api", &log, "requires = [\"db\"]"));
    let mut run = Foreground(
        Command::new("sh")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/runit/run"))
            .env("CCMGR", ccmgr_bin())
            .env("CCMGR_CONFIG", stack.path().join("ccmgr.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = stack.wait_steady(LONG);
    stack_support::wait_lines(&log, 2, LONG);
    // The run script exec'd ccmgr: the supervised pid is the keeper itself.
    assert_eq!(
        status["keeper"]["pid"].as_i64(),
        Some(run.0.id() as i64),
        "{status}"
    );
    kill(Pid::from_raw(run.0.id() as i32), Signal::SIGTERM).unwrap();
    let exit = run.0.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    let l = lines(&log);
    assert_eq!(&l[l.len() - 2..], ["stop api", "stop db"], "{l:?}");
}

//! Real-process tests of `ccmgr::notify`: senders that do what libsystemd's `sd_notify` does
//! (python3's socket module), fds passed along, oversized datagrams, the sender policy, a
//! service running as another user, and a real `Type=notify` daemon (redis-server).

mod proc_support;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ccmgr::config::{Account, ServiceSpec};
use ccmgr::logsink::{LogSink, make_output_pipe, tail};
use ccmgr::notify::{NotifyMessage, NotifySocket, sender_belongs_to};
use ccmgr::spawn::{ProcessExit, SpawnRequest, build_environment, signal_pidfd, spawn_service};
use nix::sys::signal::Signal;
use proc_support::*;

const PYTHON: &str = "/usr/bin/python3";

/// A python3 program that connects to `$NOTIFY_SOCKET` as `sd_notify` does; `send(payload)`
/// sends one datagram.
fn python(body: &str) -> String {
    format!(
        "import os, socket, sys, array\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         s.connect(os.environ['NOTIFY_SOCKET'])\n\
         send = s.send\n\
         {body}\n"
    )
}

/// Waits for the next message on `sock`, polling its fd until `timeout`.
fn next_message(sock: &NotifySocket, timeout: Duration) -> NotifyMessage {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(msg) = sock.recv().unwrap() {
            return msg;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            wait_readable(sock.as_fd(), left),
            "no notify message within {timeout:?}"
        );
    }
}

fn bind(dir: &Path) -> NotifySocket {
    NotifySocket::bind(&dir.join("notify")).unwrap()
}

#[test]
fn ready_carries_the_senders_pid_and_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = bind(tmp.path());
    let path = sock.path().to_str().unwrap().to_owned();
    let program = python("send(b'READY=1\\nSTATUS=ok')");
    let mut s = start(
        &[PYTHON, "-c", &program],
        &[("NOTIFY_SOCKET", &path)],
        tmp.path(),
    );
    let msg = next_message(&sock, TIMEOUT);
    assert_eq!(msg.pid, s.child.pid.as_raw());
    assert_eq!(msg.uid, nix::unistd::geteuid().as_raw());
    assert_eq!(msg.gid, nix::unistd::getegid().as_raw());
    assert_eq!(msg.fields, pairs(&[("READY", "1"), ("STATUS", "ok")]));
    assert!(msg.is_ready());
    assert!(sender_belongs_to(msg.pid, s.child.pid.as_raw()));
    assert_eq!(s.child.wait(TIMEOUT), ProcessExit::Exited(0));
    assert_eq!(sock.recv().unwrap(), None);
}

#[test]
fn a_claimed_mainpid_does_not_change_the_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = bind(tmp.path());
    let path = sock.path().to_str().unwrap().to_owned();
    let program = python("send(b'READY=1\\nMAINPID=1')");
    let mut s = start(
        &[PYTHON, "-c", &program],
        &[("NOTIFY_SOCKET", &path)],
        tmp.path(),
    );
    let msg = next_message(&sock, TIMEOUT);
    assert_eq!(msg.pid, s.child.pid.as_raw());
    assert_eq!(msg.claimed_main_pid(), Some(1));
    assert!(!sender_belongs_to(1, s.child.pid.as_raw()));
    assert!(s.child.wait(TIMEOUT).success());
}

#[test]
fn a_helper_in_the_service_session_counts_and_an_outsider_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = bind(tmp.path());
    let path = sock.path().to_str().unwrap().to_owned();
    // Both senders stay alive after sending (until killed), so /proc can be read for them.
    let stay = "import time; time.sleep(120)";
    // The service is a shell; the sender is its child, in a process group of its own.
    let helper_program = python(&format!("os.setpgid(0, 0); send(b'READY=1'); {stay}"));
    let script = format!("{PYTHON} -c \"$0\" & wait");
    let mut s = start(
        &["/bin/sh", "-c", &script, &helper_program],
        &[("NOTIFY_SOCKET", &path)],
        tmp.path(),
    );
    let helper = next_message(&sock, TIMEOUT);
    assert_ne!(helper.pid, s.child.pid.as_raw());
    let ids = ccmgr::notify::proc_ids(helper.pid).unwrap();
    assert_ne!(
        ids.pgid,
        s.child.pid.as_raw(),
        "the helper should have its own group"
    );
    assert_eq!(ids.session, s.child.pid.as_raw());
    assert!(sender_belongs_to(helper.pid, s.child.pid.as_raw()));

    let outsider = CommandGuard(
        Command::new(PYTHON)
            .arg("-c")
            .arg(python(&format!("send(b'READY=1'); {stay}")))
            .env_clear()
            .env("NOTIFY_SOCKET", &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let msg = next_message(&sock, TIMEOUT);
    assert_eq!(msg.pid, outsider.0.id() as i32);
    assert!(msg.is_ready());
    assert!(!sender_belongs_to(msg.pid, s.child.pid.as_raw()));
    drop(outsider);

    // The helper is still alive (it sleeps): kill it, so that the shell reaps it and exits.
    assert_eq!(
        session_members(s.child.pid),
        [nix::unistd::Pid::from_raw(helper.pid)]
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(helper.pid), Signal::SIGKILL).unwrap();
    assert_eq!(s.child.wait(TIMEOUT), ProcessExit::Exited(0));
}

#[test]
fn fds_passed_with_fdstore_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = bind(tmp.path());
    let path = sock.path().to_str().unwrap().to_owned();
    // The sender passes the write end of a pipe, closes its own copy, and waits for
    // end-of-file on the read end: it comes only once the coordinator has closed the fd.
    let program = python(
        "r, w = os.pipe()\n\
         s.sendmsg([b'FDSTORE=1\\nFDNAME=x'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', [w]))])\n\
         os.close(w)\n\
         sys.exit(0 if os.read(r, 1) == b'' else 1)",
    );
    let mut s = start(
        &[PYTHON, "-c", &program],
        &[("NOTIFY_SOCKET", &path)],
        tmp.path(),
    );
    let msg = next_message(&sock, TIMEOUT);
    assert_eq!(msg.get("FDSTORE"), Some("1"));
    assert_eq!(s.child.wait(TIMEOUT), ProcessExit::Exited(0));
}

#[test]
fn oversized_datagrams_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = bind(tmp.path());
    let path = sock.path().to_str().unwrap().to_owned();
    let program = python("send(b'STATUS=' + b'x' * 5000 + b'\\nREADY=1'); send(b'STATUS=small')");
    let mut s = start(
        &[PYTHON, "-c", &program],
        &[("NOTIFY_SOCKET", &path)],
        tmp.path(),
    );
    assert!(s.child.wait(TIMEOUT).success());
    // Both datagrams are queued now; the first is skipped whole.
    let msg = next_message(&sock, TIMEOUT);
    assert_eq!(msg.fields, pairs(&[("STATUS", "small")]));
    assert_eq!(sock.recv().unwrap(), None);
}

/// A `ready = "notify"` service of `command`, from and working in `dir`.
fn service(id: &str, command: &[&str], dir: &Path) -> ServiceSpec {
    ServiceSpec {
        source: dir.join(format!("{id}.toml")),
        ready: ccmgr::config::ReadyKind::Notify,
        working_dir: Some(dir.to_path_buf()),
        ..service_spec(id, command)
    }
}

#[test]
fn a_service_running_as_another_user_can_notify() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The run directory must be searchable by the service's user; the socket is mode 0666.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let sock = bind(tmp.path());
    let program = python("send(b'READY=1')");
    let mut svc = service("as-nobody", &[PYTHON, "-c", &program], Path::new("/"));
    svc.user = Some(Account {
        name: "nobody".into(),
        id: 65534,
    });
    let env = build_environment(&svc, "test", tmp.path(), &[sock.env_var()]).unwrap();
    let (read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest::for_service(&svc, env, write_end.as_fd()).unwrap();
    let mut child = Guard::new(spawn_service(&req).unwrap());
    drop(write_end);
    let msg = next_message(&sock, TIMEOUT);
    assert_eq!((msg.pid, msg.uid), (child.pid.as_raw(), 65534));
    assert!(msg.is_ready());
    let exit = child.wait(TIMEOUT);
    let out = String::from_utf8_lossy(&read_to_eof(read_end.as_fd(), TIMEOUT)).into_owned();
    assert!(exit.success(), "{exit}: {out}");
}

#[test]
fn redis_server_reports_ready_over_sd_notify() {
    let redis = Path::new("/usr/bin/redis-server");
    if !redis.exists() {
        // CI installs it (Debian package `redis-server`); elsewhere say so rather than fail.
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed: apt-get install redis-server"
        );
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap().to_owned();
    let sock = bind(tmp.path());
    let unixsocket = format!("{dir}/redis.sock");
    let svc = service(
        "redis",
        &[
            "/usr/bin/redis-server",
            "--port",
            "0",
            "--unixsocket",
            &unixsocket,
            "--supervised",
            "systemd",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
        ],
        tmp.path(),
    );
    let env = build_environment(&svc, "test", tmp.path(), &[sock.env_var()]).unwrap();
    let (read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest::for_service(&svc, env, write_end.as_fd()).unwrap();
    let mut child = Guard::new(spawn_service(&req).unwrap());
    drop(write_end);
    let logs = tmp.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let mut log = LogSink::open(&logs, "redis", 1 << 20, 1).unwrap();

    // The coordinator's loop in small: wait on the notify socket, the output pipe and the
    // pidfd together, until READY=1 comes from the redis process (or it dies, or time's up).
    let deadline = Instant::now() + TIMEOUT;
    let mut output_open = true;
    let ready = 'wait: loop {
        while let Some(msg) = sock.recv().unwrap() {
            if msg.is_ready() && sender_belongs_to(msg.pid, child.pid.as_raw()) {
                break 'wait msg;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no READY=1 from redis; its log:\n{}",
            tail(&logs, "redis", 20).join("\n")
        );
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = vec![
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(child.pidfd.as_fd(), PollFlags::POLLIN),
        ];
        if output_open {
            fds.push(PollFd::new(read_end.as_fd(), PollFlags::POLLIN));
        }
        let timeout = PollTimeout::try_from(left.as_millis() as u32 + 1).unwrap();
        poll(&mut fds, timeout).unwrap();
        let exited = fds[1].any().unwrap_or(false);
        drop(fds);
        if output_open {
            output_open = !log.drain(read_end.as_fd()).unwrap().eof;
        }
        assert!(
            !exited,
            "redis exited before READY=1; its log:\n{}",
            tail(&logs, "redis", 20).join("\n")
        );
    };
    assert_eq!(ready.pid, child.pid.as_raw());
    assert!(Path::new(&unixsocket).exists());

    signal_pidfd(child.pidfd.as_fd(), Signal::SIGTERM).unwrap();
    let exit = child.wait(TIMEOUT);
    while output_open {
        output_open = !log.drain(read_end.as_fd()).unwrap().eof;
        if output_open {
            assert!(wait_readable(read_end.as_fd(), TIMEOUT));
        }
    }
    let lines = tail(&logs, "redis", 50);
    assert!(
        exit.success(),
        "redis {exit}; its log:\n{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ready to accept connections")),
        "{lines:?}"
    );
}

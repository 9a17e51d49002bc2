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

fn recorder(id: &str, log: &str, rest: &str) -> String {
    format!(
        r#"command = ["sh", "-c", "echo start {id} $NOTIFY_SOCKET >> {log}; trap 'echo stop {id} >> {log}; exit 0' TERM; while :; do sleep 1; done"]
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
    for line in lines(&log) {
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

    // SIGTERM: STOPPING=1, then an orderly stop, exit 0.
    kill(Pid::from_raw(foreground.0.id() as i32), Signal::SIGTERM).unwrap();
    init.wait_for("STOPPING=1", LONG);
    let exit = foreground.0.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "{}", stack.coordinator_log());
}

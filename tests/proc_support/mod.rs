//! Helpers shared by the `proc_*` integration tests: a guard that kills and reaps every
//! process a test starts even when the test fails, waiting on fds with a deadline (never a
//! sleep), and running a test body in a re-executed copy of the test binary when it needs a
//! process-wide setting the parallel tests must not see.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ccmgr::config::service::defaults;
use ccmgr::config::{ServiceSpec, SignalName};
use ccmgr::logsink::make_output_pipe;
use ccmgr::spawn::{
    ProcessExit, SpawnRequest, Spawned, signal_group, signal_pidfd, spawn_service, try_reap,
};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How long any single wait in these tests may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A service of `command` with every optional setting at its default, as if from
/// `/etc/ccmgr/services.d/<id>.toml`.
pub fn service_spec(id: &str, command: &[&str]) -> ServiceSpec {
    ServiceSpec {
        id: id.into(),
        description: None,
        source: PathBuf::from(format!("/etc/ccmgr/services.d/{id}.toml")),
        command: strings(command),
        program: PathBuf::from(command[0]),
        requires: vec![],
        after: vec![],
        wants: vec![],
        before: vec![],
        ready: Default::default(),
        cc_arg: false,
        startup_timeout: defaults::STARTUP_TIMEOUT,
        shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
        stop_signal: SignalName(Signal::SIGTERM),
        restart: Default::default(),
        restart_delay: defaults::RESTART_DELAY,
        restart_delay_max: defaults::RESTART_DELAY_MAX,
        min_uptime: Default::default(),
        user: None,
        group: None,
        working_dir: None,
        env: BTreeMap::new(),
        env_file: None,
        on_failure_command: None,
    }
}

pub fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

pub fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A started service, killed (its whole process group) and reaped on drop unless a test
/// already reaped it.
pub struct Guard {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    exit: Option<ProcessExit>,
}

impl Guard {
    pub fn new(spawned: Spawned) -> Guard {
        Guard {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit: None,
        }
    }

    /// Waits (polling the pidfd, with a deadline) for the process to end, and reaps it.
    pub fn wait(&mut self, timeout: Duration) -> ProcessExit {
        if let Some(exit) = self.exit {
            return exit;
        }
        assert!(
            wait_readable(self.pidfd.as_fd(), timeout),
            "process {} did not exit within {timeout:?}",
            self.pid
        );
        let exit = try_reap(self.pid)
            .expect("reaping the child")
            .expect("a readable pidfd means the child has exited");
        self.exit = Some(exit);
        exit
    }

    pub fn reaped(&self) -> bool {
        self.exit.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // While the leader is unreaped its pid cannot name any other group or session.
            kill_session_members(self.pid);
            let _ = signal_group(self.pid, Signal::SIGKILL);
            let _ = signal_pidfd(self.pidfd.as_fd(), Signal::SIGKILL);
            let _ = ccmgr::spawn::reap(self.pid);
        }
    }
}

/// The processes in session `sid` other than its leader, from /proc.
pub fn session_members(sid: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            pid != sid.as_raw()
                && ccmgr::notify::proc_ids(pid).is_ok_and(|ids| ids.session == sid.as_raw())
        })
        .map(Pid::from_raw)
        .collect()
}

/// SIGKILLs every process in session `sid` but its leader (members that left the leader's
/// process group are out of `killpg`'s reach), then gives their parents, usually the leader,
/// a moment to reap them: this machine's init does not reap orphans, so a member whose parent
/// dies first stays a zombie. Call only while the leader is unreaped.
fn kill_session_members(sid: Pid) {
    let members = session_members(sid);
    for &pid in &members {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline
        && members
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child started with `std::process::Command` (outside any service session), killed and
/// reaped on drop.
pub struct CommandGuard(pub std::process::Child);

impl Drop for CommandGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `fd` for readability until `timeout`; false on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis().min(60_000) as u32 + 1).unwrap();
        match poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return true,
            Err(e) => panic!("poll: {e}"),
        }
    }
}

/// Reads a non-blocking pipe until end-of-file, waiting with poll; panics after `timeout`.
pub fn read_to_eof(fd: BorrowedFd<'_>, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(
                    wait_readable(fd, left),
                    "no end-of-file within {timeout:?}; read so far: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
            Err(Errno::EINTR) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Reads one line (without its `\n`) from a non-blocking pipe, waiting with poll. Reads a byte
/// at a time so nothing after the line is consumed.
pub fn read_line(fd: BorrowedFd<'_>, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut byte) {
            Ok(0) => panic!("end-of-file before a full line: {line:?}"),
            Ok(_) if byte[0] == b'\n' => return String::from_utf8(line).unwrap(),
            Ok(_) => line.push(byte[0]),
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                assert!(wait_readable(fd, left), "no full line within {timeout:?}");
            }
            Err(Errno::EINTR) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A service started with a fresh output pipe, running `argv` with exactly `env` in `dir`.
pub struct Started {
    pub child: Guard,
    /// The read end of its output pipe (non-blocking).
    pub output: OwnedFd,
}

pub fn start(argv: &[&str], env: &[(&str, &str)], dir: &Path) -> Started {
    let (read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest {
        program: argv[0].into(),
        argv: strings(argv),
        env: pairs(env),
        working_dir: dir.to_path_buf(),
        credentials: None,
        output: write_end.as_fd(),
        cgroup_procs: None,
        cgroup_dir: None,
    };
    let spawned = spawn_service(&req).unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"));
    // Our copy of the write end must go, or the pipe never reaches end-of-file.
    drop(write_end);
    Started {
        child: Guard::new(spawned),
        output: read_end,
    }
}

/// Runs `body` in a fresh copy of this test binary that has `ignore` signals set to SIG_IGN
/// from its start (a shell sets them and execs the binary: ignored dispositions survive exec).
/// Tests run as threads of one process, so a process-wide setting made in one test would leak
/// into the others; the copy runs only the test named `name`.
pub fn in_isolated_process(name: &str, ignore: &[&str], body: impl FnOnce()) {
    const VAR: &str = "CCMGR_PROC_TEST_ISOLATED";
    if std::env::var(VAR).as_deref() == Ok(name) {
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let script = format!("trap '' {}; exec \"$0\" \"$@\"", ignore.join(" "));
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(VAR, name)
        .output()
        .expect("re-running the test binary");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "isolated run failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "isolated run did not run the test:\n{text}"
    );
}

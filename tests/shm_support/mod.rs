//! Helpers shared by the shm integration tests: a per-test instance that
//! cleans up after itself, helper processes made by re-executing the test
//! binary in a role, line-based synchronisation with them, and a check that a
//! thread is blocked on a given futex. Nothing here sleeps and hopes: every
//! wait is on an event or a polled condition with a deadline.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ccmgr::process_identity::ProcessIdentity;
use ccmgr::shm::{MutexId, Segment, SegmentSpec, ServiceState, ServiceStatic, monotonic_ms};

/// The environment variables that make a re-executed test binary a helper.
pub const ROLE_VAR: &str = "CCMGR_TEST_ROLE";
pub const INSTANCE_VAR: &str = "CCMGR_TEST_INSTANCE";
pub const MUTEX_VAR: &str = "CCMGR_TEST_MUTEX";
pub const RUN_DIR_VAR: &str = "CCMGR_TEST_RUN_DIR";

/// How long any step of a test may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One instance name and run directory per test, removed at the end even if the test fails.
/// The directory is 0755, as `ccmgr start` makes a run directory: other users may enter it.
pub struct TestInstance {
    pub name: String,
    dir: tempfile::TempDir,
}

impl TestInstance {
    pub fn new(tag: &str) -> TestInstance {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(32)
            .collect();
        let name = format!(
            "t.{tag}.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("a run directory");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        TestInstance { name, dir }
    }

    /// The instance's run directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The main segment's path.
    pub fn segment_path(&self) -> PathBuf {
        ccmgr::shm::segment_path(self.dir(), &self.name).unwrap()
    }

    /// A spec with `services` services named s0, s1, ...
    pub fn spec(&self, services: usize) -> SegmentSpec {
        standard_spec(self.dir(), &self.name, services)
    }

    /// Spawn this test binary in `role` for this instance.
    pub fn spawn(&self, role: &str, env: &[(&str, &str)]) -> Helper {
        Helper::spawn(&current_exe(), role, self.dir(), &self.name, env, None)
    }
}

pub fn standard_spec(run_dir: &Path, instance: &str, services: usize) -> SegmentSpec {
    SegmentSpec {
        instance: instance.to_owned(),
        run_dir: run_dir.to_owned(),
        group: None,
        services: (0..services)
            .map(|i| ServiceStatic {
                id: format!("s{i}"),
                startup_timeout_ms: 1000 + i as u64,
                shutdown_timeout_ms: 2000 + i as u64,
            })
            .collect(),
        startup_sequence: (0..services as u32).collect(),
        shutdown_sequence: (0..services as u32).rev().collect(),
        config_blob: format!("config of {instance}").into_bytes(),
    }
}

pub fn current_exe() -> PathBuf {
    std::env::current_exe().expect("the test binary's path")
}

/// A helper process. Killed with SIGKILL and reaped on drop if still running.
pub struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    reaped: Option<ExitStatus>,
}

impl Helper {
    pub fn spawn(
        exe: &Path,
        role: &str,
        run_dir: &Path,
        instance: &str,
        env: &[(&str, &str)],
        as_user: Option<(u32, u32)>,
    ) -> Helper {
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "child_role_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_VAR, role)
        .env(INSTANCE_VAR, instance)
        .env(RUN_DIR_VAR, run_dir)
        .envs(env.iter().copied())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some((uid, gid)) = as_user {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("spawning a helper");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // The reader ends at EOF, i.e. when the helper dies.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Helper {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            reaped: None,
        }
    }

    /// Take charge of a child spawned otherwise (it says no lines).
    pub fn adopt(mut child: Child) -> Helper {
        let (_, lines) = mpsc::channel();
        Helper {
            stdin: child.stdin.take(),
            child,
            lines,
            reaped: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Wait for a line of the helper's starting with `prefix` (the test
    /// harness's own lines are skipped) and return it.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match line.strip_prefix(MARKER) {
                    Some(said) if said.starts_with(prefix) => return said.to_owned(),
                    _ => continue,
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "helper {} did not say {prefix:?} within {PATIENCE:?}",
                        self.pid()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!(
                        "helper {} ended ({status:?}) before saying {prefix:?}",
                        self.pid()
                    )
                }
            }
        }
    }

    /// Send one line to the helper's stdin.
    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("writing to a helper");
        stdin.flush().expect("flushing to a helper");
    }

    /// SIGKILL the helper and reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(status) = self.reaped {
            return status;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 of a helper");
        self.wait()
    }

    /// Wait for the helper to exit on its own (closing its stdin first, which
    /// ends helpers that block on it).
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.reaped {
            return status;
        }
        drop(self.stdin.take());
        let status = self.child.wait().expect("reaping a helper");
        self.reaped = Some(status);
        status
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.child.wait();
        }
    }
}

/// Poll until the thread `tid` of this process is blocked in `futex` on
/// `futex_address`, as `/proc/self/task/<tid>/syscall` shows ("<nr> <arg0>
/// ..."). Panics after `PATIENCE`.
pub fn wait_until_blocked_on(tid: i32, futex_address: usize) {
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut fields = text.split_whitespace();
            let nr = fields.next().and_then(|f| f.parse::<i64>().ok());
            let arg0 = fields
                .next()
                .and_then(|f| usize::from_str_radix(f.trim_start_matches("0x"), 16).ok());
            if nr == Some(libc::SYS_futex) && arg0 == Some(futex_address) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never blocked on the futex at {futex_address:#x}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Poll until process `pid` runs the program named `comm` (an exec completed).
pub fn wait_until_comm(pid: i32, comm: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            && text.trim_end() == comm
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never became {comm:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Parse a mutex name as the helpers take it: `manager`, `daemon`,
/// `daemon_standby`, `shm`.
pub fn parse_mutex(text: &str) -> MutexId {
    match text {
        "manager" => MutexId::Manager,
        "daemon" => MutexId::Daemon,
        "daemon_standby" => MutexId::DaemonStandby,
        "shm" => MutexId::Shm,
        other => panic!("unknown mutex {other:?}"),
    }
}

pub fn mutex_text(id: MutexId) -> String {
    match id {
        MutexId::Manager => "manager".into(),
        MutexId::Daemon => "daemon".into(),
        MutexId::DaemonStandby => "daemon_standby".into(),
        MutexId::Shm => "shm".into(),
    }
}

/// Marks the helper's own lines: the test harness writes to the same stdout
/// (`test child_role_entry ... ` with no newline before the test runs).
const MARKER: &str = "ccmgr-helper: ";

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{MARKER}{line}").unwrap();
    out.flush().unwrap();
}

/// Block until stdin says `want` (or ends: then exit, our parent is gone).
fn await_line(want: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
            std::process::exit(0);
        }
        if line.trim() == want {
            return;
        }
    }
}

/// Block until stdin ends, then exit.
fn idle_until_stdin_closes() -> ! {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    std::process::exit(0);
}

/// Run the helper role named by the environment, if any; never returns then.
/// Called from each test binary's `child_role_entry` test.
pub fn run_role_if_requested() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    let instance = std::env::var(INSTANCE_VAR).expect("instance for the helper");
    let run_dir = PathBuf::from(std::env::var_os(RUN_DIR_VAR).expect("run_dir for the helper"));
    let open = || Segment::open(&run_dir, &instance).expect("helper opening the segment");
    let mutex = || parse_mutex(&std::env::var(MUTEX_VAR).expect("mutex for the helper"));
    match role.as_str() {
        // Lock a mutex and hold it until killed (or stdin closes).
        "hold" => {
            let seg = open();
            let guard = seg.mutex(mutex()).unwrap().lock().unwrap();
            say(&format!("locked {:?}", guard.acquired()));
            idle_until_stdin_closes();
        }
        // Lock a mutex, then exec `cat` on "exec": the kernel must release it.
        "hold-then-exec" => {
            let seg = open();
            let guard = seg.mutex(mutex()).unwrap().lock().unwrap();
            say(&format!("locked {:?}", guard.acquired()));
            await_line("exec");
            let e = Command::new("cat").exec();
            panic!("exec cat: {e}");
        }
        // Try to create the segment (as whatever user we run as), say how it went, and exit.
        "create" => {
            match Segment::create(&standard_spec(&run_dir, &instance, 2)) {
                Ok(_) => say("created"),
                Err(e) => say(&format!("refused: {e}")),
            }
            std::process::exit(0);
        }
        // Be a coordinator: create, hold the daemon mutexes, record itself.
        "coordinator" => {
            let (seg, starting) =
                Segment::create(&standard_spec(&run_dir, &instance, 2)).expect("helper creating");
            for id in [MutexId::Daemon, MutexId::DaemonStandby] {
                seg.mutex(id).unwrap().lock().unwrap().hold_until_exit();
            }
            let me = ProcessIdentity::current().unwrap();
            {
                let w = seg.write().unwrap();
                w.set_coordinator(Some(me));
                w.set_manager(None);
            }
            drop(starting);
            say("ready");
            idle_until_stdin_closes();
        }
        // Storm: wait for "go", then 10,000 read-modify-writes of a counter.
        "storm" => {
            let seg = open();
            say("ready");
            await_line("go");
            for _ in 0..10_000 {
                let w = seg.write().unwrap();
                let n = w.restart_count(0).unwrap();
                w.set_restart_count(0, n + 1).unwrap();
            }
            say("done");
            std::process::exit(0);
        }
        // Die in the middle of a change of the state table.
        "die-writing" => {
            let seg = open();
            let w = seg.write().unwrap();
            w.set_service_state(0, ServiceState::Starting, monotonic_ms())
                .unwrap();
            say("writing");
            idle_until_stdin_closes();
        }
        other => panic!("unknown helper role {other:?}"),
    }
}

//! Helpers of the service API's tests, which play the coordinator's side with the library's
//! own functions: a per-test instance (main segment, control segment, API file, a notify
//! socket and a log file in a private directory) that removes everything when dropped; the
//! example services (Rust and C), built once per test binary; helper processes made by
//! re-executing the test binary in a role (the coordinator holding the daemon component, a
//! probe running as `nobody`); and guards that SIGKILL and reap every process a test started,
//! even when it fails. Nothing sleeps and hopes: every wait polls a condition with a deadline
//! or waits for an event.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use ccmgr::config::Takeover;
use ccmgr::notify::NotifySocket;
use ccmgr::shm::api::{ApiService, ApiSpec, ControlSegment};
use ccmgr::shm::{Deadline, Segment, SegmentSpec, ServiceStatic};

/// How long any step may take before the test counts it as hung.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub const ROLE_VAR: &str = "CCMGR_API_TEST_ROLE";
pub const INSTANCE_VAR: &str = "CCMGR_API_TEST_INSTANCE";
pub const RUN_DIR_VAR: &str = "CCMGR_API_TEST_RUN_DIR";

/// `nobody` and `nogroup` on Debian.
pub const NOBODY: (u32, u32) = (65534, 65534);

// ----- the example services ------------------------------------------------------------------

/// The built example services.
pub struct Artifacts {
    /// examples/cc_service.rs.
    pub rust_service: PathBuf,
    /// examples/c/cc_service.c, linked against libccmgr_service.so.
    pub c_service: PathBuf,
}

/// Build the examples once per test binary: `cargo build` of the Rust example and of the C
/// library into this test's own target directory and profile (skipped when
/// `CCMGR_TEST_PREBUILT` says they were built before the tests, as CI does), then `cc` of the
/// C example against `include/ccmgr.h`.
pub fn artifacts() -> &'static Artifacts {
    static BUILT: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(a) => a,
        Err(e) => panic!("building the example services failed:\n{e}"),
    }
}

fn build() -> Result<Artifacts, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the test binary is not in <target>/<profile>/deps")?
        .to_path_buf();
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("no profile directory")?;
    let profile_args: Vec<&str> = match profile {
        "debug" => vec![],
        "release" => vec!["--release"],
        other => vec!["--profile", other],
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // CI builds both once, before the tests (`cargo build -p ccmgr -p ccmgr-capi --lib
    // --examples`), and says so: a nested cargo per test binary would only wait on the target
    // directory's lock.
    let prebuilt = std::env::var_os("CCMGR_TEST_PREBUILT").is_some();
    for what in [
        &["--example", "cc_service", "-p", "ccmgr"][..],
        &["-p", "ccmgr-capi"][..],
    ] {
        if prebuilt {
            break;
        }
        run(Command::new(env!("CARGO"))
            .arg("build")
            .args(what)
            .args(&profile_args)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(root))?;
    }
    // Tests run some services as nobody, who may not be able to reach the target directory
    // (a checkout under a 0700 directory, as `mktemp -d` makes): the services and the C
    // library they link are copied to a directory anyone can enter, one per test process.
    let shared = shared_dir()?;
    let rust_service = shared.join("cc_service");
    copy_executable(&profile_dir.join("examples/cc_service"), &rust_service)?;
    copy_executable(
        &profile_dir.join("libccmgr_service.so"),
        &shared.join("libccmgr_service.so"),
    )?;
    let c_service = shared.join("cc_service_c");
    run(Command::new("cc")
        .args([
            "-std=c99",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-I",
        ])
        .arg(root.join("include"))
        .arg("-o")
        .arg(&c_service)
        .arg(root.join("examples/c/cc_service.c"))
        .arg("-L")
        .arg(&shared)
        .arg("-lccmgr_service")
        .arg(format!("-Wl,-rpath,{}", shared.display())))?;
    Ok(Artifacts {
        rust_service,
        c_service,
    })
}

/// `<tmp>/ccmgr-api-examples-<pid>`, mode 0755 all the way: made anew for this process, after
/// removing those of earlier test processes that are gone.
fn shared_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = std::env::temp_dir();
    let prefix = "ccmgr-api-examples-";
    if let Ok(entries) = fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let gone = name
                .strip_prefix(prefix)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if gone {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("{prefix}{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// This test binary, copied once to the shared directory, for helpers running as others.
fn test_binary_for_others() -> PathBuf {
    static COPY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let copy = COPY.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let to = shared_dir()?.join(exe.file_name().ok_or("the test binary has no name")?);
        copy_executable(&exe, &to)?;
        Ok(to)
    });
    match copy {
        Ok(path) => path.clone(),
        Err(e) => panic!("cannot copy the test binary for another user: {e}"),
    }
}

fn copy_executable(from: &Path, to: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::copy(from, to).map_err(|e| {
        format!(
            "copying {} to {}: {e} (with CCMGR_TEST_PREBUILT set, build them first: \
             cargo build -p ccmgr -p ccmgr-capi --lib --examples)",
            from.display(),
            to.display()
        )
    })?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ----- a test instance -----------------------------------------------------------------------

/// An instance of its own for one test: the coordinator's main segment (so services can check
/// who owns the instance), the control segment and API file, and a directory any user can
/// enter with the notify socket and the services' log. Everything is removed on drop.
pub struct TestInstance {
    pub name: String,
    pub ids: Vec<String>,
    pub ctl: ControlSegment,
    pub main: Segment,
    pub notify: NotifySocket,
    pub log: PathBuf,
    dir: tempfile::TempDir,
}

impl TestInstance {
    /// Services `ids` (indices in that order), shut down in that same order.
    pub fn new(tag: &str, ids: &[&str], takeover: Takeover) -> TestInstance {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "api.{tag}.{}.{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // The instance's run directory, which any user can enter (as /run/ccmgr): the
        // services reach the control segment, the API file, the notify socket and the log.
        let dir = tempfile::tempdir().expect("a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let n = ids.len() as u32;
        let (main, starting) = Segment::create(&SegmentSpec {
            instance: name.clone(),
            run_dir: dir.path().to_owned(),
            group: None,
            services: ids
                .iter()
                .map(|id| ServiceStatic {
                    id: (*id).to_owned(),
                    startup_timeout_ms: 10_000,
                    shutdown_timeout_ms: 10_000,
                })
                .collect(),
            startup_sequence: (0..n).collect(),
            shutdown_sequence: (0..n).collect(),
            config_blob: Vec::new(),
        })
        .expect("creating the main segment");
        drop(starting);
        let ctl = ControlSegment::create(&ApiSpec {
            instance: name.clone(),
            run_dir: dir.path().to_owned(),
            services: ids
                .iter()
                .map(|id| ApiService {
                    id: (*id).to_owned(),
                    shutdown_timeout_ms: 10_000,
                })
                .collect(),
            shutdown_sequence: (0..n).collect(),
            takeover,
        })
        .expect("creating the control segment and the API file");
        let notify = NotifySocket::bind(&dir.path().join("notify")).expect("the notify socket");
        let log = dir.path().join("services.log");
        fs::write(&log, "").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
        TestInstance {
            name,
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            ctl,
            main,
            notify,
            log,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn index(&self, id: &str) -> usize {
        self.ids.iter().position(|s| s == id).expect("a service id")
    }

    /// Start the "coordinator" helper, which opens the control segment and holds the daemon
    /// component; returns once it holds it, with whether the previous holder died.
    pub fn coordinator(&self) -> (Helper, bool) {
        let mut h = Helper::spawn("coordinator", self.dir(), &self.name, None);
        let line = h.expect_line("holding");
        (h, line == "holding died=true")
    }

    /// Start a service from `program` with `-cc`, as ccmgr would: the environment names the
    /// instance, the service and the notify socket. The callback takes `stop_ms`.
    pub fn service(
        &self,
        program: &Path,
        id: &str,
        stop_ms: u64,
        as_user: Option<(u32, u32)>,
    ) -> Proc {
        let mut cmd = Command::new(program);
        cmd.arg("-cc")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("CCMGR_INSTANCE", &self.name)
            .env("CCMGR_RUN_DIR", self.dir())
            .env("CCMGR_SERVICE", id)
            .env("NOTIFY_SOCKET", self.notify.path())
            .env("CC_SERVICE_LOG", &self.log)
            .env("CC_SERVICE_STOP_MS", stop_ms.to_string())
            .env("CC_SERVICE_HEARTBEAT_MS", "60000")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some((uid, gid)) = as_user {
            cmd.uid(uid).gid(gid);
        }
        Proc::spawn(id, cmd)
    }

    /// Wait until every process of `procs` has sent `READY=1` (attributed by the kernel to its
    /// pid) on the notify socket.
    pub fn wait_ready(&self, procs: &[&Proc]) {
        let mut waiting: HashMap<i32, String> =
            procs.iter().map(|p| (p.pid(), p.name.clone())).collect();
        let deadline = Instant::now() + PATIENCE;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "never ready: {waiting:?}");
            let mut fds = [nix::poll::PollFd::new(
                self.notify.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
            while let Some(msg) = self.notify.recv().expect("reading the notify socket") {
                if msg.is_ready() {
                    waiting.remove(&msg.pid);
                }
            }
            for p in procs {
                assert!(
                    !waiting.contains_key(&p.pid()) || p.is_running(),
                    "{} exited before it was ready",
                    p.name
                );
            }
        }
    }

    /// The lines the services' callbacks wrote.
    pub fn log_lines(&self) -> Vec<LogLine> {
        fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(LogLine::parse)
            .collect()
    }

    /// Poll until the log has a line satisfying `pred`.
    pub fn wait_for_log(&self, what: &str, pred: impl Fn(&LogLine) -> bool) {
        wait_until(what, || self.log_lines().iter().any(&pred));
    }
}

impl Drop for TestInstance {
    fn drop(&mut self) {
        let _ = ControlSegment::remove(self.dir(), &self.name);
        let _ = Segment::remove(self.dir(), &self.name);
    }
}

/// One line of the services' log: `begin <id> <ns>` or `shutdown <id> <ns> <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub what: String,
    pub id: String,
    pub ns: u128,
    pub reason: Option<String>,
}

impl LogLine {
    fn parse(line: &str) -> LogLine {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "bad log line {line:?}");
        LogLine {
            what: f[0].to_owned(),
            id: f[1].to_owned(),
            ns: f[2].parse().expect("a timestamp"),
            reason: f.get(3).map(|s| (*s).to_owned()),
        }
    }
}

/// Check that the services `order` ran their callbacks one after the other in that order,
/// each beginning only after the one before it finished, and that no one else did.
pub fn assert_shut_down_in_order(lines: &[LogLine], order: &[&str]) {
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l.what.as_str(), l.id.as_str()))
        .collect();
    let expected: Vec<(&str, &str)> = order
        .iter()
        .flat_map(|id| [("begin", *id), ("shutdown", *id)])
        .collect();
    assert_eq!(seen, expected, "the callbacks' log: {lines:#?}");
    for pair in lines.windows(2) {
        assert!(
            pair[0].ns <= pair[1].ns,
            "{pair:?}: a callback began before the one before it finished"
        );
    }
}

// ----- processes -----------------------------------------------------------------------------

/// A process a test started: SIGKILLed and reaped on drop if still there.
pub struct Proc {
    pub name: String,
    child: Child,
    reaped: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            reaped: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Still running: not reaped, and not a zombie (checked without reaping, so the pid
    /// cannot have been reused).
    pub fn is_running(&self) -> bool {
        self.reaped.is_none()
            && ccmgr::process_identity::read_stat(self.pid()).is_ok_and(|s| !s.is_finished())
    }

    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let s = self.child.wait().expect("reaping");
        self.reaped = Some(s);
        s
    }

    /// Wait (polling, with a deadline) for the process to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.reaped {
            return s;
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.child.try_wait().expect("waiting") {
                self.reaped = Some(s);
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} (pid {}) did not exit within {PATIENCE:?}",
                self.name,
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
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

/// A helper process: this test binary re-executed in a role, talking in lines.
pub struct Helper {
    proc_: Proc,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

/// Marks the helper's own lines (the test harness writes to the same stdout).
const MARKER: &str = "api-helper: ";

impl Helper {
    pub fn spawn(
        role: &str,
        run_dir: &Path,
        instance: &str,
        as_user: Option<(u32, u32)>,
    ) -> Helper {
        // Another user may not reach this test binary where cargo built it (see shared_dir).
        let exe = match as_user {
            Some(_) => test_binary_for_others(),
            None => std::env::current_exe().unwrap(),
        };
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
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        if let Some((uid, gid)) = as_user {
            cmd.uid(uid).gid(gid);
        }
        let mut proc_ = Proc::spawn(role, cmd);
        let stdout = proc_.child.stdout.take().unwrap();
        let stdin = proc_.child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(said) = line.strip_prefix(MARKER)
                    && tx.send(said.to_owned()).is_err()
                {
                    break;
                }
            }
        });
        Helper {
            proc_,
            stdin,
            lines,
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc_.pid()
    }

    /// The next line of the helper's that starts with `prefix` (others are skipped).
    pub fn expect_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => panic!(
                    "helper {} ({}) did not say {prefix:?}",
                    self.proc_.name,
                    self.pid()
                ),
            }
        }
    }

    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn kill9(&mut self) -> ExitStatus {
        self.proc_.kill9()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        drop(self.stdin.take());
        self.proc_.wait_exit()
    }
}

// ----- observing services --------------------------------------------------------------------

/// Poll `cond` until it holds; panic after `PATIENCE`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The system call the service's `ccmgr-api` thread is blocked in (the first field of
/// `/proc/<pid>/task/<tid>/syscall`), if it has that thread.
pub fn api_thread_syscall(pid: i32) -> Option<i64> {
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        let comm = fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() == "ccmgr-api" {
            let text = fs::read_to_string(task.join("syscall")).ok()?;
            return text.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// Poll until every process's API thread sleeps in `futex`.
pub fn wait_until_api_threads_sleep_in_futex(pids: &[i32]) {
    wait_until("every API thread sleeps in futex", || {
        pids.iter()
            .all(|&pid| api_thread_syscall(pid) == Some(libc::SYS_futex))
    });
}

/// utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Check that no process of `pids` burns CPU: over `window`, each uses at most one clock tick
/// (10 ms), which a spinning thread would exceed a hundredfold.
pub fn assert_no_cpu_used(pids: &[i32], window: Duration) {
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    std::thread::sleep(window);
    for (&pid, b) in pids.iter().zip(before) {
        let used = cpu_ticks(pid) - b;
        assert!(used <= 1, "process {pid} used {used} ticks in {window:?}");
    }
}

// ----- helper roles --------------------------------------------------------------------------

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{MARKER}{line}").unwrap();
    out.flush().unwrap();
}

/// Run the helper role named by the environment, if any (then never return). Called from
/// each test binary's `child_role_entry` test.
pub fn run_role_if_requested(extra: impl FnOnce(&str, &Path, &str)) {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    let instance = std::env::var(INSTANCE_VAR).expect("the helper's instance");
    let run_dir = PathBuf::from(std::env::var_os(RUN_DIR_VAR).expect("the helper's run_dir"));
    match role.as_str() {
        // The coordinator's side: hold the daemon component; release it asking the services
        // listed ("release 0,2"), re-take it ("retake"); end when stdin closes.
        "coordinator" => {
            let ctl =
                ControlSegment::open(&run_dir, &instance).expect("opening the control segment");
            let mut holder = ctl
                .hold_daemon_component(Deadline::after(PATIENCE))
                .expect("taking the daemon component");
            say(&format!("holding died={}", holder.previous_holder_died()));
            for line in std::io::stdin().lines() {
                let line = line.unwrap();
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("release"), list) => {
                        let asked: Vec<usize> = list
                            .unwrap_or("")
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(|s| s.parse().unwrap())
                            .collect();
                        let epoch = holder.release_for_shutdown(&asked).unwrap();
                        say(&format!("released {epoch}"));
                    }
                    (Some("retake"), _) => {
                        holder.retake(Deadline::after(PATIENCE)).unwrap();
                        say("retaken");
                    }
                    _ => panic!("unknown command {line:?}"),
                }
            }
            std::process::exit(0);
        }
        other => {
            extra(other, &run_dir, &instance);
            panic!("unknown helper role {other:?}");
        }
    }
}

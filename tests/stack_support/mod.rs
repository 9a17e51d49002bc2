//! A running stack for integration tests: its own instance name, temp directory, config and
//! services; driven through the real `ccmgr` binary; and torn down on drop, even when the
//! test failed: `ccmgr stop`, then SIGKILL (by pid) of anything of the instance still alive,
//! then reaping of the keeper, which comes back to this process because the test process is
//! a child subreaper (this machine's init does not reliably reap orphans).

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde_json::Value;

pub const CCMGR: &str = env!("CARGO_BIN_EXE_ccmgr");

/// The binary the stacks run: `CCMGR_TEST_BIN` if set (to check that a regression test fails
/// with an older build), else the one cargo built.
pub fn ccmgr_bin() -> String {
    std::env::var("CCMGR_TEST_BIN").unwrap_or_else(|_| CCMGR.to_owned())
}

static SUBREAPER: Once = Once::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Every orphan of a test's stack comes back to the test process, which reaps it by pid.
fn become_subreaper() {
    SUBREAPER.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    });
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub instance: String,
    /// Every pid this stack was seen to use: killed and reaped on drop if still there.
    seen: std::cell::RefCell<HashSet<i32>>,
}

impl Stack {
    /// A stack named after the test, with `global` appended to its ccmgr.toml and one service
    /// file per `(id, toml)`.
    pub fn new(test: &str, global: &str, services: &[(&str, &str)]) -> Stack {
        become_subreaper();
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "cc-{}-",
                test.chars().take(12).collect::<String>()
            ))
            .tempdir()
            .unwrap();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let instance = format!(
            "t-{}-{}-{n}",
            test.chars().take(30).collect::<String>(),
            std::process::id()
        );
        let config =
            format!("instance = \"{instance}\"\nlog_dir = \"log\"\nrun_dir = \"run\"\n{global}\n");
        std::fs::write(dir.path().join("ccmgr.toml"), config).unwrap();
        std::fs::create_dir_all(dir.path().join("services.d")).unwrap();
        let stack = Stack {
            dir,
            instance,
            seen: Default::default(),
        };
        for (id, text) in services {
            stack.write_service(id, text);
        }
        stack
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the stack's directory, as a string for service commands.
    pub fn file(&self, name: &str) -> String {
        self.path().join(name).display().to_string()
    }

    pub fn write_service(&self, id: &str, text: &str) {
        std::fs::write(
            self.path().join("services.d").join(format!("{id}.toml")),
            text,
        )
        .unwrap();
    }

    pub fn log_dir(&self) -> PathBuf {
        self.path().join("log")
    }

    /// The instance's run directory (`run_dir = "run"` in its ccmgr.toml), where its shared
    /// state, notify socket and records are.
    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    /// The instance's main segment: `<run_dir>/<instance>.seg`.
    pub fn segment_path(&self) -> PathBuf {
        self.run_dir().join(format!("{}.seg", self.instance))
    }

    /// The files of the instance's shared state (the main segment, the service API's control
    /// segment and API file) that exist now.
    pub fn state_files(&self) -> Vec<PathBuf> {
        ["seg", "ctl", "api"]
            .iter()
            .map(|ext| self.run_dir().join(format!("{}.{ext}", self.instance)))
            .filter(|p| p.exists())
            .collect()
    }

    /// Runs `ccmgr --config <stack> <args>`.
    pub fn ccmgr(&self, args: &[&str]) -> Output {
        let out = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(self.path().join("ccmgr.toml"))
            .args(args)
            .env_remove("CCMGR_CONFIG")
            .output()
            .expect("ccmgr runs");
        self.remember_pids();
        out
    }

    /// Runs `ccmgr --config <stack> <args>` as nobody (uid 65534, group nogroup 65534), after
    /// letting nobody reach the stack's directory, run_dir and configuration file (the
    /// sockets' own modes still apply). It runs a copy of the binary in the stack's directory:
    /// the build's own may sit under a directory only root can enter (CI builds in a fresh
    /// `mktemp -d`, mode 0700). A copy just written may be busy for a moment (ETXTBSY: a
    /// child another test thread forked meanwhile holds the writer's fd until it execs): then
    /// it is run again.
    pub fn ccmgr_as_nobody(&self, args: &[&str]) -> Output {
        use std::os::unix::fs::PermissionsExt as _;
        use std::os::unix::process::CommandExt as _;
        for dir in [self.path().to_path_buf(), self.run_dir()] {
            let mut perms = std::fs::metadata(&dir).unwrap().permissions();
            perms.set_mode(perms.mode() | 0o011);
            std::fs::set_permissions(&dir, perms).unwrap();
        }
        let config = self.path().join("ccmgr.toml");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let bin = self.path().join("ccmgr");
        if !bin.exists() {
            std::fs::copy(ccmgr_bin(), &bin).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let run = Command::new(&bin)
                .arg("--config")
                .arg(&config)
                .args(args)
                .env_remove("CCMGR_CONFIG")
                .uid(65534)
                .gid(65534)
                .output();
            match run {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                out => return out.expect("ccmgr runs as nobody"),
            }
        }
    }

    pub fn start(&self) -> Output {
        self.ccmgr(&["start"])
    }

    /// Starts the stack and asserts it came up.
    pub fn start_ok(&self) {
        let out = self.start();
        assert_eq!(out.status.code(), Some(0), "start failed:\n{}", text(&out));
    }

    pub fn stop(&self) -> Output {
        let pids = self.all_pids();
        let out = self.ccmgr(&["stop"]);
        self.reap(&pids);
        out
    }

    /// `status --json`, parsed; `None` when not running (exit 3).
    pub fn status(&self) -> Option<Value> {
        let out = self.ccmgr(&["status", "--json"]);
        match out.status.code() {
            Some(0) => Some(serde_json::from_slice(&out.stdout).expect("status --json is JSON")),
            Some(3) => None,
            other => panic!("status exited {other:?}: {}", text(&out)),
        }
    }

    /// `status --json` as the fault matrix reads it: `None` when not running (exit 3); the
    /// JSON whatever the exit code otherwise (a status that finds something wrong may exit
    /// non-zero and still describe it). Panics only on output that is not JSON.
    pub fn status_relaxed(&self) -> Option<Value> {
        let out = self.ccmgr(&["status", "--json"]);
        if out.status.code() == Some(3) {
            return None;
        }
        match serde_json::from_slice(&out.stdout) {
            Ok(v) => Some(v),
            Err(e) => panic!("status --json is not JSON ({e}): {}", text(&out)),
        }
    }

    /// [`Stack::wait_for`] over [`Stack::status_relaxed`].
    pub fn wait_for_relaxed(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl FnMut(&Option<Value>) -> bool,
    ) -> Option<Value> {
        poll_status(what, timeout, || self.status_relaxed(), condition)
    }

    /// Pids the test learned of itself, to be killed and reaped on drop if still there.
    pub fn remember(&self, pids: &[i32]) {
        self.seen.borrow_mut().extend(pids.iter().copied());
    }

    /// The status of service `id`.
    pub fn service(&self, id: &str) -> Value {
        let status = self.status().expect("the stack is running");
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no service {id} in {status}"))
            .clone()
    }

    pub fn pid_of(&self, id: &str) -> Option<i32> {
        self.service(id)["pid"].as_i64().map(|p| p as i32)
    }

    /// Polls `status` until `condition` holds, or panics after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl FnMut(&Option<Value>) -> bool,
    ) -> Option<Value> {
        poll_status(what, timeout, || self.status(), condition)
    }

    /// Waits until every service is up with the instance steady, and a standby is recorded:
    /// the whole start is over (the standby is its last step).
    pub fn wait_steady_with_standby(&self, timeout: Duration) -> Value {
        self.wait_for("a steady stack with its standby", timeout, |s| {
            s.as_ref()
                .is_some_and(|s| steady_and_all_up(s) && s["standby"]["pid"].is_i64())
        })
        .unwrap()
    }

    /// Waits until every service is up with the instance steady.
    pub fn wait_steady(&self, timeout: Duration) -> Value {
        self.wait_for("a steady stack", timeout, |s| {
            s.as_ref().is_some_and(steady_and_all_up)
        })
        .unwrap()
    }

    fn all_pids(&self) -> Vec<i32> {
        self.status_quiet()
            .map_or_else(Vec::new, |status| pids_in(&status))
    }

    fn status_quiet(&self) -> Option<Value> {
        let out = Command::new(ccmgr_bin())
            .args(["--config"])
            .arg(self.path().join("ccmgr.toml"))
            .args(["status", "--json"])
            .output()
            .ok()?;
        (out.status.code() == Some(0))
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn remember_pids(&self) {
        let pids = self.all_pids();
        self.seen.borrow_mut().extend(pids);
    }

    /// Reaps whichever of `pids` became our children (orphans re-parented to us).
    fn reap(&self, pids: &[i32]) {
        for &pid in pids {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    _ => break, // reaped, not our child (ECHILD), or given up
                }
            }
        }
    }

    /// Is `pid` a live (non-zombie) process?
    pub fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let mut pids: Vec<i32> = self.seen.borrow().iter().copied().collect();
        pids.extend(self.all_pids());
        let _ = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(self.path().join("ccmgr.toml"))
            .arg("stop")
            .output();
        // Whatever survived (a test that broke things on purpose, a bug): kill by pid and group.
        for &pid in &pids {
            if Stack::alive(pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        self.reap(&pids);
        // The state lives in the stack's own directory, removed with it.
    }
}

impl Stack {
    /// The coordinator's (and keeper's) own log.
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.log_dir().join(format!("ccmgr-{}.log", self.instance)))
            .unwrap_or_default()
    }

    /// The services in the order the coordinator started them (its "started" lines, which it
    /// writes when the keeper reports the process exists). A service's own "I started" line is
    /// no proof of order: two services whose dependency is up run concurrently.
    pub fn start_order(&self) -> Vec<String> {
        self.coordinator_log()
            .lines()
            .filter(|l| !l.contains("role=\"keeper\"") && l.contains(": started service="))
            .filter_map(|l| l.split("service=").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    }
}

/// Reads a status with `fetch` until `condition` holds, or panics after `timeout`.
fn poll_status(
    what: &str,
    timeout: Duration,
    mut fetch: impl FnMut() -> Option<Value>,
    mut condition: impl FnMut(&Option<Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = fetch();
        if condition(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `status` shows the instance steady with every service up.
pub fn steady_and_all_up(status: &Value) -> bool {
    status["state"] == "steady"
        && status["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["state"] == "up")
}

/// Whether `status` shows service `id` up under a pid other than `old`.
pub fn up_anew(status: &Value, id: &str, old: i32) -> bool {
    status["services"].as_array().unwrap().iter().any(|x| {
        x["id"] == id && x["state"] == "up" && x["pid"].as_i64().is_some_and(|p| p as i32 != old)
    })
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Reads a file of lines a test's services append to.
pub fn lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Polls until the file at `path` has at least `n` lines.
pub fn wait_lines(path: &str, n: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let l = lines(path);
        if l.len() >= n {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} lines in {path}; have {l:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `ccmgr` command running in the background; killed and reaped on drop if still running.
pub struct Running {
    pub child: Option<Child>,
}

impl Running {
    pub fn spawn(stack: &Stack, args: &[&str]) -> Running {
        let child = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(stack.path().join("ccmgr.toml"))
            .args(args)
            .env_remove("CCMGR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ccmgr runs");
        Running { child: Some(child) }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Whether it has ended (without reaping it).
    pub fn has_ended(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits for it to end; panics (killing it) if it is not done within `limit`.
    pub fn finish(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        let mut child = self.child.take().unwrap();
        loop {
            if child.try_wait().unwrap().is_some() {
                return child.wait_with_output().unwrap();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("ccmgr did not finish within {limit:?}:\n{}", text(&out));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The status record of service `id` in a `status --json` document.
pub fn service_of<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no service {id} in {status}"))
}

/// Every pid a `status --json` document names: coordinator, standby, keeper and services.
pub fn pids_in(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = ["coordinator", "standby", "keeper"]
        .iter()
        .filter_map(|k| status[*k]["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    pids.extend(
        status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["pid"].as_i64())
            .map(|p| p as i32),
    );
    pids
}

/// Whether the test may act as another user (it runs as root); outside CI a test that cannot
/// says why and is skipped, under CI (which runs as root) it must run.
pub fn need_root(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs the tests as root: this test must run"
    );
    eprintln!("skipped: needs root {why}");
    false
}

impl Stack {
    /// The keeper's process record (`run/<instance>.procs`).
    pub fn record_path(&self) -> PathBuf {
        self.path()
            .join("run")
            .join(format!("{}.procs", self.instance))
    }

    /// Waits until the keeper's record names `pid`: the keeper writes it once a burst of
    /// changes settles, so a test that spoils or removes it must wait for the write first,
    /// or the keeper's next write undoes what the test did.
    pub fn wait_record_names(&self, pid: i64) {
        let pid = pid.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(self.record_path()).is_ok_and(|t| t.contains(&pid)) {
            assert!(
                Instant::now() < deadline,
                "the keeper never wrote {} naming pid {pid}",
                self.record_path().display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Stack {
    /// The services the coordinator's log lines `verb` ("started", "stopping") name, from
    /// line `from` of its log on, in order (the keeper's own lines left out).
    pub fn logged(&self, from: usize, verb: &str) -> Vec<String> {
        let needle = format!(": {verb} service=");
        self.coordinator_log()
            .lines()
            .skip(from)
            .filter(|l| !l.contains("role=\"keeper\"") && l.contains(&needle))
            .filter_map(|l| l.split("service=").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    }

    /// How many lines the coordinator's log has now (a mark for [`Stack::logged`]).
    pub fn log_len(&self) -> usize {
        self.coordinator_log().lines().count()
    }

    /// SIGKILLs the coordinator `coordinator` and waits until another one supervises.
    pub fn kill_coordinator_until_successor(&self, coordinator: i32, limit: Duration) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(coordinator),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.wait_for("a new coordinator", limit, |s| {
            s.as_ref().is_some_and(|s| {
                s["coordinator"]["pid"]
                    .as_i64()
                    .is_some_and(|p| p as i32 != coordinator)
                    && s["supervised"] == true
            })
        });
    }
}

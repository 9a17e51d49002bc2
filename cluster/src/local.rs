//! The node's local ccmgr instance as the agent drives it, and the action commands.
//!
//! Everything goes through ccmgr's public CLI (`reload`, `start`/`stop NAME`, `status --json`,
//! `events --json`), never its internals: the agent then works with any running ccmgr, and a
//! restart of the agent loses nothing, since the services and their files live on in the
//! local instance. The agent owns exactly the files of the services directory whose first line
//! is its header ([`crate::spec::agent_header`]); it never touches another file, so an
//! operator's local service of the same name is refused, not overwritten.
//!
//! [`run_command`] runs the cluster's action commands (`notify_command`, `recovery_command`):
//! a shell in a process group of its own, killed whole at its timeout.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{Mutex, mpsc};

use crate::spec::{ClusterServiceSpec, HEADER_PREFIX};

/// Why an operation on the local instance failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot run {} on node {node}: {source}", .ccmgr.display())]
    Spawn {
        ccmgr: PathBuf,
        node: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} the local service file {} on node {node}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        node: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the local service file {} on node {node} was not written by the cluster agent; the agent leaves it alone (remove or rename it to let the cluster place service {service} here)",
        .path.display()
    )]
    NotOwned {
        service: String,
        path: PathBuf,
        node: String,
    },
    #[error("service {service} did not come up on node {node}: {message}")]
    Failed {
        service: String,
        node: String,
        message: String,
    },
    #[error("the local ccmgr instance of node {node} is not running")]
    NotRunning { node: String },
    #[error("`ccmgr {verb}` failed on node {node} ({status}): {message}")]
    Ccmgr {
        verb: String,
        node: String,
        status: String,
        message: String,
    },
    #[error("cannot read `ccmgr status --json` of node {node}: {message}")]
    Status { node: String, message: String },
}

/// One line of `ccmgr events --json` (the fields the agent uses; the others are ignored), or
/// `not-running`, which the follower itself reports when the instance is not running.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct LocalEvent {
    pub event: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub status: Option<i32>,
    #[serde(default)]
    pub signal: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
}

/// The local ccmgr instance of this node.
pub struct LocalCcmgr {
    ccmgr: PathBuf,
    config: PathBuf,
    services_dir: PathBuf,
    node: String,
    /// One reload, start or stop at a time: two reloads at once would each see the other's
    /// file half-way, and a stop's reload could undo a start's.
    lock: Mutex<()>,
    /// `--instance` and `--services-dir` as the agent was given them: passed to every local
    /// ccmgr call, so that the agent drives the instance it was told to.
    extra_args: Vec<std::ffi::OsString>,
}

/// What a finished ccmgr command said.
struct Outcome {
    code: Option<i32>,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl LocalCcmgr {
    pub fn new(ccmgr: PathBuf, config: PathBuf, services_dir: PathBuf, node: String) -> Self {
        Self {
            ccmgr,
            config,
            services_dir,
            node,
            lock: Mutex::new(()),
            extra_args: Vec::new(),
        }
    }

    /// Passes `--instance` (when given) and `--services-dir` to every local ccmgr call.
    pub fn with_instance(mut self, instance: Option<&str>) -> Self {
        if let Some(i) = instance {
            self.extra_args.push("--instance".into());
            self.extra_args.push(i.into());
        }
        self.extra_args.push("--services-dir".into());
        self.extra_args
            .push(self.services_dir.clone().into_os_string());
        self
    }

    fn file_of(&self, name: &str) -> PathBuf {
        self.services_dir.join(format!("{name}.toml"))
    }

    async fn run(&self, args: &[&str]) -> Result<Outcome, LocalError> {
        let out = Command::new(&self.ccmgr)
            .arg("--config")
            .arg(&self.config)
            .args(&self.extra_args)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| LocalError::Spawn {
                ccmgr: self.ccmgr.clone(),
                node: self.node.clone(),
                source,
            })?;
        Ok(Outcome {
            code: out.status.code(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
        })
    }

    fn ccmgr_error(&self, verb: &str, out: &Outcome) -> LocalError {
        if out.code == Some(3) {
            return LocalError::NotRunning {
                node: self.node.clone(),
            };
        }
        LocalError::Ccmgr {
            verb: verb.to_owned(),
            node: self.node.clone(),
            status: out.status.to_string(),
            message: out.stderr.clone(),
        }
    }

    /// Exclusive use of the local instance's cluster services, across processes: the agent's
    /// start and the fence guard's stop of the same node are two processes, and a stop that
    /// overtook a start in flight would leave the service running unfenced. An flock on
    /// `<services_dir>/.ccmgr-cluster.lock` (the kernel drops it when its holder dies), taken
    /// after this process's own mutex.
    async fn exclusive(
        &self,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, ()>,
            nix::fcntl::Flock<std::fs::File>,
        ),
        LocalError,
    > {
        let guard = self.lock.lock().await;
        let path = self.services_dir.join(".ccmgr-cluster.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| self.file_error("open", &path, e))?;
        let locked = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| io::Error::from(errno))
        })
        .await
        .map_err(|e| self.file_error("lock", &path, io::Error::other(e.to_string())))?
        .map_err(|e| self.file_error("lock", &path, e))?;
        Ok((guard, locked))
    }

    fn file_error(&self, what: &'static str, path: &Path, source: io::Error) -> LocalError {
        LocalError::File {
            what,
            path: path.to_owned(),
            node: self.node.clone(),
            source,
        }
    }

    /// The file's current text, if any; an error if it is there but not the agent's.
    fn owned_text(&self, name: &str) -> Result<Option<String>, LocalError> {
        let path = self.file_of(name);
        match std::fs::read_to_string(&path) {
            Ok(text) if text.starts_with(HEADER_PREFIX) => Ok(Some(text)),
            Ok(_) => Err(LocalError::NotOwned {
                service: name.to_owned(),
                path,
                node: self.node.clone(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.file_error("read", &path, e)),
        }
    }

    /// Writes `text` as `name`'s file, atomically: ccmgr never reads half a file. The
    /// temporary name is a dotfile, which ccmgr's drop-in rule ignores.
    fn write_file(&self, name: &str, text: &str) -> Result<(), LocalError> {
        let path = self.file_of(name);
        let temp = self.services_dir.join(format!(".{name}.toml.cluster-tmp"));
        std::fs::write(&temp, text).map_err(|e| self.file_error("write", &temp, e))?;
        std::fs::rename(&temp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            self.file_error("write", &path, e)
        })
    }

    fn remove_file(&self, name: &str) -> Result<(), LocalError> {
        let path = self.file_of(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.file_error("remove", &path, e)),
        }
    }

    /// Starts `spec`'s local part and returns once it is up (by its `ready`); an error names
    /// why it is not. The file is written (and the stack reloaded) only when it is absent or
    /// different; otherwise the service is started in place.
    pub async fn start_service(&self, spec: &ClusterServiceSpec) -> Result<(), LocalError> {
        self.start_service_if(spec, || true).await
    }

    /// [`LocalCcmgr::start_service`], if `still_valid` holds once this node's services are
    /// this call's alone (the agent checks its lease there: a start that waited for the lock
    /// while the lease ran out must not begin).
    pub async fn start_service_if(
        &self,
        spec: &ClusterServiceSpec,
        still_valid: impl Fn() -> bool,
    ) -> Result<(), LocalError> {
        let _guard = self.exclusive().await?;
        if !still_valid() {
            return Err(LocalError::Failed {
                service: spec.name.clone(),
                node: self.node.clone(),
                message: "not started: this node's lease ran out meanwhile".into(),
            });
        }
        let name = spec.name.as_str();
        let old = self.owned_text(name)?;
        if old.as_deref() != Some(spec.local_toml.as_str()) {
            self.write_file(name, &spec.local_toml)?;
            let out = self.run(&["reload"]).await?;
            match out.code {
                Some(0) => {}
                // The reload took the new configuration but a start failed: maybe this
                // service's, maybe another's. Only this one's state counts here.
                Some(1) => {
                    if !self.is_up_unlocked(name).await? {
                        return Err(self.failed(name, &out));
                    }
                }
                _ => {
                    // Refused (the file does not load, exit 2) or not running: put the old
                    // file back, so that a broken file never stays to fail every later reload.
                    match &old {
                        Some(text) => self.write_file(name, text)?,
                        None => self.remove_file(name)?,
                    }
                    return Err(self.ccmgr_error("reload", &out));
                }
            }
        }
        // `start` of an up service answers at once; it also starts one the reload kept held
        // (stopped by the operator) or one that failed before.
        let out = self.run(&["start", name]).await?;
        match out.code {
            Some(0) => {}
            Some(1) => return Err(self.failed(name, &out)),
            _ => return Err(self.ccmgr_error(&format!("start {name}"), &out)),
        }
        // `start` answers once the service was up; one that ended at once (before any
        // `ready` or `min_uptime` could tell) may be down already: say so, with ccmgr's reason.
        match self.service_state(name).await? {
            Some((state, _)) if state == "up" => Ok(()),
            Some((state, reason)) => Err(LocalError::Failed {
                service: name.to_owned(),
                node: self.node.clone(),
                message: format!(
                    "it is {state} right after its start: {}",
                    reason.unwrap_or_else(|| "ccmgr gives no reason".to_owned())
                ),
            }),
            None => Err(LocalError::Failed {
                service: name.to_owned(),
                node: self.node.clone(),
                message: "the running stack does not have it after its start".to_owned(),
            }),
        }
    }

    fn failed(&self, name: &str, out: &Outcome) -> LocalError {
        let message = out
            .stderr
            .strip_prefix("ccmgr: ")
            .unwrap_or(&out.stderr)
            .to_owned();
        LocalError::Failed {
            service: name.to_owned(),
            node: self.node.clone(),
            message,
        }
    }

    /// `ccmgr stop NAME`, tolerating a stack that has no such service or is not running.
    async fn stop_in_stack(&self, name: &str) -> Result<(), LocalError> {
        let out = self.run(&["stop", name]).await?;
        match out.code {
            // 2: the running stack does not have it; 3: nothing runs. 1: the stop failed,
            // but the reload that follows the file's removal stops it again.
            Some(0..=3) => Ok(()),
            _ => Err(self.ccmgr_error(&format!("stop {name}"), &out)),
        }
    }

    async fn reload_tolerating_not_running(&self) -> Result<(), LocalError> {
        let out = self.run(&["reload"]).await?;
        match out.code {
            Some(0) | Some(3) => Ok(()),
            _ => Err(self.ccmgr_error("reload", &out)),
        }
    }

    /// Stops `name` and removes its file, so that a later restart of the local stack cannot
    /// start it again by itself. A file that is not the agent's is refused, untouched.
    pub async fn stop_service(&self, name: &str) -> Result<(), LocalError> {
        let _guard = self.exclusive().await?;
        self.owned_text(name)?;
        self.stop_in_stack(name).await?;
        self.remove_file(name)?;
        self.reload_tolerating_not_running().await
    }

    /// The names of the services whose file in the services directory is the agent's.
    pub fn owned_files(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.services_dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|entry| {
                let file = entry.file_name().into_string().ok()?;
                let name = file.strip_suffix(".toml")?;
                if name.is_empty() || file.starts_with('.') {
                    return None;
                }
                let text = std::fs::read_to_string(entry.path()).ok()?;
                text.starts_with(HEADER_PREFIX).then(|| name.to_owned())
            })
            .collect();
        names.sort();
        names
    }

    /// Fencing: stops every service the agent placed here, removes their files, one reload.
    /// Goes on past a failed stop (the reload stops a removed service too) and reports the
    /// first error at the end.
    pub async fn stop_all_owned(&self) -> Result<(), LocalError> {
        let _guard = self.exclusive().await?;
        self.stop_all_owned_locked().await
    }

    /// The guard's fence: [`LocalCcmgr::stop_all_owned`], but waiting at most `wait` for the
    /// node's lock. An agent frozen (SIGSTOP) or slow in a start holds it; past its lease the
    /// agent's work counts for nothing, and the stop goes ahead without the lock.
    pub async fn fence_within(&self, wait: Duration) -> Result<(), LocalError> {
        let _guard = self.lock.lock().await;
        let path = self.services_dir.join(".ccmgr-cluster.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()
            .and_then(|mut file| {
                let until = std::time::Instant::now() + wait;
                loop {
                    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    {
                        Ok(locked) => return Some(locked),
                        Err((f, _)) if std::time::Instant::now() < until => {
                            file = f;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => return None,
                    }
                }
            });
        let result = self.stop_all_owned_locked().await;
        drop(lock);
        result
    }

    async fn stop_all_owned_locked(&self) -> Result<(), LocalError> {
        let mut first_error = None;
        let owned = self.owned_files();
        // One `ccmgr stop A B C`: the node's whole fence must fit in `fence_margin`, and one
        // process stops them all in shutdown order. If the running stack lacks one of them
        // (exit 2), each is stopped alone.
        let mut args: Vec<&str> = vec!["stop"];
        args.extend(owned.iter().map(String::as_str));
        let together = if owned.is_empty() {
            true
        } else {
            matches!(self.run(&args).await.map(|o| o.code), Ok(Some(0 | 1 | 3)))
        };
        for name in &owned {
            if !together && let Err(e) = self.stop_in_stack(name).await {
                first_error.get_or_insert(e);
            }
            if let Err(e) = self.remove_file(name) {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.reload_tolerating_not_running().await {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether `name` is up in the running stack (false when the stack is not running).
    pub async fn is_up(&self, name: &str) -> Result<bool, LocalError> {
        self.is_up_unlocked(name).await
    }

    async fn is_up_unlocked(&self, name: &str) -> Result<bool, LocalError> {
        Ok(self
            .service_state(name)
            .await?
            .is_some_and(|(state, _)| state == "up"))
    }

    /// `name`'s state and reason in `status --json`; None when the stack does not have it or
    /// is not running.
    async fn service_state(
        &self,
        name: &str,
    ) -> Result<Option<(String, Option<String>)>, LocalError> {
        let out = self.run(&["status", "--json"]).await?;
        match out.code {
            Some(0) => {}
            Some(3) => return Ok(None),
            _ => return Err(self.ccmgr_error("status --json", &out)),
        }
        #[derive(Deserialize)]
        struct Status {
            services: Vec<ServiceStatus>,
        }
        #[derive(Deserialize)]
        struct ServiceStatus {
            id: String,
            state: String,
            #[serde(default)]
            reason: Option<String>,
        }
        let status: Status = serde_json::from_str(&out.stdout).map_err(|e| LocalError::Status {
            node: self.node.clone(),
            message: e.to_string(),
        })?;
        Ok(status
            .services
            .into_iter()
            .find(|s| s.id == name)
            .map(|s| (s.state, s.reason)))
    }

    /// Follows the local instance's events (`ccmgr events --json`) for as long as the
    /// receiver lives, following again (after a short, growing pause) whenever the command
    /// ends: at a stop of the stack, or when the instance is not running yet. An instance
    /// found not running is reported once as a `not-running` event, and when it runs again,
    /// `running` comes before its next event (the follow then begins with the instance's last
    /// event, so that it is known at once). Needs a tokio runtime.
    pub fn follow_events(&self) -> mpsc::Receiver<LocalEvent> {
        let (tx, rx) = mpsc::channel(256);
        let ccmgr = self.ccmgr.clone();
        let config = self.config.clone();
        let extra_args = self.extra_args.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            let mut reported_not_running = false;
            loop {
                let last = if reported_not_running { "1" } else { "0" };
                let Ok(mut child) = Command::new(&ccmgr)
                    .arg("--config")
                    .arg(&config)
                    .args(&extra_args)
                    .args(["events", "--json", "-n", last])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                else {
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                };
                let mut lines = child.stdout.take().map(|out| BufReader::new(out).lines());
                let mut got_any = false;
                while let Some(reader) = lines.as_mut() {
                    tokio::select! {
                        () = tx.closed() => return,
                        line = reader.next_line() => match line {
                            Ok(Some(line)) => {
                                if let Ok(event) = serde_json::from_str::<LocalEvent>(&line) {
                                    got_any = true;
                                    if reported_not_running {
                                        reported_not_running = false;
                                        let running = LocalEvent {
                                            event: "running".to_owned(),
                                            service: None,
                                            pid: None,
                                            status: None,
                                            signal: None,
                                            state: None,
                                        };
                                        if tx.send(running).await.is_err() {
                                            return;
                                        }
                                    }
                                    if tx.send(event).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            _ => lines = None,
                        }
                    }
                }
                let status = child.wait().await;
                if status.ok().and_then(|s| s.code()) == Some(3) && !reported_not_running {
                    reported_not_running = true;
                    let event = LocalEvent {
                        event: "not-running".to_owned(),
                        service: None,
                        pid: None,
                        status: None,
                        signal: None,
                        state: None,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                if got_any {
                    pause = Duration::from_millis(100);
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        });
        rx
    }
}

/// Why an action command did not succeed. `output` holds its last lines (stdout and stderr).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` {how}{}", tail(.output))]
    Failed {
        command: String,
        how: String,
        output: String,
    },
    #[error("`{command}` did not finish within {} ms and was killed with its process group{}", .timeout.as_millis(), tail(.output))]
    TimedOut {
        command: String,
        timeout: Duration,
        output: String,
    },
}

fn tail(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("; its last output:\n{output}")
    }
}

/// How many bytes of a command's output are kept, and how many lines are shown.
const OUTPUT_KEEP: usize = 8192;
const OUTPUT_LINES: usize = 10;

/// Runs `cmd` with `/bin/sh -c` in a process group of its own, with `env` added to the
/// agent's environment; Ok only for exit 0. At `timeout` the whole group is killed (SIGKILL),
/// so a background child the command started dies with it.
pub async fn run_command(
    cmd: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), CommandError> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            command: cmd.to_owned(),
            source,
        })?;
    let pgid = child.id().and_then(|id| i32::try_from(id).ok());
    // Should the caller drop this future (a `select!`, a timeout of its own), the group dies
    // with it rather than running on unwatched.
    let mut group = GroupGuard(pgid);
    let output = Arc::new(std::sync::Mutex::new(Vec::new()));
    let readers = [
        child.stdout.take().map(|o| collect(o, output.clone())),
        child.stderr.take().map(|e| collect(e, output.clone())),
    ];
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let result = match waited {
        Ok(Ok(status)) => {
            // The shell ended by itself: what it left running in the background is its
            // business (and its process group id may soon be reused).
            group.0 = None;
            Ok(status)
        }
        Ok(Err(source)) => {
            group.kill();
            return Err(CommandError::Spawn {
                command: cmd.to_owned(),
                source,
            });
        }
        Err(_) => {
            group.kill();
            let _ = child.wait().await;
            Err(())
        }
    };
    // The shell is gone; a background child may hold the pipes open, so the output is taken
    // as it is after a short grace rather than at the pipes' end.
    for reader in readers.into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_millis(100), reader).await;
    }
    let output = last_lines(&output.lock().map(|o| o.clone()).unwrap_or_default());
    match result {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(CommandError::Failed {
            command: cmd.to_owned(),
            how: match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                _ => format!("ended ({status})"),
            },
            output,
        }),
        Err(()) => Err(CommandError::TimedOut {
            command: cmd.to_owned(),
            timeout,
            output,
        }),
    }
}

/// A process group killed (SIGKILL) when this is dropped, unless disarmed (`None`).
struct GroupGuard(Option<i32>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `from` to its end, keeping the last [`OUTPUT_KEEP`] bytes in `into`.
fn collect<R: AsyncRead + Unpin + Send + 'static>(
    mut from: R,
    into: Arc<std::sync::Mutex<Vec<u8>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if let Ok(mut kept) = into.lock() {
                kept.extend_from_slice(&buf[..n]);
                let excess = kept.len().saturating_sub(OUTPUT_KEEP);
                kept.drain(..excess);
            }
        }
    })
}

fn last_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(OUTPUT_LINES)..].join("\n")
}

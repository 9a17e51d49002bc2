//! The keeper's half of `ccmgr upgrade` (see [`crate::upgrade`] for the whole sequence): its
//! upgrade socket, the state it hands across `execve`, and rebuilding itself from that state.
//!
//! What survives the exec, and how:
//! - kept open (their `FD_CLOEXEC` cleared for the exec, set again by the new image): the
//!   notify socket, the control socket, the upgrade socket and the client's connection, each
//!   coordinator's and standby's socket (with the messages still queued for it), every
//!   service's log pipe and every failure command's output pipe (with its unfinished line);
//! - described in the state (a JSON document in a memfd, its fd on the new command line): the
//!   child table (pid, role, service index, identity), each service's pid and unacknowledged
//!   exit, the queued events, the coordinator, the successors and their recent deaths (as
//!   ages: `Instant`s do not cross an exec), the retired standbys, the failure commands and
//!   their deadlines, the cgroup tree's paths and whether services still join it;
//! - rebuilt from the instance's files as any keeper starts: the configuration and segment
//!   (from the segment, exactly as `internal keeper` opens them), the log sinks (reopened in
//!   append mode: a sink's only state is its file and size), the epoll set, signalfd,
//!   timerfd and watchdog.
//!
//! The children: `execve` keeps the pid, so every child stays ours. One that ends while the
//! keeper is between images is a zombie with its `SIGCHLD` pending (blocked signals and the
//! pending set survive `execve`): the new image's signalfd delivers it and it is reaped and
//! reported as any exit.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::protocol::{FromKeeper, Outbox};
use super::{
    HookOutput, HookRun, Keeper, KeeperError, Peer, RecentDeaths, Role, SUCCESSOR_LIMIT,
    SUCCESSOR_SPAN, Source, watch,
};
use crate::config::Config;
use crate::logsink::LogSink;
use crate::notify::NotifySocket;
use crate::process_identity::ProcessIdentity;
use crate::shm::Segment;
use crate::spawn::ProcessExit;
use crate::upgrade::{self, Reply, Request};

/// The keeper's side of upgrades: its socket, the client being served, and, in a new image,
/// how far the replacement of the coordinator has got.
#[derive(Default)]
pub(super) struct UpgradeSide {
    listener: Option<OwnedFd>,
    client: Option<OwnedFd>,
    phase: Phase,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    /// The old standby was killed: once it is reaped, the coordinator is.
    RetiringStandby(i32),
    /// The old coordinator was killed: the marker stays until a successor takes over.
    AwaitingTakeover,
}

/// Everything of a keeper that is not rebuilt from the instance's files. Fd numbers are those
/// left open across the exec.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeeperState {
    pub version: u32,
    pub instance: String,
    pub run_dir: PathBuf,
    pub foreground: bool,
    /// The binary the new image runs, and the one before it (restored on a roll-back).
    pub exe: PathBuf,
    pub previous_exe: PathBuf,
    pub notify_fd: RawFd,
    pub notify_file_id: Option<(u64, u64)>,
    pub control_fd: RawFd,
    pub upgrade_listener_fd: Option<RawFd>,
    pub upgrade_client_fd: Option<RawFd>,
    pub children: Vec<(i32, ChildRole)>,
    pub identities: Vec<(i32, u64)>,
    pub service_pids: Vec<Option<i32>>,
    /// Services whose log sink is open.
    pub logs_open: Vec<usize>,
    /// (read end, service) of each service's output pipe.
    pub log_pipes: Vec<(RawFd, usize)>,
    pub hook_outputs: Vec<HookOutputState>,
    pub peers: Vec<PeerState>,
    pub coordinator: Option<i32>,
    pub queued: Vec<FromKeeper>,
    pub unacked_exits: Vec<Option<(i32, ProcessExit)>>,
    /// (pid, milliseconds since it was started).
    pub successors: Vec<(i32, u64)>,
    /// Milliseconds since each recent successor death.
    pub successor_deaths_ago_ms: Vec<u64>,
    pub stop_after_takeover: bool,
    pub retired_standbys: Vec<i32>,
    pub coordinator_exit: Option<ProcessExit>,
    /// The cgroup tree's directory and path.
    pub cgroups: Option<(PathBuf, PathBuf)>,
    pub hooks: Vec<HookRunState>,
    pub hook_runs: u64,
    pub join_cgroups: bool,
    /// The open-files limit (soft, hard) the keeper had before it raised it: what services
    /// get back. Absent in a state of the first version of this format: the new image then
    /// takes the limit it finds.
    #[serde(default)]
    pub original_fd_limit: Option<(u64, u64)>,
    /// The cgroups of the services' runs. Absent in a state from before cgroups per run.
    #[serde(default)]
    pub run_cgroups: Option<super::run_cgroups::RunCgroupsState>,
}

/// A child's role, as the state names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildRole {
    Coordinator,
    Standby,
    Service(usize),
    Hook,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerState {
    pub pid: i32,
    pub fd: RawFd,
    pub closed: bool,
    /// Messages queued for it and not yet sent, as encoded.
    pub outbox: Vec<Vec<u8>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookOutputState {
    pub fd: RawFd,
    pub of: String,
    pub partial: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookRunState {
    pub pid: Option<i32>,
    /// Milliseconds left to its deadline (0: overdue), None once killed.
    pub due_in_ms: Option<u64>,
    pub cgroup: Option<String>,
}

impl From<Role> for ChildRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Coordinator => ChildRole::Coordinator,
            Role::Standby => ChildRole::Standby,
            Role::Service(s) => ChildRole::Service(s),
            Role::Hook => ChildRole::Hook,
        }
    }
}

impl From<ChildRole> for Role {
    fn from(role: ChildRole) -> Self {
        match role {
            ChildRole::Coordinator => Role::Coordinator,
            ChildRole::Standby => Role::Standby,
            ChildRole::Service(s) => Role::Service(s),
            ChildRole::Hook => Role::Hook,
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// The upgrade socket and requests on it.
impl Keeper {
    /// Binds the upgrade socket; without it the instance runs on, but cannot be upgraded.
    pub(super) fn bind_upgrade_socket(&mut self) {
        let path = upgrade::socket_path(&self.config.global.run_dir, &self.config.global.instance);
        match upgrade::bind_socket(&path) {
            Ok(fd) => {
                if let Err(e) = watch(
                    &self.epoll,
                    &mut self.sources,
                    fd.as_fd(),
                    Source::UpgradeListener,
                ) {
                    warn!(error = %e, "cannot watch the upgrade socket: `ccmgr upgrade` will not be served");
                    return;
                }
                self.upgrade.listener = Some(fd);
            }
            Err(e) => {
                warn!("cannot set up the upgrade socket ({e}): `ccmgr upgrade` will not be served")
            }
        }
    }

    /// Removes the upgrade socket at the keeper's end.
    pub(super) fn remove_upgrade_socket(&self) {
        let path = upgrade::socket_path(&self.config.global.run_dir, &self.config.global.instance);
        crate::socket_file::remove(&path);
    }

    /// Accepts a connection: the owner's is served (replacing one that sent nothing yet),
    /// anyone else's is answered `not-permitted` and closed.
    pub(super) fn on_upgrade_listener(&mut self) {
        let Some(listener) = &self.upgrade.listener else {
            return;
        };
        let Ok(conn) = upgrade::accept(listener.as_fd()) else {
            return;
        };
        let owner = nix::unistd::geteuid().as_raw();
        match getsockopt(&conn, sockopt::PeerCredentials).map(|c| c.uid()) {
            Ok(uid) if uid == owner => {}
            Ok(uid) => {
                let why = format!(
                    "uid {uid} may not upgrade this instance: only its owner (uid {owner}) may"
                );
                let _ = upgrade::send_message(conn.as_fd(), &Reply::NotPermitted { why });
                return;
            }
            Err(e) => {
                let why = format!("the caller's credentials cannot be read: {e}");
                let _ = upgrade::send_message(conn.as_fd(), &Reply::NotPermitted { why });
                return;
            }
        }
        self.drop_upgrade_client();
        if watch(
            &self.epoll,
            &mut self.sources,
            conn.as_fd(),
            Source::UpgradeClient,
        )
        .is_ok()
        {
            self.upgrade.client = Some(conn);
        }
    }

    fn drop_upgrade_client(&mut self) {
        if let Some(old) = self.upgrade.client.take() {
            super::unwatch(&self.epoll, &mut self.sources, old.as_fd());
        }
    }

    /// Answers the client and closes its connection.
    fn answer_upgrade_client(&mut self, reply: &Reply) {
        if let Some(conn) = &self.upgrade.client {
            let _ = upgrade::send_message(conn.as_fd(), reply);
        }
        self.drop_upgrade_client();
    }

    /// The client's request (or its end).
    pub(super) fn on_upgrade_client(&mut self) {
        let Some(conn) = &self.upgrade.client else {
            return;
        };
        let request = match upgrade::recv_message::<Request>(conn.as_fd()) {
            Ok(Some(request)) => request,
            Err(nix::errno::Errno::EAGAIN) => return,
            Ok(None) => return self.drop_upgrade_client(),
            Err(_) => {
                let why = "the request does not decode: is the client a ccmgr of another protocol?"
                    .to_owned();
                return self.answer_upgrade_client(&Reply::Refused { why });
            }
        };
        info!(exe = %request.exe.display(), "asked to upgrade");
        match self.check_upgrade(&request) {
            Err(why) => {
                warn!("upgrade refused: {why}");
                self.answer_upgrade_client(&Reply::Refused { why });
            }
            Ok(binary) => {
                let why = self.reexec(&request.exe, binary);
                error!("the upgrade failed: {why}; the keeper goes on as it was");
                self.answer_upgrade_client(&Reply::Failed { why });
            }
        }
    }

    /// Whether the stack may be upgraded to `request` now: the versions match, the stack is
    /// steady, and the binary passes the checks. Returns the binary, open.
    fn check_upgrade(&self, request: &Request) -> Result<OwnedFd, String> {
        use crate::shm::api::API_LAYOUT_VERSION;
        use crate::shm::layout::LAYOUT_VERSION;
        if request.state_version != upgrade::STATE_VERSION {
            return Err(format!(
                "the running keeper hands over its state in version {}, and the new ccmgr reads version {}: nothing was changed",
                upgrade::STATE_VERSION,
                request.state_version
            ));
        }
        if let Some(why) =
            upgrade::layout_refusal("segment", LAYOUT_VERSION, request.layout_version).or_else(
                || {
                    upgrade::layout_refusal(
                        "service API control segment",
                        API_LAYOUT_VERSION,
                        request.api_layout_version,
                    )
                },
            )
        {
            return Err(why);
        }
        let coordinator_lives = self
            .coordinator
            .is_some_and(|pid| self.children.get(&pid) == Some(&Role::Coordinator));
        let not_steady = if !coordinator_lives || self.takeover_due.is_some() {
            Some("no coordinator runs right now (a takeover is under way)")
        } else if self.shutdown_requested || self.last_resort.is_some() {
            Some("the stack is stopping")
        } else if self.reload_handover.is_some() {
            Some("a reload is being carried out")
        } else if self.peers.values().any(|p| p.closed) {
            Some("a coordinator or standby is ending")
        } else if !self.launching.is_empty() {
            // Forked children whose exec reports are still to be read: not in the state.
            Some("services are being started")
        } else {
            None
        };
        if let Some(why) = not_steady {
            return Err(format!("{why}: try again once the stack is steady"));
        }
        upgrade::open_checked_binary(&request.exe, nix::unistd::geteuid().as_raw())
    }

    /// Executes `binary` (opened from `exe`) on this keeper's state. Returns only on failure,
    /// with everything as it was, and why.
    fn reexec(&mut self, exe: &std::path::Path, binary: OwnedFd) -> String {
        let previous = match nix::fcntl::open(
            "/proc/self/exe",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                return format!("cannot keep hold of the running binary for a roll-back: {e}");
            }
        };
        let state = self.snapshot(exe);
        let bytes = match serde_json::to_vec(&state) {
            Ok(bytes) => bytes,
            Err(e) => return format!("cannot describe the keeper's state: {e}"),
        };
        let memfd = match upgrade::state_memfd(&bytes) {
            Ok(fd) => fd,
            Err(e) => return format!("cannot write the keeper's state into a memfd: {e}"),
        };
        let borrowed = self.handed_fds();
        if let Err(e) = upgrade::set_cloexec(&borrowed, false) {
            let _ = upgrade::set_cloexec(&borrowed, true);
            return format!("cannot keep the keeper's fds open across exec: {e}");
        }
        if let Some(conn) = &self.upgrade.client {
            let _ = upgrade::send_message(
                conn.as_fd(),
                &Reply::Executing {
                    exe: exe.to_path_buf(),
                },
            );
        }
        info!(exe = %exe.display(), fds = borrowed.len(), "the keeper re-executes itself");
        let args = upgrade::resume_args(
            &self.config.global.instance,
            &self.config.global.run_dir,
            memfd.as_raw_fd(),
            Some(previous.as_raw_fd()),
            None,
        );
        let mut argv: Vec<OsString> = args;
        argv[0] = exe.as_os_str().to_owned();
        let refs: Vec<&std::ffi::OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
        let errno = upgrade::exec_fd(binary.as_fd(), &refs);
        let _ = upgrade::set_cloexec(&borrowed, true);
        format!("cannot execute {}: {errno}", exe.display())
    }

    /// Every fd the state names.
    fn handed_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.notify.as_fd(), self.control.as_fd()];
        fds.extend(self.upgrade.listener.as_ref().map(|fd| fd.as_fd()));
        fds.extend(self.upgrade.client.as_ref().map(|fd| fd.as_fd()));
        fds.extend(self.peers.values().map(|p| p.socket.as_fd()));
        fds.extend(self.pipes.values().map(|fd| fd.as_fd()));
        fds.extend(self.hook_outputs.values().map(|h| h.pipe.as_fd()));
        fds
    }

    /// The state a new image rebuilds this keeper from.
    fn snapshot(&self, exe: &std::path::Path) -> KeeperState {
        let now = Instant::now();
        let successor_deaths = self.successor_deaths.times();
        KeeperState {
            version: upgrade::STATE_VERSION,
            instance: self.config.global.instance.clone(),
            run_dir: self.config.global.run_dir.clone(),
            foreground: self.foreground,
            exe: exe.to_path_buf(),
            previous_exe: self.exe.clone(),
            notify_fd: self.notify.as_fd().as_raw_fd(),
            notify_file_id: self.notify.file_id(),
            control_fd: self.control.as_raw_fd(),
            upgrade_listener_fd: self.upgrade.listener.as_ref().map(|fd| fd.as_raw_fd()),
            upgrade_client_fd: self.upgrade.client.as_ref().map(|fd| fd.as_raw_fd()),
            children: self.children.iter().map(|(&p, &r)| (p, r.into())).collect(),
            identities: self
                .identities
                .iter()
                .map(|(&p, id)| (p, id.start_time))
                .collect(),
            service_pids: self.service_pids.clone(),
            logs_open: (0..self.logs.len())
                .filter(|&s| self.logs[s].is_some())
                .collect(),
            log_pipes: self
                .pipes
                .keys()
                .filter_map(|&fd| match self.sources.get(&fd) {
                    Some(Source::LogPipe(service)) => Some((fd, *service)),
                    _ => None,
                })
                .collect(),
            hook_outputs: self
                .hook_outputs
                .iter()
                .map(|(&fd, h)| HookOutputState {
                    fd,
                    of: h.of.clone(),
                    partial: h.partial.clone(),
                })
                .collect(),
            peers: self
                .peers
                .iter()
                .map(|(&pid, p)| PeerState {
                    pid,
                    fd: p.socket.as_raw_fd(),
                    closed: p.closed,
                    outbox: p.outbox.queued(),
                })
                .collect(),
            coordinator: self.coordinator,
            queued: self.queued.clone(),
            unacked_exits: self.unacked_exits.clone(),
            successors: self
                .successors
                .iter()
                .map(|(&p, &t)| (p, ms(now.saturating_duration_since(t))))
                .collect(),
            successor_deaths_ago_ms: successor_deaths
                .iter()
                .map(|&t| ms(now.saturating_duration_since(t)))
                .collect(),
            stop_after_takeover: self.stop_after_takeover,
            retired_standbys: self.retired_standbys.iter().copied().collect(),
            coordinator_exit: self.coordinator_exit,
            cgroups: self
                .cgroups
                .as_ref()
                .map(|t| (t.dir().to_path_buf(), t.path().to_path_buf())),
            hooks: self
                .hooks
                .iter()
                .map(|h| HookRunState {
                    pid: h.pid,
                    due_in_ms: h.due.map(|d| ms(d.saturating_duration_since(now))),
                    cgroup: h.cgroup.clone(),
                })
                .collect(),
            hook_runs: self.hook_runs,
            join_cgroups: self.join_cgroups,
            original_fd_limit: crate::spawn::original_fd_limit(),
            run_cgroups: Some(self.run_cgroups.to_state()),
        }
    }
}

/// What a resuming keeper is started with (`internal keeper --resume-state`).
pub struct Resume {
    pub state: KeeperState,
    pub config: Config,
    /// The instance's segment, opened anew; taken by the rebuilt keeper.
    pub segment: Option<Segment>,
    /// Set in a rolled-back image: why the new one could not resume.
    pub rollback_reason: Option<String>,
}

/// Why a new image cannot resume from the state: it then rolls back.
fn mismatch(what: String) -> KeeperError {
    KeeperError::Resume(what)
}

/// Rebuilds the keeper from a previous image's state and runs it until the stack is stopped.
/// An error means nothing of the keeper runs, and every fd the state names is still open
/// with its close-on-exec flag clear: the caller can roll back ([`roll_back`]).
/// `resumed` is called once the keeper is rebuilt: no roll-back can come after it.
pub fn resume(mut resume: Resume, resumed: impl FnOnce()) -> Result<i32, KeeperError> {
    let mut keeper = build(&mut resume)?;
    resumed();
    // The fds handed over are this image's own now: none may leak into a child.
    let _ = upgrade::set_cloexec(&keeper.handed_fds(), true);
    // A subreaper stays one across exec, and the open-files limit stays raised; both are set
    // again all the same, as a keeper's start sets them (the limit services get back is the
    // one the first image had, not the raised one it handed down).
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let _ = match resume.state.original_fd_limit {
        Some(original) => crate::spawn::raise_fd_limit_from(original),
        None => crate::spawn::raise_fd_limit(),
    };
    // What ended between the images (its SIGCHLD is pending too; reaping is idempotent).
    let running = |k: &Keeper| k.service_pids.iter().flatten().count();
    let before = running(&keeper);
    keeper.reap_children();
    info!(
        services = before - running(&keeper),
        "reaped the services that ended while the keeper was between its two images"
    );
    let pid = std::process::id() as i32;
    match &resume.rollback_reason {
        Some(why) => {
            error!(
                "the new binary could not resume the keeper ({why}); this previous binary resumed it"
            );
            keeper.answer_upgrade_client(&Reply::RolledBack { why: why.clone() });
        }
        None => {
            info!(exe = %resume.state.exe.display(), previous = %resume.state.previous_exe.display(), "the keeper resumed from its state in the new binary");
            keeper.answer_upgrade_client(&Reply::Resumed {
                exe: resume.state.exe.clone(),
                keeper: pid,
            });
            keeper.replace_coordinator();
        }
    }
    Ok(super::finish(keeper))
}

fn build(resume: &mut Resume) -> Result<Keeper, KeeperError> {
    let Resume {
        state,
        config,
        segment,
        rollback_reason,
    } = resume;
    if state.version != upgrade::STATE_VERSION {
        return Err(mismatch(format!(
            "the state is version {}, this ccmgr reads version {}",
            state.version,
            upgrade::STATE_VERSION
        )));
    }
    let n = config.services.len();
    if state.service_pids.len() != n || state.unacked_exits.len() != n {
        return Err(mismatch(format!(
            "the state has {} services, the instance's configuration {n}",
            state.service_pids.len()
        )));
    }
    if let Some(&s) = state.logs_open.iter().find(|&&s| s >= n) {
        return Err(mismatch(format!(
            "the state names service {s}, which the configuration lacks"
        )));
    }
    // Every number first: nothing is taken (and so nothing could be closed by a failure) until
    // all are known to be there.
    for fd in handed_numbers(state) {
        if !upgrade::fd_is_open(fd) {
            return Err(mismatch(format!("fd {fd} was not handed over")));
        }
    }
    let (epoll, signals, timer) = super::event_core()?;
    let Some(segment) = segment.take() else {
        return Err(mismatch("the segment is already taken".into()));
    };
    // From here on the fds are owned by the keeper being built: a failure forgets it rather
    // than dropping it, so that they stay open for a roll-back.
    let claim = |fd: RawFd| upgrade::claim_handed_fd(fd);
    let now = Instant::now();
    let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
    let mut successor_deaths = RecentDeaths::new(SUCCESSOR_SPAN, SUCCESSOR_LIMIT);
    for t in &state.successor_deaths_ago_ms {
        successor_deaths.record(ago(*t));
    }
    let cgroups = state
        .cgroups
        .as_ref()
        .map(|(dir, path)| crate::cgroup::Tree::existing(dir, path));
    let ids: Vec<&str> = config.services.iter().map(|s| s.id.as_str()).collect();
    let run_cgroups =
        super::run_cgroups::RunCgroups::resume(cgroups.as_ref(), state.run_cgroups.clone(), &ids);
    let mut keeper = Keeper {
        config: config.clone(),
        foreground: state.foreground,
        // systemd's socket stays in the keeper's environment across the exec: the new image
        // relays to it as the old one did.
        init_system: super::init_system_relay(state.foreground),
        // A rolled-back image starts coordinators from the binary it ran before.
        exe: if rollback_reason.is_some() {
            state.previous_exe.clone()
        } else {
            state.exe.clone()
        },
        epoll,
        signals,
        timer,
        notify: NotifySocket::from_handed(
            claim(state.notify_fd),
            crate::keeper::notify_socket_path(config),
            state.notify_file_id,
        ),
        control: claim(state.control_fd),
        sources: HashMap::new(),
        children: state.children.iter().map(|&(p, r)| (p, r.into())).collect(),
        service_pids: state.service_pids.clone(),
        logs: (0..n).map(|_| None).collect(),
        pipes: HashMap::new(),
        hook_outputs: HashMap::new(),
        peers: HashMap::new(),
        coordinator: state.coordinator,
        queued: state.queued.clone(),
        unacked_exits: state.unacked_exits.clone(),
        shutdown_requested: false,
        successors: state.successors.iter().map(|&(p, t)| (p, ago(t))).collect(),
        successor_deaths,
        stop_after_takeover: state.stop_after_takeover,
        retired_standbys: state
            .retired_standbys
            .iter()
            .copied()
            .collect::<HashSet<_>>(),
        last_resort: None,
        takeover_due: None,
        identities: state
            .identities
            .iter()
            .map(|&(pid, start_time)| (pid, ProcessIdentity { pid, start_time }))
            .collect(),
        record_dirty: true,
        record_changed_at: None,
        watchdog: None,
        segment,
        coordinator_exit: state.coordinator_exit,
        cgroups,
        run_cgroups,
        // The upgrade is refused while spawns are being launched (see `check_upgrade`).
        launching: Vec::new(),
        hooks: state
            .hooks
            .iter()
            .map(|h| HookRun {
                pid: h.pid,
                due: h.due_in_ms.map(|ms| now + Duration::from_millis(ms)),
                cgroup: h.cgroup.clone(),
            })
            .collect(),
        hook_runs: state.hook_runs,
        join_cgroups: state.join_cgroups,
        reload_handover: None,
        upgrade: UpgradeSide::default(),
    };
    for &(fd, _) in &state.log_pipes {
        keeper.pipes.insert(fd, claim(fd));
    }
    for h in &state.hook_outputs {
        keeper.hook_outputs.insert(
            h.fd,
            HookOutput {
                pipe: claim(h.fd),
                of: h.of.clone(),
                partial: h.partial.clone(),
            },
        );
    }
    for p in &state.peers {
        keeper.peers.insert(
            p.pid,
            Peer {
                socket: claim(p.fd),
                closed: p.closed,
                outbox: Outbox::with_queued(p.outbox.clone()),
                watching_writable: false,
            },
        );
    }
    keeper.upgrade.listener = state.upgrade_listener_fd.map(claim);
    // Only answered, never read again: it is not watched.
    keeper.upgrade.client = state.upgrade_client_fd.map(claim);
    if let Err(e) = keeper.watch_everything(state) {
        // Its fds stay open for the roll-back: forgotten, not closed.
        std::mem::forget(keeper);
        return Err(e);
    }
    for &s in &state.logs_open {
        let spec = &config.services[s];
        match LogSink::open(
            &config.global.log_dir,
            &spec.id,
            super::LOG_MAX_BYTES,
            super::LOG_KEEP,
        ) {
            Ok(sink) => keeper.logs[s] = Some(sink),
            Err(e) => warn!(service = %spec.id, error = %e, "cannot reopen the service's log"),
        }
    }
    Ok(keeper)
}

impl Keeper {
    /// Puts every source of a rebuilt keeper in its epoll set.
    fn watch_everything(&mut self, state: &KeeperState) -> Result<(), KeeperError> {
        self.watch_core()?;
        for &(fd, service) in &state.log_pipes {
            if let Some(pipe) = self.pipes.get(&fd) {
                watch(
                    &self.epoll,
                    &mut self.sources,
                    pipe.as_fd(),
                    Source::LogPipe(service),
                )?;
            }
        }
        for output in self.hook_outputs.values() {
            watch(
                &self.epoll,
                &mut self.sources,
                output.pipe.as_fd(),
                Source::HookPipe,
            )?;
        }
        for (&pid, peer) in self.peers.iter().filter(|(_, p)| !p.closed) {
            watch(
                &self.epoll,
                &mut self.sources,
                peer.socket.as_fd(),
                Source::Peer(pid),
            )?;
        }
        if let Some(listener) = &self.upgrade.listener {
            watch(
                &self.epoll,
                &mut self.sources,
                listener.as_fd(),
                Source::UpgradeListener,
            )?;
        }
        Ok(())
    }
}

/// Executes the previous image back on the same state (`state_fd`), because this one could
/// not resume the keeper (`why`). Every fd the state names is still open and inheritable (a
/// failed [`resume`] leaves them so). Returns only if that exec fails too: the keeper is then
/// lost, and the caller exits.
pub fn roll_back(
    instance: &str,
    run_dir: &std::path::Path,
    state: BorrowedFd<'_>,
    previous_exe: &OwnedFd,
    why: &str,
) -> String {
    let _ = upgrade::set_cloexec(&[state], false);
    let mut argv = upgrade::resume_args(instance, run_dir, state.as_raw_fd(), None, Some(why));
    if let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", previous_exe.as_raw_fd())) {
        argv[0] = path.into_os_string();
    }
    let refs: Vec<&std::ffi::OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
    let errno = upgrade::exec_fd(previous_exe.as_fd(), &refs);
    format!("{why}; and the previous binary could not be executed again: {errno}")
}

/// The fd numbers a state names.
fn handed_numbers(state: &KeeperState) -> Vec<RawFd> {
    let mut fds = vec![state.notify_fd, state.control_fd];
    fds.extend(state.upgrade_listener_fd);
    fds.extend(state.upgrade_client_fd);
    fds.extend(state.peers.iter().map(|p| p.fd));
    fds.extend(state.log_pipes.iter().map(|&(fd, _)| fd));
    fds.extend(state.hook_outputs.iter().map(|h| h.fd));
    fds
}

/// Replacing the coordinator and standby after a resume in a new binary.
impl Keeper {
    /// Retires the old binary's standby; once it is reaped (or at once, with none), kills the
    /// coordinator, so that a successor from the new binary adopts the stack.
    fn replace_coordinator(&mut self) {
        // Written before anything is killed: the successor finds it when it takes over.
        let marker = self.upgrade_marker();
        if let Err(e) = std::fs::write(&marker, b"") {
            warn!(error = %e, path = %marker.display(), "cannot write the upgrade marker: under takeover = \"restart\", the new coordinator restarts the services");
        }
        let standbys: Vec<i32> = self
            .children
            .iter()
            .filter(|(pid, r)| **r == Role::Standby && !self.retired_standbys.contains(pid))
            .map(|(&pid, _)| pid)
            .collect();
        match standbys.first() {
            Some(&pid) => {
                for &pid in &standbys {
                    info!(pid, "upgrade: stopping the old binary's standby");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    self.retired_standbys.insert(pid);
                }
                self.upgrade.phase = Phase::RetiringStandby(pid);
            }
            None => self.kill_old_coordinator(),
        }
    }

    fn upgrade_marker(&self) -> PathBuf {
        upgrade::marker_path(&self.config.global.run_dir, &self.config.global.instance)
    }

    /// A coordinator took over: the upgrade is over. (The successor removes the marker once
    /// it has read it; it may not have yet.)
    pub(super) fn upgrade_on_takeover(&mut self) {
        if self.upgrade.phase == Phase::AwaitingTakeover {
            self.upgrade.phase = Phase::Idle;
        }
    }

    /// Removes the marker at the keeper's end (an upgrade cut short by a stop).
    pub(super) fn remove_upgrade_marker(&self) {
        let _ = std::fs::remove_file(self.upgrade_marker());
    }

    /// A child was reaped: the retired standby's end lets the coordinator's replacement go on.
    pub(super) fn upgrade_on_peer_exit(&mut self, pid: i32) {
        if self.upgrade.phase == Phase::RetiringStandby(pid) {
            self.kill_old_coordinator();
        }
    }

    fn kill_old_coordinator(&mut self) {
        if let Some(pid) = self
            .coordinator
            .filter(|pid| self.children.get(pid) == Some(&Role::Coordinator))
        {
            info!(
                pid,
                "upgrade: stopping the old binary's coordinator; a successor from the new binary adopts the stack"
            );
            // Killed on purpose: no quick death of a successor (upgrades in a row would
            // otherwise reach the successor limit, and the keeper would stop the stack).
            self.successors.remove(&pid);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.upgrade.phase = Phase::AwaitingTakeover;
    }
}

//! The coordinator process: the driver that connects the [`crate::engine`] to the world.
//!
//! It owns the instance's liveness locks (it holds the daemon and daemon standby mutexes, and
//! the service API's daemon component word, for as long as it lives, so the kernel announces
//! its death to whoever waits on them), the event loop, and the publication of state into the shared segment. The
//! loop blocks in `epoll` on: the keeper's socket (spawned, spawn failed, exited), the notify
//! socket (`READY=1`, attributed by the sender's kernel-checked pid), a signalfd (SIGTERM and
//! SIGINT stop the stack), the control socket (the operator's per-service requests, see
//! [`crate::control`]: accepted, read and answered without blocking, each request fed to the
//! engine as an event and answered once its work is done), and one timerfd armed for the
//! engine's nearest deadline (or for
//! trying a standby again after standbys kept dying). With nothing due it arms no timer at all:
//! an idle coordinator makes no wakeups, unless `[coordinator] watchdog` asks it to send the
//! keeper a sign of life each period.
//!
//! An exit is acknowledged to the keeper ([`ToKeeper::AckExit`]) only after the pass that
//! handled it has been published: until then the keeper holds it for a successor.
//!
//! Each event goes to the engine; its actions go to the keeper; then the state is published
//! to the segment, where `ccmgr status` reads it without asking anyone.
//!
//! A live reload (`ccmgr reload`, SIGHUP) is carried out here up to the handover of a new
//! segment to the keeper, and finished by the successor that adopts it: see the `reload`
//! submodule.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::{Config, Takeover};
use crate::control::protocol::{Reply, Request, UnknownService, Verb};
use crate::control::server::{ControlServer, Incoming, Pending};
use crate::engine::{
    Action, Engine, EngineParams, Event, Failure, FailureKind, KeeperFacts, KeeperNews, Outcome,
    Process, Readiness, Rest, RestartWindow, Slot, Snapshot, Time,
};
use crate::events::{EventTap, LifecycleEvent};
use crate::keeper::protocol::{self, FromKeeper, Outbox, ToKeeper, recv_message};
use crate::keeper::{
    COORDINATOR_CHANNEL_FD, COORDINATOR_CONTROL_FD, COORDINATOR_NOTIFY_FD, COORDINATOR_REPORT_FD,
    RecentDeaths,
};
use crate::notify::{self, DropTally, NotifySocket, Received, SenderFilter};
use crate::process_identity::ProcessIdentity;
use crate::shm::api::{ControlSegment, DaemonComponentHolder};
use crate::shm::events::EventRing;
use crate::shm::{
    Deadline, FailureCode, GaveUp, GiveUpReason, InstanceProgress, InstanceState, LastExit,
    MutexId, Segment, ServiceProgress, Stage, StopIntent, StopKind,
};
use crate::spawn::ProcessExit;
use crate::vocab::{ServiceState, Want};

mod reload;

pub use reload::{marker_path as reload_marker_path, marker_path_in as reload_marker_path_in};

/// Why the coordinator could not run.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Shm(#[from] crate::shm::ShmError),
    #[error("{0}")]
    Image(String),
    #[error("cannot set up the coordinator's event loop: {0}")]
    Setup(#[from] Errno),
    #[error("fd {0} was not handed to the coordinator: it must be started by the keeper")]
    MissingFd(RawFd),
    #[error("another coordinator holds the daemon mutex")]
    AlreadyCoordinated,
    #[error("cannot lock the {0} mutex: {1}")]
    Lock(&'static str, String),
    #[error(transparent)]
    Api(#[from] crate::shm::api::ApiError),
    #[error("lost the keeper, the parent of every service: nothing supervises them any more")]
    KeeperLost,
    #[error("cannot serve the control socket the keeper handed over: {0}")]
    Control(#[source] std::io::Error),
}

/// The line `ccmgr start` reads from the report pipe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartReport {
    /// Every service is up.
    Up,
    /// The startup sequence failed: `service` failed `how`; everything started was stopped.
    Failed { service: String, how: String },
}

/// How a run of the stack ended, kept in `run_dir` so `status` can say why after everything
/// is cleaned away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastOutcome {
    /// "stopped", "startup failed" or "gave up".
    pub outcome: String,
    pub service: Option<String>,
    /// In words: "exited with status 1".
    pub how: Option<String>,
    pub restarts: Option<u32>,
    /// Wall-clock seconds since the epoch when the stack ended.
    pub at_unix: u64,
}

/// The file a run's outcome is kept in.
pub fn last_outcome_path(config: &Config) -> PathBuf {
    config
        .global
        .run_dir
        .join(format!("{}.last", config.global.instance))
}

/// The coordinator's own log file.
/// The event ring `ccmgr events` follows: `<run_dir>/<instance>.events`.
pub fn events_path(config: &Config) -> PathBuf {
    events_path_in(&config.global.run_dir, &config.global.instance)
}

/// [`events_path`] from its parts.
pub fn events_path_in(run_dir: &std::path::Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.events"))
}

pub fn coordinator_log_path(config: &Config) -> PathBuf {
    coordinator_log_path_in(&config.global.log_dir, &config.global.instance)
}

/// [`coordinator_log_path`] from its parts.
pub fn coordinator_log_path_in(log_dir: &std::path::Path, instance: &str) -> PathBuf {
    log_dir.join(format!("ccmgr-{instance}.log"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Keeper,
    Notify,
    Signals,
    Timer,
    Watchdog,
    Control,
}

impl Source {
    const ALL: [Source; 6] = [
        Source::Keeper,
        Source::Notify,
        Source::Signals,
        Source::Timer,
        Source::Watchdog,
        Source::Control,
    ];

    fn token(self) -> u64 {
        self as u64
    }
}

struct Coordinator {
    config: Config,
    segment: Segment,
    engine: Engine,
    keeper: OwnedFd,
    notify: NotifySocket,
    signals: SignalFd,
    timer: TimerFd,
    report: Option<File>,
    /// The main pid of each service, as the keeper reported it.
    pids: Vec<Option<i32>>,
    /// Each running service's (pid, start time), read from /proc once when it starts: the
    /// segment records identities, and re-reading /proc at every publish would cost
    /// O(services) file reads per event.
    identities: Vec<Option<ProcessIdentity>>,
    /// The engine's time zero, and the same moment on the segment's monotonic clock.
    epoch: Instant,
    epoch_ms: u64,
    /// When this coordinator started, in engine time.
    started_at: Time,
    /// The keeper connection broke: nothing can be started or signalled any more.
    keeper_lost: bool,
    /// Requests to the keeper that its socket could not take yet.
    outbox: Outbox,
    /// READY=1 senders not yet known as services: (pid, session).
    unclaimed_ready: Vec<(i32, Option<i32>)>,
    /// Which notify senders may be a service's, judged from their credentials alone.
    notify_filter: SenderFilter,
    /// Notify datagrams dropped, counted for a summary line per period.
    notify_drops: DropTally,
    /// While a flood pauses reading the notify socket: until when (engine time).
    notify_paused_until: Option<Time>,
    /// Drops counted since (engine time), over a span of [`NOTIFY_FLOOD_PAUSE`]: a flood
    /// detector.
    notify_recent_drops: (Time, usize),
    /// The daemon component of the service API, held while no shutdown is asked for; its
    /// holder thread's death (with ours) is what API services see as the coordinator's death.
    gate: DaemonComponentHolder,
    /// The standby's pid, while one runs, and when it was started.
    standby: Option<i32>,
    standby_since: Option<Instant>,
    /// Recent deaths of standbys: one that keeps dying is not restarted for ever, but tried
    /// again after a quiet span.
    standby_deaths: RecentDeaths,
    /// While standbys are given up on: when (engine time) to try one again.
    standby_retry_at: Option<Time>,
    /// Exits handled in this loop pass, acknowledged to the keeper once published.
    pending_acks: Vec<(usize, i32)>,
    /// With `[coordinator] watchdog`: a periodic timer, at each tick of which the loop tells
    /// the keeper it is alive. None by default: an idle coordinator makes no wakeups.
    watchdog: Option<TimerFd>,
    /// Lifecycle events: to the ring (`ccmgr events`) and to the failure commands. None only
    /// until the first publication.
    events: Option<EventTap>,
    /// The control socket and the operator's requests on it.
    control: ControlServer,
    /// Per service, why its last spawn failed (cleared when one succeeds): a failed
    /// operator's start says it.
    spawn_errors: Vec<Option<String>>,
    /// A reload this coordinator carries out, until it hands over.
    reload: Option<reload::ReloadUnderWay>,
    /// The services a reload this coordinator finishes starts (taken over with the next
    /// segment, down and wanted up): the reload's client is told if one fails.
    reload_starts: Vec<usize>,
    /// When the keeper relays to an init system (systemd's `$NOTIFY_SOCKET`): what it has
    /// been told so far ([`crate::sd_notify`]). None otherwise, and nothing is composed.
    init_system: Option<crate::sd_notify::Announcer>,
}

/// The fds the keeper hands its coordinator, taken first thing at start, before anything
/// else could open a file on one of those numbers.
pub struct Handed {
    pub keeper: Option<OwnedFd>,
    pub notify: Option<OwnedFd>,
    pub report: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
}

impl Handed {
    /// Takes fds 3, 4, 5 and 6 (the report pipe only exists for a background start).
    pub fn take() -> Handed {
        Handed {
            keeper: protocol::take_inherited_fd(COORDINATOR_CHANNEL_FD),
            notify: protocol::take_inherited_fd(COORDINATOR_NOTIFY_FD),
            report: protocol::take_inherited_fd(COORDINATOR_REPORT_FD),
            control: protocol::take_inherited_fd(COORDINATOR_CONTROL_FD),
        }
    }
}

/// Which role the process starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The first coordinator of a start.
    Coordinator,
    /// A standby: waits for the coordinator's death, then takes over.
    Standby,
}

/// Runs the coordinator (or a standby that becomes one); returns the process exit code (0:
/// stopped on request, or a standby retired by an orderly stop; 1: failed).
/// The instance's state is in `run_dir`.
pub fn run(
    run_dir: &std::path::Path,
    instance: &str,
    handed: Handed,
    role: Role,
) -> Result<i32, CoordinatorError> {
    let segment = Segment::open(run_dir, instance)?;
    // A standby decodes the configuration only once it takes over: while it waits, which may
    // be for the stack's whole life, it holds nothing that grows with the stack. Decoding the
    // image adds to a takeover about 2 ms per thousand services (25 µs for ten).
    let took_over = match role {
        Role::Coordinator => false,
        Role::Standby => {
            let me = ProcessIdentity::current().ok();
            // What opening the segment read and let go of goes back before the long wait, and
            // so do the segment's pages it read to verify it (the coordinator and keeper keep
            // them mapped; a takeover maps them again).
            crate::heap::release_free_memory();
            segment.release_resident_pages();
            if !wait_for_coordinator_death(&segment, me)? {
                info!("the coordinator stopped in order: the standby retires");
                return Ok(0);
            }
            true
        }
    };
    let config = Config::from_image(&segment.config_blob()?).map_err(CoordinatorError::Image)?;
    let keeper = handed
        .keeper
        .ok_or(CoordinatorError::MissingFd(COORDINATOR_CHANNEL_FD))?;
    let notify_fd = handed
        .notify
        .ok_or(CoordinatorError::MissingFd(COORDINATOR_NOTIFY_FD))?;
    let notify =
        NotifySocket::from_inherited(notify_fd, crate::keeper::notify_socket_path(&config));
    let report = handed.report.map(File::from);
    let control_fd = handed
        .control
        .ok_or(CoordinatorError::MissingFd(COORDINATOR_CONTROL_FD))?;
    let control = ControlServer::from_inherited(control_fd, nix::unistd::geteuid().as_raw())
        .map_err(CoordinatorError::Control)?;
    protocol::set_nonblocking(keeper.as_fd())?;
    let me = ProcessIdentity::current().ok();

    take_liveness_locks(&segment, took_over)?;
    // Once a standby took over, its lines say it is the coordinator.
    let _promoted_span = took_over.then(|| crate::logging::role_span("coordinator"));

    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    // The daemon component's holder is a thread: made only now that the signals the loop
    // reads through its signalfd are blocked, so that it inherits the mask and none of them
    // can reach it (a SIGTERM delivered to it would kill the process).
    let gate = ControlSegment::open(run_dir, instance)?
        .hold_daemon_component(Deadline::after(Duration::from_secs(5)))?;
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
    )?;
    {
        let w = segment.write()?;
        w.set_coordinator(me);
        if took_over {
            w.set_standby(None);
        } else {
            w.set_gave_up(None)?;
        }
        w.set_standby_disabled(false);
    }
    // Engine time is the monotonic clock since boot, as in the segment, so that what a dead
    // coordinator published (the restart window's start) means the same to its successor.
    let (epoch, epoch_ms) = monotonic_epoch();
    let n = config.services.len();
    let params = EngineParams::from_config(&config);
    // The engine is replaced below for a takeover; a fresh one costs nothing. Only a takeover
    // keeps the parameters to adopt with: a fresh coordinator's engine holds the one copy (it
    // would otherwise live, unused, as long as the coordinator).
    let started_at = epoch.elapsed();
    let (engine, first_actions, takeover_params) = if took_over {
        let (engine, actions) = Engine::new(params.clone(), started_at);
        (engine, actions, Some(params))
    } else {
        let (engine, actions) = Engine::new(params, started_at);
        (engine, actions, None)
    };
    // Services run as root, as this process's user, or as their configured `user`.
    let notify_filter = SenderFilter::new(
        [0, nix::unistd::geteuid().as_raw()].into_iter().chain(
            config
                .services
                .iter()
                .filter_map(|s| s.user.as_ref().map(|u| u.id)),
        ),
    );
    let mut c = Coordinator {
        config,
        segment,
        engine,
        keeper,
        notify,
        signals,
        timer,
        report,
        pids: vec![None; n],
        identities: vec![None; n],
        epoch,
        epoch_ms,
        started_at,
        keeper_lost: false,
        outbox: Outbox::default(),
        unclaimed_ready: Vec::new(),
        notify_filter,
        notify_drops: DropTally::new(NOTIFY_DROP_PERIOD),
        notify_paused_until: None,
        notify_recent_drops: (Time::ZERO, 0),
        gate,
        standby: None,
        standby_since: None,
        standby_deaths: RecentDeaths::new(STANDBY_DEATH_SPAN, STANDBY_DEATH_LIMIT),
        standby_retry_at: None,
        pending_acks: Vec::new(),
        watchdog: None,
        events: None,
        control,
        spawn_errors: vec![None; n],
        reload: None,
        reload_starts: Vec::new(),
        init_system: (std::env::var_os(crate::sd_notify::LISTENING_ENV).as_deref()
            == Some(std::ffi::OsStr::new("1")))
        .then(crate::sd_notify::Announcer::default),
    };
    c.watchdog = c.start_watchdog()?;
    let actions = if let Some(params) = takeover_params {
        let actions = c.adopt(params)?;
        info!(pid = std::process::id(), services = n, phase = %c.engine.phase(), "the standby took over as coordinator");
        // A new standby, so that the next death is covered too.
        c.spawn_standby();
        actions
    } else {
        info!(
            pid = std::process::id(),
            services = n,
            "coordinator started"
        );
        first_actions
    };
    c.events = c.open_events(took_over);
    c.perform(actions);
    c.publish();
    c.acknowledge_exits();
    if took_over {
        // Finishing a predecessor's reload: the init system was told RELOADING=1 by it.
        if let Some(announcer) = c.init_system.as_mut()
            && reload::marker_path(&c.config).exists()
        {
            announcer.continue_reload();
        }
        c.resume_reload_if_marked();
    } else {
        // A fresh start has no reload under way, whatever an earlier run left.
        let _ = std::fs::remove_file(reload::marker_path(&c.config));
    }
    c.tell_init_system();
    c.event_loop()?;
    Ok(match c.engine.outcome() {
        Some(Outcome::Stopped) | None => 0,
        Some(_) => 1,
    })
}

/// The daemon mutex says "a coordinator lives"; the daemon standby mutex is what a standby
/// waits on (API services wait on the control file's daemon component word instead, see
/// `gate`). A coordinator holds both until it dies, when the kernel releases them to whoever
/// waits.
fn take_liveness_locks(segment: &Segment, taking_over: bool) -> Result<(), CoordinatorError> {
    let mut ids = vec![(MutexId::Daemon, "daemon")];
    if !taking_over {
        // A standby taking over holds the daemon standby mutex already.
        ids.insert(1, (MutexId::DaemonStandby, "daemon standby"));
    }
    for (id, name) in ids {
        let mutex = segment.mutex(id)?;
        // The dead coordinator's mutexes are released by the kernel at its death; a short
        // bounded wait covers the instant between its death and that release.
        let locked = if taking_over {
            mutex.lock_timeout(Duration::from_secs(5))
        } else {
            mutex.try_lock()
        };
        match locked {
            Ok(Some(guard)) => guard.hold_until_exit(),
            Ok(None) => return Err(CoordinatorError::AlreadyCoordinated),
            Err(e) => return Err(CoordinatorError::Lock(name, e.to_string())),
        }
    }
    Ok(())
}

/// The standby's watch: record itself, then block on the daemon standby mutex, which the
/// coordinator holds for its whole life. No polling: the kernel wakes us when it dies. Returns
/// false when the coordinator ended in order (the stack is stopped) rather than died.
fn wait_for_coordinator_death(
    segment: &Segment,
    me: Option<ProcessIdentity>,
) -> Result<bool, CoordinatorError> {
    if let Ok(w) = segment.write() {
        w.set_standby(me);
    }
    info!(
        pid = std::process::id(),
        "standby: watching the coordinator"
    );
    let guard = segment
        .mutex(MutexId::DaemonStandby)?
        .lock()
        .map_err(|e| CoordinatorError::Lock("daemon standby", e.to_string()))?;
    let state = segment.instance_status()?.state;
    if matches!(state, InstanceState::Stopped | InstanceState::Failed) {
        return Ok(false);
    }
    warn!(died = guard.previous_holder_died(), state = %state, "the coordinator is gone: taking over");
    guard.hold_until_exit();
    Ok(true)
}

/// The coordinator's time origin: boot, where the monotonic clock reads zero, as an
/// [`Instant`] and in the segment's milliseconds (0 then). Should the platform's `Instant` not
/// reach back that far, the origin is now, and times from before it saturate to it.
fn monotonic_epoch() -> (Instant, u64) {
    let now = Instant::now();
    let since_boot = crate::shm::monotonic_ms();
    match now.checked_sub(Duration::from_millis(since_boot)) {
        Some(boot) => (boot, 0),
        None => (now, since_boot),
    }
}

impl Coordinator {
    fn now(&self) -> Time {
        self.epoch.elapsed()
    }

    /// Takes over from a dead coordinator: asks the keeper for what happened while nobody
    /// listened and what runs now, loads what the dead one published (the engine's whole
    /// progress: every service's process and wanted state, deadlines, the failure sequence
    /// under way, why the stack is stopping), and builds the engine that continues it.
    fn adopt(&mut self, params: EngineParams) -> Result<Vec<Action>, CoordinatorError> {
        let n = self.config.services.len();
        self.send(ToKeeper::TakeOver);
        let mut facts = KeeperFacts::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        facts.running = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(CoordinatorError::Image(
                    "the keeper did not answer the takeover".into(),
                ));
            }
            let _ = self.outbox.flush(self.keeper.as_fd());
            let mut fds = [PollFd::new(self.keeper.as_fd(), PollFlags::POLLIN)];
            let wait = PollTimeout::try_from(left.as_millis().min(1000) as i32)
                .unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            match recv_message::<FromKeeper>(self.keeper.as_fd()) {
                Ok(Some(FromKeeper::Running { services })) => break services,
                Ok(Some(FromKeeper::Exited { service, pid, exit })) if service < n => {
                    facts.news.push(KeeperNews::Exited { service, pid, exit });
                    // Published with the adopted state, then acknowledged.
                    self.pending_acks.push((service, pid));
                }
                Ok(Some(FromKeeper::Spawned { service, pid })) if service < n => {
                    facts.news.push(KeeperNews::Spawned { service, pid });
                }
                Ok(Some(FromKeeper::SpawnFailed { service, error })) if service < n => {
                    facts.news.push(KeeperNews::SpawnFailed { service, error });
                }
                // Answers to the dead coordinator's requests: what runs is in `Running`.
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => {
                    return Err(CoordinatorError::Image(format!(
                        "lost the keeper during the takeover: {e}"
                    )));
                }
            }
        };
        let snapshot = self.published_snapshot(&params)?;
        // Taking over in the middle of a reload, or from a coordinator an upgrade replaced, is
        // no death to restart everything for.
        let restart_all = self.config.global.coordinator.takeover == Takeover::Restart
            && !reload::marker_path(&self.config).exists()
            && !crate::upgrade::marker_path(
                &self.config.global.run_dir,
                &self.config.global.instance,
            )
            .exists();
        // Read: an upgrade's marker has done its work (a later death is a death).
        let _ = std::fs::remove_file(crate::upgrade::marker_path(
            &self.config.global.run_dir,
            &self.config.global.instance,
        ));
        let (engine, actions) = Engine::adopt(params, self.now(), snapshot, &facts, restart_all);
        self.engine = engine;
        for (s, slot) in self.engine.slots().iter().enumerate() {
            self.pids[s] = slot.pid();
            self.identities[s] = slot.pid().and_then(|pid| ProcessIdentity::of(pid).ok());
        }
        Ok(actions)
    }

    /// What the dead coordinator published, as the engine's [`Snapshot`].
    fn published_snapshot(&self, params: &EngineParams) -> Result<Snapshot, CoordinatorError> {
        let time = |ms: u64| Time::from_millis(ms.saturating_sub(self.epoch_ms));
        let instance = self.segment.instance_status()?;
        let progress = self.segment.instance_progress()?;
        // The dead coordinator's restart window goes on, its start and count unchanged (the
        // engine drops a count whose span has run out at the next failure).
        let window = RestartWindow {
            start: time(instance.window_start_ms),
            count: instance.restarts_in_window,
        };
        let mut slots = Vec::with_capacity(params.services.len());
        for i in 0..params.services.len() {
            let status = self.segment.service_status(i)?;
            let p = self.segment.service_progress(i)?;
            let pid = status.process.map(|id| id.pid);
            let deadline = p.deadline_ms.map(time).unwrap_or_default();
            let since = time(p.process_since_ms);
            let process = match (p.stage, pid) {
                (Stage::Stopped, _) => Process::None(Rest::Stopped),
                (Stage::Failed, _) => Process::None(Rest::Failed),
                (Stage::Finished, _) => Process::None(Rest::Finished),
                // A process whose identity was never recorded: the keeper's word settles it,
                // as for a spawn not yet answered.
                (Stage::Spawning, _)
                | (Stage::Waiting | Stage::Settling | Stage::Up | Stage::Stopping, None) => {
                    Process::Spawning
                }
                (Stage::Waiting, Some(pid)) => Process::Running {
                    pid,
                    since,
                    readiness: Readiness::Waiting { deadline },
                },
                (Stage::Settling, Some(pid)) => Process::Running {
                    pid,
                    since,
                    readiness: Readiness::Settling { up_at: deadline },
                },
                (Stage::Up, Some(pid)) => Process::Running {
                    pid,
                    since,
                    readiness: Readiness::Up,
                },
                (Stage::Stopping, Some(pid)) => Process::Stopping {
                    pid,
                    kill_deadline: deadline,
                    killed: p.killed,
                    start_timed_out: p.start_timed_out,
                },
            };
            slots.push(Slot {
                process,
                want: p.want,
                since: time(status.last_transition_ms),
                started_at: p.started_at_ms.map(time),
                asked: p.asked,
                not_before: time(p.not_before_ms),
                streak: p.streak,
                last_failure_at: p.last_failure_ms.map(time),
                restarts: status.restart_count,
                last_exit: status.last_exit.map(ProcessExit::from),
                exited_pid: p.exited_pid,
            });
        }
        Ok(Snapshot {
            phase: instance.state,
            phase_since: time(instance.last_transition_ms),
            window,
            stopping_for: progress
                .stopping_for
                .map(|intent| outcome_of(intent, params)),
            sequence_deadline: progress.sequence_deadline_ms.map(time),
            slots,
        })
    }

    /// A stop or a failure sequence takes these services down: ask the ones that use the
    /// service API to shut down (they do, in shutdown order, by themselves) by releasing the
    /// daemon component with a new shutdown epoch. One started with `-cc` that never
    /// registered is stopped with its signal instead, at its turn.
    fn release_shutdown_gate(&mut self, services: &[usize]) {
        let mut actions = Vec::new();
        for &s in services {
            if self.gate.control().component_registered(s).ok().flatten() != Some(true) {
                actions.extend(self.engine.not_cooperative(s));
            }
        }
        if !self.gate.is_held() {
            // Asked again while earlier asked services are still going: a new epoch.
            if let Err(e) = self.gate.retake(Deadline::after(Duration::from_secs(2))) {
                warn!(error = %e, "cannot take the daemon component back");
            }
        }
        match self.gate.release_for_shutdown(services) {
            Ok(epoch) => info!(
                epoch,
                services = services.len(),
                "asked the API services to shut down in order"
            ),
            Err(e) => {
                warn!(error = %e, "cannot ask the API services to shut down; their timeouts apply")
            }
        }
        self.perform(actions);
    }

    /// Every asked service is down: hold the daemon component again, before anything starts.
    fn close_shutdown_gate(&mut self) {
        if !self.gate.is_held() {
            if let Err(e) = self.gate.retake(Deadline::after(Duration::from_secs(2))) {
                warn!(error = %e, "cannot take the daemon component back");
            }
        }
    }

    /// The stack is being stopped (or is): nothing new may start.
    fn stack_is_stopping(&self) -> bool {
        self.engine.is_finished()
            || matches!(
                self.engine.phase(),
                InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed
            )
    }

    /// Asks the keeper for a standby, when the configuration wants one, the stack runs, and
    /// standbys are not given up on for now.
    fn spawn_standby(&mut self) {
        if self.config.global.coordinator.standby
            && self.standby.is_none()
            && self.standby_retry_at.is_none()
            && !self.stack_is_stopping()
        {
            self.send(ToKeeper::SpawnStandby);
        }
    }

    /// Standbys were given up on a quiet span ago: try one again.
    fn retry_standby_if_due(&mut self) {
        if self.standby_retry_at.is_some_and(|at| at <= self.now()) {
            self.standby_retry_at = None;
            if let Ok(w) = self.segment.write() {
                w.set_standby_disabled(false);
            }
            info!("the standby has been quiet for the span: trying one again");
            self.spawn_standby();
        }
    }

    /// With `[coordinator] watchdog`, a periodic timer for the signs of life the keeper
    /// expects (twice per period, so that one late wakeup is no silence of two periods).
    fn start_watchdog(&self) -> Result<Option<TimerFd>, CoordinatorError> {
        let Some(period) = self.config.global.coordinator.watchdog else {
            return Ok(None);
        };
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_CLOEXEC | TimerFlags::TFD_NONBLOCK,
        )?;
        let every = (period.as_duration() / 2).max(Duration::from_millis(1));
        timer.set(
            Expiration::Interval(TimeSpec::from_duration(every)),
            TimerSetTimeFlags::empty(),
        )?;
        Ok(Some(timer))
    }

    /// Tells the keeper that the exits handled so far are published: it need not hand them
    /// to a successor any more. Called only after `publish`.
    fn acknowledge_exits(&mut self) {
        for (service, pid) in std::mem::take(&mut self.pending_acks) {
            self.send(ToKeeper::AckExit { service, pid });
        }
    }

    fn event_loop(&mut self) -> Result<(), CoordinatorError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for source in Source::ALL {
            let fd = match source {
                Source::Keeper => self.keeper.as_fd(),
                Source::Notify => self.notify.as_fd(),
                Source::Signals => self.signals.as_fd(),
                Source::Timer => self.timer.as_fd(),
                Source::Watchdog => match &self.watchdog {
                    Some(timer) => timer.as_fd(),
                    None => continue,
                },
                Source::Control => self.control.listener_fd(),
            };
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, source.token()))?;
        }
        let mut events = [EpollEvent::empty(); 8];
        let mut watching_writable = false;
        while !self.engine.is_finished() {
            if self.keeper_lost {
                return Err(CoordinatorError::KeeperLost);
            }
            self.arm_timer();
            // Watch the keeper's socket for room only while requests wait in the outbox.
            let want_writable = !self.outbox.is_empty() && !self.keeper_lost;
            if want_writable != watching_writable && !self.keeper_lost {
                let flags = if want_writable {
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
                } else {
                    EpollFlags::EPOLLIN
                };
                epoll.modify(
                    self.keeper.as_fd(),
                    &mut EpollEvent::new(flags, Source::Keeper.token()),
                )?;
                watching_writable = want_writable;
            }
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                let source = Source::ALL.into_iter().find(|s| s.token() == event.data());
                match source {
                    Some(Source::Keeper) => self.on_keeper(&epoll),
                    Some(Source::Notify) => self.on_notify(&epoll),
                    Some(Source::Signals) => self.on_signals(),
                    Some(Source::Timer) => {
                        let _ = self.timer.wait();
                        self.feed(Event::Tick);
                        let now = self.now();
                        self.control.expire(&epoll, now);
                        if let Err(e) =
                            self.control
                                .resume_if_due(&epoll, now, Source::Control.token())
                        {
                            error!(error = %e, "cannot watch the control socket again: per-service requests are lost");
                        }
                        self.retry_standby_if_due();
                        self.summarize_notify_drops();
                        self.resume_notify_if_due(&epoll);
                    }
                    Some(Source::Watchdog) => {
                        if let Some(timer) = &self.watchdog {
                            let _ = timer.wait();
                        }
                        // Sent from the loop itself: a wedged loop sends nothing.
                        self.send(ToKeeper::Alive);
                    }
                    Some(Source::Control) => {
                        let now = self.now();
                        if let Err(e) = self.control.accept(&epoll, now) {
                            warn!(error = %e, pause_ms = crate::control::server::ACCEPT_PAUSE.as_millis() as u64, "cannot accept on the control socket: it is left unwatched for a pause after each failed accept, until one succeeds");
                        }
                    }
                    None if ControlServer::owns(event.data()) => {
                        self.on_control(&epoll, event.data());
                    }
                    None => {}
                }
            }
            self.publish();
            self.acknowledge_exits();
            self.settle_requests(&epoll);
            // Before a reload's handover: once handed over, the keeper relays no more of
            // this coordinator's words.
            self.tell_init_system();
            if self.advance_reload(&epoll) {
                // Handed over: the keeper starts a successor on the next segment once this
                // process has ended.
                return Ok(());
            }
        }
        Ok(())
    }

    /// With an init system listening (through the keeper): tells it what changed since the
    /// last pass — `READY=1` once everything is up, `STATUS=` lines, `RELOADING=1`,
    /// `STOPPING=1` (see [`crate::sd_notify::Announcer`]).
    fn tell_init_system(&mut self) {
        let Some(announcer) = self.init_system.as_mut() else {
            return;
        };
        let slots = self.engine.slots();
        let up = slots
            .iter()
            .filter(|slot| slot.state() == ServiceState::Up)
            .count();
        let trouble = slots
            .iter()
            .position(|slot| {
                matches!(
                    slot.state(),
                    ServiceState::Starting | ServiceState::Stopping | ServiceState::Failed
                )
            })
            .or_else(|| {
                slots
                    .iter()
                    .position(|slot| slot.state() != ServiceState::Up)
            })
            .map(|s| (self.config.services[s].id.as_str(), slots[s].state()));
        let phase = self.engine.phase();
        let reloading = self.reload.is_some();
        let view = crate::sd_notify::StackView {
            phase,
            up,
            total: slots.len(),
            trouble,
            reloading,
        };
        if let Some(state) = announcer.update(&view) {
            self.send(ToKeeper::SdNotify { state });
        }
    }

    /// One timer for the nearest deadline (the engine's, or a standby's retry); none when
    /// nothing is due.
    fn arm_timer(&self) {
        let next = self
            .engine
            .next_deadline()
            .into_iter()
            .chain(self.standby_retry_at)
            .chain(self.notify_drops.due())
            .chain(self.notify_paused_until)
            .chain(self.control.next_deadline())
            .min();
        match next {
            Some(deadline) => {
                let wait = deadline
                    .saturating_sub(self.now())
                    .max(Duration::from_micros(1));
                let _ = self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                );
            }
            None => {
                let _ = self.timer.unset();
            }
        }
    }

    fn feed(&mut self, event: Event) {
        let actions = self.engine.handle(event, self.now());
        self.perform(actions);
    }

    fn on_keeper(&mut self, epoll: &Epoll) {
        if !self.keeper_lost && self.outbox.flush(self.keeper.as_fd()).is_err() {
            self.keeper_lost = true;
        }
        loop {
            match recv_message::<FromKeeper>(self.keeper.as_fd()) {
                Ok(Some(message)) => self.on_keeper_message(message),
                Ok(None) => return,
                Err(e) => {
                    // Only the keeper can start, signal or reap the services: without it there
                    // is nothing left to coordinate. The coordinator ends, leaving the shared
                    // state as it is, so that `status` says nothing supervises the services
                    // and `ccmgr stop` stops them in shutdown order from that state.
                    error!(error = %e, "lost the keeper: the services are no longer supervised; `ccmgr stop` stops them");
                    let _ = epoll.delete(self.keeper.as_fd());
                    self.keeper_lost = true;
                    return;
                }
            }
        }
    }

    fn on_keeper_message(&mut self, message: FromKeeper) {
        match message {
            FromKeeper::Spawned { service, pid } => {
                self.pids[service] = Some(pid);
                self.spawn_errors[service] = None;
                self.identities[service] = ProcessIdentity::of(pid).ok();
                let id = &self.config.services[service].id;
                info!(service = %id, pid, "started");
                self.feed(Event::Spawned { service, pid });
                // A READY=1 that came before this news belongs to it if its sender is the
                // service or in the service's session.
                let before = self.unclaimed_ready.len();
                self.unclaimed_ready
                    .retain(|&(sender, session)| sender != pid && session != Some(pid));
                if self.unclaimed_ready.len() != before {
                    info!(service = %self.config.services[service].id, pid, "ready (it said so before its start was reported)");
                    self.feed(Event::Ready { service });
                }
            }
            FromKeeper::SpawnFailed { service, error } => {
                warn!(service = %self.config.services[service].id, %error, "could not start");
                self.spawn_errors[service] = Some(format!("could not be started: {error}"));
                self.feed(Event::SpawnFailed { service, error });
            }
            FromKeeper::Exited { service, pid, exit } => {
                // Acknowledged once this pass is published, handled or not (an exit of a
                // process no longer the service's is stale: nothing to publish).
                self.pending_acks.push((service, pid));
                if self.pids.get(service).copied().flatten() != Some(pid) {
                    return;
                }
                self.pids[service] = None;
                let id = &self.config.services[service].id;
                let started = self.engine.slots()[service].started_at.unwrap_or_default();
                let ran_for = self.now().saturating_sub(started);
                info!(service = %id, pid, %exit, ran_for_ms = ran_for.as_millis() as u64, "exited");
                self.feed(Event::Exited { service, exit });
            }
            FromKeeper::StandbySpawned { pid: Some(pid) } => {
                info!(pid, "standby started");
                self.announce("standby-started", Some(pid));
                self.standby = Some(pid);
                self.standby_since = Some(Instant::now());
            }
            FromKeeper::StandbySpawned { pid: None } => {
                warn!("the keeper could not start a standby")
            }
            FromKeeper::StandbyExited { pid } => {
                self.announce("standby-lost", Some(pid));
                if self.standby == Some(pid) {
                    self.standby = None;
                }
                if let Ok(w) = self.segment.write() {
                    w.set_standby(None);
                }
                if self.stack_is_stopping() {
                    // Nothing new starts once the stack is stopping (the keeper stops the
                    // standby at the end of the stop; its end may be reported after that).
                    info!(
                        pid,
                        "the standby ended; the stack is stopping: no other is started"
                    );
                    return;
                }
                // A standby that lived a while did its job: only quick deaths count.
                let quick = self
                    .standby_since
                    .take()
                    .is_none_or(|t| t.elapsed() < STANDBY_QUICK_DEATH);
                if quick && self.standby_deaths.record(Instant::now()) {
                    let retry = self.standby_deaths.quiet_at().unwrap_or_else(Instant::now);
                    self.standby_retry_at = Some(retry.saturating_duration_since(self.epoch));
                    error!(
                        pid,
                        deaths = STANDBY_DEATH_LIMIT,
                        span_s = STANDBY_DEATH_SPAN.as_secs(),
                        "the standby keeps dying: running without one until it has been quiet for the span"
                    );
                    if let Ok(w) = self.segment.write() {
                        w.set_standby_disabled(true);
                    }
                } else {
                    warn!(pid, "the standby died: starting another");
                    self.spawn_standby();
                }
            }
            // Only meaningful during a takeover (see `adopt`) or a reload's handover (see
            // `advance_reload`).
            FromKeeper::Running { .. } | FromKeeper::ReloadDone { .. } => {}
        }
    }

    /// Takes what waits on the notify socket, at most [`NOTIFY_BATCH`] datagrams per wakeup
    /// (the level-triggered loop comes back for the rest after serving the other sources).
    /// Any local user can send here, so a datagram is first judged by its kernel-attested
    /// sender alone ([`notify::SenderFilter`]): a stranger's is dropped unparsed, without a
    /// `/proc` read, and counted rather than logged one by one.
    ///
    /// A batch's worth of drops within [`NOTIFY_FLOOD_PAUSE`] is a flood: the socket is then
    /// left unread for that long, so that a flood costs the coordinator about one batch per
    /// pause, whatever its rate. A service's `READY=1` meanwhile waits in its (blocking)
    /// `send` or in the socket's queue, and is taken when reading resumes.
    fn on_notify(&mut self, epoll: &Epoll) {
        self.summarize_notify_drops();
        for _ in 0..NOTIFY_BATCH {
            let (filter, pids) = (&self.notify_filter, &self.pids);
            let message = match self
                .notify
                .recv_filtered(|sender| filter.admits(sender, pids))
            {
                Ok(Some(Received::Message(m))) => m,
                Ok(Some(Received::Refused(sender) | Received::Malformed(Some(sender)))) => {
                    self.note_notify_drop(Some(sender));
                    continue;
                }
                Ok(Some(Received::Malformed(None))) => {
                    self.note_notify_drop(None);
                    continue;
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "cannot read the notify socket");
                    break;
                }
            };
            if !message.is_ready() {
                continue;
            }
            // The kernel vouches for the sender's pid; it must be a service's main process or
            // in its session (a service leads its own session). /proc is read once, and only
            // for a sender that is not a main process.
            let mut session = None;
            let owner = self
                .pids
                .iter()
                .position(|&pid| pid == Some(message.pid))
                .or_else(|| {
                    session = notify::proc_ids(message.pid).ok().map(|ids| ids.session);
                    let leader = session.filter(|&s| s > 0)?;
                    self.pids.iter().position(|&pid| pid == Some(leader))
                });
            match owner {
                Some(service) => {
                    info!(service = %self.config.services[service].id, pid = message.pid, "ready");
                    self.feed(Event::Ready { service });
                }
                None => {
                    // Perhaps a service so quick that its READY=1 came before the keeper's
                    // word that it was started: keep it (with the sender's session, read now,
                    // while the sender surely exists) until the next spawns are reported. At
                    // most MAX_UNCLAIMED_READY are kept; each one pushed out is a drop.
                    if self.unclaimed_ready.len() == MAX_UNCLAIMED_READY {
                        self.unclaimed_ready.remove(0);
                        self.note_notify_drop(Some(notify::Sender {
                            pid: message.pid,
                            uid: message.uid,
                            gid: message.gid,
                        }));
                    }
                    self.unclaimed_ready.push((message.pid, session));
                }
            }
        }
        if self.notify_recent_drops.1 >= NOTIFY_BATCH && epoll.delete(self.notify.as_fd()).is_ok() {
            self.notify_paused_until = Some(self.now() + NOTIFY_FLOOD_PAUSE);
            self.notify_recent_drops.1 = 0;
        }
    }

    /// Reads the notify socket again once a flood's pause is over.
    fn resume_notify_if_due(&mut self, epoll: &Epoll) {
        if self
            .notify_paused_until
            .is_some_and(|until| until <= self.now())
        {
            self.notify_paused_until = None;
            let event = EpollEvent::new(EpollFlags::EPOLLIN, Source::Notify.token());
            if let Err(e) = epoll.add(self.notify.as_fd(), event) {
                error!(error = %e, "cannot watch the notify socket again: readiness by notification is lost");
            }
        }
    }

    /// Counts a dropped notify datagram; only the first of a spell is logged at once.
    fn note_notify_drop(&mut self, sender: Option<notify::Sender>) {
        let now = self.now();
        let (since, count) = &mut self.notify_recent_drops;
        if now >= *since + NOTIFY_FLOOD_PAUSE {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        if self.notify_drops.note(now, sender) {
            warn!(
                pid = sender.map(|s| s.pid),
                uid = sender.map(|s| s.uid),
                "notify datagram from a process that is no service's (or malformed) dropped; more within {} s are counted, not logged",
                NOTIFY_DROP_PERIOD.as_secs()
            );
        }
    }

    /// Logs the count of notify datagrams dropped in the period just ended, if it has ended.
    fn summarize_notify_drops(&mut self) {
        let Some(summary) = self.notify_drops.take_summary(self.now()) else {
            return;
        };
        let example = match summary.example {
            Some(s) => format!(", e.g. pid {} uid {}", s.pid, s.uid),
            None => String::new(),
        };
        warn!(
            "dropped {} notify datagrams from processes that are no service's (or malformed) in the last {} s{example}",
            summary.count,
            summary.over.as_secs().max(1)
        );
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGHUP) => self.reload_unasked("SIGHUP"),
                Ok(sig) => {
                    info!(signal = sig.as_str(), "stopping the stack");
                    self.feed(Event::Stop);
                }
                Err(_) => {}
            }
        }
    }

    /// A control connection is readable: its request, once complete, is checked (every
    /// service known; the stack neither starting up nor stopping), fed to the engine as the
    /// operator's event, published, and accepted; the connection then waits for
    /// [`Coordinator::settle_requests`] to find the work done.
    fn on_control(&mut self, epoll: &Epoll, token: u64) {
        let Incoming::Request(request) = self.control.read(epoll, token) else {
            return;
        };
        let (reply, pending) = self.apply_request(&request);
        self.control.answer(epoll, token, &reply, pending);
    }

    fn apply_request(&mut self, request: &Request) -> (Reply, Option<Pending>) {
        if request.verb == Verb::Reload {
            return self.request_reload();
        }
        let ids: Vec<&str> = self.config.services.iter().map(|s| s.id.as_str()).collect();
        let mut named = Vec::new();
        let mut unknown = Vec::new();
        for id in &request.services {
            match ids.iter().position(|known| known == id) {
                Some(s) => named.push(s),
                None => unknown.push(UnknownService {
                    service: id.clone(),
                    did_you_mean: crate::config::did_you_mean(id, ids.iter().copied())
                        .map(str::to_owned),
                }),
            }
        }
        if !unknown.is_empty() {
            return (Reply::Unknown { unknown }, None);
        }
        if !self.engine.takes_operator_requests() {
            let why = format!(
                "the stack is {}: per-service requests are taken once it is up and until it stops",
                self.engine.phase()
            );
            return (Reply::NotNow { why }, None);
        }
        let named_set = named.clone();
        let (set, order, event) = match request.verb {
            Verb::Stop => (
                self.engine.operator_stop_set(&named),
                &self.engine.params().shutdown_sequence,
                Event::OperatorStop { services: named },
            ),
            Verb::Start => (
                self.engine.operator_start_set(&named),
                &self.engine.params().startup_sequence,
                Event::OperatorStart { services: named },
            ),
            Verb::Restart => (
                self.engine.operator_restart_set(&named),
                &self.engine.params().startup_sequence,
                Event::OperatorRestart { services: named },
            ),
            Verb::Reload => return self.request_reload(),
        };
        let in_order: Vec<usize> = order.iter().copied().filter(|s| set.contains(s)).collect();
        let now = self.now();
        let pending = Pending::new(request.verb, in_order.clone(), now, &self.engine);
        // The reply names what the request changes (a start of c does not start the a it
        // requires if a is up already), or the named services if it changes nothing.
        let slots = self.engine.slots();
        let changes = |s: usize| match request.verb {
            Verb::Stop => !(slots[s].want == Want::Held && slots[s].pid().is_none()),
            Verb::Start => !(slots[s].want == Want::Up && slots[s].state() == ServiceState::Up),
            Verb::Restart | Verb::Reload => true,
        };
        let mut changed: Vec<usize> = in_order.iter().copied().filter(|&s| changes(s)).collect();
        if changed.is_empty() {
            changed = in_order
                .iter()
                .copied()
                .filter(|s| named_set.contains(s))
                .collect();
        }
        let names: Vec<String> = changed.iter().map(|&s| ids[s].to_owned()).collect();
        info!(verb = ?request.verb, services = %names.join(","), "the operator's request");
        self.feed(event);
        // Published before it is accepted: a successor taking over from here continues it.
        self.publish();
        // Every service stopped, then started, one after another, with its restart delay:
        // the longest the work can take without anything being wrong.
        let params = &self.engine.params().services;
        let deadline: Duration = in_order
            .iter()
            .map(|&s| {
                params[s].shutdown_timeout + params[s].startup_timeout + params[s].restart_delay_max
            })
            .sum();
        let reply = Reply::Accepted {
            services: names,
            deadline_ms: deadline.as_millis() as u64,
        };
        (reply, Some(pending))
    }

    /// Answers the operator's requests whose work is done or failed.
    fn settle_requests(&mut self, epoll: &Epoll) {
        let (engine, errors) = (&self.engine, &self.spawn_errors);
        let why_not_started = |s: usize| errors.get(s).cloned().flatten();
        self.control
            .settle(epoll, |pending| pending.judge(engine, &why_not_started));
    }

    fn send(&mut self, message: ToKeeper) {
        if self.keeper_lost {
            return;
        }
        if let Err(e) = self.outbox.push(self.keeper.as_fd(), &message) {
            error!(error = %e, "cannot reach the keeper");
            self.keeper_lost = true;
        }
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Spawn { service } => {
                    let slot = &self.engine.slots()[service];
                    if let Some(last) = slot.last_exit {
                        // It ran before: say that this start is a restart, and why.
                        info!(
                            service = %self.config.services[service].id,
                            restarts = slot.restarts,
                            last_exit = %last,
                            "restarting"
                        );
                    }
                    self.send(ToKeeper::Spawn { service });
                }
                Action::Signal { service, signal } => {
                    if let Some(pid) = self.pids[service] {
                        info!(service = %self.config.services[service].id, pid, signal = signal.as_str(), "stopping");
                        self.send(ToKeeper::Signal {
                            service,
                            pid,
                            signal: signal as i32,
                        });
                    }
                }
                Action::Kill { service } => {
                    if let Some(pid) = self.pids[service] {
                        warn!(service = %self.config.services[service].id, pid, "timed out: killing its process group");
                        self.send(ToKeeper::Signal {
                            service,
                            pid,
                            signal: Signal::SIGKILL as i32,
                        });
                    }
                }
                Action::StartupComplete => {
                    info!(
                        elapsed_ms = self.now().saturating_sub(self.started_at).as_millis() as u64,
                        "every service is up"
                    );
                    // Whoever reads the report reads the segment next: it must be current.
                    self.publish();
                    self.report(&StartReport::Up);
                    // FIG. 7B: once the startup sequence is done, a standby.
                    self.spawn_standby();
                    // The coordinator settles here: what the startup allocated and let go of
                    // goes back.
                    crate::heap::release_free_memory();
                }
                Action::Finished(outcome) => self.finish(&outcome),
                Action::ShutdownRequested { services } => self.release_shutdown_gate(&services),
                Action::ShutdownOver => self.close_shutdown_gate(),
            }
        }
    }

    fn report(&mut self, report: &StartReport) {
        if let Some(mut file) = self.report.take() {
            let mut line = serde_json::to_string(report).unwrap_or_default();
            line.push('\n');
            let _ = file.write_all(line.as_bytes());
        }
    }

    fn describe(&self, failure: &Failure) -> (String, String) {
        (
            self.config.services[failure.service].id.clone(),
            failure.kind.to_string(),
        )
    }

    fn finish(&mut self, outcome: &Outcome) {
        let (label, service, how, restarts, reason) = match outcome {
            Outcome::Stopped => ("stopped", None, None, None, None),
            Outcome::StartupFailed(f) => {
                let (service, how) = self.describe(f);
                let reason = match f.kind {
                    crate::engine::FailureKind::SequenceTimeout(_)
                    | crate::engine::FailureKind::StartTimeout(_) => GiveUpReason::StartupTimedOut,
                    _ => GiveUpReason::StartupFailed,
                };
                error!(service = %service, how = %how, "the startup sequence failed; everything started was stopped");
                if let Some(tap) = &mut self.events {
                    let event = tap.announce_failure("startup-failed", &service, &how);
                    self.run_failure_commands(None, &event);
                }
                self.report(&StartReport::Failed {
                    service: service.clone(),
                    how: how.clone(),
                });
                (
                    "startup failed",
                    Some(service),
                    Some(how),
                    None,
                    Some((reason, f.service)),
                )
            }
            Outcome::GaveUp { failure, restarts } => {
                let (service, how) = self.describe(failure);
                error!(service = %service, how = %how, restarts, "too many restarts: gave up; everything was stopped");
                if let Some(tap) = &mut self.events {
                    let event = tap.announce_failure(
                        "gave-up",
                        &service,
                        &format!("{how}, after {restarts} restarts"),
                    );
                    self.run_failure_commands(None, &event);
                }
                (
                    "gave up",
                    Some(service),
                    Some(how),
                    Some(*restarts),
                    Some((GiveUpReason::RestartLimit, failure.service)),
                )
            }
        };
        if let Ok(w) = self.segment.write() {
            let _ = w.set_gave_up(reason.map(|(reason, s)| GaveUp {
                reason,
                service: Some(s),
            }));
        }
        let at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LastOutcome {
            outcome: label.into(),
            service,
            how,
            restarts,
            at_unix,
        };
        if let Ok(text) = serde_json::to_string_pretty(&last) {
            let _ = std::fs::write(last_outcome_path(&self.config), text);
        }
        info!(outcome = label, "the stack is stopped");
        // The standby goes first: our exit releases the mutex it waits on, and that must not
        // look like a death to take over from.
        self.send(ToKeeper::StopStandby);
        self.send(ToKeeper::Shutdown);
    }

    /// Writes the engine's view into the segment, in one generation: what `status` shows, and
    /// the engine's whole progress, so that a successor continues it ([`Engine::adopt`]).
    fn publish(&mut self) {
        let now = self.now();
        self.publish_state();
        let failures = match &mut self.events {
            Some(tap) => tap.observe(&self.engine, now),
            None => Vec::new(),
        };
        for (service, event) in failures {
            self.run_failure_commands(Some(service), &event);
        }
    }

    /// Asks the keeper to run the failure commands that apply: the service's own, then the
    /// instance's. Fire and forget: the keeper runs them as its children, with a timeout.
    fn run_failure_commands(&mut self, service: Option<usize>, event: &LifecycleEvent) {
        let env = event.hook_env();
        if let Some(s) = service
            && self.config.services[s].on_failure_command.is_some()
        {
            self.send(ToKeeper::RunHook {
                service: Some(s),
                env: env.clone(),
            });
        }
        if self.config.global.coordinator.on_failure_command.is_some() {
            self.send(ToKeeper::RunHook { service: None, env });
        }
    }

    /// The event ring: made anew by the first coordinator of a start, continued by a
    /// successor (which announces the takeover). What the engine shows at this point counts
    /// as announced.
    fn open_events(&mut self, took_over: bool) -> Option<EventTap> {
        let path = events_path(&self.config);
        let ring = if took_over {
            EventRing::open(&path).or_else(|_| EventRing::create(&path, self.group()))
        } else {
            EventRing::create(&path, self.group())
        };
        let ring = ring
            .inspect_err(|e| warn!(error = %e, "no event ring: `ccmgr events` will see nothing"))
            .ok();
        let instance = &self.config.global.instance;
        Some(if took_over {
            let mut tap = EventTap::continuing(ring, instance, &self.engine);
            tap.announce("takeover", Some(std::process::id() as i32));
            tap.flush();
            tap
        } else {
            EventTap::fresh(ring, instance, self.config.services.len())
        })
    }

    fn group(&self) -> Option<u32> {
        self.config.global.group.as_ref().map(|g| g.id)
    }

    fn announce(&mut self, kind: &str, pid: Option<i32>) {
        if let Some(tap) = &mut self.events {
            tap.announce(kind, pid);
        }
    }

    fn publish_state(&self) {
        let Ok(w) = self.segment.write() else { return };
        let ms = |t: Time| self.epoch_ms + t.as_millis() as u64;
        w.set_instance_state(self.engine.phase(), ms(self.engine.phase_since()));
        let window = self.engine.restart_window();
        w.set_restart_window(window.count, ms(window.start));
        // The same fields as `Engine::snapshot`, read in place: no copy per event.
        let _ = w.set_instance_progress(&InstanceProgress {
            stopping_for: self.engine.outcome().map(intent_of),
            sequence_deadline_ms: self.engine.sequence_deadline().map(ms),
        });
        for (i, slot) in self.engine.slots().iter().enumerate() {
            let _ = w.set_service_state(i, slot.state(), ms(slot.since));
            let identity = slot.pid().and(self.identities[i]);
            let _ = w.set_service_process(i, identity);
            let _ = w.set_restart_count(i, slot.restarts);
            let _ = w.set_last_exit(i, slot.last_exit.map(LastExit::from));
            let _ = w.set_service_progress(i, &progress_of(slot, ms));
        }
    }
}

/// One service's progress as the segment stores it.
fn progress_of(slot: &Slot, ms: impl Fn(Time) -> u64) -> ServiceProgress {
    let (stage, since, deadline, killed, start_timed_out) = match slot.process {
        Process::None(Rest::Stopped) => (Stage::Stopped, None, None, false, false),
        Process::None(Rest::Failed) => (Stage::Failed, None, None, false, false),
        Process::None(Rest::Finished) => (Stage::Finished, None, None, false, false),
        Process::Spawning => (Stage::Spawning, None, None, false, false),
        Process::Running {
            since, readiness, ..
        } => match readiness {
            Readiness::Waiting { deadline } => {
                (Stage::Waiting, Some(since), Some(deadline), false, false)
            }
            Readiness::Settling { up_at } => {
                (Stage::Settling, Some(since), Some(up_at), false, false)
            }
            Readiness::Up => (Stage::Up, Some(since), None, false, false),
        },
        Process::Stopping {
            kill_deadline,
            killed,
            start_timed_out,
            ..
        } => (
            Stage::Stopping,
            None,
            Some(kill_deadline),
            killed,
            start_timed_out,
        ),
    };
    ServiceProgress {
        want: slot.want,
        stage,
        killed,
        start_timed_out,
        asked: slot.asked,
        process_since_ms: since.map_or(0, &ms),
        deadline_ms: deadline.map(&ms),
        started_at_ms: slot.started_at.map(&ms),
        not_before_ms: ms(slot.not_before),
        streak: slot.streak,
        last_failure_ms: slot.last_failure_at.map(&ms),
        exited_pid: slot.exited_pid,
    }
}

/// Why the stack is stopping, as the segment stores it.
fn intent_of(outcome: &Outcome) -> StopIntent {
    let failure = |f: &Failure| match &f.kind {
        FailureKind::Exited(exit) => (FailureCode::Exited, Some(LastExit::from(*exit))),
        FailureKind::SpawnFailed(_) => (FailureCode::SpawnFailed, None),
        FailureKind::StartTimeout(_) => (FailureCode::StartTimeout, None),
        FailureKind::SequenceTimeout(_) => (FailureCode::SequenceTimeout, None),
    };
    match outcome {
        Outcome::Stopped => StopIntent {
            kind: StopKind::Requested,
            service: None,
            failure: None,
            exit: None,
            restarts: 0,
        },
        Outcome::StartupFailed(f) => {
            let (code, exit) = failure(f);
            StopIntent {
                kind: StopKind::StartupFailed,
                service: Some(f.service),
                failure: Some(code),
                exit,
                restarts: 0,
            }
        }
        Outcome::GaveUp {
            failure: f,
            restarts,
        } => {
            let (code, exit) = failure(f);
            StopIntent {
                kind: StopKind::GaveUp,
                service: Some(f.service),
                failure: Some(code),
                exit,
                restarts: *restarts,
            }
        }
    }
}

/// The inverse of [`intent_of`]; a spawn failure's words are not stored, and a timeout's
/// length is the configuration's.
fn outcome_of(intent: StopIntent, params: &EngineParams) -> Outcome {
    let service = intent.service.unwrap_or(0);
    let kind = match intent.failure {
        Some(FailureCode::Exited) | None => FailureKind::Exited(
            intent
                .exit
                .map_or(ProcessExit::Exited(1), ProcessExit::from),
        ),
        Some(FailureCode::SpawnFailed) => {
            FailureKind::SpawnFailed("(its reason was lost at a takeover)".into())
        }
        Some(FailureCode::StartTimeout) => FailureKind::StartTimeout(
            params
                .services
                .get(service)
                .map_or(Duration::ZERO, |p| p.startup_timeout),
        ),
        Some(FailureCode::SequenceTimeout) => FailureKind::SequenceTimeout(params.startup_timeout),
    };
    let failure = Failure { service, kind };
    match intent.kind {
        StopKind::Requested => Outcome::Stopped,
        StopKind::StartupFailed => Outcome::StartupFailed(failure),
        StopKind::GaveUp => Outcome::GaveUp {
            failure,
            restarts: intent.restarts,
        },
    }
}

/// READY=1 messages kept for services whose start is not reported yet, at most.
const MAX_UNCLAIMED_READY: usize = 64;

/// Notify datagrams taken per wakeup, at most: a flood cannot hold the loop, and what waits
/// beyond is bounded by the socket's receive buffer.
const NOTIFY_BATCH: usize = 64;

/// After a batch's worth of dropped datagrams within this span, the notify socket is left
/// unread this long.
const NOTIFY_FLOOD_PAUSE: Duration = Duration::from_millis(2);

/// Dropped notify datagrams are logged once per this period, as a count.
const NOTIFY_DROP_PERIOD: Duration = Duration::from_secs(10);

/// Standbys that die within [`STANDBY_QUICK_DEATH`] of their start this many times within
/// [`STANDBY_DEATH_SPAN`] are given up on (the segment says so, for `status`) until the span
/// has passed without a death.
const STANDBY_DEATH_LIMIT: usize = 5;
const STANDBY_DEATH_SPAN: Duration = Duration::from_secs(60);
const STANDBY_QUICK_DEATH: Duration = Duration::from_secs(10);

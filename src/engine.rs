//! The coordinator's decisions: a pure state machine over the stack of services.
//!
//! This module owns *what* happens and *when*: which service starts next, when one counts as
//! up, what a failure sets off (the failure sequence, the restart delay, the retry window,
//! giving up), the order of stopping, and every timeout. It performs nothing itself: it takes
//! [`Event`]s with the time they happened and answers with [`Action`]s (spawn this, signal
//! that, report this) for a driver to carry out. Time is a value passed in, never read from a
//! clock, so the tests below drive hours of restarts in virtual time, deterministically; the
//! real driver (the coordinator process) feeds it real events. It imports nothing from the
//! shared segment or the spawner: its vocabulary is [`crate::vocab`]'s.
//!
//! Each service has a [`Process`] (what its process is doing) and a [`Want`] (what the stack
//! wants of it: up, down, held = down because the operator said so and until the operator
//! says otherwise, or cycling = taken down by a failure sequence or the operator's restart and
//! to come back once everything that sequence takes down is down). After every event one pass stops, in
//! shutdown order, what is not wanted up and may stop (every dependent going down is already
//! down), and one pass starts, in startup order, what is wanted up and may start (everything it
//! depends on is up), so ordering falls out of the graph rather than being scripted per
//! situation. The whole state is plain data ([`Snapshot`]): the coordinator publishes it after
//! every event, and a successor's [`Engine::adopt`] loads it and continues.
//!
//! # State × event
//!
//! Per service, process state (rows) against event (columns). "fail(k)" is a failure of kind k:
//! during startup the stack stops (startup failed); later the restart policy decides: restart
//! (count it in the window, give up past the limit, set the restart delay, and cycle what
//! requires it, or everything under `restart-all`) or stay down (it and what requires it are
//! wanted down). "—": ignored (a stale or duplicate report). Want = Up unless said.
//!
//! ```text
//!               | spawned(pid)   | spawn failed   | ready          | exited(e)            | tick                     | stop
//! --------------+----------------+----------------+----------------+----------------------+--------------------------+---------
//! None(Stopped/ | —              | —              | —              | —                    | start pass: Spawning if  | want Down
//!  Failed)      |                |                |                |                      |  wanted up, deps up and  |
//!               |                |                |                |                      |  restart delay over      |
//! None(Finished)| —              | —              | —              | —                    | stop pass: if not wanted | want Down
//!  (one-shot up)|                |                |                |                      |  up -> None(Stopped)     |
//! Spawning      | Running        | want Up: fail( | —              | —                    | —                        | want Down;
//!               |  (Waiting,     |  spawn failed) |                |                      |                          |  stopped
//!               |  deadline);    | else None(     |                |                      |                          |  once it
//!               |  "started":    |  Stopped)      |                |                      |                          |  answers
//!               |  as ready      |                |                |                      |                          |
//! Running       | —              | —              | notify/cc/     | not wanted up: None( | deadline: Kill ->        | want Down
//!  Waiting      |                |                |  started:      |  Stopped); one-shot, | Stopping(killed, start   |
//!               |                |                |  Settling, or  |  exit 0: None(       |  timed out)              |
//!               |                |                |  Up if         |  Finished); else     |                          |
//!               |                |                |  min_uptime is |  fail(exited)        |                          |
//!               |                |                |  over          |                      |                          |
//! Running       | —              | —              | —              | not wanted up: None( | up_at: Up                | want Down
//!  Settling     |                |                |                |  Stopped); else fail |                          |
//!               |                |                |                |  (exited: a start    |                          |
//!               |                |                |                |  that did not hold)  |                          |
//! Running Up    | —              | —              | —              | as Settling          | —                        | want Down
//! Stopping      | —              | —              | —              | start timed out and  | kill deadline, not       | want Down
//!               |                |                |                |  wanted up: fail(    |  killed: Kill, killed    |
//!               |                |                |                |  start timeout);     |                          |
//!               |                |                |                |  else None(Stopped)  |                          |
//! ```
//!
//! Edges: a failure sequence (and a service that stays down after its failure) takes down
//! only what `requires` the failed service, directly or not; `wants`, `after` and `before`
//! edges only order. The start pass starts a service once everything it `requires` is up,
//! everything it `wants` is up, not wanted up, or failed its last start (dinit's waits-for),
//! and everything it comes `after` (or that comes `before` it) is up or not wanted up. The
//! stop pass stops a service once every dependent going down, through an edge of any kind, is
//! down: the shutdown order is the reverse of the startup order.
//!
//! After every event, the passes: a Running service not wanted up whose dependents going down
//! are down becomes Stopping (its stop signal, or the service API's request for a cooperative
//! one; SIGKILL at now + shutdown_timeout). When no cycling service is still alive, every
//! cycling one is wanted up again. The phase follows: initializing -> steady when everything
//! wanted is up; recovery -> steady likewise; stopping -> stopped/failed when everything is
//! down. The sequence deadline (startup_timeout while initializing, shutdown_timeout while
//! stopping) fails the startup, or kills whatever is left.
//!
//! The operator's per-service requests change only the wanted state; the passes do the rest,
//! in order. They apply while the stack is steady or recovering (before the startup sequence
//! is done, and once the stack stops, they are ignored: the driver refuses them):
//!
//! ```text
//! want before      | OperatorStop (named and  | OperatorStart (named and | OperatorRestart
//!                  |  what requires them)     |  what they require)      |
//! -----------------+--------------------------+--------------------------+---------------------------
//! Up               | Held                     | Up                       | named, and what requires
//! Cycling          | Held                     | Cycling                  |  them: Cycling (no failure
//! Down             | Held                     | Up (Cycling while its    |  counted); a named one that
//! Held             | Held                     |  process is not yet down)|  is Held or Down: as Start,
//!                  |                          |                          |  then Cycling; a dependent
//!                  |                          |                          |  Held or Down stays so
//! ```
//!
//! A service the operator starts while its process is still on its way down (a spawn asked
//! for before it was wanted down, or running until its dependents are down) is cycled: down
//! first, then up in order, never up from a process started while what it requires was down.
//!
//! A failed service the operator stops becomes stopped (`None(Stopped)`), not failed: held
//! means "stopped by the operator", and its last exit still says how it had ended.
//!
//! A held service is down for ordering (an `after` dependent may start without it); no failure
//! sequence (either `on_failure`), no `restart = "never"` knock-on and no takeover changes
//! `Held`; only the operator's start, or a stop of the whole stack (everything `Down`), does.
//!
//! Takeover ([`Engine::adopt`]): every row is loaded as published, deadlines included; then
//! the keeper's news is replayed as the events above (an exit only for the pid the slot shows);
//! a published process that no longer runs ended unseen (exited, killed); a spawn nobody
//! answered is asked again. A steady stack passes through recovery (the design's state
//! machine), so the phase's time says when the successor took over. Under `takeover =
//! "restart"` every service wanted up is first made cycling.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::config::{Config, OnFailure, ReadyKind, RestartPolicy};
use crate::graph::EdgeKind;

/// A point in time: the time since an epoch the driver chose (a monotonic clock in the
/// coordinator; zero in tests).
pub type Time = Duration;

pub use crate::vocab::{InstanceState, ProcessExit, ServiceState, Want};

/// Why a service counts as failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The process ended when it should not have.
    Exited(ProcessExit),
    /// It could not be started at all (exec failed, with the reason).
    SpawnFailed(String),
    /// It did not become ready within its startup timeout, and was killed.
    StartTimeout(Duration),
    /// The whole startup sequence took longer than the coordinator's startup timeout.
    SequenceTimeout(Duration),
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailureKind::Exited(exit) => write!(f, "{exit}"),
            FailureKind::SpawnFailed(why) => write!(f, "could not be started: {why}"),
            FailureKind::StartTimeout(t) => {
                write!(
                    f,
                    "was not ready within its startup timeout ({t:?}) and was killed"
                )
            }
            FailureKind::SequenceTimeout(t) => {
                write!(f, "was not up when the startup sequence timed out ({t:?})")
            }
        }
    }
}

/// A failure of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub service: usize,
    pub kind: FailureKind,
}

/// How the stack ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped because someone asked.
    Stopped,
    /// The startup sequence failed; everything started was stopped again.
    StartupFailed(Failure),
    /// More than `restart_retry_counter` restarts within `restart_time_span`.
    GaveUp { failure: Failure, restarts: u32 },
}

/// Something that happened, told to the engine by the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The service's process exists (answer to [`Action::Spawn`]).
    Spawned { service: usize, pid: i32 },
    /// The service's process could not be started.
    SpawnFailed { service: usize, error: String },
    /// The service said it is ready (sd_notify `READY=1`, or the service API).
    Ready { service: usize },
    /// The service's main process ended.
    Exited { service: usize, exit: ProcessExit },
    /// Time passed: deadlines up to now are due.
    Tick,
    /// Stop the whole stack (a `stop` command, SIGTERM in the foreground).
    Stop,
    /// The operator stops these services (`ccmgr stop SERVICE...`), and with them what
    /// requires them, dependents first: all are [`Want::Held`] until started again.
    OperatorStop { services: Vec<usize> },
    /// The operator starts these services (`ccmgr start SERVICE...`), and what they require,
    /// dependencies first: whatever was held or left down among them is wanted up again.
    OperatorStart { services: Vec<usize> },
    /// The operator restarts these services (`ccmgr restart SERVICE...`): they and what
    /// requires them (and runs) are cycled, as a failure sequence cycles them but with no
    /// failure counted; a named service that was down is started, with what it requires.
    OperatorRestart { services: Vec<usize> },
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the service's process; answer with `Spawned` or `SpawnFailed`.
    Spawn { service: usize },
    /// Send `signal` to the service's process group (its stop signal).
    Signal { service: usize, signal: Signal },
    /// SIGKILL the service's process group (a timeout ran out).
    Kill { service: usize },
    /// These services are to shut down: tell the ones that take part in the service API's
    /// shutdown protocol (they stop themselves, in shutdown order).
    ShutdownRequested { services: Vec<usize> },
    /// No cooperative service is being taken down any more: the shutdown gate closes again.
    ShutdownOver,
    /// Every service is up for the first time: tell whoever waits for the start.
    StartupComplete,
    /// Everything is stopped: the coordinator's work is done.
    Finished(Outcome),
}

/// What the engine needs to know about one service.
#[derive(Clone, Debug)]
pub struct ServiceParams {
    pub id: String,
    pub ready: ReadyKind,
    pub restart: RestartPolicy,
    pub startup_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub stop_signal: Signal,
    pub restart_delay: Duration,
    pub restart_delay_max: Duration,
    /// How long it must run, once ready, to count as up; an end before that is a failed start.
    pub min_uptime: Duration,
    /// What it depends on, with the kind of each edge.
    pub dependencies: Vec<(usize, EdgeKind)>,
    /// What depends on it, with the kind of each edge.
    pub dependents: Vec<(usize, EdgeKind)>,
    /// It takes part in the service API's shutdown protocol (`ready = "cc"` or `cc_arg`): it
    /// is asked to stop through the protocol, not sent its stop signal, and is killed only if
    /// it is still there after its shutdown timeout.
    pub cooperative: bool,
}

/// What the engine needs to know about the stack.
#[derive(Clone, Debug)]
pub struct EngineParams {
    pub services: Vec<ServiceParams>,
    pub startup_sequence: Vec<usize>,
    pub shutdown_sequence: Vec<usize>,
    /// Start strictly one at a time in `startup_sequence` order.
    pub explicit_startup: bool,
    /// Stop strictly one at a time in `shutdown_sequence` order.
    pub explicit_shutdown: bool,
    pub on_failure: OnFailure,
    pub restart_retry_counter: u32,
    pub restart_time_span: Duration,
    pub startup_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl EngineParams {
    pub fn from_config(config: &Config) -> Self {
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| ServiceParams {
                id: s.id.clone(),
                ready: s.ready,
                restart: s.restart,
                startup_timeout: s.startup_timeout.into(),
                shutdown_timeout: s.shutdown_timeout.into(),
                stop_signal: s.stop_signal.0,
                restart_delay: s.restart_delay.into(),
                restart_delay_max: s.restart_delay_max.into(),
                min_uptime: s.min_uptime.into(),
                dependencies: config.graph.dependencies(i),
                dependents: config.graph.dependents(i),
                cooperative: s.cc_arg || s.ready == ReadyKind::Cc,
            })
            .collect();
        let c = &config.global.coordinator;
        Self {
            services,
            startup_sequence: config.startup_sequence.clone(),
            shutdown_sequence: config.shutdown_sequence.clone(),
            explicit_startup: config.explicit_startup,
            explicit_shutdown: c.shutdown_sequence.is_some(),
            on_failure: c.on_failure,
            restart_retry_counter: c.restart_retry_counter,
            restart_time_span: c.restart_time_span.into(),
            startup_timeout: c.startup_timeout.into(),
            shutdown_timeout: c.shutdown_timeout.into(),
        }
    }
}

/// Why a service with no process is down, or that it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rest {
    /// Stopped (never started, stopped on request, or ended cleanly).
    Stopped,
    /// Its last run failed.
    Failed,
    /// A one-shot task (`ready = "exit"`) that finished: up, with nothing running.
    Finished,
}

/// How far a running process is on its way to being up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Not ready yet; killed (a failed start) if still not ready at `deadline`.
    Waiting { deadline: Time },
    /// Ready, but up only once it has run for its `min_uptime`, at `up_at`.
    Settling { up_at: Time },
    /// Up.
    Up,
}

/// The service's process, as the engine knows it. Exactly one of these at a time: each
/// deadline belongs to the state it is armed in, so none outlives its meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    /// No process: see [`Rest`].
    None(Rest),
    /// A spawn was asked for and not yet answered.
    Spawning,
    /// The main process `pid` runs, started at `since`.
    Running {
        pid: i32,
        since: Time,
        readiness: Readiness,
    },
    /// `pid` was told to stop (or killed): SIGKILL at `kill_deadline` unless `killed` already.
    /// `start_timed_out`: it is being killed because it was not ready within its startup
    /// timeout (its end is a failed start, unless the stack no longer wants it).
    Stopping {
        pid: i32,
        kill_deadline: Time,
        killed: bool,
        start_timed_out: bool,
    },
}

/// The runtime record of one service: what its process does, what the stack wants of it, and
/// its place in the restart bookkeeping. Every field is public and plain data: a
/// [`Snapshot`] of these is what the coordinator publishes and a successor adopts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub process: Process,
    pub want: Want,
    /// When [`Slot::state`] last changed.
    pub since: Time,
    /// When the current or last process was started.
    pub started_at: Option<Time>,
    /// Asked to shut down through the service API's protocol (cooperative services only).
    pub asked: bool,
    /// Not to be started before this (the restart delay).
    pub not_before: Time,
    /// Restarts in a row without a quiet span, for the doubling delay.
    pub streak: u32,
    pub last_failure_at: Option<Time>,
    /// Restarts since the stack started.
    pub restarts: u32,
    pub last_exit: Option<ProcessExit>,
    /// The process whose end `last_exit` records: an exit of it the keeper hands over again at
    /// a takeover is a duplicate.
    pub exited_pid: Option<i32>,
}

impl Slot {
    fn new(now: Time) -> Self {
        Self {
            process: Process::None(Rest::Stopped),
            want: Want::Up,
            since: now,
            started_at: None,
            asked: false,
            not_before: Time::ZERO,
            streak: 0,
            last_failure_at: None,
            restarts: 0,
            last_exit: None,
            exited_pid: None,
        }
    }

    /// The state `status` shows, derived from the process.
    pub fn state(&self) -> ServiceState {
        match self.process {
            Process::None(Rest::Stopped) => ServiceState::Stopped,
            Process::None(Rest::Failed) => ServiceState::Failed,
            Process::None(Rest::Finished) => ServiceState::Up,
            Process::Spawning => ServiceState::Starting,
            Process::Running { readiness, .. } => match readiness {
                Readiness::Waiting { .. } | Readiness::Settling { .. } => ServiceState::Starting,
                Readiness::Up => ServiceState::Up,
            },
            Process::Stopping { .. } => ServiceState::Stopping,
        }
    }

    /// The main process, while one exists.
    pub fn pid(&self) -> Option<i32> {
        match self.process {
            Process::Running { pid, .. } | Process::Stopping { pid, .. } => Some(pid),
            Process::None(_) | Process::Spawning => None,
        }
    }

    /// A process exists or is being created.
    fn is_alive(&self) -> bool {
        match self.process {
            Process::Spawning | Process::Running { .. } | Process::Stopping { .. } => true,
            Process::None(_) => false,
        }
    }

    /// Down for ordering purposes: nothing runs, nothing is on its way, and it is not a
    /// finished one-shot (which counts as up).
    fn is_down(&self) -> bool {
        match self.process {
            Process::None(Rest::Stopped | Rest::Failed) => true,
            Process::None(Rest::Finished)
            | Process::Spawning
            | Process::Running { .. }
            | Process::Stopping { .. } => false,
        }
    }

    fn is_up(&self) -> bool {
        self.state() == ServiceState::Up
    }
}

/// The restart window of the instance: restarts counted since `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestartWindow {
    pub start: Time,
    pub count: u32,
}

/// Everything a coordinator taking over needs to continue the engine where it was: what the
/// coordinator publishes in the segment after every event, and what [`Engine::adopt`] loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub phase: InstanceState,
    pub phase_since: Time,
    pub window: RestartWindow,
    /// Why the stack is stopping, once it is.
    pub stopping_for: Option<Outcome>,
    /// The deadline of the whole startup or shutdown sequence.
    pub sequence_deadline: Option<Time>,
    pub slots: Vec<Slot>,
}

/// One piece of news the keeper kept while no coordinator listened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeeperNews {
    /// A spawn was answered: the process `pid` exists.
    Spawned { service: usize, pid: i32 },
    /// A spawn failed.
    SpawnFailed { service: usize, error: String },
    /// The process `pid` ended. Applied only if the snapshot (or the news before it) shows
    /// that pid running, or a spawn it answers: one the dead coordinator already handled
    /// (its pid is the slot's `exited_pid`, or no longer the slot's) is a duplicate, ignored.
    Exited {
        service: usize,
        pid: i32,
        exit: ProcessExit,
    },
}

/// What the keeper tells a coordinator taking over: the news nobody read, in the order it
/// came, then what runs now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeeperFacts {
    pub news: Vec<KeeperNews>,
    /// The services' main processes that run now: (service, pid).
    pub running: Vec<(usize, i32)>,
}

/// The state machine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    params: EngineParams,
    slots: Vec<Slot>,
    phase: InstanceState,
    phase_since: Time,
    window: RestartWindow,
    /// Why the stack is stopping, once it is.
    stopping_for: Option<Outcome>,
    /// Cooperative services were asked to shut down and not all are down yet.
    gate_open: bool,
    /// The deadline of the whole startup or shutdown sequence.
    sequence_deadline: Option<Time>,
    finished: bool,
    now: Time,
}

/// The exit recorded for a process that vanished with no word of how (no keeper kept it).
const UNKNOWN_EXIT: ProcessExit = ProcessExit::Signaled {
    signal: Signal::SIGKILL as i32,
    core_dumped: false,
};

impl Engine {
    /// A new engine at time `now`; returns it with the first actions (the first level's spawns).
    pub fn new(params: EngineParams, now: Time) -> (Self, Vec<Action>) {
        let mut engine = Self::blank(params, now, InstanceState::Initializing);
        let mut actions = Vec::new();
        engine.pump(&mut actions);
        (engine, actions)
    }

    /// An engine in `phase` at `now` with every service stopped and wanted, and the startup
    /// deadline armed when starting up.
    fn blank(params: EngineParams, now: Time, phase: InstanceState) -> Self {
        let n = params.services.len();
        Self {
            sequence_deadline: (phase == InstanceState::Initializing)
                .then_some(now + params.startup_timeout),
            params,
            slots: vec![Slot::new(now); n],
            phase,
            phase_since: now,
            window: RestartWindow {
                start: now,
                count: 0,
            },
            stopping_for: None,
            gate_open: false,
            finished: false,
            now,
        }
    }

    /// The engine's whole state, for publication: [`Engine::adopt`] of it continues exactly
    /// where this engine is.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase,
            phase_since: self.phase_since,
            window: self.window,
            stopping_for: self.stopping_for.clone(),
            sequence_deadline: self.sequence_deadline,
            slots: self.slots.clone(),
        }
    }

    /// An engine for a coordinator taking over from a dead one, at time `now` (on the same
    /// clock as the snapshot's times): "load and continue". It loads what the dead one
    /// published (`snapshot`: every service's process and wanted state, its deadlines, the
    /// failure sequence under way, why the stack is stopping) and then applies what the keeper
    /// saw while nobody listened (`keeper`), in order, as the events it would have been: the
    /// answers to spawns, the exits of processes the snapshot still shows (an exit of any
    /// other pid is a duplicate, ignored); then which processes run. A process the snapshot
    /// shows that neither runs nor has a kept exit ended unseen (recorded as killed). A spawn
    /// nobody answered is asked again. Deadlines keep their times: a service being stopped is
    /// killed at its original deadline, not a fresh one.
    ///
    /// With `restart_all` (takeover = "restart", the original design) every service wanted up
    /// is then cycled: stopped in shutdown order and started again in startup order, and what
    /// ended while nobody watched is part of that cycle, not a failure.
    ///
    /// The service API's shutdown requests are not carried over: the new coordinator holds a
    /// fresh daemon component, so the cooperative services going down are asked again.
    pub fn adopt(
        params: EngineParams,
        now: Time,
        snapshot: Snapshot,
        keeper: &KeeperFacts,
        restart_all: bool,
    ) -> (Self, Vec<Action>) {
        let n = params.services.len();
        let mut engine = Self::blank(params, now, snapshot.phase);
        engine.now = now.max(snapshot.phase_since);
        engine.phase_since = snapshot.phase_since;
        engine.window = snapshot.window;
        engine.stopping_for = snapshot.stopping_for.clone();
        engine.sequence_deadline = snapshot.sequence_deadline;
        for (slot, published) in engine.slots.iter_mut().zip(snapshot.slots.iter().cloned()) {
            *slot = published;
            slot.asked = false;
        }
        let stopping = matches!(
            engine.phase,
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed
        );
        if stopping {
            // The dead coordinator was stopping the stack (or had stopped it): finish the stop.
            let why = engine.stopping_for.clone().unwrap_or(Outcome::Stopped);
            engine.enter_stopping(why);
            if snapshot.phase == InstanceState::Stopping {
                // Its deadline goes on (or stays spent).
                engine.sequence_deadline = snapshot.sequence_deadline;
            }
        } else if restart_all {
            for slot in &mut engine.slots {
                if slot.want == Want::Up {
                    slot.want = Want::Cycling;
                }
            }
            engine.set_phase(InstanceState::Recovery);
        } else if engine.phase == InstanceState::Steady {
            // A takeover is a recovery (the design's state machine: steady -> recovery ->
            // steady), so the phase's time says when the successor took over.
            engine.set_phase(InstanceState::Recovery);
        }
        // Spawns the dead coordinator asked for: answered by the news or by what runs, or
        // never taken by the keeper (asked again below).
        let mut unanswered: Vec<bool> = engine
            .slots
            .iter()
            .map(|slot| slot.process == Process::Spawning)
            .collect();
        let mut actions = Vec::new();
        engine.pump(&mut actions);
        // What happened while nobody watched, in the order it happened, as if it had been
        // heard then.
        for news in &keeper.news {
            if let KeeperNews::Spawned { service, .. }
            | KeeperNews::SpawnFailed { service, .. }
            | KeeperNews::Exited { service, .. } = *news
                && service < n
                && engine.slots[service].process == Process::Spawning
            {
                unanswered[service] = false;
            }
            match *news {
                KeeperNews::Spawned { service, pid } if service < n => {
                    actions.extend(engine.handle(Event::Spawned { service, pid }, now));
                }
                KeeperNews::SpawnFailed { service, ref error } if service < n => {
                    let error = error.clone();
                    actions.extend(engine.handle(Event::SpawnFailed { service, error }, now));
                }
                KeeperNews::Exited { service, pid, exit } if service < n => {
                    let slot = &engine.slots[service];
                    let answers_the_spawn = slot.process == Process::Spawning
                        && slot.exited_pid != Some(pid)
                        && !keeper.running.contains(&(service, pid));
                    if answers_the_spawn {
                        // The spawn was answered, and that process ended, both unseen.
                        actions.extend(engine.handle(Event::Spawned { service, pid }, now));
                    }
                    if engine.slots[service].pid() == Some(pid) {
                        actions.extend(engine.handle(Event::Exited { service, exit }, now));
                    }
                }
                KeeperNews::Spawned { .. }
                | KeeperNews::SpawnFailed { .. }
                | KeeperNews::Exited { .. } => {}
            }
        }
        for &(s, pid) in &keeper.running {
            if s >= n || engine.slots[s].pid() == Some(pid) {
                continue;
            }
            if engine.slots[s].pid().is_some() {
                // Another process than the one published: the published one ended unseen.
                engine.on_exited(s, UNKNOWN_EXIT);
            }
            // A spawn the dead coordinator asked for (published or not yet) was answered;
            // if this engine asked for it again meanwhile, that request is the same one.
            unanswered[s] = false;
            engine.slots[s].process = Process::Spawning;
            engine.on_spawned(s, pid);
            actions.retain(|a| *a != Action::Spawn { service: s });
        }
        for (s, &unanswered) in unanswered.iter().enumerate() {
            let runs = |pid| keeper.running.contains(&(s, pid));
            match engine.slots[s].process {
                Process::Running { pid, .. } | Process::Stopping { pid, .. } if !runs(pid) => {
                    engine.on_exited(s, UNKNOWN_EXIT);
                }
                // Nobody answered the spawn: the keeper never took the request. Ask again.
                Process::Spawning if unanswered => {
                    engine.slots[s].process = Process::None(Rest::Stopped);
                }
                Process::Spawning
                | Process::Running { .. }
                | Process::Stopping { .. }
                | Process::None(_) => {}
            }
        }
        engine.pump(&mut actions);
        // A stack the dead coordinator had finished stopping stays finished as it was.
        if engine.finished && engine.phase == snapshot.phase {
            engine.phase_since = snapshot.phase_since;
        }
        (engine, actions)
    }

    /// An engine that only stops, in shutdown order, the services whose main processes are
    /// `running` (indexed by service): the ordered stop of a driver that has no coordinator
    /// (the keeper's last resort, `ccmgr stop` when no coordinator answers). The driver feeds
    /// it `Exited` and `Tick` and carries out `Signal` and `Kill`; `Finished` ends it.
    pub fn stopping(
        params: EngineParams,
        now: Time,
        running: &[Option<i32>],
    ) -> (Self, Vec<Action>) {
        let mut engine = Self::blank(params, now, InstanceState::Steady);
        for (s, slot) in engine.slots.iter_mut().enumerate() {
            if let Some(pid) = running.get(s).copied().flatten() {
                slot.process = Process::Running {
                    pid,
                    since: now,
                    readiness: Readiness::Up,
                };
            }
        }
        engine.enter_stopping(Outcome::Stopped);
        let mut actions = Vec::new();
        engine.pump(&mut actions);
        (engine, actions)
    }

    pub fn phase(&self) -> InstanceState {
        self.phase
    }

    pub fn phase_since(&self) -> Time {
        self.phase_since
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn params(&self) -> &EngineParams {
        &self.params
    }

    pub fn restart_window(&self) -> RestartWindow {
        self.window
    }

    /// Why the stack stopped or is stopping, if it is.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.stopping_for.as_ref()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The deadline of the whole startup or shutdown sequence, while one runs.
    pub fn sequence_deadline(&self) -> Option<Time> {
        self.sequence_deadline
    }

    /// The earliest time at which a [`Event::Tick`] has work to do, if any: the driver arms
    /// one timer for it, so an idle coordinator sleeps with no timer at all.
    pub fn next_deadline(&self) -> Option<Time> {
        let slot_deadlines = self.slots.iter().filter_map(|s| {
            let timeout = match s.process {
                Process::Running { readiness, .. } => match readiness {
                    Readiness::Waiting { deadline } => Some(deadline),
                    Readiness::Settling { up_at } => Some(up_at),
                    Readiness::Up => None,
                },
                Process::Stopping {
                    kill_deadline,
                    killed: false,
                    ..
                } => Some(kill_deadline),
                Process::Stopping { killed: true, .. } | Process::None(_) | Process::Spawning => {
                    None
                }
            };
            let delayed_start = (s.want == Want::Up && s.is_down() && s.not_before > self.now)
                .then_some(s.not_before);
            timeout.into_iter().chain(delayed_start).min()
        });
        slot_deadlines.chain(self.sequence_deadline).min()
    }

    /// Feeds one event that happened at `now`; returns what to do about it.
    pub fn handle(&mut self, event: Event, now: Time) -> Vec<Action> {
        self.now = self.now.max(now);
        let mut actions = Vec::new();
        if self.finished {
            return actions;
        }
        match event {
            Event::Spawned { service, pid } => self.on_spawned(service, pid),
            Event::SpawnFailed { service, error } => self.on_spawn_failed(service, error),
            Event::Ready { service } => self.on_ready(service),
            Event::Exited { service, exit } => self.on_exited(service, exit),
            Event::Tick => self.on_tick(&mut actions),
            Event::Stop => self.begin_stopping(Outcome::Stopped),
            Event::OperatorStop { services } if self.takes_operator_requests() => {
                self.on_operator_stop(&services);
            }
            Event::OperatorStart { services } if self.takes_operator_requests() => {
                self.on_operator_start(&services);
                self.recover_unless_whole();
            }
            Event::OperatorRestart { services } if self.takes_operator_requests() => {
                self.on_operator_restart(&services);
                self.recover_unless_whole();
            }
            // Before the startup sequence is done, or once the stack is stopping, the
            // operator's per-service requests are refused (the driver says so): ignored here.
            Event::OperatorStop { .. }
            | Event::OperatorStart { .. }
            | Event::OperatorRestart { .. } => {}
        }
        self.pump(&mut actions);
        actions
    }

    /// Whether the operator's per-service requests apply now: once the startup sequence is
    /// done and while the stack is not stopping (steady, or recovering from a failure).
    pub fn takes_operator_requests(&self) -> bool {
        match self.phase {
            InstanceState::Steady | InstanceState::Recovery => !self.finished,
            InstanceState::Initializing
            | InstanceState::Stopping
            | InstanceState::Stopped
            | InstanceState::Failed => false,
        }
    }

    /// The services an operator's stop of `services` takes down: they and everything that
    /// requires them, directly or not.
    pub fn operator_stop_set(&self, services: &[usize]) -> Vec<usize> {
        self.closure(services, |s| &self.params.services[s].dependents)
    }

    /// The services an operator's start of `services` brings up: they and everything they
    /// require, directly or not.
    pub fn operator_start_set(&self, services: &[usize]) -> Vec<usize> {
        self.closure(services, |s| &self.params.services[s].dependencies)
    }

    /// The services an operator's restart of `services` cycles: they and everything that
    /// requires them and is not held or left down (what was down stays down).
    pub fn operator_restart_set(&self, services: &[usize]) -> Vec<usize> {
        let mut set: Vec<usize> = self
            .operator_stop_set(services)
            .into_iter()
            .filter(|&s| services.contains(&s) || self.slots[s].want != Want::Held)
            .filter(|&s| services.contains(&s) || self.slots[s].want != Want::Down)
            .collect();
        set.sort_unstable();
        set
    }

    /// `services` and what `next` leads to from them over `requires` edges, sorted.
    fn closure<'a>(
        &'a self,
        services: &[usize],
        next: impl Fn(usize) -> &'a Vec<(usize, EdgeKind)>,
    ) -> Vec<usize> {
        let mut seen = vec![false; self.slots.len()];
        let mut stack: Vec<usize> = services
            .iter()
            .copied()
            .filter(|&s| s < self.slots.len())
            .collect();
        while let Some(s) = stack.pop() {
            if std::mem::replace(&mut seen[s], true) {
                continue;
            }
            for &(d, kind) in next(s) {
                if kind == EdgeKind::Requires {
                    stack.push(d);
                }
            }
        }
        (0..seen.len()).filter(|&s| seen[s]).collect()
    }

    /// Held down: the passes stop them, dependents first, and nothing brings them back but
    /// the operator.
    fn on_operator_stop(&mut self, services: &[usize]) {
        for s in self.operator_stop_set(services) {
            self.slots[s].want = Want::Held;
            // One that had failed (waiting for its restart delay, or given up on) is now
            // stopped by the operator, not failed: its last exit still says how it ended.
            if self.slots[s].process == Process::None(Rest::Failed) {
                self.set_process(s, Process::None(Rest::Stopped));
            }
        }
    }

    /// Wanted up again, with what they require: the start pass brings them up in order (the
    /// restart delay of one that failed still applies). A service already wanted up or
    /// cycling is left as it is.
    fn on_operator_start(&mut self, services: &[usize]) {
        for s in self.operator_start_set(services) {
            let slot = &mut self.slots[s];
            match slot.want {
                // Down, it is simply wanted up: the start pass brings it up in order.
                Want::Held | Want::Down if matches!(slot.process, Process::None(_)) => {
                    slot.want = Want::Up
                }
                // Still on its way down (a spawn in flight, running until its dependents are
                // down, stopping): wanted up at once, it would go on running, or come up from
                // a spawn asked for before, while what it requires may be down (found by the
                // property test). Cycled instead: down first, then up again in order.
                Want::Held | Want::Down => slot.want = Want::Cycling,
                Want::Up | Want::Cycling => {}
            }
        }
    }

    /// Started if down (with what they require), then cycled with what requires them and
    /// runs: stopped dependents first, started again in order once all are down. No failure
    /// is counted: the restart window and the restart delays are left alone.
    fn on_operator_restart(&mut self, services: &[usize]) {
        let cycled = self.operator_restart_set(services);
        self.on_operator_start(services);
        for s in cycled {
            let slot = &mut self.slots[s];
            match slot.want {
                Want::Up | Want::Cycling => slot.want = Want::Cycling,
                Want::Held | Want::Down => {}
            }
        }
    }

    /// Every process change goes through here, so that `since` follows the shown state.
    fn set_process(&mut self, service: usize, process: Process) {
        let slot = &mut self.slots[service];
        let before = slot.state();
        slot.process = process;
        if slot.state() != before {
            slot.since = self.now;
        }
    }

    fn set_phase(&mut self, phase: InstanceState) {
        if self.phase != phase {
            self.phase = phase;
            self.phase_since = self.now;
        }
    }

    fn on_spawned(&mut self, service: usize, pid: i32) {
        match self.slots[service].process {
            Process::Spawning => {}
            // An answer to no request of ours (a stale or duplicate report).
            Process::None(_) | Process::Running { .. } | Process::Stopping { .. } => return,
        }
        let p = &self.params.services[service];
        let deadline = self.now + p.startup_timeout;
        let ready_at_exec = p.ready == ReadyKind::Started;
        self.slots[service].started_at = Some(self.now);
        self.set_process(
            service,
            Process::Running {
                pid,
                since: self.now,
                readiness: Readiness::Waiting { deadline },
            },
        );
        if ready_at_exec {
            self.on_ready(service);
        }
    }

    fn on_spawn_failed(&mut self, service: usize, error: String) {
        match self.slots[service].process {
            Process::Spawning => {}
            Process::None(_) | Process::Running { .. } | Process::Stopping { .. } => return,
        }
        if self.slots[service].want == Want::Up {
            self.on_failure(service, FailureKind::SpawnFailed(error));
        } else {
            // Going down anyway: nothing started, nothing failed that matters now.
            self.set_process(service, Process::None(Rest::Stopped));
        }
    }

    /// The service is ready (READY=1, or its exec for `ready = "started"`): up once it has
    /// run for its `min_uptime`.
    fn on_ready(&mut self, service: usize) {
        let min_uptime = self.params.services[service].min_uptime;
        let waits_for_word = matches!(
            self.params.services[service].ready,
            ReadyKind::Notify | ReadyKind::Cc | ReadyKind::Started
        );
        match self.slots[service].process {
            Process::Running {
                pid,
                since,
                readiness: Readiness::Waiting { .. },
            } if waits_for_word => {
                let up_at = since + min_uptime;
                let readiness = if up_at <= self.now {
                    Readiness::Up
                } else {
                    Readiness::Settling { up_at }
                };
                self.set_process(
                    service,
                    Process::Running {
                        pid,
                        since,
                        readiness,
                    },
                );
            }
            // A one-shot is up at its clean exit, never at a word; a repeated word changes
            // nothing; a process on its way down stays on its way down.
            Process::Running { .. }
            | Process::None(_)
            | Process::Spawning
            | Process::Stopping { .. } => {}
        }
    }

    fn on_exited(&mut self, service: usize, exit: ProcessExit) {
        let p = &self.params.services[service];
        let one_shot = p.ready == ReadyKind::Exit;
        let startup_timeout = p.startup_timeout;
        let slot = &mut self.slots[service];
        let going_down = slot.want != Want::Up;
        match slot.process {
            // No process to have ended: a stale report.
            Process::None(_) | Process::Spawning => return,
            Process::Running { .. } | Process::Stopping { .. } => {}
        }
        slot.last_exit = Some(exit);
        slot.exited_pid = slot.pid();
        match slot.process {
            Process::None(_) | Process::Spawning => {}
            Process::Stopping {
                start_timed_out: true,
                ..
            } if !going_down => {
                self.on_failure(service, FailureKind::StartTimeout(startup_timeout));
            }
            Process::Stopping { .. } => self.set_process(service, Process::None(Rest::Stopped)),
            // The stack is taking it down anyway (a stop, a failure sequence): a service that
            // ends first (an API service whose turn in the shutdown protocol came) stopped.
            Process::Running { .. } if going_down => {
                self.set_process(service, Process::None(Rest::Stopped));
            }
            // A one-shot task that finished: it is up, with nothing running.
            Process::Running {
                readiness: Readiness::Waiting { .. },
                ..
            } if one_shot && exit.success() => {
                self.set_process(service, Process::None(Rest::Finished));
            }
            // Any other end of a process the stack wants is a failure (before its min_uptime
            // too: a start that did not hold), unless its restart policy calls it clean.
            Process::Running { .. } => self.on_failure(service, FailureKind::Exited(exit)),
        }
    }

    /// A service ended or could not start when it should be running.
    fn on_failure(&mut self, service: usize, kind: FailureKind) {
        let clean_exit = matches!(&kind, FailureKind::Exited(exit) if exit.success());
        let rest = if clean_exit {
            Rest::Stopped
        } else {
            Rest::Failed
        };
        self.set_process(service, Process::None(rest));
        let failure = Failure { service, kind };
        match self.phase {
            InstanceState::Initializing => {
                self.begin_stopping(Outcome::StartupFailed(failure));
                return;
            }
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed => return,
            InstanceState::Steady | InstanceState::Recovery => {}
        }
        let restart = match self.params.services[service].restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean_exit,
            RestartPolicy::Never => false,
        };
        if !restart {
            // It stays down, and so does everything that requires it (what the operator
            // holds stays held: only the operator brings it back).
            for s in self.requires_closure(service) {
                let slot = &mut self.slots[s];
                match slot.want {
                    Want::Up | Want::Cycling | Want::Down => slot.want = Want::Down,
                    Want::Held => {}
                }
            }
            return;
        }
        // Count the restart in the instance's window; a quiet span resets the count.
        let span = self.params.restart_time_span;
        if self.now.saturating_sub(self.window.start) > span {
            self.window = RestartWindow {
                start: self.now,
                count: 0,
            };
        }
        self.window.count += 1;
        if self.window.count > self.params.restart_retry_counter {
            let restarts = self.window.count - 1;
            self.begin_stopping(Outcome::GaveUp { failure, restarts });
            return;
        }
        // The restart delay: the least time between two starts, doubling in a crash loop.
        let p = &self.params.services[service];
        let slot = &mut self.slots[service];
        let quiet = slot
            .last_failure_at
            .is_none_or(|t| self.now.saturating_sub(t) > span);
        slot.streak = if quiet { 1 } else { slot.streak + 1 };
        slot.last_failure_at = Some(self.now);
        slot.restarts += 1;
        let factor = 1u32.checked_shl(slot.streak - 1).unwrap_or(u32::MAX);
        let delay = p
            .restart_delay
            .saturating_mul(factor)
            .min(p.restart_delay_max)
            .max(p.restart_delay);
        let earliest = slot.started_at.unwrap_or(self.now) + delay;
        slot.not_before = slot.not_before.max(earliest);

        let affected = match self.params.on_failure {
            OnFailure::RestartDependents => self.requires_closure(service),
            OnFailure::RestartAll => (0..self.slots.len()).collect(),
        };
        for s in affected {
            let slot = &mut self.slots[s];
            match slot.want {
                Want::Up | Want::Cycling => slot.want = Want::Cycling,
                // Down, or held by the operator: a failure sequence brings neither back.
                Want::Down | Want::Held => {}
            }
        }
        self.set_phase(InstanceState::Recovery);
    }

    /// `service` and everything that requires it, directly or not.
    fn requires_closure(&self, service: usize) -> Vec<usize> {
        let mut seen = vec![false; self.slots.len()];
        let mut stack = vec![service];
        let mut out = Vec::new();
        while let Some(s) = stack.pop() {
            if std::mem::replace(&mut seen[s], true) {
                continue;
            }
            out.push(s);
            for &(d, kind) in &self.params.services[s].dependents {
                if kind == EdgeKind::Requires {
                    stack.push(d);
                }
            }
        }
        out
    }

    fn begin_stopping(&mut self, why: Outcome) {
        if matches!(
            self.phase,
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed
        ) {
            return;
        }
        self.enter_stopping(why);
    }

    /// Stops everything, whatever the phase.
    fn enter_stopping(&mut self, why: Outcome) {
        self.stopping_for = Some(why);
        self.set_phase(InstanceState::Stopping);
        self.sequence_deadline = Some(self.now + self.params.shutdown_timeout);
        for slot in &mut self.slots {
            slot.want = Want::Down;
        }
    }

    fn on_tick(&mut self, actions: &mut Vec<Action>) {
        let now = self.now;
        if self.sequence_deadline.is_some_and(|d| d <= now) {
            self.sequence_deadline = None;
            match self.phase {
                InstanceState::Initializing => {
                    // Blame the first service in startup order that is not up.
                    let late = self
                        .params
                        .startup_sequence
                        .iter()
                        .copied()
                        .find(|&s| !self.slots[s].is_up())
                        .unwrap_or(0);
                    let kind = FailureKind::SequenceTimeout(self.params.startup_timeout);
                    self.begin_stopping(Outcome::StartupFailed(Failure {
                        service: late,
                        kind,
                    }));
                }
                InstanceState::Stopping => {
                    // The whole shutdown took too long: kill whatever is left.
                    for s in 0..self.slots.len() {
                        let process = match self.slots[s].process {
                            Process::Running { pid, .. } => Process::Stopping {
                                pid,
                                kill_deadline: now,
                                killed: true,
                                start_timed_out: false,
                            },
                            Process::Stopping {
                                pid,
                                kill_deadline,
                                killed: false,
                                start_timed_out,
                            } => Process::Stopping {
                                pid,
                                kill_deadline,
                                killed: true,
                                start_timed_out,
                            },
                            Process::Stopping { killed: true, .. }
                            | Process::None(_)
                            | Process::Spawning => continue,
                        };
                        self.set_process(s, process);
                        actions.push(Action::Kill { service: s });
                    }
                }
                InstanceState::Steady
                | InstanceState::Recovery
                | InstanceState::Stopped
                | InstanceState::Failed => {}
            }
        }
        for s in 0..self.slots.len() {
            let process = match self.slots[s].process {
                Process::Running {
                    pid,
                    readiness: Readiness::Waiting { deadline },
                    ..
                } if deadline <= now => {
                    actions.push(Action::Kill { service: s });
                    Process::Stopping {
                        pid,
                        kill_deadline: deadline,
                        killed: true,
                        start_timed_out: true,
                    }
                }
                Process::Running {
                    pid,
                    since,
                    readiness: Readiness::Settling { up_at },
                } if up_at <= now => Process::Running {
                    pid,
                    since,
                    readiness: Readiness::Up,
                },
                Process::Stopping {
                    pid,
                    kill_deadline,
                    killed: false,
                    start_timed_out,
                } if kill_deadline <= now => {
                    actions.push(Action::Kill { service: s });
                    Process::Stopping {
                        pid,
                        kill_deadline,
                        killed: true,
                        start_timed_out,
                    }
                }
                Process::Running { .. }
                | Process::Stopping { .. }
                | Process::None(_)
                | Process::Spawning => continue,
            };
            self.set_process(s, process);
        }
    }

    /// The two passes (stop, then start) and the phase changes they lead to.
    fn pump(&mut self, actions: &mut Vec<Action>) {
        self.open_or_close_the_gate(actions);
        // Stops, dependents first.
        let shutdown = self.params.shutdown_sequence.clone();
        for (pos, &s) in shutdown.iter().enumerate() {
            if self.slots[s].want == Want::Up || !self.may_stop(s, &shutdown[..pos]) {
                continue;
            }
            match self.slots[s].process {
                // A finished one-shot has nothing to stop.
                Process::None(Rest::Finished) => {
                    self.set_process(s, Process::None(Rest::Stopped));
                }
                Process::Running { pid, .. } => {
                    let p = &self.params.services[s];
                    // A cooperative service stops itself when its turn in the protocol comes.
                    if !p.cooperative {
                        actions.push(Action::Signal {
                            service: s,
                            signal: p.stop_signal,
                        });
                    }
                    let kill_deadline = self.now + p.shutdown_timeout;
                    self.set_process(
                        s,
                        Process::Stopping {
                            pid,
                            kill_deadline,
                            killed: false,
                            start_timed_out: false,
                        },
                    );
                }
                // Wait for the spawn's answer, then stop it; the rest is down or going.
                Process::Spawning
                | Process::Stopping { .. }
                | Process::None(Rest::Stopped | Rest::Failed) => {}
            }
        }
        // A failure sequence restarts once everything it took down is down.
        let cycling_done = self
            .slots
            .iter()
            .all(|s| s.want != Want::Cycling || s.is_down());
        if cycling_done {
            for slot in &mut self.slots {
                if slot.want == Want::Cycling {
                    slot.want = Want::Up;
                }
            }
        }
        // Starts, dependencies first.
        let startup = self.params.startup_sequence.clone();
        for (pos, &s) in startup.iter().enumerate() {
            let slot = &self.slots[s];
            if slot.want != Want::Up
                || !slot.is_down()
                || slot.not_before > self.now
                || !self.may_start(s, &startup[..pos])
            {
                continue;
            }
            self.set_process(s, Process::Spawning);
            actions.push(Action::Spawn { service: s });
        }
        self.update_phase(actions);
    }

    /// `service` was to stop through the service API but never registered with it (it was
    /// started with `-cc` and did not call `alive`): stop it with its stop signal instead,
    /// now if its turn has come, else when it comes.
    pub fn not_cooperative(&mut self, service: usize) -> Vec<Action> {
        self.params.services[service].cooperative = false;
        match self.slots[service].process {
            Process::Stopping { killed: false, .. } => {
                let signal = self.params.services[service].stop_signal;
                vec![Action::Signal { service, signal }]
            }
            Process::Stopping { killed: true, .. }
            | Process::Running { .. }
            | Process::Spawning
            | Process::None(_) => Vec::new(),
        }
    }

    /// Cooperative services stop themselves, in shutdown order, once asked through the
    /// service API: ask every one that is going down and has not been asked yet, all at once
    /// (the protocol orders them); close the gate when none is going down any more.
    fn open_or_close_the_gate(&mut self, actions: &mut Vec<Action>) {
        let mut ask = Vec::new();
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let going_down = slot.want != Want::Up && slot.is_alive();
            if self.params.services[s].cooperative && going_down && !slot.asked {
                slot.asked = true;
                ask.push(s);
            }
            if !slot.is_alive() {
                slot.asked = false;
            }
        }
        if !ask.is_empty() {
            self.gate_open = true;
            actions.push(Action::ShutdownRequested { services: ask });
        } else if self.gate_open
            && !self.slots.iter().any(|s| s.asked)
            && self.phase != InstanceState::Stopping
        {
            self.gate_open = false;
            actions.push(Action::ShutdownOver);
        }
    }

    /// Everything going down that depends on `s` is down (and, with an explicit shutdown
    /// sequence, everything before it that is going down).
    fn may_stop(&self, s: usize, before_in_sequence: &[usize]) -> bool {
        let going_down_and_alive =
            |d: usize| self.slots[d].want != Want::Up && !self.slots[d].is_down();
        let dependents_down = !self.params.services[s]
            .dependents
            .iter()
            .any(|&(d, _)| going_down_and_alive(d));
        let sequence_ok = !self.params.explicit_shutdown
            || !before_in_sequence.iter().any(|&d| going_down_and_alive(d));
        dependents_down && sequence_ok
    }

    /// Everything `s` requires is up; everything it wants is up or has failed to start (its
    /// last attempt failed) or is not wanted up; everything it comes after that the stack
    /// wants is up (and, with an explicit startup sequence, everything wanted before it).
    fn may_start(&self, s: usize, before_in_sequence: &[usize]) -> bool {
        let up = |d: usize| self.slots[d].is_up();
        let deps_ok = self.params.services[s]
            .dependencies
            .iter()
            .all(|&(d, kind)| match kind {
                EdgeKind::Requires => up(d),
                // dinit's waits-for: the attempt to start it is over, whichever way it went.
                EdgeKind::Wants => {
                    up(d)
                        || matches!(self.slots[d].want, Want::Down | Want::Held)
                        || self.slots[d].process == Process::None(Rest::Failed)
                }
                EdgeKind::After | EdgeKind::Before => {
                    up(d) || matches!(self.slots[d].want, Want::Down | Want::Held)
                }
            });
        let sequence_ok = !self.params.explicit_startup
            || before_in_sequence
                .iter()
                .all(|&d| up(d) || self.slots[d].want != Want::Up);
        deps_ok && sequence_ok
    }

    /// Every service wanted up is up, and none is cycling.
    fn all_wanted_up(&self) -> bool {
        self.slots.iter().all(|s| match s.want {
            Want::Up => s.is_up(),
            Want::Down | Want::Held => true,
            Want::Cycling => false,
        })
    }

    /// An operator's start or restart that leaves something wanted up that is not up passes
    /// a steady stack through recovery, as a takeover does: steady always means "everything
    /// wanted is up", and the phase's time says when the stack was last whole.
    fn recover_unless_whole(&mut self) {
        if self.phase == InstanceState::Steady && !self.all_wanted_up() {
            self.set_phase(InstanceState::Recovery);
        }
    }

    fn update_phase(&mut self, actions: &mut Vec<Action>) {
        let all_wanted_up = self.all_wanted_up();
        match self.phase {
            InstanceState::Initializing if all_wanted_up => {
                self.sequence_deadline = None;
                self.set_phase(InstanceState::Steady);
                actions.push(Action::StartupComplete);
            }
            InstanceState::Recovery if all_wanted_up => self.set_phase(InstanceState::Steady),
            InstanceState::Stopping if self.slots.iter().all(Slot::is_down) => {
                self.sequence_deadline = None;
                self.finished = true;
                let outcome = self.stopping_for.clone().unwrap_or(Outcome::Stopped);
                self.set_phase(if outcome == Outcome::Stopped {
                    InstanceState::Stopped
                } else {
                    InstanceState::Failed
                });
                actions.push(Action::Finished(outcome));
            }
            InstanceState::Initializing
            | InstanceState::Recovery
            | InstanceState::Steady
            | InstanceState::Stopping
            | InstanceState::Stopped
            | InstanceState::Failed => {}
        }
    }
}

#[cfg(test)]
mod tests;

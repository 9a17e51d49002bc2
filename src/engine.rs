//! The coordinator's decisions: a pure state machine over the stack of services.
//!
//! This module owns *what* happens and *when*: which service starts next, when one counts as
//! up, what a failure sets off (the failure sequence, the restart delay, the retry window,
//! giving up), the order of stopping, and every timeout. It performs nothing itself: it takes
//! [`Event`]s with the time they happened and answers with [`Action`]s (spawn this, signal
//! that, report this) for a driver to carry out. Time is a value passed in, never read from a
//! clock, so the tests below drive hours of restarts in virtual time, deterministically; the
//! real driver (the coordinator process) feeds it real events.
//!
//! Each service has a *current* state (what its process is doing) and a *wanted* flag (whether
//! the stack wants it up). After every event one pass stops, in shutdown order, what is not
//! wanted and may stop (every dependent going down is already down), and one pass starts, in
//! startup order, what is wanted and may start (everything it depends on is up), so ordering
//! falls out of the graph rather than being scripted per situation.

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

/// The runtime record of one service.
#[derive(Clone, Debug)]
pub struct Slot {
    pub state: ServiceState,
    /// The main process, while one exists.
    pub pid: Option<i32>,
    /// The stack wants it up.
    pub wanted: bool,
    /// Taken down by a failure sequence; wanted again once every service in it is down.
    cycling: bool,
    /// Asked to shut down through the service API's protocol (cooperative services only).
    asked: bool,
    /// A spawn was asked for and not yet answered.
    spawn_pending: bool,
    /// When `state` last changed.
    pub since: Time,
    /// When the current or last process was started.
    pub started_at: Option<Time>,
    /// The startup deadline while starting; the kill deadline while stopping.
    deadline: Option<Time>,
    /// SIGKILL was sent to this process.
    killed: bool,
    /// It was killed for not becoming ready in time.
    start_timed_out: bool,
    /// Not to be started before this (the restart delay).
    not_before: Time,
    /// Restarts in a row without a quiet span, for the doubling delay.
    streak: u32,
    last_failure_at: Option<Time>,
    /// Restarts since the coordinator started.
    pub restarts: u32,
    pub last_exit: Option<ProcessExit>,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: ServiceState::Stopped,
            pid: None,
            wanted: true,
            cycling: false,
            asked: false,
            spawn_pending: false,
            since: Time::ZERO,
            started_at: None,
            deadline: None,
            killed: false,
            start_timed_out: false,
            not_before: Time::ZERO,
            streak: 0,
            last_failure_at: None,
            restarts: 0,
            last_exit: None,
        }
    }

    /// A process exists or is being created.
    fn is_alive(&self) -> bool {
        self.pid.is_some() || self.spawn_pending
    }

    /// Down for ordering purposes: nothing runs and nothing is on its way.
    fn is_down(&self) -> bool {
        !self.is_alive() && matches!(self.state, ServiceState::Stopped | ServiceState::Failed)
    }
}

/// What a coordinator taking over knows of one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adopted {
    /// The state the dead coordinator published.
    pub state: ServiceState,
    /// Its main process, if it still runs (the keeper's word).
    pub running: Option<i32>,
    /// How it ended, if it ended while no coordinator watched (the keeper kept the news).
    pub exit: Option<ProcessExit>,
    pub restarts: u32,
    pub last_exit: Option<ProcessExit>,
}

/// The restart window of the instance: restarts counted since `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestartWindow {
    pub start: Time,
    pub count: u32,
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

impl Engine {
    /// A new engine at time `now`; returns it with the first actions (the first level's spawns).
    pub fn new(params: EngineParams, now: Time) -> (Self, Vec<Action>) {
        let mut engine = Self::blank(params, now, InstanceState::Initializing);
        let mut actions = Vec::new();
        engine.pump(&mut actions);
        (engine, actions)
    }

    /// An engine in `phase` at `now` with every service stopped and wanted, and the startup
    /// deadline armed when starting up: what `new` and `adopt` build on.
    fn blank(params: EngineParams, now: Time, phase: InstanceState) -> Self {
        let n = params.services.len();
        let mut slots = vec![Slot::new(); n];
        for slot in &mut slots {
            slot.since = now;
        }
        Self {
            sequence_deadline: (phase == InstanceState::Initializing)
                .then_some(now + params.startup_timeout),
            params,
            slots,
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

    /// An engine for a coordinator taking over from a dead one, at time `now`: `phase` is what
    /// the dead one published, `services` what is known of each service (its published record,
    /// whether its process still runs, how it ended if it died while nobody watched). The new
    /// engine finishes what the old one was doing: a startup goes on starting, a stop goes on
    /// stopping, a failure sequence goes on restarting, and a service that died while nobody
    /// watched goes through the failure sequence like any other crash. With `restart_all`
    /// (takeover = "restart", the original design) everything running is then stopped in
    /// shutdown order and started again in startup order. `window` is the dead one's restart
    /// window, on the same clock as `now`.
    pub fn adopt(
        params: EngineParams,
        now: Time,
        phase: InstanceState,
        services: &[Adopted],
        window: RestartWindow,
        restart_all: bool,
    ) -> (Self, Vec<Action>) {
        let n = params.services.len();
        let mut engine = Self::blank(params, now, phase);
        // The dead coordinator's window goes on: a takeover neither forgives restarts nor
        // keeps counting them past their span.
        engine.window = window;
        let mut died_unwatched = Vec::new();
        for (s, adopted) in services.iter().enumerate().take(n) {
            let ready = engine.params.services[s].ready;
            let slot = &mut engine.slots[s];
            slot.restarts = adopted.restarts;
            slot.last_exit = adopted.exit.or(adopted.last_exit);
            slot.pid = adopted.running;
            slot.started_at = adopted.running.map(|_| now);
            slot.state = match (adopted.running, adopted.state) {
                (Some(_), ServiceState::Stopping) => ServiceState::Stopping,
                (Some(_), ServiceState::Up) => ServiceState::Up,
                // Its exec succeeded (the keeper reported it), and that is all "started" asks.
                (Some(_), _) if ready == ReadyKind::Started => ServiceState::Up,
                // Running but not yet known to be up (or not yet published): starting, with a
                // fresh startup deadline.
                (Some(_), _) => ServiceState::Starting,
                // A one-shot task that finished while nobody watched: done, so up.
                (None, ServiceState::Starting)
                    if ready == ReadyKind::Exit
                        && adopted.exit.is_some_and(ProcessExit::success) =>
                {
                    ServiceState::Up
                }
                // A one-shot task that finished: up with nothing running.
                (None, ServiceState::Up) if ready == ReadyKind::Exit && adopted.exit.is_none() => {
                    ServiceState::Up
                }
                (None, ServiceState::Failed) => ServiceState::Failed,
                (None, _) => ServiceState::Stopped,
            };
            match slot.state {
                ServiceState::Starting => {
                    slot.deadline = Some(now + engine.params.services[s].startup_timeout)
                }
                ServiceState::Stopping => {
                    slot.deadline = Some(now + engine.params.services[s].shutdown_timeout)
                }
                _ => {}
            }
            let was_running = matches!(adopted.state, ServiceState::Starting | ServiceState::Up);
            if adopted.running.is_none() && was_running && slot.state != ServiceState::Up {
                died_unwatched.push(s);
            }
        }
        let mut actions = Vec::new();
        match phase {
            // The dead coordinator was stopping the stack: finish the stop.
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed => {
                engine.enter_stopping(Outcome::Stopped);
            }
            // Takeover "restart": everything goes down in shutdown order and comes back in
            // startup order. What is down already (the services of the API shut themselves
            // down when the coordinator died, as the original design has them do) is part of
            // that cycle, not a failure.
            _ if restart_all => {
                for slot in &mut engine.slots {
                    if slot.wanted {
                        slot.wanted = false;
                        slot.cycling = true;
                    }
                }
                engine.set_phase(InstanceState::Recovery);
            }
            _ => {
                for s in died_unwatched {
                    let exit = services[s].exit.unwrap_or(ProcessExit::Signaled {
                        signal: Signal::SIGKILL as i32,
                        core_dumped: false,
                    });
                    // While starting up, a death is a startup failure; afterwards a failure to
                    // recover from. on_failure decides by the phase.
                    engine.on_failure(s, FailureKind::Exited(exit));
                }
            }
        }
        engine.pump(&mut actions);
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
        let adopted: Vec<Adopted> = (0..params.services.len())
            .map(|s| {
                let running = running.get(s).copied().flatten();
                Adopted {
                    state: if running.is_some() {
                        ServiceState::Up
                    } else {
                        ServiceState::Stopped
                    },
                    running,
                    exit: None,
                    restarts: 0,
                    last_exit: None,
                }
            })
            .collect();
        Self::adopt(
            params,
            now,
            InstanceState::Stopping,
            &adopted,
            RestartWindow::default(),
            false,
        )
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

    /// The earliest time at which a [`Event::Tick`] has work to do, if any: the driver arms
    /// one timer for it, so an idle coordinator sleeps with no timer at all.
    pub fn next_deadline(&self) -> Option<Time> {
        let slot_deadlines = self.slots.iter().filter_map(|s| {
            let timeout = match s.state {
                ServiceState::Starting | ServiceState::Stopping if !s.killed => s.deadline,
                _ => None,
            };
            let delayed_start =
                (s.wanted && s.is_down() && s.not_before > self.now).then_some(s.not_before);
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
            Event::SpawnFailed { service, error } => {
                let slot = &mut self.slots[service];
                if slot.spawn_pending {
                    slot.spawn_pending = false;
                    self.on_failure(service, FailureKind::SpawnFailed(error));
                }
            }
            Event::Ready { service } => {
                let slot = &mut self.slots[service];
                let waits_for_ready = matches!(
                    self.params.services[service].ready,
                    ReadyKind::Notify | ReadyKind::Cc
                );
                if slot.state == ServiceState::Starting && waits_for_ready {
                    self.set_state(service, ServiceState::Up);
                }
            }
            Event::Exited { service, exit } => self.on_exited(service, exit),
            Event::Tick => self.on_tick(&mut actions),
            Event::Stop => self.begin_stopping(Outcome::Stopped),
        }
        self.pump(&mut actions);
        actions
    }

    fn set_state(&mut self, service: usize, state: ServiceState) {
        let slot = &mut self.slots[service];
        if slot.state != state {
            slot.state = state;
            slot.since = self.now;
        }
        if !matches!(state, ServiceState::Starting | ServiceState::Stopping) {
            slot.deadline = None;
        }
    }

    fn set_phase(&mut self, phase: InstanceState) {
        if self.phase != phase {
            self.phase = phase;
            self.phase_since = self.now;
        }
    }

    fn on_spawned(&mut self, service: usize, pid: i32) {
        let timeout = self.params.services[service].startup_timeout;
        let ready = self.params.services[service].ready;
        let now = self.now;
        let slot = &mut self.slots[service];
        if !slot.spawn_pending {
            return;
        }
        slot.spawn_pending = false;
        slot.pid = Some(pid);
        slot.started_at = Some(now);
        slot.killed = false;
        slot.start_timed_out = false;
        self.set_state(service, ServiceState::Starting);
        self.slots[service].deadline = Some(now + timeout);
        if ready == ReadyKind::Started {
            self.set_state(service, ServiceState::Up);
        }
    }

    fn on_exited(&mut self, service: usize, exit: ProcessExit) {
        let params = &self.params.services[service];
        let slot = &mut self.slots[service];
        if slot.pid.is_none() {
            return;
        }
        slot.pid = None;
        slot.last_exit = Some(exit);
        let timed_out = slot.start_timed_out;
        let going_down = !slot.wanted;
        match slot.state {
            ServiceState::Stopping => self.set_state(service, ServiceState::Stopped),
            // The stack is taking it down anyway (a stop, a failure sequence): a service that
            // ends first (an API service whose turn in the shutdown protocol came) stopped.
            ServiceState::Starting | ServiceState::Up if going_down => {
                self.set_state(service, ServiceState::Stopped);
            }
            // A one-shot task that finished: it is up, with nothing running.
            ServiceState::Starting if params.ready == ReadyKind::Exit && exit.success() => {
                self.set_state(service, ServiceState::Up);
            }
            ServiceState::Starting if timed_out => {
                let kind = FailureKind::StartTimeout(params.startup_timeout);
                self.on_failure(service, kind);
            }
            // A finished one-shot is never "running"; any other exit of a running service is
            // a failure unless its restart policy calls it a clean end.
            ServiceState::Starting | ServiceState::Up => {
                self.on_failure(service, FailureKind::Exited(exit));
            }
            ServiceState::Stopped | ServiceState::Failed => {}
        }
    }

    /// A service ended or could not start when it should be running.
    fn on_failure(&mut self, service: usize, kind: FailureKind) {
        let failed_state = match &kind {
            FailureKind::Exited(exit) if exit.success() => ServiceState::Stopped,
            _ => ServiceState::Failed,
        };
        self.set_state(service, failed_state);
        let failure = Failure { service, kind };
        match self.phase {
            InstanceState::Initializing => {
                self.begin_stopping(Outcome::StartupFailed(failure));
                return;
            }
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed => return,
            InstanceState::Steady | InstanceState::Recovery => {}
        }
        let policy = self.params.services[service].restart;
        let clean_exit = failed_state == ServiceState::Stopped;
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean_exit,
            RestartPolicy::Never => false,
        };
        if !restart {
            // It stays down, and so does everything that requires it.
            for s in self.requires_closure(service) {
                self.slots[s].wanted = false;
                self.slots[s].cycling = false;
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
            OnFailure::RestartAll => (0..self.slots.len())
                .filter(|&s| self.slots[s].wanted)
                .collect(),
        };
        for s in affected {
            let slot = &mut self.slots[s];
            if slot.wanted || slot.cycling {
                slot.wanted = false;
                slot.cycling = true;
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

    /// Stops everything, whatever the phase (a takeover finishing a dead coordinator's stop).
    fn enter_stopping(&mut self, why: Outcome) {
        self.stopping_for = Some(why);
        self.set_phase(InstanceState::Stopping);
        self.sequence_deadline = Some(self.now + self.params.shutdown_timeout);
        for slot in &mut self.slots {
            slot.wanted = false;
            slot.cycling = false;
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
                        .find(|&s| self.slots[s].state != ServiceState::Up)
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
                        let slot = &mut self.slots[s];
                        if slot.pid.is_some() && !slot.killed {
                            slot.killed = true;
                            if slot.state != ServiceState::Stopping {
                                self.set_state(s, ServiceState::Stopping);
                            }
                            actions.push(Action::Kill { service: s });
                        }
                    }
                }
                _ => {}
            }
        }
        for s in 0..self.slots.len() {
            let slot = &mut self.slots[s];
            let due = slot.deadline.is_some_and(|d| d <= now) && !slot.killed && slot.pid.is_some();
            if !due {
                continue;
            }
            slot.killed = true;
            if slot.state == ServiceState::Starting {
                slot.start_timed_out = true;
            }
            actions.push(Action::Kill { service: s });
        }
    }

    /// The two passes (stop, then start) and the phase changes they lead to.
    fn pump(&mut self, actions: &mut Vec<Action>) {
        self.open_or_close_the_gate(actions);
        // Stops, dependents first.
        let shutdown = self.params.shutdown_sequence.clone();
        for (pos, &s) in shutdown.iter().enumerate() {
            let slot = &self.slots[s];
            let running = matches!(slot.state, ServiceState::Starting | ServiceState::Up);
            if slot.wanted || !running || !self.may_stop(s, &shutdown[..pos]) {
                continue;
            }
            match slot.pid {
                // A finished one-shot has nothing to stop.
                None if !slot.spawn_pending => self.set_state(s, ServiceState::Stopped),
                None => {} // wait for the spawn's answer, then stop it
                Some(_) => {
                    let p = &self.params.services[s];
                    // A cooperative service stops itself when its turn in the protocol comes.
                    if !p.cooperative {
                        actions.push(Action::Signal {
                            service: s,
                            signal: p.stop_signal,
                        });
                    }
                    let deadline = self.now + p.shutdown_timeout;
                    self.set_state(s, ServiceState::Stopping);
                    self.slots[s].deadline = Some(deadline);
                }
            }
        }
        // A failure sequence restarts once everything it took down is down.
        let cycling_done = self.slots.iter().all(|s| !s.cycling || s.is_down());
        if cycling_done {
            for slot in &mut self.slots {
                if std::mem::take(&mut slot.cycling) {
                    slot.wanted = true;
                }
            }
        }
        // Starts, dependencies first.
        let startup = self.params.startup_sequence.clone();
        for (pos, &s) in startup.iter().enumerate() {
            let slot = &self.slots[s];
            if !slot.wanted
                || !slot.is_down()
                || slot.not_before > self.now
                || !self.may_start(s, &startup[..pos])
            {
                continue;
            }
            let slot = &mut self.slots[s];
            slot.spawn_pending = true;
            slot.deadline = None;
            if slot.state == ServiceState::Failed || slot.state == ServiceState::Stopped {
                self.set_state(s, ServiceState::Starting);
            }
            actions.push(Action::Spawn { service: s });
        }
        self.update_phase(actions);
    }

    /// `service` was to stop through the service API but never registered with it (it was
    /// started with `-cc` and did not call `alive`): stop it with its stop signal instead,
    /// now if its turn has come, else when it comes.
    pub fn not_cooperative(&mut self, service: usize) -> Vec<Action> {
        self.params.services[service].cooperative = false;
        let slot = &self.slots[service];
        if slot.state == ServiceState::Stopping && slot.pid.is_some() && !slot.killed {
            let signal = self.params.services[service].stop_signal;
            return vec![Action::Signal { service, signal }];
        }
        Vec::new()
    }

    /// Cooperative services stop themselves, in shutdown order, once asked through the
    /// service API: ask every one that is going down and has not been asked yet, all at once
    /// (the protocol orders them); close the gate when none is going down any more.
    fn open_or_close_the_gate(&mut self, actions: &mut Vec<Action>) {
        let mut ask = Vec::new();
        for (s, slot) in self.slots.iter_mut().enumerate() {
            let going_down = !slot.wanted && slot.is_alive();
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
        let going_down_and_alive = |d: usize| !self.slots[d].wanted && !self.slots[d].is_down();
        let dependents_down = !self.params.services[s]
            .dependents
            .iter()
            .any(|&(d, _)| going_down_and_alive(d));
        let sequence_ok = !self.params.explicit_shutdown
            || !before_in_sequence.iter().any(|&d| going_down_and_alive(d));
        dependents_down && sequence_ok
    }

    /// Everything `s` requires is up, and everything it comes after that the stack wants is up
    /// (and, with an explicit startup sequence, everything wanted before it).
    fn may_start(&self, s: usize, before_in_sequence: &[usize]) -> bool {
        let up = |d: usize| self.slots[d].state == ServiceState::Up;
        let deps_ok = self.params.services[s]
            .dependencies
            .iter()
            .all(|&(d, kind)| match kind {
                EdgeKind::Requires => up(d),
                EdgeKind::After => up(d) || (!self.slots[d].wanted && !self.slots[d].cycling),
            });
        let sequence_ok = !self.params.explicit_startup
            || before_in_sequence
                .iter()
                .all(|&d| up(d) || !self.slots[d].wanted);
        deps_ok && sequence_ok
    }

    fn update_phase(&mut self, actions: &mut Vec<Action>) {
        let all_wanted_up = self
            .slots
            .iter()
            .all(|s| !s.cycling && (!s.wanted || s.state == ServiceState::Up));
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
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;

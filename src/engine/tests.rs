//! The engine in virtual time: a simulator plays the driver and the services (each with a
//! scripted behaviour), advancing a virtual clock from event to event, and the tests read the
//! log of what the engine asked for and when.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How a simulated service behaves.
#[derive(Clone, Debug)]
struct Behaviour {
    /// Exits by itself this long after each start, with this status (None: runs until told).
    exits_after: Option<(Duration, ProcessExit)>,
    /// Sends READY=1 this long after start (for ready = notify); None: never.
    ready_after: Option<Duration>,
    /// Ignores its stop signal (only SIGKILL ends it).
    ignores_stop: bool,
    /// Spawning fails (exec error).
    spawn_fails: bool,
    /// Overrides for the later starts: (from the nth start on, exits_after).
    later_starts: Option<(u32, Option<(Duration, ProcessExit)>)>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            exits_after: None,
            ready_after: Some(ms(10)),
            ignores_stop: false,
            spawn_fails: false,
            later_starts: None,
        }
    }
}

struct Svc {
    id: &'static str,
    requires: Vec<&'static str>,
    wants: Vec<&'static str>,
    after: Vec<&'static str>,
    /// Services that start after this one (declared here, as in a drop-in).
    before: Vec<&'static str>,
    ready: ReadyKind,
    restart: RestartPolicy,
    behaviour: Behaviour,
}

fn svc(id: &'static str, requires: &[&'static str]) -> Svc {
    Svc {
        id,
        requires: requires.to_vec(),
        wants: Vec::new(),
        after: Vec::new(),
        before: Vec::new(),
        ready: ReadyKind::Started,
        restart: RestartPolicy::OnFailure,
        behaviour: Behaviour::default(),
    }
}

fn params(services: &[Svc]) -> EngineParams {
    let index = |id: &str| services.iter().position(|s| s.id == id).unwrap();
    let mut edges = Vec::new();
    for (i, s) in services.iter().enumerate() {
        edges.extend(s.requires.iter().map(|d| (i, index(d), EdgeKind::Requires)));
        edges.extend(s.wants.iter().map(|d| (i, index(d), EdgeKind::Wants)));
        edges.extend(s.after.iter().map(|d| (i, index(d), EdgeKind::After)));
        // `before` points from the service that waits to this one, as the config builds it.
        edges.extend(s.before.iter().map(|d| (index(d), i, EdgeKind::Before)));
    }
    let ids = services.iter().map(|s| s.id.to_owned()).collect();
    let graph = crate::graph::ServiceGraph::build(ids, &edges).expect("acyclic");
    EngineParams {
        services: services
            .iter()
            .enumerate()
            .map(|(i, s)| ServiceParams {
                id: s.id.to_owned(),
                ready: s.ready,
                restart: s.restart,
                startup_timeout: ms(1_000),
                shutdown_timeout: ms(500),
                stop_signal: Signal::SIGTERM,
                restart_delay: ms(100),
                restart_delay_max: ms(1_000),
                min_uptime: Duration::ZERO,
                dependencies: graph.dependencies(i),
                dependents: graph.dependents(i),
                cooperative: s.ready == ReadyKind::Cc,
            })
            .collect(),
        startup_sequence: graph.startup_sequence().to_vec(),
        shutdown_sequence: graph.shutdown_sequence(),
        explicit_startup: false,
        explicit_shutdown: false,
        on_failure: OnFailure::RestartDependents,
        restart_retry_counter: 5,
        restart_time_span: ms(60_000),
        startup_timeout: ms(250_000),
        shutdown_timeout: ms(250_000),
    }
}

/// The driver and the services, in virtual time.
struct Sim {
    engine: Engine,
    ids: Vec<String>,
    behaviours: Vec<Behaviour>,
    starts: Vec<u32>,
    now: Time,
    next_pid: i32,
    /// Future events, by time (ties in insertion order).
    pending: BTreeMap<(Time, u64), Event>,
    seq: u64,
    /// What happened: "t=120 spawn web", "t=130 stop db", ...
    log: Vec<String>,
    pids: Vec<Option<i32>>,
    finished: Option<Outcome>,
    startup_complete_at: Option<Time>,
}

impl Sim {
    fn new(services: Vec<Svc>) -> Self {
        Self::with(services, |_| {})
    }

    fn with(services: Vec<Svc>, tweak: impl FnOnce(&mut EngineParams)) -> Self {
        let mut p = params(&services);
        tweak(&mut p);
        let n = services.len();
        let (engine, actions) = Engine::new(p, Time::ZERO);
        let mut sim = Self {
            engine,
            ids: services.iter().map(|s| s.id.to_owned()).collect(),
            behaviours: services.into_iter().map(|s| s.behaviour).collect(),
            starts: vec![0; n],
            now: Time::ZERO,
            next_pid: 100,
            pending: BTreeMap::new(),
            seq: 0,
            log: Vec::new(),
            pids: vec![None; n],
            finished: None,
            startup_complete_at: None,
        };
        sim.perform(actions);
        sim
    }

    fn idx(&self, id: &str) -> usize {
        self.ids.iter().position(|i| i == id).unwrap()
    }

    fn at(&mut self, delay: Duration, event: Event) {
        self.seq += 1;
        self.pending.insert((self.now + delay, self.seq), event);
    }

    fn note(&mut self, what: &str, s: usize) {
        let line = format!("t={} {what} {}", self.now.as_millis(), self.ids[s]);
        self.log.push(line);
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Spawn { service } => {
                    self.note("spawn", service);
                    self.starts[service] += 1;
                    let b = self.behaviours[service].clone();
                    if b.spawn_fails {
                        self.at(
                            Duration::ZERO,
                            Event::SpawnFailed {
                                service,
                                error: "exec: ENOENT".into(),
                            },
                        );
                        continue;
                    }
                    self.next_pid += 1;
                    let pid = self.next_pid;
                    self.pids[service] = Some(pid);
                    self.at(Duration::ZERO, Event::Spawned { service, pid });
                    let exits = match b.later_starts {
                        Some((from, later)) if self.starts[service] >= from => later,
                        _ => b.exits_after,
                    };
                    if let Some((after, exit)) = exits {
                        self.at(after, Event::Exited { service, exit });
                    }
                    if let Some(after) = b.ready_after {
                        self.at(after, Event::Ready { service });
                    }
                }
                Action::Signal { service, .. } => {
                    self.note("stop", service);
                    if !self.behaviours[service].ignores_stop {
                        self.at(
                            ms(1),
                            Event::Exited {
                                service,
                                exit: ProcessExit::Signaled {
                                    signal: 15,
                                    core_dumped: false,
                                },
                            },
                        );
                    }
                }
                Action::Kill { service } => {
                    self.note("kill", service);
                    self.at(
                        ms(1),
                        Event::Exited {
                            service,
                            exit: ProcessExit::Signaled {
                                signal: 9,
                                core_dumped: false,
                            },
                        },
                    );
                }
                Action::ShutdownRequested { services } => {
                    let ids: Vec<&str> = services.iter().map(|&s| self.ids[s].as_str()).collect();
                    self.log
                        .push(format!("t={} ask {}", self.now.as_millis(), ids.join(",")));
                    // A cooperative service that obeys stops itself: simulated here in order
                    // of the list, 1 ms apart, unless it "ignores" its stop.
                    for (k, &service) in services.iter().enumerate() {
                        if !self.behaviours[service].ignores_stop {
                            self.at(
                                ms(1 + k as u64),
                                Event::Exited {
                                    service,
                                    exit: ProcessExit::Exited(0),
                                },
                            );
                        }
                    }
                }
                Action::ShutdownOver => self
                    .log
                    .push(format!("t={} gate closed", self.now.as_millis())),
                Action::StartupComplete => self.startup_complete_at = Some(self.now),
                Action::Finished(outcome) => self.finished = Some(outcome),
            }
        }
    }

    /// Delivers an event now, as the driver would.
    fn send(&mut self, event: Event) {
        // Events about a process that no longer exists are dropped, like a real driver that
        // only reports exits of processes it watches.
        if let Event::Exited { service, .. } | Event::Ready { service } = event {
            if self.pids[service].is_none() {
                return;
            }
            if matches!(event, Event::Exited { .. }) {
                self.pids[service] = None;
            }
        }
        let actions = self.engine.handle(event, self.now);
        self.perform(actions);
    }

    /// Crashes a running service now (kill -9 from outside).
    fn crash(&mut self, id: &str) {
        let s = self.idx(id);
        // Pending self-exits of the old process must not hit the new one.
        self.pending.retain(|_, e| !matches!(e, Event::Exited { service, .. } | Event::Ready { service } if *service == s));
        self.send(Event::Exited {
            service: s,
            exit: ProcessExit::Signaled {
                signal: 9,
                core_dumped: false,
            },
        });
    }

    /// Runs until `until`, delivering due events and timer ticks in time order, and leaves
    /// the clock at `until`.
    fn run_until(&mut self, until: Time) {
        self.drain(until);
        self.now = self.now.max(until);
    }

    /// Delivers everything due up to `until`; the clock stops at the last event.
    fn drain(&mut self, until: Time) {
        loop {
            let next_event = self.pending.keys().next().map(|k| k.0);
            let next_tick = self.engine.next_deadline();
            let next = match (next_event, next_tick) {
                (Some(e), Some(t)) => e.min(t),
                (e, t) => match e.or(t) {
                    Some(x) => x,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            if next_event == Some(next) {
                let key = *self.pending.keys().next().unwrap();
                let event = self.pending.remove(&key).unwrap();
                if let Event::Exited { service, .. } = event {
                    // A process that was killed and restarted: the stale exit is not its own.
                    if self.pids[service].is_none() {
                        continue;
                    }
                }
                self.send(event);
            } else {
                self.send(Event::Tick);
            }
        }
    }

    /// Runs until nothing is left to happen (or an hour of virtual time passed).
    fn run(&mut self) {
        self.drain(self.now + ms(3_600_000));
    }

    fn log_since(&self, from: usize) -> Vec<&str> {
        self.log[from..].iter().map(String::as_str).collect()
    }

    fn state(&self, id: &str) -> ServiceState {
        self.engine.slots()[self.idx(id)].state()
    }
}

fn stack() -> Vec<Svc> {
    // db <- api <- web, cache (alone), log <- db (after)
    let mut db = svc("db", &[]);
    db.after = vec!["log"];
    vec![
        svc("log", &[]),
        db,
        svc("cache", &[]),
        svc("api", &["db"]),
        svc("web", &["api"]),
    ]
}

#[test]
fn levels_start_in_parallel_and_in_order() {
    let mut sim = Sim::new(stack());
    sim.run();
    assert_eq!(
        sim.log,
        [
            "t=0 spawn cache",
            "t=0 spawn log",
            "t=0 spawn db",
            "t=0 spawn api",
            "t=0 spawn web"
        ]
    );
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert_eq!(sim.startup_complete_at, Some(Time::ZERO));
}

#[test]
fn notify_services_gate_their_dependents_until_ready() {
    let mut services = stack();
    for s in &mut services {
        s.ready = ReadyKind::Notify;
    }
    services[1].behaviour.ready_after = Some(ms(300)); // db is slow to be ready
    let mut sim = Sim::new(services);
    sim.run();
    assert_eq!(
        sim.log,
        [
            "t=0 spawn cache",
            "t=0 spawn log",
            "t=10 spawn db",
            "t=310 spawn api",
            "t=320 spawn web"
        ]
    );
    assert_eq!(sim.startup_complete_at, Some(ms(330)));
}

#[test]
fn explicit_startup_sequence_starts_one_at_a_time() {
    let mut services = stack();
    for s in &mut services {
        s.ready = ReadyKind::Notify;
    }
    let mut sim = Sim::with(services, |p| {
        p.explicit_startup = true;
        p.startup_sequence = vec![2, 0, 1, 3, 4]; // cache, log, db, api, web
    });
    sim.run();
    assert_eq!(
        sim.log,
        [
            "t=0 spawn cache",
            "t=10 spawn log",
            "t=20 spawn db",
            "t=30 spawn api",
            "t=40 spawn web"
        ]
    );
}

#[test]
fn stop_goes_in_shutdown_order_and_finishes() {
    let mut sim = Sim::new(stack());
    sim.run(); // the last (ignored) READY=1 arrives at t=10
    let mark = sim.log.len();
    sim.send(Event::Stop);
    sim.run();
    // web first; api after web is down; db after api; log after db; cache is free at once.
    assert_eq!(
        sim.log_since(mark),
        [
            "t=10 stop web",
            "t=10 stop cache",
            "t=11 stop api",
            "t=12 stop db",
            "t=13 stop log"
        ]
    );
    assert_eq!(sim.finished, Some(Outcome::Stopped));
    assert_eq!(sim.engine.phase(), InstanceState::Stopped);
}

#[test]
fn restart_dependents_touches_only_what_requires_the_failed_service() {
    let mut sim = Sim::new(stack());
    sim.run_until(ms(5_000));
    let pids_before: Vec<_> = sim.pids.clone();
    let mark = sim.log.len();
    sim.crash("db");
    sim.run_until(ms(10_000));
    // db died: stop web, then api (reverse order), then start db, api, web again. db ran for
    // 5 s, longer than its restart delay, so it restarts at once.
    assert_eq!(
        sim.log_since(mark),
        [
            "t=5000 stop web",
            "t=5001 stop api",
            "t=5002 spawn db",
            "t=5002 spawn api",
            "t=5002 spawn web"
        ]
    );
    for id in ["log", "cache"] {
        let i = sim.idx(id);
        assert_eq!(sim.pids[i], pids_before[i], "{id} kept its process");
    }
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert_eq!(sim.engine.slots()[sim.idx("db")].restarts, 1);
    assert_eq!(
        sim.engine.slots()[sim.idx("db")].last_exit,
        Some(ProcessExit::Signaled {
            signal: 9,
            core_dumped: false
        })
    );
}

#[test]
fn restart_all_stops_everything_in_order_then_starts_everything() {
    let mut sim = Sim::with(stack(), |p| p.on_failure = OnFailure::RestartAll);
    sim.run_until(ms(5_000));
    let mark = sim.log.len();
    sim.crash("api");
    sim.run_until(ms(10_000));
    assert_eq!(
        sim.log_since(mark),
        // api is already dead, so db does not wait for web (nothing running needs db).
        [
            "t=5000 stop web",
            "t=5000 stop db",
            "t=5000 stop cache",
            "t=5001 stop log",
            "t=5002 spawn cache",
            "t=5002 spawn log",
            "t=5002 spawn db",
            "t=5002 spawn api",
            "t=5002 spawn web"
        ]
    );
}

#[test]
fn crash_loop_waits_doubling_delays_then_gives_up() {
    let mut services = vec![svc("base", &[]), svc("flaky", &["base"])];
    services[1].behaviour.exits_after = Some((ms(10), ProcessExit::Exited(1)));
    services[1].behaviour.later_starts = None;
    // The first start must succeed for startup to finish; it crashes from the second on.
    services[1].behaviour.exits_after = None;
    services[1].behaviour.later_starts = Some((2, Some((ms(10), ProcessExit::Exited(1)))));
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    sim.crash("flaky");
    sim.run();
    let spawns: Vec<u128> = sim
        .log
        .iter()
        .filter(|l| l.ends_with("spawn flaky"))
        .map(|l| l[2..l.find(' ').unwrap()].parse().unwrap())
        .collect();
    // Start 1 at 0; crash at 1000 (restart 1: it ran longer than its delay, so at once); then
    // it crashes 10 ms after each start, and restarts 2 to 5 come 200, 400, 800 and 1000 ms
    // (the cap) after the start before: the delay doubles with each restart in the span. The
    // sixth restart in the window is one too many.
    assert_eq!(spawns, [0, 1000, 1200, 1600, 2400, 3400]);
    match sim.finished.clone() {
        Some(Outcome::GaveUp { failure, restarts }) => {
            assert_eq!(restarts, 5);
            assert_eq!(failure.service, 1);
            assert_eq!(failure.kind, FailureKind::Exited(ProcessExit::Exited(1)));
        }
        other => panic!("expected to give up, got {other:?}"),
    }
    assert_eq!(sim.engine.phase(), InstanceState::Failed);
    assert!(sim.pids.iter().all(Option::is_none), "nothing left running");
    assert!(sim.log.last().unwrap().ends_with("stop base"));
}

#[test]
fn the_delay_is_capped_by_restart_delay_max() {
    let mut services = vec![svc("flaky", &[])];
    services[0].behaviour.later_starts = Some((2, Some((ms(0), ProcessExit::Exited(1)))));
    let mut sim = Sim::with(services, |p| p.restart_retry_counter = 100);
    sim.run_until(ms(1_000));
    sim.crash("flaky");
    sim.run_until(ms(20_000));
    let spawns: Vec<u128> = sim
        .log
        .iter()
        .filter(|l| l.ends_with("spawn flaky"))
        .map(|l| l[2..l.find(' ').unwrap()].parse().unwrap())
        .collect();
    let gaps: Vec<u128> = spawns
        .windows(2)
        .map(|w| w[1] - w[0])
        .skip(1)
        .take(7)
        .collect();
    // Restart 1 (at 1000) was at once; restarts 2, 3, ... wait 200, 400, 800, then the cap.
    assert_eq!(gaps, [200, 400, 800, 1000, 1000, 1000, 1000]);
}

#[test]
fn a_quiet_span_resets_the_restart_count() {
    let services = vec![svc("a", &[])];
    let mut sim = Sim::with(services, |p| {
        p.restart_retry_counter = 2;
        p.restart_time_span = ms(10_000);
    });
    for round in 0..5u64 {
        // Two crashes close together, then a quiet span longer than the window.
        sim.run_until(ms(1_000 + round * 30_000));
        sim.crash("a");
        sim.run_until(ms(2_000 + round * 30_000));
        sim.crash("a");
    }
    sim.run_until(ms(200_000));
    assert_eq!(sim.finished, None, "never more than 2 restarts within 10 s");
    assert_eq!(sim.engine.slots()[0].restarts, 10);
    // A third crash inside one window gives up.
    sim.crash("a");
    sim.run_until(ms(200_500));
    sim.crash("a");
    sim.run_until(ms(201_000));
    sim.crash("a");
    sim.run();
    assert!(
        matches!(sim.finished, Some(Outcome::GaveUp { restarts: 2, .. })),
        "{:?}",
        sim.finished
    );
}

#[test]
fn restart_never_stays_down_and_stops_what_requires_it() {
    let mut services = stack();
    services[1].restart = RestartPolicy::Never; // db
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    let mark = sim.log.len();
    sim.crash("db");
    sim.run_until(ms(5_000));
    assert_eq!(sim.log_since(mark), ["t=1000 stop web", "t=1001 stop api"]);
    assert_eq!(sim.state("db"), ServiceState::Failed);
    assert_eq!(sim.state("api"), ServiceState::Stopped);
    assert_eq!(sim.state("log"), ServiceState::Up);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert_eq!(sim.engine.next_deadline(), None, "nothing pending");
}

#[test]
fn a_clean_exit_with_on_failure_stays_down() {
    let mut services = vec![svc("a", &[]), svc("b", &["a"])];
    services[0].behaviour.exits_after = Some((ms(500), ProcessExit::Exited(0)));
    let mut sim = Sim::new(services);
    sim.run();
    assert_eq!(sim.state("a"), ServiceState::Stopped);
    assert_eq!(sim.state("b"), ServiceState::Stopped);
    assert_eq!(sim.engine.slots()[0].restarts, 0);
}

#[test]
fn restart_always_restarts_a_clean_exit() {
    let mut services = vec![svc("a", &[])];
    services[0].restart = RestartPolicy::Always;
    services[0].behaviour.later_starts = Some((1, None));
    services[0].behaviour.exits_after = None;
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    sim.send(Event::Exited {
        service: 0,
        exit: ProcessExit::Exited(0),
    });
    sim.run_until(ms(2_000));
    assert_eq!(sim.log, ["t=0 spawn a", "t=1000 spawn a"]);
}

#[test]
fn never_ready_is_killed_at_its_startup_timeout_and_startup_fails() {
    let mut services = stack();
    services[3].ready = ReadyKind::Notify; // api never says READY=1
    services[3].behaviour.ready_after = None;
    let mut sim = Sim::new(services);
    sim.run();
    assert!(
        sim.log.contains(&"t=1000 kill api".to_owned()),
        "{:?}",
        sim.log
    );
    match sim.finished.clone() {
        Some(Outcome::StartupFailed(f)) => {
            assert_eq!(f.service, 3);
            assert_eq!(f.kind, FailureKind::StartTimeout(ms(1_000)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.startup_complete_at, None);
    assert!(!sim.log.iter().any(|l| l.ends_with("spawn web")));
    // Everything started was stopped again, dependents first.
    let stops: Vec<_> = sim
        .log
        .iter()
        .filter(|l| l.contains(" stop "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    // api is dead and web never started, so db and cache go at once, log after db.
    assert_eq!(stops, ["db", "cache", "log"]);
    assert!(sim.pids.iter().all(Option::is_none));
}

#[test]
fn a_service_ignoring_its_stop_signal_is_killed_after_shutdown_timeout() {
    let mut services = stack();
    services[4].behaviour.ignores_stop = true; // web
    let mut sim = Sim::new(services);
    sim.run_until(ms(100));
    let mark = sim.log.len();
    sim.send(Event::Stop);
    sim.run();
    let log = sim.log_since(mark);
    assert_eq!(
        &log[..3],
        ["t=100 stop web", "t=100 stop cache", "t=600 kill web"]
    );
    assert_eq!(log[3], "t=601 stop api", "api waits for web to be gone");
    assert_eq!(sim.finished, Some(Outcome::Stopped));
}

#[test]
fn the_whole_shutdown_is_bounded_by_the_coordinator_timeout() {
    let mut services = stack();
    for s in &mut services {
        s.behaviour.ignores_stop = true;
    }
    let mut sim = Sim::with(services, |p| {
        p.shutdown_timeout = ms(700);
        for s in &mut p.services {
            s.shutdown_timeout = ms(10_000);
        }
    });
    sim.run_until(ms(100));
    sim.send(Event::Stop);
    sim.run();
    // Nobody answers SIGTERM; at 100 + 700 the coordinator kills everything left.
    let kills: Vec<_> = sim
        .log
        .iter()
        .filter(|l| l.contains(" kill "))
        .cloned()
        .collect();
    assert_eq!(kills.len(), 5, "{:?}", sim.log);
    assert!(kills.iter().all(|k| k.starts_with("t=800 ")), "{kills:?}");
    assert_eq!(sim.finished, Some(Outcome::Stopped));
}

#[test]
fn one_shot_tasks_gate_dependents_until_they_exit_zero() {
    let mut services = vec![svc("migrate", &[]), svc("app", &["migrate"])];
    services[0].ready = ReadyKind::Exit;
    services[0].behaviour.exits_after = Some((ms(250), ProcessExit::Exited(0)));
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    assert_eq!(sim.log, ["t=0 spawn migrate", "t=250 spawn app"]);
    assert_eq!(sim.state("migrate"), ServiceState::Up);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    // Stopping a finished task has nothing to signal.
    let mark = sim.log.len();
    sim.send(Event::Stop);
    sim.run();
    assert_eq!(sim.log_since(mark), ["t=1000 stop app"]);
    assert_eq!(sim.finished, Some(Outcome::Stopped));
}

#[test]
fn a_failing_one_shot_fails_the_startup() {
    let mut services = vec![svc("migrate", &[]), svc("app", &["migrate"])];
    services[0].ready = ReadyKind::Exit;
    services[0].behaviour.exits_after = Some((ms(50), ProcessExit::Exited(3)));
    let mut sim = Sim::new(services);
    sim.run();
    assert_eq!(sim.log, ["t=0 spawn migrate"]);
    assert!(matches!(
        sim.finished,
        Some(Outcome::StartupFailed(Failure {
            service: 0,
            kind: FailureKind::Exited(ProcessExit::Exited(3))
        }))
    ));
}

#[test]
fn a_spawn_failure_during_startup_stops_what_was_started() {
    let mut services = stack();
    services[3].behaviour.spawn_fails = true; // api
    let mut sim = Sim::new(services);
    sim.run();
    match sim.finished.clone() {
        Some(Outcome::StartupFailed(f)) => {
            assert_eq!(f.service, 3);
            assert!(matches!(f.kind, FailureKind::SpawnFailed(_)));
        }
        other => panic!("{other:?}"),
    }
    assert!(sim.pids.iter().all(Option::is_none));
}

#[test]
fn the_startup_sequence_times_out_as_a_whole() {
    let mut services = stack();
    for s in &mut services {
        s.ready = ReadyKind::Notify;
        s.behaviour.ready_after = Some(ms(400));
    }
    let mut sim = Sim::with(services, |p| p.startup_timeout = ms(1_000));
    sim.run();
    match sim.finished.clone() {
        Some(Outcome::StartupFailed(f)) => {
            assert_eq!(
                sim.ids[f.service], "api",
                "the first service not up at t=1000"
            );
            assert_eq!(f.kind, FailureKind::SequenceTimeout(ms(1_000)));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stop_during_startup_stops_even_services_whose_spawn_is_in_flight() {
    let mut sim = Sim::new(stack());
    // Deliver nothing yet: every level-0 spawn is in flight. Stop now.
    let actions = sim.engine.handle(Event::Stop, Time::ZERO);
    sim.perform(actions);
    sim.run();
    assert_eq!(sim.finished, Some(Outcome::Stopped));
    assert!(sim.pids.iter().all(Option::is_none), "{:?}", sim.log);
}

#[test]
fn an_idle_stack_has_no_deadline() {
    let mut sim = Sim::new(stack());
    sim.run();
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert_eq!(sim.engine.next_deadline(), None);
}

#[test]
fn failures_are_described_in_words() {
    assert_eq!(ProcessExit::Exited(1).to_string(), "exited with status 1");
    assert_eq!(
        ProcessExit::Signaled {
            signal: 9,
            core_dumped: false
        }
        .to_string(),
        "killed by SIGKILL"
    );
    assert_eq!(
        FailureKind::StartTimeout(ms(1500)).to_string(),
        "was not ready within its startup timeout (1.5s) and was killed"
    );
}

/// What a dead coordinator published for a service in `state`, with process `pid` (for
/// the states that have one).
fn published(state: ServiceState, pid: i32, now: Time) -> Slot {
    let process = match state {
        ServiceState::Stopped => Process::None(Rest::Stopped),
        ServiceState::Failed => Process::None(Rest::Failed),
        ServiceState::Starting => Process::Running {
            pid,
            since: now,
            readiness: Readiness::Waiting {
                deadline: now + ms(1_000),
            },
        },
        ServiceState::Up => Process::Running {
            pid,
            since: now,
            readiness: Readiness::Up,
        },
        ServiceState::Stopping => Process::Stopping {
            pid,
            kill_deadline: now + ms(500),
            killed: false,
            start_timed_out: false,
        },
    };
    Slot {
        process,
        want: Want::Up,
        since: now,
        started_at: Some(now),
        asked: false,
        not_before: Time::ZERO,
        streak: 0,
        last_failure_at: None,
        restarts: 0,
        last_exit: None,
        exited_pid: None,
    }
}

/// A snapshot of a stack in `phase` whose services are in `states`.
fn snapshot_of(phase: InstanceState, slots: Vec<Slot>, window: RestartWindow) -> Snapshot {
    Snapshot {
        phase,
        phase_since: Time::ZERO,
        window,
        stopping_for: None,
        sequence_deadline: None,
        slots,
    }
}

/// A simulator whose engine takes over from a dead coordinator: `adopted` says, per service,
/// (published state, still running?, exit while unwatched). Each published process is pid
/// 500 + its index; the keeper reports those still running, and the kept exits.
fn sim_adopting(
    services: Vec<Svc>,
    phase: InstanceState,
    adopted: &[(ServiceState, bool, Option<ProcessExit>)],
    restart_all: bool,
) -> Sim {
    let mut facts = KeeperFacts::default();
    let mut slots = Vec::new();
    for (i, &(state, running, exit)) in adopted.iter().enumerate() {
        let pid = 500 + i as i32;
        slots.push(published(state, pid, Time::ZERO));
        if running {
            facts.running.push((i, pid));
        }
        if let Some(exit) = exit {
            facts.news.push(KeeperNews::Exited {
                service: i,
                pid,
                exit,
            });
        }
    }
    let snapshot = snapshot_of(phase, slots, RestartWindow::default());
    sim_taking_over(services, snapshot, facts, restart_all)
}

/// A simulator whose engine adopts `snapshot` with the keeper's `facts`, at time zero.
fn sim_taking_over(
    services: Vec<Svc>,
    snapshot: Snapshot,
    facts: KeeperFacts,
    restart_all: bool,
) -> Sim {
    let p = params(&services);
    let n = services.len();
    let mut pids = vec![None; n];
    for &(s, pid) in &facts.running {
        pids[s] = Some(pid);
    }
    let (engine, actions) = Engine::adopt(p, Time::ZERO, snapshot, &facts, restart_all);
    let mut sim = Sim {
        engine,
        ids: services.iter().map(|s| s.id.to_owned()).collect(),
        behaviours: services.into_iter().map(|s| s.behaviour).collect(),
        starts: vec![0; n],
        now: Time::ZERO,
        next_pid: 1000,
        pending: BTreeMap::new(),
        seq: 0,
        log: Vec::new(),
        pids,
        finished: None,
        startup_complete_at: None,
    };
    sim.perform(actions);
    sim
}

const UP: (ServiceState, bool, Option<ProcessExit>) = (ServiceState::Up, true, None);

#[test]
fn adopting_a_steady_stack_changes_nothing() {
    let mut sim = sim_adopting(stack(), InstanceState::Steady, &[UP; 5], false);
    sim.run();
    assert!(sim.log.is_empty(), "{:?}", sim.log);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert!(
        sim.engine
            .slots()
            .iter()
            .all(|s| s.state() == ServiceState::Up && s.pid().is_some())
    );
    assert_eq!(sim.engine.next_deadline(), None);
}

#[test]
fn a_service_that_died_while_nobody_watched_goes_through_the_failure_sequence() {
    // db (index 1) died during the gap; api and web require it.
    let died = (ServiceState::Up, false, Some(ProcessExit::Exited(1)));
    let mut sim = sim_adopting(
        stack(),
        InstanceState::Steady,
        &[UP, died, UP, UP, UP],
        false,
    );
    sim.run();
    assert_eq!(
        sim.log,
        // How long db ran before it died is unknown, so its restart waits restart_delay.
        [
            "t=0 stop web",
            "t=1 stop api",
            "t=100 spawn db",
            "t=100 spawn api",
            "t=100 spawn web"
        ]
    );
    assert_eq!(sim.engine.slots()[1].restarts, 1);
    assert_eq!(
        sim.engine.slots()[1].last_exit,
        Some(ProcessExit::Exited(1))
    );
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

#[test]
fn a_startup_cut_short_by_the_coordinators_death_is_finished() {
    // log and cache were up, db's spawn was asked for (the keeper started it, pid 501, but the
    // dead coordinator never heard), api and web not started.
    let mut slots: Vec<Slot> = [UP, UP, UP, UP, UP]
        .iter()
        .enumerate()
        .map(|(i, _)| published(ServiceState::Up, 500 + i as i32, Time::ZERO))
        .collect();
    slots[1].process = Process::Spawning;
    slots[3].process = Process::None(Rest::Stopped);
    slots[4].process = Process::None(Rest::Stopped);
    let facts = KeeperFacts {
        running: vec![(0, 500), (1, 501), (2, 502)],
        ..KeeperFacts::default()
    };
    let snapshot = snapshot_of(InstanceState::Initializing, slots, RestartWindow::default());
    let mut sim = sim_taking_over(stack(), snapshot, facts, false);
    sim.run();
    // db's process runs and "started" asks nothing more, so it is up, and api and web follow.
    assert_eq!(sim.log, ["t=0 spawn api", "t=0 spawn web"]);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert!(
        sim.startup_complete_at.is_some(),
        "the start is reported complete"
    );
}

#[test]
fn a_failure_sequence_cut_short_is_finished() {
    // The dead coordinator had stopped api and web to restart them after db crashed, and had
    // already started db again.
    let down = (ServiceState::Stopped, false, None);
    let mut sim = sim_adopting(
        stack(),
        InstanceState::Recovery,
        &[UP, UP, UP, down, down],
        false,
    );
    sim.run();
    assert_eq!(sim.log, ["t=0 spawn api", "t=0 spawn web"]);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

/// base <- mid <- top, top ignoring its stop signal: the reproduction of issue 8's first
/// defect, in virtual time.
fn base_mid_top() -> Vec<Svc> {
    let mut top = svc("top", &["mid"]);
    top.behaviour.ignores_stop = true;
    vec![svc("base", &[]), svc("mid", &["base"]), top]
}

/// The coordinator dies at `death` in the middle of the failure sequence that base's crash at
/// 1 s set off; its successor adopts what it published, with the keeper's `news`.
fn successor_mid_failure(death: Time, news: Vec<KeeperNews>) -> Sim {
    let mut sim = Sim::new(base_mid_top());
    sim.run_until(ms(1_000));
    sim.crash("base");
    sim.run_until(death);
    let snapshot = sim.engine.snapshot();
    let facts = KeeperFacts {
        news,
        running: (0..3)
            .filter_map(|s| sim.pids[s].map(|pid| (s, pid)))
            .collect(),
    };
    let (successor, actions) =
        Engine::adopt(sim.engine.params().clone(), death, snapshot, &facts, false);
    sim.engine = successor;
    let from = sim.log.len();
    sim.perform(actions);
    sim.log.drain(..from);
    sim
}

#[test]
fn a_takeover_mid_failure_sequence_finishes_the_same_sequence_with_the_same_deadlines() {
    // top was told to stop at 1 s (SIGKILL due at 1.5 s) and ignores it; mid waits for it.
    let mut sim = successor_mid_failure(ms(1_100), Vec::new());
    sim.run();
    assert_eq!(
        sim.log,
        [
            // The original deadline, not 1.1 s + 500 ms.
            "t=1500 kill top",
            "t=1501 stop mid",
            "t=1502 spawn base",
            "t=1502 spawn mid",
            "t=1502 spawn top"
        ]
    );
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert_eq!(sim.engine.slots()[0].restarts, 1);
}

#[test]
fn an_exit_the_dead_coordinator_already_handled_is_not_handled_twice() {
    // The keeper hands base's exit over again (not acknowledged): the snapshot records that
    // pid's end already, so it changes nothing.
    let mut sim = Sim::new(base_mid_top());
    sim.run_until(ms(1_000));
    let base_pid = sim.pids[0].unwrap();
    let killed = ProcessExit::Signaled {
        signal: 9,
        core_dumped: false,
    };
    let duplicate = KeeperNews::Exited {
        service: 0,
        pid: base_pid,
        exit: killed,
    };
    let mut sim_dup = successor_mid_failure(ms(1_100), vec![duplicate]);
    let mut sim_plain = successor_mid_failure(ms(1_100), Vec::new());
    assert_eq!(sim_dup.engine.snapshot(), sim_plain.engine.snapshot());
    sim_dup.run();
    sim_plain.run();
    assert_eq!(sim_dup.log, sim_plain.log);
    assert_eq!(
        sim_dup.engine.slots()[0].restarts,
        1,
        "one crash, one restart"
    );
}

#[test]
fn an_exit_nobody_heard_is_handled_with_its_status() {
    // mid (published up, pid shown) exited with status 7 while nobody listened.
    let mut sim = Sim::new(base_mid_top());
    sim.run_until(ms(1_000));
    let snapshot = sim.engine.snapshot();
    let mid = sim.pids[1].unwrap();
    let facts = KeeperFacts {
        news: vec![KeeperNews::Exited {
            service: 1,
            pid: mid,
            exit: ProcessExit::Exited(7),
        }],
        running: vec![(0, sim.pids[0].unwrap()), (2, sim.pids[2].unwrap())],
    };
    let (engine, _) = Engine::adopt(
        sim.engine.params().clone(),
        ms(1_000),
        snapshot,
        &facts,
        false,
    );
    let slot = &engine.slots()[1];
    assert_eq!(slot.last_exit, Some(ProcessExit::Exited(7)));
    assert_eq!(slot.restarts, 1);
    assert_eq!(engine.phase(), InstanceState::Recovery);
    assert_eq!(
        engine.slots()[2].want,
        Want::Cycling,
        "top goes down with mid"
    );
}

#[test]
fn a_stop_cut_short_is_finished_in_order() {
    let stopped = (ServiceState::Stopped, false, None);
    let mut sim = sim_adopting(
        stack(),
        InstanceState::Stopping,
        &[UP, UP, UP, stopped, stopped],
        false,
    );
    sim.run();
    assert_eq!(sim.log, ["t=0 stop db", "t=0 stop cache", "t=1 stop log"]);
    assert_eq!(sim.finished, Some(Outcome::Stopped));
}

#[test]
fn takeover_restart_stops_everything_in_order_then_starts_it_again() {
    let mut sim = sim_adopting(stack(), InstanceState::Steady, &[UP; 5], true);
    sim.run();
    assert_eq!(
        sim.log,
        [
            "t=0 stop web",
            "t=0 stop cache",
            "t=1 stop api",
            "t=2 stop db",
            "t=3 stop log",
            "t=4 spawn cache",
            "t=4 spawn log",
            "t=4 spawn db",
            "t=4 spawn api",
            "t=4 spawn web"
        ]
    );
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert_eq!(
        sim.engine.slots()[0].restarts,
        0,
        "a takeover restart is not a failure"
    );
}

#[test]
fn a_one_shot_that_finished_while_nobody_watched_is_done() {
    let mut services = vec![svc("migrate", &[]), svc("app", &["migrate"])];
    services[0].ready = ReadyKind::Exit;
    let finished = (ServiceState::Starting, false, Some(ProcessExit::Exited(0)));
    let down = (ServiceState::Stopped, false, None);
    let mut sim = sim_adopting(
        services,
        InstanceState::Initializing,
        &[finished, down],
        false,
    );
    sim.run();
    assert_eq!(sim.log, ["t=0 spawn app"]);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

#[test]
fn cooperative_services_are_asked_not_signalled_and_killed_only_if_they_stay() {
    let mut services = vec![svc("db", &[]), svc("api", &["db"]), svc("web", &["api"])];
    for s in &mut services[..2] {
        s.ready = ReadyKind::Cc; // db and api use the service API
    }
    services[1].behaviour.ignores_stop = true; // api never acts on the request
    let mut sim = Sim::new(services);
    sim.run_until(ms(100));
    let mark = sim.log.len();
    sim.send(Event::Stop);
    sim.run();
    let log = sim.log_since(mark);
    // All are asked at once (the protocol orders them); web, not cooperative, gets SIGTERM;
    // api stays, and is killed at its shutdown timeout; db, which stopped itself, never got a
    // signal.
    assert_eq!(log[0], "t=100 ask db,api");
    assert!(log.contains(&"t=100 stop web"), "{log:?}");
    assert!(log.contains(&"t=601 kill api"), "{log:?}");
    assert!(
        !log.iter()
            .any(|l| l.ends_with("stop db") || l.ends_with("stop api")),
        "{log:?}"
    );
    assert_eq!(sim.finished, Some(Outcome::Stopped));
    assert_eq!(
        sim.state("db"),
        ServiceState::Stopped,
        "an exit while being stopped is a stop"
    );
}

#[test]
fn a_failure_sequence_asks_only_the_cooperative_services_it_takes_down_and_closes_the_gate() {
    let mut services = vec![svc("db", &[]), svc("api", &["db"]), svc("other", &[])];
    services[1].ready = ReadyKind::Cc;
    services[2].ready = ReadyKind::Cc;
    for s in &mut services {
        s.behaviour.ready_after = Some(ms(1));
    }
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    let mark = sim.log.len();
    sim.crash("db");
    sim.run_until(ms(5_000));
    let log = sim.log_since(mark);
    assert_eq!(
        log[0], "t=1000 ask api",
        "only api, which requires db, is asked: {log:?}"
    );
    assert!(log.iter().any(|l| l.ends_with("gate closed")), "{log:?}");
    assert_eq!(
        sim.engine.slots()[1].restarts,
        0,
        "api stopping itself is no failure"
    );
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

/// One service "a", up, adopted at `now` from a dead coordinator that had restarted it 5 times
/// (the limit) in a window that began at 1 s; then "a" crashes at `crash`.
fn crash_after_adopting_five_restarts(now: Time, crash: Time) -> (Engine, Vec<Action>) {
    let services = vec![svc("a", &[])];
    let mut slot = published(ServiceState::Up, 500, ms(1_000));
    slot.restarts = 5;
    let window = RestartWindow {
        start: ms(1_000),
        count: 5,
    };
    let snapshot = snapshot_of(InstanceState::Steady, vec![slot], window);
    let facts = KeeperFacts {
        running: vec![(0, 500)],
        ..KeeperFacts::default()
    };
    let p = params(&services);
    let (mut engine, _) = Engine::adopt(p, now, snapshot, &facts, false);
    let crashed = Event::Exited {
        service: 0,
        exit: ProcessExit::Exited(1),
    };
    let actions = engine.handle(crashed, crash);
    (engine, actions)
}

#[test]
fn the_restart_count_survives_a_takeover() {
    // The dead coordinator had counted 5 restarts (the limit): one more crash gives up.
    let (engine, _) = crash_after_adopting_five_restarts(ms(2_000), ms(2_010));
    assert!(
        matches!(engine.outcome(), Some(Outcome::GaveUp { restarts: 5, .. })),
        "{:?}",
        engine.outcome()
    );
}

#[test]
fn the_restart_window_runs_out_on_the_dead_coordinators_clock() {
    // Those 5 restarts were counted in a window that opened 59 s before the takeover, of a
    // 60 s span: a crash 2 s after the takeover falls in a new window, so it is restarted, not
    // given up on.
    let (engine, actions) = crash_after_adopting_five_restarts(ms(60_000), ms(62_000));
    assert_eq!(engine.outcome(), None, "{actions:?}");
    assert_eq!(
        engine.restart_window(),
        RestartWindow {
            start: ms(62_000),
            count: 1
        }
    );
}

#[test]
fn takeover_restart_brings_back_services_that_shut_themselves_down() {
    // Under restart, API services shut down by themselves when the coordinator died (exit 0):
    // the new coordinator starts them again, with everything else, and counts no failure.
    let gone = (ServiceState::Up, false, Some(ProcessExit::Exited(0)));
    let mut sim = sim_adopting(
        stack(),
        InstanceState::Steady,
        &[UP, gone, UP, gone, gone],
        true,
    );
    sim.run();
    let spawns: Vec<&str> = sim
        .log
        .iter()
        .filter(|l| l.contains(" spawn "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(spawns, ["cache", "log", "db", "api", "web"]);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    assert!(sim.engine.slots().iter().all(|s| s.restarts == 0));
}

/// The coordinator-less drivers' engine stops what runs in shutdown order, and only that.
#[test]
fn stopping_only_stops_what_runs_in_shutdown_order() {
    // b requires a; c runs nothing.
    let p = params(&[svc("a", &[]), svc("b", &["a"]), svc("c", &[])]);
    let (mut engine, actions) = Engine::stopping(p, Time::ZERO, &[Some(10), Some(11), None]);
    assert_eq!(
        actions,
        vec![Action::Signal {
            service: 1,
            signal: Signal::SIGTERM
        }]
    );
    let actions = engine.handle(
        Event::Exited {
            service: 1,
            exit: ProcessExit::Exited(0),
        },
        Time::from_millis(5),
    );
    assert_eq!(
        actions,
        vec![Action::Signal {
            service: 0,
            signal: Signal::SIGTERM
        }]
    );
    let actions = engine.handle(
        Event::Exited {
            service: 0,
            exit: ProcessExit::Exited(0),
        },
        Time::from_millis(6),
    );
    assert_eq!(actions, vec![Action::Finished(Outcome::Stopped)]);
}

/// `min_uptime` of `ms` for service `s` of the stack.
fn with_min_uptime(s: usize, ms_: u64) -> impl FnOnce(&mut EngineParams) {
    move |p| p.services[s].min_uptime = ms(ms_)
}

#[test]
fn min_uptime_holds_dependents_until_the_service_has_stayed_up() {
    // db (index 1) must run 400 ms to count as up: api waits for that, web for api.
    let mut sim = Sim::with(stack(), with_min_uptime(1, 400));
    sim.run_until(ms(399));
    assert_eq!(sim.state("db"), ServiceState::Starting);
    sim.run();
    assert_eq!(
        sim.log,
        [
            "t=0 spawn cache",
            "t=0 spawn log",
            "t=0 spawn db",
            "t=400 spawn api",
            "t=400 spawn web"
        ]
    );
    assert_eq!(sim.state("db"), ServiceState::Up);
    assert_eq!(sim.startup_complete_at, Some(ms(400)));
}

#[test]
fn min_uptime_counts_from_the_start_for_a_notify_service() {
    // Ready at 100 ms with a 300 ms min_uptime: up at 300; ready at 500: up at 500.
    for (ready_after, up_at) in [(100, 300), (500, 500)] {
        let mut services = vec![svc("a", &[]), svc("b", &["a"])];
        services[0].ready = ReadyKind::Notify;
        services[0].behaviour.ready_after = Some(ms(ready_after));
        let mut sim = Sim::with(services, with_min_uptime(0, 300));
        sim.run();
        assert_eq!(
            sim.log,
            ["t=0 spawn a".to_owned(), format!("t={up_at} spawn b")]
        );
    }
}

#[test]
fn an_exit_before_min_uptime_fails_the_startup_naming_the_service() {
    // db says nothing is wrong at exec, then exits with status 7 after 200 ms of its 1 s.
    let mut services = stack();
    services[1].behaviour.exits_after = Some((ms(200), ProcessExit::Exited(7)));
    let mut sim = Sim::with(services, with_min_uptime(1, 1_000));
    sim.run();
    match sim.finished.clone() {
        Some(Outcome::StartupFailed(f)) => {
            assert_eq!(f.service, 1);
            assert_eq!(f.kind, FailureKind::Exited(ProcessExit::Exited(7)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sim.startup_complete_at, None, "the startup never completed");
    assert!(
        !sim.log.iter().any(|l| l.ends_with("spawn api")),
        "{:?}",
        sim.log
    );
}

#[test]
fn after_startup_an_exit_before_min_uptime_is_a_failure_the_restart_counter_counts() {
    // a is up (it ran its 300 ms); from its second start on it dies after 100 ms, before its
    // min_uptime: each such start is a failure, counted, until the stack gives up.
    let mut services = vec![svc("a", &[]), svc("b", &["a"])];
    services[0].behaviour.later_starts = Some((2, Some((ms(100), ProcessExit::Exited(1)))));
    let mut sim = Sim::with(services, |p| {
        p.services[0].min_uptime = ms(300);
        p.restart_retry_counter = 3;
    });
    sim.run_until(ms(1_000));
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    sim.crash("a");
    sim.run();
    match sim.finished.clone() {
        Some(Outcome::GaveUp { failure, restarts }) => {
            assert_eq!(failure.service, 0);
            assert_eq!(restarts, 3);
        }
        other => panic!("{other:?}"),
    }
    // b never came back: a was never up again.
    let b_spawns = sim.log.iter().filter(|l| l.ends_with("spawn b")).count();
    assert_eq!(b_spawns, 1, "{:?}", sim.log);
}

/// `web` wants `metrics`, which is slow to be ready (300 ms), and requires `db`.
fn wants_stack() -> Vec<Svc> {
    let mut metrics = svc("metrics", &[]);
    metrics.ready = ReadyKind::Notify;
    metrics.behaviour.ready_after = Some(ms(300));
    let mut web = svc("web", &["db"]);
    web.wants = vec!["metrics"];
    vec![svc("db", &[]), metrics, web]
}

#[test]
fn a_dependent_waits_for_what_it_wants_during_startup() {
    let mut sim = Sim::new(wants_stack());
    sim.run();
    assert_eq!(
        sim.log,
        ["t=0 spawn db", "t=0 spawn metrics", "t=300 spawn web"]
    );
    assert_eq!(sim.startup_complete_at, Some(ms(300)));
}

#[test]
fn a_wanted_service_that_fails_and_stays_down_leaves_its_dependent_up() {
    let mut services = wants_stack();
    services[1].restart = RestartPolicy::Never;
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    let web = sim.pids[sim.idx("web")];
    let mark = sim.log.len();
    sim.crash("metrics");
    sim.run_until(ms(5_000));
    // With `requires`, web would be stopped here (restart_never_stays_down_and_stops_...).
    assert_eq!(sim.log_since(mark), Vec::<&str>::new(), "nothing stopped");
    assert_eq!(sim.state("metrics"), ServiceState::Failed);
    assert_eq!(sim.state("web"), ServiceState::Up);
    assert_eq!(sim.pids[sim.idx("web")], web, "web kept its process");
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

#[test]
fn a_failure_sequence_of_a_wanted_service_spares_what_only_wants_it() {
    let mut sim = Sim::new(wants_stack());
    sim.run_until(ms(5_000));
    let web = sim.pids[sim.idx("web")];
    let mark = sim.log.len();
    sim.crash("metrics");
    sim.run_until(ms(10_000));
    assert_eq!(sim.log_since(mark), ["t=5000 spawn metrics"]);
    assert_eq!(sim.pids[sim.idx("web")], web, "web kept its process");
    assert_eq!(sim.state("metrics"), ServiceState::Up);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

#[test]
fn a_dependent_starts_once_what_it_wants_has_failed_to_start() {
    // web requires db and wants metrics, which requires db too. db crashes: both are taken
    // down and started again; metrics' new start fails (it exits before it is ready). web
    // does not wait for metrics' next attempt: it starts as soon as that attempt is over.
    let mut services = wants_stack();
    services[1].requires = vec!["db"];
    services[1].behaviour.later_starts = Some((2, Some((ms(50), ProcessExit::Exited(1)))));
    let mut sim = Sim::new(services);
    sim.run_until(ms(5_000));
    let mark = sim.log.len();
    sim.crash("db");
    sim.run_until(ms(5_070));
    assert_eq!(
        sim.log_since(mark),
        [
            "t=5000 stop web",
            "t=5001 stop metrics", // after web: the shutdown order reverses `wants` too
            "t=5002 spawn db",
            "t=5002 spawn metrics",
            "t=5052 spawn web"
        ]
    );
    assert_eq!(sim.state("metrics"), ServiceState::Failed);
    assert_eq!(sim.state("web"), ServiceState::Up);
}

#[test]
fn a_dependent_of_a_wanted_service_that_is_down_is_still_started() {
    let mut services = wants_stack();
    services[1].restart = RestartPolicy::Never;
    let mut sim = Sim::new(services);
    sim.run_until(ms(1_000));
    sim.crash("metrics"); // down for good
    sim.run_until(ms(2_000));
    let mark = sim.log.len();
    sim.crash("db"); // web is taken down with db, and must come back without metrics
    sim.run_until(ms(5_000));
    assert_eq!(
        sim.log_since(mark),
        ["t=2000 stop web", "t=2001 spawn db", "t=2001 spawn web"]
    );
    assert_eq!(sim.state("web"), ServiceState::Up);
    assert_eq!(sim.state("metrics"), ServiceState::Failed);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

#[test]
fn a_wanted_service_failing_during_the_startup_sequence_still_fails_the_startup() {
    // Every service of the stack must come up once for `start` to succeed: `wants` is about
    // the dependent, not about the stack's contract with its members.
    let mut services = wants_stack();
    services[1].behaviour.exits_after = Some((ms(50), ProcessExit::Exited(1)));
    let mut sim = Sim::new(services);
    sim.run();
    assert!(matches!(
        sim.finished,
        Some(Outcome::StartupFailed(Failure { service: 1, .. }))
    ));
    assert!(
        !sim.log.contains(&"t=50 spawn web".to_owned()),
        "{:?}",
        sim.log
    );
}

#[test]
fn the_shutdown_order_reverses_wants_edges() {
    let mut sim = Sim::new(wants_stack());
    sim.run_until(ms(1_000));
    let mark = sim.log.len();
    sim.send(Event::Stop);
    sim.run();
    assert_eq!(
        sim.log_since(mark),
        ["t=1000 stop web", "t=1001 stop metrics", "t=1001 stop db"]
    );
}

#[test]
fn before_orders_as_the_mirrored_after_does() {
    // x (a drop-in) says `before = ["web"]`; the same stack with web `after = ["x"]` must
    // start and stop in the same order, at the same times.
    let run = |mirrored: bool| {
        let mut x = svc("x", &[]);
        x.ready = ReadyKind::Notify;
        x.behaviour.ready_after = Some(ms(200));
        let mut web = svc("web", &[]);
        if mirrored {
            x.before = vec!["web"];
        } else {
            web.after = vec!["x"];
        }
        let mut sim = Sim::new(vec![web, x]);
        sim.run_until(ms(1_000));
        sim.send(Event::Stop);
        sim.run();
        sim.log
    };
    let before = run(true);
    assert_eq!(
        before,
        [
            "t=0 spawn x",
            "t=200 spawn web",
            "t=1000 stop web",
            "t=1001 stop x"
        ]
    );
    assert_eq!(before, run(false));
}

/// The acceptance chain: c requires b requires a.
fn chain() -> Vec<Svc> {
    vec![svc("a", &[]), svc("b", &["a"]), svc("c", &["b"])]
}

fn operator(sim: &Sim, ids: &[&str]) -> Vec<usize> {
    ids.iter().map(|id| sim.idx(id)).collect()
}

#[test]
fn operator_restart_cycles_the_service_and_what_requires_it_in_order() {
    let mut sim = Sim::new(chain());
    sim.run();
    let a_pid = sim.engine.slots()[sim.idx("a")].pid();
    let mark = sim.log.len();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorRestart { services });
    sim.run();
    assert_eq!(
        sim.log_since(mark),
        ["t=10 stop c", "t=11 stop b", "t=12 spawn b", "t=12 spawn c"]
    );
    assert_eq!(sim.engine.slots()[sim.idx("a")].pid(), a_pid);
    // An operator's restart is no failure: nothing counted.
    assert_eq!(sim.engine.restart_window().count, 0);
    assert!(sim.engine.slots().iter().all(|s| s.restarts == 0));
    // It passed through recovery while b and c were down, and is whole again.
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
}

#[test]
fn operator_stop_holds_the_service_and_its_dependents_down_through_a_failure_sequence() {
    let mut sim = Sim::new(chain());
    sim.run();
    let mark = sim.log.len();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorStop { services });
    sim.run();
    assert_eq!(sim.log_since(mark), ["t=10 stop c", "t=11 stop b"]);
    for id in ["b", "c"] {
        let slot = &sim.engine.slots()[sim.idx(id)];
        assert_eq!(
            (slot.state(), slot.want),
            (ServiceState::Stopped, Want::Held)
        );
    }
    // A failure sequence of what they require brings back only it.
    let mark = sim.log.len();
    sim.crash("a");
    sim.run();
    assert_eq!(sim.log_since(mark), ["t=100 spawn a"], "{:?}", sim.log);
    assert_eq!(sim.state("b"), ServiceState::Stopped);
    assert_eq!(sim.engine.phase(), InstanceState::Steady);
    // The operator's start of c brings b and c back, in order.
    let mark = sim.log.len();
    let services = operator(&sim, &["c"]);
    sim.send(Event::OperatorStart { services });
    sim.run();
    assert_eq!(sim.log_since(mark), ["t=110 spawn b", "t=110 spawn c"]);
    assert!(
        sim.engine
            .slots()
            .iter()
            .all(|s| s.want == Want::Up && s.is_up())
    );
}

#[test]
fn a_failed_service_the_operator_stops_is_stopped_not_failed() {
    let mut services = chain();
    services[2].restart = RestartPolicy::Never;
    let mut sim = Sim::new(services);
    sim.run();
    sim.crash("c");
    sim.run();
    assert_eq!(sim.state("c"), ServiceState::Failed);
    let services = operator(&sim, &["c"]);
    sim.send(Event::OperatorStop { services });
    let slot = &sim.engine.slots()[sim.idx("c")];
    assert_eq!(
        (slot.state(), slot.want),
        (ServiceState::Stopped, Want::Held)
    );
    assert!(slot.last_exit.is_some());
}

#[test]
fn operator_start_of_a_dependency_leaves_its_held_dependents_down() {
    let mut sim = Sim::new(chain());
    sim.run();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorStop { services });
    sim.run();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorStart { services });
    sim.run();
    assert_eq!(sim.state("b"), ServiceState::Up);
    assert_eq!(sim.state("c"), ServiceState::Stopped);
    assert_eq!(sim.engine.slots()[sim.idx("c")].want, Want::Held);
}

#[test]
fn a_held_service_stays_held_when_what_it_requires_gives_up_for_good() {
    let mut services = chain();
    services[0].restart = RestartPolicy::Never;
    let mut sim = Sim::new(services);
    sim.run();
    let services = operator(&sim, &["c"]);
    sim.send(Event::OperatorStop { services });
    sim.run();
    sim.crash("a");
    sim.run();
    let want = |sim: &Sim, id| sim.engine.slots()[sim.idx(id)].want;
    assert_eq!(want(&sim, "a"), Want::Down);
    assert_eq!(want(&sim, "b"), Want::Down);
    assert_eq!(want(&sim, "c"), Want::Held);
    // The operator's start brings a `restart = "never"` service back too.
    let mark = sim.log.len();
    let services = operator(&sim, &["c"]);
    sim.send(Event::OperatorStart { services });
    sim.run();
    assert_eq!(
        sim.log_since(mark),
        ["t=12 spawn a", "t=12 spawn b", "t=12 spawn c"]
    );
}

#[test]
fn operator_restart_of_a_held_service_starts_it_and_leaves_held_dependents_down() {
    let mut sim = Sim::new(chain());
    sim.run();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorStop { services });
    sim.run();
    let mark = sim.log.len();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorRestart { services });
    sim.run();
    assert_eq!(sim.log_since(mark), ["t=12 spawn b"]);
    assert_eq!(sim.engine.slots()[sim.idx("c")].want, Want::Held);
}

#[test]
fn operator_requests_are_ignored_during_startup_and_once_stopping() {
    let mut sim = Sim::new(chain());
    assert!(!sim.engine.takes_operator_requests());
    let services = operator(&sim, &["a"]);
    assert!(
        sim.engine
            .handle(Event::OperatorStop { services }, Time::ZERO)
            .is_empty()
    );
    sim.run();
    assert!(sim.engine.takes_operator_requests());
    sim.send(Event::Stop);
    assert!(!sim.engine.takes_operator_requests());
    let before = sim.engine.snapshot();
    let services = operator(&sim, &["a"]);
    sim.send(Event::OperatorStart { services });
    assert_eq!(sim.engine.snapshot(), before);
}

#[test]
fn a_successor_keeps_what_the_operator_held() {
    let mut sim = Sim::new(chain());
    sim.run();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorStop { services });
    sim.run();
    let snapshot = sim.engine.snapshot();
    let facts = KeeperFacts {
        news: Vec::new(),
        running: sim
            .engine
            .slots()
            .iter()
            .enumerate()
            .filter_map(|(s, slot)| slot.pid().map(|pid| (s, pid)))
            .collect(),
    };
    for restart_all in [false, true] {
        let mut successor = sim_taking_over(chain(), snapshot.clone(), facts.clone(), restart_all);
        successor.run();
        let spawned: Vec<&str> = successor
            .log
            .iter()
            .filter(|l| l.contains("spawn b") || l.contains("spawn c"))
            .map(String::as_str)
            .collect();
        assert!(spawned.is_empty(), "{:?}", successor.log);
        assert_eq!(successor.engine.slots()[1].want, Want::Held);
        assert_eq!(successor.engine.slots()[2].want, Want::Held);
    }
}

#[test]
fn a_stop_of_the_whole_stack_overrides_the_operators_holds_and_finishes() {
    let mut sim = Sim::new(chain());
    sim.run();
    let services = operator(&sim, &["b"]);
    sim.send(Event::OperatorStop { services });
    sim.run();
    sim.send(Event::Stop);
    sim.run();
    assert_eq!(sim.finished, Some(Outcome::Stopped));
}

/// Random event sequences over random small stacks, with the invariants checked after every
/// step (see the module documentation of the engine for the table they exercise).
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// One service of a random stack: its dependencies (on services before it) and behaviour.
    #[derive(Clone, Debug)]
    struct RandomService {
        /// (dependency index below this one, the kind of edge: 0 requires, 1 wants, 2 after,
        /// 3 before, declared by the dependency).
        deps: Vec<(usize, u8)>,
        ready: ReadyKind,
        restart: RestartPolicy,
        min_uptime_ms: u64,
        /// Takes part in the service API's shutdown protocol.
        cooperative: bool,
    }

    #[derive(Clone, Debug)]
    struct RandomStack {
        services: Vec<RandomService>,
        restart_all: bool,
    }

    fn random_stack() -> impl Strategy<Value = RandomStack> {
        (1usize..=5)
            .prop_flat_map(|n| {
                let service = |i: usize| {
                    (
                        proptest::collection::vec((0..i.max(1), 0u8..4), 0..=i.min(2)),
                        prop_oneof![
                            Just(ReadyKind::Started),
                            Just(ReadyKind::Notify),
                            Just(ReadyKind::Exit)
                        ],
                        prop_oneof![
                            3 => Just(RestartPolicy::Always),
                            2 => Just(RestartPolicy::OnFailure),
                            1 => Just(RestartPolicy::Never)
                        ],
                        prop_oneof![Just(0u64), Just(30u64)],
                        prop::bool::weighted(0.25),
                    )
                        .prop_map(
                            move |(deps, ready, restart, min_uptime_ms, cooperative)| {
                                RandomService {
                                    deps: if i == 0 { Vec::new() } else { deps },
                                    ready,
                                    restart,
                                    min_uptime_ms,
                                    cooperative,
                                }
                            },
                        )
                };
                let services: Vec<_> = (0..n).map(service).collect();
                (services, any::<bool>())
            })
            .prop_map(|(services, restart_all)| RandomStack {
                services,
                restart_all,
            })
    }

    const IDS: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];

    fn engine_params(stack: &RandomStack) -> EngineParams {
        let mut services: Vec<Svc> = stack
            .services
            .iter()
            .enumerate()
            .map(|(i, r)| Svc {
                id: IDS[i],
                requires: Vec::new(),
                wants: Vec::new(),
                after: Vec::new(),
                before: Vec::new(),
                ready: r.ready,
                restart: r.restart,
                behaviour: Behaviour::default(),
            })
            .collect();
        for (i, r) in stack.services.iter().enumerate() {
            for &(d, kind) in &r.deps {
                // A `before` is written in the dependency's file, naming this service.
                let (holder, target) = if kind == 3 { (d, IDS[i]) } else { (i, IDS[d]) };
                let svc = &mut services[holder];
                let list = match kind {
                    0 => &mut svc.requires,
                    1 => &mut svc.wants,
                    2 => &mut svc.after,
                    _ => &mut svc.before,
                };
                if !list.contains(&target) {
                    list.push(target);
                }
            }
        }
        let mut p = params(&services);
        for (s, r) in p.services.iter_mut().zip(&stack.services) {
            s.min_uptime = ms(r.min_uptime_ms);
            s.cooperative = r.cooperative;
            s.startup_timeout = ms(200);
            s.shutdown_timeout = ms(100);
            s.restart_delay = ms(10);
            s.restart_delay_max = ms(80);
        }
        p.on_failure = if stack.restart_all {
            OnFailure::RestartAll
        } else {
            OnFailure::RestartDependents
        };
        p.restart_retry_counter = 4;
        p.restart_time_span = ms(2_000);
        p.startup_timeout = ms(3_000);
        p.shutdown_timeout = ms(1_000);
        p
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Answer the k-th pending spawn: started, or failed.
        AnswerSpawn {
            k: usize,
            ok: bool,
        },
        /// The k-th live process ends (status 0, 1, or killed).
        Exit {
            k: usize,
            how: u8,
        },
        /// The k-th live process says READY=1.
        Ready {
            k: usize,
        },
        /// Time passes; then a tick.
        Advance {
            ms: u64,
        },
        Stop,
        /// The coordinator dies; a successor adopts what it published. `lost_exit`: the k-th
        /// live process ended while nobody listened.
        Takeover {
            lost_exit: Option<usize>,
        },
        /// The coordinator dies; a successor with `takeover = "restart"` adopts what it
        /// published and from then on is the coordinator.
        TakeoverRestart,
        /// The operator stops, starts or restarts service k (verb 0, 1, 2).
        Operator {
            verb: u8,
            k: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<usize>(), prop::bool::weighted(0.85))
                .prop_map(|(k, ok)| Op::AnswerSpawn { k, ok }),
            3 => (any::<usize>(), 0u8..3).prop_map(|(k, how)| Op::Exit { k, how }),
            3 => any::<usize>().prop_map(|k| Op::Ready { k }),
            3 => prop_oneof![Just(5u64), Just(40), Just(150), Just(1_200)]
                .prop_map(|ms| Op::Advance { ms }),
            1 => Just(Op::Stop),
            2 => proptest::option::of(any::<usize>()).prop_map(|lost_exit| Op::Takeover { lost_exit }),
            1 => Just(Op::TakeoverRestart),
            2 => (0u8..3, any::<usize>()).prop_map(|(verb, k)| Op::Operator { verb, k }),
        ]
    }

    /// A snapshot without the time of the last phase change: a takeover of a steady stack
    /// passes through recovery, so the successor's says when it took over.
    fn comparable(mut snapshot: Snapshot) -> Snapshot {
        snapshot.phase_since = Time::ZERO;
        snapshot
    }

    fn exit_of(how: u8) -> ProcessExit {
        match how {
            0 => ProcessExit::Exited(0),
            1 => ProcessExit::Exited(1),
            _ => ProcessExit::Signaled {
                signal: 9,
                core_dumped: false,
            },
        }
    }

    /// The services' side: which spawns are asked for, which processes live, which were
    /// killed, and the last exit of each service (what a keeper would hand over again).
    struct World {
        now: Time,
        next_pid: i32,
        pending: Vec<usize>,
        alive: Vec<(usize, i32)>,
        killed: Vec<i32>,
        last_exit: Vec<Option<(i32, ProcessExit)>>,
    }

    struct Run {
        params: EngineParams,
        engine: Engine,
        /// Successors adopted at takeovers, driven with the same events as `engine`: each
        /// must stay in the same state.
        shadows: Vec<Engine>,
        world: World,
    }

    impl Run {
        fn new(params: EngineParams) -> Result<Self, TestCaseError> {
            let n = params.services.len();
            let (engine, actions) = Engine::new(params.clone(), Time::ZERO);
            let mut run = Run {
                params,
                engine,
                shadows: Vec::new(),
                world: World {
                    now: Time::ZERO,
                    next_pid: 100,
                    pending: Vec::new(),
                    alive: Vec::new(),
                    killed: Vec::new(),
                    last_exit: vec![None; n],
                },
            };
            run.perform(actions)?;
            run.check()?;
            Ok(run)
        }

        /// Carries out the engine's actions; none may name a process that is not alive.
        fn perform(&mut self, actions: Vec<Action>) -> Result<(), TestCaseError> {
            for action in actions {
                match action {
                    Action::Spawn { service } => {
                        prop_assert!(
                            !self.world.pending.contains(&service)
                                && !self.world.alive.iter().any(|&(s, _)| s == service),
                            "spawn of {service}, which has a process or a spawn under way"
                        );
                        self.world.pending.push(service);
                    }
                    Action::Signal { service, .. } | Action::Kill { service } => {
                        let target = self.world.alive.iter().find(|&&(s, _)| s == service);
                        prop_assert!(target.is_some(), "signal to {service}, which runs nothing");
                        if matches!(action, Action::Kill { .. }) {
                            let pid = target.unwrap().1;
                            self.world.killed.push(pid);
                        }
                    }
                    Action::ShutdownRequested { services } => {
                        for s in services {
                            prop_assert!(
                                self.params.services[s].cooperative,
                                "asked {s}, which does not take part in the protocol"
                            );
                            prop_assert!(
                                self.world.pending.contains(&s)
                                    || self.world.alive.iter().any(|&(x, _)| x == s),
                                "asked {s} to shut down, which runs nothing"
                            );
                        }
                    }
                    Action::ShutdownOver => {}
                    Action::StartupComplete | Action::Finished(_) => {}
                }
            }
            Ok(())
        }

        /// Feeds an event to the engine and to every shadow, and carries out the actions.
        fn feed(&mut self, event: Event) -> Result<(), TestCaseError> {
            let now = self.world.now;
            for shadow in &mut self.shadows {
                shadow.handle(event.clone(), now);
            }
            let actions = self.engine.handle(event, now);
            self.perform(actions)
        }

        fn answer_spawn(&mut self, i: usize, ok: bool) -> Result<(), TestCaseError> {
            let service = self.world.pending.remove(i);
            if ok {
                self.world.next_pid += 1;
                let pid = self.world.next_pid;
                self.world.alive.push((service, pid));
                self.feed(Event::Spawned { service, pid })
            } else {
                let error = "exec: ENOENT".to_owned();
                self.feed(Event::SpawnFailed { service, error })
            }
        }

        /// Process `i` of the live ones ends; the keeper keeps the news.
        fn end_process(&mut self, i: usize, exit: ProcessExit) -> (usize, i32) {
            let (service, pid) = self.world.alive.remove(i);
            self.world.killed.retain(|&p| p != pid);
            self.world.last_exit[service] = Some((pid, exit));
            (service, pid)
        }

        fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            match *op {
                Op::AnswerSpawn { k, ok } if !self.world.pending.is_empty() => {
                    let i = k % self.world.pending.len();
                    self.answer_spawn(i, ok)?;
                }
                Op::Exit { k, how } if !self.world.alive.is_empty() => {
                    let exit = exit_of(how);
                    let (service, _) = self.end_process(k % self.world.alive.len(), exit);
                    self.feed(Event::Exited { service, exit })?;
                }
                Op::Ready { k } if !self.world.alive.is_empty() => {
                    let (service, _) = self.world.alive[k % self.world.alive.len()];
                    self.feed(Event::Ready { service })?;
                }
                Op::Advance { ms: step } => {
                    self.world.now += ms(step);
                    self.feed(Event::Tick)?;
                }
                Op::Stop => self.feed(Event::Stop)?,
                Op::Takeover { lost_exit } => self.takeover(lost_exit)?,
                Op::TakeoverRestart => self.takeover_restart()?,
                Op::Operator { verb, k } => {
                    let services = vec![k % self.params.services.len()];
                    self.feed(match verb {
                        0 => Event::OperatorStop { services },
                        1 => Event::OperatorStart { services },
                        _ => Event::OperatorRestart { services },
                    })?;
                }
                Op::AnswerSpawn { .. } | Op::Exit { .. } | Op::Ready { .. } => {}
            }
            self.check()
        }

        /// The coordinator dies now, with what it published: its last snapshot. Meanwhile the
        /// keeper answers the spawns it was asked for, and perhaps a process ends; the old
        /// engine hears of it as events (what it would have done had it lived), the successor
        /// from the keeper, with every exit the keeper still holds (the ones already handled
        /// are duplicates it must ignore).
        fn takeover(&mut self, lost_exit: Option<usize>) -> Result<(), TestCaseError> {
            let snapshot = self.engine.snapshot();
            // Exits the dead coordinator had handled, which the keeper hands over again.
            let mut news: Vec<KeeperNews> = (0..self.world.last_exit.len())
                .filter_map(|s| {
                    self.world.last_exit[s].map(|(pid, exit)| KeeperNews::Exited {
                        service: s,
                        pid,
                        exit,
                    })
                })
                .collect();
            while !self.world.pending.is_empty() {
                let service = self.world.pending[0];
                self.answer_spawn(0, true)?;
                let pid = self.world.alive.last().unwrap().1;
                news.push(KeeperNews::Spawned { service, pid });
            }
            if let Some(k) = lost_exit.filter(|_| !self.world.alive.is_empty()) {
                let exit = ProcessExit::Exited(3);
                let (service, pid) = self.end_process(k % self.world.alive.len(), exit);
                news.push(KeeperNews::Exited { service, pid, exit });
                self.feed(Event::Exited { service, exit })?;
            }
            let facts = KeeperFacts {
                news,
                running: self.world.alive.clone(),
            };
            let (successor, _) =
                Engine::adopt(self.params.clone(), self.world.now, snapshot, &facts, false);
            prop_assert_eq!(
                comparable(successor.snapshot()),
                comparable(self.engine.snapshot()),
                "the successor continues where the coordinator would have been"
            );
            self.shadows.push(successor);
            Ok(())
        }

        /// The coordinator dies; a successor under `takeover = "restart"` takes over for good
        /// (the spawns asked for before the death were answered meanwhile).
        fn takeover_restart(&mut self) -> Result<(), TestCaseError> {
            let snapshot = self.engine.snapshot();
            let mut news = Vec::new();
            while !self.world.pending.is_empty() {
                let service = self.world.pending.remove(0);
                self.world.next_pid += 1;
                let pid = self.world.next_pid;
                self.world.alive.push((service, pid));
                news.push(KeeperNews::Spawned { service, pid });
            }
            let facts = KeeperFacts {
                news,
                running: self.world.alive.clone(),
            };
            let (successor, actions) =
                Engine::adopt(self.params.clone(), self.world.now, snapshot, &facts, true);
            self.engine = successor;
            self.shadows.clear();
            self.perform(actions)
        }

        /// The invariants, after every step.
        fn check(&self) -> Result<(), TestCaseError> {
            let slots = self.engine.slots();
            for (s, slot) in slots.iter().enumerate() {
                // The engine's view of each process is the world's.
                let alive = self
                    .world
                    .alive
                    .iter()
                    .find(|&&(x, _)| x == s)
                    .map(|&(_, p)| p);
                prop_assert_eq!(slot.pid(), alive, "the process of service {}", s);
                prop_assert_eq!(
                    slot.process == Process::Spawning,
                    self.world.pending.contains(&s),
                    "the spawn of service {}",
                    s
                );
                // Nothing wanted up is starting or up while something it requires is not up.
                let on_its_way_up =
                    matches!(slot.state(), ServiceState::Starting | ServiceState::Up)
                        && slot.want == Want::Up;
                if on_its_way_up {
                    for &(d, kind) in &self.params.services[s].dependencies {
                        if kind == EdgeKind::Requires {
                            prop_assert_eq!(
                                slots[d].state(),
                                ServiceState::Up,
                                "service {} is {} but {}, which it requires, is not up",
                                s,
                                slot.state(),
                                d
                            );
                        }
                    }
                }
            }
            for shadow in &self.shadows {
                prop_assert_eq!(
                    comparable(shadow.snapshot()),
                    comparable(self.engine.snapshot())
                );
            }
            Ok(())
        }

        /// Stop, then let time pass with every killed process dying, until the engine says
        /// it is finished: every stop finishes.
        fn finish(&mut self) -> Result<(), TestCaseError> {
            self.feed(Event::Stop)?;
            self.check()?;
            for _ in 0..100 {
                if self.engine.is_finished() {
                    prop_assert!(self.world.alive.is_empty() && self.world.pending.is_empty());
                    return Ok(());
                }
                while !self.world.pending.is_empty() {
                    self.answer_spawn(0, true)?;
                }
                while let Some(&pid) = self.world.killed.first() {
                    let i = self
                        .world
                        .alive
                        .iter()
                        .position(|&(_, p)| p == pid)
                        .unwrap();
                    let exit = exit_of(2);
                    let (service, _) = self.end_process(i, exit);
                    self.feed(Event::Exited { service, exit })?;
                }
                self.world.now += ms(300);
                self.feed(Event::Tick)?;
                self.check()?;
            }
            prop_assert!(
                false,
                "the stop never finished: {:?}",
                self.engine.snapshot()
            );
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_event_sequences_keep_the_invariants(
            stack in random_stack(),
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut run = Run::new(engine_params(&stack))?;
            for op in &ops {
                run.step(op)?;
            }
            run.finish()?;
        }
    }
}

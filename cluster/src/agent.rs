//! The node agent (`ccmgr cluster agent`): one per node. It joins the cluster with an etcd
//! lease, keeps the lease alive (seed 000's heartbeat), takes the manager's role when the
//! rules say so (see [`crate::roles`]), and, as manager, applies [`crate::decide`]'s plan.
//! As a node it carries out what the records assign to it, through the local ccmgr's public
//! commands ([`crate::local`]): start, stop, recovery and notify commands.
//!
//! One task owns all state; the lease's keep-alives, the local work and the fence guard's
//! messages come to it over one channel, and etcd's changes over one watch. Nothing polls:
//! the loop wakes on a message, a watch event, the lease's fence time, or a maturity time.
//!
//! **Never on two nodes at once.** An agent acts on an assignment only while its lease is
//! valid by its own clock: `valid_until` is the time a keep-alive was *sent* plus the TTL
//! etcd granted, which is no later than the time etcd will expire the lease (etcd counts
//! from when it *received* it). At `valid_until - fence_margin` without a new keep-alive the
//! node's fence guard ([`crate::guard`], a separate process, so that it acts also when the
//! agent is killed or frozen) stops every cluster service of the node. The manager moves a
//! service only after etcd deleted the node's member key, which happens when the lease
//! expires, after the node stopped. Every write is a compare-and-swap: an agent's on its
//! member key's lease (a node whose lease ended cannot write), the manager's on the manager
//! key's create revision (its fencing token: a deposed manager cannot write).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::decide::{self, Outcome};
use crate::local::{self, LocalCcmgr};
use crate::record::Keys;
use crate::record::{
    InstanceState, KnownNode, ManagerRecord, Member, MemberState, NodeLife, RequestKind, View,
    unix_ms,
};
use crate::spec::ClusterServiceSpec;

/// What a transaction writes, key by key (`None`: deleted), applied to the view once it
/// succeeded.
type Writes = Vec<(String, Option<Vec<u8>>)>;

/// How many of the manager's independent writes are in flight at once.
const TXNS_IN_FLIGHT: usize = 32;

/// How long notify and recovery commands may run before they are killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The most specifications one transaction publishes: etcd's `--max-txn-ops` defaults to 128.
const SPECS_PER_TXN: usize = 100;
/// The TTL of an agent's events lease: the events it published live this long after it.
const EVENTS_TTL_SECS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Specs(String),
    #[error("the local ccmgr instance: {0}")]
    Local(String),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("the fence guard: {0}")]
    Guard(String),
}

/// What the agent's tasks tell its loop.
#[derive(Debug)]
enum Msg {
    /// etcd answered that `lease` no longer exists.
    LeaseGone { lease: i64 },
    /// Work on an assignment finished.
    Work {
        service: String,
        epoch: u64,
        outcome: Outcome,
    },
    /// A notify command finished (it is recorded whatever its exit: it ran).
    Notified {
        service: String,
        epoch: u64,
        result: Result<(), String>,
    },
    /// A service that runs here with no assignment was stopped.
    Cleaned { service: String },
    /// The local instance said something about a service.
    Local(local::LocalEvent),
    /// The fence guard stopped every cluster service of the node: at the lease's deadline (0),
    /// or when asked `fence <n>` (n).
    Fenced(u64),
    /// The guard's pipe closed: it died.
    GuardLost,
    /// SIGTERM or SIGINT: leave gracefully.
    Leave,
}

/// What the agent is doing with a service locally.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Busy {
    Assignment(u64),
    Notify(u64),
    Clean,
}

pub struct Agent {
    cfg: ClusterConfig,
    keys: Keys,
    client: Client,
    specs: BTreeMap<String, ClusterServiceSpec>,
    local: Arc<LocalCcmgr>,
    tx: mpsc::Sender<Msg>,
    view: View,
    lease: i64,
    events_lease: i64,
    /// The current lease and until when it is valid by this node's clock (see the module's
    /// doc), kept by the keep-alive task itself: a busy loop does not delay a renewal.
    clock: Arc<LeaseClock>,
    /// The lease ran out (or etcd lost it): the guard fences; no work until a new lease.
    fenced: bool,
    /// The manager key's create revision when this agent holds it.
    manager_token: Option<i64>,
    busy: BTreeMap<String, Busy>,
    /// Finished work not yet recorded (a compare-and-swap lost a race): tried again.
    reports: BTreeMap<String, (u64, Outcome)>,
    /// Services this agent started and has not stopped.
    running: BTreeSet<String>,
    /// Notify commands run, so a failed write does not run them twice.
    notified_here: BTreeSet<(String, u64)>,
    leaving: bool,
    event_seq: u64,
    /// The number of the last fence asked of the guard.
    fence_seq: u64,
    /// See [`Member::local_generation`]; `local_down`: the local instance was found not running.
    local_generation: u64,
    local_down: bool,
    /// The fence guard's stdin.
    guard_tx: GuardPipe,
    /// Each new life's (lease, events lease), for the keep-alive thread.
    lives: tokio::sync::watch::Sender<(i64, i64)>,
    watch: Option<WatchStream>,
    /// The watch's handle: dropping it would end the watch.
    watcher: Option<etcd_client::Watcher>,
    wake_at_ms: Option<u64>,
    /// Keys this agent wrote and applied to its view at once ([`Agent::txn_apply`]), with the
    /// revision written, until the watch brings that revision back: an older change of such
    /// a key still on its way in the watch must not take the view back in time.
    own_writes: BTreeMap<String, i64>,
    op_timeout: Duration,
}

/// A transaction's answer, or why there is none (an etcd error, or none in time).
fn settled(
    answer: Result<
        Result<etcd_client::TxnResponse, etcd_client::Error>,
        tokio::time::error::Elapsed,
    >,
) -> Result<etcd_client::TxnResponse, AgentError> {
    match answer {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(etcd_err(e)),
        Err(_) => Err(AgentError::Etcd("no answer in time".into())),
    }
}

fn etcd_err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Etcd(e.to_string())
}

/// CLOCK_MONOTONIC in milliseconds: the one clock the agent and its guard share.
pub fn monotonic_ms() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
}

/// The Instant of a CLOCK_MONOTONIC time in milliseconds (tokio's timers take Instants).
fn instant_of_mono(ms: u64) -> Instant {
    let now = Instant::now();
    let m = monotonic_ms();
    if ms >= m {
        now + Duration::from_millis(ms - m)
    } else {
        now.checked_sub(Duration::from_millis(m - ms))
            .unwrap_or(now)
    }
}

/// The lease this node lives by now, and its fence time: the time (CLOCK_MONOTONIC, ms) a
/// keep-alive was sent plus the TTL etcd granted, minus `fence_margin`. The keep-alive task
/// moves it forward and tells the guard at each answer, without waiting for the agent's loop
/// (a manager's long pass must not make its own guard fence a healthy node); the loop only
/// reads it.
#[derive(Debug, Default)]
pub struct LeaseClock {
    lease: std::sync::atomic::AtomicI64,
    fence_at_ms: std::sync::atomic::AtomicU64,
}

impl LeaseClock {
    fn renewed(&self, lease: i64, fence_at_ms: u64) -> bool {
        use std::sync::atomic::Ordering;
        if self.lease.load(Ordering::SeqCst) != lease {
            return false;
        }
        self.fence_at_ms.fetch_max(fence_at_ms, Ordering::SeqCst);
        true
    }
    fn begin(&self, lease: i64, fence_at_ms: u64) {
        use std::sync::atomic::Ordering;
        self.lease.store(lease, Ordering::SeqCst);
        self.fence_at_ms.store(fence_at_ms, Ordering::SeqCst);
    }
    /// Whether `lease` is the current life's and its fence time has not come.
    fn valid(&self, lease: i64) -> bool {
        use std::sync::atomic::Ordering;
        self.lease.load(Ordering::SeqCst) == lease && monotonic_ms() < self.fence_at_ms()
    }

    fn fence_at_ms(&self) -> u64 {
        self.fence_at_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How long a connection to etcd may be silent before the client pings it. etcd closes a
/// connection that pings more often than its `--grpc-keepalive-min-time` (5 s by default)
/// while it sends nothing back ("too_many_pings"): pings at the heartbeat ended a quiet
/// connection after a second (the commands have their own client, `cli::client`, with the
/// same rule; an agent's connection is seldom quiet, its lease's keep-alives answered at
/// each heartbeat, but etcd's rule holds for it too).
const PING_AFTER: Duration = Duration::from_secs(10);

/// Connects to etcd with HTTP/2 pings after a silence (see [`PING_AFTER`]), so that a dead
/// link ends the watch and the keep-alive stream instead of leaving them waiting. (The
/// lease does not depend on them: the agent fences by its own clock and connects anew.)
pub async fn connect(cfg: &ClusterConfig) -> Result<Client, AgentError> {
    connect_as(cfg, &crate::endpoints::MAIN).await
}

/// [`connect`], for a kind of client (see [`crate::endpoints::Slot`]).
pub async fn connect_as(
    cfg: &ClusterConfig,
    slot: &'static crate::endpoints::Slot,
) -> Result<Client, AgentError> {
    let hb = cfg.heartbeat.max(Duration::from_millis(100));
    let options = ConnectOptions::new()
        .with_connect_timeout(hb * 2)
        .with_keep_alive(PING_AFTER.max(hb), hb * 2)
        .with_keep_alive_while_idle(true);
    // Only the endpoints that answer, and a task that keeps the balancer to those: see
    // crate::endpoints (etcd-client sends requests to dead members too).
    let live = crate::endpoints::live(&cfg.endpoints, hb * 2).await;
    let client = timeout(hb * 8, Client::connect(live.clone(), Some(options)))
        .await
        .map_err(|_| AgentError::Etcd(format!("no answer from {}", cfg.endpoints.join(", "))))?
        .map_err(etcd_err)?;
    crate::endpoints::watch_endpoints(&client, cfg.endpoints.clone(), live, hb, slot);
    Ok(client)
}

/// Runs the agent until it has left the cluster (exit 0) or failed.
pub async fn run(cfg: ClusterConfig, ccmgr: PathBuf) -> Result<(), AgentError> {
    let specs = if cfg.cluster_dir.exists() {
        crate::spec::load_cluster_dir(&cfg.cluster_dir, &cfg.node)
            .map_err(|e| AgentError::Specs(e.to_string()))?
    } else {
        warn!(
            "{} does not exist: this node knows no cluster service (it can run none)",
            cfg.cluster_dir.display()
        );
        Vec::new()
    };
    let specs: BTreeMap<_, _> = specs.into_iter().map(|s| (s.name.clone(), s)).collect();
    let local = Arc::new(
        LocalCcmgr::new(
            ccmgr.clone(),
            cfg.config_path.clone(),
            cfg.services_dir.clone(),
            cfg.node.clone(),
        )
        .with_instance(cfg.instance.as_deref()),
    );
    // Whatever a previous life of this agent left running here has no lease any more.
    local
        .stop_all_owned()
        .await
        .map_err(|e| AgentError::Local(e.to_string()))?;

    let (tx, mut rx) = mpsc::channel::<Msg>(256);
    let guard_tx = spawn_guard(&cfg, &ccmgr, tx.clone())?;
    let clock = Arc::new(LeaseClock::default());
    let lives = start_keep_alive(cfg.clone(), tx.clone(), clock.clone(), guard_tx.clone());
    spawn_signals(tx.clone());
    {
        let mut events = local.follow_events();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if tx.send(Msg::Local(e)).await.is_err() {
                    break;
                }
            }
        });
    }

    let client = loop {
        match connect(&cfg).await {
            Ok(c) => break c,
            Err(e) => {
                warn!("cannot reach etcd yet ({e}); trying again");
                tokio::time::sleep(cfg.heartbeat * 4).await;
            }
        }
    };
    let op_timeout = (cfg.heartbeat * 2).max(Duration::from_millis(500));
    let mut agent = Agent {
        keys: Keys::new(&cfg.name),
        cfg,
        client,
        specs,
        local,
        tx,
        view: View::default(),
        lease: 0,
        events_lease: 0,
        clock,
        fenced: true,
        manager_token: None,
        busy: BTreeMap::new(),
        reports: BTreeMap::new(),
        running: BTreeSet::new(),
        notified_here: BTreeSet::new(),
        leaving: false,
        event_seq: 0,
        fence_seq: 0,
        local_generation: 0,
        local_down: false,
        guard_tx,
        lives,
        watch: None,
        watcher: None,
        wake_at_ms: None,
        own_writes: BTreeMap::new(),
        op_timeout,
    };
    agent.join_until_done().await;
    agent.resync().await;
    agent.step().await;

    loop {
        let fence_at = agent.fence_time();
        let wake = agent
            .wake_at_ms
            .map(|at| Instant::now() + Duration::from_millis(at.saturating_sub(unix_ms())));
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                if agent.handle(msg).await {
                    return Ok(());
                }
                // Whatever else is queued, then one step.
                while let Ok(msg) = rx.try_recv() {
                    if agent.handle(msg).await {
                        return Ok(());
                    }
                }
            }
            ev = next_watch(&mut agent.watch, agent.cfg.heartbeat) => {
                agent.on_watch(ev).await;
                // What else the watch has ready, before one step: a burst of changes (200
                // services placed at once) is decided on once, not once per message.
                for _ in 0..64 {
                    match timeout(Duration::ZERO, next_watch(&mut agent.watch, agent.cfg.heartbeat)).await {
                        Ok(ev) => agent.on_watch(ev).await,
                        Err(_) => break,
                    }
                }
            }
            // The fence time may have moved on meanwhile: checked below, with the clock's.
            _ = sleep_until(fence_at), if !agent.fenced => {}
            _ = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                agent.wake_at_ms = None;
            }
        }
        // The fence time may have passed while another branch was chosen (a process
        // frozen, or starved, past it wakes with the timer and the watch both ready): no
        // step on an expired lease, whatever woke the loop.
        if !agent.fenced && Instant::now() >= agent.fence_time() {
            warn!(
                "the lease's validity ran out: fencing (the guard stops this node's cluster services)"
            );
            agent.fenced = true;
            agent.manager_token = None;
        }
        if agent.fenced && !agent.leaving {
            agent.after_fence(&mut rx).await;
        }
        agent.step().await;
    }
    Ok(())
}

/// Stops a service of this node, trying again (1 s, 2 s, ... 30 s apart) until the local
/// ccmgr did it: a stop that failed leaves the service running here, as far as anyone knows.
async fn stop_until_done(local: &LocalCcmgr, name: &str) {
    let mut pause = Duration::from_secs(1);
    loop {
        match local.stop_service(name).await {
            Ok(()) => return,
            Err(e) => warn!(
                "cannot stop {name} (trying again in {} s): {e}",
                pause.as_secs()
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// The keep-alive stream's next answer; none while there is no stream.
async fn next_keepalive(
    stream: &mut Option<etcd_client::LeaseKeepAliveStream>,
) -> Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error> {
    match stream {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

/// The watch's next message; with no watch (the last resync could not read the cluster or
/// open one), an end of stream after `retry`, so that the loop resyncs again rather than
/// follow the cluster no more while its lease lives on.
async fn next_watch(
    watch: &mut Option<WatchStream>,
    retry: Duration,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match watch {
        Some(w) => w.message().await,
        None => {
            tokio::time::sleep(retry).await;
            Ok(None)
        }
    }
}

fn spawn_signals(tx: mpsc::Sender<Msg>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if tx.send(Msg::Leave).await.is_err() {
                return;
            }
        }
    });
}

/// Starts the fence guard (`ccmgr-cluster guard`), which stops the node's cluster services
/// when the lease's validity runs out without a renewal, or at once when this agent dies.
fn spawn_guard(
    cfg: &ClusterConfig,
    ccmgr: &std::path::Path,
    tx: mpsc::Sender<Msg>,
) -> Result<GuardPipe, AgentError> {
    let exe = std::env::current_exe().map_err(|e| AgentError::Guard(e.to_string()))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--config").arg(&cfg.config_path);
    if let Some(i) = &cfg.instance {
        cmd.arg("--instance").arg(i);
    }
    cmd.arg("--services-dir").arg(&cfg.services_dir);
    cmd.arg("guard").arg("--ccmgr").arg(ccmgr);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| AgentError::Guard(e.to_string()))?;
    let stdin = child.stdin.take().expect("piped");
    let stdin = stdin
        .into_owned_fd()
        .map_err(|e| AgentError::Guard(e.to_string()))?;
    let guard_tx = GuardPipe(Arc::new(std::sync::Mutex::new(std::fs::File::from(stdin))));
    let stdout = child.stdout.take().expect("piped");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let n = line
                .trim()
                .strip_prefix("fenced ")
                .and_then(|n| n.parse().ok());
            if let Some(n) = n
                && tx.send(Msg::Fenced(n)).await.is_err()
            {
                return;
            }
        }
        let _ = tx.send(Msg::GuardLost).await;
        let _ = child.wait().await;
    });
    Ok(guard_tx)
}

/// Starts the keep-alive thread: a thread of its own, with its own runtime and its own
/// connection to etcd, made once when the agent starts (a connection made at each join could
/// come too late for the new lease's first renewal on a loaded machine). The renewals, and the
/// deadlines they give the guard, so never wait for the agent's loop, whose manager pass over
/// hundreds of services may hold the CPU for a while. The agent hands it each new life's
/// (lease, events lease) through the returned channel; (0, 0) is no life yet.
fn start_keep_alive(
    cfg: ClusterConfig,
    tx: mpsc::Sender<Msg>,
    clock: Arc<LeaseClock>,
    guard_tx: GuardPipe,
) -> tokio::sync::watch::Sender<(i64, i64)> {
    let (lives_tx, mut lives) = tokio::sync::watch::channel((0i64, 0i64));
    let spawned = std::thread::Builder::new()
        .name("keep-alive".into())
        .spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let hb = cfg.heartbeat;
                let mut client = loop {
                    match connect_as(&cfg, &crate::endpoints::KEEP_ALIVE).await {
                        Ok(c) => break c,
                        Err(_) => tokio::time::sleep(hb).await,
                    }
                };
                loop {
                    let (lease, events_lease) = *lives.borrow_and_update();
                    let changed = lease != 0
                        && keep_alive_life(
                            &mut client,
                            &cfg,
                            (lease, events_lease),
                            &mut lives,
                            &tx,
                            &clock,
                            &guard_tx,
                        )
                        .await;
                    // The life ended (or there is none yet): wait for the next one.
                    if !changed && lives.changed().await.is_err() {
                        return; // the agent is gone
                    }
                }
            });
        });
    if let Err(e) = spawned {
        warn!("cannot start the keep-alive thread: {e}");
    }
    lives_tx
}

/// Keeps one life's lease alive until a new life begins (returns true) or the lease is gone
/// (false). Keep-alives go out at every beat without waiting for the answer to the last one:
/// etcd answers them in order on the stream, so each answer is matched with the oldest
/// unanswered send. A slow answer (a loaded etcd, a loaded machine) still renews from the time
/// its request left, instead of the stream being given up after one heartbeat.
async fn keep_alive_life(
    client: &mut Client,
    cfg: &ClusterConfig,
    (lease, events_lease): (i64, i64),
    lives: &mut tokio::sync::watch::Receiver<(i64, i64)>,
    tx: &mpsc::Sender<Msg>,
    clock: &LeaseClock,
    guard_tx: &GuardPipe,
) -> bool {
    let hb = cfg.heartbeat;
    let margin_ms = cfg.fence_margin.as_millis() as u64;
    let mut keeper: Option<etcd_client::LeaseKeeper> = None;
    let mut stream: Option<etcd_client::LeaseKeepAliveStream> = None;
    let mut unanswered: std::collections::VecDeque<u64> = Default::default();
    let mut ticks = tokio::time::interval(hb);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat: u64 = 0;
    let renew_events_every =
        ((EVENTS_TTL_SECS as u64 * 1000 / 3) / (hb.as_millis() as u64).max(1)).max(1);
    loop {
        tokio::select! {
            changed = lives.changed() => return changed.is_ok(),
            _ = ticks.tick() => {
                beat += 1;
                // Answers this many beats late are as good as none: start afresh.
                if unanswered.len() > 8 {
                    keeper = None;
                    stream = None;
                    unanswered.clear();
                }
                if keeper.is_none() {
                    match timeout(hb * 2, client.lease_keep_alive(lease)).await {
                        Ok(Ok((k, st))) => {
                            keeper = Some(k);
                            stream = Some(st);
                            unanswered.clear();
                        }
                        _ => continue,
                    }
                }
                let sent_ms = monotonic_ms();
                let k = keeper.as_mut().expect("set above");
                match timeout(hb, k.keep_alive()).await {
                    Ok(Ok(())) => unanswered.push_back(sent_ms),
                    _ => {
                        keeper = None;
                        stream = None;
                        unanswered.clear();
                    }
                }
                // The events lease lives an hour: renewed every 20 minutes.
                if beat % renew_events_every == 0
                    && let Ok(Ok((mut k, _))) =
                        timeout(hb, client.lease_keep_alive(events_lease)).await
                {
                    let _ = timeout(hb, k.keep_alive()).await;
                }
            }
            answer = next_keepalive(&mut stream) => match answer {
                Ok(Some(r)) if r.ttl() > 0 => {
                    let Some(sent_ms) = unanswered.pop_front() else { continue };
                    let ttl_ms = r.ttl() as u64 * 1000;
                    let fence_at = sent_ms + ttl_ms - margin_ms.min(ttl_ms / 2);
                    if !clock.renewed(lease, fence_at) {
                        return false; // a new life has begun: this lease is renewed no more
                    }
                    let _ = guard_tx.send(format!("deadline {lease} {fence_at}\n"));
                }
                Ok(Some(_)) => {
                    let _ = tx.send(Msg::LeaseGone { lease }).await;
                    return false;
                }
                _ => {
                    keeper = None;
                    stream = None;
                    unanswered.clear();
                }
            },
        }
    }
}

/// The guard's stdin, written from the agent's loop and from the keep-alive thread alike,
/// without a runtime in between (a busy loop must not hold a renewal back). The pipe is
/// non-blocking (tokio made it so) and each line is shorter than PIPE_BUF, so a write is whole
/// or refused: a guard too frozen to read loses lines, never gets half of one, and never
/// blocks the agent.
#[derive(Clone)]
pub struct GuardPipe(Arc<std::sync::Mutex<std::fs::File>>);

impl GuardPipe {
    /// Writes one line; whether it went whole (a guard that is gone is noticed by its
    /// closed stdout, `GuardLost`, not here).
    pub fn send(&self, line: String) -> bool {
        use std::io::Write;
        let Ok(mut pipe) = self.0.lock() else {
            return false;
        };
        matches!(pipe.write(line.as_bytes()), Ok(n) if n == line.len())
    }
}

impl Agent {
    fn tell_guard(&self, line: String) {
        // A guard that is gone is noticed by its closed stdout (`GuardLost`).
        let _ = self.guard_tx.send(line);
    }

    /// An event, as a put of its own key under the events lease.
    fn event_op(&mut self, mut body: Value) -> TxnOp {
        let ms = unix_ms();
        self.event_seq += 1;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("time".into(), json!(ccmgr::events::rfc3339_utc(ms)));
            obj.insert("unix_ms".into(), json!(ms));
            obj.insert("cluster".into(), json!(self.cfg.name));
            obj.insert("by".into(), json!(self.cfg.node));
        }
        let key = format!(
            "{}{:013}-{}-{:06}",
            self.keys.events(),
            ms,
            self.cfg.node,
            self.event_seq
        );
        TxnOp::put(
            key,
            body.to_string(),
            Some(PutOptions::new().with_lease(self.events_lease)),
        )
    }

    async fn txn(&mut self, txn: Txn) -> Result<bool, AgentError> {
        self.txn_apply(txn, Vec::new()).await
    }

    /// A transaction whose writes, when it succeeds, are applied to the view at once (at the
    /// transaction's revision), so that the next pass does not decide again on what it has
    /// just written before the watch brings it back.
    async fn txn_apply(&mut self, txn: Txn, writes: Writes) -> Result<bool, AgentError> {
        let resp = settled(timeout(self.op_timeout, self.client.txn(txn)).await)?;
        if resp.succeeded() {
            self.apply_own_writes(resp.header().map_or(0, |h| h.revision()), writes);
        }
        Ok(resp.succeeded())
    }

    /// Applies this agent's own successful writes of revision `rev` to its view, and
    /// remembers them until the watch brings that revision back (`own_writes`).
    fn apply_own_writes(&mut self, rev: i64, writes: Writes) {
        for (key, value) in writes {
            if rev > self.view.revision {
                let create = self.view_create_revision(&key).unwrap_or(rev);
                self.view
                    .apply(&self.keys, &key, value.as_deref(), rev, create);
                self.own_writes.insert(key, rev);
            }
        }
    }

    /// Several independent transactions at once (at most [`TXNS_IN_FLIGHT`]), each as
    /// [`Agent::txn_apply`]: a manager's pass over 200 services took 3-5 s one round trip
    /// after another. Returns each one's result, in order.
    async fn txns_apply(&mut self, batch: Vec<(Txn, Writes)>) -> Vec<Result<bool, AgentError>> {
        let mut results: Vec<Option<Result<bool, AgentError>>> = Vec::new();
        let mut applied: Vec<(i64, Writes)> = Vec::new();
        let mut pending = batch.into_iter().enumerate();
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < TXNS_IN_FLIGHT {
                let Some((i, (txn, writes))) = pending.next() else {
                    break;
                };
                results.push(None);
                let mut client = self.client.clone();
                let t = self.op_timeout;
                running.spawn(async move { (i, writes, timeout(t, client.txn(txn)).await) });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let Ok((i, writes, answer)) = done else {
                continue;
            };
            results[i] = Some(settled(answer).map(|r| {
                if r.succeeded() {
                    applied.push((r.header().map_or(0, |h| h.revision()), writes));
                }
                r.succeeded()
            }));
        }
        applied.sort_by_key(|(rev, _)| *rev);
        for (rev, writes) in applied {
            self.apply_own_writes(rev, writes);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(AgentError::Etcd("the transaction's task failed".into())))
            })
            .collect()
    }

    fn view_create_revision(&self, key: &str) -> Option<i64> {
        if key == self.keys.manager() {
            return self.view.manager.as_ref().map(|m| m.create_revision);
        }
        None
    }

    /// The compare that makes a write this node's only while it lives by its lease: once the
    /// lease ended (etcd deleted the member key) or a new life began, the write is refused.
    fn while_member(&self) -> Compare {
        Compare::lease(
            self.keys.member(&self.cfg.node),
            CompareOp::Equal,
            self.lease,
        )
    }

    fn member_record(&self, state: MemberState) -> Member {
        Member {
            name: self.cfg.node.clone(),
            number: self.cfg.node_number,
            address: self.cfg.address.clone(),
            may_manage: self.cfg.may_manage,
            state,
            group: self.cfg.group.clone(),
            distances: self.cfg.distances.clone(),
            lease: self.lease,
            joined_unix_ms: unix_ms(),
            local_generation: self.local_generation,
        }
    }

    /// Joins (or joins again): a new lease, the previous life's lease revoked (its services
    /// were stopped before: at start, or by the fence), the member key put.
    async fn join(&mut self) -> Result<(), AgentError> {
        let ttl = self.cfg.lease_ttl_secs();
        let sent_ms = monotonic_ms();
        let grant = timeout(self.op_timeout, self.client.lease_grant(ttl, None))
            .await
            .map_err(|_| AgentError::Etcd("lease grant: no answer in time".into()))?
            .map_err(etcd_err)?;
        // A new events lease at each join: the last one may have expired while this node was
        // cut off for long, and a put under an expired lease fails the whole transaction.
        {
            let ev = timeout(
                self.op_timeout,
                self.client.lease_grant(EVENTS_TTL_SECS, None),
            )
            .await
            .map_err(|_| AgentError::Etcd("lease grant: no answer in time".into()))?
            .map_err(etcd_err)?;
            self.events_lease = ev.id();
        }
        let old = timeout(
            self.op_timeout,
            self.client.get(self.keys.member(&self.cfg.node), None),
        )
        .await
        .map_err(|_| AgentError::Etcd("get: no answer in time".into()))?
        .map_err(etcd_err)?;
        if let Some(kv) = old.kvs().first()
            && kv.lease() != grant.id()
            && kv.lease() != 0
        {
            info!(
                "revoking the lease of this node's previous life ({:x})",
                kv.lease()
            );
            let _ = timeout(self.op_timeout, self.client.lease_revoke(kv.lease())).await;
        }
        self.lease = grant.id();
        let member = self.member_record(MemberState::Up);
        let known = KnownNode {
            name: self.cfg.node.clone(),
            number: self.cfg.node_number,
        };
        let joined = self.event_op(json!({"event": "member-joined", "member": self.cfg.node}));
        let txn = Txn::new().and_then(vec![
            TxnOp::put(
                self.keys.member(&self.cfg.node),
                serde_json::to_string(&member).expect("json"),
                Some(PutOptions::new().with_lease(self.lease)),
            ),
            TxnOp::put(
                self.keys.node(&self.cfg.node),
                serde_json::to_string(&known).expect("json"),
                None,
            ),
            joined,
        ]);
        self.txn(txn).await?;
        let fence_at = sent_ms + grant.ttl() as u64 * 1000 - self.margin_ms(grant.ttl());
        self.clock.begin(self.lease, fence_at);
        self.fenced = false;
        self.tell_guard(format!("life {}\n", self.lease));
        self.tell_guard(format!("deadline {} {fence_at}\n", self.lease));
        self.spawn_keepalive();
        info!(
            "joined cluster {} as {} (lease {:x}, {} s)",
            self.cfg.name,
            self.cfg.node,
            self.lease,
            grant.ttl()
        );
        Ok(())
    }

    fn fence_time(&self) -> Instant {
        instant_of_mono(self.clock.fence_at_ms())
    }

    /// The fence margin, at most half the lease (etcd may grant a longer lease than asked,
    /// never a shorter one; the margin was checked against the one asked for).
    fn margin_ms(&self, ttl_secs: i64) -> u64 {
        (self.cfg.fence_margin.as_millis() as u64).min(ttl_secs as u64 * 500)
    }

    async fn join_until_done(&mut self) {
        loop {
            match self.join().await {
                Ok(()) => return,
                Err(e) => {
                    warn!("cannot join yet ({e}); trying again");
                    tokio::time::sleep(self.cfg.heartbeat).await;
                    if let Ok(c) = connect(&self.cfg).await {
                        self.client = c;
                    }
                }
            }
        }
    }

    /// Hands the current life's lease to the keep-alive thread (see [`start_keep_alive`]).
    fn spawn_keepalive(&self) {
        self.lives.send_replace((self.lease, self.events_lease));
    }

    /// Reads the whole cluster and watches it from there.
    async fn resync(&mut self) {
        let opts = GetOptions::new().with_prefix();
        let got = timeout(
            self.op_timeout * 2,
            self.client.get(self.keys.prefix.clone(), Some(opts)),
        )
        .await;
        let Ok(Ok(resp)) = got else {
            self.watch = None;
            return;
        };
        let mut view = View::default();
        for kv in resp.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            if key.starts_with(&self.keys.events()) {
                continue;
            }
            view.apply(
                &self.keys,
                key,
                Some(kv.value()),
                kv.mod_revision(),
                kv.create_revision(),
            );
        }
        let rev = resp.header().map_or(0, |h| h.revision());
        view.revision = rev;
        self.view = view;
        self.own_writes.clear();
        let wopts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        match timeout(
            self.op_timeout,
            self.client.watch(self.keys.prefix.clone(), Some(wopts)),
        )
        .await
        {
            Ok(Ok((watcher, stream))) => {
                self.watcher = Some(watcher);
                self.watch = Some(stream);
            }
            _ => self.watch = None,
        }
    }

    async fn on_watch(
        &mut self,
        ev: Result<Option<etcd_client::WatchResponse>, etcd_client::Error>,
    ) {
        match ev {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    self.resync().await;
                    return;
                }
                for e in resp.events() {
                    let Some(kv) = e.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    if key.starts_with(&self.keys.events()) {
                        continue;
                    }
                    // The late echo of a change older than one this agent wrote and applied
                    // at once (txn_apply) would take the view back in time: the agent would
                    // carry out again an assignment it has already reported on.
                    // (`own_writes` covers the keys the view forgets when deleted, the backup's.)
                    if self.view.holds_newer(&self.keys, key, kv.mod_revision())
                        || self
                            .own_writes
                            .get(key)
                            .is_some_and(|&written| kv.mod_revision() < written)
                    {
                        continue;
                    }
                    if self
                        .own_writes
                        .get(key)
                        .is_some_and(|&written| kv.mod_revision() >= written)
                    {
                        self.own_writes.remove(key);
                    }
                    let value = match e.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    self.on_key_change(key, value.is_none());
                    self.view.apply(
                        &self.keys,
                        key,
                        value,
                        kv.mod_revision(),
                        kv.create_revision(),
                    );
                }
            }
            _ => {
                debug!("the watch ended: reading the cluster again");
                tokio::time::sleep(self.cfg.heartbeat).await;
                self.resync().await;
            }
        }
    }

    /// Notes what a change means before the view forgets the old value (the manager tells
    /// a lost member from one that left).
    fn on_key_change(&mut self, key: &str, deleted: bool) {
        // The manager tells; when the manager itself went, its backup does.
        let backup_is_me = self.view.backup_node() == Some(self.cfg.node.as_str());
        if !deleted || (self.manager_token.is_none() && !backup_is_me) {
            return;
        }
        if let Some(node) = key.strip_prefix(&format!("{}members/", self.keys.prefix))
            && let Some(m) = self.view.members.get(node)
        {
            let graceful = m.value.state == MemberState::Leaving;
            let node = node.to_owned();
            let was_manager = self
                .view
                .manager
                .as_ref()
                .is_some_and(|m| m.value.node == node)
                || (self.manager_token.is_none() && self.view.manager.is_none());
            if self.manager_token.is_none() && !was_manager {
                return;
            }
            let mut ops = vec![self.event_op(json!({
                "event": if graceful { "member-left" } else { "member-lost" },
                "member": node,
                "was_manager": was_manager,
            }))];
            if was_manager && !graceful {
                ops.push(self.event_op(json!({"event": "manager-lost", "member": node})));
            }
            let txn = Txn::new().and_then(ops);
            let mut client = self.client.clone();
            let t = self.op_timeout;
            tokio::spawn(async move {
                // One slow or failed request must not lose the event for good; a retry
                // after a timeout that did apply writes the same keys again.
                for _ in 0..5 {
                    if let Ok(Ok(_)) = timeout(t, client.txn(txn.clone())).await {
                        return;
                    }
                }
                warn!("could not publish that {node} left: etcd did not take the event");
            });
        }
    }

    /// Returns true when the agent is done (it left).
    async fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            // A keep-alive task of an earlier life of this node still reports: not this lease.
            Msg::LeaseGone { lease } if lease != self.lease => {}
            Msg::LeaseGone { .. } => {
                warn!("etcd says this node's lease is gone: fencing");
                self.fenced = true;
                self.manager_token = None;
            }
            Msg::Work {
                service,
                epoch,
                outcome,
            } => {
                self.busy.remove(&service);
                match outcome {
                    Outcome::Started => {
                        self.running.insert(service.clone());
                    }
                    Outcome::Done | Outcome::Failed(_) => {
                        self.running.remove(&service);
                    }
                }
                if self.fenced && self.running.contains(&service) {
                    // Started while the lease ran out: stop it now.
                    self.clean(service.clone());
                }
                self.reports.insert(service, (epoch, outcome));
            }
            Msg::Notified {
                service,
                epoch,
                result,
            } => {
                self.busy.remove(&service);
                if let Err(e) = &result {
                    warn!("notify_command of {service} failed: {e}");
                }
                self.notified_here.insert((service.clone(), epoch));
                self.write_notified(&service, epoch, result).await;
            }
            Msg::Cleaned { service } => {
                self.busy.remove(&service);
                self.running.remove(&service);
            }
            Msg::Local(e) if e.event == "running" => {
                if self.local_down {
                    self.local_down = false;
                    self.local_generation += 1;
                    info!("the local ccmgr instance runs again: this node may be chosen again");
                    self.put_member().await;
                }
            }
            Msg::Local(e) if e.event == "not-running" => {
                self.local_down = true;
                // The local instance is gone (killed, or stopped under the agent): nothing of
                // the cluster's runs here any more; de-register what was, so it moves.
                for service in std::mem::take(&mut self.running) {
                    // Its file goes too: a local stack started again must not start it by
                    // itself while the cluster runs it elsewhere.
                    self.clean(service.clone());
                    if let Some(inst) = self
                        .view
                        .services
                        .get(&service)
                        .and_then(|r| r.value.instances.get(&self.cfg.node))
                    {
                        warn!(
                            "{service}: the local ccmgr instance is not running: de-registering it here"
                        );
                        self.reports.insert(
                            service.clone(),
                            (
                                inst.epoch,
                                Outcome::Failed("the local ccmgr instance is not running".into()),
                            ),
                        );
                    }
                }
            }
            Msg::Local(e) => {
                if let Some(service) = e.service.clone()
                    // `failed`: it stays down; `operator-stopped`: someone ran `ccmgr stop` on
                    // it here, and it stays down too. Not `stopped`: a failure sequence of the
                    // local stack stops it and starts it again by itself.
                    && matches!(e.event.as_str(), "failed" | "operator-stopped")
                    && self.running.contains(&service)
                    && let Some(inst) = self
                        .view
                        .services
                        .get(&service)
                        .and_then(|r| r.value.instances.get(&self.cfg.node))
                    && inst.state == InstanceState::Registered
                {
                    warn!("{service} failed in the local instance: de-registering it here");
                    self.reports.insert(
                        service.clone(),
                        (
                            inst.epoch,
                            Outcome::Failed("it failed in the local instance".into()),
                        ),
                    );
                    self.clean(service);
                }
            }
            Msg::Fenced(_) => {
                // The guard stopped everything: this life is over (its instances may be
                // recorded as running here); the loop fences and joins as a new life, and the
                // manager recovers the old life's services.
                info!("the guard stopped this node's cluster services");
                self.running.clear();
                if !self.fenced {
                    self.fenced = true;
                    self.manager_token = None;
                }
            }
            Msg::GuardLost => {
                // Without its guard the node cannot promise to stop in time: it stops its
                // services now and ends with a failure (so that a supervisor starts it again).
                warn!("the fence guard died: stopping this node's cluster services and exiting");
                let _ = self.local.stop_all_owned().await;
                std::process::exit(1);
            }
            Msg::Leave => {
                if !self.leaving {
                    self.begin_leave().await;
                }
            }
        }
        false
    }

    /// After the lease ran out: wait until the guard has stopped everything, then join again.
    async fn after_fence(&mut self, rx: &mut mpsc::Receiver<Msg>) {
        self.fence_seq += 1;
        let asked = self.fence_seq;
        self.tell_guard(format!("fence {asked}\n"));
        let limit = Instant::now() + Duration::from_secs(120);
        let mut fenced = false;
        while !fenced && Instant::now() < limit {
            match timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Some(Msg::Fenced(n))) => fenced = n == asked,
                Ok(Some(Msg::GuardLost)) | Ok(None) => break,
                Ok(Some(Msg::Leave)) => self.leaving = true,
                Ok(Some(_)) | Err(_) => {}
            }
        }
        if !fenced {
            let _ = self.local.stop_all_owned().await;
        }
        self.running.clear();
        self.busy.clear();
        self.reports.clear();
        self.manager_token = None;
        if self.leaving {
            std::process::exit(0);
        }
        info!("joining the cluster again");
        if let Ok(c) = connect(&self.cfg).await {
            self.client = c;
        }
        self.join_until_done().await;
        self.resync().await;
        let op = self.event_op(json!({
            "event": "member-fenced",
            "member": self.cfg.node,
            "why": "its lease could not be renewed in time; its cluster services were stopped before it could expire",
        }));
        let _ = self.txn(Txn::new().and_then(vec![op])).await;
    }

    /// Publishes this node's member record again (same lease), as it is now.
    async fn put_member(&mut self) {
        let state = if self.leaving {
            MemberState::Leaving
        } else {
            MemberState::Up
        };
        let member = self.member_record(state);
        let txn = Txn::new()
            .when(vec![self.while_member()])
            .and_then(vec![TxnOp::put(
                self.keys.member(&self.cfg.node),
                serde_json::to_string(&member).expect("json"),
                Some(PutOptions::new().with_lease(self.lease)),
            )]);
        if let Err(e) = self.txn(txn).await {
            warn!("cannot publish this node's record: {e}");
        }
    }

    async fn begin_leave(&mut self) {
        info!("leaving the cluster gracefully");
        self.leaving = true;
        let member = self.member_record(MemberState::Leaving);
        let ev = self.event_op(json!({"event": "member-leaving", "member": self.cfg.node}));
        let txn = Txn::new().when(vec![self.while_member()]).and_then(vec![
            TxnOp::put(
                self.keys.member(&self.cfg.node),
                serde_json::to_vec(&member).expect("json"),
                Some(PutOptions::new().with_lease(self.lease)),
            ),
            TxnOp::delete(self.keys.request(RequestKind::Leave, &self.cfg.node), None),
            ev,
        ]);
        let writes = vec![
            (
                self.keys.member(&self.cfg.node),
                Some(serde_json::to_vec(&member).expect("json")),
            ),
            (self.keys.request(RequestKind::Leave, &self.cfg.node), None),
        ];
        if let Err(e) = self.txn_apply(txn, writes).await {
            warn!("cannot mark this node leaving (trying again at the next pass): {e}");
        }
    }

    /// Whether the graceful leave is complete: nothing of the cluster's is here any more.
    fn leave_done(&self) -> bool {
        self.leaving
            && self.busy.is_empty()
            && self.running.is_empty()
            && !self
                .view
                .services
                .values()
                .any(|r| r.value.instances.contains_key(&self.cfg.node))
    }

    async fn finish_leave(&mut self) {
        let me = self.cfg.node.clone();
        let mut ops = vec![];
        let mut when = vec![];
        if let Some(token) = self.manager_token {
            when.push(Compare::create_revision(
                self.keys.manager(),
                CompareOp::Equal,
                token,
            ));
            ops.push(TxnOp::delete(self.keys.manager(), None));
            ops.push(self.event_op(json!({"event": "manager-resigned", "member": me})));
        }
        let _ = self.txn(Txn::new().when(when).and_then(ops)).await;
        // Deleting the member key first makes the manager see a graceful leave.
        let _ = timeout(self.op_timeout, self.client.lease_revoke(self.lease)).await;
        self.tell_guard("release\n".into());
        info!("left the cluster");
    }

    /// One pass: roles, the manager's plan, this node's work.
    async fn step(&mut self) {
        if self.fenced {
            return;
        }
        if self
            .view
            .requests
            .contains_key(&(RequestKind::Leave, self.cfg.node.clone()))
            && !self.leaving
        {
            self.begin_leave().await;
        }
        // A leave whose mark did not reach etcd (a timeout) is marked again.
        if self.leaving
            && self
                .view
                .members
                .get(&self.cfg.node)
                .is_some_and(|m| m.value.state != MemberState::Leaving)
        {
            self.begin_leave().await;
        }
        self.roles().await;
        if self.manager_token.is_some() {
            self.manage().await;
        }
        self.flush_reports().await;
        self.work();
        if self.leave_done() {
            // This pass's reports (the last stop here) may leave the manager something to
            // decide: when the last allowable node leaves, the de-registration that clears
            // the transfer intent (seed 001 Table 2, t13). A leaving manager decides once
            // more before it resigns: there may be no one left to.
            if self.manager_token.is_some() {
                self.manage().await;
            }
            self.finish_leave().await;
            std::process::exit(0);
        }
    }

    /// Seed 000's roles on etcd: see [`crate::roles`].
    async fn roles(&mut self) {
        let me = self.cfg.node.clone();
        // Am I the manager by the view? (A write of mine may not have come back yet.)
        match &self.view.manager {
            Some(m) if m.value.node == me && m.value.lease == self.lease => {
                self.manager_token = Some(m.create_revision);
            }
            Some(_) => self.manager_token = None,
            None => {
                self.manager_token = None;
                if crate::roles::should_claim(&self.view, &me, self.cfg.may_manage, self.leaving) {
                    self.claim().await;
                }
            }
        }
        if let Some(token) = self.manager_token {
            if let Some(choice) = crate::roles::backup_choice(&self.view, &me) {
                let ops = match &choice {
                    Some(b) => vec![
                        TxnOp::put(self.keys.backup(), b.clone(), None),
                        self.event_op(json!({"event": "backup-chosen", "member": b})),
                    ],
                    None => vec![
                        TxnOp::delete(self.keys.backup(), None),
                        self.event_op(
                            json!({"event": "backup-lost", "member": self.view.backup_node()}),
                        ),
                    ],
                };
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        self.keys.manager(),
                        CompareOp::Equal,
                        token,
                    )])
                    .and_then(ops);
                let write = vec![(self.keys.backup(), choice.map(String::into_bytes))];
                if let Err(e) = self.txn_apply(txn, write).await {
                    warn!("cannot publish the backup: {e}");
                }
            }
        }
    }

    async fn claim(&mut self) {
        let me = self.cfg.node.clone();
        let record = ManagerRecord {
            node: me.clone(),
            lease: self.lease,
            since_unix_ms: unix_ms(),
        };
        let previous = self.view.backup_node().map(str::to_owned);
        let mut when = vec![Compare::create_revision(
            self.keys.manager(),
            CompareOp::Equal,
            0,
        )];
        match &previous {
            Some(b) if *b == me => when.push(Compare::value(
                self.keys.backup(),
                CompareOp::Equal,
                me.clone(),
            )),
            Some(b) => when.push(Compare::create_revision(
                self.keys.member(b),
                CompareOp::Equal,
                0,
            )),
            None => when.push(Compare::create_revision(
                self.keys.backup(),
                CompareOp::Equal,
                0,
            )),
        }
        when.push(self.while_member());
        let ev = self.event_op(json!({
            "event": "manager-elected",
            "member": me,
            "was_backup": previous.as_deref() == Some(me.as_str()),
        }));
        let body = serde_json::to_string(&record).expect("json");
        let txn = Txn::new().when(when).and_then(vec![
            TxnOp::put(
                self.keys.manager(),
                body.clone(),
                Some(PutOptions::new().with_lease(self.lease)),
            ),
            ev,
        ]);
        match timeout(self.op_timeout, self.client.txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => {
                let rev = r.header().map_or(0, |h| h.revision());
                info!("this node is the manager now (token {rev})");
                self.manager_token = Some(rev);
                // Into the view at once, as the other own writes: until the watch brought
                // the claim back, the next pass found no manager in the view and dropped
                // the token (a member's leave meanwhile went untold).
                let key = self.keys.manager();
                self.view
                    .apply(&self.keys, &key, Some(body.as_bytes()), rev, rev);
            }
            Ok(Ok(_)) => debug!("another node claimed the manager's role first"),
            Ok(Err(e)) => warn!("cannot claim the manager's role: {e}"),
            Err(_) => warn!("cannot claim the manager's role: no answer in time"),
        }
    }

    /// The manager's pass: publish the specifications, then apply the plan.
    async fn manage(&mut self) {
        let Some(token) = self.manager_token else {
            return;
        };
        let manager_key = self.keys.manager();
        let fence = || Compare::create_revision(manager_key.clone(), CompareOp::Equal, token);
        let stale_specs: Vec<ClusterServiceSpec> = self
            .specs
            .values()
            .filter(|s| self.view.specs.get(&s.name) != Some(*s))
            .cloned()
            .collect();
        // In chunks: etcd refuses a transaction of more than `--max-txn-ops` operations
        // (default 128), so 200 specifications in one failed at every pass. Each chunk is
        // applied to the view at once, so that the next pass does not publish it again
        // before the watch brings it back.
        for chunk in stale_specs.chunks(SPECS_PER_TXN) {
            let mut ops = Vec::with_capacity(chunk.len());
            let mut writes = Vec::with_capacity(chunk.len());
            for s in chunk {
                let key = self.keys.spec(&s.name);
                let value = serde_json::to_vec(s).expect("json");
                ops.push(TxnOp::put(key.clone(), value.clone(), None));
                writes.push((key, Some(value)));
            }
            let txn = Txn::new().when(vec![fence()]).and_then(ops);
            match self.txn_apply(txn, writes).await {
                Ok(true) => {}
                Ok(false) => break, // no longer the manager
                Err(e) => {
                    warn!("cannot publish the service specifications: {e}");
                    break;
                }
            }
        }
        let plan = decide::manager_plan(&self.view, &self.specs, unix_ms());
        self.wake_at_ms = plan.wake_at_ms;
        let mut batch = Vec::with_capacity(plan.changes.len());
        let mut names = Vec::with_capacity(plan.changes.len());
        for change in plan.changes {
            let key = self.keys.service(&change.service);
            let mut when = vec![fence()];
            when.push(if change.expect_revision == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, change.expect_revision)
            });
            let value = serde_json::to_vec(&change.record).expect("json");
            let mut ops = vec![TxnOp::put(key.clone(), value.clone(), None)];
            let mut writes = vec![(key, Some(value))];
            for (kind, name) in &change.consumed {
                ops.push(TxnOp::delete(self.keys.request(*kind, name), None));
                writes.push((self.keys.request(*kind, name), None));
            }
            for e in change.events {
                ops.push(self.event_op(e));
            }
            batch.push((Txn::new().when(when).and_then(ops), writes));
            names.push(change.service);
        }
        // The services' changes are independent of each other: written all at once.
        for (name, result) in names.iter().zip(self.txns_apply(batch).await) {
            match result {
                Ok(true) => {}
                Ok(false) => debug!("{name}: the record changed meanwhile; deciding again"),
                Err(e) => warn!("cannot write {name}: {e}"),
            }
        }
    }

    /// Records finished work, each as a compare-and-swap on the record and this node's lease.
    async fn flush_reports(&mut self) {
        let life = NodeLife {
            lease: self.lease,
            generation: self.local_generation,
        };
        let reports: Vec<(String, (u64, Outcome))> = self
            .reports
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (service, (epoch, outcome)) in reports {
            let Some(rec) = self.view.services.get(&service).cloned() else {
                self.reports.remove(&service);
                continue;
            };
            let Some((new, event)) = decide::agent_transition(
                &service,
                &rec.value,
                &self.cfg.node,
                life,
                epoch,
                &outcome,
            ) else {
                self.reports.remove(&service);
                continue;
            };
            let key = self.keys.service(&service);
            let ev = self.event_op(event);
            let value = serde_json::to_vec(&new).expect("json");
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(key.clone(), CompareOp::Equal, rec.mod_revision),
                    self.while_member(),
                ])
                .and_then(vec![TxnOp::put(key.clone(), value.clone(), None), ev]);
            match self.txn_apply(txn, vec![(key, Some(value))]).await {
                Ok(true) => {
                    self.reports.remove(&service);
                }
                Ok(false) => debug!("{service}: the record changed meanwhile; reporting again"),
                Err(e) => warn!("cannot report on {service}: {e}"),
            }
        }
    }

    fn clean(&mut self, service: String) {
        self.busy.insert(service.clone(), Busy::Clean);
        let local = self.local.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            if let Err(e) = local.stop_service(&service).await {
                warn!("cannot stop {service}: {e}");
            }
            let _ = tx.send(Msg::Cleaned { service }).await;
        });
    }

    /// Starts the local work the records ask of this node.
    fn work(&mut self) {
        let me = self.cfg.node.clone();
        let mut todo = vec![];
        for (name, rec) in &self.view.services {
            if self.busy.contains_key(name) || self.reports.contains_key(name) {
                continue;
            }
            let mine = rec
                .value
                .instances
                .get(&me)
                .filter(|i| i.lease == self.lease);
            match mine {
                Some(inst) => match inst.state {
                    InstanceState::Starting => todo.push((name.clone(), inst.clone(), "start")),
                    InstanceState::Stopping => todo.push((name.clone(), inst.clone(), "stop")),
                    InstanceState::Recovering => todo.push((name.clone(), inst.clone(), "recover")),
                    InstanceState::Registered if !self.running.contains(name) => {
                        // Registered here but not started by this agent's life: it cannot be
                        // vouched for; de-register it so that the manager places it again.
                        self.reports.insert(
                            name.clone(),
                            (
                                inst.epoch,
                                Outcome::Failed("not running on its node".into()),
                            ),
                        );
                    }
                    InstanceState::Registered => {}
                },
                None => {
                    if self.running.contains(name) {
                        todo.push((
                            name.clone(),
                            crate::record::Instance {
                                state: InstanceState::Stopping,
                                epoch: 0,
                                lease: 0,
                                recovering_for: None,
                            },
                            "clean",
                        ));
                    } else if let Some((reg_node, reg)) = rec
                        .value
                        .instances
                        .iter()
                        .find(|(_, i)| i.state == InstanceState::Registered)
                        && *reg_node != me
                        && !self.leaving
                        && self.view.up(&me)
                        && let Some(spec) = self.specs.get(name)
                        && spec.notify_command.is_some()
                        && spec.allows(&me)
                        && self.view.notified.get(&(name.clone(), me.clone())) != Some(&reg.epoch)
                        && !self.notified_here.contains(&(name.clone(), reg.epoch))
                    {
                        todo.push((name.clone(), reg.clone(), "notify"));
                    }
                }
            }
        }
        // Services started here that no record names any more.
        for name in self.running.clone() {
            if !self.view.services.contains_key(&name) && !self.busy.contains_key(&name) {
                self.clean(name);
            }
        }
        for (name, inst, what) in todo {
            self.dispatch(name, inst, what);
        }
    }

    /// Runs the work an assignment asks of this node, marked busy until its outcome comes
    /// back to the loop as `Msg::Work`.
    fn assignment(
        &mut self,
        service: String,
        epoch: u64,
        work: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        self.busy.insert(service.clone(), Busy::Assignment(epoch));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let outcome = work.await;
            let _ = tx
                .send(Msg::Work {
                    service,
                    epoch,
                    outcome,
                })
                .await;
        });
    }

    fn dispatch(&mut self, name: String, inst: crate::record::Instance, what: &str) {
        // A start begins only while this life's lease is valid, checked again once the node's
        // lock is held (the start may have waited for it while the lease ran out).
        let clock = self.clock.clone();
        let lease = self.lease;
        let still_valid = move || clock.valid(lease);
        let tx = self.tx.clone();
        let local = self.local.clone();
        let spec = self.specs.get(&name).cloned();
        let epoch = inst.epoch;
        let mut env = vec![
            ("CCMGR_CLUSTER".to_owned(), self.cfg.name.clone()),
            ("CCMGR_CLUSTER_SERVICE".to_owned(), name.clone()),
            ("CCMGR_CLUSTER_NODE".to_owned(), self.cfg.node.clone()),
        ];
        match what {
            "start" => self.assignment(name.clone(), epoch, async move {
                match spec {
                    None => Outcome::Failed(format!("this node has no cluster.d file for {name}")),
                    Some(spec) => match local.start_service_if(&spec, still_valid).await {
                        Ok(()) => Outcome::Started,
                        Err(e) => {
                            // Reported failed (so placed elsewhere) only once it is down here.
                            stop_until_done(&local, &name).await;
                            Outcome::Failed(e.to_string())
                        }
                    },
                }
            }),
            // A stop is done only when it succeeded: until then the service may run here, and
            // the record must keep saying so (the manager would place it elsewhere at once).
            // It is tried again, ever more slowly; the guard still fences at the lease's end.
            "stop" => self.assignment(name.clone(), epoch, async move {
                stop_until_done(&local, &name).await;
                Outcome::Done
            }),
            "recover" => {
                let failed = inst.recovering_for.clone().unwrap_or_default();
                env.push(("CCMGR_CLUSTER_FAILED_NODE".to_owned(), failed));
                self.assignment(name, epoch, async move {
                    match spec.and_then(|s| s.recovery_command) {
                        None => Outcome::Done,
                        Some(cmd) => match local::run_command(&cmd, &env, COMMAND_TIMEOUT).await {
                            Ok(()) => Outcome::Done,
                            Err(e) => Outcome::Failed(e.to_string()),
                        },
                    }
                });
            }
            "notify" => {
                self.busy.insert(name.clone(), Busy::Notify(epoch));
                let registered_node = self
                    .view
                    .services
                    .get(&name)
                    .and_then(|r| {
                        r.value
                            .instances
                            .iter()
                            .find(|(_, i)| i.epoch == epoch)
                            .map(|(n, _)| n.clone())
                    })
                    .unwrap_or_default();
                let address = self
                    .view
                    .members
                    .get(&registered_node)
                    .map(|m| m.value.address.clone())
                    .unwrap_or_default();
                env.push(("CCMGR_CLUSTER_REGISTERED_NODE".to_owned(), registered_node));
                env.push(("CCMGR_CLUSTER_REGISTERED_ADDRESS".to_owned(), address));
                tokio::spawn(async move {
                    let cmd = spec.and_then(|s| s.notify_command).unwrap_or_default();
                    let result = local::run_command(&cmd, &env, COMMAND_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx
                        .send(Msg::Notified {
                            service: name,
                            epoch,
                            result,
                        })
                        .await;
                });
            }
            _ => self.clean(name),
        }
    }

    async fn write_notified(&mut self, service: &str, epoch: u64, result: Result<(), String>) {
        let ev = self.event_op(json!({
            "event": "notified",
            "service": service,
            "member": self.cfg.node,
            "ok": result.is_ok(),
            "error": result.err(),
        }));
        let txn = Txn::new().when(vec![self.while_member()]).and_then(vec![
            TxnOp::put(
                self.keys.notified(service, &self.cfg.node),
                epoch.to_string(),
                Some(PutOptions::new().with_lease(self.lease)),
            ),
            ev,
        ]);
        if let Err(e) = self.txn(txn).await {
            warn!("cannot record the notification of {service}: {e}");
        }
    }
}

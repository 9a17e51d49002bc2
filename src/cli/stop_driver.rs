//! The ordered stop `ccmgr stop` carries out itself when no coordinator can: the keeper died,
//! the coordinator is dead or wedged, or the segment is damaged.
//!
//! This module owns two things:
//! - the [`Inventory`]: every process the instance is known to run, gathered from every place
//!   that records one (the segment, the keeper's process record in `run_dir`, the cgroup tree
//!   the keeper recorded), each named by (pid, start time) so a recycled pid is never ours.
//!   Those places can be forged: every process in it is signalled only once
//!   [`crate::membership`] has proven it the instance's (start time, and its parent, cgroup,
//!   mapped segment or environment), through the pidfd that proof pinned; what is not proven
//!   is reported and left alone ([`Inventory::prove`]), and the cgroup record is used only if
//!   it names the instance's own cgroup;
//! - the small driver of [`Engine::stopping`] (the one ordered stop, the same engine the
//!   coordinator runs): it carries out the engine's `Signal` and `Kill` actions on a service's
//!   process group only through that proof; it watches every service's pidfd at once (it is not their
//!   parent, so it learns *that* they ended, not how: the engine needs no more in a stop); and
//!   it feeds the engine a `Tick` at [`Engine::next_deadline`]. `Finished` ends it.
//!
//! Before driving, the parties are disarmed ([`disarm_parties`]): the keeper is frozen with
//! SIGSTOP (it then starts nothing, neither a service nor a new coordinator, and its dead
//! children stay unreaped, so a service's process group id stays its own while we kill the
//! rest of the group), the standby is killed before the coordinator so that it cannot take
//! over, then the coordinator. After the services, [`finish_parties`] kills the frozen keeper,
//! and [`remove_cgroups`] kills what escaped into the cgroups (daemons that called setsid) and
//! removes them. [`Inventory::survivors`] then says whether anything of the instance still
//! lives, which is what `stop` must prove before it says "stopped".

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;

use crate::cgroup::Tree;
use crate::config::{Config, OnFailure, ReadyKind, RestartPolicy};
use crate::engine::{Action, Engine, EngineParams, Event, ServiceParams, ServiceState, Time};
use crate::membership::{self, InstanceEvidence, Proven, Role};
use crate::process_identity::ProcessIdentity;
use crate::records::ProcessRecord;
use crate::shm::api::ControlSegment;
use crate::shm::{Deadline, Segment};
use crate::spawn::{self, ProcessExit};

/// How long the driver waits for a party it killed to be gone, and for the cgroups to empty.
const GRACE: Duration = Duration::from_secs(10);

/// A party of the instance other than a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Party {
    Keeper,
    Coordinator,
    Standby,
}

impl From<Party> for Role {
    fn from(party: Party) -> Role {
        match party {
            Party::Keeper => Role::Keeper,
            Party::Coordinator => Role::Coordinator,
            Party::Standby => Role::Standby,
        }
    }
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Party::Keeper => "the keeper",
            Party::Coordinator => "the coordinator",
            Party::Standby => "the standby",
        })
    }
}

/// Every process the instance is known to run, from every record of it.
#[derive(Debug)]
pub struct Inventory {
    /// The services, as the engine stops them (from the running stack's configuration, or,
    /// when the segment cannot be read, from the keeper's record alone).
    pub params: EngineParams,
    /// Per service (same index as `params.services`): its recorded main processes.
    pub services: Vec<Vec<ProcessIdentity>>,
    /// The keeper, coordinators and standbys recorded.
    pub parties: Vec<(Party, ProcessIdentity)>,
    /// The instance's cgroup tree as the keeper recorded it: (directory, cgroup path).
    pub cgroups: Option<(PathBuf, PathBuf)>,
    /// The keeper's process record was found and read.
    pub has_record: bool,
    /// No record named the parties, so `/proc` was searched for them (and for the processes
    /// whose environment names the instance): what is not found there does not live.
    pub searched_proc: bool,
    /// Processes of the instance found only by their environment (`CCMGR_INSTANCE`): a
    /// service or what it forked, when nothing recorded names it. Killed with the keeper.
    pub strays: Vec<ProcessIdentity>,
    /// What proves a recorded process the instance's (see [`crate::membership`]).
    pub evidence: InstanceEvidence,
}

/// Prints `line` on stderr unless this process already did: a refusal is found again at each
/// look at the records (a stop looks several times), and is said once.
fn say_once(line: String) {
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.contains(&line) {
        eprintln!("{line}");
        said.push(line);
    }
}

impl Inventory {
    /// Gathers what `segment` (if readable), its `config` and the records in `run_dir` say.
    /// With `config`, the services are the configured ones, in the configured order; without
    /// it, the record's services, stopped strictly one at a time in the order recorded (the
    /// shutdown order: dependents first).
    pub fn gather(
        instance: &str,
        segment: Option<&Segment>,
        config: Option<&Config>,
        run_dir: Option<&Path>,
    ) -> Inventory {
        let record = run_dir.and_then(|dir| {
            ProcessRecord::read(&crate::records::record_path(dir, instance))
                .inspect_err(|e| eprintln!("ccmgr: {e}"))
                .ok()
                .flatten()
        });
        let owner_uid = nix::unistd::geteuid().as_raw();
        let cgroups = run_dir
            .and_then(|dir| read_cgroup_record(dir, instance).map(|found| (dir, found)))
            .and_then(|(run_dir, (dir, path))| {
                match membership::prove_cgroup_record(instance, owner_uid, &dir, &path) {
                    Ok(()) => Some((dir, path)),
                    // Removed already (a stale record): nothing in it to kill.
                    Err(_) if !dir.exists() => None,
                    Err(why) => {
                        say_once(format!(
                            "ccmgr: the cgroup record {} names {}, which is not this instance's cgroup ({why}): not used",
                            Tree::record_path(run_dir, instance).display(),
                            dir.display()
                        ));
                        None
                    }
                }
            });
        let mut evidence = InstanceEvidence::new(instance, owner_uid);
        evidence.set_cgroup(cgroups.as_ref().map(|(_, path)| path.clone()));
        if let Some(config) = config {
            evidence.set_service_uids(
                config
                    .services
                    .iter()
                    .filter_map(|s| Some(s.user.as_ref()?.id)),
            );
        }
        evidence.set_segment_file(segment_file(run_dir, instance, segment));
        let params = match config {
            Some(config) => EngineParams::from_config(config),
            None => params_from_record(record.as_ref()),
        };
        let mut inventory = Inventory {
            services: vec![Vec::new(); params.services.len()],
            params,
            parties: Vec::new(),
            cgroups,
            has_record: record.is_some(),
            searched_proc: false,
            strays: Vec::new(),
            evidence,
        };
        if let Some(segment) = segment {
            inventory.add_segment(segment);
        }
        if let Some(record) = &record {
            inventory.add_record(record);
            // The segment and the record may be forged, or the record a moment behind (the
            // keeper writes it once a burst of changes settles): the parties are also looked
            // for by their command line, and the proof decides which are the instance's.
            inventory.search_proc(instance, false);
        } else {
            inventory.search_proc(instance, true);
        }
        inventory.settle_keeper();
        inventory
    }

    /// Proves a recorded keeper the instance's, so that its children are (see
    /// [`crate::membership`]): the first that proves is the one.
    fn settle_keeper(&mut self) {
        if self.evidence.keeper().is_some_and(|k| k.is_alive()) {
            return;
        }
        let keepers: Vec<ProcessIdentity> = self
            .parties
            .iter()
            .filter(|(p, _)| *p == Party::Keeper)
            .map(|&(_, w)| w)
            .collect();
        for who in keepers {
            if let Some(proven) = self.prove(who, Role::Keeper, "the keeper") {
                self.evidence.set_keeper(&proven);
                return;
            }
        }
    }

    /// `who`, proven the instance's process in `role` and pinned, or `None`: it is gone, or
    /// nothing ties it to the instance, which is said once (`recorded_as` names what the
    /// record says it is) and it is left alone.
    pub fn prove(&self, who: ProcessIdentity, role: Role, recorded_as: &str) -> Option<Proven> {
        match self.evidence.prove(who, role) {
            Ok(proven) => Some(proven),
            Err(e) if e.is_gone() => None,
            Err(e) => {
                say_once(format!(
                    "ccmgr: {}",
                    membership::refusal(who, recorded_as, &e)
                ));
                None
            }
        }
    }

    /// A live party of the instance in `role`, proven (the first recorded that proves).
    pub fn proven_party(&self, party: Party) -> Option<Proven> {
        self.parties
            .iter()
            .filter(|(p, _)| *p == party)
            .find_map(|&(p, who)| self.prove(who, p.into(), &p.to_string()))
    }

    /// Without the keeper's record nothing names the keeper, the coordinator and the standby
    /// (they run outside the services' cgroups), and with it the record may be behind or
    /// forged: find them in `/proc` by the command line
    /// they are started with (`--instance NAME internal ROLE`), and the processes whose
    /// environment names the instance (its services, and what they forked, on a machine
    /// without cgroups), the latter only `with_strays`. Only processes of our own user are
    /// considered: no other user's process can be a party of ours.
    fn search_proc(&mut self, instance: &str, with_strays: bool) {
        use std::os::unix::fs::MetadataExt as _;
        let me = std::process::id() as i32;
        let uid = nix::unistd::geteuid().as_raw();
        let marker = format!("CCMGR_INSTANCE={instance}");
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        self.searched_proc |= with_strays;
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let dir = entry.path();
            if pid == me || std::fs::metadata(&dir).map_or(true, |m| m.uid() != uid) {
                continue;
            }
            let Ok(who) = ProcessIdentity::of(pid) else {
                continue;
            };
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let party = match membership::internal_role_of(&cmdline, instance) {
                Some("keeper") => Some(Party::Keeper),
                Some("coordinator") => Some(Party::Coordinator),
                Some("standby") => Some(Party::Standby),
                _ => None,
            };
            if let Some(party) = party {
                self.add_party(party, who);
                continue;
            }
            if !with_strays {
                continue;
            }
            let environ = std::fs::read(dir.join("environ")).unwrap_or_default();
            if environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_bytes())
                && !self.strays.contains(&who)
            {
                self.strays.push(who);
            }
        }
    }

    /// Adds what the segment records (a damaged field is skipped: the other records remain).
    pub fn add_segment(&mut self, segment: &Segment) {
        for s in 0..self.services.len() {
            if let Ok(Some(who)) = segment.service_process(s) {
                self.add_service(s, who);
            }
        }
        if let Ok(status) = segment.instance_status() {
            for (party, who) in [
                (Party::Keeper, status.keeper),
                (Party::Coordinator, status.coordinator),
                (Party::Standby, status.standby),
            ] {
                if let Some(who) = who {
                    self.add_party(party, who);
                }
            }
        }
    }

    fn add_record(&mut self, record: &ProcessRecord) {
        for recorded in &record.services {
            match self
                .params
                .services
                .iter()
                .position(|p| p.id == recorded.id)
            {
                Some(s) => self.add_service(s, recorded.process.into()),
                // Not in the configuration the segment holds (it cannot be, unless the record
                // is of another run): still a process of the instance, stopped last.
                None => {
                    let s = self.params.services.len();
                    self.params.services.push(record_service_params(recorded));
                    self.params.shutdown_sequence.push(s);
                    self.params.startup_sequence.insert(0, s);
                    self.services.push(vec![recorded.process.into()]);
                }
            }
        }
        for (party, who) in [
            (Party::Keeper, record.keeper),
            (Party::Coordinator, record.coordinator),
            (Party::Standby, record.standby),
        ] {
            if let Some(who) = who {
                self.add_party(party, who.into());
            }
        }
    }

    fn add_service(&mut self, s: usize, who: ProcessIdentity) {
        if !self.services[s].contains(&who) {
            self.services[s].push(who);
        }
    }

    fn add_party(&mut self, party: Party, who: ProcessIdentity) {
        if !self.parties.iter().any(|&(_, p)| p == who) {
            self.parties.push((party, who));
        }
    }

    /// Merges what a later look found (a process started since the first one).
    pub fn merge(&mut self, later: Inventory) {
        for (s, whos) in later.services.into_iter().enumerate() {
            let Some(id) = later.params.services.get(s).map(|p| p.id.clone()) else {
                continue;
            };
            if let Some(mine) = self.params.services.iter().position(|p| p.id == id) {
                for who in whos {
                    self.add_service(mine, who);
                }
            }
        }
        for (party, who) in later.parties {
            self.add_party(party, who);
        }
        if self.cgroups.is_none() {
            self.cgroups = later.cgroups;
        }
        self.has_record |= later.has_record;
        self.searched_proc |= later.searched_proc;
        for who in later.strays {
            if !self.strays.contains(&who) {
                self.strays.push(who);
            }
        }
        self.settle_keeper();
    }

    /// The recorded processes that still live and are proven the instance's, named, services
    /// first in shutdown order. (One that is not proven is reported, and is no survivor of
    /// the instance: a forged record cannot make `stop` fail for ever.)
    pub fn survivors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for &s in &self.params.shutdown_sequence {
            let id = &self.params.services[s].id;
            let recorded_as = format!("service `{id}`");
            for &who in &self.services[s] {
                if self.prove(who, Role::Service, &recorded_as).is_some() {
                    out.push(format!("service `{id}` (pid {})", who.pid));
                }
            }
        }
        for (party, proven) in self.live_parties() {
            out.push(format!("{party} (pid {})", proven.identity().pid));
        }
        for &who in self.strays.iter().filter(|&&w| {
            self.prove(w, Role::Service, "a process of the instance")
                .is_some()
        }) {
            out.push(format!(
                "process {} (its environment names the instance)",
                who.pid
            ));
        }
        if let Some((dir, _)) = &self.cgroups {
            if cgroup_populated(dir) {
                out.push(format!("processes in the cgroup {}", dir.display()));
            }
        }
        out
    }

    /// The live recorded parties, proven the instance's.
    pub fn live_parties(&self) -> Vec<(Party, Proven)> {
        self.parties
            .iter()
            .filter_map(|&(party, who)| {
                self.prove(who, party.into(), &party.to_string())
                    .map(|p| (party, p))
            })
            .collect()
    }
}

/// The engine's view of the record's services: no dependencies are known, so they are stopped
/// strictly one at a time in the order recorded, which is the shutdown order.
fn params_from_record(record: Option<&ProcessRecord>) -> EngineParams {
    let services: Vec<ServiceParams> = record
        .map(|r| r.services.iter().map(record_service_params).collect())
        .unwrap_or_default();
    let n = services.len();
    let longest: Duration = services.iter().map(|s| s.shutdown_timeout).sum();
    EngineParams {
        services,
        startup_sequence: (0..n).rev().collect(),
        shutdown_sequence: (0..n).collect(),
        explicit_startup: true,
        explicit_shutdown: true,
        on_failure: OnFailure::RestartDependents,
        restart_retry_counter: 0,
        restart_time_span: Duration::ZERO,
        startup_timeout: Duration::ZERO,
        // One after another, each within its own timeout.
        shutdown_timeout: longest + GRACE,
    }
}

fn record_service_params(recorded: &crate::records::RecordedService) -> ServiceParams {
    ServiceParams {
        id: recorded.id.clone(),
        ready: ReadyKind::Started,
        restart: RestartPolicy::Never,
        startup_timeout: Duration::ZERO,
        shutdown_timeout: Duration::from_millis(recorded.shutdown_timeout_ms),
        stop_signal: Signal::try_from(recorded.stop_signal).unwrap_or(Signal::SIGTERM),
        restart_delay: Duration::ZERO,
        restart_delay_max: Duration::ZERO,
        min_uptime: Duration::ZERO,
        dependencies: Vec::new(),
        dependents: Vec::new(),
        cooperative: false,
    }
}

/// The cgroup tree the keeper recorded (`dir` and `path`, a line each), if any.
fn read_cgroup_record(run_dir: &Path, instance: &str) -> Option<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(Tree::record_path(run_dir, instance)).ok()?;
    let mut lines = text.lines();
    Some((lines.next()?.into(), lines.next()?.into()))
}

/// Whether a process lives in the instance's cgroups as the keeper recorded them (a daemon
/// that escaped its service's process group with setsid is found there and nowhere else).
pub fn cgroups_populated(run_dir: &Path, instance: &str) -> bool {
    read_cgroup_record(run_dir, instance).is_some_and(|(dir, _)| cgroup_populated(&dir))
}

/// Whether any process is in the cgroup at `dir` or below it.
fn cgroup_populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|text| {
        text.lines()
            .any(|line| line.split_whitespace().eq(["populated", "1"]))
    })
}

/// The device and inode of the instance's segment file: of the one open, else of the file at
/// the segment's name (a damaged segment the keeper still maps).
fn segment_file(
    run_dir: Option<&Path>,
    instance: &str,
    segment: Option<&Segment>,
) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    if let Some(id) = segment.and_then(|s| s.file_id().ok()) {
        return Some(id);
    }
    let path = crate::shm::segment_path(run_dir?, instance).ok()?;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Kills the proven process and waits for it to end; true if it is gone.
fn kill_and_wait(proven: &Proven) -> bool {
    let _ = proven.signal(Signal::SIGKILL);
    spawn::wait_pidfd(proven.pidfd(), GRACE).unwrap_or(false)
}

/// Keeps the parties from acting while the driver stops the services: freezes the keeper (it
/// then starts nothing, and the services that end stay its unreaped zombies, so their process
/// group ids stay theirs), then kills the standby (so it cannot take over) and the coordinator.
/// Says what it did.
pub fn disarm_parties(inventory: &Inventory) {
    let live = inventory.live_parties();
    for (party, proven) in live.iter().filter(|(p, _)| *p == Party::Keeper) {
        if proven.signal(Signal::SIGSTOP).is_ok() {
            eprintln!(
                "ccmgr: froze {party} (pid {}) so that it starts nothing meanwhile",
                proven.identity().pid
            );
        }
    }
    for wanted in [Party::Standby, Party::Coordinator] {
        for (party, proven) in live.iter().filter(|(p, _)| *p == wanted) {
            let pid = proven.identity().pid;
            if kill_and_wait(proven) {
                eprintln!("ccmgr: killed {party} (pid {pid})");
            } else {
                eprintln!("ccmgr: {party} (pid {pid}) did not die of SIGKILL");
            }
        }
    }
}

/// Kills the frozen keeper once the services are down (SIGKILL ends a stopped process too).
pub fn finish_parties(inventory: &Inventory) {
    for (party, proven) in inventory.live_parties() {
        if kill_and_wait(&proven) {
            eprintln!("ccmgr: killed {party} (pid {})", proven.identity().pid);
        }
    }
    // Nothing names their service or order (the record is lost): they go last, at once.
    for &who in &inventory.strays {
        let Some(proven) = inventory.prove(who, Role::Service, "a process of the instance") else {
            continue;
        };
        if kill_and_wait(&proven) {
            eprintln!(
                "ccmgr: killed process {} (its environment names the instance; no record names its service)",
                who.pid
            );
        }
    }
}

/// Kills what is left in the instance's recorded cgroups (daemons that escaped their process
/// group with setsid) and removes the cgroups and their record. Says what it found; true if
/// it killed something.
pub fn remove_cgroups(inventory: &Inventory, run_dir: Option<&Path>, instance: &str) -> bool {
    let mut killed = false;
    if let Some((dir, path)) = &inventory.cgroups {
        if dir.is_dir() {
            let had_processes = cgroup_populated(dir);
            killed = had_processes;
            match Tree::existing(dir, path).remove(GRACE) {
                Ok(()) if had_processes => println!(
                    "ccmgr: killed what was left in the instance's cgroups and removed them ({})",
                    dir.display()
                ),
                Ok(()) => println!("ccmgr: removed the instance's cgroups {}", dir.display()),
                Err(e) => eprintln!("ccmgr: {e}"),
            }
        }
    }
    if let Some(run_dir) = run_dir {
        let record = Tree::record_path(run_dir, instance);
        if !inventory.cgroups.as_ref().is_some_and(|(d, _)| d.exists()) {
            let _ = std::fs::remove_file(record);
        }
    }
    killed
}

/// What one service's process is to the driver.
struct Watched {
    proven: Proven,
    /// The signal last sent and when, for the progress line.
    signalled: Option<(Signal, Instant)>,
}

/// Stops the inventory's services in shutdown order with [`Engine::stopping`]; returns how
/// many processes it stopped. Prints a line per service stopped; while it waits, and when
/// stderr is a terminal, says each second what it waits for.
/// The service API's files are looked for in `run_dir`.
pub fn stop_services(inventory: &Inventory, instance: &str, run_dir: Option<&Path>) -> usize {
    let n = inventory.params.services.len();
    let mut watched: Vec<Option<Watched>> = (0..n).map(|_| None).collect();
    // A second live process recorded for a service (the segment and the record disagree): it
    // is killed once the ordered stop is over.
    let mut extras: Vec<(usize, Proven)> = Vec::new();
    for (s, whos) in inventory.services.iter().enumerate() {
        let recorded_as = format!("service `{}`", inventory.params.services[s].id);
        for &who in whos {
            let Some(proven) = inventory.prove(who, Role::Service, &recorded_as) else {
                continue;
            };
            if watched[s].is_none() {
                watched[s] = Some(Watched {
                    proven,
                    signalled: None,
                });
            } else {
                extras.push((s, proven));
            }
        }
    }
    let running: Vec<Option<i32>> = watched
        .iter()
        .map(|w| w.as_ref().map(|w| w.proven.identity().pid))
        .collect();
    let found = running.iter().flatten().count();
    if found == 0 && extras.is_empty() {
        return 0;
    }
    let params = &inventory.params;
    let epoch = Instant::now();
    let now = || epoch.elapsed();
    let (mut engine, mut actions) = Engine::stopping(params.clone(), now(), &running);
    let mut gate = None;
    let progress = super::stderr_is_terminal();
    let mut last_progress = Instant::now();
    let mut stopped = 0;
    loop {
        let mut finished = false;
        while !actions.is_empty() {
            let mut more = Vec::new();
            for action in actions.drain(..) {
                match action {
                    Action::Signal { service, signal } => {
                        signal_service(&mut watched[service], signal, false);
                    }
                    Action::Kill { service } => {
                        let id = &params.services[service].id;
                        eprintln!(
                            "ccmgr: service `{id}` did not stop within {:?}: killing it",
                            params.services[service].shutdown_timeout
                        );
                        signal_service(&mut watched[service], Signal::SIGKILL, true);
                    }
                    Action::ShutdownRequested { services } => {
                        more.extend(ask_api_services(
                            &mut gate,
                            run_dir,
                            instance,
                            &services,
                            &mut engine,
                        ));
                    }
                    Action::Finished(_) => finished = true,
                    // Nothing starts in a stop; the gate closes when the driver drops it.
                    Action::Spawn { .. } | Action::ShutdownOver | Action::StartupComplete => {}
                }
            }
            actions = more;
        }
        if finished || engine.is_finished() {
            break;
        }
        // Wait for any watched process to end, the engine's next deadline, or the progress
        // line's next refresh.
        let mut wait = engine
            .next_deadline()
            .map(|d| d.saturating_sub(now()))
            .unwrap_or(GRACE);
        if progress {
            wait = wait.min(Duration::from_secs(1));
        }
        let live: Vec<usize> = (0..n)
            .filter(|&s| watched[s].is_some() && engine.slots()[s].pid().is_some())
            .collect();
        let mut fds: Vec<PollFd> = live
            .iter()
            .map(|&s| {
                let w = watched[s].as_ref().expect("filtered on is_some");
                PollFd::new(w.proven.pidfd(), PollFlags::POLLIN)
            })
            .collect();
        let ms = PollTimeout::try_from(wait.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let ready = match poll(&mut fds, ms) {
            Ok(_) => fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect::<Vec<bool>>(),
            Err(Errno::EINTR) => vec![false; live.len()],
            Err(e) => {
                eprintln!("ccmgr: cannot wait for the services: {e}");
                break;
            }
        };
        drop(fds);
        for (&s, ended) in live.iter().zip(ready) {
            if !ended {
                continue;
            }
            let w = watched[s].as_mut().expect("watched");
            let who = w.proven.identity();
            // What it left in its group goes too: while it is an unreaped zombie (the keeper
            // is frozen or dead, and init reaps at once; see the module doc) or its group has
            // members, its group id cannot have been reused by anyone else.
            let _ = w.proven.signal_group(Signal::SIGKILL);
            stopped += 1;
            println!(
                "ccmgr: stopped `{}` (pid {})",
                params.services[s].id, who.pid
            );
            // The driver is not the parent: how it ended is unknown, and a stop needs only
            // that it ended.
            let exit = ProcessExit::Exited(0);
            actions.extend(engine.handle(Event::Exited { service: s, exit }, now()));
        }
        if engine.next_deadline().is_some_and(|d: Time| d <= now()) {
            actions.extend(engine.handle(Event::Tick, now()));
        }
        if progress && last_progress.elapsed() >= Duration::from_millis(900) {
            last_progress = Instant::now();
            if let Some(line) = driver_progress(&engine, &watched, now()) {
                eprint!("\r\x1b[K{line}");
            }
        }
    }
    if progress {
        eprint!("\r\x1b[K");
    }
    for (s, proven) in extras {
        if kill_and_wait(&proven) {
            let _ = proven.signal_group(Signal::SIGKILL);
            stopped += 1;
            println!(
                "ccmgr: killed a second process of `{}` (pid {})",
                params.services[s].id,
                proven.identity().pid
            );
        }
    }
    drop(gate);
    stopped
}

/// Sends `signal` to the service's proven process (through its pidfd) and its group, unless
/// it has ended.
fn signal_service(watched: &mut Option<Watched>, signal: Signal, kill: bool) {
    let Some(w) = watched.as_mut() else { return };
    if w.proven.has_ended() {
        return;
    }
    let _ = w.proven.signal(signal);
    let _ = w.proven.signal_group(signal);
    if !kill {
        w.signalled = Some((signal, Instant::now()));
    }
}

/// The services of the service API stop themselves, in shutdown order, once asked through
/// its control segment: take the daemon component (its holder, the coordinator, is dead) and
/// release it asking them. A service that never registered is stopped by its signal instead.
fn ask_api_services(
    gate: &mut Option<crate::shm::api::DaemonComponentHolder>,
    run_dir: Option<&Path>,
    instance: &str,
    services: &[usize],
    engine: &mut Engine,
) -> Vec<Action> {
    if gate.is_none() {
        let control = run_dir.and_then(|dir| ControlSegment::open(dir, instance).ok());
        *gate = control.and_then(|c| {
            c.hold_daemon_component(Deadline::after(Duration::from_secs(5)))
                .ok()
        });
    }
    let mut actions = Vec::new();
    let mut asked = Vec::new();
    for &s in services {
        let registered = gate
            .as_ref()
            .and_then(|g| g.control().component_registered(s).ok().flatten())
            == Some(true);
        if registered {
            asked.push(s);
        } else {
            actions.extend(engine.not_cooperative(s));
        }
    }
    if let Some(g) = gate.as_mut() {
        if !asked.is_empty() && g.release_for_shutdown(&asked).is_ok() {
            eprintln!("ccmgr: asked the services that use the service API to shut down in order");
        }
    }
    actions
}

/// "waiting for b: SIGTERM sent 3 s ago, SIGKILL in 2 s", for the first service stopping.
fn driver_progress(engine: &Engine, watched: &[Option<Watched>], now: Time) -> Option<String> {
    let params = engine.params();
    let parts: Vec<String> = engine
        .slots()
        .iter()
        .enumerate()
        .filter(|(_, slot)| slot.state() == ServiceState::Stopping && slot.pid().is_some())
        .map(|(s, slot)| {
            let p = &params.services[s];
            let ago = now.saturating_sub(slot.since);
            let signal = watched[s].as_ref().and_then(|w| w.signalled).map_or_else(
                || "asked to stop".to_owned(),
                |(sig, _)| sig.as_str().to_owned() + " sent",
            );
            waiting_line(&p.id, &signal, ago, p.shutdown_timeout)
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// One service's part of a progress line.
pub fn waiting_line(id: &str, what: &str, ago: Duration, timeout: Duration) -> String {
    let left = timeout.saturating_sub(ago);
    format!(
        "waiting for {id}: {what} {} s ago, SIGKILL in {} s",
        ago.as_secs(),
        left.as_secs_f64().ceil() as u64
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Recorded, RecordedService};

    #[test]
    fn a_record_alone_gives_the_services_in_its_order_one_at_a_time() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        // This test process stands for the keeper, a child of it for the service `web`, and
        // another for a process the record names but nothing ties to the instance.
        let me = ProcessIdentity::current().unwrap();
        let mut web = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let web_id = ProcessIdentity::of(web.id() as i32).unwrap();
        let gone = Recorded {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        let service = |id: &str, process| RecordedService {
            id: id.into(),
            process,
            stop_signal: Signal::SIGINT as i32,
            shutdown_timeout_ms: 1500,
        };
        ProcessRecord {
            keeper: Some(me.into()),
            coordinator: Some(gone),
            standby: None,
            services: vec![service("web", web_id.into()), service("db", gone)],
        }
        .write(&crate::records::record_path(dir.path(), "rec"))
        .unwrap();
        let mut inventory = Inventory::gather("rec", None, None, Some(dir.path()));
        let ids: Vec<&str> = inventory
            .params
            .services
            .iter()
            .map(|s| s.id.as_str())
            .collect();
        assert_eq!(ids, ["web", "db"]);
        assert_eq!(inventory.params.shutdown_sequence, [0, 1]);
        assert!(inventory.params.explicit_shutdown);
        assert_eq!(inventory.params.services[0].stop_signal, Signal::SIGINT);
        assert_eq!(
            inventory.params.services[0].shutdown_timeout,
            Duration::from_millis(1500)
        );
        // No segment, and this process's command line is no keeper's: nothing is proven, so
        // nothing is a survivor (nor would be signalled).
        assert_eq!(inventory.survivors(), Vec::<String>::new());
        // As if this process mapped the instance's segment (it maps its own executable).
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        inventory
            .evidence
            .set_segment_file(Some((exe.dev(), exe.ino())));
        inventory.settle_keeper();
        assert_eq!(
            inventory.survivors(),
            [
                format!("service `web` (pid {})", web_id.pid),
                format!("the keeper (pid {})", me.pid)
            ]
        );
        let _ = web.kill();
        web.wait().unwrap();
    }

    #[test]
    fn the_progress_line_says_what_was_sent_and_when_the_kill_comes() {
        assert_eq!(
            waiting_line(
                "web",
                "SIGTERM sent",
                Duration::from_millis(3200),
                Duration::from_secs(10)
            ),
            "waiting for web: SIGTERM sent 3 s ago, SIGKILL in 7 s"
        );
    }
}

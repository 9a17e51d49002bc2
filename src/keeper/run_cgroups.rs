//! The keeper's cgroup per run of a service: `<instance cgroup>/<service id>.<run>`.
//!
//! Each run of a service gets a fresh cgroup ([`cgroup::run_name`]), made right before its
//! spawn, and its main process is born in it (`clone3` with `CLONE_INTO_CGROUP`) instead of
//! moving itself in: a move waits for the kernel's cgroup thread-group lock (an RCU grace
//! period, 1 to 20 ms), which was most of a restart's time. A fresh cgroup per run, rather than
//! one per service, because a cgroup that `cgroup.kill` ever reached kills every child born in
//! it (Linux 6.14 and later compare its kill count with that of the parent's cgroup; see
//! [`spawn::born_in_cgroup_works`]), and the keeper kills a run's cgroup when its main process
//! ends (what the service left behind dies with it).
//!
//! This module owns the names of the current runs' cgroups, the counter that names them, and
//! the removal of the cgroups of ended runs: at once when the kill left nothing, else when
//! their `cgroup.events` says they emptied (inotify, in the keeper's epoll set: no polling,
//! no wakeup while nothing happens). Where the kernel cannot give birth into a cgroup (a probe
//! at start says so), services are forked and move into their run's cgroup as before.
//!
//! Everything that proves a pid belongs to the instance (`stop`, `status`, the pid proofs)
//! looks at the instance's cgroup and below, never at a service's cgroup by name, so the
//! per-run names change nothing there.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::cgroup::{self, RunCgroup, Tree};
use crate::spawn;

/// The name of the cgroup the start-time probe gives birth in (a leading `.`, which no
/// service id may have).
const PROBE_CGROUP: &str = ".probe";

/// The cgroups of the services' runs (see the module doc).
pub struct RunCgroups {
    /// Children can be born in a fresh cgroup here (the probe at start said so).
    born_in_cgroup: bool,
    /// Runs so far: the number in each run's cgroup name, unique for the keeper's life.
    runs: u64,
    /// The cgroup of each service's current run (by service index), until its main process
    /// has ended and the cgroup was killed.
    current: Vec<Option<String>>,
    /// Notifications of the `cgroup.events` of ended runs' cgroups that still held processes.
    inotify: Option<Inotify>,
    /// Which cgroup each watch is on.
    draining: HashMap<WatchDescriptor, String>,
}

impl RunCgroups {
    /// For `services` services, in `tree` (where the machine offers one): probes whether
    /// children can be born in a cgroup, and sets up the watch of ended runs' cgroups.
    pub fn new(tree: Option<&Tree>, services: usize) -> RunCgroups {
        let born_in_cgroup = tree.is_some_and(probe);
        let inotify = tree.and_then(|_| ended_runs_watch());
        info!(
            born_in_cgroup,
            "services are {} their cgroups",
            if born_in_cgroup {
                "born in"
            } else {
                "moved into"
            }
        );
        RunCgroups {
            born_in_cgroup,
            runs: 0,
            current: vec![None; services],
            inotify,
            draining: HashMap::new(),
        }
    }

    /// The fd to watch for readability: the `cgroup.events` of an ended run's cgroup changed.
    pub fn events_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    /// Makes and opens the cgroup of `service`'s next run (whose id is `id`). A name taken by
    /// a cgroup that still holds processes (a keeper that took over a tree whose services
    /// run on) is skipped for the next number.
    pub fn open_next(&mut self, tree: &Tree, id: &str) -> Result<RunCgroup, cgroup::CgroupError> {
        let mut tries = 0;
        loop {
            self.runs += 1;
            tries += 1;
            match tree.open_run(&cgroup::run_name(id, self.runs)) {
                Err(cgroup::CgroupError::Create { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists && tries < 1000 => {}
                other => return other,
            }
        }
    }

    /// Whether a child may be born in a [`RunCgroup`] (else it moves in through `procs`).
    pub fn born_in_cgroup(&self) -> bool {
        self.born_in_cgroup
    }

    /// `service`'s run now runs in the cgroup `name`.
    pub fn started(&mut self, service: usize, name: String) {
        if let Some(slot) = self.current.get_mut(service) {
            *slot = Some(name);
        }
    }

    /// The cgroup of `service`'s current run.
    pub fn current(&self, service: usize) -> Option<&str> {
        self.current.get(service).and_then(|c| c.as_deref())
    }

    /// `service`'s main process ended: its run's cgroup, which is no longer current, for the
    /// caller to kill and [`retire`](RunCgroups::retire).
    pub fn ended(&mut self, service: usize) -> Option<String> {
        self.current.get_mut(service).and_then(Option::take)
    }

    /// Removes the cgroup `name` of an ended run (killed already, or never used) once it is
    /// empty: now if it is, else when its `cgroup.events` says so.
    pub fn retire(&mut self, tree: &Tree, name: String) {
        match tree.remove_if_empty(&name) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, cgroup = %name, "cannot remove an ended run's cgroup");
                return;
            }
        }
        let Some(inotify) = &self.inotify else {
            return;
        };
        match inotify.add_watch(&tree.events_path(&name), AddWatchFlags::IN_MODIFY) {
            Ok(wd) => {
                // It may have emptied before the watch was in place.
                if tree.remove_if_empty(&name).unwrap_or(false) {
                    let _ = inotify.rm_watch(wd);
                } else {
                    self.draining.insert(wd, name);
                }
            }
            Err(e) => debug!(error = %e, cgroup = %name, "cannot watch an ended run's cgroup"),
        }
    }

    /// The `cgroup.events` of some ended runs' cgroups changed: removes those now empty.
    pub fn on_events(&mut self, tree: Option<&Tree>) {
        let Some(inotify) = &self.inotify else {
            return;
        };
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The cgroup is gone (removed here, or with the whole tree).
                    self.draining.remove(&event.wd);
                    continue;
                }
                let Some(name) = self.draining.get(&event.wd) else {
                    continue;
                };
                match tree.map(|t| t.remove_if_empty(name)) {
                    Some(Ok(false)) => {}
                    Some(Err(e)) => {
                        warn!(error = %e, cgroup = %name, "cannot remove an ended run's cgroup");
                        let _ = inotify.rm_watch(event.wd);
                        self.draining.remove(&event.wd);
                    }
                    // Removed (its watch ends with it, IN_IGNORED), or no tree any more.
                    Some(Ok(true)) | None => {
                        self.draining.remove(&event.wd);
                    }
                }
            }
        }
    }

    /// The per-service table under a reload's new indices (`to_new[old] = new`), for `n`
    /// services.
    pub fn remap(&mut self, to_new: &[Option<usize>], n: usize) {
        let mut current = vec![None; n];
        for (i, j) in to_new.iter().enumerate() {
            if let (Some(j), Some(name)) = (*j, self.current.get_mut(i)) {
                current[j] = name.take();
            }
        }
        self.current = current;
    }
}

/// The inotify instance that watches the `cgroup.events` of ended runs' cgroups; without one
/// they stay until the stack stops.
fn ended_runs_watch() -> Option<Inotify> {
    Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .inspect_err(
            |e| warn!(error = %e, "no inotify: the cgroups of ended runs stay until the stack stops"),
        )
        .ok()
}

/// What of [`RunCgroups`] crosses `ccmgr upgrade`'s exec (the inotify fd does not: the new
/// image watches the draining cgroups again).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunCgroupsState {
    pub born_in_cgroup: bool,
    pub runs: u64,
    pub current: Vec<Option<String>>,
    pub draining: Vec<String>,
}

impl RunCgroups {
    /// The state to hand across the exec.
    pub fn to_state(&self) -> RunCgroupsState {
        RunCgroupsState {
            born_in_cgroup: self.born_in_cgroup,
            runs: self.runs,
            current: self.current.clone(),
            draining: self.draining.values().cloned().collect(),
        }
    }

    /// Rebuilt by a new image from `state`; without one (a keeper from before cgroups per
    /// run, whose services each ran in a cgroup named after the service), the probe is run
    /// again and each service's current run is its service-named cgroup where one exists, so
    /// that its end still kills what it left.
    pub fn resume(tree: Option<&Tree>, state: Option<RunCgroupsState>, ids: &[&str]) -> RunCgroups {
        let Some(state) = state else {
            let mut fresh = RunCgroups::new(tree, ids.len());
            if let Some(tree) = tree {
                for (slot, id) in fresh.current.iter_mut().zip(ids) {
                    if tree.path().join(id).is_dir() {
                        *slot = Some((*id).to_string());
                    }
                }
            }
            return fresh;
        };
        let inotify = tree.and_then(|_| ended_runs_watch());
        let mut current = state.current;
        current.resize(ids.len(), None);
        let mut resumed = RunCgroups {
            born_in_cgroup: state.born_in_cgroup,
            runs: state.runs,
            current,
            inotify,
            draining: HashMap::new(),
        };
        if let Some(tree) = tree {
            for name in state.draining {
                resumed.retire(tree, name);
            }
        }
        resumed
    }
}

/// Whether a child born in a fresh cgroup of `tree` lives (see
/// [`spawn::born_in_cgroup_works`]); the probe's cgroup is removed again.
fn probe(tree: &Tree) -> bool {
    let run = match tree.open_run(PROBE_CGROUP) {
        Ok(run) => run,
        Err(e) => {
            debug!(error = %e, "cannot make the probe's cgroup");
            return false;
        }
    };
    let works = spawn::born_in_cgroup_works(run.dir.as_fd());
    drop(run);
    if let Err(e) = tree.remove_if_empty(PROBE_CGROUP) {
        debug!(error = %e, "cannot remove the probe's cgroup");
    }
    works
}

//! Stale state: whether anyone still uses an instance's segment ([`Segment::probe`]: a live
//! coordinator, a live `ccmgr start`, or [`Survivor`]s among the recorded processes), and
//! its removal once nobody does ([`Segment::reclaim_stale`]), which `ccmgr start` uses to
//! replace the segment of a crashed run. Apart because it decides from the robust mutexes
//! and the recorded process identities whether a segment may go, which nothing else does.
//! No unsafe code.

use std::fmt;
use std::sync::atomic::Ordering;

use super::error::ShmError;
use super::robust::{MutexError, MutexGuard};
use super::segment::{Segment, SegmentSpec, identity};
use super::state::MutexId;
use super::state_dir::DirTrustError;
use crate::process_identity::ProcessIdentity;

/// A party of the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `ccmgr start`.
    Manager,
    /// The coordinator.
    Coordinator,
    /// The standby.
    Standby,
    /// The keeper, parent of every process of the instance.
    Keeper,
    /// Service `n`.
    Service(usize),
}

/// A live process found by [`Segment::probe`] when no coordinator lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survivor {
    /// What it is to the instance.
    pub role: Role,
    /// Its identity (the probe finds survivors by their recorded identities).
    pub process: Option<ProcessIdentity>,
}

impl fmt::Display for Survivor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Role::Manager => f.write_str("ccmgr start")?,
            Role::Coordinator => f.write_str("the former coordinator")?,
            Role::Standby => f.write_str("the standby")?,
            Role::Keeper => f.write_str("the keeper")?,
            Role::Service(n) => write!(f, "service #{n}")?,
        }
        match self.process {
            Some(p) => write!(f, " (pid {})", p.pid),
            None => f.write_str(" (pid not recorded)"),
        }
    }
}

/// What [`Segment::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No segment.
    Absent,
    /// A live coordinator holds the daemon mutex.
    Live {
        /// The coordinator, if it has recorded itself and is alive.
        coordinator: Option<ProcessIdentity>,
    },
    /// A live `ccmgr start` holds the manager mutex.
    Starting {
        /// The manager, if recorded and alive.
        manager: Option<ProcessIdentity>,
    },
    /// No coordinator, but recorded processes of the instance live.
    Abandoned {
        /// Those processes.
        survivors: Vec<Survivor>,
    },
    /// No process of the instance lives: the segment may be removed.
    Stale,
}

/// What [`Segment::reclaim_stale`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reclaimed {
    /// There was no segment.
    Absent,
    /// A stale segment was removed.
    Removed,
}

impl Segment {
    /// Create the segment; if one exists, reclaim it when it is stale and
    /// create again. This is what `ccmgr start` does: it refuses with
    /// [`ShmError::AlreadyRunning`] when a live coordinator holds the instance.
    pub fn create_reclaiming_stale(spec: &SegmentSpec) -> Result<(Segment, MutexGuard), ShmError> {
        match Self::create(spec) {
            Err(ShmError::AlreadyExists { .. }) => {
                Self::reclaim_stale(&spec.run_dir, &spec.instance)?;
                Self::create(spec)
            }
            other => other,
        }
    }

    /// The recorded manager, coordinator, standby and keeper.
    fn recorded_parties(&self) -> Result<[(Role, Option<ProcessIdentity>); 4], ShmError> {
        let inst = self.instance_record();
        let r = Ordering::Relaxed;
        let (m, mt, c, ct, s, st, k, kt) = self.read_consistent(|| {
            (
                inst.manager_pid.load(r),
                inst.manager_start_time.load(r),
                inst.coordinator_pid.load(r),
                inst.coordinator_start_time.load(r),
                inst.standby_pid.load(r),
                inst.standby_start_time.load(r),
                inst.keeper_pid.load(r),
                inst.keeper_start_time.load(r),
            )
        })?;
        Ok([
            (Role::Manager, identity(m, mt)),
            (Role::Coordinator, identity(c, ct)),
            (Role::Standby, identity(s, st)),
            (Role::Keeper, identity(k, kt)),
        ])
    }

    // ----- stale state -------------------------------------------------------

    /// Find out who, if anyone, still uses `instance`'s segment in `run_dir`. The probe
    /// try-locks the manager, daemon and component mutexes and releases every
    /// one before returning (a mutex whose holder died is made consistent by
    /// this, so the owner-died notice is consumed).
    pub fn probe(run_dir: &std::path::Path, instance: &str) -> Result<Probe, ShmError> {
        let seg = match Self::open(run_dir, instance) {
            Ok(seg) => seg,
            Err(ShmError::NotFound { .. })
            | Err(ShmError::UntrustedDir(DirTrustError::Missing { .. })) => {
                return Ok(Probe::Absent);
            }
            Err(e) => return Err(e),
        };
        let (probe, held) = seg.examine()?;
        drop(held);
        Ok(probe)
    }

    /// The probe proper. On `Stale` it returns the manager and daemon locks it
    /// took, so that the caller can act before anyone else concludes the same.
    fn examine(&self) -> Result<(Probe, Vec<MutexGuard>), ShmError> {
        let parties = self.recorded_parties()?;
        let alive = |role: Role| {
            parties
                .iter()
                .find(|(r, _)| *r == role)
                .and_then(|(_, p)| *p)
                .filter(ProcessIdentity::is_alive)
        };
        let mut held = Vec::new();
        for id in [MutexId::Manager, MutexId::Daemon] {
            match self.mutex(id)?.try_lock() {
                Ok(Some(guard)) => held.push(guard),
                Ok(None) => {
                    // A live thread holds it.
                    drop(held);
                    return Ok((
                        if id == MutexId::Manager {
                            Probe::Starting {
                                manager: alive(Role::Manager),
                            }
                        } else {
                            Probe::Live {
                                coordinator: alive(Role::Coordinator),
                            }
                        },
                        Vec::new(),
                    ));
                }
                // Unusable, so no one holds it: let the identities decide.
                Err(MutexError::NotRecoverable) => {}
                Err(e) => return Err(self.mutex_error(id, e)),
            }
        }
        let mut survivors: Vec<Survivor> = parties
            .iter()
            .filter_map(|(role, p)| {
                p.filter(ProcessIdentity::is_alive).map(|p| Survivor {
                    role: *role,
                    process: Some(p),
                })
            })
            .collect();
        for i in 0..self.service_count() {
            let recorded = self.service_process(i)?.filter(ProcessIdentity::is_alive);
            if recorded.is_some() {
                survivors.push(Survivor {
                    role: Role::Service(i),
                    process: recorded,
                });
            }
        }
        if survivors.is_empty() {
            Ok((Probe::Stale, held))
        } else {
            drop(held);
            Ok((Probe::Abandoned { survivors }, Vec::new()))
        }
    }

    /// Remove `instance`'s segment in `run_dir` if it is stale (every process that used it
    /// is dead). Refuses with [`ShmError::AlreadyRunning`] while a coordinator
    /// lives, [`ShmError::BeingStarted`] during a start, and
    /// [`ShmError::StillInUse`] while other recorded processes live. A segment
    /// that fails the checks of [`open`](Self::open) is not touched.
    pub fn reclaim_stale(run_dir: &std::path::Path, instance: &str) -> Result<Reclaimed, ShmError> {
        let seg = match Self::open(run_dir, instance) {
            Ok(seg) => seg,
            Err(ShmError::NotFound { .. })
            | Err(ShmError::UntrustedDir(DirTrustError::Missing { .. })) => {
                return Ok(Reclaimed::Absent);
            }
            Err(e) => return Err(e),
        };
        let (probe, held) = seg.examine()?;
        match probe {
            Probe::Stale => {
                // Unlink while holding the old segment's manager and daemon
                // mutexes: a concurrent reclaimer of the same old segment waits
                // for us, then finds the name gone or naming a new segment.
                let removed = seg.unlink()?;
                drop(held);
                tracing::info!(instance, removed, "reclaimed a stale segment");
                Ok(if removed {
                    Reclaimed::Removed
                } else {
                    Reclaimed::Absent
                })
            }
            Probe::Live { coordinator } => Err(ShmError::AlreadyRunning {
                instance: instance.to_owned(),
                coordinator_pid: coordinator.map(|c| c.pid),
            }),
            Probe::Starting { manager } => Err(ShmError::BeingStarted {
                instance: instance.to_owned(),
                manager_pid: manager.map(|m| m.pid),
            }),
            Probe::Abandoned { survivors } => Err(ShmError::StillInUse {
                instance: instance.to_owned(),
                survivors: survivors
                    .iter()
                    .map(Survivor::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            Probe::Absent => Ok(Reclaimed::Absent),
        }
    }
}

//! The control segment from the services' side ([`ControlView`]): mapped read-only, it is
//! where a service reads every decision of the shutdown protocol (the gate's epochs, the
//! daemon component word, who is asked to stop) and sleeps on its futex words. Apart because
//! it runs in the services, under another uid perhaps, and can only read.

use std::mem::size_of;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use nix::errno::Errno;

use super::layout::ControlHeader;
use super::verify::{check_file, open_existing, validate};
use super::{ApiError, ControlLayout, control_path, io_error};
use crate::config::Takeover;
use crate::shm::layout::MAX_SERVICES;
use crate::shm::mapping::{Mapping, ReadOnly, RobustPending};
use crate::shm::robust::FutexWait;
use crate::shm::state_dir::{DirTrustError, trusted_dir};

/// The control segment, mapped read-only: the services' side. Every decision of the shutdown
/// protocol is taken from here.
pub(crate) struct ControlView {
    map: Arc<Mapping<ReadOnly>>,
    layout: ControlLayout,
    takeover: Takeover,
    ids: Vec<String>,
    sequence: Vec<usize>,
    path: PathBuf,
}

/// The gate's words, read together (the daemon component word last, then an acquire fence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GateSnapshot {
    pub(crate) coordinator_epoch: u32,
    pub(crate) daemon_component: u32,
}

impl ControlView {
    /// Open the control segment of `instance` in `run_dir` read-only (`O_RDONLY`,
    /// `PROT_READ`), after checking that `run_dir` is trusted (its owner is the instance's
    /// owner; see [`crate::shm::state_dir`]), that the file belongs to that owner and that no
    /// one else may write it. Returns the view, the resolved `run_dir` and the owner.
    pub(crate) fn open(
        run_dir: &Path,
        instance: &str,
    ) -> Result<(ControlView, PathBuf, u32), ApiError> {
        let dir = match trusted_dir(run_dir, None) {
            Ok(dir) => dir,
            Err(DirTrustError::Missing { dir }) => {
                return Err(ApiError::NotRunning {
                    instance: instance.to_owned(),
                    path: dir,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let owner = dir.owner;
        let path = control_path(&dir.path, instance)?;
        let file = open_existing(instance, &path, false, "opening")?;
        let size = check_file(instance, &path, &file, owner, true)?;
        let max = ControlLayout::compute(MAX_SERVICES as usize).map_or(0, |l| l.total_size);
        if size < size_of::<ControlHeader>() as u64 || size > max as u64 {
            return Err(ApiError::Corrupt {
                path,
                detail: format!("it has {size} bytes"),
            });
        }
        let map = Mapping::<ReadOnly>::map(OwnedFd::from(file), size as usize)
            .map_err(io_error("mapping", &path))?;
        let v = validate(&map, size, &path)?;
        Ok((
            ControlView {
                map: Arc::new(map),
                layout: v.layout,
                takeover: v.takeover,
                ids: v.ids,
                sequence: v.sequence,
                path,
            },
            dir.path,
            owner,
        ))
    }

    pub(crate) fn index_of(&self, id: &str) -> Option<usize> {
        self.ids.iter().position(|s| s == id)
    }

    pub(crate) fn takeover(&self) -> Takeover {
        self.takeover
    }

    pub(crate) fn sequence(&self) -> &[usize] {
        &self.sequence
    }

    pub(crate) fn service_count(&self) -> usize {
        self.layout.services
    }

    pub(crate) fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    fn load(&self, offset: usize) -> u32 {
        self.map
            .load_u32(offset)
            .expect("offset inside the validated layout")
    }

    /// The coordinator epoch, then the daemon component word, with acquire ordering: whatever
    /// the coordinator wrote before it released the word is visible after this.
    ///
    /// The epoch is read *before* the word, and the fence between keeps it so (relaxed loads
    /// may otherwise be reordered): a coordinator bumps the epoch only after it has taken the
    /// word, so an epoch read here is never newer than the word read after it. Services rely
    /// on that to sleep on the epoch without missing a take.
    pub(crate) fn gate(&self) -> GateSnapshot {
        let coordinator_epoch = self.load(self.layout.coordinator_epoch());
        fence(Ordering::Acquire);
        let daemon_component = self.load(self.layout.daemon_component());
        fence(Ordering::Acquire);
        GateSnapshot {
            coordinator_epoch,
            daemon_component,
        }
    }

    /// The current shutdown epoch (read after [`gate`](Self::gate)).
    pub(crate) fn shutdown_epoch(&self) -> u32 {
        self.load(self.layout.shutdown_epoch())
    }

    /// The epoch in which service `i` was last asked to shut down.
    pub(crate) fn asked_epoch(&self, i: usize) -> u32 {
        self.load(self.layout.asked_epoch(i))
    }

    fn sys(&self, op: &'static str) -> impl FnOnce(Errno) -> ApiError + '_ {
        move |errno| ApiError::Sys {
            op,
            path: self.path.clone(),
            errno,
        }
    }

    /// Sleep while the daemon component word is `expected`.
    pub(crate) fn wait_daemon_component(&self, expected: u32) -> Result<FutexWait, ApiError> {
        self.map
            .futex_wait(self.layout.daemon_component(), expected, None)
            .expect("offset inside the validated layout")
            .map_err(self.sys("FUTEX_WAIT on the daemon component"))
    }

    /// Sleep while the coordinator epoch is `expected`.
    pub(crate) fn wait_coordinator_epoch(&self, expected: u32) -> Result<FutexWait, ApiError> {
        self.map
            .futex_wait(self.layout.coordinator_epoch(), expected, None)
            .expect("offset inside the validated layout")
            .map_err(self.sys("FUTEX_WAIT on the coordinator epoch"))
    }

    /// Wake every thread sleeping on the daemon component word (passing on the kernel's
    /// single wake-up at the coordinator's death).
    pub(crate) fn wake_daemon_component_sleepers(&self) -> Result<usize, ApiError> {
        self.map
            .futex_wake(self.layout.daemon_component(), i32::MAX)
            .expect("offset inside the validated layout")
            .map_err(self.sys("FUTEX_WAKE on the daemon component"))
    }

    /// Register the daemon component word as the calling thread's pending robust-futex entry
    /// while the returned value lives: if the thread dies after the kernel woke it for the
    /// coordinator's death, but before it passed the wake-up on, the kernel passes it on.
    pub(crate) fn cover_daemon_component(&self) -> Result<RobustPending, ApiError> {
        self.map
            .robust_pending(self.layout.daemon_component())
            .expect("offset inside the validated layout")
            .map_err(self.sys("set_robust_list"))
    }
}

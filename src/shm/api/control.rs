//! The control segment from the coordinator's side: the spec it is built from
//! ([`ApiSpec`]), its creation (the control segment and the API file, both unnamed until
//! complete), opening it read-write, removing both names, and the reads the coordinator
//! makes of it. Taking and releasing the daemon component word is [`holder`](super::holder)'s.

use std::fmt;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use super::file::{create_api_file, first_write_lock, lock_base, read_record};
use super::layout::{ControlHeader, ControlRecord, Gate, takeover_code};
use super::verify::{check_file, exists_or, open_existing, validate};
use super::{
    API_LAYOUT_VERSION, ApiError, ApiRecord, CONTROL_MAGIC, ControlLayout, DaemonComponentHolder,
    api_path, control_path, io_error,
};
use crate::config::Takeover;
use crate::shm::layout::MAX_SERVICES;
use crate::shm::mapping::{
    Mapping, ReadWrite, Unpublished, publish_unnamed, remove_temp_leftovers,
};
use crate::shm::robust::{Deadline, futex_wake};
use crate::shm::state_dir::trusted_dir;

/// One service as the control segment records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiService {
    /// The service id (1 to 64 bytes).
    pub id: String,
    /// Its shutdown timeout in milliseconds (informational for services).
    pub shutdown_timeout_ms: u64,
}

/// Everything the service API's files are created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSpec {
    /// The instance name.
    pub instance: String,
    /// The instance's `run_dir`, where both files are made; it must be the creator's and
    /// trusted (see [`crate::shm::state_dir`]).
    pub run_dir: PathBuf,
    /// The services, in index order (the same indices as the main segment's).
    pub services: Vec<ApiService>,
    /// Every service index exactly once, in shutdown order.
    pub shutdown_sequence: Vec<u32>,
    /// What services do when the coordinator dies.
    pub takeover: Takeover,
}

impl ApiSpec {
    /// The spec of a checked configuration: its services (same indices as the main
    /// segment's), its shutdown sequence and its takeover mode.
    pub fn from_config(config: &crate::config::Config) -> ApiSpec {
        ApiSpec {
            instance: config.global.instance.clone(),
            run_dir: config.global.run_dir.clone(),
            services: config
                .services
                .iter()
                .map(|s| ApiService {
                    id: s.id.clone(),
                    shutdown_timeout_ms: s.shutdown_timeout.as_duration().as_millis() as u64,
                })
                .collect(),
            shutdown_sequence: config.shutdown_sequence.iter().map(|&i| i as u32).collect(),
            takeover: config.global.coordinator.takeover,
        }
    }
}

pub(super) fn check_spec(spec: &ApiSpec) -> Result<ControlLayout, String> {
    let n = spec.services.len();
    let layout = ControlLayout::compute(n)
        .ok_or_else(|| format!("{n} services, more than the {MAX_SERVICES} allowed"))?;
    crate::shm::open::check_service_ids(spec.services.iter().map(|s| s.id.as_str()))?;
    let mut seen = vec![false; n];
    for &i in &spec.shutdown_sequence {
        match seen.get_mut(i as usize) {
            Some(s @ false) => *s = true,
            Some(true) => return Err(format!("the shutdown sequence names #{i} twice")),
            None => {
                return Err(format!(
                    "the shutdown sequence names #{i}, but there are {n} services"
                ));
            }
        }
    }
    if spec.shutdown_sequence.len() != n {
        return Err(format!(
            "the shutdown sequence has {} entries; it must name each of the {n} services once",
            spec.shutdown_sequence.len()
        ));
    }
    Ok(layout)
}

/// The control segment, mapped read-write: the coordinator's side (also the standby's after a
/// takeover, and `ccmgr stop`'s when it finishes the job of a dead coordinator). Cheap to
/// clone.
#[derive(Clone)]
pub struct ControlSegment {
    pub(super) map: Arc<Mapping<ReadWrite>>,
    pub(super) layout: ControlLayout,
    takeover: Takeover,
    ids: Arc<Vec<String>>,
    sequence: Arc<Vec<usize>>,
    pub(super) instance: String,
    pub(super) path: PathBuf,
    /// The API file's path, beside it.
    pub(super) api: PathBuf,
}

impl fmt::Debug for ControlSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlSegment")
            .field("instance", &self.instance)
            .field("path", &self.path)
            .field("takeover", &self.takeover)
            .field("services", &self.ids.len())
            .finish()
    }
}

impl ControlSegment {
    /// Create the control segment (mode 0644) and the API file (mode 0666) of
    /// `spec.instance`, both exclusively (`AlreadyExists` if either name is taken: a live
    /// instance, or leftovers to [`remove`](Self::remove) once the main segment shows the
    /// instance is stale). Each file is built with no name and linked when complete; the
    /// control segment goes last, so a service that finds it finds the API file too.
    ///
    /// The daemon component starts free and never asked: services that register before the
    /// coordinator [holds it](Self::hold_daemon_component) wait for that.
    pub fn create(spec: &ApiSpec) -> Result<ControlSegment, ApiError> {
        let instance = spec.instance.clone();
        let dir = trusted_dir(&spec.run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = control_path(&dir.path, &instance)?;
        let api = api_path(&dir.path, &instance)?;
        let layout = check_spec(spec).map_err(|reason| ApiError::InvalidSpec {
            instance: instance.clone(),
            reason,
        })?;

        let (api_file, api_temp) = create_api_file(&api, layout.services)?;
        let mut fresh = Unpublished::create_with_mode(&path, layout.total_size, 0o644, None)
            .map_err(|(_, e)| io_error("creating (unnamed, in its directory)", &path)(e))?;
        // No pthread objects in it: the daemon component is a bare futex word.
        fresh
            .init_sync(&[])
            .map_err(|e| io_error("initialising", &path)(io::Error::other(e.to_string())))?;
        write_control_image(fresh.mapping(), &layout, spec);

        publish_unnamed(api_file.as_fd(), api_temp, &api)
            .map_err(|e| exists_or(e, &instance, &api))?;
        drop(api_file);
        let map = fresh.publish(&path).map_err(|e| {
            // Do not leave the API file of a control segment that does not exist.
            let _ = std::fs::remove_file(&api);
            exists_or(e, &instance, &path)
        })?;
        tracing::debug!(instance = %instance, path = %path.display(), "created the service API files");
        Ok(ControlSegment {
            map,
            layout,
            takeover: spec.takeover,
            ids: Arc::new(spec.services.iter().map(|s| s.id.clone()).collect()),
            sequence: Arc::new(spec.shutdown_sequence.iter().map(|&i| i as usize).collect()),
            instance,
            path,
            api,
        })
    }

    /// Open the control segment of `instance` in `run_dir` read-write, to take the daemon
    /// component over (a standby) or to stop a stack whose coordinator died (`ccmgr stop`).
    /// `run_dir` must be the effective uid's and trusted; the file must belong to the effective
    /// uid and be writable by no one else.
    pub fn open(run_dir: &Path, instance: &str) -> Result<ControlSegment, ApiError> {
        let dir = trusted_dir(run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = control_path(&dir.path, instance)?;
        let api = api_path(&dir.path, instance)?;
        let file = open_existing(instance, &path, true, "opening")?;
        let size = check_file(
            instance,
            &path,
            &file,
            nix::unistd::geteuid().as_raw(),
            true,
        )?;
        if size < size_of::<ControlHeader>() as u64
            || size
                > ControlLayout::compute(MAX_SERVICES as usize).map_or(0, |l| l.total_size) as u64
        {
            return Err(ApiError::Corrupt {
                path,
                detail: format!("it has {size} bytes"),
            });
        }
        let map = Mapping::<ReadWrite>::map(OwnedFd::from(file), size as usize)
            .map_err(io_error("mapping", &path))?;
        let v = validate(&map, size, &path)?;
        Ok(ControlSegment {
            map: Arc::new(map),
            layout: v.layout,
            takeover: v.takeover,
            ids: Arc::new(v.ids),
            sequence: Arc::new(v.sequence),
            instance: instance.to_owned(),
            path,
            api,
        })
    }

    /// Remove the names of `instance`'s control segment and API file in `run_dir` (for `stop`
    /// once everything is down, and to clear leftovers of a crashed run, with what a creator
    /// killed mid-way left on a file system without `O_TMPFILE`). Processes that have them
    /// open keep them. Returns how many names were removed. `run_dir` must be the caller's
    /// and trusted.
    pub fn remove(run_dir: &Path, instance: &str) -> Result<usize, ApiError> {
        let dir = trusted_dir(run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let mut removed = 0;
        // The control segment first: a service that finds it must find the API file too.
        for path in [
            control_path(&dir.path, instance)?,
            api_path(&dir.path, instance)?,
        ] {
            remove_temp_leftovers(&path);
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing", &path)(e)),
            }
        }
        Ok(removed)
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The control segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What services do when the coordinator dies.
    pub fn takeover(&self) -> Takeover {
        self.takeover
    }

    /// The service ids, in index order.
    pub fn service_ids(&self) -> &[String] {
        &self.ids
    }

    /// Service indices in shutdown order.
    pub fn shutdown_sequence(&self) -> &[usize] {
        &self.sequence
    }

    pub(super) fn gate(&self) -> &Gate {
        self.map.get(self.layout.gate).expect("layout checked")
    }

    pub(super) fn record(&self, i: usize) -> Option<&ControlRecord> {
        (i < self.layout.services).then(|| {
            self.map
                .get(self.layout.record_at(i))
                .expect("layout checked")
        })
    }

    /// The current coordinator epoch (bumped by every take of the daemon component).
    pub fn coordinator_epoch(&self) -> u32 {
        self.gate().coordinator_epoch.load(Ordering::Acquire)
    }

    /// The current shutdown epoch (bumped by every deliberate release).
    pub fn shutdown_epoch(&self) -> u32 {
        self.gate().shutdown_epoch.load(Ordering::Acquire)
    }

    /// The shutdown epoch in which service `i` was last asked to shut down (0: never).
    pub fn asked_epoch(&self, i: usize) -> Option<u32> {
        self.record(i)
            .map(|r| r.asked_epoch.load(Ordering::Acquire))
    }

    /// The daemon component word as it is now (for diagnostics and tests).
    pub fn daemon_component_word(&self) -> u32 {
        self.gate().daemon_component.load(Ordering::Acquire)
    }

    /// Whether some process holds service `i`'s component lock, i.e. a live process registered
    /// with the API as that service (a kernel fact, unlike anything in the API file's bytes;
    /// it does not say *which* process). `None` for an index out of range.
    pub fn component_registered(&self, i: usize) -> Result<Option<bool>, ApiError> {
        if i >= self.layout.services {
            return Ok(None);
        }
        let position = self
            .sequence
            .iter()
            .position(|&s| s == i)
            .expect("the validated sequence names every service");
        let api = self.api.clone();
        let file = open_existing(&self.instance, &api, false, "opening")?;
        let base = lock_base(self.layout.services);
        let held = first_write_lock(&file, base, position..position + 1).map_err(|errno| {
            ApiError::Sys {
                op: "F_OFD_GETLK",
                path: api.clone(),
                errno,
            }
        })?;
        Ok(Some(held.is_some()))
    }

    /// Take the daemon component and hold it from a dedicated thread until the returned
    /// holder is dropped: what the coordinator does before it starts any service, and what a
    /// standby does when it takes over (and `ccmgr stop` when it finishes the job of a dead
    /// coordinator). Waits until `deadline` at most for a previous holder to die or release
    /// it. Then bumps the coordinator epoch and wakes every service waiting for a coordinator.
    ///
    /// [`DaemonComponentHolder::previous_holder_died`] tells whether the previous holder died
    /// holding it (a takeover).
    pub fn hold_daemon_component(
        &self,
        deadline: Deadline,
    ) -> Result<DaemonComponentHolder, ApiError> {
        DaemonComponentHolder::start(self.clone(), deadline)
    }

    /// Wake every thread sleeping on the gate's words (after a change of them).
    pub(super) fn wake_gate(&self) {
        let gate = self.gate();
        let _ = futex_wake(&gate.daemon_component, i32::MAX);
        let _ = futex_wake(&gate.coordinator_epoch, i32::MAX);
    }

    /// The API file's records, as services wrote them. **Untrusted**: any local user may have
    /// written anything there; for display and tests only.
    pub fn read_api_records(&self) -> Result<Vec<ApiRecord>, ApiError> {
        let api = &self.api;
        let file = open_existing(&self.instance, api, false, "opening")?;
        (0..self.layout.services)
            .map(|i| read_record(&file, i).map_err(io_error("reading", api)))
            .collect()
    }
}

/// Write the header (magic last) and the records of a control segment no one can see yet.
fn write_control_image(map: &Arc<Mapping<ReadWrite>>, layout: &ControlLayout, spec: &ApiSpec) {
    let r = Ordering::Relaxed;
    let h: &ControlHeader = map.get(0).expect("header inside the new mapping");
    h.layout_version.store(API_LAYOUT_VERSION, r);
    h.service_count.store(layout.services as u32, r);
    h.total_size.store(layout.total_size as u64, r);
    h.takeover.store(takeover_code(spec.takeover), r);
    h.record_size.store(size_of::<ControlRecord>() as u32, r);
    h.gate_offset.store(layout.gate as u64, r);
    h.sequence_offset.store(layout.sequence as u64, r);
    h.records_offset.store(layout.records as u64, r);
    h.creator_uid.store(nix::unistd::geteuid().as_raw(), r);
    let seq: &[AtomicU32] = map
        .slice(layout.sequence, layout.services)
        .expect("sequence inside the new mapping");
    for (dst, &src) in seq.iter().zip(&spec.shutdown_sequence) {
        dst.store(src, r);
    }
    for (i, s) in spec.services.iter().enumerate() {
        let rec: &ControlRecord = map
            .get(layout.record_at(i))
            .expect("record inside the new mapping");
        rec.id_len.store(s.id.len() as u32, r);
        rec.shutdown_timeout_ms.store(s.shutdown_timeout_ms, r);
        for (d, b) in rec.id.iter().zip(s.id.bytes()) {
            d.store(b, r);
        }
    }
    h.magic.store(CONTROL_MAGIC, Ordering::Release);
}

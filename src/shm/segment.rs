//! The segment of one instance: creating it exclusively (unnamed until fully
//! built), opening it with every check (owner, mode, magic, version, sizes,
//! counts, config image), the typed accessors, the state writer and the
//! consistent snapshot readers, and the detection and reclaim of stale state.
//! No unsafe code: raw memory is reached only through the private `mapping` module.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::mem::offset_of;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering, fence};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::layout::{
    Counts, Header, InstanceRecord, LAYOUT_VERSION, Layout, MAGIC, MAX_CONFIG_BLOB, MAX_SERVICES,
    PROGRESS_ASKED, PROGRESS_KILLED, PROGRESS_START_TIMED_OUT, SERVICE_ID_MAX, ServiceRecord,
    ServiceStaticRecord, SyncBlock, fnv1a64,
};
use super::mapping::{Access, CreateStep, Mapping, Unpublished};
use super::robust::{MutexError, MutexGuard, RobustMutex, SharedMutex};
use super::state::{
    FailureCode, GiveUpReason, InstanceProgress, InstanceState, LastExit, MutexId, ServiceProgress,
    ServiceState, Stage, StopIntent, StopKind, UnknownValue, Want,
};
use crate::process_identity::ProcessIdentity;

/// The directory where glibc's `shm_open` keeps its objects.
pub const SHM_DIR: &str = "/dev/shm";

/// Errors of the shared-memory segment. Each names the instance and, where
/// there is one, the segment's path.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The instance name is unusable in a segment name.
    #[error("invalid instance name {name:?}: use 1 to 64 of the characters A-Z a-z 0-9 _ . -")]
    InvalidInstanceName {
        /// The name given.
        name: String,
    },
    /// The spec given to [`Segment::create`] cannot be laid out.
    #[error("cannot create the segment of instance {instance}: {reason}")]
    InvalidSpec {
        /// The instance.
        instance: String,
        /// What is wrong.
        reason: String,
    },
    /// A segment with that name exists already.
    #[error("segment {path} of instance {instance} already exists")]
    AlreadyExists {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
    },
    /// No segment with that name exists.
    #[error("instance {instance} has no segment ({path} does not exist)")]
    NotFound {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
    },
    /// The segment belongs to another user.
    #[error(
        "segment {path} of instance {instance} was created by uid {owner}, not by uid {expected}: refusing to use it"
    )]
    WrongOwner {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// Its owner.
        owner: u32,
        /// The owner required.
        expected: u32,
    },
    /// Users other than the owner (and its group) may use the segment.
    #[error(
        "segment {path} of instance {instance} has mode {mode:04o}, open to other users: refusing to use it"
    )]
    TooOpen {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is not a regular file.
    #[error(
        "{path} (the segment of instance {instance}) is not a regular file: refusing to use it"
    )]
    NotRegularFile {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
    },
    /// The file is shorter than its layout.
    #[error(
        "segment {path} of instance {instance} is truncated: it has {size} bytes, its layout needs {needed}"
    )]
    Truncated {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The file's size.
        size: u64,
        /// The size needed.
        needed: u64,
    },
    /// The file is longer than its layout.
    #[error(
        "segment {path} of instance {instance} has {size} bytes, but its layout has {expected}: refusing to use it"
    )]
    WrongSize {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The file's size.
        size: u64,
        /// The size expected.
        expected: u64,
    },
    /// The file does not start with the ccmgr magic.
    #[error(
        "{path} is not a ccmgr segment (magic {found:#018x}, expected {MAGIC:#018x}): refusing to use it for instance {instance}"
    )]
    BadMagic {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The first eight bytes, little-endian.
        found: u64,
    },
    /// The layout version is not this build's.
    #[error(
        "segment {path} of instance {instance} has layout version {found}, this ccmgr uses version {LAYOUT_VERSION}: refusing to use it"
    )]
    WrongVersion {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The version found.
        found: u32,
    },
    /// Something inside the segment is out of bounds or inconsistent.
    #[error("segment {path} of instance {instance} is corrupt: {detail}")]
    Corrupt {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A system call failed.
    #[error("instance {instance}: {action} {path}: {source}")]
    Io {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// What was being done ("creating", "opening", ...).
        action: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A reader waited [`READ_LOCK_LIMIT`] for the state lock in vain: its holder is stopped
    /// or wedged, or the segment's bytes only look locked. A reader never waits for ever.
    #[error(
        "instance {instance}: the lock of its shared state has been held for over {}s (a stopped or wedged writer, or a corrupt segment): cannot read a consistent state",
        READ_LOCK_LIMIT.as_secs()
    )]
    StateLockHeld {
        /// The instance.
        instance: String,
    },
    /// A live coordinator holds the instance.
    #[error("instance {instance} is already running (coordinator {})", pid_text(.coordinator_pid))]
    AlreadyRunning {
        /// The instance.
        instance: String,
        /// The coordinator's pid, if it has announced itself yet.
        coordinator_pid: Option<i32>,
    },
    /// A live `ccmgr start` holds the manager mutex.
    #[error("instance {instance} is being started (ccmgr start {})", pid_text(.manager_pid))]
    BeingStarted {
        /// The instance.
        instance: String,
        /// The manager's pid, if recorded.
        manager_pid: Option<i32>,
    },
    /// No coordinator, but processes of the instance still live.
    #[error(
        "instance {instance} has no coordinator, but {survivors} still alive: stop them before its segment can be reclaimed"
    )]
    StillInUse {
        /// The instance.
        instance: String,
        /// The live processes, described.
        survivors: String,
    },
    /// A service index beyond the service count.
    #[error("instance {instance} has no service #{index} (it has {count})")]
    NoSuchService {
        /// The instance.
        instance: String,
        /// The index asked for.
        index: usize,
        /// The number of services.
        count: usize,
    },
    /// A mutex operation failed.
    #[error("instance {instance}: {which}: {source}")]
    Mutex {
        /// The instance.
        instance: String,
        /// Which mutex.
        which: MutexId,
        /// The error.
        #[source]
        source: MutexError,
    },
}

fn pid_text(pid: &Option<i32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid not yet recorded".to_owned(),
    }
}

/// Check an instance name: 1 to 64 characters from `[A-Za-z0-9_.-]`.
pub fn validate_instance_name(name: &str) -> Result<(), ShmError> {
    if crate::vocab::is_valid_instance_name(name) {
        Ok(())
    } else {
        Err(ShmError::InvalidInstanceName {
            name: name.to_owned(),
        })
    }
}

/// The `shm_open` name of an instance's segment: `/ccmgr.<instance>`.
pub fn segment_os_id(instance: &str) -> Result<String, ShmError> {
    validate_instance_name(instance)?;
    Ok(format!("/ccmgr.{instance}"))
}

/// The path of an instance's segment: `/dev/shm/ccmgr.<instance>`.
pub fn segment_path(instance: &str) -> Result<PathBuf, ShmError> {
    validate_instance_name(instance)?;
    Ok(Path::new(SHM_DIR).join(format!("ccmgr.{instance}")))
}

/// A service's static data, as the coordinator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatic {
    /// The service id (at most 64 bytes).
    pub id: String,
    /// Startup timeout in milliseconds.
    pub startup_timeout_ms: u64,
    /// Shutdown timeout in milliseconds.
    pub shutdown_timeout_ms: u64,
}

/// Everything a new segment is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpec {
    /// The instance name.
    pub instance: String,
    /// `Some(gid)`: the segment gets mode 0660 and that group; else 0600.
    pub group: Option<u32>,
    /// The services, in index order.
    pub services: Vec<ServiceStatic>,
    /// Service indices in startup order.
    pub startup_sequence: Vec<u32>,
    /// Service indices in shutdown order.
    pub shutdown_sequence: Vec<u32>,
    /// The serialized full config, opaque here: whoever takes over runs
    /// exactly the config that was started.
    pub config_blob: Vec<u8>,
}

/// The live state of one service, read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStatus {
    /// Its state.
    pub state: ServiceState,
    /// Its process, if it has one.
    pub process: Option<ProcessIdentity>,
    /// Last state change, monotonic milliseconds.
    pub last_transition_ms: u64,
    /// Restarts so far.
    pub restart_count: u32,
    /// How its last process ended.
    pub last_exit: Option<LastExit>,
}

/// Why and on which service the instance gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp {
    /// Why.
    pub reason: GiveUpReason,
    /// The service concerned, if one.
    pub service: Option<usize>,
}

/// The state of the instance, read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its state.
    pub state: InstanceState,
    /// Last state change, monotonic milliseconds.
    pub last_transition_ms: u64,
    /// The `ccmgr start` under way, if any.
    pub manager: Option<ProcessIdentity>,
    /// The coordinator, once announced.
    pub coordinator: Option<ProcessIdentity>,
    /// The standby, once announced.
    pub standby: Option<ProcessIdentity>,
    /// The keeper, once announced.
    pub keeper: Option<ProcessIdentity>,
    /// Restarts counted in the current window.
    pub restarts_in_window: u32,
    /// Start of that window, monotonic milliseconds.
    pub window_start_ms: u64,
    /// Set once the instance gave up.
    pub gave_up: Option<GaveUp>,
}

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

/// The mapped segment of one instance. Cheap to clone (the mapping is shared);
/// `Send + Sync`.
#[derive(Clone)]
pub struct Segment {
    map: Arc<Mapping>,
    layout: Layout,
    instance: String,
    path: PathBuf,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("instance", &self.instance)
            .field("path", &self.path)
            .field("layout", &self.layout)
            .finish()
    }
}

/// Identity fields as stored: pid 0 (or negative) means none.
fn identity(pid: i32, start_time: u64) -> Option<ProcessIdentity> {
    (pid > 0).then_some(ProcessIdentity { pid, start_time })
}

/// An optional time stored plus one, so that a zeroed record means "none".
fn to_ms1(ms: Option<u64>) -> u64 {
    ms.map_or(0, |ms| ms.saturating_add(1))
}

fn from_ms1(word: u64) -> Option<u64> {
    word.checked_sub(1)
}

fn read_bytes(bytes: &[AtomicU8]) -> Vec<u8> {
    bytes.iter().map(|b| b.load(Ordering::Relaxed)).collect()
}

fn write_bytes(dst: &[AtomicU8], src: &[u8]) {
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Ordering::Relaxed);
    }
}

fn check_spec(spec: &SegmentSpec) -> Result<Layout, String> {
    let n = spec.services.len();
    if n > MAX_SERVICES as usize {
        return Err(format!(
            "{n} services, more than the {MAX_SERVICES} a segment holds"
        ));
    }
    let mut ids = HashSet::new();
    for (i, s) in spec.services.iter().enumerate() {
        if s.id.is_empty() || s.id.len() > SERVICE_ID_MAX || s.id.contains('\0') {
            return Err(format!(
                "service #{i} has id {:?}: ids have 1 to {SERVICE_ID_MAX} bytes and no NUL",
                s.id
            ));
        }
        if !ids.insert(s.id.as_str()) {
            return Err(format!("service id {:?} appears twice", s.id));
        }
    }
    for (which, seq) in [
        ("startup", &spec.startup_sequence),
        ("shutdown", &spec.shutdown_sequence),
    ] {
        check_sequence(which, seq, n)?;
    }
    Layout::compute(Counts {
        services: n as u32,
        startup_len: spec.startup_sequence.len() as u32,
        shutdown_len: spec.shutdown_sequence.len() as u32,
        blob_len: spec.config_blob.len() as u64,
    })
    .map_err(|e| e.to_string())
}

/// A sequence holds each service index at most once, each below `services`.
fn check_sequence(which: &str, seq: &[u32], services: usize) -> Result<(), String> {
    let mut seen = vec![false; services];
    for &index in seq {
        match seen.get_mut(index as usize) {
            None => {
                return Err(format!(
                    "the {which} sequence names service #{index}, but there are {services} services"
                ));
            }
            Some(true) => {
                return Err(format!("the {which} sequence names service #{index} twice"));
            }
            Some(s) => *s = true,
        }
    }
    Ok(())
}

/// The largest segment any valid header can describe.
/// How long a reader waits for the state lock, which writers hold for microseconds.
pub const READ_LOCK_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

fn max_segment_size() -> u64 {
    Layout::compute(Counts {
        services: MAX_SERVICES,
        startup_len: MAX_SERVICES,
        shutdown_len: MAX_SERVICES,
        blob_len: MAX_CONFIG_BLOB,
    })
    .map(|l| l.total_size as u64)
    .unwrap_or(u64::MAX)
}

impl Segment {
    // ----- naming and errors -------------------------------------------------

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The segment's path (`/dev/shm/ccmgr.<instance>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where every region lies (validated at open).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn path_text(&self) -> String {
        self.path.display().to_string()
    }

    fn corrupt(&self, detail: impl Into<String>) -> ShmError {
        ShmError::Corrupt {
            instance: self.instance.clone(),
            path: self.path_text(),
            detail: detail.into(),
        }
    }

    fn unknown(&self, what: &str, e: UnknownValue) -> ShmError {
        self.corrupt(format!("{what}: {e}"))
    }

    fn mutex_error(&self, which: MutexId, source: MutexError) -> ShmError {
        ShmError::Mutex {
            instance: self.instance.clone(),
            which,
            source,
        }
    }

    fn check_index(&self, index: usize) -> Result<(), ShmError> {
        let count = self.service_count();
        if index < count {
            Ok(())
        } else {
            Err(ShmError::NoSuchService {
                instance: self.instance.clone(),
                index,
                count,
            })
        }
    }

    // ----- views (bounds guaranteed by the layout validated at open) ----------

    fn header(&self) -> &Header {
        self.map.get(0).expect("header checked at open")
    }

    fn instance_record(&self) -> &InstanceRecord {
        self.map
            .get(self.layout.instance)
            .expect("instance record checked at open")
    }

    fn static_record(&self, index: usize) -> Result<&ServiceStaticRecord, ShmError> {
        self.check_index(index)?;
        Ok(self
            .map
            .get(self.layout.service_static_at(index))
            .expect("service static records checked at open"))
    }

    fn service_record(&self, index: usize) -> Result<&ServiceRecord, ShmError> {
        self.check_index(index)?;
        Ok(self
            .map
            .get(self.layout.service_record_at(index))
            .expect("state table checked at open"))
    }

    fn sequence_words(&self, startup: bool) -> &[AtomicU32] {
        let (offset, len) = if startup {
            (self.layout.startup, self.layout.counts.startup_len)
        } else {
            (self.layout.shutdown, self.layout.counts.shutdown_len)
        };
        self.map
            .slice(offset, len as usize)
            .expect("sequences checked at open")
    }

    fn blob_bytes(&self) -> &[AtomicU8] {
        self.map
            .slice(
                self.layout.config_blob,
                self.layout.counts.blob_len as usize,
            )
            .expect("config blob checked at open")
    }

    // ----- creation ----------------------------------------------------------

    /// Create the segment of `spec.instance`, exclusively.
    ///
    /// The file is built with no name (`O_TMPFILE`), so no one sees it half
    /// made, then linked to `/dev/shm/ccmgr.<instance>`; `AlreadyExists` if that
    /// name is taken. Mode 0600, or 0660 with group `spec.group`. The segment
    /// outlives the caller: remove it with [`unlink`](Self::unlink) or
    /// [`remove`](Self::remove).
    ///
    /// The manager mutex comes back locked by the calling thread, and the
    /// calling process is recorded as the manager: a start is under way, and a
    /// concurrent `start` sees so. Drop the guard when the start is over.
    pub fn create(spec: &SegmentSpec) -> Result<(Segment, MutexGuard), ShmError> {
        let instance = spec.instance.clone();
        let path = segment_path(&instance)?;
        let path_text = path.display().to_string();
        let layout = check_spec(spec).map_err(|reason| ShmError::InvalidSpec {
            instance: instance.clone(),
            reason,
        })?;
        let io_error = |action: &'static str, source: io::Error| ShmError::Io {
            instance: instance.clone(),
            path: path_text.clone(),
            action,
            source,
        };
        let manager = ProcessIdentity::current()
            .map_err(|e| io_error("identifying (through /proc/self/stat) the creator of", e))?;

        let mut fresh = Unpublished::create(
            Path::new(SHM_DIR),
            layout.total_size,
            Access { group: spec.group },
        )
        .map_err(|(step, e)| {
            io_error(
                match step {
                    CreateStep::Open => "creating (O_TMPFILE in /dev/shm)",
                    CreateStep::Chown => "setting the group of",
                    CreateStep::Chmod => "setting the mode of",
                    CreateStep::Resize => "sizing",
                    CreateStep::Map => "mapping",
                },
                e,
            )
        })?;
        fresh
            .init_sync(&layout.mutex_offsets())
            .map_err(|e| io_error("initialising", io::Error::other(e.to_string())))?;

        let seg = Segment {
            map: Arc::clone(fresh.mapping()),
            layout,
            instance: instance.clone(),
            path: path.clone(),
        };
        seg.write_image(spec, manager);
        let manager_lock = seg
            .mutex(MutexId::Manager)?
            .lock()
            .map_err(|e| seg.mutex_error(MutexId::Manager, e))?;
        // Everything is in place: the magic goes last, released to whoever
        // maps the file once it has a name.
        seg.header().magic.store(MAGIC, Ordering::Release);

        drop(seg);
        let map = fresh.publish(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                ShmError::AlreadyExists {
                    instance: instance.clone(),
                    path: path_text.clone(),
                }
            } else {
                io_error("linking", e)
            }
        })?;
        tracing::debug!(instance = %instance, path = %path_text, size = layout.total_size, "created segment");
        Ok((
            Segment {
                map,
                layout,
                instance,
                path,
            },
            manager_lock,
        ))
    }

    /// Write the header (all but the magic), the config image, the blob and
    /// the initial records of a segment no one else can see yet.
    fn write_image(&self, spec: &SegmentSpec, manager: ProcessIdentity) {
        let l = &self.layout;
        let h = self.header();
        let r = Ordering::Relaxed;
        h.layout_version.store(LAYOUT_VERSION, r);
        h.service_count.store(l.counts.services, r);
        h.total_size.store(l.total_size as u64, r);
        h.generation.store(0, r);
        h.startup_len.store(l.counts.startup_len, r);
        h.shutdown_len.store(l.counts.shutdown_len, r);
        h.config_blob_len.store(l.counts.blob_len, r);
        h.config_blob_checksum
            .store(fnv1a64(spec.config_blob.iter().copied()), r);
        h.mutex_size.store(size_of::<RobustMutex>() as u32, r);
        h.service_record_size
            .store(size_of::<ServiceRecord>() as u32, r);
        h.service_static_size
            .store(size_of::<ServiceStaticRecord>() as u32, r);
        h.sync_offset.store(l.sync as u64, r);
        h.instance_offset.store(l.instance as u64, r);
        h.service_static_offset.store(l.service_static as u64, r);
        h.startup_offset.store(l.startup as u64, r);
        h.shutdown_offset.store(l.shutdown as u64, r);
        h.state_table_offset.store(l.state_table as u64, r);
        h.config_blob_offset.store(l.config_blob as u64, r);
        h.creator_uid.store(nix::unistd::geteuid().as_raw(), r);

        let inst = self.instance_record();
        inst.state.store(InstanceState::Initializing.as_u32(), r);
        inst.gave_up_service.store(u32::MAX, r);
        inst.manager_pid.store(manager.pid, r);
        inst.manager_start_time.store(manager.start_time, r);

        for (i, s) in spec.services.iter().enumerate() {
            let rec = self.static_record(i).expect("index below the count");
            rec.id_len.store(s.id.len() as u32, r);
            write_bytes(&rec.id, s.id.as_bytes());
            rec.startup_timeout_ms.store(s.startup_timeout_ms, r);
            rec.shutdown_timeout_ms.store(s.shutdown_timeout_ms, r);
            let live = self.service_record(i).expect("index below the count");
            live.state.store(ServiceState::Stopped.as_u32(), r);
            live.last_exit.store(LastExit::encode(None), r);
        }
        for (dst, src) in self.sequence_words(true).iter().zip(&spec.startup_sequence) {
            dst.store(*src, r);
        }
        for (dst, src) in self
            .sequence_words(false)
            .iter()
            .zip(&spec.shutdown_sequence)
        {
            dst.store(*src, r);
        }
        write_bytes(self.blob_bytes(), &spec.config_blob);
    }

    /// Create the segment; if one exists, reclaim it when it is stale and
    /// create again. This is what `ccmgr start` does: it refuses with
    /// [`ShmError::AlreadyRunning`] when a live coordinator holds the instance.
    pub fn create_reclaiming_stale(spec: &SegmentSpec) -> Result<(Segment, MutexGuard), ShmError> {
        match Self::create(spec) {
            Err(ShmError::AlreadyExists { .. }) => {
                Self::reclaim_stale(&spec.instance)?;
                Self::create(spec)
            }
            other => other,
        }
    }

    // ----- opening -----------------------------------------------------------

    /// Open the segment of `instance`, which the effective uid must own.
    pub fn open(instance: &str) -> Result<Segment, ShmError> {
        Self::open_owned_by(instance, nix::unistd::geteuid().as_raw())
    }

    /// Open the segment of `instance`, which `owner_uid` must own (a group
    /// member opening the segment of an instance run by another user names
    /// that user). Checks, in order: owner, file type and mode, size, magic,
    /// layout version, counts, record sizes, region offsets, total size, the
    /// config image and the blob's checksum.
    pub fn open_owned_by(instance: &str, owner_uid: u32) -> Result<Segment, ShmError> {
        let os_id = segment_os_id(instance)?;
        let path = segment_path(instance)?;
        let path_text = path.display().to_string();
        let io_error = |action: &'static str, source: io::Error| ShmError::Io {
            instance: instance.to_owned(),
            path: path_text.clone(),
            action,
            source,
        };
        let fd = match nix::sys::mman::shm_open(os_id.as_str(), OFlag::O_RDWR, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                return Err(ShmError::NotFound {
                    instance: instance.to_owned(),
                    path: path_text,
                });
            }
            Err(Errno::EACCES) => {
                // Say whose it is if we can see that much.
                if let Ok(meta) = std::fs::symlink_metadata(&path)
                    && meta.uid() != owner_uid
                {
                    return Err(ShmError::WrongOwner {
                        instance: instance.to_owned(),
                        path: path_text,
                        owner: meta.uid(),
                        expected: owner_uid,
                    });
                }
                return Err(io_error("opening", Errno::EACCES.into()));
            }
            Err(e) => return Err(io_error("opening", e.into())),
        };
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(|e| io_error("examining", e))?;
        if meta.uid() != owner_uid {
            return Err(ShmError::WrongOwner {
                instance: instance.to_owned(),
                path: path_text,
                owner: meta.uid(),
                expected: owner_uid,
            });
        }
        if !meta.file_type().is_file() {
            return Err(ShmError::NotRegularFile {
                instance: instance.to_owned(),
                path: path_text,
            });
        }
        if meta.mode() & 0o007 != 0 {
            return Err(ShmError::TooOpen {
                instance: instance.to_owned(),
                path: path_text,
                mode: meta.mode() & 0o7777,
            });
        }
        let size = meta.len();
        let header_size = size_of::<Header>() as u64;
        if size < header_size {
            return Err(ShmError::Truncated {
                instance: instance.to_owned(),
                path: path_text,
                size,
                needed: header_size,
            });
        }
        let max = max_segment_size();
        if size > max {
            return Err(ShmError::WrongSize {
                instance: instance.to_owned(),
                path: path_text,
                size,
                expected: max,
            });
        }
        let map = Mapping::map(file.into(), size as usize).map_err(|e| io_error("mapping", e))?;
        let header: &Header = map.get(0).expect("size checked above");
        let magic = header.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(ShmError::BadMagic {
                instance: instance.to_owned(),
                path: path_text,
                found: magic,
            });
        }
        let version = header.layout_version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(ShmError::WrongVersion {
                instance: instance.to_owned(),
                path: path_text,
                found: version,
            });
        }
        let corrupt = |detail: String| ShmError::Corrupt {
            instance: instance.to_owned(),
            path: path_text.clone(),
            detail,
        };
        let counts = Counts {
            services: header.service_count.load(Ordering::Relaxed),
            startup_len: header.startup_len.load(Ordering::Relaxed),
            shutdown_len: header.shutdown_len.load(Ordering::Relaxed),
            blob_len: header.config_blob_len.load(Ordering::Relaxed),
        };
        let layout =
            Layout::compute(counts).map_err(|e| corrupt(format!("its header says {e}")))?;
        let needed = layout.total_size as u64;
        if size < needed {
            return Err(ShmError::Truncated {
                instance: instance.to_owned(),
                path: path_text,
                size,
                needed,
            });
        }
        if size > needed {
            return Err(ShmError::WrongSize {
                instance: instance.to_owned(),
                path: path_text,
                size,
                expected: needed,
            });
        }
        let recorded_total = header.total_size.load(Ordering::Relaxed);
        if recorded_total != needed {
            return Err(corrupt(format!(
                "its header records a total size of {recorded_total} bytes, its counts give {needed}"
            )));
        }
        for (what, found, ours) in [
            (
                "robust mutex",
                header.mutex_size.load(Ordering::Relaxed),
                size_of::<RobustMutex>(),
            ),
            (
                "service record",
                header.service_record_size.load(Ordering::Relaxed),
                size_of::<ServiceRecord>(),
            ),
            (
                "service static record",
                header.service_static_size.load(Ordering::Relaxed),
                size_of::<ServiceStaticRecord>(),
            ),
        ] {
            if found as usize != ours {
                return Err(corrupt(format!(
                    "it was made by a build whose {what} has {found} bytes, this build's has {ours} (a different architecture or C library?)"
                )));
            }
        }
        for (what, found, ours) in [
            (
                "sync block",
                header.sync_offset.load(Ordering::Relaxed),
                layout.sync,
            ),
            (
                "instance record",
                header.instance_offset.load(Ordering::Relaxed),
                layout.instance,
            ),
            (
                "service static records",
                header.service_static_offset.load(Ordering::Relaxed),
                layout.service_static,
            ),
            (
                "startup sequence",
                header.startup_offset.load(Ordering::Relaxed),
                layout.startup,
            ),
            (
                "shutdown sequence",
                header.shutdown_offset.load(Ordering::Relaxed),
                layout.shutdown,
            ),
            (
                "state table",
                header.state_table_offset.load(Ordering::Relaxed),
                layout.state_table,
            ),
            (
                "config blob",
                header.config_blob_offset.load(Ordering::Relaxed),
                layout.config_blob,
            ),
        ] {
            if found != ours as u64 {
                return Err(corrupt(format!(
                    "its header places the {what} at offset {found}, the layout at {ours}"
                )));
            }
        }
        let seg = Segment {
            map: Arc::new(map),
            layout,
            instance: instance.to_owned(),
            path,
        };
        // A mutex whose bytes are not those of a robust shared mutex must never reach glibc,
        // which aborts on an inconsistent one (found by fuzzing).
        for id in MutexId::NAMED {
            if !seg.mutex(id)?.has_expected_kind() {
                return Err(corrupt(format!(
                    "its {id} is not a robust process-shared mutex as ccmgr makes them"
                )));
            }
        }
        // The config image must read back whole: ids, sequences, checksum.
        seg.services()?;
        seg.startup_sequence()?;
        seg.shutdown_sequence()?;
        seg.config_blob()?;
        Ok(seg)
    }

    // ----- removal -----------------------------------------------------------

    /// Remove the name of `instance`'s segment, whoever uses it: for `stop`
    /// once everything is down, and for tests. `false` if there was none.
    /// Processes that have it mapped keep their mapping.
    pub fn remove(instance: &str) -> Result<bool, ShmError> {
        let os_id = segment_os_id(instance)?;
        match nix::sys::mman::shm_unlink(os_id.as_str()) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(ShmError::Io {
                instance: instance.to_owned(),
                path: segment_path(instance)?.display().to_string(),
                action: "removing",
                source: e.into(),
            }),
        }
    }

    /// Remove this segment's name if it still names this segment (not a newer
    /// one created since). `false` if the name is gone or names another file.
    pub fn unlink(&self) -> Result<bool, ShmError> {
        let io_error = |source: io::Error| ShmError::Io {
            instance: self.instance.clone(),
            path: self.path_text(),
            action: "removing",
            source,
        };
        let named = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_error(e)),
        };
        let mine = self.map.file().metadata().map_err(io_error)?;
        if (named.dev(), named.ino()) != (mine.dev(), mine.ino()) {
            return Ok(false);
        }
        Self::remove(&self.instance)
    }

    // ----- mutexes ------------------------------------------------------------

    /// An owning handle on one of the segment's mutexes.
    pub fn mutex(&self, id: MutexId) -> Result<SharedMutex, ShmError> {
        let offset = match id {
            MutexId::Manager => self.layout.sync + offset_of!(SyncBlock, manager),
            MutexId::Daemon => self.layout.sync + offset_of!(SyncBlock, daemon),
            MutexId::DaemonStandby => self.layout.sync + offset_of!(SyncBlock, daemon_standby),
            MutexId::Shm => self.layout.sync + offset_of!(SyncBlock, shm),
        };
        Ok(self
            .map
            .mutex(offset)
            .expect("mutex offsets checked at open"))
    }

    // ----- the config image --------------------------------------------------

    /// Number of services.
    pub fn service_count(&self) -> usize {
        self.layout.counts.services as usize
    }

    /// Service `index`'s static data.
    pub fn service(&self, index: usize) -> Result<ServiceStatic, ShmError> {
        let rec = self.static_record(index)?;
        let len = rec.id_len.load(Ordering::Relaxed) as usize;
        if len == 0 || len > SERVICE_ID_MAX {
            return Err(self.corrupt(format!("service #{index} has an id of {len} bytes")));
        }
        let id = String::from_utf8(read_bytes(&rec.id[..len]))
            .map_err(|_| self.corrupt(format!("the id of service #{index} is not UTF-8")))?;
        Ok(ServiceStatic {
            id,
            startup_timeout_ms: rec.startup_timeout_ms.load(Ordering::Relaxed),
            shutdown_timeout_ms: rec.shutdown_timeout_ms.load(Ordering::Relaxed),
        })
    }

    /// Every service's static data, in index order.
    pub fn services(&self) -> Result<Vec<ServiceStatic>, ShmError> {
        (0..self.service_count()).map(|i| self.service(i)).collect()
    }

    /// The index of the service named `id`.
    pub fn service_index(&self, id: &str) -> Result<Option<usize>, ShmError> {
        for i in 0..self.service_count() {
            if self.service(i)?.id == id {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    fn sequence(&self, startup: bool) -> Result<Vec<u32>, ShmError> {
        let which = if startup { "startup" } else { "shutdown" };
        let seq: Vec<u32> = self
            .sequence_words(startup)
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        check_sequence(which, &seq, self.service_count()).map_err(|e| self.corrupt(e))?;
        Ok(seq)
    }

    /// Service indices in startup order.
    pub fn startup_sequence(&self) -> Result<Vec<u32>, ShmError> {
        self.sequence(true)
    }

    /// Service indices in shutdown order.
    pub fn shutdown_sequence(&self) -> Result<Vec<u32>, ShmError> {
        self.sequence(false)
    }

    /// A copy of the serialized config, checked against its checksum.
    pub fn config_blob(&self) -> Result<Vec<u8>, ShmError> {
        let blob = read_bytes(self.blob_bytes());
        let recorded = self.header().config_blob_checksum.load(Ordering::Relaxed);
        let actual = fnv1a64(blob.iter().copied());
        if actual != recorded {
            return Err(self.corrupt(format!(
                "the config blob's checksum is {actual:#018x}, its header records {recorded:#018x}"
            )));
        }
        Ok(blob)
    }

    // ----- live state --------------------------------------------------------

    /// The generation counter: it changes whenever the state table or the
    /// instance record changes (odd while a change is under way).
    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Acquire)
    }

    /// Read with the generation counter as a sequence lock: retry while a
    /// writer is at work; if one takes long (or died mid-change), read under
    /// the shared-memory mutex instead, which also repairs a dead writer's
    /// generation.
    fn read_consistent<T>(&self, read: impl Fn() -> T) -> Result<T, ShmError> {
        const ATTEMPTS: u32 = 200;
        let generation = &self.header().generation;
        for attempt in 0..ATTEMPTS {
            let before = generation.load(Ordering::Acquire);
            if before % 2 == 0 {
                let value = read();
                fence(Ordering::Acquire);
                if generation.load(Ordering::Relaxed) == before {
                    return Ok(value);
                }
            }
            if attempt < 20 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Bounded: a reader (`status`) must answer, even when the holder never lets go (found
        // by fuzzing: bytes that say "held by a thread that no longer exists" block for ever).
        let guard = self
            .mutex(MutexId::Shm)?
            .lock_timeout(READ_LOCK_LIMIT)
            .map_err(|e| self.mutex_error(MutexId::Shm, e))?
            .ok_or_else(|| ShmError::StateLockHeld {
                instance: self.instance.clone(),
            })?;
        let locked = self.state_writer(guard, false);
        let value = read();
        drop(locked);
        Ok(value)
    }

    /// Service `index`'s state, read consistently.
    pub fn service_status(&self, index: usize) -> Result<ServiceStatus, ShmError> {
        let rec = self.service_record(index)?;
        let r = Ordering::Relaxed;
        let (state, pid, start_time, last_transition_ms, restart_count, last_exit) = self
            .read_consistent(|| {
                (
                    rec.state.load(r),
                    rec.pid.load(r),
                    rec.start_time.load(r),
                    rec.last_transition_ms.load(r),
                    rec.restart_count.load(r),
                    rec.last_exit.load(r),
                )
            })?;
        Ok(ServiceStatus {
            state: ServiceState::try_from(state)
                .map_err(|e| self.unknown(&format!("service #{index}"), e))?,
            process: identity(pid, start_time),
            last_transition_ms,
            restart_count,
            last_exit: LastExit::decode(last_exit)
                .map_err(|e| self.unknown(&format!("service #{index}"), e))?,
        })
    }

    /// Service `index`'s recorded process, read consistently (no decoding of
    /// other fields, so it works even if they are corrupt).
    pub fn service_process(&self, index: usize) -> Result<Option<ProcessIdentity>, ShmError> {
        let rec = self.service_record(index)?;
        let (pid, start_time) = self.read_consistent(|| {
            (
                rec.pid.load(Ordering::Relaxed),
                rec.start_time.load(Ordering::Relaxed),
            )
        })?;
        Ok(identity(pid, start_time))
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

    /// The instance's state, read consistently.
    pub fn instance_status(&self) -> Result<InstanceStatus, ShmError> {
        let inst = self.instance_record();
        let r = Ordering::Relaxed;
        let raw = self.read_consistent(|| {
            (
                [
                    inst.state.load(r),
                    inst.restarts_in_window.load(r),
                    inst.gave_up_reason.load(r),
                    inst.gave_up_service.load(r),
                ],
                [
                    inst.manager_pid.load(r),
                    inst.coordinator_pid.load(r),
                    inst.standby_pid.load(r),
                    inst.keeper_pid.load(r),
                ],
                [
                    inst.manager_start_time.load(r),
                    inst.coordinator_start_time.load(r),
                    inst.standby_start_time.load(r),
                    inst.keeper_start_time.load(r),
                    inst.window_start_ms.load(r),
                    inst.last_transition_ms.load(r),
                ],
            )
        })?;
        let ([state, restarts, reason, service], [mp, cp, sp, kp], [mt, ct, st, kt, window, last]) =
            raw;
        let gave_up = match reason {
            0 => None,
            reason => Some(GaveUp {
                reason: GiveUpReason::try_from(reason)
                    .map_err(|e| self.unknown("the instance record", e))?,
                service: match service {
                    u32::MAX => None,
                    s if (s as usize) < self.service_count() => Some(s as usize),
                    s => {
                        return Err(self.corrupt(format!(
                            "the instance gave up on service #{s}, beyond the service count"
                        )));
                    }
                },
            }),
        };
        Ok(InstanceStatus {
            state: InstanceState::try_from(state)
                .map_err(|e| self.unknown("the instance record", e))?,
            last_transition_ms: last,
            manager: identity(mp, mt),
            coordinator: identity(cp, ct),
            standby: identity(sp, st),
            keeper: identity(kp, kt),
            restarts_in_window: restarts,
            window_start_ms: window,
            gave_up,
        })
    }

    /// Service `index`'s progress (the engine's intent), read consistently.
    pub fn service_progress(&self, index: usize) -> Result<ServiceProgress, ShmError> {
        let rec = self.service_record(index)?;
        let r = Ordering::Relaxed;
        let ([want, stage, flags, streak, exited], [since, deadline, started, not_before, failed]) =
            self.read_consistent(|| {
                (
                    [
                        rec.want.load(r),
                        rec.stage.load(r),
                        rec.progress_flags.load(r),
                        rec.streak.load(r),
                        rec.exited_pid.load(r) as u32,
                    ],
                    [
                        rec.process_since_ms.load(r),
                        rec.deadline_ms1.load(r),
                        rec.started_at_ms1.load(r),
                        rec.not_before_ms.load(r),
                        rec.last_failure_ms1.load(r),
                    ],
                )
            })?;
        let what = format!("service #{index}");
        Ok(ServiceProgress {
            want: Want::try_from(want).map_err(|e| self.unknown(&what, e))?,
            stage: Stage::try_from(stage).map_err(|e| self.unknown(&what, e))?,
            killed: flags & PROGRESS_KILLED != 0,
            start_timed_out: flags & PROGRESS_START_TIMED_OUT != 0,
            asked: flags & PROGRESS_ASKED != 0,
            process_since_ms: since,
            deadline_ms: from_ms1(deadline),
            started_at_ms: from_ms1(started),
            not_before_ms: not_before,
            streak,
            last_failure_ms: from_ms1(failed),
            exited_pid: (exited as i32 > 0).then_some(exited as i32),
        })
    }

    /// The instance's progress (why it is stopping, the sequence deadline), read consistently.
    pub fn instance_progress(&self) -> Result<InstanceProgress, ShmError> {
        let inst = self.instance_record();
        let r = Ordering::Relaxed;
        let ([kind, service, failure, restarts], [exit, deadline]) =
            self.read_consistent(|| {
                (
                    [
                        inst.stop_kind.load(r),
                        inst.stop_service.load(r),
                        inst.stop_failure.load(r),
                        inst.stop_restarts.load(r),
                    ],
                    [inst.stop_exit.load(r), inst.sequence_deadline_ms1.load(r)],
                )
            })?;
        let what = "the instance record";
        let stopping_for = match kind {
            0 => None,
            kind => Some(StopIntent {
                kind: StopKind::try_from(kind).map_err(|e| self.unknown(what, e))?,
                service: match service {
                    u32::MAX => None,
                    s if (s as usize) < self.service_count() => Some(s as usize),
                    s => {
                        return Err(self.corrupt(format!(
                            "the instance is stopping for service #{s}, beyond the service count"
                        )));
                    }
                },
                failure: match failure {
                    0 => None,
                    f => Some(FailureCode::try_from(f).map_err(|e| self.unknown(what, e))?),
                },
                exit: LastExit::decode(exit).map_err(|e| self.unknown(what, e))?,
                restarts,
            }),
        };
        Ok(InstanceProgress {
            stopping_for,
            sequence_deadline_ms: from_ms1(deadline),
        })
    }

    /// Lock the shared-memory mutex to change the state table or the instance
    /// record. The generation is odd until the writer is dropped.
    pub fn write(&self) -> Result<StateWriter<'_>, ShmError> {
        self.lock_state(true)
    }

    fn lock_state(&self, bump: bool) -> Result<StateWriter<'_>, ShmError> {
        let guard = self
            .mutex(MutexId::Shm)?
            .lock()
            .map_err(|e| self.mutex_error(MutexId::Shm, e))?;
        Ok(self.state_writer(guard, bump))
    }

    /// The state lock, `guard`, made a writer (`bump`) or a reader's hold.
    fn state_writer(&self, guard: MutexGuard, bump: bool) -> StateWriter<'_> {
        let generation = &self.header().generation;
        let mut g = generation.load(Ordering::Relaxed);
        if g % 2 == 1 {
            // A writer died mid-change (the guard says so too): close its change.
            g += 1;
            generation.store(g, Ordering::Release);
        }
        if bump {
            // Plain load and store: the mutex makes us the only writer.
            generation.store(g + 1, Ordering::Relaxed);
            fence(Ordering::Release);
        }
        StateWriter {
            seg: self,
            guard,
            generation: bump.then_some(g),
        }
    }

    // ----- stale state -------------------------------------------------------

    /// Find out who, if anyone, still uses `instance`'s segment. The probe
    /// try-locks the manager, daemon and component mutexes and releases every
    /// one before returning (a mutex whose holder died is made consistent by
    /// this, so the owner-died notice is consumed).
    pub fn probe(instance: &str) -> Result<Probe, ShmError> {
        let seg = match Self::open(instance) {
            Ok(seg) => seg,
            Err(ShmError::NotFound { .. }) => return Ok(Probe::Absent),
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

    /// Remove `instance`'s segment if it is stale (every process that used it
    /// is dead). Refuses with [`ShmError::AlreadyRunning`] while a coordinator
    /// lives, [`ShmError::BeingStarted`] during a start, and
    /// [`ShmError::StillInUse`] while other recorded processes live. A segment
    /// that fails the checks of [`open`](Self::open) is not touched.
    pub fn reclaim_stale(instance: &str) -> Result<Reclaimed, ShmError> {
        let seg = match Self::open(instance) {
            Ok(seg) => seg,
            Err(ShmError::NotFound { .. }) => return Ok(Reclaimed::Absent),
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

/// Exclusive write access to the live state, under the shared-memory mutex.
/// Readers see the changes made through one writer as one change: the
/// generation counter is odd from [`Segment::write`] until the writer drops.
pub struct StateWriter<'a> {
    seg: &'a Segment,
    guard: MutexGuard,
    /// The even generation the change started from; `None` for a read lock.
    generation: Option<u64>,
}

impl StateWriter<'_> {
    /// True if the previous holder of the shared-memory mutex died holding
    /// it: the records may hold a half-made change.
    pub fn previous_holder_died(&self) -> bool {
        self.guard.previous_holder_died()
    }

    fn record(&self, index: usize) -> Result<&ServiceRecord, ShmError> {
        self.seg.service_record(index)
    }

    fn instance(&self) -> &InstanceRecord {
        self.seg.instance_record()
    }

    /// Set the instance state and the time of the change (monotonic ms).
    pub fn set_instance_state(&self, state: InstanceState, at_ms: u64) {
        let inst = self.instance();
        inst.state.store(state.as_u32(), Ordering::Relaxed);
        inst.last_transition_ms.store(at_ms, Ordering::Relaxed);
    }

    fn set_party(
        pid: &std::sync::atomic::AtomicI32,
        start: &std::sync::atomic::AtomicU64,
        p: Option<ProcessIdentity>,
    ) {
        let p = p.unwrap_or(ProcessIdentity {
            pid: 0,
            start_time: 0,
        });
        pid.store(p.pid, Ordering::Relaxed);
        start.store(p.start_time, Ordering::Relaxed);
    }

    /// Record (or clear) the manager.
    pub fn set_manager(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.manager_pid, &i.manager_start_time, p);
    }

    /// Record (or clear) the coordinator.
    pub fn set_coordinator(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.coordinator_pid, &i.coordinator_start_time, p);
    }

    /// Record (or clear) the standby.
    pub fn set_standby(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.standby_pid, &i.standby_start_time, p);
    }

    /// Record (or clear) the keeper.
    pub fn set_keeper(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.keeper_pid, &i.keeper_start_time, p);
    }

    /// Record the restart window: restarts counted since `window_start_ms`.
    pub fn set_restart_window(&self, restarts_in_window: u32, window_start_ms: u64) {
        let i = self.instance();
        i.restarts_in_window
            .store(restarts_in_window, Ordering::Relaxed);
        i.window_start_ms.store(window_start_ms, Ordering::Relaxed);
    }

    /// Record why the instance gave up (or clear it).
    pub fn set_gave_up(&self, gave_up: Option<GaveUp>) -> Result<(), ShmError> {
        let (reason, service) = match gave_up {
            None => (0, u32::MAX),
            Some(g) => {
                let service = match g.service {
                    None => u32::MAX,
                    Some(s) => {
                        self.seg.check_index(s)?;
                        s as u32
                    }
                };
                (g.reason.as_u32(), service)
            }
        };
        let i = self.instance();
        i.gave_up_reason.store(reason, Ordering::Relaxed);
        i.gave_up_service.store(service, Ordering::Relaxed);
        Ok(())
    }

    /// Set service `index`'s state and the time of the change (monotonic ms).
    pub fn set_service_state(
        &self,
        index: usize,
        state: ServiceState,
        at_ms: u64,
    ) -> Result<(), ShmError> {
        let rec = self.record(index)?;
        rec.state.store(state.as_u32(), Ordering::Relaxed);
        rec.last_transition_ms.store(at_ms, Ordering::Relaxed);
        Ok(())
    }

    /// Record (or clear) service `index`'s process.
    pub fn set_service_process(
        &self,
        index: usize,
        p: Option<ProcessIdentity>,
    ) -> Result<(), ShmError> {
        let rec = self.record(index)?;
        Self::set_party(&rec.pid, &rec.start_time, p);
        Ok(())
    }

    /// Service `index`'s restart count.
    pub fn restart_count(&self, index: usize) -> Result<u32, ShmError> {
        Ok(self.record(index)?.restart_count.load(Ordering::Relaxed))
    }

    /// Set service `index`'s restart count.
    pub fn set_restart_count(&self, index: usize, count: u32) -> Result<(), ShmError> {
        self.record(index)?
            .restart_count
            .store(count, Ordering::Relaxed);
        Ok(())
    }

    /// Record how service `index`'s last process ended.
    pub fn set_last_exit(&self, index: usize, exit: Option<LastExit>) -> Result<(), ShmError> {
        self.record(index)?
            .last_exit
            .store(LastExit::encode(exit), Ordering::Relaxed);
        Ok(())
    }
    /// Record the engine's progress on service `index`.
    pub fn set_service_progress(&self, index: usize, p: &ServiceProgress) -> Result<(), ShmError> {
        let rec = self.record(index)?;
        let r = Ordering::Relaxed;
        let flags = [
            (p.killed, PROGRESS_KILLED),
            (p.start_timed_out, PROGRESS_START_TIMED_OUT),
            (p.asked, PROGRESS_ASKED),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .fold(0, |acc, (_, bit)| acc | bit);
        rec.want.store(p.want.as_u32(), r);
        rec.stage.store(p.stage.as_u32(), r);
        rec.progress_flags.store(flags, r);
        rec.streak.store(p.streak, r);
        rec.process_since_ms.store(p.process_since_ms, r);
        rec.deadline_ms1.store(to_ms1(p.deadline_ms), r);
        rec.started_at_ms1.store(to_ms1(p.started_at_ms), r);
        rec.not_before_ms.store(p.not_before_ms, r);
        rec.last_failure_ms1.store(to_ms1(p.last_failure_ms), r);
        rec.exited_pid.store(p.exited_pid.unwrap_or(0), r);
        Ok(())
    }

    /// Record the engine's progress on the instance.
    pub fn set_instance_progress(&self, p: &InstanceProgress) -> Result<(), ShmError> {
        let i = self.instance();
        let r = Ordering::Relaxed;
        let (kind, service, failure, exit, restarts) = match p.stopping_for {
            None => (0, u32::MAX, 0, None, 0),
            Some(s) => {
                let service = match s.service {
                    None => u32::MAX,
                    Some(index) => {
                        self.seg.check_index(index)?;
                        index as u32
                    }
                };
                let failure = s.failure.map_or(0, FailureCode::as_u32);
                (s.kind.as_u32(), service, failure, s.exit, s.restarts)
            }
        };
        i.stop_kind.store(kind, r);
        i.stop_service.store(service, r);
        i.stop_failure.store(failure, r);
        i.stop_restarts.store(restarts, r);
        i.stop_exit.store(LastExit::encode(exit), r);
        i.sequence_deadline_ms1
            .store(to_ms1(p.sequence_deadline_ms), r);
        Ok(())
    }
}

impl Drop for StateWriter<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.generation {
            // Publish the change: even again, released to readers. The guard
            // (a field) unlocks after this body.
            self.seg.header().generation.store(g + 2, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names() {
        for ok in ["a", "web-1", "A.b_c-9", &"x".repeat(64)] {
            assert!(validate_instance_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "é", "..\0", &"x".repeat(65), "a~b"] {
            let e = validate_instance_name(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid instance name"), "{e}");
        }
        assert_eq!(segment_os_id("x").unwrap(), "/ccmgr.x");
        assert_eq!(segment_path("x").unwrap(), Path::new("/dev/shm/ccmgr.x"));
    }

    fn spec() -> SegmentSpec {
        SegmentSpec {
            instance: "unit".into(),
            group: None,
            services: vec![
                ServiceStatic {
                    id: "db".into(),
                    startup_timeout_ms: 1000,
                    shutdown_timeout_ms: 2000,
                },
                ServiceStatic {
                    id: "web".into(),
                    startup_timeout_ms: 3000,
                    shutdown_timeout_ms: 4000,
                },
            ],
            startup_sequence: vec![0, 1],
            shutdown_sequence: vec![1, 0],
            config_blob: b"{}".to_vec(),
        }
    }

    #[test]
    fn spec_checks() {
        assert!(check_spec(&spec()).is_ok());
        let mut s = spec();
        s.services[1].id = "db".into();
        assert!(check_spec(&s).unwrap_err().contains("twice"));
        let mut s = spec();
        s.services[0].id = "x".repeat(65);
        assert!(check_spec(&s).unwrap_err().contains("1 to 64 bytes"));
        let mut s = spec();
        s.services[0].id.clear();
        assert!(check_spec(&s).is_err());
        let mut s = spec();
        s.startup_sequence = vec![0, 2];
        assert!(check_spec(&s).unwrap_err().contains("names service #2"));
        let mut s = spec();
        s.shutdown_sequence = vec![1, 1];
        assert!(check_spec(&s).unwrap_err().contains("twice"));
        let mut s = spec();
        s.startup_sequence = vec![1];
        assert!(
            check_spec(&s).is_ok(),
            "a partial sequence is the graph's business"
        );
    }

    #[test]
    fn error_messages_read_as_sentences() {
        let e = ShmError::WrongOwner {
            instance: "x".into(),
            path: "/dev/shm/ccmgr.x".into(),
            owner: 65534,
            expected: 0,
        };
        assert_eq!(
            e.to_string(),
            "segment /dev/shm/ccmgr.x of instance x was created by uid 65534, not by uid 0: refusing to use it"
        );
        let e = ShmError::AlreadyRunning {
            instance: "x".into(),
            coordinator_pid: Some(42),
        };
        assert_eq!(
            e.to_string(),
            "instance x is already running (coordinator pid 42)"
        );
    }
}

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
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::error::*;
use super::layout::{
    Counts, Header, InstanceRecord, LAYOUT_VERSION, Layout, MAGIC, MAX_CONFIG_BLOB, MAX_SERVICES,
    SERVICE_ID_MAX, ServiceRecord, ServiceStaticRecord, SyncBlock, fnv1a64,
};
use super::mapping::{Access, CreateStep, Mapping, ReadWrite, Unpublished};
use super::robust::{MutexError, MutexGuard, RobustMutex, SharedMutex};
use super::state::{InstanceState, LastExit, MutexId, ServiceState, UnknownValue};
use crate::process_identity::ProcessIdentity;

/// The directory where glibc's `shm_open` keeps its objects.
pub const SHM_DIR: &str = "/dev/shm";

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

/// The mapped segment of one instance. Cheap to clone (the mapping is shared);
/// `Send + Sync`.
#[derive(Clone)]
pub struct Segment {
    pub(super) map: Arc<Mapping<ReadWrite>>,
    pub(super) layout: Layout,
    pub(super) instance: String,
    pub(super) path: PathBuf,
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
pub(super) fn identity(pid: i32, start_time: u64) -> Option<ProcessIdentity> {
    (pid > 0).then_some(ProcessIdentity { pid, start_time })
}

/// An optional time stored plus one, so that a zeroed record means "none".
pub(super) fn to_ms1(ms: Option<u64>) -> u64 {
    ms.map_or(0, |ms| ms.saturating_add(1))
}

pub(super) fn from_ms1(word: u64) -> Option<u64> {
    word.checked_sub(1)
}

pub(super) fn read_bytes(bytes: &[AtomicU8]) -> Vec<u8> {
    bytes.iter().map(|b| b.load(Ordering::Relaxed)).collect()
}

pub(super) fn write_bytes(dst: &[AtomicU8], src: &[u8]) {
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Ordering::Relaxed);
    }
}

pub(super) fn check_spec(spec: &SegmentSpec) -> Result<Layout, String> {
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
pub(super) fn check_sequence(which: &str, seq: &[u32], services: usize) -> Result<(), String> {
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
pub(super) fn max_segment_size() -> u64 {
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

    pub(super) fn path_text(&self) -> String {
        self.path.display().to_string()
    }

    pub(super) fn corrupt(&self, detail: impl Into<String>) -> ShmError {
        ShmError::Corrupt {
            instance: self.instance.clone(),
            path: self.path_text(),
            detail: detail.into(),
        }
    }

    pub(super) fn unknown(&self, what: &str, e: UnknownValue) -> ShmError {
        self.corrupt(format!("{what}: {e}"))
    }

    pub(super) fn mutex_error(&self, which: MutexId, source: MutexError) -> ShmError {
        ShmError::Mutex {
            instance: self.instance.clone(),
            which,
            source,
        }
    }

    pub(super) fn check_index(&self, index: usize) -> Result<(), ShmError> {
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

    pub(super) fn header(&self) -> &Header {
        self.map.get(0).expect("header checked at open")
    }

    pub(super) fn instance_record(&self) -> &InstanceRecord {
        self.map
            .get(self.layout.instance)
            .expect("instance record checked at open")
    }

    pub(super) fn static_record(&self, index: usize) -> Result<&ServiceStaticRecord, ShmError> {
        self.check_index(index)?;
        Ok(self
            .map
            .get(self.layout.service_static_at(index))
            .expect("service static records checked at open"))
    }

    pub(super) fn service_record(&self, index: usize) -> Result<&ServiceRecord, ShmError> {
        self.check_index(index)?;
        Ok(self
            .map
            .get(self.layout.service_record_at(index))
            .expect("state table checked at open"))
    }

    pub(super) fn sequence_words(&self, startup: bool) -> &[AtomicU32] {
        let (offset, len) = if startup {
            (self.layout.startup, self.layout.counts.startup_len)
        } else {
            (self.layout.shutdown, self.layout.counts.shutdown_len)
        };
        self.map
            .slice(offset, len as usize)
            .expect("sequences checked at open")
    }

    pub(super) fn blob_bytes(&self) -> &[AtomicU8] {
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
    pub(super) fn write_image(&self, spec: &SegmentSpec, manager: ProcessIdentity) {
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
        let map = Mapping::<ReadWrite>::map(file.into(), size as usize)
            .map_err(|e| io_error("mapping", e))?;
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

    pub(super) fn sequence(&self, startup: bool) -> Result<Vec<u32>, ShmError> {
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
}

//! The segment of one instance: the [`Segment`] handle, the instance name's check, the spec a
//! segment is built from (its file, `<run_dir>/<instance>.seg`, is named by
//! [`state_dir`](super::state_dir), which says why no one else can take that name), the
//! bounds-checked views
//! of its regions that every other part goes through, its mutexes and its config image (the
//! read-only part written once at creation). The other parts of a segment's life are beside
//! it: [`open`](super::open) builds and verifies the file, [`status`](super::status) reads and
//! writes the live state, [`reclaim`](super::reclaim) finds and removes stale state.
//! No unsafe code: raw memory is reached only through the private `mapping` module.

use std::fmt;
use std::mem::offset_of;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use super::error::ShmError;
use super::layout::{
    Header, InstanceRecord, Layout, SERVICE_ID_MAX, ServiceRecord, ServiceStaticRecord, SyncBlock,
    fnv1a64,
};
use super::mapping::{Mapping, ReadWrite};
use super::open::check_sequence;
use super::robust::{MutexError, SharedMutex};
use super::state::{MutexId, UnknownValue};
use crate::process_identity::ProcessIdentity;

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
    /// The instance's `run_dir`, where the segment is made (`<run_dir>/<instance>.seg`); it
    /// must be the creator's and trusted (see [`state_dir`](super::state_dir)).
    pub run_dir: PathBuf,
    /// `Some(gid)`: the segment gets mode 0640 and that group (whose members may read the
    /// status, never write); else 0600.
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

fn read_bytes(bytes: &[AtomicU8]) -> Vec<u8> {
    bytes.iter().map(|b| b.load(Ordering::Relaxed)).collect()
}

pub(super) fn write_bytes(dst: &[AtomicU8], src: &[u8]) {
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Ordering::Relaxed);
    }
}

impl Segment {
    // ----- naming and errors -------------------------------------------------

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The segment's path (`<run_dir>/<instance>.seg`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device and inode of the file behind the mapping (`st_dev`, `st_ino`): a process
    /// that maps this very file shows them in `/proc/<pid>/maps`, which is how `stop` proves
    /// a recorded keeper, coordinator or standby is the instance's (see `crate::membership`).
    pub fn file_id(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = self.map.file().metadata()?;
        Ok((meta.dev(), meta.ino()))
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

    /// Lets go of this process's resident pages of the segment (the bytes stay in the file;
    /// the next access maps them again): for the standby, which read the whole segment when it
    /// opened it and then only waits. Best effort: a failure only leaves them resident.
    pub fn release_resident_pages(&self) {
        if let Err(e) = self.map.release_resident() {
            tracing::debug!(instance = %self.instance, error = %e, "madvise(MADV_DONTNEED) of the segment failed");
        }
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
    }
}

//! Creating, opening and verifying an instance's segment file, and removing its name.
//!
//! Creation builds the file with no name (`O_TMPFILE`) and links it in only once complete,
//! so no reader ever sees it half-written; opening checks everything a reader relies on
//! before any region is reached (owner, mode, size, magic, version, counts, offsets, the
//! config image's checksum), so that every later view is in bounds. Kept apart from the
//! state readers and writers because it is the only code that trusts nothing in the file:
//! after it, the layout is known good. No unsafe code.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::error::ShmError;
use super::layout::{
    Counts, Header, LAYOUT_VERSION, Layout, MAGIC, MAX_CONFIG_BLOB, MAX_SERVICES, SERVICE_ID_MAX,
    ServiceRecord, ServiceStaticRecord, fnv1a64,
};
use super::mapping::{Access, CreateStep, Mapping, ReadWrite, Unpublished};
use super::robust::{MutexGuard, RobustMutex};
use super::segment::{SHM_DIR, Segment, SegmentSpec, segment_os_id, segment_path, write_bytes};
use super::state::{InstanceState, LastExit, MutexId, ServiceState};
use crate::process_identity::ProcessIdentity;

/// Every service id a segment or control segment is made with: 1 to [`SERVICE_ID_MAX`] bytes,
/// no NUL (the records hold them in fixed fields), none twice.
pub(super) fn check_service_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        if id.is_empty() || id.len() > SERVICE_ID_MAX || id.contains('\0') {
            return Err(format!(
                "service #{i} has id {id:?}: ids have 1 to {SERVICE_ID_MAX} bytes and no NUL"
            ));
        }
        if !seen.insert(id) {
            return Err(format!("service id {id:?} appears twice"));
        }
    }
    Ok(())
}

fn check_spec(spec: &SegmentSpec) -> Result<Layout, String> {
    let n = spec.services.len();
    if n > MAX_SERVICES as usize {
        return Err(format!(
            "{n} services, more than the {MAX_SERVICES} a segment holds"
        ));
    }
    check_service_ids(spec.services.iter().map(|s| s.id.as_str()))?;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::segment::ServiceStatic;

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

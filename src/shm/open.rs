//! Creating, opening and verifying an instance's segment file, and removing its name.
//!
//! Creation builds the file with no name (`O_TMPFILE`) in the instance's `run_dir` and links
//! it in only once complete, so no reader ever sees it half-written; opening checks the
//! directory first ([`trusted_dir`]), then everything a reader relies on before any region is
//! reached (owner, mode, size, magic, version, counts, offsets, the config image's checksum),
//! so that every later view is in bounds. Kept apart from the state readers and writers
//! because it is the only code that trusts nothing in the file: after it, the layout is known
//! good. No unsafe code.
//!
//! Two ways to open:
//! - [`Segment::open`], for the instance's owner (the keeper, the coordinator, `stop`): the
//!   live file, mapped read-write (`MAP_SHARED`), with its robust mutexes.
//! - [`Segment::open_snapshot`], for everyone else allowed to read it (the members of the
//!   instance's group, mode 0640): the file is opened `O_RDONLY`, its bytes are copied while
//!   the generation counter says no change was under way (the sequence lock the state's
//!   writers keep), and the copy, in a private memory file, is verified and read by the same
//!   code. Nothing can then write the real segment or take its mutexes through that handle,
//!   and the copy cannot change between its verification and its reading.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use super::error::ShmError;
use super::layout::{
    Counts, Header, LAYOUT_VERSION, Layout, MAGIC, MAX_CONFIG_BLOB, MAX_SERVICES, SERVICE_ID_MAX,
    ServiceRecord, ServiceStaticRecord, fnv1a64,
};
use super::mapping::{Access, CreateStep, Mapping, ReadWrite, Unpublished, remove_temp_leftovers};
use super::robust::{MutexGuard, RobustMutex};
use super::segment::{Segment, SegmentSpec, write_bytes};
use super::state::{InstanceState, LastExit, MutexId, ServiceState};
use super::state_dir::{segment_path, trusted_dir};
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

/// Open the segment file at `path` (`O_NOFOLLOW`: a link there is no segment), read-write or
/// read-only.
fn open_segment_file(instance: &str, path: &Path, write: bool) -> Result<std::fs::File, ShmError> {
    let path_text = path.display().to_string();
    match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ShmError::NotFound {
            instance: instance.to_owned(),
            path: path_text,
        }),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(ShmError::NotRegularFile {
            instance: instance.to_owned(),
            path: path_text,
        }),
        Err(e) => Err(ShmError::Io {
            instance: instance.to_owned(),
            path: path_text,
            action: if write {
                "opening (read-write)"
            } else {
                "opening (read-only)"
            },
            source: e,
        }),
    }
}

/// The checks of an open segment file before anything in it is read: its owner is the
/// instance's (`owner`), it is a regular file that no one else may write (mode 0600, or 0640
/// for the instance's group), and its size lies between the header's and the largest layout's.
/// Returns its size.
fn examine(instance: &str, path: &Path, file: &std::fs::File, owner: u32) -> Result<u64, ShmError> {
    let path_text = path.display().to_string();
    let meta = file.metadata().map_err(|e| ShmError::Io {
        instance: instance.to_owned(),
        path: path_text.clone(),
        action: "examining",
        source: e,
    })?;
    if meta.uid() != owner {
        return Err(ShmError::WrongOwner {
            instance: instance.to_owned(),
            path: path_text,
            owner: meta.uid(),
            expected: owner,
        });
    }
    if !meta.file_type().is_file() {
        return Err(ShmError::NotRegularFile {
            instance: instance.to_owned(),
            path: path_text,
        });
    }
    if meta.mode() & 0o027 != 0 {
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
    Ok(size)
}

/// How many times [`consistent_copy`] tries before it gives up on a writer that never lets go.
const COPY_ATTEMPTS: u32 = 200;

/// The `size` bytes of `file`, read while no writer was at work: the generation counter (the
/// writers' sequence lock) was even before the copy and the same after it. `None` if no
/// attempt of [`COPY_ATTEMPTS`] found it so (a writer that died mid-change, or a very busy
/// one): the reader cannot repair that, only the owner can.
fn consistent_copy(file: &std::fs::File, size: usize) -> io::Result<Option<Vec<u8>>> {
    let at = std::mem::offset_of!(Header, generation) as u64;
    let generation = || -> io::Result<u64> {
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, at)?;
        Ok(u64::from_ne_bytes(word))
    };
    let mut bytes = vec![0u8; size];
    for attempt in 0..COPY_ATTEMPTS {
        let before = generation()?;
        if before % 2 == 0 {
            file.read_exact_at(&mut bytes, 0)?;
            if generation()? == before {
                // The copy's own counter must say the same (it was read in the middle).
                bytes[at as usize..at as usize + 8].copy_from_slice(&before.to_ne_bytes());
                return Ok(Some(bytes));
            }
        }
        if attempt < 20 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    Ok(None)
}

impl Segment {
    // ----- creation ----------------------------------------------------------

    /// Create the segment of `spec.instance`, exclusively.
    ///
    /// `spec.run_dir` must be the caller's and trusted ([`trusted_dir`]). The file is built
    /// with no name (`O_TMPFILE`), so no one sees it half made, then linked to
    /// `<run_dir>/<instance>.seg`; `AlreadyExists` if that name is taken. Mode 0600, or 0640
    /// with group `spec.group` (its members may read the status, never write). The segment
    /// outlives the caller: remove it with [`unlink`](Self::unlink) or
    /// [`remove`](Self::remove).
    ///
    /// The manager mutex comes back locked by the calling thread, and the
    /// calling process is recorded as the manager: a start is under way, and a
    /// concurrent `start` sees so. Drop the guard when the start is over.
    pub fn create(spec: &SegmentSpec) -> Result<(Segment, MutexGuard), ShmError> {
        let dir = trusted_dir(&spec.run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = segment_path(&dir.path, &spec.instance)?;
        Self::create_named(spec, path)
    }

    /// The name a reload builds the instance's next segment under (`<instance>.seg.reload`),
    /// before the keeper renames it over `<instance>.seg` ([`Segment::promote_staged`]).
    pub fn staged_path(run_dir: &Path, instance: &str) -> Result<PathBuf, ShmError> {
        let mut path = segment_path(run_dir, instance)?.into_os_string();
        path.push(".reload");
        Ok(PathBuf::from(path))
    }

    /// Creates a complete segment for `spec` under the staged name (a leftover of an earlier
    /// attempt is replaced), made like [`Segment::create`]: no one sees it half written. Its
    /// manager mutex is free and no manager is recorded: no start is under way.
    pub fn create_staged(spec: &SegmentSpec) -> Result<Segment, ShmError> {
        let dir = trusted_dir(&spec.run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = Self::staged_path(&dir.path, &spec.instance)?;
        let _ = std::fs::remove_file(&path);
        let (segment, manager) = Self::create_named(spec, path)?;
        drop(manager);
        segment.write()?.set_manager(None);
        Ok(segment)
    }

    /// Opens the staged segment of `instance`, checked as [`Segment::open`] checks the live
    /// one.
    pub fn open_staged(run_dir: &Path, instance: &str) -> Result<Segment, ShmError> {
        let dir = trusted_dir(run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = Self::staged_path(&dir.path, instance)?;
        Self::open_live_at(instance, path, dir.owner)
    }

    /// Renames the staged segment (opened by [`Segment::open_staged`]) over
    /// `<instance>.seg`: one `rename`, so whoever opens the instance's segment gets the old
    /// one or the new one, whole. Returns it under its new name.
    pub fn promote_staged(self) -> Result<Segment, ShmError> {
        let live = self
            .path
            .parent()
            .map(|dir| segment_path(dir, &self.instance))
            .transpose()?
            .unwrap_or_default();
        std::fs::rename(&self.path, &live).map_err(|e| ShmError::Io {
            instance: self.instance.clone(),
            path: live.display().to_string(),
            action: "renaming the reloaded segment over",
            source: e,
        })?;
        Ok(Segment {
            map: self.map,
            layout: self.layout,
            instance: self.instance,
            path: live,
        })
    }

    /// [`Segment::create`] under the name `path`.
    fn create_named(spec: &SegmentSpec, path: PathBuf) -> Result<(Segment, MutexGuard), ShmError> {
        let instance = spec.instance.clone();
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

        let mut fresh = Unpublished::create(&path, layout.total_size, Access { group: spec.group })
            .map_err(|(step, e)| {
                io_error(
                    match step {
                        CreateStep::Open => "creating (unnamed, in its directory)",
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

    /// Open the live segment of `instance` in `run_dir`, read-write: for the instance's owner
    /// (the effective uid must own `run_dir`, which must be trusted, and the segment).
    /// Checks, in order: the directory, owner, file type and mode, size, magic, layout
    /// version, counts, record sizes, region offsets, total size, the config image and the
    /// blob's checksum.
    pub fn open(run_dir: &Path, instance: &str) -> Result<Segment, ShmError> {
        let dir = trusted_dir(run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = segment_path(&dir.path, instance)?;
        Self::open_live_at(instance, path, dir.owner)
    }

    /// The segment file at `path` (in a trusted directory whose owner is `owner`), opened
    /// read-write, examined, mapped and verified: the live segment, or the staged one.
    fn open_live_at(instance: &str, path: PathBuf, owner: u32) -> Result<Segment, ShmError> {
        let file = open_segment_file(instance, &path, true)?;
        let size = examine(instance, &path, &file, owner)?;
        let map =
            Mapping::<ReadWrite>::map(file.into(), size as usize).map_err(|e| ShmError::Io {
                instance: instance.to_owned(),
                path: path.display().to_string(),
                action: "mapping",
                source: e,
            })?;
        Self::verify(instance, path, map, size)
    }

    /// A consistent private copy of the segment of `instance` in `run_dir`, for a reader that
    /// may read it but not write it (a member of the instance's group; the owner too, if it
    /// wants no live mapping). The instance's owner is the owner of `run_dir` (which must be
    /// trusted for it), and the segment must be theirs and writable by no one else.
    ///
    /// The file is opened `O_RDONLY`; its bytes are read (`pread`) while the generation
    /// counter is even and unchanged across the copy (the writers' sequence lock), a bounded
    /// number of times, into a private memory file that the returned [`Segment`] maps and
    /// verifies like a live one. Writing through it, or locking its mutexes, changes only the
    /// copy; the copy cannot change between its verification and its reading.
    pub fn open_snapshot(run_dir: &Path, instance: &str) -> Result<Segment, ShmError> {
        let dir = trusted_dir(run_dir, None)?;
        let path = segment_path(&dir.path, instance)?;
        let path_text = path.display().to_string();
        let io_error = |action: &'static str, source: io::Error| ShmError::Io {
            instance: instance.to_owned(),
            path: path_text.clone(),
            action,
            source,
        };
        let file = open_segment_file(instance, &path, false)?;
        let size = examine(instance, &path, &file, dir.owner)?;
        let bytes = consistent_copy(&file, size as usize)
            .map_err(|e| io_error("reading", e))?
            .ok_or_else(|| ShmError::NoConsistentCopy {
                instance: instance.to_owned(),
                path: path_text.clone(),
                attempts: COPY_ATTEMPTS,
            })?;
        let copy = nix::sys::memfd::memfd_create(
            c"ccmgr-status-snapshot",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(|e| io_error("copying (memfd_create) to read", e.into()))?;
        let copy = std::fs::File::from(copy);
        copy.write_all_at(&bytes, 0)
            .map_err(|e| io_error("copying to read", e))?;
        let map = Mapping::<ReadWrite>::map(copy.into(), size as usize)
            .map_err(|e| io_error("mapping the copy of", e))?;
        Self::verify(instance, path, map, size)
    }

    /// Check a mapped segment of `size` bytes (already found between the header's size and the
    /// largest layout) before any region is reached.
    fn verify(
        instance: &str,
        path: PathBuf,
        map: Mapping<ReadWrite>,
        size: u64,
    ) -> Result<Segment, ShmError> {
        let path_text = path.display().to_string();
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

    /// Remove the name of `instance`'s segment in `run_dir`, whoever uses it (and what a
    /// creator killed mid-way left on a file system without `O_TMPFILE`): for `stop` once
    /// everything is down, and for tests. `false` if there was none. Processes that have it
    /// mapped keep their mapping. `run_dir` must be the caller's and trusted: names are
    /// removed only where no one else could have made them.
    pub fn remove(run_dir: &Path, instance: &str) -> Result<bool, ShmError> {
        let dir = trusted_dir(run_dir, Some(nix::unistd::geteuid().as_raw()))?;
        let path = segment_path(&dir.path, instance)?;
        remove_temp_leftovers(&path);
        // A reload's staged segment that was never put in place.
        let _ = std::fs::remove_file(Self::staged_path(&dir.path, instance)?);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ShmError::Io {
                instance: instance.to_owned(),
                path: path.display().to_string(),
                action: "removing",
                source: e,
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
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::segment::ServiceStatic;

    fn spec() -> SegmentSpec {
        SegmentSpec {
            instance: "unit".into(),
            run_dir: "/nonexistent".into(),
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

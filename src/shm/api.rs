//! The two files of the service API, beside the coordinator's main segment, and the
//! coordinator's side of the shutdown protocol. The services' side is [`crate::service`].
//!
//! # Who may do what (enforced by the kernel, not by trust)
//! Services may run as other users than the coordinator (`nobody`, say), so they get files
//! of their own and never touch the main segment `/dev/shm/ccmgr.<instance>` (mode 0600):
//!
//! | file | mode | written by | read by | holds |
//! |---|---|---|---|---|
//! | `ccmgr.<instance>.ctl` (control segment) | 0644 | the coordinator only | everyone, mapped `PROT_READ` | ids, shutdown sequence, takeover mode, the daemon component word, the epochs, who is asked to stop |
//! | `ccmgr.<instance>.api` (API file) | 0666 | services | services | one byte-range lock per service (its component lock) and per-service state words |
//!
//! `/dev/shm` is sticky, so only the owner can remove or replace either name.
//!
//! **Everything a decision depends on is in the control segment**, which no service can
//! write: the request to shut down (an epoch the coordinator bumps, with the services it
//! asks), the takeover mode, the order, and the daemon component word, which the coordinator
//! holds as a robust futex and the kernel marks `FUTEX_OWNER_DIED` when the coordinator dies.
//! So no service can forge a shutdown request, nor the coordinator's death, for the others.
//!
//! **The API file holds no pointer and nothing trusted.** A service's component lock is an
//! open-file-description (OFD) byte-range lock on one byte: the kernel keeps it, releases it
//! when the service's last descriptor of the file closes (its death), and lets others block
//! until then. The byte is the service's *position in the shutdown sequence* (after the
//! records; locks need no file content there), so the services before one form a contiguous
//! range, which one `F_OFD_GETLK` checks: a stop costs each service a few lock calls, not
//! one per predecessor (each call walks the file's list of held locks, one per service). The
//! state words are read and written with `pread`/`pwrite`, never mapped. Whatever a local
//! user writes into the file, or if they truncate it, no process can be made to crash
//! (`SIGBUS`) or to write anywhere; at worst the state words lie (they only feed logs). What a hostile local user *can* do is take a service's lock and keep it,
//! which spoils the cooperative protocol for the services after it; the coordinator then
//! still stops everything with its own signals and timeouts, and it never reads the API file
//! to decide anything.
//!
//! Why not pthread robust mutexes in a world-writable segment, as in the main segment: glibc
//! links every robust mutex a thread holds into a list through pointers stored *inside the
//! mutex*, and follows them when it unlocks one (an unchecked doubly-linked-list removal).
//! Whoever can write the mutex's bytes can therefore make the holder write a value of their
//! choice at an address of their choice (the test
//! `glibc_robust_mutex_trusts_pointers_in_shared_memory` shows it), and the list's `prev`
//! field leaks the holder's thread-control-block address to every reader. Fine among
//! processes of one uid (they can ptrace each other anyway); not across users.
//!
//! # The daemon component word
//! A 32-bit word in the control segment, in the kernel's robust-futex encoding: the holder's
//! thread id, `FUTEX_WAITERS` (always set while held, so that the kernel wakes a sleeper when
//! the holder dies) and `FUTEX_OWNER_DIED`. The coordinator holds it from a dedicated thread
//! ([`DaemonComponentHolder`]) whose kernel robust list names that word, so the word is held
//! exactly as long as that thread lives; taking and releasing happen on that thread too, so
//! no interleaving with the kernel's exit handling can leave it held by a dead thread.
//! Services only ever *read* it and `FUTEX_WAIT` on it, through their read-only mapping.
//!
//! It lives here rather than in the API file (the original design has services lock the
//! daemon component mutex): a word services can write is a word any of them can set to
//! "released" or "owner died", forging a request or a coordinator's death for all the
//! others, and the coordinator would have to keep a lock in memory any local user can write
//! or truncate. Read-only, the word needs no cross-check, and services never race a standby
//! for it.
//!
//! # The coordinator's steps
//! The module [`crate::service`] documents the services' side and why the protocol cannot
//! deadlock, spin, or shut a service down by mistake. The coordinator's side:
//!
//! 1. `ccmgr start`, once the main segment is created (which proves the instance is not
//!    running): [`ControlSegment::remove`] (leftovers of a crashed run), then
//!    [`ControlSegment::create`]`(&`[`ApiSpec::from_config`]`(&config))`. Both files belong to
//!    the creator's uid, with modes set exactly (0644, 0666) whatever the umask.
//! 2. The coordinator, before it starts any service: [`ControlSegment::open`], then
//!    [`ControlSegment::hold_daemon_component`]; it keeps the [`DaemonComponentHolder`] for
//!    its whole life. Every take bumps the coordinator epoch and wakes the services.
//! 3. A stop or a failure sequence: [`DaemonComponentHolder::release_for_shutdown`] with the
//!    services it stops (all of them for a stop). Asked services with the API shut down by
//!    themselves, in order, and exit. The coordinator still applies its shutdown timeouts
//!    and SIGKILL, but should not send a registered API service
//!    ([`ControlSegment::component_registered`]) its stop signal before its predecessors are
//!    down, or it dies out of turn.
//! 4. Before starting services again: [`DaemonComponentHolder::retake`], once every asked
//!    service is down (exited or killed).
//! 5. A takeover (the standby becomes the coordinator): step 2;
//!    [`DaemonComponentHolder::previous_holder_died`] is then true. Under `adopt` that is all.
//!    Under `restart`, the services that saw the death are already shutting down in order;
//!    release asking every service anyway (the old coordinator may have died with the word
//!    released, which no service can see), wait, re-take, start.
//! 6. `ccmgr stop` without a coordinator: step 5 under `restart`, without the restart.
//! 7. Where the main segment is removed: [`ControlSegment::remove`].

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

use super::layout::{MAX_SERVICES, REGION_ALIGN, SERVICE_ID_MAX};
use super::mapping::{
    Mapping, Protection, ReadOnly, ReadWrite, RobustPending, Unpublished, link_exclusive,
    shared_struct,
};
use super::robust::{
    Deadline, FUTEX_OWNER_DIED, FUTEX_TID_MASK, FUTEX_WAITERS, FutexWait, futex_wait, futex_wake,
};
use super::segment::{SHM_DIR, segment_path, validate_instance_name};
use crate::config::Takeover;
use crate::process_identity::ProcessIdentity;

/// The first eight bytes of a control segment.
pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"ccmgrCTL");
/// The first eight bytes of an API file.
pub const API_MAGIC: u64 = u64::from_le_bytes(*b"ccmgrAPI");
/// Bumped on every change of the control segment's or the API file's layout.
pub const API_LAYOUT_VERSION: u32 = 1;
/// Bytes of the API file's header; record `i` starts at `API_HEADER_LEN + i * API_RECORD_LEN`.
pub const API_HEADER_LEN: u64 = 64;
/// Bytes of one service's record in the API file.
pub const API_RECORD_LEN: u64 = 64;

/// `/dev/shm/ccmgr.<instance>.ctl`.
pub fn control_path(instance: &str) -> Result<PathBuf, ApiError> {
    check_instance(instance)?;
    Ok(Path::new(SHM_DIR).join(format!("ccmgr.{instance}.ctl")))
}

/// `/dev/shm/ccmgr.<instance>.api`.
pub fn api_path(instance: &str) -> Result<PathBuf, ApiError> {
    check_instance(instance)?;
    Ok(Path::new(SHM_DIR).join(format!("ccmgr.{instance}.api")))
}

fn check_instance(instance: &str) -> Result<(), ApiError> {
    validate_instance_name(instance).map_err(|_| ApiError::InvalidInstanceName {
        name: instance.to_owned(),
    })
}

/// Errors of the service API's files and of the coordinator's side of the protocol. Each is a
/// sentence that names the instance or the file.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The instance name cannot name a file.
    #[error("invalid instance name {name:?}: use 1 to 64 of the characters A-Z a-z 0-9 _ . -")]
    InvalidInstanceName {
        /// The name given.
        name: String,
    },
    /// The spec given to [`ControlSegment::create`] is inconsistent.
    #[error("cannot create the service API files of instance {instance}: {reason}")]
    InvalidSpec {
        /// The instance.
        instance: String,
        /// What is wrong.
        reason: String,
    },
    /// A file of that name exists already.
    #[error(
        "{path} already exists: instance {instance} is running, or a crashed run left it (remove it with the instance's other files)"
    )]
    AlreadyExists {
        /// The instance.
        instance: String,
        /// The path.
        path: PathBuf,
    },
    /// A file of the instance is missing.
    #[error(
        "ccmgr is not running instance {instance}, or this service was not started by it ({} does not exist)",
        path.display()
    )]
    NotRunning {
        /// The instance.
        instance: String,
        /// The missing file.
        path: PathBuf,
    },
    /// A file is owned by someone other than the instance's owner.
    #[error("{} belongs to uid {owner}, but instance {instance} is run by uid {expected}: refusing to use it", path.display())]
    WrongOwner {
        /// The instance.
        instance: String,
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The owner it must have.
        expected: u32,
    },
    /// The control segment may be written by others than its owner.
    #[error("{} has mode {mode:04o}: users other than its owner may write it, so it cannot be trusted", path.display())]
    WritableByOthers {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file.
    #[error("{} is not a regular file: refusing to use it", path.display())]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The control segment's contents are inconsistent.
    #[error("{} is not a usable ccmgr control segment: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The instance has no service of that id.
    #[error("instance {instance} has no service {service:?} (the id in CCMGR_SERVICE)")]
    NoSuchService {
        /// The instance.
        instance: String,
        /// The id looked for.
        service: String,
    },
    /// A system call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("opening", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The daemon component word stayed held by another live thread until the deadline.
    #[error(
        "the daemon component of instance {instance} is still held by thread {tid}: another coordinator is alive"
    )]
    DaemonComponentHeld {
        /// The instance.
        instance: String,
        /// The holder's thread id, as the word shows it.
        tid: u32,
    },
    /// A release or a take that needs the other state.
    #[error("instance {instance}: {what}")]
    WrongHolderState {
        /// The instance.
        instance: String,
        /// What was wrong ("not holding the daemon component", ...).
        what: &'static str,
    },
    /// The holder thread could not be started, or ended.
    #[error("the thread holding the daemon component of instance {instance}: {detail}")]
    HolderThread {
        /// The instance.
        instance: String,
        /// What happened.
        detail: String,
    },
    /// A futex or lock operation failed.
    #[error("{op} on {}: {}", path.display(), errno.desc())]
    Sys {
        /// The operation.
        op: &'static str,
        /// The file it was on.
        path: PathBuf,
        /// Its error.
        errno: Errno,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ApiError + 'a {
    move |source| ApiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

// ----- the control segment's layout --------------------------------------------------------

shared_struct! {
    /// The control segment's header, at offset 0.
    pub struct ControlHeader {
        /// [`CONTROL_MAGIC`], written last by the creator.
        pub magic: AtomicU64,
        /// [`API_LAYOUT_VERSION`].
        pub layout_version: AtomicU32,
        /// Number of services.
        pub service_count: AtomicU32,
        /// Size of the whole segment in bytes.
        pub total_size: AtomicU64,
        /// [`Takeover`]: 0 adopt, 1 restart.
        pub takeover: AtomicU32,
        /// `size_of::<ControlRecord>()` of the creator.
        pub record_size: AtomicU32,
        /// Offset of the [`Gate`].
        pub gate_offset: AtomicU64,
        /// Offset of the shutdown sequence (`[u32; service_count]`, service indices).
        pub sequence_offset: AtomicU64,
        /// Offset of the [`ControlRecord`]s.
        pub records_offset: AtomicU64,
        /// Effective uid of the creator (informational; the file's owner is what is checked).
        pub creator_uid: AtomicU32,
        /// Zero.
        pub reserved: AtomicU32,
    }
}

shared_struct! {
    /// The words the shutdown protocol turns on.
    pub struct Gate {
        /// The daemon component word (robust-futex encoding; see the module documentation).
        pub daemon_component: AtomicU32,
        /// Bumped after every take of the daemon component (start, re-take, takeover);
        /// services sleep on it while they wait for a coordinator to hold the word again.
        pub coordinator_epoch: AtomicU32,
        /// Bumped, with the `asked_epoch` of every service asked, before a deliberate release.
        /// Never 0 once bumped.
        pub shutdown_epoch: AtomicU32,
        /// Pid of the last coordinator that took the daemon component (informational).
        pub coordinator_pid: AtomicI32,
        /// Its start time, clock ticks since boot (informational).
        pub coordinator_start_time: AtomicU64,
    }
}

shared_struct! {
    /// One service's record in the control segment.
    pub struct ControlRecord {
        /// The shutdown epoch in which the service was last asked to shut down; 0 for never.
        pub asked_epoch: AtomicU32,
        /// Bytes used in `id`.
        pub id_len: AtomicU32,
        /// The service's shutdown timeout in milliseconds (informational for services).
        pub shutdown_timeout_ms: AtomicU64,
        /// The service id, UTF-8.
        pub id: [AtomicU8; SERVICE_ID_MAX],
    }
}

const _: () = assert!(size_of::<ControlHeader>() == 64);
const _: () = assert!(size_of::<Gate>() == 24);
const _: () = assert!(size_of::<ControlRecord>() == 80);

const fn align_up(n: usize) -> usize {
    n.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// Where the regions of a control segment lie, from its service count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlLayout {
    /// Number of services.
    pub services: usize,
    /// The [`Gate`].
    pub gate: usize,
    /// The shutdown sequence.
    pub sequence: usize,
    /// The [`ControlRecord`]s.
    pub records: usize,
    /// The whole segment.
    pub total_size: usize,
}

impl ControlLayout {
    /// The layout for `services` services (at most [`MAX_SERVICES`]).
    pub fn compute(services: usize) -> Option<ControlLayout> {
        if services > MAX_SERVICES as usize {
            return None;
        }
        let gate = align_up(size_of::<ControlHeader>());
        let sequence = align_up(gate + size_of::<Gate>());
        let records = align_up(sequence + services * size_of::<u32>());
        let total_size = records + services * size_of::<ControlRecord>();
        Some(ControlLayout {
            services,
            gate,
            sequence,
            records,
            total_size,
        })
    }

    /// Offset of service `i`'s record.
    pub fn record_at(&self, i: usize) -> usize {
        self.records + i * size_of::<ControlRecord>()
    }

    fn daemon_component(&self) -> usize {
        self.gate + offset_of!(Gate, daemon_component)
    }

    fn coordinator_epoch(&self) -> usize {
        self.gate + offset_of!(Gate, coordinator_epoch)
    }

    fn shutdown_epoch(&self) -> usize {
        self.gate + offset_of!(Gate, shutdown_epoch)
    }

    fn asked_epoch(&self, i: usize) -> usize {
        self.record_at(i) + offset_of!(ControlRecord, asked_epoch)
    }
}

fn takeover_code(t: Takeover) -> u32 {
    match t {
        Takeover::Adopt => 0,
        Takeover::Restart => 1,
    }
}

fn takeover_from_code(code: u32) -> Option<Takeover> {
    match code {
        0 => Some(Takeover::Adopt),
        1 => Some(Takeover::Restart),
        _ => None,
    }
}

/// What the header of a mapped control segment says, checked against the file's size.
struct Validated {
    layout: ControlLayout,
    takeover: Takeover,
    ids: Vec<String>,
    sequence: Vec<usize>,
}

fn validate<P: Protection>(
    map: &Mapping<P>,
    size: u64,
    path: &Path,
) -> Result<Validated, ApiError> {
    let corrupt = |detail: String| ApiError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    // The header is at offset 0: its field offsets are file offsets.
    let magic = map
        .load_u64(offset_of!(ControlHeader, magic))
        .ok_or_else(|| corrupt(format!("it has only {size} bytes")))?;
    // The creator writes the magic last with release ordering.
    fence(Ordering::Acquire);
    if magic != CONTROL_MAGIC {
        return Err(corrupt(format!("its magic is {magic:#018x}")));
    }
    let read32 = |off: usize| map.load_u32(off).unwrap_or(0);
    let read64 = |off: usize| map.load_u64(off).unwrap_or(0);
    let version = read32(offset_of!(ControlHeader, layout_version));
    if version != API_LAYOUT_VERSION {
        return Err(corrupt(format!(
            "it has layout version {version}, this ccmgr uses {API_LAYOUT_VERSION}"
        )));
    }
    let count = read32(offset_of!(ControlHeader, service_count)) as usize;
    let layout = ControlLayout::compute(count)
        .ok_or_else(|| corrupt(format!("it claims {count} services")))?;
    for (what, found, ours) in [
        (
            "total size",
            read64(offset_of!(ControlHeader, total_size)),
            layout.total_size as u64,
        ),
        ("file size", size, layout.total_size as u64),
        (
            "record size",
            u64::from(read32(offset_of!(ControlHeader, record_size))),
            size_of::<ControlRecord>() as u64,
        ),
        (
            "gate offset",
            read64(offset_of!(ControlHeader, gate_offset)),
            layout.gate as u64,
        ),
        (
            "sequence offset",
            read64(offset_of!(ControlHeader, sequence_offset)),
            layout.sequence as u64,
        ),
        (
            "records offset",
            read64(offset_of!(ControlHeader, records_offset)),
            layout.records as u64,
        ),
    ] {
        if found != ours {
            return Err(corrupt(format!(
                "its {what} is {found}, its layout needs {ours}"
            )));
        }
    }
    let code = read32(offset_of!(ControlHeader, takeover));
    let takeover =
        takeover_from_code(code).ok_or_else(|| corrupt(format!("takeover mode {code}")))?;
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let rec = layout.record_at(i);
        let len = read32(rec + offset_of!(ControlRecord, id_len)) as usize;
        if len == 0 || len > SERVICE_ID_MAX {
            return Err(corrupt(format!("service #{i} has an id of {len} bytes")));
        }
        let bytes: Vec<u8> = (0..len)
            .map(|k| {
                map.load_u8(rec + offset_of!(ControlRecord, id) + k)
                    .unwrap_or(0)
            })
            .collect();
        let id = String::from_utf8(bytes)
            .map_err(|_| corrupt(format!("service #{i} has an id that is not UTF-8")))?;
        ids.push(id);
    }
    let mut seen = vec![false; count];
    let mut sequence = Vec::with_capacity(count);
    for k in 0..count {
        let index = read32(layout.sequence + k * 4) as usize;
        match seen.get_mut(index) {
            Some(s @ false) => *s = true,
            _ => {
                return Err(corrupt(format!(
                    "its shutdown sequence names #{index} out of place"
                )));
            }
        }
        sequence.push(index);
    }
    Ok(Validated {
        layout,
        takeover,
        ids,
        sequence,
    })
}

/// Check an open file of the instance: regular, owned by `owner`, and (`strict`) writable by
/// no one else.
fn check_file(
    instance: &str,
    path: &Path,
    file: &File,
    owner: u32,
    strict: bool,
) -> Result<u64, ApiError> {
    let meta = file.metadata().map_err(io_error("examining", path))?;
    if !meta.file_type().is_file() {
        return Err(ApiError::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    if meta.uid() != owner {
        return Err(ApiError::WrongOwner {
            instance: instance.to_owned(),
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected: owner,
        });
    }
    if strict && meta.mode() & 0o022 != 0 {
        return Err(ApiError::WritableByOthers {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(meta.len())
}

fn open_existing(
    instance: &str,
    path: &Path,
    write: bool,
    action: &'static str,
) -> Result<File, ApiError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ApiError::NotRunning {
                    instance: instance.to_owned(),
                    path: path.to_path_buf(),
                }
            } else {
                io_error(action, path)(e)
            }
        })
}

// ----- creation ------------------------------------------------------------------------------

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

fn check_spec(spec: &ApiSpec) -> Result<ControlLayout, String> {
    let n = spec.services.len();
    let layout = ControlLayout::compute(n)
        .ok_or_else(|| format!("{n} services, more than the {MAX_SERVICES} allowed"))?;
    let mut ids = std::collections::HashSet::new();
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

fn api_file_len(services: usize) -> u64 {
    API_HEADER_LEN + services as u64 * API_RECORD_LEN
}

/// Create the API file of `services` services, unnamed, mode 0666.
fn create_api_file(path: &Path, services: usize) -> Result<File, ApiError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o666)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(SHM_DIR)
        .map_err(io_error("creating (O_TMPFILE in /dev/shm)", path))?;
    // Exactly 0666, whatever the umask took away: services of any uid lock in it.
    file.set_permissions(std::fs::Permissions::from_mode(0o666))
        .map_err(io_error("setting the mode of", path))?;
    let len = api_file_len(services);
    file.set_len(len).map_err(io_error("sizing", path))?;
    let mut header = [0u8; API_HEADER_LEN as usize];
    header[0..8].copy_from_slice(&API_MAGIC.to_le_bytes());
    header[8..12].copy_from_slice(&API_LAYOUT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(services as u32).to_le_bytes());
    header[16..20].copy_from_slice(&(API_RECORD_LEN as u32).to_le_bytes());
    header[24..32].copy_from_slice(&len.to_le_bytes());
    file.write_all_at(&header, 0)
        .map_err(io_error("writing", path))?;
    Ok(file)
}

// ----- the coordinator's side ----------------------------------------------------------------

/// The control segment, mapped read-write: the coordinator's side (also the standby's after a
/// takeover, and `ccmgr stop`'s when it finishes the job of a dead coordinator). Cheap to
/// clone.
#[derive(Clone)]
pub struct ControlSegment {
    map: Arc<Mapping<ReadWrite>>,
    layout: ControlLayout,
    takeover: Takeover,
    ids: Arc<Vec<String>>,
    sequence: Arc<Vec<usize>>,
    instance: String,
    path: PathBuf,
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
        let path = control_path(&instance)?;
        let api = api_path(&instance)?;
        let layout = check_spec(spec).map_err(|reason| ApiError::InvalidSpec {
            instance: instance.clone(),
            reason,
        })?;

        let api_file = create_api_file(&api, layout.services)?;
        let mut fresh =
            Unpublished::create_with_mode(Path::new(SHM_DIR), layout.total_size, 0o644, None)
                .map_err(|(_, e)| io_error("creating (O_TMPFILE in /dev/shm)", &path)(e))?;
        // No pthread objects in it: the daemon component is a bare futex word.
        fresh
            .init_sync(&[])
            .map_err(|e| io_error("initialising", &path)(io::Error::other(e.to_string())))?;
        write_control_image(fresh.mapping(), &layout, spec);

        link_exclusive(api_file.as_fd(), &api).map_err(|e| exists_or(e, &instance, &api))?;
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
        })
    }

    /// Open the control segment of `instance` read-write, to take the daemon component over (a
    /// standby) or to stop a stack whose coordinator died (`ccmgr stop`). It must belong to
    /// the effective uid and be writable by no one else.
    pub fn open(instance: &str) -> Result<ControlSegment, ApiError> {
        let path = control_path(instance)?;
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
        })
    }

    /// Remove the names of `instance`'s control segment and API file (for `stop` once
    /// everything is down, and to clear leftovers of a crashed run). Processes that have them
    /// open keep them. Returns how many names were removed.
    pub fn remove(instance: &str) -> Result<usize, ApiError> {
        let mut removed = 0;
        // The control segment first: a service that finds it must find the API file too.
        for path in [control_path(instance)?, api_path(instance)?] {
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

    fn gate(&self) -> &Gate {
        self.map.get(self.layout.gate).expect("layout checked")
    }

    fn record(&self, i: usize) -> Option<&ControlRecord> {
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
        let api = api_path(&self.instance)?;
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
    fn wake_gate(&self) {
        let gate = self.gate();
        let _ = futex_wake(&gate.daemon_component, i32::MAX);
        let _ = futex_wake(&gate.coordinator_epoch, i32::MAX);
    }

    /// The API file's records, as services wrote them. **Untrusted**: any local user may have
    /// written anything there; for display and tests only.
    pub fn read_api_records(&self) -> Result<Vec<ApiRecord>, ApiError> {
        let api = api_path(&self.instance)?;
        let file = open_existing(&self.instance, &api, false, "opening")?;
        (0..self.layout.services)
            .map(|i| read_record(&file, i).map_err(io_error("reading", &api)))
            .collect()
    }
}

fn exists_or(e: io::Error, instance: &str, path: &Path) -> ApiError {
    if e.kind() == io::ErrorKind::AlreadyExists {
        ApiError::AlreadyExists {
            instance: instance.to_owned(),
            path: path.to_path_buf(),
        }
    } else {
        io_error("linking", path)(e)
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

/// A request to the holder thread.
enum Command {
    Take {
        deadline: Deadline,
        reply: mpsc::SyncSender<Result<bool, ApiError>>,
    },
    Release {
        asked: Vec<usize>,
        reply: mpsc::SyncSender<Result<u32, ApiError>>,
    },
}

/// The coordinator's hold on the daemon component: a thread that owns the daemon component
/// word (its thread id is in the word, and its kernel robust list names the word, so the
/// kernel marks the word `FUTEX_OWNER_DIED` and wakes a service the moment this thread dies,
/// with the coordinator). `Send`: keep it wherever the coordinator keeps its state.
///
/// Dropping it ends the thread as if the coordinator had died holding the word, if it holds
/// it: services then apply the takeover mode. Release it deliberately first for anything else.
pub struct DaemonComponentHolder {
    ctl: ControlSegment,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    tid: u32,
    held: bool,
    previous_holder_died: bool,
}

impl fmt::Debug for DaemonComponentHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonComponentHolder")
            .field("instance", &self.ctl.instance)
            .field("tid", &self.tid)
            .field("held", &self.held)
            .finish()
    }
}

impl DaemonComponentHolder {
    fn start(ctl: ControlSegment, deadline: Deadline) -> Result<Self, ApiError> {
        let thread_error = |detail: String| ApiError::HolderThread {
            instance: ctl.instance.clone(),
            detail,
        };
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let (commands, inbox) = mpsc::channel();
        let for_thread = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("ccmgr-holder".into())
            .spawn(move || holder_thread(for_thread, tid_tx, inbox))
            .map_err(|e| thread_error(format!("cannot start it: {e}")))?;
        let tid = match tid_rx.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(thread_error("it ended before it started".into())),
        };
        let mut holder = DaemonComponentHolder {
            ctl,
            commands: Some(commands),
            thread: Some(thread),
            tid,
            held: false,
            previous_holder_died: false,
        };
        holder.previous_holder_died = holder.take(deadline)?;
        Ok(holder)
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::SyncSender<Result<T, ApiError>>) -> Command,
    ) -> Result<T, ApiError> {
        let gone = || ApiError::HolderThread {
            instance: self.ctl.instance.clone(),
            detail: "it has ended".into(),
        };
        let (reply, answer) = mpsc::sync_channel(1);
        self.commands
            .as_ref()
            .ok_or_else(gone)?
            .send(make(reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    fn take(&mut self, deadline: Deadline) -> Result<bool, ApiError> {
        let died = self.ask(|reply| Command::Take { deadline, reply })?;
        self.held = true;
        Ok(died)
    }

    /// Whether the holder before this one died holding the daemon component (so this take
    /// is a takeover).
    pub fn previous_holder_died(&self) -> bool {
        self.previous_holder_died
    }

    /// Whether the daemon component is held now (false between a release and a re-take).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The holder thread's id, as the daemon component word shows it.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// The control segment.
    pub fn control(&self) -> &ControlSegment {
        &self.ctl
    }

    /// Ask the services at indices `asked` to shut down, and release the daemon component:
    /// bumps the shutdown epoch, records it as the `asked_epoch` of each of them, releases the
    /// word and wakes every service. For a stop, ask every service; for a failure sequence,
    /// the ones it stops. Returns the new epoch.
    ///
    /// The asked services with the API then shut down by themselves, each after the ones
    /// before it in the shutdown sequence that were asked too, and exit. Re-take the daemon
    /// component ([`retake`](Self::retake)) only after every asked service is down (exited,
    /// or killed after its timeout), and before starting any service again.
    pub fn release_for_shutdown(&mut self, asked: &[usize]) -> Result<u32, ApiError> {
        if !self.held {
            return Err(ApiError::WrongHolderState {
                instance: self.ctl.instance.clone(),
                what: "releasing the daemon component, which is not held",
            });
        }
        if let Some(&bad) = asked.iter().find(|&&i| i >= self.ctl.layout.services) {
            return Err(ApiError::InvalidSpec {
                instance: self.ctl.instance.clone(),
                reason: format!("no service #{bad} to ask to shut down"),
            });
        }
        let asked = asked.to_vec();
        let epoch = self.ask(|reply| Command::Release { asked, reply })?;
        self.held = false;
        Ok(epoch)
    }

    /// Take the daemon component again after a release (FIG. 8, step 812), then bump the
    /// coordinator epoch and wake the services waiting for it.
    pub fn retake(&mut self, deadline: Deadline) -> Result<(), ApiError> {
        if self.held {
            return Err(ApiError::WrongHolderState {
                instance: self.ctl.instance.clone(),
                what: "taking the daemon component, which is already held",
            });
        }
        self.take(deadline)?;
        Ok(())
    }
}

impl Drop for DaemonComponentHolder {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which gives the word up as a dying holder would.
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The holder thread: registers the word with the kernel, then takes and releases it on
/// request, so that every change of the word by this thread is ordered with the kernel's
/// handling of the thread's death.
fn holder_thread(
    ctl: ControlSegment,
    tid_tx: mpsc::SyncSender<Result<u32, ApiError>>,
    inbox: mpsc::Receiver<Command>,
) {
    let offset = ctl.layout.daemon_component();
    let registration: RobustPending = match ctl.map.robust_pending(offset) {
        Some(Ok(r)) => r,
        Some(Err(errno)) => {
            let _ = tid_tx.send(Err(ApiError::Sys {
                op: "set_robust_list",
                path: ctl.path.clone(),
                errno,
            }));
            return;
        }
        None => unreachable!("the gate lies inside the validated layout"),
    };
    let tid = nix::unistd::gettid().as_raw() as u32;
    if tid_tx.send(Ok(tid)).is_err() {
        return;
    }
    // Declared after the registration, so dropped before it: a panic while holding still
    // gives the word up (as the kernel would at death) instead of leaving it held by a thread
    // the kernel no longer watches.
    let _give_up = GiveUpOnExit { ctl: &ctl, tid };
    while let Ok(command) = inbox.recv() {
        match command {
            Command::Take { deadline, reply } => {
                let _ = reply.send(take_word(&ctl, tid, deadline));
            }
            Command::Release { asked, reply } => {
                let _ = reply.send(release_word(&ctl, tid, &asked));
            }
        }
    }
    drop(_give_up);
    drop(registration);
}

/// Marks the word as a dead holder's when the holder thread ends holding it.
struct GiveUpOnExit<'a> {
    ctl: &'a ControlSegment,
    tid: u32,
}

impl Drop for GiveUpOnExit<'_> {
    fn drop(&mut self) {
        let word = &self.ctl.gate().daemon_component;
        let v = word.load(Ordering::Acquire);
        if v & FUTEX_TID_MASK == self.tid
            && word
                .compare_exchange(
                    v,
                    FUTEX_WAITERS | FUTEX_OWNER_DIED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            let _ = futex_wake(word, i32::MAX);
        }
    }
}

/// Take the word for `tid`; returns whether the previous holder died holding it.
fn take_word(ctl: &ControlSegment, tid: u32, deadline: Deadline) -> Result<bool, ApiError> {
    let gate = ctl.gate();
    let word = &gate.daemon_component;
    let died = loop {
        let v = word.load(Ordering::Acquire);
        let owner = v & FUTEX_TID_MASK;
        if owner == tid {
            return Err(ApiError::WrongHolderState {
                instance: ctl.instance.clone(),
                what: "taking the daemon component, which is already held",
            });
        }
        if owner == 0 {
            // Free: released, never taken, or its holder died (FUTEX_OWNER_DIED).
            if word
                .compare_exchange(v, tid | FUTEX_WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break v & FUTEX_OWNER_DIED != 0;
            }
            continue;
        }
        // Held by another thread: a live coordinator, or one whose death the kernel has not
        // processed yet. Its FUTEX_WAITERS bit makes the kernel wake a sleeper at its death
        // (a service passes it on if it is the one woken).
        if v & FUTEX_WAITERS == 0
            && word
                .compare_exchange(v, v | FUTEX_WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            continue;
        }
        match futex_wait(word, v | FUTEX_WAITERS, Some(deadline)) {
            Ok(FutexWait::TimedOut) => {
                return Err(ApiError::DaemonComponentHeld {
                    instance: ctl.instance.clone(),
                    tid: owner,
                });
            }
            Ok(_) => continue,
            Err(errno) => {
                return Err(ApiError::Sys {
                    op: "FUTEX_WAIT",
                    path: ctl.path.clone(),
                    errno,
                });
            }
        }
    };
    if let Ok(me) = ProcessIdentity::current() {
        gate.coordinator_pid.store(me.pid, Ordering::Relaxed);
        gate.coordinator_start_time
            .store(me.start_time, Ordering::Relaxed);
    }
    // After the word is ours: a service that sees the new epoch and goes back to sleeping on
    // the word finds it held.
    gate.coordinator_epoch.fetch_add(1, Ordering::Release);
    ctl.wake_gate();
    Ok(died)
}

/// Release the word held by `tid`, asking the services at `asked` to shut down.
fn release_word(ctl: &ControlSegment, tid: u32, asked: &[usize]) -> Result<u32, ApiError> {
    let gate = ctl.gate();
    let word = &gate.daemon_component;
    let v = word.load(Ordering::Acquire);
    if v & FUTEX_TID_MASK != tid {
        return Err(ApiError::WrongHolderState {
            instance: ctl.instance.clone(),
            what: "releasing the daemon component, which this holder does not hold",
        });
    }
    let epoch = match gate.shutdown_epoch.load(Ordering::Relaxed).wrapping_add(1) {
        0 => 1,
        e => e,
    };
    for &i in asked {
        if let Some(rec) = ctl.record(i) {
            rec.asked_epoch.store(epoch, Ordering::Relaxed);
        }
    }
    gate.shutdown_epoch.store(epoch, Ordering::Release);
    // The release store orders the epoch and the asked words before the word's release: a
    // service that sees the word free (with an acquire fence) sees them.
    word.store(0, Ordering::Release);
    ctl.wake_gate();
    Ok(epoch)
}

// ----- the API file --------------------------------------------------------------------------

/// A service's state as it wrote it in the API file (untrusted: for logs and display).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiState {
    /// Never registered (or the record was cleared).
    Absent,
    /// Registered (`alive`), initialising.
    Alive,
    /// Said `ready`.
    Ready,
    /// Running its shutdown callback.
    ShuttingDown,
    /// Its shutdown callback returned.
    Done,
    /// A value this build does not know.
    Unknown(u32),
}

impl ApiState {
    fn code(self) -> u32 {
        match self {
            ApiState::Absent => 0,
            ApiState::Alive => 1,
            ApiState::Ready => 2,
            ApiState::ShuttingDown => 3,
            ApiState::Done => 4,
            ApiState::Unknown(v) => v,
        }
    }

    fn from_code(v: u32) -> ApiState {
        match v {
            0 => ApiState::Absent,
            1 => ApiState::Alive,
            2 => ApiState::Ready,
            3 => ApiState::ShuttingDown,
            4 => ApiState::Done,
            v => ApiState::Unknown(v),
        }
    }
}

impl fmt::Display for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiState::Absent => f.write_str("absent"),
            ApiState::Alive => f.write_str("alive"),
            ApiState::Ready => f.write_str("ready"),
            ApiState::ShuttingDown => f.write_str("shutting down"),
            ApiState::Done => f.write_str("done"),
            ApiState::Unknown(v) => write!(f, "unknown ({v})"),
        }
    }
}

/// One record of the API file, as read (untrusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRecord {
    /// The state the service wrote.
    pub state: ApiState,
    /// The pid it wrote (a claim, not a credential).
    pub pid: u32,
    /// The shutdown epoch its `Done`/`ShuttingDown` refers to.
    pub epoch: u32,
    /// When it wrote the record, monotonic milliseconds.
    pub updated_ms: u64,
}

fn record_offset(i: usize) -> u64 {
    API_HEADER_LEN + i as u64 * API_RECORD_LEN
}

/// Where the component locks start: the byte at `lock_base + p` is the component lock of the
/// service at position `p` of the shutdown sequence. Beyond the records (and possibly beyond
/// the end of a truncated file: byte-range locks need no content).
fn lock_base(services: usize) -> u64 {
    record_offset(services)
}

fn read_record(file: &File, i: usize) -> io::Result<ApiRecord> {
    let mut buf = [0u8; 24];
    // A short read (a truncated file) reads as zeros: the bytes are untrusted anyway.
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], record_offset(i) + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let u32_at = |k: usize| u32::from_le_bytes(buf[k..k + 4].try_into().expect("4 bytes"));
    Ok(ApiRecord {
        state: ApiState::from_code(u32_at(0)),
        pid: u32_at(4),
        epoch: u32_at(8),
        updated_ms: u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes")),
    })
}

fn flock(kind: libc::c_int, offset: u64, len: u64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset as libc::off_t,
        l_len: len as libc::off_t,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// Set an OFD lock of `kind` on the byte at `offset`, blocking while a conflicting lock is
/// held (signals do not end the wait).
fn ofd_lock_wait(file: &File, kind: libc::c_int, offset: u64) -> Result<(), Errno> {
    let fl = flock(kind, offset, 1);
    loop {
        match fcntl(file, FcntlArg::F_OFD_SETLKW(&fl)) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The position of a component lock (a write lock, held by another open file description)
/// among `positions`, if any: one `F_OFD_GETLK` asking whether a read lock on the whole range
/// would conflict. Read locks (other services waiting) do not count.
fn first_write_lock(
    file: &File,
    base: u64,
    positions: std::ops::Range<usize>,
) -> Result<Option<usize>, Errno> {
    if positions.is_empty() {
        return Ok(None);
    }
    let mut fl = flock(
        libc::F_RDLCK,
        base + positions.start as u64,
        positions.len() as u64,
    );
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    // The conflicting lock may start before the range (a hostile process may lock anything):
    // report the first position of ours it covers.
    let start = (fl.l_start as u64).max(base + positions.start as u64);
    Ok(Some((start - base) as usize))
}

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
    /// Open the control segment of `instance` read-only (`O_RDONLY`, `PROT_READ`), after
    /// checking that it belongs to the owner of the instance's main segment and that no one
    /// else may write it.
    pub(crate) fn open(instance: &str) -> Result<(ControlView, u32), ApiError> {
        let owner = instance_owner(instance)?;
        let path = control_path(instance)?;
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

/// The uid that owns the instance's main segment: the owner every other file of the
/// instance must have. Only its metadata is read (services cannot open it).
fn instance_owner(instance: &str) -> Result<u32, ApiError> {
    let main = segment_path(instance).map_err(|_| ApiError::InvalidInstanceName {
        name: instance.to_owned(),
    })?;
    match std::fs::symlink_metadata(&main) {
        Ok(meta) => Ok(meta.uid()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ApiError::NotRunning {
            instance: instance.to_owned(),
            path: main,
        }),
        Err(e) => Err(io_error("examining", &main)(e)),
    }
}

/// The API file, opened read-write by a service: the component locks and its state words.
/// Component locks are named by *shutdown position* (see [`lock_base`]); records by index.
pub(crate) struct ApiFile {
    file: File,
    path: PathBuf,
    lock_base: u64,
}

impl ApiFile {
    /// Open the API file of `instance`, which `owner` must own, for an instance of `services`
    /// services (a count from the control segment). Its contents are not checked: nothing in
    /// them is trusted or needed.
    pub(crate) fn open(instance: &str, owner: u32, services: usize) -> Result<ApiFile, ApiError> {
        let path = api_path(instance)?;
        let file = open_existing(instance, &path, true, "opening")?;
        check_file(instance, &path, &file, owner, false)?;
        Ok(ApiFile {
            file,
            path,
            lock_base: lock_base(services),
        })
    }

    fn sys(&self, op: &'static str) -> impl FnOnce(Errno) -> ApiError + '_ {
        move |errno| ApiError::Sys {
            op,
            path: self.path.clone(),
            errno,
        }
    }

    /// Take the component lock of the service at shutdown position `position`, blocking while
    /// another process holds it. Held by this open file description: until
    /// [`unlock_component`](Self::unlock_component) or until the process's last descriptor of
    /// it closes (its death).
    pub(crate) fn lock_component(&self, position: usize) -> Result<(), ApiError> {
        ofd_lock_wait(&self.file, libc::F_WRLCK, self.lock_base + position as u64)
            .map_err(self.sys("F_OFD_SETLKW (component lock)"))
    }

    /// Release the lock (component or waiting) this description holds at `position`.
    pub(crate) fn unlock_component(&self, position: usize) -> Result<(), ApiError> {
        ofd_lock_wait(&self.file, libc::F_UNLCK, self.lock_base + position as u64)
            .map_err(self.sys("F_OFD_SETLKW (unlock)"))
    }

    /// Block until no process holds the component lock at `position`: its service released it
    /// (its shutdown is done) or died. Returns at once for a service not registered with the
    /// API.
    pub(crate) fn wait_released(&self, position: usize) -> Result<(), ApiError> {
        ofd_lock_wait(&self.file, libc::F_RDLCK, self.lock_base + position as u64)
            .map_err(self.sys("F_OFD_SETLKW (waiting for a component)"))?;
        self.unlock_component(position)
    }

    /// A position among `positions` whose component lock is held, if any (one system call).
    pub(crate) fn held_among(
        &self,
        positions: std::ops::Range<usize>,
    ) -> Result<Option<usize>, ApiError> {
        first_write_lock(&self.file, self.lock_base, positions).map_err(self.sys("F_OFD_GETLK"))
    }

    /// Write service `i`'s state words (for the services' own bookkeeping and display).
    pub(crate) fn write_state(
        &self,
        i: usize,
        state: ApiState,
        epoch: u32,
    ) -> Result<(), ApiError> {
        let mut buf = [0u8; 24];
        buf[0..4].copy_from_slice(&state.code().to_le_bytes());
        buf[4..8].copy_from_slice(&std::process::id().to_le_bytes());
        buf[8..12].copy_from_slice(&epoch.to_le_bytes());
        buf[16..24].copy_from_slice(&super::robust::monotonic_ms().to_le_bytes());
        self.file
            .write_all_at(&buf, record_offset(i))
            .map_err(io_error("writing", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(instance: &str, n: usize) -> ApiSpec {
        ApiSpec {
            instance: instance.to_owned(),
            services: (0..n)
                .map(|i| ApiService {
                    id: format!("svc{i}"),
                    shutdown_timeout_ms: 1000,
                })
                .collect(),
            shutdown_sequence: (0..n as u32).rev().collect(),
            takeover: Takeover::Restart,
        }
    }

    struct Names(String);
    impl Drop for Names {
        fn drop(&mut self) {
            let _ = ControlSegment::remove(&self.0);
            let _ = super::super::Segment::remove(&self.0);
        }
    }

    fn instance(tag: &str) -> Names {
        Names(format!("u.{tag}.{}", std::process::id()))
    }

    #[test]
    fn layout_is_aligned_and_bounded() {
        let l = ControlLayout::compute(3).unwrap();
        assert_eq!(l.gate, 64);
        assert_eq!(l.sequence, 128);
        assert_eq!(l.records, 192);
        assert_eq!(l.total_size, 192 + 3 * 80);
        assert!(ControlLayout::compute(MAX_SERVICES as usize + 1).is_none());
        assert!(
            ControlLayout::compute(MAX_SERVICES as usize)
                .unwrap()
                .total_size
                < 1 << 20
        );
    }

    #[test]
    fn spec_from_a_configuration() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scenarios/valid-explicit-sequences"
        );
        let config = crate::config::Config::load(&crate::config::LoadOptions {
            config_path: Some(format!("{dir}/ccmgr.toml").into()),
            instance: None,
            services_dir: None,
        })
        .unwrap();
        let spec = ApiSpec::from_config(&config);
        assert_eq!(spec.instance, "explicit");
        let ids: Vec<&str> = spec.services.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["app", "db", "log"]);
        let order: Vec<&str> = spec
            .shutdown_sequence
            .iter()
            .map(|&i| ids[i as usize])
            .collect();
        assert_eq!(order, ["app", "db", "log"]);
        assert_eq!(spec.takeover, Takeover::Adopt);
        assert!(check_spec(&spec).is_ok());
    }

    #[test]
    fn specs_must_name_each_service_once_in_the_sequence() {
        let mut s = spec("x", 3);
        assert!(check_spec(&s).is_ok());
        s.shutdown_sequence = vec![0, 1];
        assert!(check_spec(&s).unwrap_err().contains("each of the 3"));
        s.shutdown_sequence = vec![0, 1, 1];
        assert!(check_spec(&s).unwrap_err().contains("twice"));
        s.shutdown_sequence = vec![0, 1, 3];
        assert!(check_spec(&s).unwrap_err().contains("#3"));
        let mut s = spec("x", 2);
        s.services[1].id = "svc0".into();
        assert!(check_spec(&s).unwrap_err().contains("twice"));
    }

    #[test]
    fn create_open_and_remove() {
        let names = instance("create");
        let ctl = ControlSegment::create(&spec(&names.0, 3)).unwrap();
        let meta = std::fs::metadata(ctl.path()).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644);
        let api = std::fs::metadata(api_path(&names.0).unwrap()).unwrap();
        assert_eq!(api.mode() & 0o7777, 0o666);
        assert_eq!(api.len(), api_file_len(3));
        assert!(matches!(
            ControlSegment::create(&spec(&names.0, 3)),
            Err(ApiError::AlreadyExists { .. })
        ));
        let again = ControlSegment::open(&names.0).unwrap();
        assert_eq!(again.service_ids(), ["svc0", "svc1", "svc2"]);
        assert_eq!(again.shutdown_sequence(), [2, 1, 0]);
        assert_eq!(again.takeover(), Takeover::Restart);
        assert_eq!(ControlSegment::remove(&names.0).unwrap(), 2);
        assert_eq!(ControlSegment::remove(&names.0).unwrap(), 0);
    }

    /// The heart of the services' side: FUTEX_WAIT through a PROT_READ mapping sleeps, and a
    /// FUTEX_WAKE through the coordinator's read-write mapping of the same file wakes it; a
    /// wake through the read-only mapping works too.
    #[test]
    fn futex_wait_and_wake_work_through_a_read_only_mapping() {
        let names = instance("rofutex");
        let (_main, _starting) = super::super::Segment::create(&super::super::SegmentSpec {
            instance: names.0.clone(),
            group: None,
            services: vec![],
            startup_sequence: vec![],
            shutdown_sequence: vec![],
            config_blob: vec![],
        })
        .unwrap();
        let ctl = ControlSegment::create(&spec(&names.0, 1)).unwrap();
        let (view, owner) = ControlView::open(&names.0).unwrap();
        assert_eq!(owner, nix::unistd::geteuid().as_raw());
        let view = Arc::new(view);
        let before = view.gate();
        assert_eq!(before.daemon_component, 0);

        let (tx, rx) = mpsc::channel();
        let waiter_view = Arc::clone(&view);
        let waiter = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let r = waiter_view.wait_coordinator_epoch(before.coordinator_epoch);
            (r.unwrap(), waiter_view.gate().coordinator_epoch)
        });
        let tid = rx.recv().unwrap();
        wait_until_in_futex(tid);
        let holder = ctl.hold_daemon_component(Deadline::after(Duration::from_secs(5)));
        let holder = holder.unwrap();
        let (how, epoch) = waiter.join().unwrap();
        assert_ne!(how, FutexWait::TimedOut);
        assert_eq!(epoch, before.coordinator_epoch + 1);
        let word = view.gate().daemon_component;
        assert_eq!(word, holder.tid() | FUTEX_WAITERS);
        // A wake through the read-only mapping reaches a sleeper of the read-write one.
        let waiter = std::thread::spawn({
            let ctl = ctl.clone();
            move || futex_wait(&ctl.gate().daemon_component, word, None).unwrap()
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if view.wake_daemon_component_sleepers().unwrap() == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never woke the sleeper"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(waiter.join().unwrap(), FutexWait::Woken);
        drop(holder);
        let word = view.gate().daemon_component;
        assert_eq!(
            word,
            FUTEX_OWNER_DIED | FUTEX_WAITERS,
            "dropping gives it up"
        );
    }

    #[test]
    fn release_asks_and_retake_bumps_the_coordinator_epoch() {
        let names = instance("release");
        let ctl = ControlSegment::create(&spec(&names.0, 3)).unwrap();
        let deadline = || Deadline::after(Duration::from_secs(5));
        let mut holder = ctl.hold_daemon_component(deadline()).unwrap();
        assert!(!holder.previous_holder_died());
        let ce = ctl.coordinator_epoch();
        assert!(holder.retake(deadline()).is_err(), "already held");
        let epoch = holder.release_for_shutdown(&[0, 2]).unwrap();
        assert_eq!(epoch, 1);
        assert_eq!(ctl.daemon_component_word(), 0);
        assert_eq!(ctl.shutdown_epoch(), 1);
        assert_eq!(
            (0..3)
                .map(|i| ctl.asked_epoch(i).unwrap())
                .collect::<Vec<_>>(),
            [1, 0, 1]
        );
        assert!(holder.release_for_shutdown(&[1]).is_err(), "not held");
        holder.retake(deadline()).unwrap();
        assert_eq!(ctl.coordinator_epoch(), ce + 1);
        assert_eq!(holder.release_for_shutdown(&[1]).unwrap(), 2);
        assert!(holder.release_for_shutdown(&[]).is_err());
        holder.retake(deadline()).unwrap();
        // A second holder cannot take it while the first lives.
        let second = ctl.hold_daemon_component(Deadline::after(Duration::from_millis(50)));
        assert!(matches!(second, Err(ApiError::DaemonComponentHeld { .. })));
        drop(holder);
        let second = ctl.hold_daemon_component(deadline()).unwrap();
        assert!(second.previous_holder_died());
    }

    fn wait_until_in_futex(tid: i32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
                .unwrap_or_default();
            if text.split_whitespace().next() == Some(&libc::SYS_futex.to_string()) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never slept in futex");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

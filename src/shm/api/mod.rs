//! The two files of the service API, beside the coordinator's main segment, and the
//! coordinator's side of the shutdown protocol. The services' side is [`crate::service`].
//!
//! # Who may do what (enforced by the kernel, not by trust)
//! Services may run as other users than the coordinator (`nobody`, say), so they get files
//! of their own and never touch the main segment `<run_dir>/<instance>.seg` (mode 0600, or
//! 0640 for the instance's group, which only reads it):
//!
//! | file | mode | written by | read by | holds |
//! |---|---|---|---|---|
//! | `<run_dir>/<instance>.ctl` (control segment) | 0644 | the coordinator only | everyone, mapped `PROT_READ` | ids, shutdown sequence, takeover mode, the daemon component word, the epochs, who is asked to stop |
//! | `<run_dir>/<instance>.api` (API file) | 0666 | services | services | one byte-range lock per service (its component lock) and per-service state words |
//!
//! Services find `run_dir` in `CCMGR_RUN_DIR` ([`crate::service::RUN_DIR_ENV`]). The
//! directory is the instance owner's and writable by no one else, nor is any directory above
//! it unless sticky ([`crate::shm::state_dir`] checks it, on both sides), so only the owner can
//! create, remove or replace either name, and its owner is the instance's owner, whom every
//! file is checked against.
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
//!
//! # Modules
//! - `layout`: the control segment's `#[repr(C)]` layout, magic, version, takeover codes.
//! - `verify`: the checks of an open file and of a mapped control segment, shared by both sides.
//! - `control`: [`ApiSpec`], creating both files, [`ControlSegment`] (the coordinator's
//!   read-write side), removing both names.
//! - `holder`: [`DaemonComponentHolder`], the thread that holds the daemon component word.
//! - `file`: the API file: its records ([`ApiState`], [`ApiRecord`]) and component locks.
//! - `view`: the services' read-only side of the control segment.
//!
//! This module keeps the paths of both files and [`ApiError`], which every step may return.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::shm::segment::validate_instance_name;
use crate::shm::state_dir::DirTrustError;

mod control;
mod file;
mod holder;
mod layout;
#[cfg(test)]
mod tests;
mod verify;
mod view;

pub use control::{ApiService, ApiSpec, ControlSegment};
pub(crate) use file::ApiFile;
pub use file::{API_HEADER_LEN, API_MAGIC, API_RECORD_LEN, ApiRecord, ApiState};
pub use holder::DaemonComponentHolder;
pub use layout::{
    API_LAYOUT_VERSION, CONTROL_MAGIC, ControlHeader, ControlLayout, ControlRecord, Gate,
};
pub(crate) use view::{ControlView, GateSnapshot};

/// The control segment's path: `<run_dir>/<instance>.ctl`.
pub fn control_path(run_dir: &Path, instance: &str) -> Result<PathBuf, ApiError> {
    check_instance(instance)?;
    Ok(run_dir.join(format!("{instance}.ctl")))
}

/// The API file's path: `<run_dir>/<instance>.api`.
pub fn api_path(run_dir: &Path, instance: &str) -> Result<PathBuf, ApiError> {
    check_instance(instance)?;
    Ok(run_dir.join(format!("{instance}.api")))
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
    /// The run directory may not hold the instance's files (see [`crate::shm::state_dir`]).
    #[error(transparent)]
    UntrustedDir(#[from] DirTrustError),
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

//! The shared-memory substrate: one shared-memory segment per instance (a file on the
//! `run_dir`'s file system, mapped `MAP_SHARED`),
//! guarded by robust, process-shared pthread mutexes, through which the
//! manager, the coordinator, the standby and the services share state. The
//! death of any party is noticed at once by the next locker of a mutex it held.
//!
//! The main segment, by concern:
//! - [`layout`]: the versioned `#[repr(C)]` layout and its size computation.
//! - [`state_dir`]: where the files live (`<run_dir>/<instance>.seg`, `.ctl`, `.api`), the
//!   check that no other user can create names there, and why that makes them unsquattable.
//! - [`segment`]: the [`Segment`] handle, the bounds-checked views, the mutexes and the
//!   config image.
//! - [`open`]: creating a segment (unnamed until complete), opening it with every check (read-write
//!   for its owner; a private snapshot for the members of its group), removing its name.
//! - [`status`]: the live state: consistent readers and the [`StateWriter`].
//! - [`reclaim`]: probing for users of a segment and reclaiming stale state.
//! - [`error`]: [`ShmError`], shared by the four above.
//! - [`state`]: the typed values stored in the segment.
//!
//! Beneath and beside it:
//! - [`robust`]: the robust mutex ([`SharedMutex`], [`MutexGuard`]), the futex words of
//!   the service API and monotonic deadlines; all pthread and futex FFI.
//! - `mapping` (private): the one mapping type, read-write or read-only, and the only casts
//!   from bytes.
//! - [`events`]: the event ring that `ccmgr events` follows.
//! - [`api`]: the service API's control segment and API file, and the coordinator's side of
//!   the services' shutdown protocol.
//!
//! Unsafe code lives in `robust.rs` (FFI) and `mapping.rs` (mmap and casts).

pub mod api;
pub mod error;
pub mod events;
pub mod layout;
mod mapping;
pub mod open;
pub mod reclaim;
pub mod robust;
pub mod segment;
pub mod state;
pub mod state_dir;
pub mod status;

pub use error::ShmError;
pub use reclaim::{Probe, Reclaimed, Role, Survivor};
pub use robust::{Acquired, Deadline, MutexError, MutexGuard, SharedMutex, monotonic_ms};
pub use segment::{Segment, SegmentSpec, ServiceStatic, validate_instance_name};
pub use state::{
    FailureCode, GiveUpReason, InstanceProgress, InstanceState, LastExit, MutexId, ServiceProgress,
    ServiceState, Stage, StopIntent, StopKind, UnknownValue, Want,
};
pub use state_dir::{DirTrustError, TrustedDir, segment_path, trusted_dir};
pub use status::{GaveUp, InstanceStatus, READ_LOCK_LIMIT, ServiceStatus, StateWriter};

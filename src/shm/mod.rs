//! The shared-memory substrate: one POSIX shared-memory segment per instance,
//! guarded by robust, process-shared pthread mutexes, through which the
//! manager, the coordinator, the standby and the services share state. The
//! death of any party is noticed at once by the next locker of a mutex it held.
//!
//! The main segment, by concern:
//! - [`layout`]: the versioned `#[repr(C)]` layout and its size computation.
//! - [`segment`]: the [`Segment`] handle, naming, the bounds-checked views, the mutexes and
//!   the config image.
//! - [`open`]: creating a segment (unnamed until complete), opening it with every check,
//!   removing its name.
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
pub mod status;

pub use error::ShmError;
pub use reclaim::{Probe, Reclaimed, Role, Survivor};
pub use robust::{Acquired, Deadline, MutexError, MutexGuard, SharedMutex, monotonic_ms};
pub use segment::{
    SHM_DIR, Segment, SegmentSpec, ServiceStatic, segment_os_id, segment_path,
    validate_instance_name,
};
pub use state::{
    FailureCode, GiveUpReason, InstanceProgress, InstanceState, LastExit, MutexId, ServiceProgress,
    ServiceState, Stage, StopIntent, StopKind, UnknownValue, Want,
};
pub use status::{GaveUp, InstanceStatus, READ_LOCK_LIMIT, ServiceStatus, StateWriter};

//! The versioned, fixed-size binary layout of a segment: the `#[repr(C)]`
//! records and the computation of every region's offset from the counts in the
//! header. Pure data and arithmetic; no memory is touched here.
//!
//! ```text
//! offset 0        Header          magic, version, sizes, counts, region offsets, generation
//! sync            SyncBlock       manager, daemon, daemon standby and shared-memory
//!                                 mutexes
//! instance        InstanceRecord  instance state, manager/coordinator/standby identities,
//!                                 restart window, give-up reason
//! service_static  [ServiceStaticRecord; services]   ids and timeouts (config image)
//! startup         [u32; startup_len]                startup sequence (service indices)
//! shutdown        [u32; shutdown_len]               shutdown sequence
//! state_table     [ServiceRecord; services]         live state and the engine's progress
//! config_blob     [u8; blob_len]                    the serialized full config
//! ```
//! Every region starts on a 64-byte boundary. Every field is an atomic (or a
//! pthread object), so readers never see torn scalars; consistency across
//! fields is the shared-memory mutex's job, with the generation counter.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64};

use super::mapping::shared_struct;
use super::robust::RobustMutex;

/// The first eight bytes of every ccmgr segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"ccmgrSHM");
/// Bumped on every change of the layout below.
pub const LAYOUT_VERSION: u32 = 3;
/// The most services one instance may have. A bound on what a header may claim, not a size:
/// every segment is sized for its own counts (see [`Layout::compute`]), so a stack of ten
/// services maps a few KiB whatever this says. At 32,768 the records take 6 MiB; the config
/// image's own bound ([`MAX_CONFIG_BLOB`], about 500 bytes a service at this count) is then
/// the one a stack of plain services meets first.
pub const MAX_SERVICES: u32 = 32768;
/// The longest service id, in bytes.
pub const SERVICE_ID_MAX: usize = 64;
/// The largest serialized config the segment carries.
pub const MAX_CONFIG_BLOB: u64 = 16 << 20;
/// Regions start on this boundary (a cache line).
pub const REGION_ALIGN: usize = 64;

shared_struct! {
    /// The segment header, at offset 0.
    pub struct Header {
        /// [`MAGIC`], written last by the creator.
        pub magic: AtomicU64,
        /// [`LAYOUT_VERSION`].
        pub layout_version: AtomicU32,
        /// Number of services.
        pub service_count: AtomicU32,
        /// Size of the whole segment in bytes.
        pub total_size: AtomicU64,
        /// Bumped by every change of the state table or instance record: odd
        /// while a change is under way.
        pub generation: AtomicU64,
        /// Entries in the startup sequence.
        pub startup_len: AtomicU32,
        /// Entries in the shutdown sequence.
        pub shutdown_len: AtomicU32,
        /// Length of the config blob in bytes.
        pub config_blob_len: AtomicU64,
        /// FNV-1a 64 of the config blob.
        pub config_blob_checksum: AtomicU64,
        /// `size_of::<RobustMutex>()` of the creator: catches an ABI mismatch.
        pub mutex_size: AtomicU32,
        /// `size_of::<ServiceRecord>()` of the creator.
        pub service_record_size: AtomicU32,
        /// `size_of::<ServiceStaticRecord>()` of the creator.
        pub service_static_size: AtomicU32,
        /// Effective uid of the creator (informational; the file owner is checked).
        pub creator_uid: AtomicU32,
        /// Offset of the [`SyncBlock`].
        pub sync_offset: AtomicU64,
        /// Offset of the [`InstanceRecord`].
        pub instance_offset: AtomicU64,
        /// Offset of the service static records.
        pub service_static_offset: AtomicU64,
        /// Offset of the startup sequence.
        pub startup_offset: AtomicU64,
        /// Offset of the shutdown sequence.
        pub shutdown_offset: AtomicU64,
        /// Offset of the state table.
        pub state_table_offset: AtomicU64,
        /// Offset of the config blob.
        pub config_blob_offset: AtomicU64,
    }
}

shared_struct! {
    /// The named mutexes. The original design's daemon component and component mutexes
    /// are not here: the service API carries them in its own files (see `shm::api`), where
    /// services of other users can reach them without reaching these.
    pub struct SyncBlock {
        /// Held by `ccmgr start` while a start is under way.
        pub manager: RobustMutex,
        /// Held by the coordinator while it lives.
        pub daemon: RobustMutex,
        /// Held by the coordinator; the standby waits on it.
        pub daemon_standby: RobustMutex,
        /// Guards multi-field changes of the segment.
        pub shm: RobustMutex,
    }
}

shared_struct! {
    /// The record of the instance as a whole.
    pub struct InstanceRecord {
        /// An [`InstanceState`](super::state::InstanceState).
        pub state: AtomicU32,
        /// Restarts counted in the current window.
        pub restarts_in_window: AtomicU32,
        /// Start of the restart window, monotonic milliseconds.
        pub window_start_ms: AtomicU64,
        /// Last change of `state`, monotonic milliseconds.
        pub last_transition_ms: AtomicU64,
        /// Pid of `ccmgr start` while it runs; 0 for none.
        pub manager_pid: AtomicI32,
        /// Pid of the coordinator; 0 for none.
        pub coordinator_pid: AtomicI32,
        /// Pid of the standby; 0 for none.
        pub standby_pid: AtomicI32,
        /// A [`GiveUpReason`](super::state::GiveUpReason); 0 for none.
        pub gave_up_reason: AtomicU32,
        /// Start time (clock ticks since boot) of the manager.
        pub manager_start_time: AtomicU64,
        /// Start time of the coordinator.
        pub coordinator_start_time: AtomicU64,
        /// Start time of the standby.
        pub standby_start_time: AtomicU64,
        /// Index of the service the instance gave up on; `u32::MAX` for none.
        pub gave_up_service: AtomicU32,
        /// Pid of the keeper (the parent of every process of the instance); 0 for none.
        pub keeper_pid: AtomicI32,
        /// Start time of the keeper.
        pub keeper_start_time: AtomicU64,
        /// Why the stack is stopping, a [`StopKind`](super::state::StopKind); 0 while it
        /// is not.
        pub stop_kind: AtomicU32,
        /// The service whose failure stops it; `u32::MAX` for none.
        pub stop_service: AtomicU32,
        /// How that service failed, a [`FailureCode`](super::state::FailureCode); 0 for none.
        pub stop_failure: AtomicU32,
        /// Restarts counted when the stack gave up.
        pub stop_restarts: AtomicU32,
        /// The exit of that failure, encoded by [`LastExit`](super::state::LastExit).
        pub stop_exit: AtomicU64,
        /// The deadline of the whole startup or shutdown sequence, monotonic milliseconds
        /// plus one; 0 for none.
        pub sequence_deadline_ms1: AtomicU64,
        /// 1 while the coordinator runs without a standby because standbys kept dying (it
        /// tries again after a quiet span); 0 otherwise.
        pub standby_disabled: AtomicU32,
        /// Zero: pads the record to a multiple of 8 bytes.
        pub standby_reserved: AtomicU32,
    }
}

shared_struct! {
    /// One service's static data in the config image.
    pub struct ServiceStaticRecord {
        /// Bytes used in `id`.
        pub id_len: AtomicU32,
        /// Zero.
        pub reserved: AtomicU32,
        /// Startup timeout in milliseconds.
        pub startup_timeout_ms: AtomicU64,
        /// Shutdown timeout in milliseconds.
        pub shutdown_timeout_ms: AtomicU64,
        /// The service id, UTF-8, `id_len` bytes used.
        pub id: [AtomicU8; SERVICE_ID_MAX],
    }
}

shared_struct! {
    /// One service's live record in the state table.
    pub struct ServiceRecord {
        /// A [`ServiceState`](super::state::ServiceState).
        pub state: AtomicU32,
        /// Restarts so far.
        pub restart_count: AtomicU32,
        /// Pid of the service's process; 0 for none.
        pub pid: AtomicI32,
        /// Zero.
        pub reserved: AtomicU32,
        /// Start time (clock ticks since boot) of that process.
        pub start_time: AtomicU64,
        /// Last change of `state`, monotonic milliseconds.
        pub last_transition_ms: AtomicU64,
        /// The last exit status, encoded by [`LastExit`](super::state::LastExit).
        pub last_exit: AtomicU64,
        // The engine's progress on the service, so that a coordinator taking over continues
        // it (see `engine::Snapshot`). Times are monotonic milliseconds; those ending in `1`
        // are plus one, 0 meaning none, so that a zeroed record means "nothing yet".
        /// What the stack wants of it, a [`Want`](crate::vocab::Want).
        pub want: AtomicU32,
        /// Where its process is, a [`Stage`](super::state::Stage).
        pub stage: AtomicU32,
        /// [`PROGRESS_KILLED`], [`PROGRESS_START_TIMED_OUT`], [`PROGRESS_ASKED`].
        pub progress_flags: AtomicU32,
        /// Failures in a row without a quiet span (the restart delay doubles with it).
        pub streak: AtomicU32,
        /// When its running process started.
        pub process_since_ms: AtomicU64,
        /// The deadline of its stage: readiness, min_uptime or SIGKILL; 0 for none.
        pub deadline_ms1: AtomicU64,
        /// When its current or last process started; 0 for never.
        pub started_at_ms1: AtomicU64,
        /// Not to be started before this (the restart delay).
        pub not_before_ms: AtomicU64,
        /// When it last failed; 0 for never.
        pub last_failure_ms1: AtomicU64,
        /// The pid whose end `last_exit` records; 0 for none.
        pub exited_pid: AtomicI32,
        /// Zero.
        pub reserved_progress: AtomicU32,
    }
}

/// [`ServiceRecord::progress_flags`]: SIGKILL was sent to its process.
pub const PROGRESS_KILLED: u32 = 1;
/// [`ServiceRecord::progress_flags`]: it is being killed for not being ready in time.
pub const PROGRESS_START_TIMED_OUT: u32 = 2;
/// [`ServiceRecord::progress_flags`]: it was asked to shut down through the service API.
pub const PROGRESS_ASKED: u32 = 4;

/// The variable counts a layout is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Number of services.
    pub services: u32,
    /// Entries in the startup sequence.
    pub startup_len: u32,
    /// Entries in the shutdown sequence.
    pub shutdown_len: u32,
    /// Bytes of config blob.
    pub blob_len: u64,
}

/// Counts no layout can have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// More services than [`MAX_SERVICES`].
    #[error("{count} services, more than the {MAX_SERVICES} a segment holds")]
    TooManyServices {
        /// The count asked for.
        count: u32,
    },
    /// A sequence longer than the service list.
    #[error("the {which} sequence has {len} entries but there are only {services} services")]
    SequenceTooLong {
        /// "startup" or "shutdown".
        which: &'static str,
        /// Its length.
        len: u32,
        /// The number of services.
        services: u32,
    },
    /// A blob above [`MAX_CONFIG_BLOB`].
    #[error("the config blob has {len} bytes, more than the {MAX_CONFIG_BLOB} a segment holds")]
    BlobTooLarge {
        /// Its length.
        len: u64,
    },
}

/// Where every region of a segment lies, in bytes from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The counts this layout was computed from.
    pub counts: Counts,
    /// The [`SyncBlock`].
    pub sync: usize,
    /// The [`InstanceRecord`].
    pub instance: usize,
    /// The [`ServiceStaticRecord`]s.
    pub service_static: usize,
    /// The startup sequence.
    pub startup: usize,
    /// The shutdown sequence.
    pub shutdown: usize,
    /// The [`ServiceRecord`]s.
    pub state_table: usize,
    /// The config blob.
    pub config_blob: usize,
    /// The whole segment.
    pub total_size: usize,
}

const fn align_up(n: usize) -> usize {
    n.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

impl Layout {
    /// The layout for `counts`, or why there is none. The bounds make every
    /// size fit easily in `usize` (the largest segment is about 22 MiB).
    pub fn compute(counts: Counts) -> Result<Layout, LayoutError> {
        let Counts {
            services,
            startup_len,
            shutdown_len,
            blob_len,
        } = counts;
        if services > MAX_SERVICES {
            return Err(LayoutError::TooManyServices { count: services });
        }
        for (which, len) in [("startup", startup_len), ("shutdown", shutdown_len)] {
            if len > services {
                return Err(LayoutError::SequenceTooLong {
                    which,
                    len,
                    services,
                });
            }
        }
        if blob_len > MAX_CONFIG_BLOB {
            return Err(LayoutError::BlobTooLarge { len: blob_len });
        }
        let n = services as usize;
        let sync = align_up(size_of::<Header>());
        let instance = align_up(sync + size_of::<SyncBlock>());
        let service_static = align_up(instance + size_of::<InstanceRecord>());
        let startup = align_up(service_static + n * size_of::<ServiceStaticRecord>());
        let shutdown = align_up(startup + startup_len as usize * size_of::<u32>());
        let state_table = align_up(shutdown + shutdown_len as usize * size_of::<u32>());
        let config_blob = align_up(state_table + n * size_of::<ServiceRecord>());
        let total_size = config_blob + blob_len as usize;
        Ok(Layout {
            counts,
            sync,
            instance,
            service_static,
            startup,
            shutdown,
            state_table,
            config_blob,
            total_size,
        })
    }

    /// Offset of service `index`'s static record (index checked by the caller).
    pub fn service_static_at(&self, index: usize) -> usize {
        self.service_static + index * size_of::<ServiceStaticRecord>()
    }

    /// Offset of service `index`'s state record (index checked by the caller).
    pub fn service_record_at(&self, index: usize) -> usize {
        self.state_table + index * size_of::<ServiceRecord>()
    }

    /// Offset of every robust mutex: the four named ones.
    pub fn mutex_offsets(&self) -> Vec<usize> {
        [
            offset_of!(SyncBlock, manager),
            offset_of!(SyncBlock, daemon),
            offset_of!(SyncBlock, daemon_standby),
            offset_of!(SyncBlock, shm),
        ]
        .iter()
        .map(|o| self.sync + o)
        .collect()
    }
}

/// FNV-1a, 64 bits: the config blob's checksum. It detects corruption, it is
/// not a defence against forgery (the owner's uid can rewrite both).
pub fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .into_iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

// The record sizes the layout documentation and the ABI check rely on
// (x86_64 / aarch64 glibc: pthread_mutex_t is 40 bytes).
const _: () = assert!(size_of::<Header>() == 128);
const _: () = assert!(size_of::<InstanceRecord>() == 120);
const _: () = assert!(size_of::<ServiceStaticRecord>() == 88);
const _: () = assert!(size_of::<RobustMutex>() == size_of::<libc::pthread_mutex_t>());

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(services: u32, startup_len: u32, shutdown_len: u32, blob_len: u64) -> Counts {
        Counts {
            services,
            startup_len,
            shutdown_len,
            blob_len,
        }
    }

    #[test]
    fn empty_layout() {
        let l = Layout::compute(counts(0, 0, 0, 0)).unwrap();
        assert_eq!(l.sync, 128); // 128, a multiple of 64
        assert!(l.instance >= l.sync + size_of::<SyncBlock>());
        assert_eq!(l.service_static, l.startup);
        assert_eq!(l.total_size, l.config_blob);
        assert_eq!(l.mutex_offsets().len(), 4);
    }

    #[test]
    fn regions_are_ordered_aligned_and_disjoint() {
        let l = Layout::compute(counts(3, 3, 2, 1000)).unwrap();
        let regions = [
            (0, size_of::<Header>()),
            (l.sync, size_of::<SyncBlock>()),
            (l.instance, size_of::<InstanceRecord>()),
            (l.service_static, 3 * size_of::<ServiceStaticRecord>()),
            (l.startup, 3 * 4),
            (l.shutdown, 2 * 4),
            (l.state_table, 3 * size_of::<ServiceRecord>()),
            (l.config_blob, 1000),
        ];
        for pair in regions.windows(2) {
            let ((a, alen), (b, _)) = (pair[0], pair[1]);
            assert!(a + alen <= b, "{pair:?} overlap");
            assert_eq!(b % REGION_ALIGN, 0);
        }
        assert_eq!(l.total_size, l.config_blob + 1000);
        assert_eq!(l.mutex_offsets().len(), 4);
        let rec = l.service_record_at(2);
        assert_eq!(rec, l.state_table + 2 * size_of::<ServiceRecord>());
        assert!(rec + size_of::<ServiceRecord>() <= l.config_blob);
        for o in l.mutex_offsets() {
            assert_eq!(o % std::mem::align_of::<RobustMutex>(), 0);
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(
            Layout::compute(counts(MAX_SERVICES + 1, 0, 0, 0)),
            Err(LayoutError::TooManyServices {
                count: MAX_SERVICES + 1
            })
        );
        assert!(matches!(
            Layout::compute(counts(2, 3, 0, 0)),
            Err(LayoutError::SequenceTooLong {
                which: "startup",
                ..
            })
        ));
        assert!(matches!(
            Layout::compute(counts(2, 0, 3, 0)),
            Err(LayoutError::SequenceTooLong {
                which: "shutdown",
                ..
            })
        ));
        assert_eq!(
            Layout::compute(counts(0, 0, 0, MAX_CONFIG_BLOB + 1)),
            Err(LayoutError::BlobTooLarge {
                len: MAX_CONFIG_BLOB + 1
            })
        );
        let biggest = Layout::compute(counts(
            MAX_SERVICES,
            MAX_SERVICES,
            MAX_SERVICES,
            MAX_CONFIG_BLOB,
        ))
        .unwrap();
        assert!(biggest.total_size < 24 << 20);
        // Sized for its counts, not for the bound: ten services with a 5 KiB image take under
        // 8 KiB.
        let small = Layout::compute(counts(10, 10, 10, 5000)).unwrap();
        assert!(small.total_size < 8 << 10, "{small:?}");
    }

    #[test]
    fn fnv1a64_known_vectors() {
        assert_eq!(fnv1a64(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(*b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn magic_reads_as_text() {
        assert_eq!(&MAGIC.to_le_bytes(), b"ccmgrSHM");
    }
}

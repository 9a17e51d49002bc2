//! The control segment's binary layout: the `#[repr(C)]` header, gate and per-service
//! records, their offsets ([`ControlLayout`]), the magic and layout version, and the encoding
//! of the takeover mode. Apart so that the coordinator's writer ([`control`](super::control)),
//! the services' reader ([`view`](super::view)) and the check both run at open
//! ([`verify`](super::verify)) agree on one description of the bytes.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64};

use crate::config::Takeover;
use crate::shm::layout::{MAX_SERVICES, REGION_ALIGN, SERVICE_ID_MAX};
use crate::shm::mapping::shared_struct;

/// The first eight bytes of a control segment.
pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"ccmgrCTL");
/// Bumped on every change of the control segment's or the API file's layout.
pub const API_LAYOUT_VERSION: u32 = 1;

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

    pub(super) fn daemon_component(&self) -> usize {
        self.gate + offset_of!(Gate, daemon_component)
    }

    pub(super) fn coordinator_epoch(&self) -> usize {
        self.gate + offset_of!(Gate, coordinator_epoch)
    }

    pub(super) fn shutdown_epoch(&self) -> usize {
        self.gate + offset_of!(Gate, shutdown_epoch)
    }

    pub(super) fn asked_epoch(&self, i: usize) -> usize {
        self.record_at(i) + offset_of!(ControlRecord, asked_epoch)
    }
}

pub(super) fn takeover_code(t: Takeover) -> u32 {
    match t {
        Takeover::Adopt => 0,
        Takeover::Restart => 1,
    }
}

pub(super) fn takeover_from_code(code: u32) -> Option<Takeover> {
    match code {
        0 => Some(Takeover::Adopt),
        1 => Some(Takeover::Restart),
        _ => None,
    }
}

//! The typed values stored as integers in the segment: service and instance
//! states, the last exit status, the engine's progress (process stage, stop
//! reason), the reason an instance gave up, and the names of the mutexes. Each conversion from the stored integer rejects
//! values it does not know.

use std::fmt;

use crate::vocab::stored_enum;
pub use crate::vocab::{InstanceState, LastExit, ServiceState, UnknownValue, Want};

stored_enum! {
    /// Where a service's process is, as the engine sees it (`engine::Process`). A zeroed
    /// record reads as `Stopped`.
    pub enum Stage as "process stage" {
        /// No process; stopped.
        Stopped = 0 => "stopped",
        /// No process; its last run failed.
        Failed = 1 => "failed",
        /// No process; a one-shot task that finished (up).
        Finished = 2 => "finished",
        /// A spawn was asked for and not yet answered.
        Spawning = 3 => "spawning",
        /// Running, not yet ready.
        Waiting = 4 => "waiting",
        /// Running and ready, not yet up for its min_uptime.
        Settling = 5 => "settling",
        /// Running and up.
        Up = 6 => "up",
        /// Told to stop (or killed).
        Stopping = 7 => "stopping",
    }
}

stored_enum! {
    /// Why the stack is stopping.
    pub enum StopKind as "stop reason" {
        /// Someone asked.
        Requested = 1 => "requested",
        /// The startup sequence failed.
        StartupFailed = 2 => "startup failed",
        /// Too many restarts.
        GaveUp = 3 => "gave up",
    }
}

stored_enum! {
    /// How the service a stop is blamed on failed.
    pub enum FailureCode as "failure kind" {
        /// Its process ended (the exit is stored beside).
        Exited = 1 => "exited",
        /// It could not be started (the reason in words is not kept).
        SpawnFailed = 2 => "spawn failed",
        /// It was not ready within its startup timeout.
        StartTimeout = 3 => "start timeout",
        /// The whole startup sequence timed out.
        SequenceTimeout = 4 => "sequence timeout",
    }
}

/// The engine's progress on one service, as stored: what a coordinator taking over needs to
/// continue it. Times are monotonic milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceProgress {
    /// What the stack wants of it.
    pub want: Want,
    /// Where its process is.
    pub stage: Stage,
    /// SIGKILL was sent to its process.
    pub killed: bool,
    /// Its process is being killed for not being ready in time.
    pub start_timed_out: bool,
    /// It was asked to shut down through the service API.
    pub asked: bool,
    /// When its running process started.
    pub process_since_ms: u64,
    /// The deadline of its stage (readiness, min_uptime, SIGKILL).
    pub deadline_ms: Option<u64>,
    /// When its current or last process started.
    pub started_at_ms: Option<u64>,
    /// Not to be started before this.
    pub not_before_ms: u64,
    /// Failures in a row without a quiet span.
    pub streak: u32,
    /// When it last failed.
    pub last_failure_ms: Option<u64>,
    /// The process whose end the last exit records.
    pub exited_pid: Option<i32>,
}

/// Why the stack is stopping, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopIntent {
    /// Why.
    pub kind: StopKind,
    /// The service whose failure it is, for a failed start or a give-up.
    pub service: Option<usize>,
    /// How it failed.
    pub failure: Option<FailureCode>,
    /// Its exit, for [`FailureCode::Exited`].
    pub exit: Option<LastExit>,
    /// Restarts counted, for a give-up.
    pub restarts: u32,
}

/// The engine's progress on the instance, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InstanceProgress {
    /// Why the stack is stopping, once it is.
    pub stopping_for: Option<StopIntent>,
    /// The deadline of the whole startup or shutdown sequence, monotonic milliseconds.
    pub sequence_deadline_ms: Option<u64>,
}

stored_enum! {
    /// Why the instance gave up.
    pub enum GiveUpReason as "give-up reason" {
        /// A service restarted more often than its restart window allows.
        RestartLimit = 1 => "restart limit reached",
        /// A service failed during startup.
        StartupFailed = 2 => "a service failed to start",
        /// A service did not become ready within its startup timeout.
        StartupTimedOut = 3 => "a service did not start in time",
    }
}

/// Every mutex of a segment.
///
/// Lock order: a thread that holds several takes them in the order of this
/// enum (manager, daemon, daemon standby) and the shared-memory mutex last; it
/// never blocks on another mutex while it holds the shared-memory mutex.
/// [`Segment::probe`] keeps to it.
///
/// The original design's daemon component mutex (services wait on it, then shut down in
/// turn) and component mutexes (one per service, held while it lives) are carried by the
/// service API's own files instead (`shm::api`: a robust futex word in the read-only control
/// file, and a kernel byte-range lock per service in the API file), because services of
/// other users must reach those and must never reach these.
///
/// [`Segment::probe`]: super::Segment::probe
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MutexId {
    /// Held by `ccmgr start` while a start is under way.
    Manager,
    /// Held by the coordinator while it lives.
    Daemon,
    /// Held by the coordinator; the standby waits on it to see its death.
    DaemonStandby,
    /// Guards multi-field reads and writes of the segment.
    Shm,
}

impl MutexId {
    /// Every mutex.
    pub const NAMED: [MutexId; 4] = [
        MutexId::Manager,
        MutexId::Daemon,
        MutexId::DaemonStandby,
        MutexId::Shm,
    ];
}

impl fmt::Display for MutexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MutexId::Manager => "manager mutex",
            MutexId::Daemon => "daemon mutex",
            MutexId::DaemonStandby => "daemon standby mutex",
            MutexId::Shm => "shared-memory mutex",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_reject_unknown_values() {
        for &s in ServiceState::ALL {
            assert_eq!(ServiceState::try_from(s.as_u32()), Ok(s));
        }
        for &s in InstanceState::ALL {
            assert_eq!(InstanceState::try_from(s.as_u32()), Ok(s));
        }
        for &r in GiveUpReason::ALL {
            assert_eq!(GiveUpReason::try_from(r.as_u32()), Ok(r));
        }
        assert_eq!(ServiceState::ALL.len(), 5);
        assert_eq!(InstanceState::ALL.len(), 6);
        assert_eq!(
            ServiceState::try_from(5),
            Err(UnknownValue {
                what: "service state",
                value: 5
            })
        );
        assert!(InstanceState::try_from(6).is_err());
        assert!(InstanceState::try_from(u32::MAX).is_err());
        assert!(GiveUpReason::try_from(0).is_err());
        assert_eq!(
            ServiceState::try_from(99).unwrap_err().to_string(),
            "99 is not a valid service state"
        );
        assert_eq!(InstanceState::Recovery.to_string(), "recovery");
    }

    #[test]
    fn zero_is_the_initial_state() {
        assert_eq!(ServiceState::try_from(0), Ok(ServiceState::Stopped));
        assert_eq!(InstanceState::try_from(0), Ok(InstanceState::Initializing));
        assert_eq!(LastExit::decode(0), Ok(None));
    }

    #[test]
    fn exit_status_round_trips() {
        for exit in [
            None,
            Some(LastExit::Exited(0)),
            Some(LastExit::Exited(255)),
            Some(LastExit::Exited(-1)),
            Some(LastExit::Exited(i32::MIN)),
            Some(LastExit::Signaled(9)),
            Some(LastExit::Signaled(64)),
        ] {
            assert_eq!(LastExit::decode(LastExit::encode(exit)), Ok(exit));
        }
        assert!(LastExit::decode(3 << 32).is_err());
        assert!(LastExit::decode(7).is_err(), "none with a value");
        assert_eq!(LastExit::Signaled(9).to_string(), "killed by signal 9");
    }
}

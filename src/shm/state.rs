//! The typed values stored as integers in the segment: service and instance
//! states, the last exit status, the reason an instance gave up, and the names
//! of the mutexes and channels. Each conversion from the stored integer rejects
//! values it does not know.

use std::fmt;

/// A stored integer that is not a value of the type it should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{value} is not a valid {what}")]
pub struct UnknownValue {
    /// The type expected ("service state", ...).
    pub what: &'static str,
    /// The value found.
    pub value: u64,
}

macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident as $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value ),*
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The integer stored in the segment.
            pub fn as_u32(self) -> u32 {
                self as u32
            }
        }

        impl TryFrom<u32> for $name {
            type Error = UnknownValue;
            fn try_from(value: u32) -> Result<Self, UnknownValue> {
                match value {
                    $( $value => Ok($name::$variant), )*
                    _ => Err(UnknownValue { what: $what, value: u64::from(value) }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $( $name::$variant => $text ),* })
            }
        }
    };
}

stored_enum! {
    /// The state of one service. A zeroed record reads as `Stopped`.
    pub enum ServiceState as "service state" {
        /// Not running.
        Stopped = 0 => "stopped",
        /// Started, not yet ready.
        Starting = 1 => "starting",
        /// Running and ready.
        Up = 2 => "up",
        /// Being shut down.
        Stopping = 3 => "stopping",
        /// Given up on.
        Failed = 4 => "failed",
    }
}

stored_enum! {
    /// The state of the instance. A zeroed record reads as `Initializing`.
    pub enum InstanceState as "instance state" {
        /// The coordinator is reading the config and starting services in order.
        Initializing = 0 => "initializing",
        /// Everything is up; the coordinator watches.
        Steady = 1 => "steady",
        /// A failure sequence, or the standby taking over.
        Recovery = 2 => "recovery",
        /// Stopping in shutdown order.
        Stopping = 3 => "stopping",
        /// Stopped cleanly.
        Stopped = 4 => "stopped",
        /// Gave up (see the give-up reason).
        Failed = 5 => "failed",
    }
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

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LastExit {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl From<crate::spawn::ProcessExit> for LastExit {
    fn from(exit: crate::spawn::ProcessExit) -> Self {
        match exit {
            crate::spawn::ProcessExit::Exited(code) => LastExit::Exited(code),
            crate::spawn::ProcessExit::Signaled { signal, .. } => LastExit::Signaled(signal),
        }
    }
}

/// The stored form has no core-dump flag: read back, a signal death is one without a core.
impl From<LastExit> for crate::spawn::ProcessExit {
    fn from(exit: LastExit) -> Self {
        match exit {
            LastExit::Exited(code) => crate::spawn::ProcessExit::Exited(code),
            LastExit::Signaled(signal) => crate::spawn::ProcessExit::Signaled {
                signal,
                core_dumped: false,
            },
        }
    }
}

const EXIT_NONE: u64 = 0;
const EXIT_EXITED: u64 = 1;
const EXIT_SIGNALED: u64 = 2;

impl LastExit {
    /// One 64-bit word, stored atomically so a reader never sees a kind from one
    /// exit and a value from another: kind in the high half (0 none, 1 exited,
    /// 2 signaled), the value's bits in the low half.
    pub fn encode(exit: Option<LastExit>) -> u64 {
        match exit {
            None => EXIT_NONE << 32,
            Some(LastExit::Exited(code)) => (EXIT_EXITED << 32) | u64::from(code as u32),
            Some(LastExit::Signaled(sig)) => (EXIT_SIGNALED << 32) | u64::from(sig as u32),
        }
    }

    /// The inverse of [`encode`](Self::encode); rejects unknown kinds and a
    /// "none" with a value.
    pub fn decode(word: u64) -> Result<Option<LastExit>, UnknownValue> {
        let value = (word & 0xffff_ffff) as u32 as i32;
        match word >> 32 {
            EXIT_NONE if value == 0 => Ok(None),
            EXIT_EXITED => Ok(Some(LastExit::Exited(value))),
            EXIT_SIGNALED => Ok(Some(LastExit::Signaled(value))),
            _ => Err(UnknownValue {
                what: "exit status",
                value: word,
            }),
        }
    }
}

impl fmt::Display for LastExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LastExit::Exited(code) => write!(f, "exited with code {code}"),
            LastExit::Signaled(sig) => write!(f, "killed by signal {sig}"),
        }
    }
}

/// Every mutex of a segment.
///
/// Lock order: a thread that holds several takes them in the order of this
/// enum (manager, daemon, daemon standby, daemon component, component mutexes
/// by index) and the shared-memory mutex last; it never blocks on another
/// mutex while it holds the shared-memory mutex. [`Segment::probe`] keeps to
/// it.
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
    /// Held by the coordinator, released in stop and recovery; services wait on
    /// it, then shut down in turn.
    DaemonComponent,
    /// Guards multi-field reads and writes of the segment.
    Shm,
    /// Held by service `n` (an index into the services) while it lives.
    Component(usize),
}

impl MutexId {
    /// The five named mutexes.
    pub const NAMED: [MutexId; 5] = [
        MutexId::Manager,
        MutexId::Daemon,
        MutexId::DaemonStandby,
        MutexId::DaemonComponent,
        MutexId::Shm,
    ];
}

impl fmt::Display for MutexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MutexId::Manager => f.write_str("manager mutex"),
            MutexId::Daemon => f.write_str("daemon mutex"),
            MutexId::DaemonStandby => f.write_str("daemon standby mutex"),
            MutexId::DaemonComponent => f.write_str("daemon component mutex"),
            MutexId::Shm => f.write_str("shared-memory mutex"),
            MutexId::Component(n) => write!(f, "component mutex of service #{n}"),
        }
    }
}

/// Every channel of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelId {
    /// From the manager and the services to the coordinator.
    ToCoordinator,
    /// From the coordinator to the manager (startup finished or failed, ...).
    ToManager,
    /// From the coordinator to service `n`.
    ToService(usize),
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelId::ToCoordinator => f.write_str("channel to the coordinator"),
            ChannelId::ToManager => f.write_str("channel to the manager"),
            ChannelId::ToService(n) => write!(f, "channel to service #{n}"),
        }
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

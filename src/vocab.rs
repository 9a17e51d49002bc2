//! The vocabulary every layer shares: the states of the instance and of a service, how a
//! process ended ([`ProcessExit`], and [`LastExit`], its stored form), what a service is wanted
//! to be ([`Want`]), the takeover mode, and what a valid instance name is.
//!
//! It is the bottom of the crate: it imports nothing from it, so that the engine (the pure
//! state machine), the shared segment (which stores these values as integers) and the spawner
//! (which produces exits) all speak it without depending on one another. The values stored in
//! the segment are declared with `stored_enum!`, which gives each its integer and a checked
//! conversion back that rejects an integer it does not know.

use std::fmt;

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use serde::{Deserialize, Serialize};

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
            type Error = $crate::vocab::UnknownValue;
            fn try_from(value: u32) -> Result<Self, $crate::vocab::UnknownValue> {
                match value {
                    $( $value => Ok($name::$variant), )*
                    _ => Err($crate::vocab::UnknownValue { what: $what, value: u64::from(value) }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self { $( $name::$variant => $text ),* })
            }
        }
    };
}

pub(crate) use stored_enum;

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

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LastExit {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl From<ProcessExit> for LastExit {
    fn from(exit: ProcessExit) -> Self {
        match exit {
            ProcessExit::Exited(code) => LastExit::Exited(code),
            ProcessExit::Signaled { signal, .. } => LastExit::Signaled(signal),
        }
    }
}

/// The stored form has no core-dump flag: read back, a signal death is one without a core.
impl From<LastExit> for ProcessExit {
    fn from(exit: LastExit) -> Self {
        match exit {
            LastExit::Exited(code) => ProcessExit::Exited(code),
            LastExit::Signaled(signal) => ProcessExit::Signaled {
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

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessExit {
    /// It called `exit` (or returned from `main`) with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled { signal: i32, core_dumped: bool },
}

impl ProcessExit {
    /// The exit a `waitpid` status describes; `None` for the statuses that are not an end
    /// (stopped, continued, still alive).
    pub fn from_wait_status(status: WaitStatus) -> Option<ProcessExit> {
        match status {
            WaitStatus::Exited(_, code) => Some(ProcessExit::Exited(code)),
            WaitStatus::Signaled(_, signal, core_dumped) => Some(ProcessExit::Signaled {
                signal: signal as i32,
                core_dumped,
            }),
            _ => None,
        }
    }

    /// Whether this is a clean `exit(0)`.
    pub fn success(self) -> bool {
        self == ProcessExit::Exited(0)
    }
}

impl fmt::Display for ProcessExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ProcessExit::Exited(code) => write!(f, "exited with status {code}"),
            ProcessExit::Signaled {
                signal,
                core_dumped,
            } => {
                match Signal::try_from(signal) {
                    Ok(s) => write!(f, "killed by {}", s.as_str())?,
                    Err(_) => write!(f, "killed by signal {signal}")?,
                }
                if core_dumped {
                    f.write_str(" (core dumped)")?;
                }
                Ok(())
            }
        }
    }
}

/// What the standby does when the coordinator dies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Takeover {
    /// Become the coordinator and keep every running service as it is.
    #[default]
    Adopt,
    /// Stop the services in shutdown order and start them again (the original design).
    Restart,
}

stored_enum! {
    /// What the stack wants of one service: the engine's intent, published in the segment so
    /// that a coordinator taking over continues it rather than guessing it. A zeroed record
    /// reads as `Up`.
    pub enum Want as "wanted state" {
        /// It is to run (and be started once what it depends on is up).
        Up = 0 => "up",
        /// It is to stay down (a stop, a failure it is not restarted after, or a dependency
        /// that stays down).
        Down = 1 => "down",
        /// A failure sequence takes it down; it is wanted up again once every service that
        /// sequence takes down is down.
        Cycling = 2 => "cycling",
        /// The operator stopped it (`ccmgr stop SERVICE`, or a service it requires): it stays
        /// down whatever happens (no failure sequence, restart policy or takeover brings it
        /// back) until the operator starts it again. Only a stop of the whole stack, which
        /// wants everything down, overrides it.
        Held = 3 => "stopped by the operator",
    }
}

/// Whether `name` is a valid instance name: 1 to 64 characters from `[A-Za-z0-9_.-]` (it names
/// files in run_dir, so no `/` and nothing a shell or a path could misread).
pub fn is_valid_instance_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

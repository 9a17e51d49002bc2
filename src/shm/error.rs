//! The errors of the main segment, in one enum shared by every module that handles the
//! segment ([`open`](super::open), [`status`](super::status), [`reclaim`](super::reclaim)):
//! a caller such as `ccmgr stop` meets the same failure (a truncated file, a dead mutex
//! holder) through any of them and matches it in one place. Each error is a sentence naming
//! the instance and, where there is one, the file.

use std::io;

use super::layout::{LAYOUT_VERSION, MAGIC};
use super::robust::MutexError;
use super::state::MutexId;
use super::status::READ_LOCK_LIMIT;

/// Errors of the shared-memory segment. Each names the instance and, where
/// there is one, the segment's path.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The instance name is unusable in a segment name.
    #[error("invalid instance name {name:?}: use 1 to 64 of the characters A-Z a-z 0-9 _ . -")]
    InvalidInstanceName {
        /// The name given.
        name: String,
    },
    /// The run directory may not hold the instance's state (see
    /// [`state_dir`](super::state_dir)).
    #[error(transparent)]
    UntrustedDir(#[from] super::state_dir::DirTrustError),
    /// The spec given to [`Segment::create`](super::Segment::create) cannot be laid out.
    #[error("cannot create the segment of instance {instance}: {reason}")]
    InvalidSpec {
        /// The instance.
        instance: String,
        /// What is wrong.
        reason: String,
    },
    /// A segment with that name exists already.
    #[error("segment {path} of instance {instance} already exists")]
    AlreadyExists {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
    },
    /// No segment with that name exists.
    #[error("instance {instance} has no segment ({path} does not exist)")]
    NotFound {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
    },
    /// The segment belongs to another user.
    #[error(
        "segment {path} of instance {instance} was created by uid {owner}, not by uid {expected}: refusing to use it"
    )]
    WrongOwner {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// Its owner.
        owner: u32,
        /// The owner required.
        expected: u32,
    },
    /// Users other than the owner (and its group) may use the segment.
    #[error(
        "segment {path} of instance {instance} has mode {mode:04o}, open to other users: refusing to use it"
    )]
    TooOpen {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is not a regular file.
    #[error(
        "{path} (the segment of instance {instance}) is not a regular file: refusing to use it"
    )]
    NotRegularFile {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
    },
    /// The file is shorter than its layout.
    #[error(
        "segment {path} of instance {instance} is truncated: it has {size} bytes, its layout needs {needed}"
    )]
    Truncated {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The file's size.
        size: u64,
        /// The size needed.
        needed: u64,
    },
    /// The file is longer than its layout.
    #[error(
        "segment {path} of instance {instance} has {size} bytes, but its layout has {expected}: refusing to use it"
    )]
    WrongSize {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The file's size.
        size: u64,
        /// The size expected.
        expected: u64,
    },
    /// The file does not start with the ccmgr magic.
    #[error(
        "{path} is not a ccmgr segment (magic {found:#018x}, expected {MAGIC:#018x}): refusing to use it for instance {instance}"
    )]
    BadMagic {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The first eight bytes, little-endian.
        found: u64,
    },
    /// The layout version is not this build's.
    #[error(
        "segment {path} of instance {instance} has layout version {found}, this ccmgr uses version {LAYOUT_VERSION}: refusing to use it"
    )]
    WrongVersion {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// The version found.
        found: u32,
    },
    /// Something inside the segment is out of bounds or inconsistent.
    #[error("segment {path} of instance {instance} is corrupt: {detail}")]
    Corrupt {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A system call failed.
    #[error("instance {instance}: {action} {path}: {source}")]
    Io {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// What was being done ("creating", "opening", ...).
        action: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A reader waited [`READ_LOCK_LIMIT`] for the state lock in vain: its holder is stopped
    /// or wedged, or the segment's bytes only look locked. A reader never waits for ever.
    #[error(
        "instance {instance}: the lock of its shared state has been held for over {}s (a stopped or wedged writer, or a corrupt segment): cannot read a consistent state",
        READ_LOCK_LIMIT.as_secs()
    )]
    StateLockHeld {
        /// The instance.
        instance: String,
    },
    /// A reader's private copy ([`Segment::open_snapshot`](super::Segment::open_snapshot))
    /// found a change under way at every attempt.
    #[error(
        "segment {path} of instance {instance} was being changed at each of {attempts} attempts to copy it (a writer stopped or wedged in the middle of a change?): cannot read a consistent state"
    )]
    NoConsistentCopy {
        /// The instance.
        instance: String,
        /// The segment path.
        path: String,
        /// How many copies were tried.
        attempts: u32,
    },
    /// A live coordinator holds the instance.
    #[error("instance {instance} is already running (coordinator {})", pid_text(.coordinator_pid))]
    AlreadyRunning {
        /// The instance.
        instance: String,
        /// The coordinator's pid, if it has announced itself yet.
        coordinator_pid: Option<i32>,
    },
    /// A live `ccmgr start` holds the manager mutex.
    #[error("instance {instance} is being started (ccmgr start {})", pid_text(.manager_pid))]
    BeingStarted {
        /// The instance.
        instance: String,
        /// The manager's pid, if recorded.
        manager_pid: Option<i32>,
    },
    /// No coordinator, but processes of the instance still live.
    #[error(
        "instance {instance} has no coordinator, but {survivors} still alive: stop them before its segment can be reclaimed"
    )]
    StillInUse {
        /// The instance.
        instance: String,
        /// The live processes, described.
        survivors: String,
    },
    /// A service index beyond the service count.
    #[error("instance {instance} has no service #{index} (it has {count})")]
    NoSuchService {
        /// The instance.
        instance: String,
        /// The index asked for.
        index: usize,
        /// The number of services.
        count: usize,
    },
    /// A mutex operation failed.
    #[error("instance {instance}: {which}: {source}")]
    Mutex {
        /// The instance.
        instance: String,
        /// Which mutex.
        which: MutexId,
        /// The error.
        #[source]
        source: MutexError,
    },
}

fn pid_text(pid: &Option<i32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid not yet recorded".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_read_as_sentences() {
        let e = ShmError::WrongOwner {
            instance: "x".into(),
            path: "/run/ccmgr/x.seg".into(),
            owner: 65534,
            expected: 0,
        };
        assert_eq!(
            e.to_string(),
            "segment /run/ccmgr/x.seg of instance x was created by uid 65534, not by uid 0: refusing to use it"
        );
        let e = ShmError::AlreadyRunning {
            instance: "x".into(),
            coordinator_pid: Some(42),
        };
        assert_eq!(
            e.to_string(),
            "instance x is already running (coordinator pid 42)"
        );
    }
}

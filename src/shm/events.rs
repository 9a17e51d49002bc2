//! The event ring: a file of fixed-size slots in `run_dir` (`<instance>.events`) into which
//! the acting coordinator writes one line per lifecycle event, and from which any number of
//! readers (`ccmgr events`) follow, each at its own pace.
//!
//! Why a ring in shared memory rather than a socket per reader: the writer must never wait
//! for a reader (issue: "a slow reader never blocks the coordinator"). Writing a slot is a
//! few stores and, once per batch, one `FUTEX_WAKE`; the writer neither knows nor cares how
//! many readers there are or where they stand. A reader that falls more than a ring behind
//! finds its next slot overwritten and is told how many events it lost. The ring outlives a
//! coordinator: the standby that takes over opens it and goes on writing at the head, so a
//! reader follows across a takeover without noticing.
//!
//! Who may do what: the file belongs to the instance's owner, mode 0600 (0640 and the
//! configured group, whose members may then follow events). Readers map it `PROT_READ` from
//! a descriptor opened read-only: they can neither write it nor disturb each other, and
//! everything they read is checked as data (a slot's length, its sequence stamp).
//!
//! # Layout (all little-endian words, naturally aligned)
//! - header (64 bytes): magic `u64`, version `u32`, slot count `u32`, slot size `u32`,
//!   pad, head `u64` (the sequence number of the next event; events `head - slots .. head`
//!   are in the ring), wake `u32` (bumped once per batch; readers `FUTEX_WAIT` on it).
//! - `slots` slots of `slot size` bytes: stamp `u64` (`2 * seq + 1` while event `seq` is
//!   being written, `2 * seq + 2` once it is complete), length `u32`, pad `u32`, then the
//!   bytes of the line (UTF-8 JSON, no newline).
//!
//! A reader checks a slot's stamp before and after copying it (a per-slot sequence lock):
//! only a copy whose stamp says "event `seq`, complete" both times is the event.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

use super::mapping::{Mapping, ReadOnly, ReadWrite, Unpublished};
use super::robust::{Deadline, FutexWait};

/// "ccmgrEVT" as a little-endian word.
pub const EVENTS_MAGIC: u64 = u64::from_le_bytes(*b"ccmgrEVT");
/// The layout version of the ring.
pub const EVENTS_VERSION: u32 = 1;
/// Slots in the ring: how many events a reader may fall behind before it loses some.
pub const EVENT_SLOTS: u32 = 1024;
/// Bytes per slot, header included.
pub const EVENT_SLOT_SIZE: u32 = 512;
/// The longest line a slot holds; a longer one is cut (at a character boundary) and marked.
pub const EVENT_MAX_LINE: usize = EVENT_SLOT_SIZE as usize - SLOT_DATA;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_SLOTS: usize = 12;
const OFF_SLOT_SIZE: usize = 16;
const OFF_HEAD: usize = 24;
const OFF_WAKE: usize = 32;
const HEADER: usize = 64;
const SLOT_STAMP: usize = 0;
const SLOT_LEN: usize = 8;
const SLOT_DATA: usize = 16;

/// The ring's file size.
const fn ring_len() -> usize {
    HEADER + EVENT_SLOTS as usize * EVENT_SLOT_SIZE as usize
}

/// What can go wrong with the event ring.
#[derive(Debug, thiserror::Error)]
pub enum EventRingError {
    #[error("the event ring {path}: {action}: {source}")]
    Io {
        path: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no event ring at {path}: the instance is not running")]
    NotFound { path: String },
    #[error("the event ring {path} is not one ccmgr wrote: {detail}")]
    Invalid { path: String, detail: String },
    #[error(
        "the event ring {path} belongs to uid {owner}, not to the instance's owner (uid {expected}): refusing to use it"
    )]
    WrongOwner {
        path: String,
        owner: u32,
        expected: u32,
    },
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> EventRingError + use<> {
    let path = path.display().to_string();
    move |source| EventRingError::Io {
        path,
        action,
        source,
    }
}

/// The writer's side: the acting coordinator's handle on the ring.
pub struct EventRing {
    map: Arc<Mapping<ReadWrite>>,
    /// Events written since the last [`EventRing::wake_readers`].
    unannounced: bool,
}

impl std::fmt::Debug for EventRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRing")
            .field("head", &self.head())
            .finish()
    }
}

impl EventRing {
    /// A new, empty ring at `path`, replacing whatever was there (the previous run's ring:
    /// its readers keep their mapping, see the name gone and end). Mode 0600, or 0640 with
    /// `group`. The file has no name until it is complete.
    pub fn create(path: &Path, group: Option<u32>) -> Result<EventRing, EventRingError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mode = if group.is_some() { 0o640 } else { 0o600 };
        let mut unpublished = Unpublished::create_with_mode(dir, ring_len(), mode, group)
            .map_err(|(_, e)| io_err(path, "creating")(e))?;
        // No mutex in the ring: the sequence stamps are its only synchronisation.
        unpublished
            .init_sync(&[])
            .map_err(|e| io_err(path, "creating")(io::Error::other(e.to_string())))?;
        {
            let map = unpublished.mapping();
            let word = |offset| {
                map.get::<AtomicU64>(offset)
                    .expect("header inside the ring")
            };
            word(OFF_MAGIC).store(EVENTS_MAGIC, Ordering::Relaxed);
            let word32 = |offset| {
                map.get::<AtomicU32>(offset)
                    .expect("header inside the ring")
            };
            word32(OFF_VERSION).store(EVENTS_VERSION, Ordering::Relaxed);
            word32(OFF_SLOTS).store(EVENT_SLOTS, Ordering::Relaxed);
            word32(OFF_SLOT_SIZE).store(EVENT_SLOT_SIZE, Ordering::Relaxed);
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "removing the previous run's ring")(e)),
        }
        let map = unpublished.publish(path).map_err(io_err(path, "naming"))?;
        Ok(EventRing {
            map,
            unannounced: false,
        })
    }

    /// The ring a predecessor created (a coordinator taking over goes on at its head).
    pub fn open(path: &Path) -> Result<EventRing, EventRingError> {
        let file = open_checked(path, true, nix::unistd::geteuid().as_raw())?;
        let map = Mapping::<ReadWrite>::map(OwnedFd::from(file), ring_len())
            .map_err(io_err(path, "mapping"))?;
        Ok(EventRing {
            map: Arc::new(map),
            unannounced: false,
        })
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        self.map.get(offset).expect("checked at open")
    }

    /// Whether the ring's file still has its full size (see [`ring_intact`]).
    fn intact(&self) -> bool {
        ring_intact(self.map.file())
    }

    /// The sequence number the next event gets.
    pub fn head(&self) -> u64 {
        self.word(OFF_HEAD).load(Ordering::Relaxed)
    }

    /// Append one line (cut to [`EVENT_MAX_LINE`] bytes). Readers are woken by
    /// [`EventRing::wake_readers`], once per batch.
    pub fn append(&mut self, line: &str) {
        // A ring truncated under us (`: > <instance>.events` by its owner) would raise
        // SIGBUS at the first store past its new end and kill the coordinator: events stop
        // instead (a successor makes a new ring). Looked at once per batch, at its first
        // event (`unannounced` is set from then until the wake): not one fstat per event.
        if !self.unannounced && !self.intact() {
            return;
        }
        let seq = self.head();
        let slot = HEADER + (seq % u64::from(EVENT_SLOTS)) as usize * EVENT_SLOT_SIZE as usize;
        let bytes = cut_at_char_boundary(line, EVENT_MAX_LINE);
        let stamp = self.word(slot + SLOT_STAMP);
        stamp.store(writing_stamp(seq), Ordering::Relaxed);
        // The odd stamp is visible before any byte of the new line.
        fence(Ordering::Release);
        let len: &AtomicU32 = self.map.get(slot + SLOT_LEN).expect("slot inside the ring");
        len.store(bytes.len() as u32, Ordering::Relaxed);
        let data: &[AtomicU8] = self
            .map
            .slice(slot + SLOT_DATA, bytes.len())
            .expect("slot inside the ring");
        for (d, s) in data.iter().zip(bytes) {
            d.store(*s, Ordering::Relaxed);
        }
        stamp.store(complete_stamp(seq), Ordering::Release);
        self.word(OFF_HEAD)
            .store(seq.wrapping_add(1), Ordering::Release);
        self.unannounced = true;
    }

    /// Wake every reader waiting for an event, if any event was appended since the last
    /// call: one system call per batch, whatever the number of events or readers.
    pub fn wake_readers(&mut self) {
        // Nothing appended, or the ring found truncated at this batch's first event.
        if !self.unannounced {
            return;
        }
        self.unannounced = false;
        let wake: &AtomicU32 = self.map.get(OFF_WAKE).expect("header inside the ring");
        wake.fetch_add(1, Ordering::Release);
        let _ = self.map.futex_wake(OFF_WAKE, i32::MAX);
    }
}

/// Whether the ring's file `file` still has the size it was mapped with. Its owner can
/// truncate it under a mapping, and a load or store past the new end raises SIGBUS: writer
/// and readers ask this (one `fstat`) before they touch the mapping.
fn ring_intact(file: &File) -> bool {
    file.metadata().is_ok_and(|m| m.len() >= ring_len() as u64)
}

/// A slot's stamp while event `seq` is written into it. Wrapping: the words are data any
/// process of the owner's uid could have written, and must never make the writer panic.
fn writing_stamp(seq: u64) -> u64 {
    seq.wrapping_mul(2).wrapping_add(1)
}

/// A slot's stamp once event `seq` is complete in it.
fn complete_stamp(seq: u64) -> u64 {
    seq.wrapping_mul(2).wrapping_add(2)
}

fn cut_at_char_boundary(line: &str, max: usize) -> &[u8] {
    if line.len() <= max {
        return line.as_bytes();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line.as_bytes()[..end]
}

/// Open the ring file and check what can be checked before mapping it: owner, type, size,
/// magic and geometry.
fn open_checked(path: &Path, write: bool, owner: u32) -> Result<File, EventRingError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags_nofollow()
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                EventRingError::NotFound {
                    path: path.display().to_string(),
                }
            } else {
                io_err(path, "opening")(e)
            }
        })?;
    let meta = file.metadata().map_err(io_err(path, "examining"))?;
    let invalid = |detail: String| EventRingError::Invalid {
        path: path.display().to_string(),
        detail,
    };
    if !meta.file_type().is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.uid() != owner {
        return Err(EventRingError::WrongOwner {
            path: path.display().to_string(),
            owner: meta.uid(),
            expected: owner,
        });
    }
    if meta.len() != ring_len() as u64 {
        return Err(invalid(format!(
            "{} bytes where a ring has {}",
            meta.len(),
            ring_len()
        )));
    }
    let mut header = [0u8; 24];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0)
        .map_err(io_err(path, "reading"))?;
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
    if u64_at(OFF_MAGIC) != EVENTS_MAGIC {
        return Err(invalid("wrong magic".into()));
    }
    if u32_at(OFF_VERSION) != EVENTS_VERSION
        || u32_at(OFF_SLOTS) != EVENT_SLOTS
        || u32_at(OFF_SLOT_SIZE) != EVENT_SLOT_SIZE
    {
        return Err(invalid(format!(
            "version {} with {} slots of {} bytes; this ccmgr reads version {EVENTS_VERSION} with {EVENT_SLOTS} of {EVENT_SLOT_SIZE}",
            u32_at(OFF_VERSION),
            u32_at(OFF_SLOTS),
            u32_at(OFF_SLOT_SIZE)
        )));
    }
    Ok(file)
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NOFOLLOW | libc::O_CLOEXEC)
    }
}

/// What a reader gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// An event's line.
    Line(String),
    /// This many events were overwritten before this reader got to them.
    Lost(u64),
    /// Nothing new within the wait.
    Idle,
    /// The ring's name is gone: the instance was stopped (or its run_dir cleaned).
    Ended,
    /// The ring's file was truncated under the reader: nothing more can be read from it.
    Truncated,
}

/// A reader's side: follows the ring from a position of its choice.
pub struct EventFollower {
    map: Mapping<ReadOnly>,
    next: u64,
}

impl EventFollower {
    /// Open the ring at `path`, owned by `owner`, read-only; the reader starts with the
    /// last `backlog` events still in the ring (0: only what happens from now on).
    pub fn open(path: &Path, owner: u32, backlog: u64) -> Result<EventFollower, EventRingError> {
        let file = open_checked(path, false, owner)?;
        let map = Mapping::<ReadOnly>::map(OwnedFd::from(file), ring_len())
            .map_err(io_err(path, "mapping"))?;
        let mut follower = EventFollower { map, next: 0 };
        let head = follower.head();
        follower.next = head.wrapping_sub(backlog.min(u64::from(EVENT_SLOTS)).min(head));
        Ok(follower)
    }

    fn head(&self) -> u64 {
        let head = self.map.load_u64(OFF_HEAD).expect("header inside the ring");
        fence(Ordering::Acquire);
        head
    }

    /// The next event, waiting at most `wait` for one.
    pub fn next(&mut self, wait: Duration) -> Followed {
        let deadline = Deadline::after(wait);
        loop {
            if !ring_intact(self.map.file()) {
                return Followed::Truncated;
            }
            let wake = self.map.load_u32(OFF_WAKE).expect("header inside the ring");
            fence(Ordering::Acquire);
            let head = self.head();
            // Wrapping distances: a forged head near the counter's end must not stall readers.
            let ahead = head.wrapping_sub(self.next);
            if ahead != 0 && ahead < u64::MAX / 2 {
                return self.take(head);
            }
            if self.ended() {
                return Followed::Ended;
            }
            match self.map.futex_wait(OFF_WAKE, wake, Some(deadline)) {
                Some(Ok(FutexWait::TimedOut)) => return Followed::Idle,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Followed::Idle,
            }
        }
    }

    /// Event `self.next`, known to be below `head`.
    fn take(&mut self, head: u64) -> Followed {
        let slots = u64::from(EVENT_SLOTS);
        let ahead = head.wrapping_sub(self.next);
        if ahead > slots {
            return self.resync(head);
        }
        let seq = self.next;
        let slot = HEADER + (seq % slots) as usize * EVENT_SLOT_SIZE as usize;
        let complete = complete_stamp(seq);
        let before = self.map.load_u64(slot + SLOT_STAMP).unwrap_or(0);
        fence(Ordering::Acquire);
        let len = (self.map.load_u32(slot + SLOT_LEN).unwrap_or(0) as usize).min(EVENT_MAX_LINE);
        let bytes: Vec<u8> = (0..len)
            .map(|i| self.map.load_u8(slot + SLOT_DATA + i).unwrap_or(0))
            .collect();
        fence(Ordering::Acquire);
        let after = self.map.load_u64(slot + SLOT_STAMP).unwrap_or(0);
        if before != complete || after != complete {
            // Overwritten while we were on our way: the writer has lapped this reader.
            return self.resync(self.head());
        }
        self.next = self.next.wrapping_add(1);
        Followed::Line(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// This reader fell a ring behind: go on a quarter of a ring ahead of the oldest event
    /// still held, not at it, or the writer (which overwrites that slot next) laps it again at
    /// once and it would report "1 lost" over and over under a steady stream. One `Lost` says
    /// how many were skipped in all.
    fn resync(&mut self, head: u64) -> Followed {
        let slots = u64::from(EVENT_SLOTS);
        let resume = head.wrapping_sub(slots - slots / 4);
        let lost = resume.wrapping_sub(self.next);
        self.next = resume;
        // A forged head could put `resume` behind `next`: then nothing was skipped.
        Followed::Lost(if lost < u64::MAX / 2 { lost.max(1) } else { 1 })
    }

    /// Whether the ring's file has lost its name (`ccmgr stop` removed it).
    fn ended(&self) -> bool {
        self.map.file().metadata().is_ok_and(|m| m.nlink() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> (tempfile::TempDir, std::path::PathBuf, EventRing) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.events");
        let ring = EventRing::create(&path, None).unwrap();
        (dir, path, ring)
    }

    #[test]
    fn readers_get_every_event_in_order() {
        let (_dir, path, mut ring) = ring();
        let uid = nix::unistd::geteuid().as_raw();
        let mut a = EventFollower::open(&path, uid, 0).unwrap();
        let mut b = EventFollower::open(&path, uid, 0).unwrap();
        for i in 0..5 {
            ring.append(&format!("event {i}"));
        }
        ring.wake_readers();
        for reader in [&mut a, &mut b] {
            for i in 0..5 {
                assert_eq!(
                    reader.next(Duration::from_millis(10)),
                    Followed::Line(format!("event {i}"))
                );
            }
            assert_eq!(reader.next(Duration::from_millis(10)), Followed::Idle);
        }
    }

    #[test]
    fn a_reader_that_falls_behind_is_told_how_many_it_lost() {
        let (_dir, path, mut ring) = ring();
        let uid = nix::unistd::geteuid().as_raw();
        let mut slow = EventFollower::open(&path, uid, 0).unwrap();
        let total = u64::from(EVENT_SLOTS) + 7;
        for i in 0..total {
            ring.append(&format!("event {i}"));
        }
        // It goes on a quarter of a ring past the oldest event held, and says how many it
        // skipped in all.
        let resume = total - u64::from(EVENT_SLOTS) * 3 / 4;
        assert_eq!(slow.next(Duration::ZERO), Followed::Lost(resume));
        assert_eq!(
            slow.next(Duration::ZERO),
            Followed::Line(format!("event {resume}"))
        );
    }

    #[test]
    fn backlog_and_a_successor_continue_the_same_sequence() {
        let (_dir, path, mut ring) = ring();
        ring.append("one");
        ring.append("two");
        drop(ring);
        let mut successor = EventRing::open(&path).unwrap();
        successor.append("three");
        let uid = nix::unistd::geteuid().as_raw();
        let mut reader = EventFollower::open(&path, uid, 2).unwrap();
        assert_eq!(reader.next(Duration::ZERO), Followed::Line("two".into()));
        assert_eq!(reader.next(Duration::ZERO), Followed::Line("three".into()));
    }

    #[test]
    fn a_long_line_is_cut_at_a_character_boundary() {
        let (_dir, path, mut ring) = ring();
        let uid = nix::unistd::geteuid().as_raw();
        let mut reader = EventFollower::open(&path, uid, 0).unwrap();
        ring.append(&"é".repeat(EVENT_MAX_LINE));
        match reader.next(Duration::ZERO) {
            Followed::Line(l) => assert!(l.len() <= EVENT_MAX_LINE && l.chars().all(|c| c == 'é')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reader_sees_the_end_when_the_name_goes() {
        let (_dir, path, _ring) = ring();
        let uid = nix::unistd::geteuid().as_raw();
        let mut reader = EventFollower::open(&path, uid, 0).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(reader.next(Duration::from_millis(10)), Followed::Ended);
    }

    #[test]
    fn a_forged_head_near_the_end_of_the_counter_does_not_panic_the_writer() {
        let (_dir, path, ring) = ring();
        ring.word(OFF_HEAD).store(u64::MAX - 1, Ordering::Relaxed);
        drop(ring);
        let mut ring = EventRing::open(&path).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let mut reader = EventFollower::open(&path, uid, 0).unwrap();
        ring.append("near the end");
        ring.append("wrapped");
        assert_eq!(ring.head(), 0);
        assert_eq!(
            reader.next(Duration::ZERO),
            Followed::Line("near the end".into())
        );
    }

    #[test]
    fn a_file_that_is_not_a_ring_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.events");
        std::fs::write(&path, vec![0u8; ring_len()]).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert!(matches!(
            EventFollower::open(&path, uid, 0),
            Err(EventRingError::Invalid { .. })
        ));
        assert!(matches!(
            EventFollower::open(&path, uid + 1, 0),
            Err(EventRingError::WrongOwner { .. })
        ));
    }
}

//! Robust, process-shared pthread mutexes that live inside the mapped segment,
//! the futex words of the service API, and the monotonic-clock deadlines their
//! timed waits use. All the pthread and futex FFI of ccmgr is here.
//!
//! # Robust mutexes
//! A [`RobustMutex`] is a `pthread_mutex_t` initialised `PTHREAD_PROCESS_SHARED`,
//! `PTHREAD_MUTEX_ROBUST` and `PTHREAD_MUTEX_ERRORCHECK`. When its holder dies the
//! kernel releases it and the next locker gets `EOWNERDEAD`; this module makes
//! the mutex consistent at once and tells the caller through
//! [`MutexGuard::previous_holder_died`]. Facts the callers must keep in mind:
//!
//! - Ownership is per **thread**. The kernel releases a thread's robust mutexes
//!   when that thread exits, when its process exits, and when its process calls
//!   `execve`. A lock meant to last as long as the process must be taken by a
//!   thread that lives as long as the process (the main thread), and a process
//!   that execs loses its locks.
//! - Exception: when a thread *other than the main thread* calls `execve`, it
//!   takes over the main thread's tid before the kernel walks its robust list,
//!   the owner tid no longer matches, and its locks stay held for ever (the
//!   test `execve_from_another_thread_leaves_its_locks_wedged` shows it).
//!   Never exec from a thread that holds a lock; `fork` + `exec` in the child
//!   is fine (the child holds nothing).
//! - A guard unlocks only on the thread that locked (guards are `!Send`);
//!   re-locking from the holding thread fails with [`MutexError::AlreadyHeld`]
//!   instead of deadlocking.
//! - The memory must stay mapped while a lock is held (the kernel and glibc
//!   keep a list of held robust mutexes through pointers into it). Every guard
//!   therefore owns a reference to the mapping: even a guard given to
//!   [`MutexGuard::hold_until_exit`] keeps the mapping for the process's life.
//!
//! # Futex words and a thread's own robust list
//! The service API ([`crate::shm::api`]) uses bare futex words instead of pthread mutexes
//! where other users' processes are involved: `futex_wait`/`futex_wake` (and the raw
//! forms for read-only mappings), and `ThreadRobustList`, which gives one thread a kernel
//! robust list of ccmgr's own that names a single word through `list_op_pending`, so that
//! the kernel itself marks the word when that thread dies, or passes a wake-up on.

use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::errno::Errno;

use super::mapping::{Mapping, ReadWrite};

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
compile_error!(
    "ccmgr's shared-memory substrate needs glibc >= 2.30 on Linux \
     (pthread_mutex_clocklock, robust process-shared mutexes)"
);

// glibc >= 2.30 exports it; the `libc` crate (0.2.191) does not declare it.
unsafe extern "C" {
    fn pthread_mutex_clocklock(
        mutex: *mut libc::pthread_mutex_t,
        clockid: libc::clockid_t,
        abstime: *const libc::timespec,
    ) -> libc::c_int;
}

const NANOS_PER_SEC: i64 = 1_000_000_000;

/// `now + d` on a (seconds, nanoseconds) clock reading, with nanoseconds kept in
/// `[0, 1e9)` and the seconds saturating instead of overflowing.
pub(crate) fn add_duration(now_sec: i64, now_nsec: i64, d: Duration) -> (i64, i64) {
    // Normalise the clock reading first: the kernel's is, but be total anyway.
    let mut sec = now_sec.saturating_add(now_nsec.div_euclid(NANOS_PER_SEC));
    let mut nsec = now_nsec.rem_euclid(NANOS_PER_SEC);
    sec = sec.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    nsec += i64::from(d.subsec_nanos()); // < 2e9: both terms are < 1e9
    if nsec >= NANOS_PER_SEC {
        nsec -= NANOS_PER_SEC;
        sec = sec.saturating_add(1);
    }
    if sec == i64::MAX {
        // Saturated: the latest representable instant, still normalised.
        nsec = NANOS_PER_SEC - 1;
    }
    (sec, nsec)
}

/// An absolute instant on `CLOCK_MONOTONIC`, as the timed waits take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    sec: i64,
    nsec: i64,
}

impl Deadline {
    /// `d` from now on the monotonic clock.
    pub fn after(d: Duration) -> Deadline {
        let (now_sec, now_nsec) = monotonic_now();
        let (sec, nsec) = add_duration(now_sec, now_nsec, d);
        Deadline { sec, nsec }
    }

    /// True once the monotonic clock has reached the deadline.
    pub fn has_passed(&self) -> bool {
        let (sec, nsec) = monotonic_now();
        (sec, nsec) >= (self.sec, self.nsec)
    }

    pub(crate) fn timespec(&self) -> libc::timespec {
        libc::timespec {
            tv_sec: self.sec as libc::time_t,
            tv_nsec: self.nsec as libc::c_long,
        }
    }
}

// time_t and c_long are i64 here but narrower on 32-bit targets.
#[allow(clippy::useless_conversion)]
fn monotonic_now() -> (i64, i64) {
    // CLOCK_MONOTONIC cannot fail to read on Linux.
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    (i64::from(t.tv_sec()), i64::from(t.tv_nsec()))
}

/// Milliseconds on `CLOCK_MONOTONIC` (time since boot, not counting suspend):
/// the clock of every timestamp and restart window stored in the segment.
pub fn monotonic_ms() -> u64 {
    let (sec, nsec) = monotonic_now();
    (sec as u64).saturating_mul(1000) + (nsec as u64) / 1_000_000
}

/// How a lock was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The previous holder released it.
    Clean,
    /// The previous holder died holding it (`EOWNERDEAD`); the data it guards
    /// may be half-updated. The mutex has been made consistent again.
    PreviousHolderDied,
}

/// Why a mutex operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutexError {
    /// A holder died and the mutex was then unlocked without being made
    /// consistent; no one can lock it again until the segment is recreated.
    #[error(
        "the mutex is no longer usable: a holder died and it was released without being made consistent"
    )]
    NotRecoverable,
    /// The calling thread already holds it.
    #[error("this thread already holds the mutex")]
    AlreadyHeld,
    /// The calling thread does not hold it.
    #[error("this thread does not hold the mutex")]
    NotOwner,
    /// Any other failure, with the errno the C library returned.
    #[error("{op} failed: {errno}")]
    Os {
        /// The C function that failed.
        op: &'static str,
        /// Its error.
        errno: Errno,
    },
}

fn mutex_errno(op: &'static str, rc: libc::c_int) -> MutexError {
    match rc {
        libc::ENOTRECOVERABLE => MutexError::NotRecoverable,
        libc::EDEADLK => MutexError::AlreadyHeld,
        libc::EPERM => MutexError::NotOwner,
        rc => MutexError::Os {
            op,
            errno: Errno::from_raw(rc),
        },
    }
}

/// A robust, process-shared pthread mutex as it lies in the segment.
///
/// It is only ever reached through the mapping; lock it through the owning
/// handle [`SharedMutex`], whose guards keep the mapping alive.
#[repr(C)]
pub struct RobustMutex {
    inner: UnsafeCell<libc::pthread_mutex_t>,
}

// SAFETY: a process-shared pthread mutex is made to be operated on concurrently
// by many threads and processes; every access goes through the pthread functions,
// which synchronise internally. Nothing else reads or writes `inner`.
unsafe impl Sync for RobustMutex {}
// SAFETY: the mutex is plain memory with no thread affinity of its own (the
// thread affinity of a *held* lock is carried by `MutexGuard`, which is !Send).
unsafe impl Send for RobustMutex {}

impl RobustMutex {
    /// Initialise the mutex: process-shared, robust, error-checking.
    ///
    /// # Safety
    /// No other thread or process may use this memory during or before the
    /// call: re-initialising a mutex someone holds or waits on corrupts their
    /// robust lists. Only the creator of a segment calls this, on memory no one
    /// else can reach yet.
    pub(crate) unsafe fn init(&self) -> Result<(), MutexError> {
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: `attr` is valid for writes; pthread_mutexattr_init initialises it.
        let rc = unsafe { libc::pthread_mutexattr_init(attr.as_mut_ptr()) };
        if rc != 0 {
            return Err(mutex_errno("pthread_mutexattr_init", rc));
        }
        let attr_ptr = attr.as_mut_ptr();
        let result = (|| {
            // SAFETY: `attr_ptr` points to the attribute object initialised above.
            let rc = unsafe {
                libc::pthread_mutexattr_setpshared(attr_ptr, libc::PTHREAD_PROCESS_SHARED)
            };
            if rc != 0 {
                return Err(mutex_errno("pthread_mutexattr_setpshared", rc));
            }
            // SAFETY: as above.
            let rc =
                unsafe { libc::pthread_mutexattr_setrobust(attr_ptr, libc::PTHREAD_MUTEX_ROBUST) };
            if rc != 0 {
                return Err(mutex_errno("pthread_mutexattr_setrobust", rc));
            }
            // SAFETY: as above.
            let rc = unsafe {
                libc::pthread_mutexattr_settype(attr_ptr, libc::PTHREAD_MUTEX_ERRORCHECK)
            };
            if rc != 0 {
                return Err(mutex_errno("pthread_mutexattr_settype", rc));
            }
            // SAFETY: `inner` is valid, aligned memory for a pthread_mutex_t (it is
            // the field's own type), and the caller guarantees no one else uses it.
            let rc = unsafe { libc::pthread_mutex_init(self.inner.get(), attr_ptr) };
            if rc != 0 {
                return Err(mutex_errno("pthread_mutex_init", rc));
            }
            Ok(())
        })();
        // SAFETY: the attribute object was initialised and is destroyed once; the
        // mutex initialised from it does not refer to it afterwards.
        unsafe { libc::pthread_mutexattr_destroy(attr_ptr) };
        result
    }

    /// Whether this memory says it is a mutex of the kind [`init`](Self::init) makes. glibc
    /// keeps the type, robustness, sharing and priority protocol of a mutex in its `__kind`
    /// word, which no lock operation changes; it is compared with that of a mutex this process
    /// initialises itself. Bytes that say anything else (a corrupted or forged segment) must
    /// never be locked: glibc aborts the process on an assertion when a mutex's state does not
    /// fit its kind (found by fuzzing segment open: the README's "Fuzzing").
    pub(crate) fn has_expected_kind(&self) -> bool {
        static EXPECTED: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
        let expected = EXPECTED.get_or_init(|| {
            let fresh = Box::new(RobustMutex {
                // SAFETY: an all-zero pthread_mutex_t is valid memory to initialise.
                inner: UnsafeCell::new(unsafe { std::mem::zeroed() }),
            });
            // SAFETY: `fresh` is this function's own, reachable by no other thread.
            unsafe { fresh.init() }.ok()?;
            Some(fresh.kind())
        });
        expected.is_some_and(|expected| self.kind() == expected)
    }

    /// glibc's `__kind`: the fifth `int` of `struct __pthread_mutex_s` on 64-bit targets
    /// (after `__lock`, `__count`, `__owner`, `__nusers`), the fourth on 32-bit ones.
    fn kind(&self) -> i32 {
        const KIND_INDEX: usize = if cfg!(target_pointer_width = "64") {
            4
        } else {
            3
        };
        // SAFETY: `inner` is valid, aligned memory of a pthread_mutex_t (at least 24 bytes,
        // 4-aligned), so the int at KIND_INDEX lies inside it. A volatile read: other
        // processes may operate on the mutex meanwhile, but never on this word.
        unsafe { ptr::read_volatile(self.inner.get().cast::<i32>().add(KIND_INDEX)) }
    }

    /// Turn a pthread return code from a locking call into our answer: `None`
    /// for "not acquired" (`EBUSY`/`ETIMEDOUT`), `Some` when the calling thread
    /// now holds the mutex, made consistent if its holder had died.
    fn acquired(&self, op: &'static str, rc: libc::c_int) -> Result<Option<Acquired>, MutexError> {
        match rc {
            0 => Ok(Some(Acquired::Clean)),
            libc::EBUSY | libc::ETIMEDOUT => Ok(None),
            libc::EOWNERDEAD => {
                // SAFETY: we hold the mutex (EOWNERDEAD means acquired), which is
                // what pthread_mutex_consistent requires; `inner` is valid.
                let rc = unsafe { libc::pthread_mutex_consistent(self.inner.get()) };
                if rc != 0 {
                    // Leave it unlocked rather than held by a caller who gets an error.
                    let _ = self.unlock();
                    return Err(mutex_errno("pthread_mutex_consistent", rc));
                }
                Ok(Some(Acquired::PreviousHolderDied))
            }
            rc => Err(mutex_errno(op, rc)),
        }
    }

    /// Block until the calling thread holds the mutex.
    pub(crate) fn lock(&self) -> Result<Acquired, MutexError> {
        // SAFETY: `inner` lies in memory that stays mapped while `self` is
        // borrowed. glibc checks the robust mutex's owner word itself, so calling
        // this on a mutex the thread already holds returns EDEADLK rather than
        // misbehaving. Memory not initialised as a robust mutex (a corrupt
        // segment) can make the call misbehave only within the mutex's own bytes.
        let rc = unsafe { libc::pthread_mutex_lock(self.inner.get()) };
        self.acquired("pthread_mutex_lock", rc)?
            .ok_or(MutexError::Os {
                op: "pthread_mutex_lock",
                errno: Errno::from_raw(rc),
            })
    }

    /// Take the mutex if it is free (or its holder is dead) without blocking.
    pub(crate) fn try_lock(&self) -> Result<Option<Acquired>, MutexError> {
        // SAFETY: as in `lock`.
        let rc = unsafe { libc::pthread_mutex_trylock(self.inner.get()) };
        self.acquired("pthread_mutex_trylock", rc)
    }

    /// Block until the calling thread holds the mutex or the deadline passes.
    pub(crate) fn lock_until(&self, deadline: Deadline) -> Result<Option<Acquired>, MutexError> {
        let ts = deadline.timespec();
        // SAFETY: as in `lock`; `ts` is a normalised timespec on the stack that
        // outlives the call.
        let rc = unsafe { pthread_mutex_clocklock(self.inner.get(), libc::CLOCK_MONOTONIC, &ts) };
        self.acquired("pthread_mutex_clocklock", rc)
    }

    /// Release the mutex held by the calling thread.
    pub(crate) fn unlock(&self) -> Result<(), MutexError> {
        // SAFETY: `inner` is valid as in `lock`. A robust mutex records its
        // owner's thread id, and glibc refuses (EPERM) an unlock from any other
        // thread, so a wrong call cannot release someone else's lock.
        let rc = unsafe { libc::pthread_mutex_unlock(self.inner.get()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(mutex_errno("pthread_mutex_unlock", rc))
        }
    }
}

/// An owning handle on one robust mutex of a mapped segment. Cheap to clone,
/// and `Send`: hand it to the thread that is to hold the lock.
#[derive(Clone)]
pub struct SharedMutex {
    map: Arc<Mapping<ReadWrite>>,
    mutex: NonNull<RobustMutex>,
}

// SAFETY: the handle holds an Arc of a Send + Sync mapping and a pointer into
// that mapping to a Sync type; it grants no thread-affine state (guards do).
unsafe impl Send for SharedMutex {}
// SAFETY: as above; every method takes `&self` and the mutex itself is Sync.
unsafe impl Sync for SharedMutex {}

impl SharedMutex {
    /// Only the mapping makes handles, after checking that `mutex` lies inside
    /// it, aligned.
    pub(crate) fn new(map: Arc<Mapping<ReadWrite>>, mutex: NonNull<RobustMutex>) -> SharedMutex {
        SharedMutex { map, mutex }
    }

    fn raw(&self) -> &RobustMutex {
        // SAFETY: `mutex` was checked to lie inside the mapping and be aligned
        // when the handle was made, and `self.map` keeps that mapping alive for
        // as long as `self` is borrowed. RobustMutex is only used through
        // shared references.
        unsafe { self.mutex.as_ref() }
    }

    /// See [`RobustMutex::has_expected_kind`].
    pub(crate) fn has_expected_kind(&self) -> bool {
        self.raw().has_expected_kind()
    }

    fn guard(&self, acquired: Acquired) -> MutexGuard {
        MutexGuard {
            _mapping: Arc::clone(&self.map),
            mutex: self.mutex,
            acquired,
            released: false,
            _thread_bound: PhantomData,
        }
    }

    /// Block until the calling thread holds the mutex.
    pub fn lock(&self) -> Result<MutexGuard, MutexError> {
        let acquired = self.raw().lock()?;
        Ok(self.guard(acquired))
    }

    /// Take the mutex if no live thread holds it; `None` if one does.
    pub fn try_lock(&self) -> Result<Option<MutexGuard>, MutexError> {
        Ok(self.raw().try_lock()?.map(|a| self.guard(a)))
    }

    /// Block for at most `timeout` (measured on `CLOCK_MONOTONIC`); `None` if a
    /// live thread still holds the mutex then.
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<MutexGuard>, MutexError> {
        self.lock_until(Deadline::after(timeout))
    }

    /// Block until the deadline at most; `None` if a live thread still holds it.
    pub fn lock_until(&self, deadline: Deadline) -> Result<Option<MutexGuard>, MutexError> {
        Ok(self.raw().lock_until(deadline)?.map(|a| self.guard(a)))
    }

    /// The address of the mutex's futex word in this process: waiters blocked
    /// on it show it as the first argument of `futex` in
    /// `/proc/<pid>/task/<tid>/syscall`. For tests and diagnostics.
    pub fn futex_address(&self) -> usize {
        self.mutex.as_ptr() as usize
    }
}

impl fmt::Debug for SharedMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMutex")
            .field("address", &format_args!("{:#x}", self.futex_address()))
            .finish()
    }
}

/// Proof that the calling thread holds a robust mutex. Unlocks on drop.
///
/// The guard owns a reference to the mapping, not a borrow: store it wherever
/// the lock must outlive a scope (the coordinator keeps the daemon component
/// mutex in its state and [`unlock`](Self::unlock)s it during recovery). It is
/// `!Send`: a pthread mutex is owned by a thread, and only that thread may
/// unlock it.
///
/// ```compile_fail
/// fn give_away(guard: ccmgr::shm::MutexGuard) {
///     // A guard cannot move to another thread.
///     std::thread::spawn(move || drop(guard));
/// }
/// ```
#[must_use = "dropping the guard unlocks the mutex at once"]
pub struct MutexGuard {
    /// Keeps the mapping (and so the mutex) mapped while the lock is held.
    _mapping: Arc<Mapping<ReadWrite>>,
    mutex: NonNull<RobustMutex>,
    acquired: Acquired,
    /// Set by `unlock`, so that drop does not unlock twice.
    released: bool,
    /// `*const ()` makes the guard !Send and !Sync.
    _thread_bound: PhantomData<*const ()>,
}

impl MutexGuard {
    /// How the lock was acquired.
    pub fn acquired(&self) -> Acquired {
        self.acquired
    }

    /// True if the previous holder died holding the lock (`EOWNERDEAD`), so the
    /// state it guards may be half-updated.
    pub fn previous_holder_died(&self) -> bool {
        self.acquired == Acquired::PreviousHolderDied
    }

    fn raw(&self) -> &RobustMutex {
        // SAFETY: as in `SharedMutex::raw`: checked when the handle that made
        // this guard was made, and `self._mapping` keeps the mapping alive.
        unsafe { self.mutex.as_ref() }
    }

    /// Unlock now, reporting a failure that dropping would only log.
    pub fn unlock(mut self) -> Result<(), MutexError> {
        self.released = true;
        self.raw().unlock()
    }

    /// Keep the lock for the rest of the calling thread's life, which for the
    /// main thread is the process's life. The kernel releases it when that
    /// thread exits, the process dies or execs; the waiters then learn that
    /// the holder died. The mapping stays mapped until the process ends.
    pub fn hold_until_exit(self) {
        std::mem::forget(self);
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Err(e) = self.raw().unlock() {
            // Only possible if the segment was corrupted under us.
            tracing::error!(error = %e, "unlocking a robust mutex failed");
        }
    }
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field(
                "address",
                &format_args!("{:#x}", self.mutex.as_ptr() as usize),
            )
            .field("acquired", &self.acquired)
            .finish()
    }
}

/// The bits of a robust futex word (`linux/futex.h`): the owner's thread id, "a thread may
/// sleep on this word", and "the owner died holding it".
pub(crate) const FUTEX_WAITERS: u32 = 0x8000_0000;
/// Set by the kernel in a robust futex word whose owner died.
pub(crate) const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
/// The owner's thread id in a robust futex word.
pub(crate) const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

// linux/futex.h; the `libc` crate does not export all of them on every target.
const FUTEX_WAKE: libc::c_int = 1;
const FUTEX_WAIT_BITSET: libc::c_int = 9;
const FUTEX_BITSET_MATCH_ANY: u32 = 0xffff_ffff;

/// How a [`futex_wait`] ended. Every caller re-reads the word afterwards: a wake-up says only
/// that something may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FutexWait {
    /// Woken by a `FUTEX_WAKE` (or by a signal handler's return: `EINTR`).
    Woken,
    /// The word no longer held the expected value when the call began.
    Changed,
    /// The deadline passed.
    TimedOut,
}

/// Sleep while the 32-bit word at `word` holds `expected`, until a `FUTEX_WAKE` on it or the
/// deadline (on `CLOCK_MONOTONIC`, absolute).
///
/// The word is shared (no `FUTEX_PRIVATE_FLAG`), so a waker in another process that maps the
/// same file reaches it, and so does the kernel when it wakes a waiter of a robust futex whose
/// owner died. `FUTEX_WAIT` only reads the word: it works on a `PROT_READ` mapping (the kernel
/// falls back to a read-only page lookup for waits; the service API's tests check it).
///
/// # Safety
/// `word` must be 4-byte aligned and point into memory that stays mapped for the whole call.
pub(crate) unsafe fn futex_wait_raw(
    word: *const u32,
    expected: u32,
    deadline: Option<Deadline>,
) -> Result<FutexWait, Errno> {
    let ts = deadline.map(|d| d.timespec());
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: the caller guarantees `word` is aligned and mapped for the call; the kernel
    // only reads it, with fault handling. `ts_ptr` is null or points at `ts`, which outlives
    // the call. FUTEX_WAIT_BITSET takes an absolute timeout on CLOCK_MONOTONIC (the bitset
    // form is used for exactly that; MATCH_ANY makes it an ordinary wait).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word,
            FUTEX_WAIT_BITSET,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            FUTEX_BITSET_MATCH_ANY,
        )
    };
    if rc == 0 {
        return Ok(FutexWait::Woken);
    }
    match Errno::last() {
        Errno::EAGAIN => Ok(FutexWait::Changed),
        Errno::ETIMEDOUT => Ok(FutexWait::TimedOut),
        Errno::EINTR => Ok(FutexWait::Woken),
        errno => Err(errno),
    }
}

/// Wake at most `count` threads sleeping on the word at `word`; returns how many woke.
///
/// # Safety
/// `word` must be 4-byte aligned and point into memory that stays mapped for the call.
pub(crate) unsafe fn futex_wake_raw(word: *const u32, count: i32) -> Result<usize, Errno> {
    // SAFETY: the caller guarantees `word` is aligned and mapped; FUTEX_WAKE does not access
    // the word's contents, it only looks up the page to find the sleepers' key. Shared, so it
    // reaches sleepers of other processes (a read-only mapping of theirs included).
    let rc = unsafe { libc::syscall(libc::SYS_futex, word, FUTEX_WAKE, count) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc as usize)
    }
}

/// [`futex_wait_raw`] on a word this process may reference as an atomic.
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    deadline: Option<Deadline>,
) -> Result<FutexWait, Errno> {
    // SAFETY: a reference is aligned and valid for as long as it is borrowed, which covers
    // the call.
    unsafe { futex_wait_raw(word.as_ptr(), expected, deadline) }
}

/// [`futex_wake_raw`] on a word this process may reference as an atomic.
pub(crate) fn futex_wake(word: &AtomicU32, count: i32) -> Result<usize, Errno> {
    // SAFETY: as in `futex_wait`.
    unsafe { futex_wake_raw(word.as_ptr(), count) }
}

/// The kernel's `struct robust_list_head` (`linux/futex.h`).
#[repr(C)]
struct RobustListHead {
    /// `list.next`: the first entry; the head's own address when the list is empty.
    list_next: *mut libc::c_void,
    /// Added to an entry's address to find its futex word.
    futex_offset: libc::c_long,
    /// An entry in the middle of being taken or released.
    list_op_pending: *mut libc::c_void,
}

/// The calling thread's kernel robust list, replaced by ccmgr's own for as long as this value
/// lives: an empty list whose `list_op_pending` names one futex word. Dropping it gives the
/// thread back the list the C library registered (glibc's, which all pthread robust mutexes
/// of the thread use).
///
/// When the thread dies (alone, with its process, or by an `execve`) the kernel walks this
/// list and handles the pending word as the robust-futex protocol says:
/// - if the word's owner tid is this thread, it sets `FUTEX_OWNER_DIED` (keeping
///   `FUTEX_WAITERS`) and, when `FUTEX_WAITERS` was set, wakes one thread sleeping on it;
/// - if the word has no owner (tid 0), it wakes one sleeper, so that a wake-up this thread
///   received but could not pass on is not lost (Linux >= 5.5, "futex: Prevent robust futex
///   exit race").
///
/// The kernel never follows a pointer read from the word's memory: the list is empty and the
/// pending "entry" is only an address (the futex offset is 0). So the word may lie in memory
/// other users can write, or in a read-only mapping (the kernel then only reads it: it writes
/// only a word whose owner is the dying thread).
///
/// While it lives, pthread robust mutexes locked *by this thread* are not robust (glibc keeps
/// enqueuing them on its own list, which the kernel no longer watches). The threads that use
/// it lock none.
pub(crate) struct ThreadRobustList {
    /// Freed only once the kernel no longer refers to it (see Drop).
    head: std::mem::ManuallyDrop<Box<RobustListHead>>,
    saved_head: *mut libc::c_void,
    saved_len: usize,
    /// Robust lists are per thread: it must be dropped by the thread that installed it.
    _thread_bound: PhantomData<*const ()>,
}

impl ThreadRobustList {
    /// Install the list for the calling thread, with `word` pending.
    ///
    /// # Safety
    /// `word` must be 4-byte aligned and stay mapped for as long as the returned value lives
    /// (the kernel reads it, and may write it, when the thread dies). The value must be
    /// dropped on the thread that made it (it is `!Send`), and before that thread ends if the
    /// memory it names is to be unmapped.
    pub(crate) unsafe fn install(word: *const u32) -> Result<ThreadRobustList, Errno> {
        let mut saved_head: *mut libc::c_void = ptr::null_mut();
        let mut saved_len: libc::size_t = 0;
        // SAFETY: get_robust_list(0, ...) reads the calling thread's registration into the two
        // out-parameters, which are valid for writes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0 as libc::c_long,
                &mut saved_head as *mut *mut libc::c_void,
                &mut saved_len as *mut libc::size_t,
            )
        };
        if rc != 0 {
            return Err(Errno::last());
        }
        let mut head = Box::new(RobustListHead {
            list_next: ptr::null_mut(),
            futex_offset: 0,
            list_op_pending: word.cast_mut().cast(),
        });
        // An empty list points at its own head (`list` is the head's first field).
        head.list_next = (&raw mut *head).cast();
        // SAFETY: the head lives in a heap allocation owned by the returned value, which
        // restores the previous registration before freeing it (Drop) — or, if the thread
        // dies first, stays allocated while the kernel reads it at the thread's exit (the
        // memory of a dying process is still mapped then). The length is the kernel's
        // struct size, as the call requires.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_set_robust_list,
                &raw const *head,
                std::mem::size_of::<RobustListHead>(),
            )
        };
        if rc != 0 {
            return Err(Errno::last());
        }
        Ok(ThreadRobustList {
            head: std::mem::ManuallyDrop::new(head),
            saved_head,
            saved_len,
            _thread_bound: PhantomData,
        })
    }
}

impl Drop for ThreadRobustList {
    fn drop(&mut self) {
        // SAFETY: gives the calling thread (the installer: the value is !Send) back the head it
        // had, which the C library keeps valid for the thread's life.
        let rc =
            unsafe { libc::syscall(libc::SYS_set_robust_list, self.saved_head, self.saved_len) };
        if rc != 0 {
            // The kernel still refers to our head: leave it allocated.
            tracing::error!(errno = %Errno::last(), "restoring the thread's robust list failed");
            return;
        }
        // SAFETY: the kernel no longer refers to the head (the call above replaced it), and
        // nothing else points into it; it is dropped exactly once, here.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.head) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_duration_carries_nanoseconds() {
        assert_eq!(
            add_duration(10, 0, Duration::from_millis(1500)),
            (11, 500_000_000)
        );
        assert_eq!(
            add_duration(10, 999_999_999, Duration::from_nanos(1)),
            (11, 0)
        );
        assert_eq!(
            add_duration(10, 600_000_000, Duration::from_millis(400)),
            (11, 0)
        );
        assert_eq!(
            add_duration(10, 600_000_000, Duration::from_millis(399)),
            (10, 999_000_000)
        );
        assert_eq!(
            add_duration(10, 999_999_999, Duration::new(5, 999_999_999)),
            (16, 999_999_998)
        );
        assert_eq!(add_duration(7, 123, Duration::ZERO), (7, 123));
    }

    #[test]
    fn add_duration_normalises_the_clock_reading() {
        assert_eq!(
            add_duration(1, 2_500_000_000, Duration::ZERO),
            (3, 500_000_000)
        );
        assert_eq!(add_duration(1, -1, Duration::ZERO), (0, 999_999_999));
    }

    #[test]
    fn add_duration_saturates() {
        assert_eq!(add_duration(5, 0, Duration::MAX), (i64::MAX, 999_999_999));
        assert_eq!(
            add_duration(i64::MAX, 999_999_999, Duration::from_nanos(1)),
            (i64::MAX, 999_999_999)
        );
        assert_eq!(
            add_duration(0, 0, Duration::from_secs(u64::MAX)),
            (i64::MAX, 999_999_999)
        );
    }

    proptest::proptest! {
        #[test]
        fn add_duration_stays_normalised(
            sec in 0i64..(1 << 40),
            nsec in 0i64..NANOS_PER_SEC,
            d_sec in 0u64..(1 << 40),
            d_nsec in 0u32..1_000_000_000,
        ) {
            let (s, n) = add_duration(sec, nsec, Duration::new(d_sec, d_nsec));
            proptest::prop_assert!((0..NANOS_PER_SEC).contains(&n));
            let total = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            proptest::prop_assert_eq!(
                total(s, n),
                total(sec, nsec) + i128::from(d_sec) * 1_000_000_000 + i128::from(d_nsec)
            );
        }
    }

    #[test]
    fn deadlines_order_with_time() {
        let soon = Deadline::after(Duration::ZERO);
        let later = Deadline::after(Duration::from_secs(3600));
        assert!(soon < later);
        assert!(soon.has_passed());
        assert!(!later.has_passed());
        let a = monotonic_ms();
        assert!(monotonic_ms() >= a);
    }
}

//! The raw memory of a segment: creating the file unnamed, mapping it
//! `MAP_SHARED`, publishing it under its name, and the only typed casts from
//! mapped bytes to Rust references. The `Shared` marker trait says which types
//! such a cast may produce.
//!
//! One mapping type, [`Mapping`], for every segment, parameterised by its protection
//! ([`ReadWrite`] or [`ReadOnly`]): the main segment and the coordinator's control segment
//! are read-write, a service's view of the control segment is read-only. The operations both
//! allow (bounds-checked relaxed loads, futex waits and wakes, robust-list registration) are
//! written once; those that hand out references, and so may write, exist only on
//! `Mapping<ReadWrite>`, so a read-only mapping cannot be written through by construction.
//!
//! Creation uses `O_TMPFILE` in the instance's `run_dir`: the file has no name while its
//! creator initialises it, so no one can open a half-built segment, and a
//! creator killed mid-way leaves nothing behind. `linkat` then gives it its
//! name atomically and exclusively (`EEXIST` if the name is taken). On a file system without
//! `O_TMPFILE` the file is built under a temporary name only its owner can open, then linked
//! (as exclusively) and the temporary name removed ([`create_unnamed`]).
//!
//! Limits: a process with the owner's uid can still write any bytes into the
//! segment, or truncate it (a later access beyond the new end raises SIGBUS).
//! Such a process can also ptrace ours, so this is no weaker than the uid
//! boundary; everything read from the segment is still validated as data.

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags};

use super::robust::{
    Deadline, FutexWait, MutexError, RobustMutex, SharedMutex, ThreadRobustList, futex_wait_raw,
    futex_wake_raw,
};

/// Types that may be viewed in place in the mapped segment.
///
/// # Safety
/// An implementing type must (1) be a valid value for every bit pattern, since
/// any process of the owner's uid can write any bytes into the segment; (2) be
/// sound to reference while other processes write to the same bytes, which
/// means every byte is behind an atomic or an `UnsafeCell` only ever passed to
/// C functions made for concurrent use; (3) have no drop glue and no pointers.
pub(crate) unsafe trait Shared {}

// SAFETY: atomics of plain integers accept every bit pattern, are made for
// concurrent access, and hold no pointers.
unsafe impl Shared for AtomicU8 {}
// SAFETY: as for AtomicU8.
unsafe impl Shared for AtomicU32 {}
// SAFETY: as for AtomicU8.
unsafe impl Shared for AtomicI32 {}
// SAFETY: as for AtomicU8.
unsafe impl Shared for AtomicU64 {}
// SAFETY: an UnsafeCell of pthread_mutex_t, a C union of integers, so every bit
// pattern is a value; Rust never reads it, it only passes its address to the
// pthread functions, which are made for concurrent use across processes.
unsafe impl Shared for RobustMutex {}
// SAFETY: an array of Shared elements is Shared element by element.
unsafe impl<T: Shared, const N: usize> Shared for [T; N] {}

/// Declare a `#[repr(C)]` struct of the segment layout and implement
/// [`Shared`] for it, checking at compile time that every field is `Shared`.
macro_rules! shared_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field : $ty ),*
        }
        // SAFETY: the struct is repr(C) and every field's type implements
        // `Shared` (the function below does not compile otherwise), so every bit
        // pattern is a value of each field, each tolerates concurrent writes, and
        // none has drop glue or pointers. Padding bytes are never read as values.
        unsafe impl $crate::shm::mapping::Shared for $name {}
        const _: () = {
            fn assert_shared<T: $crate::shm::mapping::Shared>() {}
            #[allow(dead_code)]
            fn every_field_is_shared() {
                $( assert_shared::<$ty>(); )*
            }
        };
    };
}
pub(crate) use shared_struct;

/// How a [`Mapping`] is protected: a marker type, so that which operations a mapping allows
/// is decided at compile time. Sealed: [`ReadWrite`] and [`ReadOnly`] are the only two.
pub(crate) trait Protection: sealed::Sealed + Send + Sync + 'static {
    /// The `mmap` protection.
    const PROT: ProtFlags;
    /// How the mapping is named in a log line.
    const NAME: &'static str;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ReadWrite {}
    impl Sealed for super::ReadOnly {}
}

/// `PROT_READ | PROT_WRITE`, from a descriptor opened `O_RDWR`: the main segment, and the
/// coordinator's mapping of the service API's control segment. Robust futexes in shared memory
/// need it, and only such a mapping hands out references ([`Mapping::get`],
/// [`Mapping::slice`], [`Mapping::mutex`]).
pub(crate) enum ReadWrite {}

/// `PROT_READ` only, from a descriptor opened `O_RDONLY`: how services map the control
/// segment, which they may read but not write.
///
/// No reference into such a mapping is ever handed out, so nothing can try to store through
/// one: the only accesses are atomic loads with `Ordering::Relaxed` of at most 8 bytes, which
/// Rust documents as sound on read-only memory (std::sync::atomic, "Atomic accesses to
/// read-only memory": larger loads, or stronger orderings, may be compiled to
/// read-modify-write instructions that fault), and futex waits and wakes, which the kernel
/// performs without writing. A reader that needs acquire ordering follows its relaxed load
/// with `fence(Ordering::Acquire)`.
pub(crate) enum ReadOnly {}

impl Protection for ReadWrite {
    const PROT: ProtFlags = ProtFlags::PROT_READ.union(ProtFlags::PROT_WRITE);
    const NAME: &'static str = "read-write";
}

impl Protection for ReadOnly {
    const PROT: ProtFlags = ProtFlags::PROT_READ;
    const NAME: &'static str = "read-only";
}

/// A `MAP_SHARED` mapping of a whole file, read-write or read-only by its type parameter.
///
/// Operations every mapping has: relaxed atomic loads of words (`load_u8`, `load_u32`,
/// `load_u64`), futex waits and wakes, and registering a word as the thread's pending
/// robust-futex entry. Operations only a [`ReadWrite`] mapping has: references to `Shared`
/// values in place (`get`, `slice`) and handles on robust mutexes (`mutex`), which write.
pub(crate) struct Mapping<P: Protection> {
    base: NonNull<u8>,
    len: usize,
    /// Keeps the descriptor (and so the file) as long as the mapping.
    file: File,
    _protection: PhantomData<P>,
}

// SAFETY: the mapping is shared memory, reached only through `Shared` views, which are all
// Sync (read-write), or through atomic loads and syscalls (both protections); the File is
// Send + Sync. Nothing ties it to one thread.
unsafe impl<P: Protection> Send for Mapping<P> {}
// SAFETY: as above.
unsafe impl<P: Protection> Sync for Mapping<P> {}

impl<P: Protection> Mapping<P> {
    /// Map `len` bytes of `fd` shared, with `P`'s protection; the descriptor must be open for
    /// it (`O_RDWR` for [`ReadWrite`]). The caller has checked the file's size; `len` must
    /// not be zero.
    pub(crate) fn map(fd: OwnedFd, len: usize) -> io::Result<Mapping<P>> {
        let Some(nonzero) = NonZeroUsize::new(len) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        };
        // SAFETY: a fresh mapping at an address of the kernel's choosing cannot overlap any
        // Rust object. MAP_SHARED with PROT_READ|PROT_WRITE (on a descriptor opened O_RDWR,
        // or mmap fails) is what robust futexes in shared memory require; PROT_READ alone
        // hands out no reference (see `ReadOnly`).
        let base =
            unsafe { nix::sys::mman::mmap(None, nonzero, P::PROT, MapFlags::MAP_SHARED, &fd, 0) }
                .map_err(io::Error::from)?;
        Ok(Mapping {
            base: base.cast::<u8>(),
            len,
            file: File::from(fd),
            _protection: PhantomData,
        })
    }

    /// Drops this process's page table entries for the whole mapping (`MADV_DONTNEED`). The
    /// mapping is `MAP_SHARED` on a file, so nothing is lost: the bytes stay in the file (and
    /// the page cache, or tmpfs), and the next access maps the page again. For a process that
    /// read the whole segment once and will now wait a long time without reading it (the
    /// standby): its resident set then no longer grows with the segment.
    pub(crate) fn release_resident(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping. MADV_DONTNEED on a MAP_SHARED file
        // mapping only unmaps the pages from this process; their contents are the file's and
        // read back unchanged, so every reference into the mapping stays valid.
        unsafe {
            nix::sys::mman::madvise(
                self.base.cast(),
                self.len,
                nix::sys::mman::MmapAdvise::MADV_DONTNEED,
            )
        }
        .map_err(io::Error::from)
    }

    /// The open file behind the mapping.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The file descriptor behind the mapping.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Where `count` values of `T` would start at `offset`, if they lie wholly inside the
    /// mapping and are aligned. The only place that turns an offset into an address.
    fn address<T>(&self, offset: usize, count: usize) -> Option<NonNull<T>> {
        let bytes = std::mem::size_of::<T>().checked_mul(count)?;
        let end = offset.checked_add(bytes)?;
        if end > self.len {
            return None;
        }
        let addr = (self.base.as_ptr() as usize).checked_add(offset)?;
        if addr % std::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: `offset + bytes <= len`, so the result stays inside the mapping (or one
        // past its end when count is 0), which is a single allocation.
        let ptr = unsafe { self.base.as_ptr().add(offset) };
        NonNull::new(ptr.cast::<T>())
    }

    /// The `u8` at `offset` (a relaxed atomic load), if inside the mapping.
    pub(crate) fn load_u8(&self, offset: usize) -> Option<u8> {
        let ptr = self.address::<AtomicU8>(offset, 1)?;
        // SAFETY: in bounds and aligned (checked), mapped while `self` is borrowed; any byte
        // is a valid AtomicU8; a relaxed load of one byte is sound on read-only memory (see
        // `ReadOnly`) and tolerates concurrent writes through other mappings.
        Some(unsafe { ptr.as_ref() }.load(Ordering::Relaxed))
    }

    /// The `u32` at `offset` (a relaxed atomic load), if inside the mapping and aligned.
    pub(crate) fn load_u32(&self, offset: usize) -> Option<u32> {
        let ptr = self.address::<AtomicU32>(offset, 1)?;
        // SAFETY: as in `load_u8`, for 4 bytes.
        Some(unsafe { ptr.as_ref() }.load(Ordering::Relaxed))
    }

    /// The `u64` at `offset` (a relaxed atomic load), if inside the mapping and aligned.
    pub(crate) fn load_u64(&self, offset: usize) -> Option<u64> {
        let ptr = self.address::<AtomicU64>(offset, 1)?;
        // SAFETY: as in `load_u8`, for 8 bytes (within the 8-byte limit of 64-bit targets;
        // ccmgr builds only for 64-bit Linux with glibc, see robust.rs).
        Some(unsafe { ptr.as_ref() }.load(Ordering::Relaxed))
    }

    /// Sleep while the word at `offset` holds `expected` (see [`futex_wait_raw`]). `None` if
    /// the offset is outside the mapping or misaligned.
    pub(crate) fn futex_wait(
        &self,
        offset: usize,
        expected: u32,
        deadline: Option<Deadline>,
    ) -> Option<Result<FutexWait, nix::errno::Errno>> {
        let ptr = self.address::<u32>(offset, 1)?;
        // SAFETY: aligned and inside the mapping, which `self` keeps mapped for the call; the
        // kernel only reads the word.
        Some(unsafe { futex_wait_raw(ptr.as_ptr(), expected, deadline) })
    }

    /// Wake at most `count` sleepers of the word at `offset` (see [`futex_wake_raw`]).
    pub(crate) fn futex_wake(
        &self,
        offset: usize,
        count: i32,
    ) -> Option<Result<usize, nix::errno::Errno>> {
        let ptr = self.address::<u32>(offset, 1)?;
        // SAFETY: as in `futex_wait`.
        Some(unsafe { futex_wake_raw(ptr.as_ptr(), count) })
    }

    /// Make the word at `offset` the calling thread's pending robust-futex entry for as long
    /// as the returned value lives (see [`ThreadRobustList`]): if the thread dies meanwhile,
    /// the kernel handles that word as a robust futex the thread held (the coordinator's
    /// holder of the daemon component word), or, when the word has no owner, passes a wake-up
    /// on it to another sleeper (a service waiting on a read-only mapping).
    pub(crate) fn robust_pending(
        self: &Arc<Self>,
        offset: usize,
    ) -> Option<Result<RobustPending, nix::errno::Errno>> {
        let ptr = self.address::<u32>(offset, 1)?;
        // SAFETY: aligned and inside the mapping; the returned value owns an Arc of the
        // mapping, so the word stays mapped as long as the registration lives, and it is
        // !Send (ThreadRobustList is), so it is dropped on the installing thread.
        Some(
            unsafe { ThreadRobustList::install(ptr.as_ptr()) }.map(|list| RobustPending {
                _list: list,
                _mapping: Arc::clone(self) as Arc<dyn Send + Sync>,
            }),
        )
    }
}

impl Mapping<ReadWrite> {
    /// A view of the `T` at `offset`, if it lies inside the mapping, aligned.
    pub(crate) fn get<T: Shared>(&self, offset: usize) -> Option<&T> {
        let ptr = self.address::<T>(offset, 1)?;
        // SAFETY: in bounds and aligned (checked); any bytes are a valid T and concurrent
        // writes by other processes are sound (T: Shared); the memory is writable (ReadWrite),
        // so whatever T's methods store through the reference cannot fault; the reference
        // borrows `self`, which keeps the memory mapped.
        Some(unsafe { ptr.as_ref() })
    }

    /// A view of `count` consecutive `T`s at `offset`, if inside and aligned.
    pub(crate) fn slice<T: Shared>(&self, offset: usize, count: usize) -> Option<&[T]> {
        let ptr = self.address::<T>(offset, count)?;
        // SAFETY: as in `get`, for `count` elements; `address` bounded the whole run by the
        // mapping's length, and `size_of::<T>() * count` did not overflow.
        Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), count) })
    }

    /// An owning handle on the robust mutex at `offset`.
    pub(crate) fn mutex(self: &Arc<Self>, offset: usize) -> Option<SharedMutex> {
        let ptr = self.address::<RobustMutex>(offset, 1)?;
        Some(SharedMutex::new(Arc::clone(self), ptr))
    }
}

impl<P: Protection> Drop for Mapping<P> {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping made in `map`, unmapped only here. Views
        // borrow the Mapping, and handles, guards and robust-list registrations own an Arc of
        // it, so none outlives this drop; a lock held "until exit" leaks its Arc and so never
        // reaches here.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) } {
            tracing::error!(error = %e, protection = P::NAME, "munmap of a ccmgr segment failed");
        }
    }
}

/// A word of a mapping registered as the calling thread's pending robust-futex entry; the
/// thread's own robust list comes back when it is dropped. Keeps the mapping alive.
pub(crate) struct RobustPending {
    // Field order matters: the registration goes before the mapping it names.
    _list: ThreadRobustList,
    _mapping: Arc<dyn Send + Sync>,
}

/// The file mode and group of a new segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    /// `Some(gid)`: mode 0640 and that group (its members read, only the owner writes);
    /// `None`: mode 0600.
    pub(crate) group: Option<u32>,
}

/// Which step of creating a segment failed.
#[derive(Debug)]
pub(crate) enum CreateStep {
    Open,
    Chown,
    Chmod,
    Resize,
    Map,
}

/// The temporary name of a file being built where the file system has no `O_TMPFILE`: removed
/// when dropped (the file is published under its real name with `link` first, or abandoned).
pub(crate) struct TempName(PathBuf);

impl Drop for TempName {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The prefix of the temporary names of files being built as `path` (see [`TempName`]); what
/// a creator killed mid-way left is removed with the instance's files
/// ([`remove_temp_leftovers`]).
fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.tmp.")
}

/// Create the file that will become `path`, with no name if the file system allows it
/// (`O_TMPFILE`), so that no one can open it half built and a creator killed mid-way leaves
/// nothing; else (`EOPNOTSUPP`, `EISDIR`: no `O_TMPFILE` there) under an exclusive temporary
/// name in the same directory, which only its owner can open (mode 0600 until the caller sets
/// the final one) and which goes when the [`TempName`] is dropped.
pub(crate) fn create_unnamed(path: &Path) -> io::Result<(File, Option<TempName>)> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(file) => Ok((file, None)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            create_under_temp_name(path).map(|(file, temp)| (file, Some(temp)))
        }
        Err(e) => Err(e),
    }
}

/// The fallback of [`create_unnamed`]: the file under an exclusive temporary name beside
/// `path`, mode 0600 until the caller sets the final one.
fn create_under_temp_name(path: &Path) -> io::Result<(File, TempName)> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let temp = dir.join(format!("{}{}", temp_prefix(path), std::process::id()));
    // A name of this process's pid is a leftover of a dead process that had the same pid.
    let _ = std::fs::remove_file(&temp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)?;
    Ok((file, TempName(temp)))
}

/// Give a file made by [`create_unnamed`] its name `path`, exclusively: `AlreadyExists` if
/// `path` exists. Until then nobody else can open it, so it is complete when it appears.
pub(crate) fn publish_unnamed(
    fd: BorrowedFd<'_>,
    temp: Option<TempName>,
    path: &Path,
) -> io::Result<()> {
    match temp {
        None => link_exclusive(fd, path),
        Some(temp) => std::fs::hard_link(&temp.0, path),
    }
}

/// Remove the temporary names (see [`create_unnamed`]) that creators of `path` killed mid-way
/// left in its directory.
pub(crate) fn remove_temp_leftovers(path: &Path) {
    let (Some(dir), prefix) = (path.parent(), temp_prefix(path)) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A segment being built: mapped, but with no name yet, so no other process
/// can reach it.
pub(crate) struct Unpublished {
    map: Arc<Mapping<ReadWrite>>,
    temp: Option<TempName>,
    sync_initialised: bool,
}

impl Unpublished {
    /// Create the file that will become `path` (see [`create_unnamed`]), of `len` bytes
    /// (zero-filled), with the requested access, and map it.
    pub(crate) fn create(
        path: &Path,
        len: usize,
        access: Access,
    ) -> Result<Unpublished, (CreateStep, io::Error)> {
        let mode = if access.group.is_some() { 0o640 } else { 0o600 };
        Self::create_with_mode(path, len, mode, access.group)
    }

    /// As [`create`](Self::create), with an explicit permission `mode` (the service API's
    /// control segment is 0644: every user may read it, only its owner write it).
    pub(crate) fn create_with_mode(
        path: &Path,
        len: usize,
        mode: u32,
        group: Option<u32>,
    ) -> Result<Unpublished, (CreateStep, io::Error)> {
        let (file, temp) = create_unnamed(path).map_err(|e| (CreateStep::Open, e))?;
        if let Some(gid) = group {
            nix::unistd::fchown(&file, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(|e| (CreateStep::Chown, io::Error::from(e)))?;
        }
        // Set the mode exactly, whatever the umask took away (and after chown,
        // which may clear set-id bits).
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| (CreateStep::Chmod, e))?;
        file.set_len(len as u64)
            .map_err(|e| (CreateStep::Resize, e))?;
        let map = Mapping::map(OwnedFd::from(file), len).map_err(|e| (CreateStep::Map, e))?;
        Ok(Unpublished {
            map: Arc::new(map),
            temp,
            sync_initialised: false,
        })
    }

    /// The mapping, to write the non-synchronising fields through views.
    pub(crate) fn mapping(&self) -> &Arc<Mapping<ReadWrite>> {
        &self.map
    }

    /// Initialise the robust mutexes at the given offsets, once.
    /// Panics if an offset is out of bounds or misaligned (a layout bug).
    pub(crate) fn init_sync(&mut self, mutexes: &[usize]) -> Result<(), InitError> {
        assert!(
            !self.sync_initialised,
            "synchronisation objects initialised twice"
        );
        assert_eq!(
            Arc::strong_count(&self.map),
            1,
            "no handle may exist before the synchronisation objects are initialised"
        );
        self.sync_initialised = true;
        for &offset in mutexes {
            let m = self
                .map
                .get::<RobustMutex>(offset)
                .expect("mutex offset inside the new mapping");
            // SAFETY: the file has no name and its descriptor is private to this
            // process, and no handle of the mapping exists (strong count 1), so
            // no thread or process can be using this mutex; each is initialised
            // exactly once (the flag above).
            unsafe { m.init() }.map_err(InitError::Mutex)?;
        }
        Ok(())
    }

    /// Give the file its name `path`, exclusively (see [`publish_unnamed`]): fails with
    /// `AlreadyExists` if `path` exists.
    pub(crate) fn publish(self, path: &Path) -> io::Result<Arc<Mapping<ReadWrite>>> {
        assert!(
            self.sync_initialised,
            "publishing a segment whose mutexes were never initialised"
        );
        publish_unnamed(self.map.fd(), self.temp, path)?;
        Ok(self.map)
    }
}

/// A synchronisation object that could not be initialised.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    #[error("initialising a robust mutex: {0}")]
    Mutex(MutexError),
}

/// Gives the unnamed file `fd` (made with `O_TMPFILE`) its name, exclusively: `AlreadyExists`
/// if `path` exists. Until then nobody can open it, so it is complete when it appears.
pub(crate) fn link_exclusive(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let fd_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        fd_path.as_str(),
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the file system has no `O_TMPFILE`: the file is built under a temporary name,
    /// published exclusively, and the temporary name goes; a leftover is removed with the
    /// instance's files.
    #[test]
    fn the_temporary_name_fallback_publishes_exclusively_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.seg");
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let (file, temp) = create_under_temp_name(&path).unwrap();
        assert_eq!(names(), [format!(".x.seg.tmp.{}", std::process::id())]);
        file.set_len(8).unwrap();
        publish_unnamed(file.as_fd(), Some(temp), &path).unwrap();
        assert_eq!(names(), ["x.seg"]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8);

        // The name is taken: AlreadyExists, and the temporary name still goes.
        let (file, temp) = create_under_temp_name(&path).unwrap();
        let e = publish_unnamed(file.as_fd(), Some(temp), &path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(names(), ["x.seg"]);

        // A creator killed mid-way leaves its temporary name: removed with the files.
        let (_file, temp) = create_under_temp_name(&path).unwrap();
        std::mem::forget(temp);
        std::fs::write(dir.path().join("other.tmp.1"), "").unwrap();
        assert_eq!(names().len(), 3);
        remove_temp_leftovers(&path);
        assert_eq!(names(), ["other.tmp.1", "x.seg"]);
    }
}

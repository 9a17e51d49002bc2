//! The raw memory of a segment: creating the file unnamed, mapping it
//! `MAP_SHARED`, publishing it under its name, and the only typed casts from
//! mapped bytes to Rust references. The `Shared` marker trait says which types
//! such a cast may produce.
//!
//! Creation uses `O_TMPFILE` in `/dev/shm`: the file has no name while its
//! creator initialises it, so no one can open a half-built segment, and a
//! creator killed mid-way leaves nothing behind. `linkat` then gives it its
//! name atomically and exclusively (`EEXIST` if the name is taken).
//!
//! Limits: a process with the owner's uid can still write any bytes into the
//! segment, or truncate it (a later access beyond the new end raises SIGBUS).
//! Such a process can also ptrace ours, so this is no weaker than the uid
//! boundary; everything read from the segment is still validated as data.

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64};

use nix::sys::mman::{MapFlags, ProtFlags};

use super::robust::{
    Channel, ChannelCell, MutexError, RobustMutex, Semaphore, SemaphoreError, SharedMutex,
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
// SAFETY: as for RobustMutex, with sem_t and the sem_* functions.
unsafe impl Shared for Semaphore {}
// SAFETY: repr(C) of a Semaphore and an AtomicU64, both Shared.
unsafe impl Shared for ChannelCell {}
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

/// A `MAP_SHARED` read-write mapping of a whole segment file.
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    file: File,
}

// SAFETY: the mapping is shared memory reachable only through `Shared` views,
// which are all Sync; the File is Send + Sync. Nothing ties it to one thread.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` read-write and shared. The caller has checked the
    /// file's size; `len` must not be zero.
    pub(crate) fn map(fd: OwnedFd, len: usize) -> io::Result<Mapping> {
        let Some(nonzero) = NonZeroUsize::new(len) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        };
        // SAFETY: a fresh mapping at an address of the kernel's choosing cannot
        // overlap any Rust object. MAP_SHARED on a file opened O_RDWR with
        // PROT_READ|PROT_WRITE is what robust futexes in shared memory require.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                nonzero,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Mapping {
            base: base.cast::<u8>(),
            len,
            file: File::from(fd),
        })
    }

    /// The open file behind the mapping.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The file descriptor behind the mapping.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Where `count` values of `T` would start at `offset`, if they lie wholly
    /// inside the mapping and are aligned.
    fn checked<T: Shared>(&self, offset: usize, count: usize) -> Option<NonNull<T>> {
        let bytes = std::mem::size_of::<T>().checked_mul(count)?;
        let end = offset.checked_add(bytes)?;
        if end > self.len {
            return None;
        }
        let addr = (self.base.as_ptr() as usize).checked_add(offset)?;
        if addr % std::mem::align_of::<T>() != 0 {
            return None;
        }
        // SAFETY: `offset + bytes <= len`, so the result stays inside the mapping
        // (or one past its end when count is 0), which is a single allocation.
        let ptr = unsafe { self.base.as_ptr().add(offset) };
        NonNull::new(ptr.cast::<T>())
    }

    /// A view of the `T` at `offset`, if it lies inside the mapping, aligned.
    pub(crate) fn get<T: Shared>(&self, offset: usize) -> Option<&T> {
        let ptr = self.checked::<T>(offset, 1)?;
        // SAFETY: in bounds and aligned (checked); any bytes are a valid T and
        // concurrent writes by other processes are sound (T: Shared); the
        // reference borrows `self`, which keeps the memory mapped.
        Some(unsafe { ptr.as_ref() })
    }

    /// A view of `count` consecutive `T`s at `offset`, if inside and aligned.
    pub(crate) fn slice<T: Shared>(&self, offset: usize, count: usize) -> Option<&[T]> {
        let ptr = self.checked::<T>(offset, count)?;
        // SAFETY: as in `get`, for `count` elements; `checked` bounded the whole
        // run by the mapping's length, and `size_of::<T>() * count` did not
        // overflow.
        Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), count) })
    }

    /// An owning handle on the robust mutex at `offset`.
    pub(crate) fn mutex(self: &Arc<Self>, offset: usize) -> Option<SharedMutex> {
        let ptr = self.checked::<RobustMutex>(offset, 1)?;
        Some(SharedMutex::new(Arc::clone(self), ptr))
    }

    /// An owning handle on the channel at `offset`.
    pub(crate) fn channel(self: &Arc<Self>, offset: usize) -> Option<Channel> {
        let ptr = self.checked::<ChannelCell>(offset, 1)?;
        Some(Channel::new(Arc::clone(self), ptr))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping made in `map`, unmapped only
        // here. Views borrow the Mapping and handles and guards own an Arc of
        // it, so none outlives this drop; a lock held "until exit" leaks its Arc
        // and so never reaches here.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) } {
            tracing::error!(error = %e, "munmap of a ccmgr segment failed");
        }
    }
}

/// The file mode and group of a new segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    /// `Some(gid)`: mode 0660 and that group; `None`: mode 0600.
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

/// A segment being built: mapped, but with no name yet, so no other process
/// can reach it.
pub(crate) struct Unpublished {
    map: Arc<Mapping>,
    sync_initialised: bool,
}

impl Unpublished {
    /// Create an unnamed file of `len` bytes (zero-filled) in `dir` with the
    /// requested access, and map it.
    pub(crate) fn create(
        dir: &Path,
        len: usize,
        access: Access,
    ) -> Result<Unpublished, (CreateStep, io::Error)> {
        let mode = if access.group.is_some() { 0o660 } else { 0o600 };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(mode)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
            .map_err(|e| (CreateStep::Open, e))?;
        if let Some(gid) = access.group {
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
            sync_initialised: false,
        })
    }

    /// The mapping, to write the non-synchronising fields through views.
    pub(crate) fn mapping(&self) -> &Arc<Mapping> {
        &self.map
    }

    /// Initialise the robust mutexes and channels at the given offsets, once.
    /// Panics if an offset is out of bounds or misaligned (a layout bug).
    pub(crate) fn init_sync(
        &mut self,
        mutexes: &[usize],
        channels: &[usize],
    ) -> Result<(), InitError> {
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
        for &offset in channels {
            let c = self
                .map
                .get::<ChannelCell>(offset)
                .expect("channel offset inside the new mapping");
            // SAFETY: as for the mutexes.
            unsafe { c.init() }.map_err(InitError::Semaphore)?;
        }
        Ok(())
    }

    /// Give the file its name with `linkat`, exclusively: fails with
    /// `AlreadyExists` if `path` exists.
    pub(crate) fn publish(self, path: &Path) -> io::Result<Arc<Mapping>> {
        assert!(
            self.sync_initialised,
            "publishing a segment whose mutexes were never initialised"
        );
        let fd_path = format!("/proc/self/fd/{}", self.map.fd().as_raw_fd());
        nix::unistd::linkat(
            nix::fcntl::AT_FDCWD,
            fd_path.as_str(),
            nix::fcntl::AT_FDCWD,
            path,
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )
        .map_err(io::Error::from)?;
        Ok(self.map)
    }
}

/// A synchronisation object that could not be initialised.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InitError {
    #[error("initialising a robust mutex: {0}")]
    Mutex(MutexError),
    #[error("initialising a semaphore: {0}")]
    Semaphore(SemaphoreError),
}

//! The API file (`<run_dir>/<instance>.api`, mode 0666): its creation, the services' records
//! ([`ApiState`], [`ApiRecord`]) read and written with `pread`/`pwrite`, and the
//! open-file-description byte-range locks that are the services' component locks
//! ([`ApiFile`]). Apart from the control segment because it is the only file services write,
//! so nothing here is trusted or mapped.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

use super::verify::{check_file, open_existing};
use super::{API_LAYOUT_VERSION, ApiError, api_path, io_error};
use crate::shm::mapping::{TempName, create_unnamed};

/// The first eight bytes of an API file.
pub const API_MAGIC: u64 = u64::from_le_bytes(*b"ccmgrAPI");
/// Bytes of the API file's header; record `i` starts at `API_HEADER_LEN + i * API_RECORD_LEN`.
pub const API_HEADER_LEN: u64 = 64;
/// Bytes of one service's record in the API file.
pub const API_RECORD_LEN: u64 = 64;

pub(super) fn api_file_len(services: usize) -> u64 {
    API_HEADER_LEN + services as u64 * API_RECORD_LEN
}

/// Create the API file of `services` services that will become `path`, unnamed (see
/// [`create_unnamed`]), mode 0666.
pub(super) fn create_api_file(
    path: &Path,
    services: usize,
) -> Result<(File, Option<TempName>), ApiError> {
    let (file, temp) =
        create_unnamed(path).map_err(io_error("creating (unnamed, in its directory)", path))?;
    // Exactly 0666, whatever the umask took away: services of any uid lock in it.
    file.set_permissions(std::fs::Permissions::from_mode(0o666))
        .map_err(io_error("setting the mode of", path))?;
    let len = api_file_len(services);
    file.set_len(len).map_err(io_error("sizing", path))?;
    let mut header = [0u8; API_HEADER_LEN as usize];
    header[0..8].copy_from_slice(&API_MAGIC.to_le_bytes());
    header[8..12].copy_from_slice(&API_LAYOUT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(services as u32).to_le_bytes());
    header[16..20].copy_from_slice(&(API_RECORD_LEN as u32).to_le_bytes());
    header[24..32].copy_from_slice(&len.to_le_bytes());
    file.write_all_at(&header, 0)
        .map_err(io_error("writing", path))?;
    Ok((file, temp))
}

/// A service's state as it wrote it in the API file (untrusted: for logs and display).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiState {
    /// Never registered (or the record was cleared).
    Absent,
    /// Registered (`alive`), initialising.
    Alive,
    /// Said `ready`.
    Ready,
    /// Running its shutdown callback.
    ShuttingDown,
    /// Its shutdown callback returned.
    Done,
    /// A value this build does not know.
    Unknown(u32),
}

impl ApiState {
    fn code(self) -> u32 {
        match self {
            ApiState::Absent => 0,
            ApiState::Alive => 1,
            ApiState::Ready => 2,
            ApiState::ShuttingDown => 3,
            ApiState::Done => 4,
            ApiState::Unknown(v) => v,
        }
    }

    fn from_code(v: u32) -> ApiState {
        match v {
            0 => ApiState::Absent,
            1 => ApiState::Alive,
            2 => ApiState::Ready,
            3 => ApiState::ShuttingDown,
            4 => ApiState::Done,
            v => ApiState::Unknown(v),
        }
    }
}

impl fmt::Display for ApiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiState::Absent => f.write_str("absent"),
            ApiState::Alive => f.write_str("alive"),
            ApiState::Ready => f.write_str("ready"),
            ApiState::ShuttingDown => f.write_str("shutting down"),
            ApiState::Done => f.write_str("done"),
            ApiState::Unknown(v) => write!(f, "unknown ({v})"),
        }
    }
}

/// One record of the API file, as read (untrusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiRecord {
    /// The state the service wrote.
    pub state: ApiState,
    /// The pid it wrote (a claim, not a credential).
    pub pid: u32,
    /// The shutdown epoch its `Done`/`ShuttingDown` refers to.
    pub epoch: u32,
    /// When it wrote the record, monotonic milliseconds.
    pub updated_ms: u64,
}

fn record_offset(i: usize) -> u64 {
    API_HEADER_LEN + i as u64 * API_RECORD_LEN
}

/// Where the component locks start: the byte at `lock_base + p` is the component lock of the
/// service at position `p` of the shutdown sequence. Beyond the records (and possibly beyond
/// the end of a truncated file: byte-range locks need no content).
pub(super) fn lock_base(services: usize) -> u64 {
    record_offset(services)
}

pub(super) fn read_record(file: &File, i: usize) -> io::Result<ApiRecord> {
    let mut buf = [0u8; 24];
    // A short read (a truncated file) reads as zeros: the bytes are untrusted anyway.
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], record_offset(i) + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    let u32_at = |k: usize| u32::from_le_bytes(buf[k..k + 4].try_into().expect("4 bytes"));
    Ok(ApiRecord {
        state: ApiState::from_code(u32_at(0)),
        pid: u32_at(4),
        epoch: u32_at(8),
        updated_ms: u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes")),
    })
}

fn flock(kind: libc::c_int, offset: u64, len: u64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset as libc::off_t,
        l_len: len as libc::off_t,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// Set an OFD lock of `kind` on the byte at `offset`, blocking while a conflicting lock is
/// held (signals do not end the wait).
fn ofd_lock_wait(file: &File, kind: libc::c_int, offset: u64) -> Result<(), Errno> {
    let fl = flock(kind, offset, 1);
    loop {
        match fcntl(file, FcntlArg::F_OFD_SETLKW(&fl)) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The position of a component lock (a write lock, held by another open file description)
/// among `positions`, if any: one `F_OFD_GETLK` asking whether a read lock on the whole range
/// would conflict. Read locks (other services waiting) do not count.
pub(super) fn first_write_lock(
    file: &File,
    base: u64,
    positions: std::ops::Range<usize>,
) -> Result<Option<usize>, Errno> {
    if positions.is_empty() {
        return Ok(None);
    }
    let mut fl = flock(
        libc::F_RDLCK,
        base + positions.start as u64,
        positions.len() as u64,
    );
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    // The conflicting lock may start before the range (a hostile process may lock anything):
    // report the first position of ours it covers.
    let start = (fl.l_start as u64).max(base + positions.start as u64);
    Ok(Some((start - base) as usize))
}

/// The API file, opened read-write by a service: the component locks and its state words.
/// Component locks are named by *shutdown position* (see [`lock_base`]); records by index.
pub(crate) struct ApiFile {
    file: File,
    path: PathBuf,
    lock_base: u64,
}

impl ApiFile {
    /// Open the API file of `instance` in `run_dir` (already found trusted, by
    /// [`ControlView::open`](super::ControlView::open)), which `owner` must own, for an
    /// instance of `services` services (a count from the control segment). Its contents are
    /// not checked: nothing in them is trusted or needed.
    pub(crate) fn open(
        run_dir: &Path,
        instance: &str,
        owner: u32,
        services: usize,
    ) -> Result<ApiFile, ApiError> {
        let path = api_path(run_dir, instance)?;
        let file = open_existing(instance, &path, true, "opening")?;
        check_file(instance, &path, &file, owner, false)?;
        Ok(ApiFile {
            file,
            path,
            lock_base: lock_base(services),
        })
    }

    fn sys(&self, op: &'static str) -> impl FnOnce(Errno) -> ApiError + '_ {
        move |errno| ApiError::Sys {
            op,
            path: self.path.clone(),
            errno,
        }
    }

    /// Take the component lock of the service at shutdown position `position`, blocking while
    /// another process holds it. Held by this open file description: until
    /// [`unlock_component`](Self::unlock_component) or until the process's last descriptor of
    /// it closes (its death).
    pub(crate) fn lock_component(&self, position: usize) -> Result<(), ApiError> {
        ofd_lock_wait(&self.file, libc::F_WRLCK, self.lock_base + position as u64)
            .map_err(self.sys("F_OFD_SETLKW (component lock)"))
    }

    /// Release the lock (component or waiting) this description holds at `position`.
    pub(crate) fn unlock_component(&self, position: usize) -> Result<(), ApiError> {
        ofd_lock_wait(&self.file, libc::F_UNLCK, self.lock_base + position as u64)
            .map_err(self.sys("F_OFD_SETLKW (unlock)"))
    }

    /// Block until no process holds the component lock at `position`: its service released it
    /// (its shutdown is done) or died. Returns at once for a service not registered with the
    /// API.
    pub(crate) fn wait_released(&self, position: usize) -> Result<(), ApiError> {
        ofd_lock_wait(&self.file, libc::F_RDLCK, self.lock_base + position as u64)
            .map_err(self.sys("F_OFD_SETLKW (waiting for a component)"))?;
        self.unlock_component(position)
    }

    /// A position among `positions` whose component lock is held, if any (one system call).
    pub(crate) fn held_among(
        &self,
        positions: std::ops::Range<usize>,
    ) -> Result<Option<usize>, ApiError> {
        first_write_lock(&self.file, self.lock_base, positions).map_err(self.sys("F_OFD_GETLK"))
    }

    /// Write service `i`'s state words (for the services' own bookkeeping and display).
    pub(crate) fn write_state(
        &self,
        i: usize,
        state: ApiState,
        epoch: u32,
    ) -> Result<(), ApiError> {
        let mut buf = [0u8; 24];
        buf[0..4].copy_from_slice(&state.code().to_le_bytes());
        buf[4..8].copy_from_slice(&std::process::id().to_le_bytes());
        buf[8..12].copy_from_slice(&epoch.to_le_bytes());
        buf[16..24].copy_from_slice(&crate::shm::robust::monotonic_ms().to_le_bytes());
        self.file
            .write_all_at(&buf, record_offset(i))
            .map_err(io_error("writing", &self.path))
    }
}

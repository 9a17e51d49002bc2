//! Service output: drained from its pipe into `<log_dir>/<id>.log`, rotated by size.
//!
//! This module owns the output pipe a service writes to ([`make_output_pipe`]), the log file
//! its bytes end up in ([`LogSink`]), the rotation of that file, and reading the last lines
//! back for error reports ([`tail`]).
//!
//! The coordinator must never block on a service's output (STYLE.md, item 13), and a service
//! must never block for long on its own stdout. So the coordinator keeps the read end
//! non-blocking in its event loop and calls [`LogSink::drain`] whenever it is readable; each
//! call does a bounded amount of work ([`DRAIN_BUDGET`]) so one noisy service cannot starve the
//! others, and says when more may be waiting. Writes go to a regular file, which does not
//! block in the sense that matters here (no other process can stall it).
//!
//! Rotation: when `<id>.log` would grow past `max_bytes`, it becomes `<id>.log.1`, the
//! previous `.1` becomes `.2`, and so on up to `.keep`; the oldest is dropped. Disk use per
//! service is therefore at most `(keep + 1) * max_bytes`. A file is cut at the last line end
//! that fits, so that lines stay whole across files unless one line alone is longer than the
//! room left.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::unistd::{pipe2, read};

/// The default size at which a log file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;
/// The default number of rotated files kept (`<id>.log.1` to `<id>.log.3`).
pub const DEFAULT_KEEP: u32 = 3;
/// The most one [`LogSink::drain`] call reads before it returns with `more` set.
pub const DRAIN_BUDGET: usize = 1 << 20;
/// One read's worth: the default pipe capacity, so one read usually empties the pipe.
const CHUNK: usize = 64 << 10;
/// How far back from the end [`tail`] reads in each file.
const TAIL_WINDOW: u64 = 256 << 10;

/// Why output could not be moved from a service's pipe to its log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create an output pipe: {}", .0.desc())]
    Pipe(Errno),
    #[error("cannot open the log file {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the service's output pipe: {}", .0.desc())]
    Read(Errno),
    /// The bytes were read from the pipe (so the service is not blocked) but could not be
    /// stored. The next drain tries the file again.
    #[error("cannot write the log file {} ({dropped} bytes of output lost): {source}", .path.display())]
    Write {
        path: PathBuf,
        dropped: u64,
        #[source]
        source: io::Error,
    },
}

/// What one [`LogSink::drain`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Bytes read from the pipe (and written to the log).
    pub bytes: usize,
    /// The write end is closed everywhere: the service and all it started have exited or
    /// closed their output. The caller can drop the read end.
    pub eof: bool,
    /// The budget ran out before the pipe was empty: drain again after serving the others.
    /// (A level-triggered poll reports the fd readable again anyway.)
    pub more: bool,
}

/// Creates the pipe a service writes its stdout and stderr to. Returns `(read, write)`:
/// the read end is non-blocking, for the coordinator's event loop and [`LogSink::drain`];
/// both ends are close-on-exec, so no other child inherits them (a stray copy of the write
/// end would keep the pipe from ever reaching end-of-file). Give the write end to
/// [`crate::spawn::SpawnRequest::output`], then drop it in the coordinator once spawned.
pub fn make_output_pipe() -> Result<(OwnedFd, OwnedFd), LogError> {
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).map_err(LogError::Pipe)?;
    let flags = fcntl(&read_end, FcntlArg::F_GETFL).map_err(LogError::Pipe)?;
    fcntl(
        &read_end,
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(LogError::Pipe)?;
    Ok((read_end, write_end))
}

/// `<dir>/<id>.log`: the file a service's output currently goes to.
pub fn log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}

/// `<dir>/<id>.log.<n>`: the n-th most recent rotated file (1 is the newest).
pub fn rotated_path(dir: &Path, id: &str, n: u32) -> PathBuf {
    rotated(&log_path(dir, id), n)
}

/// `<path>.<n>`: the n-th most recent rotated file of the log at `path` (1 is the newest).
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Shifts `<path>.1` .. `<path>.<keep-1>` up by one (dropping `<path>.<keep>`) and moves
/// `path` to `<path>.1`: one rotation, for the services' logs and ccmgr's own alike.
pub(crate) fn shift_rotations(path: &Path, keep: u32) -> io::Result<()> {
    for n in (1..keep).rev() {
        rename_if_present(&rotated(path, n), &rotated(path, n + 1))?;
    }
    rename_if_present(path, &rotated(path, 1))
}

/// The log of one service.
#[derive(Debug)]
pub struct LogSink {
    file: LogFile,
}

thread_local! {
    /// The read buffer every sink of a thread drains through: a keeper drains one pipe at a
    /// time, so one buffer serves a thousand services (a buffer per sink cost 64 KiB each).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHUNK]);
}

/// The size-bounded file and its rotation, apart from the read buffer so both can be borrowed.
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    /// `None` after a failed rotation or open; the next append tries again.
    file: Option<File>,
    size: u64,
}

impl LogSink {
    /// Opens (creating if needed, appending if present) `<dir>/<id>.log`. The directory must
    /// exist. `max_bytes` (at least 1) is the rotation size, `keep` the number of rotated files
    /// kept (0: the file is truncated instead of rotated). The file is created mode 0640: logs
    /// can hold what a service should not show everyone.
    pub fn open(dir: &Path, id: &str, max_bytes: u64, keep: u32) -> Result<LogSink, LogError> {
        let path = log_path(dir, id);
        let file = open_append(&path).map_err(|source| LogError::Open {
            path: path.clone(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| LogError::Open {
                path: path.clone(),
                source,
            })?
            .len();
        Ok(LogSink {
            file: LogFile {
                path,
                max_bytes: max_bytes.max(1),
                keep,
                file: Some(file),
                size,
            },
        })
    }

    /// The file output currently goes to.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Reads what `fd` (a non-blocking pipe read end, see [`make_output_pipe`]) has, up to
    /// [`DRAIN_BUDGET`] bytes, and appends it to the log, rotating as needed. Never waits for
    /// data: returns when the pipe is empty, at end-of-file, or when the budget is spent.
    ///
    /// If the log cannot be written (disk full, say), the pipe is still drained, so the service
    /// does not block on its output, and the error says how many bytes were lost.
    pub fn drain(&mut self, fd: BorrowedFd<'_>) -> Result<DrainOutcome, LogError> {
        self.drain_with_budget(fd, DRAIN_BUDGET)
    }

    fn drain_with_budget(
        &mut self,
        fd: BorrowedFd<'_>,
        budget: usize,
    ) -> Result<DrainOutcome, LogError> {
        let mut outcome = DrainOutcome {
            bytes: 0,
            eof: false,
            more: false,
        };
        let mut failed: Option<io::Error> = None;
        let mut dropped = 0u64;
        loop {
            let left = budget - outcome.bytes;
            if left == 0 {
                outcome.more = true;
                break;
            }
            let want = left.min(CHUNK);
            let file = &mut self.file;
            let result = SCRATCH.with_borrow_mut(|buf| {
                let n = read(fd, &mut buf[..want])?;
                if n > 0 && failed.is_none() {
                    if let Err(e) = file.append(&buf[..n]) {
                        failed = Some(e);
                        dropped += n as u64;
                    }
                } else if n > 0 {
                    dropped += n as u64;
                }
                Ok(n)
            });
            match result {
                Ok(0) => {
                    outcome.eof = true;
                    break;
                }
                Ok(n) => outcome.bytes += n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(LogError::Read(errno)),
            }
        }
        match failed {
            Some(source) => Err(LogError::Write {
                path: self.file.path.clone(),
                dropped,
                source,
            }),
            None => Ok(outcome),
        }
    }
}

impl LogFile {
    /// Appends `data`, rotating whenever the current file is full, so that no file exceeds
    /// `max_bytes`.
    fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.size >= self.max_bytes || self.file.is_none() {
                self.rotate_or_reopen()?;
            }
            let room = usize::try_from(self.max_bytes - self.size).unwrap_or(usize::MAX);
            let take = if data.len() <= room {
                data.len()
            } else {
                // End this file at the last line end that fits; a line longer than the room
                // left has to be cut.
                data[..room]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(room, |i| i + 1)
            };
            let file = self.file.as_mut().expect("opened above");
            file.write_all(&data[..take])?;
            self.size += take as u64;
            data = &data[take..];
            if !data.is_empty() {
                // What is left did not fit: the next round starts a new file.
                self.size = self.size.max(self.max_bytes);
            }
        }
        Ok(())
    }

    /// Starts a new current file: shifts `.1`..`.keep-1` up by one (dropping `.keep`), moves
    /// the current file to `.1`, and opens a fresh one. Also the retry after a failed open.
    fn rotate_or_reopen(&mut self) -> io::Result<()> {
        if self.file.is_some() || self.size >= self.max_bytes {
            self.file = None;
            if self.keep == 0 {
                // Nothing to keep: start the file over.
                // Not followed nor blocking, as in `open_append`: truncating through a link
                // planted in `log_dir` would empty the file it names.
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .mode(0o640)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&self.path)
                    .map_err(|e| refused_link(&self.path, e))?;
                refuse_unless_regular(&self.path, file)?.set_len(0)?;
            } else {
                shift_rotations(&self.path, self.keep)?;
            }
            // Rotated: if the open below fails, the retry must only open, not rotate again.
            self.size = 0;
        }
        let file = open_append(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }
}

/// Opens (creating, mode 0640) the log file at `path` for appending. The keeper runs as root
/// and `log_dir` may be writable by a service's user (a careless but common setup: the service
/// "owns its logs"), so whatever that user planted at the name is refused, never followed: a
/// symbolic link (`O_NOFOLLOW`: it would have root append to, say, `/etc/shadow`), and a FIFO
/// or device (`O_NONBLOCK` so the open cannot hang the keeper, then anything but a regular
/// file is an error naming the path).
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused_link(path, e))?;
    let file = refuse_unless_regular(path, file)?;
    // A second name for the file: a hard link planted at the log's name to a file elsewhere
    // (`/etc/shadow`, where `fs.protected_hardlinks` is off). A log ccmgr made has one name.
    if file.metadata()?.nlink() > 1 {
        return Err(io::Error::other(format!(
            "{} has other names (hard links); refusing to write a log into a file that may be another one",
            path.display()
        )));
    }
    Ok(file)
}

/// `ELOOP` from `O_NOFOLLOW` means a symbolic link is at `path`, `ENXIO` from a non-blocking
/// open for writing a FIFO (with no reader) or a device: say so.
fn refused_link(path: &Path, e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::other(format!(
            "{} is a symbolic link; a log file is never followed through one",
            path.display()
        )),
        Some(libc::ENXIO) => io::Error::other(format!(
            "{} is not a regular file; refusing it as a log",
            path.display()
        )),
        _ => e,
    }
}

/// The opened log file, if it is a regular file; else an error naming `path`.
fn refuse_unless_regular(path: &Path, file: File) -> io::Result<File> {
    if file.metadata()?.file_type().is_file() {
        Ok(file)
    } else {
        Err(io::Error::other(format!(
            "{} is not a regular file; refusing it as a log",
            path.display()
        )))
    }
}

/// Opens the log file at `path` for reading, as `start`'s failure report, `status SERVICE`
/// and `logs` do, with the same refusals as [`open_append`]: whoever may write `log_dir` must
/// not make root's reader print a file through a link (`web.log -> /etc/shadow`), nor hang it
/// forever on a FIFO (an open for reading blocks until a writer comes).
pub(crate) fn open_read(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| refused_link(path, e))?;
    refuse_unless_regular(path, file)
}

/// The whole log file at `path`, opened as [`open_read`] does.
pub(crate) fn read_whole(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open_read(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The last `lines` lines of a service's log, oldest first: from `<id>.log` and, when that
/// holds fewer, from `<id>.log.1` before it. For error reports ("the last lines of its log");
/// a missing or unreadable file counts as empty. Invalid UTF-8 is replaced, not refused.
pub fn tail(dir: &Path, id: &str, lines: usize) -> Vec<String> {
    if lines == 0 {
        return Vec::new();
    }
    let mut found = last_lines(&log_path(dir, id), lines);
    if found.len() < lines {
        let mut earlier = last_lines(&rotated_path(dir, id, 1), lines - found.len());
        earlier.append(&mut found);
        found = earlier;
    }
    found
}

/// The last `n` lines of `path`, reading at most [`TAIL_WINDOW`] bytes from its end.
fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(mut file) = open_read(path) else {
        return Vec::new();
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return Vec::new();
    };
    let start = len.saturating_sub(TAIL_WINDOW);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let mut text: &[u8] = &bytes;
    if start > 0 {
        // The window began mid-line: that partial line is not one of the last lines we show.
        match text.iter().position(|&b| b == b'\n') {
            Some(i) => text = &text[i + 1..],
            None => return vec![String::from_utf8_lossy(text).into_owned()],
        }
    }
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    if text.is_empty() {
        return Vec::new();
    }
    let all: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    all[all.len().saturating_sub(n)..]
        .iter()
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn write_all(fd: &OwnedFd, mut data: &[u8]) {
        while !data.is_empty() {
            let n = nix::unistd::write(fd, data).unwrap();
            data = &data[n..];
        }
    }

    fn files(dir: &Path) -> Vec<(String, u64)> {
        let mut list: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        list.sort();
        list
    }

    #[test]
    fn rotation_keeps_lines_whole_and_files_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = LogSink::open(dir.path(), "svc", 20, 2).unwrap();
        let (r, w) = make_output_pipe().unwrap();
        // Three 9-byte lines: two fit in a 20-byte file, the third starts the next.
        write_all(&w, b"aaaaaaaa\nbbbbbbbb\ncccccccc\n");
        let out = sink.drain(r.as_fd()).unwrap();
        assert_eq!(
            out,
            DrainOutcome {
                bytes: 27,
                eof: false,
                more: false
            }
        );
        assert_eq!(
            fs::read_to_string(rotated_path(dir.path(), "svc", 1)).unwrap(),
            "aaaaaaaa\nbbbbbbbb\n"
        );
        assert_eq!(fs::read_to_string(sink.path()).unwrap(), "cccccccc\n");
        // A 30-byte line has to be cut; older files shift up and `.3` never appears.
        write_all(&w, &[b'x'; 30]);
        write_all(&w, b"\nend\n");
        drop(w);
        let out = sink.drain(r.as_fd()).unwrap();
        assert!(out.eof);
        assert_eq!(out.bytes, 35);
        let listing = files(dir.path());
        assert!(listing.iter().all(|(_, len)| *len <= 20), "{listing:?}");
        let names: Vec<_> = listing.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["svc.log", "svc.log.1", "svc.log.2"]);
        assert_eq!(
            fs::read_to_string(rotated_path(dir.path(), "svc", 2)).unwrap(),
            format!("cccccccc\n{}", "x".repeat(11))
        );
        assert_eq!(
            fs::read_to_string(rotated_path(dir.path(), "svc", 1)).unwrap(),
            format!("{}\n", "x".repeat(19))
        );
        assert_eq!(fs::read_to_string(sink.path()).unwrap(), "end\n");
    }

    #[test]
    fn keep_zero_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = LogSink::open(dir.path(), "svc", 10, 0).unwrap();
        let (r, w) = make_output_pipe().unwrap();
        write_all(&w, b"1234\n5678\nabcd\n");
        sink.drain(r.as_fd()).unwrap();
        assert_eq!(files(dir.path()), [("svc.log".to_string(), 5)]);
        assert_eq!(fs::read_to_string(sink.path()).unwrap(), "abcd\n");
    }

    #[test]
    fn reopening_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = make_output_pipe().unwrap();
        write_all(&w, b"one\n");
        LogSink::open(dir.path(), "svc", 100, 1)
            .unwrap()
            .drain(r.as_fd())
            .unwrap();
        write_all(&w, b"two\n");
        LogSink::open(dir.path(), "svc", 100, 1)
            .unwrap()
            .drain(r.as_fd())
            .unwrap();
        assert_eq!(tail(dir.path(), "svc", 10), ["one", "two"]);
    }

    #[test]
    fn drain_stops_at_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = LogSink::open(dir.path(), "svc", 10 << 20, 1).unwrap();
        let (r, w) = make_output_pipe().unwrap();
        // 60 KiB fit in a default pipe; a 32 KiB budget takes them in two calls.
        write_all(&w, &vec![b'y'; 60 << 10]);
        let first = sink.drain_with_budget(r.as_fd(), 32 << 10).unwrap();
        assert_eq!(
            first,
            DrainOutcome {
                bytes: 32 << 10,
                eof: false,
                more: true
            }
        );
        let second = sink.drain_with_budget(r.as_fd(), 32 << 10).unwrap();
        assert_eq!(
            second,
            DrainOutcome {
                bytes: 28 << 10,
                eof: false,
                more: false
            }
        );
    }

    #[test]
    fn tail_reads_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(rotated_path(dir.path(), "svc", 1), "1\n2\n3\n4\n").unwrap();
        fs::write(log_path(dir.path(), "svc"), "5\n6").unwrap();
        assert_eq!(tail(dir.path(), "svc", 3), ["4", "5", "6"]);
        assert_eq!(tail(dir.path(), "svc", 1), ["6"]);
        assert_eq!(tail(dir.path(), "svc", 100).len(), 6);
        assert!(tail(dir.path(), "none", 5).is_empty());
        assert!(tail(dir.path(), "svc", 0).is_empty());
    }

    #[test]
    fn tail_of_a_large_file_reads_only_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for i in 0..100_000 {
            text.push_str(&format!("line {i}\n"));
        }
        fs::write(log_path(dir.path(), "svc"), &text).unwrap();
        assert_eq!(tail(dir.path(), "svc", 2), ["line 99998", "line 99999"]);
    }
}

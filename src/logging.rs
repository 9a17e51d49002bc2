//! Where the coordinator's and the keeper's own log lines go: one line per event, appended to
//! `log_dir/ccmgr-<instance>.log` ([`SharedLog`]), and to stderr too in the foreground.
//!
//! Writes are appends of whole lines to a regular file (and a terminal in the foreground):
//! they do not wait on any reader, so logging cannot stall the event loops. `RUST_LOG`
//! filters ([`level_filter`]; default `info`): a level (`debug`), a level per module path
//! prefix (`ccmgr::engine=trace`), or both, comma-separated (`info,ccmgr::coordinator=debug`).
//! That is `tracing-subscriber`'s `Targets`: no regular expressions nor span-field filters,
//! whose matcher added about 0.5 MB of code mapped into every ccmgr process.
//!
//! The file is size-capped and rotated like the services' logs ([`crate::logsink`]): once it
//! reaches [`crate::keeper::LOG_MAX_BYTES`] it becomes `.log.1`, `.1` becomes `.2`, and so on
//! up to [`crate::keeper::LOG_KEEP`]; the oldest is dropped. So nothing, not even a local user
//! making the coordinator warn as fast as it can, fills the disk through ccmgr.
//!
//! Several processes (keeper, coordinator, standby) append to the same file, so rotation must
//! be safe between them. Every writer opens the file `O_APPEND`, so lines from different
//! processes never overwrite each other. Before each line, a writer looks at the size of the
//! file it holds (`fstat`): a file at or over the cap is either the current one, full, or one
//! another writer already rotated away (a file is rotated only once it is full). Either way
//! the writer takes an exclusive `flock` on `<log>.lock` in the same directory, and then, by
//! path: if the current file is still the full one, it rotates (renames only); then it opens
//! whatever the path names now. One rotation per fill, whoever comes first; the others just
//! reopen. A file can exceed the cap by the lines written between a writer's `fstat` and
//! another's rotation: a few lines, not a flood. Every [`REOPEN_CHECK_EVERY`] lines a writer
//! also compares its file with the path's, so that a log removed or moved by an operator is
//! recreated.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Lines between checks that the path still names the file a writer holds.
pub const REOPEN_CHECK_EVERY: u32 = 256;

/// A size-capped, rotated log file that several processes append to (see the module
/// documentation for how they agree on rotation). A write is one line; errors are returned
/// and the next write tries again.
#[derive(Debug)]
pub struct SharedLog {
    path: PathBuf,
    lock_path: PathBuf,
    max_bytes: u64,
    keep: u32,
    /// `None` until opened, or after a failed open.
    file: Option<File>,
    writes_since_check: u32,
}

impl SharedLog {
    /// A log at `path` rotated at `max_bytes` (at least 1), keeping `keep` old files (at
    /// least 1). Opens (creating, mode 0640) the file now, so that a bad path shows at once.
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<SharedLog> {
        let mut lock_name = path.as_os_str().to_owned();
        lock_name.push(".lock");
        let mut log = SharedLog {
            path: path.to_path_buf(),
            lock_path: PathBuf::from(lock_name),
            max_bytes: max_bytes.max(1),
            keep: keep.max(1),
            file: None,
            writes_since_check: 0,
        };
        log.file = Some(crate::logsink::open_append(path)?);
        Ok(log)
    }

    /// `<path>.<n>`: the n-th most recent rotated file.
    pub fn rotated_path(&self, n: u32) -> PathBuf {
        crate::logsink::rotated(&self.path, n)
    }

    /// The file to append the next line to: the one held, unless it is full (then rotate or
    /// follow a rotation) or, at a periodic check, no longer the one the path names.
    fn current(&mut self) -> io::Result<&mut File> {
        let held = match &self.file {
            Some(file) => Some(file.metadata()?),
            None => None,
        };
        self.writes_since_check += 1;
        let periodic = self.writes_since_check >= REOPEN_CHECK_EVERY;
        let full = held.as_ref().is_some_and(|m| m.len() >= self.max_bytes);
        let moved = periodic
            && held.as_ref().is_some_and(|held| {
                std::fs::metadata(&self.path).map_or(true, |now| {
                    (now.dev(), now.ino()) != (held.dev(), held.ino())
                })
            });
        if periodic {
            self.writes_since_check = 0;
        }
        if held.is_none() || full || moved {
            self.file = None;
            self.rotate_if_full_and_reopen()?;
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Under the lock: rotates if the file the path names is full, then opens the path.
    fn rotate_if_full_and_reopen(&mut self) -> io::Result<()> {
        let lock_file = crate::logsink::open_append(&self.lock_path)?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
        let full = std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.max_bytes);
        if full {
            crate::logsink::shift_rotations(&self.path, self.keep)?;
        }
        self.file = Some(crate::logsink::open_append(&self.path)?);
        Ok(())
    }
}

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.current()?.write(buf);
        if result.is_err() {
            // Open again next time: the file may have gone.
            self.file = None;
        }
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs the process's log subscriber and enters a span naming `role` ("coordinator",
/// "keeper"), so every line says which process wrote it. Keep the returned guard for the
/// life of the process.
#[must_use = "the role span lasts as long as the guard"]
pub fn init(file: Option<&Path>, stderr: bool, role: &'static str) -> tracing::span::EnteredSpan {
    let filter = level_filter(std::env::var("RUST_LOG").ok().as_deref());
    let opened = file.and_then(|path| {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        SharedLog::open(path, crate::keeper::LOG_MAX_BYTES, crate::keeper::LOG_KEEP).ok()
    });
    let builder = tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .with_thread_ids(false);
    let _ = match (opened, stderr) {
        (Some(f), true) => builder
            .with_writer(Mutex::new(f).and(std::io::stderr))
            .finish()
            .with(filter)
            .try_init(),
        (Some(f), false) => builder
            .with_writer(Mutex::new(f))
            .finish()
            .with(filter)
            .try_init(),
        (None, _) => builder
            .with_writer(std::io::stderr)
            .finish()
            .with(filter)
            .try_init(),
    };
    role_span(role)
}

/// The filter `RUST_LOG` asks for (see the module documentation for its forms): `info` when
/// it is unset, empty, or not understood.
pub fn level_filter(rust_log: Option<&str>) -> Targets {
    let info = || Targets::new().with_default(tracing::Level::INFO);
    match rust_log.map(str::trim) {
        None | Some("") => info(),
        Some(spec) => spec.parse().unwrap_or_else(|_| info()),
    }
}

/// Enters a span naming `role`, with no parent: every later line of this thread says that
/// role alone. A standby that took over calls it with "coordinator", as it now is one.
#[must_use = "the role span lasts as long as the guard"]
pub fn role_span(role: &'static str) -> tracing::span::EnteredSpan {
    tracing::info_span!(parent: None, "ccmgr", role, pid = std::process::id()).entered()
}

#[cfg(test)]
mod tests {
    use super::level_filter;
    use tracing::Level;

    #[test]
    fn rust_log_forms_filter_as_documented() {
        let unset = level_filter(None);
        assert!(unset.would_enable("ccmgr::engine", &Level::INFO));
        assert!(!unset.would_enable("ccmgr::engine", &Level::DEBUG));

        let debug = level_filter(Some("debug"));
        assert!(debug.would_enable("ccmgr::coordinator", &Level::DEBUG));
        assert!(!debug.would_enable("ccmgr::coordinator", &Level::TRACE));

        let ours = level_filter(Some("ccmgr=debug"));
        assert!(ours.would_enable("ccmgr::keeper", &Level::DEBUG));
        assert!(!ours.would_enable("toml", &Level::ERROR));

        let mixed = level_filter(Some("warn,ccmgr::engine=trace"));
        assert!(mixed.would_enable("ccmgr::engine", &Level::TRACE));
        assert!(mixed.would_enable("ccmgr::keeper", &Level::WARN));
        assert!(!mixed.would_enable("ccmgr::keeper", &Level::INFO));

        for not_understood in ["", "  ", "ccmgr=loud", "a=b=c"] {
            let fallback = level_filter(Some(not_understood));
            assert!(
                fallback.would_enable("ccmgr::engine", &Level::INFO),
                "{not_understood:?}"
            );
            assert!(
                !fallback.would_enable("ccmgr::engine", &Level::DEBUG),
                "{not_understood:?}"
            );
        }
    }
}

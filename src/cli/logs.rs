//! `ccmgr logs [SERVICE]... [-n N] [-f]`: what the services wrote, or ccmgr's own event log,
//! read back from `log_dir`.
//!
//! This module owns reading logs back for the operator: the last lines of a log and the files
//! rotated before it (as `tail -n`), and following it (`-f`) across rotations. Both writers
//! rotate the same way ([`crate::logsink`] for a service's `<id>.log`, [`crate::logging`] for
//! `ccmgr-<instance>.log`): by renames only, `<log>` becoming `<log>.1`, `.1` becoming `.2`, and
//! a new `<log>` created for what comes next. So a follower holds the file it reads open (a
//! rename does not disturb an open file) and, whenever it wakes, reads what its file gained,
//! then looks at what the path names now: the same file (grown, or truncated: then read again
//! from its start), or another one. Then its own file was rotated away: it reads it to its end
//! once more (a writer may have appended between the two looks), reads whole any file rotated
//! after it (a flood can rotate twice between two wakes), and opens the new one.
//!
//! It wakes on inotify events of `log_dir` (a write, a rename, a new file), never on a sleep;
//! the wait is bounded (1 s) only so that a change inotify cannot report (the directory itself
//! replaced) is still noticed.
//!
//! Services are those of the configuration in the files, plus any whose log is in `log_dir`
//! (a service removed since still has its log): another name is bad usage (exit 2), with a
//! did-you-mean. With several services, each line is prefixed with its service's name; the
//! logs carry no timestamps, so the last lines are shown service by service, and what follows
//! in the order it is read.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::{Cli, Exit};
use crate::config::{Config, did_you_mean, load_global_only};
use crate::logsink::{log_path, rotated};

/// The most rotated files looked at behind a log (each writer keeps 3).
const MAX_ROTATED: u32 = 16;
/// The longest wait for an inotify event before looking at every file anyway.
const WAKE_AT_LEAST_EVERY_MS: u16 = 1000;

/// What can go wrong while reading logs back.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch {} for new output: {source}", .dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// `ccmgr logs`.
pub fn logs(cli: &Cli, services: &[String], lines: usize, follow: bool) -> Exit {
    let options = cli.load_options();
    let global = match load_global_only(&options) {
        Ok(global) => global,
        Err(diags) => {
            for d in diags.iter() {
                eprintln!("error: {d}");
            }
            return Exit::BadConfig;
        }
    };
    let log_dir = global.log_dir.clone();
    let own_log = log_dir.join(format!("ccmgr-{}.log", global.instance));
    let mut sources: Vec<Followed> = Vec::new();
    if services.is_empty() {
        let mut own = Followed::new(own_log, None);
        own.json = cli.json.then_some(None);
        sources.push(own);
    } else {
        let known = known_services(&options, &log_dir, &own_log);
        let mut unknown = 0;
        for id in services {
            if known.contains(id) {
                continue;
            }
            unknown += 1;
            eprintln!("error: no service has the id `{id}`");
            if let Some(close) = did_you_mean(id, known.iter().map(String::as_str)) {
                eprintln!("  note: did you mean `{close}`?");
            }
        }
        if unknown > 0 {
            return Exit::BadConfig;
        }
        let mut seen = BTreeSet::new();
        let width = services.iter().map(String::len).max().unwrap_or(0);
        for id in services {
            if !seen.insert(id.as_str()) {
                continue;
            }
            let label = (services.len() > 1 && !cli.json).then(|| format!("{id:<width$} | "));
            let mut followed = Followed::new(log_path(&log_dir, id), label);
            followed.json = cli.json.then(|| Some(id.clone()));
            sources.push(followed);
        }
    }
    match show(&log_dir, &mut sources, lines, follow) {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            Exit::Failed
        }
    }
}

/// The ids `logs` accepts: the configured services (if the files load) and every `<id>.log`
/// in `log_dir` other than ccmgr's own.
fn known_services(
    options: &crate::config::LoadOptions,
    log_dir: &Path,
    own_log: &Path,
) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = Config::load(options)
        .map(|c| c.services.into_iter().map(|s| s.id).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir(log_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".log")
                && entry.path() != own_log
                && !id.is_empty()
            {
                known.insert(id.to_owned());
            }
        }
    }
    known
}

/// Prints the last `lines` lines of every source, then, following, what they gain.
fn show(
    log_dir: &Path,
    sources: &mut [Followed],
    lines: usize,
    follow: bool,
) -> Result<(), LogsError> {
    // Watch before the first read: whatever is written after it wakes the loop below.
    let inotify = if follow {
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(|source| {
                LogsError::Watch {
                    dir: log_dir.to_path_buf(),
                    source,
                }
            })?;
        let events = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        inotify
            .add_watch(log_dir, events)
            .map_err(|source| LogsError::Watch {
                dir: log_dir.to_path_buf(),
                source,
            })?;
        Some(inotify)
    } else {
        None
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    for source in sources.iter_mut() {
        source.tail(lines, follow, &mut out)?;
    }
    out.flush().map_err(LogsError::Output)?;
    let Some(inotify) = inotify else {
        return Ok(());
    };
    loop {
        for source in sources.iter_mut() {
            source.pump(&mut out)?;
        }
        out.flush().map_err(LogsError::Output)?;
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(WAKE_AT_LEAST_EVERY_MS)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                return Err(LogsError::Watch {
                    dir: log_dir.to_path_buf(),
                    source: e,
                });
            }
        }
        // What the events say is read again from the files themselves: only the wake counts.
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
        }
    }
}

/// The identity of a file, to tell the one held from the one a path names now.
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// One log read back: the file held open, how far it was read, and the start of a line whose
/// end has not been written yet.
struct Followed {
    path: PathBuf,
    /// `"web | "` with several services, else nothing.
    label: Option<String>,
    /// With `--json`: each line becomes `{"service": <this>, "line": "..."}` (`null` for
    /// ccmgr's own log).
    json: Option<Option<String>>,
    file: Option<File>,
    held: Option<(u64, u64)>,
    read: u64,
    partial: Vec<u8>,
}

impl Followed {
    fn new(path: PathBuf, label: Option<String>) -> Self {
        Followed {
            path,
            label,
            json: None,
            file: None,
            held: None,
            read: 0,
            partial: Vec::new(),
        }
    }

    fn read_error(&self, path: &Path, source: io::Error) -> LogsError {
        LogsError::Read {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Prints the last `lines` whole lines, from the current file and, as far back as needed,
    /// the rotated ones; holds the current file for following. A last line still being
    /// written is printed only when not following (following prints it once it is whole).
    fn tail(&mut self, lines: usize, follow: bool, out: &mut impl Write) -> Result<(), LogsError> {
        let mut current = Vec::new();
        match crate::logsink::open_read(&self.path) {
            Ok(mut file) => {
                let meta = file
                    .metadata()
                    .map_err(|e| self.read_error(&self.path, e))?;
                file.read_to_end(&mut current)
                    .map_err(|e| self.read_error(&self.path, e))?;
                self.held = Some(identity(&meta));
                self.read = current.len() as u64;
                self.file = Some(file);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !follow {
                    eprintln!("ccmgr: no log yet at {}", self.path.display());
                }
            }
            Err(e) => return Err(self.read_error(&self.path, e)),
        }
        // The unfinished last line stays out of the count.
        let cut = current
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let unfinished = current.split_off(cut);
        let mut chunks = vec![current];
        let mut have = count_lines(&chunks[0]);
        let mut n = 1;
        while have < lines && n <= MAX_ROTATED {
            let path = rotated(&self.path, n);
            match crate::logsink::read_whole(&path) {
                Ok(mut bytes) => {
                    if bytes.last().is_some_and(|&b| b != b'\n') {
                        bytes.push(b'\n'); // a line a writer cut at the cap
                    }
                    have += count_lines(&bytes);
                    chunks.push(bytes);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(self.read_error(&path, e)),
            }
            n += 1;
        }
        let all: Vec<&[u8]> = chunks
            .iter()
            .rev()
            .flat_map(|c| c.split_inclusive(|&b| b == b'\n'))
            .collect();
        for line in &all[all.len().saturating_sub(lines)..] {
            self.emit_line(line, out)?;
        }
        if follow {
            self.partial = unfinished;
        } else if !unfinished.is_empty() && lines > 0 {
            self.emit_line(&unfinished, out)?;
            if self.json.is_none() {
                out.write_all(b"\n").map_err(LogsError::Output)?;
            }
        }
        Ok(())
    }

    /// Prints what the log gained since the last look, following a rotation or truncation.
    fn pump(&mut self, out: &mut impl Write) -> Result<(), LogsError> {
        self.drain(out)?;
        let now = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            // Rotated away and not created again yet, or never created: the held file (if
            // any) was read to its end above.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.read_error(&self.path, e)),
        };
        if Some(identity(&now)) == self.held {
            if now.len() < self.read {
                // Truncated in place: what is there now is new.
                if let Some(file) = &mut self.file {
                    file.seek(SeekFrom::Start(0)).map_err(|e| LogsError::Read {
                        path: self.path.clone(),
                        source: e,
                    })?;
                }
                self.read = 0;
                self.partial.clear();
                self.drain(out)?;
            }
            return Ok(());
        }
        // A new file at the path: the held one was rotated. Read it to its end once more, then
        // whatever was rotated after it, oldest first, then the new one.
        self.drain(out)?;
        if let Some(held) = self.held {
            let behind = (1..=MAX_ROTATED).find(|&n| {
                std::fs::metadata(rotated(&self.path, n)).is_ok_and(|m| identity(&m) == held)
            });
            for n in (1..behind.unwrap_or(1)).rev() {
                let path = rotated(&self.path, n);
                match crate::logsink::read_whole(&path) {
                    Ok(bytes) => self.emit(&bytes, out)?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.read_error(&path, e)),
                }
            }
        }
        match crate::logsink::open_read(&self.path) {
            Ok(file) => {
                let meta = file
                    .metadata()
                    .map_err(|e| self.read_error(&self.path, e))?;
                self.held = Some(identity(&meta));
                self.file = Some(file);
                self.read = 0;
                self.drain(out)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.read_error(&self.path, e)),
        }
    }

    /// Reads the held file to its end and prints the whole lines it completes.
    fn drain(&mut self, out: &mut impl Write) -> Result<(), LogsError> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        let mut bytes = Vec::new();
        let n = file
            .read_to_end(&mut bytes)
            .map_err(|source| LogsError::Read {
                path: self.path.clone(),
                source,
            })?;
        self.read += n as u64;
        self.emit(&bytes, out)
    }

    /// Adds `bytes` to the unfinished line and prints every line they complete.
    fn emit(&mut self, bytes: &[u8], out: &mut impl Write) -> Result<(), LogsError> {
        self.partial.extend_from_slice(bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        for line in done.split_inclusive(|&b| b == b'\n') {
            self.emit_line(line, out)?;
        }
        Ok(())
    }

    /// One line as it was written (newline included), after the service's label if any; with
    /// `--json`, as one JSON object.
    fn emit_line(&self, line: &[u8], out: &mut impl Write) -> Result<(), LogsError> {
        if let Some(service) = &self.json {
            let text = String::from_utf8_lossy(line);
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let object = serde_json::json!({ "service": service, "line": text });
            return writeln!(out, "{object}").map_err(LogsError::Output);
        }
        if let Some(label) = &self.label {
            out.write_all(label.as_bytes()).map_err(LogsError::Output)?;
        }
        out.write_all(line).map_err(LogsError::Output)
    }
}

fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(path: &Path, text: &str) {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    /// One rotation as the writers do it: renames only.
    fn rotate(path: &Path) {
        crate::logsink::shift_rotations(path, 3).unwrap();
    }

    fn followed(path: &Path, lines: usize) -> (Followed, Vec<u8>) {
        let mut f = Followed::new(path.to_path_buf(), Some("svc | ".into()));
        let mut out = Vec::new();
        f.tail(lines, true, &mut out).unwrap();
        (f, out)
    }

    #[test]
    fn tail_reaches_into_rotated_files_and_keeps_an_unfinished_line_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        append(&path, "1\n2\n");
        rotate(&path);
        append(&path, "3\n4\nhalf");
        let (mut f, out) = followed(&path, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "svc | 2\nsvc | 3\nsvc | 4\n"
        );
        append(&path, " done\n");
        let mut out = Vec::new();
        f.pump(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "svc | half done\n");
    }

    #[test]
    fn two_rotations_between_two_looks_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        append(&path, "a\n");
        let (mut f, _) = followed(&path, 0);
        append(&path, "b\n"); // written to the held file before it is rotated away
        rotate(&path);
        append(&path, "c\n");
        rotate(&path);
        append(&path, "d\n");
        let mut out = Vec::new();
        f.pump(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "svc | b\nsvc | c\nsvc | d\n"
        );
        // And it follows the new file from there.
        append(&path, "e\n");
        let mut out = Vec::new();
        f.pump(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "svc | e\n");
    }

    #[test]
    fn a_log_truncated_in_place_is_read_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        append(&path, "old line one\nold line two\n");
        let (mut f, _) = followed(&path, 0);
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        append(&path, "new\n");
        let mut out = Vec::new();
        f.pump(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "svc | new\n");
    }

    #[test]
    fn a_log_that_does_not_exist_yet_is_followed_once_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let (mut f, out) = followed(&path, 10);
        assert!(out.is_empty());
        append(&path, "first\n");
        let mut out = Vec::new();
        f.pump(&mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "svc | first\n");
    }
}

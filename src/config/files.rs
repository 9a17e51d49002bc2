//! Reading configuration files: only regular files count, and nothing here ever blocks.
//!
//! A service file, the global file and an `env_file` must be regular files, or symlinks to
//! regular files (the drop-in convention links `services.d/db.toml` to a file kept elsewhere).
//! Anything else that stands where one is expected — a dangling symlink, a symlink loop, a
//! directory, a FIFO, a device — is an error that names the path and what it is, never a file
//! silently skipped: a skipped service file is a service lost without a word.
//!
//! The type is checked with `stat` before opening, so a device with side effects on open
//! (a watchdog, a tape) is never opened; the file is then opened with `O_NONBLOCK`, so a FIFO
//! swapped in between the two calls cannot block `check`, and the type is checked again on the
//! open descriptor before a byte is read.

use std::fs::{self, File, FileType};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a path that is not a regular file turned out to be.
#[derive(Debug, thiserror::Error)]
pub enum NotRegular {
    #[error("is a symlink to `{}`, which does not exist (a dangling symlink)", .target.display())]
    Dangling { target: PathBuf },
    #[error("is a symlink loop (following it leads back to itself)")]
    Loop,
    #[error("is a symlink to {kind} `{}`, not to a regular file", .target.display())]
    LinkToOther { kind: &'static str, target: PathBuf },
    #[error("is {kind}, not a regular file")]
    Other { kind: &'static str },
    #[error("cannot be read: {0}")]
    Io(#[source] io::Error),
}

/// The file type in words, with its article: "a directory", "a FIFO".
pub fn kind_of(ft: FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a file of unknown type"
    }
}

/// Checks that `path` is a regular file or a symlink (chain) to one, without opening it.
pub fn check_regular(path: &Path) -> Result<(), NotRegular> {
    let own = fs::symlink_metadata(path).map_err(NotRegular::Io)?;
    if !own.file_type().is_symlink() {
        return if own.is_file() {
            Ok(())
        } else {
            Err(NotRegular::Other {
                kind: kind_of(own.file_type()),
            })
        };
    }
    let target = fs::read_link(path).unwrap_or_default();
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(NotRegular::LinkToOther {
            kind: kind_of(m.file_type()),
            target,
        }),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(NotRegular::Loop),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(NotRegular::Dangling { target }),
        Err(e) => Err(NotRegular::Io(e)),
    }
}

/// Reads a configuration file that must be a regular file (see the module documentation).
pub fn read_regular(path: &Path) -> Result<String, NotRegular> {
    check_regular(path)?;
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(NotRegular::Io)?;
    // Checked again on the descriptor: the path may have been replaced since the `stat`.
    let ft = file.metadata().map_err(NotRegular::Io)?.file_type();
    if !ft.is_file() {
        return Err(NotRegular::Other { kind: kind_of(ft) });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(NotRegular::Io)?;
    Ok(text)
}

/// Whether the error is "there is nothing at this path" (a missing default file is allowed).
pub fn is_not_found(e: &NotRegular) -> bool {
    matches!(e, NotRegular::Io(io) if io.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_non_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        fs::write(p("real"), "x = 1\n").unwrap();
        std::os::unix::fs::symlink(p("real"), p("link")).unwrap();
        std::os::unix::fs::symlink(p("missing"), p("dangling")).unwrap();
        std::os::unix::fs::symlink(p("loop"), p("loop")).unwrap();
        std::os::unix::fs::symlink(dir.path(), p("todir")).unwrap();
        nix::unistd::mkfifo(&p("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink("/dev/zero", p("zero")).unwrap();

        assert_eq!(read_regular(&p("real")).unwrap(), "x = 1\n");
        assert_eq!(read_regular(&p("link")).unwrap(), "x = 1\n");
        let err = |n: &str| read_regular(&p(n)).unwrap_err().to_string();
        assert!(
            err("dangling").contains("dangling symlink"),
            "{}",
            err("dangling")
        );
        assert!(err("loop").contains("symlink loop"), "{}", err("loop"));
        assert!(err("todir").contains("a directory"), "{}", err("todir"));
        assert!(err("fifo").contains("FIFO"), "{}", err("fifo"));
        assert!(err("zero").contains("character device"), "{}", err("zero"));
        assert!(is_not_found(&read_regular(&p("absent")).unwrap_err()));
    }
}

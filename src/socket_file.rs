//! The files of ccmgr's Unix sockets in `run_dir` (the notify socket, the control socket):
//! clearing the way before a bind, and removing one a killed keeper left behind. One place,
//! so that both sockets follow the same rules: only a socket is ever replaced or removed
//! (never a file someone put at that path), and a live socket (one whose keeper still
//! listens) is never removed.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt as _;
use std::path::Path;

/// Why the way to a socket's path could not be cleared.
#[derive(Debug)]
pub enum ClearError {
    /// Something that is not a socket is at the path: it is left alone.
    NotASocket,
    /// A stale socket is there and could not be removed.
    Remove(io::Error),
}

/// Before a bind: removes the stale socket an earlier run left at `path`; refuses anything at
/// `path` that is not a socket.
pub fn clear_for_bind(path: &Path) -> Result<(), ClearError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(ClearError::Remove)
        }
        Ok(_) => Err(ClearError::NotASocket),
        Err(_) => Ok(()),
    }
}

/// The kind of socket at a path, to probe whether anyone still serves it.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Stream,
    Datagram,
    /// `SOCK_SEQPACKET` (the upgrade socket).
    SeqPacket,
}

/// Removes the socket at `path` if nobody serves it any more (a connection is refused): what
/// a killed keeper leaves. A socket whose keeper lives (a concurrent `start`'s) stays.
pub fn remove_if_dead(path: &Path, kind: Kind) {
    let is_socket = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    let refused = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionRefused;
    let dead = match kind {
        Kind::Stream => std::os::unix::net::UnixStream::connect(path).is_err_and(|e| refused(&e)),
        Kind::Datagram => std::os::unix::net::UnixDatagram::unbound()
            .is_ok_and(|probe| probe.connect(path).is_err_and(|e| refused(&e))),
        Kind::SeqPacket => crate::upgrade::connect_socket(path)
            .is_err_and(|e| e == nix::errno::Errno::ECONNREFUSED),
    };
    if dead {
        let _ = fs::remove_file(path);
    }
}

/// Removes the socket at `path`, if it is one (its keeper, at its end).
pub fn remove(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = fs::remove_file(path);
    }
}

//! The control channel: how `ccmgr start|stop|restart SERVICE...` reach the coordinator.
//!
//! It owns the control socket, `<run_dir>/<instance>.sock`, a Unix stream socket, and both of
//! its ends: the keeper binds it and listens ([`bind`]), and hands the listening fd to every
//! coordinator it starts, exactly as it does the notify socket, so that a request made while
//! one coordinator dies waits in the socket's backlog for its successor instead of failing;
//! the coordinator accepts and answers ([`server`]) from its event loop; the command line is
//! the client (`cli/operate.rs`). The messages are in [`protocol`].
//!
//! Who may control: the kernel says who connected (`SO_PEERCRED`), and only the instance's
//! owner (the coordinator's effective uid) and root are served; anyone else who can connect
//! gets one `refused` line. Who can connect at all is the socket file's mode: 0600, or 0660
//! with the instance's configured `group` (whose members may read its state, and are refused
//! with a sentence rather than by the file system). The mode is only the first fence: the
//! credential check is what decides.

pub mod protocol;
pub mod server;

use std::fs::{self, Permissions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind as bind_socket, listen, socket,
};

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control socket path {} does not fit a Unix socket address: {errno}", .path.display())]
    Address { path: PathBuf, errno: Errno },
    #[error("{} exists and is not a socket: it is left alone, and nothing is started", .path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale control socket {}: {source}", .path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the control socket: {0}")]
    Socket(Errno),
    #[error("cannot bind the control socket {}: {errno}", .path.display())]
    Bind { path: PathBuf, errno: Errno },
    #[error("cannot set the owner or mode of the control socket {}: {source}", .path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the control socket {}: {errno}", .path.display())]
    Listen { path: PathBuf, errno: Errno },
}

/// Connections the kernel queues while no coordinator accepts (during a takeover).
const BACKLOG: i32 = 64;

/// The path of an instance's control socket.
pub fn socket_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.sock"))
}

/// Binds and listens on the control socket at `path` (the keeper, once per run): a stale
/// socket a killed run left is replaced, anything else at that path is an error. Mode 0600,
/// or 0660 with group `group`. The fd is non-blocking and close-on-exec; the keeper hands a
/// copy to each coordinator on a fixed number.
pub fn bind(path: &Path, group: Option<u32>) -> Result<OwnedFd, ControlError> {
    let addr = UnixAddr::new(path).map_err(|errno| ControlError::Address {
        path: path.to_path_buf(),
        errno,
    })?;
    crate::socket_file::clear_for_bind(path).map_err(|e| match e {
        crate::socket_file::ClearError::NotASocket => ControlError::NotASocket {
            path: path.to_path_buf(),
        },
        crate::socket_file::ClearError::Remove(source) => ControlError::RemoveStale {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(ControlError::Socket)?;
    bind_socket(fd.as_raw_fd(), &addr).map_err(|errno| ControlError::Bind {
        path: path.to_path_buf(),
        errno,
    })?;
    let permissions = |source| ControlError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    // Before listen: until then a connect is refused whatever the mode was at bind.
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(permissions)?;
            0o660
        }
        None => 0o600,
    };
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(permissions)?;
    let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|errno| ControlError::Listen {
        path: path.to_path_buf(),
        errno,
    })?;
    Ok(fd)
}

/// Removes the control socket a dead keeper left at `path` (`ccmgr stop` cleaning up after
/// it): only once nobody listens on it (a connection is refused), so that a keeper a
/// concurrent `start` has just started keeps its own.
pub fn remove_if_dead(path: &Path) {
    crate::socket_file::remove_if_dead(path, crate::socket_file::Kind::Stream);
}

/// Removes the control socket at `path`, if it is one (the keeper, at its end).
pub fn remove(path: &Path) {
    crate::socket_file::remove(path);
}

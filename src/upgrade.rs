//! `ccmgr upgrade`: replacing a running instance's keeper, coordinator and standby with a new
//! binary while every service keeps its process. This module owns the pieces both sides use:
//! the upgrade socket and its messages, the checks of the new binary, and the mechanics of
//! handing open fds and a state description across `execve`. The keeper's half (what its state
//! is, and rebuilding from it) is `keeper::reexec`; the command line's is `cli/upgrade.rs`.
//!
//! Why a socket of the keeper's own, `<run_dir>/<instance>.upgrade`, rather than the control
//! socket: the control socket is served by the coordinator, and the coordinator is one of the
//! processes the upgrade replaces (it is killed and a new-binary successor adopts the stack).
//! The keeper is the one party that lives through the whole upgrade with the same pid, so the
//! client talks to it directly, on a connection whose fd the keeper carries across its exec:
//! the old image answers `executing`, the new one `resumed` (or, if it cannot rebuild from the
//! state, the old image, restored, answers `rolled-back`). The socket is `SOCK_SEQPACKET` (one
//! request, one packet: no framing, nothing partial to buffer in the keeper), mode 0600, and
//! the keeper serves only its own uid, checked with `SO_PEERCRED`.
//!
//! The sequence:
//! 1. the client (the new binary) resolves its own `/proc/self/exe`, opens the instance's
//!    segment and the service API's control segment and refuses, changing nothing, when their
//!    layout versions are not the ones it reads ([`layout_refusal`]);
//! 2. it sends [`Request`]: the path, and the versions of the segment layouts and of the
//!    keeper state it reads. The keeper refuses a mismatch, a stack that is not steady (no
//!    coordinator, a takeover, a reload or a stop under way), and a binary that fails
//!    [`check_binary`]; the binary is opened first and checked through that fd, and that same
//!    fd is executed (`fexecve`), so the file checked is the file run;
//! 3. the keeper writes its state into a memfd, clears `FD_CLOEXEC` on exactly the fds the
//!    state names, keeps an fd on its own executable (for a roll-back), and execs the new
//!    binary as `internal keeper --resume-state FD --previous-exe FD`. A failed exec returns
//!    to the old image, which restores the flags and goes on ([`Reply::Failed`]);
//! 4. the new image rebuilds from the state and answers [`Reply::Resumed`]; if it cannot, it
//!    execs the previous image back on the same state ([`Reply::RolledBack`]);
//! 5. the new keeper retires the standby and, once it is reaped, kills the coordinator: the
//!    keeper starts a successor from the new binary, which takes over (the standby's adopt
//!    path, the same one every coordinator death takes), and asks for a new standby.
//!
//! Children that end while the keeper is between images stay zombies with their `SIGCHLD`
//! pending (the signal mask and pending signals survive `execve`): the new keeper reaps them
//! as it would have reaped them before.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr, bind, connect, listen, recv,
    send, socket,
};
use serde::{Deserialize, Serialize};

/// The version of the keeper's state description handed across exec. Bumped on every change
/// of its shape; a keeper refuses an upgrade to a binary that reads another version.
pub const STATE_VERSION: u32 = 1;

/// The path of the marker the keeper leaves while a coordinator of the new binary takes over
/// from the one it killed for an upgrade: that takeover adopts the services whatever
/// `takeover` says (under `takeover = "restart"` a death would restart them all), as one that
/// finishes a reload does.
pub fn marker_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.upgrading"))
}

/// The largest message on the upgrade socket.
const MAX_MESSAGE: usize = 16 * 1024;

/// The path of an instance's upgrade socket.
pub fn socket_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.upgrade"))
}

/// What the new binary asks of the running keeper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The new binary: the client's own executable, resolved.
    pub exe: PathBuf,
    /// The keeper state version the new binary reads ([`STATE_VERSION`]).
    pub state_version: u32,
    /// The segment layout version it reads (`shm::layout::LAYOUT_VERSION`).
    pub layout_version: u32,
    /// The service API control segment's (`shm::api::API_LAYOUT_VERSION`).
    pub api_layout_version: u32,
}

/// The keeper's answers, in order: a refusal, or `executing` then `resumed` (or `failed`, or
/// `rolled-back`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// The caller is not the instance's owner.
    NotPermitted { why: String },
    /// Nothing was changed, for this reason.
    Refused { why: String },
    /// The keeper is about to exec the new binary.
    Executing { exe: PathBuf },
    /// The exec failed: the old keeper goes on, nothing was changed.
    Failed { why: String },
    /// The new keeper rebuilt itself from the state; the coordinator and standby follow.
    Resumed { exe: PathBuf, keeper: i32 },
    /// The new keeper could not rebuild from the state and the previous image was restored.
    RolledBack { why: String },
}

/// Sends one message on a seqpacket socket; never blocks for long (the peer reads at once, and
/// the buffer takes a short packet whole).
pub fn send_message<T: Serialize>(fd: BorrowedFd<'_>, message: &T) -> Result<(), Errno> {
    let bytes = serde_json::to_vec(message).map_err(|_| Errno::EINVAL)?;
    loop {
        match send(
            fd.as_raw_fd(),
            &bytes,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one message: `Ok(None)` at end-of-file, `Err(EAGAIN)` on a non-blocking socket
/// with nothing waiting, `Err(EINVAL)` for a message that does not decode.
pub fn recv_message<T: for<'de> Deserialize<'de>>(fd: BorrowedFd<'_>) -> Result<Option<T>, Errno> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                return serde_json::from_slice(&buf[..n])
                    .map(Some)
                    .map_err(|_| Errno::EINVAL);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Binds and listens on the upgrade socket (the keeper, at its start): mode 0600, non-blocking,
/// close-on-exec. A stale socket an earlier run left is replaced.
pub fn bind_socket(path: &Path) -> Result<OwnedFd, String> {
    let shown = path.display();
    let addr = UnixAddr::new(path).map_err(|e| format!("{shown}: {e}"))?;
    crate::socket_file::clear_for_bind(path)
        .map_err(|_| format!("{shown} exists and is not a socket, or cannot be removed"))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| format!("cannot create {shown}: {e}"))?;
    bind(fd.as_raw_fd(), &addr).map_err(|e| format!("cannot bind {shown}: {e}"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| format!("cannot make {shown} mode 0600: {e}"))?;
    listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    Ok(fd)
}

/// Accepts a connection on the (non-blocking) upgrade socket: non-blocking, close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let fd = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 has just returned this fd: open, and owned by nothing else yet.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to the upgrade socket at `path` (the client), blocking.
pub fn connect_socket(path: &Path) -> Result<OwnedFd, Errno> {
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}

/// Why the new binary cannot read what the running instance wrote: a sentence naming both
/// versions, or `None` when it can. `found` is the running instance's version, `ours` the new
/// binary's, `what` names the layout.
pub fn layout_refusal(what: &str, found: u32, ours: u32) -> Option<String> {
    (found != ours).then(|| {
        format!(
            "the running instance's {what} has layout version {found}, and this ccmgr reads version {ours}: it cannot take over that state, so nothing was changed (stop the instance and start it with the new ccmgr instead)"
        )
    })
}

/// Opens the binary at `path` for a later `fexecve` and checks it through that fd: a regular
/// file, owned by root or `owner`, writable by neither group nor others, executable. The file
/// checked is then the file executed, whatever happens at `path` meanwhile.
pub fn open_checked_binary(path: &Path, owner: u32) -> Result<OwnedFd, String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown} is not an absolute path"));
    }
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("cannot open {shown}: {e}"))?;
    let meta = File::from(fd.try_clone().map_err(|e| format!("{shown}: {e}"))?)
        .metadata()
        .map_err(|e| format!("cannot read what {shown} is: {e}"))?;
    check_binary(&shown.to_string(), &meta, owner)?;
    Ok(fd)
}

/// The checks of [`open_checked_binary`] on a file's metadata.
pub fn check_binary(shown: &str, meta: &std::fs::Metadata, owner: u32) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.uid() != 0 && meta.uid() != owner {
        return Err(format!(
            "{shown} belongs to uid {}: only a binary owned by root or the instance's owner (uid {owner}) may become its keeper",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{shown} is writable by its group or by others (mode {:o}): anyone who can write it could become the instance's keeper",
            meta.mode() & 0o7777
        ));
    }
    if meta.mode() & 0o100 == 0 {
        return Err(format!("{shown} is not executable by its owner"));
    }
    Ok(())
}

/// Writes `state` into a new memfd (no close-on-exec, so that the next image finds it).
pub fn state_memfd(state: &[u8]) -> Result<OwnedFd, Errno> {
    let fd =
        nix::sys::memfd::memfd_create(c"ccmgr-keeper-state", nix::sys::memfd::MFdFlags::empty())?;
    let mut file = File::from(fd);
    file.write_all(state).map_err(|_| Errno::EIO)?;
    Ok(OwnedFd::from(file))
}

/// Reads the whole state a previous image left in the memfd `fd` (from its start, whatever
/// the offset: a rolled-back image reads it a second time).
pub fn read_state_fd(fd: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut file = File::from(fd.try_clone()?);
    file.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether `fd` is an open fd number.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads the descriptor flags of `fd` and changes nothing; a number that is
    // not open returns EBADF.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1
}

/// Takes ownership of an fd number the previous image of this process handed down (named in
/// its state or on the command line): the caller has checked with [`fd_is_open`] that it is
/// open, and takes each number once. Its close-on-exec flag is left as it is (clear) until
/// the new image is sure it will not roll back.
pub fn claim_handed_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` is open (the caller checked, see above) and was left on this number by the
    // previous image of this process for this one to own; it is claimed once, while the state
    // is read, before anything else in this image could have opened, taken or closed it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sets or clears `FD_CLOEXEC` on each fd.
pub fn set_cloexec(fds: &[BorrowedFd<'_>], cloexec: bool) -> Result<(), Errno> {
    let flags = if cloexec {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    for fd in fds {
        fcntl(fd, FcntlArg::F_SETFD(flags))?;
    }
    Ok(())
}

/// Executes the binary open on `binary` with `args` (argv\[0\] included) and this process's
/// environment. Returns only on failure.
pub fn exec_fd(binary: BorrowedFd<'_>, args: &[&OsStr]) -> Errno {
    let args: Vec<CString> = match args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
    {
        Ok(args) => args,
        Err(_) => return Errno::EINVAL,
    };
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    match nix::unistd::fexecve(binary.as_fd(), &args, &env) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// The command line of a keeper resuming from a state: `ccmgr --instance I internal keeper
/// --run-dir D --resume-state FD`, and the fd of the previous image's binary (for a roll-back)
/// or the reason of a roll-back.
pub fn resume_args(
    instance: &str,
    run_dir: &Path,
    state_fd: RawFd,
    previous_exe_fd: Option<RawFd>,
    rollback_reason: Option<&str>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "ccmgr".into(),
        "--instance".into(),
        instance.into(),
        "internal".into(),
        "keeper".into(),
        "--run-dir".into(),
        run_dir.into(),
        "--resume-state".into(),
        state_fd.to_string().into(),
    ];
    if let Some(fd) = previous_exe_fd {
        args.push("--previous-exe".into());
        args.push(fd.to_string().into());
    }
    if let Some(why) = rollback_reason {
        args.push("--rollback-reason".into());
        args.push(why.into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_replies_read_back() {
        let request = Request {
            exe: "/usr/bin/ccmgr".into(),
            state_version: STATE_VERSION,
            layout_version: 3,
            api_layout_version: 1,
        };
        let text = serde_json::to_vec(&request).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&text).unwrap(), request);
        for reply in [
            Reply::Refused { why: "no".into() },
            Reply::Resumed {
                exe: "/x".into(),
                keeper: 7,
            },
        ] {
            let text = serde_json::to_vec(&reply).unwrap();
            assert_eq!(serde_json::from_slice::<Reply>(&text).unwrap(), reply);
        }
    }

    #[test]
    fn a_layout_refusal_names_both_versions() {
        assert_eq!(layout_refusal("segment", 3, 3), None);
        let why = layout_refusal("segment", 2, 3).unwrap();
        assert!(
            why.contains("version 2") && why.contains("version 3"),
            "{why}"
        );
    }

    #[test]
    fn only_a_safe_binary_may_become_the_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ccmgr");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let mode = |m: u32| {
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(m))
                .unwrap()
        };
        mode(0o755);
        assert!(open_checked_binary(&path, me).is_ok());
        mode(0o775);
        let why = open_checked_binary(&path, me).unwrap_err();
        assert!(why.contains("writable"), "{why}");
        mode(0o644);
        assert!(open_checked_binary(&path, me).is_err());
        assert!(open_checked_binary(dir.path(), me).is_err(), "a directory");
        assert!(
            open_checked_binary(Path::new("ccmgr"), me).is_err(),
            "relative"
        );
    }
}

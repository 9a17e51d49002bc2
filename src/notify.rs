//! The sd_notify protocol: the socket `Type=notify` daemons report readiness on.
//!
//! This module owns the coordinator's end of `$NOTIFY_SOCKET` ([`NotifySocket`]), the parsing
//! of what arrives on it ([`NotifyMessage`]), and the rule for whose messages count for which
//! service ([`sender_belongs_to`]). With it, a daemon written for systemd (redis with
//! `--supervised systemd`, anything linked with libsystemd's `sd_notify`) runs unchanged.
//!
//! The protocol: the service connects a datagram socket to the path in `$NOTIFY_SOCKET` and
//! sends newline-separated `KEY=VALUE` lines: `READY=1`, `STATUS=...`, `STOPPING=1`,
//! `WATCHDOG=1`, `MAINPID=...`, `ERRNO=...`. One socket serves every service; a message is
//! matched to a service by the sender's pid, which the kernel attaches to each datagram
//! (`SO_PASSCRED` → `SCM_CREDENTIALS`). A process cannot put another pid there without
//! CAP_SYS_ADMIN, so a service can speak only for itself; a `MAINPID=` it *claims* is just a
//! field, never a credential.
//!
//! Socket mode: the socket file is made mode 0666 after `bind`, so that services running as
//! other users can connect (connecting to a Unix socket needs write permission on its file;
//! the run directory must also be searchable by them). That lets any local user send to it,
//! which is harmless because every message is attributed by its kernel-supplied credentials
//! and a sender that is not part of a service is ignored. It is also cheap: a flood from a
//! stranger must not cost the coordinator its loop or fill its log. So the coordinator takes
//! datagrams with [`NotifySocket::recv_filtered`], which drops one whose sender's uid no
//! service runs as and whose pid is no service's main pid ([`SenderFilter`]) before parsing it
//! or reading `/proc`; it takes a bounded number per wakeup; and it logs drops through a
//! [`DropTally`]: one line at the first, then one summary with a count per period.
//!
//! Not supported, by design: abstract-namespace addresses (`@name`; `$NOTIFY_SOCKET` is always
//! a filesystem path here), and `FDSTORE=1`. File descriptors sent with `SCM_RIGHTS` are
//! closed on receipt, so a service cannot make the coordinator hold its fds.

use std::fs::{self, Permissions};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, bind, recvmsg,
    setsockopt, socket, sockopt,
};

/// The environment variable that tells a service where the socket is.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// The largest datagram accepted; longer ones are dropped whole. systemd uses the same limit
/// (PIPE_BUF), so a daemon that works under systemd fits.
pub const MAX_DATAGRAM: usize = 4096;
/// The kernel's limit on fds per `SCM_RIGHTS` message (`SCM_MAX_FD`): the control buffer has
/// room for that many, so a message can never have fds cut off unseen (and so leaked).
const SCM_MAX_FD: usize = 253;
/// How many unusable datagrams one [`NotifySocket::recv`] call skips before it returns, so a
/// flood of junk cannot hold its caller.
const MAX_SKIPPED: usize = 64;

/// Why the notify socket could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot use {} as the notify socket: {}", .path.display(), .errno.desc())]
    Address { path: PathBuf, errno: Errno },
    #[error("{} exists and is not a socket; refusing to replace it with the notify socket", .path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale notify socket {}: {source}", .path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the notify socket: {}", .0.desc())]
    Socket(Errno),
    #[error("cannot bind the notify socket to {}: {}", .path.display(), .errno.desc())]
    Bind { path: PathBuf, errno: Errno },
    #[error("cannot ask for sender credentials on the notify socket: {}", .0.desc())]
    PassCred(Errno),
    #[error("cannot let other users connect to the notify socket {}: {source}", .path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot receive from the notify socket: {}", .0.desc())]
    Recv(Errno),
}

/// One sd_notify datagram: who sent it (from the kernel) and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyMessage {
    /// The sender's pid, as the kernel saw it (not forgeable, unlike `MAINPID=`).
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// The `KEY=VALUE` lines, in order; malformed lines are left out.
    pub fields: Vec<(String, String)>,
}

impl NotifyMessage {
    /// The value of `key`; the last one wins if it appears twice.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `READY=1`: startup is complete.
    pub fn is_ready(&self) -> bool {
        self.get("READY") == Some("1")
    }

    /// `STOPPING=1`: the service has begun shutting down.
    pub fn is_stopping(&self) -> bool {
        self.get("STOPPING") == Some("1")
    }

    /// `WATCHDOG=1`: a keep-alive ping.
    pub fn is_watchdog(&self) -> bool {
        self.get("WATCHDOG") == Some("1")
    }

    /// `STATUS=`: a free-form status line for humans.
    pub fn status(&self) -> Option<&str> {
        self.get("STATUS")
    }

    /// `MAINPID=`: the pid the sender *claims* is the service's main process. A claim only:
    /// check it (for instance with [`sender_belongs_to`]) before believing it.
    pub fn claimed_main_pid(&self) -> Option<i32> {
        self.get("MAINPID")?.parse().ok().filter(|pid| *pid > 0)
    }

    /// `ERRNO=`: the errno the service says it failed with.
    pub fn errno(&self) -> Option<Errno> {
        self.get("ERRNO")?.parse().ok().map(Errno::from_raw)
    }
}

/// Splits a datagram into its `KEY=VALUE` lines. Empty lines, lines without `=` or with an
/// empty key, and lines that are not UTF-8 are left out; a value may be empty or hold `=`.
pub fn parse_payload(payload: &[u8]) -> Vec<(String, String)> {
    payload
        .split(|&b| b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| !key.is_empty() && !key.contains('\0'))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// The coordinator's end of `$NOTIFY_SOCKET`: a non-blocking, close-on-exec Unix datagram
/// socket bound to a path. Register [`AsFd::as_fd`] in the event loop (level-triggered) and
/// call [`NotifySocket::recv`] until it returns `None` whenever it is readable. Dropping it
/// removes the socket file, unless something else has been bound at that path since.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    path: PathBuf,
    /// (device, inode) of the socket file we created, so that drop removes only our own;
    /// `None` for a socket inherited from the process that bound it (the keeper), whose file
    /// is not ours to remove.
    file_id: Option<(u64, u64)>,
}

impl NotifySocket {
    /// Binds the socket at `path`, replacing a stale socket left there by an earlier run (but
    /// refusing to replace anything that is not a socket), enables `SO_PASSCRED`, and makes the
    /// file mode 0666 (see the module documentation for why that is safe).
    pub fn bind(path: &Path) -> Result<NotifySocket, NotifyError> {
        let addr = UnixAddr::new(path).map_err(|errno| NotifyError::Address {
            path: path.to_path_buf(),
            errno,
        })?;
        crate::socket_file::clear_for_bind(path).map_err(|e| match e {
            crate::socket_file::ClearError::NotASocket => NotifyError::NotASocket {
                path: path.to_path_buf(),
            },
            crate::socket_file::ClearError::Remove(source) => NotifyError::RemoveStale {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(NotifyError::Socket)?;
        // Before bind, so that no datagram can arrive without credentials.
        setsockopt(&fd, sockopt::PassCred, &true).map_err(NotifyError::PassCred)?;
        bind(fd.as_raw_fd(), &addr).map_err(|errno| NotifyError::Bind {
            path: path.to_path_buf(),
            errno,
        })?;
        let permissions = |source| NotifyError::Permissions {
            path: path.to_path_buf(),
            source,
        };
        fs::set_permissions(path, Permissions::from_mode(0o666)).map_err(permissions)?;
        let meta = fs::metadata(path).map_err(permissions)?;
        Ok(NotifySocket {
            fd,
            path: path.to_path_buf(),
            file_id: Some((meta.dev(), meta.ino())),
        })
    }

    /// Takes over a notify socket another process bound at `path` and handed down (the keeper
    /// to its coordinator). Dropping it leaves the socket file alone.
    pub fn from_inherited(fd: OwnedFd, path: PathBuf) -> NotifySocket {
        NotifySocket {
            fd,
            path,
            file_id: None,
        }
    }

    /// A socket this very process bound, handed to its next image across an exec (`ccmgr
    /// upgrade`): `file_id` is what [`NotifySocket::file_id`] said before, so that dropping it
    /// removes the socket file as the binder would have.
    pub fn from_handed(fd: OwnedFd, path: PathBuf, file_id: Option<(u64, u64)>) -> NotifySocket {
        NotifySocket { fd, path, file_id }
    }

    /// The (device, inode) of the socket file, if this socket bound it.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        self.file_id
    }

    /// The socket's path: the value of `$NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `("NOTIFY_SOCKET", path)`, for [`crate::spawn::build_environment`]'s `extra`.
    pub fn env_var(&self) -> (String, String) {
        (
            NOTIFY_SOCKET_ENV.to_owned(),
            self.path.to_string_lossy().into_owned(),
        )
    }

    /// The next waiting message, or `None` when nothing (usable) waits; never blocks.
    ///
    /// Datagrams longer than [`MAX_DATAGRAM`] and datagrams without credentials are dropped,
    /// and fds that came with a datagram are closed. After skipping a run of such datagrams
    /// this may return `None` while more wait; a level-triggered poll wakes the caller again.
    /// For a socket any local user can send to, prefer [`NotifySocket::recv_filtered`].
    pub fn recv(&self) -> Result<Option<NotifyMessage>, NotifyError> {
        for _ in 0..MAX_SKIPPED {
            match self.recv_filtered(|_| true)? {
                None => return Ok(None),
                Some(Received::Message(message)) => return Ok(Some(message)),
                Some(Received::Refused(_)) => {}
                Some(Received::Malformed(sender)) => {
                    tracing::warn!(
                        pid = sender.map(|s| s.pid),
                        "notify datagram without credentials or over {MAX_DATAGRAM} bytes dropped"
                    )
                }
            }
        }
        Ok(None)
    }

    /// Takes one waiting datagram, or `None` when none waits; never blocks, logs nothing.
    ///
    /// `admit` sees the kernel-attested sender first; a datagram it refuses is dropped
    /// unparsed ([`Received::Refused`]), so that a stranger's datagram costs one `recvmsg`
    /// and whatever `admit` costs. Datagrams longer than [`MAX_DATAGRAM`] or without
    /// credentials are [`Received::Malformed`]; fds sent along are closed in every case.
    pub fn recv_filtered(
        &self,
        admit: impl FnOnce(Sender) -> bool,
    ) -> Result<Option<Received>, NotifyError> {
        let mut payload = [0u8; MAX_DATAGRAM];
        let mut control = nix::cmsg_space!(libc::ucred, [RawFd; SCM_MAX_FD]);
        let mut iov = [IoSliceMut::new(&mut payload)];
        let msg = loop {
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => break msg,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(NotifyError::Recv(errno)),
            }
        };
        let mut credentials = None;
        match msg.cmsgs() {
            Ok(cmsgs) => {
                for cmsg in cmsgs {
                    match cmsg {
                        ControlMessageOwned::ScmCredentials(c) => credentials = Some(c),
                        ControlMessageOwned::ScmRights(fds) => close_received(&fds),
                        _ => {}
                    }
                }
            }
            // MSG_CTRUNC. The control buffer holds credentials plus the kernel's maximum
            // number of fds, and no other control message is enabled, so this means the
            // kernel changed under us.
            Err(errno) => {
                tracing::error!(%errno, "notify datagram with truncated control data")
            }
        }
        let (bytes, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC));
        let sender = credentials.map(|c| Sender {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        });
        let Some(sender) = sender else {
            return Ok(Some(Received::Malformed(None)));
        };
        if !admit(sender) {
            return Ok(Some(Received::Refused(sender)));
        }
        if truncated {
            return Ok(Some(Received::Malformed(Some(sender))));
        }
        Ok(Some(Received::Message(NotifyMessage {
            pid: sender.pid,
            uid: sender.uid,
            gid: sender.gid,
            fields: parse_payload(&iov[0][..bytes]),
        })))
    }
}

/// Who sent a datagram, as the kernel attests (`SCM_CREDENTIALS`): not forgeable without
/// CAP_SYS_ADMIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sender {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// One datagram taken by [`NotifySocket::recv_filtered`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// From an admitted sender, parsed.
    Message(NotifyMessage),
    /// Refused by the filter before anything was parsed.
    Refused(Sender),
    /// Dropped: over [`MAX_DATAGRAM`] bytes, or without credentials (then no sender).
    Malformed(Option<Sender>),
}

/// Decides from a sender's credentials alone, with no `/proc` read, whether a datagram can
/// be a service's: its pid is a service's main pid, or its uid is one a service runs as.
///
/// Every other datagram is a stranger's (any local user can send to the socket, see the
/// module documentation) and is dropped unparsed. The uids are root's, the coordinator's own
/// (services without `user` run as it) and each configured `user`'s. A process of a service
/// that changes to another uid can still notify from the main pid; from a helper it is
/// refused, as a stranger is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenderFilter {
    /// Sorted, without duplicates.
    uids: Vec<u32>,
}

impl SenderFilter {
    pub fn new(uids: impl IntoIterator<Item = u32>) -> SenderFilter {
        let mut uids: Vec<u32> = uids.into_iter().collect();
        uids.sort_unstable();
        uids.dedup();
        SenderFilter { uids }
    }

    /// Whether `sender` may be a service's process, given the services' main pids.
    pub fn admits(&self, sender: Sender, main_pids: &[Option<i32>]) -> bool {
        self.uids.binary_search(&sender.uid).is_ok() || main_pids.contains(&Some(sender.pid))
    }
}

/// Counts dropped datagrams so that a flood of them costs one log line per period, not one
/// per datagram, and no wakeup once it is over.
///
/// The first drop after a quiet spell is for logging at once ([`DropTally::note`] says so);
/// later ones are counted until the period since that first one has passed, when
/// [`DropTally::take_summary`] hands out the count and an example sender, and a new period
/// begins. A period in which nothing was dropped ends the tally: [`DropTally::due`] is then
/// `None`, so the caller arms no timer for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropTally {
    period: Duration,
    /// When the current period began (in the caller's clock), while one runs.
    since: Option<Duration>,
    count: u64,
    example: Option<Sender>,
}

/// A summary of drops: how many, over how long, and one sender as an example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropSummary {
    pub count: u64,
    pub over: Duration,
    pub example: Option<Sender>,
}

impl DropTally {
    pub fn new(period: Duration) -> DropTally {
        DropTally {
            period,
            since: None,
            count: 0,
            example: None,
        }
    }

    /// Notes one dropped datagram at `now`; true when it is the first of a spell and should
    /// be logged at once (the rest are counted for the summary).
    pub fn note(&mut self, now: Duration, sender: Option<Sender>) -> bool {
        if self.since.is_none() {
            self.since = Some(now);
            return true;
        }
        self.count += 1;
        if self.example.is_none() {
            self.example = sender;
        }
        false
    }

    /// When the current period ends, while one runs: the time to call `take_summary`.
    pub fn due(&self) -> Option<Duration> {
        self.since.map(|since| since + self.period)
    }

    /// At or after [`DropTally::due`]: the drops counted in the period (`None` if there were
    /// none, which ends the tally, or if the period has not ended yet).
    pub fn take_summary(&mut self, now: Duration) -> Option<DropSummary> {
        let since = self.since?;
        if now < since + self.period {
            return None;
        }
        if self.count == 0 {
            self.since = None;
            return None;
        }
        let summary = DropSummary {
            count: self.count,
            over: now.saturating_sub(since),
            example: self.example.take(),
        };
        self.count = 0;
        self.since = Some(now);
        Some(summary)
    }
}

/// Closes fds a sender passed with `SCM_RIGHTS` (FDSTORE is not supported). They arrived
/// close-on-exec (`MSG_CMSG_CLOEXEC`), so no child spawned meanwhile kept a copy.
fn close_received(fds: &[RawFd]) {
    tracing::debug!(
        count = fds.len(),
        "closing fds sent on the notify socket (FDSTORE is not supported)"
    );
    for &fd in fds {
        // The kernel just installed these fds for us and nothing else has seen their numbers.
        let _ = nix::unistd::close(fd);
    }
}

impl AsFd for NotifySocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let ours = self.file_id.is_some_and(|id| {
            fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == id)
        });
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The ids of a process, from `/proc/<pid>/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcIds {
    pub ppid: i32,
    pub pgid: i32,
    pub session: i32,
}

/// Reads the parent, process group and session of `pid` from `/proc/<pid>/stat`.
pub fn proc_ids(pid: i32) -> io::Result<ProcIds> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected format of /proc/{pid}/stat"),
        )
    })
}

/// `pid (comm) state ppid pgrp session ...`. The command name may hold spaces and `)`, so the
/// fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcIds> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(1);
    let mut next = || fields.next()?.parse::<i32>().ok();
    Some(ProcIds {
        ppid: next()?,
        pgid: next()?,
        session: next()?,
    })
}

/// Whether a message from `sender` (a kernel-attested pid, [`NotifyMessage::pid`]) may speak
/// for the service whose main process is `service_pid`.
///
/// The policy: the main process itself, or any process in the service's session. A service
/// is started as a session leader (see [`crate::spawn::spawn_service`]), so its session id is
/// its pid, and every process it starts stays in that session unless it calls `setsid()`. That
/// covers daemons that notify from a helper child or a worker, which a process-group check
/// would miss once they make their own groups, and it cannot match anything outside the
/// service: another service is in another session, and a process cannot join a session.
///
/// A sender other than the main process is checked through `/proc`, so it must still exist (a
/// zombie will do) when the coordinator reads the message: a helper that sends and exits at
/// once, like `systemd-notify` run from a script, may be refused. Daemons that detach with
/// `setsid()` and notify from there are refused too; they should notify from the main process.
pub fn sender_belongs_to(sender: i32, service_pid: i32) -> bool {
    sender > 0
        && service_pid > 0
        && (sender == service_pid || proc_ids(sender).is_ok_and(|ids| ids.session == service_pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_lines() {
        let fields = parse_payload(b"READY=1\nSTATUS=up: a=b\n\nnonsense\n=x\nEMPTY=\n\xff=1\n");
        let expected = [("READY", "1"), ("STATUS", "up: a=b"), ("EMPTY", "")];
        assert_eq!(fields, expected.map(|(k, v)| (k.to_owned(), v.to_owned())));
    }

    #[test]
    fn message_accessors() {
        let msg = NotifyMessage {
            pid: 10,
            uid: 0,
            gid: 0,
            fields: parse_payload(b"READY=1\nSTATUS=one\nSTATUS=two\nMAINPID=77\nERRNO=2"),
        };
        assert!(msg.is_ready());
        assert!(!msg.is_stopping());
        assert!(!msg.is_watchdog());
        assert_eq!(msg.status(), Some("two"));
        assert_eq!(msg.claimed_main_pid(), Some(77));
        assert_eq!(msg.errno(), Some(Errno::ENOENT));
        let not_ready = NotifyMessage {
            fields: parse_payload(b"READY=0\nMAINPID=-1"),
            ..msg
        };
        assert!(!not_ready.is_ready());
        assert_eq!(not_ready.claimed_main_pid(), None);
    }

    #[test]
    fn stat_with_awkward_command_names() {
        let ids = parse_stat("1234 (my) (prog) S 1 1234 1234 0 -1 4194560 ...").unwrap();
        assert_eq!(
            ids,
            ProcIds {
                ppid: 1,
                pgid: 1234,
                session: 1234
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        let own = proc_ids(std::process::id() as i32).unwrap();
        assert_eq!(own.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(own.session, nix::unistd::getsid(None).unwrap().as_raw());
    }

    #[test]
    fn belonging() {
        let me = std::process::id() as i32;
        assert!(sender_belongs_to(me, me));
        assert!(!sender_belongs_to(0, me));
        assert!(!sender_belongs_to(me, 0));
        assert!(!sender_belongs_to(me, me + 1) || is_session_leader(me + 1));
        // A process in the session a service leads belongs to it. The kernel reports session
        // 0 when the leader is outside our pid namespace (a test run inside `unshare -p`, as
        // on CI): then no service here can lead this session, and nothing may claim it.
        let session = nix::unistd::getsid(None).unwrap().as_raw();
        if session > 0 {
            assert!(sender_belongs_to(me, session));
        } else {
            assert!(!sender_belongs_to(me, session));
        }
    }

    fn is_session_leader(pid: i32) -> bool {
        proc_ids(pid).is_ok_and(|ids| ids.session == pid)
    }

    #[test]
    fn bind_replaces_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let first = NotifySocket::bind(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        // A second coordinator (after a crash, say) takes the path over...
        let second = NotifySocket::bind(&path).unwrap();
        // ...and the first one's drop leaves the second one's file alone.
        drop(first);
        assert!(path.exists());
        drop(second);
        assert!(!path.exists());

        fs::write(&path, "not a socket").unwrap();
        let err = NotifySocket::bind(&path).unwrap_err();
        assert!(matches!(err, NotifyError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a socket");
    }

    #[test]
    fn recv_on_an_empty_socket_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let sock = NotifySocket::bind(&dir.path().join("n")).unwrap();
        assert_eq!(sock.recv().unwrap(), None);
        assert_eq!(sock.env_var().0, "NOTIFY_SOCKET");
    }

    #[test]
    fn the_filter_admits_service_uids_and_main_pids_only() {
        let filter = SenderFilter::new([1000, 0, 1000]);
        let sender = |pid, uid| Sender { pid, uid, gid: uid };
        let pids = [None, Some(42)];
        assert!(filter.admits(sender(7, 0), &pids));
        assert!(filter.admits(sender(7, 1000), &pids));
        // A main pid speaks whatever uid it switched to.
        assert!(filter.admits(sender(42, 65534), &pids));
        assert!(!filter.admits(sender(7, 65534), &pids));
        assert!(!filter.admits(sender(7, 65534), &[]));
    }

    #[test]
    fn the_tally_logs_the_first_then_one_summary_per_period_then_falls_quiet() {
        let s = |n| Duration::from_secs(n);
        let stranger = Sender {
            pid: 9,
            uid: 65534,
            gid: 65534,
        };
        let mut tally = DropTally::new(s(10));
        assert_eq!(tally.due(), None);
        assert!(
            tally.note(s(1), Some(stranger)),
            "the first is logged at once"
        );
        for t in 1..=5 {
            assert!(!tally.note(s(t), Some(stranger)));
        }
        assert_eq!(tally.due(), Some(s(11)));
        assert_eq!(
            tally.take_summary(s(10)),
            None,
            "not before the period ends"
        );
        assert_eq!(
            tally.take_summary(s(11)),
            Some(DropSummary {
                count: 5,
                over: s(10),
                example: Some(stranger)
            })
        );
        // A new period runs; nothing in it ends the tally, and no timer is needed.
        assert_eq!(tally.due(), Some(s(21)));
        assert_eq!(tally.take_summary(s(21)), None);
        assert_eq!(tally.due(), None);
        assert!(
            tally.note(s(30), None),
            "a new spell is logged at once again"
        );
    }

    #[test]
    fn recv_filtered_refuses_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        let sock = NotifySocket::bind(&path).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        let me = std::process::id() as i32;
        match sock.recv_filtered(|_| false).unwrap() {
            Some(Received::Refused(sender)) => assert_eq!(sender.pid, me),
            other => panic!("expected a refusal, got {other:?}"),
        }
        match sock.recv_filtered(|sender| sender.pid == me).unwrap() {
            Some(Received::Message(m)) => assert!(m.is_ready()),
            other => panic!("expected a message, got {other:?}"),
        }
        assert_eq!(sock.recv_filtered(|_| true).unwrap(), None);
    }
}

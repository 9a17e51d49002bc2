//! The messages between the keeper and the coordinator it serves.
//!
//! One `SOCK_SEQPACKET` socket pair per coordinator (or standby): each message is one packet
//! (boundaries kept, no framing to get wrong), and a peer's death shows as end-of-file at
//! once. Messages are small JSON records, readable in `strace` when something goes wrong.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use serde::{Deserialize, Serialize};

use crate::spawn::ProcessExit;

/// The largest message either side sends; far above what any message needs.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// From a coordinator to the keeper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToKeeper {
    /// Start service `service` (an index into the config image).
    Spawn { service: usize },
    /// Send `signal` to the process group of service `service`, whose main process is `pid`
    /// (ignored if that process has already ended: a stale request cannot hit a new process).
    Signal {
        service: usize,
        pid: i32,
        signal: i32,
    },
    /// Start a standby coordinator.
    SpawnStandby,
    /// This (standby) connection is now the coordinator: send it what happened while no
    /// coordinator listened, then [`FromKeeper::Running`], then every service event.
    TakeOver,
    /// Stop the standby: the stack is being stopped in order, and a standby waking up to the
    /// coordinator's orderly exit must not take it for a death.
    StopStandby,
    /// The stack is stopped: exit once the coordinator has.
    Shutdown,
    /// The exit of `service`'s process `pid` is in the published state: the keeper need not
    /// hand it to a successor any more. Sent only after the publication that includes it, so
    /// that an exit is never in neither place.
    AckExit { service: usize, pid: i32 },
    /// A sign of life, sent each `[coordinator] watchdog` period when one is set: a
    /// coordinator silent for two periods is taken for dead.
    Alive,
    /// Run a failure command: `service`'s `on_failure_command`, or with None the instance's
    /// (`[coordinator] on_failure_command`), with `env` added to its environment. The keeper
    /// reads the command from its own configuration, never from the message.
    RunHook {
        service: Option<usize>,
        env: Vec<(String, String)>,
    },
    /// A reload: the next segment is complete under its staged name
    /// (`<instance>.seg.reload`), and every service it does not keep is down. Rename it over
    /// the live one, take its configuration (remapping every per-service table by id),
    /// retire the standby, answer [`FromKeeper::ReloadDone`], and start a successor on it
    /// once this coordinator has exited (which it does on that answer).
    Reload,
    /// Relay `state` (sd_notify assignments: `READY=1`, `STATUS=...`) to the init system's
    /// socket, when the keeper was given one ([`crate::sd_notify`]): the keeper is the unit's
    /// main process, the only one systemd listens to.
    SdNotify { state: String },
}

/// From the keeper to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromKeeper {
    /// The service's process exists.
    Spawned { service: usize, pid: i32 },
    /// The service's process could not be started; `error` says why in words.
    SpawnFailed { service: usize, error: String },
    /// The service's main process ended, as `exit` says; the rest of its process group has
    /// been killed, and the process reaped. The keeper keeps the latest exit of each service
    /// until a coordinator acknowledges it ([`ToKeeper::AckExit`]) and sends it again to a
    /// coordinator that takes over, so one already published can come twice: the receiver
    /// keys exits by pid.
    Exited {
        service: usize,
        pid: i32,
        exit: ProcessExit,
    },
    /// The services that run right now, sent to a standby that takes over after the events
    /// queued while nobody listened: (service, pid). It ends the backlog.
    Running { services: Vec<(usize, i32)> },
    /// A standby was started (`pid`), or could not be (`pid` is None).
    StandbySpawned { pid: Option<i32> },
    /// The standby (`pid`) ended.
    StandbyExited { pid: i32 },
    /// The answer to [`ToKeeper::Reload`]: whether the next segment is in place (the
    /// standby of the old one is then dead, and the coordinator exits), or nothing changed.
    ReloadDone { applied: bool },
}

/// Why a message could not be sent or read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the peer has closed the connection")]
    Closed,
    #[error("cannot exchange a message with the peer: {0}")]
    Io(#[from] Errno),
    #[error("the peer sent a message that does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A connected pair of sockets: one end for each side.
pub fn channel() -> Result<(OwnedFd, OwnedFd), Errno> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Messages waiting to go out on a non-blocking socket. A burst (a thousand spawn requests,
/// a thousand exits) can fill the socket's buffer; then the rest waits here, in order, and
/// goes when the socket is writable again. Neither side ever blocks on a send, so the keeper
/// and the coordinator cannot deadlock by each waiting for the other to read.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Vec<u8>>,
}

impl Outbox {
    /// Queues `message` and sends what the socket takes now.
    pub fn push<T: Serialize>(
        &mut self,
        fd: BorrowedFd<'_>,
        message: &T,
    ) -> Result<(), ProtocolError> {
        self.queue.push_back(serde_json::to_vec(message)?);
        self.flush(fd)
    }

    /// Sends queued messages until the socket's buffer is full or the queue is empty.
    pub fn flush(&mut self, fd: BorrowedFd<'_>) -> Result<(), ProtocolError> {
        while let Some(bytes) = self.queue.front() {
            match send(
                fd.as_raw_fd(),
                bytes,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(_) => {
                    self.queue.pop_front();
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(ProtocolError::Closed),
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
        Ok(())
    }

    /// What waits, as encoded (handed across an upgrade's exec).
    pub fn queued(&self) -> Vec<Vec<u8>> {
        self.queue.iter().cloned().collect()
    }

    /// An outbox holding what [`Outbox::queued`] returned.
    pub fn with_queued(queued: Vec<Vec<u8>>) -> Outbox {
        Outbox {
            queue: queued.into(),
        }
    }

    /// Nothing waits: the socket need not be watched for writability.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Takes back what was never sent (the peer went away), decoded.
    pub fn drain_unsent<T: for<'de> Deserialize<'de>>(&mut self) -> Vec<T> {
        self.queue
            .drain(..)
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect()
    }
}

/// Receives one message, blocking unless the socket is non-blocking (then `Ok(None)` when
/// nothing waits). End-of-file is [`ProtocolError::Closed`].
pub fn recv_message<T: for<'de> Deserialize<'de>>(
    fd: BorrowedFd<'_>,
) -> Result<Option<T>, ProtocolError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => return Ok(Some(serde_json::from_slice(&buf[..n])?)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::ECONNRESET) => return Err(ProtocolError::Closed),
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
}

/// Takes ownership of an fd this process was started with on a fixed number (the keeper
/// hands its coordinator fds 3, 4 and 5), marking it close-on-exec so it goes no further.
/// `None` if no such fd is open.
pub fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // F_GETFD on a number that is not open fails with EBADF: nothing to take.
    fcntl_raw_is_open(fd).then(|| {
        // SAFETY: `fd` is open (checked just above) and was placed on this number by our
        // parent for us alone; nothing else in this process has taken it, because this is
        // called once per number at start, before anything opens files that could reuse it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        owned
    })
}

/// Closes every fd from 3 up except `keep`: a daemon must not hold what its caller left open
/// (a terminal's pipe, a test harness's output), or the caller never sees end-of-file.
pub fn close_inherited_fds(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd >= 3).collect();
    keep.sort_unstable();
    let mut first: u32 = 3;
    for &fd in &keep {
        let fd = fd as u32;
        if fd > first {
            close_range(first, fd - 1);
        }
        first = fd + 1;
    }
    close_range(first, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range closes the fds in [first, last], and the callers pass ranges that
    // hold no fd this process still uses: `close_inherited_fds` runs first thing in a new
    // process, before it has opened anything, and leaves out the fds it was handed.
    unsafe {
        libc::close_range(first, last, 0);
    }
}

fn fcntl_raw_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads the descriptor flags of `fd` and changes nothing; an fd number
    // that is not open just returns EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Makes a socket non-blocking, for an event loop.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn messages_cross_and_end_of_file_is_seen() {
        let (a, b) = channel().unwrap();
        let sent = ToKeeper::Signal {
            service: 3,
            pid: 42,
            signal: 15,
        };
        let mut outbox = Outbox::default();
        outbox.push(a.as_fd(), &sent).unwrap();
        outbox.push(a.as_fd(), &ToKeeper::Shutdown).unwrap();
        assert!(outbox.is_empty(), "two small messages fit in the socket");
        assert_eq!(recv_message::<ToKeeper>(b.as_fd()).unwrap(), Some(sent));
        assert_eq!(
            recv_message::<ToKeeper>(b.as_fd()).unwrap(),
            Some(ToKeeper::Shutdown)
        );
        drop(a);
        assert!(matches!(
            recv_message::<ToKeeper>(b.as_fd()),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn an_outbox_holds_a_burst_the_socket_cannot_take_and_loses_nothing() {
        let (a, b) = channel().unwrap();
        set_nonblocking(a.as_fd()).unwrap();
        set_nonblocking(b.as_fd()).unwrap();
        let mut outbox = Outbox::default();
        // Far more than a socket buffer holds, with nobody reading yet.
        for pid in 0..20_000 {
            outbox
                .push(
                    a.as_fd(),
                    &ToKeeper::Signal {
                        service: 1,
                        pid,
                        signal: 15,
                    },
                )
                .unwrap();
        }
        assert!(!outbox.is_empty(), "the burst did not fit in the socket");
        let mut received = Vec::new();
        while received.len() < 20_000 {
            while let Some(m) = recv_message::<ToKeeper>(b.as_fd()).unwrap() {
                received.push(m);
            }
            outbox.flush(a.as_fd()).unwrap();
        }
        assert!(outbox.is_empty());
        for (i, m) in received.iter().enumerate() {
            assert_eq!(
                *m,
                ToKeeper::Signal {
                    service: 1,
                    pid: i as i32,
                    signal: 15
                },
                "in order"
            );
        }
    }
}

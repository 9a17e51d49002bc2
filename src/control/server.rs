//! The coordinator's side of the control socket: accepting, checking who connected, reading
//! one bounded request per connection, and answering, all without ever blocking the event
//! loop; and judging when a request's work is done ([`Pending::judge`]).
//!
//! What a connection may cost the coordinator: the listening socket and every connection are
//! non-blocking and watched by the loop's epoll. A connection is accepted only up to
//! [`MAX_CONNECTIONS`] at once (beyond, it gets a `not-now` line and is closed); its peer's
//! credentials are read at once and a stranger gets a `refused` line and is closed, unread; a
//! served peer has [`READ_DEADLINE`] to send its request line, at most
//! [`protocol::MAX_REQUEST`] bytes, after which it is closed. A reply is one short line written
//! without waiting: a peer whose socket cannot take it (it never reads) is closed. An accept
//! that fails for want of file descriptors leaves the listening socket unwatched for
//! [`ACCEPT_PAUSE`], so a full fd table costs a wakeup per pause, not a spinning loop. A request
//! whose work takes time keeps its connection until the work is done or failed; the peer
//! closing it ends the wait (the work goes on).

use std::collections::HashMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::socket::{getsockopt, sockopt};

use super::protocol::{MAX_REQUEST, Reply, Request, Verb};
use crate::engine::{Engine, Slot, Time};
use crate::vocab::{InstanceState, ServiceState, Want};

/// Connections open at once, at most.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connected peer has to send its request line.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);

/// Connections accepted per wakeup, at most (the level-triggered loop comes back for more
/// after serving its other sources).
const ACCEPT_BATCH: usize = 16;

/// After an accept that failed for want of resources (no fd left: EMFILE, ENFILE, ENOBUFS),
/// the listening socket is left unwatched this long: watched, it would stay readable and
/// spin the loop.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Epoll tokens of connections start here, above the coordinator's own sources.
pub const TOKEN_BASE: u64 = 1 << 32;

/// A request being carried out, kept with its connection until [`Pending::judge`] says how
/// it ended.
#[derive(Clone, Debug)]
pub struct Pending {
    pub verb: Verb,
    /// The services the request acts on (named ones and what the verb adds).
    pub services: Vec<usize>,
    /// When the request was applied.
    pub since: Time,
    /// Per service (same order): its restart count and the pid of its last ended process
    /// when the request was applied, to tell a failure since from an earlier one.
    baseline: Vec<(u32, Option<i32>)>,
}

impl Pending {
    /// A request on `services`, applied at `since` to `engine` (taken before the event).
    pub fn new(verb: Verb, services: Vec<usize>, since: Time, engine: &Engine) -> Pending {
        let slots = engine.slots();
        let baseline = services
            .iter()
            .map(|&s| (slots[s].restarts, slots[s].exited_pid))
            .collect();
        Pending {
            verb,
            services,
            since,
            baseline,
        }
    }

    /// How the request stands: `None` while its work goes on, else the final reply. A stop is
    /// done once every service is down; a start once every one is wanted up and up; a restart
    /// once every one is up with a process started after the request. A service that fails
    /// meanwhile (an exit, a spawn or startup failure: its restart count grew, or it was
    /// given up on) fails a start or restart, and so does the stack stopping or another
    /// request undoing this one.
    pub fn judge(
        &self,
        engine: &Engine,
        why_not_started: &dyn Fn(usize) -> Option<String>,
    ) -> Option<Reply> {
        let slots = engine.slots();
        let ids = &engine.params().services;
        let failed = |s: usize, how: String| {
            Some(Reply::Failed {
                service: ids[s].id.clone(),
                how,
            })
        };
        let stopping = engine.is_finished()
            || matches!(
                engine.phase(),
                InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed
            );
        let down =
            |slot: &Slot| matches!(slot.state(), ServiceState::Stopped | ServiceState::Failed);
        match self.verb {
            // Carried out by the coordinator that accepted it, which then hands over to a
            // successor: the connection ends with it, and the client asks the successor.
            Verb::Reload => None,
            Verb::Stop => {
                if let Some(&s) = self
                    .services
                    .iter()
                    .find(|&&s| slots[s].want != Want::Held && !stopping)
                {
                    return failed(s, "was started again by another request meanwhile".into());
                }
                self.services
                    .iter()
                    .all(|&s| down(&slots[s]))
                    .then_some(Reply::Done)
            }
            Verb::Start | Verb::Restart => {
                if stopping {
                    let s = self.services.first().copied().unwrap_or(0);
                    return failed(s, "did not come up: the whole stack is stopping".into());
                }
                for (&s, &(restarts, exited_pid)) in self.services.iter().zip(&self.baseline) {
                    let slot = &slots[s];
                    let exit = slot
                        .last_exit
                        .filter(|_| slot.exited_pid != exited_pid)
                        .map(|e| e.to_string());
                    let how = || {
                        exit.clone()
                            .or_else(|| why_not_started(s))
                            .unwrap_or_else(|| "failed to start".into())
                    };
                    match slot.want {
                        Want::Held => {
                            return failed(s, "was stopped by another request meanwhile".into());
                        }
                        Want::Down => {
                            return failed(s, format!("{}, and stays down", how()));
                        }
                        Want::Up | Want::Cycling if slot.restarts > restarts => {
                            return failed(
                                s,
                                format!("{} (its restart policy restarts it)", how()),
                            );
                        }
                        Want::Up | Want::Cycling => {}
                    }
                }
                let fresh = |slot: &Slot| {
                    self.verb == Verb::Start || slot.started_at.is_some_and(|t| t >= self.since)
                };
                self.services
                    .iter()
                    .all(|&s| {
                        let slot = &slots[s];
                        slot.want == Want::Up && slot.state() == ServiceState::Up && fresh(slot)
                    })
                    .then_some(Reply::Done)
            }
        }
    }
}

struct Connection {
    stream: UnixStream,
    /// What has been read of the request line.
    read: Vec<u8>,
    /// Until when the request line may come; `None` once it has.
    deadline: Option<Time>,
    /// The request being carried out, once accepted.
    pending: Option<Pending>,
}

/// The listening socket and the connections on it.
pub struct ControlServer {
    listener: UnixListener,
    /// The uid allowed to control besides root: the instance's owner.
    owner: u32,
    connections: HashMap<u64, Connection>,
    next_token: u64,
    /// While accepting is paused after a failed accept: until when.
    paused_until: Option<Time>,
    /// Accepts have been failing since the last that did not: a spell is reported once.
    failing: bool,
}

/// What a readable connection brought.
pub enum Incoming {
    /// Nothing to act on (yet).
    Nothing,
    /// A complete, well-formed request.
    Request(Request),
}

impl ControlServer {
    /// The server on a listening socket the keeper bound and handed down; `owner` is the uid
    /// served besides root.
    pub fn from_inherited(fd: OwnedFd, owner: u32) -> std::io::Result<ControlServer> {
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            owner,
            connections: HashMap::new(),
            next_token: TOKEN_BASE,
            paused_until: None,
            failing: false,
        })
    }

    /// The listening socket, for the loop's epoll.
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Whether `token` is one of this server's connections' epoll tokens.
    pub fn owns(token: u64) -> bool {
        token >= TOKEN_BASE
    }

    /// Accepts what waits (a batch at most): strangers are refused at once, the others are
    /// watched until their request comes or their deadline passes. An accept that fails for
    /// another reason than "nothing waits" (no fd left) stops watching the listening socket
    /// for [`ACCEPT_PAUSE`] (see [`ControlServer::resume_if_due`]); the first failure of a
    /// spell is returned, to be logged, the others are not.
    pub fn accept(&mut self, epoll: &Epoll, now: Time) -> Result<(), std::io::Error> {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.failing = false;
                    return Ok(());
                }
                Err(e) => {
                    let _ = epoll.delete(&self.listener);
                    self.paused_until = Some(now + ACCEPT_PAUSE);
                    let first = !std::mem::replace(&mut self.failing, true);
                    return if first { Err(e) } else { Ok(()) };
                }
            };
            self.failing = false;
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let uid = getsockopt(&stream, sockopt::PeerCredentials).map(|c| c.uid());
            let refusal = match uid {
                Ok(uid) if uid == 0 || uid == self.owner => None,
                Ok(uid) => Some(Reply::Refused {
                    why: format!(
                        "uid {uid} may not control this instance: only its owner (uid {}) and root may",
                        self.owner
                    ),
                }),
                Err(e) => Some(Reply::Refused {
                    why: format!("the caller's credentials cannot be read: {e}"),
                }),
            };
            let refusal = refusal.or_else(|| {
                (self.connections.len() >= MAX_CONNECTIONS).then(|| Reply::NotNow {
                    why: format!("{MAX_CONNECTIONS} requests are already open; try again"),
                })
            });
            if let Some(reply) = refusal {
                let _ = (&stream).write(&reply.to_line());
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
            if epoll.add(&stream, EpollEvent::new(flags, token)).is_err() {
                continue;
            }
            self.connections.insert(
                token,
                Connection {
                    stream,
                    read: Vec::new(),
                    deadline: Some(now + READ_DEADLINE),
                    pending: None,
                },
            );
        }
        Ok(())
    }

    /// Watches the listening socket again once a pause after a failed accept is over;
    /// `token` is the listener's epoll token.
    pub fn resume_if_due(&mut self, epoll: &Epoll, now: Time, token: u64) -> std::io::Result<()> {
        if self.paused_until.is_some_and(|until| until <= now) {
            self.paused_until = None;
            epoll.add(&self.listener, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        }
        Ok(())
    }

    /// Reads what a connection sent. A connection that closed, sent too much, sent more than
    /// one request, or sent a malformed one is answered (if it can be) and closed.
    pub fn read(&mut self, epoll: &Epoll, token: u64) -> Incoming {
        let Some(conn) = self.connections.get_mut(&token) else {
            return Incoming::Nothing;
        };
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match (&conn.stream).read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    conn.read.extend_from_slice(&buf[..n]);
                    if conn.read.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        if conn.pending.is_some() || conn.deadline.is_none() {
            // One request per connection: after it, the peer only waits; its end (or
            // anything it sends) ends the wait.
            if closed || !conn.read.is_empty() {
                self.close(epoll, token);
            }
            return Incoming::Nothing;
        }
        let complete = conn.read.iter().position(|&b| b == b'\n');
        let verdict = match complete {
            Some(end) if end + 1 == conn.read.len() => Request::decode(&conn.read[..end]),
            Some(_) => Err("one request per connection, then wait for the replies".into()),
            None if conn.read.len() >= MAX_REQUEST => Err(format!(
                "a request is one line of at most {MAX_REQUEST} bytes"
            )),
            None if closed => {
                self.close(epoll, token);
                return Incoming::Nothing;
            }
            None => return Incoming::Nothing,
        };
        conn.read.clear();
        conn.deadline = None;
        match verdict {
            Ok(request) => Incoming::Request(request),
            Err(why) => {
                self.answer(epoll, token, &Reply::Bad { why }, None);
                Incoming::Nothing
            }
        }
    }

    /// Writes `reply` on the connection; a final reply closes it, an `accepted` one keeps it
    /// with `pending` until [`ControlServer::settle`] finds the work done.
    pub fn answer(&mut self, epoll: &Epoll, token: u64, reply: &Reply, pending: Option<Pending>) {
        let Some(conn) = self.connections.get_mut(&token) else {
            return;
        };
        let line = reply.to_line();
        // A fresh socket's buffer takes a short line whole; one that does not is a peer that
        // stopped reading: closed.
        let written = (&conn.stream).write(&line).is_ok_and(|n| n == line.len());
        if !written || reply.is_final() {
            self.close(epoll, token);
        } else {
            conn.pending = pending;
        }
    }

    /// Answers every waiting request whose work is done or failed.
    pub fn settle(&mut self, epoll: &Epoll, judge: impl Fn(&Pending) -> Option<Reply>) {
        let finished: Vec<(u64, Reply)> = self
            .connections
            .iter()
            .filter_map(|(&token, conn)| {
                let reply = judge(conn.pending.as_ref()?)?;
                Some((token, reply))
            })
            .collect();
        for (token, reply) in finished {
            self.answer(epoll, token, &reply, None);
        }
    }

    /// The earliest request-line deadline (or the end of an accept pause), for the loop's
    /// timer.
    pub fn next_deadline(&self) -> Option<Time> {
        self.connections
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.paused_until)
            .min()
    }

    /// Closes the connections whose request line did not come in time.
    pub fn expire(&mut self, epoll: &Epoll, now: Time) {
        let late: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&t, _)| t)
            .collect();
        for token in late {
            self.close(epoll, token);
        }
    }

    fn close(&mut self, epoll: &Epoll, token: u64) {
        if let Some(conn) = self.connections.remove(&token) {
            let _ = epoll.delete(&conn.stream);
        }
    }
}

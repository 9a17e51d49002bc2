//! ccmgr's own word to the init system that started it: systemd's sd_notify protocol, sent,
//! not received.
//!
//! Not to be confused with [`crate::notify`], the socket ccmgr *runs* for its services (it
//! sets `NOTIFY_SOCKET` for them to its own `<run_dir>/<instance>.notify`). This module owns
//! the other direction: when `ccmgr start --foreground` runs as a `Type=notify` unit, systemd
//! puts its own socket in `$NOTIFY_SOCKET`; ccmgr reads it once at startup ([`SdNotifier::
//! from_env`]), never hands it on (services get a clean environment with ccmgr's socket,
//! coordinators are started without it), and tells systemd:
//!
//! - `STATUS=` lines while starting, running, recovering and stopping ("starting: 12 of 40
//!   up", "recovering: web starting, 39 of 40 up");
//! - `READY=1` once the whole stack is up (the instance is steady), and again after a reload;
//! - `RELOADING=1` (with `MONOTONIC_USEC=`, as systemd wants since `Type=notify-reload`) when
//!   a reload begins;
//! - `STOPPING=1` when the stack begins to stop.
//!
//! Who sends: only the keeper, the unit's main process (so the unit keeps systemd's default
//! `NotifyAccess=main`, and no service, whatever user it runs as, can send systemd a
//! `READY=1` or `STOPPING=1` of its own). The coordinator knows the states: it composes the
//! messages ([`Announcer`]) and hands them to the keeper over their socket pair
//! (`ToKeeper::SdNotify`), which relays them verbatim. A standby that takes over is started by
//! the same keeper and relays through it the same way, so `STATUS=` goes on across takeovers.
//! The keeper tells the coordinators that someone listens through [`LISTENING_ENV`], so that
//! without systemd no message is composed or sent at all.
//!
//! The sender is a small one (no libsystemd): an unbound Unix datagram socket, one datagram
//! per message, to a path or to an abstract address (`@name`). The keeper never sends itself:
//! a Unix datagram socket holds only a few datagrams (`net.unix.max_dgram_qlen`, 10 by
//! default) before a send blocks, and an init system busy elsewhere must not stall the loop
//! that spawns and reaps services (measured: a listener that did not read for a while made
//! a 200-service startup take 90 s instead of 1 s with sends that waited). So the keeper hands
//! each message to a thread of its own ([`SdRelay`]), which sends, waits when it must, and
//! folds what piled up meanwhile into one message ([`coalesce`]).

use std::ffi::{OsStr, OsString};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::vocab::{InstanceState, ServiceState};

/// The variable systemd names its socket in.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Set (to `1`) by the keeper for the coordinators it starts when it has an init system's
/// socket to relay to: they compose messages only then.
pub const LISTENING_ENV: &str = "CCMGR_INIT_NOTIFY";

/// How long one send waits for room in the init system's socket before the relay folds in
/// what came meanwhile and tries again (and, once the keeper is done, how long its last
/// message may take).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the init system could not be told.
#[derive(Debug, thiserror::Error)]
pub enum SdNotifyError {
    #[error(
        "$NOTIFY_SOCKET ({0:?}) is neither a path nor an abstract address (@name): ccmgr cannot tell the init system it is ready"
    )]
    Unsupported(OsString),
    #[error("cannot make a socket to tell the init system ({0:?}) how ccmgr is: {1}")]
    Socket(OsString, #[source] std::io::Error),
    #[error("cannot send {what:?} to the init system's socket {to:?}: {source}")]
    Send {
        what: String,
        to: OsString,
        #[source]
        source: std::io::Error,
    },
}

/// An init system's notify socket, to send ccmgr's own state to.
#[derive(Debug)]
pub struct SdNotifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for messages.
    name: OsString,
}

impl SdNotifier {
    /// The socket `$NOTIFY_SOCKET` names, if it is set and not empty.
    pub fn from_env() -> Option<Result<Self, SdNotifyError>> {
        std::env::var_os(NOTIFY_SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(|v| Self::new(&v))
    }

    /// The socket at `name`: a path (`/run/systemd/notify`), or an abstract address when it
    /// begins with `@` (the rest is the name, as systemd and libsystemd read it).
    pub fn new(name: &OsStr) -> Result<Self, SdNotifyError> {
        let bytes = name.as_bytes();
        let address = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => SocketAddr::from_pathname(name),
            _ => return Err(SdNotifyError::Unsupported(name.to_owned())),
        }
        .map_err(|e| SdNotifyError::Socket(name.to_owned(), e))?;
        let socket =
            UnixDatagram::unbound().map_err(|e| SdNotifyError::Socket(name.to_owned(), e))?;
        socket
            .set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(|e| SdNotifyError::Socket(name.to_owned(), e))?;
        Ok(SdNotifier {
            socket,
            address,
            name: name.to_owned(),
        })
    }

    /// Sends one message: newline-separated `KEY=value` assignments, as one datagram.
    pub fn send(&self, state: &str) -> Result<(), SdNotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.address)
            .map(|_| ())
            .map_err(|source| SdNotifyError::Send {
                what: state.to_owned(),
                to: self.name.clone(),
                source,
            })
    }
}

/// The keeper's relay to the init system: [`SdRelay::send`] never blocks; a thread of its own
/// sends, in order, folding a backlog into one message.
#[derive(Debug)]
pub struct SdRelay {
    queue: Option<std::sync::mpsc::Sender<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SdRelay {
    /// Starts the relay's thread. (Started after the keeper blocked its signals: the thread
    /// inherits the mask, so no signal meant for the signalfd can land on it.)
    pub fn start(notifier: SdNotifier) -> std::io::Result<SdRelay> {
        let (queue, incoming) = std::sync::mpsc::channel::<String>();
        let thread = std::thread::Builder::new()
            .name("sd-notify".into())
            .stack_size(64 * 1024)
            .spawn(move || relay(&notifier, &incoming))?;
        Ok(SdRelay {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `state` for the init system.
    pub fn send(&self, state: &str) {
        if let Some(queue) = &self.queue {
            let _ = queue.send(state.to_owned());
        }
    }

    /// Sends what is queued (waiting at most [`SEND_TIMEOUT`] for room), then ends the thread.
    pub fn finish(mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The relay thread: one message at a time; a backlog (the init system read nothing for a
/// while) is folded into one. Ends once the keeper dropped its end and all is sent (or the
/// last try failed).
fn relay(notifier: &SdNotifier, incoming: &std::sync::mpsc::Receiver<String>) {
    let mut unsent: Option<String> = None;
    let mut warned = false;
    // The socket refused a message (no listener, not a datagram socket...): said once, until
    // a send succeeds again. A bogus `$NOTIFY_SOCKET` must not fill ccmgr's log with one
    // warning per state change.
    let mut refused = false;
    loop {
        let first = match unsent.take() {
            Some(message) => message,
            None => match incoming.recv() {
                Ok(message) => message,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        batch.extend(incoming.try_iter());
        let message = coalesce(&batch);
        match notifier.send(&message) {
            Ok(()) => {
                warned = false;
                if std::mem::take(&mut refused) {
                    tracing::info!(
                        "the init system's notify socket {:?} takes ccmgr's messages again",
                        notifier.name
                    );
                }
            }
            Err(SdNotifyError::Send { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(
                        "the init system reads nothing from its notify socket: ccmgr's messages wait, folded into one"
                    );
                }
                // Once the keeper is done, the last try was the last.
                let keeper_done = matches!(
                    incoming.try_recv(),
                    Err(std::sync::mpsc::TryRecvError::Disconnected)
                );
                if !keeper_done {
                    unsent = Some(message);
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut refused, true) {
                    tracing::warn!(
                        "{e}; the stack runs on, and ccmgr says no more of it until a message gets through"
                    );
                }
            }
        }
    }
}

/// Several messages as one with the same effect: the last `STATUS=`; `STOPPING=1` if any
/// said it; of `READY=1` and `RELOADING=1` only the later (systemd reads `READY=1` before
/// `RELOADING=1` within one message, so both in one would leave it reloading), with its
/// `MONOTONIC_USEC=`.
pub fn coalesce(batch: &[String]) -> String {
    if let [one] = batch {
        return one.clone();
    }
    let mut status = None;
    let mut stopping = false;
    // The later of READY=1 and RELOADING=1 (with its MONOTONIC_USEC=).
    let mut readiness: Option<Vec<&str>> = None;
    for message in batch {
        let lines: Vec<&str> = message.lines().collect();
        for line in &lines {
            if line.starts_with("STATUS=") {
                status = Some(*line);
            } else if *line == "STOPPING=1" {
                stopping = true;
            } else if *line == "READY=1" {
                readiness = Some(vec![line]);
            } else if *line == "RELOADING=1" {
                let usec = lines.iter().find(|l| l.starts_with("MONOTONIC_USEC="));
                readiness = Some([line].into_iter().chain(usec).copied().collect());
            }
        }
    }
    let mut out: Vec<&str> = Vec::new();
    if stopping {
        out.push("STOPPING=1");
    } else if let Some(lines) = readiness {
        out.extend(lines);
    }
    out.extend(status);
    out.join("\n")
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd asks for beside it (CLOCK_MONOTONIC, in
/// microseconds, as systemd reads its own clock).
pub fn reloading_message() -> String {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0);
    format!("RELOADING=1\nMONOTONIC_USEC={now}")
}

/// What the stack is, as far as the `STATUS=` line and the readiness go.
#[derive(Clone, Copy, Debug)]
pub struct StackView<'a> {
    pub phase: InstanceState,
    /// Services up, out of `total`.
    pub up: usize,
    pub total: usize,
    /// A service that is not up, and its state: the one the line names while recovering.
    pub trouble: Option<(&'a str, ServiceState)>,
    /// A reload is under way (begun here, or left by a predecessor for a successor).
    pub reloading: bool,
}

/// The `STATUS=` text for `view`.
pub fn status_line(view: &StackView<'_>) -> String {
    let StackView {
        phase,
        up,
        total,
        trouble,
        reloading,
    } = *view;
    let counts = format!("{up} of {total} up");
    match phase {
        _ if reloading && matches!(phase, InstanceState::Steady | InstanceState::Recovery) => {
            format!("reloading: {counts}")
        }
        InstanceState::Initializing => match trouble {
            Some((id, state)) => format!("starting: {counts}, {id} {state}"),
            None => format!("starting: {counts}"),
        },
        InstanceState::Steady => format!("running: {counts}"),
        InstanceState::Recovery => match trouble {
            Some((id, ServiceState::Starting | ServiceState::Stopped)) => {
                format!("recovering: {id} restarting, {counts}")
            }
            Some((id, state)) => format!("recovering: {id} {state}, {counts}"),
            None => format!("recovering: {counts}"),
        },
        InstanceState::Stopping => format!("stopping: {up} of {total} still up"),
        InstanceState::Stopped => "stopped".to_owned(),
        InstanceState::Failed => "failed: the stack was stopped".to_owned(),
    }
}

/// Turns the stack's successive states into the messages the init system must get: each
/// transition once (`READY=1`, `RELOADING=1`, `STOPPING=1`) and a `STATUS=` line when it
/// changes. A coordinator holds one; a successor's fresh one says `READY=1` again once the
/// stack is steady, which systemd takes as a no-op when it was ready already.
#[derive(Debug, Default)]
pub struct Announcer {
    ready: bool,
    reloading: bool,
    stopping: bool,
    last_status: String,
}

impl Announcer {
    /// A successor finishing a reload its predecessor began (and announced with
    /// `RELOADING=1`): the reload goes on until the stack is steady, then `READY=1`.
    pub fn continue_reload(&mut self) {
        self.reloading = true;
    }

    /// The message to send for `view`, if anything changed.
    pub fn update(&mut self, view: &StackView<'_>) -> Option<String> {
        let mut lines: Vec<String> = Vec::new();
        let ending = matches!(
            view.phase,
            InstanceState::Stopping | InstanceState::Stopped | InstanceState::Failed
        );
        if ending {
            if !self.stopping {
                self.stopping = true;
                lines.push("STOPPING=1".to_owned());
            }
        } else if view.reloading {
            if !self.reloading {
                self.reloading = true;
                self.ready = false;
                lines.push(reloading_message());
            }
        } else if view.phase == InstanceState::Steady && !self.ready {
            self.ready = true;
            self.reloading = false;
            lines.push("READY=1".to_owned());
        }
        let status = status_line(&StackView {
            reloading: view.reloading || (self.reloading && !self.ready),
            ..*view
        });
        if status != self.last_status {
            lines.push(format!("STATUS={status}"));
            self.last_status = status;
        }
        (!lines.is_empty()).then(|| lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: InstanceState, up: usize, reloading: bool) -> StackView<'static> {
        StackView {
            phase,
            up,
            total: 3,
            trouble: None,
            reloading,
        }
    }

    #[test]
    fn ready_only_once_steady_and_again_after_a_reload() {
        let mut a = Announcer::default();
        assert_eq!(
            a.update(&view(InstanceState::Initializing, 1, false))
                .as_deref(),
            Some("STATUS=starting: 1 of 3 up")
        );
        assert_eq!(a.update(&view(InstanceState::Initializing, 1, false)), None);
        assert_eq!(
            a.update(&view(InstanceState::Steady, 3, false)).as_deref(),
            Some("READY=1\nSTATUS=running: 3 of 3 up")
        );
        let reload = a.update(&view(InstanceState::Recovery, 2, true)).unwrap();
        assert!(
            reload.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reload}"
        );
        assert!(reload.ends_with("STATUS=reloading: 2 of 3 up"), "{reload}");
        assert_eq!(
            a.update(&view(InstanceState::Steady, 3, false)).as_deref(),
            Some("READY=1\nSTATUS=running: 3 of 3 up")
        );
        assert_eq!(
            a.update(&view(InstanceState::Stopping, 2, false))
                .as_deref(),
            Some("STOPPING=1\nSTATUS=stopping: 2 of 3 still up")
        );
        // Stopping is said once; READY=1 never again.
        assert_eq!(
            a.update(&view(InstanceState::Stopped, 0, false)).as_deref(),
            Some("STATUS=stopped")
        );
    }

    #[test]
    fn a_successor_finishing_a_reload_says_reloading_then_ready() {
        let mut a = Announcer::default();
        a.continue_reload();
        assert_eq!(
            a.update(&view(InstanceState::Recovery, 2, false))
                .as_deref(),
            Some("STATUS=reloading: 2 of 3 up")
        );
        assert_eq!(
            a.update(&view(InstanceState::Steady, 3, false)).as_deref(),
            Some("READY=1\nSTATUS=running: 3 of 3 up")
        );
    }

    #[test]
    fn a_backlog_folds_into_one_message_with_the_same_effect() {
        let m = |s: &str| s.to_owned();
        assert_eq!(
            coalesce(&[
                m("STATUS=starting: 1 of 3 up"),
                m("READY=1\nSTATUS=running: 3 of 3 up"),
            ]),
            "READY=1\nSTATUS=running: 3 of 3 up"
        );
        // A reload that began and ended while nothing was read: only READY=1.
        assert_eq!(
            coalesce(&[
                m("RELOADING=1\nMONOTONIC_USEC=7\nSTATUS=reloading: 2 of 3 up"),
                m("READY=1\nSTATUS=running: 3 of 3 up"),
            ]),
            "READY=1\nSTATUS=running: 3 of 3 up"
        );
        assert_eq!(
            coalesce(&[
                m("READY=1\nSTATUS=running: 3 of 3 up"),
                m("RELOADING=1\nMONOTONIC_USEC=7\nSTATUS=reloading: 2 of 3 up"),
            ]),
            "RELOADING=1\nMONOTONIC_USEC=7\nSTATUS=reloading: 2 of 3 up"
        );
        assert_eq!(
            coalesce(&[
                m("READY=1"),
                m("STOPPING=1\nSTATUS=stopping: 2 of 3 still up"),
                m("STATUS=stopped"),
            ]),
            "STOPPING=1\nSTATUS=stopped"
        );
    }

    #[test]
    fn recovery_names_the_service() {
        let v = StackView {
            phase: InstanceState::Recovery,
            up: 39,
            total: 40,
            trouble: Some(("web", ServiceState::Starting)),
            reloading: false,
        };
        assert_eq!(status_line(&v), "recovering: web restarting, 39 of 40 up");
    }

    #[test]
    fn addresses_path_and_abstract_and_refuses_others() {
        assert!(SdNotifier::new(OsStr::new("/run/systemd/notify")).is_ok());
        assert!(SdNotifier::new(OsStr::new("@ccmgr/test")).is_ok());
        assert!(matches!(
            SdNotifier::new(OsStr::new("vsock:2:999")),
            Err(SdNotifyError::Unsupported(_))
        ));
    }

    #[test]
    fn sends_to_an_abstract_address() {
        let name = format!("ccmgr-sd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = SdNotifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.send("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}

//! The service API: the library a service links to take part in ccmgr's cooperative
//! protocol (the original design's "alive" and "ready" APIs and its orderly shutdown), in Rust
//! here and as a C ABI in the `ccmgr-capi` crate (`include/ccmgr.h`).
//!
//! ```no_run
//! use ccmgr::service;
//!
//! let args: Vec<String> = std::env::args().collect();
//! if service::invoked_with_cc(&args) {
//!     // FIG. 6: started by ccmgr with `cc_arg = true`: register, and terminate on error.
//!     let alive = service::alive(|shutdown| {
//!         eprintln!("{} stopping: {:?}", shutdown.service, shutdown.reason);
//!         // ... stop the work; this runs on the API's thread, in shutdown order.
//!     })
//!     .unwrap_or_else(|e| {
//!         eprintln!("{e}");
//!         std::process::exit(1)
//!     });
//!     // ... initialise ...
//!     alive.ready().unwrap_or_else(|e| {
//!         eprintln!("{e}");
//!         std::process::exit(1)
//!     });
//! }
//! ```
//!
//! # What the calls do
//! - [`alive`] (or [`Registration::alive`]) reads `CCMGR_RUN_DIR`, `CCMGR_INSTANCE` and
//!   `CCMGR_SERVICE`, checks that the run directory is its owner's alone (the owner of the
//!   instance), opens the instance's control segment read-only and its API file there, finds the service's index by
//!   id, and starts **one** background thread (`ccmgr-api`), which takes the service's
//!   component lock (held for the process's life; a crashed predecessor's lock was released
//!   by the kernel) and then runs the shutdown protocol. It returns once the lock is held, or
//!   fails after the registration timeout.
//! - [`Alive::ready`] writes "ready" in the API file for the services' own bookkeeping and
//!   sends `READY=1` to `$NOTIFY_SOCKET`, where the kernel vouches for the sender's pid: that
//!   is how the coordinator learns it (services with `ready = "cc"`).
//! - The shutdown callback runs once, on the API thread, when it is this service's turn. It
//!   should make the service stop (or exit); the library never exits the process.
//!
//! # Security model
//! Services may run as other users than the coordinator. They never open the coordinator's
//! main segment (mode 0600). They map the control segment (0644, written only by the
//! coordinator) read-only, and every decision below is taken from it: whether the coordinator
//! asked this service to shut down (an epoch it bumps before releasing the daemon component),
//! whether the coordinator died (the kernel marks the daemon component word), the takeover
//! mode and the order. So a service cannot forge a shutdown request, nor the coordinator's
//! death, for the others. The API file (0666) holds only the component locks (kernel-kept
//! byte-range locks) and state words that feed logs; the coordinator never reads it to decide
//! anything, and nothing in it can make a process crash or write anywhere. See
//! [`crate::shm::api`] for the files and why pthread robust mutexes are not used there.
//!
//! # The shutdown protocol (the original design's FIG. 12, without polling)
//! The API thread only ever sleeps in the kernel: on the daemon component word or the
//! coordinator epoch (`FUTEX_WAIT`, through the read-only mapping), or on another service's
//! component lock (`F_OFD_SETLKW`). In a loop, it reads the coordinator epoch, then the daemon
//! component word (acquire), and:
//! 1. **Held** (a thread id in the word): sleep until the word changes. While it sleeps, the
//!    word is the thread's pending robust-futex entry, so if the kernel's single wake-up at the
//!    coordinator's death reaches this thread and it dies before passing it on, the kernel
//!    passes it on.
//! 2. **Holder died** (no owner, `FUTEX_OWNER_DIED`): wake every other sleeper (the kernel woke
//!    one). Under `takeover = "restart"` this is a shutdown of every service: go to 4. Under
//!    `"adopt"` it is not: sleep until the coordinator epoch differs from the one read before
//!    the word; a new coordinator bumps it only after it holds the word, so the loop then
//!    finds the word held and sleeps on it. Services never lock the word, so there is no race
//!    with the standby's take, and no interleaving in which a service spins on a free word or
//!    shuts down: the only way out of adopt-mode waiting is a changed epoch.
//! 3. **Released deliberately** (no owner, no `FUTEX_OWNER_DIED`): if the shutdown epoch is
//!    not 0 and this service's asked epoch equals it, this is a request: go to 4. Otherwise
//!    (a failure sequence that stops other services, or no coordinator yet) sleep until the
//!    coordinator epoch changes, as in 2. A coordinator re-takes the word only after every
//!    asked service is down, so a release cannot be missed by an asked service that is alive.
//! 4. **Take turns**: wait until every service before this one in the shutdown sequence that
//!    this shutdown concerns (the ones asked in the same epoch; after a coordinator's death,
//!    all) has released its component lock (its callback returned) or died: block on the
//!    nearest one's lock, then check the others with one lock query per run of consecutive
//!    positions, blocking on any still held (only possible if one died before its turn). A
//!    service not registered with the API holds no lock and counts as done (the coordinator
//!    stops it with signals). Then run the callback, write "done", and release this
//!    service's component lock.
//!
//! No step holds anything another service needs except the service's own component lock, and
//! a service waits only for services *before* it in the sequence, so the waits form a chain
//! that ends at the first service: no deadlock. (The original design passed the daemon
//! component mutex from service to service; here every service sees the release at once and
//! the order is kept by the component locks alone, so no service's turn depends on another
//! one being scheduled to pass a mutex on.)

mod protocol;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use crate::shm::api::{ApiError, ApiFile, ApiState, ControlView};

pub use crate::notify::NOTIFY_SOCKET_ENV;
pub use crate::spawn::CC_ARG;

/// The environment variable naming the instance (set by ccmgr for every service).
pub const INSTANCE_ENV: &str = "CCMGR_INSTANCE";
/// The environment variable naming the instance's `run_dir`, where the control segment and
/// the API file are (set by ccmgr for every service).
pub const RUN_DIR_ENV: &str = "CCMGR_RUN_DIR";
/// The environment variable naming the service's id (set by ccmgr for every service).
pub const SERVICE_ENV: &str = "CCMGR_SERVICE";
/// How long [`Registration::alive`] waits for the service's component lock by default.
pub const DEFAULT_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);

/// True if the first argument after the program name is `-cc` ([`CC_ARG`]): the original
/// design's sign that the service was started by ccmgr and should register (FIG. 6).
pub fn invoked_with_cc<I, S>(args: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter()
        .nth(1)
        .is_some_and(|a| a.as_ref() == OsStr::new(CC_ARG))
}

/// Why the shutdown callback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The coordinator asked this service to shut down (a stop, or a failure sequence), in
    /// this shutdown epoch.
    Requested {
        /// The epoch of the request.
        epoch: u32,
    },
    /// The coordinator died and the takeover mode is `restart`.
    CoordinatorDied,
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShutdownReason::Requested { epoch } => write!(f, "requested (epoch {epoch})"),
            ShutdownReason::CoordinatorDied => f.write_str("the coordinator died"),
        }
    }
}

/// What the shutdown callback is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// Why.
    pub reason: ShutdownReason,
    /// This service's id.
    pub service: String,
    /// This service's place in the shutdown sequence, from 0.
    pub position: usize,
}

/// Errors of the service API. Each is a sentence for the service's log.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// An environment variable ccmgr sets is missing.
    #[error("{var} is not set: this process was not started by ccmgr as a service")]
    MissingEnv {
        /// The variable.
        var: &'static str,
    },
    /// An environment variable is not Unicode.
    #[error("{var} is not valid Unicode")]
    BadEnv {
        /// The variable.
        var: &'static str,
    },
    /// Opening or using the instance's files failed.
    #[error(transparent)]
    Segment(#[from] ApiError),
    /// `alive` was called twice in one process.
    #[error(
        "this process is already registered with ccmgr as service {service} of instance {instance}"
    )]
    AlreadyRegistered {
        /// The instance.
        instance: String,
        /// The service it registered as.
        service: String,
    },
    /// The component lock stayed held by another process.
    #[error(
        "another process holds the component lock of service {service} of instance {instance} \
         (an earlier instance of the service is still running, or something else holds it); \
         gave up after {waited:?}"
    )]
    ComponentHeld {
        /// The instance.
        instance: String,
        /// The service.
        service: String,
        /// How long `alive` waited.
        waited: Duration,
    },
    /// The API thread could not be started.
    #[error("cannot start the service API's thread: {0}")]
    Thread(#[source] io::Error),
    /// The API thread ended before it answered.
    #[error("the service API's thread for service {service} ended unexpectedly")]
    ThreadGone {
        /// The service.
        service: String,
    },
    /// `READY=1` could not be sent.
    #[error("cannot send READY=1 to the notify socket {}: {source}", path.to_string_lossy())]
    Notify {
        /// The value of `$NOTIFY_SOCKET`.
        path: OsString,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `ready` after the shutdown callback ran.
    #[error("service {service} has already shut down")]
    AlreadyShutDown {
        /// The service.
        service: String,
    },
    /// `ready` before `alive`.
    #[error("this process has not registered with ccmgr: call alive first")]
    NotRegistered,
}

/// Where and as what to register: the instance's run directory, the instance, the service id
/// and the notify socket, from the environment ccmgr gives every service or given explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    run_dir: std::path::PathBuf,
    instance: String,
    service: String,
    notify_socket: Option<OsString>,
    timeout: Duration,
}

fn env_var(var: &'static str) -> Result<String, ServiceError> {
    match std::env::var(var) {
        Ok(v) => Ok(v),
        Err(std::env::VarError::NotPresent) => Err(ServiceError::MissingEnv { var }),
        Err(std::env::VarError::NotUnicode(_)) => Err(ServiceError::BadEnv { var }),
    }
}

impl Registration {
    /// From `CCMGR_RUN_DIR`, `CCMGR_INSTANCE`, `CCMGR_SERVICE` and `NOTIFY_SOCKET` (the last
    /// may be unset: [`Alive::ready`] then only records readiness in the API file).
    pub fn from_env() -> Result<Registration, ServiceError> {
        Ok(Registration {
            run_dir: std::env::var_os(RUN_DIR_ENV)
                .filter(|v| !v.is_empty())
                .ok_or(ServiceError::MissingEnv { var: RUN_DIR_ENV })?
                .into(),
            instance: env_var(INSTANCE_ENV)?,
            service: env_var(SERVICE_ENV)?,
            notify_socket: std::env::var_os(NOTIFY_SOCKET_ENV).filter(|v| !v.is_empty()),
            timeout: DEFAULT_REGISTRATION_TIMEOUT,
        })
    }

    /// Service `service` of instance `instance`, whose files are in `run_dir`, with no notify
    /// socket.
    pub fn new(
        run_dir: impl Into<std::path::PathBuf>,
        instance: impl Into<String>,
        service: impl Into<String>,
    ) -> Registration {
        Registration {
            run_dir: run_dir.into(),
            instance: instance.into(),
            service: service.into(),
            notify_socket: None,
            timeout: DEFAULT_REGISTRATION_TIMEOUT,
        }
    }

    /// Send `READY=1` to this socket (a path, or `@name` for an abstract address).
    pub fn with_notify_socket(mut self, socket: Option<OsString>) -> Registration {
        self.notify_socket = socket;
        self
    }

    /// Wait at most this long for the component lock (default
    /// [`DEFAULT_REGISTRATION_TIMEOUT`]).
    pub fn with_registration_timeout(mut self, timeout: Duration) -> Registration {
        self.timeout = timeout;
        self
    }

    /// The instance.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The service id.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Register: the original design's "alive" API. See the module documentation. At most
    /// one registration per process.
    pub fn alive<F>(self, on_shutdown: F) -> Result<Alive, ServiceError>
    where
        F: FnOnce(Shutdown) + Send + 'static,
    {
        let mut slot = PROCESS_REGISTRATION
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = slot.as_ref() {
            return Err(ServiceError::AlreadyRegistered {
                instance: existing.inner.instance.clone(),
                service: existing.inner.service.clone(),
            });
        }
        let (ctl, run_dir, owner) = ControlView::open(&self.run_dir, &self.instance)?;
        let index = ctl
            .index_of(&self.service)
            .ok_or_else(|| ApiError::NoSuchService {
                instance: self.instance.clone(),
                service: self.service.clone(),
            })?;
        let api = Arc::new(ApiFile::open(
            &run_dir,
            &self.instance,
            owner,
            ctl.service_count(),
        )?);
        let inner = Arc::new(Inner {
            instance: self.instance.clone(),
            service: self.service.clone(),
            index,
            api: Arc::clone(&api),
            notify_socket: self.notify_socket.clone(),
            shut_down: AtomicBool::new(false),
        });
        let phase = Arc::new(Mutex::new(protocol::Phase::Registering));
        let (report, registered) = mpsc::sync_channel(1);
        let thread = protocol::ApiThread {
            ctl,
            api,
            index,
            inner: Arc::clone(&inner),
            phase: Arc::clone(&phase),
            report,
        };
        let callback: Box<dyn FnOnce(Shutdown) + Send> = Box::new(on_shutdown);
        std::thread::Builder::new()
            .name("ccmgr-api".into())
            .spawn(move || thread.run(callback))
            .map_err(ServiceError::Thread)?;
        let answer = match registered.recv_timeout(self.timeout) {
            Ok(answer) => answer,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let mut p = phase.lock().unwrap_or_else(PoisonError::into_inner);
                if *p == protocol::Phase::Registered {
                    // It got the lock just now; its answer is on the way.
                    drop(p);
                    registered.recv().map_err(|_| ServiceError::ThreadGone {
                        service: self.service.clone(),
                    })?
                } else {
                    // The thread lets the lock go if it ever gets it.
                    *p = protocol::Phase::Cancelled;
                    return Err(ServiceError::ComponentHeld {
                        instance: self.instance,
                        service: self.service,
                        waited: self.timeout,
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ServiceError::ThreadGone {
                    service: self.service,
                });
            }
        };
        answer?;
        let alive = Alive { inner };
        *slot = Some(alive.clone());
        Ok(alive)
    }
}

/// The process's registration, once [`alive`] succeeded.
static PROCESS_REGISTRATION: Mutex<Option<Alive>> = Mutex::new(None);

/// Register with ccmgr as the service the environment names: `Registration::from_env()`
/// then [`Registration::alive`].
pub fn alive<F>(on_shutdown: F) -> Result<Alive, ServiceError>
where
    F: FnOnce(Shutdown) + Send + 'static,
{
    Registration::from_env()?.alive(on_shutdown)
}

/// [`Alive::ready`] for this process's registration.
pub fn ready() -> Result<(), ServiceError> {
    registration().ok_or(ServiceError::NotRegistered)?.ready()
}

/// This process's registration, if [`alive`] succeeded.
pub fn registration() -> Option<Alive> {
    PROCESS_REGISTRATION
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

struct Inner {
    instance: String,
    service: String,
    index: usize,
    api: Arc<ApiFile>,
    notify_socket: Option<OsString>,
    shut_down: AtomicBool,
}

/// A registered service: the handle [`alive`] returns. Cheap to clone. Dropping it changes
/// nothing: the registration lasts as long as the process (or until its shutdown callback has
/// run).
#[derive(Clone)]
pub struct Alive {
    inner: Arc<Inner>,
}

impl fmt::Debug for Alive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alive")
            .field("instance", &self.inner.instance)
            .field("service", &self.inner.service)
            .field("index", &self.inner.index)
            .finish()
    }
}

impl Alive {
    /// Say that initialisation is done: the original design's "ready" API. Writes "ready" in
    /// the API file and sends `READY=1` to `$NOTIFY_SOCKET` (bounded: a socket that accepts
    /// nothing for 5 s is an error).
    pub fn ready(&self) -> Result<(), ServiceError> {
        if self.inner.shut_down.load(Ordering::Acquire) {
            return Err(ServiceError::AlreadyShutDown {
                service: self.inner.service.clone(),
            });
        }
        self.inner
            .api
            .write_state(self.inner.index, ApiState::Ready, 0)?;
        if let Some(path) = &self.inner.notify_socket {
            send_ready(path).map_err(|source| ServiceError::Notify {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The instance.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// The service id.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The service's index in the instance.
    pub fn index(&self) -> usize {
        self.inner.index
    }

    /// True once the shutdown callback has returned.
    pub fn has_shut_down(&self) -> bool {
        self.inner.shut_down.load(Ordering::Acquire)
    }
}

/// Send `READY=1` to the sd_notify socket at `path` (`@name`: abstract).
fn send_ready(path: &OsStr) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    const MESSAGE: &[u8] = b"READY=1";
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(Duration::from_secs(5)))?;
    let bytes = path.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => socket.send_to_addr(MESSAGE, &SocketAddr::from_abstract_name(name)?)?,
        None => socket.send_to(MESSAGE, path)?,
    };
    if sent != MESSAGE.len() {
        return Err(io::Error::other("the datagram was cut short"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cc_is_the_first_argument_only() {
        assert!(invoked_with_cc(["svc", "-cc"]));
        assert!(invoked_with_cc(["svc", "-cc", "--port", "80"]));
        assert!(!invoked_with_cc(["svc"]));
        assert!(!invoked_with_cc(["svc", "--port", "-cc"]));
        assert!(!invoked_with_cc(["-cc"]));
        assert!(!invoked_with_cc(Vec::<String>::new()));
    }

    #[test]
    fn missing_instance_is_a_sentence() {
        let dir = tempfile::tempdir().unwrap();
        let e = Registration::new(dir.path(), "no-such-instance-xyz", "web")
            .alive(|_| {})
            .unwrap_err();
        let ctl = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("no-such-instance-xyz.ctl");
        assert_eq!(
            e.to_string(),
            format!(
                "ccmgr is not running instance no-such-instance-xyz, or this service was not \
                 started by it ({} does not exist)",
                ctl.display()
            )
        );
    }

    #[test]
    fn ready_sends_ready_1_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = crate::notify::NotifySocket::bind(&path).unwrap();
        send_ready(path.as_os_str()).unwrap();
        let msg = socket.recv().unwrap().expect("a datagram");
        assert!(msg.is_ready());
        assert_eq!(msg.pid, std::process::id() as i32);
    }
}

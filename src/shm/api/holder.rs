//! The coordinator's hold on the daemon component word ([`DaemonComponentHolder`]): a
//! dedicated thread whose kernel robust list names the word, so that the word is held exactly
//! as long as that thread lives, and the take, release-for-shutdown and retake steps, all
//! performed on that thread. Apart because it is the one place that writes the word and
//! reasons about the kernel's robust-futex handling at a thread's death.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::{ApiError, ControlSegment};
use crate::process_identity::ProcessIdentity;
use crate::shm::mapping::RobustPending;
use crate::shm::robust::{
    Deadline, FUTEX_OWNER_DIED, FUTEX_TID_MASK, FUTEX_WAITERS, FutexWait, futex_wait, futex_wake,
};

/// A request to the holder thread.
enum Command {
    Take {
        deadline: Deadline,
        reply: mpsc::SyncSender<Result<bool, ApiError>>,
    },
    Release {
        asked: Vec<usize>,
        reply: mpsc::SyncSender<Result<u32, ApiError>>,
    },
}

/// The coordinator's hold on the daemon component: a thread that owns the daemon component
/// word (its thread id is in the word, and its kernel robust list names the word, so the
/// kernel marks the word `FUTEX_OWNER_DIED` and wakes a service the moment this thread dies,
/// with the coordinator). `Send`: keep it wherever the coordinator keeps its state.
///
/// Dropping it ends the thread as if the coordinator had died holding the word, if it holds
/// it: services then apply the takeover mode. Release it deliberately first for anything else.
pub struct DaemonComponentHolder {
    ctl: ControlSegment,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    tid: u32,
    held: bool,
    previous_holder_died: bool,
}

impl fmt::Debug for DaemonComponentHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonComponentHolder")
            .field("instance", &self.ctl.instance)
            .field("tid", &self.tid)
            .field("held", &self.held)
            .finish()
    }
}

impl DaemonComponentHolder {
    pub(super) fn start(ctl: ControlSegment, deadline: Deadline) -> Result<Self, ApiError> {
        let thread_error = |detail: String| ApiError::HolderThread {
            instance: ctl.instance.clone(),
            detail,
        };
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let (commands, inbox) = mpsc::channel();
        let for_thread = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("ccmgr-holder".into())
            .spawn(move || holder_thread(for_thread, tid_tx, inbox))
            .map_err(|e| thread_error(format!("cannot start it: {e}")))?;
        let tid = match tid_rx.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(thread_error("it ended before it started".into())),
        };
        let mut holder = DaemonComponentHolder {
            ctl,
            commands: Some(commands),
            thread: Some(thread),
            tid,
            held: false,
            previous_holder_died: false,
        };
        holder.previous_holder_died = holder.take(deadline)?;
        Ok(holder)
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::SyncSender<Result<T, ApiError>>) -> Command,
    ) -> Result<T, ApiError> {
        let gone = || ApiError::HolderThread {
            instance: self.ctl.instance.clone(),
            detail: "it has ended".into(),
        };
        let (reply, answer) = mpsc::sync_channel(1);
        self.commands
            .as_ref()
            .ok_or_else(gone)?
            .send(make(reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    fn take(&mut self, deadline: Deadline) -> Result<bool, ApiError> {
        let died = self.ask(|reply| Command::Take { deadline, reply })?;
        self.held = true;
        Ok(died)
    }

    /// Whether the holder before this one died holding the daemon component (so this take
    /// is a takeover).
    pub fn previous_holder_died(&self) -> bool {
        self.previous_holder_died
    }

    /// Whether the daemon component is held now (false between a release and a re-take).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The holder thread's id, as the daemon component word shows it.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// The control segment.
    pub fn control(&self) -> &ControlSegment {
        &self.ctl
    }

    /// Ask the services at indices `asked` to shut down, and release the daemon component:
    /// bumps the shutdown epoch, records it as the `asked_epoch` of each of them, releases the
    /// word and wakes every service. For a stop, ask every service; for a failure sequence,
    /// the ones it stops. Returns the new epoch.
    ///
    /// The asked services with the API then shut down by themselves, each after the ones
    /// before it in the shutdown sequence that were asked too, and exit. Re-take the daemon
    /// component ([`retake`](Self::retake)) only after every asked service is down (exited,
    /// or killed after its timeout), and before starting any service again.
    pub fn release_for_shutdown(&mut self, asked: &[usize]) -> Result<u32, ApiError> {
        if !self.held {
            return Err(ApiError::WrongHolderState {
                instance: self.ctl.instance.clone(),
                what: "releasing the daemon component, which is not held",
            });
        }
        if let Some(&bad) = asked.iter().find(|&&i| i >= self.ctl.layout.services) {
            return Err(ApiError::InvalidSpec {
                instance: self.ctl.instance.clone(),
                reason: format!("no service #{bad} to ask to shut down"),
            });
        }
        let asked = asked.to_vec();
        let epoch = self.ask(|reply| Command::Release { asked, reply })?;
        self.held = false;
        Ok(epoch)
    }

    /// Take the daemon component again after a release (FIG. 8, step 812), then bump the
    /// coordinator epoch and wake the services waiting for it.
    pub fn retake(&mut self, deadline: Deadline) -> Result<(), ApiError> {
        if self.held {
            return Err(ApiError::WrongHolderState {
                instance: self.ctl.instance.clone(),
                what: "taking the daemon component, which is already held",
            });
        }
        self.take(deadline)?;
        Ok(())
    }
}

impl Drop for DaemonComponentHolder {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which gives the word up as a dying holder would.
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The holder thread: registers the word with the kernel, then takes and releases it on
/// request, so that every change of the word by this thread is ordered with the kernel's
/// handling of the thread's death.
fn holder_thread(
    ctl: ControlSegment,
    tid_tx: mpsc::SyncSender<Result<u32, ApiError>>,
    inbox: mpsc::Receiver<Command>,
) {
    let offset = ctl.layout.daemon_component();
    let registration: RobustPending = match ctl.map.robust_pending(offset) {
        Some(Ok(r)) => r,
        Some(Err(errno)) => {
            let _ = tid_tx.send(Err(ApiError::Sys {
                op: "set_robust_list",
                path: ctl.path.clone(),
                errno,
            }));
            return;
        }
        None => unreachable!("the gate lies inside the validated layout"),
    };
    let tid = nix::unistd::gettid().as_raw() as u32;
    if tid_tx.send(Ok(tid)).is_err() {
        return;
    }
    // Declared after the registration, so dropped before it: a panic while holding still
    // gives the word up (as the kernel would at death) instead of leaving it held by a thread
    // the kernel no longer watches.
    let _give_up = GiveUpOnExit { ctl: &ctl, tid };
    while let Ok(command) = inbox.recv() {
        match command {
            Command::Take { deadline, reply } => {
                let _ = reply.send(take_word(&ctl, tid, deadline));
            }
            Command::Release { asked, reply } => {
                let _ = reply.send(release_word(&ctl, tid, &asked));
            }
        }
    }
    drop(_give_up);
    drop(registration);
}

/// Marks the word as a dead holder's when the holder thread ends holding it.
struct GiveUpOnExit<'a> {
    ctl: &'a ControlSegment,
    tid: u32,
}

impl Drop for GiveUpOnExit<'_> {
    fn drop(&mut self) {
        let word = &self.ctl.gate().daemon_component;
        let v = word.load(Ordering::Acquire);
        if v & FUTEX_TID_MASK == self.tid
            && word
                .compare_exchange(
                    v,
                    FUTEX_WAITERS | FUTEX_OWNER_DIED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            let _ = futex_wake(word, i32::MAX);
        }
    }
}

/// Take the word for `tid`; returns whether the previous holder died holding it.
fn take_word(ctl: &ControlSegment, tid: u32, deadline: Deadline) -> Result<bool, ApiError> {
    let gate = ctl.gate();
    let word = &gate.daemon_component;
    let died = loop {
        let v = word.load(Ordering::Acquire);
        let owner = v & FUTEX_TID_MASK;
        if owner == tid {
            return Err(ApiError::WrongHolderState {
                instance: ctl.instance.clone(),
                what: "taking the daemon component, which is already held",
            });
        }
        if owner == 0 {
            // Free: released, never taken, or its holder died (FUTEX_OWNER_DIED).
            if word
                .compare_exchange(v, tid | FUTEX_WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break v & FUTEX_OWNER_DIED != 0;
            }
            continue;
        }
        // Held by another thread: a live coordinator, or one whose death the kernel has not
        // processed yet. Its FUTEX_WAITERS bit makes the kernel wake a sleeper at its death
        // (a service passes it on if it is the one woken).
        if v & FUTEX_WAITERS == 0
            && word
                .compare_exchange(v, v | FUTEX_WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            continue;
        }
        match futex_wait(word, v | FUTEX_WAITERS, Some(deadline)) {
            Ok(FutexWait::TimedOut) => {
                return Err(ApiError::DaemonComponentHeld {
                    instance: ctl.instance.clone(),
                    tid: owner,
                });
            }
            Ok(_) => continue,
            Err(errno) => {
                return Err(ApiError::Sys {
                    op: "FUTEX_WAIT",
                    path: ctl.path.clone(),
                    errno,
                });
            }
        }
    };
    if let Ok(me) = ProcessIdentity::current() {
        gate.coordinator_pid.store(me.pid, Ordering::Relaxed);
        gate.coordinator_start_time
            .store(me.start_time, Ordering::Relaxed);
    }
    // After the word is ours: a service that sees the new epoch and goes back to sleeping on
    // the word finds it held.
    gate.coordinator_epoch.fetch_add(1, Ordering::Release);
    ctl.wake_gate();
    Ok(died)
}

/// Release the word held by `tid`, asking the services at `asked` to shut down.
fn release_word(ctl: &ControlSegment, tid: u32, asked: &[usize]) -> Result<u32, ApiError> {
    let gate = ctl.gate();
    let word = &gate.daemon_component;
    let v = word.load(Ordering::Acquire);
    if v & FUTEX_TID_MASK != tid {
        return Err(ApiError::WrongHolderState {
            instance: ctl.instance.clone(),
            what: "releasing the daemon component, which this holder does not hold",
        });
    }
    let epoch = match gate.shutdown_epoch.load(Ordering::Relaxed).wrapping_add(1) {
        0 => 1,
        e => e,
    };
    for &i in asked {
        if let Some(rec) = ctl.record(i) {
            rec.asked_epoch.store(epoch, Ordering::Relaxed);
        }
    }
    gate.shutdown_epoch.store(epoch, Ordering::Release);
    // The release store orders the epoch and the asked words before the word's release: a
    // service that sees the word free (with an acquire fence) sees them.
    word.store(0, Ordering::Release);
    ctl.wake_gate();
    Ok(epoch)
}

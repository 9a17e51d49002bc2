//! The API thread: registration, then the shutdown protocol, each step a method named after
//! it. The reasoning about races is in the module documentation of [`crate::service`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use super::{Inner, ServiceError, Shutdown, ShutdownReason};
use crate::config::Takeover;
use crate::shm::api::{ApiError, ApiFile, ApiState, ControlView, GateSnapshot};
use crate::shm::robust::{FUTEX_OWNER_DIED, FUTEX_TID_MASK};

/// Where registration stands, shared by `alive` and the thread so that a registration that
/// timed out never leaves the lock held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// The thread is waiting for the component lock.
    Registering,
    /// The thread holds it and `alive` succeeds.
    Registered,
    /// `alive` gave up: the thread releases the lock if it gets it, and ends.
    Cancelled,
}

/// What the daemon component word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// A coordinator (the thread with this id) holds it.
    Held(u32),
    /// Its holder died holding it.
    HolderDied,
    /// Released deliberately, or not taken yet.
    Released,
}

fn classify(word: u32) -> Gate {
    match word & FUTEX_TID_MASK {
        0 if word & FUTEX_OWNER_DIED != 0 => Gate::HolderDied,
        0 => Gate::Released,
        tid => Gate::Held(tid),
    }
}

pub(super) struct ApiThread {
    pub(super) ctl: ControlView,
    pub(super) api: Arc<ApiFile>,
    pub(super) index: usize,
    pub(super) inner: Arc<Inner>,
    pub(super) phase: Arc<Mutex<Phase>>,
    pub(super) report: mpsc::SyncSender<Result<(), ServiceError>>,
}

impl ApiThread {
    pub(super) fn run(self, on_shutdown: Box<dyn FnOnce(Shutdown) + Send>) {
        if !self.register() {
            return;
        }
        let outcome = self
            .wait_for_shutdown()
            .and_then(|reason| self.take_turn(reason, on_shutdown));
        if let Err(e) = outcome {
            // The protocol cannot go on. The component lock stays held until the process
            // ends, so the services after this one wait for that (or for the coordinator's
            // signals) rather than overtake a service that never shut down.
            eprintln!(
                "ccmgr service API ({}): the shutdown protocol stopped: {e}",
                self.inner.service
            );
        }
    }

    /// Take the component lock and tell `alive`; false if registration failed or was given
    /// up (the lock is then not held).
    fn register(&self) -> bool {
        if let Err(e) = self.api.lock_component(self.position()) {
            let _ = self.report.send(Err(e.into()));
            return false;
        }
        {
            let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
            if *phase == Phase::Cancelled {
                let _ = self.api.unlock_component(self.position());
                return false;
            }
            *phase = Phase::Registered;
        }
        // The state words only feed logs: a failure to write them is not a failure to register.
        let _ = self.api.write_state(self.index, ApiState::Alive, 0);
        let _ = self.report.send(Ok(()));
        true
    }

    /// Sleep until this service must shut down, and say why.
    fn wait_for_shutdown(&self) -> Result<ShutdownReason, ApiError> {
        // The coordinator epoch of the last death whose wake-up this thread passed on.
        let mut passed_on: Option<u32> = None;
        loop {
            let gate = self.ctl.gate();
            match classify(gate.daemon_component) {
                Gate::Held(_) => self.sleep_while_held(gate)?,
                Gate::HolderDied => {
                    if passed_on != Some(gate.coordinator_epoch) {
                        self.ctl.wake_daemon_component_sleepers()?;
                        passed_on = Some(gate.coordinator_epoch);
                    }
                    match self.ctl.takeover() {
                        Takeover::Restart => return Ok(ShutdownReason::CoordinatorDied),
                        Takeover::Adopt => self.wait_for_a_coordinator(gate)?,
                    }
                }
                Gate::Released => {
                    if let Some(epoch) = self.asked_in_current_epoch() {
                        return Ok(ShutdownReason::Requested { epoch });
                    }
                    self.wait_for_a_coordinator(gate)?;
                }
            }
        }
    }

    /// Sleep on the daemon component word while it still holds what `gate` saw, covered by
    /// the thread's robust list (so a wake-up the kernel gave this thread at the coordinator's
    /// death is passed on even if this process dies right then); pass a death's wake-up on.
    fn sleep_while_held(&self, gate: GateSnapshot) -> Result<(), ApiError> {
        // Only a narrow race needs the cover; a sandbox that forbids set_robust_list costs
        // that protection, not the protocol.
        let _cover = self.ctl.cover_daemon_component().ok();
        self.ctl.wait_daemon_component(gate.daemon_component)?;
        if classify(self.ctl.gate().daemon_component) == Gate::HolderDied {
            // The kernel wakes one sleeper at a holder's death; this may be it.
            self.ctl.wake_daemon_component_sleepers()?;
        }
        Ok(())
    }

    /// Sleep until a coordinator takes the daemon component again: until the coordinator
    /// epoch differs from the one read (before the word) in `gate`. No lock is touched, so
    /// nothing here can race with the coordinator's take or spin on a free word.
    fn wait_for_a_coordinator(&self, gate: GateSnapshot) -> Result<(), ApiError> {
        self.ctl.wait_coordinator_epoch(gate.coordinator_epoch)?;
        Ok(())
    }

    /// The current shutdown epoch, if it asks this service to shut down.
    fn asked_in_current_epoch(&self) -> Option<u32> {
        let epoch = self.ctl.shutdown_epoch();
        (epoch != 0 && self.ctl.asked_epoch(self.index) == epoch).then_some(epoch)
    }

    /// This service's position in the shutdown sequence (also where its component lock is).
    fn position(&self) -> usize {
        self.ctl
            .sequence()
            .iter()
            .position(|&i| i == self.index)
            .expect("the validated shutdown sequence names every service")
    }

    /// Wait for the services before this one that this shutdown concerns, run the callback,
    /// say "done" and release the component lock.
    fn take_turn(
        &self,
        reason: ShutdownReason,
        on_shutdown: Box<dyn FnOnce(Shutdown) + Send>,
    ) -> Result<(), ApiError> {
        let position = self.position();
        let epoch = match reason {
            ShutdownReason::Requested { epoch } => epoch,
            ShutdownReason::CoordinatorDied => 0,
        };
        let concerned: Vec<usize> = self.ctl.sequence()[..position]
            .iter()
            .enumerate()
            .filter(|&(_, &service)| match reason {
                ShutdownReason::Requested { epoch } => self.ctl.asked_epoch(service) == epoch,
                ShutdownReason::CoordinatorDied => true,
            })
            .map(|(p, _)| p)
            .collect();
        self.wait_until_done_or_dead(&concerned)?;
        let _ = self
            .api
            .write_state(self.index, ApiState::ShuttingDown, epoch);
        on_shutdown(Shutdown {
            reason,
            service: self.ctl.id(self.index).to_owned(),
            position,
        });
        let _ = self.api.write_state(self.index, ApiState::Done, epoch);
        self.inner.shut_down.store(true, Ordering::Release);
        self.api.unlock_component(position)
    }

    /// Block until no service at the (ascending) shutdown positions `concerned` holds its
    /// component lock: each released it (its turn is over) or died.
    ///
    /// First the nearest one: it normally finishes last, having waited for the others, so
    /// each service sleeps on one lock and each release wakes one service. Then one
    /// `F_OFD_GETLK` per run of consecutive positions confirms that the rest are free; only a
    /// service that died before its turn leaves earlier ones still running, and those are then
    /// waited for one by one.
    fn wait_until_done_or_dead(&self, concerned: &[usize]) -> Result<(), ApiError> {
        let Some(&nearest) = concerned.last() else {
            return Ok(());
        };
        self.api.wait_released(nearest)?;
        for run in runs(concerned) {
            while let Some(held) = self.api.held_among(run.clone())? {
                self.api.wait_released(held)?;
            }
        }
        Ok(())
    }
}

/// The maximal runs of consecutive values in an ascending list, as ranges.
fn runs(ascending: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &p in ascending {
        match out.last_mut() {
            Some(run) if run.end == p => run.end = p + 1,
            _ => out.push(p..p + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::robust::FUTEX_WAITERS;

    #[test]
    fn the_word_reads_as_held_died_or_released() {
        assert_eq!(classify(1234 | FUTEX_WAITERS), Gate::Held(1234));
        assert_eq!(classify(1234), Gate::Held(1234));
        assert_eq!(classify(FUTEX_OWNER_DIED | FUTEX_WAITERS), Gate::HolderDied);
        assert_eq!(classify(FUTEX_OWNER_DIED), Gate::HolderDied);
        assert_eq!(classify(0), Gate::Released);
        assert_eq!(classify(FUTEX_WAITERS), Gate::Released);
        // A holder that took over from a dead one: held (the bit is not kept).
        assert_eq!(classify(99 | FUTEX_OWNER_DIED), Gate::Held(99));
    }

    #[test]
    fn runs_of_positions() {
        assert_eq!(runs(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(runs(&[0, 1, 2]), vec![0..3]);
        assert_eq!(runs(&[0, 2, 3, 5]), vec![0..1, 2..4, 5..6]);
    }
}

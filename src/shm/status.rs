//! The live state of a segment: the consistent readers ([`ServiceStatus`],
//! [`InstanceStatus`], the engine's progress records) and the [`StateWriter`], under the
//! shared-memory mutex and the generation counter used as a sequence lock. Apart from
//! [`open`](super::open) because it runs all the time, on a segment whose layout is already
//! verified, and is the only code that changes the state table. No unsafe code.

use std::sync::atomic::{Ordering, fence};

use super::error::ShmError;
use super::layout::{
    InstanceRecord, PROGRESS_ASKED, PROGRESS_KILLED, PROGRESS_START_TIMED_OUT, ServiceRecord,
};
use super::robust::MutexGuard;
use super::segment::{Segment, from_ms1, identity, to_ms1};
use super::state::{
    FailureCode, GiveUpReason, InstanceProgress, InstanceState, LastExit, MutexId, ServiceProgress,
    ServiceState, Stage, StopIntent, StopKind, Want,
};
use crate::process_identity::ProcessIdentity;

/// The live state of one service, read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStatus {
    /// Its state.
    pub state: ServiceState,
    /// Its process, if it has one.
    pub process: Option<ProcessIdentity>,
    /// Last state change, monotonic milliseconds.
    pub last_transition_ms: u64,
    /// Restarts so far.
    pub restart_count: u32,
    /// How its last process ended.
    pub last_exit: Option<LastExit>,
}

/// Why and on which service the instance gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp {
    /// Why.
    pub reason: GiveUpReason,
    /// The service concerned, if one.
    pub service: Option<usize>,
}

/// The state of the instance, read consistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its state.
    pub state: InstanceState,
    /// Last state change, monotonic milliseconds.
    pub last_transition_ms: u64,
    /// The `ccmgr start` under way, if any.
    pub manager: Option<ProcessIdentity>,
    /// The coordinator, once announced.
    pub coordinator: Option<ProcessIdentity>,
    /// The standby, once announced.
    pub standby: Option<ProcessIdentity>,
    /// The keeper, once announced.
    pub keeper: Option<ProcessIdentity>,
    /// Restarts counted in the current window.
    pub restarts_in_window: u32,
    /// Start of that window, monotonic milliseconds.
    pub window_start_ms: u64,
    /// Set once the instance gave up.
    pub gave_up: Option<GaveUp>,
}

impl Segment {
    // ----- live state --------------------------------------------------------

    /// The generation counter: it changes whenever the state table or the
    /// instance record changes (odd while a change is under way).
    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Acquire)
    }

    /// Read with the generation counter as a sequence lock: retry while a
    /// writer is at work; if one takes long (or died mid-change), read under
    /// the shared-memory mutex instead, which also repairs a dead writer's
    /// generation.
    pub(super) fn read_consistent<T>(&self, read: impl Fn() -> T) -> Result<T, ShmError> {
        const ATTEMPTS: u32 = 200;
        let generation = &self.header().generation;
        for attempt in 0..ATTEMPTS {
            let before = generation.load(Ordering::Acquire);
            if before % 2 == 0 {
                let value = read();
                fence(Ordering::Acquire);
                if generation.load(Ordering::Relaxed) == before {
                    return Ok(value);
                }
            }
            if attempt < 20 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // Bounded: a reader (`status`) must answer, even when the holder never lets go (found
        // by fuzzing: bytes that say "held by a thread that no longer exists" block for ever).
        let guard = self
            .mutex(MutexId::Shm)?
            .lock_timeout(READ_LOCK_LIMIT)
            .map_err(|e| self.mutex_error(MutexId::Shm, e))?
            .ok_or_else(|| ShmError::StateLockHeld {
                instance: self.instance().to_owned(),
            })?;
        let locked = self.state_writer(guard, false);
        let value = read();
        drop(locked);
        Ok(value)
    }

    /// Service `index`'s state, read consistently.
    pub fn service_status(&self, index: usize) -> Result<ServiceStatus, ShmError> {
        let rec = self.service_record(index)?;
        let r = Ordering::Relaxed;
        let (state, pid, start_time, last_transition_ms, restart_count, last_exit) = self
            .read_consistent(|| {
                (
                    rec.state.load(r),
                    rec.pid.load(r),
                    rec.start_time.load(r),
                    rec.last_transition_ms.load(r),
                    rec.restart_count.load(r),
                    rec.last_exit.load(r),
                )
            })?;
        Ok(ServiceStatus {
            state: ServiceState::try_from(state)
                .map_err(|e| self.unknown(&format!("service #{index}"), e))?,
            process: identity(pid, start_time),
            last_transition_ms,
            restart_count,
            last_exit: LastExit::decode(last_exit)
                .map_err(|e| self.unknown(&format!("service #{index}"), e))?,
        })
    }

    /// Service `index`'s recorded process, read consistently (no decoding of
    /// other fields, so it works even if they are corrupt).
    pub fn service_process(&self, index: usize) -> Result<Option<ProcessIdentity>, ShmError> {
        let rec = self.service_record(index)?;
        let (pid, start_time) = self.read_consistent(|| {
            (
                rec.pid.load(Ordering::Relaxed),
                rec.start_time.load(Ordering::Relaxed),
            )
        })?;
        Ok(identity(pid, start_time))
    }

    /// The instance's state, read consistently.
    pub fn instance_status(&self) -> Result<InstanceStatus, ShmError> {
        let inst = self.instance_record();
        let r = Ordering::Relaxed;
        let raw = self.read_consistent(|| {
            (
                [
                    inst.state.load(r),
                    inst.restarts_in_window.load(r),
                    inst.gave_up_reason.load(r),
                    inst.gave_up_service.load(r),
                ],
                [
                    inst.manager_pid.load(r),
                    inst.coordinator_pid.load(r),
                    inst.standby_pid.load(r),
                    inst.keeper_pid.load(r),
                ],
                [
                    inst.manager_start_time.load(r),
                    inst.coordinator_start_time.load(r),
                    inst.standby_start_time.load(r),
                    inst.keeper_start_time.load(r),
                    inst.window_start_ms.load(r),
                    inst.last_transition_ms.load(r),
                ],
            )
        })?;
        let ([state, restarts, reason, service], [mp, cp, sp, kp], [mt, ct, st, kt, window, last]) =
            raw;
        let gave_up = match reason {
            0 => None,
            reason => Some(GaveUp {
                reason: GiveUpReason::try_from(reason)
                    .map_err(|e| self.unknown("the instance record", e))?,
                service: match service {
                    u32::MAX => None,
                    s if (s as usize) < self.service_count() => Some(s as usize),
                    s => {
                        return Err(self.corrupt(format!(
                            "the instance gave up on service #{s}, beyond the service count"
                        )));
                    }
                },
            }),
        };
        Ok(InstanceStatus {
            state: InstanceState::try_from(state)
                .map_err(|e| self.unknown("the instance record", e))?,
            last_transition_ms: last,
            manager: identity(mp, mt),
            coordinator: identity(cp, ct),
            standby: identity(sp, st),
            keeper: identity(kp, kt),
            restarts_in_window: restarts,
            window_start_ms: window,
            gave_up,
        })
    }

    /// Service `index`'s progress (the engine's intent), read consistently.
    pub fn service_progress(&self, index: usize) -> Result<ServiceProgress, ShmError> {
        let rec = self.service_record(index)?;
        let r = Ordering::Relaxed;
        let ([want, stage, flags, streak, exited], [since, deadline, started, not_before, failed]) =
            self.read_consistent(|| {
                (
                    [
                        rec.want.load(r),
                        rec.stage.load(r),
                        rec.progress_flags.load(r),
                        rec.streak.load(r),
                        rec.exited_pid.load(r) as u32,
                    ],
                    [
                        rec.process_since_ms.load(r),
                        rec.deadline_ms1.load(r),
                        rec.started_at_ms1.load(r),
                        rec.not_before_ms.load(r),
                        rec.last_failure_ms1.load(r),
                    ],
                )
            })?;
        let what = format!("service #{index}");
        Ok(ServiceProgress {
            want: Want::try_from(want).map_err(|e| self.unknown(&what, e))?,
            stage: Stage::try_from(stage).map_err(|e| self.unknown(&what, e))?,
            killed: flags & PROGRESS_KILLED != 0,
            start_timed_out: flags & PROGRESS_START_TIMED_OUT != 0,
            asked: flags & PROGRESS_ASKED != 0,
            process_since_ms: since,
            deadline_ms: from_ms1(deadline),
            started_at_ms: from_ms1(started),
            not_before_ms: not_before,
            streak,
            last_failure_ms: from_ms1(failed),
            exited_pid: (exited as i32 > 0).then_some(exited as i32),
        })
    }

    /// The instance's progress (why it is stopping, the sequence deadline), read consistently.
    pub fn instance_progress(&self) -> Result<InstanceProgress, ShmError> {
        let inst = self.instance_record();
        let r = Ordering::Relaxed;
        let ([kind, service, failure, restarts], [exit, deadline]) =
            self.read_consistent(|| {
                (
                    [
                        inst.stop_kind.load(r),
                        inst.stop_service.load(r),
                        inst.stop_failure.load(r),
                        inst.stop_restarts.load(r),
                    ],
                    [inst.stop_exit.load(r), inst.sequence_deadline_ms1.load(r)],
                )
            })?;
        let what = "the instance record";
        let stopping_for = match kind {
            0 => None,
            kind => Some(StopIntent {
                kind: StopKind::try_from(kind).map_err(|e| self.unknown(what, e))?,
                service: match service {
                    u32::MAX => None,
                    s if (s as usize) < self.service_count() => Some(s as usize),
                    s => {
                        return Err(self.corrupt(format!(
                            "the instance is stopping for service #{s}, beyond the service count"
                        )));
                    }
                },
                failure: match failure {
                    0 => None,
                    f => Some(FailureCode::try_from(f).map_err(|e| self.unknown(what, e))?),
                },
                exit: LastExit::decode(exit).map_err(|e| self.unknown(what, e))?,
                restarts,
            }),
        };
        Ok(InstanceProgress {
            stopping_for,
            sequence_deadline_ms: from_ms1(deadline),
        })
    }

    /// Whether the coordinator runs without a standby because standbys kept dying (one
    /// word, read on its own: no consistent snapshot needed).
    pub fn standby_disabled(&self) -> bool {
        self.instance_record()
            .standby_disabled
            .load(Ordering::Relaxed)
            != 0
    }

    /// Whether the file behind this mapping still has the size its layout needs. A process
    /// of the owner's uid can truncate the segment under us, and an access past the new end
    /// raises SIGBUS: a process that must outlive such damage (the keeper, the parent of every
    /// service) asks this before it touches the segment.
    pub fn intact(&self) -> bool {
        self.map
            .file()
            .metadata()
            .is_ok_and(|m| m.len() >= self.layout.total_size as u64)
    }

    /// Lock the shared-memory mutex to change the state table or the instance
    /// record. The generation is odd until the writer is dropped.
    pub fn write(&self) -> Result<StateWriter<'_>, ShmError> {
        self.lock_state(true)
    }

    fn lock_state(&self, bump: bool) -> Result<StateWriter<'_>, ShmError> {
        let guard = self
            .mutex(MutexId::Shm)?
            .lock()
            .map_err(|e| self.mutex_error(MutexId::Shm, e))?;
        Ok(self.state_writer(guard, bump))
    }

    /// The state lock, `guard`, made a writer (`bump`) or a reader's hold.
    fn state_writer(&self, guard: MutexGuard, bump: bool) -> StateWriter<'_> {
        let generation = &self.header().generation;
        let mut g = generation.load(Ordering::Relaxed);
        if g % 2 == 1 {
            // A writer died mid-change (the guard says so too): close its change.
            g += 1;
            generation.store(g, Ordering::Release);
        }
        if bump {
            // Plain load and store: the mutex makes us the only writer.
            generation.store(g + 1, Ordering::Relaxed);
            fence(Ordering::Release);
        }
        StateWriter {
            seg: self,
            guard,
            generation: bump.then_some(g),
        }
    }
}

/// How long a reader waits for the state lock, which writers hold for microseconds.
pub const READ_LOCK_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Exclusive write access to the live state, under the shared-memory mutex.
/// Readers see the changes made through one writer as one change: the
/// generation counter is odd from [`Segment::write`] until the writer drops.
pub struct StateWriter<'a> {
    seg: &'a Segment,
    guard: MutexGuard,
    /// The even generation the change started from; `None` for a read lock.
    generation: Option<u64>,
}

impl StateWriter<'_> {
    /// True if the previous holder of the shared-memory mutex died holding
    /// it: the records may hold a half-made change.
    pub fn previous_holder_died(&self) -> bool {
        self.guard.previous_holder_died()
    }

    fn record(&self, index: usize) -> Result<&ServiceRecord, ShmError> {
        self.seg.service_record(index)
    }

    fn instance(&self) -> &InstanceRecord {
        self.seg.instance_record()
    }

    /// Set the instance state and the time of the change (monotonic ms).
    pub fn set_instance_state(&self, state: InstanceState, at_ms: u64) {
        let inst = self.instance();
        inst.state.store(state.as_u32(), Ordering::Relaxed);
        inst.last_transition_ms.store(at_ms, Ordering::Relaxed);
    }

    fn set_party(
        pid: &std::sync::atomic::AtomicI32,
        start: &std::sync::atomic::AtomicU64,
        p: Option<ProcessIdentity>,
    ) {
        let p = p.unwrap_or(ProcessIdentity {
            pid: 0,
            start_time: 0,
        });
        pid.store(p.pid, Ordering::Relaxed);
        start.store(p.start_time, Ordering::Relaxed);
    }

    /// Record (or clear) the manager.
    pub fn set_manager(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.manager_pid, &i.manager_start_time, p);
    }

    /// Record (or clear) the coordinator.
    pub fn set_coordinator(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.coordinator_pid, &i.coordinator_start_time, p);
    }

    /// Record (or clear) the standby.
    pub fn set_standby(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.standby_pid, &i.standby_start_time, p);
    }

    /// Record whether the coordinator runs without a standby because standbys kept dying.
    pub fn set_standby_disabled(&self, disabled: bool) {
        self.instance()
            .standby_disabled
            .store(u32::from(disabled), Ordering::Relaxed);
    }

    /// Record (or clear) the keeper.
    pub fn set_keeper(&self, p: Option<ProcessIdentity>) {
        let i = self.instance();
        Self::set_party(&i.keeper_pid, &i.keeper_start_time, p);
    }

    /// Record the restart window: restarts counted since `window_start_ms`.
    pub fn set_restart_window(&self, restarts_in_window: u32, window_start_ms: u64) {
        let i = self.instance();
        i.restarts_in_window
            .store(restarts_in_window, Ordering::Relaxed);
        i.window_start_ms.store(window_start_ms, Ordering::Relaxed);
    }

    /// Record why the instance gave up (or clear it).
    pub fn set_gave_up(&self, gave_up: Option<GaveUp>) -> Result<(), ShmError> {
        let (reason, service) = match gave_up {
            None => (0, u32::MAX),
            Some(g) => {
                let service = match g.service {
                    None => u32::MAX,
                    Some(s) => {
                        self.seg.check_index(s)?;
                        s as u32
                    }
                };
                (g.reason.as_u32(), service)
            }
        };
        let i = self.instance();
        i.gave_up_reason.store(reason, Ordering::Relaxed);
        i.gave_up_service.store(service, Ordering::Relaxed);
        Ok(())
    }

    /// Set service `index`'s state and the time of the change (monotonic ms).
    pub fn set_service_state(
        &self,
        index: usize,
        state: ServiceState,
        at_ms: u64,
    ) -> Result<(), ShmError> {
        let rec = self.record(index)?;
        rec.state.store(state.as_u32(), Ordering::Relaxed);
        rec.last_transition_ms.store(at_ms, Ordering::Relaxed);
        Ok(())
    }

    /// Record (or clear) service `index`'s process.
    pub fn set_service_process(
        &self,
        index: usize,
        p: Option<ProcessIdentity>,
    ) -> Result<(), ShmError> {
        let rec = self.record(index)?;
        Self::set_party(&rec.pid, &rec.start_time, p);
        Ok(())
    }

    /// Service `index`'s restart count.
    pub fn restart_count(&self, index: usize) -> Result<u32, ShmError> {
        Ok(self.record(index)?.restart_count.load(Ordering::Relaxed))
    }

    /// Set service `index`'s restart count.
    pub fn set_restart_count(&self, index: usize, count: u32) -> Result<(), ShmError> {
        self.record(index)?
            .restart_count
            .store(count, Ordering::Relaxed);
        Ok(())
    }

    /// Record how service `index`'s last process ended.
    pub fn set_last_exit(&self, index: usize, exit: Option<LastExit>) -> Result<(), ShmError> {
        self.record(index)?
            .last_exit
            .store(LastExit::encode(exit), Ordering::Relaxed);
        Ok(())
    }
    /// Record the engine's progress on service `index`.
    pub fn set_service_progress(&self, index: usize, p: &ServiceProgress) -> Result<(), ShmError> {
        let rec = self.record(index)?;
        let r = Ordering::Relaxed;
        let flags = [
            (p.killed, PROGRESS_KILLED),
            (p.start_timed_out, PROGRESS_START_TIMED_OUT),
            (p.asked, PROGRESS_ASKED),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .fold(0, |acc, (_, bit)| acc | bit);
        rec.want.store(p.want.as_u32(), r);
        rec.stage.store(p.stage.as_u32(), r);
        rec.progress_flags.store(flags, r);
        rec.streak.store(p.streak, r);
        rec.process_since_ms.store(p.process_since_ms, r);
        rec.deadline_ms1.store(to_ms1(p.deadline_ms), r);
        rec.started_at_ms1.store(to_ms1(p.started_at_ms), r);
        rec.not_before_ms.store(p.not_before_ms, r);
        rec.last_failure_ms1.store(to_ms1(p.last_failure_ms), r);
        rec.exited_pid.store(p.exited_pid.unwrap_or(0), r);
        Ok(())
    }

    /// Record the engine's progress on the instance.
    pub fn set_instance_progress(&self, p: &InstanceProgress) -> Result<(), ShmError> {
        let i = self.instance();
        let r = Ordering::Relaxed;
        let (kind, service, failure, exit, restarts) = match p.stopping_for {
            None => (0, u32::MAX, 0, None, 0),
            Some(s) => {
                let service = match s.service {
                    None => u32::MAX,
                    Some(index) => {
                        self.seg.check_index(index)?;
                        index as u32
                    }
                };
                let failure = s.failure.map_or(0, FailureCode::as_u32);
                (s.kind.as_u32(), service, failure, s.exit, s.restarts)
            }
        };
        i.stop_kind.store(kind, r);
        i.stop_service.store(service, r);
        i.stop_failure.store(failure, r);
        i.stop_restarts.store(restarts, r);
        i.stop_exit.store(LastExit::encode(exit), r);
        i.sequence_deadline_ms1
            .store(to_ms1(p.sequence_deadline_ms), r);
        Ok(())
    }
}

impl Drop for StateWriter<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.generation {
            // Publish the change: even again, released to readers. The guard
            // (a field) unlocks after this body.
            self.seg.header().generation.store(g + 2, Ordering::Release);
        }
    }
}

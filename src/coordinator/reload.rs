//! The coordinator's side of a live reload (`ccmgr reload`, SIGHUP): re-read and check the
//! configuration, stop what the plan stops, build the next segment, and hand over to the
//! keeper, which swaps it in and starts a successor on it (see the README, "Reload").
//!
//! The steps, and why each is safe to die in:
//! 1. a marker file, `<run_dir>/<instance>.reload`, is written before anything changes: a
//!    coordinator that takes over (the standby, or a successor) and finds it finishes the
//!    reload (it reads the files again and carries out what is left of the plan);
//! 2. the services the plan stops are stopped like an operator's stop (held down, dependents
//!    first), published as they go: a successor continues the stop;
//! 3. once they are all down, the next segment is built complete under a staged name
//!    (`<instance>.seg.reload`, made like every segment: no one sees it half written), with
//!    the state of every kept service copied under its new index, and the new and changed
//!    ones down and wanted up;
//! 4. the keeper is told ([`ToKeeper::Reload`]); it renames the staged segment over
//!    `<instance>.seg` (one `rename`: anyone sees the old or the new, whole), remaps its
//!    per-service tables by id, kills the standby (which watches the old segment) and answers
//!    [`FromKeeper::ReloadDone`]; this coordinator exits on that answer (or, if the keeper
//!    refused, starts again what it stopped and goes on). Once it has exited the keeper
//!    starts a successor on the new segment, which adopts the stack (every kept service keeps
//!    its process) and starts the new and changed services in order. It finds the marker, sees
//!    nothing left to do, announces `reload-applied` and removes the marker.

use std::path::PathBuf;

use tracing::{error, info, warn};

use super::Coordinator;
use crate::config::Config;
use crate::control::protocol::{Reply, Verb};
use crate::control::server::Pending;
use crate::engine::Event;
use crate::keeper::protocol::{FromKeeper, ToKeeper, recv_message};
use crate::reload::{Plan, refusal, reload_options};
use crate::shm::{Segment, ServiceProgress, Stage};
use crate::vocab::{ServiceState, Want};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::Epoll;

/// A reload this coordinator carries out.
pub(super) struct ReloadUnderWay {
    /// The configuration the stack goes to.
    new: Config,
    /// The services (indices of the running configuration) it stops, all held down until
    /// the handover.
    stopping: Vec<usize>,
    /// The services of the running configuration that the new one takes as they are.
    kept: Vec<String>,
    /// The services the operator held down before the reload: they stay down.
    held: Vec<String>,
}

/// What the marker file holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    /// The services the operator held down before the reload began.
    held: Vec<String>,
    /// How many coordinators began this reload: one that keeps failing (a keeper that keeps
    /// refusing the next segment) is abandoned after [`MAX_ATTEMPTS`].
    #[serde(default)]
    attempts: u32,
}

/// A reload begun this many times without being applied is abandoned.
const MAX_ATTEMPTS: u32 = 3;

/// The marker of a reload under way: `<run_dir>/<instance>.reload`.
pub fn marker_path(config: &Config) -> PathBuf {
    marker_path_in(&config.global.run_dir, &config.global.instance)
}

/// [`marker_path`] from its parts (a `stop` that may have no configuration).
pub fn marker_path_in(run_dir: &std::path::Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.reload"))
}

impl Coordinator {
    /// The files the stack was started from, read and checked again: the global file the
    /// running configuration came from and its services directory.
    fn load_files_again(&self) -> Result<Config, Vec<String>> {
        Config::load(&reload_options(&self.config))
            .map_err(|diags| diags.iter().map(ToString::to_string).collect())
    }

    /// The marker of the reload under way, if there is one.
    fn marker(&self) -> Option<Marker> {
        std::fs::read(marker_path(&self.config))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Marker>(&bytes).ok())
    }

    /// A reload that keeps failing is given up: the marker goes, and what it stopped (all
    /// that is held down but what the operator held) starts again under the running
    /// configuration.
    fn abandon_reload(&mut self, marker: &Marker) -> String {
        let stopped: Vec<usize> = self
            .engine
            .slots()
            .iter()
            .zip(&self.config.services)
            .enumerate()
            .filter(|(_, (slot, spec))| slot.want == Want::Held && !marker.held.contains(&spec.id))
            .map(|(s, _)| s)
            .collect();
        let _ = std::fs::remove_file(marker_path(&self.config));
        if !stopped.is_empty() {
            self.feed(Event::OperatorStart { services: stopped });
            self.publish();
        }
        let why = format!(
            "the reload was begun {} times and never applied: it is abandoned, and what it stopped runs again under the running configuration (see ccmgr's log)",
            marker.attempts
        );
        error!(why = %why, "reload abandoned");
        why
    }

    /// The services the operator holds down, by name: as the marker of a reload under way
    /// recorded them (everything that reload stopped is held too), else as the engine says.
    fn held_by_the_operator(&self) -> Vec<String> {
        match self.marker() {
            Some(marker) => marker.held,
            None => self
                .engine
                .slots()
                .iter()
                .zip(&self.config.services)
                .filter(|(slot, _)| slot.want == Want::Held)
                .map(|(_, spec)| spec.id.clone())
                .collect(),
        }
    }

    /// An operator's `reload` (through the control socket, `None` for SIGHUP or a reload a
    /// predecessor left unfinished): the reply, and what the connection waits for.
    pub(super) fn request_reload(&mut self) -> (Reply, Option<Pending>) {
        if self.reload.is_some() {
            // One is under way: this request waits for it like the first.
            let pending = Pending::new(Verb::Reload, Vec::new(), self.now(), &self.engine);
            return (
                Reply::Accepted {
                    services: Vec::new(),
                    deadline_ms: self.reload_estimate_ms(&[]),
                },
                Some(pending),
            );
        }
        if !self.engine.takes_operator_requests() {
            let why = format!(
                "the stack is {}: a reload is taken once it is up and until it stops",
                self.engine.phase()
            );
            return (Reply::NotNow { why }, None);
        }
        if let Some(marker) = self.marker().filter(|m| m.attempts >= MAX_ATTEMPTS) {
            let why = self.abandon_reload(&marker);
            return (Reply::Refused { why }, None);
        }
        let new = match self.load_files_again() {
            Ok(new) => new,
            Err(errors) => {
                warn!(
                    errors = errors.len(),
                    "reload refused: the configuration is not valid"
                );
                return (Reply::Invalid { errors }, None);
            }
        };
        let held = self.held_by_the_operator();
        let plan = Plan::for_running(&self.config, &new, &held);
        if let Some(why) = refusal(&plan, &self.config, &new) {
            warn!(why = %why, "reload refused");
            return (Reply::Refused { why }, None);
        }
        if plan.is_empty() {
            self.finish_reload_marker();
            // Nothing to change: done once every service the stack wants up is up (a
            // successor finishing a reload may still be starting the new ones).
            // Those a finished reload started are judged too: one that failed already fails
            // the reload.
            let mut waiting = self.wanted_but_not_up();
            waiting.extend_from_slice(&self.reload_starts);
            waiting.sort_unstable();
            waiting.dedup();
            if waiting.is_empty() {
                return (Reply::Done, None);
            }
            let deadline_ms = self.reload_estimate_ms(&waiting);
            let pending = Pending::new(Verb::Start, waiting, self.now(), &self.engine);
            return (
                Reply::Accepted {
                    services: Vec::new(),
                    deadline_ms,
                },
                Some(pending),
            );
        }
        let names: Vec<String> = plan
            .stop
            .iter()
            .map(|s| format!("stop {}", s.service))
            .chain(plan.start.iter().map(|s| format!("start {}", s.service)))
            .collect();
        let stopping: Vec<usize> = plan
            .stop
            .iter()
            .filter_map(|s| self.config.service_index(&s.service))
            .collect();
        let deadline_ms = self.reload_estimate_ms(&stopping);
        self.begin_reload(new, plan, stopping, held);
        let pending = Pending::new(Verb::Reload, Vec::new(), self.now(), &self.engine);
        (
            Reply::Accepted {
                services: names,
                deadline_ms,
            },
            Some(pending),
        )
    }

    /// What the work of a reload may take: each service concerned stopped and started, with
    /// its restart delay, one after the other.
    fn reload_estimate_ms(&self, services: &[usize]) -> u64 {
        let params = &self.engine.params().services;
        let per: std::time::Duration = services
            .iter()
            .map(|&s| {
                params[s].shutdown_timeout + params[s].startup_timeout + params[s].restart_delay_max
            })
            .sum();
        // The new services are the successor's: counted as much again, and a takeover.
        (per * 2).as_millis() as u64 + 15_000
    }

    /// Marks the reload, then holds down what the plan stops.
    fn begin_reload(&mut self, new: Config, plan: Plan, stopping: Vec<usize>, held: Vec<String>) {
        // The marker names what the operator held down before: a successor finishing the
        // reload finds everything the reload stopped held too, and must tell them apart.
        let attempts = self.marker().map_or(0, |m| m.attempts) + 1;
        let marker = serde_json::to_vec(&Marker {
            held: held.clone(),
            attempts,
        })
        .unwrap_or_default();
        if let Err(e) = std::fs::write(marker_path(&self.config), marker) {
            warn!(error = %e, "cannot mark the reload as under way: a successor would not finish it");
        }
        info!(
            stop = plan.stop.len(),
            start = plan.start.len(),
            "reloading the configuration"
        );
        if !stopping.is_empty() {
            self.feed(Event::OperatorStop {
                services: stopping.clone(),
            });
        }
        self.reload_starts.clear();
        self.reload = Some(ReloadUnderWay {
            new,
            stopping,
            kept: plan.kept,
            held,
        });
        // Published before anything else: a successor continues the stop.
        self.publish();
    }

    /// A reload from SIGHUP, or one a predecessor left unfinished: no one waits on a
    /// connection for it.
    pub(super) fn reload_unasked(&mut self, why: &str) {
        let (reply, _) = self.request_reload();
        match reply {
            Reply::Accepted { services, .. } => {
                info!(why, plan = %services.join(", "), "reload accepted")
            }
            Reply::Done => info!(why, "reload: nothing to do"),
            Reply::Invalid { errors } => {
                for e in errors {
                    error!(why, error = %e, "reload refused: the configuration is not valid");
                }
            }
            other => warn!(why, reply = ?other, "reload not carried out"),
        }
    }

    /// After each loop pass: once every service the reload stops is down, hand over.
    /// Returns true once handed over (the loop then ends, and this process exits).
    pub(super) fn advance_reload(&mut self, epoll: &Epoll) -> bool {
        let Some(reload) = &self.reload else {
            return false;
        };
        if !self.engine.takes_operator_requests() {
            // The whole stack is stopping (or stopped): nothing to hand over.
            info!("the stack is stopping: the reload under way is dropped");
            self.reload = None;
            let _ = std::fs::remove_file(marker_path(&self.config));
            self.fail_reload_requests(epoll, "not applied: the whole stack is stopping");
            return false;
        }
        let slots = self.engine.slots();
        let all_down = reload.stopping.iter().all(|&s| {
            slots[s].pid().is_none()
                && matches!(
                    slots[s].state(),
                    ServiceState::Stopped | ServiceState::Failed
                )
        });
        if !all_down {
            return false;
        }
        let Some(reload) = self.reload.take() else {
            return false;
        };
        let built = self.build_next_segment(&reload);
        let applied = match built {
            Ok(()) => {
                info!("the next segment is ready: handing over to the keeper");
                self.hand_over()
            }
            Err(e) => {
                error!(error = %e, "cannot build the next segment");
                false
            }
        };
        if applied {
            return true;
        }
        error!(
            "the reload is abandoned: what it stopped is started again under the running configuration"
        );
        let _ = std::fs::remove_file(marker_path(&self.config));
        self.feed(Event::OperatorStart {
            services: reload.stopping.clone(),
        });
        self.fail_reload_requests(
            epoll,
            "not applied: the next configuration could not be put in place (see ccmgr's log); what it stopped runs again",
        );
        false
    }

    /// Answers the connections waiting for a reload that will not happen.
    fn fail_reload_requests(&mut self, epoll: &Epoll, how: &str) {
        self.control.settle(epoll, |pending| {
            (pending.verb == Verb::Reload).then(|| Reply::Failed {
                service: "the reload".into(),
                how: how.to_owned(),
            })
        });
    }

    /// Sends the keeper [`ToKeeper::Reload`] and waits for its answer: whether the next
    /// segment is in place (this process then exits; the standby of the old segment is dead,
    /// so it cannot take over from that exit). What else the keeper says meanwhile is handled
    /// as usual if the reload was not applied (this coordinator goes on), and left to the
    /// successor (which gets it again) if it was. No answer in time counts as applied: the
    /// exit is then a death, which the marker covers.
    fn hand_over(&mut self) -> bool {
        use std::os::fd::AsFd as _;
        self.send(ToKeeper::Reload);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut meanwhile = Vec::new();
        let applied = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.keeper_lost {
                warn!("the keeper did not answer the reload in time: exiting as if it was applied");
                break true;
            }
            if self.outbox.flush(self.keeper.as_fd()).is_err() {
                self.keeper_lost = true;
                continue;
            }
            let mut fds = [PollFd::new(self.keeper.as_fd(), PollFlags::POLLIN)];
            let wait = PollTimeout::try_from(left.as_millis().min(1000) as i32)
                .unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, wait) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => {
                    self.keeper_lost = true;
                    continue;
                }
            }
            loop {
                match recv_message::<FromKeeper>(self.keeper.as_fd()) {
                    Ok(Some(FromKeeper::ReloadDone { applied })) => {
                        return self.after_handover(applied, meanwhile);
                    }
                    Ok(Some(message)) => meanwhile.push(message),
                    Ok(None) => break,
                    Err(_) => {
                        self.keeper_lost = true;
                        break;
                    }
                }
            }
        };
        self.after_handover(applied, meanwhile)
    }

    /// Whatever came from the keeper during the handover: left to the successor if the
    /// reload was applied, else handled now.
    fn after_handover(&mut self, applied: bool, meanwhile: Vec<FromKeeper>) -> bool {
        if !applied {
            error!("the keeper did not put the next segment in place");
            for message in meanwhile {
                self.on_keeper_message(message);
            }
        }
        applied
    }

    /// The next segment, complete under its staged name: the new configuration, the
    /// instance's state, and every kept service's record under its new index.
    fn build_next_segment(&self, reload: &ReloadUnderWay) -> Result<(), crate::shm::ShmError> {
        let new = &reload.new;
        let next = Segment::create_staged(&crate::cli::segment_spec(new))?;
        let old = &self.segment;
        let now_ms = crate::shm::monotonic_ms();
        let instance = old.instance_status()?;
        let w = next.write()?;
        w.set_instance_state(instance.state, instance.last_transition_ms);
        w.set_restart_window(instance.restarts_in_window, instance.window_start_ms);
        w.set_keeper(instance.keeper);
        w.set_coordinator(None);
        w.set_standby(None);
        w.set_gave_up(None)?;
        for (j, spec) in new.services.iter().enumerate() {
            let kept = reload.kept.contains(&spec.id);
            match self.config.service_index(&spec.id).filter(|_| kept) {
                Some(i) => {
                    let status = old.service_status(i)?;
                    w.set_service_state(j, status.state, status.last_transition_ms)?;
                    w.set_service_process(j, status.process)?;
                    w.set_restart_count(j, status.restart_count)?;
                    w.set_last_exit(j, status.last_exit)?;
                    w.set_service_progress(j, &old.service_progress(i)?)?;
                }
                None => {
                    let want = if reload.held.contains(&spec.id) {
                        Want::Held
                    } else {
                        Want::Up
                    };
                    w.set_service_state(j, ServiceState::Stopped, now_ms)?;
                    w.set_service_process(j, None)?;
                    w.set_service_progress(
                        j,
                        &ServiceProgress {
                            want,
                            stage: Stage::Stopped,
                            killed: false,
                            start_timed_out: false,
                            asked: false,
                            process_since_ms: 0,
                            deadline_ms: None,
                            started_at_ms: None,
                            not_before_ms: 0,
                            streak: 0,
                            last_failure_ms: None,
                            exited_pid: None,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The services wanted up that are not up (yet).
    fn wanted_but_not_up(&self) -> Vec<usize> {
        self.engine
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.want == Want::Up && slot.state() != ServiceState::Up)
            .map(|(s, _)| s)
            .collect()
    }

    /// A coordinator that took over and finds a reload marker: finish that reload (if what
    /// is left of it is nothing, announce that it is applied).
    pub(super) fn resume_reload_if_marked(&mut self) {
        if !marker_path(&self.config).exists() {
            return;
        }
        // What it starts now: the new and changed services, if this is the next segment.
        self.reload_starts = self.wanted_but_not_up();
        info!("a reload was under way: finishing it");
        self.reload_unasked("finishing the reload a predecessor began");
    }

    /// The reload's work is over: announce it and remove the marker (if there is one).
    fn finish_reload_marker(&mut self) {
        if std::fs::remove_file(marker_path(&self.config)).is_ok() {
            info!("reload applied");
            self.announce("reload-applied", Some(std::process::id() as i32));
            if let Some(tap) = &mut self.events {
                tap.flush();
            }
        }
    }
}

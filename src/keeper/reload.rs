//! The keeper's side of a live reload ([`ToKeeper::Reload`](super::ToKeeper::Reload)): it
//! owns the processes, so it is the one that switches the instance to the next segment and
//! configuration, in one step of its single-threaded loop: the staged segment is checked,
//! renamed over `<instance>.seg` (atomic: a reader, a `stop` or a standby sees the old segment
//! or the new one, whole), and every per-service table is remapped by service id. The standby,
//! which watches the old segment, is retired; when the coordinator that asked exits, the
//! usual path starts a successor, which adopts the stack from the new segment.

use std::collections::HashMap;
use std::os::fd::{AsFd as _, RawFd};

use tracing::{error, info};

use super::{Keeper, Role, Source, unwatch};
use crate::config::Config;
use crate::keeper::protocol::FromKeeper;
use crate::shm::Segment;
use crate::shm::api::{ApiSpec, ControlSegment};

/// A service event about old service `service`, under its new index (none if it is gone).
fn remap_message(message: FromKeeper, to_new: &[Option<usize>]) -> Option<FromKeeper> {
    let new = |s: usize| to_new.get(s).copied().flatten();
    Some(match message {
        FromKeeper::Spawned { service, pid } => FromKeeper::Spawned {
            service: new(service)?,
            pid,
        },
        FromKeeper::SpawnFailed { service, error } => FromKeeper::SpawnFailed {
            service: new(service)?,
            error,
        },
        FromKeeper::Exited { service, pid, exit } => FromKeeper::Exited {
            service: new(service)?,
            pid,
            exit,
        },
        FromKeeper::Running { services } => FromKeeper::Running {
            services: services
                .into_iter()
                .filter_map(|(s, pid)| Some((new(s)?, pid)))
                .collect(),
        },
        other => other,
    })
}

impl Keeper {
    /// Switches to the staged segment, if it is sound and nothing it drops still runs, and
    /// says whether it did; otherwise it changes nothing (the coordinator is told so and goes
    /// on with the running configuration).
    pub(super) fn apply_reload(&mut self, from: i32) -> bool {
        let run_dir = self.config.global.run_dir.clone();
        let instance = self.config.global.instance.clone();
        let staged = match Segment::open_staged(&run_dir, &instance) {
            Ok(staged) => staged,
            Err(e) => {
                error!(error = %e, "reload: the next segment cannot be opened; nothing changes");
                return false;
            }
        };
        let new = match staged
            .config_blob()
            .map_err(|e| e.to_string())
            .and_then(|b| Config::from_image(&b))
        {
            Ok(new) => new,
            Err(e) => {
                error!(error = %e, "reload: the next segment's configuration is unreadable; nothing changes");
                return false;
            }
        };
        if new.global.instance != instance || new.global.run_dir != run_dir {
            error!("reload: the next segment is another instance's; nothing changes");
            return false;
        }
        let to_new: Vec<Option<usize>> = self
            .config
            .services
            .iter()
            .map(|s| new.service_index(&s.id))
            .collect();
        if let Some((i, _)) = self
            .service_pids
            .iter()
            .enumerate()
            .find(|(i, pid)| pid.is_some() && to_new[*i].is_none())
        {
            error!(service = %self.config.services[i].id, "reload: a service the next configuration drops still runs; nothing changes");
            return false;
        }
        let api_changed = ApiSpec::from_config(&self.config) != ApiSpec::from_config(&new);
        // The commit point: from here on, the instance is the new one.
        let segment = match staged.promote_staged() {
            Ok(segment) => segment,
            Err(e) => {
                error!(error = %e, "reload: cannot put the next segment in place; nothing changes");
                return false;
            }
        };
        // What the dropped services wrote last goes to their logs; their pipes close.
        let pipes: Vec<(RawFd, usize)> = self
            .sources
            .iter()
            .filter_map(|(&fd, source)| match source {
                Source::LogPipe(s) => Some((fd, *s)),
                _ => None,
            })
            .collect();
        for &(fd, s) in &pipes {
            if to_new[s].is_none() {
                self.on_log_pipe(fd, s);
                if let Some(pipe) = self.pipes.remove(&fd) {
                    unwatch(&self.epoll, &mut self.sources, pipe.as_fd());
                }
            }
        }
        for (fd, s) in pipes {
            if let (Some(j), Some(source)) = (to_new[s], self.sources.get_mut(&fd)) {
                *source = Source::LogPipe(j);
            }
        }
        let n = new.services.len();
        let mut logs: Vec<_> = (0..n).map(|_| None).collect();
        let mut pids = vec![None; n];
        let mut unacked = vec![None; n];
        for (i, j) in to_new.iter().enumerate() {
            if let Some(j) = *j {
                logs[j] = self.logs[i].take();
                pids[j] = self.service_pids[i];
                unacked[j] = self.unacked_exits[i];
            }
        }
        self.logs = logs;
        self.service_pids = pids;
        self.unacked_exits = unacked;
        self.run_cgroups.remap(&to_new, n);
        let children: HashMap<i32, Role> = self
            .children
            .iter()
            .map(|(&pid, &role)| match role {
                Role::Service(i) => (pid, to_new[i].map_or(Role::Hook, Role::Service)),
                other => (pid, other),
            })
            .collect();
        self.children = children;
        // What the old coordinator has not read yet, and everything from now on, waits for
        // the successor, under the new indices.
        let mut waiting = Vec::new();
        if let Some(peer) = self.peers.get_mut(&from) {
            waiting = peer.outbox.drain_unsent();
            peer.closed = true;
        }
        let queued = std::mem::take(&mut self.queued);
        self.queued = queued
            .into_iter()
            .chain(waiting)
            .filter_map(|m| remap_message(m, &to_new))
            .collect();
        self.config = new;
        self.segment = segment;
        if api_changed {
            // No service uses the API (the coordinator refuses the reload otherwise): the
            // service API's files are made again for the new services and order.
            let _ = ControlSegment::remove(&run_dir, &instance);
            if let Err(e) = ControlSegment::create(&ApiSpec::from_config(&self.config)) {
                error!(error = %e, "reload: cannot make the service API's files again");
            }
        }
        // The standby watches the old segment: retired, and the successor started once the
        // coordinator has exited makes its own.
        for (&pid, role) in &self.children {
            if *role == Role::Standby {
                info!(pid, "reload: retiring the standby of the old segment");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                self.retired_standbys.insert(pid);
            }
        }
        self.reload_handover = Some(from);
        self.record_dirty = true;
        info!(
            services = self.config.services.len(),
            "reload: the next segment is in place"
        );
        true
    }
}

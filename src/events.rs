//! Lifecycle events: what `ccmgr events` streams. This module owns the vocabulary (which
//! events exist, their JSON fields and their one-line human form) and [`EventTap`], which
//! derives them from the engine's state in the coordinator. The ring that carries them from
//! the coordinator to any number of readers is [`crate::shm::events`].
//!
//! Why derived rather than emitted at each decision: the engine is a pure state machine that
//! answers events with actions; what an operator calls an event ("web exited", "restarting
//! in 800 ms, attempt 3 of 5") is a change in a service's published record. The tap compares
//! each service's record with the one it saw at the previous publication, once per batch of
//! the coordinator's loop (where the segment is written anyway), so no decision path has to
//! remember to emit anything, and a successor that adopts the engine's state starts from
//! what its predecessor published, announcing nothing twice.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Slot, Time};
use crate::shm::events::EventRing;
use crate::vocab::{InstanceState, ProcessExit, ServiceState};

/// One event, as one line of JSON. Fields that do not apply to a kind are left out.
///
/// | `event` | meaning | fields |
/// |---|---|---|
/// | `starting` | a start is asked of the keeper | `service` |
/// | `started` | its process runs, not yet ready | `service`, `pid` |
/// | `up` | it is ready (and has run its `min_uptime`) | `service`, `pid` |
/// | `stopping` | it is being stopped | `service`, `pid` |
/// | `exited` | its process ended | `service`, `pid`, `status` or `signal` |
/// | `restarting` | it failed and will be started again | `service`, `attempt`, `of`, `delay_ms` |
/// | `failed` | it failed and stays down | `service` |
/// | `stopped` | it is down, as wanted | `service` |
/// | `operator-stopped` | it is down because the operator stopped it (`ccmgr stop SERVICE`) | `service` |
/// | `stack` | the instance's state changed | `state` |
/// | `gave-up`, `startup-failed` | the instance stopped everything after a failure | `service`, `reason` |
/// | `takeover` | the standby became the coordinator | `pid` |
/// | `standby-started`, `standby-lost` | the standby's life | `pid` |
/// | `reload-applied` | a reload's new configuration is in place (its new services start) | `pid` |
/// | `lost` | (from `ccmgr events` itself) this reader fell behind and missed events | `lost` |
///
/// Every line also has `time` (RFC 3339, UTC, milliseconds), `unix_ms` and `instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    pub time: String,
    pub unix_ms: u64,
    pub instance: String,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// The exit status, for a process that exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    /// The signal's name, for a process a signal ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// This restart's number within the retry window, and the most the window allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<u32>,
    /// How long before the restart (its restart delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// The instance's new state, for `stack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why, for `gave-up` and `startup-failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The service's restarts since the stack started (given to failure commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    /// For `lost` (written by the reader, not the ring): how many events it missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

impl LifecycleEvent {
    /// An event of `kind` for `instance`, stamped now.
    pub fn new(instance: &str, kind: &str) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        LifecycleEvent {
            time: rfc3339_utc(unix_ms),
            unix_ms,
            instance: instance.to_owned(),
            event: kind.to_owned(),
            service: None,
            pid: None,
            status: None,
            signal: None,
            attempt: None,
            of: None,
            delay_ms: None,
            state: None,
            reason: None,
            restarts: None,
            lost: None,
        }
    }

    fn service(mut self, id: &str) -> Self {
        self.service = Some(id.to_owned());
        self
    }

    fn pid(mut self, pid: Option<i32>) -> Self {
        self.pid = pid;
        self
    }

    fn exit(mut self, exit: ProcessExit) -> Self {
        match exit {
            ProcessExit::Exited(code) => self.status = Some(code),
            ProcessExit::Signaled { signal, .. } => {
                self.signal = Some(
                    Signal::try_from(signal)
                        .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned()),
                )
            }
        }
        self
    }

    /// The event as the environment of a failure command: `CCMGR_EVENT`, `CCMGR_SERVICE`,
    /// `CCMGR_EXIT_STATUS` or `CCMGR_SIGNAL`, `CCMGR_PID`, `CCMGR_RESTARTS`,
    /// `CCMGR_ATTEMPT`/`CCMGR_MAX_ATTEMPTS`, `CCMGR_DELAY_MS`, `CCMGR_REASON`, `CCMGR_TIME`.
    pub fn hook_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("CCMGR_EVENT".to_owned(), self.event.clone()),
            ("CCMGR_TIME".to_owned(), self.time.clone()),
        ];
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                env.push((k.to_owned(), v));
            }
        };
        add("CCMGR_SERVICE", self.service.clone());
        add("CCMGR_EXIT_STATUS", self.status.map(|v| v.to_string()));
        add("CCMGR_SIGNAL", self.signal.clone());
        add("CCMGR_PID", self.pid.map(|v| v.to_string()));
        add("CCMGR_RESTARTS", self.restarts.map(|v| v.to_string()));
        add("CCMGR_ATTEMPT", self.attempt.map(|v| v.to_string()));
        add("CCMGR_MAX_ATTEMPTS", self.of.map(|v| v.to_string()));
        add("CCMGR_DELAY_MS", self.delay_ms.map(|v| v.to_string()));
        add("CCMGR_REASON", self.reason.clone());
        env
    }

    /// The one-line human form `ccmgr events` prints without `--json`.
    pub fn human(&self) -> String {
        let mut line = format!("{} {}", self.time, self.instance);
        if let Some(service) = &self.service {
            line.push(' ');
            line.push_str(service);
        }
        let detail = match self.event.as_str() {
            "exited" => match (&self.status, &self.signal) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(signal)) => format!("killed by {signal}"),
                (None, None) => "exited".to_owned(),
            },
            "restarting" => {
                let mut d = "restarting".to_owned();
                if let Some(ms) = self.delay_ms.filter(|&ms| ms > 0) {
                    d.push_str(&format!(" in {ms} ms"));
                }
                if let (Some(a), Some(of)) = (self.attempt, self.of) {
                    d.push_str(&format!(" (attempt {a} of at most {of})"));
                }
                d
            }
            "stack" => match self.state.as_deref().unwrap_or("?") {
                "initializing" => "is starting".to_owned(),
                "steady" => "is steady: everything wanted is up".to_owned(),
                "recovery" => "is recovering".to_owned(),
                "failed" => "has failed".to_owned(),
                other => format!("is {other}"),
            },
            "takeover" => "coordinator changed: the standby took over".to_owned(),
            "operator-stopped" => "stopped by the operator".to_owned(),
            "reload-applied" => "reload applied: the new configuration runs".to_owned(),
            "gave-up" | "startup-failed" => format!(
                "{}: {}",
                self.event,
                self.reason.as_deref().unwrap_or("no reason recorded")
            ),
            other => other.replace('-', " "),
        };
        line.push(' ');
        line.push_str(&detail);
        if let Some(pid) = self.pid {
            line.push_str(&format!(" (pid {pid})"));
        }
        line
    }
}

/// `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (the civil-from-days algorithm; no time zone
/// database, no crate).
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// What the tap remembers of a service between publications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    state: ServiceState,
    pid: Option<i32>,
    restarts: u32,
    exited_pid: Option<i32>,
}

impl Seen {
    fn of(slot: &Slot) -> Self {
        Seen {
            state: slot.state(),
            pid: slot.pid(),
            restarts: slot.restarts,
            exited_pid: slot.exited_pid,
        }
    }
}

/// Derives events from the engine's state at each publication and appends them to the ring.
pub struct EventTap {
    /// None if the ring could not be made: the failure commands still run.
    ring: Option<EventRing>,
    instance: String,
    seen: Vec<Seen>,
    /// The instance's state last announced; None before the first announcement.
    phase: Option<InstanceState>,
}

impl EventTap {
    /// A tap for a new stack: nothing was announced, everything is stopped.
    pub fn fresh(ring: Option<EventRing>, instance: &str, services: usize) -> Self {
        let stopped = Seen {
            state: ServiceState::Stopped,
            pid: None,
            restarts: 0,
            exited_pid: None,
        };
        EventTap {
            ring,
            instance: instance.to_owned(),
            seen: vec![stopped; services],
            phase: None,
        }
    }

    /// A successor's tap: what `engine` shows (what the predecessor published) counts as
    /// announced.
    pub fn continuing(ring: Option<EventRing>, instance: &str, engine: &Engine) -> Self {
        EventTap {
            ring,
            instance: instance.to_owned(),
            seen: engine.slots().iter().map(Seen::of).collect(),
            phase: Some(engine.phase()),
        }
    }

    fn announce_phase(&mut self, phase: InstanceState) {
        self.phase = Some(phase);
        let mut e = LifecycleEvent::new(&self.instance, "stack");
        e.state = Some(phase.to_string());
        self.append(&e);
    }

    /// Append one event that is not a change of a service's record (a takeover, the standby).
    pub fn announce(&mut self, kind: &str, pid: Option<i32>) {
        let event = LifecycleEvent::new(&self.instance, kind).pid(pid);
        self.append(&event);
    }

    /// Append the end of the stack after a failure (`gave-up`, `startup-failed`); returns
    /// the event, for the instance's failure command.
    pub fn announce_failure(&mut self, kind: &str, service: &str, reason: &str) -> LifecycleEvent {
        let mut event = LifecycleEvent::new(&self.instance, kind).service(service);
        event.reason = Some(reason.to_owned());
        self.append(&event);
        event
    }

    fn append(&mut self, event: &LifecycleEvent) {
        if let Some(ring) = &mut self.ring
            && let Ok(line) = serde_json::to_string(event)
        {
            ring.append(&line);
        }
    }

    /// Compare every service's record with what was last seen, append an event per change,
    /// and wake the readers once. Called where the coordinator publishes the segment.
    /// Returns the failures among them (`restarting`, `failed`), for the failure commands.
    pub fn observe(&mut self, engine: &Engine, now: Time) -> Vec<(usize, LifecycleEvent)> {
        let mut failures = Vec::new();
        let params = engine.params();
        // A disturbance is announced before what it consists of, a result after.
        let phase = engine.phase();
        let disturbance = matches!(
            phase,
            InstanceState::Initializing | InstanceState::Recovery | InstanceState::Stopping
        );
        if disturbance && self.phase != Some(phase) {
            self.announce_phase(phase);
        }
        for (i, slot) in engine.slots().iter().enumerate() {
            let new = Seen::of(slot);
            let Some(old) = self.seen.get(i).copied() else {
                continue;
            };
            if new == old {
                continue;
            }
            self.seen[i] = new;
            let id = &params.services[i].id;
            let event = |kind: &str| LifecycleEvent::new(&self.instance, kind).service(id);
            let mut out = Vec::new();
            if new.exited_pid != old.exited_pid
                && let Some(exit) = slot.last_exit
            {
                out.push(event("exited").pid(new.exited_pid).exit(exit));
            }
            if new.restarts > old.restarts {
                let mut e = event("restarting");
                e.attempt = Some(engine.restart_window().count);
                e.of = Some(params.restart_retry_counter);
                e.delay_ms = Some(slot.not_before.saturating_sub(now).as_millis() as u64);
                out.push(e);
            }
            if new.pid != old.pid && new.pid.is_some() {
                out.push(event("started").pid(new.pid));
            } else if new.state == ServiceState::Starting
                && new.pid.is_none()
                && (old.state != ServiceState::Starting || old.pid.is_some())
            {
                out.push(event("starting"));
            }
            if new.state != old.state {
                match new.state {
                    ServiceState::Up => out.push(event("up").pid(new.pid)),
                    ServiceState::Stopping => out.push(event("stopping").pid(new.pid)),
                    ServiceState::Stopped if slot.want == crate::vocab::Want::Held => {
                        out.push(event("operator-stopped"))
                    }
                    ServiceState::Stopped => out.push(event("stopped")),
                    ServiceState::Failed => out.push(event("failed")),
                    ServiceState::Starting => {}
                }
            }
            for e in out {
                self.append(&e);
                if matches!(e.event.as_str(), "restarting" | "failed") {
                    let mut failure = e;
                    // The failure command wants to know how the process ended.
                    if let Some(exit) = slot.last_exit {
                        failure = failure.pid(new.exited_pid.or(old.pid)).exit(exit);
                    }
                    failure.restarts = Some(slot.restarts);
                    failures.push((i, failure));
                }
            }
        }
        if self.phase != Some(phase) {
            self.announce_phase(phase);
        }
        if let Some(ring) = &mut self.ring {
            ring.wake_readers();
        }
        failures
    }

    /// Wake the readers for what `announce` appended outside a publication.
    pub fn flush(&mut self) {
        if let Some(ring) = &mut self.ring {
            ring.wake_readers();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_utc(1_796_000_000_000), "2026-11-30T00:53:20.000Z");
    }

    #[test]
    fn json_leaves_out_what_does_not_apply() {
        let e = LifecycleEvent::new("demo", "exited")
            .service("web")
            .pid(Some(42))
            .exit(ProcessExit::Signaled {
                signal: 9,
                core_dumped: false,
            });
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["signal"], "SIGKILL");
        assert_eq!(json["pid"], 42);
        assert!(json.get("status").is_none());
        assert!(e.human().ends_with("demo web killed by SIGKILL (pid 42)"));
    }
}

//! The "why" of a service that is not up: one sentence from what the segment publishes (its
//! state, its progress record, what it depends on, the restart window), such as "waiting for
//! db (starting, 3.2 s of 30 s)" or "restarting in 800 ms (attempt 3 of 5 in the last 60 s)".
//! `status` shows it in its table and, for `status SERVICE...`, with the service's last log
//! lines. Pure functions of their inputs, so every sentence is tested without a stack.

use std::time::Duration;

use crate::shm::{LastExit, ServiceProgress, ServiceState, Stage, Want};
use crate::vocab::ProcessExit;

/// What a sentence is made from, for one service.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub state: ServiceState,
    /// When it entered that state (monotonic milliseconds).
    pub state_since_ms: u64,
    /// Its process is gone although its state needs one (status shows it `dead`).
    pub dead: bool,
    pub progress: ServiceProgress,
    pub last_exit: Option<LastExit>,
    /// Its startup timeout and min_uptime.
    pub startup_timeout: Duration,
    pub min_uptime: Duration,
    /// What it depends on that is not up: (id, that service's state).
    pub waiting_for: Vec<(&'a str, ServiceState)>,
    /// Restarts in the window, the most allowed, the window's length.
    pub window: (u32, u32, Duration),
    /// Monotonic milliseconds now (the segment's clock).
    pub now_ms: u64,
}

/// The sentence, or None for a service that is up.
pub fn reason(f: &Facts<'_>) -> Option<String> {
    let p = &f.progress;
    let since = |ms: u64| f.now_ms.saturating_sub(ms);
    let until = |ms: u64| ms.saturating_sub(f.now_ms);
    if f.dead {
        return Some("its process is gone and no coordinator has seen it end".to_owned());
    }
    Some(match (f.state, p.stage) {
        (ServiceState::Up, _) => return None,
        (_, Stage::Spawning) => "being started".to_owned(),
        (_, Stage::Waiting) => {
            let ran = since(p.process_since_ms);
            format!(
                "starting: not ready yet ({} of its {} startup timeout)",
                secs(ran),
                secs(f.startup_timeout.as_millis() as u64)
            )
        }
        (_, Stage::Settling) => format!(
            "ready; counts as up once it has run {} ({} so far)",
            secs(f.min_uptime.as_millis() as u64),
            secs(since(p.process_since_ms))
        ),
        (_, Stage::Stopping) => {
            let mut s = if p.start_timed_out {
                "killed: it was not ready within its startup timeout".to_owned()
            } else if p.killed {
                "stopping: SIGKILL sent".to_owned()
            } else if p.asked {
                "stopping: asked through the service API".to_owned()
            } else {
                "stopping: stop signal sent".to_owned()
            };
            if let Some(deadline) = p.deadline_ms.filter(|_| !p.killed) {
                s.push_str(&format!(
                    " {} ago, SIGKILL in {}",
                    secs(since(f.state_since_ms)),
                    secs(until(deadline))
                ));
            }
            s
        }
        (ServiceState::Failed, _) | (_, Stage::Failed) => match f.last_exit {
            Some(exit) => format!("failed: {}", ProcessExit::from(exit)),
            None => "failed".to_owned(),
        },
        (_, Stage::Finished) => "done: the one-shot task finished".to_owned(),
        (_, Stage::Stopped) | (_, Stage::Up) => match p.want {
            Want::Down => "stopped, and wanted down".to_owned(),
            Want::Held => {
                "stopped by the operator: it stays down until `ccmgr start` names it or what requires it".to_owned()
            }
            Want::Cycling => "taken down by a failure sequence; it starts again once everything the sequence stops is down".to_owned(),
            Want::Up if p.not_before_ms > f.now_ms => {
                let (restarts, most, span) = f.window;
                format!(
                    "restarting in {} (restart {restarts} of at most {most} in {})",
                    millis(until(p.not_before_ms)),
                    secs(span.as_millis() as u64)
                )
            }
            Want::Up if !f.waiting_for.is_empty() => {
                let names: Vec<String> = f
                    .waiting_for
                    .iter()
                    .map(|(id, state)| format!("{id} ({state})"))
                    .collect();
                format!("waiting for {}", names.join(", "))
            }
            Want::Up => "to be started".to_owned(),
        },
    })
}

/// `3.2 s`, `45 s`, `2 min`.
fn secs(ms: u64) -> String {
    match ms {
        0..10_000 => format!("{:.1} s", ms as f64 / 1000.0),
        10_000..120_000 => format!("{} s", ms / 1000),
        _ => format!("{} min", ms / 60_000),
    }
}

/// `800 ms`, `3.2 s`.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        secs(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(stage: Stage, want: Want) -> ServiceProgress {
        ServiceProgress {
            want,
            stage,
            killed: false,
            start_timed_out: false,
            asked: false,
            process_since_ms: 10_000,
            deadline_ms: None,
            started_at_ms: Some(10_000),
            not_before_ms: 0,
            streak: 0,
            last_failure_ms: None,
            exited_pid: None,
        }
    }

    fn facts(state: ServiceState, progress: ServiceProgress) -> Facts<'static> {
        Facts {
            state,
            state_since_ms: 10_000,
            dead: false,
            progress,
            last_exit: None,
            startup_timeout: Duration::from_secs(30),
            min_uptime: Duration::from_secs(5),
            waiting_for: Vec::new(),
            window: (3, 5, Duration::from_secs(60)),
            now_ms: 13_200,
        }
    }

    #[test]
    fn up_needs_no_reason() {
        assert_eq!(
            reason(&facts(ServiceState::Up, progress(Stage::Up, Want::Up))),
            None
        );
    }

    #[test]
    fn a_starting_service_says_how_long_of_its_timeout() {
        let f = facts(ServiceState::Starting, progress(Stage::Waiting, Want::Up));
        assert_eq!(
            reason(&f).unwrap(),
            "starting: not ready yet (3.2 s of its 30 s startup timeout)"
        );
    }

    #[test]
    fn a_service_waiting_for_its_dependencies_names_them_and_their_state() {
        let mut f = facts(ServiceState::Stopped, progress(Stage::Stopped, Want::Up));
        f.waiting_for = vec![("db", ServiceState::Starting)];
        assert_eq!(reason(&f).unwrap(), "waiting for db (starting)");
    }

    #[test]
    fn a_restart_in_its_delay_says_when_and_which_attempt() {
        let mut p = progress(Stage::Failed, Want::Up);
        p.stage = Stage::Stopped;
        p.not_before_ms = 14_000;
        let f = facts(ServiceState::Stopped, p);
        assert_eq!(
            reason(&f).unwrap(),
            "restarting in 800 ms (restart 3 of at most 5 in 60 s)"
        );
    }

    #[test]
    fn a_failed_service_says_how_it_ended() {
        let mut f = facts(ServiceState::Failed, progress(Stage::Failed, Want::Down));
        f.last_exit = Some(LastExit::Exited(1));
        assert_eq!(reason(&f).unwrap(), "failed: exited with status 1");
    }

    #[test]
    fn a_stopping_service_says_when_sigkill_comes() {
        let mut p = progress(Stage::Stopping, Want::Down);
        p.deadline_ms = Some(20_000);
        let f = facts(ServiceState::Stopping, p);
        assert_eq!(
            reason(&f).unwrap(),
            "stopping: stop signal sent 3.2 s ago, SIGKILL in 6.8 s"
        );
    }
}

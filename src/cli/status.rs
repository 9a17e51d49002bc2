//! `ccmgr status [--json]`: reads the shared segment directly (no round trip to the
//! coordinator, so it answers even when the coordinator is wedged or dead) and, when nothing
//! runs, the outcome the last run left in `run_dir`.

use serde::Serialize;

use super::lifecycle::instance_of;
use super::{Cli, Exit};
use crate::config::Config;
use crate::coordinator::LastOutcome;
use crate::process_identity::ProcessIdentity;
use crate::shm::{InstanceState, LastExit, Segment, ServiceState, ShmError, monotonic_ms};

#[derive(Serialize)]
struct Party {
    pid: Option<i32>,
}

#[derive(Serialize)]
struct ExitJson {
    code: Option<i32>,
    signal: Option<i32>,
}

#[derive(Serialize)]
struct ServiceJson {
    id: String,
    state: String,
    pid: Option<i32>,
    uptime_ms: Option<u64>,
    restarts: u32,
    last_exit: Option<ExitJson>,
}

#[derive(Serialize)]
struct StatusJson {
    instance: String,
    state: String,
    /// Seconds the instance has been in its state.
    since_ms: Option<u64>,
    coordinator: Party,
    standby: Party,
    keeper: Party,
    supervised: bool,
    restart_window: Option<Window>,
    services: Vec<ServiceJson>,
    last_run: Option<LastOutcome>,
}

#[derive(Serialize)]
struct Window {
    restarts: u32,
    started_ms_ago: u64,
}

fn exit_json(e: LastExit) -> ExitJson {
    match e {
        LastExit::Exited(code) => ExitJson {
            code: Some(code),
            signal: None,
        },
        LastExit::Signaled(sig) => ExitJson {
            code: None,
            signal: Some(sig),
        },
    }
}

fn describe_exit(e: LastExit) -> String {
    match e {
        LastExit::Exited(code) => format!("exit {code}"),
        LastExit::Signaled(sig) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => s.as_str().to_owned(),
            Err(_) => format!("signal {sig}"),
        },
    }
}

fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn last_run(global: Option<&crate::config::GlobalConfig>, instance: &str) -> Option<LastOutcome> {
    let run_dir = global?.run_dir.clone();
    let text = std::fs::read_to_string(run_dir.join(format!("{instance}.last"))).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn status(cli: &Cli, json: bool) -> Exit {
    let (instance, global) = match instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let segment = match Segment::open(&instance) {
        Ok(segment) => segment,
        Err(ShmError::NotFound { .. }) => {
            let last = last_run(global.as_ref(), &instance);
            if json {
                let out = StatusJson {
                    instance,
                    state: "stopped".into(),
                    since_ms: None,
                    coordinator: Party { pid: None },
                    standby: Party { pid: None },
                    keeper: Party { pid: None },
                    supervised: false,
                    restart_window: None,
                    services: Vec::new(),
                    last_run: last,
                };
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                println!("instance {instance}: not running");
                if let Some(last) = last {
                    let mut line = format!("last run: {}", last.outcome);
                    if let (Some(service), Some(how)) = (&last.service, &last.how) {
                        line.push_str(&format!(": service `{service}` {how}"));
                    }
                    if let Some(n) = last.restarts {
                        line.push_str(&format!(
                            ", after {n} restart{}",
                            if n == 1 { "" } else { "s" }
                        ));
                    }
                    println!("{line}");
                }
            }
            return Exit::NotRunning;
        }
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    let config = match segment
        .config_blob()
        .map_err(|e| e.to_string())
        .and_then(|b| Config::from_image(&b))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    let now = monotonic_ms();
    let inst = match segment.instance_status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
        }
    };
    let live = |p: Option<ProcessIdentity>| p.filter(ProcessIdentity::is_alive);
    let coordinator = live(inst.coordinator);
    let standby = live(inst.standby);
    let keeper = live(inst.keeper);
    let mut services = Vec::with_capacity(config.services.len());
    for (i, spec) in config.services.iter().enumerate() {
        let Ok(st) = segment.service_status(i) else {
            continue;
        };
        let pid = st.process.filter(ProcessIdentity::is_alive).map(|p| p.pid);
        services.push(ServiceJson {
            id: spec.id.clone(),
            state: st.state.to_string(),
            pid,
            uptime_ms: (st.state == ServiceState::Up)
                .then(|| now.saturating_sub(st.last_transition_ms)),
            restarts: st.restart_count,
            last_exit: st.last_exit.map(exit_json),
        });
    }
    let out = StatusJson {
        instance: instance.clone(),
        state: inst.state.to_string(),
        since_ms: Some(now.saturating_sub(inst.last_transition_ms)),
        coordinator: Party {
            pid: coordinator.map(|p| p.pid),
        },
        standby: Party {
            pid: standby.map(|p| p.pid),
        },
        keeper: Party {
            pid: keeper.map(|p| p.pid),
        },
        supervised: coordinator.is_some(),
        restart_window: Some(Window {
            restarts: inst.restarts_in_window,
            started_ms_ago: now.saturating_sub(inst.window_start_ms),
        }),
        services,
        last_run: None,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Exit::Ok;
    }
    let pid_or = |p: Option<i32>, none: &str| p.map_or_else(|| none.to_owned(), |p| p.to_string());
    println!(
        "instance {instance}: {} for {} (coordinator {}, standby {}, keeper {})",
        out.state,
        human(out.since_ms.unwrap_or(0)),
        pid_or(out.coordinator.pid, "none"),
        pid_or(out.standby.pid, "none"),
        pid_or(out.keeper.pid, "none"),
    );
    if coordinator.is_none() && inst.state != InstanceState::Stopped {
        println!(
            "warning: no coordinator is alive: nothing supervises these services (`ccmgr stop` stops them)"
        );
    }
    if segment.standby_disabled() {
        println!(
            "warning: the standby keeps dying: running without one until it has been quiet for a while (see the coordinator's log)"
        );
    }
    if let Some(w) = &out.restart_window {
        println!(
            "restarts: {} of at most {} in the window that began {} ago",
            w.restarts,
            config.global.coordinator.restart_retry_counter,
            human(w.started_ms_ago)
        );
    }
    let width = out
        .services
        .iter()
        .map(|s| s.id.len())
        .max()
        .unwrap_or(2)
        .max(7);
    println!(
        "{:<width$}  {:<8}  {:>7}  {:>8}  {:>8}  last exit",
        "SERVICE", "STATE", "PID", "UPTIME", "RESTARTS"
    );
    for s in &out.services {
        let last = match &s.last_exit {
            Some(ExitJson { code: Some(c), .. }) => describe_exit(LastExit::Exited(*c)),
            Some(ExitJson {
                signal: Some(sig), ..
            }) => describe_exit(LastExit::Signaled(*sig)),
            _ => "-".into(),
        };
        println!(
            "{:<width$}  {:<8}  {:>7}  {:>8}  {:>8}  {last}",
            s.id,
            s.state,
            pid_or(s.pid, "-"),
            s.uptime_ms.map_or_else(|| "-".into(), human),
            s.restarts,
        );
    }
    Exit::Ok
}

//! `ccmgr status [--json]`: reads the shared segment directly (no round trip to the
//! coordinator, so it answers even when the coordinator is wedged or dead) and, when nothing
//! runs, the outcome the last run left in `run_dir`.
//!
//! It never repeats a state it cannot vouch for: every recorded pid is checked against its
//! start time, so a service whose process is gone is `dead`, never `up`; the stack is
//! `supervised` only while a coordinator and the keeper live and can answer (neither frozen
//! by SIGSTOP nor a zombie). When the segment cannot be read (truncated, corrupt), it says so
//! and lists what the keeper's process record in `run_dir` says runs.
//!
//! Exit codes: 0, the instance runs (read `supervised` and the service states for its health);
//! 3, it does not run; 1, its state cannot be read (a damaged segment, or processes of the
//! instance that no segment describes).

use serde::Serialize;

use super::lifecycle::instance_of;
use super::{Cli, Exit};
use crate::config::Config;
use crate::config::ReadyKind;
use crate::coordinator::LastOutcome;
use crate::process_identity::ProcessIdentity;
use crate::records::ProcessRecord;
use crate::shm::{InstanceState, LastExit, Segment, ServiceState, ShmError, monotonic_ms};

#[derive(Serialize)]
struct Party {
    pid: Option<i32>,
}

/// Whether `who` (the coordinator or the keeper) lives and can answer: a process frozen by
/// SIGSTOP (state `T`, or `t` under a tracer) holds its locks but does nothing.
fn answering(who: ProcessIdentity) -> bool {
    who.is_alive() && !who.is_frozen()
}

/// Supervision takes both: the coordinator decides, but only the keeper can start, signal and
/// reap; a coordinator whose keeper died or froze supervises nothing.
fn supervised(coordinator: Option<ProcessIdentity>, keeper: Option<ProcessIdentity>) -> bool {
    coordinator.is_some_and(answering) && keeper.is_some_and(answering)
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

impl StatusJson {
    /// An instance of which nothing runs: stopped, no party, the services as last known.
    fn not_running(
        instance: String,
        services: Vec<ServiceJson>,
        last_run: Option<LastOutcome>,
    ) -> Self {
        StatusJson {
            instance,
            state: "stopped".into(),
            since_ms: None,
            coordinator: Party { pid: None },
            standby: Party { pid: None },
            keeper: Party { pid: None },
            supervised: false,
            restart_window: None,
            services,
            last_run,
        }
    }
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

/// `only`: the services to show (all when empty); one the running stack does not have is
/// bad usage, with a suggestion.
pub fn status(cli: &Cli, json: bool, only: &[String]) -> Exit {
    let (instance, global) = match instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let segment = match Segment::open(&instance) {
        Ok(segment) => segment,
        Err(ShmError::NotFound { .. }) => {
            if let Some(exit) = report_from_record(&instance, global.as_ref(), None, json) {
                return exit;
            }
            let last = last_run(global.as_ref(), &instance);
            if json {
                let out = StatusJson::not_running(instance, Vec::new(), last);
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
            return report_from_record(&instance, global.as_ref(), Some(e.to_string()), json)
                .unwrap_or(Exit::Failed);
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
    let ids: Vec<&str> = config.services.iter().map(|s| s.id.as_str()).collect();
    let unknown: Vec<&String> = only
        .iter()
        .filter(|id| !ids.contains(&id.as_str()))
        .collect();
    for id in &unknown {
        eprintln!("error: instance {instance} has no service `{id}`");
        if let Some(like) = crate::config::did_you_mean(id, ids.iter().copied()) {
            eprintln!("  note: did you mean `{like}`?");
        }
    }
    if !unknown.is_empty() {
        return Exit::BadConfig;
    }
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
    let supervised = supervised(coordinator, keeper);
    let mut services = Vec::with_capacity(config.services.len());
    for (i, spec) in config.services.iter().enumerate() {
        if !only.is_empty() && !only.contains(&spec.id) {
            continue;
        }
        let Ok(st) = segment.service_status(i) else {
            continue;
        };
        let pid = st.process.filter(ProcessIdentity::is_alive).map(|p| p.pid);
        // A state that needs a process is only true while that process lives (a finished
        // one-shot is up with none).
        let needs_process = match st.state {
            ServiceState::Starting | ServiceState::Stopping => st.process.is_some(),
            ServiceState::Up => st.process.is_some() || spec.ready != ReadyKind::Exit,
            ServiceState::Stopped | ServiceState::Failed => false,
        };
        let dead = needs_process && pid.is_none();
        // A service the operator stopped (`ccmgr stop SERVICE`) stays down until started.
        let held = st.state == ServiceState::Stopped
            && segment
                .service_progress(i)
                .is_ok_and(|p| p.want == crate::vocab::Want::Held);
        let state = match (dead, supervised) {
            (false, _) if held => crate::vocab::Want::Held.to_string(),
            (false, _) => st.state.to_string(),
            (true, true) => "dead".to_owned(),
            (true, false) => "dead (unsupervised)".to_owned(),
        };
        services.push(ServiceJson {
            id: spec.id.clone(),
            state,
            pid,
            uptime_ms: (st.state == ServiceState::Up && !dead)
                .then(|| now.saturating_sub(st.last_transition_ms)),
            restarts: st.restart_count,
            last_exit: st.last_exit.map(exit_json),
        });
    }
    // A segment alone is no running instance: after a kill -9 of everything it still says
    // "steady". When no process it or the keeper's record names lives, the instance does not
    // run, whatever state it last recorded.
    let record_survivors = global.as_ref().is_some_and(|g| {
        ProcessRecord::read(&crate::records::record_path(&g.run_dir, &instance))
            .ok()
            .flatten()
            .is_some_and(|r| !r.survivors().is_empty())
            || super::stop_driver::cgroups_populated(&g.run_dir, &instance)
    });
    let nothing_lives = live(inst.manager).is_none()
        && coordinator.is_none()
        && standby.is_none()
        && keeper.is_none()
        && services.iter().all(|s| s.pid.is_none())
        && !record_survivors;
    if nothing_lives {
        let outcome = format!(
            "killed: no process of the instance lives, but its state (last recorded: {}) was left behind; `ccmgr stop` removes it",
            inst.state
        );
        if json {
            let last = LastOutcome {
                outcome,
                service: None,
                how: None,
                restarts: None,
                at_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            let out = StatusJson::not_running(instance, services, Some(last));
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        } else {
            println!("instance {instance}: not running");
            println!("last run: {outcome}");
        }
        return Exit::NotRunning;
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
        supervised,
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
    if inst.state != InstanceState::Stopped {
        match coordinator {
            None => println!(
                "warning: no coordinator is alive: nothing supervises these services (`ccmgr stop` stops them)"
            ),
            Some(c) if !answering(c) => println!(
                "warning: the coordinator (pid {}) is frozen (stopped): nothing supervises these services (`ccmgr stop` stops them)",
                c.pid
            ),
            // The coordinator answers, but only the keeper can start, signal and reap.
            Some(_) if !supervised => match keeper {
                None => println!(
                    "warning: the keeper is dead: nothing can start, stop or reap these services (`ccmgr stop` stops them)"
                ),
                Some(k) => println!(
                    "warning: the keeper (pid {}) is frozen (stopped): nothing can start, stop or reap these services (`ccmgr stop` stops them)",
                    k.pid
                ),
            },
            Some(_) => {}
        }
    }
    if let Some(st) = standby.filter(|s| !answering(*s)) {
        println!(
            "warning: the standby (pid {}) is frozen (stopped): it cannot take over while it is",
            st.pid
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
        "{:<width$}  {:<23}  {:>7}  {:>8}  {:>8}  last exit",
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
            "{:<width$}  {:<23}  {:>7}  {:>8}  {:>8}  {last}",
            s.id,
            s.state,
            pid_or(s.pid, "-"),
            s.uptime_ms.map_or_else(|| "-".into(), human),
            s.restarts,
        );
    }
    Exit::Ok
}

/// The instance has no readable segment (`damage` says why, `None` when there is none at
/// all): report what the keeper's process record says runs. `None` when there is no record,
/// or, without damage, when nothing it names lives (the instance is simply not running).
fn report_from_record(
    instance: &str,
    global: Option<&crate::config::GlobalConfig>,
    damage: Option<String>,
    json: bool,
) -> Option<Exit> {
    let read =
        global.map(|g| ProcessRecord::read(&crate::records::record_path(&g.run_dir, instance)));
    // A record that exists but cannot be read is no "no record": say which it is.
    let (record, record_missing) = match read {
        Some(Ok(record)) => (record, "no process record was found".to_owned()),
        Some(Err(e)) => (None, format!("the process record is unusable ({e})")),
        None => (None, "no process record was found".to_owned()),
    };
    let record = match (record, &damage) {
        (Some(r), _) => r,
        (None, Some(why)) => {
            eprintln!(
                "ccmgr: the shared state of instance {instance} is damaged: {why}; and {record_missing} (`ccmgr stop` stops what the cgroups hold)"
            );
            return Some(Exit::Failed);
        }
        (None, None) => return None,
    };
    if damage.is_none() && record.survivors().is_empty() {
        return None;
    }
    let alive = |r: Option<crate::records::Recorded>| {
        r.map(ProcessIdentity::from)
            .filter(ProcessIdentity::is_alive)
            .map(|p| p.pid)
    };
    let why = damage.unwrap_or_else(|| "it has no shared state".to_owned());
    let services: Vec<ServiceJson> = record
        .services
        .iter()
        .map(|s| {
            let pid = alive(Some(s.process));
            ServiceJson {
                id: s.id.clone(),
                state: if pid.is_some() {
                    "running (unsupervised)".into()
                } else {
                    "dead (unsupervised)".into()
                },
                pid,
                uptime_ms: None,
                restarts: 0,
                last_exit: None,
            }
        })
        .collect();
    let coordinator = alive(record.coordinator);
    let supervised = supervised(
        record.coordinator.map(ProcessIdentity::from),
        record.keeper.map(ProcessIdentity::from),
    );
    if json {
        let out = StatusJson {
            instance: instance.to_owned(),
            state: "damaged".into(),
            since_ms: None,
            coordinator: Party { pid: coordinator },
            standby: Party {
                pid: alive(record.standby),
            },
            keeper: Party {
                pid: alive(record.keeper),
            },
            supervised,
            restart_window: None,
            services,
            last_run: None,
        };
        let mut value = serde_json::to_value(&out).unwrap_or_default();
        value["damage"] = serde_json::Value::String(why);
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        let pid_or = |p: Option<i32>| p.map_or_else(|| "none".to_owned(), |p| p.to_string());
        println!("instance {instance}: DAMAGED: {why}");
        println!(
            "the keeper's process record says (coordinator {}, standby {}, keeper {}); `ccmgr stop` stops them:",
            pid_or(coordinator),
            pid_or(alive(record.standby)),
            pid_or(alive(record.keeper)),
        );
        let width = services
            .iter()
            .map(|s| s.id.len())
            .max()
            .unwrap_or(2)
            .max(7);
        println!("{:<width$}  {:<22}  {:>7}", "SERVICE", "STATE", "PID");
        for s in &services {
            println!(
                "{:<width$}  {:<22}  {:>7}",
                s.id,
                s.state,
                s.pid.map_or_else(|| "-".to_owned(), |p| p.to_string())
            );
        }
    }
    Some(Exit::Failed)
}

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
//! The instance's owner reads the live segment; anyone else allowed to read it (the members of
//! the instance's `group`: the segment is 0640) reads a consistent private copy of it
//! ([`Segment::open_snapshot`]), so a reader can never write the instance's state.
//!
//! Exit codes: 0, the instance runs (read `supervised` and the service states for its health);
//! 3, it does not run; 1, its state cannot be read (a damaged segment, or processes of the
//! instance that no segment describes).

use serde::Serialize;

use super::lifecycle::{instance_of, run_dir_of};
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
    /// Why it is not up, in one sentence; null when it is up.
    reason: Option<String>,
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

/// The segment as this caller may see it: the live one for the instance's owner (the owner of
/// `run_dir`); for anyone else (a member of the instance's group), a consistent private copy,
/// through which nothing can write the real segment or take its mutexes.
pub(super) fn open_for_status(
    run_dir: &std::path::Path,
    instance: &str,
) -> Result<Segment, ShmError> {
    use std::os::unix::fs::MetadataExt as _;
    let me = nix::unistd::geteuid().as_raw();
    match std::fs::metadata(run_dir) {
        Ok(meta) if meta.uid() == me => Segment::open(run_dir, instance),
        _ => Segment::open_snapshot(run_dir, instance),
    }
}

pub fn status(cli: &Cli, json: bool, named: &[String]) -> Exit {
    let (instance, global) = match instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let run_dir = run_dir_of(&instance, global.as_ref());
    let segment = match open_for_status(&run_dir, &instance) {
        Ok(segment) => segment,
        Err(ShmError::NotFound { .. })
        | Err(ShmError::UntrustedDir(crate::shm::DirTrustError::Missing { .. })) => {
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
        // Not damage: a directory whose files cannot be trusted (nor its records).
        Err(e @ ShmError::UntrustedDir(_)) => {
            eprintln!("ccmgr: {e}");
            return Exit::Failed;
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
    // Unknown names are bad usage, before anything is printed.
    let mut wanted = Vec::with_capacity(named.len());
    for name in named {
        match config.services.iter().position(|s| &s.id == name) {
            Some(i) => wanted.push(i),
            None => {
                eprintln!("error: instance {instance} has no service `{name}`");
                let ids = config.services.iter().map(|s| s.id.as_str());
                if let Some(close) = crate::config::did_you_mean(name, ids) {
                    eprintln!("  note: did you mean `{close}`?");
                }
                return Exit::BadConfig;
            }
        }
    }
    let statuses: Vec<_> = (0..config.services.len())
        .map(|i| segment.service_status(i).ok())
        .collect();
    let coordinator_config = &config.global.coordinator;
    let mut services = Vec::with_capacity(config.services.len());
    for (i, spec) in config.services.iter().enumerate() {
        let Some(st) = statuses[i] else {
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
        let progress = segment.service_progress(i).ok();
        // A service the operator stopped (`ccmgr stop SERVICE`) stays down until started.
        let held = st.state == ServiceState::Stopped
            && progress.is_some_and(|p| p.want == crate::vocab::Want::Held);
        let state = match (dead, supervised) {
            (false, _) if held => crate::vocab::Want::Held.to_string(),
            (false, _) => st.state.to_string(),
            (true, true) => "dead".to_owned(),
            (true, false) => "dead (unsupervised)".to_owned(),
        };
        let reason = progress.and_then(|progress| {
            let waiting_for = config
                .graph
                .dependencies(i)
                .into_iter()
                .filter_map(|(dep, kind)| {
                    let dep_state = statuses.get(dep).copied().flatten()?.state;
                    // A wanted service whose start failed is waited for no longer.
                    let waited = dep_state != ServiceState::Up
                        && !(kind == crate::graph::EdgeKind::Wants
                            && dep_state == ServiceState::Failed);
                    waited.then(|| (config.services[dep].id.as_str(), dep_state))
                })
                .collect();
            super::why::reason(&super::why::Facts {
                state: st.state,
                state_since_ms: st.last_transition_ms,
                dead,
                progress,
                last_exit: st.last_exit,
                startup_timeout: spec.startup_timeout.into(),
                min_uptime: spec.min_uptime.into(),
                waiting_for,
                window: (
                    inst.restarts_in_window,
                    coordinator_config.restart_retry_counter,
                    coordinator_config.restart_time_span.into(),
                ),
                now_ms: now,
            })
        });
        services.push(ServiceJson {
            id: spec.id.clone(),
            state,
            pid,
            uptime_ms: (st.state == ServiceState::Up && !dead)
                .then(|| now.saturating_sub(st.last_transition_ms)),
            restarts: st.restart_count,
            last_exit: st.last_exit.map(exit_json),
            reason,
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
    if !named.is_empty() {
        return explain(&out, &wanted, &config, json);
    }
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
        "{:<width$}  {:<23}  {:>7}  {:>8}  {:>8}  {:<9}  WHY",
        "SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT"
    );
    let paint = Paint::for_stdout();
    for s in &out.services {
        let last = match &s.last_exit {
            Some(ExitJson { code: Some(c), .. }) => describe_exit(LastExit::Exited(*c)),
            Some(ExitJson {
                signal: Some(sig), ..
            }) => describe_exit(LastExit::Signaled(*sig)),
            _ => "-".into(),
        };
        let line = format!(
            "{:<width$}  {}  {:>7}  {:>8}  {:>8}  {last:<9}  {}",
            s.id,
            paint.state(&s.state, 23),
            pid_or(s.pid, "-"),
            s.uptime_ms.map_or_else(|| "-".into(), human),
            s.restarts,
            s.reason.as_deref().unwrap_or("-"),
        );
        println!("{}", line.trim_end());
    }
    Exit::Ok
}

/// `status SERVICE...`: one line per named service (its state, or why it is not up), then its
/// last log lines; `--json`: the status document with only those services.
fn explain(out: &StatusJson, wanted: &[usize], config: &Config, json: bool) -> Exit {
    let picked: Vec<&ServiceJson> = wanted
        .iter()
        .filter_map(|&i| out.services.iter().find(|s| s.id == config.services[i].id))
        .collect();
    if json {
        let mut doc = serde_json::to_value(out).unwrap_or_default();
        doc["services"] = serde_json::to_value(&picked).unwrap_or_default();
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Exit::Ok;
    }
    let paint = Paint::for_stdout();
    for (n, s) in picked.iter().enumerate() {
        if n > 0 {
            println!();
        }
        // "failed: exited with status 4", not "failed: failed: ...".
        let mut line = match s.reason.as_deref() {
            Some(reason) if reason.starts_with(s.state.as_str()) => {
                let rest = &reason[s.state.len()..];
                format!("{}: {}{rest}", s.id, paint.state(&s.state, 0))
            }
            Some(reason) => format!("{}: {}: {reason}", s.id, paint.state(&s.state, 0)),
            None => format!("{}: {}", s.id, paint.state(&s.state, 0)),
        };
        match (s.pid, s.uptime_ms) {
            (Some(pid), Some(up)) => line.push_str(&format!(" (pid {pid}, up {})", human(up))),
            (Some(pid), None) => line.push_str(&format!(" (pid {pid})")),
            _ => {}
        }
        println!("{line}");
        // As `start`'s failure report reads them: through `logsink::open_read`, which follows
        // no link and blocks on no FIFO planted at the log's name.
        for l in crate::logsink::tail(&config.global.log_dir, &s.id, LOG_LINES) {
            println!("  | {l}");
        }
    }
    Exit::Ok
}

/// How many of a service's last log lines `status SERVICE` shows.
const LOG_LINES: usize = 5;

/// Colour for the state column: only on a terminal, never with `NO_COLOR` set (no-color.org)
/// or `TERM=dumb`.
struct Paint {
    on: bool,
}

impl Paint {
    fn for_stdout() -> Paint {
        use std::io::IsTerminal;
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Paint {
            on: std::io::stdout().is_terminal() && !no_color && !dumb,
        }
    }

    /// `state` padded to `width`, coloured by what it means.
    fn state(&self, state: &str, width: usize) -> String {
        let padded = format!("{state:<width$}");
        if !self.on {
            return padded;
        }
        let colour = match state {
            "up" => "32",                    // green
            "starting" | "stopping" => "33", // yellow
            "stopped" => "2",                // dim
            _ => "31",                       // red: failed, dead
        };
        format!("\x1b[{colour}m{padded}\x1b[0m")
    }
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
                reason: Some(
                    "the shared state is unreadable: only the keeper's process record speaks for it"
                        .to_owned(),
                ),
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

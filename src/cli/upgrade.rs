//! `ccmgr upgrade`: the client of the keeper's upgrade socket ([`crate::upgrade`]), and the
//! entry of a keeper re-executed on its state (`internal keeper --resume-state FD`).
//!
//! The client is the new binary. It checks, before it touches any process, that it can read
//! what the running instance wrote (the segment's and the service API control segment's
//! layout versions), asks the keeper to re-execute itself into this binary, and then watches
//! the keeper's process record until a coordinator and a standby of the new binary run.

use std::os::fd::{AsFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::lifecycle::{instance_of, refuse_non_owner, run_dir_of};
use super::{Cli, Exit, say};
use crate::config::Config;
use crate::keeper::reexec::{self, KeeperState, Resume};
use crate::records::{ProcessRecord, Recorded};
use crate::shm::api::{API_LAYOUT_VERSION, CONTROL_MAGIC, ControlHeader};
use crate::shm::layout::LAYOUT_VERSION;
use crate::shm::{Segment, ShmError};
use crate::upgrade::{self as up, Reply, Request};

/// How long the keeper may take to answer, and the new coordinator and standby to show.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(30);

/// `ccmgr upgrade`.
pub fn upgrade(cli: &Cli) -> Exit {
    let outcome = run(cli);
    let exit = match &outcome {
        Ok(_) => Exit::Ok,
        Err((exit, why)) => {
            // An empty reason: the check that failed has said why already.
            if !why.is_empty() {
                eprintln!("ccmgr: {why}");
            }
            *exit
        }
    };
    if cli.json {
        let doc = match &outcome {
            Ok(done) => serde_json::json!({
                "verb": "upgrade", "ok": true, "exit_code": 0,
                "instance": done.instance, "exe": done.exe,
                "keeper": done.keeper, "coordinator": {"old": done.old_coordinator, "new": done.coordinator},
                "standby": {"old": done.old_standby, "new": done.standby},
                "services": done.services,
            }),
            Err((exit, why)) => serde_json::json!({
                "verb": "upgrade", "ok": false, "exit_code": *exit as u8, "why": why,
            }),
        };
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    exit
}

/// What an upgrade replaced.
struct Upgraded {
    instance: String,
    exe: PathBuf,
    keeper: i32,
    old_coordinator: Option<i32>,
    coordinator: i32,
    old_standby: Option<i32>,
    standby: Option<i32>,
    services: usize,
}

type Failure = (Exit, String);

fn run(cli: &Cli) -> Result<Upgraded, Failure> {
    let (instance, global) = instance_of(cli).map_err(|e| (e, String::new()))?;
    let run_dir = run_dir_of(&instance, global.as_ref());
    refuse_non_owner(&instance, &run_dir).map_err(|e| (e, String::new()))?;
    let exe = new_binary()?;
    let not_running = || {
        (
            Exit::NotRunning,
            format!("instance {instance} is not running: nothing to upgrade"),
        )
    };
    if !crate::shm::segment_path(&run_dir, &instance).is_ok_and(|p| p.exists()) {
        return Err(not_running());
    }
    // Before any process is touched: can this binary read what the instance wrote?
    let segment = match Segment::open(&run_dir, &instance) {
        Ok(segment) => segment,
        Err(ShmError::NotFound { .. }) => return Err(not_running()),
        Err(ShmError::WrongVersion { found, .. }) => {
            let why = up::layout_refusal("segment", found, LAYOUT_VERSION).unwrap_or_default();
            return Err((Exit::Failed, format!("upgrade refused: {why}")));
        }
        Err(e) => {
            return Err((
                Exit::Failed,
                format!("upgrade refused: the instance's state cannot be read: {e}"),
            ));
        }
    };
    if let Some(why) = api_layout_refusal(&run_dir, &instance) {
        return Err((Exit::Failed, format!("upgrade refused: {why}")));
    }
    let config = segment
        .config_blob()
        .map_err(|e| e.to_string())
        .and_then(|blob| Config::from_image(&blob))
        .map_err(|e| {
            (
                Exit::Failed,
                format!("upgrade refused: the running configuration cannot be read: {e}"),
            )
        })?;
    let record_path = crate::records::record_path(&run_dir, &instance);
    let before = ProcessRecord::read(&record_path).ok().flatten();
    let keeper_before = before.as_ref().and_then(|r| r.keeper);
    let socket = up::socket_path(&run_dir, &instance);
    let conn = match up::connect_socket(&socket) {
        Ok(conn) => conn,
        Err(Errno::EACCES | Errno::EPERM) => {
            return Err((
                Exit::NotPermitted,
                format!(
                    "cannot connect to {}: only the instance's owner may upgrade it",
                    socket.display()
                ),
            ));
        }
        Err(e) => {
            let keeper_alive = keeper_before.is_some_and(|k| alive(&k));
            return Err(if keeper_alive {
                (
                    Exit::Failed,
                    format!(
                        "the running keeper of instance {instance} does not serve upgrades ({}: {e}): it predates `ccmgr upgrade`; stop and start the instance to move to this binary",
                        socket.display()
                    ),
                )
            } else {
                not_running()
            });
        }
    };
    let timeout = nix::sys::time::TimeVal::new(ANSWER_DEADLINE.as_secs() as i64, 0);
    let _ =
        nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
    let request = Request {
        exe: exe.clone(),
        state_version: up::STATE_VERSION,
        layout_version: LAYOUT_VERSION,
        api_layout_version: API_LAYOUT_VERSION,
    };
    up::send_message(conn.as_fd(), &request)
        .map_err(|e| (Exit::Failed, format!("cannot ask the keeper: {e}")))?;
    let mut executing = false;
    let keeper = loop {
        let reply = match up::recv_message::<Reply>(conn.as_fd()) {
            Ok(Some(reply)) => reply,
            Ok(None) if executing => {
                return Err((
                    Exit::Failed,
                    format!(
                        "the keeper re-executed itself into {} and ended without resuming: the new binary failed at its start (see ccmgr's log). The services run on without a keeper: `ccmgr status` and `ccmgr stop` still reach them",
                        exe.display()
                    ),
                ));
            }
            Ok(None) => {
                return Err((
                    Exit::Failed,
                    "the keeper closed the connection without answering".into(),
                ));
            }
            Err(Errno::EAGAIN) => {
                return Err((
                    Exit::Failed,
                    format!(
                        "the keeper did not answer within {} s",
                        ANSWER_DEADLINE.as_secs()
                    ),
                ));
            }
            Err(e) => {
                return Err((
                    Exit::Failed,
                    format!("cannot read the keeper's answer: {e}"),
                ));
            }
        };
        match reply {
            Reply::NotPermitted { why } => return Err((Exit::NotPermitted, why)),
            Reply::Refused { why } => {
                return Err((Exit::Failed, format!("upgrade refused: {why}")));
            }
            Reply::Failed { why } => {
                return Err((
                    Exit::Failed,
                    format!("upgrade failed, and the keeper goes on unchanged: {why}"),
                ));
            }
            Reply::RolledBack { why } => {
                return Err((
                    Exit::Failed,
                    format!(
                        "upgrade failed: the new binary could not resume the keeper ({why}); the previous binary was executed back and runs it, nothing else was changed"
                    ),
                ));
            }
            Reply::Executing { .. } => executing = true,
            Reply::Resumed { keeper, .. } => break keeper,
        }
    };
    let old_coordinator = before.as_ref().and_then(|r| r.coordinator.map(|c| c.pid));
    let old_standby = before.as_ref().and_then(|r| r.standby.map(|s| s.pid));
    let wants_standby = config.global.coordinator.standby;
    let deadline = Instant::now() + TAKEOVER_DEADLINE;
    let (coordinator, standby, services) = loop {
        let record = ProcessRecord::read(&record_path).ok().flatten();
        let new = |r: Option<Recorded>, old: Option<i32>| {
            r.filter(|p| Some(p.pid) != old && alive(p) && runs(p.pid, &exe))
                .map(|p| p.pid)
        };
        if let Some(record) = &record {
            let coordinator = new(record.coordinator, old_coordinator);
            let standby = new(record.standby, old_standby);
            if let Some(c) = coordinator
                && (standby.is_some() || !wants_standby)
            {
                break (c, standby, record.services.len());
            }
        }
        if Instant::now() >= deadline {
            return Err((
                Exit::Failed,
                format!(
                    "the keeper (pid {keeper}) runs {} now, but no coordinator and standby of it showed within {} s: see `ccmgr status` and ccmgr's log",
                    exe.display(),
                    TAKEOVER_DEADLINE.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let shown = |p: Option<i32>| p.map_or_else(|| "none".to_owned(), |p| p.to_string());
    say(&format!(
        "upgraded instance {instance} to {}: keeper pid {keeper} re-executed in place; coordinator {} -> {coordinator}; standby {} -> {}; {services} services kept their processes",
        exe.display(),
        shown(old_coordinator),
        shown(old_standby),
        shown(standby),
    ));
    Ok(Upgraded {
        instance,
        exe,
        keeper,
        old_coordinator,
        coordinator,
        old_standby,
        standby,
        services,
    })
}

/// This binary, as the path the keeper is to execute: `/proc/self/exe` resolved now.
fn new_binary() -> Result<PathBuf, Failure> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| {
        (
            Exit::Failed,
            format!("cannot tell which binary this is: {e}"),
        )
    })?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err((
            Exit::Failed,
            format!(
                "this ccmgr binary was removed or replaced since it started ({}): run the installed one",
                exe.display()
            ),
        ));
    }
    Ok(exe)
}

/// Why this binary cannot read the service API control segment of the instance, if it
/// exists and has another layout version.
fn api_layout_refusal(run_dir: &Path, instance: &str) -> Option<String> {
    use std::io::Read as _;
    let path = crate::shm::api::control_path(run_dir, instance).ok()?;
    let mut header = [0u8; size_of::<ControlHeader>()];
    std::fs::File::open(path)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    let at = |off: usize, n: usize| &header[off..off + n];
    let magic = u64::from_ne_bytes(
        at(std::mem::offset_of!(ControlHeader, magic), 8)
            .try_into()
            .ok()?,
    );
    let version = u32::from_ne_bytes(
        at(std::mem::offset_of!(ControlHeader, layout_version), 4)
            .try_into()
            .ok()?,
    );
    if magic != CONTROL_MAGIC {
        return None;
    }
    up::layout_refusal("service API control segment", version, API_LAYOUT_VERSION)
}

fn alive(p: &Recorded) -> bool {
    crate::process_identity::ProcessIdentity::of(p.pid)
        .is_ok_and(|id| id.start_time == p.start_time)
}

/// Whether `pid` runs the binary at `exe`.
fn runs(pid: i32, exe: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
}

/// `internal keeper --resume-state FD`: a keeper re-executed by `ccmgr upgrade` (or rolled
/// back to its previous binary) rebuilds itself from the state its previous image left.
/// When it cannot, it executes the previous binary back on the same state.
pub fn internal_keeper_resume(
    run_dir: &Path,
    instance: &str,
    state_fd: RawFd,
    previous_exe: Option<RawFd>,
    rollback_reason: Option<String>,
) -> Exit {
    if !up::fd_is_open(state_fd) {
        eprintln!("ccmgr: internal keeper: fd {state_fd} (the state) is not open");
        return Exit::Failed;
    }
    let state_owned = up::claim_handed_fd(state_fd);
    // Kept for a roll-back (which clears the flag again), never for a child.
    let _ = up::set_cloexec(&[state_owned.as_fd()], true);
    let previous = previous_exe
        .filter(|&fd| up::fd_is_open(fd))
        .map(up::claim_handed_fd);
    if let Some(previous) = &previous {
        // Not for the image it may execute: fexecve opens the binary before the close.
        let _ = up::set_cloexec(&[previous.as_fd()], true);
    }
    // Both are closed once the keeper is rebuilt (no roll-back can come after that), so that
    // the previous binary's file is not held open for the rest of the keeper's life.
    let state_owned = std::cell::RefCell::new(Some(state_owned));
    let previous = std::cell::RefCell::new(previous);
    let fail = |why: String| -> Exit {
        match (previous.borrow().as_ref(), state_owned.borrow().as_ref()) {
            (Some(previous), Some(state)) => {
                tracing::error!(
                    "cannot resume the keeper in the new binary ({why}): rolling back to the previous binary"
                );
                let lost = reexec::roll_back(instance, run_dir, state.as_fd(), previous, &why);
                tracing::error!("{lost}");
                eprintln!("ccmgr: {lost}");
            }
            _ => {
                tracing::error!("cannot resume the keeper: {why}");
                eprintln!("ccmgr: cannot resume the keeper: {why}");
            }
        }
        Exit::Failed
    };
    let read = state_owned
        .borrow()
        .as_ref()
        .map(up::read_state_fd)
        .unwrap_or_else(|| Err(std::io::Error::other("no state")));
    let state: KeeperState = match read
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(state) => state,
        Err(e) => return fail(format!("the state does not read: {e}")),
    };
    let opened = Segment::open(run_dir, instance)
        .map_err(|e| e.to_string())
        .and_then(|segment| {
            let blob = segment.config_blob().map_err(|e| e.to_string())?;
            Ok((segment, Config::from_image(&blob)?))
        });
    let (segment, config) = match opened {
        Ok(found) => found,
        Err(e) => return fail(e),
    };
    let _span = crate::logging::init(
        Some(&crate::coordinator::coordinator_log_path(&config)),
        state.foreground,
        "keeper",
    );
    if std::env::var_os("CCMGR_TEST_UPGRADE_FAIL_RESUME").is_some() && rollback_reason.is_none() {
        // The roll-back's test: a new binary that cannot rebuild from the state.
        return fail("CCMGR_TEST_UPGRADE_FAIL_RESUME is set".into());
    }
    let result = reexec::resume(
        Resume {
            state,
            config,
            segment: Some(segment),
            rollback_reason,
        },
        || {
            state_owned.borrow_mut().take();
            previous.borrow_mut().take();
        },
    );
    // Only a resume that failed comes back before the stack's end; its fds are all there.
    match result {
        Ok(0) => Exit::Ok,
        Ok(_) => Exit::Failed,
        Err(e) => fail(e.to_string()),
    }
}

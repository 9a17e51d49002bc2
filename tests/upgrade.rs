//! `ccmgr upgrade` with real processes: from the binary of the previous commit (built here)
//! to this one, and from this binary to itself; a service killed while the keeper is between
//! its two images; an incompatible segment layout refused with nothing changed; a new binary
//! that cannot resume rolled back; and the exit codes of an instance that is not running.
//!
//! "The previous commit": the newest strict ancestor of HEAD whose tree has `src/upgrade.rs`
//! (the protocol), exported with `git archive` and built (`cargo build --bin ccmgr`, debug)
//! with a target dir under this crate's `target/tmp/upgrade-from/`, so a rerun costs nothing.
//! A checkout without git history (or with no such ancestor) fails the acceptance test with a
//! message saying so, unless `CCMGR_UPGRADE_FROM` names the old binary to use: it never
//! passes silently.

mod stack_support;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ccmgr::upgrade::{Reply, Request};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use stack_support::{CCMGR, Stack, text, up_anew};

const LONG: Duration = Duration::from_secs(30);

fn service(id: &str, requires: &str) -> String {
    format!(
        "command = [\"sh\", \"-c\", \"echo {id} started; exec sleep 1000\"]\nrestart_delay = \"0ms\"\n{requires}\n"
    )
}

/// A two-service stack (b requires a), started with `binary`, steady with its standby.
fn started_with(test: &str, binary: &Path, env: &[(&str, &str)]) -> (Stack, Value) {
    started_with_global(test, "", binary, env)
}

/// [`started_with`], with `global` added to the stack's ccmgr.toml.
fn started_with_global(
    test: &str,
    global: &str,
    binary: &Path,
    env: &[(&str, &str)],
) -> (Stack, Value) {
    let stack = Stack::new(test, global, &[]);
    stack.write_service("a", &service("a", ""));
    stack.write_service("b", &service("b", "requires = [\"a\"]"));
    let out = copy_output(|| {
        Command::new(binary)
            .arg("--config")
            .arg(stack.path().join("ccmgr.toml"))
            .arg("start")
            .envs(env.iter().copied())
            .env_remove("CCMGR_CONFIG")
            .output()
    });
    assert!(out.status.success(), "start: {}", text(&out));
    let status = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&status));
    (stack, status)
}

fn pid(v: &Value) -> i32 {
    v["pid"].as_i64().expect("a pid") as i32
}

fn service_pids(status: &Value) -> Vec<(String, i32)> {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_owned(), pid(s)))
        .collect()
}

fn exe_of(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn canonical(path: &str) -> PathBuf {
    std::fs::canonicalize(path).unwrap()
}

/// Checks what an upgrade promises: the same keeper (now running `new`), the same service
/// processes, a new coordinator and a new standby of `new`; then that a crash is still
/// handled. Returns the status after.
fn check_upgraded(stack: &Stack, before: &Value, new: &Path) -> Value {
    let after = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&after));
    assert_eq!(
        service_pids(&after),
        service_pids(before),
        "every service keeps its process"
    );
    let keeper = pid(&after["keeper"]);
    assert_eq!(keeper, pid(&before["keeper"]), "the keeper keeps its pid");
    assert_eq!(exe_of(keeper), new, "the keeper runs the new binary");
    // What crossed the exec is close-on-exec again, and the state's memfd and the previous
    // binary are closed once the new image has resumed.
    assert_eq!(
        inheritable_fds(keeper),
        Vec::<String>::new(),
        "inheritable fds"
    );
    let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{keeper}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    assert!(
        !held.iter().any(|l| {
            let text = l.to_string_lossy();
            text.contains("memfd:") || text.ends_with(" (deleted)") || l == new
        }),
        "the keeper still holds {held:?}"
    );
    let coordinator = pid(&after["coordinator"]);
    let standby = pid(&after["standby"]);
    assert_ne!(
        coordinator,
        pid(&before["coordinator"]),
        "a new coordinator"
    );
    assert_ne!(standby, pid(&before["standby"]), "a new standby");
    assert_eq!(
        exe_of(coordinator),
        new,
        "the coordinator runs the new binary"
    );
    assert_eq!(exe_of(standby), new, "the standby runs the new binary");
    let restarts = |status: &Value| -> Vec<Value> {
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["restarts"].clone())
            .collect()
    };
    assert_eq!(
        restarts(&after),
        restarts(before),
        "no service was restarted: {after}"
    );
    // A crash after the upgrade is still handled: the new keeper reaps it, the new
    // coordinator restarts it.
    let b = stack_support::service_of(&after, "b");
    let old_b = pid(b);
    kill(Pid::from_raw(old_b), Signal::SIGKILL).unwrap();
    stack
        .wait_for("b restarted after the upgrade", LONG, |s| {
            s.as_ref().is_some_and(|s| up_anew(s, "b", old_b))
        })
        .unwrap()
}

/// The old binary: `CCMGR_UPGRADE_FROM`, else the previous commit's, built once per run of
/// this test binary (and cached across runs by commit); with the commit, if built from one.
fn previous_binary() -> (PathBuf, Option<String>) {
    static BUILT: Mutex<Option<(PathBuf, Option<String>)>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = built.as_ref() {
        return found.clone();
    }
    let found = match std::env::var_os("CCMGR_UPGRADE_FROM") {
        Some(path) => (PathBuf::from(path), None),
        None => {
            let (path, commit) = build_previous_commit();
            (path, Some(commit))
        }
    };
    *built = Some(found.clone());
    found
}

/// The (segment layout, service API layout, keeper state) versions of `commit`'s source.
fn versions_of(commit: &str) -> (u32, u32, u32) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let constant = |file: &str, name: &str| -> u32 {
        let text = git(repo, &["show", &format!("{commit}:{file}")])
            .unwrap_or_else(|| panic!("cannot read {file} of commit {commit}"));
        let prefix = format!("pub const {name}: u32 = ");
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .and_then(|rest| rest.trim_end_matches(';').trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {file} of commit {commit}"))
    };
    (
        constant("src/shm/layout.rs", "LAYOUT_VERSION"),
        constant("src/shm/api/layout.rs", "API_LAYOUT_VERSION"),
        constant("src/upgrade.rs", "STATE_VERSION"),
    )
}

/// `ccmgr status --json` of `stack` by `binary`, when it answers.
fn status_by(stack: &Stack, binary: &Path) -> Option<Value> {
    let out = Command::new(binary)
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .args(["status", "--json"])
        .env_remove("CCMGR_CONFIG")
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn git(repo: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn build_previous_commit() -> (PathBuf, String) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let no_history = |why: &str| -> ! {
        panic!(
            "the upgrade test needs the binary of the previous commit and {why}: run it in a git checkout with history (a clone, not a shallow one or an export), or set CCMGR_UPGRADE_FROM to a ccmgr binary built from an earlier commit that has `ccmgr upgrade`"
        )
    };
    let Some(list) = git(
        repo,
        &["rev-list", "--topo-order", "--max-count=500", "HEAD"],
    ) else {
        no_history("this checkout has no git history");
    };
    let commit = list
        .lines()
        .skip(1) // HEAD itself: the current source is what is upgraded to.
        .find(|c| git(repo, &["cat-file", "-e", &format!("{c}:src/upgrade.rs")]).is_some())
        .map(str::to_owned)
        .unwrap_or_else(|| no_history("no ancestor of HEAD has `ccmgr upgrade` (src/upgrade.rs)"));
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("upgrade-from");
    let binary = base.join(format!("ccmgr-{commit}"));
    if binary.exists() {
        return (binary, commit);
    }
    // One source dir for every commit: the build's fingerprints then name the same paths, and
    // a rebuild replaces the last commit's artifacts instead of piling up beside them.
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let archive = Command::new("sh")
        .arg("-c")
        .arg("git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"")
        .args(["sh"])
        .arg(repo)
        .arg(&commit)
        .arg(&src)
        .status()
        .unwrap();
    assert!(archive.success(), "git archive {commit} failed");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = base.join("target");
    let out = Command::new(cargo)
        .current_dir(&src)
        .args(["build", "--quiet", "--bin", "ccmgr", "-p", "ccmgr"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building commit {commit} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Copied out under its commit's name: the next build (another commit) reuses the target
    // dir and would overwrite it. Those of older commits go (70 MB each).
    for old in std::fs::read_dir(&base).unwrap().flatten() {
        if old.file_name().to_string_lossy().starts_with("ccmgr-") {
            let _ = std::fs::remove_file(old.path());
        }
    }
    std::fs::copy(target.join("debug/ccmgr"), &binary).unwrap();
    let _ = std::fs::remove_dir_all(&src);
    (binary, commit)
}

/// The acceptance test: from the previous commit's binary to this one.
#[test]
fn upgrade_from_the_previous_commit_keeps_every_service() {
    use ccmgr::shm::{api::API_LAYOUT_VERSION, layout::LAYOUT_VERSION};
    let (old, commit) = previous_binary();
    let ours = (
        LAYOUT_VERSION,
        API_LAYOUT_VERSION,
        ccmgr::upgrade::STATE_VERSION,
    );
    if let Some(theirs) = commit.as_deref().map(versions_of)
        && theirs != ours
    {
        // The previous commit wrote a state this source does not read: the specified outcome
        // is a refusal that changes nothing, and that is what is checked.
        eprintln!(
            "note: commit {} has (segment, API, state) versions {theirs:?}, this source {ours:?}: the upgrade must be refused",
            commit.unwrap_or_default()
        );
        return previous_commit_is_refused(&old);
    }
    // The old binary runs from a copy that is removed once the stack is up, as dpkg replaces
    // /usr/bin/ccmgr: the running keeper's own executable is then a deleted inode, and it
    // executes the path the client names.
    let (stack, before) = {
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("ccmgr-old");
        std::fs::copy(&old, &copy).unwrap();
        let (stack, before) = started_with("upgrade-prev", &copy, &[]);
        assert_eq!(
            exe_of(pid(&before["keeper"])),
            copy,
            "the keeper runs the old binary"
        );
        (stack, before)
    };
    assert!(
        exe_of(pid(&before["keeper"]))
            .to_string_lossy()
            .ends_with(" (deleted)"),
        "the old binary is gone"
    );
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("upgraded instance"), "{said}");
    assert!(said.contains(&pid(&before["keeper"]).to_string()), "{said}");
    check_upgraded(&stack, &before, &canonical(CCMGR));
}

/// From this binary to itself: everything keeps working.
#[test]
fn upgrade_to_the_same_binary_keeps_every_service() {
    let (stack, before) = started_with("upgrade-same", &canonical(CCMGR), &[]);
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    check_upgraded(&stack, &before, &canonical(CCMGR));
    // And once more, on the upgraded instance.
    let before = stack.wait_steady_with_standby(LONG);
    let out = stack.ccmgr(&["upgrade", "--json"]);
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["keeper"].as_i64(), before["keeper"]["pid"].as_i64());
    check_upgraded(&stack, &before, &canonical(CCMGR));
    // The resumed keeper carries out a reload (a new segment and configuration) as before.
    stack.write_service("c", &service("c", "requires = [\"b\"]"));
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "reload: {}", text(&out));
    let after = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&after));
    assert_eq!(
        stack_support::service_of(&after, "c")["state"],
        "up",
        "{after}"
    );
}

/// The upgrade socket, spoken to by hand.
fn connect(stack: &Stack) -> OwnedFd {
    ccmgr::upgrade::connect_socket(&ccmgr::upgrade::socket_path(
        &stack.run_dir(),
        &stack.instance,
    ))
    .unwrap()
}

fn request(exe: &Path) -> Request {
    Request {
        exe: exe.to_path_buf(),
        state_version: ccmgr::upgrade::STATE_VERSION,
        layout_version: ccmgr::shm::layout::LAYOUT_VERSION,
        api_layout_version: ccmgr::shm::api::API_LAYOUT_VERSION,
    }
}

fn replies(conn: &OwnedFd) -> Vec<Reply> {
    let mut all = Vec::new();
    while let Ok(Some(reply)) = ccmgr::upgrade::recv_message::<Reply>(conn.as_fd()) {
        all.push(reply);
    }
    all
}

/// The fds of `pid` that are sockets.
fn sockets_of(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn state_of(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .unwrap_or('?')
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LONG;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A service killed while the keeper is between its two images: its zombie and its pending
/// SIGCHLD cross the exec, and the new image reaps it and has it restarted. Made
/// deterministic by freezing the keeper: its connection is accepted first, then, while it is
/// stopped, the request is sent and the service killed; woken, the keeper's epoll hands it the
/// request before the signal (its ready list is in order of readiness), and it execs before it
/// looks at the signal.
#[test]
fn a_service_that_dies_during_the_exec_is_reaped_by_the_new_image() {
    let (stack, before) = started_with("upgrade-window", &canonical(CCMGR), &[]);
    let keeper = pid(&before["keeper"]);
    let victim = pid(stack_support::service_of(&before, "b"));
    let sockets = sockets_of(keeper);
    let conn = connect(&stack);
    wait_until("the keeper to accept the connection", || {
        sockets_of(keeper) > sockets
    });
    let stopped = Guard(keeper);
    kill(Pid::from_raw(keeper), Signal::SIGSTOP).unwrap();
    wait_until("the keeper to stop", || state_of(keeper) == 'T');
    ccmgr::upgrade::send_message(conn.as_fd(), &request(&canonical(CCMGR))).unwrap();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    wait_until("the service to be a zombie", || state_of(victim) == 'Z');
    drop(stopped); // SIGCONT
    let replies = replies(&conn);
    assert!(
        matches!(replies.last(), Some(Reply::Resumed { keeper: k, .. }) if *k == keeper),
        "{replies:?}"
    );
    // The new image logs it before it answers `resumed`.
    let log = stack
        .log_dir()
        .join(format!("ccmgr-{}.log", stack.instance));
    let log = std::fs::read_to_string(log).unwrap();
    let resumed = log
        .lines()
        .find(|l| l.contains("reaped the services that ended while the keeper was between"))
        .unwrap_or_else(|| panic!("the new image says what it reaped: {log}"));
    assert!(resumed.contains("services=1"), "{resumed}");
    let after = stack
        .wait_for("b restarted by the new coordinator", LONG, |s| {
            s.as_ref()
                .is_some_and(|s| up_anew(s, "b", victim) && s["standby"]["pid"].is_i64())
        })
        .unwrap();
    stack.remember(&stack_support::pids_in(&after));
    let b = stack_support::service_of(&after, "b");
    assert_eq!(b["restarts"], 1, "{after}");
    assert_eq!(
        pid(stack_support::service_of(&after, "a")),
        pid(stack_support::service_of(&before, "a")),
        "a keeps its process"
    );
    assert_eq!(pid(&after["keeper"]), keeper);
}

/// Sends SIGCONT to the frozen keeper on drop, even when the test fails.
struct Guard(i32);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// The processes of a stack, by role, and the keeper's binary: what "nothing changed" means.
fn processes(status: &Value) -> (Vec<(String, i32)>, i32, i32, i32, PathBuf) {
    let keeper = pid(&status["keeper"]);
    (
        service_pids(status),
        keeper,
        pid(&status["coordinator"]),
        pid(&status["standby"]),
        exe_of(keeper),
    )
}

/// A segment of another layout version: the new binary refuses, names both versions, and
/// changes nothing. The running instance's segment is made to say another version (the one
/// field the check reads: what a segment an older ccmgr wrote looks like to this one), then
/// put back.
#[test]
fn an_incompatible_layout_is_refused_and_nothing_changes() {
    use ccmgr::shm::layout::{Header, LAYOUT_VERSION};
    use std::os::unix::fs::FileExt as _;
    let (stack, before) = started_with("upgrade-layout", &canonical(CCMGR), &[]);
    let segment = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(stack.segment_path())
        .unwrap();
    let at = std::mem::offset_of!(Header, layout_version) as u64;
    let foreign = LAYOUT_VERSION + 1;
    segment.write_all_at(&foreign.to_ne_bytes(), at).unwrap();
    let out = stack.ccmgr(&["upgrade"]);
    segment
        .write_all_at(&LAYOUT_VERSION.to_ne_bytes(), at)
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("layout version {foreign}"))
            && said.contains(&format!("reads version {LAYOUT_VERSION}"))
            && said.contains("nothing was changed"),
        "{said}"
    );
    let after = stack.wait_steady_with_standby(LONG);
    assert_eq!(processes(&after), processes(&before), "nothing changed");

    // The keeper checks too (a client that skipped its own check): refused, nothing changed.
    let conn = connect(&stack);
    let mut asked = request(&canonical(CCMGR));
    asked.layout_version = foreign;
    ccmgr::upgrade::send_message(conn.as_fd(), &asked).unwrap();
    let replies = replies(&conn);
    match replies.as_slice() {
        [Reply::Refused { why }] => assert!(
            why.contains(&format!("version {LAYOUT_VERSION}"))
                && why.contains(&format!("version {foreign}")),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    let after = stack.wait_steady_with_standby(LONG);
    assert_eq!(processes(&after), processes(&before), "nothing changed");
}

/// A new binary that cannot rebuild the keeper from the state executes the previous one back
/// on it: the upgrade fails (exit 1, saying so), and the instance runs on, unchanged.
#[test]
fn a_new_binary_that_cannot_resume_rolls_back() {
    let (stack, before) = started_with(
        "upgrade-rollback",
        &canonical(CCMGR),
        &[("CCMGR_TEST_UPGRADE_FAIL_RESUME", "1")],
    );
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("previous binary was executed back"),
        "{}",
        text(&out)
    );
    let after = stack.wait_steady_with_standby(LONG);
    assert_eq!(processes(&after), processes(&before), "nothing changed");
    // It still supervises: a crash is handled.
    let old_b = pid(stack_support::service_of(&after, "b"));
    kill(Pid::from_raw(old_b), Signal::SIGKILL).unwrap();
    stack
        .wait_for("b restarted after the roll-back", LONG, |s| {
            s.as_ref().is_some_and(|s| up_anew(s, "b", old_b))
        })
        .unwrap();
}

/// Exit 3 for an instance that is not running (the .deb's postinst tolerates it).
#[test]
fn upgrading_an_instance_that_is_not_running_is_exit_3() {
    let stack = Stack::new("upgrade-absent", "", &[]);
    stack.write_service("a", &service("a", ""));
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("not running"), "{}", text(&out));
}

/// Only the instance's owner may upgrade it: anyone else is refused with exit 4, and nothing
/// changes. (The upgrade socket is mode 0600, and the keeper serves only its own uid.)
#[test]
fn a_stranger_may_not_upgrade() {
    use std::os::unix::fs::PermissionsExt as _;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a command as nobody");
        return;
    }
    let (stack, before) = started_with("upgrade-stranger", &canonical(CCMGR), &[]);
    let socket = ccmgr::upgrade::socket_path(&stack.run_dir(), &stack.instance);
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = stack.ccmgr_as_nobody(&["upgrade"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let after = stack.wait_steady_with_standby(LONG);
    assert_eq!(processes(&after), processes(&before), "nothing changed");
}

/// The keeper raises its own open-files limit and gives services the one it was started
/// with: after an upgrade too (the new image inherits the raised limit, so the original one
/// crosses the exec in the state).
#[test]
fn services_keep_the_original_open_files_limit_after_an_upgrade() {
    let stack = Stack::new("upgrade-nofile", "", &[]);
    let limits = stack.file("limits");
    stack.write_service(
        "a",
        &format!(
            "command = [\"sh\", \"-c\", \"ulimit -Sn >> {limits}; exec sleep 1000\"]\nrestart_delay = \"0ms\"\n"
        ),
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" --config \"$1\" start")
        .arg(CCMGR)
        .arg(stack.path().join("ccmgr.toml"))
        .env_remove("CCMGR_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "start: {}", text(&out));
    let before = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&before));
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    let old_a = pid(stack_support::service_of(&before, "a"));
    kill(Pid::from_raw(old_a), Signal::SIGKILL).unwrap();
    let after = stack
        .wait_for("a restarted after the upgrade", LONG, |s| {
            s.as_ref().is_some_and(|s| up_anew(s, "a", old_a))
        })
        .unwrap();
    stack.remember(&stack_support::pids_in(&after));
    wait_until("a's second start to write its limit", || {
        std::fs::read_to_string(&limits).is_ok_and(|t| t.lines().count() >= 2)
    });
    let seen = std::fs::read_to_string(&limits).unwrap();
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        ["256", "256"],
        "before and after the upgrade"
    );
}

/// Under `takeover = "restart"` a coordinator's death restarts every service; the one an
/// upgrade kills is no death: its successor adopts them (the keeper's marker says so), and
/// removes the marker, so that a later death is one again.
#[test]
fn an_upgrade_under_takeover_restart_restarts_nothing() {
    let (stack, before) = started_with_global(
        "upgrade-takeover-restart",
        "[coordinator]\ntakeover = \"restart\"",
        &canonical(CCMGR),
        &[],
    );
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    check_upgraded(&stack, &before, &canonical(CCMGR));
    assert!(
        !ccmgr::upgrade::marker_path(&stack.run_dir(), &stack.instance).exists(),
        "the marker is gone once read"
    );
}

/// A new binary that dies at its start, before it could roll back (here `false`, which passes
/// every check of the binary): the keeper is gone, the services run on unsupervised, and
/// `ccmgr stop` stops them all (what the README says of this case).
#[test]
fn a_new_binary_that_dies_at_its_start_leaves_services_that_stop_stops() {
    let (stack, before) = started_with("upgrade-crash", &canonical(CCMGR), &[]);
    let keeper = pid(&before["keeper"]);
    let services: Vec<i32> = service_pids(&before).iter().map(|(_, p)| *p).collect();
    let conn = connect(&stack);
    ccmgr::upgrade::send_message(conn.as_fd(), &request(&canonical("/bin/false"))).unwrap();
    let replies = replies(&conn);
    assert!(
        matches!(replies.as_slice(), [Reply::Executing { .. }]),
        "{replies:?}"
    );
    wait_until("the keeper to end", || !Stack::alive(keeper));
    for &p in &services {
        assert!(Stack::alive(p), "service {p} runs on");
    }
    let out = stack.ccmgr(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "stop: {}", text(&out));
    for &p in &services {
        wait_until("the service to be stopped", || !Stack::alive(p));
    }
}

/// Upgrades in a row, each replacing a coordinator that had just taken over: none of those
/// deaths is a successor dying quickly (five of those within a minute make the keeper give up
/// and stop the stack).
#[test]
fn upgrades_in_a_row_are_no_crash_loop() {
    let (stack, before) = started_with("upgrade-row", &canonical(CCMGR), &[]);
    let limit = ccmgr::keeper::SUCCESSOR_LIMIT + 2;
    for _ in 0..limit {
        let out = stack.ccmgr(&["upgrade"]);
        assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    }
    let after = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&after));
    assert_eq!(service_pids(&after), service_pids(&before));
    assert_eq!(after["supervised"], true, "{after}");
}

/// The previous commit's binary wrote a state of other versions: `upgrade` refuses, naming
/// both, and nothing changes (checked through the old binary, the one that reads that state).
fn previous_commit_is_refused(old: &Path) {
    let stack = Stack::new("upgrade-prev-refused", "", &[]);
    stack.write_service("a", &service("a", ""));
    stack.write_service("b", &service("b", "requires = [\"a\"]"));
    let out = Command::new(old)
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .arg("start")
        .env_remove("CCMGR_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "start: {}", text(&out));
    let mut before = None;
    wait_until(
        "the old binary's stack to be steady with its standby",
        || {
            before = status_by(&stack, old)
                .filter(|s| stack_support::steady_and_all_up(s) && s["standby"]["pid"].is_i64());
            before.is_some()
        },
    );
    let before = before.unwrap();
    stack.remember(&stack_support::pids_in(&before));
    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("nothing was changed"), "{}", text(&out));
    let after = status_by(&stack, old).unwrap();
    assert_eq!(processes(&after), processes(&before), "nothing changed");
    let out = Command::new(old)
        .arg("--config")
        .arg(stack.path().join("ccmgr.toml"))
        .arg("stop")
        .env_remove("CCMGR_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "stop: {}", text(&out));
}

/// Runs a copied binary: ETXTBSY (another test thread's fork can hold the copy's write fd for
/// a moment, until its exec) is tried again, within a deadline.
fn copy_output(run: impl Fn() -> std::io::Result<std::process::Output>) -> std::process::Output {
    let deadline = Instant::now() + LONG;
    loop {
        match run() {
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            out => return out.unwrap(),
        }
    }
}

/// An exec that fails (here a file that passes every check of the binary but is no program:
/// ENOEXEC) returns to the old image: the keeper goes on as it was, with close-on-exec set
/// again on every fd it had cleared it on, so that nothing of it leaks into a coordinator it
/// starts afterwards.
#[test]
fn a_failed_exec_leaves_the_keeper_as_it_was() {
    use std::os::unix::fs::PermissionsExt as _;
    let (stack, before) = started_with("upgrade-noexec", &canonical(CCMGR), &[]);
    let junk = stack.path().join("not-a-program");
    std::fs::write(&junk, b"\x00\x01\x02 no program\n").unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conn = connect(&stack);
    ccmgr::upgrade::send_message(conn.as_fd(), &request(&junk)).unwrap();
    let replies = replies(&conn);
    match replies.as_slice() {
        [Reply::Executing { .. }, Reply::Failed { why }] => {
            assert!(why.contains("cannot execute"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let after = stack.wait_steady_with_standby(LONG);
    assert_eq!(processes(&after), processes(&before), "nothing changed");
    // Every fd of the keeper is close-on-exec again (what it starts inherits none of them).
    let keeper = pid(&after["keeper"]);
    let inheritable = inheritable_fds(keeper);
    assert_eq!(
        inheritable,
        Vec::<String>::new(),
        "the keeper's inheritable fds"
    );
}

/// The fds above 2 of `pid` without close-on-exec.
fn inheritable_fds(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .parse::<i32>()
                .is_ok_and(|fd| fd > 2)
        })
        .filter(|e| {
            let info = std::fs::read_to_string(e.path()).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
            flags.is_some_and(|f| f & 0o2000000 == 0)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The cgroup of the run a service had before the upgrade is the new keeper's to kill when
/// that run ends: the runs' cgroups cross the exec. Here the run leaves an escaped daemon
/// behind; after the upgrade its main process is killed, and the daemon must die with its
/// run's cgroup, and the replacement run gets a cgroup of its own. (Without the runs' cgroups
/// in the state, the new keeper did not know which cgroup the run was in, and the daemon
/// lived on.) Skipped where services run outside cgroups.
#[test]
fn a_run_from_before_the_upgrade_is_killed_whole_when_it_ends_after_it() {
    let stack = Stack::new("upgrade-cgroups", "", &[]);
    let daemons = stack.file("daemons.log");
    stack.write_service(
        "d",
        &format!(
            "command = [\"sh\", \"-c\", \"(setsid sh -c 'echo $$ >> {daemons}; exec sleep 1000' &); exec sleep 1000\"]\nrestart_delay = \"0ms\"\n"
        ),
    );
    stack.start_ok();
    let before = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&before));
    let main = pid(stack_support::service_of(&before, "d"));
    let cgroup_of = |pid: i32| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            .unwrap_or_default()
    };
    let old_cgroup = cgroup_of(main);
    if !old_cgroup.contains(&format!("ccmgr.{}/", stack.instance)) {
        assert!(
            std::env::var_os("CCMGR_TEST_REQUIRE_CGROUPS").is_none(),
            "cgroups are required, yet d runs in {old_cgroup}"
        );
        eprintln!("skipped: services run outside cgroups here ({old_cgroup})");
        return;
    }
    let daemon: i32 = stack_support::wait_lines(&daemons, 1, LONG)[0]
        .trim()
        .parse()
        .unwrap();
    stack.remember(&[daemon]);
    assert_eq!(cgroup_of(daemon), old_cgroup, "the daemon is in d's run");

    let out = stack.ccmgr(&["upgrade"]);
    assert_eq!(out.status.code(), Some(0), "upgrade: {}", text(&out));
    let after = stack.wait_steady_with_standby(LONG);
    stack.remember(&stack_support::pids_in(&after));
    assert_eq!(pid(stack_support::service_of(&after, "d")), main);

    kill(Pid::from_raw(main), Signal::SIGKILL).unwrap();
    let restarted = stack
        .wait_for("d restarted after the upgrade", LONG, |s| {
            s.as_ref().is_some_and(|s| up_anew(s, "d", main))
        })
        .unwrap();
    stack.remember(&stack_support::pids_in(&restarted));
    wait_until(
        "the daemon of d's run from before the upgrade dies with it",
        || !Stack::alive(daemon),
    );
    let new_main = pid(stack_support::service_of(&restarted, "d"));
    let new_cgroup = cgroup_of(new_main);
    assert!(
        new_cgroup.contains(&format!("ccmgr.{}/", stack.instance)) && new_cgroup != old_cgroup,
        "the new run is in {new_cgroup}, the old one was in {old_cgroup}"
    );
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

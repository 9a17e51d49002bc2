//! Issue 9, items 3 and 1: who can touch an instance's shared state.
//!
//! - Item 3: its files (`<run_dir>/<instance>.seg`, `.ctl`, `.api`) live where only the
//!   instance's owner can create names, so another user cannot squat them; a `run_dir` where
//!   someone else could is refused with a sentence naming it; `stop` removes everything the
//!   instance made. (On main the segment was `/dev/shm/ccmgr.<instance>`: `nobody` creating
//!   that name first blocked root's `start`.)
//! - Item 1: with `group = "nogroup"`, a member of the group (`nobody:nogroup`) reads the
//!   status through a private copy, cannot open the segment for writing, and is refused
//!   `stop` (which kills nothing). (On main the segment was 0660 root:nogroup: the member
//!   could rewrite the coordinator's pid so that root's `stop` killed any process; and its
//!   `status` was refused.)
//!
//! Needs root (to act as `nobody`); skipped otherwise, except under CI, where it must run.

mod stack_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use stack_support::{Stack, ccmgr_bin, pids_in, text};

const NOBODY: (u32, u32) = (65534, 65534);
const LONG: Duration = Duration::from_secs(20);

/// Runs `program args` as nobody:nogroup, from `/`.
fn as_nobody(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .uid(NOBODY.0)
        .gid(NOBODY.1)
        .env_remove("CCMGR_CONFIG")
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir("/")
        .output()
        .expect("running a command as nobody")
}

/// The names nobody created in a world-writable directory: removed when the test ends.
struct Squatted(Vec<PathBuf>);

impl Drop for Squatted {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Item 3: `nobody` creates every name the instance's state ever had in the world-writable
/// `/dev/shm` (the old segment, control segment and API file names) before root starts it.
/// The instance is not affected: its state is in its own run_dir, and `stop` removes all of
/// it (and nothing of nobody's). On main, `start` failed: the segment's name was taken.
#[test]
fn names_another_user_creates_first_do_not_affect_a_root_instance() {
    if !stack_support::need_root("to act as nobody") {
        return;
    }
    let stack = Stack::new("squat", "", &[("a", "command = [\"sleep\", \"1000\"]\n")]);
    let names: Vec<PathBuf> = ["", ".ctl", ".api"]
        .iter()
        .map(|suffix| PathBuf::from(format!("/dev/shm/ccmgr.{}{suffix}", stack.instance)))
        .collect();
    let squatted = Squatted(names.clone());
    let mut args = vec!["-c", "for f in \"$@\"; do echo squat > \"$f\"; done", "sh"];
    let texts: Vec<String> = names.iter().map(|p| p.display().to_string()).collect();
    args.extend(texts.iter().map(String::as_str));
    let out = as_nobody(Path::new("/bin/sh"), &args);
    assert!(out.status.success(), "nobody squats: {}", text(&out));
    for path in &squatted.0 {
        assert_eq!(std::fs::metadata(path).unwrap().uid(), NOBODY.0);
    }

    stack.start_ok();
    let status = stack.status().expect("the instance runs");
    assert_eq!(status["services"][0]["state"], "up", "{status}");
    // Its state is in its run_dir, owner-only, the directory 0755 and root's.
    let run = std::fs::metadata(stack.run_dir()).unwrap();
    assert_eq!((run.uid(), run.mode() & 0o7777), (0, 0o755));
    assert_eq!(stack.state_files().len(), 3, "{:?}", stack.state_files());
    let seg = std::fs::metadata(stack.segment_path()).unwrap();
    assert_eq!((seg.uid(), seg.mode() & 0o777), (0, 0o600));

    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        stack.state_files(),
        Vec::<PathBuf>::new(),
        "stop left state behind"
    );
    // Nothing else of the instance's state is left in its run_dir either (temporary names
    // included); nobody's files were not touched.
    let left: Vec<String> = std::fs::read_dir(stack.run_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            [".seg", ".ctl", ".api", ".tmp."]
                .iter()
                .any(|s| n.contains(s))
        })
        .collect();
    assert_eq!(left, Vec::<String>::new());
    for path in &squatted.0 {
        assert_eq!(std::fs::read_to_string(path).unwrap(), "squat\n");
    }
}

/// Item 3: a run_dir other users could create names in, or another user's, is refused before
/// anything is made in it, with a sentence naming the directory, its owner and its mode. On
/// main every one of them was used as it was.
#[test]
fn a_run_dir_others_could_write_or_own_is_refused() {
    if !stack_support::need_root("to act as nobody") {
        return;
    }
    let stack = Stack::new(
        "untrusted",
        "",
        &[("a", "command = [\"sleep\", \"1000\"]\n")],
    );
    let run = stack.run_dir();
    std::fs::create_dir(&run).unwrap();
    let refused = |mode_or_owner: &str, expect: &[&str]| {
        let out = stack.start();
        let t = text(&out);
        assert_ne!(out.status.code(), Some(0), "{mode_or_owner}: started:\n{t}");
        for e in expect {
            assert!(t.contains(e), "{mode_or_owner}: expected `{e}` in:\n{t}");
        }
        assert_eq!(
            stack.state_files(),
            Vec::<PathBuf>::new(),
            "{mode_or_owner}"
        );
        // Nor do `status` and `stop` believe or remove anything there.
        for verb in ["status", "stop"] {
            let out = stack.ccmgr(&[verb]);
            let t = text(&out);
            assert_eq!(out.status.code(), Some(1), "{mode_or_owner}: {verb}: {t}");
            assert!(
                t.contains("refusing the run directory"),
                "{mode_or_owner}: {verb}: {t}"
            );
        }
    };

    // Group-writable, then world-writable (even sticky: names in it are still anyone's).
    for mode in [0o775, 0o757, 0o1777] {
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(mode)).unwrap();
        let shown = format!("has mode {mode:04o}");
        refused(
            &shown,
            &[
                &format!("refusing the run directory {}", run.display()),
                "is owned by uid 0",
                &shown,
                "users other than its owner may create and remove names in it",
            ],
        );
    }

    // Below a directory anyone may write that is not sticky: the run_dir could be renamed
    // away and replaced.
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(
        "parent 0777",
        &[
            &format!(
                "{} is owned by uid 0 and has mode 0777",
                stack.path().display()
            ),
            "not sticky",
        ],
    );
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

    // Another user's run_dir: only that user may control the instance.
    nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(NOBODY.0)), None).unwrap();
    let out = stack.start();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(4), "{t}");
    assert!(
        t.contains(&format!(
            "only uid 65534 may control instance {}",
            stack.instance
        )),
        "{t}"
    );
    assert_eq!(stack.state_files(), Vec::<PathBuf>::new());

    // And back to the owner's, 0755: it starts.
    nix::unistd::chown(&run, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    stack.start_ok();
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(stack.state_files(), Vec::<PathBuf>::new());
}

/// Item 1: with `group = "nogroup"`, `nobody:nogroup` reads the status (text and JSON) through
/// a private copy of the segment, cannot open the segment for writing (so cannot rewrite the
/// coordinator's recorded pid, which on main made root's `stop` SIGTERM any process), and its
/// `stop` is refused with exit 4 and kills nothing.
#[test]
fn a_group_member_reads_the_status_but_cannot_write_or_stop() {
    if !stack_support::need_root("to act as nobody") {
        return;
    }
    let stack = Stack::new(
        "group-ro",
        "group = \"nogroup\"",
        &[("a", "command = [\"sleep\", \"1000\"]\n")],
    );
    // nobody reaches the configuration, the run_dir and a copy of the binary.
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = stack.path().join("ccmgr");
    std::fs::copy(ccmgr_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = stack.path().join("ccmgr.toml").display().to_string();
    stack.start_ok();
    let status = stack.wait_steady(LONG);
    let pids = pids_in(&status);
    assert!(!pids.is_empty());
    let seg = std::fs::metadata(stack.segment_path()).unwrap();
    assert_eq!(
        seg.mode() & 0o777,
        0o640,
        "the group reads, only root writes"
    );
    assert_eq!(seg.gid(), NOBODY.1);

    // `status` as a member of the group.
    let out = as_nobody(&bin, &["--config", &config, "status"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("instance {}: steady", stack.instance)),
        "{t}"
    );
    let line = t
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_else(|| panic!("no line for service a in:\n{t}"));
    assert!(line.contains("up"), "{line}");
    let out = as_nobody(&bin, &["--config", &config, "status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["services"][0]["id"], "a");
    assert_eq!(json["services"][0]["state"], "up");
    assert_eq!(json["coordinator"]["pid"], status["coordinator"]["pid"]);

    // The segment cannot be opened for writing (nor the run_dir written).
    let seg_path = stack.segment_path().display().to_string();
    let out = as_nobody(
        Path::new("/usr/bin/python3"),
        &[
            "-c",
            "import os,sys\n\
             for p, flags in ((sys.argv[1], os.O_RDWR), (sys.argv[1], os.O_WRONLY)):\n\
             \x20   try:\n\
             \x20       os.open(p, flags); print('opened')\n\
             \x20   except OSError as e:\n\
             \x20       print(e.errno)\n\
             try:\n\
             \x20   os.open(sys.argv[2], os.O_CREAT | os.O_WRONLY, 0o600); print('created')\n\
             except OSError as e:\n\
             \x20   print(e.errno)",
            &seg_path,
            &stack.run_dir().join("squat").display().to_string(),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let eacces = libc::EACCES.to_string();
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        [eacces.as_str(), eacces.as_str(), eacces.as_str()],
        "{}",
        text(&out)
    );

    // `stop` (and `restart`) as a member of the group: refused, nothing killed.
    for verb in ["stop", "restart"] {
        let out = as_nobody(&bin, &["--config", &config, verb]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(4), "{verb}: {t}");
        assert!(
            t.contains(&format!(
                "only uid 0 may control instance {}",
                stack.instance
            )),
            "{verb}: {t}"
        );
    }
    for pid in &pids {
        assert!(Stack::alive(*pid), "pid {pid} died of nobody's stop");
    }
    let after = pids_in(&stack.status().expect("still running"));
    assert!(
        pids.iter().all(|p| after.contains(p)),
        "{pids:?} then {after:?}"
    );

    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(stack.state_files(), Vec::<PathBuf>::new());
}

/// An instance of `nobody`'s own, driven by `nobody` through a copy of the binary, in a
/// directory of a sticky world-writable one (as `/tmp`). On drop: stopped as nobody, and any
/// process of it still alive killed and reaped.
struct NobodysInstance {
    dir: tempfile::TempDir,
    bin: PathBuf,
    config: String,
    pids: std::cell::RefCell<Vec<i32>>,
}

impl NobodysInstance {
    fn new(tag: &str) -> NobodysInstance {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let bin = dir.path().join("ccmgr");
        std::fs::copy(ccmgr_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("home");
        let instance = format!("nb-{tag}-{}", std::process::id());
        let script = format!(
            "mkdir -p {home}/services.d && printf 'instance = \"{instance}\"\\nlog_dir = \"log\"\\nrun_dir = \"run\"\\n' > {home}/ccmgr.toml && printf 'command = [\"sleep\", \"1000\"]\\n' > {home}/services.d/a.toml",
            home = home.display()
        );
        let out = as_nobody(Path::new("/bin/sh"), &["-c", &script]);
        assert!(out.status.success(), "{}", text(&out));
        NobodysInstance {
            config: home.join("ccmgr.toml").display().to_string(),
            dir,
            bin,
            pids: Default::default(),
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn run_dir(&self) -> PathBuf {
        self.home().join("run")
    }

    /// `ccmgr <args>` as nobody (`as_root`: as root, on nobody's instance).
    fn ccmgr(&self, args: &[&str], as_root: bool) -> Output {
        let mut all = vec!["--config", &self.config];
        all.extend_from_slice(args);
        let out = if as_root {
            Command::new(&self.bin)
                .args(&all)
                .env_remove("CCMGR_CONFIG")
                .output()
                .unwrap()
        } else {
            as_nobody(&self.bin, &all)
        };
        if args == ["status", "--json"] && out.status.success() {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            self.pids.borrow_mut().extend(pids_in(&json));
        }
        out
    }
}

impl Drop for NobodysInstance {
    fn drop(&mut self) {
        let _ = self.ccmgr(&["stop"], false);
        for &pid in self.pids.borrow().iter() {
            if Stack::alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // Ours to reap only if it was re-parented to this process (a subreaper).
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// Unprivileged instances keep working: `nobody` starts, reads and stops an instance of its
/// own, whose state is in a run_dir of its own (below a sticky world-writable directory, as
/// /tmp); root may read its status but not stop it; and a run_dir below a directory anyone may
/// write that is not sticky is refused.
#[test]
fn an_unprivileged_owner_runs_its_instance_and_no_one_else_controls_it() {
    if !stack_support::need_root("to act as nobody") {
        return;
    }
    let n = NobodysInstance::new("own");
    let out = n.ccmgr(&["start"], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = n.ccmgr(&["status", "--json"], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pids = n.pids.borrow().clone();
    assert!(!pids.is_empty());
    for ext in ["seg", "ctl", "api"] {
        let meta = std::fs::read_dir(n.run_dir())
            .unwrap()
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(&format!(".{ext}"))
            })
            .unwrap_or_else(|| panic!("no .{ext} in {}", n.run_dir().display()))
            .metadata()
            .unwrap();
        assert_eq!(meta.uid(), NOBODY.0, ".{ext}");
    }
    // Root reads the status (a private copy), but may not stop it.
    let out = n.ccmgr(&["status"], true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = n.ccmgr(&["stop"], true);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(4), "{t}");
    assert!(t.contains("only uid 65534 may control instance"), "{t}");
    // One rule for every verb that changes something: the per-service verbs and a live
    // reload refuse root alike, with the same sentence and exit code (they used to go to the
    // coordinator, which serves root); a dry run only reads.
    for args in [
        &["stop", "a"][..],
        &["restart", "a"],
        &["start", "a"],
        &["reload"],
    ] {
        let out = n.ccmgr(args, true);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {t}");
        assert!(t.contains("only uid 65534 may control instance"), "{t}");
        assert!(t.contains("runuser -u nobody -- ccmgr"), "{t}");
    }
    let out = n.ccmgr(&["reload", "--dry-run"], true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for pid in &pids {
        assert!(Stack::alive(*pid), "pid {pid} died of root's refused stop");
    }
    // Its owner stops it, and everything it made goes.
    let out = n.ccmgr(&["stop"], false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let left: Vec<String> = std::fs::read_dir(n.run_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| [".seg", ".ctl", ".api"].iter().any(|s| name.ends_with(s)))
        .collect();
    assert_eq!(left, Vec::<String>::new());

    // Its home made writable by everyone, not sticky: anyone could replace `run`. Refused.
    let out = as_nobody(
        Path::new("/bin/chmod"),
        &["0777", &n.home().display().to_string()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = n.ccmgr(&["start"], false);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!(
            "{} is owned by uid 65534 and has mode 0777",
            n.home().display()
        )) && t.contains("not sticky"),
        "{t}"
    );
}

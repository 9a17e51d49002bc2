//! Attacks an outside tester made after issues 9 (privilege boundaries) and 10 (events,
//! failure commands, `logs`, `wants`/`before`) landed, each through the real binary: a local
//! user (`nobody`) or a careless operator against root's ccmgr. Needs root (to act as
//! `nobody`); skipped otherwise, except under CI, where it must run.

mod stack_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use stack_support::{Stack, text};

const NOBODY: u32 = 65534;

fn need_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs the tests as root: this test must run"
    );
    eprintln!("skipped: needs root to act as nobody");
    false
}

/// Makes `path` nobody's, as `chown nobody:nogroup` would.
fn give_to_nobody(path: &Path) {
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// Polls `condition` every 10 ms until it holds, or panics naming `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A careless but common setup: the service's user owns `log_dir` ("the service owns its
/// logs"). The service's user plants `web.log -> <a root-only file>` before the start. Root's
/// keeper must not follow it: on main it appended the service's output to the root-owned
/// 0600 file (any file on the system: /etc/shadow, /root/.ssh/authorized_keys).
#[test]
fn a_link_planted_in_log_dir_is_not_followed_by_the_keeper() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "log-link",
        "",
        &[(
            "web",
            "user = \"nobody\"\ncommand = [\"sh\", \"-c\", \"echo PWNED; exec sleep 1000\"]\n",
        )],
    );
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = root_only_file(&stack);
    let log_dir = log_dir_of_nobody(&stack);
    let link = log_dir.join("web.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    give_to_nobody(&link);

    let out = stack.start();
    // Whatever start made of it, the stop drains every pipe before the keeper exits.
    let stopped = stack.stop();
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "root only\n",
        "root's keeper wrote the service's output through a link the service's user planted\nstart: {}\nstop: {}",
        text(&out),
        text(&stopped)
    );
}

/// The same careless setup; the service's user makes `web.log` a FIFO. On main root's keeper
/// blocked for ever opening it (in `fifo_open`, the whole stack wedged); with the keeper
/// refusing it, root's `ccmgr start` reported the failed start, then hung for ever (SIGTERM
/// too) opening the FIFO to show "the last lines of its log"; `ccmgr logs web` hung likewise.
#[test]
fn a_fifo_planted_at_a_log_name_hangs_neither_start_nor_logs() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "log-fifo",
        "",
        &[(
            "web",
            "user = \"nobody\"\ncommand = [\"sleep\", \"1000\"]\n",
        )],
    );
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log_dir = log_dir_of_nobody(&stack);
    let fifo = log_dir.join("web.log");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    give_to_nobody(&fifo);

    let start = stack_support::Running::spawn(&stack, &["start"]);
    let out = start.finish(Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("is not a regular file"),
        "start does not say what is wrong with the log: {}",
        text(&out)
    );
    let logs = stack_support::Running::spawn(&stack, &["logs", "web"]);
    let out = logs.finish(Duration::from_secs(10));
    assert!(
        text(&out).contains("not a regular file"),
        "logs does not say what is wrong with the log: {}",
        text(&out)
    );
}

/// `ccmgr logs` (and `start`'s failure report) run by root print a log the service's user
/// replaced with a link to a root-only file: on main they showed its contents.
#[test]
fn root_s_logs_does_not_print_a_file_through_a_planted_link() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "logs-link",
        "",
        &[(
            "web",
            "user = \"nobody\"\ncommand = [\"sleep\", \"1000\"]\n",
        )],
    );
    let victim = stack.path().join("victim");
    std::fs::write(&victim, "root-only-secret\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log_dir = log_dir_of_nobody(&stack);
    let link = log_dir.join("web.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    give_to_nobody(&link);

    let logs = stack_support::Running::spawn(&stack, &["logs", "web"]);
    let out = logs.finish(Duration::from_secs(10));
    assert!(
        !text(&out).contains("root-only-secret"),
        "root's `ccmgr logs` printed a root-only file through a link: {}",
        text(&out)
    );
    assert!(text(&out).contains("symbolic link"), "{}", text(&out));
}

/// The README says a failure command's "output goes to ccmgr's own log". On main it did not:
/// the keeper handed the command its own stderr (keeper/mod.rs `run_hook`, `output: stderr`),
/// which `ccmgr start` made /dev/null (cli/lifecycle.rs, the keeper's `.stderr(Stdio::null())`).
/// Whatever an operator's hook said (why it could not page anyone) was lost.
#[test]
fn a_failure_command_s_output_reaches_ccmgr_s_own_log() {
    let stack = Stack::new(
        "hook-output",
        "",
        &[(
            "crash",
            "command = [\"sh\", \"-c\", \"sleep 0.2; exit 3\"]\nrestart = \"never\"\non_failure_command = \"echo HOOK-OUT-MARKER; echo HOOK-ERR-MARKER >&2\"\n",
        )],
    );
    let _ = stack.start();
    wait_until(
        "the failure command to end",
        Duration::from_secs(20),
        || {
            let log = stack.coordinator_log();
            log.contains("the failure command ended") || log.contains("the failure command failed")
        },
    );
    // Its end and its last output are seen in either order: give the output a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = stack.coordinator_log();
    while !(log.contains("HOOK-OUT-MARKER") && log.contains("HOOK-ERR-MARKER"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        log = stack.coordinator_log();
    }
    stack.stop();
    assert!(
        log.contains("HOOK-OUT-MARKER") && log.contains("HOOK-ERR-MARKER"),
        "the failure command's output is not in ccmgr's log:\n{log}"
    );
}

/// A failure command that daemonizes (`setsid cmd &`, as `notify-send`-style helpers do)
/// leaves its process group, so a kill of its process group at `on_failure_timeout` missed
/// it: it ran on, uncounted by the limit of 8 running commands, so a crash loop piled such
/// processes up until `ccmgr stop`. Each run of a failure command now has its own cgroup
/// (`.failure-commands.<n>`), killed whole at its timeout.
#[test]
fn a_failure_command_s_escaped_child_dies_at_its_timeout() {
    escaped_child_dies_at_the_timeout(
        "hook-escape",
        "setsid sleep 4242 & exec sleep 4243",
        "the failure command failed",
        "4242",
    );
}

/// A crashing service whose failure command (`on_failure_timeout = 1s`) leaves a `sleep
/// <arg>` in another session: that sleep must be gone within a few seconds of appearing (its
/// run's deadline). Where the machine gives the instance no cgroups, only the command's
/// process group can be killed (documented): the test then only checks that the command ran.
fn escaped_child_dies_at_the_timeout(name: &str, hook: &str, ran: &str, arg: &str) {
    let stack = Stack::new(
        name,
        "[coordinator]\non_failure_timeout = \"1s\"\n",
        &[(
            "crash",
            &format!(
                "command = [\"sh\", \"-c\", \"sleep 0.2; exit 3\"]\nrestart = \"never\"\non_failure_command = \"{hook}\"\n"
            ),
        )],
    );
    let _ = stack.start();
    let mut escaped = Vec::new();
    wait_until(
        "the failure command's child",
        Duration::from_secs(20),
        || {
            escaped = escaped_sleepers(&stack.instance, arg);
            !escaped.is_empty()
        },
    );
    stack.remember(&escaped);
    // Its deadline is 1 s after the command started; give it a few.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && escaped.iter().any(|&p| Stack::alive(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let alive: Vec<i32> = escaped
        .iter()
        .copied()
        .filter(|&p| Stack::alive(p))
        .collect();
    wait_until(
        "the failure command's end in the log",
        Duration::from_secs(20),
        || stack.coordinator_log().contains(ran),
    );
    stack.stop();
    if cgroups_unavailable() {
        eprintln!("skipped: no cgroups here, so a child out of its process group is not held");
        return;
    }
    assert!(
        alive.is_empty(),
        "what the failure command left {alive:?} outlived on_failure_timeout"
    );
}

/// Live processes whose environment names `instance` and whose command line ends in `arg`.
fn escaped_sleepers(instance: &str, arg: &str) -> Vec<i32> {
    let needle = format!("CCMGR_INSTANCE={instance}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let named = environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes());
        if named && cmdline.ends_with(format!("{arg}\0").as_bytes()) && Stack::alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// The event ring truncated under a running stack (`: > run/<instance>.events`, by its owner
/// or a careless cleanup): on main the coordinator's next event store raised SIGBUS and killed
/// it (with `standby = false` nobody takes over), and every `ccmgr events` reader died of
/// SIGBUS too (exit 135). Events may stop; the coordinator must live and readers must say why.
#[test]
fn a_truncated_event_ring_kills_neither_the_coordinator_nor_its_readers() {
    let stack = Stack::new(
        "ring-trunc",
        "[coordinator]\nstandby = false\n",
        &[(
            "svc",
            "command = [\"sleep\", \"100000\"]\nrestart_delay = 0\n",
        )],
    );
    stack.start_ok();
    let before = stack.wait_steady(Duration::from_secs(20));
    let coordinator = before["coordinator"]["pid"].as_i64().unwrap() as i32;
    let victim = before["services"][0]["pid"].as_i64().unwrap() as i32;
    let reader = stack_support::Running::spawn(&stack, &["events"]);
    let ring = stack.run_dir().join(format!("{}.events", stack.instance));
    wait_until(
        "the reader to map the ring",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{}/maps", reader.pid()))
                .is_ok_and(|maps| maps.contains(".events"))
        },
    );
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&ring)
        .unwrap();
    // A failure: the coordinator appends `exited`, `restarting`, ... to the ring.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    stack.wait_for("svc up again", Duration::from_secs(20), |s| {
        s.as_ref()
            .is_some_and(|s| stack_support::up_anew(s, "svc", victim))
    });
    assert!(
        Stack::alive(coordinator),
        "the coordinator died when the ring was truncated:\n{}",
        stack.coordinator_log()
    );
    let out = reader.finish(Duration::from_secs(10));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        None,
        "the reader died of a signal: {}",
        text(&out)
    );
    assert!(text(&out).contains("truncated"), "{}", text(&out));
    stack.stop();
}

/// `run_dir` configured through a symbolic link that lies in a directory another user owns
/// (`/srv/app` is the app user's, `run_dir = "/srv/app/run"` with `run` a link to a root
/// directory). The check looked only at the resolved path; every process goes on naming the
/// configured one. On main the owner of that directory swung the link to a directory of his
/// with `<instance>.procs.new -> victim` planted in it, and root's keeper truncated the
/// root-only victim and wrote its process record into it at the next restart of a service.
#[test]
fn a_run_dir_reached_through_a_link_another_user_can_replace_is_refused() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "run-link",
        "",
        &[
            (
                "crash",
                "command = [\"sh\", \"-c\", \"sleep 0.3; exit 1\"]\nrestart_delay = 0\n",
            ),
            ("ok", "command = [\"sleep\", \"100000\"]\n"),
        ],
    );
    let root = stack.path();
    let real = root.join("real");
    std::fs::create_dir(&real).unwrap();
    let theirs = root.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    give_to_nobody(&theirs);
    let link = theirs.join("run");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::write(
        root.join("ccmgr.toml"),
        format!(
            "instance = \"{}\"\nlog_dir = \"log\"\nrun_dir = \"theirs/run\"\n[coordinator]\nrestart_retry_counter = 100\nrestart_time_span = \"10h\"\n",
            stack.instance
        ),
    )
    .unwrap();
    let victim = root.join("victim");
    std::fs::write(&victim, "root only\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();

    let out = stack.start();
    if out.status.code() != Some(0) {
        assert!(
            text(&out).contains("symbolic link on the way"),
            "refused, but not saying why: {}",
            text(&out)
        );
        return;
    }
    // Accepted: the directory's owner swings the link to a directory of his.
    let evil = theirs.join("evil");
    std::fs::create_dir(&evil).unwrap();
    give_to_nobody(&evil);
    for name in ["procs", "procs.new"] {
        let planted = evil.join(format!("{}.{name}", stack.instance));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        give_to_nobody(&planted);
    }
    let swung = theirs.join("run.new");
    std::os::unix::fs::symlink(&evil, &swung).unwrap();
    std::fs::rename(&swung, &link).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut written = String::new();
    while Instant::now() < deadline {
        written = std::fs::read_to_string(&victim).unwrap();
        if written != "root only\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Back to the real directory, so that the stack can be stopped.
    let back = theirs.join("run.back");
    std::os::unix::fs::symlink(&real, &back).unwrap();
    std::fs::rename(&back, &link).unwrap();
    stack.stop();
    panic!(
        "start accepted a run_dir reached through a link in nobody's directory; after the link was swung, the root-only victim holds: {written:?}"
    );
}

/// A failure command that ignores SIGTERM, with a long `on_failure_timeout`: the keeper waits
/// for it after the stop, `ccmgr stop` gives the keeper 10 s, then kills the keeper and sweeps
/// the cgroups. On main the failure command was in no cgroup and no record: `stop` said
/// "instance ... stopped" (exit 0) and the command lived on, orphaned to init.
#[test]
fn stop_leaves_no_failure_command_alive() {
    let stack = Stack::new(
        "hook-stop",
        "[coordinator]\non_failure_timeout = \"60s\"\n",
        &[("ok", "command = [\"sleep\", \"100000\"]\n")],
    );
    let pid_file = stack.path().join("hook.pid");
    stack.write_service(
        "crash",
        &format!(
            "command = [\"sh\", \"-c\", \"sleep 0.2; exit 3\"]\nrestart = \"never\"\non_failure_command = \"trap '' TERM INT HUP; echo $$ > {0}.new; mv {0}.new {0}; exec sleep 100000\"\n",
            pid_file.display()
        ),
    );
    let _ = stack.start();
    wait_until(
        "the failure command to run",
        Duration::from_secs(20),
        || pid_file.exists(),
    );
    let hook: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    stack.remember(&[hook]);
    let out = stack.stop();
    let alive = Stack::alive(hook);
    if alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(hook),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        !alive,
        "`ccmgr stop` returned ({}) with the failure command {hook} alive",
        text(&out)
    );
}

/// A `run_dir` that does not exist yet, below a link another user owns: on main root's
/// `start` created it wherever the link pointed (a link to `/etc` makes `/etc/<name>`), and
/// only then refused the directory it had made.
#[test]
fn a_missing_run_dir_is_not_created_through_another_user_s_link() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "mkdir-link",
        "",
        &[("ok", "command = [\"sleep\", \"100000\"]\n")],
    );
    let root = stack.path();
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let theirs = root.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    give_to_nobody(&theirs);
    let link = theirs.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    give_to_nobody(&link);
    std::fs::write(
        root.join("ccmgr.toml"),
        format!(
            "instance = \"{}\"\nlog_dir = \"log\"\nrun_dir = \"theirs/link/made\"\n",
            stack.instance
        ),
    )
    .unwrap();
    let out = stack.start();
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !elsewhere.join("made").exists(),
        "root's start created a directory through another user's link: {}",
        text(&out)
    );
}

/// A hard link to a root-only file planted at a log's name in a `log_dir` another user owns.
/// This machine forbids that user the link itself (`fs.protected_hardlinks = 1`); where it is
/// off (some containers, old kernels), he could. The test plants it as root to stand for
/// that: on main root's keeper appended the service's output to the root-only file.
#[test]
fn a_hard_link_planted_at_a_log_name_is_not_written() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "log-hardlink",
        "",
        &[(
            "web",
            "user = \"nobody\"\ncommand = [\"sh\", \"-c\", \"echo PWNED; exec sleep 1000\"]\n",
        )],
    );
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let victim = root_only_file(&stack);
    let log_dir = log_dir_of_nobody(&stack);
    std::fs::hard_link(&victim, log_dir.join("web.log")).unwrap();

    let out = stack.start();
    let stopped = stack.stop();
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "root only\n",
        "root's keeper wrote the service's output into a hard link planted at its log\nstart: {}\nstop: {}",
        text(&out),
        text(&stopped)
    );
}

/// A service running as `nobody` owns the directory of its own `env_file` (the app owns its
/// config). Root's keeper reads that file at each start and hands its lines to the service.
/// On main the service swung `app.env` to another service's root-only secret file and found
/// `DB_PASSWORD` in its environment at its next start. A root-only env file on a path only
/// root controls is still given to a `nobody` service (systemd's `EnvironmentFile=` pattern).
#[test]
fn a_service_user_cannot_read_a_root_only_file_through_his_env_file() {
    if !need_root() {
        return;
    }
    let stack = Stack::new(
        "envfile-link",
        "[coordinator]\nrestart_retry_counter = 50\n",
        &[],
    );
    let root = stack.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = root.join("secret.env");
    std::fs::write(&secret, "DB_PASSWORD=hunter2\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let app = root.join("app");
    let out = root.join("out");
    for dir in [&app, &out] {
        std::fs::create_dir(dir).unwrap();
        give_to_nobody(dir);
    }
    let app_env = app.join("app.env");
    std::fs::write(&app_env, "GREETING=hi\n").unwrap();
    give_to_nobody(&app_env);
    let dump = |name: &str| {
        format!(
            "user = \"nobody\"\ncommand = [\"sh\", \"-c\", \"env > {0}/{name}.$$.new; mv {0}/{name}.$$.new {0}/{name}.$$; sleep 0.3; exit 1\"]\nrestart_delay = 0\n",
            out.display()
        )
    };
    stack.write_service(
        "app",
        &format!("{}env_file = \"../app/app.env\"\n", dump("app")),
    );
    stack.write_service(
        "db",
        &format!("{}env_file = \"../secret.env\"\n", dump("db")),
    );
    let dumps = |prefix: &str| -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&out).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{prefix}.")) && !name.ends_with(".new") {
                found.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        found
    };
    let _ = stack.start();
    wait_until("a start of each service", Duration::from_secs(20), || {
        !dumps("app").is_empty() && !dumps("db").is_empty()
    });
    assert!(
        dumps("db")
            .iter()
            .any(|env| env.contains("DB_PASSWORD=hunter2")),
        "a root-only env file on root's path is no longer given to a nobody service"
    );
    // The service's user swings his env file to the secret.
    let swung = app.join("app.env.new");
    std::os::unix::fs::symlink(&secret, &swung).unwrap();
    give_to_nobody(&swung);
    std::fs::rename(&swung, &app_env).unwrap();
    let before = dumps("app").len();
    wait_until(
        "a start of app after the swing",
        Duration::from_secs(20),
        || {
            dumps("app").len() > before + 1
                || stack
                    .coordinator_log()
                    .contains("is not readable by the service's user")
        },
    );
    let leaked = dumps("app").iter().any(|env| env.contains("DB_PASSWORD"));
    stack.stop();
    assert!(
        !leaked,
        "the nobody service read a root-only file through the env_file link it swung"
    );
}

/// The same when the failure command's main process ends at once (`setsid cmd &` and
/// nothing else): what it left in its cgroup keeps the run's deadline and dies at it.
#[test]
fn what_a_finished_failure_command_left_running_dies_at_its_timeout() {
    escaped_child_dies_at_the_timeout(
        "hook-linger",
        "setsid sleep 4252 &",
        "the failure command ended",
        "4252",
    );
}

/// Whether this machine gives the instance no cgroups (then a child that left its process
/// group cannot be held, and the first check above is moot).
fn cgroups_unavailable() -> bool {
    ccmgr::cgroup::own_cgroup().is_err()
}

/// A file only root may read or write, in the stack's directory: what an attack aims at.
fn root_only_file(stack: &Stack) -> std::path::PathBuf {
    let victim = stack.path().join("victim");
    std::fs::write(&victim, "root only\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    victim
}

/// The careless setup: the stack's `log_dir`, made now and given to the service's user.
fn log_dir_of_nobody(stack: &Stack) -> std::path::PathBuf {
    let log_dir = stack.log_dir();
    std::fs::create_dir(&log_dir).unwrap();
    give_to_nobody(&log_dir);
    log_dir
}

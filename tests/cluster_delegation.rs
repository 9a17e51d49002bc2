//! `ccmgr cluster ARGS...` hands over to `ccmgr-cluster` (src/cli/cluster.rs), and the global
//! file's `[cluster]` table, which ccmgr accepts and leaves to ccmgr-cluster.
//!
//! What is tested is ccmgr's delegation: which binary it runs and with what command line. So
//! the `ccmgr-cluster` here is a shell script that prints what it was given; it stands in for
//! the cluster layer, which is not under test. The real ccmgr binary is linked (or copied) into
//! a directory of the test's own, beside the script, since ccmgr looks beside its own
//! `/proc/self/exe` first.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory with this test's own ccmgr in it.
struct Install {
    dir: tempfile::TempDir,
}

impl Install {
    fn new() -> Install {
        // In the target directory: a hard link to the build's ccmgr (the same file system)
        // needs no copy, and a link is never busy being written.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
        let ccmgr = dir.path().join("ccmgr");
        if std::fs::hard_link(env!("CARGO_BIN_EXE_ccmgr"), &ccmgr).is_err() {
            std::fs::copy(env!("CARGO_BIN_EXE_ccmgr"), &ccmgr).expect("copying ccmgr");
        }
        Install { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a stand-in `ccmgr-cluster` into `dir`: it prints its pid, then each argument on
    /// a line of its own, and exits 7.
    fn stand_in(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let script = dir.join("ccmgr-cluster");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"pid $$\"\nfor a in \"$@\"; do printf 'arg %s\\n' \"$a\"; done\nexit 7\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    /// Runs this ccmgr with `args`, `$PATH` set to `path` and `$CCMGR_CONFIG` to `env_config`
    /// (unset when None); returns its pid and output. A script or binary just written may be
    /// busy for a moment (ETXTBSY: a child another test thread forked meanwhile holds the
    /// writer's fd until it execs): then it is run again, within a deadline.
    fn run(&self, args: &[&str], path: &Path, env_config: Option<&str>) -> (u32, Output) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = Command::new(self.path().join("ccmgr"));
            cmd.args(args)
                .env("PATH", path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            match env_config {
                Some(c) => cmd.env("CCMGR_CONFIG", c),
                None => cmd.env_remove("CCMGR_CONFIG"),
            };
            let child = match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                spawned => spawned.expect("running ccmgr"),
            };
            let pid = child.id();
            let out = child.wait_with_output().expect("waiting for ccmgr");
            if String::from_utf8_lossy(&out.stderr).contains("Text file busy")
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            return (pid, out);
        }
    }
}

/// What the stand-in printed: its pid and its arguments.
fn received(out: &Output) -> (u32, Vec<String>) {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pid = None;
    let mut args = Vec::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("pid ") {
            pid = Some(p.parse().expect("a pid"));
        } else if let Some(a) = line.strip_prefix("arg ") {
            args.push(a.to_owned());
        }
    }
    (
        pid.unwrap_or_else(|| panic!("the stand-in did not run: {out:?}")),
        args,
    )
}

#[test]
fn cluster_runs_the_binary_beside_ccmgr_in_its_place_with_config_and_instance_first() {
    let install = Install::new();
    Install::stand_in(install.path());
    let empty_path = install.path().join("empty-path");
    std::fs::create_dir(&empty_path).unwrap();

    let (pid, out) = install.run(
        &[
            "--config",
            "some/ccmgr.toml",
            "--instance",
            "deleg-a",
            "cluster",
            "--help",
        ],
        &empty_path,
        None,
    );
    // Its exit status is the stand-in's, and it ran in ccmgr's own process: exec, not spawn.
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let (script_pid, args) = received(&out);
    assert_eq!(
        script_pid, pid,
        "ccmgr-cluster did not replace ccmgr (exec)"
    );
    assert_eq!(
        args,
        [
            "--config",
            "some/ccmgr.toml",
            "--instance",
            "deleg-a",
            "--help"
        ]
    );

    // Arguments that look like flags, ccmgr's own among them, are passed on as they are.
    let (_, out) = install.run(
        &[
            "--config",
            "c.toml",
            "cluster",
            "addresses",
            "web",
            "--node",
            "n1",
            "--instance",
            "x",
            "-v",
        ],
        &empty_path,
        None,
    );
    assert_eq!(
        received(&out).1,
        [
            "--config",
            "c.toml",
            "addresses",
            "web",
            "--node",
            "n1",
            "--instance",
            "x",
            "-v"
        ]
    );

    // `--json` given to ccmgr, before `cluster`, goes at the end.
    let (_, out) = install.run(
        &["--json", "--config", "c.toml", "cluster", "status"],
        &empty_path,
        None,
    );
    assert_eq!(received(&out).1, ["--config", "c.toml", "status", "--json"]);
}

#[test]
fn cluster_passes_the_configuration_file_ccmgr_would_read() {
    let install = Install::new();
    Install::stand_in(install.path());
    let empty_path = install.path().join("empty-path");
    std::fs::create_dir(&empty_path).unwrap();

    let (_, out) = install.run(
        &["cluster", "status"],
        &empty_path,
        Some("/srv/from-env.toml"),
    );
    assert_eq!(
        received(&out).1,
        ["--config", "/srv/from-env.toml", "status"]
    );
    let (_, out) = install.run(&["cluster", "status"], &empty_path, None);
    assert_eq!(
        received(&out).1,
        ["--config", "/etc/ccmgr/ccmgr.toml", "status"]
    );
}

#[test]
fn cluster_finds_the_binary_on_path_when_none_is_beside_ccmgr() {
    let install = Install::new();
    let bin = install.path().join("bin");
    Install::stand_in(&bin);
    let (_, out) = install.run(&["--config", "c.toml", "cluster", "leave"], &bin, None);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(received(&out).1, ["--config", "c.toml", "leave"]);
}

#[test]
fn cluster_says_when_ccmgr_cluster_is_not_installed() {
    let install = Install::new();
    let empty_path = install.path().join("empty-path");
    std::fs::create_dir(&empty_path).unwrap();
    // A ccmgr-cluster that is not executable is not one.
    std::fs::write(empty_path.join("ccmgr-cluster"), "#!/bin/sh\nexit 0\n").unwrap();
    let (_, out) = install.run(&["cluster", "status"], &empty_path, None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ccmgr-cluster is not installed"),
        "no clear error: {stderr}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}

/// `ccmgr --config <file> VERB` for a global file `global` beside an empty services.d.
fn with_global(global: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::create_dir(dir.path().join("services.d")).unwrap();
    let config = dir.path().join("ccmgr.toml");
    let run_dir = dir.path().join("run");
    let log_dir = dir.path().join("log");
    std::fs::write(
        &config,
        format!(
            "run_dir = {run_dir:?}\nlog_dir = {log_dir:?}\n{global}",
            run_dir = run_dir.to_str().unwrap(),
            log_dir = log_dir.to_str().unwrap(),
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_ccmgr"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("CCMGR_CONFIG")
        .output()
        .expect("running ccmgr")
}

#[test]
fn the_cluster_table_is_accepted_and_other_unknown_keys_are_not() {
    let cluster = "instance = \"deleg-cfg\"\n[cluster]\nname = \"demo\"\nendpoints = \
                   [\"http://127.0.0.1:2379\"]\nnode = \"n0\"\nnode_number = 0\ndistances = { n1 = 1 }\n";
    let out = with_global(cluster, &["check"]);
    assert!(out.status.success(), "check refuses [cluster]: {out:?}");

    for (global, key) in [
        ("instance = \"deleg-bad\"\nclusters = 1\n", "clusters"),
        (
            "instance = \"deleg-bad\"\n[cluster]\nname = \"demo\"\n[clusterx]\nname = \"x\"\n",
            "clusterx",
        ),
    ] {
        for verb in [&["check"][..], &["reload", "--dry-run"]] {
            let out = with_global(global, verb);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{verb:?} accepts {key}: {stderr}"
            );
            assert!(
                stderr.contains(key),
                "{verb:?} does not name {key}: {stderr}"
            );
        }
    }
    // `cluster` must be a table.
    let out = with_global("instance = \"deleg-bad\"\ncluster = 5\n", &["check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

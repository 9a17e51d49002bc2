//! Real-process tests of `ccmgr::spawn`: what a started service gets (session, environment,
//! directory, credentials, signal state, fds) and how failures before exec are reported.

mod proc_support;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ccmgr::config::Account;
use ccmgr::logsink::make_output_pipe;
use ccmgr::spawn::{
    Credentials, ExecStage, ProcessExit, SpawnError, SpawnRequest, build_environment, signal_group,
    signal_pidfd, spawn_service,
};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Pid, getpgid, getsid};
use proc_support::*;

/// Spawns a request expected to fail before exec and returns the error.
fn spawn_failure(argv: &[&str], dir: PathBuf) -> SpawnError {
    let (_read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest {
        program: argv[0].into(),
        argv: strings(argv),
        env: vec![],
        working_dir: dir,
        credentials: None,
        output: write_end.as_fd(),
        cgroup_procs: None,
        cgroup_dir: None,
    };
    match spawn_service(&req) {
        Ok(spawned) => {
            drop(Guard::new(spawned));
            panic!("spawning {argv:?} succeeded");
        }
        Err(e) => e,
    }
}

#[test]
fn output_and_exit_code_reach_the_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start(
        &["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"],
        &[],
        tmp.path(),
    );
    let out = read_to_eof(s.output.as_fd(), TIMEOUT);
    assert_eq!(String::from_utf8(out).unwrap(), "hello\noops\n");
    assert_eq!(s.child.wait(TIMEOUT), ProcessExit::Exited(3));
}

#[test]
fn a_service_leads_its_own_session_and_process_group() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(&["/bin/sleep", "100"], &[], tmp.path());
    let pid = s.child.pid;
    assert_eq!(getsid(Some(pid)).unwrap(), pid);
    assert_eq!(getpgid(Some(pid)).unwrap(), pid);
    assert_ne!(getsid(None).unwrap(), pid);
    // The guard kills and reaps it.
}

#[test]
fn the_environment_is_exactly_what_was_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("A", "1"), ("B", "two words"), ("EMPTY", ""), ("X", "a=b")];
    let mut s = start(&["/usr/bin/env"], &env, tmp.path());
    let out = String::from_utf8(read_to_eof(s.output.as_fd(), TIMEOUT)).unwrap();
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["A=1", "B=two words", "EMPTY=", "X=a=b"]);
    assert!(s.child.wait(TIMEOUT).success());
}

#[test]
fn a_service_spec_sets_argv_directory_and_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let env_file = tmp.path().join("svc.env");
    fs::write(&env_file, "FROM_FILE=yes\nX=file\n").unwrap();
    let mut svc = service_spec(
        "web",
        &[
            "/bin/sh",
            "-c",
            "pwd; echo \"$0 $X $FROM_FILE $CCMGR_SERVICE $CCMGR_INSTANCE $NOTIFY_SOCKET\"",
            "arg0",
        ],
    );
    svc.working_dir = Some(tmp.path().to_path_buf());
    svc.env_file = Some(env_file);
    svc.env.insert("X".into(), "table".into());
    let env = build_environment(
        &svc,
        "inst",
        Path::new("/run/ccmgr"),
        &pairs(&[("NOTIFY_SOCKET", "/run/n")]),
    )
    .unwrap();
    let (read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest::for_service(&svc, env, write_end.as_fd()).unwrap();
    assert_eq!(req.credentials, None);
    let mut child = Guard::new(spawn_service(&req).unwrap());
    drop(write_end);
    let out = String::from_utf8(read_to_eof(read_end.as_fd(), TIMEOUT)).unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    assert_eq!(
        out,
        format!("{}\narg0 table yes web inst /run/n\n", dir.display())
    );
    assert!(child.wait(TIMEOUT).success());
}

#[test]
fn cc_arg_is_inserted_after_argv0() {
    let tmp = tempfile::tempdir().unwrap();
    let mut svc = service_spec("echoer", &["/bin/echo", "a", "b"]);
    svc.cc_arg = true;
    let (read_end, write_end) = make_output_pipe().unwrap();
    let env = build_environment(&svc, "inst", Path::new("/run/ccmgr"), &[]).unwrap();
    let req = SpawnRequest::for_service(&svc, env, write_end.as_fd()).unwrap();
    let mut child = Guard::new(spawn_service(&req).unwrap());
    drop(write_end);
    let out = read_to_eof(read_end.as_fd(), TIMEOUT);
    assert_eq!(String::from_utf8(out).unwrap(), "-cc a b\n");
    assert!(child.wait(TIMEOUT).success());
    drop(tmp);
}

#[test]
fn a_missing_working_directory_fails_at_chdir_and_leaves_no_zombie() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");
    let err = spawn_failure(&["/bin/true"], missing.clone());
    let SpawnError::Exec {
        stage, errno, pid, ..
    } = &err
    else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(*stage, ExecStage::Chdir);
    assert_eq!(*errno, Errno::ENOENT);
    assert_eq!(
        err.to_string(),
        format!(
            "changing directory to {}: No such file or directory",
            missing.display()
        )
    );
    // Already reaped: it is no longer our child at all.
    assert_eq!(
        waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD)
    );
}

#[test]
fn a_program_that_is_not_executable_fails_at_exec() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("not-executable");
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let err = spawn_failure(&[script.to_str().unwrap()], tmp.path().to_path_buf());
    let SpawnError::Exec { stage, errno, .. } = &err else {
        panic!("unexpected error: {err}");
    };
    assert_eq!((*stage, *errno), (ExecStage::Exec, Errno::EACCES));
    assert_eq!(
        err.to_string(),
        format!("executing {}: Permission denied", script.display())
    );

    let missing = tmp.path().join("missing");
    let err = spawn_failure(&[missing.to_str().unwrap()], tmp.path().to_path_buf());
    assert!(
        matches!(
            err,
            SpawnError::Exec {
                stage: ExecStage::Exec,
                errno: Errno::ENOENT,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn signal_dispositions_and_mask_are_reset() {
    // The copy of this binary runs with SIGUSR1 and SIGINT ignored; the ignore would survive
    // exec into every service unless spawn resets it.
    in_isolated_process(
        "signal_dispositions_and_mask_are_reset",
        &["USR1", "INT"],
        || {
            let status = fs::read_to_string("/proc/self/status").unwrap();
            let ignored = sig_line(&status, "SigIgn");
            let bit = |sig: Signal| 1u64 << (sig as u32 - 1);
            assert_ne!(
                ignored & bit(Signal::SIGUSR1),
                0,
                "precondition: USR1 ignored"
            );
            // The mask is per thread, and the child inherits the spawning thread's.
            let blocked = SigSet::from_iter([Signal::SIGTERM, Signal::SIGUSR2]);
            pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).unwrap();

            let tmp = tempfile::tempdir().unwrap();
            let mut s = start(&["/bin/cat", "/proc/self/status"], &[], tmp.path());
            let out = String::from_utf8(read_to_eof(s.output.as_fd(), TIMEOUT)).unwrap();
            assert!(s.child.wait(TIMEOUT).success());
            assert_eq!(sig_line(&out, "SigIgn"), 0, "{out}");
            assert_eq!(sig_line(&out, "SigBlk"), 0, "{out}");

            // And the behaviour: a shell that sends itself SIGUSR1 dies of it.
            let mut s = start(&["/bin/sh", "-c", "kill -USR1 $$; exit 0"], &[], tmp.path());
            assert_eq!(
                s.child.wait(TIMEOUT),
                ProcessExit::Signaled {
                    signal: Signal::SIGUSR1 as i32,
                    core_dumped: false
                }
            );
        },
    );
}

/// The hex mask on a `Sig...:` line of /proc/<pid>/status.
fn sig_line(status: &str, name: &str) -> u64 {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} line in {status}"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

#[test]
fn fds_the_coordinator_leaked_are_not_inherited() {
    let tmp = tempfile::tempdir().unwrap();
    // A pipe deliberately created without close-on-exec, as a careless caller might.
    let (leaked_read, leaked_write) = nix::unistd::pipe().unwrap();
    let mut s = start(&["/bin/ls", "/proc/self/fd"], &[], tmp.path());
    let out = String::from_utf8(read_to_eof(s.output.as_fd(), TIMEOUT)).unwrap();
    assert!(s.child.wait(TIMEOUT).success());
    // 0-2, and the directory ls itself opened to list.
    assert_eq!(out, "0\n1\n2\n3\n");
    drop((leaked_read, leaked_write));
}

#[test]
fn runs_as_nobody_with_only_its_own_groups() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut svc = service_spec(
        "nobody",
        &["/bin/sh", "-c", "id -u; id -g; id -G; echo $HOME $USER"],
    );
    svc.user = Some(Account {
        name: "nobody".into(),
        id: nobody.uid.as_raw(),
    });
    let creds = Credentials::for_service(&svc).unwrap().unwrap();
    assert_eq!((creds.uid, creds.gid), (65534, nobody.gid.as_raw()));
    let env = build_environment(&svc, "inst", Path::new("/run/ccmgr"), &[]).unwrap();
    let (read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest::for_service(&svc, env, write_end.as_fd()).unwrap();
    let mut child = Guard::new(spawn_service(&req).unwrap());
    drop(write_end);
    let out = String::from_utf8(read_to_eof(read_end.as_fd(), TIMEOUT)).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65534", "{out}");
    assert_eq!(lines[1], nobody.gid.as_raw().to_string(), "{out}");
    // Root's own groups (0) must not come along.
    assert!(!lines[2].split(' ').any(|g| g == "0"), "{out}");
    assert_eq!(lines[3], format!("{} nobody", nobody.dir.display()));
    assert!(child.wait(TIMEOUT).success());
    drop(tmp);
}

#[test]
fn signal_group_reaches_a_grandchild() {
    let tmp = tempfile::tempdir().unwrap();
    // The shell starts a grandchild (with default TERM handling), then ignores TERM itself
    // and reports how the grandchild ended.
    let script = "sleep 100 & trap '' TERM; echo $!; wait $!; echo \"grandchild status $?\"";
    let mut s = start(&["/bin/sh", "-c", script], &[], tmp.path());
    let grandchild: i32 = read_line(s.output.as_fd(), TIMEOUT).parse().unwrap();
    assert_ne!(grandchild, s.child.pid.as_raw());
    assert_eq!(
        getpgid(Some(Pid::from_raw(grandchild))).unwrap(),
        s.child.pid
    );

    signal_group(s.child.pid, Signal::SIGTERM).unwrap();
    let rest = String::from_utf8(read_to_eof(s.output.as_fd(), TIMEOUT)).unwrap();
    // (The shell may also say "Terminated" about its job first.)
    assert!(rest.ends_with("grandchild status 143\n"), "{rest}");
    assert_eq!(s.child.wait(TIMEOUT), ProcessExit::Exited(0));
}

#[test]
fn signal_pidfd_reaches_only_the_live_process() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start(&["/bin/sleep", "100"], &[], tmp.path());
    signal_pidfd(s.child.pidfd.as_fd(), Signal::SIGTERM).unwrap();
    let exit = s.child.wait(TIMEOUT);
    assert_eq!(
        exit,
        ProcessExit::Signaled {
            signal: Signal::SIGTERM as i32,
            core_dumped: false
        }
    );
    assert_eq!(exit.to_string(), "killed by SIGTERM");
    // Reaped: the pidfd now refers to no process, whatever has the pid since.
    assert_eq!(
        signal_pidfd(s.child.pidfd.as_fd(), Signal::SIGKILL),
        Err(Errno::ESRCH)
    );
}

#[test]
fn a_cgroup_that_cannot_be_joined_fails_the_spawn_and_says_so() {
    // /dev/full stands in for a cgroup.procs that refuses the move: every write fails there
    // (ENOSPC), on any machine, cgroups or not.
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (_read_end, write_end) = make_output_pipe().unwrap();
    let req = SpawnRequest {
        program: "/bin/true".into(),
        argv: strings(&["/bin/true"]),
        env: vec![],
        working_dir: "/".into(),
        credentials: None,
        output: write_end.as_fd(),
        cgroup_procs: Some(full.as_fd()),
        cgroup_dir: None,
    };
    let err = match spawn_service(&req) {
        Ok(spawned) => {
            drop(Guard::new(spawned));
            panic!("spawning with an unjoinable cgroup succeeded");
        }
        Err(e) => e,
    };
    let SpawnError::Exec {
        stage, errno, pid, ..
    } = &err
    else {
        panic!("unexpected error: {err}");
    };
    assert_eq!((*stage, *errno), (ExecStage::Cgroup, Errno::ENOSPC));
    assert_eq!(
        err.to_string(),
        "joining the service's cgroup: No space left on device"
    );
    // The failed child was reaped by spawn_service.
    assert_eq!(
        waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD)
    );
}

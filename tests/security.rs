//! What a service running as another user (`nobody`) can and cannot do to the coordinator:
//! it cannot open the coordinator's shared state, and it cannot declare another service ready
//! (the notify socket attributes every datagram by the sender's kernel-checked pid; a claimed
//! `MAINPID=` is only words). Needs root (to run services as nobody); skipped otherwise, except
//! under CI, where it must run.

mod stack_support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use stack_support::{Stack, text, wait_lines};

const LONG: Duration = Duration::from_secs(20);

const SEND: &str = "/usr/bin/python3 -c 'import os,socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ[\\\"NOTIFY_SOCKET\\\"]); s.send(sys.argv[1].encode())'";

#[test]
fn a_service_running_as_nobody_cannot_touch_the_coordinator_or_speak_for_another() {
    if !stack_support::need_root("to run a service as nobody") {
        return;
    }
    let stack = Stack::new("security", "[coordinator]\nstartup_timeout = \"30s\"", &[]);
    // Services as nobody must reach the notify socket in run_dir: the directories on the way
    // must be searchable (as /run/ccmgr is); a test's temp dir is 0700.
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = stack.file("probe.txt");
    std::fs::write(&probe, "").unwrap();
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o666)).unwrap();
    let segment = stack.segment_path().display().to_string();
    // `victim` waits for READY=1 and never sends it. `mallory`, as nobody, records whether it
    // can open the coordinator's segment, then sends READY=1 claiming to be the victim.
    stack.write_service(
        "victim",
        "command = [\"sleep\", \"1000\"]\nready = \"notify\"\nstartup_timeout = \"1500ms\"\nafter = [\"mallory\"]\n",
    );
    stack.write_service(
        "mallory",
        &format!(
            r#"user = "nobody"
command = ["sh", "-c", "if cat {segment} > /dev/null 2>&1; then echo opened >> {probe}; else echo refused >> {probe}; fi; victim=$(cat /proc/$$/stat | cut -d' ' -f4); {SEND} \"READY=1\nMAINPID=$((victim + 2))\"; echo sent >> {probe}; exec sleep 1000"]
"#
        ),
    );
    let out = stack.start();
    let t = text(&out);
    let lines = wait_lines(&probe, 2, LONG);
    assert_eq!(
        lines[0], "refused",
        "nobody could read the coordinator's segment"
    );
    assert_eq!(lines[1], "sent");
    // The victim never said READY=1 itself: it was killed at its startup timeout, and the
    // start failed, whatever mallory claimed.
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("service `victim` was not ready within its startup timeout"),
        "{t}"
    );
}

#[test]
fn the_shared_state_is_owner_only() {
    let stack = Stack::new(
        "segment-mode",
        "",
        &[("a", "command = [\"sleep\", \"1000\"]\n")],
    );
    stack.start_ok();
    let meta = std::fs::metadata(stack.segment_path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

/// Issue 9, item 4: the working directory is entered with the service's own rights, after the
/// switch to its user. Before, root entered it first, and a `nobody` service ran in a 0700
/// root-only directory it could never have entered itself.
#[test]
fn a_service_enters_its_working_dir_with_its_own_rights_not_roots() {
    if !stack_support::need_root("to run a service as nobody") {
        return;
    }
    let stack = Stack::new("workdir-rights", "", &[]);
    // The way to the directory is open to everyone; only the directory itself is root's.
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = stack.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    stack.write_service(
        "intruder",
        &format!(
            "user = \"nobody\"\nworking_dir = \"{}\"\nrestart = \"never\"\ncommand = [\"sleep\", \"1000\"]\n",
            private.display()
        ),
    );
    let out = stack.start();
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a nobody service started in a root-only directory:\n{t}"
    );
    let expected = format!(
        "changing directory to {}: Permission denied",
        private.display()
    );
    assert!(t.contains(&expected), "expected `{expected}` in:\n{t}");
}

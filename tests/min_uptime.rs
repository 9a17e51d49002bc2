//! `min_uptime` through the real binary: `check` accepts it and names the file and line of a
//! misuse; a service that exits before its min_uptime fails `start`, which names it and how
//! it ended, and leaves nothing running (issue 8, defect 11).

mod stack_support;

use stack_support::{Stack, text};

#[test]
fn check_accepts_min_uptime_and_names_the_line_of_a_misuse() {
    let stack = Stack::new(
        "min-uptime-check",
        "",
        &[
            (
                "db",
                "command = [\"sleep\", \"100\"]\nmin_uptime = \"2s\"\n",
            ),
            (
                "migrate",
                "command = [\"true\"]\nready = \"exit\"\nmin_uptime = \"1s\"\n",
            ),
        ],
    );
    let out = stack.ccmgr(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = stack.path().join("services.d").join("migrate.toml");
    assert!(
        stderr.contains(&format!("{}:3:", file.display()))
            && stderr.contains("min_uptime")
            && stderr.contains("one-shot"),
        "the error names the file, the line and the key: {stderr}"
    );
    assert!(
        !stderr.contains("db.toml"),
        "db's min_uptime is fine: {stderr}"
    );

    stack.write_service("migrate", "command = [\"true\"]\nready = \"exit\"\n");
    let out = stack.ccmgr(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn a_service_that_exits_before_its_min_uptime_fails_the_start() {
    let stack = Stack::new(
        "min-uptime-start",
        "",
        &[
            (
                "crash",
                "command = [\"sh\", \"-c\", \"sleep 0.2; exit 7\"]\nmin_uptime = \"2s\"\n",
            ),
            (
                "web",
                "command = [\"sleep\", \"100000\"]\nrequires = [\"crash\"]\n",
            ),
        ],
    );
    let out = stack.start();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("crash") && all.contains("exited with status 7"),
        "start names the service and how it ended: {all}"
    );
    let started = stack.start_order();
    assert_eq!(started, ["crash"], "web never started: crash was never up");
    assert_eq!(stack.status(), None, "nothing runs after a failed start");
}

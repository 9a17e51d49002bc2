//! `ccmgr reload --dry-run` through the real binary, against a running stack: the plan
//! compares the files on disk with the configuration the instance runs (the image in its
//! segment) and lists, in order, what would stop and start; a bad new configuration is
//! reported as `check` reports it (exit 2); nothing is ever touched: every service keeps its
//! pid. Each test runs its own instance; the `Stack` guard stops and reaps everything even
//! when a test fails.

mod stack_support;

use std::time::Duration;

use serde_json::Value;
use stack_support::{Stack, text};

const LONG: Duration = Duration::from_secs(20);

/// A shell that sleeps, and ends at once on SIGTERM.
fn sleeper(extra: &str) -> String {
    format!(
        "command = [\"sh\", \"-c\", \"trap 'exit 0' TERM; while :; do sleep 1 & wait; done\"]\n{extra}\n"
    )
}

/// a; b requires a; c requires b; d is only ordered after b; e alone. Started and up.
fn running(test: &str) -> Stack {
    let stack = Stack::new(test, "", &[]);
    stack.write_service("a", &sleeper(""));
    stack.write_service("b", &sleeper("requires = [\"a\"]"));
    stack.write_service("c", &sleeper("requires = [\"b\"]"));
    stack.write_service("d", &sleeper("after = [\"b\"]"));
    stack.write_service("e", &sleeper(""));
    stack.start_ok();
    stack.wait_steady(LONG);
    stack
}

/// Every service's pid, by id.
fn pids(stack: &Stack) -> Vec<(String, Option<i64>)> {
    let status = stack.status().expect("the stack runs");
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_owned(), s["pid"].as_i64()))
        .collect()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dry_run_prints_the_plan_in_order_and_touches_nothing() {
    let stack = running("reload-plan");
    let before = pids(&stack);

    // Nothing changed on disk: nothing to do.
    let out = stack.ccmgr(&["reload", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "nothing to do: the running configuration is the one on disk\n"
    );
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "nothing to do: the running configuration is the one on disk\n"
    );

    // b changes (and c requires it), e goes away, f comes (requiring a), a setting changes.
    stack.write_service(
        "b",
        &sleeper("requires = [\"a\"]\nenv = { MODE = \"new\" }"),
    );
    std::fs::remove_file(stack.path().join("services.d/e.toml")).unwrap();
    stack.write_service("f", &sleeper("requires = [\"a\"]"));
    let global = stack.path().join("ccmgr.toml");
    let mut text_of_global = std::fs::read_to_string(&global).unwrap();
    text_of_global.push_str("[coordinator]\nrestart_retry_counter = 9\nstandby = false\n");
    std::fs::write(&global, text_of_global).unwrap();

    let out = stack.ccmgr(&["reload", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "stop c (requires b)\n\
         stop b (changed: env)\n\
         stop e (removed)\n\
         start b (changed: env)\n\
         start f (added)\n\
         start c (requires b)\n\
         set coordinator.restart_retry_counter: 5 -> 9 (live)\n\
         set coordinator.standby: true -> false (needs a full restart: the keeper decides whether a standby runs when the stack starts)\n\
         untouched (2): a, d\n"
    );

    let out = stack.ccmgr(&["reload", "--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).expect("the plan is JSON");
    assert_eq!(plan["instance"], stack.instance.as_str());
    let services = |key: &str| -> Vec<String> {
        plan[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["service"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(services("stop"), ["c", "b", "e"], "{plan}");
    assert_eq!(services("start"), ["b", "f", "c"], "{plan}");
    assert_eq!(plan["stop"][1]["reason"], "changed", "{plan}");
    assert_eq!(plan["stop"][1]["fields"][0], "env", "{plan}");
    assert_eq!(plan["stop"][0]["reason"], "requires", "{plan}");
    assert_eq!(plan["stop"][0]["requires"], "b", "{plan}");
    assert_eq!(plan["start"][1]["reason"], "added", "{plan}");
    assert_eq!(plan["settings"][1]["applies"], "full-restart", "{plan}");
    assert_eq!(plan["kept"], serde_json::json!(["a", "d"]), "{plan}");

    // A dry run changes nothing: same services, same pids, same state.
    assert_eq!(pids(&stack), before);

    // Carrying the plan out is not available yet: refused, and nothing changes.
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("live reload is not available in this version: nothing was changed"),
        "{}",
        text(&out)
    );
    assert_eq!(stdout(&out), "");
    assert_eq!(pids(&stack), before);
}

#[test]
fn a_new_cycle_is_reported_with_its_path_and_nothing_changes() {
    let stack = running("reload-cycle");
    let before = pids(&stack);
    // a would now require c, which requires b, which requires a.
    stack.write_service("a", &sleeper("requires = [\"c\"]"));
    for args in [
        &["reload", "--dry-run"][..],
        &["reload", "--dry-run", "--json"],
    ] {
        let out = stack.ccmgr(args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert_eq!(stdout(&out), "", "no plan for a bad configuration");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("error: dependency cycle: a -> c -> b -> a"),
            "{err}"
        );
        let a_file = stack.path().join("services.d/a.toml");
        assert!(
            err.contains(&format!("`a` is declared in {}", a_file.display())),
            "{err}"
        );
        assert!(err.contains("nothing was changed"), "{err}");
    }
    assert_eq!(pids(&stack), before);
}

#[test]
fn a_bad_file_is_reported_with_its_line_and_nothing_changes() {
    let stack = running("reload-badfile");
    let before = pids(&stack);
    stack.write_service("g", "command = [\"sh\"]\nrestart_delay = \"soon\"\n");
    let out = stack.ccmgr(&["reload", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let g_file = stack.path().join("services.d/g.toml");
    assert!(err.contains(&format!("{}:2:", g_file.display())), "{err}");
    // The same words as `check`.
    let check = stack.ccmgr(&["check"]);
    assert_eq!(check.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&check.stderr), err);
    assert_eq!(pids(&stack), before);
}

#[test]
fn dry_run_of_an_instance_that_does_not_run_says_so() {
    let stack = Stack::new("reload-norun", "", &[("a", &sleeper(""))]);
    let out = stack.ccmgr(&["reload", "--dry-run"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "instance {} is not running: nothing to reload",
            stack.instance
        )),
        "{}",
        text(&out)
    );
}

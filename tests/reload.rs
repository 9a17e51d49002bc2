//! `ccmgr reload [--dry-run]` through the real binary, against a running stack: the plan
//! compares the files on disk with the configuration the instance runs (the image in its
//! segment) and lists, in order, what stops and starts; the reload then does exactly that,
//! while every other service keeps its pid; a bad new configuration is reported as `check`
//! reports it (exit 2) and changes nothing; a coordinator killed in the middle of a reload
//! leaves a stack its successor finishes reloading. Each test runs its own instance; the
//! `Stack` guard stops and reaps everything even when a test fails.

mod api_support;
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
    running_with_b(test, &sleeper(""))
}

/// [`running`], with b's command line (and what else) `b`.
fn running_with_b(test: &str, b: &str) -> Stack {
    let stack = Stack::new(test, "", &[]);
    stack.write_service("a", &sleeper(""));
    stack.write_service("b", &format!("{b}requires = [\"a\"]\n"));
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
    text_of_global.push_str("[coordinator]\nrestart_retry_counter = 9\n");
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
    assert_eq!(plan["settings"][0]["applies"], "live", "{plan}");
    assert_eq!(plan["refused"], Value::Null, "{plan}");
    assert_eq!(plan["kept"], serde_json::json!(["a", "d"]), "{plan}");

    // A dry run changes nothing: same services, same pids, same state.
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
        if args.contains(&"--json") {
            // No plan: the errors, as `check --json` gives them.
            let doc: Value = serde_json::from_str(&stdout(&out)).unwrap();
            assert_eq!(doc["ok"], false, "{doc}");
            assert!(
                doc.get("stop").is_none(),
                "no plan for a bad configuration: {doc}"
            );
        } else {
            assert_eq!(stdout(&out), "", "no plan for a bad configuration");
        }
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
    // Nor does the reload itself.
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: dependency cycle: a -> c -> b -> a"),
        "{}",
        text(&out)
    );
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

/// `list` restricted to the names in `only`, in its order.
fn only<'a>(list: &'a [String], only: &[&str]) -> Vec<&'a str> {
    list.iter()
        .map(String::as_str)
        .filter(|s| only.contains(s))
        .collect()
}

/// The events the instance holds, read with `ccmgr events --json -n 1024` until one of kind
/// `until` shows up (or the deadline passes): the command follows for ever, so it is read
/// from a thread and killed.
fn events_until(stack: &Stack, until: &str, limit: Duration) -> Vec<Value> {
    use std::io::BufRead as _;
    let mut running = stack_support::Running::spawn(stack, &["events", "--json", "-n", "1024"]);
    let stdout = running.child.as_mut().unwrap().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + limit;
    let mut events = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        let event: Value = serde_json::from_str(&line).expect("an event is JSON");
        let done = event["event"] == until;
        events.push(event);
        if done {
            break;
        }
    }
    drop(running);
    events
}

fn pid_of(status: &Value, id: &str) -> Option<i64> {
    stack_support::service_of(status, id)["pid"].as_i64()
}

fn ids(status: &Value) -> Vec<String> {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// b changes (c requires it), e goes, f comes.
fn edit_files(stack: &Stack, b_command: &str) {
    stack.write_service(
        "b",
        &format!("{b_command}requires = [\"a\"]\nenv = {{ MODE = \"new\" }}\n"),
    );
    std::fs::remove_file(stack.path().join("services.d/e.toml")).unwrap();
    stack.write_service("f", &sleeper("requires = [\"a\"]"));
}

/// What the plan (`--json`) stops and starts, by name.
fn plan_sets(stack: &Stack) -> (Vec<String>, Vec<String>) {
    let out = stack.ccmgr(&["reload", "--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names = |key: &str| -> Vec<String> {
        plan[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["service"].as_str().unwrap().to_owned())
            .collect()
    };
    (names("stop"), names("start"))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn reload_does_what_the_dry_run_printed_and_the_rest_keeps_its_pids() {
    let stack = running("reload-apply");
    let before = stack.status().unwrap();
    edit_files(&stack, &sleeper(""));
    let (stop, start) = plan_sets(&stack);
    assert_eq!(stop, ["c", "b", "e"]);
    assert_eq!(start, ["b", "f", "c"]);

    let mark = stack.log_len();
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("reloaded\n"),
        "{}",
        text(&out)
    );
    // Waited until done: the new configuration runs, every service up, as it returns.
    let after = stack.status().unwrap();
    assert_eq!(ids(&after), ["a", "b", "c", "d", "f"], "{after}");
    assert!(stack_support::steady_and_all_up(&after), "{after}");
    for id in ["a", "d"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} was touched");
    }
    for id in ["b", "c"] {
        assert_ne!(
            pid_of(&after, id),
            pid_of(&before, id),
            "{id} was not restarted"
        );
    }
    // Exactly what the plan said: these stopped, dependents first; these started, in order.
    let stopped = stack.logged(mark, "stopping");
    let started = stack.logged(mark, "started");
    assert_eq!(sorted(stopped.clone()), sorted(stop), "{stopped:?}");
    assert_eq!(sorted(started.clone()), sorted(start), "{started:?}");
    assert_eq!(only(&stopped, &["b", "c"]), ["c", "b"]);
    assert_eq!(only(&started, &["b", "c"]), ["b", "c"]);
    // The running configuration is now the one on disk, and the event says so.
    let again = stack.ccmgr(&["reload", "--dry-run"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).starts_with("nothing to do"),
        "{}",
        text(&again)
    );
    let events = events_until(&stack, "reload-applied", LONG);
    assert!(
        events.iter().any(|e| e["event"] == "reload-applied"),
        "{events:?}"
    );
    // The reloaded stack stops as any other.
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stack.status().is_none());
}

#[test]
fn sighup_to_the_coordinator_reloads() {
    let stack = running("reload-hup");
    let before = stack.status().unwrap();
    stack.write_service("f", &sleeper("requires = [\"a\"]"));
    let coordinator = before["coordinator"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let after = stack
        .wait_for("f up after SIGHUP", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                ids(s).contains(&"f".to_owned()) && stack_support::steady_and_all_up(s)
            })
        })
        .unwrap();
    for id in ["a", "b", "c", "d", "e"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} was touched");
    }
}

#[test]
fn a_coordinator_killed_in_the_middle_of_a_reload_leaves_it_to_its_successor() {
    // b takes a second to stop: the coordinator is killed while it does.
    let slow = "command = [\"sh\", \"-c\", \"trap 'sleep 1; exit 0' TERM; while :; do sleep 1 & wait; done\"]\n";
    let stack = running_with_b("reload-kill", slow);
    let before = stack.wait_steady_with_standby(LONG);
    let coordinator = before["coordinator"]["pid"].as_i64().unwrap() as i32;
    edit_files(&stack, slow);

    let reload = stack_support::Running::spawn(&stack, &["reload"]);
    stack.wait_for("b stopping", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| stack_support::service_of(s, "b")["state"] == "stopping")
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = reload.finish(Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = stack.status().unwrap();
    assert_eq!(ids(&after), ["a", "b", "c", "d", "f"], "{after}");
    assert!(stack_support::steady_and_all_up(&after), "{after}");
    assert_ne!(
        after["coordinator"]["pid"].as_i64(),
        Some(coordinator as i64)
    );
    for id in ["a", "d"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} was touched");
    }
    assert_ne!(pid_of(&after, "b"), pid_of(&before, "b"));
    let events = events_until(&stack, "reload-applied", LONG);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert!(kinds.contains(&"takeover"), "{kinds:?}");
    assert!(kinds.contains(&"reload-applied"), "{kinds:?}");
    // The standby finished it because the reload was marked, not because it was asked
    // again: it found the marker on the old segment, and its successor on the new one.
    let log = stack.coordinator_log();
    assert!(
        log.matches("a reload was under way: finishing it").count() >= 2,
        "{log}"
    );
}

#[test]
fn what_the_operator_stopped_stays_stopped_through_a_reload() {
    let stack = running("reload-held");
    let out = stack.ccmgr(&["stop", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let before = stack.status().unwrap();
    stack.write_service(
        "b",
        &sleeper("requires = [\"a\"]\nenv = { MODE = \"new\" }"),
    );
    let out = stack.ccmgr(&["reload", "--dry-run"]);
    assert_eq!(
        stdout(&out),
        "stop c (requires b)\n\
         stop b (changed: env)\n\
         start b (changed: env)\n\
         keep c stopped (stopped by the operator)\n\
         untouched (3): a, d, e\n"
    );
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = stack.status().unwrap();
    assert_ne!(pid_of(&after, "b"), pid_of(&before, "b"));
    assert_eq!(
        stack_support::service_of(&after, "c")["state"],
        "stopped by the operator",
        "{after}"
    );
    for id in ["a", "d", "e"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} was touched");
    }
    // And it starts as before, with the new configuration.
    let out = stack.ccmgr(&["start", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn sighup_to_a_foreground_start_reloads() {
    let stack = Stack::new("reload-fg", "", &[("a", &sleeper(""))]);
    let mut foreground = stack_support::Running::spawn(&stack, &["start", "--foreground"]);
    let before = stack.wait_for("the stack up", LONG, |s| {
        s.as_ref().is_some_and(stack_support::steady_and_all_up)
    });
    let before = before.unwrap();
    stack.write_service("f", &sleeper("requires = [\"a\"]"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(foreground.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let after = stack
        .wait_for("f up after SIGHUP", LONG, |s| {
            s.as_ref().is_some_and(|s| {
                ids(s).contains(&"f".to_owned()) && stack_support::steady_and_all_up(s)
            })
        })
        .unwrap();
    assert_eq!(pid_of(&after, "a"), pid_of(&before, "a"));
    assert!(!foreground.has_ended(), "the foreground process ended");
    // (The stop reaps the foreground process, the keeper: the test process is its parent.)
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn a_new_service_that_fails_fails_the_reload_naming_it() {
    let stack = running("reload-fails");
    let before = stack.status().unwrap();
    // (`min_uptime`: it is not up, even for an instant, before it fails.)
    stack.write_service(
        "g",
        "command = [\"sh\", \"-c\", \"sleep 0.2; exit 3\"]\nrestart = \"never\"\nmin_uptime = \"5s\"\n",
    );
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("ccmgr: g failed: exited with status 3, and stays down"),
        "{}",
        text(&out)
    );
    // The reload itself is applied: the rest runs on, untouched, under the new configuration.
    let after = stack.status().unwrap();
    assert_eq!(ids(&after), ["a", "b", "c", "d", "e", "g"], "{after}");
    for id in ["a", "b", "c", "d", "e"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} was touched");
    }
}

#[test]
fn a_reload_that_changes_what_the_service_api_lists_is_refused_while_a_service_uses_it() {
    let built = api_support::artifacts();
    let stack = Stack::new("reload-api", "", &[]);
    let log = stack.file("api.log");
    stack.write_service(
        "db",
        &format!(
            "command = [\"{}\", \"--log\", \"{log}\"]\ncc_arg = true\nready = \"cc\"\nenv = {{ CC_SERVICE_HEARTBEAT_MS = \"60000\" }}\n",
            built.rust_service.display()
        ),
    );
    stack.write_service("web", &sleeper("requires = [\"db\"]"));
    stack.start_ok();
    let before = stack.wait_steady(LONG);
    stack.write_service("x", &sleeper(""));
    let why = "a live reload is refused: this reload changes the services or the shutdown order the service API lists, and db uses that API";
    let dry = stack.ccmgr(&["reload", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert!(stdout(&dry).contains(why), "{}", text(&dry));
    let out = stack.ccmgr(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("nothing was changed"), "{}", text(&out));
    let after = stack.status().unwrap();
    assert_eq!(ids(&after), ["db", "web"], "{after}");
    for id in ["db", "web"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} was touched");
    }
}

#[test]
fn a_stop_during_a_reload_stops_everything_and_the_reload_says_it_was_not_applied() {
    let slow = "command = [\"sh\", \"-c\", \"trap 'sleep 1; exit 0' TERM; while :; do sleep 1 & wait; done\"]\n";
    let stack = running_with_b("reload-stop", slow);
    edit_files(&stack, slow);
    let reload = stack_support::Running::spawn(&stack, &["reload"]);
    stack.wait_for("b stopping", LONG, |s| {
        s.as_ref()
            .is_some_and(|s| stack_support::service_of(s, "b")["state"] == "stopping")
    });
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = reload.finish(LONG);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stack.status().is_none());
    let marker = stack.run_dir().join(format!("{}.reload", stack.instance));
    assert!(!marker.exists(), "the reload marker outlived the stack");
}

/// A reload cut short by the keeper's death (`kill -9` in the middle) leaves its marker
/// (`<instance>.reload`) and maybe its staged segment (`<instance>.seg.reload`): the `stop`
/// that cleans up after it removes them with the rest of the instance's files, as the keeper
/// does at an orderly end. (Before, they stayed until the next start.)
#[test]
fn a_stop_after_a_reload_cut_short_leaves_no_reload_files() {
    let stack = running("reload-cut");
    let status = stack.status().unwrap();
    let keeper = status["keeper"]["pid"].as_i64().unwrap() as i32;
    // What a reload in flight has made when its keeper dies.
    let run = stack.run_dir();
    let marker = run.join(format!("{}.reload", stack.instance));
    let staged = run.join(format!("{}.seg.reload", stack.instance));
    std::fs::write(&marker, "{\"held\":[],\"attempts\":1}").unwrap();
    std::fs::write(&staged, "").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = stack.stop();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!marker.exists(), "the reload marker was left behind");
    assert!(!staged.exists(), "the staged segment was left behind");
}

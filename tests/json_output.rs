//! `--json` on every verb that reports (issue 10, item 7), through the real binary: each
//! prints one JSON document on stdout (for `logs`, one object per line), and the sentences for
//! people go to stderr.

mod stack_support;

use std::time::Duration;

use serde_json::Value;
use stack_support::{Stack, text};

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{}", text(out)))
}

#[test]
fn every_reporting_verb_speaks_json() {
    let stack = Stack::new(
        "json-out",
        "",
        &[
            (
                "a",
                "command = [\"sh\", \"-c\", \"echo hello from a; exec sleep 100000\"]\n",
            ),
            (
                "b",
                "command = [\"sleep\", \"100000\"]\nrequires = [\"a\"]\n",
            ),
        ],
    );
    let check = json_of(&stack.ccmgr(&["--json", "check"]));
    assert_eq!(check["ok"], true);
    assert_eq!(check["startup_sequence"], serde_json::json!(["a", "b"]));
    assert_eq!(check["levels"], serde_json::json!([["a"], ["b"]]));

    let graph = json_of(&stack.ccmgr(&["graph", "--format", "json"]));
    assert_eq!(
        graph["edges"],
        serde_json::json!([{"from": "b", "to": "a", "kind": "requires"}])
    );
    assert_eq!(json_of(&stack.ccmgr(&["--json", "graph"])), graph);

    let out = stack.ccmgr(&["--json", "start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let start = json_of(&out);
    assert_eq!(start["ok"], true);
    assert_eq!(start["services"][0]["id"], "a");
    assert!(start["services"][0]["pid"].as_i64().is_some(), "{start}");
    stack.wait_steady(Duration::from_secs(10));

    let out = stack.ccmgr(&["--json", "stop", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stop_b = json_of(&out);
    assert_eq!(stop_b["verb"], "stop");
    assert_eq!(stop_b["services"], serde_json::json!(["b"]));
    assert_eq!(stop_b["result"]["reply"], "done");

    // logs: one object per line (the line is written once a is up; poll for it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = stack.ccmgr(&["--json", "logs", "a"]);
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines
            .iter()
            .any(|l| l["service"] == "a" && l["line"] == "hello from a")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{lines:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = stack.ccmgr(&["--json", "stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stop = json_of(&out);
    assert_eq!(
        (stop["verb"].clone(), stop["ok"].clone()),
        ("stop".into(), true.into())
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stopped"),
        "the sentence goes to stderr: {}",
        text(&out)
    );
}

#[test]
fn check_json_names_the_file_and_line_of_each_error() {
    let stack = Stack::new(
        "json-check",
        "",
        &[(
            "web",
            "command = [\"sleep\", \"1\"]\nrequires = [\"databse\"]\n",
        )],
    );
    let out = stack.ccmgr(&["--json", "check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let doc = json_of(&out);
    assert_eq!(doc["ok"], false);
    let error = &doc["errors"][0];
    assert!(
        error["file"]
            .as_str()
            .unwrap()
            .ends_with("services.d/web.toml"),
        "{doc}"
    );
    assert_eq!(error["line"], 2, "{doc}");
    assert!(
        error["message"].as_str().unwrap().contains("databse"),
        "{doc}"
    );
}

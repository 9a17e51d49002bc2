//! The operator's cluster verbs end to end, with real etcd and real nodes (each its own ccmgr
//! instance and agent): `leave`, `move` (and its refusal), `stop`/`start`, `auto_start =
//! false`, `placement = "all"`, a start that fails on some nodes, and the agent's refusal of a
//! bad cluster.d file or a configuration without `[cluster]`. Where a service ran is proven by
//! the services' own witness records, never by timing.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{ClusterDef, Etcd, Node, etcdctl_at, text, wait_for, wait_until};

/// How long placements, moves and leaves may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Starts `n` nodes `n0..` (ccmgr, then agent) on `etcd`.
fn nodes(def: &ClusterDef, etcd: &Etcd, n: u32) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n)
        .map(|i| def.simple_node(&format!("n{i}"), i, &etcd.endpoints()))
        .collect();
    for node in &nodes {
        node.start_ccmgr();
        node.start_agent();
    }
    nodes
}

/// The service `name` of `cluster status --json`, asked on `node`.
fn service(node: &Node, name: &str) -> Value {
    let status = node.cluster_json(&["status", "--json"]);
    status["services"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `cluster status` shows `name` with summary state `state`; returns it.
fn wait_state(node: &Node, name: &str, state: &str) -> Value {
    wait_for(LIMIT, &format!("{name} {state}"), || {
        let s = service(node, name);
        if s["state"] == state { Ok(s) } else { Err(s) }
    })
}

/// The nodes `name` has an instance on, by `cluster status`.
fn instance_nodes(s: &Value) -> Vec<String> {
    s["nodes_with_instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// Every event of the cluster so far, read from etcd (they are kept an hour), in key order.
fn events(def: &ClusterDef, etcd: &Etcd) -> Vec<Value> {
    let prefix = format!("/ccmgr/{}/events/", def.name);
    let out = etcdctl_at(
        &etcd.endpoints(),
        &["get", "--prefix", "--print-value-only", &prefix],
    );
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The nodes whose witness shows `service` running now.
fn running_on_all(def: &ClusterDef, service: &str) -> Vec<String> {
    let mut v: Vec<String> = def
        .witness()
        .runs(service)
        .into_iter()
        .filter(|r| r.end_ns.is_none())
        .map(|r| r.node)
        .collect();
    v.sort();
    v
}

/// Prints every node's agent log when the test fails, for the post-mortem.
struct LogsOnFailure<'a>(&'a [Node]);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in self.0 {
                eprintln!("--- agent log of {}:\n{}", n.name, n.agent_log());
            }
        }
    }
}

fn by_name<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
    nodes
        .iter()
        .find(|n| n.name == name)
        .expect("a node of the test")
}

/// A graceful leave: the leaving node's services are transferred first (its run of the
/// register-on-one service ends before the run elsewhere starts, and before the member-left
/// event), its `placement = "all"` service stops there and nowhere else, its agent exits 0,
/// and the manager publishes member-left.
#[test]
fn leave_transfers_the_services_first_and_the_agent_exits_0() {
    let etcd = Etcd::start("leave");
    let def = ClusterDef::new("leave");
    def.write_witnessed_service("web", "placement = \"one\"");
    def.write_witnessed_service("every", "placement = \"all\"");
    let nodes = nodes(&def, &etcd, 3);
    let _logs = LogsOnFailure(&nodes);
    let on = wait_until(LIMIT, "web placed", || def.witness().running_on("web"));
    wait_until(LIMIT, "every on the three nodes", || {
        (running_on_all(&def, "every") == ["n0", "n1", "n2"]).then_some(())
    });
    wait_state(&nodes[0], "web", "registered");
    let leaving = by_name(&nodes, &on);
    let other = nodes.iter().find(|n| n.name != on).unwrap();

    // What ran before the leave is not this test's business (a slow machine may fence a
    // node at its start); what the leave did is.
    let t_leave = support::now_ns();
    let out = leaving.cluster(&["leave"]);
    assert!(out.status.success(), "leave: {}", text(&out));
    let status = wait_until(LIMIT, "the leaving agent exited", || leaving.agent_exited());
    assert!(
        status.success(),
        "the agent of {on} exited with {status:?}:\n{}",
        leaving.agent_log()
    );

    let web = wait_state(other, "web", "registered");
    let now_on = instance_nodes(&web);
    assert_eq!(now_on.len(), 1, "{web:#}");
    assert_ne!(now_on[0], on, "{web:#}");
    wait_until(LIMIT, "web witnessed on the new node", || {
        (def.witness().running_on("web").as_ref() == Some(&now_on[0])).then_some(())
    });
    let runs = def.witness().assert_never_twice("web");
    let since: Vec<_> = runs
        .iter()
        .filter(|r| r.end_ns.is_none_or(|e| e >= t_leave))
        .collect();
    assert_eq!(since.len(), 2, "web ran on {on}, then elsewhere: {runs:#?}");
    assert_eq!(since[0].node, on);
    assert_eq!(since[1].node, now_on[0]);
    assert!(since[1].start_ns >= t_leave, "{runs:#?}");
    let left_end = since[0]
        .end_ns
        .expect("web's run on the leaving node ended");

    // every: stopped on the leaving node only; the two others kept the run they had.
    let every = def.witness().runs("every");
    for r in every
        .iter()
        .filter(|r| r.end_ns.is_none_or(|e| e >= t_leave))
    {
        if r.node == on {
            assert!(r.end_ns.is_some(), "every still runs on {on}: {every:#?}");
        } else {
            assert!(
                r.end_ns.is_none() && r.start_ns < t_leave,
                "every stopped or restarted on {}: {every:#?}",
                r.node
            );
        }
    }
    assert_eq!(running_on_all(&def, "every").len(), 2, "{every:#?}");

    let status = other.cluster_json(&["status", "--json"]);
    let member = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == on.as_str())
        .cloned()
        .unwrap();
    assert_eq!(member["state"], "down", "{status:#}");

    let evs = wait_until(LIMIT, "member-left published", || {
        let evs = events(&def, &etcd);
        evs.iter()
            .any(|e| e["event"] == "member-left" && e["member"] == on.as_str())
            .then_some(evs)
    });
    assert!(
        !evs.iter()
            .any(|e| e["event"] == "member-lost" || e["event"] == "member-fenced"),
        "a graceful leave is no loss: {evs:#?}"
    );
    let left_ms = evs
        .iter()
        .find(|e| e["event"] == "member-left" && e["member"] == on.as_str())
        .and_then(|e| e["unix_ms"].as_u64())
        .unwrap();
    // The service's run there ended before the member left (ms resolution of the event).
    assert!(
        left_end < (u128::from(left_ms) + 1) * 1_000_000,
        "web's run on {on} ended at {left_end} ns, after member-left at {left_ms} ms"
    );
}

/// `move SERVICE NODE` places the service there (never on two at once); a node it may not run
/// on is refused with exit 1 and a sentence, and so is a node that is no member.
#[test]
fn move_transfers_by_hand_and_refuses_a_disallowable_node() {
    let etcd = Etcd::start("move");
    let def = ClusterDef::new("move");
    def.write_witnessed_service("web", "placement = \"one\"\ndisallowable_nodes = [\"n2\"]");
    let nodes = nodes(&def, &etcd, 3);
    let _logs = LogsOnFailure(&nodes);
    let on = wait_until(LIMIT, "web placed", || def.witness().running_on("web"));
    assert_ne!(on, "n2");
    let to = if on == "n0" { "n1" } else { "n0" };

    let out = nodes[2].cluster(&["move", "web", to]);
    assert!(out.status.success(), "move web {to}: {}", text(&out));
    wait_until(LIMIT, "web witnessed on the target", || {
        (def.witness().running_on("web").as_deref() == Some(to)).then_some(())
    });
    let web = wait_state(&nodes[0], "web", "registered");
    assert_eq!(instance_nodes(&web), [to], "{web:#}");
    let runs = def.witness().assert_never_twice("web");
    assert_eq!(runs.len(), 2, "{runs:#?}");

    let out = nodes[0].cluster(&["move", "web", "n2"]);
    assert_eq!(out.status.code(), Some(1), "move to n2: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web") && err.contains("n2"), "{}", text(&out));
    let out = nodes[0].cluster(&["move", "web", "n9"]);
    assert_eq!(out.status.code(), Some(1), "move to n9: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("n9"),
        "{}",
        text(&out)
    );
    // Nothing moved.
    let web = wait_state(&nodes[0], "web", "registered");
    assert_eq!(instance_nodes(&web), [to], "{web:#}");
    assert_eq!(def.witness().assert_never_twice("web").len(), 2);
}

/// `stop SERVICE` de-registers it everywhere and it stays down (across later manager passes
/// for another service); `start SERVICE` registers it again.
#[test]
fn stop_deregisters_everywhere_and_start_registers_again() {
    let etcd = Etcd::start("stopstart");
    let def = ClusterDef::new("stopstart");
    def.write_witnessed_service("web", "placement = \"one\"");
    def.write_witnessed_service("every", "placement = \"all\"");
    def.write_witnessed_service("other", "placement = \"one\"");
    let nodes = nodes(&def, &etcd, 2);
    let _logs = LogsOnFailure(&nodes);
    wait_until(LIMIT, "every on both nodes", || {
        (running_on_all(&def, "every") == ["n0", "n1"]).then_some(())
    });
    wait_until(LIMIT, "web placed", || def.witness().running_on("web"));

    for s in ["web", "every"] {
        let out = nodes[0].cluster(&["stop", s]);
        assert!(out.status.success(), "stop {s}: {}", text(&out));
        assert!(
            running_on_all(&def, s).is_empty(),
            "{s} still runs: {:#?}",
            def.witness().runs(s)
        );
        let st = wait_state(&nodes[1], s, "deregistered");
        assert_eq!(st["wanted"], false, "{st:#}");
        assert!(instance_nodes(&st).is_empty(), "{st:#}");
    }
    for n in &nodes {
        assert!(!n.runs("web") && !n.runs("every"), "still up in {}", n.name);
    }

    // Later passes of the manager (another service stopped and started) leave them down.
    let out = nodes[1].cluster(&["stop", "other"]);
    assert!(out.status.success(), "stop other: {}", text(&out));
    let out = nodes[1].cluster(&["start", "other"]);
    assert!(out.status.success(), "start other: {}", text(&out));
    for s in ["web", "every"] {
        assert_eq!(service(&nodes[0], s)["state"], "deregistered");
        assert!(running_on_all(&def, s).is_empty());
    }
    assert_eq!(def.witness().runs("web").len(), 1);

    let out = nodes[1].cluster(&["start", "web"]);
    assert!(out.status.success(), "start web: {}", text(&out));
    let web = wait_state(&nodes[0], "web", "registered");
    assert_eq!(web["wanted"], true, "{web:#}");
    assert_eq!(instance_nodes(&web).len(), 1, "{web:#}");
    wait_until(LIMIT, "web runs again", || def.witness().running_on("web"));
    assert_eq!(def.witness().assert_never_twice("web").len(), 2);

    let out = nodes[1].cluster(&["start", "every"]);
    assert!(out.status.success(), "start every: {}", text(&out));
    wait_until(LIMIT, "every on both nodes again", || {
        (running_on_all(&def, "every") == ["n0", "n1"]).then_some(())
    });
}

/// An `auto_start = false` service is not placed (while others are) until `start`.
#[test]
fn an_auto_start_false_service_waits_for_start() {
    let etcd = Etcd::start("autostart");
    let def = ClusterDef::new("autostart");
    def.write_witnessed_service("lazy", "auto_start = false");
    def.write_witnessed_service("eager", "placement = \"one\"");
    let nodes = nodes(&def, &etcd, 2);
    let _logs = LogsOnFailure(&nodes);
    wait_state(&nodes[0], "eager", "registered");
    // The manager has placed eager, so it has passed over lazy: lazy stays down.
    let lazy = service(&nodes[0], "lazy");
    assert_eq!(lazy["state"], "deregistered", "{lazy:#}");
    assert_eq!(lazy["wanted"], false, "{lazy:#}");
    assert!(def.witness().runs("lazy").is_empty());

    let out = nodes[1].cluster(&["start", "lazy"]);
    assert!(out.status.success(), "start lazy: {}", text(&out));
    wait_state(&nodes[0], "lazy", "registered");
    let on = wait_until(LIMIT, "lazy runs", || def.witness().running_on("lazy"));
    assert!(by_name(&nodes, &on).runs("lazy"));
}

/// `placement = "all"` runs on every allowable node (not on the others) and stops on one
/// that leaves, the others' runs untouched.
#[test]
fn placement_all_runs_on_every_allowable_node_and_stops_on_a_leaving_one() {
    let etcd = Etcd::start("all");
    let def = ClusterDef::new("all");
    def.write_witnessed_service(
        "every",
        "placement = \"all\"\nallowable_nodes = [\"n0\", \"n1\", \"n3\"]",
    );
    let nodes = nodes(&def, &etcd, 3);
    let _logs = LogsOnFailure(&nodes);
    wait_until(LIMIT, "every on n0 and n1", || {
        (running_on_all(&def, "every") == ["n0", "n1"]).then_some(())
    });
    let st = wait_state(&nodes[2], "every", "registered");
    assert_eq!(instance_nodes(&st), ["n0", "n1"], "{st:#}");
    assert!(!nodes[2].runs("every"));

    let out = nodes[1].cluster(&["leave"]);
    assert!(out.status.success(), "leave n1: {}", text(&out));
    let status = wait_until(LIMIT, "n1's agent exited", || nodes[1].agent_exited());
    assert!(status.success(), "{status:?}: {}", nodes[1].agent_log());
    assert_eq!(running_on_all(&def, "every"), ["n0"]);
    let runs = def.witness().runs("every");
    assert_eq!(runs.len(), 2, "n0's run kept, n1's ended: {runs:#?}");
    let st = wait_for(LIMIT, "every only on n0", || {
        let s = service(&nodes[0], "every");
        if instance_nodes(&s) == ["n0"] {
            Ok(s)
        } else {
            Err(s)
        }
    });
    assert_eq!(st["state"], "registered", "{st:#}");
    assert!(!nodes[2].runs("every"));
}

/// A witnessed command that fails at once (exit 1) on the nodes for which the file
/// `<def dir>/fail-<instance>` exists: the local part differs by node.
fn failing_where_marked(def: &ClusterDef) -> String {
    let d = def.dir.path().display().to_string().replace('\'', "'\\''");
    let w = def
        .witness_path()
        .display()
        .to_string()
        .replace('\'', "'\\''");
    let script = format!(
        "[ -e '{d}'/fail-\"$CCMGR_INSTANCE\" ] && exit 1; W='{w}'; \
         echo \"start $CCMGR_INSTANCE $CCMGR_SERVICE $(date +%s%N)\" >> \"$W\"; \
         trap 'echo \"stop $CCMGR_INSTANCE $CCMGR_SERVICE $(date +%s%N)\" >> \"$W\"; exit 0' TERM; \
         while :; do sleep 0.05; done"
    );
    serde_json::to_string(&["sh", "-c", &script, "witness"]).unwrap()
}

fn mark_failing(def: &ClusterDef, node: &str) {
    std::fs::write(
        def.dir
            .path()
            .join(format!("fail-{}", def.instance_of(node))),
        "",
    )
    .unwrap();
}

/// A start that fails on a node moves the service to the next allowable node; when it fails
/// on every allowable node the service gives up, de-registered, with every node in
/// `failed_nodes` and a sentence in `last`; a `start` then fails (exit 1) the same way.
#[test]
fn a_failed_start_moves_on_and_gives_up_when_every_node_fails() {
    let etcd = Etcd::start("failstart");
    let def = ClusterDef::new("failstart");
    let cmd = failing_where_marked(&def);
    // min_uptime: a start counts only once the command ran that long, so that the failing
    // one (up for ccmgr as soon as spawned, gone an instant later) is a failed start.
    mark_failing(&def, "n0");
    def.write_cluster_service(
        "web",
        &format!(
            "command = {cmd}\nrestart = \"never\"\nmin_uptime = \"300ms\"\npreferred_nodes = [\"n0\", \"n1\", \"n2\"]\nauto_start = false\n"
        ),
    );
    def.write_cluster_service(
        "doomed",
        &format!("command = {cmd}\nrestart = \"never\"\nmin_uptime = \"300ms\"\nallowable_nodes = [\"n0\"]\n"),
    );
    def.write_cluster_service(
        "doomed2",
        &format!(
            "command = {cmd}\nrestart = \"never\"\nmin_uptime = \"300ms\"\nallowable_nodes = [\"n0\", \"n1\"]\nauto_start = false\n"
        ),
    );
    mark_failing(&def, "n1");
    let nodes = nodes(&def, &etcd, 3);
    let _logs = LogsOnFailure(&nodes);

    // web, started by hand once the three nodes are up: n0 and n1 (its first preferred
    // nodes) fail, n2 runs it; `start` returns once it is registered there.
    wait_for(LIMIT, "three members up", || {
        let st = nodes[0].cluster_json(&["status", "--json"]);
        let up = st["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["state"] == "up")
            .count();
        if up == 3 { Ok(()) } else { Err(st) }
    });
    let out = nodes[1].cluster(&["start", "web"]);
    assert!(out.status.success(), "start web: {}", text(&out));
    let web = service(&nodes[2], "web");
    assert_eq!(web["state"], "registered", "start returned before: {web:#}");
    assert_eq!(instance_nodes(&web), ["n2"], "{web:#}");
    // Three attempts: n0, n1, n2, in the preferred order (epochs 1, 2, 3).
    let n2 = web["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "n2")
        .cloned()
        .unwrap();
    assert_eq!(n2["epoch"], 3, "{web:#}");
    let starts: Vec<String> = events(&def, &etcd)
        .iter()
        .filter(|e| e["event"] == "service" && e["service"] == "web" && e["state"] == "starting")
        .filter_map(|e| e["node"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(starts, ["n0", "n1", "n2"], "web's starts");
    // Up for ccmgr as soon as spawned: the witness line follows.
    let on = wait_until(LIMIT, "web witnessed", || def.witness().running_on("web"));
    assert_eq!(on, "n2");
    assert_eq!(def.witness().runs("web").len(), 1);

    // doomed: its only allowable node fails: de-registered, failed_nodes [n0], a sentence.
    let doomed = wait_for(LIMIT, "doomed given up", || {
        let s = service(&nodes[0], "doomed");
        if s["state"] == "deregistered" && s["failed_nodes"] == serde_json::json!(["n0"]) {
            Ok(s)
        } else {
            Err(s)
        }
    });
    let last = doomed["last"].as_str().unwrap_or_default();
    assert!(last.contains("failed") && last.contains("n0"), "{doomed:#}");
    assert!(def.witness().runs("doomed").is_empty());

    // doomed2, started by hand: fails on n0 and n1, `start` exits 1 with the sentence.
    let out = nodes[2].cluster(&["start", "doomed2"]);
    assert_eq!(out.status.code(), Some(1), "start doomed2: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("doomed2") && err.contains("failed"),
        "{}",
        text(&out)
    );
    let s = service(&nodes[0], "doomed2");
    assert_eq!(s["state"], "deregistered", "{s:#}");
    assert_eq!(s["failed_nodes"], serde_json::json!(["n0", "n1"]), "{s:#}");
    for n in &nodes {
        assert!(!n.runs("doomed") && !n.runs("doomed2"), "{}", n.name);
    }
}

/// A bad cluster.d file: the agent exits 2, naming the file and line.
#[test]
fn a_bad_cluster_d_file_makes_the_agent_exit_2_naming_file_and_line() {
    let etcd = Etcd::start("badfile");
    let def = ClusterDef::new("badfile");
    let n0 = def.simple_node("n0", 0, &etcd.endpoints());
    n0.write_cluster_service(
        "bad",
        "command = [\"sleep\", \"100\"]\nplacement = \"some\"\n",
    );
    n0.start_ccmgr();
    n0.start_agent();
    let status = wait_until(LIMIT, "the agent exited", || n0.agent_exited());
    assert_eq!(status.code(), Some(2), "{}", n0.agent_log());
    let log = n0.agent_log();
    assert!(log.contains("bad.toml:2"), "{log}");
}

/// A node configuration without `[cluster]`: every verb exits 2 with a sentence.
#[test]
fn a_configuration_without_cluster_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ccmgr.toml");
    std::fs::write(&config, "instance = \"nocluster\"\n").unwrap();
    for args in [&["agent"][..], &["status", "--json"], &["leave"]] {
        let out = std::process::Command::new(support::CCMGR_CLUSTER)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("CCMGR_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("[cluster]") && err.contains("ccmgr.toml"),
            "{args:?}: {}",
            text(&out)
        );
    }
}

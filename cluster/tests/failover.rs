//! Failover with real processes: a real etcd, several nodes (each its own ccmgr instance and
//! `ccmgr-cluster` agent, heartbeat 250 ms, 4 missed beats: 1-second leases), real SIGKILLs
//! and a real network cut (the node's agent reaches etcd through a proxy the test blackholes).
//! Issue 13's acceptance: the backup takes over from a killed manager and no cluster service
//! is restarted needlessly; a killed node's services run elsewhere (after their recovery
//! command), never twice at once; a cut node stops its services before another node starts
//! them and takes part again once the network is back; a cut manager is replaced and, its
//! fencing token stale, writes nothing as manager when it comes back. Beyond it: a blip
//! shorter than the lease, the backup lost (alone, then with the manager), a frozen agent,
//! an assignment made to a frozen agent, and a quiet event stream.
//!
//! Every check polls an observable (cluster status, local status, the witness, the events in
//! etcd) with a deadline; nothing asserts a time (the observed failover times are printed).
//! The tests of this file run one at a time: each runs four nodes with 1-second leases, and
//! starving them of CPU (on a small machine that also builds) would fence nodes for real and
//! make "nothing restarted needlessly" untestable.

mod support;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use support::{ClusterDef, Etcd, Node, NodeSpec, ProxySet, now_ns, text, wait_for, wait_until};

/// How long any one step (a failover, a placement, a rejoin) may take before the test fails.
const LIMIT: Duration = Duration::from_secs(40);

static SERIAL: Mutex<()> = Mutex::new(());

/// One test of this file at a time (see the module's doc).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `ccmgr-cluster status --json` through `node`'s configuration; `None` when it failed (etcd
/// unreachable from there, say).
fn status(node: &Node) -> Option<Value> {
    let out = node.cluster(&["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn member<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["members"]
        .as_array()
        .and_then(|v| v.iter().find(|m| m["name"] == name))
        .unwrap_or(&Value::Null)
}

fn service<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["services"]
        .as_array()
        .and_then(|v| v.iter().find(|m| m["name"] == name))
        .unwrap_or(&Value::Null)
}

/// The node `svc` is registered on, by the cluster status.
fn registered_on(s: &Value, svc: &str) -> Option<String> {
    let rec = service(s, svc);
    (rec["state"] == "registered")
        .then(|| rec["node"].as_str().map(str::to_owned))
        .flatten()
}

/// The local pid of `svc` in `node`'s own ccmgr instance (`ccmgr status --json`).
fn local_pid(node: &Node, svc: &str) -> Option<i64> {
    node.local_service(svc)
        .filter(|s| s["state"] == "up")
        .and_then(|s| s["pid"].as_i64())
}

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// ---------------------------------------------------------------------------------------
// Events, read from etcd with their revisions (the order etcd applied them in).

#[derive(Clone, Debug)]
struct Event {
    /// The revision of the transaction that wrote it.
    rev: i64,
    v: Value,
}

impl Event {
    fn is(&self, event: &str) -> bool {
        self.v["event"] == event
    }
    fn by(&self) -> &str {
        self.v["by"].as_str().unwrap_or("")
    }
}

fn base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("not base64: {s}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Every event of the cluster, in the order etcd applied them.
fn events(etcd: &Etcd, def: &ClusterDef) -> Vec<Event> {
    let prefix = format!("/ccmgr/{}/events/", def.name);
    let out = etcd.etcdctl(&["get", "--prefix", &prefix, "-w", "json"]);
    assert!(out.status.success(), "etcdctl get events: {}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("etcdctl -w json prints JSON");
    let mut evs: Vec<Event> = doc["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| Event {
            rev: kv["create_revision"].as_i64().expect("a revision"),
            v: serde_json::from_slice(&base64(kv["value"].as_str().expect("a value")))
                .expect("an event is JSON"),
        })
        .collect();
    evs.sort_by_key(|e| e.rev);
    evs
}

/// Waits until an event matching `pred` is in etcd; returns the first one.
fn wait_event(etcd: &Etcd, def: &ClusterDef, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    wait_until(LIMIT, what, || events(etcd, def).into_iter().find(&pred))
}

/// The `service` events of `svc`, in order.
fn service_events(evs: &[Event], svc: &str) -> Vec<Event> {
    evs.iter()
        .filter(|e| e.is("service") && e.v["service"] == svc)
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Setting up

/// On a failed test, tells whether the test's etcd still runs and prints its log's tail.
struct EtcdOnPanic<'a>(&'a Etcd);

impl Drop for EtcdOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.0.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!(
                "----- etcd {} (pid {}, alive: {}), the end of its log:\n{}",
                self.0.endpoint(),
                self.0.pid(),
                support::alive(self.0.pid()),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// On a failed test (or with `FAILOVER_LOGS` set), prints the nodes' agent logs (their temp
/// dirs go with the test).
struct LogsOnPanic<'a>(Vec<&'a Node>);

impl Drop for LogsOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("FAILOVER_LOGS").is_some() {
            for n in &self.0 {
                eprintln!("----- agent log of {}\n{}", n.name, n.agent_log());
            }
        }
    }
}

/// Starts every node's ccmgr, then `first`'s agent alone until it is the manager, then the
/// other agents one by one, so that the roles are known: the manager `first`, the backup
/// the first eligible node of `others`.
fn start_cluster(first: &Node, observer: &Node, others: &[&Node]) {
    first.start_ccmgr();
    for n in others {
        n.start_ccmgr();
    }
    first.start_agent();
    wait_until(LIMIT, "the first node is the manager", || {
        status(observer).filter(|s| s["manager"] == first.name.as_str())
    });
    // One at a time, in order: the manager keeps the first eligible node that joined as its
    // backup, so the order of the joins decides it.
    for n in others {
        n.start_agent();
        wait_until(LIMIT, &format!("{} up", n.name), || {
            status(observer).filter(|s| member(s, &n.name)["state"] == "up")
        });
    }
}

/// Waits until the cluster status (through `observer`) names `backup` the backup.
fn wait_backup(observer: &Node, backup: &str) {
    wait_for(LIMIT, &format!("{backup} the backup"), || {
        match status(observer) {
            Some(s) if s["backup"] == backup => Ok(()),
            other => Err(other),
        }
    });
}

/// Waits until each `(service, node)` is registered on that node, and up in its ccmgr and by
/// the witness; returns the status then.
fn wait_placed(def: &ClusterDef, observer: &Node, placed: &[(&str, &Node)]) -> Value {
    wait_until(
        LIMIT,
        "every service registered on its preferred node",
        || {
            let s = status(observer)?;
            placed
                .iter()
                .all(|(svc, n)| {
                    registered_on(&s, svc).as_deref() == Some(n.name.as_str())
                        && n.runs(svc)
                        && def.witness().running_on(svc).as_deref() == Some(n.name.as_str())
                })
                .then_some(s)
        },
    )
}

/// A service's cluster keys: preferred `pref`, placed once `count` allowable nodes are up
/// or its preferred node is.
fn preferring(pref: &str, count: u32, more: &str) -> String {
    format!(
        "preferred_nodes = [{}]\nmaturity_count = {count}\n{more}",
        toml_str(pref)
    )
}

fn node_of<'a>(nodes: &[&'a Node], name: &str) -> &'a Node {
    nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

// ---------------------------------------------------------------------------------------
// 1. kill -9 of the manager's agent

#[test]
fn a_killed_managers_agent_hands_over_to_the_backup_and_nothing_else_restarts() {
    let _serial = serial();
    let etcd = Etcd::start("fo_mgr_agent");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_mgr_agent");
    let placement = [("a", "n0"), ("b", "n1"), ("c", "n2"), ("d", "nx")];
    for (svc, pref) in placement {
        def.write_witnessed_service(svc, &preferring(pref, 4, ""));
    }
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    // The lowest number, but never manager nor backup.
    let mut spec = NodeSpec::new("nx", 3, &ep);
    spec.may_manage = false;
    let nx = def.node(spec);
    let nodes = [&n0, &n1, &n2, &nx];
    let _logs = LogsOnPanic(nodes.to_vec());
    let placement = [("a", &n0), ("b", &n1), ("c", &n2), ("d", &nx)];

    start_cluster(&n0, &n1, &[&n1, &n2, &nx]);
    wait_backup(&n1, "n1");
    wait_placed(&def, &n1, &placement);
    let before: Vec<(&str, &Node, i64)> = placement[1..]
        .iter()
        .map(|(svc, n)| (*svc, *n, local_pid(n, svc).expect("up with a pid")))
        .collect();

    let killed_at = now_ns();
    n0.kill_agent();

    // Its fence guard stops the node's cluster services at once, with no word from etcd.
    wait_until(LIMIT, "a stopped on n0 by its fence guard", || {
        let runs = def.witness().runs("a");
        (!n0.runs("a") && runs.len() == 1 && runs[0].end_ns.is_some()).then_some(())
    });
    let (s, on) = wait_until(
        LIMIT,
        "n1 manager, n2 backup, a registered on another node",
        || {
            let s = status(&n1)?;
            let on = registered_on(&s, "a").filter(|n| n != "n0")?;
            (s["manager"] == "n1" && s["backup"] == "n2" && member(&s, "n0")["state"] == "down")
                .then_some((s, on))
        },
    );
    let target = node_of(&nodes, &on);
    wait_until(LIMIT, "a up on its new node", || {
        (target.runs("a") && def.witness().running_on("a").as_deref() == Some(on.as_str()))
            .then_some(())
    });
    let restarted = def.witness().runs("a")[1].start_ns;
    eprintln!(
        "observed: a ran again on {on} {} ms after the kill of the manager's agent",
        (restarted - killed_at) / 1_000_000
    );

    // Roles: the backup took over (as the backup), a new backup was chosen among the
    // remaining eligible nodes, never the node that may not manage.
    let roles: Vec<&str> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "manager").count(),
        1,
        "{s:#}"
    );
    assert_eq!(member(&s, "nx")["role"], "client", "{s:#}");
    let evs = events(&etcd, &def);
    let elected = evs
        .iter()
        .find(|e| e.is("manager-elected") && e.v["member"] == "n1")
        .unwrap_or_else(|| panic!("no manager-elected of n1: {evs:#?}"));
    assert_eq!(elected.v["was_backup"], true, "{:?}", elected.v);
    assert!(
        evs.iter()
            .any(|e| e.is("backup-chosen") && e.v["member"] == "n2" && e.rev > elected.rev),
        "no backup-chosen n2 after n1's election: {evs:#?}"
    );
    for e in &evs {
        if e.is("manager-elected") || e.is("backup-chosen") {
            assert_ne!(
                e.v["member"], "nx",
                "a node with may_manage = false: {:?}",
                e.v
            );
        }
    }

    // No cluster service of another node was restarted: same local pid, one run each.
    for (svc, n, pid) in before {
        assert_eq!(
            local_pid(n, svc),
            Some(pid),
            "{svc} on {} was restarted",
            n.name
        );
        let runs = def.witness().runs(svc);
        assert_eq!(runs.len(), 1, "{svc} ran more than once: {runs:#?}");
        assert!(runs[0].end_ns.is_none(), "{svc} stopped: {runs:#?}");
        assert_eq!(registered_on(&s, svc).as_deref(), Some(n.name.as_str()));
    }
    let w = def.witness();
    for (svc, _) in placement {
        w.assert_never_twice(svc);
    }
}

// ---------------------------------------------------------------------------------------
// 2. kill -9 of a whole node

#[test]
fn a_killed_nodes_service_is_recovered_then_runs_on_another_allowable_node() {
    let _serial = serial();
    let etcd = Etcd::start("fo_node");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_node");
    let recovered = def.dir.path().join("recovered");
    let recovery = format!(
        "echo \"$CCMGR_CLUSTER_NODE $CCMGR_CLUSTER_FAILED_NODE $(date +%s%N)\" >> '{}'",
        recovered.display()
    );
    // nx is allowed nothing of r and holds nothing else: the least loaded node, it would be
    // the first choice if the disallowed list were not honoured.
    def.write_witnessed_service("f0", &preferring("n0", 4, ""));
    def.write_witnessed_service("f1", &preferring("n1", 4, ""));
    def.write_witnessed_service(
        "r",
        &preferring(
            "n2",
            3,
            &format!(
                "disallowable_nodes = [\"nx\"]\nrecovery_command = {}\n",
                toml_str(&recovery)
            ),
        ),
    );
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let nx = def.simple_node("nx", 3, &ep);
    let nodes = [&n0, &n1, &n2, &nx];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n1, &[&n1, &n2, &nx]);
    wait_placed(&def, &n0, &[("f0", &n0), ("f1", &n1), ("r", &n2)]);
    let rev_before = events(&etcd, &def).last().map_or(0, |e| e.rev);

    let killed_at = now_ns();
    n2.kill_node();

    let on = wait_until(LIMIT, "r registered on a surviving node", || {
        let s = status(&n0)?;
        registered_on(&s, "r").filter(|n| n != "n2")
    });
    assert!(on == "n0" || on == "n1", "r placed on {on}, not allowable");
    let target = node_of(&nodes, &on);
    wait_until(LIMIT, "r up on its new node", || {
        (target.runs("r") && def.witness().running_on("r").as_deref() == Some(on.as_str()))
            .then_some(())
    });
    let runs = def.witness().assert_never_twice("r");
    assert_eq!(
        runs.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(),
        ["n2", on.as_str()],
        "{runs:#?}"
    );
    eprintln!(
        "observed: r ran again on {on} {} ms after the kill of node n2",
        (runs[1].start_ns - killed_at) / 1_000_000
    );

    // The recovery command ran once, on a surviving allowable node, for n2, before the start.
    let lines = std::fs::read_to_string(&recovered).expect("the recovery command ran");
    let lines: Vec<Vec<&str>> = lines.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let (runner, failed, at): (&str, &str, u128) =
        (lines[0][0], lines[0][1], lines[0][2].parse().unwrap());
    assert!(runner == "n0" || runner == "n1", "recovery ran on {runner}");
    assert_eq!(failed, "n2");
    assert!(
        at < runs[1].start_ns,
        "the recovery ran after the new start"
    );
    let evs: Vec<Event> = service_events(&events(&etcd, &def), "r")
        .into_iter()
        .filter(|e| e.rev > rev_before)
        .collect();
    let recovering = evs
        .iter()
        .position(|e| e.v["state"] == "recovering")
        .unwrap_or_else(|| panic!("no recovering state: {evs:#?}"));
    let starting = evs
        .iter()
        .position(|e| e.v["state"] == "starting")
        .unwrap_or_else(|| panic!("no start: {evs:#?}"));
    assert!(recovering < starting, "started before recovered: {evs:#?}");
    assert_eq!(evs[recovering].v["node"], runner, "{evs:#?}");

    // Nothing ever ran on the disallowed node; the others were not restarted.
    let w = def.witness();
    assert!(w.runs("r").iter().all(|r| r.node != "nx"));
    for svc in ["f0", "f1"] {
        assert_eq!(w.assert_never_twice(svc).len(), 1, "{svc} was restarted");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Network loss of one node

#[test]
fn a_cut_node_stops_its_services_before_they_start_elsewhere_and_comes_back() {
    let _serial = serial();
    let etcd = Etcd::start("fo_cut");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_cut");
    def.write_witnessed_service("p", &preferring("n2", 3, "transfer_cost = \"free\"\n"));
    def.write_witnessed_service("e", &preferring("n2", 3, ""));
    def.write_witnessed_service("q", &preferring("n1", 3, ""));
    let ep = etcd.endpoints();
    let net2 = ProxySet::to_etcd(&etcd);
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &net2.endpoints());
    let nodes = [&n0, &n1, &n2];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n0, &[&n1, &n2]);
    wait_placed(&def, &n0, &[("p", &n2), ("e", &n2), ("q", &n1)]);
    let q_pid = local_pid(&n1, "q").expect("q up");

    let cut_at = now_ns();
    net2.cut();
    let placed = wait_until(LIMIT, "p and e registered on other nodes", || {
        let s = status(&n0)?;
        let p = registered_on(&s, "p").filter(|n| n != "n2")?;
        let e = registered_on(&s, "e").filter(|n| n != "n2")?;
        (member(&s, "n2")["state"] == "down").then_some([p, e])
    });
    for (svc, on) in ["p", "e"].into_iter().zip(&placed) {
        let target = node_of(&nodes, on);
        wait_until(LIMIT, &format!("{svc} up on {on}"), || {
            (target.runs(svc) && def.witness().running_on(svc).as_deref() == Some(on.as_str()))
                .then_some(())
        });
        // n2 itself stopped it (a `stop` in the witness, not a kill), before the new start.
        let runs = def.witness().assert_never_twice(svc);
        assert_eq!(runs.len(), 2, "{runs:#?}");
        let stopped = runs[0].end_ns.expect("n2 stopped it");
        assert_eq!(runs[0].node, "n2");
        assert!(
            stopped < runs[1].start_ns,
            "{svc} started on {on} before n2 stopped it: {runs:#?}"
        );
        eprintln!(
            "observed: {svc} stopped on the cut node {} ms after the cut, started on {on} {} ms after the cut",
            (stopped - cut_at) / 1_000_000,
            (runs[1].start_ns - cut_at) / 1_000_000
        );
    }
    let rev_cut = events(&etcd, &def).last().map_or(0, |e| e.rev);

    // The network is back: n2 joins again, says it was fenced, and p (free to transfer,
    // preferring n2) fails back to it.
    net2.restore();
    wait_until(LIMIT, "n2 up again", || {
        status(&n0).filter(|s| member(s, "n2")["state"] == "up")
    });
    wait_event(&etcd, &def, "n2's member-fenced", |e| {
        e.is("member-fenced") && e.v["member"] == "n2" && e.by() == "n2" && e.rev > rev_cut
    });
    wait_until(LIMIT, "p back on n2", || {
        let s = status(&n0)?;
        (registered_on(&s, "p").as_deref() == Some("n2")
            && n2.runs("p")
            && def.witness().running_on("p").as_deref() == Some("n2"))
        .then_some(())
    });
    // e is expensive to move: it stays, until moved.
    let s = status(&n0).expect("status");
    assert_eq!(registered_on(&s, "e").as_deref(), Some(placed[1].as_str()));
    let out = n0.cluster(&["move", "e", "n2"]);
    assert!(out.status.success(), "move e n2: {}", text(&out));
    wait_until(LIMIT, "e up on n2", || {
        (n2.runs("e") && def.witness().running_on("e").as_deref() == Some("n2")).then_some(())
    });

    let w = def.witness();
    for svc in ["p", "e"] {
        assert_eq!(
            w.assert_never_twice(svc).len(),
            3,
            "{svc}: {:#?}",
            w.runs(svc)
        );
    }
    assert_eq!(w.assert_never_twice("q").len(), 1, "q was restarted");
    assert_eq!(local_pid(&n1, "q"), Some(q_pid), "q was restarted");
}

// ---------------------------------------------------------------------------------------
// 4. A manager whose network is cut

#[test]
fn a_cut_manager_is_replaced_and_writes_nothing_as_manager_when_it_comes_back() {
    let _serial = serial();
    let etcd = Etcd::start("fo_cut_mgr");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_cut_mgr");
    def.write_witnessed_service("m", &preferring("n0", 3, ""));
    def.write_witnessed_service("k", &preferring("n1", 3, ""));
    let ep = etcd.endpoints();
    let net0 = ProxySet::to_etcd(&etcd);
    let n0 = def.simple_node("n0", 0, &net0.endpoints());
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let nodes = [&n0, &n1, &n2];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n1, &[&n1, &n2]);
    wait_backup(&n1, "n1");
    wait_placed(&def, &n1, &[("m", &n0), ("k", &n1)]);
    let k_pid = local_pid(&n1, "k").expect("k up");

    let cut_at = now_ns();
    net0.cut();
    let elected = wait_event(&etcd, &def, "n1 elected manager", |e| {
        e.is("manager-elected") && e.v["member"] == "n1"
    });
    assert_eq!(elected.v["was_backup"], true, "{:?}", elected.v);
    let on = wait_until(LIMIT, "m registered on another node", || {
        let s = status(&n1)?;
        registered_on(&s, "m").filter(|n| n != "n0")
    });
    let target = node_of(&nodes, &on);
    wait_until(LIMIT, "m up on its new node", || {
        (target.runs("m") && def.witness().running_on("m").as_deref() == Some(on.as_str()))
            .then_some(())
    });
    let runs = def.witness().assert_never_twice("m");
    eprintln!(
        "observed: m ran again on {on} {} ms after the manager's network was cut",
        (runs[1].start_ns - cut_at) / 1_000_000
    );

    // The network is back: n0 joins again as a node, not as the manager.
    net0.restore();
    let rejoined = wait_event(&etcd, &def, "n0's member-fenced", |e| {
        e.is("member-fenced") && e.v["member"] == "n0" && e.rev > elected.rev
    });
    wait_until(LIMIT, "n0 up again", || {
        status(&n1).filter(|s| member(s, "n0")["state"] == "up")
    });
    assert_eq!(local_pid(&n1, "k"), Some(k_pid), "k was restarted");
    // Work for the managers after the return: k moves to n2, m back to n0.
    for (svc, to) in [("k", &n2), ("m", &n0)] {
        let out = n1.cluster(&["move", svc, &to.name]);
        assert!(
            out.status.success(),
            "move {svc} {}: {}",
            to.name,
            text(&out)
        );
        wait_until(LIMIT, &format!("{svc} up on {}", to.name), || {
            (to.runs(svc) && def.witness().running_on(svc).as_deref() == Some(to.name.as_str()))
                .then_some(())
        });
    }

    let s = status(&n1).expect("status");
    assert_eq!(s["manager"], "n1", "{s:#}");
    let managers: Vec<&Value> = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "manager")
        .collect();
    assert_eq!(managers.len(), 1, "{s:#}");
    assert_eq!(member(&s, "n0")["state"], "up", "{s:#}");

    // Nothing by n0 between its loss and its return; after, only its own agent's reports
    // (on its own instances), never a manager's write.
    let evs = events(&etcd, &def);
    let silent: Vec<&Event> = evs
        .iter()
        .filter(|e| e.by() == "n0" && e.rev > elected.rev && e.rev < rejoined.rev)
        .filter(|e| !e.is("member-joined"))
        .collect();
    assert!(silent.is_empty(), "n0 wrote while deposed: {silent:#?}");
    for e in evs.iter().filter(|e| e.by() == "n0" && e.rev > elected.rev) {
        let why = e.v["why"].as_str().unwrap_or("");
        let own_report = e.is("service")
            && ["registered on n0", "stopped on n0", "failed on n0"]
                .iter()
                .any(|p| why.starts_with(p));
        assert!(
            own_report || e.is("member-joined") || e.is("member-fenced"),
            "the deposed manager n0 wrote {:?} after n1 was elected",
            e.v
        );
    }
    // The moves were decided by n1.
    for svc in ["k", "m"] {
        let decided: Vec<&Event> = evs
            .iter()
            .filter(|e| {
                e.is("service")
                    && e.v["service"] == svc
                    && e.rev > rejoined.rev
                    && e.v["why"]
                        .as_str()
                        .is_some_and(|w| w.starts_with("moving to"))
            })
            .collect();
        assert!(!decided.is_empty(), "no move of {svc}: {evs:#?}");
        assert!(decided.iter().all(|e| e.by() == "n1"), "{decided:#?}");
    }
    let w = def.witness();
    assert_eq!(w.assert_never_twice("m").len(), 3, "{:#?}", w.runs("m"));
    assert_eq!(w.assert_never_twice("k").len(), 2, "{:#?}", w.runs("k"));
}

// ---------------------------------------------------------------------------------------
// 5. A network loss shorter than the lease (regression: the agent followed the cluster no
//    more after it)

#[test]
fn a_node_cut_for_less_than_its_lease_keeps_its_services_and_follows_the_cluster_after() {
    let _serial = serial();
    let etcd = Etcd::start("fo_blip");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_blip");
    def.write_witnessed_service("s", &preferring("n0", 2, ""));
    def.write_witnessed_service("t", &preferring("n1", 2, ""));
    let ep = etcd.endpoints();
    let net1 = ProxySet::to_etcd(&etcd);
    let n0 = def.simple_node("n0", 0, &ep);
    // A 10-second lease: a cut of a few seconds is a blip to it, not a loss.
    let mut spec = NodeSpec::new("n1", 1, &net1.endpoints());
    spec.missed_beats = 40;
    let n1 = def.node(spec);
    let nodes = [&n0, &n1];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n0, &[&n1]);
    wait_placed(&def, &n0, &[("s", &n0), ("t", &n1)]);
    let t_pid = local_pid(&n1, "t").expect("t up");
    let rev_before = events(&etcd, &def).last().map_or(0, |e| e.rev);

    // Every connection of n1 to etcd is reset, and every new one, for 2 s: its watch ends
    // and its first attempts to read the cluster again fail. (The blip's length is the
    // scenario, well within the lease, not a wait for an outcome.)
    net1.reset();
    std::thread::sleep(Duration::from_secs(2));
    net1.restore();

    // n1 follows the cluster again: an assignment made now reaches it. (Before the fix, an
    // agent whose watch had ended and whose one attempt to resync had failed followed the
    // cluster no more: s stayed `starting` on n1 for good.)
    let out = n0.cluster(&["move", "s", "n1"]);
    assert!(out.status.success(), "move s n1: {}", text(&out));
    wait_until(LIMIT, "s up on n1", || {
        (n1.runs("s") && def.witness().running_on("s").as_deref() == Some("n1")).then_some(())
    });

    // Then a silent blip (a blackhole, nothing reset) of 2 s: the connections resume.
    net1.cut();
    std::thread::sleep(Duration::from_secs(2));
    net1.restore();
    let out = n0.cluster(&["move", "s", "n0"]);
    assert!(out.status.success(), "move s n0: {}", text(&out));
    wait_until(LIMIT, "s up on n0", || {
        (n0.runs("s") && def.witness().running_on("s").as_deref() == Some("n0")).then_some(())
    });

    // It was never fenced: its own service ran on, the lease never ended.
    assert_eq!(local_pid(&n1, "t"), Some(t_pid), "t was restarted");
    assert_eq!(def.witness().assert_never_twice("t").len(), 1);
    let evs = events(&etcd, &def);
    let lost: Vec<&Event> = evs
        .iter()
        .filter(|e| e.rev > rev_before && (e.is("member-fenced") || e.is("member-lost")))
        .collect();
    assert!(lost.is_empty(), "a blip within the lease: {lost:#?}");
    assert_eq!(def.witness().assert_never_twice("s").len(), 3);
}

// ---------------------------------------------------------------------------------------
// 6. A quiet cluster (regression: etcd closed every quiet connection of the cluster layer)

/// `ccmgr-cluster events --json` in the background, its output in a file; killed on drop.
struct Follower {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Follower {
    fn start(node: &Node) -> Follower {
        let out = node.path().join("events.out");
        let child = std::process::Command::new(support::CCMGR_CLUSTER)
            .arg("--config")
            .arg(node.config_path())
            .args(["events", "--json"])
            .env_remove("CCMGR_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(node.path().join("events.err")).unwrap())
            .spawn()
            .expect("ccmgr-cluster runs");
        Follower { child, out }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_event_stream_outlives_a_quiet_cluster() {
    let _serial = serial();
    let etcd = Etcd::start("fo_quiet");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_quiet");
    def.write_witnessed_service("s", "");
    let n0 = def.simple_node("n0", 0, &etcd.endpoints());
    let _logs = LogsOnPanic(vec![&n0]);
    n0.start_ccmgr();
    n0.start_agent();
    wait_placed(&def, &n0, &[("s", &n0)]);
    let mut follower = Follower::start(&n0);

    // Nothing happens for 3 s (the scenario, not a wait for an outcome): the stream is quiet.
    // (Before the fix, the client's HTTP/2 pings at the heartbeat broke etcd's keep-alive
    // policy, at least 5 s between pings on a quiet connection: etcd closed the connection
    // after three pings, and `events` ended with an h2 protocol error after a second.)
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        matches!(follower.child.try_wait(), Ok(None)),
        "events ended on a quiet cluster: {}",
        std::fs::read_to_string(n0.path().join("events.err")).unwrap_or_default()
    );
    let out = n0.cluster(&["stop", "s"]);
    assert!(out.status.success(), "stop s: {}", text(&out));
    wait_until(LIMIT, "the stop in the event stream", || {
        follower.lines().into_iter().find(|e| {
            e["event"] == "service" && e["service"] == "s" && e["state"] == "deregistered"
        })
    });
}

// ---------------------------------------------------------------------------------------
// 7. The backup lost, then the manager and the new backup at once

#[test]
fn a_lost_backup_is_replaced_and_a_lost_manager_and_backup_leave_the_role_to_another() {
    let _serial = serial();
    let etcd = Etcd::start("fo_backups");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_backups");
    def.write_witnessed_service("a", &preferring("n0", 5, ""));
    def.write_witnessed_service("x", &preferring("nx", 5, ""));
    def.write_witnessed_service("y", &preferring("n3", 5, ""));
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let n3 = def.simple_node("n3", 3, &ep);
    let mut spec = NodeSpec::new("nx", 4, &ep);
    spec.may_manage = false;
    let nx = def.node(spec);
    let nodes = [&n0, &n1, &n2, &n3, &nx];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &nx, &[&n1, &n2, &n3, &nx]);
    wait_backup(&nx, "n1");
    wait_placed(&def, &nx, &[("a", &n0), ("x", &nx), ("y", &n3)]);
    let x_pid = local_pid(&nx, "x").expect("x up");
    let y_pid = local_pid(&n3, "y").expect("y up");

    // The backup's agent dies: the manager chooses the next eligible node.
    n1.kill_agent();
    wait_until(
        LIMIT,
        "n1 down, n2 the backup, n0 still the manager",
        || {
            status(&nx).filter(|s| {
                member(s, "n1")["state"] == "down" && s["backup"] == "n2" && s["manager"] == "n0"
            })
        },
    );

    // The manager and its backup die at once: the backup key names a node that is gone, so
    // another eligible node claims the role (n3), never nx.
    let rev_before = events(&etcd, &def).last().map_or(0, |e| e.rev);
    n0.kill_agent();
    n2.kill_agent();
    let s = wait_until(LIMIT, "n3 the manager, no backup left, a elsewhere", || {
        status(&nx).filter(|s| {
            s["manager"] == "n3"
                && s["backup"].is_null()
                && registered_on(s, "a").is_some_and(|n| n == "n3" || n == "nx")
        })
    });
    let evs = events(&etcd, &def);
    let elected: Vec<&Event> = evs
        .iter()
        .filter(|e| e.is("manager-elected") && e.rev > rev_before)
        .collect();
    assert_eq!(elected.len(), 1, "{elected:#?}");
    assert_eq!(elected[0].v["member"], "n3");
    assert_eq!(elected[0].v["was_backup"], false);
    for e in &evs {
        if e.is("manager-elected") || e.is("backup-chosen") {
            assert_ne!(
                e.v["member"], "nx",
                "a node with may_manage = false: {:?}",
                e.v
            );
        }
    }
    assert_eq!(member(&s, "nx")["role"], "client", "{s:#}");
    let on = registered_on(&s, "a").unwrap();
    let target = node_of(&nodes, &on);
    wait_until(LIMIT, "a up on its new node", || {
        (target.runs("a") && def.witness().running_on("a").as_deref() == Some(on.as_str()))
            .then_some(())
    });
    assert_eq!(local_pid(&nx, "x"), Some(x_pid), "x was restarted");
    assert_eq!(local_pid(&n3, "y"), Some(y_pid), "y was restarted");
    let w = def.witness();
    assert_eq!(w.assert_never_twice("x").len(), 1);
    assert_eq!(w.assert_never_twice("y").len(), 1);
    assert_eq!(w.assert_never_twice("a").len(), 2);
}

// ---------------------------------------------------------------------------------------
// 8. A frozen agent

#[test]
fn a_frozen_agents_guard_stops_its_services_before_they_move_and_the_node_comes_back() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let _serial = serial();
    let etcd = Etcd::start("fo_frozen");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_frozen");
    def.write_witnessed_service("z", &preferring("n2", 3, ""));
    def.write_witnessed_service("k", &preferring("n1", 3, ""));
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let nodes = [&n0, &n1, &n2];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n0, &[&n1, &n2]);
    wait_placed(&def, &n0, &[("z", &n2), ("k", &n1)]);
    let k_pid = local_pid(&n1, "k").expect("k up");

    // SIGSTOP: the agent renews nothing and does nothing; its guard, a process of its own,
    // stops the node's services when the lease's validity runs out.
    let agent = Pid::from_raw(n2.agent_pid().expect("n2's agent"));
    kill(agent, Signal::SIGSTOP).unwrap();
    let on = wait_until(LIMIT, "z registered elsewhere", || {
        let s = status(&n0)?;
        registered_on(&s, "z").filter(|n| n != "n2")
    });
    let target = node_of(&nodes, &on);
    wait_until(LIMIT, &format!("z up on {on}"), || {
        (target.runs("z") && def.witness().running_on("z").as_deref() == Some(on.as_str()))
            .then_some(())
    });
    let runs = def.witness().assert_never_twice("z");
    assert!(
        runs[0].end_ns.is_some_and(|end| end < runs[1].start_ns),
        "{runs:#?}"
    );
    let rev_frozen = events(&etcd, &def).last().map_or(0, |e| e.rev);

    // SIGCONT: the agent finds its lease gone, joins again, and starts nothing of its old
    // life.
    kill(agent, Signal::SIGCONT).unwrap();
    wait_event(&etcd, &def, "n2's member-fenced", |e| {
        e.is("member-fenced") && e.v["member"] == "n2" && e.rev > rev_frozen
    });
    wait_until(LIMIT, "n2 up again", || {
        status(&n0).filter(|s| member(s, "n2")["state"] == "up")
    });
    // Work after the return reaches it: z moves back.
    let out = n0.cluster(&["move", "z", "n2"]);
    assert!(out.status.success(), "move z n2: {}", text(&out));
    wait_until(LIMIT, "z up on n2", || {
        (n2.runs("z") && def.witness().running_on("z").as_deref() == Some("n2")).then_some(())
    });
    let w = def.witness();
    assert_eq!(w.assert_never_twice("z").len(), 3, "{:#?}", w.runs("z"));
    assert_eq!(w.assert_never_twice("k").len(), 1, "k was restarted");
    assert_eq!(local_pid(&n1, "k"), Some(k_pid), "k was restarted");
}

// ---------------------------------------------------------------------------------------
// 9. An agent frozen with an assignment it has not acted on

#[test]
fn an_agent_woken_after_its_lease_starts_nothing_it_was_assigned_before() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let _serial = serial();
    let etcd = Etcd::start("fo_wake");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_wake");
    def.write_witnessed_service("z", &preferring("n1", 3, ""));
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let nodes = [&n0, &n1, &n2];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n0, &[&n1, &n2]);
    wait_placed(&def, &n0, &[("z", &n1)]);
    for round in 0..3 {
        let from = def.witness().running_on("z").expect("z runs");
        let rev = events(&etcd, &def).last().map_or(0, |e| e.rev);
        // n2's agent freezes; z is moved to it at once: the assignment reaches a frozen
        // agent, whose lease ends before it wakes; z is placed elsewhere meanwhile.
        let agent = Pid::from_raw(n2.agent_pid().expect("n2's agent"));
        kill(agent, Signal::SIGSTOP).unwrap();
        let out = n0.cluster(&["move", "z", "n2", "--no-wait"]);
        assert!(out.status.success(), "move z n2: {}", text(&out));
        wait_until(LIMIT, "z assigned to n2, then elsewhere", || {
            let evs = service_events(&events(&etcd, &def), "z");
            let assigned = evs
                .iter()
                .find(|e| e.rev > rev && e.v["state"] == "starting" && e.v["node"] == "n2")?;
            evs.iter()
                .find(|e| {
                    e.rev > assigned.rev && e.v["state"] == "registered" && e.v["node"] != "n2"
                })
                .cloned()
        });
        let on = wait_until(LIMIT, "z up again", || def.witness().running_on("z"));
        eprintln!("round {round}: z, on {from}, was assigned to the frozen n2, then to {on}");
        kill(agent, Signal::SIGCONT).unwrap();
        wait_event(&etcd, &def, "n2's member-fenced", |e| {
            e.is("member-fenced") && e.v["member"] == "n2" && e.rev > rev
        });
        wait_until(LIMIT, "n2 up again", || {
            status(&n0).filter(|s| member(s, "n2")["state"] == "up")
        });
        // Woken, it started nothing of what was assigned to its expired lease.
        let runs = def.witness().assert_never_twice("z");
        assert!(
            runs.iter().all(|r| r.node != "n2"),
            "z ran on n2: {runs:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 10. kill -9 of the manager's whole node

#[test]
fn a_killed_manager_node_is_recovered_by_the_new_manager() {
    let _serial = serial();
    let etcd = Etcd::start("fo_mgr_node");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_mgr_node");
    let recovered = def.dir.path().join("recovered");
    let recovery = format!(
        "echo \"$CCMGR_CLUSTER_NODE $CCMGR_CLUSTER_FAILED_NODE $(date +%s%N)\" >> '{}'",
        recovered.display()
    );
    def.write_witnessed_service(
        "r",
        &preferring(
            "n0",
            3,
            &format!("recovery_command = {}\n", toml_str(&recovery)),
        ),
    );
    def.write_witnessed_service("k", &preferring("n2", 3, ""));
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let nodes = [&n0, &n1, &n2];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n1, &[&n1, &n2]);
    wait_backup(&n1, "n1");
    wait_placed(&def, &n1, &[("r", &n0), ("k", &n2)]);
    let k_pid = local_pid(&n2, "k").expect("k up");
    let rev_before = events(&etcd, &def).last().map_or(0, |e| e.rev);

    n0.kill_node();
    let on = wait_until(LIMIT, "n1 the manager, r registered on a survivor", || {
        let s = status(&n1)?;
        (s["manager"] == "n1")
            .then(|| registered_on(&s, "r").filter(|n| n != "n0"))
            .flatten()
    });
    let target = node_of(&nodes, &on);
    wait_until(LIMIT, "r up on its new node", || {
        (target.runs("r") && def.witness().running_on("r").as_deref() == Some(on.as_str()))
            .then_some(())
    });
    let runs = def.witness().assert_never_twice("r");
    let lines = std::fs::read_to_string(&recovered).expect("the recovery command ran");
    let fields: Vec<&str> = lines.trim().split(' ').collect();
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(
        fields[0] == "n1" || fields[0] == "n2",
        "recovery ran on {}",
        fields[0]
    );
    assert_eq!(fields[1], "n0");
    assert!(fields[2].parse::<u128>().unwrap() < runs[1].start_ns);
    let evs: Vec<Event> = events(&etcd, &def)
        .into_iter()
        .filter(|e| e.rev > rev_before)
        .collect();
    let elected = evs
        .iter()
        .find(|e| e.is("manager-elected"))
        .unwrap_or_else(|| panic!("no election: {evs:#?}"));
    assert_eq!(elected.v["member"], "n1");
    assert_eq!(elected.v["was_backup"], true);
    let recovering = evs
        .iter()
        .find(|e| e.is("service") && e.v["service"] == "r" && e.v["state"] == "recovering")
        .unwrap_or_else(|| panic!("no recovering: {evs:#?}"));
    assert_eq!(
        recovering.by(),
        "n1",
        "the new manager decides the recovery"
    );
    assert!(recovering.rev > elected.rev);
    assert_eq!(local_pid(&n2, "k"), Some(k_pid), "k was restarted");
    assert_eq!(def.witness().assert_never_twice("k").len(), 1);
}

// ---------------------------------------------------------------------------------------
// 11. Recovery commands run once (regression: the watch's late echo of the manager's own
//     write made its agent run a recovery again)

#[test]
fn each_recovery_command_runs_once_when_the_new_manager_runs_them() {
    let _serial = serial();
    let etcd = Etcd::start("fo_once");
    let _etcd_log = EtcdOnPanic(&etcd);
    let def = ClusterDef::new("fo_once");
    let recovered = def.dir.path().join("recovered");
    let services: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    for svc in &services {
        let recovery = format!(
            "echo \"$CCMGR_CLUSTER_SERVICE $CCMGR_CLUSTER_NODE $CCMGR_CLUSTER_FAILED_NODE\" >> '{}'",
            recovered.display()
        );
        // Only n0 and n1 may run them: n1, the backup, becomes the manager and runs every
        // recovery itself, right after its own write assigned it.
        def.write_witnessed_service(
            svc,
            &preferring(
                "n0",
                3,
                &format!(
                    "allowable_nodes = [\"n0\", \"n1\"]\nrecovery_command = {}\n",
                    toml_str(&recovery)
                ),
            ),
        );
    }
    let ep = etcd.endpoints();
    let n0 = def.simple_node("n0", 0, &ep);
    let n1 = def.simple_node("n1", 1, &ep);
    let n2 = def.simple_node("n2", 2, &ep);
    let nodes = [&n0, &n1, &n2];
    let _logs = LogsOnPanic(nodes.to_vec());
    start_cluster(&n0, &n1, &[&n1, &n2]);
    wait_backup(&n1, "n1");
    let placed: Vec<(&str, &Node)> = services.iter().map(|s| (s.as_str(), &n0)).collect();
    wait_placed(&def, &n1, &placed);

    n0.kill_node();
    wait_until(LIMIT, "every service up on n1", || {
        let s = status(&n1)?;
        services
            .iter()
            .all(|svc| registered_on(&s, svc).as_deref() == Some("n1") && n1.runs(svc))
            .then_some(())
    });
    let lines = std::fs::read_to_string(&recovered).expect("the recovery commands ran");
    for svc in &services {
        let runs: Vec<&str> = lines
            .lines()
            .filter(|l| l.split(' ').next() == Some(svc.as_str()))
            .collect();
        assert_eq!(runs, [format!("{svc} n1 n0")], "all: {lines}");
        def.witness().assert_never_twice(svc);
    }
}

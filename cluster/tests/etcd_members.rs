//! The cluster layer over a 3-member etcd cluster with one member killed: the nodes are
//! given all three endpoints; after the etcd leader is killed (kill -9) the cluster layer
//! keeps working: `status` answers, a killed node's service moves elsewhere, `move` works,
//! and the live agents stay members (no fence, no member-lost for them, no service of theirs
//! restarted).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{ClusterDef, EtcdCluster, Node, NodeSpec, etcdctl_at, text, wait_for, wait_until};

/// How long placements and moves may take (etcd's election included).
const LIMIT: Duration = Duration::from_secs(60);

/// Every event of the cluster so far, read from the live members, in key order.
fn events(def: &ClusterDef, etcd: &EtcdCluster) -> Vec<Value> {
    let prefix = format!("/ccmgr/{}/events/", def.name);
    let out = etcdctl_at(
        &etcd.live_endpoints(),
        &["get", "--prefix", "--print-value-only", &prefix],
    );
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The nodes whose witness shows `service` running now, sorted.
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

/// The names of the members `cluster status` shows up, asked on `node`.
fn up_members(node: &Node) -> Result<Vec<String>, String> {
    let out = node.cluster(&["status", "--json"]);
    if !out.status.success() {
        return Err(text(&out));
    }
    let doc: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(doc["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["state"] == "up")
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect())
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

/// Kills etcd member `which(leader)` and checks the cluster layer through it.
/// The nodes' leases are `missed_beats` heartbeats of 250 ms.
fn one_member_killed(test: &str, missed_beats: u32, which: impl Fn(usize) -> usize) {
    let mut etcd = EtcdCluster::start(test);
    let def = ClusterDef::new(test);
    def.write_witnessed_service("web", "placement = \"one\"");
    def.write_witnessed_service("every", "placement = \"all\"");
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let mut spec = NodeSpec::new(&format!("n{i}"), i, &etcd.endpoints());
            spec.missed_beats = missed_beats;
            def.node(spec)
        })
        .collect();
    let _logs = LogsOnFailure(&nodes);
    for n in &nodes {
        n.start_ccmgr();
        n.start_agent();
    }
    let on = wait_until(LIMIT, "web placed", || def.witness().running_on("web"));
    wait_until(LIMIT, "every on the three nodes", || {
        (running_on_all(&def, "every") == ["n0", "n1", "n2"]).then_some(())
    });
    let before = events(&def, &etcd).len();

    let leader = etcd.wait_leader();
    let victim = which(leader);
    etcd.kill_member(victim);
    eprintln!("{test}: killed etcd member {victim} (the leader was {leader})");

    // status answers, every node still up.
    for n in &nodes {
        let up = wait_for(LIMIT, "status answers", || up_members(n));
        assert_eq!(up, ["n0", "n1", "n2"], "asked on {}", n.name);
    }

    // kill -9 of web's node: web moves to another node, never on two at once.
    let dead = nodes.iter().find(|n| n.name == on).unwrap();
    dead.kill_node();
    let moved_to = wait_until(LIMIT, "web running elsewhere", || {
        def.witness().running_on("web").filter(|n| *n != on)
    });
    def.witness().assert_never_twice("web");
    let live: Vec<&Node> = nodes.iter().filter(|n| n.name != on).collect();
    let asker = live[0];
    wait_until(LIMIT, "the dead node down", || {
        up_members(asker)
            .ok()
            .filter(|up| !up.contains(&on) && up.len() == 2)
    });

    // move works.
    let to = live.iter().find(|n| n.name != moved_to).unwrap();
    let out = asker.cluster(&["move", "web", &to.name]);
    assert!(
        out.status.success(),
        "move web {}: {}\netcd holds:\n{}",
        to.name,
        text(&out),
        text(&etcdctl_at(
            &etcd.live_endpoints(),
            &["get", "--prefix", &format!("/ccmgr/{}/", def.name)]
        ))
    );
    wait_until(LIMIT, "web witnessed on the move's target", || {
        (def.witness().running_on("web").as_deref() == Some(to.name.as_str())).then_some(())
    });
    let runs = def.witness().assert_never_twice("web");
    assert_eq!(runs.len(), 3, "{runs:#?}");

    // The live agents stayed members all along: still running, no fence, no loss but the
    // dead node's, and their `every` never restarted.
    for n in &live {
        assert!(
            n.agent_exited().is_none(),
            "the agent of {} exited:\n{}",
            n.name,
            n.agent_log()
        );
    }
    let evs = events(&def, &etcd);
    let after = &evs[before.min(evs.len())..];
    for e in after {
        let lost = e["event"] == "member-lost" && e["member"] != on.as_str();
        let fenced = e["event"] == "member-fenced";
        assert!(
            !lost && !fenced,
            "{e}; all events since the kill: {after:#?}"
        );
    }
    assert!(
        after
            .iter()
            .any(|e| e["event"] == "member-lost" && e["member"] == on.as_str()),
        "the dead node's loss is published: {after:#?}"
    );
    let every = def.witness().runs("every");
    for n in &live {
        let mine: Vec<_> = every.iter().filter(|r| r.node == n.name).collect();
        assert_eq!(mine.len(), 1, "every restarted on {}: {every:#?}", n.name);
        assert!(mine[0].end_ns.is_none(), "every stopped on {}", n.name);
    }
}

/// The etcd leader killed. Keep-alives need a leader: none is renewed from the kill until
/// the two others have elected a new one, which takes the harness's election timeout
/// (500 ms) and more. A node's lease must outlast that, or its agent fences (safely, but its
/// services restart): 1-second leases do not (see the test below), so here they are 3 s
/// (12 beats of 250 ms). etcd itself extends every lease at a leader change.
#[test]
fn the_etcd_leader_killed_the_cluster_layer_keeps_working() {
    one_member_killed("etcd_leader", 12, |leader| leader);
}

/// A follower killed: the leader stays, so even 1-second leases (4 beats of 250 ms) are
/// renewed throughout; only the requests that went to the dead member must go elsewhere.
#[test]
fn an_etcd_follower_killed_the_cluster_layer_keeps_working() {
    one_member_killed("etcd_follower", 4, |leader| (leader + 1) % 3);
}

//! Tests of the cluster tests' harness itself (tests/support): a real etcd, a real etcd
//! cluster with a member killed, the proxy's network cut and reset, and a node whose ccmgr
//! instance is killed whole, proven by pid and by the service-side witness.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{
    ClusterDef, Etcd, EtcdCluster, Proxy, ProxySet, Witness, alive, etcdctl_at, text, wait_until,
};

/// etcdctl with 1-second dial and command timeouts: an unreachable etcd fails it quickly.
/// Only for calls expected to fail: one expected to succeed gets etcdctl's own timeouts
/// (2 s dial, 5 s command), so that a loaded machine does not fail it.
const QUICK: [&str; 2] = ["--dial-timeout=1s", "--command-timeout=1s"];

fn put(endpoints: &[String], key: &str, value: &str) -> std::process::Output {
    etcdctl_at(endpoints, &["put", key, value])
}

/// A put expected to fail, quickly.
fn put_quick(endpoints: &[String], key: &str, value: &str) -> std::process::Output {
    let mut args = QUICK.to_vec();
    args.extend(["put", key, value]);
    etcdctl_at(endpoints, &args)
}

fn get(endpoints: &[String], key: &str) -> String {
    let out = etcdctl_at(endpoints, &["get", "--print-value-only", key]);
    assert!(out.status.success(), "get {key}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn etcd_answers_a_put_and_a_get() {
    let etcd = Etcd::start("etcd_put_get");
    let out = etcd.etcdctl(&["put", "/k", "v1"]);
    assert!(out.status.success(), "put: {}", text(&out));
    assert_eq!(get(&etcd.endpoints(), "/k"), "v1");
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let pid = etcd.pid();
    drop(etcd);
    assert!(!alive(pid), "etcd {pid} survived its drop");
}

#[test]
fn a_killed_etcd_restarts_with_its_data() {
    let mut etcd = Etcd::start("etcd_restart");
    assert!(etcd.etcdctl(&["put", "/k", "kept"]).status.success());
    let pid = etcd.pid();
    etcd.kill();
    assert!(!alive(pid), "etcd {pid} survived kill");
    assert!(!put_quick(&etcd.endpoints(), "/k", "lost").status.success());
    etcd.restart();
    assert_eq!(get(&etcd.endpoints(), "/k"), "kept");
}

#[test]
fn etcd_grants_one_second_leases() {
    let etcd = Etcd::start("etcd_lease");
    let out = etcd.etcdctl(&["lease", "grant", "1"]);
    assert!(out.status.success(), "lease grant 1: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("granted with TTL(1s)"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_cut_proxy_stalls_etcd_and_a_restored_one_forwards_again() {
    let etcd = Etcd::start("proxy_cut");
    let proxy = Proxy::to_etcd(&etcd);
    let via = vec![proxy.endpoint()];
    let out = put(&via, "/p", "1");
    assert!(
        out.status.success(),
        "put through the proxy: {}",
        text(&out)
    );

    proxy.cut();
    let out = put_quick(&via, "/p", "2");
    assert!(
        !out.status.success(),
        "a put through a cut proxy: {}",
        text(&out)
    );
    assert_eq!(
        get(&etcd.endpoints(), "/p"),
        "1",
        "the cut put went through"
    );

    proxy.restore();
    let out = put(&via, "/p", "3");
    assert!(out.status.success(), "put after restore: {}", text(&out));
    assert_eq!(get(&via, "/p"), "3");

    proxy.reset();
    let out = put_quick(&via, "/p", "4");
    assert!(
        !out.status.success(),
        "a put through a reset proxy: {}",
        text(&out)
    );
    proxy.restore();
    wait_until(Duration::from_secs(30), "a put after the reset", || {
        put(&via, "/p", "5").status.success().then_some(())
    });
    assert_eq!(get(&etcd.endpoints(), "/p"), "5");
}

#[test]
fn a_cut_stalls_an_open_connection_both_ways() {
    use std::io::{Read as _, Write as _};
    // An echo server as the target: the proxy is not etcd-specific.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let proxy = Proxy::start(target);
    let mut c = std::net::TcpStream::connect(proxy.addr()).unwrap();
    c.write_all(b"a").unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"a");

    proxy.cut();
    c.write_all(b"b").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let err = c
        .read(&mut one)
        .expect_err("nothing comes back through a cut");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "a cut connection is silent, not closed: {err}"
    );

    // Healed: the connection resumes, "b" arrives.
    proxy.restore();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"b");
    drop(c);
    drop(proxy);
    echo.join().unwrap();
}

#[test]
fn an_etcd_cluster_answers_with_one_member_killed_and_restarted() {
    let mut cluster = EtcdCluster::start("etcd_cluster");
    let all = cluster.endpoints();
    assert_eq!(all.len(), 3);
    let out = put(&all, "/c", "1");
    assert!(out.status.success(), "put: {}", text(&out));

    // Kill the leader: the hardest case (a new one must be elected).
    let leader = cluster.wait_leader();
    cluster.kill_member(leader);
    let live = cluster.live_endpoints();
    assert_eq!(live.len(), 2);
    let out = put(&live, "/c", "2");
    assert!(out.status.success(), "put on two members: {}", text(&out));
    assert_eq!(get(&live, "/c"), "2");

    // A node's network to the two live members, cut whole.
    let net = ProxySet::to_cluster(&cluster);
    let via: Vec<String> = net
        .endpoints()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(get(&via, "/c"), "2");
    net.cut();
    let out = put_quick(&via, "/c", "cut");
    assert!(
        !out.status.success(),
        "a put through cut proxies: {}",
        text(&out)
    );
    net.restore();

    cluster.restart_member(leader);
    let one = vec![all[leader].clone()];
    wait_until(
        Duration::from_secs(30),
        "the restarted member caught up",
        || (get(&one, "/c") == "2").then_some(()),
    );
}

/// The service file of a witnessed service, for services.d.
fn witnessed(def: &ClusterDef) -> String {
    format!("command = {}\n", def.witness_command())
}

#[test]
fn a_node_starts_its_ccmgr_and_kill_node_leaves_nothing_alive() {
    let def = ClusterDef::new("kill_node");
    let node = def.simple_node("n0", 0, &["http://127.0.0.1:9".to_owned()]);
    node.start_ccmgr();
    let status = node.local_status();
    assert_eq!(status["services"].as_array().map(Vec::len), Some(0));

    // A service through services.d, as the agent will place one; reload starts it.
    node.write_local_service("w", &witnessed(&def));
    let out = node.ccmgr(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out));
    wait_until(Duration::from_secs(30), "w up and witnessed", || {
        (node.runs("w") && def.witness().running_on("w").as_deref() == Some("n0")).then_some(())
    });

    let mut pids: BTreeSet<i32> = support::pids_in(&node.local_status()).into_iter().collect();
    assert!(pids.len() >= 4, "keeper, coordinator, standby, w: {pids:?}");
    pids.extend(node.instance_pids());
    node.kill_node();
    let alive_now: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(alive_now.is_empty(), "alive after kill_node: {alive_now:?}");
    let left = support::instance_processes(&node.instance);
    assert!(
        left.is_empty(),
        "processes of the instance after kill_node: {left:?}"
    );
    assert!(
        node.local_status_opt()
            .is_none_or(|s| s["services"].as_array().is_none_or(|v| v
                .iter()
                .all(|s| s["pid"].as_i64().is_none_or(|p| !alive(p as i32)))))
    );

    let runs = def.witness().assert_never_twice("w");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].node, "n0");
    assert!(runs[0].end_ns.is_some(), "kill_node ends the run: {runs:?}");

    // The node comes back: its ccmgr starts over what the killed one left in run/.
    node.start_ccmgr();
    wait_until(Duration::from_secs(30), "w up again", || {
        def.witness().running_on("w")
    });
    let runs = def.witness().assert_never_twice("w");
    assert_eq!(runs.len(), 2, "{runs:?}");
}

#[test]
fn an_agent_is_spawned_and_killed_by_pid() {
    let def = ClusterDef::new("agent");
    let node = def.simple_node("n0", 0, &["http://127.0.0.1:9".to_owned()]);
    node.start_agent();
    let pid = node.agent_pid().expect("the agent was spawned");
    assert!(node.agent_log_path().exists());
    node.kill_agent();
    assert!(!alive(pid), "the agent {pid} survived kill_agent");
    assert_eq!(node.agent_pid(), None);
}

#[test]
fn a_witnessed_service_records_its_stop() {
    let def = ClusterDef::new("witness_stop");
    let node = def.simple_node("n1", 1, &["http://127.0.0.1:9".to_owned()]);
    node.write_local_service("w", &witnessed(&def));
    node.start_ccmgr();
    wait_until(Duration::from_secs(30), "w witnessed", || {
        def.witness().running_on("w")
    });
    let out = node.ccmgr(&["stop"]);
    assert!(out.status.success(), "stop: {}", text(&out));
    let runs = def.witness().assert_never_twice("w");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(
        runs[0].end_ns.is_some_and(|e| e >= runs[0].start_ns),
        "{runs:?}"
    );
}

#[test]
fn the_cluster_def_gives_every_node_the_same_cluster_d() {
    let def = ClusterDef::new("cluster_d");
    let early = def.simple_node("a", 0, &["http://127.0.0.1:9".to_owned()]);
    def.write_cluster_service("s1", "command = \"sleep 100\"\n");
    let late = def.simple_node("b", 1, &["http://127.0.0.1:9".to_owned()]);
    for n in [&early, &late] {
        assert_eq!(
            std::fs::read_to_string(n.cluster_dir().join("s1.toml")).unwrap(),
            "command = \"sleep 100\"\n"
        );
        let config = std::fs::read_to_string(n.config_path()).unwrap();
        assert!(config.contains("[cluster]"), "{config}");
        assert!(
            config.contains(&format!("node = \"{}\"", n.name)),
            "{config}"
        );
    }
    assert_ne!(early.instance, late.instance);
    // ccmgr itself accepts the [cluster] table.
    let out = early.ccmgr(&["check"]);
    assert!(out.status.success(), "check: {}", text(&out));
}

#[test]
fn the_witness_finds_overlapping_runs() {
    let ok = "start p-a s 10\nstop p-a s 20\nstart p-b s 20\nkilled p-b 30\nstart p-a s 31\n";
    let w = Witness::parse(ok, "p");
    let runs = w.assert_never_twice("s");
    assert_eq!(runs.len(), 3);
    assert_eq!(
        runs.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(),
        ["a", "b", "a"]
    );
    assert_eq!(w.running_on("s").as_deref(), Some("a"));

    for bad in [
        "start p-a s 10\nstart p-b s 15\nstop p-a s 20\n",
        "start p-a s 10\nstart p-b s 15\n",
        "start p-a s 10\nkilled p-a 16\nstart p-b s 15\n",
    ] {
        let w = Witness::parse(bad, "p");
        let r = std::panic::catch_unwind(|| w.assert_never_twice("s"));
        assert!(r.is_err(), "overlap not found in {bad:?}");
    }
}

#[test]
fn a_dropped_node_leaves_nothing_alive() {
    let def = ClusterDef::new("drop_node");
    let node = def.simple_node("n0", 0, &["http://127.0.0.1:9".to_owned()]);
    node.write_local_service("w", &witnessed(&def));
    node.start_ccmgr();
    wait_until(Duration::from_secs(30), "w witnessed", || {
        def.witness().running_on("w")
    });
    node.start_agent();
    let mut pids = node.own_pids();
    assert!(pids.len() >= 4, "keeper, coordinator, standby, w: {pids:?}");
    pids.extend(node.agent_pid());
    let instance = node.instance.clone();
    drop(node);
    let alive_now: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(alive_now.is_empty(), "alive after the drop: {alive_now:?}");
    let left = support::instance_processes(&instance);
    assert!(
        left.is_empty(),
        "processes of the instance after the drop: {left:?}"
    );
    def.witness().assert_never_twice("w");
}

#[test]
fn kill_node_kills_the_fence_guard_that_kill_agent_leaves() {
    let etcd = Etcd::start("guard");
    let def = ClusterDef::new("guard");
    let node = def.simple_node("n0", 0, &etcd.endpoints());
    node.start_ccmgr();
    node.start_agent();
    let agent = node.agent_pid().unwrap();
    let guard = wait_until(Duration::from_secs(30), "the agent's fence guard", || {
        support::children_of(agent).into_iter().find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"guard"))
        })
    });
    node.kill_agent();
    assert!(!alive(agent), "the agent {agent} survived kill_agent");
    node.kill_node();
    assert!(!alive(guard), "the guard {guard} survived kill_node");
    let left = support::instance_processes(&node.instance);
    assert!(
        left.is_empty(),
        "processes of the instance after kill_node: {left:?}"
    );
}

/// The harness with the real agent: two nodes place a witnessed service once; the node that
/// runs it dies whole; the service comes up on the other, never on both at once.
#[test]
fn two_agents_move_a_witnessed_service_off_a_killed_node() {
    let etcd = Etcd::start("two_agents");
    let def = ClusterDef::new("two_agents");
    def.write_witnessed_service("w", "placement = \"one\"\ntransfer_cost = \"free\"");
    let nodes = [
        def.simple_node("n0", 0, &etcd.endpoints()),
        def.simple_node("n1", 1, &etcd.endpoints()),
    ];
    for n in &nodes {
        n.start_ccmgr();
        n.start_agent();
    }
    let first = wait_until(Duration::from_secs(30), "w placed and running", || {
        def.witness().running_on("w")
    });
    let (dead, other) = if first == "n0" {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    dead.kill_node();
    wait_until(
        Duration::from_secs(30),
        "w running on the other node",
        || (def.witness().running_on("w").as_deref() == Some(other.name.as_str())).then_some(()),
    );
    assert!(other.runs("w"), "{:?}", other.local_status());
    let runs = def.witness().assert_never_twice("w");
    assert_eq!(runs.len(), 2, "{runs:?}");
}

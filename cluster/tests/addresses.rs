//! `ccmgr-cluster addresses` end to end (seed 002): real etcd, real nodes (each its own ccmgr
//! instance and agent), a `placement = "all"` service registered on every node, and the
//! ordered list a client node gets, checked against the seed's worked example and against an
//! independent restatement of the rule for random distances and hop groups.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::{ClusterDef, Etcd, Node, NodeSpec, text, wait_for};

/// How long the nodes may take to join and register the service everywhere.
const LIMIT: Duration = Duration::from_secs(60);

/// `addresses SERVICE --node N --json`, until the service is registered on `servers` nodes;
/// returns the document.
fn addresses_when_on(node: &Node, service: &str, client: &str, servers: usize) -> Value {
    wait_for(
        LIMIT,
        &format!("{service} registered on {servers} nodes"),
        || {
            let out = node.cluster(&["addresses", service, "--node", client, "--json"]);
            if !out.status.success() {
                return Err(text(&out));
            }
            let doc: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}"))?;
            if doc["addresses"].as_array().map(Vec::len) == Some(servers) {
                Ok(doc)
            } else {
                Err(doc.to_string())
            }
        },
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// Seed 002's worked example: a client on node number 5, the service on addresses
/// {1(0), 3(1), 7(1), 9(1), 12(2), 2(2)}, address 1 being node 5's own. The seed's answer is
/// {1, 9, 3, 7, 2, 12}.
#[test]
fn the_seeds_worked_example_end_to_end() {
    let etcd = Etcd::start("addr_seed");
    let def = ClusterDef::new("addr_seed");
    def.write_witnessed_service("web", "placement = \"all\"");
    // Node number 5 owns address "1" (local, distance 0); its `distances` table says how far
    // the others are: 3, 7, 9 one hop, 12 and 2 two hops.
    let mut client = NodeSpec::new("client", 5, &etcd.endpoints());
    client.address = "1".into();
    client.cluster_extra = "distances = { s3 = 1, s7 = 1, s9 = 1, s12 = 2, s2 = 2 }".into();
    let mut nodes = vec![def.node(client)];
    for (number, address) in [(0, "3"), (1, "7"), (2, "9"), (3, "12"), (4, "2")] {
        let mut spec = NodeSpec::new(&format!("s{address}"), number, &etcd.endpoints());
        spec.address = address.into();
        nodes.push(def.node(spec));
    }
    for n in &nodes {
        n.start_ccmgr();
        n.start_agent();
    }
    let doc = addresses_when_on(&nodes[0], "web", "5", 6);
    assert_eq!(
        strings(&doc["addresses"]),
        ["1", "9", "3", "7", "2", "12"],
        "{doc:#}"
    );
    assert_eq!(doc["client"]["node"], "client", "{doc:#}");
    assert_eq!(doc["client"]["number"], 5, "{doc:#}");
    // Each server's distance as the seed gives it, and only the client's own one local.
    let by_address: BTreeMap<String, (u64, bool)> = doc["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["address"].as_str().unwrap().to_owned(),
                (
                    s["distance"].as_u64().unwrap(),
                    s["local"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    let want: BTreeMap<String, (u64, bool)> = [
        ("1", (0, true)),
        ("3", (1, false)),
        ("7", (1, false)),
        ("9", (1, false)),
        ("12", (2, false)),
        ("2", (2, false)),
    ]
    .into_iter()
    .map(|(a, d)| (a.to_owned(), d))
    .collect();
    assert_eq!(by_address, want, "{doc:#}");
    // The same client named by its name, from another node: the same list.
    let out = nodes[3].cluster(&["addresses", "web", "--node", "client", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let by_name: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(by_name["addresses"], doc["addresses"]);
    // The plain output: one address a line, in that order.
    let out = nodes[0].cluster(&["addresses", "web", "--node", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n9\n3\n7\n2\n12\n");
}

/// A small seeded generator (splitmix64): the test prints its seed, and
/// `ADDRESSES_TEST_SEED=<seed>` replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// One node's settings as the test chose them.
#[derive(Clone, Debug)]
struct Conf {
    name: String,
    number: u64,
    address: String,
    group: Option<String>,
    distances: BTreeMap<String, u32>,
}

/// Seed 002's rule, restated from the configuration alone (not through the crate): the
/// distance by its cases (same node 0; the client's entry; the server's entry; same group 1;
/// else 2), the servers grouped by (not local, distance), each group sorted by address text,
/// and group of n listed from index (N mod n) on, wrapping.
fn expected_order(client: &Conf, servers: &[Conf], port: u16) -> Vec<String> {
    let hops = |s: &Conf| -> u32 {
        if s.name == client.name {
            0
        } else if let Some(d) = client.distances.get(&s.name) {
            *d
        } else if let Some(d) = s.distances.get(&client.name) {
            *d
        } else if client.group.is_some() && client.group == s.group {
            1
        } else {
            2
        }
    };
    let mut groups: BTreeMap<(bool, u32), Vec<String>> = BTreeMap::new();
    for s in servers {
        groups
            .entry((s.name != client.name, hops(s)))
            .or_default()
            .push(format!("{}:{port}", s.address));
    }
    let mut out = Vec::new();
    for mut group in groups.into_values() {
        group.sort();
        let n = group.len();
        let start = (client.number % n as u64) as usize;
        for k in 0..n {
            out.push(group[(start + k) % n].clone());
        }
    }
    out
}

/// Five nodes with random numbers, hop groups and pairwise distances (some unstated, some
/// stated by one side only), and addresses whose textual order differs from their numeric
/// one; for each node, `addresses --node N --json` is the rule restated.
#[test]
fn five_nodes_with_random_distances_follow_the_rule() {
    let seed = std::env::var("ADDRESSES_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("five_nodes_with_random_distances_follow_the_rule: ADDRESSES_TEST_SEED={seed}");
    let mut rng = Rng(seed);

    let names: Vec<String> = (0..5).map(|i| format!("n{i}")).collect();
    let mut addresses = [
        "10.0.0.2",
        "10.0.0.12",
        "10.0.0.3",
        "10.0.0.20",
        "10.0.0.100",
    ];
    rng.shuffle(&mut addresses);
    let mut numbers: Vec<u64> = (0..40).collect();
    rng.shuffle(&mut numbers);
    let confs: Vec<Conf> = (0..5)
        .map(|i| {
            let group = match rng.below(3) {
                0 => None,
                1 => Some("rack-a".to_owned()),
                _ => Some("rack-b".to_owned()),
            };
            // Each other node: its distance stated (0..3 hops) or not, at random.
            let mut distances = BTreeMap::new();
            for n in names.iter().filter(|n| **n != names[i]) {
                if rng.below(2) == 0 {
                    distances.insert(n.clone(), rng.below(4) as u32);
                }
            }
            Conf {
                name: names[i].clone(),
                number: numbers[i],
                address: addresses[i].to_owned(),
                group,
                distances,
            }
        })
        .collect();
    eprintln!("nodes: {confs:#?}");

    let etcd = Etcd::start("addr_random");
    let def = ClusterDef::new("addr_random");
    def.write_witnessed_service("api", "placement = \"all\"\nport = 8080");
    let nodes: Vec<Node> = confs
        .iter()
        .map(|c| {
            let mut spec = NodeSpec::new(&c.name, c.number as u32, &etcd.endpoints());
            spec.address = c.address.clone();
            let mut extra = String::new();
            if let Some(g) = &c.group {
                extra.push_str(&format!("group = \"{g}\"\n"));
            }
            let d: Vec<String> = c
                .distances
                .iter()
                .map(|(n, d)| format!("{n} = {d}"))
                .collect();
            extra.push_str(&format!("distances = {{ {} }}\n", d.join(", ")));
            spec.cluster_extra = extra;
            def.node(spec)
        })
        .collect();
    for n in &nodes {
        n.start_ccmgr();
        n.start_agent();
    }
    addresses_when_on(&nodes[0], "api", &confs[0].number.to_string(), 5);
    for (i, c) in confs.iter().enumerate() {
        let want = expected_order(c, &confs, 8080);
        // Asked by number, from another node than the client's.
        let asker = &nodes[(i + 1) % nodes.len()];
        let doc = addresses_when_on(asker, "api", &c.number.to_string(), 5);
        assert_eq!(
            strings(&doc["addresses"]),
            want,
            "client {} (seed {seed}): {doc:#}",
            c.name
        );
        assert_eq!(doc["client"]["node"], c.name.as_str(), "{doc:#}");
        // Asked by name, from the client's own node: the same list.
        let out = nodes[i].cluster(&["addresses", "api", "--node", &c.name, "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let by_name: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(strings(&by_name["addresses"]), want, "seed {seed}");
        // And without --node, the asking node is the client.
        let out = nodes[i].cluster(&["addresses", "api", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let default: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(strings(&default["addresses"]), want, "seed {seed}");
    }
}

/// An unknown client node is bad usage (exit 2) with a sentence naming it; so is an unknown
/// service.
#[test]
fn an_unknown_node_or_service_is_bad_usage() {
    let etcd = Etcd::start("addr_unknown");
    let def = ClusterDef::new("addr_unknown");
    def.write_witnessed_service("web", "placement = \"all\"");
    let n0 = def.simple_node("n0", 0, &etcd.endpoints());
    n0.start_ccmgr();
    n0.start_agent();
    addresses_when_on(&n0, "web", "n0", 1);

    let out = n0.cluster(&["addresses", "web", "--node", "nosuch", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nosuch"), "{}", text(&out));
    assert!(out.stdout.is_empty(), "{}", text(&out));

    let out = n0.cluster(&["addresses", "nosuchservice", "--node", "n0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuchservice"),
        "{}",
        text(&out)
    );
}

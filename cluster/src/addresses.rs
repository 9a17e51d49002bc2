//! The ordered list of a service's addresses as one client node should try them (seed 002,
//! FIG. 24): the local addresses first, then the others by increasing distance, and among
//! servers at the same distance a rotation by the client's node number, so that each server of
//! an equidistant group is the first choice of an equal share of the clients.
//!
//! This module owns the rule and nothing else: it is pure (no etcd, no I/O). It owns
//! - [`order_addresses`]: the seed's procedure over servers whose distance is already known;
//! - [`distance`]: how far a server node is from a client node (per node pair, then hop group);
//! - [`service_addresses`]: both together, for a service placed on some nodes.
//!
//! How the seed is read, where it leaves a choice:
//! - "indexed 0, 1, 2, etc., according to their node addresses, from lowest to highest": the
//!   addresses are compared as strings, byte by byte. The seed's own example asks for it: its
//!   second group, addresses 12 and 2, is indexed 0 -> 12, 1 -> 2, which is textual order, not
//!   numeric. And it is a sort, never the order the list came in, so that every client agrees
//!   on the index of every server whatever order it learnt of them in (etcd's, a map's);
//!   otherwise two clients with different node numbers could pick the same first server.
//! - "the addresses of servers with the lowest distance are listed": local servers come first,
//!   and among themselves follow the same rule (grouped by distance, rotated per group) as the
//!   others do.
//! - Two servers with the same address (nodes sharing a loopback address in a test) are ordered
//!   by node name: the seed assumes unique addresses; the tie-break keeps the output a function
//!   of the set of servers alone.

use std::collections::BTreeMap;

/// One server of a service as seen from one client: where to reach it and how far it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// The service's address on that server's node, as clients use it (`10.0.0.3:8080`).
    pub address: String,
    /// The server's node name (only breaks ties between equal addresses).
    pub node: String,
    /// Hops from the client (see [`distance`]).
    pub distance: u32,
    /// The server runs on the client's own node (seed 002, STEP 2400).
    pub local: bool,
}

/// What the ordering needs to know about a node (from `[cluster]` of its ccmgr.toml, as the
/// node registered itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's name (`[cluster] node`).
    pub name: String,
    /// The node's unique number (`[cluster] node_number`): the rotation's input.
    pub number: u64,
    /// The node's address for services (`[cluster] address`).
    pub address: String,
    /// The node's hop group (`[cluster] group`): nodes of one group are 1 hop apart.
    pub group: Option<String>,
    /// The node's distances to other nodes, by node name (`[cluster] distances`).
    pub distances: BTreeMap<String, u32>,
}

/// The seed's mapping index (STEP 2408): for the `k`-th place (k = 0..n) of a group of `n`
/// equidistant servers, the index of the server that takes it, for the client numbered
/// `node_number`: `((node_number mod n) + k) mod n`. `n` must not be 0.
pub fn mapping_index(node_number: u64, n: usize, k: usize) -> usize {
    // n fits in u64 on every target Rust supports; the remainder is below n, so fits in usize.
    let start = (node_number % n as u64) as usize;
    (start + k % n) % n
}

/// Why two servers fall in one group: local first, then by distance (STEP 2400 and 2402).
fn group_key(server: &Server) -> (bool, u32) {
    (!server.local, server.distance)
}

/// The servers in groups, in the order the groups are listed (local ones first, then by
/// increasing distance), each group sorted into its index order (STEP 2406): by address, byte
/// by byte, then by node name. `groups[g][i]` is the server of index `i` in group `g`.
pub fn indexed_groups(servers: &[Server]) -> Vec<Vec<&Server>> {
    let mut sorted: Vec<&Server> = servers.iter().collect();
    sorted.sort_by(|a, b| {
        group_key(a)
            .cmp(&group_key(b))
            .then_with(|| a.address.as_bytes().cmp(b.address.as_bytes()))
            .then_with(|| a.node.cmp(&b.node))
    });
    sorted
        .chunk_by(|a, b| group_key(a) == group_key(b))
        .map(<[&Server]>::to_vec)
        .collect()
}

/// The addresses of `servers` in the order the client numbered `node_number` should try them
/// (seed 002, FIG. 24): every group of [`indexed_groups`] in turn, and within a group of `n`
/// the server of index [`mapping_index`]`(node_number, n, k)` for k = 0..n. Every server's
/// address appears exactly once; the result depends on the set of servers, not their order.
pub fn order_addresses(node_number: u64, servers: &[Server]) -> Vec<String> {
    let mut ordered = Vec::with_capacity(servers.len());
    for group in indexed_groups(servers) {
        let n = group.len();
        ordered.extend((0..n).map(|k| group[mapping_index(node_number, n, k)].address.clone()));
    }
    ordered
}

/// How far `server` is from `client`, in hops: 0 for the same node (by name); else the client's
/// own `distances` entry for the server's node; else the server's entry for the client's node
/// (one side may state the distance for both); else 1 when both nodes have the same hop group;
/// else 2 (somewhere else, across one router).
pub fn distance(client: &NodeInfo, server: &NodeInfo) -> u32 {
    if client.name == server.name {
        return 0;
    }
    if let Some(&d) = client.distances.get(&server.name) {
        return d;
    }
    if let Some(&d) = server.distances.get(&client.name) {
        return d;
    }
    match (&client.group, &server.group) {
        (Some(a), Some(b)) if a == b => 1,
        _ => 2,
    }
}

/// A node address with a port: `<address>:<port>`, an IPv6 literal in brackets
/// (`[fd00::1]:8080`) so that the port stays readable; without a port, the address alone.
pub fn with_port(address: &str, port: Option<u16>) -> String {
    match port {
        None => address.to_owned(),
        Some(port) if address.contains(':') && !address.starts_with('[') => {
            format!("[{address}]:{port}")
        }
        Some(port) => format!("{address}:{port}"),
    }
}

/// The ordered addresses of a service for `client`: the service runs on the nodes `servers`
/// (its address there is the node's address, with `port` when the service has one); a server
/// is local when it is the client's own node, and its distance is [`distance`].
pub fn service_addresses(
    client: &NodeInfo,
    servers: &[NodeInfo],
    port: Option<u16>,
) -> Vec<String> {
    let servers: Vec<Server> = servers
        .iter()
        .map(|node| Server {
            address: with_port(&node.address, port),
            node: node.name.clone(),
            distance: distance(client, node),
            local: node.name == client.name,
        })
        .collect();
    order_addresses(client.number, &servers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn server(address: &str, distance: u32, local: bool) -> Server {
        Server {
            address: address.to_owned(),
            node: format!("node-{address}"),
            distance,
            local,
        }
    }

    fn addresses(group: &[&Server]) -> Vec<String> {
        group.iter().map(|s| s.address.clone()).collect()
    }

    /// Seed 002's worked example, step by step: node number 5, service list
    /// {1(0), 3(1), 7(1), 9(1), 12(2), 2(2)}, address 1 local to node 5.
    #[test]
    fn the_seeds_worked_example() {
        let node_number = 5;
        let input = [
            server("1", 0, true),
            server("3", 1, false),
            server("7", 1, false),
            server("9", 1, false),
            server("12", 2, false),
            server("2", 2, false),
        ];
        let groups = indexed_groups(&input);
        assert_eq!(groups.len(), 3);

        // 1) Address 1 is local to node 5: it is listed first.
        assert_eq!(addresses(&groups[0]), ["1"]);

        // 2) The three equidistant servers are ordered by node addresses: 0->3, 1->7, 2->9.
        assert_eq!(addresses(&groups[1]), ["3", "7", "9"]);
        //  a) k=0: [(5 mod 3 + 0) mod 3] = 2, which maps to server 9.
        assert_eq!(mapping_index(node_number, 3, 0), 2);
        //  b) k=1: [(5 mod 3 + 1) mod 3] = [(2 + 1) mod 3] = 0, which maps to server 3.
        assert_eq!(mapping_index(node_number, 3, 1), 0);
        //  c) k=2: [(5 mod 3 + 2) mod 3] = [(2 + 2) mod 3] = 1, which maps to server 7.
        assert_eq!(mapping_index(node_number, 3, 2), 1);

        // 3) The second set of equidistant servers: the mapping indexes are 0->12, 1->2.
        assert_eq!(addresses(&groups[2]), ["12", "2"]);
        //  a) k=0: [(5 mod 2 + 0) mod 2] = 1, which maps to server 2.
        assert_eq!(mapping_index(node_number, 2, 0), 1);
        //  b) k=1: [(5 mod 2 + 1) mod 2] = 0, which maps to server 12.
        assert_eq!(mapping_index(node_number, 2, 1), 0);

        // 4) The final product is the list {1, 9, 3, 7, 2, 12}.
        assert_eq!(
            order_addresses(node_number, &input),
            ["1", "9", "3", "7", "2", "12"]
        );
    }

    /// Addresses are indexed in textual order, byte by byte: "10.0.0.12" before "10.0.0.2".
    #[test]
    fn equidistant_servers_are_indexed_in_textual_order() {
        let input = [server("10.0.0.2", 1, false), server("10.0.0.12", 1, false)];
        assert_eq!(
            addresses(&indexed_groups(&input)[0]),
            ["10.0.0.12", "10.0.0.2"]
        );
        assert_eq!(order_addresses(0, &input), ["10.0.0.12", "10.0.0.2"]);
        assert_eq!(order_addresses(1, &input), ["10.0.0.2", "10.0.0.12"]);
    }

    /// Three equidistant servers and clients 0..6: each client's list is the sorted list
    /// rotated by its number mod 3, so each server is first for exactly a third of them.
    #[test]
    fn three_equidistant_servers_rotate_over_six_clients() {
        let input = [
            server("c", 1, false),
            server("a", 1, false),
            server("b", 1, false),
        ];
        let expected = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]];
        let mut first = BTreeMap::new();
        for node_number in 0..6u64 {
            let ordered = order_addresses(node_number, &input);
            assert_eq!(
                ordered,
                expected[node_number as usize % 3],
                "client {node_number}"
            );
            *first.entry(ordered[0].clone()).or_insert(0) += 1;
        }
        assert_eq!(
            first,
            BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)])
        );
    }

    #[test]
    fn no_servers_no_addresses() {
        assert!(order_addresses(7, &[]).is_empty());
        assert!(service_addresses(&NodeInfo::default(), &[], Some(80)).is_empty());
    }

    fn node(name: &str, number: u64, group: Option<&str>, distances: &[(&str, u32)]) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            number,
            address: format!("10.0.0.{number}"),
            group: group.map(str::to_owned),
            distances: distances.iter().map(|&(n, d)| (n.to_owned(), d)).collect(),
        }
    }

    #[test]
    fn distance_by_node_pair_then_hop_group() {
        let n0 = node("n0", 0, Some("rack-a"), &[("n1", 5)]);
        let n1 = node("n1", 1, Some("rack-a"), &[("n0", 3), ("n2", 4)]);
        let n2 = node("n2", 2, Some("rack-b"), &[]);
        let n3 = node("n3", 3, Some("rack-a"), &[]);
        let n4 = node("n4", 4, None, &[]);
        assert_eq!(distance(&n0, &n0), 0, "same node");
        assert_eq!(distance(&n0, &n1), 5, "the client's own entry wins");
        assert_eq!(distance(&n1, &n0), 3, "each side's own entry");
        assert_eq!(distance(&n2, &n1), 4, "the server's entry for the client");
        assert_eq!(distance(&n0, &n3), 1, "same hop group");
        assert_eq!(distance(&n0, &n2), 2, "other hop group");
        assert_eq!(distance(&n4, &n3), 2, "no hop group");
        assert_eq!(distance(&n4, &n4), 0, "same node without a group");
    }

    #[test]
    fn service_addresses_put_the_own_node_first_and_add_the_port() {
        let client = node("n1", 1, Some("a"), &[]);
        let servers = [
            node("n2", 2, None, &[]),
            node("n3", 3, Some("a"), &[]),
            node("n1", 1, Some("a"), &[]),
        ];
        assert_eq!(
            service_addresses(&client, &servers, Some(8080)),
            ["10.0.0.1:8080", "10.0.0.3:8080", "10.0.0.2:8080"]
        );
        assert_eq!(
            service_addresses(&client, &servers, None),
            ["10.0.0.1", "10.0.0.3", "10.0.0.2"]
        );
    }

    #[test]
    fn ports_on_ipv6_addresses_are_bracketed() {
        assert_eq!(with_port("fd00::1", Some(80)), "[fd00::1]:80");
        assert_eq!(with_port("[fd00::1]", Some(80)), "[fd00::1]:80");
        assert_eq!(with_port("127.0.0.1", Some(80)), "127.0.0.1:80");
        assert_eq!(with_port("fd00::1", None), "fd00::1");
    }

    /// The rule restated the straightforward way, independently of the implementation: each
    /// server's distance by the rule's cases, its rank in its group the inverse of the
    /// rotation (index i is listed at place (i - node_number mod n) mod n), and one sort by
    /// (not local, distance, rank).
    fn reference_order(client: &NodeInfo, nodes: &[NodeInfo], port: Option<u16>) -> Vec<String> {
        let hops = |s: &NodeInfo| match (
            s.name == client.name,
            client.distances.get(&s.name),
            s.distances.get(&client.name),
            (&client.group, &s.group),
        ) {
            (true, _, _, _) => 0,
            (false, Some(d), _, _) => *d,
            (false, None, Some(d), _) => *d,
            (false, None, None, (Some(a), Some(b))) if a == b => 1,
            _ => 2,
        };
        let address = |s: &NodeInfo| match port {
            Some(p) => format!("{}:{p}", s.address),
            None => s.address.clone(),
        };
        let mut ranked: Vec<(bool, u32, usize, String)> = nodes
            .iter()
            .map(|s| {
                let key = (s.name != client.name, hops(s));
                let mut group: Vec<(String, String)> = nodes
                    .iter()
                    .filter(|o| (o.name != client.name, hops(o)) == key)
                    .map(|o| (address(o), o.name.clone()))
                    .collect();
                group.sort();
                let n = group.len();
                let i = group
                    .iter()
                    .position(|(a, name)| *a == address(s) && *name == s.name)
                    .unwrap();
                let rank = (i + n - (client.number % n as u64) as usize) % n;
                (key.0, key.1, rank, address(s))
            })
            .collect();
        ranked.sort();
        ranked.into_iter().map(|(_, _, _, a)| a).collect()
    }

    /// Five nodes with random addresses (few, so that some collide and "12" meets "2"), hop
    /// groups and pairwise distances; the client is one of them or a node that runs nothing.
    fn five_nodes() -> impl Strategy<Value = (Vec<NodeInfo>, NodeInfo)> {
        let one = (
            0u64..40,
            prop_oneof![Just(1u8), Just(2), Just(12), Just(20), Just(3)],
            proptest::option::of(prop_oneof![Just("a"), Just("b")]),
            proptest::collection::vec(proptest::option::of(0u32..4), 6),
        );
        (proptest::collection::vec(one, 5), 0usize..6, 0u64..1000).prop_map(
            |(raw, client_index, client_number)| {
                let names: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
                let nodes: Vec<NodeInfo> = raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, (number, last, group, distances))| NodeInfo {
                        name: names[i].clone(),
                        number,
                        address: format!("10.0.0.{last}"),
                        group: group.map(str::to_owned),
                        distances: distances
                            .into_iter()
                            .enumerate()
                            .filter_map(|(j, d)| Some((names[j].clone(), d?)))
                            .collect(),
                    })
                    .collect();
                // Index 5: a client node on which the service does not run.
                let mut client = nodes
                    .get(client_index)
                    .cloned()
                    .unwrap_or_else(|| NodeInfo {
                        name: names[5].clone(),
                        number: 0,
                        address: "10.0.1.5".into(),
                        group: Some("a".into()),
                        distances: BTreeMap::new(),
                    });
                client.number = client_number;
                (nodes, client)
            },
        )
    }

    proptest! {
        #[test]
        fn matches_the_rule_restated(
            (nodes, client) in five_nodes(),
            port in prop_oneof![Just(None), Just(Some(8080u16))],
        ) {
            let ordered = service_addresses(&client, &nodes, port);
            prop_assert_eq!(&ordered, &reference_order(&client, &nodes, port));
            // Every server's address exactly once.
            let mut got = ordered.clone();
            got.sort();
            let mut want: Vec<String> =
                nodes.iter().map(|n| with_port(&n.address, port)).collect();
            want.sort();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn the_order_of_the_input_does_not_matter(
            (nodes, client, shuffled) in five_nodes().prop_flat_map(|(nodes, client)| {
                (Just(nodes.clone()), Just(client), Just(nodes).prop_shuffle())
            }),
        ) {
            prop_assert_eq!(
                service_addresses(&client, &nodes, Some(1)),
                service_addresses(&client, &shuffled, Some(1))
            );
        }

        /// Over n*m consecutive client numbers, each of n equidistant servers is first m times.
        #[test]
        fn each_equidistant_server_is_first_for_an_equal_share(
            n in 1usize..8, m in 1u64..4, base in 0u64..1_000_000,
        ) {
            let input: Vec<Server> =
                (0..n).map(|i| server(&format!("s{i}"), 1, false)).collect();
            let mut first: BTreeMap<String, u64> = BTreeMap::new();
            for client in base..base + n as u64 * m {
                let ordered = order_addresses(client, &input);
                *first.entry(ordered[0].clone()).or_default() += 1;
            }
            prop_assert_eq!(first.len(), n);
            prop_assert!(first.values().all(|&c| c == m), "{:?}", first);
        }
    }
}

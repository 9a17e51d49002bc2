//! Property tests of the dependency graph: for random DAGs the derived orders respect every
//! edge; for random graphs a cycle is reported exactly when one exists, every reported cycle
//! is real, and every service on some cycle is named in a report.

use std::collections::VecDeque;

use ccmgr::graph::{EdgeKind, SequenceKind, ServiceGraph};
use proptest::prelude::*;

fn ids(n: usize) -> Vec<String> {
    // Names whose sort order differs from index order, so "ties by id" is really exercised.
    (0..n)
        .map(|i| format!("s{:03}-{i}", (i * 7919) % 1000))
        .collect()
}

/// Every kind of edge orders and closes cycles alike.
fn kind(k: u8) -> EdgeKind {
    match k % 4 {
        0 => EdgeKind::Requires,
        1 => EdgeKind::Wants,
        2 => EdgeKind::After,
        _ => EdgeKind::Before,
    }
}

/// A random DAG: every edge goes from a higher index to a lower one.
fn dag() -> impl Strategy<Value = (usize, Vec<(usize, usize, EdgeKind)>)> {
    (1usize..40).prop_flat_map(|n| {
        let edge = (1..n.max(2), any::<u16>(), any::<u8>()).prop_map(move |(a, b, k)| {
            let a = a.min(n - 1);
            (a, (b as usize) % a.max(1), kind(k))
        });
        let edges = if n < 2 {
            Just(Vec::new()).boxed()
        } else {
            proptest::collection::vec(edge, 0..(n * 3)).boxed()
        };
        (Just(n), edges)
    })
}

/// Any directed graph, self-loops included.
fn any_graph() -> impl Strategy<Value = (usize, Vec<(usize, usize, EdgeKind)>)> {
    (1usize..25).prop_flat_map(|n| {
        let edge = (0..n, 0..n, any::<u8>()).prop_map(|(a, b, k)| (a, b, kind(k)));
        (Just(n), proptest::collection::vec(edge, 0..(n * 2)))
    })
}

fn has_edge(edges: &[(usize, usize, EdgeKind)], a: usize, b: usize) -> bool {
    edges.iter().any(|&(x, y, _)| x == a && y == b)
}

/// Independent oracle: `v` lies on a cycle iff a path of one or more edges leads from v to v.
fn on_some_cycle(n: usize, edges: &[(usize, usize, EdgeKind)], v: usize) -> bool {
    let mut seen = vec![false; n];
    let mut queue = VecDeque::from([v]);
    while let Some(x) = queue.pop_front() {
        for &(a, b, _) in edges {
            if a == x {
                if b == v {
                    return true;
                }
                if !seen[b] {
                    seen[b] = true;
                    queue.push_back(b);
                }
            }
        }
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn startup_sequence_respects_every_edge((n, edges) in dag()) {
        let g = ServiceGraph::build(ids(n), &edges).expect("a DAG has no cycle");
        let order = g.startup_sequence();
        let mut pos = vec![usize::MAX; n];
        for (i, &s) in order.iter().enumerate() {
            prop_assert_eq!(pos[s], usize::MAX, "service {} appears twice", s);
            pos[s] = i;
        }
        prop_assert!(pos.iter().all(|&p| p != usize::MAX), "a service is missing");
        for &(dependent, dependency, _) in &edges {
            prop_assert!(pos[dependency] < pos[dependent]);
        }
        // The shutdown sequence is the reverse, and both pass the explicit-sequence check.
        let shutdown = g.shutdown_sequence();
        prop_assert!(g.check_sequence(SequenceKind::Startup, order).is_empty());
        prop_assert!(g.check_sequence(SequenceKind::Shutdown, &shutdown).is_empty());
    }

    #[test]
    fn no_level_holds_two_services_that_depend_on_each_other((n, edges) in dag()) {
        let g = ServiceGraph::build(ids(n), &edges).expect("a DAG has no cycle");
        let total: usize = g.levels().iter().map(Vec::len).sum();
        prop_assert_eq!(total, n);
        for &(dependent, dependency, _) in &edges {
            prop_assert!(g.level_of(dependency) < g.level_of(dependent));
        }
        for (level, services) in g.levels().iter().enumerate() {
            for &s in services {
                prop_assert_eq!(g.level_of(s), level);
            }
            // Within a level, services are sorted by id.
            let names: Vec<&str> = services.iter().map(|&s| g.id(s)).collect();
            let mut sorted = names.clone();
            sorted.sort();
            prop_assert_eq!(names, sorted);
        }
    }

    #[test]
    fn a_cycle_is_reported_iff_one_exists_and_every_report_is_real((n, edges) in any_graph()) {
        let cyclic: Vec<bool> = (0..n).map(|v| on_some_cycle(n, &edges, v)).collect();
        match ServiceGraph::build(ids(n), &edges) {
            Ok(_) => prop_assert!(cyclic.iter().all(|c| !c), "a cycle went unreported"),
            Err(cycles) => {
                prop_assert!(!cycles.is_empty());
                let mut named = vec![false; n];
                for cycle in &cycles {
                    let s = &cycle.services;
                    prop_assert!(!s.is_empty());
                    // Consecutive services are joined by edges, and the last leads back.
                    for w in 0..s.len() {
                        prop_assert!(has_edge(&edges, s[w], s[(w + 1) % s.len()]), "{:?} is not a cycle", s);
                    }
                    // A simple cycle visits no service twice.
                    let mut sorted = s.clone();
                    sorted.sort();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), s.len());
                    for &v in &cycle.knot {
                        prop_assert!(!named[v], "service {} is reported in two knots", v);
                        named[v] = true;
                    }
                    prop_assert!(s.iter().all(|v| cycle.knot.contains(v)));
                }
                // Every service that lies on a cycle is named, and nothing else is.
                prop_assert_eq!(named, cyclic);
            }
        }
    }
}

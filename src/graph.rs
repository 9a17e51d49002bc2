//! The dependency graph of a stack of services.
//!
//! This module owns the structure between services: the edges (`requires`, `wants`, `after`,
//! `before`), cycle detection through edges of every kind, the derived startup and shutdown sequences, the levels (services of one level
//! may start in parallel), the check of explicit sequences against the edges, and the
//! renderings of `ccmgr graph`. It knows services only by index and id; where they come from
//! is the config module's business.
//!
//! Edges point from a dependent to what it depends on (`web -> db`: web requires db), the
//! direction a reader says it in and Graphviz draws it. A `before` edge is declared by the
//! service that comes first (`x.toml: before = ["web"]`) but points the same way as every other
//! edge, from the one that waits to the one waited for (`web -> x`): orders, levels and cycles
//! treat it exactly as the mirrored `after`, and only the renderings and messages, which must
//! say where it was written, tell it apart.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write as _;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::Serialize;

/// How one service depends on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EdgeKind {
    /// Start after it is up; stopped and restarted with it.
    Requires,
    /// Start after it is up or has failed to start; its failure or absence neither fails nor
    /// stops the dependent (systemd's `Wants=`, dinit's `waits-for`).
    Wants,
    /// Ordering only, declared by the dependent (`after = [...]`).
    After,
    /// Ordering only, declared by the dependency (`before = [...]` in its file): the same
    /// order as the mirrored `after`.
    Before,
}

impl EdgeKind {
    /// The key that declares this kind of edge.
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Requires => "requires",
            EdgeKind::Wants => "wants",
            EdgeKind::After => "after",
            EdgeKind::Before => "before",
        }
    }

    /// The edge `dependent -> dependency` in words, the way its file says it: `web requires
    /// db`, `web wants cache`, `web after log`, and for `before`, written in the dependency's
    /// file, `x before web`.
    pub fn describe(self, dependent: &str, dependency: &str) -> String {
        match self {
            EdgeKind::Before => format!("{dependency} before {dependent}"),
            EdgeKind::Requires | EdgeKind::Wants | EdgeKind::After => {
                format!("{dependent} {} {dependency}", self.as_str())
            }
        }
    }

    /// Whether the edge is written in the dependent's file (else in the dependency's).
    pub fn declared_by_dependent(self) -> bool {
        match self {
            EdgeKind::Requires | EdgeKind::Wants | EdgeKind::After => true,
            EdgeKind::Before => false,
        }
    }
}

/// A dependency cycle: `services[0] -> services[1] -> ... -> services[0]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cycle {
    pub services: Vec<usize>,
    /// The kind of each edge on the cycle: `kinds[i]` is that of `services[i] ->
    /// services[i + 1]` (the last closes the cycle); where two kinds join the same pair, the
    /// first in [`EdgeKind`]'s order.
    pub kinds: Vec<EdgeKind>,
    /// Every service caught in the same knot (the strongly connected component), sorted by id;
    /// a superset of `services` when several cycles share services.
    pub knot: Vec<usize>,
}

/// Which explicit sequence a [`SequenceError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceKind {
    Startup,
    Shutdown,
}

impl SequenceKind {
    pub fn key(self) -> &'static str {
        match self {
            SequenceKind::Startup => "startup_sequence",
            SequenceKind::Shutdown => "shutdown_sequence",
        }
    }
}

/// An explicit sequence that contradicts an edge: it puts `early` before `late`, but the edge
/// `dependent -> dependency` forbids that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceError {
    pub kind: SequenceKind,
    pub dependent: usize,
    pub dependency: usize,
    pub edge: EdgeKind,
}

/// A checked, acyclic dependency graph and the orders derived from it.
#[derive(Clone, Debug)]
pub struct ServiceGraph {
    ids: Vec<String>,
    graph: DiGraph<usize, EdgeKind>,
    level_of: Vec<usize>,
    levels: Vec<Vec<usize>>,
    startup: Vec<usize>,
}

impl ServiceGraph {
    /// Builds the graph of services `ids` (index = service) with `edges` as
    /// `(dependent, dependency, kind)`. Every cycle is reported, one per knot of services that
    /// reach each other, as the shortest cycle through the knot's smallest id.
    pub fn build(ids: Vec<String>, edges: &[(usize, usize, EdgeKind)]) -> Result<Self, Vec<Cycle>> {
        let mut graph = DiGraph::with_capacity(ids.len(), edges.len());
        for i in 0..ids.len() {
            graph.add_node(i);
        }
        for &(dependent, dependency, kind) in edges {
            graph.add_edge(NodeIndex::new(dependent), NodeIndex::new(dependency), kind);
        }
        let cycles = find_cycles(&graph, &ids);
        if !cycles.is_empty() {
            return Err(cycles);
        }
        let (level_of, levels) = compute_levels(&graph, &ids);
        let startup = levels.iter().flatten().copied().collect();
        Ok(Self {
            ids,
            graph,
            level_of,
            levels,
            startup,
        })
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn id(&self, service: usize) -> &str {
        &self.ids[service]
    }

    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The derived startup sequence: level by level, by id within a level.
    pub fn startup_sequence(&self) -> &[usize] {
        &self.startup
    }

    /// The derived shutdown sequence: the startup sequence reversed.
    pub fn shutdown_sequence(&self) -> Vec<usize> {
        self.startup.iter().rev().copied().collect()
    }

    /// Services grouped by level: a service's level is one more than the highest level of
    /// anything it depends on, so nothing in a level depends on anything in the same level.
    pub fn levels(&self) -> &[Vec<usize>] {
        &self.levels
    }

    pub fn level_of(&self, service: usize) -> usize {
        self.level_of[service]
    }

    /// What `service` depends on, with the kind of each edge, by id.
    pub fn dependencies(&self, service: usize) -> Vec<(usize, EdgeKind)> {
        let mut deps: Vec<_> = self
            .graph
            .edges(NodeIndex::new(service))
            .map(|e| (e.target().index(), *e.weight()))
            .collect();
        deps.sort_by(|a, b| (&self.ids[a.0], a.1).cmp(&(&self.ids[b.0], b.1)));
        deps
    }

    /// What depends on `service` directly, with the kind of each edge, by id.
    pub fn dependents(&self, service: usize) -> Vec<(usize, EdgeKind)> {
        let mut deps: Vec<_> = self
            .graph
            .edges_directed(NodeIndex::new(service), petgraph::Direction::Incoming)
            .map(|e| (e.source().index(), *e.weight()))
            .collect();
        deps.sort_by(|a, b| (&self.ids[a.0], a.1).cmp(&(&self.ids[b.0], b.1)));
        deps
    }

    /// Every edge as `(dependent, dependency, kind)`, sorted by ids.
    pub fn edges(&self) -> Vec<(usize, usize, EdgeKind)> {
        let mut edges: Vec<_> = self
            .graph
            .edge_references()
            .map(|e| (e.source().index(), e.target().index(), *e.weight()))
            .collect();
        edges.sort_by(|a, b| {
            (&self.ids[a.0], &self.ids[a.1], a.2).cmp(&(&self.ids[b.0], &self.ids[b.1], b.2))
        });
        edges.dedup();
        edges
    }

    /// Checks an explicit order (a permutation of all services, already checked to be one)
    /// against every edge: a startup sequence must start a dependency before its dependent; a
    /// shutdown sequence must stop a dependent before its dependency.
    pub fn check_sequence(&self, kind: SequenceKind, order: &[usize]) -> Vec<SequenceError> {
        let mut position = vec![usize::MAX; self.ids.len()];
        for (pos, &service) in order.iter().enumerate() {
            position[service] = pos;
        }
        self.edges()
            .into_iter()
            .filter(|&(dependent, dependency, _)| match kind {
                SequenceKind::Startup => position[dependency] > position[dependent],
                SequenceKind::Shutdown => position[dependent] > position[dependency],
            })
            .map(|(dependent, dependency, edge)| SequenceError {
                kind,
                dependent,
                dependency,
                edge,
            })
            .collect()
    }

    /// Graphviz DOT: one node per service, `dependent -> dependency` edges labelled with their
    /// kind and drawn distinctly (`requires` solid, `wants` dashed with a hollow head, `after`
    /// dashed, `before` dotted), services of one level at one rank.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph ccmgr {\n    rankdir=BT;\n    node [shape=box];\n");
        for level in &self.levels {
            out.push_str("    { rank=same;");
            for &s in level {
                let _ = write!(out, " {};", dot_id(&self.ids[s]));
            }
            out.push_str(" }\n");
        }
        for (dependent, dependency, kind) in self.edges() {
            let style = match kind {
                EdgeKind::Requires => "",
                EdgeKind::Wants => ", style=dashed, arrowhead=empty",
                EdgeKind::After => ", style=dashed",
                EdgeKind::Before => ", style=dotted",
            };
            let _ = writeln!(
                out,
                "    {} -> {} [label=\"{}\"{style}];",
                dot_id(&self.ids[dependent]),
                dot_id(&self.ids[dependency]),
                kind.as_str()
            );
        }
        out.push_str("}\n");
        out
    }

    /// Plain text: one line per edge as its file says it (`web requires db`, `web wants cache`,
    /// `web after log`, `x before web`), then services with no edge at all.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut touched = vec![false; self.ids.len()];
        for (dependent, dependency, kind) in self.edges() {
            touched[dependent] = true;
            touched[dependency] = true;
            let _ = writeln!(
                out,
                "{}",
                kind.describe(&self.ids[dependent], &self.ids[dependency])
            );
        }
        let mut alone: Vec<_> = (0..self.ids.len()).filter(|&s| !touched[s]).collect();
        alone.sort_by(|&a, &b| self.ids[a].cmp(&self.ids[b]));
        for s in alone {
            let _ = writeln!(out, "{} (no dependencies)", self.ids[s]);
        }
        out
    }
}

fn dot_id(id: &str) -> String {
    // Ids are restricted to [A-Za-z0-9_.@-]; quoting makes `-`, `.` and `@` safe in DOT.
    format!("\"{id}\"")
}

/// One cycle per strongly connected component that holds one (a component of two or more
/// services, or a service that depends on itself).
fn find_cycles(graph: &DiGraph<usize, EdgeKind>, ids: &[String]) -> Vec<Cycle> {
    let mut cycles = Vec::new();
    for component in tarjan_scc(graph) {
        let is_cycle = component.len() > 1 || graph.contains_edge(component[0], component[0]);
        if !is_cycle {
            continue;
        }
        let mut knot: Vec<usize> = component.iter().map(|n| n.index()).collect();
        knot.sort_by(|&a, &b| ids[a].cmp(&ids[b]));
        let start = knot[0];
        let services = shortest_cycle_through(graph, ids, start, &knot);
        let kinds = (0..services.len())
            .map(|i| {
                let (from, to) = (services[i], services[(i + 1) % services.len()]);
                graph
                    .edges_connecting(NodeIndex::new(from), NodeIndex::new(to))
                    .map(|e| *e.weight())
                    .min()
                    .expect("consecutive services of a cycle are joined by an edge")
            })
            .collect();
        cycles.push(Cycle {
            services,
            kinds,
            knot,
        });
    }
    cycles.sort_by(|a, b| ids[a.services[0]].cmp(&ids[b.services[0]]));
    cycles
}

/// Breadth-first search from `start` back to itself, staying inside the knot; neighbours are
/// visited by id so the cycle reported is always the same one.
fn shortest_cycle_through(
    graph: &DiGraph<usize, EdgeKind>,
    ids: &[String],
    start: usize,
    knot: &[usize],
) -> Vec<usize> {
    let mut in_knot = vec![false; ids.len()];
    for &s in knot {
        in_knot[s] = true;
    }
    let mut parent: Vec<Option<usize>> = vec![None; ids.len()];
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        let mut next: Vec<usize> = graph
            .neighbors(NodeIndex::new(node))
            .map(|n| n.index())
            .filter(|&n| in_knot[n])
            .collect();
        next.sort_by(|&a, &b| ids[a].cmp(&ids[b]));
        next.dedup();
        for n in next {
            if n == start {
                // Walk back from `node` to `start` (the only node without a parent); the
                // edge node -> start closes the cycle.
                let mut path = vec![node];
                let mut cur = node;
                while let Some(p) = parent[cur] {
                    path.push(p);
                    cur = p;
                }
                path.reverse();
                return path;
            }
            if parent[n].is_none() && n != start {
                parent[n] = Some(node);
                queue.push_back(n);
            }
        }
    }
    unreachable!("every service of a strongly connected component lies on a cycle through it")
}

/// Kahn's algorithm over dependency counts, taking services by id; returns each service's
/// level and the services of each level in id order.
fn compute_levels(
    graph: &DiGraph<usize, EdgeKind>,
    ids: &[String],
) -> (Vec<usize>, Vec<Vec<usize>>) {
    let n = ids.len();
    let mut pending_deps = vec![0usize; n];
    for e in graph.edge_references() {
        pending_deps[e.source().index()] += 1;
    }
    let mut level_of = vec![0usize; n];
    let mut ready: BinaryHeap<Reverse<(usize, &str, usize)>> = (0..n)
        .filter(|&s| pending_deps[s] == 0)
        .map(|s| Reverse((0, ids[s].as_str(), s)))
        .collect();
    let mut levels: Vec<Vec<usize>> = Vec::new();
    while let Some(Reverse((level, _, s))) = ready.pop() {
        if levels.len() <= level {
            levels.push(Vec::new());
        }
        levels[level].push(s);
        for e in graph.edges_directed(NodeIndex::new(s), petgraph::Direction::Incoming) {
            let dependent = e.source().index();
            level_of[dependent] = level_of[dependent].max(level + 1);
            pending_deps[dependent] -= 1;
            if pending_deps[dependent] == 0 {
                ready.push(Reverse((
                    level_of[dependent],
                    ids[dependent].as_str(),
                    dependent,
                )));
            }
        }
    }
    (level_of, levels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use EdgeKind::*;

    fn graph(ids: &[&str], edges: &[(&str, &str, EdgeKind)]) -> Result<ServiceGraph, Vec<Cycle>> {
        let idx = |id: &str| ids.iter().position(|i| *i == id).unwrap();
        let edges: Vec<_> = edges.iter().map(|&(a, b, k)| (idx(a), idx(b), k)).collect();
        ServiceGraph::build(ids.iter().map(|s| s.to_string()).collect(), &edges)
    }

    fn names(g: &ServiceGraph, order: &[usize]) -> Vec<String> {
        order.iter().map(|&s| g.id(s).to_owned()).collect()
    }

    #[test]
    fn levels_and_sequences() {
        let g = graph(
            &["web", "db", "log", "cache", "api"],
            &[
                ("web", "api", Requires),
                ("api", "db", Requires),
                ("api", "cache", After),
                ("db", "log", After),
            ],
        )
        .unwrap();
        assert_eq!(
            names(&g, g.startup_sequence()),
            ["cache", "log", "db", "api", "web"]
        );
        assert_eq!(
            names(&g, &g.shutdown_sequence()),
            ["web", "api", "db", "log", "cache"]
        );
        let levels: Vec<_> = g.levels().iter().map(|l| names(&g, l)).collect();
        assert_eq!(
            levels,
            [vec!["cache", "log"], vec!["db"], vec!["api"], vec!["web"]]
        );
    }

    #[test]
    fn cycle_reported_in_order_from_smallest_id() {
        let cycles = graph(
            &["c", "a", "b"],
            &[
                ("a", "b", Requires),
                ("b", "c", After),
                ("c", "a", Requires),
            ],
        )
        .unwrap_err();
        assert_eq!(cycles.len(), 1);
        assert_eq!(cycles[0].services, [1, 2, 0]);
    }

    #[test]
    fn self_loop_is_a_cycle() {
        let cycles = graph(&["a"], &[("a", "a", Requires)]).unwrap_err();
        assert_eq!(cycles[0].services, [0]);
    }

    #[test]
    fn explicit_sequences_are_checked_against_edges() {
        let g = graph(&["a", "b"], &[("b", "a", Requires)]).unwrap();
        assert!(g.check_sequence(SequenceKind::Startup, &[0, 1]).is_empty());
        assert_eq!(g.check_sequence(SequenceKind::Startup, &[1, 0]).len(), 1);
        assert!(g.check_sequence(SequenceKind::Shutdown, &[1, 0]).is_empty());
        assert_eq!(g.check_sequence(SequenceKind::Shutdown, &[0, 1]).len(), 1);
    }

    #[test]
    fn cycles_go_through_every_kind_of_edge_and_name_each() {
        // a wants b, b after c, and `a before c` (written in a's file) is the edge c -> a:
        // the knot a -> b -> c -> a mixes three kinds.
        let cycles = graph(
            &["a", "b", "c"],
            &[("a", "b", Wants), ("b", "c", After), ("c", "a", Before)],
        )
        .unwrap_err();
        assert_eq!(cycles.len(), 1);
        assert_eq!(cycles[0].services, [0, 1, 2]);
        assert_eq!(cycles[0].kinds, [Wants, After, Before]);
        assert_eq!(Before.describe("c", "a"), "a before c");
        // Two kinds joining one pair: the cycle names the first (requires).
        let cycles = graph(
            &["a", "b"],
            &[("a", "b", Wants), ("a", "b", Requires), ("b", "a", Before)],
        )
        .unwrap_err();
        assert_eq!(cycles[0].kinds, [Requires, Before]);
    }

    #[test]
    fn before_orders_as_the_mirrored_after() {
        let mirrored = graph(&["web", "x"], &[("web", "x", Before)]).unwrap();
        let after = graph(&["web", "x"], &[("web", "x", After)]).unwrap();
        assert_eq!(mirrored.startup_sequence(), after.startup_sequence());
        assert_eq!(names(&mirrored, mirrored.startup_sequence()), ["x", "web"]);
        assert_eq!(mirrored.shutdown_sequence(), after.shutdown_sequence());
        assert_eq!(mirrored.levels(), after.levels());
    }

    #[test]
    fn each_kind_is_drawn_distinctly() {
        let g = graph(
            &["db", "cache", "log", "web", "x"],
            &[
                ("web", "db", Requires),
                ("web", "cache", Wants),
                ("web", "log", After),
                ("web", "x", Before),
            ],
        )
        .unwrap();
        assert_eq!(
            g.to_text(),
            "web wants cache\nweb requires db\nweb after log\nx before web\n"
        );
        let dot = g.to_dot();
        for line in [
            "\"web\" -> \"db\" [label=\"requires\"];",
            "\"web\" -> \"cache\" [label=\"wants\", style=dashed, arrowhead=empty];",
            "\"web\" -> \"log\" [label=\"after\", style=dashed];",
            "\"web\" -> \"x\" [label=\"before\", style=dotted];",
        ] {
            assert!(dot.contains(line), "{line} in {dot}");
        }
    }

    #[test]
    fn renderings() {
        let g = graph(&["a", "b", "c"], &[("b", "a", Requires), ("b", "a", After)]).unwrap();
        assert_eq!(
            g.to_text(),
            "b requires a\nb after a\nc (no dependencies)\n"
        );
        let dot = g.to_dot();
        assert!(
            dot.contains("\"b\" -> \"a\" [label=\"requires\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("\"b\" -> \"a\" [label=\"after\", style=dashed];"),
            "{dot}"
        );
    }
}

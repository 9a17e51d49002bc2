//! The dependency graph of a stack of services.
//!
//! This module owns the structure between services: the edges (`requires`, `after`), cycle
//! detection, the derived startup and shutdown sequences, the levels (services of one level
//! may start in parallel), the check of explicit sequences against the edges, and the
//! renderings of `ccmgr graph`. It knows services only by index and id; where they come from
//! is the config module's business.
//!
//! Edges point from a dependent to what it depends on (`web -> db`: web requires db), the
//! direction a reader says it in and Graphviz draws it.

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
    /// Ordering only.
    After,
}

impl EdgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Requires => "requires",
            EdgeKind::After => "after",
        }
    }
}

/// A dependency cycle: `services[0] -> services[1] -> ... -> services[0]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cycle {
    pub services: Vec<usize>,
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
    /// kind (`after` dashed), services of one level at one rank.
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
                EdgeKind::After => ", style=dashed",
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

    /// Plain text: one line per edge (`web requires db`), then services with no edge at all.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut touched = vec![false; self.ids.len()];
        for (dependent, dependency, kind) in self.edges() {
            touched[dependent] = true;
            touched[dependency] = true;
            let _ = writeln!(
                out,
                "{} {} {}",
                self.ids[dependent],
                kind.as_str(),
                self.ids[dependency]
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
        cycles.push(Cycle { services, knot });
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

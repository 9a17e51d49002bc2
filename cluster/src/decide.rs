//! The manager's decisions, as a pure function of the cluster's view and the time: which
//! service goes to which node, when it waits for the cluster to mature, when it moves
//! (a graceful leave, `cluster move`, a failback to a preferred node), and what a node that
//! left without saying so leaves to recover. Seed 001's registration and launch service.
//!
//! Nothing here talks to etcd: the agent applies each [`ServiceChange`] as one
//! compare-and-swap on the record's revision, guarded by the manager's fencing token, so a
//! decision taken on a stale view is refused and taken again on the fresh one. The agents'
//! own transitions (a start done, a stop done, a recovery done) are [`agent_transition`],
//! pure too. That is the seam on which seed 001's Tables 2 and 3 are played in virtual time
//! (the tests below); `cluster/tests/` plays them again with real agents and a real etcd.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::record::{
    Instance, InstanceState, MemberState, NodeLife, RequestKind, ServiceRecord, View,
};
use crate::spec::{ClusterServiceSpec, Placement, TransferCost};

/// One service's new record, to be written if the record is still at `expect_revision`
/// (0: it does not exist yet).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceChange {
    pub service: String,
    pub record: ServiceRecord,
    pub expect_revision: i64,
    /// Requests this change carries out: deleted in the same transaction.
    pub consumed: Vec<(RequestKind, String)>,
    pub events: Vec<Value>,
}

/// The manager's plan: changes to write, and when to look again if nothing happens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub changes: Vec<ServiceChange>,
    /// The earliest time (unix ms) a decision depends on (a maturity time running out).
    pub wake_at_ms: Option<u64>,
}

/// What the manager decides now for every service it has a specification of.
pub fn manager_plan(
    view: &View,
    specs: &BTreeMap<String, ClusterServiceSpec>,
    now_ms: u64,
) -> Plan {
    let mut plan = Plan::default();
    // How many instances each node holds (every service): the least loaded allowable node
    // is chosen when no preference decides, and the count follows this plan's own choices.
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for rec in view.services.values() {
        for node in rec.value.instances.keys() {
            *load.entry(node.clone()).or_default() += 1;
        }
    }
    for (name, spec) in specs {
        let (old, expect_revision) = match view.services.get(name) {
            Some(v) => (v.value.clone(), v.mod_revision),
            None => (ServiceRecord::new(spec.auto_start), 0),
        };
        let mut rec = old.clone();
        let mut pass = Pass {
            view,
            spec,
            now_ms,
            load: &mut load,
            events: Vec::new(),
            consumed: Vec::new(),
            wake_at: &mut plan.wake_at_ms,
        };
        decide_service(&mut pass, &mut rec);
        let Pass {
            events, consumed, ..
        } = pass;
        if rec != old || expect_revision == 0 || !consumed.is_empty() {
            plan.changes.push(ServiceChange {
                service: name.clone(),
                record: rec,
                expect_revision,
                consumed,
                events,
            });
        }
    }
    plan
}

/// One service's decision within a manager's pass: what it reads, and what it adds to the
/// plan (the nodes' load and the earliest wake-up are the whole pass's).
struct Pass<'a> {
    view: &'a View,
    spec: &'a ClusterServiceSpec,
    now_ms: u64,
    load: &'a mut BTreeMap<String, usize>,
    events: Vec<Value>,
    consumed: Vec<(RequestKind, String)>,
    wake_at: &'a mut Option<u64>,
}

/// The nodes a service may be placed on now: up (not leaving), allowed by its lists, and not
/// among those whose start failed.
fn candidates<'v>(view: &'v View, spec: &ClusterServiceSpec, rec: &ServiceRecord) -> Vec<&'v str> {
    view.members
        .values()
        .filter(|m| {
            m.value.state == MemberState::Up
                && spec.allows(&m.value.name)
                && rec.failed_nodes.get(&m.value.name).copied() != view.life(&m.value.name)
        })
        .map(|m| m.value.name.as_str())
        .collect()
}

/// Seed 001's choosing: the transfer's target if it may take it; else the first of the
/// ordered preferred nodes that may; else the least loaded, the lowest node number first.
fn choose(
    view: &View,
    spec: &ClusterServiceSpec,
    target: Option<&str>,
    candidates: &[&str],
    load: &BTreeMap<String, usize>,
) -> Option<String> {
    if let Some(t) = target.filter(|t| candidates.contains(t)) {
        return Some(t.to_owned());
    }
    if let Some(p) = spec
        .preferred_nodes
        .iter()
        .find(|p| candidates.contains(&p.as_str()))
    {
        return Some(p.clone());
    }
    candidates
        .iter()
        .min_by_key(|n| {
            (
                load.get(**n).copied().unwrap_or(0),
                view.members.get(**n).map_or(u32::MAX, |m| m.value.number),
            )
        })
        .map(|n| (*n).to_owned())
}

/// Seed 001's maturity: at least one allowable node is up, and the primary (first preferred)
/// node is up, or `maturity_count` allowable nodes are, or `maturity_time` has gone by since
/// the service began to wait.
fn mature(view: &View, spec: &ClusterServiceSpec, rec: &ServiceRecord, now_ms: u64) -> bool {
    let up_allowed = view
        .members
        .values()
        .filter(|m| m.value.state == MemberState::Up && spec.allows(&m.value.name))
        .count();
    if up_allowed == 0 {
        return false;
    }
    let primary_up = spec
        .preferred_nodes
        .first()
        .is_some_and(|p| view.up(p) && spec.allows(p));
    let enough = spec.maturity_count > 0 && up_allowed >= spec.maturity_count as usize;
    let waited = spec.maturity_time_ms > 0
        && rec
            .awaiting_maturity_since_ms
            .is_some_and(|since| now_ms >= since.saturating_add(spec.maturity_time_ms));
    primary_up || enough || waited
}

fn service_event(service: &str, rec: &ServiceRecord, node: Option<&str>, why: &str) -> Value {
    json!({
        "event": "service",
        "service": service,
        "state": rec.summary(),
        "node": node,
        "transfer_intent": rec.transfer_intent,
        "awaiting_maturity": rec.awaiting_maturity_since_ms.is_some(),
        "why": why,
    })
}

fn decide_service(p: &mut Pass, rec: &mut ServiceRecord) {
    let (view, spec) = (p.view, p.spec);
    let name = spec.name.as_str();
    // Operators' requests.
    if view
        .requests
        .contains_key(&(RequestKind::Stop, name.to_owned()))
    {
        p.consumed.push((RequestKind::Stop, name.to_owned()));
        if rec.wanted {
            rec.wanted = false;
            rec.last = "de-registration asked (cluster stop)".into();
        }
    }
    if view
        .requests
        .contains_key(&(RequestKind::Start, name.to_owned()))
    {
        p.consumed.push((RequestKind::Start, name.to_owned()));
        rec.wanted = true;
        rec.failed_nodes.clear();
        rec.last = "registration asked (cluster start)".into();
    }

    // A failed start excludes a node for that life of it only.
    rec.failed_nodes
        .retain(|node, life| view.life(node).is_none_or(|now| now == *life));

    // A node that left without a graceful leave (its lease ended): seed 001's recovery.
    let dead: Vec<(String, Instance)> = rec
        .instances
        .iter()
        .filter(|(node, inst)| !view.alive(node, inst.lease))
        .map(|(n, i)| (n.clone(), i.clone()))
        .collect();
    for (node, inst) in dead {
        rec.instances.remove(&node);
        *p.load.entry(node.clone()).or_default() =
            p.load.get(&node).copied().unwrap_or(1).saturating_sub(1);
        rec.transfer_intent = false;
        match inst.state {
            InstanceState::Registered | InstanceState::Stopping
                if spec.recovery_command.is_some() =>
            {
                let cands = candidates(view, spec, &ServiceRecord::new(true));
                if let Some(runner) = choose(view, spec, None, &cands, p.load) {
                    let lease = view.members[&runner].value.lease;
                    rec.instances.insert(
                        runner.clone(),
                        Instance {
                            state: InstanceState::Recovering,
                            epoch: rec.next_epoch,
                            lease,
                            recovering_for: Some(node.clone()),
                        },
                    );
                    rec.next_epoch += 1;
                    rec.last =
                        format!("{node} left the cluster ungracefully: recovering on {runner}");
                    p.events
                        .push(service_event(name, rec, Some(&runner), &rec.last.clone()));
                    continue;
                }
                rec.last = format!(
                    "{node} left the cluster ungracefully; no node may run its recovery_command"
                );
            }
            InstanceState::Recovering => {
                rec.last = format!(
                    "{node}, which ran the recovery for {}, left too",
                    inst.recovering_for.as_deref().unwrap_or("?")
                );
            }
            _ => {
                rec.last = format!(
                    "{node} left the cluster ungracefully ({})",
                    inst.state.as_str()
                );
            }
        }
        p.events
            .push(service_event(name, rec, None, &rec.last.clone()));
    }

    match spec.placement {
        Placement::One => decide_one(p, rec),
        Placement::All => decide_all(p, rec),
    }
}

/// Whether the maturity gate lets a first placement through; records the wait.
fn maturity_gate(p: &mut Pass, rec: &mut ServiceRecord) -> bool {
    let (view, spec, now_ms) = (p.view, p.spec, p.now_ms);
    if !spec.maturity_applies() || rec.matured {
        return true;
    }
    if mature(view, spec, rec, now_ms) {
        rec.matured = true;
        rec.awaiting_maturity_since_ms = None;
        return true;
    }
    let any_allowed_up = view
        .members
        .values()
        .any(|m| m.value.state == MemberState::Up && spec.allows(&m.value.name));
    if any_allowed_up && rec.awaiting_maturity_since_ms.is_none() {
        rec.awaiting_maturity_since_ms = Some(now_ms);
        rec.last = "awaiting cluster maturity".into();
        p.events.push(service_event(
            &spec.name,
            rec,
            None,
            "awaiting cluster maturity",
        ));
    }
    if let Some(since) = rec.awaiting_maturity_since_ms
        && spec.maturity_time_ms > 0
    {
        let at = since.saturating_add(spec.maturity_time_ms);
        *p.wake_at = Some(p.wake_at.map_or(at, |w| w.min(at)));
    }
    false
}

fn decide_one(p: &mut Pass, rec: &mut ServiceRecord) {
    let (view, spec) = (p.view, p.spec);
    let name = spec.name.as_str();
    let move_request = view
        .requests
        .get(&(RequestKind::Move, name.to_owned()))
        .map(|r| r.value.clone());
    if let Some(to) = &move_request {
        p.consumed.push((RequestKind::Move, name.to_owned()));
        if !(view.up(to) && spec.allows(to)) {
            rec.last = format!("move to {to} refused: {to} is not up or not allowable");
            p.events
                .push(service_event(name, rec, None, &rec.last.clone()));
        } else {
            rec.failed_nodes.remove(to);
            rec.target = Some(to.clone());
        }
    }

    // Registered on one node only: more instances than one (the service was `placement =
    // "all"` before, or another manager's cluster.d said so) are stopped but the one on the
    // best preferred node, and the work waits for them.
    if rec.instances.len() > 1 {
        let keep = rec
            .instances
            .iter()
            .filter(|(_, i)| i.state == InstanceState::Registered)
            .min_by_key(|(n, _)| spec.preference(n).unwrap_or(usize::MAX))
            .map(|(n, _)| n.clone());
        let extra: Vec<String> = rec
            .instances
            .iter()
            .filter(|(n, i)| i.state == InstanceState::Registered && Some(*n) != keep.as_ref())
            .map(|(n, _)| n.clone())
            .collect();
        for n in extra {
            rec.instances.get_mut(&n).expect("the instance").state = InstanceState::Stopping;
            rec.last = format!("stopping on {n}: registered on one node only");
            p.events
                .push(service_event(name, rec, Some(&n), &rec.last.clone()));
        }
        return;
    }
    let Some((node, inst)) = rec
        .instances
        .iter()
        .next()
        .map(|(n, i)| (n.clone(), i.clone()))
    else {
        // De-registered: place it, if wanted, mature, and a node may take it.
        if !rec.wanted {
            rec.target = None;
            if rec.transfer_intent {
                rec.transfer_intent = false;
                p.events
                    .push(service_event(name, rec, None, "de-registered"));
            }
            return;
        }
        let cands = candidates(view, spec, rec);
        if cands.is_empty() {
            if rec.transfer_intent {
                // Seed 001 Table 2, t13: the last allowable node left gracefully.
                rec.transfer_intent = false;
                rec.target = None;
                rec.last = if rec.failed_nodes.is_empty() {
                    "de-registered: no allowable node is up".into()
                } else {
                    format!(
                        "de-registered: its start failed on {}",
                        rec.failed_nodes
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                p.events
                    .push(service_event(name, rec, None, &rec.last.clone()));
            } else if !rec.failed_nodes.is_empty() {
                let last = format!(
                    "de-registered: its start failed on every allowable node that is up ({})",
                    rec.failed_nodes
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if rec.last != last {
                    rec.last = last;
                    p.events
                        .push(service_event(name, rec, None, &rec.last.clone()));
                }
            }
            return;
        }
        if !maturity_gate(p, rec) {
            return;
        }
        let Some(chosen) = choose(view, spec, rec.target.as_deref(), &cands, p.load) else {
            return;
        };
        let lease = view.members[&chosen].value.lease;
        rec.instances.insert(
            chosen.clone(),
            Instance {
                state: InstanceState::Starting,
                epoch: rec.next_epoch,
                lease,
                recovering_for: None,
            },
        );
        rec.next_epoch += 1;
        rec.target = None;
        *p.load.entry(chosen.clone()).or_default() += 1;
        rec.last = format!("starting on {chosen}");
        p.events
            .push(service_event(name, rec, Some(&chosen), &rec.last.clone()));
        return;
    };

    if inst.state != InstanceState::Registered {
        return; // the node's agent is at work: starting, stopping or recovering
    }
    let why = if !rec.wanted {
        Some(("de-registration asked".to_owned(), false))
    } else if view
        .members
        .get(&node)
        .is_some_and(|m| m.value.state == MemberState::Leaving)
    {
        Some((
            format!("{node} leaves the cluster gracefully: transferring"),
            true,
        ))
    } else if let Some(to) = rec.target.clone().filter(|t| *t != node) {
        Some((format!("moving to {to} (cluster move)"), true))
    } else if spec.transfer_cost == TransferCost::Free {
        // Failback: a preferred node ranked above the current one is up again.
        let current_rank = spec.preference(&node).unwrap_or(usize::MAX);
        let cands = candidates(view, spec, rec);
        spec.preferred_nodes
            .iter()
            .take(current_rank)
            .find(|p| cands.contains(&p.as_str()))
            .map(|p| {
                rec.target = Some(p.clone());
                (format!("failback to the preferred node {p}"), true)
            })
    } else {
        None
    };
    if let Some((why, transfer)) = why {
        if rec.target.as_deref() == Some(node.as_str()) {
            rec.target = None;
        }
        rec.transfer_intent = transfer;
        rec.instances.get_mut(&node).expect("the instance").state = InstanceState::Stopping;
        rec.last = why;
        p.events
            .push(service_event(name, rec, Some(&node), &rec.last.clone()));
    }
}

fn decide_all(p: &mut Pass, rec: &mut ServiceRecord) {
    let (view, spec) = (p.view, p.spec);
    let name = spec.name.as_str();
    // Stop what must stop: not wanted, or its node leaves.
    let to_stop: Vec<String> = rec
        .instances
        .iter()
        .filter(|(node, inst)| {
            inst.state == InstanceState::Registered
                && (!rec.wanted
                    || view
                        .members
                        .get(*node)
                        .is_some_and(|m| m.value.state == MemberState::Leaving))
        })
        .map(|(n, _)| n.clone())
        .collect();
    for node in to_stop {
        rec.instances.get_mut(&node).expect("the instance").state = InstanceState::Stopping;
        rec.last = format!("stopping on {node}");
        p.events
            .push(service_event(name, rec, Some(&node), &rec.last.clone()));
    }
    if !rec.wanted {
        return;
    }
    let cands: Vec<String> = candidates(view, spec, rec)
        .into_iter()
        .filter(|n| !rec.instances.contains_key(*n))
        .map(str::to_owned)
        .collect();
    if cands.is_empty() || !maturity_gate(p, rec) {
        return;
    }
    for node in cands {
        let lease = view.members[&node].value.lease;
        rec.instances.insert(
            node.clone(),
            Instance {
                state: InstanceState::Starting,
                epoch: rec.next_epoch,
                lease,
                recovering_for: None,
            },
        );
        rec.next_epoch += 1;
        *p.load.entry(node.clone()).or_default() += 1;
        rec.last = format!("starting on {node}");
        p.events
            .push(service_event(name, rec, Some(&node), &rec.last.clone()));
    }
}

/// What an agent reports of the work it did on its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The start succeeded: registered.
    Started,
    /// The start failed (or the registered service failed for good on the node).
    Failed(String),
    /// The stop (or the recovery command) is done: the instance is gone.
    Done,
}

/// The record after `node`'s agent finished its work on the instance of `epoch`; `None`
/// when the record no longer holds that instance (the report is stale: nothing to write).
pub fn agent_transition(
    service: &str,
    rec: &ServiceRecord,
    node: &str,
    life: NodeLife,
    epoch: u64,
    outcome: &Outcome,
) -> Option<(ServiceRecord, Value)> {
    let inst = rec.instances.get(node).filter(|i| i.epoch == epoch)?;
    let mut new = rec.clone();
    let why = match (inst.state, outcome) {
        (InstanceState::Starting, Outcome::Started) => {
            let i = new.instances.get_mut(node).expect("the instance");
            i.state = InstanceState::Registered;
            new.transfer_intent = false;
            // A move asked while it was starting (to another node) still stands.
            if new.target.as_deref() == Some(node) {
                new.target = None;
            }
            format!("registered on {node}")
        }
        (InstanceState::Starting | InstanceState::Registered, Outcome::Failed(reason)) => {
            new.instances.remove(node);
            new.failed_nodes.insert(node.to_owned(), life);
            format!("failed on {node}: {reason}")
        }
        (InstanceState::Stopping, Outcome::Done | Outcome::Failed(_)) => {
            new.instances.remove(node);
            format!("stopped on {node}")
        }
        (InstanceState::Recovering, Outcome::Done | Outcome::Failed(_)) => {
            new.instances.remove(node);
            match outcome {
                Outcome::Failed(reason) => format!(
                    "recovery for {} on {node} failed: {reason}",
                    inst.recovering_for.as_deref().unwrap_or("?")
                ),
                _ => format!(
                    "recovered on {node} for {}",
                    inst.recovering_for.as_deref().unwrap_or("?")
                ),
            }
        }
        _ => return None,
    };
    new.last = why.clone();
    let node_field = new.instances.contains_key(node).then_some(node);
    let event = service_event(service, &new, node_field.or(Some(node)), &why);
    Some((new, event))
}

#[cfg(test)]
mod tests {
    //! Seed 001's Tables 2 and 3, in virtual time: the manager's plan is applied at once,
    //! the agents' work completes when the test says so.
    use super::*;
    use crate::record::{Keys, Member, Versioned};

    fn spec(name: &str) -> ClusterServiceSpec {
        ClusterServiceSpec {
            name: name.into(),
            source: format!("cluster.d/{name}.toml").into(),
            allowable_nodes: vec!["*".into()],
            disallowable_nodes: vec![],
            preferred_nodes: vec![],
            placement: Placement::One,
            maturity_count: 0,
            maturity_time_ms: 0,
            transfer_cost: TransferCost::Expensive,
            notify_command: None,
            recovery_command: None,
            auto_start: true,
            port: None,
            local_toml: String::new(),
        }
    }

    struct Sim {
        view: View,
        specs: BTreeMap<String, ClusterServiceSpec>,
        now: u64,
        rev: i64,
        keys: Keys,
    }

    impl Sim {
        fn new(specs: Vec<ClusterServiceSpec>) -> Sim {
            Sim {
                view: View::default(),
                specs: specs.into_iter().map(|s| (s.name.clone(), s)).collect(),
                now: 1_000_000,
                rev: 1,
                keys: Keys::new("t"),
            }
        }
        fn boot(&mut self, node: &str, number: u32) {
            self.rev += 1;
            let lease = 100 + self.rev;
            let m = Member {
                name: node.into(),
                number,
                address: "127.0.0.1".into(),
                may_manage: true,
                state: MemberState::Up,
                group: None,
                distances: BTreeMap::new(),
                lease,
                joined_unix_ms: self.now,
                local_generation: 0,
            };
            self.view.members.insert(
                node.into(),
                Versioned {
                    value: m,
                    mod_revision: self.rev,
                    create_revision: self.rev,
                },
            );
            self.settle();
        }
        fn begin_leave(&mut self, node: &str) {
            self.view.members.get_mut(node).unwrap().value.state = MemberState::Leaving;
            self.settle();
        }
        fn gone(&mut self, node: &str) {
            self.view.members.remove(node);
            self.settle();
        }
        fn elapse(&mut self, ms: u64) {
            self.now += ms;
            self.settle();
        }
        /// The manager plans until it has nothing more to change.
        fn settle(&mut self) {
            for _ in 0..10 {
                let plan = manager_plan(&self.view, &self.specs, self.now);
                if plan.changes.iter().all(|c| {
                    c.expect_revision != 0 && {
                        let old = &self.view.services[&c.service].value;
                        *old == c.record
                    }
                }) {
                    return;
                }
                for c in plan.changes {
                    self.rev += 1;
                    let k = self.keys.service(&c.service);
                    let v = serde_json::to_vec(&c.record).unwrap();
                    self.view
                        .apply(&self.keys, &k, Some(&v), self.rev, self.rev);
                    for (kind, name) in c.consumed {
                        self.view.requests.remove(&(kind, name));
                    }
                }
            }
            panic!("the manager does not settle");
        }
        /// `node`'s agent finishes its work on service `s` with `outcome`.
        fn agent(&mut self, s: &str, node: &str, outcome: Outcome) {
            let rec = self.view.services[s].value.clone();
            let epoch = rec.instances[node].epoch;
            let life = self.view.life(node).expect("a member");
            let (new, _) =
                agent_transition(s, &rec, node, life, epoch, &outcome).expect("a transition");
            self.rev += 1;
            let v = serde_json::to_vec(&new).unwrap();
            self.view.apply(
                &self.keys,
                &self.keys.service(s),
                Some(&v),
                self.rev,
                self.rev,
            );
            self.settle();
        }
        fn rec(&self, s: &str) -> &ServiceRecord {
            &self.view.services[s].value
        }
        /// (summary, flags, the node holding an instance and its state)
        fn row(&self, s: &str) -> (String, String, Option<(String, &'static str)>) {
            let r = self.rec(s);
            let mut flags = String::new();
            if r.awaiting_maturity_since_ms.is_some() {
                flags.push('M');
            }
            if r.transfer_intent {
                flags.push('T');
            }
            let inst = r
                .instances
                .iter()
                .next()
                .map(|(n, i)| (n.clone(), i.state.as_str()));
            (r.summary().to_owned(), flags, inst)
        }
    }

    fn at(node: &str, state: &'static str) -> Option<(String, &'static str)> {
        Some((node.to_owned(), state))
    }

    #[test]
    fn seed_001_table_2_plays_out_in_virtual_time() {
        let mut s = spec("svc");
        s.allowable_nodes = vec!["N0".into(), "N1".into()];
        s.maturity_count = 2;
        s.maturity_time_ms = 5 * 60 * 1000;
        let mut sim = Sim::new(vec![s]);
        sim.settle();
        assert_eq!(sim.row("svc"), ("deregistered".into(), "".into(), None)); // t0
        sim.boot("N2", 2); // t1: not allowable, nothing
        assert_eq!(sim.row("svc"), ("deregistered".into(), "".into(), None));
        sim.boot("N0", 0); // t2: awaiting maturity
        assert_eq!(sim.row("svc"), ("deregistered".into(), "M".into(), None));
        sim.elapse(5 * 60 * 1000 - 1);
        assert_eq!(sim.row("svc").1, "M");
        sim.elapse(1); // t3: 5 minutes elapse: starting on N0
        assert_eq!(
            sim.row("svc"),
            ("starting".into(), "".into(), at("N0", "starting"))
        );
        sim.agent("svc", "N0", Outcome::Started); // t4
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N0", "registered"))
        );
        sim.boot("N1", 1); // t5: no change
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N0", "registered"))
        );
        sim.begin_leave("N2");
        sim.gone("N2"); // t6: no change
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N0", "registered"))
        );
        sim.begin_leave("N0"); // t7: stopping, transfer intent
        assert_eq!(
            sim.row("svc"),
            ("stopping".into(), "T".into(), at("N0", "stopping"))
        );
        // t8 (stop completes) and t9 (starting on N1) are one step for the manager, which
        // acts on the de-registration at once.
        sim.agent("svc", "N0", Outcome::Done);
        assert_eq!(
            sim.row("svc"),
            ("starting".into(), "T".into(), at("N1", "starting"))
        );
        sim.agent("svc", "N1", Outcome::Started); // t10
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N1", "registered"))
        );
        sim.gone("N0"); // t11
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N1", "registered"))
        );
        sim.begin_leave("N1"); // t12
        assert_eq!(
            sim.row("svc"),
            ("stopping".into(), "T".into(), at("N1", "stopping"))
        );
        sim.agent("svc", "N1", Outcome::Done); // t13: de-registered, T cleared
        assert_eq!(sim.row("svc"), ("deregistered".into(), "".into(), None));
    }

    #[test]
    fn seed_001_table_3_plays_out_in_virtual_time() {
        let mut s = spec("svc");
        s.preferred_nodes = vec!["N0".into()];
        s.maturity_count = 2;
        s.transfer_cost = TransferCost::Free;
        s.notify_command = Some("true".into());
        let mut sim = Sim::new(vec![s]);
        sim.settle();
        sim.boot("N0", 0); // t1: the primary node is up: mature, starting at once
        assert_eq!(
            sim.row("svc"),
            ("starting".into(), "".into(), at("N0", "starting"))
        );
        sim.agent("svc", "N0", Outcome::Started); // t2
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N0", "registered"))
        );
        sim.boot("N1", 1); // t3 (N1 is notified: its agent's business)
        assert_eq!(sim.row("svc").2, at("N0", "registered"));
        sim.begin_leave("N0"); // t4..t7: N0 leaves, the service goes to N1
        assert_eq!(
            sim.row("svc"),
            ("stopping".into(), "T".into(), at("N0", "stopping"))
        );
        sim.agent("svc", "N0", Outcome::Done);
        assert_eq!(
            sim.row("svc"),
            ("starting".into(), "T".into(), at("N1", "starting"))
        );
        sim.agent("svc", "N1", Outcome::Started);
        sim.gone("N0");
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N1", "registered"))
        );
        sim.boot("N2", 2); // t8
        assert_eq!(sim.row("svc").2, at("N1", "registered"));
        sim.boot("N0", 0); // t9, t10: N0 is back and preferred; the transfer is free
        assert_eq!(
            sim.row("svc"),
            ("stopping".into(), "T".into(), at("N1", "stopping"))
        );
        sim.agent("svc", "N1", Outcome::Done); // t11, t12
        assert_eq!(
            sim.row("svc"),
            ("starting".into(), "T".into(), at("N0", "starting"))
        );
        sim.agent("svc", "N0", Outcome::Started); // t13
        assert_eq!(
            sim.row("svc"),
            ("registered".into(), "".into(), at("N0", "registered"))
        );
    }

    #[test]
    fn an_ungraceful_leave_recovers_then_places_elsewhere() {
        let mut s = spec("svc");
        s.recovery_command = Some("true".into());
        let mut sim = Sim::new(vec![s]);
        sim.boot("a", 0);
        sim.agent("svc", "a", Outcome::Started);
        sim.boot("b", 1);
        sim.gone("a"); // no leave: the lease ended
        assert_eq!(
            sim.row("svc"),
            ("recovering".into(), "".into(), at("b", "recovering"))
        );
        assert_eq!(
            sim.rec("svc").instances["b"].recovering_for.as_deref(),
            Some("a")
        );
        sim.agent("svc", "b", Outcome::Done);
        assert_eq!(
            sim.row("svc"),
            ("starting".into(), "".into(), at("b", "starting"))
        );
    }

    #[test]
    fn a_failed_start_moves_to_the_next_allowable_node_and_gives_up_after_the_last() {
        let mut s = spec("svc");
        s.preferred_nodes = vec!["a".into(), "b".into()];
        let mut sim = Sim::new(vec![s]);
        sim.boot("a", 0);
        sim.boot("b", 1);
        assert_eq!(sim.row("svc").2, at("a", "starting"));
        sim.agent("svc", "a", Outcome::Failed("exit 1".into()));
        assert_eq!(sim.row("svc").2, at("b", "starting"));
        sim.agent("svc", "b", Outcome::Failed("exit 1".into()));
        assert_eq!(sim.row("svc").0, "deregistered");
        assert!(
            sim.rec("svc")
                .last
                .contains("failed on every allowable node"),
            "{}",
            sim.rec("svc").last
        );
    }

    #[test]
    fn a_dead_assignment_to_an_earlier_life_of_a_node_is_recovered() {
        let mut sim = Sim::new(vec![spec("svc")]);
        sim.boot("a", 0);
        sim.agent("svc", "a", Outcome::Started);
        // a's agent restarted with a new lease before the manager saw the old one end.
        sim.boot("a", 0);
        assert_eq!(sim.row("svc").2, at("a", "starting"));
        assert_ne!(sim.rec("svc").instances["a"].epoch, 1);
    }

    #[test]
    fn a_one_service_registered_on_several_nodes_keeps_only_the_preferred_one() {
        let mut s = spec("svc");
        s.placement = Placement::All;
        let mut sim = Sim::new(vec![s]);
        sim.boot("a", 0);
        sim.boot("b", 1);
        sim.agent("svc", "a", Outcome::Started);
        sim.agent("svc", "b", Outcome::Started);
        // The operator turns it into a register-on-one service preferring b.
        let one = sim.specs.get_mut("svc").unwrap();
        one.placement = Placement::One;
        one.preferred_nodes = vec!["b".into()];
        sim.settle();
        let states: Vec<_> = sim
            .rec("svc")
            .instances
            .iter()
            .map(|(n, i)| (n.clone(), i.state))
            .collect();
        assert_eq!(
            states,
            [
                ("a".to_owned(), InstanceState::Stopping),
                ("b".to_owned(), InstanceState::Registered)
            ]
        );
        sim.agent("svc", "a", Outcome::Done);
        assert_eq!(sim.row("svc").2, at("b", "registered"));
    }

    #[test]
    fn placement_all_runs_on_every_allowable_node() {
        let mut s = spec("svc");
        s.placement = Placement::All;
        s.disallowable_nodes = vec!["c".into()];
        let mut sim = Sim::new(vec![s]);
        sim.boot("a", 0);
        sim.boot("b", 1);
        sim.boot("c", 2);
        let nodes: Vec<_> = sim.rec("svc").instances.keys().cloned().collect();
        assert_eq!(nodes, ["a", "b"]);
    }

    #[test]
    fn the_least_loaded_node_is_chosen_without_preferences() {
        let mut sim = Sim::new(vec![spec("s1"), spec("s2"), spec("s3"), spec("s4")]);
        sim.boot("a", 0);
        sim.boot("b", 1);
        // all four went to a when only a was up; a new start goes to the least loaded.
        sim.view.services.clear();
        sim.settle();
        let on_a = sim
            .view
            .services
            .values()
            .filter(|r| r.value.instances.contains_key("a"))
            .count();
        assert_eq!(on_a, 2);
    }

    /// A move asked while the service was starting on another node is not forgotten when
    /// the start completes (the registration had cleared the target: `cluster move` then
    /// waited in vain, its request consumed).
    #[test]
    fn a_move_asked_while_starting_survives_the_registration() {
        let mut rec = ServiceRecord::new(true);
        rec.instances.insert(
            "a".into(),
            Instance {
                state: InstanceState::Starting,
                epoch: 1,
                lease: 7,
                recovering_for: None,
            },
        );
        rec.target = Some("b".into());
        let life = NodeLife {
            lease: 7,
            generation: 0,
        };
        let (new, _) = agent_transition("svc", &rec, "a", life, 1, &Outcome::Started).unwrap();
        assert_eq!(new.instances["a"].state, InstanceState::Registered);
        assert_eq!(new.target.as_deref(), Some("b"));
        // Registered where the move asked: the target is reached.
        rec.target = Some("a".into());
        let (new, _) = agent_transition("svc", &rec, "a", life, 1, &Outcome::Started).unwrap();
        assert_eq!(new.target, None);
    }
}

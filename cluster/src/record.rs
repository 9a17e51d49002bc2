//! What the cluster keeps in etcd, key by key, and the in-memory view every agent and
//! command builds of it. Everything of the cluster lives under `/ccmgr/<cluster>/`:
//!
//! | key | written by | lease | what |
//! |---|---|---|---|
//! | `members/<node>` | the node's agent | the node's | a live member: number, address, may manage, up or leaving |
//! | `nodes/<node>` | the node's agent, at join | none | every node ever seen (the "down" columns of `status`) |
//! | `manager` | the elected agent | the manager's | who manages; its create revision is the manager's fencing token |
//! | `backup` | the manager | none | the pre-selected backup, known to all |
//! | `specs/<service>` | the manager | none | the cluster service's definition, as the manager read it |
//! | `services/<service>` | manager and agents, by compare-and-swap | none | the service's registration state (seed 001) |
//! | `notified/<service>/<node>` | the notified node's agent | the node's | which registration the node's `notify_command` ran for |
//! | `requests/{leave,move,start,stop}/<name>` | `ccmgr cluster` commands | none | what an operator asked |
//! | `events/<ms>-<node>-<n>` | any agent | its events lease (1 h) | the cluster's event stream |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::ClusterServiceSpec;

/// The keys of one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/ccmgr/{cluster}/"),
        }
    }
    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.prefix)
    }
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }
    pub fn manager(&self) -> String {
        format!("{}manager", self.prefix)
    }
    pub fn backup(&self) -> String {
        format!("{}backup", self.prefix)
    }
    pub fn spec(&self, service: &str) -> String {
        format!("{}specs/{service}", self.prefix)
    }
    pub fn service(&self, service: &str) -> String {
        format!("{}services/{service}", self.prefix)
    }
    pub fn notified(&self, service: &str, node: &str) -> String {
        format!("{}notified/{service}/{node}", self.prefix)
    }
    pub fn request(&self, kind: RequestKind, name: &str) -> String {
        format!("{}requests/{}/{name}", self.prefix, kind.as_str())
    }
    pub fn events(&self) -> String {
        format!("{}events/", self.prefix)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RequestKind {
    Leave,
    Move,
    Start,
    Stop,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Leave => "leave",
            RequestKind::Move => "move",
            RequestKind::Start => "start",
            RequestKind::Stop => "stop",
        }
    }
    fn parse(s: &str) -> Option<RequestKind> {
        Some(match s {
            "leave" => RequestKind::Leave,
            "move" => RequestKind::Move,
            "start" => RequestKind::Start,
            "stop" => RequestKind::Stop,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Up,
    Leaving,
}

/// A live member, as its agent publishes it under its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub number: u32,
    pub address: String,
    pub may_manage: bool,
    pub state: MemberState,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub distances: BTreeMap<String, u32>,
    /// The lease the member lives by: an assignment names it, so that an assignment to an
    /// earlier life of the same node is known to be dead.
    pub lease: i64,
    pub joined_unix_ms: u64,
    /// Counts the times the node's local ccmgr instance came back after it was found not
    /// running: a start that failed on the node before is worth trying again after.
    #[serde(default)]
    pub local_generation: u64,
}

/// A life of a node: its lease, and its local instance's generation in it. A failed start
/// excludes the node for the rest of that life only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLife {
    pub lease: i64,
    #[serde(default)]
    pub generation: u64,
}

/// A node ever seen, kept after it goes down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownNode {
    pub name: String,
    pub number: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerRecord {
    pub node: String,
    pub lease: i64,
    pub since_unix_ms: u64,
}

/// Where one instance of a service is in seed 001's state diagram, on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// The node's agent is starting it (the local `ccmgr` brings it up).
    Starting,
    /// It runs on the node: the start succeeded.
    Registered,
    /// The node's agent is stopping it.
    Stopping,
    /// The node runs the service's `recovery_command` for a node that left ungracefully.
    Recovering,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Registered => "registered",
            InstanceState::Stopping => "stopping",
            InstanceState::Recovering => "recovering",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub state: InstanceState,
    /// The assignment's number: an agent acts on an assignment and reports on it by this
    /// number, and a report for another number is stale.
    pub epoch: u64,
    /// The lease of the node when it was assigned (the fencing token of the node's life).
    pub lease: i64,
    /// For `recovering`: the node that left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovering_for: Option<String>,
}

/// A cluster service's registration state, `services/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Node -> its instance. For `placement = "one"`, at most one.
    #[serde(default)]
    pub instances: BTreeMap<String, Instance>,
    /// Whether the cluster wants it registered (auto start, or `cluster start`).
    pub wanted: bool,
    /// Seed 001's transfer intent: set while the service moves from a node to another.
    #[serde(default)]
    pub transfer_intent: bool,
    /// Where a transfer goes (`cluster move`, failback); none: the choosing rules decide.
    #[serde(default)]
    pub target: Option<String>,
    /// The nodes whose start failed, with the life of the node it failed in: not chosen
    /// again in that life (a node that joins again, or whose local instance came back, is).
    #[serde(default)]
    pub failed_nodes: BTreeMap<String, NodeLife>,
    /// Seed 001's "awaiting maturity": since when (unix ms).
    #[serde(default)]
    pub awaiting_maturity_since_ms: Option<u64>,
    /// The cluster was once mature for it: maturity is not awaited again.
    #[serde(default)]
    pub matured: bool,
    pub next_epoch: u64,
    /// The last thing that happened to it, in a sentence (`status` shows it).
    #[serde(default)]
    pub last: String,
}

impl ServiceRecord {
    pub fn new(wanted: bool) -> ServiceRecord {
        ServiceRecord {
            instances: BTreeMap::new(),
            wanted,
            transfer_intent: false,
            target: None,
            failed_nodes: BTreeMap::new(),
            awaiting_maturity_since_ms: None,
            matured: false,
            next_epoch: 1,
            last: String::new(),
        }
    }

    /// The summary state of seed 001's tables: the instance's, or `deregistered`; with
    /// several instances (`placement = "all"`), the least advanced wins, registered last.
    pub fn summary(&self) -> &'static str {
        let order = [
            InstanceState::Recovering,
            InstanceState::Stopping,
            InstanceState::Starting,
            InstanceState::Registered,
        ];
        for state in order {
            if self.instances.values().any(|i| i.state == state) {
                return state.as_str();
            }
        }
        "deregistered"
    }
}

/// A value read from etcd with the revision it was last modified at (the compare of a
/// compare-and-swap).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
    pub create_revision: i64,
}

/// Everything of the cluster an agent or a command has read, kept current by a watch.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub members: BTreeMap<String, Versioned<Member>>,
    pub nodes: BTreeMap<String, KnownNode>,
    pub manager: Option<Versioned<ManagerRecord>>,
    pub backup: Option<Versioned<String>>,
    pub specs: BTreeMap<String, ClusterServiceSpec>,
    pub services: BTreeMap<String, Versioned<ServiceRecord>>,
    /// (service, node) -> the epoch of the registration the node was notified of.
    pub notified: BTreeMap<(String, String), u64>,
    pub requests: BTreeMap<(RequestKind, String), Versioned<String>>,
    /// The revision the view is current to.
    pub revision: i64,
}

impl View {
    /// Whether the view holds a version of `key` newer than `mod_revision` (one its agent
    /// wrote and applied at once, before the watch brought back the older changes).
    pub fn holds_newer(&self, keys: &Keys, key: &str, mod_revision: i64) -> bool {
        let Some(rest) = key.strip_prefix(&keys.prefix) else {
            return false;
        };
        let held = match rest.split_once('/') {
            Some(("members", node)) => self.members.get(node).map(|v| v.mod_revision),
            Some(("services", name)) => self.services.get(name).map(|v| v.mod_revision),
            None if rest == "manager" => self.manager.as_ref().map(|v| v.mod_revision),
            None if rest == "backup" => self.backup.as_ref().map(|v| v.mod_revision),
            _ => None,
        };
        held.is_some_and(|held| held > mod_revision)
    }

    /// Applies one key's new value (`None`: deleted). Unreadable values are skipped: a
    /// newer agent's record must not stop an older one (and `status` says what it skipped).
    pub fn apply(
        &mut self,
        keys: &Keys,
        key: &str,
        value: Option<&[u8]>,
        mod_revision: i64,
        create_revision: i64,
    ) {
        let Some(rest) = key.strip_prefix(&keys.prefix) else {
            return;
        };
        let mut parts = rest.splitn(3, '/');
        let first = parts.next().unwrap_or("");
        let second = parts.next();
        let third = parts.next();
        fn decode<T: for<'a> Deserialize<'a>>(v: Option<&[u8]>) -> Option<T> {
            v.and_then(|b| serde_json::from_slice(b).ok())
        }
        fn versioned<T>(value: T, mod_revision: i64, create_revision: i64) -> Versioned<T> {
            Versioned {
                value,
                mod_revision,
                create_revision,
            }
        }
        // A value this version cannot read is skipped, not taken for a deletion: a member or
        // a record written by a newer agent must not look gone (a member that looks gone is
        // recovered elsewhere while it runs).
        let readable = match (first, value) {
            (_, None) => true,
            ("members", Some(b)) => serde_json::from_slice::<Member>(b).is_ok(),
            ("services", Some(b)) => serde_json::from_slice::<ServiceRecord>(b).is_ok(),
            ("specs", Some(b)) => serde_json::from_slice::<ClusterServiceSpec>(b).is_ok(),
            ("manager", Some(b)) => serde_json::from_slice::<ManagerRecord>(b).is_ok(),
            _ => true,
        };
        if !readable {
            return;
        }
        let (m, c) = (mod_revision, create_revision);
        match (first, second, third) {
            ("members", Some(node), None) => match decode::<Member>(value) {
                Some(member) => {
                    self.members
                        .insert(node.to_owned(), versioned(member, m, c));
                }
                None => {
                    self.members.remove(node);
                }
            },
            ("nodes", Some(node), None) => match decode::<KnownNode>(value) {
                Some(n) => {
                    self.nodes.insert(node.to_owned(), n);
                }
                None => {
                    self.nodes.remove(node);
                }
            },
            ("manager", None, None) => self.manager = decode(value).map(|v| versioned(v, m, c)),
            ("backup", None, None) => {
                self.backup = value
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .map(|s| versioned(s.to_owned(), m, c))
            }
            ("specs", Some(name), None) => match decode::<ClusterServiceSpec>(value) {
                Some(s) => {
                    self.specs.insert(name.to_owned(), s);
                }
                None => {
                    self.specs.remove(name);
                }
            },
            ("services", Some(name), None) => match decode::<ServiceRecord>(value) {
                Some(r) => {
                    self.services.insert(name.to_owned(), versioned(r, m, c));
                }
                None => {
                    self.services.remove(name);
                }
            },
            ("notified", Some(service), Some(node)) => {
                let k = (service.to_owned(), node.to_owned());
                match decode::<u64>(value) {
                    Some(epoch) => {
                        self.notified.insert(k, epoch);
                    }
                    None => {
                        self.notified.remove(&k);
                    }
                }
            }
            ("requests", Some(kind), Some(name)) => {
                let Some(kind) = RequestKind::parse(kind) else {
                    return;
                };
                let k = (kind, name.to_owned());
                match value.and_then(|b| std::str::from_utf8(b).ok()) {
                    Some(v) => {
                        self.requests.insert(k, versioned(v.to_owned(), m, c));
                    }
                    None => {
                        self.requests.remove(&k);
                    }
                }
            }
            _ => {}
        }
        self.revision = self.revision.max(mod_revision);
    }

    /// A member that is up and lives by `lease` (the life an assignment was made to).
    pub fn alive(&self, node: &str, lease: i64) -> bool {
        self.members
            .get(node)
            .is_some_and(|m| m.value.lease == lease)
    }

    /// The current life of a member.
    pub fn life(&self, node: &str) -> Option<NodeLife> {
        self.members.get(node).map(|m| NodeLife {
            lease: m.value.lease,
            generation: m.value.local_generation,
        })
    }

    pub fn up(&self, node: &str) -> bool {
        self.members
            .get(node)
            .is_some_and(|m| m.value.state == MemberState::Up)
    }

    pub fn manager_node(&self) -> Option<&str> {
        self.manager.as_ref().map(|m| m.value.node.as_str())
    }

    pub fn backup_node(&self) -> Option<&str> {
        self.backup.as_ref().map(|b| b.value.as_str())
    }
}

/// The time, in milliseconds since the epoch: records and events carry wall-clock times for
/// people; no decision compares two nodes' clocks.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_echo_of_an_older_change_is_known_as_older() {
        let keys = Keys::new("t");
        let key = keys.service("s");
        let mut view = View::default();
        let older = serde_json::to_vec(&ServiceRecord::new(true)).unwrap();
        let newer = serde_json::to_vec(&ServiceRecord::new(false)).unwrap();
        view.apply(&keys, &key, Some(&older), 5, 3);
        view.apply(&keys, &key, Some(&newer), 7, 3);
        assert!(view.holds_newer(&keys, &key, 5), "the echo of revision 5");
        assert!(!view.holds_newer(&keys, &key, 7), "its own revision");
        assert!(!view.holds_newer(&keys, &key, 8), "a later change");
        assert!(!view.holds_newer(&keys, &keys.service("other"), 1));
        assert!(!view.holds_newer(&keys, &keys.request(RequestKind::Move, "s"), 1));
    }
}

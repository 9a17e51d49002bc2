//! Which of the configured etcd endpoints a client sends its requests to.
//!
//! `etcd-client` balances every request over all the endpoints it was given and never takes
//! a dead one out (it leaves health to its user: etcdv3/etcd-client#12): with one member of
//! a 3-member etcd cluster killed, about one request in three fails at once with "tcp connect
//! error", though two members answer. A cluster command then fails, and an agent misses
//! writes, keep-alives and its watch. This module owns the remedy: a client is connected to
//! the endpoints that accept a connection now, and, when there are several, a task probes
//! every configured endpoint each heartbeat and takes a dead one out of the client's
//! balancer, putting it back when it answers again. The last endpoint in is never taken out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::Client;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A kind of client in this process (the agent's main client, its keep-alive thread's, a
/// command's): counts the clients of that kind [`watch_endpoints`] was started for, so that a
/// task ends when a newer client *of its kind* took over (an agent reconnects after a fence)
/// and the tasks do not pile up, while the other kinds' tasks go on.
pub struct Slot(AtomicU64);

impl Slot {
    pub const fn new() -> Slot {
        Slot(AtomicU64::new(0))
    }
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::new()
    }
}

/// The agent's main client, its keep-alive client, and the commands' client.
pub static MAIN: Slot = Slot::new();
pub static KEEP_ALIVE: Slot = Slot::new();
pub static COMMAND: Slot = Slot::new();

/// `host:port` of an endpoint URL (`http://127.0.0.1:2379` -> `127.0.0.1:2379`); etcd's
/// client port when the URL names none.
fn authority(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let has_port = match authority.rsplit_once(':') {
        Some((host, port)) => !port.is_empty() && !host.ends_with('[') && !port.ends_with(']'),
        None => false,
    };
    if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:2379")
    }
}

/// What a probe of an endpoint found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    /// It accepted a TCP connection.
    Up,
    /// It refused it, or the address is wrong: nothing listens there, for sure.
    Refused,
    /// No answer in time: dead or unreachable, or only slow on a busy machine.
    Silent,
}

/// Probes `endpoint` with a TCP connection, waiting up to `limit`.
async fn probe(endpoint: &str, limit: Duration) -> Probe {
    match timeout(limit, TcpStream::connect(authority(endpoint))).await {
        Ok(Ok(_)) => Probe::Up,
        Ok(Err(_)) => Probe::Refused,
        Err(_) => Probe::Silent,
    }
}

/// The endpoints of `all` that accept a connection now (probed one after the other); all of
/// them when none does, so that the caller's connect fails or waits as it would have.
pub async fn live(all: &[String], limit: Duration) -> Vec<String> {
    let mut live = Vec::new();
    for e in all {
        if probe(e, limit).await == Probe::Up {
            live.push(e.clone());
        }
    }
    if live.is_empty() { all.to_vec() } else { live }
}

/// Keeps `client`'s balancer to the endpoints of `all` that answer: every `period`, a dead
/// one (a refused TCP connection, or none in three probes in a row) is removed, a revived one added back; `current`
/// are those the client was connected with. Ends when a newer client's task began.
pub fn watch_endpoints(
    client: &Client,
    all: Vec<String>,
    current: Vec<String>,
    period: Duration,
    slot: &'static Slot,
) {
    if all.len() < 2 {
        return;
    }
    let generation = slot.0.fetch_add(1, Ordering::SeqCst) + 1;
    let client = client.clone();
    tokio::spawn(async move {
        let mut inside: BTreeSet<String> = current.into_iter().collect();
        // Consecutive failed probes per endpoint. Taking an endpoint out closes the streams
        // on it (watches, keep-alives), so a live one must not be taken out because one
        // probe was slow on a busy machine: a refused connection takes it out at once, but
        // silence takes DEAD_AFTER probes in a row, each with at least a second to connect.
        const DEAD_AFTER: u32 = 3;
        let limit = period.max(Duration::from_secs(1));
        let mut failures: BTreeMap<String, u32> = BTreeMap::new();
        loop {
            tokio::time::sleep(period).await;
            if slot.0.load(Ordering::SeqCst) != generation {
                return;
            }
            for e in &all {
                let found = probe(e, limit).await;
                let up = found == Probe::Up;
                let failed = failures.entry(e.clone()).or_default();
                *failed = match found {
                    Probe::Up => 0,
                    // Nothing listens: out at once.
                    Probe::Refused => DEAD_AFTER,
                    Probe::Silent => *failed + 1,
                };
                if up && !inside.contains(e) {
                    if client.add_endpoint(e).await.is_err() {
                        return;
                    }
                    inside.insert(e.clone());
                } else if *failed >= DEAD_AFTER && inside.contains(e) && inside.len() > 1 {
                    if client.remove_endpoint(e).await.is_err() {
                        return;
                    }
                    inside.remove(e);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_of_an_endpoint() {
        assert_eq!(authority("http://127.0.0.1:2379"), "127.0.0.1:2379");
        assert_eq!(authority("https://etcd.example:4001/"), "etcd.example:4001");
        assert_eq!(authority("10.0.0.1:2379"), "10.0.0.1:2379");
        assert_eq!(authority("http://etcd"), "etcd:2379");
        assert_eq!(authority("http://[fd00::1]:2379"), "[fd00::1]:2379");
        assert_eq!(authority("http://[fd00::1]"), "[fd00::1]:2379");
    }
}

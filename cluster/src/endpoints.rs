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

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::Client;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How many clients [`watch_endpoints`] was started for in this process: a task ends when a
/// newer client took over (an agent reconnects after a fence), so that they do not pile up.
static GENERATION: AtomicU64 = AtomicU64::new(0);

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

/// Whether `endpoint` accepts a TCP connection within `limit`.
async fn answers(endpoint: &str, limit: Duration) -> bool {
    matches!(
        timeout(limit, TcpStream::connect(authority(endpoint))).await,
        Ok(Ok(_))
    )
}

/// The endpoints of `all` that accept a connection now (probed one after the other); all of
/// them when none does, so that the caller's connect fails or waits as it would have.
pub async fn live(all: &[String], limit: Duration) -> Vec<String> {
    let mut live = Vec::new();
    for e in all {
        if answers(e, limit).await {
            live.push(e.clone());
        }
    }
    if live.is_empty() { all.to_vec() } else { live }
}

/// Keeps `client`'s balancer to the endpoints of `all` that answer: every `period`, a dead
/// one (no TCP connection within `period`) is removed, a revived one added back; `current`
/// are those the client was connected with. Ends when a newer client's task began.
pub fn watch_endpoints(client: &Client, all: Vec<String>, current: Vec<String>, period: Duration) {
    if all.len() < 2 {
        return;
    }
    let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
    let client = client.clone();
    tokio::spawn(async move {
        let mut inside: BTreeSet<String> = current.into_iter().collect();
        loop {
            tokio::time::sleep(period).await;
            if GENERATION.load(Ordering::SeqCst) != generation {
                return;
            }
            for e in &all {
                let up = answers(e, period).await;
                if up && !inside.contains(e) {
                    if client.add_endpoint(e).await.is_err() {
                        return;
                    }
                    inside.insert(e.clone());
                } else if !up && inside.contains(e) && inside.len() > 1 {
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

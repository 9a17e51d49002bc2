//! The cluster commands (`ccmgr cluster VERB`, run as `ccmgr-cluster VERB`): what the
//! operator sees and asks of the cluster. They read etcd and write requests into it; the
//! agents act on the requests. Nothing here changes a service's record itself.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, SortOrder, SortTarget, WatchOptions,
};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};

use crate::config::ClusterConfig;
use crate::record::{InstanceState, Keys, MemberState, RequestKind, View};

/// Exit codes, as ccmgr's: 0 done, 1 failed, 2 bad usage or configuration.
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Failed(_) => EXIT_FAILED,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

/// How often a command pings etcd on a connection that waits (`events`, `leave`, `move`):
/// not more often than etcd's `--grpc-keepalive-min-time` (5 s by default), or etcd, seeing
/// pings with no data in between, answers `too_many_pings` and closes the connection, and
/// the command ends with "h2 protocol error" after a few quiet seconds. (The agent's
/// connection carries its lease keep-alives every heartbeat, and etcd forgives a ping that
/// follows data it sent; a waiting command's connection may be quiet for minutes.)
const CLI_KEEP_ALIVE: Duration = Duration::from_secs(10);

pub async fn client(cfg: &ClusterConfig) -> Result<Client, CliError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        CliError::Failed(format!("cannot reach the cluster {}: {e}", cfg.name))
    };
    let hb = cfg.heartbeat.max(Duration::from_millis(100));
    let options = ConnectOptions::new()
        .with_connect_timeout(hb * 2)
        .with_keep_alive(CLI_KEEP_ALIVE, CLI_KEEP_ALIVE);
    // Only the endpoints that answer, kept so: see crate::endpoints.
    let live = crate::endpoints::live(&cfg.endpoints, hb * 2).await;
    let client = timeout(hb * 8, Client::connect(live.clone(), Some(options)))
        .await
        .map_err(|_| unreachable(&format!("no answer from {}", cfg.endpoints.join(", "))))?
        .map_err(|e| unreachable(&e))?;
    crate::endpoints::watch_endpoints(
        &client,
        cfg.endpoints.clone(),
        live,
        hb,
        &crate::endpoints::COMMAND,
    );
    Ok(client)
}

/// Reads everything of the cluster but its events.
pub async fn read_view(client: &mut Client, keys: &Keys) -> Result<View, CliError> {
    let resp = timeout(
        Duration::from_secs(5),
        client.get(keys.prefix.clone(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| failed("etcd did not answer in 5 s"))?
    .map_err(failed)?;
    let mut view = View::default();
    for kv in resp.kvs() {
        let Ok(key) = kv.key_str() else { continue };
        if key.starts_with(&keys.events()) {
            continue;
        }
        view.apply(
            keys,
            key,
            Some(kv.value()),
            kv.mod_revision(),
            kv.create_revision(),
        );
    }
    view.revision = resp.header().map_or(0, |h| h.revision());
    Ok(view)
}

/// A command's start: a client, the cluster's keys, and what the cluster holds now.
async fn connect_and_read(cfg: &ClusterConfig) -> Result<(Client, Keys, View), CliError> {
    let mut c = client(cfg).await?;
    let keys = Keys::new(&cfg.name);
    let view = read_view(&mut c, &keys).await?;
    Ok((c, keys, view))
}

/// Every node the status shows: those ever seen, and those the services' lists name.
fn all_nodes(view: &View) -> Vec<(String, Option<u32>)> {
    let mut nodes: BTreeMap<String, Option<u32>> = BTreeMap::new();
    for n in view.nodes.values() {
        nodes.insert(n.name.clone(), Some(n.number));
    }
    for m in view.members.values() {
        nodes.insert(m.value.name.clone(), Some(m.value.number));
    }
    for s in view.specs.values() {
        for n in s
            .allowable_nodes
            .iter()
            .chain(&s.preferred_nodes)
            .chain(&s.disallowable_nodes)
        {
            if n != "*" {
                nodes.entry(n.clone()).or_insert(None);
            }
        }
    }
    let mut v: Vec<_> = nodes.into_iter().collect();
    v.sort_by_key(|(name, number)| (number.unwrap_or(u32::MAX), name.clone()));
    v
}

/// `cluster status --json`: the roles, the members, and every service as seed 001's tables
/// show it (summary state and flags, then each node's state and flags).
pub fn status_document(cfg_name: &str, view: &View) -> Value {
    let manager = view.manager_node();
    let backup = view.backup_node();
    let nodes = all_nodes(view);
    let members: Vec<Value> = nodes
        .iter()
        .map(|(name, number)| {
            let m = view.members.get(name);
            let state = match m.map(|m| m.value.state) {
                Some(MemberState::Up) => "up",
                Some(MemberState::Leaving) => "leaving",
                None => "down",
            };
            let role = if m.is_none() {
                Value::Null
            } else if Some(name.as_str()) == manager {
                json!("manager")
            } else if Some(name.as_str()) == backup {
                json!("backup")
            } else {
                json!("client")
            };
            json!({
                "name": name,
                "number": number,
                "state": state,
                "role": role,
                "address": m.map(|m| m.value.address.clone()),
                "may_manage": m.map(|m| m.value.may_manage),
            })
        })
        .collect();
    let mut names: Vec<&String> = view.specs.keys().chain(view.services.keys()).collect();
    names.sort();
    names.dedup();
    let services: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let spec = view.specs.get(name);
            let rec = view.services.get(name).map(|r| &r.value);
            let mut flags = vec![];
            let awaiting = rec.is_some_and(|r| r.awaiting_maturity_since_ms.is_some());
            let transfer = rec.is_some_and(|r| r.transfer_intent);
            if awaiting {
                flags.push("M");
            }
            if transfer {
                flags.push("T");
            }
            if spec.is_some_and(|s| s.notify_command.is_some()) {
                flags.push("N");
            }
            let registered_epoch = rec.and_then(|r| {
                r.instances
                    .values()
                    .find(|i| i.state == InstanceState::Registered)
                    .map(|i| i.epoch)
            });
            let per_node: Vec<Value> = nodes
                .iter()
                .map(|(node, _)| {
                    let member = match view.members.get(node).map(|m| m.value.state) {
                        Some(MemberState::Up) => "up",
                        Some(MemberState::Leaving) => "leaving",
                        None => "down",
                    };
                    let inst = rec.and_then(|r| r.instances.get(node));
                    let notified = registered_epoch.is_some_and(|e| {
                        view.notified.get(&(name.clone(), node.clone())) == Some(&e)
                    });
                    json!({
                        "node": node,
                        "member": member,
                        "state": inst.map(|i| i.state.as_str()),
                        "epoch": inst.map(|i| i.epoch),
                        "recovering_for": inst.and_then(|i| i.recovering_for.clone()),
                        "notified": notified,
                        "available": spec.is_some_and(|s| s.allows(node)),
                    })
                })
                .collect();
            let node = rec.and_then(|r| r.instances.keys().next().cloned());
            json!({
                "name": name,
                "placement": spec.map(|s| s.placement),
                "state": rec.map_or("deregistered", |r| r.summary()),
                "flags": flags,
                "transfer_intent": transfer,
                "awaiting_maturity": awaiting,
                "wanted": rec.is_none_or(|r| r.wanted),
                "node": node,
                "nodes_with_instances": rec.map(|r| r.instances.keys().cloned().collect::<Vec<_>>()).unwrap_or_default(),
                "failed_nodes": rec.map(|r| r.failed_nodes.keys().cloned().collect::<Vec<_>>()).unwrap_or_default(),
                "last": rec.map(|r| r.last.clone()),
                "nodes": per_node,
            })
        })
        .collect();
    json!({
        "cluster": cfg_name,
        "revision": view.revision,
        "manager": manager,
        "backup": backup,
        "members": members,
        "services": services,
    })
}

pub fn print_status(doc: &Value) {
    println!(
        "cluster {}: manager {}, backup {}",
        doc["cluster"].as_str().unwrap_or("?"),
        doc["manager"].as_str().unwrap_or("none"),
        doc["backup"].as_str().unwrap_or("none")
    );
    println!(
        "{:<16} {:>6} {:<8} {:<8} address",
        "node", "number", "state", "role"
    );
    for m in doc["members"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:>6} {:<8} {:<8} {}",
            m["name"].as_str().unwrap_or(""),
            m["number"].as_u64().map_or("-".into(), |n| n.to_string()),
            m["state"].as_str().unwrap_or(""),
            m["role"].as_str().unwrap_or("-"),
            m["address"].as_str().unwrap_or("-"),
        );
    }
    for s in doc["services"].as_array().into_iter().flatten() {
        let flags: Vec<&str> = s["flags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!();
        println!(
            "service {}: {}{}{}",
            s["name"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(","))
            },
            s["last"]
                .as_str()
                .filter(|l| !l.is_empty())
                .map_or(String::new(), |l| format!(" ({l})")),
        );
        let cells: Vec<String> = s["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let state = match (n["state"].as_str(), n["member"].as_str()) {
                    (Some(st), _) => st.to_owned(),
                    (None, Some("down")) => "down".to_owned(),
                    (None, _) if n["notified"].as_bool() == Some(true) => "-(notified)".to_owned(),
                    (None, Some(m)) => m.to_owned(),
                    _ => "-".to_owned(),
                };
                let flag = if n["available"].as_bool() == Some(true) {
                    " I"
                } else {
                    ""
                };
                format!("{}: {state}{flag}", n["node"].as_str().unwrap_or(""))
            })
            .collect();
        println!("  {}", cells.join("  "));
    }
}

pub async fn status(cfg: &ClusterConfig, json_out: bool) -> Result<(), CliError> {
    let (_, _, view) = connect_and_read(cfg).await?;
    let doc = status_document(&cfg.name, &view);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    } else {
        print_status(&doc);
    }
    Ok(())
}

fn print_event(v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
        return;
    }
    let mut rest = vec![];
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if ["time", "unix_ms", "cluster", "by", "event"].contains(&k.as_str()) || val.is_null()
            {
                continue;
            }
            rest.push(format!(
                "{k}={}",
                val.as_str().map_or_else(|| val.to_string(), str::to_owned)
            ));
        }
    }
    println!(
        "{} {} {} {}",
        v["time"].as_str().unwrap_or(""),
        v["by"].as_str().unwrap_or(""),
        v["event"].as_str().unwrap_or(""),
        rest.join(" ")
    );
}

/// `cluster events [--json] [-n N]`: the last N events (in the order etcd took them: by
/// revision, not by key, whose millisecond may tie between nodes), then the new ones.
pub async fn events(cfg: &ClusterConfig, json_out: bool, last: usize) -> Result<(), CliError> {
    let mut c = client(cfg).await?;
    let keys = Keys::new(&cfg.name);
    let mut opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Mod, SortOrder::Descend);
    if last > 0 {
        opts = opts.with_limit(last as i64);
    } else {
        opts = opts.with_count_only();
    }
    let resp = c.get(keys.events(), Some(opts)).await.map_err(failed)?;
    let rev = resp.header().map_or(0, |h| h.revision());
    if last > 0 {
        for kv in resp.kvs().iter().rev() {
            if let Ok(v) = serde_json::from_slice::<Value>(kv.value()) {
                print_event(&v, json_out);
            }
        }
    }
    let (_w, mut stream) = c
        .watch(
            keys.events(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .map_err(failed)?;
    use std::io::Write;
    while let Some(resp) = stream.message().await.map_err(failed)? {
        for e in resp.events() {
            if e.event_type() == EventType::Put
                && let Some(kv) = e.kv()
                && let Ok(v) = serde_json::from_slice::<Value>(kv.value())
            {
                print_event(&v, json_out);
            }
        }
        let _ = std::io::stdout().flush();
    }
    Err(failed("the cluster's event stream ended"))
}

async fn put_request(
    c: &mut Client,
    keys: &Keys,
    kind: RequestKind,
    name: &str,
    value: &str,
) -> Result<(), CliError> {
    timeout(
        Duration::from_secs(5),
        c.put(keys.request(kind, name), value, None),
    )
    .await
    .map_err(|_| failed("etcd did not answer in 5 s"))?
    .map_err(failed)?;
    Ok(())
}

/// Waits until `done` holds of the view, reading it again at each change of the cluster.
async fn wait_for(
    c: &mut Client,
    keys: &Keys,
    limit: Duration,
    mut done: impl FnMut(&View) -> bool,
) -> Result<View, View> {
    let deadline = Instant::now() + limit;
    let mut view = View::default();
    // A watch can break before the deadline (the etcd member it ran on died, a connection
    // was reset): then the view is read again and a new watch begins, until the deadline.
    while Instant::now() < deadline {
        match read_view(c, keys).await {
            Ok(v) => view = v,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        if done(&view) {
            return Ok(view);
        }
        let watch = c
            .watch(
                keys.prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(view.revision + 1),
                ),
            )
            .await;
        let Ok((_w, mut stream)) = watch else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    for e in resp.events() {
                        let Some(kv) = e.kv() else { continue };
                        let Ok(key) = kv.key_str() else { continue };
                        let value = (e.event_type() == EventType::Put).then(|| kv.value());
                        view.apply(keys, key, value, kv.mod_revision(), kv.create_revision());
                    }
                    if done(&view) {
                        return Ok(view);
                    }
                }
                Err(_) => return Err(view),
                Ok(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(view)
}

fn last_of(view: &View, service: &str) -> String {
    view.services
        .get(service)
        .map(|r| format!("{} ({})", r.value.summary(), r.value.last))
        .unwrap_or_else(|| "no record".into())
}

pub async fn leave(cfg: &ClusterConfig, node: Option<String>, wait: bool) -> Result<(), CliError> {
    let node = node.unwrap_or_else(|| cfg.node.clone());
    let (mut c, keys, view) = connect_and_read(cfg).await?;
    if !view.members.contains_key(&node) {
        return Err(failed(format!(
            "{node} is not a member of cluster {}",
            cfg.name
        )));
    }
    put_request(&mut c, &keys, RequestKind::Leave, &node, "leave").await?;
    if !wait {
        println!("{node}: leave asked");
        return Ok(());
    }
    let limit = Duration::from_secs(300);
    match wait_for(&mut c, &keys, limit, |v| !v.members.contains_key(&node)).await {
        Ok(_) => {
            println!("{node} left cluster {}", cfg.name);
            Ok(())
        }
        Err(_) => Err(failed(format!(
            "{node} has not left after {} s; `ccmgr cluster status` shows where it is",
            limit.as_secs()
        ))),
    }
}

fn check_service(view: &View, service: &str) -> Result<(), CliError> {
    if view.specs.contains_key(service) || view.services.contains_key(service) {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "the cluster has no service {service}"
        )))
    }
}

pub async fn move_service(
    cfg: &ClusterConfig,
    service: &str,
    to: &str,
    wait: bool,
) -> Result<(), CliError> {
    let (mut c, keys, view) = connect_and_read(cfg).await?;
    check_service(&view, service)?;
    if !view.up(to) {
        return Err(failed(format!(
            "{to} is not an up member of cluster {}",
            cfg.name
        )));
    }
    if view
        .specs
        .get(service)
        .is_some_and(|s| s.placement == crate::spec::Placement::All)
    {
        return Err(failed(format!(
            "{service} runs on every allowable node (placement = \"all\"): there is nothing to move"
        )));
    }
    if let Some(spec) = view.specs.get(service)
        && !spec.allows(to)
    {
        return Err(failed(format!(
            "{service} may not run on {to} (allowable_nodes, disallowable_nodes)"
        )));
    }
    put_request(&mut c, &keys, RequestKind::Move, service, to).await?;
    if !wait {
        println!("{service}: move to {to} asked");
        return Ok(());
    }
    let registered_on = |v: &View| {
        v.services.get(service).is_some_and(|r| {
            r.value
                .instances
                .get(to)
                .is_some_and(|i| i.state == InstanceState::Registered)
        })
    };
    match wait_for(&mut c, &keys, Duration::from_secs(120), registered_on).await {
        Ok(_) => {
            println!("{service} registered on {to}");
            Ok(())
        }
        Err(v) => Err(failed(format!(
            "{service} is not registered on {to}: {}",
            last_of(&v, service)
        ))),
    }
}

pub async fn start_stop(
    cfg: &ClusterConfig,
    service: &str,
    start: bool,
    wait: bool,
) -> Result<(), CliError> {
    let (mut c, keys, view) = connect_and_read(cfg).await?;
    check_service(&view, service)?;
    let kind = if start {
        RequestKind::Start
    } else {
        RequestKind::Stop
    };
    put_request(&mut c, &keys, kind, service, kind.as_str()).await?;
    if !wait {
        println!("{service}: {} asked", kind.as_str());
        return Ok(());
    }
    // A start has failed only once no node is left to try: between a node's failed start
    // and the manager's next placement the record has no instance but more nodes to go.
    let gave_up = |v: &View, r: &crate::record::ServiceRecord| {
        r.instances.is_empty()
            && !r.failed_nodes.is_empty()
            && v.members.values().all(|m| {
                !v.up(&m.value.name)
                    || r.failed_nodes.get(&m.value.name).copied() == v.life(&m.value.name)
                    || v.specs
                        .get(service)
                        .is_some_and(|s| !s.allows(&m.value.name))
            })
    };
    let done = |v: &View| {
        !v.requests.contains_key(&(kind, service.to_owned()))
            && v.services.get(service).is_some_and(|r| {
                if start {
                    r.value
                        .instances
                        .values()
                        .any(|i| i.state == InstanceState::Registered)
                        || gave_up(v, &r.value)
                } else {
                    r.value.instances.is_empty()
                }
            })
    };
    match wait_for(&mut c, &keys, Duration::from_secs(120), done).await {
        Ok(v) => {
            let r = &v.services[service].value;
            if start && r.instances.is_empty() {
                return Err(failed(format!("{service}: {}", r.last)));
            }
            println!("{service}: {}", r.summary());
            Ok(())
        }
        Err(v) => Err(failed(format!(
            "{service}: not done yet: {}",
            last_of(&v, service)
        ))),
    }
}

fn node_info(m: &crate::record::Member) -> crate::addresses::NodeInfo {
    crate::addresses::NodeInfo {
        name: m.name.clone(),
        number: u64::from(m.number),
        address: m.address.clone(),
        group: m.group.clone(),
        distances: m.distances.clone(),
    }
}

/// `cluster addresses SERVICE [--node N]`: the addresses of the nodes the service is
/// registered on, ordered for a client on node N (a name or a number; default: this node)
/// by seed 002's rule ([`crate::addresses`]).
pub async fn addresses(
    cfg: &ClusterConfig,
    service: &str,
    node: Option<String>,
    json_out: bool,
) -> Result<(), CliError> {
    let (_, _, view) = connect_and_read(cfg).await?;
    check_service(&view, service)?;
    let wanted = node.unwrap_or_else(|| cfg.node.clone());
    let by_name = view.members.get(&wanted).map(|m| node_info(&m.value));
    let client_info = match by_name {
        Some(info) => info,
        None => {
            let number: Option<u64> = wanted.parse().ok();
            let member = view
                .members
                .values()
                .find(|m| Some(u64::from(m.value.number)) == number);
            match (member, number, view.nodes.get(&wanted)) {
                (Some(m), _, _) => node_info(&m.value),
                (None, _, Some(known)) => crate::addresses::NodeInfo {
                    name: known.name.clone(),
                    number: u64::from(known.number),
                    ..Default::default()
                },
                (None, Some(n), None) => crate::addresses::NodeInfo {
                    number: n,
                    ..Default::default()
                },
                (None, None, None) => {
                    return Err(CliError::Usage(format!(
                        "--node {wanted}: no node of cluster {} has that name or number",
                        cfg.name
                    )));
                }
            }
        }
    };
    let servers: Vec<crate::addresses::NodeInfo> = view
        .services
        .get(service)
        .map(|r| {
            r.value
                .instances
                .iter()
                .filter(|(_, i)| i.state == InstanceState::Registered)
                .filter_map(|(n, _)| view.members.get(n).map(|m| node_info(&m.value)))
                .collect()
        })
        .unwrap_or_default();
    let port = view.specs.get(service).and_then(|s| s.port);
    let ordered = crate::addresses::service_addresses(&client_info, &servers, port);
    if json_out {
        let detail: Vec<Value> = servers
            .iter()
            .map(|s| {
                json!({
                    "node": s.name,
                    "number": s.number,
                    "address": crate::addresses::with_port(&s.address, port),
                    "distance": crate::addresses::distance(&client_info, s),
                    "local": s.name == client_info.name,
                })
            })
            .collect();
        let doc = json!({
            "service": service,
            "client": {"node": (!client_info.name.is_empty()).then_some(&client_info.name), "number": client_info.number},
            "addresses": ordered,
            "servers": detail,
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    } else {
        for a in ordered {
            println!("{a}");
        }
    }
    Ok(())
}

//! The integration-test harness of the cluster layer: real etcd servers (one, or a cluster of
//! three) on loopback, a TCP proxy in the test process that can cut a node off the network,
//! test nodes (each a temp directory with its own ccmgr instance and `ccmgr-cluster` agent),
//! a witness that proves from the services' own records that a service never ran on two
//! nodes at once, and a polling helper.
//!
//! A typical test:
//! ```ignore
//! mod support;
//! use support::*;
//! let etcd = Etcd::start("failover");                 // or EtcdCluster::start(..)
//! let def = ClusterDef::new("failover");              // cluster name, shared cluster.d, witness
//! def.write_witnessed_service("web", "placement = \"one\"");
//! let net1 = ProxySet::to_etcd(&etcd);                // node 1 reaches etcd through proxies
//! let n0 = def.simple_node("n0", 0, &etcd.endpoints());
//! let n1 = def.simple_node("n1", 1, &net1.endpoints());
//! for n in [&n0, &n1] { n.start_ccmgr(); n.start_agent(); }
//! let on = wait_until(LIMIT, "web placed", || def.witness().running_on("web"));
//! net1.cut();                                         // node 1 loses the network
//! n0.kill_node();                                     // node 0 dies whole
//! def.witness().assert_never_twice("web");
//! ```
//!
//! Everything started here is killed by pid and reaped on drop, even when the test failed;
//! the test process is a child subreaper, so the orphans of a killed node (its services, the
//! keeper's children) come back to it and are reaped by pid. Nothing is killed by name.
//! Tests run in parallel: each etcd, proxy and node has its own free loopback ports, temp
//! directory and instance name.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::Value;

/// The agent binary cargo built for this test crate.
pub const CCMGR_CLUSTER: &str = env!("CARGO_BIN_EXE_ccmgr-cluster");

/// How long etcd, a cluster member or a ccmgr instance may take to come up.
pub const START_LIMIT: Duration = Duration::from_secs(30);

static SUBREAPER: Once = Once::new();
static BUILD_CCMGR: Once = Once::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Every orphan of a test's processes comes back to the test process, which reaps it by pid
/// (this machine's init does not reliably reap orphans).
pub fn become_subreaper() {
    SUBREAPER.call_once(|| {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    });
}

/// A number unique in this test process, for names and ports' owners.
fn unique() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// The `ccmgr` binary: `$CCMGR_BIN` if set, else the `ccmgr` beside `ccmgr-cluster` in the
/// same target directory, built once (`cargo build -p ccmgr --bin ccmgr`) if it is missing.
pub fn ccmgr_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CCMGR_BIN") {
        return PathBuf::from(bin);
    }
    let profile_dir = Path::new(CCMGR_CLUSTER)
        .parent()
        .expect("the agent binary lies in a directory");
    let bin = profile_dir.join("ccmgr");
    BUILD_CCMGR.call_once(|| {
        if bin.exists() {
            return;
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cargo
            .args(["build", "-p", "ccmgr", "--bin", "ccmgr", "--manifest-path"])
            .arg(&manifest);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            cargo.arg("--target-dir").arg(target_dir);
        }
        let out = cargo.output().expect("cargo runs");
        assert!(
            out.status.success() && bin.exists(),
            "cannot build {}: {}",
            bin.display(),
            text(&out)
        );
    });
    bin
}

/// `$PATH` with [`ccmgr_bin`]'s directory first, so that an agent that runs `ccmgr` by name
/// runs the one under test (it also gets `CCMGR_BIN`).
pub fn path_with_ccmgr() -> std::ffi::OsString {
    let bin = ccmgr_bin();
    let mut dirs: Vec<PathBuf> = bin.parent().map(Path::to_path_buf).into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries hold no `:`")
}

/// An `Output` as text, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` every 20 ms until it returns `Some`, which it returns; panics naming `what` when
/// `limit` has passed.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wait_for(limit, what, || f().ok_or("nothing yet"))
}

/// Polls `f` every 20 ms until it returns `Ok`, which it returns; panics naming `what` and the
/// last `Err` (the last observation) when `limit` has passed.
pub fn wait_for<T, E: std::fmt::Debug>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("timed out after {limit:?} waiting for {what}; last observation: {e:?}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Nanoseconds since the epoch, the witness's clock (`date +%s%N`).
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_nanos()
}

/// Free loopback ports: each bound on 127.0.0.1:0 (all at once, so they differ), then
/// released. Another process may take one before its user binds it: users retry.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Is `pid` a live (non-zombie) process?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A process's start time (field 22 of `/proc/<pid>/stat`, zombies included): with its pid,
/// what names one process for good, as pids wrap.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the command name start at field 3 (state).
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// `pids` with their start times, those that exist.
pub fn identities(pids: impl IntoIterator<Item = i32>) -> Vec<(i32, u64)> {
    pids.into_iter()
        .filter_map(|p| Some((p, start_time(p)?)))
        .collect()
}

/// Reaps whichever of `pids` are our children (ours, or orphans re-parented to us), waiting
/// up to 5 s each for a killed one to die.
pub fn reap(pids: &[i32]) {
    reap_identified(&identities(pids.iter().copied()));
}

/// Reaps whichever of the processes `ids` names are our children, waiting up to 5 s each
/// for a killed one to die; a pid now naming another process (another start time) is left
/// alone: it may be another test's child.
pub fn reap_identified(ids: &[(i32, u64)]) {
    for &(pid, started) in ids {
        let deadline = Instant::now() + Duration::from_secs(5);
        while start_time(pid) == Some(started) {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => break, // reaped, not our child (ECHILD), or given up
            }
        }
    }
}

/// The parent of every live process, from `/proc/<pid>/stat`.
fn parents() -> HashMap<i32, i32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state ppid ...
        if let Some((_, rest)) = stat.rsplit_once(')') {
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                map.insert(pid, ppid);
            }
        }
    }
    map
}

/// Whether `pid` is a process of ccmgr instance `instance`: its keeper, coordinator or
/// standby (`--instance NAME internal ROLE` on its command line) or a service or a service's
/// child (`CCMGR_INSTANCE=NAME` in its environment). The check that makes killing by pid safe
/// on a machine whose pids wrap (pid_max 32768 here): a pid recorded earlier may name another
/// test's process now, and instance names are unique per test process and node.
pub fn belongs_to(pid: i32, instance: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if args
        .windows(2)
        .any(|w| w[0] == b"--instance" && w[1] == instance.as_bytes())
    {
        return true;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let wanted = format!("CCMGR_INSTANCE={instance}");
    environ
        .split(|&b| b == 0)
        .any(|var| var == wanted.as_bytes())
}

/// Every live process of ccmgr instance `instance`, found in /proc (see [`belongs_to`]).
pub fn instance_processes(instance: &str) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    parents()
        .keys()
        .copied()
        .filter(|&pid| pid != me && alive(pid) && belongs_to(pid, instance))
        .collect()
}

/// The live children of `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    parents()
        .into_iter()
        .filter(|&(child, parent)| parent == pid && alive(child))
        .map(|(child, _)| child)
        .collect()
}

/// `roots` and every live descendant of them.
fn with_descendants(roots: &BTreeSet<i32>) -> BTreeSet<i32> {
    let parents = parents();
    let mut all: BTreeSet<i32> = roots.iter().copied().filter(|&p| alive(p)).collect();
    loop {
        let more: Vec<i32> = parents
            .iter()
            .filter(|(pid, ppid)| all.contains(ppid) && !all.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            return all;
        }
        all.extend(more);
    }
}

/// SIGKILLs `pids`, their process groups (a service leads its own) and all their
/// descendants, stopping them all first so that none forks a child the kill misses; then
/// reaps them. The test process never signals itself nor its own group.
pub fn kill_tree(pids: &BTreeSet<i32>) -> Vec<i32> {
    let me = std::process::id() as i32;
    let my_group = nix::unistd::getpgrp().as_raw();
    let roots: BTreeSet<i32> = pids.iter().copied().filter(|&p| p > 1 && p != me).collect();
    // Stop until the set is closed under "child of": a stopped process forks no more.
    let mut stopped = BTreeSet::new();
    loop {
        let all = with_descendants(&roots.union(&stopped).copied().collect());
        let new: Vec<i32> = all
            .iter()
            .copied()
            .filter(|p| !stopped.contains(p) && *p != me)
            .collect();
        if new.is_empty() {
            break;
        }
        for &pid in &new {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            stopped.insert(pid);
        }
    }
    let all: Vec<i32> = roots.union(&stopped).copied().collect();
    let ids = identities(all.iter().copied());
    for &pid in &all {
        if pid != my_group {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    reap_identified(&ids);
    all
}

// ---------------------------------------------------------------------------------------
// etcd

/// Runs `etcdctl --endpoints E ARGS` (API v3).
pub fn etcdctl_at(endpoints: &[String], args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("etcdctl runs")
}

/// Whether the etcd answering on `127.0.0.1:port` says it is healthy (`GET /health`: a
/// leader exists and it serves requests).
pub fn etcd_healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.replace(' ', "").contains("\"health\":\"true\"")
}

/// One etcd process and how to start it again.
struct EtcdProcess {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdProcess {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Spawns it; `initial_cluster` is ignored by etcd once the data dir exists (a restart).
    fn spawn(&mut self, initial_cluster: &str, token: &str) {
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", token])
            // 1-second leases: etcd's minimum TTL is 1.5 election timeouts.
            .args(["--election-timeout", "500", "--heartbeat-interval", "50"])
            .args(["--logger", "zap", "--log-outputs"])
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs");
        self.child = Some(child);
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Whether it exited (reaping it if so).
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts the members of `procs` as one cluster and waits until every one is healthy;
/// `Err` (everything killed) when one exited meanwhile, as it does when another process
/// took one of its ports.
fn start_members(procs: &mut [EtcdProcess], token: &str) -> Result<(), String> {
    let initial: Vec<String> = procs
        .iter()
        .map(|p| format!("{}={}", p.name, p.peer_url()))
        .collect();
    let initial = initial.join(",");
    for p in procs.iter_mut() {
        p.spawn(&initial, token);
    }
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Some(dead) = procs.iter_mut().position(|p| p.exited()) {
            let log = procs[dead].log_text();
            procs.iter_mut().for_each(EtcdProcess::kill);
            return Err(format!("etcd {} exited at start:\n{log}", procs[dead].name));
        }
        if procs.iter().all(|p| etcd_healthy(p.client_port)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = procs.iter().map(EtcdProcess::log_text).collect();
            procs.iter_mut().for_each(EtcdProcess::kill);
            panic!("etcd did not become healthy within {START_LIMIT:?}:\n{logs:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` etcd members in `dir`, started on fresh free ports, again on fresh ones when a port
/// was taken between picking and binding.
fn start_fresh(dir: &Path, n: usize, tag: &str) -> Vec<EtcdProcess> {
    let mut last = String::new();
    for attempt in 0..5 {
        let ports = free_ports(2 * n);
        let mut procs: Vec<EtcdProcess> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                EtcdProcess {
                    data_dir: dir.join(format!("{name}-{attempt}.etcd")),
                    log: dir.join(format!("{name}-{attempt}.log")),
                    name,
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    child: None,
                }
            })
            .collect();
        let token = format!("{tag}-{attempt}");
        match start_members(&mut procs, &token) {
            Ok(()) => return procs,
            Err(e) => last = e,
        }
    }
    panic!("etcd would not start in 5 attempts; the last:\n{last}");
}

fn temp_dir(prefix: &str, test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!(
            "{prefix}-{}-",
            test.chars().take(12).collect::<String>()
        ))
        .tempdir()
        .expect("a temp dir")
}

/// One etcd on loopback, its data and log in its own temp dir; killed (by pid) on drop.
pub struct Etcd {
    pub dir: tempfile::TempDir,
    proc: EtcdProcess,
    token: String,
}

impl Etcd {
    /// Starts it and waits until it answers.
    pub fn start(test: &str) -> Etcd {
        become_subreaper();
        let dir = temp_dir("etcd", test);
        let tag = format!("{test}-{}-{}", std::process::id(), unique());
        let mut procs = start_fresh(dir.path(), 1, &tag);
        Etcd {
            dir,
            proc: procs.remove(0),
            token: tag,
        }
    }

    /// SIGKILLs it (by pid) and reaps it: etcd gone for every node at once.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same ports with the same data and waits until it answers. A
    /// port taken meanwhile by another process fails the test.
    pub fn restart(&mut self) {
        assert!(self.proc.child.is_none(), "etcd still runs");
        let initial = format!("{}={}", self.proc.name, self.proc.peer_url());
        let token = self.token.clone();
        self.proc.spawn(&initial, &token);
        let port = self.proc.client_port;
        wait_for(START_LIMIT, "etcd healthy again", || {
            if self.proc.exited() {
                let log = self.proc.log_text();
                self.proc.child = None;
                panic!("etcd exited at restart:\n{log}");
            }
            if etcd_healthy(port) {
                Ok(())
            } else {
                Err("not healthy")
            }
        });
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.proc.endpoint()]
    }

    pub fn endpoint(&self) -> String {
        self.proc.endpoint()
    }

    /// Its client address, for a [`Proxy`] in front of it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.proc.client_port))
    }

    /// Its pid; panics when it was killed.
    pub fn pid(&self) -> i32 {
        self.proc.pid().expect("etcd runs")
    }

    /// Runs `etcdctl --endpoints <this etcd> ARGS`.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl_at(&self.endpoints(), args)
    }

    /// Its log (zap, JSON lines).
    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// Three etcd members on loopback; every live one killed (by pid) on drop.
pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    members: Vec<EtcdProcess>,
    token: String,
}

impl EtcdCluster {
    /// Starts three members and waits until each is healthy (a leader exists).
    pub fn start(test: &str) -> EtcdCluster {
        become_subreaper();
        let dir = temp_dir("etcdc", test);
        let token = format!("{test}-{}-{}", std::process::id(), unique());
        let members = start_fresh(dir.path(), 3, &token);
        EtcdCluster {
            dir,
            members,
            token,
        }
    }

    /// Every member's endpoint, live or not, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdProcess::endpoint).collect()
    }

    /// The endpoints of the members running now.
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(EtcdProcess::endpoint)
            .collect()
    }

    /// Member `i`'s client address, for a [`Proxy`] in front of it.
    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port))
    }

    /// Runs `etcdctl` against the live members.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl_at(&self.live_endpoints(), args)
    }

    /// SIGKILLs member `i` (by pid), reaps it, then waits until the others have a leader.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
        self.wait_leader();
    }

    /// Starts member `i` again (same name, ports and data) and waits until it is healthy and
    /// the live members agree on a leader. A port taken meanwhile by another process fails
    /// the test: the member cannot change its address.
    pub fn restart_member(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|p| format!("{}={}", p.name, p.peer_url()))
            .collect();
        let token = self.token.clone();
        self.members[i].spawn(&initial.join(","), &token);
        let port = self.members[i].client_port;
        wait_for(START_LIMIT, &format!("member {i} healthy again"), || {
            if self.members[i].exited() {
                let log = self.members[i].log_text();
                self.members[i].child = None;
                panic!("member {i} exited at restart:\n{log}");
            }
            if etcd_healthy(port) {
                Ok(())
            } else {
                Err("not healthy")
            }
        });
        self.wait_leader();
    }

    /// Waits until every live member answers `endpoint status` and all name the same leader,
    /// one of them; returns the leader's member index.
    pub fn wait_leader(&self) -> usize {
        let endpoints = self.live_endpoints();
        wait_for(START_LIMIT, "a leader among the live members", || {
            let out = etcdctl_at(
                &endpoints,
                &[
                    "--dial-timeout=1s",
                    "--command-timeout=1s",
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ],
            );
            if !out.status.success() {
                return Err(text(&out));
            }
            let statuses: Value =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))?;
            let statuses = statuses.as_array().cloned().unwrap_or_default();
            let leaders: BTreeSet<u64> = statuses
                .iter()
                .filter_map(|s| s["Status"]["leader"].as_u64())
                .collect();
            let members: Vec<(u64, &str)> = statuses
                .iter()
                .filter_map(|s| {
                    Some((
                        s["Status"]["header"]["member_id"].as_u64()?,
                        s["Endpoint"].as_str()?,
                    ))
                })
                .collect();
            match (leaders.len(), leaders.first()) {
                (1, Some(&leader)) if leader != 0 && statuses.len() == endpoints.len() => members
                    .iter()
                    .find(|(id, _)| *id == leader)
                    .and_then(|(_, ep)| self.endpoints().iter().position(|e| e == ep))
                    .ok_or_else(|| format!("leader {leader:x} not among {members:?}")),
                _ => Err(format!("no single leader: {statuses:?}")),
            }
        })
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        self.members[i].log_text()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.members.iter_mut().for_each(EtcdProcess::kill);
    }
}

// ---------------------------------------------------------------------------------------
// Proxy

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Forwards both ways.
    Forward,
    /// A blackhole: nothing moves either way, nothing is closed; new connections are
    /// accepted and held, never forwarded (as a SYN-dropping network leaves a connect hanging
    /// or, past the kernel's handshake, a peer silent). What a node sees when its network
    /// goes away: gRPC finds out only by its keep-alive timing out.
    Stalled,
    /// Every connection is closed with a RST both ways; new ones are reset at once.
    Reset,
}

struct ProxyShared {
    mode: Mutex<Mode>,
    changed: Condvar,
    closing: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyShared {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Waits while stalled (up to `d`); returns the mode after.
    fn wait_unstalled(&self, d: Duration) -> Mode {
        let guard = self.mode.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, d, |m| *m == Mode::Stalled)
            .unwrap();
        *guard
    }
}

/// A TCP proxy in the test process (std threads) from a free loopback port to `target`:
/// forwards, or cuts the network ([`Proxy::cut`]: a blackhole) or resets it
/// ([`Proxy::reset`]: RST), until [`Proxy::restore`]. Its threads end on drop.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

/// How often a blocked proxy thread looks at the mode.
const PROXY_TICK: Duration = Duration::from_millis(20);

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a proxy port");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(ProxyShared {
            mode: Mutex::new(Mode::Forward),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || accept_loop(&listener, target, &s));
        Proxy {
            addr,
            target,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// A proxy in front of an [`Etcd`].
    pub fn to_etcd(etcd: &Etcd) -> Proxy {
        Proxy::start(etcd.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `http://127.0.0.1:PORT`, as an etcd endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
        self.shared.changed.notify_all();
    }

    /// Network loss: every open connection goes silent both ways (nothing forwarded, nothing
    /// closed), new connections are accepted but never forwarded. A peer finds out only by a
    /// timeout, as over a real partition.
    pub fn cut(&self) {
        self.set(Mode::Stalled);
    }

    /// Every open connection is reset (RST) both ways, and new ones too, until `restore`.
    pub fn reset(&self) {
        self.set(Mode::Reset);
    }

    /// Forwards again. Connections that were stalled (and that neither side closed) resume,
    /// as after a healed partition; those held unforwarded are connected to the target now.
    pub fn restore(&self) {
        self.set(Mode::Forward);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, shared: &Arc<ProxyShared>) {
    while !shared.closing() {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let s = shared.clone();
                let t = std::thread::spawn(move || connection(client, target, &s));
                shared.threads.lock().unwrap().push(t);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(PROXY_TICK / 2),
            Err(_) => std::thread::sleep(PROXY_TICK),
        }
    }
}

/// Makes closing `s` send a RST rather than a FIN.
fn set_rst_on_close(s: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// One client connection: held while stalled, then connected to the target and pumped both
/// ways, each direction on its own thread.
fn connection(client: TcpStream, target: SocketAddr, shared: &Arc<ProxyShared>) {
    loop {
        if shared.closing() {
            return;
        }
        match shared.wait_unstalled(PROXY_TICK) {
            Mode::Stalled => continue,
            Mode::Reset => {
                set_rst_on_close(&client);
                return;
            }
            Mode::Forward => break,
        }
    }
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        set_rst_on_close(&client);
        return;
    };
    for s in [&client, &server] {
        let _ = s.set_read_timeout(Some(PROXY_TICK));
        let _ = s.set_write_timeout(Some(PROXY_TICK));
        let _ = s.set_nodelay(true);
    }
    let (c2, s2) = match (client.try_clone(), server.try_clone()) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return,
    };
    let s = shared.clone();
    let back = std::thread::spawn(move || pump(&s2, &c2, &s));
    pump(&client, &server, shared);
    let _ = back.join();
}

/// Copies `from` to `to` while forwarding; stalls while cut; on a reset, makes both sockets
/// close with a RST; on EOF passes the half-close on.
fn pump(from: &TcpStream, to: &TcpStream, shared: &ProxyShared) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if shared.closing() {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        match shared.wait_unstalled(PROXY_TICK) {
            Mode::Stalled => continue,
            Mode::Reset => {
                set_rst_on_close(from);
                set_rst_on_close(to);
                return;
            }
            Mode::Forward => {}
        }
        let n = match (&*from).read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        };
        // Bytes read are written only while forwarding, under the mode's lock: once `cut`
        // or `reset` returned, nothing more gets through. Bytes read before a cut are held
        // and delivered after `restore`, as TCP retransmits after a healed partition.
        let mut sent = 0;
        while sent < n {
            let mode = shared.mode.lock().unwrap();
            if shared.closing() {
                return;
            }
            match *mode {
                Mode::Stalled => {
                    drop(mode);
                    shared.wait_unstalled(PROXY_TICK);
                    continue;
                }
                Mode::Reset => {
                    set_rst_on_close(from);
                    set_rst_on_close(to);
                    return;
                }
                Mode::Forward => {}
            }
            // The write times out after a tick, so `cut` waits at most that long.
            match (&*to).write(&buf[sent..n]) {
                Ok(0) => return,
                Ok(k) => sent += k,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}

/// One [`Proxy`] per etcd member: a node's whole network to etcd, cut or restored at once.
pub struct ProxySet {
    pub proxies: Vec<Proxy>,
}

impl ProxySet {
    pub fn to_etcd(etcd: &Etcd) -> ProxySet {
        ProxySet {
            proxies: vec![Proxy::to_etcd(etcd)],
        }
    }

    /// A proxy to each member of `cluster`, in member order.
    pub fn to_cluster(cluster: &EtcdCluster) -> ProxySet {
        ProxySet {
            proxies: (0..cluster.members.len())
                .map(|i| Proxy::start(cluster.addr(i)))
                .collect(),
        }
    }

    /// The proxies' endpoints, for a node's `endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.proxies.iter().map(Proxy::endpoint).collect()
    }

    pub fn cut(&self) {
        self.proxies.iter().for_each(Proxy::cut);
    }

    pub fn reset(&self) {
        self.proxies.iter().for_each(Proxy::reset);
    }

    pub fn restore(&self) {
        self.proxies.iter().for_each(Proxy::restore);
    }
}

// ---------------------------------------------------------------------------------------
// Nodes

/// What a test cluster's nodes share: the cluster's name (its etcd key prefix), the
/// cluster.d files every node gets, the instance names' prefix and the witness file.
pub struct ClusterDef {
    pub dir: tempfile::TempDir,
    /// The `[cluster] name`, unique per test.
    pub name: String,
    /// Node `n`'s ccmgr instance is `<prefix>-<n>`.
    pub prefix: String,
    files: Mutex<BTreeMap<String, String>>,
    /// The cluster.d directories of the nodes made so far.
    node_dirs: Mutex<Vec<PathBuf>>,
}

impl ClusterDef {
    pub fn new(test: &str) -> ClusterDef {
        become_subreaper();
        let dir = temp_dir("cdef", test);
        let n = unique();
        let short: String = test
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(10)
            .collect();
        let prefix = format!("c{short}{}x{n}", std::process::id());
        ClusterDef {
            dir,
            name: prefix.clone(),
            prefix,
            files: Mutex::new(BTreeMap::new()),
            node_dirs: Mutex::new(Vec::new()),
        }
    }

    /// The instance name of node `node`.
    pub fn instance_of(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Writes `cluster.d/<name>.toml` on every node, made so far and to come.
    pub fn write_cluster_service(&self, name: &str, toml: &str) {
        self.files
            .lock()
            .unwrap()
            .insert(name.to_owned(), toml.to_owned());
        for dir in self.node_dirs.lock().unwrap().iter() {
            std::fs::write(dir.join(format!("{name}.toml")), toml).unwrap();
        }
    }

    /// Removes `cluster.d/<name>.toml` from every node.
    pub fn remove_cluster_service(&self, name: &str) {
        self.files.lock().unwrap().remove(name);
        for dir in self.node_dirs.lock().unwrap().iter() {
            let _ = std::fs::remove_file(dir.join(format!("{name}.toml")));
        }
    }

    /// The witness file every node's witnessed services append to.
    pub fn witness_path(&self) -> PathBuf {
        self.dir.path().join("witness")
    }

    /// The command of a witnessed service (a TOML value, for `command = ...`): it appends
    /// `start <instance> <service> <ns>` when it starts and `stop ...` when SIGTERM ends it,
    /// then idles.
    pub fn witness_command(&self) -> String {
        let w = self.witness_path().display().to_string();
        let w = w.replace('\'', "'\\''");
        let script = format!(
            "W='{w}'; echo \"start $CCMGR_INSTANCE $CCMGR_SERVICE $(date +%s%N)\" >> \"$W\"; \
             trap 'echo \"stop $CCMGR_INSTANCE $CCMGR_SERVICE $(date +%s%N)\" >> \"$W\"; exit 0' TERM; \
             while :; do sleep 0.05; done"
        );
        let words = [
            "sh".to_owned(),
            "-c".to_owned(),
            script,
            "witness".to_owned(),
        ];
        serde_json::to_string(&words).unwrap()
    }

    /// Writes the cluster service `name`, witnessed, with `cluster_keys` (TOML lines:
    /// `placement`, `allowable_nodes`, ...) added.
    pub fn write_witnessed_service(&self, name: &str, cluster_keys: &str) {
        let toml = format!("command = {}\n{cluster_keys}\n", self.witness_command());
        self.write_cluster_service(name, &toml);
    }

    /// The witness's intervals (see [`Witness`]).
    pub fn witness(&self) -> Witness {
        Witness::read(&self.witness_path(), &self.prefix)
    }

    /// Makes node `spec.node`: its own temp dir with ccmgr.toml, an empty services.d and
    /// this cluster's cluster.d files.
    pub fn node(&self, spec: NodeSpec) -> Node {
        Node::new(self, spec)
    }

    /// Node `name` with number `number` and default settings, on `endpoints`.
    pub fn simple_node(&self, name: &str, number: u32, endpoints: &[String]) -> Node {
        self.node(NodeSpec::new(name, number, endpoints))
    }
}

/// The settings of one node's `[cluster]` table.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub node: String,
    pub node_number: u32,
    pub endpoints: Vec<String>,
    /// `heartbeat`, as written (`"250ms"`).
    pub heartbeat: String,
    pub missed_beats: u32,
    pub may_manage: bool,
    pub address: String,
    /// More lines of the `[cluster]` table (`group = "rack-a"`, `distances = {...}`,
    /// `fence_margin = "250ms"`).
    pub cluster_extra: String,
    /// More top-level lines of ccmgr.toml (before the `[cluster]` table).
    pub global_extra: String,
}

impl NodeSpec {
    /// Heartbeat 250 ms, 4 missed beats (1-second leases), may manage, address 127.0.0.1.
    pub fn new(node: &str, node_number: u32, endpoints: &[String]) -> NodeSpec {
        NodeSpec {
            node: node.to_owned(),
            node_number,
            endpoints: endpoints.to_vec(),
            heartbeat: "250ms".to_owned(),
            missed_beats: 4,
            may_manage: true,
            address: "127.0.0.1".to_owned(),
            cluster_extra: String::new(),
            global_extra: String::new(),
        }
    }
}

/// One node of a test cluster: a temp dir with ccmgr.toml (its own instance; log and run dir
/// inside), services.d (the agent writes it), cluster.d (the [`ClusterDef`]'s files), the
/// agent's log. On drop: the agent killed, `ccmgr stop`, whatever is left killed by pid and
/// reaped.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub instance: String,
    witness: PathBuf,
    agent: Mutex<Option<Child>>,
    /// Every pid of the instance seen: killed on drop if still alive and still the
    /// instance's (see [`belongs_to`]).
    seen: Mutex<BTreeSet<(i32, u64)>>,
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

impl Node {
    fn new(def: &ClusterDef, spec: NodeSpec) -> Node {
        become_subreaper();
        let dir = temp_dir("node", &spec.node);
        let instance = def.instance_of(&spec.node);
        let endpoints: Vec<String> = spec.endpoints.iter().map(|e| toml_str(e)).collect();
        let config = format!(
            "instance = {instance}\nlog_dir = \"log\"\nrun_dir = \"run\"\n{global}\n\n\
             [cluster]\nname = {name}\nendpoints = [{endpoints}]\nnode = {node}\n\
             node_number = {number}\nheartbeat = {heartbeat}\nmissed_beats = {missed}\n\
             may_manage = {may}\naddress = {address}\ncluster_dir = \"cluster.d\"\n{extra}\n",
            instance = toml_str(&instance),
            global = spec.global_extra,
            name = toml_str(&def.name),
            endpoints = endpoints.join(", "),
            node = toml_str(&spec.node),
            number = spec.node_number,
            heartbeat = toml_str(&spec.heartbeat),
            missed = spec.missed_beats,
            may = spec.may_manage,
            address = toml_str(&spec.address),
            extra = spec.cluster_extra,
        );
        std::fs::write(dir.path().join("ccmgr.toml"), config).unwrap();
        std::fs::create_dir_all(dir.path().join("services.d")).unwrap();
        let cluster_d = dir.path().join("cluster.d");
        std::fs::create_dir_all(&cluster_d).unwrap();
        for (name, text) in def.files.lock().unwrap().iter() {
            std::fs::write(cluster_d.join(format!("{name}.toml")), text).unwrap();
        }
        def.node_dirs.lock().unwrap().push(cluster_d);
        Node {
            dir,
            name: spec.node,
            instance,
            witness: def.witness_path(),
            agent: Mutex::new(None),
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("ccmgr.toml")
    }

    pub fn services_dir(&self) -> PathBuf {
        self.path().join("services.d")
    }

    pub fn cluster_dir(&self) -> PathBuf {
        self.path().join("cluster.d")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path().join("run")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.path().join("log")
    }

    /// Writes `cluster.d/<name>.toml` on this node only (see
    /// [`ClusterDef::write_cluster_service`] for every node).
    pub fn write_cluster_service(&self, name: &str, toml: &str) {
        std::fs::write(self.cluster_dir().join(format!("{name}.toml")), toml).unwrap();
    }

    /// Writes `services.d/<name>.toml` directly (what the agent does for a placed service),
    /// for a test that drives the local instance without an agent.
    pub fn write_local_service(&self, name: &str, toml: &str) {
        std::fs::write(self.services_dir().join(format!("{name}.toml")), toml).unwrap();
    }

    /// Runs `ccmgr --config C ARGS`.
    pub fn ccmgr(&self, args: &[&str]) -> Output {
        let out = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env_remove("CCMGR_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("ccmgr runs");
        self.reap_zombies();
        self.remember_pids();
        out
    }

    /// Reaps the remembered processes of the node that died and were re-parented to this
    /// process (a keeper that `ccmgr stop` ended, say), so they do not linger as zombies.
    pub fn reap_zombies(&self) {
        let seen = self.seen.lock().unwrap().clone();
        for (pid, started) in seen {
            if start_time(pid) == Some(started) && !alive(pid) {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
        }
    }

    /// `ccmgr start` (the instance in the background, with whatever services.d holds); panics
    /// unless it came up.
    pub fn start_ccmgr(&self) {
        let out = self.ccmgr(&["start"]);
        assert!(
            out.status.success(),
            "ccmgr of node {} did not start: {}",
            self.name,
            text(&out)
        );
        wait_until(START_LIMIT, "the node's ccmgr steady", || {
            self.local_status_opt().filter(|s| s["state"] == "steady")
        });
        self.remember_pids();
    }

    /// `ccmgr status --json`, parsed; `None` when the instance is not running (or the status
    /// is not JSON).
    pub fn local_status_opt(&self) -> Option<Value> {
        let out = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(self.config_path())
            .args(["status", "--json"])
            .env_remove("CCMGR_CONFIG")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if out.status.code() == Some(3) {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `ccmgr status --json`, parsed; panics when not running.
    pub fn local_status(&self) -> Value {
        let status = self
            .local_status_opt()
            .unwrap_or_else(|| panic!("the ccmgr of node {} is not running", self.name));
        self.seen
            .lock()
            .unwrap()
            .extend(identities(pids_in(&status)));
        status
    }

    /// The local status of service `id`, if the instance runs it.
    pub fn local_service(&self, id: &str) -> Option<Value> {
        let status = self.local_status_opt()?;
        status["services"]
            .as_array()?
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
    }

    /// Whether the local instance has service `id` up.
    pub fn runs(&self, id: &str) -> bool {
        self.local_service(id).is_some_and(|s| s["state"] == "up")
    }

    /// Every pid the instance's status and the keeper's process record name now.
    pub fn instance_pids(&self) -> BTreeSet<i32> {
        let mut pids: BTreeSet<i32> = self
            .local_status_opt()
            .map(|s| pids_in(&s))
            .unwrap_or_default()
            .into_iter()
            .collect();
        pids.extend(record_pids(
            &self.run_dir().join(format!("{}.procs", self.instance)),
        ));
        pids
    }

    fn remember_pids(&self) {
        let pids = self.instance_pids();
        let ours = pids.into_iter().filter(|&p| belongs_to(p, &self.instance));
        self.seen.lock().unwrap().extend(identities(ours));
    }

    /// Every live process of the node's instance: those its status, its process record and
    /// this harness named, if still the instance's, and those /proc shows as the instance's.
    pub fn own_pids(&self) -> BTreeSet<i32> {
        let mut pids: BTreeSet<i32> = self
            .instance_pids()
            .into_iter()
            .filter(|&p| alive(p) && belongs_to(p, &self.instance))
            .collect();
        // Remembered ones (the agent's fence guard among them) by pid and start time.
        pids.extend(
            self.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|&&(p, started)| alive(p) && start_time(p) == Some(started))
                .map(|&(p, _)| p),
        );
        pids.extend(instance_processes(&self.instance));
        pids
    }

    /// Spawns `ccmgr-cluster --config C agent --ccmgr <ccmgr under test>`, its output to
    /// `agent.log` in the node's directory.
    pub fn start_agent(&self) {
        let mut agent = self.agent.lock().unwrap();
        assert!(agent.is_none(), "the agent of node {} runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log_path())
            .unwrap();
        let child = Command::new(CCMGR_CLUSTER)
            .arg("--config")
            .arg(self.config_path())
            .arg("agent")
            .arg("--ccmgr")
            .arg(ccmgr_bin())
            .env_remove("CCMGR_CONFIG")
            .env("CCMGR_BIN", ccmgr_bin())
            .env("PATH", path_with_ccmgr())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ccmgr-cluster runs");
        *agent = Some(child);
    }

    pub fn agent_log_path(&self) -> PathBuf {
        self.path().join("agent.log")
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    pub fn agent_pid(&self) -> Option<i32> {
        self.agent.lock().unwrap().as_ref().map(|c| c.id() as i32)
    }

    /// Whether the agent process has exited (reaping it then).
    pub fn agent_exited(&self) -> Option<std::process::ExitStatus> {
        self.agent
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// When the agent has exited (a graceful leave): reaps it and forgets it, so that
    /// [`Node::start_agent`] may boot the node again; returns its exit status. `None` (the
    /// agent kept) while it runs.
    pub fn take_exited_agent(&self) -> Option<std::process::ExitStatus> {
        let mut agent = self.agent.lock().unwrap();
        let status = agent.as_mut()?.try_wait().ok().flatten()?;
        *agent = None;
        Some(status)
    }

    /// SIGKILLs the agent alone and reaps it. Its fence guard (its child, which stops the
    /// node's cluster services when the agent dies) is left to do its work; it is
    /// remembered, and killed with the node or on drop.
    pub fn kill_agent(&self) {
        if let Some(mut child) = self.agent.lock().unwrap().take() {
            let pid = child.id() as i32;
            let tree = with_descendants(&BTreeSet::from([pid]));
            let rest = tree.iter().copied().filter(|&p| p != pid);
            self.seen.lock().unwrap().extend(identities(rest));
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGKILLs the agent and everything it started (its fence guard, the commands it runs).
    pub fn kill_agent_and_guard(&self) {
        if let Some(mut child) = self.agent.lock().unwrap().take() {
            let pid = child.id() as i32;
            let tree = with_descendants(&BTreeSet::from([pid]));
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = child.wait();
            kill_tree(&tree);
        }
    }

    /// The node dies at once: SIGKILL of the agent and of every process of its ccmgr instance
    /// (keeper, coordinator, standby, services, their descendants), all reaped; then, for the
    /// witness, `killed <instance> <ns>` is appended: every witnessed service of this node
    /// ended before that time. Panics if anything of it survived.
    pub fn kill_node(&self) {
        self.kill_agent_and_guard();
        let killed = kill_tree(&self.own_pids());
        let survivors: Vec<i32> = killed.iter().copied().filter(|&p| alive(p)).collect();
        assert!(
            survivors.is_empty(),
            "processes of node {} survived SIGKILL: {survivors:?}",
            self.name
        );
        let line = format!("killed {} {}\n", self.instance, now_ns());
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.witness)
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    }

    /// Runs `ccmgr-cluster --config C ARGS`.
    pub fn cluster(&self, args: &[&str]) -> Output {
        Command::new(CCMGR_CLUSTER)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env_remove("CCMGR_CONFIG")
            .env("CCMGR_BIN", ccmgr_bin())
            .env("PATH", path_with_ccmgr())
            .stdin(Stdio::null())
            .output()
            .expect("ccmgr-cluster runs")
    }

    /// Runs `ccmgr-cluster --config C ARGS` and parses its stdout; panics unless it exited 0
    /// with JSON.
    pub fn cluster_json(&self, args: &[&str]) -> Value {
        let out = self.cluster(args);
        assert!(
            out.status.success(),
            "ccmgr-cluster {args:?} on node {} failed: {}",
            self.name,
            text(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ccmgr-cluster {args:?} printed no JSON ({e}): {}",
                text(&out)
            )
        })
    }

    /// The coordinator's (and keeper's) own log.
    pub fn ccmgr_log(&self) -> String {
        std::fs::read_to_string(self.log_dir().join(format!("ccmgr-{}.log", self.instance)))
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        let before = identities(self.own_pids());
        // `ccmgr stop`, bounded: a broken instance must not hang the test.
        if let Ok(mut stop) = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(self.config_path())
            .arg("stop")
            .env_remove("CCMGR_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(stop.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = stop.kill();
            let _ = stop.wait();
        }
        // Whatever survived the stop, then the reaping of what the stop killed (orphans of
        // a keeper gone come back to this process).
        kill_tree(&self.own_pids());
        reap_identified(&before);
        self.reap_zombies();
    }
}

/// Every pid a `status --json` document names: coordinator, standby, keeper and services.
pub fn pids_in(status: &Value) -> Vec<i32> {
    let mut pids: Vec<i32> = ["coordinator", "standby", "keeper"]
        .iter()
        .filter_map(|k| status[*k]["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    pids.extend(
        status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["pid"].as_i64())
            .map(|p| p as i32),
    );
    pids
}

/// Every pid the keeper's process record (`run/<instance>.procs`) names.
pub fn record_pids(path: &Path) -> Vec<i32> {
    let Some(record) = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = ["keeper", "coordinator", "standby"]
        .iter()
        .filter_map(|k| record[*k]["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    pids.extend(
        record["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["process"]["pid"].as_i64())
            .map(|p| p as i32),
    );
    pids
}

// ---------------------------------------------------------------------------------------
// The witness

/// One run of a witnessed service on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub service: String,
    pub node: String,
    pub start_ns: u128,
    /// When it wrote `stop`, or (upper bound) when the harness killed its node; `None`: it
    /// runs (or died unrecorded).
    pub end_ns: Option<u128>,
}

/// The witness file's runs, per service, in start order.
#[derive(Clone, Debug, Default)]
pub struct Witness {
    pub intervals: BTreeMap<String, Vec<Interval>>,
}

impl Witness {
    /// Reads the witness at `path`; instances `<prefix>-<node>` are named by node.
    pub fn read(path: &Path, prefix: &str) -> Witness {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Witness::parse(&text, prefix)
    }

    /// Parses witness lines: `start <instance> <service> <ns>`, `stop <instance> <service>
    /// <ns>`, `killed <instance> <ns>` (ends every open run of the instance).
    pub fn parse(text: &str, prefix: &str) -> Witness {
        let node_of = |instance: &str| {
            instance
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('-'))
                .unwrap_or(instance)
                .to_owned()
        };
        let mut w = Witness::default();
        for (i, line) in text.lines().enumerate() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let ns = |s: &str| -> u128 {
                s.parse()
                    .unwrap_or_else(|_| panic!("witness line {}: bad time: {line}", i + 1))
            };
            match f.as_slice() {
                ["start", inst, svc, t] => {
                    w.intervals
                        .entry((*svc).to_owned())
                        .or_default()
                        .push(Interval {
                            service: (*svc).to_owned(),
                            node: node_of(inst),
                            start_ns: ns(t),
                            end_ns: None,
                        })
                }
                ["stop", inst, svc, t] => {
                    let node = node_of(inst);
                    let open = w
                        .intervals
                        .get_mut(*svc)
                        .and_then(|v| {
                            v.iter_mut()
                                .rev()
                                .find(|r| r.node == node && r.end_ns.is_none())
                        })
                        .unwrap_or_else(|| {
                            panic!("witness line {}: a stop with no start: {line}", i + 1)
                        });
                    open.end_ns = Some(ns(t));
                }
                ["killed", inst, t] => {
                    let node = node_of(inst);
                    let t = ns(t);
                    for r in w.intervals.values_mut().flatten() {
                        if r.node == node && r.end_ns.is_none() {
                            r.end_ns = Some(t);
                        }
                    }
                }
                [] => {}
                _ => panic!("witness line {}: not a witness line: {line}", i + 1),
            }
        }
        for v in w.intervals.values_mut() {
            v.sort_by_key(|r| r.start_ns);
        }
        w
    }

    /// The runs of `service`, in start order.
    pub fn runs(&self, service: &str) -> Vec<Interval> {
        self.intervals.get(service).cloned().unwrap_or_default()
    }

    /// Checks that no two runs of `service` overlap (a run still open overlaps every later
    /// one); returns its runs in start order. Panics naming the two that overlap.
    pub fn assert_never_twice(&self, service: &str) -> Vec<Interval> {
        let runs = self.runs(service);
        for pair in runs.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            assert!(
                a.end_ns.is_some_and(|end| end <= b.start_ns),
                "service {service} ran twice at once: {a:?} and {b:?}; all runs: {runs:#?}"
            );
        }
        runs
    }

    /// The node `service` runs on now (its last run, if still open).
    pub fn running_on(&self, service: &str) -> Option<String> {
        self.runs(service)
            .last()
            .filter(|r| r.end_ns.is_none())
            .map(|r| r.node.clone())
    }
}

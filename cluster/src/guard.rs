//! The fence guard (`ccmgr-cluster guard`): a small process the agent starts beside itself,
//! which stops the node's cluster services when the agent can no longer vouch for its lease.
//!
//! The agent writes `deadline <ms>` (CLOCK_MONOTONIC) on the guard's stdin each time its
//! lease is renewed: the time by which the services must be stopped if no renewal follows.
//! The guard stops them (through the local ccmgr, [`LocalCcmgr::stop_all_owned`]) when that
//! time passes (the agent is cut from etcd, or frozen by SIGSTOP), or at once when its stdin
//! closes without `release` (the agent died: nothing renews the lease any more, and the
//! cluster will move the services). It answers `fenced 0` on stdout after such a fence. The
//! agent may also ask `fence <n>` (it knows its lease is lost), answered `fenced <n>`, so that
//! it joins again only after *that* fence, not after an earlier one still in the pipe. It is a
//! process of its own because the one failure it exists for is the agent's.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use crate::agent::monotonic_ms;
use crate::config::ClusterConfig;
use crate::local::LocalCcmgr;

pub async fn run(cfg: ClusterConfig, ccmgr: PathBuf) -> i32 {
    let local = LocalCcmgr::new(
        ccmgr,
        cfg.config_path.clone(),
        cfg.services_dir.clone(),
        cfg.node.clone(),
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut deadline: Option<Instant> = None;
    loop {
        let at = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    let line = line.trim();
                    if line == "release" {
                        return 0;
                    }
                    if let Some(n) = line.strip_prefix("fence ").and_then(|v| v.parse::<u64>().ok()) {
                        fence(&local).await;
                        deadline = None;
                        let answer = format!("fenced {n}\n");
                        if stdout.write_all(answer.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                            return 0;
                        }
                    } else if let Some(ms) = line.strip_prefix("deadline ").and_then(|v| v.parse::<u64>().ok()) {
                        let now = monotonic_ms();
                        deadline = Some(Instant::now() + Duration::from_millis(ms.saturating_sub(now)));
                    }
                }
                _ => {
                    warn!("the agent is gone: stopping this node's cluster services");
                    fence(&local).await;
                    return 0;
                }
            },
            _ = sleep_until(at), if deadline.is_some() => {
                warn!("the lease was not renewed in time: stopping this node's cluster services");
                fence(&local).await;
                deadline = None;
                if stdout.write_all(b"fenced 0\n").await.is_err() || stdout.flush().await.is_err() {
                    return 0;
                }
            }
        }
    }
}

async fn fence(local: &LocalCcmgr) {
    let started = Instant::now();
    match local.stop_all_owned().await {
        Ok(()) => info!(
            "fenced: every cluster service of this node stopped in {} ms",
            started.elapsed().as_millis()
        ),
        Err(e) => warn!("fencing: {e}"),
    }
}

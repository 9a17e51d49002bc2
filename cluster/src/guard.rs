//! The fence guard (`ccmgr-cluster guard`): a small process the agent starts beside itself,
//! which stops the node's cluster services when the agent can no longer vouch for its lease.
//!
//! The agent writes `life <lease>` when it joins (with a new lease), then `deadline <lease>
//! <ms>` (CLOCK_MONOTONIC) each time that lease is renewed: the time by which the services
//! must be stopped if no renewal follows. A deadline of another lease than the current life's
//! (a keep-alive of an earlier life, late) is ignored.
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
    )
    .with_instance(cfg.instance.as_deref());
    // How long a fence waits for the node's lock (an agent frozen or slow in a start holds
    // it) before it stops the services without it.
    let wait = cfg.fence_margin / 2;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut deadline: Option<Instant> = None;
    let mut life: i64 = 0;
    // The life this guard fenced last: its late deadlines (a keep-alive answered after the
    // fence) are ignored, so that they cannot arm a fence of the next life.
    let mut fenced_life: i64 = 0;
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
                        fence(&local, wait).await;
                        deadline = None;
                        fenced_life = life;
                        let answer = format!("fenced {n}\n");
                        if stdout.write_all(answer.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                            return 0;
                        }
                    } else if let Some(lease) = line.strip_prefix("life ").and_then(|v| v.parse::<i64>().ok()) {
                        life = lease;
                    } else if let Some((lease, ms)) = line
                        .strip_prefix("deadline ")
                        .and_then(|v| v.split_once(' '))
                        .and_then(|(l, m)| Some((l.parse::<i64>().ok()?, m.parse::<u64>().ok()?)))
                    {
                        if lease == life && lease != fenced_life {
                            let now = monotonic_ms();
                            deadline = Some(Instant::now() + Duration::from_millis(ms.saturating_sub(now)));
                        }
                    }
                }
                _ => {
                    warn!("the agent is gone: stopping this node's cluster services");
                    fence(&local, wait).await;
                    return 0;
                }
            },
            _ = sleep_until(at), if deadline.is_some() => {
                warn!("the lease was not renewed in time: stopping this node's cluster services");
                fence(&local, wait).await;
                deadline = None;
                fenced_life = life;
                if stdout.write_all(b"fenced 0\n").await.is_err() || stdout.flush().await.is_err() {
                    return 0;
                }
            }
        }
    }
}

async fn fence(local: &LocalCcmgr, wait: Duration) {
    let started = Instant::now();
    match local.fence_within(wait).await {
        Ok(()) => info!(
            "fenced: every cluster service of this node stopped in {} ms",
            started.elapsed().as_millis()
        ),
        Err(e) => warn!("fencing: {e}"),
    }
}

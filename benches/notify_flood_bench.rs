//! Benchmark of the notify path under attack (issue 9, item 2), against a baseline measured
//! in the same run (figures, never assertions):
//!
//! - readiness: time from a notify service's go to `ccmgr start` returning with it up, with
//!   no flood (baseline) and while `nobody` floods the notify socket with `READY=1`;
//! - cost: the coordinator's CPU time over the flood (baseline: over the same span without
//!   one), the datagrams sent, and the CPU per datagram;
//! - noise: lines added to ccmgr's own log over the span.
//!
//! Needs root (to flood as nobody). Run: `cargo bench --bench notify_flood_bench` (about
//! half a minute; `-- quick` runs one round each).

#[path = "../tests/flood_support/mod.rs"]
mod flood_support;
#[path = "../tests/stack_support/mod.rs"]
mod stack_support;

use std::time::Duration;

use flood_support::Figures;

const SPAN: Duration = Duration::from_secs(4);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn report(label: &str, runs: &[Figures]) {
    let ready = median(runs.iter().map(|f| f.ready_after).collect());
    let cpu: Duration = runs.iter().map(|f| f.coordinator_cpu).sum();
    let span: Duration = runs.iter().map(|f| f.span).sum();
    let sent: u64 = runs.iter().map(|f| f.sent).sum();
    let lines: usize = runs.iter().map(|f| f.log_lines).max().unwrap_or(0);
    let per = if sent > 0 {
        format!("{:.2} µs", cpu.as_secs_f64() / sent as f64 * 1e6)
    } else {
        "-".into()
    };
    println!(
        "{label:<10} ready (median of {}) {:>8.1} ms | coordinator CPU {:>5.1} % of the span | {:>9.0} datagrams/s | CPU per datagram {per} | log lines added (max) {lines}",
        runs.len(),
        ready.as_secs_f64() * 1e3,
        cpu.as_secs_f64() / span.as_secs_f64() * 100.0,
        sent as f64 / span.as_secs_f64(),
    );
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("notify_flood_bench: skipped, needs root to flood as nobody");
        return;
    }
    let rounds = if std::env::args().any(|a| a == "quick") {
        1
    } else {
        3
    };
    let mut baseline = Vec::new();
    let mut flooded = Vec::new();
    for round in 0..rounds {
        baseline.push(flood_support::run(&format!("nfb-base-{round}"), None, SPAN));
        flooded.push(flood_support::run(
            &format!("nfb-flood-{round}"),
            Some(SPAN),
            SPAN,
        ));
    }
    report("no flood", &baseline);
    report("flood", &flooded);
}

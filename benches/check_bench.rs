//! Benchmark of `ccmgr check`'s work on a large generated stack.
//!
//! Generates 10,000 service files (issue 11's size; an instance may have up to `MAX_SERVICES`,
//! 32,768) with ~3 edges each (each service requires or comes after up
//! to three services of lower number, a layered random DAG from a fixed seed), then times, over
//! several rounds, against a baseline measured in the same run:
//! - baseline: reading every file (the I/O any loader must do);
//! - `Config::load`: read, parse, resolve, check references, build the graph, derive orders;
//! - the graph alone: `ServiceGraph::build` on the same edges;
//! - the real binary: `ccmgr check` end to end (process start, load, printing).
//!
//! Run: `cargo bench --bench check_bench` (optionally `-- 1000` for another size, at most
//! `MAX_SERVICES`).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ccmgr::config::{Config, LoadOptions};
use ccmgr::graph::{EdgeKind, ServiceGraph};

/// Services generated when no size is given.
const DEFAULT_SERVICES: usize = 10_000;

/// xorshift64*: a fixed-seed generator, so every run benchmarks the same stack.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn generate(dir: &Path, n: usize) -> (Vec<String>, Vec<(usize, usize, EdgeKind)>) {
    let services = dir.join("services.d");
    fs::create_dir_all(&services).unwrap();
    fs::write(dir.join("ccmgr.toml"), "instance = \"bench\"\n").unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let ids: Vec<String> = (0..n).map(|i| format!("svc{i:05}")).collect();
    let mut edges = Vec::new();
    for i in 0..n {
        let mut requires = Vec::new();
        let mut after = Vec::new();
        if i > 0 {
            for _ in 0..3 {
                let j = rng.below(i);
                let kind = if rng.below(3) == 0 {
                    EdgeKind::After
                } else {
                    EdgeKind::Requires
                };
                let list = if kind == EdgeKind::Requires {
                    &mut requires
                } else {
                    &mut after
                };
                if !list.contains(&j) {
                    list.push(j);
                    edges.push((i, j, kind));
                }
            }
        }
        let quote = |v: &[usize]| {
            v.iter()
                .map(|&j| format!("\"{}\"", ids[j]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text = format!(
            "description = \"generated service {i}\"\ncommand = [\"sleep\", \"infinity\"]\nrequires = [{}]\nafter = [{}]\nstartup_timeout = \"5s\"\n",
            quote(&requires),
            quote(&after)
        );
        fs::write(services.join(format!("{}.toml", ids[i])), text).unwrap();
    }
    (ids, edges)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(f());
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(DEFAULT_SERVICES);
    let tmp = tempfile::tempdir().unwrap();
    let (ids, edges) = generate(tmp.path(), n);
    let options = LoadOptions {
        config_path: Some(tmp.path().join("ccmgr.toml")),
        ..Default::default()
    };
    let files: Vec<_> = fs::read_dir(tmp.path().join("services.d"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let rounds = 7;
    // Warm the page cache once so every measurement sees the same state.
    Config::load(&options).expect("the generated stack is valid");

    let read = time(rounds, || {
        files
            .iter()
            .map(|f| fs::read(f).unwrap().len())
            .sum::<usize>()
    });
    let load = time(rounds, || Config::load(&options).unwrap());
    let graph = time(rounds, || ServiceGraph::build(ids.clone(), &edges).unwrap());
    let binary = env!("CARGO_BIN_EXE_ccmgr");
    let cli = time(rounds, || {
        let out = Command::new(binary)
            .arg("--config")
            .arg(tmp.path().join("ccmgr.toml"))
            .arg("check")
            .output()
            .unwrap();
        assert!(out.status.success());
    });

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "check benchmark: {n} services, {} edges, median of {rounds} rounds",
        edges.len()
    );
    println!(
        "  {:<44} {:>9.1} ms  (baseline)",
        "read every service file",
        ms(read)
    );
    println!(
        "  {:<44} {:>9.1} ms  ({:.1}x baseline)",
        "Config::load (parse, resolve, graph, orders)",
        ms(load),
        ms(load) / ms(read)
    );
    println!(
        "  {:<44} {:>9.1} ms",
        "ServiceGraph::build alone",
        ms(graph)
    );
    println!(
        "  {:<44} {:>9.1} ms  ({:.1}x baseline)",
        "`ccmgr check` end to end",
        ms(cli),
        ms(cli) / ms(read)
    );
}

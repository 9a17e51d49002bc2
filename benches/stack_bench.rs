//! Benchmarks of the coordinator with real processes, each against a baseline measured in the
//! same run (figures, never assertions):
//!
//! 1. start: `ccmgr start` until every service is up, for 100 and 1000 services, flat and as
//!    a layered DAG of width 10 (every service requires all ten of the level below); baseline:
//!    fork+exec of the same number of processes straight from this program, unsupervised.
//! 2. restart: time from `kill -9` of a service to its replacement running and published as
//!    up (median and p99 over 100 kills, `restart_delay = 0`); baseline: this program killing
//!    a child of its own, reaping it and starting another.
//!    Also with two `ccmgr events` readers following, and with the two frozen by SIGSTOP
//!    (a reader that never reads must not slow the coordinator).
//! 3. memory: the coordinator's and the keeper's resident set with 1000 services, against the
//!    same with 1 service.
//! 4. idle: CPU ticks and context switches of the coordinator and the keeper over 10 idle
//!    seconds with 1000 services up (0 expected: no timer, no polling).
//!
//! 5. takeover: time from SIGKILL of the coordinator to the standby acting as coordinator
//!    (it took the locks, adopted the running services and published the adopted state), and
//!    to a new standby being recorded (median and p99 over 100 rounds); baseline: fork+exec
//!    of the same binary to its exit (`ccmgr --version`), the cost of starting any process.
//!
//! Run: `cargo bench --bench stack_bench` (about a minute; `-- quick` skips the 1000s).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ccmgr::shm::{Segment, ServiceState};

const CCMGR: &str = env!("CARGO_BIN_EXE_ccmgr");

struct Stack {
    dir: tempfile::TempDir,
    instance: String,
}

impl Stack {
    /// `levels` levels of `width` services; each service requires all of the level below.
    fn new(name: &str, levels: usize, width: usize, extra: &str) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let instance = format!("bench-{safe}-{}", std::process::id());
        std::fs::write(
            dir.path().join("ccmgr.toml"),
            format!(
                "instance = \"{instance}\"\nlog_dir = \"log\"\nrun_dir = \"run\"\n[coordinator]\nstandby = false\nstartup_timeout = \"600s\"\nrestart_retry_counter = 1000\nrestart_time_span = \"3h\"\n"
            ),
        )
        .unwrap();
        let services = dir.path().join("services.d");
        std::fs::create_dir_all(&services).unwrap();
        for level in 0..levels {
            for i in 0..width {
                let requires: Vec<String> = if level == 0 {
                    Vec::new()
                } else {
                    (0..width)
                        .map(|j| format!("\"s{:03}-{j:03}\"", level - 1))
                        .collect()
                };
                std::fs::write(
                    services.join(format!("s{level:03}-{i:03}.toml")),
                    format!(
                        "command = [\"sleep\", \"infinity\"]\nrequires = [{}]\n{extra}\n",
                        requires.join(", ")
                    ),
                )
                .unwrap();
            }
        }
        Stack { dir, instance }
    }

    fn ccmgr(&self, verb: &str) -> Duration {
        let started = Instant::now();
        let out = Command::new(CCMGR)
            .arg("--config")
            .arg(self.dir.path().join("ccmgr.toml"))
            .arg(verb)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    }

    fn segment(&self) -> Segment {
        Segment::open(&self.dir.path().join("run"), &self.instance).unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new(CCMGR)
            .arg("--config")
            .arg(self.dir.path().join("ccmgr.toml"))
            .arg("stop")
            .stdout(Stdio::null())
            .status();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Fork+exec `n` sleeps directly and kill them: the floor any supervisor stands on.
fn baseline_spawn(n: usize) -> Duration {
    let started = Instant::now();
    let mut children: Vec<_> = (0..n)
        .map(|_| {
            Command::new("sleep")
                .arg("infinity")
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let elapsed = started.elapsed();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    elapsed
}

fn bench_start(label: &str, levels: usize, width: usize) {
    let n = levels * width;
    let stack = Stack::new(label, levels, width, "");
    let start = stack.ccmgr("start");
    let stop = stack.ccmgr("stop");
    let base = baseline_spawn(n);
    println!(
        "  {label:<24} {n:>5} services: start {:>8.1} ms ({:>4.1}x baseline {:>6.1} ms), stop {:>7.1} ms",
        ms(start),
        ms(start) / ms(base),
        ms(base),
        ms(stop)
    );
}

/// Kill -9 of the only service until its replacement is published as up, 100 times.
fn restart_samples(seg: &Segment) -> Vec<Duration> {
    let mut samples = Vec::new();
    for _ in 0..100 {
        let before = seg.service_status(0).unwrap().process.unwrap();
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(before.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        loop {
            let st = seg.service_status(0).unwrap();
            if st.state == ServiceState::Up && st.process.is_some_and(|p| p.pid != before.pid) {
                samples.push(t0.elapsed());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no replacement");
            std::thread::yield_now();
        }
    }
    samples.sort();
    samples
}

/// Two `ccmgr events --json` readers of `stack`, output discarded; killed on drop.
struct Readers(Vec<std::process::Child>);

impl Readers {
    fn spawn(stack: &Stack) -> Readers {
        Readers(
            (0..2)
                .map(|_| {
                    Command::new(CCMGR)
                        .arg("--config")
                        .arg(stack.dir.path().join("ccmgr.toml"))
                        .args(["events", "--json"])
                        .stdout(Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        for c in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal);
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bench_restart() {
    let stack = Stack::new("restart", 1, 1, "restart_delay = \"0ms\"");
    stack.ccmgr("start");
    let seg = stack.segment();
    let samples = restart_samples(&seg);
    // The same with two event readers following, then with the two frozen (SIGSTOP): a
    // reader never reading must cost the coordinator nothing (issue 10, "events").
    let readers = Readers::spawn(&stack);
    let following = restart_samples(&seg);
    readers.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen = restart_samples(&seg);
    readers.signal(nix::sys::signal::Signal::SIGCONT);
    drop(readers);
    let mut base = Vec::new();
    let mut child = Command::new("sleep").arg("infinity").spawn().unwrap();
    for _ in 0..100 {
        let t0 = Instant::now();
        child.kill().unwrap();
        child.wait().unwrap();
        child = Command::new("sleep").arg("infinity").spawn().unwrap();
        base.push(t0.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    base.sort();
    println!(
        "  kill -9 -> replacement up: median {:.3} ms, p99 {:.3} ms (baseline kill/reap/respawn: median {:.3} ms, p99 {:.3} ms; {:.1}x)",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&base, 0.5)),
        ms(percentile(&base, 0.99)),
        ms(percentile(&samples, 0.5)) / ms(percentile(&base, 0.5)),
    );
    for (label, s) in [
        ("2 event readers following", &following),
        ("2 event readers frozen", &frozen),
    ] {
        println!(
            "    with {label}: median {:.3} ms, p99 {:.3} ms ({:.2}x without readers)",
            ms(percentile(s, 0.5)),
            ms(percentile(s, 0.99)),
            ms(percentile(s, 0.5)) / ms(percentile(&samples, 0.5)),
        );
    }
}

/// (VmRSS kB, utime+stime ticks, voluntary + involuntary context switches) of `pid`.
fn proc_figures(pid: i32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    (
        field("VmRSS:"),
        ticks,
        field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:"),
    )
}

fn parties(stack: &Stack) -> (i32, i32) {
    let st = stack.segment().instance_status().unwrap();
    (st.coordinator.unwrap().pid, st.keeper.unwrap().pid)
}

fn bench_memory_and_idle(quick: bool) {
    let one = Stack::new("rss-1", 1, 1, "");
    one.ccmgr("start");
    let (c1, k1) = parties(&one);
    let (c1_rss, _, _) = proc_figures(c1);
    let (k1_rss, _, _) = proc_figures(k1);
    drop(one);
    let n = if quick { 100 } else { 1000 };
    let big = Stack::new("rss-n", n / 10, 10, "");
    big.ccmgr("start");
    let (c, k) = parties(&big);
    let (c_rss, c_ticks0, c_sw0) = proc_figures(c);
    let (k_rss, k_ticks0, k_sw0) = proc_figures(k);
    println!(
        "  RSS with {n} services: coordinator {c_rss} kB, keeper {k_rss} kB (with 1 service: {c1_rss} kB, {k1_rss} kB)"
    );
    std::thread::sleep(Duration::from_secs(10));
    let (_, c_ticks1, c_sw1) = proc_figures(c);
    let (_, k_ticks1, k_sw1) = proc_figures(k);
    println!(
        "  10 idle seconds with {n} services: coordinator {} CPU ticks, {} context switches; keeper {} ticks, {} switches",
        c_ticks1 - c_ticks0,
        c_sw1 - c_sw0,
        k_ticks1 - k_ticks0,
        k_sw1 - k_sw0
    );
}

fn bench_takeover() {
    let stack = Stack::new("takeover", 1, 10, "");
    // Standby on (the Stack helper turns it off for the other benchmarks).
    let config = stack.dir.path().join("ccmgr.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("standby = false", "standby = true");
    std::fs::write(&config, text).unwrap();
    stack.ccmgr("start");
    let seg = stack.segment();
    let wait_standby = |not: Option<i32>| -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = seg.instance_status().unwrap();
            if let Some(s) = st.standby.filter(|s| Some(s.pid) != not && s.is_alive()) {
                return s.pid;
            }
            assert!(Instant::now() < deadline, "no standby");
            std::thread::yield_now();
        }
    };
    let mut standby = wait_standby(None);
    let (mut takeovers, mut replacements) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let coordinator = seg.instance_status().unwrap().coordinator.unwrap().pid;
        let t0 = Instant::now();
        let t0_ms = ccmgr::shm::monotonic_ms();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(coordinator),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        loop {
            let st = seg.instance_status().unwrap();
            // The new coordinator publishes its adopted state with a transition time after
            // the kill: only then is it acting.
            if st.coordinator.is_some_and(|c| c.pid == standby) && st.last_transition_ms >= t0_ms {
                takeovers.push(t0.elapsed());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no takeover");
            std::thread::yield_now();
        }
        let old = standby;
        standby = wait_standby(Some(old));
        replacements.push(t0.elapsed());
    }
    takeovers.sort();
    replacements.sort();
    let mut base: Vec<Duration> = (0..20)
        .map(|_| {
            let t0 = Instant::now();
            Command::new(CCMGR)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .unwrap();
            t0.elapsed()
        })
        .collect();
    base.sort();
    println!(
        "  coordinator SIGKILL -> standby acting: median {:.2} ms, p99 {:.2} ms; -> new standby recorded: median {:.2} ms, p99 {:.2} ms (baseline: fork+exec of ccmgr --version, median {:.2} ms)",
        ms(percentile(&takeovers, 0.5)),
        ms(percentile(&takeovers, 0.99)),
        ms(percentile(&replacements, 0.5)),
        ms(percentile(&replacements, 0.99)),
        ms(percentile(&base, 0.5)),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    assert!(Path::new(CCMGR).exists());
    println!("stack benchmark (real processes; baselines measured in the same run)");
    bench_start("flat", 1, 100);
    bench_start("layered (width 10)", 10, 10);
    if !quick {
        bench_start("flat", 1, 1000);
        bench_start("layered (width 10)", 100, 10);
    }
    bench_restart();
    bench_takeover();
    bench_memory_and_idle(quick);
}

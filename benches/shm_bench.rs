//! Benchmark of the shared-memory substrate (`cargo bench --bench shm_bench`):
//!
//! 1. death-to-wake-up: a helper process locks the daemon mutex; a thread of
//!    ours blocks in `lock()` (checked in `/proc/self/task/<tid>/syscall`); we
//!    read CLOCK_MONOTONIC just before `kill(SIGKILL)`, the waiter reads it as
//!    soon as `lock()` returns. Median, p99 and max over the rounds.
//! 2. an uncontended lock/unlock pair of a robust mutex in the segment, beside
//!    an uncontended `std::sync::Mutex` pair measured in the same run.
//!
//! Figures, not assertions. `CCMGR_BENCH_ROUNDS` changes the number of
//! rounds of (1) (default 1000).

use std::hint::black_box;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ccmgr::shm::{Acquired, MutexId, Segment, SegmentSpec, ServiceStatic, SharedMutex};

const ROLE_VAR: &str = "CCMGR_BENCH_ROLE";
const INSTANCE_VAR: &str = "CCMGR_BENCH_INSTANCE";
const RUN_DIR_VAR: &str = "CCMGR_BENCH_RUN_DIR";
const PATIENCE: Duration = Duration::from_secs(30);

/// Removes the bench's segment on the way out, even on panic.
struct Cleanup(String, tempfile::TempDir);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Segment::remove(self.1.path(), &self.0);
    }
}

/// The helper: lock the daemon mutex on the main thread, say so, then wait
/// to be killed (or for stdin to close).
fn holder(run_dir: &std::path::Path, instance: &str) -> ! {
    let seg = Segment::open(run_dir, instance).expect("holder opening the segment");
    seg.mutex(MutexId::Daemon)
        .unwrap()
        .lock()
        .unwrap()
        .hold_until_exit();
    println!("locked");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

/// Poll until thread `tid` of this process is blocked in futex() on `addr`.
fn wait_until_blocked_on(tid: i32, addr: usize) {
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut f = text.split_whitespace();
        let nr = f.next().and_then(|s| s.parse::<i64>().ok());
        let arg0 = f
            .next()
            .and_then(|s| usize::from_str_radix(s.trim_start_matches("0x"), 16).ok());
        if nr == Some(libc::SYS_futex) && arg0 == Some(addr) {
            return;
        }
        assert!(Instant::now() < deadline, "waiter never blocked");
        std::thread::yield_now();
    }
}

/// One round: nanoseconds from just before SIGKILL to the waiter's return.
fn death_to_wakeup(run_dir: &std::path::Path, instance: &str, mutex: &SharedMutex) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(ROLE_VAR, "holder")
        .env(INSTANCE_VAR, instance)
        .env(RUN_DIR_VAR, run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the holder");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked", "holder did not lock");

    let (tid_tx, tid_rx) = mpsc::channel();
    let waiter_mutex = mutex.clone();
    let waiter = std::thread::spawn(move || {
        tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
        let guard = waiter_mutex.lock().unwrap();
        let woke = Instant::now();
        assert_eq!(guard.acquired(), Acquired::PreviousHolderDied);
        woke
    });
    wait_until_blocked_on(tid_rx.recv().unwrap(), mutex.futex_address());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let killed = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let woke = waiter.join().expect("waiter");
    child.wait().unwrap();
    woke.duration_since(killed).as_nanos() as u64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Nanoseconds per iteration of `f`, the median of `runs` runs.
fn per_iteration(runs: usize, iterations: u64, mut f: impl FnMut()) -> f64 {
    let mut results: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    results.sort_by(f64::total_cmp);
    results[runs / 2]
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_VAR) {
        assert_eq!(role, "holder");
        holder(
            std::path::Path::new(&std::env::var_os(RUN_DIR_VAR).unwrap()),
            &std::env::var(INSTANCE_VAR).unwrap(),
        );
    }
    let rounds: usize = std::env::var("CCMGR_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1000);
    let instance = format!("bench.{}", std::process::id());
    let cleanup = Cleanup(
        instance.clone(),
        tempfile::tempdir().expect("a run directory"),
    );
    let run_dir = cleanup.1.path().to_owned();
    let spec = SegmentSpec {
        instance: instance.clone(),
        run_dir: run_dir.clone(),
        group: None,
        services: vec![ServiceStatic {
            id: "svc".into(),
            startup_timeout_ms: 1000,
            shutdown_timeout_ms: 1000,
        }],
        startup_sequence: vec![0],
        shutdown_sequence: vec![0],
        config_blob: b"bench".to_vec(),
    };
    let (seg, starting) = Segment::create(&spec).expect("creating the bench segment");
    drop(starting);
    let daemon = seg.mutex(MutexId::Daemon).unwrap();

    eprintln!("death-to-wake-up: {rounds} rounds...");
    let mut samples: Vec<u64> = (0..rounds)
        .map(|_| death_to_wakeup(&run_dir, &instance, &daemon))
        .collect();
    samples.sort_unstable();

    let iterations = 1_000_000;
    let shm = seg.mutex(MutexId::Shm).unwrap();
    let robust_pair = per_iteration(5, iterations, || {
        drop(black_box(shm.lock().unwrap()));
    });
    let robust_try_pair = per_iteration(5, iterations, || {
        drop(black_box(shm.try_lock().unwrap()));
    });
    let std_mutex = std::sync::Mutex::new(0u64);
    let std_pair = per_iteration(5, iterations, || {
        *black_box(std_mutex.lock().unwrap()) += 1;
    });

    let us = |ns: u64| ns as f64 / 1000.0;
    println!();
    println!("ccmgr shm benchmark ({} CPUs online)", num_cpus());
    println!("{:<52} {:>12}", "measure", "value");
    println!("{:-<65}", "");
    println!(
        "{:<52} {:>9.1} us",
        format!("SIGKILL of holder -> waiter wakes, median (n={rounds})"),
        us(percentile(&samples, 50.0))
    );
    println!("{:<52} {:>9.1} us", "  p90", us(percentile(&samples, 90.0)));
    println!("{:<52} {:>9.1} us", "  p99", us(percentile(&samples, 99.0)));
    println!("{:<52} {:>9.1} us", "  min", us(samples[0]));
    println!("{:<52} {:>9.1} us", "  max", us(*samples.last().unwrap()));
    println!(
        "{:<52} {:>9.1} ns",
        "robust mutex lock+unlock, uncontended (1M pairs)", robust_pair
    );
    println!(
        "{:<52} {:>9.1} ns",
        "robust mutex try_lock+unlock, uncontended", robust_try_pair
    );
    println!(
        "{:<52} {:>9.1} ns",
        "std::sync::Mutex lock+unlock, uncontended", std_pair
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

//! An example service that uses ccmgr's service API (the Rust one; `examples/c/` has the same
//! service in C).
//!
//! Started by ccmgr with `-cc` as its first argument it registers (`alive`), initialises,
//! says `ready`, then serves: here, a heartbeat line on stdout now and then. When its turn to
//! shut down comes, the callback appends `begin <id> <t>` and, after the service's clean-up
//! (`CC_SERVICE_STOP_MS`, default 0), `shutdown <id> <t> <reason>` to the log file, where `t`
//! is `CLOCK_MONOTONIC` in nanoseconds; then the service exits. Without `-cc` it serves
//! without ccmgr until it is killed.
//!
//! ```toml
//! # services.d/example.toml
//! command = ["/path/to/cc_service", "--log", "/tmp/cc_service.log"]
//! cc_arg = true
//! ready = "cc"
//! ```
//!
//! Settings: `--log PATH` (else `$CC_SERVICE_LOG`; none: no log), `$CC_SERVICE_STOP_MS`,
//! `$CC_SERVICE_INIT_MS` (initialisation time, default 0), `$CC_SERVICE_HEARTBEAT_MS`
//! (default 1000).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use ccmgr::service::{self, Shutdown};

fn monotonic_ns() -> u128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128
}

fn append(log: Option<&Path>, line: &str) {
    let Some(path) = log else { return };
    // O_APPEND: one write per line, so lines of several services never interleave.
    let written = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("cc_service: cannot append to {}: {e}", path.display());
    }
}

fn millis(var: &str, default: u64) -> Duration {
    let ms = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Duration::from_millis(ms)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let log: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--log")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CC_SERVICE_LOG").map(PathBuf::from));
    let stop_time = millis("CC_SERVICE_STOP_MS", 0);
    let (stop, stopped) = mpsc::channel::<()>();

    // FIG. 6: register only when started with -cc; terminate if the API fails.
    let registration = if service::invoked_with_cc(&args) {
        let log = log.clone();
        let stop = stop.clone();
        let on_shutdown = move |shutdown: Shutdown| {
            append(
                log.as_deref(),
                &format!("begin {} {}", shutdown.service, monotonic_ns()),
            );
            // The service's clean-up.
            std::thread::sleep(stop_time);
            append(
                log.as_deref(),
                &format!(
                    "shutdown {} {} {}",
                    shutdown.service,
                    monotonic_ns(),
                    match shutdown.reason {
                        service::ShutdownReason::Requested { .. } => "requested",
                        service::ShutdownReason::CoordinatorDied => "coordinator-died",
                    }
                ),
            );
            let _ = stop.send(());
        };
        match service::alive(on_shutdown) {
            Ok(alive) => Some(alive),
            Err(e) => {
                eprintln!("cc_service: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        eprintln!("cc_service: not started with -cc: serving without ccmgr");
        None
    };

    // Initialisation.
    std::thread::sleep(millis("CC_SERVICE_INIT_MS", 0));
    if let Some(alive) = &registration {
        if let Err(e) = alive.ready() {
            eprintln!("cc_service: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("cc_service: {} is ready", alive.service());
    }

    // Serve until the shutdown callback says stop.
    let heartbeat = millis("CC_SERVICE_HEARTBEAT_MS", 1000);
    let mut beats = 0u64;
    loop {
        match stopped.recv_timeout(heartbeat) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                beats += 1;
                println!("heartbeat {beats}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("`stop` lives in main"),
        }
    }
    drop(stop);
    ExitCode::SUCCESS
}

//! The helpers bench/run needs that must cost as little as possible, so that they measure the
//! floor rather than themselves (every mode is a few system calls; no allocation in the loops
//! beyond what `Command` does):
//!
//! - `floor THREADS COUNT SCRIPT`: the spawn floor. Forks and execs COUNT services
//!   `sh -c SCRIPT NAME` (`NAME` is `$0`: `s0000`, `s0001`, ...) from THREADS threads, nothing
//!   else (no supervision, no logs, no readiness), then waits to be killed. The services stay in
//!   this process's process group, so bench/run kills them all with one `kill(-pgid)`.
//! - `respawn COUNT SCRIPT`: the bare reap-and-respawn loop. Starts COUNT services as above,
//!   then loops on `waitpid(-1)` and starts the same name again at once: the least any
//!   supervisor can do between a death and its replacement.
//! - `notify-exec PROGRAM ARGS...`: sends `READY=1` to `$NOTIFY_SOCKET` from this process, then
//!   execs PROGRAM. A service run as `sh -c '...; exec ccmgr-bench notify-exec sleep ...'`
//!   declares itself ready from its main pid at the cost of one exec of this small binary.
//!
//! `Command::spawn` is std's fork+exec (a `clone(CLONE_VM|CLONE_VFORK)` + exec where it can):
//! the cheapest way a Rust program starts a process.

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::sync::Arc;

use nix::sys::wait::waitpid;

fn service(script: &str, name: &str) -> Command {
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script).arg(name);
    command
}

fn name(index: usize) -> String {
    format!("s{index:04}")
}

/// Starts one service and returns its pid. The `Child` is dropped on purpose: the floor never
/// waits (its services live until bench/run kills the process group) and the respawn loop reaps
/// through `waitpid(-1)`, which clippy cannot see.
#[expect(
    clippy::zombie_processes,
    reason = "reaped by waitpid(-1) or killed with the group"
)]
fn spawn(script: &str, name: &str) -> i32 {
    let child = service(script, name)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start service {name}: {error}"));
    child.id() as i32
}

/// Children are never waited for: they live until bench/run kills the process group.
fn floor(threads: usize, count: usize, script: &str) -> ExitCode {
    let script: Arc<str> = Arc::from(script);
    let workers: Vec<_> = (0..threads)
        .map(|thread| {
            let script = Arc::clone(&script);
            std::thread::spawn(move || {
                for index in (thread..count).step_by(threads) {
                    spawn(&script, &name(index));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a spawning thread panicked");
    }
    loop {
        std::thread::park();
    }
}

fn respawn(count: usize, script: &str) -> ExitCode {
    let mut names: HashMap<i32, String> = HashMap::new();
    for index in 0..count {
        let name = name(index);
        names.insert(spawn(script, &name), name);
    }
    loop {
        // waitpid(-1): whichever child ended first
        let pid = match waitpid(None, None) {
            Ok(status) => match status.pid() {
                Some(pid) => pid.as_raw(),
                None => continue,
            },
            Err(error) => {
                eprintln!("ccmgr-bench respawn: waitpid: {error}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(name) = names.remove(&pid) {
            names.insert(spawn(script, &name), name);
        }
    }
}

fn notify_exec(program: &str, args: &[String]) -> ExitCode {
    if let Ok(path) = std::env::var("NOTIFY_SOCKET") {
        let sent = UnixDatagram::unbound().and_then(|socket| socket.send_to(b"READY=1", &path));
        if let Err(error) = sent {
            eprintln!("ccmgr-bench notify-exec: cannot send READY=1 to {path}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let error = Command::new(program).args(args).exec();
    eprintln!("ccmgr-bench notify-exec: cannot execute {program}: {error}");
    ExitCode::FAILURE
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: ccmgr-bench floor THREADS COUNT SCRIPT | respawn COUNT SCRIPT | notify-exec PROGRAM [ARGS...]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |text: &str| text.parse::<usize>().ok().filter(|n| *n > 0);
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["floor", threads, count, script] => match (number(threads), number(count)) {
            (Some(threads), Some(count)) => floor(threads, count, script),
            _ => usage(),
        },
        ["respawn", count, script] => match number(count) {
            Some(count) => respawn(count, script),
            None => usage(),
        },
        ["notify-exec", program, ..] => notify_exec(program, &args[2..]),
        _ => usage(),
    }
}

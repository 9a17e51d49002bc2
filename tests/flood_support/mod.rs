//! A notify flood from another user against a real stack, measured: how long a notify
//! service takes from its go to "up" (with or without the flood running), how much CPU the
//! coordinator spent during the flood, and how many lines its log grew by. Shared by
//! tests/notify_flood.rs (bounds) and benches/notify_flood_bench.rs (figures).
//!
//! The flooder is python3 run as `nobody` (through `setpriv`, groups cleared), sending
//! `READY=1` to the instance's notify socket as fast as it can, as the attack in issue 9 did.
//! Needs root.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stack_support::{Stack, ccmgr_bin, text};

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    /// From the go file's creation to `ccmgr start` returning with every service up.
    pub ready_after: Duration,
    /// The coordinator's CPU time (user + system) over the flood (or over the same span
    /// without one).
    pub coordinator_cpu: Duration,
    /// How long that span was.
    pub span: Duration,
    /// Lines added to ccmgr's own log (all its files) over the span.
    pub log_lines: usize,
    /// Datagrams the flooder sent.
    pub sent: u64,
}

const FLOODER: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(sys.argv[1])
s.settimeout(0.1)
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    try:
        s.send(b"READY=1")
        n += 1
    except OSError:
        pass
    if n == 1000:
        print("flooding", flush=True)
        n += 1
print(n, flush=True)
"#;

/// The flooder: killed (by pid) and reaped on drop.
struct Flooder(Child);

impl Drop for Flooder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (utime + stime) of `pid`, from /proc/<pid>/stat.
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, whole line).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Lines in ccmgr's own log, its rotated files included.
fn log_lines(stack: &Stack) -> usize {
    let base = stack
        .log_dir()
        .join(format!("ccmgr-{}.log", stack.instance));
    let mut paths = vec![base.clone()];
    paths.extend((1..=3).map(|n| base.with_extension(format!("log.{n}"))));
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count())
        .sum()
}

/// Starts a stack whose notify service `late` waits for a go file, floods its notify socket
/// for `flood` (as nobody) if asked, gives the go, and measures. `name` names the stack.
pub fn run(name: &str, flood: Option<Duration>, span: Duration) -> Figures {
    let stack = Stack::new(
        name,
        "[coordinator]\nstandby = false\nstartup_timeout = \"30s\"",
        &[],
    );
    // nobody must reach the socket in run_dir: the test's temp dir is 0700.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(stack.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let go = stack.file("go");
    stack.write_service("base", "command = [\"sleep\", \"1000\"]\n");
    stack.write_service(
        "late",
        &format!(
            r#"command = ["sh", "-c", "while [ ! -e {go} ]; do sleep 0.005; done; exec /usr/bin/python3 -c 'import os,socket,time; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ[\"NOTIFY_SOCKET\"]); s.send(b\"READY=1\"); time.sleep(1000)'"]
ready = "notify"
startup_timeout = "20s"
after = ["base"]
"#
        ),
    );
    let config = stack.path().join("ccmgr.toml");
    let start = std::thread::spawn(move || {
        let out = Command::new(ccmgr_bin())
            .arg("--config")
            .arg(config)
            .arg("start")
            .env_remove("CCMGR_CONFIG")
            .output()
            .expect("ccmgr runs");
        (out, Instant::now())
    });
    let socket = stack
        .path()
        .join("run")
        .join(format!("{}.notify", stack.instance));
    let status = stack.wait_for_relaxed("the coordinator and base", Duration::from_secs(20), |s| {
        s.as_ref().is_some_and(|s| {
            s["coordinator"]["pid"].is_i64()
                && s["services"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|x| x["id"] == "late" && x["pid"].is_i64()))
        })
    });
    let coordinator = status.unwrap()["coordinator"]["pid"].as_i64().unwrap() as i32;
    assert!(socket.exists(), "{} should exist", socket.display());

    let mut flooder = flood.map(|flood| {
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(FLOODER)
            .arg(&socket)
            .arg(format!("{}", flood.as_secs_f64()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv runs python3 as nobody");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let flooder = Flooder(child);
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "flooding", "the flooder could not flood");
        (flooder, out)
    });
    let since = Instant::now();
    let cpu_before = cpu_time(coordinator);
    let lines_before = log_lines(&stack);

    std::fs::write(&go, "").unwrap();
    let go_at = Instant::now();
    let (out, up_at) = start.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "start failed:\n{}", text(&out));
    let ready_after = up_at - go_at;

    let sent = match flooder.as_mut() {
        Some((_, out)) => {
            let mut last = String::new();
            out.read_line(&mut last).unwrap();
            last.trim().parse().unwrap_or(0)
        }
        None => {
            // The same span without a flood: the idle cost, for comparison.
            std::thread::sleep(span.saturating_sub(since.elapsed()));
            0
        }
    };
    let span = since.elapsed();
    let figures = Figures {
        ready_after,
        coordinator_cpu: cpu_time(coordinator).saturating_sub(cpu_before),
        span,
        log_lines: log_lines(&stack).saturating_sub(lines_before),
        sent,
    };
    drop(flooder);
    stack.stop();
    figures
}

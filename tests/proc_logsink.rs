//! Real-process tests of `ccmgr::logsink`: a flood of output through a real service ends up
//! bounded on disk, and `tail` reads the last lines across rotation.

mod proc_support;

use std::fs;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use ccmgr::logsink::{DRAIN_BUDGET, LogSink, log_path, rotated_path, tail};
use ccmgr::spawn::ProcessExit;
use proc_support::*;

/// Drains the service's output into `sink` the way the coordinator's loop does: poll until
/// readable, drain, repeat until end-of-file. Returns the bytes moved and the largest number
/// moved by a single call.
fn drain_until_eof(sink: &mut LogSink, started: &Started) -> (u64, usize) {
    let deadline = Instant::now() + TIMEOUT * 4;
    let (mut total, mut largest) = (0u64, 0usize);
    loop {
        let out = sink.drain(started.output.as_fd()).unwrap();
        total += out.bytes as u64;
        largest = largest.max(out.bytes);
        if out.eof {
            return (total, largest);
        }
        if !out.more {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                wait_readable(started.output.as_fd(), left),
                "output stalled after {total} bytes"
            );
        }
    }
}

fn dir_usage(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_flood_of_100_mb_stays_within_the_rotation_bound() {
    const MAX: u64 = 1 << 20;
    const KEEP: u32 = 3;
    // 9,090,909 lines of "abcdefghij\n": 99,999,999 bytes, then a marker line.
    let script = "yes abcdefghij | head -c 99999999; echo LAST-LINE-MARKER";
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let mut sink = LogSink::open(&logs, "flood", MAX, KEEP).unwrap();
    let mut started = start(
        &["/bin/sh", "-c", script],
        &[("PATH", "/usr/bin:/bin")],
        tmp.path(),
    );
    let (total, largest) = drain_until_eof(&mut sink, &started);
    assert_eq!(started.child.wait(TIMEOUT), ProcessExit::Exited(0));

    assert_eq!(total, 99_999_999 + "LAST-LINE-MARKER\n".len() as u64);
    assert!(largest <= DRAIN_BUDGET, "one drain moved {largest} bytes");
    let usage = dir_usage(&logs);
    let names: Vec<&str> = usage.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["flood.log", "flood.log.1", "flood.log.2", "flood.log.3"]
    );
    let on_disk: u64 = usage.iter().map(|(_, len)| len).sum();
    assert!(
        on_disk <= (KEEP as u64 + 1) * MAX,
        "{on_disk} bytes on disk: {usage:?}"
    );
    assert!(usage.iter().all(|(_, len)| *len <= MAX), "{usage:?}");
    // Rotated files are full to within one line; lines are never cut here.
    for n in 1..=KEEP {
        let text = fs::read(rotated_path(&logs, "flood", n)).unwrap();
        assert!(text.len() as u64 > MAX - 11, "{n}: {}", text.len());
        assert!(text.starts_with(b"abcdefghij\n") && text.ends_with(b"abcdefghij\n"));
    }
    let current = fs::read(log_path(&logs, "flood")).unwrap();
    assert!(current.ends_with(b"abcdefghij\nLAST-LINE-MARKER\n"));
    assert_eq!(tail(&logs, "flood", 2), ["abcdefghij", "LAST-LINE-MARKER"]);
}

#[test]
fn tail_reads_the_last_lines_across_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sink = LogSink::open(tmp.path(), "seq", 4096, 2).unwrap();
    let mut started = start(&["/usr/bin/seq", "1", "2000"], &[], tmp.path());
    drain_until_eof(&mut sink, &started);
    assert!(started.child.wait(TIMEOUT).success());

    let current = fs::read_to_string(log_path(tmp.path(), "seq")).unwrap();
    let in_current = current.lines().count();
    assert!(
        in_current < 300,
        "the test needs a short current file: {in_current}"
    );
    let expected: Vec<String> = (1701..=2000).map(|n| n.to_string()).collect();
    assert_eq!(tail(tmp.path(), "seq", 300), expected);
    assert_eq!(tail(tmp.path(), "seq", 1), ["2000"]);
}

//! ccmgr's own log is shared by several processes (keeper, coordinator, standby) and rotated
//! by whichever finds it full: two real writer processes append to one [`SharedLog`] with a
//! small cap at once, and every file stays within the cap (give or take the lines in flight
//! at a rotation), no more than `keep` old files remain, lines stay whole, and each writer's
//! lines stay in order across the files: nobody kept writing into a rotated file.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use ccmgr::logging::SharedLog;

const WRITER_ENV: &str = "CCMGR_TEST_SHARED_LOG_WRITER";
const CAP: u64 = 16 << 10;
const KEEP: u32 = 3;
const LINES: u32 = 4000;
/// Each line is exactly this long, newline included.
const LINE_LEN: usize = 64;

fn line(writer: &str, seq: u32) -> String {
    let head = format!("{writer} {seq:08} ");
    format!("{head}{}\n", "x".repeat(LINE_LEN - head.len() - 1))
}

fn write_lines(path: &Path, writer: &str) {
    let mut log = SharedLog::open(path, CAP, KEEP).unwrap();
    for seq in 0..LINES {
        // One write per line, as tracing's formatter does.
        log.write_all(line(writer, seq).as_bytes()).unwrap();
    }
}

#[test]
fn two_writer_processes_share_one_rotated_log() {
    if let Some(spec) = std::env::var_os(WRITER_ENV) {
        let spec = spec.into_string().unwrap();
        let (writer, path) = spec.split_once(':').unwrap();
        write_lines(Path::new(path), writer);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ccmgr-test.log");
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = ["a", "b"]
        .iter()
        .map(|writer| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "two_writer_processes_share_one_rotated_log",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(WRITER_ENV, format!("{writer}:{}", path.display()))
                .spawn()
                .unwrap()
        })
        .collect();
    // Both run to completion (reaped here even if one fails).
    let statuses: Vec<_> = children.iter_mut().map(|c| c.wait().unwrap()).collect();
    assert!(statuses.iter().all(|s| s.success()), "{statuses:?}");

    let rotated = |n: u32| dir.path().join(format!("ccmgr-test.log.{n}"));
    // Oldest first.
    let files: Vec<_> = (1..=KEEP)
        .rev()
        .map(rotated)
        .chain([path.clone()])
        .collect();
    assert!(
        !rotated(KEEP + 1).exists(),
        "only {KEEP} old files are kept"
    );
    // 2 × 4000 × 64 bytes is 500 KiB: far more than fits, so every old file exists.
    let mut last_seq = std::collections::HashMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("{} should exist: {e}", file.display()));
        // A writer checks the size before each line: a file passes the cap by at most the
        // lines the two writers had in flight when it was rotated.
        assert!(
            text.len() as u64 <= CAP + 4 * LINE_LEN as u64,
            "{} has {} bytes, over the cap of {CAP}",
            file.display(),
            text.len()
        );
        for l in text.lines() {
            assert_eq!(l.len() + 1, LINE_LEN, "a torn or interleaved line: {l:?}");
            let mut words = l.split(' ');
            let writer = words.next().unwrap().to_owned();
            let seq: u32 = words.next().unwrap().parse().unwrap();
            if let Some(&before) = last_seq.get(&writer) {
                assert!(
                    seq > before,
                    "{writer}'s line {seq} comes after its line {before} ({})",
                    file.display()
                );
            }
            last_seq.insert(writer, seq);
        }
    }
    // The newest lines are kept: the last line written by either writer is there.
    assert!(
        last_seq.values().any(|&seq| seq == LINES - 1),
        "{last_seq:?}"
    );
}

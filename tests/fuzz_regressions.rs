//! Fuzzing's findings, kept: every input the fuzzer (fuzz/run.sh) found to crash or hang a
//! target is saved under tests/fuzz_regressions/TARGET/ and replayed here through the same
//! target code (fuzz/src/targets.rs), so a fixed defect stays fixed. Then a short bounded
//! random run of each target (proptest, no extra tool) keeps the targets themselves working
//! under plain `cargo test`.

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;

/// Far above what any input takes (milliseconds); a replay that needs this long is a hang.
const REPLAY_LIMIT: Duration = Duration::from_secs(5);

fn replay_saved(target: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let started = Instant::now();
        targets::run(target, &data);
        let took = started.elapsed();
        assert!(
            took < REPLAY_LIMIT,
            "{} took {took:?} in target {target}",
            file.display()
        );
    }
    files.len()
}

#[test]
fn saved_findings_no_longer_crash_or_hang() {
    for target in targets::TARGETS {
        let n = replay_saved(target);
        eprintln!("{target}: {n} saved input(s) replayed");
    }
}

/// The seeds fuzz/run.sh starts from pass: the targets accept what they were built around.
#[test]
fn the_seeds_pass() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for target in targets::TARGETS {
        for seed in targets::generated_seeds(target) {
            targets::run(target, &seed);
        }
        if let Ok(entries) = std::fs::read_dir(seeds.join(target)) {
            for entry in entries {
                targets::run(target, &std::fs::read(entry.unwrap().path()).unwrap());
            }
        }
    }
}

/// Bytes biased towards each target's syntax, so a few hundred cases reach past the first
/// check.
fn input(target: &'static str) -> BoxedStrategy<Vec<u8>> {
    let words: &'static [&'static str] = match target {
        "config" => &[
            "command = [\"/bin/true\"]\n",
            "requires = [\"a\"]\n",
            "after = [\"b\"]\n",
            "[coordinator]\n",
            "restart_time_span = \"0s\"\n",
            "user = 65534\n",
            "\n--- a.toml\n",
            "\n--- b.toml\n",
            "startup_timeout = \"",
            "\"",
            "[",
            "]",
            "=",
            "\n",
        ],
        "duration" => &[
            "1",
            "0",
            "9",
            "ms",
            "s",
            "m",
            "h",
            " ",
            "18446744073709551615",
        ],
        "notify" => &[
            "READY=1", "STATUS=", "MAINPID=", "ERRNO=", "\n", "=", "\0", "-1",
        ],
        "keeper" => &[
            "{\"Spawn\":{\"service\":",
            "{\"Exited\":{\"service\":1,\"pid\":5,\"exit\":",
            "\"TakeOver\"",
            "}",
            "1",
            "[",
            "]",
            "-",
            "null",
        ],
        "control" => &[
            "{\"verb\":\"stop\",\"services\":[\"b\"]}",
            "{\"verb\":",
            "\"restart\"",
            "\"services\":[",
            "\"a\"",
            ",",
            "]",
            "}",
            "\n",
            "\"reply\":\"done\"",
        ],
        _ => &["\0", "\u{1}", "\u{2}", "\u{3}"],
    };
    let piece = prop_oneof![
        proptest::sample::select(words).prop_map(|w| w.as_bytes().to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(piece, 0..24)
        .prop_map(|pieces| pieces.concat())
        .boxed()
}

macro_rules! smoke {
    ($name:ident, $target:literal, $cases:expr) => {
        proptest! {
            #![proptest_config(ProptestConfig {
                cases: $cases,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]
            #[test]
            fn $name(data in input($target)) {
                targets::run($target, &data);
            }
        }
    };
}

smoke!(config_smoke, "config", 64);
smoke!(duration_smoke, "duration", 512);
smoke!(notify_smoke, "notify", 256);
smoke!(keeper_smoke, "keeper", 256);
smoke!(segment_smoke, "segment", 64);
smoke!(control_smoke, "control", 256);

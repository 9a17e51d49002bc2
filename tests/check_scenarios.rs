//! Golden tests of `ccmgr check`: one folder per scenario under `tests/scenarios/`, each with a
//! `ccmgr.toml`, a `services.d/` and an `expected.txt` holding the exit code, stdout and stderr
//! the real binary must print (paths shown as `$SCENARIO`).
//!
//! To regenerate after a deliberate change of wording: `CCMGR_BLESS=1 cargo test --test
//! check_scenarios`, then review the diff of every `expected.txt` by eye.

use std::path::{Path, PathBuf};
use std::process::Command;

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

/// Runs `ccmgr --config <scenario>/ccmgr.toml <verb>` and renders what it did.
fn run(scenario: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ccmgr"))
        .arg("--config")
        .arg(scenario.join("ccmgr.toml"))
        .args(args)
        .env_remove("CCMGR_CONFIG")
        // Programs are looked up in PATH at load: pin it so messages are the same everywhere.
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("the ccmgr binary runs");
    let normalise = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes).replace(&scenario.display().to_string(), "$SCENARIO")
    };
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().map_or("signal".into(), |c| c.to_string()),
        normalise(&out.stdout),
        normalise(&out.stderr)
    )
}

fn check_scenario(name: &str) {
    let dir = scenarios_dir().join(name);
    let actual = run(&dir, &["check"]);
    let expected_path = dir.join("expected.txt");
    if std::env::var_os("CCMGR_BLESS").is_some() {
        std::fs::write(&expected_path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path)
        .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
    assert_eq!(
        actual, expected,
        "scenario {name}: output differs from expected.txt"
    );
}

macro_rules! scenarios {
    ($($test:ident => $dir:literal,)*) => {
        $(#[test] fn $test() { check_scenario($dir); })*

        /// Every scenario folder has a test, so none is silently skipped.
        #[test]
        fn every_scenario_folder_is_tested() {
            let listed = [$($dir),*];
            for entry in std::fs::read_dir(scenarios_dir()).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                assert!(listed.contains(&name.as_str()), "scenario folder {name} has no test");
            }
        }
    };
}

scenarios! {
    cycle_of_three => "cycle-of-three",
    two_disjoint_cycles => "two-disjoint-cycles",
    self_dependency => "self-dependency",
    missing_dependency_with_near_miss => "missing-dependency",
    duplicate_id => "duplicate-id",
    unknown_key => "unknown-key",
    toml_syntax_error => "toml-syntax-error",
    bad_duration => "bad-duration",
    explicit_sequence_contradicting_requires => "sequence-contradicts-requires",
    empty_services_dir_is_valid => "empty-services-dir",
    errors_in_several_files_are_all_reported => "errors-in-several-files",
    valid_stack_with_explicit_sequences => "valid-explicit-sequences",
    service_files_that_are_not_regular_files_are_errors => "non-regular-service-files",
    user_and_group_may_be_numeric_ids => "numeric-user-and-group",
    nul_bytes_that_start_could_not_pass_on => "nul-bytes",
    a_restart_time_span_of_zero_is_refused => "restart-span-zero",
    a_retry_window_no_crash_loop_can_fill_is_refused => "retry-window-too-short",
    an_unclosed_bracket_is_pointed_at_where_it_opens => "unclosed-brackets",
    a_run_dir_too_deep_for_the_notify_socket_is_refused => "run-dir-too-deep",
    a_cycle_through_wants_and_before_is_reported_with_its_edges => "cycle-through-wants-and-before",
    wants_and_before_order_and_a_missing_wanted_service_is_a_warning => "wants-and-before",
    a_before_naming_no_service_is_an_error => "before-a-missing-service",
}

#[test]
fn the_demo_stack_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(root, &["check"]);
    assert!(out.starts_with("exit: 0\n"), "{out}");
    assert!(
        out.contains("startup sequence: setup, cache, database, api, web\n"),
        "{out}"
    );
}

#[test]
fn graph_formats() {
    let dir = scenarios_dir().join("valid-explicit-sequences");
    let text = run(&dir, &["graph", "--format", "text"]);
    assert_eq!(
        text,
        "exit: 0\n--- stdout\napp requires db\napp after log\ndb after log\n--- stderr\n"
    );
    let dot = run(&dir, &["graph"]);
    assert!(
        dot.contains("\"app\" -> \"db\" [label=\"requires\"];"),
        "{dot}"
    );
    assert!(
        dot.contains("\"db\" -> \"log\" [label=\"after\", style=dashed];"),
        "{dot}"
    );
}

#[test]
fn graph_draws_each_kind_of_edge_distinctly() {
    let dir = scenarios_dir().join("wants-and-before");
    let text = run(&dir, &["graph", "--format", "text"]);
    assert_eq!(
        text,
        "exit: 0\n--- stdout\nweb requires db\nweb wants metrics\nmigrate before web\n--- stderr\n\
         warning: $SCENARIO/services.d/web.toml:3:21: `web` wants `node-exporter`, but no service has that id: ignored (a wanted service may be absent)\n"
    );
    let dot = run(&dir, &["graph"]);
    for edge in [
        "\"web\" -> \"db\" [label=\"requires\"];",
        "\"web\" -> \"metrics\" [label=\"wants\", style=dashed, arrowhead=empty];",
        "\"web\" -> \"migrate\" [label=\"before\", style=dotted];",
    ] {
        assert!(dot.contains(edge), "{edge} in {dot}");
    }
}

#[test]
fn a_missing_explicit_config_file_is_an_error() {
    let out = run(&scenarios_dir().join("no-such-scenario"), &["check"]);
    assert!(out.starts_with("exit: 2\n"), "{out}");
    assert!(
        out.contains("$SCENARIO/ccmgr.toml: cannot read the configuration file"),
        "{out}"
    );
}

#[test]
fn bad_usage_exits_2() {
    let out = run(&scenarios_dir().join("cycle-of-three"), &["frobnicate"]);
    assert!(out.starts_with("exit: 2\n"), "{out}");
}

#[test]
fn instance_and_services_dir_flags_override_the_file() {
    // An empty config file, pointed at another scenario's services and given a name.
    let dir = scenarios_dir().join("empty-services-dir");
    let services = scenarios_dir().join("valid-explicit-sequences/services.d");
    let out = run(
        &dir,
        &[
            "--instance",
            "other",
            "--services-dir",
            services.to_str().unwrap(),
            "check",
        ],
    );
    assert!(out.starts_with("exit: 0\n"), "{out}");
    assert!(
        out.contains(&format!(
            "instance `other`, 3 services in {}",
            services.display()
        )),
        "{out}"
    );
    for verb in ["check", "start", "stop", "status", "graph"] {
        let out = run(&dir, &["--instance", "bad/name", verb]);
        assert!(
            out.starts_with("exit: 2\n") && out.contains("--instance: instance name `bad/name`"),
            "{verb}: a bad --instance is bad usage\n{out}"
        );
    }
}

/// Runs `ccmgr --config <dir>/ccmgr.toml <args>` and gives up (killing it) after 20 s: a
/// `check` that blocks is a failure, not a hung test run.
fn run_with_deadline(dir: &Path, args: &[&str]) -> String {
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ccmgr"))
        .arg("--config")
        .arg(dir.join("ccmgr.toml"))
        .args(args)
        .env_remove("CCMGR_CONFIG")
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the ccmgr binary runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ccmgr {args:?} did not finish within 20 s (blocked on a FIFO?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status.code().map_or("signal".into(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout).replace(&dir.display().to_string(), "$DIR"),
        String::from_utf8_lossy(&out.stderr).replace(&dir.display().to_string(), "$DIR"),
    )
}

/// A FIFO can be neither committed nor found in a scenario folder: built here. Neither a FIFO
/// named like a service file, nor one given as `env_file`, nor one given as `--config` may
/// block `check` or be skipped.
#[test]
fn fifos_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = |p: &Path| nix::unistd::mkfifo(p, nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::write(dir.path().join("ccmgr.toml"), "instance = \"fifo\"\n").unwrap();
    let services = dir.path().join("services.d");
    std::fs::create_dir(&services).unwrap();
    fifo(&services.join("pipe.toml"));
    fifo(&dir.path().join("vars.env"));
    std::fs::write(
        services.join("web.toml"),
        "command = \"sleep 1\"\nenv_file = \"../vars.env\"\n",
    )
    .unwrap();
    let out = run_with_deadline(dir.path(), &["check"]);
    assert!(out.starts_with("exit: 2\n"), "{out}");
    assert!(
        out.contains(
            "error: $DIR/services.d/pipe.toml: the service file is a FIFO (named pipe), not a regular file"
        ),
        "{out}"
    );
    assert!(
        out.contains("web.toml:2:12: key `env_file`: `$DIR/services.d/../vars.env` is a FIFO"),
        "{out}"
    );

    let conf = tempfile::tempdir().unwrap();
    fifo(&conf.path().join("ccmgr.toml"));
    let out = run_with_deadline(conf.path(), &["check"]);
    assert!(
        out.starts_with("exit: 2\n")
            && out.contains("$DIR/ccmgr.toml: the configuration file is a FIFO"),
        "{out}"
    );
}

/// A stack of `count` generated services in a temp dir: `s00000`, `s00001`, ..., each but every
/// tenth requiring the one before it (chains of ten).
fn generated_stack(instance: &str, count: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ccmgr.toml"),
        format!("instance = \"{instance}\"\n"),
    )
    .unwrap();
    let services = dir.path().join("services.d");
    std::fs::create_dir(&services).unwrap();
    for i in 0..count {
        let requires = if i % 10 == 0 {
            String::new()
        } else {
            format!("requires = [\"s{:05}\"]\n", i - 1)
        };
        std::fs::write(
            services.join(format!("s{i:05}.toml")),
            format!("command = \"/bin/sleep 1\"\n{requires}"),
        )
        .unwrap();
    }
    dir
}

/// 10,000 services (more than the 4,096 a segment once held; a segment is sized for its own
/// count): `check` accepts them and prints both sequences whole, each service after what it
/// requires and stopped before it.
#[test]
fn ten_thousand_services_check() {
    let dir = generated_stack("many", 10_000);
    let out = run(dir.path(), &["check"]);
    assert!(
        out.starts_with("exit: 0\n"),
        "{}",
        &out[..out.len().min(2000)]
    );
    assert!(
        out.contains("configuration OK: instance `many`, 10000 services"),
        "{}",
        &out[..out.len().min(2000)]
    );
    let sequence = |label: &str| -> Vec<usize> {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` line"));
        line.split(", ")
            .map(|id| id.trim_start_matches('s').parse().unwrap())
            .collect()
    };
    for (label, forward) in [("startup sequence: ", true), ("shutdown sequence: ", false)] {
        let seq = sequence(label);
        assert_eq!(seq.len(), 10_000, "{label}");
        let mut position = vec![usize::MAX; 10_000];
        for (at, &i) in seq.iter().enumerate() {
            assert_eq!(position[i], usize::MAX, "{label}: s{i:05} twice");
            position[i] = at;
        }
        for i in (0..10_000).filter(|i| i % 10 != 0) {
            assert_eq!(
                position[i - 1] < position[i],
                forward,
                "{label}: s{:05} and s{i:05}",
                i - 1
            );
        }
    }
}

/// More services than the segment holds (`MAX_SERVICES`, 32,768): `check` refuses what `start`
/// would, naming the limit (built here: so many files are no fixture to commit).
#[test]
fn more_services_than_the_segment_holds_is_a_check_error() {
    let dir = generated_stack("toomany", 32_769);
    let out = run_with_deadline(dir.path(), &["check"]);
    assert!(out.starts_with("exit: 2\n"), "{out}");
    assert!(
        out.contains(
            "error: $DIR/services.d: 32769 services, more than the 32768 one instance's shared segment holds (MAX_SERVICES)"
        ),
        "{out}"
    );
}

/// A configuration image over the segment's limit (a 20 MB description): a `check` error at
/// the file and line of the key that weighs most, naming the limit.
#[test]
fn a_configuration_image_over_its_limit_is_a_check_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ccmgr.toml"), "instance = \"heavy\"\n").unwrap();
    let services = dir.path().join("services.d");
    std::fs::create_dir(&services).unwrap();
    std::fs::write(services.join("light.toml"), "command = \"sleep 1\"\n").unwrap();
    let description = "x".repeat(20 << 20);
    std::fs::write(
        services.join("heavy.toml"),
        format!("command = \"sleep 1\"\n\ndescription = \"{description}\"\n"),
    )
    .unwrap();
    let out = run_with_deadline(dir.path(), &["check"]);
    assert!(out.starts_with("exit: 2\n"), "{out}");
    assert!(
        out.contains("error: $DIR/services.d/heavy.toml:3:15: the configuration image is ")
            && out.contains(
                "more than the 16777216 (MAX_CONFIG_BLOB) one instance's shared segment holds; key `description` of `heavy` is the largest part"
            ),
        "{out}"
    );
}

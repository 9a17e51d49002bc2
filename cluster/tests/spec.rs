//! Loading `cluster.d`: the keys, the defaults, every error with its file and line, the local
//! part, and ccmgr's own check of the local parts (the real `ccmgr check`).

mod common;

use std::fs;
use std::path::Path;

use ccmgr_cluster::spec::{
    CLUSTER_KEYS, ClusterServiceSpec, Placement, SpecError, TransferCost, agent_header,
    check_with_ccmgr, load_cluster_dir,
};

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

fn problems(dir: &Path) -> Vec<String> {
    match load_cluster_dir(dir, "n0") {
        Err(SpecError::Invalid { problems }) => problems,
        other => panic!("expected problems, got {other:?}"),
    }
}

const DB: &str = r#"# the database
description = "the database"
command = ["sleep", "1000"]
allowable_nodes = ["n0", "n1", "n2"]
disallowable_nodes = ["n3"]
preferred_nodes = [
    "n1",
    "n0",
]
placement = "one" # a comment after a cluster key
maturity_count = 2
maturity_time = "5s"
transfer_cost = "free"
notify_command = "echo placed"
recovery_command = "echo recover"
auto_start = false
port = 5432
restart = "always"

[env]
PGDATA = "/var/lib/db"
"#;

#[test]
fn a_good_file_loads_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "db.toml", DB);
    let specs = load_cluster_dir(dir.path(), "n0").unwrap();
    assert_eq!(specs.len(), 1);
    let s = &specs[0];
    assert_eq!(s.name, "db");
    assert_eq!(s.source, dir.path().join("db.toml"));
    assert_eq!(s.allowable_nodes, ["n0", "n1", "n2"]);
    assert_eq!(s.disallowable_nodes, ["n3"]);
    assert_eq!(s.preferred_nodes, ["n1", "n0"]);
    assert_eq!(s.placement, Placement::One);
    assert_eq!(s.maturity_count, 2);
    assert_eq!(s.maturity_time_ms, 5000);
    assert_eq!(s.transfer_cost, TransferCost::Free);
    assert_eq!(s.notify_command.as_deref(), Some("echo placed"));
    assert_eq!(s.recovery_command.as_deref(), Some("echo recover"));
    assert!(!s.auto_start);
    assert_eq!(s.port, Some(5432));

    assert!(s.allows("n0") && s.allows("n2"));
    assert!(!s.allows("n3") && !s.allows("n9"));
    assert_eq!(s.preference("n1"), Some(0));
    assert_eq!(s.preference("n0"), Some(1));
    assert_eq!(s.preference("n2"), None);
    assert!(s.maturity_applies());

    // The spec travels (etcd, the CLI's JSON) and comes back the same.
    let json = serde_json::to_string(s).unwrap();
    assert!(json.contains(r#""placement":"one""#), "{json}");
    assert!(json.contains(r#""transfer_cost":"free""#), "{json}");
    let back: ClusterServiceSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s);
}

#[test]
fn the_local_part_is_the_file_without_its_cluster_keys_line_for_line() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "db.toml", DB);
    let spec = &load_cluster_dir(dir.path(), "n7").unwrap()[0];
    let local = &spec.local_toml;
    let first = local.lines().next().unwrap();
    assert_eq!(first, agent_header("db", "n7"));
    assert_eq!(
        first,
        "# ccmgr cluster agent: cluster service db of node n7; do not edit"
    );
    let table: toml::Table = local.parse().unwrap();
    for key in CLUSTER_KEYS {
        assert!(!table.contains_key(key), "{key} left in:\n{local}");
    }
    assert_eq!(table["description"].as_str(), Some("the database"));
    assert_eq!(table["restart"].as_str(), Some("always"));
    assert_eq!(table["env"]["PGDATA"].as_str(), Some("/var/lib/db"));
    assert_eq!(
        table["command"].as_array().unwrap().len(),
        2,
        "the command is kept"
    );
    // Line N of the cluster file is line N+1 of the local part; comments stay.
    let source: Vec<&str> = DB.lines().collect();
    let local_lines: Vec<&str> = local.lines().collect();
    assert_eq!(local_lines.len(), source.len() + 1);
    for (i, line) in source.iter().enumerate() {
        if line.starts_with("restart") || line.starts_with("PGDATA") || line.starts_with('#') {
            assert_eq!(local_lines[i + 1], *line);
        }
    }
    assert!(local.contains("# a comment after a cluster key"));
    // Loading twice gives the same text: the agent compares it to the file it wrote.
    let again = &load_cluster_dir(dir.path(), "n7").unwrap()[0];
    assert_eq!(&again.local_toml, local);
}

#[test]
fn relative_paths_are_made_absolute_against_the_cluster_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "app.toml",
        "command = \"./bin/app --port 8080\"\nworking_dir = \"data\"\nenv_file = \"/etc/app.env\"\n",
    );
    write(
        dir.path(),
        "argv.toml",
        "command = [\"bin/argv\", \"x\"]\nplacement = \"all\"\n",
    );
    let specs = load_cluster_dir(dir.path(), "n0").unwrap();
    let base = dir.path().to_string_lossy();
    let app: toml::Table = specs[0].local_toml.parse().unwrap();
    assert_eq!(specs[0].name, "app");
    assert_eq!(
        app["command"].as_str().unwrap(),
        format!("{base}/./bin/app --port 8080")
    );
    assert_eq!(app["working_dir"].as_str().unwrap(), format!("{base}/data"));
    assert_eq!(app["env_file"].as_str(), Some("/etc/app.env"));
    let argv: toml::Table = specs[1].local_toml.parse().unwrap();
    assert_eq!(
        argv["command"][0].as_str().unwrap(),
        format!("{base}/bin/argv")
    );
    assert_eq!(specs[1].placement, Placement::All);
}

#[test]
fn defaults_and_order() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.toml", "command = \"sleep 1\"\n");
    write(dir.path(), "api.toml", "command = \"sleep 1\"\n");
    // Not service files by ccmgr's drop-in rule: ignored.
    write(dir.path(), "web.toml~", "nonsense = ");
    write(dir.path(), ".api.toml.swp", "nonsense = ");
    write(dir.path(), "README", "nonsense = ");
    let specs = load_cluster_dir(dir.path(), "n0").unwrap();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api", "web"]);
    let s = &specs[0];
    assert_eq!(s.allowable_nodes, ["*"]);
    assert!(s.disallowable_nodes.is_empty() && s.preferred_nodes.is_empty());
    assert_eq!(s.placement, Placement::One);
    assert_eq!(s.transfer_cost, TransferCost::Expensive);
    assert_eq!((s.maturity_count, s.maturity_time_ms), (0, 0));
    assert!(!s.maturity_applies());
    assert!(s.auto_start);
    assert_eq!(
        (s.port, &s.notify_command, &s.recovery_command),
        (None, &None, &None)
    );
    assert!(s.allows("anything"));
    assert_eq!(s.preference("n0"), None);
}

#[test]
fn placement_all_with_preferred_nodes_and_requires_of_local_services_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "agent.toml",
        "command = \"sleep 1\"\nrequires = [\"local-db\"]\nplacement = \"all\"\npreferred_nodes = [\"n1\"]\nallowable_nodes = [\"*\"]\ndisallowable_nodes = [\"n2\"]\n",
    );
    let s = &load_cluster_dir(dir.path(), "n0").unwrap()[0];
    assert!(s.allows("n1") && !s.allows("n2"));
}

#[test]
fn every_problem_of_every_file_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "db.toml",
        "command = \"sleep 1\"\n\n# the placement\nplacement = \"some\"\ntransfer_cost = \"cheap\"\nmaturity_count = -1\nmaturity_time = \"5 parsecs\"\nport = 70000\nauto_start = \"yes\"\nnotify_command = 3\nrecovery_command = \"  \"\n",
    );
    write(
        d,
        "syntax.toml",
        "command = \"sleep 1\"\nplacement = \"one\n",
    );
    write(
        d,
        "lists.toml",
        "command = \"x\"\nallowable_nodes = \"n1\"\ndisallowable_nodes = [\"*\"]\npreferred_nodes = [\"n1\", \"n1\", \"bad name\", 4]\n",
    );
    write(d, "empty.toml", "command = \"x\"\nallowable_nodes = []\n");
    write(
        d,
        "star.toml",
        "command = \"x\"\nallowable_nodes = [\"*\", \"n1\"]\n",
    );
    write(
        d,
        "both.toml",
        "command = \"x\"\nallowable_nodes = [\"n1\", \"n2\"]\ndisallowable_nodes = [\"n2\"]\npreferred_nodes = [\"n3\", \"n2\"]\n",
    );
    write(d, "ident.toml", "id = \"other\"\ncommand = \"x\"\n");
    write(d, "-dash.toml", "command = \"x\"\n");
    write(d, "time.toml", "command = \"x\"\nmaturity_time = -5\n");
    fs::create_dir(d.join("dir.toml")).unwrap();
    write(d, "good.toml", "command = \"x\"\n");

    let problems = problems(d);
    let text = problems.join("\n");
    let at = |file: &str, line: usize, words: &str| {
        let prefix = format!("{}:{line}: ", d.join(file).display());
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&prefix) && p.contains(words)),
            "no `{prefix}...{words}` in:\n{text}"
        );
    };
    at(
        "db.toml",
        4,
        "unknown placement `some`: expected `one` or `all`",
    );
    at(
        "db.toml",
        5,
        "unknown transfer_cost `cheap`: expected `free` or `expensive`",
    );
    at("db.toml", 6, "key `maturity_count` must be a whole number");
    at(
        "db.toml",
        7,
        "key `maturity_time`: invalid duration \"5 parsecs\"",
    );
    at(
        "db.toml",
        8,
        "key `port` must be a port number from 1 to 65535",
    );
    at("db.toml", 9, "key `auto_start` must be `true` or `false`");
    at(
        "db.toml",
        10,
        "key `notify_command` must be a shell command",
    );
    at("db.toml", 11, "key `recovery_command` is empty");
    at("syntax.toml", 2, "");
    at(
        "lists.toml",
        2,
        "key `allowable_nodes` must be a list of node names",
    );
    at(
        "lists.toml",
        3,
        "`*` (every node) is allowed only in `allowable_nodes`",
    );
    at("lists.toml", 4, "names node `n1` twice");
    at("lists.toml", 4, "node name `bad name` must be non-empty");
    at("lists.toml", 4, "`4` is not a string");
    at("empty.toml", 2, "is empty, so the service may run nowhere");
    at("star.toml", 2, "`*` already means every node");
    at(
        "both.toml",
        3,
        "node `n2` is in both `allowable_nodes` and `disallowable_nodes`",
    );
    at(
        "both.toml",
        4,
        "preferred node `n3` is not in `allowable_nodes`",
    );
    at(
        "both.toml",
        4,
        "node `n2` is in both `preferred_nodes` and `disallowable_nodes`",
    );
    at(
        "ident.toml",
        1,
        "key `id`: a cluster service is named by its file name (`ident`)",
    );
    at("-dash.toml", 1, "service id `-dash` may hold only letters");
    at("time.toml", 2, "invalid duration -5: it is negative");
    assert!(
        problems.iter().any(
            |p| p.starts_with(&format!("{}: ", d.join("dir.toml").display()))
                && p.contains("not a regular file")
        ),
        "{text}"
    );
    assert!(!text.contains("good.toml"), "{text}");
    // The syntax error's message is toml's own sentence.
    assert!(!text.contains("TOML parse error"), "{text}");
}

#[test]
fn an_unreadable_directory_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("cluster.d");
    let err = load_cluster_dir(&missing, "n0").unwrap_err();
    assert!(matches!(err, SpecError::Dir { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn ccmgr_checks_the_local_parts_and_its_messages_name_the_cluster_files() {
    let ccmgr = common::ccmgr();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "web.toml",
        "command = \"sleep 1000\"\nrequires = [\"db\", \"local-cache\"]\nplacement = \"all\"\n",
    );
    write(
        d,
        "db.toml",
        "command = [\"sleep\", \"1000\"]\nport = 5432\n",
    );
    let specs = load_cluster_dir(d, "n0").unwrap();
    check_with_ccmgr(&ccmgr, &specs).unwrap();

    write(
        d,
        "db.toml",
        "command = [\"sleep\", \"1000\"]\nport = 5432\n\n# a typo\nrestrat = \"always\"\n",
    );
    let specs = load_cluster_dir(d, "n0").unwrap();
    let err = check_with_ccmgr(&ccmgr, &specs).unwrap_err();
    let expected = format!("{}:5:", d.join("db.toml").display());
    assert!(err.contains(&expected), "no {expected} in: {err}");
    assert!(err.contains("unknown key `restrat`"), "{err}");
    assert!(!err.contains("ccmgr-cluster-check"), "{err}");
}

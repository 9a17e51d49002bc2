//! The global configuration the Debian package installs as /etc/ccmgr/ccmgr.toml
//! (packaging/ccmgr.toml): every key of the global file is in it, commented out with its
//! default; as shipped it passes `ccmgr check`, and so it does with every key uncommented.
//! The keys are read from the loader's own schema (`RawGlobal` and `RawCoordinator` in
//! src/config/mod.rs), so a key added there and not here fails. The `[cluster]` table is the
//! exception: ccmgr keeps it opaque (ccmgr-cluster reads it), and it is shipped commented out,
//! header too (`# [cluster]`), since a cluster needs settings that have no default.

use std::path::Path;
use std::process::Command;

const SHIPPED: &str = include_str!("../packaging/ccmgr.toml");
const LOADER: &str = include_str!("../src/config/mod.rs");

/// The field names of `struct NAME { ... }` in the loader's source.
fn fields_of(name: &str) -> Vec<String> {
    let start = LOADER
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("src/config/mod.rs has no struct {name}"));
    let body = &LOADER[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()];
    body.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with("//"))
        .filter_map(|l| l.split_once(':').map(|(field, _)| field.trim().to_owned()))
        .filter(|f| !f.is_empty())
        .collect()
}

/// The keys written as commented-out settings (`# key = value`), with the table each is in.
fn commented_keys() -> Vec<(String, String)> {
    let mut table = String::new();
    let mut keys = Vec::new();
    for line in SHIPPED.lines() {
        let line = line.trim();
        // `# [cluster]`: a table shipped commented out, header and all.
        let header = line.strip_prefix("# ").unwrap_or(line);
        if let Some(name) = header.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.to_owned();
        } else if let Some(setting) = line.strip_prefix("# ")
            && let Some((key, _)) = setting.split_once(" = ")
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.push((table.clone(), key.to_owned()));
        }
    }
    keys
}

/// `ccmgr --config CONFIG check` with the real binary.
fn check(config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ccmgr"))
        .arg("--config")
        .arg(config)
        .arg("check")
        .output()
        .expect("running ccmgr check")
}

#[test]
fn every_global_key_is_in_the_shipped_file_commented_with_a_valid_value() {
    let written = commented_keys();
    let mut missing = Vec::new();
    for (table, raw) in [("", "RawGlobal"), ("coordinator", "RawCoordinator")] {
        for field in fields_of(raw) {
            // The [coordinator] and [cluster] tables are fields of RawGlobal, not keys.
            if field == "coordinator" || field == "cluster" {
                continue;
            }
            if !written.contains(&(table.to_owned(), field.clone())) {
                missing.push(if table.is_empty() {
                    field
                } else {
                    format!("{table}.{field}")
                });
            }
        }
    }
    assert!(
        missing.is_empty(),
        "packaging/ccmgr.toml does not show these keys (commented, with their default): {missing:?}"
    );
    // The [cluster] keys ccmgr-cluster reads (cluster/src/config.rs): shown, commented.
    let cluster_missing: Vec<&str> = [
        "name",
        "endpoints",
        "node",
        "node_number",
        "heartbeat",
        "missed_beats",
        "may_manage",
        "address",
        "group",
        "distances",
        "cluster_dir",
        "fence_margin",
    ]
    .into_iter()
    .filter(|key| !written.contains(&("cluster".to_owned(), (*key).to_owned())))
    .collect();
    assert!(
        cluster_missing.is_empty(),
        "packaging/ccmgr.toml does not show these [cluster] keys (commented): {cluster_missing:?}"
    );
    let active: Vec<&str> = SHIPPED
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .collect();
    assert!(
        active.is_empty(),
        "packaging/ccmgr.toml sets keys as shipped: {active:?}"
    );

    // As installed: the file beside an empty services.d.
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::create_dir(dir.path().join("services.d")).unwrap();
    let shipped = dir.path().join("ccmgr.toml");
    std::fs::write(&shipped, SHIPPED).unwrap();
    let out = check(&shipped);
    assert!(
        out.status.success(),
        "ccmgr check refuses the shipped file: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every key uncommented (and the tables shipped commented out, with their headers), with the
    // services its sequences name: the values shown are valid.
    let uncommented: String = SHIPPED
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(header) if header.starts_with('[') && header.ends_with(']') => header,
            Some(setting)
                if written
                    .iter()
                    .any(|(_, k)| setting.starts_with(&format!("{k} = "))) =>
            {
                setting
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    for id in ["database", "cache", "api", "web"] {
        std::fs::write(
            dir.path().join(format!("services.d/{id}.toml")),
            "command = \"sleep infinity\"\n",
        )
        .unwrap();
    }
    let all_keys = dir.path().join("all-keys.toml");
    std::fs::write(&all_keys, &uncommented).unwrap();
    let out = check(&all_keys);
    assert!(
        out.status.success(),
        "ccmgr check refuses the shipped file with every key uncommented: {}\n{uncommented}",
        String::from_utf8_lossy(&out.stderr)
    );
}

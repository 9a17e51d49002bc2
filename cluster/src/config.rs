//! The `[cluster]` table of `ccmgr.toml`: which cluster this node joins, through which etcd
//! endpoints, under which name and number, how often it beats, and where the local instance
//! keeps its service files. ccmgr itself accepts the table and ignores it; this module is
//! its only reader, so its errors name the file and the line like ccmgr's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::duration::ConfigDuration;

/// The cluster settings of one node, resolved (paths absolute, defaults applied).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The ccmgr.toml it came from; the agent drives the local instance with it.
    pub config_path: PathBuf,
    /// `--instance`, when the command line gave one: passed on to every local ccmgr call.
    pub instance: Option<String>,
    pub name: String,
    pub endpoints: Vec<String>,
    pub node: String,
    pub node_number: u32,
    pub heartbeat: Duration,
    pub missed_beats: u32,
    pub may_manage: bool,
    pub address: String,
    pub group: Option<String>,
    pub distances: BTreeMap<String, u32>,
    pub cluster_dir: PathBuf,
    pub services_dir: PathBuf,
    pub fence_margin: Duration,
}

impl ClusterConfig {
    /// The lease's time to live: the heartbeat times the beats that may be missed, in whole
    /// seconds (etcd's leases count seconds), at least one.
    pub fn lease_ttl_secs(&self) -> i64 {
        let ms = self.heartbeat.as_millis() as u64 * u64::from(self.missed_beats);
        ms.div_ceil(1000).max(1) as i64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

#[derive(Deserialize)]
struct RawFile {
    services_dir: Option<PathBuf>,
    cluster: Option<Spanned<RawCluster>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    endpoints: Spanned<Vec<String>>,
    node: Option<Spanned<String>>,
    node_number: u32,
    heartbeat: Option<ConfigDuration>,
    missed_beats: Option<Spanned<u32>>,
    may_manage: Option<bool>,
    address: Option<String>,
    group: Option<String>,
    #[serde(default)]
    distances: BTreeMap<String, u32>,
    cluster_dir: Option<PathBuf>,
    fence_margin: Option<ConfigDuration>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A name of a node, a cluster or a service: it is part of etcd keys and of file names.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{name}` is not a valid name: 1 to 64 of a-z A-Z 0-9 - _ . (not starting with .)"
        ))
    }
}

/// Reads the `[cluster]` table of `path`. `services_dir` overrides the file's, as ccmgr's
/// `--services-dir` does.
pub fn load(
    path: &Path,
    instance: Option<String>,
    services_dir: Option<PathBuf>,
) -> Result<ClusterConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let raw: RawFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(&text, s.start));
        ConfigError::At {
            path: path.to_path_buf(),
            line,
            message: e.message().to_owned(),
        }
    })?;
    let at = |offset: usize, message: String| ConfigError::At {
        path: path.to_path_buf(),
        line: line_of(&text, offset),
        message,
    };
    let Some(cluster) = raw.cluster else {
        return Err(ConfigError::File {
            path: path.to_path_buf(),
            message: "has no [cluster] table: this node is in no cluster".into(),
        });
    };
    let table_at = cluster.span().start;
    let c = cluster.into_inner();
    let config_dir = path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let config_dir = std::path::absolute(&config_dir).unwrap_or(config_dir);
    let in_config_dir = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            config_dir.join(p)
        }
    };
    check_name("cluster.name", c.name.get_ref()).map_err(|m| at(c.name.span().start, m))?;
    if c.endpoints.get_ref().is_empty() {
        return Err(at(
            c.endpoints.span().start,
            "cluster.endpoints is empty: name at least one etcd endpoint".into(),
        ));
    }
    let node = match c.node {
        Some(n) => {
            check_name("cluster.node", n.get_ref()).map_err(|m| at(n.span().start, m))?;
            n.into_inner()
        }
        None => {
            let host = nix_hostname();
            check_name("the host name (cluster.node is not set)", &host)
                .map_err(|m| at(table_at, m))?;
            host
        }
    };
    for name in c.distances.keys() {
        check_name("a node in cluster.distances", name).map_err(|m| at(table_at, m))?;
    }
    let heartbeat = c.heartbeat.map_or(Duration::from_millis(250), |d| d.0);
    if heartbeat < Duration::from_millis(10) || heartbeat > Duration::from_secs(60) {
        return Err(at(
            table_at,
            "cluster.heartbeat must be from 10ms to 60s".into(),
        ));
    }
    let missed_beats = match c.missed_beats {
        Some(m) if *m.get_ref() == 0 || *m.get_ref() > 1000 => {
            return Err(at(
                m.span().start,
                "cluster.missed_beats must be from 1 to 1000".into(),
            ));
        }
        Some(m) => m.into_inner(),
        None => 4,
    };
    let fence_margin = c.fence_margin.map_or(heartbeat, |d| d.0);
    let config = ClusterConfig {
        config_path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
        instance,
        name: c.name.into_inner(),
        endpoints: c.endpoints.into_inner(),
        node,
        node_number: c.node_number,
        heartbeat,
        missed_beats,
        may_manage: c.may_manage.unwrap_or(true),
        address: c.address.unwrap_or_else(|| "127.0.0.1".into()),
        group: c.group,
        distances: c.distances,
        cluster_dir: in_config_dir(c.cluster_dir.as_deref().unwrap_or(Path::new("cluster.d"))),
        services_dir: services_dir
            .map(|d| std::path::absolute(&d).unwrap_or(d))
            .unwrap_or_else(|| {
                in_config_dir(
                    raw.services_dir
                        .as_deref()
                        .unwrap_or(Path::new("services.d")),
                )
            }),
        fence_margin,
    };
    if config.fence_margin.as_millis() as i64 >= config.lease_ttl_secs() * 1000 {
        return Err(at(
            table_at,
            format!(
                "cluster.fence_margin ({} ms) must be shorter than the lease ({} s: heartbeat x missed_beats, rounded up)",
                config.fence_margin.as_millis(),
                config.lease_ttl_secs()
            ),
        ));
    }
    Ok(config)
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<ClusterConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ccmgr.toml");
        std::fs::write(&path, text).unwrap();
        load(&path, None, None)
    }

    #[test]
    fn a_full_table_is_read_with_its_defaults() {
        let c = load_text(
            "instance = \"x\"\n[cluster]\nname = \"c1\"\nendpoints = [\"http://127.0.0.1:2379\"]\nnode = \"n0\"\nnode_number = 3\nheartbeat = \"300ms\"\nmissed_beats = 4\n",
        )
        .unwrap();
        assert_eq!(c.node, "n0");
        assert_eq!(c.node_number, 3);
        assert_eq!(c.lease_ttl_secs(), 2); // 1.2 s rounded up
        assert_eq!(c.fence_margin, Duration::from_millis(300));
        assert!(c.services_dir.ends_with("services.d"));
        assert!(c.cluster_dir.ends_with("cluster.d"));
    }

    #[test]
    fn errors_name_the_line() {
        let e = load_text(
            "[cluster]\nname = \"c1\"\nendpoints = [\"e\"]\nnode = \"bad name\"\nnode_number = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ccmgr.toml:4:"), "{e}");
        let e = load_text("[cluster]\nname = \"c1\"\nendpoints = []\nnode_number = 0\nwhat = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `what`"), "{e}");
        let e = load_text("instance = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("no [cluster] table"), "{e}");
    }
}

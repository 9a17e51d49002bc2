//! Placeholder of the cluster service specification (replaced by the spec module).
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    One,
    All,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferCost {
    Free,
    Expensive,
}
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterServiceSpec {
    pub name: String,
    pub source: PathBuf,
    pub allowable_nodes: Vec<String>,
    pub disallowable_nodes: Vec<String>,
    pub preferred_nodes: Vec<String>,
    pub placement: Placement,
    pub maturity_count: u32,
    pub maturity_time_ms: u64,
    pub transfer_cost: TransferCost,
    pub notify_command: Option<String>,
    pub recovery_command: Option<String>,
    pub auto_start: bool,
    pub port: Option<u16>,
    pub local_toml: String,
}
impl ClusterServiceSpec {
    pub fn allows(&self, node: &str) -> bool {
        (self.allowable_nodes.iter().any(|n| n == "*" || n == node))
            && !self.disallowable_nodes.iter().any(|n| n == node)
    }
    pub fn preference(&self, node: &str) -> Option<usize> {
        self.preferred_nodes.iter().position(|n| n == node)
    }
    pub fn maturity_applies(&self) -> bool {
        self.maturity_count > 0 || self.maturity_time_ms > 0
    }
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);
pub fn load_cluster_dir(_dir: &Path, _node: &str) -> Result<Vec<ClusterServiceSpec>, SpecError> {
    Ok(Vec::new())
}

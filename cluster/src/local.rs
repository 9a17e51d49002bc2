//! Placeholder of the local-instance driver (replaced by the local module).
use crate::spec::ClusterServiceSpec;
use std::path::PathBuf;
use std::time::Duration;
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LocalError(pub String);
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CommandError(pub String);
#[derive(Debug, Clone)]
pub struct LocalEvent { pub event: String, pub service: Option<String> }
pub struct LocalCcmgr { }
impl LocalCcmgr {
    pub fn new(_c: PathBuf, _f: PathBuf, _s: PathBuf, _n: String) -> Self { LocalCcmgr {} }
    pub async fn start_service(&self, _spec: &ClusterServiceSpec) -> Result<(), LocalError> { Ok(()) }
    pub async fn stop_service(&self, _name: &str) -> Result<(), LocalError> { Ok(()) }
    pub fn owned_files(&self) -> Vec<String> { vec![] }
    pub async fn stop_all_owned(&self) -> Result<(), LocalError> { Ok(()) }
    pub async fn is_up(&self, _name: &str) -> Result<bool, LocalError> { Ok(true) }
    pub fn follow_events(&self) -> tokio::sync::mpsc::Receiver<LocalEvent> { tokio::sync::mpsc::channel(1).1 }
}
pub async fn run_command(_cmd: &str, _env: &[(String, String)], _t: Duration) -> Result<(), CommandError> { Ok(()) }

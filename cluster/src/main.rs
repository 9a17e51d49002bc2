//! `ccmgr-cluster`: the node agent and the cluster commands (`ccmgr cluster ...`).
fn main() {}

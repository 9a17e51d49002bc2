//! The cluster layer of ccmgr: the node agent and the cluster commands, as a library so that
//! the binary and the integration tests share it.
pub mod duration;
pub mod local;
pub mod spec;

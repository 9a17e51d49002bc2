//! ccmgr's cluster layer: several nodes, each running its own ccmgr instance and an agent,
//! coordinated through etcd (seeds 000-002; README "Cluster").
//!
//! - [`config`]: the `[cluster]` table of `ccmgr.toml`.
//! - [`spec`]: the cluster services of `cluster.d/`.
//! - [`record`]: what lives in etcd, key by key, and the view built of it.
//! - [`roles`]: seed 000's manager and backup, on etcd transactions.
//! - [`decide`]: the manager's decisions and the agents' transitions, pure (virtual time).
//! - [`addresses`]: seed 002's ordered address lists.
//! - [`agent`], [`guard`], [`local`]: the node agent, its fence guard, the local instance.
//! - [`endpoints`]: which etcd endpoints a client uses (the dead ones taken out).
//! - [`cli`]: `ccmgr cluster status|events|leave|move|start|stop|addresses`.
//! - [`duration`]: durations written as in ccmgr's own files.
pub mod addresses;
pub mod agent;
pub mod cli;
pub mod config;
pub mod decide;
pub mod duration;
pub mod endpoints;
pub mod guard;
pub mod local;
pub mod record;
pub mod roles;
pub mod spec;

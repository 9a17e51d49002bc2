//! ccmgr: a bootstrap supervisor and dependency-ordered service manager for Linux.
//!
//! The crate is a library with a thin binary (`src/main.rs`). Modules by concern:
//!
//! - [`duration`]: the duration syntax of every config file (`250`, `"7s"`, `"2m"`).
//! - [`config`]: loading and validating `ccmgr.toml` and the `services.d/*.toml` files.
//! - [`graph`]: the dependency graph, cycle detection, start/stop sequences and levels.
//! - [`diag`]: file/line/column diagnostics shared by every loader.
//! - [`cli`]: the `ccmgr` command line (verbs, exit codes, output).
//! - [`shm`]: the shared-memory segment, its robust mutexes and channels, stale-state reclaim.
//! - [`process_identity`]: processes named by (pid, start time), never by a bare pid.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod config;
pub mod diag;
pub mod duration;
pub mod graph;
pub mod process_identity;
pub mod shm;

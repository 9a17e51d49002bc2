//! ccmgr: a bootstrap supervisor and dependency-ordered service manager for Linux.
//!
//! The crate is a library with a thin binary (`src/main.rs`). Modules by concern:
//!
//! - [`duration`]: the duration syntax of every config file (`250`, `"7s"`, `"2m"`).
//! - [`config`]: loading and validating `ccmgr.toml` and the `services.d/*.toml` files.
//! - [`graph`]: the dependency graph, cycle detection, start/stop sequences and levels.
//! - [`diag`]: file/line/column diagnostics shared by every loader.
//! - [`cli`]: the `ccmgr` command line (verbs, exit codes, output).
//! - [`spawn`]: starting one service process, signalling it, and how it ended.
//! - [`logsink`]: service output drained from its pipe into a rotated log file.
//! - [`notify`]: the sd_notify socket, so systemd `Type=notify` daemons work unchanged.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod config;
pub mod diag;
pub mod duration;
pub mod engine;
pub mod graph;
pub mod keeper;
pub mod logsink;
pub mod notify;
pub mod spawn;

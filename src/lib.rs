//! ccmgr: a bootstrap supervisor and dependency-ordered service manager for Linux.
//!
//! The crate is a library with a thin binary (`src/main.rs`). Modules by concern:
//!
//! - [`vocab`]: the shared vocabulary (states, exits, the wanted state, takeover mode, instance
//!   names), the bottom layer every other module may use.
//! - [`duration`]: the duration syntax of every config file (`250`, `"7s"`, `"2m"`).
//! - [`config`]: loading and validating `ccmgr.toml` and the `services.d/*.toml` files.
//! - [`graph`]: the dependency graph, cycle detection, start/stop sequences and levels.
//! - [`diag`]: file/line/column diagnostics shared by every loader.
//! - [`heap`]: handing the pages `malloc` keeps free back to the kernel where a process settles.
//! - [`engine`]: the coordinator's decisions, a pure state machine tested in virtual time.
//! - [`events`]: lifecycle events (`ccmgr events`), derived from the engine's state.
//! - [`coordinator`]: the coordinator process: the engine's event loop and state publishing.
//! - [`keeper`]: the long-lived parent of every process of an instance.
//! - [`control`]: the control socket through which `ccmgr start|stop|restart SERVICE...`
//!   reach the coordinator, with the caller's credentials checked.
//! - [`spawn`]: starting one service process, signalling it, and how it ended.
//! - [`cgroup`]: a cgroup v2 per service, so what a service leaves behind dies with it.
//! - [`logsink`]: service output drained from its pipe into a rotated log file.
//! - [`socket_file`]: the socket files in run_dir: cleared before a bind, removed when dead.
//! - [`notify`]: the sd_notify socket, so systemd `Type=notify` daemons work unchanged.
//! - [`shm`]: the shared-memory segment, its robust mutexes and channels, stale-state reclaim.
//! - [`service`]: the service API (alive, ready, the orderly shutdown protocol) that services
//!   link; its C ABI is the `ccmgr-capi` crate with `include/ccmgr.h`.
//! - [`process_identity`]: processes named by (pid, start time), never by a bare pid.
//! - [`membership`]: the proof that a recorded pid is the instance's process, without which
//!   no ccmgr process signals it.
//! - [`records`]: the keeper's record of the instance's processes in `run_dir`, which `stop`
//!   can use when the segment is lost.
//! - [`reload`]: the plan of a live reload, from the running configuration to the one on
//!   disk.
//! - [`upgrade`]: `ccmgr upgrade`, replacing the keeper, coordinator and standby with a new
//!   binary while every service keeps its process (the keeper's half: `keeper::reexec`).
//! - [`logging`]: where the coordinator's and keeper's own log lines go.
//! - [`cli`]: the `ccmgr` command line (verbs, exit codes, output).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod coordinator;
pub mod diag;
pub mod duration;
pub mod engine;
pub mod events;
pub mod graph;
pub mod heap;
pub mod init_signals;
pub mod keeper;
pub mod logging;
pub mod logsink;
pub mod membership;
pub mod notify;
pub mod process_identity;
pub mod records;
pub mod reload;
pub mod sd_notify;
pub mod service;
pub mod shm;
pub mod socket_file;
pub mod spawn;
pub mod upgrade;
pub mod vocab;

//! `ccmgr cluster ARGS...`: hands the command over to `ccmgr-cluster`, the cluster layer's own
//! binary (a crate of its own, `cluster/`, so that ccmgr links no async runtime nor gRPC).
//!
//! This module owns finding that binary and the command line it gets: `ccmgr-cluster --config
//! C [--instance I] ARGS... [--json]`, where C is the configuration file ccmgr itself would
//! read (`--config`, else `$CCMGR_CONFIG`, else the default path), so that both read the same
//! file whatever way it was named. The process is replaced (exec), not waited for: signals,
//! the terminal and the exit code are ccmgr-cluster's own.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use super::{Cli, Exit};

/// The cluster layer's binary, looked for beside ccmgr, then on `$PATH`.
pub const CLUSTER_BINARY: &str = "ccmgr-cluster";

/// Runs `ccmgr-cluster` with `args`; returns only when it could not be run.
pub fn cluster(cli: &Cli, args: &[OsString]) -> Exit {
    if cli.services_dir.is_some() {
        eprintln!(
            "error: --services-dir does not apply to `ccmgr cluster` (ccmgr-cluster reads the \
             services directory from the configuration file)"
        );
        return Exit::BadConfig;
    }
    let Some(binary) = find_cluster_binary() else {
        eprintln!(
            "ccmgr: ccmgr-cluster is not installed: no executable {CLUSTER_BINARY} beside \
             this ccmgr ({}) nor on PATH; `ccmgr cluster` runs it (build it with `cargo build \
             -p ccmgr-cluster`, and install it beside ccmgr)",
            own_dir().map_or_else(|| "unknown".to_owned(), |d| d.display().to_string())
        );
        return Exit::BadConfig;
    };
    let (config, _) = crate::config::config_path(&cli.load_options());
    let error = std::process::Command::new(&binary)
        .args(command_line(
            &config,
            cli.instance.as_deref(),
            args,
            cli.json,
        ))
        .exec();
    // exec returns only when it failed.
    eprintln!("ccmgr: cannot run {}: {error}", binary.display());
    Exit::Failed
}

/// The arguments after the program name: ccmgr's `--config` and `--instance` first, then the
/// user's, then `--json` when it was given to ccmgr before `cluster` (where ccmgr's parser takes
/// it): at the end, where any ccmgr-cluster verb that has `--json` accepts it.
fn command_line(
    config: &Path,
    instance: Option<&str>,
    args: &[OsString],
    json: bool,
) -> Vec<OsString> {
    let mut line: Vec<OsString> = vec!["--config".into(), config.as_os_str().to_owned()];
    if let Some(instance) = instance {
        line.push("--instance".into());
        line.push(instance.into());
    }
    line.extend(args.iter().cloned());
    if json && !args.iter().any(|a| a == OsStr::new("--json")) {
        line.push("--json".into());
    }
    line
}

/// The directory of the running ccmgr (its `/proc/self/exe`).
fn own_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
}

/// `ccmgr-cluster` beside the running ccmgr (an installation keeps the two together, and a
/// build has them in one target directory), else the first on `$PATH`.
fn find_cluster_binary() -> Option<PathBuf> {
    let beside = own_dir().map(|dir| dir.join(CLUSTER_BINARY));
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .filter(|dir| !dir.as_os_str().is_empty())
                .map(|dir| dir.join(CLUSTER_BINARY))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

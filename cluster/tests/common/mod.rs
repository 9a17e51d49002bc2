//! What the cluster crate's integration tests share: the ccmgr binary, built once.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Once;

/// The debug ccmgr of this workspace, built (once per test binary) if it is missing.
pub fn ccmgr() -> PathBuf {
    static BUILD: Once = Once::new();
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/debug/ccmgr"
    ));
    BUILD.call_once(|| {
        if !path.exists() {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "--bin", "ccmgr", "-p", "ccmgr"])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build --bin ccmgr failed");
        }
    });
    path
}

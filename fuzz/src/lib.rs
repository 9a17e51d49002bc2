//! ccmgr's fuzz targets as a library, for the AFL driver and the replay tool. The targets
//! themselves live in `targets.rs`, which `tests/fuzz_regressions.rs` includes too.

#[path = "targets.rs"]
pub mod targets;

//! Durations in the cluster's files are written as in ccmgr's own (README "Durations"):
//! the same type, so both read `"250ms"` alike.
pub use ccmgr::duration::{ConfigDuration, ParseDurationError, parse_duration};

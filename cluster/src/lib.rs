//! `ccmgr-cluster`'s library: the cluster layer of ccmgr (issue 13), built as a library so that
//! its pure parts (the ordering of a service's addresses, seed 002) are tested on their own and
//! the binary (`src/main.rs`) stays a thin shell over it.

pub mod addresses;

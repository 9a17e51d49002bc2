//! The keeper's record of the instance's processes, kept in `run_dir` beside the segment.
//!
//! The segment is the instance's shared state, but it can be lost (truncated, removed, made
//! unreadable) while processes of the instance still run. `ccmgr stop` must still find and
//! stop every one of them, so the keeper, the parent of them all, writes down who they are:
//! itself, the coordinator and standby, and each service's main process, each named by
//! (pid, start time) so a recycled pid is never taken for one of ours. Services are listed in
//! shutdown order, so that a stop driven from this record alone still goes in order.
//!
//! The file is replaced atomically (written beside, then renamed), so a reader sees either the
//! old list or the new one, never half of one. It is owner-only (0600): it names processes to
//! signal.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::process_identity::ProcessIdentity;

/// One process of the instance, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` when it was recorded.
    pub start_time: u64,
}

impl From<ProcessIdentity> for Recorded {
    fn from(p: ProcessIdentity) -> Self {
        Recorded {
            pid: p.pid,
            start_time: p.start_time,
        }
    }
}

impl From<Recorded> for ProcessIdentity {
    fn from(r: Recorded) -> Self {
        ProcessIdentity {
            pid: r.pid,
            start_time: r.start_time,
        }
    }
}

/// A service's main process, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedService {
    pub id: String,
    pub process: Recorded,
    /// Its stop signal, as a number, so a stop from this record alone sends the right one.
    pub stop_signal: i32,
    /// Its shutdown timeout in milliseconds.
    pub shutdown_timeout_ms: u64,
}

/// Every process of an instance, as the keeper last recorded them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub keeper: Option<Recorded>,
    pub coordinator: Option<Recorded>,
    pub standby: Option<Recorded>,
    /// Running services, in shutdown order (dependents first).
    pub services: Vec<RecordedService>,
}

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a process record: {source}", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Where an instance's process record lives.
pub fn record_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.procs"))
}

impl ProcessRecord {
    /// Replaces the record at `path` atomically (a new file renamed over the old one).
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let err = |source| RecordError::Write {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("procs.new");
        let text = serde_json::to_vec(self).map_err(|e| err(std::io::Error::other(e)))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        file.write_all(&text).map_err(err)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Reads the record at `path`; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<ProcessRecord>, RecordError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RecordError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RecordError::Parse {
                path: path.to_owned(),
                source,
            })
    }

    /// Removes the record (the instance is gone); a missing one is fine.
    pub fn remove(path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    /// The recorded processes that still live (same pid and start time), services first in
    /// shutdown order, then the standby, the coordinator and the keeper.
    pub fn survivors(&self) -> Vec<(String, ProcessIdentity)> {
        let mut out: Vec<(String, ProcessIdentity)> = self
            .services
            .iter()
            .map(|s| (format!("service `{}`", s.id), s.process.into()))
            .collect();
        for (name, who) in [
            ("the standby", self.standby),
            ("the coordinator", self.coordinator),
            ("the keeper", self.keeper),
        ] {
            if let Some(who) = who {
                out.push((name.to_owned(), who.into()));
            }
        }
        out.retain(|(_, who)| who.is_alive());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_survivors() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "t");
        assert!(ProcessRecord::read(&path).unwrap().is_none());
        let me = ProcessIdentity::current().unwrap();
        let gone = Recorded {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        let record = ProcessRecord {
            keeper: Some(me.into()),
            coordinator: Some(gone),
            standby: None,
            services: vec![RecordedService {
                id: "a".into(),
                process: gone,
                stop_signal: 15,
                shutdown_timeout_ms: 1000,
            }],
        };
        record.write(&path).unwrap();
        let back = ProcessRecord::read(&path).unwrap().unwrap();
        assert_eq!(back, record);
        let alive = back.survivors();
        assert_eq!(alive, vec![("the keeper".to_owned(), me)]);
        std::fs::write(&path, b"{").unwrap();
        assert!(matches!(
            ProcessRecord::read(&path),
            Err(RecordError::Parse { .. })
        ));
    }
}

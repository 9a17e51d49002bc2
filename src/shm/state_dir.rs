//! Where an instance's shared state lives, and why no other user can take its names first.
//!
//! The three files of an instance's shared state live in its `run_dir` (from the
//! configuration; `/run/ccmgr` for root, `$XDG_RUNTIME_DIR/ccmgr` otherwise), beside its
//! notify socket and process record:
//!
//! | file | mode | created by |
//! |---|---|---|
//! | `<run_dir>/<instance>.seg` (the main segment) | 0600, or 0640 with the configured group | `ccmgr start` |
//! | `<run_dir>/<instance>.ctl` (the service API's control segment) | 0644 | `ccmgr start` |
//! | `<run_dir>/<instance>.api` (the service API's file) | 0666 | `ccmgr start` |
//!
//! **Why the names cannot be squatted.** A name can be created in a directory only by whoever
//! may write the directory. Before any of these files is created, opened or removed, the
//! directory is checked as ssh checks a home directory under `StrictModes` ([`trusted_dir`]):
//! it must be owned by the instance's owner and writable by no one else (no group or other
//! write bit), and every directory above it must be owned by root or by that owner and be
//! writable by no one else unless it is sticky (as `/tmp` is: then only the owner of an entry
//! can remove or rename it, and the entries on the way were checked to be root's or the
//! owner's). Every symbolic link the configured path goes through must be root's or the
//! owner's and lie in a directory that passes the same test: the keeper, the coordinator and
//! `stop` go on naming the configured path, so a link another user could swing would let
//! him redirect them to a directory of his after the check. So only the owner (and root) can create,
//! replace or remove `<instance>.seg`, `.ctl` or `.api`: another user can neither take the
//! name before `start` nor keep `stop` from removing it. A root instance depends on no name in
//! a world-writable directory (formerly its segment was `/dev/shm/ccmgr.<instance>`, which
//! any local user could create first); an unprivileged instance whose `run_dir` lies where
//! others could create names is refused with a sentence naming the directory, its owner and
//! its mode, never silently exposed.
//!
//! The owner of the instance is the owner of its `run_dir`: the services and the members of
//! the instance's group, who run as other users, learn it there (and check every file against
//! it), so no file anyone else made is ever taken for the instance's. No unsafe code.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::ShmError;
use super::segment::validate_instance_name;

/// The mode `ccmgr start` gives a `run_dir` it creates: services running as other users
/// (`nobody`) must reach the notify socket, the control segment and the API file in it.
pub const RUN_DIR_MODE: u32 = 0o755;

/// The path of an instance's main segment: `<run_dir>/<instance>.seg`.
pub fn segment_path(run_dir: &Path, instance: &str) -> Result<PathBuf, ShmError> {
    validate_instance_name(instance)?;
    Ok(run_dir.join(format!("{instance}.seg")))
}

/// A directory found fit to hold an instance's state, by [`trusted_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedDir {
    /// The directory, resolved (no symbolic link left in it).
    pub path: PathBuf,
    /// Its owner: the instance's owner.
    pub owner: u32,
}

/// Why a directory may not hold an instance's state. Each is a sentence naming the directory.
#[derive(Debug, thiserror::Error)]
pub enum DirTrustError {
    /// The directory does not exist (or a component on its way does not).
    #[error("the run directory {} does not exist", dir.display())]
    Missing {
        /// The directory.
        dir: PathBuf,
    },
    /// The directory, or one above it, could not be examined.
    #[error("examining {} (on the way to the run directory {}): {source}", path.display(), dir.display())]
    Examine {
        /// The run directory.
        dir: PathBuf,
        /// What could not be examined.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is no directory.
    #[error("the run directory {} is not a directory", dir.display())]
    NotADirectory {
        /// The run directory.
        dir: PathBuf,
    },
    /// Another user than the owner (or root, above it) could create names in it.
    #[error(
        "refusing the run directory {}: {} is owned by uid {owner} and has mode {mode:04o}, so {why}; an instance's state lives only where no user but its owner (uid {expected}) and root can create names (remove the write bits others have on {}, as with `chmod go-w`, or choose another `run_dir`)",
        dir.display(), path.display(), path.display()
    )]
    Untrusted {
        /// The run directory.
        dir: PathBuf,
        /// The directory found wanting: the run directory or one above it.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits (with the sticky bit).
        mode: u32,
        /// The owner the instance has.
        expected: u32,
        /// What is wrong, as a clause.
        why: &'static str,
    },
}

/// Check that `dir` may hold the state of an instance owned by `owner` (`None`: whoever owns
/// the directory, for readers running as another user, who learn the owner here), as the
/// module documentation says. Returns the resolved directory and its owner.
pub fn trusted_dir(dir: &Path, owner: Option<u32>) -> Result<TrustedDir, DirTrustError> {
    let resolved = match std::fs::canonicalize(dir) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DirTrustError::Missing {
                dir: dir.to_owned(),
            });
        }
        Err(source) => {
            return Err(DirTrustError::Examine {
                dir: dir.to_owned(),
                path: dir.to_owned(),
                source,
            });
        }
    };
    let examine = |path: &Path| {
        std::fs::symlink_metadata(path).map_err(|source| DirTrustError::Examine {
            dir: dir.to_owned(),
            path: path.to_owned(),
            source,
        })
    };
    let meta = examine(&resolved)?;
    if !meta.is_dir() {
        return Err(DirTrustError::NotADirectory {
            dir: dir.to_owned(),
        });
    }
    let expected = owner.unwrap_or(meta.uid());
    let untrusted = |path: &Path, meta: &std::fs::Metadata, why| DirTrustError::Untrusted {
        dir: dir.to_owned(),
        path: path.to_owned(),
        owner: meta.uid(),
        mode: meta.mode() & 0o7777,
        expected,
        why,
    };
    if meta.uid() != expected {
        return Err(untrusted(
            &resolved,
            &meta,
            "it is not the instance owner's",
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(
            &resolved,
            &meta,
            "users other than its owner may create and remove names in it",
        ));
    }
    for above in resolved.ancestors().skip(1) {
        let meta = examine(above)?;
        if meta.uid() != 0 && meta.uid() != expected {
            return Err(untrusted(
                above,
                &meta,
                "a user who is neither root nor the instance's owner may rename what lies below it",
            ));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & libc::S_ISVTX == 0 {
            return Err(untrusted(
                above,
                &meta,
                "other users may rename what lies below it (it is writable by them and not sticky)",
            ));
        }
    }
    check_links_on_the_way(dir, expected)?;
    Ok(TrustedDir {
        path: resolved,
        owner: expected,
    })
}

/// Whether no user but root and `owner` can change what `path` names: every directory above
/// the file it resolves to is root's or `owner`'s and writable by no one else unless sticky,
/// and every symbolic link on the way passes [`check_links_on_the_way`]. For files root reads
/// on behalf of a less privileged user (a service's `env_file`): a path that user could swing
/// would let him read any file through it.
pub fn path_only_owner_can_change(path: &Path, owner: u32) -> Result<(), DirTrustError> {
    let resolved = std::fs::canonicalize(path).map_err(|source| DirTrustError::Examine {
        dir: path.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    for above in resolved.ancestors().skip(1) {
        let meta = std::fs::symlink_metadata(above).map_err(|source| DirTrustError::Examine {
            dir: path.to_owned(),
            path: above.to_owned(),
            source,
        })?;
        let why = if meta.uid() != 0 && meta.uid() != owner {
            "a user who is neither root nor the instance's owner may rename what lies below it"
        } else if meta.mode() & 0o022 != 0 && meta.mode() & libc::S_ISVTX == 0 {
            "other users may rename what lies below it (it is writable by them and not sticky)"
        } else {
            continue;
        };
        return Err(DirTrustError::Untrusted {
            dir: path.to_owned(),
            path: above.to_owned(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
            expected: owner,
            why,
        });
    }
    check_links_on_the_way(path, owner)
}

/// The symbolic links met on the way to `dir`, checked as the directories of the resolved
/// path are: every one must belong to root or the instance's owner and lie in a directory
/// where no one else can replace it. Only the resolved path is checked above, but every
/// process of the instance goes on naming the configured path (the keeper writes its records
/// there, `stop` removes files there): a link another user owns, or could replace, on that
/// path would let them swing it to a directory of theirs after the check, and root would
/// create, truncate and remove names where that user planted links (`run_dir =
/// /srv/app/run` with `/srv/app` nobody's and `run` a link in it: root's keeper wrote its
/// process record through `<instance>.procs.new -> /etc/shadow`).
fn check_links_on_the_way(dir: &Path, expected: u32) -> Result<(), DirTrustError> {
    use std::collections::VecDeque;
    use std::path::Component;
    let examine_err = |path: &Path, source| DirTrustError::Examine {
        dir: dir.to_owned(),
        path: path.to_owned(),
        source,
    };
    let absolute = std::path::absolute(dir).map_err(|e| examine_err(dir, e))?;
    let mut pending: VecDeque<PathBuf> = absolute
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut current = PathBuf::from("/");
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part.components().next() {
            Some(Component::RootDir) => current = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                current.pop();
            }
            Some(Component::Normal(name)) => {
                let next = current.join(name);
                let meta = std::fs::symlink_metadata(&next).map_err(|e| examine_err(&next, e))?;
                if !meta.file_type().is_symlink() {
                    current = next;
                    continue;
                }
                links += 1;
                if links > 40 {
                    return Err(examine_err(
                        &next,
                        io::Error::from_raw_os_error(libc::ELOOP),
                    ));
                }
                let untrusted =
                    |path: &Path, meta: &std::fs::Metadata, why| DirTrustError::Untrusted {
                        dir: dir.to_owned(),
                        path: path.to_owned(),
                        owner: meta.uid(),
                        mode: meta.mode() & 0o7777,
                        expected,
                        why,
                    };
                if meta.uid() != 0 && meta.uid() != expected {
                    return Err(untrusted(
                        &next,
                        &meta,
                        "this symbolic link on the way belongs to a user who is neither root nor the instance's owner, who may point it elsewhere",
                    ));
                }
                let holder =
                    std::fs::symlink_metadata(&current).map_err(|e| examine_err(&current, e))?;
                if holder.uid() != 0 && holder.uid() != expected {
                    return Err(untrusted(
                        &current,
                        &holder,
                        "a user who is neither root nor the instance's owner may replace the symbolic link on the way that it holds",
                    ));
                }
                if holder.mode() & 0o022 != 0 && holder.mode() & libc::S_ISVTX == 0 {
                    return Err(untrusted(
                        &current,
                        &holder,
                        "other users may replace the symbolic link on the way that it holds (it is writable by them and not sticky)",
                    ));
                }
                let target = std::fs::read_link(&next).map_err(|e| examine_err(&next, e))?;
                for c in target.components().rev() {
                    pending.push_front(PathBuf::from(c.as_os_str()));
                }
            }
            Some(Component::CurDir) | Some(Component::Prefix(_)) | None => {}
        }
    }
    Ok(())
}

/// Create `dir` (and what is missing above it) with mode 0755, as `ccmgr start` does for a
/// `run_dir` that does not exist; an existing directory is left as it is (and then checked by
/// [`trusted_dir`]).
pub fn create_run_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // Not through a link another user could have planted or could swing: root would create
    // directories where that user pointed it (`/tmp/x -> /etc` makes `/etc/ccmgr`) before
    // [`trusted_dir`] refuses the result.
    let absolute = std::path::absolute(dir)?;
    if let Some(existing) = absolute.ancestors().skip(1).find(|a| a.is_dir()) {
        check_links_on_the_way(existing, nix::unistd::geteuid().as_raw())
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(RUN_DIR_MODE)
        .create(dir)?;
    // Exactly 0755, whatever the umask took away.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(RUN_DIR_MODE))
}

/// The run directory a command falls back to when it cannot load the configuration: the
/// default for the calling user (`/run/ccmgr` for root, `$XDG_RUNTIME_DIR/ccmgr` otherwise).
pub fn default_run_dir() -> PathBuf {
    crate::config::default_state_dirs().1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_live_in_the_run_dir() {
        assert_eq!(
            segment_path(Path::new("/run/ccmgr"), "x").unwrap(),
            Path::new("/run/ccmgr/x.seg")
        );
        assert!(segment_path(Path::new("/run/ccmgr"), "../x").is_err());
    }

    #[test]
    fn an_owner_only_directory_is_trusted_a_shared_one_is_not() {
        let me = nix::unistd::geteuid().as_raw();
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        create_run_dir(&run).unwrap();
        let meta = std::fs::metadata(&run).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o755);
        let trusted = trusted_dir(&run, Some(me)).unwrap();
        assert_eq!(trusted.owner, me);
        assert_eq!(trusted_dir(&run, None).unwrap().owner, me);

        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = trusted_dir(&run, Some(me)).unwrap_err().to_string();
        assert!(e.contains("has mode 0775"), "{e}");
        assert!(e.contains("users other than its owner may create"), "{e}");

        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = trusted_dir(&run, Some(me.wrapping_add(1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("it is not the instance owner's"), "{e}");

        // Below a world-writable directory that is not sticky: refused.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let below = open.join("run");
        create_run_dir(&below).unwrap();
        let e = trusted_dir(&below, Some(me)).unwrap_err().to_string();
        assert!(e.contains("writable by them and not sticky"), "{e}");
        // Sticky, as /tmp is: accepted.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        trusted_dir(&below, Some(me)).unwrap();

        let e = trusted_dir(&tmp.path().join("missing"), Some(me)).unwrap_err();
        assert!(matches!(e, DirTrustError::Missing { .. }), "{e}");
    }
}

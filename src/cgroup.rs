//! One cgroup v2 per service, so that everything a service started can be found and killed.
//!
//! A process group holds only the processes that stayed in it: a daemon that double-forks and
//! calls `setsid()` leaves its service's group, and `killpg` no longer reaches it. A cgroup
//! cannot be left that way: a child is born in its parent's cgroup, and only a process with
//! write access to another cgroup's `cgroup.procs` can move out. So where the machine offers
//! a writable cgroup2 hierarchy, the keeper makes one cgroup for the instance,
//! `ccmgr.<instance>`, under its own cgroup, and one per run of a service below it (see
//! [`run_name`] and the keeper's `run_cgroups`):
//!
//! ```text
//! <cgroup2 mount><the keeper's cgroup>/ccmgr.<instance>/<service id>.<run>/
//! ```
//!
//! This module owns that tree ([`Tree`]): finding where cgroup2 is mounted and which cgroup
//! this process is in (from `/proc/self/mountinfo` and `/proc/self/cgroup`, never from a
//! hard-coded path: it is `/sys/fs/cgroup` on pure-v2 machines, `/sys/fs/cgroup/unified` on
//! hybrid ones, and often absent or read-only in containers); creating the cgroups, and taking
//! over the one a killed run of the instance left; making a run's cgroup and opening it for
//! the spawned child to be born in it or move itself in ([`Tree::open_run`],
//! [`crate::spawn::SpawnRequest::cgroup_dir`]); killing everything in a cgroup; removing an
//! ended run's cgroup once empty; and removing the tree at the end.
//!
//! No controller is enabled in any `cgroup.subtree_control` of the tree: the cgroups are for
//! finding processes, not for limiting them, and without controllers the no-internal-process
//! rule of cgroup v2 never refuses a move.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::unistd::{AccessFlags, Pid, access};

use crate::spawn;

/// How many rounds of "list the cgroup, SIGKILL what is new" [`Tree::kill`] makes on kernels
/// without `cgroup.kill`, before it gives up on a cgroup that keeps gaining processes.
const MAX_KILL_ROUNDS: usize = 64;

/// The longest single wait for a `cgroup.events` notification; a safety net should one be
/// missed, not the way emptiness is noticed (that is the notification).
const EVENTS_POLL_CAP: Duration = Duration::from_millis(50);

/// Why the cgroups cannot be used, or an operation on them failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted")]
    NotMounted,
    #[error("this process is in no cgroup2 hierarchy (/proc/self/cgroup has no `0::` line)")]
    NoOwnCgroup,
    #[error("this process's cgroup {} is outside every cgroup2 mount", .path.display())]
    OutsideMounts { path: PathBuf },
    #[error("cgroup2 is mounted read-only at {}", .mount.display())]
    ReadOnly { mount: PathBuf },
    #[error("this process may not move processes out of its cgroup: {} is not writable", .path.display())]
    NotWritable { path: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the cgroup {}: {source}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write to {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("processes kept appearing in the cgroup {} through {MAX_KILL_ROUNDS} rounds of SIGKILL", .path.display())]
    StillForking { path: PathBuf },
    #[error("the cgroup {} still holds processes {waited:?} after they were killed", .path.display())]
    StillPopulated { path: PathBuf, waited: Duration },
    #[error("cannot remove the cgroup {}: {source}", .path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A cgroup2 mount: one line of `/proc/self/mountinfo` with file system type `cgroup2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// The cgroup the mount shows as its root, as `/proc/self/cgroup` names cgroups: `/`
    /// unless it is a bind mount of a subtree (or from another cgroup namespace).
    pub root: PathBuf,
    /// Mounted `ro`: no cgroup can be created through it.
    pub read_only: bool,
}

/// Every cgroup2 mount listed in `mountinfo` (the text of `/proc/self/mountinfo`), in order.
///
/// A line reads `id parent major:minor root point options [optional fields...] - fstype source
/// super-options`; the optional fields end at the lone `-`. Paths escape space, tab, newline
/// and backslash as three octal digits (`\040`).
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            if *fields.get(dash + 1)? != "cgroup2" {
                return None;
            }
            let super_options = fields.get(dash + 3).copied().unwrap_or("");
            let read_only = [fields[5], super_options]
                .iter()
                .any(|opts| opts.split(',').any(|o| o == "ro"));
            Some(Mount {
                point: unescape(fields[4]),
                root: unescape(fields[3]),
                read_only,
            })
        })
        .collect()
}

/// A mountinfo path with its `\ooo` escapes decoded.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The cgroup2 path in `proc_cgroup` (the text of `/proc/<pid>/cgroup`): the `0::<path>`
/// line, present on pure-v2 and hybrid machines alike. `None` without one (pure v1).
pub fn v2_path(proc_cgroup: &str) -> Option<PathBuf> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .filter(|path| path.starts_with('/'))
        .map(PathBuf::from)
}

/// Where the cgroup `path` (as `/proc/self/cgroup` names it) is in the file system: through
/// the first mount whose root contains it, preferring writable mounts.
pub fn locate(mounts: &[Mount], path: &Path) -> Result<PathBuf, CgroupError> {
    if mounts.is_empty() {
        return Err(CgroupError::NotMounted);
    }
    // "/.." components mean the cgroup lies outside our cgroup namespace: no mount shows it.
    let outside = || CgroupError::OutsideMounts {
        path: path.to_owned(),
    };
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(outside());
    }
    let showing = |m: &&Mount| path.starts_with(&m.root);
    let mount = mounts
        .iter()
        .filter(showing)
        .find(|m| !m.read_only)
        .or_else(|| mounts.iter().find(showing))
        .ok_or_else(outside)?;
    if mount.read_only {
        return Err(CgroupError::ReadOnly {
            mount: mount.point.clone(),
        });
    }
    let below_root = path.strip_prefix(&mount.root).map_err(|_| outside())?;
    Ok(mount.point.join(below_root))
}

/// This process's cgroup: its directory, and its path as `/proc/<pid>/cgroup` shows it.
pub fn own_cgroup() -> Result<(PathBuf, PathBuf), CgroupError> {
    let mountinfo = read_text(Path::new("/proc/self/mountinfo"))?;
    let path =
        v2_path(&read_text(Path::new("/proc/self/cgroup"))?).ok_or(CgroupError::NoOwnCgroup)?;
    let dir = locate(&cgroup2_mounts(&mountinfo), &path)?;
    Ok((dir, path))
}

fn read_text(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The cgroups of one instance: `ccmgr.<instance>` and a cgroup per service below it, each
/// made when its service first starts.
///
/// Dropping a tree that was not [`remove`](Tree::remove)d removes it, best-effort.
#[derive(Debug)]
pub struct Tree {
    /// The instance's cgroup directory.
    dir: PathBuf,
    /// Its path as `/proc/<pid>/cgroup` shows it, to check a process's membership.
    path: PathBuf,
    /// The kernel has `cgroup.kill` (Linux 5.14): killing is one write, and race-free.
    kill_file: bool,
    /// [`remove`](Tree::remove) was called.
    removed: bool,
}

impl Tree {
    /// The tree of `instance`, under this process's cgroup. Fails when the machine offers no
    /// writable cgroup2 hierarchy (no mount, a read-only one, no permission).
    ///
    /// If a killed run of the instance left its cgroup behind, whatever still runs in it is
    /// killed and its service cgroups are removed; the caller must own the instance (the
    /// keeper does: it holds the instance's segment), or it would kill a live run.
    pub fn for_instance(instance: &str) -> Result<Tree, CgroupError> {
        let (dir, path) = own_cgroup()?;
        // Moving a process from our cgroup into one below needs write access to the common
        // ancestor's cgroup.procs, ours. (access() also says EROFS on a read-only mount.)
        let procs = dir.join("cgroup.procs");
        if access(&procs, AccessFlags::W_OK).is_err() {
            return Err(CgroupError::NotWritable { path: procs });
        }
        Tree::create(&dir, &path, &format!("ccmgr.{instance}"))
    }

    /// Creates the cgroup `name` in the cgroup at `parent_dir` (whose path is `parent_path`),
    /// or takes it over as [`for_instance`](Tree::for_instance) says.
    pub fn create(parent_dir: &Path, parent_path: &Path, name: &str) -> Result<Tree, CgroupError> {
        let dir = parent_dir.join(name);
        let existed = match fs::create_dir(&dir) {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        };
        let mut tree = Tree {
            kill_file: dir.join("cgroup.kill").exists(),
            path: parent_path.join(name),
            dir,
            removed: false,
        };
        if existed {
            tracing::warn!(cgroup = %tree.dir.display(), "taking over the cgroup of an earlier run that was killed");
            tree.clear(Duration::from_secs(2))?;
        }
        Ok(tree)
    }

    /// The tree a keeper made at `dir` (whose cgroup path is `path`), as it recorded them, to
    /// remove it after the keeper itself was killed; creates nothing.
    pub fn existing(dir: &Path, path: &Path) -> Tree {
        Tree {
            kill_file: dir.join("cgroup.kill").exists(),
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            removed: false,
        }
    }

    /// Where a keeper records its tree (`dir` and `path`, a line each), so that `ccmgr stop`
    /// can remove it even after the keeper was killed: in the instance's run directory.
    pub fn record_path(run_dir: &Path, instance: &str) -> PathBuf {
        run_dir.join(format!("{instance}.cgroup"))
    }

    /// The instance's cgroup path, as `/proc/<pid>/cgroup` shows it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The instance's cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup directory of service `id`.
    pub fn service_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Opens the `cgroup.procs` of service `id` for writing (close-on-exec), creating its
    /// cgroup first if need be. A process that writes `0` to it moves itself in; the spawned
    /// child does that before it execs (see [`crate::spawn::SpawnRequest::cgroup_procs`]).
    pub fn open_procs(&self, id: &str) -> Result<OwnedFd, CgroupError> {
        let dir = self.service_dir(id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        let path = dir.join("cgroup.procs");
        // std opens every file close-on-exec: the fd reaches the child only through fork.
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|source| CgroupError::Open { path, source })?;
        Ok(file.into())
    }

    /// Makes the cgroup `name` below the instance's, fresh, and opens it for a child to be
    /// born in it ([`RunCgroup`]). Each run of a service gets a cgroup of its own,
    /// [`run_name`]: a child can be born (`clone3` with `CLONE_INTO_CGROUP`) only in a cgroup
    /// no `cgroup.kill` ever reached (see [`crate::spawn::SpawnRequest::cgroup_dir`]), and
    /// the cgroup of the run before is killed when its main process ends. A cgroup of that
    /// name left over (which the keeper's counter makes unlikely) is removed first if empty,
    /// else this fails.
    pub fn open_run(&self, name: &str) -> Result<RunCgroup, CgroupError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = self.service_dir(name);
        if let Err(e) = fs::create_dir(&dir) {
            let retried = e.kind() == io::ErrorKind::AlreadyExists
                && fs::remove_dir(&dir).is_ok()
                && fs::create_dir(&dir).is_ok();
            if !retried {
                return Err(CgroupError::Create {
                    path: dir,
                    source: e,
                });
            }
        }
        let procs = dir.join("cgroup.procs");
        // std opens every file close-on-exec: the fds reach the child only through fork.
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs)
            .map_err(|source| CgroupError::Open {
                path: procs,
                source,
            })?;
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir)
            .map_err(|source| CgroupError::Open {
                path: dir.clone(),
                source,
            })?;
        Ok(RunCgroup {
            name: name.to_owned(),
            dir: handle.into(),
            procs: procs.into(),
        })
    }

    /// Removes the cgroup `name` if it holds no process any more: true if it is gone, false
    /// if it is still populated (`rmdir` says EBUSY); its `cgroup.events` then says when it
    /// empties ([`events_path`](Tree::events_path)).
    pub fn remove_if_empty(&self, name: &str) -> Result<bool, CgroupError> {
        match remove_dir(&self.service_dir(name)) {
            Ok(()) => Ok(true),
            Err(CgroupError::Remove { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The `cgroup.events` of the cgroup `name`: modified (inotify `IN_MODIFY`, or `POLLPRI`)
    /// when its `populated` changes.
    pub fn events_path(&self, name: &str) -> PathBuf {
        self.service_dir(name).join("cgroup.events")
    }

    /// SIGKILLs every process in the cgroup of service `id` (and in any cgroup the service
    /// made below it), without waiting for them to end; their parent, the keeper as the
    /// subreaper of orphans, reaps them. A service that never ran has no cgroup: nothing to do.
    pub fn kill(&self, id: &str) -> Result<(), CgroupError> {
        self.kill_cgroup(&self.service_dir(id), &self.path.join(id))
    }

    /// Kills every process of every service, as [`kill`](Tree::kill) does one.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_cgroup(&self.dir, &self.path)
    }

    fn kill_cgroup(&self, dir: &Path, path: &Path) -> Result<(), CgroupError> {
        if !dir.exists() {
            return Ok(());
        }
        if self.kill_file {
            // The kernel kills the whole subtree and keeps it from forking meanwhile.
            let file = dir.join("cgroup.kill");
            return OpenOptions::new()
                .write(true)
                .open(&file)
                .and_then(|mut f| f.write_all(b"1"))
                .map_err(|source| CgroupError::Write { path: file, source });
        }
        kill_by_listing(dir, path)
    }

    /// Whether any process is in the cgroup of service `id` or below it.
    pub fn populated(&self, id: &str) -> Result<bool, CgroupError> {
        let dir = self.service_dir(id);
        if !dir.exists() {
            return Ok(false);
        }
        let events = dir.join("cgroup.events");
        let mut file = File::open(&events).map_err(|source| CgroupError::Open {
            path: events.clone(),
            source,
        })?;
        read_populated(&mut file, &events)
    }

    /// Kills everything in the tree, waits up to `timeout` for it to be gone, and removes every
    /// cgroup of the tree, the instance's last. It is tried once: calling it again, or dropping
    /// the tree, does nothing (and does not log the same failure twice).
    pub fn remove(&mut self, timeout: Duration) -> Result<(), CgroupError> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        self.clear(timeout)?;
        remove_dir(&self.dir)
    }

    /// Kills everything in the tree, waits for it to be gone, and removes the service cgroups.
    fn clear(&mut self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.kill_all()?;
            // Killing again now and then catches what a listing kill raced with.
            let round = (Instant::now() + Duration::from_millis(200)).min(deadline);
            if wait_unpopulated(&self.dir, round)? {
                break;
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::StillPopulated {
                    path: self.dir.clone(),
                    waited: timeout,
                });
            }
        }
        for entry in sub_cgroups(&self.dir)? {
            remove_dir(&entry)?;
        }
        Ok(())
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Err(e) = self.remove(Duration::from_secs(1)) {
            tracing::warn!(error = %e, "cannot remove the instance's cgroups");
        }
    }
}

/// The cgroup of run `run` of service `id`: `<id>.<run>`. Unambiguous, as the run is the
/// part after the last `.` and a number; and no service's cgroup can be taken for another's:
/// `a.1` is run 1 of `a`, while the runs of a service `a.1` are `a.1.<run>`.
pub fn run_name(id: &str, run: u64) -> String {
    format!("{id}.{run}")
}

/// One run's cgroup, made by [`Tree::open_run`], opened for its main process to be born in it
/// (`dir`) or, where the kernel cannot do that, to move into it (`procs`).
#[derive(Debug)]
pub struct RunCgroup {
    /// Its name below the instance's cgroup ([`run_name`]).
    pub name: String,
    /// The cgroup's directory, for `clone3` with `CLONE_INTO_CGROUP`.
    pub dir: OwnedFd,
    /// Its `cgroup.procs`, open for writing.
    pub procs: OwnedFd,
}

/// The cgroup directories directly below `dir`.
fn sub_cgroups(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

/// Removes the (empty) cgroup `dir` and every cgroup below it, deepest first: `rmdir` refuses a
/// cgroup with children (and, EBUSY, one that holds processes). A cgroup already gone is fine.
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    for child in sub_cgroups(dir)? {
        remove_dir(&child)?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Remove {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Reads `populated 0|1` from an open `cgroup.events` (which counts the cgroups below too).
fn read_populated(file: &mut File, path: &Path) -> Result<bool, CgroupError> {
    let read_error = |source| CgroupError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).map_err(read_error)?;
    file.read_to_string(&mut text).map_err(read_error)?;
    Ok(text
        .lines()
        .any(|line| line.split_whitespace().eq(["populated", "1"])))
}

/// Waits until the cgroup at `dir` (and every one below it) holds no process, or `deadline`
/// passes; true if it emptied. The kernel signals a change of `cgroup.events` as POLLPRI, so
/// this blocks instead of polling the file.
fn wait_unpopulated(dir: &Path, deadline: Instant) -> Result<bool, CgroupError> {
    let path = dir.join("cgroup.events");
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(source) => return Err(CgroupError::Open { path, source }),
    };
    loop {
        // Reading re-arms the notification: a change after this read wakes the poll below.
        if !read_populated(&mut file, &path)? {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = left.min(EVENTS_POLL_CAP).as_millis().max(1) as i32;
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                return Err(CgroupError::Read {
                    path,
                    source: errno.into(),
                });
            }
        }
    }
}

/// Kills every process in the cgroup at `dir` and below, for kernels without `cgroup.kill`:
/// list `cgroup.procs`, SIGKILL each process not signalled yet, and again until a listing
/// shows nobody new (a process may have forked between a listing and its SIGKILL; once
/// SIGKILL is pending, it can fork no more).
///
/// A listed pid is only a number, and the process may end and the number be reused before we
/// signal it. So each is pinned with a pidfd first, and signalled only if `/proc/<pid>/cgroup`
/// still puts it in the tree being killed: a pidfd can then reach no other process.
fn kill_by_listing(dir: &Path, path: &Path) -> Result<(), CgroupError> {
    let mut signalled: HashSet<i32> = HashSet::new();
    for _ in 0..MAX_KILL_ROUNDS {
        let mut fresh = false;
        let mut dirs = vec![dir.to_owned()];
        while let Some(cgroup) = dirs.pop() {
            for pid in list_procs(&cgroup)? {
                if signalled.insert(pid) {
                    fresh = true;
                    kill_if_member(Pid::from_raw(pid), path);
                }
            }
            dirs.extend(sub_cgroups(&cgroup)?);
        }
        if !fresh {
            return Ok(());
        }
    }
    Err(CgroupError::StillForking {
        path: dir.to_owned(),
    })
}

/// The pids in `cgroup.procs` of the cgroup at `dir` (none if the cgroup is gone).
fn list_procs(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

/// SIGKILLs `pid` if it is in the cgroup `path` or below; a process that is gone is skipped.
fn kill_if_member(pid: Pid, path: &Path) {
    let Ok(pidfd) = spawn::pidfd_open(pid) else {
        return; // it has ended (and been reaped) since the listing
    };
    let member = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| v2_path(&text))
        .is_some_and(|p| p.starts_with(path));
    if member {
        let _ = spawn::signal_pidfd(pidfd.as_fd(), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const NONE: &str = "\
22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
";
    const CONTAINER_RO: &str = "\
600 599 0:30 /docker/abc /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
";
    const ESCAPED: &str = "\
50 1 0:40 / /mnt/my\\040cgroups rw shared:3 master:1 - cgroup2 none rw
";

    fn mount(point: &str, root: &str, read_only: bool) -> Mount {
        Mount {
            point: point.into(),
            root: root.into(),
            read_only,
        }
    }

    #[test]
    fn mountinfo_of_a_hybrid_machine() {
        assert_eq!(
            cgroup2_mounts(HYBRID),
            [mount("/sys/fs/cgroup/unified", "/", false)]
        );
    }

    #[test]
    fn mountinfo_of_a_pure_v2_machine_with_optional_fields() {
        assert_eq!(
            cgroup2_mounts(PURE_V2),
            [mount("/sys/fs/cgroup", "/", false)]
        );
    }

    #[test]
    fn mountinfo_without_cgroup2() {
        assert_eq!(cgroup2_mounts(NONE), []);
        assert_eq!(cgroup2_mounts(""), []);
        assert!(matches!(
            locate(&[], Path::new("/")),
            Err(CgroupError::NotMounted)
        ));
    }

    #[test]
    fn mountinfo_read_only_bind_mount_and_escapes() {
        assert_eq!(
            cgroup2_mounts(CONTAINER_RO),
            [mount("/sys/fs/cgroup", "/docker/abc", true)]
        );
        assert_eq!(
            cgroup2_mounts(ESCAPED),
            [mount("/mnt/my cgroups", "/", false)]
        );
        assert_eq!(unescape(r"a\134b\0"), PathBuf::from(r"a\b\0"));
    }

    #[test]
    fn proc_cgroup_lines() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/bd51\n1:cpu:/\n0::/\n";
        assert_eq!(v2_path(hybrid), Some(PathBuf::from("/")));
        let v2 = "0::/user.slice/user-1000.slice/session-2.scope\n";
        assert_eq!(
            v2_path(v2),
            Some(PathBuf::from("/user.slice/user-1000.slice/session-2.scope"))
        );
        let v1_only = "9:name=systemd:/\n1:cpu:/\n";
        assert_eq!(v2_path(v1_only), None);
        assert_eq!(v2_path(""), None);
    }

    #[test]
    fn locating_a_cgroup() {
        let hybrid = cgroup2_mounts(HYBRID);
        assert_eq!(
            locate(&hybrid, Path::new("/")).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let v2 = cgroup2_mounts(PURE_V2);
        assert_eq!(
            locate(&v2, Path::new("/system.slice/ccmgr.service")).unwrap(),
            PathBuf::from("/sys/fs/cgroup/system.slice/ccmgr.service")
        );
        // A bind mount of a subtree shows only what is below its root.
        let bound = [mount("/sys/fs/cgroup", "/docker/abc", false)];
        assert_eq!(
            locate(&bound, Path::new("/docker/abc/x")).unwrap(),
            PathBuf::from("/sys/fs/cgroup/x")
        );
        assert!(matches!(
            locate(&bound, Path::new("/docker/abcd")),
            Err(CgroupError::OutsideMounts { .. })
        ));
        assert!(matches!(
            locate(&v2, Path::new("/../../init.scope")),
            Err(CgroupError::OutsideMounts { .. })
        ));
        let ro = cgroup2_mounts(CONTAINER_RO);
        let err = locate(&ro, Path::new("/docker/abc")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cgroup2 is mounted read-only at /sys/fs/cgroup"
        );
        // A writable mount wins over a read-only one that shows the same cgroup.
        let both = [
            mount("/ro", "/", true),
            mount("/sys/fs/cgroup/unified", "/", false),
        ];
        assert_eq!(
            locate(&both, Path::new("/a")).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified/a")
        );
    }

    // ----- real cgroups ---------------------------------------------------------------------

    /// Whether this machine must offer writable cgroups: as root, with cgroup2 mounted. A test
    /// that finds none then fails under CI instead of skipping, so a regression cannot hide.
    fn cgroups_expected() -> bool {
        nix::unistd::geteuid().is_root()
            && (Path::new("/sys/fs/cgroup/unified").exists()
                || fs::read_to_string("/proc/self/mountinfo")
                    .is_ok_and(|m| !cgroup2_mounts(&m).is_empty()))
    }

    /// A tree for a test, or `None` (and the test is skipped) where cgroups are unavailable.
    fn test_tree(name: &str) -> Option<Tree> {
        let instance = format!("unit-{name}-{}", std::process::id());
        match Tree::for_instance(&instance) {
            Ok(tree) => Some(tree),
            Err(e) => {
                assert!(
                    !(std::env::var_os("CI").is_some() && cgroups_expected()),
                    "cgroup2 is mounted and we are root, but: {e}"
                );
                eprintln!("skipped: no writable cgroup2 ({e})");
                None
            }
        }
    }

    /// Starts `argv` in service `id`'s cgroup of `tree`, the way the keeper does.
    fn spawn_in(tree: &Tree, id: &str, argv: &[&str]) -> spawn::Spawned {
        let (_read_end, write_end) = crate::logsink::make_output_pipe().unwrap();
        let procs = tree.open_procs(id).unwrap();
        let request = spawn::SpawnRequest {
            program: argv[0].into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: "/".into(),
            credentials: None,
            output: write_end.as_fd(),
            cgroup_procs: Some(procs.as_fd()),
            cgroup_dir: None,
        };
        spawn::spawn_service(&request).unwrap()
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn in_cgroup(pid: i32, tree: &Tree, id: &str) -> bool {
        fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| v2_path(&t))
            .is_some_and(|p| p == tree.path.join(id))
    }

    #[test]
    fn each_run_is_born_alive_in_a_fresh_cgroup_after_the_one_before_was_killed() {
        // The keeper's cycle, ten times: a run's cgroup made, the child born in it, the cgroup
        // killed, the next run in a new cgroup. A child born in a cgroup that was killed
        // before dies at birth on Linux 6.14+; in a fresh one it must live.
        let Some(tree) = test_tree("runs") else {
            return;
        };
        for run in 1..=10 {
            let name = run_name("svc", run);
            let cgroup = tree.open_run(&name).unwrap();
            let (read_end, write_end) = crate::logsink::make_output_pipe().unwrap();
            let request = spawn::SpawnRequest {
                program: "/bin/sh".into(),
                argv: ["/bin/sh", "-c", "echo up; exec sleep 1000"]
                    .map(String::from)
                    .to_vec(),
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                working_dir: "/".into(),
                credentials: None,
                output: write_end.as_fd(),
                cgroup_procs: Some(cgroup.procs.as_fd()),
                cgroup_dir: Some(cgroup.dir.as_fd()),
            };
            let child = spawn::spawn_service(&request).unwrap();
            drop(write_end);
            // It lives: its program runs and speaks.
            let mut said = Vec::new();
            let mut pipe = File::from(read_end);
            wait_until("the run to speak", || {
                let mut buf = [0u8; 16];
                let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
                if let Ok(n) = pipe.read(&mut buf) {
                    said.extend_from_slice(&buf[..n]);
                }
                said.ends_with(b"\n") || said.len() > 3
            });
            assert_eq!(said, b"up\n", "run {run} ran its program");
            assert!(in_cgroup(child.pid.as_raw(), &tree, &name), "run {run}");
            tree.kill(&name).unwrap();
            let exit = spawn::reap(child.pid).unwrap();
            assert_eq!(
                exit,
                spawn::ProcessExit::Signaled {
                    signal: libc::SIGKILL,
                    core_dumped: false
                },
                "run {run} died by its cgroup's kill, not before"
            );
            wait_until("the run's cgroup to empty", || {
                tree.remove_if_empty(&name).unwrap()
            });
        }
    }

    #[test]
    fn a_spawned_process_joins_its_cgroup_and_dies_by_it() {
        let Some(mut tree) = test_tree("kill") else {
            return;
        };
        let dir = tree.dir().to_owned();
        let child = spawn_in(&tree, "sleeper", &["/bin/sleep", "1000"]);
        assert!(in_cgroup(child.pid.as_raw(), &tree, "sleeper"));
        assert_eq!(
            list_procs(&tree.service_dir("sleeper")).unwrap(),
            [child.pid.as_raw()]
        );
        assert!(tree.populated("sleeper").unwrap());
        tree.kill("sleeper").unwrap();
        let exit = spawn::reap(child.pid).unwrap();
        assert_eq!(
            exit,
            spawn::ProcessExit::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false
            }
        );
        wait_until("the cgroup to empty", || {
            !tree.populated("sleeper").unwrap()
        });
        tree.remove(Duration::from_secs(5)).unwrap();
        assert!(!dir.exists(), "{} was removed", dir.display());
    }

    #[test]
    fn killing_by_listing_reaches_every_process_of_the_cgroup() {
        // The fallback for kernels without cgroup.kill, forced: a shell that started two
        // background sleeps, one of them in a new session, all die. The sleeps are orphaned
        // when the shell dies: as a subreaper this test process gets them, and reaps them by
        // pid (nothing else here waits for children it did not start).
        let Some(mut tree) = test_tree("listing") else {
            return;
        };
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        tree.kill_file = false;
        let child = spawn_in(
            &tree,
            "forker",
            &[
                "/bin/sh",
                "-c",
                "sleep 1000 & setsid sleep 1000 & exec sleep 1000",
            ],
        );
        wait_until("three processes in the cgroup", || {
            list_procs(&tree.service_dir("forker")).unwrap().len() == 3
        });
        let all = list_procs(&tree.service_dir("forker")).unwrap();
        tree.kill("forker").unwrap();
        for pid in all {
            let exit = spawn::reap(Pid::from_raw(pid)).unwrap();
            assert_eq!(
                exit,
                spawn::ProcessExit::Signaled {
                    signal: libc::SIGKILL,
                    core_dumped: false
                },
                "{pid} (the shell is {})",
                child.pid
            );
        }
        assert!(!tree.populated("forker").unwrap());
        tree.remove(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn a_stale_tree_is_cleared_and_taken_over() {
        let Some(tree) = test_tree("stale") else {
            return;
        };
        let child = spawn_in(&tree, "left", &["/bin/sleep", "1000"]);
        let (dir, path) = (tree.dir.clone(), tree.path.clone());
        // A keeper killed with SIGKILL removes nothing.
        std::mem::forget(tree);
        let (parent_dir, parent_path) = (dir.parent().unwrap(), path.parent().unwrap());
        let name = dir.file_name().unwrap().to_str().unwrap();
        let mut again = Tree::create(parent_dir, parent_path, name).unwrap();
        assert_eq!(
            spawn::reap(child.pid).unwrap(),
            spawn::ProcessExit::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false
            }
        );
        assert!(dir.exists(), "the instance's cgroup is reused");
        assert!(
            !again.service_dir("left").exists(),
            "old service cgroups are gone"
        );
        again.remove(Duration::from_secs(5)).unwrap();
        assert!(!dir.exists());
    }
}

//! Proof that a pid is a process of one instance, before any ccmgr process signals it.
//!
//! Pids reach `ccmgr stop` (and the start that cleans up after itself) from places others can
//! write: the shared segment, the keeper's process record and cgroup record in `run_dir`, and
//! `/proc`. A forged pid and start time there must never make ccmgr signal a process that is
//! not the instance's (issue 9: a group member rewrote the coordinator's pid in the segment to
//! a root process's, and root's `stop` SIGTERMed it). So a pid read from any of them is
//! signalled only through a [`Proven`] handle, which [`InstanceEvidence::prove`] alone makes:
//!
//! 1. a pidfd is opened on the pid first, pinning whatever process holds it now;
//! 2. its start time (`/proc/<pid>/stat`) must be the recorded one, and it must not have ended;
//! 3. one piece of evidence must tie it to the instance (below), read from `/proc/<pid>`;
//! 4. the pidfd must still be open on a live process: then every read of `/proc/<pid>` above
//!    was of the pinned process (a pid is not reused while its process lives), and a signal
//!    sent through the pidfd ([`Proven::signal`]) can reach no other process.
//!
//! What counts as evidence, by role:
//! - the **keeper**: it runs as the instance owner and maps the instance's segment file (its
//!   device and inode appear in `/proc/<pid>/maps`). Only the owner and the configured group
//!   can open that file, the uid excludes the group's own processes, and a process of the
//!   owner's uid that maps the instance's state is the instance's (the owner could signal it
//!   anyway). When no segment file is left to compare (it was removed), its
//!   command line must be the keeper's own (`--instance NAME internal keeper`), again with the
//!   owner's uid.
//! - the **coordinator** and the **standby**: the owner's uid, and a proven keeper as parent,
//!   or the segment mapped, or (no segment file left) their own command line.
//! - a **service** (or what it forked): a proven keeper as parent (the keeper forks every
//!   service and, as a child subreaper, inherits what they orphan); or membership of the
//!   instance's own cgroup tree (its record proven by [`prove_cgroup_record`]: only the owner
//!   or root can move a process into it, and only a process of their own uid); or, for an
//!   orphan once the keeper is gone, `CCMGR_INSTANCE=<instance>` in its environment *and* a
//!   real uid that is the owner's or a configured service user's. A process's environment is
//!   set by whoever exec'd it and can be changed by itself alone, so only the holder of its
//!   uid (or root) can mark a process; and kill(2) lets the holder of a process's real uid
//!   signal it anyway. So an attacker can mark only his own processes, and root's `stop`
//!   signals those only if he is one of the instance's service users: nothing he could not
//!   have signalled himself.
//!
//! Whatever is not proven is not signalled; the caller says so. The keeper itself signals
//! only its own children, by the pid fork gave it and before it has reaped them (its table of
//! children), so it needs no proof from here; nor does the coordinator, which signals nothing
//! itself but asks the keeper, which checks that table.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::process_identity::{ProcessIdentity, read_stat};
use crate::spawn;

/// What a process is to the instance, as the record that named it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Keeper,
    Coordinator,
    Standby,
    /// A service's main process, or a process found by the instance's mark in its environment.
    Service,
}

impl Role {
    /// The word of its internal command line (`ccmgr --instance NAME internal WORD`).
    fn internal_word(self) -> Option<&'static str> {
        match self {
            Role::Keeper => Some("keeper"),
            Role::Coordinator => Some("coordinator"),
            Role::Standby => Some("standby"),
            Role::Service => None,
        }
    }
}

/// The evidence that tied a process to the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// It maps the instance's segment file.
    MapsSegment,
    /// Its parent is the instance's proven keeper.
    ChildOfKeeper,
    /// It is in the instance's proven cgroup tree.
    InCgroup,
    /// Its environment carries the instance's mark, and its uid is one of the instance's.
    Environment,
    /// Its command line is ccmgr's internal role for this instance, with the owner's uid.
    CommandLine,
}

/// Why a recorded process was not proven to be the instance's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotProven {
    /// The recorded process no longer lives (or the pid is another process's now, with
    /// another start time): there is nothing of the instance to signal.
    #[error("it is gone")]
    Gone,
    /// A live process with the recorded start time, which nothing ties to the instance.
    #[error("{0}")]
    NoEvidence(String),
}

impl NotProven {
    /// The recorded process no longer lives: not a refusal, nothing to report.
    pub fn is_gone(&self) -> bool {
        matches!(self, NotProven::Gone)
    }
}

/// What `stop` knows of the instance that lets it prove a process is the instance's.
#[derive(Debug, Clone)]
pub struct InstanceEvidence {
    instance: String,
    /// The uid the instance runs as (the parties' uid, and the owner of its segment).
    owner_uid: u32,
    /// The configured services' users.
    service_uids: Vec<u32>,
    /// Device and inode of the instance's segment file, when there is one.
    segment_file: Option<(u64, u64)>,
    /// The keeper, once proven.
    keeper: Option<ProcessIdentity>,
    /// The instance's cgroup path (as `/proc/<pid>/cgroup` shows it), once proven.
    cgroup: Option<PathBuf>,
}

/// A process proven to be the instance's, pinned by a pidfd: signals reach it or nothing.
#[derive(Debug)]
pub struct Proven {
    who: ProcessIdentity,
    how: Proof,
    /// It led its process group when proven (its pgid was its pid).
    leads_group: bool,
    fd: OwnedFd,
}

impl Proven {
    pub fn identity(&self) -> ProcessIdentity {
        self.who
    }

    pub fn how(&self) -> Proof {
        self.how
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Sends `signal` through the pidfd: to this very process, or (if it has ended) nobody.
    pub fn signal(&self, signal: Signal) -> Result<(), Errno> {
        spawn::signal_pidfd(self.fd.as_fd(), signal)
    }

    /// Sends `signal` to the process group this process led when it was proven. Skipped if
    /// it did not lead one, or if its pid now names another process (another start time): a
    /// pid that is a live group's id is never reused, so while the group has members it is
    /// still this service's group.
    pub fn signal_group(&self, signal: Signal) -> Result<(), Errno> {
        if !self.leads_group {
            return Err(Errno::ESRCH);
        }
        match read_stat(self.who.pid) {
            Ok(stat) if stat.start_time != self.who.start_time => Err(Errno::ESRCH),
            _ => spawn::signal_group(Pid::from_raw(self.who.pid), signal),
        }
    }

    /// Whether the process has ended (its pidfd is readable).
    pub fn has_ended(&self) -> bool {
        pidfd_ended(self.fd.as_fd())
    }
}

fn pidfd_ended(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

impl InstanceEvidence {
    /// Evidence of `instance`, run by `owner_uid`, before anything is proven.
    pub fn new(instance: &str, owner_uid: u32) -> InstanceEvidence {
        InstanceEvidence {
            instance: instance.to_owned(),
            owner_uid,
            service_uids: Vec::new(),
            segment_file: None,
            keeper: None,
            cgroup: None,
        }
    }

    /// The configured services' users (a process of theirs that carries the instance's mark
    /// is the instance's).
    pub fn set_service_uids(&mut self, uids: impl IntoIterator<Item = u32>) {
        self.service_uids = uids.into_iter().collect();
    }

    /// The instance's segment file, as `stat` gives it (`st_dev`, `st_ino`).
    pub fn set_segment_file(&mut self, file: Option<(u64, u64)>) {
        self.segment_file = file;
    }

    /// The keeper, proven: its children are the instance's.
    pub fn set_keeper(&mut self, keeper: &Proven) {
        self.keeper = Some(keeper.identity());
    }

    pub fn keeper(&self) -> Option<ProcessIdentity> {
        self.keeper
    }

    /// The instance's cgroup path, proven by [`prove_cgroup_record`].
    pub fn set_cgroup(&mut self, path: Option<PathBuf>) {
        self.cgroup = path;
    }

    /// Proves that `who` is the instance's process in `role` (see the module doc), and pins
    /// it with a pidfd.
    pub fn prove(&self, who: ProcessIdentity, role: Role) -> Result<Proven, NotProven> {
        if who.pid <= 0 {
            return Err(NotProven::Gone);
        }
        let fd = spawn::pidfd_open(Pid::from_raw(who.pid)).map_err(|_| NotProven::Gone)?;
        let stat = read_stat(who.pid).map_err(|_| NotProven::Gone)?;
        if stat.start_time != who.start_time || stat.is_finished() {
            return Err(NotProven::Gone);
        }
        let how = self.evidence(who.pid, stat.ppid, role)?;
        // Still the process the pidfd pinned: every read above was of it.
        if pidfd_ended(fd.as_fd()) {
            return Err(NotProven::Gone);
        }
        Ok(Proven {
            who,
            how,
            leads_group: stat.pgrp == who.pid,
            fd,
        })
    }

    /// The evidence that ties the live process `pid` (whose parent is `ppid`) to the instance.
    fn evidence(&self, pid: i32, ppid: i32, role: Role) -> Result<Proof, NotProven> {
        let uid = real_uid(pid)?;
        let owner = uid == self.owner_uid;
        let child_of_keeper = self
            .keeper
            .is_some_and(|k| k.pid == ppid && k.pid != pid && k.is_alive());
        match role {
            Role::Keeper | Role::Coordinator | Role::Standby => {
                if !owner {
                    return Err(NotProven::NoEvidence(format!(
                        "it runs as uid {uid}, not as the instance's uid {}",
                        self.owner_uid
                    )));
                }
                if role != Role::Keeper && child_of_keeper {
                    return Ok(Proof::ChildOfKeeper);
                }
                match self.segment_file {
                    Some(file) if maps_file(pid, file) => Ok(Proof::MapsSegment),
                    Some(_) => Err(NotProven::NoEvidence(format!(
                        "it does not map the instance's segment{}",
                        if role == Role::Keeper {
                            ""
                        } else {
                            " and its parent is not the instance's keeper"
                        }
                    ))),
                    None if has_internal_command_line(pid, &self.instance, role) => {
                        Ok(Proof::CommandLine)
                    }
                    None => Err(NotProven::NoEvidence(format!(
                        "no segment is left to compare, and its command line is not ccmgr's {} of instance {}",
                        role.internal_word().unwrap_or("process"),
                        self.instance
                    ))),
                }
            }
            Role::Service => {
                if child_of_keeper {
                    return Ok(Proof::ChildOfKeeper);
                }
                if let Some(tree) = &self.cgroup
                    && in_cgroup(pid, tree)
                {
                    return Ok(Proof::InCgroup);
                }
                if has_mark(pid, &self.instance) {
                    if owner || self.service_uids.contains(&uid) {
                        return Ok(Proof::Environment);
                    }
                    return Err(NotProven::NoEvidence(format!(
                        "its environment names the instance, but it runs as uid {uid}, neither the instance's ({}) nor a service user's",
                        self.owner_uid
                    )));
                }
                Err(NotProven::NoEvidence(format!(
                    "its parent is not the instance's keeper, it is not in the instance's cgroups, and its environment does not carry CCMGR_INSTANCE={}",
                    self.instance
                )))
            }
        }
    }
}

/// The sentence `stop` says of a recorded process it refused to signal.
pub fn refusal(who: ProcessIdentity, recorded_as: &str, why: &NotProven) -> String {
    format!(
        "pid {} recorded as {recorded_as} is not this instance's process ({why}): not signalled",
        who.pid
    )
}

/// The real uid of `pid` (the first field of `Uid:` in `/proc/<pid>/status`).
fn real_uid(pid: i32) -> Result<u32, NotProven> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| NotProven::Gone)?;
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .ok_or_else(|| NotProven::NoEvidence(format!("/proc/{pid}/status shows no uid")))
}

/// The (major, minor) of a `st_dev`, as glibc's `gnu_dev_major`/`gnu_dev_minor` split it.
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// Whether `/proc/<pid>/maps` lists a mapping of the file `(dev, ino)`. A line reads
/// `start-end perms offset MAJ:MIN inode [path]`, the device in hex.
fn maps_file(pid: i32, (dev, ino): (u64, u64)) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    maps_list(&text, (dev, ino))
}

fn maps_list(maps: &str, (dev, ino): (u64, u64)) -> bool {
    let wanted = major_minor(dev);
    maps.lines().any(|line| {
        let mut fields = line.split_ascii_whitespace().skip(3);
        let (Some(device), Some(inode)) = (fields.next(), fields.next()) else {
            return false;
        };
        let device = device.split_once(':').and_then(|(ma, mi)| {
            Some((
                u64::from_str_radix(ma, 16).ok()?,
                u64::from_str_radix(mi, 16).ok()?,
            ))
        });
        device == Some(wanted) && inode.parse::<u64>().ok() == Some(ino)
    })
}

/// Whether `pid`'s cgroup (v2) is `tree` or below it.
fn in_cgroup(pid: i32, tree: &Path) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|text| crate::cgroup::v2_path(&text))
        .is_some_and(|p| p.starts_with(tree))
}

/// Whether `pid`'s environment holds `CCMGR_INSTANCE=<instance>`.
fn has_mark(pid: i32, instance: &str) -> bool {
    let marker = format!("{}={instance}", crate::service::INSTANCE_ENV);
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
        environ
            .split(|&b| b == 0)
            .any(|var| var == marker.as_bytes())
    })
}

/// Whether `pid`'s command line holds `--instance <instance> internal <role>`.
fn has_internal_command_line(pid: i32, instance: &str, role: Role) -> bool {
    let Some(word) = role.internal_word() else {
        return false;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    internal_role_of(&cmdline, instance) == Some(word)
}

/// The internal role a command line (NUL-separated) names for `instance`, if any.
pub fn internal_role_of<'a>(cmdline: &'a [u8], instance: &str) -> Option<&'static str> {
    let args: Vec<&'a [u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(4).find_map(|w| {
        if w[0] != b"--instance" || w[1] != instance.as_bytes() || w[2] != b"internal" {
            return None;
        }
        [Role::Keeper, Role::Coordinator, Role::Standby]
            .into_iter()
            .filter_map(Role::internal_word)
            .find(|word| w[3] == word.as_bytes())
    })
}

/// Proves that the cgroup record of `instance` (`dir` and `path`, as the keeper wrote them)
/// names the instance's own cgroup: a directory `ccmgr.<instance>` owned by the instance's
/// uid, on a cgroup2 mount, where that mount puts the cgroup `path`. A forged record naming
/// any other cgroup (a system slice, the root) would otherwise have `stop` kill all it holds.
pub fn prove_cgroup_record(
    instance: &str,
    owner_uid: u32,
    dir: &Path,
    path: &Path,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let name = format!("ccmgr.{instance}");
    if dir.file_name() != Some(name.as_ref()) || path.file_name() != Some(name.as_ref()) {
        return Err(format!("it is not named {name}"));
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != owner_uid {
        return Err(format!(
            "it belongs to uid {}, not to the instance's uid {owner_uid}",
            meta.uid()
        ));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let placed = crate::cgroup::cgroup2_mounts(&mountinfo).iter().any(|m| {
        path.strip_prefix(&m.root)
            .is_ok_and(|below| m.point.join(below) == dir)
    });
    if !placed {
        return Err(format!(
            "{} is not where a cgroup2 mount puts the cgroup {}",
            dir.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_mapping_is_found_by_device_and_inode() {
        // A real maps line: /dev/shm is tmpfs, device 00:1a.
        let maps = "7f00-7f10 rw-s 00000000 00:1a 4242 /dev/shm/ccmgr.x\n\
                    7f10-7f20 r--p 00000000 fd:01 99 /usr/lib/libc.so.6\n";
        assert!(maps_list(maps, (0x1a, 4242)));
        assert!(!maps_list(maps, (0x1a, 4243)));
        // fd:01 is major 253, minor 1: st_dev 0xfd01.
        assert!(maps_list(maps, (0xfd01, 99)));
        assert!(!maps_list("garbage\n\n", (0x1a, 4242)));
    }

    #[test]
    fn a_process_that_maps_the_file_is_proven_and_one_that_does_not_is_not() {
        // This test process maps its own executable: stand-in for the segment.
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        let me = ProcessIdentity::current().unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let mut evidence = InstanceEvidence::new("proof", uid);
        evidence.set_segment_file(Some((exe.dev(), exe.ino())));
        let proven = evidence.prove(me, Role::Keeper).unwrap();
        assert_eq!(proven.how(), Proof::MapsSegment);
        // Another file: not proven, and the reason says what was looked for.
        let other = std::fs::metadata("/proc/self/cwd").unwrap();
        evidence.set_segment_file(Some((other.dev(), other.ino())));
        let err = evidence.prove(me, Role::Keeper).unwrap_err();
        assert!(err.to_string().contains("does not map"), "{err}");
        // A forged start time: gone, not refused.
        let forged = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert_eq!(
            evidence.prove(forged, Role::Keeper).unwrap_err(),
            NotProven::Gone
        );
    }

    #[test]
    fn a_child_of_the_keeper_is_proven_and_a_stranger_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let who = ProcessIdentity::of(child.id() as i32).unwrap();
        let exe = std::fs::metadata("/proc/self/exe").unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let mut evidence = InstanceEvidence::new("proof-child", uid);
        evidence.set_segment_file(Some((exe.dev(), exe.ino())));
        let err = evidence.prove(who, Role::Service).unwrap_err();
        assert!(
            err.to_string().contains("CCMGR_INSTANCE=proof-child"),
            "{err}"
        );
        let me = evidence
            .prove(ProcessIdentity::current().unwrap(), Role::Keeper)
            .unwrap();
        evidence.set_keeper(&me);
        let proven = evidence.prove(who, Role::Service).unwrap();
        assert_eq!(proven.how(), Proof::ChildOfKeeper);
        proven.signal(Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(evidence.prove(who, Role::Service).unwrap_err().is_gone());
    }

    #[test]
    fn the_environment_mark_counts_only_for_the_instance_s_users() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("CCMGR_INSTANCE", "proof-env")
            .spawn()
            .unwrap();
        let who = ProcessIdentity::of(child.id() as i32).unwrap();
        // The parent of a vfork-spawned child runs on before the kernel has set the child's
        // new environment up: wait (with a deadline) until /proc shows it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !has_mark(who.pid, "proof-env") {
            assert!(std::time::Instant::now() < deadline, "no environment shown");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let uid = nix::unistd::getuid().as_raw();
        let evidence = InstanceEvidence::new("proof-env", uid);
        assert_eq!(
            evidence.prove(who, Role::Service).unwrap().how(),
            Proof::Environment
        );
        // The same process under an instance run by someone else: its uid is not theirs.
        let foreign = InstanceEvidence::new("proof-env", uid + 1);
        let err = foreign.prove(who, Role::Service).unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
        // A party needs more than the mark.
        assert!(
            !evidence
                .prove(who, Role::Coordinator)
                .unwrap_err()
                .is_gone()
        );
        let _ = child.kill();
        child.wait().unwrap();
    }

    #[test]
    fn an_internal_command_line_names_its_role() {
        let line = b"/usr/bin/ccmgr\0--instance\0web\0internal\0standby\0";
        assert_eq!(internal_role_of(line, "web"), Some("standby"));
        assert_eq!(internal_role_of(line, "we"), None);
        assert_eq!(
            internal_role_of(b"ccmgr\0--instance\0web\0internal\0bogus\0", "web"),
            None
        );
    }

    #[test]
    fn a_cgroup_record_must_name_the_instance_s_own_cgroup() {
        let uid = nix::unistd::getuid().as_raw();
        let err =
            prove_cgroup_record("x", uid, Path::new("/sys/fs/cgroup"), Path::new("/")).unwrap_err();
        assert!(err.contains("not named ccmgr.x"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("ccmgr.x");
        std::fs::create_dir(&fake).unwrap();
        let err = prove_cgroup_record("x", uid, &fake, Path::new("/ccmgr.x")).unwrap_err();
        assert!(err.contains("not where a cgroup2 mount puts"), "{err}");
        let err = prove_cgroup_record("x", uid + 1, &fake, Path::new("/ccmgr.x")).unwrap_err();
        assert!(err.contains("belongs to uid"), "{err}");
    }
}

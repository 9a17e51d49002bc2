//! Starting one service process, signalling it, and reading how it ended.
//!
//! This module owns everything that happens between "the coordinator decided to start a
//! service" and "the service's program is running": building its environment, forking,
//! putting the child in its own session (and its service's cgroup, when given one), handing it
//! `/dev/null` and the output pipe, changing credentials and then directory, and `execve`. It also
//! owns the two ways to signal a running service ([`signal_group`], [`signal_pidfd`]) and the
//! [`ProcessExit`] a reaped child turns into.
//!
//! The exec-failure report follows dinit's `run-child-proc.cc` (STYLE.md, item 4): everything
//! is prepared before `fork`; after it the child makes only async-signal-safe system calls, and
//! when one fails it writes `{stage, errno}` to a close-on-exec pipe and `_exit(127)`s. The
//! parent reads that pipe to its end: nothing means `execve` succeeded (the pipe closed on
//! exec), five bytes mean the spawn failed, and the operator reads "changing directory to
//! /srv/x: No such file or directory" instead of "exited with status 127".
//!
//! Most of the crate's `unsafe` code is here (the README lists the few other places): `fork`
//! and `clone3`, the child side, and the raw system calls glibc has no (suitable) wrapper for:
//! `pidfd_open`, `pidfd_send_signal`, `close_range` and `rt_sigaction`.

use std::ffi::{CString, c_char, c_int};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, pthread_sigmask};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, User, fork, getgrouplist, getuid, pipe2, read};

use crate::config::ServiceSpec;
use crate::config::service::{defaults, read_env_file};
pub use crate::vocab::ProcessExit;

/// The exit status of a child whose spawn failed after `fork` (the shell's "cannot execute").
/// The parent reaps such a child itself, so no caller ever sees this status from a failed spawn;
/// it is documented because `ps` and `strace` can.
pub const EXEC_FAILED_STATUS: i32 = 127;

/// The word inserted after argv[0] for services with `cc_arg = true`.
pub const CC_ARG: &str = "-cc";

/// Why a service could not be started. Each message is a sentence an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The child was forked but failed before its program ran (it has been reaped).
    #[error("{action}: {}", .errno.desc())]
    Exec {
        stage: ExecStage,
        errno: Errno,
        /// What the child was doing, with its subject: "changing directory to /srv/x".
        action: String,
        /// The pid the failed child had; it has been reaped and may already be reused.
        pid: Pid,
    },
    #[error("{what} holds a NUL byte, which cannot be passed to a program")]
    NulByte { what: String },
    #[error("environment variable name `{key}` is not valid: it may not be empty or hold `=`")]
    InvalidEnvName { key: String },
    #[error("cannot read the env file: {0}")]
    EnvFile(String),
    #[error("cannot look up user id {uid}: {reason}")]
    UserLookup { uid: u32, reason: String },
    #[error("cannot list the supplementary groups of user `{user}`: {}", .errno.desc())]
    Groups { user: String, errno: Errno },
    #[error("argv is empty: a program needs at least argv[0]")]
    EmptyArgv,
    #[error("cannot open /dev/null for the service's standard input: {}", .0.desc())]
    DevNull(Errno),
    #[error("cannot create the pipe that reports exec failures: {}", .0.desc())]
    ReportPipe(Errno),
    #[error("cannot block signals around fork: {}", .0.desc())]
    SignalMask(Errno),
    #[error("cannot fork: {}", .0.desc())]
    Fork(Errno),
    #[error("cannot open a pidfd for the new process {pid}: {}", .errno.desc())]
    Pidfd { pid: Pid, errno: Errno },
    #[error("cannot read the exec report of process {pid}: {}", .errno.desc())]
    ReadReport { pid: Pid, errno: Errno },
    #[error("process {pid} sent a malformed exec report ({len} bytes)")]
    MalformedReport { pid: Pid, len: usize },
}

/// The step of the child's setup that failed: the first byte of the exec report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExecStage {
    /// `setsid()`: becoming a session and process-group leader.
    Session = 1,
    /// `dup2()`: installing /dev/null and the output pipe as fds 0, 1 and 2.
    Stdio = 2,
    /// `chdir()` to the working directory.
    Chdir = 3,
    /// `setgroups()`: the target user's supplementary groups.
    Setgroups = 4,
    /// `setgid()`.
    Setgid = 5,
    /// `setuid()`.
    Setuid = 6,
    /// `execve()` itself.
    Exec = 7,
    /// Writing `0` to the service's `cgroup.procs`: moving into its cgroup.
    Cgroup = 8,
}

impl ExecStage {
    fn from_u8(byte: u8) -> Option<ExecStage> {
        use ExecStage::*;
        [
            Session, Stdio, Chdir, Setgroups, Setgid, Setuid, Exec, Cgroup,
        ]
        .into_iter()
        .find(|s| *s as u8 == byte)
    }
}

/// The user and groups a service runs as, when it does not run as the coordinator's user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups, set with `setgroups` before `setgid`/`setuid`.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// What `spec` asks for: `None` when it names neither a user nor a group (the service runs
    /// as the coordinator does). With a user: its uid, the group named in `spec` or else the
    /// user's primary group, and the user's supplementary groups from the group database (what
    /// `initgroups` would set; looked up here because `initgroups` is not async-signal-safe).
    /// With a group only: the coordinator's uid, that group, and no supplementary groups.
    pub fn for_service(spec: &ServiceSpec) -> Result<Option<Credentials>, SpawnError> {
        match (&spec.user, &spec.group) {
            (None, None) => Ok(None),
            (None, Some(group)) => Ok(Some(Credentials {
                uid: getuid().as_raw(),
                gid: group.id,
                groups: vec![group.id],
            })),
            (Some(user), group) => {
                let entry = lookup_user(user.id)?;
                let gid = group.as_ref().map_or(entry.gid, |g| Gid::from_raw(g.id));
                let name =
                    CString::new(entry.name.as_bytes()).map_err(|_| SpawnError::NulByte {
                        what: format!("user name `{}`", entry.name),
                    })?;
                let groups = getgrouplist(&name, gid).map_err(|errno| SpawnError::Groups {
                    user: entry.name.clone(),
                    errno,
                })?;
                Ok(Some(Credentials {
                    uid: user.id,
                    gid: gid.as_raw(),
                    groups: groups.into_iter().map(Gid::as_raw).collect(),
                }))
            }
        }
    }
}

/// The keeper (root) reads a service's `env_file` for it and hands the contents to the
/// service's `user`. That must not let the user read a file he could not read himself: either
/// no one but root and the keeper's user can change what the path names (a secret file in
/// `/etc`, root's only, is passed as systemd's `EnvironmentFile=` is), or the user may read
/// the file himself (its owner, its group, or everyone may). Otherwise a service user who owns
/// the directory of his `env_file` could point it at another service's secrets, or anything
/// root can read, and find them in his environment at his next start.
fn env_file_is_the_users_to_read(path: &Path, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let keeper = nix::unistd::geteuid().as_raw();
    if uid == keeper {
        return Ok(());
    }
    let Err(untrusted) = crate::shm::state_dir::path_only_owner_can_change(path, keeper) else {
        return Ok(());
    };
    let meta = std::fs::metadata(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let gid = lookup_user(uid).map(|u| u.gid.as_raw()).ok();
    let mode = meta.mode();
    let readable = (meta.uid() == uid && mode & 0o400 != 0)
        || (Some(meta.gid()) == gid && mode & 0o040 != 0)
        || mode & 0o004 != 0;
    if readable {
        return Ok(());
    }
    let because = match &untrusted {
        crate::shm::DirTrustError::Untrusted {
            path: what,
            owner,
            mode,
            why,
            ..
        } => format!(
            "{} (owned by uid {owner}, mode {mode:04o}) is on its way, so {why}",
            what.display()
        ),
        other => other.to_string(),
    };
    Err(format!(
        "`{}` is not readable by the service's user (uid {uid}), and users other than root may change what its path names: {because}; it is not read for the service",
        path.display()
    ))
}

fn lookup_user(uid: u32) -> Result<User, SpawnError> {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(SpawnError::UserLookup {
            uid,
            reason: "no such user in the password database".into(),
        }),
        Err(errno) => Err(SpawnError::UserLookup {
            uid,
            reason: errno.desc().into(),
        }),
    }
}

/// Everything [`spawn_service`] needs; the caller builds it, usually with
/// [`SpawnRequest::for_service`].
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    /// The program to execute (absolute; no PATH search happens here).
    pub program: PathBuf,
    /// The complete argv, argv[0] included, exactly as the program will see it: `cc_arg` has
    /// already been applied (see [`service_argv`]).
    pub argv: Vec<String>,
    /// The complete environment (see [`build_environment`]); nothing is inherited.
    pub env: Vec<(String, String)>,
    /// The directory the program starts in.
    pub working_dir: PathBuf,
    /// `None`: run as the coordinator's user and groups.
    pub credentials: Option<Credentials>,
    /// The write end of the output pipe: becomes the child's stdout and stderr. It may (and
    /// should) be close-on-exec in the coordinator; the child's copies on fds 1 and 2 are not.
    pub output: BorrowedFd<'a>,
    /// The service's `cgroup.procs`, open for writing (see [`crate::cgroup::Tree::open_procs`]):
    /// the child moves itself into the service's cgroup right after `setsid`, before it can
    /// fork anything, so that everything the service ever starts is born there. `None`: the
    /// child stays in its parent's cgroup (the machine offers no cgroups).
    pub cgroup_procs: Option<BorrowedFd<'a>>,
    /// The service's cgroup directory (see [`crate::cgroup::Tree::open_run`]): with it, the
    /// child is *born* in the cgroup (`clone3` with `CLONE_INTO_CGROUP`, Linux 5.7+) and never
    /// moves. A move (`cgroup_procs`) takes the kernel's cgroup thread-group lock for writing,
    /// which waits for an RCU grace period: 1 to 20 ms per spawn, against nothing for a child
    /// born in place. Where `clone3` cannot do that (an old kernel, a seccomp filter, cgroup
    /// v1), the child is forked and moves itself through `cgroup_procs`, as without this.
    ///
    /// The cgroup must be one no `cgroup.kill` ever reached (a fresh one): Linux 6.14 and
    /// later compare the kill count of the *target* cgroup with the one of the *parent's*
    /// cgroup, and SIGKILL the child at birth when they differ (see [`born_in_cgroup_works`]).
    pub cgroup_dir: Option<BorrowedFd<'a>>,
}

impl<'a> SpawnRequest<'a> {
    /// The request for starting `spec` with the environment `env` (from
    /// [`build_environment`]) and its output going to `output`.
    pub fn for_service(
        spec: &ServiceSpec,
        env: Vec<(String, String)>,
        output: BorrowedFd<'a>,
    ) -> Result<Self, SpawnError> {
        Ok(SpawnRequest {
            program: spec.program.clone(),
            argv: service_argv(spec),
            env,
            working_dir: spec
                .working_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/")),
            credentials: Credentials::for_service(spec)?,
            output,
            cgroup_procs: None,
            cgroup_dir: None,
        })
    }
}

/// The argv a service is started with: its `command`, with [`CC_ARG`] inserted after argv[0]
/// when `cc_arg` is set. The coordinator applies `cc_arg` here, once, so a [`SpawnRequest`]'s
/// argv is always final.
pub fn service_argv(spec: &ServiceSpec) -> Vec<String> {
    let mut argv = spec.command.clone();
    if spec.cc_arg && !argv.is_empty() {
        argv.insert(1, CC_ARG.to_owned());
    }
    argv
}

/// The environment of a service, from a clean slate (nothing of the coordinator's own
/// environment leaks into services). Later layers override earlier ones:
///
/// 1. `PATH` = [`defaults::PATH`];
/// 2. when `user` is set: `HOME`, `USER`, `LOGNAME` and `SHELL` from its password entry;
/// 3. the `env_file`, read now (so an edit takes effect on the next start);
/// 4. the `env` table;
/// 5. `CCMGR_INSTANCE` = `instance`, `CCMGR_SERVICE` = the service id, `CCMGR_RUN_DIR` =
///    `run_dir` (where the service API's files are: see [`crate::service`]);
/// 6. `extra`, such as `NOTIFY_SOCKET`.
///
/// Each name appears once, in the position it was first set.
pub fn build_environment(
    spec: &ServiceSpec,
    instance: &str,
    run_dir: &Path,
    extra: &[(String, String)],
) -> Result<Vec<(String, String)>, SpawnError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_owned(),
            None => env.push((key.to_owned(), value.to_owned())),
        };
    };
    set("PATH", defaults::PATH);
    if let Some(user) = &spec.user {
        let entry = lookup_user(user.id)?;
        set("HOME", &entry.dir.to_string_lossy());
        set("USER", &entry.name);
        set("LOGNAME", &entry.name);
        set("SHELL", &entry.shell.to_string_lossy());
    }
    if let Some(path) = &spec.env_file {
        if let Some(user) = &spec.user {
            env_file_is_the_users_to_read(path, user.id).map_err(SpawnError::EnvFile)?;
        }
        for (key, value) in read_env_file(path).map_err(SpawnError::EnvFile)? {
            set(&key, &value);
        }
    }
    for (key, value) in &spec.env {
        set(key, value);
    }
    set("CCMGR_INSTANCE", instance);
    set("CCMGR_SERVICE", &spec.id);
    set(crate::service::RUN_DIR_ENV, &run_dir.to_string_lossy());
    for (key, value) in extra {
        set(key, value);
    }
    for (key, _) in &env {
        if key.is_empty() || key.contains('=') {
            return Err(SpawnError::InvalidEnvName { key: key.clone() });
        }
    }
    Ok(env)
}

/// A started service process.
///
/// The caller owns the child: it must reap it (`waitpid`, e.g. [`try_reap`] when `pidfd`
/// polls readable), or it stays a zombie. Until it is reaped its pid cannot be reused, so
/// `pid` is also the id of its session and process group.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// A pidfd for the child: readable once it has exited; signals sent through it
    /// ([`signal_pidfd`]) can never reach a process that merely reuses the pid.
    pub pidfd: OwnedFd,
}

/// Everything the child needs, allocated before `fork`, so that the child allocates nothing.
struct ChildPlan<'r> {
    program: CString,
    /// Pointers into `_argv` and `_envp`, each list ending with a null pointer.
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    working_dir: CString,
    credentials: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    stdin: OwnedFd,
    output: BorrowedFd<'r>,
    cgroup_procs: Option<BorrowedFd<'r>>,
    cgroup_dir: Option<BorrowedFd<'r>>,
    /// The write end of the report pipe (close-on-exec).
    report: OwnedFd,
    /// A kernel `struct sigaction` for SIG_DFL: all zero (handler SIG_DFL = 0, no flags, no
    /// restorer, empty mask). Eight words is more than any architecture's layout needs.
    default_action: [u64; 8],
    /// The kernel's sigset_t size in bytes, which rt_sigaction checks.
    sigset_size: usize,
    empty_mask: SigSet,
    /// The highest signal number (SIGRTMAX): every disposition up to it is reset.
    max_signal: c_int,
    /// The open-files limit to give the service back, when the supervisor raised its own
    /// (see [`raise_fd_limit`]).
    nofile: Option<libc::rlimit>,
}

/// The open-files limit this process had before [`raise_fd_limit`] raised it.
static ORIGINAL_NOFILE: std::sync::OnceLock<libc::rlimit> = std::sync::OnceLock::new();

/// Raises this process's soft limit on open files to the hard limit: a keeper holds a pipe
/// and a log file per service, so a thousand services need more than the usual 1024. The
/// limit the process had is remembered, and every service spawned afterwards gets it back,
/// as programs that use `select()` break with fd numbers above 1024.
pub fn raise_fd_limit() -> Result<u64, Errno> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = ORIGINAL_NOFILE.set(libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// The open-files limit (soft, hard) this process had before [`raise_fd_limit`], which
/// services get back: a keeper hands it to its next image across `ccmgr upgrade`'s exec, since
/// the limit it then has is the raised one.
pub fn original_fd_limit() -> Option<(u64, u64)> {
    ORIGINAL_NOFILE.get().map(|l| (l.rlim_cur, l.rlim_max))
}

/// Restores what [`original_fd_limit`] said in the previous image of this process, then raises
/// the limit as [`raise_fd_limit`] does.
pub fn raise_fd_limit_from(original: (u64, u64)) -> Result<u64, Errno> {
    let _ = ORIGINAL_NOFILE.set(libc::rlimit {
        rlim_cur: original.0,
        rlim_max: original.1,
    });
    raise_fd_limit()
}

fn cstring(what: impl FnOnce() -> String, bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::NulByte { what: what() })
}

impl<'r> ChildPlan<'r> {
    fn prepare(req: &SpawnRequest<'r>, report: OwnedFd) -> Result<Self, SpawnError> {
        if req.argv.is_empty() {
            return Err(SpawnError::EmptyArgv);
        }
        let program = cstring(
            || format!("program path `{}`", req.program.display()),
            req.program.as_os_str().as_bytes(),
        )?;
        let argv_c = req
            .argv
            .iter()
            .enumerate()
            .map(|(i, a)| cstring(|| format!("argv[{i}]"), a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let envp_c = req
            .env
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains('=') {
                    return Err(SpawnError::InvalidEnvName { key: k.clone() });
                }
                cstring(
                    || format!("environment variable {k}"),
                    format!("{k}={v}").as_bytes(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let working_dir = cstring(
            || format!("working directory `{}`", req.working_dir.display()),
            req.working_dir.as_os_str().as_bytes(),
        )?;
        let stdin = open(
            "/dev/null",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(SpawnError::DevNull)?;
        let ptrs = |list: &[CString]| {
            list.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(ptr::null()))
                .collect::<Vec<_>>()
        };
        let max_signal = libc::SIGRTMAX();
        Ok(ChildPlan {
            program,
            argv: ptrs(&argv_c),
            envp: ptrs(&envp_c),
            _argv: argv_c,
            _envp: envp_c,
            working_dir,
            credentials: req
                .credentials
                .as_ref()
                .map(|c| (c.uid, c.gid, c.groups.clone())),
            stdin,
            output: req.output,
            cgroup_procs: req.cgroup_procs,
            cgroup_dir: req.cgroup_dir,
            report,
            default_action: [0; 8],
            // 64 signals per 8 bytes: 8 on most architectures, 16 where there are 128 (MIPS).
            sigset_size: usize::try_from(max_signal).unwrap_or(64).div_ceil(64) * 8,
            empty_mask: SigSet::empty(),
            max_signal,
            nofile: ORIGINAL_NOFILE.get().copied(),
        })
    }
}

/// Starts one service process.
///
/// The child becomes the leader of a new session and process group (so `pid` is also its
/// pgid and sid), moves into the cgroup of `req.cgroup_procs` if there is one, gets every
/// signal disposition reset to the default and an empty signal mask, `/dev/null` as stdin and
/// `req.output` as stdout and stderr, no other open fds (every fd from 3 up is marked
/// close-on-exec), `req.working_dir`, `req.credentials`, and exactly `req.env`.
///
/// Returns once the program is running (its `execve` succeeded) or has failed to start: then
/// the error says at which step, and the failed child has been reaped. On success the caller
/// owns the child and must reap it; see [`Spawned`].
///
/// The pidfd is opened right after `fork`. That is race-free as long as nothing else in the
/// process reaps children it does not own: no `waitpid(-1)` in another thread, and SIGCHLD not
/// set to SIG_IGN (which makes the kernel reap children itself).
///
/// This blocks until the child has exec'd, which is the time of a `fork` and an `execve`.
pub fn spawn_service(req: &SpawnRequest<'_>) -> Result<Spawned, SpawnError> {
    launch_service(req)?.confirm()
}

/// A child [`launch_service`] forked, whose `execve` is not confirmed yet:
/// [`confirm`](Launched::confirm) says whether its program runs. Until then it is the caller's child
/// like any other (its pid stays reserved until it is reaped).
#[derive(Debug)]
pub struct Launched {
    pid: Pid,
    pidfd: OwnedFd,
    /// The read end of the report pipe (see the module doc).
    report: OwnedFd,
    /// What the request asked the child to do, to name the step that failed.
    context: StageContext,
}

/// The parts of a [`SpawnRequest`] an error message names.
#[derive(Debug)]
struct StageContext {
    program: PathBuf,
    working_dir: PathBuf,
    credentials: Option<Credentials>,
}

/// The first half of [`spawn_service`]: forks the child (born in its cgroup where it can be)
/// and returns without waiting for its `execve`. Launching several children before
/// confirming any lets them exec on other cores while this one forks the next: the keeper
/// starts a batch of services that way, instead of one fork-and-exec round trip after the
/// other.
pub fn launch_service(req: &SpawnRequest<'_>) -> Result<Launched, SpawnError> {
    let (report_read, report_write) = pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::ReportPipe)?;
    let plan = ChildPlan::prepare(req, report_write)?;

    // Block every signal across fork, so that no handler of the coordinator (signal-hook's
    // self-pipe writers, say) runs in the child before the child has reset the dispositions.
    let mut old_mask = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )
    .map_err(SpawnError::SignalMask)?;

    // Born in its cgroup where the kernel can do that (with its pidfd, from the same call);
    // else forked, and it moves itself in.
    let mut born = None;
    if let Some(dir) = plan.cgroup_dir {
        // SAFETY: as for `fork` below: the child runs only `run_child`.
        match unsafe { clone_into_cgroup(dir) } {
            Ok(CloneResult::Child) => run_child(&plan, true),
            Ok(CloneResult::Parent { child, pidfd }) => born = Some((child, pidfd)),
            Err(errno) => tracing::debug!(%errno, "clone3 into the cgroup failed: forking"),
        }
    }
    let forked = match born {
        Some((child, pidfd)) => Ok((child, Some(pidfd))),
        // SAFETY: after fork the child (a copy of this one thread) runs only `run_child`,
        // which makes raw async-signal-safe system calls on memory `plan` allocated before the
        // fork, never allocates, never takes a lock, and ends in `execve` or `_exit`. So the
        // locks other threads may have held at fork time (the allocator's, stdio's) are never
        // touched.
        None => match unsafe { fork() } {
            // Before anything else, and without restoring the mask: see `run_child`.
            Ok(ForkResult::Child) => run_child(&plan, false),
            Ok(ForkResult::Parent { child }) => Ok((child, None)),
            Err(errno) => Err(errno),
        },
    };
    let restored = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    let (pid, born_pidfd) = forked.map_err(SpawnError::Fork)?;
    if let Err(errno) = restored {
        // Restoring a mask we just read cannot fail; if it did, the coordinator would run with
        // every signal blocked, which is worse than a failed spawn.
        tracing::error!(%errno, "cannot restore the signal mask after fork");
    }
    // Close our copy of the write end: the report pipe then reaches end-of-file exactly when
    // the child has exec'd (close-on-exec) or exited.
    drop(plan);

    let pidfd = match born_pidfd.map_or_else(|| pidfd_open(pid), Ok) {
        Ok(fd) => fd,
        Err(errno) => {
            // Without a pidfd the caller could not watch this child safely: stop it now.
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = wait_blocking(pid);
            return Err(SpawnError::Pidfd { pid, errno });
        }
    };

    Ok(Launched {
        pid,
        pidfd,
        report: report_read,
        context: StageContext {
            program: req.program.clone(),
            working_dir: req.working_dir.clone(),
            credentials: req.credentials.clone(),
        },
    })
}

impl Launched {
    /// The child's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits until the child has exec'd (its program runs: `Ok`) or failed before (`Err`,
    /// and the child has been reaped): the second half of [`spawn_service`].
    pub fn confirm(self) -> Result<Spawned, SpawnError> {
        let Launched {
            pid,
            pidfd,
            report: report_read,
            context,
        } = self;
        let mut report = [0u8; 5];
        let mut len = 0;
        while len < report.len() {
            match read(&report_read, &mut report[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    let _ = signal_pidfd(pidfd.as_fd(), Signal::SIGKILL);
                    let _ = wait_blocking(pid);
                    return Err(SpawnError::ReadReport { pid, errno });
                }
            }
        }
        if len == 0 {
            return Ok(Spawned { pid, pidfd });
        }
        // The child failed before exec and is about to `_exit` (or has): reap it so that no zombie
        // is left behind.
        let _ = wait_blocking(pid);
        let stage = ExecStage::from_u8(report[0]);
        match (len, stage) {
            (5, Some(stage)) => {
                let errno = Errno::from_raw(i32::from_ne_bytes([
                    report[1], report[2], report[3], report[4],
                ]));
                let action = describe_stage(&context, stage);
                Err(SpawnError::Exec {
                    stage,
                    errno,
                    action,
                    pid,
                })
            }
            _ => Err(SpawnError::MalformedReport { pid, len }),
        }
    }
}

/// "changing directory to /srv/x": what the child was doing when `stage` failed.
fn describe_stage(req: &StageContext, stage: ExecStage) -> String {
    match stage {
        ExecStage::Session => "creating a new session".into(),
        ExecStage::Stdio => "redirecting standard input and output".into(),
        ExecStage::Chdir => {
            format!("changing directory to {}", req.working_dir.display())
        }
        ExecStage::Setgroups => match &req.credentials {
            Some(c) => format!("setting supplementary groups {:?}", c.groups),
            None => "setting supplementary groups".into(),
        },
        ExecStage::Setgid => format!(
            "setting group id {}",
            req.credentials.as_ref().map_or(0, |c| c.gid)
        ),
        ExecStage::Setuid => format!(
            "setting user id {}",
            req.credentials.as_ref().map_or(0, |c| c.uid)
        ),
        ExecStage::Exec => format!("executing {}", req.program.display()),
        ExecStage::Cgroup => "joining the service's cgroup".into(),
    }
}

/// Waits for `pid`, retrying on EINTR. Used only for children this module knows are exiting.
fn wait_blocking(pid: Pid) -> Result<WaitStatus, Errno> {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// The kernel's `struct clone_args` (linux/sched.h) up to `cgroup`: its second version
/// (`CLONE_ARGS_SIZE_VER2`), the first with `CLONE_INTO_CGROUP` (Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (linux/sched.h; not in every version of the libc crate).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Set once `clone3` into a cgroup has failed for a reason that will not go away (an old
/// kernel, cgroup v1, a seccomp filter): later spawns go straight to `fork`.
static CLONE_INTO_CGROUP_UNUSABLE: AtomicBool = AtomicBool::new(false);

/// What [`clone_into_cgroup`] made: as `fork`'s result, with the child's pidfd.
enum CloneResult {
    Child,
    Parent { child: Pid, pidfd: OwnedFd },
}

/// `fork`, but the child is born in the cgroup whose directory is `dir`, and its pidfd comes
/// with it: `clone3` with `CLONE_INTO_CGROUP | CLONE_PIDFD` and `SIGCHLD` as its exit signal,
/// nothing shared. `Err` when no child was made (the caller forks instead).
///
/// # Safety
/// As for `fork` in a process that may have other threads: the child must run only
/// async-signal-safe code and end in `execve` or `_exit`. Moreover the raw system call skips
/// libc's fork bookkeeping (its atfork handlers, the thread id it caches): the child must not
/// rely on either, which `run_child` does not (it makes raw system calls only).
unsafe fn clone_into_cgroup(dir: BorrowedFd<'_>) -> Result<CloneResult, Errno> {
    if CLONE_INTO_CGROUP_UNUSABLE.load(Ordering::Relaxed) {
        return Err(Errno::ENOSYS);
    }
    let mut pidfd: c_int = -1;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: dir.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid, initialised clone_args of the size passed, alive for the
    // call, and `pidfd` a live int the kernel writes the pidfd to. Without CLONE_VM the child
    // gets a copy of the address space, as with fork; the caller keeps the child to
    // async-signal-safe code (see this function's contract).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match rc {
        0 => Ok(CloneResult::Child),
        pid if pid > 0 => Ok(CloneResult::Parent {
            child: Pid::from_raw(pid as i32),
            // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd, owned by nobody else.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
        _ => {
            let errno = Errno::last();
            // Transient failures (out of memory or pids, a cgroup just removed) say nothing of
            // the next spawn; the others (ENOSYS, EINVAL, EPERM, EOPNOTSUPP...) do.
            if !matches!(
                errno,
                Errno::EAGAIN | Errno::ENOMEM | Errno::EINTR | Errno::EBUSY | Errno::ENOENT
            ) {
                CLONE_INTO_CGROUP_UNUSABLE.store(true, Ordering::Relaxed);
            }
            Err(errno)
        }
    }
}

/// Whether a child born in the (fresh, empty) cgroup whose directory is `dir` lives: one
/// `clone3` of a child that exits at once, and its exit status. False where `clone3` into a
/// cgroup fails, and where the kernel SIGKILLs the child at birth: Linux 6.14 and later do that
/// whenever the kill count (`cgroup.kill` writes, its own and its ancestors') of the target
/// cgroup differs from that of the parent's cgroup, which a fresh cgroup's (zero) does when
/// the parent's cgroup was ever killed. The keeper asks once, at start, and else lets its
/// services move into their cgroups instead. Afterwards `dir` holds nothing.
pub fn born_in_cgroup_works(dir: BorrowedFd<'_>) -> bool {
    // SAFETY: the child makes one raw system call, _exit, which is async-signal-safe.
    match unsafe { clone_into_cgroup(dir) } {
        // SAFETY: _exit takes an integer and ends the process without running any user code.
        Ok(CloneResult::Child) => unsafe { libc::_exit(0) },
        Ok(CloneResult::Parent { child, pidfd: _ }) => {
            matches!(wait_blocking(child), Ok(WaitStatus::Exited(_, 0)))
        }
        Err(_) => false,
    }
}

/// The child side of [`spawn_service`]. Never returns: ends in `execve` or `_exit(127)`.
///
/// Only raw libc calls on pre-built data happen here, each of them async-signal-safe
/// (signal-safety(7)): rt_sigaction, pthread_sigmask, setsid, fcntl, dup2, setrlimit, setgroups,
/// setgid, setuid, chdir, syscall(close_range), execve, write, _exit.
fn run_child(plan: &ChildPlan<'_>, born_in_cgroup: bool) -> ! {
    // Signal dispositions first: SIG_IGN survives execve, so a service would otherwise inherit
    // whatever the coordinator ignores (SIGPIPE, at the least: Rust programs ignore it). The
    // raw system call, because glibc's sigaction refuses signals 32 and 33, which it reserves
    // for its threads, and a disposition of those left ignored survives exec too. (This child
    // has one thread and will exec, so glibc has no use for them here.) The call fails,
    // harmlessly, for SIGKILL and SIGSTOP.
    for signal in 1..=plan.max_signal {
        // SAFETY: rt_sigaction reads `sigset_size`-sized kernel sigaction from a live buffer
        // larger than that struct on every architecture; all-zero means SIG_DFL, no flags, no
        // restorer, empty mask. A null old-action pointer is allowed.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                plan.default_action.as_ptr(),
                ptr::null_mut::<libc::c_void>(),
                plan.sigset_size,
            )
        };
    }
    // Then the mask: the parent blocked everything across fork, and a blocked mask also
    // survives execve.
    // SAFETY: `empty_mask` is an initialised sigset_t; a null old-mask pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, plan.empty_mask.as_ref(), ptr::null_mut()) };

    // SAFETY: setsid takes no arguments; it fails only for a process-group leader, which a
    // fresh child is not.
    if unsafe { libc::setsid() } < 0 {
        fail(plan, ExecStage::Session);
    }

    // Into the service's cgroup before anything else (unless born there): nothing this
    // process or its descendants fork later can then be born outside it. "0" names the writer
    // itself.
    if let Some(procs) = plan.cgroup_procs.filter(|_| !born_in_cgroup) {
        // SAFETY: write() is async-signal-safe; `procs` is an fd the parent opened and keeps
        // open until the spawn returns (the plan borrows it), and the buffer is a 1-byte
        // static string. A short write of one byte cannot happen: it is 1 or -1.
        if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
            fail(plan, ExecStage::Cgroup);
        }
    }

    // Move the two sources above fd 2 first, so that installing one cannot overwrite the
    // other: the coordinator may run with fds 0-2 closed, and then a pipe can be fd 1.
    let stdin = lift_above_stdio(plan, plan.stdin.as_raw_fd());
    let output = lift_above_stdio(plan, plan.output.as_raw_fd());
    for (source, target) in [(stdin, 0), (output, 1), (output, 2)] {
        // SAFETY: both are fds of this process (source is open, lifted above 2, so it differs
        // from target); dup2 atomically replaces `target` and the copy is not close-on-exec.
        if unsafe { libc::dup2(source, target) } < 0 {
            fail(plan, ExecStage::Stdio);
        }
    }

    if let Some(limit) = &plan.nofile {
        // SAFETY: `limit` is an initialised rlimit owned by `plan`; setrlimit only reads it.
        // Lowering a soft limit cannot fail for lack of privilege; if it fails anyway the
        // service merely keeps the higher limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) };
    }

    // Groups, then gid, then uid: each step needs the privilege the next one gives up.
    if let Some((uid, gid, groups)) = &plan.credentials {
        // SAFETY: `groups` is a live slice of `groups.len()` gid_t values.
        if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } < 0 {
            fail(plan, ExecStage::Setgroups);
        }
        // SAFETY: plain integer argument.
        if unsafe { libc::setgid(*gid) } < 0 {
            fail(plan, ExecStage::Setgid);
        }
        // SAFETY: plain integer argument.
        if unsafe { libc::setuid(*uid) } < 0 {
            fail(plan, ExecStage::Setuid);
        }
    }

    // Only now, with the service's own identity: entering the directory is an access check
    // like any other, and root's rights must not let a `nobody` service start in /root (0700).
    // SAFETY: `working_dir` is a NUL-terminated string owned by `plan`.
    if unsafe { libc::chdir(plan.working_dir.as_ptr()) } < 0 {
        fail(plan, ExecStage::Chdir);
    }

    // Whatever fd the coordinator forgot to open close-on-exec, the service must not inherit
    // it (a leaked pipe end keeps another service's output open for ever). Kernels before 5.11
    // lack the flag; there the coordinator's own discipline (everything O_CLOEXEC) must do.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on fds; it takes integers.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };

    // SAFETY: `program` is NUL-terminated; `argv` and `envp` are arrays of pointers to
    // NUL-terminated strings owned by `plan`, each ending with a null pointer.
    unsafe {
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        )
    };
    fail(plan, ExecStage::Exec)
}

/// `fd` if it is above 2, else a close-on-exec duplicate of it that is.
fn lift_above_stdio(plan: &ChildPlan<'_>, fd: RawFd) -> RawFd {
    if fd > 2 {
        return fd;
    }
    // SAFETY: F_DUPFD_CLOEXEC with an integer argument on an fd of this process.
    let lifted = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if lifted < 0 {
        fail(plan, ExecStage::Stdio);
    }
    lifted
}

/// Reports `{stage, errno}` on the report pipe and exits with [`EXEC_FAILED_STATUS`].
fn fail(plan: &ChildPlan<'_>, stage: ExecStage) -> ! {
    let errno = Errno::last_raw().to_ne_bytes();
    let report = [stage as u8, errno[0], errno[1], errno[2], errno[3]];
    // Five bytes are below PIPE_BUF, so the write is atomic: the parent reads all or nothing.
    // SAFETY: `report` is a live 5-byte buffer and `plan.report` an open fd.
    unsafe {
        libc::write(
            plan.report.as_raw_fd(),
            report.as_ptr().cast(),
            report.len(),
        )
    };
    // `_exit`, not `exit`: atexit handlers and stdio buffers belong to the coordinator.
    // SAFETY: _exit takes an integer and ends the process without running any user code.
    unsafe { libc::_exit(EXEC_FAILED_STATUS) }
}

/// Opens a pidfd for `pid` (`pidfd_open`), which need not be our child. Whoever calls this
/// for a process it does not reap must check afterwards that the pid still names the process
/// it meant (its start time, see [`crate::process_identity`]): once the pidfd is open it can
/// only ever refer to the process it was opened on.
pub fn pidfd_open(pid: Pid) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and a flags word; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0 as libc::c_uint) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: on success the kernel returned a new fd that nothing else in this process knows
    // of, so the OwnedFd is its only owner. The syscall returns an int, so it fits in RawFd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Gives SIGPIPE back its default action, for a command whose output may go to a pipe that
/// closes early (`ccmgr status | head -1`): it then ends quietly as Unix tools do, instead of
/// panicking in `println!` (Rust starts every program with SIGPIPE ignored). Never for the
/// keeper or the coordinator: a closed stderr must not kill a supervisor.
pub fn default_sigpipe() {
    // SAFETY: setting SIG_DFL installs no handler, so no code of ours can run in signal
    // context; the call only changes this process's disposition of one signal.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Waits until the process behind `pidfd` has ended, or `timeout` passed; true if it ended.
pub fn wait_pidfd(pidfd: BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool, Errno> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends `signal` to the process `pidfd` refers to (`pidfd_send_signal`). If that process has
/// exited, this fails with ESRCH; it can never reach a process that reused the pid.
pub fn signal_pidfd(pidfd: BorrowedFd<'_>, signal: Signal) -> Result<(), Errno> {
    // SAFETY: the fd is borrowed, so open for the call; a null siginfo pointer asks the kernel
    // to fill in the usual kill() siginfo; the flags word is 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as c_int,
            ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Sends `signal` to every process in the process group `pgid` (`killpg`). A service is the
/// leader of its own group, so its pgid is its pid; the group also holds the children it did
/// not move elsewhere. Call this only while the leader is unreaped (or the group is known to
/// live on), since only that keeps the number from being reused.
pub fn signal_group(pgid: Pid, signal: Signal) -> Result<(), Errno> {
    killpg(pgid, signal)
}

/// Reaps `pid` if it has ended, without blocking: `Ok(None)` while it runs. For the
/// coordinator's loop, when the child's pidfd polls readable.
pub fn try_reap(pid: Pid) -> Result<Option<ProcessExit>, Errno> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno),
            Ok(status) => return Ok(ProcessExit::from_wait_status(status)),
        }
    }
}

/// Reaps `pid`, blocking until it ends.
pub fn reap(pid: Pid) -> Result<ProcessExit, Errno> {
    loop {
        if let Some(exit) = ProcessExit::from_wait_status(wait_blocking(pid)?) {
            return Ok(exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::SignalName;
    use crate::config::service::defaults as d;

    pub(crate) fn spec(id: &str, command: &[&str]) -> ServiceSpec {
        ServiceSpec {
            id: id.into(),
            description: None,
            source: PathBuf::from(format!("/etc/ccmgr/services.d/{id}.toml")),
            command: command.iter().map(|s| s.to_string()).collect(),
            program: PathBuf::from(command[0]),
            requires: vec![],
            after: vec![],
            wants: vec![],
            before: vec![],
            ready: Default::default(),
            cc_arg: false,
            startup_timeout: d::STARTUP_TIMEOUT,
            shutdown_timeout: d::SHUTDOWN_TIMEOUT,
            stop_signal: SignalName(Signal::SIGTERM),
            restart: Default::default(),
            restart_delay: d::RESTART_DELAY,
            restart_delay_max: d::RESTART_DELAY_MAX,
            min_uptime: Default::default(),
            user: None,
            group: None,
            working_dir: None,
            env: BTreeMap::new(),
            env_file: None,
            on_failure_command: None,
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn exit_display() {
        assert_eq!(ProcessExit::Exited(1).to_string(), "exited with status 1");
        let killed = ProcessExit::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false,
        };
        assert_eq!(killed.to_string(), "killed by SIGKILL");
        let dumped = ProcessExit::Signaled {
            signal: libc::SIGSEGV,
            core_dumped: true,
        };
        assert_eq!(dumped.to_string(), "killed by SIGSEGV (core dumped)");
        assert!(ProcessExit::Exited(0).success());
        assert!(!killed.success());
    }

    #[test]
    fn exit_from_wait_status() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            ProcessExit::from_wait_status(WaitStatus::Exited(pid, 3)),
            Some(ProcessExit::Exited(3))
        );
        assert_eq!(
            ProcessExit::from_wait_status(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(ProcessExit::Signaled {
                signal: libc::SIGTERM,
                core_dumped: false
            })
        );
        assert_eq!(ProcessExit::from_wait_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn stage_bytes_round_trip() {
        for byte in 0..=255u8 {
            if let Some(stage) = ExecStage::from_u8(byte) {
                assert_eq!(stage as u8, byte);
            }
        }
        assert_eq!(ExecStage::from_u8(3), Some(ExecStage::Chdir));
        assert_eq!(ExecStage::from_u8(0), None);
    }

    #[test]
    fn exec_error_reads_as_a_sentence() {
        let err = SpawnError::Exec {
            stage: ExecStage::Chdir,
            errno: Errno::ENOENT,
            action: "changing directory to /srv/x".into(),
            pid: Pid::from_raw(7),
        };
        assert_eq!(
            err.to_string(),
            "changing directory to /srv/x: No such file or directory"
        );
    }

    #[test]
    fn cc_arg_goes_after_argv0() {
        let mut s = spec("web", &["/usr/bin/web", "--port", "80"]);
        assert_eq!(service_argv(&s), ["/usr/bin/web", "--port", "80"]);
        s.cc_arg = true;
        assert_eq!(service_argv(&s), ["/usr/bin/web", "-cc", "--port", "80"]);
    }

    #[test]
    fn environment_layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let env_file = dir.path().join("web.env");
        std::fs::write(&env_file, "A=from-file\nB=from-file\nPATH=/file/bin\n").unwrap();
        let mut s = spec("web", &["/bin/true"]);
        s.env_file = Some(env_file);
        s.env = [("B", "from-table"), ("CCMGR_SERVICE", "spoofed")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let env = build_environment(
            &s,
            "main",
            Path::new("/run/ccmgr"),
            &pairs(&[("NOTIFY_SOCKET", "/run/n")]),
        )
        .unwrap();
        assert_eq!(
            env,
            pairs(&[
                ("PATH", "/file/bin"),
                ("A", "from-file"),
                ("B", "from-table"),
                ("CCMGR_SERVICE", "web"),
                ("CCMGR_INSTANCE", "main"),
                ("CCMGR_RUN_DIR", "/run/ccmgr"),
                ("NOTIFY_SOCKET", "/run/n"),
            ])
        );
    }

    #[test]
    fn environment_of_a_user() {
        let mut s = spec("web", &["/bin/true"]);
        s.user = Some(crate::config::Account {
            name: "root".into(),
            id: 0,
        });
        let env = build_environment(&s, "main", Path::new("/run/ccmgr"), &[]).unwrap();
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PATH"), Some(d::PATH));
        assert_eq!(get("USER"), Some("root"));
        assert_eq!(get("LOGNAME"), Some("root"));
        assert_eq!(get("HOME"), Some("/root"));
        assert!(get("SHELL").is_some());
    }

    #[test]
    fn bad_environment_is_refused() {
        let s = spec("web", &["/bin/true"]);
        let err = build_environment(&s, "main", Path::new("/run/ccmgr"), &pairs(&[("A=B", "x")]))
            .unwrap_err();
        assert!(matches!(err, SpawnError::InvalidEnvName { .. }), "{err}");
        let mut s = spec("web", &["/bin/true"]);
        s.env_file = Some(PathBuf::from("/nonexistent/web.env"));
        let err = build_environment(&s, "main", Path::new("/run/ccmgr"), &[]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/web.env"), "{err}");
    }
}

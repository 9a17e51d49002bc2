//! Robust mutexes of the segment, with real processes: a holder
//! killed with SIGKILL wakes a blocked waiter that learns of the death (for
//! every mutex), mutual exclusion under a storm of 8 processes, timeouts that
//! return on time, release on execve (and its exception) and on thread exit.

mod shm_support;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ccmgr::process_identity::ProcessIdentity;
use ccmgr::shm::{Acquired, MutexError, MutexId, Segment, ServiceState};
use shm_support::{
    Helper, PATIENCE, TestInstance, mutex_text, run_role_if_requested, wait_until_blocked_on,
    wait_until_comm,
};

/// Entry point of the helper processes (does nothing in a normal run).
#[test]
fn child_role_entry() {
    run_role_if_requested();
}

/// A helper locks `id` and is SIGKILLed while a thread of ours is blocked in
/// `lock()`; the waiter must wake, learn that the holder died, and the mutex
/// must work normally afterwards, in this process and in another.
fn holder_killed_wakes_blocked_waiter(id: MutexId) {
    let t = TestInstance::new(&format!("kill_{}", mutex_text(id)));
    let (seg, starting) = Segment::create(&t.spec(3)).unwrap();
    drop(starting);
    let mutex = seg.mutex(id).unwrap();

    let mut holder = t.spawn("hold", &[(shm_support::MUTEX_VAR, &mutex_text(id))]);
    holder.expect_line("locked Clean");
    assert!(mutex.try_lock().unwrap().is_none(), "the helper holds it");

    let (tid_tx, tid_rx) = mpsc::channel();
    let waiter_handle = mutex.clone();
    let waiter = std::thread::spawn(move || {
        tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
        let guard = waiter_handle.lock().unwrap();
        let first = guard.acquired();
        guard.unlock().unwrap();
        let again = waiter_handle.lock().unwrap().acquired();
        (first, again)
    });
    let tid = tid_rx.recv().unwrap();
    wait_until_blocked_on(tid, mutex.futex_address());
    holder.kill9();
    let (first, again) = waiter.join().unwrap();
    assert_eq!(first, Acquired::PreviousHolderDied, "{id}");
    assert_eq!(again, Acquired::Clean, "{id}: usable after recovery");

    // Another process can take it cleanly, and its death is seen again.
    let mut second = t.spawn("hold", &[(shm_support::MUTEX_VAR, &mutex_text(id))]);
    second.expect_line("locked Clean");
    assert!(mutex.try_lock().unwrap().is_none());
    second.kill9();
    let guard = mutex
        .lock_timeout(PATIENCE)
        .unwrap()
        .expect("released by death");
    assert!(guard.previous_holder_died());
    drop(guard);
    assert_eq!(
        mutex.try_lock().unwrap().unwrap().acquired(),
        Acquired::Clean
    );
}

#[test]
fn manager_mutex_survives_holder_death() {
    holder_killed_wakes_blocked_waiter(MutexId::Manager);
}

#[test]
fn daemon_mutex_survives_holder_death() {
    holder_killed_wakes_blocked_waiter(MutexId::Daemon);
}

#[test]
fn daemon_standby_mutex_survives_holder_death() {
    holder_killed_wakes_blocked_waiter(MutexId::DaemonStandby);
}

#[test]
fn shm_mutex_survives_holder_death() {
    holder_killed_wakes_blocked_waiter(MutexId::Shm);
}

#[test]
fn storm_of_8_processes_keeps_mutual_exclusion() {
    const PROCESSES: usize = 8;
    let t = TestInstance::new("storm");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    let generation_before = seg.generation();
    let mut helpers: Vec<_> = (0..PROCESSES).map(|_| t.spawn("storm", &[])).collect();
    for h in &mut helpers {
        h.expect_line("ready");
    }
    for h in &mut helpers {
        h.say("go");
    }
    for h in &mut helpers {
        h.expect_line("done");
        assert!(h.wait().success());
    }
    // Each increment read the counter and wrote it back in two separate calls;
    // any overlap of two writers would have lost an increment.
    assert_eq!(seg.service_status(0).unwrap().restart_count, 80_000);
    assert_eq!(seg.generation() - generation_before, 2 * 80_000);
}

#[test]
fn lock_timeout_returns_on_time_while_the_holder_lives() {
    let t = TestInstance::new("timeout");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    let mut holder = t.spawn("hold", &[(shm_support::MUTEX_VAR, "daemon")]);
    holder.expect_line("locked Clean");
    let mutex = seg.mutex(MutexId::Daemon).unwrap();

    let start = Instant::now();
    let got = mutex.lock_timeout(Duration::from_millis(100)).unwrap();
    let waited = start.elapsed();
    assert!(got.is_none(), "the live holder keeps it");
    assert!(
        waited >= Duration::from_millis(100),
        "returned early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "returned late: {waited:?}");

    assert!(mutex.try_lock().unwrap().is_none());
    let zero = mutex.lock_timeout(Duration::ZERO).unwrap();
    assert!(zero.is_none());

    assert!(ProcessIdentity::of(holder.pid()).unwrap().is_alive());
    holder.kill9();
}

#[test]
fn execve_releases_the_locks_of_the_main_thread() {
    let t = TestInstance::new("exec_main");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    let mutex = seg.mutex(MutexId::Manager).unwrap();
    let in_child = mutex.clone();
    let mut cmd = Command::new("cat");
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    // SAFETY: the closure runs in the forked child, whose only thread is its
    // main thread, before exec. It only locks a robust mutex in shared memory
    // that no one holds: an atomic increment of an Arc count, then glibc's
    // lock, which touches nothing but the mutex word and this thread's own
    // robust list (no allocation, no glibc-internal lock that another thread
    // of the parent could have held at fork time). The guard is forgotten.
    unsafe {
        cmd.pre_exec(move || match in_child.lock() {
            Ok(guard) => {
                guard.hold_until_exit();
                Ok(())
            }
            Err(_) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        });
    }
    // spawn returns once the exec has happened (or failed).
    let mut holder = Helper::adopt(cmd.spawn().unwrap());
    let identity = ProcessIdentity::of(holder.pid()).unwrap();
    let guard = mutex
        .try_lock()
        .unwrap()
        .expect("execve released the main thread's lock");
    assert!(guard.previous_holder_died());
    // The process lives on (as `cat`): a released lock is not a dead process.
    assert!(identity.is_alive());
    holder.kill9();
}

/// A kernel fact the coordinator must respect: when a thread other than the
/// main thread calls execve, it takes over the main thread's tid, and the
/// kernel, finding the lock owned by a tid that is no longer anyone's, leaves
/// it locked for ever. Never exec from a thread that holds a lock.
#[test]
fn execve_from_another_thread_leaves_its_locks_wedged() {
    let t = TestInstance::new("exec_thread");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    // The helper locks in the test harness's worker thread, not its main thread.
    let mut holder = t.spawn("hold-then-exec", &[(shm_support::MUTEX_VAR, "daemon")]);
    holder.expect_line("locked Clean");
    let mutex = seg.mutex(MutexId::Daemon).unwrap();
    holder.say("exec");
    // Once the process runs `cat`, the exec's release of robust locks is over.
    wait_until_comm(holder.pid(), "cat");
    assert!(mutex.try_lock().unwrap().is_none(), "still held after exec");
    holder.kill9();
    assert!(
        mutex.try_lock().unwrap().is_none(),
        "held even after the process died: the owner tid is gone"
    );
}

#[test]
fn thread_exit_releases_the_lock_and_relocking_is_an_error() {
    let t = TestInstance::new("thread_exit");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    let mutex = seg.mutex(MutexId::DaemonStandby).unwrap();
    let in_thread = mutex.clone();
    std::thread::spawn(move || {
        in_thread.lock().unwrap().hold_until_exit();
    })
    .join()
    .unwrap();
    let guard = mutex.lock().unwrap();
    assert!(
        guard.previous_holder_died(),
        "the thread's exit released it"
    );
    assert_eq!(mutex.lock().unwrap_err(), MutexError::AlreadyHeld);
    assert_eq!(mutex.try_lock().unwrap_err(), MutexError::AlreadyHeld);
    guard.unlock().unwrap();
    let guard = mutex.lock().unwrap();
    assert_eq!(guard.acquired(), Acquired::Clean);
}

#[test]
fn a_held_lock_can_be_released_and_taken_again_by_its_thread() {
    // A guard kept in a struct can be released and taken again by its thread.
    let t = TestInstance::new("held");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    struct Holder {
        held: Option<ccmgr::shm::MutexGuard>,
    }
    let mutex = seg.mutex(MutexId::DaemonStandby).unwrap();
    let mut c = Holder {
        held: Some(mutex.lock().unwrap()),
    };
    drop(seg); // the guard keeps the mapping, not the Segment
    let other = mutex.clone();
    let busy = std::thread::spawn(move || other.try_lock().unwrap().is_none());
    assert!(busy.join().unwrap());
    c.held.take().unwrap().unlock().unwrap();
    let other = mutex.clone();
    let free = std::thread::spawn(move || other.try_lock().unwrap().map(|g| g.acquired()));
    assert_eq!(free.join().unwrap(), Some(Acquired::Clean));
    c.held = Some(mutex.lock().unwrap());
    assert!(!c.held.as_ref().unwrap().previous_holder_died());
}

#[test]
fn a_writer_killed_mid_change_is_detected_and_repaired() {
    let t = TestInstance::new("dead_writer");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);

    // A reader copes: the generation stays odd, so it falls back to the lock,
    // which closes the dead writer's change.
    let mut writer = t.spawn("die-writing", &[]);
    writer.expect_line("writing");
    assert_eq!(seg.generation() % 2, 1, "a change is under way");
    writer.kill9();
    let status = seg.service_status(0).unwrap();
    assert_eq!(status.state, ServiceState::Starting);
    assert_eq!(
        seg.generation() % 2,
        0,
        "the reader repaired the generation"
    );

    // A writer is told.
    let mut writer = t.spawn("die-writing", &[]);
    writer.expect_line("writing");
    writer.kill9();
    let w = seg.write().unwrap();
    assert!(w.previous_holder_died());
    drop(w);
    assert_eq!(seg.generation() % 2, 0);
    assert!(!seg.write().unwrap().previous_holder_died());
}

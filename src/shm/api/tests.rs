//! Unit tests of the service API's files, through real shared memory and real futexes.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::mpsc;

use crate::config::Takeover;
use crate::shm::layout::MAX_SERVICES;
use crate::shm::robust::{Deadline, FUTEX_OWNER_DIED, FUTEX_WAITERS, FutexWait, futex_wait};

use super::control::check_spec;
use super::file::api_file_len;
use super::*;
use std::time::Duration;

fn spec(instance: &str, n: usize) -> ApiSpec {
    ApiSpec {
        instance: instance.to_owned(),
        run_dir: std::path::PathBuf::from("/nonexistent"),
        services: (0..n)
            .map(|i| ApiService {
                id: format!("svc{i}"),
                shutdown_timeout_ms: 1000,
            })
            .collect(),
        shutdown_sequence: (0..n as u32).rev().collect(),
        takeover: Takeover::Restart,
    }
}

/// A test's instance name and its own run directory (removed with everything in it).
struct Names(String, tempfile::TempDir);
impl Names {
    fn dir(&self) -> &std::path::Path {
        self.1.path()
    }

    fn spec(&self, n: usize) -> ApiSpec {
        ApiSpec {
            run_dir: self.dir().to_owned(),
            ..spec(&self.0, n)
        }
    }
}

fn instance(tag: &str) -> Names {
    Names(
        format!("u.{tag}.{}", std::process::id()),
        tempfile::tempdir().unwrap(),
    )
}

#[test]
fn layout_is_aligned_and_bounded() {
    let l = ControlLayout::compute(3).unwrap();
    assert_eq!(l.gate, 64);
    assert_eq!(l.sequence, 128);
    assert_eq!(l.records, 192);
    assert_eq!(l.total_size, 192 + 3 * 80);
    assert!(ControlLayout::compute(MAX_SERVICES as usize + 1).is_none());
    // 84 bytes a service: under 3 MiB at the bound, and only the pages a reader touches count.
    assert!(
        ControlLayout::compute(MAX_SERVICES as usize)
            .unwrap()
            .total_size
            < 3 << 20
    );
}

#[test]
fn spec_from_a_configuration() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/scenarios/valid-explicit-sequences"
    );
    let config = crate::config::Config::load(&crate::config::LoadOptions {
        config_path: Some(format!("{dir}/ccmgr.toml").into()),
        instance: None,
        services_dir: None,
    })
    .unwrap();
    let spec = ApiSpec::from_config(&config);
    assert_eq!(spec.instance, "explicit");
    let ids: Vec<&str> = spec.services.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["app", "db", "log"]);
    let order: Vec<&str> = spec
        .shutdown_sequence
        .iter()
        .map(|&i| ids[i as usize])
        .collect();
    assert_eq!(order, ["app", "db", "log"]);
    assert_eq!(spec.takeover, Takeover::Adopt);
    assert!(check_spec(&spec).is_ok());
}

#[test]
fn specs_must_name_each_service_once_in_the_sequence() {
    let mut s = spec("x", 3);
    assert!(check_spec(&s).is_ok());
    s.shutdown_sequence = vec![0, 1];
    assert!(check_spec(&s).unwrap_err().contains("each of the 3"));
    s.shutdown_sequence = vec![0, 1, 1];
    assert!(check_spec(&s).unwrap_err().contains("twice"));
    s.shutdown_sequence = vec![0, 1, 3];
    assert!(check_spec(&s).unwrap_err().contains("#3"));
    let mut s = spec("x", 2);
    s.services[1].id = "svc0".into();
    assert!(check_spec(&s).unwrap_err().contains("twice"));
}

#[test]
fn create_open_and_remove() {
    let names = instance("create");
    let ctl = ControlSegment::create(&names.spec(3)).unwrap();
    let meta = std::fs::metadata(ctl.path()).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o644);
    let api = std::fs::metadata(api_path(names.dir(), &names.0).unwrap()).unwrap();
    assert_eq!(api.mode() & 0o7777, 0o666);
    assert_eq!(api.len(), api_file_len(3));
    assert!(matches!(
        ControlSegment::create(&names.spec(3)),
        Err(ApiError::AlreadyExists { .. })
    ));
    let again = ControlSegment::open(names.dir(), &names.0).unwrap();
    assert_eq!(again.service_ids(), ["svc0", "svc1", "svc2"]);
    assert_eq!(again.shutdown_sequence(), [2, 1, 0]);
    assert_eq!(again.takeover(), Takeover::Restart);
    assert_eq!(ControlSegment::remove(names.dir(), &names.0).unwrap(), 2);
    assert_eq!(ControlSegment::remove(names.dir(), &names.0).unwrap(), 0);
}

/// The heart of the services' side: FUTEX_WAIT through a PROT_READ mapping sleeps, and a
/// FUTEX_WAKE through the coordinator's read-write mapping of the same file wakes it; a
/// wake through the read-only mapping works too.
#[test]
fn futex_wait_and_wake_work_through_a_read_only_mapping() {
    let names = instance("rofutex");
    let (_main, _starting) = crate::shm::Segment::create(&crate::shm::SegmentSpec {
        instance: names.0.clone(),
        run_dir: names.dir().to_owned(),
        group: None,
        services: vec![],
        startup_sequence: vec![],
        shutdown_sequence: vec![],
        config_blob: vec![],
    })
    .unwrap();
    let ctl = ControlSegment::create(&names.spec(1)).unwrap();
    let (view, _, owner) = ControlView::open(names.dir(), &names.0).unwrap();
    assert_eq!(owner, nix::unistd::geteuid().as_raw());
    let view = Arc::new(view);
    let before = view.gate();
    assert_eq!(before.daemon_component, 0);

    let (tx, rx) = mpsc::channel();
    let waiter_view = Arc::clone(&view);
    let waiter = std::thread::spawn(move || {
        tx.send(nix::unistd::gettid().as_raw()).unwrap();
        let r = waiter_view.wait_coordinator_epoch(before.coordinator_epoch);
        (r.unwrap(), waiter_view.gate().coordinator_epoch)
    });
    let tid = rx.recv().unwrap();
    wait_until_in_futex(tid);
    let holder = ctl.hold_daemon_component(Deadline::after(Duration::from_secs(5)));
    let holder = holder.unwrap();
    let (how, epoch) = waiter.join().unwrap();
    assert_ne!(how, FutexWait::TimedOut);
    assert_eq!(epoch, before.coordinator_epoch + 1);
    let word = view.gate().daemon_component;
    assert_eq!(word, holder.tid() | FUTEX_WAITERS);
    // A wake through the read-only mapping reaches a sleeper of the read-write one.
    let waiter = std::thread::spawn({
        let ctl = ctl.clone();
        move || futex_wait(&ctl.gate().daemon_component, word, None).unwrap()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if view.wake_daemon_component_sleepers().unwrap() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never woke the sleeper"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(waiter.join().unwrap(), FutexWait::Woken);
    drop(holder);
    let word = view.gate().daemon_component;
    assert_eq!(
        word,
        FUTEX_OWNER_DIED | FUTEX_WAITERS,
        "dropping gives it up"
    );
}

#[test]
fn release_asks_and_retake_bumps_the_coordinator_epoch() {
    let names = instance("release");
    let ctl = ControlSegment::create(&names.spec(3)).unwrap();
    let deadline = || Deadline::after(Duration::from_secs(5));
    let mut holder = ctl.hold_daemon_component(deadline()).unwrap();
    assert!(!holder.previous_holder_died());
    let ce = ctl.coordinator_epoch();
    assert!(holder.retake(deadline()).is_err(), "already held");
    let epoch = holder.release_for_shutdown(&[0, 2]).unwrap();
    assert_eq!(epoch, 1);
    assert_eq!(ctl.daemon_component_word(), 0);
    assert_eq!(ctl.shutdown_epoch(), 1);
    assert_eq!(
        (0..3)
            .map(|i| ctl.asked_epoch(i).unwrap())
            .collect::<Vec<_>>(),
        [1, 0, 1]
    );
    assert!(holder.release_for_shutdown(&[1]).is_err(), "not held");
    holder.retake(deadline()).unwrap();
    assert_eq!(ctl.coordinator_epoch(), ce + 1);
    assert_eq!(holder.release_for_shutdown(&[1]).unwrap(), 2);
    assert!(holder.release_for_shutdown(&[]).is_err());
    holder.retake(deadline()).unwrap();
    // A second holder cannot take it while the first lives.
    let second = ctl.hold_daemon_component(Deadline::after(Duration::from_millis(50)));
    assert!(matches!(second, Err(ApiError::DaemonComponentHeld { .. })));
    drop(holder);
    let second = ctl.hold_daemon_component(deadline()).unwrap();
    assert!(second.previous_holder_died());
}

fn wait_until_in_futex(tid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
        if text.split_whitespace().next() == Some(&libc::SYS_futex.to_string()) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never slept in futex");
        std::thread::sleep(Duration::from_micros(200));
    }
}

//! The segment as a whole, with real processes: creation and round trip of
//! the config image and state, refusal of segments that are not ours or not
//! sound (another uid, wrong magic, wrong version, truncated, corrupt, too
//! open), and stale-state detection and reclaim after kill -9.

mod shm_support;

use std::fs::{File, OpenOptions};
use std::mem::offset_of;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use ccmgr::process_identity::ProcessIdentity;
use ccmgr::shm::layout::{Header, LAYOUT_VERSION};
use ccmgr::shm::{
    Acquired, GaveUp, GiveUpReason, InstanceState, LastExit, MutexId, Probe, Reclaimed, Role,
    Segment, ServiceState, ShmError, Survivor,
};
use shm_support::{Helper, TestInstance, run_role_if_requested};

/// Entry point of the helper processes (does nothing in a normal run).
#[test]
fn child_role_entry() {
    run_role_if_requested();
}

fn segment_file(t: &TestInstance) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.segment_path())
        .unwrap()
}

#[test]
fn create_then_open_round_trips_image_and_state() {
    let t = TestInstance::new("round_trip");
    let spec = t.spec(3);
    let (created, starting) = Segment::create(&spec).unwrap();
    assert_eq!(starting.acquired(), Acquired::Clean);

    let meta = std::fs::metadata(created.path()).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    assert_eq!(meta.len() as usize, created.layout().total_size);

    let seg = Segment::open(t.dir(), &t.name).unwrap();
    let services = seg.services().unwrap();
    assert_eq!(services, spec.services);
    assert_eq!(seg.service_index("s2").unwrap(), Some(2));
    assert_eq!(seg.service_index("nope").unwrap(), None);
    assert_eq!(seg.startup_sequence().unwrap(), spec.startup_sequence);
    assert_eq!(seg.shutdown_sequence().unwrap(), spec.shutdown_sequence);
    assert_eq!(seg.config_blob().unwrap(), spec.config_blob);

    let me = ProcessIdentity::current().unwrap();
    let inst = seg.instance_status().unwrap();
    assert_eq!(inst.state, InstanceState::Initializing);
    assert_eq!(inst.manager, Some(me), "the creator is recorded as manager");
    assert_eq!(inst.coordinator, None);
    assert_eq!(inst.gave_up, None);
    let s0 = seg.service_status(0).unwrap();
    assert_eq!(s0.state, ServiceState::Stopped);
    assert_eq!(s0.process, None);
    assert_eq!(s0.last_exit, None);

    let g0 = seg.generation();
    {
        let w = seg.write().unwrap();
        assert!(!w.previous_holder_died());
        w.set_instance_state(InstanceState::Steady, 1234);
        w.set_coordinator(Some(me));
        w.set_restart_window(2, 777);
        w.set_gave_up(Some(GaveUp {
            reason: GiveUpReason::RestartLimit,
            service: Some(1),
        }))
        .unwrap();
        w.set_service_state(1, ServiceState::Up, 99).unwrap();
        w.set_service_process(1, Some(me)).unwrap();
        w.set_restart_count(1, 3).unwrap();
        w.set_last_exit(1, Some(LastExit::Signaled(9))).unwrap();
        assert!(w.set_service_state(3, ServiceState::Up, 0).is_err());
        assert_eq!(seg.generation() % 2, 1, "odd while the change is under way");
    }
    assert_eq!(created.generation(), g0 + 2, "both mappings see one change");
    let inst = created.instance_status().unwrap();
    assert_eq!(inst.state, InstanceState::Steady);
    assert_eq!(inst.last_transition_ms, 1234);
    assert_eq!(inst.coordinator, Some(me));
    assert_eq!((inst.restarts_in_window, inst.window_start_ms), (2, 777));
    assert_eq!(
        inst.gave_up,
        Some(GaveUp {
            reason: GiveUpReason::RestartLimit,
            service: Some(1)
        })
    );
    let s1 = created.service_status(1).unwrap();
    assert_eq!(s1.state, ServiceState::Up);
    assert_eq!(s1.last_transition_ms, 99);
    assert_eq!(s1.process, Some(me));
    assert_eq!(s1.restart_count, 3);
    assert_eq!(s1.last_exit, Some(LastExit::Signaled(9)));
    assert!(matches!(
        created.service_status(3),
        Err(ShmError::NoSuchService {
            index: 3,
            count: 3,
            ..
        })
    ));

    // Exclusive creation.
    let e = Segment::create(&spec).unwrap_err();
    assert!(matches!(e, ShmError::AlreadyExists { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "segment {} of instance {} already exists",
            t.segment_path().display(),
            t.name
        )
    );
    drop(starting);

    // Explicit removal; the mappings stay usable.
    assert!(created.unlink().unwrap());
    assert!(!created.unlink().unwrap());
    assert!(matches!(
        Segment::open(t.dir(), &t.name),
        Err(ShmError::NotFound { .. })
    ));
    assert_eq!(seg.service_status(1).unwrap().restart_count, 3);
}

/// 10,000 services, more than the 4,096 a segment once held: created, opened (live and as a
/// snapshot) and read back whole; the file is sized for its own counts, so ten services make a
/// file hundreds of times smaller. One more than `MAX_SERVICES` is refused by name.
#[test]
fn ten_thousand_services_fit_and_a_segment_is_sized_for_its_count() {
    let t = TestInstance::new("ten_thousand");
    let spec = t.spec(10_000);
    let (created, _starting) = Segment::create(&spec).unwrap();
    let big = std::fs::metadata(created.path()).unwrap().len();
    assert_eq!(big as usize, created.layout().total_size);
    let seg = Segment::open(t.dir(), &t.name).unwrap();
    assert_eq!(seg.services().unwrap(), spec.services);
    assert_eq!(seg.startup_sequence().unwrap(), spec.startup_sequence);
    assert_eq!(seg.shutdown_sequence().unwrap(), spec.shutdown_sequence);
    assert_eq!(seg.service_index("s9999").unwrap(), Some(9999));
    seg.write()
        .unwrap()
        .set_service_state(9999, ServiceState::Up, 5)
        .unwrap();
    let copy = Segment::open_snapshot(t.dir(), &t.name).unwrap();
    assert_eq!(copy.service_status(9999).unwrap().state, ServiceState::Up);

    let small = TestInstance::new("ten");
    let (ten, _starting) = Segment::create(&small.spec(10)).unwrap();
    let ten = std::fs::metadata(ten.path()).unwrap().len();
    assert!(ten * 500 < big, "10 services: {ten} bytes; 10,000: {big}");

    let over = TestInstance::new("over");
    let count = ccmgr::shm::layout::MAX_SERVICES as usize + 1;
    match Segment::create(&over.spec(count)) {
        Err(ShmError::InvalidSpec { reason, .. }) => assert!(
            reason.starts_with(&format!("{count} services, more than the")),
            "{reason}"
        ),
        other => panic!("{count} services: {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_group_segment_has_mode_0640_and_the_group() {
    let t = TestInstance::new("group");
    let mut spec = t.spec(1);
    spec.group = Some(65534);
    let (seg, _starting) = Segment::create(&spec).unwrap();
    let meta = std::fs::metadata(seg.path()).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o640,
        "the group reads, only the owner writes"
    );
    assert_eq!(meta.gid(), 65534);
    Segment::open(t.dir(), &t.name).unwrap();
    // A snapshot reads the same.
    let copy = Segment::open_snapshot(t.dir(), &t.name).unwrap();
    assert_eq!(copy.services().unwrap(), spec.services);
}

/// The read-only view is a private copy: what a reader does to it never reaches the segment,
/// and it does not follow later changes.
#[test]
fn a_snapshot_is_a_private_consistent_copy() {
    let t = TestInstance::new("snapshot");
    let (seg, starting) = Segment::create(&t.spec(2)).unwrap();
    drop(starting);
    seg.write()
        .unwrap()
        .set_service_state(1, ServiceState::Up, 5)
        .unwrap();
    let copy = Segment::open_snapshot(t.dir(), &t.name).unwrap();
    assert_eq!(copy.service_status(1).unwrap().state, ServiceState::Up);
    assert_ne!(copy.path(), Path::new(""), "it names the real file");
    // Writing through the copy changes the copy only.
    copy.write()
        .unwrap()
        .set_service_state(1, ServiceState::Failed, 6)
        .unwrap();
    assert_eq!(seg.service_status(1).unwrap().state, ServiceState::Up);
    // And a later change of the segment is not seen by the copy.
    seg.write()
        .unwrap()
        .set_service_state(0, ServiceState::Starting, 7)
        .unwrap();
    assert_eq!(copy.service_status(0).unwrap().state, ServiceState::Stopped);
    assert!(
        !copy.unlink().unwrap(),
        "a copy never removes the segment's name"
    );
    assert!(t.segment_path().exists());
}

#[test]
fn bad_names_and_specs_are_refused() {
    let t = TestInstance::new("bad_spec");
    for bad in ["", "a/b", "../x", &"y".repeat(65)] {
        let e = Segment::open(t.dir(), bad).unwrap_err();
        assert!(matches!(e, ShmError::InvalidInstanceName { .. }), "{e}");
    }
    let mut spec = t.spec(2);
    spec.startup_sequence = vec![0, 5];
    let e = Segment::create(&spec).unwrap_err();
    assert!(matches!(e, ShmError::InvalidSpec { .. }), "{e}");
    assert!(e.to_string().contains("names service #5"), "{e}");
    assert!(matches!(
        Segment::open(t.dir(), &t.name),
        Err(ShmError::NotFound { .. })
    ));
}

/// Another user cannot create the segment in the instance's run directory (it is not theirs:
/// the name cannot be squatted), and a segment file that belongs to another uid is refused.
/// The creator runs as `nobody`: it must be able to exec the test binary, and the target
/// directory may not be traversable by others, so the binary is copied to a fresh directory
/// with mode 0755 (tempfile makes directories 0700).
#[test]
fn another_uid_cannot_create_the_segment_and_its_file_is_refused() {
    let t = TestInstance::new("other_uid");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("shm_segment_helper");
    std::fs::copy(shm_support::current_exe(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();

    let euid = nix::unistd::geteuid().as_raw();
    let mut creator = Helper::spawn(&exe, "create", t.dir(), &t.name, &[], Some((65534, 65534)));
    let said = creator.expect_line("refused: ");
    assert!(creator.wait().success());
    assert!(
        said.contains("is owned by uid") && said.contains("(uid 65534)"),
        "{said}"
    );
    assert!(!t.segment_path().exists());

    // A segment file of another uid (made here, then given away) is never used.
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    nix::unistd::chown(seg.path(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let e = Segment::open(t.dir(), &t.name).unwrap_err();
    assert!(
        matches!(e, ShmError::WrongOwner { owner: 65534, .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "segment {} of instance {} was created by uid 65534, not by uid {euid}: refusing to use it",
            t.segment_path().display(),
            t.name
        )
    );
    assert!(matches!(
        Segment::open_snapshot(t.dir(), &t.name),
        Err(ShmError::WrongOwner { .. })
    ));
    assert!(matches!(
        Segment::probe(t.dir(), &t.name),
        Err(ShmError::WrongOwner { .. })
    ));
    assert!(matches!(
        Segment::reclaim_stale(t.dir(), &t.name),
        Err(ShmError::WrongOwner { .. })
    ));
}

#[test]
fn a_wrong_magic_is_refused() {
    let t = TestInstance::new("magic");
    let (_seg, _starting) = Segment::create(&t.spec(1)).unwrap();
    segment_file(&t).write_all_at(b"NOTCCMGR", 0).unwrap();
    let e = Segment::open(t.dir(), &t.name).unwrap_err();
    assert!(matches!(e, ShmError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("is not a ccmgr segment"), "{e}");
    assert!(e.to_string().contains(&t.name), "{e}");
    // A stale-state probe does not touch what it cannot read.
    assert!(matches!(
        Segment::reclaim_stale(t.dir(), &t.name),
        Err(ShmError::BadMagic { .. })
    ));
}

#[test]
fn a_wrong_version_is_refused() {
    let t = TestInstance::new("version");
    let (_seg, _starting) = Segment::create(&t.spec(1)).unwrap();
    let offset = offset_of!(Header, layout_version) as u64;
    segment_file(&t)
        .write_all_at(&(LAYOUT_VERSION + 1).to_le_bytes(), offset)
        .unwrap();
    let e = Segment::open(t.dir(), &t.name).unwrap_err();
    assert!(
        matches!(e, ShmError::WrongVersion { found, .. } if found == LAYOUT_VERSION + 1),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("has layout version {}", LAYOUT_VERSION + 1)),
        "{e}"
    );
}

#[test]
fn a_truncated_segment_is_refused() {
    let t = TestInstance::new("truncated");
    let (seg, starting) = Segment::create(&t.spec(2)).unwrap();
    let full = seg.layout().total_size as u64;
    // Unlock and unmap before shrinking the file: a process that keeps a mapping
    // of a truncated segment faults when it touches the lost pages.
    drop(starting);
    drop(seg);
    let file = segment_file(&t);
    file.set_len(full + 4096).unwrap();
    let e = Segment::open(t.dir(), &t.name).unwrap_err();
    assert!(matches!(e, ShmError::WrongSize { .. }), "{e}");
    for size in [full - 1, full / 2, 100, 0] {
        file.set_len(size).unwrap();
        let e = Segment::open(t.dir(), &t.name).unwrap_err();
        assert!(
            matches!(e, ShmError::Truncated { size: s, .. } if s == size),
            "{size}: {e}"
        );
        assert!(e.to_string().contains("is truncated"), "{e}");
    }
}

#[test]
fn corrupt_contents_are_refused() {
    let t = TestInstance::new("corrupt");
    let (seg, _starting) = Segment::create(&t.spec(2)).unwrap();
    let layout = *seg.layout();
    let file = segment_file(&t);
    let corrupt = |what: &str| {
        let e = Segment::open(t.dir(), &t.name).unwrap_err();
        assert!(matches!(e, ShmError::Corrupt { .. }), "{what}: {e}");
        assert!(e.to_string().contains("is corrupt"), "{e}");
        e
    };
    let restore = |offset: u64, bytes: &[u8]| file.write_all_at(bytes, offset).unwrap();
    let mut saved = [0u8; 8];

    // A flipped byte of the config blob fails its checksum.
    let blob = layout.config_blob as u64;
    file.read_exact_at(&mut saved[..1], blob).unwrap();
    restore(blob, &[saved[0] ^ 0xff]);
    assert!(corrupt("blob").to_string().contains("checksum"));
    restore(blob, &saved[..1]);
    Segment::open(t.dir(), &t.name).unwrap();

    // A sequence entry beyond the service count.
    let seq = layout.startup as u64;
    file.read_exact_at(&mut saved[..4], seq).unwrap();
    restore(seq, &7u32.to_le_bytes());
    corrupt("sequence");
    restore(seq, &saved[..4]);

    // A service id longer than the record.
    let id_len = layout.service_static as u64;
    file.read_exact_at(&mut saved[..4], id_len).unwrap();
    restore(id_len, &200u32.to_le_bytes());
    corrupt("id length");
    restore(id_len, &saved[..4]);

    // A region offset that does not match the counts.
    let off = offset_of!(Header, state_table_offset) as u64;
    file.read_exact_at(&mut saved, off).unwrap();
    restore(off, &8u64.to_le_bytes());
    corrupt("offset");
    restore(off, &saved);

    // A service count that does not match the size.
    let count = offset_of!(Header, service_count) as u64;
    file.read_exact_at(&mut saved[..4], count).unwrap();
    restore(count, &1_000_000u32.to_le_bytes());
    corrupt("count");
    restore(count, &saved[..4]);

    // An unknown state value is refused when read, not trusted.
    Segment::open(t.dir(), &t.name).unwrap();
    let state = (layout.state_table + offset_of!(ccmgr::shm::layout::ServiceRecord, state)) as u64;
    restore(state, &42u32.to_le_bytes());
    let e = seg.service_status(0).unwrap_err();
    assert!(
        e.to_string().contains("42 is not a valid service state"),
        "{e}"
    );
}

#[test]
fn a_segment_open_to_others_is_refused() {
    let t = TestInstance::new("too_open");
    let (seg, _starting) = Segment::create(&t.spec(1)).unwrap();
    std::fs::set_permissions(seg.path(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = Segment::open(t.dir(), &t.name).unwrap_err();
    assert!(matches!(e, ShmError::TooOpen { mode: 0o666, .. }), "{e}");
}

#[test]
fn a_live_coordinator_refuses_reclaim_and_kill9_makes_it_stale() {
    let t = TestInstance::new("reclaim");
    let mut coordinator = t.spawn("coordinator", &[]);
    coordinator.expect_line("ready");
    let identity = ProcessIdentity::of(coordinator.pid()).unwrap();

    assert_eq!(
        Segment::probe(t.dir(), &t.name).unwrap(),
        Probe::Live {
            coordinator: Some(identity)
        }
    );
    let e = Segment::reclaim_stale(t.dir(), &t.name).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "instance {} is already running (coordinator pid {})",
            t.name,
            coordinator.pid()
        )
    );
    let spec = t.spec(2);
    assert!(matches!(
        Segment::create(&spec),
        Err(ShmError::AlreadyExists { .. })
    ));
    assert!(matches!(
        Segment::create_reclaiming_stale(&spec),
        Err(ShmError::AlreadyRunning { coordinator_pid: Some(pid), .. }) if pid == coordinator.pid()
    ));
    // The probes left nothing locked: the coordinator still holds its mutexes
    // and the others are free.
    let seg = Segment::open(t.dir(), &t.name).unwrap();
    assert!(
        seg.mutex(MutexId::Daemon)
            .unwrap()
            .try_lock()
            .unwrap()
            .is_none()
    );
    assert!(
        seg.mutex(MutexId::Manager)
            .unwrap()
            .try_lock()
            .unwrap()
            .is_some()
    );

    coordinator.kill9();
    assert!(!identity.is_alive());
    assert_eq!(Segment::probe(t.dir(), &t.name).unwrap(), Probe::Stale);
    let released = std::thread::scope(|s| {
        s.spawn(|| {
            MutexId::NAMED
                .into_iter()
                .map(|id| {
                    seg.mutex(id)
                        .unwrap()
                        .try_lock()
                        .unwrap()
                        .map(|g| g.acquired())
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    });
    // Nothing is held. The probe made the manager and daemon mutexes consistent;
    // the daemon standby mutex, which it does not touch, still tells its next
    // locker that the coordinator died.
    let (clean, died) = (Some(Acquired::Clean), Some(Acquired::PreviousHolderDied));
    assert_eq!(released, [clean, clean, died, clean]);

    assert_eq!(
        Segment::reclaim_stale(t.dir(), &t.name).unwrap(),
        Reclaimed::Removed
    );
    assert_eq!(Segment::probe(t.dir(), &t.name).unwrap(), Probe::Absent);
    assert_eq!(
        Segment::reclaim_stale(t.dir(), &t.name).unwrap(),
        Reclaimed::Absent
    );
    let (fresh, _starting) = Segment::create_reclaiming_stale(&spec).unwrap();
    assert_eq!(fresh.instance_status().unwrap().coordinator, None);
}

#[test]
fn a_start_under_way_refuses_reclaim() {
    let t = TestInstance::new("starting");
    let (_seg, starting) = Segment::create(&t.spec(1)).unwrap();
    let me = ProcessIdentity::current().unwrap();
    // Another thread probes, as another `ccmgr start` would.
    let (name, dir) = (t.name.clone(), t.dir().to_owned());
    let probe = std::thread::spawn(move || Segment::probe(&dir, &name).unwrap())
        .join()
        .unwrap();
    assert_eq!(probe, Probe::Starting { manager: Some(me) });
    let (name, dir) = (t.name.clone(), t.dir().to_owned());
    let e = std::thread::spawn(move || Segment::reclaim_stale(&dir, &name).unwrap_err())
        .join()
        .unwrap();
    assert!(matches!(e, ShmError::BeingStarted { .. }), "{e}");
    assert!(e.to_string().contains("is being started"), "{e}");
    drop(starting);
}

#[test]
fn live_services_without_a_coordinator_refuse_reclaim() {
    let t = TestInstance::new("abandoned");
    let (seg, starting) = Segment::create(&t.spec(3)).unwrap();
    let me = ProcessIdentity::current().unwrap();
    let recycled = ProcessIdentity {
        start_time: me.start_time + 1,
        ..me
    };
    {
        let w = seg.write().unwrap();
        w.set_manager(None);
        w.set_standby(Some(recycled)); // a pid since reused: dead
        w.set_service_process(0, Some(me)).unwrap(); // alive
    }
    drop(starting);

    let probe = Segment::probe(t.dir(), &t.name).unwrap();
    assert_eq!(
        probe,
        Probe::Abandoned {
            survivors: vec![Survivor {
                role: Role::Service(0),
                process: Some(me)
            }]
        }
    );
    let e = Segment::reclaim_stale(t.dir(), &t.name).unwrap_err();
    assert!(matches!(e, ShmError::StillInUse { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("service #0 (pid {})", me.pid)),
        "{e}"
    );

    seg.write().unwrap().set_service_process(0, None).unwrap();
    assert_eq!(Segment::probe(t.dir(), &t.name).unwrap(), Probe::Stale);
    assert_eq!(
        Segment::reclaim_stale(t.dir(), &t.name).unwrap(),
        Reclaimed::Removed
    );
}

#[test]
fn snapshots_are_never_torn() {
    let t = TestInstance::new("torn");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    let writes = 20_000;
    let writer_seg = seg.clone();
    let writer = std::thread::spawn(move || {
        for k in 1..=writes {
            let w = writer_seg.write().unwrap();
            let p = ProcessIdentity {
                pid: k,
                start_time: k as u64 * 1000,
            };
            w.set_service_process(0, Some(p)).unwrap();
            w.set_restart_count(0, k as u32).unwrap();
        }
    });
    let mut reads = 0u64;
    loop {
        let status = seg.service_status(0).unwrap();
        if let Some(p) = status.process {
            assert_eq!(p.start_time, p.pid as u64 * 1000, "torn identity");
            assert_eq!(status.restart_count, p.pid as u32, "torn record");
        }
        reads += 1;
        if status.restart_count == writes as u32 {
            break;
        }
    }
    writer.join().unwrap();
    assert!(reads > 0);
    assert_eq!(seg.generation(), 2 * writes as u64);
}

/// The group's read-only view copies the file while a writer is busy: every copy is whole
/// (taken between two changes, by the generation counter), never half of one change.
#[test]
fn private_copies_are_never_torn() {
    let t = TestInstance::new("torn_copy");
    let (seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    let writes = 5_000;
    let writer_seg = seg.clone();
    let writer = std::thread::spawn(move || {
        for k in 1..=writes {
            let w = writer_seg.write().unwrap();
            let p = ProcessIdentity {
                pid: k,
                start_time: k as u64 * 1000,
            };
            w.set_service_process(0, Some(p)).unwrap();
            w.set_restart_count(0, k as u32).unwrap();
        }
    });
    let mut copies = 0u64;
    loop {
        let copy = match Segment::open_snapshot(t.dir(), &t.name) {
            Ok(copy) => copy,
            // A writer that never let go for the bounded attempts: said so, never torn.
            Err(ShmError::NoConsistentCopy { .. }) => continue,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(copy.generation() % 2, 0);
        let status = copy.service_status(0).unwrap();
        if let Some(p) = status.process {
            assert_eq!(p.start_time, p.pid as u64 * 1000, "torn identity");
            assert_eq!(status.restart_count, p.pid as u32, "torn record");
        }
        copies += 1;
        if status.restart_count == writes as u32 {
            break;
        }
    }
    writer.join().unwrap();
    assert!(copies > 0);
}

/// A change that never ends (a writer stopped mid-change: the generation counter stays odd)
/// gives a reader's copy up after its bounded attempts, with a sentence; it never waits for
/// ever, nor reads half a change.
#[test]
fn a_change_that_never_ends_is_said_not_waited_for() {
    let t = TestInstance::new("odd_generation");
    let (_seg, starting) = Segment::create(&t.spec(1)).unwrap();
    drop(starting);
    segment_file(&t)
        .write_all_at(&7u64.to_ne_bytes(), offset_of!(Header, generation) as u64)
        .unwrap();
    let e = Segment::open_snapshot(t.dir(), &t.name).unwrap_err();
    assert!(matches!(e, ShmError::NoConsistentCopy { .. }), "{e}");
    assert!(
        e.to_string().contains("was being changed at each of"),
        "{e}"
    );
}

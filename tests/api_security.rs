//! The service API's security model, enforced by the kernel: services running as `nobody`
//! use the API (read-only control segment, 0666 API file) but cannot write the control
//! segment, open the main segment, or remove either file; garbage (and truncation) in the API
//! file changes nothing in the control segment and does not stop the protocol. And why the
//! API file has no pthread robust mutex: glibc follows pointers stored in the mutex.

mod api_support;

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use api_support::{
    Helper, NOBODY, TestInstance, artifacts, assert_shut_down_in_order, run_role_if_requested,
    wait_until_api_threads_sleep_in_futex,
};
use ccmgr::config::Takeover;
use ccmgr::shm::api::{api_path, control_path};
use ccmgr::shm::{MutexId, Segment, segment_path};

/// Entry point of the helper processes (does nothing in a normal run).
#[test]
fn child_role_entry() {
    run_role_if_requested(|role, run_dir, instance| match role {
        "nobody-probe" => nobody_probe(run_dir, instance),
        "glibc-holder" => glibc_holder(run_dir, instance),
        _ => {}
    });
}

fn say(line: &str) {
    println!("\napi-helper: {line}");
}

fn expect_denied(what: &str, result: io::Result<impl Sized>) {
    match result {
        Ok(_) => panic!("nobody could {what}"),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
            "{what}: {e}"
        ),
    }
}

/// Runs as nobody: everything a hostile service could try with the files.
fn nobody_probe(run_dir: &Path, instance: &str) -> ! {
    assert_eq!(nix::unistd::geteuid().as_raw(), NOBODY.0);
    let ctl = control_path(run_dir, instance).unwrap();
    let api = api_path(run_dir, instance).unwrap();
    let main = segment_path(run_dir, instance).unwrap();

    // The control segment: readable, never writable.
    let bytes = fs::read(&ctl).expect("nobody reads the control segment");
    assert!(bytes.starts_with(b"ccmgrCTL"));
    expect_denied(
        "open the control segment read-write",
        OpenOptions::new().read(true).write(true).open(&ctl),
    );
    expect_denied(
        "open the control segment to truncate it",
        OpenOptions::new().write(true).truncate(true).open(&ctl),
    );
    expect_denied(
        "chmod the control segment",
        fs::set_permissions(&ctl, std::os::unix::fs::PermissionsExt::from_mode(0o666)),
    );
    expect_denied("remove the control segment", fs::remove_file(&ctl));

    // The main segment: not even readable.
    expect_denied(
        "open the main segment",
        OpenOptions::new().read(true).open(&main),
    );
    assert!(Segment::open(run_dir, instance).is_err());
    assert!(Segment::open_snapshot(run_dir, instance).is_err());

    // The API file: writable, by design. Scribble over it, truncate it, extend it.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&api)
        .expect("nobody opens the API file read-write");
    let len = f.metadata().unwrap().len();
    f.write_all_at(&vec![0xa5; len as usize + 100], 0).unwrap();
    f.set_len(10).unwrap();
    f.write_all_at(&[0xff; 64], 4096).unwrap();
    expect_denied("remove the API file", fs::remove_file(&api));
    say("probed");
    std::process::exit(0);
}

#[test]
fn services_running_as_nobody_use_the_api_but_cannot_touch_the_coordinators_files() {
    let a = artifacts();
    let t = TestInstance::new("nobody", &["web", "db"], Takeover::Restart);
    let (mut coordinator, _) = t.coordinator();
    let mut web = t.service(&a.rust_service, "web", 50, Some(NOBODY));
    let mut db = t.service(&a.c_service, "db", 50, Some(NOBODY));
    t.wait_ready(&[&web, &db]);
    wait_until_api_threads_sleep_in_futex(&[web.pid(), db.pid()]);
    for p in [&web, &db] {
        let status = fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid_line.split_whitespace().skip(1).all(|u| u == "65534"));
    }
    let ctl_before = fs::read(t.ctl.path()).unwrap();

    let mut probe = Helper::spawn("nobody-probe", t.dir(), &t.name, Some(NOBODY));
    probe.expect_line("probed");
    assert!(probe.wait_exit().success());

    // Nothing nobody did changed a byte of the control segment, or the services' state.
    assert_eq!(fs::read(t.ctl.path()).unwrap(), ctl_before);
    assert!(web.is_running() && db.is_running());
    assert!(t.log_lines().is_empty());
    // The kernel still knows who is registered: the locks are not in the file's bytes.
    assert_eq!(t.ctl.component_registered(0).unwrap(), Some(true));
    assert_eq!(t.ctl.component_registered(1).unwrap(), Some(true));

    // And the protocol still works over the scribbled, truncated file.
    coordinator.say("release 0,1");
    coordinator.expect_line("released 1");
    assert!(web.wait_exit().success());
    assert!(db.wait_exit().success());
    assert_shut_down_in_order(&t.log_lines(), &["web", "db"]);
}

/// Holds the main segment's shm mutex (a glibc robust mutex) until told to unlock it.
fn glibc_holder(run_dir: &Path, instance: &str) -> ! {
    // It is expected to die of SIGSEGV: leave no core file behind.
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0).unwrap();
    let seg = Segment::open(run_dir, instance).unwrap();
    let guard = seg.mutex(MutexId::Shm).unwrap().lock().unwrap();
    say("locked");
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).unwrap();
    guard.unlock().unwrap();
    say("unlocked");
    std::process::exit(0);
}

/// Why the API file holds no pthread robust mutex: glibc keeps the robust mutexes a thread
/// holds on a list linked through pointers *inside each mutex*, and unlinks the mutex with
/// them on unlock. Whoever can write the mutex can so make its holder write where they choose.
/// Here a writer points the list at an unmapped address and the holder dies of SIGSEGV on
/// unlock (with a mapped address and value it would silently write there instead).
#[cfg(all(
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[test]
fn glibc_robust_mutex_trusts_pointers_in_shared_memory() {
    let t = TestInstance::new("glibc", &["web"], Takeover::Adopt);
    let mut holder = Helper::spawn("glibc-holder", t.dir(), &t.name, None);
    holder.expect_line("locked");
    let offset = t.main.layout().sync + std::mem::offset_of!(ccmgr::shm::layout::SyncBlock, shm);
    // glibc 64-bit: struct __pthread_mutex_s { int __lock, __count, __owner; unsigned
    // __nusers; int __kind, __spins; __pthread_list_t __list { prev, next }; }.
    const LIST: usize = 24;
    let main = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(t.dir(), &t.name).unwrap())
        .unwrap();
    let mut list = [0u8; 16];
    main.read_exact_at(&mut list, (offset + LIST) as u64)
        .unwrap();
    let prev = u64::from_le_bytes(list[..8].try_into().unwrap());
    assert_ne!(
        prev, 0,
        "the held mutex's list pointer (the holder's TLS) is visible"
    );
    // next = 0x18: glibc writes `prev` at next - 8 = 0x10.
    let mut forged = [0u8; 16];
    forged[..8].copy_from_slice(&0x10u64.to_le_bytes());
    forged[8..].copy_from_slice(&0x18u64.to_le_bytes());
    main.write_all_at(&forged, (offset + LIST) as u64).unwrap();
    holder.say("unlock");
    let status = holder.wait_exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "the holder followed the forged pointers ({status:?})"
    );
}

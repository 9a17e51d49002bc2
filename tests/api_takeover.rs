//! The coordinator's death (SIGKILL of the helper holding the daemon component) under both
//! takeover modes. Under `restart` the services shut down by themselves, in order. Under
//! `adopt` nothing shuts down and no thread spins; a new coordinator takes the daemon
//! component over, and its later deliberate release stops them in order.

mod api_support;

use std::time::Duration;

use api_support::{
    TestInstance, artifacts, assert_no_cpu_used, assert_shut_down_in_order, run_role_if_requested,
    wait_until, wait_until_api_threads_sleep_in_futex,
};
use ccmgr::config::Takeover;
use ccmgr::shm::api::ApiState;

/// Entry point of the helper processes (does nothing in a normal run).
#[test]
fn child_role_entry() {
    run_role_if_requested(|_, _, _| {});
}

const OWNER_DIED_WITH_WAITERS: u32 = 0x4000_0000 | 0x8000_0000;

#[test]
fn coordinator_death_under_restart_shuts_the_services_down_in_order() {
    let a = artifacts();
    let t = TestInstance::new("restart", &["alpha", "bravo", "charlie"], Takeover::Restart);
    let (mut coordinator, _) = t.coordinator();
    let mut alpha = t.service(&a.rust_service, "alpha", 100, None);
    let mut bravo = t.service(&a.c_service, "bravo", 100, None);
    let mut charlie = t.service(&a.rust_service, "charlie", 100, None);
    t.wait_ready(&[&alpha, &bravo, &charlie]);
    wait_until_api_threads_sleep_in_futex(&[alpha.pid(), bravo.pid(), charlie.pid()]);

    coordinator.kill9();
    for p in [&mut alpha, &mut bravo, &mut charlie] {
        assert!(p.wait_exit().success(), "{} failed", p.name);
    }
    let lines = t.log_lines();
    assert_shut_down_in_order(&lines, &["alpha", "bravo", "charlie"]);
    // Every service says why, the C one through ccmgr_shutdown_reason.
    for l in lines.iter().filter(|l| l.what == "shutdown") {
        assert_eq!(l.reason.as_deref(), Some("coordinator-died"), "{l:?}");
    }
    assert_eq!(t.ctl.daemon_component_word(), OWNER_DIED_WITH_WAITERS);
}

#[test]
fn coordinator_death_under_adopt_keeps_services_until_a_new_coordinator_stops_them() {
    let a = artifacts();
    let t = TestInstance::new("adopt", &["alpha", "bravo", "charlie"], Takeover::Adopt);
    let (mut first, _) = t.coordinator();
    let mut alpha = t.service(&a.rust_service, "alpha", 100, None);
    let mut bravo = t.service(&a.c_service, "bravo", 100, None);
    let mut charlie = t.service(&a.rust_service, "charlie", 100, None);
    t.wait_ready(&[&alpha, &bravo, &charlie]);
    let pids = [alpha.pid(), bravo.pid(), charlie.pid()];
    wait_until_api_threads_sleep_in_futex(&pids);
    let epoch = t.ctl.coordinator_epoch();

    first.kill9();
    // The kernel marked the word; every API thread has woken, seen the death, and gone back
    // to sleep (now on the coordinator epoch), without spinning and without shutting down.
    wait_until("the kernel marks the dead coordinator's word", || {
        t.ctl.daemon_component_word() == OWNER_DIED_WITH_WAITERS
    });
    wait_until_api_threads_sleep_in_futex(&pids);
    assert_no_cpu_used(&pids, Duration::from_millis(500));
    for p in [&alpha, &bravo, &charlie] {
        assert!(p.is_running(), "{} stopped", p.name);
    }
    assert!(t.log_lines().is_empty(), "{:?}", t.log_lines());
    let records = t.ctl.read_api_records().unwrap();
    assert!(
        records.iter().all(|r| r.state == ApiState::Ready),
        "{records:?}"
    );

    // The standby becomes the coordinator: it takes the daemon component over.
    let (mut second, died) = t.coordinator();
    assert!(
        died,
        "the new coordinator sees that the old one died holding it"
    );
    assert_eq!(t.ctl.coordinator_epoch(), epoch + 1);
    wait_until_api_threads_sleep_in_futex(&pids);
    assert_no_cpu_used(&pids, Duration::from_millis(200));
    assert!(t.log_lines().is_empty());

    // Later it stops the stack: they shut down in order.
    second.say("release 0,1,2");
    second.expect_line("released 1");
    for p in [&mut alpha, &mut bravo, &mut charlie] {
        assert!(p.wait_exit().success(), "{} failed", p.name);
    }
    assert_shut_down_in_order(&t.log_lines(), &["alpha", "bravo", "charlie"]);
}

/// A service that registers after the coordinator died (under adopt) waits for the next
/// coordinator like the others; one that registers while a stop is under way and was asked
/// shuts down at once.
#[test]
fn late_registrations_follow_the_current_state() {
    let a = artifacts();
    let t = TestInstance::new("late", &["alpha", "bravo"], Takeover::Adopt);
    let (mut first, _) = t.coordinator();
    first.kill9();
    let mut alpha = t.service(&a.rust_service, "alpha", 10, None);
    t.wait_ready(&[&alpha]);
    wait_until_api_threads_sleep_in_futex(&[alpha.pid()]);
    assert!(t.log_lines().is_empty());

    let (mut second, died) = t.coordinator();
    assert!(died);
    second.say("release 0,1");
    second.expect_line("released 1");
    assert!(alpha.wait_exit().success());
    // bravo starts during the stop (after the release): it was asked, so it shuts down as
    // soon as it has registered, after alpha.
    let mut bravo = t.service(&a.c_service, "bravo", 10, None);
    assert!(bravo.wait_exit().success());
    assert_shut_down_in_order(&t.log_lines(), &["alpha", "bravo"]);
}

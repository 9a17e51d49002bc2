//! The service API's orderly shutdown with real processes: two Rust example services and the
//! C example, a helper process holding the daemon component as the coordinator would, and a
//! deliberate release. The callbacks run strictly in shutdown order, each after the one before
//! it finished or died; a failure sequence stops only the services it asks.

mod api_support;

use api_support::{
    TestInstance, artifacts, assert_no_cpu_used, assert_shut_down_in_order, run_role_if_requested,
    wait_until_api_threads_sleep_in_futex,
};
use ccmgr::config::Takeover;
use ccmgr::shm::api::ApiState;

/// Entry point of the helper processes (does nothing in a normal run).
#[test]
fn child_role_entry() {
    run_role_if_requested(|_, _, _| {});
}

#[test]
fn stop_runs_the_callbacks_in_shutdown_order_across_rust_and_c() {
    let a = artifacts();
    let t = TestInstance::new("order", &["alpha", "bravo", "charlie"], Takeover::Adopt);
    let (mut coordinator, died) = t.coordinator();
    assert!(!died);
    // Start them in the reverse of their shutdown order: the order is the control segment's,
    // not the order of registration.
    let mut charlie = t.service(&a.rust_service, "charlie", 100, None);
    let mut bravo = t.service(&a.c_service, "bravo", 100, None);
    let mut alpha = t.service(&a.rust_service, "alpha", 100, None);
    t.wait_ready(&[&alpha, &bravo, &charlie]);
    for i in 0..3 {
        assert_eq!(t.ctl.component_registered(i).unwrap(), Some(true));
    }
    let records = t.ctl.read_api_records().unwrap();
    assert!(
        records.iter().all(|r| r.state == ApiState::Ready),
        "{records:?}"
    );

    // Registered and ready, nobody spins while the coordinator holds the daemon component.
    let pids = [alpha.pid(), bravo.pid(), charlie.pid()];
    wait_until_api_threads_sleep_in_futex(&pids);
    assert!(t.log_lines().is_empty());

    coordinator.say("release 0,1,2");
    coordinator.expect_line("released 1");
    for p in [&mut alpha, &mut bravo, &mut charlie] {
        assert!(p.wait_exit().success(), "{} failed", p.name);
    }
    assert_shut_down_in_order(&t.log_lines(), &["alpha", "bravo", "charlie"]);
    // Best-effort words: a service may exit between its callback and writing "done".
    let records = t.ctl.read_api_records().unwrap();
    assert!(
        records
            .iter()
            .all(|r| r.epoch == 1 && matches!(r.state, ApiState::Done | ApiState::ShuttingDown)),
        "{records:?}"
    );
    for i in 0..3 {
        assert_eq!(t.ctl.component_registered(i).unwrap(), Some(false));
    }
}

#[test]
fn a_service_killed_before_its_turn_does_not_hold_up_the_next() {
    let a = artifacts();
    let t = TestInstance::new("kill9", &["alpha", "bravo", "charlie"], Takeover::Adopt);
    let (mut coordinator, _) = t.coordinator();
    // alpha's clean-up is long enough for bravo to be killed while it waits for its turn.
    let mut alpha = t.service(&a.rust_service, "alpha", 600, None);
    let mut bravo = t.service(&a.c_service, "bravo", 100, None);
    let mut charlie = t.service(&a.rust_service, "charlie", 100, None);
    t.wait_ready(&[&alpha, &bravo, &charlie]);

    coordinator.say("release 0,1,2");
    coordinator.expect_line("released");
    t.wait_for_log("alpha began", |l| l.what == "begin" && l.id == "alpha");
    // bravo now waits on alpha's component lock: kill it before its turn.
    bravo.kill9();
    assert!(alpha.wait_exit().success());
    assert!(charlie.wait_exit().success());
    // charlie went after alpha had finished, and did not wait for the dead bravo.
    assert_shut_down_in_order(&t.log_lines(), &["alpha", "charlie"]);
}

#[test]
fn a_failure_sequence_stops_only_the_services_it_asks() {
    let a = artifacts();
    let t = TestInstance::new("partial", &["alpha", "bravo", "charlie"], Takeover::Adopt);
    let (mut coordinator, _) = t.coordinator();
    let mut alpha = t.service(&a.c_service, "alpha", 50, None);
    let mut bravo = t.service(&a.rust_service, "bravo", 50, None);
    let mut charlie = t.service(&a.rust_service, "charlie", 50, None);
    t.wait_ready(&[&alpha, &bravo, &charlie]);

    // A failure of charlie's dependency, say: stop bravo and charlie only.
    coordinator.say("release 1,2");
    coordinator.expect_line("released 1");
    assert!(bravo.wait_exit().success());
    assert!(charlie.wait_exit().success());
    assert_shut_down_in_order(&t.log_lines(), &["bravo", "charlie"]);
    // alpha was not asked: it keeps running, its API thread asleep, using no CPU, while the
    // daemon component is released.
    assert!(alpha.is_running());
    wait_until_api_threads_sleep_in_futex(&[alpha.pid()]);
    assert_no_cpu_used(&[alpha.pid()], std::time::Duration::from_millis(300));
    assert!(alpha.is_running());

    // The coordinator takes the daemon component back (FIG. 8, step 812), then stops alpha.
    coordinator.say("retake");
    coordinator.expect_line("retaken");
    wait_until_api_threads_sleep_in_futex(&[alpha.pid()]);
    coordinator.say("release 0");
    coordinator.expect_line("released 2");
    assert!(alpha.wait_exit().success());
    assert_shut_down_in_order(&t.log_lines(), &["bravo", "charlie", "alpha"]);
}

/// A hundred services (the Rust example, with no clean-up time) shut down strictly in order:
/// each waits on its nearest predecessor only, and each release wakes one service. (With
/// 1000 the same takes about 0.3 s on two cores; `CCMGR_API_TEST_SERVICES` sets the count.)
#[test]
fn a_hundred_services_shut_down_in_order() {
    let n: usize = std::env::var("CCMGR_API_TEST_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let a = artifacts();
    let ids: Vec<String> = (0..n).map(|i| format!("s{i:04}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let t = TestInstance::new("hundred", &ids, Takeover::Adopt);
    let (mut coordinator, _) = t.coordinator();
    let mut services: Vec<_> = ids
        .iter()
        .rev()
        .map(|id| t.service(&a.rust_service, id, 0, None))
        .collect();
    t.wait_ready(&services.iter().collect::<Vec<_>>());
    let all: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    coordinator.say(&format!("release {}", all.join(",")));
    coordinator.expect_line("released 1");
    for p in &mut services {
        assert!(p.wait_exit().success(), "{} failed", p.name);
    }
    assert_shut_down_in_order(&t.log_lines(), &ids);
}

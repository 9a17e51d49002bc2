//! LocalCcmgr against a real ccmgr instance in a temporary directory, and run_command with
//! real process groups. Each test has its own directory and instance name; the guard stops
//! the instance even when the test fails.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ccmgr_cluster::local::{CommandError, LocalCcmgr, LocalError, LocalEvent, run_command};
use ccmgr_cluster::spec::{ClusterServiceSpec, load_cluster_dir};
use tokio::sync::mpsc::Receiver;

/// How long any awaited event may take before the test gives up (a bound, not a measurement).
const DEADLINE: Duration = Duration::from_secs(30);

/// A ccmgr instance with an empty services.d; stopped on drop.
struct Instance {
    dir: tempfile::TempDir,
    config: PathBuf,
    running: bool,
}

impl Instance {
    /// The files, not started.
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::tempdir().unwrap();
        let name = format!(
            "cl-local-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        fs::create_dir(dir.path().join("services.d")).unwrap();
        fs::create_dir(dir.path().join("cluster.d")).unwrap();
        let config = dir.path().join("ccmgr.toml");
        fs::write(
            &config,
            format!(
                "instance = \"{name}\"\nservices_dir = \"services.d\"\nlog_dir = \"log\"\nrun_dir = \"run\"\n"
            ),
        )
        .unwrap();
        Self {
            dir,
            config,
            running: false,
        }
    }

    fn started() -> Self {
        let mut instance = Self::new();
        instance.start();
        instance
    }

    fn start(&mut self) {
        let out = std::process::Command::new(common::ccmgr())
            .arg("--config")
            .arg(&self.config)
            .arg("start")
            .output()
            .unwrap();
        self.running = true;
        assert!(
            out.status.success(),
            "ccmgr start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn services(&self) -> PathBuf {
        self.dir.path().join("services.d")
    }

    fn local(&self) -> LocalCcmgr {
        LocalCcmgr::new(
            common::ccmgr(),
            self.config.clone(),
            self.services(),
            "n0".to_owned(),
        )
    }

    /// A cluster service of `text`, loaded as the agent loads it.
    fn spec(&self, name: &str, text: &str) -> ClusterServiceSpec {
        let cluster = self.dir.path().join("cluster.d");
        fs::write(cluster.join(format!("{name}.toml")), text).unwrap();
        load_cluster_dir(&cluster, "n0")
            .unwrap()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.running {
            let _ = std::process::Command::new(common::ccmgr())
                .arg("--config")
                .arg(&self.config)
                .arg("stop")
                .output();
        }
    }
}

fn exists(path: &Path) -> bool {
    path.exists()
}

#[tokio::test]
async fn start_service_brings_a_service_up_and_stop_service_takes_it_away() {
    let instance = Instance::started();
    let local = instance.local();
    let spec = instance.spec("sleeper", "command = \"sleep 1000\"\nplacement = \"all\"\n");
    local.start_service(&spec).await.unwrap();
    assert!(local.is_up("sleeper").await.unwrap());
    let file = instance.services().join("sleeper.toml");
    assert_eq!(fs::read_to_string(&file).unwrap(), spec.local_toml);
    assert_eq!(local.owned_files(), ["sleeper"]);

    // The same file again: started in place, still up.
    local.start_service(&spec).await.unwrap();
    assert!(local.is_up("sleeper").await.unwrap());

    local.stop_service("sleeper").await.unwrap();
    assert!(!exists(&file));
    assert!(!local.is_up("sleeper").await.unwrap());
    assert!(local.owned_files().is_empty());
    // Stopping what is not there is no error.
    local.stop_service("sleeper").await.unwrap();
}

#[tokio::test]
async fn a_changed_spec_is_reloaded_and_a_held_service_is_started_again() {
    let instance = Instance::started();
    let local = instance.local();
    let spec = instance.spec("svc", "command = \"sleep 1000\"\n");
    local.start_service(&spec).await.unwrap();
    // The operator stops it; the agent's next start brings it back.
    let out = std::process::Command::new(common::ccmgr())
        .arg("--config")
        .arg(&instance.config)
        .args(["stop", "svc"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!local.is_up("svc").await.unwrap());
    let changed = instance.spec("svc", "command = \"sleep 1001\"\n");
    assert_ne!(changed.local_toml, spec.local_toml);
    local.start_service(&changed).await.unwrap();
    assert!(local.is_up("svc").await.unwrap());
    assert_eq!(
        fs::read_to_string(instance.services().join("svc.toml")).unwrap(),
        changed.local_toml
    );
}

#[tokio::test]
async fn a_failing_service_is_an_error_with_the_reason() {
    let instance = Instance::started();
    let local = instance.local();
    // `min_uptime`: an end before it is a failed start, which ccmgr tells for certain (a
    // service that ends at once without it is up for an instant, and then a race).
    let spec = instance.spec(
        "broken",
        "command = [\"sh\", \"-c\", \"exit 7\"]\nrestart = \"never\"\nmin_uptime = \"2s\"\n",
    );
    let err = local.start_service(&spec).await.unwrap_err();
    assert!(matches!(err, LocalError::Failed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("broken"), "{text}");
    assert!(text.contains("exited with status 7"), "{text}");
    assert!(!local.is_up("broken").await.unwrap());
}

#[tokio::test]
async fn a_file_that_does_not_load_is_taken_back() {
    let instance = Instance::started();
    let local = instance.local();
    // Cluster keys are checked here; a misspelt local key only by ccmgr.
    let spec = instance.spec("typo", "command = \"sleep 1000\"\nrestrat = \"always\"\n");
    let err = local.start_service(&spec).await.unwrap_err();
    assert!(err.to_string().contains("unknown key `restrat`"), "{err}");
    assert!(!instance.services().join("typo.toml").exists());
    // The stack still reloads: nothing broken was left behind.
    let good = instance.spec("good", "command = \"sleep 1000\"\n");
    local.start_service(&good).await.unwrap();
}

#[tokio::test]
async fn an_operators_file_is_never_touched() {
    let instance = Instance::started();
    let local = instance.local();
    let mine = instance.services().join("mine.toml");
    fs::write(&mine, "command = \"sleep 1000\"\n").unwrap();
    let spec = instance.spec("mine", "command = \"sleep 2000\"\n");
    let err = local.start_service(&spec).await.unwrap_err();
    assert!(matches!(err, LocalError::NotOwned { .. }), "{err:?}");
    let err = local.stop_service("mine").await.unwrap_err();
    assert!(matches!(err, LocalError::NotOwned { .. }), "{err:?}");
    assert_eq!(
        fs::read_to_string(&mine).unwrap(),
        "command = \"sleep 1000\"\n"
    );
    assert!(local.owned_files().is_empty());
}

#[tokio::test]
async fn stop_all_owned_stops_the_agents_services_and_only_those() {
    let instance = Instance::started();
    let local = instance.local();
    // A local service of the operator's, up before the agent's.
    fs::write(
        instance.services().join("local.toml"),
        "command = \"sleep 1000\"\n",
    )
    .unwrap();
    let spec_a = instance.spec("a", "command = \"sleep 1000\"\n");
    let spec_b = instance.spec("b", "command = \"sleep 1000\"\nrequires = [\"local\"]\n");
    local.start_service(&spec_a).await.unwrap();
    local.start_service(&spec_b).await.unwrap();
    assert!(local.is_up("local").await.unwrap());
    assert_eq!(local.owned_files(), ["a", "b"]);

    local.stop_all_owned().await.unwrap();
    assert!(local.owned_files().is_empty());
    assert!(!local.is_up("a").await.unwrap());
    assert!(!local.is_up("b").await.unwrap());
    assert!(local.is_up("local").await.unwrap());
    assert!(instance.services().join("local.toml").exists());
}

#[tokio::test]
async fn a_stack_that_is_not_running_is_said_so() {
    let instance = Instance::new();
    let local = instance.local();
    assert!(!local.is_up("x").await.unwrap());
    let spec = instance.spec("x", "command = \"sleep 1000\"\n");
    let err = local.start_service(&spec).await.unwrap_err();
    assert!(matches!(err, LocalError::NotRunning { .. }), "{err:?}");
    assert!(!instance.services().join("x.toml").exists());
    // Fencing a stopped stack only removes files.
    local.stop_all_owned().await.unwrap();
}

/// Waits for an event `pick` accepts, or panics at the deadline.
async fn wait_for(
    events: &mut Receiver<LocalEvent>,
    what: &str,
    pick: impl Fn(&LocalEvent) -> bool,
) -> LocalEvent {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(event)) if pick(&event) => return event,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the event stream ended while waiting for {what}"),
            Err(_) => panic!("no {what} before the deadline"),
        }
    }
}

/// Makes events happen (a probe service started and stopped) until the follower shows one:
/// from then on it sees everything, since the events command follows the ring from its head.
async fn until_following(
    local: &LocalCcmgr,
    instance: &Instance,
    events: &mut Receiver<LocalEvent>,
) {
    let probe = instance.spec("probe", "command = \"sleep 1000\"\n");
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the follower never showed an event"
        );
        local.start_service(&probe).await.unwrap();
        local.stop_service("probe").await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), events.recv()).await {
            break;
        }
    }
    while events.try_recv().is_ok() {}
}

#[tokio::test]
async fn follow_events_sees_up_and_exited_and_follows_a_stack_started_later() {
    let mut instance = Instance::new();
    let local = instance.local();
    let mut events = local.follow_events();
    wait_for(&mut events, "not-running", |e| e.event == "not-running").await;

    instance.start();
    until_following(&local, &instance, &mut events).await;
    let spec = instance.spec("watched", "command = \"sleep 1000\"\n");
    local.start_service(&spec).await.unwrap();
    let up = wait_for(&mut events, "`up` of watched", |e| {
        e.event == "up" && e.service.as_deref() == Some("watched")
    })
    .await;
    let pid = up.pid.expect("an `up` event has the pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exited = wait_for(&mut events, "`exited` of watched", |e| {
        e.event == "exited" && e.service.as_deref() == Some("watched")
    })
    .await;
    assert_eq!(exited.pid, Some(pid));
    assert_eq!(exited.signal.as_deref(), Some("SIGKILL"));
}

/// Whether `pid` is gone or a zombie (dead, not yet reaped by whoever adopted it).
fn dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test]
async fn run_command_succeeds_fails_and_kills_the_whole_group_at_its_timeout() {
    let env = [("CLUSTER_TEST".to_owned(), "yes".to_owned())];
    run_command("test \"$CLUSTER_TEST\" = yes", &env, DEADLINE)
        .await
        .unwrap();

    let err = run_command("echo first; echo oops >&2; exit 3", &[], DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::Failed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("exited with status 3"), "{text}");
    assert!(text.contains("oops"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let cmd = format!("sleep 100 & echo $! > {}; sleep 100", pid_file.display());
    let err = run_command(&cmd, &[], Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::TimedOut { .. }), "{err:?}");
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    while !dead(pid) {
        assert!(
            Instant::now() < deadline,
            "the background child {pid} survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_dropped_run_command_kills_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let cmd = format!("sleep 100 & echo $! > {}; sleep 100", pid_file.display());
    let mut run = Box::pin(run_command(&cmd, &[], DEADLINE));
    // Run it until the background child is there, then drop it, as a caller's select! would.
    let deadline = Instant::now() + DEADLINE;
    let pid: i32 = loop {
        assert!(
            Instant::now() < deadline,
            "the command never wrote its child's pid"
        );
        tokio::select! {
            result = &mut run => panic!("the command ended: {result:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break pid;
        }
    };
    drop(run);
    while !dead(pid) {
        assert!(
            Instant::now() < deadline,
            "the background child {pid} survived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

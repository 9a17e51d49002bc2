//! The plan of a live reload: what must change to go from the running configuration (the
//! image in the segment) to a new one (the files as they are now), in the order it would be
//! carried out, as `s6-rc-update -n` prints it. Pure: it compares two checked
//! [`Config`]s and touches nothing; `ccmgr reload --dry-run` prints it.
//!
//! The rules (the README's "Reload" section says the same):
//! - a service of the old configuration that the new one lacks is *removed*: it stops;
//! - a service of the new one that the old one lacks is *added*: it starts;
//! - a service of both whose specification differs in a field that shapes its process or its
//!   supervision (command, environment, account, readiness, timeouts, restart policy, its
//!   dependencies...) is *changed*: it stops and starts again. Its description, the file it
//!   comes from and its `on_failure_command` are not: they change in place;
//! - whatever `requires` a service the plan stops stops before it (shutdown order of the
//!   running configuration) and starts again after it (startup order of the new one), as a
//!   `ccmgr restart` of that service would do;
//! - every other service keeps running, with the same pid.
//!
//! `[coordinator]` settings and the global ones are compared too: each change is marked as one
//! that applies to the running stack or one that needs a full restart, with the reason.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::config::{Config, GlobalConfig, LoadOptions, ReadyKind, ServiceSpec};
use crate::duration::ConfigDuration;
use crate::graph::EdgeKind;

/// Where a reload reads the new configuration: the global file the running configuration
/// came from, with its instance and services directory (whatever the files say of them now,
/// as `--instance` and `--services-dir` would). The coordinator that carries a reload out
/// and `ccmgr reload --dry-run` both read these, so they make the same plan.
pub fn reload_options(running: &Config) -> LoadOptions {
    LoadOptions {
        config_path: running.global.source.clone(),
        instance: Some(running.global.instance.clone()),
        services_dir: Some(running.global.services_dir.clone()),
    }
}

/// Why a service is in the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Reason {
    /// Its file is gone (it stops and does not come back).
    Removed,
    /// It is new.
    Added,
    /// These fields of its specification differ.
    Changed { fields: Vec<String> },
    /// It requires a service the plan stops or starts (the one that brought it in).
    Requires {
        #[serde(rename = "requires")]
        service: String,
    },
}

/// One service the plan stops or starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    pub service: String,
    #[serde(flatten)]
    pub reason: Reason,
}

/// Whether a setting's new value reaches the running stack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "applies", rename_all = "kebab-case")]
pub enum Applies {
    /// The new value is used from the reload on.
    Live,
    /// The new value is used only once the stack is stopped and started again, for this
    /// reason.
    FullRestart { why: String },
}

/// One setting of the global file that differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SettingChange {
    /// The key as written in the file (`coordinator.startup_timeout`, `log_dir`).
    pub setting: String,
    pub old: String,
    pub new: String,
    #[serde(flatten)]
    pub applies: Applies,
}

/// A service that keeps its process while something about it changes in place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Updated {
    pub service: String,
    pub fields: Vec<String>,
}

/// What a reload does, in order: `stop`, then `start`; `updated` and `settings` change in
/// place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// In the running configuration's shutdown order.
    pub stop: Vec<Step>,
    /// In the new configuration's startup order.
    pub start: Vec<Step>,
    /// Kept services whose description, file or failure command changed.
    pub updated: Vec<Updated>,
    pub settings: Vec<SettingChange>,
    /// The services the plan does not touch, by name: whatever their state, it stays (one
    /// that runs keeps its process).
    pub kept: Vec<String>,
    /// Services the plan would start that the operator stopped (`ccmgr stop SERVICE`): they
    /// stay stopped under the new configuration, until started.
    pub held: Vec<String>,
}

/// Fields of a [`ServiceSpec`] that change without touching its process.
const IN_PLACE_FIELDS: [&str; 3] = ["description", "source", "on_failure_command"];

/// Fields that are sets, whatever order the file lists them in.
const SET_FIELDS: [&str; 4] = ["requires", "wants", "after", "before"];

/// The fields of `old` and `new` (one service) that differ, as named in a service file, split
/// into (those that need a new process, those that change in place).
fn differing_fields(old: &ServiceSpec, new: &ServiceSpec) -> (Vec<String>, Vec<String>) {
    let as_map = |s: &ServiceSpec| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (old, new) = (as_map(old), as_map(new));
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut restart = Vec::new();
    let mut in_place = Vec::new();
    for key in keys {
        let (a, b) = (old.get(key), new.get(key));
        let same = if SET_FIELDS.contains(&key.as_str()) {
            let set = |v: Option<&serde_json::Value>| -> BTreeSet<String> {
                v.and_then(|v| v.as_array())
                    .map(|a| a.iter().map(ToString::to_string).collect())
                    .unwrap_or_default()
            };
            set(a) == set(b)
        } else {
            a == b
        };
        if same {
            continue;
        }
        if IN_PLACE_FIELDS.contains(&key.as_str()) {
            in_place.push(key.clone());
        } else {
            restart.push(key.clone());
        }
    }
    (restart, in_place)
}

/// The services of `config` that `requires` one of `roots`, directly or through others,
/// with, for each, the service it requires that brought it in.
fn requiring_closure(config: &Config, roots: &BTreeSet<usize>) -> BTreeMap<usize, usize> {
    let mut found = BTreeMap::new();
    let mut work: Vec<usize> = roots.iter().copied().collect();
    while let Some(s) = work.pop() {
        for (d, kind) in config.graph.dependents(s) {
            if kind == EdgeKind::Requires && !roots.contains(&d) && !found.contains_key(&d) {
                found.insert(d, s);
                work.push(d);
            }
        }
    }
    found
}

impl Plan {
    /// The plan that takes a stack running `old` to `new`.
    pub fn between(old: &Config, new: &Config) -> Plan {
        let mut plan = Plan::default();
        // Stopped (old index) and started (new index), with their reasons.
        let mut stop: BTreeMap<usize, Reason> = BTreeMap::new();
        let mut start: BTreeMap<usize, Reason> = BTreeMap::new();
        for (i, spec) in old.services.iter().enumerate() {
            match new.service_index(&spec.id) {
                None => {
                    stop.insert(i, Reason::Removed);
                }
                Some(j) => {
                    let (restart, in_place) = differing_fields(spec, &new.services[j]);
                    if !restart.is_empty() {
                        stop.insert(i, Reason::Changed { fields: restart });
                    } else if !in_place.is_empty() {
                        plan.updated.push(Updated {
                            service: spec.id.clone(),
                            fields: in_place,
                        });
                    }
                }
            }
        }
        for (j, spec) in new.services.iter().enumerate() {
            if old.service_index(&spec.id).is_none() {
                start.insert(j, Reason::Added);
            }
        }
        // Until nothing moves: what requires a stopped service (in the running graph) stops
        // too; what is stopped and still exists starts again; what requires a started one
        // (in the new graph) and runs now is stopped and started again with it.
        loop {
            let roots: BTreeSet<usize> = stop.keys().copied().collect();
            for (d, because) in requiring_closure(old, &roots) {
                stop.entry(d).or_insert_with(|| Reason::Requires {
                    service: old.services[because].id.clone(),
                });
            }
            for (i, reason) in &stop {
                if let Some(j) = new.service_index(&old.services[*i].id) {
                    start.entry(j).or_insert_with(|| reason.clone());
                }
            }
            let roots: BTreeSet<usize> = start.keys().copied().collect();
            let mut grew = false;
            for (d, because) in requiring_closure(new, &roots) {
                let id = &new.services[d].id;
                start.entry(d).or_insert_with(|| Reason::Requires {
                    service: new.services[because].id.clone(),
                });
                if let Some(i) = old.service_index(id)
                    && !stop.contains_key(&i)
                {
                    stop.insert(
                        i,
                        Reason::Requires {
                            service: new.services[because].id.clone(),
                        },
                    );
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        plan.stop = old
            .shutdown_sequence
            .iter()
            .filter_map(|i| {
                stop.get(i).map(|reason| Step {
                    service: old.services[*i].id.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        plan.start = new
            .startup_sequence
            .iter()
            .filter_map(|j| {
                start.get(j).map(|reason| Step {
                    service: new.services[*j].id.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        plan.updated
            .retain(|u| !plan.stop.iter().any(|s| s.service == u.service));
        plan.kept = old
            .services
            .iter()
            .enumerate()
            .filter(|(i, _)| !stop.contains_key(i))
            .map(|(_, s)| s.id.clone())
            .collect();
        plan.settings = setting_changes(&old.global, &new.global);
        plan
    }

    /// [`Plan::between`] for a running stack in which the operator holds down the services
    /// `held` (by name): those it would start stay down, and are listed as such.
    pub fn for_running(old: &Config, new: &Config, held: &[String]) -> Plan {
        let mut plan = Plan::between(old, new);
        let (stay, start): (Vec<Step>, Vec<Step>) = plan
            .start
            .into_iter()
            .partition(|step| held.contains(&step.service));
        plan.start = start;
        plan.held = stay.into_iter().map(|step| step.service).collect();
        plan
    }

    /// Nothing to stop, start, update or set.
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty()
            && self.start.is_empty()
            && self.held.is_empty()
            && self.updated.is_empty()
            && self.settings.is_empty()
    }

    /// The settings that change only with a full restart.
    pub fn needs_full_restart(&self) -> impl Iterator<Item = &SettingChange> {
        self.settings
            .iter()
            .filter(|s| matches!(s.applies, Applies::FullRestart { .. }))
    }

    /// The plan as `ccmgr reload --dry-run` prints it, one action a line, in order.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.is_empty() {
            out.push_str("nothing to do: the running configuration is the one on disk\n");
            return out;
        }
        let why = |r: &Reason| match r {
            Reason::Removed => "removed".to_owned(),
            Reason::Added => "added".to_owned(),
            Reason::Changed { fields } => format!("changed: {}", fields.join(", ")),
            Reason::Requires { service } => format!("requires {service}"),
        };
        for step in &self.stop {
            let _ = writeln!(out, "stop {} ({})", step.service, why(&step.reason));
        }
        for step in &self.start {
            let _ = writeln!(out, "start {} ({})", step.service, why(&step.reason));
        }
        for id in &self.held {
            let _ = writeln!(out, "keep {id} stopped (stopped by the operator)");
        }
        for u in &self.updated {
            let _ = writeln!(
                out,
                "update {} in place ({})",
                u.service,
                u.fields.join(", ")
            );
        }
        for s in &self.settings {
            match &s.applies {
                Applies::Live => {
                    let _ = writeln!(out, "set {}: {} -> {} (live)", s.setting, s.old, s.new);
                }
                Applies::FullRestart { why } => {
                    let _ = writeln!(
                        out,
                        "set {}: {} -> {} (needs a full restart: {why})",
                        s.setting, s.old, s.new
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "untouched ({}): {}",
            self.kept.len(),
            if self.kept.is_empty() {
                "none".to_owned()
            } else {
                self.kept.join(", ")
            }
        );
        out
    }
}

/// How a `[coordinator]` key reaches the running stack. The reload hands the stack to a new
/// coordinator (and standby) that read the new configuration, so every key the coordinator
/// reads is live; the watchdog's period is also checked by the keeper, which set its check up
/// when the stack started.
fn coordinator_key_applies(key: &str) -> Applies {
    match key {
        "watchdog" => Applies::FullRestart {
            why: "the keeper checks the coordinator's signs of life at the period it started with"
                .into(),
        },
        _ => Applies::Live,
    }
}

/// Why a live reload from `old` to `new` cannot be carried out, if it cannot: a setting
/// that needs a full restart, or a change of what the service API's control segment lists
/// (the services and their shutdown timeouts, the shutdown order, the takeover mode) while
/// services use that API (they map it and would
/// keep a stale view). Nothing is changed then.
pub fn refusal(plan: &Plan, old: &Config, new: &Config) -> Option<String> {
    let full: Vec<&str> = plan
        .needs_full_restart()
        .map(|s| s.setting.as_str())
        .collect();
    if !full.is_empty() {
        return Some(format!(
            "{} cannot change while the stack runs; a full `ccmgr restart` applies {}",
            full.join(", "),
            if full.len() == 1 { "it" } else { "them" }
        ));
    }
    let api = crate::shm::api::ApiSpec::from_config;
    if api(old) != api(new) {
        let cooperative: BTreeSet<&str> = old
            .services
            .iter()
            .chain(new.services.iter())
            .filter(|s| s.ready == ReadyKind::Cc || s.cc_arg)
            .map(|s| s.id.as_str())
            .collect();
        if !cooperative.is_empty() {
            let verb = if cooperative.len() == 1 {
                "uses"
            } else {
                "use"
            };
            return Some(format!(
                "this reload changes the services or the shutdown order the service API lists, and {} {verb} that API (they would keep a stale view of it); a full `ccmgr restart` applies it",
                cooperative.into_iter().collect::<Vec<_>>().join(", "),
            ));
        }
    }
    None
}

/// How a global key reaches the running stack.
fn global_key_applies(key: &str) -> Applies {
    match key {
        "services_dir" => Applies::Live,
        "log_dir" => Applies::FullRestart {
            why: "the keeper holds the services' log files open in the old directory".into(),
        },
        "run_dir" => Applies::FullRestart {
            why: "the running stack's segment, sockets and records live in the old directory"
                .into(),
        },
        "group" => Applies::FullRestart {
            why: "the segment's group and mode are set when it is made".into(),
        },
        _ => Applies::FullRestart {
            why: "it is read only when the stack starts".into(),
        },
    }
}

/// The settings that are durations (numbers of milliseconds in the image).
const DURATION_SETTINGS: [&str; 5] = [
    "coordinator.startup_timeout",
    "coordinator.shutdown_timeout",
    "coordinator.restart_time_span",
    "coordinator.watchdog",
    "coordinator.on_failure_timeout",
];

/// The global settings that differ, each with how it applies.
fn setting_changes(old: &GlobalConfig, new: &GlobalConfig) -> Vec<SettingChange> {
    let flat = |g: &GlobalConfig| -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(g) {
            for (k, v) in map {
                match (k.as_str(), v) {
                    // Where the file was read from is no setting; the instance is how the
                    // running stack was found.
                    ("source" | "instance", _) => {}
                    ("coordinator", serde_json::Value::Object(inner)) => {
                        for (ck, cv) in inner {
                            out.insert(format!("coordinator.{ck}"), cv);
                        }
                    }
                    (_, v) => {
                        out.insert(k, v);
                    }
                }
            }
        }
        out
    };
    let (old, new) = (flat(old), flat(new));
    let show = |key: &str, v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => "(unset)".to_owned(),
        // As a file would write it: "7s", not 7000.
        Some(serde_json::Value::Number(ms)) if DURATION_SETTINGS.contains(&key) => {
            ms.as_u64().map_or_else(
                || ms.to_string(),
                |ms| ConfigDuration::from_millis(ms).to_string(),
            )
        }
        Some(v) => v.to_string(),
    };
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| SettingChange {
            setting: k.clone(),
            old: show(k, old.get(k)),
            new: show(k, new.get(k)),
            applies: match k.strip_prefix("coordinator.") {
                Some(ck) => coordinator_key_applies(ck),
                None => global_key_applies(k),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a configuration (global file text, then services) into `dir` and loads it.
    fn load(dir: &std::path::Path, global: &str, services: &[(&str, &str)]) -> Config {
        let sd = dir.join("services.d");
        let _ = std::fs::remove_dir_all(&sd);
        std::fs::create_dir_all(&sd).unwrap();
        let path = dir.join("ccmgr.toml");
        std::fs::write(
            &path,
            format!(
                "instance = \"plan\"\nservices_dir = \"{}\"\nrun_dir = \"{}\"\nlog_dir = \"{}\"\n{global}",
                sd.display(),
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        for (id, text) in services {
            std::fs::write(sd.join(format!("{id}.toml")), text).unwrap();
        }
        Config::load(&LoadOptions {
            config_path: Some(path),
            ..LoadOptions::default()
        })
        .unwrap_or_else(|d| panic!("{d:?}"))
    }

    const SLEEP: &str = "command = [\"/bin/sleep\", \"1000\"]\n";

    fn svc(extra: &str) -> String {
        format!("{SLEEP}{extra}\n")
    }

    fn names(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.service.as_str()).collect()
    }

    fn chain(dir: &std::path::Path, b_extra: &str) -> Config {
        load(
            dir,
            "",
            &[
                ("a", &svc("")),
                ("b", &svc(&format!("requires = [\"a\"]\n{b_extra}"))),
                ("c", &svc("requires = [\"b\"]")),
                ("d", &svc("after = [\"b\"]")),
            ],
        )
    }

    #[test]
    fn the_same_configuration_plans_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let old = chain(dir.path(), "");
        let new = chain(dir.path(), "");
        let plan = Plan::between(&old, &new);
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(plan.kept, ["a", "b", "c", "d"]);
        assert!(plan.to_text().starts_with("nothing to do"));
    }

    #[test]
    fn a_changed_service_restarts_with_what_requires_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let old = chain(dir.path(), "");
        let new = chain(dir.path(), "env = { X = \"1\" }");
        let plan = Plan::between(&old, &new);
        assert_eq!(names(&plan.stop), ["c", "b"]);
        assert_eq!(names(&plan.start), ["b", "c"]);
        assert_eq!(
            plan.stop[1].reason,
            Reason::Changed {
                fields: vec!["env".into()]
            }
        );
        assert_eq!(
            plan.stop[0].reason,
            Reason::Requires {
                service: "b".into()
            }
        );
        // `d` is only ordered after b: it keeps running, as does a.
        assert_eq!(plan.kept, ["a", "d"]);
        assert_eq!(
            plan.to_text(),
            "stop c (requires b)\nstop b (changed: env)\nstart b (changed: env)\nstart c (requires b)\nuntouched (2): a, d\n"
        );
    }

    #[test]
    fn a_service_the_operator_stopped_stays_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let old = chain(dir.path(), "");
        let new = chain(dir.path(), "env = { X = \"1\" }");
        let plan = Plan::for_running(&old, &new, &["c".to_owned()]);
        assert_eq!(names(&plan.stop), ["c", "b"]);
        assert_eq!(names(&plan.start), ["b"]);
        assert_eq!(plan.held, ["c"]);
        assert!(
            plan.to_text()
                .contains("keep c stopped (stopped by the operator)\n")
        );
    }

    #[test]
    fn added_and_removed_services_start_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let old = load(
            dir.path(),
            "",
            &[("a", &svc("")), ("gone", &svc("requires = [\"a\"]"))],
        );
        let new = load(
            dir.path(),
            "",
            &[("a", &svc("")), ("fresh", &svc("requires = [\"a\"]"))],
        );
        let plan = Plan::between(&old, &new);
        assert_eq!(names(&plan.stop), ["gone"]);
        assert_eq!(plan.stop[0].reason, Reason::Removed);
        assert_eq!(names(&plan.start), ["fresh"]);
        assert_eq!(plan.start[0].reason, Reason::Added);
        assert_eq!(plan.kept, ["a"]);
    }

    #[test]
    fn dependency_order_in_a_file_is_no_change_but_a_new_dependency_is() {
        let dir = tempfile::tempdir().unwrap();
        let with_after = |deps: &str| svc(&format!("after = {deps}"));
        let (ab, ba) = (with_after("[\"a\", \"b\"]"), with_after("[\"b\", \"a\"]"));
        let old_list = [("a", SLEEP), ("b", SLEEP), ("c", ab.as_str())];
        let new_list = [("a", SLEEP), ("b", SLEEP), ("c", ba.as_str())];
        let old = load(dir.path(), "", &old_list);
        let new = load(dir.path(), "", &new_list);
        assert!(Plan::between(&old, &new).is_empty());
        let newer = load(
            dir.path(),
            "",
            &[
                ("a", &svc("")),
                ("b", &svc("")),
                ("c", &svc("after = [\"a\"]")),
            ],
        );
        let plan = Plan::between(&old, &newer);
        assert_eq!(names(&plan.stop), ["c"]);
        assert_eq!(
            plan.stop[0].reason,
            Reason::Changed {
                fields: vec!["after".into()]
            }
        );
    }

    #[test]
    fn a_new_requirement_on_a_new_service_restarts_the_dependent_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = load(dir.path(), "", &[("web", &svc(""))]);
        let new = load(
            dir.path(),
            "",
            &[("db", &svc("")), ("web", &svc("requires = [\"db\"]"))],
        );
        let plan = Plan::between(&old, &new);
        assert_eq!(names(&plan.stop), ["web"]);
        assert_eq!(names(&plan.start), ["db", "web"]);
    }

    #[test]
    fn description_and_failure_command_change_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let old = load(dir.path(), "", &[("a", &svc(""))]);
        let new = load(
            dir.path(),
            "",
            &[(
                "a",
                &svc("description = \"the a\"\non_failure_command = \"true\""),
            )],
        );
        let plan = Plan::between(&old, &new);
        assert!(plan.stop.is_empty() && plan.start.is_empty(), "{plan:?}");
        assert_eq!(
            plan.updated,
            [Updated {
                service: "a".into(),
                fields: vec!["description".into(), "on_failure_command".into()]
            }]
        );
        assert_eq!(plan.kept, ["a"]);
    }

    #[test]
    fn a_change_of_what_the_service_api_lists_is_refused_while_services_use_it() {
        let dir = tempfile::tempdir().unwrap();
        let api = svc("ready = \"cc\"");
        let old = load(dir.path(), "", &[("db", &api), ("web", &svc(""))]);
        // A new service changes the API's list: refused, naming the service that uses it.
        let new = load(
            dir.path(),
            "",
            &[("db", &api), ("web", &svc("")), ("x", &svc(""))],
        );
        let plan = Plan::between(&old, &new);
        let why = refusal(&plan, &old, &new).expect("refused");
        assert!(why.contains("and db uses that API"), "{why}");
        // A change that keeps the list (an environment) is not.
        let same_list = load(
            dir.path(),
            "",
            &[("db", &api), ("web", &svc("env = { A = \"1\" }"))],
        );
        let plan = Plan::between(&old, &same_list);
        assert_eq!(refusal(&plan, &old, &same_list), None);
        // Without API services, any list may change.
        let plain = load(dir.path(), "", &[("web", &svc(""))]);
        let more = load(dir.path(), "", &[("web", &svc("")), ("x", &svc(""))]);
        assert_eq!(refusal(&Plan::between(&plain, &more), &plain, &more), None);
    }

    #[test]
    fn coordinator_settings_say_whether_they_apply_live() {
        let dir = tempfile::tempdir().unwrap();
        let old = load(dir.path(), "", &[("a", &svc(""))]);
        let new = load(
            dir.path(),
            "[coordinator]\nrestart_retry_counter = 9\nstandby = false\nwatchdog = \"2s\"\n",
            &[("a", &svc(""))],
        );
        let plan = Plan::between(&old, &new);
        assert!(plan.stop.is_empty() && plan.start.is_empty());
        let keys: Vec<(&str, bool)> = plan
            .settings
            .iter()
            .map(|s| (s.setting.as_str(), s.applies == Applies::Live))
            .collect();
        assert_eq!(
            keys,
            [
                ("coordinator.restart_retry_counter", true),
                ("coordinator.standby", true),
                ("coordinator.watchdog", false)
            ]
        );
        assert_eq!(plan.needs_full_restart().count(), 1);
        assert!(
            plan.to_text().contains(
                "set coordinator.watchdog: (unset) -> 2s (needs a full restart: the keeper"
            ),
            "{}",
            plan.to_text()
        );
        let text = plan.to_text();
        assert!(
            text.contains("set coordinator.restart_retry_counter: 5 -> 9 (live)"),
            "{text}"
        );
        assert!(
            text.contains("set coordinator.standby: true -> false (live)"),
            "{text}"
        );
        let why = refusal(&plan, &old, &new).expect("a watchdog change is refused");
        assert!(
            why.starts_with("coordinator.watchdog cannot change while the stack runs"),
            "{why}"
        );
    }
}

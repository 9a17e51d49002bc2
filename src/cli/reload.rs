//! `ccmgr reload --dry-run [--json]`: loads and checks the whole configuration on disk (a bad
//! file or a new cycle is reported exactly as `check` reports it, exit 2), compares it with
//! the configuration the instance runs (the image in its segment) and prints the plan of the
//! reload ([`crate::reload::Plan`]) in the order it would be carried out. It changes nothing.
//!
//! Without `--dry-run` the plan is printed and then carried out by the coordinator, asked
//! through the control socket (`reload` verb): it reads and checks the files again (they may
//! have changed since), and its plan is the one carried out. The command waits until the new
//! and changed services are up, across the coordinator's handover to its successor.

use serde::Serialize;

use super::{Cli, Exit, lifecycle, load_or_report, report_load, status::open_for_status};
use crate::config::Config;
use crate::control::protocol::Verb;
use crate::reload::Plan;
use crate::shm::ShmError;

/// The JSON form of the plan: the instance, then the plan's fields.
#[derive(Serialize)]
struct PlanJson<'a> {
    instance: &'a str,
    #[serde(flatten)]
    plan: &'a Plan,
    /// Why a live reload would be refused (null: it would be carried out).
    refused: Option<&'a str>,
}

pub fn reload(cli: &Cli, dry_run: bool, json: bool) -> Exit {
    let (instance, global) = match lifecycle::instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let run_dir = lifecycle::run_dir_of(&instance, global.as_ref());
    // A dry run only reads (the instance's group may); a live reload is the owner's alone.
    if !dry_run && let Err(exit) = lifecycle::refuse_non_owner(&instance, &run_dir) {
        return exit;
    }
    let segment = match open_for_status(&run_dir, &instance) {
        Ok(segment) => segment,
        Err(ShmError::NotFound { .. })
        | Err(ShmError::UntrustedDir(crate::shm::DirTrustError::Missing { .. })) => {
            // A configuration that does not load is still reported as such.
            if let Err(e) = load_or_report(cli) {
                return e;
            }
            eprintln!("ccmgr: instance {instance} is not running: nothing to reload");
            return Exit::NotRunning;
        }
        Err(e) => {
            eprintln!("ccmgr: cannot read the running configuration of instance {instance}: {e}");
            return Exit::Failed;
        }
    };
    let old = match segment
        .config_blob()
        .map_err(|e| e.to_string())
        .and_then(|b| Config::from_image(&b))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ccmgr: cannot read the running configuration of instance {instance}: {e}");
            return Exit::Failed;
        }
    };
    // The files the stack was started from, read as the coordinator will read them.
    let new = match report_load(Config::load(&crate::reload::reload_options(&old))) {
        Ok(config) => config,
        Err(e) => return e,
    };
    // What the operator holds down stays down: the plan says so.
    let held: Vec<String> = old
        .services
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            segment
                .service_progress(*i)
                .is_ok_and(|p| p.want == crate::vocab::Want::Held)
        })
        .map(|(_, s)| s.id.clone())
        .collect();
    let plan = Plan::for_running(&old, &new, &held);
    let refused = crate::reload::refusal(&plan, &old, &new);
    // Under `--json` a live reload prints one document: the coordinator's answer (below).
    let carried_out = !dry_run && !plan.is_empty();
    if !json {
        print!("{}", plan.to_text());
        if let Some(why) = &refused {
            println!("a live reload is refused: {why}");
        }
    } else if !carried_out || refused.is_some() {
        let out = PlanJson {
            instance: &instance,
            plan: &plan,
            refused: refused.as_deref(),
        };
        println!("{}", serde_json::to_string(&out).unwrap_or_default());
    }
    if dry_run || plan.is_empty() {
        return Exit::Ok;
    }
    if let Some(why) = refused {
        eprintln!("ccmgr: refused: {why}; nothing was changed");
        return Exit::Failed;
    }
    // The coordinator reads and checks the files again: its plan is the one carried out.
    drop(segment);
    super::operate::operate(cli, Verb::Reload, &super::OperateArgs::default())
}

//! `ccmgr reload --dry-run [--json]`: loads and checks the whole configuration on disk (a bad
//! file or a new cycle is reported exactly as `check` reports it, exit 2), compares it with
//! the configuration the instance runs (the image in its segment) and prints the plan of the
//! reload ([`crate::reload::Plan`]) in the order it would be carried out. It changes nothing.
//!
//! Carrying the plan out is not built yet: `ccmgr reload` without `--dry-run` says "nothing to
//! do" when the plan is empty, and otherwise refuses (exit 1) and changes nothing.

use serde::Serialize;

use super::{Cli, Exit, load_or_report, status::open_for_status};
use crate::config::Config;
use crate::reload::Plan;
use crate::shm::ShmError;

/// The JSON form of the plan: the instance, then the plan's fields.
#[derive(Serialize)]
struct PlanJson<'a> {
    instance: &'a str,
    #[serde(flatten)]
    plan: &'a Plan,
}

pub fn reload(cli: &Cli, dry_run: bool, json: bool) -> Exit {
    let new = match load_or_report(cli) {
        Ok(config) => config,
        Err(e) => return e,
    };
    let instance = new.global.instance.clone();
    let run_dir = new.global.run_dir.clone();
    let segment = match open_for_status(&run_dir, &instance) {
        Ok(segment) => segment,
        Err(ShmError::NotFound { .. })
        | Err(ShmError::UntrustedDir(crate::shm::DirTrustError::Missing { .. })) => {
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
    let plan = Plan::between(&old, &new);
    if !dry_run && !plan.is_empty() {
        eprintln!(
            "ccmgr: live reload is not available in this version: nothing was changed; `ccmgr reload --dry-run` prints the plan, and a full `ccmgr restart` applies the new configuration"
        );
        return Exit::Failed;
    }
    if json {
        let out = PlanJson {
            instance: &instance,
            plan: &plan,
        };
        println!("{}", serde_json::to_string(&out).unwrap_or_default());
    } else {
        print!("{}", plan.to_text());
    }
    Exit::Ok
}

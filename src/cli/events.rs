//! `ccmgr events [--json] [-n N]`: follows the instance's lifecycle events as they happen,
//! one line each, from the event ring the coordinator writes in `run_dir`
//! ([`crate::shm::events`]). Read-only: any number of readers, none of which can slow the
//! coordinator; one that falls more than a ring behind is told how many events it lost.
//!
//! It ends (exit 0) when the instance is stopped (the ring's name goes), and exits 3 when the
//! instance does not run.

use std::io::Write as _;
use std::time::Duration;

use super::lifecycle::instance_of;
use super::{Cli, Exit};
use crate::coordinator::events_path_in;
use crate::events::LifecycleEvent;
use crate::shm::events::{EventFollower, EventRingError, Followed};

/// How long a reader sleeps, at most, before it checks that the ring still has its name (a
/// stop wakes it anyway: the last events are announced before the name goes).
const RECHECK: Duration = Duration::from_secs(1);

pub fn events(cli: &Cli, json: bool, backlog: u64) -> Exit {
    let (instance, global) = match instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let Some(global) = global else {
        eprintln!(
            "error: instance {instance}: the configuration cannot be read, so its run_dir (where the events are) is unknown"
        );
        return Exit::BadConfig;
    };
    let path = events_path_in(&global.run_dir, &instance);
    // The ring belongs to the instance's owner, who owns its run_dir (checked as every reader
    // of the instance's state checks it: a directory others could write could hold a fake
    // ring); a member of the configured group reads it too.
    let owner = match crate::shm::trusted_dir(&global.run_dir, None) {
        Ok(dir) => dir.owner,
        Err(crate::shm::DirTrustError::Missing { .. }) => {
            eprintln!(
                "instance {instance}: not running (no run directory {})",
                global.run_dir.display()
            );
            return Exit::NotRunning;
        }
        Err(e) => {
            eprintln!("error: instance {instance}: {e}");
            return Exit::Failed;
        }
    };
    let mut follower = match EventFollower::open(&path, owner, backlog) {
        Ok(f) => f,
        Err(EventRingError::NotFound { .. }) => {
            eprintln!(
                "instance {instance}: not running (no events at {})",
                path.display()
            );
            return Exit::NotRunning;
        }
        Err(e) => {
            eprintln!("error: instance {instance}: {e}");
            return Exit::Failed;
        }
    };
    let mut out = std::io::stdout().lock();
    loop {
        let line = match follower.next(RECHECK) {
            Followed::Idle => continue,
            Followed::Ended => return Exit::Ok,
            Followed::Truncated => {
                eprintln!(
                    "error: instance {instance}: the event ring {} was truncated under this reader; no more events can be read from it",
                    path.display()
                );
                return Exit::Failed;
            }
            Followed::Line(line) if json => line,
            Followed::Line(line) => match serde_json::from_str::<LifecycleEvent>(&line) {
                Ok(event) => event.human(),
                Err(_) => line,
            },
            Followed::Lost(n) => {
                let mut event = LifecycleEvent::new(&instance, "lost");
                event.lost = Some(n);
                if json {
                    serde_json::to_string(&event).unwrap_or_default()
                } else {
                    format!(
                        "{} {instance}: {n} event{} lost (this reader fell more than a ring behind)",
                        event.time,
                        if n == 1 { "" } else { "s" }
                    )
                }
            }
        };
        // A closed pipe (`ccmgr events | head`) ends the reader.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Exit::Ok;
        }
    }
}

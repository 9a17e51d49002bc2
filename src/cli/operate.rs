//! `ccmgr start|stop|restart SERVICE...`: the client of the control socket
//! ([`crate::control`]). It sends one request, and waits for the coordinator to say the work
//! is done (like `systemctl`), or only that it was accepted with `--no-wait`.
//!
//! A takeover in the middle: a request not yet read waits in the socket's backlog (the keeper
//! holds the listening socket) and the successor reads it. If the connection ends before the
//! last reply (the coordinator died), the client connects again and asks again: the same
//! request if it was not accepted yet, else one that only waits for the end state the
//! successor continues towards, for every service the accepted request named (a stop asks
//! for the stop again, which changes nothing; a start or a restart asks for a start, which
//! waits until the services are up). One case is not
//! told apart: a coordinator that died after applying and publishing a request but before
//! saying so; the request is then asked again, which for a restart means a second restart of
//! the same services (a start or a stop asked twice changes nothing). Every wait is
//! bounded: the request must be accepted within [`ACCEPT_WAIT`] (longer than a takeover
//! may take), and the work done within the coordinator's estimate plus [`MARGIN`].

use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Cli, Exit, OperateArgs, lifecycle};
use crate::control::protocol::{Reply, Request, Verb};

/// How long the coordinator has to accept a request: longer than the keeper gives a standby
/// to take over (12 s).
const ACCEPT_WAIT: Duration = Duration::from_secs(15);

/// Added to the coordinator's estimate of the work (a takeover on the way, a busy machine).
const MARGIN: Duration = Duration::from_secs(15);

/// Connections made for one request, at most (each lost connection is a coordinator's death).
const MAX_CONNECTIONS: usize = 5;

/// How one conversation ended.
enum Ended {
    /// The last reply.
    Final(Reply),
    /// The connection ended before it.
    Lost,
}

pub fn operate(cli: &Cli, verb: Verb, args: &OperateArgs) -> Exit {
    let (instance, global) = match lifecycle::instance_of(cli) {
        Ok(found) => found,
        Err(e) => return e,
    };
    let run_dir = lifecycle::run_dir_of(&instance, global.as_ref());
    // The same rule as the whole-stack verbs, before anything is sent: the coordinator checks
    // the caller's credentials again (it also serves root), but an operator learns here, with
    // the same sentence and exit code, that this instance is not theirs to drive.
    if let Err(exit) = lifecycle::refuse_non_owner(&instance, &run_dir) {
        return exit;
    }
    let path = crate::control::socket_path(&run_dir, &instance);
    let mut request = Request {
        verb,
        services: args.services.clone(),
    };
    let mut deadline = Instant::now() + ACCEPT_WAIT;
    let mut accepted: Option<Vec<String>> = None;
    for _ in 0..MAX_CONNECTIONS {
        let mut stream = match connect(&path, &instance) {
            Ok(stream) => stream,
            Err(exit) => return exit,
        };
        let ended = converse(&mut stream, &request, deadline, |services, deadline_ms| {
            if accepted.is_none() {
                deadline = Instant::now() + Duration::from_millis(deadline_ms) + MARGIN;
                accepted = Some(services.to_vec());
            }
            !args.no_wait
        });
        match ended {
            Ok(Ended::Final(reply)) => {
                if cli.json {
                    print_json(verb, &instance, &reply, accepted.as_deref());
                }
                return report(verb, &instance, reply, accepted.as_deref(), cli.json);
            }
            Ok(Ended::Lost) => {
                if let Some(services) = &accepted {
                    // The successor continues the work; ask only for its end state, for every
                    // service the request was acting on.
                    request.verb = match verb {
                        Verb::Stop => Verb::Stop,
                        Verb::Start | Verb::Restart => Verb::Start,
                        Verb::Reload => Verb::Reload,
                    };
                    // A reload names no service: asked again, the successor finds what is
                    // left of it (nothing, once it adopted the new segment) and waits for
                    // the services it starts.
                    if verb != Verb::Reload {
                        request.services = services.clone();
                    }
                }
                // A reload's coordinator hands over to a successor by design.
                if verb != Verb::Reload {
                    eprintln!(
                        "ccmgr: the coordinator of instance {instance} went away; asking its successor"
                    );
                }
            }
            Err(why) => {
                eprintln!("ccmgr: {why}");
                return Exit::Failed;
            }
        }
    }
    eprintln!(
        "ccmgr: the coordinator of instance {instance} kept going away; nothing more is known"
    );
    Exit::Failed
}

/// Connects to the control socket, or says why not.
fn connect(path: &Path, instance: &str) -> Result<UnixStream, Exit> {
    match UnixStream::connect(path) {
        Ok(stream) => Ok(stream),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            eprintln!(
                "ccmgr: instance {instance} is not running (nothing listens on {})",
                path.display()
            );
            Err(Exit::NotRunning)
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            eprintln!(
                "ccmgr: permission denied: uid {} may not control instance {instance} ({}): only its owner and root may",
                nix::unistd::geteuid(),
                path.display()
            );
            Err(Exit::Failed)
        }
        Err(e) => {
            eprintln!("ccmgr: cannot connect to {}: {e}", path.display());
            Err(Exit::Failed)
        }
    }
}

/// Sends `request` and reads replies until the last one, the connection's end, or
/// `deadline`. `on_accepted` is told the services and the estimate, and says whether to wait
/// for the work.
fn converse(
    stream: &mut UnixStream,
    request: &Request,
    deadline: Instant,
    mut on_accepted: impl FnMut(&[String], u64) -> bool,
) -> Result<Ended, String> {
    // A refusal comes before the request is read, and the connection is closed after it:
    // the request may then not go out, but the refusal is there to read.
    let sent = stream.write_all(&request.to_line());
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut deadline = deadline;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "gave up waiting: the {} of {} is not done in the time it should take; `ccmgr status` shows where it is",
                noun(request.verb),
                request.services.join(", ")
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) if sent.is_err() => {
                let e = sent
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                return Err(format!("cannot send the request: {e}"));
            }
            Ok(0) => return Ok(Ended::Lost),
            Ok(_) if line.last() != Some(&b'\n') => return Ok(Ended::Lost),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Ok(Ended::Lost),
        }
        line.pop();
        let reply = Reply::decode(&line)?;
        match reply {
            Reply::Accepted {
                ref services,
                deadline_ms,
            } => {
                if !on_accepted(services, deadline_ms) {
                    return Ok(Ended::Final(reply));
                }
                deadline =
                    deadline.max(Instant::now() + Duration::from_millis(deadline_ms) + MARGIN);
            }
            reply => return Ok(Ended::Final(reply)),
        }
    }
}

fn noun(verb: Verb) -> &'static str {
    match verb {
        Verb::Start => "start",
        Verb::Stop => "stop",
        Verb::Restart => "restart",
        Verb::Reload => "reload",
    }
}

/// `--json`: the outcome as one document: the verb, the services acted on (in order) and the
/// coordinator's last reply as it sent it (`reply`: `done`, `accepted` with `--no-wait`,
/// `failed`, `unknown`, `refused`, `not-now`, `bad`).
fn print_json(verb: Verb, instance: &str, reply: &Reply, accepted: Option<&[String]>) {
    let doc = serde_json::json!({
        "instance": instance,
        "verb": noun(verb),
        "services": accepted,
        "result": reply,
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
}

/// Prints the outcome (with `--json`, only the messages for people, on stderr); returns the
/// exit code.
fn report(
    verb: Verb,
    instance: &str,
    reply: Reply,
    accepted: Option<&[String]>,
    json: bool,
) -> Exit {
    match reply {
        Reply::Done if verb == Verb::Reload => {
            println!("reloaded");
            Exit::Ok
        }
        Reply::Done => {
            let services = accepted.unwrap_or_default().join(", ");
            if !json {
                println!("{} {services}", verb.done());
            }
            Exit::Ok
        }
        Reply::Accepted { services, .. } => {
            if !json {
                println!("{} {}: under way", noun(verb), services.join(", "));
            }
            Exit::Ok
        }
        Reply::Failed { service, how } => {
            eprintln!("ccmgr: {service} failed: {how}");
            Exit::Failed
        }
        Reply::Unknown { unknown } => {
            for u in unknown {
                eprintln!("error: instance {instance} has no service `{}`", u.service);
                if let Some(like) = u.did_you_mean {
                    eprintln!("  note: did you mean `{like}`?");
                }
            }
            Exit::BadConfig
        }
        Reply::Refused { why } => {
            eprintln!("ccmgr: refused: {why}");
            Exit::Failed
        }
        Reply::NotNow { why } => {
            eprintln!("ccmgr: not now: {why}");
            Exit::Failed
        }
        Reply::Invalid { errors } => {
            for e in errors {
                eprintln!("error: {e}");
            }
            eprintln!("ccmgr: the configuration is not valid; nothing was changed");
            Exit::BadConfig
        }
        Reply::Bad { why } => {
            eprintln!("ccmgr: the coordinator did not understand the request: {why}");
            Exit::Failed
        }
    }
}

//! The control socket's messages: one request line from the client, reply lines from the
//! coordinator, each one JSON object ended by `\n`.
//!
//! Anyone who may connect can send anything, so the decoder is strict and bounded: at most
//! [`MAX_REQUEST`] bytes up to the newline, UTF-8, exactly the fields of [`Request`] (unknown
//! fields are an error), at least one and at most [`MAX_NAMED`] services, each a plausible
//! service id. Nothing in a request is trusted further: ids are looked up in the running
//! configuration, and what is not there is answered with [`Reply::Unknown`].
//!
//! A conversation:
//!
//! ```text
//! -> {"verb":"restart","services":["b"]}
//! <- {"reply":"accepted","services":["b","c"],"deadline_ms":61000}
//! <- {"reply":"done"}
//! ```
//!
//! or one of `refused` (the caller may not control the instance), `bad` (the request does not
//! parse), `unknown` (no such service, with a suggestion), `not-now` (the stack is starting
//! up or stopping) instead of `accepted`; `failed` (naming the service and how) instead of
//! `done`. The coordinator closes the connection after the last reply.

use serde::{Deserialize, Serialize};

/// The longest request line, newline included: a request names services, whose ids are at
/// most 64 bytes.
pub const MAX_REQUEST: usize = 16 * 1024;

/// At most this many services in one request.
pub const MAX_NAMED: usize = 128;

/// The longest service id (the configuration's rule).
const MAX_ID: usize = 64;

/// What the operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verb {
    /// Start the services and what they require.
    Start,
    /// Stop the services and what requires them; they stay down until started.
    Stop,
    /// Stop and start the services and what requires them (and runs).
    Restart,
    /// Re-read the configuration and apply the difference (names no service).
    Reload,
}

impl Verb {
    /// The past participle, for "restarted b, c".
    pub fn done(self) -> &'static str {
        match self {
            Verb::Start => "started",
            Verb::Stop => "stopped",
            Verb::Restart => "restarted",
            Verb::Reload => "reloaded",
        }
    }
}

/// One request: a verb and the services it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub verb: Verb,
    pub services: Vec<String>,
}

/// A service a request named that the running configuration does not have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnknownService {
    pub service: String,
    /// The closest id, if one is close enough to be a likely typo.
    pub did_you_mean: Option<String>,
}

/// One reply line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// The caller may not control this instance.
    Refused { why: String },
    /// The request does not parse.
    Bad { why: String },
    /// Some named services do not exist.
    Unknown { unknown: Vec<UnknownService> },
    /// Not now: the stack is starting up or stopping.
    NotNow { why: String },
    /// The request is applied (and published): these services are acted on, in this order;
    /// the work should be done within `deadline_ms`.
    Accepted {
        services: Vec<String>,
        deadline_ms: u64,
    },
    /// The work is done.
    Done,
    /// `service` failed `how`.
    Failed { service: String, how: String },
    /// A reload found the configuration on disk invalid: each error, as `check` words it.
    Invalid { errors: Vec<String> },
}

impl Reply {
    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Whether this is the last reply of a conversation.
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Accepted { .. })
    }

    /// Reads one reply line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Reply, String> {
        serde_json::from_slice(line).map_err(|e| format!("a malformed reply: {e}"))
    }
}

impl Request {
    /// The request as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Decodes one request line (without its newline), strictly; the error says what is
    /// wrong, for a [`Reply::Bad`].
    pub fn decode(line: &[u8]) -> Result<Request, String> {
        if line.len() >= MAX_REQUEST {
            return Err(format!("a request is at most {MAX_REQUEST} bytes"));
        }
        let text = std::str::from_utf8(line).map_err(|_| "a request is UTF-8".to_owned())?;
        let request: Request =
            serde_json::from_str(text).map_err(|e| format!("a malformed request: {e}"))?;
        if request.verb == Verb::Reload {
            if !request.services.is_empty() {
                return Err("a reload names no service".into());
            }
            return Ok(request);
        }
        if request.services.is_empty() {
            return Err("a request names at least one service".into());
        }
        if request.services.len() > MAX_NAMED {
            return Err(format!("a request names at most {MAX_NAMED} services"));
        }
        if let Some(bad) = request
            .services
            .iter()
            .find(|id| id.is_empty() || id.len() > MAX_ID || id.contains(['\n', '\0']))
        {
            return Err(format!("{bad:?} cannot be a service id"));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back() {
        let request = Request {
            verb: Verb::Restart,
            services: vec!["b".into(), "c".into()],
        };
        let line = request.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(Request::decode(&line[..line.len() - 1]), Ok(request));
    }

    #[test]
    fn the_decoder_is_strict() {
        for bad in [
            &br#"{"verb":"stop","services":["b"],"extra":1}"#[..],
            br#"{"verb":"halt","services":["b"]}"#,
            br#"{"verb":"stop","services":[]}"#,
            br#"{"verb":"stop","services":[""]}"#,
            br#"{"verb":"stop"}"#,
            b"\xff\xfe",
            b"stop b",
        ] {
            assert!(
                Request::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"verb":"stop","services":["{}"]}}"#, "x".repeat(65));
        assert!(Request::decode(long.as_bytes()).is_err());
        let many: Vec<String> = (0..=MAX_NAMED).map(|i| format!("s{i}")).collect();
        let line = Request {
            verb: Verb::Stop,
            services: many,
        }
        .to_line();
        assert!(Request::decode(&line[..line.len() - 1]).is_err());
    }

    #[test]
    fn a_reload_names_no_service() {
        assert_eq!(
            Request::decode(br#"{"verb":"reload","services":[]}"#),
            Ok(Request {
                verb: Verb::Reload,
                services: Vec::new(),
            })
        );
        assert!(Request::decode(br#"{"verb":"reload","services":["b"]}"#).is_err());
    }

    #[test]
    fn replies_read_back() {
        for reply in [
            Reply::Refused { why: "no".into() },
            Reply::Unknown {
                unknown: vec![UnknownService {
                    service: "bb".into(),
                    did_you_mean: Some("b".into()),
                }],
            },
            Reply::Accepted {
                services: vec!["b".into()],
                deadline_ms: 5,
            },
            Reply::Done,
            Reply::Failed {
                service: "b".into(),
                how: "exited with status 1".into(),
            },
            Reply::Invalid {
                errors: vec!["services.d/b.toml:2:1: bad".into()],
            },
        ] {
            let line = reply.to_line();
            assert_eq!(Reply::decode(&line[..line.len() - 1]), Ok(reply));
        }
    }
}

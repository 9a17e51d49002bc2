//! The cluster services: loading `cluster.d/*.toml` into [`ClusterServiceSpec`]s.
//!
//! A cluster service file holds every key of a `services.d` file plus the cluster keys
//! ([`CLUSTER_KEYS`]). This module checks the cluster keys strictly, with every problem of
//! every file reported (file and line), and passes the other keys through untouched: they are
//! the local service's, and ccmgr's own loader is their judge ([`check_with_ccmgr`] runs it).
//!
//! The local part ([`ClusterServiceSpec::local_toml`]) is the file's own text with the cluster
//! keys blanked out and one header line put in front, rather than a re-serialisation: so its
//! line N is line N-1 of the cluster file, a message of ccmgr about the local file maps back to
//! the cluster file's line, and the operator's comments stay. Relative paths (`working_dir`,
//! `env_file`, a program named with a `/`), which ccmgr resolves against the services
//! directory, are made absolute against the cluster directory, where they were written.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Spanned, Value};

use crate::duration::parse_duration;

/// The keys of a cluster service file that are the cluster's, not the local service's.
pub const CLUSTER_KEYS: [&str; 11] = [
    "allowable_nodes",
    "disallowable_nodes",
    "preferred_nodes",
    "placement",
    "maturity_count",
    "maturity_time",
    "transfer_cost",
    "notify_command",
    "recovery_command",
    "auto_start",
    "port",
];

/// How the first line of every file the agent writes into the local services directory
/// begins: what [`crate::local::LocalCcmgr::owned_files`] recognises.
pub const HEADER_PREFIX: &str = "# ccmgr cluster agent: cluster service ";

/// The first line of the local file of service `name` on node `node`.
pub fn agent_header(name: &str, node: &str) -> String {
    format!("{HEADER_PREFIX}{name} of node {node}; do not edit")
}

/// Where a service runs: on one node at a time, or on every node that allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    One,
    All,
}

/// Whether the manager may move a running service to a preferred node on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferCost {
    Free,
    Expensive,
}

/// One cluster service, as `cluster.d/<name>.toml` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterServiceSpec {
    pub name: String,
    pub source: PathBuf,
    /// `["*"]`: every node.
    pub allowable_nodes: Vec<String>,
    pub disallowable_nodes: Vec<String>,
    /// In order of preference.
    pub preferred_nodes: Vec<String>,
    pub placement: Placement,
    pub maturity_count: u32,
    pub maturity_time_ms: u64,
    pub transfer_cost: TransferCost,
    pub notify_command: Option<String>,
    pub recovery_command: Option<String>,
    pub auto_start: bool,
    pub port: Option<u16>,
    /// The `services.d/<name>.toml` the agent writes: the header line, then the file's text
    /// without its cluster keys (see the module's comment).
    pub local_toml: String,
}

impl ClusterServiceSpec {
    /// Whether the service may run on `node`: allowed (by name or `*`) and not disallowed.
    pub fn allows(&self, node: &str) -> bool {
        let allowed = self.allowable_nodes.iter().any(|n| n == "*" || n == node);
        allowed && !self.disallowable_nodes.iter().any(|n| n == node)
    }

    /// `node`'s rank among the preferred nodes (0 is the most preferred), if it is one.
    pub fn preference(&self, node: &str) -> Option<usize> {
        self.preferred_nodes.iter().position(|n| n == node)
    }

    /// Whether the service waits for the cluster's maturity before its first placement.
    pub fn maturity_applies(&self) -> bool {
        self.maturity_count > 0 || self.maturity_time_ms > 0
    }
}

/// Why the cluster directory did not load.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read the cluster directory {}: {source}", .dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every problem of every file, one sentence each, starting with `file:line:`.
    #[error("{}", .problems.join("\n"))]
    Invalid { problems: Vec<String> },
}

/// The service id rule is ccmgr's own (`check_id`, `MAX_ID_LEN`): the name becomes a local
/// service id, a file name and a command-line word.
pub use ccmgr::config::service::{MAX_ID_LEN, check_id};

/// Whether `name` may name a node in a node list: it becomes part of etcd keys and messages.
fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "node name `{name}` must be non-empty and hold only letters, digits, `_`, `.` and `-`"
        ));
    }
    Ok(())
}

/// ccmgr's drop-in rule: `*.toml` directly in the directory, no dotfiles.
fn is_service_file_name(name: &str) -> bool {
    !name.starts_with('.') && name.len() > ".toml".len() && name.ends_with(".toml")
}

/// Loads every cluster service of `dir`, sorted by name; `node` is this node's name, which
/// goes into the header of each local part. Every problem of every file is reported.
pub fn load_cluster_dir(dir: &Path, node: &str) -> Result<Vec<ClusterServiceSpec>, SpecError> {
    let dir_error = |source| SpecError::Dir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for entry in fs::read_dir(dir).map_err(dir_error)? {
        let entry = entry.map_err(dir_error)?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            if name.as_encoded_bytes().ends_with(b".toml") {
                problems.push(format!(
                    "{}: the file name is not valid UTF-8, so it cannot name a service",
                    path.display()
                ));
            }
            continue;
        };
        if is_service_file_name(name) {
            files.push(path);
        }
    }
    files.sort();
    // Absolute, so that a relative path of a local part resolves where it was written.
    let base = std::path::absolute(dir).map_err(dir_error)?;
    let mut specs = Vec::new();
    for path in files {
        if let Some(spec) = load_file(&path, &base, node, &mut problems) {
            specs.push(spec);
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(SpecError::Invalid { problems })
    }
}

/// The keys this module reads; the others are passed through unread.
#[derive(Deserialize)]
struct RawKeys {
    allowable_nodes: Option<Spanned<Value>>,
    disallowable_nodes: Option<Spanned<Value>>,
    preferred_nodes: Option<Spanned<Value>>,
    placement: Option<Spanned<Value>>,
    maturity_count: Option<Spanned<Value>>,
    maturity_time: Option<Spanned<Value>>,
    transfer_cost: Option<Spanned<Value>>,
    notify_command: Option<Spanned<Value>>,
    recovery_command: Option<Spanned<Value>>,
    auto_start: Option<Spanned<Value>>,
    port: Option<Spanned<Value>>,
    id: Option<Spanned<Value>>,
    working_dir: Option<Spanned<Value>>,
    env_file: Option<Spanned<Value>>,
    command: Option<Spanned<Value>>,
}

/// The 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Problems of one file, each with its line.
struct FileProblems<'a> {
    path: &'a Path,
    text: &'a str,
    problems: &'a mut Vec<String>,
    count: usize,
}

impl FileProblems<'_> {
    fn at(&mut self, span: Range<usize>, msg: impl std::fmt::Display) {
        self.problems.push(format!(
            "{}:{}: {msg}",
            self.path.display(),
            line_of(self.text, span.start)
        ));
        self.count += 1;
    }
}

fn load_file(
    path: &Path,
    base: &Path,
    node: &str,
    problems: &mut Vec<String>,
) -> Option<ClusterServiceSpec> {
    // A directory or a dangling symlink named `*.toml` is named, not skipped: a skipped file
    // is a service lost without a word.
    let text = match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            problems.push(format!(
                "{}: the cluster service file is not a regular file",
                path.display()
            ));
            return None;
        }
        Ok(_) => match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                problems.push(format!(
                    "{}: the cluster service file cannot be read: {e}",
                    path.display()
                ));
                return None;
            }
        },
        Err(e) => {
            problems.push(format!(
                "{}: the cluster service file cannot be read: {e}",
                path.display()
            ));
            return None;
        }
    };
    let raw: RawKeys = match toml::from_str(&text) {
        Ok(raw) => raw,
        Err(e) => {
            let line = e.span().map(|s| line_of(&text, s.start));
            let msg = e.message().trim_end().to_owned();
            problems.push(match line {
                Some(line) => format!("{}:{line}: {msg}", path.display()),
                None => format!("{}: {msg}", path.display()),
            });
            return None;
        }
    };
    let mut p = FileProblems {
        path,
        text: &text,
        problems,
        count: 0,
    };

    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    if let Err(msg) = check_id(&name) {
        p.at(
            0..0,
            format!("{msg} (a cluster service is named by its file name without `.toml`)"),
        );
    }
    if let Some(id) = &raw.id
        && id.get_ref().as_str() != Some(name.as_str())
    {
        p.at(
            id.span(),
            format!(
                "key `id`: a cluster service is named by its file name (`{name}`); remove `id` or make it `{name}`"
            ),
        );
    }

    let allowable = node_list(&mut p, "allowable_nodes", &raw.allowable_nodes, true)
        .unwrap_or_else(|| vec!["*".to_owned()]);
    let disallowable =
        node_list(&mut p, "disallowable_nodes", &raw.disallowable_nodes, false).unwrap_or_default();
    let preferred =
        node_list(&mut p, "preferred_nodes", &raw.preferred_nodes, false).unwrap_or_default();
    check_node_lists(&mut p, &raw, &allowable, &disallowable, &preferred);

    let placement = match &raw.placement {
        None => Placement::One,
        Some(v) => match v.get_ref().as_str() {
            Some("one") => Placement::One,
            Some("all") => Placement::All,
            Some(other) => {
                p.at(
                    v.span(),
                    format!("unknown placement `{other}`: expected `one` or `all`"),
                );
                Placement::One
            }
            None => {
                p.at(v.span(), "key `placement` must be a string: `one` or `all`");
                Placement::One
            }
        },
    };
    let transfer_cost = match &raw.transfer_cost {
        None => TransferCost::Expensive,
        Some(v) => match v.get_ref().as_str() {
            Some("free") => TransferCost::Free,
            Some("expensive") => TransferCost::Expensive,
            Some(other) => {
                p.at(
                    v.span(),
                    format!("unknown transfer_cost `{other}`: expected `free` or `expensive`"),
                );
                TransferCost::Expensive
            }
            None => {
                p.at(
                    v.span(),
                    "key `transfer_cost` must be a string: `free` or `expensive`",
                );
                TransferCost::Expensive
            }
        },
    };
    let maturity_count = match &raw.maturity_count {
        None => 0,
        Some(v) => match v.get_ref().as_integer().map(u32::try_from) {
            Some(Ok(n)) => n,
            _ => {
                p.at(
                    v.span(),
                    format!(
                        "key `maturity_count` must be a whole number of nodes from 0 to {}",
                        u32::MAX
                    ),
                );
                0
            }
        },
    };
    let maturity_time_ms = match &raw.maturity_time {
        None => 0,
        Some(v) => match v.get_ref() {
            Value::Integer(ms) => u64::try_from(*ms).unwrap_or_else(|_| {
                p.at(
                    v.span(),
                    format!("key `maturity_time`: invalid duration {ms}: it is negative"),
                );
                0
            }),
            Value::String(s) => match parse_duration(s) {
                Ok(d) => u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX),
                Err(e) => {
                    p.at(v.span(), format!("key `maturity_time`: {e}"));
                    0
                }
            },
            _ => {
                p.at(
                    v.span(),
                    "key `maturity_time` must be a duration: milliseconds as an integer, or a string like \"30s\"",
                );
                0
            }
        },
    };
    let notify_command = command_key(&mut p, "notify_command", &raw.notify_command);
    let recovery_command = command_key(&mut p, "recovery_command", &raw.recovery_command);
    let auto_start = match &raw.auto_start {
        None => true,
        Some(v) => v.get_ref().as_bool().unwrap_or_else(|| {
            p.at(v.span(), "key `auto_start` must be `true` or `false`");
            true
        }),
    };
    let port = raw
        .port
        .as_ref()
        .and_then(|v| match v.get_ref().as_integer().map(u16::try_from) {
            Some(Ok(port)) if port > 0 => Some(port),
            _ => {
                p.at(v.span(), "key `port` must be a port number from 1 to 65535");
                None
            }
        });

    if p.count > 0 {
        return None;
    }
    let local_toml = local_text(&text, &raw, base, &name, node);
    Some(ClusterServiceSpec {
        name,
        source: path.to_owned(),
        allowable_nodes: allowable,
        disallowable_nodes: disallowable,
        preferred_nodes: preferred,
        placement,
        maturity_count,
        maturity_time_ms,
        transfer_cost,
        notify_command,
        recovery_command,
        auto_start,
        port,
        local_toml,
    })
}

/// A list of node names; `*` is accepted (alone) only where `star` says so.
fn node_list(
    p: &mut FileProblems<'_>,
    key: &str,
    value: &Option<Spanned<Value>>,
    star: bool,
) -> Option<Vec<String>> {
    let v = value.as_ref()?;
    let Some(items) = v.get_ref().as_array() else {
        p.at(
            v.span(),
            format!("key `{key}` must be a list of node names, like [\"n0\", \"n1\"]"),
        );
        return None;
    };
    let mut names: Vec<String> = Vec::new();
    let mut bad = false;
    for item in items {
        let Some(name) = item.as_str() else {
            p.at(
                v.span(),
                format!("key `{key}` must be a list of node names; `{item}` is not a string"),
            );
            bad = true;
            continue;
        };
        if name == "*" {
            if !star {
                p.at(
                    v.span(),
                    format!("key `{key}`: `*` (every node) is allowed only in `allowable_nodes`"),
                );
                bad = true;
            }
        } else if let Err(msg) = check_node_name(name) {
            p.at(v.span(), format!("key `{key}`: {msg}"));
            bad = true;
        }
        if names.iter().any(|n| n == name) {
            p.at(v.span(), format!("key `{key}` names node `{name}` twice"));
            bad = true;
        }
        names.push(name.to_owned());
    }
    if bad {
        return None;
    }
    if star && names.is_empty() {
        p.at(
            v.span(),
            format!(
                "key `{key}` is empty, so the service may run nowhere; write [\"*\"] for every node"
            ),
        );
        return None;
    }
    if star && names.len() > 1 && names.iter().any(|n| n == "*") {
        p.at(
            v.span(),
            format!("key `{key}`: `*` already means every node; write it alone"),
        );
        return None;
    }
    Some(names)
}

/// A node named in several lists must be named consistently.
fn check_node_lists(
    p: &mut FileProblems<'_>,
    raw: &RawKeys,
    allowable: &[String],
    disallowable: &[String],
    preferred: &[String],
) {
    let any = allowable.iter().any(|n| n == "*");
    let span = |v: &Option<Spanned<Value>>| v.as_ref().map_or(0..0, |v| v.span());
    for name in disallowable {
        if allowable.contains(name) {
            p.at(
                span(&raw.disallowable_nodes),
                format!("node `{name}` is in both `allowable_nodes` and `disallowable_nodes`"),
            );
        }
    }
    for name in preferred {
        if disallowable.contains(name) {
            p.at(
                span(&raw.preferred_nodes),
                format!("node `{name}` is in both `preferred_nodes` and `disallowable_nodes`"),
            );
        } else if !any && !allowable.contains(name) {
            p.at(
                span(&raw.preferred_nodes),
                format!("preferred node `{name}` is not in `allowable_nodes`, so the service may not run there"),
            );
        }
    }
}

fn command_key(
    p: &mut FileProblems<'_>,
    key: &str,
    value: &Option<Spanned<Value>>,
) -> Option<String> {
    let v = value.as_ref()?;
    match v.get_ref().as_str() {
        Some(s) if !s.trim().is_empty() => Some(s.to_owned()),
        Some(_) => {
            p.at(
                v.span(),
                format!("key `{key}` is empty: give a shell command or leave the key out"),
            );
            None
        }
        None => {
            p.at(
                v.span(),
                format!("key `{key}` must be a shell command (a string)"),
            );
            None
        }
    }
}

/// The local part: the header, then `text` with its cluster keys blanked (their lines kept,
/// empty, so that line numbers map back) and its relative paths made absolute against `base`.
fn local_text(text: &str, raw: &RawKeys, base: &Path, name: &str, node: &str) -> String {
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let newlines = |r: &Range<usize>| "\n".repeat(text[r.clone()].matches('\n').count());
    for v in [
        &raw.allowable_nodes,
        &raw.disallowable_nodes,
        &raw.preferred_nodes,
        &raw.placement,
        &raw.maturity_count,
        &raw.maturity_time,
        &raw.transfer_cost,
        &raw.notify_command,
        &raw.recovery_command,
        &raw.auto_start,
        &raw.port,
    ]
    .into_iter()
    .flatten()
    {
        // A top-level key starts its line (TOML puts each key/value pair on a line of its own,
        // and the value starts on the key's line), so blank from the line's start.
        let span = v.span();
        let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let range = start..span.end;
        let keep = newlines(&range);
        edits.push((range, keep));
    }
    let absolute = |p: &str| base.join(p).to_string_lossy().into_owned();
    for v in [&raw.working_dir, &raw.env_file].into_iter().flatten() {
        if let Some(p) = v.get_ref().as_str()
            && !p.starts_with('/')
        {
            let replacement = Value::String(absolute(p)).to_string();
            edits.push((v.span(), replacement + &newlines(&v.span())));
        }
    }
    if let Some(v) = &raw.command {
        let relative = |w: &str| w.contains('/') && !w.starts_with('/');
        match v.get_ref() {
            Value::Array(argv) => {
                if let Some(first) = argv.first().and_then(Value::as_str)
                    && relative(first)
                {
                    let mut argv = argv.clone();
                    argv[0] = Value::String(absolute(first));
                    let replacement = Value::Array(argv).to_string();
                    edits.push((v.span(), replacement + &newlines(&v.span())));
                }
            }
            Value::String(line) => {
                // Only a plain first word: one with quotes or escapes is left as written.
                let first = line.split_whitespace().next().unwrap_or_default();
                let plain = !first.contains(['\'', '"', '\\', '$', '`']);
                if relative(first) && plain {
                    let at = line.find(first).unwrap_or(0);
                    let rewritten = format!(
                        "{}{}{}",
                        &line[..at],
                        absolute(first),
                        &line[at + first.len()..]
                    );
                    let replacement = Value::String(rewritten).to_string();
                    edits.push((v.span(), replacement + &newlines(&v.span())));
                }
            }
            _ => {}
        }
    }
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut body = text.to_owned();
    for (range, replacement) in edits {
        body.replace_range(range, &replacement);
    }
    let mut out = agent_header(name, node);
    out.push('\n');
    out.push_str(&body);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Runs ccmgr's own loader (`ccmgr --config T check`) on the local parts of `specs`, in a
/// temporary directory with a minimal `ccmgr.toml`. A service another one `requires` (or is
/// ordered against) that is not among `specs` gets a stand-in file, since a cluster service
/// may require a local service of the node. Exit 2: ccmgr's message, with the temporary file
/// names and lines replaced by the cluster files' names and lines.
pub fn check_with_ccmgr(ccmgr: &Path, specs: &[ClusterServiceSpec]) -> Result<(), String> {
    let dir = TempDir::new().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let services = dir.0.join("services.d");
    let write = |path: &Path, text: &str| {
        fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    fs::create_dir(&services).map_err(|e| format!("cannot create {}: {e}", services.display()))?;
    let config = dir.0.join("ccmgr.toml");
    write(
        &config,
        "instance = \"cluster-check\"\nservices_dir = \"services.d\"\n",
    )?;
    let mut stand_ins = std::collections::BTreeSet::new();
    for spec in specs {
        write(
            &services.join(format!("{}.toml", spec.name)),
            &spec.local_toml,
        )?;
        if let Ok(table) = spec.local_toml.parse::<toml::Table>() {
            for key in ["requires", "after", "before"] {
                let names = table.get(key).and_then(Value::as_array);
                for dep in names.into_iter().flatten().filter_map(Value::as_str) {
                    if !specs.iter().any(|s| s.name == dep) && check_id(dep).is_ok() {
                        stand_ins.insert(dep.to_owned());
                    }
                }
            }
        }
    }
    for dep in &stand_ins {
        write(
            &services.join(format!("{dep}.toml")),
            "# a stand-in for a local service of the node\ncommand = [\"/bin/true\"]\n",
        )?;
    }
    let out = std::process::Command::new(ccmgr)
        .arg("--config")
        .arg(&config)
        .arg("check")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ccmgr.display()))?;
    match out.status.code() {
        Some(0) => Ok(()),
        Some(2) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            for spec in specs {
                let temp = services.join(format!("{}.toml", spec.name));
                text = map_file_name(&text, &temp.to_string_lossy(), &spec.source);
            }
            Err(text.trim_end().to_owned())
        }
        _ => Err(format!(
            "`{} check` failed ({}): {}",
            ccmgr.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        )),
    }
}

/// Replaces `temp` by `source` in `text`; a `temp:LINE` becomes `source:LINE-1` (the local
/// part's header line is not in the cluster file).
fn map_file_name(text: &str, temp: &str, source: &Path) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(temp) {
        out.push_str(&rest[..at]);
        out.push_str(&source.to_string_lossy());
        rest = &rest[at + temp.len()..];
        if let Some(after) = rest.strip_prefix(':') {
            let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if let Ok(line) = after[..digits].parse::<usize>() {
                let _ = write!(out, ":{}", line.saturating_sub(1).max(1));
                rest = &after[digits..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A temporary directory removed on drop (tempfile is only a dev-dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "ccmgr-cluster-check-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

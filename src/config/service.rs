//! Service files: one `*.toml` per service in the services directory.
//!
//! This module owns the schema of a service file, the drop-in rule for which files count, and
//! the resolution of everything that can be checked without running anything: the id, the
//! program (found on disk now, so a typo fails `ccmgr check` rather than a boot), users and
//! groups, the stop signal and the env file. What a service file says about other services
//! (`requires`, `wants`, `after`, `before`) is checked by [`super::load`] once every file is read.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::sys::signal::Signal;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use crate::diag::{Diagnostic, Diagnostics};
use crate::duration::ConfigDuration;

/// The longest service id: ids name log files and fixed-size records in the shared segment.
pub const MAX_ID_LEN: usize = crate::shm::layout::SERVICE_ID_MAX;

/// When a started service counts as up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadyKind {
    /// Up as soon as exec succeeded.
    #[default]
    Started,
    /// A one-shot task: up when it exits with status 0.
    Exit,
    /// Up when it sends `READY=1` on `$NOTIFY_SOCKET` (the sd_notify protocol).
    Notify,
    /// Up when it calls the service API's `ready`.
    Cc,
}

/// Whether a service that ended is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after a crash, a non-zero exit or a kill by a signal; a clean exit 0 stays down.
    #[default]
    OnFailure,
    /// Restart whenever it ends.
    Always,
    /// Never restart: the service stays down and what requires it is stopped.
    Never,
}

/// A signal named in configuration (`"SIGTERM"`, `"TERM"`, `"SIGHUP"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalName(pub Signal);

impl FromStr for SignalName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        Signal::from_str(&full).map(SignalName).map_err(|_| {
            format!("unknown signal `{s}` (write a name such as \"SIGTERM\" or \"SIGINT\")")
        })
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl Serialize for SignalName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for SignalName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

/// A user or group that exists on this machine, resolved at load time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub id: u32,
}

/// A user or group as written: a name, or a numeric id, in either TOML form (`user = "nobody"`,
/// `user = 65534`, `user = "65534"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountRef {
    Name(String),
    Id(u32),
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountRef::Name(name) => f.write_str(name),
            AccountRef::Id(id) => write!(f, "{id}"),
        }
    }
}

impl<'de> Deserialize<'de> for AccountRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AccountVisitor;

        impl Visitor<'_> for AccountVisitor {
            type Value = AccountRef;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a name (a string) or a numeric id (an integer)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(match v.parse::<u32>() {
                    Ok(id) => AccountRef::Id(id),
                    Err(_) => AccountRef::Name(v.to_owned()),
                })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u32::try_from(v).map(AccountRef::Id).map_err(|_| {
                    E::custom(format!(
                        "{v} is not a user or group id: ids run from 0 to {}",
                        u32::MAX
                    ))
                })
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }

        deserializer.deserialize_any(AccountVisitor)
    }
}

/// A service, validated and resolved: what the coordinator needs to run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: String,
    pub description: Option<String>,
    /// The file this service comes from.
    pub source: PathBuf,
    /// argv as written (argv[0] included).
    pub command: Vec<String>,
    /// The program to execute, resolved to an absolute path at load.
    pub program: PathBuf,
    pub requires: Vec<String>,
    /// Started before it and waited for, but its failure or absence neither fails nor stops
    /// it. May name ids that are no service (a warning at load; such an id is ignored).
    #[serde(default)]
    pub wants: Vec<String>,
    pub after: Vec<String>,
    /// These start after this service (the reverse of their `after`).
    #[serde(default)]
    pub before: Vec<String>,
    pub ready: ReadyKind,
    pub cc_arg: bool,
    pub startup_timeout: ConfigDuration,
    pub shutdown_timeout: ConfigDuration,
    pub stop_signal: SignalName,
    pub restart: RestartPolicy,
    pub restart_delay: ConfigDuration,
    pub restart_delay_max: ConfigDuration,
    /// How long it must run, once ready, to count as up: an end before that is a failed start
    /// (supervisord's `startsecs`, pm2's `min_uptime`).
    #[serde(default)]
    pub min_uptime: ConfigDuration,
    pub user: Option<Account>,
    pub group: Option<Account>,
    pub working_dir: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub env_file: Option<PathBuf>,
    /// A shell command run (by the keeper, `/bin/sh -c`) each time this service fails, with
    /// the failure in its environment (see the README, "Events").
    #[serde(default)]
    pub on_failure_command: Option<String>,
}

/// A command: an argv array, or a string split into words as a shell would (no shell runs).
#[derive(Clone, Debug, PartialEq, Eq)]
enum CommandLine {
    Argv(Vec<String>),
    Line(String),
}

impl<'de> Deserialize<'de> for CommandLine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandVisitor;

        impl<'de> Visitor<'de> for CommandVisitor {
            type Value = CommandLine;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a command: an array of strings, or a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CommandLine::Line(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut argv = Vec::new();
                while let Some(word) = seq.next_element::<String>()? {
                    argv.push(word);
                }
                Ok(CommandLine::Argv(argv))
            }
        }

        deserializer.deserialize_any(CommandVisitor)
    }
}

/// The schema of a service file, exactly as written. Unknown keys are errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    id: Option<Spanned<String>>,
    description: Option<String>,
    command: Spanned<CommandLine>,
    #[serde(default)]
    requires: Vec<Spanned<String>>,
    #[serde(default)]
    wants: Vec<Spanned<String>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    #[serde(default)]
    before: Vec<Spanned<String>>,
    #[serde(default)]
    ready: ReadyKind,
    #[serde(default)]
    cc_arg: bool,
    startup_timeout: Option<ConfigDuration>,
    shutdown_timeout: Option<ConfigDuration>,
    stop_signal: Option<Spanned<String>>,
    #[serde(default)]
    restart: RestartPolicy,
    restart_delay: Option<ConfigDuration>,
    restart_delay_max: Option<ConfigDuration>,
    min_uptime: Option<Spanned<ConfigDuration>>,
    user: Option<Spanned<AccountRef>>,
    group: Option<Spanned<AccountRef>>,
    working_dir: Option<Spanned<PathBuf>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    env_file: Option<Spanned<PathBuf>>,
    on_failure_command: Option<Spanned<String>>,
}

/// Documented defaults of a service file.
pub mod defaults {
    use crate::duration::ConfigDuration;

    pub const STARTUP_TIMEOUT: ConfigDuration = ConfigDuration::from_millis(30_000);
    pub const SHUTDOWN_TIMEOUT: ConfigDuration = ConfigDuration::from_millis(10_000);
    pub const RESTART_DELAY: ConfigDuration = ConfigDuration::from_millis(100);
    pub const RESTART_DELAY_MAX: ConfigDuration = ConfigDuration::from_millis(10_000);
    /// Up as soon as ready: see the README ("min_uptime") for why not more.
    pub const MIN_UPTIME: ConfigDuration = ConfigDuration::from_millis(0);
    pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

/// Remembers where bare program names were found during one load: stacks name the same few
/// programs many times, and each PATH search costs a `stat` per PATH entry.
#[derive(Default)]
pub(super) struct ProgramCache(
    std::collections::HashMap<(String, Option<String>), Result<PathBuf, String>>,
);

impl ProgramCache {
    fn find(
        &mut self,
        argv0: &str,
        base: &Path,
        path_var: Option<&str>,
    ) -> Result<PathBuf, String> {
        if argv0.contains('/') {
            // A path depends on the base directory; it is one `stat`, not worth caching.
            return find_program(argv0, base, path_var);
        }
        self.0
            .entry((argv0.to_owned(), path_var.map(str::to_owned)))
            .or_insert_with(|| find_program(argv0, base, path_var))
            .clone()
    }
}

/// A service file that parsed, with the spans of its references to other services, which
/// [`super::load`] checks once every file is known.
pub(super) struct ParsedService {
    pub spec: ServiceSpec,
    pub source_text: String,
    pub requires_spans: Vec<std::ops::Range<usize>>,
    pub wants_spans: Vec<std::ops::Range<usize>>,
    pub after_spans: Vec<std::ops::Range<usize>>,
    pub before_spans: Vec<std::ops::Range<usize>>,
    pub id_span: Option<std::ops::Range<usize>>,
}

/// The drop-in rule: `*.toml` directly in the directory, no dotfiles, no editor leftovers;
/// `web.toml.disabled`, `web.toml~`, `.web.toml.swp` and subdirectories not named `*.toml`
/// are ignored.
pub fn is_service_file_name(name: &str) -> bool {
    !name.starts_with('.') && name.len() > ".toml".len() && name.ends_with(".toml")
}

/// The service files of `dir`, sorted by name so every run sees the same order, and an error
/// for every entry named like a service file that is not one (see [`super::files`]): such an
/// entry is never silently skipped, or its service would be lost without a word.
pub fn list_service_files(dir: &Path) -> Result<(Vec<PathBuf>, Vec<Diagnostic>), Diagnostic> {
    let entries = fs::read_dir(dir).map_err(|e| {
        Diagnostic::in_file(
            Some(dir),
            format!("cannot read the services directory: {e}"),
        )
    })?;
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            Diagnostic::in_file(
                Some(dir),
                format!("cannot read the services directory: {e}"),
            )
        })?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            if name.as_encoded_bytes().ends_with(b".toml") {
                problems.push(Diagnostic::in_file(
                    Some(&path),
                    "the file name is not valid UTF-8, so it cannot name a service",
                ));
            }
            continue;
        };
        if !is_service_file_name(name) {
            continue;
        }
        // A symlink to a regular file counts (the drop-in convention); anything else is named.
        match super::files::check_regular(&path) {
            Ok(()) => files.push(path),
            Err(e) => problems.push(Diagnostic::in_file(
                Some(&path),
                format!("the service file {e}"),
            )),
        }
    }
    files.sort();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, problems))
}

/// Whether `id` may name a service: `[A-Za-z0-9_.@-]`, 1 to 64 bytes, not starting with `.`
/// or `-` (it becomes a file name and a command-line word).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!(
            "service id `{id}` must be 1 to {MAX_ID_LEN} characters long"
        ));
    }
    if id.starts_with(['.', '-'])
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'))
    {
        return Err(format!(
            "service id `{id}` may hold only letters, digits, `_`, `.`, `@` and `-`, and may not start with `.` or `-`"
        ));
    }
    Ok(())
}

/// Reads and resolves one service file. `base_dir` resolves relative paths (the services
/// directory). Pushes every problem found into `diags`; returns `None` if the file is unusable.
pub(super) fn parse_service_file(
    path: &Path,
    base_dir: &Path,
    programs: &mut ProgramCache,
    diags: &mut Diagnostics,
) -> Option<ParsedService> {
    let text = match super::files::read_regular(path) {
        Ok(text) => text,
        Err(e) => {
            diags.push(Diagnostic::in_file(
                Some(path),
                format!("the service file {e}"),
            ));
            return None;
        }
    };
    let raw: RawService = match toml::from_str(&text) {
        Ok(raw) => raw,
        Err(e) => {
            diags.push(super::toml_error(path, &text, &e));
            return None;
        }
    };
    let before = diags.len();
    let at =
        |span: std::ops::Range<usize>, msg: String| Diagnostic::at_span(path, &text, span, msg);

    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    let (id, id_span) = match &raw.id {
        Some(id) => (id.get_ref().clone(), Some(id.span())),
        None => (stem, None),
    };
    if let Err(msg) = check_id(&id) {
        let d = match &id_span {
            Some(span) => at(span.clone(), msg),
            None => Diagnostic::in_file(Some(path), msg)
                .with_note("the id is the file name without `.toml`: rename the file or set `id`"),
        };
        diags.push(d);
    }

    let command_span = raw.command.span();
    let command = match raw.command.into_inner() {
        CommandLine::Argv(argv) => argv,
        CommandLine::Line(line) => match shell_words::split(&line) {
            Ok(words) => words,
            Err(e) => {
                diags.push(at(
                    command_span.clone(),
                    format!("cannot split `command` into words: {e}"),
                ));
                Vec::new()
            }
        },
    };
    if let Some(i) = command.iter().position(|word| word.contains('\0')) {
        diags.push(at(
            command_span.clone(),
            format!("key `command`: {}", holds_nul(&format!("argument {i}"))),
        ));
    }
    let working_dir = raw.working_dir.as_ref().and_then(|d| {
        if has_nul(d.get_ref()) {
            diags.push(at(
                d.span(),
                format!("key `working_dir`: {}", holds_nul("the path")),
            ));
            return None;
        }
        Some(absolutize(base_dir, d.get_ref()))
    });
    for (key, value) in &raw.env {
        let shown = key.escape_debug();
        if key.is_empty() || key.contains('=') {
            diags.push(at(
                value.span(),
                format!(
                    "key `env.{shown}`: an environment variable name may not be empty or hold `=`"
                ),
            ));
        } else if key.contains('\0') {
            diags.push(at(
                value.span(),
                format!("key `env.{shown}`: {}", holds_nul("the variable name")),
            ));
        } else if value.get_ref().contains('\0') {
            diags.push(at(
                value.span(),
                format!("key `env.{shown}`: {}", holds_nul("the value")),
            ));
        }
    }
    let env: BTreeMap<String, String> = raw
        .env
        .into_iter()
        .map(|(key, value)| (key, value.into_inner()))
        .collect();
    let env_file = raw.env_file.as_ref().and_then(|f| {
        if has_nul(f.get_ref()) {
            diags.push(at(
                f.span(),
                format!("key `env_file`: {}", holds_nul("the path")),
            ));
            return None;
        }
        let resolved = absolutize(base_dir, f.get_ref());
        if let Err(e) = read_env_file(&resolved) {
            diags.push(at(f.span(), format!("key `env_file`: {e}")));
        }
        Some(resolved)
    });
    let program = match command.first() {
        // Already reported: a path with a NUL cannot even be looked up.
        Some(argv0) if argv0.contains('\0') => PathBuf::new(),
        None => {
            if diags.len() == before {
                diags.push(at(
                    command_span.clone(),
                    "key `command` is empty: name a program to run".into(),
                ));
            }
            PathBuf::new()
        }
        Some(argv0) => {
            let path_var = env
                .get("PATH")
                .cloned()
                .or_else(|| std::env::var("PATH").ok());
            let search_base = working_dir.as_deref().unwrap_or(base_dir);
            match programs.find(argv0, search_base, path_var.as_deref()) {
                Ok(p) => p,
                Err(msg) => {
                    diags.push(at(command_span.clone(), format!("key `command`: {msg}")));
                    PathBuf::new()
                }
            }
        }
    };
    let stop_signal = match &raw.stop_signal {
        None => SignalName(Signal::SIGTERM),
        Some(s) => s.get_ref().parse().unwrap_or_else(|msg: String| {
            diags.push(at(s.span(), format!("key `stop_signal`: {msg}")));
            SignalName(Signal::SIGTERM)
        }),
    };
    let user = raw.user.as_ref().and_then(|u| {
        resolve_user(u.get_ref())
            .map_err(|msg| diags.push(at(u.span(), format!("key `user`: {msg}"))))
            .ok()
    });
    let group = raw.group.as_ref().and_then(|g| {
        resolve_group(g.get_ref())
            .map_err(|msg| diags.push(at(g.span(), format!("key `group`: {msg}"))))
            .ok()
    });
    let restart_delay = raw.restart_delay.unwrap_or(defaults::RESTART_DELAY);
    let restart_delay_max = raw.restart_delay_max.unwrap_or(defaults::RESTART_DELAY_MAX);
    if restart_delay_max < restart_delay {
        diags.push(Diagnostic::in_file(
            Some(path),
            format!(
                "restart_delay_max ({restart_delay_max}) is shorter than restart_delay ({restart_delay})"
            ),
        ));
    }
    let min_uptime = match &raw.min_uptime {
        None => defaults::MIN_UPTIME,
        Some(m) => {
            let value = *m.get_ref();
            if raw.ready == ReadyKind::Exit && value != defaults::MIN_UPTIME {
                diags.push(at(
                    m.span(),
                    format!(
                        "key `min_uptime` ({value}) has no meaning for a one-shot task (ready = \"exit\"): it is up when it exits with status 0"
                    ),
                ));
            }
            value
        }
    };
    if let Some(hook) = &raw.on_failure_command {
        let text = hook.get_ref();
        if text.contains('\0') {
            diags.push(at(
                hook.span(),
                "key `on_failure_command` holds a NUL byte, which no command line can carry".into(),
            ));
        } else if text.trim().is_empty() {
            diags.push(at(
                hook.span(),
                "key `on_failure_command` is empty: leave it out, or give a shell command".into(),
            ));
        }
    }
    if diags.len() != before {
        return None;
    }
    Some(ParsedService {
        spec: ServiceSpec {
            id,
            description: raw.description,
            source: path.to_path_buf(),
            command,
            program,
            requires: raw.requires.iter().map(|s| s.get_ref().clone()).collect(),
            wants: raw.wants.iter().map(|s| s.get_ref().clone()).collect(),
            after: raw.after.iter().map(|s| s.get_ref().clone()).collect(),
            before: raw.before.iter().map(|s| s.get_ref().clone()).collect(),
            ready: raw.ready,
            cc_arg: raw.cc_arg,
            startup_timeout: raw.startup_timeout.unwrap_or(defaults::STARTUP_TIMEOUT),
            shutdown_timeout: raw.shutdown_timeout.unwrap_or(defaults::SHUTDOWN_TIMEOUT),
            stop_signal,
            restart: raw.restart,
            restart_delay,
            restart_delay_max,
            min_uptime,
            user,
            group,
            working_dir,
            env,
            env_file,
            on_failure_command: raw.on_failure_command.map(Spanned::into_inner),
        },
        requires_spans: raw.requires.iter().map(Spanned::span).collect(),
        wants_spans: raw.wants.iter().map(Spanned::span).collect(),
        after_spans: raw.after.iter().map(Spanned::span).collect(),
        before_spans: raw.before.iter().map(Spanned::span).collect(),
        id_span,
        source_text: text,
    })
}

/// Whether a path holds a NUL byte, which no system call can take.
pub(crate) fn has_nul(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().contains(&0)
}

/// The sentence for a string that `start` could not hand to the kernel.
pub(crate) fn holds_nul(what: &str) -> String {
    format!(
        "{what} holds a NUL byte (\\0); the kernel takes arguments, environment strings and paths as NUL-terminated strings, so `start` could not pass it on"
    )
}

fn absolutize(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn is_executable_file(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the program the way `execvp` would: a name with a `/` is a path (relative to
/// `base`), a bare name is searched in `path_var` (or the default PATH).
pub fn find_program(argv0: &str, base: &Path, path_var: Option<&str>) -> Result<PathBuf, String> {
    if argv0.contains('/') {
        let p = absolutize(base, Path::new(argv0));
        return if is_executable_file(&p) {
            Ok(p)
        } else if p.exists() {
            Err(format!(
                "program `{}` is not an executable file",
                p.display()
            ))
        } else {
            Err(format!("program `{}` does not exist", p.display()))
        };
    }
    let search = path_var.unwrap_or(defaults::PATH);
    search
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(argv0))
        .find(|p| is_executable_file(p))
        .ok_or_else(|| format!("program `{argv0}` is not found in PATH ({search})"))
}

/// The user `user` names, which must exist on this machine.
pub fn resolve_user(user: &AccountRef) -> Result<Account, String> {
    let found = match user {
        AccountRef::Id(uid) => nix::unistd::User::from_uid((*uid).into()),
        AccountRef::Name(name) => nix::unistd::User::from_name(name),
    };
    match found {
        Ok(Some(u)) => Ok(Account {
            name: u.name,
            id: u.uid.as_raw(),
        }),
        Ok(None) => Err(format!("no user `{user}` on this machine")),
        Err(e) => Err(format!("cannot look up user `{user}`: {e}")),
    }
}

/// The group `group` names, which must exist on this machine.
pub fn resolve_group(group: &AccountRef) -> Result<Account, String> {
    let found = match group {
        AccountRef::Id(gid) => nix::unistd::Group::from_gid((*gid).into()),
        AccountRef::Name(name) => nix::unistd::Group::from_name(name),
    };
    match found {
        Ok(Some(g)) => Ok(Account {
            name: g.name,
            id: g.gid.as_raw(),
        }),
        Ok(None) => Err(format!("no group `{group}` on this machine")),
        Err(e) => Err(format!("cannot look up group `{group}`: {e}")),
    }
}

/// Reads an env file: `KEY=VALUE` lines; blank lines and `#` comments skipped; an optional
/// `export ` prefix; a value in matching single or double quotes loses them.
pub fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = super::files::read_regular(path).map_err(|e| format!("`{}` {e}", path.display()))?;
    parse_env_text(&text).map_err(|(line, msg)| format!("{}:{line}: {msg}", path.display()))
}

fn parse_env_text(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err((n + 1, format!("expected KEY=VALUE, found `{line}`")));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((n + 1, format!("`{key}` is not a variable name")));
        }
        let value = value.trim();
        if value.contains('\0') {
            return Err((n + 1, holds_nul(&format!("the value of `{key}`"))));
        }
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        vars.push((key.to_owned(), unquoted.to_owned()));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_in_rule() {
        for name in ["web.toml", "a.b.toml", "x@1.toml"] {
            assert!(is_service_file_name(name), "{name}");
        }
        for name in [
            ".web.toml",
            "web.toml.disabled",
            "web.toml~",
            ".web.toml.swp",
            "web.txt",
            ".toml",
            "toml",
        ] {
            assert!(!is_service_file_name(name), "{name}");
        }
    }

    #[test]
    fn ids() {
        for ok in ["web", "db-1", "x_y.z", "getty@tty1", &"a".repeat(64)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signal_names() {
        assert_eq!("SIGTERM".parse::<SignalName>().unwrap().0, Signal::SIGTERM);
        assert_eq!("hup".parse::<SignalName>().unwrap().0, Signal::SIGHUP);
        assert_eq!("INT".parse::<SignalName>().unwrap().0, Signal::SIGINT);
        assert!("SIGBOGUS".parse::<SignalName>().is_err());
    }

    #[test]
    fn env_text() {
        let vars = parse_env_text("# c\n\nA=1\nexport B = \"two words\"\nC='x'\nD=\n").unwrap();
        assert_eq!(
            vars,
            [("A", "1"), ("B", "two words"), ("C", "x"), ("D", "")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(parse_env_text("A=1\nnonsense\n").unwrap_err().0, 2);
        assert_eq!(parse_env_text("A-B=1").unwrap_err().0, 1);
    }

    #[test]
    fn programs_are_found_like_execvp() {
        let sh = find_program("sh", Path::new("/"), Some("/nonexistent:/bin")).unwrap();
        assert_eq!(sh, Path::new("/bin/sh"));
        assert!(find_program("sh", Path::new("/"), Some("/nonexistent")).is_err());
        assert_eq!(
            find_program("/bin/sh", Path::new("/x"), None).unwrap(),
            Path::new("/bin/sh")
        );
        assert!(find_program("./sh", Path::new("/bin"), None).is_ok());
        let err = find_program("/etc/passwd", Path::new("/"), None).unwrap_err();
        assert!(err.contains("not an executable"), "{err}");
    }
}

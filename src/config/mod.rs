//! Configuration: the global `ccmgr.toml` and the service files, loaded and checked as one.
//!
//! This module owns where the configuration is found (`--config`, `$CCMGR_CONFIG`,
//! `/etc/ccmgr/ccmgr.toml`), the schema and defaults of the global file, and the single loader
//! that `check`, `start` and a coordinator taking over all use: it reads every file, collects
//! every problem (file, line, column, key) before failing, checks references between services,
//! builds the dependency graph and settles the startup and shutdown sequences.

pub mod files;
pub mod service;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::diag::{Diagnostic, Diagnostics, key_at};
use crate::duration::ConfigDuration;
use crate::graph::{EdgeKind, SequenceKind, ServiceGraph};
use crate::shm::layout::{MAX_CONFIG_BLOB, MAX_SERVICES};
pub use crate::vocab::Takeover;
pub use service::{Account, AccountRef, ReadyKind, RestartPolicy, ServiceSpec, SignalName};

/// Where the global config is looked for when neither `--config` nor `$CCMGR_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ccmgr/ccmgr.toml";
/// The environment variable naming the global config.
pub const CONFIG_ENV: &str = "CCMGR_CONFIG";
/// The longest instance name (it names shared-memory objects and runtime files).
pub const MAX_INSTANCE_LEN: usize = 64;

/// What the coordinator does when a service fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Stop what requires the failed service, restart it and them; leave the rest running.
    #[default]
    RestartDependents,
    /// Stop everything in shutdown order and start everything again (the original design).
    RestartAll,
}

/// The `[coordinator]` table: the original design's daemon table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorConfig {
    pub startup_timeout: ConfigDuration,
    pub shutdown_timeout: ConfigDuration,
    pub restart_retry_counter: u32,
    pub restart_time_span: ConfigDuration,
    pub on_failure: OnFailure,
    pub standby: bool,
    pub takeover: Takeover,
    pub startup_sequence: Option<Vec<String>>,
    pub shutdown_sequence: Option<Vec<String>>,
    /// Opt-in: the coordinator sends the keeper a sign of life each period, and the keeper
    /// takes a silence of two periods for death. Off (None, or zero) by default, so that an
    /// idle stack makes no wakeups.
    #[serde(default)]
    pub watchdog: Option<ConfigDuration>,
    /// A shell command run (by the keeper) whenever a service fails or the instance gives up,
    /// beside the service's own `on_failure_command`.
    #[serde(default)]
    pub on_failure_command: Option<String>,
    /// How long a failure command may run before its process group is killed.
    #[serde(default = "default_on_failure_timeout")]
    pub on_failure_timeout: ConfigDuration,
}

fn default_on_failure_timeout() -> ConfigDuration {
    ConfigDuration::from_millis(10_000)
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            startup_timeout: ConfigDuration::from_millis(250_000),
            shutdown_timeout: ConfigDuration::from_millis(250_000),
            restart_retry_counter: 5,
            restart_time_span: ConfigDuration::from_millis(60_000),
            on_failure: OnFailure::default(),
            standby: true,
            takeover: Takeover::default(),
            startup_sequence: None,
            shutdown_sequence: None,
            watchdog: None,
            on_failure_command: None,
            on_failure_timeout: default_on_failure_timeout(),
        }
    }
}

/// The global configuration, with every path resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalConfig {
    /// The file read, if any (a missing default file means "all defaults").
    pub source: Option<PathBuf>,
    pub instance: String,
    pub services_dir: PathBuf,
    pub log_dir: PathBuf,
    pub run_dir: PathBuf,
    /// A group whose members may read the instance's status (segment mode 0640 instead of 0600),
    /// never write it.
    pub group: Option<Account>,
    pub coordinator: CoordinatorConfig,
}

/// The global file as written. Unknown keys are errors.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    instance: Option<Spanned<String>>,
    services_dir: Option<Spanned<PathBuf>>,
    log_dir: Option<Spanned<PathBuf>>,
    run_dir: Option<Spanned<PathBuf>>,
    group: Option<Spanned<service::AccountRef>>,
    #[serde(default)]
    coordinator: RawCoordinator,
    // The cluster layer's settings: read by ccmgr-cluster (the node agent, `ccmgr cluster`),
    // which checks them; ccmgr itself only accepts a table here, so that one file configures
    // both, while any other unknown key stays an error.
    #[serde(default)]
    #[allow(dead_code)]
    cluster: Option<toml::Table>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    startup_timeout: Option<ConfigDuration>,
    shutdown_timeout: Option<ConfigDuration>,
    restart_retry_counter: Option<Spanned<u32>>,
    restart_time_span: Option<Spanned<ConfigDuration>>,
    on_failure: Option<OnFailure>,
    standby: Option<bool>,
    takeover: Option<Takeover>,
    startup_sequence: Option<Spanned<Vec<Spanned<String>>>>,
    shutdown_sequence: Option<Spanned<Vec<Spanned<String>>>>,
    watchdog: Option<ConfigDuration>,
    on_failure_command: Option<Spanned<String>>,
    on_failure_timeout: Option<Spanned<ConfigDuration>>,
}

/// What the command line says about finding the configuration.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `--config PATH`.
    pub config_path: Option<PathBuf>,
    /// `--instance NAME`, overriding the file.
    pub instance: Option<String>,
    /// `--services-dir DIR`, overriding the file.
    pub services_dir: Option<PathBuf>,
}

/// A complete, checked configuration: the global settings, the services, their graph and the
/// sequences the coordinator follows.
#[derive(Clone, Debug)]
pub struct Config {
    pub global: GlobalConfig,
    /// Services sorted by id; a service's index here is its index everywhere else.
    pub services: Vec<ServiceSpec>,
    pub graph: ServiceGraph,
    pub startup_sequence: Vec<usize>,
    pub shutdown_sequence: Vec<usize>,
    /// True when `startup_sequence` was given explicitly: then services start strictly one at
    /// a time in that order, as in the original design, instead of level by level.
    pub explicit_startup: bool,
    /// What the load noticed but accepts (a `wants` naming no service, as systemd's `Wants=`
    /// allows): printed as warnings by every verb that loads the files. Empty when the
    /// configuration comes from a segment's image.
    pub warnings: Diagnostics,
}

impl Config {
    /// Loads and checks everything the options point at.
    pub fn load(options: &LoadOptions) -> Result<Config, Diagnostics> {
        let mut diags = Diagnostics::default();
        let (global, sequence_spans) = load_global(options, &mut diags);
        let Some(global) = global else {
            return Err(diags);
        };
        // Ids of files that failed: a reference to one of them is not also "unknown".
        let mut broken = std::collections::HashSet::new();
        let stem = |p: &Path| {
            p.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        };
        let files = match service::list_service_files(&global.services_dir) {
            Ok((files, problems)) => {
                for d in problems {
                    broken.extend(d.path.as_deref().map(stem));
                    diags.push(d);
                }
                files
            }
            Err(d) => {
                diags.push(d);
                return Err(diags);
            }
        };
        let mut parsed = Vec::with_capacity(files.len());
        let mut programs = service::ProgramCache::default();
        for file in &files {
            match service::parse_service_file(file, &global.services_dir, &mut programs, &mut diags)
            {
                Some(p) => parsed.push(p),
                None => {
                    broken.insert(stem(file));
                }
            }
        }
        let config = assemble(global, parsed, &broken, &sequence_spans, &mut diags);
        if let Some(config) = &config {
            check_start_limits(config, &sequence_spans, &mut diags);
            check_retry_window(config, &sequence_spans, &mut diags);
        }
        match config {
            Some(config) if diags.is_empty() => Ok(config),
            _ => Err(diags),
        }
    }

    pub fn service_index(&self, id: &str) -> Option<usize> {
        self.services
            .binary_search_by(|s| s.id.as_str().cmp(id))
            .ok()
    }

    /// The levels the coordinator starts in: the graph's levels, or one service per step when
    /// the startup sequence is explicit.
    pub fn start_steps(&self) -> Vec<Vec<usize>> {
        if self.explicit_startup {
            self.startup_sequence.iter().map(|&s| vec![s]).collect()
        } else {
            self.graph.levels().to_vec()
        }
    }
}

/// The configuration as copied into the shared segment: whoever reads it back (the keeper,
/// the coordinator, a standby taking over) runs exactly the stack that was started, however
/// the files on disk changed since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigImage {
    pub global: GlobalConfig,
    pub services: Vec<ServiceSpec>,
}

/// [`ConfigImage`] borrowed, field for field, to serialise it without copying the services.
#[derive(Serialize)]
struct ConfigImageRef<'a> {
    global: &'a GlobalConfig,
    services: &'a [ServiceSpec],
}

impl Config {
    /// The serialised image of this configuration.
    pub fn to_image(&self) -> Vec<u8> {
        serde_json::to_vec(&self.image_ref()).expect("a configuration always serialises")
    }

    /// A [`ConfigImage`] made of borrows: it serialises the same, without a copy.
    fn image_ref(&self) -> ConfigImageRef<'_> {
        ConfigImageRef {
            global: &self.global,
            services: &self.services,
        }
    }

    /// The length of [`Config::to_image`], counted without building the image.
    pub fn image_len(&self) -> u64 {
        /// Counts what is written and keeps none of it.
        struct Counter(u64);
        impl std::io::Write for Counter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut counter = Counter(0);
        serde_json::to_writer(&mut counter, &self.image_ref())
            .expect("a configuration always serialises");
        counter.0
    }

    /// The global settings of an image alone: the services are skipped as they are read,
    /// never built, so a process that needs only a path (the coordinator's log) does not
    /// hold, or even allocate, what grows with the stack.
    pub fn global_from_image(bytes: &[u8]) -> Result<GlobalConfig, String> {
        /// [`ConfigImage`] without its services (serde skips fields a struct does not name).
        #[derive(Deserialize)]
        struct GlobalOfImage {
            global: GlobalConfig,
        }
        serde_json::from_slice::<GlobalOfImage>(bytes)
            .map(|image| image.global)
            .map_err(|e| format!("the config image does not decode: {e}"))
    }

    /// Rebuilds a configuration from its image. The image was checked when it was made, so a
    /// failure here means the bytes are not an image this version wrote.
    pub fn from_image(bytes: &[u8]) -> Result<Config, String> {
        let image: ConfigImage = serde_json::from_slice(bytes)
            .map_err(|e| format!("the config image does not decode: {e}"))?;
        let ConfigImage { global, services } = image;
        if !services.windows(2).all(|w| w[0].id < w[1].id) {
            return Err("the config image's services are not sorted by id".into());
        }
        let index = |id: &str| services.binary_search_by(|s| s.id.as_str().cmp(id)).ok();
        let mut edges = Vec::new();
        for (i, s) in services.iter().enumerate() {
            for (kind, targets) in [
                (EdgeKind::Requires, &s.requires),
                (EdgeKind::Wants, &s.wants),
                (EdgeKind::After, &s.after),
                (EdgeKind::Before, &s.before),
            ] {
                for t in targets {
                    let j = match index(t) {
                        Some(j) => j,
                        // A wanted id that names no service was a warning at load: no edge.
                        None if kind == EdgeKind::Wants => continue,
                        None => {
                            return Err(format!("the config image names an unknown service `{t}`"));
                        }
                    };
                    edges.push(edge_between(i, j, kind));
                }
            }
        }
        let ids = services.iter().map(|s| s.id.clone()).collect();
        let graph = ServiceGraph::build(ids, &edges)
            .map_err(|_| "the config image holds a dependency cycle".to_owned())?;
        let resolve = |seq: &Option<Vec<String>>, derived: Vec<usize>| match seq {
            None => Ok(derived),
            Some(ids) => ids
                .iter()
                .map(|id| {
                    index(id).ok_or_else(|| {
                        format!("the config image's sequence names an unknown service `{id}`")
                    })
                })
                .collect(),
        };
        let startup_sequence = resolve(
            &global.coordinator.startup_sequence,
            graph.startup_sequence().to_vec(),
        )?;
        let shutdown_sequence = resolve(
            &global.coordinator.shutdown_sequence,
            graph.shutdown_sequence(),
        )?;
        let explicit_startup = global.coordinator.startup_sequence.is_some();
        Ok(Config {
            global,
            services,
            graph,
            startup_sequence,
            shutdown_sequence,
            explicit_startup,
            warnings: Diagnostics::default(),
        })
    }
}

/// The edge `dependent -> dependency` as its file says it, ids quoted: "`web` requires `db`",
/// "`x` before `web`".
fn quoted_edge(kind: EdgeKind, dependent: &str, dependency: &str) -> String {
    kind.describe(&format!("`{dependent}`"), &format!("`{dependency}`"))
}

/// The graph edge `(dependent, dependency, kind)` that service `declarer` declares towards
/// `target` with a key of `kind`: every key points from its own file to the target, except
/// `before`, whose target is the one that waits.
fn edge_between(declarer: usize, target: usize, kind: EdgeKind) -> (usize, usize, EdgeKind) {
    if kind.declared_by_dependent() {
        (declarer, target, kind)
    } else {
        (target, declarer, kind)
    }
}

/// The least time a crash loop of a service needs for `counter` restarts: the engine waits
/// `restart_delay` before the first and doubles the wait with each further one, up to
/// `restart_delay_max` (a service that dies at once after each start makes exactly these waits).
fn least_time_for_restarts(service: &ServiceSpec, counter: u32) -> std::time::Duration {
    let (mut delay, max) = (
        service.restart_delay.as_duration(),
        service.restart_delay_max.as_duration(),
    );
    let mut total = std::time::Duration::ZERO;
    for done in 0..counter {
        // Every further wait is the same (the cap, or 0 which doubles to 0): computed, not
        // looped over up to a counter of 4 billion.
        if delay >= max || delay.is_zero() {
            return total.saturating_add(delay.saturating_mul(counter - done));
        }
        total = total.saturating_add(delay);
        delay = delay.saturating_mul(2).min(max);
    }
    total
}

/// Refuses a retry window no crash loop can fill: if `restart_retry_counter` restarts of a
/// service take longer than `restart_time_span` even when it dies at once each time, the count
/// starts over before it is ever exceeded, and that service's crash loop never gives up (the
/// counter is meaningless for it). A counter of 0 is meaningful: the first failure gives up.
fn check_retry_window(config: &Config, spans: &SequenceSpans, diags: &mut Diagnostics) {
    let c = &config.global.coordinator;
    let (counter, window) = (c.restart_retry_counter, c.restart_time_span.as_duration());
    if window.is_zero() {
        return; // Already refused on its own.
    }
    let mut never: Vec<(&ServiceSpec, std::time::Duration)> = config
        .services
        .iter()
        .filter(|s| s.restart != RestartPolicy::Never)
        .map(|s| (s, least_time_for_restarts(s, counter)))
        .filter(|&(_, least)| least > window)
        .collect();
    if never.is_empty() {
        return;
    }
    never.sort_by_key(|&(s, least)| (std::cmp::Reverse(least), &s.id));
    let (worst, least) = never[0];
    let show = |d: std::time::Duration| {
        ConfigDuration(std::time::Duration::from_millis(d.as_millis() as u64)).to_string()
    };
    let message = format!(
        "key `coordinator.restart_time_span` ({}) is too short for `restart_retry_counter` ({counter}): a crash loop of `{}` needs at least {} for {counter} restarts (restart_delay {}, doubling up to {}), so the count would start over before it is exceeded and the loop would never give up",
        c.restart_time_span,
        worst.id,
        show(least),
        worst.restart_delay,
        worst.restart_delay_max,
    );
    let path = spans
        .path
        .as_deref()
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let mut d = match spans.time_span.clone().or(spans.retry_counter.clone()) {
        Some(span) => Diagnostic::at_span(path, &spans.text, span, message),
        None => Diagnostic::in_file(spans.path.as_deref(), message),
    };
    d = d.with_note(format!(
        "make the span at least {}, or lower `restart_retry_counter`, or `restart_delay`/`restart_delay_max` in {}",
        show(least),
        worst.source.display()
    ));
    if never.len() > 1 {
        let others: Vec<String> = never[1..]
            .iter()
            .map(|(s, _)| format!("`{}`", s.id))
            .collect();
        d = d.with_note(format!("the same holds for {}", others.join(", ")));
    }
    diags.push(d);
}

/// What `start` would refuse because the shared segment cannot hold it: more services than
/// [`MAX_SERVICES`], a configuration image larger than [`MAX_CONFIG_BLOB`]; and a notify socket
/// path too long for a socket address. Checked with the segment's own constants and the
/// keeper's own path, so `check` refuses exactly what `start` would.
fn check_start_limits(config: &Config, spans: &SequenceSpans, diags: &mut Diagnostics) {
    let n = config.services.len();
    if n > MAX_SERVICES as usize {
        diags.push(Diagnostic::in_file(
            Some(&config.global.services_dir),
            format!(
                "{n} services, more than the {MAX_SERVICES} one instance's shared segment holds (MAX_SERVICES); split the stack into several instances"
            ),
        ));
    }
    // The keeper binds the notify socket in `run_dir`; a Unix socket address holds a path
    // of at most 107 bytes, so a deep `run_dir` would fail `start`.
    let socket = crate::keeper::notify_socket_path(config);
    if nix::sys::socket::UnixAddr::new(&socket).is_err() {
        let max = std::mem::size_of::<libc::sockaddr_un>()
            - std::mem::offset_of!(libc::sockaddr_un, sun_path)
            - 1;
        let msg = format!(
            "key `run_dir`: the notify socket `{}` would be {} bytes long, more than the {max} a Unix socket address holds; choose a shorter `run_dir` or instance name",
            socket.display(),
            socket.as_os_str().len()
        );
        diags.push(match (&spans.path, &spans.run_dir) {
            (Some(path), Some(span)) => Diagnostic::at_span(path, &spans.text, span.clone(), msg),
            _ => Diagnostic::in_file(config.global.source.as_deref(), msg),
        });
    }
    let image_len = config.image_len();
    if image_len <= MAX_CONFIG_BLOB {
        return;
    }
    // The image is the whole configuration; point at the service that weighs most, and in
    // its file at the key whose value is the longest.
    let weight = |s: &ServiceSpec| serde_json::to_vec(s).map_or(0, |v| v.len());
    let heaviest = config.services.iter().max_by_key(|s| weight(s));
    let message = format!(
        "the configuration image is {image_len} bytes, more than the {MAX_CONFIG_BLOB} (MAX_CONFIG_BLOB) one instance's shared segment holds"
    );
    let mut d = match heaviest.and_then(|s| longest_key(&s.source).map(|at| (s, at))) {
        Some((s, (key, text, span))) => Diagnostic::at_span(
            &s.source,
            &text,
            span,
            format!("{message}; key `{key}` of `{}` is the largest part", s.id),
        ),
        None => Diagnostic::in_file(Some(&config.global.services_dir), message),
    };
    if let Some(s) = heaviest {
        d = d.with_note(format!("service `{}` weighs {} bytes", s.id, weight(s)));
    }
    diags.push(d);
}

/// The top-level key of a TOML file whose value spans the most bytes, with the file's text
/// and that value's span.
fn longest_key(path: &Path) -> Option<(String, String, std::ops::Range<usize>)> {
    let text = files::read_regular(path).ok()?;
    let table: std::collections::BTreeMap<String, Spanned<toml::Value>> =
        toml::from_str(&text).ok()?;
    let (key, value) = table.iter().max_by_key(|(_, v)| v.span().len())?;
    let span = value.span();
    Some((key.clone(), text, span))
}

/// The text and spans of the global file, kept to point errors in sequences at their line.
#[derive(Default)]
struct SequenceSpans {
    path: Option<PathBuf>,
    text: String,
    startup: Vec<std::ops::Range<usize>>,
    shutdown: Vec<std::ops::Range<usize>>,
    startup_whole: Option<std::ops::Range<usize>>,
    shutdown_whole: Option<std::ops::Range<usize>>,
    /// Where `restart_time_span` and `restart_retry_counter` are written, if they are.
    time_span: Option<std::ops::Range<usize>>,
    retry_counter: Option<std::ops::Range<usize>>,
    run_dir: Option<std::ops::Range<usize>>,
}

/// Reads only the global file: enough for `stop` and `status`, which must work even when a
/// service file is broken (the running stack's config lives in its segment).
pub fn load_global_only(options: &LoadOptions) -> Result<GlobalConfig, Diagnostics> {
    let mut diags = Diagnostics::default();
    match load_global(options, &mut diags).0 {
        Some(global) if diags.is_empty() => Ok(global),
        _ => Err(diags),
    }
}

/// `--config`, else `$CCMGR_CONFIG`, else the default path; the flag says whether it was
/// named explicitly (then a missing file is an error; the default file may be missing).
pub fn config_path(options: &LoadOptions) -> (PathBuf, bool) {
    if let Some(p) = &options.config_path {
        return (p.clone(), true);
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    }
}

fn load_global(
    options: &LoadOptions,
    diags: &mut Diagnostics,
) -> (Option<GlobalConfig>, SequenceSpans) {
    let (path, explicit) = config_path(options);
    let path = absolute(&path);
    let mut spans = SequenceSpans::default();
    let (raw, source) = match files::read_regular(&path) {
        Ok(text) => match toml::from_str::<RawGlobal>(&text) {
            Ok(raw) => {
                spans.path = Some(path.clone());
                spans.text = text;
                (raw, Some(path.clone()))
            }
            Err(e) => {
                diags.push(toml_error(&path, &text, &e));
                return (None, spans);
            }
        },
        Err(e) if files::is_not_found(&e) && !explicit => (RawGlobal::default(), None),
        Err(e) => {
            let msg = match e {
                files::NotRegular::Io(e) => format!("cannot read the configuration file: {e}"),
                e => format!("the configuration file {e}"),
            };
            diags.push(Diagnostic::in_file(Some(&path), msg));
            return (None, spans);
        }
    };
    let config_dir = path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let in_config_dir = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            config_dir.join(p)
        }
    };

    let instance = match (&options.instance, &raw.instance) {
        (Some(name), _) => name.clone(),
        (None, Some(name)) => name.get_ref().clone(),
        (None, None) => "default".to_owned(),
    };
    if let Err(msg) = check_instance_name(&instance) {
        let d = match (&options.instance, &raw.instance) {
            (None, Some(name)) => Diagnostic::at_span(&path, &spans.text, name.span(), msg),
            _ => Diagnostic::in_file(None, format!("--instance: {msg}")),
        };
        diags.push(d);
    }
    // A path with a NUL byte reaches no system call: refused here, not at `start`.
    let mut paths_usable = true;
    for (key, dir) in [
        ("services_dir", &raw.services_dir),
        ("log_dir", &raw.log_dir),
        ("run_dir", &raw.run_dir),
    ] {
        if let Some(dir) = dir.as_ref().filter(|d| service::has_nul(d.get_ref())) {
            let msg = format!("key `{key}`: {}", service::holds_nul("the path"));
            diags.push(Diagnostic::at_span(&path, &spans.text, dir.span(), msg));
            // The services cannot even be listed; the other paths are only used at `start`.
            paths_usable &= key != "services_dir";
        }
    }
    let services_dir = match &options.services_dir {
        Some(dir) => absolute(dir),
        None => in_config_dir(
            raw.services_dir
                .as_ref()
                .map_or(Path::new("services.d"), |d| d.get_ref()),
        ),
    };
    let (default_log, default_run) = default_state_dirs();
    let log_dir = raw
        .log_dir
        .as_ref()
        .map_or(default_log, |d| in_config_dir(d.get_ref()));
    let run_dir = raw
        .run_dir
        .as_ref()
        .map_or(default_run, |d| in_config_dir(d.get_ref()));
    let group = raw
        .group
        .as_ref()
        .and_then(|g| match service::resolve_group(g.get_ref()) {
            Ok(group) => Some(group),
            Err(msg) => {
                let msg = format!("key `group`: {msg}");
                diags.push(Diagnostic::at_span(&path, &spans.text, g.span(), msg));
                None
            }
        });

    let c = raw.coordinator;
    let defaults = CoordinatorConfig::default();
    let unspan = |seq: &Option<Spanned<Vec<Spanned<String>>>>| {
        seq.as_ref()
            .map(|s| s.get_ref().iter().map(|x| x.get_ref().clone()).collect())
    };
    if let Some(s) = &c.startup_sequence {
        spans.startup = s.get_ref().iter().map(Spanned::span).collect();
        spans.startup_whole = Some(s.span());
    }
    if let Some(s) = &c.shutdown_sequence {
        spans.shutdown = s.get_ref().iter().map(Spanned::span).collect();
        spans.shutdown_whole = Some(s.span());
    }
    spans.run_dir = raw.run_dir.as_ref().map(Spanned::span);
    spans.time_span = c.restart_time_span.as_ref().map(Spanned::span);
    spans.retry_counter = c.restart_retry_counter.as_ref().map(Spanned::span);
    if let Some(span) = c
        .restart_time_span
        .as_ref()
        .filter(|d| d.get_ref().as_duration().is_zero())
    {
        let msg = "key `coordinator.restart_time_span`: a span of 0 makes `restart_retry_counter` meaningless: the count would start over at every restart, so a crash loop would never give up; give the window restarts are counted in, such as \"60s\"";
        diags.push(Diagnostic::at_span(&path, &spans.text, span.span(), msg));
    }
    if let Some(hook) = &c.on_failure_command {
        let text = hook.get_ref();
        let problem = if text.contains('\0') {
            Some("holds a NUL byte, which no command line can carry")
        } else if text.trim().is_empty() {
            Some("is empty: leave it out, or give a shell command")
        } else {
            None
        };
        if let Some(problem) = problem {
            let msg = format!("key `coordinator.on_failure_command` {problem}");
            diags.push(Diagnostic::at_span(&path, &spans.text, hook.span(), msg));
        }
    }
    if let Some(d) = c
        .on_failure_timeout
        .as_ref()
        .filter(|d| d.get_ref().as_duration().is_zero())
    {
        let msg = "key `coordinator.on_failure_timeout`: 0 would kill every failure command as it starts; give how long one may run, such as \"10s\"";
        diags.push(Diagnostic::at_span(&path, &spans.text, d.span(), msg));
    }
    let coordinator = CoordinatorConfig {
        startup_timeout: c.startup_timeout.unwrap_or(defaults.startup_timeout),
        shutdown_timeout: c.shutdown_timeout.unwrap_or(defaults.shutdown_timeout),
        restart_retry_counter: c
            .restart_retry_counter
            .as_ref()
            .map_or(defaults.restart_retry_counter, |n| *n.get_ref()),
        restart_time_span: c
            .restart_time_span
            .as_ref()
            .map_or(defaults.restart_time_span, |d| *d.get_ref()),
        on_failure: c.on_failure.unwrap_or(defaults.on_failure),
        standby: c.standby.unwrap_or(defaults.standby),
        takeover: c.takeover.unwrap_or(defaults.takeover),
        startup_sequence: unspan(&c.startup_sequence),
        shutdown_sequence: unspan(&c.shutdown_sequence),
        watchdog: c.watchdog.filter(|d| !d.as_duration().is_zero()),
        on_failure_command: c.on_failure_command.as_ref().map(|h| h.get_ref().clone()),
        on_failure_timeout: c
            .on_failure_timeout
            .as_ref()
            .map_or(defaults.on_failure_timeout, |d| *d.get_ref()),
    };
    let global = GlobalConfig {
        source,
        instance,
        services_dir,
        log_dir,
        run_dir,
        group,
        coordinator,
    };
    (paths_usable.then_some(global), spans)
}

/// Whether `name` may name an instance: `[A-Za-z0-9_.-]`, 1 to 64 bytes, not starting with
/// `.` or `-` (it names shared-memory objects and files). Whatever the segment refuses
/// ([`crate::shm::validate_instance_name`]) is refused here too, so `check` and the command
/// line catch it before `start` does.
pub fn check_instance_name(name: &str) -> Result<(), String> {
    let segment_accepts = crate::shm::validate_instance_name(name).is_ok();
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !segment_accepts
        || name.is_empty()
        || name.len() > MAX_INSTANCE_LEN
        || !valid_chars
        || name.starts_with(['.', '-'])
    {
        return Err(format!(
            "instance name `{name}` must be 1 to {MAX_INSTANCE_LEN} letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
        ));
    }
    Ok(())
}

/// The default log and runtime directories: system paths as root; the XDG state and runtime
/// directories otherwise, so anyone can run ccmgr without root.
pub fn default_state_dirs() -> (PathBuf, PathBuf) {
    if nix::unistd::geteuid().is_root() {
        return (PathBuf::from("/var/log/ccmgr"), PathBuf::from("/run/ccmgr"));
    }
    let env_dir = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env_dir("HOME").unwrap_or_else(std::env::temp_dir);
    let state = env_dir("XDG_STATE_HOME").unwrap_or_else(|| home.join(".local/state"));
    let runtime = env_dir("XDG_RUNTIME_DIR")
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ccmgr-{}", nix::unistd::geteuid())));
    (state.join("ccmgr"), runtime.join("ccmgr"))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Turns a TOML syntax or schema error into a diagnostic naming file, line, column and key.
pub(crate) fn toml_error(path: &Path, text: &str, error: &toml::de::Error) -> Diagnostic {
    // serde's words are about Rust ("variant"); the reader wrote a TOML value.
    let message = error
        .message()
        .trim()
        .replace("unknown variant", "unknown value");
    let Some(span) = error.span() else {
        return Diagnostic::in_file(Some(path), message);
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde says "unknown field `x`, expected one of `a`, `b`": say "key" (the TOML word)
        // and suggest the closest known key.
        let unknown = rest.split('`').next().unwrap_or_default();
        let known: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let mut d =
            Diagnostic::at_span(path, text, span.clone(), format!("unknown key `{unknown}`"));
        if let Some(close) = did_you_mean(unknown, known.iter().copied()) {
            d = d.with_note(format!("did you mean `{close}`?"));
        }
        if !known.is_empty() {
            d = d.with_note(format!("known keys here: {}", known.join(", ")));
        }
        return d;
    }
    // Where a bracket opened lines above is never closed, the parser stops at a later key
    // that is not at fault: name the key the bracket belongs to and point at its line.
    let (error_line, _) = crate::diag::line_col(text, span.start);
    let unclosed = crate::diag::unclosed_before(text, span.start)
        .filter(|&(_, at)| crate::diag::line_col(text, at).0 < error_line);
    let key_offset = unclosed.map_or(span.start, |(_, at)| at);
    let message = match key_at(text, key_offset) {
        Some(key) => format!("key `{key}`: {message}"),
        None => message,
    };
    let mut d = Diagnostic::at_span(path, text, span, message);
    if let Some((delimiter, at)) = unclosed {
        let (line, column) = crate::diag::line_col(text, at);
        d = d.with_note(format!(
            "{}:{line}:{column}: the {} opened here is never closed: a `{}` is missing",
            path.display(),
            delimiter.name(),
            delimiter.closer()
        ));
    }
    d
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|&(distance, c)| distance <= (c.len().max(word.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// Puts the parsed files together: duplicate ids, references, the graph, the sequences.
fn assemble(
    global: GlobalConfig,
    mut parsed: Vec<service::ParsedService>,
    broken: &std::collections::HashSet<String>,
    spans: &SequenceSpans,
    diags: &mut Diagnostics,
) -> Option<Config> {
    let mut warnings = Diagnostics::default();
    parsed.sort_by(|a, b| (&a.spec.id, &a.spec.source).cmp(&(&b.spec.id, &b.spec.source)));
    // Two files, one id: name both, keep the first so its references are still checked.
    let mut kept: Vec<service::ParsedService> = Vec::with_capacity(parsed.len());
    for p in parsed {
        if let Some(first) = kept.last().filter(|k| k.spec.id == p.spec.id) {
            let msg = format!(
                "service id `{}` is used twice: by {} and by {}",
                p.spec.id,
                first.spec.source.display(),
                p.spec.source.display()
            );
            diags.push(match &p.id_span {
                Some(span) => {
                    Diagnostic::at_span(&p.spec.source, &p.source_text, span.clone(), msg)
                }
                None => Diagnostic::in_file(Some(&p.spec.source), msg),
            });
            continue;
        }
        kept.push(p);
    }
    let index: HashMap<&str, usize> = kept
        .iter()
        .enumerate()
        .map(|(i, p)| (p.spec.id.as_str(), i))
        .collect();
    let ids: Vec<String> = kept.iter().map(|p| p.spec.id.clone()).collect();
    let mut edges = Vec::new();
    for (i, p) in kept.iter().enumerate() {
        let refs = [
            (EdgeKind::Requires, &p.spec.requires, &p.requires_spans),
            (EdgeKind::Wants, &p.spec.wants, &p.wants_spans),
            (EdgeKind::After, &p.spec.after, &p.after_spans),
            (EdgeKind::Before, &p.spec.before, &p.before_spans),
        ];
        for (kind, targets, target_spans) in refs {
            for (target, span) in targets.iter().zip(target_spans) {
                match index.get(target.as_str()) {
                    Some(&j) => edges.push(edge_between(i, j, kind)),
                    None if broken.contains(target) => {}
                    None => {
                        let relation = match kind {
                            EdgeKind::Requires => "requires",
                            EdgeKind::Wants => "wants",
                            EdgeKind::After => "is ordered after",
                            EdgeKind::Before => "is ordered before",
                        };
                        let mut msg = format!(
                            "`{}` {relation} `{target}`, but no service has that id",
                            p.spec.id
                        );
                        if kind == EdgeKind::Wants {
                            // systemd's Wants= on a unit that does not exist is no error.
                            msg.push_str(": ignored (a wanted service may be absent)");
                        }
                        let mut d =
                            Diagnostic::at_span(&p.spec.source, &p.source_text, span.clone(), msg);
                        if let Some(close) = did_you_mean(target, ids.iter().map(String::as_str)) {
                            d = d.with_note(format!("did you mean `{close}`?"));
                        }
                        if kind == EdgeKind::Wants {
                            warnings.push(d);
                        } else {
                            diags.push(d);
                        }
                    }
                }
            }
        }
    }
    let services: Vec<ServiceSpec> = kept.into_iter().map(|p| p.spec).collect();
    let graph = match ServiceGraph::build(ids, &edges) {
        Ok(graph) => graph,
        Err(cycles) => {
            for cycle in cycles {
                let path: Vec<&str> = cycle
                    .services
                    .iter()
                    .map(|&s| services[s].id.as_str())
                    .collect();
                let mut d = Diagnostic::in_file(
                    None,
                    format!("dependency cycle: {} -> {}", path.join(" -> "), path[0]),
                );
                for &s in &cycle.services {
                    d = d.with_note(format!(
                        "`{}` is declared in {}",
                        services[s].id,
                        services[s].source.display()
                    ));
                }
                // Each edge as its file says it: a `before` is written in the file of the
                // service it points to, which the path alone does not show.
                let edges: Vec<String> = cycle
                    .kinds
                    .iter()
                    .enumerate()
                    .map(|(i, kind)| {
                        let (from, to) = (
                            cycle.services[i],
                            cycle.services[(i + 1) % cycle.services.len()],
                        );
                        quoted_edge(*kind, &services[from].id, &services[to].id)
                    })
                    .collect();
                d = d.with_note(format!("the edges: {}", edges.join(", ")));
                let others: Vec<&str> = cycle
                    .knot
                    .iter()
                    .filter(|s| !cycle.services.contains(s))
                    .map(|&s| services[s].id.as_str())
                    .collect();
                if !others.is_empty() {
                    d = d.with_note(format!(
                        "also caught in the same knot of cycles: {}",
                        others.join(", ")
                    ));
                }
                diags.push(d);
            }
            return None;
        }
    };
    let startup = settle_sequence(
        &global,
        &graph,
        &services,
        SequenceKind::Startup,
        spans,
        diags,
    );
    let shutdown = settle_sequence(
        &global,
        &graph,
        &services,
        SequenceKind::Shutdown,
        spans,
        diags,
    );
    let explicit_startup = global.coordinator.startup_sequence.is_some();
    Some(Config {
        global,
        services,
        startup_sequence: startup?,
        shutdown_sequence: shutdown?,
        graph,
        explicit_startup,
        warnings,
    })
}

/// The derived sequence, or the explicit one after checking that it names every service
/// exactly once and never goes against an edge.
fn settle_sequence(
    global: &GlobalConfig,
    graph: &ServiceGraph,
    services: &[ServiceSpec],
    kind: SequenceKind,
    spans: &SequenceSpans,
    diags: &mut Diagnostics,
) -> Option<Vec<usize>> {
    let (explicit, entry_spans, whole) = match kind {
        SequenceKind::Startup => (
            &global.coordinator.startup_sequence,
            &spans.startup,
            &spans.startup_whole,
        ),
        SequenceKind::Shutdown => (
            &global.coordinator.shutdown_sequence,
            &spans.shutdown,
            &spans.shutdown_whole,
        ),
    };
    let Some(explicit) = explicit else {
        return Some(match kind {
            SequenceKind::Startup => graph.startup_sequence().to_vec(),
            SequenceKind::Shutdown => graph.shutdown_sequence(),
        });
    };
    let path = spans
        .path
        .as_deref()
        .unwrap_or(Path::new(DEFAULT_CONFIG_PATH));
    let key = kind.key();
    let at_entry = |i: usize, msg: String| match entry_spans.get(i) {
        Some(span) => Diagnostic::at_span(path, &spans.text, span.clone(), msg),
        None => Diagnostic::in_file(Some(path), msg),
    };
    let at_whole = |msg: String| match whole {
        Some(span) => Diagnostic::at_span(path, &spans.text, span.clone(), msg),
        None => Diagnostic::in_file(Some(path), msg),
    };
    let before = diags.len();
    let mut order = Vec::with_capacity(explicit.len());
    let mut seen = vec![false; services.len()];
    for (i, id) in explicit.iter().enumerate() {
        match services.binary_search_by(|s| s.id.as_str().cmp(id)) {
            Ok(s) if seen[s] => diags.push(at_entry(
                i,
                format!("key `coordinator.{key}` names `{id}` twice"),
            )),
            Ok(s) => {
                seen[s] = true;
                order.push(s);
            }
            Err(_) => {
                let mut d = at_entry(
                    i,
                    format!("key `coordinator.{key}` names `{id}`, but no service has that id"),
                );
                if let Some(close) = did_you_mean(id, services.iter().map(|s| s.id.as_str())) {
                    d = d.with_note(format!("did you mean `{close}`?"));
                }
                diags.push(d);
            }
        }
    }
    let missing: Vec<&str> = (0..services.len())
        .filter(|&s| !seen[s])
        .map(|s| services[s].id.as_str())
        .collect();
    if !missing.is_empty() {
        diags.push(at_whole(format!(
            "key `coordinator.{key}` must name every service exactly once; it leaves out {}",
            missing
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if diags.len() != before {
        return None;
    }
    for e in graph.check_sequence(kind, &order) {
        let (dependent, dependency) = (&services[e.dependent], &services[e.dependency]);
        let edge = quoted_edge(e.edge, &dependent.id, &dependency.id);
        let msg = match kind {
            SequenceKind::Startup => format!(
                "key `coordinator.{key}` starts `{}` before `{}`, but {edge}",
                dependent.id, dependency.id
            ),
            SequenceKind::Shutdown => format!(
                "key `coordinator.{key}` stops `{}` before `{}`, but {edge}",
                dependency.id, dependent.id
            ),
        };
        let pos = explicit
            .iter()
            .position(|id| *id == dependent.id)
            .unwrap_or(0);
        let declarer = if e.edge.declared_by_dependent() {
            dependent
        } else {
            dependency
        };
        diags.push(at_entry(pos, msg).with_note(format!(
            "the dependency is declared in {}",
            declarer.source.display()
        )));
    }
    (diags.len() == before).then_some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_round_trips_through_its_image() {
        let options = LoadOptions {
            config_path: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("ccmgr.toml")),
            ..Default::default()
        };
        let config = Config::load(&options).unwrap();
        assert_eq!(config.image_len(), config.to_image().len() as u64);
        let back = Config::from_image(&config.to_image()).unwrap();
        assert_eq!(back.global, config.global);
        assert_eq!(back.services, config.services);
        assert_eq!(back.startup_sequence, config.startup_sequence);
        assert_eq!(back.shutdown_sequence, config.shutdown_sequence);
        assert_eq!(back.graph.levels(), config.graph.levels());
        assert!(Config::from_image(b"{}").is_err());
    }

    #[test]
    fn wants_and_before_survive_the_image_and_a_missing_wanted_id_is_only_a_warning() {
        let scenario =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/wants-and-before");
        let options = LoadOptions {
            config_path: Some(scenario.join("ccmgr.toml")),
            ..Default::default()
        };
        let config = Config::load(&options).unwrap();
        assert_eq!(config.warnings.len(), 1, "{}", config.warnings);
        let warning = config.warnings.to_string();
        assert!(warning.contains("`web` wants `node-exporter`"), "{warning}");
        let i = |id: &str| config.service_index(id).unwrap();
        assert_eq!(
            config.graph.dependencies(i("web")),
            [
                (i("db"), EdgeKind::Requires),
                (i("metrics"), EdgeKind::Wants),
                (i("migrate"), EdgeKind::Before),
            ]
        );
        let back = Config::from_image(&config.to_image()).unwrap();
        assert_eq!(back.services, config.services);
        assert_eq!(back.graph.edges(), config.graph.edges());
        assert_eq!(back.startup_sequence, config.startup_sequence);
        assert!(back.warnings.is_empty());
    }

    #[test]
    fn instance_names() {
        for ok in ["default", "t-1.x_2", &"a".repeat(64)] {
            assert!(check_instance_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "a@b", &"a".repeat(65)] {
            assert!(check_instance_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn least_time_for_restarts_doubles_up_to_the_cap() {
        let options = LoadOptions {
            config_path: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("ccmgr.toml")),
            ..Default::default()
        };
        let mut s = Config::load(&options).unwrap().services.remove(0);
        s.restart_delay = ConfigDuration::from_millis(100);
        s.restart_delay_max = ConfigDuration::from_millis(1_000);
        let ms = |n| std::time::Duration::from_millis(n);
        assert_eq!(least_time_for_restarts(&s, 0), ms(0));
        assert_eq!(least_time_for_restarts(&s, 1), ms(100));
        // 100 + 200 + 400 + 800 + 1000 (the cap) + 1000
        assert_eq!(least_time_for_restarts(&s, 6), ms(3_500));
        // A huge counter is computed, not looped over.
        assert_eq!(
            least_time_for_restarts(&s, u32::MAX),
            ms(1_500) + ms(1_000) * (u32::MAX - 4)
        );
        s.restart_delay = ConfigDuration::from_millis(0);
        assert_eq!(least_time_for_restarts(&s, u32::MAX), ms(0));
    }

    #[test]
    fn did_you_mean_finds_close_words_only() {
        let ids = ["database", "web", "cache"];
        assert_eq!(did_you_mean("databse", ids), Some("database"));
        assert_eq!(did_you_mean("wbe", ids), Some("web"));
        assert_eq!(did_you_mean("zzzzzz", ids), None);
    }
}

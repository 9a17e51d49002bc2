//! Where the coordinator's and the keeper's own log lines go: one line per event, appended to
//! `log_dir/ccmgr-<instance>.log`, and to stderr too in the foreground.
//!
//! Writes are appends of whole lines to a regular file (and a terminal in the foreground):
//! they do not wait on any reader, so logging cannot stall the event loops. `RUST_LOG`
//! filters as usual (default `info`).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

/// Installs the process's log subscriber and enters a span naming `role` ("coordinator",
/// "keeper"), so every line says which process wrote it. Keep the returned guard for the
/// life of the process.
#[must_use = "the role span lasts as long as the guard"]
pub fn init(file: Option<&Path>, stderr: bool, role: &'static str) -> tracing::span::EnteredSpan {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let opened = file.and_then(|path| {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        OpenOptions::new().create(true).append(true).open(path).ok()
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .with_thread_ids(false);
    let _ = match (opened, stderr) {
        (Some(f), true) => builder
            .with_writer(Mutex::new(f).and(std::io::stderr))
            .try_init(),
        (Some(f), false) => builder.with_writer(Mutex::new(f)).try_init(),
        (None, _) => builder.with_writer(std::io::stderr).try_init(),
    };
    role_span(role)
}

/// Enters a span naming `role`, with no parent: every later line of this thread says that
/// role alone. A standby that took over calls it with "coordinator", as it now is one.
#[must_use = "the role span lasts as long as the guard"]
pub fn role_span(role: &'static str) -> tracing::span::EnteredSpan {
    tracing::info_span!(parent: None, "ccmgr", role, pid = std::process::id()).entered()
}

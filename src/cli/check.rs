//! `ccmgr check` and `ccmgr graph`: read-only views of a loaded configuration, for people or
//! (`--json`) for programs.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Exit, GraphFormat};
use crate::config::Config;
use crate::diag::{Diagnostic, Diagnostics};

/// One problem (or warning) of a configuration, as `--json` gives it.
#[derive(Serialize)]
pub struct DiagnosticJson {
    /// The file concerned, if one.
    file: Option<String>,
    /// 1-based line and column, where known.
    line: Option<usize>,
    column: Option<usize>,
    message: String,
    notes: Vec<String>,
}

impl From<&Diagnostic> for DiagnosticJson {
    fn from(d: &Diagnostic) -> Self {
        DiagnosticJson {
            file: d.path.as_ref().map(|p| p.display().to_string()),
            line: d.line_col.map(|(l, _)| l),
            column: d.line_col.map(|(_, c)| c),
            message: d.message.clone(),
            notes: d.notes.clone(),
        }
    }
}

/// `check --json` of a configuration that does not load: `{"ok": false, "errors": [...]}`.
pub fn print_errors_json(diags: &Diagnostics) {
    let doc = serde_json::json!({
        "ok": false,
        "errors": diags.iter().map(DiagnosticJson::from).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
}

/// `check --json` of a valid configuration.
fn check_json(config: &Config) -> serde_json::Value {
    let ids = |order: &[usize]| {
        order
            .iter()
            .map(|&s| config.services[s].id.clone())
            .collect::<Vec<_>>()
    };
    let g = &config.global;
    serde_json::json!({
        "ok": true,
        "instance": g.instance,
        "config": g.source.as_ref().map(|p| p.display().to_string()),
        "services_dir": g.services_dir.display().to_string(),
        "services": config.services.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        "startup_sequence": ids(&config.startup_sequence),
        "shutdown_sequence": ids(&config.shutdown_sequence),
        "explicit_startup": config.explicit_startup,
        "levels": config.graph.levels().iter().map(|l| ids(l)).collect::<Vec<_>>(),
        "warnings": config.warnings.iter().map(DiagnosticJson::from).collect::<Vec<_>>(),
    })
}

/// `graph --format json`: every service, and every edge with its kind (`requires`, `wants`,
/// `after`, `before`), from the dependent to what it depends on.
fn graph_json(config: &Config) -> serde_json::Value {
    let graph = &config.graph;
    serde_json::json!({
        "services": graph.ids(),
        "edges": graph.edges().into_iter().map(|(from, to, kind)| serde_json::json!({
            "from": graph.id(from),
            "to": graph.id(to),
            "kind": kind,
        })).collect::<Vec<_>>(),
    })
}

/// The report `check` prints for a valid configuration.
pub fn check_report(config: &Config) -> String {
    let ids = |order: &[usize]| {
        order
            .iter()
            .map(|&s| config.services[s].id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let g = &config.global;
    let mut out = String::new();
    let source = g.source.as_ref().map_or_else(
        || "built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    let n = config.services.len();
    let _ = writeln!(
        out,
        "configuration OK: instance `{}`, {n} service{} in {} (config: {source})",
        g.instance,
        if n == 1 { "" } else { "s" },
        g.services_dir.display()
    );
    if n == 0 {
        out.push_str("nothing to start: the services directory holds no *.toml file\n");
        return out;
    }
    let explicit = |yes: bool| if yes { " (explicit)" } else { "" };
    let _ = writeln!(
        out,
        "startup sequence{}: {}",
        explicit(config.explicit_startup),
        ids(&config.startup_sequence)
    );
    let _ = writeln!(
        out,
        "shutdown sequence{}: {}",
        explicit(g.coordinator.shutdown_sequence.is_some()),
        ids(&config.shutdown_sequence)
    );
    out.push_str("levels (services of one level start in parallel):\n");
    for (level, services) in config.graph.levels().iter().enumerate() {
        let _ = writeln!(out, "  {level}: {}", ids(services));
    }
    if config.explicit_startup {
        out.push_str("the explicit startup sequence starts services one at a time\n");
    }
    out
}

pub fn check(config: &Config, json: bool) -> Exit {
    if json {
        let doc = check_json(config);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", check_report(config));
    }
    Exit::Ok
}

pub fn graph(config: &Config, format: GraphFormat, json: bool) -> Exit {
    match (format, json) {
        (GraphFormat::Json, _) | (_, true) => {
            let doc = graph_json(config);
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        (GraphFormat::Dot, false) => print!("{}", config.graph.to_dot()),
        (GraphFormat::Text, false) => print!("{}", config.graph.to_text()),
    }
    Exit::Ok
}

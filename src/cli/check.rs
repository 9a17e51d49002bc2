//! `ccmgr check` and `ccmgr graph`: read-only views of a loaded configuration.

use std::fmt::Write as _;

use super::{Exit, GraphFormat};
use crate::config::Config;

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

pub fn check(config: &Config) -> Exit {
    print!("{}", check_report(config));
    Exit::Ok
}

pub fn graph(config: &Config, format: GraphFormat) -> Exit {
    match format {
        GraphFormat::Dot => print!("{}", config.graph.to_dot()),
        GraphFormat::Text => print!("{}", config.graph.to_text()),
    }
    Exit::Ok
}

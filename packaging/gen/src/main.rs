//! ccmgr-gen: writes ccmgr's man pages (one per verb, with `clap_mangen`) and its shell
//! completions (bash, zsh, fish, with `clap_complete`) from the clap definition in
//! `ccmgr::cli`, for the Debian package (packaging/deb/build) and for anyone installing from
//! source.
//!
//! A separate workspace binary rather than a build script of ccmgr: the definition is the
//! library's `ccmgr::cli::Cli`, which a build script of the same package cannot use (it runs
//! before the library is compiled), and the generators stay out of the `ccmgr` binary, which
//! neither links them nor grows by a byte.
//!
//! Usage: `cargo run -p ccmgr-gen -- man OUTDIR`, `... completions OUTDIR`, `... all OUTDIR`
//! (`all` writes OUTDIR/man/ and OUTDIR/completions/). What it writes:
//! - man: `ccmgr.1` and `ccmgr-VERB.1` for every verb but the hidden internal one;
//! - completions: `ccmgr.bash`, `_ccmgr` (zsh) and `ccmgr.fish`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// The shells completions are written for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (what, out) = match args.as_slice() {
        [what, out] if ["man", "completions", "all"].contains(&what.as_str()) => {
            (what.as_str(), PathBuf::from(out))
        }
        _ => {
            eprintln!("usage: ccmgr-gen man|completions|all OUTDIR");
            return ExitCode::from(2);
        }
    };
    let result = match what {
        "man" => write_man_pages(&out),
        "completions" => write_completions(&out),
        _ => write_man_pages(&out.join("man"))
            .and_then(|()| write_completions(&out.join("completions"))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ccmgr-gen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ccmgr.1`, and `ccmgr-VERB.1` for every visible verb (and verb of a verb, should one come).
fn write_man_pages(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cmd = ccmgr::cli::Cli::command().disable_help_subcommand(true);
    // Builds the tree: every verb gets its display name (`ccmgr-start`) and the global flags.
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    write_man_tree(&cmd, dir, &version)
}

fn write_man_tree(cmd: &clap::Command, dir: &Path, version: &str) -> Result<(), String> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_tree(sub, dir, version)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("ccmgr {version}"))
        .manual("ccmgr manual");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .and_then(|()| std::fs::write(&path, page))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The command with its global flags and visible verbs only: clap_complete offers hidden
/// verbs too (`internal`, the roles ccmgr runs itself as), and clap cannot remove a verb.
fn without_hidden_verbs(cmd: clap::Command) -> clap::Command {
    let mut visible = clap::Command::new(cmd.get_name().to_owned())
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .subcommand_required(cmd.is_subcommand_required_set());
    if let Some(version) = cmd.get_version() {
        visible = visible.version(version.to_owned());
    }
    if let Some(about) = cmd.get_about() {
        visible = visible.about(about.clone());
    }
    visible
}

/// `ccmgr.bash`, `_ccmgr` and `ccmgr.fish`.
fn write_completions(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cmd = without_hidden_verbs(ccmgr::cli::Cli::command());
    for shell in SHELLS {
        clap_complete::generate_to(shell, &mut cmd, "ccmgr", dir).map_err(|e| {
            format!(
                "cannot write the {shell} completion in {}: {e}",
                dir.display()
            )
        })?;
    }
    Ok(())
}

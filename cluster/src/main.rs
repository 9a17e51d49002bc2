//! `ccmgr-cluster`: the node agent and the cluster commands; `ccmgr cluster ARGS` runs it
//! (README "Cluster"). A binary of its own so that ccmgr links no async runtime nor gRPC.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ccmgr_cluster::cli::{self, CliError};
use ccmgr_cluster::config;

#[derive(Parser)]
#[command(
    name = "ccmgr cluster",
    version,
    about = "ccmgr's cluster layer: the node agent and the cluster commands"
)]
struct Args {
    /// The node's ccmgr.toml, with its [cluster] table (else $CCMGR_CONFIG, else /etc/ccmgr/ccmgr.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The local instance's name (passed on to the local ccmgr).
    #[arg(long, global = true)]
    instance: Option<String>,
    /// The local instance's services directory (as ccmgr's --services-dir).
    #[arg(long, global = true)]
    services_dir: Option<PathBuf>,
    /// JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Run this node's agent: join the cluster and carry out its work, until SIGTERM or
    /// `cluster leave` (a graceful leave).
    Agent {
        /// The ccmgr binary that drives the local instance (default: beside this one, else PATH).
        #[arg(long)]
        ccmgr: Option<PathBuf>,
    },
    /// The agent's fence guard (started by the agent).
    #[command(hide = true)]
    Guard {
        #[arg(long)]
        ccmgr: PathBuf,
    },
    /// The roles, the members and every cluster service's state.
    Status,
    /// Follow the cluster's events (roles, members, services).
    Events {
        /// Begin with the last N events.
        #[arg(short = 'n', default_value_t = 0)]
        last: usize,
    },
    /// Leave the cluster gracefully: the node's services are transferred first.
    Leave {
        /// The node that leaves (default: this one).
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Transfer a service to a node by hand.
    Move {
        service: String,
        node: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Register a cluster service (one with auto_start = false, or one stopped).
    Start {
        service: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// A service's addresses, ordered for a client on a node (seed 002): local first, then
    /// by distance, equidistant ones rotated by the client's node number.
    Addresses {
        service: String,
        /// The client's node, by name or number (default: this node).
        #[arg(long)]
        node: Option<String>,
    },
    /// De-register a cluster service: it is stopped and stays down.
    Stop {
        service: String,
        #[arg(long)]
        no_wait: bool,
    },
}

fn default_ccmgr() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
        && dir.join("ccmgr").is_file()
    {
        return dir.join("ccmgr");
    }
    PathBuf::from("ccmgr")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let long_running = matches!(args.verb, Verb::Agent { .. } | Verb::Guard { .. });
    let level = if long_running {
        tracing::Level::INFO
    } else {
        tracing::Level::WARN
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let path = args
        .config
        .clone()
        .or_else(|| std::env::var_os("CCMGR_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/ccmgr/ccmgr.toml"));
    let cfg = match config::load(&path, args.instance.clone(), args.services_dir.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ccmgr cluster: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let json = args.json;
    let result: Result<(), CliError> = runtime.block_on(async move {
        match args.verb {
            Verb::Agent { ccmgr } => {
                ccmgr_cluster::agent::run(cfg, ccmgr.unwrap_or_else(default_ccmgr))
                    .await
                    .map_err(|e| match e {
                        ccmgr_cluster::agent::AgentError::Specs(m) => CliError::Usage(m),
                        e => CliError::Failed(e.to_string()),
                    })
            }
            Verb::Guard { ccmgr } => {
                ccmgr_cluster::guard::run(cfg, ccmgr).await;
                Ok(())
            }
            Verb::Status => cli::status(&cfg, json).await,
            Verb::Events { last } => cli::events(&cfg, json, last).await,
            Verb::Leave { node, no_wait } => cli::leave(&cfg, node, !no_wait).await,
            Verb::Move {
                service,
                node,
                no_wait,
            } => cli::move_service(&cfg, &service, &node, !no_wait).await,
            Verb::Start { service, no_wait } => {
                cli::start_stop(&cfg, &service, true, !no_wait).await
            }
            Verb::Addresses { service, node } => cli::addresses(&cfg, &service, node, json).await,
            Verb::Stop { service, no_wait } => {
                cli::start_stop(&cfg, &service, false, !no_wait).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ccmgr cluster: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

//! `regional-aggregator`: the regional tier as a process. Flags and exit codes live here; the
//! work is in the library's `app` module.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use regional_aggregator::app;
use shared::process::{self, LogFormat};

/// The regional aggregator of a hierarchical rate limiter: one per datacenter. It holds the
/// region's authoritative counts (in Redis, or in memory without it), hands the region's edge
/// agents their grants over QUIC with mutual TLS, and answers their exact checks near a limit.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The configuration file (YAML): node name, region, listen address, rules file, TLS files,
    /// Redis. Relative paths in it are read from its directory.
    #[arg(
        short,
        long,
        value_name = "FILE",
        env = "REGIONAL_CONFIG",
        required = true
    )]
    config: Option<PathBuf>,

    /// Keep the counts in the Redis at URL (`redis://host:port/db`), in place of the config
    /// file's `redis` section; the breaker keeps the file's settings or the defaults.
    #[arg(long, value_name = "URL", env = "REGIONAL_REDIS")]
    redis: Option<String>,

    /// Check the configuration, the rules file and the TLS files, print what they describe,
    /// and exit: 0 when everything is usable, 2 with the file and field at fault otherwise.
    /// Nothing is bound and Redis is not contacted.
    #[arg(long)]
    validate: bool,

    /// Which events to log: a level (error, warn, info, debug, trace) or per-module filters
    /// such as `info,regional_aggregator::breaker=debug`.
    #[arg(
        long,
        value_name = "FILTER",
        env = "REGIONAL_LOG",
        default_value = "info"
    )]
    log: String,

    /// How logs are written to stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Make the deployment's certificates: a CA (kept when DIR already holds ca.pem and
    /// ca.key) and, for every --node, NODE.pem and NODE.key signed by it. Every tier's TLS
    /// settings point at these files.
    Pki {
        /// Where to write ca.pem, ca.key and the node files (created if missing; key files
        /// get mode 0600).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A node to issue a certificate for: its name, a DNS name that the node's config
        /// also uses (`node:`). Repeat for every node.
        #[arg(long = "node", value_name = "NAME", required = true)]
        nodes: Vec<String>,
        /// Another name or IP address every issued certificate is valid for: how peers dial
        /// the nodes (`localhost`, `127.0.0.1`). Repeatable.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
}

fn main() -> ExitCode {
    const PROGRAM: &str = "regional-aggregator";
    let cli = Cli::parse();
    if let Some(Command::Pki { dir, nodes, sans }) = &cli.command {
        return match app::pki(dir, nodes, sans) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => process::fail(PROGRAM, 2, e),
        };
    }
    // `required = true` and no subcommand: clap has refused a missing --config already.
    let Some(config) = cli.config else {
        return process::fail(PROGRAM, 2, "--config is required");
    };
    let checked = match app::check(&config, cli.redis.as_deref()) {
        Ok(checked) => checked,
        Err(e) => return process::fail(PROGRAM, 2, e),
    };
    if cli.validate {
        println!("{}: ok: {}", config.display(), checked.summary());
        return ExitCode::SUCCESS;
    }
    let work = app::run(checked, process::shutdown_signal());
    process::serve(PROGRAM, &cli.log, cli.log_format, work)
}

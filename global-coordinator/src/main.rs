//! `global-coordinator`: the coordinator as a process, and `ctl`, the operators' CLI. Flags and
//! exit codes live here; the work is in the library's `app` and `ctl` modules.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use global_coordinator::{app, ctl};
use shared::process::{self, LogFormat};

/// The global coordinator of a hierarchical rate limiter: owns the rules and each region's
/// share of every limit, keeps them in a durable state file, and serves the admin API that
/// operators (and `global-coordinator ctl`) drive it with.
#[derive(Parser)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The configuration file (YAML): node name, admin address, token file, state file,
    /// first rules file, regions. Relative paths in it are read from its directory.
    #[arg(
        short,
        long,
        value_name = "FILE",
        env = "COORDINATOR_CONFIG",
        required = true
    )]
    config: Option<PathBuf>,

    /// Check the configuration, the token and (before the first start) the rules file, print
    /// what they describe, and exit: 0 when usable, 2 with the file and field at fault.
    #[arg(long)]
    validate: bool,

    /// Which events to log: a level (error, warn, info, debug, trace) or per-module filters.
    #[arg(
        long,
        value_name = "FILTER",
        env = "COORDINATOR_LOG",
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
    /// The operators' CLI: talks to a running coordinator's admin API.
    Ctl {
        /// The admin API's address.
        #[arg(
            long,
            value_name = "HOST:PORT",
            env = "COORDINATOR_ADDR",
            default_value = "127.0.0.1:9000"
        )]
        addr: String,
        /// The admin API's bearer token (better from the environment: a flag shows in `ps`).
        #[arg(
            long,
            value_name = "TOKEN",
            env = "COORDINATOR_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// A table of the regions, then every rule's limits, shares and partitions by region.
    Status,
    /// Show, validate or apply the rule set.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Pin a rule's shares: `pin login eu=0.7 us=0.3` (regions left out get nothing).
    Pin {
        /// The rule's id.
        rule: String,
        /// REGION=FRACTION, each in [0, 1], summing to at most 1.
        #[arg(required = true, value_name = "REGION=FRACTION")]
        shares: Vec<String>,
    },
    /// Let a rule's shares follow demand again.
    Unpin {
        /// The rule's id.
        rule: String,
    },
    /// Recompute every unpinned rule's shares from demand now.
    Rebalance,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Print the rule set in force (YAML) and its version.
    Show,
    /// Check a rules file locally, with the same validation every tier runs.
    Validate {
        /// The rules file.
        file: PathBuf,
    },
    /// Replace the rule set with a file's; the coordinator validates it whole first.
    Apply {
        /// The rules file.
        file: PathBuf,
        /// Show what would change (rules added, removed, changed) and apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

const PROGRAM: &str = "global-coordinator";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Ctl {
        addr,
        token,
        command,
    }) = cli.command
    {
        return run_ctl(addr, token, command);
    }
    let Some(config) = cli.config else {
        return process::fail(PROGRAM, 2, "--config is required");
    };
    let checked = match app::check(&config, std::env::var(app::TOKEN_ENV).ok()) {
        Ok(checked) => checked,
        Err(e) => return process::fail(PROGRAM, 2, e),
    };
    if cli.validate {
        println!("{}: ok: {checked}", config.display());
        return ExitCode::SUCCESS;
    }
    let work = app::run(checked, process::shutdown_signal());
    process::serve(PROGRAM, &cli.log, cli.log_format, work)
}

fn run_ctl(addr: String, token: Option<String>, command: CtlCommand) -> ExitCode {
    if let CtlCommand::Rules {
        command: RulesCommand::Validate { file },
    } = &command
    {
        return finish(ctl::rules_validate(file));
    }
    let Some(token) = token else {
        return process::fail(
            PROGRAM,
            2,
            "ctl needs the admin token: set COORDINATOR_TOKEN or pass --token",
        );
    };
    let client = ctl::Client { addr, token };
    finish(match command {
        CtlCommand::Status => ctl::status(&client),
        CtlCommand::Rules { command } => match command {
            RulesCommand::Show => ctl::rules_show(&client),
            RulesCommand::Validate { file } => ctl::rules_validate(&file),
            RulesCommand::Apply { file, dry_run } => ctl::rules_apply(&client, &file, dry_run),
        },
        CtlCommand::Pin { rule, shares } => ctl::pin(&client, &rule, &shares),
        CtlCommand::Unpin { rule } => ctl::unpin(&client, &rule),
        CtlCommand::Rebalance => ctl::rebalance(&client),
    })
}

/// Prints the output, or the error with exit 1 (2 for a local usage problem).
fn finish(result: Result<String, ctl::CtlError>) -> ExitCode {
    match result {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e @ ctl::CtlError::Usage(_)) => process::fail(PROGRAM, 2, e),
        Err(e) => process::fail(PROGRAM, 1, e),
    }
}

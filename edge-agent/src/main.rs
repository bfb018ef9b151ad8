//! `edge-agent`: the edge tier as a process beside a CDN node. Flags and exit codes live
//! here; the work is in the library's `app` module.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use edge_agent::app;
use shared::process::{self, LogFormat};

/// The edge agent of a hierarchical rate limiter, run beside a CDN or PoP node: it answers
/// `POST /v1/check` over HTTP, deciding locally while it holds quota granted by its region's
/// regional aggregator (QUIC with mutual TLS), and asking the regional near a limit. With a
/// `proxy:` section in its config it is also a reverse proxy: every other request is decided
/// and then forwarded to the upstream, or answered 429.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The configuration file (YAML): node name, region, HTTP address, rules file, the
    /// regional's addresses, TLS files, identity headers, and optionally `proxy:` (`upstream:
    /// http://host:port`, `connect_timeout`, `timeout`) for reverse-proxy mode. Relative paths
    /// in it are read from its directory. The file and its rules file are read again on
    /// SIGHUP or when either changes on disk: `identity:`, `proxy:` and a rules file with a
    /// newer `version:` apply while running, a refused file changes nothing, and other fields
    /// wait for a restart.
    #[arg(short, long, value_name = "FILE", env = "EDGE_CONFIG")]
    config: PathBuf,

    /// Check the configuration, the rules file and the TLS files, print what they describe,
    /// and exit: 0 when everything is usable, 2 with the file and field at fault otherwise.
    /// Nothing is bound and the regional is not dialed.
    #[arg(long)]
    validate: bool,

    /// Which events to log: a level (error, warn, info, debug, trace) or per-module filters
    /// such as `info,edge_agent::quic=debug`.
    #[arg(long, value_name = "FILTER", env = "EDGE_LOG", default_value = "info")]
    log: String,

    /// How logs are written to stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    const PROGRAM: &str = "edge-agent";
    let cli = Cli::parse();
    let checked = match app::check(&cli.config) {
        Ok(checked) => checked,
        Err(e) => return process::fail(PROGRAM, 2, e),
    };
    if cli.validate {
        println!("{}: ok: {checked}", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let work = app::run(checked, process::shutdown_signal());
    process::serve(PROGRAM, &cli.log, cli.log_format, work)
}

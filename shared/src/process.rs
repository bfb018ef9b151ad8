//! What every tier's binary does the same way: read its files with located errors, log to
//! stderr (human or JSON, filtered per module), run on a multi-threaded runtime until Ctrl-C
//! or SIGTERM (what systemd and Kubernetes send), and exit with 2 for a bad configuration, 1
//! for a failure while running. One copy, so the binaries behave alike for the operator.

use std::{fmt::Display, fs, future::Future, io::IsTerminal, path::Path, process::ExitCode};

use crate::{ConfigError, RuleSet};

/// The contents of a configuration or rules file, or a [`ConfigError`] naming it.
///
/// # Errors
///
/// [`ConfigError::Document`] when it cannot be read, saying why.
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path).map_err(|e| ConfigError::Document {
        file: path.display().to_string(),
        reason: format!("cannot read it: {e}"),
    })
}

/// The rules file at `path`, refused whole with a located error if any of it is wrong.
///
/// # Errors
///
/// As [`read_file`] and [`RuleSet::from_yaml`].
pub fn load_rules(path: &Path) -> Result<RuleSet, ConfigError> {
    RuleSet::from_yaml(&path.display().to_string(), &read_file(path)?)
}

/// Says `message` on stderr as `program: message` and returns exit status `code`.
pub fn fail(program: &str, code: u8, message: impl Display) -> ExitCode {
    eprintln!("{program}: {message}");
    ExitCode::from(code)
}

/// Installs the logger, then runs `work` on a multi-threaded runtime until it ends; hand it
/// [`shutdown_signal`] so that it ends on Ctrl-C or SIGTERM. Exit 0 when it ends well, 2 for
/// a bad `--log` filter, 1 otherwise.
pub fn serve<E: Display>(
    program: &str,
    log: &str,
    format: LogFormat,
    work: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    if let Err(e) = init_logging(log, format) {
        return fail(program, 2, e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(program, 1, format_args!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(program, 1, e),
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Sends `tracing` events to stderr, filtered by `filter` (`info`, or per module as in
/// `info,regional_aggregator::breaker=debug`).
///
/// # Errors
///
/// When `filter` is not a valid filter, saying why.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("--log {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal, never into a file or a log shipper.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Completes on Ctrl-C or SIGTERM (what systemd and Kubernetes send), whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    futures_util::future::select(std::pin::pin!(ctrl_c), std::pin::pin!(terminate)).await;
}

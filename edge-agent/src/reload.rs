//! Hot reload of the `edge-agent` binary's configuration file and the rules file it names.
//!
//! The binary watches both ([`watch`]): on `SIGHUP`, and whenever either file's contents
//! differ from what it last read (looked at every [`WATCH_INTERVAL`], so a Kubernetes
//! ConfigMap update or an editor's save is picked up without a signal), it reads them again
//! and checks them whole, with the TLS files they name, exactly as start-up does ([`read`]). A file that is refused changes nothing:
//! the error is logged with its file and field, `edge_config_reloads_total{result="refused"}`
//! counts it, and the running configuration stays (a half-written file is simply read again
//! at the next change).
//!
//! What a checked file may change while the edge serves:
//!
//! - `identity:` (the identity headers, trusted proxies) and `proxy:` (upstream, timeouts,
//!   or the mode itself): from the next request on ([`Api::reconfigure`]); requests in flight
//!   finish as they began.
//! - The rules: a rule set whose `version:` is newer than the one in force replaces it
//!   ([`Agent::set_rules`], as a rule set pushed by the regional does). One that is not newer
//!   is not applied and the log says so: versions are how the coordinator's rules and a file's
//!   are told apart, so an edit without a new version could be undone by the next push, or
//!   undo one.
//!
//! Everything else (node, region, `listen`, the regional's addresses and name, the TLS files,
//! `flush_interval`, `timeout`, `threshold`) is bound into sockets, certificates or the
//! agent's quota arithmetic at start-up; a change to it is logged as needing a restart and
//! the running value stays.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use shared::{
    RuleSet,
    net::{self, Identity},
    process::read_file,
};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{Agent, app::StartError, http::Api, settings::Settings};

/// How often the files are looked at for a change.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The texts last read, so that only a change is reloaded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The configuration file.
    pub config: String,
    /// The rules file it named.
    pub rules: String,
}

/// What one reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// What was applied: `identity`, `proxy`, `rules`.
    pub applied: Vec<&'static str>,
    /// Fields that changed but take effect only at the next restart.
    pub need_restart: Vec<&'static str>,
    /// The file's rules were not applied: their version, and the one in force, which is not
    /// older.
    pub rules_not_newer: Option<(u64, u64)>,
    /// The version of the rules in force afterwards.
    pub rules_version: u64,
}

/// One reading of the configuration and everything it names, as start-up reads them.
pub struct Attempt {
    /// The texts read (empty for a file that could not be read): what the next change is
    /// judged against, refused or not.
    pub seen: Seen,
    /// The rules file the configuration names, when it parsed that far.
    pub rules_path: Option<PathBuf>,
    /// The configuration, its rules and its TLS identity, or the first problem found, naming
    /// its file and field.
    pub result: Result<(Settings, RuleSet, Identity), StartError>,
}

/// Reads the configuration at `path`, its rules file and its TLS files, and checks them all.
pub fn read(path: &Path) -> Attempt {
    let mut seen = Seen::default();
    let mut rules_path = None;
    let result = (|| -> Result<_, StartError> {
        seen.config = read_file(path)?;
        let settings = Settings::parse(path, &seen.config)?;
        rules_path = Some(settings.rules.clone());
        seen.rules = read_file(&settings.rules)?;
        let rules = RuleSet::from_yaml(&settings.rules.display().to_string(), &seen.rules)?;
        let tls = &settings.tls;
        let identity = Identity::from_files(&tls.ca, &tls.cert, &tls.key)?;
        net::client_config(&identity)?;
        Ok((settings, rules, identity))
    })();
    Attempt {
        seen,
        rules_path,
        result,
    }
}

/// Applies a checked configuration to a running edge that started with `started`, and says
/// what it did. The rules are swapped on a blocking thread: [`Agent::set_rules`] walks the
/// key map.
pub async fn apply(
    started: &Settings,
    settings: Settings,
    rules: RuleSet,
    rules_changed: bool,
    api: &Api,
) -> Reloaded {
    let mut reloaded = Reloaded {
        need_restart: need_restart(started, &settings),
        ..Reloaded::default()
    };
    reloaded.applied = api.reconfigure(settings.identity, settings.proxy);
    let agent: Arc<Agent> = api.agent.clone();
    let (new, running) = (rules.version(), agent.rules().version());
    if new > running {
        let swapped = tokio::task::spawn_blocking(move || agent.set_rules(rules)).await;
        if matches!(swapped, Ok(true)) {
            reloaded.applied.push("rules");
        } else {
            // A newer set pushed by the regional in between wins, as it should.
            reloaded.rules_not_newer = Some((new, api.agent.rules().version()));
        }
    } else if rules_changed {
        reloaded.rules_not_newer = Some((new, running));
    }
    reloaded.rules_version = api.agent.rules().version();
    reloaded
}

/// The fields of `new` that differ from `started` and are read only at start-up.
fn need_restart(started: &Settings, new: &Settings) -> Vec<&'static str> {
    let fields = [
        ("node", started.node != new.node),
        ("region", started.region != new.region),
        ("listen", started.listen != new.listen),
        (
            "regional.addresses",
            started.regional_addresses != new.regional_addresses,
        ),
        ("regional.name", started.regional_name != new.regional_name),
        ("tls", started.tls != new.tls),
        (
            "flush_interval",
            started.agent.flush_interval != new.agent.flush_interval,
        ),
        (
            "timeout",
            started.agent.upstream_timeout != new.agent.upstream_timeout,
        ),
        (
            "threshold",
            started.agent.near_limit_threshold != new.agent.near_limit_threshold,
        ),
    ];
    fields
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
}

/// Reloads `path` on `hangup` (SIGHUP, when it could be listened for) and on every change to
/// it or its rules file, until the task is dropped. `seen` is what start-up read.
///
/// The signal is listened for by the caller before anything slow at start-up, so that a
/// `systemctl reload` that comes early finds the handler in place rather than SIGHUP's
/// default action, which ends the process.
pub async fn watch(
    path: PathBuf,
    started: Settings,
    mut seen: Seen,
    api: Arc<Api>,
    mut hangup: Option<Signal>,
) {
    let mut rules_path = started.rules.clone();
    // The rules text last judged by a reload that went through: whether the rules changed
    // is asked against it, so that a refused reload in between does not hide a change.
    let mut judged_rules = seen.rules.clone();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if !forced && !changed(&path, &rules_path, &seen) {
            continue;
        }
        let attempt = read(&path);
        // What was read, refused or not, is what the next change is judged against: a
        // half-written file that was refused is read again when it changes, and a rules file
        // newly named is the one watched.
        seen = attempt.seen;
        if let Some(path) = attempt.rules_path {
            rules_path = path;
        }
        match attempt.result {
            Ok((settings, rules, _)) => {
                let rules_changed = seen.rules != judged_rules;
                judged_rules = seen.rules.clone();
                let reloaded = apply(&started, settings, rules, rules_changed, &api).await;
                api.metrics.record_reload(true);
                log(&path, &reloaded);
            }
            Err(e) => {
                api.metrics.record_reload(false);
                tracing::error!("configuration reload refused, the running one stays: {e}");
            }
        }
    }
}

/// SIGHUP, listened for from now on; `None`, with a warning, when it cannot be.
pub fn hangup() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the files are still watched");
            None
        }
    }
}

/// Whether the configuration or the rules file differs from `seen`. A file that cannot be
/// read reads as empty: its going missing is a change, reported once, and not again every
/// second while it stays missing.
fn changed(config: &Path, rules: &Path, seen: &Seen) -> bool {
    let differs = |path: &Path, text: &str| read_file(path).unwrap_or_default() != text;
    differs(config, &seen.config) || differs(rules, &seen.rules)
}

fn log(path: &Path, reloaded: &Reloaded) {
    let file = path.display();
    if let Some((file_version, running)) = reloaded.rules_not_newer {
        tracing::warn!(
            "{file}: the rules file changed but its version {file_version} is not newer than \
             the rules in force (version {running}); raise `version:` to apply it"
        );
    }
    if !reloaded.need_restart.is_empty() {
        tracing::warn!(
            "{file}: {} changed; the running values stay until the next restart",
            reloaded.need_restart.join(", ")
        );
    }
    let applied = reloaded.applied.join(", ");
    tracing::info!(
        rules_version = reloaded.rules_version,
        "{file}: configuration reloaded; applied: {}",
        if applied.is_empty() {
            "nothing"
        } else {
            &applied
        }
    );
}

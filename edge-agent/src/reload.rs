//! Hot reload of the `edge-agent` binary's configuration file and the rules file it names.
//!
//! The binary watches both ([`watch`]): on `SIGHUP`, and whenever either file's contents
//! differ from what it last read (looked at every [`WATCH_INTERVAL`], so a Kubernetes
//! ConfigMap update or an editor's save is picked up without a signal), it reads them again
//! and checks them whole, exactly as start-up does. A file that is refused changes nothing:
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

use shared::{ConfigError, RuleSet, process::read_file};

use crate::{Agent, http::Api, settings::Settings};

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

/// Reads the configuration at `path` and its rules file, as start-up reads them.
///
/// # Errors
///
/// The first problem found, naming its file and field.
pub fn read(path: &Path) -> Result<(Settings, RuleSet, Seen), ConfigError> {
    let config = read_file(path)?;
    let settings = Settings::parse(path, &config)?;
    let rules = read_file(&settings.rules)?;
    let rule_set = RuleSet::from_yaml(&settings.rules.display().to_string(), &rules)?;
    Ok((settings, rule_set, Seen { config, rules }))
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
        // A newer set pushed by the regional in between wins, as it should.
        if matches!(swapped, Ok(true)) {
            reloaded.applied.push("rules");
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

/// Reloads `path` on `SIGHUP` and on every change to it or its rules file, until the task is
/// dropped. `seen` is what start-up read.
pub async fn watch(path: PathBuf, started: Settings, mut seen: Seen, api: Arc<Api>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the files are still watched");
            None
        }
    };
    let mut rules_path = started.rules.clone();
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
        match read(&path) {
            Ok((settings, rules, now)) => {
                rules_path = settings.rules.clone();
                let rules_changed = now.rules != seen.rules;
                seen = now;
                let reloaded = apply(&started, settings, rules, rules_changed, &api).await;
                api.metrics.record_reload(true);
                log(&path, &reloaded);
            }
            Err(e) => {
                // Remember what was refused, so that it is not refused again every second;
                // the next edit is read again.
                seen.config = read_file(&path).unwrap_or_default();
                seen.rules = read_file(&rules_path).unwrap_or_default();
                api.metrics.record_reload(false);
                tracing::error!("configuration reload refused, the running one stays: {e}");
            }
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

//! The edge's metrics, served at `GET /metrics` by the binary and available to embedders who
//! run their own Prometheus registry.
//!
//! Two kinds, so that `check` itself pays nothing extra:
//!
//! - What the caller records per decision, [`EdgeMetrics::record`]: checks by rule, result
//!   and path, fallbacks by rule and mode, and the decision latency by path. Per-rule
//!   counters are looked up once per rule and cached, so recording is a map lookup and two
//!   atomic adds. The cache follows the agent's rules: a decision by a limit it does not
//!   know (a rule set pushed since) rebuilds it once from the rules in force, keeping the
//!   counters of the limits that stay. The counters and histograms are striped
//!   ([`shared::metrics::Counter`]), so threads deciding at once do not share their lines.
//! - What the agent counts anyway ([`Agent::stats`] and friends), read at scrape time by a
//!   collector: the local-decision ratio and why the other decisions were not local, shadow
//!   would-denials, sync batches, sizes and lag,
//!   grant utilisation, lost windows, keys held, the rule set's version and whether the
//!   regional is connected.
//!
//! In reverse-proxy mode the binary also counts what became of each proxied request,
//! [`EdgeMetrics::record_proxied`]: forwarded, denied, upstream error or bad request; and
//! every binary its configuration reloads, [`EdgeMetrics::record_reload`].
//!
//! Labels are per rule (its id) at most, never per key.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, family::Family},
    registry::{Registry, Unit},
};
use shared::{
    FailureMode, LimitId,
    metrics::{Counter, Histogram, counter, gauge},
};

use crate::{Agent, Decision, DecisionPath, ExactReason, QuicUpstream, proxy::ProxyOutcome};

/// The edge's metrics registry and the handles `record` updates.
pub struct EdgeMetrics {
    registry: Registry,
    checks: Family<CheckLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    /// Per limit of the rules in force, the rule's name and its counters, resolved on first
    /// use; rebuilt when a decision names a limit it lacks (see [`EdgeMetrics::refresh`]).
    rules: ArcSwap<RuleTable>,
    /// Where `rules` comes from.
    agent: Arc<Agent>,
    /// Requests no rule applies to.
    unlimited: Counter,
    /// Decision latency, by [`path_index`].
    latency: [Histogram; PATHS],
    proxied: Family<OutcomeLabel, Counter>,
    /// By [`ProxyOutcome::index`], resolved on first use so that an edge that is not a proxy
    /// shows no proxy series.
    proxied_by_outcome: [OnceLock<Counter>; ProxyOutcome::ALL.len()],
    /// Configuration reloads, by result.
    reloads: Family<ResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    rule: String,
    result: &'static str,
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    rule: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

/// Looked up on every decision: foldhash, as the agent's own key map.
type RuleTable = HashMap<LimitId, Arc<RuleCounters>, foldhash::fast::RandomState>;

struct RuleCounters {
    rule: String,
    /// By `path_index · 2 + denied`.
    checks: [OnceLock<Counter>; PATHS * 2],
    /// By `mode_index`.
    fallbacks: [OnceLock<Counter>; 3],
}

impl RuleCounters {
    fn new(rule: &str) -> RuleCounters {
        RuleCounters {
            rule: rule.to_owned(),
            checks: Default::default(),
            fallbacks: Default::default(),
        }
    }
}

/// The paths a decision can take, as label values; `Unlimited` is counted apart.
const PATHS: usize = 5;
const PATH_NAMES: [&str; PATHS] = ["unlimited", "local", "cached_denial", "exact", "fallback"];
const MODE_NAMES: [&str; 3] = ["local", "open", "closed"];

fn path_index(path: DecisionPath) -> usize {
    match path {
        DecisionPath::Unlimited => 0,
        DecisionPath::Local => 1,
        DecisionPath::CachedDenial => 2,
        DecisionPath::Exact => 3,
        DecisionPath::Fallback(_) => 4,
    }
}

fn mode_index(mode: FailureMode) -> usize {
    match mode {
        FailureMode::Local => 0,
        FailureMode::Open => 1,
        FailureMode::Closed => 2,
    }
}

impl EdgeMetrics {
    /// Metrics for `agent`, named `edge_*`. `upstream`, when given, is reported as
    /// `edge_upstream_connected`.
    pub fn new(agent: Arc<Agent>, upstream: Option<Arc<QuicUpstream>>) -> EdgeMetrics {
        let mut registry = Registry::with_prefix("edge");
        let checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "checks",
            "Decisions, by the rule that answered (none: no rule applies), result and path \
             (local, cached_denial, exact, fallback)",
            checks.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Decisions made by a rule's failure mode because the regional did not answer in \
             time, by rule and mode",
            fallbacks.clone(),
        );
        let latency_family =
            Family::<PathLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                Histogram::latency,
            );
        let latency =
            PATH_NAMES.map(|path| latency_family.get_or_create(&PathLabel { path }).clone());
        registry.register_with_unit(
            "decision_duration",
            "Time to decide one check, by path",
            Unit::Seconds,
            latency_family,
        );
        registry.register(
            "sync_batch_keys",
            "Keys per acknowledged sync batch",
            agent.sync_batch_sizes().clone(),
        );
        let rules = ArcSwap::from_pointee(rule_table(&agent, &RuleTable::default()));
        let unlimited = checks
            .get_or_create(&CheckLabels {
                rule: "none".to_owned(),
                result: "allowed",
                path: "unlimited",
            })
            .clone();
        let proxied = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "proxy_requests",
            "Requests the reverse proxy handled, by outcome: forwarded (the upstream answered), \
             denied (429 from the edge), upstream_error (502: the upstream was unreachable or \
             silent past its timeout), bad_request (400)",
            proxied.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Reloads of the binary's configuration file (SIGHUP, or a change on disk), by \
             result: applied (read and checked whole) or refused (the running one stays)",
            reloads.clone(),
        );
        registry.register_collector(Box::new(AgentCollector {
            agent: agent.clone(),
            upstream,
        }));
        EdgeMetrics {
            registry,
            checks,
            fallbacks,
            rules,
            agent,
            unlimited,
            latency,
            proxied,
            proxied_by_outcome: Default::default(),
            reloads,
        }
    }

    /// Counts one reload of the binary's configuration: `applied`, or refused.
    pub fn record_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts one request the reverse proxy handled.
    pub fn record_proxied(&self, outcome: ProxyOutcome) {
        self.proxied_by_outcome[outcome.index()]
            .get_or_init(|| {
                self.proxied
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.as_str(),
                    })
                    .clone()
            })
            .inc();
    }

    /// Counts one decision that took `elapsed`.
    pub fn record(&self, decision: &Decision, elapsed: Duration) {
        let path = path_index(decision.path);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.latency[path].observe(nanos);
        let Some(id) = decision.rule else {
            self.unlimited.inc();
            return;
        };
        let mut rules = self.rules.load();
        if !rules.contains_key(&id) {
            self.refresh(&rules);
            rules = self.rules.load();
        }
        let Some(rule) = rules.get(&id) else {
            // Decided by a limit the rules in force no longer have: a decision made just as
            // the rules changed.
            self.unlimited.inc();
            return;
        };
        let denied = usize::from(!decision.allowed);
        rule.checks[path * 2 + denied]
            .get_or_init(|| {
                self.checks
                    .get_or_create(&CheckLabels {
                        rule: rule.rule.clone(),
                        result: if denied == 1 { "denied" } else { "allowed" },
                        path: PATH_NAMES[path],
                    })
                    .clone()
            })
            .inc();
        if let DecisionPath::Fallback(mode) = decision.path {
            let mode = mode_index(mode);
            rule.fallbacks[mode]
                .get_or_init(|| {
                    self.fallbacks
                        .get_or_create(&FallbackLabels {
                            rule: rule.rule.clone(),
                            mode: MODE_NAMES[mode],
                        })
                        .clone()
                })
                .inc();
        }
    }

    /// Rebuilds the per-limit table from the agent's rules in force, keeping the counters
    /// `old` had resolved for the limits that stay.
    fn refresh(&self, old: &RuleTable) {
        self.rules.store(Arc::new(rule_table(&self.agent, old)));
    }

    /// The registry, to render or to add to.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything as OpenMetrics text.
    pub fn render(&self) -> String {
        shared::metrics::render(&self.registry)
    }
}

/// The per-limit table for the agent's rules in force, taking over `old`'s entries.
fn rule_table(agent: &Agent, old: &RuleTable) -> RuleTable {
    agent
        .rules()
        .limits()
        .map(|(rule, limit)| {
            let id = limit.id();
            let counters = old
                .get(&id)
                .cloned()
                .unwrap_or_else(|| Arc::new(RuleCounters::new(rule.id())));
            (id, counters)
        })
        .collect()
}

/// Reads the agent's own counters at scrape time.
struct AgentCollector {
    agent: Arc<Agent>,
    upstream: Option<Arc<QuicUpstream>>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // OpenMetrics spells it `ratio`; the crate's `Unit::Ratios` says `ratios`.
        let ratio_unit = Unit::Other("ratio".to_owned());
        let stats = self.agent.stats();
        let decided = stats.local + stats.exact + stats.fallback;
        gauge(
            &mut encoder,
            "local_decision",
            "Share of decisions made without the network, since start.",
            Some(&ratio_unit),
            ratio(stats.local, decided),
        )?;
        counter(
            &mut encoder,
            "denials",
            "Requests denied, by any path.",
            stats.denied,
        )?;
        {
            let mut reasons = encoder.encode_descriptor(
                "exact_reasons",
                "Requests not decidable locally (decided exact or by a failure mode), by why: \
                 near_limit (above θ·P), no_grant (none in this window and no cold allowance), \
                 grant_spent, exact_only (sliding log, leaky-bucket shaper).",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in ExactReason::ALL.iter().zip(stats.exact_reasons) {
                let labels = ReasonLabel {
                    reason: reason.as_str(),
                };
                ConstCounter::new(n).encode(reasons.encode_family(&labels)?)?;
            }
        }
        {
            let mut shadow = encoder.encode_descriptor(
                "shadow_would_deny",
                "Requests a shadow rule would have denied (none was), by rule.",
                None,
                MetricType::Counter,
            )?;
            let rules = self.agent.rules();
            for (limit, n) in self.agent.shadow_denials_by_limit() {
                let rule = rules.limit(limit).map_or("unknown", |(r, _)| r.id());
                let labels = RuleLabel {
                    rule: rule.to_owned(),
                };
                ConstCounter::new(n).encode(shadow.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut encoder,
            "sync_batches",
            "Sync batches the regional acknowledged.",
            stats.syncs,
        )?;
        counter(
            &mut encoder,
            "sync_failures",
            "Sync batches that failed or timed out (their counts are resent).",
            stats.sync_failures,
        )?;
        let now = self.agent.now();
        gauge(
            &mut encoder,
            "sync_lag",
            "Time since the regional last had every count this edge made (a flush fully acknowledged, or with nothing to send).",
            Some(&Unit::Seconds),
            (now - stats.last_sync_at).as_u64() as f64 * 1e-9,
        )?;
        counter(
            &mut encoder,
            "lost_windows",
            "Windows whose counts were dropped before the regional acknowledged them.",
            stats.lost_windows,
        )?;
        counter(
            &mut encoder,
            "grant_units",
            "Quota units granted by the regional.",
            stats.granted,
        )?;
        counter(
            &mut encoder,
            "grant_returned_units",
            "Quota units handed back unused.",
            stats.returned,
        )?;
        gauge(
            &mut encoder,
            "grant_utilisation",
            "Share of granted quota not handed back, since start.",
            Some(&ratio_unit),
            ratio(stats.granted.saturating_sub(stats.returned), stats.granted),
        )?;
        gauge(
            &mut encoder,
            "keys",
            "Keys this edge holds state for.",
            None,
            self.agent.keys() as f64,
        )?;
        gauge(
            &mut encoder,
            "rule_set_version",
            "Version of the rule set enforced.",
            None,
            self.agent.rules().version() as f64,
        )?;
        if let Some(upstream) = &self.upstream {
            gauge(
                &mut encoder,
                "upstream_connected",
                "1 while connected to a regional.",
                None,
                if upstream.connected_to().is_some() {
                    1.0
                } else {
                    0.0
                },
            )?;
        }
        Ok(())
    }
}

/// `part / whole`, and 0 for nothing at all.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

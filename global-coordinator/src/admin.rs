//! The admin HTTP API operators and `ctl` use (DESIGN §8), and `GET /metrics`.
//!
//! Every `/api/v1/…` request needs `Authorization: Bearer <token>`; without it, or with
//! another token, the answer is `401` and nothing else is said. The token is compared in
//! constant time and never logged. `GET /metrics` and `GET /healthz` need no token: they
//! reveal no rule and change nothing, and scrapers and probes rarely carry secrets.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/rate-limits` | the rule set: version, rule ids, YAML |
//! | `POST /api/v1/rate-limits[?dry_run=true]` | YAML body: validated whole, then applied (or only diffed); `400` with the located error |
//! | `DELETE /api/v1/rate-limits/{id}` | the rule set without that rule, a new version |
//! | `GET /api/v1/partitions` | per rule: shares by region, pinned or not, partitions of each limit |
//! | `POST /api/v1/partitions/{rule}/pin` | JSON body `{"eu": 0.7, "us": 0.3}` |
//! | `DELETE /api/v1/partitions/{rule}/pin` | the rule follows demand again |
//! | `POST /api/v1/rebalance` | recompute every unpinned rule's shares now |
//! | `GET /api/v1/regions` | the regions, their floors, connected regionals and edges, last report age |
//! | `GET /api/v1/debug/{key}` | what every region holds for that key: partition, usage, each edge's counters (or that no regional of it is connected) |
//! | `GET /api/v1/metrics` | the same counters as `/metrics`, as JSON |
//!
//! Every change that is applied is then pushed to the regionals: a new rule set at once, new
//! shares by the partition protocol of [`link`](crate::link).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use serde::Serialize;
use serde_json::json;
use shared::{
    http::{json_error as error, read_body},
    metrics::{counter, gauge},
};

use crate::{
    coordinator::{ChangeError, Coordinator},
    link::Links,
};

/// The largest body read: a rule set of a few thousand rules.
pub const MAX_BODY: usize = 1024 * 1024;

/// What the API answers with.
pub struct Admin {
    coordinator: Arc<Coordinator>,
    links: Arc<Links>,
    token: String,
    stats: Arc<AdminStats>,
    registry: Registry,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AdminStats {
    requests: AtomicU64,
    unauthorized: AtomicU64,
    changes: AtomicU64,
    refused: AtomicU64,
}

impl Admin {
    /// Answers for `coordinator`, to holders of `token`.
    pub fn new(coordinator: Arc<Coordinator>, links: Arc<Links>, token: String) -> Admin {
        let stats = Arc::new(AdminStats::default());
        let mut registry = Registry::with_prefix("coordinator");
        registry.register_collector(Box::new(CoordinatorCollector {
            coordinator: coordinator.clone(),
            links: links.clone(),
            stats: stats.clone(),
        }));
        Admin {
            coordinator,
            links,
            token,
            stats,
            registry,
        }
    }

    /// Answers one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        match (&method, path.as_str()) {
            (&Method::GET, "/metrics") => return shared::metrics::response(&self.registry),
            (&Method::GET, "/healthz") => {
                return shared::http::text(StatusCode::OK, "ok\n");
            }
            _ => {}
        }
        let Some(route) = path.strip_prefix("/api/v1/") else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint: {path}; the admin API is under /api/v1/"),
            );
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if !self.authorized(&request) {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <the admin token>".into(),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let dry_run = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "dry_run=true" || p == "dry_run"));
        let segments: Vec<&str> = route.split('/').collect();
        let body = match read_body(request.into_body(), MAX_BODY).await {
            Ok(body) => body,
            Err(r) => return r,
        };
        let c = &self.coordinator;
        let answer = match (&method, segments.as_slice()) {
            (&Method::GET, ["rate-limits"]) => {
                let rules = c.rules();
                let ids: Vec<&str> = rules.rules().iter().map(|r| r.id()).collect();
                Ok(ok(&json!({
                    "version": rules.version(),
                    "rules": ids,
                    "yaml": rules.source(),
                })))
            }
            (&Method::POST, ["rate-limits"]) => match std::str::from_utf8(&body) {
                Err(e) => Err(ChangeError::Invalid(format!("the body is not UTF-8: {e}"))),
                Ok(yaml) => c.apply(yaml, dry_run).map(|(version, diff)| {
                    ok(&json!({
                        "version": version,
                        "applied": !dry_run,
                        "added": diff.added,
                        "removed": diff.removed,
                        "changed": diff.changed,
                    }))
                }),
            },
            (&Method::DELETE, ["rate-limits", id]) => c
                .delete(id)
                .map(|version| ok(&json!({ "version": version, "removed": [id] }))),
            (&Method::GET, ["partitions"]) => Ok(ok(&partitions(c))),
            (&Method::POST, ["partitions", rule, "pin"]) => {
                match serde_json::from_slice::<BTreeMap<String, f64>>(&body) {
                    Err(e) => Err(ChangeError::Invalid(format!(
                        "the body must be a JSON object of region: fraction: {e}"
                    ))),
                    Ok(fractions) => c.pin(rule, &fractions).map(|shares| {
                        ok(&json!({ "rule": rule, "pinned": true, "shares": ppm_map(&shares) }))
                    }),
                }
            }
            (&Method::DELETE, ["partitions", rule, "pin"]) => c.unpin(rule).map(|shares| {
                ok(&json!({ "rule": rule, "pinned": false, "shares": ppm_map(&shares) }))
            }),
            (&Method::POST, ["rebalance"]) => c.rebalance().map(|()| ok(&partitions(c))),
            (&Method::GET, ["regions"]) => {
                let status = self.links.status();
                let regions: Vec<_> = c
                    .regions()
                    .iter()
                    .zip(status)
                    .map(|(r, s)| {
                        json!({
                            "name": r.name,
                            "floor": f64::from(r.floor_ppm) / 1e6,
                            "connected": s.regionals > 0,
                            "regionals": s.regionals,
                            "edges": s.edges,
                            "last_report_age_seconds": s.last_report_age_seconds,
                        })
                    })
                    .collect();
                Ok(ok(&json!({ "regions": regions })))
            }
            (&Method::GET, ["debug", key]) => Ok(ok(&self.debug(key).await)),
            (&Method::GET, ["metrics"]) => Ok(ok(&self.metrics_json())),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no such endpoint: {method} {path}"),
                );
            }
        };
        match answer {
            Ok(r) => {
                if method != Method::GET && !dry_run {
                    self.stats.changes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%method, %path, "admin change applied");
                    // Answered once the change is out: connected regionals hold the new rules
                    // (and have passed them to their edges) and the partitions that go with
                    // them, or their call timeouts passed. An operator's `ctl rules apply`
                    // returning means the edges enforce it, and a new limit is not left
                    // without partitions (denying its hard keys) while the push is underway.
                    if segments.first() == Some(&"rate-limits") {
                        self.links.push_rules().await;
                    }
                    self.links.sync().await;
                }
                r
            }
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%method, %path, error = %e, "admin change refused");
                match e {
                    ChangeError::NoSuchRule(_) => {
                        error(StatusCode::NOT_FOUND, "not_found", e.to_string())
                    }
                    ChangeError::Write { .. } => {
                        error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                    }
                    ChangeError::Rules(_) | ChangeError::Invalid(_) => {
                        error(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
                    }
                }
            }
        }
    }

    /// `GET /api/v1/debug/{key}`: every region's ledgers of `key`, with rule ids; a region
    /// with no regional connected says so rather than being left out.
    async fn debug(&self, key: &str) -> serde_json::Value {
        let rules = self.coordinator.rules();
        let mut reports = self.links.key_reports(key).await;
        for region in self.coordinator.regions() {
            reports
                .entry(region.name.clone())
                .or_insert_with(|| Err("no regional of this region is connected".to_owned()));
        }
        let regions: BTreeMap<String, serde_json::Value> = reports
            .into_iter()
            .map(|(region, report)| {
                let value = match report {
                    Err(e) => json!({ "error": e }),
                    Ok(r) => {
                        let holdings: Vec<_> = r
                            .holdings
                            .iter()
                            .map(|h| {
                                json!({
                                    "rule": rules.limit(h.limit).map(|(rule, _)| rule.id()),
                                    "limit_id": h.limit.0,
                                    "window": h.window,
                                    "partition": h.partition,
                                    "used": h.total,
                                    "exact": h.exact,
                                    "edges": h.edges.iter().map(|e| json!({
                                        "edge": e.edge,
                                        "granted": e.granted,
                                        "released": e.released,
                                        "used": e.used,
                                    })).collect::<Vec<_>>(),
                                })
                            })
                            .collect();
                        json!({ "holdings": holdings })
                    }
                };
                (region, value)
            })
            .collect();
        json!({ "key": key, "regions": regions })
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.as_bytes(), self.token.as_bytes())
    }

    fn metrics_json(&self) -> serde_json::Value {
        let rules = self.coordinator.rules();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let links = self.links.stats();
        json!({
            "rule_set_version": rules.version(),
            "rules": rules.rules().len(),
            "regions": self.coordinator.regions().len(),
            "admin_requests": load(&self.stats.requests),
            "admin_unauthorized": load(&self.stats.unauthorized),
            "admin_changes": load(&self.stats.changes),
            "admin_refused": load(&self.stats.refused),
            "reports": load(&links.reports),
            "escalations": load(&links.escalations),
            "transferred_units": load(&links.transferred),
            "late_released_units": load(&links.late_units),
            "hot_key_moves": load(&links.hot_key_moves),
            "partition_pushes": load(&links.pushes),
        })
    }
}

/// Compares without stopping at the first difference, so response time says nothing about
/// how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn partitions(c: &Coordinator) -> serde_json::Value {
    let rules = c.rules();
    let shares = c.shares();
    let demand = c.demand_now();
    let list: Vec<_> = rules
        .rules()
        .iter()
        .filter_map(|rule| {
            let (shares, pinned) = shares.get(rule.id())?;
            let limits: Vec<_> = rule
                .limits()
                .iter()
                .map(|l| {
                    let value = l.limiter().limit();
                    json!({
                        "limit": value,
                        "window_seconds": l.limiter().window().as_u64() as f64 / 1e9,
                        "partitions": Coordinator::partition(shares, value),
                    })
                })
                .collect();
            let usage: BTreeMap<&str, u64> = c
                .regions()
                .iter()
                .map(|r| {
                    let d = demand.get(&(rule.id().to_owned(), r.name.clone()));
                    (r.name.as_str(), d.copied().unwrap_or(0))
                })
                .collect();
            Some(json!({
                "rule": rule.id(),
                "pinned": pinned,
                "shares": ppm_map(shares),
                "demand_per_second": usage,
                "limits": limits,
            }))
        })
        .collect();
    json!({ "version": rules.version(), "rules": list })
}

fn ppm_map(shares: &BTreeMap<String, u32>) -> BTreeMap<&str, f64> {
    shares
        .iter()
        .map(|(r, &p)| (r.as_str(), f64::from(p) / 1e6))
        .collect()
}

fn ok(body: &impl Serialize) -> Response<Full<Bytes>> {
    shared::http::json(StatusCode::OK, body)
}

/// `/metrics`: read at scrape time.
struct CoordinatorCollector {
    coordinator: Arc<Coordinator>,
    links: Arc<Links>,
    stats: Arc<AdminStats>,
}

impl std::fmt::Debug for CoordinatorCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorCollector")
            .finish_non_exhaustive()
    }
}

impl Collector for CoordinatorCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let rules = self.coordinator.rules();
        let e = &mut encoder;
        gauge(
            e,
            "rule_set_version",
            "Version of the rule set in force.",
            None,
            i64::try_from(rules.version()).unwrap_or(i64::MAX),
        )?;
        gauge(
            e,
            "rules",
            "Rules in the rule set.",
            None,
            i64::try_from(rules.rules().len()).unwrap_or(i64::MAX),
        )?;
        let s = &self.stats;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            e,
            "admin_requests",
            "Admin API requests.",
            load(&s.requests),
        )?;
        counter(
            e,
            "admin_unauthorized",
            "Admin API requests without the right token.",
            load(&s.unauthorized),
        )?;
        counter(e, "admin_changes", "Changes applied.", load(&s.changes))?;
        counter(e, "admin_refused", "Changes refused.", load(&s.refused))?;
        let l = self.links.stats();
        counter(
            e,
            "reports",
            "Demand reports received from regionals.",
            load(&l.reports),
        )?;
        counter(
            e,
            "escalations",
            "Escalations answered (two-phase transfers run).",
            load(&l.escalations),
        )?;
        counter(
            e,
            "transferred_units",
            "Units moved between regions by transfers.",
            load(&l.transferred),
        )?;
        counter(
            e,
            "late_released_units",
            "Units a giving region confirmed releasing only after the escalation was answered, \
             then granted to the region that asked.",
            load(&l.late_units),
        )?;
        counter(
            e,
            "hot_key_moves",
            "Hot keys whose window was split between regions by their own demand.",
            load(&l.hot_key_moves),
        )?;
        counter(
            e,
            "partition_pushes",
            "Partitions pushed to regionals.",
            load(&l.pushes),
        )?;
        let connected = self
            .links
            .status()
            .iter()
            .filter(|r| r.regionals > 0)
            .count();
        gauge(
            e,
            "regions_connected",
            "Regions with at least one regional connected.",
            None,
            i64::try_from(connected).unwrap_or(i64::MAX),
        )?;
        Ok(())
    }
}

//! The regional's link to the global coordinator (DESIGN §1, §4 across regions, §5): the same
//! QUIC with mutual TLS as the edges' link, with this regional as the client.
//!
//! One task keeps one connection up (reconnecting after a report interval when it drops) and,
//! every report interval, sends a [`Report`] of the region's demand since the last one. The
//! coordinator pushes on streams it opens on that connection, answered here:
//!
//! - [`RuleSetPush`]: validated here whole; a rule set that fails is refused with its located
//!   error and the running one stays. An accepted one replaces the regional's rules and is
//!   passed on to every connected edge.
//! - [`Partitions`]: applied by [`PartitionTable::apply`], answered with what the region
//!   committed to.
//! - [`Release`]: phase one of a transfer, by [`Regional::release`]; answered with a
//!   [`Confirm`] of what was given.
//! - [`TransferGrant`]: phase two, landed once per transfer id: added to a window key's
//!   partition, or as tokens into a bucket key's part ([`Regional::land`]). Hot keys' splits
//!   come this way, and so do releases a giver confirmed after the escalation was answered.
//! - [`KeyQuery`]: every ledger of the key, for the admin API's debug view.
//!
//! Escalation ([`Escalation`]) goes the other way, on a stream this side opens: without a
//! connection it answers 0 at once; with one it waits for the transfer's answer up to
//! `TRANSFER_TIMEOUT`, well past the budget, because the request that asked is denied at the
//! budget but what the other regions released for it still lands for the next ones.
//!
//! While the coordinator is away the region keeps its last partitions and keeps deciding
//! (DESIGN §7); only transfers stop.
//!
//! [`PartitionTable::apply`]: crate::partition::PartitionTable::apply
//! [`Partitions`]: shared::wire::Partitions
//! [`Release`]: shared::wire::Release

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use quinn::{Connection, Endpoint};
use shared::{
    LimitId, Nanos, RuleSet,
    net::{self, NetStats},
    wire::{
        CloseCode, Confirm, ErrorNotice, Hello, HotKeyDemand, KeyQuery, KeyReport, Message,
        PROTOCOL_VERSION, QuotaRequest, Report, Role, RuleDemand, RuleSetAck, RuleSetPush,
        TRANSFER_ANSWER_WITHIN, TransferGrant,
    },
};

use crate::{
    Escalation, Regional, config::CoordinatorLink, regional::OncePerId, server::EdgeService,
};

/// The regional's side of the coordinator link.
pub struct Uplink {
    regional: Arc<Regional>,
    edges: Arc<EdgeService>,
    link: CoordinatorLink,
    node: String,
    region: String,
    incarnation: u64,
    connection: RwLock<Option<Connection>>,
    next_request: AtomicU64,
    /// Transfer grants landed, by id, with what each confirmed: a resent grant lands once.
    granted: OncePerId<u64>,
    stats: Arc<NetStats>,
    /// Reports the coordinator answered (for `/metrics`).
    reports: AtomicU64,
}

/// How long an escalation waits for the coordinator's answer: half a second past the time
/// the coordinator answers within, so a transfer that ran is not dropped here for the wire's
/// delay (what givers confirm later follows as a `TransferGrant`).
const TRANSFER_TIMEOUT: Duration =
    TRANSFER_ANSWER_WITHIN.saturating_add(Duration::from_millis(500));

/// How long a transfer id is remembered.
const GRANT_MEMORY: Duration = Duration::from_secs(600);

impl Uplink {
    /// The link of `regional` (node `node` of region `region`) to the coordinator at `link`;
    /// rule sets it accepts are passed to `edges`.
    pub fn new(
        regional: Arc<Regional>,
        edges: Arc<EdgeService>,
        link: CoordinatorLink,
        node: String,
        region: String,
    ) -> Arc<Uplink> {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Arc::new(Uplink {
            regional,
            edges,
            link,
            node,
            region,
            incarnation,
            connection: RwLock::new(None),
            next_request: AtomicU64::new(1),
            granted: OncePerId::new(GRANT_MEMORY),
            stats: Arc::new(NetStats::default()),
            reports: AtomicU64::new(0),
        })
    }

    /// Whether the coordinator is connected now.
    pub fn is_connected(&self) -> bool {
        self.connection().is_some()
    }

    /// Reports answered so far.
    pub fn reports(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    fn connection(&self) -> Option<Connection> {
        self.connection
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_connection(&self, conn: Option<Connection>) {
        *self.connection.write().unwrap_or_else(|e| e.into_inner()) = conn;
    }

    /// Keeps the link up and reports, until the task is dropped.
    pub async fn run(self: Arc<Self>, endpoint: Endpoint) {
        let interval = self.link.report_interval;
        loop {
            let hello = Hello {
                protocol_version: PROTOCOL_VERSION,
                node: self.node.clone(),
                incarnation: self.incarnation,
                role: Role::Regional,
                region: self.region.clone(),
                rule_set_version: self.regional.rules().version(),
                // The coordinator sends no exact requests.
                answer_within_ms: 0,
            };
            let attempt = match self.link.addr.resolve_for(&endpoint).await {
                Ok(addr) => net::connect(&endpoint, addr, &self.link.name, &hello).await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok((conn, welcome)) => {
                    tracing::info!(
                        coordinator = %welcome.node, addr = %self.link.addr,
                        rule_set_version = welcome.rule_set_version, "coordinator connected"
                    );
                    self.set_connection(Some(conn.clone()));
                    let this = self.clone();
                    let answering = tokio::spawn(net::answer(
                        conn.clone(),
                        move |m| {
                            let this = this.clone();
                            async move { this.answer(m).await }
                        },
                        self.stats.clone(),
                    ));
                    self.report_until_lost(&conn).await;
                    self.set_connection(None);
                    answering.abort();
                    tracing::warn!(addr = %self.link.addr, "coordinator link lost; keeping the last partitions");
                }
                Err(e) => {
                    tracing::warn!(addr = %self.link.addr, error = %e, "cannot reach the coordinator; keeping the last partitions");
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    async fn report_until_lost(&self, conn: &Connection) {
        let interval = self.link.report_interval;
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = conn.closed() => return,
            }
            let report = self.report(last.elapsed());
            last = Instant::now();
            let message = Message::from(report);
            match net::call_within(conn, &message, interval.max(Duration::from_secs(1))).await {
                Ok(Message::ReportAck(ack)) => {
                    self.reports.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        rule_set_version = ack.rule_set_version,
                        partitions_version = ack.partitions_version,
                        "report answered"
                    );
                }
                Ok(other) => {
                    tracing::warn!(
                        kind = other.kind(),
                        "the coordinator answered a report oddly"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "report not answered");
                    if conn.close_reason().is_some() {
                        return;
                    }
                }
            }
        }
    }

    /// The region's demand since the last report, over `elapsed`.
    fn report(&self, elapsed: Duration) -> Report {
        let (limits, hot) = self.regional.take_demand();
        Report {
            region: self.region.clone(),
            interval: Nanos::from(elapsed),
            edges: self.regional.connected_edges(),
            demand: limits
                .into_iter()
                .take(shared::wire::MAX_KEYS_PER_BATCH)
                .map(|(limit, d)| RuleDemand {
                    limit,
                    used: d.used,
                    denied: d.denied,
                    granted: 0,
                    utilisation_ppm: d.utilisation_ppm,
                })
                .collect(),
            hot_keys: hot
                .into_iter()
                .map(|h| HotKeyDemand {
                    limit: h.limit,
                    key: h.key,
                    window: h.window,
                    used: h.used,
                    denied: h.denied,
                    partition: h.partition,
                })
                .collect(),
        }
    }

    /// Answers one push from the coordinator.
    async fn answer(&self, message: Message) -> Message {
        match message {
            Message::RuleSetPush(push) => self.rules(push).await.into(),
            Message::Partitions(p) => {
                let regional = &self.regional;
                let held = regional
                    .partitions()
                    .apply(&p, |limit| regional.schedule_index(limit));
                // Recorded before the coordinator hears of them: it may start other regions'
                // raises on this answer, and a restart must not forget what they wait for.
                if p.version > 0
                    && let Err(e) = regional.save_partitions().await
                {
                    tracing::warn!(error = %e, "cannot record this region's partitions");
                }
                tracing::info!(version = held.version, "partitions applied");
                held.into()
            }
            Message::Release(r) => {
                let released = self
                    .regional
                    .release(r.transfer, r.limit, &r.key, r.window, r.amount)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "release failed; releasing nothing");
                        0
                    });
                Confirm {
                    transfer: r.transfer,
                    released,
                }
                .into()
            }
            Message::TransferGrant(g) => self.transfer_grant(&g).await.into(),
            Message::KeyQuery(KeyQuery { key }) => {
                match self.regional.key_holdings(&key, &self.edges.names()).await {
                    Ok(holdings) => KeyReport {
                        region: self.region.clone(),
                        holdings,
                    }
                    .into(),
                    Err(e) => ErrorNotice {
                        code: CloseCode::Internal,
                        message: format!("the store failed: {e}"),
                    }
                    .into(),
                }
            }
            other => ErrorNotice {
                code: CloseCode::UnexpectedMessage,
                message: format!("{} is not a push a regional answers", other.kind()),
            }
            .into(),
        }
    }

    /// Validates and applies a pushed rule set, then passes it on to the edges.
    async fn rules(&self, push: RuleSetPush) -> RuleSetAck {
        let running = self.regional.rules().version();
        if push.version <= running {
            return RuleSetAck {
                version: push.version,
                error: None,
            };
        }
        let rules = match RuleSet::from_yaml("rate-limits (pushed)", &push.yaml) {
            Ok(rules) => rules.with_version(push.version),
            Err(e) => {
                tracing::warn!(version = push.version, error = %e, "refused a pushed rule set; keeping the running one");
                return RuleSetAck {
                    version: push.version,
                    error: Some(e.to_string()),
                };
            }
        };
        self.regional.partitions().retain_rules(&rules);
        self.regional.set_rules(rules);
        tracing::info!(
            version = push.version,
            "rule set applied; passing it on to the edges"
        );
        let (edges, version) = (self.edges.clone(), push.version);
        tokio::spawn(async move {
            let accepted = edges.push_rules(&push).await;
            tracing::info!(version, edges = accepted, "edges run the new rule set");
        });
        RuleSetAck {
            version,
            error: None,
        }
    }

    /// Lands a transfer's grant once per id and confirms what landed: `amount`, or 0 when
    /// the store failed. A resend, even one that comes while the first is still at the store,
    /// gets the same answer and lands nothing again: a store call that timed out may have
    /// run, and landing it twice would mint tokens.
    async fn transfer_grant(&self, g: &TransferGrant) -> Confirm {
        let land = || async {
            let landed = self
                .regional
                .land(g.limit, &g.key, g.window, g.amount)
                .await;
            Ok::<u64, Infallible>(landed.map_or_else(
                |e| {
                    tracing::warn!(error = %e, "a transfer's grant did not land; lost");
                    0
                },
                |()| g.amount,
            ))
        };
        let Ok(landed) = self.granted.get_or_try_init(g.transfer, land).await;
        Confirm {
            transfer: g.transfer,
            released: landed,
        }
    }
}

impl Escalation for Uplink {
    fn request(
        &self,
        limit: LimitId,
        key: &str,
        window: u64,
        wanted: u64,
    ) -> Pin<Box<dyn Future<Output = u64> + Send + '_>> {
        let request = QuotaRequest {
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            limit,
            key: key.to_owned(),
            window,
            wanted,
        };
        Box::pin(async move {
            let Some(conn) = self.connection() else {
                return 0;
            };
            let id = request.request_id;
            let message = Message::from(request);
            match net::call_within(&conn, &message, TRANSFER_TIMEOUT).await {
                Ok(Message::QuotaReply(reply)) if reply.request_id == id => reply.granted,
                Ok(other) => {
                    tracing::warn!(
                        kind = other.kind(),
                        "the coordinator answered an escalation oddly"
                    );
                    0
                }
                // The coordinator did not answer or the link was lost: whatever the transfer
                // released is lost to the window (a false reject, never an overshoot).
                Err(e) => {
                    tracing::debug!(error = %e, "escalation failed");
                    0
                }
            }
        })
    }
}

//! The coordinator's QUIC service for regionals (DESIGN §4 across regions, §5): the same
//! transport and CA as the edges' link, with the regionals as clients.
//!
//! A regional says `Hello` as [`Role::Regional`] of a configured region. Right after the
//! `Welcome` the coordinator asks what it holds (a `Partitions` of version 0, which changes
//! nothing and is answered with the region's shares) and pushes the rule set when the
//! regional's is older. From then on:
//!
//! - the regional's [`Report`]s feed the demand each rule's shares follow;
//! - [`Links::sync`] (every tick, and after every change) pushes each region the
//!   `Partitions` it should hold. A lower share goes out at once (the regional applies it from
//!   its next window and confirms which); a higher one only once every other region's
//!   confirmed share leaves room for it, and only from the window the last of those cuts
//!   applies from. So `Σ_r P_r ≤ L` holds in every window, whatever is late or lost; a region
//!   that does not confirm only delays the others' raises.
//! - a [`QuotaRequest`] (escalation) runs a two-phase transfer: every other connected region is
//!   asked to [`Release`] up to what is wanted of that key, each gives at most its unused
//!   partition and confirms, and the requester is answered with exactly the sum confirmed,
//!   within [`TRANSFER_ANSWER_WITHIN`] so that it is still listening. A giver that has not
//!   confirmed by then may have released anyway: it is asked again with the same id (it
//!   answers what it released, once) after the answer, and what it confirms then goes to the
//!   requester as a [`TransferGrant`], so released quota is not lost to the window.
//! - rule sets the admin API accepts are pushed to every regional ([`Links::push_rules`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use quinn::Connection;
use shared::{
    Clock, LimitId,
    algorithm::Limiter,
    net::{self, Peer, Service},
    quota::{RegionShare, ppm_for, share_of, split},
    wire::{
        CloseCode, ErrorNotice, Hello, KeyQuery, KeyReport, Message, PROTOCOL_VERSION, Partitions,
        QuotaReply, QuotaRequest, Refusal, Refused, Release, Report, ReportAck, Role, RuleSetPush,
        RuleShare, TRANSFER_ANSWER_WITHIN, TransferGrant, Welcome,
    },
};

use crate::coordinator::{Coordinator, Held};

/// How long one push or one release may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a transfer waits for one giving region's confirm, at most (and never past
/// `TRANSFER_ANSWER_WITHIN` for the whole transfer). Well past the asker's budget (100 ms by
/// default): the asker keeps waiting for the answer after its request is denied and lands
/// what comes for its next requests. A confirm given up on is asked for again later
/// ([`Links::land_late`]), except for hot keys' splits, where it is lost to the window.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);
/// A giver asked with less time than this left before the answer is due is not asked.
const MIN_RELEASE_WAIT: Duration = Duration::from_millis(20);
/// How often, and how far apart, a late confirm is asked for again, and a late grant resent.
const LATE_TRIES: u32 = 5;
const LATE_RETRY: Duration = Duration::from_millis(500);

/// The connected regionals, and what the coordinator knows of each region.
pub struct Links {
    coordinator: Arc<Coordinator>,
    node: String,
    /// What window it is, for hot keys' splits: the same clock as every tier's (DESIGN §9).
    clock: Arc<dyn Clock>,
    regions: Mutex<HashMap<String, Region>>,
    /// Per region, shares offered and not yet confirmed (raises count as held meanwhile).
    pending: Mutex<HashMap<String, Held>>,
    next_session: AtomicU64,
    /// Partitions versions: seeded from the clock so a restarted coordinator's pushes are
    /// newer than the last run's.
    next_version: AtomicU64,
    next_transfer: AtomicU64,
    /// Keys regions reported hot, with their demand per region, by the window reported.
    hot: Mutex<HashMap<(LimitId, String), HotKey>>,
    stats: LinkStats,
}

/// A key some region reported hot in `window`: what each region used or was denied of it.
struct HotKey {
    window: u64,
    demand: HashMap<String, u64>,
    /// Its next window's per-key partitions are set (or were tried).
    moved: bool,
}

impl HotKey {
    fn new(window: u64) -> HotKey {
        HotKey {
            window,
            demand: HashMap::new(),
            moved: false,
        }
    }
}

/// The most hot keys remembered at once (each region reports at most a batch's worth).
const MAX_HOT_KEYS: usize = 4096;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Reports received.
    pub reports: AtomicU64,
    /// Escalations answered.
    pub escalations: AtomicU64,
    /// Units moved by transfers.
    pub transferred: AtomicU64,
    /// Partitions pushed.
    pub pushes: AtomicU64,
    /// Hot keys whose next window was split by their own demand.
    pub hot_key_moves: AtomicU64,
    /// Units whose release was confirmed only after the requester was answered, and that were
    /// then granted to it.
    pub late_units: AtomicU64,
}

/// A giver that had not confirmed its [`Release`] when the requester had to be answered.
struct Late {
    region: String,
    /// The replica asked: it remembers the transfer id (another replica of the region would
    /// release a second time).
    node: String,
    conn: Connection,
    release: Message,
}

#[derive(Default)]
struct Region {
    replicas: HashMap<u64, Replica>,
    last_report: Option<Instant>,
    edges: u32,
}

struct Replica {
    node: String,
    conn: Connection,
    /// The last `Partitions` it confirmed in this connection.
    confirmed: Option<Partitions>,
    /// A push to it is out and not yet answered.
    in_flight: bool,
}

/// One connected regional.
pub struct Session {
    id: u64,
    node: String,
    region: String,
    rule_set_version: u64,
}

/// A region as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionStatus {
    /// Its name.
    pub name: String,
    /// Regionals connected now.
    pub regionals: usize,
    /// Edges connected to them, as last reported.
    pub edges: u32,
    /// Seconds since the last report, if any.
    pub last_report_age_seconds: Option<f64>,
}

impl Links {
    /// The links of `coordinator`, node `node`, telling window boundaries by `clock`.
    pub fn new(coordinator: Arc<Coordinator>, node: String, clock: Arc<dyn Clock>) -> Arc<Links> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Arc::new(Links {
            coordinator,
            node,
            clock,
            regions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            next_version: AtomicU64::new(seed),
            next_transfer: AtomicU64::new(seed),
            hot: Mutex::new(HashMap::new()),
            stats: LinkStats::default(),
        })
    }

    fn regions(&self) -> MutexGuard<'_, HashMap<String, Region>> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Every configured region's link status.
    pub fn status(&self) -> Vec<RegionStatus> {
        let regions = self.regions();
        self.coordinator
            .regions()
            .iter()
            .map(|r| {
                let link = regions.get(&r.name);
                RegionStatus {
                    name: r.name.clone(),
                    regionals: link.map_or(0, |l| l.replicas.len()),
                    edges: link.map_or(0, |l| l.edges),
                    last_report_age_seconds: link
                        .and_then(|l| l.last_report)
                        .map(|at| at.elapsed().as_secs_f64()),
                }
            })
            .collect()
    }

    /// Pushes the rule set in force to every connected regional; returns how many took it.
    pub async fn push_rules(&self) -> usize {
        let message = Message::from(RuleSetPush::of(&self.coordinator.rules()));
        let targets: Vec<(String, Connection)> = self
            .regions()
            .values()
            .flat_map(|r| r.replicas.values())
            .map(|r| (r.node.clone(), r.conn.clone()))
            .collect();
        let calls = targets.iter().map(|(node, conn)| {
            let message = &message;
            async move { (node, net::push_rule_set(conn, message, CALL_TIMEOUT).await) }
        });
        let mut took = 0;
        for (node, answer) in futures_util::future::join_all(calls).await {
            match answer {
                Ok(()) => took += 1,
                Err(reason) => {
                    tracing::warn!(regional = %node, %reason, "a regional did not take the rule set")
                }
            }
        }
        took
    }

    /// What every connected region should be offered now, per limit of the rule set: its
    /// target share when that is a cut, or a raise that fits beside what every other region
    /// may be holding (its confirmed share, or a raise already offered to it); otherwise what
    /// it holds. Regions are visited in order and each raise offered counts against the
    /// next ones, so offers made at once never sum past the whole.
    fn offers(&self, connected: &[String]) -> HashMap<String, Vec<RuleShare>> {
        let rules = self.coordinator.rules();
        let shares = self.coordinator.shares();
        let pending = self.pending();
        // What each region may be holding of each limit, from the windows every confirmed
        // change applies from: max(confirmed, raise in flight).
        let mut assumed: BTreeMap<String, Held> = self
            .coordinator
            .regions()
            .iter()
            .map(|r| {
                let mut held = self.coordinator.held(&r.name).unwrap_or_default();
                for (&limit, &(ppm, from)) in pending.get(&r.name).into_iter().flatten() {
                    let slot = held.entry(limit).or_insert((0, 0));
                    *slot = (slot.0.max(ppm), slot.1.max(from));
                }
                (r.name.clone(), held)
            })
            .collect();
        drop(pending);
        // Every region's whole units of every limit by its rule's shares (largest remainder,
        // so they add up to the limit), split once for all regions.
        let units: HashMap<u64, BTreeMap<String, u64>> = rules
            .rules()
            .iter()
            .filter_map(|rule| Some((rule, &shares.get(rule.id())?.0)))
            .flat_map(|(rule, weights)| {
                rule.limits().iter().map(move |limit| {
                    let split = Coordinator::partition(weights, limit.limiter().limit());
                    (limit.id().0, split)
                })
            })
            .collect();
        let mut out = HashMap::new();
        for region in connected {
            // What it confirmed (not what it is assumed to hold: its own raises in flight
            // are not cuts to make).
            let own = self.coordinator.held(region).unwrap_or_default();
            let mut offer = Vec::new();
            for rule in rules.rules() {
                for limit in rule.limits() {
                    let id = limit.id().0;
                    let whole = limit.limiter().limit();
                    // Sent as the share that gives exactly the region's units.
                    let units = units
                        .get(&id)
                        .and_then(|p| p.get(region))
                        .copied()
                        .unwrap_or(0);
                    let target = ppm_for(units, whole);
                    let (held, held_from) = own.get(&id).copied().unwrap_or((0, 0));
                    if target <= held {
                        // A cut from what it confirmed, no earlier than that entry's window:
                        // before it the region may hold less than `target` (a raise already
                        // scheduled), and the share must not rise there without room.
                        offer.push(RuleShare {
                            limit: limit.id(),
                            share_ppm: target,
                            from_window: held_from,
                        });
                        continue;
                    }
                    // Room is counted in units: the shares may sum past 10⁶ (see
                    // `ppm_for`), the partitions `⌊L · ppm / 10⁶⌋` never past L.
                    let (mut taken, mut from) = (0u64, 0u64);
                    for (name, held) in &assumed {
                        if name != region {
                            let (ppm, f) = held.get(&id).copied().unwrap_or((0, 0));
                            taken += share_of(whole, ppm);
                            from = from.max(f);
                        }
                    }
                    let share = if taken + units <= whole {
                        let slot = assumed
                            .entry(region.clone())
                            .or_default()
                            .entry(id)
                            .or_insert((0, 0));
                        *slot = (slot.0.max(target), slot.1.max(from));
                        RuleShare {
                            limit: limit.id(),
                            share_ppm: target,
                            from_window: from,
                        }
                    } else {
                        RuleShare {
                            limit: limit.id(),
                            share_ppm: held,
                            from_window: held_from,
                        }
                    };
                    offer.push(share);
                }
            }
            out.insert(region.clone(), offer);
        }
        out
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes every connected regional the partitions it should hold, where they differ from
    /// what it confirmed, one push per regional at a time; again at once while a round made
    /// room (its cuts were confirmed), so raises follow cuts within milliseconds rather than a
    /// tick, and quota is not left unowned across a window boundary.
    pub async fn sync(&self) {
        for _ in 0..3 {
            if self.sync_once().await == 0 {
                break;
            }
        }
    }

    /// One round of [`sync`](Links::sync); returns how many pushes were confirmed.
    async fn sync_once(&self) -> usize {
        let targets: Vec<(String, u64, Connection, Vec<RuleShare>)> = {
            let connected: Vec<String> = {
                let mut names: Vec<String> = self
                    .regions()
                    .iter()
                    .filter(|(_, r)| !r.replicas.is_empty())
                    .map(|(n, _)| n.clone())
                    .collect();
                names.sort();
                names
            };
            let offers = self.offers(&connected);
            let mut regions = self.regions();
            let mut pending = self.pending();
            let mut out = Vec::new();
            for (name, offer) in offers {
                let Some(region) = regions.get_mut(&name) else {
                    continue;
                };
                if region.replicas.values().any(|r| r.in_flight) {
                    continue;
                }
                for (&id, replica) in region.replicas.iter_mut() {
                    let same = replica.confirmed.as_ref().is_some_and(|c| holds(c, &offer));
                    if !same {
                        replica.in_flight = true;
                        let slot = pending.entry(name.clone()).or_default();
                        for s in &offer {
                            let e = slot.entry(s.limit.0).or_insert((0, 0));
                            *e = (e.0.max(s.share_ppm), e.1.max(s.from_window));
                        }
                        out.push((name.clone(), id, replica.conn.clone(), offer.clone()));
                    }
                }
            }
            out
        };
        let pushes = targets
            .into_iter()
            .map(|(region, id, conn, rules)| async move {
                let version = self.next_version.fetch_add(1, Ordering::Relaxed);
                let push = Message::from(Partitions {
                    version,
                    rules,
                    keys: Vec::new(),
                });
                self.stats.pushes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%region, ?push, "pushing partitions");
                let answer = call(&conn, &push).await;
                tracing::debug!(%region, ?answer, "partitions answered");
                let ok = matches!(answer, Ok(Message::Partitions(_)));
                self.confirmed(&region, id, answer);
                ok
            });
        futures_util::future::join_all(pushes)
            .await
            .into_iter()
            .filter(|&ok| ok)
            .count()
    }

    /// Takes a regional's answer to a `Partitions` push (or the version-0 probe).
    fn confirmed(&self, region: &str, id: u64, answer: Result<Message, String>) {
        let (node, held) = {
            let mut regions = self.regions();
            let Some(replica) = regions
                .get_mut(region)
                .and_then(|r| r.replicas.get_mut(&id))
            else {
                return;
            };
            replica.in_flight = false;
            match answer {
                Ok(Message::Partitions(p)) => {
                    let held: Held = p
                        .rules
                        .iter()
                        .map(|s| (s.limit.0, (s.share_ppm, s.from_window)))
                        .collect();
                    replica.confirmed = Some(p);
                    (replica.node.clone(), held)
                }
                Ok(other) => {
                    tracing::warn!(regional = %replica.node, kind = other.kind(), "odd answer to partitions");
                    return;
                }
                Err(e) => {
                    tracing::warn!(regional = %replica.node, error = %e, "partitions not delivered");
                    return;
                }
            }
        };
        if let Err(e) = self.coordinator.record_held(region, &node, held) {
            // Kept as pending: the raise still counts against the others.
            tracing::error!(error = %e, "cannot record what a region holds");
            return;
        }
        // Confirmed is now the truth for this region, unless another push to it is out.
        let quiet = self
            .regions()
            .get(region)
            .is_none_or(|r| r.replicas.values().all(|rep| !rep.in_flight));
        if quiet {
            self.pending().remove(region);
        }
    }

    /// One regional of every connected region, as (region, node, connection): replicas share
    /// their store, so any one of them speaks for the region's ledgers.
    fn one_replica_per_region(&self) -> Vec<(String, String, Connection)> {
        self.regions()
            .iter()
            .filter_map(|(name, r)| {
                let replica = r.replicas.values().next()?;
                Some((name.clone(), replica.node.clone(), replica.conn.clone()))
            })
            .collect()
    }

    /// Runs a two-phase transfer for `request` from `region`: the other regions, one after
    /// the other, release what is still wanted (each at most its unused partition) and
    /// confirm; the sum confirmed is the grant, never more than was wanted. One at a time
    /// rather than all at once: a bucket's asker can hold only what it asked for (its free
    /// room), and with three regions or more, asking every giver for all of it would take
    /// tokens from the others only for the asker to drop them.
    ///
    /// Answers within [`TRANSFER_ANSWER_WITHIN`]: the givers that have not confirmed by then
    /// are returned, for [`land_late`](Links::land_late).
    async fn transfer(&self, region: &str, request: &QuotaRequest) -> (u64, Vec<Late>) {
        self.supersede_hot_split(request);
        let started = Instant::now();
        let mut givers = self.one_replica_per_region();
        givers.retain(|(name, _, _)| name != region);
        let (mut granted, mut late) = (0, Vec::new());
        for (name, node, conn) in givers {
            let wanted = request.wanted.saturating_sub(granted);
            let left = TRANSFER_ANSWER_WITHIN.saturating_sub(started.elapsed());
            if wanted == 0 || left < MIN_RELEASE_WAIT {
                break;
            }
            // An id per giver: a resent `Release` of one giver's part is answered again.
            let release = Message::from(Release {
                transfer: self.next_transfer.fetch_add(1, Ordering::Relaxed),
                limit: request.limit,
                key: request.key.clone(),
                window: request.window,
                amount: wanted,
            });
            match release_from(&name, &conn, &release, left.min(RELEASE_TIMEOUT)).await {
                Some(units) => granted += units,
                None => late.push(Late {
                    region: name,
                    node,
                    conn,
                    release,
                }),
            }
        }
        self.stats.escalations.fetch_add(1, Ordering::Relaxed);
        self.stats.transferred.fetch_add(granted, Ordering::Relaxed);
        tracing::debug!(
            %region, limit = request.limit.0, key = %request.key, wanted = request.wanted,
            granted, late = late.len(), "transfer"
        );
        (granted, late)
    }

    /// After a transfer answered without the confirms of `late` givers: asks each again with
    /// the same transfer id until it confirms (the replica asked releases once per id, for a
    /// minute, and answers the same amount again; another replica of its region would release
    /// anew, so only that one is asked), and grants what they confirm to the replica
    /// `session` that asked, as a [`TransferGrant`] (which it lands once per id). Given up
    /// after [`LATE_TRIES`] rounds either way: what is still unconfirmed or undelivered then
    /// is lost to its window (a false reject, never an overshoot).
    async fn land_late(
        self: Arc<Self>,
        session: Arc<Session>,
        request: QuotaRequest,
        late: Vec<Late>,
    ) {
        let mut late = late;
        let mut confirmed = 0;
        for _ in 0..LATE_TRIES {
            if late.is_empty() {
                break;
            }
            tokio::time::sleep(LATE_RETRY).await;
            let mut still = Vec::new();
            for l in late {
                // The replica asked first, on its connection now if it reconnected.
                let conn = self
                    .regions()
                    .get(&l.region)
                    .and_then(|r| r.replicas.values().find(|rep| rep.node == l.node))
                    .map_or(l.conn.clone(), |rep| rep.conn.clone());
                match release_from(&l.region, &conn, &l.release, RELEASE_TIMEOUT).await {
                    Some(units) => confirmed += units,
                    None => still.push(l),
                }
            }
            late = still;
        }
        if !late.is_empty() {
            tracing::warn!(
                givers = late.len(), key = %request.key,
                "releases never confirmed; what they released is lost to the window"
            );
        }
        if confirmed == 0 {
            return;
        }
        let transfer = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let grant = Message::from(TransferGrant {
            transfer,
            limit: request.limit,
            key: request.key.clone(),
            window: request.window,
            amount: confirmed,
        });
        for _ in 0..LATE_TRIES {
            let asker = self
                .regions()
                .get(&session.region)
                .and_then(|r| r.replicas.get(&session.id))
                .map(|r| r.conn.clone());
            let Some(conn) = asker else {
                // The replica that asked is gone, with the partition it would have added to.
                break;
            };
            match call(&conn, &grant).await {
                Ok(Message::Confirm(c)) if c.transfer == transfer && c.released == confirmed => {
                    self.stats
                        .late_units
                        .fetch_add(confirmed, Ordering::Relaxed);
                    self.stats
                        .transferred
                        .fetch_add(confirmed, Ordering::Relaxed);
                    tracing::debug!(key = %request.key, units = confirmed, "late release granted");
                    return;
                }
                other => {
                    tracing::debug!(answer = ?other.map(|m| m.kind()), "late grant not taken yet");
                }
            }
            tokio::time::sleep(LATE_RETRY).await;
        }
        tracing::warn!(
            key = %request.key, units = confirmed,
            "a late release could not be granted to the region that asked; lost to the window"
        );
    }

    /// An escalation is this window's own demand for its key, and escalations already move
    /// the key's quota to where it is asked for. A split by the previous window's demand
    /// (`follow_hot_keys`) still to come in this window would move quota back towards a
    /// region that no longer asks, so that the asking region ran short mid-window: it is
    /// dropped.
    fn supersede_hot_split(&self, request: &QuotaRequest) {
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hot.get_mut(&(request.limit, request.key.clone()))
            && h.window + 1 == request.window
        {
            h.moved = true;
        }
    }

    /// Asks one regional of every connected region what it holds for `key`.
    pub async fn key_reports(&self, key: &str) -> BTreeMap<String, Result<KeyReport, String>> {
        let targets = self.one_replica_per_region();
        let query = Message::from(KeyQuery {
            key: key.to_owned(),
        });
        let calls = targets.iter().map(|(name, _, conn)| {
            let query = &query;
            async move {
                let answer = match call(conn, query).await {
                    Ok(Message::KeyReport(r)) => Ok(r),
                    Ok(Message::Error(e)) => Err(e.message),
                    Ok(other) => Err(format!("answered {}", other.kind())),
                    Err(e) => Err(e),
                };
                (name.clone(), answer)
            }
        });
        futures_util::future::join_all(calls)
            .await
            .into_iter()
            .collect()
    }

    /// Runs [`sync`](Links::sync) and follows demand every `interval`, until dropped.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            match self.coordinator.follow_demand() {
                Ok(true) => tracing::info!("shares moved towards demand"),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "cannot move shares"),
            }
            self.sync().await;
            self.follow_hot_keys().await;
        }
    }

    /// Notes the hot keys of `region`'s report.
    fn observe_hot(&self, region: &str, report: &Report) {
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        for h in &report.hot_keys {
            let key = (h.limit, h.key.clone());
            if hot.len() >= MAX_HOT_KEYS && !hot.contains_key(&key) {
                break;
            }
            let entry = hot.entry(key).or_insert_with(|| HotKey::new(h.window));
            if h.window > entry.window {
                *entry = HotKey::new(h.window);
            }
            if h.window == entry.window {
                let d = entry.demand.entry(region.to_owned()).or_insert(0);
                *d = (*d).max(h.used.saturating_add(h.denied));
            }
        }
    }

    /// Per-key partitions for hot keys (DESIGN §4 across regions): once the window after the
    /// one a key was reported hot in has begun, and unless a region has escalated for the key
    /// in it already (`supersede_hot_split`), the key's limit is split between the regions
    /// by that key's own demand (with each region's floor) instead of the rule's shares, by
    /// a two-phase transfer in the new window: regions above their part release the excess
    /// (at most their unused partition, as for an escalation) and the sum confirmed is granted
    /// to the regions below theirs, most short first. Nothing is granted before it is released,
    /// so `Σ P_r ≤ L` holds as for any transfer. Rules an operator pinned keep their split.
    async fn follow_hot_keys(&self) {
        let now = self.clock.now().as_u64();
        let rules = self.coordinator.rules();
        let due: Vec<(LimitId, String, u64, HashMap<String, u64>)> = {
            let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
            let mut due = Vec::new();
            hot.retain(|(limit, key), h| {
                let Some((_, l)) = rules.limit(*limit) else {
                    return false;
                };
                let length = match l.limiter() {
                    Limiter::FixedWindow(_) | Limiter::SlidingWindow(_) => l.limiter().window(),
                    // Buckets and logs have no windows to split; they follow the rule's share.
                    _ => return false,
                };
                let current = now / length.as_u64().max(1);
                if current == h.window + 1 && !h.moved {
                    h.moved = true;
                    due.push((*limit, key.clone(), current, std::mem::take(&mut h.demand)));
                }
                current <= h.window + 1
            });
            due
        };
        if due.is_empty() {
            return;
        }
        let shares = self.coordinator.shares();
        for (limit, key, window, demand) in due {
            let Some((rule, l)) = rules.limit(limit) else {
                continue;
            };
            // Pinned rules keep their split, per key too.
            let Some((weights, false)) = shares.get(rule.id()) else {
                continue;
            };
            let base = Coordinator::partition(weights, l.limiter().limit());
            self.move_hot_key(limit, &key, window, l.limiter().limit(), &base, &demand)
                .await;
        }
    }

    /// Splits `key`'s `limit` in `window` by `demand` per region; see [`follow_hot_keys`].
    ///
    /// [`follow_hot_keys`]: Links::follow_hot_keys
    /// `base` is each region's partition of the limit (`whole`) by the rule's shares.
    async fn move_hot_key(
        &self,
        limit: LimitId,
        key: &str,
        window: u64,
        whole: u64,
        base: &BTreeMap<String, u64>,
        demand: &HashMap<String, u64>,
    ) {
        let regions = self.coordinator.regions();
        let input: Vec<RegionShare> = regions
            .iter()
            .map(|r| RegionShare {
                demand: demand.get(&r.name).copied().unwrap_or(0),
                floor_ppm: r.floor_ppm,
                pinned_ppm: None,
            })
            .collect();
        let target = split(whole, &input);
        let connected: HashMap<String, Vec<Connection>> = self
            .regions()
            .iter()
            .filter(|(_, r)| !r.replicas.is_empty())
            .map(|(n, r)| {
                (
                    n.clone(),
                    r.replicas.values().map(|x| x.conn.clone()).collect(),
                )
            })
            .collect();
        let (mut givers, mut takers) = (Vec::new(), Vec::new());
        for (r, &want) in regions.iter().zip(&target) {
            let Some(conns) = connected.get(&r.name) else {
                continue;
            };
            let has = base.get(&r.name).copied().unwrap_or(0);
            if has > want {
                givers.push((r.name.clone(), conns[0].clone(), has - want));
            } else if want > has {
                takers.push((r.name.clone(), conns.clone(), want - has));
            }
        }
        if givers.is_empty() || takers.is_empty() {
            return;
        }
        let needed: u64 = takers.iter().map(|t| t.2).sum();
        let transfer = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let calls = givers.iter().map(|(name, conn, excess)| async move {
            let release = Message::from(Release {
                transfer,
                limit,
                key: key.to_owned(),
                window,
                amount: (*excess).min(needed),
            });
            // A confirm that comes too late is lost here: splits are not resent.
            release_from(name, conn, &release, RELEASE_TIMEOUT)
                .await
                .unwrap_or(0)
        });
        let mut left: u64 = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .sum();
        let released = left;
        takers.sort_by_key(|t| std::cmp::Reverse(t.2));
        for (name, conns, short) in takers {
            let amount = short.min(left);
            if amount == 0 {
                break;
            }
            left -= amount;
            let grant = Message::from(TransferGrant {
                transfer: self.next_transfer.fetch_add(1, Ordering::Relaxed),
                limit,
                key: key.to_owned(),
                window,
                amount,
            });
            // Every replica of the region: each keeps its own partitions, and any of them
            // may decide the key. A replica that misses it only denies sooner.
            for conn in &conns {
                if let Err(e) = call(conn, &grant).await {
                    tracing::warn!(region = %name, error = %e, "a per-key grant was not delivered");
                }
            }
        }
        self.stats.hot_key_moves.fetch_add(1, Ordering::Relaxed);
        self.stats
            .transferred
            .fetch_add(released - left, Ordering::Relaxed);
        tracing::debug!(limit = limit.0, %key, window, released, "hot key split by its demand");
    }
}

/// Asks the regional on `conn` (of region `name`) for `release` and answers what it confirmed.
/// What the giver confirmed; `None` when no answer came within `within` (it may have
/// released all the same, and answers the same id again).
async fn release_from(
    name: &str,
    conn: &Connection,
    release: &Message,
    within: Duration,
) -> Option<u64> {
    let Message::Release(asked) = release else {
        return Some(0);
    };
    match net::call_within(conn, release, within).await {
        Ok(Message::Confirm(c)) if c.transfer == asked.transfer => {
            // Never more than asked: a confused giver must not mint quota.
            Some(c.released.min(asked.amount))
        }
        Ok(other) => {
            tracing::warn!(region = %name, kind = other.kind(), "odd answer to a release");
            Some(0)
        }
        Err(e) => {
            tracing::debug!(region = %name, error = %e, "no confirm yet");
            None
        }
    }
}

/// Whether `confirmed` holds exactly `offer`'s shares (ignoring windows that already passed).
fn holds(confirmed: &Partitions, offer: &[RuleShare]) -> bool {
    let held: HashMap<u64, u32> = confirmed
        .rules
        .iter()
        .map(|s| (s.limit.0, s.share_ppm))
        .collect();
    held.len() == offer.len()
        && offer
            .iter()
            .all(|s| held.get(&s.limit.0) == Some(&s.share_ppm))
}

async fn call(conn: &Connection, message: &Message) -> Result<Message, String> {
    net::call_within(conn, message, CALL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

/// The QUIC service regionals connect to.
pub struct RegionalService {
    links: Arc<Links>,
}

impl RegionalService {
    /// Serves `links`.
    pub fn new(links: Arc<Links>) -> RegionalService {
        RegionalService { links }
    }
}

impl Service for RegionalService {
    type Session = Session;

    fn hello(&self, _: &Peer, hello: &Hello) -> Result<(Session, Welcome), Refused> {
        if hello.role != Role::Regional {
            return Err(Refused {
                reason: Refusal::WrongRole,
                message: format!(
                    "{} connected as {:?}; the coordinator serves regionals",
                    hello.node, hello.role
                ),
            });
        }
        let known = self.links.coordinator.regions();
        if !known.iter().any(|r| r.name == hello.region) {
            let names: Vec<&str> = known.iter().map(|r| r.name.as_str()).collect();
            return Err(Refused {
                reason: Refusal::WrongRegion,
                message: format!(
                    "{} serves region {:?}; the coordinator knows {}",
                    hello.node,
                    hello.region,
                    names.join(", ")
                ),
            });
        }
        let session = Session {
            id: self.links.next_session.fetch_add(1, Ordering::Relaxed),
            node: hello.node.clone(),
            region: hello.region.clone(),
            rule_set_version: hello.rule_set_version,
        };
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            node: self.links.node.clone(),
            role: Role::Coordinator,
            region: String::new(),
            rule_set_version: self.links.coordinator.rules().version(),
        };
        Ok((session, welcome))
    }

    fn connected(&self, session: &Arc<Session>, connection: &Connection) {
        tracing::info!(regional = %session.node, region = %session.region, "regional connected");
        self.links
            .regions()
            .entry(session.region.clone())
            .or_default()
            .replicas
            .insert(
                session.id,
                Replica {
                    node: session.node.clone(),
                    conn: connection.clone(),
                    confirmed: None,
                    in_flight: true,
                },
            );
        let (links, session, conn) = (self.links.clone(), session.clone(), connection.clone());
        tokio::spawn(async move {
            let rules = links.coordinator.rules();
            if session.rule_set_version < rules.version() {
                let push = Message::from(RuleSetPush::of(&rules));
                if let Err(reason) = net::push_rule_set(&conn, &push, CALL_TIMEOUT).await {
                    tracing::warn!(regional = %session.node, %reason, "rule set not taken");
                }
            }
            // Ask what it holds (version 0 changes nothing), then give it what it should.
            let probe = Message::from(Partitions {
                version: 0,
                rules: Vec::new(),
                keys: Vec::new(),
            });
            let answer = call(&conn, &probe).await;
            links.confirmed(&session.region, session.id, answer);
            links.sync().await;
        });
    }

    async fn handle(&self, session: &Arc<Session>, message: Message) -> Message {
        match message {
            Message::Report(report) => self.report(session, &report),
            Message::QuotaRequest(request) => {
                let (granted, late) = self.links.transfer(&session.region, &request).await;
                if !late.is_empty() {
                    let late_task =
                        self.links
                            .clone()
                            .land_late(session.clone(), request.clone(), late);
                    tokio::spawn(late_task);
                }
                QuotaReply {
                    request_id: request.request_id,
                    granted,
                }
                .into()
            }
            other => ErrorNotice {
                code: CloseCode::UnexpectedMessage,
                message: format!("{} is not a request a regional sends", other.kind()),
            }
            .into(),
        }
    }

    fn closed(&self, session: &Session) {
        tracing::info!(regional = %session.node, region = %session.region, "regional disconnected");
        if let Some(region) = self.links.regions().get_mut(&session.region) {
            region.replicas.remove(&session.id);
        }
    }
}

impl RegionalService {
    fn report(&self, session: &Session, report: &Report) -> Message {
        let links = &self.links;
        links.stats.reports.fetch_add(1, Ordering::Relaxed);
        let rules = links.coordinator.rules();
        // Demand per rule: the largest of its limits' (admitted + denied) per second.
        let secs = (report.interval.as_u64() as f64 / 1e9).max(1e-3);
        let mut per_rule: BTreeMap<&str, u64> = BTreeMap::new();
        for d in &report.demand {
            if let Some((rule, _)) = rules.limit(d.limit) {
                let rate = (d.used.saturating_add(d.denied) as f64 / secs) as u64;
                let slot = per_rule.entry(rule.id()).or_insert(0);
                *slot = (*slot).max(rate);
            }
        }
        for rule in rules.rules() {
            let rate = per_rule.get(rule.id()).copied().unwrap_or(0);
            links
                .coordinator
                .observe_demand(&session.region, rule.id(), rate);
        }
        links.observe_hot(&session.region, report);
        let partitions_version = {
            let mut regions = links.regions();
            let region = regions.entry(session.region.clone()).or_default();
            region.last_report = Some(Instant::now());
            region.edges = report.edges;
            region
                .replicas
                .get(&session.id)
                .and_then(|r| r.confirmed.as_ref())
                .map_or(0, |p| p.version)
        };
        ReportAck {
            rule_set_version: rules.version(),
            partitions_version,
        }
        .into()
    }
}

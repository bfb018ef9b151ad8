//! The regional's decisions: an edge's sync batch or exact request in, store operations out,
//! the answer back (DESIGN §4).
//!
//! A [`SyncBatch`] becomes one [`SyncOp`] per entry and one store call: each entry's window is
//! checked against the regional's own clock (the current or the previous window only,
//! DESIGN §9; anything else is counted as clock skew and left unanswered), grants are minted
//! only for the current window, and a sliding window's ops carry the weight of the previous
//! window. An [`Acquire`] becomes one store op per check (below). The answer is remembered
//! per (edge, request id) for a while, so a resent request is answered again without
//! consuming twice.
//!
//! The bounds of every ledger op come from the rules and the coordinator: `P` is this region's
//! partition of the limit for that key and window ([`PartitionTable`]; the whole limit when no
//! coordinator is configured), θ from the configuration, `n` the edges connected now. A
//! limiter whose state the store keeps (buckets, logs) is cut to the region's share instead
//! ([`StateLimiter::partitioned`]: capacity and rate alike).
//!
//! Under a coordinator, an exact request denied because the region's partition is spent (not
//! because edges hold grants) is escalated before it is denied (DESIGN §4): the regional asks
//! the coordinator, through its [`Escalation`], for more of that key's limit, within a budget,
//! and decides once more with what came back. When no region could release any, the denial
//! reopens within [`ESCALATION_RETRY`], so the edge asks again once other regions' idle
//! grants have come back. A denial caused by grants edges hold unused (a "held" denial) is
//! cached only briefly, and every edge's sync acks recall that key for a moment
//! ([`SyncAck::recalls`]), idle holders included. The other half of a transfer,
//! [`Regional::release`], gives away unused partition by consuming it on the exact path, so
//! giving it and admitting with it are one atomic check against the same `T + G`. A bucket
//! whose part here is empty escalates for tokens, without holding up the request: the giving
//! regions acquire them from their parts of the key's bucket, and they are added to this
//! region's part (at most to its capacity) for the next requests.
//!
//! An [`Acquire`] may mix algorithms. Its window checks (fixed and sliding window) become
//! [`ExactOp`]s on ledgers, decided in the window that is current here (a denied one tells the
//! edge when to try again: the window's end, or for a sliding window the instant the previous
//! window's carry has fallen enough); its token bucket,
//! leaky bucket and sliding log checks become [`StateOp`]s, each running the `shared`
//! algorithm on that key's state in the store.
//! The two kinds go to the store at once; when any check of either kind denies, what the
//! others consumed is refunded, ledgers and limiter states alike, so a request consumes from
//! all of its limits or from none. A limiter whose span no store keeps exactly
//! ([`MAX_SPAN`](crate::store::MAX_SPAN)) is denied and counted in
//! [`RegionalStats::unsupported`].
//!
//! A token bucket's keys are also decided at the edges, under grants of its tokens
//! (`shared::quota::lease`): a sync entry for one becomes a [`LeaseOp`] on its lease ledger
//! (the window is the lease window), and its exact checks park what edges hold unused first
//! ([`StateOp::leases`]), so the grants and the exact path share one bucket.
//!
//! What the edge learns of a limiter's check (a [`CheckOutcome`], `granted` always 0: a grant
//! comes with the next sync): `allowed`, where a leaky shaper's "go after X" counts as
//! allowed (its cost is in the bucket) but X is not on the wire, so the edge sends the request
//! on at once: through the regional a shaper admits exactly what a meter would, without the
//! spacing; `remaining`, the limiter's own; and `reset_at`, when allowed the time the limiter
//! is back to full capacity (bucket full or empty, the log's newest entry out of the window),
//! when denied the time the same cost fits again, until which the edge caches the denial. A
//! cost that can never fit (above the capacity) reopens at once: no wait helps it, and a
//! smaller one must not be refused meanwhile.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use shared::{
    Clock, LimitId, Nanos, RuleSet,
    algorithm::{Limiter, Outcome, Verdict},
    quota::{
        DEFAULT_THRESHOLD, EdgeId, Threshold, carry_fits_from, carry_weight_ppm,
        lease::{LEASE_WINDOW, grant_window},
        share_of,
    },
    wire::{
        AckEntry, Acquire, AcquireReply, CheckOutcome, HotKey, LimitPartition, MAX_KEYS_PER_BATCH,
        SyncAck, SyncBatch,
    },
};

use crate::partition::PartitionTable;
use crate::store::{
    Bounds, ExactOp, ExactReply, LEASE_LEDGER, LeaseOp, LedgerKey, Refund, StateKey, StateLimiter,
    StateOp, StateRefund, StateReply, Store, StoreError, SyncOp, state_exact_since,
    window_exact_since,
};

/// How the regional decides, apart from its rules.
#[derive(Clone, Debug)]
pub struct RegionalConfig {
    /// θ: grants stop at `θ·P`. Default 0.8.
    pub threshold: Threshold,
    /// How long an edge may cache a denial caused only by grants other edges hold unused:
    /// about one flush interval, when those grants come back. Default 100 ms.
    pub hold: Nanos,
    /// How long an exact answer is remembered for a resend. Default 10 s, far beyond any
    /// edge's timeout.
    pub replay_window: Nanos,
    /// Whether a coordinator hands out this region's partitions. Without one the region owns
    /// every limit whole; with one it holds nothing until the coordinator's first
    /// `Partitions`. Default false.
    pub coordinated: bool,
}

impl Default for RegionalConfig {
    fn default() -> RegionalConfig {
        RegionalConfig {
            threshold: DEFAULT_THRESHOLD,
            hold: Nanos::from_millis(100),
            replay_window: Nanos::from_secs(10),
            coordinated: false,
        }
    }
}

/// Counters an operator reads (issue 6 exports them as metrics).
#[derive(Debug, Default)]
pub struct RegionalStats {
    /// Sync batches answered.
    pub syncs: AtomicU64,
    /// Sync entries merged.
    pub entries: AtomicU64,
    /// Exact requests decided (resends not counted).
    pub exact: AtomicU64,
    /// Exact requests denied.
    pub denied: AtomicU64,
    /// Exact requests answered from memory (resends).
    pub replayed: AtomicU64,
    /// Entries or checks for a window neither current nor previous here: clock skew.
    pub skewed: AtomicU64,
    /// Entries or checks naming a limit the rules do not have.
    pub unknown_limit: AtomicU64,
    /// Sync entries for an algorithm without grants (the edge sends those keys down the
    /// exact path) or for a bucket this region holds none of, and checks on a limiter whose
    /// span is beyond
    /// [`MAX_SPAN`](crate::store::MAX_SPAN) (denied).
    pub unsupported: AtomicU64,
    /// Store calls that failed.
    pub store_errors: AtomicU64,
    /// Exact requests escalated to the coordinator before a denial.
    pub escalations: AtomicU64,
    /// Escalations that brought back quota.
    pub escalations_granted: AtomicU64,
    /// Units this region gave away to transfers.
    pub released_units: AtomicU64,
}

/// How a regional asks the coordinator for more of a key's limit before denying it
/// (DESIGN §4, escalation). The uplink to the coordinator implements it.
pub trait Escalation: Send + Sync + 'static {
    /// Asks for `wanted` more units of `limit` for `key` in `window`; answers what the
    /// coordinator granted this region (0 when nothing could be, or the link failed).
    ///
    /// The answer may come after the escalation budget: the request that asked is denied by
    /// then, but what other regions released for this one still lands in its partition for
    /// the requests after it. So the future should wait as long as a transfer can take, not
    /// just the budget.
    fn request(
        &self,
        limit: LimitId,
        key: &str,
        window: u64,
        wanted: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send + '_>>;
}

/// Whether a denial of `op`, answered `r`, may be helped by another region's tokens: a bucket
/// that is empty here. Not a log (its units are entries that age out, not tokens to move), not
/// a cost above the capacity, and not a denial the store could not decide (another region's
/// tokens would not make the count known, and would be lost to it).
fn refillable(op: &StateOp, r: &StateReply) -> bool {
    r.outcome.verdict == Verdict::Deny
        && !r.unknown
        && matches!(
            op.limiter,
            StateLimiter::TokenBucket(_) | StateLimiter::LeakyBucket(_)
        )
}

/// This region's part of the bucket or log `whole` of `limit` as its share is at `now`; `None`
/// when it holds none.
fn part_in_force(
    partitions: &PartitionTable,
    limit: LimitId,
    whole: StateLimiter,
    now: Nanos,
) -> Option<StateLimiter> {
    let (tick, _) = schedule_clock(&whole.limiter());
    let share = partitions.share(limit, now.as_u64() / tick.as_u64().max(1));
    whole.partitioned(share)
}

/// How long the bucket `whole` takes to refill (or drain) one unit.
fn refill_interval(whole: StateLimiter) -> Nanos {
    match whole {
        StateLimiter::TokenBucket(g) => g.emission_interval(),
        StateLimiter::LeakyBucket(b) => b.drain_interval(),
        StateLimiter::SlidingLog(l) => l.window(),
    }
}

/// Adds `units` tokens other regions gave up to this region's part of `at`'s bucket (`whole`,
/// the rule's), as the part is in force now: a refund of an acquire of `units` that started
/// now, so the level drops by them and never below empty. What the part has no room for is
/// lost (a false denial later at worst, never an overshoot).
async fn land_tokens(
    store: &dyn Store,
    partitions: &PartitionTable,
    whole: StateLimiter,
    at: &StateKey,
    units: u64,
    now: Nanos,
) -> Result<(), StoreError> {
    let Some(part) = part_in_force(partitions, at.limit, whole, now) else {
        return Ok(());
    };
    let Some(cost) = NonZeroU32::new(u32::try_from(units).unwrap_or(u32::MAX)) else {
        return Ok(());
    };
    let taken = u64::from(cost.get()).saturating_mul(refill_interval(part).as_u64());
    let refund = StateRefund {
        at: at.clone(),
        limiter: part,
        cost,
        admitted: Outcome {
            verdict: Verdict::Allow,
            limit: part.limiter().limit(),
            remaining: 0,
            reset_at: Nanos(now.as_u64().saturating_add(taken)),
            retry_after: Nanos::ZERO,
        },
        receipt: 0,
    };
    store.refund_state(now, std::slice::from_ref(&refund)).await
}

/// A ledger's answer as the edge reads it. A denial that only grants held elsewhere caused
/// reopens after `hold` ([`RegionalConfig::hold`]);
/// a sliding window's, when the previous window's carry has fallen enough for the cost to
/// fit beside what this window counts; any other at the window's end.
///
/// The sliding window's reopening is what its count does by time alone. Reopening at the
/// window's end instead would deny a key kept at its limit for the rest of every window that
/// starts with a full carry, and so admit about half its limit over time.
fn ledger_outcome(
    r: &ExactReply,
    op: &ExactOp,
    window: LedgerWindow,
    now: Nanos,
    hold: Nanos,
) -> CheckOutcome {
    let reset_at = if r.allowed {
        window.end
    } else if r.held {
        (now + hold).min(window.end)
    } else {
        carry_reopen(r, op, window).map_or(window.end, |t| t.clamp(now, window.end))
    };
    CheckOutcome {
        allowed: r.allowed,
        remaining: r.remaining,
        reset_at,
        // 0 never lowers the edge's ceiling (it keeps the larger).
        granted: if window.same { r.granted } else { 0 },
    }
}

/// When a sliding window's denial reopens by time alone: the instant the carry of the
/// previous window's `T` leaves room for this window's `T` and the cost under `P`. `None`
/// for a fixed window, or when `T` and the cost do not fit even without a carry (then not
/// before the window ends, where the next window's partition applies).
fn carry_reopen(r: &ExactReply, op: &ExactOp, window: LedgerWindow) -> Option<Nanos> {
    if op.bounds.carry_ppm == 0 || r.previous == 0 {
        return None;
    }
    let room = op
        .bounds
        .partition
        .checked_sub(r.total)?
        .checked_sub(op.cost)?;
    let start = window.end - window.length;
    Some(start + carry_fits_from(window.length, r.previous, room))
}

/// What an escalation did for a denied request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escalated {
    /// Every spent key's partition grew: decide again.
    Grown,
    /// A transfer is still on its way after waiting this long (the budget, or half the
    /// edge's wait): deny, but only for as long again (at most the hold), since what it
    /// brings lands in the partition for the next requests.
    Landing(Duration),
    /// The coordinator asked the other regions and none could release any now: deny, and
    /// have the edge ask again within [`ESCALATION_RETRY`] (see there).
    Refused,
    /// Nothing came, nor will (no coordinator, or not a denial escalation can help).
    Nothing,
}

/// The longest an edge caches a denial that escalation could not help, when its key would
/// otherwise reopen later. Other regions cannot release what their edges hold unused as
/// grants, but those edges hand it back when they go idle (after 10 s, the edges' default)
/// or are recalled; asking again then moves it. Caching until the window's end instead left
/// a key split across regions short for the rest of its window (for a 10-an-hour limit, an
/// hour), although quota was free. The cost is bounded: one exact check, with its
/// escalation, per edge and key every 10 s while the key stays spent everywhere.
pub const ESCALATION_RETRY: Duration = Duration::from_secs(10);

/// How long every sync ack recalls a key after a "held" denial of it: five flush intervals
/// (100 ms by default), so each edge's next sync carries it even when one is late. Not much
/// longer: an edge using the key hands back its grant at each of those syncs too.
const RECALL_FOR: Duration = Duration::from_millis(500);

/// One limit's demand since the last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitDemand {
    /// Cost admitted (growth of `T` seen here).
    pub used: u64,
    /// Cost denied on the exact path.
    pub denied: u64,
    /// The highest `T / P` seen in a current window, in ppm.
    pub utilisation_ppm: u32,
}

/// A key near or past its partition since the last report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotDemand {
    /// The limit.
    pub limit: LimitId,
    /// The key.
    pub key: String,
    /// Its window.
    pub window: u64,
    /// `T` last seen.
    pub used: u64,
    /// Cost denied.
    pub denied: u64,
    /// `P_r` last used.
    pub partition: u64,
}

/// What the regional saw since the last report: per limit, and the keys near their partition.
#[derive(Default)]
struct Demand {
    limits: HashMap<LimitId, LimitDemand>,
    /// Per limit, then key: the window and `T` last seen, for the growth of `T`. Nested so a
    /// key already seen is found by `&str`, without allocating on the sync path.
    seen: HashMap<LimitId, HashMap<String, (u64, u64)>>,
    hot: HashMap<LimitId, HashMap<String, HotDemand>>,
}

/// The most hot keys one report carries.
pub const REPORT_HOT_KEYS: usize = 64;

/// One region's decision-maker. Share it behind an `Arc`; every method takes `&self`.
pub struct Regional {
    config: RegionalConfig,
    rules: RwLock<Arc<RuleSet>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock + Send + Sync>,
    edges: AtomicU32,
    replies: Mutex<Replies>,
    hot: Mutex<HashMap<(LimitId, String), u64>>,
    /// Keys (with their window) an exact request was denied for only because edges hold their
    /// quota unused, and until when every sync ack carries them ([`SyncAck::recalls`]).
    recalls: Mutex<HashMap<(LimitId, String, u64), Nanos>>,
    /// Shared with bucket escalations running on their own tasks.
    stats: Arc<RegionalStats>,
    /// Shared with escalations still landing after their request gave up on them.
    partitions: Arc<PartitionTable>,
    /// How to escalate, and how long a request waits for it (the budget).
    escalation: RwLock<Option<(Arc<dyn Escalation>, Duration)>>,
    /// Keys being escalated now, so that one key has one escalation at a time.
    escalating: Mutex<HashMap<(LimitId, String, u64), Arc<KeyEscalation>>>,
    /// Bucket keys escalating now (until `Nanos::MAX`) or resting, until the time given, after
    /// an escalation that brought nothing back: one ask per key at a time, and a bucket empty
    /// in every region is not asked about on every denial.
    bucket_asks: Arc<Mutex<HashMap<(LimitId, String), Nanos>>>,
    demand: Mutex<Demand>,
    /// What each transfer released, so a resent `Release`, even one that arrives while the
    /// first is still at the store, gives once and is answered the same.
    released: OncePerId<u64>,
}

/// How long a finished release is remembered, at least: longer than the coordinator keeps
/// asking again for a late confirm (`TRANSFER_ANSWER_WITHIN`, then five rounds of a second's
/// wait and half a second's pause).
const RELEASE_MEMORY: Duration = Duration::from_secs(60);

/// Work done once per id (a transfer's release here, a grant's landing), its answer kept for
/// resends: one that comes while the first is still running waits for it and gets the same
/// answer. A finished entry is forgotten `keep` after it was first asked for; a running one
/// never is, or a resend after a long stall would run it a second time.
pub(crate) struct OncePerId<T> {
    keep: Duration,
    seen: Mutex<Seen<T>>,
}

struct Seen<T> {
    /// id → when it was first asked for, and its answer once known.
    ids: HashMap<u64, (std::time::Instant, Answer<T>)>,
    /// When finished entries are next looked for: a sweep every quarter of `keep`, not on
    /// every call, holds at most 1.25 `keep` of them and keeps each call O(1).
    next_sweep: std::time::Instant,
}

type Answer<T> = Arc<tokio::sync::OnceCell<T>>;

impl<T: Copy> OncePerId<T> {
    pub(crate) fn new(keep: Duration) -> OncePerId<T> {
        OncePerId {
            keep,
            seen: Mutex::new(Seen {
                ids: HashMap::new(),
                next_sweep: std::time::Instant::now() + keep / 4,
            }),
        }
    }

    /// The answer for `id`: `f`'s, run now unless a call for `id` has succeeded already. A
    /// failure is not kept, so a resend runs `f` again.
    pub(crate) async fn get_or_try_init<E, F>(&self, id: u64, f: impl FnOnce() -> F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
    {
        let cell = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            if now >= seen.next_sweep {
                let keep = self.keep;
                seen.ids.retain(|_, (at, cell)| {
                    !cell.initialized() || now.saturating_duration_since(*at) < keep
                });
                seen.next_sweep = now + keep / 4;
            }
            seen.ids
                .entry(id)
                .or_insert_with(|| (now, Arc::default()))
                .1
                .clone()
        };
        cell.get_or_try_init(f).await.copied()
    }
}

/// One key's escalations: taken in turn, counted when done.
#[derive(Default)]
struct KeyEscalation {
    turn: tokio::sync::Mutex<()>,
    completed: AtomicU64,
}

/// The counter identity a released transfer is consumed under (exact path, no edge's).
const TRANSFER: EdgeId = EdgeId(0);

#[derive(Default)]
struct Replies {
    by_request: HashMap<(EdgeId, u64), (Nanos, AcquireReply)>,
    oldest: Nanos,
}

/// An exact request's checks as store operations.
struct Plan {
    /// The window checks, on ledgers.
    exact: Vec<ExactOp>,
    /// Per ledger op: the window it is decided in.
    windows: Vec<LedgerWindow>,
    /// The token bucket, leaky bucket and sliding log checks, on limiter states.
    state: Vec<StateOp>,
    /// Per check of the request, in order: the op that answers it.
    order: Vec<Op>,
}

/// The window a ledger op is decided in.
#[derive(Clone, Copy)]
struct LedgerWindow {
    end: Nanos,
    length: Nanos,
    /// Whether it is the window the edge named.
    same: bool,
}

/// Which op of a [`Plan`] answers a check.
#[derive(Clone, Copy)]
enum Op {
    /// `Plan::exact[i]`.
    Ledger(usize),
    /// `Plan::state[i]`.
    State(usize),
}

/// A store's replies, checked to be one per op (the outcomes are matched by position).
fn answers_every_op<T>(what: &str, replies: Vec<T>, ops: usize) -> Result<Vec<T>, StoreError> {
    if replies.len() == ops {
        return Ok(replies);
    }
    Err(StoreError::Permanent(format!(
        "{what}: {ops} ops answered with {} replies",
        replies.len()
    )))
}

/// A limiter's answer as the edge reads it (the module doc says what it learns).
fn state_outcome(o: &Outcome, now: Nanos) -> CheckOutcome {
    let reset_at = match o.verdict {
        Verdict::Allow | Verdict::Delay { .. } => o.reset_at,
        Verdict::Deny => now + o.retry_after,
        Verdict::InsufficientCapacity => now,
    };
    CheckOutcome {
        allowed: o.is_allowed(),
        remaining: o.remaining,
        reset_at,
        granted: 0,
    }
}

/// A window limit as the ledgers see it.
struct Window {
    length: Nanos,
    limit: u64,
    sliding: bool,
}

fn window_of(limiter: &Limiter) -> Option<Window> {
    match limiter {
        Limiter::FixedWindow(a) => Some(Window {
            length: a.window(),
            limit: a.limit().get(),
            sliding: false,
        }),
        Limiter::SlidingWindow(a) => Some(Window {
            length: a.window(),
            limit: a.limit().get(),
            sliding: true,
        }),
        _ => None,
    }
}

impl Regional {
    /// A regional enforcing `rules` over `store`, telling time by `clock`.
    pub fn new(
        config: RegionalConfig,
        rules: RuleSet,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock + Send + Sync>,
    ) -> Regional {
        let config_coordinated = config.coordinated;
        let release_memory =
            Duration::from_nanos(config.replay_window.as_u64()).max(RELEASE_MEMORY);
        Regional {
            config,
            rules: RwLock::new(Arc::new(rules)),
            store,
            clock,
            edges: AtomicU32::new(0),
            replies: Mutex::new(Replies::default()),
            hot: Mutex::new(HashMap::new()),
            recalls: Mutex::new(HashMap::new()),
            stats: Arc::default(),
            partitions: Arc::new(if config_coordinated {
                PartitionTable::coordinated()
            } else {
                PartitionTable::whole()
            }),
            escalation: RwLock::new(None),
            escalating: Mutex::new(HashMap::new()),
            bucket_asks: Arc::default(),
            demand: Mutex::new(Demand::default()),
            released: OncePerId::new(release_memory),
        }
    }

    /// This region's partitions.
    pub fn partitions(&self) -> &PartitionTable {
        &self.partitions
    }

    /// Escalates through `escalation` from now on; a denied request waits at most `budget`
    /// for it (DESIGN §4).
    pub fn set_escalation(&self, escalation: Arc<dyn Escalation>, budget: Duration) {
        *self.escalation.write().unwrap_or_else(|e| e.into_inner()) = Some((escalation, budget));
    }

    fn escalation(&self) -> Option<(Arc<dyn Escalation>, Duration)> {
        self.escalation
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records in the store what this region holds ([`PartitionTable::held`]), so a restart
    /// carries on with it. Called after every push of partitions, before it is answered.
    ///
    /// # Errors
    ///
    /// The store failed; a restart before the next success takes back older shares (or
    /// none), and another region's raise may then begin early.
    pub async fn save_partitions(&self) -> Result<(), StoreError> {
        self.store.save_partitions(&self.partitions.held()).await
    }

    /// Takes back what [`save_partitions`](Regional::save_partitions) recorded in an earlier
    /// run ([`PartitionTable::restore`]). Called at start, before the coordinator link.
    ///
    /// # Errors
    ///
    /// The store failed; nothing was restored.
    pub async fn restore_partitions(&self) -> Result<(), StoreError> {
        let held = self.store.partitions().await?;
        self.partitions.restore(&held);
        Ok(())
    }

    /// The current window of every window limit, for [`PartitionTable::apply`].
    pub fn schedule_index(&self, limit: LimitId) -> Option<(u64, u64)> {
        let rules = self.rules();
        let (_, l) = rules.limit(limit)?;
        let (tick, clear) = schedule_clock(l.limiter());
        Some((self.clock.now().as_u64() / tick.as_u64().max(1), clear))
    }

    /// `P` for `key` of `limit` (whole `whole`) in `window`.
    fn partition(&self, limit: LimitId, key: &str, window: u64, whole: u64) -> u64 {
        self.partitions.partition(limit, key, window, whole)
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the rules; decisions in flight finish under the old ones.
    pub fn set_rules(&self, rules: RuleSet) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// What has happened so far.
    pub fn stats(&self) -> &RegionalStats {
        &self.stats
    }

    /// An edge connected: `n` grows, and with it everyone's share shrinks.
    pub fn edge_connected(&self) {
        self.edges.fetch_add(1, Ordering::Relaxed);
    }

    /// An edge went away.
    pub fn edge_disconnected(&self) {
        let _ = self
            .edges
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The edges connected now (zero when none is).
    pub fn connected_edges(&self) -> u32 {
        self.edges.load(Ordering::Relaxed)
    }

    /// `n`: the edges connected now, at least one.
    pub fn edges(&self) -> u32 {
        self.edges.load(Ordering::Relaxed).max(1)
    }

    /// Merges `edge`'s batch and answers it. Entries for unknown limits, non-window
    /// algorithms or skewed windows get no answer (the edge resends them until their window
    /// passes, and they are counted here).
    /// The batch is taken whole so its keys move into the store ops and the ack without a
    /// copy each.
    pub async fn sync(&self, edge: EdgeId, batch: SyncBatch) -> Result<SyncAck, StoreError> {
        let now = self.clock.now();
        let rules = self.rules();
        let n = self.edges();
        let mut ops = Vec::with_capacity(batch.entries.len());
        // Per op: whether its window is current here (only those grant and mark keys hot).
        let mut is_current_op = Vec::with_capacity(batch.entries.len());
        // `P` of each limit named, for the edge's `c0` and `P/n` (current windows only).
        let mut partitions: HashMap<LimitId, u64> = HashMap::new();
        // A token bucket's entries: one lease op each, and whether its lease window is current.
        let mut leases = Vec::new();
        let mut is_current_lease = Vec::new();
        for e in batch.entries {
            let Some((rule, limit)) = rules.limit(e.limit) else {
                self.stats.unknown_limit.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // The window the entry's counts are filed under: a window limit's own, a bucket's
            // lease window. Sliding logs and shapers have none (their keys go exact).
            let Some(length) = grant_window(limit.limiter()) else {
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let current = now.as_u64() / length.as_u64();
            if e.window > current || e.window.saturating_add(1) < current {
                self.stats.skewed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let is_current = e.window == current;
            if let Limiter::TokenBucket(_) = limit.limiter() {
                let part = StateLimiter::new(limit.limiter())
                    .and_then(|whole| part_in_force(&self.partitions, e.limit, whole, now));
                let Some(StateLimiter::TokenBucket(part)) = part else {
                    // Beyond what a store keeps, or none of it held here: nothing to grant.
                    self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if is_current {
                    partitions.entry(e.limit).or_insert(part.burst().get());
                }
                let other = if is_current {
                    current.saturating_sub(1)
                } else {
                    current
                };
                let bucket = StateLimiter::TokenBucket(part);
                is_current_lease.push(is_current);
                leases.push(LeaseOp {
                    other: LedgerKey::lease(e.limit, e.key.clone(), other),
                    at: LedgerKey::lease(e.limit, e.key, e.window),
                    limiter: part,
                    used: e.used,
                    released: e.released,
                    want: if is_current { e.want } else { 0 },
                    threshold: self.config.threshold,
                    edges: n,
                    expire_at: expiry(e.window, LEASE_WINDOW),
                    exact_since: state_exact_since(rule.on_failure(), &bucket, now),
                });
                continue;
            }
            let Some(w) = window_of(limit.limiter()) else {
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            is_current_op.push(is_current);
            if is_current {
                partitions
                    .entry(e.limit)
                    .or_insert_with(|| share_of(w.limit, self.partitions.share(e.limit, current)));
            }
            let carry = if w.sliding && is_current {
                carry_weight_ppm(w.length, Nanos(now.as_u64() % w.length.as_u64()))
            } else {
                0
            };
            let partition = self.partition(e.limit, &e.key, e.window, w.limit);
            ops.push(SyncOp {
                at: LedgerKey {
                    limit: e.limit,
                    key: e.key,
                    window: e.window,
                },
                used: e.used,
                released: e.released,
                // A past window gets its counts merged, never a grant.
                want: if is_current { e.want } else { 0 },
                bounds: Bounds::new(partition, self.config.threshold, n, carry),
                expire_at: expiry(e.window, w.length),
                exact_since: window_exact_since(rule.on_failure(), e.window, w.length, w.sliding),
            });
        }
        let (replies, lease_replies) = futures_util::future::join(
            async {
                if ops.is_empty() {
                    return Ok(Vec::new());
                }
                let replies = self.store.sync(edge, now, &ops).await?;
                answers_every_op("sync", replies, ops.len())
            },
            async {
                if leases.is_empty() {
                    return Ok(Vec::new());
                }
                let replies = self.store.lease(edge, now, &leases).await?;
                answers_every_op("lease", replies, leases.len())
            },
        )
        .await;
        let (replies, lease_replies) =
            replies
                .and_then(|r| Ok((r, lease_replies?)))
                .inspect_err(|_| {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                })?;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .entries
            .fetch_add((ops.len() + leases.len()) as u64, Ordering::Relaxed);
        if self.partitions.is_coordinated() {
            let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
            for ((op, r), current) in ops.iter().zip(&replies).zip(&is_current_op) {
                if *current {
                    demand.observe(&op.at, r.total, op.bounds.partition, 0);
                }
            }
            // What edges admitted under a bucket's grants: the region's demand for it.
            for (op, r) in leases.iter().zip(&lease_replies) {
                demand.observe_state(op.at.limit, r.admitted, 0);
            }
        }
        let mut entries = Vec::with_capacity(ops.len() + leases.len());
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
        for ((op, r), is_current) in leases.into_iter().zip(lease_replies).zip(is_current_lease) {
            let burst = op.limiter.burst().get();
            // Out of the bucket (spent, or held unused at edges): a bucket's `T`.
            let taken = burst.saturating_sub(r.level);
            let window = op.at.window & !LEASE_LEDGER;
            let is_hot = taken.saturating_mul(2) >= self.config.threshold.of(burst);
            if is_hot && is_current {
                hot.insert((op.at.limit, op.at.key.clone()), window);
            }
            entries.push(AckEntry {
                limit: op.at.limit,
                key: op.at.key,
                window,
                granted: r.granted,
                total: taken,
                edges: n,
                hot: is_hot,
                used: r.used,
                released: r.released,
                // A bucket refills: running low stops grants for now (the pool is spent, and
                // holders are recalled), never for the rest of the lease window.
                near_limit: false,
                recall: r.recall,
            });
        }
        for ((op, r), is_current) in ops.into_iter().zip(replies).zip(is_current_op) {
            // DESIGN §4: keys above θ·P/2 are broadcast so no edge spends a cold allowance
            // on them. Only the current window's count says so (a past window's would
            // overwrite the key's current one in the broadcast list).
            let is_hot = r.reserved.saturating_mul(2) >= op.bounds.ceiling();
            if is_hot && is_current {
                hot.insert((op.at.limit, op.at.key.clone()), op.at.window);
            }
            entries.push(AckEntry {
                limit: op.at.limit,
                key: op.at.key,
                window: op.at.window,
                granted: r.granted,
                total: r.total,
                edges: n,
                hot: is_hot,
                used: r.used,
                released: r.released,
                near_limit: r.near_limit,
                recall: r.recall,
            });
        }
        let hot_keys = hot_keys(&mut hot, &rules, now);
        drop(hot);
        let partitions = partitions
            .into_iter()
            .map(|(limit, partition)| LimitPartition { limit, partition })
            .collect();
        Ok(SyncAck {
            entries,
            hot_keys,
            partitions,
            recalls: self.recalls(now),
        })
    }

    /// Notes the keys of `plan` that `exact` denied only because edges hold their quota
    /// unused as grants (a "held" denial), for every edge's next sync acks to recall.
    fn recall_held(&self, plan: &Plan, exact: &[ExactReply], now: Nanos) {
        let mut held = plan
            .exact
            .iter()
            .zip(exact)
            .filter(|(_, r)| !r.allowed && r.held)
            .peekable();
        if held.peek().is_none() {
            return; // the common case: no lock taken
        }
        let mut recalls = self.recalls.lock().unwrap_or_else(|e| e.into_inner());
        if recalls.len() >= MAX_KEYS_PER_BATCH {
            recalls.retain(|_, until| *until > now);
        }
        for (op, _) in held {
            if recalls.len() >= MAX_KEYS_PER_BATCH {
                break;
            }
            let at = (op.at.limit, op.at.key.clone(), op.at.window);
            recalls.insert(at, now + Nanos::from(RECALL_FOR));
        }
    }

    /// The keys every sync ack recalls now ([`recall_held`](Regional::recall_held)).
    fn recalls(&self, now: Nanos) -> Vec<HotKey> {
        let mut recalls = self.recalls.lock().unwrap_or_else(|e| e.into_inner());
        recalls.retain(|_, until| *until > now);
        recalls
            .keys()
            .map(|(limit, key, window)| HotKey {
                limit: *limit,
                key: key.clone(),
                window: *window,
            })
            .collect()
    }

    /// Decides `edge`'s exact request: every check's cost is consumed, or none.
    pub async fn acquire(
        &self,
        edge: EdgeId,
        request: &Acquire,
    ) -> Result<AcquireReply, StoreError> {
        self.acquire_within(edge, request, None).await
    }

    /// [`acquire`](Regional::acquire) for an edge that waits `within` for the answer: an
    /// escalation waits at most half of that (and never past the budget), leaving the other
    /// half for deciding again and the way back. An edge that waited in vain would decide by
    /// its failure modes and stop asking for a while; denied in time, it caches the denial
    /// only as long as the request waited, and asks again while the transfer lands.
    pub async fn acquire_within(
        &self,
        edge: EdgeId,
        request: &Acquire,
        within: Option<Duration>,
    ) -> Result<AcquireReply, StoreError> {
        let now = self.clock.now();
        if let Some(reply) = self.replayed(edge, request.request_id, now) {
            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(reply);
        }
        let mut plan = match self.plan(request, now) {
            Ok(plan) => plan,
            Err(denied) => return Ok(denied),
        };
        let (mut exact, mut state) = self.decide(edge, now, &plan).await?;
        self.recall_held(&plan, &exact, now);
        let mut allowed =
            exact.iter().all(|r| r.allowed) && state.iter().all(|r| r.outcome.is_allowed());
        // The latest a denial reopens, when an escalation says sooner than its ledger does.
        let mut reopen_by: Option<Nanos> = None;
        if !allowed {
            self.refund(now, &plan, &exact, &state).await;
            self.escalate_buckets(&plan, &state, now);
            match self.escalate(&plan, &exact, &state, within).await {
                Escalated::Grown => {
                    // Decided once more, with the partitions the coordinator just raised.
                    plan = match self.plan(request, now) {
                        Ok(plan) => plan,
                        Err(denied) => return Ok(denied),
                    };
                    (exact, state) = self.decide(edge, now, &plan).await?;
                    self.recall_held(&plan, &exact, now);
                    allowed = exact.iter().all(|r| r.allowed)
                        && state.iter().all(|r| r.outcome.is_allowed());
                    if !allowed {
                        self.refund(now, &plan, &exact, &state).await;
                    }
                }
                // The edge caches this denial briefly, not until the window ends: the quota on
                // its way is for its next requests, and the next one after as long as this
                // one waited finds it landed, or waits for it in turn.
                Escalated::Landing(waited) => {
                    reopen_by = Some(now + self.config.hold.min(Nanos::from(waited)));
                }
                Escalated::Refused => {
                    reopen_by = Some(now + Nanos::from(ESCALATION_RETRY));
                }
                Escalated::Nothing => {}
            }
        }
        if self.partitions.is_coordinated() {
            let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
            for (op, r) in plan.exact.iter().zip(&exact) {
                let denied = if allowed { 0 } else { op.cost };
                let total = if allowed {
                    r.total
                } else {
                    r.total.saturating_sub(if r.allowed { op.cost } else { 0 })
                };
                demand.observe(&op.at, total, op.bounds.partition, denied);
            }
            for op in &plan.state {
                let cost = u64::from(op.cost.get());
                let (used, denied) = if allowed { (cost, 0) } else { (0, cost) };
                demand.observe_state(op.at.limit, used, denied);
            }
        }
        if !allowed {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.exact.fetch_add(1, Ordering::Relaxed);
        let outcomes = plan
            .order
            .iter()
            .map(|&op| match op {
                Op::Ledger(i) => {
                    let hold = self.config.hold;
                    let mut o =
                        ledger_outcome(&exact[i], &plan.exact[i], plan.windows[i], now, hold);
                    if let Some(by) = reopen_by.filter(|_| !o.allowed) {
                        o.reset_at = o.reset_at.min(by);
                    }
                    o
                }
                Op::State(i) => state_outcome(&state[i].outcome, now),
            })
            .collect();
        let reply = AcquireReply::from_checks(request.request_id, now, outcomes);
        self.remember(edge, now, &reply);
        Ok(reply)
    }

    /// Asks the coordinator for more of every key whose partition alone denied the request
    /// (not grants other edges hold: those come back by themselves). Only when every denial
    /// is of that kind: a limiter state that denied cannot be helped.
    async fn escalate(
        &self,
        plan: &Plan,
        exact: &[ExactReply],
        state: &[StateReply],
        within: Option<Duration>,
    ) -> Escalated {
        let Some((escalation, budget)) = self.escalation() else {
            return Escalated::Nothing;
        };
        let budget = within.map_or(budget, |w| budget.min(w / 2));
        if state.iter().any(|r| !r.outcome.is_allowed()) {
            return Escalated::Nothing;
        }
        let spent: Vec<&ExactOp> = plan
            .exact
            .iter()
            .zip(exact)
            .filter(|(_, r)| !r.allowed)
            .map(|(op, _)| op)
            .collect();
        if spent.is_empty() || exact.iter().any(|r| !r.allowed && r.held) {
            return Escalated::Nothing;
        }
        self.stats.escalations.fetch_add(1, Ordering::Relaxed);
        let rules = self.rules();
        let whole = |op: &ExactOp| {
            rules
                .limit(op.at.limit)
                .and_then(|(_, l)| window_of(l.limiter()))
                .map_or(op.cost, |w| w.limit)
        };
        let asks = spent
            .iter()
            .map(|op| self.escalate_key(&escalation, budget, op, whole(op)));
        let granted = futures_util::future::join_all(asks).await;
        if granted.iter().any(|g| g.is_some_and(|u| u > 0)) {
            self.stats
                .escalations_granted
                .fetch_add(1, Ordering::Relaxed);
        }
        // Decide again when every spent key's partition grew, by this escalation or by
        // another one that ran meanwhile (a burst escalates many requests at once, and the
        // one that lands the transfer must not be the only one that uses it).
        let grown = spent.iter().all(|op| {
            self.partition(op.at.limit, &op.at.key, op.at.window, whole(op)) > op.bounds.partition
        });
        if grown {
            Escalated::Grown
        } else if granted.contains(&None) {
            Escalated::Landing(budget)
        } else {
            Escalated::Refused
        }
    }

    /// Asks the coordinator for tokens for every bucket whose part here is empty, each on a
    /// task of its own: the request is denied at once (its denial is cached only until the
    /// cost refills), and what the other regions give up lands in this region's part for the
    /// next requests. Waiting for it instead would make every over-rate denial wait on a
    /// coordinator round trip.
    ///
    /// Tokens move, not capacity: the giving regions take them from their parts of the key's
    /// bucket ([`Regional::release`]) and they are added to this region's part, never past its
    /// capacity. The sum of the regions' levels does not grow, nor do their capacities or
    /// rates, so the bucket's bound across regions (`C + r·t`) holds through a transfer.
    fn escalate_buckets(&self, plan: &Plan, state: &[StateReply], now: Nanos) {
        let Some((escalation, _)) = self.escalation() else {
            return;
        };
        let rules = self.rules();
        for (op, r) in plan.state.iter().zip(state) {
            if !refillable(op, r) {
                continue;
            }
            let Some(whole) = rules
                .limit(op.at.limit)
                .and_then(|(_, l)| StateLimiter::new(l.limiter()))
            else {
                continue;
            };
            // A twentieth of the bucket at a time, but no more than this part has room for:
            // the rest would be lost when it lands.
            let room = op
                .limiter
                .limiter()
                .limit()
                .saturating_sub(r.outcome.remaining);
            let wanted = u64::from(op.cost.get())
                .max(whole.limiter().limit() / 20)
                .min(room);
            if wanted == 0 {
                continue;
            }
            let at = StateKey {
                limit: op.at.limit,
                key: op.at.key.clone(),
            };
            {
                let mut asks = self.bucket_asks.lock().unwrap_or_else(|e| e.into_inner());
                asks.retain(|_, until| *until > now);
                if asks.contains_key(&(at.limit, at.key.clone())) {
                    continue;
                }
                asks.insert((at.limit, at.key.clone()), Nanos::MAX);
            }
            self.stats.escalations.fetch_add(1, Ordering::Relaxed);
            let escalation = escalation.clone();
            let (store, partitions, clock) = (
                self.store.clone(),
                self.partitions.clone(),
                self.clock.clone(),
            );
            let (stats, asks) = (self.stats.clone(), self.bucket_asks.clone());
            tokio::spawn(async move {
                // Buckets have no windows: the transfer is asked for under window 0.
                let units = escalation.request(at.limit, &at.key, 0, wanted).await;
                let now = clock.now();
                if units > 0 {
                    match land_tokens(&*store, &partitions, whole, &at, units, now).await {
                        Ok(()) => {
                            stats.escalations_granted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            stats.store_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "tokens given to this region were not added");
                        }
                    }
                }
                let mut asks = asks.lock().unwrap_or_else(|e| e.into_inner());
                let key = (at.limit, at.key);
                if units > 0 {
                    asks.remove(&key);
                } else {
                    // Nothing anywhere: ask again once the whole bucket could have refilled
                    // what was asked for.
                    let refill = Nanos(wanted.saturating_mul(refill_interval(whole).as_u64()));
                    asks.insert(key, now + refill);
                }
            });
        }
    }

    /// Asks for more of one key (`op`'s) whose limit is `whole`, and adds what comes back to
    /// its partition; returns that, or `None` when the budget ran out first.
    ///
    /// One escalation per key at a time: a request that finds one in flight waits for it and
    /// asks only if none completed meanwhile. Otherwise a burst would race its own transfers:
    /// a late ask finds the other regions already released to this one (grants not yet landed
    /// here), gets nothing, and denies a request the landing quota would have admitted.
    ///
    /// The ask runs on its own task, so a transfer that outlasts the budget still lands: the
    /// other regions gave that quota up for this one, and dropping the answer would lose it
    /// for the window.
    async fn escalate_key(
        &self,
        escalation: &Arc<dyn Escalation>,
        budget: Duration,
        op: &ExactOp,
        whole: u64,
    ) -> Option<u64> {
        let at = (op.at.limit, op.at.key.clone(), op.at.window);
        let key = self
            .escalating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(at.clone())
            .or_default()
            .clone();
        let seen = key.completed.load(Ordering::Acquire);
        // A twentieth of the whole limit at a time, so a key moving its traffic to this
        // region escalates a few times per window, not once per request.
        let wanted = op.cost.max(whole / 20);
        let ask = {
            let (key, escalation, partitions) =
                (key.clone(), escalation.clone(), self.partitions.clone());
            let (limit, name, window) = at.clone();
            async move {
                let _turn = key.turn.lock().await;
                if key.completed.load(Ordering::Acquire) != seen {
                    return 0;
                }
                let units = escalation.request(limit, &name, window, wanted).await;
                if units > 0 {
                    partitions.add(limit, &name, window, units, window.saturating_sub(1));
                }
                key.completed.fetch_add(1, Ordering::Release);
                units
            }
        };
        let landed = tokio::time::timeout(budget, tokio::spawn(ask)).await;
        drop(key);
        // Forget the keys nobody escalates any more (only the map holds them); one still
        // landing keeps its place until it is done.
        self.escalating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, k| Arc::strong_count(k) > 1);
        match landed {
            Ok(Ok(units)) => Some(units),
            // The task panicked: nothing landed, nor will.
            Ok(Err(_)) => Some(0),
            Err(_) => None,
        }
    }

    /// Gives away up to `amount` of this region's unused partition of `key` in `window`, for
    /// transfer `transfer` (phase one, DESIGN §4): at most `P − T − G`, consumed on the exact
    /// path so nothing admitted here can use it any more. A transfer id is released once; a
    /// resent `Release` is answered with the same amount, and one that comes while the first
    /// is still at the store waits for it (the coordinator resends when a confirm is late).
    ///
    /// # Errors
    ///
    /// The store failed; nothing was released, and a resend tries again.
    pub async fn release(
        &self,
        transfer: u64,
        limit: LimitId,
        key: &str,
        window: u64,
        amount: u64,
    ) -> Result<u64, StoreError> {
        let now = self.clock.now();
        self.released
            .get_or_try_init(transfer, || {
                self.release_once(limit, key, window, amount, now)
            })
            .await
    }

    /// [`release`](Regional::release), done once per transfer.
    async fn release_once(
        &self,
        limit: LimitId,
        key: &str,
        window: u64,
        amount: u64,
        now: Nanos,
    ) -> Result<u64, StoreError> {
        let rules = self.rules();
        if let Some((rule, l)) = rules.limit(limit)
            && let Some(bucket) = StateLimiter::new(l.limiter())
            && !matches!(bucket, StateLimiter::SlidingLog(_))
        {
            let released = self
                .release_tokens(rule, bucket, limit, key, amount, now)
                .await?;
            return Ok(self.released(released));
        }
        let Some((rule, w)) = rules
            .limit(limit)
            .and_then(|(r, l)| Some((r, window_of(l.limiter())?)))
        else {
            return Ok(0);
        };
        let current = now.as_u64() / w.length.as_u64();
        if window != current {
            // A past window's quota is of no use to anyone; a future one's is not ours yet.
            return Ok(0);
        }
        let carry = if w.sliding {
            carry_weight_ppm(w.length, Nanos(now.as_u64() % w.length.as_u64()))
        } else {
            0
        };
        let mut op = ExactOp {
            at: LedgerKey {
                limit,
                key: key.to_owned(),
                window,
            },
            cost: amount,
            want: 0,
            bounds: Bounds::new(
                self.partition(limit, key, window, w.limit),
                self.config.threshold,
                self.edges(),
                carry,
            ),
            expire_at: expiry(window, w.length),
            exact_since: window_exact_since(rule.on_failure(), window, w.length, w.sliding),
        };
        // Consume what is unused: the first try asks for all of `amount`; a denial says what
        // was left, which the second try takes (unless edges took it meanwhile).
        let mut released = 0;
        for _ in 0..3 {
            if op.cost == 0 {
                break;
            }
            let reply = self
                .store
                .exact(TRANSFER, now, std::slice::from_ref(&op))
                .await
                .inspect_err(|_| {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                })?;
            let Some(reply) = reply.first() else { break };
            if reply.allowed {
                released = op.cost;
                break;
            }
            op.cost = op.cost.min(reply.remaining);
        }
        Ok(self.released(released))
    }

    /// Takes up to `amount` tokens from this region's part of `key`'s bucket (`bucket`, the
    /// whole one, of `rule`), for a transfer: an acquire of that cost, so nothing admitted
    /// here can use them any more; a denial says how many there were, which the next try
    /// takes (unless requests took them meanwhile).
    async fn release_tokens(
        &self,
        rule: &shared::rules::Rule,
        bucket: StateLimiter,
        limit: LimitId,
        key: &str,
        amount: u64,
        now: Nanos,
    ) -> Result<u64, StoreError> {
        let Some(part) = part_in_force(&self.partitions, limit, bucket, now) else {
            return Ok(0);
        };
        let mut op = StateOp {
            at: StateKey {
                limit,
                key: key.to_owned(),
            },
            limiter: part,
            cost: NonZeroU32::MIN,
            exact_since: state_exact_since(rule.on_failure(), &part, now),
        };
        let mut wanted = amount.min(part.limiter().limit());
        for _ in 0..3 {
            let Some(cost) = NonZeroU32::new(u32::try_from(wanted).unwrap_or(u32::MAX)) else {
                break;
            };
            op.cost = cost;
            let replies = self
                .store
                .acquire_state(now, std::slice::from_ref(&op))
                .await
                .inspect_err(|_| {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                })?;
            let Some(reply) = replies.first() else { break };
            if reply.outcome.is_allowed() {
                return Ok(u64::from(cost.get()));
            }
            if reply.unknown {
                // The store could not decide: give nothing rather than guess.
                break;
            }
            wanted = wanted.min(reply.outcome.remaining);
        }
        Ok(0)
    }

    /// Counts `released` units given away, and returns them.
    fn released(&self, released: u64) -> u64 {
        self.stats
            .released_units
            .fetch_add(released, Ordering::Relaxed);
        released
    }

    /// Adds what a transfer gave this region for `key` (phase two, a
    /// [`TransferGrant`](shared::wire::TransferGrant)): as tokens into this region's part of
    /// a bucket (see `land_tokens`; buckets are transferred under window 0), or to a window
    /// limit's partition of the key in `window`. The caller applies each transfer once.
    ///
    /// # Errors
    ///
    /// The store failed to take a bucket's tokens; the caller counts them lost (the store may
    /// have taken them all the same, so they are not landed again).
    pub async fn land(
        &self,
        limit: LimitId,
        key: &str,
        window: u64,
        amount: u64,
    ) -> Result<(), StoreError> {
        let rules = self.rules();
        // Only a grant made for a bucket lands as tokens: one for a window (a hot key's split,
        // sent to every replica of the region) of a rule that just became a bucket must not
        // land in the shared store once per replica.
        if window == 0
            && let Some((_, l)) = rules.limit(limit)
            && let Some(whole) = StateLimiter::new(l.limiter())
            && !matches!(whole, StateLimiter::SlidingLog(_))
        {
            let at = StateKey {
                limit,
                key: key.to_owned(),
            };
            let now = self.clock.now();
            return land_tokens(&*self.store, &self.partitions, whole, &at, amount, now).await;
        }
        self.partitions
            .add(limit, key, window, amount, window.saturating_sub(1));
        Ok(())
    }

    /// What this region saw since the last call: per limit, and the hot keys (hottest first,
    /// at most [`REPORT_HOT_KEYS`]). Starts the next interval.
    pub fn take_demand(&self) -> (Vec<(LimitId, LimitDemand)>, Vec<HotDemand>) {
        let mut demand = self.demand.lock().unwrap_or_else(|e| e.into_inner());
        let limits = std::mem::take(&mut demand.limits).into_iter().collect();
        let mut hot: Vec<HotDemand> = std::mem::take(&mut demand.hot)
            .into_values()
            .flat_map(HashMap::into_values)
            .collect();
        hot.sort_by_key(|h| std::cmp::Reverse((h.denied, h.used)));
        hot.truncate(REPORT_HOT_KEYS);
        // Forget keys of windows that have passed.
        let rules = self.rules();
        let now = self.clock.now().as_u64();
        demand.seen.retain(|limit, keys| {
            let Some(w) = rules
                .limit(*limit)
                .and_then(|(_, l)| window_of(l.limiter()))
            else {
                return false;
            };
            let current = now / w.length.as_u64();
            keys.retain(|_, (window, _)| *window + 1 >= current);
            !keys.is_empty()
        });
        (limits, hot)
    }

    /// Every ledger of `key` in its limits' current windows, with this region's partition
    /// (the admin API's debug view). `names` maps connected edges' ids to their node names.
    ///
    /// # Errors
    ///
    /// The store failed.
    pub async fn key_holdings(
        &self,
        key: &str,
        names: &HashMap<EdgeId, String>,
    ) -> Result<Vec<shared::wire::KeyHolding>, StoreError> {
        let rules = self.rules();
        let now = self.clock.now().as_u64();
        let mut out = Vec::new();
        for (_, limit) in rules.limits() {
            let Some(w) = window_of(limit.limiter()) else {
                continue;
            };
            let window = now / w.length.as_u64();
            let at = LedgerKey {
                limit: limit.id(),
                key: key.to_owned(),
                window,
            };
            let Some(view) = self.store.ledger(&at).await? else {
                continue;
            };
            out.push(shared::wire::KeyHolding {
                limit: limit.id(),
                window,
                partition: self.partition(limit.id(), key, window, w.limit),
                total: view.total(),
                exact: view.exact,
                edges: view
                    .edges
                    .iter()
                    .take(MAX_KEYS_PER_BATCH)
                    .map(|(id, c)| shared::wire::EdgeHolding {
                        edge: names
                            .get(id)
                            .cloned()
                            .unwrap_or_else(|| format!("edge-{:016x}", id.0)),
                        granted: c.granted,
                        released: c.released,
                        used: c.used,
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// Runs `plan`'s ops: its ledger ops and its limiter-state ops are separate store calls
    /// (separate scripts), made at once so a mixed request waits for one round trip, not two.
    /// When either call fails the request fails whole, and what the other admitted is taken
    /// back.
    async fn decide(
        &self,
        edge: EdgeId,
        now: Nanos,
        plan: &Plan,
    ) -> Result<(Vec<ExactReply>, Vec<StateReply>), StoreError> {
        let (exact, state) = futures_util::future::join(
            async {
                if plan.exact.is_empty() {
                    return Ok(Vec::new());
                }
                let replies = self.store.exact(edge, now, &plan.exact).await?;
                answers_every_op("exact", replies, plan.exact.len())
            },
            async {
                if plan.state.is_empty() {
                    return Ok(Vec::new());
                }
                let replies = self.store.acquire_state(now, &plan.state).await?;
                answers_every_op("limiter state", replies, plan.state.len())
            },
        )
        .await;
        match (exact, state) {
            (Ok(exact), Ok(state)) => Ok((exact, state)),
            (Err(e), state) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                self.refund(now, plan, &[], state.as_deref().unwrap_or_default())
                    .await;
                Err(e)
            }
            (Ok(exact), Err(e)) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                self.refund(now, plan, &exact, &[]).await;
                Err(e)
            }
        }
    }

    /// The store operations for `request`'s checks, decided at `now`; or, when a check names
    /// a limit the rules do not have or one no store can keep, the denial of all of it.
    fn plan(&self, request: &Acquire, now: Nanos) -> Result<Plan, AcquireReply> {
        let rules = self.rules();
        let n = self.edges();
        let mut plan = Plan {
            exact: Vec::with_capacity(request.checks.len()),
            windows: Vec::with_capacity(request.checks.len()),
            state: Vec::new(),
            order: Vec::with_capacity(request.checks.len()),
        };
        for c in &request.checks {
            let Some((rule, limit)) = rules.limit(c.limit) else {
                self.stats.unknown_limit.fetch_add(1, Ordering::Relaxed);
                return Err(AcquireReply::deny_all(request.request_id, now));
            };
            if let Some(state) = StateLimiter::new(limit.limiter()) {
                let Some(state) = part_in_force(&self.partitions, c.limit, state, now) else {
                    // This region holds none of it (yet): nothing to admit with.
                    return Err(AcquireReply::deny_all(request.request_id, now));
                };
                plan.order.push(Op::State(plan.state.len()));
                plan.state.push(StateOp {
                    at: StateKey {
                        limit: c.limit,
                        key: c.key.clone(),
                    },
                    limiter: state,
                    cost: c.cost,
                    exact_since: state_exact_since(rule.on_failure(), &state, now),
                });
                continue;
            }
            let Some(w) = window_of(limit.limiter()) else {
                // A bucket or log whose span is beyond what a store keeps exactly.
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                return Err(AcquireReply::deny_all(request.request_id, now));
            };
            let current = now.as_u64() / w.length.as_u64();
            if c.window.abs_diff(current) > 1 {
                // Decided here all the same (by this clock), but worth knowing.
                self.stats.skewed.fetch_add(1, Ordering::Relaxed);
            }
            let carry = if w.sliding {
                carry_weight_ppm(w.length, Nanos(now.as_u64() % w.length.as_u64()))
            } else {
                0
            };
            // The edge applies the answer's ceiling to the window it named; a grant minted in
            // another window (clocks a boundary apart) would be spent against a ledger that
            // does not reserve it. So none is minted, and none reported.
            let end = Nanos((current + 1).saturating_mul(w.length.as_u64()));
            plan.windows.push(LedgerWindow {
                end,
                length: w.length,
                same: c.window == current,
            });
            plan.order.push(Op::Ledger(plan.exact.len()));
            plan.exact.push(ExactOp {
                at: LedgerKey {
                    limit: c.limit,
                    key: c.key.clone(),
                    window: current,
                },
                cost: u64::from(c.cost.get()),
                want: if c.window == current { c.want } else { 0 },
                bounds: Bounds::new(
                    self.partition(c.limit, &c.key, current, w.limit),
                    self.config.threshold,
                    n,
                    carry,
                ),
                expire_at: expiry(current, w.length),
                exact_since: window_exact_since(rule.on_failure(), current, w.length, w.sliding),
            });
        }
        Ok(plan)
    }

    /// Takes back what `plan`'s ops consumed where their replies allowed: a request another
    /// of its limits denied consumes from none.
    async fn refund(&self, now: Nanos, plan: &Plan, exact: &[ExactReply], state: &[StateReply]) {
        let ledgers: Vec<Refund> = plan
            .exact
            .iter()
            .zip(exact)
            .filter(|(_, r)| r.allowed)
            .map(|(op, _)| Refund {
                at: op.at.clone(),
                cost: op.cost,
            })
            .collect();
        let states: Vec<StateRefund> = plan
            .state
            .iter()
            .zip(state)
            .filter_map(|(op, r)| op.refund(r))
            .collect();
        let (ledgers, states) = futures_util::future::join(
            async {
                if ledgers.is_empty() {
                    return Ok(());
                }
                self.store.refund(&ledgers).await
            },
            async {
                if states.is_empty() {
                    return Ok(());
                }
                self.store.refund_state(now, &states).await
            },
        )
        .await;
        // A failed refund leaves the request's other limits charged for a request that was
        // denied: a false denial later, never an overshoot.
        for e in [ledgers.err(), states.err()].into_iter().flatten() {
            self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "refund after a denied exact request failed");
        }
    }

    fn replayed(&self, edge: EdgeId, request_id: u64, now: Nanos) -> Option<AcquireReply> {
        let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        replies
            .by_request
            .get(&(edge, request_id))
            .filter(|(at, _)| now.saturating_sub(*at) < self.config.replay_window)
            .map(|(_, reply)| reply.clone())
    }

    fn remember(&self, edge: EdgeId, now: Nanos, reply: &AcquireReply) {
        let mut replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        // Forget old answers once per replay window, in one pass.
        if now.saturating_sub(replies.oldest) >= self.config.replay_window {
            let window = self.config.replay_window;
            replies
                .by_request
                .retain(|_, (at, _)| now.saturating_sub(*at) < window);
            replies.oldest = now;
        }
        replies
            .by_request
            .insert((edge, reply.request_id), (now, reply.clone()));
    }
}

impl Demand {
    /// Notes `used` units admitted and `denied` refused by a limiter whose state the store
    /// keeps (no ledger, so no per-key total or hot key: demand only).
    fn observe_state(&mut self, limit: LimitId, used: u64, denied: u64) {
        let limit = self.limits.entry(limit).or_default();
        limit.used = limit.used.saturating_add(used);
        limit.denied = limit.denied.saturating_add(denied);
    }

    /// Notes `T = total` for a ledger of a current window under partition `partition`, and
    /// `denied` units refused on it.
    fn observe(&mut self, at: &LedgerKey, total: u64, partition: u64, denied: u64) {
        let keys = self.seen.entry(at.limit).or_default();
        let seen = match keys.get_mut(at.key.as_str()) {
            Some(seen) => seen,
            None => keys.entry(at.key.clone()).or_insert((at.window, 0)),
        };
        if seen.0 != at.window {
            *seen = (at.window, 0);
        }
        let grown = total.saturating_sub(seen.1);
        seen.1 = seen.1.max(total);
        let limit = self.limits.entry(at.limit).or_default();
        limit.used = limit.used.saturating_add(grown);
        limit.denied = limit.denied.saturating_add(denied);
        let ppm = u128::from(total) * 1_000_000 / u128::from(partition.max(1));
        limit.utilisation_ppm = limit
            .utilisation_ppm
            .max(u32::try_from(ppm).unwrap_or(u32::MAX));
        // Near the partition (θ = 0.8 is the default; a key at 80 % is a candidate) or denied.
        if denied > 0 || total.saturating_mul(5) >= partition.saturating_mul(4) {
            let keys = self.hot.entry(at.limit).or_default();
            let hot = match keys.get_mut(at.key.as_str()) {
                Some(hot) => hot,
                None => keys.entry(at.key.clone()).or_insert(HotDemand {
                    limit: at.limit,
                    key: at.key.clone(),
                    window: at.window,
                    used: 0,
                    denied: 0,
                    partition,
                }),
            };
            if hot.window != at.window {
                hot.window = at.window;
                hot.denied = 0;
            }
            hot.used = total;
            hot.partition = partition;
            hot.denied = hot.denied.saturating_add(denied);
        }
    }
}

/// The clock a limit's partition schedule runs on, and how many of its ticks a cut takes to
/// clear. Window algorithms change share at window boundaries (a cut from the next window);
/// a sliding log too, but what it admitted under the old share stays in it for one more
/// window.
///
/// Buckets change share as a rate, on a millisecond tick: a cut at once, and another region's
/// raise one refill time (burst / rate: the same for every region's part) after it. A part's
/// state keeps its level as a fraction of its capacity, so a raise applied at once would fill
/// the raised region's bucket by what the cut one may just have spent: both together could
/// burst `C + Δ`. Waiting out a refill time, the rate the cut gave up over that time (`Δ`
/// tokens) pays for it, and every interval admits at most `C + r·t` across regions.
fn schedule_clock(limiter: &Limiter) -> (Nanos, u64) {
    const TICK: Nanos = Nanos(1_000_000);
    let refill = |time: Nanos| time.as_u64().div_ceil(TICK.as_u64());
    match limiter {
        Limiter::FixedWindow(_) | Limiter::SlidingWindow(_) => (limiter.window(), 0),
        Limiter::SlidingLog(l) => (l.window(), 1),
        Limiter::TokenBucket(g) => (TICK, refill(g.refill_time())),
        Limiter::LeakyBucket(b) => (TICK, refill(b.drain_time())),
    }
}

/// A ledger may be forgotten at the end of the window after its own: a sliding window reads
/// the previous window's usage until then.
fn expiry(window: u64, length: Nanos) -> Nanos {
    Nanos(window.saturating_add(2).saturating_mul(length.as_u64()))
}

/// The hot keys of current windows (at most a batch's worth), forgetting the ones whose
/// window has passed.
fn hot_keys(hot: &mut HashMap<(LimitId, String), u64>, rules: &RuleSet, now: Nanos) -> Vec<HotKey> {
    hot.retain(|(limit, _), window| {
        rules
            .limit(*limit)
            .and_then(|(_, l)| grant_window(l.limiter()))
            .is_some_and(|length| *window == now.as_u64() / length.as_u64())
    });
    hot.iter()
        .take(MAX_KEYS_PER_BATCH)
        .map(|((limit, key), window)| HotKey {
            limit: *limit,
            key: key.clone(),
            window: *window,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use shared::algorithm::{Gcra, SlidingLog};

    use super::*;

    #[test]
    fn only_a_bucket_that_is_empty_here_escalates_for_tokens() {
        let one = NonZeroU64::MIN;
        let ten = NonZeroU64::new(10).expect("not zero");
        let bucket =
            StateLimiter::TokenBucket(Gcra::new(one, Nanos(1_000_000), ten).expect("valid"));
        let log =
            StateLimiter::SlidingLog(SlidingLog::new(ten, Nanos(1_000_000_000)).expect("valid"));
        let op = |limiter| StateOp {
            at: StateKey {
                limit: LimitId(1),
                key: "k".into(),
            },
            limiter,
            cost: NonZeroU32::MIN,
            exact_since: None,
        };
        let reply = |verdict, unknown| StateReply {
            outcome: Outcome {
                verdict,
                limit: 10,
                remaining: 0,
                reset_at: Nanos(5),
                retry_after: Nanos(5),
            },
            receipt: 0,
            unknown,
        };
        assert!(refillable(&op(bucket), &reply(Verdict::Deny, false)));
        // The store could not decide: the breaker's answer for a closed rule in an outage.
        assert!(!refillable(&op(bucket), &reply(Verdict::Deny, true)));
        assert!(!refillable(
            &op(bucket),
            &reply(Verdict::InsufficientCapacity, false)
        ));
        assert!(!refillable(&op(log), &reply(Verdict::Deny, false)));
    }
}

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
//! The bounds of every ledger op come from the rules: `P` is the limit (this region's whole share
//! until the coordinator hands out partitions), θ from the configuration, `n` the edges
//! connected now.
//!
//! An [`Acquire`] may mix algorithms. Its window checks (fixed and sliding window) become
//! [`ExactOp`]s on ledgers, decided in the window that is current here; its token bucket,
//! leaky bucket and sliding log checks become [`StateOp`]s, each running the `shared`
//! algorithm on that key's state in the store (edges always send those keys down this path).
//! The two kinds go to the store at once; when any check of either kind denies, what the
//! others consumed is refunded, ledgers and limiter states alike, so a request consumes from
//! all of its limits or from none. A limiter whose span no store keeps exactly
//! ([`MAX_SPAN`](crate::store::MAX_SPAN)) is denied and counted in
//! [`RegionalStats::unsupported`].
//!
//! What the edge learns of a limiter's check (a [`CheckOutcome`], `granted` always 0: there
//! are no grants for these keys): `allowed`, where a leaky shaper's "go after X" counts as
//! allowed (its cost is in the bucket) but X is not on the wire, so the edge sends the request
//! on at once: through the regional a shaper admits exactly what a meter would, without the
//! spacing; `remaining`, the limiter's own; and `reset_at`, when allowed the time the limiter
//! is back to full capacity (bucket full or empty, the log's newest entry out of the window),
//! when denied the time the same cost fits again, until which the edge caches the denial. A
//! cost that can never fit (above the capacity) reopens at once: no wait helps it, and a
//! smaller one must not be refused meanwhile.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use shared::{
    Clock, LimitId, Nanos, RuleSet,
    algorithm::{Limiter, Outcome, Verdict},
    quota::{DEFAULT_THRESHOLD, EdgeId, Threshold, carry_weight_ppm},
    wire::{
        AckEntry, Acquire, AcquireReply, CheckOutcome, HotKey, MAX_KEYS_PER_BATCH, SyncAck,
        SyncBatch,
    },
};

use crate::store::{
    Bounds, ExactOp, ExactReply, LedgerKey, Refund, StateKey, StateLimiter, StateOp, StateRefund,
    StateReply, Store, StoreError, SyncOp,
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
}

impl Default for RegionalConfig {
    fn default() -> RegionalConfig {
        RegionalConfig {
            threshold: DEFAULT_THRESHOLD,
            hold: Nanos::from_millis(100),
            replay_window: Nanos::from_secs(10),
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
    /// Sync entries for an algorithm without ledgers (the edge sends those keys down the
    /// exact path), and checks on a limiter whose span is beyond
    /// [`MAX_SPAN`](crate::store::MAX_SPAN) (denied).
    pub unsupported: AtomicU64,
    /// Store calls that failed.
    pub store_errors: AtomicU64,
}

/// One region's decision-maker. Share it behind an `Arc`; every method takes `&self`.
pub struct Regional {
    config: RegionalConfig,
    rules: RwLock<Arc<RuleSet>>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock + Send + Sync>,
    edges: AtomicU32,
    replies: Mutex<Replies>,
    hot: Mutex<HashMap<(LimitId, String), u64>>,
    stats: RegionalStats,
}

#[derive(Default)]
struct Replies {
    by_request: HashMap<(EdgeId, u64), (Nanos, AcquireReply)>,
    oldest: Nanos,
}

/// An exact request's checks as store operations.
struct Plan {
    /// The window checks, on ledgers.
    exact: Vec<ExactOp>,
    /// Per ledger op: the end of the window it is decided in, and whether that is the window
    /// the edge named.
    windows: Vec<(Nanos, bool)>,
    /// The token bucket, leaky bucket and sliding log checks, on limiter states.
    state: Vec<StateOp>,
    /// Per check of the request, in order: the op that answers it.
    order: Vec<Op>,
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
        Regional {
            config,
            rules: RwLock::new(Arc::new(rules)),
            store,
            clock,
            edges: AtomicU32::new(0),
            replies: Mutex::new(Replies::default()),
            hot: Mutex::new(HashMap::new()),
            stats: RegionalStats::default(),
        }
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
        for e in batch.entries {
            let Some((_, limit)) = rules.limit(e.limit) else {
                self.stats.unknown_limit.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(w) = window_of(limit.limiter()) else {
                self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let current = now.as_u64() / w.length.as_u64();
            if e.window > current || e.window.saturating_add(1) < current {
                self.stats.skewed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let is_current = e.window == current;
            is_current_op.push(is_current);
            let carry = if w.sliding && is_current {
                carry_weight_ppm(w.length, Nanos(now.as_u64() % w.length.as_u64()))
            } else {
                0
            };
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
                bounds: Bounds::new(w.limit, self.config.threshold, n, carry),
                expire_at: expiry(e.window, w.length),
            });
        }
        let replies = self.store.sync(edge, now, &ops).await.inspect_err(|_| {
            self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        })?;
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .entries
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        let mut entries = Vec::with_capacity(ops.len());
        let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
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
        Ok(SyncAck { entries, hot_keys })
    }

    /// Decides `edge`'s exact request: every check's cost is consumed, or none.
    pub async fn acquire(
        &self,
        edge: EdgeId,
        request: &Acquire,
    ) -> Result<AcquireReply, StoreError> {
        let now = self.clock.now();
        if let Some(reply) = self.replayed(edge, request.request_id, now) {
            self.stats.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(reply);
        }
        let plan = match self.plan(request, now) {
            Ok(plan) => plan,
            Err(denied) => return Ok(denied),
        };
        let (exact, state) = self.decide(edge, now, &plan).await?;
        let allowed =
            exact.iter().all(|r| r.allowed) && state.iter().all(|r| r.outcome.is_allowed());
        if !allowed {
            self.refund(now, &plan, &exact, &state).await;
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.exact.fetch_add(1, Ordering::Relaxed);
        let outcomes = plan
            .order
            .iter()
            .map(|&op| match op {
                Op::Ledger(i) => self.ledger_outcome(&exact[i], plan.windows[i], now),
                Op::State(i) => state_outcome(&state[i].outcome, now),
            })
            .collect();
        let reply = AcquireReply::from_checks(request.request_id, now, outcomes);
        self.remember(edge, now, &reply);
        Ok(reply)
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

    /// A ledger's answer as the edge reads it: a denial that only grants held elsewhere caused
    /// reopens after [`RegionalConfig::hold`], any other at the window's end.
    fn ledger_outcome(
        &self,
        r: &ExactReply,
        (end, same): (Nanos, bool),
        now: Nanos,
    ) -> CheckOutcome {
        CheckOutcome {
            allowed: r.allowed,
            remaining: r.remaining,
            reset_at: if r.allowed || !r.held {
                end
            } else {
                (now + self.config.hold).min(end)
            },
            // 0 never lowers the edge's ceiling (it keeps the larger).
            granted: if same { r.granted } else { 0 },
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
            let Some((_, limit)) = rules.limit(c.limit) else {
                self.stats.unknown_limit.fetch_add(1, Ordering::Relaxed);
                return Err(AcquireReply::deny_all(request.request_id, now));
            };
            if let Some(state) = StateLimiter::new(limit.limiter()) {
                plan.order.push(Op::State(plan.state.len()));
                plan.state.push(StateOp {
                    at: StateKey {
                        limit: c.limit,
                        key: c.key.clone(),
                    },
                    limiter: state,
                    cost: c.cost,
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
            plan.windows.push((end, c.window == current));
            plan.order.push(Op::Ledger(plan.exact.len()));
            plan.exact.push(ExactOp {
                at: LedgerKey {
                    limit: c.limit,
                    key: c.key.clone(),
                    window: current,
                },
                cost: u64::from(c.cost.get()),
                want: if c.window == current { c.want } else { 0 },
                bounds: Bounds::new(w.limit, self.config.threshold, n, carry),
                expire_at: expiry(current, w.length),
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
            .and_then(|(_, l)| window_of(l.limiter()))
            .is_some_and(|w| *window == now.as_u64() / w.length.as_u64())
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

//! Where a region's authoritative state lives: the [`Store`] trait and its two homes.
//!
//! A store keeps two kinds of state, each changed only by atomic per-key operations.
//!
//! **Ledgers**, for the window algorithms (fixed and sliding window): one per (limit, key,
//! window), holding the exact-path count and each edge's three monotone counters (DESIGN §4).
//! Three operations, each atomic on its ledger:
//!
//! - [`SyncOp`]: merge an edge's cumulative `used` and `released` by `max`, then mint what the
//!   edge wants under `T + G ≤ θ·P` ([`shared::quota::KeyLedger::grant`]). Idempotent: a
//!   batch applied twice, late, or by another replica changes nothing the second time.
//! - [`ExactOp`]: the exact path, consume `cost` iff `T + G + cost ≤ P`, a grant riding along.
//! - [`Refund`]: give back what an exact op consumed for a request another of its limits
//!   denied.
//!
//! **Limiter states**, for the algorithms whose state is not a count per window: token bucket
//! (GCRA's TAT), leaky bucket (level and last leak) and sliding log (the admitted entries). One
//! per (limit, key), a [`StateKey`]. Edges send a log's and a leaky bucket's keys down the
//! exact path every time (the log is exact only at one authority, DESIGN §3); a token bucket's
//! keys they also decide under grants, kept in *lease ledgers* (below). The operations:
//!
//! - [`StateOp`]: `shared::algorithm`'s `acquire` (check, then consume when allowed), answered
//!   with its [`Outcome`] in a [`StateReply`].
//! - [`StateRefund`]: take back an allowed [`StateOp`] for a request another of its limits
//!   denied, as `shared`'s `refund` of each algorithm defines it: exact for the log (that
//!   request's entry goes), and for the buckets the level moves back by `cost·T`, never below
//!   where that acquire started, so that with nothing in between it is as if the request had
//!   never come (the module docs of `shared`'s `gcra.rs` and `leaky_bucket.rs` bound what it is
//!   off by otherwise).
//! - [`LeaseOp`]: an edge's sync of a token-bucket key, `shared::quota::lease`: its counters
//!   live in a ledger per lease window ([`LedgerKey::lease`]) and its grants are tokens taken
//!   from the bucket, which a [`StateOp`] on the same key sees as parked (its
//!   [`leases`](StateOp::leases)), so the exact path and the grants share one bucket.
//! - [`StateAbsorb`]: write a state decided elsewhere (in memory, while Redis was away) into
//!   the store, merged so that whatever either side admitted still counts: a token bucket's
//!   TAT by `max`, a leaky bucket's later emptying time, the union of two logs. Idempotent.
//!
//! The math is `shared`'s and nothing else: [`MemoryStore`] runs `KeyLedger` and the
//! algorithms themselves, and [`RedisStore`]'s Lua scripts are tested against `MemoryStore` and
//! `shared` op for op (same inputs, same answers). A regional builds the ops from a batch (its
//! rules give `P`, θ, `n`, the sliding window's carry weight, or the limiter) and hands the
//! whole batch to the store at once, so Redis sees one pipeline per batch (per slot on a
//! cluster).
//!
//! Everything carries an expiry, so memory is bounded by the keys in use: a ledger lives until
//! the end of the window after its own (a sliding window reads the previous window's usage),
//! a limiter state until [`STATE_GRACE`] after the time it is back to a fresh state's
//! equivalent (bucket full or empty, the log's newest entry out of the window).
//!
//! # Numbers
//!
//! Counters are exact integers up to [`MAX_COUNT`] (2^40, about 10^12 per window): Lua
//! computes in doubles, exact below 2^53, and the scripts' products of a count and a weight in
//! parts per million must stay below that. The regional clamps partitions to it.
//!
//! Limiter states hold nanosecond times. A store accepts a limiter whose span (a bucket's
//! `B·T` or `C·T`, a log's window) is at most [`MAX_SPAN`], 2^52 ns (52 days), so that every
//! value the scripts compute from times stays an exact double; see the Redis store's module
//! doc for how times cross into Lua. [`StateLimiter::new`] refuses the rest, and the regional
//! denies checks on such a limiter and counts them.

use std::{
    future::Future,
    num::{NonZeroU32, NonZeroU64},
    pin::Pin,
};

use shared::{
    FailureMode, LimitId, Nanos,
    algorithm::{Gcra, LeakyBucket, Limiter, LimiterState, Outcome, SlidingLog},
    quota::{Budget, EdgeCounters, EdgeId, Threshold, lease::LEASE_WINDOW, share_of},
};

pub use shared::quota::lease::LeaseReply;
use thiserror::Error;

mod memory;
mod redis;

pub use self::{
    memory::MemoryStore,
    redis::{RedisStore, RedisTopology},
};

/// The largest count a store keeps exactly, and so the largest partition a regional uses.
pub const MAX_COUNT: u64 = 1 << 40;

/// The longest span of a limiter whose state a store keeps: 2^52 ns, about 52 days.
///
/// Redis computes in doubles, exact for integers up to 2^53. The scripts work with times
/// relative to `now`, and every value they form (a relative time, plus at most one span) stays
/// within 2^53 when spans are at most 2^52.
pub const MAX_SPAN: Nanos = Nanos(1 << 52);

/// `exact_since` for an op of a rule failing `mode` that decides in `window` of `length`:
/// for `closed`, the window's start, or a sliding window's previous window's start (its
/// estimate weighs that window in); `None` otherwise.
pub fn window_exact_since(
    mode: FailureMode,
    window: u64,
    length: Nanos,
    sliding: bool,
) -> Option<Nanos> {
    let first = if sliding {
        window.saturating_sub(1)
    } else {
        window
    };
    (mode == FailureMode::Closed).then(|| Nanos(first.saturating_mul(length.as_u64())))
}

/// `exact_since` for a limiter state of a rule failing `mode`, decided at `now`: for
/// `closed`, one span back ([`StateLimiter::span`]): whatever was admitted before that has
/// drained away or aged out; `None` otherwise.
pub fn state_exact_since(mode: FailureMode, limiter: &StateLimiter, now: Nanos) -> Option<Nanos> {
    (mode == FailureMode::Closed)
        .then(|| Nanos(now.as_u64().saturating_sub(limiter.span().as_u64())))
}

/// How long a limiter state is kept after the time it is back to a fresh state's equivalent.
///
/// Deleting it exactly then would be enough for one clock. But the regional replicas that
/// share a Redis each bring their own clock, and a Redis TTL runs on Redis's: a replica whose
/// clock is behind must still find the state another one wrote. Ten seconds covers any
/// reasonable skew, for the memory of ten seconds of idle keys.
pub const STATE_GRACE: Nanos = Nanos::from_secs(10);

/// A store call in flight. Boxed so `Arc<dyn Store>` works: one virtual call per batch.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The authoritative per-region ledgers.
pub trait Store: Send + Sync + 'static {
    /// Applies one edge's sync batch, an answer per op in order. `now` is the regional's clock,
    /// for stores that expire entries themselves.
    fn sync<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [SyncOp],
    ) -> StoreFuture<'a, Vec<SyncReply>>;

    /// Runs exact check-and-consumes for `edge`, each on its own ledger, an answer per op.
    /// Each op decides alone; all-or-nothing across a request's limits is the caller's, by
    /// [`refund`](Store::refund)ing what passed when one did not.
    fn exact<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [ExactOp],
    ) -> StoreFuture<'a, Vec<ExactReply>>;

    /// Gives back exact-path consumption.
    fn refund<'a>(&'a self, refunds: &'a [Refund]) -> StoreFuture<'a, ()>;

    /// Writes ledgers decided elsewhere into this store, idempotently: each edge's counters
    /// by `max`, the exact count under `tag` by `max` (so writing the same ledgers twice,
    /// or a second time with more in them, counts each admission once). The circuit breaker
    /// writes what it counted in memory while Redis was away this way.
    fn absorb<'a>(&'a self, tag: &'a str, now: Nanos, ledgers: &'a [Absorb])
    -> StoreFuture<'a, ()>;

    /// Reads one ledger as it is now (debugging, tests, recovery); `None` when it does not
    /// exist or has expired.
    fn ledger<'a>(&'a self, at: &'a LedgerKey) -> StoreFuture<'a, Option<LedgerView>>;

    /// Runs each op's limiter on its state (check, then consume when allowed), an answer per
    /// op in order. Each op decides alone; all-or-nothing across a request's limits is the
    /// caller's, by [`refund_state`](Store::refund_state)ing what passed when one did not.
    fn acquire_state<'a>(
        &'a self,
        now: Nanos,
        ops: &'a [StateOp],
    ) -> StoreFuture<'a, Vec<StateReply>>;

    /// Takes back allowed [`StateOp`]s, at `now` (the leaky bucket leaks up to it first). Each
    /// refund is applied once; a state that has expired meanwhile is left alone.
    fn refund_state<'a>(&'a self, now: Nanos, refunds: &'a [StateRefund]) -> StoreFuture<'a, ()>;

    /// Applies one edge's syncs of token-bucket keys, an answer per op in order (see
    /// [`LeaseOp`]).
    fn lease<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [LeaseOp],
    ) -> StoreFuture<'a, Vec<LeaseReply>>;

    /// Merges limiter states decided elsewhere into this store, idempotently (see the module
    /// doc); `tag` names where they were decided, so a log's entries are added once however
    /// often the same states are written. The circuit breaker writes back this way.
    fn absorb_state<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        states: &'a [StateAbsorb],
    ) -> StoreFuture<'a, ()>;

    /// Replaces what this region holds of every limit, as the coordinator last pushed it
    /// (DESIGN §4 across regions): a restarted regional takes it back with
    /// [`partitions`](Store::partitions) and carries on where the old run stopped, so
    /// neither the coordinator nor the other regions can take the restart for a region
    /// holding nothing while what it admitted under its shares still counts.
    fn save_partitions<'a>(&'a self, held: &'a [HeldShares]) -> StoreFuture<'a, ()>;

    /// What [`save_partitions`](Store::save_partitions) recorded last.
    fn partitions(&self) -> StoreFuture<'_, Vec<HeldShares>>;
}

/// One limit as a region holds it: its share from each window on (ascending by window) and
/// the index from which every cut it made has cleared, on the limit's schedule clock
/// ([`PartitionTable`](crate::partition::PartitionTable)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldShares {
    /// The limit.
    pub limit: LimitId,
    /// `(from, ppm)`, ascending by `from`.
    pub schedule: Vec<(u64, u32)>,
    /// Other regions' raises wait until this index.
    pub cleared: u64,
}

/// Which ledger: one limit, one key, one window.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LedgerKey {
    /// The limit.
    pub limit: LimitId,
    /// The key the limit counts (as the edge put it on the wire).
    pub key: String,
    /// The window index (`now / window`, DESIGN §9).
    pub window: u64,
}

/// Set in [`LedgerKey::window`] for a token bucket's lease ledger. A real window index is the
/// time over a window of at least a millisecond, below 2^44 for the next 500 years, so no
/// window ledger of the same limit and key (a rule that changed algorithm) is ever read as a
/// lease ledger, or the other way round.
pub const LEASE_LEDGER: u64 = 1 << 63;

impl LedgerKey {
    /// The lease ledger of a token-bucket key in lease window `window`
    /// ([`shared::quota::lease::LEASE_WINDOW`]).
    pub fn lease(limit: LimitId, key: String, window: u64) -> LedgerKey {
        LedgerKey {
            limit,
            key,
            window: LEASE_LEDGER | window,
        }
    }

    /// Whether this is a lease ledger ([`LedgerKey::lease`]).
    pub fn is_lease(&self) -> bool {
        self.window & LEASE_LEDGER != 0
    }

    /// The same limit and key one window earlier, where a sliding window's carry comes from.
    pub fn previous(&self) -> Option<LedgerKey> {
        if self.window == LEASE_LEDGER {
            return None;
        }
        Some(LedgerKey {
            limit: self.limit,
            key: self.key.clone(),
            window: self.window.checked_sub(1)?,
        })
    }
}

/// What bounds a ledger's grants and exact path, as the regional decides it for this window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// `P`: the region's partition of the limit (at most [`MAX_COUNT`]).
    pub partition: u64,
    /// θ: grants stop at `⌊θ·P⌋`.
    pub threshold: Threshold,
    /// `n`: edges active in the region; at least 1.
    pub edges: u32,
    /// The previous window's weight for a sliding window, in parts per million
    /// ([`shared::quota::carry_weight_ppm`]); 0 for a fixed window.
    pub carry_ppm: u32,
}

impl Bounds {
    /// The bounds for partition `partition` under threshold `threshold` with `edges` edges,
    /// clamping the partition to [`MAX_COUNT`].
    pub fn new(partition: u64, threshold: Threshold, edges: u32, carry_ppm: u32) -> Bounds {
        Bounds {
            partition: partition.min(MAX_COUNT),
            threshold,
            edges: edges.max(1),
            carry_ppm: carry_ppm.min(1_000_000),
        }
    }

    /// `⌊θ·P⌋`: the grant pool's ceiling.
    pub fn ceiling(&self) -> u64 {
        self.threshold.of(self.partition)
    }

    /// The budget `shared::quota` decides under, given what the previous window carries.
    pub fn budget(&self, carried: u64) -> Budget {
        Budget {
            partition: self.partition,
            carried,
            threshold: self.threshold,
            edges: self.edges,
        }
    }
}

/// Merge an edge's counters and mint what it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOp {
    /// The ledger.
    pub at: LedgerKey,
    /// The edge's cumulative `used`.
    pub used: u64,
    /// The edge's cumulative `released`.
    pub released: u64,
    /// What the edge asks to hold unused; 0 mints nothing (a past window).
    pub want: u64,
    /// `P`, θ·P, `n`, carry.
    pub bounds: Bounds,
    /// When the ledger may be forgotten: the end of the next window.
    pub expire_at: Nanos,
    /// For a rule whose failure mode is `closed` (DESIGN §7: denied rather than guessed):
    /// the decision depends on every admission since this instant ([`window_exact_since`],
    /// [`state_exact_since`]). A store
    /// that has not seen them all (memory, during an outage of the primary that began later)
    /// denies the op instead of deciding on a partial count. `None`: decide on what is known.
    pub exact_since: Option<Nanos>,
}

/// The answer to a [`SyncOp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncReply {
    /// The edge's `granted` ceiling afterwards.
    pub granted: u64,
    /// The edge's merged `used`.
    pub used: u64,
    /// The edge's merged `released`.
    pub released: u64,
    /// `T`: everything admitted in the window, without what is carried.
    pub total: u64,
    /// `T + G` plus what is carried.
    pub reserved: u64,
    /// Grants have stopped for the rest of the window.
    pub near_limit: bool,
    /// The pool is spent and this edge holds more than it wants: it should hand quota back.
    pub recall: bool,
}

/// An exact check-and-consume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExactOp {
    /// The ledger.
    pub at: LedgerKey,
    /// What the request costs here.
    pub cost: u64,
    /// What the edge asks to hold unused afterwards (a grant rides along when allowed).
    pub want: u64,
    /// `P`, θ·P, `n`, carry.
    pub bounds: Bounds,
    /// When the ledger may be forgotten.
    pub expire_at: Nanos,
    /// For a rule whose failure mode is `closed` (DESIGN §7: denied rather than guessed):
    /// the decision depends on every admission since this instant ([`window_exact_since`],
    /// [`state_exact_since`]). A store
    /// that has not seen them all (memory, during an outage of the primary that began later)
    /// denies the op instead of deciding on a partial count. `None`: decide on what is known.
    pub exact_since: Option<Nanos>,
}

/// The answer to an [`ExactOp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactReply {
    /// Whether `cost` was consumed.
    pub allowed: bool,
    /// The edge's `granted` ceiling afterwards.
    pub granted: u64,
    /// `P − (T + G + carried)` afterwards: exactly what is left for anyone.
    pub remaining: u64,
    /// Grants have stopped for the rest of the window.
    pub near_limit: bool,
    /// Denied only because edges hold unused grants, which come back within a flush
    /// interval: the edge should not cache this denial until the window ends.
    pub held: bool,
    /// `T` afterwards.
    pub total: u64,
    /// `T` of the previous window, which a sliding window carries (0 for a fixed window):
    /// with it the regional tells a denied edge when the carry will have fallen enough.
    pub previous: u64,
}

/// Exact-path consumption to give back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    /// The ledger.
    pub at: LedgerKey,
    /// What to give back.
    pub cost: u64,
}

/// A ledger decided elsewhere, for [`Store::absorb`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Absorb {
    /// Which ledger.
    pub at: LedgerKey,
    /// What was decided: its exact count and each edge's counters.
    pub view: LedgerView,
    /// When the ledger may be forgotten.
    pub expire_at: Nanos,
}

/// One ledger as a store holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerView {
    /// What the regional admitted on the exact path.
    pub exact: u64,
    /// Each edge's counters, in id order.
    pub edges: Vec<(EdgeId, EdgeCounters)>,
    /// Grants have stopped for the rest of the window.
    pub near_limit: bool,
}

impl LedgerView {
    /// `T`: the exact path plus every edge's `used`.
    pub fn total(&self) -> u64 {
        self.edges
            .iter()
            .fold(self.exact, |t, (_, c)| t.saturating_add(c.used))
    }
}

/// Which limiter state: one limit, one key (no window: the state spans them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    /// The limit.
    pub limit: LimitId,
    /// The key the limit counts (as the edge put it on the wire).
    pub key: String,
}

/// A limiter whose whole state a store keeps (the algorithms that are not window ledgers),
/// with a span a store can keep exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateLimiter {
    /// Token bucket as GCRA.
    TokenBucket(Gcra),
    /// Leaky bucket, meter or shaper.
    LeakyBucket(LeakyBucket),
    /// Sliding window log.
    SlidingLog(SlidingLog),
}

impl StateLimiter {
    /// `limiter` as a store keeps it; `None` for a window algorithm (kept in ledgers) and for a
    /// limiter whose span is beyond [`MAX_SPAN`] (or a log whose limit is beyond
    /// [`MAX_COUNT`]), which no store can keep exactly.
    pub fn new(limiter: &Limiter) -> Option<StateLimiter> {
        let kept = match *limiter {
            Limiter::TokenBucket(g) => StateLimiter::TokenBucket(g),
            Limiter::LeakyBucket(b) => StateLimiter::LeakyBucket(b),
            Limiter::SlidingLog(l) if l.limit().get() <= MAX_COUNT => StateLimiter::SlidingLog(l),
            Limiter::SlidingLog(_) | Limiter::FixedWindow(_) | Limiter::SlidingWindow(_) => {
                return None;
            }
        };
        (kept.span() <= MAX_SPAN).then_some(kept)
    }

    /// This limiter cut to a region's share of `ppm` millionths (DESIGN §4 across regions):
    /// the capacity (a bucket's burst, a log's limit) becomes the region's whole units of it,
    /// `⌊C · ppm / 10⁶⌋`, and a bucket's rate shrinks by the same ratio (its interval grows,
    /// rounded up), so the regions' capacities add up to at most `C` and their rates to at
    /// most the rule's. `None` when the share leaves no capacity: the region admits nothing of
    /// it. A change applies at once, as a rate; a token bucket whose capacity grew starts
    /// from the state the store holds (see the partition schedule for when a raise may come).
    pub fn partitioned(self, ppm: u32) -> Option<StateLimiter> {
        let whole = self.limiter().limit();
        let units = share_of(whole, ppm);
        if units >= whole {
            return Some(self);
        }
        let capacity = NonZeroU64::new(units)?;
        // The interval of one unit, times whole / units: the rate times units / whole.
        let stretched = |interval: Nanos| {
            let t = (u128::from(interval.as_u64()) * u128::from(whole)).div_ceil(u128::from(units));
            Nanos(u64::try_from(t).unwrap_or(u64::MAX))
        };
        let one = NonZeroU64::MIN;
        let cut = match self {
            StateLimiter::TokenBucket(g) => StateLimiter::TokenBucket(Gcra::new(
                one,
                stretched(g.emission_interval()),
                capacity,
            )?),
            StateLimiter::LeakyBucket(b) => StateLimiter::LeakyBucket(LeakyBucket::new(
                one,
                stretched(b.drain_interval()),
                capacity,
                b.mode(),
            )?),
            StateLimiter::SlidingLog(l) => {
                StateLimiter::SlidingLog(SlidingLog::new(capacity, l.window())?)
            }
        };
        Some(cut)
    }

    /// How far back its state remembers: a bucket's time to refill (or drain) from empty
    /// (full), a log's window. A state untouched for this long is as good as new.
    pub fn span(&self) -> Nanos {
        match *self {
            StateLimiter::TokenBucket(g) => g.refill_time(),
            StateLimiter::LeakyBucket(b) => b.drain_time(),
            StateLimiter::SlidingLog(l) => l.window(),
        }
    }

    /// The same limiter as `shared` names it.
    pub fn limiter(&self) -> Limiter {
        match *self {
            StateLimiter::TokenBucket(g) => Limiter::TokenBucket(g),
            StateLimiter::LeakyBucket(b) => Limiter::LeakyBucket(b),
            StateLimiter::SlidingLog(l) => Limiter::SlidingLog(l),
        }
    }

    /// Takes back what an allowed acquire of `cost`, answered `admitted`, consumed from
    /// `state`, at `now`: `shared`'s refund of this algorithm. A state of another kind (the
    /// rule changed algorithm since) holds nothing of that acquire and is left alone.
    pub fn refund(
        &self,
        state: &mut LimiterState,
        now: Nanos,
        admitted: &Outcome,
        cost: NonZeroU32,
    ) {
        match (self, state) {
            (StateLimiter::TokenBucket(g), LimiterState::TokenBucket(s)) => {
                g.refund(s, admitted, cost);
            }
            (StateLimiter::LeakyBucket(b), LimiterState::LeakyBucket(s)) => {
                b.refund(s, now, admitted, cost);
            }
            (StateLimiter::SlidingLog(l), LimiterState::SlidingLog(s)) => {
                l.refund(s, admitted, cost);
            }
            _ => {}
        }
    }
}

/// Run a limiter on one key's state: check `cost` at the call's `now`, consume it if allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateOp {
    /// The state.
    pub at: StateKey,
    /// The limiter, as the rules say now.
    pub limiter: StateLimiter,
    /// What the request costs here.
    pub cost: NonZeroU32,
    /// For a rule whose failure mode is `closed` (DESIGN §7: denied rather than guessed):
    /// the decision depends on every admission since this instant ([`window_exact_since`],
    /// [`state_exact_since`]). A store
    /// that has not seen them all (memory, during an outage of the primary that began later)
    /// denies the op instead of deciding on a partial count. `None`: decide on what is known.
    pub exact_since: Option<Nanos>,
}

impl StateOp {
    /// A token bucket's lease ledgers still counted at `now` (the current lease window's and
    /// the previous one's): the tokens edges hold unused in them are parked
    /// ([`shared::quota::lease::park`]) before the acquire. `None` for the other limiters,
    /// which edges hold no grants of.
    pub fn leases(&self, now: Nanos) -> Option<[LedgerKey; 2]> {
        if !matches!(self.limiter, StateLimiter::TokenBucket(_)) {
            return None;
        }
        let current = now.as_u64() / LEASE_WINDOW.as_u64();
        let (limit, key) = (self.at.limit, &self.at.key);
        Some([
            LedgerKey::lease(limit, key.clone(), current),
            LedgerKey::lease(limit, key.clone(), current.saturating_sub(1)),
        ])
    }

    /// What takes this op back, given its reply; `None` when the reply did not admit (nothing
    /// was consumed).
    pub fn refund(&self, reply: &StateReply) -> Option<StateRefund> {
        reply.outcome.is_allowed().then(|| StateRefund {
            at: self.at.clone(),
            limiter: self.limiter,
            cost: self.cost,
            admitted: reply.outcome,
            receipt: reply.receipt,
        })
    }
}

/// The answer to a [`StateOp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateReply {
    /// The limiter's answer, exactly as `shared::algorithm` gives it. A shaper's
    /// [`Verdict::Delay`](shared::algorithm::Verdict::Delay) is allowed: its cost is consumed.
    pub outcome: Outcome,
    /// What names the consumption for a refund beyond the outcome: on Redis, the id of the
    /// entry a sliding log added (a log's entries are a sorted set, and the id makes each
    /// member unique). Zero otherwise; never compare it across stores.
    pub receipt: u64,
    /// The store could not decide (a `closed` rule while the primary is out, the breaker's
    /// memory not having seen every admission the op depends on): denied, and not to be
    /// escalated, since another region's tokens would not make the count known.
    pub unknown: bool,
}

/// An edge's sync of one token-bucket key for one lease window (`shared::quota::lease`):
/// park what the edges hold unused, merge the edge's counters, charge the bucket for the
/// change of its holding, mint up to `want` under θ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseOp {
    /// The lease ledger ([`LedgerKey::lease`]); the bucket is the same limit and key's state.
    pub at: LedgerKey,
    /// The other lease ledger still counted: the previous lease window's when `at` is the
    /// current one, the current one's when `at` is the previous.
    pub other: LedgerKey,
    /// The region's part of the bucket.
    pub limiter: Gcra,
    /// The edge's cumulative `used`.
    pub used: u64,
    /// The edge's cumulative `released`.
    pub released: u64,
    /// What the edge asks to hold unused; 0 mints nothing (a past lease window).
    pub want: u64,
    /// θ: the last `⌊(1 − θ)·B⌋`-odd tokens go through the exact path.
    pub threshold: Threshold,
    /// `n`: edges active in the region; at least 1.
    pub edges: u32,
    /// When the lease ledger may be forgotten: the end of the next lease window.
    pub expire_at: Nanos,
    /// As [`StateOp::exact_since`]: a store that has not seen every admission since then
    /// merges the counts but mints nothing.
    pub exact_since: Option<Nanos>,
}

impl LeaseOp {
    /// The bucket's state key.
    pub fn state(&self) -> StateKey {
        StateKey {
            limit: self.at.limit,
            key: self.at.key.clone(),
        }
    }
}

/// Takes back an allowed [`StateOp`]; build it with [`StateOp::refund`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRefund {
    /// The state.
    pub at: StateKey,
    /// The limiter the op ran.
    pub limiter: StateLimiter,
    /// The op's cost.
    pub cost: NonZeroU32,
    /// The outcome the op answered: where a bucket's consume started (`reset_at − cost·T`),
    /// when a log's entry was stamped (`reset_at − W`).
    pub admitted: Outcome,
    /// The reply's [`StateReply::receipt`].
    pub receipt: u64,
}

/// A limiter state decided elsewhere, for [`Store::absorb_state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateAbsorb {
    /// Which state.
    pub at: StateKey,
    /// Its limiter.
    pub limiter: StateLimiter,
    /// What was decided. A state of another kind than `limiter` is skipped.
    pub state: LimiterState,
}

/// Why a store call failed, classified once, here at the boundary: the caller only asks
/// whether trying again may help.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store is unreachable, slow, busy or failing over: retry, and count it towards the
    /// circuit breaker.
    #[error("store unavailable: {0}")]
    Transient(String),
    /// The store refused the operation itself (a script error, a value of the wrong type):
    /// retrying the same thing fails the same way.
    #[error("store refused the operation: {0}")]
    Permanent(String),
}

impl StoreError {
    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

#[cfg(test)]
mod tests {
    use shared::algorithm::LeakyMode;

    use super::*;

    /// How many unit acquires `limiter` admits from a fresh state at 0 s, then at 1 s.
    fn admitted(limiter: StateLimiter) -> (u32, u32) {
        let limiter = limiter.limiter();
        let mut state = limiter.new_state();
        let mut at = |now: Nanos| {
            let mut n = 0;
            while limiter.check(&state, now, NonZeroU32::MIN).is_allowed() && n < 1000 {
                limiter.consume(&mut state, now, NonZeroU32::MIN);
                n += 1;
            }
            n
        };
        (at(Nanos(0)), at(Nanos(1_000_000_000)))
    }

    #[test]
    fn a_regions_part_of_a_bucket_or_log_is_its_share_of_capacity_and_rate() {
        let second = Nanos(1_000_000_000);
        let n = |v: u64| NonZeroU64::new(v).expect("positive");
        let bucket = StateLimiter::TokenBucket(Gcra::new(n(20), second, n(40)).expect("valid"));
        let meter = StateLimiter::LeakyBucket(
            LeakyBucket::new(n(20), second, n(40), LeakyMode::Meter).expect("valid"),
        );
        let log = StateLimiter::SlidingLog(SlidingLog::new(n(40), second).expect("valid"));
        // The whole: a burst of 40, then 20 a second (a log: 40 again a window later).
        assert_eq!(admitted(bucket), (40, 20));
        assert_eq!(admitted(meter), (40, 20));
        assert_eq!(admitted(log), (40, 40));
        // A quarter: 10 at once, 5 a second; the other three quarters: 30, 15.
        for (limiter, quarter, rest) in [
            (bucket, (10, 5), (30, 15)),
            (meter, (10, 5), (30, 15)),
            (log, (10, 10), (30, 30)),
        ] {
            let part = |ppm| admitted(limiter.partitioned(ppm).expect("some capacity"));
            // A rate that is not a whole number of nanoseconds per unit is rounded to the
            // slower: 15 a second is one per 66,666,667 ns, 14 in the first second.
            let close = |got: (u32, u32), want: (u32, u32)| {
                got.0 == want.0 && (want.1 - 1..=want.1).contains(&got.1)
            };
            assert!(
                close(part(250_000), quarter),
                "{limiter:?}: {:?}",
                part(250_000)
            );
            assert!(
                close(part(750_000), rest),
                "{limiter:?}: {:?}",
                part(750_000)
            );
            assert_eq!(limiter.partitioned(1_000_000), Some(limiter));
            assert_eq!(limiter.partitioned(20_000), None, "under one unit: nothing");
        }
        // Uneven: a third of 40 is 13 units and a third of the rate, rounded to the slower.
        let third = bucket.partitioned(333_334).expect("some capacity");
        assert_eq!(admitted(third).0, 13);
        let StateLimiter::TokenBucket(g) = third else {
            panic!("still a token bucket")
        };
        assert!(
            g.emission_interval().as_u64() * 13 >= 50_000_000 * 40,
            "never faster than 13/40 of the rate"
        );
    }
}

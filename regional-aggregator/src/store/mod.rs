//! Where a region's authoritative counts live: the [`Store`] trait and its two homes.
//!
//! A store holds one ledger per (limit, key, window): the exact-path count and each edge's
//! three monotone counters (DESIGN §4). It answers three key operations, each atomic on its
//! ledger:
//!
//! - [`SyncOp`]: merge an edge's cumulative `used` and `released` by `max`, then mint what the
//!   edge wants under `T + G ≤ θ·P` ([`shared::quota::KeyLedger::grant`]). Idempotent: a
//!   batch applied twice, late, or by another replica changes nothing the second time.
//! - [`ExactOp`]: the exact path, consume `cost` iff `T + G + cost ≤ P`, a grant riding along.
//! - [`Refund`]: give back what an exact op consumed for a request another of its limits
//!   denied.
//!
//! The math is `shared::quota`'s and nothing else: [`MemoryStore`] runs `KeyLedger` itself,
//! and [`RedisStore`]'s Lua scripts are tested against `MemoryStore` op for op (same inputs,
//! same answers). A regional builds the ops from a batch (its rules give `P`, θ, `n` and the
//! sliding window's carry weight) and hands the whole batch to the store at once, so Redis
//! sees one pipeline per batch (per slot on a cluster).
//!
//! Every ledger carries an expiry, the end of the window after its own (a sliding window
//! reads the previous window's usage), so memory is bounded by the keys in use.
//!
//! # Numbers
//!
//! Counters are exact integers up to [`MAX_COUNT`] (2^40, about 10^12 per window): Lua
//! computes in doubles, exact below 2^53, and the scripts' products of a count and a weight in
//! parts per million must stay below that. The regional clamps partitions to it.

use std::{future::Future, pin::Pin};

use shared::{
    LimitId, Nanos,
    quota::{Budget, EdgeCounters, EdgeId, Threshold},
};
use thiserror::Error;

mod memory;
mod redis;

pub use self::{
    memory::MemoryStore,
    redis::{RedisStore, RedisTopology},
};

/// The largest count a store keeps exactly, and so the largest partition a regional uses.
pub const MAX_COUNT: u64 = 1 << 40;

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

impl LedgerKey {
    /// The same limit and key one window earlier, where a sliding window's carry comes from.
    pub fn previous(&self) -> Option<LedgerKey> {
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

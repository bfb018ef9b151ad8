//! The in-memory store: `shared::quota::KeyLedger` and the `shared::algorithm` limiters in
//! concurrent maps.
//!
//! The regional's default when no Redis URL is given (demos, single-node use), the store the
//! circuit breaker counts in while Redis is away, and the specification the Redis scripts are
//! tested against: every operation here is the `shared` ledger's or algorithm's own method,
//! nothing more. Each key's operation runs under its map entry's lock, so it is atomic.
//!
//! Ledgers are dropped once their window has passed; limiter states once they are back to a
//! fresh state's equivalent plus [`STATE_GRACE`]. The sweep, every [`SWEEP_EVERY`] operations,
//! only bounds memory: an expired ledger found before it starts over (as Redis would have
//! deleted it), and a fresh-equivalent limiter state answers as a fresh one would.

use std::{
    num::NonZeroU32,
    sync::atomic::{AtomicU64, Ordering},
};

use dashmap::{DashMap, mapref::one::RefMut};
use shared::{
    Nanos,
    algorithm::{Algorithm, GcraState, LeakyBucketState, LimiterState, SlidingLogState},
    quota::{EdgeCounters, EdgeId, KeyLedger, carried, lease},
};

use super::{
    Absorb, ExactOp, ExactReply, HeldShares, LeaseOp, LeaseReply, LedgerKey, LedgerView, Refund,
    STATE_GRACE, StateAbsorb, StateKey, StateLimiter, StateOp, StateRefund, StateReply, Store,
    StoreFuture, SyncOp, SyncReply,
};

/// How many operations pass between two sweeps of expired ledgers.
const SWEEP_EVERY: u64 = 4096;

/// Ledgers in this process's memory. Cheap to create; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    ledgers: DashMap<LedgerKey, Entry, foldhash::fast::RandomState>,
    states: DashMap<StateKey, StateEntry, foldhash::fast::RandomState>,
    ops: AtomicU64,
    /// What `save_partitions` recorded (gone with the process, like everything here).
    partitions: std::sync::Mutex<Vec<HeldShares>>,
}

#[derive(Debug, Default)]
struct Entry {
    ledger: KeyLedger,
    expire_at: Nanos,
    /// Exact counts absorbed per tag, so absorbing again adds only what is new.
    absorbed: Vec<(String, u64)>,
}

/// One limiter state.
#[derive(Debug)]
struct StateEntry {
    /// The limiter it was last run under, for writing it back ([`Store::absorb_state`]).
    limiter: StateLimiter,
    state: LimiterState,
    /// [`STATE_GRACE`] after the latest `reset_at` an admission answered: the state is a
    /// fresh one's equivalent by then (a refund only brings that time closer).
    keep_until: Nanos,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// How many ledgers are held (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.ledgers.len()
    }

    /// Whether no ledger is held.
    pub fn is_empty(&self) -> bool {
        self.ledgers.is_empty()
    }

    /// How many limiter states are held (expired ones included until the next sweep).
    pub fn state_count(&self) -> usize {
        self.states.len()
    }

    /// Every limiter state not yet back to a fresh one's equivalent, for writing them into
    /// another store ([`Store::absorb_state`]).
    pub fn state_snapshot(&self, now: Nanos) -> Vec<StateAbsorb> {
        self.states
            .iter()
            .filter(|e| e.keep_until > now)
            .map(|e| StateAbsorb {
                at: e.key().clone(),
                limiter: e.limiter,
                state: e.state.clone(),
            })
            .collect()
    }

    /// Every live ledger, for writing them into another store ([`Store::absorb`]).
    pub fn snapshot(&self, now: Nanos) -> Vec<Absorb> {
        self.ledgers
            .iter()
            .filter(|e| e.expire_at > now)
            .map(|e| Absorb {
                at: e.key().clone(),
                view: view(&e.ledger),
                expire_at: e.expire_at,
            })
            .collect()
    }

    /// What the previous window carries into `at`'s, read before `at`'s entry is locked (the
    /// two may share a map shard).
    fn carried(&self, at: &LedgerKey, carry_ppm: u32, now: Nanos) -> u64 {
        carried(self.previous_used(at, carry_ppm, now), carry_ppm)
    }

    /// `T` of the window before `at`'s, where a sliding window's carry comes from (0 for a
    /// fixed window: `carry_ppm` 0).
    fn previous_used(&self, at: &LedgerKey, carry_ppm: u32, now: Nanos) -> u64 {
        if carry_ppm == 0 {
            return 0;
        }
        at.previous()
            .and_then(|p| self.ledgers.get(&p))
            .filter(|e| e.expire_at > now)
            .map_or(0, |e| e.ledger.used())
    }

    /// The live entry for `at`: an expired one starts over, as Redis would have deleted it.
    fn entry(&self, at: &LedgerKey, now: Nanos) -> RefMut<'_, LedgerKey, Entry> {
        // The key is cloned only for a ledger not held yet: most ops find theirs.
        let mut entry = match self.ledgers.get_mut(at) {
            Some(entry) => entry,
            None => self.ledgers.entry(at.clone()).or_default(),
        };
        if entry.expire_at <= now {
            *entry = Entry::default();
        }
        entry
    }

    /// `at`'s state entry, a fresh one under `limiter` when there is none.
    fn state_entry(
        &self,
        at: &StateKey,
        limiter: StateLimiter,
    ) -> RefMut<'_, StateKey, StateEntry> {
        // The key is cloned only for a state not held yet: most ops find theirs.
        match self.states.get_mut(at) {
            Some(entry) => entry,
            None => self.states.entry(at.clone()).or_insert_with(|| StateEntry {
                limiter,
                state: limiter.limiter().new_state(),
                keep_until: Nanos::ZERO,
            }),
        }
    }

    fn tick(&self, now: Nanos, ops: usize) {
        let before = self.ops.fetch_add(ops as u64, Ordering::Relaxed);
        if before / SWEEP_EVERY != (before + ops as u64) / SWEEP_EVERY {
            self.ledgers.retain(|_, e| e.expire_at > now);
            self.states.retain(|_, e| e.keep_until > now);
        }
    }

    /// What the edges hold unused in `leases`, read before any entry is locked (a lease
    /// ledger may share a map shard with another).
    fn parked<'k>(&self, leases: impl IntoIterator<Item = &'k LedgerKey>, now: Nanos) -> u64 {
        leases
            .into_iter()
            .filter_map(|at| self.ledgers.get(at))
            .filter(|e| e.expire_at > now)
            .fold(0, |g, e| g.saturating_add(e.ledger.unused()))
    }

    fn acquire_state_one(&self, now: Nanos, op: &StateOp) -> StateReply {
        let parked = self.parked(op.leases(now).iter().flatten(), now);
        let mut entry = self.state_entry(&op.at, op.limiter);
        entry.limiter = op.limiter;
        // Parked on a copy, kept only with what an admission consumed (as `gcra.lua`): a
        // denial changes nothing, so tokens parked in a lease window that is no longer
        // counted by the next call are not held down by this one.
        let mut state = entry.state.clone();
        if let (StateLimiter::TokenBucket(g), LimiterState::TokenBucket(s)) =
            (op.limiter, &mut state)
        {
            lease::park(&g, s, now, parked);
        }
        // `shared`'s own acquire; a state of another kind (the rule changed algorithm) is
        // read as fresh, and replaced when this one consumes.
        let outcome = op.limiter.limiter().acquire(&mut state, now, op.cost);
        if outcome.is_allowed() {
            entry.state = state;
            entry.keep_until = entry.keep_until.max(outcome.reset_at + STATE_GRACE);
        }
        StateReply {
            outcome,
            receipt: 0,
            unknown: false,
        }
    }

    fn lease_one(&self, edge: EdgeId, now: Nanos, op: &LeaseOp) -> LeaseReply {
        let elsewhere = self.parked([&op.other], now);
        let limiter = StateLimiter::TokenBucket(op.limiter);
        let mut state = self.state_entry(&op.state(), limiter);
        state.limiter = limiter;
        // A state of another kind (the rule changed algorithm) is read as fresh.
        let mut bucket = match state.state {
            LimiterState::TokenBucket(s) => s,
            _ => GcraState::default(),
        };
        let mut entry = self.entry(&op.at, now);
        entry.expire_at = op.expire_at;
        let reply = lease::lease(
            &op.limiter,
            &mut bucket,
            now,
            &mut entry.ledger,
            elsewhere,
            edge,
            (op.used, op.released, op.want),
            op.threshold,
            op.edges,
        );
        state.state = LimiterState::TokenBucket(bucket);
        state.keep_until = state.keep_until.max(bucket.tat + STATE_GRACE);
        reply
    }

    fn absorb_state_one(&self, now: Nanos, a: &StateAbsorb) {
        let mut entry = self.state_entry(&a.at, a.limiter);
        let Some((fresh_at, merged)) = merge(a, &entry.state) else {
            return;
        };
        if fresh_at > now {
            entry.limiter = a.limiter;
            entry.state = merged;
            entry.keep_until = entry.keep_until.max(fresh_at + STATE_GRACE);
        }
    }

    fn sync_one(&self, edge: EdgeId, now: Nanos, op: &SyncOp) -> SyncReply {
        let carried = self.carried(&op.at, op.bounds.carry_ppm, now);
        let budget = op.bounds.budget(carried);
        let mut entry = self.entry(&op.at, now);
        entry.expire_at = op.expire_at;
        let ledger = &mut entry.ledger;
        ledger.merge(edge, op.used, op.released);
        ledger.grant(edge, &budget, op.want);
        let c = ledger.counters(edge);
        SyncReply {
            granted: c.granted,
            used: c.used,
            released: c.released,
            total: ledger.used(),
            reserved: ledger.reserved(&budget),
            near_limit: ledger.is_near_limit(),
            recall: ledger.pool_spent(&budget) && c.unused() > op.want,
        }
    }

    fn exact_one(&self, edge: EdgeId, now: Nanos, op: &ExactOp) -> ExactReply {
        let previous = self.previous_used(&op.at, op.bounds.carry_ppm, now);
        let carried = carried(previous, op.bounds.carry_ppm);
        let budget = op.bounds.budget(carried);
        let mut entry = self.entry(&op.at, now);
        let allowed = op.cost <= budget.partition && entry.ledger.fits(op.cost, &budget);
        let mut held = false;
        if allowed {
            entry.expire_at = op.expire_at;
            entry.ledger.exact(op.cost, &budget);
            entry.ledger.grant(edge, &budget, op.want);
        } else {
            held = entry
                .ledger
                .used()
                .saturating_add(carried)
                .saturating_add(op.cost)
                <= budget.partition;
        }
        let ledger = &entry.ledger;
        ExactReply {
            allowed,
            granted: ledger.counters(edge).granted,
            remaining: budget.partition.saturating_sub(ledger.reserved(&budget)),
            near_limit: ledger.is_near_limit(),
            held,
            total: ledger.used(),
            previous,
        }
    }
}

fn view(ledger: &KeyLedger) -> LedgerView {
    LedgerView {
        exact: ledger.exact_used(),
        // An edge that only asked (and got nothing) has all-zero counters: Redis writes no
        // field for it, and neither view lists it.
        edges: ledger
            .edges()
            .filter(|(_, c)| *c != EdgeCounters::default())
            .collect(),
        near_limit: ledger.is_near_limit(),
    }
}

impl Store for MemoryStore {
    fn sync<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [SyncOp],
    ) -> StoreFuture<'a, Vec<SyncReply>> {
        let replies = ops.iter().map(|op| self.sync_one(edge, now, op)).collect();
        self.tick(now, ops.len());
        Box::pin(std::future::ready(Ok(replies)))
    }

    fn exact<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [ExactOp],
    ) -> StoreFuture<'a, Vec<ExactReply>> {
        let replies = ops.iter().map(|op| self.exact_one(edge, now, op)).collect();
        self.tick(now, ops.len());
        Box::pin(std::future::ready(Ok(replies)))
    }

    fn refund<'a>(&'a self, refunds: &'a [Refund]) -> StoreFuture<'a, ()> {
        for r in refunds {
            if let Some(mut entry) = self.ledgers.get_mut(&r.at) {
                entry.ledger.refund(r.cost);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn absorb<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        ledgers: &'a [Absorb],
    ) -> StoreFuture<'a, ()> {
        for a in ledgers {
            let mut entry = self.entry(&a.at, now);
            entry.expire_at = entry.expire_at.max(a.expire_at);
            for &(edge, counters) in &a.view.edges {
                entry.ledger.merge_counters(edge, counters);
            }
            if a.view.near_limit {
                entry.ledger.mark_near_limit();
            }
            let before = match entry.absorbed.iter_mut().find(|(t, _)| t == tag) {
                Some((_, n)) => std::mem::replace(n, (*n).max(a.view.exact)),
                None => {
                    entry.absorbed.push((tag.to_owned(), a.view.exact));
                    0
                }
            };
            entry
                .ledger
                .absorb_exact(a.view.exact.saturating_sub(before));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn ledger<'a>(&'a self, at: &'a LedgerKey) -> StoreFuture<'a, Option<LedgerView>> {
        let view = self.ledgers.get(at).map(|e| view(&e.ledger));
        Box::pin(std::future::ready(Ok(view)))
    }

    fn acquire_state<'a>(
        &'a self,
        now: Nanos,
        ops: &'a [StateOp],
    ) -> StoreFuture<'a, Vec<StateReply>> {
        let replies = ops
            .iter()
            .map(|op| self.acquire_state_one(now, op))
            .collect();
        self.tick(now, ops.len());
        Box::pin(std::future::ready(Ok(replies)))
    }

    fn lease<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [LeaseOp],
    ) -> StoreFuture<'a, Vec<LeaseReply>> {
        let replies = ops.iter().map(|op| self.lease_one(edge, now, op)).collect();
        self.tick(now, ops.len());
        Box::pin(std::future::ready(Ok(replies)))
    }

    fn refund_state<'a>(&'a self, now: Nanos, refunds: &'a [StateRefund]) -> StoreFuture<'a, ()> {
        for r in refunds {
            // A state that is gone holds nothing of the refunded acquire: as Redis, which
            // leaves an expired key alone.
            if let Some(mut entry) = self.states.get_mut(&r.at) {
                r.limiter.refund(&mut entry.state, now, &r.admitted, r.cost);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn absorb_state<'a>(
        &'a self,
        _tag: &'a str,
        now: Nanos,
        states: &'a [StateAbsorb],
    ) -> StoreFuture<'a, ()> {
        for a in states {
            self.absorb_state_one(now, a);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn save_partitions<'a>(&'a self, held: &'a [HeldShares]) -> StoreFuture<'a, ()> {
        *self.partitions.lock().unwrap_or_else(|e| e.into_inner()) = held.to_vec();
        Box::pin(std::future::ready(Ok(())))
    }

    fn partitions(&self) -> StoreFuture<'_, Vec<HeldShares>> {
        let held = self
            .partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Box::pin(std::future::ready(Ok(held)))
    }
}

/// `a`'s state merged into `held` (what this store holds for the key), with the time the
/// result is back to a fresh state's equivalent; `None` when `a`'s state is not of its
/// limiter's kind. Whatever either side admitted still counts afterwards:
///
/// - token bucket: the later TAT;
/// - leaky bucket: the state that empties later (it holds at least as much at any time after
///   both were last updated);
/// - sliding log: the union of the entries. Without Redis's per-entry ids, equal `(time, cost)`
///   entries are paired off: each appears as often as on the side that has more of it. That
///   makes a repeated absorb change nothing (and would count two different requests of the
///   same nanosecond and cost, one on each side, once).
fn merge(a: &StateAbsorb, held: &LimiterState) -> Option<(Nanos, LimiterState)> {
    match (a.limiter, &a.state, held) {
        (StateLimiter::TokenBucket(_), LimiterState::TokenBucket(s), held) => {
            let tat = match held {
                LimiterState::TokenBucket(h) => s.tat.max(h.tat),
                _ => s.tat,
            };
            Some((tat, LimiterState::TokenBucket(GcraState { tat })))
        }
        (StateLimiter::LeakyBucket(_), LimiterState::LeakyBucket(s), held) => {
            let empty_at = |s: &LeakyBucketState| s.last + s.level;
            let fuller = match held {
                // A tie keeps what is held, as `leaky.lua` does.
                LimiterState::LeakyBucket(h) if empty_at(h) >= empty_at(s) => *h,
                _ => *s,
            };
            Some((empty_at(&fuller), LimiterState::LeakyBucket(fuller)))
        }
        (StateLimiter::SlidingLog(log), LimiterState::SlidingLog(s), held) => {
            let sorted = |s: &SlidingLogState| {
                let mut v: Vec<(Nanos, u32)> = s.entries().collect();
                v.sort_unstable();
                v
            };
            let theirs = sorted(s);
            let ours = match held {
                LimiterState::SlidingLog(h) => sorted(h),
                _ => Vec::new(),
            };
            // Rebuilt through `consume`, in time order: the state `shared` would hold.
            let mut merged = SlidingLogState::default();
            for (at, cost) in paired_union(&theirs, &ours) {
                if let Some(cost) = NonZeroU32::new(cost) {
                    log.consume(&mut merged, at, cost);
                }
            }
            let newest = merged.entries().last().map_or(Nanos::ZERO, |(at, _)| at);
            Some((newest + log.window(), LimiterState::SlidingLog(merged)))
        }
        _ => None,
    }
}

/// The union of two sorted lists, an element shared by both kept once per pair.
fn paired_union<T: Ord + Copy>(a: &[T], b: &[T]) -> Vec<T> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

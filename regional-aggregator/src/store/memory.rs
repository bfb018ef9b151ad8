//! The in-memory store: `shared::quota::KeyLedger` in a concurrent map.
//!
//! The regional's default when no Redis URL is given (demos, single-node use), the store the
//! circuit breaker counts in while Redis is away, and the specification the Redis scripts are
//! tested against: every operation here is the `shared` ledger's own method, nothing more.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use shared::{
    Nanos,
    quota::{EdgeCounters, EdgeId, KeyLedger, carried},
};

use super::{
    Absorb, ExactOp, ExactReply, LedgerKey, LedgerView, Refund, Store, StoreFuture, SyncOp,
    SyncReply,
};

/// How many operations pass between two sweeps of expired ledgers.
const SWEEP_EVERY: u64 = 4096;

/// Ledgers in this process's memory. Cheap to create; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    ledgers: DashMap<LedgerKey, Entry, foldhash::fast::RandomState>,
    ops: AtomicU64,
}

#[derive(Debug, Default)]
struct Entry {
    ledger: KeyLedger,
    expire_at: Nanos,
    /// Exact counts absorbed per tag, so absorbing again adds only what is new.
    absorbed: Vec<(String, u64)>,
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
        if carry_ppm == 0 {
            return 0;
        }
        let previous = at
            .previous()
            .and_then(|p| self.ledgers.get(&p))
            .filter(|e| e.expire_at > now)
            .map_or(0, |e| e.ledger.used());
        carried(previous, carry_ppm)
    }

    /// The live entry for `at`: an expired one starts over, as Redis would have deleted it.
    fn entry(
        &self,
        at: &LedgerKey,
        now: Nanos,
    ) -> dashmap::mapref::one::RefMut<'_, LedgerKey, Entry> {
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

    fn tick(&self, now: Nanos, ops: usize) {
        let before = self.ops.fetch_add(ops as u64, Ordering::Relaxed);
        if before / SWEEP_EVERY != (before + ops as u64) / SWEEP_EVERY {
            self.ledgers.retain(|_, e| e.expire_at > now);
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
        let carried = self.carried(&op.at, op.bounds.carry_ppm, now);
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
}

//! The circuit breaker around the store (seed 002, DESIGN §7): Redis down or slow must not
//! stop a region from deciding.
//!
//! [`GuardedStore`] is a [`Store`] that sends every call to the primary store (Redis) under a
//! timeout while the breaker is closed. After [`BreakerConfig::failures`] failures or
//! timeouts in a row it opens: calls go to an in-memory store instead, with the same bounds
//! (the region's share of `P`), and nothing waits on Redis. After the cooldown one call probes
//! Redis (half-open); when it succeeds, what was decided in memory is written back to Redis
//! with [`Store::absorb`] and the breaker closes, so Redis's counts equal what was admitted.
//! A failed probe opens it for another cooldown.
//!
//! The write-back runs twice, before and after calls switch back to Redis: the first carries
//! the outage, the second the calls that were still landing in memory during the first. Both
//! are idempotent (counters by `max`, the exact count under this outage's tag by `max`), so
//! nothing counts twice. Edges' own counters need no write-back to be right (they are
//! cumulative, and each edge's next sync carries them), but the grants made in memory and the
//! exact path's admissions exist nowhere else.
//!
//! A call that timed out may still have been applied by Redis; it is decided again in memory,
//! so its cost may count twice (a false denial later, never an overshoot).
//!
//! What the memory store cannot know is what Redis had counted before the outage, except
//! what edges report again: during an outage a key may admit up to its partition on top of
//! what the regional itself admitted exactly before it. That is the price of deciding at all
//! without the store; the failure mode `closed` at the edge is the choice for rules that
//! cannot pay it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use shared::{Clock, Nanos, quota::EdgeId};

use crate::store::{
    Absorb, ExactOp, ExactReply, LedgerKey, LedgerView, MemoryStore, Refund, Store, StoreError,
    StoreFuture, SyncOp, SyncReply,
};

/// When the breaker opens and how long it stays open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures or timeouts in a row that open the breaker. Default 5.
    pub failures: u32,
    /// How long it stays open before a probe. Default 60 s.
    pub cooldown: Duration,
    /// The longest one store call may take before it counts as a failure and the call is
    /// served from memory. Default 25 ms: half the edge's 50 ms timeout, so a slow Redis
    /// still leaves time to answer.
    pub timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(60),
            timeout: Duration::from_millis(25),
        }
    }
}

/// Where the breaker sends calls now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// To the primary store.
    Closed,
    /// To memory, until the cooldown ends.
    Open,
    /// To memory, while one call probes the primary.
    HalfOpen,
}

impl BreakerState {
    /// As a metric value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// The breaker's state machine, apart from any I/O.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    failures: u32,
    open_until: Nanos,
    probing: bool,
}

/// Where one call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// To the primary store.
    Primary,
    /// To the primary store, as the half-open probe.
    Probe,
    /// To memory.
    Fallback,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            state: BreakerState::Closed,
            failures: 0,
            open_until: Nanos::ZERO,
            probing: false,
        }
    }

    /// Its state now.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Routes a call made at `now`.
    pub fn route(&mut self, now: Nanos) -> Route {
        match self.state {
            BreakerState::Closed => Route::Primary,
            BreakerState::Open if now >= self.open_until => {
                self.state = BreakerState::HalfOpen;
                self.probing = true;
                Route::Probe
            }
            BreakerState::Open => Route::Fallback,
            BreakerState::HalfOpen if !self.probing => {
                self.probing = true;
                Route::Probe
            }
            BreakerState::HalfOpen => Route::Fallback,
        }
    }

    /// Records a primary call's failure or timeout; true when this opened the breaker.
    pub fn failed(&mut self, route: Route, now: Nanos) -> bool {
        let cooldown = Nanos::saturating_from(self.config.cooldown.as_nanos());
        match route {
            Route::Probe => {
                self.state = BreakerState::Open;
                self.probing = false;
                self.open_until = now + cooldown;
                false
            }
            Route::Primary => {
                self.failures += 1;
                if self.state == BreakerState::Closed && self.failures >= self.config.failures {
                    self.state = BreakerState::Open;
                    self.open_until = now + cooldown;
                    return true;
                }
                false
            }
            Route::Fallback => false,
        }
    }

    /// Records a primary call's success. A successful probe does not close the breaker by
    /// itself: the write-back does ([`Breaker::close`]).
    pub fn succeeded(&mut self, route: Route) {
        if route == Route::Primary {
            self.failures = 0;
        }
    }

    /// Closes the breaker after a probe and the write-back succeeded.
    pub fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
        self.probing = false;
    }
}

/// Counters for operators.
#[derive(Debug, Default)]
pub struct BreakerStats {
    /// Times the breaker opened.
    pub opened: AtomicU64,
    /// Calls served from memory.
    pub fallback_calls: AtomicU64,
    /// Ledgers written back to the primary on recovery.
    pub written_back: AtomicU64,
}

/// A [`Store`] that falls back to memory while its primary fails.
pub struct GuardedStore {
    primary: Arc<dyn Store>,
    fallback: Mutex<Arc<MemoryStore>>,
    breaker: Mutex<Breaker>,
    clock: Arc<dyn Clock + Send + Sync>,
    timeout: Duration,
    /// Names this regional's outages in the write-back tags: `<node>-<outage start>`.
    node: String,
    outage: Mutex<Option<String>>,
    stats: BreakerStats,
}

impl GuardedStore {
    /// Guards `primary`; `node` is this regional's name, unique among the replicas sharing
    /// the primary (it keeps their write-backs apart).
    pub fn new(
        primary: Arc<dyn Store>,
        config: BreakerConfig,
        clock: Arc<dyn Clock + Send + Sync>,
        node: impl Into<String>,
    ) -> GuardedStore {
        GuardedStore {
            primary,
            fallback: Mutex::new(Arc::new(MemoryStore::new())),
            timeout: config.timeout,
            breaker: Mutex::new(Breaker::new(config)),
            clock,
            node: node.into(),
            outage: Mutex::new(None),
            stats: BreakerStats::default(),
        }
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        lock(&self.breaker).state()
    }

    /// Counters.
    pub fn stats(&self) -> &BreakerStats {
        &self.stats
    }

    fn fallback(&self) -> Arc<dyn Store> {
        lock(&self.fallback).clone()
    }

    /// Runs `call` on the primary or on memory, as the breaker says, and keeps the breaker
    /// up to date.
    ///
    /// `call` owns the store it is handed (an `Arc`), so memory can be swapped out under a
    /// call in flight without ending that call.
    async fn guarded<'a, T>(
        &'a self,
        call: impl Fn(Arc<dyn Store>) -> StoreFuture<'a, T>,
    ) -> Result<T, StoreError> {
        let now = self.clock.now();
        let route = lock(&self.breaker).route(now);
        if route == Route::Fallback {
            self.stats.fallback_calls.fetch_add(1, Ordering::Relaxed);
            let fallback = self.fallback();
            return call(fallback).await;
        }
        let result = tokio::time::timeout(self.timeout, call(self.primary.clone())).await;
        match result {
            Ok(Ok(value)) => {
                lock(&self.breaker).succeeded(route);
                if route == Route::Probe {
                    self.recover().await;
                }
                Ok(value)
            }
            Ok(Err(StoreError::Permanent(e))) => {
                // Not the store being away: the same call fails the same way in memory or not.
                lock(&self.breaker).succeeded(route);
                Err(StoreError::Permanent(e))
            }
            Ok(Err(StoreError::Transient(_))) | Err(_) => {
                let opened = lock(&self.breaker).failed(route, now);
                if opened {
                    self.stats.opened.fetch_add(1, Ordering::Relaxed);
                    *lock(&self.outage) = Some(format!("{}-{}", self.node, now.as_u64()));
                    tracing::error!(
                        "store failing: circuit breaker open, deciding in memory until a probe succeeds"
                    );
                }
                self.stats.fallback_calls.fetch_add(1, Ordering::Relaxed);
                let fallback = self.fallback();
                call(fallback).await
            }
        }
    }

    /// After a successful probe: writes what memory decided back to the primary, switches
    /// calls back to it, and writes again what landed in memory meanwhile.
    async fn recover(&self) {
        let tag = lock(&self.outage)
            .clone()
            .unwrap_or_else(|| format!("{}-recovery", self.node));
        let old = lock(&self.fallback).clone();
        if let Err(e) = self.write_back(&tag, &old).await {
            tracing::warn!(error = %e, "write-back to the store failed; breaker stays open");
            let now = self.clock.now();
            lock(&self.breaker).failed(Route::Probe, now);
            return;
        }
        *lock(&self.fallback) = Arc::new(MemoryStore::new());
        lock(&self.breaker).close();
        if let Err(e) = self.write_back(&tag, &old).await {
            // What landed in memory between the two passes is lost to Redis: bounded by the
            // calls of a few milliseconds, and edges' own counters come back with their syncs.
            tracing::warn!(error = %e, "second write-back pass failed");
        }
        *lock(&self.outage) = None;
        tracing::info!("store back: circuit breaker closed, memory counts written back");
    }

    async fn write_back(&self, tag: &str, memory: &MemoryStore) -> Result<(), StoreError> {
        let now = self.clock.now();
        let ledgers = memory.snapshot(now);
        for chunk in ledgers.chunks(shared::wire::MAX_KEYS_PER_BATCH) {
            tokio::time::timeout(self.timeout * 4, self.primary.absorb(tag, now, chunk))
                .await
                .map_err(|_| StoreError::Transient("write-back timed out".into()))??;
        }
        self.stats
            .written_back
            .fetch_add(ledgers.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store for GuardedStore {
    fn sync<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [SyncOp],
    ) -> StoreFuture<'a, Vec<SyncReply>> {
        Box::pin(self.guarded(move |s| Box::pin(async move { s.sync(edge, now, ops).await })))
    }

    fn exact<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [ExactOp],
    ) -> StoreFuture<'a, Vec<ExactReply>> {
        Box::pin(self.guarded(move |s| Box::pin(async move { s.exact(edge, now, ops).await })))
    }

    fn refund<'a>(&'a self, refunds: &'a [Refund]) -> StoreFuture<'a, ()> {
        Box::pin(self.guarded(move |s| Box::pin(async move { s.refund(refunds).await })))
    }

    fn absorb<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        ledgers: &'a [Absorb],
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.guarded(move |s| Box::pin(async move { s.absorb(tag, now, ledgers).await })))
    }

    fn ledger<'a>(&'a self, at: &'a LedgerKey) -> StoreFuture<'a, Option<LedgerView>> {
        Box::pin(self.guarded(move |s| Box::pin(async move { s.ledger(at).await })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default())
    }

    #[test]
    fn opens_after_five_failures_in_a_row() {
        let mut b = breaker();
        let now = Nanos::from_secs(1);
        for _ in 0..4 {
            assert_eq!(b.route(now), Route::Primary);
            assert!(!b.failed(Route::Primary, now));
        }
        b.succeeded(Route::Primary); // a success resets the run
        for i in 0..5 {
            assert_eq!(b.route(now), Route::Primary);
            assert_eq!(b.failed(Route::Primary, now), i == 4);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.route(now), Route::Fallback);
    }

    #[test]
    fn one_probe_after_the_cooldown_and_closing_on_success() {
        let mut b = breaker();
        let t = Nanos::from_secs(1);
        for _ in 0..5 {
            b.failed(Route::Primary, t);
        }
        let later = t + Nanos::from_secs(60);
        assert_eq!(b.route(later - Nanos(1)), Route::Fallback);
        assert_eq!(b.route(later), Route::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.route(later), Route::Fallback, "one probe at a time");
        b.succeeded(Route::Probe);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "closed by the write-back"
        );
        b.close();
        assert_eq!(b.route(later), Route::Primary);
    }

    #[test]
    fn a_failed_probe_opens_for_another_cooldown() {
        let mut b = breaker();
        let t = Nanos::from_secs(1);
        for _ in 0..5 {
            b.failed(Route::Primary, t);
        }
        let probe_at = t + Nanos::from_secs(60);
        assert_eq!(b.route(probe_at), Route::Probe);
        b.failed(Route::Probe, probe_at);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.route(probe_at + Nanos::from_secs(59)), Route::Fallback);
        assert_eq!(b.route(probe_at + Nanos::from_secs(60)), Route::Probe);
    }
}

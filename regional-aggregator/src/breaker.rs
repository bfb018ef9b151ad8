//! The circuit breaker around the store (seed 002, DESIGN §7): Redis down or slow must not
//! stop a region from deciding.
//!
//! [`GuardedStore`] is a [`Store`] that sends every call to the primary store (Redis) under a
//! timeout while the breaker is closed; a call that fails or times out fails (the edge's
//! failure mode decides that request). After [`BreakerConfig::failures`] failures or
//! timeouts in a row it opens: calls go to an in-memory store instead, with the same bounds
//! (the region's share of `P`), and nothing waits on Redis. After the cooldown a task probes
//! Redis (half-open) while calls stay in memory; when Redis answers, what was decided in
//! memory is written back with [`Store::absorb`] and the breaker closes, so Redis's counts
//! equal what was admitted. A failed probe opens it for another cooldown.
//!
//! The write-back runs twice, before and after calls switch back to Redis: the first carries
//! the outage, the second the calls that were still landing in memory during the first. Both
//! are idempotent (counters by `max`, the exact count under this outage's tag by `max`), so
//! nothing counts twice. Edges' own counters need no write-back to be right (they are
//! cumulative, and each edge's next sync carries them), but the grants made in memory and the
//! exact path's admissions exist nowhere else.
//!
//! Limiter states (token and leaky buckets, sliding logs) are written back the same way, with
//! [`Store::absorb_state`]: a token bucket's TAT by `max`, a leaky bucket's later emptying
//! time, a log's entries added under this outage's tag. Each merge keeps everything either
//! side admitted and is idempotent, so both passes are safe.
//!
//! What the memory store cannot know is what Redis had counted before the outage, except
//! what edges report again: during an outage a key may admit up to its partition on top of
//! what the regional itself admitted exactly before it (a bucket or log: its whole capacity,
//! starting fresh in memory). That is the price of deciding at all without the store, and
//! rules whose failure mode is `closed` do not pay it: their ops carry the instant their
//! decision depends on counts since (`exact_since` on [`ExactOp`]: the window's start, a sliding
//! window's previous one's, a bucket's or log's span back), and memory denies those that
//! reach back before the outage began (held, so the edge asks again soon), mints no grant on
//! them, and decides them exactly once their window or span lies inside the outage. So a
//! `closed` limit is never exceeded by an outage of the store. Replicas of one region each
//! decide in their own memory during an outage, so each takes `1/replicas` of what the region
//! holds ([`BreakerConfig::replicas`]: a window's `P`, a bucket's or log's capacity and rate),
//! as edges take `P/n` in the `local` failure mode: together they stay within it.

use std::{
    borrow::Cow,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use shared::{
    Clock, Nanos,
    algorithm::{Outcome, Verdict},
    quota::EdgeId,
};

use crate::store::{
    Absorb, Bounds, ExactOp, ExactReply, HeldShares, LeaseOp, LeaseReply, LedgerKey, LedgerView,
    MemoryStore, Refund, StateAbsorb, StateLimiter, StateOp, StateRefund, StateReply, Store,
    StoreError, StoreFuture, SyncOp, SyncReply,
};

/// When the breaker opens and how long it stays open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures or timeouts in a row that open the breaker, each of a call begun after the
    /// last failed ([`Breaker::failed`]). Default 5.
    pub failures: u32,
    /// How long it stays open before a probe. Default 5 s: while open the region decides
    /// from memory, which is less exact (module doc), so a stall that passes (a failover, a
    /// starved CPU) should cost seconds of that, not a minute; a probe of a Redis that is
    /// still down costs one call every cooldown.
    pub cooldown: Duration,
    /// The longest one store call may take before it counts as a failure and the call is
    /// served from memory, plus 50 µs for each operation in it (a sync batch is many). Default
    /// 25 ms: half the edge's 50 ms timeout, so a slow Redis still leaves time to answer.
    pub timeout: Duration,
    /// How many regionals of this region share the primary store. While the breaker is open
    /// each decides in its own memory with `1/replicas` of the region's partition, so that
    /// together they stay within it (module doc). Default 1.
    pub replicas: u32,
}

impl BreakerConfig {
    /// The longest one write-back chunk ([`WRITE_BACK_CHUNK`] ledgers, more work than any
    /// decision's call) may take: four per-call timeouts. It is also the Redis client's own
    /// response timeout: the breaker bounds every other call by `timeout` itself, and a
    /// client timeout as short would cut write-back chunks on a loaded box, so that every
    /// probe failed and the breaker stayed open for as long as the load lasted.
    pub fn write_back_timeout(&self) -> Duration {
        self.timeout * 4
    }
}

/// Ledgers (or limiter states) written back to the primary per call when the breaker
/// closes: small enough that one chunk fits its timeout on a busy Redis.
pub const WRITE_BACK_CHUNK: usize = 256;

impl Default for BreakerConfig {
    fn default() -> BreakerConfig {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(5),
            timeout: Duration::from_millis(25),
            replicas: 1,
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
    /// When the last failure of the run was seen: only a call begun after it counts next.
    last_failure: Nanos,
    open_until: Nanos,
    /// When the breaker last opened from closed: memory has seen every call since.
    opened_at: Nanos,
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
            last_failure: Nanos::ZERO,
            open_until: Nanos::ZERO,
            opened_at: Nanos::ZERO,
        }
    }

    /// Its state now.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// While calls go to memory: when the outage began (memory has seen every call since,
    /// and none before). `None` while closed.
    pub fn outage_since(&self) -> Option<Nanos> {
        (self.state != BreakerState::Closed).then_some(self.opened_at)
    }

    /// Routes a call made at `now`. The first call after the cooldown is the probe; until
    /// the probe ends (closing or reopening the breaker) every call goes to memory.
    pub fn route(&mut self, now: Nanos) -> Route {
        match self.state {
            BreakerState::Closed => Route::Primary,
            BreakerState::Open if now >= self.open_until => {
                self.state = BreakerState::HalfOpen;
                Route::Probe
            }
            BreakerState::Open | BreakerState::HalfOpen => Route::Fallback,
        }
    }

    /// Records the failure or timeout, seen at `now`, of a primary call begun at `started`;
    /// true when this opened the breaker.
    ///
    /// A failure counts in the run only when its call began after the run's last failure was
    /// seen. Calls in flight together that fail together (one stall of a starved host, one
    /// slow command ahead of them on the connection) are one piece of evidence, not many:
    /// counted each, a 60 ms pause of a busy two-core host with five calls in flight opened
    /// the breaker, and the region decided from memory, less exactly, for the whole cooldown.
    /// So "five failures in a row" is five attempts made one after another, each after the
    /// last had failed; a store that is really away fails them all within a few timeouts.
    pub fn failed(&mut self, started: Nanos, now: Nanos) -> bool {
        if self.failures > 0 && started < self.last_failure {
            return false;
        }
        self.last_failure = now;
        self.failures += 1;
        if self.state == BreakerState::Closed && self.failures >= self.config.failures {
            self.opened_at = now;
            self.reopen(now);
            return true;
        }
        false
    }

    /// Records a failed probe: open for another cooldown.
    pub fn probe_failed(&mut self, now: Nanos) {
        self.reopen(now);
    }

    /// Records a primary call's success: the run of failures starts over.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Closes the breaker after a probe and the write-back succeeded.
    pub fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
    }

    fn reopen(&mut self, now: Nanos) {
        self.state = BreakerState::Open;
        self.open_until = now + Nanos::saturating_from(self.config.cooldown.as_nanos());
    }
}

/// What a call of `ops` operations may take on top of the breaker's timeout: about what one
/// script takes on a busy host (45 µs measured under `deploy/up.sh` load), with room.
const PER_OP: Duration = Duration::from_micros(50);

/// The timeout of a store call of `ops` operations: `timeout`, plus [`PER_OP`] for each. A
/// sync batch of 1,024 keys is about 45 ms of scripts however healthy Redis is; under the bare
/// timeout every large batch failed, and five of them opened the breaker. With the allowance
/// that batch has 25 + 51 ms, still inside an edge's 100 ms sync timeout, while an exact check
/// of a few keys keeps about the bare 25 ms.
fn call_timeout(timeout: Duration, ops: usize) -> Duration {
    timeout.saturating_add(PER_OP.saturating_mul(u32::try_from(ops).unwrap_or(u32::MAX)))
}

/// Counters for operators.
#[derive(Debug, Default)]
pub struct BreakerStats {
    /// Times the breaker opened.
    pub opened: AtomicU64,
    /// Calls served from memory.
    pub fallback_calls: AtomicU64,
    /// Ledgers and limiter states written back to the primary on recovery.
    pub written_back: AtomicU64,
}

/// A [`Store`] that falls back to memory while its primary fails. Clones share everything.
#[derive(Clone)]
pub struct GuardedStore {
    inner: Arc<Inner>,
}

struct Inner {
    primary: Arc<dyn Store>,
    fallback: Mutex<Arc<MemoryStore>>,
    breaker: Mutex<Breaker>,
    clock: Arc<dyn Clock + Send + Sync>,
    timeout: Duration,
    write_back_timeout: Duration,
    /// [`BreakerConfig::replicas`], at least 1.
    replicas: u32,
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
            inner: Arc::new(Inner {
                primary,
                fallback: Mutex::new(Arc::new(MemoryStore::new())),
                timeout: config.timeout,
                write_back_timeout: config.write_back_timeout(),
                replicas: config.replicas.max(1),
                breaker: Mutex::new(Breaker::new(config)),
                clock,
                node: node.into(),
                outage: Mutex::new(None),
                stats: BreakerStats::default(),
            }),
        }
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        lock(&self.inner.breaker).state()
    }

    /// Counters.
    pub fn stats(&self) -> &BreakerStats {
        &self.inner.stats
    }

    /// `ops` as this replica decides them: whole while the primary answers, cut to its own
    /// part of the region's partition while it decides in memory (`outage`).
    fn own_share<'o, Op: OwnShare>(&self, ops: &'o [Op], outage: Option<Nanos>) -> Cow<'o, [Op]> {
        let replicas = self.inner.replicas;
        if outage.is_none() || replicas == 1 {
            return Cow::Borrowed(ops);
        }
        Cow::Owned(ops.iter().map(|op| op.own_share(replicas)).collect())
    }

    /// Runs `call` on the primary or on memory, as the breaker says, and keeps the breaker
    /// up to date. No call waits longer than the timeout on the primary.
    ///
    /// While the breaker is closed, a failed call fails: the edge's failure mode decides that
    /// request. Memory knows nothing of what the primary counted, so deciding there while
    /// the primary is merely slow once would admit against an empty ledger; it is used only
    /// once the breaker is open. The half-open probe is the write-back itself, run in its own
    /// task, so no decision waits for a recovery.
    ///
    /// `call` owns the store it is handed (an `Arc`), so memory can be swapped out under a
    /// call in flight without ending that call. Handed memory, it is also told when the
    /// outage began, for the ops that must not be decided on a partial count
    /// ([`ExactOp::exact_since`]).
    async fn guarded<'a, T>(
        &'a self,
        ops: usize,
        call: impl Fn(Arc<dyn Store>, Option<Nanos>) -> StoreFuture<'a, T>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let (route, since) = {
            let mut breaker = lock(&inner.breaker);
            (breaker.route(now), breaker.outage_since().unwrap_or(now))
        };
        match route {
            Route::Fallback => return inner.in_memory(call, since).await,
            Route::Probe => {
                tokio::spawn(inner.clone().recover());
                return inner.in_memory(call, since).await;
            }
            Route::Primary => {}
        }
        let timeout = call_timeout(inner.timeout, ops);
        let result = tokio::time::timeout(timeout, call(inner.primary.clone(), None)).await;
        match result {
            Ok(Ok(value)) => {
                lock(&inner.breaker).succeeded();
                Ok(value)
            }
            // Not the store being away: the same call fails the same way, anywhere.
            Ok(Err(StoreError::Permanent(e))) => Err(StoreError::Permanent(e)),
            Ok(Err(StoreError::Transient(e))) => {
                inner.failed(now);
                Err(StoreError::Transient(e))
            }
            Err(_) => {
                inner.failed(now);
                Err(StoreError::Transient(format!(
                    "no answer within {timeout:?}"
                )))
            }
        }
    }
}

impl Inner {
    async fn in_memory<'a, T>(
        &self,
        call: impl Fn(Arc<dyn Store>, Option<Nanos>) -> StoreFuture<'a, T>,
        since: Nanos,
    ) -> Result<T, StoreError> {
        self.stats.fallback_calls.fetch_add(1, Ordering::Relaxed);
        let fallback: Arc<dyn Store> = lock(&self.fallback).clone();
        call(fallback, Some(since)).await
    }

    fn failed(&self, started: Nanos) {
        let now = self.clock.now();
        if lock(&self.breaker).failed(started, now) {
            self.stats.opened.fetch_add(1, Ordering::Relaxed);
            *lock(&self.outage) = Some(format!("{}-{}", self.node, now.as_u64()));
            tracing::error!(
                "store failing: circuit breaker open, deciding in memory until a probe succeeds"
            );
        }
    }

    /// The half-open probe: reach the primary, write what memory decided back to it, switch
    /// calls back to it, and write again what landed in memory meanwhile. Any failure opens
    /// the breaker for another cooldown.
    async fn recover(self: Arc<Self>) {
        let tag = lock(&self.outage)
            .clone()
            .unwrap_or_else(|| format!("{}-recovery", self.node));
        let old = lock(&self.fallback).clone();
        let probe = LedgerKey {
            limit: shared::LimitId(0),
            key: String::new(),
            window: 0,
        };
        let reached = tokio::time::timeout(self.timeout, self.primary.ledger(&probe)).await;
        let first = match reached {
            Ok(Ok(_)) => self.write_back(&tag, &old).await,
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Transient("probe timed out".into())),
        };
        if let Err(e) = first {
            tracing::warn!(error = %e, "store probe failed; breaker stays open");
            let now = self.clock.now();
            lock(&self.breaker).probe_failed(now);
            return;
        }
        *lock(&self.fallback) = Arc::new(MemoryStore::new());
        lock(&self.breaker).close();
        if let Err(e) = self.write_back(&tag, &old).await {
            // What landed in memory between the two passes is lost to the primary: the calls
            // of a few milliseconds, and edges' own counters come back with their syncs.
            tracing::warn!(error = %e, "second write-back pass failed");
        }
        let mut outage = lock(&self.outage);
        // A new outage may have begun meanwhile; its tag stays.
        if outage.as_deref() == Some(tag.as_str()) {
            *outage = None;
        }
        drop(outage);
        tracing::info!("store back: circuit breaker closed, memory counts written back");
    }

    /// `absorb` on each [`WRITE_BACK_CHUNK`] of `items` in turn, each call bounded by the
    /// write-back timeout.
    async fn in_chunks<'a, T>(
        &self,
        items: &'a [T],
        absorb: impl Fn(&'a [T]) -> StoreFuture<'a, ()>,
    ) -> Result<(), StoreError> {
        for chunk in items.chunks(WRITE_BACK_CHUNK) {
            tokio::time::timeout(self.write_back_timeout, absorb(chunk))
                .await
                .map_err(|_| StoreError::Transient("write-back timed out".into()))??;
        }
        Ok(())
    }

    async fn write_back(&self, tag: &str, memory: &MemoryStore) -> Result<(), StoreError> {
        let now = self.clock.now();
        let ledgers = memory.snapshot(now);
        self.in_chunks(&ledgers, |chunk| self.primary.absorb(tag, now, chunk))
            .await?;
        let states = memory.state_snapshot(now);
        self.in_chunks(&states, |chunk| self.primary.absorb_state(tag, now, chunk))
            .await?;
        self.stats
            .written_back
            .fetch_add((ledgers.len() + states.len()) as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// An op that may need every admission since an instant ([`ExactOp::exact_since`]).
trait Dated: Clone {
    fn exact_since(&self) -> Option<Nanos>;

    /// Whether memory that has seen only the calls since `since` cannot decide it.
    fn unknown(&self, since: Nanos) -> bool {
        self.exact_since().is_some_and(|t| t < since)
    }
}

impl Dated for SyncOp {
    fn exact_since(&self) -> Option<Nanos> {
        self.exact_since
    }
}

impl Dated for ExactOp {
    fn exact_since(&self) -> Option<Nanos> {
        self.exact_since
    }
}

impl Dated for LeaseOp {
    fn exact_since(&self) -> Option<Nanos> {
        self.exact_since
    }
}

impl Dated for StateOp {
    fn exact_since(&self) -> Option<Nanos> {
        self.exact_since
    }
}

/// Memory's outage start and the ops of `ops` it can decide, when it cannot decide them all;
/// `None` when it can (or the call is not going to memory).
fn known<Op: Dated>(ops: &[Op], outage: Option<Nanos>) -> Option<(Nanos, Vec<Op>)> {
    let since = outage.filter(|&t| ops.iter().any(|op| op.unknown(t)))?;
    Some((
        since,
        ops.iter()
            .filter(|op| !op.unknown(since))
            .cloned()
            .collect(),
    ))
}

/// `ops` decided by `store`, which is memory during an outage that began at `outage`: those
/// that reach back before it are refused (see `merge`).
async fn acquire_known(
    store: &dyn Store,
    now: Nanos,
    ops: &[StateOp],
    outage: Option<Nanos>,
) -> Result<Vec<StateReply>, StoreError> {
    let Some((since, known)) = known(ops, outage) else {
        return store.acquire_state(now, ops).await;
    };
    let decided = store.acquire_state(now, &known).await?;
    Ok(merge(ops, since, decided, |op, wait| {
        unknown_state_reply(op, now, wait)
    }))
}

/// One replica's share of a bucket or log during an outage, over `replicas`: `⌊10⁶ / N⌋` ppm,
/// so the parts never sum past the whole.
const OWN_SHARE_PPM: u32 = 1_000_000;

/// One replica's part of `limiter` during an outage: `1/replicas` of its capacity and rate
/// (the whole of it for one replica); `None` when that part cannot hold a unit.
fn own_part(limiter: StateLimiter, replicas: u32) -> Option<StateLimiter> {
    limiter.partitioned(OWN_SHARE_PPM / replicas.max(1))
}

/// An op whose window bounds can be cut to one replica's part of the region's partition.
trait OwnShare: Clone {
    fn own_share(&self, replicas: u32) -> Self;
}

impl OwnShare for SyncOp {
    fn own_share(&self, replicas: u32) -> SyncOp {
        SyncOp {
            bounds: self.bounds.own_share(replicas),
            ..self.clone()
        }
    }
}

impl OwnShare for ExactOp {
    fn own_share(&self, replicas: u32) -> ExactOp {
        ExactOp {
            bounds: self.bounds.own_share(replicas),
            ..self.clone()
        }
    }
}

impl Bounds {
    /// One replica's part of these bounds: `⌊P / replicas⌋`, the rest alike.
    fn own_share(&self, replicas: u32) -> Bounds {
        Bounds::new(
            self.partition / u64::from(replicas.max(1)),
            self.threshold,
            self.edges,
            self.carry_ppm,
        )
    }
}

/// The replies to `ops`, in order: `decided` (memory's, one per known op, in order) for the
/// ops memory could decide, `refuse(op, wait)` for the others, `wait` being how long until
/// their span lies inside the outage. A short answer refuses the rest.
fn merge<Op: Dated, R>(
    ops: &[Op],
    since: Nanos,
    decided: Vec<R>,
    refuse: impl Fn(&Op, Nanos) -> R,
) -> Vec<R> {
    let mut decided = decided.into_iter();
    ops.iter()
        .map(|op| match op.exact_since() {
            Some(t) if t < since => refuse(op, since - t),
            _ => decided.next().unwrap_or_else(|| refuse(op, Nanos::ZERO)),
        })
        .collect()
}

/// Memory's answer to a ledger op it cannot decide: denied, and `held` so the edge asks again
/// soon (the store may be back by then) and the regional does not escalate: another region's
/// quota would not make the count known.
fn unknown_reply(op: &ExactOp) -> ExactReply {
    ExactReply {
        allowed: false,
        granted: 0,
        remaining: 0,
        near_limit: true,
        held: true,
        total: op.bounds.partition,
        previous: 0,
    }
}

/// Memory's answer to a limiter-state op it cannot decide: denied until `wait` from `now`,
/// when the op's span lies wholly inside the outage.
fn unknown_state_reply(op: &StateOp, now: Nanos, wait: Nanos) -> StateReply {
    StateReply {
        outcome: Outcome {
            verdict: Verdict::Deny,
            limit: op.limiter.limiter().limit(),
            remaining: 0,
            reset_at: now + wait,
            retry_after: wait,
        },
        receipt: 0,
        unknown: true,
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
        Box::pin(self.guarded(ops.len(), move |s, outage| {
            Box::pin(async move {
                let ops = self.own_share(ops, outage);
                let ops = &ops[..];
                let Some(since) = outage.filter(|&t| ops.iter().any(|op| op.unknown(t))) else {
                    return s.sync(edge, now, ops).await;
                };
                // Merge their counts (edges' counters are cumulative, so that loses nothing)
                // but mint no grant on them.
                let ops: Vec<SyncOp> = ops
                    .iter()
                    .map(|op| SyncOp {
                        want: if op.unknown(since) { 0 } else { op.want },
                        ..op.clone()
                    })
                    .collect();
                s.sync(edge, now, &ops).await
            })
        }))
    }

    fn exact<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [ExactOp],
    ) -> StoreFuture<'a, Vec<ExactReply>> {
        Box::pin(self.guarded(ops.len(), move |s, outage| {
            Box::pin(async move {
                let ops = self.own_share(ops, outage);
                let ops = &ops[..];
                let Some((since, known)) = known(ops, outage) else {
                    return s.exact(edge, now, ops).await;
                };
                let decided = s.exact(edge, now, &known).await?;
                Ok(merge(ops, since, decided, |op, _| unknown_reply(op)))
            })
        }))
    }

    fn refund<'a>(&'a self, refunds: &'a [Refund]) -> StoreFuture<'a, ()> {
        Box::pin(self.guarded(refunds.len(), move |s, _| {
            Box::pin(async move { s.refund(refunds).await })
        }))
    }

    fn absorb<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        ledgers: &'a [Absorb],
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.guarded(ledgers.len(), move |s, _| {
            Box::pin(async move { s.absorb(tag, now, ledgers).await })
        }))
    }

    fn ledger<'a>(&'a self, at: &'a LedgerKey) -> StoreFuture<'a, Option<LedgerView>> {
        Box::pin(self.guarded(1, move |s, _| Box::pin(async move { s.ledger(at).await })))
    }

    fn acquire_state<'a>(
        &'a self,
        now: Nanos,
        ops: &'a [StateOp],
    ) -> StoreFuture<'a, Vec<StateReply>> {
        Box::pin(self.guarded(ops.len(), move |s, outage| {
            Box::pin(async move {
                let replicas = self.inner.replicas;
                if outage.is_none() || replicas == 1 {
                    return acquire_known(&*s, now, ops, outage).await;
                }
                // This replica's part of each limiter; one too small to hold a unit admits
                // nothing here during the outage (and is not escalated: see `unknown`).
                let parts: Vec<Option<StateLimiter>> = ops
                    .iter()
                    .map(|op| own_part(op.limiter, replicas))
                    .collect();
                let held: Vec<StateOp> = ops
                    .iter()
                    .zip(&parts)
                    .filter_map(|(op, part)| {
                        Some(StateOp {
                            limiter: (*part)?,
                            ..op.clone()
                        })
                    })
                    .collect();
                // Too small a part is denied until the breaker may close, not for the span.
                let wait = Nanos::from(lock(&self.inner.breaker).config.cooldown);
                let mut decided = acquire_known(&*s, now, &held, outage).await?.into_iter();
                Ok(ops
                    .iter()
                    .zip(&parts)
                    .map(|(op, part)| match part {
                        Some(_) => decided
                            .next()
                            .unwrap_or_else(|| unknown_state_reply(op, now, wait)),
                        None => unknown_state_reply(op, now, wait),
                    })
                    .collect())
            })
        }))
    }

    fn lease<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [LeaseOp],
    ) -> StoreFuture<'a, Vec<LeaseReply>> {
        Box::pin(self.guarded(ops.len(), move |s, outage| {
            Box::pin(async move {
                let Some(since) = outage else {
                    return s.lease(edge, now, ops).await;
                };
                // In memory: counts are merged (they are cumulative, that loses nothing), but
                // nothing is minted on an op memory cannot decide, and each replica grants
                // from its own part of the bucket (as `acquire_state`), none from a part too
                // small to hold a token.
                let replicas = self.inner.replicas;
                let ops: Vec<LeaseOp> = ops
                    .iter()
                    .map(|op| {
                        let part = match own_part(StateLimiter::TokenBucket(op.limiter), replicas) {
                            Some(StateLimiter::TokenBucket(g)) => Some(g),
                            _ => None,
                        };
                        let minting = part.is_some() && !op.unknown(since);
                        LeaseOp {
                            limiter: part.unwrap_or(op.limiter),
                            want: if minting { op.want } else { 0 },
                            ..op.clone()
                        }
                    })
                    .collect();
                s.lease(edge, now, &ops).await
            })
        }))
    }

    fn refund_state<'a>(&'a self, now: Nanos, refunds: &'a [StateRefund]) -> StoreFuture<'a, ()> {
        Box::pin(self.guarded(refunds.len(), move |s, outage| {
            Box::pin(async move {
                let replicas = self.inner.replicas;
                if outage.is_none() || replicas == 1 {
                    return s.refund_state(now, refunds).await;
                }
                // Taken back from the part it was taken from (`acquire_state`): in the same
                // units, or a refund would give back only a `1/replicas` of its cost.
                let own: Vec<StateRefund> = refunds
                    .iter()
                    .filter_map(|r| {
                        Some(StateRefund {
                            limiter: own_part(r.limiter, replicas)?,
                            ..r.clone()
                        })
                    })
                    .collect();
                s.refund_state(now, &own).await
            })
        }))
    }

    fn absorb_state<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        states: &'a [StateAbsorb],
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.guarded(states.len(), move |s, _| {
            Box::pin(async move { s.absorb_state(tag, now, states).await })
        }))
    }

    // Straight to the primary, whatever the breaker says: memory would answer Ok and forget
    // it (nothing writes it back), and the caller should hear that it was not recorded. Once
    // per push, under the write-back's longer timeout.
    fn save_partitions<'a>(&'a self, held: &'a [HeldShares]) -> StoreFuture<'a, ()> {
        let inner = &self.inner;
        Box::pin(async move {
            tokio::time::timeout(
                inner.write_back_timeout,
                inner.primary.save_partitions(held),
            )
            .await
            .unwrap_or_else(|_| Err(StoreError::Transient("save_partitions timed out".into())))
        })
    }

    fn partitions(&self) -> StoreFuture<'_, Vec<HeldShares>> {
        let inner = &self.inner;
        Box::pin(async move {
            tokio::time::timeout(inner.write_back_timeout, inner.primary.partitions())
                .await
                .unwrap_or_else(|_| Err(StoreError::Transient("partitions timed out".into())))
        })
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
            assert!(!b.failed(now, now));
        }
        b.succeeded(); // a success resets the run
        for i in 0..5 {
            assert_eq!(b.route(now), Route::Primary);
            assert_eq!(b.failed(now, now), i == 4);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.route(now), Route::Fallback);
    }

    #[test]
    fn calls_that_fail_together_count_once() {
        let mut b = breaker();
        let ms = |n: u64| Nanos::from_millis(1_000 + n);
        // A 60 ms stall: twenty calls begun within it all time out 25 ms after they began.
        // The first counts; the others were in flight when it was seen.
        for i in 0..20 {
            assert!(!b.failed(ms(i), ms(i + 25)));
        }
        assert_eq!(b.state(), BreakerState::Closed);
        // A store really away: each attempt begins after the last failed. Four more open it.
        let mut t = 100;
        for i in 0..4 {
            assert_eq!(b.failed(ms(t), ms(t + 25)), i == 3);
            t += 26;
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn one_probe_after_the_cooldown_and_closing_on_success() {
        let mut b = breaker();
        let t = Nanos::from_secs(1);
        for _ in 0..5 {
            b.failed(t, t);
        }
        let later = t + Nanos::from(BreakerConfig::default().cooldown);
        assert_eq!(b.route(later - Nanos(1)), Route::Fallback);
        assert_eq!(b.route(later), Route::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.route(later), Route::Fallback, "one probe at a time");
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
            b.failed(t, t);
        }
        let cooldown = Nanos::from(BreakerConfig::default().cooldown);
        let probe_at = t + cooldown;
        assert_eq!(b.route(probe_at), Route::Probe);
        b.probe_failed(probe_at);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.route(probe_at + cooldown - Nanos(1)), Route::Fallback);
        assert_eq!(b.route(probe_at + cooldown), Route::Probe);
    }
}

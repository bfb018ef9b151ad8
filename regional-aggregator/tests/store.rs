//! The store scenarios, run on every store (memory, a real `redis-server`, a real three-master
//! Redis Cluster), and the Redis scripts held to the `shared` ledger op for op.

use std::{sync::Arc, time::Duration};

use regional_aggregator::store::{
    Absorb, Bounds, ExactOp, LedgerKey, LedgerView, MemoryStore, RedisStore, RedisTopology, Refund,
    Store, SyncOp, SyncReply,
};
use shared::{
    LimitId, Nanos,
    quota::{DEFAULT_THRESHOLD, EdgeId, carry_weight_ppm},
    sim::Rng,
};

use crate::support::redis::{RedisCluster, RedisServer};

const WINDOW: Nanos = Nanos::from_secs(60);

/// `offset` into window `w`.
fn at(w: u64, offset: Nanos) -> Nanos {
    Nanos(w * WINDOW.as_u64()) + offset
}

fn ledger(limit: &str, key: &str, window: u64) -> LedgerKey {
    LedgerKey {
        limit: LimitId::from_name(limit),
        key: key.into(),
        window,
    }
}

fn bounds(partition: u64, edges: u32) -> Bounds {
    Bounds::new(partition, DEFAULT_THRESHOLD, edges, 0)
}

fn expire(window: u64) -> Nanos {
    Nanos((window + 2) * WINDOW.as_u64())
}

fn sync(at: &LedgerKey, used: u64, released: u64, want: u64, bounds: Bounds) -> SyncOp {
    SyncOp {
        at: at.clone(),
        used,
        released,
        want,
        bounds,
        expire_at: expire(at.window),
        exact_since: None,
    }
}

fn exact(at: &LedgerKey, cost: u64, want: u64, bounds: Bounds) -> ExactOp {
    ExactOp {
        at: at.clone(),
        cost,
        want,
        bounds,
        expire_at: expire(at.window),
        exact_since: None,
    }
}

/// `T + G` of a view, the quantity every grant keeps under `θ·P`.
fn reserved(view: &LedgerView) -> u64 {
    view.edges
        .iter()
        .map(|(_, c)| c.holding())
        .fold(view.exact, u64::saturating_add)
}

/// One sync op for edge `edge`, and its answer.
async fn sync_one(store: &dyn Store, edge: u64, now: Nanos, op: SyncOp) -> SyncReply {
    store
        .sync(EdgeId(edge), now, &[op])
        .await
        .expect("the store answers")[0]
}

async fn view(store: &dyn Store, at: &LedgerKey) -> LedgerView {
    store
        .ledger(at)
        .await
        .expect("the store answers")
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Scenarios: each takes a store and uses limit names of its own, so all of them can share one
// Redis or one cluster.

/// Sixteen tasks race on the exact path of one key: exactly `P` pass, never one more.
async fn exact_admits_exactly_the_partition(store: Arc<dyn Store>) {
    let key = ledger("exact-race", "user-1", 0);
    let b = bounds(50, 4);
    let tasks: Vec<_> = (0..16u64)
        .map(|e| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..10 {
                    let op = [exact(&key, 1, 0, b)];
                    let r = store
                        .exact(EdgeId(e), at(0, Nanos::ZERO), &op)
                        .await
                        .expect("the store answers");
                    allowed += u64::from(r[0].allowed);
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("no task panics");
    }
    assert_eq!(allowed, 50, "160 attempts on P = 50");
    let v = view(&*store, &key).await;
    assert_eq!((v.exact, v.total()), (50, 50));
    let last = store
        .exact(EdgeId(0), at(0, Nanos::ZERO), &[exact(&key, 1, 0, b)])
        .await
        .expect("the store answers");
    assert!(!last[0].allowed);
    assert_eq!(last[0].remaining, 0);
    assert!(!last[0].held, "nothing is held by grants");
}

/// A batch applied twice, an older batch arriving late, and a replay change nothing.
async fn sync_is_idempotent(store: Arc<dyn Store>) {
    let key = ledger("idempotent", "user-1", 3);
    let b = bounds(1000, 4);
    let now = at(3, Nanos::from_secs(1));
    let first = sync_one(&*store, 7, now, sync(&key, 5, 0, 20, b)).await;
    assert_eq!((first.used, first.total), (5, 5));
    assert_eq!(first.granted, 25, "ceiling = max(g, r + u) + want");
    let before = view(&*store, &key).await;
    let again = sync_one(&*store, 7, now, sync(&key, 5, 0, 20, b)).await;
    assert_eq!(again, first, "the same batch again mints nothing more");
    let late = sync_one(&*store, 7, now, sync(&key, 3, 0, 20, b)).await;
    assert_eq!(
        (late.used, late.granted),
        (5, 25),
        "an older batch does not lower used"
    );
    assert_eq!(view(&*store, &key).await, before);
}

/// Twenty edges sync concurrently, each using what it was granted and asking for more: the
/// pool never passes `θ·P`, and every edge's view agrees with the store's.
async fn grants_keep_the_pool_under_the_threshold(store: Arc<dyn Store>) {
    let key = ledger("pool", "hot", 0);
    let b = bounds(1000, 20);
    let tasks: Vec<_> = (0..20u64)
        .map(|e| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut used = 0;
                let mut granted = 0;
                for round in 0..200 {
                    // Honest edge: uses what it holds, then reports.
                    used = granted;
                    let r = store
                        .sync(
                            EdgeId(e),
                            at(0, Nanos::from_millis(round)),
                            &[sync(&key, used, 0, 40, b)],
                        )
                        .await
                        .expect("the store answers")[0];
                    assert!(r.granted >= granted, "a ceiling never goes down");
                    assert!(r.reserved <= 800, "T + G = {} > θ·P", r.reserved);
                    granted = r.granted;
                    if r.near_limit {
                        break;
                    }
                }
                used
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("no task panics");
    }
    let v = view(&*store, &key).await;
    assert!(reserved(&v) <= 800, "T + G = {} > θ·P", reserved(&v));
    assert!(v.total() >= 700, "the pool was used, T = {}", v.total());
    assert!(v.near_limit, "usage came within n units of θ·P");
}

/// A refund gives back what the exact path consumed, never below zero.
async fn refund_gives_back_exact_consumption(store: Arc<dyn Store>) {
    let key = ledger("refund", "user-1", 0);
    let b = bounds(10, 1);
    let r = store
        .exact(EdgeId(1), at(0, Nanos::ZERO), &[exact(&key, 4, 0, b)])
        .await
        .expect("the store answers");
    assert!(r[0].allowed);
    assert_eq!(r[0].remaining, 6);
    store
        .refund(&[Refund {
            at: key.clone(),
            cost: 4,
        }])
        .await
        .expect("the store answers");
    assert_eq!(view(&*store, &key).await.exact, 0);
    store
        .refund(&[Refund {
            at: key.clone(),
            cost: 4,
        }])
        .await
        .expect("the store answers");
    assert_eq!(view(&*store, &key).await.exact, 0, "never below zero");
    let r = store
        .exact(EdgeId(1), at(0, Nanos::ZERO), &[exact(&key, 10, 0, b)])
        .await
        .expect("the store answers");
    assert!(r[0].allowed, "the whole partition is back");
}

/// A sliding window counts the previous window's usage, weighted by what is left of it.
async fn sliding_window_carries_the_previous_window(store: Arc<dyn Store>) {
    let prev = ledger("sliding", "user-1", 10);
    let cur = ledger("sliding", "user-1", 11);
    let b = bounds(100, 1);
    store
        .sync(
            EdgeId(1),
            at(10, Nanos::from_secs(30)),
            &[sync(&prev, 40, 0, 0, b)],
        )
        .await
        .expect("the store answers");
    // 15 s into the next window: 3/4 of the previous window still counts, 30 of its 40.
    let now = at(11, Nanos::from_secs(15));
    let weight = carry_weight_ppm(WINDOW, Nanos::from_secs(15));
    assert_eq!(weight, 750_000);
    let carrying = Bounds::new(100, DEFAULT_THRESHOLD, 1, weight);
    let r = store
        .exact(EdgeId(1), now, &[exact(&cur, 70, 0, carrying)])
        .await
        .expect("the store answers");
    assert!(r[0].allowed, "30 carried + 70 = 100 fits");
    assert_eq!(r[0].remaining, 0);
    let r = store
        .exact(EdgeId(1), now, &[exact(&cur, 1, 0, carrying)])
        .await
        .expect("the store answers");
    assert!(!r[0].allowed, "the 101st does not");
    assert_eq!(
        r[0].total, 70,
        "T is this window's usage, without the carry"
    );
    // The same request under a fixed window (no carry) would have passed.
    let fixed = store
        .exact(EdgeId(1), now, &[exact(&cur, 1, 0, b)])
        .await
        .expect("the store answers");
    assert!(fixed[0].allowed);
}

/// Near the limit, grants stop for the rest of the window, and unused grants are recalled
/// when the pool is spent.
async fn near_limit_stops_grants_and_spent_pools_recall(store: Arc<dyn Store>) {
    let key = ledger("near", "user-1", 0);
    let b = bounds(100, 2); // θ·P = 80, at most 40 unused per edge
    let now = at(0, Nanos::ZERO);
    let a = sync_one(&*store, 1, now, sync(&key, 0, 0, 1000, b)).await;
    assert_eq!(a.granted, 40);
    let c = sync_one(&*store, 2, now, sync(&key, 0, 0, 1000, b)).await;
    assert_eq!(c.granted, 20, "(80 − 40) / 2");
    // Edge 2 asks again: the pool holds 60 of 80, its share of the rest is 10.
    let c = sync_one(&*store, 2, now, sync(&key, 0, 0, 1000, b)).await;
    assert_eq!(c.granted, 30);
    // Edge 3 wants a little; the pool has 10 left, edge 1 holds 40 unused and wants 5: recall.
    let one = sync_one(&*store, 1, now, sync(&key, 0, 0, 5, b)).await;
    assert!(!one.recall, "the pool still has 10 left");
    let e3 = sync_one(&*store, 3, now, sync(&key, 0, 0, 10, b)).await;
    assert_eq!(e3.granted, 5, "(80 − 70) / 2");
    let e3 = sync_one(&*store, 3, now, sync(&key, 0, 0, 10, b)).await;
    assert_eq!(e3.granted, 7);
    let e3 = sync_one(&*store, 3, now, sync(&key, 0, 0, 10, b)).await;
    assert_eq!(e3.granted, 8);
    let one = sync_one(&*store, 1, now, sync(&key, 0, 0, 5, b)).await;
    assert!(!one.recall, "2 left under θ·P: still one unit per edge");
    let e3 = sync_one(&*store, 3, now, sync(&key, 0, 0, 10, b)).await;
    assert_eq!(e3.granted, 9);
    let one = sync_one(&*store, 1, now, sync(&key, 0, 0, 5, b)).await;
    assert!(
        one.recall,
        "pool spent and edge 1 holds 40 unused but wants 5"
    );
    assert!(!one.near_limit, "nothing was used");
    // Usage: edge 1 uses 40, edge 2 uses 30, edge 3 uses 9 (79 of 80): near the limit.
    store
        .sync(EdgeId(2), now, &[sync(&key, 30, 0, 0, b)])
        .await
        .expect("the store answers");
    store
        .sync(EdgeId(3), now, &[sync(&key, 9, 0, 0, b)])
        .await
        .expect("the store answers");
    let one = sync_one(&*store, 1, now, sync(&key, 40, 0, 10, b)).await;
    assert!(one.near_limit);
    assert_eq!(one.granted, 40, "no grant near the limit");
    // Sticky: released quota does not reopen grants this window.
    let two = sync_one(&*store, 2, now, sync(&key, 30, 0, 10, b)).await;
    assert!(two.near_limit);
    assert_eq!(two.granted, 30);
    // The exact path still serves up to P: 21 left.
    let r = store
        .exact(EdgeId(2), now, &[exact(&key, 21, 0, b)])
        .await
        .expect("the store answers")[0];
    assert!(r.allowed);
    let r = store
        .exact(EdgeId(2), now, &[exact(&key, 1, 0, b)])
        .await
        .expect("the store answers")[0];
    assert!(!r.allowed);
}

/// One batch that spans many keys (many cluster slots) is answered in order.
async fn a_batch_spans_many_keys(store: Arc<dyn Store>) {
    let b = bounds(1000, 1);
    let ops: Vec<SyncOp> = (0..300u64)
        .map(|i| sync(&ledger("batch", &format!("user-{i}"), 0), i, 0, i + 1, b))
        .collect();
    let replies = store
        .sync(EdgeId(1), at(0, Nanos::ZERO), &ops)
        .await
        .expect("the store answers");
    assert_eq!(replies.len(), 300);
    for (i, r) in (0..300u64).zip(&replies) {
        assert_eq!((r.used, r.total), (i, i), "reply {i} answers op {i}");
        assert_eq!(r.granted, 2 * i + 1);
    }
}

async fn run_scenarios(store: Arc<dyn Store>) {
    exact_admits_exactly_the_partition(store.clone()).await;
    sync_is_idempotent(store.clone()).await;
    grants_keep_the_pool_under_the_threshold(store.clone()).await;
    refund_gives_back_exact_consumption(store.clone()).await;
    sliding_window_carries_the_previous_window(store.clone()).await;
    near_limit_stops_grants_and_spent_pools_recall(store.clone()).await;
    a_batch_spans_many_keys(store).await;
}

// ---------------------------------------------------------------------------------------------
// The Lua scripts against the `shared` ledger: the same random operations on the memory store
// (which runs `KeyLedger` itself) and on Redis, every answer compared.

async fn lua_matches_the_shared_ledger(redis: &dyn Store, seed: u64, ops: usize) {
    let memory = MemoryStore::new();
    let mut rng = Rng::new(seed);
    // Names of this seed's own, so the seeds share a Redis without sharing ledgers.
    let (fixed, sliding) = (format!("spec-{seed}-fixed"), format!("spec-{seed}-sliding"));
    let limits = [(fixed.as_str(), false), (sliding.as_str(), true)];
    let keys = ["a", "b", "{c}", "d:e"];
    // The edges' cumulative counters: (limit, key, window, edge) -> (used, released).
    let mut truth = std::collections::HashMap::new();
    let mut consumed: Vec<(LedgerKey, u64)> = Vec::new();
    for step in 0..ops {
        let window = 1 + (step as u64 * 4 / ops as u64); // four windows over the run
        let offset = Nanos(rng.below(WINDOW.as_u64()));
        let now = at(window, offset);
        let (limit, sliding) = limits[rng.below(2) as usize];
        let key = keys[rng.below(4) as usize];
        let w = if rng.chance(100_000) {
            window - 1
        } else {
            window
        };
        // A ledger expires two windows after its own: memory counts that on the run's clock,
        // Redis as a TTL from `now` in real time. Late in the window after a ledger's own that
        // TTL is down to milliseconds, and on a loaded machine Redis dropped such a ledger
        // before the run compared it (a flaky final comparison): ops on the previous window
        // come in its first half, at least 30 s of real TTL.
        let (offset, now) = if w < window {
            let offset = Nanos(offset.as_u64() / 2);
            (offset, at(window, offset))
        } else {
            (offset, now)
        };
        let at_key = ledger(limit, key, w);
        let partition = if rng.chance(500_000) { 30 } else { 200 };
        let edges = 1 + rng.below(3) as u32;
        let carry = if sliding && w == window {
            carry_weight_ppm(WINDOW, offset)
        } else {
            0
        };
        let b = Bounds::new(partition, DEFAULT_THRESHOLD, edges, carry);
        let edge = EdgeId(rng.below(3));
        let what = rng.below(10);
        if what < 6 {
            let t = truth.entry((at_key.clone(), edge)).or_insert((0u64, 0u64));
            t.0 += rng.below(6);
            if rng.chance(200_000) {
                t.1 += rng.below(10);
            }
            let want = if w == window { rng.below(30) } else { 0 };
            let op = [sync(&at_key, t.0, t.1, want, b)];
            let m = memory
                .sync(edge, now, &op)
                .await
                .expect("the store answers");
            let r = redis.sync(edge, now, &op).await.expect("the store answers");
            assert_eq!(r, m, "seed {seed} step {step}: sync {op:?}");
        } else if what < 9 {
            let op = [exact(&at_key, 1 + rng.below(5), rng.below(20), b)];
            let m = memory
                .exact(edge, now, &op)
                .await
                .expect("the store answers");
            let r = redis
                .exact(edge, now, &op)
                .await
                .expect("the store answers");
            assert_eq!(r, m, "seed {seed} step {step}: exact {op:?}");
            if m[0].allowed {
                consumed.push((at_key, op[0].cost));
            }
        } else if rng.chance(400_000) {
            // Write back a ledger decided elsewhere, under one of two tags, as the breaker
            // does after an outage.
            let view = LedgerView {
                exact: rng.below(20),
                edges: vec![(
                    EdgeId(rng.below(3)),
                    shared::quota::EdgeCounters {
                        granted: rng.below(40),
                        released: rng.below(5),
                        used: rng.below(40),
                    },
                )],
                near_limit: rng.chance(100_000),
            };
            let absorb = [Absorb {
                at: at_key,
                view,
                expire_at: expire(w),
            }];
            let tag = format!("t{}", rng.below(2));
            memory
                .absorb(&tag, now, &absorb)
                .await
                .expect("the store answers");
            redis
                .absorb(&tag, now, &absorb)
                .await
                .expect("the store answers");
        } else if let Some((at_key, cost)) = consumed.pop() {
            let refund = [Refund { at: at_key, cost }];
            memory.refund(&refund).await.expect("the store answers");
            redis.refund(&refund).await.expect("the store answers");
        }
    }
    for (limit, _) in limits {
        for key in keys {
            for w in 0..=5 {
                let at_key = ledger(limit, key, w);
                let m = memory
                    .ledger(&at_key)
                    .await
                    .expect("the store answers")
                    .unwrap_or_default();
                let r = redis
                    .ledger(&at_key)
                    .await
                    .expect("the store answers")
                    .unwrap_or_default();
                assert_eq!(r, m, "seed {seed}: final ledger {at_key:?}");
            }
        }
    }
}

/// Every ledger key in `server` has a TTL (none is kept forever); returns how many there are.
fn every_key_has_a_ttl(server: &RedisServer) -> usize {
    let keys = server.cli(&["--scan", "--pattern", "rl:*"]);
    let mut n = 0;
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let ttl: i64 = server
            .cli(&["PTTL", key])
            .trim()
            .parse()
            .expect("PTTL answers an integer");
        // -2: expired between the scan and now (some test windows end within milliseconds);
        // -1 would be a key without a TTL.
        assert!(ttl > 0 || ttl == -2, "{key} has PTTL {ttl}");
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_scenarios_on_memory() {
    run_scenarios(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_scenarios_and_lua_spec_on_redis() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&RedisTopology::Single(server.url()), Duration::from_secs(2))
        .await
        .expect("the store answers");
    run_scenarios(Arc::new(store.clone())).await;
    for seed in 0..4 {
        lua_matches_the_shared_ledger(&store, seed, 1500).await;
    }
    assert!(every_key_has_a_ttl(&server) > 300);
    // Scripts flushed (a restart, a failover): the next call loads them again by itself.
    server.cli(&["SCRIPT", "FLUSH"]);
    lua_matches_the_shared_ledger(&store, 99, 200).await;
}

/// An exact check does not wait for a sync batch in flight: Redis serves one connection's
/// commands in order, so on a shared connection the check would be answered only after the
/// whole batch (10,000 scripts here, a few hundred milliseconds), past any breaker timeout.
/// Answered on its own connection, it comes back while Redis is still working through the
/// batch: fewer than its 10,000 ledgers exist yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_check_does_not_wait_behind_a_sync_batch() {
    let server = RedisServer::start();
    let store = RedisStore::connect(
        &RedisTopology::Single(server.url()),
        Duration::from_secs(10),
    )
    .await
    .expect("the store answers");
    let now = at(0, Nanos::ZERO);
    let batch: Vec<SyncOp> = (0..10_000)
        .map(|i| {
            sync(
                &ledger("lanes", &format!("k{i}"), 0),
                1,
                0,
                2,
                bounds(100, 2),
            )
        })
        .collect();
    let bulk = store.clone();
    let syncing = tokio::spawn(async move { bulk.sync(EdgeId(1), now, &batch).await });
    let ledgers = || -> u64 {
        let n = server.cli(&["DBSIZE"]);
        n.trim()
            .parse()
            .unwrap_or_else(|_| panic!("DBSIZE answered {n:?}"))
    };
    // Once Redis has begun the batch (its first ledgers exist), check one other key.
    let begun = std::time::Instant::now();
    while ledgers() == 0 {
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "the batch never began"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let check = [exact(&ledger("lanes", "checked", 0), 1, 0, bounds(100, 2))];
    let r = store
        .exact(EdgeId(2), now, &check)
        .await
        .expect("the store answers");
    assert!(r[0].allowed);
    let done = ledgers();
    assert!(
        done < 10_000,
        "the check was answered after the batch: {done} ledgers already"
    );
    let synced = syncing.await.expect("no task panics");
    assert_eq!(synced.expect("the store answers").len(), 10_000);
    assert_eq!(ledgers(), 10_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_scenarios_and_lua_spec_on_a_cluster() {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(
        &RedisTopology::Cluster(cluster.urls()),
        Duration::from_secs(2),
    )
    .await
    .expect("the store answers");
    run_scenarios(Arc::new(store.clone())).await;
    for seed in 0..2 {
        lua_matches_the_shared_ledger(&store, 100 + seed, 1000).await;
    }
    let mut keys = 0;
    for node in cluster.nodes() {
        let here = every_key_has_a_ttl(node);
        assert!(here > 0, "every master holds some of the 300+ ledgers");
        keys += here;
    }
    assert!(keys > 300);
}

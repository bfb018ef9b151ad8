//! The circuit breaker against a real Redis that is killed mid-load and restarted.

use std::{
    num::NonZeroU32,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use regional_aggregator::{
    Regional, RegionalConfig,
    breaker::{BreakerConfig, BreakerState, GuardedStore},
    store::{LedgerKey, RedisStore, RedisTopology, Store},
};
use shared::{
    Clock, ManualClock, Nanos, RuleSet,
    quota::EdgeId,
    wire::{Acquire, Check, SyncBatch, SyncEntry},
};

use crate::support::redis::RedisServer;

const T0: Nanos = Nanos(1_800_000_000_000_000_000);

const RULES: &str = "\
rate_limits:
  endpoints:
    - { id: api, path: /api, limit: 100000, window: 1h, key: user_id, algorithm: fixed_window }
";

/// Exact requests for one key, one at a time, counting what was admitted and the slowest.
struct Load {
    limit: shared::LimitId,
    window: u64,
    request_id: u64,
    admitted: u64,
    /// Requests the regional could not decide (the edge's failure mode decides them).
    failed: u64,
    slowest: Duration,
}

impl Load {
    async fn exact(&mut self, regional: &Regional) {
        self.request_id += 1;
        let request = Acquire {
            request_id: self.request_id,
            checks: vec![Check {
                limit: self.limit,
                key: "u:alice".into(),
                window: self.window,
                cost: NonZeroU32::new(1).expect("1 is not zero"),
                want: 0,
            }],
        };
        let start = Instant::now();
        let reply = regional.acquire(EdgeId(9), &request).await;
        self.slowest = self.slowest.max(start.elapsed());
        match reply {
            Ok(reply) => self.admitted += u64::from(reply.allowed),
            Err(_) => self.failed += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_then_back_counts_everything_once() {
    let mut server = RedisServer::start_durable();
    let clock = ManualClock::new(T0);
    let redis = RedisStore::connect(
        &RedisTopology::Single(server.url()),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    let config = BreakerConfig {
        failures: 5,
        cooldown: Duration::from_secs(60),
        // Generous, so a loaded test machine does not fail calls to a live Redis (the test
        // counts exactly five failures). A dead Redis refuses at once.
        timeout: Duration::from_millis(200),
    };
    let guarded = Arc::new(GuardedStore::new(
        Arc::new(redis.clone()),
        config.clone(),
        Arc::new(clock.clone()),
        "regional-test",
    ));
    let rules = RuleSet::from_yaml("rules.yaml", RULES).unwrap();
    let limit = rules.rule("api").unwrap().limits()[0].id();
    let regional = Regional::new(
        RegionalConfig::default(),
        rules,
        guarded.clone(),
        Arc::new(clock.clone()),
    );
    let window = T0.as_u64() / 3_600_000_000_000;
    let mut load = Load {
        limit,
        window,
        request_id: 0,
        admitted: 0,
        failed: 0,
        slowest: Duration::ZERO,
    };
    let sync = |used: u64| SyncBatch {
        entries: vec![SyncEntry {
            limit,
            key: "u:alice".into(),
            window,
            used,
            released: 0,
            want: 0,
        }],
    };

    // Up: decided in Redis.
    for _ in 0..20 {
        load.exact(&regional).await;
    }
    regional.sync(EdgeId(1), sync(30)).await.unwrap();
    assert_eq!(guarded.state(), BreakerState::Closed);

    // Down: no call waits past the breaker's timeout by much; the first five fail (the edge's
    // failure mode decides those), they open the breaker, and from then on calls are decided
    // in memory without trying Redis at all.
    server.kill();
    for _ in 0..40 {
        load.exact(&regional).await;
    }
    regional.sync(EdgeId(1), sync(55)).await.unwrap();
    regional.sync(EdgeId(2), sync(7)).await.unwrap();
    assert_eq!(guarded.state(), BreakerState::Open);
    assert_eq!(guarded.stats().opened.load(Ordering::Relaxed), 1);
    assert!(
        load.slowest < Duration::from_millis(400),
        "a decision waited {:?} on a dead Redis",
        load.slowest
    );
    assert_eq!(load.failed, 5, "five failures open the breaker");
    assert_eq!(load.admitted, 55, "then decisions continued in memory");

    // Back: after the cooldown the next call (decided in memory) starts a probe in its own
    // task; it reaches Redis, writes memory back, and closes the breaker. (The first probe may
    // meet the connection Redis dropped; a later one succeeds.)
    server.restart();
    'probing: for _ in 0..5 {
        clock.advance(Nanos::from_secs(61));
        load.exact(&regional).await;
        for _ in 0..100 {
            match guarded.state() {
                BreakerState::Closed => break 'probing,
                BreakerState::Open => break,
                BreakerState::HalfOpen => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    assert_eq!(guarded.state(), BreakerState::Closed);
    for _ in 0..10 {
        load.exact(&regional).await;
    }
    // Redis now holds everything admitted: the exact path before, during and after the
    // outage, and both edges' counts (edge 1's larger count from the outage, edge 2's only
    // seen in memory). Nothing lost, nothing twice.
    let at = LedgerKey {
        limit,
        key: "u:alice".into(),
        window,
    };
    let view = redis.ledger(&at).await.unwrap().unwrap();
    assert_eq!(
        view.exact, load.admitted,
        "exact admissions, each counted once"
    );
    assert_eq!(view.total(), load.admitted + 55 + 7);
    assert!(guarded.stats().written_back.load(Ordering::Relaxed) >= 1);

    // Writing the same outage back again changes nothing (idempotent by max).
    let before = view.clone();
    let again = regional_aggregator::store::Absorb {
        at: at.clone(),
        view: before.clone(),
        expire_at: clock.now() + Nanos::from_secs(3600),
    };
    redis
        .absorb(
            "regional-test-replayed",
            clock.now(),
            std::slice::from_ref(&again),
        )
        .await
        .unwrap();
    redis
        .absorb(
            "regional-test-replayed",
            clock.now(),
            std::slice::from_ref(&again),
        )
        .await
        .unwrap();
    let after = redis.ledger(&at).await.unwrap().unwrap();
    assert_eq!(
        after.exact,
        before.exact * 2,
        "a second tag counts once, however often it is written"
    );
    assert_eq!(after.edges, before.edges);
}

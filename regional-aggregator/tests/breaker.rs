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

/// A regional over Redis at `server` behind a breaker of `config`, on `clock`, enforcing
/// `rules`; and the breaker and the bare Redis store, to look at.
async fn guarded_regional(
    server: &RedisServer,
    config: BreakerConfig,
    clock: &ManualClock,
    rules: RuleSet,
) -> (Regional, Arc<GuardedStore>, RedisStore) {
    let redis = RedisStore::connect(
        &RedisTopology::Single(server.url()),
        Duration::from_millis(200),
    )
    .await
    .expect("the test Redis is up");
    let guarded = Arc::new(GuardedStore::new(
        Arc::new(redis.clone()),
        config,
        Arc::new(clock.clone()),
        "regional-test",
    ));
    let regional = Regional::new(
        RegionalConfig::default(),
        rules,
        guarded.clone(),
        Arc::new(clock.clone()),
    );
    (regional, guarded, redis)
}

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
        ..BreakerConfig::default()
    };
    let guarded = Arc::new(GuardedStore::new(
        Arc::new(redis.clone()),
        config.clone(),
        Arc::new(clock.clone()),
        "regional-test",
    ));
    let rules = RuleSet::from_yaml("rules.yaml", RULES).unwrap();
    let limit = rules.rule("api").unwrap().limits()[0].id();
    let regional = Arc::new(Regional::new(
        RegionalConfig::default(),
        rules,
        guarded.clone(),
        Arc::new(clock.clone()),
    ));
    // What an operator's dashboard reads: the breaker's state and counters at /metrics.
    let registry = regional_aggregator::metrics::registry(
        regional.clone(),
        Some((*guarded).clone()),
        Arc::default(),
        None,
    );
    let scrape = || {
        let text = shared::metrics::render(&registry);
        system_tests::metrics::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
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
    // Many keys seen only in memory: more than one write-back chunk's worth.
    const MANY: usize = regional_aggregator::breaker::WRITE_BACK_CHUNK * 2 + 88;
    let many = SyncBatch {
        entries: (0..MANY)
            .map(|i| SyncEntry {
                limit,
                key: format!("u:{i}"),
                window,
                used: 1,
                released: 0,
                want: 0,
            })
            .collect(),
    };
    regional.sync(EdgeId(3), many).await.unwrap();
    assert_eq!(guarded.state(), BreakerState::Open);
    assert_eq!(guarded.stats().opened.load(Ordering::Relaxed), 1);
    let m = scrape();
    assert_eq!(m.get("regional_breaker_state", &[]), 1.0, "open");
    assert_eq!(m.get("regional_breaker_opened_total", &[]), 1.0);
    assert!(m.get("regional_breaker_fallback_calls_total", &[]) >= 35.0);
    assert_eq!(m.get("regional_store_errors_total", &[]), 5.0);
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
    let m = scrape();
    assert_eq!(m.get("regional_breaker_state", &[]), 0.0, "closed again");
    assert!(m.get("regional_breaker_written_back_total", &[]) >= 1.0);
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
    assert!(guarded.stats().written_back.load(Ordering::Relaxed) > MANY as u64);
    for i in [0, MANY / 2, MANY - 1] {
        let at = LedgerKey {
            limit,
            key: format!("u:{i}"),
            window,
        };
        let view = redis.ledger(&at).await.unwrap().unwrap();
        assert_eq!(view.total(), 1, "u:{i}, written back in its chunk");
    }

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

/// A token bucket and a sliding log used in Redis, then more in memory while Redis is down:
/// after recovery Redis holds the bucket's fuller side (memory's) and the union of the two
/// logs, so neither key admits what it would have without the write-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_states_decided_in_memory_are_written_back() {
    const STATE_RULES: &str = "\
rate_limits:
  endpoints:
    - { id: tb, path: /t, algorithm: token_bucket, rate: 10/h, burst: 10, key: user_id }
    - { id: log, path: /l, algorithm: sliding_log, limit: 10, window: 1h, key: user_id }
";
    let mut server = RedisServer::start_durable();
    let clock = ManualClock::new(T0);
    let config = BreakerConfig {
        failures: 1,
        cooldown: Duration::from_secs(60),
        timeout: Duration::from_millis(200),
        ..BreakerConfig::default()
    };
    let rules = RuleSet::from_yaml("rules.yaml", STATE_RULES).unwrap();
    let [tb, log] = ["tb", "log"].map(|id| rules.rule(id).unwrap().limits()[0].id());
    let (regional, guarded, _) = guarded_regional(&server, config, &clock, rules).await;
    let request_id = std::sync::atomic::AtomicU64::new(0);
    // `times` requests of cost 2 on `limit` for `key`: how many were admitted.
    let admit = async |limit, key: &str, times| {
        let mut admitted = 0;
        for _ in 0..times {
            let request = Acquire {
                request_id: request_id.fetch_add(1, Ordering::Relaxed),
                checks: vec![Check {
                    limit,
                    key: key.into(),
                    window: 0,
                    cost: NonZeroU32::new(2).unwrap(),
                    want: 0,
                }],
            };
            if let Ok(reply) = regional.acquire(EdgeId(9), &request).await {
                admitted += u32::from(reply.allowed);
            }
        }
        admitted
    };

    // 2 of 10 used on each key in Redis.
    assert_eq!(
        (
            admit(tb, "u:alice", 1).await,
            admit(log, "u:alice", 1).await
        ),
        (1, 1)
    );
    // Redis dies: the next call fails and opens the breaker; 6 more of each in memory (which
    // starts from fresh: it cannot know Redis's 2).
    server.kill();
    assert_eq!(admit(tb, "u:alice", 1).await, 0);
    assert_eq!(guarded.state(), BreakerState::Open);
    assert_eq!(
        (
            admit(tb, "u:alice", 3).await,
            admit(log, "u:alice", 3).await
        ),
        (3, 3)
    );

    // Back, a minute or so later (nothing here refills by a unit in less than 6 minutes): a
    // call on another key starts the probe, which writes memory back.
    server.restart();
    'probing: for _ in 0..5 {
        clock.advance(Nanos::from_secs(61));
        admit(tb, "u:probe", 1).await;
        for _ in 0..100 {
            match guarded.state() {
                BreakerState::Closed => break 'probing,
                BreakerState::Open => break,
                BreakerState::HalfOpen => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    assert_eq!(guarded.state(), BreakerState::Closed);
    // The bucket: the fuller side, 6 used, so 4 left: two requests of 2. The log: both
    // sides' entries, 8 used, so 2 left: one request. (Without the write-back, Redis's 2 used
    // on each would let all three through.)
    assert_eq!(
        admit(tb, "u:alice", 3).await,
        2,
        "token bucket after the write-back"
    );
    assert_eq!(
        admit(log, "u:alice", 3).await,
        1,
        "sliding log after the write-back"
    );
}

/// Counts escalations and grants none.
#[derive(Default)]
struct CountEscalations(std::sync::atomic::AtomicU64);

impl regional_aggregator::Escalation for CountEscalations {
    fn request(
        &self,
        _limit: shared::LimitId,
        _key: &str,
        _window: u64,
        _wanted: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send + '_>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(std::future::ready(0))
    }
}

/// Rules whose failure mode is `closed` are never decided on a partial count: while Redis is
/// down, memory denies what reaches back before the outage (a window that began earlier, a
/// sliding window's previous one, a bucket's span), mints no grant on it, and decides exactly
/// once the window or span lies inside the outage. A `local` rule beside them decides in
/// memory at once, as before (admitting on top of what Redis counted: the documented price).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_rules_are_not_decided_on_what_memory_cannot_know() {
    const CLOSED_RULES: &str = "\
rate_limits:
  endpoints:
    - { id: fixed, path: /f, limit: 10, window: 1m, key: user_id, algorithm: fixed_window, strictness: hard, on_failure: closed }
    - { id: slide, path: /s, limit: 10, window: 1m, key: user_id, algorithm: sliding_window, strictness: hard, on_failure: closed }
    - { id: tb, path: /t, algorithm: token_bucket, rate: 30/m, burst: 10, key: user_id, on_failure: closed }
    - { id: loose, path: /l, limit: 10, window: 1m, key: user_id, algorithm: fixed_window }
";
    let mut server = RedisServer::start_durable();
    // T0 is a minute boundary; the test starts 10 s into that minute.
    let clock = ManualClock::new(T0 + Nanos::from_secs(10));
    let config = BreakerConfig {
        failures: 1,
        // Longer than the test's clock moves: no probe, Redis stays away throughout.
        cooldown: Duration::from_secs(3600),
        timeout: Duration::from_millis(200),
        ..BreakerConfig::default()
    };
    let rules = RuleSet::from_yaml("rules.yaml", CLOSED_RULES).unwrap();
    let [fixed, slide, tb, loose] =
        ["fixed", "slide", "tb", "loose"].map(|id| rules.rule(id).unwrap().limits()[0].id());
    let (regional, guarded, _) = guarded_regional(&server, config, &clock, rules).await;
    let minute = 60_000_000_000;
    let request_id = std::sync::atomic::AtomicU64::new(0);
    // `times` requests of cost 1 on `limit` for alice: how many were admitted, and the last
    // answer's check.
    let admit = async |limit, times| {
        let mut admitted = 0;
        let mut last = None;
        for _ in 0..times {
            let request = Acquire {
                request_id: request_id.fetch_add(1, Ordering::Relaxed),
                checks: vec![Check {
                    limit,
                    key: "u:alice".into(),
                    window: clock.now().as_u64() / minute,
                    cost: NonZeroU32::new(1).unwrap(),
                    want: 0,
                }],
            };
            if let Ok(reply) = regional.acquire(EdgeId(9), &request).await {
                admitted += u32::from(reply.allowed);
                last = reply.checks.first().cloned();
            }
        }
        (admitted, last)
    };

    // A sync of `key` on the fixed limit asking for a grant of 5 in the current window.
    let grant = async |key: &str| {
        let batch = SyncBatch {
            entries: vec![SyncEntry {
                limit: fixed,
                key: key.into(),
                window: clock.now().as_u64() / minute,
                used: 0,
                released: 0,
                want: 5,
            }],
        };
        regional.sync(EdgeId(1), batch).await.unwrap()
    };

    // Up: 3 of each admitted in Redis.
    for limit in [fixed, slide, tb, loose] {
        assert_eq!(admit(limit, 3).await.0, 3);
    }
    // Down: the next call fails and opens the breaker (the outage begins 10 s in).
    server.kill();
    assert_eq!(admit(loose, 1).await.0, 0);
    assert_eq!(guarded.state(), BreakerState::Open);
    // From here on, count what would be escalated to a coordinator: a denial memory cannot
    // decide is not (another region's quota or tokens would not make the count known).
    let escalations = Arc::new(CountEscalations::default());
    // A budget a loaded machine cannot starve: the count below is of asks made.
    regional.set_escalation(escalations.clone(), Duration::from_secs(2));

    // 20 s in, the same window: memory cannot know Redis's 3, so the closed rules deny,
    // held (the edge asks again within the hold, not at the window's end); the local rule
    // decides on memory's fresh count.
    clock.advance(Nanos::from_secs(10));
    let now = clock.now();
    for limit in [fixed, slide] {
        let (admitted, last) = admit(limit, 5).await;
        assert_eq!(
            admitted, 0,
            "a closed window rule in the outage's first window"
        );
        let check = last.expect("answered");
        assert!(!check.allowed);
        assert!(
            check.reset_at <= now + RegionalConfig::default().hold,
            "held, not cached to the window's end: {:?}",
            check.reset_at
        );
    }
    let (admitted, last) = admit(tb, 5).await;
    assert_eq!(
        admitted, 0,
        "a closed token bucket within a refill of the outage"
    );
    // Counted before a bucket's ask leaves on its own task.
    assert_eq!(
        (
            escalations.0.load(Ordering::Relaxed),
            regional.stats().escalations.load(Ordering::Relaxed)
        ),
        (0, 0),
        "undecidable denials escalated"
    );
    // It is decidable once its 20 s refill span lies inside the outage: 10 s + 20 s in.
    assert_eq!(
        last.expect("answered").reset_at,
        T0 + Nanos::from_secs(30),
        "the bucket reopens when its span lies inside the outage"
    );
    assert_eq!(
        admit(loose, 12).await.0,
        10,
        "a local rule decides in memory"
    );
    assert!(
        escalations.0.load(Ordering::Relaxed) > 0,
        "its real denials are escalated"
    );
    // No grant is minted on what memory cannot count.
    let ack = grant("u:alice").await;
    assert_eq!(
        ack.entries[0].granted, 0,
        "no grant for the outage's first window"
    );

    // 30 s in: the bucket's span lies inside the outage, and memory decides it exactly.
    clock.advance(Nanos::from_secs(10));
    assert_eq!(admit(tb, 12).await.0, 10, "the whole burst, exactly");

    // The next minute began inside the outage: the fixed window is decided exactly in
    // memory; the sliding window still weighs the previous minute in, which memory does not
    // know all of.
    clock.advance(Nanos::from_secs(31));
    assert_eq!(
        admit(fixed, 12).await.0,
        10,
        "exact in a window inside the outage"
    );
    assert_eq!(
        admit(slide, 3).await.0,
        0,
        "the previous minute is not all known"
    );
    let ack = grant("u:bob").await;
    assert!(
        ack.entries[0].granted > 0,
        "grants again once the window is known"
    );

    // The minute after: both minutes it weighs lie inside the outage.
    clock.advance(Nanos::from_secs(60));
    assert_eq!(
        admit(slide, 12).await.0,
        10,
        "exact once both minutes are known"
    );
    assert_eq!(
        guarded.state(),
        BreakerState::Open,
        "Redis stayed away throughout"
    );
}

/// Replicas of one region share its Redis, and during an outage each decides in its own
/// memory: each takes `1/replicas` of the region's partition (a window's `P`, a bucket's
/// capacity and rate), so together they stay within it. One replica of two, Redis down: a
/// limit of 10 admits 5 there, a bucket of 10 gives 5; a lone regional keeps all 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_an_outage_each_replica_decides_with_its_part_of_the_partition() {
    const SPLIT_RULES: &str = "\
rate_limits:
  endpoints:
    - { id: fixed, path: /f, limit: 10, window: 1m, key: user_id, algorithm: fixed_window }
    - { id: tb, path: /t, algorithm: token_bucket, rate: 30/m, burst: 10, key: user_id }
";
    for (replicas, expected) in [(2, 5), (1, 10)] {
        let mut server = RedisServer::start();
        let clock = ManualClock::new(T0 + Nanos::from_secs(10));
        let config = BreakerConfig {
            failures: 1,
            // No probe during the test: Redis stays away throughout.
            cooldown: Duration::from_secs(3600),
            timeout: Duration::from_millis(200),
            replicas,
        };
        let rules = RuleSet::from_yaml("rules.yaml", SPLIT_RULES).expect("the rules parse");
        let [fixed, tb] =
            ["fixed", "tb"].map(|id| rules.rule(id).expect("a rule").limits()[0].id());
        let (regional, guarded, _) = guarded_regional(&server, config, &clock, rules).await;
        let request_id = std::sync::atomic::AtomicU64::new(0);
        let admit = async |limits: &[shared::LimitId], key: &str, times| {
            let mut admitted = 0;
            for _ in 0..times {
                let request = Acquire {
                    request_id: request_id.fetch_add(1, Ordering::Relaxed),
                    checks: limits
                        .iter()
                        .map(|&limit| Check {
                            limit,
                            key: key.into(),
                            window: clock.now().as_u64() / 60_000_000_000,
                            cost: NonZeroU32::MIN,
                            want: 0,
                        })
                        .collect(),
                };
                if let Ok(reply) = regional.acquire(EdgeId(9), &request).await {
                    admitted += u32::from(reply.allowed);
                }
            }
            admitted
        };
        server.kill();
        // The first call fails and opens the breaker.
        assert_eq!(admit(&[fixed], "u:opener", 1).await, 0);
        assert_eq!(guarded.state(), BreakerState::Open);
        assert_eq!(
            admit(&[fixed], "u:alice", 12).await,
            expected,
            "a window limit of 10 with {replicas} replica(s)"
        );
        // The window is spent: these take a token each and give it back whole.
        assert_eq!(admit(&[tb, fixed], "u:alice", 4).await, 0);
        assert_eq!(
            admit(&[tb], "u:alice", 12).await,
            expected,
            "a bucket of 10 with {replicas} replica(s), after four refunds"
        );
    }
}

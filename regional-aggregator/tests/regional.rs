//! The regional's decisions on a real Redis, called in process (the QUIC path is tested in
//! its own module): all-or-nothing across limits, resent requests, clock skew, and edge agents
//! that never pass a hard limit together.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use edge_agent::{Agent, AgentConfig, Request, Upstream, UpstreamError, UpstreamFuture};
use regional_aggregator::{
    Regional, RegionalConfig,
    store::{LedgerKey, MemoryStore, RedisStore, RedisTopology, Store},
};
use shared::{
    Clock, ManualClock, Nanos, RuleSet,
    quota::EdgeId,
    sim::Rng,
    wire::{Acquire, AcquireReply, Check, SyncAck, SyncBatch, SyncEntry},
};

use crate::support::redis::RedisServer;

/// A round minute: windows start here.
const T0: Nanos = Nanos(1_800_000_000_000_000_000);

const RULES: &str = "\
rate_limits:
  endpoints:
    - { id: login, path: /login, limit: 100, window: 1m, key: user_id, strictness: hard }
    - { id: a, path: /a, limit: 10, window: 1m, key: user_id }
    - { id: b, path: /b, limit: 2, window: 1m, key: user_id }
    - { id: c, path: /c, limit: 10, window: 1m, key: user_id, algorithm: fixed_window }
    - { id: tb, path: /t, algorithm: token_bucket, rate: 2/m, burst: 2, key: user_id }
    - { id: shaper, path: /s, algorithm: leaky_bucket, mode: shaper, rate: 1/s, burst: 2 }
    - { id: log, path: /l, algorithm: sliding_log, limit: 2, window: 1m, key: user_id }
    - { id: slow, path: /slow, algorithm: token_bucket, rate: 1/60d, burst: 1, key: user_id }
";

pub(crate) fn rules() -> RuleSet {
    RuleSet::from_yaml("rules.yaml", RULES).expect("the test rules parse")
}

async fn redis_store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&RedisTopology::Single(server.url()), Duration::from_secs(2))
        .await
        .expect("the test Redis is up")
}

/// Both stores, for a test that must hold on each.
async fn memory_and_redis(server: &RedisServer) -> [Arc<dyn Store>; 2] {
    [
        Arc::new(MemoryStore::new()),
        Arc::new(redis_store(server).await),
    ]
}

async fn redis_regional(server: &RedisServer, clock: &ManualClock) -> Arc<Regional> {
    Arc::new(Regional::new(
        RegionalConfig::default(),
        rules(),
        Arc::new(redis_store(server).await),
        Arc::new(clock.clone()),
    ))
}

/// `n` agents on `regional`, in process, telling time by `clock`; `incarnation` tells one
/// set's edges from another's.
fn agents(
    regional: &Arc<Regional>,
    clock: &ManualClock,
    n: usize,
    incarnation: u64,
) -> Vec<Arc<Agent>> {
    (0..n)
        .map(|e| {
            regional.edge_connected();
            let link = Arc::new(Direct {
                regional: regional.clone(),
                edge: EdgeId::of(&format!("edge-{e}"), incarnation),
            });
            Arc::new(
                Agent::builder(AgentConfig::default(), rules(), link)
                    .clock(Arc::new(clock.clone()))
                    .build()
                    .expect("a test runs on a tokio runtime"),
            )
        })
        .collect()
}

fn regional_on(store: Arc<dyn Store>, clock: &ManualClock) -> Regional {
    Regional::new(
        RegionalConfig::default(),
        rules(),
        store,
        Arc::new(clock.clone()),
    )
}

fn limit(rules: &RuleSet, id: &str) -> shared::LimitId {
    rules.rule(id).expect("the rule exists").limits()[0].id()
}

fn check(rules: &RuleSet, id: &str, cost: u32) -> Check {
    Check {
        limit: limit(rules, id),
        key: "u:alice".into(),
        window: T0.as_u64() / 60_000_000_000,
        cost: NonZeroU32::new(cost).expect("a test cost is not zero"),
        want: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_consumes_from_all_its_limits_or_none() {
    let server = RedisServer::start();
    let clock = ManualClock::new(T0);
    let regional = redis_regional(&server, &clock).await;
    let rules = regional.rules();
    // 3 fits limit a (10) but not limit b (2): denied, and a is refunded.
    let request = Acquire {
        request_id: 1,
        checks: vec![check(&rules, "a", 3), check(&rules, "b", 3)],
    };
    let reply = regional.acquire(EdgeId(1), &request).await.unwrap();
    assert!(!reply.allowed);
    assert!(reply.checks[0].allowed && !reply.checks[1].allowed);
    assert_eq!(
        reply.retry_after,
        Nanos::from_secs(60),
        "b reopens with the next window"
    );
    let a = LedgerKey {
        limit: limit(&rules, "a"),
        key: "u:alice".into(),
        window: request.checks[0].window,
    };
    let view = regional
        .store()
        .ledger(&a)
        .await
        .unwrap()
        .unwrap_or_default();
    assert_eq!(view.exact, 0, "what limit a consumed was given back");
    // Within both limits: consumed from both.
    let request = Acquire {
        request_id: 2,
        checks: vec![check(&rules, "a", 2), check(&rules, "b", 2)],
    };
    let reply = regional.acquire(EdgeId(1), &request).await.unwrap();
    assert!(reply.allowed);
    assert_eq!(reply.checks[0].remaining, 8);
    assert_eq!(reply.checks[1].remaining, 0);
    let view = regional
        .store()
        .ledger(&a)
        .await
        .unwrap()
        .unwrap_or_default();
    assert_eq!(view.exact, 2);
}

/// What limit `id` consumed from `key`'s ledger in the current window.
async fn exact_used(regional: &Regional, id: &str, key: &str) -> u64 {
    let at = LedgerKey {
        limit: limit(&regional.rules(), id),
        key: key.into(),
        window: T0.as_u64() / 60_000_000_000,
    };
    let view = regional
        .store()
        .ledger(&at)
        .await
        .expect("the store answers");
    view.unwrap_or_default().exact
}

fn acquire(request_id: u64, checks: Vec<Check>) -> Acquire {
    Acquire { request_id, checks }
}

fn for_key(mut check: Check, key: &str) -> Check {
    check.key = key.into();
    check
}

/// A request on a window limit and a token bucket: when the bucket denies, the window's
/// ledger keeps nothing of it; when the window denies, the bucket keeps nothing of it. On
/// memory and on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_and_a_token_bucket_consume_together_or_not_at_all() {
    let server = RedisServer::start();
    let stores = memory_and_redis(&server).await;
    for store in stores {
        let clock = ManualClock::new(T0);
        let regional = regional_on(store, &clock);
        let rules = regional.rules();
        let (a, b, tb) = (
            check(&rules, "a", 3),
            check(&rules, "b", 3),
            check(&rules, "tb", 2),
        );

        // The bucket denies (emptied first): limit a keeps nothing of the request.
        assert!(
            regional
                .acquire(EdgeId(1), &acquire(1, vec![tb.clone()]))
                .await
                .unwrap()
                .allowed
        );
        let one = Check {
            cost: NonZeroU32::MIN,
            ..tb.clone()
        };
        let reply = regional
            .acquire(EdgeId(1), &acquire(2, vec![a.clone(), one]))
            .await
            .unwrap();
        assert!(!reply.allowed);
        assert!(reply.checks[0].allowed && !reply.checks[1].allowed);
        // 2 per minute: the next token is back in 30 s, and that is when the edge may retry.
        assert_eq!(reply.checks[1].reset_at, T0 + Nanos::from_secs(30));
        assert_eq!(reply.retry_after, Nanos::from_secs(30));
        assert_eq!(
            exact_used(&regional, "a", "u:alice").await,
            0,
            "a was given back"
        );

        // The window denies (b is 2 per minute): bob's bucket keeps nothing of the request,
        // so his whole burst is still there, and no more.
        let reply = regional
            .acquire(
                EdgeId(1),
                &acquire(
                    3,
                    vec![for_key(b.clone(), "u:bob"), for_key(tb.clone(), "u:bob")],
                ),
            )
            .await
            .unwrap();
        assert!(!reply.allowed);
        assert!(!reply.checks[0].allowed && reply.checks[1].allowed);
        let reply = regional
            .acquire(EdgeId(1), &acquire(4, vec![for_key(tb.clone(), "u:bob")]))
            .await
            .unwrap();
        assert!(reply.allowed, "bob's burst of 2 is whole");
        assert_eq!(reply.checks[0].remaining, 0);
        assert_eq!(reply.checks[0].granted, 0, "no grants for bucket keys");
        assert_eq!(
            reply.reset_at,
            T0 + Nanos::from_secs(60),
            "full again in a minute"
        );
        let one_more = for_key(
            Check {
                cost: NonZeroU32::MIN,
                ..tb.clone()
            },
            "u:bob",
        );
        assert!(
            !regional
                .acquire(EdgeId(1), &acquire(5, vec![one_more]))
                .await
                .unwrap()
                .allowed
        );

        // Both allow: both consume.
        let carol = |c: &Check, cost| {
            for_key(
                Check {
                    cost: NonZeroU32::new(cost).unwrap(),
                    ..c.clone()
                },
                "u:carol",
            )
        };
        let reply = regional
            .acquire(EdgeId(1), &acquire(6, vec![carol(&a, 4), carol(&tb, 1)]))
            .await
            .unwrap();
        assert!(reply.allowed);
        assert_eq!(exact_used(&regional, "a", "u:carol").await, 4);
        assert_eq!(reply.checks[1].remaining, 1);
    }
}

/// What the edge learns from a limiter's check: a shaper's delay is allowed; a denial says
/// when the cost fits again; a cost above the capacity reopens at once; a log denies the third
/// of two per minute; a bucket whose refill takes longer than a store keeps exactly is denied
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_checks_tell_the_edge_what_it_may_do() {
    let clock = ManualClock::new(T0);
    let regional = regional_on(Arc::new(MemoryStore::new()), &clock);
    let rules = regional.rules();
    let shaper = |id| acquire(id, vec![check(&rules, "shaper", 1)]);
    let first = regional.acquire(EdgeId(1), &shaper(1)).await.unwrap();
    let queued = regional.acquire(EdgeId(1), &shaper(2)).await.unwrap();
    assert!(
        first.allowed && queued.allowed,
        "the second goes after 1 s: allowed"
    );
    assert_eq!(queued.checks[0].remaining, 0);
    assert_eq!(
        queued.reset_at,
        T0 + Nanos::from_secs(2),
        "the bucket is empty then"
    );
    let full = regional.acquire(EdgeId(1), &shaper(3)).await.unwrap();
    assert!(!full.allowed);
    assert_eq!(full.retry_after, Nanos::from_secs(1));

    let too_big = acquire(4, vec![check(&rules, "tb", 3)]);
    let reply = regional.acquire(EdgeId(1), &too_big).await.unwrap();
    assert!(!reply.allowed);
    assert_eq!(
        reply.retry_after,
        Nanos::ZERO,
        "no wait helps a cost of 3 on a burst of 2"
    );
    assert!(
        regional
            .acquire(EdgeId(1), &acquire(5, vec![check(&rules, "tb", 2)]))
            .await
            .unwrap()
            .allowed
    );

    for id in 6..8 {
        clock.advance(Nanos::from_secs(1));
        let reply = regional
            .acquire(EdgeId(1), &acquire(id, vec![check(&rules, "log", 1)]))
            .await
            .unwrap();
        assert!(reply.allowed);
    }
    let third = regional
        .acquire(EdgeId(1), &acquire(8, vec![check(&rules, "log", 1)]))
        .await
        .unwrap();
    assert!(!third.allowed);
    assert_eq!(
        third.retry_after,
        Nanos::from_secs(59),
        "the first entry leaves at T0 + 61 s"
    );

    let slow = regional
        .acquire(EdgeId(1), &acquire(9, vec![check(&rules, "slow", 1)]))
        .await
        .unwrap();
    assert!(!slow.allowed);
    assert_eq!(
        regional
            .stats()
            .unsupported
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_exact_request_is_answered_once() {
    let server = RedisServer::start();
    let clock = ManualClock::new(T0);
    let regional = redis_regional(&server, &clock).await;
    let rules = regional.rules();
    let request = Acquire {
        request_id: 7,
        checks: vec![check(&rules, "c", 4)],
    };
    let first = regional.acquire(EdgeId(1), &request).await.unwrap();
    let again = regional.acquire(EdgeId(1), &request).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        regional
            .stats()
            .replayed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Another edge's request 7 is another request.
    let other = regional.acquire(EdgeId(2), &request).await.unwrap();
    assert_eq!(other.checks[0].remaining, 2, "10 − 4 − 4");
    // Past the replay window (here also the next minute) the id is a new request.
    clock.advance(Nanos::from_secs(60));
    let later = regional.acquire(EdgeId(1), &request).await.unwrap();
    assert!(later.allowed);
    assert_eq!(later.checks[0].remaining, 6, "a fresh window: 10 − 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_for_a_window_two_behind_are_refused_as_skew() {
    let server = RedisServer::start();
    let clock = ManualClock::new(T0 + Nanos::from_secs(120));
    let regional = redis_regional(&server, &clock).await;
    let rules = regional.rules();
    let entry = |window| SyncEntry {
        limit: limit(&rules, "a"),
        key: "u:alice".into(),
        window,
        used: 3,
        released: 0,
        want: 5,
    };
    let current = clock.now().as_u64() / 60_000_000_000;
    let batch = SyncBatch {
        entries: vec![
            entry(current - 2),
            entry(current - 1),
            entry(current),
            entry(current + 1),
        ],
    };
    let ack = regional.sync(EdgeId(1), batch).await.unwrap();
    let windows: Vec<u64> = ack.entries.iter().map(|e| e.window).collect();
    assert_eq!(windows, vec![current - 1, current]);
    assert_eq!(ack.entries[0].granted, 0, "no grant for a past window");
    // Limit a is a sliding window, and at the window's first instant the previous window's
    // 3 count in full: the pool has θ·P − T − carried = 8 − 3 − 3 = 2 left for the grant.
    assert_eq!(ack.entries[1].granted, 3 + 2);
    assert_eq!(
        regional
            .stats()
            .skewed
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

/// An edge's link to the regional, in process.
struct Direct {
    regional: Arc<Regional>,
    edge: EdgeId,
}

impl Upstream for Direct {
    fn sync(&self, batch: SyncBatch) -> UpstreamFuture<SyncAck> {
        let (regional, edge) = (self.regional.clone(), self.edge);
        Box::pin(async move {
            regional
                .sync(edge, batch)
                .await
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))
        })
    }

    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply> {
        let (regional, edge) = (self.regional.clone(), self.edge);
        Box::pin(async move {
            regional
                .acquire(edge, &request)
                .await
                .map_err(|e| UpstreamError::Unreachable(e.to_string()))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_on_redis_never_pass_a_hard_limit() {
    let server = RedisServer::start();
    let rules = rules();
    for seed in 0..5 {
        let clock = ManualClock::new(T0 + Nanos::from_secs(3600 * seed));
        let regional = redis_regional(&server, &clock).await;
        let agents = agents(&regional, &clock, 3, seed);
        // Three threads per round, one per edge, then a flush: concurrent decisions on one
        // hard key, 300 attempts on a limit of 100.
        let mut rng = Rng::new(seed);
        let mut admitted = 0;
        for _ in 0..20 {
            let burst: Vec<usize> = (0..3).map(|_| 1 + rng.below(8) as usize).collect();
            let handles: Vec<_> = agents
                .iter()
                .zip(burst)
                .map(|(a, n)| {
                    let a = a.clone();
                    std::thread::spawn(move || {
                        (0..n)
                            .filter(|_| {
                                let request = Request {
                                    user_id: Some("alice"),
                                    ..Request::new("POST", "/login")
                                };
                                a.check(&request).allowed
                            })
                            .count()
                    })
                })
                .collect();
            for h in handles {
                admitted += h.join().unwrap();
            }
            for a in &agents {
                let _ = a.flush().await;
            }
            clock.advance(Nanos::from_millis(100));
        }
        // Everyone's counts are in: the store's T is what the agents admitted.
        for a in &agents {
            a.flush().await.unwrap();
        }
        let at = LedgerKey {
            limit: limit(&rules, "login"),
            key: "u:alice".into(),
            window: clock.now().as_u64() / 60_000_000_000,
        };
        let total = regional
            .store()
            .ledger(&at)
            .await
            .unwrap()
            .unwrap_or_default()
            .total();
        // Never beyond the limit, and with 270 attempts on average, none short of it either.
        assert_eq!(admitted, 100, "seed {seed}");
        assert_eq!(
            total, admitted as u64,
            "seed {seed}: the store counts what was admitted"
        );
    }
}

/// A sliding window's denial reopens when the previous window's carry has fallen enough, not
/// at the window's end: the regional says when, to the nanosecond its store agrees with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sliding_windows_denial_reopens_as_its_carry_falls() {
    let server = RedisServer::start();
    let stores = memory_and_redis(&server).await;
    for store in stores {
        let clock = ManualClock::new(T0);
        let regional = regional_on(store, &clock);
        let rules = regional.rules();
        let mut id = 0;
        let mut ask = async |clock: &ManualClock| {
            id += 1;
            let mut check = check(&rules, "a", 1);
            check.window = clock.now().as_u64() / 60_000_000_000;
            regional
                .acquire(EdgeId(1), &acquire(id, vec![check]))
                .await
                .expect("the store answers")
        };
        for _ in 0..10 {
            assert!(ask(&clock).await.allowed);
        }
        // The window is full: nothing fits before it ends.
        let full = ask(&clock).await;
        assert!(!full.allowed);
        assert_eq!(full.retry_after, Nanos::from_secs(60));
        // 6 s into the next window the carry is ⌈10 · 54/60⌉ = 9: one fits, the next does
        // not until it is 8, 12 s in.
        clock.set(T0 + Nanos::from_secs(66));
        assert!(ask(&clock).await.allowed);
        let denied = ask(&clock).await;
        assert!(!denied.allowed);
        assert_eq!(
            denied.retry_after,
            Nanos::from_secs(6),
            "reopens as the carry falls to 8, not at the window's end"
        );
        clock.set(T0 + Nanos::from_secs(72) - Nanos(1));
        assert!(!ask(&clock).await.allowed);
        clock.set(T0 + Nanos::from_secs(72));
        assert!(ask(&clock).await.allowed, "and fits from that instant");
    }
}

/// Two edges keep one key far above its sliding limit for five minutes: every window admits
/// its limit, none more, as a sliding window counter does. (With denials cached to the end
/// of the window, a window that opened with a full carry admitted next to nothing, and the
/// key got about half its limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_kept_at_its_sliding_limit_gets_its_limit_every_window() {
    let server = RedisServer::start();
    let clock = ManualClock::new(T0);
    let regional = redis_regional(&server, &clock).await;
    let agents = agents(&regional, &clock, 2, 0);
    let request = Request {
        user_id: Some("alice"),
        ..Request::new("POST", "/login")
    };
    // 40 requests a second on a hard limit of 100 a minute, by window.
    let mut admitted = [0u32; 5];
    while clock.now() < T0 + Nanos::from_secs(300) {
        let window = ((clock.now() - T0).as_u64() / 60_000_000_000) as usize;
        for agent in &agents {
            for _ in 0..2 {
                if agent.check_async(&request, NonZeroU32::MIN).await.allowed {
                    admitted[window] += 1;
                }
            }
            let _ = agent.flush().await;
        }
        clock.advance(Nanos::from_millis(100));
    }
    for (window, &n) in admitted.iter().enumerate() {
        assert!(
            (95..=100).contains(&n),
            "window {window} admitted {n} of 100: {admitted:?}"
        );
    }
}

/// A "held" denial (only another edge's unused grant in the way) is recalled from every edge
/// in its next sync acks, also from one that does not sync that key: its grant comes back
/// within a flush, and the denied edge, once its short hold has passed, is admitted. (An idle
/// key's holder is the likeliest to hold quota unused, and the per-entry recall never reached
/// it: it sent no entry for the key.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_denial_recalls_an_idle_edges_grant() {
    let server = RedisServer::start();
    let clock = ManualClock::new(T0 + Nanos::from_secs(1));
    let regional = redis_regional(&server, &clock).await;
    let edges = agents(&regional, &clock, 2, 0);
    let (a, b) = (&edges[0], &edges[1]);
    let user = |id: &'static str| Request {
        user_id: Some(id),
        ..Request::new("GET", "/c")
    };
    // A takes one of zed's 10 (the exact path: c0 is 0 here) and holds a grant beside it,
    // which it will not use; another key keeps A syncing.
    assert!(a.check_async(&user("zed"), NonZeroU32::MIN).await.allowed);
    for _ in 0..2 {
        assert!(a.check_async(&user("yan"), NonZeroU32::MIN).await.allowed);
    }
    // A's sync asks for what it was asked for; zed has nothing more to sync after it.
    a.flush().await.expect("the regional answers");
    // B spends what nobody holds, then is denied for what A holds: a short hold.
    let mut by_b = 0;
    let denied = loop {
        let d = b.check_async(&user("zed"), NonZeroU32::MIN).await;
        if !d.allowed {
            break d;
        }
        by_b += 1;
        assert!(by_b < 10, "B admitted all of zed's 10");
        let _ = b.flush().await;
    };
    assert!(
        denied.retry_after <= Nanos::from_millis(100),
        "a held denial is cached briefly: {denied:?}"
    );
    // A's next syncs, for yan only: the first learns the recall, the second hands zed's
    // grant back.
    for _ in 0..2 {
        assert!(a.check_async(&user("yan"), NonZeroU32::MIN).await.allowed);
        clock.advance(Nanos::from_millis(100));
        a.flush().await.expect("the regional answers");
    }
    let d = b.check_async(&user("zed"), NonZeroU32::MIN).await;
    assert!(
        d.allowed,
        "what A held came back and B got it: {d:?} (B had {by_b}, A 1)"
    );
}

/// Every sync ack tells the edge `P` of each limit its batch named in the current window (for
/// its cold allowance and its `local` failure mode): the whole limit without a coordinator,
/// the region's share of it with one.
#[tokio::test]
async fn a_sync_ack_tells_the_edge_each_named_limits_partition() {
    let clock = ManualClock::new(T0 + Nanos::from_secs(5));
    let rules = rules();
    let [login, a] = ["login", "a"].map(|id| limit(&rules, id));
    let window = T0.as_u64() / 60_000_000_000;
    let entry = |limit, key: &str, window| SyncEntry {
        limit,
        key: key.into(),
        window,
        used: 1,
        released: 0,
        want: 0,
    };
    let batch = SyncBatch {
        entries: vec![
            entry(login, "u:alice", window),
            entry(login, "u:bob", window),
            entry(a, "u:alice", window - 1),
        ],
    };
    let partitions = |ack: &SyncAck| {
        let mut p: Vec<(shared::LimitId, u64)> = ack
            .partitions
            .iter()
            .map(|p| (p.limit, p.partition))
            .collect();
        p.sort();
        p
    };

    let alone = regional_on(Arc::new(MemoryStore::new()), &clock);
    let ack = alone.sync(EdgeId(1), batch.clone()).await.unwrap();
    // Once per limit; `a` only in a past window, which says nothing of the current one.
    assert_eq!(partitions(&ack), [(login, 100)]);

    let coordinated = Regional::new(
        RegionalConfig {
            coordinated: true,
            ..RegionalConfig::default()
        },
        rules.clone(),
        Arc::new(MemoryStore::new()),
        Arc::new(clock.clone()),
    );
    coordinated.partitions().apply(
        &shared::wire::Partitions {
            version: 1,
            rules: vec![shared::wire::RuleShare {
                limit: login,
                share_ppm: shared::quota::ppm_for(37, 100),
                from_window: 0,
            }],
            keys: vec![],
        },
        |limit| coordinated.schedule_index(limit),
    );
    let ack = coordinated.sync(EdgeId(1), batch).await.unwrap();
    assert_eq!(partitions(&ack), [(login, 37)]);
}

/// A coordinator that answers an escalation only after `delay`, granting what was asked the
/// first time and nothing after, and counts the asks.
pub(crate) struct SlowCoordinator {
    pub(crate) delay: Duration,
    pub(crate) asks: std::sync::atomic::AtomicU64,
}

impl regional_aggregator::Escalation for SlowCoordinator {
    fn request(
        &self,
        _limit: shared::LimitId,
        _key: &str,
        _window: u64,
        wanted: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = u64> + Send + '_>> {
        let first = self.asks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            if first { wanted } else { 0 }
        })
    }
}

/// A regional holding 50 of login's 100 per key (`config`'s other settings), escalating to
/// `coordinator` with `budget`.
pub(crate) fn escalating_regional(
    config: RegionalConfig,
    clock: &ManualClock,
    coordinator: Arc<SlowCoordinator>,
    budget: Duration,
) -> Regional {
    let rules = rules();
    let regional = Regional::new(
        RegionalConfig {
            coordinated: true,
            ..config
        },
        rules.clone(),
        Arc::new(MemoryStore::new()),
        Arc::new(clock.clone()),
    );
    regional.partitions().apply(
        &shared::wire::Partitions {
            version: 1,
            rules: vec![shared::wire::RuleShare {
                limit: limit(&rules, "login"),
                share_ppm: shared::quota::ppm_for(50, 100),
                from_window: 0,
            }],
            keys: vec![],
        },
        |limit| regional.schedule_index(limit),
    );
    regional.set_escalation(coordinator, budget);
    regional
}

/// Waits (at most 5 s) until `regional`'s partition of u:alice's `limit` (whole 100) in
/// `window` is above `partition`: an escalation's transfer has landed.
pub(crate) async fn until_alice_is_above(
    regional: &Regional,
    limit: shared::LimitId,
    window: u64,
    partition: u64,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while regional
        .partitions()
        .partition(limit, "u:alice", window, 100)
        <= partition
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the transfer never landed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An escalation whose transfer outlasts the budget denies the request that asked, but only
/// for the hold (not until the window ends), and what the other regions released lands in
/// this region's partition for the next request, which is admitted without asking again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_outlasts_the_budget_still_lands() {
    let clock = ManualClock::new(T0 + Nanos::from_secs(5));
    let rules = rules();
    let login = limit(&rules, "login");
    let slow = Arc::new(SlowCoordinator {
        delay: Duration::from_millis(300),
        asks: Default::default(),
    });
    let regional = escalating_regional(
        RegionalConfig::default(),
        &clock,
        slow.clone(),
        Duration::from_millis(30),
    );
    let asks = || slow.asks.load(std::sync::atomic::Ordering::SeqCst);

    let spend = regional
        .acquire(EdgeId(1), &acquire(1, vec![check(&rules, "login", 50)]))
        .await
        .expect("the store answers");
    assert!(spend.allowed, "the region's 50 of 100: {spend:?}");

    let started = std::time::Instant::now();
    let denied = regional
        .acquire(EdgeId(1), &acquire(2, vec![check(&rules, "login", 1)]))
        .await
        .expect("the store answers");
    assert!(!denied.allowed, "the partition is spent: {denied:?}");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "the request waited past its budget: {:?}",
        started.elapsed()
    );
    assert_eq!(asks(), 1);
    // Cached by the edge only as long as the request waited (the 30 ms budget), not until
    // the window ends: the transfer is still on its way.
    assert_eq!(
        denied.checks[0].reset_at,
        clock.now() + Nanos::from_millis(30),
        "{denied:?}"
    );

    // The transfer lands (the region's partition grows by the 5 asked, a twentieth of 100).
    let window = check(&rules, "login", 1).window;
    until_alice_is_above(&regional, login, window, 50).await;
    let admitted = regional
        .acquire(EdgeId(1), &acquire(3, vec![check(&rules, "login", 5)]))
        .await
        .expect("the store answers");
    assert!(admitted.allowed, "the landed 5: {admitted:?}");
    assert_eq!(
        asks(),
        1,
        "admitted from the landed quota, without asking again"
    );
}

/// An edge that said how long it waits for an exact answer gets one in time: the escalation
/// waits at most half of that, however long the budget, so the edge never takes the
/// regional for down (and decides by its failure modes) while a transfer runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalation_answers_within_the_edges_wait() {
    let clock = ManualClock::new(T0 + Nanos::from_secs(5));
    let rules = rules();
    let slow = Arc::new(SlowCoordinator {
        delay: Duration::from_secs(2),
        asks: Default::default(),
    });
    let regional = escalating_regional(
        RegionalConfig::default(),
        &clock,
        slow.clone(),
        Duration::from_secs(5),
    );
    let spend = regional
        .acquire(EdgeId(1), &acquire(1, vec![check(&rules, "login", 50)]))
        .await
        .expect("the store answers");
    assert!(spend.allowed, "the region's 50 of 100: {spend:?}");

    let started = std::time::Instant::now();
    let denied = regional
        .acquire_within(
            EdgeId(1),
            &acquire(2, vec![check(&rules, "login", 1)]),
            Some(Duration::from_millis(400)),
        )
        .await
        .expect("the store answers");
    let waited = started.elapsed();
    assert!(!denied.allowed, "the partition is spent: {denied:?}");
    assert_eq!(slow.asks.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        waited < Duration::from_millis(1500),
        "an edge waiting 400 ms was answered after {waited:?} (the transfer takes 2 s)"
    );
}

/// A token bucket whose part here is empty asks the coordinator for tokens without holding up
/// the request: the denial comes at once (an over-rate client must not wait on a coordinator
/// round trip for each denial), one ask is in flight per key however many denials follow, and
/// the tokens that come back admit a later request (the clock stands still: no refill could).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_bucket_asks_for_tokens_without_holding_up_the_request() {
    let clock = ManualClock::new(T0 + Nanos::from_secs(5));
    let rules = rules();
    let tb = limit(&rules, "tb");
    let slow = Arc::new(SlowCoordinator {
        delay: Duration::from_millis(500),
        asks: Default::default(),
    });
    let regional = escalating_regional(
        RegionalConfig::default(),
        &clock,
        slow.clone(),
        Duration::from_secs(5),
    );
    // Half of tb's bucket of 2 at 2/m: a part of 1 token.
    regional.partitions().apply(
        &shared::wire::Partitions {
            version: 2,
            rules: vec![shared::wire::RuleShare {
                limit: tb,
                share_ppm: shared::quota::ppm_for(50, 100),
                from_window: 0,
            }],
            keys: vec![],
        },
        |limit| regional.schedule_index(limit),
    );
    let asks = || slow.asks.load(std::sync::atomic::Ordering::SeqCst);
    let mut id = 0;
    let mut take = async || {
        id += 1;
        regional
            .acquire(EdgeId(1), &acquire(id, vec![check(&rules, "tb", 1)]))
            .await
            .expect("the store answers")
    };

    assert!(take().await.allowed, "the part's one token");
    let started = std::time::Instant::now();
    let denied = take().await;
    let waited = started.elapsed();
    assert!(!denied.allowed, "the part is empty: {denied:?}");
    assert!(
        waited < Duration::from_millis(400),
        "the denial waited {waited:?} for a transfer that takes 500 ms"
    );
    assert!(!take().await.allowed, "still empty");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !take().await.allowed {
        assert!(
            std::time::Instant::now() < deadline,
            "the tokens never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(asks(), 1, "one ask for the key while it was in flight");
    assert_eq!(
        regional
            .stats()
            .escalations_granted
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// A regional records in its store what it holds after every push, and a restarted one (a
/// new process on the same Redis) carries on with it: its first answer to the coordinator is
/// the old run's last, a bucket's cut still clearing included. So neither the coordinator
/// nor the other regions take the restart for a region holding nothing (another region's
/// raise could then begin while what this one admitted under its shares still counts). A
/// fresh store has nothing to restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_regional_carries_on_with_what_it_held() {
    let server = RedisServer::start();
    let clock = ManualClock::new(T0 + Nanos::from_secs(5));
    let rules = rules();
    let tb = limit(&rules, "tb");
    let login = limit(&rules, "login");
    let coordinated = async |store: Arc<dyn Store>| {
        Regional::new(
            RegionalConfig {
                coordinated: true,
                ..RegionalConfig::default()
            },
            rules.clone(),
            store,
            Arc::new(clock.clone()),
        )
    };
    let redis = async || Arc::new(redis_store(&server).await) as Arc<dyn Store>;
    let push = |version, percent| shared::wire::Partitions {
        version,
        rules: vec![
            shared::wire::RuleShare {
                limit: tb,
                share_ppm: shared::quota::ppm_for(percent, 100),
                from_window: 0,
            },
            shared::wire::RuleShare {
                limit: login,
                share_ppm: shared::quota::ppm_for(50, 100),
                from_window: 0,
            },
        ],
        keys: vec![],
    };
    let probe = shared::wire::Partitions {
        version: 0,
        rules: vec![],
        keys: vec![],
    };
    let sorted = |mut answer: shared::wire::Partitions| {
        answer.rules.sort_by_key(|r| r.limit);
        answer.rules
    };

    let first = coordinated(redis().await).await;
    first
        .partitions()
        .apply(&push(1, 100), |l| first.schedule_index(l));
    let cut = first
        .partitions()
        .apply(&push(2, 50), |l| first.schedule_index(l));
    let (now, clear) = first.schedule_index(tb).expect("tb is a rule");
    let tb_from = cut
        .rules
        .iter()
        .find(|r| r.limit == tb)
        .map(|r| r.from_window);
    assert!(
        tb_from >= Some(now + clear),
        "tb's cut clears one refill time on: {cut:?}"
    );
    first.save_partitions().await.expect("Redis answers");
    let window = T0.as_u64() / 60_000_000_000;
    let login_p = first.partitions().partition(login, "u:alice", window, 100);
    assert_eq!(login_p, 50);
    drop(first);

    let restarted = coordinated(redis().await).await;
    restarted.restore_partitions().await.expect("Redis answers");
    let answer = restarted
        .partitions()
        .apply(&probe, |l| restarted.schedule_index(l));
    assert_eq!(
        sorted(answer),
        sorted(cut),
        "the restarted regional answers as the old run did"
    );
    assert_eq!(
        restarted
            .partitions()
            .partition(login, "u:alice", window, 100),
        login_p,
        "and decides with the same partition before any push"
    );

    let fresh = coordinated(Arc::new(MemoryStore::new())).await;
    fresh.restore_partitions().await.expect("memory answers");
    let answer = fresh
        .partitions()
        .apply(&probe, |l| fresh.schedule_index(l));
    assert!(answer.rules.is_empty(), "{answer:?}");
}

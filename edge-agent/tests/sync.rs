//! The sync loop: idle grants handed back, counts replayed after a reconnect counted once,
//! and hard keys held exactly by ten agents sharing one regional.

use std::sync::atomic::Ordering;

use edge_agent::{AgentConfig, DecisionPath, Request};
use shared::{ManualClock, Nanos, quota::EdgeId, sim::Rng};

use crate::support::*;

const HARD: &str = "rate_limits:\n  endpoints:\n    \
    - { id: h, path: /h, limit: 100, window: 1m, key: user_id, strictness: hard, on_failure: local }\n";

fn user(id: &str) -> Request<'_> {
    Request {
        user_id: Some(id),
        ..Request::new("GET", "/h")
    }
}

fn window() -> u64 {
    T0.as_u64() / 60_000_000_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keys_grant_is_handed_back() {
    let rules = rules(HARD);
    let limit = rules.rule("h").unwrap().limits()[0].id();
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    for _ in 0..10 {
        assert!(agent.check(&user("a")).allowed);
    }
    clock.advance(Nanos::from_millis(1));
    agent.flush().await.unwrap();
    let counters = |region: &Regional| {
        let r = region.lock().unwrap();
        r.model()
            .ledger(&(limit, "u:a".into()), window())
            .unwrap()
            .counters(EdgeId(0))
    };
    let c = counters(&region);
    assert!(
        c.granted - c.released > c.used,
        "the busy key holds an unused grant: {c:?}"
    );
    let stats = agent.stats();
    assert_eq!((stats.syncs, stats.sync_entries), (1, 1));
    assert_eq!(agent.sync_batch_sizes().count(), 1);
    assert_eq!(
        stats.last_sync_at,
        T0 + Nanos::from_millis(1),
        "the sync lag restarts"
    );
    assert_eq!(
        stats.granted, c.granted,
        "every grant unit the regional minted"
    );

    // Idle for longer than idle_release: the next flush hands the rest back.
    clock.advance(Nanos::from(AgentConfig::default().idle_release) + Nanos(1));
    agent.flush().await.unwrap();
    let c = counters(&region);
    assert_eq!(
        c.granted - c.released,
        c.used,
        "nothing held unused after the idle release"
    );
    let stats = agent.stats();
    assert_eq!(stats.returned, c.released, "what the metrics call returned");
    assert_eq!(
        stats.granted - stats.returned,
        c.used,
        "utilisation: every kept unit was used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_made_while_cut_off_are_replayed_once() {
    let rules = rules(HARD);
    let limit = rules.rule("h").unwrap().limits()[0].id();
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let link = Link::new(&region, 0, &clock);
    let agent = agent(&rules, link.clone(), &clock);
    link.up.store(false, Ordering::SeqCst);
    let admitted = (0..30).filter(|_| agent.check(&user("b")).allowed).count() as u64;
    assert_eq!(
        admitted, 30,
        "local mode: this edge alone may use P/n = 100"
    );
    assert!(agent.flush().await.is_err(), "still cut off");

    link.up.store(true, Ordering::SeqCst);
    agent.flush().await.unwrap();
    agent.flush().await.unwrap(); // a second flush resends nothing new
    let r = region.lock().unwrap();
    let ledger = r.model().ledger(&(limit, "u:b".into()), window()).unwrap();
    assert_eq!(ledger.used(), admitted, "replayed, and counted once");
    assert_eq!(agent.stats().lost_windows, 0);
}

/// Ten agents share one regional; one hard key, 1,000 requests spread over them at random
/// with syncs in between: exactly the limit is admitted, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_agents_never_admit_a_hard_key_beyond_its_limit() {
    let rules = rules(HARD);
    for seed in 0..20 {
        let clock = ManualClock::new(T0);
        let region = regional(&rules, 10);
        let agents: Vec<_> = (0..10)
            .map(|e| agent(&rules, Link::new(&region, e, &clock), &clock))
            .collect();
        let mut rng = Rng::new(seed);
        let mut admitted = 0;
        let mut local = 0;
        for i in 0..1000 {
            let a = &agents[rng.below(10) as usize];
            let d = a.check(&user("hot"));
            admitted += u64::from(d.allowed);
            local += u64::from(d.path == DecisionPath::Local);
            clock.advance(Nanos::from_millis(10));
            if i % 10 == 9 {
                for a in &agents {
                    a.flush().await.unwrap();
                }
            }
        }
        assert_eq!(
            admitted, 100,
            "seed {seed}: {admitted} admitted ({local} local)"
        );
    }
}

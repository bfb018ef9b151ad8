//! Local decisions: grants consumed and refreshed, cached denials, all-or-nothing.

use edge_agent::{DecisionPath, ExactReason, Request};
use shared::{ManualClock, Nanos};

use crate::support::*;

const LOGIN: &str = "rate_limits:\n  endpoints:\n    \
    - { id: login, path: /login, limit: 100, window: 1m, key: ip, strictness: hard }\n";

fn login(ip: &str) -> Request<'_> {
    Request {
        ip: Some(ip),
        ..Request::new("POST", "/login")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_key_starts_exact_then_decides_locally_under_its_grant() {
    let rules = rules(LOGIN);
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);

    let first = agent
        .check_async(&login("1.1.1.1"), std::num::NonZeroU32::MIN)
        .await;
    assert!(first.allowed);
    assert_eq!(
        first.path,
        DecisionPath::Exact,
        "a hard key's first request is exact"
    );
    // The exact answer carried a grant sized by demand (2 × 1): the next two are local.
    assert_eq!(agent.check(&login("1.1.1.1")).path, DecisionPath::Local);
    assert_eq!(agent.check(&login("1.1.1.1")).path, DecisionPath::Local);
    assert_eq!(
        agent.check(&login("1.1.1.1")).path,
        DecisionPath::Exact,
        "grant spent"
    );
    // Why each went to the regional, as `edge_exact_reasons_total` shows it.
    let why = |r: ExactReason| {
        agent.stats().exact_reasons[ExactReason::ALL.iter().position(|&x| x == r).unwrap()]
    };
    assert_eq!(
        [
            ExactReason::NoGrant,
            ExactReason::GrantSpent,
            ExactReason::NearLimit
        ]
        .map(why),
        [1, 1, 0]
    );

    // A sync reports the use and refreshes the grant for the demand it saw.
    agent.flush().await.unwrap();
    let local = (0..6)
        .filter(|_| agent.check(&login("1.1.1.1")).path == DecisionPath::Local)
        .count();
    assert!(
        local >= 4,
        "the refreshed grant covers the demand: {local} local of 6"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_regionals_count_matches_what_was_admitted() {
    let rules = rules(LOGIN);
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    let mut admitted = 0;
    for i in 0..300 {
        if agent.check(&login("2.2.2.2")).allowed {
            admitted += 1;
        }
        if i % 20 == 0 {
            agent.flush().await.unwrap();
        }
    }
    agent.flush().await.unwrap();
    assert_eq!(admitted, 100, "exactly the limit, from one agent");
    let reasons = agent.stats().exact_reasons;
    assert!(
        reasons[ExactReason::ALL
            .iter()
            .position(|&x| x == ExactReason::NearLimit)
            .unwrap()]
            > 0,
        "the last fifth of the limit is decided exact: {reasons:?}"
    );
    assert_eq!(
        reasons.iter().sum::<u64>(),
        agent.stats().exact + agent.stats().fallback,
        "every request not decided locally has its reason"
    );
    let limit = rules.rule("login").unwrap().limits()[0].id();
    let r = region.lock().unwrap();
    let ledger = r
        .model()
        .ledger(&(limit, "i:2.2.2.2".into()), T0.as_u64() / 60_000_000_000)
        .unwrap();
    assert_eq!(ledger.used(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_denial_expires_exactly_at_its_reopen_time() {
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: l, path: /login, limit: 2, window: 1m, key: ip, strictness: hard }\n",
    );
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let link = Link::new(&region, 0, &clock);
    let agent = agent(&rules, link.clone(), &clock);
    assert!(agent.check(&login("3.3.3.3")).allowed);
    assert!(agent.check(&login("3.3.3.3")).allowed);
    let denied = agent.check(&login("3.3.3.3"));
    assert!(!denied.allowed);
    assert_eq!(denied.path, DecisionPath::Exact);
    assert_eq!(denied.reset_at, T0 + Nanos::from_secs(60));
    assert_eq!(denied.retry_after, Nanos::from_secs(60));

    // Until then, denials cost nothing: the regional is not asked even when it is gone.
    link.up.store(false, std::sync::atomic::Ordering::SeqCst);
    clock.set(T0 + Nanos::from_secs(60) - Nanos(1));
    let cached = agent.check(&login("3.3.3.3"));
    assert_eq!(
        (cached.allowed, cached.path),
        (false, DecisionPath::CachedDenial)
    );
    assert_eq!(cached.retry_after, Nanos(1));
    assert_eq!(
        cached.reset_at,
        T0 + Nanos::from_secs(60),
        "the window's end, not the reopen"
    );

    // At the reopen time exactly, the key is decided afresh.
    link.up.store(true, std::sync::atomic::Ordering::SeqCst);
    clock.set(T0 + Nanos::from_secs(60));
    let reopened = agent.check(&login("3.3.3.3"));
    assert!(reopened.allowed);
    assert_eq!(reopened.path, DecisionPath::Exact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_matching_several_limits_consumes_from_none_when_one_denies() {
    // Two rules on one path: a generous per-minute one and a tight per-hour one.
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: minute, path: /upload, limit: 100, window: 1m, key: user_id, strictness: hard }\n    \
         - { id: hour, path: /upload, limit: 3, window: 1h, key: user_id, strictness: hard }\n",
    );
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    let upload = Request {
        user_id: Some("u-1"),
        ..Request::new("POST", "/upload")
    };
    for _ in 0..3 {
        assert!(agent.check(&upload).allowed);
    }
    let denied = agent.check(&upload);
    assert!(!denied.allowed);
    assert_eq!(
        denied.rule,
        Some(rules.rule("hour").unwrap().limits()[0].id())
    );
    // Five more denials: the minute limit must still have been charged only three.
    for _ in 0..5 {
        assert!(!agent.check(&upload).allowed);
    }
    agent.flush().await.unwrap();
    let minute = rules.rule("minute").unwrap().limits()[0].id();
    let r = region.lock().unwrap();
    let ledger = r
        .model()
        .ledger(&(minute, "u:u-1".into()), T0.as_u64() / 60_000_000_000)
        .unwrap();
    assert_eq!(
        ledger.used(),
        3,
        "the denied requests consumed nothing from the minute limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_rule_matches_is_allowed_without_counting() {
    let rules = rules(LOGIN);
    let clock = ManualClock::new(T0);
    let agent = agent(&rules, std::sync::Arc::new(Stalled), &clock);
    let d = agent.check(&Request::new("GET", "/elsewhere"));
    assert_eq!(
        (d.allowed, d.path, d.rule),
        (true, DecisionPath::Unlimited, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_counts_down_across_exact_and_local_decisions() {
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: l, path: /login, limit: 5, window: 1m, key: ip, strictness: hard }\n",
    );
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    let seen: Vec<(bool, u64)> = (0..6)
        .map(|_| {
            let d = agent.check(&login("4.4.4.4"));
            (d.allowed, d.remaining)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (true, 4),
            (true, 3),
            (true, 2),
            (true, 1),
            (true, 0),
            (false, 0)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_decided_only_by_the_regional_still_cache_their_denials() {
    // A sliding log is exact only at one authority: every request goes to the regional,
    // but once it denies, the edge denies for free until the reopening.
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: s, path: /login, algorithm: sliding_log, limit: 2, window: 1m, key: ip }\n",
    );
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    let paths: Vec<DecisionPath> = (0..4)
        .map(|_| agent.check(&login("5.5.5.5")).path)
        .collect();
    assert_eq!(
        paths,
        [
            DecisionPath::Exact,
            DecisionPath::Exact,
            DecisionPath::Exact,
            DecisionPath::CachedDenial
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_key_spends_no_cold_allowance_before_the_regional_has_said_n() {
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: s, path: /login, limit: 1000, window: 1m, key: ip }\n",
    );
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 10);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    // No ack yet: n is unknown, so the first request asks the regional.
    assert_eq!(agent.check(&login("6.6.6.6")).path, DecisionPath::Exact);
    // Once an ack says n = 10, a new soft key may spend c0 = ⌊0.2·1000 / 20⌋ = 10 locally.
    agent.flush().await.unwrap();
    let paths: Vec<DecisionPath> = (0..11)
        .map(|_| agent.check(&login("7.7.7.7")).path)
        .collect();
    assert!(
        paths[..10].iter().all(|p| *p == DecisionPath::Local),
        "{paths:?}"
    );
    assert_eq!(
        paths[10],
        DecisionPath::Exact,
        "the allowance spent, the 11th asks"
    );
}

/// The cold allowance is a fraction of this region's partition (DESIGN §4,
/// `⌊(1−θ)·P / 2n⌋`), not of the whole limit, once the regional has said `P`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_allowance_is_a_fraction_of_the_regions_partition() {
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: s, path: /login, limit: 1000, window: 1m, key: ip }\n",
    );
    let limit = rules.rule("s").unwrap().limits()[0].id();
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 10);
    // Another region holds 600 of the 1,000.
    region.lock().unwrap().set_partition(limit, 400);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    assert_eq!(agent.check(&login("6.6.6.6")).path, DecisionPath::Exact);
    agent.flush().await.unwrap();
    // c0 = ⌊0.2·400 / 20⌋ = 4, where the whole limit would give 10.
    let paths: Vec<DecisionPath> = (0..5)
        .map(|_| agent.check(&login("7.7.7.7")).path)
        .collect();
    assert_eq!(
        paths,
        [
            DecisionPath::Local,
            DecisionPath::Local,
            DecisionPath::Local,
            DecisionPath::Local,
            DecisionPath::Exact
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_limit_denies_nothing_and_reports_what_it_would_deny() {
    let rules = rules(
        "rate_limits:\n  endpoints:\n    \
         - { id: s, path: /login, limit: 2, window: 1m, key: ip, shadow: true }\n",
    );
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let agent = agent(&rules, Link::new(&region, 0, &clock), &clock);
    // Let the regional say n (so the soft key has a cold allowance to count in).
    agent.check(&login("8.8.8.8"));
    agent.flush().await.unwrap();
    let allowed = (0..10)
        .filter(|_| agent.check(&login("8.8.8.8")).allowed)
        .count();
    assert_eq!(allowed, 10, "shadow: nothing denied");
    assert!(agent.stats().shadow_denials >= 8, "{:?}", agent.stats());
}

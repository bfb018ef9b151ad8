//! Rules that change while the agent runs (`Agent::set_rules`): newer versions apply to the next
//! checks, older and equal ones are ignored, kept limits keep their counts, changed limits hand
//! back their grants, removed limits leave nothing behind. Over QUIC, in `quic`.

use std::{
    collections::VecDeque,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Instant,
};

use edge_agent::{Agent, DecisionPath, EdgeMetrics, Request};
use shared::{ManualClock, Nanos, RuleSet};

use crate::support::*;

/// Both rules decide alone when the regional is away (`local`: this edge enforces `P/n`, with
/// `n` = 1 until a regional has said otherwise), so what decides below is the rules themselves.
const V1: &str = "rate_limits:\n  endpoints:\n    \
    - { id: login, path: /login, limit: 5, window: 1m, key: ip, on_failure: local }\n    \
    - { id: search, path: /search, limit: 1, window: 1m, key: ip, on_failure: local }\n";

/// `login` lowered to 2; `search` removed.
const V2: &str = "rate_limits:\n  endpoints:\n    \
    - { id: login, path: /login, limit: 2, window: 1m, key: ip, on_failure: local }\n";

/// `login` at 10: an edge that took it would admit again.
const V2_OTHER: &str = "rate_limits:\n  endpoints:\n    \
    - { id: login, path: /login, limit: 10, window: 1m, key: ip, on_failure: local }\n";

fn request<'a>(path: &'a str, ip: &'a str) -> Request<'a> {
    Request {
        ip: Some(ip),
        ..Request::new("POST", path)
    }
}

fn versioned(yaml: &str, version: u64) -> RuleSet {
    rules(yaml).with_version(version)
}

/// An agent whose regional never answers: each rule's failure mode decides.
fn alone(rules: &RuleSet, clock: &ManualClock) -> Agent {
    let upstream = Arc::new(Scripted {
        replies: Mutex::new(VecDeque::new()),
    });
    agent(rules, upstream, clock)
}

async fn allowed(agent: &Agent, request: &Request<'_>) -> bool {
    agent.check_async(request, NonZeroU32::MIN).await.allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_rule_set_decides_the_next_checks_and_an_older_one_is_ignored() {
    let clock = ManualClock::new(T0);
    let agent = alone(&versioned(V1, 1), &clock);
    let login = request("/login", "1.1.1.1");
    let search = request("/search", "1.1.1.1");
    for _ in 0..3 {
        assert!(allowed(&agent, &login).await);
    }
    assert!(allowed(&agent, &search).await);
    assert!(!allowed(&agent, &search).await, "search: 1 a minute");

    assert!(agent.set_rules(versioned(V2, 2)));
    assert_eq!(agent.rules().version(), 2);
    // The key keeps its 3 and the limit is now 2.
    let denied = agent.check_async(&login, NonZeroU32::MIN).await;
    assert!(!denied.allowed, "{denied:?}");
    assert_eq!(denied.limit, 2);
    // No rule selects /search any more.
    for _ in 0..3 {
        let d = agent.check_async(&search, NonZeroU32::MIN).await;
        assert_eq!(
            (d.allowed, d.path, d.rule),
            (true, DecisionPath::Unlimited, None)
        );
    }

    // Resent or overtaken pushes change nothing.
    assert!(!agent.set_rules(versioned(V2_OTHER, 2)), "equal version");
    assert!(!agent.set_rules(versioned(V2_OTHER, 1)), "older version");
    assert!(!agent.set_rules(versioned(V1, 0)), "older version");
    assert_eq!(agent.rules().version(), 2);
    let still = agent.check_async(&login, NonZeroU32::MIN).await;
    assert!(!still.allowed);
    assert_eq!(still.limit, 2, "the ignored sets did not apply");
    assert!(
        agent
            .check_async(&search, NonZeroU32::MIN)
            .await
            .rule
            .is_none()
    );

    // A new window under the new limit: 2, then denied.
    clock.advance(Nanos::from_secs(60));
    assert!(allowed(&agent, &login).await);
    assert!(allowed(&agent, &login).await);
    assert!(!allowed(&agent, &login).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_limit_hands_back_its_grant_and_a_removed_one_its_keys() {
    const HARD: &str = "rate_limits:\n  endpoints:\n    \
        - { id: login, path: /login, limit: 100, window: 1m, key: ip, strictness: hard }\n    \
        - { id: search, path: /search, limit: 100, window: 1m, key: ip, strictness: hard }\n";
    const LOWER: &str = "rate_limits:\n  endpoints:\n    \
        - { id: login, path: /login, limit: 50, window: 1m, key: ip, strictness: hard }\n    \
        - { id: search, path: /search, limit: 100, window: 1m, key: ip, strictness: hard }\n";
    const FEWER: &str = "rate_limits:\n  endpoints:\n    \
        - { id: search, path: /search, limit: 100, window: 1m, key: ip, strictness: hard }\n";
    let v1 = versioned(HARD, 1);
    let clock = ManualClock::new(T0);
    let region = regional(&v1, 1);
    let agent = agent(&v1, Link::new(&region, 0, &clock), &clock);
    let login = request("/login", "1.1.1.1");
    let search = request("/search", "1.1.1.1");
    for r in [&login, &search] {
        // Exact, and back with a grant of 2 (demand 1 × 2): the next is local.
        let first = agent.check_async(r, NonZeroU32::MIN).await;
        assert_eq!(first.path, DecisionPath::Exact);
        assert_eq!(agent.check(r).path, DecisionPath::Local);
    }
    let returned = agent.stats().returned;

    assert!(agent.set_rules(versioned(LOWER, 2)));
    // The grant was sized under 100: handed back, so the next login asks the regional.
    assert_eq!(agent.stats().returned, returned + 1);
    let after = agent.check_async(&login, NonZeroU32::MIN).await;
    assert_eq!(after.path, DecisionPath::Exact);
    assert_eq!(after.limit, 50);
    // The unchanged rule kept its key and its grant.
    assert_eq!(agent.check(&search).path, DecisionPath::Local);
    assert_eq!(agent.keys(), 2);
    // The counts of the changed limit are still the key's: all 3 reach the regional.
    agent.flush().await.unwrap();
    let limit = v1.rule("login").unwrap().limits()[0].id();
    let used = region
        .lock()
        .unwrap()
        .model()
        .ledger(&(limit, "i:1.1.1.1".into()), T0.as_u64() / 60_000_000_000)
        .unwrap()
        .used();
    assert_eq!(used, 3);

    assert!(agent.set_rules(versioned(FEWER, 3)));
    assert_eq!(agent.keys(), 1, "login's key is gone at once");
    let d = agent.check_async(&login, NonZeroU32::MIN).await;
    assert_eq!((d.allowed, d.path), (true, DecisionPath::Unlimited));
    assert_eq!(agent.keys(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_rules_in_force() {
    let clock = ManualClock::new(T0);
    let agent = Arc::new(alone(&versioned(V2, 4), &clock));
    let metrics = EdgeMetrics::new(agent.clone(), None);
    assert!(metrics.render().contains("edge_rule_set_version 4"));

    assert!(agent.set_rules(versioned(V1, 5)));
    let search = request("/search", "1.1.1.1");
    let started = Instant::now();
    let d = agent.check_async(&search, NonZeroU32::MIN).await;
    metrics.record(&d, started.elapsed());
    let text = metrics.render();
    assert!(text.contains("edge_rule_set_version 5"), "{text}");
    assert!(
        text.contains(r#"edge_checks_total{rule="search",result="allowed",path="fallback"} 1"#),
        "a rule the first version did not have is counted under its name:\n{text}"
    );
}

//! DESIGN §7, the edge's rows: the regional unreachable or slow. Each failure mode, and no
//! decision waits longer than the timeout.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use edge_agent::{AgentConfig, DecisionPath, Request};
use shared::{FailureMode, ManualClock};

use crate::support::*;

fn rules_with(mode: &str) -> shared::RuleSet {
    rules(&format!(
        "rate_limits:\n  endpoints:\n    \
         - {{ id: r, path: /r, limit: 10, window: 1m, key: ip, strictness: hard, on_failure: {mode} }}\n"
    ))
}

fn req() -> Request<'static> {
    Request {
        ip: Some("9.9.9.9"),
        ..Request::new("GET", "/r")
    }
}

/// One edge, the only one of a regional's, enforcing `rules_with(mode)`; its link can be cut.
fn one_edge(mode: &str) -> (Arc<Link>, edge_agent::Agent) {
    let rules = rules_with(mode);
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let link = Link::new(&region, 0, &clock);
    let agent = agent(&rules, link.clone(), &clock);
    (link, agent)
}

/// The admissions of 15 requests under `mode` when the regional is cut (unreachable at once).
async fn admitted_when_unreachable(mode: &str) -> (usize, DecisionPath) {
    let (link, agent) = one_edge(mode);
    link.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut path = DecisionPath::Unlimited;
    let mut admitted = 0;
    for _ in 0..15 {
        let d = agent.check_async(&req(), NonZeroU32::MIN).await;
        path = d.path;
        admitted += usize::from(d.allowed);
    }
    (admitted, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_regional_local_mode_enforces_the_edges_share() {
    // n is unknown (no answer yet), so this edge takes the whole P = 10 alone.
    assert_eq!(
        admitted_when_unreachable("local").await,
        (10, DecisionPath::Fallback(FailureMode::Local))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_regional_open_mode_admits() {
    assert_eq!(
        admitted_when_unreachable("open").await,
        (15, DecisionPath::Fallback(FailureMode::Open))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_regional_closed_mode_denies() {
    assert_eq!(
        admitted_when_unreachable("closed").await,
        (0, DecisionPath::Fallback(FailureMode::Closed))
    );
}

/// A regional that never answers: the async decision comes back at the timeout, by the
/// failure mode. Time is paused, so "at the timeout" is exact, not a measurement.
#[tokio::test(start_paused = true)]
async fn a_stalled_regional_costs_at_most_the_timeout() {
    let rules = rules_with("closed");
    let clock = ManualClock::new(T0);
    let agent = agent(&rules, Arc::new(Stalled), &clock);
    let started = tokio::time::Instant::now();
    let d = agent.check_async(&req(), NonZeroU32::MIN).await;
    assert_eq!(started.elapsed(), AgentConfig::default().upstream_timeout);
    assert_eq!(
        (d.allowed, d.path),
        (false, DecisionPath::Fallback(FailureMode::Closed))
    );
    // After a failure, decisions skip the network for the backoff: no second wait.
    let started = tokio::time::Instant::now();
    let d = agent.check_async(&req(), NonZeroU32::MIN).await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(d.path, DecisionPath::Fallback(FailureMode::Closed));
}

/// A failure starts the backoff, and a sync answered after it ends it: a stall that has
/// passed costs the failure mode until the next flush, not the whole backoff (1 s, never
/// reached here: the clock does not move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_sync_ends_the_backoff_early() {
    let (link, agent) = one_edge("closed");
    let exact = || async { agent.check_async(&req(), NonZeroU32::MIN).await };

    link.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let d = exact().await;
    assert_eq!(
        (d.allowed, d.path),
        (false, DecisionPath::Fallback(FailureMode::Closed))
    );
    // Reachable again, but nothing has shown it yet: still the backoff.
    link.up.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        exact().await.path,
        DecisionPath::Fallback(FailureMode::Closed)
    );
    // A failed sync does not end it either.
    link.up.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(agent.flush().await.is_err());
    link.up.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        exact().await.path,
        DecisionPath::Fallback(FailureMode::Closed)
    );
    // An answered one does: the next decision a grant does not cover (a key this edge has
    // not seen, of a hard rule) asks the regional, and is admitted.
    agent.flush().await.expect("the regional is up");
    let other = Request {
        ip: Some("8.8.8.8"),
        ..Request::new("GET", "/r")
    };
    let d = agent.check_async(&other, NonZeroU32::MIN).await;
    assert_eq!((d.allowed, d.path), (true, DecisionPath::Exact));
}

/// The blocking `check` against a stalled regional returns by the failure mode within the
/// timeout (real time here: the bound asserted is loose, the path is exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_blocking_check_is_bounded_by_the_timeout_too() {
    let rules = rules_with("open");
    let clock = ManualClock::new(T0);
    let agent = agent(&rules, Arc::new(Stalled), &clock);
    let started = std::time::Instant::now();
    let d = tokio::task::spawn_blocking(move || agent.check(&req()))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(
        (d.allowed, d.path),
        (true, DecisionPath::Fallback(FailureMode::Open))
    );
    assert!(waited >= AgentConfig::default().upstream_timeout);
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
}

/// With other regions holding part of a limit, the `local` mode's share is of this region's
/// partition, `P/n`, not of the whole limit: each region's edges together stay within their
/// region's `P` while cut off (DESIGN §7), so the regions together stay within `L`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_enforces_a_share_of_the_regions_partition_not_of_the_limit() {
    let rules = rules_with("local");
    let limit = rules.rule("r").expect("rule r").limits()[0].id();
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 2);
    // L = 10; this region holds 4, another region the other 6.
    region.lock().expect("not poisoned").set_partition(limit, 4);
    let link = Link::new(&region, 0, &clock);
    let agent = agent(&rules, link.clone(), &clock);
    let from = |ip: &'static str| Request {
        ip: Some(ip),
        ..Request::new("GET", "/r")
    };
    // While up, one request and a sync teach the edge P = 4 and n = 2.
    assert!(
        agent
            .check_async(&from("1.1.1.1"), NonZeroU32::MIN)
            .await
            .allowed
    );
    agent.flush().await.expect("the regional is up");

    link.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut admitted = 0;
    for _ in 0..15 {
        let d = agent.check_async(&from("9.9.9.9"), NonZeroU32::MIN).await;
        assert_eq!(d.path, DecisionPath::Fallback(FailureMode::Local));
        admitted += usize::from(d.allowed);
    }
    assert_eq!(admitted, 2, "P/n = 4/2, not L/n = 10/2");
}

/// The `local` mode's `P/n` is of what the edge admitted itself; it never admits on top of
/// what the edge knows the key already spent. Ten requests spend a hard limit of 10 at this
/// edge, most through the exact path (the regional counts those, not the edge's own count);
/// cut off then, the edge admits nothing more. Before, `P/n` of its own count let it admit
/// the key's exact admissions over again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_admits_nothing_the_edge_knows_is_spent() {
    let (link, agent) = one_edge("local");
    let mut paths = Vec::new();
    for _ in 0..10 {
        let d = agent.check_async(&req(), NonZeroU32::MIN).await;
        assert!(d.allowed);
        paths.push(d.path);
    }
    assert!(
        paths.contains(&DecisionPath::Exact),
        "some of the ten went exact: {paths:?}"
    );

    link.up.store(false, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        let d = agent.check_async(&req(), NonZeroU32::MIN).await;
        assert_eq!(
            (d.allowed, d.path),
            (false, DecisionPath::Fallback(FailureMode::Local))
        );
    }
    // A key it knows nothing against still gets its share.
    let other = Request {
        ip: Some("8.8.8.8"),
        ..Request::new("GET", "/r")
    };
    let d = agent.check_async(&other, NonZeroU32::MIN).await;
    assert_eq!(
        (d.allowed, d.path),
        (true, DecisionPath::Fallback(FailureMode::Local))
    );
}

//! Edge agents and a regional over real QUIC with mutual TLS on loopback, with a real Redis
//! behind: a hard key under concurrent load, and a Zipf workload's local ratio.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use edge_agent::{Agent, AgentConfig, QuicConfig, QuicUpstream, Request};
use regional_aggregator::{
    Regional, RegionalConfig,
    server::EdgeService,
    store::{LedgerKey, RedisStore, RedisTopology},
};
use shared::{
    Clock, ManualClock, Nanos, RuleSet,
    net::{self, Ca, Identity, NetStats},
    sim::{Rng, Zipf},
};

use crate::support::redis::RedisServer;

const T0: Nanos = Nanos(1_800_000_000_000_000_000);
const REGION: &str = "eu";
const REGIONAL: &str = "regional-eu-1";

struct Topology {
    regional: Arc<Regional>,
    agents: Vec<Arc<Agent>>,
    clock: ManualClock,
    _endpoint: quinn::Endpoint,
}

/// One regional on `server`'s Redis serving QUIC on a free port, and `edges` agents connected
/// to it, all on one manual clock.
async fn topology(server: &RedisServer, yaml: &str, edges: usize) -> Topology {
    let rules = RuleSet::from_yaml("rules.yaml", yaml).expect("test rules parse");
    let clock = ManualClock::new(T0);
    let ca = Ca::generate("test deployment CA").expect("ring generates keys");
    let (regional, endpoint, addr) = replica(server, &ca, REGIONAL, &rules, &clock).await;
    let mut agents = Vec::new();
    for e in 0..edges {
        agents.push(edge(&ca, &format!("edge-eu-{e}"), vec![addr], &rules, &clock).await);
    }
    assert_eq!(
        regional.edges(),
        edges as u32,
        "n counts the connected edges"
    );
    Topology {
        regional,
        agents,
        clock,
        _endpoint: endpoint,
    }
}

/// An edge agent named `node` of region `eu`, connected to the first of `addresses` it
/// reaches, on `clock`.
async fn edge(
    ca: &Ca,
    node: &str,
    addresses: Vec<SocketAddr>,
    rules: &RuleSet,
    clock: &ManualClock,
) -> Arc<Agent> {
    let identity = Identity::new(ca, &ca.issue(node, &[]).expect("a DNS name"));
    let upstream =
        QuicUpstream::connect(QuicConfig::new(addresses, REGIONAL, identity, node, REGION))
            .expect("inside a runtime");
    tokio::time::timeout(Duration::from_secs(5), upstream.connected())
        .await
        .expect("the edge connects over loopback");
    Arc::new(
        Agent::builder(AgentConfig::default(), rules.clone(), upstream)
            .clock(Arc::new(clock.clone()))
            .build()
            .expect("inside a runtime"),
    )
}

/// One round of load: a thread per edge, each a burst of 1 to `max` logins for alice at
/// once; what they admitted.
fn burst(agents: &[Arc<Agent>], rng: &mut Rng, max: u64) -> usize {
    let sent: Vec<usize> = agents.iter().map(|_| 1 + rng.below(max) as usize).collect();
    burst_of(agents, &sent)
}

fn user<'a>(id: &'a str, path: &'a str) -> Request<'a> {
    Request {
        user_id: Some(id),
        ..Request::new("POST", path)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_edges_over_quic_admit_a_hard_key_exactly_to_its_limit() {
    let server = RedisServer::start();
    let t = topology(
        &server,
        "rate_limits:\n  endpoints:\n    \
         - { id: login, path: /login, limit: 100, window: 1m, key: user_id, strictness: hard }\n",
        3,
    )
    .await;
    let mut rng = Rng::new(7);
    let mut admitted = 0;
    for _ in 0..25 {
        admitted += burst(&t.agents, &mut rng, 8);
        for a in &t.agents {
            let _ = a.flush().await;
        }
        t.clock.advance(Nanos::from_millis(100));
    }
    for a in &t.agents {
        a.flush().await.expect("the regional answers");
    }
    let exact: u64 = t.agents.iter().map(|a| a.stats().exact).sum();
    let fallback: u64 = t.agents.iter().map(|a| a.stats().fallback).sum();
    assert_eq!(fallback, 0, "every exact request was answered in time");
    assert_eq!(
        admitted, 100,
        "never beyond the limit, none short ({exact} exact)"
    );
    let at = LedgerKey {
        limit: t.regional.rules().rule("login").expect("rule").limits()[0].id(),
        key: "u:alice".into(),
        window: t.clock.now().as_u64() / 60_000_000_000,
    };
    let view = t
        .regional
        .store()
        .ledger(&at)
        .await
        .expect("Redis answers")
        .expect("the ledger exists");
    assert_eq!(view.total(), 100, "Redis counts exactly what was admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zipf_workload_is_decided_locally_at_least_95_percent() {
    let server = RedisServer::start();
    // 2,000 users under a soft limit of 600 per minute each: the heads of the distribution
    // reach their limit, the tail does not.
    let t = topology(
        &server,
        "rate_limits:\n  endpoints:\n    \
         - { id: api, path: /api, limit: 600, window: 1m, key: user_id }\n",
        3,
    )
    .await;
    let zipf = Zipf::new(2000, 1.1);
    let mut rng = Rng::new(11);
    let names: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    let requests = 30_000;
    for i in 0..requests {
        let a = &t.agents[rng.below(3) as usize];
        let _ = a.check(&user(&names[zipf.sample(&mut rng)], "/api"));
        // 1,000 requests per second across the edges: a flush every 100 of them.
        t.clock.advance(Nanos::from_millis(1));
        if i % 100 == 99 {
            for a in &t.agents {
                let _ = a.flush().await;
            }
        }
    }
    let local: u64 = t.agents.iter().map(|a| a.stats().local).sum();
    let exact: u64 = t.agents.iter().map(|a| a.stats().exact).sum();
    let fallback: u64 = t.agents.iter().map(|a| a.stats().fallback).sum();
    assert_eq!(fallback, 0);
    let ratio = local as f64 / requests as f64;
    eprintln!("zipf: {local} of {requests} local ({ratio:.4}), {exact} exact");
    assert!(
        ratio >= 0.95,
        "{local} of {requests} local ({ratio:.4}), {exact} exact"
    );
    // The soft bound still holds for the heaviest key: admitted ≤ P + n·c0 = 600 + 3·20.
    for a in &t.agents {
        a.flush().await.expect("the regional answers");
    }
    let at = LedgerKey {
        limit: t.regional.rules().rule("api").expect("rule").limits()[0].id(),
        key: "u:user-0".into(),
        window: t.clock.now().as_u64() / 60_000_000_000,
    };
    let total = t
        .regional
        .store()
        .ledger(&at)
        .await
        .expect("Redis answers")
        .expect("the heaviest key was used")
        .total();
    eprintln!("zipf: heaviest key admitted {total}");
    assert!(total >= 600, "the heaviest key reached its limit ({total})");
    assert!(total <= 660, "soft overshoot beyond P + n·c0: {total}");
}

/// Three edges decide a hard token bucket's key locally under grants of its tokens, and the
/// bucket holds across edges, the exact path and a lease window's turn. Of a bucket of 50 at
/// 100/s: first 10 s of demand under the rate (1 to 4 requests per edge per 100 ms), every
/// request admitted and most of them without asking the regional; then 5 s of demand far
/// over it, where the three edges together admit no more than the bucket allows, `50 + 100/s`
/// over the whole run, and not much less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_decide_a_token_bucket_locally_and_the_bucket_holds() {
    bucket_holds("algorithm: token_bucket, rate: 100/s, burst: 50").await;
}

/// A leaky-bucket meter is the GCRA it equals (`shared`'s rules compile it so): granted to
/// edges and held as the token bucket is, where before every request took the exact path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_decide_a_leaky_meter_locally_and_the_bucket_holds() {
    bucket_holds("algorithm: leaky_bucket, mode: meter, rate: 100/s, burst: 50").await;
}

/// The run of the two tests above, for a hard bucket of 50 at 100/s spelt `algorithm`.
async fn bucket_holds(algorithm: &str) {
    let server = RedisServer::start();
    let rules = format!(
        "rate_limits:\n  endpoints:\n    \
         - {{ id: login, path: /login, {algorithm}, key: user_id, strictness: hard }}\n"
    );
    let t = topology(&server, &rules, 3).await;
    let mut rng = Rng::new(5);
    let round = |rng: &mut Rng, max: u64| {
        let sent: Vec<usize> = (0..3).map(|_| 1 + rng.below(max) as usize).collect();
        let admitted = burst_of(&t.agents, &sent);
        (sent.iter().sum::<usize>(), admitted)
    };
    let (mut sent, mut admitted) = (0, 0);
    for _ in 0..100 {
        let (s, a) = round(&mut rng, 4);
        sent += s;
        admitted += a;
        for a in &t.agents {
            a.flush().await.expect("the regional answers");
        }
        t.clock.advance(Nanos::from_millis(100));
    }
    let local: u64 = t.agents.iter().map(|a| a.stats().local).sum();
    let exact: u64 = t.agents.iter().map(|a| a.stats().exact).sum();
    eprintln!("under the rate: {admitted} of {sent} admitted, {local} local, {exact} exact");
    assert_eq!(admitted, sent, "under the rate everything is admitted");
    assert!(
        local as f64 >= 0.8 * sent as f64,
        "{local} of {sent} decided locally ({exact} exact)"
    );
    // Far over the rate: whatever the bucket held when this began (at most its 50), plus
    // what 100/s refills between the first round and the last, 4.9 s later.
    let mut over = 0;
    for _ in 0..50 {
        let (_, a) = round(&mut rng, 20);
        over += a;
        for a in &t.agents {
            let _ = a.flush().await;
        }
        t.clock.advance(Nanos::from_millis(100));
    }
    let fallback: u64 = t.agents.iter().map(|a| a.stats().fallback).sum();
    assert_eq!(fallback, 0, "every exact request was answered in time");
    eprintln!("over the rate: {over} admitted in 4.9 s, bound 540");
    assert!(
        over <= 50 + 490,
        "{over} admitted in 4.9 s, more than the bucket's 50 and 100/s"
    );
    // The tokens the rate refills are admitted, not stranded at edges that hold them unused.
    assert!(
        over >= 490,
        "only {over} admitted in 4.9 s of demand far over 100/s"
    );
}

/// One round of load: a thread per edge, each `sent[i]` logins for alice at once; what they
/// admitted.
fn burst_of(agents: &[Arc<Agent>], sent: &[usize]) -> usize {
    let handles: Vec<_> = agents
        .iter()
        .zip(sent)
        .map(|(agent, &n)| {
            let agent = agent.clone();
            std::thread::spawn(move || {
                (0..n)
                    .filter(|_| agent.check(&user("alice", "/login")).allowed)
                    .count()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("no check panics"))
        .sum()
}

/// A regional replica of region `eu` named `node` on `server`'s Redis, serving QUIC on a free
/// port: `(regional, endpoint, address)`.
async fn replica(
    server: &RedisServer,
    ca: &Ca,
    node: &str,
    rules: &RuleSet,
    clock: &ManualClock,
) -> (Arc<Regional>, quinn::Endpoint, SocketAddr) {
    let store = RedisStore::connect(&RedisTopology::Single(server.url()), Duration::from_secs(2))
        .await
        .expect("the test Redis is up");
    let regional = Arc::new(Regional::new(
        RegionalConfig::default(),
        rules.clone(),
        Arc::new(store),
        Arc::new(clock.clone()),
    ));
    // Every replica's certificate carries the name edges dial the region by.
    let identity = Identity::new(ca, &ca.issue(node, &[REGIONAL]).expect("DNS names"));
    let endpoint = net::server_endpoint("127.0.0.1:0".parse().expect("an address"), &identity)
        .expect("a free loopback port");
    let addr = endpoint.local_addr().expect("bound");
    let service = Arc::new(EdgeService::new(regional.clone(), node, REGION));
    tokio::spawn(net::serve(
        endpoint.clone(),
        service,
        Arc::new(NetStats::default()),
    ));
    (regional, endpoint, addr)
}

/// DESIGN §1: several replicas serve one region from one Redis. Four edges, two on each
/// replica (each edge lists both, its own first), race for one hard key of 400; before it is
/// spent, replica B shuts down and its edges fail over to A mid-window. The limit holds
/// exactly throughout: the ledger is in Redis, and an edge's counters are filed under the same
/// id by either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_hold_a_hard_limit_across_a_failover() {
    let server = RedisServer::start();
    let rules = RuleSet::from_yaml(
        "rules.yaml",
        "rate_limits:\n  endpoints:\n    \
         - { id: login, path: /login, limit: 400, window: 1m, key: user_id, strictness: hard }\n",
    )
    .expect("test rules parse");
    let clock = ManualClock::new(T0);
    let ca = Ca::generate("test deployment CA").expect("ring generates keys");
    let (a, _a_endpoint, a_addr) = replica(&server, &ca, "regional-eu-a", &rules, &clock).await;
    let (b, b_endpoint, b_addr) = replica(&server, &ca, "regional-eu-b", &rules, &clock).await;
    let mut agents = Vec::new();
    for e in 0..4 {
        // Each edge lists both replicas, its own first.
        let addresses = if e < 2 {
            vec![a_addr, b_addr]
        } else {
            vec![b_addr, a_addr]
        };
        agents.push(edge(&ca, &format!("edge-eu-{e}"), addresses, &rules, &clock).await);
    }
    assert_eq!((a.edges(), b.edges()), (2, 2), "two edges on each replica");

    let mut rng = Rng::new(23);
    let mut admitted = 0;
    for round in 0..40 {
        if round == 20 {
            assert!(
                admitted < 400,
                "the failover comes before the limit is spent ({admitted})"
            );
            b_endpoint.close(
                quinn::VarInt::from_u32(shared::wire::CloseCode::ShuttingDown.as_u32()),
                b"replica going away",
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while a.edges() < 4 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "B's edges fail over to A"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        admitted += burst(&agents, &mut rng, 6);
        for agent in &agents {
            let _ = agent.flush().await;
        }
        clock.advance(Nanos::from_millis(100));
    }
    for agent in &agents {
        agent.flush().await.expect("replica A answers everyone");
    }
    assert_eq!(admitted, 400, "never beyond the limit, none short");
    let at = LedgerKey {
        limit: rules.rule("login").expect("rule").limits()[0].id(),
        key: "u:alice".into(),
        window: clock.now().as_u64() / 60_000_000_000,
    };
    let view = a
        .store()
        .ledger(&at)
        .await
        .expect("Redis answers")
        .expect("the ledger exists");
    assert_eq!(view.total(), 400, "Redis counts exactly what was admitted");
    assert_eq!(
        view.edges.len(),
        4,
        "one set of counters per edge, whichever replica"
    );
}

/// DESIGN §4 and §7 together: an edge waits 50 ms for an exact answer (and, waiting in vain,
/// decides by its failure modes and stops asking for a while), while an escalation may take
/// far longer across regions. The edge's `Hello` says how long it waits, so the regional stops
/// waiting for the transfer in time and denies (for the hold only); the edge decides that
/// request exactly, never by a failure mode, and once the transfer has landed it admits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_is_answered_in_time_while_a_transfer_runs() {
    let rules = crate::regional::rules();
    let clock = ManualClock::new(T0 + Nanos::from_secs(5));
    let slow = Arc::new(crate::regional::SlowCoordinator {
        delay: Duration::from_millis(500),
        asks: Default::default(),
    });
    // No grants (θ as small as it goes): every decision is the regional's.
    let config = RegionalConfig {
        threshold: shared::quota::Threshold::from_ppm(1).expect("in range"),
        ..RegionalConfig::default()
    };
    let regional = Arc::new(crate::regional::escalating_regional(
        config,
        &clock,
        slow.clone(),
        Duration::from_secs(5),
    ));
    let ca = Ca::generate("test deployment CA").expect("ring generates keys");
    let identity = Identity::new(&ca, &ca.issue(REGIONAL, &[]).expect("a DNS name"));
    let endpoint = net::server_endpoint("127.0.0.1:0".parse().expect("an address"), &identity)
        .expect("a free loopback port");
    let addr = endpoint.local_addr().expect("bound");
    let service = Arc::new(EdgeService::new(regional.clone(), REGIONAL, REGION));
    tokio::spawn(net::serve(
        endpoint.clone(),
        service,
        Arc::new(NetStats::default()),
    ));
    let agent = edge(&ca, "edge-eu-0", vec![addr], &rules, &clock).await;
    assert_eq!(agent.config().upstream_timeout, Duration::from_millis(50));

    let check = |agent: Arc<Agent>| {
        tokio::task::spawn_blocking(move || agent.check(&user("alice", "/login")))
    };
    for i in 0..50 {
        let decision = check(agent.clone()).await.expect("no check panics");
        assert!(decision.allowed, "request {i} of the region's 50");
    }
    let denied = check(agent.clone()).await.expect("no check panics");
    assert!(
        !denied.allowed,
        "the region's partition is spent: {denied:?} {:?}",
        agent.stats()
    );
    let stats = agent.stats();
    assert_eq!(
        (stats.exact, stats.fallback),
        (51, 0),
        "every decision the regional's, none a failure mode's"
    );
    assert_eq!(slow.asks.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The transfer lands; once the denial's hold is over the edge asks, and is admitted.
    let window = (T0.as_u64() + 5_000_000_000) / 60_000_000_000;
    let login = rules.rule("login").expect("the rule").limits()[0].id();
    crate::regional::until_alice_is_above(&regional, login, window, 50).await;
    clock.advance(RegionalConfig::default().hold);
    let admitted = check(agent.clone()).await.expect("no check panics");
    assert!(admitted.allowed, "the landed quota admits");
    assert_eq!(agent.stats().fallback, 0);
}

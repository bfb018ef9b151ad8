//! The stores side by side in one run: a full sync batch (1,024 keys) and a single exact
//! check-and-consume, on the memory store and on a real `redis-server` this bench starts on
//! a free port. Redis figures include the loopback round trip; compare medians and ratios
//! (these machines are noisy).
//!
//! After the groups it prints Redis commands per sync entry and per exact op, read from
//! `INFO commandstats`.
//!
//! Then end to end, an edge's exact path as it really runs: `QuicUpstream::acquire` over
//! loopback QUIC with mutual TLS to a `Regional` on memory and on Redis (criterion medians,
//! then p50/p99/p99.9 of 20,000 sequential calls, which criterion does not report), a whole
//! sync batch through a `Regional` (keys per second), and Redis commands per decision for a
//! Zipf workload through three edge agents.

use std::{
    hint::black_box,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edge_agent::{Agent, AgentConfig, QuicConfig, QuicUpstream, Request, Upstream};
use regional_aggregator::{
    Regional, RegionalConfig,
    server::EdgeService,
    store::{Bounds, ExactOp, LedgerKey, MemoryStore, RedisStore, RedisTopology, Store, SyncOp},
};
use shared::{
    Clock, LimitId, ManualClock, Nanos, RuleSet, SystemClock,
    net::{self, Ca, Identity, NetStats},
    quota::{DEFAULT_THRESHOLD, EdgeId},
    sim::{Rng, Zipf},
    wire::{Acquire, Check, SyncBatch, SyncEntry},
};

#[path = "../tests/support/redis.rs"]
#[allow(dead_code)]
mod redis_support;

const WINDOW: u64 = 60_000_000_000;

fn key(i: u64) -> LedgerKey {
    LedgerKey {
        limit: LimitId::from_name("bench"),
        key: format!("u:user-{i}"),
        window: 1,
    }
}

fn batch(round: u64) -> Vec<SyncOp> {
    (0..1024)
        .map(|i| SyncOp {
            at: key(i),
            used: round,
            released: 0,
            want: 10,
            bounds: Bounds::new(1 << 30, DEFAULT_THRESHOLD, 4, 0),
            expire_at: Nanos(3 * WINDOW),
            exact_since: None,
        })
        .collect()
}

fn exact_op() -> [ExactOp; 1] {
    [ExactOp {
        at: key(1_000_000),
        cost: 1,
        want: 0,
        bounds: Bounds::new(1 << 39, DEFAULT_THRESHOLD, 4, 0),
        expire_at: Nanos(3 * WINDOW),
        exact_since: None,
    }]
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let server = redis_support::RedisServer::start();
    let redis = rt
        .block_on(RedisStore::connect(
            &RedisTopology::Single(server.url()),
            Duration::from_secs(2),
        ))
        .expect("the bench's Redis is up");
    let list: [(&str, Arc<dyn Store>); 2] = [
        ("memory", Arc::new(MemoryStore::new())),
        ("redis", Arc::new(redis)),
    ];
    let now = Nanos(WINDOW + 1);

    let mut group = c.benchmark_group("sync_batch");
    group.throughput(Throughput::Elements(1024));
    for (name, store) in &list {
        let mut round = 0;
        group.bench_function(BenchmarkId::new(*name, 1024), |b| {
            b.iter(|| {
                round += 1;
                let ops = batch(round);
                black_box(rt.block_on(store.sync(EdgeId(1), now, &ops)).expect("sync"))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("exact");
    for (name, store) in &list {
        let op = exact_op();
        group.bench_function(*name, |b| {
            b.iter(|| {
                black_box(
                    rt.block_on(store.exact(EdgeId(1), now, &op))
                        .expect("exact"),
                )
            })
        });
    }
    group.finish();

    // Commands per operation: a known number of each, counted by Redis itself.
    server.cli(&["CONFIG", "RESETSTAT"]);
    let redis = &list[1].1;
    rt.block_on(redis.sync(EdgeId(2), now, &batch(1)))
        .expect("sync");
    for _ in 0..100 {
        rt.block_on(redis.exact(EdgeId(2), now, &exact_op()))
            .expect("exact");
    }
    let stats = server.cli(&["INFO", "commandstats"]);
    let calls: u64 = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter_map(|l| {
            let calls = l.split("calls=").nth(1)?.split(',').next()?;
            calls.parse::<u64>().ok()
        })
        .sum();
    // EVALSHA is the one command per operation on the wire (pipelined per batch); the rest
    // are the commands the scripts run inside Redis.
    let ops = 1024 + 100;
    println!(
        "redis commands (incl. inside scripts): {calls} for {ops} store operations \
         (1,024 sync entries, 100 exact)"
    );
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
        println!("  {line}");
    }
}

/// Redis's own count of the commands it ran since the last `CONFIG RESETSTAT`, in total and
/// `EVALSHA`s (the commands on the wire), with the per-command lines.
fn commands(server: &redis_support::RedisServer) -> (u64, u64, Vec<String>) {
    let stats = server.cli(&["INFO", "commandstats"]);
    let lines: Vec<String> = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .map(str::to_owned)
        .collect();
    let calls =
        |l: &str| -> Option<u64> { l.split("calls=").nth(1)?.split(',').next()?.parse().ok() };
    let total = lines.iter().filter_map(|l| calls(l)).sum();
    let evalsha = lines
        .iter()
        .filter(|l| l.starts_with("cmdstat_evalsha:"))
        .filter_map(|l| calls(l))
        .sum();
    (total, evalsha, lines)
}

const REGIONAL: &str = "regional-bench";

/// A regional on `store` serving QUIC on a free loopback port, and an edge's upstream
/// connected to it.
fn serve(
    rt: &tokio::runtime::Runtime,
    ca: &Ca,
    rules: &RuleSet,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock + Send + Sync>,
    edge: &str,
) -> (quinn::Endpoint, Arc<QuicUpstream>) {
    rt.block_on(async {
        let regional = Arc::new(Regional::new(
            RegionalConfig::default(),
            rules.clone(),
            store,
            clock,
        ));
        let identity = Identity::new(ca, &ca.issue(REGIONAL, &[]).expect("a DNS name"));
        let endpoint = net::server_endpoint("127.0.0.1:0".parse().expect("an address"), &identity)
            .expect("a free port");
        let addr = endpoint.local_addr().expect("bound");
        tokio::spawn(net::serve(
            endpoint.clone(),
            Arc::new(EdgeService::new(regional, REGIONAL, "eu")),
            Arc::new(NetStats::default()),
        ));
        let identity = Identity::new(ca, &ca.issue(edge, &[]).expect("a DNS name"));
        let upstream =
            QuicUpstream::connect(QuicConfig::new(vec![addr], REGIONAL, identity, edge, "eu"))
                .expect("inside a runtime");
        tokio::time::timeout(Duration::from_secs(5), upstream.connected())
            .await
            .expect("connects over loopback");
        (endpoint, upstream)
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let server = redis_support::RedisServer::start();
    let redis: Arc<dyn Store> = Arc::new(
        rt.block_on(RedisStore::connect(
            &RedisTopology::Single(server.url()),
            Duration::from_secs(2),
        ))
        .expect("the bench's Redis is up"),
    );
    let ca = Ca::generate("bench CA").expect("ring generates keys");
    // A limit no run reaches: every call is a real check-and-consume that admits.
    let rules = RuleSet::from_yaml(
        "rules.yaml",
        "rate_limits:\n  endpoints:\n    \
         - { id: login, path: /login, limit: 1000000000, window: 1d, key: user_id, strictness: hard }\n",
    )
    .expect("bench rules parse");
    let limit = rules.rule("login").expect("rule").limits()[0].id();
    let day = Nanos::from_secs(86_400).as_u64();
    let mut request_id = 0;
    let mut acquire = move || {
        request_id += 1;
        Acquire {
            request_id,
            checks: vec![Check {
                limit,
                key: "u:alice".into(),
                window: SystemClock.now().as_u64() / day,
                cost: NonZeroU32::MIN,
                want: 0,
            }],
        }
    };
    let list: [(&str, Arc<dyn Store>); 2] =
        [("memory", Arc::new(MemoryStore::new())), ("redis", redis)];

    // A whole sync batch through a regional (rules, bounds, the store, the ack), no network:
    // keys per second one regional merges.
    let mut group = c.benchmark_group("regional_sync");
    group.throughput(Throughput::Elements(1024));
    let clock = Arc::new(SystemClock);
    for (name, store) in &list {
        let regional = Regional::new(
            RegionalConfig::default(),
            rules.clone(),
            store.clone(),
            clock.clone(),
        );
        let mut used = 0;
        group.bench_function(BenchmarkId::new(*name, 1024), |b| {
            b.iter(|| {
                used += 1;
                let window = SystemClock.now().as_u64() / day;
                let entries = (0..1024)
                    .map(|i| SyncEntry {
                        limit,
                        key: format!("u:user-{i}"),
                        window,
                        used,
                        released: 0,
                        want: 10,
                    })
                    .collect();
                black_box(
                    rt.block_on(regional.sync(EdgeId(1), SyncBatch { entries }))
                        .expect("sync"),
                )
            })
        });
    }
    group.finish();

    let mut upstreams = Vec::new();
    let mut group = c.benchmark_group("exact_over_quic");
    for (name, store) in list {
        let (endpoint, upstream) = serve(
            &rt,
            &ca,
            &rules,
            store,
            Arc::new(SystemClock),
            &format!("edge-{name}"),
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let reply = rt.block_on(upstream.acquire(acquire())).expect("answered");
                assert!(reply.allowed);
                black_box(reply)
            })
        });
        upstreams.push((name, endpoint, upstream));
    }
    group.finish();
    for (name, _endpoint, upstream) in &upstreams {
        let mut took: Vec<Duration> = (0..20_000)
            .map(|_| {
                let started = Instant::now();
                let reply = rt.block_on(upstream.acquire(acquire())).expect("answered");
                assert!(reply.allowed);
                started.elapsed()
            })
            .collect();
        took.sort_unstable();
        println!(
            "exact over QUIC, {name}: p50 {:?}  p99 {:?}  p99.9 {:?}  max {:?}  (20,000 sequential calls)",
            percentile(&took, 0.50),
            percentile(&took, 0.99),
            percentile(&took, 0.999),
            took[took.len() - 1],
        );
    }

    // Zipf: 3 edges, 2,000 users under a soft 600/min, 30,000 requests at a simulated 1,000/s
    // (a flush every 100), as tests/quic.rs runs it; Redis counts the commands.
    let rules = RuleSet::from_yaml(
        "rules.yaml",
        "rate_limits:\n  endpoints:\n    - { id: api, path: /api, limit: 600, window: 1m, key: user_id }\n",
    )
    .expect("bench rules parse");
    let clock = ManualClock::new(Nanos(1_800_000_000_000_000_000));
    let redis: Arc<dyn Store> = Arc::new(
        rt.block_on(RedisStore::connect(
            &RedisTopology::Single(server.url()),
            Duration::from_secs(2),
        ))
        .expect("the bench's Redis is up"),
    );
    let regional = Arc::new(Regional::new(
        RegionalConfig::default(),
        rules.clone(),
        redis,
        Arc::new(clock.clone()),
    ));
    let identity = Identity::new(&ca, &ca.issue(REGIONAL, &[]).expect("a DNS name"));
    let agents: Vec<Agent> = rt.block_on(async {
        let endpoint = net::server_endpoint("127.0.0.1:0".parse().expect("an address"), &identity)
            .expect("a free port");
        let addr = endpoint.local_addr().expect("bound");
        tokio::spawn(net::serve(
            endpoint,
            Arc::new(EdgeService::new(regional, REGIONAL, "eu")),
            Arc::new(NetStats::default()),
        ));
        let mut agents = Vec::new();
        for e in 0..3 {
            let node = format!("edge-zipf-{e}");
            let identity = Identity::new(&ca, &ca.issue(&node, &[]).expect("a DNS name"));
            let upstream =
                QuicUpstream::connect(QuicConfig::new(vec![addr], REGIONAL, identity, node, "eu"))
                    .expect("inside a runtime");
            tokio::time::timeout(Duration::from_secs(5), upstream.connected())
                .await
                .expect("connects over loopback");
            agents.push(
                Agent::builder(AgentConfig::default(), rules.clone(), upstream)
                    .clock(Arc::new(clock.clone()))
                    .build()
                    .expect("inside a runtime"),
            );
        }
        agents
    });
    server.cli(&["CONFIG", "RESETSTAT"]);
    let zipf = Zipf::new(2000, 1.1);
    let mut rng = Rng::new(11);
    let names: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    let requests = 30_000u64;
    for i in 0..requests {
        let agent = &agents[rng.below(3) as usize];
        let user = &names[zipf.sample(&mut rng)];
        black_box(agent.check(&Request {
            user_id: Some(user),
            ..Request::new("GET", "/api")
        }));
        clock.advance(Nanos::from_millis(1));
        if i % 100 == 99 {
            for agent in &agents {
                let _ = rt.block_on(agent.flush());
            }
        }
    }
    for agent in &agents {
        let _ = rt.block_on(agent.flush());
    }
    let (total, evalsha, lines) = commands(&server);
    let local: u64 = agents.iter().map(|a| a.stats().local).sum();
    println!(
        "zipf through 3 edges: {requests} decisions, {:.1}% local; Redis: {evalsha} EVALSHA \
         ({:.4} per decision), {total} commands in all incl. inside scripts ({:.4} per decision)",
        100.0 * local as f64 / requests as f64,
        evalsha as f64 / requests as f64,
        total as f64 / requests as f64,
    );
    for line in lines {
        println!("  {line}");
    }
}

criterion_group!(benches, stores, end_to_end);
criterion_main!(benches);

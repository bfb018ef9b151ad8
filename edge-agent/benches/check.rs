//! `Agent::check` on its local paths, side by side with governor's keyed `check_key`, in one
//! run on one machine (these machines are noisy: compare medians and ratios, not absolutes).
//!
//! The agent's upstream here is a generous fake that grants every key far more than the bench
//! uses, with the sync loop running, so the figures are the cost of `check` itself (matching,
//! the key's map entry, the reservation) with a grant held, not of the regional's grant
//! sizing. Groups:
//!
//! - `fast_path/{agent,governor}/{keys}/{threads}`: 1, 1,000 and 100,000 keys, 1 and 2
//!   threads; throughput is aggregate requests per second across the threads.
//! - `cached_denial`: a key the regional denied, denied again locally.
//! - `cold_key`: every request a key this edge has never seen (soft rule, cold allowance).
//!
//! Before the groups it prints the memory per active key, measured as the growth of the
//! process's resident set over 1,000,000 keys.

use std::{
    hint::black_box,
    num::NonZeroU32,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edge_agent::{Agent, AgentConfig, EdgeMetrics, Request, Upstream, UpstreamFuture};
use governor::{Quota, RateLimiter};
use shared::{
    Nanos, RuleSet,
    wire::{AckEntry, Acquire, AcquireReply, CheckOutcome, SyncAck, SyncBatch},
};

/// Grants every key a ceiling far above what the bench can use.
struct Generous {
    allow: bool,
}

const PLENTY: u64 = 1 << 50;

impl Upstream for Generous {
    fn sync(&self, batch: SyncBatch) -> UpstreamFuture<SyncAck> {
        let entries = batch
            .entries
            .into_iter()
            .map(|e| AckEntry {
                limit: e.limit,
                key: e.key,
                window: e.window,
                // Rebased like the real regional's grant: on what the edge used and handed
                // back, so an idle release between bench phases does not starve the key.
                granted: e.used + e.released + PLENTY,
                total: e.used,
                edges: 1,
                hot: false,
                used: e.used,
                released: e.released,
                near_limit: false,
                recall: false,
            })
            .collect();
        Box::pin(async move {
            Ok(SyncAck {
                entries,
                hot_keys: Vec::new(),
                partitions: Vec::new(),
                recalls: Vec::new(),
            })
        })
    }

    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply> {
        let allow = self.allow;
        let end = Nanos::from_secs(4_000_000_000);
        let checks = request
            .checks
            .iter()
            .map(|_| CheckOutcome {
                allowed: allow,
                remaining: PLENTY,
                reset_at: end,
                granted: if allow { u64::MAX / 2 } else { 0 },
            })
            .collect();
        Box::pin(async move {
            Ok(AcquireReply {
                request_id: request.request_id,
                allowed: allow,
                checks,
                reset_at: end,
                retry_after: if allow {
                    Nanos::ZERO
                } else {
                    Nanos::from_secs(3600)
                },
            })
        })
    }
}

const RULES: &str = "rate_limits:\n  endpoints:\n    \
    - { path: /api/search, method: GET, limit: 1000000000000, window: 1h, key: user_id }\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("a runtime")
}

fn agent(rt: &tokio::runtime::Runtime, allow: bool, yaml: &str) -> Agent {
    let rules = RuleSet::from_yaml("bench.yaml", yaml).expect("bench rules");
    let agent = Agent::builder(AgentConfig::default(), rules, Arc::new(Generous { allow }))
        .runtime(rt.handle().clone())
        .build()
        .expect("a runtime was given");
    agent.spawn_sync_loop();
    agent
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i:08}")).collect()
}

fn search(user: &str) -> Request<'_> {
    Request {
        user_id: Some(user),
        ..Request::new("GET", "/api/search")
    }
}

/// Runs `iters` calls of `f` split over `threads` threads, returning the wall time.
fn run_threads(iters: u64, threads: usize, f: impl Fn(usize, u64) + Sync) -> Duration {
    let per = iters / threads as u64;
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || {
                for i in 0..per {
                    f(t, i);
                }
            });
        }
    });
    start.elapsed()
}

fn fast_path(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("fast_path");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    for n in [1usize, 1000, 100_000] {
        let users = keys(n);
        let agent = agent(&rt, true, RULES);
        // Warm every key (first request exact, then a sync grants plenty).
        for u in &users {
            agent.check(&search(u));
        }
        rt.block_on(agent.flush()).expect("the fake answers");
        let governor = RateLimiter::keyed(Quota::per_second(NonZeroU32::MAX));
        for u in &users {
            let _ = governor.check_key(u);
        }
        for threads in [1usize, 2] {
            group.throughput(Throughput::Elements(1));
            let id = format!("{n}/{threads}");
            group.bench_function(BenchmarkId::new("agent", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(iters, threads, |t, i| {
                        let u = &users[((i as usize).wrapping_mul(7919) + t * 31) % n];
                        black_box(agent.check(&search(u)));
                    })
                })
            });
            group.bench_function(BenchmarkId::new("governor", &id), |b| {
                b.iter_custom(|iters| {
                    run_threads(iters, threads, |t, i| {
                        let u = &users[((i as usize).wrapping_mul(7919) + t * 31) % n];
                        let _ = black_box(governor.check_key(u));
                    })
                })
            });
        }
        let local = agent.stats().local as f64;
        let all = local + agent.stats().exact as f64;
        println!(
            "fast_path {n} keys: {:.4} of the agent's decisions local",
            local / all
        );
    }
    group.finish();
}

fn other_paths(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("paths");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(1));

    // A key the regional denied: every later request is denied from the cache.
    let denier = agent(&rt, false, RULES);
    let user = "denied-user";
    assert!(!denier.check(&search(user)).allowed);
    group.bench_function("cached_denial", |b| {
        b.iter(|| black_box(denier.check(&search(user))))
    });

    // Every request a new key: a soft rule's cold allowance admits it locally once `n` is
    // known (after one sync). Keys are generated into a stack buffer, so the only allocation
    // is the map entry the agent creates, which is the cost being measured.
    let cold = agent(&rt, true, RULES);
    cold.check(&search("seed"));
    rt.block_on(cold.flush()).expect("the fake answers");
    let mut next = 0u64;
    let mut buf = [0u8; 20];
    group.bench_function("cold_key", |b| {
        b.iter(|| {
            next += 1;
            let key = render(next, &mut buf);
            black_box(cold.check(&search(key)))
        })
    });
    group.finish();
}

/// Memory per active key: the resident set's growth over 1,000,000 keys, each checked once
/// (so each holds a map entry with its window counters).
fn memory_per_key() {
    let rt = runtime();
    // No sync loop here: its batches would be counted as the keys' memory.
    let rules = RuleSet::from_yaml("bench.yaml", RULES).expect("bench rules");
    let agent = Agent::builder(
        AgentConfig::default(),
        rules,
        Arc::new(Generous { allow: true }),
    )
    .runtime(rt.handle().clone())
    .build()
    .expect("a runtime was given");
    let users = keys(1_000_000);
    let before = resident_bytes();
    for u in &users {
        agent.check(&search(u));
    }
    let after = resident_bytes();
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "memory per active key: {} B (resident set growth over 1,000,000 keys)",
            (after.saturating_sub(before)) / 1_000_000
        );
    }
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn render(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// What counting a decision costs when threads count at once: one atomic add on a line every
/// thread shares (prometheus-client's `Counter`) against one on the thread's own stripe
/// (`shared::metrics::Counter`, what the edge's metrics use), and the edge's whole
/// `EdgeMetrics::record` (a counter and a latency histogram).
fn counting(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("counting");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    let agent = Arc::new(agent(&rt, true, RULES));
    let decision = agent.check(&search("counted"));
    let metrics = EdgeMetrics::new(agent.clone(), None);
    let shared_line = prometheus_client::metrics::counter::Counter::<u64>::default();
    let striped = shared::metrics::Counter::default();
    for threads in [1usize, 2] {
        group.bench_function(BenchmarkId::new("shared_line", threads), |b| {
            b.iter_custom(|iters| {
                run_threads(iters, threads, |_, _| {
                    black_box(shared_line.inc());
                })
            })
        });
        group.bench_function(BenchmarkId::new("striped", threads), |b| {
            b.iter_custom(|iters| run_threads(iters, threads, |_, _| striped.inc()))
        });
        group.bench_function(BenchmarkId::new("record", threads), |b| {
            b.iter_custom(|iters| {
                run_threads(iters, threads, |_, i| {
                    metrics.record(&decision, Duration::from_nanos(200 + i % 64));
                })
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    memory_per_key();
    fast_path(c);
    other_paths(c);
    counting(c);
}

criterion_group!(check, benches);
criterion_main!(check);

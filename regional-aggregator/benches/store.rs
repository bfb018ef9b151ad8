//! The stores side by side in one run: a full sync batch (1,024 keys) and a single exact
//! check-and-consume, on the memory store and on a real `redis-server` this bench starts on
//! a free port. Redis figures include the loopback round trip; compare medians and ratios
//! (these machines are noisy).
//!
//! After the groups it prints Redis commands per sync entry and per exact op, read from
//! `INFO commandstats`.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use regional_aggregator::store::{
    Bounds, ExactOp, LedgerKey, MemoryStore, RedisStore, RedisTopology, Store, SyncOp,
};
use shared::{
    LimitId, Nanos,
    quota::{DEFAULT_THRESHOLD, EdgeId},
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

criterion_group!(benches, stores);
criterion_main!(benches);

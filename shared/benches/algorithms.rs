//! One `acquire` per iteration for each algorithm (`algorithm/<name>`), on a moving
//! [`ManualClock`] so the number is the algorithm's own cost, not the OS clock's.
//!
//! Every limiter allows 100 per second (buckets: 100 per second, capacity 100). Requests
//! arrive at about 1.5 times that rate, with gaps drawn from a fixed seed, so the steady state
//! mixes allows and denials (about two thirds allowed) and windows roll over as they would in
//! production. The sliding log holds up to its limit of entries, which is its realistic cost.

use std::{
    hint::black_box,
    num::{NonZeroU32, NonZeroU64},
};

use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use shared::{
    Clock, ManualClock, Nanos,
    algorithm::{Algorithm, FixedWindow, Gcra, LeakyBucket, LeakyMode, SlidingLog, SlidingWindow},
};

/// The benchmark group, run from `benches/shared.rs`.
pub fn bench(c: &mut Criterion) {
    let limit = NonZeroU64::new(LIMIT).expect("LIMIT is not zero");
    let window = Nanos::from_secs(1);
    let steps = arrival_gaps();
    let mut group = c.benchmark_group("algorithm");
    group.throughput(Throughput::Elements(1));

    let fixed = FixedWindow::new(limit, window).expect("window is not zero");
    bench_one(&mut group, "fixed_window", fixed, &steps);
    let sliding = SlidingWindow::new(limit, window).expect("window is not zero");
    bench_one(&mut group, "sliding_window", sliding, &steps);
    let log = SlidingLog::new(limit, window).expect("window is not zero");
    bench_one(&mut group, "sliding_log", log, &steps);
    let gcra = Gcra::new(limit, window, limit).expect("10 ms emission interval");
    bench_one(&mut group, "gcra", gcra, &steps);
    let meter = LeakyBucket::new(limit, window, limit, LeakyMode::Meter).expect("10 ms drain");
    bench_one(&mut group, "leaky_meter", meter, &steps);
    let shaper = LeakyBucket::new(limit, window, limit, LeakyMode::Shaper).expect("10 ms drain");
    bench_one(&mut group, "leaky_shaper", shaper, &steps);

    group.finish();
}

/// Times `acquire` of cost 1 on one key, the clock moving by the next gap each iteration.
fn bench_one<A: Algorithm>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    algorithm: A,
    gaps: &[Nanos],
) {
    group.bench_function(BenchmarkId::from_parameter(name), |b| {
        let clock = ManualClock::new(START);
        let mut state = A::State::default();
        let mut next = gaps.iter().cycle();
        b.iter(|| {
            clock.advance(*next.next().expect("cycle of a non-empty table"));
            black_box(algorithm.acquire(&mut state, clock.now(), NonZeroU32::MIN))
        });
    });
}

/// Gaps uniform in `[0, 2·mean)` with `mean = 1 s / (1.5·LIMIT)`, from a fixed seed
/// (xorshift64), so every run times the same sequence.
fn arrival_gaps() -> Vec<Nanos> {
    let mean = Nanos::from_secs(1).as_u64() * 2 / (3 * LIMIT);
    let mut x = SEED;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Nanos(x % (2 * mean))
        })
        .collect()
}

/// Limit per second of every benchmarked limiter.
const LIMIT: u64 = 100;
/// Seed of the arrival gaps.
const SEED: u64 = 0x5eed_1234_abcd_ef01;
/// A realistic start: 2023-11-14, in nanoseconds since the epoch.
const START: Nanos = Nanos(1_700_000_000_000_000_000);

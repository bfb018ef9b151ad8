//! The five algorithms against their reference models (`tests/reference`), and the promises
//! every [`Outcome`] makes, on random runs of `(now, cost)`.
//!
//! At every step of a run, for each algorithm:
//!
//! - the algorithm, the same algorithm behind [`Limiter`], and the reference model return the
//!   same [`Outcome`] (verdict, limit, remaining, reset_at, retry_after);
//! - `check` leaves the state as it found it;
//! - after a denial, the same cost is allowed at `now + retry_after` and not one nanosecond
//!   earlier (the retry promise, as governor's proptests check it);
//! - `remaining` is exactly the largest cost that fits now (a cost of `remaining` is allowed,
//!   `remaining + 1` is not), on allows and denials alike;
//! - at `reset_at` the limiter reports its whole limit as remaining;
//! - a cost above the limit is [`Verdict::InsufficientCapacity`], and only that.
//!
//! A refund (token bucket, leaky bucket, sliding log) right after the acquire it takes back
//! leaves a state that every later check reads exactly as the state before the acquire.
//!
//! Runs mix gaps of zero, a few nanoseconds, about one window, several windows and fractions of
//! a window, so edges, rollovers and refills all happen; costs go up to `limit + 2`.

use std::num::{NonZeroU32, NonZeroU64};

use proptest::{prelude::*, test_runner::FileFailurePersistence};
use shared::{
    Nanos,
    algorithm::{
        Algorithm, FixedWindow, Gcra, LeakyBucket, LeakyMode, Limiter, LimiterState, Outcome,
        SlidingLog, SlidingLogState, SlidingWindow, Verdict,
    },
};

use crate::reference::{Model, Reference};

/// 256 cases; shrunk failures are kept in `algorithms.regressions` beside this file.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// The time between two requests, relative to the limiter's window (or a bucket's refill time).
#[derive(Clone, Copy, Debug)]
enum Gap {
    /// The same instant.
    Zero,
    /// A few nanoseconds.
    Small(u64),
    /// One window, give or take a nanosecond: `W − 1`, `W`, `W + 1`.
    AboutWindow(u64),
    /// `n` whole windows plus `thousandths` of one.
    Windows(u64, u64),
    /// `thousandths` of a window.
    Fraction(u64),
}

impl Gap {
    fn nanos(self, window: u64) -> u64 {
        match self {
            Gap::Zero => 0,
            Gap::Small(n) => n,
            Gap::AboutWindow(k) => window + k - 1,
            Gap::Windows(n, f) => n * window + window * f / 1000,
            Gap::Fraction(f) => window * f / 1000,
        }
    }
}

fn gap() -> impl Strategy<Value = Gap> {
    prop_oneof![
        3 => Just(Gap::Zero),
        3 => (1u64..=3).prop_map(Gap::Small),
        2 => (0u64..3).prop_map(Gap::AboutWindow),
        1 => (2u64..=4, 0u64..1000).prop_map(|(n, f)| Gap::Windows(n, f)),
        4 => (0u64..1000).prop_map(Gap::Fraction),
    ]
}

/// Where a run starts: the epoch, just after it, or a realistic Unix time in nanoseconds.
fn start() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..1_000,
        (0u64..1_000_000_000).prop_map(|n| 1_700_000_000_000_000_000 + n),
    ]
}

/// A run of `(gap, cost)` steps with costs in `1..=limit + 2`, mostly ones that can fit.
fn steps(limit: u64) -> impl Strategy<Value = Vec<(Gap, u32)>> {
    let limit = u32::try_from(limit).expect("small limits");
    let cost = prop_oneof![6 => 1..=limit, 1 => limit + 1..=limit + 2];
    prop::collection::vec((gap(), cost), 1..64)
}

/// A window algorithm's parameters and a run: `(limit, window, start, steps)`.
fn windowed() -> impl Strategy<Value = (u64, u64, u64, Vec<(Gap, u32)>)> {
    let window = prop_oneof![4 => 1u64..=200, 1 => Just(1_000_000_000u64)];
    (1u64..=8, window, start()).prop_flat_map(|(limit, window, start)| {
        (Just(limit), Just(window), Just(start), steps(limit))
    })
}

/// A bucket's parameters and a run: `(limit, period, burst, start, steps)`. The period is
/// `limit·interval + r` with `r < limit`, so `period / limit` rounds down by `r / limit`.
fn bucket() -> impl Strategy<Value = (u64, u64, u64, u64, Vec<(Gap, u32)>)> {
    (1u64..=8, 1u64..=50, 1u64..=8, start()).prop_flat_map(|(limit, interval, burst, start)| {
        let period = (0..limit).prop_map(move |r| limit * interval + r);
        (Just(limit), period, Just(burst), Just(start), steps(burst))
    })
}

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).expect("strategies draw limits from 1 up")
}

/// Runs `steps` through the algorithm, the same algorithm as a [`Limiter`] and the reference,
/// checking agreement and the promises at every step.
fn run<A: Algorithm>(
    algorithm: &A,
    limiter: &Limiter,
    mut reference: Reference,
    start: u64,
    steps: &[(Gap, u32)],
) -> Result<(), TestCaseError> {
    let mut state = A::State::default();
    let mut limiter_state = limiter.new_state();
    let scale = limiter.window().as_u64();
    let mut now = start;
    for &(gap, cost) in steps {
        now += gap.nanos(scale);
        let (at, cost) = (Nanos(now), NonZeroU32::new(cost).expect("costs start at 1"));

        let before = state.clone();
        let got = algorithm.check(&state, at, cost);
        prop_assert_eq!(&state, &before, "check changed the state");
        let want = reference.acquire(at, cost);
        prop_assert_eq!(got, want, "algorithm vs reference at {} cost {}", now, cost);
        let via_limiter = limiter.acquire(&mut limiter_state, at, cost);
        prop_assert_eq!(
            got,
            via_limiter,
            "algorithm vs Limiter at {} cost {}",
            now,
            cost
        );
        if got.is_allowed() {
            algorithm.consume(&mut state, at, cost);
        }

        prop_assert_eq!(
            got.verdict == Verdict::InsufficientCapacity,
            u64::from(cost.get()) > got.limit
        );
        keeps_the_retry_promise(algorithm, &state, at, cost, &got)?;
        remaining_is_exact(algorithm, &state, at, &got)?;
        full_again_at_reset(algorithm, &state, &got)?;
    }
    Ok(())
}

/// After a denial with `retry_after = r`: allowed at `now + r`, denied at `now + r − 1`.
fn keeps_the_retry_promise<A: Algorithm>(
    algorithm: &A,
    state: &A::State,
    now: Nanos,
    cost: NonZeroU32,
    outcome: &Outcome,
) -> Result<(), TestCaseError> {
    if outcome.verdict != Verdict::Deny {
        return Ok(());
    }
    let r = outcome.retry_after;
    prop_assert!(r > Nanos::ZERO, "a denial must ask for a wait");
    let then = algorithm.check(state, now + r, cost);
    prop_assert!(
        then.is_allowed(),
        "denied again at now + retry_after: {:?}",
        then
    );
    let just_before = algorithm.check(state, now + r - Nanos(1), cost);
    prop_assert!(
        !just_before.is_allowed(),
        "allowed before retry_after: {:?}",
        just_before
    );
    Ok(())
}

/// `remaining` is the largest cost that fits at `now` on the state after the decision.
fn remaining_is_exact<A: Algorithm>(
    algorithm: &A,
    state: &A::State,
    now: Nanos,
    outcome: &Outcome,
) -> Result<(), TestCaseError> {
    let remaining = u32::try_from(outcome.remaining).expect("test limits are small");
    if let Some(fits) = NonZeroU32::new(remaining) {
        let o = algorithm.check(state, now, fits);
        prop_assert!(
            o.is_allowed(),
            "a cost of remaining = {} is refused",
            remaining
        );
    }
    let one_more = NonZeroU32::new(remaining + 1).expect("remaining + 1 ≥ 1");
    let o = algorithm.check(state, now, one_more);
    prop_assert!(
        !o.is_allowed(),
        "remaining = {} but one more fits",
        remaining
    );
    Ok(())
}

/// At `reset_at` the whole limit is available again.
fn full_again_at_reset<A: Algorithm>(
    algorithm: &A,
    state: &A::State,
    outcome: &Outcome,
) -> Result<(), TestCaseError> {
    let o = algorithm.check(state, outcome.reset_at, NonZeroU32::MIN);
    prop_assert_eq!(
        o.remaining + 1,
        o.limit,
        "not full at reset_at {}",
        outcome.reset_at
    );
    Ok(())
}

/// At every step of `steps`, acquires on a copy of the state and refunds at once when
/// allowed: from then on, checks at a spread of later times and costs answer the same on that
/// copy as on the state before the acquire. The run itself goes on with plain acquires.
fn refund_undoes_the_acquire<A: Algorithm>(
    algorithm: &A,
    refund: impl Fn(&mut A::State, Nanos, &Outcome, NonZeroU32),
    scale: u64,
    start: u64,
    steps: &[(Gap, u32)],
) -> Result<(), TestCaseError> {
    let mut state = A::State::default();
    let mut now = start;
    for &(gap, cost) in steps {
        now += gap.nanos(scale);
        let (at, cost) = (Nanos(now), NonZeroU32::new(cost).expect("costs start at 1"));
        let mut refunded = state.clone();
        let outcome = algorithm.acquire(&mut refunded, at, cost);
        if outcome.is_allowed() {
            refund(&mut refunded, at, &outcome, cost);
        }
        for offset in [0, 1, scale / 2, scale - 1, scale, scale + 1, 3 * scale] {
            for probe in [1, cost.get(), cost.get() + 1] {
                let (t, c) = (at + Nanos(offset), NonZeroU32::new(probe).expect("≥ 1"));
                prop_assert_eq!(
                    algorithm.check(&refunded, t, c),
                    algorithm.check(&state, t, c),
                    "refund of {} at {} read differently at {} for {}",
                    cost,
                    now,
                    t.as_u64(),
                    probe
                );
            }
        }
        algorithm.acquire(&mut state, at, cost);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fixed_window_matches_reference((limit, window, start, steps) in windowed()) {
        let algorithm = FixedWindow::new(nz(limit), Nanos(window)).unwrap();
        let reference = Reference::new(Model::FixedWindow { limit, window });
        run(&algorithm, &Limiter::FixedWindow(algorithm), reference, start, &steps)?;
    }

    #[test]
    fn sliding_window_matches_reference((limit, window, start, steps) in windowed()) {
        let algorithm = SlidingWindow::new(nz(limit), Nanos(window)).unwrap();
        let reference = Reference::new(Model::SlidingWindow { limit, window });
        run(&algorithm, &Limiter::SlidingWindow(algorithm), reference, start, &steps)?;
    }

    #[test]
    fn sliding_log_matches_reference((limit, window, start, steps) in windowed()) {
        let algorithm = SlidingLog::new(nz(limit), Nanos(window)).unwrap();
        let reference = Reference::new(Model::SlidingLog { limit, window });
        run(&algorithm, &Limiter::SlidingLog(algorithm), reference, start, &steps)?;
    }

    #[test]
    fn gcra_matches_reference((limit, period, burst, start, steps) in bucket()) {
        let algorithm = Gcra::new(nz(limit), Nanos(period), nz(burst)).unwrap();
        let interval = period / limit;
        let reference = Reference::new(Model::TokenBucket { interval, burst });
        run(&algorithm, &Limiter::TokenBucket(algorithm), reference, start, &steps)?;
    }

    #[test]
    fn leaky_meter_matches_reference((limit, period, capacity, start, steps) in bucket()) {
        let algorithm =
            LeakyBucket::new(nz(limit), Nanos(period), nz(capacity), LeakyMode::Meter).unwrap();
        let interval = period / limit;
        let reference =
            Reference::new(Model::LeakyBucket { interval, capacity, shaper: false });
        run(&algorithm, &Limiter::LeakyBucket(algorithm), reference, start, &steps)?;
    }

    /// Why a `leaky_bucket` meter rule is enforced as a `Gcra` (`rules::parse`): the two
    /// answer every request alike, allowed or not, with the same remaining, reset and retry.
    #[test]
    fn a_leaky_meter_decides_as_its_gcra((limit, period, capacity, start, steps) in bucket()) {
        let meter =
            LeakyBucket::new(nz(limit), Nanos(period), nz(capacity), LeakyMode::Meter).unwrap();
        let gcra = Gcra::new(nz(limit), Nanos(period), nz(capacity)).unwrap();
        let (mut level, mut tat) = Default::default();
        let mut now = start;
        for &(gap, cost) in &steps {
            now += gap.nanos(period);
            let (at, cost) = (Nanos(now), NonZeroU32::new(cost).expect("costs start at 1"));
            let want = meter.check(&level, at, cost);
            prop_assert_eq!(gcra.check(&tat, at, cost), want, "at {} cost {}", now, cost);
            if want.is_allowed() {
                meter.consume(&mut level, at, cost);
                gcra.consume(&mut tat, at, cost);
            }
        }
    }

    #[test]
    fn leaky_shaper_matches_reference((limit, period, capacity, start, steps) in bucket()) {
        let algorithm =
            LeakyBucket::new(nz(limit), Nanos(period), nz(capacity), LeakyMode::Shaper).unwrap();
        let interval = period / limit;
        let reference =
            Reference::new(Model::LeakyBucket { interval, capacity, shaper: true });
        run(&algorithm, &Limiter::LeakyBucket(algorithm), reference, start, &steps)?;
    }

    #[test]
    fn gcra_refund_undoes_the_acquire((limit, period, burst, start, steps) in bucket()) {
        let g = Gcra::new(nz(limit), Nanos(period), nz(burst)).unwrap();
        let refund = |s: &mut _, _, o: &Outcome, c| g.refund(s, o, c);
        refund_undoes_the_acquire(&g, refund, g.refill_time().as_u64(), start, &steps)?;
    }

    #[test]
    fn leaky_refund_undoes_the_acquire(
        (limit, period, capacity, start, steps) in bucket(),
        shaper in any::<bool>(),
    ) {
        let mode = if shaper { LeakyMode::Shaper } else { LeakyMode::Meter };
        let b = LeakyBucket::new(nz(limit), Nanos(period), nz(capacity), mode).unwrap();
        let refund = |s: &mut _, now, o: &Outcome, c| b.refund(s, now, o, c);
        refund_undoes_the_acquire(&b, refund, b.drain_time().as_u64(), start, &steps)?;
    }

    #[test]
    fn sliding_log_refund_undoes_the_acquire((limit, window, start, steps) in windowed()) {
        let log = SlidingLog::new(nz(limit), Nanos(window)).unwrap();
        let refund = |s: &mut _, _, o: &Outcome, c| {
            assert!(log.refund(s, o, c), "the entry just added is there");
        };
        refund_undoes_the_acquire(&log, refund, window, start, &steps)?;
    }

    /// A clock that jumps about (skewed peers) and consumes without a check (a caller breaking
    /// the contract) may give odd answers, but never a panic, and the log never outgrows its
    /// limit.
    #[test]
    fn any_time_order_never_panics_and_the_log_stays_bounded(
        limit in 1u64..=8,
        window in 1u64..=100,
        steps in prop::collection::vec((0u64..1_000, 1u32..=10, any::<bool>()), 1..64),
    ) {
        let log = SlidingLog::new(nz(limit), Nanos(window)).unwrap();
        let mut log_state = SlidingLogState::default();
        let limiters = all_kinds(limit, window);
        let mut states: Vec<LimiterState> = limiters.iter().map(Limiter::new_state).collect();
        for (now, cost, force) in steps {
            let (now, cost) = (Nanos(now), NonZeroU32::new(cost).unwrap());
            if force {
                log.consume(&mut log_state, now, cost);
            } else {
                log.acquire(&mut log_state, now, cost);
            }
            prop_assert!(log_state.len() as u64 <= limit);
            for (limiter, state) in limiters.iter().zip(&mut states) {
                if force {
                    limiter.consume(state, now, cost);
                } else {
                    limiter.acquire(state, now, cost);
                }
            }
        }
    }
}

/// One limiter of each kind over the same numbers.
fn all_kinds(limit: u64, window: u64) -> Vec<Limiter> {
    // `window · limit` over `limit` keeps the buckets' interval at `window ≥ 1` ns.
    let (l, w) = (nz(limit), Nanos(window * limit));
    let valid = "a non-zero window and interval";
    vec![
        Limiter::FixedWindow(FixedWindow::new(l, w).expect(valid)),
        Limiter::SlidingWindow(SlidingWindow::new(l, w).expect(valid)),
        Limiter::SlidingLog(SlidingLog::new(l, w).expect(valid)),
        Limiter::TokenBucket(Gcra::new(l, w, l).expect(valid)),
        Limiter::LeakyBucket(LeakyBucket::new(l, w, l, LeakyMode::Meter).expect(valid)),
        Limiter::LeakyBucket(LeakyBucket::new(l, w, l, LeakyMode::Shaper).expect(valid)),
    ]
}

#[test]
fn limiter_reports_limit_and_window() {
    let limiters = all_kinds(4, 250);
    let seen: Vec<(u64, Nanos)> = limiters.iter().map(|l| (l.limit(), l.window())).collect();
    // Buckets: T = 1000 / 4 = 250, so 4 tokens take 1000 ns to refill or drain.
    assert_eq!(seen, vec![(4, Nanos(1_000)); 6]);

    let gcra = Gcra::new(nz(3), Nanos(1_000), nz(5)).unwrap();
    assert_eq!(Limiter::TokenBucket(gcra).limit(), 5);
    assert_eq!(Limiter::TokenBucket(gcra).window(), Nanos(5 * 333));
}

/// A key whose rule switched algorithm is judged as fresh, and its old state is replaced on
/// the first consume.
#[test]
fn a_state_of_another_kind_is_read_as_fresh() {
    let limiter = Limiter::FixedWindow(FixedWindow::new(nz(2), Nanos(100)).unwrap());
    let mut stale = Limiter::SlidingLog(SlidingLog::new(nz(2), Nanos(100)).unwrap()).new_state();
    let two = NonZeroU32::new(2).unwrap();
    Limiter::SlidingLog(SlidingLog::new(nz(2), Nanos(100)).unwrap()).consume(
        &mut stale,
        Nanos(10),
        two,
    );

    let fresh = limiter.check(&limiter.new_state(), Nanos(20), two);
    assert_eq!(limiter.check(&stale, Nanos(20), two), fresh);
    assert_eq!(fresh.verdict, Verdict::Allow);

    limiter.consume(&mut stale, Nanos(20), two);
    let mut expected = limiter.new_state();
    limiter.consume(&mut expected, Nanos(20), two);
    assert_eq!(stale, expected);
}

/// The DESIGN's default in numbers: 10 in the previous window, half-way through this one,
/// a limit of 10 leaves room for exactly 5.
#[test]
fn sliding_window_half_way_admits_half() {
    let sw = SlidingWindow::new(nz(10), Nanos::from_secs(60)).unwrap();
    let mut state = Default::default();
    let ten = NonZeroU32::new(10).unwrap();
    assert!(
        sw.acquire(&mut state, Nanos::from_secs(59), ten)
            .is_allowed()
    );
    let o = sw.check(&state, Nanos::from_secs(90), NonZeroU32::MIN);
    assert_eq!(o.remaining, 4);
    let o = sw.check(&state, Nanos::from_secs(90), NonZeroU32::new(6).unwrap());
    assert_eq!((o.verdict, o.remaining), (Verdict::Deny, 5));
}

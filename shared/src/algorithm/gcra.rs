//! Token bucket as GCRA, the generic cell rate algorithm: one theoretical arrival time (TAT)
//! instead of a token count and a refill timestamp, as governor keeps it.
//!
//! # Semantics
//!
//! A rate of `limit` per `period` gives the emission interval `T = ⌊period / limit⌋` whole
//! nanoseconds: one token comes back every `T`. Rounding down means the enforced rate is never
//! below the configured one; it is above it by less than one token per `T` nanoseconds of
//! remainder (`3` per second is `T = 333_333_333 ns`, i.e. 3 per `999_999_999 ns`). The bucket
//! holds `B = burst` tokens, so `B·T` is the time a full bucket takes to refill from empty.
//!
//! The state is the TAT: the time at which the bucket would be full again (`0` for a key never
//! seen, which is full at any `now`). Let `base = max(tat, now)`.
//!
//! - A request of cost `c` is allowed iff `new_tat − now ≤ B·T` where
//!   `new_tat = base + c·T`; consuming it sets `tat = new_tat`.
//! - `remaining = ⌊(B·T − (tat' − now)) / T⌋` whole tokens, with `tat' = new_tat` when allowed
//!   and `base` when not: exactly the largest cost that fits at `now`.
//! - `reset_at = tat'`: the bucket is full again then.
//! - On a denial, `retry_after = (base + c·T − B·T) − now`: the first time at which
//!   `new_tat − t ≤ B·T`.
//! - `c > B` is [`Verdict::InsufficientCapacity`] with `retry_after = Nanos::MAX`.
//!
//! All products are computed in `u128` and clamped back to `u64` nanoseconds (year 2554).
//!
//! # Refund
//!
//! [`Gcra::refund`] takes back an admitted request that another of its limits denied: the TAT
//! moves back by `c·T`, but never below the TAT that request's consume started from
//! (`max(tat, now)`, which is its outcome's `reset_at − c·T`) and never forward. With nothing
//! consumed in between, the state is then equivalent to never having admitted it (every check
//! from that `now` on answers the same), and refunding it again changes nothing. When other
//! requests consumed in between, they keep what they took, and the refund is off by a bounded
//! amount either way:
//!
//! - it may give back up to the tokens that came back between the acquire and the refund (an
//!   intervening request that found some of them already back did not queue behind them): for
//!   a refund in the same round trip as its acquire, a round trip's worth of rate;
//! - two requests refunded in the order they were admitted leave up to the smaller cost taken
//!   (the second one's floor still holds the first one's cost): a false denial later, never an
//!   overshoot. In the opposite order both come back exactly.

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome, Verdict};
use crate::clock::Nanos;

/// Token bucket as GCRA: `limit` tokens per `period`, at most `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    limit: NonZeroU64,
    period: Nanos,
    burst: NonZeroU64,
}

impl Gcra {
    /// `limit` tokens per `period` (`10/s` is `limit` 10, `period` 1 s), bucket capacity
    /// `burst`; `None` when `period` is zero or the emission interval `period / limit` rounds
    /// to zero nanoseconds.
    pub fn new(limit: NonZeroU64, period: Nanos, burst: NonZeroU64) -> Option<Gcra> {
        (period.as_u64() / limit.get() > 0).then_some(Gcra {
            limit,
            period,
            burst,
        })
    }

    /// Tokens per period.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The period the rate is expressed over.
    pub fn period(&self) -> Nanos {
        self.period
    }

    /// Bucket capacity.
    pub fn burst(&self) -> NonZeroU64 {
        self.burst
    }

    /// `T`: the time one token takes to come back, `period / limit` rounded down (never zero:
    /// the constructor refuses that).
    pub fn emission_interval(&self) -> Nanos {
        Nanos(self.period.as_u64() / self.limit.get())
    }

    /// `B·T`: the time an empty bucket takes to refill completely, saturating at
    /// [`Nanos::MAX`].
    pub fn refill_time(&self) -> Nanos {
        Nanos::saturating_from(self.tolerance())
    }

    /// Takes back `cost` that an allowed acquire consumed from `state`; `admitted` is the
    /// outcome that acquire answered. See the module doc for what is exact.
    pub fn refund(&self, state: &mut GcraState, admitted: &Outcome, cost: NonZeroU32) {
        let taken = u128::from(cost.get()) * u128::from(self.emission_interval().as_u64());
        let tat = u128::from(state.tat.as_u64());
        // The TAT the consume started from: its outcome's `reset_at` is that plus `c·T`.
        let floor = u128::from(admitted.reset_at.as_u64()).saturating_sub(taken);
        state.tat = Nanos::saturating_from(tat.saturating_sub(taken).max(floor).min(tat));
    }

    /// `B·T` in `u128`, exact.
    fn tolerance(&self) -> u128 {
        u128::from(self.burst.get()) * u128::from(self.emission_interval().as_u64())
    }
}

/// Per-key state of [`Gcra`]: the theoretical arrival time, one `u64` like governor's
/// `InMemoryState`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcraState {
    /// When the bucket is full again if nothing else arrives; zero for a key never seen.
    pub tat: Nanos,
}

impl Algorithm for Gcra {
    type State = GcraState;

    fn check(&self, state: &GcraState, now: Nanos, cost: NonZeroU32) -> Outcome {
        let burst = self.burst.get();
        let t = u128::from(self.emission_interval().as_u64());
        let tolerance = self.tolerance();
        let now_ns = u128::from(now.as_u64());
        let base = u128::from(state.tat.max(now).as_u64());
        let new_tat = base + u128::from(cost.get()) * t;
        // Whole tokens left when the bucket is full again at `tat`.
        let tokens = |tat: u128| {
            let left = tolerance.saturating_sub(tat - now_ns) / t;
            u64::try_from(left).expect("at most B·T / T = B tokens, a u64")
        };
        let (verdict, remaining, reset_at, retry_after) = if u64::from(cost.get()) > burst {
            (
                Verdict::InsufficientCapacity,
                tokens(base),
                base,
                Nanos::MAX,
            )
        } else if new_tat - now_ns <= tolerance {
            (Verdict::Allow, tokens(new_tat), new_tat, Nanos::ZERO)
        } else {
            let retry_after = Nanos::saturating_from(new_tat - tolerance - now_ns);
            (Verdict::Deny, tokens(base), base, retry_after)
        };
        Outcome {
            verdict,
            limit: burst,
            remaining,
            reset_at: Nanos::saturating_from(reset_at),
            retry_after,
        }
    }

    fn consume(&self, state: &mut GcraState, now: Nanos, cost: NonZeroU32) {
        let t = u128::from(self.emission_interval().as_u64());
        let base = u128::from(state.tat.max(now).as_u64());
        state.tat = Nanos::saturating_from(base + u128::from(cost.get()) * t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u64, period: u64, burst: u64) -> Gcra {
        let (limit, burst) = (
            NonZeroU64::new(limit).unwrap(),
            NonZeroU64::new(burst).unwrap(),
        );
        Gcra::new(limit, Nanos(period), burst).unwrap()
    }

    fn cost(c: u32) -> NonZeroU32 {
        NonZeroU32::new(c).unwrap()
    }

    #[test]
    fn emission_interval_rounds_down_and_zero_is_refused() {
        assert_eq!(limiter(3, 1_000, 1).emission_interval(), Nanos(333));
        assert_eq!(limiter(3, 1_000, 4).refill_time(), Nanos(1_332));
        assert_eq!(
            Gcra::new(NonZeroU64::new(4).unwrap(), Nanos(3), NonZeroU64::MIN),
            None
        );
    }

    #[test]
    fn a_full_bucket_bursts_then_refills_one_token_per_interval() {
        // 10 per 1000 ns: T = 100, burst 3.
        let g = limiter(10, 1_000, 3);
        let mut s = GcraState::default();
        for left in [2, 1, 0] {
            let o = g.acquire(&mut s, Nanos(5_000), cost(1));
            assert_eq!((o.verdict, o.remaining), (Verdict::Allow, left));
        }
        assert_eq!(s.tat, Nanos(5_300));
        let o = g.acquire(&mut s, Nanos(5_050), cost(1));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(o.retry_after, Nanos(50));
        assert_eq!(o.reset_at, Nanos(5_300));
        assert_eq!(o.remaining, 0);

        let o = g.acquire(&mut s, Nanos(5_100), cost(1));
        assert_eq!(
            (o.verdict, o.remaining, o.reset_at),
            (Verdict::Allow, 0, Nanos(5_400))
        );
        // Half a token has come back by 5_150: not a whole one.
        let o = g.check(&s, Nanos(5_150), cost(1));
        assert_eq!((o.remaining, o.retry_after), (0, Nanos(50)));
    }

    #[test]
    fn a_bigger_cost_waits_for_more_tokens() {
        let g = limiter(10, 1_000, 4);
        let s = GcraState { tat: Nanos(5_300) };
        // 1 token left at 5_000; 3 need two more, 200 ns.
        let o = g.check(&s, Nanos(5_000), cost(3));
        assert_eq!(
            (o.verdict, o.remaining, o.retry_after),
            (Verdict::Deny, 1, Nanos(200))
        );
    }

    #[test]
    fn cost_above_the_burst_never_fits() {
        let g = limiter(10, 1_000, 2);
        let o = g.check(&GcraState::default(), Nanos(7), cost(3));
        assert_eq!(o.verdict, Verdict::InsufficientCapacity);
        assert_eq!(
            (o.retry_after, o.remaining, o.reset_at),
            (Nanos::MAX, 2, Nanos(7))
        );
    }

    #[test]
    fn a_refund_right_after_its_acquire_is_as_if_it_never_happened() {
        let g = limiter(10, 1_000, 3);
        // An old TAT (the bucket is full): the refund goes back to `now`, not to the old TAT,
        // which answers every check from `now` on the same way.
        let before = GcraState { tat: Nanos(4_000) };
        let mut s = before;
        let o = g.acquire(&mut s, Nanos(5_000), cost(2));
        assert_eq!(s.tat, Nanos(5_200));
        g.refund(&mut s, &o, cost(2));
        assert_eq!(s.tat, Nanos(5_000));
        for (at, c) in [(5_000, 3), (5_000, 1), (5_090, 2), (9_000, 3)] {
            assert_eq!(
                g.check(&s, Nanos(at), cost(c)),
                g.check(&before, Nanos(at), cost(c))
            );
        }
        // Twice is once: never below where the acquire started.
        g.refund(&mut s, &o, cost(2));
        assert_eq!(s.tat, Nanos(5_000));
    }

    #[test]
    fn a_refund_keeps_what_others_took_and_never_moves_forward() {
        let g = limiter(10, 1_000, 5);
        let mut s = GcraState::default();
        let mine = g.acquire(&mut s, Nanos(5_000), cost(2));
        g.acquire(&mut s, Nanos(5_000), cost(1));
        assert_eq!(s.tat, Nanos(5_300));
        g.refund(&mut s, &mine, cost(2));
        assert_eq!(s.tat, Nanos(5_100), "the other request's token stays taken");
        // Two refunds in the order of their acquires: the smaller cost stays taken (the
        // second's floor holds the first's cost); in the opposite order, nothing does.
        let (mut s, now) = (GcraState::default(), Nanos(5_000));
        let first = g.acquire(&mut s, now, cost(2));
        let second = g.acquire(&mut s, now, cost(1));
        let mut fifo = s;
        g.refund(&mut fifo, &first, cost(2));
        g.refund(&mut fifo, &second, cost(1));
        assert_eq!(fifo.tat, Nanos(5_100));
        g.refund(&mut s, &second, cost(1));
        g.refund(&mut s, &first, cost(2));
        assert_eq!(s.tat, now);
        // A state that was reset meanwhile (a store forgot it) is left alone.
        let mut fresh = GcraState::default();
        g.refund(&mut fresh, &mine, cost(2));
        assert_eq!(fresh, GcraState::default());
    }

    #[test]
    fn end_of_time_saturates() {
        let g = limiter(1, 1_000, 2);
        let mut s = GcraState::default();
        assert!(
            g.acquire(&mut s, Nanos(u64::MAX - 10), cost(1))
                .is_allowed()
        );
        assert_eq!(s.tat, Nanos::MAX);
    }
}

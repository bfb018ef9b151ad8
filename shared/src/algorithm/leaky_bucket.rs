//! Leaky bucket, as a meter (deny when full) and as a shaper (queue and answer "go after X").
//!
//! # Semantics
//!
//! The bucket drains `limit` units per `period`: one unit every `T = ⌊period / limit⌋` whole
//! nanoseconds (rounded down as in [`Gcra`](super::Gcra), so the drain is never slower than
//! configured). It holds `C = capacity` units. The level is kept as time, not units: `level`
//! is how long the content takes to drain, so a unit is `T` of level and a full bucket is
//! `C·T`. At `now` the level is `level − (now − last)`, floored at zero.
//!
//! - A request of cost `c` fits iff `level + c·T ≤ C·T`; consuming it adds `c·T` to the level.
//! - As a [`LeakyMode::Meter`] a request that fits is [`Verdict::Allow`]. As a
//!   [`LeakyMode::Shaper`] it is queued behind what is already in the bucket, so it leaves
//!   when that has drained: [`Verdict::Delay`] `{ after: level }` when `level > 0`, and
//!   [`Verdict::Allow`] when the bucket is empty.
//! - `remaining = ⌊(C·T − level') / T⌋` units, with `level'` after adding `c·T` when allowed:
//!   exactly the largest cost that fits at `now`.
//! - `reset_at = now + level'`: the bucket is empty then.
//! - A request that does not fit is [`Verdict::Deny`] in both modes, with
//!   `retry_after = level + c·T − C·T`: the time for enough to drain.
//! - `c > C` is [`Verdict::InsufficientCapacity`] with `retry_after = Nanos::MAX`.
//!
//! As a meter this is the same decision as GCRA with `tat = now + level`; it is kept as its own
//! algorithm because operators name it, and because the shaper's answer needs the level.
//!
//! A clock that steps back behind `last` (a skewed peer) is read as standing at `last`: the
//! bucket never drains backwards, and never drains the same interval twice.
//!
//! # Refund
//!
//! [`LeakyBucket::refund`] takes back an admitted request that another of its limits denied,
//! as [`Gcra::refund`](super::Gcra::refund) does, in the same terms: after leaking to `now`,
//! the level drops by `c·T`, but never below the level that request's consume started from
//! (its outcome's `reset_at − c·T` is when the bucket would have been empty without it) and
//! never rises. With nothing consumed in between, the state is then equivalent to never having
//! admitted it, and a second refund changes nothing; otherwise the same bounds as GCRA's hold.

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome, Verdict};
use crate::clock::Nanos;

/// Leaky bucket draining `limit` units per `period`, holding at most `capacity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeakyBucket {
    limit: NonZeroU64,
    period: Nanos,
    capacity: NonZeroU64,
    mode: LeakyMode,
}

/// What a leaky bucket does with a request that finds it not empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakyMode {
    /// Admit while the bucket has room; deny when it is full.
    Meter,
    /// Queue while the bucket has room and answer "go after X": output leaves at the rate.
    Shaper,
}

impl LeakyBucket {
    /// Drains `limit` per `period`, holds `capacity`; `None` when `period / limit` rounds to
    /// zero nanoseconds.
    pub fn new(
        limit: NonZeroU64,
        period: Nanos,
        capacity: NonZeroU64,
        mode: LeakyMode,
    ) -> Option<LeakyBucket> {
        (period.as_u64() / limit.get() > 0).then_some(LeakyBucket {
            limit,
            period,
            capacity,
            mode,
        })
    }

    /// Units drained per period.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The period the drain rate is expressed over.
    pub fn period(&self) -> Nanos {
        self.period
    }

    /// Bucket capacity.
    pub fn capacity(&self) -> NonZeroU64 {
        self.capacity
    }

    /// Meter or shaper.
    pub fn mode(&self) -> LeakyMode {
        self.mode
    }

    /// `T`: the time one unit takes to drain, `period / limit` rounded down (never zero: the
    /// constructor refuses that).
    pub fn drain_interval(&self) -> Nanos {
        Nanos(self.period.as_u64() / self.limit.get())
    }

    /// `C·T`: the time a full bucket takes to drain completely, saturating at [`Nanos::MAX`].
    pub fn drain_time(&self) -> Nanos {
        Nanos::saturating_from(self.full())
    }

    /// Takes back `cost` that an allowed acquire consumed from `state`, at `now`; `admitted`
    /// is the outcome that acquire answered. See the module doc for what is exact.
    pub fn refund(
        &self,
        state: &mut LeakyBucketState,
        now: Nanos,
        admitted: &Outcome,
        cost: NonZeroU32,
    ) {
        let taken = u128::from(cost.get()) * u128::from(self.drain_interval().as_u64());
        let at = now.max(state.last);
        let level = u128::from(state.level_at(at).as_u64());
        // When the bucket would have been empty without the request, as a level at `at`.
        let floor = u128::from(admitted.reset_at.as_u64())
            .saturating_sub(taken)
            .saturating_sub(u128::from(at.as_u64()));
        *state = LeakyBucketState {
            level: Nanos::saturating_from(level.saturating_sub(taken).max(floor).min(level)),
            last: at,
        };
    }

    /// `C·T` in `u128`, exact.
    fn full(&self) -> u128 {
        u128::from(self.capacity.get()) * u128::from(self.drain_interval().as_u64())
    }
}

/// Per-key state of [`LeakyBucket`]: the level, as drain time, and when it was last updated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakyBucketState {
    /// How long the content takes to drain, as of `last`.
    pub level: Nanos,
    /// When `level` was last updated.
    pub last: Nanos,
}

impl LeakyBucketState {
    /// The level at `at` (not before `last`): what has not drained since `last`.
    fn level_at(&self, at: Nanos) -> Nanos {
        self.level - (at - self.last)
    }
}

impl Algorithm for LeakyBucket {
    type State = LeakyBucketState;

    fn check(&self, state: &LeakyBucketState, now: Nanos, cost: NonZeroU32) -> Outcome {
        let capacity = self.capacity.get();
        let t = u128::from(self.drain_interval().as_u64());
        let full = self.full();
        let at = now.max(state.last);
        let level = u128::from(state.level_at(at).as_u64());
        let after = level + u128::from(cost.get()) * t;
        // Whole units of room with the bucket at `level`.
        let room = |level: u128| {
            let left = full.saturating_sub(level) / t;
            u64::try_from(left).expect("at most C·T / T = C units, a u64")
        };
        let empty_at = |level: u128| Nanos::saturating_from(u128::from(at.as_u64()) + level);
        let (verdict, remaining, reset_at, retry_after) = if u64::from(cost.get()) > capacity {
            let verdict = Verdict::InsufficientCapacity;
            (verdict, room(level), empty_at(level), Nanos::MAX)
        } else if after <= full {
            let verdict = match self.mode {
                LeakyMode::Shaper if level > 0 => Verdict::Delay {
                    after: Nanos::saturating_from(level) + (at - now),
                },
                LeakyMode::Shaper | LeakyMode::Meter => Verdict::Allow,
            };
            (verdict, room(after), empty_at(after), Nanos::ZERO)
        } else {
            let retry_after = Nanos::saturating_from(after - full) + (at - now);
            (Verdict::Deny, room(level), empty_at(level), retry_after)
        };
        Outcome {
            verdict,
            limit: capacity,
            remaining,
            reset_at,
            retry_after,
        }
    }

    fn consume(&self, state: &mut LeakyBucketState, now: Nanos, cost: NonZeroU32) {
        let t = u128::from(self.drain_interval().as_u64());
        let at = now.max(state.last);
        let level = u128::from(state.level_at(at).as_u64());
        *state = LeakyBucketState {
            level: Nanos::saturating_from(level + u128::from(cost.get()) * t),
            last: at,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u64, period: u64, capacity: u64, mode: LeakyMode) -> LeakyBucket {
        let limit = NonZeroU64::new(limit).unwrap();
        let capacity = NonZeroU64::new(capacity).unwrap();
        LeakyBucket::new(limit, Nanos(period), capacity, mode).unwrap()
    }

    fn cost(c: u32) -> NonZeroU32 {
        NonZeroU32::new(c).unwrap()
    }

    #[test]
    fn drain_interval_rounds_down_and_zero_is_refused() {
        let b = limiter(3, 1_000, 2, LeakyMode::Meter);
        assert_eq!(
            (b.drain_interval(), b.drain_time()),
            (Nanos(333), Nanos(666))
        );
        let (four, one) = (NonZeroU64::new(4).unwrap(), NonZeroU64::MIN);
        assert_eq!(
            LeakyBucket::new(four, Nanos(3), one, LeakyMode::Shaper),
            None
        );
    }

    #[test]
    fn meter_fills_then_denies_until_a_unit_drains() {
        // 10 per 1000 ns: T = 100, capacity 2.
        let b = limiter(10, 1_000, 2, LeakyMode::Meter);
        let mut s = LeakyBucketState::default();
        for left in [1, 0] {
            let o = b.acquire(&mut s, Nanos(1_000), cost(1));
            assert_eq!((o.verdict, o.remaining), (Verdict::Allow, left));
        }
        assert_eq!(
            s,
            LeakyBucketState {
                level: Nanos(200),
                last: Nanos(1_000)
            }
        );
        let o = b.acquire(&mut s, Nanos(1_030), cost(1));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(
            (o.retry_after, o.reset_at, o.remaining),
            (Nanos(70), Nanos(1_200), 0)
        );
        let o = b.acquire(&mut s, Nanos(1_100), cost(1));
        assert_eq!((o.verdict, o.reset_at), (Verdict::Allow, Nanos(1_300)));
    }

    #[test]
    fn shaper_delays_by_what_is_ahead() {
        let b = limiter(10, 1_000, 3, LeakyMode::Shaper);
        let mut s = LeakyBucketState::default();
        assert_eq!(b.acquire(&mut s, Nanos(0), cost(1)).verdict, Verdict::Allow);
        let o = b.acquire(&mut s, Nanos(40), cost(1));
        assert_eq!(o.verdict, Verdict::Delay { after: Nanos(60) });
        let o = b.acquire(&mut s, Nanos(40), cost(1));
        assert_eq!(o.verdict, Verdict::Delay { after: Nanos(160) });
        assert_eq!((o.remaining, o.reset_at), (0, Nanos(300)));
        let o = b.acquire(&mut s, Nanos(40), cost(1));
        assert_eq!((o.verdict, o.retry_after), (Verdict::Deny, Nanos(60)));
        // Drained completely: straight through again.
        assert_eq!(
            b.acquire(&mut s, Nanos(300), cost(3)).verdict,
            Verdict::Allow
        );
    }

    #[test]
    fn cost_above_the_capacity_never_fits() {
        let b = limiter(10, 1_000, 2, LeakyMode::Shaper);
        let o = b.check(&LeakyBucketState::default(), Nanos(7), cost(3));
        assert_eq!(o.verdict, Verdict::InsufficientCapacity);
        assert_eq!(
            (o.retry_after, o.remaining, o.reset_at),
            (Nanos::MAX, 2, Nanos(7))
        );
    }

    #[test]
    fn a_refund_takes_back_the_level_after_leaking() {
        // 10 per 1000 ns: T = 100, capacity 4.
        let b = limiter(10, 1_000, 4, LeakyMode::Meter);
        let mut s = LeakyBucketState {
            level: Nanos(150),
            last: Nanos(900),
        };
        let before = s;
        let mine = b.acquire(&mut s, Nanos(1_000), cost(2));
        assert_eq!((s.level, mine.reset_at), (Nanos(250), Nanos(1_250)));
        let other = b.acquire(&mut s, Nanos(1_020), cost(1));
        assert!(other.is_allowed());
        b.refund(&mut s, Nanos(1_020), &mine, cost(2));
        // 330 − 200 at 1_020: the other request's unit stays.
        assert_eq!(
            s,
            LeakyBucketState {
                level: Nanos(130),
                last: Nanos(1_020)
            }
        );

        // Alone, and twice: back to the level it started from, never below.
        let mut s = before;
        let mine = b.acquire(&mut s, Nanos(1_000), cost(2));
        for _ in 0..2 {
            b.refund(&mut s, Nanos(1_000), &mine, cost(2));
            assert_eq!(s.level_at(Nanos(1_000)), before.level_at(Nanos(1_000)));
        }
        for (at, c) in [(1_000, 4), (1_000, 3), (1_040, 4), (5_000, 4)] {
            assert_eq!(
                b.check(&s, Nanos(at), cost(c)),
                b.check(&before, Nanos(at), cost(c))
            );
        }
    }

    #[test]
    fn clock_stepping_back_neither_drains_nor_forgets() {
        let b = limiter(10, 1_000, 2, LeakyMode::Meter);
        let mut s = LeakyBucketState::default();
        b.consume(&mut s, Nanos(1_000), cost(2));
        b.consume(&mut s, Nanos(500), cost(1));
        assert_eq!(
            s,
            LeakyBucketState {
                level: Nanos(300),
                last: Nanos(1_000)
            }
        );
        let o = b.check(&s, Nanos(900), cost(1));
        // Read at 1_000: the bucket is over full by 200, so 1_200 is the first fit.
        assert_eq!((o.verdict, o.retry_after), (Verdict::Deny, Nanos(300)));
    }
}

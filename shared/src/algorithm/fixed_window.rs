//! Count per epoch-aligned window: the simplest limiter, with bursts at window edges.
//!
//! # Semantics
//!
//! With window length `W` and limit `L`, the window of `now` is `w = now / W` (DESIGN §9), and
//! `count` is what was admitted in `w` (zero when the state last counted another window).
//!
//! - A request of cost `c` is allowed iff `count + c ≤ L`.
//! - `remaining = L − count`, after adding `c` when allowed.
//! - `reset_at = (w + 1)·W`, the end of the window, whether or not anything was counted in it:
//!   that is the instant every fixed-window client expects the counter to restart.
//! - On a denial, `retry_after = reset_at − now`: nothing frees up before the window ends.
//! - `c > L` is [`Verdict::InsufficientCapacity`] with `retry_after = Nanos::MAX`.
//!
//! The price of this simplicity is the edge burst: `L` at the end of one window and `L` at the
//! start of the next is `2L` within a few nanoseconds. The sliding window counter exists for
//! that reason.

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome, Verdict};
use crate::clock::Nanos;

/// Count per epoch-aligned window: at most `limit` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    limit: NonZeroU64,
    window: Nanos,
}

impl FixedWindow {
    /// At most `limit` per `window`; `None` when `window` is zero.
    pub fn new(limit: NonZeroU64, window: Nanos) -> Option<FixedWindow> {
        (window > Nanos::ZERO).then_some(FixedWindow { limit, window })
    }

    /// The limit per window.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Nanos {
        self.window
    }

    /// The window `now` is judged in, and what that window has counted so far.
    ///
    /// A clock that steps back across a window edge (a skewed peer, DESIGN §9) is read as
    /// standing in the newest window the state has seen, so skew never forgets a count.
    fn current(&self, state: &FixedWindowState, now: Nanos) -> (u64, u64) {
        let w = (now.as_u64() / self.window.as_u64()).max(state.window);
        let count = if state.window == w { state.count } else { 0 };
        (w, count)
    }
}

/// Per-key state of [`FixedWindow`]: one counter, tagged with the window it counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedWindowState {
    /// Index of the window `count` belongs to (`now / W` when it was last updated).
    pub window: u64,
    /// Cost admitted in `window`.
    pub count: u64,
}

impl Algorithm for FixedWindow {
    type State = FixedWindowState;

    fn check(&self, state: &FixedWindowState, now: Nanos, cost: NonZeroU32) -> Outcome {
        let limit = self.limit.get();
        let (w, count) = self.current(state, now);
        let reset_at = window_start(w.saturating_add(1), self.window);
        let after = u128::from(count) + u128::from(cost.get());
        let left = limit.saturating_sub(count);
        let (verdict, remaining, retry_after) = if u64::from(cost.get()) > limit {
            (Verdict::InsufficientCapacity, left, Nanos::MAX)
        } else if after <= u128::from(limit) {
            (Verdict::Allow, left - u64::from(cost.get()), Nanos::ZERO)
        } else {
            (Verdict::Deny, left, reset_at - now)
        };
        Outcome {
            verdict,
            limit,
            remaining,
            reset_at,
            retry_after,
        }
    }

    fn consume(&self, state: &mut FixedWindowState, now: Nanos, cost: NonZeroU32) {
        let (w, count) = self.current(state, now);
        *state = FixedWindowState {
            window: w,
            count: count.saturating_add(u64::from(cost.get())),
        };
    }
}

/// `w·W`, saturating at [`Nanos::MAX`] for windows past the year 2554.
fn window_start(w: u64, window: Nanos) -> Nanos {
    Nanos::saturating_from(u128::from(w) * u128::from(window.as_u64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u64, window: u64) -> FixedWindow {
        FixedWindow::new(NonZeroU64::new(limit).unwrap(), Nanos(window)).unwrap()
    }

    fn cost(c: u32) -> NonZeroU32 {
        NonZeroU32::new(c).unwrap()
    }

    #[test]
    fn zero_window_is_refused() {
        assert_eq!(FixedWindow::new(NonZeroU64::MIN, Nanos::ZERO), None);
    }

    #[test]
    fn admits_up_to_the_limit_then_denies_until_the_window_ends() {
        let fw = limiter(3, 100);
        let mut s = FixedWindowState::default();
        for left in [2, 1, 0] {
            let o = fw.acquire(&mut s, Nanos(1030), cost(1));
            assert_eq!(o.verdict, Verdict::Allow);
            assert_eq!(o.remaining, left);
            assert_eq!(o.reset_at, Nanos(1100));
        }
        let o = fw.acquire(&mut s, Nanos(1070), cost(1));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(o.retry_after, Nanos(30));
        assert_eq!(o.remaining, 0);
        assert_eq!(
            s,
            FixedWindowState {
                window: 10,
                count: 3
            }
        );

        let o = fw.acquire(&mut s, Nanos(1100), cost(3));
        assert_eq!(o.verdict, Verdict::Allow);
        assert_eq!(o.reset_at, Nanos(1200));
    }

    #[test]
    fn edge_burst_is_the_known_weakness() {
        let fw = limiter(2, 100);
        let mut s = FixedWindowState::default();
        assert!(fw.acquire(&mut s, Nanos(99), cost(2)).is_allowed());
        assert!(fw.acquire(&mut s, Nanos(100), cost(2)).is_allowed());
    }

    #[test]
    fn cost_above_the_limit_never_fits() {
        let fw = limiter(2, 100);
        let o = fw.check(&FixedWindowState::default(), Nanos(5), cost(3));
        assert_eq!(o.verdict, Verdict::InsufficientCapacity);
        assert_eq!(o.retry_after, Nanos::MAX);
        assert_eq!(o.remaining, 2);
    }

    #[test]
    fn clock_stepping_back_keeps_the_newer_count() {
        let fw = limiter(2, 100);
        let mut s = FixedWindowState::default();
        fw.consume(&mut s, Nanos(250), cost(2));
        let o = fw.check(&s, Nanos(150), cost(1));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(o.retry_after, Nanos(150));
    }

    #[test]
    fn end_of_time_saturates() {
        let fw = limiter(1, 1_000);
        let mut s = FixedWindowState::default();
        let o = fw.acquire(&mut s, Nanos::MAX, cost(1));
        assert_eq!(o.reset_at, Nanos::MAX);
        assert_eq!(
            fw.acquire(&mut s, Nanos::MAX, cost(1)).verdict,
            Verdict::Deny
        );
    }
}

//! Sliding window counter: the current window's count plus the previous one's, weighted by how
//! much of the previous window still overlaps the last `W` (the default algorithm).
//!
//! # Semantics
//!
//! With window length `W` and limit `L`, the window of `now` is `w = now / W` (DESIGN §9) and
//! `e = now − w·W` is how far into it we are. `cur` is what was admitted in `w` and `prev` what
//! was admitted in `w − 1` (both zero when the state is older). The previous window is assumed
//! to have been spread evenly, so the last `W` nanoseconds hold an estimated
//! `cur + prev·(W − e)/W`. Everything below is that inequality multiplied through by `W`, in
//! `u128`, so it is exact: no floats, no rounding.
//!
//! - A request of cost `c` is allowed iff `(cur + c)·W + prev·(W − e) ≤ L·W`.
//! - `remaining = ⌊(L·W − cur'·W − prev·(W − e)) / W⌋`, with `cur' = cur + c` when allowed and
//!   `cur` when not: exactly the largest cost that would fit at `now`.
//! - `reset_at` is when the estimate reaches zero with no more traffic: `(w + 2)·W` when
//!   `cur' > 0` (it must age out of the next window too), `(w + 1)·W` when only `prev > 0`, and
//!   `now` when both are zero.
//! - On a denial, `retry_after` is the smallest `t − now` such that the same cost is allowed at
//!   `t` if nothing else is admitted; see [`SlidingWindow::retry_at`] for the closed form.
//! - `c > L` is [`Verdict::InsufficientCapacity`] with `retry_after = Nanos::MAX`.
//!
//! The estimate is an approximation of the true sliding count (the sliding log is exact): it
//! under-counts when the previous window's traffic sat at its end and over-counts when it sat
//! at its start. In exchange the state is three integers, which is what lets the edge, the
//! regional and the Redis script agree on it cheaply.

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome, Verdict};
use crate::clock::Nanos;

/// Sliding window counter: at most `limit` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    limit: NonZeroU64,
    window: Nanos,
}

impl SlidingWindow {
    /// At most `limit` per `window`; `None` when `window` is zero.
    pub fn new(limit: NonZeroU64, window: Nanos) -> Option<SlidingWindow> {
        (window > Nanos::ZERO).then_some(SlidingWindow { limit, window })
    }

    /// The limit per window.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Nanos {
        self.window
    }

    /// The counts as they stand at `now`, rolled forward to `now`'s window.
    ///
    /// A clock that steps back across a window edge (a skewed peer, DESIGN §9) is read as
    /// standing at the start of the newest window the state has seen, so skew never forgets a
    /// count; with time that does not go backwards this is just `now`.
    fn view(&self, state: &SlidingWindowState, now: Nanos) -> View {
        let width = self.window.as_u64();
        let w = now.as_u64() / width;
        if state.window > w {
            return View {
                w: state.window,
                elapsed: 0,
                current: state.current,
                previous: state.previous,
            };
        }
        let (current, previous) = if state.window == w {
            (state.current, state.previous)
        } else if state.window + 1 == w {
            (0, state.current)
        } else {
            (0, 0)
        };
        View {
            w,
            elapsed: u128::from(now.as_u64() - w * width),
            current,
            previous,
        }
    }

    /// The estimate times `W` with `current` in this window: `current·W + prev·(W − e)`.
    fn weighted(&self, view: &View, current: u128) -> u128 {
        let width = u128::from(self.window.as_u64());
        current
            .saturating_mul(width)
            .saturating_add(u128::from(view.previous) * (width - view.elapsed))
    }

    /// The earliest absolute time at which `cost` (≤ L) fits when nothing else is admitted.
    ///
    /// Two places to look, in order:
    ///
    /// 1. Later in this window, as `prev`'s weight decays. Needs `cur + c ≤ L` and then
    ///    `prev·(W − e') ≤ (L − cur − c)·W`, i.e. `W − e' ≤ k` with
    ///    `k = ⌊(L − cur − c)·W / prev⌋`; the smallest such `e'` is `W − k`, inside the window
    ///    when `k ≥ 1`. (On a denial `prev > 0` whenever `cur + c ≤ L`.)
    /// 2. In the next window, where `cur` becomes the previous count and nothing is current:
    ///    `c·W + cur·(W − e'') ≤ L·W`, i.e. `W − e'' ≤ k₂` with `k₂ = ⌊(L − c)·W / cur⌋`
    ///    (`k₂ = W` when `cur = 0`), capped at `W`. That gives `t = (w + 2)·W − k₂`, which is
    ///    the start of window `w + 2` when `k₂ = 0`: there both counts are zero and any
    ///    `c ≤ L` fits.
    ///
    /// The estimate never increases while nothing is admitted (inside a window `prev`'s weight
    /// shrinks; at the edge it drops by `prev`), so the first time that fits is the answer and
    /// every earlier time does not fit.
    fn retry_at(&self, view: &View, cost: u64) -> u128 {
        let width = u128::from(self.window.as_u64());
        let limit = u128::from(self.limit.get());
        let (cur, prev, cost) = (
            u128::from(view.current),
            u128::from(view.previous),
            u128::from(cost),
        );
        let next_start = (u128::from(view.w) + 1) * width;
        if prev > 0 && cur + cost <= limit {
            let k = (limit - cur - cost) * width / prev;
            if k >= 1 {
                return next_start.saturating_sub(k);
            }
        }
        let k2 = match cur {
            0 => width,
            _ => ((limit - cost) * width / cur).min(width),
        };
        next_start + width - k2
    }

    /// When the estimate reaches zero, with `current` counted in this window.
    fn reset_at(&self, view: &View, current: u128, now: Nanos) -> Nanos {
        let windows_left = if current > 0 {
            2
        } else if view.previous > 0 {
            1
        } else {
            return now;
        };
        Nanos::saturating_from(
            (u128::from(view.w) + windows_left) * u128::from(self.window.as_u64()),
        )
    }
}

/// Per-key state of [`SlidingWindow`]: two counters, tagged with the window of the newer one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlidingWindowState {
    /// Index of the window `current` counts (`now / W` when it was last updated).
    pub window: u64,
    /// Cost admitted in `window`.
    pub current: u64,
    /// Cost admitted in `window − 1`.
    pub previous: u64,
}

impl Algorithm for SlidingWindow {
    type State = SlidingWindowState;

    fn check(&self, state: &SlidingWindowState, now: Nanos, cost: NonZeroU32) -> Outcome {
        let limit = self.limit.get();
        let width = u128::from(self.window.as_u64());
        let budget = u128::from(limit) * width;
        let view = self.view(state, now);
        let cur = u128::from(view.current);
        let cost = u64::from(cost.get());
        // The largest cost that fits with `current` counted: ⌊(L·W − estimate·W) / W⌋.
        let room = |current: u128| {
            let left = budget.saturating_sub(self.weighted(&view, current)) / width;
            u64::try_from(left).expect("the room is at most L·W / W = L, a u64")
        };
        let (verdict, remaining, reset_at, retry_after) = if cost > limit {
            let reset_at = self.reset_at(&view, cur, now);
            (
                Verdict::InsufficientCapacity,
                room(cur),
                reset_at,
                Nanos::MAX,
            )
        } else if self.weighted(&view, cur + u128::from(cost)) <= budget {
            let after = cur + u128::from(cost);
            let reset_at = self.reset_at(&view, after, now);
            (Verdict::Allow, room(after), reset_at, Nanos::ZERO)
        } else {
            let retry_at = Nanos::saturating_from(self.retry_at(&view, cost));
            let reset_at = self.reset_at(&view, cur, now);
            (Verdict::Deny, room(cur), reset_at, retry_at - now)
        };
        Outcome {
            verdict,
            limit,
            remaining,
            reset_at,
            retry_after,
        }
    }

    fn consume(&self, state: &mut SlidingWindowState, now: Nanos, cost: NonZeroU32) {
        let view = self.view(state, now);
        *state = SlidingWindowState {
            window: view.w,
            current: view.current.saturating_add(u64::from(cost.get())),
            previous: view.previous,
        };
    }
}

/// The counts of one key as they stand at some `now`.
struct View {
    /// The window `now` is judged in.
    w: u64,
    /// `e`: how far into window `w` we are, `0 ≤ e < W`.
    elapsed: u128,
    /// Admitted in `w`.
    current: u64,
    /// Admitted in `w − 1`.
    previous: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u64, window: u64) -> SlidingWindow {
        SlidingWindow::new(NonZeroU64::new(limit).unwrap(), Nanos(window)).unwrap()
    }

    fn cost(c: u32) -> NonZeroU32 {
        NonZeroU32::new(c).unwrap()
    }

    /// 10 admitted in window 0, none in window 1: at the middle of window 1 half of them still
    /// count, so a limit of 10 admits exactly 5 more.
    #[test]
    fn half_way_through_admits_half_of_the_previous() {
        let sw = limiter(10, 100);
        let state = SlidingWindowState {
            window: 0,
            current: 10,
            previous: 0,
        };
        let o = sw.check(&state, Nanos(150), cost(5));
        assert_eq!(o.verdict, Verdict::Allow);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.reset_at, Nanos(300));

        let o = sw.check(&state, Nanos(150), cost(6));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(o.remaining, 5);
        assert_eq!(o.reset_at, Nanos(200));
        // 6 fits once prev·(W − e) ≤ 4·W, i.e. W − e ≤ 40: at e = 60.
        assert_eq!(o.retry_after, Nanos(10));
        assert!(sw.check(&state, Nanos(160), cost(6)).is_allowed());
        assert!(!sw.check(&state, Nanos(159), cost(6)).is_allowed());
    }

    #[test]
    fn first_window_behaves_like_a_fixed_window() {
        let sw = limiter(3, 100);
        let mut s = SlidingWindowState::default();
        for left in [2, 1, 0] {
            let o = sw.acquire(&mut s, Nanos(10), cost(1));
            assert_eq!((o.verdict, o.remaining), (Verdict::Allow, left));
        }
        let o = sw.acquire(&mut s, Nanos(20), cost(1));
        assert_eq!(o.verdict, Verdict::Deny);
        // Window 0 is full; in window 1, 3·(W − e) ≤ 2·W needs W − e ≤ 66, so e = 34.
        assert_eq!(o.retry_after, Nanos(134 - 20));
        assert_eq!(o.reset_at, Nanos(200));
    }

    #[test]
    fn cost_of_the_whole_limit_waits_for_a_clean_window() {
        let sw = limiter(4, 100);
        let state = SlidingWindowState {
            window: 0,
            current: 1,
            previous: 0,
        };
        // Any trace of `cur` in window 1 keeps a cost of L out, so only window 2 fits.
        let o = sw.check(&state, Nanos(50), cost(4));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(o.retry_after, Nanos(150));
    }

    #[test]
    fn old_state_is_forgotten() {
        let sw = limiter(2, 100);
        let state = SlidingWindowState {
            window: 3,
            current: 2,
            previous: 2,
        };
        let o = sw.check(&state, Nanos(500), cost(2));
        assert_eq!(o.verdict, Verdict::Allow);
        assert_eq!(o.reset_at, Nanos(700));
        let empty = sw.check(&SlidingWindowState::default(), Nanos(7), cost(1));
        assert_eq!(empty.reset_at, Nanos(200));
    }

    #[test]
    fn cost_above_the_limit_never_fits() {
        let sw = limiter(2, 100);
        let o = sw.check(&SlidingWindowState::default(), Nanos(5), cost(3));
        assert_eq!(o.verdict, Verdict::InsufficientCapacity);
        assert_eq!(o.retry_after, Nanos::MAX);
        assert_eq!(o.reset_at, Nanos(5));
    }

    #[test]
    fn huge_limits_and_windows_do_not_overflow() {
        let sw = SlidingWindow::new(NonZeroU64::MAX, Nanos::MAX).unwrap();
        let mut s = SlidingWindowState::default();
        let o = sw.acquire(&mut s, Nanos(u64::MAX - 1), cost(u32::MAX));
        assert_eq!(o.verdict, Verdict::Allow);
        assert_eq!(o.remaining, u64::MAX - u64::from(u32::MAX));
        assert_eq!(o.reset_at, Nanos::MAX);
    }
}

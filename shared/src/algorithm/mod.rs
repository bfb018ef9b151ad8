//! The five limiter algorithms as pure state machines (DESIGN §3).
//!
//! Each algorithm is a small, immutable configuration (`FixedWindow`, `SlidingWindow`,
//! `SlidingLog`, `Gcra`, `LeakyBucket`) plus a state value it never owns. A decision is
//! [`Algorithm::check`], which reads the state and the time and answers an [`Outcome`]; the
//! caller commits an allowed decision with [`Algorithm::consume`]. Keeping the two apart is
//! what lets a request that matches several limits be allowed only when all of them allow
//! (check them all, then consume from all), without copying any state, and it lets the same
//! code run in the edge's per-key state, in the regional's memory store and as the
//! specification the Redis scripts are tested against.
//!
//! Windows are aligned to the Unix epoch (`window_index = now / window`, DESIGN §9); token and
//! leaky buckets carry absolute times in nanoseconds.

use std::{fmt, num::NonZeroU32};

use serde::{Deserialize, Serialize};

use crate::clock::Nanos;

mod fixed_window;
mod gcra;
mod leaky_bucket;
mod sliding_log;
mod sliding_window;

pub use self::{
    fixed_window::{FixedWindow, FixedWindowState},
    gcra::{Gcra, GcraState},
    leaky_bucket::{LeakyBucket, LeakyBucketState, LeakyMode},
    sliding_log::{SlidingLog, SlidingLogState},
    sliding_window::{SlidingWindow, SlidingWindowState},
};

/// A limiter algorithm: configuration that decides over a state it is handed.
pub trait Algorithm {
    /// Per-key state. `Default` is the state of a key never seen.
    type State: Clone + Default + fmt::Debug + PartialEq;

    /// Decides whether `cost` fits at `now`. Pure: reads `state`, changes nothing.
    fn check(&self, state: &Self::State, now: Nanos, cost: NonZeroU32) -> Outcome;

    /// Commits `cost` at `now`. Call it only after [`check`](Algorithm::check) allowed the same
    /// `(state, now, cost)`; otherwise the state may admit more than the limit.
    fn consume(&self, state: &mut Self::State, now: Nanos, cost: NonZeroU32);

    /// `check`, then `consume` when allowed: the one-limit path.
    fn acquire(&self, state: &mut Self::State, now: Nanos, cost: NonZeroU32) -> Outcome {
        let outcome = self.check(state, now, cost);
        if outcome.is_allowed() {
            self.consume(state, now, cost);
        }
        outcome
    }
}

/// What a limiter answers for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Allow, deny, or never.
    pub verdict: Verdict,
    /// The limit this algorithm enforces (its limit per window, or its burst capacity).
    pub limit: u64,
    /// What is left after this decision: after consuming `cost` when allowed, as is when not.
    pub remaining: u64,
    /// When the limiter is back to full capacity if nothing else arrives (window end, or the
    /// bucket empty).
    pub reset_at: Nanos,
    /// How long until the same `cost` would be allowed if nothing else arrives; zero when
    /// allowed, [`Nanos::MAX`] when the cost can never fit.
    pub retry_after: Nanos,
}

impl Outcome {
    /// True when the request may proceed (now, or after a shaper's delay).
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow | Verdict::Delay { .. })
    }
}

/// The decision itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Proceed now.
    Allow,
    /// Proceed after `after` (the leaky bucket as a shaper); the cost is already counted.
    Delay {
        /// How long the caller should hold the request before sending it on.
        after: Nanos,
    },
    /// Not now; `retry_after` says when.
    Deny,
    /// Not ever: the cost is larger than the limiter's capacity, so no wait helps.
    InsufficientCapacity,
}

/// Any of the five algorithms, as a rule holds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// Count per epoch-aligned window.
    FixedWindow(FixedWindow),
    /// Current window plus the weighted previous one (the default).
    SlidingWindow(SlidingWindow),
    /// Every admitted timestamp in the last window: exact, memory grows with the limit.
    SlidingLog(SlidingLog),
    /// Token bucket as GCRA: one theoretical arrival time.
    TokenBucket(Gcra),
    /// Leaky bucket, as a meter (deny when full) or a shaper (delay until it drains).
    LeakyBucket(LeakyBucket),
}

/// The state of a key under any [`Limiter`]. A state of the wrong kind (the rule changed
/// algorithm) is treated as the new kind's fresh state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimiterState {
    /// See [`FixedWindowState`].
    FixedWindow(FixedWindowState),
    /// See [`SlidingWindowState`].
    SlidingWindow(SlidingWindowState),
    /// See [`SlidingLogState`].
    SlidingLog(SlidingLogState),
    /// See [`GcraState`].
    TokenBucket(GcraState),
    /// See [`LeakyBucketState`].
    LeakyBucket(LeakyBucketState),
}

impl Limiter {
    /// Decides whether `cost` fits at `now`; see [`Algorithm::check`]. A `state` of another
    /// kind (the rule changed algorithm) is read as this limiter's fresh state.
    pub fn check(&self, state: &LimiterState, now: Nanos, cost: NonZeroU32) -> Outcome {
        match (self, state) {
            (Limiter::FixedWindow(a), LimiterState::FixedWindow(s)) => a.check(s, now, cost),
            (Limiter::SlidingWindow(a), LimiterState::SlidingWindow(s)) => a.check(s, now, cost),
            (Limiter::SlidingLog(a), LimiterState::SlidingLog(s)) => a.check(s, now, cost),
            (Limiter::TokenBucket(a), LimiterState::TokenBucket(s)) => a.check(s, now, cost),
            (Limiter::LeakyBucket(a), LimiterState::LeakyBucket(s)) => a.check(s, now, cost),
            // A fresh state matches by construction, so this recurses once.
            (limiter, _) => limiter.check(&limiter.new_state(), now, cost),
        }
    }

    /// Commits `cost` at `now`; see [`Algorithm::consume`]. A `state` of another kind is
    /// replaced by this limiter's fresh state first: what it counted was for another rule.
    pub fn consume(&self, state: &mut LimiterState, now: Nanos, cost: NonZeroU32) {
        match (self, &mut *state) {
            (Limiter::FixedWindow(a), LimiterState::FixedWindow(s)) => a.consume(s, now, cost),
            (Limiter::SlidingWindow(a), LimiterState::SlidingWindow(s)) => a.consume(s, now, cost),
            (Limiter::SlidingLog(a), LimiterState::SlidingLog(s)) => a.consume(s, now, cost),
            (Limiter::TokenBucket(a), LimiterState::TokenBucket(s)) => a.consume(s, now, cost),
            (Limiter::LeakyBucket(a), LimiterState::LeakyBucket(s)) => a.consume(s, now, cost),
            // A fresh state matches by construction, so this recurses once.
            (limiter, _) => {
                *state = limiter.new_state();
                limiter.consume(state, now, cost);
            }
        }
    }

    /// `check`, then `consume` when allowed: the one-limit path, as [`Algorithm::acquire`].
    pub fn acquire(&self, state: &mut LimiterState, now: Nanos, cost: NonZeroU32) -> Outcome {
        let outcome = self.check(state, now, cost);
        if outcome.is_allowed() {
            self.consume(state, now, cost);
        }
        outcome
    }

    /// The state of a key never seen under this limiter.
    pub fn new_state(&self) -> LimiterState {
        match self {
            Limiter::FixedWindow(_) => LimiterState::FixedWindow(FixedWindowState::default()),
            Limiter::SlidingWindow(_) => LimiterState::SlidingWindow(SlidingWindowState::default()),
            Limiter::SlidingLog(_) => LimiterState::SlidingLog(SlidingLogState::default()),
            Limiter::TokenBucket(_) => LimiterState::TokenBucket(GcraState::default()),
            Limiter::LeakyBucket(_) => LimiterState::LeakyBucket(LeakyBucketState::default()),
        }
    }

    /// What [`Outcome::limit`] reports: the limit per window, or a bucket's capacity.
    pub fn limit(&self) -> u64 {
        match self {
            Limiter::FixedWindow(a) => a.limit().get(),
            Limiter::SlidingWindow(a) => a.limit().get(),
            Limiter::SlidingLog(a) => a.limit().get(),
            Limiter::TokenBucket(a) => a.burst().get(),
            Limiter::LeakyBucket(a) => a.capacity().get(),
        }
    }

    /// The window, or for a bucket the time it takes to go from empty to full capacity (token
    /// bucket) or from full to empty (leaky bucket): the span [`limit`](Limiter::limit) is
    /// measured over.
    pub fn window(&self) -> Nanos {
        match self {
            Limiter::FixedWindow(a) => a.window(),
            Limiter::SlidingWindow(a) => a.window(),
            Limiter::SlidingLog(a) => a.window(),
            Limiter::TokenBucket(a) => a.refill_time(),
            Limiter::LeakyBucket(a) => a.drain_time(),
        }
    }
}

//! Slow, obviously-correct models of the five algorithms, for the property tests.
//!
//! A model keeps every request it admitted, `(time, cost)`, and answers each question by
//! recomputing from that whole history: sums over a window for the window algorithms, a replay
//! through a plain token or level simulation for the buckets. Nothing is rolled, cached or
//! derived in closed form. Where an answer is "the first time at which ...", the model searches
//! for it (every such predicate only improves with time when nothing is admitted, so a binary
//! search over a bounded span is exact). Obviously correct beats fast: a check costs
//! O(history · log span).

use std::num::NonZeroU32;

use shared::{
    Nanos,
    algorithm::{Outcome, Verdict},
};

/// One algorithm's configuration, as plain numbers.
#[derive(Clone, Copy, Debug)]
pub enum Model {
    /// At most `limit` per epoch-aligned window of `window` ns.
    FixedWindow { limit: u64, window: u64 },
    /// Current window plus the previous one weighted by its overlap with the last `window` ns.
    SlidingWindow { limit: u64, window: u64 },
    /// At most `limit` with a timestamp in the last `window` ns.
    SlidingLog { limit: u64, window: u64 },
    /// Token bucket: one token back every `interval` ns, at most `burst` tokens.
    TokenBucket { interval: u64, burst: u64 },
    /// Leaky bucket: one unit drains every `interval` ns, at most `capacity` units held.
    LeakyBucket {
        interval: u64,
        capacity: u64,
        shaper: bool,
    },
}

/// A model and every request it admitted.
#[derive(Clone, Debug)]
pub struct Reference {
    model: Model,
    admitted: Vec<(u64, u64)>,
}

impl Reference {
    /// A model that has admitted nothing.
    pub fn new(model: Model) -> Reference {
        Reference {
            model,
            admitted: Vec::new(),
        }
    }

    /// The same decision the algorithm's `check` must make, computed from scratch.
    pub fn check(&self, now: Nanos, cost: NonZeroU32) -> Outcome {
        let (now, cost) = (now.as_u64(), u64::from(cost.get()));
        let limit = self.capacity();
        if cost > limit {
            return Outcome {
                verdict: Verdict::InsufficientCapacity,
                limit,
                remaining: self.remaining(now),
                reset_at: Nanos(self.reset_at(now)),
                retry_after: Nanos::MAX,
            };
        }
        if self.fits(now, cost) {
            let mut after = self.clone();
            after.admitted.push((now, cost));
            return Outcome {
                verdict: self.allow_verdict(now),
                limit,
                remaining: after.remaining(now),
                reset_at: Nanos(after.reset_at(now)),
                retry_after: Nanos::ZERO,
            };
        }
        let retry_at = self.first(now, |t| self.fits(t, cost));
        Outcome {
            verdict: Verdict::Deny,
            limit,
            remaining: self.remaining(now),
            reset_at: Nanos(self.reset_at(now)),
            retry_after: Nanos(retry_at - now),
        }
    }

    /// `check`, and remember the request when it is allowed.
    pub fn acquire(&mut self, now: Nanos, cost: NonZeroU32) -> Outcome {
        let outcome = self.check(now, cost);
        if outcome.is_allowed() {
            self.admitted.push((now.as_u64(), u64::from(cost.get())));
        }
        outcome
    }

    /// The limit per window, or the bucket's capacity.
    fn capacity(&self) -> u64 {
        match self.model {
            Model::FixedWindow { limit, .. }
            | Model::SlidingWindow { limit, .. }
            | Model::SlidingLog { limit, .. } => limit,
            Model::TokenBucket { burst, .. } => burst,
            Model::LeakyBucket { capacity, .. } => capacity,
        }
    }

    /// Whether `cost` more fits at `t` on top of the history.
    fn fits(&self, t: u64, cost: u64) -> bool {
        let cost = u128::from(cost);
        match self.model {
            Model::FixedWindow { limit, window } => {
                self.sum(|ts| ts / window == t / window) + cost <= u128::from(limit)
            }
            Model::SlidingWindow { limit, window } => {
                let (cur, prev, e) = self.sliding_counts(t, window);
                let w = u128::from(window);
                (cur + cost) * w + prev * (w - e) <= u128::from(limit) * w
            }
            Model::SlidingLog { limit, window } => {
                self.sum(|ts| in_log(ts, t, window)) + cost <= u128::from(limit)
            }
            Model::TokenBucket { interval, .. } => self.tokens(t) >= cost * u128::from(interval),
            Model::LeakyBucket {
                interval, capacity, ..
            } => {
                let i = u128::from(interval);
                self.level(t) + cost * i <= u128::from(capacity) * i
            }
        }
    }

    /// The `remaining` the outcome reports at `t`, in each algorithm's own terms.
    fn remaining(&self, t: u64) -> u64 {
        let left = match self.model {
            Model::FixedWindow { limit, window } => {
                u128::from(limit).saturating_sub(self.sum(|ts| ts / window == t / window))
            }
            Model::SlidingWindow { limit, window } => {
                let (cur, prev, e) = self.sliding_counts(t, window);
                let w = u128::from(window);
                (u128::from(limit) * w).saturating_sub(cur * w + prev * (w - e)) / w
            }
            Model::SlidingLog { limit, window } => {
                u128::from(limit).saturating_sub(self.sum(|ts| in_log(ts, t, window)))
            }
            Model::TokenBucket { interval, .. } => self.tokens(t) / u128::from(interval),
            Model::LeakyBucket {
                interval, capacity, ..
            } => {
                let i = u128::from(interval);
                (u128::from(capacity) * i).saturating_sub(self.level(t)) / i
            }
        };
        u64::try_from(left).expect("remaining fits the limit's u64")
    }

    /// When the limiter is back to full capacity with no more traffic: the window's end for a
    /// fixed window, otherwise the first time nothing of the history counts any more.
    fn reset_at(&self, now: u64) -> u64 {
        match self.model {
            Model::FixedWindow { window, .. } => (now / window + 1) * window,
            _ => self.first(now, |t| self.is_clear(t)),
        }
    }

    /// Whether nothing of the history weighs on the limiter at `t`.
    fn is_clear(&self, t: u64) -> bool {
        match self.model {
            Model::FixedWindow { window, .. } => self.sum(|ts| ts / window == t / window) == 0,
            Model::SlidingWindow { window, .. } => {
                let (cur, prev, e) = self.sliding_counts(t, window);
                cur == 0 && prev * (u128::from(window) - e) == 0
            }
            Model::SlidingLog { window, .. } => self.sum(|ts| in_log(ts, t, window)) == 0,
            Model::TokenBucket { interval, burst } => {
                self.tokens(t) == u128::from(burst) * u128::from(interval)
            }
            Model::LeakyBucket { .. } => self.level(t) == 0,
        }
    }

    /// The verdict of a request that fits at `t`: the shaper delays it behind the queue.
    fn allow_verdict(&self, t: u64) -> Verdict {
        match self.model {
            Model::LeakyBucket { shaper: true, .. } if self.level(t) > 0 => Verdict::Delay {
                after: Nanos(u64::try_from(self.level(t)).expect("level fits u64")),
            },
            _ => Verdict::Allow,
        }
    }

    /// The first `t ≥ now` at which `holds(t)`, given that it holds from some point within one
    /// horizon on and keeps holding after.
    fn first(&self, now: u64, holds: impl Fn(u64) -> bool) -> u64 {
        let (mut lo, mut hi) = (now, now + self.horizon());
        assert!(holds(hi), "the model never settles within its horizon");
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if holds(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// How far ahead anything can be: two windows for the sliding counter (what is admitted
    /// now still weighs on the next window), one for the other windows, a full bucket's time.
    fn horizon(&self) -> u64 {
        match self.model {
            Model::FixedWindow { window, .. } | Model::SlidingLog { window, .. } => window,
            Model::SlidingWindow { window, .. } => 2 * window,
            Model::TokenBucket { interval, burst } => interval * burst,
            Model::LeakyBucket {
                interval, capacity, ..
            } => interval * capacity,
        }
    }

    /// Total admitted cost over the requests whose time satisfies `counts`.
    fn sum(&self, counts: impl Fn(u64) -> bool) -> u128 {
        self.admitted
            .iter()
            .filter(|&&(ts, _)| counts(ts))
            .map(|&(_, c)| u128::from(c))
            .sum()
    }

    /// `(cur, prev, e)` at `t`: the cost admitted in `t`'s window, in the window before, and
    /// how far into its window `t` is.
    fn sliding_counts(&self, t: u64, window: u64) -> (u128, u128, u128) {
        let w = t / window;
        let cur = self.sum(|ts| ts / window == w);
        let prev = self.sum(|ts| w > 0 && ts / window == w - 1);
        (cur, prev, u128::from(t - w * window))
    }

    /// Token bucket: replay the history into a bucket of `burst·interval` ns of credit that
    /// starts full, refills one ns per ns and pays `cost·interval` per admitted request; the
    /// credit at `t`.
    fn tokens(&self, t: u64) -> u128 {
        let Model::TokenBucket { interval, burst } = self.model else {
            unreachable!("tokens is for token buckets")
        };
        let full = u128::from(burst) * u128::from(interval);
        let mut credit = full;
        let mut last = None;
        for &(ts, cost) in &self.admitted {
            if let Some(last) = last {
                credit = full.min(credit + u128::from(ts - last));
            }
            credit -= u128::from(cost) * u128::from(interval);
            last = Some(ts);
        }
        match last {
            Some(last) => full.min(credit + u128::from(t - last)),
            None => full,
        }
    }

    /// Leaky bucket: replay the history into a bucket that starts empty, drains one ns of
    /// level per ns and fills `cost·interval` per admitted request; the level at `t`.
    fn level(&self, t: u64) -> u128 {
        let Model::LeakyBucket { interval, .. } = self.model else {
            unreachable!("level is for leaky buckets")
        };
        let mut level = 0u128;
        let mut last = 0u64;
        for &(ts, cost) in &self.admitted {
            level = level.saturating_sub(u128::from(ts - last));
            level += u128::from(cost) * u128::from(interval);
            last = ts;
        }
        level.saturating_sub(u128::from(t - last))
    }
}

/// The sliding log's rule, literally: an entry counts at `now` iff `ts > now − W`.
fn in_log(ts: u64, now: u64, window: u64) -> bool {
    i128::from(ts) > i128::from(now) - i128::from(window)
}

//! Sliding window log: every admitted request of the last window, with its time. Exact, at
//! the price of memory that grows with the limit.
//!
//! # Semantics
//!
//! With window length `W` and limit `L`, an entry `(ts, cost)` counts at `now` iff
//! `ts > now − W` (computed as `ts + W > now`, so nothing underflows near the epoch), and `sum`
//! is the total cost of the entries that count.
//!
//! - A request of cost `c` is allowed iff `sum + c ≤ L`; consuming it drops the entries that
//!   no longer count and appends `(now, c)`.
//! - `remaining = L − sum`, after adding `c` when allowed: exactly the largest cost that fits.
//! - `reset_at` is when the newest counting entry stops counting (`ts + W`), or `now` when none
//!   counts.
//! - On a denial, `retry_after` is the time until enough of the oldest entries have expired
//!   for `c` to fit: the first entry (oldest first) at which the expired cost reaches
//!   `sum + c − L` expires at `ts + W`.
//! - `c > L` is [`Verdict::InsufficientCapacity`] with `retry_after = Nanos::MAX`.
//!
//! # Memory
//!
//! Every entry has a cost of at least 1 and the entries that count sum to at most `L`, so the
//! log holds at most `L` entries; [`Algorithm::consume`] enforces that bound even when called
//! without a successful check. Entries are kept in time order. A clock that steps back (a
//! skewed peer) is read as standing at the newest entry: the new entry is stamped with that
//! time, which keeps the order and only makes its cost count a little longer.
//!
//! # Refund
//!
//! [`SlidingLog::refund`] takes back an admitted request that another of its limits denied by
//! removing its entry, stamped at its outcome's `reset_at − W`. That is exact whatever happened
//! in between: entries of equal time and cost are interchangeable, and an entry that has
//! already left the log no longer counts. Refunding the same request twice would remove a
//! second entry of the same time and cost if there is one: callers refund once.
//!
//! In the hierarchy this algorithm always takes the exact path (DESIGN §3): a log cannot be
//! split into grants.

use std::{
    collections::VecDeque,
    num::{NonZeroU32, NonZeroU64},
};

use super::{Algorithm, Outcome, Verdict};
use crate::clock::Nanos;

/// Sliding window log: at most `limit` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingLog {
    limit: NonZeroU64,
    window: Nanos,
}

impl SlidingLog {
    /// At most `limit` per `window`; `None` when `window` is zero.
    pub fn new(limit: NonZeroU64, window: Nanos) -> Option<SlidingLog> {
        (window > Nanos::ZERO).then_some(SlidingLog { limit, window })
    }

    /// The limit per window.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Nanos {
        self.window
    }

    /// Takes back `cost` that an allowed acquire consumed from `state`; `admitted` is the
    /// outcome that acquire answered. Returns whether an entry was removed (none is when it
    /// has expired and been dropped already).
    pub fn refund(
        &self,
        state: &mut SlidingLogState,
        admitted: &Outcome,
        cost: NonZeroU32,
    ) -> bool {
        // An allowed outcome's `reset_at` is the entry's stamp plus the window.
        let stamp = admitted.reset_at - self.window;
        let entry = (stamp, cost.get());
        // Refunds follow their acquire closely: search from the newest end.
        match state.entries.iter().rposition(|&e| e == entry) {
            Some(i) => {
                state.entries.remove(i);
                state.total -= u64::from(cost.get());
                true
            }
            None => false,
        }
    }

    /// True when an entry stamped `ts` no longer counts at `now`: `ts + W ≤ now`.
    fn expired(&self, ts: Nanos, now: Nanos) -> bool {
        u128::from(ts.as_u64()) + u128::from(self.window.as_u64()) <= u128::from(now.as_u64())
    }

    /// When an entry stamped `ts` stops counting.
    fn expiry(&self, ts: Nanos) -> Nanos {
        ts + self.window
    }
}

/// Per-key state of [`SlidingLog`]: the admitted entries, oldest first, and their total.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlidingLogState {
    /// `(time, cost)` of each admitted request, in non-decreasing time; at most `limit` long.
    entries: VecDeque<(Nanos, u32)>,
    /// Sum of the costs in `entries`, so a check only walks the entries that have expired.
    total: u64,
}

impl SlidingLogState {
    /// How many entries the log holds, expired ones included until the next consume.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the log holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, oldest first, as `(time, cost)`.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (Nanos, u32)> + '_ {
        self.entries.iter().copied()
    }

    /// The time every decision on this state is made at: `now`, or the newest entry's time
    /// when the clock has stepped back behind it.
    fn effective_now(&self, now: Nanos) -> Nanos {
        self.entries.back().map_or(now, |&(ts, _)| now.max(ts))
    }
}

impl Algorithm for SlidingLog {
    type State = SlidingLogState;

    fn check(&self, state: &SlidingLogState, now: Nanos, cost: NonZeroU32) -> Outcome {
        let limit = self.limit.get();
        let at = state.effective_now(now);
        // The log is in time order, so the expired entries are a prefix: walk only those.
        let (expired, expired_sum) = state
            .entries
            .iter()
            .take_while(|&&(ts, _)| self.expired(ts, at))
            .fold((0, 0u64), |(n, sum), &(_, c)| (n + 1, sum + u64::from(c)));
        let counting = state.entries.range(expired..);
        let sum = state.total - expired_sum;
        let cost = u64::from(cost.get());
        let newest = counting.clone().next_back();
        let reset_at = newest.map_or(now, |&(ts, _)| self.expiry(ts));
        let left = limit.saturating_sub(sum);
        let (verdict, remaining, reset_at, retry_after) = if cost > limit {
            (Verdict::InsufficientCapacity, left, reset_at, Nanos::MAX)
        } else if sum.saturating_add(cost) <= limit {
            (Verdict::Allow, left - cost, self.expiry(at), Nanos::ZERO)
        } else {
            // Expire the oldest counting entries until `need` has left the window; the newest
            // entry frees everything, and `cost ≤ L` means that is always enough.
            let need = sum.saturating_add(cost) - limit;
            let retry_at = counting
                .scan(0u64, |freed, &(ts, c)| {
                    *freed += u64::from(c);
                    Some((ts, *freed))
                })
                .find(|&(_, freed)| freed >= need)
                .map_or(reset_at, |(ts, _)| self.expiry(ts));
            (Verdict::Deny, left, reset_at, retry_at - now)
        };
        Outcome {
            verdict,
            limit,
            remaining,
            reset_at,
            retry_after,
        }
    }

    fn consume(&self, state: &mut SlidingLogState, now: Nanos, cost: NonZeroU32) {
        let at = state.effective_now(now);
        while let Some(&(ts, c)) = state.entries.front() {
            if !self.expired(ts, at) {
                break;
            }
            state.entries.pop_front();
            state.total -= u64::from(c);
        }
        let full = u64::try_from(state.entries.len()).unwrap_or(u64::MAX) >= self.limit.get();
        match state.entries.back_mut() {
            // Only a consume without a successful check gets here. Folding the cost into the
            // newest entry, restamped `at`, keeps the memory bound and counts the cost for at
            // least as long as it should.
            Some(newest) if full => {
                let merged = newest.1.saturating_add(cost.get());
                state.total += u64::from(merged - newest.1);
                *newest = (at, merged);
            }
            _ => {
                state.entries.push_back((at, cost.get()));
                state.total += u64::from(cost.get());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u64, window: u64) -> SlidingLog {
        SlidingLog::new(NonZeroU64::new(limit).unwrap(), Nanos(window)).unwrap()
    }

    fn cost(c: u32) -> NonZeroU32 {
        NonZeroU32::new(c).unwrap()
    }

    #[test]
    fn entries_count_for_exactly_one_window() {
        let log = limiter(3, 100);
        let mut s = SlidingLogState::default();
        assert!(log.acquire(&mut s, Nanos(0), cost(1)).is_allowed());
        assert!(log.acquire(&mut s, Nanos(10), cost(2)).is_allowed());
        let o = log.acquire(&mut s, Nanos(50), cost(2));
        assert_eq!(o.verdict, Verdict::Deny);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.reset_at, Nanos(110));
        // The entry at 0 frees 1, not enough; the one at 10 frees the rest at 110.
        assert_eq!(o.retry_after, Nanos(60));
        assert!(!log.check(&s, Nanos(109), cost(2)).is_allowed());
        assert!(log.check(&s, Nanos(110), cost(2)).is_allowed());

        // At 100 the first entry (ts 0) no longer counts: ts > now − W is 0 > 0.
        let o = log.acquire(&mut s, Nanos(100), cost(1));
        assert_eq!(o.verdict, Verdict::Allow);
        assert_eq!((o.remaining, o.reset_at), (0, Nanos(200)));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn entries_at_the_epoch_count() {
        let log = limiter(1, 100);
        let mut s = SlidingLogState::default();
        assert!(log.acquire(&mut s, Nanos(0), cost(1)).is_allowed());
        let o = log.acquire(&mut s, Nanos(99), cost(1));
        assert_eq!((o.verdict, o.retry_after), (Verdict::Deny, Nanos(1)));
    }

    #[test]
    fn cost_above_the_limit_never_fits() {
        let log = limiter(2, 100);
        let o = log.check(&SlidingLogState::default(), Nanos(5), cost(3));
        assert_eq!(o.verdict, Verdict::InsufficientCapacity);
        assert_eq!((o.retry_after, o.reset_at), (Nanos::MAX, Nanos(5)));
    }

    #[test]
    fn clock_stepping_back_keeps_order_and_counts() {
        let log = limiter(2, 100);
        let mut s = SlidingLogState::default();
        log.consume(&mut s, Nanos(500), cost(1));
        log.consume(&mut s, Nanos(300), cost(1));
        assert_eq!(s.entries().collect::<Vec<_>>(), [(Nanos(500), 1); 2]);
        let o = log.check(&s, Nanos(300), cost(1));
        assert_eq!((o.verdict, o.retry_after), (Verdict::Deny, Nanos(300)));
    }

    #[test]
    fn a_refund_removes_that_request_s_entry() {
        let log = limiter(3, 100);
        let mut s = SlidingLogState::default();
        assert!(log.acquire(&mut s, Nanos(1_000), cost(1)).is_allowed());
        let mine = log.acquire(&mut s, Nanos(1_010), cost(2));
        assert!(log.refund(&mut s, &mine, cost(2)));
        assert_eq!(s.entries().collect::<Vec<_>>(), [(Nanos(1_000), 1)]);
        assert_eq!(log.check(&s, Nanos(1_020), cost(2)).remaining, 0);
        assert!(
            !log.refund(&mut s, &mine, cost(2)),
            "nothing left to remove"
        );

        // Stamped at the newest entry when the clock stepped back: the stamp comes from the
        // outcome, not from `now`.
        let back = log.acquire(&mut s, Nanos(990), cost(1));
        assert_eq!(back.reset_at, Nanos(1_100));
        assert!(log.refund(&mut s, &back, cost(1)));
        assert_eq!(s.len(), 1);

        // Expired and dropped by a later consume: nothing to take back, nothing counts.
        let old = log.acquire(&mut s, Nanos(1_050), cost(1));
        assert!(log.acquire(&mut s, Nanos(1_150), cost(3)).is_allowed());
        assert!(!log.refund(&mut s, &old, cost(1)));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn consume_without_check_keeps_the_memory_bound() {
        let log = limiter(2, 100);
        let mut s = SlidingLogState::default();
        for now in 0..10 {
            log.consume(&mut s, Nanos(now), cost(1));
        }
        assert_eq!(s.len(), 2);
        assert_eq!(s.entries().map(|(_, c)| u64::from(c)).sum::<u64>(), 10);
        assert_eq!(log.check(&s, Nanos(10), cost(1)).remaining, 0);
    }
}

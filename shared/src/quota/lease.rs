//! Grants of a token bucket's tokens, so that edges decide a bucket's keys locally too
//! (DESIGN §3: the token bucket is counter-like and works in the hierarchy through grants).
//!
//! # How a bucket grants
//!
//! An edge holds a bucket's grant exactly as it holds a window's: per (limit, key, *lease
//! window*) the three monotone counters `granted`, `released`, `used` in a [`KeyLedger`],
//! merged by `max`, so a sync is idempotent as before. What differs is where the quota comes
//! from. A window's grants are bounded by `θ·P`; a bucket's are tokens taken out of the bucket:
//!
//! - **Charging.** The bucket is charged for what each edge *holds*, `max(used, granted −
//!   released)` ([`EdgeCounters::holding`](super::EdgeCounters::holding)): every change of a holding moves the bucket's TAT by
//!   as many tokens, forward when a grant is minted (or an edge admitted beyond its grant, a
//!   soft key's cold allowance), back when an edge hands tokens back unused. Holdings are a
//!   function of the merged counters, so a repeated sync moves nothing.
//! - **Parking.** Tokens an edge holds unused have left the bucket, but the bucket must not
//!   refill in their place: a bucket of `B` that granted `B/2`, then refilled, would let the
//!   edge's `B/2` and a full bucket through at once. So before every operation on the bucket
//!   (a sync, an exact acquire) its TAT is raised to at least `now + G·T`, `G` the tokens
//!   parked at edges ([`KeyLedger::unused`] over the lease windows still counted): the level
//!   never exceeds `B − G`. Everything that can still be admitted at once, the level plus `G`,
//!   stays within `B` and grows no faster than the bucket's rate, so over any span `t` the
//!   edges and the exact path together admit at most `B + t/T`, as the bucket alone would.
//!   What the regional knows of `G` is as of each edge's last sync, an overestimate (the edge
//!   has used some since), which only parks more than needed.
//! - **Lease windows.** A grant is spent in the lease window ([`LEASE_WINDOW`], epoch-aligned
//!   like every window, DESIGN §9) it was minted for; at the turn the edge hands it back, and
//!   the regional counts parked tokens in the current and the previous lease window only. So a
//!   grant an edge never handed back (it died) holds the bucket down for two lease windows at
//!   most, and the rest of the machinery (sync, hand-back of idle grants, the previous
//!   window's counts) is the windows' own.
//! - **θ.** Grants stop while fewer than `n` whole tokens stand above the reserve `B − ⌊θ·B⌋`:
//!   the last `(1 − θ)` of the bucket goes through the exact path, as the last `(1 − θ)` of a
//!   window's partition does. An edge's grant is at most `min(want, ⌊θ·B⌋/n)` and a fair
//!   `1/n` of the tokens above the reserve, as [`KeyLedger::grant`] sizes it. Unlike a
//!   window, a bucket refills, so running low is not sticky: grants resume once it has.

use super::{EdgeId, KeyLedger, Threshold};
use crate::{
    algorithm::{Gcra, GcraState, Limiter},
    clock::Nanos,
};

/// How long a bucket's grant lasts: the lease window its ledger counts. Long enough that the
/// turn (where each edge hands back and asks again, its next request taking the exact path
/// for a hard key) is rare, short enough that a grant a dead edge never handed back stops
/// holding the bucket down within seconds.
pub const LEASE_WINDOW: Nanos = Nanos::from_secs(10);

/// The window an edge's grants of `limiter`'s keys are counted in (DESIGN §9, epoch-aligned):
/// a window algorithm's own, [`LEASE_WINDOW`] for a token bucket (and a leaky-bucket meter, which
/// rules compile to the GCRA it equals); `None` for the limiters whose keys take the exact path
/// every time (the sliding log, exact only at one authority, and the leaky-bucket shaper, which
/// answers "go after X" as no grant can).
pub fn grant_window(limiter: &Limiter) -> Option<Nanos> {
    match limiter {
        Limiter::FixedWindow(_) | Limiter::SlidingWindow(_) => {
            Some(Nanos(limiter.window().as_u64().max(1)))
        }
        Limiter::TokenBucket(_) => Some(LEASE_WINDOW),
        Limiter::SlidingLog(_) | Limiter::LeakyBucket(_) => None,
    }
}

/// What a bucket's lease sync answers, as a window's sync does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseReply {
    /// The edge's `granted` ceiling afterwards.
    pub granted: u64,
    /// The edge's merged `used`.
    pub used: u64,
    /// The edge's merged `released`.
    pub released: u64,
    /// What this sync added to the edge's `used`: its admissions since its last sync that
    /// reached the store (the region's demand for the key, for the coordinator).
    pub admitted: u64,
    /// Whole tokens in the bucket afterwards (parked ones not counted).
    pub level: u64,
    /// Fewer than `n` tokens stand above the reserve, and this edge holds more than it wants:
    /// it should hand its unused tokens back.
    pub recall: bool,
}

/// Raises `state`'s TAT so that the bucket's level leaves room for `parked` tokens held unused
/// at edges: `tat ≥ now + parked·T`.
pub fn park(gcra: &Gcra, state: &mut GcraState, now: Nanos, parked: u64) {
    let t = u128::from(gcra.emission_interval().as_u64());
    let floor = u128::from(now.as_u64()).saturating_add(u128::from(parked).saturating_mul(t));
    state.tat = state.tat.max(Nanos::saturating_from(floor));
}

/// Moves `state` by a change of an edge's holding from `before` to `after`: takes the
/// difference from the bucket (from `max(tat, now)`, as a consume does, possibly past empty:
/// what an edge admitted beyond its grant is owed) or gives it back.
pub fn charge(gcra: &Gcra, state: &mut GcraState, now: Nanos, before: u64, after: u64) {
    let t = u128::from(gcra.emission_interval().as_u64());
    let tat = u128::from(state.tat.as_u64());
    let moved = if after >= before {
        let base = tat.max(u128::from(now.as_u64()));
        base.saturating_add(u128::from(after - before) * t)
    } else {
        tat.saturating_sub(u128::from(before - after) * t)
    };
    state.tat = Nanos::saturating_from(moved);
}

/// Whole tokens in the bucket at `now`: `⌊(B·T − max(0, tat − now)) / T⌋`, at least 0.
pub fn level(gcra: &Gcra, state: &GcraState, now: Nanos) -> u64 {
    let t = u128::from(gcra.emission_interval().as_u64());
    let full = u128::from(gcra.burst().get()) * t;
    let owed = u128::from(state.tat.as_u64()).saturating_sub(u128::from(now.as_u64()));
    u64::try_from(full.saturating_sub(owed) / t).unwrap_or(u64::MAX)
}

/// One edge's sync of a bucket key for one lease window: parks what the edges hold unused
/// (`ledger`'s and `elsewhere`, the other counted lease window's), merges the edge's
/// `used` and `released`, charges the bucket for the change of its holding, then mints up to
/// `want` more under θ with `edges` edges (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn lease(
    gcra: &Gcra,
    state: &mut GcraState,
    now: Nanos,
    ledger: &mut KeyLedger,
    elsewhere: u64,
    edge: EdgeId,
    (used, released, want): (u64, u64, u64),
    threshold: Threshold,
    edges: u32,
) -> LeaseReply {
    let n = u64::from(edges.max(1));
    park(gcra, state, now, ledger.unused().saturating_add(elsewhere));
    let before = ledger.counters(edge);
    ledger.merge(edge, used, released);
    let admitted = ledger.counters(edge).used - before.used;
    let before = before.holding();
    charge(gcra, state, now, before, ledger.counters(edge).holding());
    let burst = gcra.burst().get();
    let ceiling = threshold.of(burst);
    let reserve = burst - ceiling;
    let pool = level(gcra, state, now).saturating_sub(reserve);
    let c = ledger.counters(edge);
    let target = want.min(ceiling / n);
    let delta = target.saturating_sub(c.unused()).min(pool / n);
    if delta > 0 {
        let before = c.holding();
        ledger.raise(edge, delta);
        charge(gcra, state, now, before, ledger.counters(edge).holding());
    }
    let c = ledger.counters(edge);
    LeaseReply {
        granted: c.granted,
        used: c.used,
        released: c.released,
        admitted,
        level: level(gcra, state, now),
        recall: pool < n && c.unused() > want,
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64};

    use super::*;
    use crate::{
        algorithm::{Algorithm, Verdict},
        quota::DEFAULT_THRESHOLD,
    };

    /// One key: its bucket, 10 tokens a second (T = 100 ms) holding 10, and its lease ledger.
    struct Key {
        g: Gcra,
        s: GcraState,
        l: KeyLedger,
    }

    impl Key {
        fn new() -> Key {
            let ten = NonZeroU64::new(10).unwrap();
            Key {
                g: Gcra::new(ten, Nanos::from_secs(1), ten).unwrap(),
                s: GcraState::default(),
                l: KeyLedger::new(),
            }
        }

        /// `edge`'s sync of `(used, released, want)` at `at` with `n` edges, under the
        /// default θ and nothing parked in the other lease window.
        fn sync(&mut self, at: Nanos, edge: EdgeId, counts: (u64, u64, u64), n: u32) -> LeaseReply {
            lease(
                &self.g,
                &mut self.s,
                at,
                &mut self.l,
                0,
                edge,
                counts,
                DEFAULT_THRESHOLD,
                n,
            )
        }
    }

    const A: EdgeId = EdgeId(1);
    const B: EdgeId = EdgeId(2);
    const NOW: Nanos = Nanos::from_secs(1_000);

    fn ms(n: u64) -> Nanos {
        Nanos::from_millis(n)
    }

    #[test]
    fn a_grant_takes_tokens_and_a_hand_back_returns_them() {
        let mut k = Key::new();
        let r = k.sync(NOW, A, (0, 0, 3), 2);
        assert_eq!((r.granted, r.level), (3, 7));
        // A resend of the same sync moves nothing.
        let again = k.sync(NOW, A, (0, 0, 3), 2);
        assert_eq!(again, r);
        // Used 2, handed back the last 1: the bucket gets 1 back.
        let r = k.sync(NOW, A, (2, 1, 0), 2);
        assert_eq!((r.granted, r.level), (3, 8));
    }

    #[test]
    fn tokens_parked_at_an_edge_keep_the_bucket_from_refilling_in_their_place() {
        let mut k = Key::new();
        // θ·B / n = 8 / 1: the edge holds 8, the bucket keeps 2.
        let r = k.sync(NOW, A, (0, 0, 100), 1);
        assert_eq!((r.granted, r.level), (8, 2));
        // A minute later the bucket alone would be full; with 8 parked it holds 2, and the
        // exact path admits those 2 only: 10 at once, the bucket's capacity.
        let later = NOW + Nanos::from_secs(60);
        park(&k.g, &mut k.s, later, k.l.unused());
        assert_eq!(level(&k.g, &k.s, later), 2);
        let one = NonZeroU32::MIN;
        assert!(k.g.acquire(&mut k.s, later, one).is_allowed());
        assert!(k.g.acquire(&mut k.s, later, one).is_allowed());
        assert_eq!(k.g.acquire(&mut k.s, later, one).verdict, Verdict::Deny);
        // The edge spends its 8 and says so: nothing moves (they were taken at the grant).
        let r = k.sync(later, A, (8, 0, 0), 1);
        assert_eq!(r.level, 0);
        // Then the bucket refills at its rate: one token per 100 ms.
        assert_eq!(level(&k.g, &k.s, later + ms(300)), 3);
    }

    #[test]
    fn an_edge_admitting_beyond_its_grant_is_charged_for_it() {
        let mut k = Key::new();
        // A soft key's cold allowance: 4 admitted, nothing granted.
        let r = k.sync(NOW, A, (4, 0, 0), 2);
        assert_eq!((r.granted, r.level), (0, 6));
        // Past empty, the debt is owed: 6 + 4 more leaves the bucket at 0 until refilled.
        let r = k.sync(NOW, B, (10, 0, 0), 2);
        assert_eq!(r.level, 0);
        assert_eq!(level(&k.g, &k.s, NOW + ms(400)), 0);
        assert_eq!(level(&k.g, &k.s, NOW + ms(500)), 1);
    }

    #[test]
    fn grants_stop_above_the_reserve_and_holders_are_recalled() {
        let mut k = Key::new();
        // Two edges: each gets at most ⌊8/2⌋ = 4, and half of what stands above the reserve.
        let a = k.sync(NOW, A, (0, 0, 100), 2);
        assert_eq!((a.granted, a.level), (4, 6));
        let b = k.sync(NOW, B, (0, 0, 100), 2);
        assert_eq!((b.granted, b.level), (2, 4));
        // A's 4 are used; the bucket stands at 4 with 2 reserved: 2 above it, one per edge.
        let a = k.sync(NOW, A, (4, 0, 100), 2);
        assert_eq!((a.granted, a.level, a.recall), (5, 3, false));
        // 1 above the reserve, fewer than one per edge: B, holding 2 it does not want, is
        // recalled; nothing more is minted.
        let b = k.sync(NOW, B, (0, 0, 0), 2);
        assert_eq!((b.granted, b.level, b.recall), (2, 3, true));
    }

    #[test]
    fn parked_tokens_of_the_other_lease_window_count_too() {
        let mut k = Key::new();
        // 5 parked in the previous lease window, and a minute gone by: the bucket holds 5.
        let later = NOW + Nanos::from_secs(60);
        let r = lease(
            &k.g,
            &mut k.s,
            later,
            &mut k.l,
            5,
            A,
            (0, 0, 0),
            DEFAULT_THRESHOLD,
            1,
        );
        assert_eq!(r.level, 5);
    }
}

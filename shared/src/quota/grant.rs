//! Grants under `T + G ≤ θ·P`, the monotone per-edge counters, and the exact path.
//!
//! The invariant is kept by construction: [`Grant`] has no public constructor, and
//! [`KeyLedger::grant`] raises an edge's holding by at most `(θ·P − T − G) / n`, so the sum
//! over any interleaving of edges never passes `θ·P`. A grant is an absolute ceiling on what
//! the edge may have used, never a fresh allowance, so what an edge admits while its sync is in
//! flight is already inside what was reserved for it.

use serde::{Deserialize, Serialize};

use crate::{
    Nanos,
    rules::{FNV_OFFSET, fnv1a},
};

/// The near-limit threshold θ, in parts per million so that every tier computes the same
/// integers (no floats cross a tier boundary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Threshold(u32);

/// θ = 0.8: grants cover 80% of a partition; the last 20% goes through the exact path.
pub const DEFAULT_THRESHOLD: Threshold = Threshold(800_000);

const PPM: u64 = 1_000_000;

impl Threshold {
    /// θ in parts per million; `None` unless `0 < ppm ≤ 1_000_000`.
    pub const fn from_ppm(ppm: u32) -> Option<Threshold> {
        if ppm > 0 && ppm as u64 <= PPM {
            Some(Threshold(ppm))
        } else {
            None
        }
    }

    /// θ written as a fraction, as config files do (`0.8`); `None` unless `0 < θ ≤ 1` (to the
    /// nearest part per million).
    pub fn from_fraction(theta: f64) -> Option<Threshold> {
        let ppm = (theta * PPM as f64).round();
        // Finite and in range, so the cast is exact.
        (theta.is_finite() && (1.0..=PPM as f64).contains(&ppm))
            .then(|| Threshold::from_ppm(ppm as u32))
            .flatten()
    }

    /// θ in parts per million.
    pub const fn ppm(self) -> u32 {
        self.0
    }

    /// `⌊θ·x⌋`.
    pub const fn of(self, x: u64) -> u64 {
        (x as u128 * self.0 as u128 / PPM as u128) as u64
    }
}

impl Default for Threshold {
    fn default() -> Threshold {
        DEFAULT_THRESHOLD
    }
}

/// An edge's identity in the counters: one per (node name, incarnation), DESIGN §4.
///
/// Every regional replica must file an edge's counters under the same id without talking,
/// since an edge may fail over from one replica to another mid-window, so the id is a hash
/// of what the edge says in its `Hello`, not a number a replica hands out. 64 bits keep the
/// chance that two live edges share an id (their counts would then hide each other under the
/// `max` merge) below one in 10^10 for a hundred thousand edges.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct EdgeId(pub u64);

impl EdgeId {
    /// The id of `node`'s run `incarnation`: FNV-1a over the name, a separator and the
    /// incarnation's bytes, the same on every tier and every process.
    pub const fn of(node: &str, incarnation: u64) -> EdgeId {
        let hash = fnv1a(FNV_OFFSET, node.as_bytes());
        // A byte no UTF-8 name contains, so ("ab", x) and ("a", "b"‖x) cannot collide by layout.
        let hash = fnv1a(hash, &[0xff]);
        EdgeId(fnv1a(hash, &incarnation.to_le_bytes()))
    }
}

/// The three counters of one edge for one (rule, key, window). Each only grows, and each has
/// one writer: the regional raises `granted`, the edge raises `released` and `used`. Merging
/// by `max` is therefore idempotent, commutative and associative (a G-counter per field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeCounters {
    /// The ceiling the regional has granted this edge so far.
    pub granted: u64,
    /// Quota the edge has handed back unused.
    pub released: u64,
    /// What the edge has admitted.
    pub used: u64,
}

impl EdgeCounters {
    /// Merges another observation of the same edge's counters: the larger of each.
    pub fn merge(&mut self, other: EdgeCounters) {
        self.granted = self.granted.max(other.granted);
        self.released = self.released.max(other.released);
        self.used = self.used.max(other.used);
    }

    /// What this edge holds against the partition: what it used, or what it may still use
    /// under its grant, whichever is larger. `max(used, granted − released)` in DESIGN §4.
    /// An edge that admitted beyond its grant (cold allowance, or its failure mode while the
    /// regional was unreachable) is counted for what it admitted.
    pub fn holding(&self) -> u64 {
        self.used.max(self.granted.saturating_sub(self.released))
    }

    /// What the edge may still admit locally: `granted − released − used`, or zero.
    pub fn unused(&self) -> u64 {
        self.granted
            .saturating_sub(self.released)
            .saturating_sub(self.used)
    }
}

/// What a key may spend in one region for one window, as the regional sees it when it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// `P`: this region's partition of the limit.
    pub partition: u64,
    /// Usage that counts against this window from outside it: the sliding window counter's
    /// weighted previous window, rounded up. Zero for a fixed window.
    pub carried: u64,
    /// θ.
    pub threshold: Threshold,
    /// `n`: the edges active in the region; at least 1.
    pub edges: u32,
}

impl Budget {
    /// The grant pool's ceiling, `θ·P`.
    fn grant_ceiling(&self) -> u64 {
        self.threshold.of(self.partition)
    }

    /// `n`, never zero.
    fn edges(&self) -> u64 {
        u64::from(self.edges.max(1))
    }
}

/// A raised ceiling for one edge: the only value an edge may decide locally under.
///
/// It can be minted only by [`KeyLedger::grant`], which keeps `T + G ≤ θ·P`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    ceiling: u64,
    raised_by: u64,
}

impl Grant {
    /// The edge's new absolute `granted` counter.
    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// How much this grant added to the edge's holding (zero when nothing was minted).
    pub fn raised_by(&self) -> u64 {
        self.raised_by
    }
}

/// The answer of an exact check-and-consume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactOutcome {
    /// Whether `cost` was consumed.
    pub allowed: bool,
    /// `P − (T + G)` after the decision: exactly what is left for anyone.
    pub remaining: u64,
}

/// The regional's authoritative state for one (rule, key, window) in its region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLedger {
    /// What the regional admitted itself on the exact path.
    exact: u64,
    /// Per edge; a handful of entries per key, so a sorted `Vec` beats a map.
    edges: Vec<(EdgeId, EdgeCounters)>,
    /// Set once usage leaves less than a unit per edge under `θ·P`; sticky for the window, so
    /// the key does not flap between grants and the exact path. Edges told so hand back their
    /// unused grants and decide this key exactly for the rest of the window, which is what
    /// keeps stranded grants from turning into false denials at the limit.
    near_limit: bool,
}

impl KeyLedger {
    /// An empty ledger: nothing used, nothing granted.
    pub fn new() -> KeyLedger {
        KeyLedger::default()
    }

    /// `T`: everything admitted in this window (exact path plus every edge's `used`), without
    /// the carried usage.
    pub fn used(&self) -> u64 {
        self.edges
            .iter()
            .fold(self.exact, |t, (_, c)| t.saturating_add(c.used))
    }

    /// `T + G` for this window: exact, plus what each edge holds, plus what is carried.
    pub fn reserved(&self, budget: &Budget) -> u64 {
        self.edges
            .iter()
            .fold(self.exact.saturating_add(budget.carried), |r, (_, c)| {
                r.saturating_add(c.holding())
            })
    }

    /// What the regional admitted on the exact path.
    pub fn exact_used(&self) -> u64 {
        self.exact
    }

    /// One edge's counters, as merged so far.
    pub fn counters(&self, edge: EdgeId) -> EdgeCounters {
        match self.edges.binary_search_by_key(&edge, |(e, _)| *e) {
            Ok(i) => self.edges[i].1,
            Err(_) => EdgeCounters::default(),
        }
    }

    /// Whether the key has reached the point where grants stop for this window.
    pub fn is_near_limit(&self) -> bool {
        self.near_limit
    }

    /// Merges what an edge reported: its cumulative `used` and `released`, by `max`. A batch
    /// applied twice, late, out of order or by another replica changes nothing.
    pub fn merge(&mut self, edge: EdgeId, used: u64, released: u64) {
        self.merge_counters(
            edge,
            EdgeCounters {
                granted: 0,
                released,
                used,
            },
        );
    }

    /// Merges a full set of counters (another replica's view, or a store's).
    pub fn merge_counters(&mut self, edge: EdgeId, counters: EdgeCounters) {
        self.entry(edge).merge(counters);
    }

    /// Raises `edge`'s ceiling so it may decide locally, keeping `T + G ≤ θ·P`.
    ///
    /// `want` is what the edge asks to hold unused (its recent demand; zero for none). The
    /// edge's holding grows by `δ = min(min(want, θ·P/n) − unused, (θ·P − T − G) / n)`:
    /// demand-sized, never more than a fair share of the whole pool unused at one edge (so a
    /// busy edge cannot strand the key's quota), and never more than a fair share of what is
    /// left under the threshold (so no interleaving of edges passes `θ·P`). The new ceiling
    /// is `max(granted, released + used) + δ`, which raises `max(used, granted − released)`
    /// by exactly `δ`, even for an edge that admitted beyond its grant.
    ///
    /// Once actual usage leaves less than one unit per edge under `θ·P`, the key is near its
    /// limit for the rest of the window and no grant is minted (see [`is_near_limit`]).
    ///
    /// [`is_near_limit`]: KeyLedger::is_near_limit
    pub fn grant(&mut self, edge: EdgeId, budget: &Budget, want: u64) -> Grant {
        self.update_near_limit(budget);
        let current = self.counters(edge);
        let unchanged = Grant {
            ceiling: current.granted,
            raised_by: 0,
        };
        if self.near_limit {
            return unchanged;
        }
        let ceiling = budget.grant_ceiling();
        let share = ceiling.saturating_sub(self.reserved(budget)) / budget.edges();
        let target = want.min(ceiling / budget.edges());
        let delta = target.saturating_sub(current.unused()).min(share);
        if delta == 0 {
            return unchanged;
        }
        Grant {
            ceiling: self.raise(edge, delta),
            raised_by: delta,
        }
    }

    /// True when the grant pool is spent although usage is not near the limit: unused grants
    /// hold what is left under `θ·P`. The regional then asks holders to hand back what they
    /// hold unused (a recall), so quota moves to the edges that are using the key.
    pub fn pool_spent(&self, budget: &Budget) -> bool {
        !self.near_limit
            && budget.grant_ceiling().saturating_sub(self.reserved(budget)) < budget.edges()
    }

    /// Whether `cost` would pass the exact path now: `T + G + cost ≤ P`. Pure; lets a
    /// request that must pass several limits check all of them before consuming from any.
    pub fn fits(&self, cost: u64, budget: &Budget) -> bool {
        self.reserved(budget).saturating_add(cost) <= budget.partition
    }

    /// The exact path: consumes `cost` iff `T + G + cost ≤ P`, and says what is left.
    pub fn exact(&mut self, cost: u64, budget: &Budget) -> ExactOutcome {
        let allowed = self.fits(cost, budget);
        if allowed {
            self.exact = self.exact.saturating_add(cost);
        }
        self.update_near_limit(budget);
        ExactOutcome {
            allowed,
            remaining: budget.partition.saturating_sub(self.reserved(budget)),
        }
    }

    /// Gives back `cost` the exact path consumed for a request that another of its limits
    /// denied (all-or-nothing across limits). Never below zero. `near_limit` stays as it was:
    /// it is sticky for the window, and a refund only makes the key less full.
    pub fn refund(&mut self, cost: u64) {
        self.exact = self.exact.saturating_sub(cost);
    }

    /// Counts `n` admitted on the exact path elsewhere: by this region's regional while its
    /// store was away, written back on recovery. Unconditional: it was admitted already.
    pub fn absorb_exact(&mut self, n: u64) {
        self.exact = self.exact.saturating_add(n);
    }

    /// Stops grants for the rest of the window, as another view of the same ledger decided.
    pub fn mark_near_limit(&mut self) {
        self.near_limit = true;
    }

    /// `G`: what the edges hold unused, `Σ (granted − released − used)` (each at least 0).
    pub fn unused(&self) -> u64 {
        self.edges
            .iter()
            .fold(0, |g, (_, c)| g.saturating_add(c.unused()))
    }

    /// Raises `edge`'s holding by exactly `delta`, as [`grant`](KeyLedger::grant) does once it
    /// has sized the grant: the ceiling becomes `max(granted, released + used) + delta`.
    /// Returns the new ceiling. The caller keeps whatever bound the grant must respect.
    pub fn raise(&mut self, edge: EdgeId, delta: u64) -> u64 {
        let counters = self.entry(edge);
        let base = counters
            .granted
            .max(counters.released.saturating_add(counters.used));
        counters.granted = base.saturating_add(delta);
        counters.granted
    }

    /// Every edge's counters, in id order.
    pub fn edges(&self) -> impl ExactSizeIterator<Item = (EdgeId, EdgeCounters)> + '_ {
        self.edges.iter().copied()
    }

    /// Near the limit once actual usage (`T` plus what is carried) leaves less than one unit
    /// per edge under `θ·P`. Judged on usage, not on grants, so unused grants alone never
    /// push a key onto the exact path (they are recalled instead, see [`pool_spent`]).
    ///
    /// [`pool_spent`]: KeyLedger::pool_spent
    fn update_near_limit(&mut self, budget: &Budget) {
        let usage = self.used().saturating_add(budget.carried);
        if budget.grant_ceiling().saturating_sub(usage) < budget.edges() {
            self.near_limit = true;
        }
    }

    fn entry(&mut self, edge: EdgeId) -> &mut EdgeCounters {
        let i = match self.edges.binary_search_by_key(&edge, |(e, _)| *e) {
            Ok(i) => i,
            Err(i) => {
                self.edges.insert(i, (edge, EdgeCounters::default()));
                i
            }
        };
        &mut self.edges[i].1
    }
}

/// The cold allowance `c0 = ⌊(1 − θ)·P / (2n)⌋`: what an edge may admit for a soft key it has
/// not synced yet. With every edge spending it, admitted ≤ `P + n·c0 ≤ P·(1 + (1 − θ)/2)`, so
/// 1.1·P with the default θ.
pub fn cold_allowance(partition: u64, threshold: Threshold, edges: u32) -> u64 {
    // One floor over the exact product: `P − ⌊θ·P⌋` would round the spare up and let small
    // partitions pass the bound (P = 8, n = 1 would give c0 = 1 and admit 9).
    let spare_ppm = u128::from(PPM - u64::from(threshold.ppm()));
    let c0 = spare_ppm * u128::from(partition) / (u128::from(PPM) * 2 * u128::from(edges.max(1)));
    u64::try_from(c0).unwrap_or(u64::MAX)
}

/// The weight of the previous window in a sliding window counter at `elapsed` into the
/// current one, `(W − e) / W`, in parts per million, rounded up: the regional hands it to its
/// store with every operation on a sliding window's ledger. Rounding up over-counts what is
/// carried by at most one part per million, never under-counts it.
pub fn carry_weight_ppm(window: Nanos, elapsed: Nanos) -> u32 {
    let w = u128::from(window.as_u64().max(1));
    let left = w.saturating_sub(u128::from(elapsed.as_u64()));
    let ppm = (left * u128::from(PPM)).div_ceil(w);
    u32::try_from(ppm).unwrap_or(u32::MAX)
}

/// What a sliding window carries into the current window from the previous one's usage
/// `previous`: `⌈previous · weight_ppm / 10⁶⌉`. The stores compute exactly this (the Redis
/// script in two halves so that every intermediate stays below 2^53, Lua's exact integers).
pub fn carried(previous: u64, weight_ppm: u32) -> u64 {
    let c = (u128::from(previous) * u128::from(weight_ppm)).div_ceil(u128::from(PPM));
    u64::try_from(c).unwrap_or(u64::MAX)
}

/// How far into a window of length `window` the previous window's `previous` carries at
/// most `room`: the least `e` with `carried(previous, carry_weight_ppm(window, e)) ≤ room`.
/// A sliding window's denial reopens there, when the carry alone stood in the way: the
/// previous window's weight falls as the window goes on, and nothing else in the count does.
///
/// `carried ≤ room` ⟺ `weight ≤ ⌊room·10⁶ / previous⌋ =: w`, and `weight(e) ≤ w` ⟺
/// `e ≥ W − ⌊w·W / 10⁶⌋`: exact in integers, so the stores, which compute `carried` the same
/// way, admit at that instant and not a nanosecond before.
pub fn carry_fits_from(window: Nanos, previous: u64, room: u64) -> Nanos {
    if previous == 0 {
        return Nanos::ZERO;
    }
    let w = u128::from(window.as_u64().max(1));
    let weight = (u128::from(room) * u128::from(PPM) / u128::from(previous)).min(u128::from(PPM));
    // weight ≤ 10⁶, so weight·W / 10⁶ ≤ W, which fits a u64.
    Nanos(u64::try_from(w - weight * w / u128::from(PPM)).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_from_a_fraction_is_in_zero_to_one() {
        assert_eq!(Threshold::from_fraction(0.8), Some(DEFAULT_THRESHOLD));
        assert_eq!(
            Threshold::from_fraction(1.0).map(Threshold::ppm),
            Some(1_000_000)
        );
        for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY, 1e-7] {
            assert_eq!(Threshold::from_fraction(bad), None, "{bad}");
        }
    }

    fn budget(p: u64, n: u32) -> Budget {
        Budget {
            partition: p,
            carried: 0,
            threshold: DEFAULT_THRESHOLD,
            edges: n,
        }
    }

    #[test]
    fn grant_is_a_fair_share_of_the_pool() {
        let mut ledger = KeyLedger::new();
        let b = budget(1000, 4);
        // θ·P = 800; 800 / 4 = 200 each.
        assert_eq!(ledger.grant(EdgeId(1), &b, u64::MAX).ceiling(), 200);
        // Edge 1 already holds a full share unused: nothing more.
        assert_eq!(ledger.grant(EdgeId(1), &b, u64::MAX).raised_by(), 0);
        // Edge 2 gets (800 − 200) / 4 = 150.
        assert_eq!(ledger.grant(EdgeId(2), &b, u64::MAX).ceiling(), 150);
        assert_eq!(ledger.reserved(&b), 350);
    }

    #[test]
    fn grant_tops_up_what_was_used() {
        let mut ledger = KeyLedger::new();
        let b = budget(1000, 4);
        ledger.grant(EdgeId(1), &b, u64::MAX);
        ledger.merge(EdgeId(1), 200, 0);
        // Used all 200: T + G = 200; free 600, share 150, cap 200 − 0 unused.
        let g = ledger.grant(EdgeId(1), &b, u64::MAX);
        assert_eq!((g.ceiling(), g.raised_by()), (350, 150));
    }

    #[test]
    fn grant_to_an_overspent_edge_raises_holding_by_delta() {
        let mut ledger = KeyLedger::new();
        let b = budget(1000, 1);
        // The edge admitted 50 with no grant (cold allowance): holding 50.
        ledger.merge(EdgeId(7), 50, 0);
        let before = ledger.reserved(&b);
        let g = ledger.grant(EdgeId(7), &b, u64::MAX);
        assert_eq!(ledger.reserved(&b), before + g.raised_by());
        assert_eq!(ledger.counters(EdgeId(7)).unused(), g.raised_by());
    }

    #[test]
    fn exact_path_fills_to_p_and_no_further() {
        let mut ledger = KeyLedger::new();
        let b = budget(10, 2);
        for _ in 0..10 {
            assert!(ledger.exact(1, &b).allowed);
        }
        let out = ledger.exact(1, &b);
        assert_eq!(
            out,
            ExactOutcome {
                allowed: false,
                remaining: 0
            }
        );
        assert_eq!(ledger.used(), 10);
    }

    #[test]
    fn merge_is_idempotent_and_order_free() {
        let mut a = KeyLedger::new();
        a.merge(EdgeId(1), 5, 0);
        a.merge(EdgeId(1), 3, 2); // an older batch arriving late
        a.merge(EdgeId(1), 5, 0); // a duplicate
        assert_eq!(
            a.counters(EdgeId(1)),
            EdgeCounters {
                granted: 0,
                released: 2,
                used: 5
            }
        );
    }

    #[test]
    fn near_limit_follows_usage_and_stops_grants() {
        let mut ledger = KeyLedger::new();
        let b = budget(100, 4); // θ·P = 80
        ledger.merge(EdgeId(1), 76, 0); // 4 left under θ·P: one per edge
        assert_eq!(ledger.grant(EdgeId(2), &b, 10).raised_by(), 1);
        assert!(!ledger.is_near_limit());
        ledger.merge(EdgeId(1), 77, 0); // 3 left: less than one per edge
        assert_eq!(ledger.grant(EdgeId(3), &b, 10).raised_by(), 0);
        assert!(ledger.is_near_limit());
        assert!(
            ledger.exact(1, &b).allowed,
            "the exact path still serves up to P"
        );
    }

    #[test]
    fn unused_grants_spend_the_pool_without_nearing_the_limit() {
        let mut ledger = KeyLedger::new();
        let b = budget(100, 2); // θ·P = 80, at most 40 unused per edge
        assert_eq!(ledger.grant(EdgeId(1), &b, 1000).raised_by(), 40);
        assert_eq!(ledger.grant(EdgeId(2), &b, 1000).raised_by(), 20);
        assert_eq!(ledger.grant(EdgeId(3), &b, 1000).raised_by(), 10);
        while ledger.grant(EdgeId(3), &b, 1000).raised_by() > 0 {}
        assert!(ledger.pool_spent(&b));
        assert!(!ledger.is_near_limit(), "nothing was used");
        assert!(ledger.reserved(&b) <= 80);
    }

    #[test]
    fn grant_is_demand_sized() {
        let mut ledger = KeyLedger::new();
        let b = budget(1000, 4);
        assert_eq!(ledger.grant(EdgeId(1), &b, 3).ceiling(), 3);
        assert_eq!(
            ledger.grant(EdgeId(1), &b, 3).raised_by(),
            0,
            "already holds 3 unused"
        );
        assert_eq!(ledger.grant(EdgeId(1), &b, 0).raised_by(), 0);
    }

    #[test]
    fn cold_allowance_matches_design() {
        // (1 − 0.8)·1000 / (2·10) = 10.
        assert_eq!(cold_allowance(1000, DEFAULT_THRESHOLD, 10), 10);
        assert_eq!(cold_allowance(1000, DEFAULT_THRESHOLD, 0), 100);
        // ⌊0.2·8 / 2⌋ = 0, not (8 − ⌊6.4⌋) / 2 = 1.
        assert_eq!(cold_allowance(8, DEFAULT_THRESHOLD, 1), 0);
        // The bound P + n·c0 ≤ 1.1·P for every small partition and edge count.
        for p in 0..500u64 {
            for n in 1..8u32 {
                let c0 = cold_allowance(p, DEFAULT_THRESHOLD, n);
                assert!(10 * (p + u64::from(n) * c0) <= 11 * p, "P = {p}, n = {n}");
            }
        }
    }

    #[test]
    fn carried_is_the_weighted_previous_window_rounded_up() {
        let w = Nanos::from_secs(60);
        assert_eq!(carry_weight_ppm(w, Nanos::ZERO), 1_000_000);
        assert_eq!(carry_weight_ppm(w, Nanos::from_secs(15)), 750_000);
        assert_eq!(carry_weight_ppm(w, w), 0);
        // One nanosecond in: rounds up to the whole previous window.
        assert_eq!(carry_weight_ppm(w, Nanos(1)), 1_000_000);
        assert_eq!(carried(100, 750_000), 75);
        assert_eq!(carried(3, 500_000), 2, "1.5 rounds up");
        assert_eq!(carried(0, 1_000_000), 0);
    }

    #[test]
    fn a_carry_fits_its_room_from_the_first_instant_it_does() {
        let w = Nanos::from_secs(60);
        // 59/60 of 60 is 59, but the stores round the weight up (983,334 ppm at 1 s, which
        // carries 60): 20 µs later it is 983,333 and carries 59.
        assert_eq!(carry_fits_from(w, 60, 59), Nanos(1_000_020_000));
        assert_eq!(carry_fits_from(w, 60, 30), Nanos::from_secs(30));
        assert_eq!(carry_fits_from(w, 60, 60), Nanos::ZERO);
        assert_eq!(
            carry_fits_from(w, 60, 0),
            w,
            "all of it carries until the end"
        );
        assert_eq!(carry_fits_from(w, 0, 0), Nanos::ZERO);
        // Against the stores' arithmetic, at odd lengths, counts and rooms: fits from `e`,
        // not at `e − 1`.
        let mut rng = crate::sim::Rng::new(7);
        for _ in 0..20_000 {
            let w = Nanos(1 + rng.below(1 << 40));
            let previous = 1 + rng.below(1 << 20);
            let room = rng.below(previous + 2);
            let e = carry_fits_from(w, previous, room);
            assert!(e <= w);
            let at = |e: Nanos| carried(previous, carry_weight_ppm(w, e));
            assert!(at(e) <= room, "{w:?} {previous} {room}: {e:?}");
            if e > Nanos::ZERO {
                assert!(
                    at(Nanos(e.as_u64() - 1)) > room,
                    "{w:?} {previous} {room}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn edge_ids_differ_by_name_and_incarnation() {
        assert_eq!(EdgeId::of("edge-1", 7), EdgeId::of("edge-1", 7));
        assert_ne!(EdgeId::of("edge-1", 7), EdgeId::of("edge-1", 8));
        assert_ne!(EdgeId::of("edge-1", 7), EdgeId::of("edge-2", 7));
    }

    #[test]
    fn threshold_bounds() {
        assert!(Threshold::from_ppm(0).is_none());
        assert!(Threshold::from_ppm(1_000_001).is_none());
        assert_eq!(Threshold::from_ppm(500_000).unwrap().of(9), 4);
    }
}

//! Partitions across regions (`Σ P_r ≤ L`), demand smoothing, and the two-phase transfer.
//!
//! The coordinator owns these. [`split`] turns per-region smoothed demand, floors and pins into
//! partitions that never sum past the limit. Quota moves mid-window only through a
//! [`Transfer`]: the giving regions release (each at most its unused partition, see
//! [`release_amount`]) and confirm; the receiving region is granted exactly what was
//! confirmed, never before. While a transfer is open, the released quota belongs to no region,
//! so `Σ P_r + in flight ≤ L` holds at every step.

use thiserror::Error;

use super::grant::{Budget, KeyLedger};

const PPM: u64 = 1_000_000;

/// One region's input to [`split`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionShare {
    /// Smoothed demand (any unit, the same for every region), from [`DemandSmoother`].
    pub demand: u64,
    /// The least this region gets, as parts per million of the limit, so a region that was
    /// quiet can still admit its first requests before demand moves quota to it.
    pub floor_ppm: u32,
    /// An operator's pin: this fraction, in ppm, regardless of demand.
    pub pinned_ppm: Option<u32>,
}

/// Splits `limit` across regions: a pinned region gets its fraction of the limit (pins are
/// scaled down together if they sum past one), every other region its floor, and the rest
/// follows demand (equally when nobody has any). Rounding is by largest remainder, so the
/// result sums to exactly `limit` unless only pins that sum below one are given.
/// `Σ P_r ≤ L` always.
pub fn split(limit: u64, regions: &[RegionShare]) -> Vec<u64> {
    let mut out = vec![0u64; regions.len()];
    let pins: Vec<(usize, u128)> = regions
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.pinned_ppm.map(|p| (i, u128::from(p))))
        .collect();
    let pin_ppm: u64 = regions
        .iter()
        .filter_map(|r| r.pinned_ppm)
        .map(u64::from)
        .sum();
    let pin_total = mul_div(limit, pin_ppm.min(PPM), PPM);
    apportion(pin_total, &pins, &mut out);

    let free: Vec<usize> = (0..regions.len())
        .filter(|&i| regions[i].pinned_ppm.is_none())
        .collect();
    let rest = limit - pin_total;
    let floors: Vec<(usize, u128)> = free
        .iter()
        .map(|&i| {
            (
                i,
                u128::from(mul_div(limit, u64::from(regions[i].floor_ppm), PPM)),
            )
        })
        .collect();
    let floor_total =
        u64::try_from(floors.iter().map(|(_, f)| f).sum::<u128>()).unwrap_or(u64::MAX);
    if floor_total >= rest {
        // Floors do not fit beside the pins: they share what is left in their proportions.
        apportion(rest, &floors, &mut out);
        return out;
    }
    apportion(floor_total, &floors, &mut out);
    let any_demand = free.iter().any(|&i| regions[i].demand > 0);
    let demand: Vec<(usize, u128)> = free
        .iter()
        .map(|&i| {
            let weight = if any_demand { regions[i].demand } else { 1 };
            (i, u128::from(weight))
        })
        .collect();
    apportion(rest - floor_total, &demand, &mut out);
    out
}

/// A region's partition of a limit of `limit` units when its share is `ppm` millionths:
/// `⌊L · ppm / 10⁶⌋` (a share past the whole counts as the whole). Rounding down is what keeps
/// `Σ_r P_r ≤ L` whatever shares the regions hold.
pub fn share_of(limit: u64, ppm: u32) -> u64 {
    mul_div(limit, u64::from(ppm).min(PPM), PPM)
}

/// The share, in millionths, that gives a region exactly `units` of a limit of `limit` under
/// [`share_of`]: the largest such share, so no unit is lost to rounding. A limit of 7 split
/// 3 + 4 is sent as 571,428 + 714,285 ppm; the shares 3/7 and 4/7 rounded down (428,571 +
/// 571,428) would give 2 + 3 and strand two units that no region could admit. The shares
/// may sum past 10⁶; the partitions never sum past the limit. Past 10⁶ units the ppm grid is
/// coarser than a unit, and the largest share not giving more than `units` is sent.
pub fn ppm_for(units: u64, limit: u64) -> u32 {
    if units >= limit {
        return 1_000_000;
    }
    let ppm = ((u128::from(units) + 1) * u128::from(PPM) - 1) / u128::from(limit.max(1));
    u32::try_from(ppm.min(u128::from(PPM))).unwrap_or(1_000_000)
}

/// Adds `total` to `out` in proportion to `weights`, by largest remainder (ties to the lower
/// index), so exactly `total` is handed out. Nothing is handed out when every weight is zero.
fn apportion(total: u64, weights: &[(usize, u128)], out: &mut [u64]) {
    let weight_total: u128 = weights.iter().map(|(_, w)| *w).sum();
    if weight_total == 0 {
        return;
    }
    let mut given = 0u64;
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for &(i, w) in weights {
        let exact = u128::from(total) * w;
        // A share of `total` is at most `total`, so it fits in a u64.
        let share = u64::try_from(exact / weight_total).unwrap_or(total);
        out[i] += share;
        given += share;
        remainders.push((exact % weight_total, i));
    }
    // Shares were rounded down, so fewer than `weights.len()` units are left.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = usize::try_from(total - given).unwrap_or(usize::MAX);
    for &(_, i) in remainders.iter().take(left) {
        out[i] += 1;
    }
}

fn mul_div(a: u64, b: u64, c: u64) -> u64 {
    u64::try_from(u128::from(a) * u128::from(b) / u128::from(c.max(1))).unwrap_or(u64::MAX)
}

/// An exponentially weighted moving average of one region's demand, in integers.
///
/// `s ← α·d + (1 − α)·s`, with α in ppm. The first observation seeds the average, so a new
/// region is not treated as idle for several intervals. The average is kept in millionths
/// and rounded only when read: rounding each step down would leave it stuck below a small
/// steady demand (α = 0.1 from 0 towards 5 would never move).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemandSmoother {
    alpha_ppm: u32,
    /// The average, times one million.
    smoothed_micros: Option<u128>,
}

impl DemandSmoother {
    /// A smoother with weight `alpha_ppm` on each new observation (clamped to 1..=1_000_000).
    pub fn new(alpha_ppm: u32) -> DemandSmoother {
        DemandSmoother {
            alpha_ppm: alpha_ppm.clamp(1, PPM as u32),
            smoothed_micros: None,
        }
    }

    /// Folds in one interval's demand and returns the new average.
    pub fn observe(&mut self, demand: u64) -> u64 {
        let d = u128::from(demand) * u128::from(PPM);
        let next = match self.smoothed_micros {
            None => d,
            Some(s) => {
                let a = u128::from(self.alpha_ppm);
                (a * d + (u128::from(PPM) - a) * s) / u128::from(PPM)
            }
        };
        self.smoothed_micros = Some(next);
        self.value()
    }

    /// The current average, rounded to the nearest unit (zero before any observation).
    pub fn value(&self) -> u64 {
        let micros = self.smoothed_micros.unwrap_or(0);
        u64::try_from((micros + u128::from(PPM) / 2) / u128::from(PPM)).unwrap_or(u64::MAX)
    }
}

/// What a giving region releases when asked for `amount`: at most its unused partition
/// `P − (T + G)`, so it never gives away quota its edges hold or used. The caller lowers its
/// partition by the returned amount before confirming it.
pub fn release_amount(ledger: &KeyLedger, budget: &Budget, amount: u64) -> u64 {
    amount.min(budget.partition.saturating_sub(ledger.reserved(budget)))
}

/// Where a [`Transfer`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferState {
    /// Waiting for the asked regions to confirm their releases.
    Releasing,
    /// Every asked region confirmed (or the deadline passed); what was confirmed is granted.
    Done,
}

/// A confirmation that does not fit the transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The region was not asked to release for this transfer.
    #[error("region {0} was not asked to release for this transfer")]
    NotAsked(u32),
    /// The region confirmed more than it was asked for.
    #[error("region {region} confirmed {released}, more than the {asked} asked")]
    OverRelease {
        /// The confirming region.
        region: u32,
        /// What it was asked for.
        asked: u64,
        /// What it claims to have released.
        released: u64,
    },
}

/// A two-phase move of quota to one region: release, confirm, grant exactly the confirmed.
///
/// Regions are numbered by the coordinator. Confirmations are idempotent (a duplicate counts
/// once); a confirmation arriving after [`expire`](Transfer::expire) is still granted, because
/// the giver already lowered its partition and that quota must land somewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    id: u64,
    to: u32,
    asks: Vec<Ask>,
    granted: u64,
    expired: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ask {
    region: u32,
    amount: u64,
    confirmed: Option<u64>,
}

impl Transfer {
    /// Plans a transfer of up to `wanted` to region `to`, asking `givers` (region, its unused
    /// quota as last reported) in order, each for at most its unused quota, until `wanted` is
    /// covered. The receiver is never asked to give.
    pub fn new(id: u64, to: u32, wanted: u64, givers: &[(u32, u64)]) -> Transfer {
        let mut left = wanted;
        let mut asks: Vec<Ask> = Vec::new();
        for &(region, unused) in givers {
            if left == 0 {
                break;
            }
            // The receiver never gives, and a region listed twice is asked once: a second ask
            // could never be confirmed, and together they could exceed its unused quota.
            if region == to || unused == 0 || asks.iter().any(|a| a.region == region) {
                continue;
            }
            let amount = unused.min(left);
            left -= amount;
            asks.push(Ask {
                region,
                amount,
                confirmed: None,
            });
        }
        Transfer {
            id,
            to,
            asks,
            granted: 0,
            expired: false,
        }
    }

    /// The transfer's id, carried by `Release`, `Confirm` and `TransferGrant`.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The receiving region.
    pub fn receiver(&self) -> u32 {
        self.to
    }

    /// The releases to send: (region, amount).
    pub fn asks(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.asks.iter().map(|a| (a.region, a.amount))
    }

    /// Records that `region` released `released`. A repeated confirmation is ignored.
    ///
    /// # Errors
    ///
    /// When the region was not asked, or claims more than it was asked for; the transfer is
    /// unchanged.
    pub fn confirm(&mut self, region: u32, released: u64) -> Result<(), TransferError> {
        let ask = self
            .asks
            .iter_mut()
            .find(|a| a.region == region)
            .ok_or(TransferError::NotAsked(region))?;
        if released > ask.amount {
            return Err(TransferError::OverRelease {
                region,
                asked: ask.amount,
                released,
            });
        }
        if ask.confirmed.is_none() {
            ask.confirmed = Some(released);
        }
        Ok(())
    }

    /// Stops waiting for the confirmations still out (the deadline passed).
    pub fn expire(&mut self) {
        self.expired = true;
    }

    /// The total confirmed so far.
    pub fn confirmed(&self) -> u64 {
        self.asks.iter().filter_map(|a| a.confirmed).sum()
    }

    /// What may be granted to the receiver now: confirmed and not yet granted. Returns each
    /// unit once, so the caller sends exactly the confirmed total over the transfer's life.
    pub fn take_grant(&mut self) -> u64 {
        let due = self.confirmed() - self.granted;
        self.granted += due;
        due
    }

    /// Releasing until every ask is confirmed or the deadline passed, then done.
    pub fn state(&self) -> TransferState {
        if self.expired || self.asks.iter().all(|a| a.confirmed.is_some()) {
            TransferState::Done
        } else {
            TransferState::Releasing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_sent_for_whole_units_gives_exactly_those_units() {
        assert_eq!((ppm_for(3, 7), ppm_for(4, 7)), (571_428, 714_285));
        for limit in [
            1u64,
            2,
            5,
            7,
            60,
            999,
            1000,
            1_000_000,
            1_000_003,
            10_000_000_019,
        ] {
            for units in [0, 1, limit / 3, limit / 2, limit - 1, limit] {
                let got = share_of(limit, ppm_for(units, limit));
                if limit <= 1_000_000 {
                    assert_eq!(got, units, "{units} of {limit}");
                } else {
                    // Coarser than a unit: never more, and short by less than one ppm's worth.
                    assert!(
                        got <= units && units - got <= limit / 1_000_000 + 1,
                        "{units} of {limit}"
                    );
                }
            }
        }
        assert_eq!(
            share_of(10, 2_000_000),
            10,
            "past the whole counts as the whole"
        );
    }

    #[test]
    fn split_follows_demand_above_floors() {
        let r = |demand| RegionShare {
            demand,
            floor_ppm: 100_000,
            pinned_ppm: None,
        };
        // Floors 100 each; the other 800 goes 3:1.
        assert_eq!(split(1000, &[r(300), r(100)]), vec![700, 300]);
        // No demand at all: equal.
        assert_eq!(split(1000, &[r(0), r(0)]), vec![500, 500]);
    }

    #[test]
    fn split_honours_pins_and_rounds_to_the_limit() {
        let pinned = RegionShare {
            demand: 0,
            floor_ppm: 0,
            pinned_ppm: Some(250_000),
        };
        let free = RegionShare {
            demand: 1,
            floor_ppm: 0,
            pinned_ppm: None,
        };
        assert_eq!(split(1000, &[pinned, free, free]), vec![250, 375, 375]);
        assert_eq!(split(7, &[free, free, free]).iter().sum::<u64>(), 7);
    }

    #[test]
    fn smoother_seeds_then_averages() {
        let mut s = DemandSmoother::new(500_000);
        assert_eq!(s.observe(100), 100);
        assert_eq!(s.observe(0), 50);
        assert_eq!(s.observe(0), 25);
    }

    #[test]
    fn smoother_reaches_a_small_steady_demand() {
        let mut s = DemandSmoother::new(100_000);
        s.observe(0);
        for _ in 0..100 {
            s.observe(5);
        }
        assert_eq!(s.value(), 5);
    }

    #[test]
    fn split_survives_huge_demands() {
        let r = |demand| RegionShare {
            demand,
            floor_ppm: 0,
            pinned_ppm: None,
        };
        let parts = split(1000, &[r(u64::MAX), r(u64::MAX)]);
        assert_eq!(parts, vec![500, 500]);
    }

    #[test]
    fn transfer_asks_a_region_listed_twice_once() {
        let t = Transfer::new(1, 0, 100, &[(1, 30), (1, 30), (2, 100)]);
        assert_eq!(t.asks().collect::<Vec<_>>(), vec![(1, 30), (2, 70)]);
    }

    #[test]
    fn transfer_grants_exactly_what_was_confirmed() {
        let mut t = Transfer::new(1, 0, 100, &[(0, 500), (1, 60), (2, 60)]);
        assert_eq!(t.asks().collect::<Vec<_>>(), vec![(1, 60), (2, 40)]);
        assert_eq!(
            t.take_grant(),
            0,
            "nothing is granted before it is released"
        );
        t.confirm(1, 30).unwrap();
        t.confirm(1, 30).unwrap(); // duplicate: ignored
        assert_eq!(t.state(), TransferState::Releasing);
        assert_eq!(t.take_grant(), 30);
        assert_eq!(
            t.confirm(2, 41),
            Err(TransferError::OverRelease {
                region: 2,
                asked: 40,
                released: 41
            })
        );
        assert_eq!(t.confirm(3, 1), Err(TransferError::NotAsked(3)));
        t.expire();
        assert_eq!(t.state(), TransferState::Done);
        t.confirm(2, 40).unwrap(); // late, still granted
        assert_eq!(t.take_grant(), 40);
        assert_eq!(t.take_grant(), 0);
    }
}

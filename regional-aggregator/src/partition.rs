//! This region's partition `P_r` of every limit (DESIGN §4, across regions): the shares the
//! coordinator pushed, and what transfers moved for single keys.
//!
//! Without a coordinator a region owns every limit whole (`P = L`). With one, `P_r` of a key in
//! a window is `⌊L · share / 10⁶⌋` for the share in force in that window, plus what
//! escalations and transfers granted this region for that key and window. Quota a region gives
//! away is not subtracted here: it is consumed in the store, on the exact path, so giving it
//! and admitting with it are one atomic check against the same `T + G` (see
//! [`Regional::release`](crate::Regional::release)).
//!
//! Shares change by window, so that `Σ_r P_r ≤ L` holds in every window although regions apply
//! a push at slightly different moments: a lower share never applies to a window that has
//! already begun here (what it admitted under the higher one stays admitted), while a higher
//! one may apply at once, because the coordinator sends it only from the window every lowering
//! region confirmed. [`PartitionTable::apply`] answers with what the region committed to.

use std::{
    collections::HashMap,
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use shared::{
    LimitId, RuleSet,
    wire::{Partitions, RuleShare},
};

use crate::store::HeldShares;

/// Parts per million: a whole limit.
pub const WHOLE: u32 = 1_000_000;

/// The partitions this region holds. Every method takes `&self`; deciding reads it once per
/// ledger op, so a region without a coordinator takes no lock at all and one with a coordinator
/// a shared read lock, allocation-free.
pub struct PartitionTable {
    /// Whether a coordinator hands out the partitions; fixed at start.
    coordinated: bool,
    inner: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    /// The version of the last `Partitions` applied.
    version: u64,
    /// Per limit, `(from_window, ppm)` ascending by window: the share from that window on.
    shares: HashMap<LimitId, Vec<(u64, u32)>>,
    /// What transfers added, per (limit, window), then per key: looked up by `&str`.
    extra: HashMap<(LimitId, u64), HashMap<String, u64>>,
    /// Per limit, the first window from which every cut scheduled here has cleared (see
    /// [`PartitionTable::apply`]): another region's raise may start then, not before.
    cleared: HashMap<LimitId, u64>,
}

impl PartitionTable {
    /// A region that owns every limit whole: no coordinator.
    pub fn whole() -> PartitionTable {
        PartitionTable {
            coordinated: false,
            inner: RwLock::default(),
        }
    }

    /// A region under a coordinator, holding nothing until its first `Partitions`: a false
    /// reject before the coordinator answers, never an overshoot.
    pub fn coordinated() -> PartitionTable {
        PartitionTable {
            coordinated: true,
            inner: RwLock::default(),
        }
    }

    // Every change below is complete before its guard drops, so a poisoned lock still holds a
    // consistent table.
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a coordinator hands out the partitions.
    pub fn is_coordinated(&self) -> bool {
        self.coordinated
    }

    /// The version of the last `Partitions` applied (0: none yet, or no coordinator).
    pub fn version(&self) -> u64 {
        self.read().version
    }

    /// `P_r` of `key` under limit `limit` (whose whole is `whole`) in window `window`.
    pub fn partition(&self, limit: LimitId, key: &str, window: u64, whole: u64) -> u64 {
        if !self.coordinated {
            return whole;
        }
        let table = self.read();
        let ppm = share_at(table.shares.get(&limit).map(Vec::as_slice), window);
        let base = shared::quota::share_of(whole, ppm);
        let extra = table
            .extra
            .get(&(limit, window))
            .and_then(|keys| keys.get(key))
            .copied()
            .unwrap_or(0);
        base.saturating_add(extra)
    }

    /// This region's share, in millionths, of `limit` at `index` on its schedule clock
    /// (the whole when no coordinator hands out partitions): how a limiter whose state the
    /// store keeps (buckets, logs) is cut to the region's part.
    pub fn share(&self, limit: LimitId, index: u64) -> u32 {
        if !self.coordinated {
            return WHOLE;
        }
        share_at(self.read().shares.get(&limit).map(Vec::as_slice), index).min(WHOLE)
    }

    /// Adds `amount` to this region's partition of `key` in `window` (a transfer's second
    /// phase, or an escalation's answer). Only windows at or after `oldest` are kept.
    pub fn add(&self, limit: LimitId, key: &str, window: u64, amount: u64, oldest: u64) {
        if !self.coordinated {
            return;
        }
        let mut table = self.write();
        table.extra.retain(|(_, w), _| *w >= oldest);
        let slot = table
            .extra
            .entry((limit, window))
            .or_default()
            .entry(key.to_owned())
            .or_insert(0);
        *slot = slot.saturating_add(amount);
    }

    /// Applies a pushed `Partitions` at the current windows (`current(limit)`: the index of
    /// now on the limit's schedule clock and how many windows a cut takes to clear; `None`
    /// for a limit the rules do not have) and answers with the shares held now, each with
    /// the window it applies from, later by the clearing windows: a sliding log still counts
    /// what it admitted under its old share for one window after a cut, and a bucket what it
    /// spent for one refill time, so another region's raise must wait that long. A push not
    /// newer than the one held changes nothing.
    pub fn apply(
        &self,
        push: &Partitions,
        current: impl Fn(LimitId) -> Option<(u64, u64)>,
    ) -> Partitions {
        if !self.coordinated {
            return Partitions {
                version: 0,
                rules: Vec::new(),
                keys: Vec::new(),
            };
        }
        let mut table = self.write();
        if push.version > table.version {
            table.version = push.version;
            let pushed: HashMap<LimitId, &RuleShare> =
                push.rules.iter().map(|r| (r.limit, r)).collect();
            // A limit left out of the push has no share any more: a lowering to 0.
            let mut limits: Vec<LimitId> = table.shares.keys().copied().collect();
            limits.extend(pushed.keys().copied());
            limits.sort_unstable();
            limits.dedup();
            for limit in limits {
                let Some((now, clear)) = current(limit) else {
                    table.shares.remove(&limit);
                    table.cleared.remove(&limit);
                    continue;
                };
                let (ppm, from) = pushed
                    .get(&limit)
                    .map_or((0, now), |r| (r.share_ppm.min(WHOLE), r.from_window));
                let schedule = table.shares.entry(limit).or_default();
                if let Some(cut) = schedule_change(schedule, now, ppm, from) {
                    let cleared = table.cleared.entry(limit).or_default();
                    *cleared = (*cleared).max(cut.saturating_add(clear));
                }
            }
        }
        let rules = table
            .shares
            .iter()
            .filter_map(|(&limit, s)| {
                let cleared = table.cleared.get(&limit).copied().unwrap_or(0);
                s.last().map(|&(from_window, share_ppm)| RuleShare {
                    limit,
                    share_ppm,
                    from_window: from_window.max(cleared),
                })
            })
            .collect();
        Partitions {
            version: table.version,
            rules,
            keys: Vec::new(),
        }
    }

    /// What this region holds of every limit, for the store
    /// ([`Store::save_partitions`](crate::store::Store::save_partitions)).
    pub fn held(&self) -> Vec<HeldShares> {
        let table = self.read();
        table
            .shares
            .iter()
            .map(|(&limit, schedule)| HeldShares {
                limit,
                schedule: schedule.clone(),
                cleared: table.cleared.get(&limit).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Takes back what a previous run of this region held (`held`, from the store), for the
    /// limits this run has not heard of yet: a restart changes nothing the coordinator or
    /// the other regions rely on. Without it a restarted regional would answer that it holds
    /// nothing, and another region's raise could begin while what this one admitted under
    /// its old shares still counts.
    pub fn restore(&self, held: &[HeldShares]) {
        if !self.coordinated {
            return;
        }
        let mut table = self.write();
        for h in held {
            if table.shares.contains_key(&h.limit) {
                continue;
            }
            table.shares.insert(h.limit, h.schedule.clone());
            table.cleared.insert(h.limit, h.cleared);
        }
    }

    /// Forgets shares of limits `rules` no longer has.
    pub fn retain_rules(&self, rules: &RuleSet) {
        if !self.coordinated {
            return;
        }
        let mut table = self.write();
        table
            .shares
            .retain(|limit, _| rules.limit(*limit).is_some());
        table
            .extra
            .retain(|(limit, _), _| rules.limit(*limit).is_some());
        table
            .cleared
            .retain(|limit, _| rules.limit(*limit).is_some());
    }
}

/// The share in force in `window` under `schedule` (0 before its first entry).
fn share_at(schedule: Option<&[(u64, u32)]>, window: u64) -> u32 {
    schedule
        .and_then(|s| s.iter().rev().find(|(from, _)| *from <= window))
        .map_or(0, |&(_, ppm)| ppm)
}

/// Schedules `ppm` from window `from` in a schedule whose current window is `now`: a lower
/// share than the one in force now moves to the next window at the earliest; a higher one may
/// start now. Entries no window at or after `now` reads are dropped. Returns the window the
/// change starts in when it is a cut: lower than the share it follows (a share scheduled but
/// replaced before it began was never held, and cutting it is no cut).
fn schedule_change(schedule: &mut Vec<(u64, u32)>, now: u64, ppm: u32, from: u64) -> Option<u64> {
    let in_force = share_at(Some(schedule), now);
    let from = if ppm < in_force {
        from.max(now + 1)
    } else {
        from.max(now)
    };
    schedule.retain(|(f, _)| *f < from);
    let before = share_at(Some(schedule), from.saturating_sub(1));
    schedule.push((from, ppm));
    // Keep the entry in force now and every later one.
    if let Some(first) = schedule.iter().rposition(|(f, _)| *f <= now) {
        schedule.drain(..first);
    }
    (ppm < before).then_some(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(version: u64, shares: &[(u64, u32, u64)]) -> Partitions {
        Partitions {
            version,
            rules: shares
                .iter()
                .map(|&(limit, share_ppm, from_window)| RuleShare {
                    limit: LimitId(limit),
                    share_ppm,
                    from_window,
                })
                .collect(),
            keys: Vec::new(),
        }
    }

    #[test]
    fn without_a_coordinator_a_region_owns_every_limit() {
        let t = PartitionTable::whole();
        assert_eq!(t.partition(LimitId(1), "k", 5, 1000), 1000);
    }

    #[test]
    fn a_coordinated_region_holds_nothing_before_its_first_partitions() {
        let t = PartitionTable::coordinated();
        assert_eq!(t.partition(LimitId(1), "k", 5, 1000), 0);
    }

    #[test]
    fn a_raise_applies_at_once_and_a_cut_from_the_next_window() {
        let t = PartitionTable::coordinated();
        let at = |_| Some((10, 0));
        let held = t.apply(&push(1, &[(1, 500_000, 0)]), at);
        assert_eq!(held.rules[0].from_window, 10, "a first share starts now");
        assert_eq!(t.partition(LimitId(1), "k", 10, 1000), 500);
        // A cut asked for this window is moved to the next one.
        let held = t.apply(&push(2, &[(1, 300_000, 10)]), at);
        assert_eq!(held.rules[0].from_window, 11);
        assert_eq!(t.partition(LimitId(1), "k", 10, 1000), 500);
        assert_eq!(t.partition(LimitId(1), "k", 11, 1000), 300);
        // A raise from a named window starts there, not before.
        t.apply(&push(3, &[(1, 700_000, 12)]), at);
        assert_eq!(t.partition(LimitId(1), "k", 11, 1000), 300);
        assert_eq!(t.partition(LimitId(1), "k", 12, 1000), 700);
        // A stale push changes nothing.
        let held = t.apply(&push(2, &[(1, 0, 0)]), at);
        assert_eq!(held.version, 3);
        assert_eq!(t.partition(LimitId(1), "k", 12, 1000), 700);
    }

    #[test]
    fn a_limit_left_out_of_a_push_is_cut_to_nothing_from_the_next_window() {
        let t = PartitionTable::coordinated();
        let at = |_| Some((4, 0));
        t.apply(&push(1, &[(1, 400_000, 0), (2, 600_000, 0)]), at);
        t.apply(&push(2, &[(2, 600_000, 0)]), at);
        assert_eq!(t.partition(LimitId(1), "k", 4, 100), 40);
        assert_eq!(t.partition(LimitId(1), "k", 5, 100), 0);
    }

    #[test]
    fn a_logs_cut_is_confirmed_one_window_late_and_shares_read_by_index() {
        let t = PartitionTable::coordinated();
        t.apply(&push(1, &[(1, 600_000, 0)]), |_| Some((7, 1)));
        assert_eq!(t.share(LimitId(1), 7), 600_000);
        let held = t.apply(&push(2, &[(1, 200_000, 7)]), |_| Some((7, 1)));
        // Cut from window 8 here, but another region may raise only from window 9, when
        // what this log admitted under 60 % has left it.
        assert_eq!(held.rules[0].from_window, 9);
        assert_eq!(t.share(LimitId(1), 7), 600_000);
        assert_eq!(t.share(LimitId(1), 8), 200_000);
        assert_eq!(PartitionTable::whole().share(LimitId(1), 8), WHOLE);
    }

    #[test]
    fn only_a_cut_holds_back_other_regions_raises() {
        // A bucket's schedule: millisecond ticks, a cut clears after 2,000 of them.
        let t = PartitionTable::coordinated();
        let at = |now| move |_| Some((now, 2_000));
        // A raise (from nothing) is confirmed from when it applies: nothing to wait for.
        let held = t.apply(&push(1, &[(1, 500_000, 0)]), at(100));
        assert_eq!(
            (held.rules[0].share_ppm, held.rules[0].from_window),
            (500_000, 100)
        );
        let held = t.apply(&push(2, &[(1, 900_000, 300)]), at(150));
        assert_eq!(held.rules[0].from_window, 300);
        // Replacing that raise before it begins cuts nothing this region ever held.
        let held = t.apply(&push(3, &[(1, 500_000, 300)]), at(200));
        assert_eq!(
            (held.rules[0].share_ppm, held.rules[0].from_window),
            (500_000, 300)
        );
        assert_eq!(t.share(LimitId(1), 400), 500_000);
        // A cut of what is held: other regions wait until it has cleared.
        let held = t.apply(&push(4, &[(1, 200_000, 0)]), at(500));
        assert_eq!(
            (held.rules[0].share_ppm, held.rules[0].from_window),
            (200_000, 2_501)
        );
        assert_eq!(t.share(LimitId(1), 500), 500_000);
        assert_eq!(t.share(LimitId(1), 501), 200_000);
        // And still do after a later raise here: the cut's clearing is remembered.
        let held = t.apply(&push(5, &[(1, 300_000, 600)]), at(600));
        assert_eq!(
            (held.rules[0].share_ppm, held.rules[0].from_window),
            (300_000, 2_501)
        );
    }

    #[test]
    fn transfers_add_to_one_key_and_window_only() {
        let t = PartitionTable::coordinated();
        t.apply(&push(1, &[(1, 500_000, 0)]), |_| Some((3, 0)));
        t.add(LimitId(1), "alice", 3, 200, 3);
        assert_eq!(t.partition(LimitId(1), "alice", 3, 1000), 700);
        assert_eq!(t.partition(LimitId(1), "bob", 3, 1000), 500);
        assert_eq!(t.partition(LimitId(1), "alice", 4, 1000), 500);
        t.add(LimitId(1), "bob", 5, 1, 5);
        assert_eq!(
            t.partition(LimitId(1), "alice", 3, 1000),
            500,
            "old windows are forgotten"
        );
    }
}

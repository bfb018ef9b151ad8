//! Quota math through the public API: the invariants of DESIGN §4 under arbitrary
//! interleavings, and partitions that never sum past the limit.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use shared::quota::{
    Budget, DEFAULT_THRESHOLD, EdgeCounters, EdgeId, KeyLedger, RegionShare, Threshold, Transfer,
    release_amount, split,
};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// One step of some edge, or of the regional, for one key.
#[derive(Clone, Debug)]
enum Step {
    /// The edge admits up to `n` locally, within what its last known ceiling allows.
    Use { edge: u8, n: u64 },
    /// The edge hands back what it holds unused.
    Release { edge: u8 },
    /// The edge syncs: the regional merges its counters and grants what it wants.
    Sync { edge: u8, want: u64 },
    /// A stale copy of an earlier sync of this edge (any of them) arrives again.
    Replay { edge: u8, pick: usize },
    /// An exact check-and-consume.
    Exact { cost: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..5, 1u64..20).prop_map(|(edge, n)| Step::Use { edge, n }),
        (0u8..5).prop_map(|edge| Step::Release { edge }),
        (0u8..5, 0u64..200).prop_map(|(edge, want)| Step::Sync { edge, want }),
        (0u8..5, any::<usize>()).prop_map(|(edge, pick)| Step::Replay { edge, pick }),
        (1u64..5).prop_map(|cost| Step::Exact { cost }),
    ]
}

/// An edge's own view: its true counters, the ceiling it has heard of, and its past syncs.
#[derive(Clone, Debug, Default)]
struct EdgeView {
    truth: EdgeCounters,
    sent: Vec<(u64, u64)>,
}

proptest! {
    #![proptest_config(config())]

    /// Whatever edges and the regional do, in whatever order, with replays: what edges may
    /// decide under grants stays under θ·P, everything stays under P, and the regional's
    /// merged counts never exceed the truth nor go backwards.
    #[test]
    fn grants_keep_t_plus_g_under_theta_p(
        partition in 1u64..2000,
        theta_ppm in 100_000u32..=1_000_000,
        steps in prop::collection::vec(step(), 1..200),
    ) {
        let budget = Budget {
            partition,
            carried: 0,
            threshold: Threshold::from_ppm(theta_ppm).unwrap(),
            edges: 5,
        };
        let mut ledger = KeyLedger::new();
        let mut edges = vec![EdgeView::default(); 5];
        for step in steps {
            match step {
                Step::Use { edge, n } => {
                    let e = &mut edges[edge as usize];
                    let n = n.min(e.truth.unused());
                    e.truth.used += n;
                }
                Step::Release { edge } => {
                    let e = &mut edges[edge as usize];
                    e.truth.released += e.truth.unused();
                }
                Step::Sync { edge, want } => {
                    let e = &mut edges[edge as usize];
                    e.sent.push((e.truth.used, e.truth.released));
                    ledger.merge(EdgeId(u64::from(edge)), e.truth.used, e.truth.released);
                    let grant = ledger.grant(EdgeId(u64::from(edge)), &budget, want);
                    if grant.raised_by() > 0 {
                        // The invariant at the moment of minting, exact path included.
                        prop_assert!(ledger.reserved(&budget) <= budget.threshold.of(partition));
                    }
                    e.truth.granted = e.truth.granted.max(grant.ceiling());
                }
                Step::Replay { edge, pick } => {
                    let e = &edges[edge as usize];
                    if let Some(&(used, released)) = e.sent.get(pick % e.sent.len().max(1)) {
                        ledger.merge(EdgeId(u64::from(edge)), used, released);
                    }
                }
                Step::Exact { cost } => {
                    ledger.exact(cost, &budget);
                }
            }
            // Ground truth: each edge's true use against the ceiling the regional holds.
            let local: u64 = (0..5u32)
                .map(|i| {
                    let granted = ledger.counters(EdgeId(u64::from(i))).granted;
                    let t = edges[i as usize].truth;
                    t.used.max(granted.saturating_sub(t.released))
                })
                .sum();
            prop_assert!(local <= budget.threshold.of(partition), "local {local}");
            prop_assert!(local + ledger.exact_used() <= partition);
            prop_assert!(ledger.reserved(&budget) <= partition);
            for i in 0..5u32 {
                let merged = ledger.counters(EdgeId(u64::from(i)));
                let truth = edges[i as usize].truth;
                prop_assert!(merged.used <= truth.used && merged.released <= truth.released);
            }
        }
    }

    /// Merging is order-free and idempotent: any permutation of a set of observations, with
    /// repeats, gives the same counters.
    #[test]
    fn merge_is_a_join(
        observations in prop::collection::vec((0u64..100, 0u64..100, 0u64..100), 1..20),
        seed in any::<u64>(),
    ) {
        let mut forward = EdgeCounters::default();
        for &(granted, released, used) in &observations {
            forward.merge(EdgeCounters { granted, released, used });
        }
        let mut shuffled = observations.clone();
        shuffled.extend_from_slice(&observations);
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut backward = EdgeCounters::default();
        for &(granted, released, used) in &shuffled {
            backward.merge(EdgeCounters { granted, released, used });
        }
        prop_assert_eq!(forward, backward);
    }

    /// Σ P_r ≤ L for any demands, floors and pins; equal to L when no pins are given.
    #[test]
    fn partitions_never_sum_past_the_limit(
        limit in 0u64..1_000_000,
        regions in prop::collection::vec(
            (0u64..10_000, 0u32..600_000, prop::option::weighted(0.3, 0u32..1_000_000)),
            1..8,
        ),
    ) {
        let shares: Vec<RegionShare> = regions
            .iter()
            .map(|&(demand, floor_ppm, pinned_ppm)| RegionShare { demand, floor_ppm, pinned_ppm })
            .collect();
        let parts = split(limit, &shares);
        prop_assert_eq!(parts.len(), shares.len());
        let total: u64 = parts.iter().sum();
        prop_assert!(total <= limit, "{parts:?} > {limit}");
        if shares.iter().all(|s| s.pinned_ppm.is_none()) {
            prop_assert_eq!(total, limit);
        }
    }

    /// A transfer moves quota without creating any: each giver releases at most its unused
    /// partition and lowers its partition by what it released; the receiver is granted
    /// exactly the confirmed total, never before confirmation, never more than wanted. So
    /// partitions + in flight is conserved at every step.
    #[test]
    fn transfer_conserves_quota(
        wanted in 0u64..10_000,
        givers in prop::collection::vec((0u64..5_000, 0u64..5_000), 1..5),
        listed in prop::collection::vec(0u32..6, 0..8),
        confirm_order in prop::collection::vec(0usize..8, 0..12),
        expire_at in 0usize..12,
    ) {
        // Region 0 receives; regions 1.. give. Each giver: its partition and its usage.
        let mut regions: Vec<(Budget, KeyLedger)> = std::iter::once((0, 0))
            .chain(givers.iter().copied())
            .map(|(partition, used)| {
                let budget = Budget { partition, carried: 0, threshold: DEFAULT_THRESHOLD, edges: 1 };
                let mut ledger = KeyLedger::new();
                ledger.merge(EdgeId(0), used.min(partition), 0);
                (budget, ledger)
            })
            .collect();
        let total_before: u64 = regions.iter().map(|(b, _)| b.partition).sum();
        // The coordinator's list may repeat regions, name the receiver, or name none at all.
        let offered: Vec<(u32, u64)> = listed
            .iter()
            .filter(|&&r| (r as usize) < regions.len())
            .map(|&r| {
                let (b, l) = &regions[r as usize];
                (r, b.partition - l.reserved(b))
            })
            .collect();
        let mut t = Transfer::new(7, 0, wanted, &offered);
        let asks: Vec<(u32, u64)> = t.asks().collect();
        prop_assert!(asks.iter().all(|&(r, _)| r != 0), "the receiver never gives");
        prop_assert!(asks.iter().map(|a| a.1).sum::<u64>() <= wanted);
        prop_assert_eq!(t.take_grant(), 0, "nothing granted before a release");
        for (step, &i) in confirm_order.iter().enumerate() {
            if step == expire_at {
                t.expire();
            }
            let Some(&(region, amount)) = asks.get(i) else { continue };
            let (budget, ledger) = &mut regions[region as usize];
            let unused = budget.partition - ledger.reserved(budget);
            let released = release_amount(ledger, budget, amount);
            prop_assert!(released <= unused && released <= amount);
            let before = t.confirmed();
            t.confirm(region, released).unwrap();
            // A repeated confirmation changes nothing; the first one lowers the partition.
            budget.partition -= t.confirmed() - before;
            let granted = t.take_grant();
            regions[0].0.partition += granted;
            let total_now: u64 = regions.iter().map(|(b, _)| b.partition).sum();
            prop_assert_eq!(total_now, total_before, "quota created or lost");
            prop_assert!(regions[0].0.partition <= wanted);
        }
    }
}

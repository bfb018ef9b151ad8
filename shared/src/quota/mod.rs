//! Quota math: how local decisions stay correct (DESIGN §4).
//!
//! Inside one region, per (rule, key, window), the regional keeps a [`KeyLedger`]: the
//! regional's own exact-path count and, per edge, three counters that only grow
//! ([`EdgeCounters`]). Everything an edge may decide alone comes from a [`Grant`], and the only
//! way to mint one is [`KeyLedger::grant`], which keeps `T + G ≤ θ·P`. Across regions, the
//! coordinator splits each limit into partitions with `Σ P_r ≤ L` ([`split`]) and moves quota
//! mid-window only by the two-phase [`Transfer`].
//!
//! A sync flows like this: the edge sends its cumulative `used` and `released`; the regional
//! [`merge`](KeyLedger::merge)s them by `max` (so a duplicate, a replay or a second replica
//! changes nothing), then calls [`grant`](KeyLedger::grant) to raise the edge's ceiling, and
//! answers with the ceiling, `T` and `n`. An exact check near the limit is
//! [`KeyLedger::exact`]. A token bucket's keys are granted through the same ledgers, with the
//! quota taken from the bucket itself ([`lease`]).

mod grant;
pub mod lease;
mod partition;

pub use self::{
    grant::{
        Budget, DEFAULT_THRESHOLD, EdgeCounters, EdgeId, ExactOutcome, Grant, KeyLedger, Threshold,
        carried, carry_fits_from, carry_weight_ppm, cold_allowance,
    },
    partition::{
        DemandSmoother, RegionShare, Transfer, TransferError, TransferState, ppm_for,
        release_amount, share_of, split,
    },
};

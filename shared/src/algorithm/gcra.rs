//! Token bucket as GCRA. (Stub: the algorithm helper replaces this file.)

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome};
use crate::clock::Nanos;

/// Token bucket as GCRA: `limit` tokens per `period`, at most `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    limit: NonZeroU64,
    period: Nanos,
    burst: NonZeroU64,
}

impl Gcra {
    /// `limit` tokens per `period` (`10/s` is `limit` 10, `period` 1 s), bucket capacity
    /// `burst`; `None` when `period` is zero or the emission interval `period / limit` rounds
    /// to zero nanoseconds.
    pub fn new(limit: NonZeroU64, period: Nanos, burst: NonZeroU64) -> Option<Gcra> {
        (period.as_u64() / limit.get() > 0).then_some(Gcra { limit, period, burst })
    }

    /// Tokens per period.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The period the rate is expressed over.
    pub fn period(&self) -> Nanos {
        self.period
    }

    /// Bucket capacity.
    pub fn burst(&self) -> NonZeroU64 {
        self.burst
    }
}

/// Per-key state of [`Gcra`]: the theoretical arrival time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcraState {}

impl Algorithm for Gcra {
    type State = GcraState;

    fn check(&self, _state: &GcraState, _now: Nanos, _cost: NonZeroU32) -> Outcome {
        unimplemented!("stub")
    }

    fn consume(&self, _state: &mut GcraState, _now: Nanos, _cost: NonZeroU32) {
        unimplemented!("stub")
    }
}

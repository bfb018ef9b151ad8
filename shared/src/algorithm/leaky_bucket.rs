//! Leaky bucket, as a meter and as a shaper. (Stub: the algorithm helper replaces this file.)

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome};
use crate::clock::Nanos;

/// Leaky bucket draining `limit` units per `period`, holding at most `capacity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeakyBucket {
    limit: NonZeroU64,
    period: Nanos,
    capacity: NonZeroU64,
    mode: LeakyMode,
}

/// What a leaky bucket does with a request that finds it not empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakyMode {
    /// Admit while the bucket has room; deny when it is full.
    Meter,
    /// Queue while the bucket has room and answer "go after X": output leaves at the rate.
    Shaper,
}

impl LeakyBucket {
    /// Drains `limit` per `period`, holds `capacity`; `None` when `period / limit` rounds to
    /// zero nanoseconds.
    pub fn new(
        limit: NonZeroU64,
        period: Nanos,
        capacity: NonZeroU64,
        mode: LeakyMode,
    ) -> Option<LeakyBucket> {
        (period.as_u64() / limit.get() > 0).then_some(LeakyBucket {
            limit,
            period,
            capacity,
            mode,
        })
    }

    /// Units drained per period.
    pub fn limit(&self) -> NonZeroU64 {
        self.limit
    }

    /// The period the drain rate is expressed over.
    pub fn period(&self) -> Nanos {
        self.period
    }

    /// Bucket capacity.
    pub fn capacity(&self) -> NonZeroU64 {
        self.capacity
    }

    /// Meter or shaper.
    pub fn mode(&self) -> LeakyMode {
        self.mode
    }
}

/// Per-key state of [`LeakyBucket`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakyBucketState {}

impl Algorithm for LeakyBucket {
    type State = LeakyBucketState;

    fn check(&self, _state: &LeakyBucketState, _now: Nanos, _cost: NonZeroU32) -> Outcome {
        unimplemented!("stub")
    }

    fn consume(&self, _state: &mut LeakyBucketState, _now: Nanos, _cost: NonZeroU32) {
        unimplemented!("stub")
    }
}

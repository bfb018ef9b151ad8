//! Sliding window log. (Stub: the algorithm helper replaces this file.)

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome};
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
}

/// Per-key state of [`SlidingLog`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlidingLogState {}

impl Algorithm for SlidingLog {
    type State = SlidingLogState;

    fn check(&self, _state: &SlidingLogState, _now: Nanos, _cost: NonZeroU32) -> Outcome {
        unimplemented!("stub")
    }

    fn consume(&self, _state: &mut SlidingLogState, _now: Nanos, _cost: NonZeroU32) {
        unimplemented!("stub")
    }
}

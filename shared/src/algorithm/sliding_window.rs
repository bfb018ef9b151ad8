//! Sliding window counter. (Stub: the algorithm helper replaces this file.)

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome};
use crate::clock::Nanos;

/// Sliding window counter: at most `limit` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    limit: NonZeroU64,
    window: Nanos,
}

impl SlidingWindow {
    /// At most `limit` per `window`; `None` when `window` is zero.
    pub fn new(limit: NonZeroU64, window: Nanos) -> Option<SlidingWindow> {
        (window > Nanos::ZERO).then_some(SlidingWindow { limit, window })
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

/// Per-key state of [`SlidingWindow`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlidingWindowState {}

impl Algorithm for SlidingWindow {
    type State = SlidingWindowState;

    fn check(&self, _state: &SlidingWindowState, _now: Nanos, _cost: NonZeroU32) -> Outcome {
        unimplemented!("stub")
    }

    fn consume(&self, _state: &mut SlidingWindowState, _now: Nanos, _cost: NonZeroU32) {
        unimplemented!("stub")
    }
}

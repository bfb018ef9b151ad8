//! Count per epoch-aligned window. (Stub: the algorithm helper replaces this file.)

use std::num::{NonZeroU32, NonZeroU64};

use super::{Algorithm, Outcome};
use crate::clock::Nanos;

/// Count per epoch-aligned window: at most `limit` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    limit: NonZeroU64,
    window: Nanos,
}

impl FixedWindow {
    /// At most `limit` per `window`; `None` when `window` is zero.
    pub fn new(limit: NonZeroU64, window: Nanos) -> Option<FixedWindow> {
        (window > Nanos::ZERO).then_some(FixedWindow { limit, window })
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

/// Per-key state of [`FixedWindow`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FixedWindowState {}

impl Algorithm for FixedWindow {
    type State = FixedWindowState;

    fn check(&self, _state: &FixedWindowState, _now: Nanos, _cost: NonZeroU32) -> Outcome {
        unimplemented!("stub")
    }

    fn consume(&self, _state: &mut FixedWindowState, _now: Nanos, _cost: NonZeroU32) {
        unimplemented!("stub")
    }
}

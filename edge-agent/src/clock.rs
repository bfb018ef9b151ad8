//! The wall clock, for the agent in production (`shared` owns no clock that reads the wall).

use std::time::{SystemTime, UNIX_EPOCH};

use shared::{Clock, Nanos};

/// Nanoseconds since the Unix epoch from the system clock. Windows are epoch-aligned
/// (DESIGN §9), so tiers whose clocks agree name the same window without talking.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        // A clock before 1970 is a broken host; count from the epoch rather than panic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(Nanos::from)
            .unwrap_or(Nanos::ZERO)
    }
}

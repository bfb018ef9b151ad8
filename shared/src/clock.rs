//! Time as every tier names it: nanoseconds since the Unix epoch, passed in, never read here.
//!
//! Every decision takes `now` from a [`Clock`] it is handed: the tiers run on [`SystemClock`],
//! tests and the simulator on [`ManualClock`]. Nothing in the core reads the wall by itself.
//! Windows are aligned to the epoch (DESIGN §9), so two tiers that agree on the time agree on
//! the window without talking.

use std::{
    fmt,
    ops::{Add, Sub},
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// A point in time or a span, in nanoseconds; points count from the Unix epoch.
///
/// `u64` nanoseconds reach the year 2554, which is enough. Arithmetic saturates: a rate limiter
/// that wraps its clock would reopen every window at once.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Nanos(pub u64);

impl Nanos {
    /// Zero: the epoch, or an empty span.
    pub const ZERO: Nanos = Nanos(0);
    /// The latest representable time; used as "never".
    pub const MAX: Nanos = Nanos(u64::MAX);

    /// `n` whole seconds.
    pub const fn from_secs(n: u64) -> Nanos {
        Nanos(n.saturating_mul(1_000_000_000))
    }

    /// `n` whole milliseconds.
    pub const fn from_millis(n: u64) -> Nanos {
        Nanos(n.saturating_mul(1_000_000))
    }

    /// The raw count of nanoseconds.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Whole seconds, rounded up: what a `Retry-After` header may say without lying.
    pub const fn as_secs_ceil(self) -> u64 {
        self.0.div_ceil(1_000_000_000)
    }

    /// Whole seconds, rounded down: a Unix timestamp.
    pub const fn as_secs_floor(self) -> u64 {
        self.0 / 1_000_000_000
    }

    /// A time or span computed in `u128`, saturating at [`Nanos::MAX`] (past the year 2554)
    /// rather than wrapping: the algorithms widen their products and narrow once, here.
    pub const fn saturating_from(t: u128) -> Nanos {
        if t > u64::MAX as u128 {
            Nanos::MAX
        } else {
            Nanos(t as u64)
        }
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub const fn saturating_sub(self, earlier: Nanos) -> Nanos {
        Nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add for Nanos {
    type Output = Nanos;
    fn add(self, rhs: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Nanos {
    type Output = Nanos;
    fn sub(self, rhs: Nanos) -> Nanos {
        self.saturating_sub(rhs)
    }
}

impl From<Duration> for Nanos {
    fn from(d: Duration) -> Nanos {
        Nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl From<Nanos> for Duration {
    fn from(n: Nanos) -> Duration {
        Duration::from_nanos(n.0)
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", Duration::from_nanos(self.0))
    }
}

/// A source of the current time.
///
/// Every algorithm and quota decision takes `now` from a `Clock`, never from the OS, so tests
/// and the simulator drive time by hand.
pub trait Clock: Send + Sync {
    /// The current time, in nanoseconds since the Unix epoch.
    fn now(&self) -> Nanos;
}

/// Nanoseconds since the Unix epoch from the system clock: what every tier runs on.
///
/// Reading the wall clock costs about 40 ns on a virtual machine (`clock_gettime` through the
/// vDSO, then the conversion), which was a fifth of an edge decision. So this reads the CPU's
/// time-stamp counter instead (quanta: about 10 ns, calibrated against the monotonic clock) and
/// adds an offset to the wall clock, taken again from `SystemTime` every [`ANCHOR_EVERY`]. Between
/// two anchors the counter drifts from the wall clock only by its calibration error and NTP's
/// slew (at most 500 ppm: 25 µs over 50 ms); a step of the wall clock shows within
/// `ANCHOR_EVERY`. Where the CPU has no usable counter, quanta reads the monotonic clock and
/// the same anchoring applies.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

/// How often [`SystemClock`] takes the wall clock again.
pub const ANCHOR_EVERY: Nanos = Nanos::from_millis(50);

/// The counter, and where it stood when the process first asked the time.
struct Counter {
    clock: quanta::Clock,
    base: u64,
}

/// Anchored on creation, so no thread ever reads an offset that was never set.
static COUNTER: LazyLock<Counter> = LazyLock::new(|| {
    let clock = quanta::Clock::new();
    let base = clock.raw();
    let counter = Counter { clock, base };
    counter.anchor();
    counter
});
/// Wall-clock nanoseconds minus counter nanoseconds, as of the last anchor.
static OFFSET: AtomicU64 = AtomicU64::new(0);
/// Counter nanoseconds at which the next read anchors again.
static NEXT_ANCHOR: AtomicU64 = AtomicU64::new(0);

/// A wall-clock read that took longer than this (the thread was descheduled between the
/// counter and the wall) is taken again, up to three times, keeping the tightest.
const ANCHOR_SLACK: u64 = 20_000;

impl Counter {
    /// Nanoseconds since `base`.
    fn elapsed(&self) -> u64 {
        self.clock.delta_as_nanos(self.base, self.clock.raw())
    }

    /// Reads the wall clock between two counter reads and sets the offset from their
    /// midpoint, so a thread preempted in between does not shift every later reading.
    /// Returns the wall clock read.
    fn anchor(&self) -> Nanos {
        let take = || {
            let before = self.elapsed();
            let wall = wall();
            let after = self.elapsed();
            let gap = after.saturating_sub(before);
            (gap, before + gap / 2, wall)
        };
        let mut best = take();
        for _ in 0..2 {
            if best.0 <= ANCHOR_SLACK {
                break;
            }
            let next = take();
            if next.0 < best.0 {
                best = next;
            }
        }
        let (_, at, wall) = best;
        OFFSET.store(wall.0.wrapping_sub(at), Ordering::Relaxed);
        NEXT_ANCHOR.store(at.saturating_add(ANCHOR_EVERY.0), Ordering::Relaxed);
        wall
    }
}

fn wall() -> Nanos {
    // A clock before 1970 is a broken host; count from the epoch rather than panic.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(Nanos::from)
        .unwrap_or(Nanos::ZERO)
}

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        let counter = &*COUNTER;
        let elapsed = counter.elapsed();
        let next = NEXT_ANCHOR.load(Ordering::Relaxed);
        // Inside the last anchor's span the offset holds. Past it, or before it (the counter
        // went back: another core's, or quanta's clamp to zero), anchor again. Two threads may
        // anchor at once; each stores an offset as good as the other's, and a thread that
        // pairs one anchor's span with the previous anchor's offset is off by the drift of
        // one span.
        if elapsed < next && elapsed.saturating_add(ANCHOR_EVERY.0) >= next {
            return Nanos(elapsed.wrapping_add(OFFSET.load(Ordering::Relaxed)));
        }
        counter.anchor()
    }
}

/// A clock that moves only when told to. Clones share one time, like governor's
/// `FakeRelativeClock`, so a test can hold one clone and hand another to the code under test.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Nanos) -> ManualClock {
        ManualClock {
            now: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Moves every clone forward by `by`.
    pub fn advance(&self, by: Nanos) {
        self.now.fetch_add(by.0, Ordering::SeqCst);
    }

    /// Sets every clone to `to`; time may go backwards here, as a skewed peer's clock does.
    pub fn set(&self, to: Nanos) {
        self.now.store(to.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        Nanos(self.now.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_time() {
        let a = ManualClock::new(Nanos::from_secs(10));
        let b = a.clone();
        a.advance(Nanos::from_millis(1500));
        assert_eq!(b.now(), Nanos(11_500_000_000));
    }

    #[test]
    fn the_system_clock_follows_the_wall_clock_across_anchors() {
        // Reads spread over three anchor intervals stay within a millisecond of the wall
        // clock, read just before and after (its slew over 50 ms is tens of microseconds).
        let slack = Nanos::from_millis(1);
        for _ in 0..15 {
            let before = wall();
            let now = SystemClock.now();
            let after = wall();
            assert!(
                now + slack >= before && now <= after + slack,
                "{before:?} ≤ {now:?} ≤ {after:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Nanos::MAX + Nanos(1), Nanos::MAX);
        assert_eq!(Nanos(1) - Nanos(2), Nanos::ZERO);
        assert_eq!(Nanos(1).as_secs_ceil(), 1);
        assert_eq!(Nanos::from_secs(2).as_secs_ceil(), 2);
    }
}

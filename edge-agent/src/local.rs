//! Per-key local state: grants, the cold allowance, cached denials, and the counts to sync.
//!
//! Each (limit, key) the edge has seen has one [`KeyState`] in the agent's map, holding the
//! counters of the current window and, until they are acknowledged, of the previous one
//! (DESIGN §4: `granted`, `released`, `used`, all monotone within a window). Nothing here
//! does I/O or takes a lock: the agent holds the map's shard lock around these calls, so they
//! are short and never wait on the network.
//!
//! A request that matches several limits reserves into each key's `pending` one at a time,
//! then commits (pending → used) or rolls back (pending → 0). The sync loop reports only
//! `used`, so a reservation that is rolled back is never seen upstream, and no request ever
//! holds two keys' locks at once.

use shared::{LimitId, Nanos, Strictness, rules::Key, wire::MAX_KEY_LEN};

/// The map key: a limit's id (8 bytes, little-endian) followed by the key as it crosses the
/// wire (`u:42`, `i:203.0.113.7`, …). Built on the stack, so a warm lookup allocates nothing.
pub(crate) struct SlotKey {
    buf: [u8; 8 + MAX_KEY_LEN],
    len: usize,
}

impl SlotKey {
    /// The slot for `key` under `limit`. The key's kind is a one-letter prefix, so a user id
    /// and an IP with the same text never share a counter. A value too long for the wire is
    /// replaced by a 64-bit hash of it (`#` and 16 hex digits): distinct long values share a
    /// counter only on a hash collision.
    pub(crate) fn new(limit: LimitId, key: &Key<'_>) -> SlotKey {
        let mut buf = [0u8; 8 + MAX_KEY_LEN];
        buf[..8].copy_from_slice(&limit.0.to_le_bytes());
        let (prefix, value): (&[u8], &str) = match key {
            Key::UserId(v) => (b"u:", v),
            Key::Ip(v) => (b"i:", v),
            Key::ApiKey(v) => (b"k:", v),
            Key::Header(v) => (b"h:", v),
            Key::Global => (b"g:", ""),
        };
        let mut len = 8;
        buf[len..len + 2].copy_from_slice(prefix);
        len += 2;
        if value.len() <= MAX_KEY_LEN - 2 {
            buf[len..len + value.len()].copy_from_slice(value.as_bytes());
            len += value.len();
        } else {
            let hash = fnv1a(value.as_bytes());
            buf[len] = b'#';
            len += 1;
            for i in (0..16).rev() {
                buf[len] = b"0123456789abcdef"[((hash >> (i * 4)) & 0xf) as usize];
                len += 1;
            }
        }
        SlotKey { buf, len }
    }

    /// The slot for a limit and a key as it came back on the wire (an ack).
    pub(crate) fn from_wire(limit: LimitId, wire_key: &str) -> Option<SlotKey> {
        if wire_key.len() > MAX_KEY_LEN {
            return None;
        }
        let mut buf = [0u8; 8 + MAX_KEY_LEN];
        buf[..8].copy_from_slice(&limit.0.to_le_bytes());
        buf[8..8 + wire_key.len()].copy_from_slice(wire_key.as_bytes());
        Some(SlotKey {
            buf,
            len: 8 + wire_key.len(),
        })
    }

    /// The bytes the map is keyed by.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Splits a map key back into its limit and its wire key.
pub(crate) fn split(bytes: &[u8]) -> (LimitId, &str) {
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    // The key part was copied from a `&str` (or is ASCII hex), so it is valid UTF-8.
    let key = std::str::from_utf8(&bytes[8..]).unwrap_or("");
    (LimitId(u64::from_le_bytes(id)), key)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// "No window": the index of a slot that holds nothing.
const NONE: u64 = u64::MAX;

/// One window's counters for one key at this edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// The epoch-aligned window index, or [`NONE`].
    pub(crate) index: u64,
    /// The ceiling the regional granted (absolute, DESIGN §4).
    pub(crate) granted: u64,
    /// What this edge handed back unused.
    pub(crate) released: u64,
    /// What this edge admitted and will report.
    pub(crate) used: u64,
    /// Reserved by requests still checking their other limits; never reported.
    pub(crate) pending: u64,
    /// The regional's echo of `used` and `released`: resend until it covers ours.
    pub(crate) acked_used: u64,
    pub(crate) acked_released: u64,
    /// `T` as of the last answer from the regional, for `remaining` (on the exact path, an
    /// estimate that also counts other edges' unused grants as used: it never overstates).
    pub(crate) total: u64,
    /// Our `used` when `total` was learned: what we admitted since is not in it.
    pub(crate) used_at_total: u64,
    /// Cost asked for since the last flush (local or exact): this edge's demand.
    pub(crate) demand: u64,
    /// The regional stopped granting: exact path until the window turns.
    pub(crate) near_limit: bool,
    /// The regional asked for unused quota back.
    pub(crate) recalled: bool,
}

impl Window {
    fn empty() -> Window {
        Window::at(NONE)
    }

    fn at(index: u64) -> Window {
        Window {
            index,
            granted: 0,
            released: 0,
            used: 0,
            pending: 0,
            acked_used: 0,
            acked_released: 0,
            total: 0,
            used_at_total: 0,
            demand: 0,
            near_limit: false,
            recalled: false,
        }
    }

    /// What this edge knows is left of `limit`: the regional's last `T`, plus what it admitted
    /// since, taken from `limit`.
    pub(crate) fn remaining(&self, limit: u64) -> u64 {
        let since = self.used.saturating_sub(self.used_at_total);
        limit.saturating_sub(self.total.saturating_add(since))
    }

    /// Learns `T` (or an estimate of it) as of our `used` now.
    pub(crate) fn learn_total(&mut self, total: u64, used_then: u64) {
        self.total = total;
        self.used_at_total = used_then;
    }

    /// Counts the regional has not acknowledged yet.
    pub(crate) fn unsynced(&self) -> bool {
        self.index != NONE && (self.used != self.acked_used || self.released != self.acked_released)
    }

    /// What may still be admitted under the grant.
    pub(crate) fn unused(&self) -> u64 {
        self.granted
            .saturating_sub(self.released)
            .saturating_sub(self.used)
            .saturating_sub(self.pending)
    }

    /// Raises the ceiling to `granted` (an old or repeated answer changes nothing); returns by
    /// how much it rose.
    pub(crate) fn raise_granted(&mut self, granted: u64) -> u64 {
        let rise = granted.saturating_sub(self.granted);
        self.granted += rise;
        rise
    }

    /// Hands back everything unused (idle key, recall, or near the limit); returns how much.
    pub(crate) fn release_unused(&mut self) -> u64 {
        let unused = self.unused();
        self.released = self.released.saturating_add(unused);
        unused
    }
}

/// What a key may do locally right now, for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Local {
    /// Admit: the cost fits under the grant or the cold allowance (and is now reserved).
    Reserved,
    /// Deny without asking: a cached denial until `until`.
    Denied { until: Nanos },
    /// Ask the regional.
    Exact,
}

/// Everything one edge knows about one (limit, key).
#[derive(Clone, Debug)]
pub(crate) struct KeyState {
    pub(crate) cur: Window,
    pub(crate) prev: Window,
    /// A cached denial: deny locally until then.
    pub(crate) denied_until: Nanos,
    pub(crate) last_used: Nanos,
    /// The window in which the regional listed this key as hot (no cold allowance), or NONE.
    pub(crate) hot_window: u64,
}

impl KeyState {
    pub(crate) fn new() -> KeyState {
        KeyState {
            cur: Window::empty(),
            prev: Window::empty(),
            denied_until: Nanos::ZERO,
            last_used: Nanos::ZERO,
            hot_window: NONE,
        }
    }

    /// The counters for window `w`, rolling the current window over when `w` is newer. The
    /// previous window is kept while it has counts to sync; one older than that is dropped,
    /// and the return says how many windows with unsynced counts were lost that way.
    pub(crate) fn window(&mut self, w: u64) -> (&mut Window, u32) {
        let mut lost = 0;
        if self.cur.index == NONE || w > self.cur.index {
            if self.prev.unsynced() {
                lost += 1;
            }
            self.prev = if self.cur.index != NONE && self.cur.index + 1 == w {
                self.cur
            } else {
                if self.cur.unsynced() {
                    lost += 1;
                }
                Window::empty()
            };
            self.cur = Window::at(w);
        }
        // A request tagged with an older window (a clock stepped back) counts in the current
        // one: never forget a count, never reopen a window.
        (&mut self.cur, lost)
    }

    /// Tries to reserve `cost` locally at `now` in window `w`, under the grant or, for a soft
    /// key never granted, the cold allowance `c0` (asked for only then: it is a lookup).
    pub(crate) fn reserve(
        &mut self,
        now: Nanos,
        w: u64,
        cost: u64,
        strictness: Strictness,
        c0: impl FnOnce() -> u64,
    ) -> (Local, u32) {
        if self.denied_until > now {
            return (
                Local::Denied {
                    until: self.denied_until,
                },
                0,
            );
        }
        let hot = self.hot_window == w;
        let (win, lost) = self.window(w);
        if win.near_limit {
            return (Local::Exact, lost);
        }
        // Under the grant; or, for a soft key that is not hot, within the cold allowance
        // beyond what the regional counts this edge as holding (`granted − released`). The
        // second covers a key's first requests and a warm key whose grant was handed back
        // after an idle spell alike, and still bounds what this edge admits beyond its
        // grants in one window by c0, which is what keeps admitted ≤ P + n·c0.
        let held = win.granted.saturating_sub(win.released);
        let fits = win.unused() >= cost
            || (strictness == Strictness::Soft
                && !hot
                && win.used.saturating_add(win.pending).saturating_add(cost)
                    <= held.saturating_add(c0()));
        if !fits {
            return (Local::Exact, lost);
        }
        win.pending += cost;
        (Local::Reserved, lost)
    }

    /// Turns a reservation into an admission.
    pub(crate) fn commit(&mut self, now: Nanos, cost: u64) {
        let win = &mut self.cur;
        win.pending = win.pending.saturating_sub(cost);
        win.used = win.used.saturating_add(cost);
        win.demand = win.demand.saturating_add(cost);
        self.last_used = now;
    }

    /// Drops a reservation: nothing was admitted.
    pub(crate) fn roll_back(&mut self, cost: u64) {
        self.cur.pending = self.cur.pending.saturating_sub(cost);
    }

    /// Records an admission the edge made without a grant (the failure modes `local` and
    /// `open`): counted, synced and replayed like any other, because counters only grow.
    pub(crate) fn admit_unconditionally(&mut self, now: Nanos, w: u64, cost: u64) -> u32 {
        let (win, lost) = self.window(w);
        win.used = win.used.saturating_add(cost);
        self.last_used = now;
        lost
    }

    /// Notes demand that went to the exact path, so the next grant is sized for it.
    pub(crate) fn note_demand(&mut self, now: Nanos, w: u64, cost: u64) -> u32 {
        let (win, lost) = self.window(w);
        win.demand = win.demand.saturating_add(cost);
        self.last_used = now;
        lost
    }

    /// What this edge has admitted in window `w` (for the `local` failure mode's `P/n`).
    pub(crate) fn used_in(&mut self, w: u64) -> (u64, u32) {
        let (win, lost) = self.window(w);
        (win.used.saturating_add(win.pending), lost)
    }

    /// Raises the ceiling the regional sent for window `w`, if the edge still holds it;
    /// returns by how much it rose.
    pub(crate) fn raise_granted(&mut self, w: u64, granted: u64) -> u64 {
        self.slot(w).map_or(0, |win| win.raise_granted(granted))
    }

    /// The counters of window `w`, if the edge holds them.
    pub(crate) fn slot(&mut self, w: u64) -> Option<&mut Window> {
        if self.cur.index == w {
            Some(&mut self.cur)
        } else if self.prev.index == w {
            Some(&mut self.prev)
        } else {
            None
        }
    }

    /// Whether anything here still needs to reach the regional.
    pub(crate) fn unsynced(&self) -> bool {
        self.cur.unsynced() || self.prev.unsynced()
    }

    /// The key's limit changed value (a new rule set, same windows). Its grants and its cached
    /// denial were sized under the old value, so the unused grants are handed back (the next
    /// sync reports them) and the denial is dropped; what it counted stays. Returns the units
    /// handed back.
    pub(crate) fn limit_changed(&mut self) -> u64 {
        self.denied_until = Nanos::ZERO;
        [&mut self.prev, &mut self.cur]
            .into_iter()
            .filter(|win| win.index != NONE)
            .map(Window::release_unused)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_keys_separate_kinds_and_round_trip() {
        let a = SlotKey::new(LimitId(7), &Key::UserId("1.2.3.4"));
        let b = SlotKey::new(LimitId(7), &Key::Ip("1.2.3.4"));
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_eq!(split(a.as_bytes()), (LimitId(7), "u:1.2.3.4"));
        let back = SlotKey::from_wire(LimitId(7), "u:1.2.3.4").unwrap();
        assert_eq!(back.as_bytes(), a.as_bytes());
    }

    #[test]
    fn long_values_are_hashed_to_fit_the_wire() {
        let long = "x".repeat(1000);
        let k = SlotKey::new(LimitId(1), &Key::Header(&long));
        let (_, wire) = split(k.as_bytes());
        assert!(
            wire.len() <= MAX_KEY_LEN && wire.starts_with("h:#"),
            "{wire}"
        );
    }

    #[test]
    fn reserve_respects_the_grant_and_the_cold_allowance() {
        let mut s = KeyState::new();
        let now = Nanos::from_secs(1);
        // Soft, cold allowance 2.
        assert_eq!(
            s.reserve(now, 0, 1, Strictness::Soft, || 2).0,
            Local::Reserved
        );
        s.commit(now, 1);
        assert_eq!(
            s.reserve(now, 0, 1, Strictness::Soft, || 2).0,
            Local::Reserved
        );
        s.commit(now, 1);
        assert_eq!(s.reserve(now, 0, 1, Strictness::Soft, || 2).0, Local::Exact);
        // Hard: never cold.
        let mut h = KeyState::new();
        assert_eq!(h.reserve(now, 0, 1, Strictness::Hard, || 2).0, Local::Exact);
        // A grant of 5 (ceiling counts the 2 already used).
        s.raise_granted(0, 5);
        for _ in 0..3 {
            assert_eq!(
                s.reserve(now, 0, 1, Strictness::Hard, || 0).0,
                Local::Reserved
            );
            s.commit(now, 1);
        }
        assert_eq!(s.reserve(now, 0, 1, Strictness::Hard, || 0).0, Local::Exact);
    }

    #[test]
    fn a_soft_key_whose_grant_was_handed_back_may_spend_the_cold_allowance_once() {
        let mut s = KeyState::new();
        let now = Nanos::from_secs(1);
        assert_eq!(
            s.reserve(now, 0, 1, Strictness::Soft, || 2).0,
            Local::Reserved
        );
        s.commit(now, 1);
        s.raise_granted(0, 4); // the ceiling counts the 1 already used
        for _ in 0..3 {
            assert_eq!(
                s.reserve(now, 0, 1, Strictness::Soft, || 2).0,
                Local::Reserved
            );
            s.commit(now, 1);
        }
        s.cur.release_unused(); // idle: nothing unused to hand back, held stays 4
        // Beyond the grant: two more (c0 = 2), then the exact path.
        for _ in 0..2 {
            assert_eq!(
                s.reserve(now, 0, 1, Strictness::Soft, || 2).0,
                Local::Reserved
            );
            s.commit(now, 1);
        }
        assert_eq!(s.reserve(now, 0, 1, Strictness::Soft, || 2).0, Local::Exact);
        // Hard keys never go beyond their grant.
        let mut h = KeyState::new();
        assert_eq!(h.reserve(now, 0, 1, Strictness::Hard, || 2).0, Local::Exact);
        h.raise_granted(0, 1);
        assert_eq!(
            h.reserve(now, 0, 1, Strictness::Hard, || 2).0,
            Local::Reserved
        );
        h.commit(now, 1);
        assert_eq!(h.reserve(now, 0, 1, Strictness::Hard, || 2).0, Local::Exact);
    }

    #[test]
    fn a_rolled_back_reservation_leaves_no_trace() {
        let mut s = KeyState::new();
        s.window(0);
        s.raise_granted(0, 1);
        let now = Nanos::ZERO;
        assert_eq!(
            s.reserve(now, 0, 1, Strictness::Hard, || 0).0,
            Local::Reserved
        );
        assert_eq!(
            s.reserve(now, 0, 1, Strictness::Hard, || 0).0,
            Local::Exact,
            "reserved"
        );
        s.roll_back(1);
        assert_eq!(s.cur.used, 0);
        assert!(!s.unsynced());
        assert_eq!(
            s.reserve(now, 0, 1, Strictness::Hard, || 0).0,
            Local::Reserved
        );
    }

    #[test]
    fn a_changed_limit_hands_back_its_grant_and_keeps_its_counts() {
        let mut s = KeyState::new();
        let now = Nanos::from_secs(1);
        s.window(0);
        s.raise_granted(0, 5);
        for _ in 0..2 {
            assert_eq!(
                s.reserve(now, 0, 1, Strictness::Hard, || 0).0,
                Local::Reserved
            );
            s.commit(now, 1);
        }
        s.denied_until = Nanos::from_secs(30);
        assert_eq!(s.limit_changed(), 3, "the unused part of the grant");
        assert_eq!((s.cur.used, s.cur.released), (2, 3));
        assert_eq!(s.denied_until, Nanos::ZERO);
        assert!(s.unsynced(), "the hand-back goes with the next sync");
        assert_eq!(s.reserve(now, 0, 1, Strictness::Hard, || 0).0, Local::Exact);
    }

    #[test]
    fn the_previous_window_is_kept_until_synced_and_older_ones_are_counted_lost() {
        let mut s = KeyState::new();
        s.admit_unconditionally(Nanos::ZERO, 5, 3);
        assert_eq!(s.window(6).1, 0);
        assert_eq!(s.prev.index, 5);
        assert!(s.prev.unsynced());
        // Skipping a window: both 5 (unsynced) and 6 (empty) go; one window's counts lost.
        assert_eq!(s.window(8).1, 1);
    }
}

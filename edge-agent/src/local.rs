//! Per-key local state: grants, the cold allowance, cached denials, and the counts to sync.
//!
//! Each (limit, key) the edge has seen has one [`KeyState`] in the agent's [`KeyMap`], holding
//! the counters of the current window and, until they are acknowledged, of the previous one
//! (DESIGN §4: `granted`, `released`, `used`, all monotone within a window). Nothing here
//! does I/O or takes a lock: the map holds its shard's lock around these calls, so they are
//! short and never wait on the network.
//!
//! A request that matches several limits reserves into each key's `pending` one at a time,
//! then commits (pending → used) or rolls back (pending → 0). The sync loop reports only
//! `used`, so a reservation that is rolled back is never seen upstream, and no request ever
//! holds two keys' locks at once.
//!
//! The state is kept small because an edge holds one per active key: a [`Window`] is 56 bytes,
//! a [`KeyState`] 80, its [`StoredKey`] 32 (compile-time checked below). The previous window is
//! boxed and exists only from a window's turn until its counts are acknowledged; times that
//! only measure idleness are kept in milliseconds.
//!
//! [`KeyMap`]: crate::keymap::KeyMap

use std::mem;

use shared::{LimitId, Nanos, Strictness, rules::Key, wire::MAX_KEY_LEN};

/// Which identity a key counts by: a user id and an IP with the same text never share a
/// counter. On the wire it is the key's one-letter prefix (`u:42`, `i:203.0.113.7`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    User,
    Ip,
    ApiKey,
    Header,
    Global,
}

impl Kind {
    fn letter(self) -> u8 {
        match self {
            Kind::User => b'u',
            Kind::Ip => b'i',
            Kind::ApiKey => b'k',
            Kind::Header => b'h',
            Kind::Global => b'g',
        }
    }

    fn from_letter(letter: u8) -> Option<Kind> {
        Some(match letter {
            b'u' => Kind::User,
            b'i' => Kind::Ip,
            b'k' => Kind::ApiKey,
            b'h' => Kind::Header,
            b'g' => Kind::Global,
            _ => return None,
        })
    }
}

/// A (limit, key) as a request or an answer names it, borrowed: what the key map is searched
/// by. Building one copies nothing unless the value is too long for the wire.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotKey<'a> {
    pub(crate) limit: LimitId,
    kind: Kind,
    value: Value<'a>,
}

#[derive(Clone, Copy, Debug)]
enum Value<'a> {
    Text(&'a [u8]),
    /// A value too long for the wire, as `#` and 16 hex digits of its 64-bit hash.
    Hashed([u8; 17]),
}

impl<'a> SlotKey<'a> {
    /// The slot for `key` under `limit`. A value too long for the wire is replaced by a 64-bit
    /// hash of it (`#` and 16 hex digits): distinct long values share a counter only on a hash
    /// collision.
    pub(crate) fn new(limit: LimitId, key: &Key<'a>) -> SlotKey<'a> {
        let (kind, text) = match *key {
            Key::UserId(v) => (Kind::User, v),
            Key::Ip(v) => (Kind::Ip, v),
            Key::ApiKey(v) => (Kind::ApiKey, v),
            Key::Header(v) => (Kind::Header, v),
            Key::Global => (Kind::Global, ""),
        };
        let value = if text.len() <= MAX_KEY_LEN - 2 {
            Value::Text(text.as_bytes())
        } else {
            let hash = fnv1a(text.as_bytes());
            let mut hashed = [b'#'; 17];
            for (i, digit) in hashed[1..].iter_mut().enumerate() {
                *digit = b"0123456789abcdef"[((hash >> ((15 - i) * 4)) & 0xf) as usize];
            }
            Value::Hashed(hashed)
        };
        SlotKey { limit, kind, value }
    }

    /// The slot for a limit and a key as it came back on the wire (an ack), or `None` for a
    /// key this edge could not have sent.
    pub(crate) fn from_wire(limit: LimitId, wire_key: &'a str) -> Option<SlotKey<'a>> {
        if wire_key.len() > MAX_KEY_LEN {
            return None;
        }
        let (prefix, value) = wire_key.split_at_checked(2)?;
        let kind = match prefix.as_bytes() {
            [letter, b':'] => Kind::from_letter(*letter)?,
            _ => return None,
        };
        Some(SlotKey {
            limit,
            kind,
            value: Value::Text(value.as_bytes()),
        })
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The value as stored and sent: the text, or its hash for a long one.
    pub(crate) fn value(&self) -> &[u8] {
        match &self.value {
            Value::Text(text) => text,
            Value::Hashed(hashed) => hashed,
        }
    }

    /// The key as it crosses the wire: `u:42`.
    pub(crate) fn wire(&self) -> String {
        let value = self.value();
        let mut key = String::with_capacity(2 + value.len());
        key.push(char::from(self.kind.letter()));
        key.push(':');
        // Every value starts as a `&str` (or is ASCII hex), so it is valid UTF-8.
        key.push_str(std::str::from_utf8(value).unwrap_or(""));
        key
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A (limit, key) as the map keeps it: 32 bytes, with values of up to [`INLINE`] bytes (user
/// ids, IPv4 and short IPv6 addresses) held in place and longer ones in a box of their own.
#[derive(Debug)]
pub(crate) struct StoredKey {
    limit: LimitId,
    text: Text,
}

/// The longest value a [`StoredKey`] holds without a box.
pub(crate) const INLINE: usize = 21;

#[derive(Debug)]
enum Text {
    Inline {
        kind: Kind,
        len: u8,
        bytes: [u8; INLINE],
    },
    Boxed {
        kind: Kind,
        value: Box<[u8]>,
    },
}

impl StoredKey {
    pub(crate) fn new(key: &SlotKey<'_>) -> StoredKey {
        let value = key.value();
        let text = match u8::try_from(value.len()) {
            Ok(len) if value.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..value.len()].copy_from_slice(value);
                Text::Inline {
                    kind: key.kind,
                    len,
                    bytes,
                }
            }
            _ => Text::Boxed {
                kind: key.kind,
                value: value.into(),
            },
        };
        StoredKey {
            limit: key.limit,
            text,
        }
    }

    /// The stored key as the borrowed form the map hashes and compares.
    pub(crate) fn view(&self) -> SlotKey<'_> {
        let (kind, value) = self.parts();
        SlotKey {
            limit: self.limit,
            kind,
            value: Value::Text(value),
        }
    }

    pub(crate) fn matches(&self, key: &SlotKey<'_>) -> bool {
        let (kind, value) = self.parts();
        self.limit == key.limit && kind == key.kind && value == key.value()
    }

    pub(crate) fn limit(&self) -> LimitId {
        self.limit
    }

    fn parts(&self) -> (Kind, &[u8]) {
        match &self.text {
            Text::Inline { kind, len, bytes } => (*kind, &bytes[..usize::from(*len)]),
            Text::Boxed { kind, value } => (*kind, value),
        }
    }
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
    /// What the rest of the region had counted when the regional last answered (`T` less our
    /// `used` then), for `remaining`. Counts only grow within a window, so of the sync answers
    /// the largest wins whatever order they arrive in; an exact answer's estimate (which also
    /// counts other edges' unused grants as used) replaces it. It never overstates what is
    /// left.
    others: u64,
    /// Cost asked for since the last flush (local or exact): this edge's demand. Saturates;
    /// it only sizes the next grant.
    pub(crate) demand: u32,
    /// The regional stopped granting: exact path until the window turns.
    pub(crate) near_limit: bool,
    /// The regional asked for unused quota back.
    pub(crate) recalled: bool,
    /// `used` or `released` moved since the regional last echoed them: resend until it does.
    dirty: bool,
}

impl Window {
    fn at(index: u64) -> Window {
        Window {
            index,
            granted: 0,
            released: 0,
            used: 0,
            pending: 0,
            others: 0,
            demand: 0,
            near_limit: false,
            recalled: false,
            dirty: false,
        }
    }

    /// What this edge knows is left of `limit`: what the rest of the region had counted when
    /// the regional last answered, plus what this edge has admitted, taken from `limit`.
    pub(crate) fn remaining(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.others.saturating_add(self.used))
    }

    /// Learns `T` from a sync answer, as of our `used` then.
    pub(crate) fn learn_total(&mut self, total: u64, used_then: u64) {
        self.others = self.others.max(total.saturating_sub(used_then));
    }

    /// Learns an estimate of `T` from an exact answer, as of our `used` then. It counts other
    /// edges' unused grants as used, which they may hand back, so it replaces what was known
    /// rather than only raising it; the next sync answer raises it again if it was low.
    pub(crate) fn estimate_total(&mut self, total: u64, used_then: u64) {
        self.others = total.saturating_sub(used_then);
    }

    /// The regional echoed our counts: once the echo covers them, they are synced.
    pub(crate) fn acknowledge(&mut self, used: u64, released: u64) {
        if used >= self.used && released >= self.released {
            self.dirty = false;
        }
    }

    /// Counts the regional has not acknowledged yet.
    pub(crate) fn unsynced(&self) -> bool {
        self.index != NONE && self.dirty
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
        if unused > 0 {
            self.released = self.released.saturating_add(unused);
            self.dirty = true;
        }
        unused
    }

    /// Counts an admission.
    fn admit(&mut self, cost: u64) {
        self.used = self.used.saturating_add(cost);
        self.dirty = true;
    }

    /// Notes demand for the next grant.
    pub(crate) fn ask(&mut self, cost: u64) {
        self.demand = self
            .demand
            .saturating_add(u32::try_from(cost).unwrap_or(u32::MAX));
    }

    /// The demand since the last flush, cleared, as the next grant to ask for (twice the
    /// demand: room for it to grow until the next sync).
    pub(crate) fn take_demand(&mut self) -> u64 {
        u64::from(mem::take(&mut self.demand)).saturating_mul(2)
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

/// Why a key could not decide a request locally: the label of `edge_exact_reasons_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExactReason {
    /// The key is near its limit in this window (above `θ·P`): every decision is exact.
    NearLimit,
    /// No grant in this window, and no cold allowance (a hard or hot key, or spent).
    NoGrant,
    /// The window's grant is used up (or was handed back) and no more has come yet.
    GrantSpent,
    /// The algorithm is decided only at the regional (sliding log, leaky-bucket shaper).
    ExactOnly,
}

impl ExactReason {
    /// Every reason, in the order [`StatsSnapshot::exact_reasons`](crate::StatsSnapshot::exact_reasons)
    /// counts them.
    pub const ALL: [ExactReason; 4] = [
        ExactReason::NearLimit,
        ExactReason::NoGrant,
        ExactReason::GrantSpent,
        ExactReason::ExactOnly,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ExactReason::NearLimit => "near_limit",
            ExactReason::NoGrant => "no_grant",
            ExactReason::GrantSpent => "grant_spent",
            ExactReason::ExactOnly => "exact_only",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Everything one edge knows about one (limit, key).
#[derive(Clone, Debug)]
pub(crate) struct KeyState {
    pub(crate) cur: Window,
    /// The window before `cur`, kept from the turn while it has counts to sync or a grant to
    /// hand back, and dropped once the regional has acknowledged it.
    pub(crate) prev: Option<Box<Window>>,
    /// A cached denial: deny locally until then.
    pub(crate) denied_until: Nanos,
    /// When the key was last used, in milliseconds since the epoch modulo 2³²: it only
    /// measures idleness, which the sync loop acts on within minutes, far inside 49 days.
    last_used: u32,
    /// The window, modulo 2³², in which the regional listed this key as hot (no cold
    /// allowance), or `u32::MAX`. A window 2³² later would read as hot again: at one-second
    /// windows, 136 years on.
    hot_window: u32,
}

const _: () = assert!(size_of::<Window>() == 56);
const _: () = assert!(size_of::<KeyState>() == 80);
const _: () = assert!(size_of::<StoredKey>() == 32);

/// `now` in milliseconds, modulo 2³².
fn stamp(now: Nanos) -> u32 {
    (now.as_u64() / 1_000_000) as u32
}

impl KeyState {
    pub(crate) fn new(now: Nanos) -> KeyState {
        KeyState {
            cur: Window::at(NONE),
            prev: None,
            denied_until: Nanos::ZERO,
            last_used: stamp(now),
            hot_window: u32::MAX,
        }
    }

    /// How long the key has gone unused at `now` (to the millisecond). A use stamped after
    /// `now` (a request that ran while the sync loop walked the map with an earlier `now`)
    /// is no idleness at all, not 49 days of it.
    pub(crate) fn idle_for(&self, now: Nanos) -> Nanos {
        let idle = stamp(now).wrapping_sub(self.last_used);
        if idle > u32::MAX / 2 {
            return Nanos::ZERO;
        }
        Nanos::from_millis(u64::from(idle))
    }

    fn touch(&mut self, now: Nanos) {
        self.last_used = stamp(now);
    }

    /// The regional lists this key as hot in window `w`.
    pub(crate) fn mark_hot(&mut self, w: u64) {
        self.hot_window = w as u32;
    }

    /// The counters for window `w`, rolling the current window over when `w` is newer. The
    /// previous window is kept while it has counts to sync or a grant to hand back; one older
    /// than that is dropped, and the return says how many windows with unsynced counts were
    /// lost that way.
    pub(crate) fn window(&mut self, w: u64) -> (&mut Window, u32) {
        let mut lost = 0;
        if self.cur.index == NONE || w > self.cur.index {
            if self.prev.as_ref().is_some_and(|p| p.unsynced()) {
                lost += 1;
            }
            let old = mem::replace(&mut self.cur, Window::at(w));
            let adjacent = old.index != NONE && old.index + 1 == w;
            self.prev = if adjacent && (old.unsynced() || old.unused() > 0) {
                Some(Box::new(old))
            } else {
                if old.unsynced() {
                    lost += 1;
                }
                None
            };
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
        let hot = self.hot_window == w as u32;
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

    /// Why the current window just answered [`Local::Exact`].
    pub(crate) fn exact_reason(&self) -> ExactReason {
        if self.cur.near_limit {
            ExactReason::NearLimit
        } else if self.cur.granted == 0 {
            ExactReason::NoGrant
        } else {
            ExactReason::GrantSpent
        }
    }

    /// Turns a reservation into an admission.
    pub(crate) fn commit(&mut self, now: Nanos, cost: u64) {
        let win = &mut self.cur;
        win.pending = win.pending.saturating_sub(cost);
        win.admit(cost);
        win.ask(cost);
        self.touch(now);
    }

    /// Drops a reservation: nothing was admitted.
    pub(crate) fn roll_back(&mut self, cost: u64) {
        self.cur.pending = self.cur.pending.saturating_sub(cost);
    }

    /// Records an admission the edge made without a grant (the failure modes `local` and
    /// `open`): counted, synced and replayed like any other, because counters only grow.
    pub(crate) fn admit_unconditionally(&mut self, now: Nanos, w: u64, cost: u64) -> u32 {
        let (win, lost) = self.window(w);
        win.admit(cost);
        self.touch(now);
        lost
    }

    /// Notes demand that went to the exact path, so the next grant is sized for it.
    pub(crate) fn note_demand(&mut self, now: Nanos, w: u64, cost: u64) -> u32 {
        let (win, lost) = self.window(w);
        win.ask(cost);
        self.touch(now);
        lost
    }

    /// What this edge has admitted in window `w` (for the `local` failure mode's `P/n`).
    pub(crate) fn used_in(&mut self, w: u64) -> (u64, u32) {
        let (win, lost) = self.window(w);
        (win.used.saturating_add(win.pending), lost)
    }

    /// What this edge knows is left of `limit` in window `w` ([`Window::remaining`]): the
    /// regional's last word on the rest of the region, plus this edge's own count.
    pub(crate) fn known_left(&mut self, w: u64, limit: u64) -> u64 {
        self.window(w).0.remaining(limit)
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
        } else {
            self.prev.as_deref_mut().filter(|p| p.index == w)
        }
    }

    /// The windows the edge holds, previous first.
    pub(crate) fn windows(&mut self) -> impl Iterator<Item = &mut Window> {
        self.prev
            .as_deref_mut()
            .into_iter()
            .chain(std::iter::once(&mut self.cur))
            .filter(|win| win.index != NONE)
    }

    /// Drops the previous window once the regional has it all and it holds no grant.
    pub(crate) fn forget_settled_prev(&mut self) {
        if self
            .prev
            .as_ref()
            .is_some_and(|p| !p.unsynced() && p.unused() == 0)
        {
            self.prev = None;
        }
    }

    /// Whether anything here still needs to reach the regional.
    pub(crate) fn unsynced(&self) -> bool {
        self.cur.unsynced() || self.prev.as_ref().is_some_and(|p| p.unsynced())
    }

    /// The key's limit changed value (a new rule set, same windows). Its grants and its cached
    /// denial were sized under the old value, so the unused grants are handed back (the next
    /// sync reports them) and the denial is dropped; what it counted stays. Returns the units
    /// handed back.
    pub(crate) fn limit_changed(&mut self) -> u64 {
        self.denied_until = Nanos::ZERO;
        self.windows().map(Window::release_unused).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_keys_separate_kinds_and_round_trip() {
        let a = SlotKey::new(LimitId(7), &Key::UserId("1.2.3.4"));
        let b = SlotKey::new(LimitId(7), &Key::Ip("1.2.3.4"));
        let stored = StoredKey::new(&a);
        assert!(stored.matches(&a) && !stored.matches(&b));
        assert!(!stored.matches(&SlotKey::new(LimitId(8), &Key::UserId("1.2.3.4"))));
        assert_eq!(
            (a.wire(), stored.view().wire()),
            ("u:1.2.3.4".into(), "u:1.2.3.4".into())
        );
        let back = SlotKey::from_wire(LimitId(7), "u:1.2.3.4").unwrap();
        assert!(stored.matches(&back));
        assert!(stored.matches(&stored.view()));
        for bad in ["", "u", "u1.2.3.4", "x:1", "ü:1"] {
            assert!(SlotKey::from_wire(LimitId(7), bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn values_longer_than_the_inline_room_are_boxed_and_still_match() {
        for len in [0, 1, INLINE - 1, INLINE, INLINE + 1, 200] {
            let value = "v".repeat(len);
            let key = SlotKey::new(LimitId(3), &Key::ApiKey(&value));
            let stored = StoredKey::new(&key);
            assert!(stored.matches(&key), "{len}");
            assert_eq!(stored.view().wire(), format!("k:{value}"));
            let other = "w".repeat(len.max(1));
            assert!(!stored.matches(&SlotKey::new(LimitId(3), &Key::ApiKey(&other))));
        }
    }

    #[test]
    fn long_values_are_hashed_to_fit_the_wire() {
        let long = "x".repeat(1000);
        let k = SlotKey::new(LimitId(1), &Key::Header(&long));
        let wire = k.wire();
        assert!(
            wire.len() <= MAX_KEY_LEN && wire.starts_with("h:#"),
            "{wire}"
        );
        let other = "y".repeat(1000);
        assert_ne!(wire, SlotKey::new(LimitId(1), &Key::Header(&other)).wire());
        // What comes back on the wire finds the same slot.
        let stored = StoredKey::new(&k);
        assert!(stored.matches(&SlotKey::from_wire(LimitId(1), &wire).unwrap()));
    }

    #[test]
    fn idleness_is_measured_across_the_millisecond_stamps_wrap() {
        // 2³² ms after the epoch the stamp wraps to 0; a key used just before is 3 ms idle
        // just after.
        let wrap = Nanos::from_millis(1 << 32);
        let s = KeyState::new(wrap - Nanos::from_millis(1));
        assert_eq!(
            s.idle_for(wrap + Nanos::from_millis(2)),
            Nanos::from_millis(3)
        );
    }

    #[test]
    fn reserve_respects_the_grant_and_the_cold_allowance() {
        let mut s = KeyState::new(Nanos::ZERO);
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
        let mut h = KeyState::new(Nanos::ZERO);
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
        let mut s = KeyState::new(Nanos::ZERO);
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
        let mut h = KeyState::new(Nanos::ZERO);
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
        let mut s = KeyState::new(Nanos::ZERO);
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
        let mut s = KeyState::new(Nanos::ZERO);
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
    fn the_previous_window_lasts_until_the_regional_has_it_all() {
        let mut s = KeyState::new(Nanos::ZERO);
        s.admit_unconditionally(Nanos::ZERO, 5, 3);
        s.window(6);
        assert!(s.prev.is_some());
        s.forget_settled_prev();
        assert!(s.prev.is_some(), "3 unsynced");
        s.slot(5).unwrap().acknowledge(2, 0);
        s.forget_settled_prev();
        assert!(s.prev.is_some(), "an older echo covers only 2");
        s.slot(5).unwrap().acknowledge(3, 0);
        s.forget_settled_prev();
        assert!(s.prev.is_none() && !s.unsynced());
        // A grant left at the turn keeps the window until it is handed back and acknowledged.
        s.raise_granted(6, 10);
        s.window(7);
        assert_eq!(s.prev.as_ref().map(|p| p.unused()), Some(10));
        assert_eq!(s.slot(6).unwrap().release_unused(), 10);
        s.slot(6).unwrap().acknowledge(0, 10);
        s.forget_settled_prev();
        assert!(s.prev.is_none());
        // A window that turns with nothing to sync and nothing granted leaves nothing behind.
        s.window(8);
        assert!(s.prev.is_none());
    }

    #[test]
    fn the_previous_window_is_kept_until_synced_and_older_ones_are_counted_lost() {
        let mut s = KeyState::new(Nanos::ZERO);
        s.admit_unconditionally(Nanos::ZERO, 5, 3);
        assert_eq!(s.window(6).1, 0);
        assert_eq!(s.prev.as_ref().map(|p| p.index), Some(5));
        assert!(s.unsynced());
        // Skipping a window: both 5 (unsynced) and 6 (empty) go; one window's counts lost.
        assert_eq!(s.window(8).1, 1);
    }
}

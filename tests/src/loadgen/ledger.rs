//! Accuracy: what the edges admitted per (limit, key, window), against the limit.
//!
//! Every answer is booked under each limit its request met ([`Entry::matches`]): an allowed
//! request was admitted by all of them; a denied one was offered only to the limit that
//! answered it (the edge names its rule and limit), since nothing is consumed from the others
//! when one denies (DESIGN §2).
//!
//! # Which window a request fell in
//!
//! The edge decided somewhere between our send and our receipt, by the same wall clock we read
//! (one machine; across machines, their skew adds to this). Windows are aligned to the epoch
//! (DESIGN §9), so when both instants fall in one window, that is the window. A request whose
//! send and receipt straddle a boundary is *unattributed*: counted in no window for overshoot,
//! and in every window it may belong to for shortfall, so that neither figure is ever
//! overstated. The share of such requests is about latency / window.
//!
//! The answer's `reset_at` would seem to name the window, but it cannot be trusted for exactly
//! these requests. On the exact path the edge answers with the end of the window its own clock
//! was in when the request arrived, while the regional counts the check in the window of its
//! clock when the check reaches it (DESIGN §9). We have seen a straddling request answered with
//! the old window's end and `remaining: 2` of 3, the next two answers counting down in the new
//! window: booked by `reset_at`, the old window looked four-for-three when the system had kept
//! three in each.
//!
//! # Overshoot and shortfall, per algorithm
//!
//! - `fixed_window`: per key and window, overshoot is `admitted − limit` when positive;
//!   shortfall is `limit − admitted` when we offered at least `limit` (admitted plus denied by
//!   this limit) yet fewer were admitted: a false reject.
//! - `sliding_window` and `sliding_log`: the same count per epoch-aligned window. An aligned
//!   window is one of the windows a sliding limit bounds (the counter's estimate weighs the
//!   previous window in, never out), so an overshoot found is real, but one straddling two
//!   aligned windows is not seen: a lower bound.
//! - `sliding_window` shortfall: a denial leaves the counter's estimate short of the limit when
//!   the previous window's carry plus this window's count leave room. For the window's latest
//!   denial by this limit, the room is `limit − carried(prev, e) − cur`, taken at its send time
//!   `e` (the earliest it can have been decided: the largest carry) with every admission of
//!   both windows counted, the unattributed ones too (the most they can be), so it never
//!   overstates; the shared `carried` rounds as the stores do. `sliding_log`: `n/a`.
//! - `token_bucket` and `leaky_bucket`: per key over the whole run, at most `burst` (capacity)
//!   plus one per emission (drain) interval of the span from the first admitted request's send
//!   to the last one's receipt can be admitted; overshoot is what exceeds that. The span is
//!   wider than the edges' decision times, so this too is a lower bound. Shortfall is `n/a`.
//!
//! Soft rules may overshoot by design, up to `n·c0` per window (DESIGN §4); shadow rules deny
//! nothing. Both are reported like the rest; only a hard rule's overshoot is a bug.

use std::collections::HashMap;

use serde::Serialize;
use shared::{
    Nanos, Strictness,
    algorithm::Limiter,
    quota::{carried, carry_weight_ppm},
};

use super::mix::{Entry, KeyField, Mix, TrackedLimit};

/// One answered check, as the ledger needs it.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    /// When we started sending, nanoseconds since the epoch.
    pub sent: u64,
    /// When the answer was read.
    pub received: u64,
    /// `200` (true) or `429`.
    pub allowed: bool,
    /// The rule that answered.
    pub rule: Option<&'a str>,
    /// That rule's limit, as answered.
    pub limit: u64,
}

/// Counts per (limit, key, window); one per worker, merged at the end.
#[derive(Debug, Default)]
pub struct Ledger {
    windows: HashMap<WindowKey, Tally>,
    spans: HashMap<SpanKey, Span>,
    totals: Vec<Totals>,
}

/// Limit index, key, window index.
type WindowKey = (u32, KeyField, u32, u64);
/// Limit index, key.
type SpanKey = (u32, KeyField, u32);

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// Admitted, surely in this window.
    admitted: u64,
    /// Admitted, possibly in this window (unattributed).
    maybe: u64,
    /// Admitted or denied by this limit, surely in this window.
    offered: u64,
    /// When the latest denial by this limit surely in this window was sent (0: none).
    latest_denial: u64,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    first_sent: u64,
    last_received: u64,
    admitted: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    met: u64,
    admitted: u64,
    denied: u64,
    unattributed: u64,
}

/// The most windows an unattributed request is booked as "maybe" in.
const MAX_MAYBE_WINDOWS: u64 = 4;

impl Ledger {
    /// Books `answer` to a request of `entry` for key rank `rank`.
    pub fn record(&mut self, mix: &Mix, entry: &Entry, rank: u32, answer: &Answer<'_>) {
        if self.totals.len() < mix.limits.len() {
            self.totals.resize(mix.limits.len(), Totals::default());
        }
        let answering = answering(mix, entry, answer);
        for (i, &(li, field)) in entry.matches.iter().enumerate() {
            // Every rank shares a `global` limit's one key.
            let rank = if field == KeyField::Global { 0 } else { rank };
            let totals = &mut self.totals[li];
            totals.met += 1;
            let answered = answering == Some(i);
            if !answer.allowed && !answered {
                continue; // Denied by another limit: nothing was asked of this one.
            }
            if answer.allowed {
                totals.admitted += 1;
            } else {
                totals.denied += 1;
            }
            let limit = &mix.limits[li];
            let li = u32::try_from(li).unwrap_or(u32::MAX);
            match window_of(&limit.limiter) {
                Some(w) => {
                    let (lo, hi) = (answer.sent / w, answer.received / w);
                    if lo == hi {
                        let t = self.windows.entry((li, field, rank, lo)).or_default();
                        t.offered += 1;
                        t.admitted += u64::from(answer.allowed);
                        if !answer.allowed {
                            t.latest_denial = t.latest_denial.max(answer.sent);
                        }
                    } else {
                        totals.unattributed += 1;
                        if answer.allowed {
                            for idx in lo..=hi.min(lo + MAX_MAYBE_WINDOWS - 1) {
                                self.windows
                                    .entry((li, field, rank, idx))
                                    .or_default()
                                    .maybe += 1;
                            }
                        }
                    }
                }
                None if answer.allowed => {
                    let span = self.spans.entry((li, field, rank)).or_insert(Span {
                        first_sent: answer.sent,
                        last_received: answer.received,
                        admitted: 0,
                    });
                    span.first_sent = span.first_sent.min(answer.sent);
                    span.last_received = span.last_received.max(answer.received);
                    span.admitted += 1;
                }
                None => {}
            }
        }
    }

    /// The room the latest denial in sliding window `(li, field, rank, idx)` of length `w`
    /// left under `limit`, at most (see the module doc); `None` without a denial.
    fn sliding_room(
        &self,
        (li, field, rank, idx): WindowKey,
        t: &Tally,
        limit: u64,
        w: u64,
    ) -> Option<u64> {
        if t.latest_denial == 0 {
            return None;
        }
        let previous = idx
            .checked_sub(1)
            .and_then(|p| self.windows.get(&(li, field, rank, p)))
            .map_or(0, |p| p.admitted + p.maybe);
        let elapsed = t.latest_denial.saturating_sub(idx.saturating_mul(w));
        let carry = carried(previous, carry_weight_ppm(Nanos(w), Nanos(elapsed)));
        Some(limit.saturating_sub(carry + t.admitted + t.maybe))
    }

    /// Adds `other`'s counts to this one's.
    pub fn merge(&mut self, other: Ledger) {
        for (k, t) in other.windows {
            let mine = self.windows.entry(k).or_default();
            mine.admitted += t.admitted;
            mine.maybe += t.maybe;
            mine.offered += t.offered;
            mine.latest_denial = mine.latest_denial.max(t.latest_denial);
        }
        for (k, s) in other.spans {
            self.spans
                .entry(k)
                .and_modify(|mine| {
                    mine.first_sent = mine.first_sent.min(s.first_sent);
                    mine.last_received = mine.last_received.max(s.last_received);
                    mine.admitted += s.admitted;
                })
                .or_insert(s);
        }
        if self.totals.len() < other.totals.len() {
            self.totals.resize(other.totals.len(), Totals::default());
        }
        for (mine, t) in self.totals.iter_mut().zip(other.totals) {
            mine.met += t.met;
            mine.admitted += t.admitted;
            mine.denied += t.denied;
            mine.unattributed += t.unattributed;
        }
    }

    /// Per limit, admitted against the limit; and the worst windows, at most `worst` of them.
    pub fn report(&self, mix: &Mix, worst: usize) -> (Vec<LimitReport>, Vec<WindowReport>) {
        let mut limits: Vec<LimitReport> = mix
            .limits
            .iter()
            .enumerate()
            .map(|(i, l)| LimitReport::new(l, self.totals.get(i).copied().unwrap_or_default()))
            .collect();
        let mut offenders = Vec::new();
        let mut keys: Vec<std::collections::HashSet<(KeyField, u32)>> =
            vec![Default::default(); limits.len()];
        for (&(li, field, rank, idx), t) in &self.windows {
            let (Some(report), Some(tracked)) =
                (limits.get_mut(li as usize), mix.limits.get(li as usize))
            else {
                continue;
            };
            keys[li as usize].insert((field, rank));
            let limit = report.limit;
            report.windows += 1;
            report.exhausted_windows += u64::from(t.admitted >= limit);
            let over = t.admitted.saturating_sub(limit);
            let under = match &tracked.limiter {
                Limiter::SlidingWindow(w) => {
                    let length = w.window().as_u64().max(1);
                    self.sliding_room((li, field, rank, idx), t, limit, length)
                }
                _ => (t.offered >= limit).then(|| limit.saturating_sub(t.admitted + t.maybe)),
            }
            .filter(|&u| u > 0);
            if over > 0 {
                report.overshoot_windows += 1;
                report.overshoot += over;
                report.max_overshoot = report.max_overshoot.max(over);
            }
            if let (Some(under), Some(windows), Some(total)) = (
                under,
                report.shortfall_windows.as_mut(),
                report.shortfall.as_mut(),
            ) {
                *windows += 1;
                *total += under;
            }
            let shortfall_counts = report.shortfall.is_some();
            if over > 0 || (shortfall_counts && under.is_some()) {
                let w = window_of(&tracked.limiter).unwrap_or(1);
                offenders.push(WindowReport {
                    rule: tracked.rule.clone(),
                    limit_name: tracked.name.clone(),
                    key: mix.key_text(field, rank),
                    window_start_unix_ms: Some(idx.saturating_mul(w) / 1_000_000),
                    offered: Some(t.offered),
                    admitted: t.admitted,
                    bound: limit,
                    overshoot: over,
                    shortfall: if over > 0 { 0 } else { under.unwrap_or(0) },
                });
            }
        }
        for (&(li, field, rank), span) in &self.spans {
            let (Some(report), Some(tracked)) =
                (limits.get_mut(li as usize), mix.limits.get(li as usize))
            else {
                continue;
            };
            keys[li as usize].insert((field, rank));
            report.windows += 1;
            let bound = bucket_bound(&tracked.limiter, span.last_received - span.first_sent);
            report.exhausted_windows += u64::from(span.admitted >= report.limit);
            let over = span.admitted.saturating_sub(bound);
            if over > 0 {
                report.overshoot_windows += 1;
                report.overshoot += over;
                report.max_overshoot = report.max_overshoot.max(over);
                offenders.push(WindowReport {
                    rule: tracked.rule.clone(),
                    limit_name: tracked.name.clone(),
                    key: mix.key_text(field, rank),
                    window_start_unix_ms: None,
                    offered: None,
                    admitted: span.admitted,
                    bound,
                    overshoot: over,
                    shortfall: 0,
                });
            }
        }
        for (report, keys) in limits.iter_mut().zip(keys) {
            report.keys = keys.len() as u64;
        }
        offenders.sort_by(|a, b| {
            (b.overshoot, b.shortfall, &a.rule, &a.key).cmp(&(
                a.overshoot,
                a.shortfall,
                &b.rule,
                &b.key,
            ))
        });
        offenders.truncate(worst);
        (limits, offenders)
    }
}

/// Admitted against the limit, for one limit.
#[derive(Clone, Debug, Serialize)]
pub struct LimitReport {
    /// The rule's id.
    pub rule: String,
    /// The limit's name.
    pub limit_name: String,
    /// `fixed_window`, `sliding_window`, `sliding_log`, `token_bucket`, `leaky_bucket`.
    pub algorithm: &'static str,
    /// The limit per window, or the bucket's burst (capacity).
    pub limit: u64,
    /// The window, or the bucket's time from empty to full, in milliseconds.
    pub window_ms: u64,
    /// `hard` or `soft`.
    pub strictness: &'static str,
    /// A shadow rule: it denies nothing.
    pub shadow: bool,
    /// How overshoot is computed: `per-window`, `aligned-windows` (a lower bound) or
    /// `bucket-span` (a lower bound); see the module doc.
    pub method: &'static str,
    /// Requests that met this limit.
    pub met: u64,
    /// Of those, admitted.
    pub admitted: u64,
    /// Denied by this limit.
    pub denied: u64,
    /// Straddling a window boundary: in no window for overshoot (see the module doc).
    pub unattributed: u64,
    /// Distinct keys seen.
    pub keys: u64,
    /// (key, window) pairs seen; for buckets, keys.
    pub windows: u64,
    /// Windows in which the whole limit was admitted.
    pub exhausted_windows: u64,
    /// Windows admitting more than the limit.
    pub overshoot_windows: u64,
    /// Admitted above the limit, summed over windows.
    pub overshoot: u64,
    /// The largest overshoot in one window.
    pub max_overshoot: u64,
    /// Windows where at least the limit was offered and less admitted; `None`: not computed
    /// for this algorithm.
    pub shortfall_windows: Option<u64>,
    /// What those windows fell short by, summed; `None`: not computed.
    pub shortfall: Option<u64>,
}

impl LimitReport {
    fn new(l: &TrackedLimit, t: Totals) -> LimitReport {
        let (algorithm, method, shortfall) = match &l.limiter {
            Limiter::FixedWindow(_) => ("fixed_window", "per-window", Some(0)),
            Limiter::SlidingWindow(_) => ("sliding_window", "aligned-windows", Some(0)),
            Limiter::SlidingLog(_) => ("sliding_log", "aligned-windows", None),
            Limiter::TokenBucket(_) => ("token_bucket", "bucket-span", None),
            Limiter::LeakyBucket(_) => ("leaky_bucket", "bucket-span", None),
        };
        LimitReport {
            rule: l.rule.clone(),
            limit_name: l.name.clone(),
            algorithm,
            limit: l.limiter.limit(),
            window_ms: l.limiter.window().as_u64() / 1_000_000,
            strictness: match l.strictness {
                Strictness::Hard => "hard",
                Strictness::Soft => "soft",
            },
            shadow: l.shadow,
            method,
            met: t.met,
            admitted: t.admitted,
            denied: t.denied,
            unattributed: t.unattributed,
            keys: 0,
            windows: 0,
            exhausted_windows: 0,
            overshoot_windows: 0,
            overshoot: 0,
            max_overshoot: 0,
            shortfall_windows: shortfall,
            shortfall,
        }
    }
}

/// One (limit, key, window) that admitted more than its limit, or fell short of it.
#[derive(Clone, Debug, Serialize)]
pub struct WindowReport {
    /// The rule's id.
    pub rule: String,
    /// The limit's name.
    pub limit_name: String,
    /// The key, as the edge sees it.
    pub key: String,
    /// The window's start; `None` for a bucket (the whole run).
    pub window_start_unix_ms: Option<u64>,
    /// Offered to the limit in the window; `None` for a bucket.
    pub offered: Option<u64>,
    /// Admitted.
    pub admitted: u64,
    /// The limit, or for a bucket the most its span allows.
    pub bound: u64,
    /// Admitted above the bound.
    pub overshoot: u64,
    /// Below the limit although it was offered.
    pub shortfall: u64,
}

/// Which of `entry`'s matches answered: the rule named, with the limit named when the rule has
/// several.
fn answering(mix: &Mix, entry: &Entry, answer: &Answer<'_>) -> Option<usize> {
    let rule = answer.rule?;
    let of_rule = |&(_, &(li, _)): &(usize, &(usize, KeyField))| mix.limits[li].rule == rule;
    let mut candidates = entry.matches.iter().enumerate().filter(of_rule);
    let first = candidates.next()?;
    if mix.limits[first.1.0].limiter.limit() == answer.limit {
        return Some(first.0);
    }
    candidates
        .find(|&(_, &(li, _))| mix.limits[li].limiter.limit() == answer.limit)
        .map_or(Some(first.0), |(i, _)| Some(i))
}

/// The window length in nanoseconds, for the window algorithms.
fn window_of(limiter: &Limiter) -> Option<u64> {
    match limiter {
        Limiter::FixedWindow(_) | Limiter::SlidingWindow(_) | Limiter::SlidingLog(_) => {
            Some(limiter.window().as_u64().max(1))
        }
        Limiter::TokenBucket(_) | Limiter::LeakyBucket(_) => None,
    }
}

/// The most a bucket can admit over `span` nanoseconds: its burst, plus one per interval.
fn bucket_bound(limiter: &Limiter, span: u64) -> u64 {
    let interval = match limiter {
        Limiter::TokenBucket(g) => g.emission_interval().as_u64(),
        Limiter::LeakyBucket(b) => b.drain_interval().as_u64(),
        _ => return limiter.limit(),
    };
    limiter.limit() + span / interval.max(1)
}

#[cfg(test)]
mod tests {
    use shared::RuleSet;

    use super::*;

    const RULES: &str = r#"
rate_limits:
  endpoints:
    - { id: login, path: "/login", method: POST, limit: 2, window: 1s, key: ip, algorithm: fixed_window, strictness: hard }
    - { id: all, path: "/login", method: POST, limit: 100, window: 1m, key: global }
    - { id: api, path: "/api", algorithm: token_bucket, rate: 10/s, burst: 2, key: ip }
    - { id: slide, path: "/slide", limit: 2, window: 1s, key: ip }
"#;

    const S: u64 = 1_000_000_000;

    fn answer(at: u64, allowed: bool, rule: &str, limit: u64) -> Answer<'_> {
        Answer {
            sent: at,
            received: at + 1_000_000,
            allowed,
            rule: Some(rule),
            limit,
        }
    }

    #[test]
    fn counts_overshoot_and_shortfall_per_window() {
        let rules = RuleSet::from_yaml("r.yaml", RULES).unwrap();
        let mix = Mix::new(&rules, &[], 1).unwrap();
        let login = &mix.entries[0];
        let t0 = 1_700_000_000 * S;
        let mut ledger = Ledger::default();
        // Window 0 of key 0: three admitted, one too many.
        for i in 0..3 {
            ledger.record(&mix, login, 0, &answer(t0 + i * 1000, true, "login", 2));
        }
        // Window 1 of key 0: one admitted, then two denied by login: one short.
        ledger.record(&mix, login, 0, &answer(t0 + S, true, "login", 2));
        for _ in 0..2 {
            ledger.record(&mix, login, 0, &answer(t0 + S + 5, false, "login", 2));
        }
        // Key 1, denied by `all`: not offered to login.
        ledger.record(&mix, login, 1, &answer(t0, false, "all", 100));
        // Key 2: straddles a boundary: unattributed, in neither window for overshoot.
        ledger.record(&mix, login, 2, &answer(t0 + 2 * S - 10, true, "login", 2));
        // Key 3: straddles, answered by `all`: unattributed for login.
        ledger.record(&mix, login, 3, &answer(t0 + 2 * S - 10, true, "all", 100));

        let mut other = Ledger::default();
        std::mem::swap(&mut other, &mut ledger);
        ledger.merge(other);
        let (limits, worst) = ledger.report(&mix, 10);
        let l = &limits[0];
        assert_eq!(
            (l.rule.as_str(), l.algorithm, l.limit),
            ("login", "fixed_window", 2)
        );
        assert_eq!((l.met, l.admitted, l.denied, l.unattributed), (9, 6, 2, 2));
        assert_eq!(
            (l.overshoot_windows, l.overshoot, l.max_overshoot),
            (1, 1, 1)
        );
        assert_eq!((l.shortfall_windows, l.shortfall), (Some(1), Some(1)));
        assert_eq!(l.keys, 3, "key 0, and keys 2 and 3 as maybe");
        assert_eq!(l.exhausted_windows, 1);
        assert_eq!(worst[0].overshoot, 1);
        assert_eq!(worst[0].window_start_unix_ms, Some(t0 / 1_000_000));
        assert_eq!((worst[1].rule.as_str(), worst[1].shortfall), ("all", 94));
        assert_eq!((worst[2].rule.as_str(), worst[2].shortfall), ("login", 1));
        let all = &limits[1];
        assert_eq!(
            (all.algorithm, all.method),
            ("sliding_window", "aligned-windows")
        );
        assert_eq!((all.admitted, all.denied, all.overshoot), (6, 1, 0));
        assert_eq!(
            (all.shortfall_windows, all.shortfall),
            (Some(1), Some(94)),
            "denied with 6 of 100 admitted and nothing carried"
        );
    }

    #[test]
    fn a_sliding_denial_is_short_only_when_the_carry_left_room() {
        let rules = RuleSet::from_yaml("r.yaml", RULES).unwrap();
        let mix = Mix::new(&rules, &["slide=1".parse().unwrap()], 1).unwrap();
        let slide = &mix.entries[0];
        let t0 = 1_700_000_000 * S;
        let mut ledger = Ledger::default();
        for i in 0..2 {
            ledger.record(&mix, slide, 0, &answer(t0 + i * 1000, true, "slide", 2));
        }
        // A quarter into the next window both still carry (⌈2 · 0.75⌉ = 2): a true denial.
        ledger.record(&mix, slide, 0, &answer(t0 + S + S / 4, false, "slide", 2));
        let (limits, _) = ledger.report(&mix, 10);
        assert_eq!(limits[0].algorithm, "sliding_window");
        assert_eq!(limits[0].shortfall, Some(0));
        // At 0.6 only ⌈2 · 0.4⌉ = 1 carries: denying left one unit unused.
        ledger.record(
            &mix,
            slide,
            0,
            &answer(t0 + S + S * 6 / 10, false, "slide", 2),
        );
        let (limits, worst) = ledger.report(&mix, 10);
        assert_eq!(
            (limits[0].shortfall_windows, limits[0].shortfall),
            (Some(1), Some(1))
        );
        assert_eq!((worst[0].shortfall, worst[0].admitted), (1, 0));
    }

    #[test]
    fn a_bucket_may_admit_its_burst_and_its_rate() {
        let rules = RuleSet::from_yaml("r.yaml", RULES).unwrap();
        let mix = Mix::new(&rules, &["api=1".parse().unwrap()], 1).unwrap();
        let api = &mix.entries[0];
        let t0 = 1_700_000_000 * S;
        let mut ledger = Ledger::default();
        // Over 1 s: burst 2 + 10 = 12 at most.
        let admit = |at: u64, ledger: &mut Ledger| {
            let mut a = answer(at, true, "api", 2);
            a.received = a.sent;
            ledger.record(&mix, api, 0, &a);
        };
        for _ in 0..11 {
            admit(t0, &mut ledger);
        }
        admit(t0 + S, &mut ledger);
        let (limits, _) = ledger.report(&mix, 10);
        assert_eq!(
            (limits[0].algorithm, limits[0].overshoot),
            ("token_bucket", 0)
        );
        // A 13th in the same second is one too many.
        admit(t0 + S / 2, &mut ledger);
        let (limits, worst) = ledger.report(&mix, 10);
        assert_eq!(limits[0].overshoot, 1, "{limits:?} {worst:?}");
    }
}

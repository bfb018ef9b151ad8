//! The rule model (DESIGN §2): the operators' YAML, parsed once into a [`RuleSet`] that cannot
//! hold an invalid rule, and the matching of a request to the limits that apply.
//!
//! # Layout
//!
//! - `raw`: the serde mirror of the YAML (`deny_unknown_fields`), text left uninterpreted.
//! - `parse`: raw → typed. Durations, rates, path patterns, methods and key kinds are parsed
//!   here, once; every refusal is a located [`ConfigError`] (`error`).
//! - this file: the typed model — [`RuleSet`], [`Rule`], [`Selector`], [`KeyKind`], [`Limit`],
//!   [`LimitId`], [`Strictness`], [`FailureMode`] — which the runtime reads and never re-checks.
//! - `pattern`: [`PathPattern`] and how a request path is split into segments.
//! - `matcher`: the [`Request`] view, [`Match`], [`Key`], and the path trie.
//!
//! # How a request flows
//!
//! At load (or when the coordinator pushes a new version down the tree), `RuleSet::from_yaml`
//! runs YAML → `raw` → `parse` → `RuleSet`, or refuses the whole file. Per request, the tier
//! builds a borrowed [`Request`] and calls [`RuleSet::matches`] with a reusable buffer: the trie
//! finds the endpoint rules whose pattern fits the path, the method filters them, the request's
//! tier picks per-tier overrides, `default` is added when no endpoint matched and the tier's own
//! limits are added when the request has a tier. Each [`Match`] names a [`Limit`] (its
//! [`LimitId`] and its [`algorithm::Limiter`](crate::algorithm::Limiter)) and the [`Key`] to count
//! under. The caller checks every match and consumes from all of them only when all allow.
//!
//! # What the YAML means
//!
//! - `endpoints`: each entry selects requests by path pattern (see [`PathPattern`]) and, when
//!   given, method; every matching entry applies, not just the most specific. It counts by
//!   `key` (default `user_id`) with one `algorithm` (default `sliding_window`): `limit` and
//!   `window` for the window algorithms, `rate` and `burst` (default: the rate's count) for
//!   `token_bucket` and `leaky_bucket` (whose `mode` is `meter` by default, or `shaper`).
//!   Durations are `<n>ms|s|m|h|d`; rates are `N/s|m|h|d` or `N/<duration>`.
//! - `tiers` on an endpoint: for requests of that tier, a different limit (window algorithms)
//!   or rate (buckets) replaces the rule's own, counted under its own [`LimitId`]. An explicit
//!   `burst` belongs to the rule and applies to every tier; without one, each tier's burst is
//!   its own rate's count. Only tiers declared under `rate_limits.tiers` may be named.
//! - `default`: requests no endpoint selected (by path and method), keyed by user id, else IP.
//! - `rate_limits.tiers`: limits added to every request of that tier, keyed by user id, else
//!   IP. A tier may be declared empty (`pro:`), only for endpoint overrides to name.
//! - Two endpoints with the same method, path shape and key are refused as duplicates, unless
//!   both carry an `id`: then they are two deliberate limits on one endpoint, and both apply.
//!
//! # Example
//!
//! ```
//! use shared::rules::{Key, Request, RuleSet};
//!
//! let rules = RuleSet::from_yaml("rules.yaml", r#"
//! rate_limits:
//!   default: { requests_per_minute: 60 }
//!   endpoints:
//!     - { path: "/api/login", method: POST, limit: 5, window: 1m, key: ip }
//! "#)?;
//!
//! let mut out = Vec::with_capacity(8);
//! let req = Request { ip: Some("203.0.113.7"), ..Request::new("POST", "/api/login") };
//! rules.matches(&req, &mut out);
//! assert_eq!(out.len(), 1);
//! assert_eq!(out[0].rule.id(), "POST /api/login key=ip");
//! assert_eq!(out[0].key, Key::Ip("203.0.113.7"));
//! # Ok::<(), shared::rules::ConfigError>(())
//! ```

use std::{collections::HashMap, fmt};

use serde::{Deserialize, Serialize};

use crate::algorithm::Limiter;

mod error;
mod matcher;
mod parse;
mod pattern;
mod raw;

pub use self::{
    error::ConfigError,
    matcher::{Key, Match, Request, recycle},
    pattern::{MAX_PATTERN_SEGMENTS, PathPattern, Segment},
};

/// A validated, versioned set of rules: the only way to make one is [`RuleSet::from_yaml`], so
/// holding a `RuleSet` means holding rules that passed every check in `parse`.
///
/// Rules are kept in a fixed order: the endpoints in file order, then `default`, then the tiers
/// in file order. The source text travels with the set ([`RuleSet::source`]) so the coordinator
/// can push it down the tree as YAML and every tier re-validates it with the same code.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// The file name given at load, kept for error messages when the source is re-validated.
    file: String,
    /// The YAML this set was parsed from, verbatim.
    source: String,
    version: u64,
    rules: Vec<Rule>,
    /// Declared tier names in file order, including tiers declared without limits of their own.
    tiers: Vec<String>,
    /// `LimitId` → where the limit lives, for the regional, which receives bare ids on the wire.
    by_limit: HashMap<LimitId, LimitSlot>,
    /// Rule id → index into `rules`, for the admin API's `DELETE /rate-limits/{id}`.
    by_id: HashMap<String, usize>,
    /// The path trie and the default/tier lookups, built once from `rules`.
    matcher: matcher::Matcher,
}

impl RuleSet {
    /// Parses and validates a rules file. `file` names it in error messages, and is kept
    /// ([`RuleSet::file`]) for when the source is re-validated elsewhere.
    ///
    /// Accepts the seed's short form (`default` and `tiers` with `requests_per_second`,
    /// `_minute`, `_hour`, `_day`) and the full per-endpoint form of DESIGN §2, plus an optional
    /// top-level `version: N` (default 0).
    ///
    /// # Errors
    ///
    /// The first problem found, located: a YAML syntax error by line and column, anything else
    /// by field path (`rate_limits.endpoints[1].window`). Nothing of a refused file is kept.
    pub fn from_yaml(file: &str, yaml: &str) -> Result<RuleSet, ConfigError> {
        parse::rule_set(file, yaml)
    }

    /// The version: the file's `version:` unless the coordinator stamped another one.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The same rules under version `version`. The coordinator stamps each set it accepts; the
    /// source text is left as it was, so a `version:` inside it may disagree with the stamp,
    /// and the stamp wins. A tier that re-validates the text stamps it again with the version
    /// that came beside it on the wire.
    pub fn with_version(mut self, version: u64) -> RuleSet {
        self.version = version;
        self
    }

    /// The YAML this set was parsed from, byte for byte.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file name given to [`RuleSet::from_yaml`].
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Every rule: endpoints in file order, then `default`, then the tiers in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule with this id (an endpoint's `id:` or derived name, `default`, `tiers.<name>`).
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.by_id.get(id).and_then(|&i| self.rules.get(i))
    }

    /// The tiers declared under `rate_limits.tiers`, in file order.
    pub fn tiers(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(String::as_str)
    }

    /// The limit with this id and the rule it belongs to; `None` for an id this version does
    /// not know (a stale id from a peer on another version).
    pub fn limit(&self, id: LimitId) -> Option<(&Rule, &Limit)> {
        self.by_limit.get(&id)?.resolve(&self.rules)
    }

    /// Every limit of every rule, base limits and per-tier overrides.
    pub fn limits(&self) -> impl Iterator<Item = (&Rule, &Limit)> {
        self.rules
            .iter()
            .flat_map(|r| r.limits.iter().chain(&r.overrides).map(move |l| (r, l)))
    }

    /// Fills `out` with every limit that applies to `req`, each with the key to count it under.
    ///
    /// `out` is cleared first. Matches come in rule order: endpoint rules (file order), then
    /// `default` (only when no endpoint rule's path and method matched), then the request
    /// tier's limits. Once `out` has room for them, this does not allocate: keys borrow from
    /// `req`, limits from `self`. To keep one buffer across requests whose data does not live
    /// as long, pass it through [`recycle`] between calls.
    ///
    /// A rule whose key the request cannot provide falls back to the IP; with no IP either,
    /// that rule does not apply (see [`KeyKind`]).
    pub fn matches<'a>(&'a self, req: &Request<'a>, out: &mut Vec<Match<'a>>) {
        self.matcher.matches(&self.rules, req, out);
    }
}

/// One rule: which requests it selects, what it counts them by, and its limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The endpoint's `id:`, or a name derived from its selector (`POST /api/login key=ip`),
    /// `default`, or `tiers.<name>`. Part of every limit's name, hence of its [`LimitId`].
    id: String,
    selector: Selector,
    key: KeyKind,
    /// One or more limits, all of which apply (`requests_per_minute` and `_hour` are two).
    limits: Vec<Limit>,
    /// Per-tier replacements of the limit, each with its tier and its own `LimitId`.
    overrides: Vec<Limit>,
    strictness: Strictness,
    on_failure: FailureMode,
    shadow: bool,
}

impl Rule {
    /// The rule's name: its `id:`, or `METHOD path key=kind` (`*` for any method), `default`,
    /// or `tiers.<name>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Which requests the rule selects.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// What the rule counts requests by.
    pub fn key(&self) -> &KeyKind {
        &self.key
    }

    /// The rule's own limits; never empty. All apply unless the request's tier overrides them.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// Per-tier overrides: each replaces [`Rule::limits`] for requests of its tier.
    pub fn overrides(&self) -> &[Limit] {
        &self.overrides
    }

    /// The override for `tier`, if the rule has one.
    pub fn override_for(&self, tier: &str) -> Option<&Limit> {
        self.overrides.iter().find(|l| l.tier() == Some(tier))
    }

    /// How a key an edge has not seen yet is treated (DESIGN §4). Defaults to soft.
    pub fn strictness(&self) -> Strictness {
        self.strictness
    }

    /// What an edge does when its regional is unreachable (DESIGN §7). Defaults to local.
    pub fn on_failure(&self) -> FailureMode {
        self.on_failure
    }

    /// True when the rule only counts and reports would-be denials, and denies nothing.
    pub fn shadow(&self) -> bool {
        self.shadow
    }
}

/// Which requests a rule selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// An entry of `endpoints:`: requests whose path matches and, when a method is given,
    /// whose method is it (compared ignoring ASCII case).
    Endpoint {
        /// The path pattern.
        path: PathPattern,
        /// The method in upper case; `None` matches any method.
        method: Option<String>,
    },
    /// `default:`: requests no endpoint rule selected.
    Default,
    /// `tiers.<name>`: requests whose tier is this name, whatever else they match.
    Tier(String),
}

/// What a rule counts requests by: the key kind of its selector.
///
/// When the request lacks the value (no user id, no API key, no such header), the rule falls
/// back to counting by the request's IP, so an anonymous client is still limited; when the
/// request has no IP either, the rule does not apply to it. An empty value counts as absent.
/// `default` and the tiers count by user id, with the same fallback.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// `user_id`: the authenticated user (the default).
    UserId,
    /// `ip`: the client address.
    Ip,
    /// `api_key`: the API key the client presented.
    ApiKey,
    /// `header:<name>`: the value of a request header; the name is kept in lower case and
    /// compared ignoring ASCII case.
    Header(String),
    /// `global`: one counter for every request the rule selects.
    Global,
}

impl fmt::Display for KeyKind {
    /// The YAML spelling: `user_id`, `ip`, `api_key`, `header:<name>`, `global`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::UserId => f.write_str("user_id"),
            KeyKind::Ip => f.write_str("ip"),
            KeyKind::ApiKey => f.write_str("api_key"),
            KeyKind::Header(name) => write!(f, "header:{name}"),
            KeyKind::Global => f.write_str("global"),
        }
    }
}

/// One limit of a rule: its stable id, its name, and the algorithm that enforces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    id: LimitId,
    name: String,
    limiter: Limiter,
    tier: Option<String>,
}

impl Limit {
    /// The stable id: [`LimitId::from_name`] of [`Limit::name`].
    pub fn id(&self) -> LimitId {
        self.id
    }

    /// The canonical name, `<rule id>#<variant>`: `default#requests_per_minute`,
    /// `POST /api/login key=ip#limit`, `orders#tier=pro`. Human-readable, and the input of
    /// the id's hash.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The algorithm and its parameters.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// For a per-tier override, the tier it applies to.
    pub fn tier(&self) -> Option<&str> {
        self.tier.as_deref()
    }
}

/// A stable identity for one limit of one rule, the same on every tier and across rule-set
/// versions as long as the rule's name is the same. It is what crosses the wire beside a key.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LimitId(pub u64);

impl LimitId {
    /// The 64-bit FNV-1a hash of `name`'s UTF-8 bytes.
    ///
    /// Deliberately not std's `DefaultHasher`, which is seeded per process: every tier and
    /// every process must compute the same id from the same name without talking.
    pub const fn from_name(name: &str) -> LimitId {
        LimitId(fnv1a(FNV_OFFSET, name.as_bytes()))
    }
}

/// FNV-1a's starting value.
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `hash` ([`FNV_OFFSET`] to start): the ids every tier
/// must compute alike without talking ([`LimitId`], [`EdgeId`](crate::quota::EdgeId)).
pub(crate) const fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(PRIME);
        i += 1;
    }
    hash
}

/// How a key an edge has not seen yet is treated (DESIGN §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strictness {
    /// The edge may admit up to the cold allowance `c0` per key before its first sync.
    /// Admitted ≤ `P + n·c0` at worst (≤ 1.1·P with the defaults); the overshoot is measured
    /// and reported.
    #[default]
    Soft,
    /// A key's first request at an edge takes the exact path. Admitted ≤ `P`, exactly.
    Hard,
}

/// What an edge does when it needs its regional and cannot reach it (DESIGN §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureMode {
    /// Enforce `P/n` alone, from local counts.
    #[default]
    Local,
    /// Allow.
    Open,
    /// Deny.
    Closed,
}

/// Where a [`Limit`] sits inside `RuleSet::rules`.
#[derive(Clone, Copy, Debug)]
struct LimitSlot {
    rule: usize,
    /// Index into the rule's limits, or into its overrides.
    limit: usize,
    is_override: bool,
}

impl LimitSlot {
    /// The rule and limit this slot points at in `rules`.
    fn resolve(self, rules: &[Rule]) -> Option<(&Rule, &Limit)> {
        let rule = rules.get(self.rule)?;
        let limits = if self.is_override {
            &rule.overrides
        } else {
            &rule.limits
        };
        Some((rule, limits.get(self.limit)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_id_is_fnv1a_64() {
        // Reference vectors of FNV-1a 64 (Fowler, Noll, Vo).
        assert_eq!(LimitId::from_name(""), LimitId(0xcbf2_9ce4_8422_2325));
        assert_eq!(LimitId::from_name("a"), LimitId(0xaf63_dc4c_8601_ec8c));
        assert_eq!(LimitId::from_name("foobar"), LimitId(0x8594_4171_f739_67e8));
    }

    #[test]
    fn key_kind_displays_as_yaml() {
        assert_eq!(
            KeyKind::Header("x-tenant".into()).to_string(),
            "header:x-tenant"
        );
        assert_eq!(KeyKind::UserId.to_string(), "user_id");
    }
}

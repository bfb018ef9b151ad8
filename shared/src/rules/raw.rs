//! The raw layer: a serde mirror of the operators' YAML, field for field (STYLE 20).
//!
//! What this layer may do: say which keys exist at each level (`deny_unknown_fields`
//! everywhere, so a typo such as `colour:` or `windw:` is an error rather than a silently
//! ignored line), which are optional, and which primitive type each holds; and name the closed
//! vocabularies whose words are plain identifiers (`algorithm`, `strictness`, `on_failure`,
//! `mode`), so serde reports an unknown word with its location and the accepted list.
//!
//! What it may not do: interpret anything. Durations, rates, path patterns, key kinds and
//! methods stay text here; defaults are not filled in; nothing is checked against anything
//! else. All of that is `parse`'s job, which turns this into the typed `RuleSet` or a located
//! `ConfigError`. Nothing in this module leaves the `rules` module: only the typed layer
//! crosses into the runtime.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, Visitor},
};

/// The whole file: `version:` (optional) and `rate_limits:`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with `rate_limits:` and an optional `version:`"
)]
pub(crate) struct RawFile {
    /// The rule-set version; 0 when absent. The coordinator may stamp another one.
    pub(crate) version: Option<u64>,
    /// Every rule.
    pub(crate) rate_limits: RawRateLimits,
}

/// `rate_limits:` — the seed's shape.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of `default`, `endpoints` and `tiers`"
)]
pub(crate) struct RawRateLimits {
    /// Limits for requests that match no endpoint.
    pub(crate) default: Option<RawWindowLimits>,
    /// Per-endpoint rules, in file order.
    pub(crate) endpoints: Option<Vec<RawEndpoint>>,
    /// Per-tier limits, in file order; a null value declares a tier without limits of its own.
    pub(crate) tiers: Option<Entries<Option<RawWindowLimits>>>,
}

/// The short form: `{ requests_per_minute: 60, requests_per_hour: 1000 }`, used by `default`
/// and by each tier.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of requests_per_second/minute/hour/day"
)]
pub(crate) struct RawWindowLimits {
    pub(crate) requests_per_second: Option<u64>,
    pub(crate) requests_per_minute: Option<u64>,
    pub(crate) requests_per_hour: Option<u64>,
    pub(crate) requests_per_day: Option<u64>,
    pub(crate) strictness: Option<RawStrictness>,
    pub(crate) on_failure: Option<RawFailureMode>,
    pub(crate) shadow: Option<bool>,
}

/// One entry of `endpoints:`, short or full form.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an endpoint rule: a mapping with `path:`"
)]
pub(crate) struct RawEndpoint {
    pub(crate) id: Option<String>,
    pub(crate) path: String,
    pub(crate) method: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) algorithm: Option<RawAlgorithm>,
    pub(crate) limit: Option<u64>,
    pub(crate) window: Option<Scalar>,
    pub(crate) rate: Option<Scalar>,
    pub(crate) burst: Option<u64>,
    pub(crate) mode: Option<RawLeakyMode>,
    pub(crate) strictness: Option<RawStrictness>,
    pub(crate) on_failure: Option<RawFailureMode>,
    /// Per-tier override: an integer limit or a rate, depending on the algorithm.
    pub(crate) tiers: Option<Entries<Scalar>>,
    pub(crate) shadow: Option<bool>,
}

/// `algorithm:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawAlgorithm {
    SlidingWindow,
    FixedWindow,
    SlidingLog,
    TokenBucket,
    LeakyBucket,
}

/// `mode:` (leaky bucket only).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawLeakyMode {
    Meter,
    Shaper,
}

/// `strictness:`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawStrictness {
    Soft,
    Hard,
}

/// `on_failure:`.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawFailureMode {
    Local,
    Open,
    Closed,
}

/// A scalar kept as text: a string, or an integer as its decimal form. Durations (`1m`) and
/// rates (`10/s`) are strings in YAML, but an operator may write `window: 60` or a per-tier
/// `pro: 50`; keeping both as text lets `parse` say what is wrong with the value ("has no
/// unit") instead of serde's "expected a string".
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Scalar(pub(crate) String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scalar, D::Error> {
        struct ScalarVisitor;

        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// A mapping kept as its entries in file order, so the rules built from it (tiers, per-tier
/// overrides) come out in the order the operator wrote them, and so their `LimitId`s and error
/// messages are deterministic. Keys are strings. Duplicate keys never reach here: the YAML
/// loader refuses them with their line and column.
#[derive(Debug)]
pub(crate) struct Entries<T>(pub(crate) Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Entries<T>, D::Error> {
        struct EntriesVisitor<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for EntriesVisitor<T> {
            type Value = Entries<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_unit<E: de::Error>(self) -> Result<Entries<T>, E> {
                Ok(Entries(Vec::new()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<T>, A::Error> {
                // No `size_hint` preallocation: the hint comes from the input.
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, T>()? {
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(std::marker::PhantomData))
    }
}

//! The typed layer's constructor: YAML text → `raw` → [`RuleSet`], or a located [`ConfigError`].
//!
//! Three steps, each of which can refuse the file:
//!
//! 1. **Load**: the text into a YAML value. Syntax errors and repeated mapping keys are
//!    located by line and column.
//! 2. **Shape**: the value into the `raw` mirror through `serde_path_to_error`, so an unknown
//!    field, a missing one or a wrong type is located by its field path.
//! 3. **Build**: every raw value interpreted once — durations (`1m`), rates (`10/s`), path
//!    patterns, methods, key kinds, algorithms with their parameters — and every cross-field
//!    rule checked (a `rate` on a window algorithm, an override naming an undefined tier, a
//!    duplicate rule, a duplicate id), each refusal naming its field.
//!
//! Loading into a value first, rather than deserializing straight from the text, is what lets
//! step 2 report serde's plain messages against our own field paths: the value carries no
//! positions, so the messages carry none either, and syntax errors, which do have positions,
//! all come from step 1.

use std::{collections::HashMap, num::NonZeroU64};

use serde_yaml_ng::Value;

use super::{
    ConfigError, FailureMode, KeyKind, Limit, LimitId, LimitSlot, PathPattern, Rule, RuleSet,
    Selector, Strictness,
    error::FieldError,
    matcher::Matcher,
    raw::{
        RawAlgorithm, RawEndpoint, RawFailureMode, RawFile, RawLeakyMode, RawRateLimits,
        RawStrictness, RawWindowLimits, Scalar,
    },
};
use crate::{
    algorithm::{FixedWindow, Gcra, LeakyBucket, LeakyMode, Limiter, SlidingLog, SlidingWindow},
    clock::Nanos,
    config::{parse_duration, shape, unit_nanos, yaml_error},
};

/// `RuleSet::from_yaml`.
pub(crate) fn rule_set(file: &str, yaml: &str) -> Result<RuleSet, ConfigError> {
    let value = load(file, yaml)?;
    let raw: RawFile = shape(file, value)?;
    let version = raw.version.unwrap_or(0);
    let built = build(raw.rate_limits).map_err(|e| e.in_file(file))?;
    let by_limit = index_limits(&built).map_err(|e| e.in_file(file))?;
    let by_id = built
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.clone(), i))
        .collect();
    let matcher = Matcher::new(&built.rules);
    Ok(RuleSet {
        file: file.to_owned(),
        source: yaml.to_owned(),
        version,
        rules: built.rules,
        tiers: built.tiers,
        by_limit,
        by_id,
        matcher,
    })
}

/// Step 1: the text as a YAML value.
fn load(file: &str, yaml: &str) -> Result<Value, ConfigError> {
    match serde_yaml_ng::from_str::<Value>(yaml) {
        Ok(Value::Null) => Err(ConfigError::Document {
            file: file.to_owned(),
            reason: "the file holds no rules; expected a `rate_limits:` mapping".to_owned(),
        }),
        Ok(value) => Ok(value),
        Err(err) => Err(yaml_error(file, &err)),
    }
}

/// Step 3's result: the rules in `RuleSet` order, where each came from, and the tier names.
struct Built {
    rules: Vec<Rule>,
    /// `fields[i]` is the field path `rules[i]` was built from, for errors found afterwards.
    fields: Vec<String>,
    tiers: Vec<String>,
}

/// Step 3: every rule, interpreted and cross-checked.
fn build(raw: RawRateLimits) -> Result<Built, FieldError> {
    // Tiers first: endpoint overrides may only name declared tiers.
    let mut tiers = Vec::new();
    let mut tier_rules = Vec::new();
    for (name, limits) in raw.tiers.map(|t| t.0).unwrap_or_default() {
        let at = format!("rate_limits.tiers.{name}");
        check_name(&at, &name, "tier name")?;
        let selector = Selector::Tier(name.clone());
        if let Some(rule) = short_form_rule(&at, format!("tiers.{name}"), selector, limits)? {
            tier_rules.push((at, rule));
        }
        tiers.push(name);
    }

    let mut rules = Vec::new();
    let mut fields = Vec::new();
    let mut selectors = HashMap::new();
    for (i, endpoint) in raw.endpoints.unwrap_or_default().into_iter().enumerate() {
        let at = format!("rate_limits.endpoints[{i}]");
        let named = endpoint.id.is_some();
        let rule = endpoint_rule(&at, endpoint, &tiers)?;
        check_duplicate(&mut selectors, &at, i, named, &rule)?;
        rules.push(rule);
        fields.push(at);
    }

    if let Some(limits) = raw.default {
        let at = "rate_limits.default";
        let rule = short_form_rule(at, "default".to_owned(), Selector::Default, Some(limits))?
            .ok_or_else(|| FieldError::new(at, NO_SHORT_FORM_LIMIT))?;
        rules.push(rule);
        fields.push(at.to_owned());
    }

    for (at, rule) in tier_rules {
        rules.push(rule);
        fields.push(at);
    }

    let built = Built {
        rules,
        fields,
        tiers,
    };
    check_ids(&built)?;
    Ok(built)
}

/// `default` or one tier: a sliding-window limit per `requests_per_*` given. `None` when the
/// block is empty (a tier declared without limits of its own).
fn short_form_rule(
    at: &str,
    id: String,
    selector: Selector,
    raw: Option<RawWindowLimits>,
) -> Result<Option<Rule>, FieldError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let windows = [
        (
            "requests_per_second",
            raw.requests_per_second,
            Nanos::from_secs(1),
        ),
        (
            "requests_per_minute",
            raw.requests_per_minute,
            Nanos::from_secs(60),
        ),
        (
            "requests_per_hour",
            raw.requests_per_hour,
            Nanos::from_secs(3_600),
        ),
        (
            "requests_per_day",
            raw.requests_per_day,
            Nanos::from_secs(86_400),
        ),
    ];
    let mut limits = Vec::new();
    for (field, count, window) in windows {
        let Some(count) = count else {
            continue;
        };
        let field = format!("{at}.{field}");
        let count = positive(&field, count)?;
        let limiter = SlidingWindow::new(count, window)
            .map(Limiter::SlidingWindow)
            .ok_or_else(|| FieldError::new(&field, "the window must be greater than zero"))?;
        limits.push(limit(&id, field_name(&field), None, limiter));
    }
    if limits.is_empty() {
        let has_settings =
            raw.strictness.is_some() || raw.on_failure.is_some() || raw.shadow.is_some();
        return if has_settings {
            Err(FieldError::new(at, NO_SHORT_FORM_LIMIT))
        } else {
            Ok(None)
        };
    }
    Ok(Some(Rule {
        id,
        selector,
        key: KeyKind::UserId,
        limits,
        overrides: Vec::new(),
        strictness: raw.strictness.map(strictness).unwrap_or_default(),
        on_failure: raw.on_failure.map(failure_mode).unwrap_or_default(),
        shadow: raw.shadow.unwrap_or(false),
    }))
}

const NO_SHORT_FORM_LIMIT: &str = "no limit given; expected at least one of \
     requests_per_second, requests_per_minute, requests_per_hour, requests_per_day";

/// The last component of a dotted field path: the variant part of a short-form limit's name.
fn field_name(field: &str) -> &str {
    field.rsplit('.').next().unwrap_or(field)
}

/// One entry of `endpoints:`.
fn endpoint_rule(at: &str, raw: RawEndpoint, tiers: &[String]) -> Result<Rule, FieldError> {
    let path =
        PathPattern::parse(&raw.path).map_err(|r| FieldError::new(format!("{at}.path"), r))?;
    let method = match raw.method.as_deref() {
        Some(m) => Some(parse_method(m).map_err(|r| FieldError::new(format!("{at}.method"), r))?),
        None => None,
    };
    let key = match raw.key.as_deref() {
        Some(k) => parse_key(k).map_err(|r| FieldError::new(format!("{at}.key"), r))?,
        None => KeyKind::UserId,
    };
    let id = match &raw.id {
        Some(id) => {
            check_name(&format!("{at}.id"), id, "id")?;
            id.clone()
        }
        None => format!("{} {path} key={key}", method.as_deref().unwrap_or("*")),
    };

    let algorithm = raw.algorithm.unwrap_or(RawAlgorithm::SlidingWindow);
    let spec = LimitSpec::new(at, algorithm, &raw)?;
    let limits = vec![limit(&id, "limit", None, spec.base.clone())];
    let mut overrides = Vec::new();
    for (tier, Scalar(text)) in raw.tiers.map(|t| t.0).unwrap_or_default() {
        let field = format!("{at}.tiers.{tier}");
        if !tiers.contains(&tier) {
            return Err(FieldError::new(
                field,
                format!("tier {tier:?} is not defined under rate_limits.tiers"),
            ));
        }
        let limiter = spec.for_tier(&field, &text)?;
        let variant = format!("tier={tier}");
        overrides.push(limit(&id, &variant, Some(tier), limiter));
    }

    Ok(Rule {
        id,
        selector: Selector::Endpoint { path, method },
        key,
        limits,
        overrides,
        strictness: raw.strictness.map(strictness).unwrap_or_default(),
        on_failure: raw.on_failure.map(failure_mode).unwrap_or_default(),
        shadow: raw.shadow.unwrap_or(false),
    })
}

/// An endpoint's algorithm with its parameters, checked; knows how to apply a tier override.
struct LimitSpec {
    algorithm: RawAlgorithm,
    /// The rule's own limiter.
    base: Limiter,
    /// Window algorithms: the window overrides keep.
    window: Nanos,
    /// Buckets: the explicit `burst`, which overrides keep; `None` means "the rate's count".
    burst: Option<NonZeroU64>,
    mode: LeakyMode,
}

impl LimitSpec {
    /// Reads and checks the parameters `algorithm` takes, refusing those it does not.
    fn new(at: &str, algorithm: RawAlgorithm, raw: &RawEndpoint) -> Result<LimitSpec, FieldError> {
        let name = algorithm_name(algorithm);
        let field = |f: &str| format!("{at}.{f}");
        if raw.mode.is_some() && algorithm != RawAlgorithm::LeakyBucket {
            return Err(FieldError::new(
                field("mode"),
                format!("`mode` is for leaky_bucket only, not {name}"),
            ));
        }
        let mode = match raw.mode {
            Some(RawLeakyMode::Shaper) => LeakyMode::Shaper,
            Some(RawLeakyMode::Meter) | None => LeakyMode::Meter,
        };

        if is_bucket(algorithm) {
            for (present, f) in [
                (raw.limit.is_some(), "limit"),
                (raw.window.is_some(), "window"),
            ] {
                if present {
                    return Err(FieldError::new(
                        field(f),
                        format!("`{f}` is for window algorithms; {name} takes `rate` and `burst`"),
                    ));
                }
            }
            let Some(Scalar(rate_text)) = &raw.rate else {
                return Err(FieldError::new(
                    at,
                    format!("missing `rate`: {name} takes `rate` (as in 10/s) and `burst`"),
                ));
            };
            let rate = parse_rate(rate_text).map_err(|r| FieldError::new(field("rate"), r))?;
            let burst = match raw.burst {
                Some(b) => Some(positive(&field("burst"), b)?),
                None => None,
            };
            let base = bucket(algorithm, rate, burst, mode)
                .ok_or_else(|| FieldError::new(field("rate"), too_fast(rate_text)))?;
            return Ok(LimitSpec {
                algorithm,
                base,
                window: Nanos::ZERO,
                burst,
                mode,
            });
        }

        for (present, f) in [(raw.rate.is_some(), "rate"), (raw.burst.is_some(), "burst")] {
            if present {
                return Err(FieldError::new(
                    field(f),
                    format!(
                        "`{f}` is for token_bucket and leaky_bucket; {name} takes `limit` and \
                         `window`"
                    ),
                ));
            }
        }
        let (Some(count), Some(Scalar(window_text))) = (raw.limit, &raw.window) else {
            let missing = if raw.limit.is_none() {
                "limit"
            } else {
                "window"
            };
            return Err(FieldError::new(
                at,
                format!("missing `{missing}`: {name} takes `limit` and `window` (as in 1m)"),
            ));
        };
        let count = positive(&field("limit"), count)?;
        log_fits(&field("limit"), algorithm, count)?;
        let window =
            parse_duration(window_text).map_err(|r| FieldError::new(field("window"), r))?;
        let base = windowed(algorithm, count, window).ok_or_else(|| {
            FieldError::new(field("window"), "the window must be greater than zero")
        })?;
        Ok(LimitSpec {
            algorithm,
            base,
            window,
            burst: None,
            mode,
        })
    }

    /// The limiter for a per-tier override `text` at `field`: an integer limit over the same
    /// window for window algorithms, a rate (with the rule's explicit burst, or the override
    /// rate's own count) for buckets.
    fn for_tier(&self, field: &str, text: &str) -> Result<Limiter, FieldError> {
        let name = algorithm_name(self.algorithm);
        if is_bucket(self.algorithm) {
            let rate = parse_rate(text).map_err(|r| FieldError::new(field, r))?;
            return bucket(self.algorithm, rate, self.burst, self.mode)
                .ok_or_else(|| FieldError::new(field, too_fast(text)));
        }
        let count = text.trim().parse::<u64>().map_err(|_| {
            FieldError::new(
                field,
                format!(
                    "{text:?} is not a limit; {name} takes an integer per tier (rates are for \
                     token_bucket and leaky_bucket)"
                ),
            )
        })?;
        let count = positive(field, count)?;
        log_fits(field, self.algorithm, count)?;
        windowed(self.algorithm, count, self.window)
            .ok_or_else(|| FieldError::new(field, "the window must be greater than zero"))
    }
}

/// Token and leaky buckets take a rate; the others a limit and a window.
fn is_bucket(algorithm: RawAlgorithm) -> bool {
    matches!(
        algorithm,
        RawAlgorithm::TokenBucket | RawAlgorithm::LeakyBucket
    )
}

/// The YAML spelling of `algorithm`.
fn algorithm_name(algorithm: RawAlgorithm) -> &'static str {
    match algorithm {
        RawAlgorithm::SlidingWindow => "sliding_window",
        RawAlgorithm::FixedWindow => "fixed_window",
        RawAlgorithm::SlidingLog => "sliding_log",
        RawAlgorithm::TokenBucket => "token_bucket",
        RawAlgorithm::LeakyBucket => "leaky_bucket",
    }
}

/// The most timestamps one sliding-log key may hold: 16 bytes each, so 1.6 MB per key at the
/// cap. A log is exact and costs memory per admitted request; past this, a sliding window
/// counter is the right tool.
pub(crate) const MAX_SLIDING_LOG_LIMIT: u64 = 100_000;

/// Refuses a sliding log whose limit would let one key hold more than
/// [`MAX_SLIDING_LOG_LIMIT`] timestamps.
fn log_fits(field: &str, algorithm: RawAlgorithm, count: NonZeroU64) -> Result<(), FieldError> {
    if algorithm == RawAlgorithm::SlidingLog && count.get() > MAX_SLIDING_LOG_LIMIT {
        return Err(FieldError::new(
            field,
            format!(
                "{count} is too large for sliding_log, which keeps one timestamp per request                  (at most {MAX_SLIDING_LOG_LIMIT}); use sliding_window for large limits"
            ),
        ));
    }
    Ok(())
}

/// A window algorithm's limiter; `None` for a bucket or a zero window.
fn windowed(algorithm: RawAlgorithm, count: NonZeroU64, window: Nanos) -> Option<Limiter> {
    match algorithm {
        RawAlgorithm::SlidingWindow => {
            SlidingWindow::new(count, window).map(Limiter::SlidingWindow)
        }
        RawAlgorithm::FixedWindow => FixedWindow::new(count, window).map(Limiter::FixedWindow),
        RawAlgorithm::SlidingLog => SlidingLog::new(count, window).map(Limiter::SlidingLog),
        RawAlgorithm::TokenBucket | RawAlgorithm::LeakyBucket => None,
    }
}

/// A bucket's limiter, burst defaulting to the rate's count; `None` for a window algorithm or a
/// rate faster than one request per nanosecond.
fn bucket(
    algorithm: RawAlgorithm,
    rate: Rate,
    burst: Option<NonZeroU64>,
    mode: LeakyMode,
) -> Option<Limiter> {
    let burst = burst.unwrap_or(rate.count);
    match algorithm {
        RawAlgorithm::TokenBucket => {
            Gcra::new(rate.count, rate.period, burst).map(Limiter::TokenBucket)
        }
        // A meter decides exactly as GCRA does with `tat = now + level` (the leaky bucket's
        // module doc), so it is enforced as that GCRA, and every tier grants, parks, splits and
        // escalates it as the token bucket it is. Only the shaper, whose answer is the level
        // itself ("go after X"), stays a leaky bucket and takes the exact path.
        RawAlgorithm::LeakyBucket if mode == LeakyMode::Meter => {
            Gcra::new(rate.count, rate.period, burst).map(Limiter::TokenBucket)
        }
        RawAlgorithm::LeakyBucket => {
            LeakyBucket::new(rate.count, rate.period, burst, mode).map(Limiter::LeakyBucket)
        }
        RawAlgorithm::SlidingWindow | RawAlgorithm::FixedWindow | RawAlgorithm::SlidingLog => None,
    }
}

fn too_fast(text: &str) -> String {
    format!("{text:?} is faster than one request per nanosecond")
}

/// A limit of rule `rule_id`: named `<rule_id>#<variant>`, identified by that name's hash.
fn limit(rule_id: &str, variant: &str, tier: Option<String>, limiter: Limiter) -> Limit {
    let name = format!("{rule_id}#{variant}");
    Limit {
        id: LimitId::from_name(&name),
        name,
        limiter,
        tier,
    }
}

/// `count` unless it is zero.
fn positive(field: &str, count: u64) -> Result<NonZeroU64, FieldError> {
    NonZeroU64::new(count)
        .ok_or_else(|| FieldError::new(field, format!("{count} must be greater than zero")))
}

fn strictness(raw: RawStrictness) -> Strictness {
    match raw {
        RawStrictness::Soft => Strictness::Soft,
        RawStrictness::Hard => Strictness::Hard,
    }
}

fn failure_mode(raw: RawFailureMode) -> FailureMode {
    match raw {
        RawFailureMode::Local => FailureMode::Local,
        RawFailureMode::Open => FailureMode::Open,
        RawFailureMode::Closed => FailureMode::Closed,
    }
}

/// An endpoint `id:` or a tier name: used in limit names, so it must be printable, non-empty,
/// and free of `#`, which separates a limit name's parts.
fn check_name(field: &str, name: &str, what: &str) -> Result<(), FieldError> {
    let reason = if name.trim().is_empty() {
        format!("the {what} is empty")
    } else if name.contains('#') {
        format!("{name:?}: the {what} may not contain '#'")
    } else if name.chars().any(char::is_control) {
        format!("{name:?}: the {what} may not contain control characters")
    } else {
        return Ok(());
    };
    Err(FieldError::new(field, reason))
}

/// Refuses a second endpoint rule with the same method, path shape and key as an earlier one,
/// unless both carry an explicit `id`: then the operator named them apart on purpose (say a
/// per-second and a per-day limit on one endpoint), and both apply.
fn check_duplicate(
    seen: &mut HashMap<(Option<String>, String, KeyKind), (usize, bool)>,
    at: &str,
    index: usize,
    named: bool,
    rule: &Rule,
) -> Result<(), FieldError> {
    let Selector::Endpoint { path, method } = &rule.selector else {
        return Ok(());
    };
    let selector = (method.clone(), path.shape(), rule.key.clone());
    match seen.get(&selector) {
        Some(&(first, first_named)) if !(named && first_named) => Err(FieldError::new(
            at,
            format!(
                "duplicate rule: same method, path and key as rate_limits.endpoints[{first}] \
                 (give both an `id` to enforce two limits on one endpoint)"
            ),
        )),
        Some(_) => Ok(()),
        None => {
            seen.insert(selector, (index, named));
            Ok(())
        }
    }
}

/// Refuses two rules with one id: ids name counters (through `LimitId`) and the admin API's
/// rules, so each must be unique. An explicit `id:` may collide with a derived one.
fn check_ids(built: &Built) -> Result<(), FieldError> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, rule) in built.rules.iter().enumerate() {
        if let Some(&first) = seen.get(rule.id.as_str()) {
            let here = built.fields.get(i).map_or("rate_limits", String::as_str);
            let there = built
                .fields
                .get(first)
                .map_or("rate_limits", String::as_str);
            return Err(FieldError::new(
                here,
                format!("rule id {:?} is already used by {there}", rule.id),
            ));
        }
        seen.insert(&rule.id, i);
    }
    Ok(())
}

/// `LimitId` → slot, refusing a hash collision between two distinct limit names (names are
/// unique once rule ids are, so only FNV itself could collide; we check rather than assume).
fn index_limits(built: &Built) -> Result<HashMap<LimitId, LimitSlot>, FieldError> {
    let mut by_limit: HashMap<LimitId, LimitSlot> = HashMap::new();
    for (r, rule) in built.rules.iter().enumerate() {
        let base = rule.limits.iter().enumerate().map(|(i, l)| (i, false, l));
        let tiered = rule.overrides.iter().enumerate().map(|(i, l)| (i, true, l));
        for (index, is_override, limit) in base.chain(tiered) {
            let slot = LimitSlot {
                rule: r,
                limit: index,
                is_override,
            };
            if let Some(other) = by_limit.insert(limit.id, slot) {
                let other_name = other.resolve(&built.rules).map_or("", |(_, l)| l.name());
                let here = built.fields.get(r).map_or("rate_limits", String::as_str);
                return Err(FieldError::new(
                    here,
                    format!(
                        "limit {:?} has the same LimitId as {other_name:?}; rename a rule",
                        limit.name
                    ),
                ));
            }
        }
    }
    Ok(by_limit)
}

/// An HTTP method, upper-cased.
fn parse_method(text: &str) -> Result<String, String> {
    if text == "*" || text.eq_ignore_ascii_case("any") {
        return Err(format!(
            "{text:?} is not an HTTP method; leave `method` out to match any method"
        ));
    }
    if text.is_empty()
        || !text
            .chars()
            .all(|c| c.is_ascii_alphabetic() || c == '-' || c == '_')
    {
        return Err(format!("{text:?} is not an HTTP method"));
    }
    Ok(text.to_ascii_uppercase())
}

/// `user_id | ip | api_key | header:<name> | global`.
fn parse_key(text: &str) -> Result<KeyKind, String> {
    match text {
        "user_id" => return Ok(KeyKind::UserId),
        "ip" => return Ok(KeyKind::Ip),
        "api_key" => return Ok(KeyKind::ApiKey),
        "global" => return Ok(KeyKind::Global),
        _ => {}
    }
    let Some(name) = text.strip_prefix("header:") else {
        return Err(format!(
            "unknown key kind {text:?}; expected user_id, ip, api_key, header:<name> or global"
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!(
            "{text:?} needs a header name, as in header:x-tenant"
        ));
    }
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.chars().all(token) {
        return Err(format!("{name:?} is not a header name"));
    }
    Ok(KeyKind::Header(name.to_ascii_lowercase()))
}

/// `count` requests per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rate {
    count: NonZeroU64,
    period: Nanos,
}

/// A rate: `N/s`, `N/m`, `N/h`, `N/d` (also `N/ms`), or `N/<duration>` as in `100/5m`.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let not_a_rate = || {
        format!(
            "{text:?} is not a rate; expected N/s, N/m, N/h, N/d or N/<duration>, as in 10/s or \
             100/5m"
        )
    };
    let Some((count, per)) = text.split_once('/') else {
        return Err(not_a_rate());
    };
    let (count, per) = (count.trim(), per.trim());
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_a_rate());
    }
    let count: u64 = count
        .parse()
        .map_err(|_| format!("{text:?}: the count is too large"))?;
    let Some(count) = NonZeroU64::new(count) else {
        return Err(format!("{text:?} must be greater than zero"));
    };
    let period = if per.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(per).map_err(|reason| format!("{text:?}: the period {reason}"))?
    } else {
        Nanos(unit_nanos(per).ok_or_else(not_a_rate)?)
    };
    Ok(Rate { count, period })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Nanos::from_millis(250)));
        assert_eq!(parse_duration("1s"), Ok(Nanos::from_secs(1)));
        assert_eq!(parse_duration("1m"), Ok(Nanos::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Nanos::from_secs(3_600)));
        assert_eq!(parse_duration("1d"), Ok(Nanos::from_secs(86_400)));
        assert_eq!(parse_duration("90s"), Ok(Nanos::from_secs(90)));
    }

    #[test]
    fn bad_durations_say_why() {
        let cases = [
            ("0s", "\"0s\" must be greater than zero"),
            ("60", "has no unit"),
            ("1x", "is not a duration"),
            ("s", "is not a duration"),
            ("", "is not a duration"),
            ("1.5s", "is not a duration"),
            ("-1s", "is not a duration"),
            ("1m30s", "is not a duration"),
            ("99999999999999999999d", "too long"),
            ("999999999999d", "too long"),
        ];
        for (text, want) in cases {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn rates_parse_with_units_or_durations() {
        let rate = |count, period| Rate {
            count: NonZeroU64::new(count).unwrap(),
            period,
        };
        assert_eq!(parse_rate("10/s"), Ok(rate(10, Nanos::from_secs(1))));
        assert_eq!(parse_rate("100/m"), Ok(rate(100, Nanos::from_secs(60))));
        assert_eq!(parse_rate("5/h"), Ok(rate(5, Nanos::from_secs(3_600))));
        assert_eq!(
            parse_rate("1000/d"),
            Ok(rate(1000, Nanos::from_secs(86_400)))
        );
        assert_eq!(parse_rate("100/5m"), Ok(rate(100, Nanos::from_secs(300))));
        assert_eq!(parse_rate("1/500ms"), Ok(rate(1, Nanos::from_millis(500))));
        assert_eq!(parse_rate(" 10 / s "), Ok(rate(10, Nanos::from_secs(1))));
    }

    #[test]
    fn bad_rates_say_why() {
        let cases = [
            ("10", "is not a rate"),
            ("ten/s", "is not a rate"),
            ("10/x", "is not a rate"),
            ("10/", "is not a rate"),
            ("/s", "is not a rate"),
            ("-1/s", "is not a rate"),
            ("0/s", "must be greater than zero"),
            ("10/0s", "the period \"0s\" must be greater than zero"),
            ("99999999999999999999/s", "too large"),
        ];
        for (text, want) in cases {
            let err = parse_rate(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn key_kinds_parse() {
        assert_eq!(parse_key("user_id"), Ok(KeyKind::UserId));
        assert_eq!(
            parse_key("header:X-Tenant"),
            Ok(KeyKind::Header("x-tenant".into()))
        );
        assert!(
            parse_key("header:")
                .unwrap_err()
                .contains("needs a header name")
        );
        assert!(
            parse_key("header:a b")
                .unwrap_err()
                .contains("is not a header name")
        );
        assert!(
            parse_key("cookie")
                .unwrap_err()
                .contains("unknown key kind")
        );
        assert!(parse_key("IP").unwrap_err().contains("unknown key kind"));
    }

    #[test]
    fn methods_are_upper_cased_and_checked() {
        assert_eq!(parse_method("post"), Ok("POST".to_owned()));
        assert!(parse_method("G ET").is_err());
        assert!(
            parse_method("*")
                .unwrap_err()
                .contains("leave `method` out")
        );
        assert!(parse_method("").is_err());
    }
}

//! Rules through the public API (DESIGN §2): the DESIGN examples parse to what they say; every
//! kind of bad file is refused with a located message; requests match the limits they should,
//! without allocating once the caller's buffer has room.

use std::{collections::BTreeSet, num::NonZeroU64};

use proptest::{prelude::*, test_runner::FileFailurePersistence};
use shared::{
    Nanos,
    algorithm::{FixedWindow, Gcra, LeakyBucket, LeakyMode, Limiter, SlidingLog, SlidingWindow},
    rules::{
        ConfigError, FailureMode, Key, KeyKind, LimitId, Match, Request, RuleSet, Selector,
        Strictness, recycle,
    },
};

/// The first example of DESIGN §2, verbatim.
const DESIGN_SHORT_FORM: &str = r#"
rate_limits:
  default: { requests_per_minute: 60, requests_per_hour: 1000 }
  endpoints:
    - { path: "/api/login",  method: POST, limit: 5,  window: 1m, key: ip }
    - { path: "/api/search", method: GET,  limit: 30, window: 1m, key: user_id }
    - { path: "/api/upload", method: POST, limit: 10, window: 1h, key: user_id }
  tiers:
    free:       { requests_per_minute: 30,   requests_per_day: 1000 }
    pro:        { requests_per_minute: 100,  requests_per_day: 10000 }
    enterprise: { requests_per_minute: 1000, requests_per_day: 100000 }
"#;

/// The second example of DESIGN §2, verbatim, inside a file that defines its tiers.
const DESIGN_FULL_FORM: &str = r#"
rate_limits:
  endpoints:
    - path: "/api/orders/{id}"       # literal; `{name}` or `*`: one segment; `**`: the rest
      method: POST
      key: user_id                   # user_id | ip | api_key | header:<name> | global
      algorithm: token_bucket        # sliding_window | fixed_window | sliding_log | token_bucket | leaky_bucket
      rate: 10/s                     # token and leaky buckets: rate and burst; others: limit and window
      burst: 20
      strictness: hard               # soft | hard (DESIGN §4)
      on_failure: closed             # local | open | closed (DESIGN §7)
      tiers: { pro: 50/s, enterprise: 500/s }   # per-tier override of the rate or limit
      shadow: false                  # true: count and report would-be denials, deny nothing
  tiers:
    pro: { requests_per_minute: 100 }
    enterprise: { requests_per_minute: 1000 }
"#;

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).expect("tests pass non-zero counts")
}

fn sliding(limit: u64, window: Nanos) -> Limiter {
    Limiter::SlidingWindow(SlidingWindow::new(nz(limit), window).expect("non-zero window"))
}

const MINUTE: Nanos = Nanos::from_secs(60);
const HOUR: Nanos = Nanos::from_secs(3_600);
const DAY: Nanos = Nanos::from_secs(86_400);

fn parse(yaml: &str) -> RuleSet {
    match RuleSet::from_yaml("rules.yaml", yaml) {
        Ok(rules) => rules,
        Err(e) => panic!("{e}"),
    }
}

/// The error `yaml` is refused with, as printed.
fn refused(yaml: &str) -> String {
    match RuleSet::from_yaml("rules.yaml", yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// `endpoints` (YAML flow mappings, one per line) inside a file that defines tiers free and pro.
fn endpoints(lines: &[&str]) -> String {
    let mut yaml = String::from(
        "rate_limits:\n  tiers:\n    free: { requests_per_minute: 30 }\n    pro:\n  endpoints:\n",
    );
    for line in lines {
        yaml.push_str("    - ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

/// `(limit name, key)` of every match, in order.
fn matched(rules: &RuleSet, req: &Request<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    rules.matches(req, &mut out);
    out.iter()
        .map(|m| {
            let key = match m.key {
                Key::Global => "global".to_owned(),
                k => format!("{}={}", k.kind(), k.value()),
            };
            (m.limit.name().to_owned(), key)
        })
        .collect()
}

fn names(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The DESIGN §2 examples.

#[test]
fn design_short_form_parses_to_what_it_says() {
    let rules = parse(DESIGN_SHORT_FORM);
    assert_eq!(rules.version(), 0);
    assert_eq!(
        rules.tiers().collect::<Vec<_>>(),
        ["free", "pro", "enterprise"]
    );
    let ids: Vec<_> = rules.rules().iter().map(|r| r.id()).collect();
    assert_eq!(
        ids,
        [
            "POST /api/login key=ip",
            "GET /api/search key=user_id",
            "POST /api/upload key=user_id",
            "default",
            "tiers.free",
            "tiers.pro",
            "tiers.enterprise",
        ]
    );

    let login = &rules.rules()[0];
    let Selector::Endpoint { path, method } = login.selector() else {
        panic!("not an endpoint: {:?}", login.selector());
    };
    assert_eq!(path.as_str(), "/api/login");
    assert!(path.is_literal());
    assert_eq!(method.as_deref(), Some("POST"));
    assert_eq!(login.key(), &KeyKind::Ip);
    assert_eq!(login.limits().len(), 1);
    assert_eq!(login.limits()[0].limiter(), &sliding(5, MINUTE));
    assert_eq!(login.strictness(), Strictness::Soft);
    assert_eq!(login.on_failure(), FailureMode::Local);
    assert!(!login.shadow());
    assert!(login.overrides().is_empty());

    assert_eq!(rules.rules()[1].key(), &KeyKind::UserId);
    assert_eq!(rules.rules()[1].limits()[0].limiter(), &sliding(30, MINUTE));
    assert_eq!(rules.rules()[2].limits()[0].limiter(), &sliding(10, HOUR));

    let default = rules.rule("default").unwrap();
    assert_eq!(default.selector(), &Selector::Default);
    assert_eq!(default.key(), &KeyKind::UserId);
    let limits: Vec<_> = default
        .limits()
        .iter()
        .map(|l| (l.name(), l.limiter()))
        .collect();
    assert_eq!(
        limits,
        [
            ("default#requests_per_minute", &sliding(60, MINUTE)),
            ("default#requests_per_hour", &sliding(1000, HOUR)),
        ]
    );

    let tier = |name: &str, minute, day| {
        let rule = rules.rule(&format!("tiers.{name}")).unwrap();
        assert_eq!(rule.selector(), &Selector::Tier(name.to_owned()));
        let limiters: Vec<_> = rule.limits().iter().map(|l| l.limiter().clone()).collect();
        assert_eq!(limiters, [sliding(minute, MINUTE), sliding(day, DAY)]);
    };
    tier("free", 30, 1_000);
    tier("pro", 100, 10_000);
    tier("enterprise", 1_000, 100_000);
}

#[test]
fn design_full_form_parses_to_what_it_says() {
    let rules = parse(DESIGN_FULL_FORM);
    let orders = &rules.rules()[0];
    assert_eq!(orders.id(), "POST /api/orders/{id} key=user_id");
    let Selector::Endpoint { path, method } = orders.selector() else {
        panic!("not an endpoint");
    };
    assert_eq!(path.as_str(), "/api/orders/{id}");
    assert!(!path.is_literal());
    assert_eq!(method.as_deref(), Some("POST"));
    assert_eq!(orders.key(), &KeyKind::UserId);
    assert_eq!(orders.strictness(), Strictness::Hard);
    assert_eq!(orders.on_failure(), FailureMode::Closed);
    assert!(!orders.shadow());

    let bucket = |rate, burst| {
        Limiter::TokenBucket(Gcra::new(nz(rate), Nanos::from_secs(1), nz(burst)).unwrap())
    };
    assert_eq!(orders.limits()[0].limiter(), &bucket(10, 20));
    // An explicit burst belongs to the rule: each tier keeps it, with its own rate.
    let pro = orders.override_for("pro").unwrap();
    assert_eq!(pro.limiter(), &bucket(50, 20));
    assert_eq!(pro.tier(), Some("pro"));
    let enterprise = orders.override_for("enterprise").unwrap();
    assert_eq!(enterprise.limiter(), &bucket(500, 20));
    assert!(orders.override_for("free").is_none());

    // Overridden limits count apart from the base limit and from each other.
    let ids: BTreeSet<LimitId> = [orders.limits()[0].id(), pro.id(), enterprise.id()].into();
    assert_eq!(ids.len(), 3);
    assert_eq!(pro.name(), "POST /api/orders/{id} key=user_id#tier=pro");
}

#[test]
fn every_algorithm_builds_its_limiter() {
    let rules = parse(&endpoints(&[
        "{ path: /a, limit: 5, window: 1m }",
        "{ path: /b, algorithm: fixed_window, limit: 5, window: 30s }",
        "{ path: /c, algorithm: sliding_log, limit: 7, window: 500ms, tiers: { pro: 70 } }",
        "{ path: /d, algorithm: token_bucket, rate: 100/5m, tiers: { pro: 1000/5m } }",
        "{ path: /e, algorithm: leaky_bucket, rate: 2/s, burst: 4 }",
        "{ path: /f, algorithm: leaky_bucket, rate: 2/s, mode: shaper }",
    ]));
    let limiter = |i: usize| rules.rules()[i].limits()[0].limiter().clone();
    assert_eq!(limiter(0), sliding(5, MINUTE));
    assert_eq!(
        limiter(1),
        Limiter::FixedWindow(FixedWindow::new(nz(5), Nanos::from_secs(30)).unwrap())
    );
    assert_eq!(
        limiter(2),
        Limiter::SlidingLog(SlidingLog::new(nz(7), Nanos::from_millis(500)).unwrap())
    );
    assert_eq!(
        rules.rules()[2].override_for("pro").unwrap().limiter(),
        &Limiter::SlidingLog(SlidingLog::new(nz(70), Nanos::from_millis(500)).unwrap())
    );
    // Burst defaults to the rate's count, for the base rate and for each override.
    assert_eq!(
        limiter(3),
        Limiter::TokenBucket(Gcra::new(nz(100), Nanos::from_secs(300), nz(100)).unwrap())
    );
    assert_eq!(
        rules.rules()[3].override_for("pro").unwrap().limiter(),
        &Limiter::TokenBucket(Gcra::new(nz(1000), Nanos::from_secs(300), nz(1000)).unwrap())
    );
    // A meter is enforced as the GCRA it equals (see
    // `algorithms::a_leaky_meter_decides_as_its_gcra`); a shaper stays a leaky bucket.
    assert_eq!(
        limiter(4),
        Limiter::TokenBucket(Gcra::new(nz(2), Nanos::from_secs(1), nz(4)).unwrap())
    );
    assert_eq!(
        limiter(5),
        Limiter::LeakyBucket(
            LeakyBucket::new(nz(2), Nanos::from_secs(1), nz(2), LeakyMode::Shaper).unwrap()
        )
    );
}

#[test]
fn short_form_settings_and_all_four_windows() {
    let rules = parse(
        "rate_limits:\n  default:\n    requests_per_second: 1\n    requests_per_minute: 2\n    \
         requests_per_hour: 3\n    requests_per_day: 4\n    strictness: hard\n    \
         on_failure: open\n    shadow: true\n",
    );
    let default = rules.rule("default").unwrap();
    let limiters: Vec<_> = default
        .limits()
        .iter()
        .map(|l| l.limiter().clone())
        .collect();
    assert_eq!(
        limiters,
        [
            sliding(1, Nanos::from_secs(1)),
            sliding(2, MINUTE),
            sliding(3, HOUR),
            sliding(4, DAY)
        ]
    );
    assert_eq!(default.strictness(), Strictness::Hard);
    assert_eq!(default.on_failure(), FailureMode::Open);
    assert!(default.shadow());
}

#[test]
fn version_source_and_stamp() {
    let yaml = "version: 7\nrate_limits:\n  default: { requests_per_minute: 60 }\n";
    let rules = parse(yaml);
    assert_eq!(rules.version(), 7);
    assert_eq!(rules.source(), yaml);
    assert_eq!(rules.file(), "rules.yaml");
    let stamped = rules.with_version(42);
    assert_eq!(stamped.version(), 42);
    assert_eq!(stamped.source(), yaml);

    // What the coordinator pushes down is the source; every tier re-validates it to the same set.
    let again = RuleSet::from_yaml(stamped.file(), stamped.source()).unwrap();
    assert_eq!(again.rules(), stamped.rules());

    let empty = parse("rate_limits: {}\n");
    assert!(empty.rules().is_empty());
}

#[test]
fn limit_ids_are_stable_fnv_of_the_name() {
    let rules = parse(DESIGN_SHORT_FORM);
    let default = rules.rule("default").unwrap();
    let minute = &default.limits()[0];
    assert_eq!(
        minute.id(),
        LimitId::from_name("default#requests_per_minute")
    );
    // Pinned: the same number on every tier, process and build, forever.
    assert_eq!(minute.id(), LimitId(0x1db3_ab0c_9fbc_8046));

    // Every limit is found by its id; ids are distinct; an unknown id is not found.
    let mut seen = BTreeSet::new();
    for (rule, limit) in rules.limits() {
        let (found_rule, found_limit) = rules.limit(limit.id()).unwrap();
        assert_eq!(
            (found_rule.id(), found_limit.name()),
            (rule.id(), limit.name())
        );
        assert!(seen.insert(limit.id()), "{} repeats an id", limit.name());
    }
    assert_eq!(seen.len(), 3 + 2 + 3 * 2);
    assert!(rules.limit(LimitId(1)).is_none());

    // Overrides are found too, and an explicit `id` names the rule (and so its limits).
    let full = parse(&endpoints(&[
        "{ id: orders, path: /o, algorithm: token_bucket, rate: 1/s, tiers: { pro: 5/s } }",
    ]));
    let id = LimitId::from_name("orders#tier=pro");
    let (rule, limit) = full.limit(id).unwrap();
    assert_eq!((rule.id(), limit.tier()), ("orders", Some("pro")));
    assert_eq!(
        full.rule("orders").unwrap().limits()[0].name(),
        "orders#limit"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals, each located.

#[test]
fn unknown_field_is_located() {
    let err = refused(&endpoints(&[
        "{ path: /a, limit: 5, window: 1m, colour: red }",
    ]));
    assert!(
        err.starts_with(
            "rules.yaml: rate_limits.endpoints[0].colour: unknown field `colour`, expected one of \
             `id`, `path`,"
        ),
        "{err}"
    );
    let err = refused("rate_limits:\n  defualt: { requests_per_minute: 1 }\n");
    assert!(
        err.starts_with("rules.yaml: rate_limits.defualt: unknown field `defualt`"),
        "{err}"
    );
    let err = refused("rate_limits:\n  tiers:\n    pro: { requests_per_minute: 5, bogus: 1 }\n");
    assert!(
        err.starts_with("rules.yaml: rate_limits.tiers.pro.bogus: unknown field `bogus`"),
        "{err}"
    );
    let err = refused("rate_limit: {}\n");
    assert!(
        err.starts_with("rules.yaml: rate_limit: unknown field `rate_limit`"),
        "{err}"
    );
}

#[test]
fn wrong_types_and_missing_fields_are_located() {
    let cases = [
        (
            "{ path: /a, limit: -5, window: 1m }",
            "rules.yaml: rate_limits.endpoints[0].limit: invalid value: integer `-5`, expected u64",
        ),
        (
            "{ limit: 5, window: 1m }",
            "rules.yaml: rate_limits.endpoints[0]: missing field `path`",
        ),
        (
            "{ path: /a, limit: 5, window: [1m] }",
            "rules.yaml: rate_limits.endpoints[0].window: invalid type: sequence, expected a \
             string or an integer",
        ),
        (
            "{ path: /a, limit: 5, window: 1m, shadow: maybe }",
            "rules.yaml: rate_limits.endpoints[0].shadow: invalid type: string \"maybe\", \
             expected a boolean",
        ),
        (
            "{ path: /a, limit: 5, window: 1m, strictness: strict }",
            "rules.yaml: rate_limits.endpoints[0].strictness: unknown variant `strict`, expected \
             `soft` or `hard`",
        ),
        (
            "{ path: /a, limit: 5, window: 1m, on_failure: retry }",
            "rules.yaml: rate_limits.endpoints[0].on_failure: unknown variant `retry`, expected \
             one of `local`, `open`, `closed`",
        ),
    ];
    for (endpoint, want) in cases {
        assert_eq!(refused(&endpoints(&[endpoint])), want);
    }
    assert_eq!(
        refused("{}"),
        "rules.yaml: (top level): missing field `rate_limits`"
    );
    assert_eq!(
        refused("version: -1\nrate_limits: {}\n"),
        "rules.yaml: version: invalid value: integer `-1`, expected u64"
    );
}

#[test]
fn duplicate_rule_names_both_indices() {
    let err = refused(&endpoints(&[
        "{ path: \"/api/orders/{id}\", method: POST, limit: 5, window: 1m }",
        "{ path: /api/other, limit: 5, window: 1m }",
        "{ path: /api/orders/*, method: post, limit: 9, window: 1h, key: user_id }",
    ]));
    assert_eq!(
        err,
        "rules.yaml: rate_limits.endpoints[2]: duplicate rule: same method, path and key as \
         rate_limits.endpoints[0] (give both an `id` to enforce two limits on one endpoint)"
    );

    // A different method or key is a different rule.
    parse(&endpoints(&[
        "{ path: /a, method: POST, limit: 5, window: 1m }",
        "{ path: /a, method: GET, limit: 5, window: 1m }",
        "{ path: /a, limit: 5, window: 1m }",
        "{ path: /a, limit: 5, window: 1m, key: ip }",
    ]));

    // Named apart on purpose, two limits on one endpoint are fine, and both apply.
    let rules = parse(&endpoints(&[
        "{ id: a-per-second, path: /a, limit: 5, window: 1s }",
        "{ id: a-per-day, path: /a, limit: 500, window: 1d }",
    ]));
    let req = Request {
        user_id: Some("u"),
        ..Request::new("GET", "/a")
    };
    assert_eq!(
        matched(&rules, &req),
        names(&[
            ("a-per-second#limit", "user=u"),
            ("a-per-day#limit", "user=u")
        ])
    );

    // But one id may name one rule only.
    let err = refused(&endpoints(&[
        "{ id: a, path: /a, limit: 5, window: 1s }",
        "{ id: a, path: /b, limit: 5, window: 1s }",
    ]));
    assert_eq!(
        err,
        "rules.yaml: rate_limits.endpoints[1]: rule id \"a\" is already used by \
         rate_limits.endpoints[0]"
    );
}

#[test]
fn zero_limit_and_zero_window_are_refused() {
    let err = refused(&endpoints(&[
        "{ path: /a, limit: 5, window: 1m }",
        "{ path: /b, limit: 5, window: 0s }",
    ]));
    assert_eq!(
        err,
        "rules.yaml: rate_limits.endpoints[1].window: \"0s\" must be greater than zero"
    );
    let err = refused(&endpoints(&[
        "{ path: /a, limit: 5, window: 1m }",
        "{ path: /b, limit: 0, window: 1m }",
    ]));
    assert_eq!(
        err,
        "rules.yaml: rate_limits.endpoints[1].limit: 0 must be greater than zero"
    );
    assert_eq!(
        refused("rate_limits:\n  default: { requests_per_minute: 0 }\n"),
        "rules.yaml: rate_limits.default.requests_per_minute: 0 must be greater than zero"
    );
    assert_eq!(
        refused(&endpoints(&[
            "{ path: /a, algorithm: token_bucket, rate: 1/s, burst: 0 }"
        ])),
        "rules.yaml: rate_limits.endpoints[0].burst: 0 must be greater than zero"
    );
    assert_eq!(
        refused(&endpoints(&[
            "{ path: /a, limit: 1, window: 1m, tiers: { pro: 0 } }"
        ])),
        "rules.yaml: rate_limits.endpoints[0].tiers.pro: 0 must be greater than zero"
    );
}

#[test]
fn unknown_algorithm_is_refused() {
    let err = refused(&endpoints(&[
        "{ path: /a, algorithm: bogus, limit: 5, window: 1m }",
    ]));
    assert_eq!(
        err,
        "rules.yaml: rate_limits.endpoints[0].algorithm: unknown variant `bogus`, expected one \
         of `sliding_window`, `fixed_window`, `sliding_log`, `token_bucket`, `leaky_bucket`"
    );
}

#[test]
fn sliding_log_limit_is_capped_for_memory() {
    let err = refused(&endpoints(&[
        "{ path: /a, algorithm: sliding_log, limit: 100001, window: 1h }",
    ]));
    assert!(
        err.starts_with(
            "rules.yaml: rate_limits.endpoints[0].limit: 100001 is too large for sliding_log"
        ),
        "{err}"
    );
    parse(&endpoints(&[
        "{ path: /a, algorithm: sliding_log, limit: 100000, window: 1h }",
    ]));
}

#[test]
fn bad_path_patterns_are_refused() {
    let cases = [
        ("api/login", "\"api/login\" must start with \"/\""),
        ("/a/**/b", "\"/a/**/b\": \"**\" must be the last segment"),
        ("/a//b", "\"/a//b\" has an empty segment"),
        ("/a/", "\"/a/\" has an empty segment"),
        ("/a/{id", "\"/a/{id\": unclosed \"{\" in \"{id\""),
        ("/a/{}", "\"/a/{}\": a parameter needs a name, as in {id}"),
        (
            "/a/x{id}",
            "\"/a/x{id}\": \"{...}\" must be a whole segment, found \"x{id}\"",
        ),
        (
            "/a/b*",
            "\"/a/b*\": \"*\" and \"**\" must be whole segments, found \"b*\"",
        ),
        ("/a?b=1", "\"/a?b=1\" may not contain '?'"),
    ];
    for (path, want) in cases {
        let err = refused(&endpoints(&[&format!(
            "{{ path: \"{path}\", limit: 5, window: 1m }}"
        )]));
        assert_eq!(
            err,
            format!("rules.yaml: rate_limits.endpoints[0].path: {want}"),
            "{path}"
        );
    }
}

#[test]
fn bad_key_kinds_are_refused() {
    assert_eq!(
        refused(&endpoints(&[
            "{ path: /a, limit: 5, window: 1m, key: \"header:\" }"
        ])),
        "rules.yaml: rate_limits.endpoints[0].key: \"header:\" needs a header name, as in \
         header:x-tenant"
    );
    assert_eq!(
        refused(&endpoints(&[
            "{ path: /a, limit: 5, window: 1m, key: cookie }"
        ])),
        "rules.yaml: rate_limits.endpoints[0].key: unknown key kind \"cookie\"; expected user_id, \
         ip, api_key, header:<name> or global"
    );
    let rules = parse(&endpoints(&[
        "{ path: /a, limit: 5, window: 1m, key: header:X-Tenant }",
    ]));
    assert_eq!(
        rules.rules()[0].key(),
        &KeyKind::Header("x-tenant".to_owned())
    );
}

#[test]
fn bad_rates_and_durations_are_refused() {
    let cases = [
        (
            "{ path: /a, algorithm: token_bucket, rate: 10 }",
            "rate_limits.endpoints[0].rate: \"10\" is not a rate; expected N/s, N/m, N/h, N/d or \
             N/<duration>, as in 10/s or 100/5m",
        ),
        (
            "{ path: /a, algorithm: token_bucket, rate: 10/fortnight }",
            "rate_limits.endpoints[0].rate: \"10/fortnight\" is not a rate",
        ),
        (
            "{ path: /a, algorithm: leaky_bucket, rate: 0/s }",
            "rate_limits.endpoints[0].rate: \"0/s\" must be greater than zero",
        ),
        (
            "{ path: /a, algorithm: token_bucket, rate: 2000000000/s }",
            "rate_limits.endpoints[0].rate: \"2000000000/s\" is faster than one request per \
             nanosecond",
        ),
        (
            "{ path: /a, limit: 5, window: 1x }",
            "rate_limits.endpoints[0].window: \"1x\" is not a duration; expected <n>ms, <n>s, \
             <n>m, <n>h or <n>d, as in 1m",
        ),
        (
            "{ path: /a, limit: 5, window: 60 }",
            "rate_limits.endpoints[0].window: \"60\" has no unit",
        ),
        (
            "{ path: /a, limit: 5, window: 1.5m }",
            "rate_limits.endpoints[0].window: \"1.5m\" is not a duration",
        ),
    ];
    for (endpoint, want) in cases {
        let err = refused(&endpoints(&[endpoint]));
        assert!(err.starts_with(&format!("rules.yaml: {want}")), "{err}");
    }
}

#[test]
fn parameters_must_fit_the_algorithm() {
    let cases = [
        (
            "{ path: /a, rate: 10/s }",
            "rules.yaml: rate_limits.endpoints[0].rate: `rate` is for token_bucket and \
             leaky_bucket; sliding_window takes `limit` and `window`",
        ),
        (
            "{ path: /a, limit: 5, window: 1m, burst: 5 }",
            "rules.yaml: rate_limits.endpoints[0].burst: `burst` is for token_bucket and \
             leaky_bucket; sliding_window takes `limit` and `window`",
        ),
        (
            "{ path: /a, algorithm: token_bucket, limit: 5, rate: 1/s }",
            "rules.yaml: rate_limits.endpoints[0].limit: `limit` is for window algorithms; \
             token_bucket takes `rate` and `burst`",
        ),
        (
            "{ path: /a, algorithm: token_bucket, rate: 1/s, mode: shaper }",
            "rules.yaml: rate_limits.endpoints[0].mode: `mode` is for leaky_bucket only, not \
             token_bucket",
        ),
        (
            "{ path: /a, limit: 5 }",
            "rules.yaml: rate_limits.endpoints[0]: missing `window`: sliding_window takes `limit` \
             and `window` (as in 1m)",
        ),
        (
            "{ path: /a, algorithm: leaky_bucket }",
            "rules.yaml: rate_limits.endpoints[0]: missing `rate`: leaky_bucket takes `rate` (as \
             in 10/s) and `burst`",
        ),
        (
            "{ path: /a, limit: 5, window: 1m, tiers: { pro: 5/s } }",
            "rules.yaml: rate_limits.endpoints[0].tiers.pro: \"5/s\" is not a limit; \
             sliding_window takes an integer per tier (rates are for token_bucket and \
             leaky_bucket)",
        ),
        (
            "{ path: /a, algorithm: token_bucket, rate: 1/s, tiers: { pro: 50 } }",
            "rules.yaml: rate_limits.endpoints[0].tiers.pro: \"50\" is not a rate; expected N/s, \
             N/m, N/h, N/d or N/<duration>, as in 10/s or 100/5m",
        ),
        (
            "{ path: /a, method: \"*\", limit: 5, window: 1m }",
            "rules.yaml: rate_limits.endpoints[0].method: \"*\" is not an HTTP method; leave \
             `method` out to match any method",
        ),
    ];
    for (endpoint, want) in cases {
        assert_eq!(refused(&endpoints(&[endpoint])), want);
    }
}

#[test]
fn tier_override_must_name_a_defined_tier() {
    assert_eq!(
        refused(&endpoints(&[
            "{ path: /a, limit: 5, window: 1m, tiers: { gold: 50 } }"
        ])),
        "rules.yaml: rate_limits.endpoints[0].tiers.gold: tier \"gold\" is not defined under \
         rate_limits.tiers"
    );
    assert_eq!(
        refused(
            "rate_limits:\n  endpoints:\n    - { path: /a, limit: 5, window: 1m, tiers: { pro: 50 \
             } }\n"
        ),
        "rules.yaml: rate_limits.endpoints[0].tiers.pro: tier \"pro\" is not defined under \
         rate_limits.tiers"
    );
}

#[test]
fn short_form_needs_a_limit() {
    assert_eq!(
        refused("rate_limits:\n  default: {}\n"),
        "rules.yaml: rate_limits.default: no limit given; expected at least one of \
         requests_per_second, requests_per_minute, requests_per_hour, requests_per_day"
    );
    assert!(
        refused("rate_limits:\n  tiers:\n    pro: { shadow: true }\n")
            .starts_with("rules.yaml: rate_limits.tiers.pro: no limit given")
    );
    // A tier may be declared without limits of its own, for endpoint overrides to name.
    let rules = parse("rate_limits:\n  tiers:\n    pro:\n    free: {}\n");
    assert_eq!(rules.tiers().collect::<Vec<_>>(), ["pro", "free"]);
    assert!(rules.rules().is_empty());
}

#[test]
fn yaml_syntax_errors_carry_line_and_column() {
    let yaml = "rate_limits:\n  default:\n    requests_per_minute: 60\n   requests_per_hour: 5\n";
    let err = RuleSet::from_yaml("rules.yaml", yaml).unwrap_err();
    assert_eq!(err.position(), Some((4, 4)));
    assert_eq!(err.file(), "rules.yaml");
    assert_eq!(err.field(), None);
    assert_eq!(
        err.to_string(),
        "rules.yaml: line 4, column 4: did not find expected key, while parsing a block mapping \
         at line 2 column 3"
    );

    let yaml = "rate_limits:\n  endpoints:\n    - { path: /a, limit: 5\n";
    assert_eq!(
        refused(yaml),
        "rules.yaml: line 4, column 1: did not find expected ',' or '}', while parsing a flow \
         mapping at line 3 column 7"
    );

    // A repeated key is refused where it repeats, not silently overwritten.
    let yaml = "rate_limits:\n  default: { requests_per_minute: 60, requests_per_minute: 5 }\n";
    assert_eq!(
        refused(yaml),
        "rules.yaml: line 2, column 12: rate_limits.default: duplicate entry with key \
         \"requests_per_minute\""
    );
}

#[test]
fn unusable_documents_are_refused() {
    assert_eq!(
        refused(""),
        "rules.yaml: the file holds no rules; expected a `rate_limits:` mapping"
    );
    assert_eq!(
        refused("# nothing\n"),
        "rules.yaml: the file holds no rules; expected a `rate_limits:` mapping"
    );
    assert!(refused("a: 1\n---\nb: 2\n").contains("more than one document"));
    assert!(refused("a: &a [*a]\n").contains("recursion limit exceeded"));
}

#[test]
fn config_error_exposes_its_parts() {
    let err = RuleSet::from_yaml(
        "deploy/rules.yaml",
        &endpoints(&["{ path: /a, limit: 5, window: 0s }"]),
    )
    .unwrap_err();
    assert_eq!(err.file(), "deploy/rules.yaml");
    assert_eq!(err.field(), Some("rate_limits.endpoints[0].window"));
    assert_eq!(err.reason(), "\"0s\" must be greater than zero");
    assert_eq!(err.position(), None);
    assert!(matches!(err, ConfigError::Invalid { .. }));
}

// ---------------------------------------------------------------------------------------------
// Matching.

#[test]
fn design_rules_match_requests() {
    let rules = parse(DESIGN_SHORT_FORM);

    // An endpoint rule, plus the tier's limits; `default` stays out since an endpoint matched.
    let req = Request {
        ip: Some("203.0.113.7"),
        user_id: Some("u-42"),
        tier: Some("free"),
        ..Request::new("POST", "/api/login")
    };
    assert_eq!(
        matched(&rules, &req),
        names(&[
            ("POST /api/login key=ip#limit", "ip=203.0.113.7"),
            ("tiers.free#requests_per_minute", "user=u-42"),
            ("tiers.free#requests_per_day", "user=u-42"),
        ])
    );

    // Same path, other method: no endpoint rule, so `default`, keyed by the user.
    let req = Request {
        user_id: Some("u-42"),
        ..Request::new("GET", "/api/login")
    };
    assert_eq!(
        matched(&rules, &req),
        names(&[
            ("default#requests_per_minute", "user=u-42"),
            ("default#requests_per_hour", "user=u-42"),
        ])
    );

    // No user: `default` counts by IP. No user and no IP: nothing can be counted.
    let req = Request {
        ip: Some("198.51.100.1"),
        ..Request::new("GET", "/elsewhere")
    };
    assert_eq!(
        matched(&rules, &req),
        names(&[
            ("default#requests_per_minute", "ip=198.51.100.1"),
            ("default#requests_per_hour", "ip=198.51.100.1"),
        ])
    );
    assert!(matched(&rules, &Request::new("GET", "/elsewhere")).is_empty());

    // Methods compare ignoring case; an undeclared tier adds nothing.
    let req = Request {
        user_id: Some("u"),
        tier: Some("platinum"),
        ..Request::new("get", "/api/search")
    };
    assert_eq!(
        matched(&rules, &req),
        names(&[("GET /api/search key=user_id#limit", "user=u")])
    );
}

#[test]
fn keys_fall_back_to_the_ip() {
    let rules = parse(&endpoints(&[
        "{ path: /u, limit: 1, window: 1m, key: user_id }",
        "{ path: /k, limit: 1, window: 1m, key: api_key }",
        "{ path: /h, limit: 1, window: 1m, key: header:X-Tenant }",
        "{ path: /i, limit: 1, window: 1m, key: ip }",
        "{ path: /g, limit: 1, window: 1m, key: global }",
    ]));
    let headers = [("accept", "*/*"), ("x-TENANT", "acme")];
    let full = Request {
        ip: Some("192.0.2.1"),
        user_id: Some("u-1"),
        api_key: Some("k-1"),
        headers: &headers,
        ..Request::default()
    };
    let ip_only = Request {
        ip: Some("192.0.2.1"),
        ..Request::default()
    };
    let empty_values = Request {
        ip: Some("192.0.2.1"),
        user_id: Some(""),
        api_key: Some(""),
        headers: &[("x-tenant", "")],
        ..Request::default()
    };
    let nothing = Request::default();
    assert_eq!(key_at(&rules, "/u", &full), Some(Key::UserId("u-1")));
    assert_eq!(key_at(&rules, "/k", &full), Some(Key::ApiKey("k-1")));
    assert_eq!(key_at(&rules, "/h", &full), Some(Key::Header("acme")));
    assert_eq!(key_at(&rules, "/i", &full), Some(Key::Ip("192.0.2.1")));
    assert_eq!(key_at(&rules, "/g", &full), Some(Key::Global));

    for fallback in [&ip_only, &empty_values] {
        for path in ["/u", "/k", "/h", "/i"] {
            assert_eq!(
                key_at(&rules, path, fallback),
                Some(Key::Ip("192.0.2.1")),
                "{path}"
            );
        }
    }
    for path in ["/u", "/k", "/h", "/i"] {
        assert_eq!(key_at(&rules, path, &nothing), None, "{path}");
    }
    assert_eq!(key_at(&rules, "/g", &nothing), Some(Key::Global));
    assert_eq!(Key::Global.value(), "");
    assert_eq!(Key::Header("acme").kind(), "header");
}

/// The key of the first match of a GET of `path` with `base`'s identity.
fn key_at<'a>(rules: &'a RuleSet, path: &'a str, base: &Request<'a>) -> Option<Key<'a>> {
    let req = Request {
        path,
        method: "GET",
        ..*base
    };
    let mut out = Vec::new();
    rules.matches(&req, &mut out);
    out.first().map(|m| m.key)
}

#[test]
fn patterns_match_and_every_matching_rule_applies() {
    let rules = parse(&endpoints(&[
        "{ id: literal, path: /api/orders/new, limit: 1, window: 1m }",
        "{ id: param, path: \"/api/orders/{id}\", limit: 1, window: 1m }",
        "{ id: star, path: /api/*/new, method: POST, limit: 1, window: 1m }",
        "{ id: rest, path: /api/**, limit: 1, window: 1m }",
        "{ id: root, path: /, limit: 1, window: 1m }",
    ]));
    let ids = |method, path| -> Vec<String> {
        let req = Request {
            user_id: Some("u"),
            ..Request::new(method, path)
        };
        let mut out = Vec::new();
        rules.matches(&req, &mut out);
        out.iter().map(|m| m.rule.id().to_owned()).collect()
    };
    // All matching rules, in file order, whatever order the trie found them in.
    assert_eq!(
        ids("POST", "/api/orders/new"),
        ["literal", "param", "star", "rest"]
    );
    assert_eq!(ids("GET", "/api/orders/new"), ["literal", "param", "rest"]);
    assert_eq!(ids("GET", "/api/orders/42"), ["param", "rest"]);
    assert_eq!(ids("GET", "/api/orders"), ["rest"]);
    assert_eq!(ids("GET", "/api"), ["rest"]);
    assert_eq!(ids("GET", "/api/a/b/c/d"), ["rest"]);
    assert_eq!(ids("GET", "/"), ["root"]);
    assert_eq!(ids("GET", ""), ["root"]);
    assert!(ids("GET", "/apix").is_empty());
    // Doubled and trailing slashes, queries and fragments do not dodge a rule.
    assert_eq!(ids("GET", "//api//orders/42/?x=/y#z"), ["param", "rest"]);
}

#[test]
fn tier_override_replaces_the_limit_for_that_tier() {
    let rules = parse(DESIGN_FULL_FORM);
    let limit_for = |tier| {
        let req = Request {
            user_id: Some("u"),
            tier,
            ..Request::new("POST", "/api/orders/9")
        };
        matched(&rules, &req)
    };
    assert_eq!(
        limit_for(None),
        names(&[("POST /api/orders/{id} key=user_id#limit", "user=u")])
    );
    assert_eq!(
        limit_for(Some("pro")),
        names(&[
            ("POST /api/orders/{id} key=user_id#tier=pro", "user=u"),
            ("tiers.pro#requests_per_minute", "user=u"),
        ])
    );
    assert_eq!(
        limit_for(Some("enterprise"))[0].0,
        "POST /api/orders/{id} key=user_id#tier=enterprise"
    );
}

#[test]
fn a_thousand_literal_rules_each_match_their_own_path() {
    let lines: Vec<String> = (0..1_000)
        .map(|i| format!("{{ path: /api/r{i}/items, limit: {}, window: 1m }}", i + 1))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut yaml = endpoints(&lines);
    yaml.push_str("  default: { requests_per_minute: 7 }\n");
    let rules = parse(&yaml);
    assert_eq!(rules.rules().len(), 1_001 + 1);

    let paths: Vec<String> = (0..1_000).map(|i| format!("/api/r{i}/items")).collect();
    let mut out = Vec::with_capacity(4);
    for (i, path) in (1..).zip(&paths) {
        let req = Request {
            ip: Some("192.0.2.1"),
            ..Request::new("GET", path)
        };
        rules.matches(&req, &mut out);
        assert_eq!(out.len(), 1, "{path}");
        assert_eq!(out[0].rule.id(), format!("* {path} key=user_id"));
        assert_eq!(out[0].limit.limiter(), &sliding(i, MINUTE));
    }
    let req = Request {
        ip: Some("192.0.2.1"),
        ..Request::new("GET", "/api/r1000/items")
    };
    rules.matches(&req, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].rule.id(), "default");
}

/// The no-allocation promise, checked without a global allocator (which would count every
/// test in this shared binary): once the buffer has room, matching neither grows it nor moves
/// it, across many requests of every shape, and `recycle` keeps the block across lifetimes.
#[test]
fn matching_reuses_the_callers_buffer() {
    let rules = parse(&format!(
        "{}\n  default: {{ requests_per_minute: 60, requests_per_hour: 1000 }}\n",
        endpoints(&[
            "{ path: /api/login, method: POST, limit: 5, window: 1m, key: ip }",
            "{ path: \"/api/orders/{id}\", limit: 5, window: 1m, tiers: { pro: 50 } }",
            "{ path: /api/**, limit: 100, window: 1m, key: header:x-tenant }",
        ])
        .trim_end()
    ));
    // The buffer outlives every request: between requests it waits, empty, in `spare`, typed
    // for no request in particular; `recycle` re-types it for each request in turn.
    let mut spare: Vec<Match<'_>> = Vec::with_capacity(16);
    let block = spare.as_ptr();
    let headers = [("X-Tenant", "acme")];
    for i in 0..1_000 {
        let path = format!("/api/orders/{i}");
        let tier = if i % 2 == 0 {
            Some("pro")
        } else {
            Some("free")
        };
        for (method, path) in [
            ("POST", "/api/login"),
            ("GET", path.as_str()),
            ("GET", "/x"),
        ] {
            let req = Request {
                ip: Some("192.0.2.1"),
                user_id: Some("u"),
                tier,
                headers: &headers,
                ..Request::new(method, path)
            };
            let mut out = recycle(spare);
            rules.matches(&req, &mut out);
            assert!(!out.is_empty());
            assert_eq!((out.capacity(), out.as_ptr()), (16, block));
            spare = recycle(out);
            assert_eq!(
                (spare.len(), spare.capacity(), spare.as_ptr()),
                (0, 16, block)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

/// A pattern over a tiny alphabet, so that random paths hit it often.
fn pattern() -> impl Strategy<Value = String> {
    let segment = prop_oneof![Just("a"), Just("b"), Just("{id}"), Just("*")];
    (prop::collection::vec(segment, 0..4), any::<bool>()).prop_map(|(segments, rest)| {
        // Parameter names must differ within a pattern; number them by position.
        let mut p: String = segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if *s == "{id}" {
                    format!("/{{id{i}}}")
                } else {
                    format!("/{s}")
                }
            })
            .collect();
        if rest {
            p.push_str("/**");
        }
        if p.is_empty() {
            p.push('/');
        }
        p
    })
}

fn request_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![Just("a"), Just("b"), Just("c"), Just("")];
    // A query or fragment, sometimes holding a `/`, is cut off before matching.
    let tail = prop_oneof![Just(""), Just(""), Just("?x=/a"), Just("#b"), Just("?")];
    (prop::collection::vec(segment, 0..6), tail)
        .prop_map(|(s, tail)| format!("/{}{tail}", s.join("/")))
}

proptest! {
    #![proptest_config(config())]

    /// The trie finds exactly the endpoint rules whose pattern matches on its own, in file
    /// order, whatever mix of literals, wildcards and `**` the rules use.
    #[test]
    fn trie_agrees_with_each_pattern_alone(
        patterns in prop::collection::vec(pattern(), 1..12),
        paths in prop::collection::vec(request_path(), 1..8),
    ) {
        let lines: Vec<String> = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{{ id: r{i}, path: \"{p}\", limit: 1, window: 1s }}"))
            .collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let rules = parse(&endpoints(&lines));
        let mut out = Vec::new();
        for path in &paths {
            let req = Request { user_id: Some("u"), ..Request::new("GET", path) };
            rules.matches(&req, &mut out);
            let found: Vec<&str> = out.iter().map(|m| m.rule.id()).collect();
            let expected: Vec<&str> = rules
                .rules()
                .iter()
                .filter(|r| match r.selector() {
                    Selector::Endpoint { path: p, .. } => p.matches(path),
                    _ => false,
                })
                .map(|r| r.id())
                .collect();
            prop_assert_eq!(found, expected, "path {}", path);
        }
    }

    /// Whatever the text, loading answers `Ok` or `Err`; it never panics.
    #[test]
    fn any_text_loads_or_is_refused(text in "[ -~\n\t{}\\[\\]:/*-]{0,200}") {
        let _ = RuleSet::from_yaml("fuzz.yaml", &text);
    }

    /// Near-valid files built from real fields and odd values never panic either.
    #[test]
    fn mangled_endpoints_load_or_are_refused(
        path in "[/a-z{}*?]{0,12}",
        window in "[0-9a-z./]{0,8}",
        rate in "[0-9a-z./]{0,8}",
        algorithm in prop_oneof![
            Just("sliding_window"), Just("fixed_window"), Just("sliding_log"),
            Just("token_bucket"), Just("leaky_bucket"),
        ],
        key in "(user_id|ip|api_key|global|header:[a-z-]{0,4}|[a-z:]{0,6})",
        limit in any::<u64>(),
    ) {
        let yaml = endpoints(&[&format!(
            "{{ path: \"{path}\", algorithm: {algorithm}, limit: {limit}, window: \"{window}\", \
             rate: \"{rate}\", key: \"{key}\" }}"
        )]);
        let _ = RuleSet::from_yaml("fuzz.yaml", &yaml);
        let yaml = endpoints(&[&format!(
            "{{ path: \"{path}\", algorithm: {algorithm}, rate: \"{rate}\", \
             tiers: {{ pro: \"{window}\" }} }}"
        )]);
        let _ = RuleSet::from_yaml("fuzz.yaml", &yaml);
    }
}

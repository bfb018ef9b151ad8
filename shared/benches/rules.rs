//! Matching one request against a rule set (`rules/match`), the cost every request pays at the
//! edge before any limiter runs.
//!
//! Two rule sets per size, 1, 100 and 1,000 endpoint rules: all literal (`/svc<i>/items`), and
//! all with a `{id}` segment (`/svc<i>/items/{id}`). Each also has `default` and two tiers, and
//! the request carries a tier, so the tier lookup is in the number. The request matches the
//! last rule, so a matcher that scanned the rules would show it here: the trie should make
//! every size cost about the same. The output buffer is reused, as the edge reuses it, so no
//! iteration allocates.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use shared::rules::{Request, RuleSet};

/// Rule counts per set.
const SIZES: [usize; 3] = [1, 100, 1_000];

/// The `rules/match` group.
pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("rules/match");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let literal = rule_set(size, "");
        let path = format!("/svc{}/items", size - 1);
        group.bench_function(BenchmarkId::new("literal", size), |b| {
            bench_one(b, &literal, &path)
        });

        let patterned = rule_set(size, "/{id}");
        let path = format!("/svc{}/items/42", size - 1);
        group.bench_function(BenchmarkId::new("param", size), |b| {
            bench_one(b, &patterned, &path)
        });
    }
    group.finish();
}

/// Times `matches` of a GET of `path` by a `pro` user.
fn bench_one(b: &mut criterion::Bencher<'_>, rules: &RuleSet, path: &str) {
    let req = Request {
        ip: Some("203.0.113.7"),
        user_id: Some("u-42"),
        tier: Some("pro"),
        ..Request::new("GET", path)
    };
    let mut out = Vec::with_capacity(8);
    b.iter(|| {
        rules.matches(black_box(&req), &mut out);
        black_box(out.len())
    });
    assert_eq!(out.len(), 2, "the endpoint rule and the tier's limit");
}

/// `size` endpoint rules `/svc<i>/items<suffix>`, plus `default` and two tiers.
fn rule_set(size: usize, suffix: &str) -> RuleSet {
    let mut yaml = String::from(
        "rate_limits:\n  default: { requests_per_minute: 60 }\n  tiers:\n    free: { \
         requests_per_minute: 30 }\n    pro: { requests_per_minute: 100 }\n  endpoints:\n",
    );
    for i in 0..size {
        yaml.push_str(&format!(
            "    - {{ path: \"/svc{i}/items{suffix}\", limit: 100, window: 1m }}\n"
        ));
    }
    RuleSet::from_yaml("bench.yaml", &yaml).expect("the bench rules are valid")
}

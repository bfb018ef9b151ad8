//! What the generator sends: one request template per mix entry, each aimed at a rule of the
//! rules file, and the limits each template is counted under.
//!
//! An entry is `RULE[@TIER]` with a weight (`--mix login=5,search@pro=2,tiers.free=1`):
//!
//! - an endpoint rule (its `id:` or derived name) sends its method and a path its pattern
//!   matches (`{id}` and `*` become `1`, `**` becomes `x`);
//! - `default` sends `GET` to a path no endpoint selects;
//! - `tiers.<name>` is `default@<name>`;
//! - `@TIER` adds `"tier"` to the body, which picks the rule's per-tier override and adds the
//!   tier's own limits.
//!
//! Every body carries a distinct client IP per key rank, so `ip` rules see many clients and not
//! the generator's one address, and the identity the rule counts by (`user_id`, `api_key` or
//! its header) for the same rank. Identities are namespaced by a per-run id, so a second run
//! against the same topology starts on fresh keys rather than on windows the first one spent.
//!
//! Which limits a request meets is asked of the rules themselves ([`RuleSet::matches`]) once
//! per entry, so it is exactly what the edges compute, tiers and fallbacks included.

use std::{collections::HashMap, fmt, io::Write, str::FromStr};

use shared::{
    Key, LimitId, Request, RuleSet, Selector, Strictness, algorithm::Limiter, rules::Segment,
};

use super::sample::{Rng, Weighted, parse_weight};

/// One `--mix` item: `RULE[@TIER]=WEIGHT`.
#[derive(Clone, Debug, PartialEq)]
pub struct MixWeight {
    /// The rule aimed at, as written (`@TIER` is split off only once the rules are read, as a
    /// derived rule name may hold an `@`).
    pub target: String,
    /// Its share of the requests, relative to the others.
    pub weight: f64,
}

impl FromStr for MixWeight {
    type Err = String;

    fn from_str(s: &str) -> Result<MixWeight, String> {
        // Derived rule names hold `=` (`POST /api/login key=ip`): the weight is after the last.
        let (target, weight) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?} is not RULE[@TIER]=WEIGHT"))?;
        Ok(MixWeight {
            target: target.trim().to_owned(),
            weight: parse_weight(s, weight)?,
        })
    }
}

/// Which identity of a request a limit counts it by; with the key rank, a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyField {
    /// `user_id`.
    User,
    /// `ip`.
    Ip,
    /// `api_key`.
    ApiKey,
    /// A header's value.
    Header,
    /// The one key of a `global` rule.
    Global,
}

/// A limit some entry's requests meet, copied out of the rules.
#[derive(Clone, Debug)]
pub struct TrackedLimit {
    /// The rule's id, as the edge names it in answers and metrics.
    pub rule: String,
    /// The limit's canonical name (`default#requests_per_minute`, `search#tier=pro`).
    pub name: String,
    /// Its algorithm and parameters.
    pub limiter: Limiter,
    /// The rule's strictness.
    pub strictness: Strictness,
    /// True for a shadow rule, which denies nothing.
    pub shadow: bool,
}

/// One request template.
#[derive(Clone, Debug)]
pub struct Entry {
    /// As given to `--mix`: `login`, `search@pro`, `tiers.free`.
    pub name: String,
    method: String,
    path: String,
    tier: Option<String>,
    user: bool,
    api_key: bool,
    header: Option<String>,
    /// The limits a request of this entry meets, as indices into [`Mix::limits`], each with
    /// the identity it counts by.
    pub matches: Vec<(usize, KeyField)>,
}

/// The entries, how often each is sent, and every limit they meet.
#[derive(Clone, Debug)]
pub struct Mix {
    /// The request templates.
    pub entries: Vec<Entry>,
    /// Every limit an entry meets.
    pub limits: Vec<TrackedLimit>,
    choice: Weighted,
    /// Namespaces this run's identities: 8 hex digits.
    run: u32,
}

/// A path no endpoint is expected to select, for `default` and tier entries.
const UNMATCHED_PATH: &str = "/loadgen/unmatched";

impl Mix {
    /// The mix `weights` asks for over `rules`; with no weights, one entry per rule, equally
    /// weighted. `run` namespaces the identities sent.
    ///
    /// # Errors
    ///
    /// A weight that names no rule, or a tier the rules do not declare, or a rule no request
    /// can be made to meet (a `default` when some endpoint selects every path), or weights
    /// that add up to nothing.
    pub fn new(rules: &RuleSet, weights: &[MixWeight], run: u32) -> Result<Mix, String> {
        let weights = if weights.is_empty() {
            rules
                .rules()
                .iter()
                .map(|r| MixWeight {
                    target: r.id().to_owned(),
                    weight: 1.0,
                })
                .collect()
        } else {
            weights.to_vec()
        };
        let mut mix = Mix {
            entries: Vec::new(),
            limits: Vec::new(),
            choice: Weighted::new(&[1.0]).ok_or("a weight of one is a distribution")?,
            run,
        };
        let mut tracked: HashMap<LimitId, usize> = HashMap::new();
        for w in &weights {
            let entry = mix.entry(rules, &w.target, &mut tracked)?;
            mix.entries.push(entry);
        }
        let w: Vec<f64> = weights.iter().map(|w| w.weight).collect();
        mix.choice = Weighted::new(&w).ok_or("the --mix weights add up to nothing")?;
        Ok(mix)
    }

    /// The template for `target`, registering the limits it meets.
    fn entry(
        &mut self,
        rules: &RuleSet,
        target: &str,
        tracked: &mut HashMap<LimitId, usize>,
    ) -> Result<Entry, String> {
        let (rule_id, tier) = split_tier(rules, target)?;
        let rule = rules.rule(rule_id).ok_or_else(|| {
            let known: Vec<&str> = rules.rules().iter().map(|r| r.id()).collect();
            format!("--mix {target:?}: no rule {rule_id:?}; the rules are {known:?}")
        })?;
        let mut entry = Entry {
            name: target.to_owned(),
            method: "GET".to_owned(),
            path: UNMATCHED_PATH.to_owned(),
            tier: tier.map(str::to_owned),
            user: false,
            api_key: false,
            header: None,
            matches: Vec::new(),
        };
        match rule.selector() {
            Selector::Endpoint { path, method } => {
                entry.path = concrete_path(path.segments());
                if let Some(m) = method {
                    entry.method.clone_from(m);
                }
            }
            Selector::Default => {}
            Selector::Tier(name) => entry.tier = Some(name.clone()),
        }
        match rule.key() {
            shared::KeyKind::UserId => entry.user = true,
            shared::KeyKind::ApiKey => entry.api_key = true,
            shared::KeyKind::Header(name) => entry.header = Some(name.clone()),
            shared::KeyKind::Ip | shared::KeyKind::Global => {}
        }
        // Which limits a request of this entry meets: asked of the rules, on rank 0.
        let (user, ip, api_key, header) = self.identities(0);
        let header_pair = entry.header.as_deref().map(|h| (h, header.as_str()));
        let headers: Vec<(&str, &str)> = header_pair.into_iter().collect();
        let request = Request {
            path: &entry.path,
            method: &entry.method,
            ip: Some(&ip),
            user_id: entry.user.then_some(user.as_str()),
            api_key: entry.api_key.then_some(api_key.as_str()),
            tier: entry.tier.as_deref(),
            headers: &headers,
        };
        let mut matches = Vec::new();
        rules.matches(&request, &mut matches);
        if !matches.iter().any(|m| m.rule.id() == rule.id()) {
            return Err(format!(
                "--mix {target:?}: no request meets rule {:?} ({} {} selects {:?})",
                rule.id(),
                entry.method,
                entry.path,
                matches.iter().map(|m| m.rule.id()).collect::<Vec<_>>()
            ));
        }
        for m in &matches {
            let index = *tracked.entry(m.limit.id()).or_insert_with(|| {
                self.limits.push(TrackedLimit {
                    rule: m.rule.id().to_owned(),
                    name: m.limit.name().to_owned(),
                    limiter: m.limit.limiter().clone(),
                    strictness: m.rule.strictness(),
                    shadow: m.rule.shadow(),
                });
                self.limits.len() - 1
            });
            let field = match m.key {
                Key::UserId(_) => KeyField::User,
                Key::Ip(_) => KeyField::Ip,
                Key::ApiKey(_) => KeyField::ApiKey,
                Key::Header(_) => KeyField::Header,
                Key::Global => KeyField::Global,
            };
            entry.matches.push((index, field));
        }
        Ok(entry)
    }

    /// An entry, drawn by weight.
    pub fn pick(&self, rng: &mut Rng) -> usize {
        self.choice.sample(rng)
    }

    /// The share of requests entry `i` gets.
    pub fn share(&self, i: usize) -> f64 {
        self.choice.probability(i)
    }

    /// Writes entry `entry`'s `POST /v1/check` body for key rank `rank` into `out` (cleared).
    pub fn body(&self, entry: &Entry, rank: u32, out: &mut Vec<u8>) {
        out.clear();
        let run = self.run;
        // Writing into a Vec cannot fail; rule paths, methods and tier names are quoted by
        // serde_json, our identities are hex and dashes.
        let _ = write!(out, "{{\"path\":{},\"method\":", json(&entry.path));
        let _ = write!(out, "{}", json(&entry.method));
        let _ = write!(
            out,
            ",\"ip\":\"2001:db8:{:x}:{:x}::{:x}:{:x}\"",
            run >> 16,
            run & 0xffff,
            rank >> 16,
            rank & 0xffff
        );
        if entry.user {
            let _ = write!(out, ",\"user_id\":\"lg-{run:08x}-u{rank}\"");
        }
        if entry.api_key {
            let _ = write!(out, ",\"api_key\":\"lg-{run:08x}-k{rank}\"");
        }
        if let Some(tier) = &entry.tier {
            let _ = write!(out, ",\"tier\":{}", json(tier));
        }
        if let Some(header) = &entry.header {
            let _ = write!(
                out,
                ",\"headers\":{{{}:\"lg-{run:08x}-h{rank}\"}}",
                json(header)
            );
        }
        out.push(b'}');
    }

    /// The identities of rank `rank`: user id, IP, API key, header value, as [`Mix::body`]
    /// writes them.
    fn identities(&self, rank: u32) -> (String, String, String, String) {
        let run = self.run;
        (
            format!("lg-{run:08x}-u{rank}"),
            format!(
                "2001:db8:{:x}:{:x}::{:x}:{:x}",
                run >> 16,
                run & 0xffff,
                rank >> 16,
                rank & 0xffff
            ),
            format!("lg-{run:08x}-k{rank}"),
            format!("lg-{run:08x}-h{rank}"),
        )
    }

    /// The key `field` of rank `rank` names, as the edge sees it.
    pub fn key_text(&self, field: KeyField, rank: u32) -> String {
        let (user, ip, api_key, header) = self.identities(rank);
        match field {
            KeyField::User => format!("user_id {user}"),
            KeyField::Ip => format!("ip {ip}"),
            KeyField::ApiKey => format!("api_key {api_key}"),
            KeyField::Header => format!("header {header}"),
            KeyField::Global => "global".to_owned(),
        }
    }
}

impl fmt::Display for Entry {
    /// The request it sends: `METHOD path [tier=name]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(tier) = &self.tier {
            write!(f, " tier={tier}")?;
        }
        Ok(())
    }
}

/// `target` as a rule id and a tier: `tiers.pro` is `default` with tier `pro`, `x@pro` is `x`
/// with tier `pro` when `pro` is a declared tier (else the `@` is part of the name).
fn split_tier<'t>(rules: &RuleSet, target: &'t str) -> Result<(&'t str, Option<&'t str>), String> {
    if let Some((rule, tier)) = target.rsplit_once('@')
        && rules.rule(target).is_none()
    {
        if !rules.tiers().any(|t| t == tier) {
            let tiers: Vec<&str> = rules.tiers().collect();
            return Err(format!(
                "--mix {target:?}: no tier {tier:?}; the rules declare {tiers:?}"
            ));
        }
        return Ok((rule, Some(tier)));
    }
    Ok((target, None))
}

/// A path `segments` match: `{id}` and `*` as `1`, `**` as `x`.
fn concrete_path(segments: &[Segment]) -> String {
    if segments.is_empty() {
        return "/".to_owned();
    }
    let mut path = String::new();
    for s in segments {
        path.push('/');
        path.push_str(match s {
            Segment::Literal(text) => text,
            Segment::Param(_) | Segment::Any => "1",
            Segment::Rest => "x",
        });
    }
    path
}

/// `s` as a JSON string literal.
fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
rate_limits:
  default: { requests_per_minute: 60 }
  endpoints:
    - { id: login, path: "/api/login", method: POST, limit: 5, window: 1m, key: ip, strictness: hard }
    - { id: orders, path: "/api/orders/{id}", limit: 30, window: 1m, key: "header:x-tenant" }
    - { path: "/api/search", method: GET, limit: 30, window: 1m, key: user_id, tiers: { pro: 100 } }
  tiers:
    pro: { requests_per_minute: 100 }
"#;

    #[test]
    fn every_rule_gets_an_entry_that_meets_it() {
        let rules = RuleSet::from_yaml("rules.yaml", RULES).unwrap();
        let mix = Mix::new(&rules, &[], 0xabcd_0001).unwrap();
        let names: Vec<&str> = mix.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "login",
                "orders",
                "GET /api/search key=user_id",
                "default",
                "tiers.pro"
            ]
        );
        let mut body = Vec::new();
        mix.body(&mix.entries[0], 7, &mut body);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"path":"/api/login","method":"POST","ip":"2001:db8:abcd:1::0:7"}"#
        );
        mix.body(&mix.entries[1], 70_000, &mut body);
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"path":"/api/orders/1","method":"GET","ip":"2001:db8:abcd:1::1:1170","headers":{"x-tenant":"lg-abcd0001-h70000"}}"#
        );
        // The tier entry meets the default and the tier's limit, both by user id.
        let tier = &mix.entries[4];
        let met: Vec<(&str, KeyField)> = tier
            .matches
            .iter()
            .map(|&(i, f)| (mix.limits[i].rule.as_str(), f))
            .collect();
        assert_eq!(
            met,
            [("default", KeyField::User), ("tiers.pro", KeyField::User)]
        );
        assert_eq!(mix.limits[0].strictness, Strictness::Hard);
    }

    #[test]
    fn weights_name_rules_and_tiers() {
        let rules = RuleSet::from_yaml("rules.yaml", RULES).unwrap();
        let w = |s: &str| s.parse::<MixWeight>().unwrap();
        let mix = Mix::new(
            &rules,
            &[w("login=3"), w("GET /api/search key=user_id@pro=1")],
            1,
        )
        .unwrap();
        assert!((mix.share(0) - 0.75).abs() < 1e-12);
        let search = &mix.entries[1];
        assert_eq!(search.to_string(), "GET /api/search tier=pro");
        let met: Vec<&str> = search
            .matches
            .iter()
            .map(|&(i, _)| mix.limits[i].name.as_str())
            .collect();
        assert_eq!(
            met,
            [
                "GET /api/search key=user_id#tier=pro",
                "tiers.pro#requests_per_minute"
            ]
        );
        for bad in ["nope=1", "login@gold=1"] {
            assert!(Mix::new(&rules, &[w(bad)], 1).is_err(), "{bad}");
        }
        assert!(Mix::new(&rules, &[w("login=0")], 1).is_err());
        assert!("login".parse::<MixWeight>().is_err());
        assert!("login=-1".parse::<MixWeight>().is_err());
    }
}

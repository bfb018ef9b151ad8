//! Matching a request to the limits that apply: the [`Request`] view, [`Match`], [`Key`], and the
//! path trie the rule set builds once.
//!
//! Matching runs on every request at the edge, so it is built to cost little and allocate
//! nothing: a path spelled exactly as an all-literal route is one lookup (`exact`); other
//! paths walk the trie, keyed by path segment, so a literal path costs one lookup per segment
//! whatever the number of rules (a few comparisons where a node has few children, a hash
//! lookup where it has many), and wildcard segments are followed only where some rule has one
//! at that depth; keys borrow from the request; results go into a buffer the
//! caller owns and reuses. The order of a request through here is: trie walk (endpoint rules,
//! filtered by method) → `default` when no endpoint rule matched → the request tier's limits.
//!
//! A note on how we know this does not allocate: a counting global allocator would have to be
//! installed in the whole shared test binary, so instead the tests assert that a buffer with
//! room keeps its capacity and its heap pointer across many calls, and this module uses only
//! `HashMap::get` with borrowed `&str` keys, slice iteration and `sort_unstable` (in place).

use std::collections::HashMap as StdHashMap;

/// Maps on the matching path hash with foldhash (seeded per process), not SipHash: matching
/// runs on every request.
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

use super::{KeyKind, Limit, Rule, Selector, pattern::Segment, pattern::Segments};

/// What the rule set needs to know about a request, borrowed from wherever the tier keeps it.
///
/// Build one per request: it is a handful of references, nothing is copied. Empty strings
/// count as absent (a missing header often arrives as an empty value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request path, as in `/api/orders/42`; a query string or fragment is ignored.
    pub path: &'a str,
    /// The HTTP method, compared ignoring ASCII case.
    pub method: &'a str,
    /// The client IP, as the tier determined it (socket, or a trusted proxy's header).
    pub ip: Option<&'a str>,
    /// The authenticated user.
    pub user_id: Option<&'a str>,
    /// The API key the client presented.
    pub api_key: Option<&'a str>,
    /// The client's tier (`free`, `pro`, ...), compared exactly: picks per-tier overrides and
    /// adds the tier's own limits. A tier the rules do not declare adds nothing.
    pub tier: Option<&'a str>,
    /// Request headers as `(name, value)`; names are compared ignoring ASCII case.
    pub headers: &'a [(&'a str, &'a str)],
}

impl<'a> Request<'a> {
    /// A request with only a method and a path; set the other fields with struct update
    /// syntax: `Request { ip: Some("203.0.113.7"), ..Request::new("GET", "/") }`.
    pub fn new(method: &'a str, path: &'a str) -> Request<'a> {
        Request {
            path,
            method,
            ..Request::default()
        }
    }

    /// The first header called `name` (ignoring ASCII case) with a non-empty value.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, v)| n.eq_ignore_ascii_case(name) && !v.is_empty())
            .map(|&(_, v)| v)
    }

    fn ip(&self) -> Option<Key<'a>> {
        present(self.ip).map(Key::Ip)
    }
}

/// One limit that applies to a request, and the key to count it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match<'a> {
    /// The rule that selected the request: strictness, failure mode, shadow.
    pub rule: &'a Rule,
    /// The limit to check: a base limit of the rule, or the override for the request's tier.
    pub limit: &'a Limit,
    /// The key, borrowed from the request.
    pub key: Key<'a>,
}

/// The value a limit counts by, and which identity it is.
///
/// The identity matters beyond the value: a rule keyed by user id falls back to the IP when the
/// request has no user, so the same string could name a user or an address. Stores namespace
/// counters by [`Key::kind`] (and by `LimitId`) so the two never share a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key<'a> {
    /// A user id.
    UserId(&'a str),
    /// A client IP.
    Ip(&'a str),
    /// An API key.
    ApiKey(&'a str),
    /// The value of the rule's header.
    Header(&'a str),
    /// The one counter of a `global` rule.
    Global,
}

impl<'a> Key<'a> {
    /// The key's value; empty for [`Key::Global`].
    pub fn value(&self) -> &'a str {
        match *self {
            Key::UserId(v) | Key::Ip(v) | Key::ApiKey(v) | Key::Header(v) => v,
            Key::Global => "",
        }
    }

    /// A short, stable name of the identity, for namespacing stored keys: `user`, `ip`,
    /// `api_key`, `header`, `global`.
    pub fn kind(&self) -> &'static str {
        match self {
            Key::UserId(_) => "user",
            Key::Ip(_) => "ip",
            Key::ApiKey(_) => "api_key",
            Key::Header(_) => "header",
            Key::Global => "global",
        }
    }
}

/// Empties `buf` and gives it back with a new lifetime, keeping its allocation.
///
/// A `Vec<Match<'a>>` borrows from the requests it was filled from, so a buffer kept across
/// requests (in a struct, a thread-local) cannot be refilled from a request that lives shorter.
/// This clears it and re-types it. It keeps the heap block because std collects an emptied
/// `vec::IntoIter` into a `Vec` of a same-layout type in place; a test pins that, so if std ever
/// stopped, the test fails rather than the edge quietly allocating.
#[expect(
    clippy::unnecessary_filter_map,
    reason = "the `filter_map` to `Option<Match<'b>>` is what re-types the buffer; `filter` cannot"
)]
pub fn recycle<'b>(mut buf: Vec<Match<'_>>) -> Vec<Match<'b>> {
    buf.clear();
    buf.into_iter().filter_map(|_| None).collect()
}

/// The lookup structures built once per rule set: the path trie over every endpoint rule,
/// and where `default` and each tier's rule sit. Holds indices into `RuleSet::rules`, not
/// references, so the rule set can own both.
#[derive(Clone, Debug)]
pub(crate) struct Matcher {
    /// `nodes[0]` is the root (the path `/`).
    nodes: Vec<Node>,
    /// The node a path written exactly as its literal segments (`/api/search`: one `/` before
    /// each, none after) ends at, for the nodes whose rules are all such a path matches: no
    /// node on the way has a `**` rule and none before the last has a wildcard child, so the
    /// walk would find that node's `ends` and nothing else. One comparison per such path while
    /// there are few, one hash of the path after, instead of a lookup per segment; any other
    /// path (a wildcard route, `//`, a trailing `/`) walks.
    exact: Literals,
    /// Bit `n` set when some path in `exact` is `n` bytes long (bit 63: 63 or more), so that
    /// most paths that are not there (parameters make them longer or shorter) skip the lookup.
    exact_lengths: u64,
    default: Option<usize>,
    tiers: HashMap<Box<str>, usize>,
}

/// One trie node: the patterns that have consumed the same prefix of segments.
#[derive(Clone, Debug, Default)]
struct Node {
    /// Children by literal segment.
    literals: Literals,
    /// The child for `{name}` and `*` (they match the same thing).
    wildcard: Option<usize>,
    /// Rules whose pattern ends exactly here.
    ends: Vec<usize>,
    /// Rules whose pattern ends with `**` here: they match any remainder.
    rest: Vec<usize>,
}

impl Matcher {
    /// Builds the trie and the default/tier lookups from `rules`.
    pub(crate) fn new(rules: &[Rule]) -> Matcher {
        let mut matcher = Matcher {
            nodes: vec![Node::default()],
            exact: Literals::default(),
            exact_lengths: 0,
            default: None,
            tiers: HashMap::default(),
        };
        for (index, rule) in rules.iter().enumerate() {
            match &rule.selector {
                Selector::Endpoint { path, .. } => matcher.insert(path.segments(), index),
                Selector::Default => matcher.default = Some(index),
                Selector::Tier(name) => {
                    matcher.tiers.insert(name.as_str().into(), index);
                }
            }
        }
        matcher.index_exact(0, String::new());
        matcher
    }

    /// Fills [`Matcher::exact`] below `node`, reached by the literal path `path`, no node on
    /// the way having had a `**` rule or (before `node`) a wildcard child.
    fn index_exact(&mut self, node: usize, path: String) {
        let Some(here) = self.nodes.get(node) else {
            return;
        };
        if !here.rest.is_empty() {
            return;
        }
        if !here.ends.is_empty() {
            let key = if path.is_empty() {
                "/".into()
            } else {
                path.clone()
            };
            self.exact_lengths |= length_bit(key.len());
            // Each node is reached by one path, so `key` is not there yet.
            self.exact.insert(key.into_boxed_str(), node);
        }
        if here.wildcard.is_some() {
            return;
        }
        let children: Vec<(String, usize)> = match &here.literals {
            Literals::Few(few) => few.iter().map(|(l, c)| (l.to_string(), *c)).collect(),
            Literals::Many(many) => many.iter().map(|(l, c)| (l.to_string(), *c)).collect(),
        };
        for (literal, child) in children {
            self.index_exact(child, format!("{path}/{literal}"));
        }
    }

    /// Adds the rule `index` under the pattern `segments`.
    fn insert(&mut self, segments: &[Segment], index: usize) {
        let mut node = 0;
        for segment in segments {
            let next = match segment {
                Segment::Rest => {
                    self.nodes[node].rest.push(index);
                    return;
                }
                Segment::Literal(lit) => self.nodes[node].literals.get(lit.as_str()),
                Segment::Param(_) | Segment::Any => self.nodes[node].wildcard,
            };
            node = match next {
                Some(child) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(Node::default());
                    match segment {
                        Segment::Literal(lit) => {
                            self.nodes[node].literals.insert(lit.as_str().into(), child);
                        }
                        _ => self.nodes[node].wildcard = Some(child),
                    }
                    child
                }
            };
        }
        self.nodes[node].ends.push(index);
    }

    /// See [`RuleSet::matches`](super::RuleSet::matches).
    pub(crate) fn matches<'a>(
        &self,
        rules: &'a [Rule],
        req: &Request<'a>,
        out: &mut Vec<Match<'a>>,
    ) {
        out.clear();
        let mut endpoint_matched = false;
        let mut emit = |index: usize| {
            let Some(rule) = rules.get(index) else {
                return;
            };
            if let Selector::Endpoint {
                method: Some(method),
                ..
            } = &rule.selector
                && method.as_str() != req.method
                && !method.eq_ignore_ascii_case(req.method)
            {
                return;
            }
            endpoint_matched = true;
            push(rule, req, out);
        };
        // Routes hold neither `?` nor `#`, so a path found as written has no query to cut off
        // and is looked up before it is scanned for one.
        let exact = self.exact(req.path).ok_or_else(|| Segments::new(req.path));
        let exact = exact.or_else(|segments| {
            let path = segments.as_str();
            let cut = (path.len() < req.path.len()).then(|| self.exact(path));
            cut.flatten().ok_or(segments)
        });
        match exact {
            Ok(node) => {
                if let Some(node) = self.nodes.get(node) {
                    node.ends.iter().for_each(|&index| emit(index));
                }
            }
            Err(segments) => self.walk(0, segments, &mut emit),
        }
        // The walk visits rules in trie order; callers get them in file order. All matched rules
        // are elements of the one `rules` slice, so their addresses sort as their indices do.
        if out.len() > 1 {
            out.sort_unstable_by_key(|m| std::ptr::from_ref(m.rule).addr());
        }
        if !endpoint_matched && let Some(rule) = self.default.and_then(|i| rules.get(i)) {
            push(rule, req, out);
        }
        let tier_rule = present(req.tier)
            .and_then(|tier| self.tiers.get(tier))
            .and_then(|&i| rules.get(i));
        if let Some(rule) = tier_rule {
            push(rule, req, out);
        }
    }

    /// The node of the all-literal route spelled exactly `path`, if there is one.
    fn exact(&self, path: &str) -> Option<usize> {
        if self.exact_lengths & length_bit(path.len()) == 0 {
            return None;
        }
        self.exact.get(path)
    }

    /// Calls `emit` with every rule whose pattern matches the rest of the path `path` from
    /// `node` on. Each node is reached by a single sequence of segments, so it is visited at
    /// most once per walk, and the recursion is at most `MAX_PATTERN_SEGMENTS` deep.
    fn walk(&self, node: usize, path: Segments<'_>, emit: &mut impl FnMut(usize)) {
        let Some(here) = self.nodes.get(node) else {
            return;
        };
        for &rule in &here.rest {
            emit(rule);
        }
        let mut rest = path;
        let Some(segment) = rest.next() else {
            for &rule in &here.ends {
                emit(rule);
            }
            return;
        };
        if let Some(child) = here.literals.get(segment) {
            self.walk(child, rest, emit);
        }
        if let Some(child) = here.wildcard {
            self.walk(child, rest, emit);
        }
    }
}

/// A path length's bit in [`Matcher::exact_lengths`].
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

/// Strings to indices, for a node's children by literal segment and for the exact paths. Most
/// nodes have a handful, and comparing a short string with each of a few is several times
/// faster than hashing it, so this keeps a list until it has more than [`Literals::FEW`]
/// entries and a hash map after.
#[derive(Clone, Debug)]
enum Literals {
    Few(Vec<(Box<str>, usize)>),
    Many(HashMap<Box<str>, usize>),
}

impl Default for Literals {
    fn default() -> Literals {
        Literals::Few(Vec::new())
    }
}

impl Literals {
    const FEW: usize = 8;

    fn get(&self, segment: &str) -> Option<usize> {
        match self {
            Literals::Few(few) => few
                .iter()
                .find(|(literal, _)| **literal == *segment)
                .map(|&(_, child)| child),
            Literals::Many(many) => many.get(segment).copied(),
        }
    }

    /// Adds a child; `literal` is not among the children yet.
    fn insert(&mut self, literal: Box<str>, child: usize) {
        match self {
            Literals::Few(few) if few.len() < Literals::FEW => few.push((literal, child)),
            Literals::Few(few) => {
                let mut many: HashMap<Box<str>, usize> = few.drain(..).collect();
                many.insert(literal, child);
                *self = Literals::Many(many);
            }
            Literals::Many(many) => {
                many.insert(literal, child);
            }
        }
    }
}

/// Appends `rule`'s limits for `req` to `out`: the override for the request's tier if the rule
/// has one, else every base limit; nothing when the request cannot provide a key.
fn push<'a>(rule: &'a Rule, req: &Request<'a>, out: &mut Vec<Match<'a>>) {
    let Some(key) = key_for(&rule.key, req) else {
        return;
    };
    let limits = match present(req.tier).and_then(|tier| rule.override_for(tier)) {
        Some(tiered) => std::slice::from_ref(tiered),
        None => rule.limits.as_slice(),
    };
    for limit in limits {
        out.push(Match { rule, limit, key });
    }
}

/// The key `kind` names in `req`, falling back to the IP (see [`KeyKind`]).
fn key_for<'a>(kind: &KeyKind, req: &Request<'a>) -> Option<Key<'a>> {
    match kind {
        KeyKind::UserId => present(req.user_id).map(Key::UserId).or_else(|| req.ip()),
        KeyKind::ApiKey => present(req.api_key).map(Key::ApiKey).or_else(|| req.ip()),
        KeyKind::Header(name) => req.header(name).map(Key::Header).or_else(|| req.ip()),
        KeyKind::Ip => req.ip(),
        KeyKind::Global => Some(Key::Global),
    }
}

/// `value` unless it is empty.
fn present(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

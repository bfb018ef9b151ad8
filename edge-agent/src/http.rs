//! The edge's HTTP API (DESIGN §8): `POST /v1/check` decides one request described in JSON,
//! `GET /healthz` says the process is up, `GET /metrics` serves [`EdgeMetrics`] as
//! OpenMetrics text, `GET /readyz` whether it is connected to its
//! regional (until then every decision that needs the regional is its rule's failure mode, so
//! a load balancer or `deploy/up.sh` should wait for it). Any other path is `404`, or, when
//! the edge runs as a reverse proxy ([`Served::proxy`]), decided and forwarded to the
//! upstream by [`proxy`], which answers denials with the same code as a check.
//!
//! A check flows like this: the body is read up to [`MAX_BODY`] (more is `413`), parsed as
//! [`CheckBody`] (anything malformed is `400` naming the field or the position), turned into a
//! [`shared::Request`] (its path normalised as the proxy's are, [`proxy::decision_path`]; the
//! client's address from the body, else from the socket, believing
//! `X-Forwarded-For` only from trusted proxies), and decided as [`Agent::check_async`] decides,
//! in its two steps: locally, or on the exact path by waiting for the regional at most its
//! timeout (only that wait is part of the request's future; see [`handle`]). The answer is
//! `200` or `429` with the decision as JSON and the `X-RateLimit-*` headers (`Retry-After`
//! too on `429`).
//!
//! How identities are read and where the proxy forwards are [`Served`]: swapped whole when the
//! binary reloads its configuration ([`Api::reconfigure`]).
//!
//! Nothing a client sends can panic the server or touch another connection: every failure is
//! an ordinary response.

use std::{
    borrow::Cow, collections::BTreeMap, future::Future, net::IpAddr, net::SocketAddr,
    num::NonZeroU32, sync::Arc, time::Instant,
};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http_body_util::{Either, Full};
use hyper::{
    HeaderMap, Method, Request as HttpRequest, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
};
use serde::Deserialize;
use shared::http::{json_error, read_body};
use tokio::net::TcpListener;

use crate::{
    Agent, Decision, EdgeMetrics, IdentityConfig, IpText, QuicUpstream,
    agent::ExactCheck,
    client_ip,
    identity::X_FORWARDED_FOR,
    proxy::{self, Proxy, ProxyConfig, UpstreamBody},
};

/// The largest `POST /v1/check` body read: a check is a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// The body of every answer: our own, whole, or an upstream's, streamed (reverse-proxy mode).
pub type AnswerBody = Either<Full<Bytes>, UpstreamBody>;

/// What the HTTP API answers with: the agent, the link to the regional readiness is judged
/// by, and what a configuration reload may change ([`Served`]).
pub struct Api {
    pub(crate) agent: Arc<Agent>,
    upstream: Arc<QuicUpstream>,
    pub(crate) metrics: EdgeMetrics,
    served: ArcSwap<Served>,
}

/// What the API may be told to do differently while it runs ([`Api::reconfigure`]): how a
/// client's identity is read, and where paths other than the edge's own go. Swapped whole,
/// so a request sees one version of both from its start to its end.
#[derive(Debug)]
pub struct Served {
    /// How a client's identity is read.
    pub identity: IdentityConfig,
    /// The reverse proxy; `None`: paths other than the edge's own are `404`.
    pub proxy: Option<Arc<Proxy>>,
}

impl Api {
    /// Answers for `agent`, reading identities as `identity` says and forwarding other paths
    /// as `proxy` says (`None`: they are `404`); ready while `upstream` is connected.
    pub fn new(
        agent: Arc<Agent>,
        upstream: Arc<QuicUpstream>,
        identity: IdentityConfig,
        proxy: Option<ProxyConfig>,
    ) -> Api {
        let metrics = EdgeMetrics::new(agent.clone(), Some(upstream.clone()));
        Api {
            agent,
            upstream,
            metrics,
            served: ArcSwap::from_pointee(Served {
                identity,
                proxy: proxy.map(|config| Arc::new(Proxy::new(config))),
            }),
        }
    }

    /// What requests are served with now.
    pub fn served(&self) -> Arc<Served> {
        self.served.load_full()
    }

    /// Serves the next requests reading identities as `identity` says and forwarding other
    /// paths as `proxy` says (`None`: `404`); requests in flight finish as they began. An
    /// unchanged proxy keeps its pooled connections. Says what changed: `"identity"`,
    /// `"proxy"`, both or neither.
    pub fn reconfigure(
        &self,
        identity: IdentityConfig,
        proxy: Option<ProxyConfig>,
    ) -> Vec<&'static str> {
        let old = self.served.load_full();
        let mut changed = Vec::new();
        if identity != old.identity {
            changed.push("identity");
        }
        let proxy = match (proxy, &old.proxy) {
            (Some(new), Some(old)) if new == *old.config() => Some(old.clone()),
            (None, None) => None,
            (new, _) => {
                changed.push("proxy");
                new.map(|config| Arc::new(Proxy::new(config)))
            }
        };
        if !changed.is_empty() {
            self.served.store(Arc::new(Served { identity, proxy }));
        }
        changed
    }

    /// Decides `request` at `cost`, counting the decision and its latency in the metrics:
    /// what a check and a proxied request both do.
    pub(crate) async fn decide(&self, request: &shared::Request<'_>, cost: NonZeroU32) -> Decision {
        self.end(self.begin(request, cost)).await
    }

    /// [`decide`](Api::decide) up to its one await: decided locally, or the exact path begun.
    fn begin(&self, request: &shared::Request<'_>, cost: NonZeroU32) -> Begun<'_> {
        Begun {
            started: Instant::now(),
            step: self.agent.try_check(request, cost),
        }
    }

    /// The rest of [`decide`](Api::decide): the regional's answer awaited if it is needed.
    async fn end(&self, begun: Begun<'_>) -> Decision {
        let decision = match begun.step {
            Ok(decision) => decision,
            // Boxed: the wait for the regional (a timer and the call) is most of this future,
            // and is needed by few requests.
            Err(exact) => Box::pin(exact.decide()).await,
        };
        self.metrics.record(&decision, begun.started.elapsed());
        decision
    }
}

/// A decision begun by [`Api::begin`]: when, and what is left of it.
struct Begun<'a> {
    started: Instant,
    step: Result<Decision, ExactCheck<'a>>,
}

/// The `POST /v1/check` body (DESIGN §8). Only `path` is required; `method` defaults to
/// `GET`, `cost` to 1, `ip` to the caller's address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody<'a> {
    /// The request's path, with its query if the caller has one (not matched).
    #[serde(borrow)]
    pub path: Text<'a>,
    /// Its method.
    #[serde(default, borrow)]
    pub method: Option<Text<'a>>,
    /// The client's address.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// The authenticated user.
    #[serde(default, borrow)]
    pub user_id: Option<Text<'a>>,
    /// The API key presented.
    #[serde(default, borrow)]
    pub api_key: Option<Text<'a>>,
    /// The client's tier.
    #[serde(default, borrow)]
    pub tier: Option<Text<'a>>,
    /// Headers the rules may key on.
    #[serde(default, borrow)]
    pub headers: BTreeMap<Text<'a>, Text<'a>>,
    /// What the request costs, at least 1.
    #[serde(default)]
    pub cost: Option<NonZeroU32>,
}

/// A string of a check's body, borrowed from the body unless it holds escapes, so a check
/// allocates nothing for its text. (serde borrows a bare `Cow<str>` field, but not one inside
/// an `Option` or a map: this wrapper is what makes those borrow too.)
#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// Serves `api` on `listener` until `shutdown` completes; connections then finish the request
/// in flight, and are dropped after 5 s at most.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: impl Future<Output = ()>) {
    let handler = move |peer, request| handle(api.clone(), peer, request);
    shared::http::serve(listener, handler, shutdown).await;
}

/// One HTTP request, whatever it is.
pub async fn handle(
    api: Arc<Api>,
    peer: SocketAddr,
    request: HttpRequest<Incoming>,
) -> Response<AnswerBody> {
    // hyper moves this future whole, several times, on every request, so it is kept small:
    // a check is awaited here directly (not through `own`), a proxied request, several times
    // larger, is boxed, and the exact path's wait is boxed in `Api::end`. (It was 2.7 KB, and
    // copying it was 4% of the edge's CPU under wrk; it is 1.4 KB.)
    let path = request.uri().path();
    if path == "/v1/check" && request.method() == Method::POST {
        return check(&api, peer, request).await.map(Either::Left);
    }
    if !is_own_path(path) {
        let served = api.served();
        if let Some(proxy) = &served.proxy {
            return Box::pin(proxy::handle(&api, &served.identity, proxy, peer, request)).await;
        }
    }
    own(&api, &request).map(Either::Left)
}

/// The paths the edge answers itself, proxy or not.
fn is_own_path(path: &str) -> bool {
    matches!(path, "/v1/check" | "/healthz" | "/readyz" | "/metrics")
}

/// The edge's own endpoints but `POST /v1/check` (which [`handle`] answers), and `404` for
/// anything else.
fn own(api: &Api, request: &HttpRequest<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (_, "/v1/check") => {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} /v1/check: use POST", request.method()),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        (&Method::GET, "/metrics") => shared::metrics::response(api.metrics.registry()),
        (&Method::GET, "/readyz") => match api.upstream.connected_to() {
            Some(regional) => Response::new(Full::new(Bytes::from(format!(
                "ready: connected to {regional}\n"
            )))),
            None => {
                let mut r = Response::new(Full::new(Bytes::from_static(
                    b"not ready: no connection to a regional\n",
                )));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                r
            }
        },
        (_, path) => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such endpoint: {path}; this edge answers POST /v1/check"),
        ),
    }
}

async fn check(
    api: &Api,
    peer: SocketAddr,
    request: HttpRequest<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(body, MAX_BODY).await {
        Ok(bytes) => bytes,
        Err(refused) => return refused,
    };
    // Everything between the two awaits is in `begin_check`, a plain function, so that its
    // locals (the parsed body, the request) are not part of this future (see `handle`).
    let begun = match begin_check(api, peer, &parts.headers, &bytes) {
        Ok(begun) => begun,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, "bad_request", message),
    };
    let decision = api.end(begun).await;
    answer(api, &decision)
}

/// A check's body parsed and its decision begun, or why the body is refused (a `400`).
fn begin_check<'a>(
    api: &'a Api,
    peer: SocketAddr,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<Begun<'a>, String> {
    let body = parse(bytes)?;
    let ip = body.ip.unwrap_or_else(|| {
        // The caller is the client, or a proxy in front of it: the socket, or a trusted
        // proxy's X-Forwarded-For (the only header read, so the only one collected).
        let forwarded: Vec<(&str, &str)> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| Some((X_FORWARDED_FOR, value.to_str().ok()?)))
            .collect();
        client_ip(&api.served.load().identity, peer.ip(), &forwarded)
    });
    let ip_text = IpText::new(ip);
    let headers: Vec<(&str, &str)> = body
        .headers
        .iter()
        .map(|(name, value)| (&**name, &**value))
        .collect();
    let path = check_path(&body.path);
    let request = shared::Request {
        path: &path,
        method: body.method.as_deref().unwrap_or("GET"),
        ip: Some(ip_text.as_str()),
        user_id: body.user_id.as_deref(),
        api_key: body.api_key.as_deref(),
        tier: body.tier.as_deref(),
        headers: &headers,
    };
    Ok(api.begin(&request, body.cost.unwrap_or(NonZeroU32::MIN)))
}

/// The path a check is matched by, normalised as the proxy normalises a request line so that
/// a caller that passes the raw path it received gets the same answer (`/api/%6Cogin` and
/// `/static/../api/login` are `/api/login`). A query or fragment is kept as it is, after the
/// normalised path: dot segments in it (`?next=/../static`) are not the path's.
fn check_path(raw: &str) -> Cow<'_, str> {
    let (path, rest) = raw.split_at(raw.find(['?', '#']).unwrap_or(raw.len()));
    match proxy::decision_path(path) {
        Cow::Borrowed(_) => Cow::Borrowed(raw),
        Cow::Owned(mut normal) => {
            normal.push_str(rest);
            Cow::Owned(normal)
        }
    }
}

/// The body as a [`CheckBody`], or why not: the field (`cost`, `headers.x-tenant`) or the
/// position in the text, and what is wrong.
///
/// Parsed plainly first; only a body that fails is parsed again with its path tracked, which
/// costs on every field, for the message.
fn parse(bytes: &[u8]) -> Result<CheckBody<'_>, String> {
    let body: CheckBody = match serde_json::from_slice(bytes) {
        Ok(body) => body,
        Err(_) => return Err(refusal(bytes)),
    };
    if !body.path.starts_with('/') {
        return Err(format!("path: {:?} does not start with '/'", &*body.path));
    }
    Ok(body)
}

/// Why `bytes` is not a [`CheckBody`], with the field or position at fault.
#[cold]
fn refusal(bytes: &[u8]) -> String {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<CheckBody, _> = serde_path_to_error::deserialize(&mut json);
    if let Err(e) = parsed {
        let path = e.path().to_string();
        let inner = e.into_inner();
        return if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
    }
    match json.end() {
        Err(e) => format!("after the JSON object: {e}"),
        // The two parsers accept the same bodies; should they ever differ, say so plainly.
        Ok(()) => "the body is not a check".to_owned(),
    }
}

/// The answer to a decision: `200` or `429`, the decision as JSON, and the rate-limit headers.
/// A denied proxied request gets exactly this too.
pub(crate) fn answer(api: &Api, d: &Decision) -> Response<Full<Bytes>> {
    api.agent.with_rules(|rules| {
        let rule = d
            .rule
            .and_then(|id| rules.limit(id))
            .map(|(rule, _)| rule.id());
        answer_as(rule, d)
    })
}

/// [`answer`], `rule` naming the rule that decided.
fn answer_as(rule: Option<&str>, d: &Decision) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(answer_body(rule, d))));
    if !d.allowed {
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rate_limit_headers(response.headers_mut(), d);
    response
}

/// A check's answer as JSON (DESIGN §8): `allowed`, `limit`, `remaining`, `reset_at`,
/// `retry_after` and `rule`, and on a denial `error` and `message`.
///
/// Written out rather than derived: serde's derived serializer took about 200 ns of an
/// answer's 450, on every request. A test holds it to what serializing the same fields gives.
fn answer_body(rule: Option<&str>, d: &Decision) -> Vec<u8> {
    let mut out = Vec::with_capacity(if d.allowed { 128 } else { 256 });
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(if d.allowed {
        b"{\"allowed\":true"
    } else {
        b"{\"allowed\":false"
    });
    let retry_after = d.retry_after_secs();
    for (name, value) in [
        ("limit", d.limit),
        ("remaining", d.remaining),
        ("reset_at", d.reset_at_secs()),
        ("retry_after", retry_after),
    ] {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(digits.format(value).as_bytes());
    }
    out.extend_from_slice(b",\"rule\":");
    match rule {
        Some(rule) => json_string(&mut out, rule),
        None => out.extend_from_slice(b"null"),
    }
    if !d.allowed {
        out.extend_from_slice(b",\"error\":\"rate_limit_exceeded\",\"message\":");
        let message = format!(
            "rate limit of {} exceeded{}; retry in {retry_after} s",
            d.limit,
            rule.map(|r| format!(" for {r}")).unwrap_or_default(),
        );
        json_string(&mut out, &message);
    }
    out.push(b'}');
    out
}

/// Appends `text` as a JSON string, escaped (a rule's id is the operator's text).
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Into a `Vec`, serde_json's only failure, the writer's, cannot happen.
    let _ = serde_json::to_writer(out, text);
}

// Names made once: a name given as text is parsed and checked on every insert.
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Sets `X-RateLimit-Limit`, `-Remaining` and `-Reset` when a rule decided, and `Retry-After`
/// on a denial, replacing any already there (an upstream's own, in proxy mode).
pub(crate) fn rate_limit_headers(headers: &mut HeaderMap, d: &Decision) {
    if d.rule.is_some() {
        // The three values are slices of one buffer: a header value made from a number is an
        // allocation of its own, and these are on every answer.
        let mut text = BytesMut::with_capacity(60);
        let mut digits = itoa::Buffer::new();
        let mut ranges = [(0, 0); 3];
        for (range, n) in ranges
            .iter_mut()
            .zip([d.limit, d.remaining, d.reset_at_secs()])
        {
            let from = text.len();
            text.extend_from_slice(digits.format(n).as_bytes());
            *range = (from, text.len());
        }
        let text = text.freeze();
        let names = [X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING, X_RATELIMIT_RESET];
        for (name, (from, to)) in names.into_iter().zip(ranges) {
            // Decimal digits are a valid value; should that ever fail, the header is left out.
            if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(from..to)) {
                headers.insert(name, value);
            }
        }
    }
    if !d.allowed {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after_secs()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer as the fields it has, serialized by serde: what `answer_body` must write.
    #[derive(serde::Serialize)]
    struct CheckAnswer<'a> {
        allowed: bool,
        limit: u64,
        remaining: u64,
        reset_at: u64,
        retry_after: u64,
        rule: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    }

    fn decision(allowed: bool, rule: bool) -> Decision {
        Decision {
            allowed,
            limit: 1_000,
            remaining: if allowed { 999 } else { 0 },
            reset_at: shared::Nanos(1_795_500_240_500_000_000),
            retry_after: shared::Nanos(if allowed { 0 } else { 41_200_000_000 }),
            rule: rule.then_some(shared::LimitId(7)),
            path: crate::DecisionPath::Local,
        }
    }

    #[test]
    fn an_answer_is_written_as_serde_would_write_it() {
        for (d, rule) in [
            (decision(true, true), Some("search")),
            (decision(false, true), Some("login \"eu\" \\ ünïcode\n")),
            (decision(true, false), None),
            (decision(false, false), None),
        ] {
            let denied = !d.allowed;
            let expected = CheckAnswer {
                allowed: d.allowed,
                limit: d.limit,
                remaining: d.remaining,
                reset_at: d.reset_at_secs(),
                retry_after: d.retry_after_secs(),
                rule,
                error: denied.then_some("rate_limit_exceeded"),
                message: denied.then(|| {
                    format!(
                        "rate limit of {} exceeded{}; retry in {} s",
                        d.limit,
                        rule.map(|r| format!(" for {r}")).unwrap_or_default(),
                        d.retry_after_secs()
                    )
                }),
            };
            let written = String::from_utf8(answer_body(rule, &d)).unwrap();
            assert_eq!(written, serde_json::to_string(&expected).unwrap());
        }
    }

    #[test]
    fn rate_limit_headers_carry_the_decision() {
        let mut headers = HeaderMap::new();
        headers.insert(
            X_RATELIMIT_LIMIT,
            HeaderValue::from_static("upstream's own"),
        );
        rate_limit_headers(&mut headers, &decision(false, true));
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(value("x-ratelimit-limit"), Some("1000"));
        assert_eq!(value("x-ratelimit-remaining"), Some("0"));
        assert_eq!(value("x-ratelimit-reset"), Some("1795500240"));
        assert_eq!(value("retry-after"), Some("42"));
        assert_eq!(headers.len(), 4, "replaced, not added: {headers:?}");
        let mut headers = HeaderMap::new();
        rate_limit_headers(&mut headers, &decision(true, false));
        assert!(
            headers.is_empty(),
            "no rule decided, nothing to say: {headers:?}"
        );
    }

    #[test]
    fn a_check_body_borrows_its_text_unless_escaped() {
        let body = br#"{"path": "/a", "method": "POST", "user_id": "u-1", "tier": "p\u0072o",
            "headers": {"x-tenant": "acme"}}"#;
        let body = parse(body).unwrap();
        let borrowed = |t: &Text<'_>| matches!(t.0, Cow::Borrowed(_));
        assert!(borrowed(&body.path));
        assert!(body.method.as_ref().is_some_and(borrowed));
        assert!(body.user_id.as_ref().is_some_and(borrowed));
        assert!(body.headers.iter().all(|(k, v)| borrowed(k) && borrowed(v)));
        // An escape needs an owned copy, and means the same text.
        let tier = body.tier.as_ref().unwrap();
        assert!(!borrowed(tier));
        assert_eq!(&**tier, "pro");
    }

    #[test]
    fn a_check_path_is_normalised_up_to_its_query() {
        assert_eq!(check_path("/api/login"), "/api/login");
        assert_eq!(check_path("/a/../api/%6Cogin?x=1"), "/api/login?x=1");
        assert_eq!(
            check_path("/api/login?next=/../../static"),
            "/api/login?next=/../../static"
        );
        assert_eq!(check_path("/api/login#/../x"), "/api/login#/../x");
        // An escaped separator stays a character of its segment.
        assert_eq!(check_path("/api/login%3F/../x"), "/api/x");
    }
}

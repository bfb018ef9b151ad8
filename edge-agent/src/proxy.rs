//! Reverse-proxy mode (DESIGN §8): the edge sits in front of an HTTP/1.1 upstream, decides
//! every request that is not one of its own endpoints, forwards the allowed ones and answers
//! the denied ones itself. Its own endpoints (`/v1/check`, `/healthz`, `/readyz`, `/metrics`)
//! stay its own: the upstream cannot be reached at those paths through the edge.
//!
//! This module owns the proxy's configuration ([`ProxyConfig`], read from the `proxy:` section
//! of the binary's config file), the pooled client to the upstream ([`Proxy`]), what is done to
//! a request on its way up and to a response on its way down, and the timeouts that keep a
//! slow or dead upstream from holding a client forever. Deciding is not done here: the request
//! is turned into a [`shared::Request`] and handed to the same `Api::decide` as
//! `POST /v1/check` (which counts it in the metrics), and a denial is answered by the same
//! code as a denied check ([`http`]).
//!
//! # How a request flows through here
//!
//! 1. **Read.** The path must be an origin-form path (`/...`); `CONNECT host:port` and
//!    `OPTIONS *` are `400`. Header values become text for the matcher; a value that is not
//!    UTF-8 in a header the limiter reads (the identity headers, `X-Forwarded-For`, a header a
//!    rule keys on) is `400`, since ignoring it would count the client as someone else.
//!    Other headers the matcher never sees are forwarded untouched, whatever their bytes.
//! 2. **Decide.** Identity comes from the headers and the socket as [`Identity::extract`]
//!    reads it (`X-Forwarded-For` only from trusted proxies); the path is matched after
//!    [normalizing](decision_path) it, so `/api/%6Cogin` and `/x/../api/login` count as
//!    `/api/login`, as most upstreams would route them. Cost is 1.
//! 3. **Denied:** `429` with `Retry-After`, the `X-RateLimit-*` headers and the JSON body of a
//!    denied check. The upstream never sees the request and its body is not read.
//! 4. **Allowed:** the request goes up with its method, path and query as sent (not the
//!    normalized path: the upstream routes what the client wrote), its headers minus the
//!    hop-by-hop ones (`Connection` and those it names, `Keep-Alive`, `Proxy-*`, `TE`,
//!    `Trailer`, `Transfer-Encoding`, `Upgrade`, and `Expect`, which hyper has already
//!    answered for the client), `Host` as the client sent it, and the peer's address appended
//!    to `X-Forwarded-For`. The body is streamed both ways; nothing is buffered whole. The
//!    upstream's response comes back with its hop-by-hop headers removed and this edge's
//!    `X-RateLimit-*` headers set.
//! 5. **Upstream failure:** no connection within [`ProxyConfig::connect_timeout`], nothing
//!    moving for [`ProxyConfig::timeout`], or a broken exchange before the response headers
//!    is `502` with `{"error": "bad_gateway", "message": ...}`. Once the headers have gone to
//!    the client a failure can only cut the response short, which is what happens.
//!
//! Every outcome is counted in [`EdgeMetrics`](crate::EdgeMetrics) as
//! `edge_proxy_requests_total{outcome}`, with no per-key labels.
//!
//! # Limits
//!
//! The upstream is plain `http://`: TLS to it is not spoken, so keep it on loopback or a
//! private network. `Upgrade` (WebSocket) is not proxied: it is a hop-by-hop header and is
//! dropped. One upstream address, no load balancing or retries beyond the pooled client's
//! retry of a request that never left on a reused connection. A percent-encoded slash (`%2F`)
//! stays encoded when the path is normalized, so a rule never sees a separator the client
//! hid; an upstream that decodes `%2F` into `/` can be routed differently from the match.
//! A timeout is a `502` like a refused connection, not a `504`: one status for "the upstream
//! let us down", with the message telling which. A client that breaks off its upload before
//! the upstream answers is counted as `upstream_error` too: the client library reports both
//! as a failed exchange, and we do not pick its error chain apart.

use std::{
    borrow::Cow,
    error::Error as StdError,
    fmt,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Either;
use hyper::{
    HeaderMap, Request as HttpRequest, Response, StatusCode, Uri, Version,
    body::{Body, Frame, Incoming, SizeHint},
    header::{self, HeaderName, HeaderValue},
    http::{
        request::Parts,
        uri::{Authority, Scheme},
    },
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use shared::{KeyKind, http::json_error};
use tokio::time::{Instant, Sleep};

use crate::{
    Decision, Identity, IdentityConfig, IpText,
    http::{self, AnswerBody, Api},
    identity::X_FORWARDED_FOR,
};

/// Default of [`ProxyConfig::connect_timeout`]: an upstream on the same host or network
/// accepts in well under a millisecond, so a second means it is not there.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Default of [`ProxyConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how the edge forwards allowed requests.
///
/// Build one with [`ProxyConfig::new`], which checks the upstream's address, and set the
/// timeouts that differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The upstream's host and port (`127.0.0.1:3000`, `app.internal:8080`), spoken to in
    /// plain HTTP/1.1. A host name is resolved on each new connection.
    pub upstream: Authority,
    /// The longest a new connection to the upstream may take to open. Defaults to 1 s
    /// ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// The longest an exchange with the upstream may go with nothing moving: from the request
    /// going up (and from each piece of its body) to the response headers coming down, and
    /// between two pieces of the response body. Defaults to 30 s ([`DEFAULT_TIMEOUT`]).
    ///
    /// It is an idle timeout, not a deadline: a large upload or download that keeps moving
    /// takes as long as it takes. Past it, before the response headers, the client gets a
    /// `502`; after them, the response is cut short.
    pub timeout: Duration,
}

impl ProxyConfig {
    /// A configuration forwarding to `upstream`, an `http://host[:port]` URL with no path (a
    /// trailing `/` is allowed), query or user info; default timeouts.
    ///
    /// ```
    /// use edge_agent::proxy::{DEFAULT_TIMEOUT, ProxyConfig};
    ///
    /// let config = ProxyConfig::new("http://127.0.0.1:3000")?;
    /// assert_eq!(config.upstream.as_str(), "127.0.0.1:3000");
    /// assert_eq!(config.timeout, DEFAULT_TIMEOUT);
    /// assert!(ProxyConfig::new("https://127.0.0.1:3000").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When `upstream` is not such a URL, saying why; `https://` is refused because the proxy
    /// does not speak TLS to its upstream.
    pub fn new(upstream: &str) -> Result<ProxyConfig, UpstreamUrlError> {
        let url = || upstream.to_owned();
        let uri: Uri = upstream
            .parse()
            .map_err(|_| UpstreamUrlError::NotAUrl(url()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(UpstreamUrlError::Https(url())),
            Some(scheme) => {
                return Err(UpstreamUrlError::Scheme {
                    url: url(),
                    scheme: scheme.to_owned(),
                });
            }
            None => return Err(UpstreamUrlError::NotAUrl(url())),
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| UpstreamUrlError::NoHost(url()))?;
        let bad_port = authority.port().is_some() && authority.port_u16().is_none();
        let has_user_info = authority.as_str().contains('@');
        let has_path = uri.path() != "/" || uri.query().is_some();
        if bad_port || has_user_info || has_path {
            return Err(UpstreamUrlError::NotAnOrigin(url()));
        }
        Ok(ProxyConfig {
            upstream: authority.clone(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

/// Why an upstream URL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamUrlError {
    /// Not a URL with a scheme.
    #[error("{0:?} is not a URL; expected http://<host>:<port>")]
    NotAUrl(String),
    /// An `https://` URL.
    #[error(
        "{0:?}: https is not supported; the proxy speaks plain HTTP/1.1 to its upstream, so \
         give an http:// address on loopback or a private network"
    )]
    Https(String),
    /// A scheme other than `http`.
    #[error("{url:?}: scheme {scheme:?} is not supported; expected http://<host>:<port>")]
    Scheme {
        /// The URL as written.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// No host.
    #[error("{0:?} names no host; expected http://<host>:<port>")]
    NoHost(String),
    /// A path, query, user info or a port that is not a port.
    #[error(
        "{0:?} is not just a host and port; requests keep their own path and query, so give \
         http://<host>:<port> only"
    )]
    NotAnOrigin(String),
}

/// The reverse proxy: its configuration and a pooled HTTP/1.1 client to the upstream.
///
/// Connections are kept alive and reused between requests (hyper-util's pooled client), so a
/// busy edge does not open a connection per request.
pub struct Proxy {
    config: ProxyConfig,
    client: Client<HttpConnector, UpBody>,
}

impl Proxy {
    /// A proxy as `config` says. Nothing is dialed until the first request.
    pub fn new(config: ProxyConfig) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        // Small requests and responses are the common case; don't let Nagle hold them.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // Without a timer the pool cannot expire idle connections.
            .pool_timer(TokioTimer::new())
            .build(connector);
        Proxy { config, client }
    }

    /// Its configuration.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The upstream as a URL, for logs.
    pub fn upstream_url(&self) -> String {
        format!("http://{}", self.config.upstream)
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What became of a request the proxy handled, as counted in `edge_proxy_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProxyOutcome {
    /// Allowed, and the upstream answered (whatever its status).
    Forwarded,
    /// Denied: the edge answered `429`.
    Denied,
    /// Allowed, but the upstream could not be reached or did not answer in time: `502`.
    UpstreamError,
    /// Refused before deciding: `400`.
    BadRequest,
}

impl ProxyOutcome {
    /// Every outcome, in [`index`](ProxyOutcome::index) order.
    pub const ALL: [ProxyOutcome; 4] = [
        ProxyOutcome::Forwarded,
        ProxyOutcome::Denied,
        ProxyOutcome::UpstreamError,
        ProxyOutcome::BadRequest,
    ];

    /// The label value: `forwarded`, `denied`, `upstream_error`, `bad_request`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyOutcome::Forwarded => "forwarded",
            ProxyOutcome::Denied => "denied",
            ProxyOutcome::UpstreamError => "upstream_error",
            ProxyOutcome::BadRequest => "bad_request",
        }
    }

    /// Its position in [`ALL`](ProxyOutcome::ALL).
    pub fn index(self) -> usize {
        match self {
            ProxyOutcome::Forwarded => 0,
            ProxyOutcome::Denied => 1,
            ProxyOutcome::UpstreamError => 2,
            ProxyOutcome::BadRequest => 3,
        }
    }
}

/// The body of a response the upstream gave: its own, streamed, failing when nothing arrives
/// for [`ProxyConfig::timeout`].
pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    /// When the body fails unless a frame arrives first; pushed back by every frame.
    deadline: Pin<Box<Sleep>>,
}

impl UpstreamBody {
    fn new(inner: Incoming, idle: Duration) -> UpstreamBody {
        UpstreamBody {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline.as_mut().reset(Instant::now() + this.idle);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleError(this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream went quiet mid-body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?}")]
struct IdleError(Duration);

/// Decides `request` (not one of the edge's own endpoints) and forwards it or answers it, as
/// the module doc says.
pub(crate) async fn handle(
    api: &Api,
    identity: &IdentityConfig,
    proxy: &Proxy,
    peer: SocketAddr,
    request: HttpRequest<Incoming>,
) -> Response<AnswerBody> {
    let (parts, body) = request.into_parts();
    let decision = match decide(api, identity, peer, &parts).await {
        Ok(decision) => decision,
        Err(message) => return bad_request(api, message),
    };
    if !decision.allowed {
        api.metrics.record_proxied(ProxyOutcome::Denied);
        return http::answer(api, &decision).map(Either::Left);
    }
    forward(api, proxy, peer, parts, body, &decision).await
}

/// Steps 1 and 2 of the module doc: the request read as the matcher sees it, and decided.
///
/// # Errors
///
/// What makes it a `400`.
async fn decide(
    api: &Api,
    identity: &IdentityConfig,
    peer: SocketAddr,
    parts: &Parts,
) -> Result<Decision, String> {
    let raw_path = parts.uri.path();
    if !raw_path.starts_with('/') {
        return Err(format!(
            "{} {}: only origin-form requests (a path starting with '/') are proxied",
            parts.method, parts.uri
        ));
    }
    let headers =
        text_headers(&parts.headers, |name| reads_header(api, identity, name)).map_err(|name| {
            format!("header {name}: the value is not UTF-8 text, and the limiter reads it")
        })?;
    let path = decision_path(raw_path);
    let identity = Identity::extract(identity, peer.ip(), &headers);
    let mut ip_text = IpText::default();
    let base = shared::Request {
        headers: &headers,
        ..shared::Request::new(parts.method.as_str(), &path)
    };
    let request = identity.fill(base, &mut ip_text);
    Ok(api.decide(&request, NonZeroU32::MIN).await)
}

/// Steps 4 and 5 of the module doc: an allowed request sent up, and the answer brought down.
async fn forward(
    api: &Api,
    proxy: &Proxy,
    peer: SocketAddr,
    mut parts: Parts,
    body: Incoming,
    decision: &Decision,
) -> Response<AnswerBody> {
    parts.uri = match upstream_uri(&proxy.config.upstream, &parts.uri) {
        Ok(uri) => uri,
        Err(e) => return bad_request(api, format!("{}: {e}", parts.uri)),
    };
    // Whatever the client spoke, the pooled connection to the upstream stays HTTP/1.1
    // keep-alive; hyper reframes the body for it.
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::EXPECT);
    append_forwarded_for(&mut parts.headers, peer.ip());
    let activity = Arc::new(Activity::new());
    let body = UpBody {
        inner: body,
        activity: activity.clone(),
    };
    let request = HttpRequest::from_parts(parts, body);

    match exchange(proxy, request, &activity).await {
        Ok(response) => {
            api.metrics.record_proxied(ProxyOutcome::Forwarded);
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            http::rate_limit_headers(&mut parts.headers, decision);
            let body = UpstreamBody::new(body, proxy.config.timeout);
            Response::from_parts(parts, Either::Right(body))
        }
        Err(e) => {
            api.metrics.record_proxied(ProxyOutcome::UpstreamError);
            tracing::warn!(upstream = %proxy.upstream_url(), error = %e, "proxy: upstream failed");
            json_error(StatusCode::BAD_GATEWAY, "bad_gateway", e.to_string()).map(Either::Left)
        }
    }
}

fn bad_request(api: &Api, message: String) -> Response<AnswerBody> {
    api.metrics.record_proxied(ProxyOutcome::BadRequest);
    json_error(StatusCode::BAD_REQUEST, "bad_request", message).map(Either::Left)
}

/// Why a forwarded request got no response.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    /// No connection could be opened, in time or at all.
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    /// Nothing moved for the timeout before the response headers came.
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    /// The exchange broke off before the response headers.
    #[error("the upstream failed: {0}")]
    Failed(String),
}

impl From<hyper_util::client::legacy::Error> for ForwardError {
    fn from(e: hyper_util::client::legacy::Error) -> ForwardError {
        // The client's own message is its error kind ("client error (Connect)"); the cause is
        // in the chain below it.
        let mut causes = Vec::new();
        let mut source = e.source();
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        let cause = if causes.is_empty() {
            e.to_string()
        } else {
            causes.join(": ")
        };
        if e.is_connect() {
            ForwardError::Connect(cause)
        } else {
            ForwardError::Failed(cause)
        }
    }
}

/// Sends `request` and waits for the response headers while something keeps moving.
async fn exchange(
    proxy: &Proxy,
    request: HttpRequest<UpBody>,
    activity: &Activity,
) -> Result<Response<Incoming>, ForwardError> {
    let timeout = proxy.config.timeout;
    let mut pending = pin!(proxy.client.request(request));
    loop {
        match tokio::time::timeout_at(activity.last() + timeout, &mut pending).await {
            Ok(answer) => return answer.map_err(ForwardError::from),
            // The client's body moved meanwhile: wait on from its last piece. An upload that
            // is still going is not a silent upstream.
            Err(_) if Instant::now() < activity.last() + timeout => continue,
            Err(_) => return Err(ForwardError::Timeout(timeout)),
        }
    }
}

/// When the client's body last moved on its way up, so the wait for the response headers
/// counts from there.
struct Activity {
    start: Instant,
    /// Nanoseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// The client's body on its way up, streamed as it arrives, marking [`Activity`] per piece.
struct UpBody {
    inner: Incoming,
    activity: Arc<Activity>,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(_)) = frame {
            this.activity.touch();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The URI the upstream is asked for: its address, the client's path and query as sent.
fn upstream_uri(upstream: &Authority, uri: &Uri) -> Result<Uri, hyper::http::Error> {
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(upstream.clone())
        .path_and_query(path_and_query)
        .build()
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), and are not
/// passed on in either direction. `Proxy-*` goes too (see [`strip_hop_by_hop`]).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop headers: [`HOP_BY_HOP`], every `Proxy-*` header, and the headers
/// the `Connection` header names (a sender marks its own hop-by-hop headers that way).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    doomed.extend(
        headers
            .keys()
            .filter(|name| name.as_str().starts_with("proxy-"))
            .cloned(),
    );
    for name in doomed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends `peer` to `X-Forwarded-For`, after what earlier hops wrote (several lines become
/// one list, in order).
fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    let peer = peer.to_canonical().to_string();
    let mut value: Vec<u8> = Vec::new();
    for earlier in headers.get_all(X_FORWARDED_FOR) {
        let earlier = earlier.as_bytes().trim_ascii();
        if !earlier.is_empty() {
            value.extend_from_slice(earlier);
            value.extend_from_slice(b", ");
        }
    }
    value.extend_from_slice(peer.as_bytes());
    // Earlier values were valid header values, and so are their join and an address; the
    // fallback keeps at least the hop we vouch for.
    let value = HeaderValue::from_bytes(&value)
        .or_else(|_| HeaderValue::from_str(&peer))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    headers.insert(X_FORWARDED_FOR, value);
}

/// Whether the limiter reads header `name` (lower case, as hyper gives names): the identity
/// headers, `X-Forwarded-For`, and any header a rule in force keys on.
fn reads_header(api: &Api, identity: &IdentityConfig, name: &str) -> bool {
    let named = [
        identity.user_id_header.as_str(),
        identity.api_key_header.as_str(),
        identity.tier_header.as_str(),
        X_FORWARDED_FOR,
    ];
    if named.iter().any(|h| h.eq_ignore_ascii_case(name)) {
        return true;
    }
    api.agent.with_rules(|rules| {
        rules
            .rules()
            .iter()
            .any(|rule| matches!(rule.key(), KeyKind::Header(h) if h.eq_ignore_ascii_case(name)))
    })
}

/// The headers as text for the matcher. A value that is not UTF-8 is left out, unless `read`
/// says the limiter reads its header: then the header's name is the error.
fn text_headers(
    headers: &HeaderMap,
    read: impl Fn(&str) -> bool,
) -> Result<Vec<(&str, &str)>, &str> {
    let mut text = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        match std::str::from_utf8(value.as_bytes()) {
            Ok(value) => text.push((name.as_str(), value)),
            Err(_) if read(name.as_str()) => return Err(name.as_str()),
            Err(_) => {}
        }
    }
    Ok(text)
}

/// The path rules are matched against: `raw` percent-decoded (except `%2F`, `%3F` and `%23`,
/// which stay characters of their segment rather than separators) with `.` and `..` segments resolved,
/// as an upstream would route it. A client cannot step around `/api/login`'s limit by writing
/// `/api/%6Cogin` or `/static/../api/login`. Borrowed when there is nothing to do.
///
/// Decoded bytes that are not UTF-8 are replaced (U+FFFD): they can match no literal segment
/// of a rule, only wildcards, either way.
pub fn decision_path(raw: &str) -> Cow<'_, str> {
    let dotted = raw
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    if !raw.contains('%') && !dotted {
        return Cow::Borrowed(raw);
    }
    let decoded = percent_decode_except_slash(raw);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for segment in &segments {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() {
        path.push('/');
    }
    Cow::Owned(path)
}

fn percent_decode_except_slash(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(hi, lo)| (hi << 4) | lo),
            _ => None,
        };
        match escaped {
            // Separators stay escaped: a `/`, `?` or `#` decoded would start a new segment,
            // the query or the fragment, where the upstream sees a character of this segment.
            Some(b'/' | b'?' | b'#') | None => {
                out.push(bytes[i]);
                i += 1;
            }
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let ok = ProxyConfig::new("http://127.0.0.1:3000").unwrap();
        assert_eq!(ok.upstream.as_str(), "127.0.0.1:3000");
        assert_eq!(ok.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            ProxyConfig::new("http://app.internal/")
                .unwrap()
                .upstream
                .as_str(),
            "app.internal"
        );
        let refused = [
            ("https://127.0.0.1:3000", "https is not supported"),
            ("ftp://127.0.0.1", "scheme \"ftp\""),
            ("127.0.0.1:3000", "not a URL"),
            ("http://", "not a URL"),
            ("http://:80", "names no host"),
            ("http://127.0.0.1:3000/base", "not just a host and port"),
            ("http://127.0.0.1:3000/?a=1", "not just a host and port"),
            ("http://user:pw@127.0.0.1:3000", "not just a host and port"),
            ("not a url", "not a URL"),
        ];
        for (url, expect) in refused {
            match ProxyConfig::new(url) {
                Ok(c) => panic!("{url} accepted as {c:?}"),
                Err(e) => assert!(e.to_string().contains(expect), "{url}: {e}"),
            }
        }
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "close"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("x-kept", "2"),
            ("host", "example.com"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["x-kept", "host"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, "::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(headers[X_FORWARDED_FOR], "10.0.0.1");
        let mut headers = HeaderMap::new();
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static(" "));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.7 "));
        append_forwarded_for(&mut headers, "127.0.0.1".parse().unwrap());
        let all: Vec<_> = headers.get_all(X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["198.51.100.1, 10.0.0.7, 127.0.0.1"]);
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let upstream: Authority = "127.0.0.1:3000".parse().unwrap();
        let uri: Uri = "/a/b?c=d&e".parse().unwrap();
        assert_eq!(
            upstream_uri(&upstream, &uri).unwrap(),
            "http://127.0.0.1:3000/a/b?c=d&e"
        );
        // Absolute-form from the client: its authority is not where we send it.
        let uri: Uri = "http://elsewhere.example/x?y".parse().unwrap();
        assert_eq!(
            upstream_uri(&upstream, &uri).unwrap(),
            "http://127.0.0.1:3000/x?y"
        );
    }

    #[test]
    fn decision_paths_are_normalized() {
        let cases = [
            ("/api/login", "/api/login"),
            ("/api/%6Cogin", "/api/login"),
            ("/api/%6cogin", "/api/login"),
            ("/static/../api/login", "/api/login"),
            ("/api/./login/.", "/api/login"),
            ("/api/%2E%2E/admin", "/admin"),
            ("/../../etc", "/etc"),
            ("/a%2Fb/c", "/a%2Fb/c"),
            ("/a%2fb/..", "/"),
            ("/100%", "/100%"),
            ("/%zz/%4", "/%zz/%4"),
            ("/%FF", "/\u{FFFD}"),
            ("/a//b", "/a//b"),
        ];
        for (raw, expect) in cases {
            assert_eq!(decision_path(raw), expect, "{raw}");
        }
        assert!(matches!(decision_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn text_headers_refuse_only_what_the_limiter_reads() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", HeaderValue::from_static("u-1"));
        headers.insert("x-blob", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        let text = text_headers(&headers, |name| name == "x-user-id").unwrap();
        assert_eq!(text, [("x-user-id", "u-1")]);
        assert_eq!(
            text_headers(&headers, |name| name == "x-blob"),
            Err("x-blob")
        );
    }

    #[test]
    fn outcomes_index_their_table() {
        for (i, outcome) in ProxyOutcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
    }
}

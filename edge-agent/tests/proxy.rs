//! Reverse-proxy mode (DESIGN §8) as an operator runs it: the real `edge-agent` binary with a
//! `proxy:` section, in front of a real HTTP/1.1 upstream this module serves on a free
//! loopback port. The upstream echoes what reached it (method, path and query, headers, body)
//! and records every request, so each test can say what was forwarded, what was preserved,
//! and what never arrived. As in `binary`, the edge's regional is an address nothing answers,
//! so each rule's failure mode (`local`) decides: the proxy is what is under test here.

use std::{
    convert::Infallible,
    io::{Read, Write},
    net::{SocketAddr, TcpListener as StdListener, TcpStream},
    path::Path,
    pin::Pin,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming},
};
use system_tests::{
    http::{RawReply, Reply, parse, request},
    metrics,
    process::Spawned,
};
use tokio::sync::{mpsc, oneshot};

use crate::binary::{deployment_with, replace, start};

const BIN: &str = env!("CARGO_BIN_EXE_edge-agent");

const RULES: &str = "\
version: 3
rate_limits:
  endpoints:
    - { id: login, path: /api/login, method: POST, limit: 2, window: 1d, key: ip, on_failure: local }
    - { id: api, path: /api/**, limit: 100, window: 1d, key: ip, on_failure: local }
    - { id: tenant, path: /tenant/**, limit: 100, window: 1d, key: \"header:x-tenant\", on_failure: local }
";

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    uri: String,
}

/// A real HTTP/1.1 server on a free loopback port, in a thread of its own. Endpoints:
///
/// - `/big?n=N`: `N` bytes of [`pattern`], with a `Content-Length`.
/// - `/digest`: reads the body piece by piece (counting into `received` as it goes) and answers
///   `{"len", "hash"}` of it.
/// - `/drip`: answers `first\n` at once and the rest of the body only when the test sends it
///   through `drip`.
/// - anything else: echoes `{"method", "uri", "headers", "body"}` as JSON, with status
///   `x-status` (default 200), an `x-ratelimit-limit: 999` of its own and a `proxy-authenticate`
///   header, both of which the edge must replace or drop.
struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    _stop: oneshot::Sender<()>,
}

#[derive(Default)]
struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    received: AtomicU64,
    drip: Mutex<Option<mpsc::Sender<Bytes>>>,
}

type UpBody = BoxBody<Bytes, Infallible>;

impl Upstream {
    fn start() -> Upstream {
        let listener = StdListener::bind("127.0.0.1:0").expect("a free loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("bound");
        let state = Arc::new(UpstreamState::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = state.clone();
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio takes it");
                let handler = move |_peer, request| {
                    let state = served.clone();
                    async move { answer(&state, request).await }
                };
                shared::http::serve(listener, handler, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Upstream {
            addr,
            state,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("no panic holding it").clone()
    }
}

async fn answer(state: &UpstreamState, request: Request<Incoming>) -> Response<UpBody> {
    let (parts, mut body) = request.into_parts();
    state.seen.lock().expect("no panic holding it").push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
    });
    match parts.uri.path() {
        "/files/big" => {
            let n = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Response::new(Full::new(Bytes::from(pattern(n))).boxed())
        }
        "/files/digest" => {
            let mut digest = Fnv::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    digest.write(&data);
                    len += data.len() as u64;
                    state.received.store(len, Ordering::SeqCst);
                }
            }
            let answer = serde_json::json!({"len": len, "hash": digest.0});
            Response::new(Full::new(Bytes::from(answer.to_string())).boxed())
        }
        "/files/drip" => {
            let (tx, rx) = mpsc::channel(4);
            tx.send(Bytes::from_static(b"first\n"))
                .await
                .expect("the receiver is right here");
            *state.drip.lock().expect("no panic holding it") = Some(tx);
            Response::new(Drip(rx).boxed())
        }
        _ => {
            let headers: Vec<(String, String)> = parts
                .headers
                .iter()
                .map(|(n, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (n.as_str().to_owned(), v)
                })
                .collect();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let echo = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "headers": headers,
                "body": String::from_utf8_lossy(&bytes),
            });
            let status = parts
                .headers
                .get("x-status")
                .and_then(|s| s.to_str().ok()?.parse().ok())
                .unwrap_or(200);
            Response::builder()
                .status(status)
                .header("x-upstream", "yes")
                .header("x-ratelimit-limit", "999")
                .header("proxy-authenticate", "Basic")
                .body(Full::new(Bytes::from(echo.to_string())).boxed())
                .expect("a valid response")
        }
    }
}

/// A response body fed by the test, one piece at a time.
struct Drip(mpsc::Receiver<Bytes>);

impl Body for Drip {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

/// `n` bytes that are not all alike, so a lost or reordered piece changes the hash.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

/// FNV-1a, 64 bits: the same whatever pieces the bytes arrive in.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn of(bytes: &[u8]) -> u64 {
        let mut h = Fnv::new();
        h.write(bytes);
        h.0
    }
}

/// The edge binary proxying to `upstream`, with `extra` proxy settings (YAML lines indented
/// under `proxy:`).
fn edge(tag: &str, upstream: &str, extra: &str) -> (Spawned, SocketAddr) {
    let dir = deployment_with(
        &format!("proxy-{tag}"),
        RULES,
        &format!("proxy:\n  upstream: {upstream}\n{extra}"),
    );
    start(&dir)
}

/// Sends `raw` as it is and reads the answer until the server closes.
fn raw(addr: SocketAddr, raw: &[u8]) -> RawReply {
    let mut s = connect(addr);
    s.write_all(raw).expect("sent");
    read_reply(&mut s)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("the edge listens");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout can be set");
    s
}

fn read_reply(s: &mut TcpStream) -> RawReply {
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    parse(&bytes)
}

fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {:?}", reply.body))
}

/// The echoed header `name`'s values.
fn echoed<'a>(echo: &'a serde_json::Value, name: &str) -> Vec<&'a str> {
    echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|pair| pair[0] == name)
        .filter_map(|pair| pair[1].as_str())
        .collect()
}

fn scrape(addr: SocketAddr) -> metrics::Metrics {
    let r = request(addr, "GET", "/metrics", "", b"");
    assert_eq!(r.status, 200, "{}", r.body);
    metrics::parse(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
}

#[test]
fn allowed_requests_are_forwarded_with_method_path_headers_and_body() {
    let upstream = Upstream::start();
    let (_edge, addr) = edge("forward", &upstream.url(), "");
    let r = request(
        addr,
        "PATCH",
        "/api/items/7?x=1&y=a%20b",
        "x-custom: abc\r\nx-status: 201\r\nx-forwarded-for: 198.51.100.1\r\n\
         keep-alive: timeout=5\r\nproxy-authorization: Basic Zm9v\r\n\
         connection: x-hop\r\nx-hop: 1\r\n",
        b"the body",
    );
    assert_eq!(r.status, 201, "the upstream's status: {}", r.body);
    let echo = json(&r);
    assert_eq!(echo["method"], "PATCH");
    assert_eq!(echo["uri"], "/api/items/7?x=1&y=a%20b");
    assert_eq!(echo["body"], "the body");
    assert_eq!(
        echoed(&echo, "host"),
        ["test"],
        "Host as the client sent it"
    );
    assert_eq!(echoed(&echo, "x-custom"), ["abc"]);
    assert_eq!(echoed(&echo, "content-length"), ["8"]);
    // 127.0.0.1 appended after what the client's own proxy wrote.
    assert_eq!(
        echoed(&echo, "x-forwarded-for"),
        ["198.51.100.1, 127.0.0.1"]
    );
    for hop in [
        "connection",
        "keep-alive",
        "proxy-authorization",
        "x-hop",
        "te",
        "upgrade",
    ] {
        assert!(echoed(&echo, hop).is_empty(), "{hop} reached the upstream");
    }
    // The upstream's response, with this edge's rate-limit headers: rule `api`, limit 100.
    assert_eq!(r.header("x-upstream"), Some("yes"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("99"));
    assert!(
        r.header("x-ratelimit-reset")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some()
    );
    assert!(r.header("retry-after").is_none());
    assert!(r.header("proxy-authenticate").is_none(), "{:?}", r.headers);

    // No rule for this path: forwarded as it is, with no rate-limit headers.
    let r = request(addr, "GET", "/static/logo.png", "", b"");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json(&r)["uri"], "/static/logo.png");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some("999"),
        "the upstream's own"
    );

    // The edge's own endpoints stay the edge's.
    assert_eq!(request(addr, "GET", "/healthz", "", b"").body, "ok\n");
    let seen: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(seen, ["/api/items/7?x=1&y=a%20b", "/static/logo.png"]);

    let m = scrape(addr);
    assert_eq!(
        m.get("edge_proxy_requests_total", &[("outcome", "forwarded")]),
        2.0
    );
    assert_eq!(
        m.sum("edge_proxy_requests_total", &[("outcome", "denied")]),
        None
    );
}

#[test]
fn past_the_limit_a_429_answers_and_the_upstream_never_sees_it() {
    let upstream = Upstream::start();
    let (_edge, addr) = edge("deny", &upstream.url(), "");
    let login = |path: &str, client: &str| {
        request(
            addr,
            "POST",
            path,
            &format!("x-forwarded-for: {client}\r\n"),
            b"user=a&password=b",
        )
    };
    for remaining in ["1", "0"] {
        let r = login("/api/login", "203.0.113.7");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-remaining"), Some(remaining));
    }
    // The third, however the path is spelled: the rule matches the path the upstream would
    // route, not the bytes.
    for path in ["/api/login", "/api/%6Cogin", "/static/../api/login"] {
        let r = login(path, "203.0.113.7");
        assert_eq!(r.status, 429, "{path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let retry: u64 = r
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After on 429");
        assert!(retry >= 1);
        assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
        assert!(r.header("x-ratelimit-reset").is_some());
        let v = json(&r);
        assert_eq!(v["allowed"], false);
        assert_eq!(v["error"], "rate_limit_exceeded");
        assert_eq!(v["retry_after"], retry);
        assert_eq!(v["rule"], "login");
        assert!(v["message"].as_str().is_some_and(|m| m.contains("login")));
    }
    // Another client behind the trusted proxy is another key.
    assert_eq!(login("/api/login", "203.0.113.8").status, 200);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 3, "only the allowed ones: {seen:?}");
    assert!(
        seen.iter()
            .all(|s| s.method == "POST" && s.uri == "/api/login")
    );
    let m = scrape(addr);
    let outcome = |o| m.get("edge_proxy_requests_total", &[("outcome", o)]);
    assert_eq!((outcome("forwarded"), outcome("denied")), (3.0, 3.0));
    assert_eq!(
        m.get(
            "edge_checks_total",
            &[
                ("rule", "login"),
                ("result", "denied"),
                ("path", "fallback")
            ]
        ),
        3.0
    );
}

#[test]
fn a_dead_or_silent_upstream_is_a_502_within_the_timeout() {
    // Nothing listens on a port just freed.
    let dead = StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let (_edge, addr) = edge(
        "dead",
        &format!("http://{dead}"),
        "  connect_timeout: 500ms\n  timeout: 1s\n",
    );
    let started = Instant::now();
    let r = request(addr, "GET", "/api/anything", "", b"");
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let v = json(&r);
    assert_eq!(v["error"], "bad_gateway");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot connect")),
        "{v}"
    );
    let m = scrape(addr);
    assert_eq!(
        m.get(
            "edge_proxy_requests_total",
            &[("outcome", "upstream_error")]
        ),
        1.0
    );

    // A listener that never accepts: the connection opens (the kernel's backlog) and nothing
    // answers, so the 1 s timeout ends the wait.
    let silent = StdListener::bind("127.0.0.1:0").expect("a free port");
    let silent_addr = silent.local_addr().expect("bound");
    let (_edge, addr) = edge(
        "silent",
        &format!("http://{silent_addr}"),
        "  connect_timeout: 500ms\n  timeout: 1s\n",
    );
    let started = Instant::now();
    let r = request(addr, "POST", "/api/slow", "", b"payload");
    let waited = started.elapsed();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(
        json(&r)["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not answer within 1s")),
        "{}",
        r.body
    );
    drop(silent);
}

#[test]
fn a_large_upload_streams_through_intact() {
    const SIZE: usize = 8 << 20;
    let upstream = Upstream::start();
    let (_edge, addr) = edge("upload", &upstream.url(), "");
    let body = pattern(SIZE);
    let mut s = connect(addr);
    let head = format!(
        "POST /files/digest HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\
         content-length: {SIZE}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("sent");
    let (first, rest) = body.split_at(SIZE / 2);
    s.write_all(first).expect("sent");
    // The upstream gets the first half while the rest does not exist yet: the edge streams,
    // it does not wait for the whole body.
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.state.received.load(Ordering::SeqCst) < first.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "the upstream has {} of the first {} bytes",
            upstream.state.received.load(Ordering::SeqCst),
            first.len()
        );
        thread::sleep(Duration::from_millis(10));
    }
    s.write_all(rest).expect("sent");
    let r = read_reply(&mut s);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["len"], SIZE as u64);
    assert_eq!(v["hash"], Fnv::of(&body));

    // A chunked upload (no length up front) arrives whole too.
    let mut chunked = b"POST /files/digest HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\
                        transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    let piece = pattern(100_000);
    for _ in 0..10 {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(&piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(addr, &chunked);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(v["len"], 1_000_000);
    assert_eq!(v["hash"], Fnv::of(&piece.repeat(10)));
}

#[test]
fn a_large_download_streams_through_intact() {
    const SIZE: usize = 8 << 20;
    let upstream = Upstream::start();
    let (_edge, addr) = edge("download", &upstream.url(), "");
    let r = raw(
        addr,
        format!("GET /files/big?n={SIZE} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(SIZE.to_string().as_str()));
    assert_eq!(r.body.len(), SIZE);
    assert_eq!(Fnv::of(&r.body), Fnv::of(&pattern(SIZE)));

    // The first piece reaches the client while the upstream has not sent the rest: nothing
    // waits for the whole response.
    let mut s = connect(addr);
    s.write_all(b"GET /files/drip HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .expect("sent");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"first\n") {
        let n = s
            .read(&mut buf)
            .expect("the first piece within the read timeout");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let drip = upstream
        .state
        .drip
        .lock()
        .expect("no panic holding it")
        .take()
        .expect("the upstream is mid-response");
    drip.blocking_send(Bytes::from_static(b"rest\n"))
        .expect("the response is still open");
    drop(drip);
    s.read_to_end(&mut got).expect("the rest");
    let r = parse(&got);
    assert_eq!(r.status, 200);
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        body.contains("first\n") && body.contains("rest\n"),
        "{body:?}"
    );
}

#[test]
fn bad_input_gets_a_400_and_the_edge_keeps_serving() {
    let upstream = Upstream::start();
    let (mut edge, addr) = edge("bad", &upstream.url(), "");
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "a user id that is not text",
            b"GET /api/x HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-user-id: \xff\xfe\r\n\r\n",
            "header x-user-id",
        ),
        (
            "a header a rule keys on that is not text",
            b"GET /tenant/a HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-tenant: caf\xe9\r\n\r\n",
            "header x-tenant",
        ),
        (
            "CONNECT",
            b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\nconnection: close\r\n\r\n",
            "origin-form",
        ),
        (
            "OPTIONS *",
            b"OPTIONS * HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
            "origin-form",
        ),
    ];
    for (what, bytes, expect) in cases {
        let r = raw(addr, bytes);
        assert_eq!(r.status, 400, "{what}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
        assert_eq!(v["error"], "bad_request", "{what}");
        let message = v["message"].as_str().expect("a message");
        assert!(message.contains(expect), "{what}: {message:?}");
    }
    // Not HTTP at all: hyper's own 400, or a closed connection; either way only this one.
    let mut s = connect(addr);
    let _ = s.write_all(b"\x00\x01garbage\r\n\r\n");
    let mut junk = Vec::new();
    let _ = s.read_to_end(&mut junk);
    assert!(
        junk.is_empty() || junk.starts_with(b"HTTP/1.1 400"),
        "{junk:?}"
    );
    // A bad header name.
    let r = raw(
        addr,
        b"GET /api/x HTTP/1.1\r\nhost: t\r\nconnection: close\r\nbad header: 1\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    // A value the limiter does not read may be any bytes: forwarded as it is.
    let r = raw(
        addr,
        b"GET /static/a HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-blob: \xff\r\n\r\n",
    );
    assert_eq!(r.status, 200);

    let seen: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(seen, ["/static/a"], "nothing refused reached the upstream");
    let r = request(addr, "GET", "/api/still-here", "", b"");
    assert_eq!(r.status, 200, "still serving: {}", r.body);
    let m = scrape(addr);
    assert_eq!(
        m.get("edge_proxy_requests_total", &[("outcome", "bad_request")]),
        4.0
    );
    let logged = edge.printed();
    assert!(!logged.contains("panicked"), "{logged}");
}

#[test]
fn validate_checks_the_proxy_section() {
    let dir = deployment_with(
        "proxy-validate",
        RULES,
        "proxy:\n  upstream: http://127.0.0.1:3000\n  timeout: 5s\n",
    );
    let config = dir.join("edge.yaml");
    let validate = |config: &Path| {
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("--validate")
            .output()
            .expect("the binary was built by cargo for this test")
    };
    let out = validate(&config);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("proxying other paths to http://127.0.0.1:3000"),
        "{said}"
    );
    let good = std::fs::read_to_string(&config).expect("exists");
    std::fs::write(&config, good.replace("http://", "https://")).expect("writable");
    let out = validate(&config);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("edge.yaml: proxy.upstream: "), "{err}");
    assert!(err.contains("https is not supported"), "{err}");

    let help = Command::new(BIN).arg("--help").output().expect("runs");
    assert!(String::from_utf8_lossy(&help.stdout).contains("proxy:"));
}

#[test]
fn a_reloaded_proxy_section_moves_the_next_requests_to_the_new_upstream() {
    let (first, second) = (Upstream::start(), Upstream::start());
    let dir = deployment_with(
        "proxy-reload",
        RULES,
        &format!("proxy:\n  upstream: {}\n", first.url()),
    );
    let (mut edge, addr) = start(&dir);
    let get = |path: &str| request(addr, "GET", path, "", b"").status;
    assert_eq!(get("/api/one"), 200);
    let config = dir.join("edge.yaml");
    let text = std::fs::read_to_string(&config).expect("exists");
    let applied = |edge: &mut Spawned| {
        edge.wait_for(
            "a reload applying the proxy",
            Duration::from_secs(10),
            |line| {
                line.contains("configuration reloaded; applied: proxy")
                    .then_some(())
            },
        );
    };

    replace(&config, &text.replace(&first.url(), &second.url()));
    edge.signal("HUP");
    applied(&mut edge);
    assert_eq!(get("/api/two"), 200);
    let uris = |u: &Upstream| u.seen().into_iter().map(|s| s.uri).collect::<Vec<_>>();
    assert_eq!(uris(&first), ["/api/one"]);
    assert_eq!(uris(&second), ["/api/two"]);

    // No `proxy:` at all: the edge answers only its own paths.
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("proxy:") && !l.starts_with("  upstream:"))
        .map(|l| format!("{l}\n"))
        .collect();
    replace(&config, &without);
    applied(&mut edge);
    assert_eq!(get("/api/three"), 404);
    assert_eq!(uris(&second), ["/api/two"]);
}

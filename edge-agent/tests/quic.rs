//! The QUIC upstream and `shared::net` end to end: real QUIC on loopback, real certificates
//! from `shared::net::pki`, and the simulator's `WireRegional` served by `shared::net::serve`.
//! Covers DESIGN §5 (frames, caps, close codes), the §7 rows "untrusted peer", "bad frame" and
//! "regional unreachable" as seen from the edge, and rule sets the regional pushes (§2).

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use edge_agent::{
    AgentConfig, DecisionPath, QuicConfig, QuicUpstream, Request, Upstream, UpstreamError,
};
use quinn::{Endpoint, VarInt, crypto::rustls::QuicClientConfig};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use shared::{
    Clock, LimitId, ManualClock,
    net::{self, Ca, Identity, NetError, NetStats, Peer, Service},
    quota::{DEFAULT_THRESHOLD, EdgeId},
    sim::WireRegional,
    wire::{
        Acquire, Check, CloseCode, ErrorNotice, Hello, MAX_KEY_LEN, MAX_KEYS_PER_BATCH, Message,
        PROTOCOL_VERSION, Refusal, Refused, Role, RuleSetAck, RuleSetPush, SyncBatch, SyncEntry,
        Welcome, encode_frame,
    },
};
use tokio::task::JoinHandle;

use crate::support::*;

const REGION: &str = "eu";
/// The regional's node name, which its certificate carries and edges dial.
const REGIONAL: &str = "regional-eu-1";
/// Long enough for a loopback QUIC call on a busy two-core machine, short enough that a test
/// that waits on it fails quickly.
const PATIENCE: Duration = Duration::from_secs(5);

const HARD: &str = "rate_limits:\n  endpoints:\n    \
    - { id: login, path: /login, limit: 100, window: 1m, key: ip, strictness: hard, on_failure: closed }\n";

// ---------------------------------------------------------------------------------------------
// The handshake and the happy path

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_decides_exactly_and_locally_through_quic() {
    let pki = Pki::new();
    let rules = rules(HARD);
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let server = Server::start(
        &pki.regional,
        SimRegional::new(&region, &clock),
        localhost(),
    )
    .await;
    let upstream = QuicUpstream::connect(pki.edge_config(vec![server.addr], "edge-eu-1")).unwrap();
    let connected = tokio::time::timeout(PATIENCE, upstream.connected()).await;
    assert_eq!(connected.ok(), Some(server.addr), "mutual TLS and hello");

    let config = AgentConfig {
        upstream_timeout: PATIENCE,
        ..AgentConfig::default()
    };
    let agent = agent_with(config, &rules, upstream.clone(), &clock);
    let login = Request {
        ip: Some("1.1.1.1"),
        ..Request::new("POST", "/login")
    };
    let first = agent.check_async(&login, NonZeroU32::MIN).await;
    assert!(first.allowed);
    assert_eq!(first.path, DecisionPath::Exact, "a hard key starts exact");
    // The exact answer came back with a grant (demand 1 × 2): the next two are local.
    assert_eq!(agent.check(&login).path, DecisionPath::Local);
    assert_eq!(agent.check(&login).path, DecisionPath::Local);
    assert_eq!(agent.check(&login).path, DecisionPath::Exact, "grant spent");

    // A sync over QUIC reports the use and brings a new grant.
    agent.flush().await.unwrap();
    let limit = rules.rule("login").unwrap().limits()[0].id();
    {
        let r = region.lock().unwrap();
        let ledger = r
            .model()
            .ledger(&(limit, "i:1.1.1.1".into()), window())
            .unwrap();
        assert_eq!(
            ledger.used(),
            4,
            "every admission reached the regional once"
        );
        assert!(ledger.counters(EdgeId(0)).granted > 4, "a grant beyond use");
    }
    let local = (0..6)
        .filter(|_| agent.check(&login).path == DecisionPath::Local)
        .count();
    assert!(local >= 4, "the synced grant decides locally: {local} of 6");
    assert_eq!(agent.stats().sync_failures, 0);
    // The server counts a stream once its reply is written, which can be just after the client
    // has read it.
    eventually("acquires and a sync served", || {
        server.stats.streams_served() >= 3
    })
    .await;
    assert_eq!(server.stats.connections_accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_during_tls() {
    let pki = Pki::new();
    let (_region, server) = sim_server(&pki).await;

    // Trusts the real CA (so it would accept the server), but its own certificate comes from
    // a CA of the same name that the server has never seen.
    let rogue = Ca::generate(CA_NAME).unwrap();
    let cert = rogue.issue("edge-eu-1", &[]).unwrap();
    let identity = Identity {
        ca_pem: pki.ca.cert_pem().to_owned(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
    };
    let config = QuicConfig {
        identity,
        ..pki.edge_config(vec![server.addr], "edge-eu-1")
    };
    let upstream = QuicUpstream::connect(config).unwrap();
    eventually("the server refuses a TLS handshake", || {
        server.stats.connections_failed() >= 2
    })
    .await;
    assert_eq!(upstream.connected_to(), None, "never usable");
    assert_eq!(server.stats.connections_accepted(), 0);
    let started = Instant::now();
    let result = upstream.sync(SyncBatch { entries: vec![] }).await;
    assert!(
        matches!(result, Err(UpstreamError::Unreachable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(20));

    // The other way round: an edge whose CA did not issue the server's certificate does not
    // talk to that server, whatever certificate it presents itself.
    let stranger = Pki::new();
    let config = QuicConfig {
        identity: stranger.edge("edge-eu-1"),
        ..pki.edge_config(vec![server.addr], "edge-eu-1")
    };
    let before = server.stats.connections_failed();
    let upstream = QuicUpstream::connect(config).unwrap();
    eventually("the server sees the aborted handshake", || {
        server.stats.connections_failed() > before
    })
    .await;
    assert_eq!(upstream.connected_to(), None);
    assert_eq!(server.stats.connections_accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let (_region, server) = sim_server(&pki).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca.cert_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![net::ALPN.to_vec()];
    let mut endpoint = Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));

    let result = tokio::time::timeout(
        PATIENCE,
        net::connect(&endpoint, server.addr, REGIONAL, &hello("edge-eu-1")),
    )
    .await
    .expect("refused promptly, not timed out");
    assert!(
        matches!(result, Err(NetError::ConnectionLost(_))),
        "{result:?}"
    );
    eventually("the server counts the refused handshake", || {
        server.stats.connections_failed() == 1
    })
    .await;
    assert_eq!(server.stats.connections_accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_a_name_the_certificate_does_not_carry_is_unauthorized() {
    let pki = Pki::new();
    let (_region, server) = sim_server(&pki).await;
    let endpoint = net::client_endpoint(localhost(), &pki.edge("edge-eu-1")).unwrap();

    let impostor = net::connect(&endpoint, server.addr, REGIONAL, &hello("edge-eu-2")).await;
    let Err(NetError::Refused(refused)) = impostor else {
        panic!("an impostor must be refused: {impostor:?}");
    };
    assert_eq!(refused.reason, Refusal::Unauthorized);
    assert!(refused.message.contains("edge-eu-2"), "{}", refused.message);
    assert_eq!(server.stats.handshakes_refused(), 1);

    // The same certificate under its own name is welcome, and so is a wrong region refused
    // by the service, not by the name check.
    let (_conn, welcome) = net::connect(&endpoint, server.addr, REGIONAL, &hello("edge-eu-1"))
        .await
        .unwrap();
    assert_eq!(welcome.node, REGIONAL);
    let wrong_region = Hello {
        region: "us".into(),
        ..hello("edge-eu-1")
    };
    let result = net::connect(&endpoint, server.addr, REGIONAL, &wrong_region).await;
    assert!(
        matches!(&result, Err(NetError::Refused(r)) if r.reason == Refusal::WrongRegion),
        "{result:?}"
    );
    assert_eq!(server.stats.handshakes_refused(), 2);
}

// ---------------------------------------------------------------------------------------------
// Bad frames (DESIGN §5: close that stream with a code and a metric, touch nothing else)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_stream_with_their_code() {
    let pki = Pki::new();
    let (_region, server) = sim_server(&pki).await;

    // A well-behaved edge on its own connection, calling all along.
    let good = QuicUpstream::connect(pki.edge_config(vec![server.addr], "edge-eu-1")).unwrap();
    tokio::time::timeout(PATIENCE, good.connected())
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let caller = {
        let (good, stop, ok, failed) = (good.clone(), stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let counter = match good.sync(SyncBatch { entries: vec![] }).await {
                    Ok(_) => &ok,
                    Err(_) => &failed,
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    eventually("the good edge's calls are going", || {
        ok.load(Ordering::SeqCst) > 0
    })
    .await;

    // The offender: a handshaken connection of its own.
    let endpoint = net::client_endpoint(localhost(), &pki.edge("edge-eu-2")).unwrap();
    let (conn, _) = net::connect(&endpoint, server.addr, REGIONAL, &hello("edge-eu-2"))
        .await
        .unwrap();

    let valid = frame(&batch(1, 1));
    let mut truncated = valid.clone();
    truncated.truncate(valid.len() - 3);
    let cases: Vec<(&str, Vec<u8>, CloseCode)> = vec![
        (
            "garbage",
            vec![0, 0, 0, 5, PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff],
            CloseCode::Malformed,
        ),
        ("truncated, then finished", truncated, CloseCode::Malformed),
        (
            "oversized length prefix",
            vec![0xff, 0xff, 0xff, 0xff, PROTOCOL_VERSION],
            CloseCode::FrameTooLarge,
        ),
        (
            "another protocol version",
            vec![0, 0, 0, 2, PROTOCOL_VERSION + 1, 0],
            CloseCode::UnsupportedVersion,
        ),
        (
            "a batch of 1,025 entries",
            too_many_entries(),
            CloseCode::TooManyKeys,
        ),
        ("a 257-byte key", too_long_key(), CloseCode::KeyTooLong),
        (
            "a second hello",
            frame(&hello("edge-eu-2").into()),
            CloseCode::UnexpectedMessage,
        ),
    ];
    let mut expected: HashMap<CloseCode, u64> = HashMap::new();
    let ok_before = ok.load(Ordering::SeqCst);
    for (name, bytes, code) in cases {
        let closed = send_raw(&conn, &bytes).await;
        assert_eq!(closed, Some(code), "{name}: the stream's reset code");
        *expected.entry(code).or_default() += 1;
        assert_eq!(
            server.stats.frames_refused(code),
            expected[&code],
            "{name}: counted under {}",
            code.name()
        );
    }

    let ok_during = ok.load(Ordering::SeqCst) - ok_before;

    // The offender's own connection is still good for well-formed requests.
    let reply = net::call(&conn, &batch(1, 1)).await.unwrap();
    assert!(matches!(reply, Message::SyncAck(_)), "{}", reply.kind());
    stop.store(true, Ordering::SeqCst);
    caller.await.unwrap();
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "the other connection never failed"
    );
    assert!(ok_during > 0, "the other connection was served meanwhile");
    assert_eq!(server.stats.connections_accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// Failover and reconnection (DESIGN §7, regional unreachable)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_skips_a_dead_address() {
    let pki = Pki::new();
    let (_region, server) = sim_server(&pki).await;
    let dead = {
        // Bound, then dropped: nothing listens there any more.
        let socket = std::net::UdpSocket::bind(localhost()).unwrap();
        socket.local_addr().unwrap()
    };
    let upstream =
        QuicUpstream::connect(pki.edge_config(vec![dead, server.addr], "edge-eu-1")).unwrap();
    let connected = tokio::time::timeout(PATIENCE, upstream.connected()).await;
    assert_eq!(connected.ok(), Some(server.addr));
    assert!(upstream.sync(SyncBatch { entries: vec![] }).await.is_ok());
}

/// A regional named by DNS (`localhost:port`, as a Kubernetes Service name would be) is
/// resolved at each attempt; a name that does not resolve is skipped like a dead address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regional_named_by_dns_is_resolved_and_a_bad_name_is_skipped() {
    let pki = Pki::new();
    let (_region, server) = sim_server(&pki).await;
    let named: net::Address = format!("localhost:{}", server.addr.port()).parse().unwrap();
    let missing: net::Address = "no-such-regional.invalid:7401".parse().unwrap();
    let config = QuicConfig {
        addresses: vec![missing, named],
        ..pki.edge_config(vec![], "edge-eu-1")
    };
    let upstream = QuicUpstream::connect(config).unwrap();
    let connected = tokio::time::timeout(PATIENCE, upstream.connected()).await;
    assert_eq!(connected.ok(), Some(server.addr));
    assert!(upstream.sync(SyncBatch { entries: vec![] }).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_regional_is_reconnected_and_calls_fail_fast_meanwhile() {
    let pki = Pki::new();
    let rules = rules(HARD);
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let server = Server::start(
        &pki.regional,
        SimRegional::new(&region, &clock),
        localhost(),
    )
    .await;
    let addr = server.addr;
    let upstream = QuicUpstream::connect(pki.edge_config(vec![addr], "edge-eu-1")).unwrap();
    tokio::time::timeout(PATIENCE, upstream.connected())
        .await
        .unwrap();
    let limit = rules.rule("login").unwrap().limits()[0].id();
    assert!(upstream.acquire(acquire(1, limit)).await.unwrap().allowed);

    server.stop().await;
    eventually("the edge notices the regional is gone", || {
        upstream.connected_to().is_none()
    })
    .await;
    for id in 2..5 {
        let started = Instant::now();
        let result = upstream.acquire(acquire(id, limit)).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(UpstreamError::Unreachable(_))),
            "{result:?}"
        );
        assert!(took < Duration::from_millis(20), "failed fast: {took:?}");
    }

    let server = Server::restart(&pki.regional, SimRegional::new(&region, &clock), addr).await;
    let connected = tokio::time::timeout(PATIENCE, upstream.connected()).await;
    assert_eq!(
        connected.ok(),
        Some(addr),
        "reconnected to the same address"
    );
    let reply = upstream.acquire(acquire(5, limit)).await.unwrap();
    assert!(reply.allowed);
    assert_eq!(reply.request_id, 5);
    assert_eq!(server.stats.connections_accepted(), 1);
}

// ---------------------------------------------------------------------------------------------
// Rule sets pushed by the regional (DESIGN §2: rules change without a restart)

/// What the regional pushes: `login` is gone, `search` is new (1 a minute).
const PUSHED: &str = "rate_limits:\n  endpoints:\n    \
    - { id: search, path: /search, limit: 1, window: 1m, key: ip, strictness: hard, on_failure: closed }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_rule_set_is_acknowledged_and_enforced_and_a_bad_one_refused() {
    let pki = Pki::new();
    let running = rules(HARD).with_version(3);
    let clock = ManualClock::new(T0);
    let region = regional(&running, 1);
    let service = SimRegional::new(&region, &clock);
    let server = Server::start(&pki.regional, service.clone(), localhost()).await;
    // As the binary does: the version of the rules the agent starts with.
    let config = QuicConfig {
        rule_set_version: running.version(),
        ..pki.edge_config(vec![server.addr], "edge-eu-1")
    };
    let upstream = QuicUpstream::connect(config).unwrap();
    let config = AgentConfig {
        upstream_timeout: PATIENCE,
        ..AgentConfig::default()
    };
    let agent = agent_with(config, &running, upstream.clone(), &clock);
    assert!(upstream.attach(&agent));
    assert!(!upstream.attach(&agent), "one agent per upstream");
    tokio::time::timeout(PATIENCE, upstream.connected())
        .await
        .unwrap();
    assert_eq!(service.hellos()[0].rule_set_version, 3);
    let conn = service.connection();

    let login = Request {
        ip: Some("1.1.1.1"),
        ..Request::new("POST", "/login")
    };
    let search = Request {
        ip: Some("1.1.1.1"),
        ..Request::new("GET", "/search")
    };
    let check = |request| agent.check_async(request, NonZeroU32::MIN);
    assert_eq!(check(&search).await.path, DecisionPath::Unlimited);
    assert_eq!(check(&login).await.path, DecisionPath::Exact);

    // A regional takes a rule set itself before it pushes it to its edges.
    let pushed = rules(PUSHED).with_version(4);
    *region.lock().unwrap() = WireRegional::new(pushed.clone(), 1, DEFAULT_THRESHOLD);
    let push = |version: u64, yaml: &str| {
        let message = Message::from(RuleSetPush {
            version,
            yaml: yaml.into(),
        });
        let conn = conn.clone();
        async move { net::call(&conn, &message).await.unwrap() }
    };
    let ack = |version, error| Message::from(RuleSetAck { version, error });
    assert_eq!(push(4, PUSHED).await, ack(4, None));
    assert_eq!(agent.rules().version(), 4);
    let search_limit = Some(pushed.rule("search").unwrap().limits()[0].id());
    let first = check(&search).await;
    assert_eq!(
        (first.allowed, first.rule),
        (true, search_limit),
        "{first:?}"
    );
    let second = check(&search).await;
    assert_eq!(
        (second.allowed, second.rule),
        (false, search_limit),
        "{second:?}"
    );
    assert_eq!(check(&login).await.path, DecisionPath::Unlimited, "gone");

    // Resent, or overtaken by the one in force: acknowledged, nothing changes.
    assert_eq!(push(4, HARD).await, ack(4, None));
    assert_eq!(push(2, HARD).await, ack(2, None));
    assert_eq!(agent.rules().version(), 4);

    // A set that does not validate is refused with where and why; version 4 stays.
    let bad = "rate_limits:\n  endpoints:\n    - { path: /search, limit: 1, window: 0s }\n";
    let Message::RuleSetAck(refused) = push(5, bad).await else {
        panic!("a rule set push is answered with an ack");
    };
    assert_eq!(refused.version, 5);
    let error = refused.error.expect("a zero window is refused");
    assert!(
        error.contains("version 5") && error.contains("rate_limits.endpoints[0].window"),
        "{error}"
    );
    assert_eq!(agent.rules().version(), 4);
    let still = check(&search).await;
    assert_eq!((still.allowed, still.rule), (false, search_limit));

    // Anything else the regional sends on a stream of its own is refused.
    let reply = net::call(&conn, &batch(1, 1)).await.unwrap();
    assert!(
        matches!(
            &reply,
            Message::Error(ErrorNotice {
                code: CloseCode::UnexpectedMessage,
                ..
            })
        ),
        "{reply:?}"
    );
    eventually("every push answered", || {
        upstream.push_stats().streams_served() == 5
    })
    .await;

    // The next connection's Hello names the version the agent runs now.
    conn.close(VarInt::from_u32(CloseCode::Normal.as_u32()), b"test");
    eventually("the edge reconnects", || service.hellos().len() == 2).await;
    assert_eq!(service.hellos()[1].rule_set_version, 4);
}

// ---------------------------------------------------------------------------------------------
// Helpers

const CA_NAME: &str = "rate limiter test CA";

/// A deployment's CA and its regional's identity.
struct Pki {
    ca: Ca,
    regional: Identity,
}

impl Pki {
    fn new() -> Pki {
        let ca = Ca::generate(CA_NAME).expect("ring generates keys");
        let regional = ca
            .issue(REGIONAL, &["localhost"])
            .expect("a valid node name");
        Pki {
            regional: Identity::new(&ca, &regional),
            ca,
        }
    }

    fn edge(&self, node: &str) -> Identity {
        let cert = self.ca.issue(node, &[]).expect("a valid node name");
        Identity::new(&self.ca, &cert)
    }

    /// An edge's config with backoffs short enough for tests.
    fn edge_config(&self, addresses: Vec<SocketAddr>, node: &str) -> QuicConfig {
        QuicConfig {
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            connect_timeout: Duration::from_millis(300),
            ..QuicConfig::new(addresses, REGIONAL, self.edge(node), node, REGION)
        }
    }
}

/// The simulator's regional behind `shared::net::serve`: edges are numbered in the order they
/// first connect. It keeps every `Hello` it welcomed and every connection, to push on.
struct SimRegional {
    region: Regional,
    clock: ManualClock,
    edges: Mutex<Vec<String>>,
    hellos: Mutex<Vec<Hello>>,
    connections: Mutex<Vec<quinn::Connection>>,
}

impl SimRegional {
    fn new(region: &Regional, clock: &ManualClock) -> Arc<SimRegional> {
        Arc::new(SimRegional {
            region: region.clone(),
            clock: clock.clone(),
            edges: Mutex::new(Vec::new()),
            hellos: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
        })
    }

    fn hellos(&self) -> Vec<Hello> {
        self.hellos
            .lock()
            .expect("no panic while holding the lock")
            .clone()
    }

    /// The connection welcomed last.
    fn connection(&self) -> quinn::Connection {
        let connections = self
            .connections
            .lock()
            .expect("no panic while holding the lock");
        connections.last().expect("an edge connected").clone()
    }
}

impl Service for SimRegional {
    type Session = EdgeId;

    fn hello(&self, _peer: &Peer, hello: &Hello) -> Result<(EdgeId, Welcome), Refused> {
        let refuse = |reason, message: &str| Refused {
            reason,
            message: message.to_owned(),
        };
        if hello.role != Role::Edge {
            return Err(refuse(Refusal::WrongRole, "edges only"));
        }
        if hello.region != REGION {
            return Err(refuse(Refusal::WrongRegion, "this regional serves eu"));
        }
        let mut edges = self.edges.lock().expect("no panic while holding the lock");
        let index = match edges.iter().position(|n| *n == hello.node) {
            Some(index) => index,
            None => {
                edges.push(hello.node.clone());
                edges.len() - 1
            }
        };
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            node: REGIONAL.into(),
            role: Role::Regional,
            region: REGION.into(),
            rule_set_version: 0,
        };
        // `try_into` rather than a named width, so this stays right whatever integer `EdgeId`
        // wraps.
        let id = index.try_into().expect("a handful of edges");
        self.hellos
            .lock()
            .expect("no panic while holding the lock")
            .push(hello.clone());
        Ok((EdgeId(id), welcome))
    }

    fn connected(&self, _: &Arc<EdgeId>, connection: &quinn::Connection) {
        self.connections
            .lock()
            .expect("no panic while holding the lock")
            .push(connection.clone());
    }

    async fn handle(&self, edge: &Arc<EdgeId>, message: Message) -> Message {
        let now = self.clock.now();
        let mut region = self.region.lock().expect("no panic while holding the lock");
        match message {
            Message::SyncBatch(batch) => region.sync(**edge, now, &batch).into(),
            Message::Acquire(request) => region.acquire(**edge, now, &request).into(),
            other => ErrorNotice {
                code: CloseCode::UnexpectedMessage,
                message: format!("{} is not for a regional", other.kind()),
            }
            .into(),
        }
    }
}

/// A running `serve`.
struct Server {
    addr: SocketAddr,
    endpoint: Endpoint,
    stats: Arc<NetStats>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(identity: &Identity, service: Arc<SimRegional>, addr: SocketAddr) -> Server {
        let endpoint = net::server_endpoint(addr, identity).expect("a free loopback port");
        let stats = Arc::new(NetStats::default());
        let task = tokio::spawn(net::serve(endpoint.clone(), service, stats.clone()));
        Server {
            addr: endpoint.local_addr().expect("bound"),
            endpoint,
            stats,
            task,
        }
    }

    /// Starts again on `addr`, which a stopped server held a moment ago: its socket is freed
    /// when the last of its tasks lets go, so binding is retried for a while.
    async fn restart(identity: &Identity, service: Arc<SimRegional>, addr: SocketAddr) -> Server {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match net::server_endpoint(addr, identity) {
                Ok(endpoint) => {
                    let stats = Arc::new(NetStats::default());
                    let task = tokio::spawn(net::serve(endpoint.clone(), service, stats.clone()));
                    return Server {
                        addr,
                        endpoint,
                        stats,
                        task,
                    };
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("cannot bind {addr} again: {err}"),
            }
        }
    }

    /// Closes the endpoint (every connection with `ShuttingDown`) and waits for the socket to
    /// be let go.
    async fn stop(self) {
        self.endpoint.close(
            VarInt::from_u32(CloseCode::ShuttingDown.as_u32()),
            b"restarting",
        );
        self.task
            .await
            .expect("serve returns when its endpoint closes");
        self.endpoint.wait_idle().await;
    }
}

async fn sim_server(pki: &Pki) -> (Regional, Server) {
    let rules = rules(HARD);
    let clock = ManualClock::new(T0);
    let region = regional(&rules, 1);
    let server = Server::start(
        &pki.regional,
        SimRegional::new(&region, &clock),
        localhost(),
    )
    .await;
    (region, server)
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn window() -> u64 {
    T0.as_u64() / 60_000_000_000
}

fn hello(node: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        node: node.into(),
        incarnation: 1,
        role: Role::Edge,
        region: REGION.into(),
        rule_set_version: 0,
        answer_within_ms: 50,
    }
}

fn acquire(request_id: u64, limit: LimitId) -> Acquire {
    Acquire {
        request_id,
        checks: vec![Check {
            limit,
            key: "i:9.9.9.9".into(),
            window: window(),
            cost: NonZeroU32::MIN,
            want: 0,
        }],
    }
}

fn batch(entries: usize, key_len: usize) -> Message {
    let entry = SyncEntry {
        limit: LimitId(1),
        key: "k".repeat(key_len),
        window: window(),
        used: 1,
        released: 0,
        want: 0,
    };
    SyncBatch {
        entries: vec![entry; entries],
    }
    .into()
}

fn frame(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(message, &mut out).expect("within the caps");
    out
}

/// A batch announcing 1,025 entries. The encoder refuses to write one, so this encodes the
/// largest valid batch and raises its entry count by one: postcard writes 1,024 as the varint
/// `80 08` and 1,025 as `81 08`, the same length, right after the version byte and the variant
/// index (3, `SyncBatch`). The decoder refuses the count before it reads any entry.
fn too_many_entries() -> Vec<u8> {
    let mut bytes = frame(&batch(MAX_KEYS_PER_BATCH, 1));
    assert_eq!(bytes[5], 3, "SyncBatch's variant index");
    assert_eq!(bytes[6..8], [0x80, 0x08], "1,024 as a varint");
    bytes[6] = 0x81;
    bytes
}

/// A batch whose one key claims 257 bytes: the largest valid key (256 bytes, varint `80 02`)
/// with its length raised by one (`81 02`). The key then takes the first byte of the next
/// field, the window index, which is 7 here so that the byte is ASCII: the key is valid UTF-8
/// and the decoder refuses it for its length alone.
fn too_long_key() -> Vec<u8> {
    let mut message = batch(1, MAX_KEY_LEN);
    if let Message::SyncBatch(batch) = &mut message {
        batch.entries[0].window = 7;
    }
    let mut bytes = frame(&message);
    let key = bytes
        .iter()
        .position(|&b| b == b'k')
        .expect("the key is in the frame");
    assert_eq!(bytes[key - 2..key], [0x80, 0x02], "256 as a varint");
    assert_eq!(
        bytes[key + MAX_KEY_LEN],
        7,
        "the window index follows the key"
    );
    bytes[key - 2] = 0x81;
    bytes
}

/// Sends `bytes` on a new stream of `conn`, finishes it, and returns the code the server
/// closed the stream with, if it closed it with one.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<CloseCode> {
    let (mut send, mut recv) = conn.open_bi().await.expect("the connection is up");
    // The server may stop our half before all of it is written; the reset code below is what
    // the test reads either way.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let mut buf = Vec::new();
    match tokio::time::timeout(PATIENCE, net::read_message(&mut recv, &mut buf)).await {
        Ok(Err(err @ NetError::StreamClosed { .. })) => err.peer_code(),
        other => panic!("expected the stream to be reset, got {other:?}"),
    }
}

/// Waits until `condition` holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

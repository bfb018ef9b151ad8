//! The `regional-aggregator` binary as an operator runs it: its help, `--validate`, the `pki`
//! subcommand, and a real process serving a real edge agent over QUIC, on memory and on a
//! real Redis, stopped by SIGTERM.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
    sync::Arc,
    time::{Duration, Instant},
};

use edge_agent::{Agent, AgentConfig, DecisionPath, QuicConfig, QuicUpstream, Request};
use regional_aggregator::store::{LedgerKey, RedisStore, RedisTopology, Store};
use shared::{Clock, FailureMode, Nanos, RuleSet, SystemClock, net::Identity};
use system_tests::{http::request, metrics, process::Spawned};

use crate::support::redis::{RedisServer, scratch_dir};

const BIN: &str = env!("CARGO_BIN_EXE_regional-aggregator");

const RULES: &str = "\
version: 3
rate_limits:
  endpoints:
    - { id: login, path: /login, method: POST, limit: 3, window: 1d, key: user_id, strictness: hard }
";

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary was built by cargo for this test")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A deployment directory: certificates made by the binary's own `pki` subcommand, a rules
/// file and a config listening on a port the OS picks.
fn deployment(tag: &str, extra: &str) -> PathBuf {
    let dir = scratch_dir(tag);
    let pki = dir.join("pki");
    let pki_arg = pki.to_str().expect("temp paths are UTF-8");
    let out = run(&[
        "pki",
        "--dir",
        pki_arg,
        "--node",
        "regional-eu-1",
        "--node",
        "edge-eu-1",
        "--node",
        "edge-eu-2",
        "--san",
        "localhost",
    ]);
    assert!(out.status.success(), "pki: {}", text(&out.stderr));
    let written = text(&out.stdout);
    for file in ["ca.pem", "ca.key", "regional-eu-1.pem", "edge-eu-1.key"] {
        assert!(written.contains(file), "pki lists {file}: {written}");
        assert!(pki.join(file).exists(), "{file} written");
    }
    fs::write(dir.join("rules.yaml"), RULES).expect("scratch dir is writable");
    fs::write(
        dir.join("regional.yaml"),
        format!(
            "node: regional-eu-1\nregion: eu\nlisten: 127.0.0.1:0\nrules: rules.yaml\n\
             tls: {{ca: pki/ca.pem, cert: pki/regional-eu-1.pem, key: pki/regional-eu-1.key}}\n\
             {extra}"
        ),
    )
    .expect("scratch dir is writable");
    dir
}

#[test]
fn help_explains_every_flag() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--config",
        "--redis",
        "--validate",
        "--log",
        "--log-format",
        "pki",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}:\n{help}");
    }
    assert!(
        help.contains("REGIONAL_CONFIG"),
        "the env var is documented"
    );
    let out = run(&["pki", "--help"]);
    let help = text(&out.stdout);
    for flag in ["--dir", "--node", "--san"] {
        assert!(help.contains(flag), "pki --help mentions {flag}:\n{help}");
    }
    // No config: clap refuses, exit 2, and says what is missing.
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--config"));
}

#[test]
fn validate_accepts_a_good_deployment_and_locates_what_is_wrong() {
    let dir = deployment("validate", "threshold: 0.75\n");
    let config = dir.join("regional.yaml");
    let config_arg = config.to_str().expect("UTF-8");
    let out = run(&["--config", config_arg, "--validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("ok"), "{said}");
    assert!(said.contains("1 rules (version 3)"), "{said}");
    assert!(said.contains("store: memory"), "{said}");

    // --redis replaces the store, and its password is not printed.
    let out = run(&[
        "--config",
        config_arg,
        "--validate",
        "--redis",
        "redis://:hunter2@127.0.0.1:1/0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("store: redis redis://***@127.0.0.1:1/0"),
        "{said}"
    );
    assert!(!said.contains("hunter2"));

    let refused = |what: &str, file: &Path, contents: &str, expect: &str| {
        let before = fs::read_to_string(file).expect("exists");
        fs::write(file, contents).expect("writable");
        let out = run(&["--config", config_arg, "--validate"]);
        fs::write(file, before).expect("writable");
        assert_eq!(out.status.code(), Some(2), "{what}: exit 2");
        let err = text(&out.stderr);
        assert!(
            err.contains(expect),
            "{what}: expected {expect:?} in {err:?}"
        );
        assert!(out.stdout.is_empty(), "{what}: nothing on stdout");
    };
    let good = fs::read_to_string(&config).expect("exists");
    refused(
        "threshold out of range",
        &config,
        &good.replace("0.75", "1.5"),
        "regional.yaml: threshold: 1.5 is not in (0, 1]",
    );
    refused(
        "unknown field",
        &config,
        &format!("{good}prot: 1\n"),
        "regional.yaml: prot: unknown field `prot`",
    );
    refused(
        "bad rules",
        &dir.join("rules.yaml"),
        &RULES.replace("window: 1d", "window: 1"),
        "rules.yaml: rate_limits.endpoints[0].window: \"1\" has no unit",
    );
    refused(
        "missing key file",
        &config,
        &good.replace("regional-eu-1.key", "nope.key"),
        "nope.key",
    );
    refused(
        "a key that is not the certificate's",
        &config,
        &good.replace("key: pki/regional-eu-1.key", "key: pki/edge-eu-1.key"),
        "invalid TLS configuration",
    );
    let out = run(&["--config", config_arg, "--validate", "--redis", "http://x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--redis: \"http://x\" is not a Redis URL"));
}

/// The binary on `dir`'s config with `args`, and the QUIC address it logs (the config may
/// ask for port 0). Dropping the handle kills it.
fn start(dir: &Path, args: &[&str]) -> (Spawned, SocketAddr) {
    let mut regional = Spawned::start(
        Command::new(BIN)
            .arg("--config")
            .arg(dir.join("regional.yaml"))
            .args(args)
            .args(["--log", "info"]),
    );
    let addr = regional.listen_addr();
    (regional, addr)
}

/// `GET /metrics` at `addr`, parsed as Prometheus text.
fn scrape(addr: SocketAddr) -> metrics::Metrics {
    let r = request(addr, "GET", "/metrics", "", b"");
    assert_eq!(r.status, 200, "{}", r.body);
    metrics::parse(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
}

/// SIGTERM, then its exit status within 5 s and everything it logged.
fn terminate(mut regional: Spawned) -> (ExitStatus, String) {
    regional.signal("TERM");
    regional.wait_exit(Duration::from_secs(5))
}

/// The edge agent `edge-eu-1` under [`RULES`], connected to `addr`.
async fn edge(dir: &Path, addr: SocketAddr) -> Arc<Agent> {
    let rules = RuleSet::from_yaml("rules.yaml", RULES).expect("test rules parse");
    edge_with(dir, addr, "edge-eu-1", &rules).await.0
}

/// Five logins for one user through the process: the hard limit of 3 admits exactly three,
/// decided by the regional (no fallback).
async fn five_logins(agent: &Arc<Agent>) -> Vec<(bool, DecisionPath)> {
    checks(agent, "POST", "/login", "alice", 5)
        .await
        .into_iter()
        .map(|(allowed, path, _)| (allowed, path))
        .collect()
}

fn assert_exactly_three(decisions: &[(bool, DecisionPath)]) {
    let allowed: Vec<bool> = decisions.iter().map(|d| d.0).collect();
    assert_eq!(allowed, [true, true, true, false, false], "{decisions:?}");
    assert!(
        decisions
            .iter()
            .all(|d| !matches!(d.1, DecisionPath::Fallback(_))),
        "the regional answered every exact request: {decisions:?}"
    );
    assert_eq!(
        decisions[0].1,
        DecisionPath::Exact,
        "a cold hard key asks the regional"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_serves_an_edge_from_memory_and_stops_on_sigterm() {
    let dir = deployment("serve-memory", "");
    let (regional, addr) = start(&dir, &[]);
    let agent = edge(&dir, addr).await;
    assert_exactly_three(&five_logins(&agent).await);
    let (status, log) = terminate(regional);
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_edges_and_refused_frames() {
    let dir = deployment("metrics", "metrics: 127.0.0.1:0\n");
    let (mut regional, addr) = start(&dir, &[]);
    let at = regional.logged_addr("metrics");
    let before = scrape(at);
    assert_eq!(before.get("regional_exact_checks_total", &[]), 0.0);
    assert_eq!(before.get("regional_rule_set_version", &[]), 3.0);
    assert_eq!(
        before.sum("regional_breaker_state", &[]),
        None,
        "no breaker without Redis"
    );

    let agent = edge(&dir, addr).await;
    assert_exactly_three(&five_logins(&agent).await);
    agent.flush().await.expect("the regional answers");

    // An edge that sends garbage on one stream: refused with `malformed`, and counted.
    let pki = dir.join("pki");
    let identity = Identity::from_files(
        pki.join("ca.pem"),
        pki.join("edge-eu-2.pem"),
        pki.join("edge-eu-2.key"),
    )
    .expect("pki wrote them");
    let endpoint =
        shared::net::client_endpoint("127.0.0.1:0".parse().expect("an address"), &identity)
            .expect("a client endpoint");
    let hello = shared::wire::Hello {
        protocol_version: shared::wire::PROTOCOL_VERSION,
        node: "edge-eu-2".into(),
        incarnation: 1,
        role: shared::wire::Role::Edge,
        region: "eu".into(),
        rule_set_version: 0,
        answer_within_ms: 50,
    };
    let (conn, _) = shared::net::connect(&endpoint, addr, "regional-eu-1", &hello)
        .await
        .expect("edge-eu-2 is a deployment edge");
    let (mut send, mut recv) = conn.open_bi().await.expect("the connection is up");
    let garbage = [
        0,
        0,
        0,
        5,
        shared::wire::PROTOCOL_VERSION,
        0xff,
        0xff,
        0xff,
        0xff,
    ];
    let _ = send.write_all(&garbage).await;
    let _ = send.finish();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        shared::net::read_message(&mut recv, &mut buf),
    )
    .await
    .expect("the regional answers the garbage at once");
    assert!(read.is_err(), "the stream is reset: {read:?}");

    let m = scrape(at);
    assert_eq!(
        m.get("regional_frames_refused_total", &[("code", "malformed")]),
        1.0
    );
    assert_eq!(
        m.get(
            "regional_frames_refused_total",
            &[("code", "too_many_keys")]
        ),
        0.0
    );
    assert_eq!(m.get("regional_edges_connected", &[]), 2.0);
    assert_eq!(m.get("regional_connections_accepted_total", &[]), 2.0);
    // The hard key's checks went to the regional: at least one admitted exactly, two denied
    // (the edge caches no denial it was not told to).
    assert!(m.get("regional_exact_checks_total", &[]) >= 3.0);
    assert!(m.get("regional_exact_denials_total", &[]) >= 1.0);
    assert!(m.get("regional_sync_batches_total", &[]) >= 1.0);
    assert!(m.get("regional_streams_served_total", &[]) >= 4.0);
    assert_eq!(
        request(at, "GET", "/healthz", "", b"").body,
        "ok\n",
        "the metrics port answers health checks"
    );
    assert_eq!(request(at, "GET", "/nope", "", b"").status, 404);
    conn.close(0u32.into(), b"done");
    let (status, _) = terminate(regional);
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_keeps_its_counts_in_the_redis_it_is_given() {
    let server = RedisServer::start();
    let dir = deployment("serve-redis", "metrics: 127.0.0.1:0\n");
    let (mut regional, addr) = start(&dir, &["--redis", &server.url()]);
    let metrics = regional.logged_addr("metrics");
    let agent = edge(&dir, addr).await;
    assert_exactly_three(&five_logins(&agent).await);
    agent
        .flush()
        .await
        .expect("the regional answers the last sync");

    let store = RedisStore::connect(&RedisTopology::Single(server.url()), Duration::from_secs(2))
        .await
        .expect("the test Redis is up");
    let rules = RuleSet::from_yaml("rules.yaml", RULES).expect("parses");
    let at = LedgerKey {
        limit: rules.rule("login").expect("rule").limits()[0].id(),
        key: "u:alice".into(),
        window: SystemClock.now().as_u64() / Nanos::from_secs(86_400).as_u64(),
    };
    let view = store
        .ledger(&at)
        .await
        .expect("Redis answers")
        .expect("the process wrote the ledger to Redis");
    assert_eq!(view.total(), 3, "Redis holds exactly the admitted logins");
    let m = scrape(metrics);
    assert_eq!(
        m.get("regional_breaker_state", &[]),
        0.0,
        "closed: on Redis"
    );
    assert_eq!(m.get("regional_breaker_opened_total", &[]), 0.0);
    let (status, _) = terminate(regional);
    assert!(status.success());
}

// ---------------------------------------------------------------------------------------------
// A regional killed mid-load (DESIGN §7): edges follow each rule's failure mode, no decision
// waits past its timeout, and what they admitted meanwhile reaches Redis once they reconnect.

const OUTAGE_RULES: &str = "\
rate_limits:
  endpoints:
    - { id: api, path: /api, limit: 1000, window: 1d, key: user_id, on_failure: local }
    - { id: login, path: /login, limit: 1000, window: 1d, key: user_id, strictness: hard, on_failure: closed }
    - { id: feed, path: /feed, limit: 1000, window: 1d, key: user_id, strictness: hard, on_failure: open }
";

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("loopback has free ports")
        .port()
}

/// `n` checks of `path` for `user` on a blocking thread: each decision and how long it took.
async fn checks(
    agent: &Arc<Agent>,
    method: &'static str,
    path: &'static str,
    user: &'static str,
    n: usize,
) -> Vec<(bool, DecisionPath, Duration)> {
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| {
                let started = Instant::now();
                let d = agent.check(&Request {
                    user_id: Some(user),
                    ..Request::new(method, path)
                });
                (d.allowed, d.path, started.elapsed())
            })
            .collect()
    })
    .await
    .expect("no check panics")
}

fn admitted(decisions: &[(bool, DecisionPath, Duration)]) -> u64 {
    decisions.iter().filter(|d| d.0).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_regional_leaves_edges_to_their_failure_modes_and_they_replay_on_return() {
    let server = RedisServer::start();
    let dir = deployment("killed", "");
    fs::write(dir.join("rules.yaml"), OUTAGE_RULES).expect("writable");
    let port = free_udp_port();
    let config = dir.join("regional.yaml");
    let text = fs::read_to_string(&config).expect("written");
    fs::write(
        &config,
        text.replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .expect("writable");
    let redis = ["--redis", &server.url()];
    let (regional, addr) = start(&dir, &redis);

    let rules = RuleSet::from_yaml("rules.yaml", OUTAGE_RULES).expect("parses");
    let edges = [
        edge_with(&dir, addr, "edge-eu-1", &rules).await,
        edge_with(&dir, addr, "edge-eu-2", &rules).await,
    ];
    let mut api_admitted = 0;
    for (agent, _) in &edges {
        api_admitted += admitted(&checks(agent, "GET", "/api", "bob", 50).await);
        assert_eq!(
            admitted(&checks(agent, "GET", "/login", "alice", 3).await),
            3
        );
        agent.flush().await.expect("the regional answers");
    }
    assert_eq!(api_admitted, 100);

    // SIGKILL: no goodbye; the edges find out by timeouts, then by QUIC's idle timeout.
    regional.kill();
    let timeout = AgentConfig::default().upstream_timeout;
    for (agent, _) in &edges {
        let api = checks(agent, "GET", "/api", "bob", 30).await;
        let login = checks(agent, "GET", "/login", "carol", 3).await;
        let feed = checks(agent, "GET", "/feed", "dave", 3).await;
        // Bob's soft key decides on what the edge holds, then on its share P/n: all 30 fit.
        assert_eq!(admitted(&api), 30, "{api:?}");
        api_admitted += 30;
        // A cold hard key needs the regional: `closed` denies, `open` admits.
        assert!(
            login
                .iter()
                .all(|d| !d.0 && d.1 == DecisionPath::Fallback(FailureMode::Closed)),
            "{login:?}"
        );
        assert!(
            feed.iter()
                .all(|d| d.0 && d.1 == DecisionPath::Fallback(FailureMode::Open)),
            "{feed:?}"
        );
        for (_, _, took) in api.iter().chain(&login).chain(&feed) {
            // The bound is the timeout; the slack is for a loaded two-core test machine.
            assert!(
                *took < timeout + Duration::from_millis(200),
                "a decision waited {took:?}"
            );
        }
    }

    let (regional, addr) = start(&dir, &redis);
    for (agent, upstream) in &edges {
        // QUIC notices the dead connection by its idle timeout (10 s), then redials.
        let back = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let at = upstream.connected().await;
                if agent.flush().await.is_ok() {
                    break at;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the edge reconnects to the restarted regional and syncs");
        assert_eq!(back, addr);
    }

    let store = RedisStore::connect(&RedisTopology::Single(server.url()), Duration::from_secs(2))
        .await
        .expect("the test Redis is up");
    let day = SystemClock.now().as_u64() / Nanos::from_secs(86_400).as_u64();
    let total = |rule: &'static str, user: &'static str| {
        let at = LedgerKey {
            limit: rules.rule(rule).expect("rule").limits()[0].id(),
            key: format!("u:{user}"),
            window: day,
        };
        let store = &store;
        async move {
            store
                .ledger(&at)
                .await
                .expect("Redis answers")
                .map_or(0, |view| view.total())
        }
    };
    assert_eq!(
        total("api", "bob").await,
        api_admitted,
        "every admission counted once"
    );
    assert_eq!(total("login", "alice").await, 6);
    assert_eq!(total("login", "carol").await, 0, "nothing was admitted");
    assert_eq!(
        total("feed", "dave").await,
        6,
        "what `open` let through is counted too"
    );
    let (status, _) = terminate(regional);
    assert!(status.success());
}

async fn edge_with(
    dir: &Path,
    addr: SocketAddr,
    node: &str,
    rules: &RuleSet,
) -> (Arc<Agent>, Arc<QuicUpstream>) {
    let pki = dir.join("pki");
    let identity = Identity::from_files(
        pki.join("ca.pem"),
        pki.join(format!("{node}.pem")),
        pki.join(format!("{node}.key")),
    )
    .expect("pki wrote them");
    let upstream = QuicUpstream::connect(QuicConfig::new(
        vec![addr],
        "regional-eu-1",
        identity,
        node,
        "eu",
    ))
    .expect("inside a runtime");
    tokio::time::timeout(Duration::from_secs(5), upstream.connected())
        .await
        .expect("the edge connects over loopback");
    let agent = Agent::builder(AgentConfig::default(), rules.clone(), upstream.clone())
        .build()
        .expect("inside a runtime");
    (Arc::new(agent), upstream)
}

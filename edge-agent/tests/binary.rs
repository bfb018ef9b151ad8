//! The `edge-agent` binary as an operator runs it: `--help`, `--validate`, and the HTTP API of
//! DESIGN §8 over real HTTP, answered by a real process. Its regional is an address nothing
//! listens on, so every decision is the rule's failure mode (`local`: this edge enforces the
//! whole limit alone while it knows of no other edge): the HTTP contract is what is under test
//! here; the tiers together are tested in `regional-aggregator` and `tests/`.

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use shared::net::{Ca, write_pki};
use system_tests::{
    http::{check, request},
    metrics,
    process::Spawned,
};

const BIN: &str = env!("CARGO_BIN_EXE_edge-agent");

const RULES: &str = "\
version: 7
rate_limits:
  endpoints:
    - { id: login, path: /api/login, method: POST, limit: 3, window: 1d, key: ip, strictness: hard, on_failure: local }
    - { id: search, path: /api/search, limit: 2, window: 1d, key: user_id, on_failure: local }
    - { id: login-canary, path: /api/login, method: POST, limit: 1, window: 1d, key: ip, shadow: true }
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

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rl-edge-test-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp is writable");
    dir
}

/// Certificates, rules, and a config listening on a port the OS picks.
fn deployment(tag: &str) -> PathBuf {
    deployment_with(tag, RULES, "")
}

/// As [`deployment`], with `rules` as the rules file and `extra` (whole YAML lines) appended to
/// the config. The regional is an address nothing answers, and 127.0.0.1 is a trusted proxy.
pub(crate) fn deployment_with(tag: &str, rules: &str, extra: &str) -> PathBuf {
    let dir = scratch(tag);
    let ca = Ca::generate("test CA").expect("ring generates keys");
    let edge = ca.issue("edge-eu-1", &[]).expect("a DNS name");
    write_pki(&dir.join("pki"), &ca, &[edge]).expect("writable");
    fs::write(dir.join("rules.yaml"), rules).expect("writable");
    // Port 9 on loopback: discard, nothing answers QUIC there.
    fs::write(
        dir.join("edge.yaml"),
        format!(
            "node: edge-eu-1\nregion: eu\nlisten: 127.0.0.1:0\nrules: rules.yaml\n\
             regional: {{addresses: [127.0.0.1:9], name: regional-eu-1}}\n\
             tls: {{ca: pki/ca.pem, cert: pki/edge-eu-1.pem, key: pki/edge-eu-1.key}}\n\
             identity: {{trusted_proxies: [127.0.0.1]}}\n{extra}"
        ),
    )
    .expect("writable");
    dir
}

#[test]
fn help_and_validate() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--config",
        "--validate",
        "--log",
        "--log-format",
        "EDGE_CONFIG",
    ] {
        assert!(help.contains(flag), "--help mentions {flag}:\n{help}");
    }
    let dir = deployment("validate");
    let config = dir.join("edge.yaml");
    let config_arg = config.to_str().expect("UTF-8");
    let out = run(&["--config", config_arg, "--validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("3 rules (version 7)"));

    let good = fs::read_to_string(&config).expect("exists");
    fs::write(&config, good.replace("[127.0.0.1]", "[127.0.0.1/8]")).expect("writable");
    let out = run(&["--config", config_arg, "--validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("edge.yaml: identity.trusted_proxies[0]: "),
        "{err}"
    );
}

/// The binary running on `dir`'s config, and the address it serves HTTP on.
pub(crate) fn start(dir: &std::path::Path) -> (Spawned, SocketAddr) {
    let mut edge = Spawned::start(Command::new(BIN).arg("--config").arg(dir.join("edge.yaml")));
    let addr = edge.listen_addr();
    (edge, addr)
}

#[test]
fn check_answers_as_design_8_says() {
    let dir = deployment("api");
    let (_edge, addr) = start(&dir);
    let login = r#"{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}"#;
    for remaining in [2, 1, 0] {
        let r = check(addr, login);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(remaining.to_string().as_str())
        );
        assert!(r.header("x-ratelimit-reset").is_some());
        assert!(r.header("retry-after").is_none());
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(v["allowed"], true);
        assert_eq!(v["limit"], 3);
        assert_eq!(v["rule"], "login");
        assert_eq!(v["retry_after"], 0);
        assert!(v.get("error").is_none());
    }
    let r = check(addr, login);
    assert_eq!(r.status, 429, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v["allowed"], false);
    assert_eq!(v["error"], "rate_limit_exceeded");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("login")));
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After on 429");
    assert_eq!(v["retry_after"], retry);
    assert!(retry >= 1);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    // The path is matched as the proxy matches a request line: escapes and dot segments
    // cannot step around the rule.
    for path in [
        "/api/%6Cogin",
        "/static/../api/login",
        "/api/./login",
        // Dot segments in the query are not the path's.
        "/api/login?next=/../../static",
    ] {
        let r = check(addr, &login.replace("/api/login", path));
        assert_eq!(
            (r.status, r.header("x-ratelimit-limit")),
            (429, Some("3")),
            "{path}: {}",
            r.body
        );
    }
    // Another client address is another key.
    let r = check(addr, &login.replace("203.0.113.7", "203.0.113.8"));
    assert_eq!(r.status, 200);

    // No `ip` in the body: the socket's, or a trusted proxy's X-Forwarded-For (127.0.0.1 is
    // trusted in this config), so two forwarded clients are two keys.
    let search = |forwarded: &str| {
        request(
            addr,
            "POST",
            "/v1/check",
            &format!("x-forwarded-for: {forwarded}\r\n"),
            br#"{"path": "/api/search"}"#,
        )
        .status
    };
    assert_eq!(
        [
            search("198.51.100.1"),
            search("198.51.100.1"),
            search("198.51.100.1")
        ],
        [200, 200, 429]
    );
    assert_eq!(search("198.51.100.2"), 200);

    // Cost counts against the limit; no rule matched is allowed without headers.
    let r = check(
        addr,
        r#"{"path": "/api/search", "user_id": "u-1", "cost": 2}"#,
    );
    assert_eq!(
        (r.status, r.header("x-ratelimit-remaining")),
        (200, Some("0"))
    );
    let r = check(addr, r#"{"path": "/static/logo.png"}"#);
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit").is_none());
    assert!(r.body.contains(r#""rule":null"#), "{}", r.body);
}

#[test]
fn bad_input_gets_a_clear_error_and_the_server_keeps_answering() {
    let dir = deployment("bad");
    let (mut edge, addr) = start(&dir);
    let bad = [
        ("not JSON", "{path", "line 1 column 2"),
        ("no path", r#"{"method": "GET"}"#, "missing field `path`"),
        (
            "unknown field",
            r#"{"path": "/a", "pat": 1}"#,
            "pat: unknown field",
        ),
        (
            "zero cost",
            r#"{"path": "/a", "cost": 0}"#,
            "cost: invalid value",
        ),
        (
            "bad ip",
            r#"{"path": "/a", "ip": "1.2.3"}"#,
            "ip: invalid IP address",
        ),
        (
            "relative path",
            r#"{"path": "a"}"#,
            "does not start with '/'",
        ),
        (
            "trailing garbage",
            r#"{"path": "/a"} x"#,
            "after the JSON object",
        ),
        (
            "wrong type",
            r#"{"path": "/a", "headers": []}"#,
            "headers: invalid type",
        ),
    ];
    for (what, body, expect) in bad {
        let r = check(addr, body);
        assert_eq!(r.status, 400, "{what}: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(v["error"], "bad_request", "{what}");
        let message = v["message"].as_str().expect("a message");
        assert!(
            message.contains(expect),
            "{what}: {message:?} lacks {expect:?}"
        );
    }
    let big = vec![b' '; 70_000];
    let r = request(addr, "POST", "/v1/check", "", &big);
    assert_eq!(r.status, 413, "{}", r.body);
    let r = request(addr, "GET", "/v1/check", "", b"");
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    assert_eq!(request(addr, "GET", "/nope", "", b"").status, 404);
    assert_eq!(request(addr, "GET", "/healthz", "", b"").body, "ok\n");
    // Alive, but its regional (port 9) never answers: not ready.
    let r = request(addr, "GET", "/readyz", "", b"");
    assert_eq!(r.status, 503, "{}", r.body);
    // A request that is not HTTP at all closes only its own connection.
    let mut s = TcpStream::connect(addr).expect("listening");
    let _ = s.write_all(b"\x00\x01garbage\r\n\r\n");
    drop(s);
    let r = check(
        addr,
        r#"{"path": "/api/login", "method": "POST", "ip": "192.0.2.1"}"#,
    );
    assert_eq!(r.status, 200, "still answering");
    let logged = edge.printed();
    assert!(!logged.contains("panicked"), "{logged}");
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_what_was_decided() {
    let dir = deployment("metrics");
    let (_edge, addr) = start(&dir);
    let scrape = || {
        let r = request(addr, "GET", "/metrics", "", b"");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/openmetrics-text")),
            "{:?}",
            r.headers
        );
        metrics::parse(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
    };
    let before = scrape();
    assert_eq!(before.sum("edge_checks_total", &[("rule", "login")]), None);
    assert_eq!(before.get("edge_rule_set_version", &[]), 7.0);
    assert_eq!(before.get("edge_upstream_connected", &[]), 0.0);

    // The regional never answers: `login` (limit 3, `local`) decides by its failure mode.
    let login = r#"{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}"#;
    let statuses: Vec<u16> = (0..4).map(|_| check(addr, login).status).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(check(addr, r#"{"path": "/static/a.css"}"#).status, 200);

    let m = scrape();
    let login = |result| {
        m.get(
            "edge_checks_total",
            &[("rule", "login"), ("result", result), ("path", "fallback")],
        )
    };
    assert_eq!((login("allowed"), login("denied")), (3.0, 1.0));
    assert_eq!(
        m.get(
            "edge_checks_total",
            &[("rule", "none"), ("path", "unlimited")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "edge_fallbacks_total",
            &[("rule", "login"), ("mode", "local")]
        ),
        4.0
    );
    assert_eq!(m.get("edge_denials_total", &[]), 1.0);
    assert_eq!(m.get("edge_decision_duration_seconds_count", &[]), 5.0);
    assert_eq!(
        m.get(
            "edge_decision_duration_seconds_bucket",
            &[("path", "fallback"), ("le", "+Inf")]
        ),
        4.0
    );
    // Only the unlimited check was decided without the network; the four others found no
    // grant (there is no regional to give one).
    assert_eq!(m.get("edge_local_decision_ratio", &[]), 0.2);
    assert_eq!(
        m.get("edge_exact_reasons_total", &[("reason", "no_grant")]),
        4.0
    );
    assert_eq!(
        m.get("edge_exact_reasons_total", &[("reason", "near_limit")]),
        0.0
    );
    // With no regional there is no grant, so the shadow rule can confirm none of the four
    // locally: each counts as a would-deny, and none was denied for it.
    assert_eq!(
        m.get("edge_shadow_would_deny_total", &[("rule", "login-canary")]),
        4.0
    );
    assert_eq!(m.get("edge_sync_batches_total", &[]), 0.0);
    assert_eq!(m.get("edge_keys", &[]), 2.0, "login's key and the canary's");
    assert!(m.get("edge_sync_failures_total", &[]) >= 0.0);
    assert_eq!(
        request(addr, "POST", "/metrics", "", b"").status,
        404,
        "only GET"
    );
}

/// Writes `text` to `path` as an operator's tooling should (and a ConfigMap update does): to a
/// temporary file, renamed over it, so the watcher never reads half a file.
pub(crate) fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("writable");
    fs::rename(&tmp, path).expect("same directory");
}

#[test]
fn a_changed_configuration_is_applied_while_running_and_a_bad_one_changes_nothing() {
    const WITHIN: Duration = Duration::from_secs(10);
    let dir = deployment("reload");
    let config = dir.join("edge.yaml");
    let rules = dir.join("rules.yaml");
    let (mut edge, addr) = start(&dir);
    let reloaded = |edge: &mut Spawned, what: &str| {
        let what = what.to_owned();
        edge.wait_for(&format!("a reload applying {what}"), WITHIN, |line| {
            line.contains(&format!("configuration reloaded; applied: {what}"))
                .then_some(())
        });
    };
    let login = r#"{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}"#;
    let statuses = |n| {
        (0..n)
            .map(|_| check(addr, login).status)
            .collect::<Vec<_>>()
    };
    assert_eq!(statuses(4), [200, 200, 200, 429]);

    // SIGHUP with nothing changed: read again, nothing to apply.
    edge.signal("HUP");
    reloaded(&mut edge, "nothing");

    // A newer rules file, seen on disk without a signal: login 3 → 5, and the key keeps the
    // 3 it used.
    let v8 = RULES
        .replace("version: 7", "version: 8")
        .replace("limit: 3", "limit: 5");
    replace(&rules, &v8);
    reloaded(&mut edge, "rules");
    let r = check(addr, login);
    assert_eq!((r.status, r.header("x-ratelimit-limit")), (200, Some("5")));
    assert_eq!(statuses(2), [200, 429]);

    // The same rules edited without a new version: not applied, and the log says why.
    replace(&rules, &v8.replace("limit: 5", "limit: 50"));
    edge.wait_for("the not-newer warning", WITHIN, |line| {
        line.contains("version 8 is not newer than the rules in force (version 8)")
            .then_some(())
    });
    assert_eq!(check(addr, login).status, 429, "still 5");

    // A bad configuration: refused with its file and field, nothing changes.
    let good = fs::read_to_string(&config).expect("exists");
    replace(&config, &good.replace("[127.0.0.1]", "[127.0.0.1/8]"));
    let refusal = edge.wait_for("the refusal", WITHIN, |line| {
        line.contains("configuration reload refused")
            .then(|| line.to_owned())
    });
    assert!(
        refusal.contains("edge.yaml: identity.trusted_proxies[0]"),
        "{refusal}"
    );
    // 127.0.0.1 is still trusted: two forwarded clients are two keys.
    let by_ip = |forwarded: &str| {
        let body = r#"{"path": "/api/login", "method": "POST"}"#;
        request(
            addr,
            "POST",
            "/v1/check",
            &format!("x-forwarded-for: {forwarded}\r\n"),
            body.as_bytes(),
        )
        .status
    };
    assert_eq!(by_ip("198.51.100.1"), 200);
    assert_eq!(by_ip("198.51.100.2"), 200);

    // Trust nobody, and move `listen`: the first from the next request on, the second only
    // at a restart (said in the log).
    replace(
        &config,
        &good
            .replace("[127.0.0.1]", "[]")
            .replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1"),
    );
    // (Logged before the line saying what was applied.)
    edge.wait_for("the restart warning", WITHIN, |line| {
        line.contains("listen changed; the running values stay until the next restart")
            .then_some(())
    });
    reloaded(&mut edge, "identity");
    // Every forwarded address is now the socket's 127.0.0.1: one key, 5 a day.
    let statuses: Vec<u16> = (0..6)
        .map(|i| by_ip(&format!("198.51.100.{}", 10 + i)))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);

    // A rules file gone missing is refused once, not again every second while it stays gone.
    fs::remove_file(&rules).expect("exists");
    edge.wait_for("the missing-file refusal", WITHIN, |line| {
        (line.contains("configuration reload refused") && line.contains("rules.yaml")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(2500));

    // The configuration names another rules file, not there yet: refused. Once it is there,
    // it is the file watched, and its rules apply.
    let now = fs::read_to_string(&config).expect("exists");
    replace(
        &config,
        &now.replace("rules: rules.yaml", "rules: rules-v9.yaml"),
    );
    edge.wait_for("the refusal of a missing rules file", WITHIN, |line| {
        (line.contains("configuration reload refused") && line.contains("rules-v9.yaml"))
            .then_some(())
    });
    replace(
        &dir.join("rules-v9.yaml"),
        &RULES.replace("version: 7", "version: 9"),
    );
    reloaded(&mut edge, "rules");

    let m = metrics::parse(&request(addr, "GET", "/metrics", "", b"").body).expect("parses");
    assert_eq!(
        m.get("edge_config_reloads_total", &[("result", "refused")]),
        3.0
    );
    assert!(m.get("edge_config_reloads_total", &[("result", "applied")]) >= 4.0);
    assert_eq!(m.get("edge_rule_set_version", &[]), 9.0);
    let logged = edge.printed();
    assert!(!logged.contains("panicked"), "{logged}");
}

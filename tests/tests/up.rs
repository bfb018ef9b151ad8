//! DESIGN §10, the README's first command: `deploy/up.sh` starts the local topology (the
//! coordinator, two regions of a regional and two edges each, Redis when installed) and prints
//! the coordinator's status table, the README's `curl` works against it, every process serves
//! its metrics, and Ctrl-C stops every process it started.
//!
//! It uses the debug build `tests/run.sh` makes before the tests (`UP_NO_BUILD`), and the
//! topology's fixed ports (127.0.0.1:8080-8083, 7401-7402, 9000, 9401-9402, 6391-6392), as
//! the README's examples do.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use system_tests::{
    http, metrics,
    process::{Spawned, workspace_binary},
};

/// One `POST /v1/check` to the edge on `port`: the status code.
fn check(port: u16, body: &str) -> u16 {
    http::check(SocketAddr::from(([127, 0, 0, 1], port)), body).status
}

#[test]
fn up_starts_the_topology_answers_the_readme_curl_and_stops_on_ctrl_c() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("rl-up-{}", std::process::id()));
    let mut up = Spawned::start(
        Command::new("bash")
            .arg(root.join("deploy/up.sh"))
            .env("UP_PROFILE", "debug")
            .env("UP_NO_BUILD", "1")
            .env("UP_DIR", &dir),
    );
    up.wait_for("the ready banner", Duration::from_secs(60), |line| {
        line.contains("Ctrl-C stops everything").then_some(())
    });
    let printed = up.printed();
    for endpoint in [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8083",
        "quic://127.0.0.1:7402",
        "http://127.0.0.1:9000",
    ] {
        assert!(printed.contains(endpoint), "prints {endpoint}:\n{printed}");
    }
    assert!(printed.contains("curl -i -X POST http://127.0.0.1:8080/v1/check"));
    // The coordinator's status table, as `ctl status` prints it: both regions, and every rule
    // split across them.
    let cells = |first: &str| -> Vec<String> {
        printed
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|c| c.first().is_some_and(|f| f == first))
            .unwrap_or_else(|| panic!("no {first} row:\n{printed}"))
    };
    assert_eq!(
        cells("REGION"),
        ["REGION", "FLOOR", "REGIONALS", "EDGES", "LAST", "REPORT"]
    );
    // Both regionals are linked to the coordinator and report their two edges each.
    assert_eq!(cells("eu")[..4], ["eu", "10%", "1", "2"]);
    assert_eq!(cells("us")[..4], ["us", "10%", "1", "2"]);
    assert_eq!(cells("login")[..3], ["login", "5/1m", "no"]);
    // ctl works against it with the token up.sh wrote.
    let token = std::fs::read_to_string(dir.join("admin.token")).expect("up.sh wrote the token");
    let bin = workspace_binary("global-coordinator");
    let ctl = |args: &[&str]| {
        Command::new(&bin)
            .args(["ctl", "--addr", "127.0.0.1:9000"])
            .args(args)
            .env("COORDINATOR_TOKEN", token.trim())
            .output()
            .expect("the coordinator binary runs")
    };
    let out = ctl(&["rules", "show"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("id: login"));
    // up.sh said "up" only once every edge is connected to its regional.
    for port in [8080, 8081, 8082, 8083] {
        let ready = http::request(
            SocketAddr::from(([127, 0, 0, 1], port)),
            "GET",
            "/readyz",
            "",
            b"",
        );
        assert_eq!(ready.status, 200, "edge on {port}: {}", ready.body);
    }

    // The README's curl, six times: the login rule allows 5 per minute per IP, across both
    // regions. eu holds 3 of the 5 (its half, rounded by largest remainder); the 4th and 5th
    // come from us by escalation.
    let login = r#"{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}"#;
    let codes: Vec<u16> = (0..6).map(|_| check(8080, login)).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    // Every other edge, in either region, sees the key spent (the login rule is hard).
    for port in [8081, 8082, 8083] {
        assert_eq!(check(port, login), 429, "edge on {port}");
    }

    // Every process serves its metrics, and they moved with the traffic above.
    let scrape = |port: u16| {
        let r = http::request(
            SocketAddr::from(([127, 0, 0, 1], port)),
            "GET",
            "/metrics",
            "",
            b"",
        );
        assert_eq!(r.status, 200, "metrics on {port}: {}", r.body);
        metrics::parse(&r.body).unwrap_or_else(|e| panic!("metrics on {port}: {e}"))
    };
    let edge = scrape(8080);
    let login_checks = |result| {
        edge.sum(
            "edge_checks_total",
            &[("rule", "login"), ("result", result)],
        )
    };
    assert_eq!(
        (login_checks("allowed"), login_checks("denied")),
        (Some(5.0), Some(1.0))
    );
    assert_eq!(edge.get("edge_upstream_connected", &[]), 1.0);
    assert_eq!(
        edge.sum("edge_fallbacks_total", &[]),
        None,
        "the regional answered: no fallback was ever counted"
    );
    let regional = scrape(9401);
    assert_eq!(regional.get("regional_edges_connected", &[]), 2.0);
    assert!(regional.get("regional_exact_checks_total", &[]) >= 1.0);
    // Edges flush every 100 ms: each is up to date with its regional within a second, the
    // busy one and the idle one alike.
    for port in [8080, 8082] {
        assert!(
            scrape(port).get("edge_sync_lag_seconds", &[]) < 1.0,
            "edge on {port}"
        );
    }

    // A new rule set applied through ctl reaches every edge through its regional and changes
    // its decisions: `/api/export` had only the default 60 per minute; now 1 per minute per IP.
    let rules = std::fs::read_to_string(dir.join("config/rules.yaml")).expect("up.sh's rules");
    let export = r#"    - { id: export, path: "/api/export", method: GET, limit: 1, window: 1m, key: ip, strictness: hard }
  tiers:"#;
    let new_rules = rules
        .replace("version: 1", "version: 2")
        .replacen("  tiers:", export, 1);
    let file = dir.join("rules-v2.yaml");
    std::fs::write(&file, new_rules).expect("write the new rules");
    let before = |port: u16| {
        let body = format!(
            r#"{{"path": "/api/export", "method": "GET", "ip": "198.51.100.{port}"}}"#,
            port = port - 8000
        );
        (check(port, &body), check(port, &body))
    };
    for port in [8080, 8081, 8082, 8083] {
        assert_eq!(before(port), (200, 200), "edge on {port} before the change");
    }
    let out = ctl(&[
        "rules",
        "apply",
        file.to_str().expect("a UTF-8 temporary path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for port in [8080, 8081, 8082, 8083] {
        while scrape(port).get("edge_rule_set_version", &[]) < 2.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "edge on {port} never got rule set 2"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let body = format!(
            r#"{{"path": "/api/export", "method": "GET", "ip": "192.0.2.{port}"}}"#,
            port = port - 8000
        );
        assert_eq!(
            (check(port, &body), check(port, &body)),
            (200, 429),
            "edge on {port} enforces the new export rule"
        );
    }

    // Ctrl-C: up.sh stops every process it started and exits 0.
    up.signal("INT");
    let (status, printed) = up.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "up.sh exit status {status}:\n{printed}");
    for port in [8080, 8081, 8082, 8083, 9000, 9401] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens on {port} after Ctrl-C"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

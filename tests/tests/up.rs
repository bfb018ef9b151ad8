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

use system_tests::{http, metrics, process::Spawned};

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
    assert_eq!(cells("us")[..2], ["us", "10%"]);
    assert_eq!(cells("login")[..3], ["login", "5/1m", "no"]);
    // ctl works against it with the token up.sh wrote.
    let token = std::fs::read_to_string(dir.join("admin.token")).expect("up.sh wrote the token");
    let bin = std::env::var("CARGO_TARGET_DIR")
        .map_or_else(|_| root.join("target"), std::path::PathBuf::from)
        .join("debug/global-coordinator");
    let out = Command::new(bin)
        .args(["ctl", "--addr", "127.0.0.1:9000", "rules", "show"])
        .env("COORDINATOR_TOKEN", token.trim())
        .output()
        .expect("the coordinator binary runs");
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

    // The README's curl, six times: the login rule allows 5 per minute per IP.
    let login = r#"{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}"#;
    let codes: Vec<u16> = (0..6).map(|_| check(8080, login)).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    // The other edge of the same region shares the region's count (the login rule is hard).
    assert_eq!(check(8081, login), 429);

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

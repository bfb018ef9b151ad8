//! The load generator against a small topology of real processes: one regional aggregator on
//! its in-memory store (no coordinator) and two edge agents, all on ports the OS picks, so it
//! runs beside `up.rs` and its fixed ports. `loadgen` sends a mix of a hard fixed-window rule
//! with a small limit, exhausted in many windows, and a soft rule with room, and its `--json`
//! summary must show what DESIGN §4 promises: the hard limit never exceeded, yet reached, and
//! decisions made locally.
//!
//! It uses the binaries `tests/run.sh` builds before the tests (`cargo build --workspace
//! --bins`), found beside this test's executable; `loadgen` is this package's own.

use std::{
    fs,
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use system_tests::{
    http,
    process::{Spawned, workspace_binary},
};

/// `login`: 3 per second per IP, hard, in fixed windows, so hot keys spend it every second.
/// `search`: 1,000 a minute per user, soft: room enough to be decided locally under grants.
const RULES: &str = "\
version: 1
rate_limits:
  endpoints:
    - { id: login, path: /api/login, method: POST, limit: 3, window: 1s, key: ip, algorithm: fixed_window, strictness: hard, on_failure: closed }
    - { id: search, path: /api/search, method: GET, limit: 1000, window: 1m, key: user_id }
";

/// A fresh directory with certificates (the regional's `pki` subcommand), the rules and the
/// regional's config.
fn deployment() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rl-loadgen-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp is writable");
    let out = Command::new(workspace_binary("regional-aggregator"))
        .arg("pki")
        .arg("--dir")
        .arg(dir.join("pki"))
        .args([
            "--node",
            "regional-eu-1",
            "--node",
            "edge-eu-1",
            "--node",
            "edge-eu-2",
        ])
        .args(["--san", "localhost", "--san", "127.0.0.1"])
        .output()
        .expect("the regional binary runs");
    assert!(
        out.status.success(),
        "pki: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(dir.join("rules.yaml"), RULES).expect("writable");
    fs::write(
        dir.join("regional.yaml"),
        "node: regional-eu-1\nregion: eu\nlisten: 127.0.0.1:0\nrules: rules.yaml\n\
         tls: {ca: pki/ca.pem, cert: pki/regional-eu-1.pem, key: pki/regional-eu-1.key}\n",
    )
    .expect("writable");
    dir
}

/// Edge `n` of region eu, connected to the regional at `regional`; its HTTP address.
fn start_edge(dir: &Path, n: u32, regional: SocketAddr) -> (Spawned, SocketAddr) {
    let config = dir.join(format!("edge-eu-{n}.yaml"));
    fs::write(
        &config,
        format!(
            "node: edge-eu-{n}\nregion: eu\nlisten: 127.0.0.1:0\nrules: rules.yaml\n\
             regional: {{addresses: [{regional}], name: regional-eu-1}}\n\
             tls: {{ca: pki/ca.pem, cert: pki/edge-eu-{n}.pem, key: pki/edge-eu-{n}.key}}\n"
        ),
    )
    .expect("writable");
    let mut edge = Spawned::start(
        Command::new(workspace_binary("edge-agent"))
            .arg("--config")
            .arg(config),
    );
    let addr = edge.listen_addr();
    (edge, addr)
}

/// Until the edge at `addr` answers `/readyz` with 200: connected to its regional.
fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http::request(addr, "GET", "/readyz", "", b"");
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "edge {addr} never ready: {}",
            r.body
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `loadgen` with `args`: its exit status, stdout and stderr. Killed after 60 s.
fn loadgen(args: &[String]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("loadgen starts");
    let read = |mut s: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("loadgen can be waited for") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "loadgen still running after 60 s: {}",
                err.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    (
        status.success(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

#[test]
fn loadgen_finds_no_hard_overshoot_and_local_decisions_on_a_small_topology() {
    let dir = deployment();
    let mut regional = Spawned::start(
        Command::new(workspace_binary("regional-aggregator"))
            .arg("--config")
            .arg(dir.join("regional.yaml")),
    );
    let quic = regional.listen_addr();
    let (_edge1, edge1) = start_edge(&dir, 1, quic);
    let (_edge2, edge2) = start_edge(&dir, 2, quic);
    wait_ready(edge1);
    wait_ready(edge2);

    let args: Vec<String> = [
        "--edge",
        &format!("eu=127.0.0.1:{}", edge1.port()),
        "--edge",
        &format!("eu=127.0.0.1:{}", edge2.port()),
        "--rules",
        dir.join("rules.yaml").to_str().expect("UTF-8 temp path"),
        "--mix",
        "login=1,search=1",
        "--rate",
        "500",
        "--connections",
        "4",
        "--duration",
        "3s",
        "--keys",
        "50",
        "--zipf",
        "1.1",
        "--seed",
        "6",
        "--json",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let (ok, out, err) = loadgen(&args);
    assert!(ok, "loadgen failed:\n{err}\n{out}");
    let summary: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON:\n{out}\n{err}"));
    let show = || format!("{summary:#}\nstderr:\n{err}");
    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));

    assert!(num(&summary["requests"]) > 0.0, "{}", show());
    assert_eq!(num(&summary["errors"]), 0.0, "{}", show());
    let login = summary["limits"]
        .as_array()
        .and_then(|limits| limits.iter().find(|l| l["rule"] == "login"))
        .unwrap_or_else(|| panic!("no login limit: {}", show()));
    assert_eq!(login["strictness"], "hard");
    assert_eq!(login["algorithm"], "fixed_window");
    assert_eq!(
        num(&login["overshoot"]),
        0.0,
        "hard limit exceeded: {}",
        show()
    );
    assert!(
        num(&login["denied"]) > 0.0,
        "login never denied: {}",
        show()
    );
    assert!(
        num(&login["exhausted_windows"]) > 0.0,
        "login never reached its limit: {}",
        show()
    );
    let local = num(&summary["local_ratio"]);
    assert!(local > 0.0, "no local decisions: {}", show());
    // Every request the edges could not decide locally says why, once.
    let decisions = &summary["decisions"];
    let reasons = &decisions["reasons"];
    let why: f64 = ["near_limit", "no_grant", "grant_spent", "exact_only"]
        .iter()
        .map(|r| num(&reasons[r]))
        .sum();
    assert_eq!(
        why,
        num(&decisions["exact"]) + num(&decisions["fallback"]),
        "{}",
        show()
    );
    // login (hard, 5 a minute) is reached: its last admissions are near the limit.
    assert!(num(&reasons["near_limit"]) > 0.0, "{}", show());
    // The ratio for keys not near their limit leaves those decisions and cached denials out.
    let not_near =
        num(&decisions["exact"]) + num(&decisions["fallback"]) - num(&reasons["near_limit"]);
    let local_decisions = num(&decisions["local"]);
    assert_eq!(
        num(&summary["local_ratio_not_near_limit"]),
        local_decisions / (local_decisions + not_near),
        "{}",
        show()
    );
    // The edges answered every request: both are in the ratio.
    for edge in summary["edges"].as_array().expect("edges") {
        assert!(num(&edge["requests"]) > 0.0, "{}", show());
        assert!(edge["local_ratio"].is_number(), "{}", show());
    }
    let _ = fs::remove_dir_all(dir);
}

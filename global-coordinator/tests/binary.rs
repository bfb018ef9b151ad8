//! The `global-coordinator` binary as operators run it: `--help`, `--validate`, the admin API
//! over real HTTP (token, located refusals, changes), its durable state across a SIGKILL, and
//! `ctl` against the running process.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use system_tests::{
    http::{Reply, request},
    metrics,
    process::Spawned,
};

const BIN: &str = env!("CARGO_BIN_EXE_global-coordinator");
const TOKEN: &str = "s3cret-admin-token-0123456789";

const RULES: &str = "\
version: 4
rate_limits:
  endpoints:
    - { id: login, path: /api/login, method: POST, limit: 100, window: 1m, key: ip, strictness: hard }
    - { id: search, path: /api/search, limit: 1000, window: 1h, key: user_id }
";

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rl-coord-test-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp is writable");
    dir
}

/// A config (admin on a port the OS picks), a token file and a rules file in a fresh dir.
fn deployment(tag: &str) -> PathBuf {
    let dir = scratch(tag);
    fs::write(dir.join("rules.yaml"), RULES).expect("writable");
    fs::write(dir.join("admin.token"), format!("{TOKEN}\n")).expect("writable");
    fs::write(
        dir.join("coordinator.yaml"),
        "node: coordinator-1\nadmin: 127.0.0.1:0\ntoken_file: admin.token\n\
         state: state/coordinator.json\nrules: rules.yaml\n\
         regions:\n  - { name: eu, floor: 0.1 }\n  - { name: us, floor: 0.1 }\n",
    )
    .expect("writable");
    dir
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("COORDINATOR_TOKEN")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn start(dir: &Path) -> (Spawned, SocketAddr) {
    let mut c = Spawned::start(
        Command::new(BIN)
            .arg("--config")
            .arg(dir.join("coordinator.yaml"))
            .env_remove("COORDINATOR_TOKEN"),
    );
    let addr = c.logged_addr("admin");
    (c, addr)
}

fn api(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    request(
        addr,
        method,
        path,
        &format!("authorization: Bearer {TOKEN}\r\n"),
        body.as_bytes(),
    )
}

fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

/// `ctl` against `addr` with the right token.
fn ctl(addr: SocketAddr, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["ctl", "--addr", &addr.to_string()])
        .args(args)
        .env("COORDINATOR_TOKEN", TOKEN)
        .output()
        .expect("the binary runs")
}

/// The cells of the table row whose first cell is `first`.
fn row(table: &str, first: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|c| c == first))
        .unwrap_or_else(|| panic!("no row {first}:\n{table}"))
}

#[test]
fn help_and_validate() {
    let help = text(&run(&["--help"]).stdout);
    for flag in ["--config", "--validate", "--log", "--log-format", "ctl"] {
        assert!(help.contains(flag), "--help mentions {flag}:\n{help}");
    }
    let help = text(&run(&["ctl", "--help"]).stdout);
    for word in [
        "status",
        "rules",
        "pin",
        "unpin",
        "rebalance",
        "--addr",
        "--token",
    ] {
        assert!(help.contains(word), "ctl --help mentions {word}:\n{help}");
    }
    let dir = deployment("validate");
    let config = dir.join("coordinator.yaml");
    let arg = config.to_str().expect("UTF-8");
    let out = run(&["--config", arg, "--validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("regions eu,us"), "{said}");
    assert!(!said.contains(TOKEN), "the token is never printed");

    fs::write(dir.join("rules.yaml"), RULES.replace("1m", "1 minute")).expect("writable");
    let out = run(&["--config", arg, "--validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("rate_limits.endpoints[0].window"),
        "{}",
        text(&out.stderr)
    );
    fs::write(dir.join("admin.token"), "short").expect("writable");
    let out = run(&["--config", arg, "--validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("shorter than 16"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_admin_api_needs_the_token_and_refuses_a_bad_rule_set_whole() {
    let dir = deployment("api");
    let (mut c, addr) = start(&dir);

    let r = request(addr, "GET", "/api/v1/rate-limits", "", b"");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = request(
        addr,
        "GET",
        "/api/v1/rate-limits",
        "authorization: Bearer not-the-token\r\n",
        b"",
    );
    assert_eq!(r.status, 401);

    let r = api(addr, "GET", "/api/v1/rate-limits", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json(&r);
    assert_eq!(v["version"], 4, "the rules file's version to start with");
    assert_eq!(v["rules"], serde_json::json!(["login", "search"]));

    // A rule set with one bad rule is refused whole, located; the running one stays.
    let bad = RULES.replace("limit: 1000", "limit: -1");
    let r = api(addr, "POST", "/api/v1/rate-limits", &bad);
    assert_eq!(r.status, 400, "{}", r.body);
    let message = json(&r)["message"].as_str().unwrap_or("").to_owned();
    assert!(
        message.contains("rate_limits.endpoints[1].limit"),
        "{message}"
    );
    assert_eq!(
        json(&api(addr, "GET", "/api/v1/rate-limits", ""))["version"],
        4
    );

    // A dry run diffs and changes nothing; the real apply is version 5.
    let next = RULES.replace("limit: 1000", "limit: 2000").replace(
        "key: user_id }",
        "key: user_id }\n    - { id: upload, path: /api/upload, limit: 10, window: 1m, key: user_id }",
    );
    let r = api(addr, "POST", "/api/v1/rate-limits?dry_run=true", &next);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json(&r);
    assert_eq!(
        (
            v["applied"].clone(),
            v["added"].clone(),
            v["changed"].clone()
        ),
        (
            serde_json::json!(false),
            serde_json::json!(["upload"]),
            serde_json::json!(["search"])
        )
    );
    assert_eq!(
        json(&api(addr, "GET", "/api/v1/rate-limits", ""))["version"],
        4
    );
    let r = api(addr, "POST", "/api/v1/rate-limits", &next);
    assert_eq!(json(&r)["version"], 5, "{}", r.body);

    // Partitions: floors, then an equal split; every limit's partitions add up to it.
    let v = json(&api(addr, "GET", "/api/v1/partitions", ""));
    let login = &v["rules"][0];
    assert_eq!(login["rule"], "login");
    assert_eq!(
        login["limits"][0]["partitions"],
        serde_json::json!({"eu": 50, "us": 50})
    );

    // Deleting a rule is a new version without it; an unknown one is 404.
    let r = api(addr, "DELETE", "/api/v1/rate-limits/upload", "");
    assert_eq!(json(&r)["version"], 6, "{}", r.body);
    assert_eq!(
        json(&api(addr, "GET", "/api/v1/rate-limits", ""))["rules"],
        serde_json::json!(["login", "search"])
    );
    assert_eq!(
        api(addr, "DELETE", "/api/v1/rate-limits/nope", "").status,
        404
    );
    assert_eq!(api(addr, "GET", "/api/v1/nope", "").status, 404);
    // No regional is connected: every region is listed, saying so.
    let v = json(&api(addr, "GET", "/api/v1/debug/alice", ""));
    assert_eq!(v["key"], "alice");
    for region in ["eu", "us"] {
        assert_eq!(
            v["regions"][region]["error"], "no regional of this region is connected",
            "{v}"
        );
    }

    // /metrics needs no token and parses as Prometheus text.
    let r = request(addr, "GET", "/metrics", "", b"");
    let m = metrics::parse(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
    assert_eq!(m.get("coordinator_rule_set_version", &[]), 6.0);
    assert_eq!(m.get("coordinator_admin_unauthorized_total", &[]), 2.0);
    assert_eq!(
        m.get("coordinator_admin_refused_total", &[]),
        2.0,
        "bad set, unknown rule"
    );
    let v = json(&api(addr, "GET", "/api/v1/metrics", ""));
    assert_eq!(v["rules"], 2);

    let logged = c.printed();
    assert!(
        !logged.contains(TOKEN),
        "the token is never logged:\n{logged}"
    );
}

#[test]
fn rules_pins_and_partitions_survive_a_kill() {
    let dir = deployment("restart");
    let (c, addr) = start(&dir);
    let next = RULES.replace("limit: 1000", "limit: 3000");
    assert_eq!(
        json(&api(addr, "POST", "/api/v1/rate-limits", &next))["version"],
        5
    );
    let r = api(
        addr,
        "POST",
        "/api/v1/partitions/login/pin",
        r#"{"eu": 0.7, "us": 0.3}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let before = json(&api(addr, "GET", "/api/v1/partitions", ""));
    assert_eq!(
        before["rules"][0]["limits"][0]["partitions"],
        serde_json::json!({"eu": 70, "us": 30})
    );
    assert_eq!(before["rules"][0]["pinned"], true);
    // Bad pins are refused, located.
    let r = api(
        addr,
        "POST",
        "/api/v1/partitions/login/pin",
        r#"{"mars": 1}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.body.contains("no region \\\"mars\\\""), "{}", r.body);
    let r = api(
        addr,
        "POST",
        "/api/v1/partitions/login/pin",
        r#"{"eu": 0.7, "us": 0.5}"#,
    );
    assert_eq!(r.status, 400);

    // SIGKILL: no chance to save anything on the way out.
    c.kill();
    // The rules file changing meanwhile does not matter: the state file wins.
    fs::write(dir.join("rules.yaml"), RULES.replace("login", "signin")).expect("writable");
    let (_c, addr) = start(&dir);
    let after = json(&api(addr, "GET", "/api/v1/partitions", ""));
    assert_eq!(after, before, "the same rules, pins and partitions");
    assert_eq!(
        json(&api(addr, "GET", "/api/v1/rate-limits", ""))["version"],
        5
    );

    // Unpinned, the rule falls back to floors and an equal split.
    let r = api(addr, "DELETE", "/api/v1/partitions/login/pin", "");
    assert_eq!(json(&r)["pinned"], false, "{}", r.body);
    let v = json(&api(addr, "GET", "/api/v1/partitions", ""));
    assert_eq!(
        v["rules"][0]["limits"][0]["partitions"],
        serde_json::json!({"eu": 50, "us": 50})
    );
}

#[test]
fn ctl_drives_the_coordinator_and_says_clearly_what_went_wrong() {
    let dir = deployment("ctl");
    let (_c, addr) = start(&dir);

    let out = ctl(addr, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("rule set version 4"), "{table}");
    assert_eq!(
        row(&table, "eu"),
        ["eu", "10%", "0", "0", "never"],
        "{table}"
    );
    assert_eq!(
        row(&table, "login"),
        [
            "login", "100/1m", "no", "50", "(50%)", "0/s", "50", "(50%)", "0/s"
        ],
        "{table}"
    );

    let file = dir.join("next.yaml");
    fs::write(&file, RULES.replace("limit: 100,", "limit: 200,")).expect("writable");
    let file_arg = file.to_str().expect("UTF-8");
    let out = ctl(addr, &["rules", "apply", file_arg, "--dry-run"]);
    let said = text(&out.stdout);
    assert!(
        said.contains("~ login") && said.contains("dry run"),
        "{said}"
    );
    let out = ctl(addr, &["rules", "apply", file_arg]);
    assert!(text(&out.stdout).contains("applied: rule set version 5"));
    assert!(text(&ctl(addr, &["rules", "show"]).stdout).contains("limit: 200"));

    let out = ctl(addr, &["pin", "login", "eu=0.25", "us=0.75"]);
    assert!(
        text(&out.stdout).contains("pinned login: eu 25%, us 75%"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        row(&text(&ctl(addr, &["status"]).stdout), "login"),
        [
            "login", "200/1m", "yes", "50", "(25%)", "0/s", "150", "(75%)", "0/s"
        ]
    );
    let out = ctl(addr, &["unpin", "login"]);
    assert!(text(&out.stdout).contains("unpinned login: eu 50%, us 50%"));
    assert!(ctl(addr, &["rebalance"]).status.success());

    // A bad file is refused with its location, locally and by the coordinator.
    fs::write(&file, RULES.replace("window: 1h", "window: often")).expect("writable");
    let out = ctl(addr, &["rules", "validate", file_arg]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("rate_limits.endpoints[1].window"));
    let out = ctl(addr, &["rules", "apply", file_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("400: rate-limits: rate_limits.endpoints[1].window"),
        "{}",
        text(&out.stderr)
    );

    // Wrong token, no coordinator: each says so.
    let out = Command::new(BIN)
        .args(["ctl", "--addr", &addr.to_string(), "status"])
        .env("COORDINATOR_TOKEN", "wrong-token-wrong-token")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("refused the token"),
        "{}",
        text(&out.stderr)
    );
    let out = ctl("127.0.0.1:9".parse().expect("an address"), &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the coordinator at 127.0.0.1:9"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["ctl", "status"])
        .env_remove("COORDINATOR_TOKEN")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("COORDINATOR_TOKEN"));
}

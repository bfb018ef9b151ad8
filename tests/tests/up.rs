//! DESIGN §10, the README's first command: `deploy/up.sh` starts the local topology (two
//! regions, a regional and two edges each, Redis when installed), the README's `curl` works
//! against it, and Ctrl-C stops every process it started.
//!
//! It uses the debug build `tests/run.sh` makes before the tests (`UP_NO_BUILD`), and the
//! topology's fixed ports (127.0.0.1:8080-8083, 7401-7402, 6391-6392), as the README's examples
//! do.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// One `POST /v1/check` to an edge: the status code.
fn check(port: u16, body: &str) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the edge listens");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("settable");
    let request = format!(
        "POST /v1/check HTTP/1.1\r\nhost: edge\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).expect("writable");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("an answer");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line")
}

#[test]
fn up_starts_the_topology_answers_the_readme_curl_and_stops_on_ctrl_c() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("rl-up-{}", std::process::id()));
    let mut up = Command::new("bash")
        .arg(root.join("deploy/up.sh"))
        .env("UP_PROFILE", "debug")
        .env("UP_NO_BUILD", "1")
        .env("UP_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash runs deploy/up.sh");
    let stdout = up.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    while !printed
        .iter()
        .any(|l: &String| l.contains("Ctrl-C stops everything"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = up.kill();
                let mut err = String::new();
                let _ = up.stderr.take().map(|mut e| e.read_to_string(&mut err));
                panic!("up.sh did not come up:\n{}\n{err}", printed.join("\n"));
            }
        }
    }
    let printed = printed.join("\n");
    for endpoint in [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:8083",
        "quic://127.0.0.1:7402",
    ] {
        assert!(printed.contains(endpoint), "prints {endpoint}:\n{printed}");
    }
    assert!(printed.contains("curl -i -X POST http://127.0.0.1:8080/v1/check"));

    // The README's curl, six times: the login rule allows 5 per minute per IP.
    let login = r#"{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}"#;
    let codes: Vec<u16> = (0..6).map(|_| check(8080, login)).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    // The other edge of the same region shares the region's count (the login rule is hard).
    assert_eq!(check(8081, login), 429);

    // Ctrl-C: up.sh stops every process it started and exits 0.
    // bash's own `kill`: a minimal Debian may not have /bin/kill.
    let sent = Command::new("bash")
        .args(["-c", &format!("kill -INT {}", up.id())])
        .status();
    assert!(sent.is_ok_and(|s| s.success()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = up.try_wait().expect("waitable") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "up.sh still running 20 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "up.sh exit status {status}");
    for port in [8080, 8081, 8082, 8083] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens on {port} after Ctrl-C"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

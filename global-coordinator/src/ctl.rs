//! `global-coordinator ctl`: the operators' CLI. It speaks the admin API (one HTTP/1.1
//! request per command, blocking: a CLI has nothing else to do meanwhile) and prints tables
//! for people and the API's own errors, located, when a change is refused.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    time::Duration,
};

use serde_json::Value;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where the coordinator is and how to prove we may use it.
pub struct Client {
    /// `host:port` of the admin API.
    pub addr: String,
    /// The bearer token.
    pub token: String,
}

/// Why a command failed: printed as is, so each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing answered at the address.
    #[error(
        "cannot reach the coordinator at {addr}: {source} (is it running? --addr / COORDINATOR_ADDR)"
    )]
    Unreachable {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token was refused.
    #[error("the coordinator at {0} refused the token (--token / COORDINATOR_TOKEN)")]
    Unauthorized(String),
    /// The API refused the request; its message says why.
    #[error("{0}")]
    Refused(String),
    /// The answer was not what the API sends.
    #[error("unexpected answer from the coordinator: {0}")]
    Protocol(String),
    /// A local file or argument was wrong.
    #[error("{0}")]
    Usage(String),
}

impl Client {
    /// Sends `method path` with `body`, and returns the JSON answer of a 2xx.
    ///
    /// # Errors
    ///
    /// Unreachable, unauthorized, refused (with the API's message), or a garbled answer.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<Value, CtlError> {
        let unreachable = |source| CtlError::Unreachable {
            addr: self.addr.clone(),
            source,
        };
        let addr: SocketAddr = self
            .addr
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| unreachable(std::io::Error::other("no address")))?;
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(unreachable)?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            self.token,
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(unreachable)?;
        stream.write_all(body).map_err(unreachable)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(unreachable)?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| CtlError::Protocol("no end of headers".into()))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| CtlError::Protocol(format!("bad status line {head:?}")))?;
        if status == 401 {
            return Err(CtlError::Unauthorized(self.addr.clone()));
        }
        let json: Value = serde_json::from_str(body)
            .map_err(|e| CtlError::Protocol(format!("{status}: {e}: {body:?}")))?;
        if !(200..300).contains(&status) {
            let message = json["message"].as_str().unwrap_or(body);
            return Err(CtlError::Refused(format!("{status}: {message}")));
        }
        Ok(json)
    }
}

/// `ctl status`: regions (regionals and edges connected, last report), then per rule its
/// limits, each region's partition, share and smoothed usage (admitted and denied per second).
///
/// # Errors
///
/// As [`Client::call`].
pub fn status(client: &Client) -> Result<String, CtlError> {
    let metrics = client.call("GET", "/api/v1/metrics", b"")?;
    let regions = client.call("GET", "/api/v1/regions", b"")?;
    let partitions = client.call("GET", "/api/v1/partitions", b"")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "coordinator at {}: rule set version {}, {} rules, {} regions\n",
        client.addr, metrics["rule_set_version"], metrics["rules"], metrics["regions"]
    );
    let names: Vec<String> = regions["regions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut table = vec![vec![
        "REGION".to_owned(),
        "FLOOR".to_owned(),
        "REGIONALS".to_owned(),
        "EDGES".to_owned(),
        "LAST REPORT".to_owned(),
    ]];
    for r in regions["regions"].as_array().into_iter().flatten() {
        table.push(vec![
            r["name"].as_str().unwrap_or("?").to_owned(),
            percent(r["floor"].as_f64().unwrap_or(0.0)),
            r["regionals"].as_u64().unwrap_or(0).to_string(),
            r["edges"].as_u64().unwrap_or(0).to_string(),
            r["last_report_age_seconds"]
                .as_f64()
                .map_or("never".into(), |s| format!("{s:.1}s ago")),
        ]);
    }
    out.push_str(&render(&table));
    out.push('\n');
    let mut header = vec!["RULE".to_owned(), "LIMIT".to_owned(), "PINNED".to_owned()];
    header.extend(names.iter().cloned());
    let mut table = vec![header];
    for rule in partitions["rules"].as_array().into_iter().flatten() {
        for limit in rule["limits"].as_array().into_iter().flatten() {
            let mut row = vec![
                rule["rule"].as_str().unwrap_or("?").to_owned(),
                format!(
                    "{}/{}",
                    limit["limit"],
                    window(limit["window_seconds"].as_f64().unwrap_or(0.0))
                ),
                if rule["pinned"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
            ];
            for name in &names {
                let p = &limit["partitions"][name];
                let share = rule["shares"][name].as_f64().unwrap_or(0.0);
                let demand = rule["demand_per_second"][name].as_u64().unwrap_or(0);
                row.push(format!("{p} ({}) {demand}/s", percent(share)));
            }
            table.push(row);
        }
    }
    out.push_str(&render(&table));
    Ok(out)
}

/// `ctl rules show`: the rule set in force, as YAML, after its version.
///
/// # Errors
///
/// As [`Client::call`].
pub fn rules_show(client: &Client) -> Result<String, CtlError> {
    let v = client.call("GET", "/api/v1/rate-limits", b"")?;
    Ok(format!(
        "# version {}\n{}",
        v["version"],
        v["yaml"].as_str().unwrap_or("")
    ))
}

/// `ctl rules validate FILE`: checks a rules file here, with the same code every tier runs.
///
/// # Errors
///
/// The located problem.
pub fn rules_validate(file: &std::path::Path) -> Result<String, CtlError> {
    let rules = shared::process::load_rules(file).map_err(|e| CtlError::Usage(e.to_string()))?;
    Ok(format!(
        "{}: ok: {} rules (version {})",
        file.display(),
        rules.rules().len(),
        rules.version()
    ))
}

/// `ctl rules apply FILE [--dry-run]`: sends the file; prints the diff and the new version.
///
/// # Errors
///
/// As [`Client::call`]; a refused rule set comes back with its located error.
pub fn rules_apply(
    client: &Client,
    file: &std::path::Path,
    dry_run: bool,
) -> Result<String, CtlError> {
    let yaml = std::fs::read(file)
        .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let path = if dry_run {
        "/api/v1/rate-limits?dry_run=true"
    } else {
        "/api/v1/rate-limits"
    };
    let v = client.call("POST", path, &yaml)?;
    let mut out = String::new();
    for (sign, key) in [("+", "added"), ("-", "removed"), ("~", "changed")] {
        for id in v[key].as_array().into_iter().flatten() {
            let _ = writeln!(out, "{sign} {}", id.as_str().unwrap_or("?"));
        }
    }
    if out.is_empty() {
        out.push_str("no rule changes\n");
    }
    if dry_run {
        let _ = write!(
            out,
            "dry run: nothing applied (version stays {})",
            v["version"]
        );
    } else {
        let _ = write!(out, "applied: rule set version {}", v["version"]);
    }
    Ok(out)
}

/// `ctl pin RULE REGION=FRACTION...`.
///
/// # Errors
///
/// A malformed pair, or as [`Client::call`].
pub fn pin(client: &Client, rule: &str, pairs: &[String]) -> Result<String, CtlError> {
    let mut fractions = BTreeMap::new();
    for pair in pairs {
        let (region, fraction) = pair
            .split_once('=')
            .and_then(|(r, f)| Some((r, f.parse::<f64>().ok()?)))
            .ok_or_else(|| CtlError::Usage(format!("{pair:?} is not REGION=FRACTION (eu=0.7)")))?;
        fractions.insert(region.to_owned(), fraction);
    }
    let body = serde_json::to_vec(&fractions).map_err(|e| CtlError::Usage(e.to_string()))?;
    let v = client.call("POST", &format!("/api/v1/partitions/{rule}/pin"), &body)?;
    Ok(format!("pinned {rule}: {}", shares(&v["shares"])))
}

/// `ctl unpin RULE`.
///
/// # Errors
///
/// As [`Client::call`].
pub fn unpin(client: &Client, rule: &str) -> Result<String, CtlError> {
    let v = client.call("DELETE", &format!("/api/v1/partitions/{rule}/pin"), b"")?;
    Ok(format!("unpinned {rule}: {}", shares(&v["shares"])))
}

/// `ctl rebalance`.
///
/// # Errors
///
/// As [`Client::call`].
pub fn rebalance(client: &Client) -> Result<String, CtlError> {
    let v = client.call("POST", "/api/v1/rebalance", b"")?;
    let n = v["rules"].as_array().map_or(0, Vec::len);
    Ok(format!("rebalanced {n} rules"))
}

fn shares(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(r, f)| format!("{r} {}", percent(f.as_f64().unwrap_or(0.0))))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn percent(f: f64) -> String {
    format!("{:.0}%", f * 100.0)
}

fn window(seconds: f64) -> String {
    match seconds {
        s if s >= 86_400.0 && s % 86_400.0 == 0.0 => format!("{}d", s / 86_400.0),
        s if s >= 3_600.0 && s % 3_600.0 == 0.0 => format!("{}h", s / 3_600.0),
        s if s >= 60.0 && s % 60.0 == 0.0 => format!("{}m", s / 60.0),
        s => format!("{s}s"),
    }
}

/// Left-aligned columns, two spaces apart.
fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

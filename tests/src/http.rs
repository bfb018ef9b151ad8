//! One HTTP/1.1 exchange over a fresh TCP connection, read to its end: enough to check what
//! our servers answer, status, headers and body, with no client crate between the test and
//! the bytes.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// A response.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Reply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Sends `method path` with `headers` (each line ending in `\r\n`) and `body` to `addr`, and
/// reads the whole answer (the request asks the server to close).
///
/// # Panics
///
/// When nothing listens at `addr` or the answer is not HTTP.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout can be set");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n{headers}\
         content-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("the request is sent");
    // A server may answer 413 before reading a large body, and close: a reset here is fine.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let RawReply {
        status,
        headers,
        body,
    } = parse(&raw);
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A response whose body is kept as bytes, for bodies that are not text.
#[derive(Debug)]
pub struct RawReply {
    /// The status code.
    pub status: u16,
    /// The headers, names in lower case, in order.
    pub headers: Vec<(String, String)>,
    /// The body, as sent.
    pub body: Vec<u8>,
}

impl RawReply {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Parses a whole HTTP/1.1 response: status line, headers, and everything after them as the
/// body.
///
/// # Panics
///
/// When `bytes` has no complete head or no status line.
pub fn parse(bytes: &[u8]) -> RawReply {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "an incomplete response: {:?}",
                String::from_utf8_lossy(bytes)
            )
        });
    let head = String::from_utf8_lossy(&bytes[..end]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawReply {
        status,
        headers,
        body: bytes[end + 4..].to_vec(),
    }
}

/// `POST /v1/check` with a JSON body to the edge at `addr`.
pub fn check(addr: SocketAddr, json: &str) -> Reply {
    request(
        addr,
        "POST",
        "/v1/check",
        "content-type: application/json\r\n",
        json.as_bytes(),
    )
}

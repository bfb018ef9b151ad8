//! A minimal HTTP/1.1 keep-alive client over a blocking [`TcpStream`]: one request at a time,
//! `Content-Length` bodies, nothing else.
//!
//! Written by hand because it is all a check needs and it stays out of the measurement: a
//! request is one `write`, a response is read into a buffer the connection reuses, and nothing
//! is allocated per request once the buffers have grown. The edge answers every request with
//! a `Content-Length` (hyper does for whole bodies); a response without one is read to the end
//! of the connection when the server says `connection: close`, and refused otherwise, as is
//! `Transfer-Encoding`.
//!
//! Nothing the server sends can panic this code: every surprise is a [`ClientError`], the
//! connection is dropped, and the next request dials again.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

/// Why an exchange failed. The generator counts these by [`ClientError::kind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// Nothing, or not all, arrived within the timeout.
    #[error("timed out")]
    Timeout,
    /// Sending or receiving failed.
    #[error("i/o: {0}")]
    Io(#[source] io::Error),
    /// The server closed the connection before the response was complete.
    #[error("the connection closed mid-response")]
    Closed,
    /// What arrived is not an HTTP/1.1 response this client reads.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

impl ClientError {
    /// A short, stable name for counting: `connect`, `timeout`, `io`, `closed`, `malformed`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect(_) => "connect",
            ClientError::Timeout => "timeout",
            ClientError::Io(_) => "io",
            ClientError::Closed => "closed",
            ClientError::Malformed(_) => "malformed",
        }
    }

    fn from_io(e: io::Error) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
            io::ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}

/// A response: its status and body, borrowed from the connection's buffer.
#[derive(Debug)]
pub struct Response<'a> {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: &'a [u8],
}

/// One keep-alive connection to one server, dialed on first use and again after any error.
#[derive(Debug)]
pub struct Connection {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    /// When the connection last finished an exchange: one idle longer than [`MAX_IDLE`] is
    /// dialed afresh rather than risk the server having just closed it (hyper closes a
    /// connection that sends no request headers for 10 s), which would turn into a counted
    /// error that is nobody's fault.
    last_used: Instant,
    /// The request being sent, then reused.
    out: Vec<u8>,
    /// The response being read, then reused.
    buf: Vec<u8>,
}

/// See [`Connection::last_used`].
const MAX_IDLE: Duration = Duration::from_secs(5);
/// The largest response head read.
const MAX_HEAD: usize = 16 * 1024;
/// The largest response body read (a `/metrics` page fits many times over).
const MAX_BODY: usize = 64 * 1024 * 1024;

impl Connection {
    /// A connection to `addr` where connecting, and each read and write, may take at most
    /// `timeout`. Nothing is dialed yet.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Connection {
        Connection {
            addr,
            timeout,
            stream: None,
            last_used: Instant::now(),
            out: Vec::with_capacity(512),
            buf: Vec::with_capacity(1024),
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `POST path` with a JSON `body`, and its response.
    ///
    /// # Errors
    ///
    /// See [`ClientError`]; the connection is dropped and redialed on the next call.
    pub fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Response<'_>, ClientError> {
        self.out.clear();
        // Writing into a Vec cannot fail.
        let _ = write!(
            self.out,
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        self.out.extend_from_slice(body);
        self.exchange()
    }

    /// `GET path`, and its response.
    ///
    /// # Errors
    ///
    /// See [`ClientError`].
    pub fn get(&mut self, path: &str) -> Result<Response<'_>, ClientError> {
        self.out.clear();
        let _ = write!(
            self.out,
            "GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n",
            self.addr
        );
        self.exchange()
    }

    /// Sends `self.out` and reads one response into `self.buf`.
    fn exchange(&mut self) -> Result<Response<'_>, ClientError> {
        match self.try_exchange() {
            Ok((status, body, keep)) => {
                if !keep {
                    self.stream = None;
                }
                self.last_used = Instant::now();
                Ok(Response {
                    status,
                    body: &self.buf[body.0..body.1],
                })
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// The status, the body's range in `self.buf`, and whether the connection may be reused.
    fn try_exchange(&mut self) -> Result<(u16, (usize, usize), bool), ClientError> {
        if self.last_used.elapsed() > MAX_IDLE {
            self.stream = None;
        }
        let stream = match &mut self.stream {
            Some(stream) => stream,
            slot @ None => slot.insert(dial(self.addr, self.timeout)?),
        };
        stream.write_all(&self.out).map_err(ClientError::from_io)?;
        self.buf.clear();
        let head = read_head(stream, &mut self.buf)?;
        let body_start = head.len;
        let body_end = match head.content_length {
            Some(n) => {
                let end = body_start
                    .checked_add(n)
                    .filter(|&end| end - body_start <= MAX_BODY)
                    .ok_or(ClientError::Malformed("body too large"))?;
                fill(stream, &mut self.buf, end)?;
                if self.buf.len() > end {
                    // Bytes beyond the response we asked for: nothing we can trust follows.
                    return Err(ClientError::Malformed("data after the response"));
                }
                end
            }
            None if head.close => {
                read_to_end(stream, &mut self.buf)?;
                self.buf.len()
            }
            None => return Err(ClientError::Malformed("no content-length")),
        };
        Ok((head.status, (body_start, body_end), !head.close))
    }
}

/// What the response head says.
struct Head {
    status: u16,
    /// Bytes of `buf` the head takes, `\r\n\r\n` included.
    len: usize,
    content_length: Option<usize>,
    close: bool,
}

fn dial(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            ClientError::Timeout
        } else {
            ClientError::Connect(e)
        }
    })?;
    stream.set_nodelay(true).map_err(ClientError::Connect)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ClientError::Connect)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ClientError::Connect)?;
    Ok(stream)
}

/// Reads until `buf` holds a whole response head, and parses it.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head, ClientError> {
    let mut searched = 0;
    let len = loop {
        if let Some(at) = find(&buf[searched..], b"\r\n\r\n") {
            break searched + at + 4;
        }
        searched = buf.len().saturating_sub(3);
        if buf.len() > MAX_HEAD {
            return Err(ClientError::Malformed("response head too large"));
        }
        if read_some(stream, buf)? == 0 {
            return Err(ClientError::Closed);
        }
    };
    let text =
        std::str::from_utf8(&buf[..len]).map_err(|_| ClientError::Malformed("head not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(ClientError::Malformed("no HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or(ClientError::Malformed("no status code"))?;
    let mut head = Head {
        status,
        len,
        content_length: None,
        close: status_line.starts_with("HTTP/1.0"),
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(ClientError::Malformed("a header without ':'"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| ClientError::Malformed("bad content-length"))?;
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ClientError::Malformed("transfer-encoding is not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            head.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(head)
}

/// Reads until `buf` holds at least `len` bytes.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> Result<(), ClientError> {
    while buf.len() < len {
        if read_some(stream, buf)? == 0 {
            return Err(ClientError::Closed);
        }
    }
    Ok(())
}

fn read_to_end(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), ClientError> {
    while read_some(stream, buf)? > 0 {
        if buf.len() > MAX_HEAD + MAX_BODY {
            return Err(ClientError::Malformed("body too large"));
        }
    }
    Ok(())
}

/// One `read` appended to `buf`; 0 at the end of the stream.
fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, ClientError> {
    const CHUNK: usize = 4096;
    let start = buf.len();
    buf.resize(start + CHUNK, 0);
    let read = loop {
        match stream.read(&mut buf[start..]) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other,
        }
    };
    buf.truncate(start + *read.as_ref().unwrap_or(&0));
    read.map_err(ClientError::from_io)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;

    /// A server that answers each request read with the next of `replies`, then closes.
    fn serve(replies: Vec<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for reply in replies {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while find(&got, b"\r\n\r\n").is_none() {
                    let n = s.read(&mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(reply).unwrap();
            }
        });
        addr
    }

    #[test]
    fn reuses_the_connection_and_reads_content_length_bodies() {
        let addr = serve(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 4\r\n\r\nno!!",
        ]);
        let mut c = Connection::new(addr, Duration::from_secs(2));
        let r = c.post_json("/v1/check", b"{}").unwrap();
        assert_eq!((r.status, r.body), (200, &b"ok"[..]));
        let r = c.get("/x").unwrap();
        assert_eq!((r.status, r.body), (429, &b"no!!"[..]));
        // The server is gone: an error, not a panic.
        assert!(c.get("/x").is_err());
    }

    #[test]
    fn refuses_what_it_does_not_read() {
        for (reply, kind) in [
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                "malformed",
            ),
            (b"HTTP/1.1 200 OK\r\n\r\n", "malformed"),
            (b"SMTP ready\r\n\r\n", "malformed"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
                "closed",
            ),
        ] {
            let addr = serve(vec![reply]);
            let mut c = Connection::new(addr, Duration::from_secs(2));
            let e = c.get("/").unwrap_err();
            assert_eq!(e.kind(), kind, "{reply:?}: {e}");
        }
        let closed = serve(vec![
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it",
        ]);
        let mut c = Connection::new(closed, Duration::from_secs(2));
        assert_eq!(c.get("/").unwrap().body, b"all of it");
    }
}

//! The physical ceiling for `POST /v1/check` on a machine: the HTTP server the edge runs
//! (`shared::http::serve`: hyper's HTTP/1.1 on a multi-threaded tokio runtime, keep-alive,
//! the same accept loop and connection settings), answering every request with a constant
//! `200` and a body the size of a check's answer, deciding nothing. Whatever the edge loses
//! against it is the cost of deciding.
//!
//! `tests/bench/http.sh` runs `wrk` against it and against the edge side by side:
//!
//! ```sh
//! cargo run --release -p edge-agent --example ceiling -- 127.0.0.1:18090
//! ```

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, header};
use shared::http::read_body;

/// A check's answer, as the edge writes its body (the edge adds three `X-RateLimit-*`
/// headers, about 80 bytes more per answer).
const ANSWER: &[u8] =
    br#"{"allowed":true,"limit":1000000000,"remaining":999999999,"reset_at":1795500240,"retry_after":0,"rule":"search"}"#;

fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        eprintln!("usage: ceiling <ip:port>");
        return std::process::ExitCode::from(2);
    };
    let work = async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(listen = %listener.local_addr()?, "answering 200 to everything");
        let handler = |_peer, request: hyper::Request<hyper::body::Incoming>| async move {
            // Read the body as the edge does, so both do the same I/O.
            let _ = read_body(request.into_body(), 64 * 1024).await;
            let mut r = Response::new(Full::new(Bytes::from_static(ANSWER)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        };
        shared::http::serve(listener, handler, shared::process::shutdown_signal()).await;
        Ok::<(), std::io::Error>(())
    };
    shared::process::serve("ceiling", "info", shared::process::LogFormat::Human, work)
}

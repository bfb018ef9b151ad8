//! The HTTP/1.1 accept loop every tier serves with: the edge's check API, the regional's
//! `/metrics`, the coordinator's admin API. One copy, so they all time out slow clients,
//! survive a failed `accept`, and drain the same way on shutdown.
//!
//! A connection flows like this: accepted, handed to hyper with a header-read timeout, every
//! request on it answered by the caller's `handler`; when `shutdown` completes the loop stops
//! accepting, lets requests in flight finish (at most [`DRAIN`]), and returns.

use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for requests in flight.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Serves HTTP/1.1 on `listener` until `shutdown` completes, answering every request with
/// `handler(peer, request)`. A handler never fails: an error is a response like any other.
pub async fn serve<F, Fut, B>(listener: TcpListener, handler: F, shutdown: impl Future<Output = ()>)
where
    F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: say so, and keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        // `map`, not an `async` block around the answer: hyper moves a request's future whole,
        // and a block would add a copy of the request to it.
        let service = service_fn(move |request| handler(peer, request).map(Ok::<_, Infallible>));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("connections still open after {DRAIN:?}; dropping them");
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON response.
pub fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    // Our own values of strings and numbers: serializing them cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The error body every tier answers with: `{"error": <kind>, "message": <what and where>}`.
pub fn json_error(status: StatusCode, error: &str, message: String) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct ErrorAnswer<'a> {
        error: &'a str,
        message: String,
    }
    json(status, &ErrorAnswer { error, message })
}

/// The whole body, up to `max` bytes; past that a `413`, and a body that breaks off a `400`,
/// both ready to send.
///
/// # Errors
///
/// The response to send instead.
pub async fn read_body(body: Incoming, max: usize) -> Result<Bytes, Response<Full<Bytes>>> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over {max} bytes"),
        )),
        Err(e) => Err(json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("reading the body: {e}"),
        )),
    }
}

//! The accept loop every server tier runs: the regional for its edges, the coordinator for its
//! regionals. The tier supplies a [`Service`]; this module owns the connection's life.
//!
//! # How a connection flows
//!
//! 1. TLS: quinn completes the handshake only for a client with a certificate from the
//!    deployment CA ([`server_config`]); a failure is counted in
//!    [`NetStats::connections_failed`] and never reaches the service.
//! 2. `Hello`: the client's first stream carries one [`Hello`]; within [`HANDSHAKE_TIMEOUT`]
//!    or the connection is closed with [`CloseCode::HandshakeTimeout`]. Anything else first is
//!    closed with [`CloseCode::UnexpectedMessage`], a bad frame with its decode error's code.
//!    Two checks are made here for every service: the protocol version
//!    ([`Refusal::UnsupportedVersion`]) and that the certificate names the node the `Hello`
//!    claims ([`Refusal::Unauthorized`], see [`Peer::is_named`]). Then [`Service::hello`]
//!    decides. A refusal is sent as a [`Refused`] frame and the connection is closed with
//!    [`CloseCode::HandshakeRefused`].
//! 3. Requests: every later stream is one request, served in its own task: one frame in,
//!    [`Service::handle`], one frame out, finish (see `frame` for why one request per
//!    stream). A frame that does not decode closes that stream only, with the decode error's
//!    [`CloseCode`] as both its reset and its stop code, and is counted in
//!    [`NetStats::frames_refused`]; the connection and its other streams carry on.
//! 4. When the connection ends, for whatever reason, [`Service::closed`] is called once.
//!
//! Nothing a peer sends can panic this loop or touch another connection: every decode error is
//! a value, every task is per stream, and the per-connection stream limit
//! ([`MAX_CONCURRENT_STREAMS`](crate::net::MAX_CONCURRENT_STREAMS)) bounds what one peer can
//! make the server hold.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tracing::{debug, error, info};

use crate::{
    net::{
        NetError, Peer,
        frame::{read_message, write_message},
        tls::{Identity, server_config},
    },
    wire::{CloseCode, Hello, Message, PROTOCOL_VERSION, Refusal, Refused, Welcome},
};

/// How long a client has, from the end of the TLS handshake, to send its `Hello`. Defaults to
/// 5 s; past it the connection is closed with [`CloseCode::HandshakeTimeout`], so a client
/// that connects and says nothing does not hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a refusal waits for the client to acknowledge the [`Refused`] frame before the
/// connection is closed anyway. Closing at once would discard the frame, and the client would
/// see only the close code, not the reason.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// What a server tier plugs into [`serve`]: how to greet a peer and how to answer it.
pub trait Service: Send + Sync + 'static {
    /// What the service keeps per connection: the peer's node name, its incarnation, its
    /// counters' identity. Shared by every request task of the connection.
    type Session: Send + Sync + 'static;

    /// Decides the handshake: a session and the [`Welcome`] to send, or why not.
    ///
    /// Called only after the generic checks passed: the `Hello`'s protocol version is ours and
    /// `peer`'s verified certificate names `hello.node`. What is left is the service's own
    /// policy: the role ([`Refusal::WrongRole`]), the region ([`Refusal::WrongRegion`]), and
    /// whether it is shutting down ([`Refusal::ShuttingDown`]).
    ///
    /// # Errors
    ///
    /// The [`Refused`] frame to send before the connection is closed.
    fn hello(&self, peer: &Peer, hello: &Hello) -> Result<(Self::Session, Welcome), Refused>;

    /// Answers one request. The message decoded and is not a `Hello`; whether it is valid on
    /// this link (a `Report` from an edge is not) is the service's to decide, answering
    /// [`Message::Error`] with [`CloseCode::UnexpectedMessage`] when it is not.
    fn handle(
        &self,
        session: &Arc<Self::Session>,
        message: Message,
    ) -> impl Future<Output = Message> + Send;

    /// The connection of `session` has ended (closed by either side, timed out, or lost).
    /// Requests already being handled may still finish after this call.
    fn closed(&self, session: &Self::Session) {
        let _ = session;
    }

    /// The handshake of `session` is done and its `Welcome` sent. A service that pushes to its
    /// clients (the coordinator its rule sets and partitions to regionals, a regional its rule
    /// sets to edges) keeps `connection` and opens streams on it with
    /// [`call`](crate::net::call); the client answers them with [`answer`]. Default: nothing.
    fn connected(&self, session: &Arc<Self::Session>, connection: &Connection) {
        let _ = (session, connection);
    }
}

/// Serves the streams a *server* opens on a client's `connection` (its pushes), one frame in
/// and `handler`'s reply out on each, every stream in its own task, until the connection
/// ends. As in [`serve`], a frame that does not decode closes only its stream, with its
/// [`CloseCode`], counted in `stats`.
pub async fn answer<H, F>(connection: Connection, handler: H, stats: Arc<NetStats>)
where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = Message> + Send + 'static,
{
    let handler = Arc::new(handler);
    while let Ok((send, recv)) = connection.accept_bi().await {
        let (handler, stats) = (handler.clone(), stats.clone());
        tokio::spawn(async move { request(send, recv, &stats, |m| handler(m)).await });
    }
}

/// What the accept loop has done, for `/metrics`: counters only ever grow.
#[derive(Debug, Default)]
pub struct NetStats {
    connections_accepted: AtomicU64,
    connections_failed: AtomicU64,
    handshakes_refused: AtomicU64,
    streams_served: AtomicU64,
    /// One counter per [`CloseCode`], indexed by [`code_slot`].
    frames_refused: [AtomicU64; CODES],
}

impl NetStats {
    /// Connections whose TLS handshake succeeded (whatever became of their `Hello`).
    pub fn connections_accepted(&self) -> u64 {
        self.connections_accepted.load(Ordering::Relaxed)
    }

    /// Connection attempts that failed before a TLS session existed: no certificate, one
    /// the deployment CA did not issue, another ALPN, or a handshake that timed out.
    pub fn connections_failed(&self) -> u64 {
        self.connections_failed.load(Ordering::Relaxed)
    }

    /// `Hello`s answered with [`Refused`].
    pub fn handshakes_refused(&self) -> u64 {
        self.handshakes_refused.load(Ordering::Relaxed)
    }

    /// Requests answered: a frame in, a reply written.
    pub fn streams_served(&self) -> u64 {
        self.streams_served.load(Ordering::Relaxed)
    }

    /// Streams (or, for the handshake's stream, connections) closed because of what the peer
    /// sent, by the code they were closed with.
    pub fn frames_refused(&self, code: CloseCode) -> u64 {
        self.frames_refused[code_slot(code)].load(Ordering::Relaxed)
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn refused_frame(&self, code: CloseCode) {
        NetStats::count(&self.frames_refused[code_slot(code)]);
    }
}

/// Binds a server endpoint on `addr` presenting `identity` and requiring client certificates.
/// Bind `127.0.0.1:0` and read [`Endpoint::local_addr`] for a free port.
///
/// # Errors
///
/// [`NetError::Tls`] when the identity is not usable; [`NetError::Bind`] when the socket cannot
/// be bound or no tokio runtime is running.
pub fn server_endpoint(addr: SocketAddr, identity: &Identity) -> Result<Endpoint, NetError> {
    let config = server_config(identity)?;
    Endpoint::server(config, addr).map_err(|source| NetError::Bind { addr, source })
}

/// Accepts connections on `endpoint` and serves each with `service` until the endpoint is
/// closed ([`Endpoint::close`]). Every connection runs in its own task on the current tokio
/// runtime, and every request in its own task under it.
pub async fn serve<S: Service>(endpoint: Endpoint, service: Arc<S>, stats: Arc<NetStats>) {
    while let Some(incoming) = endpoint.accept().await {
        let (service, stats) = (service.clone(), stats.clone());
        tokio::spawn(async move { connection(incoming, service, stats).await });
    }
    debug!("endpoint closed, no more connections");
}

/// One connection, from TLS to its end.
async fn connection<S: Service>(incoming: Incoming, service: Arc<S>, stats: Arc<NetStats>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(err) => {
            NetStats::count(&stats.connections_failed);
            info!(%remote, error = %err, "connection refused during the TLS handshake");
            return;
        }
    };
    NetStats::count(&stats.connections_accepted);
    let Some(peer) = Peer::from_connection(&conn) else {
        // The client verifier requires a certificate; reaching here is a bug in our config.
        error!(%remote, "a connection without a client certificate got through TLS");
        close(&conn, CloseCode::Internal, "no client certificate");
        return;
    };
    let handshake = handshake(&conn, &peer, &*service, &stats);
    let session = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Some(session)) => Arc::new(session),
        Ok(None) => return,
        Err(_) => {
            info!(%remote, "no hello in time");
            close(&conn, CloseCode::HandshakeTimeout, "no hello in time");
            return;
        }
    };
    service.connected(&session, &conn);
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (service, session, stats) = (service.clone(), session.clone(), stats.clone());
                tokio::spawn(async move {
                    request(send, recv, &stats, |m| service.handle(&session, m)).await
                });
            }
            Err(err) => {
                info!(%remote, reason = %err, "connection ended");
                break;
            }
        }
    }
    service.closed(&session);
}

/// The first stream: `Hello` in, `Welcome` or `Refused` out. `None` when the connection is
/// not to be served (refused, broken, or gone); it has then been closed.
async fn handshake<S: Service>(
    conn: &Connection,
    peer: &Peer,
    service: &S,
    stats: &NetStats,
) -> Option<S::Session> {
    let remote = peer.address();
    let (mut send, mut recv) = conn.accept_bi().await.ok()?;
    let mut buf = Vec::new();
    let hello = match read_message(&mut recv, &mut buf).await {
        Ok(Some(Message::Hello(hello))) => hello,
        Ok(Some(other)) => {
            debug!(%remote, kind = other.kind(), "first message is not a hello");
            stats.refused_frame(CloseCode::UnexpectedMessage);
            close(conn, CloseCode::UnexpectedMessage, "expected hello");
            return None;
        }
        Ok(None) => {
            stats.refused_frame(CloseCode::UnexpectedMessage);
            close(conn, CloseCode::UnexpectedMessage, "expected hello");
            return None;
        }
        Err(err) => {
            let code = refusal_code(&err)?;
            debug!(%remote, error = %err, "bad frame instead of a hello");
            stats.refused_frame(code);
            close(conn, code, "bad frame");
            return None;
        }
    };
    match greet(peer, &hello, service) {
        Ok((session, welcome)) => {
            write_message(&mut send, &welcome.into()).await.ok()?;
            let _ = send.finish();
            info!(%remote, node = %hello.node, role = ?hello.role, "peer connected");
            Some(session)
        }
        Err(refused) => {
            NetStats::count(&stats.handshakes_refused);
            info!(
                %remote, node = %hello.node, reason = ?refused.reason,
                message = %refused.message, "hello refused",
            );
            if write_message(&mut send, &refused.into()).await.is_ok() {
                let _ = send.finish();
                let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
            }
            close(conn, CloseCode::HandshakeRefused, "hello refused");
            None
        }
    }
}

/// The generic checks on a `Hello`, then the service's.
fn greet<S: Service>(
    peer: &Peer,
    hello: &Hello,
    service: &S,
) -> Result<(S::Session, Welcome), Refused> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Refused {
            reason: Refusal::UnsupportedVersion,
            message: format!(
                "client speaks protocol version {}, this server only {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        });
    }
    if !peer.is_named(&hello.node) {
        return Err(Refused {
            reason: Refusal::Unauthorized,
            message: format!(
                "the client certificate does not carry the node name {:?}",
                hello.node
            ),
        });
    }
    service.hello(peer, hello)
}

/// One request stream: a frame in, the service's reply out.
async fn request<F: Future<Output = Message>>(
    mut send: SendStream,
    mut recv: RecvStream,
    stats: &NetStats,
    handle: impl FnOnce(Message) -> F,
) {
    let mut buf = Vec::new();
    let message = match read_message(&mut recv, &mut buf).await {
        Ok(Some(Message::Hello(_))) => {
            debug!("hello after the handshake");
            return refuse(&mut send, &mut recv, CloseCode::UnexpectedMessage, stats);
        }
        Ok(Some(message)) => message,
        // Opened and finished without a byte: nothing was asked, nothing to answer.
        Ok(None) => return,
        Err(err) => {
            let Some(code) = refusal_code(&err) else {
                debug!(error = %err, "request stream ended before its frame");
                return;
            };
            debug!(error = %err, "bad frame, closing its stream");
            return refuse(&mut send, &mut recv, code, stats);
        }
    };
    let reply = handle(message).await;
    match write_message(&mut send, &reply).await {
        Ok(()) => {
            let _ = send.finish();
            NetStats::count(&stats.streams_served);
        }
        Err(NetError::Encode(err)) => {
            error!(kind = reply.kind(), error = %err, "the service's reply cannot be encoded");
            let _ = send.reset(VarInt::from_u32(CloseCode::Internal.as_u32()));
        }
        Err(err) => debug!(error = %err, "reply not delivered"),
    }
}

/// The code to close with when reading a peer's frame failed because of what the peer sent;
/// `None` when it failed because the stream or connection went away.
fn refusal_code(err: &NetError) -> Option<CloseCode> {
    match err {
        NetError::Decode(err) => Some(CloseCode::from(err)),
        // A frame cut short by the end of its stream is one whose payload ended early.
        NetError::Truncated { .. } => Some(CloseCode::Malformed),
        _ => None,
    }
}

/// Closes a request stream both ways with `code`, and counts it.
fn refuse(send: &mut SendStream, recv: &mut RecvStream, code: CloseCode, stats: &NetStats) {
    stats.refused_frame(code);
    let code = VarInt::from_u32(code.as_u32());
    // Both only fail when that half is already closed, which is as good.
    let _ = recv.stop(code);
    let _ = send.reset(code);
}

/// Closes the whole connection with `code`.
fn close(conn: &Connection, code: CloseCode, reason: &str) {
    conn.close(VarInt::from_u32(code.as_u32()), reason.as_bytes());
}

/// How many close codes there are: the length of [`NetStats`]'s per-code counters.
const CODES: usize = CloseCode::ALL.len();

/// The index of `code`'s counter in [`NetStats`].
fn code_slot(code: CloseCode) -> usize {
    match code {
        CloseCode::Normal => 0,
        CloseCode::ShuttingDown => 1,
        CloseCode::Internal => 2,
        CloseCode::FrameTooLarge => 3,
        CloseCode::UnsupportedVersion => 4,
        CloseCode::Malformed => 5,
        CloseCode::TooManyKeys => 6,
        CloseCode::KeyTooLong => 7,
        CloseCode::HandshakeRefused => 8,
        CloseCode::UnexpectedMessage => 9,
        CloseCode::HandshakeTimeout => 10,
    }
}

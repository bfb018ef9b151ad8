//! [`NetError`]: why a frame, a call or a connection failed, sorted by what the caller does
//! about it.

use std::{io, net::SocketAddr};

use quinn::{ConnectionError, ReadError, WriteError};

use crate::{
    net::tls::TlsError,
    wire::{CloseCode, DecodeError, EncodeError, Refused},
};

/// Why sending or receiving a message, a call, or a connection attempt failed.
///
/// Three questions matter to a caller, and each has a method: did the peer say why
/// ([`NetError::peer_code`]), is the connection itself gone so that the caller should reconnect
/// ([`NetError::is_connection_lost`]), and was it the peer's bytes ([`NetError::Decode`], to be
/// answered with `CloseCode::from(&err)` on the stream).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The peer sent bytes that are not a valid frame. Final for the stream: close it with
    /// `CloseCode::from(&err)`.
    #[error("invalid frame from the peer: {0}")]
    Decode(#[from] DecodeError),
    /// The peer ended the stream in the middle of a frame (`buffered` bytes of it had arrived),
    /// or, with `buffered == 0`, before the reply a call waits for.
    #[error("the peer ended the stream after {buffered} bytes of an unfinished frame")]
    Truncated {
        /// The bytes of the unfinished frame that had arrived.
        buffered: usize,
    },
    /// Our own message could not be encoded: a bug in the sender (split the batch), never the
    /// peer's doing.
    #[error("cannot encode the message: {0}")]
    Encode(#[from] EncodeError),
    /// The peer closed this stream: it reset its sending half or stopped ours, with `code`
    /// (a [`CloseCode`] number when the peer speaks our protocol; see
    /// [`NetError::peer_code`]). The connection and its other streams are unaffected.
    #[error("the peer closed the stream with code {code:#x}")]
    StreamClosed {
        /// The QUIC application error code the peer gave.
        code: u64,
    },
    /// The stream cannot be used for a local reason (already finished or reset, a rejected
    /// 0-RTT stream). A bug in the caller, never the peer's doing.
    #[error("the stream is not usable: {0}")]
    StreamUnusable(&'static str),
    /// The connection is gone: closed by either side (with the peer's code when it gave one),
    /// timed out after [`IDLE_TIMEOUT`](crate::net::IDLE_TIMEOUT) of silence, or reset.
    #[error("connection lost: {0}")]
    ConnectionLost(#[from] ConnectionError),
    /// A connection could not even be attempted (the endpoint is closing, an invalid server
    /// name, no client config).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The server refused our `Hello`; it closes the connection next.
    #[error("handshake refused ({:?}): {}", .0.reason, .0.message)]
    Refused(Refused),
    /// The peer answered with a valid message, but not one the exchange allows.
    #[error("expected {expected}, the peer sent {got}")]
    Unexpected {
        /// The kind of message expected (`welcome`, `sync_ack`).
        expected: &'static str,
        /// [`Message::kind`](crate::wire::Message::kind) of what arrived.
        got: &'static str,
    },
    /// An operation bounded by a deadline of ours did not finish in time.
    #[error("timed out")]
    Timeout,
    /// A UDP socket could not be bound (in use, no permission, no such address), or no tokio
    /// runtime is running to drive it.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// The node's TLS identity is not usable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A configured DNS name did not resolve to an address the client socket can reach.
    #[error("{0}")]
    Resolve(String),
}

impl NetError {
    /// The close code the peer gave for the stream or the connection, when it gave one this
    /// build knows.
    pub fn peer_code(&self) -> Option<CloseCode> {
        let code = match self {
            NetError::StreamClosed { code } => *code,
            NetError::ConnectionLost(ConnectionError::ApplicationClosed(close)) => {
                close.error_code.into_inner()
            }
            _ => return None,
        };
        u32::try_from(code)
            .ok()
            .and_then(|code| CloseCode::try_from(code).ok())
    }

    /// Whether the connection itself is gone, so that every later call on it fails too and the
    /// caller should reconnect. A closed stream, a bad frame or a refused message is not.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, NetError::ConnectionLost(_))
    }
}

impl From<ReadError> for NetError {
    fn from(err: ReadError) -> NetError {
        match err {
            ReadError::Reset(code) => NetError::StreamClosed {
                code: code.into_inner(),
            },
            ReadError::ConnectionLost(err) => NetError::ConnectionLost(err),
            ReadError::ClosedStream => NetError::StreamUnusable("already closed"),
            ReadError::IllegalOrderedRead => NetError::StreamUnusable("ordered after unordered"),
            ReadError::ZeroRttRejected => NetError::StreamUnusable("0-RTT rejected"),
        }
    }
}

impl From<WriteError> for NetError {
    fn from(err: WriteError) -> NetError {
        match err {
            WriteError::Stopped(code) => NetError::StreamClosed {
                code: code.into_inner(),
            },
            WriteError::ConnectionLost(err) => NetError::ConnectionLost(err),
            WriteError::ClosedStream => NetError::StreamUnusable("already closed"),
            WriteError::ZeroRttRejected => NetError::StreamUnusable("0-RTT rejected"),
        }
    }
}

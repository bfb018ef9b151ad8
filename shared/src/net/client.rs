//! The client side of a link: an endpoint, and [`connect`], which dials a server and does the
//! `Hello` / `Welcome` handshake on the connection's first stream. Reconnecting, failover and
//! backoff are the calling tier's policy (the edge's `QuicUpstream`, the regional's
//! coordinator link), not this module's.

use std::net::SocketAddr;

use quinn::{Connection, Endpoint, VarInt};

use crate::{
    net::{
        NetError,
        frame::call,
        tls::{Identity, client_config},
    },
    wire::{CloseCode, Hello, Message, Welcome},
};

/// Binds a client endpoint on `bind` that presents `identity` and trusts servers the
/// deployment CA issued. Bind `0.0.0.0:0` to reach IPv4 servers, `[::]:0` for IPv6 (and, on
/// dual-stack hosts, both).
///
/// # Errors
///
/// [`NetError::Tls`] when the identity is not usable; [`NetError::Bind`] when the socket cannot
/// be bound or no tokio runtime is running.
pub fn client_endpoint(bind: SocketAddr, identity: &Identity) -> Result<Endpoint, NetError> {
    let config = client_config(identity)?;
    let mut endpoint =
        Endpoint::client(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to the server at `addr`, which must present a certificate for `server_name`, and
/// greets it with `hello`. Returns the connection, ready for calls, and the server's
/// [`Welcome`].
///
/// No deadline of its own (a silent address takes the
/// [`IDLE_TIMEOUT`](crate::net::IDLE_TIMEOUT) to fail): wrap it in the caller's connect
/// timeout.
///
/// # Errors
///
/// [`NetError::Refused`] with the server's reason; [`NetError::Unexpected`] when the server
/// answers something else (the connection is then closed with
/// [`CloseCode::UnexpectedMessage`]); [`NetError::ConnectionLost`] when TLS fails (an
/// untrusted certificate either way) or the server goes away; [`NetError::Connect`] when no
/// attempt could be made.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    hello: &Hello,
) -> Result<(Connection, Welcome), NetError> {
    let conn = endpoint.connect(addr, server_name)?.await?;
    match call(&conn, &Message::Hello(hello.clone())).await {
        Ok(Message::Welcome(welcome)) => Ok((conn, welcome)),
        Ok(Message::Refused(refused)) => {
            // The server closes too; closing first frees our side at once.
            close(&conn, CloseCode::HandshakeRefused);
            Err(NetError::Refused(refused))
        }
        Ok(other) => {
            close(&conn, CloseCode::UnexpectedMessage);
            Err(NetError::Unexpected {
                expected: "welcome",
                got: other.kind(),
            })
        }
        Err(err) => {
            close(&conn, CloseCode::Normal);
            Err(err)
        }
    }
}

fn close(conn: &Connection, code: CloseCode) {
    conn.close(VarInt::from_u32(code.as_u32()), code.name().as_bytes());
}

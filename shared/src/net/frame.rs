//! Frames on QUIC streams: [`write_message`], [`read_message`], and [`call`], one request and
//! its reply on a stream of their own; [`call_within`] with a deadline, and [`push_rule_set`],
//! the one push every link down the tree makes.
//!
//! # One request per stream
//!
//! Every request opens a new bidirectional stream, sends one frame, finishes its half, and
//! reads one reply frame. QUIC streams cost a few bytes of state and no round trip to open, and
//! the design buys a lot for that:
//!
//! - a reply needs no id to find its request: it is the only frame on the stream, so
//!   concurrent calls on one connection never wait for each other (no head-of-line blocking,
//!   no reply table, nothing to clean up when a caller gives up and drops its future);
//! - a bad frame closes only its own stream, with a [`CloseCode`](crate::wire::CloseCode) as
//!   the reset code, which the sender reads whatever went wrong, and leaves every other request
//!   on the connection alone (DESIGN §5);
//! - a caller that times out just drops the stream; quinn resets it.
//!
//! The frame format itself, and its caps, are `wire`'s; this module only moves bytes.

use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};

use crate::{
    net::NetError,
    wire::{Message, decode_frame, encode_frame},
};

/// The most bytes read from a stream at once. A stream's buffer holds at most one frame
/// ([`MAX_FRAME_LEN`](crate::wire::MAX_FRAME_LEN) + 4 bytes, refused from its length prefix
/// beyond that) plus one read, so this bounds the slack, not the frame.
const READ_CHUNK: usize = 64 * 1024;

/// Encodes `message` as one frame and writes it to `send`. Does not finish the stream.
///
/// # Errors
///
/// [`NetError::Encode`] when the message breaks a cap (nothing is written);
/// [`NetError::StreamClosed`] when the peer stopped the stream, with its code;
/// [`NetError::ConnectionLost`].
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<(), NetError> {
    let mut frame = Vec::new();
    encode_frame(message, &mut frame)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads the next message from `recv`, buffering in `buf` until a whole frame is there.
///
/// `buf` carries bytes between calls: bytes after the frame returned (the start of the next
/// one) stay in it. Start with an empty `Vec` per stream and pass the same one each time.
///
/// Returns `Ok(None)` when the peer finished the stream cleanly at a frame boundary.
///
/// # Errors
///
/// [`NetError::Decode`] as soon as the buffered bytes cannot be the start of a valid frame
/// (an oversized length prefix is refused from its 4 bytes, before the body is read);
/// [`NetError::Truncated`] when the stream ends inside a frame; [`NetError::StreamClosed`]
/// when the peer reset it, with its code; [`NetError::ConnectionLost`].
pub async fn read_message(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
) -> Result<Option<Message>, NetError> {
    loop {
        if let Some((message, used)) = decode_frame(buf)? {
            buf.drain(..used);
            return Ok(Some(message));
        }
        match recv.read_chunk(READ_CHUNK, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None if buf.is_empty() => return Ok(None),
            None => {
                return Err(NetError::Truncated {
                    buffered: buf.len(),
                });
            }
        }
    }
}

/// Sends `request` on a new stream of `connection` and returns the one reply frame.
///
/// No deadline of its own: the caller bounds it (the edge with its upstream timeout) and may
/// drop the future at any point, which abandons only this stream.
///
/// # Errors
///
/// Every error of [`write_message`] and [`read_message`]; [`NetError::Truncated`] with
/// `buffered == 0` when the peer finished the stream without replying.
pub async fn call(connection: &Connection, request: &Message) -> Result<Message, NetError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    write_message(&mut send, request).await?;
    // Only fails when the stream is already finished or reset, which nothing here did.
    let _ = send.finish();
    let mut buf = Vec::new();
    read_message(&mut recv, &mut buf)
        .await?
        .ok_or(NetError::Truncated { buffered: 0 })
}

/// [`call`] bounded by `within`: [`NetError::Timeout`] past it (the stream is dropped, so
/// quinn resets it).
///
/// # Errors
///
/// As [`call`], or [`NetError::Timeout`].
pub async fn call_within(
    connection: &Connection,
    request: &Message,
    within: Duration,
) -> Result<Message, NetError> {
    tokio::time::timeout(within, call(connection, request))
        .await
        .unwrap_or(Err(NetError::Timeout))
}

/// Pushes a rule set down one link (coordinator to regional, regional to edge): `push` must be
/// a [`RuleSetPush`](crate::wire::RuleSetPush), sent as a [`call_within`], and the receiver's
/// [`RuleSetAck`](crate::wire::RuleSetAck) read. `Ok` when the receiver now runs that version
/// or a newer one.
///
/// # Errors
///
/// Why the receiver does not run it, for the logs: its located refusal, or the call's error,
/// or another answer than an ack.
pub async fn push_rule_set(
    connection: &Connection,
    push: &Message,
    within: Duration,
) -> Result<(), String> {
    match call_within(connection, push, within).await {
        Ok(Message::RuleSetAck(ack)) => ack.error.map_or(Ok(()), Err),
        Ok(other) => Err(format!("answered {}", other.kind())),
        Err(e) => Err(e.to_string()),
    }
}

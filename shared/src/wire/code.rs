//! The numbers a stream or a connection is closed with.
//!
//! QUIC closes a stream (`STOP_SENDING`, `RESET_STREAM`) or a connection
//! (`CONNECTION_CLOSE`) with an application error code, a variable-length integer the peer
//! receives whatever protocol version it speaks and whether or not it could decode anything we
//! sent. That makes these numbers the one part of the protocol that never changes with
//! [`PROTOCOL_VERSION`](crate::wire::PROTOCOL_VERSION): a value, once given a meaning here, keeps
//! it forever, and a retired value is never reused.
//!
//! The numbers are grouped by who is at fault, so a log line is readable from the number alone:
//! `0x0xx` no one, `0x1xx` the frame (the peer sent bytes that are not a valid frame: a bug or an
//! attack), `0x2xx` the session (a valid frame at the wrong time or from the wrong peer).

use serde::{Deserialize, Serialize};

use crate::wire::codec::DecodeError;

/// Why a stream or connection was closed: the QUIC application error code, and a metric label.
///
/// Convert with [`CloseCode::as_u32`] (then `quinn::VarInt::from_u32`) when closing, and with
/// `CloseCode::try_from(u32)` when the peer closed; a code from a newer peer that this build does
/// not know is an [`UnknownCloseCode`], to be logged as a number.
///
/// On the wire, inside an [`ErrorNotice`](crate::wire::ErrorNotice), it is encoded as its number,
/// not as a variant index, so its encoding is the same stable number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u32", try_from = "u32")]
#[non_exhaustive]
#[repr(u32)]
pub enum CloseCode {
    /// `0x000`: closed on purpose with nothing wrong: the work is done or the peer idled out.
    Normal = 0x000,
    /// `0x001`: the sender is shutting down. Not the receiver's fault: reconnect, to another
    /// replica if there is one, without a long backoff.
    ShuttingDown = 0x001,
    /// `0x002`: the sender failed on its own side (a bug, or a resource it needs is gone) and
    /// could not go on with this stream. Not the receiver's fault: retry after a backoff.
    Internal = 0x002,

    /// `0x101`: a frame's length prefix was above [`MAX_FRAME_LEN`](crate::wire::MAX_FRAME_LEN)
    /// ([`DecodeError::FrameTooLarge`]).
    FrameTooLarge = 0x101,
    /// `0x102`: a frame's version byte was not this build's
    /// [`PROTOCOL_VERSION`](crate::wire::PROTOCOL_VERSION)
    /// ([`DecodeError::UnsupportedVersion`]). Upgrade one side; retrying will not help.
    UnsupportedVersion = 0x102,
    /// `0x103`: a frame's payload was not a valid message: it ended early, held an invalid
    /// value, or had bytes left over ([`DecodeError::Malformed`],
    /// [`DecodeError::TrailingBytes`]).
    Malformed = 0x103,
    /// `0x104`: a list in a message held more than
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH) items
    /// ([`DecodeError::TooManyKeys`]).
    TooManyKeys = 0x104,
    /// `0x105`: a key in a message was longer than [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN)
    /// bytes ([`DecodeError::KeyTooLong`]).
    KeyTooLong = 0x105,

    /// `0x201`: the handshake was refused; a [`Refused`](crate::wire::Refused) frame says why.
    HandshakeRefused = 0x201,
    /// `0x202`: a valid message that is not valid here: anything before the handshake's
    /// answer, a message that travels the other way, or one that does not belong on this link
    /// (a `Report` from an edge).
    UnexpectedMessage = 0x202,
    /// `0x203`: the peer did not complete the handshake in time.
    HandshakeTimeout = 0x203,
}

impl CloseCode {
    /// Every code, in numeric order: what per-code counters are sized and labelled by.
    pub const ALL: [CloseCode; 11] = [
        CloseCode::Normal,
        CloseCode::ShuttingDown,
        CloseCode::Internal,
        CloseCode::FrameTooLarge,
        CloseCode::UnsupportedVersion,
        CloseCode::Malformed,
        CloseCode::TooManyKeys,
        CloseCode::KeyTooLong,
        CloseCode::HandshakeRefused,
        CloseCode::UnexpectedMessage,
        CloseCode::HandshakeTimeout,
    ];

    /// Whether the peer is at fault (`0x1xx` its frame, `0x2xx` its session), as opposed to
    /// nobody (`0x0xx`): the codes a server refuses a peer's stream with.
    pub const fn blames_peer(self) -> bool {
        self.as_u32() >= 0x100
    }

    /// The number sent in the QUIC close frame.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// A short, stable, snake_case name for logs and metric labels
    /// (`streams_closed_total{code="too_many_keys"}`).
    pub const fn name(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::ShuttingDown => "shutting_down",
            CloseCode::Internal => "internal",
            CloseCode::FrameTooLarge => "frame_too_large",
            CloseCode::UnsupportedVersion => "unsupported_version",
            CloseCode::Malformed => "malformed",
            CloseCode::TooManyKeys => "too_many_keys",
            CloseCode::KeyTooLong => "key_too_long",
            CloseCode::HandshakeRefused => "handshake_refused",
            CloseCode::UnexpectedMessage => "unexpected_message",
            CloseCode::HandshakeTimeout => "handshake_timeout",
        }
    }
}

impl From<CloseCode> for u32 {
    fn from(code: CloseCode) -> u32 {
        code.as_u32()
    }
}

/// A close code this build does not know, from a newer peer or a buggy one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("unknown close code {0:#x}")]
pub struct UnknownCloseCode(pub u32);

impl TryFrom<u32> for CloseCode {
    type Error = UnknownCloseCode;

    fn try_from(n: u32) -> Result<CloseCode, UnknownCloseCode> {
        Ok(match n {
            0x000 => CloseCode::Normal,
            0x001 => CloseCode::ShuttingDown,
            0x002 => CloseCode::Internal,
            0x101 => CloseCode::FrameTooLarge,
            0x102 => CloseCode::UnsupportedVersion,
            0x103 => CloseCode::Malformed,
            0x104 => CloseCode::TooManyKeys,
            0x105 => CloseCode::KeyTooLong,
            0x201 => CloseCode::HandshakeRefused,
            0x202 => CloseCode::UnexpectedMessage,
            0x203 => CloseCode::HandshakeTimeout,
            _ => return Err(UnknownCloseCode(n)),
        })
    }
}

/// The code a stream is closed with when a frame on it failed to decode. Every decode error is
/// the peer's fault and final for the stream: nothing after a bad frame can be trusted to start
/// at a frame boundary.
impl From<&DecodeError> for CloseCode {
    fn from(err: &DecodeError) -> CloseCode {
        match err {
            DecodeError::FrameTooLarge { .. } => CloseCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => CloseCode::UnsupportedVersion,
            DecodeError::Malformed(_) | DecodeError::TrailingBytes { .. } => CloseCode::Malformed,
            DecodeError::TooManyKeys { .. } => CloseCode::TooManyKeys,
            DecodeError::KeyTooLong { .. } => CloseCode::KeyTooLong,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::try_from(code.as_u32()), Ok(code));
            assert!(names.insert(code.name()), "duplicate name {}", code.name());
        }
        assert_eq!(CloseCode::try_from(0x999), Err(UnknownCloseCode(0x999)));
    }

    /// The numbers are a public, stable contract: this test is the list, and changing it
    /// means breaking every deployed peer's logs and dashboards.
    #[test]
    fn numbers_are_stable() {
        let numbers: Vec<u32> = CloseCode::ALL.iter().map(|c| c.as_u32()).collect();
        assert_eq!(
            numbers,
            [
                0x000, 0x001, 0x002, 0x101, 0x102, 0x103, 0x104, 0x105, 0x201, 0x202, 0x203
            ]
        );
    }
}

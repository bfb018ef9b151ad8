//! The wire protocol (DESIGN §5): every message the tiers exchange, and the frame that carries it.
//!
//! Edges talk to their regional, and regionals to the coordinator, over one long-lived QUIC
//! connection each. Every stream on those connections carries a sequence of frames, and every
//! frame carries one [`Message`]. This module is sans-IO like the rest of the crate:
//! [`encode_frame`] appends bytes to a `Vec`, and [`decode_frame`] looks at whatever bytes the
//! caller has buffered so far and says "not yet", "here is a message and how many bytes it
//! took", or "this stream is broken, close it with this [`CloseCode`]".
//!
//! # Frame layout
//!
//! ```text
//! +----------------------+---------+------------------------------------+
//! | length: u32, BE      | version | payload: postcard-encoded Message  |
//! | (bytes that follow)  | u8      | (length - 1 bytes)                 |
//! +----------------------+---------+------------------------------------+
//!    4 bytes               1 byte
//! ```
//!
//! - `length` counts the version byte and the payload, not itself. It is at least 1 and at most
//!   [`MAX_FRAME_LEN`]; a decoder refuses a larger one as soon as the 4 bytes arrive, before it
//!   buffers anything of the body.
//! - `version` is the [`PROTOCOL_VERSION`] whose encoding the payload uses.
//! - The payload is exactly one [`Message`] in postcard's format (varint integers, length-prefixed
//!   strings and lists, enum variants by index). It must fill the frame: bytes left over after
//!   the message are an error, so two implementations cannot disagree on where a message ends.
//! - Every list inside a message holds at most [`MAX_KEYS_PER_BATCH`] items and every key at most
//!   [`MAX_KEY_LEN`] bytes. The decoder checks each list's and key's length prefix before it
//!   allocates for it, and [`encode_frame`] refuses to produce a frame its peer would refuse.
//!
//! # The version rule
//!
//! postcard is not self-describing: a peer that reads a payload with another version's types
//! does not fail, it silently reads different numbers. So the version is checked before the
//! payload is touched, in every frame, and peers speak exactly one version each:
//!
//! - Any change to what a payload's bytes mean bumps [`PROTOCOL_VERSION`]: a field added,
//!   removed, retyped or reordered, a variant added or reordered in any enum that crosses the
//!   wire, a cap lowered. Raising a cap or changing only documentation does not.
//! - A frame whose version byte is not ours is refused with [`DecodeError::UnsupportedVersion`],
//!   and the stream is closed with [`CloseCode::UnsupportedVersion`]. Close codes are QUIC
//!   integers, readable by the peer whatever version it speaks, so a mismatch is visible at
//!   once on both sides instead of looking like a malformed frame.
//! - [`Hello`] and [`Welcome`] also carry the version so that logs and the operator see both
//!   sides' versions.
//!
//! This means a deployment upgrades a protocol version tier by tier with a brief refusal on the
//! links that are mixed. That is the honest cost of a non-self-describing format; a later
//! version may accept a range of versions by keeping the old types beside the new ones.
//!
//! # Layout
//!
//! - `message`: [`Message`] and the struct each variant carries, with every field's contract.
//! - `codec`: [`encode_frame`], [`decode_frame`], [`EncodeError`], [`DecodeError`], and the
//!   capped list and key (de)serializers the message fields use.
//! - `code`: [`CloseCode`], the stable numbers a stream or connection is closed with.

mod code;
mod codec;
mod message;

pub use self::{
    code::{CloseCode, UnknownCloseCode},
    codec::{DecodeError, EncodeError, decode_frame, encode_frame},
    message::{
        AckEntry, Acquire, AcquireReply, Check, CheckOutcome, Confirm, EdgeHolding, ErrorNotice,
        Hello, HotKey, HotKeyDemand, KeyHolding, KeyPartition, KeyQuery, KeyReport, LimitPartition,
        Message, Partitions, QuotaReply, QuotaRequest, Refusal, Refused, Release, Report,
        ReportAck, Role, RuleDemand, RuleSetAck, RuleSetPush, RuleShare, SyncAck, SyncBatch,
        SyncEntry, TRANSFER_ANSWER_WITHIN, TransferGrant, Welcome,
    },
};

/// The version of the payload encoding this build speaks, sent as the fifth byte of every frame.
///
/// Starts at 1 so that a zeroed buffer is never mistaken for a valid frame. See "The version
/// rule" in the module documentation for what bumps it.
pub const PROTOCOL_VERSION: u8 = 5;

/// The largest value a frame's length prefix may hold: the version byte plus the payload, in
/// bytes (a whole frame is at most 4 bytes more). 1 MiB.
///
/// This is how much one stream can make its receiver buffer, so it is a memory budget per
/// stream: a regional with a thousand edges buffers at most a GiB in the worst case where every
/// edge sends a maximal frame at once. It is sized from the other caps: the largest message
/// whose size the caps bound, a [`SyncAck`] with [`MAX_KEYS_PER_BATCH`] entries and as many hot
/// keys and recalls, all keys [`MAX_KEY_LEN`] bytes long and every integer at its widest, takes
/// well under this (the test that says so measures it), so a sender that cuts batches by key count never meets this limit. What the caps do
/// not bound is free text: a [`RuleSetPush`]'s YAML must fit in a frame, which leaves rule sets
/// of a little under 1 MiB (tens of thousands of endpoints).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// The most items any one list in a message may hold: sync and ack entries, hot keys, checks
/// of one [`Acquire`], per-rule lines of a [`Report`] or [`Partitions`]. 1,024.
///
/// A batch is the unit of work a regional does in one go (one Redis pipeline per batch,
/// DESIGN §6), so this bounds the time one batch holds the store and the ack's latency, which
/// must stay well inside the edge's 50 ms timeout. At the 100 ms flush interval it still lets one
/// edge sync about 10,000 changed keys a second in one batch per interval; an edge with more
/// sends a batch whenever one is full (DESIGN §4). It also caps a rule set at 1,024 limits for
/// [`Partitions`], which is more than any rule set we have seen. The decoder refuses a longer
/// list from its length prefix alone, so a small frame cannot ask for a big allocation.
pub const MAX_KEYS_PER_BATCH: usize = 1024;

/// The longest key, in bytes of UTF-8. 256.
///
/// A key is the value a rule's selector picked out of a request: an IP address (at most 45
/// bytes as IPv6 text), a user id, an API key (usually 32 to 64 bytes), a header's value. 256
/// bytes leaves room for all of those and for composite keys, while it keeps one store key,
/// which is a prefix, a hash tag and this key (DESIGN §6), small, and keeps a full batch of
/// full-length keys at 256 KiB. A longer identity must be hashed by the edge before it becomes a
/// key; the codec refuses it rather than truncating it, since two truncated keys would share a
/// counter.
pub const MAX_KEY_LEN: usize = 256;

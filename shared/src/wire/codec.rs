//! Frames: a length prefix, the version byte, and one postcard-encoded [`Message`].
//!
//! The decoder is written for bytes from a peer that may be buggy or hostile. It never panics,
//! and it never allocates more than the caps allow: the length prefix is checked before the
//! body is buffered, and every list's and key's length prefix is checked before anything is
//! allocated for it (the [`cap`] module, which the message fields name in `#[serde(with)]`).
//! The encoder refuses to produce any frame the decoder would refuse, so a peer of the same
//! version never has to close a stream because of a well-behaved sender.

use std::fmt;

use postcard::ser_flavors::{Flavor, Size};

use crate::wire::{MAX_FRAME_LEN, MAX_KEY_LEN, MAX_KEYS_PER_BATCH, Message, PROTOCOL_VERSION};

/// Why a frame could not be decoded. Every variant is final for the stream it came on: close it
/// with `CloseCode::from(&err)` (see [`CloseCode`]), count it, and leave every other stream
/// alone (DESIGN §5).
///
/// [`CloseCode`]: crate::wire::CloseCode
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announced more than [`MAX_FRAME_LEN`] bytes. Reported as soon as the
    /// four prefix bytes are there, before any of the body is buffered.
    #[error("frame of {len} bytes is larger than the maximum of {max}")]
    FrameTooLarge {
        /// The length the prefix announced.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The frame's version byte is not [`PROTOCOL_VERSION`]. Reported as soon as that byte is
    /// there, before the body is buffered.
    #[error("frame uses protocol version {0}, this build speaks only {PROTOCOL_VERSION}")]
    UnsupportedVersion(u8),
    /// The payload is not a valid message: it ends early, holds a value its type does not allow
    /// (a bool that is not 0 or 1, invalid UTF-8, an unknown variant, a zero cost), or the length
    /// prefix is zero so there is not even a version byte. The reason is for logs.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A list in the message announced more than [`MAX_KEYS_PER_BATCH`] items. Reported from
    /// the list's length prefix, before anything is allocated for the list. (A prefix that
    /// claims more items than there are bytes left in the frame is [`DecodeError::Malformed`]
    /// instead: postcard compares the claim with the bytes first, and reading stops when they
    /// run out.)
    #[error("a list of {len} items is longer than the maximum of {max}")]
    TooManyKeys {
        /// The length the list announced.
        len: usize,
        /// [`MAX_KEYS_PER_BATCH`].
        max: usize,
    },
    /// A key in the message is longer than [`MAX_KEY_LEN`] bytes. Reported before the key is
    /// copied out of the frame.
    #[error("a key of {len} bytes is longer than the maximum of {max}")]
    KeyTooLong {
        /// The key's length, in bytes.
        len: usize,
        /// [`MAX_KEY_LEN`].
        max: usize,
    },
    /// The message ended before the frame did. Refused rather than ignored, so that two
    /// implementations can never disagree on where a message ends.
    #[error("{len} bytes left over after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        len: usize,
    },
}

/// Why a message could not be encoded. Each is a bug or a missing split in the sender, never
/// something a peer caused: the sender should cut the message smaller, not retry it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded frame would be longer than [`MAX_FRAME_LEN`]; only free text (a rule set's
    /// YAML, a name, a message) can get there, since the other caps keep lists and keys small.
    #[error("message encodes to {len} bytes, more than the maximum frame of {max}")]
    FrameTooLarge {
        /// The length the frame's prefix would have held.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// A list holds more than [`MAX_KEYS_PER_BATCH`] items: split the batch.
    #[error("a list of {len} items is longer than the maximum of {max}")]
    TooManyKeys {
        /// The list's length.
        len: usize,
        /// [`MAX_KEYS_PER_BATCH`].
        max: usize,
    },
    /// A key is longer than [`MAX_KEY_LEN`] bytes: the edge should have hashed it.
    #[error("a key of {len} bytes is longer than the maximum of {max}")]
    KeyTooLong {
        /// The key's length, in bytes.
        len: usize,
        /// [`MAX_KEY_LEN`].
        max: usize,
    },
    /// postcard refused the value for another reason. No [`Message`] can cause this today; the
    /// variant exists so that a future field type that can fail does not panic.
    #[error("message cannot be encoded: {0}")]
    Unencodable(&'static str),
}

/// Appends one frame holding `message` to `out`.
///
/// `out` may already hold other frames; this one goes after them, so a sender can batch
/// several frames into one write. On error `out` is left exactly as it was.
///
/// # Errors
///
/// Refuses to produce a frame the peer would refuse: [`EncodeError::TooManyKeys`] and
/// [`EncodeError::KeyTooLong`] from the caps, checked while encoding, and
/// [`EncodeError::FrameTooLarge`], checked as the frame grows, so `out` never grows by more
/// than a maximal frame even when the message is far bigger.
pub fn encode_frame(message: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    out.push(PROTOCOL_VERSION);
    cap::take_violation();
    let limit = start + LEN_PREFIX + MAX_FRAME_LEN;
    if let Err(err) = postcard::serialize_with_flavor(message, Append { out, limit }) {
        out.truncate(start);
        return Err(encode_error(message, err));
    }
    let len = out.len() - start - LEN_PREFIX;
    let Ok(prefix) = u32::try_from(len) else {
        // Unreachable while `Append` stops at MAX_FRAME_LEN, which fits a u32; kept as an
        // error so that a larger constant could never wrap the prefix silently.
        out.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    };
    out[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Decodes the first frame in `buf`, a sans-IO streaming decoder.
///
/// `buf` holds whatever the caller has received so far on one stream, starting at a frame
/// boundary. Returns:
///
/// - `Ok(None)` when `buf` holds only part of a frame: read more, append, call again. This is
///   the answer for every strict prefix of a valid frame, including the empty one.
/// - `Ok(Some((message, consumed)))` when the first frame is complete: drop `consumed` bytes
///   from the front of `buf`; any bytes after them are the start of the next frame.
/// - `Err(_)` when the stream is broken: close it with the error's [`CloseCode`] and drop the
///   buffer, since nothing after a bad frame can be trusted to start at a frame boundary.
///
/// The caller learns of an oversized frame from the first 4 bytes and of a wrong version from
/// the first 5, so it never needs to buffer more than [`MAX_FRAME_LEN`] + 4 bytes per stream.
///
/// # Errors
///
/// One [`DecodeError`] variant per way a frame can be wrong; see each variant.
///
/// [`CloseCode`]: crate::wire::CloseCode
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = usize::try_from(u32::from_be_bytes(*prefix)).unwrap_or(usize::MAX);
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if len == 0 {
        return Err(DecodeError::Malformed(
            "zero-length frame has no version byte",
        ));
    }
    if let Some(&version) = buf.get(LEN_PREFIX)
        && version != PROTOCOL_VERSION
    {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let end = LEN_PREFIX + len;
    let Some(payload) = buf.get(LEN_PREFIX + 1..end) else {
        return Ok(None);
    };
    let message = decode_payload(payload)?;
    Ok(Some((message, end)))
}

/// Decodes one message that must fill `payload` exactly.
fn decode_payload(payload: &[u8]) -> Result<Message, DecodeError> {
    // A violation recorded by an earlier call that failed elsewhere must not be blamed on this
    // payload.
    cap::take_violation();
    match postcard::take_from_bytes::<Message>(payload) {
        Ok((message, [])) => Ok(message),
        Ok((_, rest)) => Err(DecodeError::TrailingBytes { len: rest.len() }),
        Err(err) => Err(match cap::take_violation() {
            Some(violation) => violation.into_decode_error(),
            None => DecodeError::Malformed(malformed_reason(&err)),
        }),
    }
}

/// The [`EncodeError`] for a failed serialization of `message`.
fn encode_error(message: &Message, err: postcard::Error) -> EncodeError {
    if let Some(violation) = cap::take_violation() {
        return violation.into_encode_error();
    }
    if err == postcard::Error::SerializeBufferFull {
        // Only `Append` reports a full buffer, when the frame outgrew MAX_FRAME_LEN; measure the
        // whole message once more so that the error says by how much. The measuring pass reads
        // the parts the first pass never reached, so it may find a broken cap there instead,
        // which is the more useful error: a split fixes both.
        let len = match postcard::serialize_with_flavor(message, Size::default()) {
            Ok(payload) => 1 + payload,
            Err(_) => match cap::take_violation() {
                Some(violation) => return violation.into_encode_error(),
                None => MAX_FRAME_LEN + 1,
            },
        };
        return EncodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        };
    }
    EncodeError::Unencodable(match err {
        postcard::Error::SerdeSerCustom => "a value refused to serialize",
        postcard::Error::CollectStrError => "a value failed to format itself",
        _ => "postcard refused the message",
    })
}

/// What a postcard error means for a frame from the network, in words for the logs.
fn malformed_reason(err: &postcard::Error) -> &'static str {
    use postcard::Error as E;
    match err {
        E::DeserializeUnexpectedEnd => "the payload ends inside a value",
        E::DeserializeBadVarint => "an integer is encoded with too many bytes for its type",
        E::DeserializeBadBool => "a boolean is neither 0 nor 1",
        E::DeserializeBadChar => "a char is not a Unicode scalar value",
        E::DeserializeBadUtf8 => "a string is not valid UTF-8",
        E::DeserializeBadOption => "an option's tag is neither 0 nor 1",
        E::DeserializeBadEnum => "an enum's variant index does not fit a u32",
        // serde's own checks, which postcard reports without their message: an unknown variant
        // index, a zero where a NonZero is required, an unknown close code.
        E::SerdeDeCustom => "a value is out of range for its type",
        _ => "the payload is not a valid message",
    }
}

/// Bytes of the length prefix in front of every frame.
const LEN_PREFIX: usize = 4;

/// A postcard output that appends to the caller's `Vec` and refuses to grow it past `limit`,
/// so a message far over [`MAX_FRAME_LEN`] costs one frame's worth of memory, not its own size.
struct Append<'a> {
    out: &'a mut Vec<u8>,
    /// The length `out` may reach: where this frame started, plus a maximal frame.
    limit: usize,
}

impl Flavor for Append<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        if self.out.len() >= self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.out.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        if self.out.len().saturating_add(bytes.len()) > self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The capped (de)serializers the message fields name with `#[serde(with = "...")]`:
/// [`cap::list`] for every `Vec`, [`cap::key`] for every key.
///
/// They enforce the caps from the length prefix, before anything is allocated. One wrinkle:
/// postcard turns every custom serde error into a bare `SerdeDeCustom` (or `SerdeSerCustom`)
/// that drops its message, so the error value cannot say which cap was broken or by how much.
/// The caps therefore leave the precise [`Violation`] in a thread-local slot just before they
/// fail, and [`encode_frame`]/[`decode_frame`] pick it up right after postcard returns, on the
/// same thread, in the same call. Both clear the slot before they start, so a violation from a
/// call that failed elsewhere (or from these helpers used with another serde format) is never
/// blamed on the next frame.
pub(crate) mod cap {
    use std::cell::Cell;

    use super::Violation;

    thread_local! {
        /// The cap the last failing (de)serialization on this thread broke, if any.
        pub(super) static VIOLATION: Cell<Option<Violation>> = const { Cell::new(None) };
    }

    /// Remembers `violation` and returns the serde error that aborts the deserialization.
    fn refuse_de<E: serde::de::Error>(violation: Violation) -> E {
        VIOLATION.set(Some(violation));
        E::custom(violation)
    }

    /// Remembers `violation` and returns the serde error that aborts the serialization.
    fn refuse_ser<E: serde::ser::Error>(violation: Violation) -> E {
        VIOLATION.set(Some(violation));
        E::custom(violation)
    }

    /// The violation recorded since the last call, if any; clears the slot.
    pub(super) fn take_violation() -> Option<Violation> {
        VIOLATION.take()
    }

    /// Lists of at most [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH) items.
    pub(crate) mod list {
        use std::{fmt, marker::PhantomData};

        use serde::{
            Deserialize, Deserializer, Serialize, Serializer,
            de::{SeqAccess, Visitor},
        };

        use super::{super::Violation, refuse_de, refuse_ser};
        use crate::wire::MAX_KEYS_PER_BATCH;

        /// How many items a list reserves room for before any arrives. A length prefix is a
        /// claim, not a fact: a 10-byte frame may claim a thousand entries. Reserving for the
        /// claim would let it cost a thousand entries' memory, so we reserve a little and let
        /// the `Vec` grow as items really arrive (a handful of reallocations for a full batch).
        const RESERVE_ITEMS: usize = 64;

        /// Refuses a list over the cap; otherwise writes it as postcard's length-prefixed list.
        pub(crate) fn serialize<S: Serializer, T: Serialize>(
            items: &[T],
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            if items.len() > MAX_KEYS_PER_BATCH {
                let violation = Violation::TooManyKeys { len: items.len() };
                return Err(refuse_ser(violation));
            }
            serializer.collect_seq(items)
        }

        /// Reads a list, refusing it from its length prefix when that is over the cap.
        pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
            deserializer: D,
        ) -> Result<Vec<T>, D::Error> {
            deserializer.deserialize_seq(ListVisitor(PhantomData))
        }

        struct ListVisitor<T>(PhantomData<fn() -> T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = Vec<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX_KEYS_PER_BATCH} items")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                // postcard hands us the declared length before any item is read, but only when
                // it is no more than the bytes left in the frame (each item takes at least one).
                // A claim the frame cannot back shows up as `None`: we then reserve nothing, and
                // reading fails as malformed when the bytes run out, a frame's worth of items at
                // most. Either way the claim itself is never allocated for.
                let declared = seq.size_hint().unwrap_or(0);
                if declared > MAX_KEYS_PER_BATCH {
                    let violation = Violation::TooManyKeys { len: declared };
                    return Err(refuse_de(violation));
                }
                let mut items = Vec::with_capacity(declared.min(RESERVE_ITEMS));
                while let Some(item) = seq.next_element()? {
                    // Only reachable with a format that does not announce lengths.
                    if items.len() == MAX_KEYS_PER_BATCH {
                        let violation = Violation::TooManyKeys {
                            len: items.len() + 1,
                        };
                        return Err(refuse_de(violation));
                    }
                    items.push(item);
                }
                Ok(items)
            }
        }
    }

    /// Keys of at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    pub(crate) mod key {
        use std::fmt;

        use serde::{
            Deserializer, Serializer,
            de::{self, Visitor},
        };

        use super::{super::Violation, refuse_de, refuse_ser};
        use crate::wire::MAX_KEY_LEN;

        /// Refuses a key over the cap; otherwise writes it as a string.
        pub(crate) fn serialize<S: Serializer>(
            key: &str,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            if key.len() > MAX_KEY_LEN {
                let violation = Violation::KeyTooLong { len: key.len() };
                return Err(refuse_ser(violation));
            }
            serializer.serialize_str(key)
        }

        /// Reads a key, refusing it before it is copied out of the frame when it is over the
        /// cap. (postcard checks a string's length prefix against the bytes actually present
        /// and lends us the bytes in place, so the only allocation is the accepted key's own.)
        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<String, D::Error> {
            deserializer.deserialize_string(KeyVisitor)
        }

        struct KeyVisitor;

        impl KeyVisitor {
            fn check<E: de::Error>(len: usize) -> Result<(), E> {
                if len > MAX_KEY_LEN {
                    let violation = Violation::KeyTooLong { len };
                    return Err(refuse_de(violation));
                }
                Ok(())
            }
        }

        impl Visitor<'_> for KeyVisitor {
            type Value = String;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a key of at most {MAX_KEY_LEN} bytes")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
                Self::check(key.len())?;
                Ok(key.to_owned())
            }

            fn visit_string<E: de::Error>(self, key: String) -> Result<String, E> {
                Self::check(key.len())?;
                Ok(key)
            }
        }
    }
}

/// A cap broken while encoding or decoding, with the figures for the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A list of `len` items, over [`MAX_KEYS_PER_BATCH`].
    TooManyKeys { len: usize },
    /// A key of `len` bytes, over [`MAX_KEY_LEN`].
    KeyTooLong { len: usize },
}

impl Violation {
    fn into_decode_error(self) -> DecodeError {
        match self {
            Violation::TooManyKeys { len } => DecodeError::TooManyKeys {
                len,
                max: MAX_KEYS_PER_BATCH,
            },
            Violation::KeyTooLong { len } => DecodeError::KeyTooLong {
                len,
                max: MAX_KEY_LEN,
            },
        }
    }

    fn into_encode_error(self) -> EncodeError {
        match self {
            Violation::TooManyKeys { len } => EncodeError::TooManyKeys {
                len,
                max: MAX_KEYS_PER_BATCH,
            },
            Violation::KeyTooLong { len } => EncodeError::KeyTooLong {
                len,
                max: MAX_KEY_LEN,
            },
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::TooManyKeys { len } => {
                write!(
                    f,
                    "a list of {len} items is over the cap of {MAX_KEYS_PER_BATCH}"
                )
            }
            Violation::KeyTooLong { len } => {
                write!(f, "a key of {len} bytes is over the cap of {MAX_KEY_LEN}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LimitId;
    use crate::wire::{SyncBatch, SyncEntry};

    fn batch(keys: usize, key_len: usize) -> Message {
        let entry = SyncEntry {
            limit: LimitId(1),
            key: "k".repeat(key_len),
            window: 7,
            used: 3,
            released: 0,
            want: 0,
        };
        SyncBatch {
            entries: vec![entry; keys],
        }
        .into()
    }

    #[test]
    fn a_stale_violation_is_not_blamed_on_the_next_frame() {
        let mut out = Vec::new();
        assert!(encode_frame(&batch(1, MAX_KEY_LEN + 1), &mut out).is_err());
        // Leave a violation behind on purpose, as a failed call through another format would.
        cap::VIOLATION.set(Some(Violation::KeyTooLong { len: 9 }));
        let frame = [0, 0, 0, 2, PROTOCOL_VERSION, 0xff];
        assert!(matches!(
            decode_frame(&frame),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_failed_encode_leaves_the_buffer_as_it_was() {
        let mut out = vec![1, 2, 3];
        let err = encode_frame(&batch(MAX_KEYS_PER_BATCH + 1, 1), &mut out);
        assert_eq!(
            err,
            Err(EncodeError::TooManyKeys {
                len: MAX_KEYS_PER_BATCH + 1,
                max: MAX_KEYS_PER_BATCH
            })
        );
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn an_oversized_message_stops_at_one_frame_and_reports_its_size() {
        let yaml = "x".repeat(3 * MAX_FRAME_LEN);
        let push = Message::RuleSetPush(crate::wire::RuleSetPush { version: 1, yaml });
        let mut out = Vec::new();
        let Err(EncodeError::FrameTooLarge { len, max }) = encode_frame(&push, &mut out) else {
            panic!("an oversized frame must be refused");
        };
        assert_eq!(max, MAX_FRAME_LEN);
        // version byte + variant index + version + a 4-byte varint length + the text.
        assert_eq!(len, 1 + 1 + 1 + 4 + 3 * MAX_FRAME_LEN);
        assert!(out.is_empty());
        assert!(out.capacity() <= 2 * (MAX_FRAME_LEN + LEN_PREFIX));
    }

    #[test]
    fn a_broken_cap_beyond_the_frame_limit_is_reported_as_the_cap() {
        // The region name alone overflows the frame before the encoder reaches the list.
        let report = crate::wire::Report {
            region: "r".repeat(2 * MAX_FRAME_LEN),
            interval: crate::Nanos(1),
            edges: 0,
            demand: vec![],
            hot_keys: vec![
                crate::wire::HotKeyDemand {
                    limit: LimitId(1),
                    key: "k".into(),
                    window: 1,
                    used: 1,
                    denied: 0,
                    partition: 1,
                };
                MAX_KEYS_PER_BATCH + 1
            ],
        };
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(&report.into(), &mut out),
            Err(EncodeError::TooManyKeys {
                len: MAX_KEYS_PER_BATCH + 1,
                max: MAX_KEYS_PER_BATCH
            })
        );
    }
}

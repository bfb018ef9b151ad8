//! The wire codec through its public API (DESIGN §5): every message survives a round trip, a
//! frame's layout is pinned byte for byte, and no input, however broken or hostile, panics the
//! decoder, makes it allocate past the caps, or is refused with the wrong error or close code.

use std::num::NonZeroU32;

use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config as ProptestConfig, FileFailurePersistence},
};
use shared::{
    LimitId, Nanos,
    wire::{
        AckEntry, Acquire, AcquireReply, Check, CheckOutcome, CloseCode, Confirm, DecodeError,
        EdgeHolding, EncodeError, ErrorNotice, Hello, HotKey, HotKeyDemand, KeyHolding,
        KeyPartition, KeyQuery, KeyReport, LimitPartition, MAX_FRAME_LEN, MAX_KEY_LEN,
        MAX_KEYS_PER_BATCH, Message, PROTOCOL_VERSION, Partitions, QuotaReply, QuotaRequest,
        Refusal, Refused, Release, Report, ReportAck, Role, RuleDemand, RuleSetAck, RuleSetPush,
        RuleShare, SyncAck, SyncBatch, SyncEntry, TransferGrant, Welcome, decode_frame,
        encode_frame,
    },
};

/// Seeds of failing cases are kept beside this file, in `wire.regressions`, and committed.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_message_round_trips(message in message()) {
        let frame = encode(&message);
        prop_assert_eq!(decode_frame(&frame), Ok(Some((message, frame.len()))));
    }

    #[test]
    fn frames_decode_one_after_another(first in message(), second in message()) {
        let mut stream = encode(&first);
        encode_frame(&second, &mut stream).unwrap();
        let (got, used) = decode_frame(&stream).unwrap().unwrap();
        prop_assert_eq!(got, first);
        prop_assert_eq!(decode_frame(&stream[used..]), Ok(Some((second, stream.len() - used))));
    }

    #[test]
    fn every_truncation_of_a_frame_is_incomplete(message in message()) {
        let frame = encode(&message);
        for end in 0..frame.len() {
            prop_assert_eq!(decode_frame(&frame[..end]), Ok(None), "prefix of {} bytes", end);
        }
    }

    #[test]
    fn a_corrupted_frame_decodes_or_fails_cleanly(
        message in message(),
        at in any::<prop::sample::Index>(),
        flip in 1..=u8::MAX,
    ) {
        let mut frame = encode(&message);
        let at = at.index(frame.len());
        frame[at] ^= flip;
        assert_decodes_or_fails_cleanly(&frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        assert_decodes_or_fails_cleanly(&bytes);
    }

    /// Arbitrary bytes behind a valid header, so that they reach the payload decoder instead of
    /// stopping at the length or the version.
    #[test]
    fn arbitrary_payloads_never_panic(payload in vec(any::<u8>(), 0..512)) {
        assert_decodes_or_fails_cleanly(&frame_of(&payload));
    }

    /// Arbitrary bytes after a real message's variant index, so that they reach that message's
    /// fields.
    #[test]
    fn arbitrary_fields_never_panic(message in message(), fields in vec(any::<u8>(), 0..256)) {
        let mut payload = payload_of(&message)[..1].to_vec();
        payload.extend_from_slice(&fields);
        assert_decodes_or_fails_cleanly(&frame_of(&payload));
    }
}

/// Whatever `bytes` are, the decoder answers; when it decodes a message, that message encodes
/// and decodes to itself again (the fuzz target's property).
fn assert_decodes_or_fails_cleanly(bytes: &[u8]) {
    if let Ok(Some((message, used))) = decode_frame(bytes) {
        assert!(used <= bytes.len());
        let again = encode(&message);
        assert!(again.len() <= used, "re-encoding never grows a frame");
        assert_eq!(decode_frame(&again), Ok(Some((message, again.len()))));
    }
}

// ---------------------------------------------------------------------------------------------
// The frame's layout

/// The layout is the contract between versions: if this test has to change, so does
/// PROTOCOL_VERSION (see the version rule in `shared::wire`).
#[test]
fn frame_layout_is_pinned() {
    let message = Message::SyncBatch(SyncBatch {
        entries: vec![SyncEntry {
            limit: LimitId(1),
            key: "ab".into(),
            window: 2,
            used: 3,
            released: 300,
            want: 5,
        }],
    });
    let frame = encode(&message);
    #[rustfmt::skip]
    let expected = [
        0, 0, 0, 12,      // length of what follows, big-endian
        PROTOCOL_VERSION, // version
        3,                // Message::SyncBatch, the fourth variant
        1,                // one entry
        1,                // limit
        2, b'a', b'b',    // key
        2, 3,             // window, used
        0xac, 0x02,       // released: 300 as a varint
        5,                // want
    ];
    assert_eq!(frame, expected);
    assert_eq!(PROTOCOL_VERSION, 5);
}

#[test]
fn a_frame_arriving_byte_by_byte_is_incomplete_until_its_last_byte() {
    let message = sync_batch(3, 10);
    let frame = encode(&message);
    let mut buf = Vec::new();
    for (i, byte) in frame.iter().enumerate() {
        buf.push(*byte);
        let expected = if i + 1 == frame.len() {
            Some((message.clone(), frame.len()))
        } else {
            None
        };
        assert_eq!(decode_frame(&buf), Ok(expected));
    }
}

#[test]
fn encode_appends_after_what_is_already_buffered() {
    let mut out = vec![0xee];
    encode_frame(&sync_batch(1, 1), &mut out).unwrap();
    assert_eq!(out[0], 0xee);
    assert_eq!(
        decode_frame(&out[1..]),
        Ok(Some((sync_batch(1, 1), out.len() - 1)))
    );
}

// ---------------------------------------------------------------------------------------------
// Frame size and version, refused before the body arrives

#[test]
fn an_oversized_length_is_refused_from_the_prefix_alone() {
    let len = MAX_FRAME_LEN + 1;
    let header = header(len, PROTOCOL_VERSION);
    let expected = DecodeError::FrameTooLarge {
        len,
        max: MAX_FRAME_LEN,
    };
    assert_eq!(
        decode_frame(&header),
        Err(expected.clone()),
        "five bytes are enough"
    );
    assert_eq!(
        decode_frame(&header[..4]),
        Err(expected.clone()),
        "so are four"
    );
    assert_eq!(CloseCode::from(&expected), CloseCode::FrameTooLarge);

    let huge = [0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        decode_frame(&huge),
        Err(DecodeError::FrameTooLarge {
            len: u32::MAX as usize,
            max: MAX_FRAME_LEN
        })
    );
}

#[test]
fn the_largest_frame_is_accepted() {
    // A rule set whose YAML fills the frame exactly: version byte, variant, version 1, a
    // 3-byte varint length, then the text.
    let yaml = "#".repeat(MAX_FRAME_LEN - 6);
    let message = Message::RuleSetPush(RuleSetPush { version: 1, yaml });
    let frame = encode(&message);
    assert_eq!(frame.len(), 4 + MAX_FRAME_LEN);
    assert_eq!(decode_frame(&frame), Ok(Some((message, frame.len()))));
}

#[test]
fn a_message_over_the_frame_size_is_not_encoded() {
    let yaml = "#".repeat(MAX_FRAME_LEN - 5);
    let message = Message::RuleSetPush(RuleSetPush { version: 1, yaml });
    let mut out = vec![7];
    assert_eq!(
        encode_frame(&message, &mut out),
        Err(EncodeError::FrameTooLarge {
            len: MAX_FRAME_LEN + 1,
            max: MAX_FRAME_LEN
        })
    );
    assert_eq!(out, [7], "a refused frame leaves the buffer as it was");
}

#[test]
fn a_zero_length_frame_is_malformed() {
    let err = decode_frame(&[0, 0, 0, 0]).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
    assert_eq!(CloseCode::from(&err), CloseCode::Malformed);
}

#[test]
fn another_version_is_refused_from_the_version_byte() {
    let mut frame = encode(&sync_batch(2, 8));
    for version in [0, PROTOCOL_VERSION + 1, u8::MAX] {
        frame[4] = version;
        let expected = Err(DecodeError::UnsupportedVersion(version));
        assert_eq!(decode_frame(&frame), expected);
        assert_eq!(
            decode_frame(&frame[..5]),
            expected,
            "before the body arrives"
        );
        assert_eq!(
            CloseCode::from(&DecodeError::UnsupportedVersion(version)),
            CloseCode::UnsupportedVersion
        );
    }
}

#[test]
fn bytes_after_the_message_are_refused() {
    let mut payload = payload_of(&sync_batch(1, 4));
    payload.extend_from_slice(&[0, 0]);
    let err = decode_frame(&frame_of(&payload)).unwrap_err();
    assert_eq!(err, DecodeError::TrailingBytes { len: 2 });
    assert_eq!(CloseCode::from(&err), CloseCode::Malformed);
}

// ---------------------------------------------------------------------------------------------
// Caps on lists and keys

#[test]
fn a_list_at_the_cap_is_accepted_and_one_more_is_refused() {
    let full = sync_batch(MAX_KEYS_PER_BATCH, 8);
    let frame = encode(&full);
    assert_eq!(decode_frame(&frame), Ok(Some((full, frame.len()))));

    // The same batch with one more entry, written by hand since the encoder refuses it.
    let mut payload = vec![variant_index(&sync_batch(0, 0))];
    payload.extend(varint(MAX_KEYS_PER_BATCH as u64 + 1));
    for _ in 0..=MAX_KEYS_PER_BATCH {
        payload.extend(entry_bytes(8));
    }
    let err = decode_frame(&frame_of(&payload)).unwrap_err();
    let expected = DecodeError::TooManyKeys {
        len: MAX_KEYS_PER_BATCH + 1,
        max: MAX_KEYS_PER_BATCH,
    };
    assert_eq!(err, expected);
    assert_eq!(CloseCode::from(&err), CloseCode::TooManyKeys);

    let mut out = Vec::new();
    assert_eq!(
        encode_frame(&sync_batch(MAX_KEYS_PER_BATCH + 1, 8), &mut out),
        Err(EncodeError::TooManyKeys {
            len: MAX_KEYS_PER_BATCH + 1,
            max: MAX_KEYS_PER_BATCH
        })
    );
    assert!(out.is_empty());
}

#[test]
fn every_list_is_capped() {
    let over = MAX_KEYS_PER_BATCH + 1;
    let limit = LimitId(1);
    let k = || "k".to_string();
    let report = Report {
        region: "eu".into(),
        interval: Nanos(1),
        edges: 1,
        demand: vec![],
        hot_keys: vec![],
    };
    let partitions = Partitions {
        version: 1,
        rules: vec![],
        keys: vec![],
    };
    let sync_ack = SyncAck {
        entries: vec![],
        hot_keys: vec![],
        partitions: vec![],
        recalls: vec![],
    };
    let ack = AckEntry {
        limit,
        key: k(),
        window: 1,
        granted: 1,
        total: 1,
        edges: 1,
        hot: false,
        used: 0,
        released: 0,
        near_limit: false,
        recall: false,
    };
    let outcome = CheckOutcome {
        allowed: true,
        remaining: 1,
        reset_at: Nanos(1),
        granted: 1,
    };
    let demand = RuleDemand {
        limit,
        used: 1,
        denied: 0,
        granted: 1,
        utilisation_ppm: 1,
    };
    let hot = HotKeyDemand {
        limit,
        key: k(),
        window: 1,
        used: 1,
        denied: 0,
        partition: 1,
    };
    let key_partition = KeyPartition {
        limit,
        key: k(),
        window: 1,
        partition: 1,
    };
    let messages: Vec<Message> = vec![
        SyncAck {
            entries: vec![ack; over],
            ..sync_ack.clone()
        }
        .into(),
        SyncAck {
            hot_keys: vec![
                HotKey {
                    limit,
                    key: k(),
                    window: 1
                };
                over
            ],
            ..sync_ack.clone()
        }
        .into(),
        SyncAck {
            partitions: vec![
                LimitPartition {
                    limit,
                    partition: 1
                };
                over
            ],
            ..sync_ack.clone()
        }
        .into(),
        SyncAck {
            recalls: vec![
                HotKey {
                    limit,
                    key: k(),
                    window: 1
                };
                over
            ],
            ..sync_ack
        }
        .into(),
        Acquire {
            request_id: 1,
            checks: vec![
                Check {
                    limit,
                    key: k(),
                    window: 1,
                    cost: NonZeroU32::MIN,
                    want: 0,
                };
                over
            ],
        }
        .into(),
        AcquireReply {
            request_id: 1,
            allowed: true,
            checks: vec![outcome; over],
            reset_at: Nanos(1),
            retry_after: Nanos(0),
        }
        .into(),
        Report {
            demand: vec![demand; over],
            ..report.clone()
        }
        .into(),
        Report {
            hot_keys: vec![hot; over],
            ..report
        }
        .into(),
        Partitions {
            rules: vec![
                RuleShare {
                    limit,
                    share_ppm: 1,
                    from_window: 0
                };
                over
            ],
            ..partitions.clone()
        }
        .into(),
        Partitions {
            keys: vec![key_partition; over],
            ..partitions
        }
        .into(),
    ];
    for message in &messages {
        let mut out = Vec::new();
        assert_eq!(
            encode_frame(message, &mut out),
            Err(EncodeError::TooManyKeys {
                len: over,
                max: MAX_KEYS_PER_BATCH
            }),
            "{}",
            message.kind()
        );
    }
}

#[test]
fn a_key_at_the_cap_is_accepted_and_one_byte_more_is_refused() {
    let at_cap = sync_batch(1, MAX_KEY_LEN);
    let frame = encode(&at_cap);
    assert_eq!(
        decode_frame(&frame),
        Ok(Some((at_cap.clone(), frame.len())))
    );

    // The hand-written entry matches what the encoder writes at the cap...
    let mut payload = vec![variant_index(&at_cap), 1];
    payload.extend(entry_bytes(MAX_KEY_LEN));
    assert_eq!(frame_of(&payload), frame);

    // ...so one byte more is the same batch with a key over the cap.
    let mut payload = vec![variant_index(&at_cap), 1];
    payload.extend(entry_bytes(MAX_KEY_LEN + 1));
    let err = decode_frame(&frame_of(&payload)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::KeyTooLong {
            len: MAX_KEY_LEN + 1,
            max: MAX_KEY_LEN
        }
    );
    assert_eq!(CloseCode::from(&err), CloseCode::KeyTooLong);

    let mut out = Vec::new();
    assert_eq!(
        encode_frame(&sync_batch(1, MAX_KEY_LEN + 1), &mut out),
        Err(EncodeError::KeyTooLong {
            len: MAX_KEY_LEN + 1,
            max: MAX_KEY_LEN
        })
    );
}

#[test]
fn the_cap_counts_bytes_not_chars() {
    // 65 four-byte chars: 260 bytes, over the cap although only 65 chars.
    let key = "🦀".repeat(65);
    let message = Message::QuotaRequest(QuotaRequest {
        request_id: 1,
        limit: LimitId(1),
        key,
        window: 1,
        wanted: 1,
    });
    let mut out = Vec::new();
    assert_eq!(
        encode_frame(&message, &mut out),
        Err(EncodeError::KeyTooLong {
            len: 260,
            max: MAX_KEY_LEN
        })
    );
}

/// A list's length prefix over the cap is refused from the prefix alone, and a frame of a few
/// bytes that claims a list of 2^62 entries fails as soon as its bytes run out: neither
/// allocates for the claim (an allocation that size would abort the process).
#[test]
fn a_huge_declared_length_in_a_small_frame_allocates_nothing() {
    let batch = variant_index(&sync_batch(0, 0));

    // Enough bytes follow to back the claim, but they are zeros, which read as 5-byte entries:
    // only the prefix check can make this TooManyKeys rather than Malformed.
    let mut payload = vec![batch];
    payload.extend(varint(MAX_KEYS_PER_BATCH as u64 + 1));
    payload.extend(vec![0; MAX_KEYS_PER_BATCH + 1]);
    let err = decode_frame(&frame_of(&payload)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooManyKeys {
            len: MAX_KEYS_PER_BATCH + 1,
            max: MAX_KEYS_PER_BATCH
        }
    );
    assert_eq!(CloseCode::from(&err), CloseCode::TooManyKeys);

    // A claim no frame could back: postcard compares it with the bytes left and hides it, and
    // reading fails at the first missing byte.
    for claim in [
        1 << 62,
        u64::MAX,
        MAX_KEYS_PER_BATCH as u64 + 1,
        MAX_KEYS_PER_BATCH as u64,
    ] {
        let mut payload = vec![batch];
        payload.extend(varint(claim));
        payload.extend(entry_bytes(3));
        let err = decode_frame(&frame_of(&payload)).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{claim}: {err:?}");
        assert_eq!(CloseCode::from(&err), CloseCode::Malformed);
    }

    // A key that claims 2^62 bytes: postcard checks the claim against the bytes present before
    // it lends them to us, so this too fails without allocating.
    let mut payload = vec![batch, 1, 1];
    payload.extend(varint(1 << 62));
    payload.extend_from_slice(b"abc");
    let err = decode_frame(&frame_of(&payload)).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");

    // A free-text string (a rule set's YAML) that claims more than the frame holds.
    let mut payload = vec![variant_index(&rule_set_push("")), 1];
    payload.extend(varint(u64::MAX >> 1));
    let err = decode_frame(&frame_of(&payload)).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err:?}");
}

/// The caps are consistent: the biggest message each list-carrying variant can hold, every list
/// full, every key at its longest and every integer at its widest, fits in one frame. So a sender
/// that cuts batches by count never meets MAX_FRAME_LEN.
#[test]
fn the_largest_messages_the_caps_allow_fit_in_a_frame() {
    let key = || "k".repeat(MAX_KEY_LEN);
    let n = MAX_KEYS_PER_BATCH;
    let limit = LimitId(u64::MAX);
    let messages: Vec<Message> = vec![
        SyncBatch {
            entries: vec![
                SyncEntry {
                    limit,
                    key: key(),
                    window: u64::MAX,
                    used: u64::MAX,
                    released: u64::MAX,
                    want: 0,
                };
                n
            ],
        }
        .into(),
        SyncAck {
            entries: vec![
                AckEntry {
                    limit,
                    key: key(),
                    window: u64::MAX,
                    granted: u64::MAX,
                    total: u64::MAX,
                    edges: u32::MAX,
                    hot: true,
                    used: 0,
                    released: 0,
                    near_limit: false,
                    recall: false,
                };
                n
            ],
            hot_keys: vec![
                HotKey {
                    limit,
                    key: key(),
                    window: u64::MAX
                };
                n
            ],
            partitions: vec![
                LimitPartition {
                    limit,
                    partition: u64::MAX
                };
                n
            ],
            recalls: vec![
                HotKey {
                    limit,
                    key: key(),
                    window: u64::MAX
                };
                n
            ],
        }
        .into(),
        Acquire {
            request_id: u64::MAX,
            checks: vec![
                Check {
                    limit,
                    key: key(),
                    window: u64::MAX,
                    cost: NonZeroU32::MAX,
                    want: 0,
                };
                n
            ],
        }
        .into(),
        AcquireReply {
            request_id: u64::MAX,
            allowed: true,
            checks: vec![
                CheckOutcome {
                    allowed: true,
                    remaining: u64::MAX,
                    reset_at: Nanos::MAX,
                    granted: u64::MAX
                };
                n
            ],
            reset_at: Nanos::MAX,
            retry_after: Nanos::MAX,
        }
        .into(),
        Report {
            region: key(),
            interval: Nanos::MAX,
            edges: u32::MAX,
            demand: vec![
                RuleDemand {
                    limit,
                    used: u64::MAX,
                    denied: u64::MAX,
                    granted: u64::MAX,
                    utilisation_ppm: u32::MAX,
                };
                n
            ],
            hot_keys: vec![
                HotKeyDemand {
                    limit,
                    key: key(),
                    window: u64::MAX,
                    used: u64::MAX,
                    denied: u64::MAX,
                    partition: u64::MAX,
                };
                n
            ],
        }
        .into(),
        Partitions {
            version: u64::MAX,
            rules: vec![
                RuleShare {
                    limit,
                    share_ppm: u32::MAX,
                    from_window: u64::MAX
                };
                n
            ],
            keys: vec![
                KeyPartition {
                    limit,
                    key: key(),
                    window: u64::MAX,
                    partition: u64::MAX
                };
                n
            ],
        }
        .into(),
    ];
    for message in messages {
        let frame = encode(&message);
        assert!(
            frame.len() < MAX_FRAME_LEN,
            "{}: {} bytes",
            message.kind(),
            frame.len()
        );
        assert_eq!(decode_frame(&frame), Ok(Some((message, frame.len()))));
    }
}

// ---------------------------------------------------------------------------------------------
// Values their types do not allow

#[test]
fn values_out_of_range_are_malformed() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown variant index", vec![99]),
        ("zero cost", {
            let message = Message::Acquire(Acquire {
                request_id: 5,
                checks: vec![Check {
                    limit: LimitId(1),
                    key: "k".into(),
                    window: 1,
                    cost: NonZeroU32::MIN,
                    want: 0,
                }],
            });
            let mut payload = payload_of(&message);
            // The cost is the byte before `want` (a varint 0): a varint 1.
            let at = payload.len() - 2;
            payload[at] = 0;
            payload
        }),
        ("unknown close code", {
            let message = Message::Error(ErrorNotice {
                code: CloseCode::Normal,
                message: String::new(),
            });
            let mut payload = payload_of(&message);
            // The code is the byte after the variant index: a varint 0.
            payload[1] = 0x7f;
            payload
        }),
        ("bool that is not 0 or 1", {
            let message = Message::SyncAck(SyncAck {
                entries: vec![AckEntry {
                    limit: LimitId(1),
                    key: "k".into(),
                    window: 1,
                    granted: 1,
                    total: 1,
                    edges: 1,
                    hot: true,
                    used: 0,
                    released: 0,
                    near_limit: false,
                    recall: false,
                }],
                hot_keys: vec![],
                partitions: vec![],
                recalls: vec![],
            });
            let mut payload = payload_of(&message);
            // `recall` is the entry's last byte, before the empty hot-key and recall lists.
            let at = payload.len() - 3;
            payload[at] = 2;
            payload
        }),
        ("invalid UTF-8 in a key", {
            let mut payload = payload_of(&sync_batch(1, 2));
            payload[4] = 0xff;
            payload
        }),
    ];
    for (what, payload) in cases {
        let err = decode_frame(&frame_of(&payload)).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{what}: {err:?}");
        assert_eq!(CloseCode::from(&err), CloseCode::Malformed, "{what}");
    }
}

#[test]
fn close_codes_cross_the_wire_as_their_numbers() {
    let message = Message::Error(ErrorNotice {
        code: CloseCode::KeyTooLong,
        message: "x".into(),
    });
    let payload = payload_of(&message);
    assert_eq!(
        payload[1..3],
        varint(u64::from(CloseCode::KeyTooLong.as_u32()))[..]
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `message` encoded as one frame.
fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(message, &mut out).expect("the message is within the caps");
    out
}

/// `message`'s postcard payload, without the frame's header.
fn payload_of(message: &Message) -> Vec<u8> {
    encode(message)[5..].to_vec()
}

/// The byte that says which variant `message` is (all indices are below 128, so one byte).
fn variant_index(message: &Message) -> u8 {
    payload_of(message)[0]
}

/// A frame around `payload`, with a correct length and this build's version.
fn frame_of(payload: &[u8]) -> Vec<u8> {
    let mut frame = header(payload.len() + 1, PROTOCOL_VERSION);
    frame.extend_from_slice(payload);
    frame
}

fn header(len: usize, version: u8) -> Vec<u8> {
    let mut header = u32::try_from(len)
        .expect("tests write lengths that fit a u32")
        .to_be_bytes()
        .to_vec();
    header.push(version);
    header
}

/// postcard's varint: seven bits a byte, least significant first.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// One [`SyncEntry`] as `sync_batch` makes it, written by hand: limit, key, window, used,
/// released, in field order.
fn entry_bytes(key_len: usize) -> Vec<u8> {
    let mut out = varint(1);
    out.extend(varint(key_len as u64));
    out.extend(std::iter::repeat_n(b'k', key_len));
    out.extend([7, 3, 0, 0]); // window, used, released, want
    out
}

/// A batch of `keys` identical entries with keys of `key_len` bytes.
fn sync_batch(keys: usize, key_len: usize) -> Message {
    let entry = SyncEntry {
        limit: LimitId(1),
        key: "k".repeat(key_len),
        window: 7,
        used: 3,
        released: 0,
        want: 0,
    };
    Message::SyncBatch(SyncBatch {
        entries: vec![entry; keys],
    })
}

fn rule_set_push(yaml: &str) -> Message {
    Message::RuleSetPush(RuleSetPush {
        version: 1,
        yaml: yaml.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Strategies: arbitrary messages within the caps

/// Any message, every variant equally likely, lists short enough to keep cases fast (the caps
/// themselves are tested above).
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::from),
        welcome().prop_map(Message::from),
        (refusal(), text()).prop_map(|(reason, message)| Refused { reason, message }.into()),
        list(sync_entry()).prop_map(|entries| SyncBatch { entries }.into()),
        (
            list(ack_entry()),
            list(hot_key()),
            list(limit_partition()),
            list(hot_key())
        )
            .prop_map(|(entries, hot_keys, partitions, recalls)| SyncAck {
                entries,
                hot_keys,
                partitions,
                recalls,
            }
            .into()),
        (any::<u64>(), list(check())).prop_map(|(request_id, checks)| Acquire {
            request_id,
            checks
        }
        .into()),
        acquire_reply().prop_map(Message::from),
        (any::<u64>(), text()).prop_map(|(version, yaml)| RuleSetPush { version, yaml }.into()),
        (any::<u64>(), proptest::option::of(text())).prop_map(|(version, error)| RuleSetAck {
            version,
            error
        }
        .into()),
        report().prop_map(Message::from),
        (any::<u64>(), any::<u64>()).prop_map(|(rule_set_version, partitions_version)| {
            ReportAck {
                rule_set_version,
                partitions_version,
            }
            .into()
        }),
        (any::<u64>(), list(rule_share()), list(key_partition())).prop_map(
            |(version, rules, keys)| Partitions {
                version,
                rules,
                keys
            }
            .into()
        ),
        (
            any::<u64>(),
            any::<u64>(),
            key(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(transfer, limit, key, window, amount)| {
                Release {
                    transfer,
                    limit: LimitId(limit),
                    key,
                    window,
                    amount,
                }
                .into()
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(transfer, released)| Confirm {
            transfer,
            released
        }
        .into()),
        (
            any::<u64>(),
            any::<u64>(),
            key(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(transfer, limit, key, window, amount)| {
                TransferGrant {
                    transfer,
                    limit: LimitId(limit),
                    key,
                    window,
                    amount,
                }
                .into()
            }),
        (
            any::<u64>(),
            any::<u64>(),
            key(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(request_id, limit, key, window, wanted)| {
                QuotaRequest {
                    request_id,
                    limit: LimitId(limit),
                    key,
                    window,
                    wanted,
                }
                .into()
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(request_id, granted)| QuotaReply {
            request_id,
            granted
        }
        .into()),
        (close_code(), text()).prop_map(|(code, message)| ErrorNotice { code, message }.into()),
        key().prop_map(|key| KeyQuery { key }.into()),
        (key(), list(key_holding()))
            .prop_map(|(region, holdings)| KeyReport { region, holdings }.into()),
    ]
}

fn key_holding() -> impl Strategy<Value = KeyHolding> {
    let edge = (key(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(edge, granted, released, used)| EdgeHolding {
            edge,
            granted,
            released,
            used,
        },
    );
    (
        limit(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        list(edge),
    )
        .prop_map(
            |(limit, window, partition, total, exact, edges)| KeyHolding {
                limit,
                window,
                partition,
                total,
                exact,
                edges,
            },
        )
}

fn list<T: std::fmt::Debug>(item: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    vec(item, 0..8)
}

/// Any key within the cap: up to 64 chars of any kind, so at most 256 bytes.
fn key() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=64).prop_map(String::from_iter)
}

/// Free text (names, YAML, messages): not capped except by the frame.
fn text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..100).prop_map(String::from_iter)
}

fn limit() -> impl Strategy<Value = LimitId> {
    any::<u64>().prop_map(LimitId)
}

fn nanos() -> impl Strategy<Value = Nanos> {
    any::<u64>().prop_map(Nanos)
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Edge),
        Just(Role::Regional),
        Just(Role::Coordinator)
    ]
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        Just(Refusal::UnsupportedVersion),
        Just(Refusal::WrongRole),
        Just(Refusal::WrongRegion),
        Just(Refusal::Unauthorized),
        Just(Refusal::ShuttingDown),
    ]
}

fn close_code() -> impl Strategy<Value = CloseCode> {
    prop_oneof![
        Just(CloseCode::Normal),
        Just(CloseCode::ShuttingDown),
        Just(CloseCode::Internal),
        Just(CloseCode::FrameTooLarge),
        Just(CloseCode::UnsupportedVersion),
        Just(CloseCode::Malformed),
        Just(CloseCode::TooManyKeys),
        Just(CloseCode::KeyTooLong),
        Just(CloseCode::HandshakeRefused),
        Just(CloseCode::UnexpectedMessage),
        Just(CloseCode::HandshakeTimeout),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u8>(),
        text(),
        any::<u64>(),
        role(),
        text(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(
                protocol_version,
                node,
                incarnation,
                role,
                region,
                rule_set_version,
                answer_within_ms,
            )| {
                Hello {
                    protocol_version,
                    node,
                    incarnation,
                    role,
                    region,
                    rule_set_version,
                    answer_within_ms,
                }
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (any::<u8>(), text(), role(), text(), any::<u64>()).prop_map(
        |(protocol_version, node, role, region, rule_set_version)| Welcome {
            protocol_version,
            node,
            role,
            region,
            rule_set_version,
        },
    )
}

fn sync_entry() -> impl Strategy<Value = SyncEntry> {
    (
        limit(),
        key(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(limit, key, window, used, released, want)| SyncEntry {
            limit,
            key,
            window,
            used,
            released,
            want,
        })
}

fn ack_entry() -> impl Strategy<Value = AckEntry> {
    (
        limit(),
        key(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        (any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                limit,
                key,
                window,
                granted,
                total,
                edges,
                hot,
                (used, released, near_limit, recall),
            )| {
                AckEntry {
                    limit,
                    key,
                    window,
                    granted,
                    total,
                    edges,
                    hot,
                    used,
                    released,
                    near_limit,
                    recall,
                }
            },
        )
}

fn hot_key() -> impl Strategy<Value = HotKey> {
    (limit(), key(), any::<u64>()).prop_map(|(limit, key, window)| HotKey { limit, key, window })
}

fn limit_partition() -> impl Strategy<Value = LimitPartition> {
    (limit(), any::<u64>()).prop_map(|(limit, partition)| LimitPartition { limit, partition })
}

fn check() -> impl Strategy<Value = Check> {
    (
        limit(),
        key(),
        any::<u64>(),
        (1..=u32::MAX).prop_map(|n| NonZeroU32::new(n).expect("the range starts at 1")),
        any::<u64>(),
    )
        .prop_map(|(limit, key, window, cost, want)| Check {
            limit,
            key,
            window,
            cost,
            want,
        })
}

fn acquire_reply() -> impl Strategy<Value = AcquireReply> {
    let outcome = (any::<bool>(), any::<u64>(), nanos(), any::<u64>()).prop_map(
        |(allowed, remaining, reset_at, granted)| CheckOutcome {
            allowed,
            remaining,
            reset_at,
            granted,
        },
    );
    (any::<u64>(), any::<bool>(), list(outcome), nanos(), nanos()).prop_map(
        |(request_id, allowed, checks, reset_at, retry_after)| AcquireReply {
            request_id,
            allowed,
            checks,
            reset_at,
            retry_after,
        },
    )
}

fn report() -> impl Strategy<Value = Report> {
    let demand = (
        limit(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(limit, used, denied, granted, utilisation_ppm)| RuleDemand {
                limit,
                used,
                denied,
                granted,
                utilisation_ppm,
            },
        );
    let hot = (
        limit(),
        key(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(limit, key, window, used, denied, partition)| HotKeyDemand {
                limit,
                key,
                window,
                used,
                denied,
                partition,
            },
        );
    (text(), nanos(), any::<u32>(), list(demand), list(hot)).prop_map(
        |(region, interval, edges, demand, hot_keys)| Report {
            region,
            interval,
            edges,
            demand,
            hot_keys,
        },
    )
}

fn rule_share() -> impl Strategy<Value = RuleShare> {
    (limit(), any::<u32>(), any::<u64>()).prop_map(|(limit, share_ppm, from_window)| RuleShare {
        limit,
        share_ppm,
        from_window,
    })
}

fn key_partition() -> impl Strategy<Value = KeyPartition> {
    (limit(), key(), any::<u64>(), any::<u64>()).prop_map(|(limit, key, window, partition)| {
        KeyPartition {
            limit,
            key,
            window,
            partition,
        }
    })
}

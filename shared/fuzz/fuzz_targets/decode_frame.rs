//! Feeds raw bytes to `wire::decode_frame`, as a hostile peer would.
//!
//! The decoder must answer every input without panicking (libFuzzer reports a panic as a crash).
//! When it does decode a message, that message must survive a round trip: it encodes without
//! error (whatever the decoder accepts, the encoder may send), into no more bytes than it came
//! in (postcard accepts over-long varints, never writes them), and decodes to itself again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::wire::{decode_frame, encode_frame};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((message, consumed))) = decode_frame(data) else {
        return;
    };
    assert!(consumed <= data.len());

    let mut frame = Vec::new();
    encode_frame(&message, &mut frame).expect("a decoded message encodes again");
    assert!(frame.len() <= consumed);

    let again = decode_frame(&frame).expect("a re-encoded frame decodes");
    assert_eq!(again, Some((message, frame.len())));
});

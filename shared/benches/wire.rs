//! The frame codec: encoding and decoding one full-sized sync round (DESIGN §4), the messages
//! every edge sends and receives every flush interval, so their cost per key is what the
//! regional pays per key synced.
//!
//! Keys look like real ones (user ids of 8 to 12 bytes) and counters like real ones (a few
//! hundred, a few bytes as varints), so the numbers are the realistic case, not the widest one.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use shared::{
    LimitId,
    wire::{
        AckEntry, HotKey, LimitPartition, Message, SyncAck, SyncBatch, SyncEntry, decode_frame,
        encode_frame,
    },
};

/// Keys per message: one full batch at the default flush interval.
const KEYS: u64 = 1000;

/// The window index of a one-minute window in late 2026, as the varint it will really be.
const WINDOW: u64 = 29_880_000;

/// The `wire` group: encode and decode of a 1,000-key `SyncBatch` and `SyncAck`.
pub fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(KEYS));
    for (name, message) in [("sync_batch", sync_batch()), ("sync_ack", sync_ack())] {
        let mut frame = Vec::new();
        encode_frame(&message, &mut frame).expect("a 1,000-key message is within the caps");

        group.bench_with_input(BenchmarkId::new("encode", name), &message, |b, message| {
            let mut out = Vec::with_capacity(frame.len());
            b.iter(|| {
                out.clear();
                encode_frame(black_box(message), &mut out).expect("encodes");
                black_box(out.len())
            });
        });
        group.bench_with_input(BenchmarkId::new("decode", name), &frame, |b, frame| {
            b.iter(|| {
                decode_frame(black_box(frame))
                    .expect("decodes")
                    .expect("complete")
            });
        });
    }
    group.finish();
}

fn key(i: u64) -> String {
    format!("user-{i}")
}

fn sync_batch() -> Message {
    let entries = (0..KEYS)
        .map(|i| SyncEntry {
            limit: LimitId(i % 4),
            key: key(i),
            window: WINDOW,
            used: 100 + i % 300,
            released: i % 7,
            want: 0,
        })
        .collect();
    SyncBatch { entries }.into()
}

fn sync_ack() -> Message {
    let entries = (0..KEYS)
        .map(|i| AckEntry {
            limit: LimitId(i % 4),
            key: key(i),
            window: WINDOW,
            granted: 400 + i % 300,
            total: 2_000 + i,
            edges: 6,
            hot: i % 50 == 0,
            used: 0,
            released: 0,
            near_limit: false,
            recall: false,
        })
        .collect();
    let hot_keys = (0..KEYS)
        .step_by(50)
        .map(|i| HotKey {
            limit: LimitId(i % 4),
            key: key(i),
            window: WINDOW,
        })
        .collect();
    let partitions = (0..4)
        .map(|i| LimitPartition {
            limit: LimitId(i),
            partition: 1_000,
        })
        .collect();
    SyncAck {
        entries,
        hot_keys,
        partitions,
        recalls: Vec::new(),
    }
    .into()
}

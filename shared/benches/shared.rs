//! criterion benches for `shared`: algorithm steps, rule matching, frame codec. One binary.

use criterion::{criterion_group, criterion_main};

mod algorithms;
mod rules;
mod wire;

criterion_group!(benches, algorithms::bench, rules::bench, wire::bench);
criterion_main!(benches);

//! algorithms benches (being written).

pub fn bench(_c: &mut criterion::Criterion) {}

//! `/metrics` for every tier: a lock-free histogram, the text rendering of a registry, and the
//! small HTTP server a tier without an HTTP API of its own (the regional) serves it on.
//!
//! Metrics are [`prometheus_client`] ones, rendered as OpenMetrics text (which Prometheus
//! scrapes natively). Labels are per rule at most, never per key: a key is a user, and one
//! series per user would be a cardinality explosion in the monitoring system.
//!
//! Most of what a tier exports it already counts for its own reasons (atomics in the agent,
//! the regional, the breaker, the transport); a tier's collector reads those at scrape time,
//! so the hot paths pay nothing for metrics they did not already keep.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Response, StatusCode,
    header::{self, HeaderValue},
};
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

use crate::http;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Decision latency buckets, in nanoseconds: a local decision is well under a microsecond, an
/// exact one a few hundred, a fallback waits up to the timeout (50 ms by default).
pub const LATENCY_BUCKETS_NS: &[u64] = &[
    1_000,
    5_000,
    25_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    10_000_000,
    50_000_000,
    250_000_000,
];

/// Batch-size buckets, in entries: one key up to a full batch.
pub const SIZE_BUCKETS: &[u64] = &[1, 4, 16, 64, 256, 1024, 4096];

/// How many cache lines a striped metric spreads its counts over. A thread adds to the one its
/// thread-local index picks, so threads serving requests on different cores do not pass the
/// same line back and forth on every request (each pass costs about a hundred nanoseconds
/// when the counts are shared); reading sums the stripes.
pub const STRIPES: usize = 8;

/// This thread's stripe: threads take them in turn as they first count.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// Eight counts on a cache line of their own.
#[derive(Default)]
#[repr(align(64))]
struct Line([AtomicU64; 8]);

/// A count spread over [`STRIPES`] cache lines, added to without contention and summed when
/// read.
#[derive(Default)]
pub struct Striped {
    lines: [Line; STRIPES],
}

impl Striped {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.lines[stripe()].0[0].fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn sum(&self) -> u64 {
        self.lines
            .iter()
            .map(|l| l.0[0].load(Ordering::Relaxed))
            .sum()
    }
}

/// A Prometheus counter that is a [`Striped`] count: for counters every request adds to, where
/// prometheus-client's `Counter` is one atomic that every thread shares.
#[derive(Clone, Default)]
pub struct Counter(Arc<Striped>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.add(1);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.sum()
    }
}

impl fmt::Debug for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Counter").field(&self.get()).finish()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A histogram of integer observations with fixed bounds, updated with two relaxed atomic
/// adds on the observing thread's stripe (prometheus-client's own histogram takes a mutex per
/// observation, which every thread serving requests would contend on).
#[derive(Clone)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

struct HistogramInner {
    /// Upper bounds, ascending, in the observations' unit.
    bounds: &'static [u64],
    /// Observation units per exported unit (1e9 for nanoseconds exported as seconds). A
    /// divisor, not a factor: `1000 / 1e9` is exactly the double nearest 1e-6, `1000 · 1e-9`
    /// is not, and the bounds are label values.
    per_unit: f64,
    /// Cells per stripe: a count per bucket (not cumulative, the last one for everything
    /// above the last bound), then the sum; rounded up to whole lines.
    stride: usize,
    /// [`STRIPES`] runs of `stride` cells, each starting a line.
    lines: Box<[Line]>,
}

impl HistogramInner {
    fn cell(&self, stripe: usize, i: usize) -> &AtomicU64 {
        let at = stripe * self.stride + i;
        &self.lines[at / 8].0[at % 8]
    }

    /// Bucket `i` (or the sum, at `bounds.len() + 1`) over every stripe.
    fn total(&self, i: usize) -> u64 {
        (0..STRIPES)
            .map(|s| self.cell(s, i).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl Histogram {
    /// A histogram with these upper bounds (ascending), exported divided by `per_unit`.
    pub fn new(bounds: &'static [u64], per_unit: f64) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "ascending bounds");
        let stride = (bounds.len() + 2).next_multiple_of(8);
        Histogram {
            inner: Arc::new(HistogramInner {
                bounds,
                per_unit,
                stride,
                lines: (0..STRIPES * stride / 8).map(|_| Line::default()).collect(),
            }),
        }
    }

    /// Nanosecond observations exported in seconds, with [`LATENCY_BUCKETS_NS`].
    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_BUCKETS_NS, 1e9)
    }

    /// Counts exported as they are, with [`SIZE_BUCKETS`].
    pub fn sizes() -> Histogram {
        Histogram::new(SIZE_BUCKETS, 1.0)
    }

    /// Records one observation.
    pub fn observe(&self, value: u64) {
        let inner = &*self.inner;
        let i = inner.bounds.partition_point(|&b| b < value);
        let s = stripe();
        inner.cell(s, i).fetch_add(1, Ordering::Relaxed);
        inner
            .cell(s, inner.bounds.len() + 1)
            .fetch_add(value, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        (0..=self.inner.bounds.len())
            .map(|i| self.inner.total(i))
            .sum()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let inner = &self.inner;
        let mut count = 0;
        let buckets: Vec<(f64, u64)> = (0..=inner.bounds.len())
            .map(|i| {
                let n = inner.total(i);
                count += n;
                let bound = inner
                    .bounds
                    .get(i)
                    .map_or(f64::INFINITY, |&b| b as f64 / inner.per_unit);
                (bound, n)
            })
            .collect();
        let sum = inner.total(inner.bounds.len() + 1) as f64 / inner.per_unit;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Writes a counter read at scrape time: what a tier's collector does for each of the
/// counters its parts keep anyway.
///
/// # Errors
///
/// Only the writer's.
pub fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Writes a gauge read at scrape time, in `unit` when it has one.
///
/// # Errors
///
/// Only the writer's.
pub fn gauge<N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// The registry as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug in a collector, and
    // a partial scrape is still better than none.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    text
}

/// `registry` rendered as a `200` with the OpenMetrics content type.
pub fn response(registry: &Registry) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(render(registry))));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

/// Serves `GET /metrics` (the registry) and `GET /healthz` on `listener` until `shutdown`
/// completes: the metrics port of a tier whose own protocol is not HTTP.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |_peer, request: hyper::Request<hyper::body::Incoming>| {
        let registry = registry.clone();
        async move {
            match (request.method(), request.uri().path()) {
                (&Method::GET, "/metrics") => response(&registry),
                (&Method::GET, "/healthz") => http::text(StatusCode::OK, "ok\n"),
                (_, "/metrics" | "/healthz") => {
                    http::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
                }
                (_, path) => http::text(
                    StatusCode::NOT_FOUND,
                    format!("no such endpoint: {path}; this port serves GET /metrics\n"),
                ),
            }
        }
    };
    http::serve(listener, handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_renders_cumulative_buckets_in_its_unit() {
        let mut registry = Registry::default();
        let h = Histogram::new(&[10, 100], 2.0);
        registry.register("h", "test", h.clone());
        for v in [1, 10, 11, 100, 1000] {
            h.observe(v);
        }
        let text = render(&registry);
        assert!(text.contains("h_bucket{le=\"5.0\"} 2\n"), "{text}");
        assert!(text.contains("h_bucket{le=\"50.0\"} 4\n"), "{text}");
        assert!(text.contains("h_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("h_count 5\n"), "{text}");
        assert!(text.contains("h_sum 561.0\n"), "{text}");
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn striped_counts_from_many_threads_add_up() {
        let mut registry = Registry::default();
        let (h, c) = (Histogram::new(&[10], 1.0), Counter::default());
        registry.register("h", "test", h.clone());
        registry.register("c", "test", c.clone());
        // More threads than stripes, so some share one.
        std::thread::scope(|scope| {
            for t in 0..(STRIPES as u64 + 3) {
                let (h, c) = (h.clone(), c.clone());
                scope.spawn(move || {
                    for v in 0..1_000 {
                        h.observe(v % 20 + t);
                        c.inc();
                    }
                });
            }
        });
        let threads = STRIPES as u64 + 3;
        assert_eq!((h.count(), c.get()), (threads * 1_000, threads * 1_000));
        // Per thread, 0..=19 fifty times each, shifted by the thread's number.
        let sum: u64 = (0..threads).map(|t| 50 * (190 + 20 * t)).sum();
        let below: u64 = (0..threads).map(|t| 50 * 11u64.saturating_sub(t)).sum();
        let text = render(&registry);
        assert!(text.contains(&format!("h_sum {sum}.0\n")), "{text}");
        assert!(
            text.contains(&format!("h_bucket{{le=\"10.0\"}} {below}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("c_total {}\n", threads * 1_000)),
            "{text}"
        );
    }
}

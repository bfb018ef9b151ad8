//! The regional's metrics, served at `GET /metrics` on the configured metrics address.
//!
//! Everything here is counted anyway, by the parts that do the work: [`RegionalStats`](crate::RegionalStats) by the
//! decisions, [`BreakerStats`](crate::breaker::BreakerStats) and the breaker's state by the
//! guarded store, [`NetStats`] by the QUIC accept loop. A collector reads them at scrape time,
//! so serving edges pays nothing for metrics.

use std::{fmt, sync::Arc, sync::atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
    registry::Registry,
};
use shared::{
    metrics::{counter, gauge},
    net::NetStats,
    wire::CloseCode,
};

use crate::{Regional, breaker::GuardedStore, uplink::Uplink};

/// The regional's registry: `regional_*` metrics read from `regional`, its breaker (when its
/// store is Redis behind one), its QUIC accept loop and its link to the coordinator (when it
/// has one).
pub fn registry(
    regional: Arc<Regional>,
    breaker: Option<GuardedStore>,
    net: Arc<NetStats>,
    uplink: Option<Arc<Uplink>>,
) -> Registry {
    let mut registry = Registry::with_prefix("regional");
    registry.register_collector(Box::new(RegionalCollector {
        regional,
        breaker,
        net,
        uplink,
    }));
    registry
}

struct RegionalCollector {
    regional: Arc<Regional>,
    breaker: Option<GuardedStore>,
    net: Arc<NetStats>,
    uplink: Option<Arc<Uplink>>,
}

impl fmt::Debug for RegionalCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionalCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

impl Collector for RegionalCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        let s = self.regional.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        counter(e, "sync_batches", "Sync batches answered.", load(&s.syncs))?;
        counter(e, "sync_entries", "Sync entries merged.", load(&s.entries))?;
        counter(
            e,
            "exact_checks",
            "Exact requests decided (resends not counted).",
            load(&s.exact),
        )?;
        counter(
            e,
            "exact_denials",
            "Exact requests denied.",
            load(&s.denied),
        )?;
        counter(
            e,
            "replayed",
            "Exact requests answered again from memory (an edge's resend).",
            load(&s.replayed),
        )?;
        counter(
            e,
            "skewed",
            "Entries or checks for a window neither current nor previous here: clock skew.",
            load(&s.skewed),
        )?;
        counter(
            e,
            "unknown_limit",
            "Entries or checks naming a limit the rules do not have.",
            load(&s.unknown_limit),
        )?;
        counter(
            e,
            "unsupported",
            "Entries for an algorithm without ledgers, or checks beyond the longest span.",
            load(&s.unsupported),
        )?;
        counter(
            e,
            "store_errors",
            "Store calls that failed (the edge's failure mode decided those requests).",
            load(&s.store_errors),
        )?;
        gauge(
            e,
            "edges_connected",
            "Edges connected now.",
            None,
            i64::from(self.regional.connected_edges()),
        )?;
        gauge(
            e,
            "rule_set_version",
            "Version of the rule set in force.",
            None,
            i64::try_from(self.regional.rules().version()).unwrap_or(i64::MAX),
        )?;
        if let Some(uplink) = &self.uplink {
            gauge(
                e,
                "coordinator_connected",
                "1 while the link to the global coordinator is up.",
                None,
                i64::from(uplink.is_connected()),
            )?;
            counter(
                e,
                "coordinator_reports",
                "Demand reports the coordinator answered.",
                uplink.reports(),
            )?;
            counter(
                e,
                "escalations",
                "Exact requests escalated to the coordinator before a denial.",
                load(&s.escalations),
            )?;
            counter(
                e,
                "escalations_granted",
                "Escalations that brought back quota from other regions.",
                load(&s.escalations_granted),
            )?;
            counter(
                e,
                "released_units",
                "Units of this region's partitions given to other regions by transfers.",
                load(&s.released_units),
            )?;
        }
        if let Some(breaker) = &self.breaker {
            let b = breaker.stats();
            gauge(
                e,
                "breaker_state",
                "Redis circuit breaker: 0 closed (Redis), 1 open (memory), 2 half-open \
                 (memory, probing Redis).",
                None,
                i64::try_from(breaker.state().as_gauge()).unwrap_or(i64::MAX),
            )?;
            counter(
                e,
                "breaker_opened",
                "Times the breaker opened.",
                load(&b.opened),
            )?;
            counter(
                e,
                "breaker_fallback_calls",
                "Store calls served from memory while the breaker was open.",
                load(&b.fallback_calls),
            )?;
            counter(
                e,
                "breaker_written_back",
                "Ledgers and limiter states written back to Redis on recovery.",
                load(&b.written_back),
            )?;
        }
        let n = &self.net;
        counter(
            e,
            "connections_accepted",
            "Edge connections whose TLS handshake succeeded.",
            n.connections_accepted(),
        )?;
        counter(
            e,
            "connections_failed",
            "Connection attempts that failed before TLS was established (no or a foreign \
             certificate, another ALPN, a timeout).",
            n.connections_failed(),
        )?;
        counter(
            e,
            "handshakes_refused",
            "Hellos refused (wrong role, region or name).",
            n.handshakes_refused(),
        )?;
        counter(
            e,
            "streams_served",
            "Requests answered: a frame in, a reply out.",
            n.streams_served(),
        )?;
        let mut refused = e.encode_descriptor(
            "frames_refused",
            "Streams closed because of what the peer sent, by close code.",
            None,
            MetricType::Counter,
        )?;
        for code in CloseCode::ALL.into_iter().filter(|c| c.blames_peer()) {
            let labels = CodeLabel { code: code.name() };
            ConstCounter::new(n.frames_refused(code)).encode(refused.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

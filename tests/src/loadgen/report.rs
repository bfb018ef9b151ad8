//! The run's summary: what [`run`](super::run) returns, printed as a table or as JSON.

use std::{collections::BTreeMap, fmt::Write};

use serde::Serialize;

use super::{
    ledger::{LimitReport, WindowReport},
    target::{Decisions, Reasons},
};

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The id this run's identities are namespaced by.
    pub run_id: String,
    /// The target rate, requests per second; `None` in open loop.
    pub target_rate: Option<f64>,
    /// From the first send to the last answer, seconds.
    pub elapsed_s: f64,
    /// Worker connections.
    pub connections: usize,
    /// Key ranks drawn from.
    pub keys: u32,
    /// The Zipf exponent over them.
    pub zipf: f64,
    /// Requests sent.
    pub requests: u64,
    /// `requests / elapsed_s`.
    pub req_per_s: f64,
    /// Answered `200`.
    pub allowed: u64,
    /// Answered `429`.
    pub denied: u64,
    /// Not answered `200` or `429` with a decision: by kind (`connect`, `timeout`,
    /// `status_500`, `bad_json`, ...).
    pub errors: u64,
    /// [`Summary::errors`] by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// With `--rate`: sends that were due before the end but never made, because every
    /// connection was still waiting for an answer. Non-zero means the target was not reached.
    pub unsent: u64,
    /// Latency of every answered request, from its intended send time (with `--rate`) or its
    /// send time (open loop) to its answer.
    pub latency_us: Latency,
    /// Share of the edges' rule decisions made without the network during the run, from their
    /// `/metrics`; `None` when no edge's metrics could be read.
    pub local_ratio: Option<f64>,
    /// The same for keys not near their limit (DESIGN §4's target), erring low: see
    /// [`Decisions::local_ratio_not_near_limit`].
    pub local_ratio_not_near_limit: Option<f64>,
    /// The edges' decisions during the run, by path, summed over the edges that were read.
    pub decisions: Option<Decisions>,
    /// Per edge.
    pub edges: Vec<EdgeReport>,
    /// Per mix entry.
    pub entries: Vec<EntryReport>,
    /// Per limit met: admitted against the limit, overshoot and shortfall.
    pub limits: Vec<LimitReport>,
    /// The windows that overshot or fell short the most.
    pub worst_windows: Vec<WindowReport>,
}

/// Latency percentiles, microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// The largest.
    pub max: f64,
    /// The mean.
    pub mean: f64,
}

impl Latency {
    /// Percentiles of `nanos` (sorted here), nearest rank.
    pub fn of(nanos: &mut [u64]) -> Latency {
        if nanos.is_empty() {
            return Latency::default();
        }
        nanos.sort_unstable();
        let at = |q: f64| {
            let rank = (q * nanos.len() as f64).ceil() as usize;
            nanos[rank.clamp(1, nanos.len()) - 1] as f64 / 1e3
        };
        let sum: u128 = nanos.iter().map(|&n| u128::from(n)).sum();
        Latency {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
            mean: sum as f64 / nanos.len() as f64 / 1e3,
        }
    }
}

/// What one edge was sent and answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EdgeReport {
    /// `[REGION=]ADDR`.
    pub edge: String,
    /// Its share of the traffic, as weighted.
    pub share: f64,
    /// Requests sent to it.
    pub requests: u64,
    /// Answered `200`.
    pub allowed: u64,
    /// Answered `429`.
    pub denied: u64,
    /// Failed.
    pub errors: u64,
    /// Its local-decision ratio during the run; `None` when its metrics could not be read.
    pub local_ratio: Option<f64>,
}

/// What one mix entry sent and was answered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EntryReport {
    /// As given to `--mix`.
    pub name: String,
    /// The request it sends.
    pub request: String,
    /// Its share of the traffic, as weighted.
    pub share: f64,
    /// Requests sent.
    pub requests: u64,
    /// Answered `200`.
    pub allowed: u64,
    /// Answered `429`.
    pub denied: u64,
}

impl Summary {
    /// The summary as text tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mode = match self.target_rate {
            Some(rate) => format!("target {rate} req/s"),
            None => "open loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "loadgen run {}: {:.1} s, {mode}, {} connections, {} edges, {} keys (zipf {})",
            self.run_id,
            self.elapsed_s,
            self.connections,
            self.edges.len(),
            self.keys,
            self.zipf
        );
        let l = &self.latency_us;
        let mut totals = Table::new(&["", ""]);
        totals.row(vec![
            "requests".into(),
            format!("{}  ({:.1} req/s)", self.requests, self.req_per_s),
        ]);
        totals.row(vec!["allowed".into(), self.allowed.to_string()]);
        totals.row(vec!["denied".into(), self.denied.to_string()]);
        let kinds: Vec<String> = self
            .error_kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let errors = if kinds.is_empty() {
            self.errors.to_string()
        } else {
            format!("{}  ({})", self.errors, kinds.join(", "))
        };
        totals.row(vec!["errors".into(), errors]);
        if self.target_rate.is_some() {
            totals.row(vec!["unsent".into(), self.unsent.to_string()]);
        }
        let answered = self.allowed + self.denied;
        totals.row(vec![
            "latency".into(),
            if answered == 0 {
                "n/a (nothing answered)".to_owned()
            } else {
                format!(
                    "p50 {}  p90 {}  p99 {}  p999 {}  max {}  mean {}",
                    ms(l.p50),
                    ms(l.p90),
                    ms(l.p99),
                    ms(l.p999),
                    ms(l.max),
                    ms(l.mean)
                )
            },
        ]);
        let local = match (self.local_ratio, &self.decisions) {
            (Some(r), Some(d)) => format!(
                "{r:.4}  (local {}, cached_denial {}, exact {}, fallback {}; unlimited {})",
                d.local, d.cached_denial, d.exact, d.fallback, d.unlimited
            ),
            _ => "n/a (no edge metrics read)".to_owned(),
        };
        totals.row(vec!["local ratio".into(), local]);
        if let Some(d) = &self.decisions {
            let below = self
                .local_ratio_not_near_limit
                .map_or("n/a".into(), |r| format!("{r:.4}"));
            totals.row(vec!["  not near limit".into(), below]);
            totals.row(vec!["not local, why".into(), reasons(&d.reasons)]);
        }
        out.push('\n');
        out.push_str(&totals.render_without_header());

        let mut edges = Table::new(&[
            "EDGE", "SHARE", "REQUESTS", "ALLOWED", "DENIED", "ERRORS", "LOCAL",
        ]);
        for e in &self.edges {
            edges.row(vec![
                e.edge.clone(),
                format!("{:.2}", e.share),
                e.requests.to_string(),
                e.allowed.to_string(),
                e.denied.to_string(),
                e.errors.to_string(),
                e.local_ratio.map_or("n/a".into(), |r| format!("{r:.4}")),
            ]);
        }
        out.push('\n');
        out.push_str(&edges.render());

        let mut entries = Table::new(&["MIX", "REQUEST", "SHARE", "REQUESTS", "ALLOWED", "DENIED"]);
        for e in &self.entries {
            entries.row(vec![
                e.name.clone(),
                e.request.clone(),
                format!("{:.2}", e.share),
                e.requests.to_string(),
                e.allowed.to_string(),
                e.denied.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&entries.render());

        let mut limits = Table::new(&[
            "LIMIT",
            "ALGORITHM",
            "LIMIT/WINDOW",
            "STRICT",
            "KEYS",
            "WINDOWS",
            "ADMITTED",
            "DENIED",
            "EXHAUSTED",
            "OVERSHOOT",
            "SHORTFALL",
            "UNATTRIB",
        ]);
        for r in &self.limits {
            let strict = if r.shadow {
                format!("{} shadow", r.strictness)
            } else {
                r.strictness.to_owned()
            };
            let overshoot = if r.overshoot == 0 {
                "0".to_owned()
            } else {
                format!(
                    "{} in {} (max {})",
                    r.overshoot, r.overshoot_windows, r.max_overshoot
                )
            };
            let shortfall = match (r.shortfall, r.shortfall_windows) {
                (Some(0), _) => "0".to_owned(),
                (Some(n), Some(w)) => format!("{n} in {w}"),
                _ => "n/a".to_owned(),
            };
            limits.row(vec![
                r.limit_name.clone(),
                r.algorithm.to_owned(),
                format!("{}/{}", r.limit, window(r.window_ms)),
                strict,
                r.keys.to_string(),
                r.windows.to_string(),
                r.admitted.to_string(),
                r.denied.to_string(),
                r.exhausted_windows.to_string(),
                overshoot,
                shortfall,
                r.unattributed.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&limits.render());
        out.push_str(
            "  OVERSHOOT: admitted above the limit, summed over (key, window): \"N in W (max M)\"; \
             aligned windows for sliding limits,\n  the run's span for buckets (lower bounds). \
             SHORTFALL: limit offered, less admitted (fixed windows);\n  for sliding windows, the room \
             the counter still had at the window's latest denial (a lower bound); n/a otherwise.\n",
        );
        if !self.worst_windows.is_empty() {
            let mut worst = Table::new(&[
                "WORST", "KEY", "WINDOW", "OFFERED", "ADMITTED", "BOUND", "OVER", "SHORT",
            ]);
            for w in &self.worst_windows {
                worst.row(vec![
                    w.limit_name.clone(),
                    w.key.clone(),
                    w.window_start_unix_ms
                        .map_or("run".to_owned(), |ms| format!("{:.3}", ms as f64 / 1e3)),
                    w.offered.map_or("-".to_owned(), |o| o.to_string()),
                    w.admitted.to_string(),
                    w.bound.to_string(),
                    w.overshoot.to_string(),
                    w.shortfall.to_string(),
                ]);
            }
            out.push('\n');
            out.push_str(&worst.render());
        }
        if self.unsent > 0 {
            let _ = writeln!(
                out,
                "\nwarning: {} sends were due but never made (every connection busy): the target \
                 rate was not reached; add --connections",
                self.unsent
            );
        }
        out
    }
}

/// Microseconds as milliseconds, three decimals.
/// Each reason's share of all the reasons counted, largest first: `near_limit 41% (1234), …`.
fn reasons(r: &Reasons) -> String {
    let mut labelled = r.labelled();
    let all: f64 = labelled.iter().map(|(_, n)| n).sum();
    if all <= 0.0 {
        return "none counted".to_owned();
    }
    labelled.sort_by(|a, b| b.1.total_cmp(&a.1));
    labelled
        .iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(label, n)| format!("{label} {:.0}% ({n})", 100.0 * n / all))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(us: f64) -> String {
    format!("{:.3}ms", us / 1e3)
}

/// A window in milliseconds as the rules write it.
fn window(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    UNITS
        .iter()
        .find(|(n, _)| ms >= *n && ms.is_multiple_of(*n))
        .map_or(format!("{ms}ms"), |(n, unit)| format!("{}{unit}", ms / n))
}

/// Left-aligned columns, two spaces apart.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        self.lines(std::iter::once(&self.header).chain(&self.rows))
    }

    fn render_without_header(&self) -> String {
        self.lines(self.rows.iter())
    }

    fn lines<'a>(&'a self, rows: impl Iterator<Item = &'a Vec<String>> + Clone) -> String {
        let mut widths = vec![0; self.header.len()];
        for row in rows.clone() {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in rows {
            let mut line = String::new();
            for (i, (w, cell)) in widths.iter().zip(row).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let _ = write!(line, "{cell:<w$}");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let l = Latency::of(&mut v);
        assert_eq!((l.p50, l.p99, l.p999, l.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Latency::of(&mut []).max, 0.0);
    }

    #[test]
    fn windows_read_as_the_rules_write_them() {
        assert_eq!(window(60_000), "1m");
        assert_eq!(window(1_500), "1500ms");
        assert_eq!(window(86_400_000), "1d");
    }
}

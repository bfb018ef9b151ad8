//! The edges a run drives: `--edge [REGION=]ADDR`, how traffic is spread over them, and their
//! decision counters read from `/metrics` before and after the run.

use std::{
    collections::BTreeMap,
    fmt,
    net::{SocketAddr, ToSocketAddrs},
    str::FromStr,
    time::Duration,
};

use serde::Serialize;

use super::{client::Connection, sample::parse_weight};

/// One `--edge`: an address, optionally tagged with its region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeSpec {
    /// The region tag, when given (`eu=127.0.0.1:8080`).
    pub region: Option<String>,
    /// The address, resolved once.
    pub addr: SocketAddr,
}

impl FromStr for EdgeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<EdgeSpec, String> {
        let (region, at) = match s.split_once('=') {
            Some((region, at)) if !region.is_empty() => (Some(region.to_owned()), at),
            Some(_) => return Err(format!("{s:?}: an empty region before '='")),
            None => (None, s),
        };
        let addr = at
            .to_socket_addrs()
            .map_err(|e| format!("{at:?} is not HOST:PORT: {e}"))?
            .next()
            .ok_or_else(|| format!("{at:?} resolves to no address"))?;
        Ok(EdgeSpec { region, addr })
    }
}

impl fmt::Display for EdgeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.region {
            Some(region) => write!(f, "{region}={}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// One `--region-weights` item: `REGION=WEIGHT`.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionWeight {
    /// The region, as tagged on `--edge`.
    pub region: String,
    /// Its share of the traffic, relative to the others.
    pub weight: f64,
}

impl FromStr for RegionWeight {
    type Err = String;

    fn from_str(s: &str) -> Result<RegionWeight, String> {
        let (region, weight) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not REGION=WEIGHT"))?;
        Ok(RegionWeight {
            region: region.to_owned(),
            weight: parse_weight(s, weight)?,
        })
    }
}

/// Each edge's weight: `edge_weights` (default 1 each), and with `region_weights`, each
/// region's weight split among its edges in proportion to theirs.
///
/// # Errors
///
/// More edge weights than edges, a negative one, an edge whose region has no weight, or a
/// region weight no edge is tagged with.
pub fn weights(
    edges: &[EdgeSpec],
    edge_weights: &[f64],
    region_weights: &[RegionWeight],
) -> Result<Vec<f64>, String> {
    if edge_weights.len() > edges.len() {
        return Err(format!(
            "--edge-weights has {} weights for {} edges",
            edge_weights.len(),
            edges.len()
        ));
    }
    if edge_weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err("--edge-weights: a weight is a number ≥ 0".to_owned());
    }
    let mut w: Vec<f64> = (0..edges.len())
        .map(|i| edge_weights.get(i).copied().unwrap_or(1.0))
        .collect();
    if region_weights.is_empty() {
        return Ok(w);
    }
    let mut per_region: BTreeMap<&str, f64> = BTreeMap::new();
    for (e, weight) in edges.iter().zip(&w) {
        let region = e.region.as_deref().ok_or_else(|| {
            format!("--region-weights needs every --edge tagged REGION=ADDR; {e} is not")
        })?;
        *per_region.entry(region).or_default() += weight;
    }
    for r in region_weights {
        if !per_region.contains_key(r.region.as_str()) {
            return Err(format!(
                "--region-weights: no --edge is in region {:?}",
                r.region
            ));
        }
    }
    for (e, weight) in edges.iter().zip(&mut w) {
        let region = e.region.as_deref().unwrap_or_default();
        let share = region_weights
            .iter()
            .find(|r| r.region == region)
            .ok_or_else(|| format!("--region-weights has no weight for region {region:?}"))?
            .weight;
        let total = per_region.get(region).copied().unwrap_or(0.0);
        *weight = if total > 0.0 {
            share * *weight / total
        } else {
            0.0
        };
    }
    Ok(w)
}

/// Decisions an edge counted, by path: `edge_checks_total` summed over rules and results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Decisions {
    /// Under a grant or the cold allowance.
    pub local: f64,
    /// A cached denial.
    pub cached_denial: f64,
    /// Asked of the regional.
    pub exact: f64,
    /// The rule's failure mode, the regional not answering in time.
    pub fallback: f64,
    /// No rule applied.
    pub unlimited: f64,
    /// Why the exact and fallback decisions could not be made locally.
    pub reasons: Reasons,
}

/// Why an edge could not decide a request locally: `edge_exact_reasons_total` by `reason`.
/// The edge counts one reason per request, for the first limit it could not decide, so these
/// sum to `exact + fallback`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Reasons {
    /// The key was above `θ·P` in its window: every decision near the limit is exact.
    pub near_limit: f64,
    /// No grant in the window and no cold allowance (hard or hot keys, or spent).
    pub no_grant: f64,
    /// The window's grant was used up and no more had come yet.
    pub grant_spent: f64,
    /// The algorithm is decided only at the regional (sliding log, leaky-bucket shaper).
    pub exact_only: f64,
}

impl Reasons {
    /// The reasons with their labels, in the edge's order.
    pub fn labelled(&self) -> [(&'static str, f64); 4] {
        [
            ("near_limit", self.near_limit),
            ("no_grant", self.no_grant),
            ("grant_spent", self.grant_spent),
            ("exact_only", self.exact_only),
        ]
    }

    fn zip(&self, other: &Reasons, f: impl Fn(f64, f64) -> f64) -> Reasons {
        Reasons {
            near_limit: f(self.near_limit, other.near_limit),
            no_grant: f(self.no_grant, other.no_grant),
            grant_spent: f(self.grant_spent, other.grant_spent),
            exact_only: f(self.exact_only, other.exact_only),
        }
    }
}

impl Decisions {
    /// Decisions made without the network over decisions a rule made: `(local +
    /// cached_denial) / (local + cached_denial + exact + fallback)`. Requests no rule applies
    /// to are left out, since they would flatter the ratio. `None` with no decision at all.
    pub fn local_ratio(&self) -> Option<f64> {
        let local = self.local + self.cached_denial;
        let all = local + self.exact + self.fallback;
        (all > 0.0).then(|| local / all)
    }

    /// Local decisions over the decisions about keys not known to be near their limit:
    /// `local / (local + exact + fallback − near_limit)`. Cached denials and exact decisions
    /// the edge took because the key was above `θ·P` are about keys at or near their limit
    /// and are left out; an exact decision about a key at its limit that the edge could not
    /// know was there (no grant yet) stays in, so this errs low. `None` with no decision.
    pub fn local_ratio_not_near_limit(&self) -> Option<f64> {
        let all = self.local + self.exact + self.fallback - self.reasons.near_limit;
        (all > 0.0).then(|| self.local / all)
    }

    /// `self − before`, path by path.
    pub fn since(&self, before: &Decisions) -> Decisions {
        Decisions {
            local: self.local - before.local,
            cached_denial: self.cached_denial - before.cached_denial,
            exact: self.exact - before.exact,
            fallback: self.fallback - before.fallback,
            unlimited: self.unlimited - before.unlimited,
            reasons: self.reasons.zip(&before.reasons, |a, b| a - b),
        }
    }

    /// Adds `other`, path by path.
    pub fn add(&mut self, other: &Decisions) {
        self.local += other.local;
        self.cached_denial += other.cached_denial;
        self.exact += other.exact;
        self.fallback += other.fallback;
        self.unlimited += other.unlimited;
        self.reasons = self.reasons.zip(&other.reasons, |a, b| a + b);
    }
}

/// The metric the edges count decisions in (edge-agent's `metrics.rs`), labelled `rule`,
/// `result` and `path`.
pub const CHECKS_METRIC: &str = "edge_checks_total";

/// The metric the edges count why a request was not decided locally in, labelled `reason`.
pub const REASONS_METRIC: &str = "edge_exact_reasons_total";

/// `GET /metrics` at `addr`, read as [`Decisions`].
///
/// # Errors
///
/// The edge did not answer, answered something other than `200`, or not Prometheus text.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> Result<Decisions, String> {
    let mut conn = Connection::new(addr, timeout);
    let response = conn
        .get("/metrics")
        .map_err(|e| format!("GET http://{addr}/metrics: {e}"))?;
    if response.status != 200 {
        return Err(format!(
            "GET http://{addr}/metrics: status {}",
            response.status
        ));
    }
    let text = String::from_utf8_lossy(response.body);
    let metrics = crate::metrics::parse(&text)
        .map_err(|e| format!("GET http://{addr}/metrics: not Prometheus text: {e}"))?;
    let path = |p: &str| metrics.sum(CHECKS_METRIC, &[("path", p)]).unwrap_or(0.0);
    // An edge older than the reasons metric has none: zeros, not an error.
    let reason = |r: &str| metrics.sum(REASONS_METRIC, &[("reason", r)]).unwrap_or(0.0);
    Ok(Decisions {
        local: path("local"),
        cached_denial: path("cached_denial"),
        exact: path("exact"),
        fallback: path("fallback"),
        unlimited: path("unlimited"),
        reasons: Reasons {
            near_limit: reason("near_limit"),
            no_grant: reason("no_grant"),
            grant_spent: reason("grant_spent"),
            exact_only: reason("exact_only"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(s: &str) -> EdgeSpec {
        s.parse().unwrap()
    }

    #[test]
    fn edges_and_weights() {
        let edges = [
            edge("eu=127.0.0.1:8080"),
            edge("eu=127.0.0.1:8081"),
            edge("us=127.0.0.1:8082"),
        ];
        assert_eq!(edges[0].region.as_deref(), Some("eu"));
        assert_eq!(edge("localhost:1").addr.port(), 1);
        assert!("eu=nowhere".parse::<EdgeSpec>().is_err());
        assert!("=127.0.0.1:1".parse::<EdgeSpec>().is_err());

        assert_eq!(weights(&edges, &[3.0], &[]).unwrap(), [3.0, 1.0, 1.0]);
        let r = |s: &str| s.parse::<RegionWeight>().unwrap();
        // eu gets 3/4 of the traffic, split 2:1 between its edges; us gets 1/4.
        assert_eq!(
            weights(&edges, &[2.0, 1.0], &[r("eu=3"), r("us=1")]).unwrap(),
            [2.0, 1.0, 1.0]
        );
        assert!(weights(&edges, &[1.0; 4], &[]).is_err());
        assert!(
            weights(&edges, &[], &[r("eu=1")]).is_err(),
            "us has no weight"
        );
        assert!(weights(&edges, &[], &[r("eu=1"), r("us=1"), r("ap=1")]).is_err());
        assert!(weights(&[edge("127.0.0.1:1")], &[], &[r("eu=1")]).is_err());
    }

    #[test]
    fn local_ratio_leaves_out_unlimited() {
        let before = Decisions {
            local: 10.0,
            ..Decisions::default()
        };
        let after = Decisions {
            local: 100.0,
            cached_denial: 5.0,
            exact: 5.0,
            fallback: 0.0,
            unlimited: 1000.0,
            reasons: Reasons::default(),
        };
        let d = after.since(&before);
        assert_eq!(d.local_ratio(), Some(0.95));
        assert_eq!(Decisions::default().local_ratio(), None);
        // Of the 5 exact decisions, 3 were near the limit: 90 local of 92 not near it.
        let near = Decisions {
            local: 90.0,
            cached_denial: 40.0,
            exact: 5.0,
            reasons: Reasons {
                near_limit: 3.0,
                no_grant: 2.0,
                ..Reasons::default()
            },
            ..Decisions::default()
        };
        assert_eq!(near.local_ratio_not_near_limit(), Some(90.0 / 92.0));
        assert_eq!(Decisions::default().local_ratio_not_near_limit(), None);
    }
}

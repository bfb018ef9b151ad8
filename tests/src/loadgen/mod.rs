//! The load generator: drives a running topology's edges over `POST /v1/check` and reports
//! throughput, latency, the local-decision ratio and, per limit, what was admitted against
//! the limit. The end-to-end benchmark DESIGN §4 asks for (≥ 95% local decisions, hard limits
//! never exceeded); the binary is `loadgen` (`src/bin/loadgen.rs`), this is its library.
//!
//! ```text
//! deploy/up.sh &                                        # edges on 127.0.0.1:8080-8083
//! cargo run --release -p system-tests --bin loadgen -- --rate 5000 --duration 30s
//! loadgen --open-loop --connections 16 --keys 100000 --zipf 1.2
//! loadgen --edge eu=127.0.0.1:8080 --edge us=127.0.0.1:8082 --region-weights eu=9,us=1
//! loadgen --mix login=1,search=8,search@pro=1 --rules deploy/config/rules.yaml --json
//! ```
//!
//! # What it sends
//!
//! `--connections` worker threads, each with one keep-alive HTTP/1.1 connection to every
//! edge ([`client`]). Each request picks an edge by `--edge-weights` / `--region-weights`
//! ([`target`]), a request template by `--mix` weights ([`mix`]: one per rule of `--rules` by
//! default, each aimed at its rule: `POST /api/login` by IP, `GET /api/search` by user id,
//! tiered requests with `"tier"`), and a key rank by Zipf's law with exponent `--zipf` over
//! `--keys` ranks ([`sample`]). The rules file is read with `shared`'s own parser, so the
//! generator knows every limit a request meets, exactly as the edges do.
//!
//! # Latency without coordinated omission
//!
//! With `--rate R`, request `j` of the run is *intended* at `start + j/R`, and the workers take
//! turns (`j mod connections`). A worker sleeps until its next intended time, or sends at once
//! when it is late, and the latency recorded is from the *intended* time to the answer. A
//! stalled edge therefore shows up in the percentiles as the queue it would have built, rather
//! than as a pause in sending that hides it (Gil Tene's coordinated omission; wrk2 does the
//! same). Sends still due when the run ends are counted as `unsent`: non-zero means the
//! target rate was not reached and the tail is understated. With `--open-loop` each worker
//! sends its next request as soon as the last is answered, and latency is from the send.
//! Percentiles are exact, over every answered request (errors are counted, not timed).
//!
//! # Local-decision ratio
//!
//! Every edge's `/metrics` is read before and after the run; over the difference of
//! `edge_checks_total` by `path`, the ratio is `(local + cached_denial) / (local +
//! cached_denial + exact + fallback)`. Requests no rule applies to (`unlimited`) are left out.
//!
//! DESIGN §4's target (≥ 95% local) is for keys not near their limit, so a second ratio
//! leaves out the decisions the edges made about keys they knew were at or near it: cached
//! denials, and exact decisions counted with the reason `near_limit`. It is `local / (local +
//! exact + fallback − near_limit)`. An exact decision about a key at its limit that the edge
//! did not know was near it (its first request there this window) still counts against it,
//! so the figure errs low.
//! Anything else the edges decided during the run is counted too: run it on a quiet topology.
//!
//! # Overshoot and shortfall
//!
//! Per (limit, key, window): admitted above the limit (overshoot), and the limit offered but
//! less admitted (shortfall, a false reject). How a request is placed in a window and how each
//! algorithm is judged is in [`ledger`]; in short: a request is placed in a window by our own
//! send and receipt times (one straddling a boundary is left out of overshoot and counted on
//! both sides for shortfall, so neither is overstated); fixed windows are judged per window,
//! sliding windows on epoch-aligned windows and buckets on the run's span (both lower
//! bounds); shortfall is computed for fixed and sliding windows (for a sliding window, the
//! room its counter had at the window's latest denial, a lower bound). A hard rule's
//! overshoot must be zero; a soft rule's is bounded by `n·c0` per window (DESIGN §4).
//!
//! Every key is namespaced by a per-run id, so windows a previous run spent do not count here
//! (the id comes from `--seed` when one is given: two runs with one seed share their keys).
//! Nothing read from the network can panic the generator: a failure is counted by kind, and
//! the first of each kind is printed to stderr.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    io,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use serde::Deserialize;
use shared::RuleSet;

pub mod client;
pub mod ledger;
pub mod mix;
pub mod report;
pub mod sample;
pub mod target;

pub use self::{
    ledger::{Ledger, LimitReport, WindowReport},
    mix::{Mix, MixWeight},
    report::{Latency, Summary},
    target::{Decisions, EdgeSpec, RegionWeight},
};

use self::{
    client::Connection,
    ledger::Answer,
    report::{EdgeReport, EntryReport},
    sample::{Rng, Weighted, Zipf},
};

/// The edges `deploy/up.sh` starts (DESIGN §10).
pub const DEFAULT_EDGES: [&str; 4] = [
    "eu=127.0.0.1:8080",
    "eu=127.0.0.1:8081",
    "us=127.0.0.1:8082",
    "us=127.0.0.1:8083",
];

/// The load generator's flags.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Drive a running rate-limiter topology over POST /v1/check; report throughput, \
             latency, the local-decision ratio, and overshoot and shortfall per limit",
    long_about = "Drive a running rate-limiter topology (deploy/up.sh) over POST /v1/check, \
                  then report throughput, latency (p50/p99/p999 from each request's intended \
                  send time: no coordinated omission), the edges' local-decision ratio (from \
                  their /metrics before and after), and per limit of the rules file what was \
                  admitted against the limit: overshoot (admitted above the limit per key and \
                  window) and shortfall (the limit offered, less admitted).\n\n\
                  Progress goes to stderr once a second; the summary to stdout, as tables or \
                  with --json as JSON. Exit status 0 after a run, 2 on bad flags or rules."
)]
pub struct Options {
    /// An edge's HTTP address, optionally tagged with its region (`eu=127.0.0.1:8080`);
    /// repeat for more.
    #[arg(long = "edge", value_name = "[REGION=]ADDR", default_values = DEFAULT_EDGES)]
    pub edges: Vec<EdgeSpec>,

    /// Relative traffic per edge, in --edge order (`3,1,1,1`); missing ones are 1.
    #[arg(long, value_name = "W,...", value_delimiter = ',')]
    pub edge_weights: Vec<f64>,

    /// Relative traffic per region (`eu=3,us=1`), split among a region's edges by their
    /// --edge-weights; needs every --edge tagged with its region.
    #[arg(long, value_name = "REGION=W,...", value_delimiter = ',')]
    pub region_weights: Vec<RegionWeight>,

    /// Target requests per second over all connections, each request timed from when it was
    /// due.
    #[arg(long, value_name = "N", default_value_t = 1000.0)]
    pub rate: f64,

    /// Send as fast as each connection is answered instead of at --rate.
    #[arg(long, conflicts_with = "rate")]
    pub open_loop: bool,

    /// How long to send (`500ms`, `10s`, `2m`).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub duration: Duration,

    /// Worker threads, each with one keep-alive connection per edge.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: usize,

    /// Distinct keys (users, IPs, API keys) per identity.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub keys: u32,

    /// Zipf exponent over key ranks: 0 is uniform, 1 the classic web skew, larger hotter.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub zipf: f64,

    /// Request mix: RULE=WEIGHT or RULE@TIER=WEIGHT items, RULE a rule id of --rules
    /// (`login`, `default`, `tiers.pro`), TIER a tier it declares. Default: every rule,
    /// equally.
    #[arg(long, value_name = "RULE[@TIER]=W,...", value_delimiter = ',')]
    pub mix: Vec<MixWeight>,

    /// The rules the topology enforces, read to know each limit.
    #[arg(long, value_name = "FILE", default_value = "deploy/config/rules.yaml")]
    pub rules: PathBuf,

    /// The longest a connect, a send or an answer may take before it counts as an error.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    pub timeout: Duration,

    /// Seed of what is sent (edges, entries, keys) and of the run id; default: the time.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// How many of the worst (limit, key, window)s to list.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub worst: usize,

    /// Print the summary as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadgenError {
    /// The rules file could not be read.
    #[error("reading {path}: {source}")]
    ReadRules {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The rules file is not valid rules.
    #[error(transparent)]
    Rules(#[from] shared::ConfigError),
    /// The flags contradict each other or the rules.
    #[error("{0}")]
    Options(String),
}

/// Runs the load `options` describe against the edges, and summarizes it.
///
/// # Errors
///
/// The rules cannot be read, or the flags are inconsistent with each other or with the rules.
/// Nothing that happens on the network is an error here: it is counted in the summary.
pub fn run(options: &Options) -> Result<Summary, LoadgenError> {
    let plan = Plan::new(options)?;
    let before: Vec<Option<Decisions>> = plan
        .edges
        .iter()
        .map(|e| scrape_or_warn(e, options.timeout))
        .collect();
    let (results, elapsed) = plan.drive();
    let after: Vec<Option<Decisions>> = plan
        .edges
        .iter()
        .map(|e| scrape_or_warn(e, options.timeout))
        .collect();
    Ok(plan.summarize(results, elapsed, &before, &after))
}

/// `--duration`, `--timeout`: the rules' duration syntax.
fn duration(text: &str) -> Result<Duration, String> {
    shared::config::parse_duration(text).map(|n| Duration::from_nanos(n.as_u64()))
}

fn scrape_or_warn(edge: &EdgeSpec, timeout: Duration) -> Option<Decisions> {
    target::scrape(edge.addr, timeout)
        .inspect_err(|e| eprintln!("loadgen: {e}; its local ratio is left out"))
        .ok()
}

/// Everything a run needs, fixed before it starts.
struct Plan {
    mix: Mix,
    edges: Vec<EdgeSpec>,
    edge_choice: Weighted,
    zipf: Zipf,
    /// Requests per second; `None` in open loop.
    rate: Option<f64>,
    connections: usize,
    duration: Duration,
    timeout: Duration,
    seed: u64,
    run_id: u32,
    keys: u32,
    zipf_s: f64,
    worst: usize,
    live: Live,
}

/// What the progress line reads while the workers run.
#[derive(Default)]
struct Live {
    requests: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
    finished: AtomicUsize,
    /// Error kinds already printed: the first of each goes to stderr.
    reported: Mutex<HashSet<String>>,
}

/// When a worker's requests are due: with a rate, request `j` of the run at `start + j/rate`,
/// this worker taking `j = index, index + N, ...` for `N` workers; in open loop, at once.
struct Schedule {
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    /// The next `j` this worker sends.
    next: u64,
    /// `N`.
    step: u64,
}

impl Schedule {
    /// Sleeps until the next request is due and returns when it was due (now, in open loop);
    /// `None` once the run is over, adding to `unsent` what was due but could not be sent.
    fn wait(&mut self, unsent: &mut u64) -> Option<Instant> {
        let now = Instant::now();
        let Some(rate) = self.rate else {
            return (now < self.end).then_some(now);
        };
        let due = self.start + Duration::from_secs_f64(self.next as f64 / rate);
        if due >= self.end {
            return None;
        }
        if now >= self.end {
            // Still due, never sent: this worker was waiting for answers all along.
            let total = (self.end - self.start).as_secs_f64() * rate;
            // Less a hair, so that a float a little over a whole count is not one more.
            let left = ((total - self.next as f64) / self.step as f64 - 1e-9).ceil();
            *unsent += left.max(0.0) as u64;
            return None;
        }
        if due > now {
            thread::sleep(due - now);
        }
        self.next += self.step;
        Some(due)
    }
}

/// Counts a worker out when dropped.
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one worker saw.
#[derive(Default)]
struct WorkerResult {
    latencies: Vec<u64>,
    ledger: Ledger,
    per_edge: Vec<Counts>,
    per_entry: Vec<Counts>,
    errors: BTreeMap<String, u64>,
    unsent: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests: u64,
    allowed: u64,
    denied: u64,
    errors: u64,
}

/// The fields of a check's answer the generator reads (DESIGN §8).
#[derive(Debug, Deserialize)]
struct Reply<'a> {
    allowed: bool,
    #[serde(default)]
    limit: u64,
    #[serde(borrow, default)]
    rule: Option<Cow<'a, str>>,
}

impl Plan {
    fn new(options: &Options) -> Result<Plan, LoadgenError> {
        let bad = |m: String| Err(LoadgenError::Options(m));
        if options.edges.is_empty() {
            return bad("no --edge to send to".into());
        }
        let rate_ok = options.rate.is_finite() && options.rate > 0.0;
        if !options.open_loop && !rate_ok {
            return bad(format!("--rate {}: must be above zero", options.rate));
        }
        if options.connections == 0 {
            return bad("--connections must be at least 1".into());
        }
        let path = options.rules.display().to_string();
        let text =
            std::fs::read_to_string(&options.rules).map_err(|source| LoadgenError::ReadRules {
                path: path.clone(),
                source,
            })?;
        let rules = RuleSet::from_yaml(&path, &text)?;
        let seed = options.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        // The top half of a draw: a run id unrelated to the workers' streams.
        let run_id = (Rng::new(seed).next_u64() >> 32) as u32;
        let mix = Mix::new(&rules, &options.mix, run_id).map_err(LoadgenError::Options)?;
        let weights = target::weights(
            &options.edges,
            &options.edge_weights,
            &options.region_weights,
        )
        .map_err(LoadgenError::Options)?;
        let edge_choice = Weighted::new(&weights)
            .ok_or_else(|| LoadgenError::Options("the edge weights add up to nothing".into()))?;
        let zipf = Zipf::new(options.keys, options.zipf).ok_or_else(|| {
            LoadgenError::Options("--keys must be at least 1 and --zipf a number ≥ 0".into())
        })?;
        Ok(Plan {
            mix,
            edges: options.edges.clone(),
            edge_choice,
            zipf,
            rate: (!options.open_loop).then_some(options.rate),
            connections: options.connections,
            duration: options.duration,
            timeout: options.timeout,
            seed,
            run_id,
            keys: options.keys,
            zipf_s: options.zipf,
            worst: options.worst,
            live: Live::default(),
        })
    }

    /// Runs the workers and the progress line; every worker's result and the time taken.
    fn drive(&self) -> (Vec<WorkerResult>, Duration) {
        let start = Instant::now();
        let results = thread::scope(|scope| {
            let workers: Vec<_> = (0..self.connections)
                .map(|i| scope.spawn(move || self.work(i, start)))
                .collect();
            self.progress(start);
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        });
        (results, start.elapsed())
    }

    /// One line a second to stderr until every worker is done.
    fn progress(&self, start: Instant) {
        let mut last = (Duration::ZERO, 0);
        let mut next = Duration::from_secs(1);
        while self.live.finished.load(Ordering::Relaxed) < self.connections {
            thread::sleep(Duration::from_millis(20));
            let elapsed = start.elapsed();
            if elapsed < next {
                continue;
            }
            next += Duration::from_secs(1);
            let requests = self.live.requests.load(Ordering::Relaxed);
            let rate = (requests - last.1) as f64 / (elapsed - last.0).as_secs_f64();
            last = (elapsed, requests);
            eprintln!(
                "{:>6.1}s  requests {requests}  {rate:.0} req/s  allowed {}  denied {}  errors {}",
                elapsed.as_secs_f64(),
                self.live.allowed.load(Ordering::Relaxed),
                self.live.denied.load(Ordering::Relaxed),
                self.live.errors.load(Ordering::Relaxed),
            );
        }
    }

    /// Worker `index`: sends until the run's end, on its share of the schedule.
    fn work(&self, index: usize, start: Instant) -> WorkerResult {
        // Counted on the way out however it goes, so the progress line always ends.
        let _finished = Finished(&self.live.finished);
        let mut rng = Rng::new(self.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut schedule = Schedule {
            start,
            end: start + self.duration,
            rate: self.rate,
            next: index as u64,
            step: self.connections as u64,
        };
        let mut conns: Vec<Connection> = self
            .edges
            .iter()
            .map(|e| Connection::new(e.addr, self.timeout))
            .collect();
        let mut result = WorkerResult {
            per_edge: vec![Counts::default(); self.edges.len()],
            per_entry: vec![Counts::default(); self.mix.entries.len()],
            ..WorkerResult::default()
        };
        let mut body = Vec::with_capacity(256);
        while let Some(intended) = schedule.wait(&mut result.unsent) {
            let edge = self.edge_choice.sample(&mut rng);
            let entry = self.mix.pick(&mut rng);
            let rank = self.zipf.sample(&mut rng);
            self.mix.body(&self.mix.entries[entry], rank, &mut body);
            let verdict = self.check(&mut conns[edge], entry, rank, &body, &mut result.ledger);
            self.live.requests.fetch_add(1, Ordering::Relaxed);
            let counts = [&mut result.per_edge[edge], &mut result.per_entry[entry]];
            match verdict {
                Ok((allowed, received)) => {
                    let nanos = (received - intended).as_nanos();
                    result
                        .latencies
                        .push(u64::try_from(nanos).unwrap_or(u64::MAX));
                    let live = if allowed {
                        &self.live.allowed
                    } else {
                        &self.live.denied
                    };
                    live.fetch_add(1, Ordering::Relaxed);
                    for c in counts {
                        c.requests += 1;
                        c.allowed += u64::from(allowed);
                        c.denied += u64::from(!allowed);
                    }
                }
                Err((kind, detail)) => {
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    for c in counts {
                        c.requests += 1;
                        c.errors += 1;
                    }
                    self.report_first(&kind, conns[edge].addr(), &detail);
                    *result.errors.entry(kind).or_default() += 1;
                }
            }
        }
        result
    }

    /// One check of entry `entry` for key rank `rank` over `conn`, booked in `ledger`: whether
    /// it was allowed and when the answer came, or the kind of failure and what was said.
    fn check(
        &self,
        conn: &mut Connection,
        entry: usize,
        rank: u32,
        body: &[u8],
        ledger: &mut Ledger,
    ) -> Result<(bool, Instant), (String, String)> {
        // The wall clock itself, read on each side (vDSO, tens of nanoseconds): windows are
        // named by it, and an offset from one reading would drift with NTP's slew.
        let sent = wall_nanos();
        let response = conn
            .post_json("/v1/check", body)
            .map_err(|e| (e.kind().to_owned(), e.to_string()))?;
        let received = Instant::now();
        let reply = read_reply(response.status, response.body)
            .map_err(|kind| (kind, String::from_utf8_lossy(response.body).into_owned()))?;
        let answer = Answer {
            sent,
            received: wall_nanos(),
            allowed: reply.allowed,
            rule: reply.rule.as_deref(),
            limit: reply.limit,
        };
        ledger.record(&self.mix, &self.mix.entries[entry], rank, &answer);
        Ok((reply.allowed, received))
    }

    /// Prints the first error of each kind.
    fn report_first(&self, kind: &str, addr: std::net::SocketAddr, detail: &str) {
        let Ok(mut reported) = self.live.reported.lock() else {
            return;
        };
        if reported.insert(kind.to_owned()) {
            let detail: String = detail.chars().take(300).collect();
            eprintln!("loadgen: first {kind} error, from {addr}: {detail}");
        }
    }

    fn summarize(
        &self,
        results: Vec<WorkerResult>,
        elapsed: Duration,
        before: &[Option<Decisions>],
        after: &[Option<Decisions>],
    ) -> Summary {
        let mut latencies = Vec::new();
        let mut ledger = Ledger::default();
        let mut per_edge = vec![Counts::default(); self.edges.len()];
        let mut per_entry = vec![Counts::default(); self.mix.entries.len()];
        let mut error_kinds = BTreeMap::new();
        let mut unsent = 0;
        for r in results {
            latencies.extend(r.latencies);
            ledger.merge(r.ledger);
            add_counts(&mut per_edge, &r.per_edge);
            add_counts(&mut per_entry, &r.per_entry);
            for (k, n) in r.errors {
                *error_kinds.entry(k).or_default() += n;
            }
            unsent += r.unsent;
        }
        let total = per_edge.iter().fold(Counts::default(), |mut t, c| {
            t.requests += c.requests;
            t.allowed += c.allowed;
            t.denied += c.denied;
            t.errors += c.errors;
            t
        });
        let deltas: Vec<Option<Decisions>> = before
            .iter()
            .zip(after)
            .map(|(b, a)| Some(a.as_ref()?.since(b.as_ref()?)))
            .collect();
        let decisions = deltas
            .iter()
            .flatten()
            .fold(None, |sum: Option<Decisions>, d| {
                let mut sum = sum.unwrap_or_default();
                sum.add(d);
                Some(sum)
            });
        let (limits, worst_windows) = ledger.report(&self.mix, self.worst);
        Summary {
            run_id: format!("{:08x}", self.run_id),
            target_rate: self.rate,
            elapsed_s: elapsed.as_secs_f64(),
            connections: self.connections,
            keys: self.keys,
            zipf: self.zipf_s,
            requests: total.requests,
            req_per_s: total.requests as f64 / elapsed.as_secs_f64().max(1e-9),
            allowed: total.allowed,
            denied: total.denied,
            errors: total.errors,
            error_kinds,
            unsent,
            latency_us: Latency::of(&mut latencies),
            local_ratio: decisions.as_ref().and_then(Decisions::local_ratio),
            local_ratio_not_near_limit: decisions
                .as_ref()
                .and_then(Decisions::local_ratio_not_near_limit),
            decisions,
            edges: self
                .edges
                .iter()
                .zip(&per_edge)
                .zip(&deltas)
                .enumerate()
                .map(|(i, ((e, c), d))| EdgeReport {
                    edge: e.to_string(),
                    share: self.edge_choice.probability(i),
                    requests: c.requests,
                    allowed: c.allowed,
                    denied: c.denied,
                    errors: c.errors,
                    local_ratio: d.as_ref().and_then(Decisions::local_ratio),
                })
                .collect(),
            entries: self
                .mix
                .entries
                .iter()
                .zip(&per_entry)
                .enumerate()
                .map(|(i, (e, c))| EntryReport {
                    name: e.name.clone(),
                    request: e.to_string(),
                    share: self.mix.share(i),
                    requests: c.requests,
                    allowed: c.allowed,
                    denied: c.denied,
                })
                .collect(),
            limits,
            worst_windows,
        }
    }
}

/// A check's answer, or the kind of error it is: `status_<code>` for anything but `200` and
/// `429`, `bad_json`, or `inconsistent` when the status and `allowed` disagree.
fn read_reply(status: u16, body: &[u8]) -> Result<Reply<'_>, String> {
    if status != 200 && status != 429 {
        return Err(format!("status_{status}"));
    }
    let reply: Reply<'_> = serde_json::from_slice(body).map_err(|_| "bad_json".to_owned())?;
    if reply.allowed != (status == 200) {
        return Err("inconsistent".to_owned());
    }
    Ok(reply)
}

fn add_counts(into: &mut [Counts], from: &[Counts]) {
    for (a, b) in into.iter_mut().zip(from) {
        a.requests += b.requests;
        a.allowed += b.allowed;
        a.denied += b.denied;
        a.errors += b.errors;
    }
}

/// Now, in nanoseconds since the Unix epoch (0 for a clock set before 1970).
fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_their_defaults() {
        let o = Options::try_parse_from(["loadgen"]).unwrap();
        assert_eq!(o.edges.len(), 4);
        assert_eq!(o.edges[2].region.as_deref(), Some("us"));
        assert_eq!((o.rate, o.open_loop), (1000.0, false));
        assert_eq!(o.duration, Duration::from_secs(10));
        let o = Options::try_parse_from([
            "loadgen",
            "--edge",
            "127.0.0.1:1",
            "--edge",
            "a=127.0.0.1:2",
            "--edge-weights",
            "3,1",
            "--open-loop",
            "--duration",
            "1500ms",
            "--mix",
            "login=1,search@pro=2",
        ])
        .unwrap();
        assert_eq!(o.edges.len(), 2);
        assert_eq!(o.edge_weights, [3.0, 1.0]);
        assert!(o.open_loop);
        assert_eq!(o.duration, Duration::from_millis(1500));
        assert_eq!(o.mix[1].target, "search@pro");
        assert!(Options::try_parse_from(["loadgen", "--duration", "10"]).is_err());
        assert!(Options::try_parse_from(["loadgen", "--rate", "5", "--open-loop"]).is_err());
    }

    #[test]
    fn the_schedule_spreads_the_rate_and_counts_what_was_not_sent() {
        let start = Instant::now();
        let mut s = Schedule {
            start,
            end: start + Duration::from_millis(10),
            rate: Some(1000.0),
            next: 1,
            step: 2,
        };
        let mut unsent = 0;
        let due: Vec<u128> = std::iter::from_fn(|| s.wait(&mut unsent))
            .map(|t| ((t - start).as_secs_f64() * 1e3).round() as u128)
            .collect();
        assert_eq!(due, [1, 3, 5, 7, 9], "worker 1 of 2 at 1000/s for 10 ms");
        assert_eq!(unsent, 0);
        // Still busy when the run ended, with j = 4, 6 and 8 due: three unsent.
        let start = Instant::now() - Duration::from_millis(20);
        let mut s = Schedule {
            start,
            end: start + Duration::from_millis(10),
            rate: Some(1000.0),
            next: 4,
            step: 2,
        };
        assert_eq!(s.wait(&mut unsent), None);
        assert_eq!(unsent, 3);
        s.rate = None;
        assert_eq!(s.wait(&mut unsent), None, "open loop ends at the end too");
    }

    #[test]
    fn answers_are_read_or_named() {
        let r = read_reply(429, br#"{"allowed":false,"limit":5,"remaining":0,"reset_at":60,"retry_after":3,"rule":"login","error":"rate_limit_exceeded","message":"m"}"#).unwrap();
        assert_eq!((r.allowed, r.limit), (false, 5));
        assert_eq!(r.rule.as_deref(), Some("login"));
        assert_eq!(read_reply(500, b"").unwrap_err(), "status_500");
        assert_eq!(read_reply(200, b"{").unwrap_err(), "bad_json");
        assert_eq!(
            read_reply(200, br#"{"allowed":false}"#).unwrap_err(),
            "inconsistent"
        );
    }
}

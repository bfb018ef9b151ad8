//! The Redis store: each ledger is one Redis hash, each limiter state a hash or (a sliding log)
//! a sorted set, changed only by atomic Lua scripts.
//!
//! A batch becomes one pipeline of `EVALSHA` calls, one per op (DESIGN §6). On a Redis
//! Cluster the batch is split by hash slot first, since a cluster pipeline must stay on one
//! slot, and the per-slot pipelines run concurrently. Bulk calls (sync batches, leases,
//! write-backs) and the calls a decision waits on (exact checks, refunds, states, reads) go
//! over two connections, so a check never queues behind a batch. Every key carries a hash tag,
//! `rl:{<limit>:<key>}:...`, so one limiter key's keys share a slot: a ledger script may read
//! the previous window (a sliding window's carry), and a log's two keys move together.
//!
//! | key | type | script |
//! |---|---|---|
//! | `rl:{<limit>:<key>}:<window>` | hash: the ledger | `ledger.lua` + `sync.lua`, `exact.lua`; `refund.lua`, `absorb.lua` |
//! | `rl:{<limit>:<key>}:lease:<window>` | hash: a token bucket's lease ledger (edges' grants) | `ledger.lua` + `time.lua` + `gcra.lua` |
//! | `rl:{<limit>:<key>}:gcra` | hash: a token bucket's TAT | `ledger.lua` + `time.lua` + `gcra.lua` |
//! | `rl:{<limit>:<key>}:leaky` | hash: a leaky bucket's level and last leak | `time.lua` + `leaky.lua` |
//! | `rl:{<limit>:<key>}:log`, `...:log:meta` | sorted set of entries; their sum and last id | `time.lua` + `log.lua` |
//! | `rl:partitions` | hash: what the region holds of each limit (`save_partitions`) | none: replaced whole after each push, in a transaction |
//!
//! Each limiter state has one script, which takes the action (`acquire`, `refund`, `absorb`)
//! as its first argument: the three actions must agree on the state's layout, and keeping them
//! in one file keeps that layout in one place. The limiter's kind is in the key name, so a rule
//! that changes algorithm starts from a fresh state (as `shared` reads a state of another
//! kind); one that changes back within the old state's TTL finds that state again, where the
//! memory store, keeping one state per key, has forgotten it.
//!
//! # Time in the scripts
//!
//! Lua numbers are doubles, exact for integers up to 2^53, about 104 days of nanoseconds, and a
//! 2026 time is about 1.8·10^18 ns since the epoch. So a time never crosses into Lua, or rests
//! in Redis, as one number: `now` is passed, and every time is stored, as whole seconds since
//! the epoch and nanoseconds within the second, two exact integers (a sorted-set entry keeps
//! the seconds as its score and the nanoseconds, zero-padded, at the front of its member, so the
//! set's order is time order). The scripts compute only with times relative to `now` and with
//! spans, which [`MAX_SPAN`](super::MAX_SPAN) keeps within 2^52, and add spans to stored pairs
//! with an exact carry; `time.lua` has the details. Every answer is therefore exact to the
//! nanosecond, which the store tests check with 2026 timestamps against `shared`.
//!
//! Every limiter-state key gets a TTL of [`STATE_GRACE`] past the time its state is back to a
//! fresh one's equivalent (a bucket full or empty, a log's newest entry out of the window).
//!
//! Scripts are sent by SHA. A node that does not have one yet (just started, failed over,
//! flushed) answers `NOSCRIPT` for that command only; those commands are sent again, in one
//! more pipeline, as `EVAL` with the body, which also caches it there. Nothing is sent twice
//! that already ran.
//!
//! Errors are classified once, in [`classify`]: connection loss, timeouts, `OOM`,
//! `READONLY`, `BUSY`, `LOADING`, `TRYAGAIN`, `CLUSTERDOWN` are transient (the breaker counts
//! them); a script error or a wrong type is permanent.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::future::try_join_all;
use redis::{
    Client, Cmd, Pipeline, RedisError, RedisResult, RetryMethod, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::Slot,
};
use shared::{
    LimitId, Nanos,
    algorithm::{LeakyMode, LimiterState, Outcome, Verdict},
    quota::EdgeId,
};

use super::{
    Absorb, Bounds, ExactOp, ExactReply, HeldShares, LEASE_LEDGER, LeaseOp, LeaseReply, LedgerKey,
    LedgerView, Refund, STATE_GRACE, StateAbsorb, StateKey, StateLimiter, StateOp, StateRefund,
    StateReply, Store, StoreError, StoreFuture, SyncOp, SyncReply,
};

const LEDGER: &str = include_str!("lua/ledger.lua");
const TIME: &str = include_str!("lua/time.lua");

/// Where Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTopology {
    /// One Redis (or a primary behind a stable address): `redis://host:port/db`.
    Single(String),
    /// A Redis Cluster, found from any of these seed nodes.
    Cluster(Vec<String>),
}

/// Ledgers in Redis. Clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    /// For the calls a decision waits on: exact checks, refunds, states, reads.
    conn: Conn,
    /// For the bulk ones: sync batches, leases, write-backs. Redis serves one connection's
    /// commands in order, so an exact check behind a sync batch of a thousand scripts (about
    /// 45 ms of them on a busy host) waited for all of them, past the breaker's timeout. On
    /// its own connection it waits at most for the part of a batch Redis has read at once.
    bulk: Conn,
    sync: Arc<Lua>,
    exact: Arc<Lua>,
    refund: Arc<Lua>,
    absorb: Arc<Lua>,
    gcra: Arc<Lua>,
    leaky: Arc<Lua>,
    log: Arc<Lua>,
}

/// A script's body and its SHA-1, the name `EVALSHA` calls it by.
struct Lua {
    body: String,
    sha: String,
}

impl Lua {
    fn new(body: String) -> Arc<Lua> {
        let sha = Script::new(&body).get_hash().to_owned();
        Arc::new(Lua { body, sha })
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("topology", &kind)
            .finish()
    }
}

/// Which of the two connections a call takes ([`RedisStore::bulk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Decide,
    Bulk,
}

#[derive(Clone)]
enum Conn {
    /// Reconnects by itself; a command fails fast while the server is away.
    Single(ConnectionManager),
    /// Follows the slot map, redirections and failovers by itself.
    Cluster(ClusterConnection),
}

impl RedisStore {
    /// Connects, with `timeout` bounding each connection attempt and each response. A single
    /// Redis that is down now is not an error (commands fail until it is back, which the
    /// circuit breaker sees); a cluster must answer once, to learn its slot map.
    pub async fn connect(
        topology: &RedisTopology,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let conn = Self::connection(topology, timeout).await?;
        let bulk = Self::connection(topology, timeout).await?;
        Ok(RedisStore {
            conn,
            bulk,
            sync: Lua::new(format!("{LEDGER}\n{}", include_str!("lua/sync.lua"))),
            exact: Lua::new(format!("{LEDGER}\n{}", include_str!("lua/exact.lua"))),
            refund: Lua::new(include_str!("lua/refund.lua").to_owned()),
            absorb: Lua::new(include_str!("lua/absorb.lua").to_owned()),
            gcra: Lua::new(format!(
                "{LEDGER}\n{TIME}\n{}",
                include_str!("lua/gcra.lua")
            )),
            leaky: Lua::new(format!("{TIME}\n{}", include_str!("lua/leaky.lua"))),
            log: Lua::new(format!("{TIME}\n{}", include_str!("lua/log.lua"))),
        })
    }

    /// One connection (a cluster's: one per node) to `topology`.
    async fn connection(topology: &RedisTopology, timeout: Duration) -> Result<Conn, StoreError> {
        Ok(match topology {
            RedisTopology::Single(url) => {
                let client = Client::open(url.as_str()).map_err(classify)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(timeout);
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, config).map_err(classify)?,
                )
            }
            RedisTopology::Cluster(seeds) => {
                let client = ClusterClient::builder(seeds.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()
                    .map_err(classify)?;
                Conn::Cluster(client.get_async_connection().await.map_err(classify)?)
            }
        })
    }

    /// Runs one script call per item, grouped into pipelines (one per slot on a cluster),
    /// and returns each call's integers in item order.
    async fn run(&self, lane: Lane, calls: Vec<Call<'_>>) -> Result<Vec<Vec<i64>>, StoreError> {
        let groups: Vec<Vec<usize>> = match self.conn {
            Conn::Single(_) => vec![(0..calls.len()).collect()],
            Conn::Cluster(_) => {
                let mut by_slot: HashMap<Slot, Vec<usize>> = HashMap::new();
                for (i, call) in calls.iter().enumerate() {
                    let slot = Slot::for_key(call.keys[0].as_bytes());
                    by_slot.entry(slot).or_default().push(i);
                }
                by_slot.into_values().collect()
            }
        };
        let answers = try_join_all(groups.iter().map(|g| self.run_group(lane, &calls, g))).await?;
        let mut out = vec![Vec::new(); calls.len()];
        for (group, answer) in groups.iter().zip(answers) {
            for (&i, values) in group.iter().zip(answer) {
                out[i] = values;
            }
        }
        Ok(out)
    }

    /// One pipeline. Calls answered `NOSCRIPT` (Redis restarted, or its script cache was
    /// flushed) are sent again in one more pipeline with the scripts' bodies, which loads them
    /// for the calls after.
    async fn run_group(
        &self,
        lane: Lane,
        calls: &[Call<'_>],
        group: &[usize],
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let mut pipe = Pipeline::with_capacity(group.len());
        pipe.ignore_errors();
        for &i in group {
            pipe.add_command(calls[i].command(false));
        }
        let results: Vec<RedisResult<Vec<i64>>> = self.query(lane, &pipe).await?;
        if results.len() != group.len() {
            return Err(StoreError::Permanent(format!(
                "pipeline of {} commands answered {} results",
                group.len(),
                results.len()
            )));
        }
        let mut out = Vec::with_capacity(group.len());
        // Positions in `out` (and indices into `calls`) of the calls to send again.
        let mut missing = Vec::new();
        for (&i, result) in group.iter().zip(results) {
            match result {
                Ok(values) => out.push(values),
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    missing.push((out.len(), i));
                    out.push(Vec::new());
                }
                Err(e) => return Err(classify(e)),
            }
        }
        if !missing.is_empty() {
            let mut again = Pipeline::with_capacity(missing.len());
            for &(_, i) in &missing {
                again.add_command(calls[i].command(true));
            }
            let answers: Vec<Vec<i64>> = self.query(lane, &again).await?;
            if answers.len() != missing.len() {
                return Err(StoreError::Permanent(format!(
                    "pipeline of {} EVALs answered {} results",
                    missing.len(),
                    answers.len()
                )));
            }
            for ((at, _), values) in missing.into_iter().zip(answers) {
                out[at] = values;
            }
        }
        Ok(out)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        lane: Lane,
        pipe: &Pipeline,
    ) -> Result<T, StoreError> {
        let conn = match lane {
            Lane::Decide => &self.conn,
            Lane::Bulk => &self.bulk,
        };
        match conn {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
        .map_err(classify)
    }

    fn call<'s>(&'s self, script: &'s Lua, at: &LedgerKey) -> Call<'s> {
        let previous = match at.previous() {
            Some(p) => ledger_key(&p),
            // Window 0 has no previous window; a key that never exists, on the same slot.
            None => format!("{}:none", ledger_key(at)),
        };
        Call {
            script,
            keys: vec![ledger_key(at), previous],
            args: Vec::with_capacity(9),
        }
    }

    /// A call of the script for `limiter`'s state at `at`, its action and `now` as the first
    /// arguments.
    fn state_call(
        &self,
        limiter: &StateLimiter,
        at: &StateKey,
        action: &str,
        now: Nanos,
    ) -> Call<'_> {
        let (script, keys) = match limiter {
            StateLimiter::TokenBucket(_) => (&self.gcra, vec![state_key(at, "gcra")]),
            StateLimiter::LeakyBucket(_) => (&self.leaky, vec![state_key(at, "leaky")]),
            StateLimiter::SlidingLog(_) => (
                &self.log,
                vec![state_key(at, "log"), state_key(at, "log:meta")],
            ),
        };
        let call = Call {
            script,
            keys,
            args: Vec::with_capacity(10),
        };
        call.arg(action).time(now)
    }
}

/// One script call: the script, its keys (all on one slot; the first decides which), its args.
struct Call<'s> {
    script: &'s Lua,
    keys: Vec<String>,
    args: Vec<String>,
}

impl Call<'_> {
    fn arg(mut self, value: impl ToString) -> Self {
        self.args.push(value.to_string());
        self
    }

    /// The tail both ledger scripts take: partition, θ·P, n, carry weight, TTL.
    fn bounds(self, bounds: &Bounds, now: Nanos, expire_at: Nanos) -> Self {
        self.arg(bounds.partition)
            .arg(bounds.ceiling())
            .arg(bounds.edges)
            .arg(bounds.carry_ppm)
            .arg(ttl_ms(now, expire_at))
    }

    /// A time as the state scripts take it: whole seconds, then nanoseconds (`time.lua`).
    fn time(self, t: Nanos) -> Self {
        let (s, ns) = split(t);
        self.arg(s).arg(ns)
    }

    fn command(&self, with_body: bool) -> Cmd {
        let mut cmd = if with_body {
            redis::cmd("EVAL")
        } else {
            redis::cmd("EVALSHA")
        };
        cmd.arg(if with_body {
            &self.script.body
        } else {
            &self.script.sha
        });
        cmd.arg(self.keys.len()).arg(&self.keys[..]).arg(&self.args);
        cmd
    }
}

/// Where `save_partitions` keeps what the region holds: one small hash per region's store,
/// fields the limit ids in hex, values `cleared;from:ppm,from:ppm` ([`encode_held`]).
const PARTITIONS_KEY: &str = "rl:partitions";
/// Its time to live, renewed by every write (every push of partitions): a region that has
/// heard nothing from its coordinator for a week starts afresh, and every key carries a TTL
/// (DESIGN §6).
const PARTITIONS_TTL_SECS: i64 = 7 * 24 * 3600;

/// `h` as `cleared;from:ppm,from:ppm`.
fn encode_held(h: &HeldShares) -> String {
    let schedule: Vec<String> = h
        .schedule
        .iter()
        .map(|(from, ppm)| format!("{from}:{ppm}"))
        .collect();
    format!("{};{}", h.cleared, schedule.join(","))
}

/// The inverse of [`encode_held`] for field `limit`; `None` when either is not what it wrote.
fn decode_held(limit: &str, value: &str) -> Option<HeldShares> {
    let limit = LimitId(u64::from_str_radix(limit, 16).ok()?);
    let (cleared, schedule) = value.split_once(';')?;
    let schedule = schedule
        .split(',')
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (from, ppm) = entry.split_once(':')?;
            Some((from.parse().ok()?, ppm.parse().ok()?))
        })
        .collect::<Option<Vec<(u64, u32)>>>()?;
    Some(HeldShares {
        limit,
        schedule,
        cleared: cleared.parse().ok()?,
    })
}

/// `rl:{<limit>:<key>}:<window>`, or `...:lease:<window>` for a lease ledger: the braces are
/// the hash tag, so every window of one limiter key lands on one cluster slot.
fn ledger_key(at: &LedgerKey) -> String {
    if at.is_lease() {
        let window = at.window & !LEASE_LEDGER;
        return format!("rl:{{{:016x}:{}}}:lease:{window}", at.limit.0, at.key);
    }
    format!("rl:{{{:016x}:{}}}:{}", at.limit.0, at.key, at.window)
}

/// `rl:{<limit>:<key>}:<kind>`: a limiter state, with the same hash tag as the key's ledgers.
/// No ledger is named like it: a ledger's name ends in a window number.
fn state_key(at: &StateKey, kind: &str) -> String {
    format!("rl:{{{:016x}:{}}}:{kind}", at.limit.0, at.key)
}

/// A time as whole seconds since the epoch and nanoseconds within the second.
fn split(t: Nanos) -> (u64, u64) {
    (t.as_u64() / NANOS_PER_SEC, t.as_u64() % NANOS_PER_SEC)
}

/// The time a script answered as `(seconds, nanoseconds)`.
fn join(s: i64, ns: i64) -> Option<Nanos> {
    let (s, ns) = (u64::try_from(s).ok()?, u64::try_from(ns).ok()?);
    (ns < NANOS_PER_SEC).then(|| Nanos(s.saturating_mul(NANOS_PER_SEC).saturating_add(ns)))
}

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// The grace every limiter-state TTL adds, in whole milliseconds.
fn grace_ms() -> u64 {
    STATE_GRACE.as_u64().div_ceil(1_000_000)
}

/// A span in nanoseconds as a script takes it; every span a [`StateLimiter`] has is at most
/// [`MAX_SPAN`](super::MAX_SPAN), far below `u64::MAX`.
fn span(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A log's entries, each with `k`: how many entries of the same time and cost come before it.
/// Entries of one time leave the log together, new ones join at the end and a refund removes
/// the last of its kind, so an entry keeps its `k`, and with it its member, across write-backs.
fn numbered(entries: impl Iterator<Item = (Nanos, u32)>) -> Vec<(Nanos, u32, u32)> {
    let mut out = Vec::new();
    let mut same_time: Vec<(u32, u32)> = Vec::new();
    let mut time = None;
    for (at, cost) in entries {
        if time != Some(at) {
            same_time.clear();
            time = Some(at);
        }
        let k = match same_time.iter_mut().find(|(c, _)| *c == cost) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                same_time.push((cost, 0));
                0
            }
        };
        out.push((at, cost, k));
    }
    out
}

/// A state script's answer to `acquire`, `{verdict, remaining, reset_s, reset_ns, wait, id}`,
/// as the reply `shared` would give for `limiter`.
fn state_reply(limiter: &StateLimiter, v: &[i64]) -> Result<StateReply, StoreError> {
    let bad = || reply_error("limiter state", v);
    let &[verdict, remaining, reset_s, reset_ns, wait, id] = v else {
        return Err(bad());
    };
    let wait = Nanos(u64::try_from(wait).map_err(|_| bad())?);
    let (verdict, retry_after) = match verdict {
        0 => (Verdict::Allow, Nanos::ZERO),
        1 => (Verdict::Delay { after: wait }, Nanos::ZERO),
        2 => (Verdict::Deny, wait),
        3 => (Verdict::InsufficientCapacity, Nanos::MAX),
        _ => return Err(bad()),
    };
    Ok(StateReply {
        outcome: Outcome {
            verdict,
            limit: limiter.limiter().limit(),
            remaining: u64::try_from(remaining).map_err(|_| bad())?,
            reset_at: join(reset_s, reset_ns).ok_or_else(bad)?,
            retry_after,
        },
        receipt: u64::try_from(id).map_err(|_| bad())?,
        unknown: false,
    })
}

fn edge_field(edge: EdgeId) -> String {
    format!("{:016x}", edge.0)
}

/// Milliseconds from `now` until `expire_at`, at least one (a TTL of zero deletes).
fn ttl_ms(now: Nanos, expire_at: Nanos) -> u64 {
    (expire_at - now).as_u64().div_ceil(1_000_000).max(1)
}

/// Decides, once, whether a Redis error is worth retrying.
fn classify(e: RedisError) -> StoreError {
    // A full, read-only (failing over), loading or busy Redis is away for a while, not
    // refusing this call for what it is: the breaker must count these.
    if matches!(
        e.code(),
        Some("OOM" | "READONLY" | "MASTERDOWN" | "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN")
    ) {
        return StoreError::Transient(e.to_string());
    }
    if matches!(
        e.kind(),
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
    ) {
        // Our scripts answered something we do not read: the same call fails the same way.
        return StoreError::Permanent(e.to_string());
    }
    match e.retry_method() {
        RetryMethod::NoRetry => StoreError::Permanent(e.to_string()),
        _ => StoreError::Transient(e.to_string()),
    }
}

fn reply_error(what: &str, values: &[i64]) -> StoreError {
    StoreError::Permanent(format!("{what} script answered {values:?}"))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store for RedisStore {
    fn sync<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [SyncOp],
    ) -> StoreFuture<'a, Vec<SyncReply>> {
        Box::pin(async move {
            let field = edge_field(edge);
            let calls = ops
                .iter()
                .map(|op| {
                    self.call(&self.sync, &op.at)
                        .arg(&field)
                        .arg(op.used)
                        .arg(op.released)
                        .arg(op.want)
                        .bounds(&op.bounds, now, op.expire_at)
                })
                .collect();
            self.run(Lane::Bulk, calls)
                .await?
                .into_iter()
                .map(|v| match v[..] {
                    [granted, used, released, total, reserved, near, recall] => Ok(SyncReply {
                        granted: count(granted),
                        used: count(used),
                        released: count(released),
                        total: count(total),
                        reserved: count(reserved),
                        near_limit: near == 1,
                        recall: recall == 1,
                    }),
                    _ => Err(reply_error("sync", &v)),
                })
                .collect()
        })
    }

    fn exact<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [ExactOp],
    ) -> StoreFuture<'a, Vec<ExactReply>> {
        Box::pin(async move {
            let field = edge_field(edge);
            let calls = ops
                .iter()
                .map(|op| {
                    self.call(&self.exact, &op.at)
                        .arg(&field)
                        .arg(op.cost)
                        .arg(op.want)
                        .bounds(&op.bounds, now, op.expire_at)
                })
                .collect();
            self.run(Lane::Decide, calls)
                .await?
                .into_iter()
                .map(|v| match v[..] {
                    [allowed, granted, remaining, near, held, total, previous] => Ok(ExactReply {
                        allowed: allowed == 1,
                        granted: count(granted),
                        remaining: count(remaining),
                        near_limit: near == 1,
                        held: held == 1,
                        total: count(total),
                        previous: count(previous),
                    }),
                    _ => Err(reply_error("exact", &v)),
                })
                .collect()
        })
    }

    fn refund<'a>(&'a self, refunds: &'a [Refund]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let calls = refunds
                .iter()
                .map(|r| self.call(&self.refund, &r.at).arg(r.cost))
                .collect();
            self.run(Lane::Decide, calls).await.map(|_| ())
        })
    }

    fn absorb<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        ledgers: &'a [Absorb],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let calls = ledgers
                .iter()
                .map(|a| {
                    let mut call = self
                        .call(&self.absorb, &a.at)
                        .arg(tag)
                        .arg(a.view.exact)
                        .arg(u8::from(a.view.near_limit))
                        .arg(ttl_ms(now, a.expire_at));
                    for (edge, c) in &a.view.edges {
                        call = call
                            .arg(edge_field(*edge))
                            .arg(c.granted)
                            .arg(c.released)
                            .arg(c.used);
                    }
                    call
                })
                .collect();
            self.run(Lane::Bulk, calls).await.map(|_| ())
        })
    }

    fn ledger<'a>(&'a self, at: &'a LedgerKey) -> StoreFuture<'a, Option<LedgerView>> {
        Box::pin(async move {
            let mut pipe = Pipeline::with_capacity(1);
            pipe.hgetall(ledger_key(at));
            let (fields,): (Vec<(String, String)>,) = self.query(Lane::Decide, &pipe).await?;
            if fields.is_empty() {
                return Ok(None);
            }
            let mut view = LedgerView::default();
            // `x` may be below zero after a refund against tagged write-backs (refund.lua);
            // the total is clamped at zero, as the scripts read it.
            let mut exact: i64 = 0;
            for (field, value) in fields {
                let bad = || StoreError::Permanent(format!("ledger field {field} = {value:?}"));
                let signed: i64 = value.parse().map_err(|_| bad())?;
                if field == "x" || field.starts_with("x:") {
                    exact = exact.saturating_add(signed);
                    continue;
                }
                let n = u64::try_from(signed).map_err(|_| bad())?;
                match field.as_str() {
                    "nl" => view.near_limit = true,
                    _ => {
                        let (kind, edge) = field.split_once(':').ok_or_else(bad)?;
                        let edge = EdgeId(u64::from_str_radix(edge, 16).map_err(|_| bad())?);
                        let i = match view.edges.binary_search_by_key(&edge, |(e, _)| *e) {
                            Ok(i) => i,
                            Err(i) => {
                                view.edges.insert(i, (edge, Default::default()));
                                i
                            }
                        };
                        let c = &mut view.edges[i].1;
                        match kind {
                            "g" => c.granted = n,
                            "r" => c.released = n,
                            "u" => c.used = n,
                            _ => return Err(bad()),
                        }
                    }
                }
            }
            view.exact = u64::try_from(exact).unwrap_or(0);
            Ok(Some(view))
        })
    }

    fn acquire_state<'a>(
        &'a self,
        now: Nanos,
        ops: &'a [StateOp],
    ) -> StoreFuture<'a, Vec<StateReply>> {
        Box::pin(async move {
            let calls = ops
                .iter()
                .map(|op| {
                    let mut call = self.state_call(&op.limiter, &op.at, "acquire", now);
                    // A token bucket's lease ledgers, whose unused grants are parked first.
                    call.keys
                        .extend(op.leases(now).iter().flatten().map(ledger_key));
                    let cost = op.cost.get();
                    match op.limiter {
                        StateLimiter::TokenBucket(g) => call
                            .arg(g.emission_interval().as_u64())
                            .arg(g.burst())
                            .arg(g.refill_time().as_u64())
                            .arg(cost)
                            .arg(grace_ms()),
                        StateLimiter::LeakyBucket(b) => call
                            .arg(b.drain_interval().as_u64())
                            .arg(b.capacity())
                            .arg(b.drain_time().as_u64())
                            .arg(cost)
                            .arg(u8::from(b.mode() == LeakyMode::Shaper))
                            .arg(grace_ms()),
                        StateLimiter::SlidingLog(l) => call
                            .arg(l.window().as_u64())
                            .arg(l.limit())
                            .arg(cost)
                            .arg(grace_ms()),
                    }
                })
                .collect();
            self.run(Lane::Decide, calls)
                .await?
                .iter()
                .zip(ops)
                .map(|(v, op)| state_reply(&op.limiter, v))
                .collect()
        })
    }

    fn lease<'a>(
        &'a self,
        edge: EdgeId,
        now: Nanos,
        ops: &'a [LeaseOp],
    ) -> StoreFuture<'a, Vec<LeaseReply>> {
        Box::pin(async move {
            let field = edge_field(edge);
            let calls = ops
                .iter()
                .map(|op| {
                    let limiter = StateLimiter::TokenBucket(op.limiter);
                    let mut call = self.state_call(&limiter, &op.state(), "lease", now);
                    call.keys.push(ledger_key(&op.at));
                    call.keys.push(ledger_key(&op.other));
                    let burst = op.limiter.burst().get();
                    call.arg(op.limiter.emission_interval().as_u64())
                        .arg(burst)
                        .arg(&field)
                        .arg(op.used)
                        .arg(op.released)
                        .arg(op.want)
                        .arg(op.threshold.of(burst))
                        .arg(op.edges.max(1))
                        .arg(ttl_ms(now, op.expire_at))
                        .arg(grace_ms())
                })
                .collect();
            self.run(Lane::Bulk, calls)
                .await?
                .iter()
                .map(|v| match v[..] {
                    [granted, used, released, admitted, level, recall] => Ok(LeaseReply {
                        granted: count(granted),
                        used: count(used),
                        released: count(released),
                        admitted: count(admitted),
                        level: count(level),
                        recall: recall == 1,
                    }),
                    _ => Err(reply_error("lease", v)),
                })
                .collect()
        })
    }

    fn refund_state<'a>(&'a self, now: Nanos, refunds: &'a [StateRefund]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let calls = refunds
                .iter()
                .map(|r| {
                    let call = self.state_call(&r.limiter, &r.at, "refund", now);
                    let cost = u128::from(r.cost.get());
                    match r.limiter {
                        // Where the acquire started: its `reset_at` less what it took (as
                        // `shared`'s refunds read it).
                        StateLimiter::TokenBucket(g) => {
                            let taken = span(cost * u128::from(g.emission_interval().as_u64()));
                            call.arg(taken).time(r.admitted.reset_at - Nanos(taken))
                        }
                        StateLimiter::LeakyBucket(b) => {
                            let taken = span(cost * u128::from(b.drain_interval().as_u64()));
                            call.arg(taken).time(r.admitted.reset_at - Nanos(taken))
                        }
                        StateLimiter::SlidingLog(l) => {
                            let (_, stamp_ns) = split(r.admitted.reset_at - l.window());
                            call.arg(stamp_ns).arg(r.receipt).arg(cost)
                        }
                    }
                })
                .collect();
            self.run(Lane::Decide, calls).await.map(|_| ())
        })
    }

    fn absorb_state<'a>(
        &'a self,
        tag: &'a str,
        now: Nanos,
        states: &'a [StateAbsorb],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let calls = states
                .iter()
                .filter_map(|a| {
                    let call = self.state_call(&a.limiter, &a.at, "absorb", now);
                    let call = match (a.limiter, &a.state) {
                        (StateLimiter::TokenBucket(_), LimiterState::TokenBucket(s)) => {
                            call.time(s.tat)
                        }
                        (StateLimiter::LeakyBucket(_), LimiterState::LeakyBucket(s)) => {
                            call.arg(s.level.as_u64()).time(s.last)
                        }
                        (StateLimiter::SlidingLog(l), LimiterState::SlidingLog(s)) => {
                            let mut call = call.arg(l.window().as_u64()).arg(tag).arg(grace_ms());
                            for (at, cost, k) in numbered(s.entries()) {
                                call = call.time(at).arg(cost).arg(k);
                            }
                            return Some(call);
                        }
                        // A state of another kind than its limiter: nothing to write.
                        _ => return None,
                    };
                    Some(call.arg(grace_ms()))
                })
                .collect();
            self.run(Lane::Bulk, calls).await.map(|_| ())
        })
    }

    fn save_partitions<'a>(&'a self, held: &'a [HeldShares]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Replaced whole, atomically: a limit no longer held is gone from the hash.
            let mut pipe = Pipeline::with_capacity(3);
            pipe.atomic().del(PARTITIONS_KEY).ignore();
            if !held.is_empty() {
                let fields: Vec<(String, String)> = held
                    .iter()
                    .map(|h| (format!("{:016x}", h.limit.0), encode_held(h)))
                    .collect();
                pipe.hset_multiple(PARTITIONS_KEY, &fields).ignore();
                pipe.expire(PARTITIONS_KEY, PARTITIONS_TTL_SECS).ignore();
            }
            self.query::<()>(Lane::Bulk, &pipe).await
        })
    }

    fn partitions(&self) -> StoreFuture<'_, Vec<HeldShares>> {
        Box::pin(async move {
            let mut pipe = Pipeline::with_capacity(1);
            pipe.hgetall(PARTITIONS_KEY);
            let (fields,): (Vec<(String, String)>,) = self.query(Lane::Decide, &pipe).await?;
            fields
                .iter()
                .map(|(limit, value)| {
                    decode_held(limit, value).ok_or_else(|| {
                        StoreError::Permanent(format!("{PARTITIONS_KEY} {limit}: {value:?}"))
                    })
                })
                .collect()
        })
    }
}

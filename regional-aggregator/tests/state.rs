//! Limiter states (token bucket, leaky bucket, sliding log) on every store, and their Lua
//! scripts held to `shared::algorithm` as the specification.
//!
//! The spec tests run one random sequence of acquires and refunds three ways at once: on a
//! fresh [`MemoryStore`], on Redis (one server, or a three-master cluster), and on a plain map
//! of `shared` states driven by `shared::algorithm` itself, which never forgets a state. Every
//! reply is compared with the other two, outcome for outcome. Times are 2026 Unix times in
//! nanoseconds (about 1.8·10^18, far past the 2^53 where Lua's doubles stop being exact; the
//! runs of one test go on into the early 2030s), going forward by gaps of zero, under a
//! microsecond, about one emission interval or window, longer than a window or a whole
//! refill, and now and then by two months (further than any span a store keeps), with an
//! occasional step back of up to a microsecond (regional replicas' clocks disagree). Costs go past the capacity. Keys carry `{`, `}` and `:`, and several ops
//! travel in one batch (one pipeline, split by slot on a cluster); a bucket's refund is now and
//! then repeated, where only its floor keeps it from giving back more. A hand mutation of the
//! scripts (`<=` to `<` in `gcra.lua`'s fit test, for one) fails these tests.

use std::{
    collections::{HashMap, HashSet},
    num::{NonZeroU32, NonZeroU64},
    sync::Arc,
    time::Duration,
};

use regional_aggregator::store::{
    LeaseOp, LedgerKey, MAX_SPAN, MemoryStore, RedisStore, RedisTopology, STATE_GRACE, StateAbsorb,
    StateKey, StateLimiter, StateOp, StateReply, Store,
};
use shared::{
    LimitId, Nanos,
    algorithm::{
        Gcra, LeakyBucket, LeakyMode, Limiter, LimiterState, Outcome, SlidingLog, Verdict,
    },
    quota::{DEFAULT_THRESHOLD, EdgeId, lease::LEASE_WINDOW},
    sim::Rng,
};

use crate::support::redis::{RedisCluster, RedisServer};

/// 2026-01-01T00:00:00.123456789Z: not a round number of seconds, so the nanoseconds count.
const T0: Nanos = Nanos(1_767_225_600_123_456_789);

const DAY: u64 = 86_400_000_000_000;

const KEYS: [&str; 5] = ["a", "{b}", "c:d", "}{:e", "user:{42}:x"];

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).expect("test limits are not zero")
}

fn cost(c: u32) -> NonZeroU32 {
    NonZeroU32::new(c).expect("test costs are not zero")
}

fn token_bucket(limit: u64, period: Nanos, burst: u64) -> StateLimiter {
    let g = Gcra::new(nz(limit), period, nz(burst)).expect("a valid test bucket");
    StateLimiter::new(&Limiter::TokenBucket(g)).expect("within MAX_SPAN")
}

fn leaky_bucket(limit: u64, period: Nanos, capacity: u64, mode: LeakyMode) -> StateLimiter {
    let b = LeakyBucket::new(nz(limit), period, nz(capacity), mode).expect("a valid test bucket");
    StateLimiter::new(&Limiter::LeakyBucket(b)).expect("within MAX_SPAN")
}

fn sliding_log(limit: u64, window: Nanos) -> StateLimiter {
    let l = SlidingLog::new(nz(limit), window).expect("a valid test log");
    StateLimiter::new(&Limiter::SlidingLog(l)).expect("within MAX_SPAN")
}

fn state_key(limit: &str, key: &str) -> StateKey {
    StateKey {
        limit: LimitId::from_name(limit),
        key: key.into(),
    }
}

fn op(at: &StateKey, limiter: StateLimiter, c: u32) -> StateOp {
    StateOp {
        at: at.clone(),
        limiter,
        cost: cost(c),
        exact_since: None,
    }
}

async fn acquire(store: &dyn Store, now: Nanos, op: &StateOp) -> StateReply {
    store
        .acquire_state(now, std::slice::from_ref(op))
        .await
        .expect("the store answers")[0]
}

async fn refund(store: &dyn Store, now: Nanos, op: &StateOp, reply: &StateReply) {
    let refund = op.refund(reply).expect("refund only what was admitted");
    store
        .refund_state(now, &[refund])
        .await
        .expect("the store answers");
}

// ---------------------------------------------------------------------------------------------
// The specification: `shared::algorithm` on a map that never forgets.

#[derive(Default)]
struct Spec {
    states: HashMap<StateKey, LimiterState>,
}

impl Spec {
    fn acquire(&mut self, now: Nanos, op: &StateOp) -> Outcome {
        let limiter = op.limiter.limiter();
        let state = self
            .states
            .entry(op.at.clone())
            .or_insert_with(|| limiter.new_state());
        limiter.acquire(state, now, op.cost)
    }

    fn refund(&mut self, now: Nanos, op: &StateOp, admitted: &Outcome) {
        let Some(state) = self.states.get_mut(&op.at) else {
            return;
        };
        match (op.limiter, state) {
            (StateLimiter::TokenBucket(g), LimiterState::TokenBucket(s)) => {
                g.refund(s, admitted, op.cost);
            }
            (StateLimiter::LeakyBucket(b), LimiterState::LeakyBucket(s)) => {
                b.refund(s, now, admitted, op.cost);
            }
            (StateLimiter::SlidingLog(l), LimiterState::SlidingLog(s)) => {
                l.refund(s, admitted, op.cost);
            }
            _ => unreachable!("one limiter per key in these runs"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    TokenBucket,
    LeakyBucket,
    SlidingLog,
}

/// A random limiter of `kind`: everyday rates (a few per second, per minute) with periods
/// that do not divide evenly, tiny emission intervals, and one span of 30 days, about 2^51 ns.
fn random_limiter(kind: Kind, rng: &mut Rng) -> StateLimiter {
    let period = match rng.below(5) {
        0 => Nanos::from_secs(1),
        1 => Nanos::from_secs(60),
        2 => Nanos(1_000_000_007 + rng.below(1_000)),
        3 => Nanos(1 + rng.below(5_000)),
        _ => Nanos(30 * DAY),
    };
    let capacity = 1 + rng.below(8);
    let limit = match period.as_u64() {
        // An interval of at least one nanosecond.
        ..100 => 1,
        // A span of at most 30 days.
        p if p == 30 * DAY => capacity,
        _ => 1 + rng.below(12),
    };
    match kind {
        Kind::TokenBucket => token_bucket(limit, period, capacity),
        Kind::LeakyBucket => {
            let mode = if rng.chance(500_000) {
                LeakyMode::Shaper
            } else {
                LeakyMode::Meter
            };
            leaky_bucket(limit, period, capacity, mode)
        }
        Kind::SlidingLog => sliding_log(capacity, Nanos(period.as_u64() / limit)),
    }
}

/// The time scales a run's gaps are drawn around: a limiter's interval and its span.
fn scales(limiter: &StateLimiter) -> [u64; 2] {
    match limiter {
        StateLimiter::TokenBucket(g) => [g.emission_interval().as_u64(), g.refill_time().as_u64()],
        StateLimiter::LeakyBucket(b) => [b.drain_interval().as_u64(), b.drain_time().as_u64()],
        StateLimiter::SlidingLog(l) => [l.window().as_u64() / 3 + 1, l.window().as_u64()],
    }
}

/// The next `now`: mostly forward by one of the gaps the module doc lists, sometimes back.
fn step(rng: &mut Rng, now: Nanos, scale: u64) -> Nanos {
    match rng.below(40) {
        0..=7 => now,
        8..=17 => now + Nanos(1 + rng.below(999)),
        18..=25 => now + Nanos(rng.below(scale + 1)),
        26..=29 => now + Nanos(scale - 1 + rng.below(3)),
        30..=33 => now + Nanos(scale * (1 + rng.below(3)) + rng.below(scale)),
        34..=36 => now + Nanos(rng.below(1_000_000)),
        37 if rng.below(4) == 0 => now + Nanos(60 * DAY + rng.below(DAY)),
        37 => now + Nanos(rng.below(1_000)),
        // Back: by up to a microsecond, often by the least there is.
        _ if rng.chance(300_000) => now - Nanos(1),
        _ => now - Nanos(rng.below(1_000)),
    }
}

/// An admission that may still be refunded, as each store and the spec answered it.
struct Admitted {
    op: StateOp,
    spec: Outcome,
    memory: StateReply,
    redis: StateReply,
}

/// Runs sharing a memory store (limit names are each seed's own), in one stretch of time, so
/// that the store's sweeps of forgotten states happen in the middle of one.
struct Runs {
    memory: MemoryStore,
    now: Nanos,
    touched: HashSet<StateKey>,
    /// The longest step forward so far: past [`MAX_SPAN`], the scripts' clamp was used.
    longest_gap: Nanos,
}

impl Runs {
    fn new() -> Runs {
        Runs {
            memory: MemoryStore::new(),
            now: T0,
            touched: HashSet::new(),
            longest_gap: Nanos::ZERO,
        }
    }

    /// The memory store has dropped some of the states the runs touched.
    fn swept(&self) -> bool {
        self.memory.state_count() < self.touched.len()
    }
}

/// One random run of `ops` steps on limiters of `kind`, going on from `runs.now`: the memory
/// store, `redis` and the spec agree on every outcome.
async fn lua_matches_shared(runs: &mut Runs, redis: &dyn Store, kind: Kind, seed: u64, ops: usize) {
    let memory = &runs.memory;
    let mut spec = Spec::default();
    let mut rng = Rng::new(seed);
    // Limit names of this seed's own, so runs share a Redis without sharing states.
    let limiters: Vec<(String, StateLimiter)> = (0..3)
        .map(|i| {
            let limiter = random_limiter(kind, &mut rng);
            (format!("spec-{kind:?}-{seed}-{i}"), limiter)
        })
        .collect();
    let mut admitted: Vec<Admitted> = Vec::new();
    let mut now = runs.now + Nanos(rng.below(1_000_000_000));
    let mut refunds = 0;
    for step_no in 0..ops {
        let (_, scale_of) = &limiters[rng.below(3) as usize];
        let mut scale = scales(scale_of)[rng.below(2) as usize].max(1);
        // A 30-day span sets the pace only now and then, or the run leaves the 2020s.
        if scale > DAY && !rng.chance(100_000) {
            scale = scale % DAY + 1;
        }
        let before = now;
        now = step(&mut rng, now, scale);
        runs.longest_gap = runs.longest_gap.max(now - before);
        let context =
            |what: &str| format!("seed {seed} step {step_no} at {}: {what}", now.as_u64());

        if rng.below(5) == 0 && !admitted.is_empty() {
            // Take back an earlier admission, maybe long after and with others in between.
            let a = admitted.swap_remove(rng.below(admitted.len() as u64) as usize);
            spec.refund(now, &a.op, &a.spec);
            refund(memory, now, &a.op, &a.memory).await;
            refund(redis, now, &a.op, &a.redis).await;
            refunds += 1;
            // A bucket's refund may come again (a retried call): it never gives back more
            // than the acquire took. (A log's second refund would remove another entry of
            // the same time and cost in `shared`, and nothing on Redis: callers refund once.)
            if kind != Kind::SlidingLog && rng.chance(300_000) {
                admitted.push(a);
            }
            continue;
        }

        // One to three ops; a quarter of the batches put them all on one key.
        let one_key = rng.below(4) == 0;
        let (first_limit, first_key) = (rng.below(3) as usize, rng.below(KEYS.len() as u64));
        let batch: Vec<StateOp> = (0..1 + rng.below(3) * rng.below(2))
            .map(|_| {
                let (l, k) = if one_key {
                    (first_limit, first_key)
                } else {
                    (rng.below(3) as usize, rng.below(KEYS.len() as u64))
                };
                let (name, limiter) = &limiters[l];
                let at = state_key(name, KEYS[k as usize]);
                let cap = limiter.limiter().limit();
                let c = if rng.chance(125_000) {
                    cap + 1 + rng.below(2)
                } else {
                    1 + rng.below(cap)
                };
                runs.touched.insert(at.clone());
                op(&at, *limiter, u32::try_from(c).expect("small costs"))
            })
            .collect();
        let from_memory = memory
            .acquire_state(now, &batch)
            .await
            .expect("the store answers");
        let from_redis = redis
            .acquire_state(now, &batch)
            .await
            .expect("the store answers");
        let mut at_once = Vec::new();
        // Now and then the whole batch is taken back, which refunds two admissions on one key
        // right after each other when the batch has them.
        let whole_batch = rng.below(8) == 0;
        for (i, op) in batch.iter().enumerate() {
            let want = spec.acquire(now, op);
            let what = format!("{op:?}");
            assert_eq!(
                from_memory[i].outcome,
                want,
                "{}",
                context(&format!("memory, {what}"))
            );
            assert_eq!(
                from_redis[i].outcome,
                want,
                "{}",
                context(&format!("redis, {what}"))
            );
            if want.is_allowed() {
                let a = Admitted {
                    op: op.clone(),
                    spec: want,
                    memory: from_memory[i],
                    redis: from_redis[i],
                };
                if whole_batch || rng.chance(100_000) {
                    at_once.push(a);
                } else {
                    admitted.push(a);
                }
            }
        }
        // Refunded right after the batch, as a request another of its limits denied; a
        // bucket's refund sometimes twice, where its floor keeps the second from giving back
        // anything more.
        for a in at_once {
            let times = if kind != Kind::SlidingLog && rng.chance(300_000) {
                2
            } else {
                1
            };
            for _ in 0..times {
                spec.refund(now, &a.op, &a.spec);
                refund(memory, now, &a.op, &a.memory).await;
                refund(redis, now, &a.op, &a.redis).await;
                refunds += 1;
            }
        }
    }
    assert!(
        refunds > ops / 20,
        "seed {seed}: the run refunded ({refunds})"
    );
    runs.now = now;
}

// ---------------------------------------------------------------------------------------------
// A token bucket's grants: `gcra.lua`'s `lease` and parked `acquire` held to the memory store,
// which runs `shared::quota::lease` itself.

/// What one edge has said and been told about one key in one lease window.
#[derive(Clone, Copy, Default)]
struct EdgeView {
    granted: u64,
    used: u64,
    released: u64,
}

/// One random run of `ops` steps: three edges sync two keys of one token bucket (admitting
/// under their grants, past them now and then as a soft key's cold allowance may, handing
/// back, asking for more), the exact path acquires in between, and time passes across lease
/// windows. The memory store and `redis` give the same answers throughout.
async fn lease_matches_memory(redis: &dyn Store, seed: u64, ops: usize) {
    let memory = MemoryStore::new();
    let mut rng = Rng::new(seed);
    let capacity = 1 + rng.below(40);
    let limiter = token_bucket(1 + rng.below(20), Nanos::from_secs(1), capacity);
    let StateLimiter::TokenBucket(gcra) = limiter else {
        unreachable!("a token bucket")
    };
    let name = format!("lease-{seed}");
    let keys = ["alice", "{b}:ob"];
    let edges = [EdgeId(1), EdgeId(0xfeed), EdgeId(u64::MAX)];
    let mut views: HashMap<(usize, usize, u64), EdgeView> = HashMap::new();
    let mut now = T0 + Nanos(rng.below(LEASE_WINDOW.as_u64()));
    let mut granted = 0;
    for step_no in 0..ops {
        now = now
            + match rng.below(10) {
                0..=5 => Nanos(rng.below(gcra.emission_interval().as_u64() * 2 + 1)),
                6..=8 => Nanos(rng.below(1_000_000)),
                _ => Nanos(rng.below(LEASE_WINDOW.as_u64() * 2)),
            };
        let current = now.as_u64() / LEASE_WINDOW.as_u64();
        let k = rng.below(2) as usize;
        let at = state_key(&name, keys[k]);
        let context = format!("seed {seed} step {step_no}, capacity {capacity}");
        if rng.below(4) == 0 {
            // The stores park the current and previous lease windows' unused grants first.
            let op = op(&at, limiter, 1 + rng.below(3) as u32);
            let m = acquire(&memory, now, &op).await;
            let r = acquire(redis, now, &op).await;
            assert_eq!(m.outcome, r.outcome, "{context}: exact {op:?}");
            continue;
        }
        let e = rng.below(3) as usize;
        // The previous lease window now and then: a late hand-back or count.
        let window = current - u64::from(rng.below(5) == 0);
        let view = views.entry((e, k, window)).or_default();
        match rng.below(6) {
            0..=2 => {
                let unused = view.granted.saturating_sub(view.released + view.used);
                view.used += rng.below(unused + 1);
            }
            3 => view.used += rng.below(3),
            4 => view.released = view.granted.saturating_sub(view.used).max(view.released),
            _ => {}
        }
        let other = if window == current {
            current - 1
        } else {
            current
        };
        let op = LeaseOp {
            at: LedgerKey::lease(at.limit, at.key.clone(), window),
            other: LedgerKey::lease(at.limit, at.key.clone(), other),
            limiter: gcra,
            used: view.used,
            released: view.released,
            want: if window == current { rng.below(12) } else { 0 },
            threshold: DEFAULT_THRESHOLD,
            edges: 1 + rng.below(3) as u32,
            expire_at: Nanos((window + 2) * LEASE_WINDOW.as_u64()),
            exact_since: None,
        };
        let m = memory
            .lease(edges[e], now, std::slice::from_ref(&op))
            .await
            .expect("memory answers")[0];
        let r = redis
            .lease(edges[e], now, std::slice::from_ref(&op))
            .await
            .expect("redis answers")[0];
        assert_eq!(m, r, "{context}: {op:?}");
        granted += m.granted.saturating_sub(view.granted);
        view.granted = view.granted.max(m.granted);
    }
    assert!(granted > 0, "seed {seed}: grants were minted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_lua_matches_shared_on_redis_and_a_cluster() {
    let server = RedisServer::start();
    let single = connect(RedisTopology::Single(server.url())).await;
    for seed in 0..4 {
        lease_matches_memory(&single, seed, 1500).await;
    }
    let cluster = RedisCluster::start();
    let clustered = connect(RedisTopology::Cluster(cluster.urls())).await;
    lease_matches_memory(&clustered, 10, 800).await;
}

// ---------------------------------------------------------------------------------------------
// Scenarios: each takes a store and uses limit names of its own.

/// Sixteen tasks race on one token bucket at one instant: exactly the burst passes. One
/// emission interval later, exactly one more.
async fn concurrent_acquires_admit_exactly_the_burst(store: Arc<dyn Store>) {
    let bucket = token_bucket(10, Nanos::from_secs(60), 20);
    let at = state_key("burst-race", "user-1");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (store, at) = (store.clone(), at.clone());
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..5 {
                    let r = acquire(&*store, T0, &op(&at, bucket, 1)).await;
                    allowed += u64::from(r.outcome.is_allowed());
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("no task panics");
    }
    assert_eq!(allowed, 20, "80 attempts on a burst of 20");
    // 10 per minute: a token every 6 s.
    let late = acquire(&*store, T0, &op(&at, bucket, 1)).await.outcome;
    assert_eq!(late.verdict, Verdict::Deny);
    assert_eq!(late.retry_after, Nanos::from_secs(6));
    let next = T0 + Nanos::from_secs(6);
    assert!(
        !acquire(&*store, next - Nanos(1), &op(&at, bucket, 1))
            .await
            .outcome
            .is_allowed()
    );
    assert!(
        acquire(&*store, next, &op(&at, bucket, 1))
            .await
            .outcome
            .is_allowed()
    );
    assert!(
        !acquire(&*store, next, &op(&at, bucket, 1))
            .await
            .outcome
            .is_allowed()
    );
}

/// A log of 3 per minute denies the fourth request inside the window, and admits again at the
/// very nanosecond its oldest entry leaves the window, not one before.
async fn a_log_reopens_exactly_when_its_oldest_entry_leaves(store: Arc<dyn Store>) {
    let log = sliding_log(3, Nanos::from_secs(60));
    let at = state_key("log-reopen", "user-1");
    for (offset, left) in [(0, 2), (1, 1), (1_000_000_000, 0)] {
        let o = acquire(&*store, T0 + Nanos(offset), &op(&at, log, 1))
            .await
            .outcome;
        assert_eq!((o.verdict, o.remaining), (Verdict::Allow, left));
    }
    let fourth = T0 + Nanos::from_secs(30);
    let o = acquire(&*store, fourth, &op(&at, log, 1)).await.outcome;
    assert_eq!(o.verdict, Verdict::Deny);
    assert_eq!(
        o.retry_after,
        Nanos::from_secs(30),
        "the oldest leaves at T0 + 60 s"
    );
    assert_eq!(
        o.reset_at,
        T0 + Nanos::from_secs(61),
        "the newest leaves at T0 + 61 s"
    );
    let leaves = T0 + Nanos::from_secs(60);
    let o = acquire(&*store, leaves - Nanos(1), &op(&at, log, 1))
        .await
        .outcome;
    assert_eq!((o.verdict, o.retry_after), (Verdict::Deny, Nanos(1)));
    let o = acquire(&*store, leaves, &op(&at, log, 1)).await.outcome;
    assert_eq!((o.verdict, o.remaining), (Verdict::Allow, 0));
    // The second entry (T0 + 1 ns) leaves one nanosecond later.
    let o = acquire(&*store, leaves, &op(&at, log, 1)).await.outcome;
    assert_eq!((o.verdict, o.retry_after), (Verdict::Deny, Nanos(1)));
    assert!(
        acquire(&*store, leaves + Nanos(1), &op(&at, log, 1))
            .await
            .outcome
            .is_allowed()
    );
}

/// A refund right after its acquire gives everything back, for each algorithm; a refund of a
/// log entry that has left the window changes nothing.
async fn refunds_give_back_what_was_taken(store: Arc<dyn Store>) {
    let limiters = [
        token_bucket(1, Nanos::from_secs(1), 3),
        leaky_bucket(1, Nanos::from_secs(1), 3, LeakyMode::Shaper),
        sliding_log(3, Nanos::from_secs(1)),
    ];
    for (i, limiter) in limiters.into_iter().enumerate() {
        let at = state_key(&format!("refund-{i}"), "user-1");
        let now = T0 + Nanos(i as u64);
        let first = op(&at, limiter, 2);
        let r = acquire(&*store, now, &first).await;
        assert_eq!(r.outcome.remaining, 1, "{limiter:?}");
        refund(&*store, now, &first, &r).await;
        let all = acquire(&*store, now, &op(&at, limiter, 3)).await.outcome;
        assert!(all.is_allowed(), "{limiter:?}: the whole capacity is back");
        assert_eq!(all.remaining, 0);
    }
    let log = sliding_log(2, Nanos::from_secs(1));
    let at = state_key("refund-late", "user-1");
    let old = op(&at, log, 1);
    let r = acquire(&*store, T0, &old).await;
    assert!(
        acquire(&*store, T0 + Nanos::from_secs(2), &op(&at, log, 2))
            .await
            .outcome
            .is_allowed()
    );
    refund(&*store, T0 + Nanos::from_secs(2), &old, &r).await;
    let o = acquire(&*store, T0 + Nanos::from_secs(2), &op(&at, log, 1))
        .await
        .outcome;
    assert_eq!(
        o.verdict,
        Verdict::Deny,
        "the late refund gave nothing back"
    );
}

/// States decided elsewhere (the breaker's memory during an outage) merge into the store so
/// that whatever either side admitted still counts, and writing them again changes nothing.
async fn absorbed_states_keep_both_sides(store: Arc<dyn Store>) {
    let bucket = token_bucket(1, Nanos::from_secs(10), 4);
    let leaky = leaky_bucket(1, Nanos::from_secs(10), 4, LeakyMode::Meter);
    let log = sliding_log(4, Nanos::from_secs(60));
    let limiters = [bucket, leaky, log];
    let elsewhere = MemoryStore::new();
    for (i, limiter) in limiters.into_iter().enumerate() {
        let at = state_key(&format!("absorb-{i}"), "user-1");
        // One unit here, two elsewhere (the log's two at one instant, one cost each).
        assert!(
            acquire(&*store, T0, &op(&at, limiter, 1))
                .await
                .outcome
                .is_allowed()
        );
        for _ in 0..2 {
            let o = acquire(&elsewhere, T0 + Nanos(5), &op(&at, limiter, 1))
                .await
                .outcome;
            assert!(o.is_allowed());
        }
    }
    let states: Vec<StateAbsorb> = elsewhere.state_snapshot(T0 + Nanos(10));
    assert_eq!(states.len(), 3);
    for _ in 0..2 {
        store
            .absorb_state("outage-1", T0 + Nanos(10), &states)
            .await
            .expect("the store answers");
    }
    for (i, limiter) in limiters.into_iter().enumerate() {
        let at = state_key(&format!("absorb-{i}"), "user-1");
        let o = acquire(&*store, T0 + Nanos(10), &op(&at, limiter, 1))
            .await
            .outcome;
        let left = match limiter {
            // The buckets keep the fuller side (two of four used) and take this one.
            StateLimiter::TokenBucket(_) | StateLimiter::LeakyBucket(_) => 1,
            // The log holds both sides' entries, once each: three of four, then this one.
            StateLimiter::SlidingLog(_) => 0,
        };
        assert_eq!(
            (o.verdict, o.remaining),
            (Verdict::Allow, left),
            "{limiter:?}"
        );
    }
}

/// The memory store drops a state once it is back to a fresh one's equivalent plus the grace,
/// at its next sweep, and only then; a dropped state answers as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_forgets_states_back_to_fresh() {
    let memory = MemoryStore::new();
    // Full again 2 s after its acquire; a log entry leaves after an hour.
    let bucket = token_bucket(1, Nanos::from_secs(1), 2);
    let log = sliding_log(2, Nanos::from_secs(3_600));
    for i in 0..100 {
        let at = state_key("forget", &format!("user-{i}"));
        let limiter = if i % 2 == 0 { bucket } else { log };
        assert!(
            acquire(&memory, T0, &op(&at, limiter, 1))
                .await
                .outcome
                .is_allowed()
        );
    }
    assert_eq!(memory.state_count(), 100);
    // A sweep (every 4,096 operations) just before the buckets' grace ends keeps them all;
    // one just after drops the 50 buckets and keeps the 50 logs (and the one busy key).
    let busy = op(&state_key("forget", "busy"), sliding_log(1, Nanos(1)), 1);
    let until = T0 + Nanos::from_secs(2) + STATE_GRACE;
    for now in [until - Nanos(1), until] {
        for i in 0..4_096u64 {
            acquire(&memory, now + Nanos(i), &busy).await;
        }
    }
    assert_eq!(memory.state_count(), 51);
    let o = acquire(
        &memory,
        until,
        &op(&state_key("forget", "user-0"), bucket, 2),
    )
    .await;
    assert_eq!(
        (o.outcome.verdict, o.outcome.remaining),
        (Verdict::Allow, 0),
        "a full bucket"
    );
}

async fn run_scenarios(store: Arc<dyn Store>) {
    concurrent_acquires_admit_exactly_the_burst(store.clone()).await;
    a_log_reopens_exactly_when_its_oldest_entry_leaves(store.clone()).await;
    refunds_give_back_what_was_taken(store.clone()).await;
    absorbed_states_keep_both_sides(store).await;
}

/// Every limiter-state key in `server` has a TTL, and none longer than the longest span the
/// runs use plus [`STATE_GRACE`]; returns how many keys of each suffix there are.
fn every_state_key_has_a_ttl(server: &RedisServer) -> HashMap<String, usize> {
    let mut kinds = HashMap::new();
    let longest = MAX_SPAN.as_u64() / 1_000_000 + STATE_GRACE.as_u64() / 1_000_000 + 1;
    for key in server.cli(&["--scan", "--pattern", "rl:*"]).lines() {
        let Some((_, kind)) = key.rsplit_once('}') else {
            continue;
        };
        if kind
            .trim_start_matches(':')
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue; // a window ledger
        }
        let ttl: i64 = server
            .cli(&["PTTL", key])
            .trim()
            .parse()
            .expect("PTTL answers an integer");
        // -2: expired between the scan and now; -1 would be a key without a TTL.
        assert!(ttl > 0 || ttl == -2, "{key} has PTTL {ttl}");
        assert!(ttl <= longest as i64, "{key} has PTTL {ttl}");
        *kinds.entry(kind.to_owned()).or_default() += 1;
    }
    kinds
}

async fn connect(topology: RedisTopology) -> RedisStore {
    RedisStore::connect(&topology, Duration::from_secs(2))
        .await
        .expect("the test Redis is up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_states_on_memory() {
    run_scenarios(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_states_on_redis_and_a_cluster() {
    let server = RedisServer::start();
    let single = connect(RedisTopology::Single(server.url())).await;
    run_scenarios(Arc::new(single)).await;
    let cluster = RedisCluster::start();
    run_scenarios(Arc::new(
        connect(RedisTopology::Cluster(cluster.urls())).await,
    ))
    .await;
}

/// A token bucket's TAT is kept until it is full again plus the grace, to the millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_key_lives_until_fresh_plus_the_grace() {
    let server = RedisServer::start();
    let store = connect(RedisTopology::Single(server.url())).await;
    let bucket = token_bucket(1, Nanos::from_secs(60), 5);
    let at = state_key("ttl", "user-1");
    acquire(&store, T0, &op(&at, bucket, 3)).await;
    let key = format!("rl:{{{:016x}:user-1}}:gcra", at.limit.0);
    let ttl: u64 = server.cli(&["PTTL", &key]).trim().parse().expect("a TTL");
    // Full again three minutes from now; the TTL counts down from there plus 10 s.
    let want = 180_000 + STATE_GRACE.as_u64() / 1_000_000;
    assert!(
        ttl <= want && ttl > want - 5_000,
        "PTTL {ttl}, want about {want}"
    );
}

async fn spec_on_redis(kind: Kind) {
    let server = RedisServer::start();
    let store = connect(RedisTopology::Single(server.url())).await;
    let mut runs = Runs::new();
    for seed in 0..3 {
        lua_matches_shared(&mut runs, &store, kind, seed, 1500).await;
    }
    // Scripts flushed (a restart, a failover): the next call loads them again by itself.
    server.cli(&["SCRIPT", "FLUSH"]);
    lua_matches_shared(&mut runs, &store, kind, 99, 300).await;
    assert!(runs.swept(), "the memory store swept during the runs");
    assert!(
        runs.longest_gap > MAX_SPAN,
        "a step went past the scripts' clamp"
    );
    let kinds = every_state_key_has_a_ttl(&server);
    let want: &[&str] = match kind {
        Kind::TokenBucket => &[":gcra"],
        Kind::LeakyBucket => &[":leaky"],
        Kind::SlidingLog => &[":log", ":log:meta"],
    };
    for suffix in want {
        assert!(kinds.get(*suffix).is_some_and(|&n| n > 5), "{kinds:?}");
    }
}

async fn spec_on_a_cluster(kind: Kind) {
    let cluster = RedisCluster::start();
    let store = connect(RedisTopology::Cluster(cluster.urls())).await;
    let mut runs = Runs::new();
    lua_matches_shared(&mut runs, &store, kind, 100, 1000).await;
    for node in cluster.nodes() {
        node.cli(&["SCRIPT", "FLUSH"]);
    }
    lua_matches_shared(&mut runs, &store, kind, 101, 300).await;
    assert!(
        runs.longest_gap > MAX_SPAN,
        "a step went past the scripts' clamp"
    );
    for node in cluster.nodes() {
        every_state_key_has_a_ttl(node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_lua_matches_shared_on_redis() {
    spec_on_redis(Kind::TokenBucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaky_lua_matches_shared_on_redis() {
    spec_on_redis(Kind::LeakyBucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lua_matches_shared_on_redis() {
    spec_on_redis(Kind::SlidingLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_lua_matches_shared_on_a_cluster() {
    spec_on_a_cluster(Kind::TokenBucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaky_lua_matches_shared_on_a_cluster() {
    spec_on_a_cluster(Kind::LeakyBucket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lua_matches_shared_on_a_cluster() {
    spec_on_a_cluster(Kind::SlidingLog).await;
}

//! The `Agent`: `check` on every request, and the sync loop behind it.
//!
//! # How a request flows
//!
//! `check` matches the request against the rule set (no allocation: a per-thread buffer),
//! then, for each limit that applies, locks that key's state in the map just long enough to
//! reserve the cost under its grant or cold allowance. If every limit reserves, the request is
//! admitted locally and the reservations become `used`. If a key holds a cached denial, the
//! request is denied locally. Otherwise every reservation is rolled back and the whole request
//! goes to the regional as one exact `Acquire` (all limits or none), bounded by the upstream
//! timeout; when that fails or times out, each rule's failure mode decides. No lock is held
//! across the network.
//!
//! A token bucket's keys are decided the same way, under grants of the bucket's tokens, filed
//! by lease window (`shared::quota::lease`), and so are a leaky-bucket meter's (rules compile a
//! meter to the GCRA it equals); a sliding log's and a leaky-bucket shaper's always go to the
//! regional.
//!
//! The sync loop, every flush interval, walks the map, hands back idle or recalled grants,
//! sends the counts the regional has not acknowledged (cumulative, so a resend after a lost
//! answer is counted once), applies the answers (raised ceilings, `n`, hot keys), and forgets
//! keys that have been idle long enough.
//!
//! # How the rules change
//!
//! The rule set and everything the agent derives from it (today the shadow limits' counters)
//! are one [`Policy`], behind an [`ArcSwap`]: `check` loads it once, lock-free and without
//! allocating, and decides the whole request by that one version. [`Agent::set_rules`] (called
//! by the QUIC upstream when the regional pushes a rule set, or by an embedder) builds the next
//! `Policy` beside the running one, swaps it in whole if its version is newer, then walks the
//! key map once: keys of limits the new set no longer has, or whose window changed, are
//! forgotten; keys of limits whose value changed keep their counts but hand back their grants
//! and drop their cached denials, which were sized under the old limit; every other key is
//! untouched. [`LimitId`]s are stable across versions while a rule's name is, so an unchanged
//! rule keeps its counters.

use std::{
    cell::Cell,
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use shared::{
    Clock, FailureMode, LimitId, Nanos, RuleSet,
    algorithm::Limiter,
    metrics::{Histogram, Striped},
    quota::{
        cold_allowance,
        lease::{LEASE_WINDOW, grant_window},
    },
    rules::{Match, Request, recycle},
    wire::{Acquire, AcquireReply, Check, MAX_KEYS_PER_BATCH, SyncAck, SyncBatch, SyncEntry},
};
use thiserror::Error;
use tokio::{runtime::Handle, task::JoinHandle};

use crate::{
    config::AgentConfig,
    decision::{Decision, DecisionPath},
    keymap::KeyMap,
    local::{ExactReason, KeyState, Local, SlotKey, StoredKey},
    upstream::{Upstream, UpstreamError},
};

/// The most limits one request is checked against; a request matching more is checked
/// against the first this many. A rule set rarely gives a request more than four.
pub const MAX_LIMITS_PER_REQUEST: usize = 16;

/// The edge's rate limiter: cheap to clone, shared by every thread that serves requests.
///
/// See the [crate documentation](crate) for an example.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// Builds an [`Agent`].
pub struct AgentBuilder {
    config: AgentConfig,
    rules: RuleSet,
    upstream: Arc<dyn Upstream>,
    clock: Option<Arc<dyn Clock>>,
    runtime: Option<Handle>,
}

/// Why an agent could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The agent talks to its regional on a tokio runtime; none was given and none is running.
    #[error("no tokio runtime: build the agent inside one or pass AgentBuilder::runtime")]
    NoRuntime,
}

impl AgentBuilder {
    /// Uses `clock` instead of the system clock (tests drive time by hand).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> AgentBuilder {
        self.clock = Some(clock);
        self
    }

    /// Runs the agent's network calls on `runtime` instead of the current one.
    pub fn runtime(mut self, runtime: Handle) -> AgentBuilder {
        self.runtime = Some(runtime);
        self
    }

    /// Builds the agent. The sync loop is not started: call [`Agent::spawn_sync_loop`], or
    /// drive [`Agent::flush`] yourself.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] when no runtime was given and none is current.
    pub fn build(self) -> Result<Agent, BuildError> {
        let runtime = match self.runtime {
            Some(h) => h,
            None => Handle::try_current().map_err(|_| BuildError::NoRuntime)?,
        };
        let clock = self.clock.unwrap_or_else(|| Arc::new(crate::SystemClock));
        let stats = Stats::new(clock.now());
        Ok(Agent {
            inner: Arc::new(Inner {
                config: self.config,
                policy: ArcSwap::from_pointee(Policy::new(self.rules, None)),
                replacing: Mutex::new(()),
                upstream: self.upstream,
                clock,
                runtime,
                keys: KeyMap::new(),
                edges: AtomicU32::new(0),
                partitions: DashMap::with_hasher(foldhash::fast::RandomState::default()),
                down_until: AtomicU64::new(0),
                next_request: AtomicU64::new(0),
                stats,
            }),
        })
    }
}

impl Agent {
    /// Starts building an agent for `rules`, talking to its regional through `upstream`.
    pub fn builder(
        config: AgentConfig,
        rules: RuleSet,
        upstream: Arc<dyn Upstream>,
    ) -> AgentBuilder {
        AgentBuilder {
            config,
            rules,
            upstream,
            clock: None,
            runtime: None,
        }
    }

    /// Decides one request of cost 1. Never awaits; returns at once on the local paths and
    /// within the upstream timeout on the exact path.
    ///
    /// Blocks the calling thread on the exact path, so async servers should call
    /// [`check_async`](Agent::check_async) instead. The call upstream runs on the agent's
    /// runtime: never call `check` from that runtime's own thread when it is a current-thread
    /// runtime, or every exact decision waits out the timeout.
    pub fn check(&self, request: &Request<'_>) -> Decision {
        self.check_cost(request, NonZeroU32::MIN)
    }

    /// [`check`](Agent::check) for a request that costs `cost` units of every limit.
    pub fn check_cost(&self, request: &Request<'_>, cost: NonZeroU32) -> Decision {
        match self.try_check(request, cost) {
            Ok(decision) => decision,
            Err(exact) => exact.decide_blocking(),
        }
    }

    /// [`check_cost`](Agent::check_cost) for async callers: awaits the regional instead of
    /// blocking, with the same timeout.
    pub async fn check_async(&self, request: &Request<'_>, cost: NonZeroU32) -> Decision {
        match self.try_check(request, cost) {
            Ok(decision) => decision,
            Err(exact) => exact.decide().await,
        }
    }

    /// [`check_async`](Agent::check_async) in two steps: the decision when it is made locally,
    /// else the exact path begun, to be awaited. For a server whose request future is moved
    /// whole on every request: what lives across the await is only the [`ExactCheck`], not the
    /// request the decision was made from.
    pub(crate) fn try_check(
        &self,
        request: &Request<'_>,
        cost: NonZeroU32,
    ) -> Result<Decision, ExactCheck<'_>> {
        self.inner.begin(request, cost)
    }

    /// Syncs once: hands back idle grants, sends unacknowledged counts, applies the answers.
    ///
    /// # Errors
    ///
    /// When the regional cannot be reached; the counts stay and go with the next flush.
    pub async fn flush(&self) -> Result<(), UpstreamError> {
        self.inner.flush().await
    }

    /// Runs [`flush`](Agent::flush) every flush interval until the last clone of the agent is
    /// dropped.
    pub fn spawn_sync_loop(&self) -> JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let period = self.inner.config.flush_interval;
        self.inner.runtime.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if let Err(e) = inner.flush().await {
                    tracing::debug!(error = %e, "sync failed; counts kept for the next flush");
                }
            }
        })
    }

    /// The configuration the agent was built with.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    /// Counters of what the agent has done, for metrics.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// The rule set the agent enforces now. A later [`set_rules`](Agent::set_rules) does not
    /// change the set returned here; call again for the one in force then.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.inner.rules()
    }

    /// `f` of the rule set in force, without taking a reference to it: for a lookup on every
    /// request, where [`rules`](Agent::rules)' reference count would be one more write that
    /// every thread shares.
    pub fn with_rules<R>(&self, f: impl FnOnce(&RuleSet) -> R) -> R {
        f(&self.inner.policy.load().rules)
    }

    /// Enforces `rules` from the next check on, if its [`version`](RuleSet::version) is newer
    /// than the version in force; returns whether it did. An older or equal version is
    /// ignored and the running rules stay, so a push that is resent or overtaken changes
    /// nothing.
    ///
    /// Keys keep their counters across the change wherever their limit is still in the set
    /// with the same window ([`LimitId`]s stay the same while a rule's name does). A key of a
    /// limit whose value changed hands back the unused part of its grant and drops its cached
    /// denial, both sized under the old value, so its next request is decided under the new
    /// one. Keys of limits that are gone, or whose window length or algorithm's kind changed,
    /// are forgotten. A request being decided while the rules change is decided wholly under
    /// one of the two versions.
    ///
    /// The swap itself is lock-free for `check`; this call then walks the key map once, one
    /// shard lock at a time, so call it off the request path (the QUIC upstream calls it on a
    /// blocking thread).
    pub fn set_rules(&self, rules: RuleSet) -> bool {
        self.inner.set_rules(rules)
    }

    /// Per shadow limit of the rules in force, the requests it would have denied.
    pub fn shadow_denials_by_limit(&self) -> Vec<(LimitId, u64)> {
        self.inner
            .policy
            .load()
            .shadow_by_limit
            .iter()
            .map(|(&id, counter)| (id, counter.sum()))
            .collect()
    }

    /// Sizes of the acknowledged sync batches, in keys.
    pub fn sync_batch_sizes(&self) -> &Histogram {
        &self.inner.stats.sync_sizes
    }

    /// Keys the agent holds state for.
    pub fn keys(&self) -> usize {
        self.inner.keys.len()
    }

    /// The current time on the agent's clock.
    pub fn now(&self) -> Nanos {
        self.inner.clock.now()
    }

    /// A handle that reaches this agent without keeping it alive: the way back from the
    /// upstream, which the agent owns, to the agent (pushed rule sets).
    pub(crate) fn downgrade(&self) -> WeakAgent {
        WeakAgent(Arc::downgrade(&self.inner))
    }
}

/// An [`Agent`] that may be gone: see [`Agent::downgrade`].
#[derive(Clone)]
pub(crate) struct WeakAgent(Weak<Inner>);

impl WeakAgent {
    /// The agent, while any clone of it lives.
    pub(crate) fn upgrade(&self) -> Option<Agent> {
        self.0.upgrade().map(|inner| Agent { inner })
    }
}

/// What the agent has done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Decisions made without the network (grant, cold allowance, cached denial, no rule).
    pub local: u64,
    /// Decisions made by the regional.
    pub exact: u64,
    /// Decisions made by a failure mode because the regional did not answer in time.
    pub fallback: u64,
    /// Requests that could not be decided locally (so `exact + fallback` of them), by why, in
    /// [`ExactReason::ALL`] order: the first limit of the request that could not.
    pub exact_reasons: [u64; 4],
    /// Requests denied, by any path.
    pub denied: u64,
    /// Windows whose counts were dropped before the regional acknowledged them (the bounded
    /// replay buffer overflowing: a key kept only its current and previous window).
    pub lost_windows: u64,
    /// Syncs that failed.
    pub sync_failures: u64,
    /// Requests a shadow limit would have denied (or could not confirm locally); none was.
    pub shadow_denials: u64,
    /// Sync batches the regional acknowledged.
    pub syncs: u64,
    /// Keys (entries) in those batches.
    pub sync_entries: u64,
    /// When the regional last had every count this agent had made: the collection time of
    /// the last flush whose batches were all acknowledged (or that had nothing to send), or
    /// when the agent was built. The sync lag is the time since.
    pub last_sync_at: Nanos,
    /// Grant units received from the regional, summed over keys and windows.
    pub granted: u64,
    /// Grant units handed back unused (idle keys, recalls, near the limit, ended windows).
    /// `1 − returned / granted` is the grant utilisation.
    pub returned: u64,
}

struct Inner {
    config: AgentConfig,
    /// The rules in force and what is derived from them, replaced whole by `set_rules`.
    policy: ArcSwap<Policy>,
    /// Taken by `set_rules` only (never by `check`), so that two rule sets arriving together
    /// cannot replace a newer one with an older one.
    replacing: Mutex<()>,
    upstream: Arc<dyn Upstream>,
    clock: Arc<dyn Clock>,
    runtime: Handle,
    /// Per (limit, key) state; see `local` and `keymap`.
    keys: KeyMap,
    /// `n`, as the regional last said; zero until it has (no cold allowance before then).
    edges: AtomicU32,
    /// Per limit, `P`: this region's partition of it, as the regional last said. Read only
    /// off the fast path (a cold key's `c0`, the `local` failure mode's `P/n`).
    partitions: DashMap<LimitId, u64, foldhash::fast::RandomState>,
    /// Until then, decisions skip the network: it just failed.
    down_until: AtomicU64,
    next_request: AtomicU64,
    stats: Stats,
}

/// The rules in force and everything the agent derives from them, swapped as one unit, so a
/// check never pairs one version's rules with another's tables.
struct Policy {
    /// Shared with [`Agent::rules`]' callers.
    rules: Arc<RuleSet>,
    /// Per shadow limit, the requests it would have denied. Built with the rules and never
    /// written after; a limit that stays shadow across versions keeps its counter.
    shadow_by_limit: HashMap<LimitId, Arc<Striped>>,
}

impl Policy {
    /// The policy for `rules`, taking over from `previous` the counters of the limits it
    /// keeps.
    fn new(rules: RuleSet, previous: Option<&Policy>) -> Policy {
        let shadow_by_limit = rules
            .limits()
            .filter(|(rule, _)| rule.shadow())
            .map(|(_, limit)| {
                let id = limit.id();
                let kept = previous.and_then(|p| p.shadow_by_limit.get(&id));
                (id, kept.cloned().unwrap_or_default())
            })
            .collect();
        Policy {
            rules: Arc::new(rules),
            shadow_by_limit,
        }
    }
}

/// What a new rule set means for the keys of one limit of the old set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// The limit is gone, or its windows are not the old ones: its counts mean nothing now.
    Forget,
    /// Same windows, another value: keep the counts, hand back the grants.
    Regrant,
}

/// The limits of `old` whose keys a switch to `new` changes; limits the same in both are not
/// listed.
fn changes(old: &RuleSet, new: &RuleSet) -> HashMap<LimitId, Change> {
    old.limits()
        .filter_map(|(_, before)| {
            let id = before.id();
            let change = match new.limit(id) {
                None => Change::Forget,
                Some((_, after)) if after.limiter() == before.limiter() => return None,
                Some((_, after)) => {
                    let (a, b) = (after.limiter(), before.limiter());
                    if local_window(a) == local_window(b) && a.window() == b.window() {
                        Change::Regrant
                    } else {
                        Change::Forget
                    }
                }
            };
            Some((id, change))
        })
        .collect()
}

/// A decision on the exact path, waiting only for the regional's answer
/// ([`Agent::try_check`]): what deciding a request gives when it is not decided locally.
#[must_use = "the request is undecided until the exact check is awaited"]
pub(crate) struct ExactCheck<'a> {
    inner: &'a Inner,
    exact: ExactRequest,
    acquire: Acquire,
}

impl ExactCheck<'_> {
    /// Asks the regional, waiting at most the upstream timeout, and decides by its answer or
    /// the rule's failure mode.
    pub(crate) async fn decide(self) -> Decision {
        let inner = self.inner;
        let call = inner.upstream.acquire(self.acquire);
        let result = tokio::time::timeout(inner.config.upstream_timeout, call)
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        inner.finish(self.exact, result)
    }

    /// [`decide`](ExactCheck::decide), blocking the calling thread: the call runs on the
    /// agent's runtime.
    fn decide_blocking(self) -> Decision {
        let inner = self.inner;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let call = inner.upstream.acquire(self.acquire);
        inner.runtime.spawn(async move {
            // The receiver may have timed out and gone; nothing to do then.
            let _ = tx.send(call.await);
        });
        let result = rx
            .recv_timeout(inner.config.upstream_timeout)
            .unwrap_or(Err(UpstreamError::Timeout));
        inner.finish(self.exact, result)
    }
}

/// A decision, or the exact request that will make it.
type Step<'a> = Result<Decision, ExactCheck<'a>>;

/// What `finish` needs to turn the regional's answer into a decision.
struct ExactRequest {
    now: Nanos,
    cost: u64,
    parts: Vec<Part>,
}

/// One limit of a request, as the slow paths need it.
struct Part {
    slot: StoredKey,
    limit: LimitId,
    window: u64,
    /// When the limit is back to full: the window's end, a bucket's refill.
    window_end: Nanos,
    failure: FailureMode,
    limiter: Limiter,
}

thread_local! {
    // Per-thread match buffer, so matching allocates nothing once warm.
    static MATCHES: Cell<Vec<Match<'static>>> = const { Cell::new(Vec::new()) };
}

impl Inner {
    fn begin(&self, request: &Request<'_>, cost: NonZeroU32) -> Step<'_> {
        let now = self.clock.now();
        let cost = u64::from(cost.get());
        // One version decides the whole request: loaded once, lock-free, no allocation.
        let policy = self.policy.load();
        let mut matches: Vec<Match<'_>> = recycle(MATCHES.take());
        policy.rules.matches(request, &mut matches);
        // Shadow limits count and report, and never take part in the decision.
        if matches.iter().any(|m| m.rule.shadow()) {
            for m in matches.iter().filter(|m| m.rule.shadow()) {
                self.shadow(&policy, m, now, cost);
            }
            matches.retain(|m| !m.rule.shadow());
        }
        matches.truncate(MAX_LIMITS_PER_REQUEST);
        let step = self.decide(&matches, now, cost);
        MATCHES.set(recycle(matches));
        step
    }

    fn decide(&self, matches: &[Match<'_>], now: Nanos, cost: u64) -> Step<'_> {
        let Some(last) = matches.len().checked_sub(1) else {
            self.stats.local.add(1);
            return Ok(Decision::unlimited());
        };
        let n = self.edges.load(Ordering::Relaxed);
        // Pass 1: reserve each limit locally, one key lock at a time. The last limit decides
        // the request, so when it reserves it commits at once, under the same lock: a
        // single-limit request costs one lookup.
        let mut reserved = 0;
        let mut verdict = Local::Reserved;
        let mut answer: Option<Decision> = None;
        for (i, m) in matches.iter().enumerate() {
            let slot = SlotKey::new(m.limit.id(), &m.key);
            let limiter = m.limit.limiter();
            let Some(len) = local_window(limiter) else {
                // Decided by the regional only, but a cached denial is still free.
                let until = self
                    .keys
                    .get(&slot, |s| s.denied_until)
                    .unwrap_or(Nanos::ZERO);
                verdict = if until > now {
                    Local::Denied { until }
                } else {
                    self.stats.exact_reasons[ExactReason::ExactOnly.index()].add(1);
                    Local::Exact
                };
                break;
            };
            let w = now.as_u64() / len;
            let value = limiter.limit();
            let c0 = || self.cold_allowance(m.limit.id(), value, n);
            let (local, remaining, lost) = self.with_state(&slot, |s| {
                let (local, lost) = s.reserve(now, w, cost, m.rule.strictness(), c0);
                if local == Local::Reserved && i == last {
                    s.commit(now, cost);
                } else if local == Local::Exact {
                    self.stats.exact_reasons[s.exact_reason().index()].add(1);
                }
                (local, s.cur.remaining(value), lost)
            });
            self.stats.lost(lost);
            if local != Local::Reserved {
                verdict = local;
                break;
            }
            reserved += 1;
            // The most restrictive limit answers: the least left (an earlier limit's
            // reservation is not in its `remaining` yet).
            let remaining = if i == last {
                remaining
            } else {
                remaining.saturating_sub(cost)
            };
            if answer.is_none_or(|b| remaining < b.remaining) {
                answer = Some(Decision {
                    allowed: true,
                    limit: value,
                    remaining,
                    reset_at: reset_in(limiter, now, remaining, w, len),
                    retry_after: Nanos::ZERO,
                    rule: Some(m.limit.id()),
                    path: DecisionPath::Local,
                });
            }
        }
        // Pass 2: commit the earlier reservations (the last committed in pass 1), or roll back
        // every reservation pass 1 made.
        let settle = if verdict == Local::Reserved {
            last
        } else {
            reserved
        };
        for m in &matches[..settle] {
            let slot = SlotKey::new(m.limit.id(), &m.key);
            self.with_state(&slot, |s| {
                if verdict == Local::Reserved {
                    s.commit(now, cost);
                } else {
                    s.roll_back(cost);
                }
            });
        }
        match verdict {
            Local::Reserved => {
                self.stats.local.add(1);
                Ok(answer.unwrap_or_else(Decision::unlimited))
            }
            Local::Denied { until } => {
                self.stats.local.add(1);
                self.stats.denied.add(1);
                let m = &matches[reserved];
                let limiter = m.limit.limiter();
                Ok(Decision {
                    allowed: false,
                    limit: limiter.limit(),
                    remaining: 0,
                    reset_at: reset_at(limiter, now, 0),
                    retry_after: until - now,
                    rule: Some(m.limit.id()),
                    path: DecisionPath::CachedDenial,
                })
            }
            Local::Exact => self.exact(matches, now, cost),
        }
    }

    /// A shadow limit: counts the request where it would have fitted locally, and otherwise
    /// records a would-be denial. It never asks the regional and never denies: it only shows
    /// what the limit would do. (Near the limit it reports from local knowledge, so it may
    /// report a denial the regional would not have made.)
    fn shadow(&self, policy: &Policy, m: &Match<'_>, now: Nanos, cost: u64) {
        let limiter = m.limit.limiter();
        let Some(len) = local_window(limiter) else {
            return;
        };
        let w = now.as_u64() / len;
        let n = self.edges.load(Ordering::Relaxed);
        let c0 = || self.cold_allowance(m.limit.id(), limiter.limit(), n);
        let slot = SlotKey::new(m.limit.id(), &m.key);
        let fitted = self.with_state(&slot, |s| {
            let (local, _) = s.reserve(now, w, cost, m.rule.strictness(), c0);
            if local == Local::Reserved {
                s.commit(now, cost);
            } else {
                // Demand the sync loop turns into a grant, so counting can become local.
                s.note_demand(now, w, cost);
            }
            local == Local::Reserved
        });
        if !fitted {
            self.stats.shadow_denials.add(1);
            if let Some(counter) = policy.shadow_by_limit.get(&m.limit.id()) {
                counter.add(1);
            }
        }
    }

    /// Prepares the exact request for every limit of the request, or decides by failure mode
    /// at once when the regional just failed.
    fn exact(&self, matches: &[Match<'_>], now: Nanos, cost: u64) -> Step<'_> {
        let mut parts = Vec::with_capacity(matches.len());
        let mut checks = Vec::with_capacity(matches.len());
        for m in matches {
            let limiter = m.limit.limiter();
            let len = edge_window(limiter);
            let w = now.as_u64() / len;
            let slot = SlotKey::new(m.limit.id(), &m.key);
            let want = self.with_state(&slot, |s| {
                let lost = s.note_demand(now, w, cost);
                self.stats.lost(lost);
                u64::from(s.window(w).0.demand).saturating_mul(2)
            });
            checks.push(Check {
                limit: m.limit.id(),
                key: slot.wire(),
                window: w,
                // `cost` came from a NonZeroU32.
                cost: NonZeroU32::new(u32::try_from(cost).unwrap_or(u32::MAX))
                    .unwrap_or(NonZeroU32::MIN),
                want,
            });
            parts.push(Part {
                slot: StoredKey::new(&slot),
                limit: m.limit.id(),
                window: w,
                window_end: reset_at(limiter, now, 0),
                failure: m.rule.on_failure(),
                limiter: limiter.clone(),
            });
        }
        let exact = ExactRequest { now, cost, parts };
        if now.as_u64() < self.down_until.load(Ordering::Relaxed) {
            return Ok(self.fallback(exact));
        }
        let acquire = Acquire {
            request_id: self.next_request.fetch_add(1, Ordering::Relaxed),
            checks,
        };
        Err(ExactCheck {
            inner: self,
            exact,
            acquire,
        })
    }

    /// Turns the regional's answer (or its failure) into a decision.
    fn finish(&self, exact: ExactRequest, result: Result<AcquireReply, UpstreamError>) -> Decision {
        let reply = match result {
            Ok(reply) if reply.checks.len() == exact.parts.len() => reply,
            Ok(_) => {
                self.mark_down(exact.now);
                return self.fallback(exact);
            }
            Err(_) => {
                self.mark_down(exact.now);
                return self.fallback(exact);
            }
        };
        self.stats.exact.add(1);
        let now = exact.now;
        // The regional's clock is not ours. A denial says how far its reopening is from its
        // now (`retry_after`), so its times carry over as offsets; an allowed answer carries
        // no such offset, and the edge's own epoch-aligned window end is the reset.
        let regional_now = reply.reset_at - reply.retry_after;
        let local_time = |t: Nanos| now + (t - regional_now);
        let mut answer: Option<Decision> = None;
        for (part, check) in exact.parts.iter().zip(&reply.checks) {
            // When the key may be tried again: the regional's reopening, carried to our clock
            // (the window end; sooner when only other edges' unused grants stood in the way, or
            // when a sliding window's carry falls enough).
            let reopen = if reply.allowed {
                now
            } else {
                local_time(check.reset_at)
            };
            let remaining = self.with_state(&part.slot.view(), |s| {
                let rise = s.raise_granted(part.window, check.granted);
                self.stats.granted.fetch_add(rise, Ordering::Relaxed);
                if !reply.allowed && !check.allowed {
                    s.denied_until = s.denied_until.max(reopen);
                }
                let Some(win) = s.slot(part.window) else {
                    return check.remaining;
                };
                // What is left for this client here: nobody's, plus what this edge holds.
                let remaining = check.remaining.saturating_add(win.unused());
                let used = win.used;
                win.estimate_total(part.limiter.limit().saturating_sub(remaining), used);
                remaining
            });
            let d = Decision {
                allowed: reply.allowed,
                limit: part.limiter.limit(),
                remaining: if check.allowed { remaining } else { 0 },
                reset_at: part.window_end,
                retry_after: reopen - now,
                rule: Some(part.limit),
                path: DecisionPath::Exact,
            };
            let better = match answer {
                None => true,
                // Denied: the limit that denied, reopening last. Allowed: the least left.
                Some(b) if !reply.allowed => {
                    !check.allowed && (b.retry_after < d.retry_after || b.rule.is_none())
                }
                Some(b) => d.remaining < b.remaining,
            };
            if better && (reply.allowed || !check.allowed) {
                answer = Some(d);
            }
        }
        let decision = answer.unwrap_or(Decision {
            allowed: reply.allowed,
            limit: 0,
            remaining: 0,
            reset_at: local_time(reply.reset_at),
            retry_after: reply.retry_after,
            rule: None,
            path: DecisionPath::Exact,
        });
        if !decision.allowed {
            self.stats.denied.add(1);
        }
        decision
    }

    /// The regional did not answer: each rule's failure mode decides (DESIGN §7). `closed`
    /// denies; `local` admits while this edge's own count stays within `P/n`; `open` admits.
    /// The request is admitted only if every limit admits, and what it admits is counted and
    /// synced later like any other count.
    fn fallback(&self, exact: ExactRequest) -> Decision {
        self.stats.fallback.add(1);
        let n = u64::from(self.edges.load(Ordering::Relaxed).max(1));
        let now = exact.now;
        let mut denied_by: Option<(&Part, FailureMode)> = None;
        // What the `local` parts leave of their shares after this request: the only
        // `remaining` this edge can vouch for alone (`open` knows none, so 0).
        let mut remaining: Option<u64> = None;
        for part in &exact.parts {
            let ok = match part.failure {
                FailureMode::Closed => false,
                FailureMode::Open => true,
                FailureMode::Local => {
                    let part_here = self.partition(part.limit, part.limiter.limit());
                    let share = fallback_share(&part.limiter, part_here) / n;
                    // A window's count only grows, so a key this edge knows to be spent
                    // (the regional's last answer, with what this edge admitted since) stays
                    // spent until the window turns: `P/n` of its own count would admit on top
                    // of what the exact path already admitted here. A bucket refills, so what
                    // it knew is no bound.
                    let counts = matches!(
                        part.limiter,
                        Limiter::FixedWindow(_) | Limiter::SlidingWindow(_)
                    );
                    let (after, known) = self.with_state(&part.slot.view(), |s| {
                        let (used, lost) = s.used_in(part.window);
                        self.stats.lost(lost);
                        let known = s.known_left(part.window, part.limiter.limit());
                        (used.saturating_add(exact.cost), known)
                    });
                    let mut left = share.saturating_sub(after);
                    if counts {
                        left = left.min(known.saturating_sub(exact.cost));
                    }
                    remaining = Some(remaining.map_or(left, |r| r.min(left)));
                    after <= share && (!counts || known >= exact.cost)
                }
            };
            if !ok {
                denied_by = Some((part, part.failure));
                break;
            }
        }
        if let Some((part, mode)) = denied_by {
            self.stats.denied.add(1);
            return Decision {
                allowed: false,
                limit: part.limiter.limit(),
                remaining: 0,
                reset_at: part.window_end,
                // Not a promise the regional made: retry when the regional may be back.
                retry_after: Nanos::from(self.config.upstream_backoff).min(part.window_end - now),
                rule: Some(part.limit),
                path: DecisionPath::Fallback(mode),
            };
        }
        let mut mode = FailureMode::Open;
        for part in &exact.parts {
            self.with_state(&part.slot.view(), |s| {
                let lost = s.admit_unconditionally(now, part.window, exact.cost);
                self.stats.lost(lost);
            });
            if part.failure == FailureMode::Local {
                mode = FailureMode::Local;
            }
        }
        let part = &exact.parts[0];
        Decision {
            allowed: true,
            limit: part.limiter.limit(),
            remaining: remaining.unwrap_or(0),
            reset_at: part.window_end,
            retry_after: Nanos::ZERO,
            rule: Some(part.limit),
            path: DecisionPath::Fallback(mode),
        }
    }

    /// `c0` for `limit` (of `value`) with `n` edges, or nothing while `n` is unknown (no
    /// answer from the regional yet): the bound `P + n·c0` needs the real `n`, and guessing
    /// low would hand every edge a large allowance at start-up.
    fn cold_allowance(&self, limit: LimitId, value: u64, n: u32) -> u64 {
        if n == 0 {
            return 0;
        }
        cold_allowance(
            self.partition(limit, value),
            self.config.near_limit_threshold,
            n,
        )
    }

    /// `P` for `limit` (of `value`): this region's partition as the regional last said, or
    /// the whole limit before it has said (a regional without a coordinator holds all of it).
    fn partition(&self, limit: LimitId, value: u64) -> u64 {
        self.partitions
            .get(&limit)
            .map_or(value, |p| (*p).min(value))
    }

    /// See [`Agent::set_rules`].
    fn set_rules(&self, rules: RuleSet) -> bool {
        let _replacing = self
            .replacing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = self.policy.load_full();
        if rules.version() <= old.rules.version() {
            return false;
        }
        let new = Policy::new(rules, Some(&old));
        let changes = changes(&old.rules, &new.rules);
        self.policy.store(Arc::new(new));
        if changes.is_empty() {
            return true;
        }
        // A changed limit's partition is the regional's to say again.
        self.partitions
            .retain(|limit, _| !changes.contains_key(limit));
        let mut returned = 0;
        self.keys
            .retain(|key, state| match changes.get(&key.limit()) {
                None => true,
                Some(Change::Forget) => false,
                Some(Change::Regrant) => {
                    returned += state.limit_changed();
                    true
                }
            });
        self.stats.returned.fetch_add(returned, Ordering::Relaxed);
        true
    }

    fn mark_down(&self, now: Nanos) {
        let until = now + Nanos::from(self.config.upstream_backoff);
        self.down_until.fetch_max(until.as_u64(), Ordering::Relaxed);
    }

    /// A sync sent at `sent` was answered: the regional is reachable, so a backoff begun by
    /// a failure no later than `sent` ends now. Without this one timed-out call, say a
    /// 60 ms stall of a loaded host, sent every exact decision of the edge to its failure
    /// mode for the whole backoff (a `closed` rule denying for a second). A failure during
    /// the sync (begun after `sent`) keeps its backoff.
    fn mark_up(&self, sent: Nanos) {
        let began_by_sent = sent + Nanos::from(self.config.upstream_backoff);
        let _ = self
            .down_until
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |until| {
                (until != 0 && until <= began_by_sent.as_u64()).then_some(0)
            });
    }

    /// Runs `f` on the state of `slot`, creating it on first use. The shard lock is held only
    /// for `f`, which never waits on anything.
    fn with_state<R>(&self, slot: &SlotKey<'_>, f: impl FnOnce(&mut KeyState) -> R) -> R {
        self.keys.with(slot, || KeyState::new(self.clock.now()), f)
    }

    async fn flush(&self) -> Result<(), UpstreamError> {
        let now = self.clock.now();
        let entries = self.collect(now);
        for chunk in entries.chunks(MAX_KEYS_PER_BATCH) {
            let batch = SyncBatch {
                entries: chunk.to_vec(),
            };
            let call = self.upstream.sync(batch);
            let result = tokio::time::timeout(
                self.config.flush_interval.max(self.config.upstream_timeout),
                call,
            )
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
            match result {
                Ok(ack) => {
                    self.mark_up(now);
                    self.apply(&ack);
                    self.stats.synced(chunk.len());
                }
                Err(e) => {
                    self.stats.sync_failures.add(1);
                    self.mark_down(now);
                    return Err(e);
                }
            }
        }
        // The regional has every count this edge had at `now`: the sync lag restarts.
        self.stats
            .last_sync
            .fetch_max(now.as_u64(), Ordering::Relaxed);
        Ok(())
    }

    /// Walks every key: rolls windows forward, hands back idle or recalled grants, collects
    /// what the regional has not acknowledged, and forgets keys idle long enough.
    fn collect(&self, now: Nanos) -> Vec<SyncEntry> {
        let idle_release = Nanos::from(self.config.idle_release);
        let idle_eviction = Nanos::from(self.config.idle_eviction);
        let mut entries = Vec::new();
        let mut lost_total = 0;
        let mut returned = 0;
        let rules = self.rules();
        self.keys.retain(|key, state| {
            let limit = key.limit();
            let Some((_, l)) = rules.limit(limit) else {
                return false; // the rule is gone
            };
            let len = edge_window(l.limiter());
            let current = now.as_u64() / len;
            let (_, lost) = state.window(current);
            lost_total += lost;
            state.forget_settled_prev();
            let idle_for = state.idle_for(now);
            for win in state.windows() {
                let past = win.index < current;
                if idle_for > idle_release || past || win.near_limit || win.recalled {
                    returned += win.release_unused();
                }
                win.recalled = false;
                let demand = win.take_demand();
                let want = if win.near_limit || past { 0 } else { demand };
                if win.unsynced() || want > 0 {
                    entries.push(SyncEntry {
                        limit,
                        key: key.view().wire(),
                        window: win.index,
                        used: win.used,
                        released: win.released,
                        want,
                    });
                }
            }
            state.unsynced() || idle_for <= idle_eviction || state.denied_until > now
        });
        self.stats.lost(lost_total);
        self.stats.returned.fetch_add(returned, Ordering::Relaxed);
        entries
    }

    fn rules(&self) -> Arc<RuleSet> {
        self.policy.load().rules.clone()
    }

    fn apply(&self, ack: &SyncAck) {
        let mut granted = 0;
        for e in &ack.entries {
            if e.edges > 0 {
                self.edges.store(e.edges, Ordering::Relaxed);
            }
            let Some(slot) = SlotKey::from_wire(e.limit, &e.key) else {
                continue;
            };
            // Everything only grows: a late or repeated answer changes nothing.
            granted += self
                .keys
                .get(&slot, |state| {
                    let win = state.slot(e.window)?;
                    win.acknowledge(e.used, e.released);
                    win.learn_total(e.total, e.used);
                    win.near_limit |= e.near_limit;
                    win.recalled |= e.recall;
                    Some(win.raise_granted(e.granted))
                })
                .flatten()
                .unwrap_or(0);
        }
        for p in &ack.partitions {
            self.partitions.insert(p.limit, p.partition);
        }
        for hot in &ack.hot_keys {
            let Some(slot) = SlotKey::from_wire(hot.limit, &hot.key) else {
                continue;
            };
            self.with_state(&slot, |s| s.mark_hot(hot.window));
        }
        // Another edge was denied for what edges hold unused: the next flush hands back what
        // this one holds of these keys, used lately or not. A key it does not hold is not
        // created for it.
        for r in &ack.recalls {
            let Some(slot) = SlotKey::from_wire(r.limit, &r.key) else {
                continue;
            };
            self.keys.get(&slot, |s| {
                if let Some(win) = s.slot(r.window) {
                    win.recalled = true;
                }
            });
        }
        self.stats.granted.fetch_add(granted, Ordering::Relaxed);
    }
}

/// The end of window `w` of length `len` (epoch-aligned, DESIGN §9).
fn window_end(w: u64, len: u64) -> Nanos {
    Nanos(w.saturating_add(1).saturating_mul(len))
}

/// The window length of a limiter the edge can decide under grants (a token bucket's is its
/// lease window, `shared::quota::lease`), or `None` when its keys always take the exact path:
/// the sliding log is exact only at one authority (DESIGN §3), and a leaky bucket's shaper
/// answers "go after X", which no grant can.
fn local_window(limiter: &Limiter) -> Option<u64> {
    grant_window(limiter).map(|len| len.as_u64().max(1))
}

/// The window an edge files `limiter`'s counts under: its grants' window, or for a limiter
/// decided by the regional only, the span its limit is measured over.
fn edge_window(limiter: &Limiter) -> u64 {
    local_window(limiter).unwrap_or_else(|| limiter.window().as_u64().max(1))
}

/// When `limiter` is back to its full limit, at `now` with `remaining` left: the window's
/// end; for a token bucket, when it is full again if nothing else arrives (its grants' lease
/// window says nothing to a client).
fn reset_at(limiter: &Limiter, now: Nanos, remaining: u64) -> Nanos {
    let len = edge_window(limiter);
    reset_in(limiter, now, remaining, now.as_u64() / len, len)
}

/// [`reset_at`] for a caller that has the edge's window `w` of length `len` at hand (the
/// fast path: no second division).
fn reset_in(limiter: &Limiter, now: Nanos, remaining: u64, w: u64, len: u64) -> Nanos {
    if let Limiter::TokenBucket(g) = limiter {
        let missing = g.burst().get().saturating_sub(remaining);
        let t = u128::from(missing) * u128::from(g.emission_interval().as_u64());
        return Nanos::saturating_from(u128::from(now.as_u64()) + t);
    }
    window_end(w, len)
}

/// What one edge may admit of `limiter`'s key in one of its windows when the regional is
/// unreachable and the rule fails `local`, given the region's part `partition`, before
/// dividing by `n` (DESIGN §7): the part; for a token bucket, the part's capacity and what its
/// rate refills over a lease window.
fn fallback_share(limiter: &Limiter, partition: u64) -> u64 {
    if let Limiter::TokenBucket(g) = limiter {
        let refill = u128::from(g.refill_time().as_u64().max(1));
        let per_lease = u128::from(partition) * u128::from(LEASE_WINDOW.as_u64()) / refill;
        return partition.saturating_add(u64::try_from(per_lease).unwrap_or(u64::MAX));
    }
    partition
}

struct Stats {
    local: Striped,
    exact: Striped,
    fallback: Striped,
    denied: Striped,
    lost_windows: Striped,
    sync_failures: Striped,
    shadow_denials: Striped,
    /// By [`ExactReason::index`].
    exact_reasons: [Striped; 4],
    // The sync loop's, written by one flush at a time: plain atomics.
    syncs: AtomicU64,
    sync_entries: AtomicU64,
    sync_sizes: Histogram,
    last_sync: AtomicU64,
    granted: AtomicU64,
    returned: AtomicU64,
}

impl Stats {
    /// Counters from zero, for an agent built at `now` (the sync lag counts from there).
    fn new(now: Nanos) -> Stats {
        Stats {
            local: Striped::default(),
            exact: Striped::default(),
            fallback: Striped::default(),
            denied: Striped::default(),
            lost_windows: Striped::default(),
            sync_failures: Striped::default(),
            shadow_denials: Striped::default(),
            exact_reasons: Default::default(),
            syncs: AtomicU64::new(0),
            sync_entries: AtomicU64::new(0),
            sync_sizes: Histogram::sizes(),
            last_sync: AtomicU64::new(now.as_u64()),
            granted: AtomicU64::new(0),
            returned: AtomicU64::new(0),
        }
    }

    fn synced(&self, entries: usize) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_entries
            .fetch_add(entries as u64, Ordering::Relaxed);
        self.sync_sizes.observe(entries as u64);
    }

    fn lost(&self, n: u32) {
        if n > 0 {
            self.lost_windows.add(u64::from(n));
        }
    }

    fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            local: self.local.sum(),
            exact: self.exact.sum(),
            fallback: self.fallback.sum(),
            denied: self.denied.sum(),
            lost_windows: self.lost_windows.sum(),
            sync_failures: self.sync_failures.sum(),
            shadow_denials: self.shadow_denials.sum(),
            exact_reasons: self.exact_reasons.each_ref().map(Striped::sum),
            syncs: self.syncs.load(Ordering::Relaxed),
            sync_entries: self.sync_entries.load(Ordering::Relaxed),
            last_sync_at: Nanos(self.last_sync.load(Ordering::Relaxed)),
            granted: self.granted.load(Ordering::Relaxed),
            returned: self.returned.load(Ordering::Relaxed),
        }
    }
}

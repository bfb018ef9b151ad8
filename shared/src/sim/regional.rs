//! The regional's decisions as a sans-IO model: merge a sync and grant, or decide an exact
//! request once per request id. The simulator drives it with its own messages; the edge
//! agent's tests drive it through its upstream trait with wire messages ([`WireRegional`]).
//!
//! The real regional keeps the same state in Redis (Lua) or its memory store; this model is
//! what those are tested against.

use std::{collections::HashMap, hash::Hash};

use crate::{
    Nanos, RuleSet,
    quota::{Budget, EdgeId, Grant, KeyLedger, Threshold},
    wire::{
        AckEntry, Acquire, AcquireReply, CheckOutcome, HotKey, LimitPartition, SyncAck, SyncBatch,
    },
};

/// What the regional answers for one entry of a sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncAnswer {
    /// The edge's ceiling after this sync (raised or not).
    pub granted: u64,
    /// The regional's merged `used` for this edge.
    pub used: u64,
    /// The regional's merged `released` for this edge.
    pub released: u64,
    /// `T` after the merge.
    pub total: u64,
    /// Grants have stopped for this key and window.
    pub near_limit: bool,
    /// The pool is spent and this edge holds more than it asked for: hand it back.
    pub recall: bool,
    /// What this sync minted (for the caller's own checks).
    pub minted: Grant,
}

/// One limit an exact request must pass.
#[derive(Clone, Debug)]
pub struct ExactCheck<K> {
    /// The key.
    pub key: K,
    /// The window the regional decides it in, by its own clock (each limit has its own length).
    pub window: u64,
    /// Its cost.
    pub cost: u64,
    /// What the edge asks to hold unused afterwards.
    pub want: u64,
    /// The key's budget in this region.
    pub budget: Budget,
}

/// What the regional answers for one exact request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExactAnswer {
    /// Whether every check's cost was consumed.
    pub allowed: bool,
    /// Per check: whether it alone would have passed.
    pub fits: [bool; MAX_CHECKS],
    /// Per check, in order, the edge's ceiling afterwards (a grant rides along when allowed).
    /// At most [`MAX_CHECKS`] checks are answered.
    pub granted: [u64; MAX_CHECKS],
    /// Per check: `P − (T + G)` afterwards.
    pub remaining: [u64; MAX_CHECKS],
    /// Whether each check's key is near its limit.
    pub near_limit: [bool; MAX_CHECKS],
    /// Per check: how much the grant riding along raised the edge's holding.
    pub minted: [u64; MAX_CHECKS],
    /// Denied, but only because other edges hold unused grants: they come back within a
    /// flush interval, so the edge should not cache the denial until the window ends.
    pub held: bool,
}

/// The most limits one exact request may carry in the model.
pub const MAX_CHECKS: usize = 8;

/// The regional's state for one region: a ledger per (key, window) and the answers it gave to
/// exact requests, so a repeated request (a resend after a lost reply, a duplicate) gets the
/// same answer and consumes nothing twice.
#[derive(Clone, Debug)]
pub struct RegionalModel<K> {
    ledgers: HashMap<(K, u64), KeyLedger>,
    replies: HashMap<(EdgeId, u64), ExactAnswer>,
}

impl<K> Default for RegionalModel<K> {
    fn default() -> Self {
        RegionalModel {
            ledgers: HashMap::new(),
            replies: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Clone> RegionalModel<K> {
    /// An empty region.
    pub fn new() -> Self {
        Self::default()
    }

    /// Merges one entry of `edge`'s sync and grants what it wants, or refuses it (`None`) when
    /// its window is neither `current` nor the one before (DESIGN §9: late or skewed).
    #[allow(clippy::too_many_arguments)] // the entry's fields, as they come off the wire
    pub fn sync(
        &mut self,
        edge: EdgeId,
        key: &K,
        window: u64,
        current: u64,
        used: u64,
        released: u64,
        want: u64,
        budget: &Budget,
    ) -> Option<SyncAnswer> {
        if window > current || window + 1 < current {
            return None;
        }
        let ledger = self.ledgers.entry((key.clone(), window)).or_default();
        ledger.merge(edge, used, released);
        let minted = ledger.grant(edge, budget, want);
        let c = ledger.counters(edge);
        Some(SyncAnswer {
            granted: c.granted,
            used: c.used,
            released: c.released,
            total: ledger.used(),
            near_limit: ledger.is_near_limit(),
            recall: ledger.pool_spent(budget) && c.unused() > want,
            minted,
        })
    }

    /// Decides an exact request, each check in its own window: every check's cost is consumed,
    /// or none.
    /// A request id seen before from this edge gets its first answer again.
    ///
    /// # Panics
    ///
    /// With more than [`MAX_CHECKS`] checks (a model limit, not the protocol's).
    pub fn exact(
        &mut self,
        edge: EdgeId,
        request_id: u64,
        checks: &[ExactCheck<K>],
    ) -> ExactAnswer {
        assert!(
            checks.len() <= MAX_CHECKS,
            "the model answers at most {MAX_CHECKS} checks"
        );
        if let Some(answer) = self.replies.get(&(edge, request_id)) {
            return *answer;
        }
        let mut each = [false; MAX_CHECKS];
        for (i, c) in checks.iter().enumerate() {
            each[i] = c.cost <= c.budget.partition
                && self
                    .ledgers
                    .get(&(c.key.clone(), c.window))
                    .is_none_or(|l| l.fits(c.cost, &c.budget));
        }
        let fits = each[..checks.len()].iter().all(|f| *f);
        let mut answer = ExactAnswer {
            allowed: fits,
            fits: each,
            granted: [0; MAX_CHECKS],
            remaining: [0; MAX_CHECKS],
            near_limit: [false; MAX_CHECKS],
            minted: [0; MAX_CHECKS],
            held: false,
        };
        for (i, c) in checks.iter().enumerate() {
            let ledger = self.ledgers.entry((c.key.clone(), c.window)).or_default();
            if fits {
                ledger.exact(c.cost, &c.budget);
                answer.minted[i] = ledger.grant(edge, &c.budget, c.want).raised_by();
            } else if !each[i]
                && ledger
                    .used()
                    .saturating_add(c.budget.carried)
                    .saturating_add(c.cost)
                    <= c.budget.partition
            {
                answer.held = true;
            }
            answer.granted[i] = ledger.counters(edge).granted;
            answer.remaining[i] = c
                .budget
                .partition
                .saturating_sub(ledger.reserved(&c.budget));
            answer.near_limit[i] = ledger.is_near_limit();
        }
        self.replies.insert((edge, request_id), answer);
        answer
    }

    /// One key's ledger in one window.
    pub fn ledger(&self, key: &K, window: u64) -> Option<&KeyLedger> {
        self.ledgers.get(&(key.clone(), window))
    }

    /// Every ledger, by (key, window).
    pub fn ledgers(&self) -> impl Iterator<Item = (&(K, u64), &KeyLedger)> {
        self.ledgers.iter()
    }

    /// Gives up the ledgers (for end-of-run checks).
    pub fn into_ledgers(self) -> HashMap<(K, u64), KeyLedger> {
        self.ledgers
    }
}

/// A one-region regional answering wire messages from a [`RuleSet`]: what an edge agent's
/// upstream sees, without a network. Each limit's partition is the whole limit (one region)
/// unless [`set_partition`](WireRegional::set_partition) gives it a part (other regions hold
/// the rest).
#[derive(Debug)]
pub struct WireRegional {
    rules: RuleSet,
    edges: u32,
    threshold: Threshold,
    /// How long a denial caused only by others' unused grants lasts (their next flush).
    hold: Nanos,
    model: RegionalModel<(crate::LimitId, String)>,
    partitions: HashMap<crate::LimitId, u64>,
}

impl WireRegional {
    /// A region of `edges` edges enforcing `rules` with threshold `threshold`.
    pub fn new(rules: RuleSet, edges: u32, threshold: Threshold) -> WireRegional {
        WireRegional {
            rules,
            edges,
            threshold,
            hold: Nanos::from_millis(100),
            model: RegionalModel::new(),
            partitions: HashMap::new(),
        }
    }

    /// This region holds `partition` of `limit` (at most the whole limit), as a coordinator
    /// would leave it when other regions hold the rest.
    pub fn set_partition(&mut self, limit: crate::LimitId, partition: u64) {
        self.partitions.insert(limit, partition);
    }

    /// The model underneath, for assertions.
    pub fn model(&self) -> &RegionalModel<(crate::LimitId, String)> {
        &self.model
    }

    fn budget(&self, limit: crate::LimitId) -> Option<(Budget, Nanos)> {
        let (_, limit) = self.rules.limit(limit)?;
        let limiter = limit.limiter();
        Some((
            Budget {
                partition: self
                    .partitions
                    .get(&limit.id())
                    .map_or(limiter.limit(), |&p| p.min(limiter.limit())),
                carried: 0,
                threshold: self.threshold,
                edges: self.edges,
            },
            limiter.window(),
        ))
    }

    /// Answers `edge`'s sync at `now`. Entries for unknown limits or refused windows get no
    /// answer (the edge keeps resending until its window passes).
    pub fn sync(&mut self, edge: EdgeId, now: Nanos, batch: &SyncBatch) -> SyncAck {
        let mut entries = Vec::with_capacity(batch.entries.len());
        let mut partitions: Vec<LimitPartition> = Vec::new();
        for e in &batch.entries {
            let Some((budget, window)) = self.budget(e.limit) else {
                continue;
            };
            if !partitions.iter().any(|p| p.limit == e.limit) {
                partitions.push(LimitPartition {
                    limit: e.limit,
                    partition: budget.partition,
                });
            }
            let current = now.as_u64() / window.as_u64().max(1);
            let key = (e.limit, e.key.clone());
            let Some(a) = self.model.sync(
                edge, &key, e.window, current, e.used, e.released, e.want, &budget,
            ) else {
                continue;
            };
            entries.push(AckEntry {
                limit: e.limit,
                key: e.key.clone(),
                window: e.window,
                granted: a.granted,
                total: a.total,
                edges: self.edges,
                hot: a.total.saturating_mul(2) >= self.threshold.of(budget.partition),
                used: a.used,
                released: a.released,
                near_limit: a.near_limit,
                recall: a.recall,
            });
        }
        let hot_keys = self.hot_keys(now);
        // The model recalls per entry only ([`AckEntry::recall`]).
        SyncAck {
            entries,
            hot_keys,
            partitions,
            recalls: Vec::new(),
        }
    }

    /// Answers `edge`'s exact request at `now`; a limit the rules do not know is denied.
    pub fn acquire(&mut self, edge: EdgeId, now: Nanos, request: &Acquire) -> AcquireReply {
        let deny_unknown = AcquireReply::deny_all(request.request_id, now);
        if request.checks.len() > MAX_CHECKS {
            return deny_unknown;
        }
        let mut checks = Vec::with_capacity(request.checks.len());
        let mut ends = Vec::with_capacity(request.checks.len());
        for c in &request.checks {
            let Some((budget, window)) = self.budget(c.limit) else {
                return deny_unknown;
            };
            let current = now.as_u64() / window.as_u64().max(1);
            ends.push(Nanos((current + 1).saturating_mul(window.as_u64())));
            checks.push(ExactCheck {
                key: (c.limit, c.key.clone()),
                window: current,
                cost: u64::from(c.cost.get()),
                want: c.want,
                budget,
            });
        }
        let a = self.model.exact(edge, request.request_id, &checks);
        let outcomes: Vec<CheckOutcome> = ends
            .iter()
            .enumerate()
            .map(|(i, &end)| CheckOutcome {
                allowed: a.fits[i],
                remaining: a.remaining[i],
                reset_at: if a.fits[i] || !a.held {
                    end
                } else {
                    (now + self.hold).min(end)
                },
                granted: a.granted[i],
            })
            .collect();
        AcquireReply::from_checks(request.request_id, now, outcomes)
    }

    fn hot_keys(&self, now: Nanos) -> Vec<HotKey> {
        let mut hot = Vec::new();
        for ((key, window), ledger) in self.model.ledgers() {
            let Some((budget, w)) = self.budget(key.0) else {
                continue;
            };
            if *window == now.as_u64() / w.as_u64().max(1)
                && ledger.reserved(&budget).saturating_mul(2) >= self.threshold.of(budget.partition)
            {
                hot.push(HotKey {
                    limit: key.0,
                    key: key.1.clone(),
                    window: *window,
                });
            }
        }
        hot
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::{
        quota::DEFAULT_THRESHOLD,
        wire::{Check, SyncEntry},
    };

    fn regional() -> (WireRegional, crate::LimitId, crate::LimitId) {
        let rules = RuleSet::from_yaml(
            "rules.yaml",
            "rate_limits:\n  endpoints:\n    - { id: a, path: /a, limit: 10, window: 1m }\n    \
             - { id: b, path: /b, limit: 2, window: 1m }\n",
        )
        .unwrap();
        let a = rules.rule("a").unwrap().limits()[0].id();
        let b = rules.rule("b").unwrap().limits()[0].id();
        (WireRegional::new(rules, 2, DEFAULT_THRESHOLD), a, b)
    }

    fn check(limit: crate::LimitId, cost: u32) -> Check {
        Check {
            limit,
            key: "k".into(),
            window: 0,
            cost: NonZeroU32::new(cost).unwrap(),
            want: 0,
        }
    }

    #[test]
    fn a_repeated_request_is_answered_once() {
        let (mut r, a, _) = regional();
        let req = Acquire {
            request_id: 9,
            checks: vec![check(a, 3)],
        };
        let first = r.acquire(EdgeId(1), Nanos::ZERO, &req);
        let again = r.acquire(EdgeId(1), Nanos::ZERO, &req);
        assert!(first.allowed);
        assert_eq!(first, again);
        let ledger = r.model().ledger(&(a, "k".into()), 0).unwrap();
        assert_eq!(ledger.exact_used(), 3, "consumed once");
    }

    #[test]
    fn a_request_passes_every_limit_or_consumes_from_none() {
        let (mut r, a, b) = regional();
        let req = Acquire {
            request_id: 1,
            checks: vec![check(a, 3), check(b, 3)],
        };
        let reply = r.acquire(EdgeId(1), Nanos::ZERO, &req);
        assert!(!reply.allowed);
        assert!(reply.checks[0].allowed && !reply.checks[1].allowed);
        assert_eq!(reply.retry_after, Nanos::from_secs(60));
        assert!(
            r.model()
                .ledger(&(a, "k".into()), 0)
                .is_none_or(|l| l.exact_used() == 0)
        );
    }

    #[test]
    fn a_sync_merges_and_grants_what_is_wanted() {
        let (mut r, a, _) = regional();
        let batch = SyncBatch {
            entries: vec![SyncEntry {
                limit: a,
                key: "k".into(),
                window: 0,
                used: 0,
                released: 0,
                want: 2,
            }],
        };
        let ack = r.sync(EdgeId(1), Nanos::ZERO, &batch);
        assert_eq!(ack.entries.len(), 1);
        assert_eq!(ack.entries[0].granted, 2);
        // A window two behind is refused: no answer.
        let late = r.sync(EdgeId(1), Nanos::from_secs(180), &batch);
        assert!(late.entries.is_empty());
    }
}

//! A deterministic simulator of the quota protocol: N edges and one regional on a virtual
//! clock, over a network that delays, drops, duplicates and reorders, driven by one seed.
//!
//! It runs the real [`quota`](crate::quota) math (the regional's [`KeyLedger`]s) and a model
//! of the edge's decision rules (grant, cold allowance, cached denial, exact path), and after
//! every event it checks, against ground truth (every edge's true counters, not the regional's
//! lagging view), that:
//!
//! - for every hard key, what edges decided under grants fits under `θ·P`, and everything
//!   admitted or reserved fits under `P`;
//! - for every soft key, everything fits under `P + n·c0`.
//!
//! A run ends when the workload is done and every edge's counts are acknowledged; a run that
//! does not settle within its event budget fails ([`Sim::drive_bounded`]). The [`Report`] says
//! what happened: decisions, local ratio, messages, overshoot and shortfall.
//!
//! The model uses fixed windows (the grant math is the same for every counter-like algorithm;
//! the sliding counter only adds carried usage to `T`), and an exact request that times out is
//! denied (failure mode `closed`), so every bound it checks is the protocol's own.
//!
//! Like quinn-proto's `Pair`, it advances time to the next event; unlike a real network, it is
//! fully reproducible: a failing seed is a failing test forever.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap},
};

use crate::{
    clock::Nanos,
    quota::{Budget, EdgeId, KeyLedger, Threshold, cold_allowance},
    rules::Strictness,
};

mod regional;
#[cfg(test)]
mod tests;

pub use self::regional::{
    ExactAnswer, ExactCheck, MAX_CHECKS, RegionalModel, SyncAnswer, WireRegional,
};

/// How the simulated deployment and network behave.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Drives every random choice: delays, losses, duplicates.
    pub seed: u64,
    /// `n`: the edges in the region.
    pub edges: u32,
    /// The fixed window every key is limited over.
    pub window: Nanos,
    /// How often an edge syncs (DESIGN default 100 ms).
    pub flush_interval: Nanos,
    /// How long an edge waits for an exact answer before its failure mode (here: deny).
    pub timeout: Nanos,
    /// θ.
    pub threshold: Threshold,
    /// One-way delay, uniform in `[min, max]`; a wide range reorders messages.
    pub delay: (Nanos, Nanos),
    /// Chance, in ppm, that a message is lost.
    pub loss_ppm: u32,
    /// Chance, in ppm, that a message is delivered twice (with independent delays).
    pub duplicate_ppm: u32,
    /// An edge hands back the unused grant of a key it has not used for this long. Sooner
    /// when the regional recalls it (the pool is spent) or the key is near its limit.
    pub idle_after: Nanos,
}

impl SimConfig {
    /// A well-behaved network: 0.5–2 ms delays, nothing lost or duplicated; 100 ms flushes,
    /// 50 ms timeout, θ = 0.8, 1 s windows.
    pub fn new(seed: u64, edges: u32) -> SimConfig {
        SimConfig {
            seed,
            edges,
            window: Nanos::from_secs(1),
            flush_interval: Nanos::from_millis(100),
            timeout: Nanos::from_millis(50),
            threshold: crate::quota::DEFAULT_THRESHOLD,
            delay: (Nanos(500_000), Nanos::from_millis(2)),
            loss_ppm: 0,
            duplicate_ppm: 0,
            idle_after: Nanos::from_secs(1),
        }
    }
}

/// One limited key: its limit per window and how cold requests are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpec {
    /// `P` (one region, so the whole limit).
    pub limit: u64,
    /// Hard or soft (DESIGN §4).
    pub strictness: Strictness,
}

/// One request reaching one edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// When it reaches the edge.
    pub at: Nanos,
    /// Which edge (`0..edges`).
    pub edge: u32,
    /// Which key (an index into the key specs).
    pub key: u32,
    /// Its cost; the model admits unit costs and larger ones alike.
    pub cost: u64,
}

/// What a run did. `local_ratio` counts decisions made without waiting on the network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Requests decided.
    pub decisions: u64,
    /// Decided by the edge alone: under a grant, from the cold allowance, or a cached denial.
    pub local: u64,
    /// Decided by the regional (exact path), including timeouts.
    pub exact: u64,
    /// Exact requests that timed out (denied).
    pub timeouts: u64,
    /// Slots an edge dropped with counts the regional never acknowledged, because their window
    /// had passed the regional's acceptance (the current and the previous window).
    pub stale_dropped: u64,
    /// Exact requests by reason: the key had no grant yet at this edge (hard keys' first
    /// requests, soft keys past their cold allowance before the first sync).
    pub exact_cold: u64,
    /// Exact requests by reason: the key was near its limit (past `θ·P`, grants stopped).
    pub exact_near_limit: u64,
    /// Exact requests by reason: the edge had spent its grant before the next sync refilled it.
    pub exact_grant_spent: u64,
    /// Requests allowed.
    pub allowed: u64,
    /// Messages sent (before loss and duplication).
    pub messages: u64,
    /// Per hard key and window, admitted above the limit, summed. Must be zero.
    pub hard_overshoot: u64,
    /// Per soft key and window, admitted above the limit, summed.
    pub soft_overshoot: u64,
    /// The largest soft overshoot of one key in one window, in ppm of its limit.
    pub worst_soft_overshoot_ppm: u64,
    /// For keys that saw denials: `min(offered, limit) − admitted`, summed over windows.
    pub shortfall: u64,
    /// Admitted per (key, window), for scenario assertions.
    pub admitted: BTreeMap<(u32, u64), u64>,
    /// Offered per (key, window).
    pub offered: BTreeMap<(u32, u64), u64>,
    /// Every decision in arrival order: (arrival index, allowed).
    pub verdicts: Vec<(usize, bool)>,
    /// Per (key, window): cost the regional consumed on the exact path for requests whose edge
    /// had already timed out and denied them. Counted by the regional, never admitted: the
    /// price of a lost reply (a shortfall, never an overshoot).
    pub orphaned: BTreeMap<(u32, u64), u64>,
}

impl Report {
    /// Local decisions over all decisions.
    pub fn local_ratio(&self) -> f64 {
        if self.decisions == 0 {
            return 1.0;
        }
        self.local as f64 / self.decisions as f64
    }
}

type Slot = (u32, u64); // (key, window index)

/// What an edge knows and has done for one key in one window.
#[derive(Clone, Copy, Debug, Default)]
struct EdgeSlot {
    granted: u64,
    released: u64,
    used: u64,
    /// Admitted from the cold allowance (soft keys, before any grant).
    cold: u64,
    /// The regional's echo of our counters: resend until it covers ours.
    acked_used: u64,
    acked_released: u64,
    /// The regional said the key is near its limit: exact path for the rest of the window.
    near_limit: bool,
    /// The regional asked for unused quota back (its pool is spent).
    recalled: bool,
    last_used: Nanos,
    /// Cost asked for since the last flush (local or exact): the edge's demand.
    demand: u64,
}

#[derive(Clone, Debug)]
enum Msg {
    Sync {
        edge: u32,
        entries: Vec<SyncEntry>,
    },
    Ack {
        entries: Vec<AckEntry>,
        hot: Vec<Slot>,
    },
    /// The regional decides by its own clock, so no window is sent.
    Acquire {
        edge: u32,
        id: u64,
        key: u32,
        cost: u64,
        want: u64,
    },
    Reply {
        id: u64,
        key: u32,
        window: u64,
        allowed: bool,
        granted: u64,
        near_limit: bool,
        reopen_at: Nanos,
    },
}

#[derive(Clone, Copy, Debug)]
struct SyncEntry {
    slot: Slot,
    used: u64,
    released: u64,
    /// What the edge asks to hold unused: two intervals of its recent demand.
    want: u64,
}

#[derive(Clone, Copy, Debug)]
struct AckEntry {
    slot: Slot,
    granted: u64,
    used: u64,
    released: u64,
    near_limit: bool,
    recall: bool,
}

#[derive(Clone, Debug)]
enum Event {
    Arrive(usize),
    Flush(u32),
    Deliver { to: Node, msg: Msg },
    Timeout { edge: u32, id: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Regional,
    Edge(u32),
}

struct Edge {
    slots: HashMap<Slot, EdgeSlot>,
    denied_until: HashMap<u32, Nanos>,
    hot: BTreeSet<Slot>,
    /// Exact requests in flight: id → arrival.
    pending: HashMap<u64, usize>,
    /// A silent edge sends nothing and receives nothing (crashed or cut off).
    silent: bool,
}

/// The simulator. Build it with the deployment, the keys and the workload, then
/// [`drive_bounded`](Sim::drive_bounded).
pub struct Sim {
    config: SimConfig,
    keys: Vec<KeySpec>,
    arrivals: Vec<Arrival>,
    silence: Vec<(u32, Nanos)>,
    now: Nanos,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Nanos, u64, usize)>>,
    events: Vec<Option<Event>>,
    seq: u64,
    edges: Vec<Edge>,
    regional: RegionalModel<u32>,
    /// The regional's first answer to each exact request: (edge, id) → (slot, allowed).
    answered: HashMap<(u32, u64), (Slot, bool)>,
    /// Exact requests an edge gave up on: (edge, id) → arrival.
    timed_out: HashMap<(u32, u64), usize>,
    next_id: u64,
    report: Report,
    c0: Vec<u64>,
    /// Slots the current event changed: only their invariants can have moved.
    touched: Vec<Slot>,
}

impl Sim {
    /// A simulation of `keys` under `arrivals` (any order; they are sorted by time).
    pub fn new(config: SimConfig, keys: Vec<KeySpec>, mut arrivals: Vec<Arrival>) -> Sim {
        arrivals.sort_by_key(|a| a.at);
        let edges = (0..config.edges)
            .map(|_| Edge {
                slots: HashMap::new(),
                denied_until: HashMap::new(),
                hot: BTreeSet::new(),
                pending: HashMap::new(),
                silent: false,
            })
            .collect();
        let c0 = keys
            .iter()
            .map(|k| cold_allowance(k.limit, config.threshold, config.edges))
            .collect();
        Sim {
            rng: Rng::new(config.seed),
            config,
            keys,
            arrivals,
            silence: Vec::new(),
            now: Nanos::ZERO,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            edges,
            regional: RegionalModel::new(),
            answered: HashMap::new(),
            timed_out: HashMap::new(),
            next_id: 0,
            report: Report::default(),
            c0,
            touched: Vec::new(),
        }
    }

    /// From `at` on, `edge` sends and receives nothing, as if it crashed holding its grants.
    pub fn silence(&mut self, edge: u32, at: Nanos) {
        self.silence.push((edge, at));
    }

    /// Runs the workload to the end and until every count is acknowledged, checking the
    /// invariants after every event.
    ///
    /// # Panics
    ///
    /// When an invariant breaks, or when the run has not settled after `max_events` events.
    pub fn drive_bounded(mut self, max_events: u64) -> Report {
        self.run(max_events);
        self.finish()
    }

    /// [`drive_bounded`](Sim::drive_bounded), also returning the regional's ledgers.
    pub fn drive_and_keep_ledgers(
        mut self,
        max_events: u64,
    ) -> (Report, HashMap<(u32, u64), KeyLedger>) {
        self.run(max_events);
        let report = self.finish();
        (report, std::mem::take(&mut self.regional).into_ledgers())
    }

    fn run(&mut self, max_events: u64) {
        for i in 0..self.arrivals.len() {
            let at = self.arrivals[i].at;
            self.schedule(at, Event::Arrive(i));
        }
        let first_flush = self.config.flush_interval;
        for e in 0..self.config.edges {
            // Stagger flushes so edges do not sync in lockstep.
            let offset = Nanos(self.rng.below(first_flush.as_u64().max(1)));
            self.schedule(offset, Event::Flush(e));
        }
        let last_arrival = self.arrivals.last().map_or(Nanos::ZERO, |a| a.at);
        let mut steps = 0u64;
        while let Some(Reverse((at, _, idx))) = self.queue.pop() {
            steps += 1;
            assert!(
                steps <= max_events,
                "seed {}: no settling after {max_events} events (t = {})",
                self.config.seed,
                self.now
            );
            self.now = at;
            let event = self.events[idx].take().expect("each event is popped once");
            self.apply_silence();
            self.handle(event);
            self.check_touched();
            if self.now > last_arrival && self.settled() {
                break;
            }
        }
    }

    fn apply_silence(&mut self) {
        for &(edge, at) in &self.silence {
            if self.now >= at {
                self.edges[edge as usize].silent = true;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Arrive(i) => self.arrive(i),
            Event::Flush(e) => self.flush(e),
            Event::Deliver { to, msg } => match to {
                Node::Regional => self.regional_receive(msg),
                Node::Edge(e) => self.edge_receive(e, msg),
            },
            Event::Timeout { edge, id } => {
                if let Some(arrival) = self.edges[edge as usize].pending.remove(&id) {
                    self.report.timeouts += 1;
                    self.timed_out.insert((edge, id), arrival);
                    self.decide(arrival, false, false, None);
                }
            }
        }
    }

    // ---- the edge ------------------------------------------------------------------------

    fn arrive(&mut self, i: usize) {
        let Arrival {
            edge, key, cost, ..
        } = self.arrivals[i];
        if self.edges[edge as usize].silent {
            return; // a crashed edge serves nothing; the request is not offered here
        }
        let now = self.now;
        let window = now.as_u64() / self.config.window.as_u64();
        *self.report.offered.entry((key, window)).or_default() += cost;
        let spec = self.keys[key as usize];
        let c0 = self.c0[key as usize];
        let e = &mut self.edges[edge as usize];
        if e.denied_until.get(&key).is_some_and(|&t| t > now) {
            self.decide(i, false, true, None);
            return;
        }
        let hot = e.hot.contains(&(key, window));
        self.touched.push((key, window));
        let slot = e.slots.entry((key, window)).or_default();
        let under_grant = slot.used + cost <= slot.granted.saturating_sub(slot.released);
        let cold_ok = spec.strictness == Strictness::Soft
            && slot.granted == 0
            && !hot
            && slot.cold + cost <= c0;
        if !slot.near_limit && (under_grant || cold_ok) {
            slot.used += cost;
            if !under_grant {
                slot.cold += cost;
            }
            slot.last_used = now;
            slot.demand += cost;
            self.decide(i, true, true, Some((key, window)));
            return;
        }
        // Exact path.
        slot.demand += cost;
        slot.last_used = now;
        let want = 2 * slot.demand;
        if slot.near_limit {
            self.report.exact_near_limit += 1;
        } else if slot.granted == 0 {
            self.report.exact_cold += 1;
        } else {
            self.report.exact_grant_spent += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        e.pending.insert(id, i);
        let timeout = now + self.config.timeout;
        self.schedule(timeout, Event::Timeout { edge, id });
        self.send(
            Node::Regional,
            Msg::Acquire {
                edge,
                id,
                key,
                cost,
                want,
            },
        );
    }

    fn flush(&mut self, edge: u32) {
        let next = self.now + self.config.flush_interval;
        self.schedule(next, Event::Flush(edge));
        let now = self.now;
        let idle_before = now.saturating_sub(self.config.idle_after);
        let e = &mut self.edges[edge as usize];
        if e.silent {
            return;
        }
        let mut entries = Vec::new();
        for (&slot, s) in e.slots.iter_mut() {
            // Hand back what an idle or near-limit key holds unused.
            let idle = s.last_used < idle_before;
            if (idle || s.near_limit || s.recalled) && s.granted > s.released + s.used {
                s.released = s.granted - s.used;
            }
            s.recalled = false;
            let want = if s.near_limit { 0 } else { 2 * s.demand };
            s.demand = 0;
            if s.used != s.acked_used || s.released != s.acked_released || want > 0 {
                self.touched.push(slot);
                entries.push(SyncEntry {
                    slot,
                    used: s.used,
                    released: s.released,
                    want,
                });
            }
        }
        // Forget windows the regional no longer accepts (older than the previous one). Counts
        // still unacknowledged there are lost to the regional: the simulator counts them, and
        // the lossless scenarios check that it never happens.
        let window = now.as_u64() / self.config.window.as_u64();
        let mut stale = 0;
        e.slots.retain(|&(_, w), s| {
            let keep = w + 1 >= window;
            if !keep && (s.used != s.acked_used || s.released != s.acked_released) {
                stale += 1;
            }
            keep
        });
        self.report.stale_dropped += stale;
        if !entries.is_empty() {
            entries.sort_by_key(|x| x.slot);
            self.send(Node::Regional, Msg::Sync { edge, entries });
        }
    }

    fn edge_receive(&mut self, edge: u32, msg: Msg) {
        let e = &mut self.edges[edge as usize];
        if e.silent {
            return;
        }
        match msg {
            Msg::Ack { entries, hot } => {
                for a in entries {
                    // An ack for a slot the edge already dropped (a late duplicate) has
                    // nothing left to update.
                    let Some(s) = e.slots.get_mut(&a.slot) else {
                        continue;
                    };
                    self.touched.push(a.slot);
                    // Ceilings and echoes only grow: a late or repeated ack changes nothing.
                    s.granted = s.granted.max(a.granted);
                    s.acked_used = s.acked_used.max(a.used);
                    s.acked_released = s.acked_released.max(a.released);
                    s.near_limit |= a.near_limit;
                    s.recalled |= a.recall;
                }
                e.hot.extend(hot);
            }
            Msg::Reply {
                id,
                key,
                window,
                allowed,
                granted,
                near_limit,
                reopen_at,
            } => {
                let current = self.now.as_u64() / self.config.window.as_u64();
                if window + 1 >= current {
                    self.touched.push((key, window));
                    let s = e.slots.entry((key, window)).or_default();
                    s.granted = s.granted.max(granted);
                    s.near_limit |= near_limit;
                }
                if !allowed {
                    let until = e.denied_until.entry(key).or_default();
                    *until = (*until).max(reopen_at);
                }
                if let Some(arrival) = e.pending.remove(&id) {
                    self.decide(arrival, allowed, false, allowed.then_some((key, window)));
                }
            }
            Msg::Sync { .. } | Msg::Acquire { .. } => unreachable!("edges receive no requests"),
        }
    }

    // ---- the regional --------------------------------------------------------------------

    fn budget(&self, key: u32) -> Budget {
        Budget {
            partition: self.keys[key as usize].limit,
            carried: 0,
            threshold: self.config.threshold,
            edges: self.config.edges,
        }
    }

    fn regional_receive(&mut self, msg: Msg) {
        let current = self.now.as_u64() / self.config.window.as_u64();
        match msg {
            Msg::Sync { edge, entries } => {
                let mut acks = Vec::with_capacity(entries.len());
                for x in entries {
                    let budget = self.budget(x.slot.0);
                    let (key, window) = x.slot;
                    let Some(a) = self.regional.sync(
                        EdgeId(u64::from(edge)),
                        &key,
                        window,
                        current,
                        x.used,
                        x.released,
                        x.want,
                        &budget,
                    ) else {
                        continue;
                    };
                    self.touched.push(x.slot);
                    self.assert_minted_under_threshold(x.slot, a.minted.raised_by());
                    acks.push(AckEntry {
                        slot: x.slot,
                        granted: a.granted,
                        used: a.used,
                        released: a.released,
                        near_limit: a.near_limit,
                        recall: a.recall,
                    });
                }
                let hot = self.hot_keys();
                self.send(Node::Edge(edge), Msg::Ack { entries: acks, hot });
            }
            Msg::Acquire {
                edge,
                id,
                key,
                cost,
                want,
            } => {
                // The regional decides by its own clock; the model answers a repeated request
                // with its first answer and consumes nothing twice.
                let budget = self.budget(key);
                let check = ExactCheck {
                    key,
                    window: current,
                    cost,
                    want,
                    budget,
                };
                let a = self.regional.exact(EdgeId(u64::from(edge)), id, &[check]);
                let slot = (key, current);
                self.touched.push(slot);
                self.assert_minted_under_threshold(slot, a.minted[0]);
                self.answered.entry((edge, id)).or_insert((slot, a.allowed));
                let window_end = Nanos((current + 1) * self.config.window.as_u64());
                // Denied only because others hold unused grants: they come back within a flush.
                let reopen_at = if a.held {
                    (self.now + self.config.flush_interval).min(window_end)
                } else {
                    window_end
                };
                let reply = Msg::Reply {
                    id,
                    key,
                    window: current,
                    allowed: a.allowed,
                    granted: a.granted[0],
                    near_limit: a.near_limit[0],
                    reopen_at,
                };
                self.send(Node::Edge(edge), reply);
            }
            Msg::Ack { .. } | Msg::Reply { .. } => {
                unreachable!("the regional receives no answers")
            }
        }
    }

    /// `T + G ≤ θ·P` in the regional's own view, right after a grant was minted. (The
    /// ground-truth checks after every event bound the edges' part; this one includes the
    /// exact path's.)
    fn assert_minted_under_threshold(&self, (key, window): Slot, raised_by: u64) {
        if raised_by == 0 {
            return;
        }
        let budget = self.budget(key);
        let reserved = self
            .regional
            .ledger(&key, window)
            .map_or(0, |l| l.reserved(&budget));
        assert!(
            reserved <= budget.threshold.of(budget.partition),
            "seed {}: key {key} window {window}: minted to T + G = {reserved} > θ·P",
            self.config.seed
        );
    }

    /// Keys above `θ·P/2` this window: edges spend no cold allowance on them.
    fn hot_keys(&self) -> Vec<Slot> {
        let current = self.now.as_u64() / self.config.window.as_u64();
        let mut hot: Vec<Slot> = self
            .regional
            .ledgers()
            .filter(|((key, w), ledger)| {
                *w == current && {
                    let b = self.budget(*key);
                    ledger.reserved(&b) * 2 >= b.threshold.of(b.partition)
                }
            })
            .map(|(slot, _)| *slot)
            .collect();
        hot.sort_unstable();
        hot
    }

    // ---- plumbing ------------------------------------------------------------------------

    /// Records a decision as the client sees it; `slot` is the (key, window) an allowed request
    /// was counted in (the regional's window on the exact path).
    fn decide(&mut self, arrival: usize, allowed: bool, local: bool, slot: Option<Slot>) {
        self.report.decisions += 1;
        if let (true, Some(slot)) = (allowed, slot) {
            let cost = self.arrivals[arrival].cost;
            *self.report.admitted.entry(slot).or_default() += cost;
        }
        if local {
            self.report.local += 1;
        } else {
            self.report.exact += 1;
        }
        if allowed {
            self.report.allowed += 1;
        }
        self.report.verdicts.push((arrival, allowed));
    }

    fn send(&mut self, to: Node, msg: Msg) {
        self.report.messages += 1;
        if self.rng.chance(self.config.loss_ppm) {
            return;
        }
        let copies = if self.rng.chance(self.config.duplicate_ppm) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (lo, hi) = self.config.delay;
            let delay = lo.as_u64() + self.rng.below(hi.as_u64().saturating_sub(lo.as_u64()) + 1);
            let at = self.now + Nanos(delay);
            self.schedule(
                at,
                Event::Deliver {
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn schedule(&mut self, at: Nanos, event: Event) {
        self.events.push(Some(event));
        self.queue
            .push(Reverse((at, self.seq, self.events.len() - 1)));
        self.seq += 1;
    }

    fn settled(&self) -> bool {
        self.edges.iter().all(|e| {
            e.silent
                || (e.pending.is_empty()
                    && e.slots
                        .values()
                        .all(|s| s.used == s.acked_used && s.released == s.acked_released))
        })
    }

    fn check_touched(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &slot in &touched {
            self.check_invariants(slot);
        }
        touched.clear();
        self.touched = touched;
    }

    /// The invariants of DESIGN §4 for one slot, on ground truth: each edge's true counters
    /// against the ceilings the regional granted.
    fn check_invariants(&self, (key, window): Slot) {
        if let Some(ledger) = self.regional.ledger(&key, window) {
            let spec = self.keys[key as usize];
            let budget = self.budget(key);
            let mut local = 0u64;
            for (i, e) in self.edges.iter().enumerate() {
                let merged = ledger.counters(EdgeId(i as u64));
                local += match e.slots.get(&(key, window)) {
                    Some(s) => s.used.max(merged.granted.saturating_sub(s.released)),
                    // The edge forgets a slot only once the regional acknowledged all of it.
                    None => merged.holding(),
                };
            }
            let all = local + ledger.exact_used();
            match spec.strictness {
                Strictness::Hard => {
                    assert!(
                        local <= budget.threshold.of(spec.limit),
                        "seed {}: key {key} window {window}: local T + G = {local} > θ·P",
                        self.config.seed
                    );
                    assert!(
                        all <= spec.limit,
                        "seed {}: key {key} window {window}: T + G = {all} > P = {}",
                        self.config.seed,
                        spec.limit
                    );
                }
                Strictness::Soft => {
                    let bound = spec.limit + u64::from(self.config.edges) * self.c0[key as usize];
                    assert!(
                        all <= bound,
                        "seed {}: soft key {key} window {window}: {all} > P + n·c0 = {bound}",
                        self.config.seed
                    );
                }
            }
        }
    }

    fn finish(&mut self) -> Report {
        let mut denied: BTreeSet<u32> = BTreeSet::new();
        for &(i, allowed) in &self.report.verdicts {
            if !allowed {
                denied.insert(self.arrivals[i].key);
            }
        }
        let mut r = std::mem::take(&mut self.report);
        for (edge_id, &arrival) in &self.timed_out {
            if let Some(&(slot, true)) = self.answered.get(edge_id) {
                *r.orphaned.entry(slot).or_default() += self.arrivals[arrival].cost;
            }
        }
        for (&(key, _), &admitted) in &r.admitted {
            let spec = self.keys[key as usize];
            let over = admitted.saturating_sub(spec.limit);
            match spec.strictness {
                Strictness::Hard => r.hard_overshoot += over,
                Strictness::Soft => {
                    r.soft_overshoot += over;
                    let ppm = over * 1_000_000 / spec.limit.max(1);
                    r.worst_soft_overshoot_ppm = r.worst_soft_overshoot_ppm.max(ppm);
                }
            }
        }
        for (&(key, window), &offered) in &r.offered {
            if denied.contains(&key) {
                let admitted = r.admitted.get(&(key, window)).copied().unwrap_or(0);
                let target = offered.min(self.keys[key as usize].limit);
                r.shortfall += target.saturating_sub(admitted);
            }
        }
        r
    }
}

/// SplitMix64: small, fast, and the same on every machine, which is all a simulator needs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `ppm / 1_000_000`.
    pub fn chance(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.below(1_000_000) < u64::from(ppm)
    }
}

/// Samples ranks `0..n` with probability ∝ `1 / (rank + 1)^s`, by inverse CDF over a table.
#[derive(Clone, Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// A Zipf distribution over `n` ranks with exponent `s`.
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for r in 1..=n {
            acc += 1.0 / (r as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// One rank.
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

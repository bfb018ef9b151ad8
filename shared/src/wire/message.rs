//! Every message the tiers exchange, and the contract of each field.
//!
//! One [`Message`] enum serves both links, edge ↔ regional and regional ↔ coordinator, rather
//! than one enum per link. Several messages travel on both (the handshake, rule-set pushes and
//! their acks, error notices), a regional is a server on one link and a client on the other and
//! would otherwise hold two codecs, and one decoder is one fuzz target. The price is that the
//! type does not stop a regional from receiving, say, a `Report` from an edge; each variant's
//! documentation says which way it travels, and a session that receives a message that is not
//! valid on its link or in its state closes the stream with [`CloseCode::UnexpectedMessage`].
//!
//! Everything here is plain data: every field is public and the codec checks only what bounds
//! memory (list lengths, key lengths, frame size). Meaning (is this window current, does this
//! limit exist) is checked by the tier that acts on the message, as DESIGN §9 has the regional
//! refuse counts for windows other than the current and previous one.
//!
//! The order of variants and of fields is the wire format (postcard encodes an enum variant by
//! its index and a struct's fields in order): change it only with a [`PROTOCOL_VERSION`] bump.
//!
//! [`CloseCode::UnexpectedMessage`]: crate::wire::CloseCode::UnexpectedMessage
//! [`PROTOCOL_VERSION`]: crate::wire::PROTOCOL_VERSION

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use crate::{clock::Nanos, rules::LimitId, wire::code::CloseCode};

/// One frame's content. Each variant carries a struct of the same name that documents its
/// fields; the variant says which way it travels.
///
/// `From` is implemented for every payload struct, so `Message::from(batch)` or
/// `batch.into()` builds the frame's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Edge → regional, or regional → coordinator: the first frame on a connection.
    Hello(Hello),
    /// Answer to [`Hello`]: the connection is accepted.
    Welcome(Welcome),
    /// Answer to [`Hello`]: the connection is refused; the sender closes it next.
    Refused(Refused),
    /// Edge → regional: the edge's counters for the keys that changed.
    SyncBatch(SyncBatch),
    /// Regional → edge: the answer to one [`SyncBatch`].
    SyncAck(SyncAck),
    /// Edge → regional: an exact, all-or-nothing check-and-consume.
    Acquire(Acquire),
    /// Regional → edge: the answer to one [`Acquire`].
    AcquireReply(AcquireReply),
    /// Coordinator → regional, regional → edge: a new rule set.
    RuleSetPush(RuleSetPush),
    /// Regional → coordinator, edge → regional: the answer to one [`RuleSetPush`].
    RuleSetAck(RuleSetAck),
    /// Regional → coordinator: demand over the last reporting interval.
    Report(Report),
    /// Coordinator → regional: the answer to one [`Report`].
    ReportAck(ReportAck),
    /// Coordinator → regional: the region's partitions, whole.
    Partitions(Partitions),
    /// Coordinator → giving regional: first phase of a transfer.
    Release(Release),
    /// Giving regional → coordinator: what a [`Release`] actually freed.
    Confirm(Confirm),
    /// Coordinator → receiving regional: second phase of a transfer.
    TransferGrant(TransferGrant),
    /// Regional → coordinator: escalation before a denial.
    QuotaRequest(QuotaRequest),
    /// Coordinator → regional: the answer to one [`QuotaRequest`].
    QuotaReply(QuotaReply),
    /// Either way, on any link: why the sender is about to close the stream.
    Error(ErrorNotice),
    /// Coordinator → regional: what the region holds for one key (the admin API's debug view).
    KeyQuery(KeyQuery),
    /// Regional → coordinator: the answer to one [`KeyQuery`].
    KeyReport(KeyReport),
}

impl Message {
    /// A short, stable, snake_case name of the variant, for logs and metric labels
    /// (`frames_total{kind="sync_batch"}`); it never contains data from the message.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Refused(_) => "refused",
            Message::SyncBatch(_) => "sync_batch",
            Message::SyncAck(_) => "sync_ack",
            Message::Acquire(_) => "acquire",
            Message::AcquireReply(_) => "acquire_reply",
            Message::RuleSetPush(_) => "rule_set_push",
            Message::RuleSetAck(_) => "rule_set_ack",
            Message::Report(_) => "report",
            Message::ReportAck(_) => "report_ack",
            Message::Partitions(_) => "partitions",
            Message::Release(_) => "release",
            Message::Confirm(_) => "confirm",
            Message::TransferGrant(_) => "transfer_grant",
            Message::QuotaRequest(_) => "quota_request",
            Message::QuotaReply(_) => "quota_reply",
            Message::Error(_) => "error",
            Message::KeyQuery(_) => "key_query",
            Message::KeyReport(_) => "key_report",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The first frame a connecting node sends: who it is and what it runs.
///
/// The server answers with [`Welcome`] or [`Refused`]. Nothing else may be sent before the
/// answer arrives; a server that receives anything else first closes with
/// [`CloseCode::UnexpectedMessage`]. When the server's rule set is newer than
/// `rule_set_version`, a [`RuleSetPush`] follows the `Welcome`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The newest protocol version the sender speaks. Today always
    /// [`PROTOCOL_VERSION`](crate::wire::PROTOCOL_VERSION), like the frame's own version byte;
    /// it is here so that the server can log and refuse with both versions in hand.
    pub protocol_version: u8,
    /// The sender's node name, unique within the deployment (`edge-eu-1`). For an edge it is
    /// half of the identity its monotone counters are stored under (DESIGN §4): two live edges
    /// must never share a name, or the `max` merge would hide one edge's counts behind the
    /// other's.
    pub node: String,
    /// The process's incarnation: a number that differs every time the node starts (its start
    /// time in nanoseconds is enough). The other half of the counter identity: an edge that
    /// restarts begins its counters at zero again, and `max` merging them into the previous
    /// run's counters would ignore everything it admits until it passes the old values. Under a
    /// new incarnation they are a new edge's counters, and the old run's stay counted in `T`.
    pub incarnation: u64,
    /// What the sender is: [`Role::Edge`] towards a regional, [`Role::Regional`] towards the
    /// coordinator. Any other pairing is refused with [`Refusal::WrongRole`].
    pub role: Role,
    /// The region the sender belongs to (an edge) or serves (a regional), as named in the
    /// deployment's configuration (`eu`). A regional refuses an edge of another region with
    /// [`Refusal::WrongRegion`].
    pub region: String,
    /// The version of the rule set the sender enforces now; 0 when it has none yet.
    pub rule_set_version: u64,
    /// How long the sender waits for the answer to one exact request ([`Acquire`]), in
    /// milliseconds; 0 when it does not say. An edge that waits in vain decides by its failure
    /// modes and stops asking for a while, so a regional that escalates a request stops
    /// waiting for the coordinator early enough to answer within it (DESIGN §4).
    pub answer_within_ms: u32,
}

/// The answer to an accepted [`Hello`]: the server's side of the same facts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The newest protocol version the server speaks.
    pub protocol_version: u8,
    /// The server's node name (`regional-eu-2`, `coordinator`).
    pub node: String,
    /// What the server is: [`Role::Regional`] or [`Role::Coordinator`].
    pub role: Role,
    /// The region the server serves; empty for the coordinator, which serves them all.
    pub region: String,
    /// The version of the rule set the server holds now. When it is newer than the one in the
    /// `Hello`, a [`RuleSetPush`] follows.
    pub rule_set_version: u64,
}

/// The answer to a refused [`Hello`]. The server closes the connection with
/// [`CloseCode::HandshakeRefused`] right after sending it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Why, as a value a client can act on (retry elsewhere, give up, fix its configuration).
    pub reason: Refusal,
    /// Why, for the logs: names the values that did not match. Not for matching on.
    pub message: String,
}

/// What kind of node a peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// An edge agent: connects to a regional.
    Edge,
    /// A regional aggregator: accepts edges, connects to the coordinator.
    Regional,
    /// The global coordinator: accepts regionals. Never sends a [`Hello`].
    Coordinator,
}

/// Why a [`Hello`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// The server does not speak the client's `protocol_version`. Retrying will not help until
    /// one side is upgraded.
    UnsupportedVersion,
    /// The client's role cannot connect to this server (an edge at the coordinator, a regional
    /// at a regional). A configuration error.
    WrongRole,
    /// The client belongs to another region than the one this server serves. A configuration
    /// error.
    WrongRegion,
    /// The client's certificate does not name the node it claims to be.
    Unauthorized,
    /// The server is shutting down; connect to another replica or retry after a backoff.
    ShuttingDown,
}

// ---------------------------------------------------------------------------------------------
// Sync (the fast path's bookkeeping, DESIGN §4)

/// Edge → regional: the edge's cumulative counters for every (limit, key, window) that changed
/// since its last acknowledged batch.
///
/// The counters are cumulative and only grow, and the regional merges each by `max` (DESIGN §4),
/// so a batch that is resent, duplicated, reordered, replayed after a reconnect or applied by
/// two regional replicas changes nothing the second time. That is why there is no batch or
/// sequence number: a sender that is unsure whether a batch arrived sends it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncBatch {
    /// At most [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH) entries, at most one per
    /// (limit, key, window); an edge with more changed keys sends several batches.
    #[serde(with = "crate::wire::codec::cap::list")]
    pub entries: Vec<SyncEntry>,
}

/// One edge's counters for one (limit, key, window).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SyncEntry {
    /// The limit the counts are for.
    pub limit: LimitId,
    /// The key, as the limit's selector extracted it; at most
    /// [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index `⌊now / window⌋` the counts belong to (DESIGN §9). The regional accepts
    /// the current and the previous window only.
    pub window: u64,
    /// `used_e`: everything this edge has admitted for the key in this window, in cost units.
    /// Cumulative, not a delta since the last batch; it never decreases.
    pub used: u64,
    /// `released_e`: everything this edge has handed back unused of its grant in this window.
    /// Cumulative and never decreasing; an idle key hands back its whole grant by raising it to
    /// `granted_e − used_e`.
    pub released: u64,
    /// What the edge asks to hold unused after this sync, in cost units: its recent demand
    /// (about two flush intervals' worth). Zero asks for nothing: an idle key, or one near its
    /// limit. The regional grants at most this, and never past `T + G ≤ θ·P`.
    pub want: u64,
}

/// Regional → edge: the answer to one [`SyncBatch`], after the regional merged it into the
/// store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAck {
    /// One entry per entry of the batch, in any order: the edge matches them by
    /// (limit, key, window), not by position. At most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub entries: Vec<AckEntry>,
    /// The region's hot keys, above `θ·P/2` in their window, whether or not this edge has seen
    /// them: for these the edge uses no cold allowance (DESIGN §4, soft limits). At most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH); the hottest first when there
    /// are more.
    #[serde(with = "crate::wire::codec::cap::list")]
    pub hot_keys: Vec<HotKey>,
    /// `P` of every limit the batch named, for keys without a per-key partition, in the
    /// regional's current window: what the edge's cold allowance `c0` and its `local` failure
    /// mode's `P/n` are fractions of (DESIGN §4, §7). At most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub partitions: Vec<LimitPartition>,
    /// Keys an exact request was just denied for only because edges hold their quota unused
    /// as grants (a "held" denial), whether or not this edge has synced them: hand back what
    /// you hold unused of them, as for [`AckEntry::recall`]. That flag reaches only the edges
    /// that sync the key, and an idle edge, the likeliest to hold quota it does not use,
    /// does not. At most [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub recalls: Vec<HotKey>,
}

/// A region's partition of one limit, as [`SyncAck::partitions`] tells edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LimitPartition {
    /// The limit.
    pub limit: LimitId,
    /// `P`, in the limit's units: the whole limit for a regional without a coordinator.
    pub partition: u64,
}

/// The regional's answer for one (limit, key, window) of a [`SyncBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AckEntry {
    /// The limit, as in the [`SyncEntry`] answered.
    pub limit: LimitId,
    /// The key, as in the [`SyncEntry`] answered.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index, as in the [`SyncEntry`] answered.
    pub window: u64,
    /// `granted_e`: the absolute ceiling this edge may admit up to in this window, counting what
    /// it has already admitted. Never lower than a value the edge has seen before for the same
    /// (limit, key, window); an edge that receives acks out of order keeps the largest. The
    /// edge admits locally while `used_e + cost ≤ granted_e − released_e`.
    pub granted: u64,
    /// `T`: the region's authoritative usage of the key in this window, after the merge.
    pub total: u64,
    /// `n`: the number of edges active in the region, which the edge needs for its cold
    /// allowance `c0` and its `local` failure mode's `P/n`.
    pub edges: u32,
    /// Whether the key is hot, above `θ·P/2`: the edge then uses no cold allowance for it.
    pub hot: bool,
    /// The regional's merged `used_e` for this edge: the edge resends the entry until this
    /// echo covers what it has admitted, so a lost batch is never a lost count.
    pub used: u64,
    /// The regional's merged `released_e` for this edge, echoed for the same reason.
    pub released: u64,
    /// Usage has come within one unit per edge of `θ·P`: no more grants in this window. The
    /// edge hands back what it holds unused and decides the key on the exact path until the
    /// window turns (sticky, so the key does not flap).
    pub near_limit: bool,
    /// The grant pool is spent while usage is not near the limit: unused grants elsewhere
    /// hold it. The edge hands back what it holds unused at its next flush, so quota moves to
    /// the edges that are using the key.
    pub recall: bool,
}

/// A key the regional broadcasts as hot, so that edges which have not seen it yet do not spend
/// cold allowances on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HotKey {
    /// The limit the key is hot for.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index in which it is hot; it says nothing about later windows.
    pub window: u64,
}

// ---------------------------------------------------------------------------------------------
// Exact path (DESIGN §4)

/// Edge → regional: check and consume `cost` from every check's key at once, or from none.
///
/// The regional admits when, for every check, `T + G + cost ≤ P` in its own store, and then
/// consumes from all of them in one atomic step (`exact += cost`); if any one would be
/// exceeded, nothing is consumed from any (DESIGN §2: a request is allowed only if all its
/// limits allow). Consuming is not idempotent by itself, so the regional remembers its answer
/// per (edge, `request_id`) for the window and answers a repeated request with it: a resend
/// after a lost reply consumes once (the simulator's regional does this; the real one must).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    /// Chosen by the edge, unique among its requests in flight on the connection; echoed in the
    /// [`AcquireReply`].
    pub request_id: u64,
    /// The limits the request must pass, at most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH) (a request matches a handful).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub checks: Vec<Check>,
}

/// One limit an [`Acquire`] must pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Check {
    /// The limit.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index the edge believes is current. The regional decides by its own clock
    /// (DESIGN §9) and reports that window's figures; this one is for detecting skew.
    pub window: u64,
    /// What the request costs against this limit, in the limit's units. Never zero: a free
    /// request needs no check.
    pub cost: NonZeroU32,
    /// What the edge asks to hold unused afterwards, as [`SyncEntry::want`]: a key's first
    /// exact request comes back with a grant when the pool has room.
    pub want: u64,
}

/// Regional → edge: the decision on one [`Acquire`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireReply {
    /// The [`Acquire::request_id`] answered.
    pub request_id: u64,
    /// Whether the request was admitted; if so, every check's cost was consumed, and if not,
    /// none was.
    pub allowed: bool,
    /// One outcome per check of the `Acquire`, in the same order (unlike [`SyncAck`], these are
    /// matched by position: they answer one request).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub checks: Vec<CheckOutcome>,
    /// When the request's most restrictive limit resets, as nanoseconds since the epoch on the
    /// regional's clock: for a denial, the latest reopening time among the checks that denied,
    /// so the edge can deny locally until then (DESIGN §4, cached denial); when allowed, the
    /// earliest reset among the checks, for `X-RateLimit-Reset`.
    pub reset_at: Nanos,
    /// For a denial, how long from the regional's now until `reset_at`: the edge adds it to its
    /// own clock, so a skewed clock does not stretch or shorten the denial. Zero when allowed.
    pub retry_after: Nanos,
}

impl AcquireReply {
    /// The reply to request `request_id` decided at `now` from its checks' outcomes: allowed
    /// when every check passed; `reset_at` the earliest reset when allowed, the latest
    /// reopening among the checks that denied when not; `retry_after` measured from `now`.
    pub fn from_checks(request_id: u64, now: Nanos, checks: Vec<CheckOutcome>) -> AcquireReply {
        let allowed = checks.iter().all(|c| c.allowed);
        let reset_at = if allowed {
            checks.iter().map(|c| c.reset_at).min()
        } else {
            checks
                .iter()
                .filter(|c| !c.allowed)
                .map(|c| c.reset_at)
                .max()
        }
        .unwrap_or(now);
        AcquireReply {
            request_id,
            allowed,
            checks,
            reset_at,
            retry_after: if allowed { Nanos::ZERO } else { reset_at - now },
        }
    }

    /// A denial of everything: a request the regional cannot decide (a limit it does not
    /// know), which the edge must not admit on its say-so.
    pub fn deny_all(request_id: u64, now: Nanos) -> AcquireReply {
        AcquireReply {
            request_id,
            allowed: false,
            checks: Vec::new(),
            reset_at: now,
            retry_after: Nanos::ZERO,
        }
    }
}

/// The regional's answer for one [`Check`], by its position in the [`Acquire`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckOutcome {
    /// Whether this check alone would have admitted the request. A denied request may have
    /// checks that passed; the edge caches the denial only for the keys that failed.
    pub allowed: bool,
    /// What is left of the region's partition for the key after this decision, `P − T − G`,
    /// exact at the time of the decision.
    pub remaining: u64,
    /// When this check's key reopens or resets, nanoseconds since the epoch on the regional's
    /// clock (window end, or when `cost` tokens are back).
    pub reset_at: Nanos,
    /// `granted_e` after the decision, the same absolute ceiling as [`AckEntry::granted`]: the
    /// regional may add a small near-limit lease out of `P − T − G` while that keeps
    /// `T + G ≤ P`. Equal to the edge's previous ceiling when no lease was made; never lower.
    pub granted: u64,
}

// ---------------------------------------------------------------------------------------------
// Rule sets (DESIGN §2)

/// Coordinator → regional, regional → edge: a new rule set, pushed down the tree.
///
/// Every tier parses and validates the YAML itself rather than trusting the tier above, so a
/// tier never runs a rule set its own build cannot represent; a rule set that fails is refused
/// whole and the running one stays. A regional forwards a rule set to its edges only after it
/// has accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSetPush {
    /// The rule set's version, increasing with every change the coordinator accepts. A receiver
    /// ignores a push whose version is not newer than the one it runs, so pushes may be resent
    /// or reordered.
    pub version: u64,
    /// The rule set as the operators wrote it (DESIGN §2). Bounded only by
    /// [`MAX_FRAME_LEN`](crate::wire::MAX_FRAME_LEN).
    pub yaml: String,
}

impl RuleSetPush {
    /// The push of `rules`: their version and the text they were parsed from.
    pub fn of(rules: &crate::RuleSet) -> RuleSetPush {
        RuleSetPush {
            version: rules.version(),
            yaml: rules.source().to_owned(),
        }
    }
}

/// The answer to one [`RuleSetPush`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSetAck {
    /// The [`RuleSetPush::version`] answered.
    pub version: u64,
    /// `None` when the receiver now runs that version (or a newer one). Otherwise the located
    /// reason it refused the rule set (`rules.yaml: rate_limits.endpoints[1].window: ...`), for
    /// the operator; the receiver keeps its previous rule set.
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Partitions and demand (DESIGN §4, across regions)

/// Regional → coordinator, every reporting interval: what the region's traffic wanted, so that
/// the coordinator can move partitions towards demand.
///
/// Counts cover one interval, not the process's life. A lost report loses one sample of
/// demand, which only delays a rebalance; it never lets a region exceed its partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The region reporting, as in its [`Hello::region`].
    pub region: String,
    /// The span of time the counts cover, on the regional's clock: the coordinator divides by
    /// it to compare regions whose intervals drift.
    pub interval: Nanos,
    /// The edges connected to the reporting regional now, for the operators' status view.
    pub edges: u32,
    /// One line per limit with traffic in the interval, at most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub demand: Vec<RuleDemand>,
    /// The region's hottest keys: above `θ·P_r` or with denials in the interval, at most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH), hottest first (top-K).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub hot_keys: Vec<HotKeyDemand>,
}

/// The answer to one [`Report`]: the versions the coordinator holds for the region, so the
/// regional can tell (and log) that it lags. The coordinator pushes what is newer itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReportAck {
    /// The coordinator's rule-set version.
    pub rule_set_version: u64,
    /// The version of the region's partitions the coordinator holds.
    pub partitions_version: u64,
}

/// One limit's demand in one region over one reporting interval, summed over its keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleDemand {
    /// The limit.
    pub limit: LimitId,
    /// Cost admitted in the region during the interval, locally by edges and on the exact path.
    pub used: u64,
    /// Cost denied in the region during the interval: demand the partition did not meet.
    pub denied: u64,
    /// Quota outstanding in grants to the region's edges at the end of the interval (`G`, summed
    /// over keys): reserved, not yet used.
    pub granted: u64,
    /// The highest `T / P_r` among the limit's keys in the current window, in millionths.
    /// Above 1,000,000 when a soft limit overshot (DESIGN §4).
    pub utilisation_ppm: u32,
}

/// One hot key in a [`Report`]: a candidate for a per-key partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HotKeyDemand {
    /// The limit.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index the figures are for.
    pub window: u64,
    /// `T`: the region's usage of the key in that window.
    pub used: u64,
    /// Cost denied for the key in that window.
    pub denied: u64,
    /// `P_r`: the region's partition of the key's limit in that window, per-key or from the
    /// rule's share.
    pub partition: u64,
}

/// Coordinator → regional: the region's partitions, whole; and regional → coordinator, as the
/// answer to one, what the region has committed to.
///
/// A `Partitions` replaces the previous one entirely; it is not a delta, so the last one
/// received is the truth. A regional applies it only if `version` is newer than the one it
/// holds, so pushes may be resent or reordered. A rule's share applies from the window its
/// [`RuleShare::from_window`] names; a per-key partition applies to the window it names.
///
/// The regional answers with the shares it now holds, each with the window it actually applies
/// from: a *lower* share never applies to a window that has already begun (what was admitted
/// in it under the higher share stays admitted), so the regional moves its `from_window` past
/// its current window when needed. The coordinator raises another region's share only from
/// the window every lowering region has confirmed, so `Σ_r P_r ≤ L` holds in every window, even
/// when a push is late or lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partitions {
    /// Increasing with every allocation the coordinator makes.
    pub version: u64,
    /// This region's share of every limit of the current rule set, at most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH). A limit missing here has no
    /// share in this region yet: its keys take the exact path, whose partition is then 0 unless
    /// a per-key partition or a transfer gives it one.
    #[serde(with = "crate::wire::codec::cap::list")]
    pub rules: Vec<RuleShare>,
    /// Per-key partitions in force for this region, which override the rule's share for their
    /// key and window; at most [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub keys: Vec<KeyPartition>,
}

/// One region's share of one limit, for every key without a per-key partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleShare {
    /// The limit.
    pub limit: LimitId,
    /// The region's fraction of the limit, in millionths: `P_r = ⌊L · share_ppm / 1_000_000⌋`,
    /// rounded down so that `Σ_r P_r ≤ L` holds across regions. At most 1,000,000; the
    /// coordinator keeps the sum over regions at most 1,000,000, and a receiver treats a larger
    /// value as 1,000,000.
    pub share_ppm: u32,
    /// The first window index (of this limit's window length) the share applies to; earlier
    /// windows keep the share the region held before. 0: every window, which is how a limit
    /// the region had no share of gets its first one.
    pub from_window: u64,
}

/// A per-key partition: one region's absolute share of one key's limit in one window.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyPartition {
    /// The limit.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index it applies to.
    pub window: u64,
    /// `P_r` for this key in that window, in the limit's units.
    pub partition: u64,
}

// ---------------------------------------------------------------------------------------------
// Two-phase transfer and escalation (DESIGN §4)

/// Coordinator → giving regional, phase one of a transfer: give up to `amount` of your
/// partition for this key and window.
///
/// The regional lowers its partition by at most its unused part, `P_r − T − G`, and answers
/// with a [`Confirm`] of what it actually released. It applies each `transfer` id at most once
/// and answers a resent `Release` with the same `Confirm`, so the coordinator may resend after
/// a timeout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Release {
    /// The transfer's id, chosen by the coordinator and unique in the deployment.
    pub transfer: u64,
    /// The limit.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index.
    pub window: u64,
    /// The most the coordinator asks for, in the limit's units.
    pub amount: u64,
}

/// Giving regional → coordinator: the answer to a [`Release`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Confirm {
    /// The [`Release::transfer`] answered.
    pub transfer: u64,
    /// What the regional removed from its partition: at most the `Release`'s `amount`, possibly
    /// zero. This quota is now no region's until a [`TransferGrant`] hands it on, so a lost
    /// confirm can cost a false reject, never an overshoot.
    pub released: u64,
}

/// Coordinator → receiving regional, phase two: raise your partition for this key and window
/// by exactly `amount`, which giving regions have confirmed releasing (for a bucket, sent
/// under window 0: add that many tokens to your part, as far as it has room). Hot keys' splits
/// come this way, and so do releases confirmed after a [`QuotaReply`].
///
/// The regional applies each `transfer` id at most once, and answers a resend with the same
/// [`Confirm`]: `amount` when it landed, 0 when its store failed (then it is lost, since a
/// store call that failed may have run).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TransferGrant {
    /// The transfer's id: unique in the deployment, so the regional can tell a resend.
    pub transfer: u64,
    /// The limit.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index.
    pub window: u64,
    /// What to add to the region's partition: the sum of the confirmed releases.
    pub amount: u64,
}

/// How long the coordinator may take to answer a [`QuotaRequest`]; the asking regional waits
/// a little longer. A giver that has not confirmed by then is asked again after the answer,
/// and what it confirms follows as a [`TransferGrant`].
pub const TRANSFER_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_millis(1500);

/// Regional → coordinator: escalation before a false reject. The region's partition for this
/// key is spent; can other regions release some? (DESIGN §4.)
///
/// The regional waits for the [`QuotaReply`] at most its escalation budget (default 100 ms),
/// then lets the rule's failure mode decide.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuotaRequest {
    /// Chosen by the regional, unique among its requests in flight; echoed in the reply.
    pub request_id: u64,
    /// The limit.
    pub limit: LimitId,
    /// The key; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
    /// The window index.
    pub window: u64,
    /// How much more partition the region wants, in the limit's units.
    pub wanted: u64,
}

/// Coordinator → regional: the answer to one [`QuotaRequest`], after the coordinator ran a
/// two-phase transfer on the request's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuotaReply {
    /// The [`QuotaRequest::request_id`] answered.
    pub request_id: u64,
    /// What was added to the region's partition for the request's key and window, possibly
    /// more or less than `wanted`; zero when no region could release any. The reply itself is
    /// the grant for what was confirmed in time; what a giver confirms later follows as a
    /// [`TransferGrant`] (see [`TRANSFER_ANSWER_WITHIN`]).
    pub granted: u64,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Either way, on any link: the sender is about to close the stream (or the connection) with
/// `code`, and says why.
///
/// Sending it is a courtesy for the peer's logs; the close code itself is the contract, since a
/// peer that could not decode this frame still reads the code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorNotice {
    /// The code the stream or connection is closed with.
    pub code: CloseCode,
    /// What went wrong, for a human reading the peer's logs. Not for matching on.
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Debugging

/// Coordinator → regional: report every ledger of this key in the current windows, for the
/// admin API's `GET /api/v1/debug/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyQuery {
    /// The key, in every limit; at most [`MAX_KEY_LEN`](crate::wire::MAX_KEY_LEN) bytes.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub key: String,
}

/// Regional → coordinator: what one region holds for a key, limit by limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReport {
    /// The region answering.
    #[serde(with = "crate::wire::codec::cap::key")]
    pub region: String,
    /// One line per limit with a ledger for the key in its current window, at most
    /// [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub holdings: Vec<KeyHolding>,
}

/// One region's ledger for one (limit, key, window).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyHolding {
    /// The limit.
    pub limit: LimitId,
    /// The window index.
    pub window: u64,
    /// `P_r` for the key in that window, with what transfers added or took.
    pub partition: u64,
    /// `T`: what the region has admitted for the key in that window.
    pub total: u64,
    /// What the regional admitted itself, on the exact path (part of `T`).
    pub exact: u64,
    /// Each edge's counters, at most [`MAX_KEYS_PER_BATCH`](crate::wire::MAX_KEYS_PER_BATCH).
    #[serde(with = "crate::wire::codec::cap::list")]
    pub edges: Vec<EdgeHolding>,
}

/// One edge's counters for a key, as the regional's store holds them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EdgeHolding {
    /// The edge's node name when it is connected to the answering regional, else its counter
    /// identity in hexadecimal (`edge-3f2a…`).
    #[serde(with = "crate::wire::codec::cap::key")]
    pub edge: String,
    /// `granted_e`.
    pub granted: u64,
    /// `released_e`.
    pub released: u64,
    /// `used_e`.
    pub used: u64,
}

/// `impl From<$ty> for Message` for every payload struct, so `batch.into()` builds a frame.
macro_rules! from_payload {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for Message {
            fn from(payload: $ty) -> Message {
                Message::$variant(payload)
            }
        }
    )*};
}

from_payload! {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refused),
    SyncBatch(SyncBatch),
    SyncAck(SyncAck),
    Acquire(Acquire),
    AcquireReply(AcquireReply),
    RuleSetPush(RuleSetPush),
    RuleSetAck(RuleSetAck),
    Report(Report),
    ReportAck(ReportAck),
    Partitions(Partitions),
    Release(Release),
    Confirm(Confirm),
    TransferGrant(TransferGrant),
    QuotaRequest(QuotaRequest),
    QuotaReply(QuotaReply),
    Error(ErrorNotice),
    KeyQuery(KeyQuery),
    KeyReport(KeyReport),
}

//! The agent's configuration: every knob, its default, its unit, and why it exists.
//!
//! Defaults are set in one place, [`AgentConfig::default`], so they can be read together.

use std::time::Duration;

use shared::quota::{DEFAULT_THRESHOLD, Threshold};

/// How often the sync loop sends counts upstream (DESIGN §4). Defaults to 100 ms.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// How long a decision may wait for the regional on the exact path (DESIGN §7). Defaults to
/// 50 ms.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_millis(50);

/// How long an unused grant is kept for a key that is not being used. Defaults to 10 s.
///
/// Long enough to span the gaps of a key used every few seconds: at 1 s, such a key handed
/// its grant back between any two requests and took the exact path for each (about one in
/// five exact decisions under the load generator). Quota held this way is not lost where
/// it is needed: a window's turn hands it back, and when it denies another edge's request the
/// regional recalls it from every edge within a sync (`SyncAck::recalls`).
pub const DEFAULT_IDLE_RELEASE: Duration = Duration::from_secs(10);

/// How long a key with nothing left to sync stays in memory after its last use. Defaults to
/// 120 s.
pub const DEFAULT_IDLE_EVICTION: Duration = Duration::from_secs(120);

/// After a failed call upstream, how long decisions skip the network and go straight to the
/// rule's failure mode, unless a sync is answered sooner. Defaults to 1 s.
pub const DEFAULT_UPSTREAM_BACKOFF: Duration = Duration::from_secs(1);

/// How the edge agent behaves. Build it with `AgentConfig::default()` and change what you need.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    /// How often counts are synced upstream: the sync loop sends one batch per interval (more
    /// when a batch fills). Shorter intervals return idle quota sooner and keep the regional's
    /// view fresher, at the cost of more messages. Defaults to 100 ms.
    pub flush_interval: Duration,
    /// θ in DESIGN §4: the share of a partition that may be handed out as grants; above it
    /// every decision for the key takes the exact path. Defaults to 0.8.
    pub near_limit_threshold: Threshold,
    /// The longest a decision waits for the regional (exact path, or a key's first request
    /// under a hard limit). Past it the rule's failure mode decides. Defaults to 50 ms.
    ///
    /// **Warning:** this bounds the latency a rate-limit check can add to a request; raising
    /// it makes every fault slower to absorb.
    pub upstream_timeout: Duration,
    /// An unused grant for a key not used for this long is handed back, so its quota can be
    /// granted to edges that need it. The regional also recalls grants sooner when its pool is
    /// spent, and a window's turn hands back what was left of it. Defaults to 10 s
    /// ([`DEFAULT_IDLE_RELEASE`]).
    pub idle_release: Duration,
    /// A key unused for this long, with nothing left to sync, is forgotten: memory stays
    /// bounded by the keys in use. Defaults to 120 s.
    pub idle_eviction: Duration,
    /// After a failed upstream call, decisions skip the network for this long and follow
    /// their failure mode at once, so an outage costs no decision the full timeout. A sync
    /// answered after the failure ends the backoff early: a stall that has passed (a busy
    /// host, one slow store call) costs the failure mode until the next flush, not the whole
    /// backoff. Defaults to 1 s.
    pub upstream_backoff: Duration,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            near_limit_threshold: DEFAULT_THRESHOLD,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            idle_release: DEFAULT_IDLE_RELEASE,
            idle_eviction: DEFAULT_IDLE_EVICTION,
            upstream_backoff: DEFAULT_UPSTREAM_BACKOFF,
        }
    }
}

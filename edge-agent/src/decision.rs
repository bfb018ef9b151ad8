//! What `check` answers.

use shared::{FailureMode, LimitId, Nanos};

/// The answer to one request. A denial is an ordinary value, not an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The limit of the rule that answered (its limit, not a region's share); zero when no
    /// rule applies.
    pub limit: u64,
    /// What this edge knows is left under that limit (exact on the exact path).
    pub remaining: u64,
    /// When that limit's window resets, in nanoseconds since the Unix epoch.
    pub reset_at: Nanos,
    /// How long to wait before retrying; zero when allowed.
    pub retry_after: Nanos,
    /// The limit that answered: the one that denied, or the most restrictive one that
    /// allowed. `None` when no rule applies.
    pub rule: Option<LimitId>,
    /// How the decision was made.
    pub path: DecisionPath,
}

/// How a decision was made: what the local-decision ratio and the fallback metrics count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionPath {
    /// No rule applies to the request.
    Unlimited,
    /// Under a grant or the cold allowance, without the network.
    Local,
    /// A cached denial, without the network.
    CachedDenial,
    /// By the regional (exact check-and-consume).
    Exact,
    /// The regional could not answer in time; the rule's failure mode decided.
    Fallback(FailureMode),
}

impl DecisionPath {
    /// Decided without waiting on the network.
    pub fn is_local(self) -> bool {
        matches!(
            self,
            DecisionPath::Local | DecisionPath::CachedDenial | DecisionPath::Unlimited
        )
    }
}

impl Decision {
    /// `Retry-After` in whole seconds, rounded up (zero when allowed).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_ceil()
    }

    /// `X-RateLimit-Reset` as a Unix timestamp in seconds.
    pub fn reset_at_secs(&self) -> u64 {
        self.reset_at.as_secs_floor()
    }

    pub(crate) fn unlimited() -> Decision {
        Decision {
            allowed: true,
            limit: 0,
            remaining: 0,
            reset_at: Nanos::ZERO,
            retry_after: Nanos::ZERO,
            rule: None,
            path: DecisionPath::Unlimited,
        }
    }
}

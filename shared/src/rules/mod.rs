//! The rule model (DESIGN §2). (Stub: the rules helper builds the parser and matcher here.)

use serde::{Deserialize, Serialize};

/// A stable identity for one limit of one rule, the same on every tier and across rule-set
/// versions as long as the rule's name is the same. It is what crosses the wire beside a key.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LimitId(pub u64);

/// How a key an edge has not seen yet is treated (DESIGN §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strictness {
    /// The edge may admit up to the cold allowance `c0` per key before its first sync.
    /// Admitted ≤ `P + n·c0` at worst (≤ 1.1·P with the defaults); the overshoot is measured
    /// and reported.
    #[default]
    Soft,
    /// A key's first request at an edge takes the exact path. Admitted ≤ `P`, exactly.
    Hard,
}

/// What an edge does when it needs its regional and cannot reach it (DESIGN §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureMode {
    /// Enforce `P/n` alone, from local counts.
    #[default]
    Local,
    /// Allow.
    Open,
    /// Deny.
    Closed,
}

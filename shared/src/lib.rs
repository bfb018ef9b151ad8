//! The vocabulary every tier of the rate limiter agrees on, with no I/O.
//!
//! This crate holds no sockets, no tasks and no files: every function takes its input,
//! including the time, as arguments and returns its answer, like
//! `quinn-proto` beside `quinn`. That is what lets the edge, the regional and the coordinator
//! share one definition of a rule, a window and a grant, and what lets the simulator and the
//! property tests drive all of it deterministically. Do not add I/O here: it belongs to the tiers.
//! The one exception is `net`, behind the `net` feature: the QUIC transport the tiers share, kept
//! here so that all of them speak it identically, and compiled only by the crates that need it.
//!
//! # Layout
//!
//! - [`clock`]: [`Nanos`], the [`Clock`] trait, the [`SystemClock`] the tiers run on (the one
//!   reader of the wall, and only when a tier hands it in) and the [`ManualClock`] tests use.
//! - [`config`]: the tiers' YAML configuration files, loaded with located errors.
//! - [`rules`]: the operators' YAML, parsed once into a [`RuleSet`] that cannot hold an invalid
//!   rule, and matching a request to the limits that apply (DESIGN §2).
//! - [`algorithm`]: the five limiters as pure state machines (DESIGN §3).
//! - [`quota`]: grants under `T + G ≤ θ·P`, the monotone per-edge counters, partitions and
//!   two-phase transfers (DESIGN §4).
//! - [`wire`]: every protocol message and the length-prefixed postcard codec (DESIGN §5).
//! - `net` (the `net` feature): QUIC with mutual TLS, the accept loop, the deployment CA
//!   (DESIGN §5, §7).
//! - `process` (the `process` feature): what every tier's binary does alike: logs to stderr,
//!   human or JSON, and stopping on Ctrl-C or SIGTERM.
//! - `http` (the `http` feature): the HTTP/1.1 accept loop every tier serves with.
//! - `metrics` (the `metrics` feature): `/metrics` as OpenMetrics text, and a lock-free
//!   histogram.
//! - `sim` (tests, or the `sim` feature): a deterministic simulator of N edges and a regional.

#![warn(missing_docs)]

pub mod algorithm;
pub mod clock;
pub mod config;
pub mod quota;
pub mod rules;
pub mod wire;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "net")]
pub mod net;
#[cfg(feature = "process")]
pub mod process;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use crate::{
    clock::{Clock, ManualClock, Nanos, SystemClock},
    rules::{
        ConfigError, FailureMode, Key, KeyKind, Limit, LimitId, Match, Request, Rule, RuleSet,
        Selector, Strictness,
    },
};

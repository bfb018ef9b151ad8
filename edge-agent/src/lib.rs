//! The edge agent: decides locally while it holds quota granted for a key.
//!
//! A CDN or PoP node links this crate and calls [`Agent::check`] on every request. Most
//! decisions in the whole system are made here, without the network: while the edge holds a
//! grant for a key it admits under it, and a cached denial denies for free until it expires.
//! Near the limit, or for a key it has no grant for, it asks its regional for an exact
//! check-and-consume, bounded by a timeout; if the regional cannot answer, each rule's failure
//! mode decides (DESIGN §4, §7). Counts are synced to the regional every flush interval.
//!
//! The most important types are [`Agent`] (built with [`Agent::builder`]), [`AgentConfig`],
//! [`Request`] (the borrowed request view from `shared`) and [`Decision`]. The regional is
//! reached through the [`Upstream`] trait, which [`QuicUpstream`] implements over QUIC; [`identity`](IdentityConfig) helpers turn headers
//! and the socket address into a client identity.
//!
//! Rules change without a restart: [`Agent::set_rules`] swaps in a newer version for every
//! later check (lock-free for `check`), and a [`QuicUpstream`] the agent is
//! [attached](QuicUpstream::attach) to applies the rule sets its regional pushes that way,
//! answering each push with the version taken or the located reason it was refused.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use edge_agent::{Agent, AgentConfig, Request};
//! # use edge_agent::{Upstream, UpstreamError, UpstreamFuture};
//! # use shared::wire::{Acquire, AcquireReply, SyncAck, SyncBatch};
//! # struct Unreachable;
//! # impl Upstream for Unreachable {
//! #     fn sync(&self, _: SyncBatch) -> UpstreamFuture<SyncAck> {
//! #         Box::pin(async { Err(UpstreamError::Unreachable("example".into())) })
//! #     }
//! #     fn acquire(&self, _: Acquire) -> UpstreamFuture<AcquireReply> {
//! #         Box::pin(async { Err(UpstreamError::Unreachable("example".into())) })
//! #     }
//! # }
//! # let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
//! let rules = shared::RuleSet::from_yaml(
//!     "rules.yaml",
//!     "rate_limits:\n  endpoints:\n    - { path: /api/login, method: POST, limit: 5, window: 1m, key: ip, on_failure: local }\n",
//! )?;
//! // `Unreachable` stands in for the QUIC client to the regional: with no regional, the
//! // rule's failure mode (`local`: this edge alone enforces P/n) decides.
//! let agent = Agent::builder(AgentConfig::default(), rules, Arc::new(Unreachable))
//!     .runtime(runtime.handle().clone())
//!     .build()?;
//! let request = Request { ip: Some("203.0.113.7"), ..Request::new("POST", "/api/login") };
//! let decisions: Vec<bool> = (0..6).map(|_| agent.check(&request).allowed).collect();
//! assert_eq!(decisions, [true, true, true, true, true, false]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layout
//!
//! - `agent`: [`Agent`], `check` / `check_async`, the exact path, failure modes, the sync loop,
//!   and the rules in force (`set_rules`).
//! - `local`: per-key state (grants, cold allowance, cached denials, counts to sync).
//! - `decision`: [`Decision`] and [`DecisionPath`].
//! - `config`: [`AgentConfig`] and its defaults.
//! - `upstream`: the [`Upstream`] trait and [`UpstreamError`].
//! - `quic`: [`QuicUpstream`], the real upstream: QUIC with mutual TLS to the regional,
//!   failover and reconnection ([`QuicConfig`]), and the rule sets the regional pushes.
//! - `identity`: client identity from headers and the socket (trusted proxies only).
//! - `metrics`: [`EdgeMetrics`], the Prometheus metrics the binary serves at `/metrics`.
//! - The binary's own modules, public so tests and embedders can run it in-process:
//!   [`settings`] (its config file), [`app`] (check and run), [`http`] (the HTTP API),
//!   [`proxy`] (reverse-proxy mode: decide, then forward to an upstream or answer `429`) and
//!   [`reload`] (its config file read again on SIGHUP or a change on disk).
//! - [`SystemClock`] is `shared`'s, re-exported: the wall clock the agent runs on.

#![warn(missing_docs)]

mod agent;
pub mod app;
mod config;
mod decision;
pub mod http;
mod identity;
mod keymap;
mod local;
mod metrics;
pub mod proxy;
mod quic;
pub mod reload;
pub mod settings;
mod upstream;

pub use shared::SystemClock;

pub use crate::{
    agent::{Agent, AgentBuilder, BuildError, MAX_LIMITS_PER_REQUEST, StatsSnapshot},
    config::{
        AgentConfig, DEFAULT_FLUSH_INTERVAL, DEFAULT_IDLE_EVICTION, DEFAULT_IDLE_RELEASE,
        DEFAULT_UPSTREAM_BACKOFF, DEFAULT_UPSTREAM_TIMEOUT,
    },
    decision::{Decision, DecisionPath},
    identity::{
        Cidr, DEFAULT_API_KEY_HEADER, DEFAULT_TIER_HEADER, DEFAULT_USER_ID_HEADER, Identity,
        IdentityConfig, IdentityError, IpText, client_ip,
    },
    local::ExactReason,
    metrics::EdgeMetrics,
    quic::{
        DEFAULT_BACKOFF_MAX, DEFAULT_BACKOFF_MIN, DEFAULT_CONNECT_TIMEOUT, QuicConfig, QuicError,
        QuicUpstream,
    },
    upstream::{Upstream, UpstreamError, UpstreamFuture},
};
pub use shared::rules::Request;

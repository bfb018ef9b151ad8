//! The regional aggregator: one service per datacenter (DESIGN §1, §4–§7).
//!
//! It holds the authoritative per-region counts, hands edges their grants, and answers exact
//! checks near the limit, and every check on a token bucket, leaky bucket or sliding log.
//!
//! # Layout
//!
//! - [`store`]: where the counts and limiter states live. The [`Store`](store::Store) trait,
//!   the in-memory store (the default without Redis, and the specification, running `shared`'s
//!   own ledger and algorithms) and the Redis store (Lua scripts, pipelined per batch, single
//!   Redis or Redis Cluster).
//!
//! - [`regional`]: the decisions. [`Regional`] turns an edge's sync batch or exact request
//!   into store operations under the rules, and the store's answers into the reply.
//!
//! - [`breaker`]: the circuit breaker. [`GuardedStore`](breaker::GuardedStore) decides in
//!   memory while Redis fails, and writes what it decided back when Redis returns.
//!
//! - [`server`]: the QUIC service edges connect to (`shared::net` does the transport).
//!
//! - [`partition`]: this region's partition of every limit, as the coordinator hands them out
//!   and transfers move them.
//!
//! - [`uplink`]: the link to the global coordinator: demand reports up; rule sets, partitions
//!   and transfers down; escalation before a denial.
//!
//! - [`metrics`]: `/metrics`, read at scrape time from what the parts above count.
//!
//! - [`config`] and [`app`]: the `regional-aggregator` binary. Its configuration file, and
//!   what the process does: check everything it names, build the store (Redis behind the
//!   breaker, or memory), serve edges until a signal, make the deployment's certificates.

pub mod app;
pub mod breaker;
pub mod config;
pub mod metrics;
pub mod partition;
pub mod regional;
pub mod server;
pub mod store;
pub mod uplink;

pub use self::regional::{Escalation, Regional, RegionalConfig, RegionalStats};

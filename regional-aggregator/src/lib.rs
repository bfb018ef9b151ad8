//! The regional aggregator: one service per datacenter (DESIGN §1, §4–§7).
//!
//! It holds the authoritative per-region counts, hands edges their grants, and answers exact
//! checks near the limit.
//!
//! # Layout
//!
//! - [`store`]: where the counts live. The [`Store`](store::Store) trait, the in-memory store
//!   (the default without Redis, and the specification) and the Redis store (Lua scripts,
//!   pipelined per batch, single Redis or Redis Cluster).
//!
//! Still to come (issue 4): the QUIC server edges sync with, the service that turns edges'
//! batches into store operations, the circuit breaker, and the binary.

pub mod store;

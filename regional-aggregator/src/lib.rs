//! The regional aggregator: one service per datacenter.
//!
//! **Not built yet.** This crate will hold the QUIC server edges sync with (mutual TLS), the
//! `Store` trait with its Redis, Redis Cluster and in-memory implementations, the grant
//! allocator over `shared::quota`, the circuit breaker, and the QUIC client of the coordinator
//! (DESIGN §1, §4–§7). Until then it exports nothing.

#![warn(missing_docs)]

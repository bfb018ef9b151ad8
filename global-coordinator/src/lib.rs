//! The global coordinator: owns the rules and each region's partition of every limit.
//!
//! **Not built yet.** This crate will hold the QUIC server regionals report to, the partition
//! allocator and two-phase transfers over `shared::quota`, durable state, the admin HTTP API
//! and the operators' CLI `global-coordinator ctl` (DESIGN §1, §4, §6–§8). Until then it
//! exports nothing.

#![warn(missing_docs)]

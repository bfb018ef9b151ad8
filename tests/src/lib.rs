//! The cross-tier test harness: real processes or in-process servers on loopback, a real
//! `redis-server`, throwaway PKI, and the load generator.
//!
//! Today: the harness every crate's process tests share ([`process::Spawned`], a binary as a
//! child; [`http::request`], one HTTP exchange), and `tests/up.rs`, which runs `deploy/up.sh`
//! (DESIGN §10) and checks the README's `curl` against it; [`loadgen`], the end-to-end
//! benchmark (the `loadgen` binary), which `tests/loadgen.rs` runs against a small topology of
//! real processes. Each tier's own suite tests it against real Redis and real QUIC.

#![warn(missing_docs)]

pub mod http;
pub mod loadgen;
pub mod metrics;
pub mod process;

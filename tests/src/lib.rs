//! The cross-tier test harness: real processes or in-process servers on loopback, a real
//! `redis-server`, throwaway PKI, and the load generator.
//!
//! Today: the harness every crate's process tests share ([`process::Spawned`], a binary as a
//! child; [`http::request`], one HTTP exchange), and `tests/up.rs`, which runs `deploy/up.sh`
//! (DESIGN §10) and checks the README's `curl` against it. The load generator and the
//! cross-region scenarios arrive with the coordinator (DESIGN §1, §7); each tier's own suite
//! tests it against real Redis and real QUIC.

#![warn(missing_docs)]

pub mod http;
pub mod metrics;
pub mod process;

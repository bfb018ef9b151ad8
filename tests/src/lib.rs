//! The cross-tier test harness: real processes or in-process servers on loopback, a real
//! `redis-server`, throwaway PKI, and the load generator.
//!
//! **Not built yet.** The harness and its scenarios arrive with the tiers they exercise
//! (DESIGN §1, §7, §10). Until then the per-crate suites in `shared` are the tests.

#![warn(missing_docs)]

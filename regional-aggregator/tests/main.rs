//! The regional aggregator's integration tests: one binary (one link on two cores), a module
//! per concern.

mod binary;
mod breaker;
mod quic;
mod regional;
mod state;
mod store;
mod support;

//! The edge agent through its public API, one module per concern, one test binary. Time is a
//! `ManualClock`; the regional is the simulator's `WireRegional` (the same model the regional
//! tier is specified by) or a scripted fake; `quic` serves that regional over real QUIC.
//! `binary` and `proxy` run the `edge-agent` binary itself: its HTTP API, and its
//! reverse-proxy mode in front of a real upstream.

mod support;

mod binary;
mod concurrency;
mod decisions;
mod failure_modes;
mod proxy;
mod quic;
mod reload;
mod sync;

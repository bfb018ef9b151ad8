//! The edge agent through its public API, one module per concern, one test binary. Time is a
//! `ManualClock`; the regional is the simulator's `WireRegional` (the same model the regional
//! tier is specified by) or a scripted fake; `quic` serves that regional over real QUIC.

mod support;

mod binary;
mod concurrency;
mod decisions;
mod failure_modes;
mod quic;
mod reload;
mod sync;

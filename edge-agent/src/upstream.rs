//! How the agent reaches its regional: a small trait, so the agent can be tested against the
//! simulator's regional model or a scripted fake, and the QUIC client (`quic::QuicUpstream`)
//! implements the same thing.

use std::{future::Future, pin::Pin};

use shared::wire::{Acquire, AcquireReply, SyncAck, SyncBatch};
use thiserror::Error;

/// A boxed future, so the trait stays object-safe (`Arc<dyn Upstream>`).
pub type UpstreamFuture<T> = Pin<Box<dyn Future<Output = Result<T, UpstreamError>> + Send>>;

/// The agent's link to its regional. Both calls may be slow or fail; the agent bounds them
/// with its own timeout and never holds a lock across them.
pub trait Upstream: Send + Sync + 'static {
    /// Sends one batch of cumulative counts and returns the regional's answer.
    fn sync(&self, batch: SyncBatch) -> UpstreamFuture<SyncAck>;

    /// Asks for an exact check-and-consume across one request's limits.
    fn acquire(&self, request: Acquire) -> UpstreamFuture<AcquireReply>;
}

/// Why a call upstream failed. Whether to retry is decided here, once, at the boundary.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No connection to any regional right now.
    #[error("regional unreachable: {0}")]
    Unreachable(String),
    /// The call did not finish within the agent's timeout.
    #[error("regional did not answer within the timeout")]
    Timeout,
    /// The regional answered something that breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// Whether trying again later may succeed (everything but a protocol violation).
    pub fn is_transient(&self) -> bool {
        !matches!(self, UpstreamError::Protocol(_))
    }
}

//! The edge agent: decides locally while it holds quota granted for a key.
//!
//! **Not built yet.** This crate will hold the library a CDN or PoP node embeds
//! (`Agent::check(&Request) -> Decision`, no `await` on the fast path), the sync loop that
//! batches counts to the regional every flush interval, the failure modes, and the binary that
//! serves `POST /v1/check` and a reverse proxy (DESIGN §1, §4, §7, §8). Until then it exports
//! nothing, so nothing can mistake it for working.

#![warn(missing_docs)]

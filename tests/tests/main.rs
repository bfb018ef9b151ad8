//! Cross-tier tests: the system as an operator runs it. One test binary, a module per
//! scenario.

// The load generator against a small topology: hard limits kept, decisions made locally.
mod loadgen;
// deploy/up.sh, the README's first command.
mod up;

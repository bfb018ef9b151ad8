//! Cross-tier tests: the system as an operator runs it. One test binary, a module per
//! scenario.

mod up;

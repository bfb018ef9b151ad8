//! The deterministic simulator (STYLE point 25). (Stub: being written.)

//! Quota math (DESIGN §4). (Stub: being written.)

//! What the regional's tests share: real Redis processes.

pub mod redis;

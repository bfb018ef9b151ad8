//! The global coordinator: owns the rules and each region's share of every limit
//! (DESIGN §1, §4, §6–§8).
//!
//! What runs today: the durable state (rules, pins, shares) and every change to it, the admin
//! HTTP API operators drive it with, `/metrics`, and `global-coordinator ctl`. Not yet: the
//! QUIC link regionals report demand over and receive rule sets and partitions from, demand-
//! driven shares, two-phase transfers and escalation; until then shares are floors plus an
//! equal split, or an operator's pin.
//!
//! # Layout
//!
//! - [`coordinator`]: the state and its changes, written atomically to the state file.
//! - [`admin`]: the admin API (bearer token) and `/metrics`.
//! - [`ctl`]: the operators' CLI, a client of the admin API.
//! - [`config`] and [`app`]: the binary's configuration file and what the process does.

#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod config;
pub mod coordinator;
pub mod ctl;

//! The global coordinator: owns the rules and each region's share of every limit
//! (DESIGN §1, §4, §6–§8).
//!
//! Regionals connect over QUIC with mutual TLS ([`link`]) and report their demand; the
//! coordinator moves each rule's shares towards it (or keeps an operator's pin), pushes rule
//! sets and partitions down so that `Σ_r P_r ≤ L` holds in every window, and moves quota for a
//! single key mid-window by two-phase transfer when a region escalates before a denial.
//! Operators drive it through the admin HTTP API and `global-coordinator ctl`; its state
//! survives restarts in one file.
//!
//! # Layout
//!
//! - [`coordinator`]: the state and its changes, written atomically to the state file.
//! - [`link`]: the regionals' QUIC link: reports in; rule sets, partitions and transfers out.
//! - [`admin`]: the admin API (bearer token) and `/metrics`.
//! - [`ctl`]: the operators' CLI, a client of the admin API.
//! - [`config`] and [`app`]: the binary's configuration file and what the process does.

#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod config;
pub mod coordinator;
pub mod ctl;
pub mod link;

//! nudge: next-best-action proactive messaging.
//!
//! An event flows through the modules in this order:
//! `event` (decode) → `ingest` (Kafka) → `context` → `rules` → `journey`
//! (decide, one store transaction) → `store` → `scheduler` → `policy` →
//! `dispatch` → `audit` (the dispatch log). `admin` serves health and metrics;
//! `sim` runs the same engine on a virtual clock. `model` is the vocabulary
//! they share; it depends on none of them. `telemetry` holds the metric
//! catalog and the events that log and count.

pub mod admin;
pub mod audit;
pub mod audit_stream;
pub mod clock;
pub mod config;
pub mod context;
pub mod control;
pub mod daemon;
pub mod dispatch;
pub mod event;
pub mod humanize;
pub mod ingest;
pub mod journey;
pub mod mask;
pub mod model;
pub mod policy;
pub mod propensity;
pub mod review;
pub mod rules;
pub mod scheduler;
pub mod sim;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod toolkit;

/// The version and the commit it was built from (`build.rs`):
/// `0.1.0 (commit 5483b4b0c1d2)`, `-modified` when built from a changed
/// checkout, `unknown` outside one.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NUDGE_COMMIT"),
    ")"
);

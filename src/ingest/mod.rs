//! The ingest stage: customer events from Kafka into the pipeline.
//!
//! Delivery contract ("effectively once"):
//! - a batch of records is processed in one store transaction that also holds
//!   each partition's next offset and any dead letters; only after it commits
//!   is the offset committed to Kafka, so Kafka's offset never runs ahead of
//!   the store;
//! - on assignment the daemon resumes from the store's offsets: records below
//!   them (the tail re-read after a crash) are skipped, so nothing is applied
//!   twice, and event-id dedup covers producer retries;
//! - records are processed in partition order (the key is the customer id, so
//!   one customer's events stay in order); a partition revoked mid-batch is
//!   dropped from the batch, the new owner reads it from the committed offset;
//! - a record that is not a CloudEvent, or that a rule fails on, is written to
//!   the dead-letter outbox in the same transaction and then published to the
//!   dead-letter topic with the reason in headers: never silently dropped.
//!   One that cannot be published (after bounded attempts) stays in the
//!   store, counted, and does not hold back the others.

pub mod dlq;
mod headers;
pub mod kafka;

pub use kafka::{KafkaIngest, Readiness};

//! graphdelta: Microsoft Graph delta queries as an event stream.
//!
//! # Layout
//!
//! A change travels through the crate in one direction:
//!
//! ```text
//!  graph::client ──Page──▶ normalize ──Batch──▶ sink ──ack──▶ runtime ──commit──▶ checkpoint
//!     ▲  (fetch, auth,        (ChangeEvents +       (file, stdout,     (the only place
//!     │   retries, links)      state changes)        kafka, rabbitmq)   that commits)
//!     └──────────── next link from the last committed checkpoint ◀──────────────┘
//! ```
//!
//! - [`config`]: the TOML connector definition (`connectors/*.toml`), validated
//!   up front; secrets arrive from env vars or files and print as `[redacted]`.
//! - [`graph`]: OAuth2 client credentials ([`graph::auth`]), the delta client
//!   that follows `@odata.nextLink` to `@odata.deltaLink` and survives 429/503,
//!   410 and expired sync state ([`graph::client`]), and the page model
//!   ([`graph::page`]). A delta page enters the process here.
//! - [`normalize`]: turns each object of a page into a [`proto::v1::ChangeEvent`]
//!   by comparing it with what the connector remembers ([`normalize::memory`]):
//!   created, updated (exact changed properties), soft/hard deleted, restored,
//!   member changes. Its output is a [`normalize::Normalized`]: the events plus the
//!   memory updates that become durable together with the checkpoint.
//! - [`sink`]: where events leave for a broker. [`sink::Sink::publish`] returns
//!   only once every message of the batch is acknowledged.
//! - [`checkpoint`]: the embedded SQLite store holding each stream's next link
//!   and its memory of objects; one transaction per batch.
//! - [`runtime`]: one task per stream; pipelines fetch, normalize and publish
//!   and commits each batch's checkpoint in order, only after its ack.
//! - [`replay`]: the way back: reads what a sink holds (file, Kafka topic,
//!   RabbitMQ stream queue), folds it into each object's current state in
//!   SQLite, and checks that state against the checkpoint store
//!   (`graphdelta replay`).
//! - [`simulator`]: a synthetic Entra ID tenant that speaks the delta protocol,
//!   used by `graphdelta demo`, the tests and the benchmark.
//! - [`failpoint`]: crash points for the fault suite, inert unless
//!   `GRAPHDELTA_FAILPOINT` names one.
//! - [`proto`]: the generated `graphdelta.v1` types and descriptor set.
//! - [`cluster`]: `[cluster]` mode: instances in one Kafka consumer group
//!   divide the streams (one partition of an assignments topic per stream)
//!   and hand them over through a compacted state topic holding each
//!   stream's checkpoint and memory.

pub mod background;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod failpoint;
pub mod graph;
pub mod normalize;
pub mod proto;
pub mod replay;
pub mod retry;
pub mod runtime;
pub mod simulator;
pub mod sink;

//! Where events leave the process.
//!
//! Every sink implements [`Sink`]: `publish(batch)` returns `Ok` only once
//! the destination has taken responsibility for every event of the batch
//! (fsync for files, broker acks for Kafka, publisher confirms for
//! RabbitMQ). The runtime commits the batch's checkpoint only after that.
//! Errors say whether retrying can help ([`SinkError::is_retriable`]).

pub mod file;
pub mod kafka;
pub mod rabbitmq;
pub mod stdout;

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use serde::Deserialize;

use crate::{
    config::ConfigError,
    normalize::memory::StateWrites,
    proto::v1::{ChangeEvent, StreamCheckpoint},
    retry::RetryHint,
};

/// The `[sink]` table: `type` selects the sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// Appends canonical-JSON events to a file, one per line.
    File(file::FileSinkConfig),
    /// Writes canonical-JSON events to standard output, one per line.
    Stdout(stdout::StdoutSinkConfig),
    /// Publishes protobuf events to Kafka topics, at-least-once or
    /// exactly-once (transactions).
    // Boxed: its many settings would make every `SinkConfig` large.
    Kafka(Box<kafka::KafkaSinkConfig>),
    /// Publishes protobuf events to a RabbitMQ topic exchange with
    /// publisher confirms.
    Rabbitmq(rabbitmq::RabbitMqSinkConfig),
}

impl SinkConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Stdout(_) => Ok(()),
            SinkConfig::Kafka(c) => c.validate(),
            SinkConfig::Rabbitmq(c) => c.validate(),
        }
    }

    pub(crate) fn rebase_paths(&mut self, base: &Path) {
        match self {
            SinkConfig::File(c) if c.path.is_relative() => c.path = base.join(&c.path),
            SinkConfig::Kafka(c) => c.rebase_paths(base),
            SinkConfig::Rabbitmq(c) => c.rebase_paths(base),
            _ => {}
        }
    }

    /// The sink's type name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Rabbitmq(_) => "rabbitmq",
        }
    }
}

/// One page's events, handed to a sink.
#[derive(Debug, Clone, Copy)]
pub struct OutBatch<'a> {
    /// The stream the events come from.
    pub stream: &'a str,
    /// The batch's sequence number within the stream (strictly increasing).
    pub seq: u64,
    pub events: &'a [ChangeEvent],
    /// The checkpoint that will be committed once this batch is
    /// acknowledged. Transactional sinks write it with the events.
    pub checkpoint: &'a StreamCheckpoint,
    /// The memory changes committed with the checkpoint. Transactional
    /// sinks store them too ([`StateWrites::to_proto`]), so the embedded
    /// store can be rolled forward after a crash between the two commits.
    pub writes: &'a StateWrites,
}

/// A checkpoint kept by a transactional sink, with the memory changes of
/// the batch it closed.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub checkpoint: StreamCheckpoint,
    pub writes: StateWrites,
}

/// A sink failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Broker unreachable, queue full, a nack, a timeout: another attempt
    /// can succeed.
    #[error("{0}")]
    Retriable(String),
    /// Authorization, message too large, bad configuration: an operator
    /// must act.
    #[error("{0}")]
    Permanent(String),
    /// Another instance took over this stream (Kafka transactional fencing);
    /// this one must stop without committing.
    #[error("{0}")]
    Fenced(String),
}

impl RetryHint for SinkError {
    fn is_retriable(&self) -> bool {
        matches!(self, SinkError::Retriable(_))
    }
}

/// A destination for change events.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Short type name: `file`, `stdout`, `kafka`, `rabbitmq`.
    fn kind(&self) -> &'static str;

    /// Publishes every event of the batch, in order, and returns only when
    /// all of them are acknowledged. On `Err`, some events may have been
    /// delivered: the runtime publishes the batch again (same event ids).
    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError>;

    /// Checks that the destination is reachable (startup check, readiness).
    async fn check(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// True for sinks that write each batch's checkpoint together with its
    /// events (Kafka exactly-once): they are handed batches without events
    /// too, so their stored checkpoint never falls behind.
    fn stores_checkpoints(&self) -> bool {
        false
    }

    /// For sinks that store checkpoints themselves (Kafka exactly-once):
    /// the last checkpoint they committed for `stream`. When its
    /// `batch_seq` is ahead of the embedded store's, the runtime applies its
    /// `writes` to the store and resumes from it.
    async fn stored_checkpoint(
        &self,
        _stream: &str,
    ) -> Result<Option<StoredCheckpoint>, SinkError> {
        Ok(None)
    }

    /// Cluster mode: this process no longer owns `stream` (another instance
    /// may take it over). A transactional sink forgets the stream's producer
    /// and what it knew of its checkpoint, so that owning it again starts
    /// afresh (fencing whoever had it meanwhile).
    async fn release(&self, _stream: &str) {}

    /// Flushes and releases connections.
    async fn close(&self) {}
}

/// Builds the configured sink.
pub async fn build(config: &SinkConfig) -> Result<Arc<dyn Sink>, SinkError> {
    Ok(match config {
        SinkConfig::File(c) => Arc::new(file::FileSink::open(c)?),
        SinkConfig::Stdout(c) => Arc::new(stdout::StdoutSink::new(c)),
        SinkConfig::Kafka(c) => Arc::new(kafka::KafkaSink::new(c)?),
        SinkConfig::Rabbitmq(c) => Arc::new(rabbitmq::RabbitMqSink::new(c)?),
    })
}

/// Appends the canonical JSON of each event plus `\n` to `buf`.
pub fn encode_json_lines(events: &[ChangeEvent], buf: &mut Vec<u8>) {
    for event in events {
        crate::proto::json::write_event(event, buf);
        buf.push(b'\n');
    }
}

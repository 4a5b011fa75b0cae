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

use bytes::Bytes;
use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use serde::Deserialize;

use crate::{
    config::ConfigError,
    normalize::memory::StateWrites,
    proto::v1::{ChangeEvent, EventsEncoding, StreamCheckpoint},
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
    /// How many events the batch holds.
    pub event_count: usize,
    /// The events themselves; empty for a sink that does not read them
    /// ([`Sink::reads_events`]) when `encoded` holds them.
    pub events: &'a [ChangeEvent],
    /// The checkpoint that will be committed once this batch is
    /// acknowledged. Transactional sinks write it with the events.
    pub checkpoint: &'a StreamCheckpoint,
    /// The memory changes committed with the checkpoint. Transactional
    /// sinks store them too ([`StateWrites::to_proto`]), so the embedded
    /// store can be rolled forward after a crash between the two commits.
    pub writes: &'a StateWrites,
    /// The events already encoded in the sink's [`Sink::encoding`], when
    /// the runtime has them (encoded once, off the publishing path, and
    /// recorded so in the outbox). Sinks that write that blob as it is use
    /// it; others encode `events` themselves.
    pub encoded: Option<&'a Bytes>,
}

impl OutBatch<'_> {
    /// The events as JSON lines: the runtime's encoding if it made one,
    /// else encoded now.
    /// It is shared, not copied.
    pub fn json_lines(&self) -> Bytes {
        match self.encoded {
            Some(encoded) => encoded.clone(),
            None => {
                debug_assert_eq!(
                    self.events.len(),
                    self.event_count,
                    "events dropped unencoded"
                );
                encode_events(EventsEncoding::JsonLines, self.events).into()
            }
        }
    }
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

    /// The encoding of a batch's events that this sink writes as one blob
    /// (see [`OutBatch::encoded`]).
    fn encoding(&self) -> EventsEncoding {
        EventsEncoding::ProtobufDelimited
    }

    /// False for sinks that write only the batch's encoded events
    /// ([`OutBatch::encoded`]) and need no more than their number: the
    /// runtime then drops the events as soon as they are encoded.
    fn reads_events(&self) -> bool {
        true
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
    let mut writer = crate::proto::json::JsonWriter::default();
    let start = buf.len();
    for (i, event) in events.iter().enumerate() {
        writer.write_event(event, buf);
        buf.push(b'\n');
        if i == 0 {
            // Room for the rest at the first one's size and a quarter,
            // rather than growing (and copying) the batch several times.
            let first = buf.len() - start;
            buf.reserve((events.len() - 1) * (first + first / 4));
        }
    }
}

/// Room for a batch's events in `encoding`: the first event's size and a
/// quarter, times the number of events (the events of a page are alike).
pub fn estimated_len(encoding: EventsEncoding, events: &[ChangeEvent]) -> usize {
    use prost::Message as _;
    let Some(first) = events.first() else {
        return 0;
    };
    let one = match encoding {
        EventsEncoding::JsonLines => {
            let mut scratch = Vec::with_capacity(1024);
            crate::proto::json::write_event(first, &mut scratch);
            scratch.len() + 1
        }
        EventsEncoding::ProtobufDelimited => first.encoded_len() + 5,
    };
    events.len() * (one + one / 4)
}

/// A batch's events as one blob in `encoding`.
pub fn encode_events(encoding: EventsEncoding, events: &[ChangeEvent]) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_events_into(encoding, events, &mut buf);
    buf
}

/// [`encode_events`], appending to `buf`.
pub fn encode_events_into(encoding: EventsEncoding, events: &[ChangeEvent], buf: &mut Vec<u8>) {
    use prost::Message as _;
    match encoding {
        EventsEncoding::JsonLines => encode_json_lines(events, buf),
        EventsEncoding::ProtobufDelimited => {
            let lens: Vec<usize> = events.iter().map(|e| e.encoded_len()).collect();
            let total: usize = lens
                .iter()
                .map(|l| l + prost::encoding::encoded_len_varint(*l as u64))
                .sum();
            buf.reserve(total);
            for (e, len) in events.iter().zip(lens) {
                prost::encoding::encode_varint(len as u64, buf);
                e.encode_raw(buf);
            }
        }
    }
}

/// The events of a [`EventsEncoding::ProtobufDelimited`] blob, each as its
/// encoded message, in order; `None` unless there are exactly `count`.
pub fn split_delimited(mut blob: &[u8], count: usize) -> Option<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(count);
    while !blob.is_empty() {
        let len = prost::encoding::decode_varint(&mut blob).ok()? as usize;
        if len > blob.len() {
            return None;
        }
        let (message, rest) = blob.split_at(len);
        out.push(message);
        blob = rest;
    }
    (out.len() == count).then_some(out)
}

/// The events of a blob made by [`encode_events`].
pub fn decode_events(
    encoding: EventsEncoding,
    mut blob: &[u8],
) -> Result<Vec<ChangeEvent>, String> {
    use prost::Message as _;
    let mut events = Vec::new();
    match encoding {
        EventsEncoding::ProtobufDelimited => {
            while !blob.is_empty() {
                events.push(
                    ChangeEvent::decode_length_delimited(&mut blob).map_err(|e| e.to_string())?,
                );
            }
        }
        EventsEncoding::JsonLines => {
            for line in blob.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                events.push(serde_json::from_slice(line).map_err(|e| e.to_string())?);
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<ChangeEvent> {
        (0..3)
            .map(|i| ChangeEvent {
                event_id: format!("e{i}"),
                object_id: format!("o{i}"),
                changed_properties: vec!["line\nbreak".into()],
                object_version: i + 1,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn blobs_decode_to_the_events_in_either_encoding() {
        for encoding in [EventsEncoding::JsonLines, EventsEncoding::ProtobufDelimited] {
            let blob = encode_events(encoding, &events());
            assert_eq!(
                decode_events(encoding, &blob).unwrap(),
                events(),
                "{encoding:?}"
            );
        }
        let json = encode_events(EventsEncoding::JsonLines, &events());
        assert_eq!(json.iter().filter(|b| **b == b'\n').count(), 3);
        assert!(decode_events(EventsEncoding::JsonLines, b"{\"eventId\":").is_err());
    }

    #[test]
    fn delimited_blobs_split_into_messages() {
        use prost::Message as _;
        let blob = encode_events(EventsEncoding::ProtobufDelimited, &events());
        let parts = split_delimited(&blob, 3).unwrap();
        for (part, event) in parts.iter().zip(events()) {
            assert_eq!(*part, event.encode_to_vec().as_slice());
        }
        assert!(split_delimited(&blob, 2).is_none(), "count must match");
        assert!(
            split_delimited(&blob[..blob.len() - 1], 3).is_none(),
            "torn"
        );
        assert_eq!(split_delimited(&[], 0).unwrap().len(), 0);
    }
}

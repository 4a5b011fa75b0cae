//! The Kafka sink: change events to Apache Kafka (or any cluster speaking
//! its protocol), each batch acknowledged before its checkpoint.
//!
//! ```toml
//! [sink]
//! type = "kafka"
//! brokers = "kafka-1:9092,kafka-2:9092"
//! topic = "graphdelta.{tenant}.{stream}"   # {tenant} {stream} {resource}
//! exactly_once = false                     # true: one transaction per batch
//! tombstones = true                        # null-value record after HARD_DELETED
//! wire_format = "raw"                      # or "confluent" + schema_registry_url
//! # delivery_timeout = "30s"   startup_timeout = "10s"
//! # partitions = 6   replication_factor = 3
//! [sink.topic_config]                      # configs of topics the sink creates
//! "cleanup.policy" = "compact"
//! [sink.properties]                        # librdkafka, verbatim
//! "security.protocol" = "SASL_SSL"
//! "sasl.mechanisms" = "SCRAM-SHA-512"
//! "sasl.username" = "graphdelta"
//! "compression.type" = "zstd"
//! [sink.secret_properties]                 # librdkafka, values from env/files
//! "sasl.password" = { env = "KAFKA_PASSWORD" }
//! ```
//!
//! # Records
//! One record per [`ChangeEvent`](crate::proto::v1::ChangeEvent): key = the
//! object id (one object's events stay in one partition, in order), value =
//! the protobuf (optionally in the Confluent Schema Registry framing),
//! CloudEvents binary-mode headers (`ce_specversion`, `ce_id`, `ce_source`,
//! `ce_type`, `ce_subject`, `ce_time`, `content-type:
//! application/x-protobuf`). See [`encoder`] for the details.
//!
//! # Guarantees
//! - **At-least-once** (default). One idempotent producer (`acks=all`,
//!   `enable.idempotence=true`) for all streams. `publish` returns only when
//!   every record of the batch has a successful delivery report, so the
//!   runtime commits a checkpoint only past acknowledged events. When a batch
//!   fails with a retriable error (broker down, queue full, timeout), the
//!   runtime publishes it and every later batch again: an object's events
//!   can then appear twice, always with the same `ce_id`, and a later event
//!   of an object never precedes an earlier one in its partition once the
//!   retry has landed. Consumers deduplicate on `ce_id` or compare
//!   `object_version`.
//! - **Exactly-once** (`exactly_once = true`). One transactional producer per
//!   stream writes the batch's events and its checkpoint record to
//!   `sink.checkpoint_topic` in one transaction ([`transactional`]). A
//!   `read_committed` consumer sees every event exactly once across crashes
//!   and restarts; a second instance with the same transactional id fences
//!   the first, which stops the stream without committing. The runtime
//!   keeps one batch of such a stream in flight (the roll-forward needs the
//!   sink at most one batch ahead of the embedded store). Needs Kafka 2.5+
//!   (or a compatible broker with transactions) and, on clusters with fewer
//!   than three brokers, `transaction.state.log.replication.factor` and
//!   `transaction.state.log.min.isr` lowered on the brokers.
//!   `read_uncommitted` consumers may still see aborted attempts.
//!
//! Errors are sorted into retriable and permanent by librdkafka error code
//! ([`producer`] has the table): a topic authorization failure or a record
//! larger than `max.message.bytes` stops the stream with a message naming the
//! topic and the fix; nothing is committed.
//!
//! # Timeouts
//! librdkafka keeps retrying a record for `message.timeout.ms`, 5 minutes by
//! default. The sink sets it from `delivery_timeout` (30 s): a dead cluster
//! fails the batch as retriable within half a minute, the runtime backs off
//! (`runtime.retry_min`..`retry_max`) and publishes it again. The startup
//! check fetches the cluster metadata with `startup_timeout` (10 s) and
//! names the brokers when they do not answer. librdkafka notices expired
//! records while it waits to reconnect, which it backs off up to
//! `reconnect.backoff.max.ms` (10 s), so a batch may take that much longer
//! to fail. With `exactly_once`,
//! `transaction_timeout` (60 s) bounds how long a transaction left open by a
//! killed process holds `read_committed` consumers back (the next instance
//! aborts it at once when it starts).
//!
//! # Topics and compaction
//! Missing topics are created on first use with `partitions`,
//! `replication_factor` (both default to the broker's defaults) and
//! `topic_config`; set `create_topics = false` where the connector may not
//! create topics. Event topics can be compacted: with
//! `"cleanup.policy" = "compact"` Kafka keeps, per object id, its latest
//! event, and with `tombstones = true` a deleted object's tombstone, which
//! itself is removed `delete.retention.ms` (24 h by default) after
//! compaction; consumers that may be offline longer than that should raise
//! it, or they miss the deletion. A compacted topic is then a replayable
//! snapshot of the directory. `"cleanup.policy" = "compact,delete"` with
//! `retention.ms` bounds it in time instead.
//!
//! The checkpoint topic (`graphdelta.checkpoints`, exactly-once only) must be
//! compacted (`cleanup.policy=compact`; the sink creates it so, with one
//! partition and `max.message.bytes` of 16 MiB, and refuses an existing one
//! with another policy): a deleting topic would forget a stream's position
//! one retention period after its last batch. Keep one checkpoint topic per
//! connector (records are keyed by stream name), or distinct stream names.
//! `graphdelta reset` clears only the embedded store; in exactly-once mode
//! the stream's checkpoint record would roll it forward again, so also
//! write a tombstone for its key (or use a new checkpoint topic).

pub mod admin;
pub mod config;
pub mod context;
pub mod encoder;
pub mod producer;
pub mod registry;
pub mod transactional;

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_trait::async_trait;

pub use self::config::{KafkaSinkConfig, WireFormat};
use self::{admin::Admin, encoder::Encoder, producer::AtLeastOnce, transactional::ExactlyOnce};
use super::{OutBatch, Sink, SinkError, StoredCheckpoint};

/// How batches are delivered.
enum Mode {
    AtLeastOnce(AtLeastOnce),
    ExactlyOnce(ExactlyOnce),
}

/// The Kafka sink.
pub struct KafkaSink {
    config: Arc<KafkaSinkConfig>,
    encoder: Encoder,
    admin: Arc<Admin>,
    mode: Mode,
}

impl KafkaSink {
    /// Builds the clients; nothing is sent until [`Sink::check`] or the first
    /// batch.
    pub fn new(config: &KafkaSinkConfig) -> Result<Self, SinkError> {
        config
            .validate()
            .map_err(|e| SinkError::Permanent(e.to_string()))?;
        let config = Arc::new(config.clone());
        let admin = Arc::new(Admin::new(config.clone())?);
        let encoder = Encoder::new(&config)?;
        let mode = if config.exactly_once {
            Mode::ExactlyOnce(ExactlyOnce::new(config.clone(), admin.clone()))
        } else {
            Mode::AtLeastOnce(AtLeastOnce::new(config.clone())?)
        };
        Ok(Self {
            config,
            encoder,
            admin,
            mode,
        })
    }

    /// The configuration the sink runs with.
    pub fn config(&self) -> &KafkaSinkConfig {
        &self.config
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    #[tracing::instrument(name = "kafka_publish", skip_all, fields(stream = %batch.stream, batch = batch.seq, events = batch.events.len()))]
    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        let records = self.encoder.encode(&batch).await?;
        let topics: Vec<Arc<str>> = records
            .iter()
            .map(|r| r.topic.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.admin.ensure_topics(&topics).await?;
        match &self.mode {
            Mode::AtLeastOnce(p) => {
                if records.is_empty() {
                    return Ok(());
                }
                p.send(batch.stream, batch.seq, &records).await
            }
            Mode::ExactlyOnce(t) => t.publish(&batch, records).await,
        }
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.admin.check().await?;
        if let Mode::ExactlyOnce(t) = &self.mode {
            t.check().await?;
        }
        Ok(())
    }

    fn stores_checkpoints(&self) -> bool {
        matches!(self.mode, Mode::ExactlyOnce(_))
    }

    async fn stored_checkpoint(&self, stream: &str) -> Result<Option<StoredCheckpoint>, SinkError> {
        match &self.mode {
            Mode::AtLeastOnce(_) => Ok(None),
            Mode::ExactlyOnce(t) => t.stored_checkpoint(stream).await,
        }
    }

    async fn release(&self, stream: &str) {
        if let Mode::ExactlyOnce(t) = &self.mode {
            t.release(stream);
        }
    }

    async fn close(&self) {
        let timeout = self.config.delivery_timeout.min(Duration::from_secs(10));
        match &self.mode {
            Mode::AtLeastOnce(p) => p.flush(timeout).await,
            Mode::ExactlyOnce(t) => t.flush(timeout).await,
        }
    }
}

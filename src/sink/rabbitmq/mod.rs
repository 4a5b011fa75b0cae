//! The RabbitMQ sink: every change event becomes one persistent message on
//! a topic exchange, and a batch counts as delivered only when the broker
//! confirmed every one of its messages with a plain ack and returned none.
//!
//! ```toml
//! [sink]
//! type = "rabbitmq"
//! url_env = "AMQP_URL"                      # amqp://user:password@host:5672/%2f, or amqps://
//! exchange = "graphdelta"                   # durable topic exchange, declared if missing
//! routing_key = "{tenant}.{stream}.{change}"
//!
//! [[sink.declare_queues]]                   # optional: queues declared and bound by graphdelta
//! name = "directory-changes"
//! type = "quorum"                           # quorum (default) | stream | classic
//! binding_keys = ["#"]
//! ```
//!
//! # What a confirm is worth here
//! The runtime commits a batch's checkpoint when [`Sink::publish`] returns
//! `Ok`, so `Ok` must mean the broker has taken responsibility for every
//! message. Each message is therefore published
//! - on a channel in **confirm mode**, and its confirm is awaited;
//! - **`mandatory`**: a message no queue is bound for comes back as a
//!   `basic.return` before its ack. RabbitMQ acks unroutable messages (it
//!   has "handled" them by dropping them), so an ack alone proves nothing:
//!   a returned message fails the batch;
//! - **persistent** (`delivery_mode = 2`), so the confirm covers a message
//!   written to disk, not one that a restart would lose.
//!
//! | What happened | Result | Checkpoint |
//! |---|---|---|
//! | every message acked, none returned | `Ok` | committed |
//! | a `basic.return` (no queue bound for the routing key) | retriable error naming the exchange, routing key and event | not moved; batch published again with backoff |
//! | a `basic.nack` (queue full with `reject-publish`, no quorum) | retriable | not moved |
//! | channel or connection closed, broker gone | retriable; the next attempt reconnects | not moved |
//! | no confirm within `confirm_timeout` | retriable; the connection is replaced | not moved |
//! | login refused, no access to the vhost, no permission, queue exists with other arguments, message too large | permanent: the stream stops with the fix in the message | not moved |
//!
//! Delivery is at least once: a batch that failed half-way is published
//! again from its first message, so a consumer can see a message twice. A
//! duplicate is the same event: same `message_id` (the event id), same body.
//!
//! # Order and throughput
//! Each stream publishes through a lane of its own: a task owning one
//! confirm-mode channel. Batches enter the lane in the order the runtime
//! first polls their publishes (batch order). While the lane waits for
//! confirms, later batches queue; the next time it is free it sends all of
//! them as one group and awaits their confirms together, so the broker's
//! confirm latency (a disk flush, a Raft round) is paid once per group
//! rather than once per page. RabbitMQ keeps one channel's messages in
//! order in every queue, so a queue holds each object's events in the
//! order they happened.
//!
//! When a batch fails, the batches after it fail too (sent or not) and the
//! runtime publishes the failed batch and every later one again, in order;
//! batches queued behind a failure are not sent before the failed one is
//! back. A connection lost mid-group delivers a prefix of the channel's
//! messages, so after deduplication by event id each object's events still
//! arrive in order (`object_version` increases). Only a message the broker
//! refused in the middle of a group (a nack, a return) can be overtaken by
//! a later event of the same object before its retry; `object_version`
//! tells a consumer which is newer.
//!
//! Returns are attributed exactly: lapin hands a `basic.return` to the
//! next confirm it completes, which with multiple-acks may be another
//! message's; the lane reads every confirm of a group before judging any
//! batch, and a returned message names its event (`message_id`), so it
//! fails the batch it belongs to.
//!
//! # Routing keys and how consumers select events
//! `routing_key` is a template over `{tenant}`, `{stream}`, `{resource}`,
//! `{type}` (object type: `user`, `group`, ...) and `{change}` (`created`,
//! `updated`, `soft_deleted`, `hard_deleted`, `restored`). Dots inside a
//! value become `_`, so each placeholder is one word of a topic pattern.
//! With the default template, tenant `contoso.onmicrosoft.com` and stream
//! `users`: `contoso_onmicrosoft_com.users.updated`. A queue bound with
//! - `#` gets everything;
//! - `*.users.*` gets one stream;
//! - `*.*.hard_deleted` gets permanent deletions only, `*.*.soft_deleted`
//!   deletions that can still be restored (for 30 days), `*.*.restored`
//!   their restorations.
//!
//! # Hard deletes need no tombstone
//! Kafka needs a tombstone (a null value) so compaction can drop a deleted
//! key; RabbitMQ queues and streams do not compact, so a deletion is an
//! ordinary message like any other. A consumer tells it apart without
//! decoding the body, by any of: the routing key's `{change}` word
//! (`hard_deleted`), the `type` property (`graphdelta.v1.user.hard_deleted`),
//! or the `graphdelta_change` header. In the body, `change_type` is
//! `CHANGE_TYPE_HARD_DELETED`, and `inferred = true` marks a deletion
//! concluded by a full resync rather than reported by Graph.
//!
//! # The message
//! - body: the `graphdelta.v1.ChangeEvent` protobuf (`graphdelta schema`
//!   writes its descriptor set for consumers in other languages);
//! - properties: `delivery_mode = 2`, `content_type =
//!   application/x-protobuf`, `message_id` = event id (deduplicate on it),
//!   `type` = CloudEvents type (`graphdelta.v1.<object type>.<change>`),
//!   `timestamp` = when the connector saw the change (seconds),
//!   `app_id = graphdelta`;
//! - headers, following the CloudEvents AMQP binding: `cloudEvents_specversion`
//!   (`1.0`), `cloudEvents_id`, `cloudEvents_source`
//!   (`/graphdelta/{tenant}/{stream}`), `cloudEvents_type`,
//!   `cloudEvents_subject` (the object id), `cloudEvents_time` (RFC 3339),
//!   `cloudEvents_dataschema`; and `graphdelta_tenant`, `graphdelta_stream`,
//!   `graphdelta_resource`, `graphdelta_object_type`, `graphdelta_change`,
//!   `graphdelta_object_version` (integer), `graphdelta_snapshot`,
//!   `graphdelta_inferred` (booleans).
//!
//! # Replaying events: stream queues
//! A queue declared with `type = "stream"` is an append-only log: reading
//! does not remove messages, so any number of consumers can read the events
//! from the start, as from a Kafka topic. Retention is by age (`max_age`)
//! and/or size (`max_length_bytes`); without either the stream keeps
//! everything. Unlike a compacted topic it keeps every event, not only the
//! latest per object: a consumer rebuilds the directory by applying the
//! events in order (last `object_version` wins, `hard_deleted` removes). A
//! stream that still holds the connector's first full round (all `created`
//! snapshot events) rebuilds it completely, so size retention generously
//! or leave it off for that use.
//!
//! To read a stream from its first message over AMQP 0-9-1, consume with a
//! prefetch limit and the `x-stream-offset` argument, and ack what you read
//! (acks only advance the prefetch window):
//!
//! ```text
//! basic.qos     prefetch_count = 1000
//! basic.consume queue = "directory-changes", no_ack = false,
//!               arguments = { "x-stream-offset": "first" }   # or "last", "next",
//!                                                            # an offset, a timestamp
//! ```
//!
//! # Connection
//! One connection per process, named `connection_name` (see
//! `rabbitmqctl list_connections name client_properties`), one confirm
//! channel per stream. The startup check connects and declares the exchange
//! and `declare_queues`; an unreachable broker is reported with its
//! `host:port` within `connect_timeout`. After a lost connection the next
//! publish reconnects and declares the topology again. The password is
//! never logged, never part of an error, and `Debug` shows `[redacted]`
//! (lapin itself dumps the login frame at TRACE level, so the CLI never
//! lets lapin's TRACE events through).

pub mod channel;
pub mod config;
pub mod encoder;
mod publisher;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

pub use self::config::{AmqpUrl, QueueConfig, QueueType, RabbitMqSinkConfig};
use self::{
    channel::{Connector, Settings},
    config::RoutingKeyTemplate,
    encoder::Encoder,
    publisher::{Job, LaneHandle, Shared, spawn_lane},
};
use super::{OutBatch, Sink, SinkError};

/// The RabbitMQ sink.
pub struct RabbitMqSink {
    shared: Arc<Shared>,
    encoder: Encoder,
    /// One publishing lane (a task owning a confirm channel) per stream,
    /// started on the stream's first batch.
    lanes: std::sync::Mutex<HashMap<String, LaneHandle>>,
}

impl std::fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings = &self.shared.connector.settings;
        f.debug_struct("RabbitMqSink")
            .field("broker", &settings.endpoint)
            .field("exchange", &settings.exchange)
            .finish_non_exhaustive()
    }
}

impl RabbitMqSink {
    /// Resolves the URL and prepares the sink; connects on [`Sink::check`]
    /// or the first publish.
    pub fn new(config: &RabbitMqSinkConfig) -> Result<Self, SinkError> {
        let url = resolve_url(config)?;
        let template = RoutingKeyTemplate::parse(&config.routing_key).map_err(|e| {
            SinkError::Permanent(format!(
                "rabbitmq sink: routing_key `{}`: {e}",
                config.routing_key
            ))
        })?;
        let settings = Settings::new(config, &url)?;
        Ok(Self {
            shared: Arc::new(Shared {
                connector: Connector::new(settings),
                exchange: config.exchange.as_str().into(),
                confirm_timeout: config.confirm_timeout,
            }),
            encoder: Encoder::new(template),
            lanes: Default::default(),
        })
    }

    /// The encoder (routing keys and message layout), for tests and tools.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The stream's lane, started on first use (and again if its task
    /// ended, which only a bug could cause).
    fn lane(&self, stream: &str) -> mpsc::UnboundedSender<Job> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let lane = lanes
            .entry(stream.to_string())
            .or_insert_with(|| spawn_lane(self.shared.clone(), stream.to_string()));
        if lane.jobs.is_closed() {
            tracing::error!(
                stream,
                "A RabbitMQ publishing lane ended unexpectedly; starting a new one."
            );
            *lane = spawn_lane(self.shared.clone(), stream.to_string());
        }
        lane.jobs.clone()
    }
}

/// The broker URL from `url`, `url_env` or `url_file`.
pub(crate) fn resolve_url(config: &RabbitMqSinkConfig) -> Result<String, SinkError> {
    if let Some(url) = &config.url {
        return Ok(url.expose().to_string());
    }
    if let Some(var) = &config.url_env {
        return match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
            Ok(_) => Err(SinkError::Permanent(format!(
                "rabbitmq sink: environment variable `{var}` (sink.url_env) is empty; set it to the broker URL, e.g. amqp://user:password@host:5672/%2f"
            ))),
            Err(_) => Err(SinkError::Permanent(format!(
                "rabbitmq sink: environment variable `{var}` (sink.url_env) is not set; export it with the broker URL, e.g. amqp://user:password@host:5672/%2f"
            ))),
        };
    }
    if let Some(path) = &config.url_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            SinkError::Permanent(format!(
                "rabbitmq sink: cannot read url_file `{}`: {e}",
                path.display()
            ))
        })?;
        let url = text.trim();
        if url.is_empty() {
            return Err(SinkError::Permanent(format!(
                "rabbitmq sink: url_file `{}` is empty",
                path.display()
            )));
        }
        return Ok(url.to_string());
    }
    Err(SinkError::Permanent(
        "rabbitmq sink: no broker URL: set sink.url_env, sink.url_file or sink.url".to_string(),
    ))
}

#[async_trait]
impl Sink for RabbitMqSink {
    fn kind(&self) -> &'static str {
        "rabbitmq"
    }

    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        if batch.events.is_empty() {
            return Ok(());
        }
        let encoded = batch
            .encoded
            .and_then(|blob| super::split_delimited(blob, batch.events.len()));
        let messages = batch
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.encoder
                    .encode_with(e, encoded.as_ref().map(|messages| messages[i]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                SinkError::Permanent(format!("rabbitmq sink: stream `{}`: {e}", batch.stream))
            })?;
        // Queued on the first poll, before any await: a lane serves batches
        // in the order the runtime first polls their publishes, which is
        // batch order.
        let (reply, confirmed) = oneshot::channel();
        let job = Job {
            seq: batch.seq,
            messages,
            reply,
        };
        self.lane(batch.stream).send(job).map_err(|_| {
            SinkError::Retriable(format!(
                "rabbitmq sink: the publishing lane of stream `{}` has stopped (the sink is closing)",
                batch.stream
            ))
        })?;
        confirmed.await.unwrap_or_else(|_| {
            Err(SinkError::Retriable(format!(
                "rabbitmq sink: the publishing lane of stream `{}` ended before batch {} was confirmed",
                batch.stream, batch.seq
            )))
        })
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.shared.connector.connection().await.map(|_| ())
    }

    async fn close(&self) {
        // Dropping the senders ends each lane once its queue is empty; it
        // closes its channel, then the connection is closed.
        let lanes: Vec<LaneHandle> = self
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, lane)| lane)
            .collect();
        let grace = self.shared.confirm_timeout + Duration::from_secs(2);
        for LaneHandle { jobs, task } in lanes {
            drop(jobs);
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!(
                    "A RabbitMQ publishing lane did not finish in time; closing the connection under it (its batches are not committed and will be published again)."
                );
            }
        }
        self.shared.connector.close().await;
    }
}

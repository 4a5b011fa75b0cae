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
//! # Order
//! Each stream publishes on a channel of its own, one batch at a time, in
//! batch order (a FIFO lock taken when the runtime first polls the publish;
//! it polls in batch order). RabbitMQ keeps the order of one channel's
//! messages in each queue, so a queue holds each object's events in the
//! order they happened. When a batch fails, the batches queued behind it
//! fail without being sent, and the runtime publishes the failed batch and
//! every later one again, in order: after deduplication by event id, each
//! object's events still arrive in order (`object_version` increases).
//!
//! One batch at a time per stream is also what makes a return attributable:
//! lapin hands a returned message to the next confirm it completes, which
//! with multiple-acks can belong to another in-flight message; with only
//! one batch's messages on the channel it always belongs to this batch.
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
//!   prints the schema);
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
//! never logged, never part of an error, and `Debug` shows `[redacted]`.

pub mod channel;
pub mod config;
pub mod encoder;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use lapin::{
    Confirmation, ErrorKind, PublisherConfirm,
    message::BasicReturnMessage,
    options::BasicPublishOptions,
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::ShortString,
};
use tokio::time::Instant;

pub use self::config::{AmqpUrl, QueueConfig, QueueType, RabbitMqSinkConfig};
use self::{
    channel::{ConfirmChannel, Connector, Settings, classify, describe},
    config::RoutingKeyTemplate,
    encoder::{Encoded, Encoder},
};
use super::{OutBatch, Sink, SinkError};

/// The RabbitMQ sink.
pub struct RabbitMqSink {
    connector: Arc<Connector>,
    encoder: Encoder,
    exchange: ShortString,
    confirm_timeout: Duration,
    /// One lane per stream, created on its first batch.
    lanes: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Lane>>>>,
}

/// A stream's publishing lane: its channel, held by one batch at a time.
#[derive(Default)]
struct Lane {
    channel: Option<ConfirmChannel>,
    /// The batch that failed last. Batches after it that were already
    /// waiting fail without being sent: the runtime publishes the failed
    /// batch again first, and sending them before it would put an object's
    /// later events ahead of its earlier ones.
    failed_seq: Option<u64>,
}

impl std::fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqSink")
            .field("broker", &self.connector.settings.endpoint)
            .field("exchange", &self.connector.settings.exchange)
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
            connector: Arc::new(Connector::new(settings)),
            encoder: Encoder::new(template),
            exchange: config.exchange.as_str().into(),
            confirm_timeout: config.confirm_timeout,
            lanes: Default::default(),
        })
    }

    /// The encoder (routing keys and message layout), for tests and tools.
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    fn lane(&self, stream: &str) -> Arc<tokio::sync::Mutex<Lane>> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.entry(stream.to_string()).or_default().clone()
    }

    /// Publishes the batch's messages on the lane's channel and awaits
    /// every confirm, all within `confirm_timeout`.
    async fn publish_on(
        &self,
        lane: &mut Lane,
        batch: &OutBatch<'_>,
        messages: Vec<Encoded>,
    ) -> Result<(), SinkError> {
        let reuse = lane
            .channel
            .as_ref()
            .is_some_and(|c| c.channel.status().connected());
        if !reuse {
            lane.channel = Some(self.connector.confirm_channel().await?);
        }
        let Some(ch) = lane.channel.as_ref() else {
            unreachable!("the lane's channel was just set");
        };
        let total = messages.len();
        let deadline = Instant::now() + self.confirm_timeout;
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        // Routing keys and ids are kept to name the culprit of a failure.
        let mut sent: Vec<(ShortString, PublisherConfirm)> = Vec::with_capacity(total);
        for m in messages {
            let publishing = ch.channel.basic_publish(
                self.exchange.clone(),
                m.routing_key.clone(),
                options,
                &m.body,
                m.properties,
            );
            match tokio::time::timeout_at(deadline, publishing).await {
                Ok(Ok(confirm)) => sent.push((m.routing_key, confirm)),
                Ok(Err(e)) => return Err(self.broken(ch, batch, &m.routing_key, &e).await),
                Err(_) => {
                    return Err(self
                        .timed_out(ch, batch, total - sent.len(), total, &m.routing_key)
                        .await);
                }
            }
        }
        let mut returned: Vec<BasicReturnMessage> = Vec::new();
        let mut nacked: Vec<ShortString> = Vec::new();
        for (i, (key, confirm)) in sent.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {}
                Ok(Ok(Confirmation::Ack(Some(message)))) => returned.push(message),
                Ok(Ok(Confirmation::Nack(message))) => {
                    // A nack may carry a returned message too (lapin pairs
                    // them by arrival); the return is what explains it.
                    match message {
                        Some(m) => returned.push(m),
                        None => nacked.push(key),
                    }
                }
                Ok(Ok(Confirmation::NotRequested)) => {
                    // Cannot happen on a channel after confirm.select; if it
                    // did, nothing would be confirmed: never report success.
                    return Err(self.not_confirming(ch, batch, &key).await);
                }
                Ok(Err(e)) => return Err(self.broken(ch, batch, &key, &e).await),
                Err(_) => {
                    return Err(self.timed_out(ch, batch, total - i, total, &key).await);
                }
            }
        }
        if !returned.is_empty() {
            // A declared queue or binding may have been deleted: declare the
            // topology again before the next attempt.
            self.connector.redeclare_topology().await;
            return Err(unroutable(
                &self.connector.settings.exchange,
                batch,
                &returned,
                total,
            ));
        }
        if let Some(key) = nacked.first() {
            return Err(SinkError::Retriable(format!(
                "rabbitmq exchange `{}`, routing key `{key}`: the broker refused (nack) {} of the {total} messages of stream `{}` batch {}; a queue may be full with x-overflow = reject-publish, or a quorum queue may have lost its majority. Nothing was committed; the batch will be published again",
                self.connector.settings.exchange,
                nacked.len(),
                batch.stream,
                batch.seq
            )));
        }
        Ok(())
    }

    /// A publish or confirm failed with a lapin error: the channel (or the
    /// whole connection) is gone.
    async fn broken(
        &self,
        ch: &ConfirmChannel,
        batch: &OutBatch<'_>,
        key: &ShortString,
        e: &lapin::Error,
    ) -> SinkError {
        // A channel closed with NOT_FOUND means the exchange is gone:
        // declare it again on the next attempt.
        if matches!(e.kind(), ErrorKind::ProtocolError(a) if *a.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
        {
            self.connector.redeclare_topology().await;
        }
        let lost = if ch.channel.status().connected() {
            ""
        } else {
            " (the channel is closed; the next attempt opens a new one, reconnecting if the connection is gone)"
        };
        let message = format!(
            "rabbitmq exchange `{}`, routing key `{key}`: publishing stream `{}` batch {} to {} failed: {}{lost}. Nothing was committed",
            self.connector.settings.exchange,
            batch.stream,
            batch.seq,
            self.connector.settings.host_port,
            describe(e),
        );
        classify(e, message)
    }

    async fn not_confirming(
        &self,
        ch: &ConfirmChannel,
        batch: &OutBatch<'_>,
        key: &ShortString,
    ) -> SinkError {
        self.connector.discard(ch.generation).await;
        SinkError::Retriable(format!(
            "rabbitmq exchange `{}`, routing key `{key}`: publishing stream `{}` batch {} failed: the channel is not in confirm mode. Nothing was committed",
            self.connector.settings.exchange, batch.stream, batch.seq
        ))
    }

    async fn timed_out(
        &self,
        ch: &ConfirmChannel,
        batch: &OutBatch<'_>,
        unconfirmed: usize,
        total: usize,
        key: &ShortString,
    ) -> SinkError {
        let blocked = if self.connector.is_blocked(ch.generation).await {
            " The broker has blocked this connection (a memory or disk alarm: `rabbitmqctl status`, `rabbitmq-diagnostics alarms`)."
        } else {
            " The broker may be overloaded, blocked by a resource alarm, or unreachable."
        };
        // The connection may be half-dead (heartbeats notice late): start
        // afresh.
        self.connector.discard(ch.generation).await;
        SinkError::Retriable(format!(
            "rabbitmq exchange `{}`, routing key `{key}`: {unconfirmed} of the {total} messages of stream `{}` batch {} were not confirmed within {:?} (sink.confirm_timeout).{blocked} Nothing was committed; the batch will be published again on a new connection",
            self.connector.settings.exchange, batch.stream, batch.seq, self.confirm_timeout
        ))
    }
}

fn unroutable(
    exchange: &str,
    batch: &OutBatch<'_>,
    returned: &[BasicReturnMessage],
    total: usize,
) -> SinkError {
    let first = &returned[0];
    let id = first
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .unwrap_or_default();
    let mut keys: Vec<&str> = returned
        .iter()
        .map(|m| m.delivery.routing_key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let more = if keys.len() > 1 {
        format!(" (routing keys: {})", keys.join(", "))
    } else {
        String::new()
    };
    SinkError::Retriable(format!(
        "rabbitmq exchange `{exchange}`, routing key `{}`: {} of the {total} messages of stream `{}` batch {} were returned unroutable ({} {}), e.g. event {id}{more}: no queue is bound to exchange `{exchange}` for these routing keys. Bind a queue (sink.declare_queues, or your consumers' bindings) or fix sink.routing_key. Nothing was committed; the batch will be published again",
        first.delivery.routing_key,
        returned.len(),
        batch.stream,
        batch.seq,
        first.reply_code,
        first.reply_text,
    ))
}

/// The broker URL from `url`, `url_env` or `url_file`.
fn resolve_url(config: &RabbitMqSinkConfig) -> Result<String, SinkError> {
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
        // Taken on the first poll, before any await: lanes are served in
        // the order the runtime first polls its publishes (batch order).
        let lane = self.lane(batch.stream);
        let mut lane = lane.lock().await;
        if let Some(failed) = lane.failed_seq {
            if batch.seq > failed {
                return Err(SinkError::Retriable(format!(
                    "rabbitmq sink: stream `{}` batch {} not sent: batch {failed} before it failed and must be published first (keeps each object's events in order)",
                    batch.stream, batch.seq
                )));
            }
            lane.failed_seq = None;
        }
        let messages = batch
            .events
            .iter()
            .map(|e| self.encoder.encode(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                SinkError::Permanent(format!("rabbitmq sink: stream `{}`: {e}", batch.stream))
            })?;
        let started = std::time::Instant::now();
        let result = self.publish_on(&mut lane, &batch, messages).await;
        match &result {
            Ok(()) => tracing::debug!(
                batch = batch.seq,
                messages = batch.events.len(),
                took = ?started.elapsed(),
                "Batch confirmed by RabbitMQ."
            ),
            Err(_) => {
                // Never reuse a channel that saw a failure: its confirms
                // and returns may still be in flight.
                lane.channel = None;
                lane.failed_seq = Some(batch.seq);
            }
        }
        result
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.connector.connection().await.map(|_| ())
    }

    async fn close(&self) {
        let lanes: Vec<_> = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.drain().map(|(_, l)| l).collect()
        };
        for lane in lanes {
            lane.lock().await.channel = None;
        }
        self.connector.close().await;
    }
}

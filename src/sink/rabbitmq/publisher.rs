//! One publishing lane per stream: a task that owns the stream's
//! confirm-mode channel and turns queued batches into confirmed (or failed)
//! batches, in order.
//!
//! # Groups
//! Batches queue up while the lane waits for the broker's confirms (the
//! runtime keeps several in flight). When the lane is free it takes every
//! queued batch (up to [`MAX_GROUP_MESSAGES`]) and publishes them together,
//! then awaits all their confirms: the broker's confirm latency (a disk
//! flush, a Raft round) is paid once per group, not once per batch. The
//! next group starts only when the previous one is fully confirmed, so a
//! channel never carries messages of two groups at once.
//!
//! # Attributing returns
//! lapin hands a `basic.return` to whichever confirm it completes next,
//! which, with multiple-acks, can be another message's. Here every message
//! of a group is on the channel alone with its group, every confirm of the
//! group is read before any batch is judged, and a returned message names
//! its event (`message_id`): the batch it belongs to is known exactly.
//!
//! # Verdicts
//! A batch is confirmed when each of its messages got a plain ack and none
//! was returned. A batch after a failed one (in the group, or queued behind
//! it) is reported failed too, even if acked: the runtime publishes the
//! failed batch and every later one again, in order, and sending a later
//! batch before the failed one's retry would put an object's newer events
//! ahead of older ones. Batches queued behind a failure are not sent at all
//! until the failed batch comes back. A broken channel or a confirm timeout
//! fails the whole group (some confirms are unknowable) and the channel is
//! dropped; every failure drops the channel, which is never reused once its
//! confirm bookkeeping has seen a failure.
//!
//! The lane is a task of its own so that a publish future dropped by its
//! caller (shutdown) cannot leave a channel half-published.

use std::{collections::HashMap, sync::Arc, time::Duration};

use lapin::{
    Confirmation, ErrorKind, PublisherConfirm,
    message::BasicReturnMessage,
    options::BasicPublishOptions,
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::ShortString,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::{
    channel::{ConfirmChannel, Connector, classify, describe},
    encoder::Encoded,
};
use crate::sink::SinkError;

/// The most messages sent as one group (a group holds at least one batch).
pub(crate) const MAX_GROUP_MESSAGES: usize = 10_000;

/// One batch, encoded, waiting for its lane.
pub(crate) struct Job {
    pub(crate) seq: u64,
    pub(crate) messages: Vec<Encoded>,
    pub(crate) reply: oneshot::Sender<Result<(), SinkError>>,
}

/// What lanes share: the connection and the publish settings.
pub(crate) struct Shared {
    pub(crate) connector: Connector,
    pub(crate) exchange: ShortString,
    pub(crate) confirm_timeout: Duration,
}

/// A running lane: where its batches go, and its task.
pub(crate) struct LaneHandle {
    pub(crate) jobs: mpsc::UnboundedSender<Job>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// Starts the lane of `stream`; it ends (closing its channel) once its
/// queue is empty and every sender is dropped.
pub(crate) fn spawn_lane(shared: Arc<Shared>, stream: String) -> LaneHandle {
    let (jobs, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(Lane::new(shared, stream).run(rx));
    LaneHandle { jobs, task }
}

struct Lane {
    shared: Arc<Shared>,
    stream: String,
    channel: Option<ConfirmChannel>,
    /// The first batch that failed and has not been published again since.
    failed_seq: Option<u64>,
}

/// How a group ended, before it is turned into one result per batch.
enum GroupOutcome {
    /// Every confirm was read: per batch, what went wrong (if anything).
    Judged(Vec<Option<SinkError>>),
    /// The channel broke or timed out: every batch failed with this.
    Failed(SinkError),
}

impl Lane {
    fn new(shared: Arc<Shared>, stream: String) -> Self {
        Self {
            shared,
            stream,
            channel: None,
            failed_seq: None,
        }
    }

    async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = jobs.recv().await {
            let mut queued = vec![first];
            let mut messages = queued[0].messages.len();
            while messages < MAX_GROUP_MESSAGES {
                match jobs.try_recv() {
                    Ok(job) => {
                        messages += job.messages.len();
                        queued.push(job);
                    }
                    Err(_) => break,
                }
            }
            let mut group = Vec::with_capacity(queued.len());
            for job in queued {
                match self.failed_seq {
                    Some(failed) if job.seq > failed => {
                        let _ = job.reply.send(Err(SinkError::Retriable(format!(
                            "rabbitmq sink: stream `{}` batch {} not sent: batch {failed} before it failed and must be published first (keeps each object's events in order)",
                            self.stream, job.seq
                        ))));
                    }
                    _ => {
                        // The failed batch (or an earlier one) is back.
                        self.failed_seq = None;
                        group.push(job);
                    }
                }
            }
            if group.is_empty() {
                continue;
            }
            let started = std::time::Instant::now();
            let outcome = self.publish_group(&group).await;
            let verdicts: Vec<Option<SinkError>> = match outcome {
                GroupOutcome::Judged(v) => v,
                GroupOutcome::Failed(e) => vec![Some(e); group.len()],
            };
            let failed = verdicts.iter().position(Option::is_some);
            if let Some(i) = failed {
                self.channel = None;
                self.failed_seq = Some(group[i].seq);
            } else {
                tracing::debug!(
                    stream = %self.stream,
                    batches = group.len(),
                    messages,
                    took = ?started.elapsed(),
                    "Batches confirmed by RabbitMQ."
                );
            }
            for (i, (job, verdict)) in group.into_iter().zip(verdicts).enumerate() {
                let result = match (verdict, failed) {
                    (Some(e), _) => Err(e),
                    (None, Some(f)) if i > f => Err(SinkError::Retriable(format!(
                        "rabbitmq sink: stream `{}` batch {} was confirmed but is not counted: batch {} before it failed and is published again first, then this one (keeps each object's events in order)",
                        self.stream,
                        job.seq,
                        self.failed_seq.unwrap_or_default()
                    ))),
                    (None, _) => Ok(()),
                };
                // The caller may have gone (shutdown); nothing to do then.
                let _ = job.reply.send(result);
            }
        }
        if let Some(c) = self.channel.take()
            && c.channel.status().connected()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.channel.close(200, "OK".into()))
                .await;
        }
    }

    /// Sends every message of the group, then reads every confirm, all
    /// within `confirm_timeout`.
    async fn publish_group(&mut self, group: &[Job]) -> GroupOutcome {
        let reuse = self
            .channel
            .as_ref()
            .is_some_and(|c| c.channel.status().connected());
        if !reuse {
            match self.shared.connector.confirm_channel().await {
                Ok(c) => self.channel = Some(c),
                Err(e) => return GroupOutcome::Failed(e),
            }
        }
        let Some(ch) = self.channel.as_ref() else {
            unreachable!("the lane's channel was just set");
        };
        let shared = &self.shared;
        let total: usize = group.iter().map(|j| j.messages.len()).sum();
        let deadline = Instant::now() + shared.confirm_timeout;
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        // Per message: its batch (index in the group) and its confirm.
        let mut sent: Vec<(usize, &Encoded, PublisherConfirm)> = Vec::with_capacity(total);
        for (b, job) in group.iter().enumerate() {
            for m in &job.messages {
                let publishing = ch.channel.basic_publish(
                    shared.exchange.clone(),
                    m.routing_key.clone(),
                    options,
                    &m.body,
                    m.properties.clone(),
                );
                match tokio::time::timeout_at(deadline, publishing).await {
                    Ok(Ok(confirm)) => sent.push((b, m, confirm)),
                    Ok(Err(e)) => return GroupOutcome::Failed(self.broken(job, m, &e).await),
                    Err(_) => {
                        let unconfirmed = total - sent.len();
                        return GroupOutcome::Failed(
                            self.timed_out(job, m, unconfirmed, total).await,
                        );
                    }
                }
            }
        }
        crate::failpoint::hit("mid_publish");
        // Which batch each event belongs to, to place returned messages.
        let batch_of: HashMap<&str, usize> = sent
            .iter()
            .filter_map(|(b, m, _)| {
                m.properties
                    .message_id()
                    .as_ref()
                    .map(|id| (id.as_str(), *b))
            })
            .collect();
        let mut returned: Vec<Vec<BasicReturnMessage>> = group.iter().map(|_| Vec::new()).collect();
        let mut nacked: Vec<Vec<&Encoded>> = group.iter().map(|_| Vec::new()).collect();
        for (read, (b, m, confirm)) in sent.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {}
                Ok(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) => {
                    // Placed by the event it names, not by the confirm it
                    // came with. A nack that carries a return is explained
                    // by the return.
                    let owner = r
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|id| batch_of.get(id.as_str()).copied())
                        .unwrap_or(b);
                    returned[owner].push(r);
                }
                Ok(Ok(Confirmation::Nack(None))) => nacked[b].push(m),
                Ok(Ok(Confirmation::NotRequested)) => {
                    // Impossible after confirm.select; if it happened,
                    // nothing would be confirmed: never report success.
                    let job = &group[b];
                    self.shared.connector.discard(self.generation()).await;
                    return GroupOutcome::Failed(SinkError::Retriable(format!(
                        "rabbitmq exchange `{}`, routing key `{}`: stream `{}` batch {}: the channel is not in confirm mode; nothing was committed",
                        shared.connector.settings.exchange, m.routing_key, self.stream, job.seq
                    )));
                }
                Ok(Err(e)) => return GroupOutcome::Failed(self.broken(&group[b], m, &e).await),
                Err(_) => {
                    let unconfirmed = total - read;
                    return GroupOutcome::Failed(
                        self.timed_out(&group[b], m, unconfirmed, total).await,
                    );
                }
            }
        }
        if returned.iter().any(|r| !r.is_empty()) {
            // A declared queue or binding may have been deleted: declare the
            // topology again before the next attempt.
            shared.connector.redeclare_topology().await;
        }
        let verdicts = group
            .iter()
            .enumerate()
            .map(|(b, job)| {
                if !returned[b].is_empty() {
                    Some(self.unroutable(job, &returned[b]))
                } else if let Some(first) = nacked[b].first() {
                    Some(SinkError::Retriable(format!(
                        "rabbitmq exchange `{}`, routing key `{}`: the broker refused (nack) {} of the {} messages of stream `{}` batch {}, e.g. event {}; a queue may be full with x-overflow = reject-publish, or a quorum queue may have lost its majority. Nothing was committed; the batch will be published again",
                        shared.connector.settings.exchange,
                        first.routing_key,
                        nacked[b].len(),
                        job.messages.len(),
                        self.stream,
                        job.seq,
                        event_id(first)
                    )))
                } else {
                    None
                }
            })
            .collect();
        GroupOutcome::Judged(verdicts)
    }

    fn generation(&self) -> u64 {
        self.channel.as_ref().map_or(0, |c| c.generation)
    }

    fn unroutable(&self, job: &Job, returned: &[BasicReturnMessage]) -> SinkError {
        let exchange = &self.shared.connector.settings.exchange;
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
            "rabbitmq exchange `{exchange}`, routing key `{}`: {} of the {} messages of stream `{}` batch {} were returned unroutable ({} {}), e.g. event {id}{more}: no queue is bound to exchange `{exchange}` for these routing keys. Bind a queue (sink.declare_queues, or your consumers' bindings) or fix sink.routing_key. Nothing was committed; the batch will be published again",
            first.delivery.routing_key,
            returned.len(),
            job.messages.len(),
            self.stream,
            job.seq,
            first.reply_code,
            first.reply_text,
        ))
    }

    /// A publish or confirm failed with a lapin error: the channel (or the
    /// whole connection) is gone.
    async fn broken(&self, job: &Job, m: &Encoded, e: &lapin::Error) -> SinkError {
        let connector = &self.shared.connector;
        // A channel closed with NOT_FOUND means the exchange is gone:
        // declare it again on the next attempt.
        if matches!(e.kind(), ErrorKind::ProtocolError(a) if *a.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
        {
            connector.redeclare_topology().await;
        }
        let closed = self
            .channel
            .as_ref()
            .is_some_and(|c| !c.channel.status().connected());
        let lost = if closed {
            " (the channel is closed; the next attempt opens a new one, reconnecting if the connection is gone)"
        } else {
            ""
        };
        let message = format!(
            "rabbitmq exchange `{}`, routing key `{}`: publishing stream `{}` batch {} to {} failed: {}{lost}. Nothing was committed",
            connector.settings.exchange,
            m.routing_key,
            self.stream,
            job.seq,
            connector.settings.host_port,
            describe(e),
        );
        classify(e, message)
    }

    async fn timed_out(
        &self,
        job: &Job,
        m: &Encoded,
        unconfirmed: usize,
        total: usize,
    ) -> SinkError {
        let connector = &self.shared.connector;
        let generation = self.generation();
        let blocked = if connector.is_blocked(generation).await {
            " The broker has blocked this connection (a memory or disk alarm: `rabbitmqctl status`, `rabbitmq-diagnostics alarms`)."
        } else {
            " The broker may be overloaded, blocked by a resource alarm, or unreachable."
        };
        // The connection may be half-dead (heartbeats notice late): start
        // afresh.
        connector.discard(generation).await;
        SinkError::Retriable(format!(
            "rabbitmq exchange `{}`, routing key `{}`: {unconfirmed} of {total} messages (stream `{}`, up to batch {}) were not confirmed within {:?} (sink.confirm_timeout).{blocked} Nothing was committed; the batches will be published again on a new connection",
            connector.settings.exchange,
            m.routing_key,
            self.stream,
            job.seq,
            self.shared.confirm_timeout
        ))
    }
}

fn event_id(m: &Encoded) -> &str {
    m.properties
        .message_id()
        .as_ref()
        .map_or("", |s| s.as_str())
}

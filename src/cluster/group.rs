//! Membership of the Kafka consumer group that divides the streams.
//!
//! One `BaseConsumer` subscribes to the assignments topic (one partition
//! per stream; its records, the owners' claims, are read by [`super::owners`],
//! not here) on a thread of its own. librdkafka's group
//! protocol (JoinGroup/SyncGroup/Heartbeat, with a client-side assignor)
//! decides which member owns which partition; this module only turns its
//! rebalance callbacks into [`GroupEvent`]s for the coordinator:
//!
//! - an assignment is announced after librdkafka applied it;
//! - a revocation is announced *before* it is applied, and the callback
//!   waits until the coordinator has drained and released the streams (Kafka
//!   Connect's `onPartitionsRevoked`): the group does not hand a stream to
//!   another member while this one still publishes it. librdkafka keeps
//!   heartbeating meanwhile; the wait is bounded by `max.poll.interval.ms`.
//!
//! With `cooperative-sticky` (KIP-429) a rebalance revokes only the
//! partitions that move, so adding or removing an instance does not stop
//! the streams that stay where they are. With the eager strategies (`range`,
//! `roundrobin`) every rebalance revokes everything and assigns anew.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    time::Duration,
};

use rdkafka::{
    ClientContext,
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol},
    error::KafkaError,
};
use tokio::sync::mpsc;

use super::ClusterConfig;
use crate::sink::{SinkError, kafka::config::KafkaSinkConfig};

/// What the group tells the coordinator.
#[derive(Debug)]
pub enum GroupEvent {
    /// These partitions are now ours (incremental with cooperative
    /// rebalancing; the whole assignment with eager strategies).
    Assigned(Vec<i32>),
    /// These partitions are being taken away: stop their streams, let the
    /// in-flight batches be committed, then answer on the channel.
    Revoked {
        partitions: Vec<i32>,
        /// The group considered us dead (session timeout): another member
        /// may own them already.
        lost: bool,
        done: std_mpsc::SyncSender<()>,
    },
    /// A rebalance failed; librdkafka retries by itself.
    Error(String),
}

struct GroupContext {
    events: mpsc::UnboundedSender<GroupEvent>,
    topic: String,
    /// How long a revocation may wait for the streams to drain.
    revoke_wait: Duration,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", client = "group", facility = fac, "{message}")
            }
            _ => {
                tracing::debug!(target: "librdkafka", client = "group", facility = fac, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", client = "group", error = %error, "{reason}");
    }
}

impl GroupContext {
    fn partitions(&self, tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
        let mut v: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        v.sort_unstable();
        v
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let partitions = self.partitions(tpl);
                if partitions.is_empty() {
                    return;
                }
                let (done, wait) = std_mpsc::sync_channel(1);
                let lost = consumer.assignment_lost();
                tracing::info!(
                    ?partitions,
                    lost,
                    protocol = protocol(consumer),
                    "Partitions revoked; draining their streams."
                );
                if self
                    .events
                    .send(GroupEvent::Revoked {
                        partitions,
                        lost,
                        done,
                    })
                    .is_ok()
                    && wait.recv_timeout(self.revoke_wait).is_err()
                {
                    tracing::warn!(
                        "Streams did not drain within the revocation wait; releasing them anyway (their uncommitted pages are read again by the next owner)."
                    );
                }
            }
            Rebalance::Error(e) => {
                let _ = self.events.send(GroupEvent::Error(e.to_string()));
            }
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Nothing is ever read from these partitions: no fetching.
            if let Err(e) = consumer.pause(tpl) {
                tracing::debug!(error = %e, "Cannot pause the assigned partitions.");
            }
            let partitions = self.partitions(tpl);
            tracing::info!(
                ?partitions,
                protocol = protocol(consumer),
                "Partitions assigned."
            );
            let _ = self.events.send(GroupEvent::Assigned(partitions));
        }
    }
}

/// The group member's thread; stopped (leaving the group) by [`Member::stop`].
pub struct Member {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Member {
    /// Joins the group and starts polling. Rebalance events arrive on the
    /// returned channel.
    pub fn join(
        kafka: &KafkaSinkConfig,
        cluster: &ClusterConfig,
        instance_id: &str,
        revoke_wait: Duration,
    ) -> Result<(Member, mpsc::UnboundedReceiver<GroupEvent>), SinkError> {
        let topic = cluster.assignments_topic();
        let mut cc = kafka.consumer_config(false)?;
        let session = cluster.session_timeout.as_millis().max(1000);
        cc.set("group.id", &cluster.group)
            .set("client.id", instance_id)
            .set("session.timeout.ms", session.to_string())
            .set(
                "heartbeat.interval.ms",
                (session / 6).clamp(100, 3000).to_string(),
            )
            // The revocation waits for the streams to drain.
            .set(
                "max.poll.interval.ms",
                (revoke_wait.as_millis() + 60_000).max(300_000).to_string(),
            )
            .set(
                "partition.assignment.strategy",
                &cluster.assignment_strategy,
            )
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "500")
            .set("auto.offset.reset", "latest");
        let (tx, rx) = mpsc::unbounded_channel();
        let context = GroupContext {
            events: tx,
            topic: topic.clone(),
            revoke_wait,
        };
        let consumer: BaseConsumer<GroupContext> =
            cc.create_with_context(context).map_err(|e| {
                SinkError::Permanent(format!(
                    "cluster: cannot create the group consumer: {e}; check [sink.properties] and [cluster]"
                ))
            })?;
        consumer.subscribe(&[&topic]).map_err(|e| {
            SinkError::Permanent(format!(
                "cluster: cannot subscribe to `{topic}` in group `{}`: {e}",
                cluster.group
            ))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("graphdelta-group".to_string())
                .spawn(move || poll_loop(consumer, &stop))
                .map_err(|e| SinkError::Permanent(format!("cluster: cannot start a thread: {e}")))?
        };
        Ok((
            Member {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Leaves the group (the others rebalance at once rather than after the
    /// session timeout) and waits for the thread.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

fn protocol(consumer: &BaseConsumer<GroupContext>) -> &'static str {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => "cooperative",
        RebalanceProtocol::Eager => "eager",
        RebalanceProtocol::None => "none",
    }
}

fn poll_loop(consumer: BaseConsumer<GroupContext>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        // The topic's records are not read here (its partitions are
        // paused): polling serves the group protocol (rebalance callbacks)
        // and librdkafka's events.
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
            tracing::warn!(error = %e, "Group consumer error.");
        }
    }
    tracing::info!("Leaving the group.");
    // Dropping the consumer closes it: the last revocation runs (the
    // coordinator has stopped every stream by now) and it leaves the group.
    drop(consumer);
}

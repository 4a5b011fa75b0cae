//! At-least-once delivery, and the parts both modes share: handing records
//! to librdkafka in order and waiting for every delivery report, and
//! telling retriable failures from permanent ones.
//!
//! The producer is idempotent with `acks=all`: librdkafka retries a failed
//! send itself without reordering or duplicating records within a
//! partition, until `sink.delivery_timeout`. Only then does a delivery
//! report carry an error, and [`classify`] decides what the runtime hears:
//!
//! | librdkafka error | [`SinkError`] | why |
//! |---|---|---|
//! | message timed out, queue full, transport/broker down, not enough replicas, leader moved, request timed out, purged | `Retriable` | the cluster can recover; the batch is published again |
//! | topic/cluster/transactional-id authorization, SASL/SSL authentication | `Permanent` | an operator must grant access or fix credentials |
//! | message size too large, record/batch too large, invalid record | `Permanent` | the same record will never fit |
//! | unknown topic or partition (after creation), invalid topic or config, unsupported version | `Permanent` | the topic is gone or the cluster cannot take it |
//! | fatal idempotence error | `Retriable` | the producer is replaced; the batch is published again |
//! | fenced producer / invalid epoch, at-least-once | `Retriable` | no transactional id, so no other owner: the broker lost the idempotent state (records timed out in an outage); the producer is replaced |
//! | fenced producer (exactly-once) | `Fenced` | another instance owns the stream |
//!
//! Codes not listed count as retriable: a needless retry shows up in the
//! logs and the status page; a wrongly stopped stream needs an operator.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::future::join_all;
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};

use super::{config::KafkaSinkConfig, context::SinkContext, encoder::Record};

/// The sink's producer type.
pub type SinkProducer = FutureProducer<SinkContext>;
use crate::sink::SinkError;

/// What a failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Another attempt can succeed.
    Retriable,
    /// An operator must act.
    Permanent,
    /// The producer instance is unusable; a new one can succeed.
    Fatal,
    /// Another producer with the same `transactional.id` took over.
    Fenced,
}

/// Sorts a librdkafka error code (see the table in the module docs).
pub fn classify(code: RDKafkaErrorCode) -> Class {
    use RDKafkaErrorCode as C;
    match code {
        C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch => Class::Fenced,
        C::Fatal => Class::Fatal,
        C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::SSL
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::InvalidTopic
        | C::InvalidConfig
        | C::InvalidRequiredAcks
        | C::InvalidTimestamp
        | C::InvalidTransactionTimeout
        | C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicOrPartition
        | C::UnsupportedVersion
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType
        | C::PolicyViolation
        | C::InvalidArgument
        | C::NotImplemented
        | C::UnsupportedFeature
        | C::BadCompression => Class::Permanent,
        _ => Class::Retriable,
    }
}

/// The operator's next step for a permanent error.
fn fix_for(code: RDKafkaErrorCode, topic: &str) -> String {
    use RDKafkaErrorCode as C;
    match code {
        C::TopicAuthorizationFailed => format!(
            "the principal may not write to topic `{topic}`: grant it WRITE and DESCRIBE on the topic (kafka-acls --add --allow-principal User:<name> --operation Write --operation Describe --topic {topic}) or check the credentials in [sink.properties]/[sink.secret_properties]"
        ),
        C::ClusterAuthorizationFailed => "the idempotent producer needs IDEMPOTENT_WRITE on the cluster (brokers before Kafka 2.8): grant it to the principal".to_string(),
        C::TransactionalIdAuthorizationFailed => "the principal may not use its transactional id: grant WRITE and DESCRIBE on transactional ids with sink.transactional_id_prefix as a prefixed ACL".to_string(),
        C::SaslAuthenticationFailed | C::Authentication | C::SSL | C::UnsupportedSASLMechanism | C::IllegalSASLState =>
            "authentication failed: check security.protocol, sasl.* and ssl.* in [sink.properties] and the secrets in [sink.secret_properties]".to_string(),
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => format!(
            "a record is larger than the broker or producer accepts: raise the topic's max.message.bytes (sink.topic_config, or kafka-configs on `{topic}`) and \"message.max.bytes\" in [sink.properties], or narrow the stream's select"
        ),
        C::UnknownTopic | C::UnknownPartition | C::UnknownTopicOrPartition => format!(
            "topic `{topic}` does not exist although the sink checked or created it: was it deleted? Restart to create it again"
        ),
        C::UnsupportedVersion | C::UnsupportedForMessageFormat | C::UnsupportedFeature | C::NotImplemented =>
            "the cluster does not support what the sink needs (headers, idempotence, transactions: Kafka 0.11 or later, 2.5+ recommended)".to_string(),
        C::UnsupportedCompressionType | C::BadCompression => "the cluster refuses the configured compression.type: choose another in [sink.properties]".to_string(),
        _ => "check the sink configuration and the broker logs".to_string(),
    }
}

/// A failed send, already worded for the operator.
#[derive(Debug, Clone)]
pub struct Failure {
    pub class: Class,
    pub message: String,
}

impl Failure {
    /// A failure from librdkafka for a record of `topic`.
    pub fn from_kafka(error: &KafkaError, topic: &str) -> Self {
        Self::new(error, &format!("topic `{topic}`"), topic)
    }

    /// A failure of a transaction operation (`init_transactions`,
    /// `commit_transaction`, ...); `topic` is the one a fix would name.
    pub fn from_txn(error: &KafkaError, operation: &str, topic: &str) -> Self {
        Self::new(error, operation, topic)
    }

    fn new(error: &KafkaError, subject: &str, topic: &str) -> Self {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        let class = match error {
            KafkaError::Transaction(e) if e.is_fatal() && classify(code) != Class::Fenced => {
                Class::Fatal
            }
            KafkaError::Transaction(e) if e.is_retriable() || e.txn_requires_abort() => {
                match classify(code) {
                    Class::Permanent => Class::Permanent,
                    _ => Class::Retriable,
                }
            }
            _ => classify(code),
        };
        let message = match class {
            Class::Permanent => format!("{subject}: {error}: {}", fix_for(code, topic)),
            _ => format!("{subject}: {error}"),
        };
        Self { class, message }
    }

    /// Into the runtime's error; `Fatal` counts as retriable (the caller
    /// replaces the producer).
    pub fn into_sink_error(self, context: &str) -> SinkError {
        let message = format!("{context}: {}", self.message);
        match self.class {
            Class::Retriable | Class::Fatal => SinkError::Retriable(message),
            Class::Permanent => SinkError::Permanent(message),
            Class::Fenced => SinkError::Fenced(message),
        }
    }
}

/// Hands `records` to `producer` in order and waits for every delivery
/// report. `Ok` only when the broker acknowledged all of them.
///
/// Records are enqueued strictly in order; when librdkafka's queue is full
/// the oldest outstanding delivery is awaited before trying again, so a
/// later record never overtakes an earlier one. `enqueued` is called once
/// the last record is in librdkafka's queue (the caller may then let the
/// next batch of the stream enqueue behind it).
pub async fn produce_all(
    producer: &SinkProducer,
    records: &[Record],
    enqueued: impl FnOnce(),
) -> Result<(), Failure> {
    let mut pending: VecDeque<(usize, DeliveryFuture)> = VecDeque::with_capacity(records.len());
    let mut failures: Vec<(usize, Failure)> = Vec::new();
    'records: for (i, record) in records.iter().enumerate() {
        loop {
            match producer.send_result(future_record(record)) {
                Ok(delivery) => {
                    pending.push_back((i, delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Free a slot by waiting for our oldest record; if none
                    // of ours is outstanding, other streams fill the queue.
                    match pending.pop_front() {
                        Some((j, d)) => {
                            if let Err(f) = settle(d.await, &records[j]) {
                                failures.push((j, f));
                                break 'records;
                            }
                        }
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => {
                    failures.push((i, Failure::from_kafka(&e, &record.topic)));
                    break 'records;
                }
            }
        }
    }
    enqueued();
    crate::failpoint::hit("mid_publish");
    let rest = join_all(
        pending
            .into_iter()
            .map(|(i, d)| async move { (i, d.await) }),
    )
    .await;
    for (i, result) in rest {
        if let Err(f) = settle(result, &records[i]) {
            failures.push((i, f));
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    let failed = failures.len();
    // The most serious failure decides; the first of that kind is shown.
    let rank = |c: Class| match c {
        Class::Fenced => 0,
        Class::Permanent => 1,
        Class::Fatal => 2,
        Class::Retriable => 3,
    };
    failures.sort_by_key(|(i, f)| (rank(f.class), *i));
    let (_, first) = failures.swap_remove(0);
    Err(Failure {
        class: first.class,
        message: format!(
            "{failed} of {} records not acknowledged; first: {}",
            records.len(),
            first.message
        ),
    })
}

fn settle(
    result: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
    record: &Record,
) -> Result<(), Failure> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(Failure::from_kafka(&e, &record.topic)),
        Err(_) => Err(Failure {
            class: Class::Retriable,
            message: format!(
                "topic `{}`: the producer was closed before the delivery report",
                record.topic
            ),
        }),
    }
}

fn future_record(record: &Record) -> FutureRecord<'_, str, [u8]> {
    let mut r = FutureRecord::to(&record.topic).key(record.key.as_str());
    if let Some(v) = &record.value {
        r = r.payload(v.as_slice());
    }
    if !record.headers.is_empty() {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(&**v),
            });
        }
        r = r.headers(headers);
    }
    if let Some(ts) = record.timestamp_ms {
        r = r.timestamp(ts);
    }
    r
}

/// The at-least-once producer: one idempotent producer shared by every
/// stream.
pub struct AtLeastOnce {
    config: Arc<KafkaSinkConfig>,
    /// Replaced after a fatal error (the idempotent producer's sequence
    /// state is lost; only a new instance can continue).
    producer: RwLock<(u64, SinkProducer)>,
    /// Per stream: held while a batch enqueues, so that the batches of one
    /// stream enter librdkafka's queue in the order they were published.
    order: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AtLeastOnce {
    pub fn new(config: Arc<KafkaSinkConfig>) -> Result<Self, SinkError> {
        let producer = create_producer(&config, None)?;
        Ok(Self {
            config,
            producer: RwLock::new((0, producer)),
            order: Default::default(),
        })
    }

    /// The current producer and its generation.
    pub fn producer(&self) -> (u64, SinkProducer) {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends one batch's records; `Ok` once all are acknowledged.
    pub async fn send(&self, stream: &str, seq: u64, records: &[Record]) -> Result<(), SinkError> {
        let lock = {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            order.entry(stream.to_string()).or_default().clone()
        };
        let guard = lock.lock().await;
        let (generation, producer) = self.producer();
        let result = produce_all(&producer, records, move || drop(guard)).await;
        match result {
            Ok(()) => Ok(()),
            Err(f) => {
                // Without a transactional id nobody can fence this producer:
                // a refused epoch means the broker lost the idempotent
                // producer's state (records timed out during an outage and
                // librdkafka bumped the epoch; tansu answers ProducerFenced).
                // A new producer id publishes the batch again.
                let fenced = f.class == Class::Fenced;
                if fenced || f.class == Class::Fatal || producer.client().fatal_error().is_some() {
                    self.replace_after_fatal(generation, &producer);
                }
                let error = f.into_sink_error(&format!("kafka: stream `{stream}`, batch {seq}"));
                if fenced {
                    return Err(SinkError::Retriable(format!(
                        "{error} (not transactional: a new producer takes over)"
                    )));
                }
                Err(error)
            }
        }
    }

    fn replace_after_fatal(&self, generation: u64, failed: &SinkProducer) {
        let reason = failed
            .client()
            .fatal_error()
            .map(|(code, s)| format!("{code}: {s}"))
            .unwrap_or_else(|| "fatal error".to_string());
        match create_producer(&self.config, None) {
            Ok(fresh) => {
                let mut p = self.producer.write().unwrap_or_else(|p| p.into_inner());
                // Another batch may have replaced it already.
                if p.0 == generation {
                    *p = (generation + 1, fresh);
                }
                tracing::warn!(%reason, "The Kafka producer hit a fatal error and was replaced; the batch is published again.");
            }
            Err(e) => {
                tracing::error!(error = %e, %reason, "The Kafka producer hit a fatal error and cannot be replaced.")
            }
        }
    }

    /// Waits up to `timeout` for outstanding records.
    pub async fn flush(&self, timeout: Duration) {
        let (_, producer) = self.producer();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }
}

/// A producer with the sink's settings.
pub fn create_producer(
    config: &KafkaSinkConfig,
    transactional_id: Option<&str>,
) -> Result<SinkProducer, SinkError> {
    let client = if transactional_id.is_some() {
        "transactional-producer"
    } else {
        "producer"
    };
    config
        .producer_config(transactional_id)?
        .create_with_context::<_, SinkProducer>(SinkContext::new(client))
        .map_err(|e| {
            SinkError::Permanent(format!(
                "kafka: cannot create the producer: {e}; check [sink.properties]"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classification_follows_the_table() {
        use RDKafkaErrorCode as C;
        for c in [
            C::MessageTimedOut,
            C::QueueFull,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::NotEnoughReplicas,
            C::NotLeaderForPartition,
            C::RequestTimedOut,
            C::PurgeInflight,
        ] {
            assert_eq!(classify(c), Class::Retriable, "{c:?}");
        }
        for c in [
            C::TopicAuthorizationFailed,
            C::MessageSizeTooLarge,
            C::UnknownTopicOrPartition,
            C::InvalidConfig,
            C::SaslAuthenticationFailed,
        ] {
            assert_eq!(classify(c), Class::Permanent, "{c:?}");
        }
        assert_eq!(classify(C::Fenced), Class::Fenced);
        assert_eq!(classify(C::Fatal), Class::Fatal);
    }

    #[test]
    fn a_permanent_failure_names_the_topic_and_the_fix() {
        let f = Failure::from_kafka(
            &KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
            "graphdelta.t.users",
        );
        assert_eq!(f.class, Class::Permanent);
        assert!(f.message.contains("graphdelta.t.users"), "{}", f.message);
        assert!(f.message.contains("kafka-acls"), "{}", f.message);
        let e = f.into_sink_error("kafka: stream `users`, batch 3");
        assert!(matches!(e, SinkError::Permanent(_)));
    }
}

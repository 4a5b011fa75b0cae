//! Replaying a stream's Kafka topic: every partition from its beginning to
//! its end.
//!
//! The consumer reads with `isolation.level = read_committed`, so records
//! of aborted transactions (exactly-once mode) are never folded, and a
//! partition's end is its last stable offset. Partitions are assigned, not
//! subscribed: no consumer group, no offsets committed, nothing another
//! consumer would notice.
//!
//! A partition is finished at its high-water mark taken when the replay
//! starts (`ListOffsets`; for a `read_committed` consumer librdkafka asks
//! for the last stable offset), so a replay of a busy topic ends; or at
//! librdkafka's end-of-partition event, whichever comes first. The
//! high-water mark is trusted only if the first fetch of the partition
//! reports no higher one: tansu 0.6 (the broker of the tests) answers
//! `ListOffsets` with numbers that do not match the offsets its fetches
//! return (1 for a partition holding 100 records), and stopping there would
//! lose records. An untrusted partition is read to its end of partition,
//! so records appended while the replay runs may be folded too (never a
//! correctness problem; stop the connector for a fixed end).
//!
//! Values are decoded as the sink wrote them (`sink.wire_format`): the bare
//! `ChangeEvent` protobuf, or behind the Confluent framing (magic byte 0,
//! 4-byte schema id, message-index list). A null value is a tombstone.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use prost::Message as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
};

use super::{Record, ReplayError, Source};
use crate::{
    proto::v1::ChangeEvent,
    sink::kafka::{KafkaSinkConfig, WireFormat, context::SinkContext},
};

/// How long the reader waits for any record or end of partition before it
/// reports the broker as stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens `topic` for reading; fails at once if the brokers cannot be
/// reached or the topic does not exist.
pub async fn open(config: KafkaSinkConfig, topic: String) -> Result<Source, ReplayError> {
    tokio::task::spawn_blocking(move || open_blocking(config, topic))
        .await
        .map_err(|e| ReplayError::Source(format!("kafka reader: {e}")))?
}

fn open_blocking(config: KafkaSinkConfig, topic: String) -> Result<Source, ReplayError> {
    let brokers = config.brokers.trim().to_string();
    let context = |what: &str, e: KafkaError| source_error(&brokers, &topic, what, e);
    let mut client = config
        .consumer_config(true)
        .map_err(|e| ReplayError::Config(e.to_string()))?;
    // Assigned, never subscribed or committed: the id only names the client.
    client.set("group.id", "graphdelta-replay");
    client.set("client.id", "graphdelta-replay");
    let consumer: BaseConsumer<SinkContext> = client
        .create_with_context(SinkContext::new("replay"))
        .map_err(|e| ReplayError::Config(format!("kafka: cannot create a consumer: {e}")))?;
    let timeout = config.startup_timeout.max(Duration::from_secs(5));
    let md = consumer
        .fetch_metadata(Some(&topic), timeout)
        .map_err(|e| context("metadata", e))?;
    let found = md.topics().iter().find(|t| t.name() == topic);
    let partitions: Vec<i32> = match found {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            t.partitions().iter().map(|p| p.id()).collect()
        }
        _ => {
            return Err(ReplayError::Config(format!(
                "topic `{topic}` does not exist on kafka brokers {brokers}: check sink.topic and --stream, or run the connector first"
            )));
        }
    };
    // The end of each partition at start (see the module docs for when it
    // is trusted).
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut total = 0u64;
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, timeout)
            .map_err(|e| context(&format!("partition {p} watermarks"), e))?;
        total += high.saturating_sub(low).max(0) as u64;
        ends.insert(p, high);
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .map_err(|e| context("assign", e))?;
    }
    let description = format!(
        "topic `{topic}` ({} partition{})",
        partitions.len(),
        if partitions.len() == 1 { "" } else { "s" },
    );
    let (tx, source) = Source::channel(description, Some(total));
    consumer.assign(&tpl).map_err(|e| context("assign", e))?;
    let mut left: HashSet<i32> = partitions.into_iter().collect();
    let framed = config.wire_format == WireFormat::Confluent;
    std::thread::Builder::new()
        .name("replay-kafka".into())
        .spawn(move || {
            let mut last_progress = Instant::now();
            let mut trusted: HashMap<i32, bool> = HashMap::new();
            while !left.is_empty() {
                let record = match consumer.poll(Duration::from_millis(500)) {
                    None => {
                        if last_progress.elapsed() > STALL_TIMEOUT {
                            let mut left: Vec<i32> = left.iter().copied().collect();
                            left.sort_unstable();
                            let _ = tx.blocking_send(Err(ReplayError::Source(format!(
                                "kafka brokers {brokers}: topic `{topic}`: no record from partition(s) {left:?} for {}s although they hold more; is the broker up?",
                                STALL_TIMEOUT.as_secs()
                            ))));
                            return;
                        }
                        continue;
                    }
                    Some(Err(KafkaError::PartitionEOF(p))) => {
                        left.remove(&p);
                        last_progress = Instant::now();
                        continue;
                    }
                    Some(Err(e)) => {
                        let _ = tx.blocking_send(Err(source_error(&brokers, &topic, "consume", e)));
                        return;
                    }
                    Some(Ok(m)) => {
                        last_progress = Instant::now();
                        let p = m.partition();
                        if !left.contains(&p) {
                            // Appended after this partition's end was reached.
                            continue;
                        }
                        let end = ends.get(&p).copied().unwrap_or(i64::MAX);
                        let trusted = *trusted.entry(p).or_insert_with(|| {
                            fetched_high_watermark(&consumer, &topic, p)
                                .is_some_and(|fetched| fetched <= end)
                        });
                        if trusted && m.offset() >= end {
                            // Appended after the replay started.
                            left.remove(&p);
                            continue;
                        }
                        if trusted && m.offset() + 1 >= end {
                            left.remove(&p);
                        }
                        decode(m.payload(), framed).map_err(|why| {
                            ReplayError::Decode(format!(
                                "topic `{topic}` partition {p} offset {}: {why}",
                                m.offset()
                            ))
                        })
                    }
                };
                let stop = record.is_err();
                if tx.blocking_send(record).is_err() || stop {
                    return;
                }
            }
        })
        .map_err(|e| ReplayError::Source(format!("cannot start the kafka reader: {e}")))?;
    Ok(source)
}

/// The high-water mark of `partition` as the last fetch response reported
/// it (librdkafka's cached value; no request is made). rust-rdkafka does
/// not wrap `rd_kafka_get_watermark_offsets`, hence the direct call.
fn fetched_high_watermark(
    consumer: &BaseConsumer<SinkContext>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle is valid while `consumer` lives, the topic
    // is a NUL-terminated string that outlives the call, and the two out
    // pointers are valid i64s; the function only reads librdkafka's cached
    // partition state.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

fn source_error(brokers: &str, topic: &str, what: &str, e: KafkaError) -> ReplayError {
    ReplayError::Source(format!(
        "kafka brokers {brokers}: topic `{topic}`: {what}: {e}"
    ))
}

/// A record's value as the sink wrote it.
pub fn decode(value: Option<&[u8]>, framed: bool) -> Result<Record, String> {
    let Some(mut bytes) = value else {
        return Ok(Record::Tombstone);
    };
    if framed {
        bytes = strip_confluent_framing(bytes)?;
    }
    ChangeEvent::decode(bytes)
        .map(|e| Record::Event(Box::new(e)))
        .map_err(|e| {
            format!(
                "not a graphdelta.v1.ChangeEvent ({e}); does sink.wire_format (`{}`) match what the connector wrote?",
                if framed { "confluent" } else { "raw" }
            )
        })
}

/// Skips the Confluent framing: magic byte 0, the 4-byte schema id, and the
/// message-index list (a single 0 byte for the first message, otherwise a
/// zig-zag varint count and as many zig-zag varint indexes).
fn strip_confluent_framing(bytes: &[u8]) -> Result<&[u8], String> {
    let bad = || {
        "no Confluent framing (magic byte 0, schema id, message indexes); is sink.wire_format right?"
            .to_string()
    };
    if bytes.len() < 6 || bytes[0] != 0 {
        return Err(bad());
    }
    let mut rest = &bytes[5..];
    let varint = |rest: &mut &[u8]| -> Result<i64, String> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let (&b, tail) = rest.split_first().ok_or_else(bad)?;
            *rest = tail;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(((n >> 1) as i64) ^ -((n & 1) as i64));
            }
        }
        Err(bad())
    };
    let count = varint(&mut rest)?;
    for _ in 0..count {
        varint(&mut rest)?;
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::kafka::registry::encode_message_indexes;

    #[test]
    fn decodes_raw_framed_and_tombstones() {
        let event = ChangeEvent {
            event_id: "e".into(),
            object_id: "o".into(),
            object_version: 3,
            ..Default::default()
        };
        let raw = event.encode_to_vec();
        let Record::Event(e) = decode(Some(&raw), false).unwrap() else {
            panic!("an event")
        };
        assert_eq!(*e, event);
        for indexes in [vec![0], vec![2], vec![1, 300]] {
            let mut framed = vec![0, 0, 0, 1, 7];
            framed.extend(encode_message_indexes(&indexes));
            framed.extend(&raw);
            let Record::Event(e) = decode(Some(&framed), true).unwrap() else {
                panic!("an event")
            };
            assert_eq!(*e, event, "indexes {indexes:?}");
        }
        assert!(matches!(decode(None, true).unwrap(), Record::Tombstone));
        let err = decode(Some(&raw), true).unwrap_err();
        assert!(err.contains("wire_format"), "{err}");
    }
}

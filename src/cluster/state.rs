//! The shared state topic: every stream's checkpoint and memory, in Kafka,
//! so that any instance of the group can take a stream over.
//!
//! # Records
//! A compacted topic; a stream's records all go to one partition (xxh3 of
//! the stream name modulo the partition count), keyed so that compaction
//! keeps exactly the current memory:
//!
//! | key | value |
//! |---|---|
//! | `{stream}/cp` | the `StreamCheckpoint` |
//! | `{stream}/o/{object id}` | the object's `ObjectState` (null: forgotten) |
//! | `{stream}/m/{group}/{relationship}/{member}` | a `BatchState.MemberWrite` (null: removed) |
//!
//! Keys per object keep each record small and the topic's compacted size
//! proportional to the directory (the same order as the embedded store),
//! where one record per stream would rewrite the whole memory per batch.
//!
//! # Order of writes, and why a crash loses nothing
//! [`StateMirror`] runs inside [`Store::commit`](crate::checkpoint::Store::commit),
//! i.e. after the sink acknowledged the batch's events: the batch's memory
//! records first, the checkpoint record last, all to one partition with the
//! idempotent producer (so in order), and only when Kafka acknowledged all of
//! them is the local SQLite store committed. If the owner dies half way, the
//! topic holds the previous checkpoint with some objects already at their
//! new state: their events were acknowledged before, so when the next owner
//! reads the batch's page again, those objects compare equal (no event, and
//! nothing was lost: the event is already in the topic), and the others are
//! announced again with the same event ids as before.
//!
//! A group that is hard-deleted forgets all its memberships at once; the
//! mirror turns that into one tombstone per membership the store remembers.
//!
//! # Taking a stream over
//! [`load`] reads the stream's partition from the beginning to its end (as
//! the fetch responses report it; later records can only come from an owner
//! the group already replaced), keeps the newest value per key and
//! [`seed`] rebuilds the local store from it. The whole memory of one stream
//! passes through this process's memory once per takeover.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use prost::Message as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    producer::FutureRecord,
};

use crate::{
    checkpoint::{self, CheckpointError, CommitMirror, Store},
    normalize::memory::{MemberKey, MemberRow, StateWrites},
    proto::v1::{ObjectState, StreamCheckpoint, batch_state::MemberWrite},
    sink::kafka::{
        config::KafkaSinkConfig,
        context::SinkContext,
        producer::{SinkProducer, create_producer},
    },
};

/// The state topic partition of `stream`.
pub fn partition_of(stream: &str, partitions: i32) -> i32 {
    (xxhash_rust::xxh3::xxh3_64(stream.as_bytes()) % partitions.max(1) as u64) as i32
}

fn checkpoint_key(stream: &str) -> String {
    format!("{stream}/cp")
}

fn object_key(stream: &str, id: &str) -> String {
    format!("{stream}/o/{id}")
}

fn member_key(stream: &str, k: &MemberKey) -> String {
    format!("{stream}/m/{}/{}/{}", k.group, k.relationship, k.member)
}

/// A state record: key and value (`None`: a tombstone).
pub type StateRecord = (String, Option<Vec<u8>>);

/// The records that make the topic hold `writes` and then `checkpoint`.
pub fn records(
    store: &Store,
    stream: &str,
    checkpoint: &StreamCheckpoint,
    writes: &StateWrites,
) -> Result<Vec<StateRecord>, CheckpointError> {
    let mut out = Vec::with_capacity(writes.objects.len() + writes.members.len() + 1);
    // Forgotten groups first: their memberships as the store knows them,
    // unless this batch writes them again.
    for group in &writes.forgotten_groups {
        for key in store.members_of(group)? {
            if !writes.members.contains_key(&key) {
                out.push((member_key(stream, &key), None));
            }
        }
    }
    for (id, state) in &writes.objects {
        out.push((
            object_key(stream, id),
            state.as_ref().map(|s| s.encode_to_vec()),
        ));
    }
    for (key, row) in &writes.members {
        let value = row.as_ref().map(|r| {
            MemberWrite {
                group_id: key.group.clone(),
                relationship: key.relationship.clone(),
                member_id: key.member.clone(),
                present: true,
                member_type: r.member_type.clone(),
                seen_round: r.seen_round,
            }
            .encode_to_vec()
        });
        out.push((member_key(stream, key), value));
    }
    out.push((checkpoint_key(stream), Some(checkpoint.encode_to_vec())));
    Ok(out)
}

/// Writes every commit of a stream's store to the state topic first.
pub struct StateMirror {
    producer: SinkProducer,
    topic: Arc<str>,
    partition: i32,
    stream: String,
}

impl StateMirror {
    pub fn new(
        config: &KafkaSinkConfig,
        topic: &str,
        partitions: i32,
        stream: &str,
    ) -> Result<Self, String> {
        let producer = create_producer(config, None).map_err(|e| e.to_string())?;
        Ok(Self {
            producer,
            topic: Arc::from(topic),
            partition: partition_of(stream, partitions),
            stream: stream.to_string(),
        })
    }
}

impl CommitMirror for StateMirror {
    fn before_commit(
        &mut self,
        store: &Store,
        checkpoint: &StreamCheckpoint,
        writes: &StateWrites,
    ) -> Result<(), String> {
        let records =
            records(store, &self.stream, checkpoint, writes).map_err(|e| e.to_string())?;
        send_all(&self.producer, &self.topic, self.partition, &records).map_err(|e| {
            format!(
                "cluster state topic `{}` (partition {}): {e}; the checkpoint was not committed (the stream is taken up again from its last one)",
                self.topic, self.partition
            )
        })
    }
}

/// Sends `records` to one partition, in order, and waits for every ack.
/// Blocking (called inside the store's commit, off the async workers).
fn send_all(
    producer: &SinkProducer,
    topic: &str,
    partition: i32,
    records: &[StateRecord],
) -> Result<(), KafkaError> {
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        loop {
            let mut r = FutureRecord::<str, [u8]>::to(topic)
                .key(key.as_str())
                .partition(partition);
            if let Some(v) = value {
                r = r.payload(v.as_slice());
            }
            match producer.send_result(r) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for delivery in pending {
        match futures::executor::block_on(delivery) {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

/// What the state topic holds for one stream.
#[derive(Debug, Default)]
pub struct Seed {
    /// `None`: the stream never committed a checkpoint.
    pub checkpoint: Option<StreamCheckpoint>,
    pub writes: StateWrites,
    /// Records read (all streams of the partition).
    pub records_read: u64,
}

/// Reads `stream`'s state from the topic. Blocking.
pub fn load(
    config: &KafkaSinkConfig,
    topic: &str,
    partitions: i32,
    stream: &str,
    timeout: Duration,
) -> Result<Seed, String> {
    let partition = partition_of(stream, partitions);
    let context = format!(
        "cluster: reading stream `{stream}`'s state from topic `{topic}` partition {partition}"
    );
    let deadline = std::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let consumer: BaseConsumer<SinkContext> = config
        .consumer_config(false)
        .map_err(|e| format!("{context}: {e}"))?
        .create_with_context(SinkContext::new("state-reader"))
        .map_err(|e| format!("{context}: cannot create a consumer: {e}"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, left())
        .map_err(|e| format!("{context}: high-water mark: {e}"))?;
    let mut seed = Seed::default();
    if high <= low {
        return Ok(seed);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| format!("{context}: assign: {e}"))?;
    let prefix = format!("{stream}/");
    let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    // Read to the end of the partition as the fetch responses report it
    // (not to the ListOffsets high-water mark: tansu 0.6 answers the base
    // offset of the last record batch + 1 there, short of the batch's
    // later records).
    loop {
        if left().is_zero() {
            return Err(format!(
                "{context}: the end of the partition was not reached within {} ({} records read)",
                humantime::format_duration(timeout),
                seed.records_read
            ));
        }
        match consumer.poll(left().min(Duration::from_millis(500))) {
            None => {}
            Some(Ok(m)) => {
                seed.records_read += 1;
                if let Some(key) = m.key()
                    && key.starts_with(prefix.as_bytes())
                {
                    latest.insert(
                        key[prefix.len()..].to_vec(),
                        m.payload().map(<[u8]>::to_vec),
                    );
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(format!("{context}: {e}")),
        }
    }
    for (key, value) in latest {
        let Some(value) = value else { continue };
        let key = String::from_utf8_lossy(&key);
        let bad = |e: prost::DecodeError| {
            format!(
                "{context}: record `{stream}/{key}` does not decode ({e}); is the state topic shared with something else?"
            )
        };
        if key == "cp" {
            seed.checkpoint = Some(StreamCheckpoint::decode(value.as_slice()).map_err(bad)?);
        } else if let Some(id) = key.strip_prefix("o/") {
            let state = ObjectState::decode(value.as_slice()).map_err(bad)?;
            seed.writes.new_objects.insert(id.to_string());
            seed.writes.objects.insert(id.to_string(), Some(state));
        } else if key.starts_with("m/") {
            let m = MemberWrite::decode(value.as_slice()).map_err(bad)?;
            seed.writes.members.insert(
                MemberKey {
                    group: m.group_id,
                    relationship: m.relationship,
                    member: m.member_id,
                },
                Some(MemberRow {
                    member_type: m.member_type,
                    seen_round: m.seen_round,
                }),
            );
        }
    }
    Ok(seed)
}

/// Replaces the stream's local store with `seed`; returns it open. A store
/// already at the seed's checkpoint is kept as it is (this instance was the
/// last owner and nothing moved since).
pub fn seed(dir: &Path, stream: &str, seed: &Seed) -> Result<Store, CheckpointError> {
    {
        let store = Store::open(dir, stream)?;
        if store.load_checkpoint()? == seed.checkpoint {
            return Ok(store);
        }
    }
    checkpoint::reset(dir, stream)?;
    let mut store = Store::open(dir, stream)?;
    if let Some(cp) = &seed.checkpoint {
        store.commit(cp, &seed.writes)?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_cover_writes_and_end_with_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "groups").unwrap();
        let key = |m: &str| MemberKey {
            group: "g1".into(),
            relationship: "members".into(),
            member: m.into(),
        };
        let row = MemberRow {
            member_type: "microsoft.graph.user".into(),
            seen_round: 1,
        };
        let mut first = StateWrites::default();
        first
            .objects
            .insert("g1".into(), Some(ObjectState::default()));
        first.members.insert(key("u1"), Some(row.clone()));
        first.members.insert(key("u2"), Some(row.clone()));
        store.commit(&StreamCheckpoint::default(), &first).unwrap();

        // The group is deleted and re-created with u2 in the same batch.
        let mut next = StateWrites::default();
        next.forget_group("g1");
        next.members.insert(key("u2"), Some(row));
        next.objects.insert("g2".into(), None);
        let cp = StreamCheckpoint {
            batch_seq: 2,
            ..Default::default()
        };
        let recs = records(&store, "groups", &cp, &next).unwrap();
        let keys: Vec<&str> = recs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(recs.last().unwrap().0, "groups/cp");
        assert!(keys.contains(&"groups/m/g1/members/u1"));
        assert!(
            recs.iter()
                .any(|(k, v)| k == "groups/m/g1/members/u1" && v.is_none())
        );
        assert!(
            recs.iter()
                .any(|(k, v)| k == "groups/m/g1/members/u2" && v.is_some())
        );
        assert!(recs.iter().any(|(k, v)| k == "groups/o/g2" && v.is_none()));
        assert_eq!(
            keys.iter().filter(|k| k.contains("/u2")).count(),
            1,
            "a membership written again is not also tombstoned"
        );
    }

    #[test]
    fn a_stream_keeps_its_partition() {
        let p = partition_of("users", 12);
        assert!((0..12).contains(&p));
        assert_eq!(p, partition_of("users", 12));
        assert_eq!(partition_of("users", 1), 0);
    }
}

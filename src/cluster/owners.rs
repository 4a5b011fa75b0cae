//! Who owns which stream, for `/status` on every instance.
//!
//! The group protocol tells each member only its own partitions (brokers
//! describe the others through DescribeGroups, which tansu 0.6 answers
//! without assignments). So each owner also announces itself: when it takes
//! a stream over it writes a record to the stream's partition of the
//! assignments topic (key = stream name, value = instance id), and when it
//! releases the stream, one without a value. Every instance tails that
//! topic (a plain consumer, no group) and builds the cluster view from the
//! newest record per partition. A claim is written after the group assigned
//! the partition and a release before the partition is handed on, so per
//! partition the records come in ownership order; a crashed owner's claim
//! stays until the next owner's replaces it.
//!
//! A claim whose stream name is not this instance's stream for that
//! partition means two instances run different stream lists (partition *i*
//! is the *i*-th stream by name): that is logged as an error.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    producer::FutureRecord,
};

use crate::{
    runtime::status::{ClusterMember, StatusRegistry},
    sink::kafka::{
        config::KafkaSinkConfig,
        context::SinkContext,
        producer::{SinkProducer, create_producer},
    },
};

/// Writes claims and releases.
pub struct Claims {
    producer: SinkProducer,
    topic: String,
    /// Stream names in partition order.
    names: Vec<String>,
    instance_id: String,
}

impl Claims {
    pub fn new(
        kafka: &KafkaSinkConfig,
        topic: &str,
        names: &[String],
        instance_id: &str,
    ) -> Result<Self, String> {
        Ok(Self {
            producer: create_producer(kafka, None).map_err(|e| e.to_string())?,
            topic: topic.to_string(),
            names: names.to_vec(),
            instance_id: instance_id.to_string(),
        })
    }

    /// Announces that this instance runs `stream` (`owned`) or no longer
    /// does. A failure is logged: the view is informational.
    pub async fn announce(&self, stream: &str, owned: bool) {
        let Some(partition) = self.names.iter().position(|n| n == stream) else {
            return;
        };
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
            .key(stream)
            .partition(partition as i32);
        if owned {
            record = record.payload(self.instance_id.as_bytes());
        }
        if let Err((e, _)) = self.producer.send(record, Duration::from_secs(5)).await {
            tracing::warn!(stream, error = %e, "Could not announce the stream's owner; /status of other instances may be stale.");
        }
    }
}

/// Tails the assignments topic into the `members` of `/status` until the
/// returned flag is set.
pub fn watch(
    kafka: &KafkaSinkConfig,
    topic: &str,
    names: &[String],
    status: StatusRegistry,
) -> Result<Arc<AtomicBool>, String> {
    let consumer: BaseConsumer<SinkContext> = kafka
        .consumer_config(false)
        .map_err(|e| e.to_string())?
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "500")
        .create_with_context(SinkContext::new("owners-reader"))
        .map_err(|e| format!("cluster: cannot create the owners reader: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..names.len() {
        tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| format!("cluster: cannot read `{topic}`: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let names = names.to_vec();
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("graphdelta-owners".to_string())
        .spawn(move || {
            // Partition → (stream, owner).
            let mut owners: BTreeMap<i32, (String, Option<String>)> = BTreeMap::new();
            let mut warned = false;
            while !flag.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        let stream = m
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .unwrap_or_default();
                        let mine = names.get(m.partition() as usize);
                        if mine != Some(&stream) && !warned {
                            warned = true;
                            tracing::error!(
                                partition = m.partition(),
                                announced = %stream,
                                expected = ?mine,
                                "Another instance of the group runs a different list of streams (partition i is the i-th stream by name): streams may run twice or not at all. Deploy the same connector file to every instance."
                            );
                        }
                        let owner = m.payload().map(|p| String::from_utf8_lossy(p).into_owned());
                        owners.insert(m.partition(), (stream, owner));
                        status.update_cluster(|c| c.members = members(&owners));
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "Owners reader error.");
                    }
                }
            }
        })
        .map_err(|e| format!("cluster: cannot start a thread: {e}"))?;
    Ok(stop)
}

/// Instances and their streams, by instance id.
fn members(owners: &BTreeMap<i32, (String, Option<String>)>) -> Vec<ClusterMember> {
    let mut by_owner: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (stream, owner) in owners.values() {
        if let Some(owner) = owner {
            by_owner.entry(owner).or_default().push(stream.clone());
        }
    }
    by_owner
        .into_iter()
        .map(|(instance_id, mut streams)| {
            streams.sort();
            ClusterMember {
                instance_id: instance_id.to_string(),
                streams,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_claim_per_partition_makes_the_view() {
        let mut owners = BTreeMap::new();
        owners.insert(0, ("a".to_string(), Some("i2".to_string())));
        owners.insert(1, ("b".to_string(), Some("i1".to_string())));
        owners.insert(2, ("c".to_string(), None));
        owners.insert(3, ("d".to_string(), Some("i2".to_string())));
        let m = members(&owners);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].instance_id, "i1");
        assert_eq!(m[0].streams, ["b"]);
        assert_eq!(m[1].streams, ["a", "d"]);
    }
}

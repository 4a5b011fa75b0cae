//! Shared by the Kafka tests: the broker under test, random names, a reader
//! that reads a whole topic back, and event builders.
//!
//! Like rust-rdkafka's `tests/utils.rs`, every test uses its own random
//! topic names, so tests run in parallel against one broker.

#![allow(dead_code)]

use std::{
    collections::{HashMap, HashSet},
    net::{TcpStream, ToSocketAddrs},
    time::{Duration, Instant},
};

use graphdelta::{
    proto::v1::{ChangeEvent, ChangeType, StreamCheckpoint},
    sink::{OutBatch, kafka::KafkaSinkConfig},
};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::Headers,
};

/// The Kafka-compatible broker `scripts/test` started (tansu). Panics with
/// the fix when it is not set or not reachable: these tests never skip.
pub fn test_brokers() -> String {
    let brokers = std::env::var("GRAPHDELTA_TEST_KAFKA").unwrap_or_else(|_| {
        panic!(
            "GRAPHDELTA_TEST_KAFKA is not set: run the tests with scripts/test, or start a broker (tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/) and export GRAPHDELTA_TEST_KAFKA=127.0.0.1:9092"
        )
    });
    assert_reachable(&brokers, "GRAPHDELTA_TEST_KAFKA");
    brokers
}

/// Panics unless the first broker of `brokers` accepts a TCP connection.
pub fn assert_reachable(brokers: &str, var: &str) {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let addrs: Vec<_> = first
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("{var}={brokers}: cannot resolve `{first}`: {e}"))
        .collect();
    let ok = addrs
        .iter()
        .any(|a| TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok());
    assert!(
        ok,
        "{var}={brokers}: nothing listens at `{first}`; start the broker (scripts/test does) or fix the variable"
    );
}

/// A topic or id nobody else uses: `<prefix>-<random>`.
pub fn rand_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A sink configuration for `brokers` with `extra` TOML lines.
pub fn sink_config(brokers: &str, extra: &str) -> KafkaSinkConfig {
    let text = format!("brokers = \"{brokers}\"\n{extra}");
    let config: KafkaSinkConfig = toml::from_str(&text).expect("test sink config parses");
    config
}

/// An event of `stream` in tenant `contoso.onmicrosoft.com`.
pub fn event(stream: &str, object_id: &str, change: ChangeType, version: u64) -> ChangeEvent {
    ChangeEvent {
        event_id: format!("{stream}:{object_id}:{version}"),
        tenant_id: "contoso.onmicrosoft.com".into(),
        stream: stream.into(),
        resource: "users".into(),
        object_type: "microsoft.graph.user".into(),
        object_id: object_id.into(),
        change_type: change as i32,
        object_version: version,
        changed_properties: vec!["displayName".into()],
        observed_at: Some(pbjson_types::Timestamp {
            seconds: 1_700_000_000 + version as i64,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A checkpoint for batch `seq` of `stream`.
pub fn checkpoint(stream: &str, seq: u64) -> StreamCheckpoint {
    StreamCheckpoint {
        stream: stream.into(),
        batch_seq: seq,
        link: format!("https://graph.example/delta?page={seq}"),
        ..Default::default()
    }
}

/// Borrows the parts of a batch.
pub fn out_batch<'a>(
    stream: &'a str,
    seq: u64,
    events: &'a [ChangeEvent],
    cp: &'a StreamCheckpoint,
    writes: &'a graphdelta::normalize::memory::StateWrites,
) -> OutBatch<'a> {
    OutBatch {
        stream,
        seq,
        events,
        checkpoint: cp,
        writes,
    }
}

/// One record read back.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| {
                panic!(
                    "record {}@{} has no `{name}` header",
                    self.partition, self.offset
                )
            })
    }
}

/// The partitions of `topic` per the cluster's metadata (`0` if missing).
pub fn partition_count(brokers: &str, topic: &str) -> usize {
    let consumer = consumer(brokers, false);
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .sum()
}

fn consumer(brokers: &str, read_committed: bool) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", rand_name("graphdelta-test-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("auto.offset.reset", "earliest")
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .expect("test consumer")
}

/// Every record of `topic`, in partition then offset order, read until each
/// partition reports its end.
pub fn read_topic(brokers: &str, topic: &str, read_committed: bool) -> Vec<Received> {
    let partitions = partition_count(brokers, topic);
    assert!(partitions > 0, "topic `{topic}` does not exist");
    let consumer = consumer(brokers, read_committed);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut eof = HashSet::new();
    let mut out = Vec::new();
    while eof.len() < partitions {
        assert!(
            Instant::now() < deadline,
            "reading `{topic}` did not reach the end of every partition within 30s"
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for header in h.iter() {
                        headers.insert(
                            header.key.to_string(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Received {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            Some(Err(e)) => panic!("reading `{topic}`: {e}"),
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

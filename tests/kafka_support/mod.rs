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
        event_count: events.len(),
        events,
        checkpoint: cp,
        writes,
        encoded: None,
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

// ---- The connector end to end: the Graph simulator, a connector file, and
// ---- the topics folded back into the simulator's ground truth.

use std::{collections::BTreeSet, path::Path};

use graphdelta::{
    checkpoint::Store,
    config::Config,
    replay::{Materializer, ObjectStatus},
    simulator::{GroundTruth, ObjectState, SimConfig, SimHandle, Simulator, TruthObject},
};
use prost::Message as _;
use serde_json::{Map, Value};

/// The variable the connector files name for the client secret (the same
/// one `tests/common` uses, with the same value).
pub const SECRET_ENV: &str = "GRAPHDELTA_TEST_CLIENT_SECRET";

pub fn set_secret() {
    // SAFETY: every test sets the same value; nothing can observe a torn
    // write.
    unsafe { std::env::set_var(SECRET_ENV, "simulator-secret") };
}

/// Properties the streams select (and the truth is compared on).
pub const USER_SELECT: &[&str] = &[
    "displayName",
    "givenName",
    "surname",
    "jobTitle",
    "department",
    "accountEnabled",
];
pub const GROUP_SELECT: &[&str] = &["displayName", "description", "members"];

/// A simulated tenant served on a free loopback port.
pub async fn start_simulator(cfg: SimConfig) -> (Simulator, SimHandle) {
    let simulator = Simulator::new(cfg);
    let handle = simulator
        .clone()
        .spawn(([127, 0, 0, 1], 0).into())
        .await
        .expect("simulator listens");
    (simulator, handle)
}

/// The `[graph]` table of a connector reading the simulator (the secret
/// comes from [`SECRET_ENV`]); more keys of that table may follow it.
pub fn graph_toml(handle: &SimHandle) -> String {
    format!(
        r#"[graph]
base_url = "{base}"
token_url = "{token}"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_env = "{SECRET_ENV}"
"#,
        base = handle.base_url(),
        token = handle.token_url(),
    )
}

/// A TOML array of strings, without its brackets: `"a", "b"`.
pub fn toml_list(v: &[&str]) -> String {
    v.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A connector file: streams `users` and `groups` of the simulator, the
/// given `[sink]` table, the store under `dir/state`.
pub fn connector_toml(handle: &SimHandle, dir: &Path, sink: &str) -> String {
    set_secret();
    format!(
        r#"
{graph}
[[streams]]
name = "users"
resource = "users"
select = [{users}]
poll_interval = "1s"

[[streams]]
name = "groups"
resource = "groups"
select = [{groups}]
poll_interval = "1s"

{sink}

[checkpoint]
path = "{state}"

[runtime]
retry_min = "10ms"
retry_max = "100ms"
"#,
        graph = graph_toml(handle),
        users = toml_list(USER_SELECT),
        groups = toml_list(GROUP_SELECT),
        state = dir.join("state").display(),
    )
}

pub fn connector(handle: &SimHandle, dir: &Path, sink: &str) -> Config {
    let text = connector_toml(handle, dir, sink);
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// The committed checkpoint of `stream` in the embedded store.
pub fn committed_seq(dir: &Path, stream: &str) -> Option<u64> {
    Store::open_read_only(&dir.join("state"), stream)
        .expect("store opens")
        .and_then(|s| s.load_checkpoint().expect("checkpoint loads"))
        .map(|c| c.batch_seq)
}

/// The events of a topic's records (tombstones skipped), in the order read.
pub fn decode_events(records: &[Received]) -> Vec<ChangeEvent> {
    records
        .iter()
        .filter_map(|r| r.value.as_deref())
        .map(|v| ChangeEvent::decode(v).expect("a graphdelta.v1.ChangeEvent"))
        .collect()
}

/// Folds events into state. Records come partition by partition; one
/// object's events are all in one partition, in order.
pub fn fold(events: &[ChangeEvent]) -> Materializer {
    let mut m = Materializer::new();
    for e in events {
        m.apply(e);
    }
    m
}

fn non_null(map: &Map<String, Value>, keep: &[&str]) -> Map<String, Value> {
    map.iter()
        .filter(|(k, v)| !v.is_null() && keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The differences between the folded events and the truth.
pub fn compare(
    label: &str,
    m: &Materializer,
    truth: &[TruthObject],
    select: &[&str],
) -> Vec<String> {
    let mut diffs = Vec::new();
    let want: BTreeSet<&str> = truth.iter().map(|o| o.id.as_str()).collect();
    let have: BTreeSet<&str> = m.objects().map(|(id, _)| id.as_str()).collect();
    for id in want.difference(&have) {
        diffs.push(format!("{label}: missing {id}"));
    }
    for id in have.difference(&want) {
        diffs.push(format!("{label}: extra {id}"));
    }
    for t in truth {
        let Some(o) = m.get(&t.id) else { continue };
        let status = match t.state {
            ObjectState::Live => ObjectStatus::Live,
            ObjectState::SoftDeleted => ObjectStatus::SoftDeleted,
        };
        if o.status != status {
            diffs.push(format!(
                "{label}: {} is {:?}, truth {:?}",
                t.id, o.status, status
            ));
            continue;
        }
        if status != ObjectStatus::Live {
            continue;
        }
        let want_props = non_null(&t.properties, select);
        if o.properties != want_props {
            diffs.push(format!(
                "{label}: {} properties {:?} != truth {:?}",
                t.id, o.properties, want_props
            ));
        }
        if let Some(members) = &t.members {
            let want: BTreeSet<String> = members.iter().cloned().collect();
            let have = o.members.get("members").cloned().unwrap_or_default();
            if want != have {
                let missing: Vec<&String> = want.difference(&have).collect();
                let extra: Vec<&String> = have.difference(&want).collect();
                diffs.push(format!(
                    "{label}: {} (v{}) members differ: missing {missing:?}, extra {extra:?}",
                    t.id, o.version
                ));
            }
        }
    }
    diffs
}

/// Reads both streams' topics and checks they fold into the truth; returns
/// the records of each (users, groups).
pub fn assert_topics_match_truth(
    brokers: &str,
    users_topic: &str,
    groups_topic: &str,
    truth: &GroundTruth,
    read_committed: bool,
    label: &str,
) -> (Vec<Received>, Vec<Received>) {
    let users = read_topic(brokers, users_topic, read_committed);
    let groups = read_topic(brokers, groups_topic, read_committed);
    let mut diffs = compare(
        &format!("{label} users"),
        &fold(&decode_events(&users)),
        &truth.users,
        USER_SELECT,
    );
    diffs.extend(compare(
        &format!("{label} groups"),
        &fold(&decode_events(&groups)),
        &truth.groups,
        GROUP_SELECT,
    ));
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    (users, groups)
}

/// Every event id appears once.
pub fn assert_no_duplicates(records: &[Received], label: &str) {
    let mut ids: Vec<String> = decode_events(records)
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(
        ids.len(),
        n,
        "{label}: {} duplicate event ids",
        n - ids.len()
    );
}

/// Per key: one partition, versions strictly increasing in offset order,
/// and a tombstone right after every hard delete (and only there).
pub fn assert_keyed_order_and_tombstones(records: &[Received], label: &str) {
    let mut per_key: HashMap<&str, Vec<&Received>> = HashMap::new();
    for r in records {
        per_key
            .entry(r.key.as_deref().expect("every record has a key"))
            .or_default()
            .push(r);
    }
    for (key, rs) in per_key {
        assert!(
            rs.iter().all(|r| r.partition == rs[0].partition),
            "{label}: {key} spans partitions"
        );
        let mut last_version = 0;
        for (i, r) in rs.iter().enumerate() {
            match &r.value {
                Some(v) => {
                    let e = ChangeEvent::decode(v.as_slice()).unwrap();
                    assert_eq!(e.object_id, key, "{label}: key is the object id");
                    assert!(
                        e.object_version > last_version,
                        "{label}: {key} out of order"
                    );
                    last_version = e.object_version;
                    if e.change_type() == graphdelta::proto::v1::ChangeType::HardDeleted {
                        let next = rs.get(i + 1).unwrap_or_else(|| {
                            panic!("{label}: no tombstone after {key}'s hard delete")
                        });
                        assert!(
                            next.value.is_none(),
                            "{label}: {key}: the record after a hard delete is not a tombstone"
                        );
                    }
                }
                None => {
                    let prev = i.checked_sub(1).and_then(|p| rs[p].value.as_ref());
                    let prev =
                        prev.map(|v| ChangeEvent::decode(v.as_slice()).unwrap().change_type());
                    assert_eq!(
                        prev,
                        Some(graphdelta::proto::v1::ChangeType::HardDeleted),
                        "{label}: a tombstone of {key} that follows no hard delete"
                    );
                }
            }
        }
    }
}

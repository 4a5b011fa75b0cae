//! The Kafka sink against a real broker (tansu, started by `scripts/test`,
//! address in `GRAPHDELTA_TEST_KAFKA`): every topic is read back with a
//! consumer and each value decoded as `graphdelta.v1.ChangeEvent`.
//!
//! tansu implements produce/fetch, consumer groups and the idempotent
//! producer but no transactions; the exactly-once mode is tested against
//! librdkafka's mock cluster (`kafka_mock.rs`) and, opt-in, a real Apache
//! Kafka (`kafka_eos_real.rs`).

mod kafka_support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use graphdelta::{
    normalize::memory::StateWrites,
    proto::v1::{ChangeEvent, ChangeType},
    sink::{Sink, SinkError, kafka::KafkaSink},
};
use kafka_support::*;
use prost::Message as _;

/// Publishes `events` as batch `seq` of `stream`.
async fn publish(
    sink: &KafkaSink,
    stream: &str,
    seq: u64,
    events: &[ChangeEvent],
) -> Result<(), SinkError> {
    let cp = checkpoint(stream, seq);
    let writes = StateWrites::default();
    sink.publish(out_batch(stream, seq, events, &cp, &writes))
        .await
}

fn decode(r: &Received) -> ChangeEvent {
    ChangeEvent::decode(r.value.as_deref().expect("an event record has a value"))
        .expect("the value is a graphdelta.v1.ChangeEvent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_become_keyed_protobuf_records_with_cloudevents_headers_and_tombstones() {
    let brokers = test_brokers();
    let prefix = rand_name("gd-records");
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!("topic = \"{prefix}.{{tenant}}.{{stream}}\"\npartitions = 3"),
    ))
    .unwrap();
    sink.check().await.unwrap();

    // Two batches; objects a..e, several events per object, one hard delete.
    let b1 = vec![
        event("users", "a", ChangeType::Created, 1),
        event("users", "b", ChangeType::Created, 1),
        event("users", "c", ChangeType::Created, 1),
        event("users", "a", ChangeType::Updated, 2),
    ];
    let b2 = vec![
        event("users", "b", ChangeType::Updated, 2),
        event("users", "c", ChangeType::HardDeleted, 2),
        event("users", "a", ChangeType::SoftDeleted, 3),
        event("users", "d", ChangeType::Created, 1),
        event("users", "a", ChangeType::Restored, 4),
    ];
    publish(&sink, "users", 1, &b1).await.unwrap();
    publish(&sink, "users", 2, &b2).await.unwrap();
    sink.close().await;

    let topic = format!("{prefix}.contoso.onmicrosoft.com.users");
    assert_eq!(
        partition_count(&brokers, &topic),
        3,
        "created with sink.partitions"
    );
    let records = read_topic(&brokers, &topic, false);
    let sent: Vec<&ChangeEvent> = b1.iter().chain(&b2).collect();
    let (tombstones, events): (Vec<&Received>, Vec<&Received>) =
        records.iter().partition(|r| r.value.is_none());
    assert_eq!(events.len(), sent.len(), "one record per event");
    assert_eq!(tombstones.len(), 1, "one tombstone for the hard delete");

    // Every event arrives once, intact, keyed by its object id, with the
    // CloudEvents headers.
    let by_id: HashMap<&str, &ChangeEvent> =
        sent.iter().map(|e| (e.event_id.as_str(), *e)).collect();
    for r in &events {
        let decoded = decode(r);
        let original = by_id[decoded.event_id.as_str()];
        assert_eq!(&decoded, original);
        assert_eq!(r.key.as_deref(), Some(original.object_id.as_str()));
        assert_eq!(r.header("ce_specversion"), "1.0");
        assert_eq!(r.header("ce_id"), original.event_id);
        assert_eq!(
            r.header("ce_source"),
            "/graphdelta/contoso.onmicrosoft.com/users"
        );
        assert_eq!(r.header("ce_type"), original.cloudevents_type());
        assert_eq!(r.header("ce_subject"), original.object_id);
        let t = humantime::parse_rfc3339(r.header("ce_time")).unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(secs, original.observed_at.as_ref().unwrap().seconds);
        assert_eq!(r.header("content-type"), "application/x-protobuf");
    }
    let types: Vec<&str> = events.iter().map(|r| r.header("ce_type")).collect();
    assert!(types.contains(&"graphdelta.v1.user.hard_deleted"));
    assert!(types.contains(&"graphdelta.v1.user.soft_deleted"));

    // One object's records share a partition and keep their order.
    let mut per_key: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in &records {
        per_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    for (key, rs) in &per_key {
        assert!(
            rs.iter().all(|r| r.partition == rs[0].partition),
            "{key} spans partitions"
        );
        let versions: Vec<u64> = rs
            .iter()
            .filter(|r| r.value.is_some())
            .map(|r| decode(r).object_version)
            .collect();
        let mut sorted = versions.clone();
        sorted.sort();
        assert_eq!(versions, sorted, "events of {key} out of order");
    }
    assert_eq!(per_key["a"].len(), 4);

    // The tombstone follows the hard delete, same key and partition.
    let c = &per_key["c"];
    assert_eq!(c.len(), 3);
    assert_eq!(decode(c[1]).change_type(), ChangeType::HardDeleted);
    assert!(c[2].value.is_none() && c[2].offset > c[1].offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tombstones_a_hard_delete_is_a_single_record_and_the_topic_template_is_honoured() {
    let brokers = test_brokers();
    let prefix = rand_name("gd-notomb");
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!("topic = \"{prefix}-{{resource}}-{{stream}}\"\ntombstones = false"),
    ))
    .unwrap();
    let events = vec![
        event("all users", "x", ChangeType::Created, 1),
        event("all users", "x", ChangeType::HardDeleted, 2),
    ];
    publish(&sink, "all users", 1, &events).await.unwrap();
    // The stream name's space is not legal in a topic name.
    let records = read_topic(&brokers, &format!("{prefix}-users-all_users"), false);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.value.is_some()));
    assert_eq!(
        records[1].header("ce_source"),
        "/graphdelta/contoso.onmicrosoft.com/all%20users"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_check_reports_unreachable_brokers_within_seconds() {
    // Nothing listens on port 1.
    let sink = KafkaSink::new(&sink_config("127.0.0.1:1", "startup_timeout = \"2s\"")).unwrap();
    let started = Instant::now();
    let err = sink.check().await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let message = err.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(message.contains("sink.brokers"), "{message}");
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_without_create_topics_is_a_permanent_error_naming_it() {
    let brokers = test_brokers();
    let prefix = rand_name("gd-nocreate");
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!("topic = \"{prefix}.{{stream}}\"\ncreate_topics = false"),
    ))
    .unwrap();
    let err = publish(
        &sink,
        "users",
        1,
        &[event("users", "a", ChangeType::Created, 1)],
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
    assert!(message.contains(&format!("{prefix}.users")), "{message}");
    assert!(message.contains("create_topics"), "{message}");
    assert_eq!(
        partition_count(&brokers, &format!("{prefix}.users")),
        0,
        "nothing was created"
    );
}

/// What a fake Schema Registry received.
#[derive(Default)]
struct Registry {
    requests: Vec<(String, serde_json::Value)>,
}

/// A Confluent-compatible Schema Registry just good enough to register
/// schemas: ids from 1, versions from 1.
async fn fake_schema_registry() -> (String, Arc<Mutex<Registry>>) {
    use axum::{
        Router,
        extract::{Path, State},
        routing::post,
    };
    let state = Arc::new(Mutex::new(Registry::default()));
    async fn handle(
        State(state): State<Arc<Mutex<Registry>>>,
        Path(rest): Path<String>,
        body: String,
    ) -> ([(&'static str, &'static str); 1], String) {
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut s = state.lock().unwrap();
        s.requests.push((rest.clone(), json));
        let id = s.requests.len();
        let reply = if rest.ends_with("/versions") {
            serde_json::json!({ "id": 100 + id })
        } else {
            serde_json::json!({ "subject": rest, "id": 100 + id, "version": 1, "schema": "" })
        };
        (
            [("content-type", "application/vnd.schemaregistry.v1+json")],
            reply.to_string(),
        )
    }
    let app = Router::new()
        .route("/subjects/{*rest}", post(handle))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confluent_wire_format_registers_the_schema_and_frames_each_value() {
    let brokers = test_brokers();
    let (registry_url, registry) = fake_schema_registry().await;
    let prefix = rand_name("gd-confluent");
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!(
            "topic = \"{prefix}.{{stream}}\"\nwire_format = \"confluent\"\nschema_registry_url = \"{registry_url}\""
        ),
    ))
    .unwrap();
    let events = vec![
        event("users", "a", ChangeType::Created, 1),
        event("users", "b", ChangeType::Created, 1),
    ];
    publish(&sink, "users", 1, &events).await.unwrap();
    publish(
        &sink,
        "users",
        2,
        &[event("users", "a", ChangeType::Updated, 2)],
    )
    .await
    .unwrap();

    // References first (each registered, then looked up for its version),
    // then the event schema under <topic>-value, once.
    let topic = format!("{prefix}.users");
    let requests = registry.lock().unwrap().requests.clone();
    let paths: Vec<&str> = requests.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "google/protobuf/struct.proto/versions",
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto/versions",
            "google/protobuf/timestamp.proto",
            &format!("{topic}-value/versions"),
        ]
    );
    let main = &requests[4].1;
    assert_eq!(main["schemaType"], "PROTOBUF");
    assert!(
        main["schema"]
            .as_str()
            .unwrap()
            .contains("message ChangeEvent")
    );
    let refs = main["references"].as_array().unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0]["name"], "google/protobuf/struct.proto");
    assert_eq!(refs[0]["version"], 1);
    let schema_id: u32 = 105;

    let records = read_topic(&brokers, &topic, false);
    assert_eq!(records.len(), 3);
    for r in &records {
        let v = r.value.as_deref().unwrap();
        assert_eq!(v[0], 0, "magic byte");
        assert_eq!(u32::from_be_bytes(v[1..5].try_into().unwrap()), schema_id);
        assert_eq!(&v[5..7], &[2, 2], "message indexes [1]: ChangeEvent");
        let decoded = ChangeEvent::decode(&v[7..]).unwrap();
        assert_eq!(r.key.as_deref(), Some(decoded.object_id.as_str()));
        assert_eq!(
            r.header("ce_dataschema"),
            format!("{registry_url}/schemas/ids/{schema_id}")
        );
    }
}

/// The Python interpreter `scripts/test` prepared (a venv with
/// confluent-kafka). Panics with the fix when missing: never skips.
fn test_python() -> String {
    let python = std::env::var("GRAPHDELTA_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "GRAPHDELTA_TEST_PYTHON is not set: run the tests with scripts/test, or create a venv with `pip install 'confluent-kafka>=2.6,<3'` and export GRAPHDELTA_TEST_PYTHON=<venv>/bin/python"
        )
    });
    let ok = std::process::Command::new(&python)
        .args(["-c", "import confluent_kafka"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "GRAPHDELTA_TEST_PYTHON={python} cannot import confluent_kafka"
    );
    python
}

/// Runs `tests/python/read_topic.py` on `topic`; its JSON summary.
fn python_read_topic(brokers: &str, topic: &str) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/read_topic.py");
    let out = std::process::Command::new(test_python())
        .args([
            script,
            "--brokers",
            brokers,
            "--topic",
            topic,
            "--timeout",
            "30",
        ])
        .output()
        .expect("run read_topic.py");
    assert!(
        out.status.success(),
        "read_topic.py failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_topic.py prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_python_reader_sees_the_same_records() {
    let brokers = test_brokers();
    let prefix = rand_name("gd-python");
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!("topic = \"{prefix}.{{stream}}\"\npartitions = 2"),
    ))
    .unwrap();
    let mut events = Vec::new();
    for i in 0..20 {
        events.push(event("users", &format!("u{i}"), ChangeType::Created, 1));
    }
    for i in 0..5 {
        events.push(event("users", &format!("u{i}"), ChangeType::Updated, 2));
    }
    events.push(event("users", "u7", ChangeType::HardDeleted, 2));
    publish(&sink, "users", 1, &events[..13]).await.unwrap();
    publish(&sink, "users", 2, &events[13..]).await.unwrap();

    let summary = python_read_topic(&brokers, &format!("{prefix}.users"));
    assert_eq!(summary["records"], 27, "{summary}");
    assert_eq!(summary["events"], 26, "{summary}");
    assert_eq!(summary["tombstones"], 1, "{summary}");
    assert_eq!(summary["keys"].as_object().unwrap().len(), 20, "{summary}");
    assert_eq!(summary["keys"]["u0"], 2);
    assert_eq!(summary["keys"]["u7"], 3, "created, hard deleted, tombstone");
    assert_eq!(summary["ce_types"]["graphdelta.v1.user.created"], 20);
    assert_eq!(summary["ce_types"]["graphdelta.v1.user.updated"], 5);
    assert_eq!(summary["ce_types"]["graphdelta.v1.user.hard_deleted"], 1);
    assert_eq!(summary["content_types"]["application/x-protobuf"], 26);
    assert_eq!(summary["subjects_match_keys"], true);
    let mut ids: Vec<String> = summary["ce_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
}

// ---- The connector end to end: simulator → runtime → Kafka sink → tansu.

use graphdelta::{
    runtime::{Prepared, RunOptions},
    simulator::{ChurnSpec, SimConfig},
    sink::{OutBatch, StoredCheckpoint},
};

fn kafka_sink_toml(brokers: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{tenant}}.{{stream}}\"\npartitions = 3\n{extra}"
    )
}

async fn run_once(config: &graphdelta::config::Config) {
    graphdelta::runtime::run(
        config,
        RunOptions {
            once: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("run failed: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connector_streams_a_simulated_tenant_into_kafka_and_the_topics_rebuild_it() {
    let brokers = test_brokers();
    let (simulator, handle) = start_simulator(SimConfig {
        users: 300,
        groups: 15,
        members_per_group: 8,
        member_slice: 5,
        page_size: 40,
        seed: 11,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = rand_name("gd-e2e");
    let config = connector(&handle, dir.path(), &kafka_sink_toml(&brokers, &prefix, ""));
    let users_topic = format!("{prefix}.contoso.onmicrosoft.com.users");
    let groups_topic = format!("{prefix}.contoso.onmicrosoft.com.groups");

    run_once(&config).await;
    assert_eq!(partition_count(&brokers, &users_topic), 3);
    assert_eq!(partition_count(&brokers, &groups_topic), 3);
    let (users, _) = assert_topics_match_truth(
        &brokers,
        &users_topic,
        &groups_topic,
        &simulator.truth(),
        false,
        "initial",
    );
    assert_eq!(users.len(), 300, "one CREATED per user");
    for r in &users {
        assert_eq!(r.header("ce_type"), "graphdelta.v1.user.created");
        assert_eq!(
            r.header("ce_source"),
            "/graphdelta/contoso.onmicrosoft.com/users"
        );
        assert_eq!(r.header("ce_subject"), r.key.as_deref().unwrap());
        assert_eq!(r.header("content-type"), "application/x-protobuf");
    }

    // Rounds of churn: updates, soft and hard deletes, restores, members.
    for round in 1..=3 {
        simulator.churn(&ChurnSpec::mixed(60));
        run_once(&config).await;
        let label = format!("round {round}");
        let (users, groups) = assert_topics_match_truth(
            &brokers,
            &users_topic,
            &groups_topic,
            &simulator.truth(),
            false,
            &label,
        );
        for records in [&users, &groups] {
            assert_no_duplicates(records, &label);
            assert_keyed_order_and_tombstones(records, &label);
            for r in records.iter().filter(|r| r.value.is_some()) {
                let e = ChangeEvent::decode(r.value.as_deref().unwrap()).unwrap();
                assert_eq!(r.header("ce_id"), e.event_id);
                assert_eq!(r.header("ce_type"), e.cloudevents_type());
            }
        }
    }
    let events = decode_events(&read_topic(&brokers, &users_topic, false));
    for kind in [
        ChangeType::Updated,
        ChangeType::SoftDeleted,
        ChangeType::HardDeleted,
    ] {
        assert!(
            events.iter().any(|e| e.change_type() == kind),
            "no {kind:?} event in the churn"
        );
    }

    // Both streams are committed at their deltaLinks.
    let store = graphdelta::checkpoint::Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap();
    let cp = store.load_checkpoint().unwrap().unwrap();
    assert_eq!(cp.phase(), graphdelta::proto::v1::Phase::Incremental);
    assert!(cp.link_is_delta);

    // The independent reader agrees.
    let summary = python_read_topic(&brokers, &users_topic);
    let rust_users = read_topic(&brokers, &users_topic, false);
    assert_eq!(summary["records"], rust_users.len());
    assert_eq!(summary["events"], events.len());
    assert_eq!(summary["subjects_match_keys"], true);
    assert_eq!(
        summary["ce_types"]["graphdelta.v1.user.created"],
        events
            .iter()
            .filter(|e| e.change_type() == ChangeType::Created)
            .count()
    );
    handle.shutdown().await;
}

/// Wraps the Kafka sink: the batch `hold` is delivered to Kafka, then its
/// ack is held back until the test releases it.
struct HoldAck {
    inner: KafkaSink,
    hold: u64,
    delivered: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
    acked: Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl Sink for HoldAck {
    fn kind(&self) -> &'static str {
        "kafka"
    }
    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        self.inner.publish(batch).await?;
        if batch.seq == self.hold {
            self.delivered.notify_one();
            let _permit = self.release.acquire().await.unwrap();
        }
        self.acked.lock().unwrap().push(batch.seq);
        Ok(())
    }
    async fn stored_checkpoint(&self, stream: &str) -> Result<Option<StoredCheckpoint>, SinkError> {
        self.inner.stored_checkpoint(stream).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_advances_only_after_kafka_acknowledged_every_earlier_batch() {
    let brokers = test_brokers();
    let (_simulator, handle) = start_simulator(SimConfig {
        users: 120,
        groups: 0,
        page_size: 20,
        seed: 5,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = rand_name("gd-ack");
    let mut text = connector_toml(&handle, dir.path(), &kafka_sink_toml(&brokers, &prefix, ""));
    // Only the users stream, four batches in flight.
    let groups = text.find("[[streams]]\nname = \"groups\"").unwrap();
    let end = text[groups..].find("\n\n").unwrap() + groups;
    text.replace_range(groups..end, "");
    text.push_str("max_in_flight_batches = 4\n");
    let config = graphdelta::config::Config::parse(&text).unwrap();
    let users_topic = format!("{prefix}.contoso.onmicrosoft.com.users");

    let sink = Arc::new(HoldAck {
        inner: KafkaSink::new(&sink_config(
            &brokers,
            &format!("topic = \"{prefix}.{{tenant}}.{{stream}}\""),
        ))
        .unwrap(),
        hold: 2,
        delivered: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
        acked: Mutex::new(Vec::new()),
    });
    let prepared = Prepared::with_sink(
        &config,
        &RunOptions::default(),
        sink.clone(),
        config.resolve().unwrap(),
    )
    .unwrap();
    let run = tokio::spawn(prepared.run(true));

    // Batch 2 is in Kafka but not acknowledged; batches 3.. are acknowledged.
    tokio::time::timeout(Duration::from_secs(20), sink.delivered.notified())
        .await
        .expect("batch 2 delivered");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sink.acked.lock().unwrap().contains(&4) {
        assert!(
            Instant::now() < deadline,
            "batches 3 and 4 were not acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_kafka = read_topic(&brokers, &users_topic, false).len();
    assert!(
        in_kafka >= 80,
        "batches 1 to 4 are in Kafka ({in_kafka} records)"
    );
    // Batch 1 commits; nothing past it while batch 2 waits for its ack,
    // although 3 and 4 are acknowledged (watched for a while: a commit out
    // of order would show within milliseconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    while committed_seq(dir.path(), "users") != Some(1) {
        assert!(Instant::now() < deadline, "batch 1 was not committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..15 {
        assert_eq!(
            committed_seq(dir.path(), "users"),
            Some(1),
            "committed past an unacknowledged batch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    sink.release.add_permits(1);
    run.await.unwrap().unwrap();
    // 120 users in pages of 20: six pages, the last with the deltaLink.
    let last = committed_seq(dir.path(), "users").unwrap();
    assert!(last >= 6, "committed up to batch {last}");
    assert_eq!(
        decode_events(&read_topic(&brokers, &users_topic, false)).len(),
        120
    );
    handle.shutdown().await;
}

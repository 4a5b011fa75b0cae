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

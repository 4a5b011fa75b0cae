//! Faults a real broker will not produce on demand, against librdkafka's
//! mock cluster (`rdkafka::mocking::MockCluster`): produce requests that
//! fail, a topic the principal may not write, a broker that goes down and
//! comes back, and the exactly-once flow (transactions, fencing).
//!
//! The mock is not the only Kafka these paths meet: `kafka.rs` runs the
//! sink against tansu and `kafka_eos_real.rs` (opt-in) against Apache
//! Kafka. The mock shows aborted records to `read_committed` consumers, so
//! these tests check the transactional flow through its outcomes (what the
//! sink returns, what the checkpoint topic holds), not read_committed
//! filtering.

mod kafka_support;

use std::collections::HashSet;

use graphdelta::{
    normalize::memory::StateWrites,
    proto::v1::{ChangeEvent, ChangeType, CheckpointRecord, ObjectState},
    sink::{Sink, SinkError, kafka::KafkaSink},
};
use kafka_support::*;
use prost::Message as _;
use rdkafka::{
    mocking::MockCluster,
    producer::DefaultProducerContext,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};

/// A mock cluster with `topics` created (the mock has no CreateTopics).
fn cluster(brokers: i32, topics: &[&str]) -> MockCluster<'static, DefaultProducerContext> {
    let mock = MockCluster::new(brokers).expect("mock cluster");
    for t in topics {
        mock.create_topic(t, 1, 1).expect("mock topic");
    }
    mock
}

fn events(stream: &str, ids: &[&str], version: u64) -> Vec<ChangeEvent> {
    ids.iter()
        .map(|id| event(stream, id, ChangeType::Updated, version))
        .collect()
}

async fn publish(
    sink: &KafkaSink,
    stream: &str,
    seq: u64,
    events: &[ChangeEvent],
    writes: &StateWrites,
) -> Result<(), SinkError> {
    let cp = checkpoint(stream, seq);
    sink.publish(out_batch(stream, seq, events, &cp, writes))
        .await
}

fn event_ids(records: &[Received]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| r.value.as_deref())
        .map(|v| ChangeEvent::decode(v).unwrap().event_id)
        .collect()
}

/// Librdkafka retries a failed produce request itself until the delivery
/// timeout; only then does the batch fail, as retriable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_produce_requests_are_retriable_and_nothing_is_lost_once_they_stop() {
    let topic = rand_name("gd-mock-produce");
    let mock = cluster(3, &[&topic]);
    let brokers = mock.bootstrap_servers();
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!("topic = \"{topic}\"\ndelivery_timeout = \"1s\""),
    ))
    .unwrap();
    sink.check().await.unwrap();
    let writes = StateWrites::default();

    let first = events("users", &["a", "b", "c"], 1);
    publish(&sink, "users", 1, &first, &writes).await.unwrap();

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
    );
    let second = events("users", &["a", "b", "d"], 2);
    let err = publish(&sink, "users", 2, &second, &writes)
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("not acknowledged"), "{message}");
    assert!(message.contains("batch 2"), "{message}");

    // The runtime publishes the batch again once the broker recovers.
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    publish(&sink, "users", 2, &second, &writes).await.unwrap();
    let third = events("users", &["e"], 3);
    publish(&sink, "users", 3, &third, &writes).await.unwrap();

    let got: HashSet<String> = event_ids(&read_topic(&brokers, &topic, false))
        .into_iter()
        .collect();
    for e in first.iter().chain(&second).chain(&third) {
        assert!(got.contains(&e.event_id), "{} lost", e.event_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_authorization_failure_is_permanent_and_names_the_topic_and_the_fix() {
    let topic = rand_name("gd-mock-authz");
    let mock = cluster(1, &[&topic]);
    let sink = KafkaSink::new(&sink_config(
        &mock.bootstrap_servers(),
        &format!("topic = \"{topic}\"\ndelivery_timeout = \"5s\""),
    ))
    .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 5],
    );
    let started = std::time::Instant::now();
    let err = publish(
        &sink,
        "users",
        1,
        &events("users", &["a"], 1),
        &StateWrites::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&topic), "{message}");
    assert!(message.contains("WRITE"), "{message}");
    // Not retried until the delivery timeout: librdkafka gives up at once.
    assert!(started.elapsed() < std::time::Duration::from_secs(4));

    // Refused in the metadata: the sink does not even try to produce.
    let other = rand_name("gd-mock-authz-md");
    mock.create_topic(&other, 1, 1).unwrap();
    mock.topic_error(
        &other,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let sink = KafkaSink::new(&sink_config(
        &mock.bootstrap_servers(),
        &format!("topic = \"{other}\""),
    ))
    .unwrap();
    let err = publish(
        &sink,
        "users",
        1,
        &events("users", &["a"], 1),
        &StateWrites::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
    assert!(err.to_string().contains(&other), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_fails_the_batch_as_retriable_and_it_is_delivered_once_the_broker_is_up() {
    let topic = rand_name("gd-mock-down");
    let mock = cluster(1, &[&topic]);
    let brokers = mock.bootstrap_servers();
    // librdkafka backs reconnects off up to 10 s; keep the test short.
    let sink = KafkaSink::new(&sink_config(
        &brokers,
        &format!(
            "topic = \"{topic}\"\ndelivery_timeout = \"1s\"\n[properties]\n\"reconnect.backoff.max.ms\" = 200"
        ),
    ))
    .unwrap();
    let writes = StateWrites::default();
    publish(&sink, "users", 1, &events("users", &["a"], 1), &writes)
        .await
        .unwrap();

    mock.broker_down(1).unwrap();
    let batch = events("users", &["a", "b"], 2);
    let err = publish(&sink, "users", 2, &batch, &writes)
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");

    mock.broker_up(1).unwrap();
    // Like the runtime: retry until acknowledged (the producer reconnects).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match publish(&sink, "users", 2, &batch, &writes).await {
            Ok(()) => break,
            Err(SinkError::Retriable(m)) if std::time::Instant::now() < deadline => {
                eprintln!("still retrying: {m}");
            }
            Err(e) => panic!("not delivered after the broker came back: {e}"),
        }
    }
    let got: HashSet<String> = event_ids(&read_topic(&brokers, &topic, false))
        .into_iter()
        .collect();
    for e in &batch {
        assert!(got.contains(&e.event_id), "{} lost", e.event_id);
    }
}

fn eos_config(
    brokers: &str,
    topic: &str,
    checkpoints: &str,
    prefix: &str,
) -> graphdelta::sink::kafka::KafkaSinkConfig {
    sink_config(
        brokers,
        &format!(
            "topic = \"{topic}\"\nexactly_once = true\ncheckpoint_topic = \"{checkpoints}\"\ntransactional_id_prefix = \"{prefix}\"\ndelivery_timeout = \"2s\"\nstartup_timeout = \"1s\""
        ),
    )
}

fn writes_for(id: &str, version: u64) -> StateWrites {
    let mut w = StateWrites::default();
    w.objects.insert(
        id.to_string(),
        Some(ObjectState {
            version,
            ..Default::default()
        }),
    );
    w
}

fn checkpoint_records(brokers: &str, topic: &str) -> Vec<(String, CheckpointRecord)> {
    read_topic(brokers, topic, true)
        .into_iter()
        .map(|r| {
            (
                r.key.unwrap(),
                CheckpointRecord::decode(r.value.as_deref().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// init, begin, events, checkpoint record, commit; a restart reads the
/// checkpoint back with its memory changes; an already committed batch is
/// acknowledged without being written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_events_and_checkpoint_together_and_reads_the_checkpoint_back() {
    let topic = rand_name("gd-mock-eos");
    let checkpoints = rand_name("gd-mock-eos-cp");
    let prefix = rand_name("gd-mock-eos-tx") + "-";
    let mock = cluster(3, &[&topic, &checkpoints]);
    let brokers = mock.bootstrap_servers();
    let sink = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    assert!(sink.stores_checkpoints());
    sink.check().await.unwrap();
    assert!(sink.stored_checkpoint("users").await.unwrap().is_none());

    let b1 = events("users", &["a", "b"], 1);
    publish(&sink, "users", 1, &b1, &writes_for("a", 1))
        .await
        .unwrap();
    // A batch without events still moves the stored checkpoint.
    publish(&sink, "users", 2, &[], &writes_for("b", 1))
        .await
        .unwrap();
    let b3 = events("users", &["c"], 1);
    publish(&sink, "users", 3, &b3, &writes_for("c", 7))
        .await
        .unwrap();
    // Another stream has its own producer and key.
    publish(
        &sink,
        "groups",
        1,
        &events("groups", &["g"], 1),
        &StateWrites::default(),
    )
    .await
    .unwrap();

    let ids = event_ids(&read_topic(&brokers, &topic, true));
    assert_eq!(ids.len(), 4);
    let cps = checkpoint_records(&brokers, &checkpoints);
    let users: Vec<u64> = cps
        .iter()
        .filter(|(k, _)| k == "users")
        .map(|(_, r)| r.checkpoint.as_ref().unwrap().batch_seq)
        .collect();
    assert_eq!(
        users,
        vec![1, 2, 3],
        "one checkpoint record per batch, in order"
    );
    assert!(cps.iter().any(|(k, _)| k == "groups"));

    // A restart: the new instance fences the old one and reads batch 3 back.
    let restarted = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    let stored = restarted
        .stored_checkpoint("users")
        .await
        .unwrap()
        .expect("a stored checkpoint");
    assert_eq!(stored.checkpoint.batch_seq, 3);
    assert_eq!(stored.checkpoint.link, checkpoint("users", 3).link);
    assert_eq!(stored.writes.objects["c"].as_ref().unwrap().version, 7);

    // Batch 3 again (the embedded store had not committed it): acknowledged,
    // not written a second time.
    publish(&restarted, "users", 3, &b3, &writes_for("c", 7))
        .await
        .unwrap();
    assert_eq!(event_ids(&read_topic(&brokers, &topic, true)).len(), 4);
    publish(
        &restarted,
        "users",
        4,
        &events("users", &["d"], 1),
        &StateWrites::default(),
    )
    .await
    .unwrap();
    assert_eq!(event_ids(&read_topic(&brokers, &topic, true)).len(), 5);
}

/// A page's memory changes can exceed librdkafka's default 1 MB record
/// limit (999 objects with many tracked properties, large membership
/// slices); the checkpoint record still goes through and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_record_above_one_megabyte_is_written_and_read_back() {
    let topic = rand_name("gd-mock-bigcp");
    let checkpoints = rand_name("gd-mock-bigcp-cp");
    let prefix = rand_name("gd-mock-bigcp-tx") + "-";
    let mock = cluster(3, &[&topic, &checkpoints]);
    let brokers = mock.bootstrap_servers();
    let sink = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    let mut writes = StateWrites::default();
    for i in 0..3000u64 {
        writes.objects.insert(
            format!("{:036}", i),
            Some(ObjectState {
                version: i,
                property_hashes: (0..60).map(|h| h * 7919 + i).collect(),
                ..Default::default()
            }),
        );
    }
    publish(&sink, "users", 1, &events("users", &["a"], 1), &writes)
        .await
        .unwrap();
    let cp_bytes: usize = read_topic(&brokers, &checkpoints, true)
        .iter()
        .map(|r| r.value.as_ref().map_or(0, Vec::len))
        .sum();
    assert!(cp_bytes > 1_000_000, "the record is {cp_bytes} bytes");

    let restarted = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    let stored = restarted.stored_checkpoint("users").await.unwrap().unwrap();
    assert_eq!(stored.writes.objects.len(), 3000);
    assert_eq!(
        stored.writes.objects[&format!("{:036}", 42)]
            .as_ref()
            .unwrap()
            .property_hashes
            .len(),
        60
    );
}

/// A failed transaction is aborted and reported retriable; a later batch is
/// refused until the failed one is committed; then both go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_aborts_a_failed_batch_and_keeps_batches_in_order() {
    let topic = rand_name("gd-mock-abort");
    let checkpoints = rand_name("gd-mock-abort-cp");
    let prefix = rand_name("gd-mock-abort-tx") + "-";
    let mock = cluster(3, &[&topic, &checkpoints]);
    let brokers = mock.bootstrap_servers();
    let sink = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    let w = StateWrites::default();
    publish(&sink, "users", 1, &events("users", &["a"], 1), &w)
        .await
        .unwrap();

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 500],
    );
    let b2 = events("users", &["b"], 1);
    let err = publish(&sink, "users", 2, &b2, &w).await.unwrap_err();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
    mock.clear_request_errors(RDKafkaApiKey::Produce);

    // Batch 3 may not overtake batch 2.
    let b3 = events("users", &["c"], 1);
    let err = publish(&sink, "users", 3, &b3, &w).await.unwrap_err();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
    assert!(
        err.to_string().contains("batch 2 must be committed first"),
        "{err}"
    );

    publish(&sink, "users", 2, &b2, &w).await.unwrap();
    publish(&sink, "users", 3, &b3, &w).await.unwrap();
    let seqs: Vec<u64> = checkpoint_records(&brokers, &checkpoints)
        .iter()
        .map(|(_, r)| r.checkpoint.as_ref().unwrap().batch_seq)
        .collect();
    // The mock keeps aborted records visible; the committed ones are in order.
    assert_eq!(seqs.last(), Some(&3));
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    let restarted = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    assert_eq!(
        restarted
            .stored_checkpoint("users")
            .await
            .unwrap()
            .unwrap()
            .checkpoint
            .batch_seq,
        3
    );
}

/// A second instance with the same transactional id fences the first: its
/// next batch fails with `Fenced`, and it stays fenced (it never fences the
/// newer instance back).
///
/// The mock hands every `InitProducerId` a new producer id instead of
/// bumping the epoch of the transactional id's existing one, so it never
/// fences by itself; the answer a broker gives the fenced producer
/// (`PRODUCER_FENCED`) is injected, once on commit (EndTxn) and once on
/// the first send of a transaction (AddPartitionsToTxn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_fences_the_first_which_stops() {
    let topic = rand_name("gd-mock-fence");
    let checkpoints = rand_name("gd-mock-fence-cp");
    let prefix = rand_name("gd-mock-fence-tx") + "-";
    let mock = cluster(3, &[&topic, &checkpoints]);
    let brokers = mock.bootstrap_servers();
    let w = StateWrites::default();
    let first = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    publish(&first, "users", 1, &events("users", &["a"], 1), &w)
        .await
        .unwrap();
    publish(&first, "groups", 1, &events("groups", &["g"], 1), &w)
        .await
        .unwrap();

    // The new instance initializes its producers (fencing the old ones on
    // a real broker) and reads the checkpoints back.
    let second = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    let stored = second.stored_checkpoint("users").await.unwrap().unwrap();
    assert_eq!(stored.checkpoint.batch_seq, 1);
    assert_eq!(
        second
            .stored_checkpoint("groups")
            .await
            .unwrap()
            .unwrap()
            .checkpoint
            .batch_seq,
        1
    );

    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let err = publish(&first, "users", 2, &events("users", &["b"], 1), &w)
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Fenced(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&format!("{prefix}users")), "{message}");
    assert!(
        message.contains("another graphdelta instance took over"),
        "{message}"
    );

    mock.request_errors(
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let err = publish(&first, "groups", 2, &events("groups", &["h"], 1), &w)
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Fenced(_)), "{err:?}");

    // Fenced for good: no new producer, no new transaction.
    let again = publish(&first, "users", 2, &events("users", &["b"], 1), &w)
        .await
        .unwrap_err();
    assert!(matches!(again, SinkError::Fenced(_)), "{again:?}");
    assert!(matches!(
        first.stored_checkpoint("users").await,
        Err(SinkError::Fenced(_))
    ));

    // The newer instance carries on from the last committed batch.
    publish(&second, "users", 2, &events("users", &["b"], 1), &w)
        .await
        .unwrap();
    let restarted = KafkaSink::new(&eos_config(&brokers, &topic, &checkpoints, &prefix)).unwrap();
    assert_eq!(
        restarted
            .stored_checkpoint("users")
            .await
            .unwrap()
            .unwrap()
            .checkpoint
            .batch_seq,
        2
    );
}

// ---- Through the runtime: the Graph simulator, the stream runner and the
// ---- embedded checkpoint store, with the mock cluster misbehaving.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use graphdelta::{
    config::Config,
    runtime::{Prepared, RunError, RunOptions},
    simulator::{ChurnSpec, SimConfig},
    sink::{OutBatch, SinkConfig, StoredCheckpoint},
};

fn kafka_config(config: &Config) -> &graphdelta::sink::kafka::KafkaSinkConfig {
    match &config.sink {
        SinkConfig::Kafka(c) => c,
        other => panic!("not a Kafka sink: {}", other.kind()),
    }
}

/// Counts the errors the runtime saw; optionally fails one batch after
/// Kafka accepted it (a crash between the Kafka and the store commits).
struct Observed {
    inner: KafkaSink,
    retriable: AtomicU32,
    crash_after: Option<(&'static str, u64)>,
    /// When set: the embedded store under this directory must hold batch
    /// n-1 whenever batch n is published (a transactional sink may be at
    /// most one batch ahead of it); violations are collected.
    store: Option<std::path::PathBuf>,
    violations: std::sync::Mutex<Vec<String>>,
}

impl Observed {
    fn new(inner: KafkaSink) -> Self {
        Self {
            inner,
            retriable: AtomicU32::new(0),
            crash_after: None,
            store: None,
            violations: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Sink for Observed {
    fn kind(&self) -> &'static str {
        "kafka"
    }
    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        if let Some(dir) = &self.store {
            let local = committed_seq(dir, batch.stream).unwrap_or(0);
            if local + 1 != batch.seq {
                self.violations.lock().unwrap().push(format!(
                    "{} batch {} published while the store holds batch {local}",
                    batch.stream, batch.seq
                ));
            }
        }
        let result = self.inner.publish(batch).await;
        if let Err(SinkError::Retriable(_)) = &result {
            self.retriable.fetch_add(1, Ordering::SeqCst);
        }
        if result.is_ok() && self.crash_after == Some((batch.stream, batch.seq)) {
            return Err(SinkError::Permanent(
                "simulated crash after the Kafka commit".into(),
            ));
        }
        result
    }
    fn stores_checkpoints(&self) -> bool {
        self.inner.stores_checkpoints()
    }
    async fn stored_checkpoint(&self, stream: &str) -> Result<Option<StoredCheckpoint>, SinkError> {
        self.inner.stored_checkpoint(stream).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

fn run_with(
    config: &Config,
    sink: Arc<Observed>,
) -> impl std::future::Future<Output = Result<(), RunError>> + Send + use<> {
    Prepared::with_sink(
        config,
        &RunOptions::default(),
        sink,
        config.resolve().unwrap(),
    )
    .unwrap()
    .run(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_commits_nothing_while_kafka_fails_and_loses_nothing_once_it_recovers() {
    let prefix = rand_name("gd-mock-rt");
    let (users_topic, groups_topic) = (format!("{prefix}.users"), format!("{prefix}.groups"));
    let mock = cluster(1, &[&users_topic, &groups_topic]);
    let brokers = mock.bootstrap_servers();
    let (simulator, handle) = start_simulator(SimConfig {
        users: 100,
        groups: 5,
        members_per_group: 4,
        page_size: 25,
        seed: 3,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = connector(
        &handle,
        dir.path(),
        &format!(
            "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{stream}}\"\ndelivery_timeout = \"1s\""
        ),
    );
    let sink = Arc::new(Observed::new(
        KafkaSink::new(kafka_config(&config)).unwrap(),
    ));

    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5000],
    );
    let run = tokio::spawn(run_with(&config, sink.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.retriable.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "no retriable failures seen");
        assert!(!run.is_finished(), "the run ended while Kafka was failing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        committed_seq(dir.path(), "users"),
        None,
        "committed while Kafka failed"
    );
    assert_eq!(
        committed_seq(dir.path(), "groups"),
        None,
        "committed while Kafka failed"
    );

    mock.clear_request_errors(RDKafkaApiKey::Produce);
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run finishes once Kafka recovers")
        .unwrap()
        .unwrap();
    // Every object arrived (duplicates from the retries fold away).
    let (users, _) = assert_topics_match_truth(
        &brokers,
        &users_topic,
        &groups_topic,
        &simulator.truth(),
        false,
        "recovered",
    );
    let keys: HashSet<_> = users.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(keys.len(), 100);
    assert!(committed_seq(dir.path(), "users").unwrap() >= 4);
    handle.shutdown().await;
}

fn eos_sink_toml(brokers: &str, prefix: &str) -> String {
    format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{stream}}\"\nexactly_once = true\ncheckpoint_topic = \"{prefix}.checkpoints\"\ntransactional_id_prefix = \"{prefix}-\"\ndelivery_timeout = \"2s\"\nstartup_timeout = \"1s\""
    )
}

/// The process dies after Kafka committed a batch's transaction and before
/// the embedded store committed it: the next start reads the batch's
/// checkpoint from the checkpoint topic, rolls the store forward and goes
/// on after it, so the batch is not sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_rolls_the_store_forward_after_a_crash_between_the_two_commits() {
    let prefix = rand_name("gd-mock-rollfwd");
    let (users_topic, groups_topic) = (format!("{prefix}.users"), format!("{prefix}.groups"));
    let mock = cluster(
        3,
        &[
            &users_topic,
            &groups_topic,
            &format!("{prefix}.checkpoints"),
        ],
    );
    let brokers = mock.bootstrap_servers();
    let (simulator, handle) = start_simulator(SimConfig {
        users: 100,
        groups: 5,
        members_per_group: 4,
        page_size: 20,
        seed: 4,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = connector(&handle, dir.path(), &eos_sink_toml(&brokers, &prefix));

    let mut crashing = Observed::new(KafkaSink::new(kafka_config(&config)).unwrap());
    crashing.crash_after = Some(("users", 3));
    let err = run_with(&config, Arc::new(crashing)).await.unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    assert_eq!(
        committed_seq(dir.path(), "users"),
        Some(2),
        "the store missed batch 3"
    );

    // A new process: rolls forward to batch 3 and reads on from its link:
    // pages 4 and 5 (of 20 users each), not page 3 again.
    simulator.reset_stats();
    graphdelta::runtime::run(
        &config,
        RunOptions {
            once: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (users, groups) = assert_topics_match_truth(
        &brokers,
        &users_topic,
        &groups_topic,
        &simulator.truth(),
        true,
        "after the crash",
    );
    assert_no_duplicates(&users, "users after the crash");
    assert_no_duplicates(&groups, "groups after the crash");
    assert_eq!(users.len(), 100, "each user exactly once");
    assert_eq!(
        simulator.stats().objects_served,
        40,
        "the store was not rolled forward"
    );

    // With the store watched: never more than one batch behind the sink
    // (the checkpoint record carries one batch's memory changes).
    simulator.churn(&ChurnSpec::mixed(150));
    let mut watched = Observed::new(KafkaSink::new(kafka_config(&config)).unwrap());
    watched.store = Some(dir.path().to_path_buf());
    let watched = Arc::new(watched);
    run_with(&config, watched.clone()).await.unwrap();
    let violations = watched.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    let (users, _) = assert_topics_match_truth(
        &brokers,
        &users_topic,
        &groups_topic,
        &simulator.truth(),
        true,
        "after churn",
    );
    assert_no_duplicates(&users, "users after churn");
    // The store and the checkpoint topic agree.
    let sink = KafkaSink::new(kafka_config(&config)).unwrap();
    let stored = sink.stored_checkpoint("users").await.unwrap().unwrap();
    assert_eq!(
        committed_seq(dir.path(), "users"),
        Some(stored.checkpoint.batch_seq)
    );
    handle.shutdown().await;
}

/// A fenced producer stops its stream: the run ends with the fencing error
/// and the stream's store keeps the last checkpoint committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_stream_stops_the_run_without_committing() {
    let prefix = rand_name("gd-mock-rtfence");
    let (users_topic, groups_topic) = (format!("{prefix}.users"), format!("{prefix}.groups"));
    let mock = cluster(
        3,
        &[
            &users_topic,
            &groups_topic,
            &format!("{prefix}.checkpoints"),
        ],
    );
    let brokers = mock.bootstrap_servers();
    let (simulator, handle) = start_simulator(SimConfig {
        users: 60,
        groups: 3,
        members_per_group: 3,
        page_size: 20,
        seed: 9,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = connector(&handle, dir.path(), &eos_sink_toml(&brokers, &prefix));
    graphdelta::runtime::run(
        &config,
        RunOptions {
            once: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let before = (
        committed_seq(dir.path(), "users"),
        committed_seq(dir.path(), "groups"),
    );

    simulator.churn(&ChurnSpec::mixed(20));
    // What a broker answers a producer whose transactional id was taken
    // over by another instance (the mock never fences by itself).
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let started = Instant::now();
    let err = graphdelta::runtime::run(
        &config,
        RunOptions {
            once: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let message = err.to_string();
    assert!(message.contains("fenced"), "{message}");
    assert!(
        message.contains("another graphdelta instance took over"),
        "{message}"
    );
    let fenced = if message.contains("stream `users`") {
        "users"
    } else {
        "groups"
    };
    let was = if fenced == "users" {
        before.0
    } else {
        before.1
    };
    assert_eq!(
        committed_seq(dir.path(), fenced),
        was,
        "the fenced batch was committed"
    );
    handle.shutdown().await;
}

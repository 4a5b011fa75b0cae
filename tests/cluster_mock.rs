//! Cluster handover with exactly-once, against librdkafka's mock cluster
//! (tansu has no transactions): a stream that moved away and was fenced
//! can be owned again by the same process once it released it.
//!
//! The mock never fences by itself (every InitProducerId gets a new
//! producer id), so the fencing answer a real broker gives is injected, as
//! in `kafka_mock.rs`.

mod kafka_support;

use graphdelta::{
    normalize::memory::StateWrites,
    proto::v1::ChangeType,
    sink::{Sink, SinkError, kafka::KafkaSink},
};
use kafka_support::*;
use rdkafka::{
    mocking::MockCluster,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};

fn eos(brokers: &str, topic: &str, checkpoints: &str, prefix: &str) -> KafkaSink {
    KafkaSink::new(&sink_config(
        brokers,
        &format!(
            "topic = \"{topic}\"\nexactly_once = true\ncheckpoint_topic = \"{checkpoints}\"\ntransactional_id_prefix = \"{prefix}\"\ndelivery_timeout = \"2s\"\nstartup_timeout = \"1s\""
        ),
    ))
    .unwrap()
}

async fn publish(sink: &KafkaSink, seq: u64, id: &str) -> Result<(), SinkError> {
    let cp = checkpoint("users", seq);
    let w = StateWrites::default();
    let events = [event("users", id, ChangeType::Updated, seq)];
    sink.publish(out_batch("users", seq, &events, &cp, &w))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_stream_can_be_owned_again_after_another_instance_had_it() {
    let topic = rand_name("gd-mock-cl");
    let checkpoints = rand_name("gd-mock-cl-cp");
    let prefix = rand_name("gd-mock-cl-tx") + "-";
    let mock = MockCluster::new(3).expect("mock cluster");
    for t in [&topic, &checkpoints] {
        mock.create_topic(t, 1, 1).expect("mock topic");
    }
    let brokers = mock.bootstrap_servers();
    let a = eos(&brokers, &topic, &checkpoints, &prefix);
    let b = eos(&brokers, &topic, &checkpoints, &prefix);

    // A owns the stream, then the group moves it to B, which takes over
    // from A's last committed checkpoint (its init_transactions fences A).
    publish(&a, 1, "x").await.unwrap();
    let stored = b.stored_checkpoint("users").await.unwrap().unwrap();
    assert_eq!(stored.checkpoint.batch_seq, 1);
    publish(&b, 2, "y").await.unwrap();

    // A zombie batch of A's is refused as fenced; A stops the stream and
    // releases it.
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    let err = publish(&a, 2, "zombie").await.unwrap_err();
    assert!(matches!(err, SinkError::Fenced(_)), "{err:?}");
    assert!(matches!(
        a.stored_checkpoint("users").await,
        Err(SinkError::Fenced(_))
    ));
    a.release("users").await;

    // Later the stream comes back to A: a new producer, B's checkpoint read
    // back, and A carries on after it.
    let stored = a.stored_checkpoint("users").await.unwrap().unwrap();
    assert_eq!(
        stored.checkpoint.batch_seq, 2,
        "B's batch is where A resumes"
    );
    publish(&a, 3, "z").await.unwrap();
    // An already committed batch is acknowledged without a new transaction.
    publish(&a, 2, "y").await.unwrap();
    b.release("users").await;
    let stored = b.stored_checkpoint("users").await.unwrap().unwrap();
    assert_eq!(stored.checkpoint.batch_seq, 3);
}

// ---- Two in-process instances, exactly-once, on the mock cluster (which
// ---- has transactions and a group coordinator, where tansu has no
// ---- transactions).

use std::time::{Duration, Instant};

use graphdelta::{
    config::Config,
    runtime::{RunOptions, StatusRegistry},
    simulator::{ChurnSpec, SimConfig},
};
use tokio_util::sync::CancellationToken;

struct InProcess {
    status: StatusRegistry,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), graphdelta::runtime::RunError>>,
}

fn start(config: Config) -> InProcess {
    let options = RunOptions::default();
    let (status, stop) = (options.status.clone(), options.shutdown.clone());
    let task = tokio::spawn(async move { graphdelta::runtime::run(&config, options).await });
    InProcess { status, stop, task }
}

/// Streams `instance` owns that have completed a round since it got them.
fn caught_up(p: &InProcess) -> Vec<String> {
    p.status
        .snapshot()
        .into_iter()
        .filter(|s| s.owner.is_some() && s.state == "caught_up")
        .map(|s| s.stream)
        .collect()
}

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_streams_move_between_instances_and_the_new_owner_resumes() {
    let prefix = rand_name("gd-mock-cleos");
    let group = rand_name("gd-mock-cleos-group");
    let mock = MockCluster::new(1).expect("mock cluster");
    // The mock has no CreateTopics: every topic the run needs, up front.
    for (t, partitions) in [
        (format!("{prefix}.users"), 1),
        (format!("{prefix}.groups"), 1),
        (format!("{prefix}.checkpoints"), 1),
        (format!("{group}.assignments"), 2),
        (format!("{group}.state"), 2),
    ] {
        mock.create_topic(&t, partitions, 1).expect("mock topic");
    }
    let brokers = mock.bootstrap_servers();
    let (simulator, handle) = start_simulator(SimConfig {
        users: 80,
        groups: 5,
        members_per_group: 4,
        page_size: 20,
        seed: 5,
        ..SimConfig::default()
    })
    .await;
    let sink = format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{stream}}\"\nexactly_once = true\ncheckpoint_topic = \"{prefix}.checkpoints\"\ntransactional_id_prefix = \"{prefix}-\"\ndelivery_timeout = \"5s\"\nstartup_timeout = \"2s\""
    );
    let config = |dir: &std::path::Path, id: &str| {
        let text = format!(
            "{}\n[cluster]\ngroup = \"{group}\"\ninstance_id = \"{id}\"\nsession_timeout = \"6s\"\n",
            connector_toml(&handle, dir, &sink)
        );
        Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // A alone owns both streams.
    let a = start(config(dir_a.path(), "a"));
    until("a to run both streams", Duration::from_secs(60), || {
        caught_up(&a).len() == 2
    })
    .await;
    // B joins: one stream each.
    let b = start(config(dir_b.path(), "b"));
    until("one stream each", Duration::from_secs(60), || {
        caught_up(&a).len() == 1 && caught_up(&b).len() == 1
    })
    .await;
    simulator.churn(&ChurnSpec::mixed(30));
    // A leaves: B takes A's stream over from the state topic (its producer
    // fences A's transactional id) and carries on.
    a.stop.cancel();
    a.task.await.unwrap().unwrap();
    until("b to run both streams", Duration::from_secs(60), || {
        caught_up(&b).len() == 2
    })
    .await;
    simulator.churn(&ChurnSpec::mixed(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let users = decode_events(&read_topic(&brokers, &format!("{prefix}.users"), true));
        let groups = decode_events(&read_topic(&brokers, &format!("{prefix}.groups"), true));
        let mut diffs = compare(
            "users",
            &fold(&users),
            &simulator.truth().users,
            USER_SELECT,
        );
        diffs.extend(compare(
            "groups",
            &fold(&groups),
            &simulator.truth().groups,
            GROUP_SELECT,
        ));
        // Memory moved with the stream: no object is announced as created
        // under two different event ids.
        for events in [&users, &groups] {
            let mut created =
                std::collections::HashMap::<&str, std::collections::BTreeSet<&str>>::new();
            for e in events
                .iter()
                .filter(|e| e.change_type() == ChangeType::Created)
            {
                created.entry(&e.object_id).or_default().insert(&e.event_id);
            }
            assert!(
                created.values().all(|ids| ids.len() == 1),
                "an object announced as created twice after the handover"
            );
        }
        if diffs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} differences:\n{}",
            diffs.len(),
            diffs.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.stop.cancel();
    b.task.await.unwrap().unwrap();
    handle.shutdown().await;
}

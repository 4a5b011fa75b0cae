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

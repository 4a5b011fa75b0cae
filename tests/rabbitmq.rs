//! The RabbitMQ sink against a real broker (`GRAPHDELTA_TEST_AMQP`, default
//! the local one): what arrives in the queues, what a failure looks like,
//! and that nothing is lost when the connection is closed under it.
//!
//! Each test publishes into its own exchange and queues and consumes with a
//! separate plain-lapin connection, decoding every message.

mod rabbitmq_util;

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, stream::FuturesOrdered};
use graphdelta::{
    proto::v1::{ChangeEvent, ChangeType, StreamCheckpoint},
    sink::{
        OutBatch, Sink, SinkError,
        rabbitmq::{AmqpUrl, RabbitMqSink},
    },
};
use lapin::{
    ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use rabbitmq_util::*;

const TENANT: &str = "contoso.onmicrosoft.com";

fn event(stream: &str, object: &str, version: u64, change: ChangeType) -> ChangeEvent {
    ChangeEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        tenant_id: TENANT.into(),
        stream: stream.into(),
        resource: "users".into(),
        object_type: "microsoft.graph.user".into(),
        object_id: object.into(),
        change_type: change as i32,
        object_version: version,
        changed_properties: vec!["displayName".into()],
        observed_at: Some(pbjson_types::Timestamp {
            seconds: 1_750_000_000 + version as i64,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Events over a fixed set of objects, each object's versions increasing
/// (created, then updated).
struct Generator {
    stream: String,
    versions: Vec<u64>,
    n: usize,
}

impl Generator {
    fn new(stream: &str, objects: usize) -> Self {
        Self {
            stream: stream.to_string(),
            versions: vec![0; objects],
            n: 0,
        }
    }

    fn batch(&mut self, size: usize) -> Vec<ChangeEvent> {
        (0..size)
            .map(|_| {
                let o = self.n % self.versions.len();
                self.n += 1;
                self.versions[o] += 1;
                let change = if self.versions[o] == 1 {
                    ChangeType::Created
                } else {
                    ChangeType::Updated
                };
                event(&self.stream, &format!("obj-{o}"), self.versions[o], change)
            })
            .collect()
    }
}

/// `batches` batches of `per_batch` events over `objects` objects.
fn batches(
    stream: &str,
    batches: usize,
    per_batch: usize,
    objects: usize,
) -> Vec<Vec<ChangeEvent>> {
    let mut g = Generator::new(stream, objects);
    (0..batches).map(|_| g.batch(per_batch)).collect()
}

async fn publish(
    sink: &dyn Sink,
    stream: &str,
    seq: u64,
    events: &[ChangeEvent],
) -> Result<(), SinkError> {
    let checkpoint = StreamCheckpoint::default();
    sink.publish(OutBatch {
        stream,
        seq,
        event_count: events.len(),
        events,
        checkpoint: &checkpoint,
        writes: &Default::default(),
        encoded: None,
    })
    .await
}

/// Publishes like the runtime does: a retriable failure means "publish
/// this batch and every later one again, in order", until all succeed.
/// Returns the number of failed attempts.
async fn publish_all_like_the_runtime(
    sink: &dyn Sink,
    stream: &str,
    batches: &[Vec<ChangeEvent>],
) -> usize {
    publish_all_like_the_runtime_from(sink, stream, 0, batches).await
}

/// The same, numbering batches after `seq`.
async fn publish_all_like_the_runtime_from(
    sink: &dyn Sink,
    stream: &str,
    seq: u64,
    batches: &[Vec<ChangeEvent>],
) -> usize {
    let mut failures = 0;
    for (i, b) in batches.iter().enumerate() {
        loop {
            match publish(sink, stream, seq + i as u64 + 1, b).await {
                Ok(()) => break,
                Err(SinkError::Retriable(e)) => {
                    failures += 1;
                    assert!(failures < 200, "publish keeps failing: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("permanent failure: {e}"),
            }
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_routed_persistent_and_carry_cloudevents_headers() {
    let exchange = unique("x");
    let all = unique("all");
    let hard = unique("hard");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&all).queue(&hard);
    let config = sink_config(
        &exchange,
        &format!(
            r#"
[[declare_queues]]
name = "{all}"
[[declare_queues]]
name = "{hard}"
type = "classic"
binding_keys = ["*.*.hard_deleted"]
"#
        ),
    );
    let sink = RabbitMqSink::new(&config).unwrap();
    sink.check().await.unwrap();

    let mut users = batches("users", 3, 20, 7);
    users[2][5] = event("users", "obj-gone", 1, ChangeType::HardDeleted);
    users[2][6] = event("users", "obj-binned", 1, ChangeType::SoftDeleted);
    let groups = batches("groups.eu", 2, 10, 3);
    // Several batches in flight at once, as the runtime does, on two streams.
    let mut in_flight = FuturesOrdered::new();
    for (i, b) in users.iter().enumerate() {
        in_flight.push_back(publish(&sink, "users", i as u64 + 1, b));
    }
    for (i, b) in groups.iter().enumerate() {
        in_flight.push_back(publish(&sink, "groups.eu", i as u64 + 1, b));
    }
    while let Some(r) = in_flight.next().await {
        r.unwrap();
    }

    let (conn, admin) = admin().await;
    let expected: Vec<ChangeEvent> = users
        .iter()
        .chain(groups.iter())
        .flatten()
        .cloned()
        .collect();
    let got = drain(&admin, &all, expected.len(), Duration::from_secs(10)).await;
    assert_eq!(got.len(), expected.len(), "every event exactly once");
    assert_eq!(assert_complete_and_ordered(&got, &expected), 0);
    // Per stream, the queue holds the events in publish order.
    for stream in ["users", "groups.eu"] {
        let sent: Vec<&str> = expected
            .iter()
            .filter(|e| e.stream == stream)
            .map(|e| e.event_id.as_str())
            .collect();
        let arrived: Vec<&str> = got
            .iter()
            .filter(|r| r.event.stream == stream)
            .map(|r| r.event.event_id.as_str())
            .collect();
        assert_eq!(arrived, sent, "stream {stream}: order on the queue");
    }
    for r in &got {
        let e = &r.event;
        let p = &r.properties;
        assert_eq!(r.exchange, exchange);
        let stream_word = e.stream.replace('.', "_");
        assert_eq!(
            r.routing_key,
            format!(
                "contoso_onmicrosoft_com.{stream_word}.{}",
                e.change_type().short_name()
            )
        );
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/x-protobuf")
        );
        assert_eq!(
            p.message_id().as_ref().map(|s| s.as_str()),
            Some(e.event_id.as_str())
        );
        assert_eq!(
            p.kind().as_ref().map(|s| s.to_string()),
            Some(e.cloudevents_type())
        );
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some("graphdelta"));
        assert_eq!(*p.timestamp(), Some(e.observed_at.unwrap().seconds as u64));
        assert_eq!(r.header("cloudEvents_specversion").as_deref(), Some("1.0"));
        assert_eq!(
            r.header("cloudEvents_id").as_deref(),
            Some(e.event_id.as_str())
        );
        assert_eq!(
            r.header("cloudEvents_source"),
            Some(format!("/graphdelta/{TENANT}/{}", e.stream))
        );
        assert_eq!(r.header("cloudEvents_type"), Some(e.cloudevents_type()));
        assert_eq!(
            r.header("cloudEvents_subject").as_deref(),
            Some(e.object_id.as_str())
        );
        let time = r.header("cloudEvents_time").unwrap();
        assert!(
            humantime::parse_rfc3339(&time).is_ok(),
            "cloudEvents_time {time} is RFC 3339"
        );
        assert_eq!(
            r.header("graphdelta_change").as_deref(),
            Some(e.change_type().short_name())
        );
        assert_eq!(
            r.raw_header("graphdelta_object_version"),
            Some(AMQPValue::LongLongInt(e.object_version as i64))
        );
    }

    // The hard-delete queue got exactly the hard deletion, nothing else.
    let hard_got = drain(&admin, &hard, 1, Duration::from_secs(5)).await;
    assert_eq!(hard_got.len(), 1);
    assert_eq!(hard_got[0].event.object_id, "obj-gone");
    assert_eq!(
        hard_got[0].properties.kind().as_ref().unwrap().as_str(),
        "graphdelta.v1.user.hard_deleted"
    );

    // The exchange is a durable topic exchange: declaring it so again is
    // accepted (a different type or durability would be refused).
    admin
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the sink declared a durable topic exchange");
    sink.close().await;
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_batch_fails_loudly_and_later_batches_wait_for_it() {
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    // The queue takes creations and updates only: a hard delete has no route.
    let config = sink_config(
        &exchange,
        &format!(
            "[[declare_queues]]\nname = \"{queue}\"\nbinding_keys = [\"*.*.created\", \"*.*.updated\"]"
        ),
    );
    let sink = RabbitMqSink::new(&config).unwrap();
    let mut b = batches("users", 3, 10, 4);
    let gone = event("users", "obj-gone", 1, ChangeType::HardDeleted);
    b[1][4] = gone.clone();

    let mut in_flight = FuturesOrdered::new();
    for (i, events) in b.iter().enumerate() {
        in_flight.push_back(publish(&sink, "users", i as u64 + 1, events));
    }
    let results: Vec<_> = in_flight.collect().await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let err = match &results[1] {
        Err(SinkError::Retriable(m)) => m.clone(),
        other => panic!("an unroutable message must fail the batch (retriably): {other:?}"),
    };
    for needle in [
        format!("exchange `{exchange}`"),
        "routing key `contoso_onmicrosoft_com.users.hard_deleted`".to_string(),
        "unroutable".to_string(),
        gone.event_id.clone(),
        "1 of the 10 messages".to_string(),
    ] {
        assert!(err.contains(&needle), "error lacks {needle:?}: {err}");
    }
    // Batch 3 was queued behind batch 2: whether or not it went out in
    // the same group, it must not count as delivered before batch 2 does.
    assert!(
        matches!(&results[2], Err(SinkError::Retriable(m)) if m.contains("batch 2 before it failed")),
        "{:?}",
        results[2]
    );
    let (conn, admin) = admin().await;
    // Batch 1 and the routable part of batch 2 arrived (batch 3 too if it
    // was sent in batch 2's group).
    let got = drain(&admin, &queue, 19, Duration::from_secs(5)).await;
    assert!(got.len() == 19 || got.len() == 29, "{}", got.len());

    // Retrying keeps failing, and says so, until a queue is bound.
    let again = publish(&sink, "users", 2, &b[1]).await.unwrap_err();
    assert!(again.to_string().contains("unroutable"), "{again}");
    admin
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "*.*.hard_deleted".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish(&sink, "users", 2, &b[1]).await.unwrap();
    publish(&sink, "users", 3, &b[2]).await.unwrap();
    let rest = drain(&admin, &queue, 9 + 10 + 10, Duration::from_secs(5)).await;
    let mut all = got;
    all.extend(rest);
    let expected: Vec<ChangeEvent> = b.concat();
    let duplicates = assert_complete_and_ordered(&all, &expected);
    // Batch 2's routable messages went out three times (batch 3's twice
    // if it was sent in batch 2's group).
    assert!(duplicates == 18 || duplicates == 28, "{duplicates}");
    sink.close().await;
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_mid_run_loses_nothing() {
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    let config = sink_config(
        &exchange,
        &format!("[[declare_queues]]\nname = \"{queue}\""),
    );
    let sink = Arc::new(RabbitMqSink::new(&config).unwrap());
    sink.check().await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // Publishes without pause until told to stop, so that the connection
    // is closed while a batch is on the wire.
    let publisher = {
        let sink = sink.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut generator = Generator::new("users", 50);
            let mut published = Vec::new();
            let mut failures = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || published.len() < 10 {
                let b = generator.batch(200);
                failures += publish_all_like_the_runtime_from(
                    &*sink,
                    "users",
                    published.len() as u64,
                    std::slice::from_ref(&b),
                )
                .await;
                published.push(b);
            }
            (published, failures)
        })
    };
    let (conn, admin) = admin().await;
    for round in 1..=2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Wait for the (re)connected sink's messages, then close it.
        let before = depth(&admin, &queue).await;
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "close #{round}: no connection named {exchange} with traffic appeared"
            );
            if depth(&admin, &queue).await > before && close_connections_named(&exchange) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let it run on the new connection a little, then stop.
    let before = depth(&admin, &queue).await;
    while depth(&admin, &queue).await <= before {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (b, failures) = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("the publisher finishes after reconnecting")
        .unwrap();
    assert!(
        failures > 0,
        "the connection was closed under a running publisher, so some attempt must have failed"
    );
    let expected: Vec<ChangeEvent> = b.concat();
    let got = drain(&admin, &queue, expected.len(), Duration::from_secs(20)).await;
    let duplicates = assert_complete_and_ordered(&got, &expected);
    assert_eq!(got.len(), expected.len() + duplicates);
    eprintln!(
        "{} events in {} batches, {failures} failed attempts, {duplicates} duplicates, none lost",
        expected.len(),
        b.len()
    );
    sink.close().await;
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_queue_replays_from_the_first_event() {
    let exchange = unique("x");
    let stream = unique("stream");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&stream);
    let config = sink_config(
        &exchange,
        &format!(
            "[[declare_queues]]\nname = \"{stream}\"\ntype = \"stream\"\nmax_age = \"7days\"\nmax_length_bytes = 100000000\nmax_segment_size_bytes = 10000000"
        ),
    );
    let sink = RabbitMqSink::new(&config).unwrap();
    let b = batches("users", 4, 25, 10);
    publish_all_like_the_runtime(&sink, "users", &b).await;
    let expected: Vec<ChangeEvent> = b.concat();

    let listing = rabbitmqctl(&["-q", "list_queues", "name", "type", "arguments"]);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&format!("{stream}\t")))
        .unwrap_or_else(|| panic!("queue {stream} not listed: {listing}"));
    assert!(line.contains("\tstream\t"), "{line}");
    assert!(
        line.contains("x-max-age") && line.contains("604800s"),
        "{line}"
    );

    let (conn, _admin) = admin().await;
    // Two independent readers from the start see the same, complete log:
    // reading does not consume.
    for _ in 0..2 {
        let got = read_stream(
            &conn,
            &stream,
            "first",
            expected.len(),
            Duration::from_secs(10),
        )
        .await;
        let ids: Vec<&str> = got.iter().map(|r| r.event.event_id.as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids, want);
    }
    sink.close().await;
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_named_without_the_password() {
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut config = sink_config(&unique("x"), "");
    config.connect_timeout = Duration::from_secs(2);
    config.url = Some(AmqpUrl::new(format!(
        "amqp://svc:pw-never-shown@127.0.0.1:{port}/%2f"
    )));
    let sink = RabbitMqSink::new(&config).unwrap();
    let started = std::time::Instant::now();
    let err = sink.check().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = err.to_string();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(
        text.contains("rabbitmqctl status"),
        "says how to check: {text}"
    );
    assert!(!text.contains("pw-never-shown"), "{text}");
    assert!(!format!("{err:?} {config:?} {sink:?}").contains("pw-never-shown"));

    // A host that never answers: reported within connect_timeout.
    let mut config = sink_config(&unique("x"), "");
    config.connect_timeout = Duration::from_secs(1);
    config.url = Some(AmqpUrl::new("amqp://svc:pw-never-shown@192.0.2.1:5672/%2f"));
    let sink = RabbitMqSink::new(&config).unwrap();
    let started = std::time::Instant::now();
    let err = sink.check().await.unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
    assert!(
        err.contains("192.0.2.1:5672") && !err.contains("pw-never-shown"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_and_vhosts_are_permanent() {
    let base = url::Url::parse(&amqp_url()).unwrap();
    let mut wrong = base.clone();
    wrong.set_password(Some("wrong-pw-never-shown")).unwrap();
    let mut config = sink_config(&unique("x"), "");
    config.url = Some(AmqpUrl::new(wrong.as_str()));
    let err = RabbitMqSink::new(&config)
        .unwrap()
        .check()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
    assert!(
        text.contains("refused the login") && text.contains("password"),
        "{text}"
    );
    assert!(!text.contains("wrong-pw-never-shown"), "{text}");

    let mut novhost = base.clone();
    novhost.set_path("/gd-no-such-vhost");
    config.url = Some(AmqpUrl::new(novhost.as_str()));
    let err = RabbitMqSink::new(&config)
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
    assert!(err.to_string().contains("gd-no-such-vhost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_differently_before_is_a_permanent_error_naming_it() {
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    let (conn, admin) = admin().await;
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let config = sink_config(
        &exchange,
        &format!("[[declare_queues]]\nname = \"{queue}\"\ntype = \"quorum\""),
    );
    let err = RabbitMqSink::new(&config)
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("queue `{queue}`")) && text.contains("quorum"),
        "{text}"
    );
    let _ = conn.close(200, "OK".into()).await;
}

#[test]
fn the_password_never_reaches_the_logs_even_at_trace_level() {
    // The binary with everything logged, against the real broker with a
    // wrong password: the login fails, and neither the password nor the
    // bytes of the SASL response that carries it appear anywhere.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[graph]
base_url = "http://127.0.0.1:9/v1.0"
token_url = "http://127.0.0.1:9/{{tenant}}/oauth2/v2.0/token"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_env = "GD_TEST_TRACE_SECRET"

[[streams]]
name = "users"
resource = "users"

[sink]
type = "rabbitmq"
url_env = "GD_TEST_TRACE_AMQP"
exchange = "{}"

[checkpoint]
path = "{}"
"#,
            unique("x"),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let password = "Zebra-pw-9137";
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_password(Some(password)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_graphdelta"))
        .args(["--log-format", "json", "run", "--once", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .env("GD_TEST_TRACE_SECRET", "s")
        .env("GD_TEST_TRACE_AMQP", url.as_str())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused the login"),
        "the broker must have been reached and refused the login: {stderr}"
    );
    assert!(
        stderr.contains("amq_protocol_tcp") || stderr.contains("lapin"),
        "trace logging was on: {stderr}"
    );
    let as_bytes = password
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for text in [&stderr, &stdout] {
        assert!(!text.contains(password), "password in the output");
        assert!(!text.contains(&as_bytes), "password bytes in the output");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_times_out_and_the_next_attempt_reconnects() {
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    let proxy = BlackHoleProxy::start().await;
    let mut config = sink_config(
        &exchange,
        &format!("[[declare_queues]]\nname = \"{queue}\""),
    );
    config.url = Some(AmqpUrl::new(proxy.url()));
    config.confirm_timeout = Duration::from_millis(800);
    config.connect_timeout = Duration::from_secs(2);
    let sink = RabbitMqSink::new(&config).unwrap();
    let b = batches("users", 2, 50, 10);
    publish(&sink, "users", 1, &b[0]).await.unwrap();

    // The connection goes silent: no confirm will ever come.
    proxy.swallow_existing();
    let started = std::time::Instant::now();
    let err = publish(&sink, "users", 2, &b[1]).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
    for needle in [
        format!("exchange `{exchange}`"),
        "routing key `contoso_onmicrosoft_com.users.".to_string(),
        "not confirmed within".to_string(),
        "sink.confirm_timeout".to_string(),
    ] {
        assert!(text.contains(&needle), "error lacks {needle:?}: {text}");
    }

    // The retry does not reuse the silent connection: it reconnects and
    // gets its confirms.
    publish(&sink, "users", 2, &b[1]).await.unwrap();
    let (conn, admin) = admin().await;
    let got = drain(&admin, &queue, 100, Duration::from_secs(5)).await;
    let expected: Vec<ChangeEvent> = b.concat();
    assert_eq!(assert_complete_and_ordered(&got, &expected), 0);
    assert_eq!(
        got.len(),
        100,
        "the swallowed attempt never reached the broker"
    );
    sink.close().await;
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_fails_the_batch_and_names_the_refused_message() {
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    let sink = RabbitMqSink::new(&sink_config(&exchange, "")).unwrap();
    sink.check().await.unwrap();
    // A consumer's queue that refuses messages beyond 5.
    let (conn, admin) = admin().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(5));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    admin
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    admin
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let b = batches("users", 1, 8, 8);
    let err = publish(&sink, "users", 1, &b[0]).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SinkError::Retriable(_)), "{err:?}");
    for needle in [
        format!("exchange `{exchange}`"),
        "refused (nack) 3 of the 8 messages".to_string(),
        b[0][5].event_id.clone(),
        "reject-publish".to_string(),
    ] {
        assert!(text.contains(&needle), "error lacks {needle:?}: {text}");
    }
    // Once the consumer makes room, the batch goes through.
    drain(&admin, &queue, 5, Duration::from_secs(5)).await;
    publish(&sink, "users", 1, &b[0][..5]).await.unwrap();
    sink.close().await;
    let _ = conn.close(200, "OK".into()).await;
}

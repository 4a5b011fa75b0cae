//! The whole connector into RabbitMQ: the Graph simulator as the tenant, the
//! real runtime (`graphdelta::runtime`), the SQLite checkpoint store, and a
//! real broker (`GRAPHDELTA_TEST_AMQP`). Every message is consumed by an
//! independent lapin consumer, decoded and compared with the simulator's
//! ground truth and with what the runtime committed.

mod rabbitmq_util;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use graphdelta::{
    checkpoint::Store,
    config::Config,
    proto::v1::{ChangeEvent, ChangeType, StreamCheckpoint},
    runtime::{Prepared, RunOptions, StatusRegistry},
    simulator::{ChurnCounts, ChurnSpec, ObjectState, SimConfig, SimHandle, Simulator},
    sink::{self, OutBatch, Sink, SinkError, StoredCheckpoint},
};
use lapin::{options::QueueBindOptions, types::FieldTable};
use rabbitmq_util::*;

/// The variable the test configs name in `url_env`.
const URL_ENV: &str = "GRAPHDELTA_TEST_AMQP_URL_E2E";
const SECRET_ENV: &str = "GRAPHDELTA_TEST_SIM_SECRET_E2E";
const TENANT_WORD: &str = "contoso_onmicrosoft_com";

async fn simulator(cfg: SimConfig) -> SimHandle {
    Simulator::new(cfg)
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A connector definition as a user writes it: users and groups from the
/// simulator into `exchange`, with `queues` (TOML) declared.
fn connector(sim: &SimHandle, dir: &Path, exchange: &str, queues: &str) -> Config {
    // SAFETY: every test sets the same values.
    unsafe {
        std::env::set_var(URL_ENV, amqp_url());
        std::env::set_var(SECRET_ENV, "simulator-secret");
    }
    let text = format!(
        r#"
[graph]
base_url = "{base}"
token_url = "{token}"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_env = "{SECRET_ENV}"

[[streams]]
name = "users"
resource = "users"

[[streams]]
name = "groups"
resource = "groups"

[sink]
type = "rabbitmq"
url_env = "{URL_ENV}"
exchange = "{exchange}"
connection_name = "{exchange}"
confirm_timeout = "10s"
connect_timeout = "5s"
{queues}

[checkpoint]
path = "{state}"

[runtime]
retry_min = "20ms"
retry_max = "200ms"
"#,
        base = sim.base_url(),
        token = sim.token_url(),
        state = dir.join("state").display(),
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

fn queue_toml(name: &str, kind: &str, keys: &[&str]) -> String {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    format!(
        "[[sink.declare_queues]]\nname = \"{name}\"\ntype = \"{kind}\"\nbinding_keys = [{}]\n",
        keys.join(", ")
    )
}

/// Runs every stream once to its deltaLink; returns the events the runtime
/// committed per stream and change.
async fn run_once(config: &Config) -> HashMap<String, u64> {
    let status = StatusRegistry::default();
    graphdelta::runtime::run(
        config,
        RunOptions {
            once: true,
            status: status.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("run failed: {e}"));
    committed_events(&status)
}

fn committed_events(status: &StatusRegistry) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for s in status.snapshot() {
        for (change, n) in s.events {
            *out.entry(format!("{}.{change}", s.stream)).or_default() += n;
        }
    }
    out
}

fn total(counts: &HashMap<String, u64>) -> usize {
    counts.values().sum::<u64>() as usize
}

fn checkpoint(dir: &Path, stream: &str) -> Option<StreamCheckpoint> {
    Store::open_read_only(&dir.join("state"), stream)
        .unwrap()
        .and_then(|s| s.load_checkpoint().unwrap())
}

/// Every object's last event, by id.
fn last_events(received: &[Received]) -> HashMap<String, ChangeEvent> {
    let mut last: HashMap<String, ChangeEvent> = HashMap::new();
    for r in received {
        let e = &r.event;
        match last.get(&e.object_id) {
            Some(prev) if prev.object_version >= e.object_version => {}
            _ => {
                last.insert(e.object_id.clone(), e.clone());
            }
        }
    }
    last
}

/// The directory a consumer rebuilds from the events agrees with the
/// simulator: live objects' last event is a creation, update or restore,
/// soft-deleted ones' a soft deletion, and every object the tenant no longer
/// has ends with a hard deletion.
fn assert_matches_truth(received: &[Received], sim: &Simulator) {
    let truth = sim.truth();
    let last = last_events(received);
    let mut in_truth = HashSet::new();
    for o in truth.users.iter().chain(truth.groups.iter()) {
        in_truth.insert(o.id.as_str());
        let e = last
            .get(&o.id)
            .unwrap_or_else(|| panic!("object {} never appeared on the queue", o.id));
        let change = e.change_type();
        match o.state {
            ObjectState::Live => assert!(
                matches!(
                    change,
                    ChangeType::Created | ChangeType::Updated | ChangeType::Restored
                ),
                "live object {} ends with {change:?}",
                o.id
            ),
            ObjectState::SoftDeleted => assert_eq!(
                change,
                ChangeType::SoftDeleted,
                "soft-deleted object {} ends with {change:?}",
                o.id
            ),
        }
    }
    for (id, e) in &last {
        if !in_truth.contains(id.as_str()) {
            assert_eq!(
                e.change_type(),
                ChangeType::HardDeleted,
                "object {id} is gone from the tenant but its last event is {:?}",
                e.change_type()
            );
        }
    }
}

fn churn(users: ChurnCounts, groups: ChurnCounts) -> ChurnSpec {
    ChurnSpec {
        users,
        groups,
        ..Default::default()
    }
}

fn some_of_everything() -> ChurnCounts {
    ChurnCounts {
        creates: 5,
        updates: 20,
        soft_deletes: 6,
        hard_deletes: 4,
        restores: 2,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_round_and_churn_arrive_routed_ordered_and_complete() {
    let sim = simulator(SimConfig {
        users: 300,
        groups: 20,
        page_size: 50,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let exchange = unique("x");
    let all = unique("all");
    let hard = unique("hard");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&all).queue(&hard);
    let config = connector(
        &sim,
        dir.path(),
        &exchange,
        &(queue_toml(&all, "quorum", &["#"])
            + &queue_toml(&hard, "classic", &["*.*.hard_deleted"])),
    );
    let (conn, admin) = admin().await;

    // Round 1: the initial enumeration.
    let round1 = run_once(&config).await;
    assert_eq!(round1.get("users.created").copied(), Some(300));
    assert_eq!(round1.get("groups.created").copied(), Some(20));
    let mut got = drain(&admin, &all, total(&round1), Duration::from_secs(20)).await;
    assert_eq!(
        got.len(),
        total(&round1),
        "exactly the committed events, once each"
    );

    // Round 2: churn, read incrementally.
    let mut spec = churn(some_of_everything(), some_of_everything());
    spec.groups.member_adds = 10;
    spec.groups.member_removes = 5;
    sim.simulator().churn(&spec);
    let round2 = run_once(&config).await;
    assert!(total(&round2) >= 40, "{round2:?}");
    let more = drain(&admin, &all, total(&round2), Duration::from_secs(20)).await;
    assert_eq!(more.len(), total(&round2));
    got.extend(more);

    let all_events: Vec<ChangeEvent> = got.iter().map(|r| r.event.clone()).collect();
    assert_eq!(assert_complete_and_ordered(&got, &all_events), 0);
    assert_matches_truth(&got, sim.simulator());
    for r in &got {
        let e = &r.event;
        assert_eq!(
            r.routing_key,
            format!(
                "{TENANT_WORD}.{}.{}",
                e.stream,
                e.change_type().short_name()
            )
        );
        assert_eq!(*r.properties.delivery_mode(), Some(2));
        assert_eq!(
            r.properties.message_id().as_ref().map(|s| s.as_str()),
            Some(e.event_id.as_str())
        );
        assert_eq!(r.header("cloudEvents_type"), Some(e.cloudevents_type()));
        assert_eq!(
            r.header("cloudEvents_source"),
            Some(format!("/graphdelta/contoso.onmicrosoft.com/{}", e.stream))
        );
        assert_eq!(r.header("cloudEvents_subject"), Some(e.object_id.clone()));
    }
    // The hard-delete queue holds exactly the hard deletions, in each
    // stream's order. Streams publish on channels of their own, so two
    // queues may interleave different streams differently: only the order
    // within a stream is promised.
    let hard_deleted = |records: &[Received]| -> BTreeMap<String, Vec<String>> {
        let mut by_stream = BTreeMap::<String, Vec<String>>::new();
        for r in records {
            if r.event.change_type() == ChangeType::HardDeleted {
                by_stream
                    .entry(r.event.stream.clone())
                    .or_default()
                    .push(r.event.event_id.clone());
            }
        }
        by_stream
    };
    let expected = hard_deleted(&got);
    let count: usize = expected.values().map(Vec::len).sum();
    assert!(count >= 8, "churn hard-deleted 8 objects");
    let hard_got = drain(&admin, &hard, count, Duration::from_secs(10)).await;
    assert_eq!(hard_deleted(&hard_got), expected);
    assert!(hard_got.iter().all(|r| {
        r.properties
            .kind()
            .as_ref()
            .unwrap()
            .as_str()
            .ends_with(".hard_deleted")
    }));
    let _ = conn.close(200, "OK".into()).await;
}

/// A sink that passes batches to the RabbitMQ sink and records its errors,
/// so the test can watch the runtime retry.
struct Recording {
    inner: Arc<dyn Sink>,
    errors: Mutex<Vec<SinkError>>,
}

#[async_trait]
impl Sink for Recording {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn publish(&self, batch: OutBatch<'_>) -> Result<(), SinkError> {
        let r = self.inner.publish(batch).await;
        if let Err(e) = &r {
            let copy = match e {
                SinkError::Retriable(m) => SinkError::Retriable(m.clone()),
                SinkError::Permanent(m) => SinkError::Permanent(m.clone()),
                SinkError::Fenced(m) => SinkError::Fenced(m.clone()),
            };
            self.errors.lock().unwrap().push(copy);
        }
        r
    }
    async fn check(&self) -> Result<(), SinkError> {
        self.inner.check().await
    }
    async fn stored_checkpoint(&self, s: &str) -> Result<Option<StoredCheckpoint>, SinkError> {
        self.inner.stored_checkpoint(s).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_leave_the_checkpoint_where_it_was_until_a_queue_is_bound() {
    let sim = simulator(SimConfig {
        users: 120,
        groups: 10,
        page_size: 40,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    let config = connector(
        &sim,
        dir.path(),
        &exchange,
        &queue_toml(&queue, "quorum", &["#"]),
    );
    let (conn, admin) = admin().await;
    let round1 = run_once(&config).await;
    let first = drain(&admin, &queue, total(&round1), Duration::from_secs(20)).await;
    assert_eq!(first.len(), total(&round1));
    let users_cp = checkpoint(dir.path(), "users").expect("round 1 committed");
    let groups_cp = checkpoint(dir.path(), "groups").expect("round 1 committed");

    // An operator removes the only binding: every message is unroutable.
    admin
        .queue_unbind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    sim.simulator()
        .churn(&churn(some_of_everything(), ChurnCounts::default()));
    // Without declare_queues, so that the binding is not declared again.
    let config = connector(&sim, dir.path(), &exchange, "");

    let recording = Arc::new(Recording {
        inner: sink::build(&config.sink).await.unwrap(),
        errors: Mutex::new(vec![]),
    });
    let status = StatusRegistry::default();
    let options = RunOptions {
        once: true,
        status: status.clone(),
        ..Default::default()
    };
    let prepared = Prepared::with_sink(
        &config,
        &options,
        recording.clone(),
        config.resolve().unwrap(),
    )
    .unwrap();
    let run = tokio::spawn(prepared.run(true));

    // The runtime keeps retrying, loudly, and commits nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while recording.errors.lock().unwrap().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed publish seen"
        );
        assert!(
            !run.is_finished(),
            "the run ended although nothing could be routed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_error = recording.errors.lock().unwrap()[0].to_string();
    for needle in [
        format!("exchange `{exchange}`"),
        format!("routing key `{TENANT_WORD}."),
        "unroutable".to_string(),
        "no queue is bound".to_string(),
    ] {
        assert!(
            first_error.contains(&needle),
            "error lacks {needle:?}: {first_error}"
        );
    }
    assert!(matches!(
        recording.errors.lock().unwrap()[0],
        SinkError::Retriable(_)
    ));
    assert_eq!(
        checkpoint(dir.path(), "users"),
        Some(users_cp.clone()),
        "users checkpoint moved"
    );
    assert_eq!(
        checkpoint(dir.path(), "groups"),
        Some(groups_cp),
        "nothing happened to groups"
    );
    assert_eq!(depth(&admin, &queue).await, 0);

    // Bind the queue again: the stuck batch goes through, then the rest.
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
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the run completes once a queue is bound")
        .unwrap()
        .unwrap();
    let round2 = committed_events(&status);
    assert!(total(&round2) >= 30, "{round2:?}");
    let after = checkpoint(dir.path(), "users").unwrap();
    assert!(
        after.batch_seq > users_cp.batch_seq,
        "the checkpoint moved on"
    );
    let second = drain(&admin, &queue, total(&round2), Duration::from_secs(20)).await;
    // Attempts while nothing was bound left no copies. The one attempt in
    // flight when the binding came back may have been routed in part (its
    // first messages unroutable, its last ones delivered): it is retried
    // whole, so up to one batch (40 objects and their member changes)
    // arrives twice, with the same event ids.
    let unique: std::collections::HashSet<&str> =
        second.iter().map(|r| r.event.event_id.as_str()).collect();
    assert_eq!(
        unique.len(),
        total(&round2),
        "every committed event arrived"
    );
    assert!(
        second.len() - unique.len() <= 200,
        "more than one batch of copies: {} received, {} distinct",
        second.len(),
        unique.len()
    );
    let mut all = first;
    all.extend(second);
    let events: Vec<ChangeEvent> = all.iter().map(|r| r.event.clone()).collect();
    assert_complete_and_ordered(&all, &events);
    assert_matches_truth(&all, sim.simulator());
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_during_a_full_round_loses_nothing() {
    let sim = simulator(SimConfig {
        users: 25_000,
        groups: 30,
        page_size: 100,
        // At least 250 pages × 80 ms = 20 s: publishing never pauses for
        // long, and the round cannot end before the connection was closed
        // twice (each `rabbitmqctl` call takes seconds on a busy machine).
        // The latency drops to zero once both closes are done.
        page_latency: Duration::from_millis(80),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let exchange = unique("x");
    let queue = unique("q");
    let _cleanup = Cleanup::new().exchange(&exchange).queue(&queue);
    let config = connector(
        &sim,
        dir.path(),
        &exchange,
        &queue_toml(&queue, "quorum", &["#"]),
    );
    let (conn, admin) = admin().await;
    // Declare the topology first, so the queue can be watched from the start.
    sink::build(&config.sink)
        .await
        .unwrap()
        .check()
        .await
        .unwrap();

    let recording = Arc::new(Recording {
        inner: sink::build(&config.sink).await.unwrap(),
        errors: Mutex::new(vec![]),
    });
    let status = StatusRegistry::default();
    let options = RunOptions {
        once: true,
        status: status.clone(),
        ..Default::default()
    };
    let prepared = Prepared::with_sink(
        &config,
        &options,
        recording.clone(),
        config.resolve().unwrap(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let run = tokio::spawn(prepared.run(true));
    // Close the connection twice while the round is running, each time
    // once the (re)connected sink has delivered something.
    for round in 1..=2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let before = depth(&admin, &queue).await;
        loop {
            assert!(
                !run.is_finished(),
                "the round finished before the connection could be closed {round} times; make it longer"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "close #{round}: no traffic"
            );
            if depth(&admin, &queue).await > before && close_connections_named(&exchange) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Traffic after each close proves a reconnect: the first close's by the
    // loop above, the second's here.
    let after_second_close = depth(&admin, &queue).await;
    sim.simulator().set_page_latency(Duration::ZERO);
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the round completes after reconnecting")
        .unwrap()
        .unwrap();
    let round_took = started.elapsed();
    assert!(
        depth(&admin, &queue).await > after_second_close,
        "nothing was published after the second close: the test did not exercise a reconnect"
    );
    // Whether a publish was in flight at a close is up to timing: both
    // outcomes (a failed publish retried, or a reconnect before the next
    // one) must lose nothing.
    let failures = recording.errors.lock().unwrap().len();
    let committed = committed_events(&status);
    assert_eq!(committed.get("users.created").copied(), Some(25_000));
    let got = drain(&admin, &queue, total(&committed), Duration::from_secs(30)).await;
    let events: Vec<ChangeEvent> = {
        let mut seen = HashSet::new();
        got.iter()
            .filter(|r| seen.insert(r.event.event_id.clone()))
            .map(|r| r.event.clone())
            .collect()
    };
    assert_eq!(
        events.len(),
        total(&committed),
        "every committed event arrived"
    );
    let duplicates = assert_complete_and_ordered(&got, &events);
    assert_matches_truth(&got, sim.simulator());
    eprintln!(
        "{} events in {round_took:?}, {failures} failed publishes, {duplicates} duplicates after two forced disconnects, none lost",
        events.len()
    );
    let _ = conn.close(200, "OK".into()).await;
}

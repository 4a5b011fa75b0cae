//! `graphdelta replay` end to end: the simulator changes the tenant through
//! rounds of churn (creates, updates under return=minimal, soft and hard
//! deletes, restores, membership changes) and a 410 resync; the connector
//! publishes into a file, Kafka (tansu) or a RabbitMQ stream queue; the
//! replay rebuilds each stream from what the sink holds and the result must
//! equal the simulator's ground truth object by object, and agree with the
//! connector's checkpoint memory (`--verify`). Duplicates from an
//! at-least-once restart (a checkpoint rolled back, the same batches
//! published again) must fold away.

mod common;
mod kafka_support;
mod rabbitmq_util;

use std::{path::Path, process::Command};

use graphdelta::{
    checkpoint::Store,
    config::Config,
    replay::{self, Materializer, ReplayStats, ReplayStore, SourceOptions},
    simulator::{ChurnSpec, Fault, FaultScope, GroundTruth, SimConfig, Simulator},
};
use kafka_support::{
    GROUP_SELECT, USER_SELECT, compare, connector_toml, rand_name, start_simulator, test_brokers,
};

/// The connector of `kafka_support::connector_toml` with `return_minimal`
/// on the users stream.
fn connector_text(handle: &graphdelta::simulator::SimHandle, dir: &Path, sink: &str) -> String {
    let text = connector_toml(handle, dir, sink);
    let users = "name = \"users\"\nresource = \"users\"\n";
    assert!(text.contains(users));
    text.replacen(users, &format!("{users}return_minimal = true\n"), 1)
}

fn parse(text: &str) -> Config {
    Config::parse(text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

async fn run_once(config: &Config) {
    graphdelta::runtime::run(
        config,
        graphdelta::runtime::RunOptions {
            once: true,
            ..Default::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("run failed: {e}"));
}

/// Replays `stream` through the library into a temporary store.
async fn rebuild(config: &Config, stream: &str, options: &SourceOptions) -> ReplayStore {
    let mut source = replay::open_source(config, stream, options)
        .await
        .unwrap_or_else(|e| panic!("{stream}: opening the replay source: {e}"));
    let stream = stream.to_string();
    tokio::task::spawn_blocking(move || {
        let mut store = ReplayStore::temporary().unwrap();
        replay::fold(&mut source, &mut store, &stream, |_| {})
            .unwrap_or_else(|e| panic!("{stream}: replay: {e}"));
        store.commit(&stream, &source.description).unwrap();
        store
    })
    .await
    .unwrap()
}

/// The replayed state as a [`Materializer`], for `kafka_support::compare`.
fn state(store: &ReplayStore) -> Materializer {
    let mut objects = Vec::new();
    store
        .for_each_object(|id, o| objects.push((id, o)))
        .unwrap();
    objects.into_iter().collect()
}

/// Replays both streams, compares them with the truth object by object and
/// verifies them against the checkpoint store; returns the counters.
async fn assert_replay_matches(
    config: &Config,
    options: &SourceOptions,
    truth: &GroundTruth,
    label: &str,
) -> (ReplayStats, ReplayStats) {
    let mut stats = Vec::new();
    let mut diffs = Vec::new();
    for (stream, objects, select) in [
        ("users", &truth.users, USER_SELECT),
        ("groups", &truth.groups, GROUP_SELECT),
    ] {
        let store = rebuild(config, stream, options).await;
        diffs.extend(compare(
            &format!("{label} {stream}"),
            &state(&store),
            objects,
            select,
        ));
        let memory = Store::open_read_only(&config.checkpoint.path, stream)
            .unwrap()
            .unwrap_or_else(|| panic!("{stream}: no checkpoint store"));
        let report = replay::verify(&store, &memory).unwrap();
        assert!(
            report.agrees(),
            "{label} {stream}: verify found {} differences:\n{}",
            report.differences(),
            report.examples.join("\n")
        );
        assert_eq!(report.objects, objects.len() as u64, "{label} {stream}");
        stats.push(store.stats());
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    (stats[0], stats[1])
}

fn small_tenant(seed: u64) -> SimConfig {
    SimConfig {
        users: 300,
        groups: 15,
        members_per_group: 8,
        member_slice: 5,
        page_size: 40,
        seed,
        ..SimConfig::default()
    }
}

/// Churn rounds and a 410 resync; checks the replay after some of them.
async fn churn_and_check(
    simulator: &Simulator,
    config: &Config,
    options: &SourceOptions,
    rounds: usize,
) {
    run_once(config).await;
    assert_replay_matches(config, options, &simulator.truth(), "initial").await;
    for round in 1..=rounds {
        simulator.churn(&ChurnSpec::mixed(80));
        run_once(config).await;
        if round % 2 == 0 || round == rounds {
            assert_replay_matches(
                config,
                options,
                &simulator.truth(),
                &format!("round {round}"),
            )
            .await;
        }
    }
    // Graph resets the sync state: a full round, deletions inferred.
    simulator.churn(&ChurnSpec::mixed(80));
    simulator.inject(Fault::Gone {
        count: 2,
        scope: FaultScope::DeltaLink,
    });
    run_once(config).await;
    assert_replay_matches(config, options, &simulator.truth(), "after 410").await;
    simulator.churn(&ChurnSpec::mixed(80));
    run_once(config).await;
}

/// Rolls the checkpoint store back to `saved` (a copy taken earlier): the
/// next run publishes the same batches again, as after a crash between the
/// broker's ack and the commit.
fn roll_back(state: &Path, saved: &Path) {
    std::fs::remove_dir_all(state).unwrap();
    common::copy_dir(saved, state).unwrap();
}

fn file_sink(dir: &Path) -> String {
    format!(
        "[sink]\ntype = \"file\"\npath = \"{}\"",
        dir.join("events.ndjson").display()
    )
}

fn graphdelta(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_graphdelta"))
        .args(args)
        .output()
        .expect("the graphdelta binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_replay_rebuilds_the_truth_across_churn_and_a_resync() {
    let (simulator, handle) = start_simulator(small_tenant(21)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&connector_text(&handle, dir.path(), &file_sink(dir.path())));
    let options = SourceOptions::default();
    churn_and_check(&simulator, &config, &options, 6).await;
    let (users, groups) =
        assert_replay_matches(&config, &options, &simulator.truth(), "final").await;
    // One file holds both streams: each replay skips the other's events.
    assert_eq!(users.other_streams, groups.events);
    assert_eq!(users.duplicates + groups.duplicates, 0);

    // The command: JSON lines that rebuild the truth, and --verify.
    let path = dir.path().join("connector.toml");
    std::fs::write(
        &path,
        connector_text(&handle, dir.path(), &file_sink(dir.path())),
    )
    .unwrap();
    let out = dir.path().join("users.jsonl");
    let (code, stdout, stderr) = graphdelta(&[
        "replay",
        "--config",
        path.to_str().unwrap(),
        "--stream",
        "users",
        "--out",
        out.to_str().unwrap(),
        "--verify",
    ]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("users: verified:"), "{stdout}");
    let lines: Materializer = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| replay::store::parse_jsonl_line(l).unwrap())
        .collect();
    let diffs = compare("jsonl users", &lines, &simulator.truth().users, USER_SELECT);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));

    // sqlite: output, read back through the library.
    let db = dir.path().join("groups.db");
    let (code, stdout, stderr) = graphdelta(&[
        "replay",
        "--config",
        path.to_str().unwrap(),
        "--stream",
        "groups",
        "--out",
        &format!("sqlite:{}", db.display()),
    ]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let groups_db = ReplayStore::open(&db).unwrap();
    let diffs = compare(
        "sqlite groups",
        &state(&groups_db),
        &simulator.truth().groups,
        GROUP_SELECT,
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert_eq!(groups_db.stats().events, groups.events);

    // Nothing to do, or a stream that does not exist: configuration errors.
    let (code, _, stderr) = graphdelta(&[
        "replay",
        "--config",
        path.to_str().unwrap(),
        "--stream",
        "users",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--verify"), "{stderr}");
    let (code, _, stderr) = graphdelta(&[
        "replay",
        "--config",
        path.to_str().unwrap(),
        "--stream",
        "nope",
        "--verify",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no stream `nope`"), "{stderr}");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_when_the_checkpoint_or_the_events_were_tampered_with() {
    let (simulator, handle) = start_simulator(small_tenant(22)).await;
    let dir = tempfile::tempdir().unwrap();
    let text = connector_text(&handle, dir.path(), &file_sink(dir.path()));
    let path = dir.path().join("connector.toml");
    std::fs::write(&path, &text).unwrap();
    let config = parse(&text);
    run_once(&config).await;
    simulator.churn(&ChurnSpec::mixed(60));
    run_once(&config).await;
    let verify = |stream: &str| {
        graphdelta(&[
            "replay",
            "--config",
            path.to_str().unwrap(),
            "--stream",
            stream,
            "--verify",
        ])
    };
    let (code, stdout, stderr) = verify("users");
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");

    // The store forgets one user and changes another's remembered property.
    let state_dir = dir.path().join("state");
    let (forgotten, changed) = {
        let store = Store::open(&state_dir, "users").unwrap();
        let mut live = Vec::new();
        store
            .for_each_object(|id, s| {
                if !s.hard_deleted && !s.soft_deleted && !s.property_hashes.is_empty() {
                    live.push((id.to_string(), s.clone()));
                }
            })
            .unwrap();
        let cp = store.load_checkpoint().unwrap().unwrap();
        let mut store = store;
        let mut writes = graphdelta::normalize::memory::StateWrites::default();
        writes.objects.insert(live[0].0.clone(), None);
        let mut s = live[1].1.clone();
        s.property_hashes[1] ^= 0xff;
        writes.objects.insert(live[1].0.clone(), Some(s));
        store.commit(&cp, &writes).unwrap();
        (live[0].0.clone(), live[1].0.clone())
    };
    let (code, stdout, _) = verify("users");
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("verification FAILED: 2 differences"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("extra in the replay: {forgotten}")),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("differs: {changed}")), "{stdout}");

    // Events lost from the file: a group's events disappear.
    let (code, stdout, stderr) = verify("groups");
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let events = dir.path().join("events.ndjson");
    let text = std::fs::read_to_string(&events).unwrap();
    let victim = text
        .lines()
        .find(|l| l.contains("\"stream\":\"groups\""))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["objectId"].as_str().map(str::to_string))
        .unwrap();
    let kept: String = text
        .lines()
        .filter(|l| !l.contains(&victim))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&events, kept).unwrap();
    let (code, stdout, _) = verify("groups");
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("missing from the replay: {victim}")),
        "{stdout}"
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_from_an_at_least_once_restart_fold_away() {
    let (simulator, handle) = start_simulator(small_tenant(23)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = parse(&connector_text(&handle, dir.path(), &file_sink(dir.path())));
    let state_dir = dir.path().join("state");
    let saved = dir.path().join("saved-state");
    run_once(&config).await;
    simulator.churn(&ChurnSpec::mixed(80));
    run_once(&config).await;
    common::copy_dir(&state_dir, &saved).unwrap();
    let events = dir.path().join("events.ndjson");
    let before = std::fs::read_to_string(&events).unwrap().lines().count();

    simulator.churn(&ChurnSpec::mixed(80));
    run_once(&config).await;
    let once = std::fs::read_to_string(&events).unwrap().lines().count();
    // The commit is lost: the same round is read and published again.
    roll_back(&state_dir, &saved);
    run_once(&config).await;
    let text = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= once + (once - before),
        "the round was not published again"
    );
    let mut ids: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["eventId"].to_string())
        .collect();
    ids.sort();
    let total = ids.len();
    ids.dedup();
    let repeated = (total - ids.len()) as u64;
    assert!(repeated > 0, "no event was published twice");

    let (users, groups) = assert_replay_matches(
        &config,
        &SourceOptions::default(),
        &simulator.truth(),
        "after a restart",
    )
    .await;
    assert!(
        users.duplicates + groups.duplicates >= repeated,
        "{repeated} repeated event ids, {} + {} duplicates skipped",
        users.duplicates,
        groups.duplicates
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topics_replay_into_the_truth_including_duplicates() {
    let brokers = test_brokers();
    let (simulator, handle) = start_simulator(small_tenant(24)).await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = rand_name("gd-replay");
    let sink = format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{tenant}}.{{stream}}\"\npartitions = 3"
    );
    let config = parse(&connector_text(&handle, dir.path(), &sink));
    let options = SourceOptions::default();
    churn_and_check(&simulator, &config, &options, 3).await;

    // An at-least-once restart: the last round published twice.
    let state_dir = dir.path().join("state");
    let saved = dir.path().join("saved-state");
    common::copy_dir(&state_dir, &saved).unwrap();
    simulator.churn(&ChurnSpec::mixed(80));
    run_once(&config).await;
    roll_back(&state_dir, &saved);
    run_once(&config).await;
    let (users, groups) =
        assert_replay_matches(&config, &options, &simulator.truth(), "kafka final").await;
    assert!(
        users.duplicates + groups.duplicates > 0,
        "the repeated round left no duplicates"
    );
    assert!(users.tombstones > 0, "hard deletes leave tombstones");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_stream_queue_replays_into_the_truth() {
    let (_conn, _channel) = rabbitmq_util::admin().await;
    let exchange = rabbitmq_util::unique("replay");
    let queue = rabbitmq_util::unique("replay-stream");
    let _cleanup = rabbitmq_util::Cleanup::new()
        .exchange(&exchange)
        .queue(&queue);
    let (simulator, handle) = start_simulator(small_tenant(25)).await;
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "[sink]\ntype = \"rabbitmq\"\nurl = \"{url}\"\nexchange = \"{exchange}\"\nconnection_name = \"{exchange}\"\n\n[[sink.declare_queues]]\nname = \"{queue}\"\ntype = \"stream\"\nbinding_keys = [\"#\"]",
        url = rabbitmq_util::amqp_url(),
    );
    let config = parse(&connector_text(&handle, dir.path(), &sink));
    let options = SourceOptions::default();
    churn_and_check(&simulator, &config, &options, 3).await;
    // An at-least-once restart: the last round published twice.
    let state_dir = dir.path().join("state");
    let saved = dir.path().join("saved-state");
    common::copy_dir(&state_dir, &saved).unwrap();
    simulator.churn(&ChurnSpec::mixed(80));
    run_once(&config).await;
    roll_back(&state_dir, &saved);
    run_once(&config).await;
    let (users, groups) =
        assert_replay_matches(&config, &options, &simulator.truth(), "rabbitmq final").await;
    assert!(
        users.duplicates + groups.duplicates > 0,
        "the repeated round left no duplicates"
    );
    // One queue holds both streams, and the replay read all of it.
    assert_eq!(users.other_streams, groups.events);
    assert_eq!(groups.other_streams, users.events);

    // A queue that is not a stream is refused, and nothing is consumed.
    let classic = rabbitmq_util::unique("replay-classic");
    let _cleanup_classic = rabbitmq_util::Cleanup::new().queue(&classic);
    let (_c, channel) = rabbitmq_util::admin().await;
    channel
        .queue_declare(
            classic.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            classic.as_str().into(),
            Default::default(),
            b"not an event",
            Default::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let why = replay::open_source(
        &config,
        "users",
        &SourceOptions {
            queue: Some(classic.clone()),
            ..SourceOptions::default()
        },
    )
    .await
    .expect_err("a classic queue is refused")
    .to_string();
    assert!(why.contains("not a stream queue"), "{why}");
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while rabbitmq_util::depth(&channel, &classic).await != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the message is back in the classic queue");
    handle.shutdown().await;
}

/// Peak RSS (VmHWM, KiB) of a child process, polled until it exits.
fn run_measured(args: &[&str]) -> (i32, String, u64, std::time::Duration) {
    let started = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_graphdelta"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the graphdelta binary runs");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    (status.code().unwrap_or(-1), stdout, peak_kib, elapsed)
}

/// The replay's memory does not grow with the number of events: a tenant
/// replayed at two sizes, the peak RSS compared. The bounded form uses 2 000
/// and 16 000 users; `GRAPHDELTA_REPLAY_SCALE_USERS=200000` sets the larger
/// size for a long run. Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_memory_does_not_grow_with_the_topic() {
    let large: usize = std::env::var("GRAPHDELTA_REPLAY_SCALE_USERS")
        .ok()
        .map(|v| {
            v.parse()
                .expect("GRAPHDELTA_REPLAY_SCALE_USERS is a number")
        })
        .unwrap_or(16_000);
    let mut peaks = Vec::new();
    for users in [2_000, large] {
        let (simulator, handle) = start_simulator(SimConfig {
            users,
            groups: users / 100,
            members_per_group: 20,
            page_size: 500,
            seed: 26,
            ..SimConfig::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let text = connector_text(&handle, dir.path(), &file_sink(dir.path()));
        let path = dir.path().join("connector.toml");
        std::fs::write(&path, &text).unwrap();
        let config = parse(&text);
        run_once(&config).await;
        for _ in 0..3 {
            simulator.churn(&ChurnSpec::mixed(users / 10));
            run_once(&config).await;
        }
        let out = dir.path().join("users.db");
        let (code, stdout, peak_kib, elapsed) = tokio::task::spawn_blocking({
            let path = path.clone();
            let out = out.clone();
            move || {
                run_measured(&[
                    "replay",
                    "--config",
                    path.to_str().unwrap(),
                    "--stream",
                    "users",
                    "--out",
                    &format!("sqlite:{}", out.display()),
                    "--verify",
                ])
            }
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{stdout}");
        let db = ReplayStore::open(&out).unwrap();
        let events = db.stats().events;
        let diffs = compare(
            "scale users",
            &state(&db),
            &simulator.truth().users,
            USER_SELECT,
        );
        assert!(diffs.is_empty(), "{}", diffs.join("\n"));
        println!(
            "replay of {users} users: {events} events in {:.2}s ({:.0} events/s), peak RSS {:.1} MiB",
            elapsed.as_secs_f64(),
            events as f64 / elapsed.as_secs_f64(),
            peak_kib as f64 / 1024.0
        );
        peaks.push((users, events, peak_kib));
        handle.shutdown().await;
    }
    let (small, large) = (peaks[0], peaks[1]);
    // 8x the events may not cost more than a few MiB: the state lives in
    // SQLite pages (16 MiB cache), the reader hands over a bounded channel.
    assert!(
        large.2 < small.2 + 24 * 1024,
        "peak RSS grew from {} KiB ({} events) to {} KiB ({} events)",
        small.2,
        small.1,
        large.2,
        large.1
    );
}

/// Where the broker's offsets are consistent (librdkafka's mock cluster,
/// like Apache Kafka), a partition ends at its high-water mark taken at
/// start: records appended while the replay runs are not read. (tansu's
/// `ListOffsets` lags its fetches, so the tests against it exercise the
/// end-of-partition path.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_replay_stops_at_the_high_water_mark_taken_at_start() {
    use graphdelta::{
        normalize::memory::StateWrites,
        proto::v1::ChangeType,
        sink::{Sink, kafka::KafkaSink},
    };
    use kafka_support::{checkpoint, event, out_batch, sink_config};
    use rdkafka::{mocking::MockCluster, producer::DefaultProducerContext};

    let topic = rand_name("gd-replay-mock");
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    mock.create_topic(&topic, 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let sink = KafkaSink::new(&sink_config(&brokers, &format!("topic = \"{topic}\""))).unwrap();
    let batch = |from: usize, n: usize| -> Vec<graphdelta::proto::v1::ChangeEvent> {
        (from..from + n)
            .map(|i| event("users", &format!("u{i:05}"), ChangeType::Created, 1))
            .collect()
    };
    let writes = StateWrites::default();
    // More than the reader buffers ahead of the fold, so that it is still
    // reading when the next records arrive.
    let before = batch(0, 5_000);
    let cp = checkpoint("users", 1);
    sink.publish(out_batch("users", 1, &before, &cp, &writes))
        .await
        .unwrap();

    set_secret_for_parse();
    let config = parse(&format!(
        r#"
[graph]
tenant_id = "contoso.onmicrosoft.com"
client_id = "x"
client_secret_env = "{}"

[[streams]]
name = "users"
resource = "users"

[sink]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}"

# Small fetches: the reader must still be fetching when records arrive.
[sink.properties]
"max.partition.fetch.bytes" = 4096
"queued.min.messages" = 1
"#,
        kafka_support::SECRET_ENV
    ));
    let mut source = replay::open_source(&config, "users", &SourceOptions::default())
        .await
        .unwrap();
    assert_eq!(source.total, Some(5_000));
    let first = source.next().await.unwrap().unwrap();
    assert!(matches!(first, replay::Record::Event(_)));
    // Appended after the replay started.
    let after = batch(5_000, 500);
    let cp = checkpoint("users", 2);
    sink.publish(out_batch("users", 2, &after, &cp, &writes))
        .await
        .unwrap();
    let mut read = 1;
    while let Some(record) = source.next().await {
        let replay::Record::Event(e) = record.unwrap() else {
            panic!("no tombstones were written")
        };
        assert!(
            e.object_id.as_str() < "u05000",
            "{} was appended later",
            e.object_id
        );
        read += 1;
    }
    assert_eq!(read, 5_000);
}

fn set_secret_for_parse() {
    // SAFETY: every test sets the same value.
    unsafe { std::env::set_var(kafka_support::SECRET_ENV, "simulator-secret") };
}

/// Exactly-once on librdkafka's mock cluster (it has transactions; tansu
/// has not): the store is one batch behind the checkpoint topic, as after a
/// crash between the two commits. `--verify` checks against a copy of the
/// store rolled forward the way the connector's next start does it, and
/// leaves the store alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_rolls_a_copy_of_the_store_forward_to_the_exactly_once_checkpoint() {
    use rdkafka::{mocking::MockCluster, producer::DefaultProducerContext};

    let prefix = rand_name("gd-replay-eos");
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    for t in ["users", "groups", "checkpoints"] {
        mock.create_topic(&format!("{prefix}.{t}"), 1, 1).unwrap();
    }
    let brokers = mock.bootstrap_servers();
    let (simulator, handle) = start_simulator(SimConfig {
        page_size: 500,
        ..small_tenant(27)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{stream}}\"\nexactly_once = true\ncheckpoint_topic = \"{prefix}.checkpoints\"\ntransactional_id_prefix = \"{prefix}-\"\ncreate_topics = false\ndelivery_timeout = \"2s\"\nstartup_timeout = \"1s\""
    );
    let text = connector_text(&handle, dir.path(), &sink);
    let path = dir.path().join("connector.toml");
    std::fs::write(&path, &text).unwrap();
    let config = parse(&text);
    let state_dir = dir.path().join("state");
    let saved = dir.path().join("saved-state");
    let seq = || kafka_support::committed_seq(dir.path(), "users").unwrap();

    run_once(&config).await;
    common::copy_dir(&state_dir, &saved).unwrap();
    let before = seq();
    simulator.churn(&ChurnSpec::mixed(20));
    run_once(&config).await;
    assert_eq!(seq(), before + 1, "the round is one batch");
    // The store loses its last commit; the checkpoint topic keeps it.
    roll_back(&state_dir, &saved);
    let store_file = graphdelta::checkpoint::store_path(&state_dir, "users");
    let untouched = std::fs::read(&store_file).unwrap();

    let store = rebuild(&config, "users", &SourceOptions::default()).await;
    let memory = Store::open_read_only(&state_dir, "users").unwrap().unwrap();
    assert!(
        !replay::verify(&store, &memory).unwrap().agrees(),
        "the store one batch behind must differ from the topic"
    );
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        graphdelta(&[
            "replay",
            "--config",
            path.to_str().unwrap(),
            "--stream",
            "users",
            "--verify",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("checkpoint topic is at batch {}", before + 1)),
        "{stdout}"
    );
    assert!(stdout.contains("users: verified:"), "{stdout}");
    assert_eq!(
        std::fs::read(&store_file).unwrap(),
        untouched,
        "the store was modified"
    );
    assert_eq!(seq(), before);
    handle.shutdown().await;
}

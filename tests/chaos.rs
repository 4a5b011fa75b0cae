//! The fault suite: the `graphdelta` binary, crashed again and again while a
//! simulated tenant keeps changing, must lose nothing.
//!
//! Each sink (file, Kafka on tansu, RabbitMQ) gets the same treatment: the
//! connector runs in service mode against the simulator (small pages,
//! churn every 100 ms, one 410 Gone halfway), and is killed over and over,
//! each time in another phase of a batch's life:
//!
//! - at a random instant (SIGKILL after a random delay);
//! - at a failpoint (`src/failpoint.rs`), the n-th time (n random) it is
//!   reached: `fetched` (mid-fetch), `mid_publish` (a batch partly handed
//!   to the sink: a torn line in the file), `acked` (between the broker's
//!   ack and the checkpoint commit), `committing` (inside the SQLite
//!   transaction, before `COMMIT`).
//!
//! After the last kill, churn stops and two `--once` runs catch up. Then
//! everything the sink holds is read back and checked:
//!
//! - **no loss**: per object, the distinct events' `object_version`s are
//!   exactly 1..n (a lost event leaves a gap; versions are never reused),
//!   and the events fold into the simulator's ground truth;
//! - **stable ids**: every copy of an object's version carries the same
//!   event id (a consumer deduplicates on it) and is an exact copy;
//! - **order per object**: first arrivals have increasing versions.
//!
//! Bounded (CI): 10 kills per sink. Long: `GRAPHDELTA_CHAOS_KILLS=60`
//! (`scripts/chaos`). `GRAPHDELTA_CHAOS_SEED` replays a run; the seed is
//! printed either way, with the figures (kills per phase, events,
//! duplicates, losses).

mod common;
mod kafka_support;
mod rabbitmq_util;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use graphdelta::{
    proto::v1::ChangeEvent,
    simulator::{ChurnSpec, Fault, FaultScope, GroundTruth, SimConfig, Simulator},
};

/// SplitMix64: a seeded, printable, dependency-free source of chaos.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// Where a run is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Random,
    Failpoint(&'static str),
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Random => f.write_str("random instant"),
            Phase::Failpoint(name) => f.write_str(name),
        }
    }
}

const PHASES: &[Phase] = &[
    Phase::Random,
    Phase::Failpoint("fetched"),
    Phase::Failpoint("mid_record"),
    Phase::Failpoint("mid_publish"),
    Phase::Failpoint("acked"),
    Phase::Failpoint("committing"),
];

/// The sink under test and how to read back what it holds.
enum Target {
    File,
    Kafka { brokers: String, prefix: String },
    RabbitMq { exchange: String, queue: String },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::File => "file",
            Target::Kafka { .. } => "kafka",
            Target::RabbitMq { .. } => "rabbitmq",
        }
    }

    fn sink_toml(&self, dir: &Path) -> String {
        match self {
            Target::File => format!(
                "[sink]\ntype = \"file\"\npath = \"{}\"\n",
                dir.join("events.ndjson").display()
            ),
            Target::Kafka { brokers, prefix } => format!(
                "[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{prefix}.{{stream}}\"\npartitions = 3\ndelivery_timeout = \"20s\"\n"
            ),
            Target::RabbitMq { exchange, queue } => format!(
                "[sink]\ntype = \"rabbitmq\"\nurl_env = \"{AMQP_ENV}\"\nexchange = \"{exchange}\"\nconfirm_timeout = \"10s\"\nconnect_timeout = \"5s\"\n\n[[sink.declare_queues]]\nname = \"{queue}\"\ntype = \"classic\"\nbinding_keys = [\"#\"]\n"
            ),
        }
    }

    /// Every event the sink holds, per stream, in the order a consumer
    /// reads them.
    async fn read(&self, dir: &Path) -> BTreeMap<String, Vec<ChangeEvent>> {
        let events: Vec<ChangeEvent> = match self {
            Target::File => common::read_events(&dir.join("events.ndjson")),
            Target::Kafka { brokers, prefix } => ["users", "groups"]
                .iter()
                .flat_map(|s| {
                    kafka_support::decode_events(&kafka_support::read_topic(
                        brokers,
                        &format!("{prefix}.{s}"),
                        false,
                    ))
                })
                .collect(),
            Target::RabbitMq { queue, .. } => {
                let (_conn, channel) = rabbitmq_util::admin().await;
                let n = rabbitmq_util::depth(&channel, queue).await as usize;
                let got = rabbitmq_util::drain(&channel, queue, n, Duration::from_secs(120)).await;
                assert!(got.len() >= n, "read {} of {n} messages", got.len());
                got.into_iter().map(|r| r.event).collect()
            }
        };
        let mut by_stream: BTreeMap<String, Vec<ChangeEvent>> = BTreeMap::new();
        for e in events {
            by_stream.entry(e.stream.clone()).or_default().push(e);
        }
        by_stream
    }
}

const AMQP_ENV: &str = "GRAPHDELTA_CHAOS_AMQP";

fn spawn(run: &Run, once: bool, failpoint: Option<String>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&run.log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graphdelta"));
    cmd.args(["run", "--log-format", "json", "--config"])
        .arg(&run.config);
    if once {
        cmd.arg("--once");
    }
    match failpoint {
        Some(f) => cmd.env(graphdelta::failpoint::ENV, f),
        None => cmd.env_remove(graphdelta::failpoint::ENV),
    };
    cmd.env(common::SECRET_ENV, "simulator-secret")
        .env(AMQP_ENV, &run.amqp_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the graphdelta binary")
}

/// One sink under test with its simulator, connector file and log.
struct Run {
    target: Target,
    simulator: Simulator,
    handle: graphdelta::simulator::SimHandle,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    amqp_url: String,
    seed: u64,
    started: Instant,
}

impl Run {
    /// A simulator (small pages, replays, empty pages) and a connector
    /// file for `target`; `extra` is appended to the file.
    async fn new(target: Target, seed: u64, extra: &str) -> Run {
        let (simulator, handle) = kafka_support::start_simulator(SimConfig {
            users: 300,
            groups: 20,
            members_per_group: 8,
            member_slice: 4,
            page_size: 25,
            replay_rate: 0.05,
            empty_pages: true,
            seed,
            ..SimConfig::default()
        })
        .await;
        Run::build(target, simulator, handle, seed, |toml| {
            format!(
                "{}\n{extra}",
                toml.replace("poll_interval = \"1s\"", "poll_interval = \"200ms\"")
            )
        })
    }

    /// A connector file for `target` against the simulator, as `edit`
    /// leaves the suite's usual one.
    fn build(
        target: Target,
        simulator: Simulator,
        handle: graphdelta::simulator::SimHandle,
        seed: u64,
        edit: impl FnOnce(String) -> String,
    ) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("connector.toml");
        let toml =
            kafka_support::connector_toml(&handle, dir.path(), &target.sink_toml(dir.path()));
        std::fs::write(&config, edit(toml)).unwrap();
        let log = dir.path().join("connector.log");
        Run {
            target,
            simulator,
            handle,
            dir,
            config,
            log,
            amqp_url: rabbitmq_util::amqp_url(),
            seed,
            started: Instant::now(),
        }
    }

    /// Stops the churn's effects from racing the check: two `--once` runs
    /// (the first finishes any round a kill interrupted, the second reads
    /// the changes made meanwhile), then reads the sink and checks it
    /// against the ground truth.
    /// Returns the number of users the tenant ended with.
    async fn catch_up_and_check(&self, figures: &mut Figures) -> usize {
        self.simulator.clear_faults();
        self.simulator.set_page_latency(Duration::ZERO);
        for _ in 0..2 {
            let mut child = spawn(self, true, None);
            let status = wait_exit(&mut child, Duration::from_secs(180))
                .await
                .unwrap_or_else(|| {
                    kill9(&mut child);
                    panic!("the catch-up run did not finish:\n{}", tail(&self.log))
                });
            assert!(
                status.success(),
                "the catch-up run failed ({status}):\n{}",
                tail(&self.log)
            );
        }
        let truth = self.simulator.truth();
        let by_stream = self.target.read(self.dir.path()).await;
        check(&by_stream, &truth, figures);
        truth.users.len()
    }

    /// Prints the figures, then fails on any loss, unstable id or disorder.
    fn report(&self, what: &str, figures: &Figures) {
        let sink = self.target.name();
        let seed = self.seed;
        let per_phase: Vec<String> = figures
            .kills
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        let kills = if figures.kills.is_empty() {
            "no kills".to_string()
        } else {
            format!(
                "kills {} ({}; {} failpoints not reached in 15 s, killed instead)",
                figures.kills.values().sum::<u32>(),
                per_phase.join(", "),
                figures.unreached
            )
        };
        eprintln!(
            "{what}[{sink}]: seed {seed}: {kills}, changes {} (simulator log), events {}, distinct {}, duplicates {}, losses {}, unstable ids {}, out of order {}, {:.1} s",
            self.simulator.seq(),
            figures.events,
            figures.distinct,
            figures.duplicates(),
            figures.losses.len(),
            figures.unstable_ids.len(),
            figures.disorder.len(),
            self.started.elapsed().as_secs_f64(),
        );
        let failed = !(figures.losses.is_empty()
            && figures.unstable_ids.is_empty()
            && figures.disorder.is_empty());
        if failed {
            // Keep the evidence: the sink's file, the store, the log.
            let kept = self.dir.path().with_extension("kept");
            let _ = std::fs::remove_dir_all(&kept);
            if common::copy_dir(self.dir.path(), &kept).is_ok() {
                eprintln!("{what}[{sink}]: files kept in {}", kept.display());
            }
        }
        let show = |v: &[String]| v.iter().take(20).cloned().collect::<Vec<_>>().join("\n");
        assert!(
            figures.losses.is_empty(),
            "{what}[{sink}] seed {seed}: {} losses:\n{}",
            figures.losses.len(),
            show(&figures.losses)
        );
        assert!(
            figures.unstable_ids.is_empty(),
            "{what}[{sink}] seed {seed}: re-emitted events with new ids or other content:\n{}",
            show(&figures.unstable_ids)
        );
        assert!(
            figures.disorder.is_empty(),
            "{what}[{sink}] seed {seed}: out of order:\n{}",
            show(&figures.disorder)
        );
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits for the child to exit by itself; `None` after `timeout`.
async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL the connector");
    child.wait().unwrap();
}

/// What the run produced, as the suite reports it.
#[derive(Debug, Default)]
struct Figures {
    kills: BTreeMap<Phase, u32>,
    unreached: u32,
    events: usize,
    distinct: usize,
    /// Versions missing from an object's 1..n, plus truth differences.
    losses: Vec<String>,
    /// An object version seen with two different event ids, or two copies
    /// of an event that differ (a duplicate must be an exact copy).
    unstable_ids: Vec<String>,
    /// A first arrival older than an earlier one of the same object.
    disorder: Vec<String>,
}

impl Figures {
    fn duplicates(&self) -> usize {
        self.events - self.distinct
    }
}

fn check(
    by_stream: &BTreeMap<String, Vec<ChangeEvent>>,
    truth: &GroundTruth,
    figures: &mut Figures,
) {
    for (stream, truth_objects, select) in [
        ("users", &truth.users, kafka_support::USER_SELECT),
        ("groups", &truth.groups, kafka_support::GROUP_SELECT),
    ] {
        let events = by_stream.get(stream).map(Vec::as_slice).unwrap_or_default();
        figures.events += events.len();
        let mut seen_ids = HashSet::new();
        let mut first: HashMap<(&str, u64), &ChangeEvent> = HashMap::new();
        let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
        for e in events {
            match first.insert((&e.object_id, e.object_version), e) {
                Some(earlier) if earlier.event_id != e.event_id => {
                    figures.unstable_ids.push(format!(
                        "{stream}: {} v{}: event ids {} and {}",
                        e.object_id, e.object_version, earlier.event_id, e.event_id
                    ))
                }
                Some(earlier) if earlier != e => figures.unstable_ids.push(format!(
                    "{stream}: {} v{}: two copies of event {} differ:\n  {earlier:?}\n  {e:?}",
                    e.object_id, e.object_version, e.event_id
                )),
                _ => {}
            }
            if !seen_ids.insert(e.event_id.as_str()) {
                continue;
            }
            let v = versions.entry(&e.object_id).or_default();
            if v.last().is_some_and(|last| *last >= e.object_version) {
                figures.disorder.push(format!(
                    "{stream}: {} v{} arrived after v{}",
                    e.object_id,
                    e.object_version,
                    v.last().unwrap()
                ));
            }
            v.push(e.object_version);
        }
        figures.distinct += seen_ids.len();
        for (id, mut v) in versions {
            v.sort_unstable();
            v.dedup();
            let missing: Vec<u64> = (1..=*v.last().unwrap())
                .filter(|n| v.binary_search(n).is_err())
                .collect();
            if !missing.is_empty() {
                figures
                    .losses
                    .push(format!("{stream}: {id}: versions {missing:?} missing"));
            }
        }
        figures.losses.extend(kafka_support::compare(
            stream,
            &kafka_support::fold(events),
            truth_objects,
            select,
        ));
    }
}

fn seed() -> u64 {
    env_u64("GRAPHDELTA_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

async fn crash_suite(target: Target) {
    let seed = seed();
    let kills = env_u64("GRAPHDELTA_CHAOS_KILLS").unwrap_or(10) as usize;
    eprintln!(
        "chaos[{}]: seed {seed} (GRAPHDELTA_CHAOS_SEED={seed} replays the choices), {kills} kills",
        target.name()
    );
    let mut rng = Rng(seed);
    let run = Run::new(target, seed, "").await;
    let simulator = &run.simulator;
    simulator.set_page_latency(Duration::from_millis(3));
    let churn = simulator.spawn_auto_churn(Duration::from_millis(100), ChurnSpec::mixed(30));
    let mut figures = Figures::default();
    for i in 0..kills {
        if i == kills / 2 {
            // A resync (and its reconciliation) gets crashed too.
            simulator.inject(Fault::Gone {
                count: 1,
                scope: FaultScope::DeltaLink,
            });
        }
        let phase = PHASES[i % PHASES.len()];
        match phase {
            Phase::Random => {
                let mut child = spawn(&run, false, None);
                let delay = rng.range(150, 2500);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "the connector exited by itself ({status}):\n{}",
                        tail(&run.log)
                    );
                }
                kill9(&mut child);
                *figures.kills.entry(phase).or_default() += 1;
            }
            Phase::Failpoint(name) => {
                let at = rng.range(1, 12);
                let mut child = spawn(&run, false, Some(format!("{name}@{at}")));
                match wait_exit(&mut child, Duration::from_secs(15)).await {
                    Some(status) => {
                        assert_eq!(
                            status.signal(),
                            Some(6),
                            "expected an abort at failpoint {name}@{at}, got {status}:\n{}",
                            tail(&run.log)
                        );
                        *figures.kills.entry(phase).or_default() += 1;
                    }
                    None => {
                        // Not reached in time (an idle phase): a plain kill.
                        kill9(&mut child);
                        figures.unreached += 1;
                        *figures.kills.entry(Phase::Random).or_default() += 1;
                    }
                }
            }
        }
    }
    churn.abort();
    let users = run.catch_up_and_check(&mut figures).await;
    assert!(users > 300, "the tenant churned");
    run.report("chaos", &figures);
    let reached: u32 = figures.kills.values().sum();
    assert_eq!(reached as usize, kills);
    let aborted = std::fs::read_to_string(&run.log)
        .unwrap_or_default()
        .matches("failpoint `")
        .count();
    assert_eq!(
        aborted as u32,
        reached - figures.kills.get(&Phase::Random).copied().unwrap_or(0),
        "every failpoint kill printed its line"
    );
    if kills >= PHASES.len() {
        assert_eq!(
            figures.kills.len(),
            PHASES.len(),
            "every phase must be hit at least once: {:?}",
            figures.kills
        );
    }
    run.handle.shutdown().await;
}

/// One `--once` run, to its end; its exit status and the log's tail.
async fn once(run: &Run, failpoint: Option<&str>) -> (std::process::ExitStatus, String) {
    let mut child = spawn(run, true, failpoint.map(str::to_string));
    let status = wait_exit(&mut child, Duration::from_secs(120))
        .await
        .unwrap_or_else(|| {
            kill9(&mut child);
            panic!("the run did not finish:\n{}", tail(&run.log))
        });
    (status, tail(&run.log))
}

/// A small tenant and a file-sink connector whose acknowledged batches
/// wait to be committed (`checkpoint_interval`), for crashes placed by
/// hand; its first full sync done.
async fn small_run(sim: SimConfig) -> Run {
    let seed = sim.seed;
    let (simulator, handle) = kafka_support::start_simulator(sim).await;
    let run = Run::build(Target::File, simulator, handle, seed, |toml| {
        toml.replace("[runtime]\n", "[runtime]\ncheckpoint_interval = \"1h\"\n")
    });
    let (status, log) = once(&run, None).await;
    assert!(status.success(), "the first sync failed: {log}");
    run
}

/// A 410 for the next `streams` deltaLinks, a run that dies at `failpoint`
/// in the resync round it starts, and a run that finishes it; every event
/// the file then holds.
async fn resync_crash_and_restart(run: &Run, streams: u32, failpoint: &str) -> Vec<ChangeEvent> {
    run.simulator.inject(Fault::Gone {
        count: streams,
        scope: FaultScope::DeltaLink,
    });
    let (status, log) = once(run, Some(failpoint)).await;
    assert_eq!(
        status.signal(),
        Some(6),
        "expected an abort at {failpoint} in the resync round: {log}"
    );
    let (status, log) = once(run, None).await;
    assert!(status.success(), "the run after the crash failed: {log}");
    common::read_events(&run.dir.path().join("events.ndjson"))
}

/// A crash in a resync round must not lose the memory writes of pages
/// that reported nothing. In such a round most pages only confirm what is
/// known (no events, but every object and membership is marked as seen);
/// acknowledged at once, they wait to be committed with later batches. If
/// a later batch with events is in the outbox when the process dies, its
/// checkpoint covers those pages too: unless they are in the outbox as
/// well, their "seen" marks are lost, and the reconciliation after the
/// round reports live objects and memberships as deleted.
///
/// Deterministic: groups with members listed over several pages, commits
/// held back (`checkpoint_interval`), one change placed in the resync
/// round's last page, and the crash at the first publish of that round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_a_resync_round_keeps_what_quiet_pages_saw() {
    let run = small_run(SimConfig {
        users: 30,
        groups: 6,
        members_per_group: 8,
        member_slice: 4,
        page_size: 5,
        seed: 11,
        ..SimConfig::default()
    })
    .await;
    // The one change of the resync round: a group created now is listed
    // after every known one, in the round's last pages.
    let late = run
        .simulator
        .create_group(serde_json::json!({"displayName": "Late group"}))
        .unwrap();
    // One 410 (the first stream to poll), the crash at the round's first
    // publish.
    let events = resync_crash_and_restart(&run, 1, "mid_publish@1").await;
    let inferred: Vec<String> = events
        .iter()
        .filter(|e| e.inferred)
        .map(|e| format!("{} v{}", e.object_id, e.object_version))
        .collect();
    assert!(
        inferred.is_empty(),
        "nothing was deleted, yet the reconciliation inferred {} changes: {inferred:?}",
        inferred.len()
    );
    assert!(
        events.iter().any(|e| e.object_id == late),
        "the late group was published"
    );
    let mut figures = Figures::default();
    run.catch_up_and_check(&mut figures).await;
    run.report("resync crash", &figures);
}

/// The outbox segments under a run's store, with their sizes.
fn outbox_segments(run: &Run) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run.dir.path().join("state")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.extension().is_some_and(|e| e == "outbox") {
            for segment in std::fs::read_dir(&dir).unwrap() {
                let path = segment.unwrap().path();
                let len = std::fs::metadata(&path).unwrap().len();
                out.push((path, len));
            }
        }
    }
    out.sort();
    out
}

/// A crash while a batch's outbox record is half written: the sink never
/// saw the batch, so the restart skips the torn record, reads the page
/// again and records in a segment of its own; once everything is
/// committed, no segment is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_outbox_record_is_skipped_and_its_page_read_again() {
    let run = small_run(SimConfig {
        users: 30,
        groups: 3,
        members_per_group: 4,
        page_size: 5,
        seed: 13,
        ..SimConfig::default()
    })
    .await;
    assert!(
        outbox_segments(&run).is_empty(),
        "a finished run leaves no segment: {:?}",
        outbox_segments(&run)
    );
    let file = run.dir.path().join("events.ndjson");
    let published = common::read_events(&file).len();
    run.simulator.churn(&ChurnSpec::mixed(20));
    // The second record of the run: the first one is whole.
    let (status, log) = once(&run, Some("mid_record@2")).await;
    assert_eq!(
        status.signal(),
        Some(6),
        "expected an abort at mid_record: {log}"
    );
    let torn = outbox_segments(&run);
    assert!(
        torn.iter().any(|(_, len)| *len > 0),
        "the crash left the records behind: {torn:?}"
    );
    assert!(common::read_events(&file).len() >= published);

    let (status, log) = once(&run, None).await;
    assert!(status.success(), "the run after the crash failed: {log}");
    assert!(
        outbox_segments(&run).is_empty(),
        "every batch committed, yet segments are left: {:?}",
        outbox_segments(&run)
    );
    let mut figures = Figures::default();
    run.catch_up_and_check(&mut figures).await;
    run.report("torn record", &figures);
}

/// Changes inferred by the reconciliation after a resync are recorded in
/// the outbox like any other batch: a crash between their ack and their
/// commit publishes the very same events again (their `observed_at`
/// included), not a second inference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_the_reconciliation_republishes_the_same_inferences() {
    let run = small_run(SimConfig {
        users: 30,
        groups: 3,
        members_per_group: 8,
        member_slice: 4,
        page_size: 5,
        seed: 12,
        ..SimConfig::default()
    })
    .await;
    let simulator = &run.simulator;
    // Memberships removed while the sync state is lost: a full round lists
    // each group with the members it has, so only the reconciliation can
    // tell. A 410 for each stream's deltaLink.
    let groups: Vec<String> = simulator
        .truth()
        .groups
        .iter()
        .map(|g| g.id.clone())
        .collect();
    for group in &groups {
        let members = simulator
            .truth()
            .groups
            .iter()
            .find(|g| g.id == *group)
            .and_then(|g| g.members.clone())
            .unwrap_or_default();
        for member in members.iter().take(2) {
            simulator.remove_member(group, member).unwrap();
        }
    }
    let events = resync_crash_and_restart(&run, 2, "reconcile_acked@1").await;
    for group in &groups {
        let inferred: Vec<&ChangeEvent> = events
            .iter()
            .filter(|e| e.object_id == *group && e.inferred)
            .collect();
        assert_eq!(
            inferred.len(),
            2,
            "{group}: the inferred removals, published before the crash and again after it"
        );
        assert_eq!(inferred[0], inferred[1], "{group}: the copy differs");
        assert_eq!(inferred[0].member_changes.len(), 2);
    }
    let mut figures = Figures::default();
    run.catch_up_and_check(&mut figures).await;
    run.report("reconcile crash", &figures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_every_phase_loses_nothing_file_sink() {
    crash_suite(Target::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_every_phase_loses_nothing_kafka_sink() {
    let brokers = kafka_support::test_brokers();
    crash_suite(Target::Kafka {
        brokers,
        prefix: kafka_support::rand_name("gd-chaos"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_every_phase_loses_nothing_rabbitmq_sink() {
    let _ = rabbitmq_util::admin().await; // fails loudly without a broker
    let exchange = rabbitmq_util::unique("chaos");
    let queue = format!("{exchange}.all");
    let _cleanup = rabbitmq_util::Cleanup::new()
        .exchange(&exchange)
        .queue(&queue);
    crash_suite(Target::RabbitMq { exchange, queue }).await;
}

/// The events the running connector has had acknowledged (all streams), per
/// its `/status`.
async fn acked_events(base: &str) -> Option<u64> {
    let body: serde_json::Value = reqwest::get(format!("{base}/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        body["streams"]
            .as_array()?
            .iter()
            .flat_map(|s| s["events"].as_object().into_iter().flatten())
            .filter_map(|(_, n)| n.as_u64())
            .sum(),
    )
}

async fn ready(base: &str) -> Option<(u16, String)> {
    common::get(&format!("{base}/health/ready")).await
}

/// The broker goes away (every connection through the relay dropped, new
/// ones refused) for `GRAPHDELTA_CHAOS_OUTAGE_SECS` (default 5; the long
/// form: 30) while the tenant keeps changing. Readiness must report it,
/// the stream must resume within 5 s of the broker's return, and nothing
/// may be lost.
async fn outage_suite(mut run: Run, switch: &common::Switch) {
    let outage = Duration::from_secs(env_u64("GRAPHDELTA_CHAOS_OUTAGE_SECS").unwrap_or(5));
    let sink = run.target.name();
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut text = std::fs::read_to_string(&run.config).unwrap();
    text.push_str(&format!(
        "\n[http]\nlisten = \"127.0.0.1:{port}\"\nprobe_interval = \"200ms\"\n"
    ));
    std::fs::write(&run.config, text).unwrap();
    run.started = Instant::now();
    let churn = run
        .simulator
        .spawn_auto_churn(Duration::from_millis(100), ChurnSpec::mixed(30));
    let mut child = spawn(&run, false, None);
    common::poll("ready", Duration::from_secs(60), async || {
        ready(&base).await.filter(|(s, _)| *s == 200)
    })
    .await;
    common::poll("the first events", Duration::from_secs(60), async || {
        acked_events(&base).await.filter(|n| *n > 0)
    })
    .await;

    switch.set(false);
    let cut = Instant::now();
    let (_, reason) = common::poll("readiness to report the outage", outage, async || {
        ready(&base).await.filter(|(s, _)| *s == 503)
    })
    .await;
    let reported = cut.elapsed();
    assert!(reason.contains(&format!("sink {sink}")), "{reason}");
    let during = acked_events(&base).await.unwrap();
    tokio::time::sleep(outage.saturating_sub(cut.elapsed())).await;
    let acked_meanwhile = acked_events(&base).await.unwrap() - during;
    assert_eq!(
        acked_meanwhile, 0,
        "events acknowledged while the broker was away"
    );
    assert!(child.try_wait().unwrap().is_none(), "{}", tail(&run.log));

    switch.set(true);
    let back = Instant::now();
    let before = acked_events(&base).await.unwrap();
    let resume_deadline = back + Duration::from_secs(60);
    while acked_events(&base).await.is_none_or(|n| n <= before) {
        assert!(
            Instant::now() < resume_deadline,
            "{sink}: the stream did not resume within 60 s of the broker's return:\n{}",
            tail(&run.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = back.elapsed();
    common::poll("ready again", Duration::from_secs(30), async || {
        ready(&base).await.filter(|(s, _)| *s == 200)
    })
    .await;
    churn.abort();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60))
        .await
        .expect("SIGTERM drains and exits");
    assert!(status.success(), "{status}:\n{}", tail(&run.log));

    let mut figures = Figures::default();
    let users = run.catch_up_and_check(&mut figures).await;
    assert!(users > 300, "the tenant churned");
    let log = std::fs::read_to_string(&run.log).unwrap_or_default();
    eprintln!(
        "outage[{sink}]: broker away {:.1} s; readiness reported it after {:.2} s; stream resumed {:.2} s after the broker's return; {} failed publishes retried, {} producers replaced",
        outage.as_secs_f64(),
        reported.as_secs_f64(),
        resumed.as_secs_f64(),
        log.matches("Publish failed").count(),
        log.matches("was replaced").count(),
    );
    run.report("outage", &figures);
    assert!(
        resumed < Duration::from_secs(5),
        "the stream resumed {resumed:?} after the broker's return (promise: 5 s)"
    );
    run.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_outage_is_reported_and_survived_without_loss() {
    let _ = rabbitmq_util::admin().await; // fails loudly without a broker
    let exchange = rabbitmq_util::unique("outage");
    let queue = format!("{exchange}.all");
    let _cleanup = rabbitmq_util::Cleanup::new()
        .exchange(&exchange)
        .queue(&queue);
    let upstream: url::Url = rabbitmq_util::amqp_url().parse().unwrap();
    let upstream_addr = format!(
        "{}:{}",
        upstream.host_str().unwrap(),
        upstream.port().unwrap_or(5672)
    );
    let switch = common::Switch::start(upstream_addr.parse().unwrap()).await;
    let mut via_switch = upstream.clone();
    via_switch.set_host(Some("127.0.0.1")).unwrap();
    via_switch.set_port(Some(switch.port)).unwrap();
    let mut run = Run::new(Target::RabbitMq { exchange, queue }, seed(), "").await;
    run.amqp_url = via_switch.to_string();
    outage_suite(run, &switch).await;
}

/// A tansu of the test's own, advertised at the relay's port (Kafka
/// clients connect to the advertised address, so the relay must be it).
struct OwnTansu(Child);

impl Drop for OwnTansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_outage_is_reported_and_survived_without_loss() {
    let bin = std::env::var("GRAPHDELTA_TANSU_BIN").unwrap_or_else(|_| {
        panic!(
            "GRAPHDELTA_TANSU_BIN is not set: the Kafka outage test starts a tansu of its own; run it with scripts/test or export GRAPHDELTA_TANSU_BIN=/path/to/tansu"
        )
    });
    let listen = common::free_port();
    let switch = common::Switch::start(([127, 0, 0, 1], listen).into()).await;
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("tansu-outage-{listen}.log")))
            .unwrap();
    let _tansu = OwnTansu(
        Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{listen}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", switch.port),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("GRAPHDELTA_TANSU_BIN={bin}: cannot start: {e}")),
    );
    let brokers = format!("127.0.0.1:{}", switch.port);
    common::poll("tansu to listen", Duration::from_secs(30), async || {
        std::net::TcpStream::connect(("127.0.0.1", listen)).ok()
    })
    .await;
    let run = Run::new(
        Target::Kafka {
            brokers,
            prefix: kafka_support::rand_name("gd-outage"),
        },
        seed(),
        "",
    )
    .await;
    // Records time out during the outage (librdkafka then bumps the
    // idempotent producer's epoch, which tansu refuses as fenced): the
    // stream must get over that too.
    let text = std::fs::read_to_string(&run.config)
        .unwrap()
        .replace("delivery_timeout = \"20s\"", "delivery_timeout = \"3s\"");
    std::fs::write(&run.config, text).unwrap();
    outage_suite(run, &switch).await;
}

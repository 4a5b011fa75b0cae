//! The fault suite, part two: Graph misbehaving and the checkpoint disk
//! failing, against the `graphdelta` binary.
//!
//! Each Graph fault comes from the simulator (`src/simulator/faults.rs`) in
//! the middle of a round (on a nextLink) or on the deltaLink, and must give
//! a clear log line and the right outcome: retried (429 storms honouring
//! `Retry-After`, 503/504 runs, truncated or malformed JSON, a failing or
//! slow token endpoint, a token revoked mid-round), a resync (410, expired
//! sync tokens), or a stop with an error naming the cause (an object
//! without `id`, an unknown `@removed` reason, a page over
//! `graph.max_page_bytes`, a page that stays malformed, refused
//! credentials). Never a commit of a bad page: after every case the faults
//! are cleared, the connector runs again, and the file must hold each
//! object's versions exactly once, 1..n, folding into the ground truth.
//!
//! The disk cases put the checkpoint store on a tmpfs of its own (the tests
//! run as root, where `chmod` stops nothing): full, then remounted
//! read-only. The stream must stop with an error naming the store and the
//! fix, leave the committed checkpoint where it was, and lose nothing once
//! the disk is back.

mod common;
mod kafka_support;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use graphdelta::{
    checkpoint::Store,
    proto::v1::{ChangeEvent, StreamCheckpoint},
    simulator::{ChurnSpec, Fault, FaultScope, SimConfig, SimHandle, Simulator},
};

const SELECT: &[&str] = kafka_support::USER_SELECT;

struct Setup {
    simulator: Simulator,
    handle: SimHandle,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
}

/// A tenant of 200 users in pages of 20, and a connector reading them into
/// a file; `graph_extra` goes into `[graph]`, `store` is the checkpoint
/// directory (default: inside the temporary directory).
async fn setup(sim: SimConfig, graph_extra: &str, store: Option<&Path>) -> Setup {
    let (simulator, handle) = kafka_support::start_simulator(sim).await;
    let dir = tempfile::tempdir().unwrap();
    let state = store.map_or_else(|| dir.path().join("state"), Path::to_path_buf);
    let config = dir.path().join("connector.toml");
    std::fs::write(
        &config,
        format!(
            r#"
{graph}{graph_extra}

[[streams]]
name = "users"
resource = "users"
select = [{select}]

[sink]
type = "file"
path = "{events}"

[checkpoint]
path = "{state}"

[runtime]
retry_min = "10ms"
retry_max = "100ms"
checkpoint_interval = "0s"   # a commit per page: a bad page would show
"#,
            graph = kafka_support::graph_toml(&handle),
            select = kafka_support::toml_list(SELECT),
            events = dir.path().join("events.ndjson").display(),
            state = state.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("connector.log");
    Setup {
        simulator,
        handle,
        dir,
        config,
        log,
    }
}

fn small_tenant() -> SimConfig {
    SimConfig {
        users: 200,
        groups: 0,
        page_size: 20,
        seed: 5,
        ..SimConfig::default()
    }
}

/// One `graphdelta run --once`; returns whether it succeeded and its log.
async fn run_once(s: &Setup) -> (std::process::ExitStatus, String) {
    run_once_with(s, None).await
}

/// The same, with a failpoint armed (`name@n`).
async fn run_once_with(s: &Setup, failpoint: Option<&str>) -> (std::process::ExitStatus, String) {
    let config = s.config.clone();
    let log = s.log.clone();
    let failpoint = failpoint.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_graphdelta"));
        if let Some(f) = failpoint {
            cmd.env(graphdelta::failpoint::ENV, f);
        }
        let out = cmd
            .args(["run", "--once", "--log-format", "json", "--config"])
            .arg(&config)
            .env(common::SECRET_ENV, "simulator-secret")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run the graphdelta binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&log, &text).unwrap();
        (out.status, text)
    })
    .await
    .unwrap()
}

fn events(s: &Setup) -> Vec<ChangeEvent> {
    common::read_events(&s.dir.path().join("events.ndjson"))
}

fn committed(state: &Path) -> Option<StreamCheckpoint> {
    Store::open_read_only(state, "users")
        .expect("store opens")
        .and_then(|s| s.load_checkpoint().expect("checkpoint loads"))
}

/// No event twice (unless `repeats`: then every repeat carries the
/// original's id), no version missing, and the fold is the truth.
fn assert_exact(s: &Setup, label: &str, repeats: bool) {
    let events = events(s);
    let mut ids: HashSet<&str> = HashSet::new();
    let mut id_of: HashMap<(&str, u64), &str> = HashMap::new();
    let mut versions: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in &events {
        let id = id_of
            .entry((&e.object_id, e.object_version))
            .or_insert(&e.event_id);
        assert_eq!(*id, e.event_id, "{label}: a repeated event got a new id");
        if ids.insert(&e.event_id) {
            versions
                .entry(&e.object_id)
                .or_default()
                .push(e.object_version);
        }
    }
    if !repeats {
        assert_eq!(
            ids.len(),
            events.len(),
            "{label}: an event was written twice"
        );
    }
    for (id, v) in versions {
        let want: Vec<u64> = (1..=v.len() as u64).collect();
        assert_eq!(
            v, want,
            "{label}: {id}: versions with a gap or out of order"
        );
    }
    let diffs = kafka_support::compare(
        label,
        &kafka_support::fold(&events),
        &s.simulator.truth().users,
        SELECT,
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// What a fault must lead to.
enum Outcome {
    /// The run succeeds (after retries or a resync).
    Recovers,
    /// The run stops (exit 1) with an error containing these.
    Stops(&'static [&'static str]),
}

struct Case {
    faults: Vec<Fault>,
    /// Inject after a clean first round, so that they hit the deltaLink.
    on_delta_link: bool,
    /// Injected 100 ms into the run (the round is slowed to last longer).
    during_round: Option<Fault>,
    /// A first run dies at this failpoint (`name@n`) mid-round; the faults
    /// are injected after it, so they meet the nextLink it left.
    crash_first: Option<&'static str>,
    graph_extra: &'static str,
    outcome: Outcome,
    /// Each must appear in the log.
    log: &'static [&'static str],
    /// The run may not finish sooner (a `Retry-After` honoured).
    at_least: Duration,
}

impl Case {
    fn new(faults: Vec<Fault>, outcome: Outcome, log: &'static [&'static str]) -> Self {
        Self {
            faults,
            on_delta_link: false,
            during_round: None,
            crash_first: None,
            graph_extra: "",
            outcome,
            log,
            at_least: Duration::ZERO,
        }
    }
}

async fn case(c: Case) {
    let s = setup(small_tenant(), c.graph_extra, None).await;
    if c.on_delta_link {
        let (status, log) = run_once(&s).await;
        assert!(status.success(), "first round: {log}");
        s.simulator.churn(&ChurnSpec::mixed(60));
    }
    if let Some(fp) = c.crash_first {
        let (status, log) = run_once_with(&s, Some(fp)).await;
        assert!(!status.success(), "the failpoint {fp} did not fire: {log}");
        let cp = committed(&s.dir.path().join("state")).expect("a checkpoint");
        assert!(!cp.link_is_delta, "the crash left no nextLink");
    }
    let before = committed(&s.dir.path().join("state"));
    for f in &c.faults {
        s.simulator.try_inject(f.clone()).expect("a valid fault");
    }
    let revoke = c.during_round.clone().map(|f| {
        s.simulator.set_page_latency(Duration::from_millis(30));
        let sim = s.simulator.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sim.inject(f);
        })
    });
    let started = Instant::now();
    let (status, log) = run_once(&s).await;
    let took = started.elapsed();
    if let Some(r) = revoke {
        r.await.unwrap();
        s.simulator.set_page_latency(Duration::ZERO);
    }
    for line in c.log {
        assert!(log.contains(line), "the log lacks {line:?}:\n{log}");
    }
    assert!(
        !log.contains("simulator-secret"),
        "the client secret is in the log"
    );
    assert!(
        took >= c.at_least,
        "finished in {took:?}, before {:?}",
        c.at_least
    );
    match c.outcome {
        Outcome::Recovers => {
            assert!(status.success(), "{status}: {log}");
            assert_exact(&s, "after the fault", c.crash_first.is_some());
        }
        Outcome::Stops(words) => {
            assert_eq!(status.code(), Some(1), "{log}");
            for w in words {
                assert!(log.contains(w), "the error lacks {w:?}:\n{log}");
            }
            let after = committed(&s.dir.path().join("state"));
            if c.on_delta_link {
                assert_eq!(
                    after.as_ref().map(|c| &c.link),
                    before.as_ref().map(|c| &c.link),
                    "the checkpoint moved past a bad page"
                );
            }
            // Whatever was committed before the bad page is good: a clean
            // run continues from it and loses nothing, repeats nothing.
            s.simulator.clear_faults();
            let (status, log) = run_once(&s).await;
            assert!(status.success(), "{status}: {log}");
            assert_exact(&s, "after the fault was cleared", c.crash_first.is_some());
        }
    }
    s.handle.shutdown().await;
}

fn http(status: u16, retry_after: Option<u64>, count: u32, scope: FaultScope) -> Fault {
    Fault::HttpError {
        status,
        retry_after,
        count,
        scope,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_retried_never_before_retry_after() {
    let mut c = Case::new(
        vec![http(429, Some(1), 3, FaultScope::NextLink)],
        Outcome::Recovers,
        &["Graph request failed; retrying.", "429"],
    );
    c.at_least = Duration::from_secs(3);
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_503_and_504_are_retried() {
    case(Case::new(
        vec![
            http(503, None, 2, FaultScope::NextLink),
            http(504, None, 2, FaultScope::NextLink),
        ],
        Outcome::Recovers,
        &["503", "504", "retrying"],
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_mid_round_and_on_the_delta_link_start_a_resync() {
    case(Case::new(
        vec![Fault::Gone {
            count: 1,
            scope: FaultScope::NextLink,
        }],
        Outcome::Recovers,
        &["Graph reset the sync state"],
    ))
    .await;
    let mut c = Case::new(
        vec![Fault::Gone {
            count: 1,
            scope: FaultScope::DeltaLink,
        }],
        Outcome::Recovers,
        &["Graph reset the sync state"],
    );
    c.on_delta_link = true;
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sync_tokens_mid_round_and_on_the_delta_link_start_a_resync() {
    let expired = |scope| Fault::SyncStateExpired {
        status: 400,
        code: "resyncRequired".into(),
        count: 1,
        scope,
    };
    // Only state tokens issued before the fault expire: the connector dies
    // mid-round, the token of its committed nextLink expires meanwhile.
    let mut c = Case::new(
        vec![expired(FaultScope::NextLink)],
        Outcome::Recovers,
        &["Graph reset the sync state"],
    );
    c.crash_first = Some("committing@3");
    case(c).await;
    let mut c = Case::new(
        vec![expired(FaultScope::DeltaLink)],
        Outcome::Recovers,
        &["Graph reset the sync state"],
    );
    c.on_delta_link = true;
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_malformed_pages_are_retried() {
    case(Case::new(
        vec![
            Fault::TruncatedBody {
                count: 1,
                scope: FaultScope::NextLink,
            },
            Fault::MalformedJson {
                count: 1,
                scope: FaultScope::NextLink,
            },
        ],
        Outcome::Recovers,
        &["malformed delta page", "retrying"],
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_stays_malformed_stops_the_stream_uncommitted() {
    let mut c = Case::new(
        vec![Fault::MalformedJson {
            count: 1000,
            scope: FaultScope::DeltaLink,
        }],
        Outcome::Stops(&["stream `users`", "malformed delta page"]),
        &["Stream stopped."],
    );
    c.on_delta_link = true;
    c.graph_extra = "max_attempts = 3";
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_without_id_is_a_malformed_page_retried_then_stopped_uncommitted() {
    let missing = |count| Fault::MissingId {
        count,
        scope: FaultScope::DeltaLink,
    };
    let mut c = Case::new(
        vec![missing(1)],
        Outcome::Recovers,
        &["malformed delta page: value[", "has no `id`", "retrying"],
    );
    c.on_delta_link = true;
    case(c).await;
    let mut c = Case::new(
        vec![missing(1000)],
        Outcome::Stops(&["stream `users`", "malformed delta page", "has no `id`"]),
        &["Stream stopped."],
    );
    c.on_delta_link = true;
    c.graph_extra = "max_attempts = 2";
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_removed_reason_stops_the_stream_uncommitted() {
    let mut c = Case::new(
        vec![Fault::UnknownRemovedReason {
            reason: "unknownFutureValue".into(),
            count: 1,
            scope: FaultScope::DeltaLink,
        }],
        Outcome::Stops(&[
            "unknown @removed reason `unknownFutureValue`",
            "not committed",
        ]),
        &["Stream stopped."],
    );
    c.on_delta_link = true;
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_page_is_read_within_the_limit_and_refused_above_it() {
    let huge = || Fault::HugePage {
        bytes: 50 * 1024 * 1024,
        count: 1,
        scope: FaultScope::NextLink,
    };
    // The default limit (256 MiB) takes it; the padding is an annotation
    // and never reaches an event.
    case(Case::new(vec![huge()], Outcome::Recovers, &[])).await;
    let mut c = Case::new(
        vec![Fault::HugePage {
            bytes: 50 * 1024 * 1024,
            count: 1,
            scope: FaultScope::DeltaLink,
        }],
        Outcome::Stops(&["graph.max_page_bytes (16777216 bytes)", "raise the limit"]),
        &["Stream stopped."],
    );
    c.on_delta_link = true;
    c.graph_extra = "max_page_bytes = 16777216";
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_token_endpoint_is_retried() {
    case(Case::new(
        vec![http(503, None, 2, FaultScope::Token)],
        Outcome::Recovers,
        &["Token request failed; retrying."],
    ))
    .await;
    let mut c = Case::new(
        vec![Fault::Slow {
            delay_ms: 2000,
            count: 1,
            scope: FaultScope::Token,
        }],
        Outcome::Recovers,
        &[],
    );
    c.at_least = Duration::from_secs(2);
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_mid_round_is_replaced() {
    let mut c = Case::new(
        vec![],
        Outcome::Recovers,
        &["Graph rejected the access token; requesting a new one."],
    );
    c.during_round = Some(Fault::InvalidateTokens);
    case(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_stop_at_once_without_the_secret() {
    let s = setup(
        SimConfig {
            client_secret: "the-right-one".into(),
            ..small_tenant()
        },
        "",
        None,
    )
    .await;
    let (status, log) = run_once(&s).await;
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("AADSTS7000215"), "names Entra's error: {log}");
    assert!(
        !log.contains("simulator-secret"),
        "the secret leaked: {log}"
    );
    assert!(events(&s).is_empty());
    assert!(committed(&s.dir.path().join("state")).is_none());
    s.handle.shutdown().await;
}

/// A tmpfs of its own, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, mode: &str) {
        mount(&["-o", &format!("remount,{mode}")], &self.0);
    }
}

fn mount(args: &[&str], dir: &Path) {
    let out = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "mount {args:?} {}: {} (the disk tests mount a small tmpfs: run them as root, as CI does)",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills a filesystem to the last byte.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

/// The disk under the store fails (`break_it`), the next round must stop
/// with `words` and leave the checkpoint where it was; once the disk is
/// back (`mend`), nothing is lost.
async fn disk_case(break_it: impl Fn(&Tmpfs), mend: impl Fn(&Tmpfs), words: &[&str]) {
    let root = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&root.path().join("store"), "32m");
    let state = tmpfs.0.join("state");
    let s = setup(small_tenant(), "", Some(&state)).await;
    let (status, log) = run_once(&s).await;
    assert!(status.success(), "first round: {log}");
    let before = committed(&state).expect("a checkpoint");

    // Enough changes that the store must grow.
    s.simulator.churn(&ChurnSpec {
        users: graphdelta::simulator::ChurnCounts {
            creates: 2000,
            updates: 200,
            ..Default::default()
        },
        ..Default::default()
    });
    break_it(&tmpfs);
    let (status, log) = run_once(&s).await;
    assert_eq!(status.code(), Some(1), "{log}");
    for w in words {
        assert!(log.contains(w), "the error lacks {w:?}:\n{log}");
    }
    assert!(
        log.contains(&state.display().to_string()),
        "names the store: {log}"
    );
    mend(&tmpfs);
    let after = committed(&state).expect("a checkpoint");
    assert_eq!(
        after.batch_seq, before.batch_seq,
        "a commit on a broken disk"
    );
    assert_eq!(after.link, before.link);

    let (status, log) = run_once(&s).await;
    assert!(status.success(), "after the disk is back: {log}");
    // At least once: the batches published before the failed commit are
    // published again (same ids); nothing is missing.
    let events = events(&s);
    let mut by_version: HashMap<(&str, u64), &str> = HashMap::new();
    for e in &events {
        let id = by_version
            .entry((&e.object_id, e.object_version))
            .or_insert(&e.event_id);
        assert_eq!(*id, e.event_id, "a re-emitted event got a new id");
    }
    let diffs = kafka_support::compare(
        "after the disk is back",
        &kafka_support::fold(&events),
        &s.simulator.truth().users,
        SELECT,
    );
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    s.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_checkpoint_disk_stops_the_stream_and_commits_nothing() {
    disk_case(
        |t| fill(&t.0),
        |t| std::fs::remove_file(t.0.join("filler")).unwrap(),
        &["checkpoint store", "full", "free space"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_checkpoint_disk_stops_the_stream_and_commits_nothing() {
    disk_case(
        |t| t.remount("ro"),
        |t| t.remount("rw"),
        &["checkpoint store", "read-only"],
    )
    .await;
}

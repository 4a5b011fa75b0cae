//! Service mode, as an operator runs it: the `graphdelta run` binary against
//! the simulator, scraped over its HTTP endpoint while it works, stopped with
//! SIGTERM mid-round, restarted, and checked for loss.

mod common;
mod rabbitmq_util;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use graphdelta::{
    checkpoint::Store,
    proto::v1::Phase,
    replay::Materializer,
    simulator::{ChurnSpec, SimConfig, Simulator},
};

fn write_config(dir: &Path, base: &str, token: &str, http_port: u16) -> std::path::PathBuf {
    let path = dir.join("connector.toml");
    std::fs::write(
        &path,
        format!(
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
select = ["displayName", "jobTitle", "department"]
poll_interval = "1s"

[[streams]]
name = "groups"
resource = "groups"
select = ["displayName", "members"]
poll_interval = "1s"

[sink]
type = "file"
path = "events.ndjson"

[checkpoint]
path = "state"

[runtime]
checkpoint_interval = "200ms"
drain_timeout = "20s"

[http]
listen = "127.0.0.1:{http_port}"
probe_interval = "200ms"
"#
        ),
    )
    .unwrap();
    path
}

fn spawn(config: &Path, log: &Path, once: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graphdelta"));
    cmd.args(["run", "--config"]).arg(config);
    if once {
        cmd.arg("--once");
    }
    cmd.env(SECRET_ENV, "simulator-secret")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "graphdelta did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, as an operator stops it: the exit status and the log.
fn terminate(child: &mut Child, log: &Path) -> (std::process::ExitStatus, String) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let exit = wait_exit(child, Duration::from_secs(30));
    (exit, std::fs::read_to_string(log).unwrap())
}

/// A simulator serving `sim`, and `graphdelta run` against it with the
/// connector file of [`write_config`] in a directory of its own.
struct Service {
    simulator: Simulator,
    handle: graphdelta::simulator::SimHandle,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Child,
    base: String,
}

impl Service {
    async fn start(sim: SimConfig) -> Service {
        let simulator = Simulator::new(sim);
        let handle = common::serve(&simulator).await;
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let config = write_config(dir.path(), &handle.base_url(), &handle.token_url(), port);
        let log = dir.path().join("run1.log");
        let child = spawn(&config, &log, false);
        Service {
            simulator,
            handle,
            dir,
            config,
            log,
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// One stream's entry of `/status`.
    async fn status_of(&self, stream: &str) -> Option<serde_json::Value> {
        let (_, body) = common::get(&format!("{}/status", self.base)).await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let streams = v["streams"].as_array()?;
        streams.iter().find(|s| s["stream"] == stream).cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_mode_metrics_status_readiness_and_graceful_shutdown() {
    let Service {
        simulator,
        handle,
        dir,
        config,
        log,
        mut child,
        base,
    } = Service::start(SimConfig {
        users: 3000,
        groups: 30,
        page_size: 100,
        page_latency: Duration::from_millis(40),
        ..SimConfig::default()
    })
    .await;

    common::poll("liveness", Duration::from_secs(30), async || {
        common::get(&format!("{base}/health/live"))
            .await
            .filter(|(s, _)| *s == 200)
    })
    .await;
    common::poll("readiness", Duration::from_secs(30), async || {
        common::get(&format!("{base}/health/ready"))
            .await
            .filter(|(s, _)| *s == 200)
    })
    .await;
    // Mid-round: the initial sync is under way (40 ms per page).
    let status: serde_json::Value = common::poll(
        "a few pages of the initial round",
        Duration::from_secs(30),
        async || {
            let (_, body) = common::get(&format!("{base}/status")).await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let users = v["streams"]
                .as_array()?
                .iter()
                .find(|s| s["stream"] == "users")?
                .clone();
            (users["pages"].as_u64()? >= 3).then_some(v)
        },
    )
    .await;
    let users = status["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "users")
        .unwrap();
    assert_eq!(users["phase"], "initial");
    assert_eq!(users["resource"], "users");
    assert!(users["events"]["created"].as_u64().unwrap() > 0);
    assert!(status["ready"].as_bool().unwrap());

    let (code, metrics) = common::get(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(code, 200);
    for name in [
        "graphdelta_events_published_total{stream=\"users\",change=\"created\"}",
        "graphdelta_graph_requests_total{status=\"200\"}",
        "graphdelta_pages_total{stream=\"users\"}",
        "graphdelta_batch_publish_seconds",
        "graphdelta_graph_page_seconds",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    assert!(!metrics.contains("simulator-secret"));

    // SIGTERM mid-round: in-flight batches are acknowledged and committed,
    // exit 0.
    let (exit, log_text) = terminate(&mut child, &log);
    assert!(exit.success(), "exit {exit:?}\n{log_text}");
    assert!(
        log_text.contains("Shutdown requested") || log_text.contains("Shutting down"),
        "{log_text}"
    );

    // The checkpoint is consistent: mid-round (a nextLink), and every event
    // up to it is in the file.
    let store = Store::open_read_only(&dir.path().join("state"), "users")
        .unwrap()
        .unwrap();
    let cp = store.load_checkpoint().unwrap().unwrap();
    let events = read_events(&dir.path().join("events.ndjson"));
    let users_written = events.iter().filter(|e| e.stream == "users").count() as u64;
    let written: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e.stream == "users")
        .map(|e| e.object_id.as_str())
        .collect();
    let mut remembered = 0;
    store
        .for_each_object(|id, _| {
            remembered += 1;
            assert!(
                written.contains(id),
                "{id} committed but its event is not in the sink"
            );
        })
        .unwrap();
    assert!(remembered > 0 && remembered <= users_written);
    drop(store);
    let interrupted = cp.phase() == Phase::Initial;

    // Restart (--once) and finish; then a churn round: nothing lost.
    let mut child = spawn(&config, &dir.path().join("run2.log"), true);
    let exit = wait_exit(&mut child, Duration::from_secs(120));
    assert!(
        exit.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("run2.log")).unwrap()
    );
    simulator.churn(&ChurnSpec::mixed(200));
    let mut child = spawn(&config, &dir.path().join("run3.log"), true);
    assert!(wait_exit(&mut child, Duration::from_secs(120)).success());

    let events = read_events(&dir.path().join("events.ndjson"));
    let mut users = Materializer::new();
    for e in events.iter().filter(|e| e.stream == "users") {
        users.apply(e);
    }
    let truth = simulator.truth();
    let want: std::collections::BTreeSet<&str> =
        truth.users.iter().map(|o| o.id.as_str()).collect();
    let have: std::collections::BTreeSet<&str> =
        users.objects().map(|(id, _)| id.as_str()).collect();
    assert_eq!(want, have, "objects lost or invented across the SIGTERM");
    // Duplicates (re-read pages after the stop) carry their original ids.
    let mut by_version = std::collections::HashMap::new();
    for e in &events {
        let id = by_version
            .entry((e.stream.clone(), e.object_id.clone(), e.object_version))
            .or_insert(e.event_id.clone());
        assert_eq!(*id, e.event_id, "a re-emitted event changed its id");
    }
    assert!(
        interrupted || users_written == 3000,
        "SIGTERM landed after the round"
    );
    handle.shutdown().await;
}

/// A commit that the disk holds up keeps the stream waiting once the next
/// commit's batches are staged: the stream counts the wait
/// (`graphdelta_commit_waits_total`; the same wait puts the next commits at
/// the stream's own priority, whose rule `background`'s tests check), and
/// loses nothing. The store's write lock, taken by another connection for
/// a second, stands in for a slow disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_up_by_the_disk_is_counted_as_a_wait() {
    // Users and (no) groups, each in a store of its own.
    let mut service = Service::start(SimConfig {
        users: 40_000,
        groups: 0,
        applications: 0,
        devices: 0,
        page_size: 200,
        page_latency: Duration::from_millis(10),
        ..SimConfig::default()
    })
    .await;
    let users = async || service.status_of("users").await;
    common::poll("the round under way", Duration::from_secs(30), async || {
        users().await?["pages"].as_u64().filter(|p| *p >= 3)
    })
    .await;
    let store = graphdelta::checkpoint::store_path(&service.dir.path().join("state"), "users");
    let held = rusqlite::Connection::open(&store).unwrap();
    held.execute_batch("BEGIN IMMEDIATE").unwrap();
    // A slow disk, not a wait for a condition: the commit under way stays
    // blocked (its busy timeout is 5 s) while the stream stages the next
    // 2,500 objects (13 pages, 10 ms each) and stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    held.execute_batch("COMMIT").unwrap();
    drop(held);
    let waits = common::poll("the wait counted", Duration::from_secs(30), async || {
        let (_, metrics) = common::get(&format!("{}/metrics", service.base)).await?;
        let line = metrics
            .lines()
            .find(|l| l.starts_with("graphdelta_commit_waits_total{stream=\"users\"}"))?;
        line.rsplit(' ')
            .next()?
            .parse::<u64>()
            .ok()
            .filter(|w| *w >= 1)
    })
    .await;
    assert!(waits >= 1);
    common::poll("the round finished", Duration::from_secs(60), async || {
        (users().await?["rounds_completed"].as_u64()? >= 1).then_some(())
    })
    .await;
    let (exit, log) = terminate(&mut service.child, &service.log);
    assert!(exit.success(), "{log}");
    let events = read_events(&service.dir.path().join("events.ndjson"));
    let ids: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e.stream == "users")
        .map(|e| e.object_id.as_str())
        .collect();
    assert_eq!(
        ids.len(),
        40_000,
        "objects lost while the commit was held up"
    );
    service.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_sink_outage_and_recovers() {
    let (_admin, _channel) = rabbitmq_util::admin().await; // fails loudly without a broker
    let exchange = rabbitmq_util::unique("ready");
    let queue = format!("{exchange}.q");
    let _cleanup = rabbitmq_util::Cleanup::new()
        .exchange(&exchange)
        .queue(&queue);
    let simulator = Simulator::new(SimConfig {
        users: 500,
        groups: 5,
        ..SimConfig::default()
    });
    let handle = common::serve(&simulator).await;
    let upstream: url::Url = rabbitmq_util::amqp_url().parse().unwrap();
    let upstream_addr = format!(
        "{}:{}",
        upstream.host_str().unwrap(),
        upstream.port().unwrap_or(5672)
    );
    let switch = Switch::start(upstream_addr.parse().unwrap()).await;
    let mut via_switch = upstream.clone();
    via_switch.set_host(Some("127.0.0.1")).unwrap();
    via_switch.set_port(Some(switch.port)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let config = dir.path().join("connector.toml");
    std::fs::write(
        &config,
        format!(
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
poll_interval = "500ms"

[sink]
type = "rabbitmq"
url_env = "GRAPHDELTA_TEST_SWITCHED_AMQP"
exchange = "{exchange}"
connect_timeout = "1s"
confirm_timeout = "2s"

[[sink.declare_queues]]
name = "{queue}"
type = "classic"

[checkpoint]
path = "state"

[http]
listen = "127.0.0.1:{port}"
probe_interval = "200ms"
"#,
            base = handle.base_url(),
            token = handle.token_url(),
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_graphdelta"))
        .args(["run", "--config"])
        .arg(&config)
        .env(SECRET_ENV, "simulator-secret")
        .env("GRAPHDELTA_TEST_SWITCHED_AMQP", via_switch.as_str())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let ready = async || common::get(&format!("{base}/health/ready")).await;
    common::poll("ready", Duration::from_secs(30), async || {
        ready().await.filter(|(s, _)| *s == 200)
    })
    .await;

    switch.set(false);
    let (_, reason) = common::poll(
        "not ready while the broker is away",
        Duration::from_secs(30),
        async || ready().await.filter(|(s, _)| *s == 503),
    )
    .await;
    assert!(reason.contains("sink rabbitmq"), "{reason}");
    assert!(
        !reason.contains("guest:guest"),
        "the AMQP password leaked: {reason}"
    );

    switch.set(true);
    common::poll("ready again", Duration::from_secs(30), async || {
        ready().await.filter(|(s, _)| *s == 200)
    })
    .await;

    let (exit, log) = terminate(&mut child, &log);
    assert!(exit.success(), "{log}");
    handle.shutdown().await;
}

//! Security promises, tested from the outside:
//!
//! - the bearer token goes only to the configured Graph origin (scheme,
//!   host and port): a link, a redirect or a 410 `Location` pointing
//!   elsewhere gets no request (`tests/graph_fixtures.rs` covers a
//!   nextLink to another port);
//! - secrets (the Graph client secret, the AMQP password, a Kafka SASL
//!   password) never appear in logs (at trace level), errors, `/status`,
//!   `/metrics`, readiness or the checkpoint store: every byte of them is
//!   grepped after real runs;
//! - `https` only for Graph off loopback;
//! - `amqps://` works from the connector file against a RabbitMQ behind a
//!   TLS terminator (socat) with a CA made here by `openssl`, and a broker
//!   whose CA is not trusted is refused with a clear error.

mod common;
mod kafka_support;
mod rabbitmq_util;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{Scripted, ScriptedGraph};
use graphdelta::simulator::{ChurnSpec, SimConfig};

fn graphdelta(args: &[&str], env: &[(&str, &str)], log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graphdelta"));
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let f = std::fs::File::create(log).unwrap();
    cmd.stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("start the graphdelta binary")
}

fn wait(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("graphdelta did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------
// The token stays on the Graph host.

/// One `--once` run of a file-sink connector against `server`; the result
/// and the connector's directory.
async fn run_against(
    server: &ScriptedGraph,
) -> (Result<(), graphdelta::runtime::RunError>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::file_config(&server.base_url(), &server.token_url(), dir.path(), "");
    (common::run_once(&config).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_is_not_followed() {
    let evil = ScriptedGraph::start().await;
    let server = ScriptedGraph::start().await;
    server.on(
        "/v1.0/users/delta",
        Scripted::status(302, "").header("Location", &format!("{}/users/delta", evil.base_url())),
    );
    let (result, _dir) = run_against(&server).await;
    let err = result.unwrap_err().to_string();
    assert!(err.contains("redirect"), "{err}");
    assert!(err.contains("not followed"), "{err}");
    assert!(
        evil.requests().is_empty(),
        "the redirect target got a request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_with_another_scheme_or_port_gets_no_token() {
    let other_port = ScriptedGraph::start().await;
    for other_scheme in [true, false] {
        let server = ScriptedGraph::start().await;
        // The same host and port over https, or the same host on another
        // port.
        let (link, names) = if other_scheme {
            (
                format!("https://{}/v1.0/users/delta?$skiptoken=x", server.addr),
                format!("https://{}", server.addr),
            )
        } else {
            (
                format!("{}/users/delta?$skiptoken=x", other_port.base_url()),
                other_port.addr.to_string(),
            )
        };
        server.on(
            "/v1.0/users/delta",
            Scripted::json(format!(
                r#"{{"@odata.nextLink":"{link}","value":[{{"id":"a","displayName":"A"}}]}}"#
            )),
        );
        let (result, dir) = run_against(&server).await;
        let err = result.unwrap_err().to_string();
        assert!(err.contains("refusing to send the token"), "{err}");
        assert!(err.contains(&names), "names {names}: {err}");
        assert!(common::read_events(&common::events_path(dir.path())).is_empty());
    }
    assert!(
        other_port.requests().is_empty(),
        "the other port got a request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_location_on_another_host_is_ignored() {
    let evil = ScriptedGraph::start().await;
    let server = ScriptedGraph::start().await;
    server.on(
        "/v1.0/users/delta",
        Scripted::status(
            410,
            r#"{"error":{"code":"SyncStateNotFound","message":"gone"}}"#,
        )
        .header("Location", &format!("{}/users/delta", evil.base_url())),
    );
    server.on(
        "/v1.0/users/delta",
        Scripted::fixture("users-delta-walkthrough/3-final.json"),
    );
    let (result, dir) = run_against(&server).await;
    result.unwrap();
    assert!(
        evil.requests().is_empty(),
        "the Location host got a request"
    );
    assert_eq!(
        common::read_events(&common::events_path(dir.path())).len(),
        2
    );
}

#[test]
fn graph_needs_https_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        r#"
[graph]
base_url = "http://graph.example.com/v1.0"
tenant_id = "t"
client_id = "c"
client_secret_env = "GRAPHDELTA_TEST_CLIENT_SECRET"

[[streams]]
name = "users"
resource = "users"

[sink]
type = "stdout"

[checkpoint]
path = "state"
"#,
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = graphdelta(
        &["validate", "--config", path.to_str().unwrap()],
        &[("GRAPHDELTA_TEST_CLIENT_SECRET", "x")],
        &log,
    );
    let status = wait(&mut child, Duration::from_secs(30));
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("graph.base_url"), "names the key: {out}");
    assert!(out.contains("https"), "names the fix: {out}");
}

// ---------------------------------------------------------------------
// Secrets never leak.

/// Every place a secret could end up after a run: the log, the HTTP
/// endpoint's pages, and every file of the checkpoint store.
fn assert_absent(secrets: &[&str], places: &[(String, Vec<u8>)]) {
    for secret in secrets {
        for (place, bytes) in places {
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "secret `{secret}` found in {place}");
        }
    }
}

fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// A RabbitMQ account of the test's own, deleted afterwards.
struct AmqpUser(String);

impl Drop for AmqpUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_appear_in_no_log_status_metric_or_store() {
    let (_conn, _ch) = rabbitmq_util::admin().await; // fails loudly without a broker
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let graph_secret = format!("graph-secret-{tag}");
    let amqp_password = format!("amqp-password-{tag}");
    let user = AmqpUser(format!("gd-test-{tag}"));
    rabbitmq_util::rabbitmqctl(&["add_user", &user.0, &amqp_password]);
    rabbitmq_util::rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    let exchange = rabbitmq_util::unique("secrets");
    let queue = format!("{exchange}.all");
    let _cleanup = rabbitmq_util::Cleanup::new()
        .exchange(&exchange)
        .queue(&queue);
    let broker: url::Url = rabbitmq_util::amqp_url().parse().unwrap();
    let amqp_url = format!(
        "amqp://{}:{amqp_password}@{}:{}/%2f",
        user.0,
        broker.host_str().unwrap(),
        broker.port().unwrap_or(5672)
    );

    let (simulator, handle) = kafka_support::start_simulator(SimConfig {
        users: 150,
        groups: 5,
        page_size: 30,
        client_secret: graph_secret.clone(),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("connector.toml");
    let sink = format!(
        "[sink]\ntype = \"rabbitmq\"\nurl_env = \"GD_TEST_AMQP_URL\"\nexchange = \"{exchange}\"\n\n[[sink.declare_queues]]\nname = \"{queue}\"\ntype = \"classic\"\nbinding_keys = [\"#\"]\n"
    );
    std::fs::write(
        &config,
        format!(
            "{}\n[http]\nlisten = \"127.0.0.1:{port}\"\nprobe_interval = \"200ms\"\n",
            kafka_support::connector_toml(&handle, dir.path(), &sink)
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let env = [
        (kafka_support::SECRET_ENV, graph_secret.as_str()),
        ("GD_TEST_AMQP_URL", amqp_url.as_str()),
        ("RUST_LOG", "trace"),
    ];
    let mut child = graphdelta(
        &[
            "run",
            "--log-format",
            "json",
            "--config",
            config.to_str().unwrap(),
        ],
        &env,
        &log,
    );
    let base = format!("http://127.0.0.1:{port}");
    let mut pages: Vec<(String, Vec<u8>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Two rounds, the second after churn; then scrape every page.
    let mut churned = false;
    loop {
        assert!(
            Instant::now() < deadline,
            "no progress:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        let status: Option<serde_json::Value> = match reqwest::get(format!("{base}/status")).await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let rounds = status
            .as_ref()
            .and_then(|s| s["streams"].as_array().cloned())
            .map(|v| {
                v.iter()
                    .map(|s| s["rounds_completed"].as_u64().unwrap_or(0))
                    .min()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        if rounds >= 1 && !churned {
            simulator.churn(&ChurnSpec::mixed(50));
            churned = true;
        }
        if rounds >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for path in ["/status", "/metrics", "/health/ready", "/health/live"] {
        let body = reqwest::get(format!("{base}{path}"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        pages.push((path.to_string(), body.to_vec()));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait(&mut child, Duration::from_secs(60));
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let metrics = String::from_utf8_lossy(&pages[1].1).to_string();
    assert!(
        metrics.contains("graphdelta_events_published_total"),
        "a real scrape: {metrics}"
    );

    // The same secrets in failures: a wrong AMQP password and a wrong
    // Graph secret, each named without the secret.
    let wrong_amqp = amqp_url.replace(&amqp_password, &format!("wrong-{amqp_password}"));
    let failed_amqp = dir.path().join("wrong-amqp.log");
    let mut child = graphdelta(
        &["run", "--once", "--config", config.to_str().unwrap()],
        &[
            (kafka_support::SECRET_ENV, graph_secret.as_str()),
            ("GD_TEST_AMQP_URL", wrong_amqp.as_str()),
            ("RUST_LOG", "debug"),
        ],
        &failed_amqp,
    );
    assert!(!wait(&mut child, Duration::from_secs(60)).success());
    let failed_graph = dir.path().join("wrong-graph.log");
    let wrong_graph = format!("wrong-{graph_secret}");
    let mut child = graphdelta(
        &["run", "--once", "--config", config.to_str().unwrap()],
        &[
            (kafka_support::SECRET_ENV, wrong_graph.as_str()),
            ("GD_TEST_AMQP_URL", amqp_url.as_str()),
            ("RUST_LOG", "debug"),
        ],
        &failed_graph,
    );
    assert!(!wait(&mut child, Duration::from_secs(60)).success());
    let failed_graph_text = std::fs::read_to_string(&failed_graph).unwrap();
    assert!(
        failed_graph_text.contains("AADSTS7000215"),
        "names the refusal: {failed_graph_text}"
    );

    let mut places = pages;
    for log in [&log, &failed_amqp, &failed_graph] {
        places.push((log.display().to_string(), std::fs::read(log).unwrap()));
    }
    places.extend(files_under(&dir.path().join("state")));
    assert!(places.len() >= 8, "the store has files: {places:?}");
    assert_absent(&[&graph_secret, &amqp_password, &wrong_graph], &places);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sasl_password_appears_in_no_log_or_error() {
    let brokers = kafka_support::test_brokers();
    let password = format!("sasl-password-{}", uuid::Uuid::new_v4().simple());
    let (_simulator, handle) = kafka_support::start_simulator(SimConfig {
        users: 10,
        groups: 0,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        r#"[sink]
type = "kafka"
brokers = "{brokers}"
topic = "{topic}.{{stream}}"
startup_timeout = "3s"

[sink.properties]
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanism" = "PLAIN"
"sasl.username" = "graphdelta"

[sink.secret_properties]
"sasl.password" = {{ env = "GD_TEST_SASL_PASSWORD" }}
"#,
        topic = kafka_support::rand_name("gd-sasl"),
    );
    let config = dir.path().join("connector.toml");
    std::fs::write(
        &config,
        kafka_support::connector_toml(&handle, dir.path(), &sink),
    )
    .unwrap();
    let mut places = Vec::new();
    for args in [
        vec!["validate", "--config", config.to_str().unwrap()],
        vec!["run", "--once", "--config", config.to_str().unwrap()],
    ] {
        let log = dir.path().join(format!("{}.log", args[0]));
        let mut child = graphdelta(
            &args,
            &[
                (kafka_support::SECRET_ENV, "simulator-secret"),
                ("GD_TEST_SASL_PASSWORD", password.as_str()),
                ("RUST_LOG", "trace"),
            ],
            &log,
        );
        let status = wait(&mut child, Duration::from_secs(60));
        let text = std::fs::read_to_string(&log).unwrap();
        if args[0] == "run" {
            // tansu speaks no SASL: the sink cannot start, and says so.
            assert!(!status.success(), "{text}");
            assert!(text.contains("kafka"), "{text}");
        } else {
            assert!(status.success(), "{text}");
        }
        places.push((log.display().to_string(), text.into_bytes()));
    }
    if dir.path().join("state").exists() {
        places.extend(files_under(&dir.path().join("state")));
    }
    assert_absent(&[&password], &places);
    handle.shutdown().await;
}

// ---------------------------------------------------------------------
// amqps:// with a CA of our own.

/// A CA and a server certificate for `localhost`/127.0.0.1, made by the
/// `openssl` command.
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=graphdelta test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// socat terminating TLS in front of the shared broker.
struct TlsTerminator(Child);

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_works_and_an_untrusted_broker_is_refused() {
    let (_conn, channel) = rabbitmq_util::admin().await; // fails loudly without a broker
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker: url::Url = rabbitmq_util::amqp_url().parse().unwrap();
    let upstream = format!(
        "TCP:{}:{}",
        broker.host_str().unwrap(),
        broker.port().unwrap_or(5672)
    );
    let _tls = TlsTerminator(
        Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                cert.display(),
                key.display()
            ))
            .arg(upstream)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the socat command (apt-get install socat)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "socat does not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let exchange = rabbitmq_util::unique("amqps");
    let queue = format!("{exchange}.all");
    let _cleanup = rabbitmq_util::Cleanup::new()
        .exchange(&exchange)
        .queue(&queue);
    let (_simulator, handle) = kafka_support::start_simulator(SimConfig {
        users: 40,
        groups: 3,
        ..SimConfig::default()
    })
    .await;
    let userinfo = format!(
        "{}:{}",
        broker.username(),
        broker.password().unwrap_or_default()
    );
    let url = format!("amqps://{userinfo}@localhost:{port}/%2f");
    let dir = tempfile::tempdir().unwrap();
    let write = |ca_line: &str| {
        let sink = format!(
            "[sink]\ntype = \"rabbitmq\"\nurl_env = \"GD_TEST_AMQPS_URL\"\nexchange = \"{exchange}\"\nconnect_timeout = \"5s\"\n{ca_line}\n\n[[sink.declare_queues]]\nname = \"{queue}\"\ntype = \"classic\"\nbinding_keys = [\"#\"]\n"
        );
        let path = dir.path().join("connector.toml");
        std::fs::write(
            &path,
            kafka_support::connector_toml(&handle, dir.path(), &sink),
        )
        .unwrap();
        path
    };
    let env = [
        (kafka_support::SECRET_ENV, "simulator-secret"),
        ("GD_TEST_AMQPS_URL", url.as_str()),
    ];

    // Without the CA: the broker's certificate is not trusted.
    let config = write("");
    let log = dir.path().join("untrusted.log");
    let mut child = graphdelta(
        &["run", "--once", "--config", config.to_str().unwrap()],
        &env,
        &log,
    );
    let status = wait(&mut child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success(),
        "an untrusted broker was accepted:\n{text}"
    );
    assert!(
        text.to_lowercase().contains("certificate") || text.to_lowercase().contains("tls"),
        "names the TLS failure: {text}"
    );

    // With it: every event arrives.
    let config = write(&format!("ca_file = \"{}\"", ca.display()));
    let log = dir.path().join("trusted.log");
    let mut child = graphdelta(
        &["run", "--once", "--config", config.to_str().unwrap()],
        &env,
        &log,
    );
    let status = wait(&mut child, Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "amqps with the CA failed:\n{text}");
    let got = rabbitmq_util::drain(&channel, &queue, 43, Duration::from_secs(30)).await;
    assert!(
        got.len() >= 43,
        "40 users and 3 groups over TLS: got {}",
        got.len()
    );
    handle.shutdown().await;
}

//! `graphdelta bench`: measures the pipeline against its own limits.
//!
//! Every case starts the simulator in its own process (so its memory and
//! CPU are not the connector's), then runs, each in a fresh process:
//! - the **fetch+parse floor**: the same pages fetched and JSON-parsed by
//!   the same HTTP client and thrown away;
//! - the **connector**: the real pipeline (normalize, publish, acknowledge,
//!   commit) into the case's sink.
//!
//! Each worker reports wall time, CPU seconds (user + system, from
//! `/proc/self/stat`), peak RSS (`VmHWM`) and RSS at the end (`VmRSS`).
//! Figures are printed, never asserted: speed goals are met here, not in
//! timed tests.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use graphdelta::{
    checkpoint::Store,
    config::Config,
    graph::{GraphClient, client::FetchOptions, page::PageLink},
    runtime::{self, RunOptions, StatusRegistry},
};
use serde::{Deserialize, Serialize};

/// `graphdelta bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Cases to run (comma-separated); default: all. One of: initial-100k,
    /// initial-1m, churn-1pct, streams-20, latency-150ms, latency-150ms-20,
    /// kafka, kafka-eos, rabbitmq.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Smaller tenants for a quick look (10x fewer objects).
    #[arg(long)]
    quick: bool,
    /// Runs per case; the median is printed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Kafka bootstrap servers for the Kafka cases (tansu works).
    #[arg(long, env = "GRAPHDELTA_BENCH_KAFKA")]
    kafka: Option<String>,
    /// RabbitMQ URL for the RabbitMQ case.
    #[arg(long, env = "GRAPHDELTA_BENCH_AMQP")]
    amqp: Option<String>,
    /// Scratch directory (simulator logs, configs, stores, event files).
    #[arg(long, default_value = "target/bench")]
    workdir: PathBuf,
}

/// `graphdelta bench-worker` (internal): one measured run.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// `connector` or `floor`.
    #[arg(long)]
    mode: String,
    #[arg(long)]
    config: PathBuf,
    /// Floor only: start from the links stored in the checkpoint store (an
    /// incremental round) instead of the initial request.
    #[arg(long)]
    from_checkpoint: bool,
}

/// What a worker measured.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Measured {
    wall_s: f64,
    cpu_s: f64,
    peak_rss_kb: u64,
    rss_kb: u64,
    objects: u64,
    events: u64,
    pages: u64,
}

const SECRET: &str = "simulator-secret";

pub async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: set before any thread reads the environment.
    unsafe { std::env::set_var("GRAPHDELTA_BENCH_SECRET", SECRET) };
    let config = Config::load(&args.config)?;
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let mut m = Measured::default();
    match args.mode.as_str() {
        "floor" => {
            let resolved = config.resolve()?;
            let mut tasks = tokio::task::JoinSet::new();
            for r in resolved {
                let start = if args.from_checkpoint {
                    let store = Store::open_read_only(&config.checkpoint.path, &r.stream.name)?
                        .context("no checkpoint store for --from-checkpoint")?;
                    store.load_checkpoint()?.context("no checkpoint")?.link
                } else {
                    String::new()
                };
                tasks.spawn(async move {
                    let client = GraphClient::new(r.graph.clone())?;
                    let mut link = if start.is_empty() {
                        client.initial_url(&r.stream, false)
                    } else {
                        start
                    };
                    let (mut objects, mut pages) = (0u64, 0u64);
                    loop {
                        let page = client.fetch(&link, FetchOptions::default()).await?;
                        objects += page.objects.len() as u64;
                        pages += 1;
                        match page.link {
                            PageLink::Next(n) => link = n,
                            PageLink::Delta(_) => break,
                        }
                    }
                    Ok::<_, anyhow::Error>((objects, pages))
                });
            }
            while let Some(r) = tasks.join_next().await {
                let (o, p) = r??;
                m.objects += o;
                m.pages += p;
            }
        }
        "connector" => {
            let status = StatusRegistry::default();
            runtime::run(
                &config,
                RunOptions {
                    once: true,
                    status: status.clone(),
                    ..Default::default()
                },
            )
            .await?;
            for s in status.snapshot() {
                m.events += s.events.values().sum::<u64>();
                m.pages += s.round_pages;
                m.objects += s.round_objects;
            }
        }
        other => bail!("unknown worker mode {other}"),
    }
    m.wall_s = started.elapsed().as_secs_f64();
    m.cpu_s = cpu_seconds() - cpu_before;
    let (peak, rss) = rss_kb();
    m.peak_rss_kb = peak;
    m.rss_kb = rss;
    println!("{}", serde_json::to_string(&m)?);
    Ok(ExitCode::SUCCESS)
}

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (USER_HZ = 100).
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// (peak RSS, current RSS) in KiB.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A simulator child process.
struct Sim {
    child: Child,
    port: u16,
}

impl Sim {
    fn start(dir: &Path, users: usize, latency: Duration) -> anyhow::Result<Sim> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.join("simulator.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--users", &users.to_string(), "--groups", "0"])
            .args([
                "--applications",
                "0",
                "--devices",
                "0",
                "--service-principals",
                "0",
            ])
            .args(["--page-size", "200"])
            .args(["--page-latency", &format!("{}ms", latency.as_millis())])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let sim = Sim { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the simulator did not start; see {}",
                    dir.join("simulator.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sim)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn churn(&self, spec: serde_json::Value) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/_sim/churn", self.base()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(spec.to_string())
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("churn failed: {}", r.status());
        }
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sink table of a case's connector file.
#[derive(Debug, Clone)]
enum SinkKind {
    File,
    Kafka { brokers: String, exactly_once: bool },
    Rabbitmq { url: String },
}

/// `run_id` makes broker-side names (topics, exchanges, transactional ids)
/// unique to one run: a Kafka exactly-once run would otherwise resume from
/// the previous run's checkpoint in the checkpoint topic.
fn write_config(
    dir: &Path,
    sim: &Sim,
    streams: usize,
    sink: &SinkKind,
    run_id: &str,
) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        r#"[graph]
base_url = "{base}/v1.0"
token_url = "{base}/{{tenant}}/oauth2/v2.0/token"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_env = "GRAPHDELTA_BENCH_SECRET"
"#,
        base = sim.base()
    );
    for i in 0..streams {
        text.push_str(&format!(
            "\n[[streams]]\nname = \"users{i}\"\nresource = \"users\"\n"
        ));
    }
    match sink {
        SinkKind::File => text.push_str("\n[sink]\ntype = \"file\"\npath = \"events.ndjson\"\n"),
        SinkKind::Kafka { brokers, exactly_once } => text.push_str(&format!(
            "\n[sink]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"bench.{run_id}.{{stream}}\"\nexactly_once = {exactly_once}\ncheckpoint_topic = \"bench.{run_id}.checkpoints\"\ntransactional_id_prefix = \"bench-{run_id}-\"\n"
        )),
        SinkKind::Rabbitmq { url } => text.push_str(&format!(
            "\n[sink]\ntype = \"rabbitmq\"\nurl = \"{url}\"\nexchange = \"graphdelta.bench.{run_id}\"\n\n[[sink.declare_queues]]\nname = \"graphdelta.bench.{run_id}\"\nbinding_keys = [\"#\"]\n"
        )),
    }
    text.push_str("\n[checkpoint]\npath = \"state\"\n");
    let path = dir.join("connector.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn run_worker(mode: &str, config: &Path, from_checkpoint: bool) -> anyhow::Result<Measured> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["bench-worker", "--mode", mode, "--config"])
        .arg(config);
    if from_checkpoint {
        cmd.arg("--from-checkpoint");
    }
    let out = cmd
        .env("RUST_LOG", "error")
        .env("GRAPHDELTA_LOG_FORMAT", "text")
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{mode} worker failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(
        line.trim().lines().last().unwrap_or(""),
    )?)
}

fn fresh(dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir.join("state"));
    let _ = std::fs::remove_file(dir.join("events.ndjson"));
    Ok(())
}

/// One printed row.
struct Row {
    case: String,
    floor: Option<Measured>,
    connector: Measured,
    /// For latency cases: pages × latency.
    ideal_s: Option<f64>,
}

fn median(mut runs: Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    runs[runs.len() / 2]
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let scale = if args.quick { 10 } else { 1 };
    let all = [
        "initial-100k",
        "initial-1m",
        "churn-1pct",
        "streams-20",
        "latency-150ms",
        "latency-150ms-20",
        "kafka",
        "kafka-eos",
        "rabbitmq",
    ];
    let cases: Vec<String> = if args.cases.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        args.cases.clone()
    };
    for c in &cases {
        if !all.contains(&c.as_str()) {
            bail!("unknown case `{c}`; cases: {}", all.join(", "));
        }
    }
    std::fs::create_dir_all(&args.workdir)?;
    let repeat = args.repeat.max(1);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for case in &cases {
        let dir = args.workdir.join(case);
        std::fs::create_dir_all(&dir)?;
        eprintln!("bench: {case} ...");
        let (users, streams, latency, sink) = match case.as_str() {
            "initial-100k" => (100_000 / scale, 1, Duration::ZERO, SinkKind::File),
            "initial-1m" => (1_000_000 / scale, 1, Duration::ZERO, SinkKind::File),
            "churn-1pct" => (100_000 / scale, 1, Duration::ZERO, SinkKind::File),
            "streams-20" => (20_000 / scale, 20, Duration::ZERO, SinkKind::File),
            "latency-150ms" => (10_000, 1, Duration::from_millis(150), SinkKind::File),
            "latency-150ms-20" => (10_000, 20, Duration::from_millis(150), SinkKind::File),
            "kafka" | "kafka-eos" => {
                match &args.kafka {
                    Some(b) => (
                        100_000 / scale,
                        1,
                        Duration::ZERO,
                        SinkKind::Kafka {
                            brokers: b.clone(),
                            exactly_once: case == "kafka-eos",
                        },
                    ),
                    None => {
                        notes.push(format!("{case}: skipped, no broker (--kafka HOST:PORT or GRAPHDELTA_BENCH_KAFKA)"));
                        continue;
                    }
                }
            }
            "rabbitmq" => match &args.amqp {
                Some(u) => (
                    100_000 / scale,
                    1,
                    Duration::ZERO,
                    SinkKind::Rabbitmq { url: u.clone() },
                ),
                None => {
                    notes.push(format!(
                        "{case}: skipped, no broker (--amqp URL or GRAPHDELTA_BENCH_AMQP)"
                    ));
                    continue;
                }
            },
            _ => unreachable!(),
        };
        let sim = Sim::start(&dir, users, latency)?;
        let pid = std::process::id();
        let mut config = write_config(&dir, &sim, streams, &sink, &pid.to_string())?;
        let mut floors = Vec::new();
        let mut connectors = Vec::new();
        let runs = if users >= 1_000_000 { 1 } else { repeat };
        for run in 0..runs {
            fresh(&dir)?;
            if matches!(sink, SinkKind::Kafka { .. }) {
                config = write_config(&dir, &sim, streams, &sink, &format!("{pid}-{run}"))?;
            }
            if case == "churn-1pct" {
                // The initial sync is setup; the measured round is the
                // incremental one after 1% of the users changed.
                run_worker("connector", &config, false)?;
                sim.churn(serde_json::json!({"users": {"updates": users / 100, "creates": users / 1000, "soft_deletes": users / 1000}}))
                    .await?;
                floors.push(run_worker("floor", &config, true)?);
                connectors.push(run_worker("connector", &config, false)?);
                continue;
            }
            floors.push(run_worker("floor", &config, false)?);
            fresh(&dir)?;
            match run_worker("connector", &config, false) {
                Ok(m) => connectors.push(m),
                Err(e) => {
                    let hint = if case == "kafka-eos" {
                        " (exactly-once needs a broker with transactions, such as Apache Kafka; tansu has none)"
                    } else {
                        ""
                    };
                    notes.push(format!("{case}: connector failed: {e}{hint}"));
                    break;
                }
            }
        }
        if connectors.is_empty() {
            continue;
        }
        let floor = median(floors);
        let connector = median(connectors);
        let ideal_s = (!latency.is_zero()).then(|| {
            // Pages of one stream times the latency: the time a client that
            // overlaps everything but the page requests themselves needs.
            (connector.pages as f64 / streams as f64) * latency.as_secs_f64()
        });
        if let SinkKind::Rabbitmq { url } = &sink {
            // The case's queue holds every event it published: remove it.
            let name = format!("graphdelta.bench.{}", std::process::id());
            if let Err(e) = delete_rabbitmq(url, &name).await {
                notes.push(format!(
                    "{case}: could not delete queue/exchange {name}: {e}"
                ));
            }
        }
        rows.push(Row {
            case: format!(
                "{case} ({} obj × {streams} stream{})",
                users,
                if streams == 1 { "" } else { "s" }
            ),
            floor: Some(floor),
            connector,
            ideal_s,
        });
        drop(sim);
    }
    print_table(&rows, &notes);
    Ok(ExitCode::SUCCESS)
}

/// Deletes the bench's queue and exchange (same name).
async fn delete_rabbitmq(url: &str, name: &str) -> anyhow::Result<()> {
    use lapin::{
        Connection, ConnectionProperties,
        options::{ExchangeDeleteOptions, QueueDeleteOptions},
    };
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(name.into(), QueueDeleteOptions::default())
        .await?;
    ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(())
}

fn print_table(rows: &[Row], notes: &[String]) {
    let mut out = std::io::stdout().lock();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\nMachine: {cpus} CPUs ({cpu_model}); graphdelta {}",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "| case | events | wall s | events/s | events/CPU-s | floor s | vs floor | ideal s | vs ideal | conn. CPU % | peak RSS MiB | RSS after MiB |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let c = &r.connector;
        let floor = r.floor.map(|f| f.wall_s);
        let cell = |v: Option<f64>, digits: usize| {
            v.map_or("–".to_string(), |v| format!("{v:.digits$}"))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} |",
            r.case,
            c.events,
            c.wall_s,
            c.events as f64 / c.wall_s.max(1e-9),
            c.events as f64 / c.cpu_s.max(1e-9),
            cell(floor, 2),
            cell(floor.map(|f| c.wall_s / f.max(1e-9)), 2),
            cell(r.ideal_s, 2),
            cell(r.ideal_s.map(|i| c.wall_s / i.max(1e-9)), 2),
            100.0 * c.cpu_s / c.wall_s.max(1e-9),
            c.peak_rss_kb as f64 / 1024.0,
            c.rss_kb as f64 / 1024.0,
        );
    }
    for n in notes {
        let _ = writeln!(out, "\nnote: {n}");
    }
}

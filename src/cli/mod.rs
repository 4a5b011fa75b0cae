//! Command-line glue: parse flags, load the connector file, call the library,
//! print results. Errors here are `anyhow` with the library's message.

pub mod bench;
pub mod demo;
pub mod logging;
pub mod progress;
pub mod replay;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use graphdelta::{
    checkpoint::{self, Store},
    config::Config,
    graph, proto,
    runtime::{self, RunOptions},
};
use tokio_util::sync::CancellationToken;

/// Microsoft Graph delta queries as an event stream.
#[derive(Debug, Parser)]
#[command(name = "graphdelta", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "GRAPHDELTA_LOG_FORMAT"
    )]
    pub log_format: logging::LogFormat,
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job on embedded defaults: the built-in Graph simulator, the
    /// file sink and the embedded checkpoint store. No account or broker.
    Demo(demo::DemoArgs),
    /// Measure the pipeline against its own limits (fetch+parse floor,
    /// page latency) and print the figures.
    Bench(bench::BenchArgs),
    /// One measured run of `bench` (internal).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
    /// Serve the built-in Graph tenant simulator (delta protocol, token
    /// endpoint, faults, churn, ground truth).
    Simulate(Box<graphdelta::simulator::SimulateArgs>),
    /// Run the connector: every stream, polling until SIGTERM (or once).
    Run {
        /// The connector file.
        #[arg(long, short, env = "GRAPHDELTA_CONFIG")]
        config: PathBuf,
        /// One complete round per stream, commit, exit 0.
        #[arg(long)]
        once: bool,
    },
    /// Parse and check a connector file (including that secrets resolve).
    Validate {
        #[arg(long, short, env = "GRAPHDELTA_CONFIG")]
        config: PathBuf,
    },
    /// Print each stream's checkpoint: phase, age, objects remembered, link host.
    Status {
        #[arg(long, short, env = "GRAPHDELTA_CONFIG")]
        config: PathBuf,
    },
    /// Forget a stream's checkpoint and memory (its next run starts over).
    Reset {
        #[arg(long, short, env = "GRAPHDELTA_CONFIG")]
        config: PathBuf,
        /// The stream to forget.
        #[arg(long)]
        stream: String,
        /// Confirm: without it nothing is removed.
        #[arg(long)]
        yes: bool,
    },
    /// GET a URL and exit 0 on HTTP 2xx (container healthchecks: the runtime
    /// image has no curl).
    Probe {
        /// e.g. http://127.0.0.1:9464/health/ready
        url: String,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Re-read the whole directory for one stream and announce every object
    /// (snapshot events), inferring deletions like a resync, then resume
    /// from the stream's deltaLink so no change made meanwhile is lost.
    Resnapshot {
        #[arg(long, short, env = "GRAPHDELTA_CONFIG")]
        config: PathBuf,
        /// The stream to resnapshot.
        #[arg(long)]
        stream: String,
    },
    /// Rebuild a stream's state from its sink (Kafka topic, RabbitMQ stream
    /// queue or file) and write it out or verify it against the checkpoint.
    Replay(replay::ReplayArgs),
    /// Write the event schema's protobuf descriptor set.
    Schema {
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub async fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Demo(args) => demo::demo(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::BenchWorker(args) => bench::worker(args).await,
        Command::Simulate(args) => graphdelta::simulator::run(*args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Run { config, once } => run(config, once).await,
        Command::Validate { config } => validate(config),
        Command::Status { config } => status(config),
        Command::Reset {
            config,
            stream,
            yes,
        } => reset(config, &stream, yes),
        Command::Schema { out } => schema(out),
        Command::Resnapshot { config, stream } => resnapshot(config, &stream).await,
        Command::Probe { url, timeout } => probe(&url, timeout).await,
        Command::Replay(args) => replay::replay(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// SIGINT/SIGTERM cancel the token (drain and exit 0); a second signal exits
/// at once (the checkpoint simply stays behind the unacknowledged batches).
fn install_signal_handlers(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "Cannot install the SIGTERM handler.");
                    return;
                }
            };
        let mut signals = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            signals += 1;
            if signals == 1 {
                tracing::info!(
                    "Shutting down: finishing in-flight batches (signal again to exit at once)."
                );
                shutdown.cancel();
            } else {
                tracing::warn!(
                    "Second signal: exiting now; unacknowledged pages will be read again on restart."
                );
                std::process::exit(130);
            }
        }
    });
}

async fn run(path: PathBuf, once: bool) -> anyhow::Result<ExitCode> {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let shutdown = CancellationToken::new();
    install_signal_handlers(shutdown.clone());
    let options = RunOptions {
        once,
        shutdown,
        status: Default::default(),
    };
    let stop_progress = CancellationToken::new();
    let progress = progress::spawn(options.status.clone(), stop_progress.clone());
    let result = runtime::run(&config, options).await;
    stop_progress.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(runtime::RunError::Config(e)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn validate(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let resolved = match config.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    println!(
        "{}: OK ({} stream{}, sink {})",
        path.display(),
        resolved.len(),
        if resolved.len() == 1 { "" } else { "s" },
        config.sink.kind()
    );
    for r in &resolved {
        println!(
            "  {}: {} from {} (tenant {}), every {}",
            r.stream.name,
            r.stream.resource,
            graph::host_of(r.graph.base_url.as_str()),
            r.graph.tenant_id,
            humantime::format_duration(r.stream.poll_interval)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn status(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let now = std::time::SystemTime::now();
    for s in &config.streams {
        let Some(store) = Store::open_read_only(&config.checkpoint.path, &s.name)? else {
            println!(
                "{}: no checkpoint yet (the next run starts with a full round)",
                s.name
            );
            continue;
        };
        let Some(cp) = store.load_checkpoint()? else {
            println!("{}: no checkpoint yet", s.name);
            continue;
        };
        let age = cp
            .committed_at
            .map(|t| {
                let at = std::time::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, 0);
                let secs = now.duration_since(at).unwrap_or_default().as_secs();
                humantime::format_duration(Duration::from_secs(secs)).to_string()
            })
            .unwrap_or_else(|| "never".to_string());
        let link = if cp.link.is_empty() {
            "initial request".to_string()
        } else {
            format!(
                "{} on {}",
                if cp.phase() == proto::v1::Phase::Incremental
                    || cp.phase() == proto::v1::Phase::Reconcile
                {
                    "deltaLink"
                } else {
                    "nextLink"
                },
                graph::host_of(&cp.link)
            )
        };
        println!(
            "{}: phase {}, round {}, last commit {} ago, {} objects remembered, next: {}",
            s.name,
            runtime::status::phase_name(cp.phase()),
            cp.round,
            age,
            store.object_count()?,
            link
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn reset(path: PathBuf, stream: &str, yes: bool) -> anyhow::Result<ExitCode> {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if !config.streams.iter().any(|s| s.name == stream) {
        eprintln!(
            "error: no stream `{stream}` in {}; streams: {}",
            path.display(),
            config
                .streams
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if !yes {
        eprintln!(
            "This forgets stream `{stream}`'s checkpoint and memory: its next run re-reads the whole directory and announces every object as CREATED again. Add --yes to confirm."
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    if checkpoint::reset(&config.checkpoint.path, stream)? {
        println!("{stream}: checkpoint removed");
    } else {
        println!("{stream}: had no checkpoint");
    }
    Ok(ExitCode::SUCCESS)
}

fn schema(out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    match out {
        Some(path) => std::fs::write(&path, proto::FILE_DESCRIPTOR_SET)?,
        None => {
            use std::io::Write;
            std::io::stdout().write_all(proto::FILE_DESCRIPTOR_SET)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn probe(url: &str, timeout: Duration) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder().timeout(timeout).build()?;
    match client.get(url).send().await {
        Ok(r) if r.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            eprintln!("{url}: HTTP {status}: {}", body.trim());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn resnapshot(path: PathBuf, stream: &str) -> anyhow::Result<ExitCode> {
    let mut config = match load(&path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    if !config.streams.iter().any(|s| s.name == stream) {
        eprintln!(
            "error: no stream `{stream}` in {}; streams: {}",
            path.display(),
            config
                .streams
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    config.streams.retain(|s| s.name == stream);
    {
        let mut store = Store::open(&config.checkpoint.path, stream)?;
        if let Err(why) = runtime::begin_resnapshot(&mut store, stream) {
            eprintln!("error: {why}");
            return Ok(ExitCode::FAILURE);
        }
    }
    let shutdown = CancellationToken::new();
    install_signal_handlers(shutdown.clone());
    // The full round, then the incremental round from the kept deltaLink.
    let mut announced = std::collections::BTreeMap::<String, u64>::new();
    for _ in 0..2 {
        let status = runtime::StatusRegistry::default();
        let stop_progress = CancellationToken::new();
        let progress = progress::spawn(status.clone(), stop_progress.clone());
        let result = runtime::run(
            &config,
            RunOptions {
                once: true,
                shutdown: shutdown.clone(),
                status: status.clone(),
            },
        )
        .await;
        stop_progress.cancel();
        if let Some(p) = progress {
            let _ = p.await;
        }
        if let Err(e) = result {
            eprintln!("error: {e}");
            return Ok(ExitCode::FAILURE);
        }
        for s in status.snapshot() {
            for (change, n) in s.events {
                *announced.entry(change).or_default() += n;
            }
        }
        if shutdown.is_cancelled() {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let events: Vec<String> = announced.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "{stream}: resnapshot done ({}); polling continues from its deltaLink",
        if events.is_empty() {
            "no events".to_string()
        } else {
            events.join(", ")
        }
    );
    Ok(ExitCode::SUCCESS)
}

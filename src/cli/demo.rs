//! `graphdelta demo`: the main job on embedded defaults. Starts the built-in
//! Graph tenant simulator in-process, and runs the connector against it with
//! the file sink and the embedded checkpoint store, round after round, while
//! the simulator changes the tenant: an initial sync, incremental rounds
//! with churn, and a 410 resync. Prints what happened and where to look.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Instant};

use clap::Args;
use graphdelta::{
    config::Config,
    proto::v1::ChangeEvent,
    runtime::{self, RunOptions, StatusRegistry},
    simulator::{ChurnSpec, Fault, FaultScope, SimConfig, Simulator},
};
use tokio_util::sync::CancellationToken;

/// `graphdelta demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Users in the simulated tenant.
    #[arg(long, default_value_t = 5000)]
    users: usize,
    /// Groups in the simulated tenant (with members).
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Incremental rounds with churn after the initial sync.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Changes the simulator makes before each incremental round.
    #[arg(long, default_value_t = 200)]
    churn: usize,
    /// Directory for the connector file, events and checkpoint store
    /// (emptied first).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.out.exists() {
        // Only ever remove what a previous demo made.
        for name in ["connector.toml", "events.ndjson", "simulator-secret"] {
            let _ = std::fs::remove_file(args.out.join(name));
        }
        let _ = std::fs::remove_dir_all(args.out.join("state"));
    }
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;

    let sim_config = SimConfig {
        users: args.users,
        groups: args.groups,
        ..SimConfig::default()
    };
    let secret = sim_config.client_secret.clone();
    let simulator = Simulator::new(sim_config);
    let handle = simulator.clone().spawn(([127, 0, 0, 1], 0).into()).await?;
    println!(
        "Simulated tenant: {} users, {} groups at {}",
        args.users,
        args.groups,
        handle.base_url()
    );

    std::fs::write(out.join("simulator-secret"), &secret)?;
    let connector = format!(
        r#"# Written by `graphdelta demo`: the built-in simulator, file sink, embedded store.
[graph]
base_url = "{base}"
token_url = "{token}"
tenant_id = "contoso.onmicrosoft.com"
client_id = "graphdelta-simulator"
client_secret_file = "simulator-secret"

[[streams]]
name = "users"
resource = "users"
select = ["displayName", "givenName", "surname", "mail", "jobTitle", "department", "accountEnabled"]
return_minimal = true

[[streams]]
name = "groups"
resource = "groups"
select = ["displayName", "description", "mailNickname", "members"]

[sink]
type = "file"
path = "events.ndjson"

[checkpoint]
path = "state"
"#,
        base = handle.base_url(),
        token = handle
            .token_url()
            .replace("contoso.onmicrosoft.com", "{tenant}"),
    );
    let config_path = out.join("connector.toml");
    std::fs::write(&config_path, connector)?;
    let config = Config::load(&config_path)?;

    let events_path = out.join("events.ndjson");
    let mut seen = 0usize;
    let round = |label: String| {
        let config = config.clone();
        let events_path = events_path.clone();
        async move {
            let started = Instant::now();
            let status = StatusRegistry::default();
            let stop = CancellationToken::new();
            let progress = super::progress::spawn(status.clone(), stop.clone());
            let result = runtime::run(
                &config,
                RunOptions {
                    once: true,
                    shutdown: CancellationToken::new(),
                    status,
                },
            )
            .await;
            stop.cancel();
            if let Some(p) = progress {
                let _ = p.await;
            }
            result?;
            let events = read_events(&events_path)?;
            Ok::<_, anyhow::Error>((label, events, started.elapsed()))
        }
    };

    let mut report = |label: &str, events: &[ChangeEvent], took: std::time::Duration| {
        let new = &events[seen.min(events.len())..];
        seen = events.len();
        let mut by_type: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
        for e in new {
            *by_type
                .entry((e.stream.clone(), e.change_type().short_name()))
                .or_default() += 1;
        }
        let parts: Vec<String> = by_type
            .iter()
            .map(|((stream, change), n)| format!("{stream}/{change} {n}"))
            .collect();
        println!(
            "{label:<34} {:>7} events in {:>6.2}s  {}",
            new.len(),
            took.as_secs_f64(),
            if parts.is_empty() {
                "(no changes)".to_string()
            } else {
                parts.join(", ")
            }
        );
    };

    let (label, events, took) = round("Round 1: initial sync".to_string()).await?;
    report(&label, &events, took);
    for i in 0..args.rounds {
        let churn = simulator.churn(&ChurnSpec::mixed(args.churn));
        let (label, events, took) = round(format!(
            "Round {}: after {} changes",
            i + 2,
            churn.applied.total()
        ))
        .await?;
        report(&label, &events, took);
    }
    // Graph resets the sync state now and then (410 Gone): the connector
    // reads everything again and infers what was deleted meanwhile.
    simulator.churn(&ChurnSpec::mixed(args.churn));
    simulator.inject(Fault::Gone {
        count: 1,
        scope: FaultScope::DeltaLink,
    });
    let (label, events, took) =
        round(format!("Round {}: 410 Gone → resync", args.rounds + 2)).await?;
    report(&label, &events, took);
    let (label, events, took) = round(format!("Round {}: quiet", args.rounds + 3)).await?;
    report(&label, &events, took);

    let total = read_events(&events_path)?.len();
    println!();
    println!("{total} events in {}", events_path.display());
    println!(
        "  jq -c '{{type: .changeType, id: .objectId, changed: .changedProperties}}' {} | head",
        events_path.display()
    );
    println!("  graphdelta status --config {}", config_path.display());
    handle.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn read_events(path: &std::path::Path) -> anyhow::Result<Vec<ChangeEvent>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(anyhow::Error::from))
        .collect()
}

//! `graphdelta simulate`: run the simulator as a standalone server.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

use super::{ChurnSpec, SimConfig, Simulator};

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0.0 and 1.0"))
    }
}

/// Flags of `graphdelta simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on. The control API (/_sim) has no authentication:
    /// keep the default loopback address unless the network is trusted.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Initial users.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Initial groups.
    #[arg(long, default_value_t = 50)]
    pub groups: usize,
    /// Initial applications.
    #[arg(long, default_value_t = 20)]
    pub applications: usize,
    /// Initial devices.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Initial service principals.
    #[arg(long, default_value_t = 20)]
    pub service_principals: usize,
    /// Average members of an initial group.
    #[arg(long, default_value_t = 10)]
    pub members_per_group: usize,
    /// Seed of the synthetic tenant (same seed, same tenant).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Objects per delta page.
    #[arg(long, default_value_t = 200, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub page_size: usize,
    /// members@delta entries per group appearance.
    #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub member_slice: usize,
    /// Tenant accepted in the token URL.
    #[arg(long, default_value = "contoso.onmicrosoft.com")]
    pub tenant_id: String,
    /// Client id accepted by the token endpoint.
    #[arg(long, default_value = "graphdelta-simulator")]
    pub client_id: String,
    /// Client secret accepted by the token endpoint.
    #[arg(
        long,
        env = "GRAPHDELTA_SIM_SECRET",
        default_value = "simulator-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Access token lifetime (e.g. "1h", "90s").
    #[arg(long, default_value = "3599s", value_parser = parse_duration)]
    pub token_lifetime: Duration,
    /// Latency added before every delta page (e.g. "150ms").
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub page_latency: Duration,
    /// Share of page slots re-sending objects already sent in the round (0.0–1.0).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub replay_rate: f64,
    /// Sometimes answer empty pages that still carry a nextLink.
    #[arg(long)]
    pub empty_pages: bool,
    /// Base URL for links instead of http://{Host}/v1.0 (behind a proxy).
    #[arg(long)]
    pub public_base: Option<String>,
    /// Churn the tenant automatically at this interval (e.g. "10s").
    #[arg(long, value_parser = parse_duration)]
    pub churn_interval: Option<Duration>,
    /// Mutations per automatic churn (a realistic mix, see ChurnSpec::mixed).
    #[arg(long, default_value_t = 50)]
    pub churn_size: usize,
}

impl SimulateArgs {
    /// The simulator configuration these flags describe.
    pub fn config(&self) -> SimConfig {
        SimConfig {
            users: self.users,
            groups: self.groups,
            applications: self.applications,
            devices: self.devices,
            service_principals: self.service_principals,
            members_per_group: self.members_per_group,
            seed: self.seed,
            page_size: self.page_size,
            member_slice: self.member_slice,
            tenant_id: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            token_lifetime: self.token_lifetime,
            page_latency: self.page_latency,
            replay_rate: self.replay_rate,
            empty_pages: self.empty_pages,
            public_base: self.public_base.clone(),
        }
    }
}

/// Serves the simulator until Ctrl-C, logging the URLs and credentials to use.
pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let sim = Simulator::new(args.config());
    let handle = sim
        .spawn(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}: is the port in use?", args.listen))?;
    let secret_shown = if args.client_secret == SimConfig::default().client_secret {
        args.client_secret.clone()
    } else {
        "(as given by --client-secret / GRAPHDELTA_SIM_SECRET)".to_owned()
    };
    tracing::info!(
        base_url = %handle.base_url(),
        token_url = %handle.token_url(),
        client_id = %args.client_id,
        client_secret = %secret_shown,
        users = args.users,
        groups = args.groups,
        seed = args.seed,
        "Graph simulator ready. Point a connector's base_url and token_url here; \
         control API at /_sim (no authentication)."
    );
    if !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "The simulator's control API has no authentication and is reachable beyond loopback."
        );
    }
    let churn = args.churn_interval.map(|every| {
        tracing::info!(every = %humantime::format_duration(every), size = args.churn_size, "Automatic churn on.");
        handle
            .simulator()
            .spawn_auto_churn(every, ChurnSpec::mixed(args.churn_size))
    });
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    tracing::info!("Ctrl-C received; stopping the Graph simulator.");
    if let Some(task) = churn {
        task.abort();
    }
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    #[test]
    fn flags_parse_with_defaults_matching_sim_config() {
        let cli = Cli::try_parse_from(["sim"]).unwrap();
        let mut cfg = cli.args.config();
        assert_eq!(cli.args.listen.to_string(), "127.0.0.1:8080");
        // The secret may come from the environment; compare the rest.
        cfg.client_secret = SimConfig::default().client_secret;
        assert_eq!(cfg, SimConfig::default());
    }

    #[test]
    fn flags_are_validated() {
        let cli = Cli::try_parse_from([
            "sim",
            "--users",
            "1000000",
            "--churn-interval",
            "10s",
            "--churn-size",
            "5",
            "--page-latency",
            "150ms",
        ])
        .unwrap();
        assert_eq!(cli.args.users, 1_000_000);
        assert_eq!(cli.args.churn_interval, Some(Duration::from_secs(10)));
        assert_eq!(cli.args.page_latency, Duration::from_millis(150));
        assert!(Cli::try_parse_from(["sim", "--replay-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["sim", "--page-size", "0"]).is_err());
    }
}

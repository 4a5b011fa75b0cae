//! Running a connector definition: one task per stream, one sink, one
//! Graph client per tenant, and a shutdown token.
//!
//! The runtime is the only place that commits checkpoints, and only after
//! the sink acknowledged (see [`stream`] for the commit rule).

pub mod http;
pub mod metrics;
pub mod status;
pub mod stream;

use std::{collections::HashMap, sync::Arc};

use tokio_util::sync::CancellationToken;

pub use self::{
    status::{StatusHandle, StatusRegistry, StreamStatus},
    stream::{Outcome, StreamError, StreamRunner},
};
use crate::{
    checkpoint::{CheckpointError, Store},
    config::{Config, ConfigError},
    graph::{GraphClient, GraphError, TokenProvider, client::build_http},
    sink::{self, Sink, SinkError},
};

/// Why a run could not start or did not finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("sink ({kind}): {source}")]
    Sink {
        kind: &'static str,
        source: SinkError,
    },
    #[error("tenant `{tenant}`: {source}")]
    Graph { tenant: String, source: GraphError },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Http(std::io::Error),
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Streams(Vec<StreamError>),
    /// Cluster mode could not start or lost its group.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after one complete round per stream.
    pub once: bool,
    /// Cancelled on SIGTERM/SIGINT: streams finish in-flight batches and stop.
    pub shutdown: CancellationToken,
    /// Shared status for `/status`, readiness and progress.
    pub status: StatusRegistry,
}

/// A run that was set up: the sink is reachable and every store is open.
pub struct Prepared {
    runners: Vec<StreamRunner>,
    sink: Arc<dyn Sink>,
    graphs: Vec<GraphClient>,
}

impl Prepared {
    /// Builds the sink (and checks it is reachable), the Graph clients and
    /// opens every stream's checkpoint store.
    pub async fn new(config: &Config, options: &RunOptions) -> Result<Prepared, RunError> {
        let resolved = config.resolve()?;
        let sink = build_sink(config).await?;
        Self::with_sink(config, options, sink, resolved)
    }

    /// Like [`Prepared::new`] with a sink built by the caller.
    pub fn with_sink(
        config: &Config,
        options: &RunOptions,
        sink: Arc<dyn Sink>,
        resolved: Vec<crate::config::ResolvedStream>,
    ) -> Result<Prepared, RunError> {
        let clients = graph_clients(&resolved)?;
        let mut runners = Vec::with_capacity(resolved.len());
        for r in resolved {
            let tenant = r.graph.name.clone();
            let graph = clients[&tenant].clone();
            let store = Store::open(&config.checkpoint.path, &r.stream.name)?;
            let status = StatusHandle::new(&r.stream.name, &r.stream.resource, &tenant);
            options.status.register(status.clone());
            runners.push(StreamRunner::new(
                r,
                graph,
                sink.clone(),
                store,
                config.runtime.clone(),
                status,
                options.shutdown.clone(),
            ));
        }
        Ok(Prepared {
            runners,
            sink,
            graphs: sorted_clients(clients),
        })
    }

    /// Runs every stream to the end (caught up with `once`, or shutdown).
    pub async fn run(self, once: bool) -> Result<(), RunError> {
        let mut tasks = tokio::task::JoinSet::new();
        for runner in self.runners {
            tasks.spawn(runner.run(once));
        }
        let mut errors = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        self.sink.close().await;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RunError::Streams(errors))
        }
    }
}

/// Builds the configured sink and checks that it is reachable.
pub async fn build_sink(config: &Config) -> Result<Arc<dyn Sink>, RunError> {
    let sink = sink::build(&config.sink)
        .await
        .map_err(|source| RunError::Sink {
            kind: config.sink.kind(),
            source,
        })?;
    sink.check().await.map_err(|source| RunError::Sink {
        kind: config.sink.kind(),
        source,
    })?;
    Ok(sink)
}

/// One Graph client (HTTP pool and token) per tenant, shared by its
/// streams; keyed by tenant name.
pub fn graph_clients(
    resolved: &[crate::config::ResolvedStream],
) -> Result<HashMap<String, GraphClient>, RunError> {
    let mut clients: HashMap<String, GraphClient> = HashMap::new();
    for r in resolved {
        let tenant = r.graph.name.clone();
        if clients.contains_key(&tenant) {
            continue;
        }
        let http = build_http(&r.graph).map_err(|source| RunError::Graph {
            tenant: tenant.clone(),
            source,
        })?;
        let auth = Arc::new(TokenProvider::new(http.clone(), r.graph.clone()));
        clients.insert(tenant, GraphClient::with_parts(http, auth, r.graph.clone()));
    }
    Ok(clients)
}

/// The clients in tenant-name order.
pub fn sorted_clients(clients: HashMap<String, GraphClient>) -> Vec<GraphClient> {
    let mut graphs: Vec<(String, GraphClient)> = clients.into_iter().collect();
    graphs.sort_by(|a, b| a.0.cmp(&b.0));
    graphs.into_iter().map(|(_, c)| c).collect()
}

/// Starts the HTTP endpoint and the readiness probes, if configured; they
/// stop when the returned guard is dropped.
pub async fn start_ops(
    config: &Config,
    status: &StatusRegistry,
    graphs: Vec<GraphClient>,
    sink: Arc<dyn Sink>,
) -> Result<tokio_util::sync::DropGuard, RunError> {
    let ops = CancellationToken::new();
    if let Some(h) = &config.http {
        let readiness = Arc::new(http::Readiness::default());
        http::serve(&h.listen, status.clone(), readiness.clone(), ops.clone())
            .await
            .map_err(RunError::Http)?;
        tokio::spawn(http::probe_loop(
            graphs,
            sink,
            status.clone(),
            readiness,
            h.probe_interval,
            ops.clone(),
        ));
    }
    Ok(ops.drop_guard())
}

/// Runs a connector definition (with its HTTP endpoint, if configured).
pub async fn run(config: &Config, options: RunOptions) -> Result<(), RunError> {
    if config.http.is_some() {
        // Install the recorder before the first metric is emitted.
        http::prometheus();
    }
    if config.cluster.is_some() {
        return crate::cluster::run(config, options).await;
    }
    let prepared = Prepared::new(config, &options).await?;
    let _stop_ops = start_ops(
        config,
        &options.status,
        prepared.graphs.clone(),
        prepared.sink.clone(),
    )
    .await?;
    prepared.run(options.once).await
}

/// Starts a resnapshot of a stream: its next round is a full round that
/// announces every object (snapshot events) and infers deletions like a
/// resync, after which polling resumes from the deltaLink the stream had
/// now, so no change made meanwhile is lost.
pub fn begin_resnapshot(
    store: &mut Store,
    stream: &str,
) -> Result<crate::proto::v1::StreamCheckpoint, String> {
    use crate::proto::v1::{Phase, StreamCheckpoint};
    let cp = store
        .load_checkpoint()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!("stream `{stream}` has no checkpoint yet: run it once first (its initial round is a snapshot already)")
        })?;
    if !store.outbox().map_err(|e| e.to_string())?.is_empty() {
        return Err(format!(
            "stream `{stream}` has batches a previous run handed to the sink without committing them: run it once (graphdelta run --once) to deliver them, then resnapshot"
        ));
    }
    if cp.phase() != Phase::Incremental || cp.link.is_empty() {
        return Err(format!(
            "stream `{stream}` is in its {} phase: let it reach its deltaLink first (graphdelta run --once), then resnapshot",
            status::phase_name(cp.phase())
        ));
    }
    let now = Some(crate::normalize::timestamp(std::time::SystemTime::now()));
    let next = StreamCheckpoint {
        phase: Phase::Resync as i32,
        link: String::new(),
        round: cp.round + 1,
        resume_link: cp.link.clone(),
        resnapshot: true,
        round_started_at: now,
        committed_at: now,
        ..cp
    };
    store
        .commit(&next, &Default::default())
        .map_err(|e| e.to_string())?;
    Ok(next)
}

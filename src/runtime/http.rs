//! The operator endpoint (`[http] listen = "127.0.0.1:9464"`, off unless
//! configured):
//!
//! - `GET /metrics`: Prometheus text format (see [`super::metrics`]);
//! - `GET /health/live`: 200 while the process runs;
//! - `GET /health/ready`: 200 when every tenant's token endpoint accepts our
//!   credentials and the sink is reachable, else 503 with the reasons;
//! - `GET /status`: JSON, per stream: phase, state, last round and commit
//!   times, checkpoint age, events by type, last error.
//!
//! Readiness is probed in the background every few seconds (not per
//! request), so a scraper cannot hammer Graph's token endpoint.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{
    metrics as m,
    status::{StatusRegistry, StreamStatus, unix_now},
};
use crate::{graph::GraphClient, sink::Sink};

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
            .expect("bucket list is not empty")
            .install_recorder()
            .unwrap_or_else(|_| {
                // Another recorder is installed (embedding application):
                // serve an empty registry rather than failing.
                PrometheusBuilder::new().build_recorder().handle()
            });
        m::describe();
        handle
    })
}

/// What readiness depends on.
#[derive(Debug, Default)]
pub struct Readiness {
    problems: Mutex<Vec<String>>,
    checked: Mutex<bool>,
}

impl Readiness {
    /// `Ok` when ready; otherwise the reasons.
    pub fn state(&self) -> Result<(), Vec<String>> {
        if !*self.checked.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(vec!["starting: readiness not checked yet".to_string()]);
        }
        let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.clone())
        }
    }

    fn set(&self, problems: Vec<String>) {
        *self.problems.lock().unwrap_or_else(|p| p.into_inner()) = problems;
        *self.checked.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }
}

#[derive(Clone)]
struct AppState {
    status: StatusRegistry,
    readiness: Arc<Readiness>,
    started_at: u64,
}

/// Probes Graph auth and the sink until `shutdown`, updating `readiness`
/// and the checkpoint-age gauges.
pub async fn probe_loop(
    graphs: Vec<GraphClient>,
    sink: Arc<dyn Sink>,
    status: StatusRegistry,
    readiness: Arc<Readiness>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let mut problems = Vec::new();
        for g in &graphs {
            if let Err(e) = g.check_auth().await {
                problems.push(format!("graph tenant `{}`: {e}", g.settings().name));
            }
        }
        if let Err(e) = sink.check().await {
            problems.push(format!("sink {}: {e}", sink.kind()));
        }
        let now = unix_now();
        for s in status.snapshot() {
            if s.state == "failed"
                && let Some(err) = &s.last_error
            {
                problems.push(format!("stream `{}` failed: {err}", s.stream));
            }
            if let Some(at) = s.last_commit_at {
                metrics::gauge!(m::CHECKPOINT_AGE, "stream" => s.stream.clone())
                    .set(now.saturating_sub(at) as f64);
            }
        }
        readiness.set(problems);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Binds `listen` and serves the endpoint until `shutdown`.
pub async fn serve(
    listen: &str,
    status: StatusRegistry,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    prometheus();
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("http.listen `{listen}`: cannot listen: {e} (choose a free address, e.g. 127.0.0.1:9464)"),
        )
    })?;
    let addr = listener.local_addr()?;
    let state = AppState {
        status,
        readiness,
        started_at: unix_now(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready_handler))
        .route("/status", get(status_handler))
        .with_state(state);
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "The HTTP endpoint stopped.");
        }
    });
    tracing::info!(%addr, "Serving /metrics, /health/live, /health/ready and /status.");
    Ok((addr, task))
}

async fn metrics_handler() -> impl IntoResponse {
    let handle = prometheus();
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    match state.readiness.state() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n- {}\n", problems.join("\n- ")),
        ),
    }
}

#[derive(Serialize)]
struct StatusBody {
    version: &'static str,
    started_at: u64,
    ready: bool,
    not_ready_reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<super::status::ClusterStatus>,
    streams: Vec<StreamStatusBody>,
}

#[derive(Serialize)]
struct StreamStatusBody {
    #[serde(flatten)]
    status: StreamStatus,
    checkpoint_age_seconds: Option<u64>,
}

async fn status_handler(State(state): State<AppState>) -> impl IntoResponse {
    let now = unix_now();
    let (ready, not_ready_reasons) = match state.readiness.state() {
        Ok(()) => (true, vec![]),
        Err(r) => (false, r),
    };
    Json(StatusBody {
        version: env!("CARGO_PKG_VERSION"),
        started_at: state.started_at,
        ready,
        not_ready_reasons,
        cluster: state.status.cluster(),
        streams: state
            .status
            .snapshot()
            .into_iter()
            .map(|s| StreamStatusBody {
                checkpoint_age_seconds: s.last_commit_at.map(|t| now.saturating_sub(t)),
                status: s,
            })
            .collect(),
    })
}

//! Live per-stream status, shared between the stream tasks and whoever
//! reports on them (`/status`, readiness, the demo's summary, progress).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;

use crate::proto::v1::{ChangeType, Phase};

/// What one stream is doing.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub resource: String,
    pub tenant: String,
    /// initial | incremental | resync | reconcile | starting
    pub phase: String,
    /// `running`, `caught_up`, `stopped`, `failed`
    pub state: String,
    /// Unix seconds of the last completed round.
    pub last_round_completed_at: Option<u64>,
    /// Unix seconds of the last checkpoint commit.
    pub last_commit_at: Option<u64>,
    pub rounds_completed: u64,
    pub resyncs: u64,
    pub pages: u64,
    /// Objects processed in the current round (progress).
    pub round_objects: u64,
    pub round_pages: u64,
    /// Events acknowledged, by change type (`created`, `updated`, ...).
    pub events: BTreeMap<String, u64>,
    pub last_error: Option<String>,
    /// Cluster mode: the instance that runs the stream, when it is this one
    /// (others are listed under `cluster.members`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Cluster mode: how often this instance took the stream over (from the
    /// state topic) since it started.
    #[serde(skip_serializing_if = "is_zero")]
    pub takeovers: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Shared handle to one stream's status.
#[derive(Debug, Clone, Default)]
pub struct StatusHandle(Arc<Mutex<StreamStatus>>);

impl StatusHandle {
    pub fn new(stream: &str, resource: &str, tenant: &str) -> Self {
        Self(Arc::new(Mutex::new(StreamStatus {
            stream: stream.to_string(),
            resource: resource.to_string(),
            tenant: tenant.to_string(),
            phase: "starting".to_string(),
            state: "running".to_string(),
            ..Default::default()
        })))
    }

    pub fn update(&self, f: impl FnOnce(&mut StreamStatus)) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    pub fn snapshot(&self) -> StreamStatus {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_phase(&self, phase: Phase) {
        self.update(|s| s.phase = phase_name(phase).to_string());
    }

    pub fn count_event(&self, change: ChangeType, n: u64) {
        self.update(|s| *s.events.entry(change.short_name().to_string()).or_default() += n);
    }
}

/// The name of a phase in status output.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Unspecified => "starting",
        Phase::Initial => "initial",
        Phase::Incremental => "incremental",
        Phase::Resync => "resync",
        Phase::Reconcile => "reconcile",
    }
}

/// Cluster mode: this instance and the group as it last saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    pub group: String,
    pub instance_id: String,
    /// The streams this instance owns, by name.
    pub owned: Vec<String>,
    /// Rebalances this instance took part in (assignments and revocations).
    pub rebalances: u64,
    /// Unix seconds of the last assignment or revocation.
    pub last_rebalance_at: Option<u64>,
    /// Every instance of the group and the streams it owns, from the
    /// owners' claims in the assignments topic (`cluster::owners`).
    pub members: Vec<ClusterMember>,
}

/// One instance of the group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterMember {
    pub instance_id: String,
    pub streams: Vec<String>,
}

/// All streams' status.
#[derive(Debug, Clone, Default)]
pub struct StatusRegistry {
    streams: Arc<Mutex<Vec<StatusHandle>>>,
    cluster: Arc<Mutex<Option<ClusterStatus>>>,
}

impl StatusRegistry {
    pub fn register(&self, handle: StatusHandle) {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle);
    }

    /// Changes the cluster section (creating it on first use).
    pub fn update_cluster(&self, f: impl FnOnce(&mut ClusterStatus)) {
        let mut c = self.cluster.lock().unwrap_or_else(|p| p.into_inner());
        f(c.get_or_insert_with(ClusterStatus::default));
    }

    /// The cluster section; `None` outside cluster mode.
    pub fn cluster(&self) -> Option<ClusterStatus> {
        self.cluster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn snapshot(&self) -> Vec<StreamStatus> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(StatusHandle::snapshot)
            .collect()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

//! The built-in Microsoft Graph tenant simulator: an HTTP server that speaks
//! the Graph delta protocol for a synthetic Entra ID tenant.
//!
//! It is what `graphdelta simulate` runs, what the README's demo talks to, and
//! what the integration tests and benchmarks use. A connector configured for
//! it differs from production only in `base_url` and `token_url`.
//!
//! # Layout
//!
//! - [`model`]: object kinds, property schemas and the deterministic generator
//!   of the initial population (ids are uuid v5 of seed, kind and index).
//! - [`tenant`]: state, mutations, the change log (one sequence number per
//!   mutation), churn, ground truth.
//! - [`delta`]: query parsing, opaque tokens, rounds, paging, page JSON.
//! - [`faults`]: injectable failures. [`stats`]: request counters.
//! - `server`: axum routes (token endpoint, delta endpoints, control API).
//! - [`cli`]: `graphdelta simulate` ([`SimulateArgs`], [`run`]).
//!
//! # Endpoints (same paths as Microsoft)
//!
//! - `POST /{tenant}/oauth2/v2.0/token`: OAuth2 client credentials
//!   (`grant_type=client_credentials`, `client_id`, `client_secret` or HTTP
//!   Basic, `scope=.../.default`). Answers
//!   `{"token_type":"Bearer","expires_in":N,"ext_expires_in":N,"access_token":...}`
//!   or an AAD error (`invalid_client` / `AADSTS7000215` for a wrong secret).
//! - `GET /v1.0/{resource}/delta` (also `/microsoft.graph.delta()` and a
//!   trailing `/`) for `users`, `groups`, `applications`, `devices`,
//!   `servicePrincipals` and `directoryObjects`. Requires
//!   `Authorization: Bearer <token>` (401 `InvalidAuthenticationToken`
//!   otherwise). Parameters: `$select` (per type on directoryObjects:
//!   `microsoft.graph.user/surname`; `members` on groups enables
//!   `members@delta`), `$filter` (`id eq '...'` terms, at most 50, and on
//!   directoryObjects `isof('microsoft.graph.user')`, joined by `or`),
//!   `$deltatoken=latest` (no enumeration: an empty round "from now"),
//!   `$top` (ignored). Headers: `Prefer: odata.maxpagesize=N` (honoured when
//!   below the page size), `Prefer: return=minimal` (on incremental rounds);
//!   both are echoed in `Preference-Applied` when applied.
//!
//! Pages carry exactly one of `@odata.nextLink` (`?$skiptoken=`) and
//! `@odata.deltaLink` (`?$deltatoken=`), absolute URLs on the request's
//! `Host` (or [`SimConfig::public_base`]); `$select`/`$filter` live inside the
//! opaque token, never in the link. See [`delta`] for the round semantics.
//!
//! # Control API (no authentication)
//!
//! On the same listener, for out-of-process tests and benchmarks:
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /_sim/churn` | [`ChurnSpec`] | [`ChurnReport`] |
//! | `POST /_sim/faults` | a [`Fault`] or an array of them | `{"queued": n}` |
//! | `GET /_sim/faults` | | queued faults (remaining counts) |
//! | `DELETE /_sim/faults` | | 204 |
//! | `GET /_sim/truth` | | [`GroundTruth`] |
//! | `GET /_sim/changes[?since=SEQ]` | | a list of [`ChangeRecord`] |
//! | `GET /_sim/stats` / `DELETE /_sim/stats` | | [`SimStats`] / 204 (reset) |
//! | `POST /_sim/mutate` | [`Mutation`] | [`MutationOutcome`] |
//! | `POST /_sim/page-latency` | `{"page_latency":"150ms"}` | 204 |
//!
//! The control API lets anyone who can reach the port rewrite the tenant and
//! read its ground truth; that is why `graphdelta simulate` binds loopback
//! (`127.0.0.1:8080`) by default. Expose it only on networks you trust.
//!
//! # Determinism
//!
//! For a given seed and the same sequence of mutations, ids, properties,
//! member lists and churn choices are identical forever (a built-in SplitMix64,
//! not the `rand` crate). Tokens are the exception: they are authenticated with
//! a random per-process secret, so a token outlives neither the process nor a
//! restart.

pub mod cli;
pub mod delta;
pub mod faults;
pub mod model;
mod rng;
mod server;
pub mod stats;
pub mod tenant;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

pub use cli::{SimulateArgs, run};
pub use faults::{Fault, FaultScope};
pub use model::ObjectKind;
pub use stats::{AuthorizationCounts, RequestKind, SimStats};
pub use tenant::{
    ChangeKind, ChangeRecord, ChurnCounts, ChurnReport, ChurnSpec, GroundTruth, Mutation,
    MutationOutcome, ObjectState, TruthObject,
};

use delta::{Engine, EngineConfig};
use faults::FaultQueue;
use model::{GenCtx, Key};
use server::TokenStore;
use tenant::{Population, Tenant};

/// Why a direct mutation or fault was refused. None of these is transient:
/// retrying the same call cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No object has this id.
    #[error("object `{id}` does not exist in the simulated tenant")]
    UnknownObject {
        /// The id.
        id: String,
    },
    /// The id is not a GUID.
    #[error("`{id}` is not an object id (expected a GUID)")]
    InvalidId {
        /// The text given.
        id: String,
    },
    /// The object's state forbids the operation (e.g. restoring a live object).
    #[error("cannot {op} object `{id}`: it is {state}")]
    WrongState {
        /// The object id.
        id: String,
        /// Its state (`live`, `soft-deleted`, `hard-deleted`).
        state: &'static str,
        /// The refused operation.
        op: &'static str,
    },
    /// The kind has no such property.
    #[error("{kind} have no property `{name}`")]
    UnknownProperty {
        /// The object kind.
        kind: ObjectKind,
        /// The property name given.
        name: String,
    },
    /// The property cannot be changed (ids, creation time).
    #[error("property `{name}` of {kind} is read-only")]
    ReadOnlyProperty {
        /// The object kind.
        kind: ObjectKind,
        /// The property name.
        name: String,
    },
    /// The value has the wrong JSON type for the property.
    #[error("{value} is not a valid value for `{name}` of {kind}")]
    InvalidValue {
        /// The object kind.
        kind: ObjectKind,
        /// The property name.
        name: String,
        /// The value given, as JSON.
        value: String,
    },
    /// Properties must be given as a JSON object.
    #[error("properties must be a JSON object")]
    PropertiesNotAnObject,
    /// Membership operations need a group.
    #[error("object `{id}` is not a group")]
    NotAGroup {
        /// The id given as group.
        id: String,
    },
    /// That object cannot be a group member (applications, the group itself).
    #[error("object `{id}` ({kind}) cannot be a member of this group")]
    InvalidMember {
        /// The member id.
        id: String,
        /// Its kind.
        kind: ObjectKind,
    },
    /// Already a member.
    #[error("`{member}` is already a member of group `{group}`")]
    AlreadyMember {
        /// The group id.
        group: String,
        /// The member id.
        member: String,
    },
    /// Not a member.
    #[error("`{member}` is not a member of group `{group}`")]
    NotAMember {
        /// The group id.
        group: String,
        /// The member id.
        member: String,
    },
    /// The kind already holds the maximum number of objects (2^32 - 1).
    #[error("the simulated tenant cannot hold more {kind}")]
    TenantFull {
        /// The kind.
        kind: ObjectKind,
    },
    /// A fault with out-of-range parameters.
    #[error("invalid fault: {reason}")]
    InvalidFault {
        /// What is wrong.
        reason: String,
    },
}

impl SimError {
    /// The HTTP status the control API answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            SimError::UnknownObject { .. } => 404,
            SimError::WrongState { .. }
            | SimError::AlreadyMember { .. }
            | SimError::NotAMember { .. } => 409,
            _ => 400,
        }
    }
}

/// The simulated tenant and server settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Initial users.
    pub users: usize,
    /// Initial groups.
    pub groups: usize,
    /// Initial applications.
    pub applications: usize,
    /// Initial devices.
    pub devices: usize,
    /// Initial service principals (the first ones mirror the applications).
    pub service_principals: usize,
    /// Average member count of an initial group (each has between half and
    /// one and a half times this many users).
    pub members_per_group: usize,
    /// Seed of everything random (ids, properties, churn choices, shuffles).
    pub seed: u64,
    /// Objects per page (at least 1; a group appearance counts as one).
    pub page_size: usize,
    /// `members@delta` entries per group appearance (at least 1).
    pub member_slice: usize,
    /// The tenant in the token URL (`/{tenant_id}/oauth2/v2.0/token`); also
    /// the users' mail domain when it contains a dot.
    pub tenant_id: String,
    /// The only client id the token endpoint accepts.
    pub client_id: String,
    /// The only client secret the token endpoint accepts.
    pub client_secret: String,
    /// `expires_in` of access tokens.
    pub token_lifetime: Duration,
    /// Added before every delta page (benchmarks: Graph's ~150 ms).
    pub page_latency: Duration,
    /// Share (0.0–1.0) of a page's slots spent re-sending objects already
    /// sent earlier in the round, as Graph's replays do.
    pub replay_rate: f64,
    /// Sometimes answer an empty page that still has a nextLink.
    pub empty_pages: bool,
    /// Base URL for links (e.g. `https://sim.example/v1.0`) instead of
    /// `http://{Host header}/v1.0`.
    pub public_base: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            users: 1000,
            groups: 50,
            applications: 20,
            devices: 20,
            service_principals: 20,
            members_per_group: 10,
            seed: 1,
            page_size: 200,
            member_slice: 20,
            tenant_id: "contoso.onmicrosoft.com".to_owned(),
            client_id: "graphdelta-simulator".to_owned(),
            client_secret: "simulator-secret".to_owned(),
            token_lifetime: Duration::from_secs(3599),
            page_latency: Duration::ZERO,
            replay_rate: 0.0,
            empty_pages: false,
            public_base: None,
        }
    }
}

/// Shared state behind a [`Simulator`].
#[derive(Debug)]
struct Inner {
    cfg: SimConfig,
    tenant: RwLock<Tenant>,
    engine: Engine,
    faults: Mutex<FaultQueue>,
    tokens: Mutex<TokenStore>,
    stats: Mutex<SimStats>,
    page_latency_us: AtomicU64,
    /// Sync epoch; a `gone` fault bumps it and older tokens answer 410.
    epoch: AtomicU64,
    /// Fault generation; `sync_state_expired` hits tokens of older generations.
    generation: AtomicU64,
}

/// A simulated tenant and its Graph endpoints. Cheap to clone (an `Arc`).
#[derive(Debug, Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

/// Upper bound of `page_size` and `member_slice`.
const MAX_PAGE: usize = 1_000_000;

/// Initial populations are capped so that creates always have room.
fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX).min(1 << 31)
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Simulator {
    /// A simulator for `cfg`. Starts instantly whatever the tenant size:
    /// the initial objects are generated on demand. Out-of-range settings are
    /// clamped (page size and slice to 1..=1,000,000, members per group to
    /// 1,000,000, replay rate to 0.0–1.0,
    /// populations to 2^31 per kind).
    pub fn new(mut cfg: SimConfig) -> Self {
        cfg.page_size = cfg.page_size.clamp(1, MAX_PAGE);
        cfg.member_slice = cfg.member_slice.clamp(1, MAX_PAGE);
        cfg.members_per_group = cfg.members_per_group.min(MAX_PAGE);
        cfg.replay_rate = if cfg.replay_rate.is_nan() {
            0.0
        } else {
            cfg.replay_rate.clamp(0.0, 1.0)
        };
        let ctx = GenCtx::new(
            cfg.seed,
            &cfg.tenant_id,
            cfg.members_per_group,
            clamp_u32(cfg.users),
            clamp_u32(cfg.applications),
        );
        let tenant = Tenant::new(
            ctx,
            Population {
                users: clamp_u32(cfg.users),
                groups: clamp_u32(cfg.groups),
                applications: clamp_u32(cfg.applications),
                devices: clamp_u32(cfg.devices),
                service_principals: clamp_u32(cfg.service_principals),
            },
        );
        let engine = Engine::new(EngineConfig {
            seed: cfg.seed,
            page_size: cfg.page_size,
            member_slice: cfg.member_slice,
            replay_rate: cfg.replay_rate,
            empty_pages: cfg.empty_pages,
        });
        let latency = duration_us(cfg.page_latency);
        Self {
            inner: Arc::new(Inner {
                cfg,
                tenant: RwLock::new(tenant),
                engine,
                faults: Mutex::new(FaultQueue::default()),
                tokens: Mutex::new(TokenStore::default()),
                stats: Mutex::new(SimStats::default()),
                page_latency_us: AtomicU64::new(latency),
                epoch: AtomicU64::new(0),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// The configuration (after clamping).
    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    /// The axum router serving every endpoint (mount it yourself, or use [`Simulator::spawn`]).
    pub fn router(&self) -> axum::Router {
        server::router(self.clone())
    }

    /// Binds `addr` (port 0 picks a free port) and serves in a tokio task.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = self.router();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "Graph simulator stopped serving.");
            }
        });
        tracing::debug!(%addr, "Graph simulator listening.");
        Ok(SimHandle {
            addr,
            sim: self,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Churns automatically: applies `spec` every `every` until the task is aborted.
    pub fn spawn_auto_churn(
        &self,
        every: Duration,
        spec: ChurnSpec,
    ) -> tokio::task::JoinHandle<()> {
        let sim = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let report = sim.churn(&spec);
                tracing::info!(
                    applied = report.applied.total(),
                    seq = report.seq_after,
                    "Simulated tenant churned."
                );
            }
        })
    }

    fn read_tenant(&self) -> RwLockReadGuard<'_, Tenant> {
        self.inner
            .tenant
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_tenant(&self) -> RwLockWriteGuard<'_, Tenant> {
        self.inner
            .tenant
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a batch of random mutations (deterministic for the seed and history).
    pub fn churn(&self, spec: &ChurnSpec) -> ChurnReport {
        self.write_tenant().churn(spec)
    }

    /// Queues a fault (or, for [`Fault::InvalidateTokens`], acts at once).
    /// An invalid fault (see [`Fault::validate`]) is logged and ignored; use
    /// [`Simulator::try_inject`] to get the error.
    pub fn inject(&self, fault: Fault) {
        if let Err(e) = self.try_inject(fault) {
            tracing::warn!(error = %e, "Ignoring invalid simulator fault.");
        }
    }

    /// Queues a fault, refusing invalid ones.
    pub fn try_inject(&self, fault: Fault) -> Result<(), SimError> {
        fault.validate()?;
        if fault == Fault::InvalidateTokens {
            if let Ok(mut t) = self.inner.tokens.lock() {
                t.clear();
            }
            self.count_fault(&fault);
            return Ok(());
        }
        // Tokens issued from now on belong to a newer generation.
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut q) = self.inner.faults.lock() {
            q.push(fault, generation);
        }
        Ok(())
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        if let Ok(mut q) = self.inner.faults.lock() {
            q.clear();
        }
    }

    /// The queued faults, with the counts that remain.
    pub fn queued_faults(&self) -> Vec<Fault> {
        self.inner
            .faults
            .lock()
            .map(|q| q.list())
            .unwrap_or_default()
    }

    /// The tenant's complete state. Costs time and memory in proportion to
    /// the tenant (a million users: seconds and about a gigabyte).
    pub fn truth(&self) -> GroundTruth {
        self.read_tenant().truth()
    }

    /// The whole change log (the last two million mutations at most).
    pub fn changes(&self) -> Vec<ChangeRecord> {
        self.changes_since(0)
    }

    /// The change log after sequence number `seq`.
    pub fn changes_since(&self, seq: u64) -> Vec<ChangeRecord> {
        self.read_tenant().changes(seq)
    }

    /// The sequence number of the last mutation (0: none).
    pub fn seq(&self) -> u64 {
        self.read_tenant().seq()
    }

    /// The id of the `index`-th object of `kind` in creation order, if created.
    pub fn object_id(&self, kind: ObjectKind, index: usize) -> Option<String> {
        let t = self.read_tenant();
        let idx = u32::try_from(index).ok()?;
        (idx < t.total(kind)).then(|| t.id(Key::new(kind, idx)).to_string())
    }

    /// Counters since start or the last [`Simulator::reset_stats`].
    pub fn stats(&self) -> SimStats {
        let mut s = self
            .inner
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        s.epoch = self.epoch();
        s
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        if let Ok(mut s) = self.inner.stats.lock() {
            *s = SimStats::default();
        }
    }

    /// Sets the latency added before every delta page.
    pub fn set_page_latency(&self, d: Duration) {
        self.inner
            .page_latency_us
            .store(duration_us(d), Ordering::Relaxed);
    }

    fn page_latency(&self) -> Duration {
        Duration::from_micros(self.inner.page_latency_us.load(Ordering::Relaxed))
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::SeqCst)
    }

    fn bump_epoch(&self) {
        self.inner.epoch.fetch_add(1, Ordering::SeqCst);
    }

    fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    fn record(&self, kind: RequestKind, status: u16, auth: stats::AuthHeader) {
        if let Ok(mut s) = self.inner.stats.lock() {
            s.record(kind, status, auth);
        }
    }

    fn count_fault(&self, fault: &Fault) {
        if let Ok(mut s) = self.inner.stats.lock() {
            *s.faults_applied.entry(fault.name().to_owned()).or_default() += 1;
        }
    }

    // ----- direct mutations ----------------------------------------------------

    /// Creates an object of `kind`; properties not in `props` (a JSON object,
    /// or null) are generated. Returns its id.
    pub fn create(&self, kind: ObjectKind, props: serde_json::Value) -> Result<String, SimError> {
        let changes = Tenant::parse_props(kind, &props, true)?;
        let mut t = self.write_tenant();
        let key = t.create(kind, changes)?;
        Ok(t.id(key).to_string())
    }

    /// Creates a user (see [`Simulator::create`]).
    pub fn create_user(&self, props: serde_json::Value) -> Result<String, SimError> {
        self.create(ObjectKind::User, props)
    }

    /// Creates a group without members (see [`Simulator::create`]).
    pub fn create_group(&self, props: serde_json::Value) -> Result<String, SimError> {
        self.create(ObjectKind::Group, props)
    }

    /// Sets properties of a live object (`null` sets null). Unchanged values
    /// are not logged; a call that changes nothing logs nothing.
    pub fn update(&self, id: &str, props: serde_json::Value) -> Result<(), SimError> {
        let mut t = self.write_tenant();
        let key = t.resolve_str(id)?;
        let changes = Tenant::parse_props(key.kind, &props, false)?;
        t.update(key, changes).map(|_| ())
    }

    /// Moves a live object to deleted items (and out of every group).
    pub fn soft_delete(&self, id: &str) -> Result<(), SimError> {
        let mut t = self.write_tenant();
        let key = t.resolve_str(id)?;
        t.soft_delete(key).map(|_| ())
    }

    /// Deletes a live or soft-deleted object permanently.
    pub fn hard_delete(&self, id: &str) -> Result<(), SimError> {
        let mut t = self.write_tenant();
        let key = t.resolve_str(id)?;
        t.hard_delete(key).map(|_| ())
    }

    /// Restores a soft-deleted object (its group memberships stay removed).
    pub fn restore(&self, id: &str) -> Result<(), SimError> {
        let mut t = self.write_tenant();
        let key = t.resolve_str(id)?;
        t.restore(key).map(|_| ())
    }

    /// Adds a live user, group, device or service principal to a live group.
    pub fn add_member(&self, group: &str, member: &str) -> Result<(), SimError> {
        let mut t = self.write_tenant();
        let g = t.resolve_str(group)?;
        let m = t.resolve_str(member)?;
        t.add_member(g, m).map(|_| ())
    }

    /// Removes a member from a live group.
    pub fn remove_member(&self, group: &str, member: &str) -> Result<(), SimError> {
        let mut t = self.write_tenant();
        let g = t.resolve_str(group)?;
        let m = t.resolve_str(member)?;
        t.remove_member(g, m).map(|_| ())
    }

    /// Applies one [`Mutation`] (what `POST /_sim/mutate` does).
    pub fn mutate(&self, m: Mutation) -> Result<MutationOutcome, SimError> {
        let id = match m {
            Mutation::Create { kind, properties } => self.create(kind, properties)?,
            Mutation::Update { id, properties } => {
                self.update(&id, properties)?;
                id
            }
            Mutation::SoftDelete { id } => {
                self.soft_delete(&id)?;
                id
            }
            Mutation::HardDelete { id } => {
                self.hard_delete(&id)?;
                id
            }
            Mutation::Restore { id } => {
                self.restore(&id)?;
                id
            }
            Mutation::AddMember { group, member } => {
                self.add_member(&group, &member)?;
                group
            }
            Mutation::RemoveMember { group, member } => {
                self.remove_member(&group, &member)?;
                group
            }
        };
        Ok(MutationOutcome {
            id,
            seq: self.seq(),
        })
    }
}

/// A running simulator. Dropping it stops the server too (without waiting).
#[derive(Debug)]
pub struct SimHandle {
    /// The bound address (the real port when 0 was asked for).
    pub addr: SocketAddr,
    sim: Simulator,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    fn origin(&self) -> String {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            }
            std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            }
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The Graph base URL to configure: `http://127.0.0.1:PORT/v1.0`
    /// (or [`SimConfig::public_base`] when set).
    pub fn base_url(&self) -> String {
        match &self.sim.inner.cfg.public_base {
            Some(base) => base.trim_end_matches('/').to_owned(),
            None => format!("{}/v1.0", self.origin()),
        }
    }

    /// The token URL to configure: `http://127.0.0.1:PORT/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.origin(),
            self.sim.inner.cfg.tenant_id
        )
    }

    /// The simulator being served (to churn, inject faults, read the truth).
    pub fn simulator(&self) -> &Simulator {
        &self.sim
    }

    /// Stops accepting, lets in-flight requests finish (at most 5 s), and returns.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

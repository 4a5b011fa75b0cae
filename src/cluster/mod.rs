//! Scaling out: several graphdelta instances share one connector's streams,
//! coordinated by a Kafka consumer group, as Kafka Connect's distributed
//! mode does (no coordinator of our own).
//!
//! ```text
//!   instance A ─┐   consumer group `[cluster] group`          ┌─ stream tasks (runtime::stream)
//!   instance B ─┼── subscribed to `<group>.assignments` ──────┤   one per owned partition
//!   instance C ─┘   partition i = i-th stream by name         └─ checkpoints: local SQLite + `<group>.state`
//! ```
//!
//! - **Assignment** ([`group`]): the assignments topic has one partition
//!   per configured stream (created, or grown, on start); its only records
//!   are the owners' claims that feed `/status` ([`owners`]).
//!   Every instance subscribes to it in the group; the group protocol gives
//!   each partition to exactly one live member, and the instance runs the
//!   streams of the partitions it holds. `cooperative-sticky` (default)
//!   moves only what must move when a member joins or leaves.
//! - **Handover** ([`state`]): a stream's checkpoint and memory are written
//!   to the compacted state topic before every local commit; the instance
//!   that gets a stream rebuilds its local store from that topic and goes on
//!   from the last committed checkpoint, telling created from updated as the
//!   previous owner would have.
//! - **Revocation drains**: a stream being moved stops fetching, lets its
//!   in-flight batches be acknowledged and committed (bounded by
//!   `runtime.drain_timeout`) and only then is the partition released.
//! - **Failover**: an instance that dies stops heartbeating; after
//!   `cluster.session_timeout` the group gives its partitions to the others.
//!   With `exactly_once`, the new owner's `init_transactions` (same
//!   `transactional.id` per stream) fences the old producer and aborts its
//!   open transaction, so `read_committed` consumers see no duplicate.
//!
//! Every instance must run the same list of streams (partition *i* means
//! the *i*-th stream by name): deploy a changed connector file to all
//! instances, not to some.

pub mod config;
pub mod group;
pub mod owners;
pub mod state;

use std::{collections::HashMap, sync::Arc, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::RDKafkaErrorCode,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::config::ClusterConfig;
use self::group::{GroupEvent, Member};
use crate::{
    config::{Config, ResolvedStream, RuntimeConfig},
    graph::GraphClient,
    retry::Policy,
    runtime::{
        self, RunError, RunOptions, StatusHandle, StatusRegistry, StreamRunner, status::unix_now,
    },
    sink::{Sink, SinkConfig, kafka::config::KafkaSinkConfig},
};

/// A stream this instance can run when the group gives it.
struct StreamSlot {
    resolved: ResolvedStream,
    graph: GraphClient,
    status: StatusHandle,
}

/// A stream this instance runs now.
struct Owned {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Everything a stream task needs, shared.
struct Shared {
    kafka: KafkaSinkConfig,
    sink: Arc<dyn Sink>,
    runtime: RuntimeConfig,
    checkpoint_dir: std::path::PathBuf,
    state_topic: String,
    state_partitions: i32,
    instance_id: String,
    claims: owners::Claims,
}

/// Runs this instance as a member of the cluster until shutdown.
pub async fn run(config: &Config, options: RunOptions) -> Result<(), RunError> {
    let cluster = config
        .cluster
        .clone()
        .ok_or_else(|| RunError::Cluster("no [cluster] table".to_string()))?;
    let SinkConfig::Kafka(kafka) = &config.sink else {
        return Err(RunError::Cluster(
            "[cluster] needs the Kafka sink: set [sink] type = \"kafka\"".to_string(),
        ));
    };
    if options.once {
        return Err(RunError::Cluster(
            "--once runs every stream in this process; in cluster mode streams belong to the group: run without --once, or without [cluster]".to_string(),
        ));
    }
    let instance_id = cluster.instance_id();
    let mut resolved = config.resolve()?;
    resolved.sort_by(|a, b| a.stream.name.cmp(&b.stream.name));
    let names: Vec<String> = resolved.iter().map(|r| r.stream.name.clone()).collect();

    let sink = runtime::build_sink(config).await?;
    let state_partitions = ensure_topics(kafka, &cluster, names.len()).await?;
    let clients = runtime::graph_clients(&resolved)?;
    let mut slots = HashMap::new();
    for r in resolved {
        let status = StatusHandle::new(&r.stream.name, &r.stream.resource, &r.graph.name);
        status.update(|s| s.state = "unowned".to_string());
        options.status.register(status.clone());
        slots.insert(
            r.stream.name.clone(),
            StreamSlot {
                graph: clients[&r.graph.name].clone(),
                resolved: r,
                status,
            },
        );
    }
    options.status.update_cluster(|c| {
        c.group = cluster.group.clone();
        c.instance_id = instance_id.clone();
    });
    let _stop_ops = runtime::start_ops(
        config,
        &options.status,
        runtime::sorted_clients(clients),
        sink.clone(),
    )
    .await?;

    let assignments_topic = cluster.assignments_topic();
    let claims = owners::Claims::new(kafka, &assignments_topic, &names, &instance_id)
        .map_err(RunError::Cluster)?;
    let stop_watching = owners::watch(kafka, &assignments_topic, &names, options.status.clone())
        .map_err(RunError::Cluster)?;
    let shared = Arc::new(Shared {
        kafka: (**kafka).clone(),
        sink: sink.clone(),
        runtime: config.runtime.clone(),
        checkpoint_dir: config.checkpoint.path.clone(),
        state_topic: cluster.state_topic(),
        state_partitions,
        instance_id: instance_id.clone(),
        claims,
    });
    // A revocation may wait for every owned stream to drain.
    let revoke_wait = config.runtime.drain_timeout + Duration::from_secs(10);
    let (member, mut events) = Member::join(kafka, &cluster, &instance_id, revoke_wait)
        .map_err(|e| RunError::Cluster(e.to_string()))?;
    tracing::info!(
        group = %cluster.group,
        instance = %instance_id,
        streams = names.len(),
        topic = %cluster.assignments_topic(),
        strategy = %cluster.assignment_strategy,
        "Joined the cluster; waiting for the group to assign streams."
    );

    let mut coordinator = Coordinator {
        shared,
        slots,
        names,
        owned: HashMap::new(),
        status: options.status.clone(),
        shutdown: options.shutdown.clone(),
    };
    // Claims are repeated now and then: a member the broker dropped from a
    // generation without telling it (it never saw a revocation) keeps its
    // streams, and its claim must win over the release another member wrote
    // meanwhile.
    let mut reclaim = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(e) => {
                    coordinator.handle(e).await;
                    coordinator.announce_owned().await;
                }
                None => break,
            },
            _ = reclaim.tick() => coordinator.announce_owned().await,
            _ = options.shutdown.cancelled() => break,
        }
    }
    tracing::info!(
        owned = coordinator.owned.len(),
        "Stopping: draining owned streams before leaving the group."
    );
    let all: Vec<String> = coordinator.owned.keys().cloned().collect();
    coordinator.release(&all, false).await;
    // Revocations during the close find nothing to stop.
    drop(events);
    member.stop().await;
    stop_watching.store(true, std::sync::atomic::Ordering::Relaxed);
    sink.close().await;
    Ok(())
}

struct Coordinator {
    shared: Arc<Shared>,
    slots: HashMap<String, StreamSlot>,
    /// Stream names in partition order.
    names: Vec<String>,
    owned: HashMap<String, Owned>,
    status: StatusRegistry,
    shutdown: CancellationToken,
}

impl Coordinator {
    /// The streams of `partitions`; with `warn`, partitions beyond the
    /// stream list are reported.
    fn streams_of(&self, partitions: &[i32], warn: bool) -> Vec<String> {
        partitions
            .iter()
            .filter_map(|&p| {
                let name = self.names.get(usize::try_from(p).ok()?);
                if name.is_none() && warn {
                    tracing::warn!(partition = p, streams = self.names.len(), "The assignments topic has more partitions than this instance has streams; is another instance running a different connector file with the same group?");
                }
                name.cloned()
            })
            .collect()
    }

    async fn handle(&mut self, event: GroupEvent) {
        match event {
            GroupEvent::Assigned(partitions) => {
                let streams = self.streams_of(&partitions, true);
                for name in &streams {
                    self.acquire(name);
                }
                self.rebalanced();
            }
            GroupEvent::Revoked {
                partitions,
                lost,
                done,
            } => {
                let streams = self.streams_of(&partitions, false);
                if lost {
                    tracing::warn!(
                        ?streams,
                        "The group considered this instance gone (session timeout); its streams may have another owner already. Stopping them without committing."
                    );
                    self.abort(&streams);
                }
                self.release(&streams, lost).await;
                self.rebalanced();
                let _ = done.send(());
            }
            GroupEvent::Error(e) => {
                tracing::warn!(error = %e, "Rebalance error; the group retries.");
            }
        }
    }

    /// Claims every stream this instance runs (see [`owners`]).
    async fn announce_owned(&self) {
        for name in self.owned.keys() {
            self.shared.claims.announce(name, true).await;
        }
    }

    fn rebalanced(&self) {
        let mut owned: Vec<String> = self.owned.keys().cloned().collect();
        owned.sort();
        self.status.update_cluster(|c| {
            c.owned = owned;
            c.rebalances += 1;
            c.last_rebalance_at = Some(unix_now());
        });
    }

    /// Starts running `name` (already running: nothing to do).
    fn acquire(&mut self, name: &str) {
        if self.owned.contains_key(name) {
            return;
        }
        let Some(slot) = self.slots.get(name) else {
            return;
        };
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(own_stream(
            self.shared.clone(),
            slot.resolved.clone(),
            slot.graph.clone(),
            slot.status.clone(),
            stop.clone(),
        ));
        tracing::info!(stream = name, "Stream assigned to this instance.");
        self.owned.insert(name.to_string(), Owned { stop, task });
    }

    /// Lost streams (another member may run them already): stopped at once,
    /// nothing more committed; what was acknowledged but not committed is
    /// read again by the new owner.
    fn abort(&mut self, names: &[String]) {
        for name in names {
            if let Some(owned) = self.owned.get(name) {
                owned.stop.cancel();
                owned.task.abort();
            }
        }
    }

    /// Stops the streams, waits for their in-flight batches to be
    /// committed (bounded by the drain timeout), and lets the sink forget
    /// them.
    /// Unless `lost`, the release is announced (a lost stream's next owner
    /// announces itself).
    async fn release(&mut self, names: &[String], lost: bool) {
        let mut stopping = Vec::new();
        for name in names {
            if let Some(owned) = self.owned.remove(name) {
                owned.stop.cancel();
                stopping.push((name.clone(), owned.task));
            }
        }
        let wait = self.shared.runtime.drain_timeout + Duration::from_secs(5);
        for (name, mut task) in stopping {
            if tokio::time::timeout(wait, &mut task).await.is_err() {
                tracing::warn!(stream = %name, "The stream did not stop within the drain timeout; aborting it (its uncommitted pages are read again by the next owner).");
                task.abort();
            }
            self.shared.sink.release(&name).await;
            if !lost {
                self.shared.claims.announce(&name, false).await;
            }
            if let Some(slot) = self.slots.get(&name) {
                slot.status.update(|s| {
                    s.owner = None;
                    s.state = "unowned".to_string();
                });
            }
            tracing::info!(stream = %name, "Stream released.");
        }
    }
}

/// Runs one owned stream until `stop`: takes its state over from the state
/// topic, then polls. A failure (including one writing the state topic) is
/// retried with backoff, starting again from the state topic.
async fn own_stream(
    shared: Arc<Shared>,
    resolved: ResolvedStream,
    graph: GraphClient,
    status: StatusHandle,
    stop: CancellationToken,
) {
    let name = resolved.stream.name.clone();
    let policy = Policy::new(shared.runtime.retry_min, shared.runtime.retry_max, None);
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        status.update(|s| {
            s.owner = Some(shared.instance_id.clone());
            s.state = "taking_over".to_string();
            s.takeovers += 1;
        });
        let result = match take_over(&shared, &name).await {
            // Revoked while the state was being read: the partition is
            // released only once this task ends; touch nothing (with
            // exactly-once, initializing the producer would fence the next
            // owner).
            Ok(_) if stop.is_cancelled() => return,
            Ok(store) => {
                shared.claims.announce(&name, true).await;
                let runner = StreamRunner::new(
                    resolved.clone(),
                    graph.clone(),
                    shared.sink.clone(),
                    store,
                    shared.runtime.clone(),
                    status.clone(),
                    stop.clone(),
                );
                runner
                    .run(false)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) if stop.is_cancelled() => {
                tracing::debug!(stream = %name, error = %e, "Stream ended while being released.");
                return;
            }
            Err(e) => {
                let wait = policy.delay(failures);
                failures = failures.saturating_add(1);
                tracing::error!(stream = %name, error = %e, retry_in = ?wait, "Owned stream failed; taking it up again from the state topic.");
                status.update(|s| {
                    s.state = "failed".to_string();
                    s.last_error = Some(e);
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Rebuilds the stream's local store from the state topic and attaches the
/// mirror that keeps the topic ahead of it.
async fn take_over(shared: &Arc<Shared>, name: &str) -> Result<crate::checkpoint::Store, String> {
    let shared = shared.clone();
    let name = name.to_string();
    tokio::task::spawn_blocking(move || -> Result<crate::checkpoint::Store, String> {
        let started = std::time::Instant::now();
        let timeout = shared.kafka.startup_timeout.max(Duration::from_secs(30)) * 4;
        let seed = state::load(
            &shared.kafka,
            &shared.state_topic,
            shared.state_partitions,
            &name,
            timeout,
        )?;
        let mut store =
            state::seed(&shared.checkpoint_dir, &name, &seed).map_err(|e| e.to_string())?;
        store.set_mirror(Box::new(state::StateMirror::new(
            &shared.kafka,
            &shared.state_topic,
            shared.state_partitions,
            &name,
        )?));
        tracing::info!(
            stream = %name,
            batch = seed.checkpoint.as_ref().map(|c| c.batch_seq),
            objects = seed.writes.objects.len(),
            memberships = seed.writes.members.len(),
            records_read = seed.records_read,
            took = ?started.elapsed(),
            "Took the stream over from the state topic."
        );
        Ok(store)
    })
    .await
    .map_err(|e| format!("take-over task: {e}"))?
}

/// Creates the assignments topic (one partition per stream, growing an
/// existing one that has fewer) and the compacted state topic; returns the
/// state topic's partition count.
async fn ensure_topics(
    kafka: &KafkaSinkConfig,
    cluster: &ClusterConfig,
    streams: usize,
) -> Result<i32, RunError> {
    let fail = |m: String| RunError::Cluster(m);
    let admin: AdminClient<DefaultClientContext> = kafka
        .base_client_config()
        .map_err(|e| fail(e.to_string()))?
        .create()
        .map_err(|e| fail(format!("cannot create the admin client: {e}")))?;
    let admin = Arc::new(admin);
    let timeout = kafka.startup_timeout;
    let assignments = cluster.assignments_topic();
    let state_topic = cluster.state_topic();
    let wanted = i32::try_from(streams).unwrap_or(i32::MAX);
    let replication = kafka.replication_factor.map_or(-1, i32::from);
    let counts = |admin: Arc<AdminClient<DefaultClientContext>>| async move {
        tokio::task::spawn_blocking(move || -> Result<HashMap<String, i32>, String> {
            let md = admin
                .inner()
                .fetch_metadata(None, timeout)
                .map_err(|e| format!("metadata: {e}"))?;
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| (t.name().to_string(), t.partitions().len() as i32))
                .collect())
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let existing = counts(admin.clone()).await.map_err(fail)?;
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let mut new = Vec::new();
    if !existing.contains_key(&assignments) {
        new.push(NewTopic::new(
            &assignments,
            wanted,
            TopicReplication::Fixed(replication),
        ));
    }
    let state_partitions = cluster.state_partitions.unwrap_or(wanted);
    if !existing.contains_key(&state_topic) {
        new.push(
            NewTopic::new(
                &state_topic,
                state_partitions,
                TopicReplication::Fixed(replication),
            )
            .set("cleanup.policy", "compact"),
        );
    }
    if !new.is_empty() {
        if !kafka.create_topics {
            return Err(fail(format!(
                "topics `{assignments}` ({wanted} partitions) and `{state_topic}` (compacted) must exist and sink.create_topics = false: create them, or allow the connector to"
            )));
        }
        let results = admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| fail(format!("cannot create the cluster topics: {e}")))?;
        for r in results {
            match r {
                Ok(t) => tracing::info!(topic = %t, "Created a cluster topic."),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(fail(format!(
                        "cannot create topic `{t}`: {code}; create it yourself (`{assignments}`: {wanted} partitions; `{state_topic}`: cleanup.policy=compact) or grant CREATE"
                    )));
                }
            }
        }
    }
    // Wait until the metadata shows both (a fresh topic takes a moment).
    let deadline = tokio::time::Instant::now() + timeout;
    let mut grown = false;
    loop {
        let now = counts(admin.clone()).await.map_err(fail)?;
        match (now.get(&assignments), now.get(&state_topic)) {
            (Some(&a), Some(&s)) => {
                if a < wanted && !grown {
                    grown = true;
                    tracing::info!(topic = %assignments, from = a, to = wanted, "Growing the assignments topic to one partition per stream.");
                    let grow = NewPartitions::new(&assignments, wanted as usize);
                    let result = admin.create_partitions([&grow], &opts).await;
                    let ok = matches!(&result, Ok(r) if r.iter().all(|x| x.is_ok()));
                    if !ok {
                        return Err(fail(format!(
                            "topic `{assignments}` has {a} partitions for {wanted} streams and could not be grown ({result:?}); add partitions (kafka-topics --alter --partitions {wanted}) or use a new cluster.assignments_topic"
                        )));
                    }
                    continue;
                }
                if a < wanted {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(fail(format!(
                            "topic `{assignments}` still shows {a} partitions for {wanted} streams after growing it"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                return Ok(s);
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(fail(format!(
                    "topics `{assignments}` and `{state_topic}` do not appear in the cluster metadata within {}",
                    humantime::format_duration(timeout)
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

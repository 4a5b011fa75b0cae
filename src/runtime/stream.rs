//! One stream's life: rounds of delta pages, pipelined.
//!
//! ```text
//!  fetcher task ──(bounded channel: prefetch_pages)──▶ normalize ──▶ publish (≤ max_in_flight_batches and _bytes)
//!                                                                        │ acks, in order
//!                                                                        ▼
//!                                                          commit checkpoint + memory (SQLite)
//! ```
//!
//! Each stage has a thread of its own: the fetcher a task, normalization a
//! blocking thread, publishing the stream's task, and commits a blocking
//! thread of their own (one at a time, in order) while publishing goes on.
//!
//! # The commit rule
//! A batch's checkpoint (the link after its page, the memory changes of its
//! objects) is committed only after the sink acknowledged every event of
//! that batch **and of every batch before it**: publishes complete in a
//! `FuturesOrdered`, so commits happen strictly in sequence order, and a
//! failed batch stops the line. When a publish fails with a retriable
//! error, the batch and every later in-flight batch are published again, in
//! order, before anything else is committed: per-object order on the broker
//! is preserved (at the price of duplicates with the same event ids).
//!
//! A crash at any instant therefore resumes from a link whose every earlier
//! event is acknowledged, with the memory that matches it.
//!
//! # Sinks that store checkpoints
//! A transactional sink (Kafka exactly-once) commits each batch's
//! checkpoint and memory changes itself, before the embedded store does; on
//! start the store is rolled forward from the sink's last checkpoint. That
//! record holds only its own batch's memory changes, so the sink may never
//! be more than one batch ahead of the store: for such sinks one batch is
//! in flight at a time and each is committed to the store as soon as it is
//! acknowledged (no `checkpoint_interval` coalescing). Their transactions
//! are sequential anyway.

use std::{sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesOrdered};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    metrics as m,
    status::{StatusHandle, unix_now},
};
use crate::{
    checkpoint::{CheckpointError, OutboxRow, OutboxWriter, Store},
    config::{ResolvedStream, RuntimeConfig, StartFrom},
    graph::{GraphClient, GraphError, Page, client::FetchOptions},
    normalize::filter::WrittenFilter,
    normalize::{
        self, EventCounts, EventsOut, NormalizeError, RoundContext, StreamContext,
        memory::{MemberKey, Overlay, StateWrites},
    },
    proto::v1::{ChangeEvent, ChangeType, EventsEncoding, Phase, StreamCheckpoint},
    retry::{Policy, RetryHint},
    sink::{OutBatch, Sink, SinkError},
};

/// Why a stream stopped with an error. The message names the stream and,
/// for Graph, the host (never a token or a full link).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream `{stream}`: {source}")]
    Graph { stream: String, source: GraphError },
    #[error("stream `{stream}`: sink: {source}")]
    Sink { stream: String, source: SinkError },
    #[error("stream `{stream}`: {source}")]
    Checkpoint {
        stream: String,
        source: CheckpointError,
    },
    #[error("stream `{stream}`: page from {host}: {source}")]
    Normalize {
        stream: String,
        host: String,
        source: NormalizeError,
    },
}

impl StreamError {
    /// Whether the service loop should try the stream again after a pause.
    pub fn is_retriable(&self) -> bool {
        match self {
            StreamError::Graph { source, .. } => source.is_retriable(),
            StreamError::Sink { source, .. } => source.is_retriable(),
            StreamError::Checkpoint { .. } | StreamError::Normalize { .. } => false,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            StreamError::Graph { source, .. } => source.kind(),
            StreamError::Sink { .. } => "sink",
            StreamError::Checkpoint { .. } => "checkpoint",
            StreamError::Normalize { .. } => "bad_page",
        }
    }
}

/// How [`StreamRunner::run`] ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: every page up to the deltaLink is published and committed.
    CaughtUp,
    /// Shutdown was requested; everything acknowledged is committed.
    Stopped,
}

/// One page's worth of output, waiting for its ack.
struct Batch {
    seq: u64,
    /// How many events, of which changes: kept when `events` is not.
    counts: EventCounts,
    /// The events, for sinks that read them ([`Sink::reads_events`]); for
    /// the others, empty once they are encoded in `outbox`.
    events: Vec<ChangeEvent>,
    writes: StateWrites,
    checkpoint: StreamCheckpoint,
    objects: u64,
    /// Size of the page it came from plus its encoded events: the measure
    /// of the in-flight bound (`runtime.max_in_flight_bytes`).
    bytes: usize,
    /// The batch of the round's last page (its deltaLink).
    ends_round: bool,
    /// The batch as the outbox records it, its events in the sink's
    /// encoding (handed to the sink too). `None` for batches that change
    /// nothing (nothing to record).
    outbox: Option<OutboxRow>,
}

/// What the normalizer stage hands to the publishing loop, in page order.
enum Ready {
    Batch(Box<Batch>),
    /// The fetcher's error that ended the round (after every good page).
    Fetch(GraphError),
    /// A page that could not be normalized, or a store failure.
    Error(StreamError),
}

/// Normalization on a blocking thread: pages in, batches out, memory
/// changes recorded in the shared overlay until they are committed.
struct NormalizeStage {
    ctx: StreamContext,
    /// A read-only connection to the stream's store.
    store: Store,
    overlay: Arc<std::sync::Mutex<Overlay>>,
    /// The checkpoint after the last normalized page.
    next: StreamCheckpoint,
    snapshot: bool,
    stream: String,
    host: String,
    /// The sink's encoding of events (see `OutboxRow`).
    encoding: EventsEncoding,
    /// Whether the sink reads the events, not only their encoding.
    keep_events: bool,
    /// What this round wrote, if the memory was empty when it began: the
    /// first sync's lookups of ids never seen skip the store.
    written: WrittenFilter,
}

impl NormalizeStage {
    fn run(mut self, mut pages: mpsc::Receiver<Fetched>, ready: mpsc::Sender<Ready>) {
        while let Some(fetched) = pages.blocking_recv() {
            let item = match fetched {
                Fetched::Page(page) => match self.normalize(page) {
                    Ok(batch) => Ready::Batch(Box::new(batch)),
                    Err(e) => Ready::Error(e),
                },
                Fetched::Failed(e) => Ready::Fetch(e),
            };
            let last = !matches!(&item, Ready::Batch(b) if !b.ends_round);
            if ready.blocking_send(item).is_err() || last {
                return;
            }
        }
    }

    /// Normalizes a page into the next batch and records its memory changes
    /// in the overlay.
    fn normalize(&mut self, page: Page) -> Result<Batch, StreamError> {
        let next = &mut self.next;
        let mut round = RoundContext::now(next.round, self.snapshot);
        round.resnapshot = next.resnapshot;
        let object_count = page.objects.len() as u64;
        let bytes = page.body_bytes;
        let mut overlay = self.overlay.lock().unwrap_or_else(|p| p.into_inner());
        // A sink that writes only the JSON lines gets them written as the
        // events are made, never assembled.
        let form = if !self.keep_events && self.encoding == EventsEncoding::JsonLines {
            EventsOut::JsonLines
        } else {
            EventsOut::Events
        };
        let normalized = {
            let mut view = overlay.view(&self.store, &self.written);
            normalize::normalize_page_as(&self.ctx, &round, page.objects, &mut view, form)
        }
        .map_err(|source| match source {
            NormalizeError::Memory(source) => StreamError::Checkpoint {
                stream: self.stream.clone(),
                source,
            },
            source => StreamError::Normalize {
                stream: self.stream.clone(),
                host: self.host.clone(),
                source,
            },
        })?;
        next.batch_seq += 1;
        next.link = page.link.url().to_string();
        let ends_round = page.link.is_delta();
        if ends_round {
            next.phase = if self.snapshot {
                Phase::Reconcile
            } else {
                Phase::Incremental
            } as i32;
            next.link_is_delta = true;
        }
        next.committed_at = Some(normalize::timestamp(std::time::SystemTime::now()));
        // Recorded before the overlay holds them: from then on they may be
        // committed at any time.
        for id in normalized.writes.objects.keys() {
            self.written.add_object(id);
        }
        for key in normalized.writes.members.keys() {
            self.written.add_member(key);
        }
        overlay.apply(next.batch_seq, &normalized.writes);
        drop(overlay);
        // Encoded here, off the task that publishes and commits; recorded
        // there, just before the sink sees the batch. A batch without events
        // still needs its record when it changes the memory: a full round's
        // pages mostly re-list known objects, and their "seen" marks (which
        // the reconciliation after the round relies on) would otherwise be
        // lost if a later batch's record outlived a crash and was committed
        // over them. Only a batch that changes nothing (an empty page) moves
        // just the checkpoint, which any later batch's checkpoint covers.
        let counts = normalized.counts;
        let outbox = (counts.total > 0 || !normalized.writes.is_empty()).then(|| match form {
            EventsOut::JsonLines => OutboxRow::encoded(
                next,
                &normalized.writes,
                normalized.json_lines,
                self.encoding,
            ),
            EventsOut::Events => {
                OutboxRow::encode(next, &normalized.writes, &normalized.events, self.encoding)
            }
        });
        // A sink that writes the encoding alone (file, stdout) never needs
        // the events again: they go here, on the thread that built them,
        // not after the sink's acknowledgement on the task that publishes
        // (≈ 3k instructions an object there, and memory held meanwhile).
        let mut events = normalized.events;
        if !self.keep_events && outbox.is_some() {
            events = Vec::new();
        }
        Ok(Batch {
            seq: next.batch_seq,
            counts,
            events,
            writes: normalized.writes,
            checkpoint: next.clone(),
            objects: object_count,
            // The outbox record (encoded events included) lives as long as
            // the batch is in flight: it counts against the bound too.
            bytes: bytes + outbox.as_ref().map_or(0, OutboxRow::size),
            ends_round,
            outbox,
        })
    }
}

/// Acknowledged batches waiting to be committed together.
#[derive(Default)]
struct Staged {
    checkpoint: Option<StreamCheckpoint>,
    writes: StateWrites,
    last_seq: u64,
    batches: u32,
    /// When the oldest staged batch was acknowledged.
    since: Option<Instant>,
}

/// Staged batches are committed at the latest after this many, or when
/// they touch this many objects (memory stays bounded however fast pages
/// arrive). Staged objects are held twice (staged writes and the overlay):
/// 20,000 measured 93 MiB peak RSS on a 100k-user sync, 5,000 measured
/// 62 MiB at the same speed (a commit of 5,000 rows is still cheap). Since
/// commits run in the background, a running commit's objects are held
/// too while the next ones are staged: with 5,000, a 1M-user sync peaked
/// at 57.6 and 63.6 MiB in two runs; with 2,500 at 54.0 MiB (single runs,
/// too noisy to tell the speeds apart).
const MAX_STAGED_BATCHES: u32 = 256;
const MAX_STAGED_OBJECTS: usize = 2_500;
/// A batch at least this large is taken for part of a sync (Graph's pages
/// hold 100-999 objects then), so more like it are expected.
const SYNC_BATCH_OBJECTS: usize = 64;

impl Staged {
    fn is_full(&self) -> bool {
        self.batches >= MAX_STAGED_BATCHES || self.writes.objects.len() >= MAX_STAGED_OBJECTS
    }

    /// Empties it: the last checkpoint, the merged memory changes and the
    /// last batch's sequence number, if anything is staged.
    fn take(&mut self) -> Option<(StreamCheckpoint, StateWrites, u64)> {
        let checkpoint = self.checkpoint.take()?;
        let taken = std::mem::take(self);
        Some((checkpoint, taken.writes, taken.last_seq))
    }
}

/// After a commit, never before: the normalizer finds what it no longer
/// sees in the overlay in the store.
fn release(overlay: &std::sync::Mutex<Overlay>, last_seq: u64) {
    overlay
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .release(last_seq);
    tracing::debug!(batch = last_seq, "Checkpoint committed.");
}

/// A commit of staged batches running on a blocking thread.
struct Committing {
    checkpoint: StreamCheckpoint,
    last_seq: u64,
    done: tokio::task::JoinHandle<Result<(), CheckpointError>>,
}

/// Resolves when the running commit is done (never if none is).
async fn commit_done(
    committing: &mut Option<Committing>,
) -> Result<Result<(), CheckpointError>, tokio::task::JoinError> {
    match committing {
        Some(c) => (&mut c.done).await,
        None => std::future::pending().await,
    }
}

type Publishing = BoxFuture<'static, (Arc<Batch>, Result<(), SinkError>, Duration)>;

enum PagesEnd {
    DeltaReached,
    Resync {
        reason: String,
        location: Option<String>,
    },
    Stopped,
}

enum Fetched {
    Page(Page),
    Failed(GraphError),
}

/// Runs one stream.
pub struct StreamRunner {
    resolved: ResolvedStream,
    ctx: StreamContext,
    graph: GraphClient,
    sink: Arc<dyn Sink>,
    /// Shared with the thread of a background commit ([`Committing`]);
    /// otherwise the stream's own task is its only user.
    store: Arc<std::sync::Mutex<Store>>,
    /// Records batches in the outbox without the store's lock (a commit may
    /// hold it); opened on first use.
    outbox: Option<OutboxWriter>,
    runtime: RuntimeConfig,
    status: StatusHandle,
    shutdown: CancellationToken,
    /// The last committed checkpoint.
    committed: StreamCheckpoint,
    host: String,
    commit_priority: crate::background::Yielding,
    /// When the objects remembered were last counted ([`count_due`]).
    counted_at: Option<Instant>,
}

/// Background commits run at a lower priority, so that they yield the
/// cores to fetching and parsing, unless one kept the stream waiting: then
/// this many run at the stream's own ([`crate::background::Yielding`]).
/// 100k users beside two busy loops: 3.23-3.37 s with every commit at the
/// lower priority, 2.45-2.74 s with 1 at its own after a wait, 2.10-2.12 s
/// with 4, 1.88-1.94 s with 16 (two to five runs each); 1M users: 49.0 →
/// 21.7 s. Alone, six alternating runs each, no difference (medians 1.10 s).
const COMMITS_AT_OWN_PRIORITY: u32 = 16;

/// The objects remembered (`graphdelta_objects_remembered`) are counted
/// after the first round, after every full round, and after an incremental
/// one at most this often. Counting reads every row of the store: ≈ 70 ms
/// at 1M objects (Python, the store in the page cache), and 11% of the CPU
/// of an incremental round at 100k (`perf`), every poll however few the
/// changes.
const COUNT_OBJECTS_EVERY: Duration = Duration::from_secs(300);

/// Whether a round that just completed counts the objects remembered
/// ([`COUNT_OBJECTS_EVERY`]).
fn count_due(last: Option<Instant>, now: Instant, full_round: bool) -> bool {
    full_round || last.is_none_or(|t| now.duration_since(t) >= COUNT_OBJECTS_EVERY)
}

impl StreamRunner {
    pub fn new(
        resolved: ResolvedStream,
        graph: GraphClient,
        sink: Arc<dyn Sink>,
        store: Store,
        runtime: RuntimeConfig,
        status: StatusHandle,
        shutdown: CancellationToken,
    ) -> Self {
        let ctx = StreamContext::from_resolved(&resolved);
        let host = crate::graph::host_of(resolved.graph.base_url.as_str());
        Self {
            resolved,
            ctx,
            graph,
            sink,
            store: Arc::new(std::sync::Mutex::new(store)),
            outbox: None,
            runtime,
            status,
            shutdown,
            committed: StreamCheckpoint::default(),
            host,
            commit_priority: crate::background::Yielding::new(COMMITS_AT_OWN_PRIORITY),
            counted_at: None,
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> &str {
        &self.resolved.stream.name
    }

    fn graph_err(&self, source: GraphError) -> StreamError {
        StreamError::Graph {
            stream: self.name().to_string(),
            source,
        }
    }

    fn sink_err(&self, source: SinkError) -> StreamError {
        StreamError::Sink {
            stream: self.name().to_string(),
            source,
        }
    }

    fn store_err(&self, source: CheckpointError) -> StreamError {
        StreamError::Checkpoint {
            stream: self.name().to_string(),
            source,
        }
    }

    /// Polls until shutdown (or, with `once`, until caught up). Retriable
    /// failures are retried with backoff in service mode; with `once` the
    /// first failure is returned.
    // ERROR level: the span (and its stream name) must survive any log filter.
    #[tracing::instrument(name = "stream", level = "error", skip_all, fields(stream = %self.resolved.stream.name))]
    pub async fn run(mut self, once: bool) -> Result<Outcome, StreamError> {
        let policy = Policy::new(self.runtime.retry_min, self.runtime.retry_max, None);
        let mut failures = 0u32;
        loop {
            let round_started = Instant::now();
            self.status.update(|s| s.state = "running".to_string());
            let result = self.round().await;
            match result {
                Ok(PagesEnd::Stopped) => {
                    self.status.update(|s| s.state = "stopped".to_string());
                    return Ok(Outcome::Stopped);
                }
                Ok(_) => {
                    failures = 0;
                    self.status.update(|s| {
                        s.state = "caught_up".to_string();
                        s.last_error = None;
                    });
                    if once {
                        return Ok(Outcome::CaughtUp);
                    }
                    // The next round starts one interval after this one
                    // started; an overrun round is followed at once, never
                    // overlapped.
                    let next = round_started + self.resolved.stream.poll_interval;
                    tokio::select! {
                        _ = tokio::time::sleep_until(next) => {}
                        _ = self.shutdown.cancelled() => {
                            self.status.update(|s| s.state = "stopped".to_string());
                            return Ok(Outcome::Stopped);
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!(m::STREAM_ERRORS, "stream" => self.name().to_string(), "kind" => e.kind())
                        .increment(1);
                    let message = e.to_string();
                    self.status.update(|s| {
                        s.last_error = Some(message.clone());
                        s.state = "failed".to_string();
                    });
                    if once || !e.is_retriable() {
                        tracing::error!(error = %e, "Stream stopped.");
                        return Err(e);
                    }
                    let wait = policy.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::error!(error = %e, retry_in = ?wait, "Round failed; retrying from the last checkpoint.");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Ok(Outcome::Stopped),
                    }
                }
            }
        }
    }

    /// Reads pages until the deltaLink (and reconciles after a full round).
    async fn round(&mut self) -> Result<PagesEnd, StreamError> {
        self.committed = self.load_or_start().await?;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(PagesEnd::Stopped);
            }
            let phase = self.committed.phase();
            self.status.set_phase(phase);
            if phase == Phase::Reconcile {
                if !self.reconcile().await? {
                    return Ok(PagesEnd::Stopped);
                }
                self.round_completed(true);
                return Ok(PagesEnd::DeltaReached);
            }
            let start = if self.committed.link.is_empty() {
                let latest = phase == Phase::Incremental;
                self.graph.initial_url(&self.resolved.stream, latest)
            } else {
                self.committed.link.clone()
            };
            self.status.update(|s| {
                s.round_objects = 0;
                s.round_pages = 0;
            });
            match self.pages(start).await? {
                PagesEnd::DeltaReached => {
                    if self.committed.phase() == Phase::Reconcile {
                        continue;
                    }
                    self.round_completed(false);
                    return Ok(PagesEnd::DeltaReached);
                }
                PagesEnd::Resync { reason, location } => {
                    self.start_resync(&reason, location)?;
                }
                PagesEnd::Stopped => return Ok(PagesEnd::Stopped),
            }
        }
    }

    /// A round reached its deltaLink (`full`: and was reconciled).
    fn round_completed(&mut self, full: bool) {
        metrics::counter!(m::ROUNDS, "stream" => self.name().to_string()).increment(1);
        self.status.update(|s| {
            s.rounds_completed += 1;
            s.last_round_completed_at = Some(unix_now());
        });
        let now = Instant::now();
        if count_due(self.counted_at, now, full) {
            self.counted_at = Some(now);
            if let Ok(n) = self.store().object_count() {
                metrics::gauge!(m::OBJECTS_REMEMBERED, "stream" => self.name().to_string())
                    .set(n as f64);
            }
        }
        tracing::info!(phase = ?self.committed.phase(), "Delta round complete.");
    }

    /// The committed checkpoint, or the start of a first (or, if the
    /// stream's query changed, a new) full round.
    async fn load_or_start(&mut self) -> Result<StreamCheckpoint, StreamError> {
        let fingerprint = self.resolved.fingerprint();
        let mut stored = self
            .store()
            .load_checkpoint()
            .map_err(|e| self.store_err(e))?;
        // A transactional sink may have committed a batch the embedded store
        // did not (a crash between the two commits): roll the store forward.
        if self.sink.stores_checkpoints() {
            let sink_cp = self
                .sink
                .stored_checkpoint(self.name())
                .await
                .map_err(|e| self.sink_err(e))?;
            if let Some(sc) = sink_cp {
                let local_seq = stored.as_ref().map_or(0, |c| c.batch_seq);
                if sc.checkpoint.batch_seq > local_seq {
                    tracing::info!(
                        sink_batch = sc.checkpoint.batch_seq,
                        local_batch = local_seq,
                        "The sink committed a batch the checkpoint store did not; rolling the store forward."
                    );
                    self.commit_checkpoint(&sc.checkpoint, &sc.writes)?;
                    stored = Some(sc.checkpoint);
                }
            }
        }
        // Batches handed to the sink before a crash go out again first,
        // exactly as they were (see `checkpoint`'s "The outbox").
        if let Some(cp) = self.drain_outbox().await? {
            stored = Some(cp);
        }
        let latest = self.resolved.stream.start == StartFrom::Latest;
        let now = Some(normalize::timestamp(std::time::SystemTime::now()));
        Ok(match stored {
            Some(cp) if cp.config_fingerprint == fingerprint => cp,
            Some(cp) => {
                // Graph encodes $select/$filter into its links: stored links
                // describe another query. Read the directory again (objects
                // already known are not re-announced as created).
                tracing::warn!(
                    "The stream's resource, select, filter, tenant or base_url changed since the last checkpoint; its links are void. Starting a new full round."
                );
                StreamCheckpoint {
                    stream: self.name().to_string(),
                    phase: if latest {
                        Phase::Incremental
                    } else {
                        Phase::Resync
                    } as i32,
                    link: String::new(),
                    round: cp.round + 1,
                    batch_seq: cp.batch_seq,
                    config_fingerprint: fingerprint,
                    committed_at: cp.committed_at,
                    link_is_delta: false,
                    round_started_at: now,
                    resume_link: String::new(),
                    resnapshot: false,
                }
            }
            None => StreamCheckpoint {
                stream: self.name().to_string(),
                phase: if latest {
                    Phase::Incremental
                } else {
                    Phase::Initial
                } as i32,
                link: String::new(),
                round: 1,
                batch_seq: 0,
                config_fingerprint: fingerprint,
                committed_at: None,
                link_is_delta: false,
                round_started_at: now,
                resume_link: String::new(),
                resnapshot: false,
            },
        })
    }

    /// Records a batch in the outbox before it is handed to the sink.
    fn record_in_outbox(&mut self, batch: &mut Batch) -> Result<(), StreamError> {
        let Some(row) = &mut batch.outbox else {
            return Ok(());
        };
        let writer = match &self.outbox {
            Some(writer) => writer,
            None => {
                let writer = self
                    .store()
                    .outbox_writer()
                    .map_err(|e| self.store_err(e))?;
                self.outbox.insert(writer)
            }
        };
        let written = tokio::task::block_in_place(|| writer.put(row));
        written.map_err(|e| self.store_err(e))
    }

    /// Publishes and commits, in order and unchanged, the batches the
    /// outbox still holds: handed to the sink by a previous run that did
    /// not live to commit them. Returns the last checkpoint committed, if
    /// any; `None` also when shutdown interrupted it (the rest stays in the
    /// outbox).
    async fn drain_outbox(&mut self) -> Result<Option<StreamCheckpoint>, StreamError> {
        let pending =
            tokio::task::block_in_place(|| self.store().outbox()).map_err(|e| self.store_err(e))?;
        if pending.is_empty() {
            return Ok(None);
        }
        tracing::warn!(
            batches = pending.len(),
            first = pending[0].checkpoint.batch_seq,
            "Publishing again the batches a previous run handed to the sink without committing them (same events, same ids)."
        );
        let overlay = std::sync::Mutex::new(Overlay::default());
        let mut last = None;
        for mut p in pending {
            let row = OutboxRow::recorded(&mut p);
            let batch = Batch {
                seq: p.checkpoint.batch_seq,
                counts: EventCounts::of(&p.events),
                events: p.events,
                writes: p.writes,
                checkpoint: p.checkpoint,
                objects: 0,
                bytes: 0,
                ends_round: false,
                outbox: Some(row),
            };
            if !self.publish_until_acked(&batch).await? {
                return Ok(None);
            }
            let checkpoint = batch.checkpoint.clone();
            self.commit_batch(batch, &overlay)?;
            last = Some(checkpoint);
        }
        Ok(last)
    }

    /// Graph reset the sync state: commit the start of a full round.
    fn start_resync(&mut self, reason: &str, location: Option<String>) -> Result<(), StreamError> {
        metrics::counter!(m::RESYNCS, "stream" => self.name().to_string()).increment(1);
        self.status.update(|s| s.resyncs += 1);
        // 410 Gone comes with a fresh initial-request URL; use it only if it
        // stays on the Graph host, else build our own.
        let link = location
            .and_then(|l| match self.graph.check_link(&l) {
                Ok(u) => Some(u.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "Ignoring the Location of the 410 response.");
                    None
                }
            })
            .unwrap_or_default();
        tracing::warn!(
            reason,
            "Graph reset the sync state; starting a full resync round. Objects not returned by it will be reported as deleted (inferred)."
        );
        let cp = StreamCheckpoint {
            phase: Phase::Resync as i32,
            link,
            round: self.committed.round + 1,
            // The sync state is gone: a deltaLink kept by a resnapshot is
            // void too; the new round's deltaLink is where polling resumes.
            resume_link: String::new(),
            round_started_at: Some(normalize::timestamp(std::time::SystemTime::now())),
            committed_at: Some(normalize::timestamp(std::time::SystemTime::now())),
            ..self.committed.clone()
        };
        self.commit_checkpoint(&cp, &StateWrites::default())?;
        Ok(())
    }

    fn commit_checkpoint(
        &mut self,
        cp: &StreamCheckpoint,
        writes: &StateWrites,
    ) -> Result<(), StreamError> {
        let result = tokio::task::block_in_place(|| self.store().commit(cp, writes));
        result.map_err(|e| self.store_err(e))?;
        self.committed_to(cp.clone());
        Ok(())
    }

    fn committed_to(&mut self, cp: StreamCheckpoint) {
        self.committed = cp;
        self.status.update(|s| s.last_commit_at = Some(unix_now()));
    }

    /// Fetches, normalizes, publishes and commits pages from `start` until
    /// the deltaLink, a resync, an error or shutdown.
    async fn pages(&mut self, start: String) -> Result<PagesEnd, StreamError> {
        let phase = self.committed.phase();
        let snapshot = matches!(phase, Phase::Initial | Phase::Resync);
        let options = FetchOptions {
            return_minimal: phase == Phase::Incremental && self.resolved.stream.return_minimal,
        };
        let (tx, rx) = mpsc::channel::<Fetched>(self.runtime.prefetch_pages);
        let stop_fetching = self.shutdown.child_token();
        let fetcher = tokio::spawn(fetch_loop(
            self.graph.clone(),
            start,
            options,
            tx,
            stop_fetching.clone(),
        ));
        // Whatever happens below, the fetcher stops with this function.
        let _stop_guard = stop_fetching.clone().drop_guard();
        let _abort_guard = AbortOnDrop(fetcher);

        // Normalization runs on its own thread, reading the memory through
        // a second (read-only) connection: it overlaps with publishing and
        // committing on this task, and with fetching on the fetcher's.
        let overlay = Arc::new(std::sync::Mutex::new(Overlay::default()));
        let reader = self.store().reader().map_err(|e| self.store_err(e))?;
        // Read before this round writes anything (the previous round's
        // batches are all committed by now).
        let (no_objects, no_members) = reader.is_empty().map_err(|e| self.store_err(e))?;
        let stage = NormalizeStage {
            written: WrittenFilter::new(no_objects, no_members),
            ctx: self.ctx.clone(),
            store: reader,
            overlay: overlay.clone(),
            next: self.committed.clone(),
            snapshot,
            stream: self.name().to_string(),
            host: self.host.clone(),
            encoding: self.sink.encoding(),
            keep_events: self.sink.reads_events(),
        };
        let (ready_tx, mut ready_rx) = mpsc::channel::<Ready>(2);
        let normalizer = tokio::task::spawn_blocking(move || stage.run(rx, ready_tx));
        let mut staged = Staged::default();
        let mut committing = None;
        let outcome = self
            .pages_loop(
                &mut ready_rx,
                &stop_fetching,
                &overlay,
                &mut staged,
                &mut committing,
            )
            .await;
        // Whatever ended the loop, what was acknowledged gets committed: a
        // commit still running first, then the rest (never the rest if that
        // one failed: its memory changes are not in the rest).
        let flushed = match committing {
            Some(c) => self.finish_commit(c, &mut staged, &overlay).await,
            None => Ok(()),
        }
        .and_then(|()| self.flush(&mut staged, &overlay));
        // The normalizer ends once its channel is closed.
        drop(ready_rx);
        let _ = normalizer.await;
        let end = outcome?;
        flushed?;
        Ok(end)
    }

    async fn pages_loop(
        &mut self,
        rx: &mut mpsc::Receiver<Ready>,
        stop_fetching: &CancellationToken,
        overlay: &std::sync::Mutex<Overlay>,
        staged: &mut Staged,
        committing: &mut Option<Committing>,
    ) -> Result<PagesEnd, StreamError> {
        let mut in_flight: FuturesOrdered<Publishing> = FuturesOrdered::new();
        let mut in_flight_bytes = 0usize;
        let mut fetch_done = false;
        let mut stopping = false;
        let mut drain_deadline = None;
        let mut end = PagesEnd::DeltaReached;
        let mut failure: Option<StreamError> = None;
        // See "Sinks that store checkpoints" above: their commits are also
        // made in place, never in the background.
        let (max_in_flight, interval, background) = if self.sink.stores_checkpoints() {
            (1, Duration::ZERO, false)
        } else {
            (
                self.runtime.max_in_flight_batches,
                self.runtime.checkpoint_interval,
                true,
            )
        };

        loop {
            if fetch_done && in_flight.is_empty() {
                break;
            }
            // Bounded by count and by bytes; one batch may always go, however
            // large its page.
            // And while a commit runs, by what is staged for the next one.
            let can_take = !fetch_done
                && in_flight.len() < max_in_flight
                && (in_flight.is_empty() || in_flight_bytes < self.runtime.max_in_flight_bytes)
                && !(committing.is_some() && staged.is_full());
            let commit_due = staged.since.map(|t| t + interval);
            tokio::select! {
                biased;
                Some((batch, result, took)) = in_flight.next(), if !in_flight.is_empty() => {
                    in_flight_bytes -= batch.bytes;
                    match result {
                        Ok(()) => {
                            crate::failpoint::hit("acked");
                            metrics::histogram!(m::PUBLISH_SECONDS, "sink" => self.sink.kind()).record(took.as_secs_f64());
                            self.stage(staged, batch);
                            if staged.is_full() || interval.is_zero() {
                                self.commit_staged(staged, committing, overlay, background)?;
                            }
                        }
                        Err(e) if e.is_retriable() && !stopping => {
                            metrics::counter!(m::SINK_ERRORS, "sink" => self.sink.kind(), "outcome" => "retriable").increment(1);
                            tracing::warn!(error = %e, batch = batch.seq, "Publish failed; publishing this and every later batch again, in order.");
                            let mut pending = vec![batch];
                            while let Some((b, _, _)) = in_flight.next().await {
                                in_flight_bytes -= b.bytes;
                                pending.push(b);
                            }
                            if let Some(c) = committing.take() {
                                self.finish_commit(c, staged, overlay).await?;
                            }
                            for b in pending {
                                if !self.publish_until_acked(&b).await? {
                                    return Ok(PagesEnd::Stopped);
                                }
                                self.stage(staged, b);
                            }
                            self.flush(staged, overlay)?;
                        }
                        Err(e) => {
                            let outcome = match &e { SinkError::Fenced(_) => "fenced", SinkError::Retriable(_) => "retriable", SinkError::Permanent(_) => "permanent" };
                            metrics::counter!(m::SINK_ERRORS, "sink" => self.sink.kind(), "outcome" => outcome).increment(1);
                            if stopping {
                                return Ok(PagesEnd::Stopped);
                            }
                            return Err(self.sink_err(e));
                        }
                    }
                }
                done = commit_done(committing), if committing.is_some() => {
                    let c = committing.take().expect("a commit is running");
                    if staged.is_full() {
                        // The stream could take no batch while it ran.
                        self.commit_priority.fell_behind();
                        metrics::counter!(m::COMMIT_WAITS, "stream" => self.name().to_string()).increment(1);
                    }
                    self.committed_in_background(c, done, staged, overlay)?;
                    if staged.is_full() || interval.is_zero() {
                        self.commit_staged(staged, committing, overlay, background)?;
                    }
                }
                _ = sleep_until_opt(commit_due), if committing.is_none() => {
                    self.commit_staged(staged, committing, overlay, background)?;
                }
                ready = rx.recv(), if can_take => {
                    match ready {
                        Some(Ready::Batch(batch)) => {
                            if batch.ends_round {
                                fetch_done = true;
                            }
                            let mut batch = batch;
                            self.record_in_outbox(&mut batch)?;
                            in_flight_bytes += batch.bytes;
                            in_flight.push_back(self.publish_future(*batch));
                        }
                        Some(Ready::Fetch(GraphError::Resync { reason, location, .. })) => {
                            fetch_done = true;
                            end = PagesEnd::Resync { reason, location };
                        }
                        Some(Ready::Fetch(e)) => {
                            // Pages before the failure are good: let them
                            // be acknowledged and committed first.
                            fetch_done = true;
                            failure = Some(self.graph_err(e));
                        }
                        Some(Ready::Error(e)) => {
                            fetch_done = true;
                            failure = Some(e);
                        }
                        None => fetch_done = true,
                    }
                }
                _ = self.shutdown.cancelled(), if !stopping => {
                    tracing::info!(in_flight = in_flight.len(), "Shutdown requested: no new requests; waiting for in-flight batches to be acknowledged.");
                    stopping = true;
                    fetch_done = true;
                    stop_fetching.cancel();
                    end = PagesEnd::Stopped;
                    drain_deadline = Some(Instant::now() + self.runtime.drain_timeout);
                }
                _ = sleep_until_opt(drain_deadline) => {
                    tracing::warn!(in_flight = in_flight.len(), "Drain timeout: exiting with batches unacknowledged; their pages will be read again on restart.");
                    return Ok(PagesEnd::Stopped);
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(end)
    }

    fn publish_future(&self, batch: Batch) -> Publishing {
        let sink = self.sink.clone();
        let stream = self.name().to_string();
        let batch = Arc::new(batch);
        async move {
            let started = std::time::Instant::now();
            let result = if batch.counts.total == 0 && !sink_needs_empty_batches(&*sink) {
                Ok(())
            } else {
                sink.publish(OutBatch {
                    stream: &stream,
                    seq: batch.seq,
                    event_count: batch.counts.total,
                    events: &batch.events,
                    checkpoint: &batch.checkpoint,
                    writes: &batch.writes,
                    encoded: encoded_for(&*sink, &batch),
                })
                .await
            };
            (batch, result, started.elapsed())
        }
        .boxed()
    }

    /// Publishes one batch until it is acknowledged; `Ok(false)` on shutdown.
    async fn publish_until_acked(&self, batch: &Batch) -> Result<bool, StreamError> {
        let policy = Policy::new(self.runtime.retry_min, self.runtime.retry_max, None);
        let mut attempt = 0u32;
        loop {
            let result = sink_publish(&*self.sink, self.name(), batch).await;
            match result {
                Ok(()) => {
                    crate::failpoint::hit("acked");
                    return Ok(true);
                }
                Err(e) if e.is_retriable() => {
                    metrics::counter!(m::SINK_ERRORS, "sink" => self.sink.kind(), "outcome" => "retriable").increment(1);
                    let wait = policy.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, batch = batch.seq, retry_in = ?wait, "Publish failed; nothing committed; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => return Ok(false),
                    }
                }
                Err(e) => return Err(self.sink_err(e)),
            }
        }
    }

    /// Records an acknowledged batch for the next commit.
    fn stage(&self, staged: &mut Staged, batch: Arc<Batch>) {
        let stream = self.name().to_string();
        metrics::counter!(m::PAGES, "stream" => stream.clone()).increment(1);
        for (i, n) in batch.counts.by_change.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            let change = ChangeType::try_from(i as i32).unwrap_or(ChangeType::Unspecified);
            metrics::counter!(m::EVENTS_PUBLISHED, "stream" => stream.clone(), "change" => change.short_name())
                .increment(*n);
            self.status.count_event(change, *n);
        }
        self.status.update(|s| {
            s.pages += 1;
            s.round_pages += 1;
            s.round_objects += batch.objects;
            s.phase = super::status::phase_name(batch.checkpoint.phase()).to_string();
        });
        tracing::trace!(
            batch = batch.seq,
            events = batch.counts.total,
            "Batch acknowledged."
        );
        let batch = Arc::try_unwrap(batch).unwrap_or_else(|shared| Batch {
            seq: shared.seq,
            counts: shared.counts,
            events: Vec::new(),
            writes: shared.writes.clone(),
            checkpoint: shared.checkpoint.clone(),
            objects: shared.objects,
            bytes: shared.bytes,
            ends_round: shared.ends_round,
            outbox: None,
        });
        // During a sync (full pages) the merged writes grow to about
        // `MAX_STAGED_OBJECTS` before they are committed: sized for that at
        // once, the maps are not rebuilt four times on the way (≈ 8% of a
        // 100k-user sync's page faults, `perf record -e page-faults`: each
        // rebuild is fresh memory). A trickle of changes is not sized up.
        let mut writes = batch.writes;
        if staged.batches == 0 && writes.objects.len() >= SYNC_BATCH_OBJECTS {
            writes.reserve(MAX_STAGED_OBJECTS.saturating_sub(writes.objects.len()));
        }
        staged.writes.merge(writes);
        staged.checkpoint = Some(batch.checkpoint);
        staged.last_seq = batch.seq;
        staged.batches += 1;
        staged.since.get_or_insert_with(Instant::now);
    }

    /// Commits every staged batch: the last checkpoint and the merged memory
    /// changes in one transaction; then drops them from the overlay.
    fn flush(
        &mut self,
        staged: &mut Staged,
        overlay: &std::sync::Mutex<Overlay>,
    ) -> Result<(), StreamError> {
        let Some((checkpoint, writes, last_seq)) = staged.take() else {
            return Ok(());
        };
        self.commit_checkpoint(&checkpoint, &writes)?;
        release(overlay, last_seq);
        Ok(())
    }

    /// Commits what is staged: in place, or (`background`) on a blocking
    /// thread while the loop goes on publishing, unless a commit is running
    /// already (then the next starts once it is done: commits stay in
    /// order). A commit took ≈ 30-50 ms per 5,000 objects, in which the
    /// loop used to take no batch and acknowledge nothing.
    fn commit_staged(
        &mut self,
        staged: &mut Staged,
        committing: &mut Option<Committing>,
        overlay: &std::sync::Mutex<Overlay>,
        background: bool,
    ) -> Result<(), StreamError> {
        if !background {
            return self.flush(staged, overlay);
        }
        if committing.is_some() {
            return Ok(());
        }
        let Some((checkpoint, writes, last_seq)) = staged.take() else {
            return Ok(());
        };
        let store = self.store.clone();
        let cp = checkpoint.clone();
        // At a lower priority (`crate::background`) unless a commit kept the
        // stream waiting lately (`COMMITS_AT_OWN_PRIORITY`). Lower: a 100k-user sync,
        // six runs each, alternating: 0.60-0.64 s against 0.64-0.73 s; 1M
        // users: no clear change (7.6-7.9 s against 7.6-7.7 s).
        let priority = self.commit_priority.next_run();
        // The writes are dropped there too, off the loop.
        let done = tokio::task::spawn_blocking(move || {
            crate::background::on_own_thread("graphdelta-commit", priority, move || {
                store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .commit(&cp, &writes)
            })
        });
        *committing = Some(Committing {
            checkpoint,
            last_seq,
            done,
        });
        Ok(())
    }

    /// Waits for a background commit and completes it.
    async fn finish_commit(
        &mut self,
        mut c: Committing,
        staged: &mut Staged,
        overlay: &std::sync::Mutex<Overlay>,
    ) -> Result<(), StreamError> {
        let done = (&mut c.done).await;
        self.committed_in_background(c, done, staged, overlay)
    }

    /// Completes a background commit as [`Self::flush`] completes its own.
    /// If it failed, what was staged since is dropped too: its memory
    /// changes follow the failed commit's, so it can never be committed
    /// without them (the outbox and Graph still have it all).
    fn committed_in_background(
        &mut self,
        c: Committing,
        done: Result<Result<(), CheckpointError>, tokio::task::JoinError>,
        staged: &mut Staged,
        overlay: &std::sync::Mutex<Overlay>,
    ) -> Result<(), StreamError> {
        let result = done.unwrap_or_else(|e| match e.try_into_panic() {
            // A panic in the commit is the loop's own, as it was when the
            // loop committed in place.
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(CheckpointError {
                path: self.store().path().to_path_buf(),
                message: format!("the commit did not run: {e}"),
            }),
        });
        if let Err(e) = result {
            *staged = Staged::default();
            return Err(self.store_err(e));
        }
        self.committed_to(c.checkpoint);
        release(overlay, c.last_seq);
        Ok(())
    }

    /// Stages and commits one batch at once.
    fn commit_batch(
        &mut self,
        batch: Batch,
        overlay: &std::sync::Mutex<Overlay>,
    ) -> Result<(), StreamError> {
        let mut staged = Staged::default();
        self.stage(&mut staged, Arc::new(batch));
        self.flush(&mut staged, overlay)
    }

    /// After a full round: memberships and objects the round did not return
    /// were removed during the gap. Reported as inferred events, chunk by
    /// chunk, each committed after its ack; then incremental polling
    /// resumes from the round's deltaLink. `Ok(false)` on shutdown.
    async fn reconcile(&mut self) -> Result<bool, StreamError> {
        const CHUNK: usize = 500;
        let round = self.committed.round;
        let ctx = self.ctx.clone();
        let relationships = ctx.reconciled_relationships();
        let mut inferred = 0u64;
        // Memberships of groups listed in this round but not listed again.
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(false);
            }
            let stale = tokio::task::block_in_place(|| {
                self.store().stale_members(round, relationships, "", CHUNK)
            })
            .map_err(|e| self.store_err(e))?;
            if stale.is_empty() {
                break;
            }
            let round_ctx = RoundContext::now(round, true);
            let mut writes = StateWrites::default();
            let mut events = Vec::new();
            let mut by_group: Vec<(
                String,
                Vec<(MemberKey, crate::normalize::memory::MemberRow)>,
            )> = Vec::new();
            for (key, row) in stale {
                match by_group.last_mut() {
                    Some((g, rows)) if *g == key.group => rows.push((key, row)),
                    _ => by_group.push((key.group.clone(), vec![(key, row)])),
                }
            }
            for (group, rows) in by_group {
                let Some(mut state) = self.store().object(&group).map_err(|e| self.store_err(e))?
                else {
                    continue;
                };
                for (key, _) in &rows {
                    writes.members.insert(key.clone(), None);
                }
                let event =
                    normalize::inferred_member_removals(&ctx, &round_ctx, &group, &mut state, rows);
                writes.objects.insert(group, Some(state));
                events.push(event);
            }
            inferred += events.len() as u64;
            if !self.publish_reconcile_batch(events, writes).await? {
                return Ok(false);
            }
        }
        // Objects the round did not return.
        let mut cursor = 0;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(false);
            }
            let stale =
                tokio::task::block_in_place(|| self.store().stale_objects(round, cursor, CHUNK))
                    .map_err(|e| self.store_err(e))?;
            let Some((last, _, _)) = stale.last() else {
                break;
            };
            cursor = *last;
            let mut round_ctx = RoundContext::now(round, true);
            round_ctx.resnapshot = self.committed.resnapshot;
            let mut writes = StateWrites::default();
            let mut events = Vec::with_capacity(stale.len());
            for (_, id, state) in stale {
                events.push(normalize::inferred_deletion(&ctx, &round_ctx, &id, &state));
                writes.forget_group(&id);
                writes
                    .objects
                    .insert(id, Some(normalize::tombstone(&state)));
            }
            inferred += events.len() as u64;
            if !self.publish_reconcile_batch(events, writes).await? {
                return Ok(false);
            }
        }
        if inferred > 0 {
            tracing::warn!(
                inferred,
                "Reported changes Graph could not tell us about (objects or memberships gone during the resync gap)."
            );
        }
        // After a resnapshot, polling resumes from the deltaLink kept when it
        // started: changes made while the full round ran are read then.
        let link = if self.committed.resume_link.is_empty() {
            self.committed.link.clone()
        } else {
            self.committed.resume_link.clone()
        };
        let cp = StreamCheckpoint {
            phase: Phase::Incremental as i32,
            link,
            resume_link: String::new(),
            resnapshot: false,
            batch_seq: self.committed.batch_seq + 1,
            committed_at: Some(normalize::timestamp(std::time::SystemTime::now())),
            ..self.committed.clone()
        };
        // Through the sink as an empty batch, so a transactional sink's
        // stored checkpoint moves to the incremental phase too.
        let batch = Batch {
            seq: cp.batch_seq,
            counts: EventCounts::default(),
            events: Vec::new(),
            writes: StateWrites::default(),
            checkpoint: cp,
            objects: 0,
            bytes: 0,
            ends_round: false,
            outbox: None,
        };
        if sink_needs_empty_batches(&*self.sink) && !self.publish_until_acked(&batch).await? {
            return Ok(false);
        }
        self.commit_checkpoint(&batch.checkpoint, &batch.writes)?;
        Ok(true)
    }

    async fn publish_reconcile_batch(
        &mut self,
        events: Vec<ChangeEvent>,
        writes: StateWrites,
    ) -> Result<bool, StreamError> {
        let cp = StreamCheckpoint {
            batch_seq: self.committed.batch_seq + 1,
            committed_at: Some(normalize::timestamp(std::time::SystemTime::now())),
            ..self.committed.clone()
        };
        // Recorded like any batch: after a crash the very events (their
        // `observed_at` included) are published again, not inferred anew.
        let outbox = OutboxRow::encode(&cp, &writes, &events, self.sink.encoding());
        let mut batch = Batch {
            seq: cp.batch_seq,
            counts: EventCounts::of(&events),
            events,
            writes,
            checkpoint: cp,
            objects: 0,
            bytes: 0,
            ends_round: false,
            outbox: Some(outbox),
        };
        self.record_in_outbox(&mut batch)?;
        if !self.publish_until_acked(&batch).await? {
            return Ok(false);
        }
        crate::failpoint::hit("reconcile_acked");
        let overlay = std::sync::Mutex::new(Overlay::default());
        self.commit_batch(batch, &overlay)?;
        Ok(true)
    }
}

/// Sinks that store checkpoints themselves must see every checkpoint move,
/// even one without events.
fn sink_needs_empty_batches(sink: &dyn Sink) -> bool {
    sink.stores_checkpoints()
}

async fn sink_publish(sink: &dyn Sink, stream: &str, batch: &Batch) -> Result<(), SinkError> {
    if batch.counts.total == 0 && !sink_needs_empty_batches(sink) {
        return Ok(());
    }
    sink.publish(OutBatch {
        stream,
        seq: batch.seq,
        event_count: batch.counts.total,
        events: &batch.events,
        checkpoint: &batch.checkpoint,
        writes: &batch.writes,
        encoded: encoded_for(sink, batch),
    })
    .await
}

/// The batch's events as recorded in the outbox, if the sink writes them
/// in that encoding.
fn encoded_for<'a>(sink: &dyn Sink, batch: &'a Batch) -> Option<&'a bytes::Bytes> {
    batch
        .outbox
        .as_ref()
        .filter(|row| row.encoding == sink.encoding())
        .map(OutboxRow::events)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows links from `start`, sending each page (or the error that ended
/// the round) down the channel. The channel's bound is the prefetch depth:
/// the next page is requested while the current one is being published.
async fn fetch_loop(
    graph: GraphClient,
    start: String,
    options: FetchOptions,
    tx: mpsc::Sender<Fetched>,
    stop: CancellationToken,
) {
    let mut link = start;
    loop {
        let result = tokio::select! {
            r = graph.fetch(&link, options) => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(page) => {
                crate::failpoint::hit("fetched");
                let next = match &page.link {
                    crate::graph::page::PageLink::Next(n) => Some(n.clone()),
                    crate::graph::page::PageLink::Delta(_) => None,
                };
                if tx.send(Fetched::Page(page)).await.is_err() {
                    return;
                }
                match next {
                    Some(n) => link = n,
                    None => return,
                }
            }
            Err(e) => {
                let _ = tx.send(Fetched::Failed(e)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_counted_after_full_rounds_and_now_and_then() {
        let t = Instant::now();
        assert!(count_due(None, t, false), "the first round");
        assert!(!count_due(Some(t), t + Duration::from_secs(299), false));
        assert!(count_due(Some(t), t + COUNT_OBJECTS_EVERY, false));
        assert!(count_due(Some(t), t, true), "a full round");
    }

    #[test]
    fn event_counts_count_every_change_type() {
        let event = |change: ChangeType| ChangeEvent {
            change_type: change as i32,
            ..ChangeEvent::default()
        };
        let events = [
            event(ChangeType::Created),
            event(ChangeType::Created),
            event(ChangeType::HardDeleted),
            event(ChangeType::Restored),
        ];
        let counts = EventCounts::of(&events);
        assert_eq!(counts.total, 4);
        assert_eq!(counts.by_change[ChangeType::Created as usize], 2);
        assert_eq!(counts.by_change[ChangeType::HardDeleted as usize], 1);
        assert_eq!(counts.by_change[ChangeType::Restored as usize], 1);
        assert_eq!(counts.by_change.iter().sum::<u64>(), 4);
        assert_eq!(EventCounts::of(&[]).total, 0);
    }
}

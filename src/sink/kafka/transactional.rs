//! Exactly-once delivery: each batch's events and its checkpoint in one
//! Kafka transaction, as Kafka Connect does for exactly-once sources
//! (KIP-618).
//!
//! Every stream has its own transactional producer, `transactional.id =
//! <sink.transactional_id_prefix><stream>`, used by one batch at a time
//! (a mutex per stream). Per batch:
//!
//! ```text
//! begin_transaction
//!   send every event (and tombstone) to the event topics
//!   send CheckpointRecord { checkpoint, state } to sink.checkpoint_topic, key = stream
//! commit_transaction            ─▶ Ok: the runtime commits the embedded store
//! (any failure: abort_transaction; nothing of the batch becomes visible)
//! ```
//!
//! # Why a crash cannot duplicate or lose an event
//! A `read_committed` consumer sees a batch's events exactly when the
//! checkpoint that moves past them is committed. On start, the producer's
//! `init_transactions` fences any previous instance and completes or aborts
//! the transaction it left open; only then is the stream's checkpoint read
//! back (read_committed, up to the offset the topic had at that moment).
//! If it is ahead of the embedded store (the process died between the two
//! commits), the runtime rolls the store forward from its memory changes
//! and resumes after it, so the batch is not sent again; if not, the next
//! batch starts where the last committed transaction ended.
//!
//! # Order and gaps
//! The runtime may have several batches of a stream in flight; they reach
//! the stream's mutex in order. Once a batch was tried, only it may commit
//! next: if batch *n* failed, batch *n+1* is refused (retriable) and the
//! runtime publishes both again, in order. A batch at or below the stored
//! checkpoint is acknowledged without sending: its transaction already
//! committed (a commit whose outcome was unknown: the producer is replaced,
//! which settles the transaction, and the checkpoint read back tells).
//!
//! # Fencing
//! A second process with the same transactional id fences this one: the
//! next operation fails with `_FENCED`, the batch returns
//! [`SinkError::Fenced`], the runtime stops the stream without committing,
//! and this process never re-initializes the producer (that would fence the
//! newer instance back).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use prost::Message as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    producer::Producer,
};
use tracing::Instrument as _;

use super::{
    admin::Admin,
    config::KafkaSinkConfig,
    context::SinkContext,
    encoder::{Record, checkpoint_record},
    producer::{Class, Failure, SinkProducer, classify, create_producer, produce_all},
};
use crate::{
    normalize::memory::StateWrites,
    proto::v1::CheckpointRecord,
    sink::{OutBatch, SinkError, StoredCheckpoint},
};

/// The exactly-once side of the sink.
pub struct ExactlyOnce {
    inner: Arc<Inner>,
}

/// One batch, owned, for the task that publishes it.
struct Job {
    stream: String,
    seq: u64,
    /// The events' records and, last, the checkpoint record.
    records: Vec<Record>,
    /// What the stream's stored checkpoint becomes once committed.
    stored: StoredCheckpoint,
}

struct Inner {
    config: Arc<KafkaSinkConfig>,
    admin: Arc<Admin>,
    checkpoint_topic: Arc<str>,
    streams: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<TxnStream>>>>,
}

/// One stream's producer and what this process knows it committed.
struct TxnStream {
    name: String,
    transactional_id: String,
    /// Initialized (`init_transactions` done); `None` before first use and
    /// after a fatal error.
    producer: Option<SinkProducer>,
    /// The newest committed checkpoint: `None` until read back after the
    /// producer was initialized; `Some(None)`: the topic has none.
    committed: Option<Option<StoredCheckpoint>>,
    /// The batch that must be committed next, once known: set by the first
    /// batch this process tried (committed or not) and kept across producer
    /// replacements, so that after a failure no later batch can be
    /// committed before it.
    next_seq: Option<u64>,
    /// Set once fenced: every later call fails the same way.
    fenced: Option<String>,
}

impl TxnStream {
    fn committed_seq(&self) -> u64 {
        self.committed
            .as_ref()
            .and_then(|c| c.as_ref())
            .map_or(0, |c| c.checkpoint.batch_seq)
    }

    fn context(&self, seq: Option<u64>) -> String {
        match seq {
            Some(seq) => format!(
                "kafka: stream `{}`, batch {seq} (transactional.id `{}`)",
                self.name, self.transactional_id
            ),
            None => format!(
                "kafka: stream `{}` (transactional.id `{}`)",
                self.name, self.transactional_id
            ),
        }
    }

    fn fenced_error(&mut self, detail: &str) -> SinkError {
        let message = format!(
            "{}: fenced by another producer with the same transactional id ({detail}); another graphdelta instance took over this stream, so this one stops without committing. Run one instance per connector, or give each its own sink.transactional_id_prefix",
            self.context(None)
        );
        self.producer = None;
        self.fenced = Some(message.clone());
        SinkError::Fenced(message)
    }

    /// Drops the producer; the next batch initializes a new one (which
    /// completes or aborts this one's open transaction) and reads the
    /// committed checkpoint back. `next_seq` stays: the batch it names
    /// must still come first.
    fn replace_producer(&mut self) {
        self.producer = None;
        self.committed = None;
    }

    /// Turns a failure into the runtime's error, dropping the producer when
    /// it is unusable.
    fn fail(&mut self, failure: Failure, seq: Option<u64>) -> SinkError {
        match failure.class {
            Class::Fenced => self.fenced_error(&failure.message),
            Class::Fatal => {
                // A new producer (init_transactions) settles whatever this
                // one left open; what was committed is read back then.
                self.replace_producer();
                failure.into_sink_error(&self.context(seq))
            }
            _ => failure.into_sink_error(&self.context(seq)),
        }
    }
}

impl ExactlyOnce {
    pub fn new(config: Arc<KafkaSinkConfig>, admin: Arc<Admin>) -> Self {
        let checkpoint_topic = Arc::from(config.checkpoint_topic.as_str());
        Self {
            inner: Arc::new(Inner {
                config,
                admin,
                checkpoint_topic,
                streams: Default::default(),
            }),
        }
    }

    /// Startup check: the checkpoint topic exists and is compacted.
    pub async fn check(&self) -> Result<(), SinkError> {
        self.inner.admin.ensure_checkpoint_topic().await
    }

    /// The stream's last committed checkpoint (fencing any previous
    /// instance first).
    pub async fn stored_checkpoint(
        &self,
        stream: &str,
    ) -> Result<Option<StoredCheckpoint>, SinkError> {
        let lock = self.inner.stream(stream);
        let mut st = lock.lock().await;
        let _producer = self.inner.ready(&mut st).await?;
        Ok(st.committed.clone().flatten())
    }

    /// Publishes one batch in one transaction.
    ///
    /// The work runs in its own task: a caller that stops waiting (the
    /// runtime dropping an in-flight publish) must not leave a transaction
    /// half done with the stream's state not knowing how it ended.
    pub async fn publish(
        &self,
        batch: &OutBatch<'_>,
        mut records: Vec<Record>,
    ) -> Result<(), SinkError> {
        records.push(checkpoint_record(&self.inner.checkpoint_topic, batch));
        let job = Job {
            stream: batch.stream.to_string(),
            seq: batch.seq,
            records,
            stored: StoredCheckpoint {
                checkpoint: batch.checkpoint.clone(),
                writes: batch.writes.clone(),
            },
        };
        let inner = self.inner.clone();
        let task = async move { inner.publish(job).await };
        tokio::spawn(task.instrument(tracing::Span::current()))
            .await
            .unwrap_or_else(|e| {
                Err(SinkError::Retriable(format!(
                    "kafka: stream `{}`, batch {}: the publishing task failed: {e}",
                    batch.stream, batch.seq
                )))
            })
    }

    /// Waits for outstanding records of every producer.
    pub async fn flush(&self, timeout: Duration) {
        self.inner.flush(timeout).await
    }

    /// Forgets `stream` (cluster mode: another instance owns it now). Its
    /// producer is dropped; if the stream comes back, a new producer fences
    /// whoever had it and the checkpoint is read back again. A batch still
    /// holding the stream's lock keeps the old state and ends on its own.
    pub fn release(&self, stream: &str) {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
    }
}

impl Inner {
    fn stream(&self, name: &str) -> Arc<tokio::sync::Mutex<TxnStream>> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(TxnStream {
                    name: name.to_string(),
                    transactional_id: format!("{}{name}", self.config.transactional_id_prefix),
                    producer: None,
                    committed: None,
                    next_seq: None,
                    fenced: None,
                }))
            })
            .clone()
    }

    /// Initializes the producer and reads the committed checkpoint back, as
    /// needed.
    async fn ready(&self, st: &mut TxnStream) -> Result<SinkProducer, SinkError> {
        if let Some(m) = &st.fenced {
            return Err(SinkError::Fenced(m.clone()));
        }
        let producer = match &st.producer {
            Some(p) => p.clone(),
            None => {
                self.admin.ensure_checkpoint_topic().await?;
                let producer = create_producer(&self.config, Some(&st.transactional_id))?;
                let timeout = self
                    .config
                    .startup_timeout
                    .max(self.config.delivery_timeout);
                let p = producer.clone();
                let result = tokio::task::spawn_blocking(move || p.init_transactions(timeout))
                    .await
                    .map_err(|e| {
                        SinkError::Retriable(format!(
                            "{}: init_transactions task: {e}",
                            st.context(None)
                        ))
                    })?;
                if let Err(e) = result {
                    let failure =
                        Failure::from_txn(&e, "init_transactions", &self.checkpoint_topic);
                    return Err(st.fail(failure, None));
                }
                tracing::info!(stream = %st.name, transactional_id = %st.transactional_id, "Transactional producer initialized; earlier instances are fenced.");
                st.committed = None;
                st.producer = Some(producer.clone());
                producer
            }
        };
        if st.committed.is_none() {
            let config = self.config.clone();
            let stream = st.name.clone();
            let record = tokio::task::spawn_blocking(move || read_checkpoint(&config, &stream))
                .await
                .map_err(|e| {
                    SinkError::Retriable(format!(
                        "{}: checkpoint reader task: {e}",
                        st.context(None)
                    ))
                })??;
            let stored = record.map(|r| StoredCheckpoint {
                checkpoint: r.checkpoint.unwrap_or_default(),
                writes: StateWrites::from_proto(r.state.unwrap_or_default()),
            });
            tracing::info!(
                stream = %st.name,
                batch = stored.as_ref().map(|s| s.checkpoint.batch_seq),
                "Read the stream's checkpoint from the checkpoint topic."
            );
            // The batch this process was waiting for may have committed
            // after all (a commit whose outcome was unknown).
            let committed = stored.as_ref().map_or(0, |s| s.checkpoint.batch_seq);
            if let Some(next) = st.next_seq
                && next <= committed
            {
                st.next_seq = Some(committed + 1);
            }
            st.committed = Some(stored);
        }
        Ok(producer)
    }

    async fn publish(&self, job: Job) -> Result<(), SinkError> {
        let Job {
            stream,
            seq,
            records,
            stored,
        } = job;
        let lock = self.stream(&stream);
        let mut st = lock.lock().await;
        let producer = self.ready(&mut st).await?;
        let committed = st.committed_seq();
        if seq <= committed {
            tracing::debug!(stream = %st.name, batch = seq, committed, "Batch already committed by an earlier transaction; not sent again.");
            return Ok(());
        }
        if let Some(next) = st.next_seq
            && seq != next
        {
            return Err(SinkError::Retriable(format!(
                "{}: batch {next} must be committed first (it failed and is being published again)",
                st.context(Some(seq))
            )));
        }
        // From here on nothing after this batch may commit before it.
        st.next_seq = Some(seq);

        if let Err(e) = producer.begin_transaction() {
            let failure = with_fatal_state(
                &producer,
                Failure::from_txn(&e, "begin_transaction", &self.checkpoint_topic),
            );
            return Err(st.fail(failure, Some(seq)));
        }
        if let Err(failure) = produce_all(&producer, &records, || {}).await {
            let failure = with_fatal_state(&producer, failure);
            return Err(self.abort(&mut st, &producer, failure, seq).await);
        }
        match self.commit(&producer).await {
            Ok(()) => {
                st.committed = Some(Some(stored));
                st.next_seq = Some(seq + 1);
                Ok(())
            }
            Err(e) => {
                let failure = with_fatal_state(
                    &producer,
                    Failure::from_txn(&e, "commit_transaction", &self.checkpoint_topic),
                );
                let abortable = matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort());
                if abortable {
                    Err(self.abort(&mut st, &producer, failure, seq).await)
                } else {
                    // Outcome unknown (retries exhausted) or the producer is
                    // dead: a new producer settles the transaction and the
                    // checkpoint read back tells whether it committed.
                    let class = failure.class;
                    let error = st.fail(failure, Some(seq));
                    if class != Class::Fenced {
                        st.replace_producer();
                    }
                    Err(error)
                }
            }
        }
    }

    /// `commit_transaction`, retried while librdkafka says a retry can
    /// succeed (its own timeout, a coordinator move).
    async fn commit(&self, producer: &SinkProducer) -> Result<(), KafkaError> {
        let timeout = self.config.delivery_timeout;
        let mut attempts = 0;
        loop {
            let p = producer.clone();
            let result = tokio::task::spawn_blocking(move || p.commit_transaction(timeout))
                .await
                .unwrap_or(Err(KafkaError::Canceled));
            match result {
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempts < 3 => {
                    attempts += 1;
                    tracing::warn!(error = %e, attempt = attempts, "Committing the transaction failed; retrying.");
                }
                other => return other,
            }
        }
    }

    /// Aborts the open transaction after `failure`; returns the error for
    /// the runtime.
    async fn abort(
        &self,
        st: &mut TxnStream,
        producer: &SinkProducer,
        failure: Failure,
        seq: u64,
    ) -> SinkError {
        if matches!(failure.class, Class::Fenced | Class::Fatal) {
            return st.fail(failure, Some(seq));
        }
        let p = producer.clone();
        let timeout = self.config.delivery_timeout;
        let aborted = tokio::task::spawn_blocking(move || p.abort_transaction(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled));
        if let Err(e) = aborted {
            let abort_failure = with_fatal_state(
                producer,
                Failure::from_txn(&e, "abort_transaction", &self.checkpoint_topic),
            );
            tracing::warn!(stream = %st.name, error = %e, "Aborting the transaction failed; the producer is replaced.");
            if abort_failure.class == Class::Fenced {
                return st.fenced_error(&abort_failure.message);
            }
            st.replace_producer();
        } else {
            tracing::debug!(stream = %st.name, batch = seq, "Transaction aborted.");
        }
        failure.into_sink_error(&st.context(Some(seq)))
    }

    async fn flush(&self, timeout: Duration) {
        let producers: Vec<SinkProducer> = {
            let streams: Vec<_> = self
                .streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            let mut out = Vec::new();
            for s in streams {
                if let Ok(st) = s.try_lock()
                    && let Some(p) = &st.producer
                {
                    out.push(p.clone());
                }
            }
            out
        };
        for p in producers {
            let _ = tokio::task::spawn_blocking(move || p.flush(timeout)).await;
        }
    }
}

/// A failed record or commit of a producer that hit a fatal error (fenced,
/// or an idempotence failure) is reported as that fatal error: the
/// individual delivery reports then only say "purged".
fn with_fatal_state(producer: &SinkProducer, failure: Failure) -> Failure {
    match producer.client().fatal_error() {
        Some((code, reason)) => Failure {
            class: match classify(code) {
                Class::Fenced => Class::Fenced,
                _ => Class::Fatal,
            },
            message: format!(
                "{} (producer fatal error {code}: {reason})",
                failure.message
            ),
        },
        None => failure,
    }
}

/// Reads `stream`'s newest committed record from the checkpoint topic.
///
/// Blocking. Reads with `read_committed` from the beginning of every
/// partition up to the high-water mark observed when the read starts. The
/// transactions that were still open at that moment (other streams',
/// sharing the topic) hold the last stable offset back; the read waits for
/// them to finish, so a record of this stream committed after another
/// stream's transaction began is not missed.
pub fn read_checkpoint(
    config: &KafkaSinkConfig,
    stream: &str,
) -> Result<Option<CheckpointRecord>, SinkError> {
    let topic = config.checkpoint_topic.as_str();
    let timeout = config.transaction_timeout + config.startup_timeout;
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let context = format!("kafka: reading stream `{stream}`'s checkpoint from topic `{topic}`");
    let kafka_err = |what: &str, e: KafkaError| {
        Failure::from_kafka(&e, topic).into_sink_error(&format!("{context}: {what}"))
    };
    let create = |read_committed: bool| -> Result<BaseConsumer<SinkContext>, SinkError> {
        config
            .consumer_config(read_committed)?
            .create_with_context::<_, BaseConsumer<SinkContext>>(SinkContext::new(
                "checkpoint-reader",
            ))
            .map_err(|e| SinkError::Permanent(format!("{context}: cannot create a consumer: {e}")))
    };

    let uncommitted = create(false)?;
    let md = uncommitted
        .fetch_metadata(Some(topic), left())
        .map_err(|e| kafka_err("metadata", e))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut targets = Vec::new();
    for p in partitions {
        let (low, high) = uncommitted
            .fetch_watermarks(topic, p, left())
            .map_err(|e| kafka_err("high-water mark", e))?;
        if high > low {
            targets.push((p, high));
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }

    let committed = create(true)?;
    // With read_committed, the "high" watermark is the last stable offset.
    for &(p, high) in &targets {
        loop {
            let (_, stable) = committed
                .fetch_watermarks(topic, p, left())
                .map_err(|e| kafka_err("last stable offset", e))?;
            if stable >= high {
                break;
            }
            if left().is_zero() {
                return Err(SinkError::Retriable(format!(
                    "{context}: partition {p} has a transaction open for longer than {}; retrying",
                    humantime::format_duration(timeout)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut tpl = TopicPartitionList::new();
    for &(p, _) in &targets {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| kafka_err("assign", e))?;
    }
    committed.assign(&tpl).map_err(|e| kafka_err("assign", e))?;

    // Per partition: the last record with this stream's key (a null value
    // is a tombstone: the stream's checkpoint was deleted).
    let mut latest: HashMap<i32, Option<Vec<u8>>> = HashMap::new();
    let mut done = HashSet::new();
    while done.len() < targets.len() {
        match committed.poll(left().min(Duration::from_millis(500))) {
            None if left().is_zero() => {
                return Err(SinkError::Retriable(format!(
                    "{context}: not finished within {}",
                    humantime::format_duration(timeout)
                )));
            }
            None => {}
            Some(Ok(m)) if m.key() == Some(stream.as_bytes()) => {
                latest.insert(m.partition(), m.payload().map(<[u8]>::to_vec));
            }
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                done.insert(p);
            }
            Some(Err(e)) => return Err(kafka_err("consume", e)),
        }
    }
    // One partition holds all of a stream's records unless the topic's
    // partition count changed; then the furthest checkpoint wins.
    let mut best: Option<CheckpointRecord> = None;
    for bytes in latest.into_values().flatten() {
        let record = CheckpointRecord::decode(bytes.as_slice()).map_err(|e| {
            SinkError::Permanent(format!(
                "{context}: a record with key `{stream}` is not a graphdelta.v1.CheckpointRecord ({e}); is sink.checkpoint_topic shared with something else?"
            ))
        })?;
        let seq = |r: &CheckpointRecord| r.checkpoint.as_ref().map_or(0, |c| c.batch_seq);
        if best.as_ref().is_none_or(|b| seq(&record) > seq(b)) {
            best = Some(record);
        }
    }
    Ok(best)
}

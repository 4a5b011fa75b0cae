//! Rebuilding state from the event stream: the topics are the source of
//! truth a service can rebuild from (`graphdelta replay`).
//!
//! ```text
//!  file / kafka / rabbitmq ──Record──▶ fold ──▶ ReplayStore (SQLite) ──▶ .jsonl or sqlite: output
//!  (src/replay/{file,kafka,rabbitmq}.rs)        (store.rs)        └──▶ verify against the checkpoint
//!                                                                      store's memory (verify.rs)
//! ```
//!
//! A reader per sink turns what that sink wrote back into [`Record`]s and
//! hands them over one [`Source`] (a bounded channel: a reader never runs
//! further ahead than the fold). Where each reader stops:
//! - **file**: the end of the file (a torn last line, an unacknowledged
//!   batch, is skipped);
//! - **kafka**: every partition to its high-water mark (last stable
//!   offset) at start, read with `read_committed`; or to its end of
//!   partition where the broker's offsets disagree (see [`kafka`]);
//! - **rabbitmq**: a `stream` queue from `x-stream-offset = "first"` up to
//!   the last offset at start, found by a probe consumer at `"last"` (see
//!   [`rabbitmq`]).
//!
//! [`Materializer`] and [`ReplayStore`] fold a stream's events, in order,
//! into the current state of every object: properties merged per property
//! (an explicit null clears), soft-deleted objects kept with a flag,
//! hard-deleted ones gone, group memberships as sets. Duplicates from
//! at-least-once delivery are recognised by `object_version`: the connector
//! never reuses a version for an object (it keeps tombstones of hard-deleted
//! objects), and one object's events keep their order in every sink, so an
//! event whose version is not above the object's current one is a
//! duplicate (or older) and is skipped.

pub mod file;
pub mod kafka;
pub mod materialize;
pub mod rabbitmq;
pub mod store;
pub mod verify;

use std::time::Duration;

pub use materialize::{Materialized, Materializer, ObjectStatus, ReplayStats};
pub use store::ReplayStore;
use tokio::sync::mpsc;
pub use verify::{VerifyReport, verify};

use crate::{config::Config, proto::v1::ChangeEvent, sink::SinkConfig};

/// A replay failure.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Bad arguments or configuration: an operator must fix them; a retry
    /// cannot help.
    #[error("{0}")]
    Config(String),
    /// Reading what the sink wrote failed (broker unreachable, file
    /// unreadable): a later attempt may succeed.
    #[error("{0}")]
    Source(String),
    /// A record is not a graphdelta event in the configured encoding.
    #[error("{0}")]
    Decode(String),
    /// The output store failed (disk full, read-only directory).
    #[error("replay store `{path}`: {message}")]
    Store { path: String, message: String },
    /// Writing the output failed.
    #[error("replay output: {0}")]
    Output(String),
    /// The checkpoint store could not be read (`--verify`).
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

/// One record read back from a sink.
#[derive(Debug, Clone)]
pub enum Record {
    Event(Box<ChangeEvent>),
    /// A Kafka tombstone (a null-value record after a `HARD_DELETED`).
    Tombstone,
}

/// What a reader needs besides the connector file.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// RabbitMQ: the stream queue to read; default: the only `stream`
    /// queue of `[[sink.declare_queues]]`.
    pub queue: Option<String>,
    /// RabbitMQ: give up waiting for the next message after this long (a
    /// fallback: the normal end is the last offset at start); also how long
    /// an empty stream is waited on.
    pub idle_timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            queue: None,
            idle_timeout: Duration::from_secs(5),
        }
    }
}

/// The records of one sink, in the order the sink wrote them (per object).
#[derive(Debug)]
pub struct Source {
    /// Where the records come from, for messages: "topic `x` (3 partitions)".
    pub description: String,
    /// Records the reader expects to deliver (for a progress bar), if known.
    pub total: Option<u64>,
    rx: mpsc::Receiver<Result<Record, ReplayError>>,
}

/// Records buffered between a reader and the fold.
const CHANNEL_DEPTH: usize = 1024;

impl Source {
    /// A source fed by the sender half (a reader task or thread).
    pub(crate) fn channel(
        description: String,
        total: Option<u64>,
    ) -> (mpsc::Sender<Result<Record, ReplayError>>, Self) {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        (
            tx,
            Self {
                description,
                total,
                rx,
            },
        )
    }

    /// The next record; `None` at the end. Blocking: call it off the async
    /// runtime (the fold runs in `spawn_blocking`).
    pub fn blocking_next(&mut self) -> Option<Result<Record, ReplayError>> {
        self.rx.blocking_recv()
    }

    /// The next record; `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Record, ReplayError>> {
        self.rx.recv().await
    }
}

/// Opens the reader for `stream` of the connector's sink.
pub async fn open_source(
    config: &Config,
    stream: &str,
    options: &SourceOptions,
) -> Result<Source, ReplayError> {
    let s = config
        .streams
        .iter()
        .find(|s| s.name == stream)
        .ok_or_else(|| {
            ReplayError::Config(format!(
                "no stream `{stream}` in the connector file; streams: {}",
                config
                    .streams
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    match &config.sink {
        SinkConfig::File(c) => file::open(c),
        SinkConfig::Stdout(_) => Err(ReplayError::Config(
            "[sink] type = \"stdout\" keeps nothing to replay: capture standard output into a file and replay it with a connector file whose [sink] is type = \"file\", path = <that file>".to_string(),
        )),
        SinkConfig::Kafka(c) => {
            let tenant = tenant_id(config, s)?;
            let topic = crate::sink::kafka::config::TopicTemplate::parse(&c.topic)
                .and_then(|t| t.render(&tenant, &s.name, &s.resource))
                .map_err(|e| ReplayError::Config(format!("sink.topic `{}`: {e}", c.topic)))?;
            kafka::open(c.as_ref().clone(), topic).await
        }
        SinkConfig::Rabbitmq(c) => rabbitmq::open(c, options).await,
    }
}

/// The tenant id of a stream, without loading any secret.
fn tenant_id(config: &Config, s: &crate::config::StreamConfig) -> Result<String, ReplayError> {
    let graph = match &s.tenant {
        None => config.graph.as_ref(),
        Some(name) => config
            .tenants
            .iter()
            .find(|t| t.name.as_deref() == Some(name)),
    };
    graph.map(|g| g.tenant_id.clone()).ok_or_else(|| {
        ReplayError::Config(format!(
            "stream `{}`: no tenant (a [graph] table or the [[tenants]] entry it names)",
            s.name
        ))
    })
}

/// Folds every record of `source` that belongs to `stream` into `store`.
/// Blocking. `progress` is called with the number of records read so far,
/// every few hundred records and at the end.
pub fn fold(
    source: &mut Source,
    store: &mut ReplayStore,
    stream: &str,
    mut progress: impl FnMut(u64),
) -> Result<(), ReplayError> {
    let mut read = 0u64;
    while let Some(record) = source.blocking_next() {
        match record? {
            Record::Tombstone => store.note_tombstone(),
            Record::Event(e) if e.stream != stream => store.note_other_stream(),
            Record::Event(e) => {
                store.apply(&e)?;
            }
        }
        read += 1;
        if read % 256 == 0 {
            progress(read);
        }
    }
    progress(read);
    Ok(())
}

//! The embedded checkpoint store: per stream, where the delta round stands
//! (the next link) and the compact memory of every object and membership.
//!
//! # Why SQLite
//! The memory must stay on disk (a tenant can hold millions of objects and
//! RSS must not grow with it), the link and the memory must change together
//! in one crash-safe transaction, and operators want to inspect it with
//! standard tools. SQLite (bundled, WAL mode) gives all three; redb would
//! give the first two but no `sqlite3` shell, and `graphdelta replay
//! --out sqlite:` speaks SQLite anyway.
//!
//! # Durability
//! One file per stream (`{checkpoint.path}/{stream}.sqlite3`), so streams
//! never wait for each other's writes and `reset` is a file removal.
//! `synchronous = NORMAL` in WAL mode: a commit survives a process crash
//! (kill -9) at any instant; after a power loss the newest commits may roll
//! back, which re-reads pages already delivered (duplicates with the same
//! event ids), never loses one, because every sink makes its data durable
//! before it acknowledges and the runtime commits only after that ack.
//!
//! # The outbox
//! Graph pages show objects as they are *now*: a page read again after a
//! crash can differ from the one whose events were published before it.
//! Normalized against the committed memory again, such a page would give
//! the same `object_version` to different content (a new event id), or no
//! event at all if the object changed back: a consumer that had the
//! pre-crash event would keep it. So every batch that changes the memory
//! is appended to the outbox (events, memory changes, checkpoint; files
//! beside the store, see [`outbox`]) before it is handed to the sink, and a
//! commit makes the records it covers obsolete. On start, the runtime
//! publishes what the outbox holds past the committed checkpoint,
//! unchanged and in order, and commits it, before it reads any page: events
//! re-published after a crash are byte-for-byte the ones published before
//! it. Batches without events are recorded too when they change the memory
//! (a full round's pages mostly only mark known objects and memberships as
//! seen): a later batch committed from the outbox must not pass over them.
//!
//! # Where objects are found
//! An object's row is found through an index on a 64-bit hash of its id.
//! Ids are random GUIDs, so a commit of first sightings inserts random
//! keys: once the index outgrows the page cache (about 300k objects), a
//! commit of 2,500 of them rewrote most of its leaves, and a 1M-object sync
//! wrote gigabytes of WAL. First sightings of a store past [`DIRECT_ROWS`]
//! objects therefore go to a small table of their own, `recent`, whose
//! index stays in cache; every [`MERGE_ROWS`] rows (and before inferred
//! deletions are looked for) they move into `objects` in key order, which
//! visits each leaf of the large index once. Lookups read both tables.
//!
//! The events are recorded in the sink's wire form ([`OutboxRow`]), and
//! the sink is handed that same blob: encoded once, on the normalizer's
//! thread. Cost: see the README's Performance section.

pub mod outbox;

use bytes::Bytes;
use std::{
    collections::BTreeMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::{
    normalize::memory::{MemberKey, MemberRow, StateWrites},
    proto::v1::{
        BatchState, ChangeEvent, CheckpointRecord, EventsEncoding, ObjectState, Phase,
        StreamCheckpoint,
    },
};

/// A batch encoded for the outbox, on the normalizer's thread, so that the
/// task that publishes and commits only stores the bytes. The events are
/// encoded in the sink's own wire form ([`Sink::encoding`]): the sink
/// writes the same blob, so a batch's events are encoded once.
///
/// [`Sink::encoding`]: crate::sink::Sink::encoding
pub struct OutboxRow {
    seq: u64,
    /// What the outbox record holds before the events ([`outbox::head`]);
    /// empty for a row read back from the outbox.
    head: Bytes,
    /// The events, shared, so that a sink can keep them without a copy.
    events: Bytes,
    pub encoding: EventsEncoding,
    recorded: bool,
}

impl OutboxRow {
    /// The row of a batch whose events are encoded here.
    pub fn encode(
        checkpoint: &StreamCheckpoint,
        writes: &StateWrites,
        events: &[ChangeEvent],
        encoding: EventsEncoding,
    ) -> OutboxRow {
        let mut encoded = Vec::with_capacity(crate::sink::estimated_len(encoding, events));
        crate::sink::encode_events_into(encoding, events, &mut encoded);
        OutboxRow::encoded(checkpoint, writes, encoded, encoding)
    }

    /// The row of a batch whose events are already encoded in `encoding`.
    pub fn encoded(
        checkpoint: &StreamCheckpoint,
        writes: &StateWrites,
        events: Vec<u8>,
        encoding: EventsEncoding,
    ) -> OutboxRow {
        let head = outbox::head(
            checkpoint.batch_seq,
            |buf| encode_record(checkpoint, writes, encoding, buf),
            &events,
        );
        OutboxRow {
            seq: checkpoint.batch_seq,
            head: head.into(),
            events: events.into(),
            encoding,
            recorded: false,
        }
    }

    /// A row read back from the outbox ([`Store::outbox`]).
    pub fn recorded(pending: &mut PendingBatch) -> OutboxRow {
        OutboxRow {
            seq: pending.checkpoint.batch_seq,
            head: Bytes::new(),
            events: std::mem::take(&mut pending.encoded).into(),
            encoding: pending.encoding,
            recorded: true,
        }
    }

    /// The events, in `encoding`: what the sink is handed.
    pub fn events(&self) -> &Bytes {
        &self.events
    }

    /// Bytes held: the record and the events.
    pub fn size(&self) -> usize {
        self.head.len() + self.events.len()
    }

    /// True once the row is in the outbox.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }
}

/// Appends the `CheckpointRecord` of a batch, encoded as prost would
/// encode it (see [`StateWrites::encode_proto_field`]), without copying
/// the writes into a `BatchState` first.
fn encode_record(
    checkpoint: &StreamCheckpoint,
    writes: &StateWrites,
    encoding: EventsEncoding,
    record: &mut Vec<u8>,
) {
    use prost::encoding::{int32, message};
    message::encode(1, checkpoint, record);
    writes.encode_proto_field(2, record);
    if encoding as i32 != 0 {
        int32::encode(3, &(encoding as i32), record);
    }
}

/// A batch that was (perhaps) handed to the sink but not committed.
#[derive(Debug, Clone)]
pub struct PendingBatch {
    pub checkpoint: StreamCheckpoint,
    pub writes: StateWrites,
    pub events: Vec<ChangeEvent>,
    /// The events as recorded (and as the sink was handed them), in
    /// `encoding`.
    pub encoded: Vec<u8>,
    pub encoding: EventsEncoding,
}

/// 2: first sightings in `recent` (see "Where objects are found"); a store
/// of version 1 gets the table when the connector opens it.
const SCHEMA_VERSION: &str = "2";

/// Rows `recent` holds before they move into `objects`. At 1M users in one
/// sync (`bench-worker`, two runs each): 50,000 took 10.9-11.5 s against
/// 13.7-14.0 s with every first sighting inserted into `objects`, and 18 →
/// 13.5-14.4 CPU-s; 100,000 was no faster (11.0-11.8 s). The index of
/// 50,000 rows (≈ 1 MiB) stays in the writer's 4 MiB page cache.
pub const MERGE_ROWS: usize = 50_000;

/// While the store holds fewer objects than this, first sightings go
/// straight into `objects`: its index still fits the page cache, and
/// copying every row once more (the move out of `recent`) cost ≈ 5k
/// instructions an object (a 20k-user sync, callgrind: 0.81 → 0.91 G).
pub const DIRECT_ROWS: usize = 150_000;

/// `seen_round` of tombstones (hard-deleted objects kept for their version).
const TOMBSTONE_ROUND: i64 = i64::MAX;

/// A checkpoint store failure. Not retried by the runtime's page loop: the
/// stream stops with this message (disk full, read-only, corrupt file).
#[derive(Debug, thiserror::Error)]
#[error("checkpoint store `{path}`: {message}")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

/// Records batches in a stream's outbox ([`Store::outbox_writer`]).
#[derive(Clone)]
pub struct OutboxWriter(Arc<Mutex<outbox::OutboxLog>>);

impl OutboxWriter {
    /// Records a batch about to be handed to the sink (see "The outbox"),
    /// encoded beforehand by [`OutboxRow::encode`]; a row already recorded
    /// is left as it is.
    pub fn put(&self, row: &mut OutboxRow) -> Result<(), CheckpointError> {
        if row.recorded {
            return Ok(());
        }
        lock(&self.0)
            .append_framed(row.seq, &row.head, &row.events)
            .map_err(|(path, e)| io_error(path, "cannot write the outbox", &e))?;
        row.recorded = true;
        Ok(())
    }
}

/// The outbox log's lock; a panic elsewhere leaves the log usable (its
/// writes are single `writev` calls).
fn lock(log: &Mutex<outbox::OutboxLog>) -> std::sync::MutexGuard<'_, outbox::OutboxLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// The store of one stream.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    stream: String,
    /// Opened on first use (readers never use it); shared with the
    /// [`OutboxWriter`]s handed out.
    outbox: Option<Arc<Mutex<outbox::OutboxLog>>>,
    /// Cluster mode: writes each commit to the shared state topic first.
    mirror: Option<Box<dyn CommitMirror>>,
    /// A commit's encoded object states, kept for the next commit.
    states: Vec<u8>,
    /// Rows in `objects` and in `recent` (the writer's counts; 0 for
    /// readers).
    objects: usize,
    recent: usize,
    /// [`DIRECT_ROWS`] and [`MERGE_ROWS`], smaller in tests.
    direct_rows: usize,
    merge_rows: usize,
    /// The writer's WAL checkpoints, on a thread of their own.
    checkpointer: Option<Checkpointer>,
}

/// Checkpoints a store's WAL on a thread of its own, with a connection of
/// its own, at a lower CPU priority ([`crate::background`]), so that no
/// commit waits for one. SQLite's own checkpoints run inside the commit
/// that fills the WAL: at 1M users, a commit that moved `recent` into
/// `objects` took 70-105 ms to commit, of which all but 5-13 ms was the
/// checkpoint, and meanwhile the stream could stage nothing more.
/// Checkpoints are `PASSIVE`: they never wait for the writer or a reader,
/// and copy what they can; the next one copies the rest.
struct Checkpointer {
    thread: std::thread::JoinHandle<()>,
    /// WAL pages after a commit that ask for a checkpoint.
    #[cfg_attr(not(test), allow(dead_code))]
    every: i64,
    /// Checkpoints run, and those at the writer's own priority.
    #[cfg_attr(not(test), allow(dead_code))]
    runs: Arc<std::sync::atomic::AtomicU64>,
    #[cfg_attr(not(test), allow(dead_code))]
    own_runs: Arc<std::sync::atomic::AtomicU64>,
}

/// What a commit that left `in_wal` pages in the WAL asks the
/// checkpointer for: nothing, a checkpoint (`every` pages), or one that is
/// behind ([`WAL_BEHIND`]).
fn wal_request(in_wal: std::os::raw::c_int, every: std::os::raw::c_int) -> Option<bool> {
    (in_wal >= every).then_some(in_wal / every >= WAL_BEHIND)
}

/// No `Option<F>` of a closure type to name when a hook is removed.
type WalHook = fn(&mut rusqlite::hooks::Wal, std::os::raw::c_int) -> rusqlite::Result<()>;

impl Drop for Store {
    /// The checkpointer's connection is closed first, so that the writer's
    /// is the last: SQLite then copies the WAL into the database and removes
    /// it, as it did before the checkpointer.
    fn drop(&mut self) {
        self.stop_checkpointer();
    }
}

/// A larger buffer of encoded states is not kept after its commit.
const KEPT_STATES_BYTES: usize = 1 << 20;

/// Something that must hold every commit before the store does: in cluster
/// mode the compacted Kafka state topic ([`crate::cluster::state`]), so that
/// another instance can take the stream over. Called before the SQLite
/// transaction; an error leaves the store untouched.
pub trait CommitMirror: Send {
    fn before_commit(
        &mut self,
        store: &Store,
        checkpoint: &StreamCheckpoint,
        writes: &StateWrites,
    ) -> Result<(), String>;
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// WAL bytes between automatic checkpoints (see `Store::init`): 10,000
/// pages of 4 KiB.
const WAL_CHECKPOINT_BYTES: i64 = 40_000 << 10;
/// Page size of a new store (see `Store::init`).
const PAGE_SIZE: i64 = 16 << 10;
/// A WAL this many checkpoints' worth long (120 MiB) shows the
/// checkpoints falling behind (starved at their lower priority beside
/// other busy processes: a 1M-user sync beside two busy loops grew it to
/// 180 MB, against 72 MB alone); the next [`WAL_BEHIND_OWN_PRIORITY`] run
/// at the writer's own priority ([`crate::background::Yielding`]).
const WAL_BEHIND: i32 = 3;
const WAL_BEHIND_OWN_PRIORITY: u32 = 4;
/// Bytes of WAL file kept after a checkpoint.
const WAL_KEPT_BYTES: i64 = 64 << 20;

/// Ids looked up per query.
const LOOKUP_CHUNK: usize = 256;
/// Rows inserted per statement (4 parameters each).
const INSERT_CHUNK: usize = 64;

/// `SELECT ... WHERE key IN (?1, ...)` over both tables for
/// 0..=LOOKUP_CHUNK keys (each bound once, used twice).
fn lookup_sql() -> &'static [String] {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        (0..=LOOKUP_CHUNK)
            .map(|n| {
                let placeholders = (1..=n.max(1))
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(",");
                format!(
                    "SELECT id, seen_round, state FROM objects WHERE key IN ({placeholders})
                     UNION ALL
                     SELECT id, seen_round, state FROM recent WHERE key IN ({placeholders})"
                )
            })
            .collect()
    })
}

/// An object's row blob, alone.
#[cfg(test)]
fn stored_state(state: &ObjectState) -> Vec<u8> {
    let mut buf = Vec::new();
    append_stored_state(state, &mut buf);
    buf
}

/// Appends an object's row blob to `buf`: its state, but for `seen_round`,
/// which lives in a column of its own for reconciliation (a tombstone
/// keeps it in the blob). Encoded field by field, as prost would encode
/// the state with that one field changed, without copying the state first.
fn append_stored_state(state: &ObjectState, buf: &mut Vec<u8>) {
    use prost::encoding::{bool as pbool, fixed64, string, uint64};
    buf.reserve(32 + state.object_type.len() + state.property_hashes.len() * 8);
    let seen_round = if state.hard_deleted {
        state.seen_round
    } else {
        0
    };
    if state.version != 0 {
        uint64::encode(1, &state.version, buf);
    }
    if state.soft_deleted {
        pbool::encode(2, &state.soft_deleted, buf);
    }
    if seen_round != 0 {
        uint64::encode(3, &seen_round, buf);
    }
    fixed64::encode_packed(4, &state.property_hashes, buf);
    if !state.object_type.is_empty() {
        string::encode(5, &state.object_type, buf);
    }
    if state.hard_deleted {
        pbool::encode(6, &state.hard_deleted, buf);
    }
}

/// `INSERT ... VALUES (?,?,?,?), ...` for 0..=INSERT_CHUNK rows.
///
/// `OR FAIL`: a statement that writes several rows and may abort halfway
/// (`NOT NULL` is an `ABORT` constraint) gets a statement journal, so that
/// the abort can undo the rows already written. SQLite keeps that journal
/// in memory up to 64 KiB and then in a temporary file: a 64-row insert
/// copied every page it touched there, ≈ 9,000 `pwrite`s per commit of
/// 5,000 objects (`strace`). A failure here fails the whole transaction
/// anyway, so nothing needs undoing statement by statement. 100k users:
/// 1.95 s → 1.58 s, 2.37 → 2.01 CPU-s.
fn insert_sql(into_recent: bool) -> &'static [String] {
    static OBJECTS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    static RECENT: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let (sql, table) = if into_recent {
        (&RECENT, "recent")
    } else {
        (&OBJECTS, "objects")
    };
    sql.get_or_init(|| {
        (0..=INSERT_CHUNK)
            .map(|n| {
                let rows = vec!["(?,?,?,?)"; n.max(1)].join(",");
                format!("INSERT OR FAIL INTO {table} (key, id, seen_round, state) VALUES {rows}")
            })
            .collect()
    })
}

/// A store of schema version 1 that the connector has not opened since
/// has no `recent` table: a read-only connection gets an empty one of its
/// own (a temporary table), so that the same queries work.
fn without_recent_table(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'recent')",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(
            "CREATE TEMP TABLE recent (
                 key INTEGER NOT NULL, id TEXT NOT NULL,
                 seen_round INTEGER NOT NULL, state BLOB NOT NULL)",
        )?;
    }
    Ok(())
}

/// The index key of an object id: its xxh3, as SQLite's signed integer.
fn object_key(id: &str) -> i64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes()) as i64
}

/// The file of a stream's store.
pub fn store_path(dir: &Path, stream: &str) -> PathBuf {
    dir.join(format!("{stream}.sqlite3"))
}

/// The directory of a stream's outbox (see [`outbox`]).
fn outbox_dir(store: &Path) -> PathBuf {
    store.with_extension("outbox")
}

/// The fix for a store error, from SQLite's message or the file error's
/// kind; empty when there is none to suggest.
fn hint(message: &str, kind: Option<std::io::ErrorKind>) -> &'static str {
    use std::io::ErrorKind;
    let read_only = matches!(
        kind,
        Some(ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied)
    );
    let full = matches!(
        kind,
        Some(ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
    );
    if read_only || message.contains("readonly") || message.contains("read-only") {
        " (the store is read-only: check the permissions of checkpoint.path and the disk)"
    } else if full || message.contains("full") {
        " (the disk is full: free space; nothing was committed)"
    } else if message.contains("locked") || message.contains("busy") {
        " (another process holds the store: is a second graphdelta running with the same checkpoint.path?)"
    } else {
        ""
    }
}

/// A file error of the store (the outbox's files), with the fix.
fn io_error(path: PathBuf, what: &str, e: &std::io::Error) -> CheckpointError {
    CheckpointError {
        path,
        message: format!("{what}: {e}{}", hint("", Some(e.kind()))),
    }
}

impl Store {
    /// Opens (creating if needed) the store of `stream` under `dir`.
    pub fn open(dir: &Path, stream: &str) -> Result<Store, CheckpointError> {
        let path = store_path(dir, stream);
        let fail = |message: String| CheckpointError {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(format!(
                "cannot create directory `{}`: {e} (check checkpoint.path and its permissions)",
                dir.display()
            ))
        })?;
        let conn = Connection::open(&path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let mut store = Store {
            conn,
            path: path.clone(),
            stream: stream.to_string(),
            outbox: None,
            mirror: None,
            states: Vec::new(),
            objects: 0,
            recent: 0,
            direct_rows: DIRECT_ROWS,
            merge_rows: MERGE_ROWS,
            checkpointer: None,
        };
        store.init().map_err(|e| store.err(e))?;
        let page_size: i64 = store
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| store.err(e))?;
        if let Err(e) = store.checkpoint_in_background(WAL_CHECKPOINT_BYTES / page_size.max(512)) {
            // SQLite's own checkpoints (`wal_autocheckpoint`) stay.
            tracing::warn!(path = %path.display(), error = %e, "Cannot checkpoint the store's WAL on a thread of its own; SQLite checkpoints it in the commits instead.");
        }
        let count = |table: &str| {
            store
                .conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as usize)
                .map_err(|e| store.err(e))
        };
        (store.objects, store.recent) = (count("objects")?, count("recent")?);
        Ok(store)
    }

    /// Opens an existing store read-only (for `status`, `replay --verify`).
    pub fn open_read_only(dir: &Path, stream: &str) -> Result<Option<Store>, CheckpointError> {
        let path = store_path(dir, stream);
        if !path.exists() {
            return Ok(None);
        }
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| {
                CheckpointError {
                    path: path.clone(),
                    message: format!("cannot open: {e}"),
                }
            })?;
        conn.busy_timeout(Duration::from_secs(5))
            .and_then(|()| register_functions(&conn))
            .and_then(|()| without_recent_table(&conn))
            .map_err(|e| CheckpointError {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Some(Store {
            conn,
            path,
            stream: stream.to_string(),
            outbox: None,
            mirror: None,
            states: Vec::new(),
            objects: 0,
            recent: 0,
            direct_rows: DIRECT_ROWS,
            merge_rows: MERGE_ROWS,
            checkpointer: None,
        }))
    }

    /// A second, read-only connection to the same store: reads from it see
    /// every commit made through this one before the read began.
    pub fn reader(&self) -> Result<Store, CheckpointError> {
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|conn| {
                conn.busy_timeout(Duration::from_secs(5))?;
                conn.pragma_update(None, "cache_size", -2048)?;
                register_functions(&conn)?;
                Ok(conn)
            })
            .map_err(|e| self.err(e))?;
        Ok(Store {
            conn,
            path: self.path.clone(),
            stream: self.stream.clone(),
            outbox: None,
            mirror: None,
            states: Vec::new(),
            objects: 0,
            recent: 0,
            direct_rows: DIRECT_ROWS,
            merge_rows: MERGE_ROWS,
            checkpointer: None,
        })
    }

    fn init(&self) -> rusqlite::Result<()> {
        register_functions(&self.conn)?;
        self.conn.busy_timeout(Duration::from_secs(5))?;
        // A new store gets 16 KiB pages (SQLite's default is 4 KiB); a store
        // that exists keeps the size it has. Rows are appended and the key
        // index is rewritten leaf by leaf at each commit, so larger pages
        // write the same bytes in a quarter of the WAL frames (each a
        // header, a checksum and a `pwrite`). Alternating runs, 40 MiB of
        // WAL between checkpoints in both: 100k users, medians of ten,
        // 0.875 → 0.770 s and 1.07 → 0.97 CPU-s, peak RSS alike (50 MiB);
        // 1M users 11.03 and 10.26 s → 9.79 and 8.56 s, peaks 51.8-54.0
        // MiB in both.
        self.conn.pragma_update(None, "page_size", PAGE_SIZE)?;
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Small page caches (4 MiB here, 2 MiB for the reader), as every
        // stream has its own: memory must not grow with the tenant or the
        // number of streams (`graphdelta bench`, 100k users: 16+8 MiB ran
        // no faster than 2+1 MiB; 20 streams: 353 MiB peak RSS with 8+4).
        self.conn.pragma_update(None, "cache_size", -4096)?;
        // The WAL is copied into the database every 40 MiB (10,000 pages of
        // 4 KiB, 2,500 of 16 KiB), not SQLite's 1,000 pages: by the writer's
        // checkpointer ([`Checkpointer`]), or by SQLite if that cannot start. Once the key index outgrows the page cache,
        // a commit rewrites most of its leaves, and every checkpoint copied
        // them again and fsynced: 1M users, three alternating runs each,
        // 16.1-16.5 s → 12.5-12.7 s and 18.4 → 16.1 CPU-s (5,000 pages:
        // 13.6 s; 30,000: no faster). The WAL file stays that size on disk
        // while the store is open (SQLite reuses it); one that grew past
        // 64 MiB (a checkpoint held back by a reader) is cut back after the
        // next checkpoint. Cutting it back to 8 MiB after every checkpoint
        // looked slower (13.6-13.8 s against 12.5-13.3 s, two runs each at
        // 1M users: the file grew again each time).
        let page_size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        self.conn.pragma_update(
            None,
            "wal_autocheckpoint",
            WAL_CHECKPOINT_BYTES / page_size.max(512),
        )?;
        self.conn
            .pragma_update(None, "journal_size_limit", WAL_KEPT_BYTES)?;
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (
                 key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS checkpoint (
                 stream TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
             -- Rows are appended in arrival order and found through a small
             -- index on a 64-bit hash of the id: a commit then touches few
             -- pages, where a table keyed by random GUID strings would rewrite
             -- a page per object (write amplification in the WAL).
             CREATE TABLE IF NOT EXISTS objects (
                 key INTEGER NOT NULL, id TEXT NOT NULL,
                 seen_round INTEGER NOT NULL, state BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS objects_by_key ON objects (key);
             -- First sightings until they move into `objects` (module docs).
             CREATE TABLE IF NOT EXISTS recent (
                 key INTEGER NOT NULL, id TEXT NOT NULL,
                 seen_round INTEGER NOT NULL, state BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS recent_by_key ON recent (key);
             CREATE TABLE IF NOT EXISTS members (
                 group_id TEXT NOT NULL, relationship TEXT NOT NULL, member_id TEXT NOT NULL,
                 member_type TEXT NOT NULL, seen_round INTEGER NOT NULL,
                 PRIMARY KEY (group_id, relationship, member_id)) WITHOUT ROWID;
             -- Batches handed to the sink and not yet committed (see the
             -- module docs): a CheckpointRecord and length-delimited events.
             CREATE TABLE IF NOT EXISTS outbox (
                 seq INTEGER PRIMARY KEY, record BLOB NOT NULL, events BLOB NOT NULL);",
        )?;
        let version: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match version.as_deref() {
            None => {
                self.conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1), ('stream', ?2)",
                    params![SCHEMA_VERSION, self.stream],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            // Version 1 lacked `recent`, created above.
            Some("1") => {
                self.conn.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(other) => {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "schema version {other} is not supported by this graphdelta (expects {SCHEMA_VERSION})"
                )));
            }
        }
        Ok(())
    }

    /// Checkpoints the WAL on a thread of its own ([`Checkpointer`]) once a
    /// commit leaves `every` pages in it, instead of SQLite's checkpoints
    /// in the commit. If the thread cannot start (or this fails), SQLite's
    /// stay.
    fn checkpoint_in_background(&mut self, every: i64) -> rusqlite::Result<()> {
        self.stop_checkpointer();
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_size_limit", WAL_KEPT_BYTES)?;
        // A checkpoint copies frames page by page, past the page cache.
        conn.pragma_update(None, "cache_size", -64)?;
        // Whether the WAL was `WAL_BEHIND` checkpoints' worth long.
        let (ask, asked) = std::sync::mpsc::sync_channel::<bool>(1);
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let own_runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (counted, counted_own, path) = (runs.clone(), own_runs.clone(), self.path.clone());
        let started = std::thread::Builder::new()
            .name("graphdelta-wal".into())
            .spawn(move || {
                let mut conn = conn;
                let mut priority = crate::background::Yielding::new(WAL_BEHIND_OWN_PRIORITY);
                // Ends when the writer removes its hook (the last sender).
                while let Ok(behind) = asked.recv() {
                    if behind {
                        priority.fell_behind();
                    }
                    // Each on a thread of its own: one at the lower priority
                    // cannot be raised back (`crate::background`).
                    let next = priority.next_run();
                    if next == crate::background::Priority::Same {
                        counted_own.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let done;
                    (conn, done) = crate::background::on_own_thread(
                        "graphdelta-wal",
                        next,
                        move || {
                            let done =
                                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                            (conn, done)
                        },
                    );
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = done {
                        tracing::warn!(path = %path.display(), error = %e, "Copying the store's WAL into its database failed; tried again after a later commit.");
                    }
                }
            });
        let Ok(thread) = started else {
            return Ok(());
        };
        let pages = std::os::raw::c_int::try_from(every).unwrap_or(std::os::raw::c_int::MAX);
        // Replaces SQLite's own checkpoints (`wal_autocheckpoint`).
        self.conn
            .wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, in_wal| {
                if let Some(behind) = wal_request(in_wal, pages) {
                    // Full: one is asked for already.
                    let _ = ask.try_send(behind);
                }
                Ok(())
            }))?;
        self.checkpointer = Some(Checkpointer {
            thread,
            every,
            runs,
            own_runs,
        });
        Ok(())
    }

    /// Stops the checkpointer, if any (its running checkpoint finishes).
    fn stop_checkpointer(&mut self) {
        if let Some(c) = self.checkpointer.take() {
            // Drops the hook and, with it, the thread's last sender.
            let _ = self.conn.wal_hook(None::<WalHook>);
            let _ = c.thread.join();
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> CheckpointError {
        let message = e.to_string();
        let hint = hint(&message, None);
        CheckpointError {
            path: self.path.clone(),
            message: format!("{message}{hint}"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stream's checkpoint, if it has one.
    pub fn load_checkpoint(&self) -> Result<Option<StreamCheckpoint>, CheckpointError> {
        let data: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT data FROM checkpoint WHERE stream = ?1")
            .and_then(|mut s| s.query_row([&self.stream], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))?;
        data.map(|d| {
            StreamCheckpoint::decode(d.as_slice())
                .map_err(|e| self.err(format!("checkpoint record is corrupt: {e}")))
        })
        .transpose()
    }

    /// What is remembered of an object.
    pub fn object(&self, id: &str) -> Result<Option<ObjectState>, CheckpointError> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT seen_round, state FROM objects WHERE key = ?1 AND id = ?2
                 UNION ALL
                 SELECT seen_round, state FROM recent WHERE key = ?1 AND id = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![object_key(id), id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        row.map(|(seen, blob)| self.decode_state(seen, &blob))
            .transpose()
    }

    /// What is remembered of several objects, in few queries; ids without
    /// a row are absent from the result.
    pub fn objects(
        &self,
        ids: &[&str],
    ) -> Result<std::collections::HashMap<String, ObjectState>, CheckpointError> {
        let mut found = std::collections::HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let sql = &lookup_sql()[chunk.len()];
            let keys: Vec<i64> = chunk.iter().map(|id| object_key(id)).collect();
            let wanted: std::collections::HashSet<&str> = chunk.iter().copied().collect();
            let rows: Vec<(String, i64, Vec<u8>)> = self
                .conn
                .prepare_cached(sql)
                .and_then(|mut s| {
                    s.query_map(rusqlite::params_from_iter(keys.iter()), |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect()
                })
                .map_err(|e| self.err(e))?;
            for (id, seen, blob) in rows {
                // Equal hashes of different ids are possible, if unlikely.
                if wanted.contains(id.as_str()) {
                    let state = self.decode_state(seen, &blob)?;
                    found.insert(id, state);
                }
            }
        }
        Ok(found)
    }

    /// Whether the memory has no objects, and no memberships.
    pub fn is_empty(&self) -> Result<(bool, bool), CheckpointError> {
        self.conn
            .query_row(
                "SELECT NOT EXISTS (SELECT 1 FROM objects) AND NOT EXISTS (SELECT 1 FROM recent),
                        NOT EXISTS (SELECT 1 FROM members)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))
    }

    fn decode_state(&self, seen_round: i64, blob: &[u8]) -> Result<ObjectState, CheckpointError> {
        let mut state = ObjectState::decode(blob)
            .map_err(|e| self.err(format!("object state is corrupt: {e}")))?;
        if seen_round != TOMBSTONE_ROUND {
            state.seen_round = seen_round as u64;
        }
        Ok(state)
    }

    /// What is remembered of a membership.
    pub fn member(&self, key: &MemberKey) -> Result<Option<MemberRow>, CheckpointError> {
        self.conn
            .prepare_cached(
                "SELECT member_type, seen_round FROM members
                 WHERE group_id = ?1 AND relationship = ?2 AND member_id = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![key.group, key.relationship, key.member], |r| {
                    Ok(MemberRow {
                        member_type: r.get(0)?,
                        seen_round: r.get::<_, i64>(1)? as u64,
                    })
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// Applies a batch's state writes and its checkpoint in one transaction
    /// (after the mirror, if any, holds them).
    pub fn commit(
        &mut self,
        checkpoint: &StreamCheckpoint,
        writes: &StateWrites,
    ) -> Result<(), CheckpointError> {
        if let Some(mut mirror) = self.mirror.take() {
            let mirrored = mirror.before_commit(self, checkpoint, writes);
            self.mirror = Some(mirror);
            mirrored.map_err(|e| self.err(e))?;
        }
        self.commit_inner(checkpoint, writes)
            .map_err(|e| self.err(e))
    }

    /// Every later commit goes to `mirror` first.
    pub fn set_mirror(&mut self, mirror: Box<dyn CommitMirror>) {
        self.mirror = Some(mirror);
    }

    /// The stream this store belongs to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Every remembered membership of `group` (any relationship).
    pub fn members_of(&self, group: &str) -> Result<Vec<MemberKey>, CheckpointError> {
        self.conn
            .prepare_cached("SELECT relationship, member_id FROM members WHERE group_id = ?1")
            .and_then(|mut s| {
                s.query_map([group], |r| {
                    Ok(MemberKey {
                        group: group.to_string(),
                        relationship: r.get(0)?,
                        member: r.get(1)?,
                    })
                })?
                .collect()
            })
            .map_err(|e| self.err(e))
    }

    fn commit_inner(
        &mut self,
        checkpoint: &StreamCheckpoint,
        writes: &StateWrites,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        // Rows in `objects` and in `recent` once this commits.
        let (mut objects, mut recent) = (self.objects, self.recent);
        // Where this commit's first sightings go (module docs).
        let into_recent = objects + recent >= self.direct_rows;
        {
            let mut forget = tx.prepare_cached("DELETE FROM members WHERE group_id = ?1")?;
            for group in &writes.forgotten_groups {
                forget.execute([group])?;
            }
            let mut update = tx.prepare_cached(
                "UPDATE OR FAIL objects SET seen_round = ?3, state = ?4 WHERE key = ?1 AND id = ?2",
            )?;
            let mut update_recent = tx.prepare_cached(
                "UPDATE OR FAIL recent SET seen_round = ?3, state = ?4 WHERE key = ?1 AND id = ?2",
            )?;
            let mut insert = tx.prepare_cached(&insert_sql(into_recent)[1])?;
            let mut delete = tx.prepare_cached("DELETE FROM objects WHERE key = ?1 AND id = ?2")?;
            let mut delete_recent =
                tx.prepare_cached("DELETE FROM recent WHERE key = ?1 AND id = ?2")?;
            // Rows inserted by this commit.
            let mut fresh_rows = 0;
            // First sightings have no row: inserted in multi-row statements,
            // which saves most of SQLite's per-statement work. Their states
            // are encoded one after another into the store's buffer, kept
            // from commit to commit: a vector per state, alive until the
            // inserts, was ≈ 12% of a 100k-user sync's page faults.
            let mut fresh: Vec<(i64, &str, i64, Range<usize>)> =
                Vec::with_capacity(writes.new_objects.len());
            let states = &mut self.states;
            states.clear();
            for (id, state) in &writes.objects {
                match state {
                    Some(state) => {
                        let start = states.len();
                        append_stored_state(state, states);
                        // Tombstones are never stale: reconciliation skips them.
                        let seen = if state.hard_deleted {
                            TOMBSTONE_ROUND
                        } else {
                            state.seen_round as i64
                        };
                        let key = object_key(id);
                        if writes.new_objects.contains(id) {
                            fresh.push((key, id, seen, start..states.len()));
                            continue;
                        }
                        let buf = &states[start..];
                        if update.execute(params![key, id, seen, buf])? == 0
                            && update_recent.execute(params![key, id, seen, buf])? == 0
                        {
                            insert.execute(params![key, id, seen, buf])?;
                            fresh_rows += 1;
                        }
                        states.truncate(start);
                    }
                    None => {
                        let key = object_key(id);
                        let deleted = delete.execute(params![key, id])?;
                        objects = objects.saturating_sub(deleted);
                        if deleted == 0 {
                            let deleted = delete_recent.execute(params![key, id])?;
                            recent = recent.saturating_sub(deleted);
                        }
                    }
                }
            }
            // In key order, each leaf of the key index is visited once per
            // commit: once the index outgrows the page cache, random order
            // read and spilled leaves again and again (300k users: 206k →
            // 146k `pread`s, 325k → 260k `pwrite`s).
            fresh.sort_unstable_by_key(|row| row.0);
            for rows in fresh.chunks(INSERT_CHUNK) {
                let mut many = tx.prepare_cached(&insert_sql(into_recent)[rows.len()])?;
                let blobs: Vec<&[u8]> = rows.iter().map(|row| &states[row.3.clone()]).collect();
                let params: Vec<&dyn rusqlite::ToSql> = rows
                    .iter()
                    .zip(&blobs)
                    .flat_map(|((key, id, seen, _), blob)| {
                        [
                            key as &dyn rusqlite::ToSql,
                            id as &dyn rusqlite::ToSql,
                            seen as &dyn rusqlite::ToSql,
                            blob as &dyn rusqlite::ToSql,
                        ]
                    })
                    .collect();
                many.execute(params.as_slice())?;
            }
            fresh_rows += fresh.len();
            if into_recent {
                recent += fresh_rows;
            } else {
                objects += fresh_rows;
            }
            // Before inferred deletions are looked for, all rows are in
            // `objects` (`stale_objects`, `stale_members` read only it).
            if recent >= self.merge_rows || (recent > 0 && checkpoint.phase() == Phase::Reconcile) {
                // In key order: each leaf of `objects_by_key` is visited once.
                // `OR FAIL`, as the inserts above: no statement journal (at
                // 1M users it copied each merge's ≈ 14 MB of index leaves to
                // a temporary file first; `perf`: 1.2% of the samples).
                tx.execute_batch(
                    "INSERT OR FAIL INTO objects (key, id, seen_round, state)
                         SELECT key, id, seen_round, state FROM recent ORDER BY key;
                     DELETE FROM recent;",
                )?;
                objects += recent;
                recent = 0;
            }
            let mut put_member = tx.prepare_cached(
                "INSERT OR REPLACE INTO members (group_id, relationship, member_id, member_type, seen_round)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut delete_member = tx.prepare_cached(
                "DELETE FROM members WHERE group_id = ?1 AND relationship = ?2 AND member_id = ?3",
            )?;
            for (key, row) in &writes.members {
                match row {
                    Some(row) => {
                        put_member.execute(params![
                            key.group,
                            key.relationship,
                            key.member,
                            row.member_type,
                            row.seen_round as i64
                        ])?;
                    }
                    None => {
                        delete_member.execute(params![key.group, key.relationship, key.member])?;
                    }
                }
            }
            tx.prepare_cached("INSERT OR REPLACE INTO checkpoint (stream, data) VALUES (?1, ?2)")?
                .execute(params![self.stream, checkpoint.encode_to_vec()])?;
            tx.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?
                .execute([checkpoint.batch_seq as i64])?;
        }
        crate::failpoint::hit("committing");
        tx.commit()?;
        (self.objects, self.recent) = (objects, recent);
        if self.states.capacity() > KEPT_STATES_BYTES {
            self.states = Vec::new();
        }
        if let Some(log) = &self.outbox {
            lock(log).committed(checkpoint.batch_seq);
        }
        Ok(())
    }

    /// A handle that records batches in the outbox without this store:
    /// a commit may hold the store on another thread meanwhile.
    pub fn outbox_writer(&mut self) -> Result<OutboxWriter, CheckpointError> {
        self.outbox_log().map(OutboxWriter)
    }

    /// The stream's outbox, opened on first use.
    fn outbox_log(&mut self) -> Result<Arc<Mutex<outbox::OutboxLog>>, CheckpointError> {
        if self.outbox.is_none() {
            let dir = outbox_dir(&self.path);
            let log = outbox::OutboxLog::open(&dir)
                .map_err(|e| io_error(dir, "cannot read the outbox", &e))?;
            self.outbox = Some(Arc::new(Mutex::new(log)));
        }
        Ok(self.outbox.clone().expect("opened above"))
    }

    /// The outbox: the batches after the committed checkpoint, oldest
    /// first. Rows of the `outbox` table, where versions before the outbox
    /// files recorded them, come first (a commit deletes those it covers).
    pub fn outbox(&mut self) -> Result<Vec<PendingBatch>, CheckpointError> {
        let mut rows: BTreeMap<u64, (Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT seq, record, events FROM outbox ORDER BY seq")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, (r.get(1)?, r.get(2)?)))
                })?
                .collect()
            })
            .map_err(|e| self.err(e))?;
        let committed = self.load_checkpoint()?.map_or(0, |c| c.batch_seq);
        let log = self.outbox_log()?;
        let log = lock(&log);
        let recorded = log
            .pending(committed)
            .map_err(|e| io_error(log.dir().to_path_buf(), "cannot read the outbox", &e))?;
        rows.extend(
            recorded
                .into_iter()
                .map(|(seq, entry)| (seq, (entry.record, entry.events))),
        );
        rows.into_values()
            .map(|(record, events)| {
                let corrupt = |e: prost::DecodeError| self.err(format!("corrupt outbox row: {e}"));
                let record = CheckpointRecord::decode(record.as_slice()).map_err(corrupt)?;
                let encoding = record.events_encoding();
                let decoded = crate::sink::decode_events(encoding, &events)
                    .map_err(|e| self.err(format!("corrupt outbox row: {e}")))?;
                Ok(PendingBatch {
                    checkpoint: record.checkpoint.unwrap_or_default(),
                    writes: StateWrites::from_proto(
                        record.state.unwrap_or_else(BatchState::default),
                    ),
                    events: decoded,
                    encoded: events,
                    encoding,
                })
            })
            .collect()
    }

    /// Known objects not returned by full round `round`, in storage order
    /// after the cursor `after` (0 to start): the candidates for inferred
    /// deletion, each with its cursor. Reads `objects` only: once a
    /// checkpoint of phase `Reconcile` is committed, `recent` is empty.
    pub fn stale_objects(
        &self,
        round: u64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, ObjectState)>, CheckpointError> {
        let rows: Vec<(i64, String, i64, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT rowid, id, seen_round, state FROM objects
                 WHERE seen_round < ?1 AND rowid > ?2 ORDER BY rowid LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![round as i64, after, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(cursor, id, seen, blob)| Ok((cursor, id, self.decode_state(seen, &blob)?)))
            .collect()
    }

    /// Memberships of groups returned by full round `round` that the round
    /// did not list, for the given relationships, grouped by group id (at
    /// most `limit` rows, groups after `after_group`). Like
    /// [`Store::stale_objects`], for the `Reconcile` phase.
    pub fn stale_members(
        &self,
        round: u64,
        relationships: &[&str],
        after_group: &str,
        limit: usize,
    ) -> Result<Vec<(MemberKey, MemberRow)>, CheckpointError> {
        let mut out = Vec::new();
        for relationship in relationships {
            let rows: Vec<(MemberKey, MemberRow)> = self
                .conn
                .prepare_cached(
                    "SELECT m.group_id, m.member_id, m.member_type, m.seen_round
                     FROM members m JOIN objects o ON o.key = xxh3_key(m.group_id) AND o.id = m.group_id
                     WHERE m.relationship = ?1 AND o.seen_round = ?2 AND m.seen_round < ?2
                       AND m.group_id > ?3
                     ORDER BY m.group_id, m.member_id LIMIT ?4",
                )
                .and_then(|mut s| {
                    s.query_map(
                        params![relationship, round as i64, after_group, limit as i64],
                        |r| {
                            Ok((
                                MemberKey {
                                    group: r.get(0)?,
                                    relationship: relationship.to_string(),
                                    member: r.get(1)?,
                                },
                                MemberRow {
                                    member_type: r.get(2)?,
                                    seen_round: r.get::<_, i64>(3)? as u64,
                                },
                            ))
                        },
                    )?
                    .collect()
                })
                .map_err(|e| self.err(e))?;
            out.extend(rows);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Number of remembered objects (live or soft-deleted; tombstones of
    /// hard-deleted ones not counted).
    pub fn object_count(&self) -> Result<u64, CheckpointError> {
        self.conn
            .query_row(
                "SELECT (SELECT count(*) FROM objects WHERE seen_round < ?1)
                      + (SELECT count(*) FROM recent WHERE seen_round < ?1)",
                [TOMBSTONE_ROUND],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Every remembered object, in id order (for `replay --verify`).
    pub fn for_each_object(
        &self,
        mut f: impl FnMut(&str, &ObjectState),
    ) -> Result<(), CheckpointError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, seen_round, state FROM objects
                 UNION ALL
                 SELECT id, seen_round, state FROM recent ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(row) = rows.next().map_err(|e| self.err(e))? {
            let id: String = row.get(0).map_err(|e| self.err(e))?;
            let seen: i64 = row.get(1).map_err(|e| self.err(e))?;
            let blob: Vec<u8> = row.get(2).map_err(|e| self.err(e))?;
            let state = self.decode_state(seen, &blob)?;
            f(&id, &state);
        }
        Ok(())
    }

    /// Every remembered membership of `relationship`, ordered by group.
    pub fn for_each_member(
        &self,
        relationship: &str,
        mut f: impl FnMut(&str, &str),
    ) -> Result<(), CheckpointError> {
        let mut stmt = self
            .conn
            .prepare("SELECT group_id, member_id FROM members WHERE relationship = ?1 ORDER BY group_id, member_id")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([relationship]).map_err(|e| self.err(e))?;
        while let Some(row) = rows.next().map_err(|e| self.err(e))? {
            let g: String = row.get(0).map_err(|e| self.err(e))?;
            let m: String = row.get(1).map_err(|e| self.err(e))?;
            f(&g, &m);
        }
        Ok(())
    }
}

/// `xxh3_key(text)`: [`object_key`] inside SQL (joins from memberships).
fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "xxh3_key",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| Ok(object_key(&ctx.get::<String>(0)?)),
    )
}

/// Forgets a stream entirely: removes its store files.
pub fn reset(dir: &Path, stream: &str) -> Result<bool, CheckpointError> {
    let path = store_path(dir, stream);
    let existed = path.exists();
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CheckpointError {
                    path: p,
                    message: format!("cannot remove: {e}"),
                });
            }
        }
    }
    let outbox = outbox_dir(&path);
    match std::fs::remove_dir_all(&outbox) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(outbox, "cannot remove", &e)),
    }
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::Phase;

    #[test]
    fn a_stored_state_is_prost_s_encoding_without_its_seen_round() {
        let states = [
            ObjectState::default(),
            ObjectState {
                version: 3,
                soft_deleted: true,
                seen_round: 9,
                property_hashes: vec![1, 2, u64::MAX, 4],
                object_type: "microsoft.graph.group".into(),
                hard_deleted: false,
            },
            ObjectState {
                version: 7,
                seen_round: 12,
                hard_deleted: true,
                ..Default::default()
            },
        ];
        for state in states {
            let expected = ObjectState {
                seen_round: if state.hard_deleted {
                    state.seen_round
                } else {
                    0
                },
                ..state.clone()
            };
            assert_eq!(stored_state(&state), expected.encode_to_vec(), "{state:?}");
        }
    }

    fn state(v: u64, seen: u64) -> ObjectState {
        ObjectState {
            version: v,
            seen_round: seen,
            property_hashes: vec![1, 2],
            ..Default::default()
        }
    }

    #[test]
    fn commit_is_atomic_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "users").unwrap();
        assert!(s.load_checkpoint().unwrap().is_none());
        let mut w = StateWrites::default();
        w.objects.insert("a".into(), Some(state(1, 1)));
        w.objects.insert("b".into(), Some(state(2, 1)));
        let key = MemberKey {
            group: "a".into(),
            relationship: "members".into(),
            member: "b".into(),
        };
        w.members.insert(
            key.clone(),
            Some(MemberRow {
                member_type: "microsoft.graph.user".into(),
                seen_round: 1,
            }),
        );
        let cp = StreamCheckpoint {
            stream: "users".into(),
            phase: Phase::Initial as i32,
            link: "https://graph/next".into(),
            round: 1,
            batch_seq: 1,
            ..Default::default()
        };
        s.commit(&cp, &w).unwrap();
        drop(s);
        let s = Store::open(dir.path(), "users").unwrap();
        assert_eq!(s.load_checkpoint().unwrap().unwrap(), cp);
        assert_eq!(s.object("a").unwrap().unwrap(), state(1, 1));
        assert_eq!(s.member(&key).unwrap().unwrap().seen_round, 1);
        assert_eq!(s.object_count().unwrap(), 2);
    }

    /// Updates, first sightings and deletions in one commit, in the maps'
    /// order: each row gets its own state (the states share one buffer,
    /// kept from commit to commit).
    #[test]
    fn one_commit_writes_each_object_its_own_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "users").unwrap();
        let varied = |i: u64, round: u64| ObjectState {
            version: i,
            seen_round: round,
            property_hashes: (0..i % 7).collect(),
            object_type: "#microsoft.graph.user".repeat(i as usize % 3),
            ..Default::default()
        };
        let checkpoint = |seq: u64| StreamCheckpoint {
            stream: "users".into(),
            batch_seq: seq,
            ..Default::default()
        };
        let mut first = StateWrites::default();
        for i in 0..200 {
            first.objects.insert(format!("u{i}"), Some(varied(i, 1)));
            first.new_objects.insert(format!("u{i}"));
        }
        s.commit(&checkpoint(1), &first).unwrap();
        // Even objects updated, every third one deleted, 200 new ones.
        let mut second = StateWrites::default();
        for i in 0..200u64 {
            if i % 3 == 0 {
                second.objects.insert(format!("u{i}"), None);
            } else if i % 2 == 0 {
                second
                    .objects
                    .insert(format!("u{i}"), Some(varied(i + 1000, 2)));
            }
        }
        for i in 200..400 {
            second.objects.insert(format!("u{i}"), Some(varied(i, 2)));
            second.new_objects.insert(format!("u{i}"));
        }
        s.commit(&checkpoint(2), &second).unwrap();
        for i in 0..400u64 {
            let expected = if i >= 200 {
                Some(varied(i, 2))
            } else if i % 3 == 0 {
                None
            } else if i % 2 == 0 {
                Some(varied(i + 1000, 2))
            } else {
                Some(varied(i, 1))
            };
            assert_eq!(s.object(&format!("u{i}")).unwrap(), expected, "u{i}");
        }
    }

    fn rows_in(s: &Store, table: &str) -> i64 {
        s.conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// First sightings wait in `recent` and move into `objects` every
    /// `merge_rows` rows and at the `Reconcile` commit; every read sees
    /// both tables, and updates and deletions find rows in either.
    #[test]
    fn first_sightings_move_into_objects_and_are_found_in_both() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "users").unwrap();
        (s.direct_rows, s.merge_rows) = (0, 10);
        let checkpoint = |seq: u64, phase: Phase| StreamCheckpoint {
            stream: "users".into(),
            batch_seq: seq,
            phase: phase as i32,
            ..Default::default()
        };
        let fresh = |range: std::ops::Range<u64>| {
            let mut w = StateWrites::default();
            for i in range {
                w.objects.insert(format!("u{i}"), Some(state(i, 1)));
                w.new_objects.insert(format!("u{i}"));
            }
            w
        };
        let all_found = |s: &Store, n: u64, changed: &dyn Fn(u64) -> Option<ObjectState>| {
            let ids: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let found = s.objects(&refs).unwrap();
            let mut listed = Vec::new();
            s.for_each_object(|id, st| listed.push((id.to_string(), st.clone())))
                .unwrap();
            for i in 0..n {
                let expected = changed(i);
                let id = format!("u{i}");
                assert_eq!(s.object(&id).unwrap(), expected, "{id}");
                assert_eq!(found.get(&id), expected.as_ref(), "{id}");
                assert_eq!(
                    listed.iter().find(|(l, _)| *l == id).map(|(_, st)| st),
                    expected.as_ref(),
                    "{id}"
                );
            }
            assert!(listed.is_sorted_by(|a, b| a.0 < b.0));
            assert_eq!(listed.len() as u64, s.object_count().unwrap());
        };
        s.commit(&checkpoint(1, Phase::Initial), &fresh(0..8))
            .unwrap();
        assert_eq!((rows_in(&s, "recent"), rows_in(&s, "objects")), (8, 0));
        assert!(!s.is_empty().unwrap().0);
        all_found(&s, 8, &|i| Some(state(i, 1)));
        s.commit(&checkpoint(2, Phase::Initial), &fresh(8..16))
            .unwrap();
        assert_eq!((rows_in(&s, "recent"), rows_in(&s, "objects")), (0, 16));
        s.commit(&checkpoint(3, Phase::Initial), &fresh(16..20))
            .unwrap();
        assert_eq!((rows_in(&s, "recent"), rows_in(&s, "objects")), (4, 16));
        // Updated and deleted, in either table; one object never seen is
        // written without being marked new (it goes to `recent`).
        let mut w = StateWrites::default();
        for i in [3, 17] {
            w.objects.insert(format!("u{i}"), Some(state(100 + i, 2)));
        }
        for i in [4, 18] {
            w.objects.insert(format!("u{i}"), None);
        }
        w.objects.insert("u20".into(), Some(state(20, 2)));
        s.commit(&checkpoint(4, Phase::Initial), &w).unwrap();
        assert_eq!((rows_in(&s, "recent"), rows_in(&s, "objects")), (4, 15));
        let changed = |i: u64| match i {
            3 | 17 => Some(state(100 + i, 2)),
            4 | 18 => None,
            20 => Some(state(20, 2)),
            _ => Some(state(i, 1)),
        };
        all_found(&s, 21, &changed);
        // The count survives reopening: 4 rows + 6 fresh reach 10.
        drop(s);
        let mut s = Store::open(dir.path(), "users").unwrap();
        (s.direct_rows, s.merge_rows) = (0, 10);
        s.commit(&checkpoint(5, Phase::Initial), &fresh(21..27))
            .unwrap();
        assert_eq!((rows_in(&s, "recent"), rows_in(&s, "objects")), (0, 25));
        s.commit(&checkpoint(6, Phase::Initial), &fresh(27..28))
            .unwrap();
        assert_eq!(rows_in(&s, "recent"), 1);
        // The round's last commit empties `recent`: inferred deletions see
        // every object the round did not return.
        s.commit(&checkpoint(7, Phase::Reconcile), &StateWrites::default())
            .unwrap();
        assert_eq!((rows_in(&s, "recent"), rows_in(&s, "objects")), (0, 26));
        let stale = s.stale_objects(2, 0, 100).unwrap();
        assert_eq!(stale.len(), 23, "all but u3, u17, u20 (round 2) of 26");
        all_found(&s, 28, &|i| {
            if i >= 21 {
                Some(state(i, 1))
            } else {
                changed(i)
            }
        });
    }

    /// A small store takes first sightings straight into `objects`; past
    /// `direct_rows` objects (counted again when reopened) into `recent`.
    #[test]
    fn first_sightings_go_straight_into_a_small_store() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = |range: std::ops::Range<u64>| {
            let mut w = StateWrites::default();
            for i in range {
                w.objects.insert(format!("u{i}"), Some(state(i, 1)));
                w.new_objects.insert(format!("u{i}"));
            }
            w
        };
        let cp = StreamCheckpoint::default();
        let mut s = Store::open(dir.path(), "users").unwrap();
        (s.direct_rows, s.merge_rows) = (10, 100);
        s.commit(&cp, &fresh(0..8)).unwrap();
        assert_eq!((rows_in(&s, "objects"), rows_in(&s, "recent")), (8, 0));
        // 8 < 10 before this commit: all of it still goes straight in.
        s.commit(&cp, &fresh(8..16)).unwrap();
        assert_eq!((rows_in(&s, "objects"), rows_in(&s, "recent")), (16, 0));
        s.commit(&cp, &fresh(16..20)).unwrap();
        assert_eq!((rows_in(&s, "objects"), rows_in(&s, "recent")), (16, 4));
        // Deleting 7 leaves 13 rows (9 in `objects`): still past 10 after
        // reopening.
        let mut w = StateWrites::default();
        for i in 0..7 {
            w.objects.insert(format!("u{i}"), None);
        }
        s.commit(&cp, &w).unwrap();
        drop(s);
        let mut s = Store::open(dir.path(), "users").unwrap();
        (s.direct_rows, s.merge_rows) = (10, 100);
        assert_eq!((s.objects, s.recent), (9, 4));
        s.commit(&cp, &fresh(20..22)).unwrap();
        assert_eq!((rows_in(&s, "objects"), rows_in(&s, "recent")), (9, 6));
        for i in 7..22 {
            assert_eq!(s.object(&format!("u{i}")).unwrap(), Some(state(i, 1)));
        }
    }

    /// A store of schema version 1 (no `recent`) is read as it is by a
    /// read-only connection and upgraded by the connector.
    #[test]
    fn a_version_1_store_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(store_path(dir.path(), "users")).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
                 CREATE TABLE checkpoint (stream TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
                 CREATE TABLE objects (key INTEGER NOT NULL, id TEXT NOT NULL,
                     seen_round INTEGER NOT NULL, state BLOB NOT NULL);
                 CREATE INDEX objects_by_key ON objects (key);
                 CREATE TABLE members (group_id TEXT NOT NULL, relationship TEXT NOT NULL,
                     member_id TEXT NOT NULL, member_type TEXT NOT NULL, seen_round INTEGER NOT NULL,
                     PRIMARY KEY (group_id, relationship, member_id)) WITHOUT ROWID;
                 CREATE TABLE outbox (seq INTEGER PRIMARY KEY, record BLOB NOT NULL, events BLOB NOT NULL);
                 INSERT INTO meta VALUES ('schema_version', '1'), ('stream', 'users');",
            )
            .unwrap();
            conn.execute(
                "INSERT INTO objects VALUES (?1, 'a', 1, ?2)",
                params![object_key("a"), stored_state(&state(7, 1))],
            )
            .unwrap();
        }
        let read = Store::open_read_only(dir.path(), "users").unwrap().unwrap();
        assert_eq!(read.object("a").unwrap(), Some(state(7, 1)));
        assert_eq!(read.object_count().unwrap(), 1);
        drop(read);
        let s = Store::open(dir.path(), "users").unwrap();
        let version: String = s
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(rows_in(&s, "recent"), 0);
        assert_eq!(s.objects(&["a", "b"]).unwrap().len(), 1);
    }

    fn sample_events() -> Vec<ChangeEvent> {
        let props = serde_json::json!({"displayName": "Ann \"A\"", "n": 3, "ok": true, "x": null});
        vec![
            ChangeEvent {
                event_id: "e1".into(),
                object_id: "a".into(),
                change_type: crate::proto::v1::ChangeType::Created as i32,
                properties: Some(crate::proto::JsonStruct::from(
                    props.as_object().unwrap().clone(),
                )),
                changed_properties: vec!["displayName".into()],
                object_version: 1,
                ..Default::default()
            },
            ChangeEvent {
                event_id: "e2".into(),
                object_id: "b".into(),
                change_type: crate::proto::v1::ChangeType::HardDeleted as i32,
                object_version: 4,
                ..Default::default()
            },
        ]
    }

    /// The WAL is checkpointed every 40,000 KiB and cut back to 64 MiB;
    /// a new store has 16 KiB pages, one that exists keeps its own.
    #[test]
    fn the_wal_is_checkpointed_in_large_steps_and_cut_back() {
        let dir = tempfile::tempdir().unwrap();
        let pragma = |s: &Store, name: &str| -> i64 {
            s.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .unwrap()
        };
        let s = Store::open(dir.path(), "users").unwrap();
        assert_eq!(pragma(&s, "page_size"), 16 << 10);
        // SQLite's own checkpoints are off: the checkpointer's replace them.
        assert_eq!(pragma(&s, "wal_autocheckpoint"), 0);
        assert_eq!(s.checkpointer.as_ref().unwrap().every, 2_500);
        assert_eq!(pragma(&s, "journal_size_limit"), 64 << 20);
        drop(s);
        let s = Store::open(dir.path(), "users").unwrap();
        assert_eq!(pragma(&s, "page_size"), 16 << 10);

        // A store made with SQLite's default pages (as before 16 KiB).
        let path = store_path(dir.path(), "groups");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x);")
            .unwrap();
        let s = Store::open(dir.path(), "groups").unwrap();
        assert_eq!(pragma(&s, "page_size"), 4096);
        assert_eq!(s.checkpointer.as_ref().unwrap().every, 10_000);
    }

    /// The checkpointer copies the WAL once a commit leaves enough pages in
    /// it, with no commit waiting; the store closes as before, its WAL
    /// copied into the database and removed.
    #[test]
    fn the_wal_is_checkpointed_on_a_thread_of_its_own() {
        assert_eq!(
            [23, 24, 71, 72, 1000].map(|pages| wal_request(pages, 24)),
            [None, Some(false), Some(false), Some(true), Some(true)]
        );
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "users").unwrap();
        s.checkpoint_in_background(24).unwrap();
        let (runs, own_runs) = {
            let c = s.checkpointer.as_ref().unwrap();
            (c.runs.clone(), c.own_runs.clone())
        };
        let runs = || runs.load(std::sync::atomic::Ordering::Relaxed);
        let cp = StreamCheckpoint::default();
        let mut w = StateWrites::default();
        w.objects.insert("small".into(), Some(state(1, 1)));
        s.commit(&cp, &w).unwrap();
        // A commit that leaves few pages asks for nothing.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(runs(), 0);
        let mut w = StateWrites::default();
        for i in 0..30_000 {
            w.objects.insert(format!("u{i}"), Some(state(i, 1)));
            w.new_objects.insert(format!("u{i}"));
        }
        s.commit(&cp, &w).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while runs() == 0 {
            assert!(std::time::Instant::now() < deadline, "no checkpoint ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        // That commit left far more than three checkpoints' worth: the
        // checkpointer was behind, and ran at the writer's priority.
        assert_eq!(own_runs.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Everything was copied: a checkpoint now finds nothing left.
        let (busy, log, copied): (i64, i64, i64) = s
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log), (0, copied));
        let wal = dir.path().join("users.sqlite3-wal");
        assert!(wal.exists());
        drop(s);
        assert!(!wal.exists(), "the writer closed last and removed its WAL");
        let s = Store::open(dir.path(), "users").unwrap();
        assert_eq!(s.object("u29999").unwrap(), Some(state(29999, 1)));
        assert_eq!(s.object("small").unwrap(), Some(state(1, 1)));
    }

    /// The record is encoded without a `BatchState`, as prost encodes one
    /// but for the order of the objects (the maps' order, not the ids').
    #[test]
    fn records_are_encoded_as_prost_encodes_them() {
        use crate::normalize::memory::{MemberKey, MemberRow};
        let mut w = StateWrites::default();
        let cp = StreamCheckpoint {
            stream: "groups".into(),
            batch_seq: 300,
            link: "https://graph.microsoft.com/v1.0/groups/delta?$skiptoken=x".into(),
            ..Default::default()
        };
        let check = |w: &StateWrites| {
            for encoding in [EventsEncoding::JsonLines, EventsEncoding::ProtobufDelimited] {
                let prost = CheckpointRecord {
                    checkpoint: Some(cp.clone()),
                    state: Some(w.to_proto()),
                    events_encoding: encoding as i32,
                }
                .encode_to_vec();
                let mut ours = Vec::new();
                encode_record(&cp, w, encoding, &mut ours);
                assert_eq!(ours.len(), prost.len());
                let mut decoded = CheckpointRecord::decode(&ours[..]).unwrap();
                if let Some(state) = &mut decoded.state {
                    state.objects.sort_by(|a, b| a.id.cmp(&b.id));
                }
                assert_eq!(decoded.encode_to_vec(), prost);
            }
        };
        check(&w);
        for i in 0..40u64 {
            let mut st = state(i, i * 7);
            st.object_type = if i % 3 == 0 {
                String::new()
            } else {
                "microsoft.graph.group".into()
            };
            st.hard_deleted = i % 5 == 0;
            st.soft_deleted = i % 4 == 1;
            st.property_hashes = (0..i % 6).collect();
            w.objects
                .insert(format!("id-{i:03}"), (i % 7 != 0).then_some(st));
        }
        w.objects
            .insert(String::new(), Some(ObjectState::default()));
        w.forgotten_groups
            .extend(["g9".to_string(), String::new(), "g1".to_string()]);
        for i in 0..30u64 {
            let key = MemberKey {
                group: format!("g{}", i % 4),
                relationship: if i % 2 == 0 {
                    "members".into()
                } else {
                    String::new()
                },
                member: format!("m{i}"),
            };
            let row = (i % 3 != 0).then(|| MemberRow {
                member_type: if i % 5 == 0 {
                    String::new()
                } else {
                    "microsoft.graph.user".into()
                },
                seen_round: i % 4,
            });
            w.members.insert(key, row);
        }
        check(&w);
    }

    /// A batch recorded in either encoding reads back as the same events,
    /// with the very bytes the sink was handed; a row written before the
    /// encoding was recorded (protobuf) still reads.
    #[test]
    fn outbox_rows_read_back_in_their_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "users").unwrap();
        let events = sample_events();
        let mut w = StateWrites::default();
        w.objects.insert("a".into(), Some(state(1, 1)));
        let cp = |seq| StreamCheckpoint {
            stream: "users".into(),
            batch_seq: seq,
            ..Default::default()
        };
        let mut json = OutboxRow::encode(&cp(1), &w, &events, EventsEncoding::JsonLines);
        let mut proto = OutboxRow::encode(&cp(2), &w, &events, EventsEncoding::ProtobufDelimited);
        let (json_bytes, proto_bytes) = (json.events().to_vec(), proto.events().to_vec());
        let outbox = s.outbox_writer().unwrap();
        outbox.put(&mut json).unwrap();
        outbox.put(&mut proto).unwrap();
        assert!(json.is_recorded() && proto.is_recorded());
        // As an earlier version wrote it: no encoding in the record.
        let old = CheckpointRecord {
            checkpoint: Some(cp(3)),
            state: Some(w.to_proto()),
            ..Default::default()
        }
        .encode_to_vec();
        s.conn
            .execute(
                "INSERT INTO outbox (seq, record, events) VALUES (3, ?1, ?2)",
                params![old, proto_bytes],
            )
            .unwrap();
        let pending = s.outbox().unwrap();
        assert_eq!(pending.len(), 3);
        for (p, seq, bytes) in [
            (&pending[0], 1, &json_bytes),
            (&pending[1], 2, &proto_bytes),
            (&pending[2], 3, &proto_bytes),
        ] {
            assert_eq!(p.checkpoint.batch_seq, seq);
            assert_eq!(p.events, events);
            assert_eq!(&p.encoded, bytes);
            assert_eq!(p.writes.objects, w.objects);
        }
        assert_eq!(pending[0].encoding, EventsEncoding::JsonLines);
        assert_eq!(pending[2].encoding, EventsEncoding::ProtobufDelimited);
        // What was re-encoded is what had been encoded.
        assert_eq!(
            crate::sink::encode_events(EventsEncoding::JsonLines, &events),
            json_bytes
        );
        // A commit removes the rows it covers.
        s.commit(&cp(2), &StateWrites::default()).unwrap();
        assert_eq!(s.outbox().unwrap().len(), 1);
    }

    #[test]
    fn stale_objects_and_members_after_a_full_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "g").unwrap();
        let mut w = StateWrites::default();
        w.objects.insert("g1".into(), Some(state(1, 2)));
        w.objects.insert("old1".into(), Some(state(1, 1)));
        w.objects.insert("old2".into(), Some(state(1, 1)));
        for (m, seen) in [("m1", 2), ("m2", 1)] {
            w.members.insert(
                MemberKey {
                    group: "g1".into(),
                    relationship: "members".into(),
                    member: m.into(),
                },
                Some(MemberRow {
                    member_type: String::new(),
                    seen_round: seen,
                }),
            );
        }
        // The round's last commit: its rows move into `objects`.
        let reconcile = StreamCheckpoint {
            phase: Phase::Reconcile as i32,
            ..Default::default()
        };
        s.commit(&reconcile, &w).unwrap();
        let stale = s.stale_objects(2, 0, 1).unwrap();
        assert_eq!(stale.len(), 1);
        let first = stale[0].1.clone();
        assert!(first.starts_with("old"));
        let stale = s.stale_objects(2, stale[0].0, 10).unwrap();
        assert_eq!(stale.len(), 1);
        assert!(stale[0].1.starts_with("old") && stale[0].1 != first);
        let members = s.stale_members(2, &["members"], "", 100).unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].0.member, "m2");
        // Forgetting the group removes its memberships.
        let mut w = StateWrites::default();
        w.forget_group("g1");
        w.objects.insert("g1".into(), None);
        s.commit(&StreamCheckpoint::default(), &w).unwrap();
        let mut n = 0;
        s.for_each_member("members", |_, _| n += 1).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn reset_removes_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "x").unwrap();
        drop(s);
        assert!(reset(dir.path(), "x").unwrap());
        assert!(!reset(dir.path(), "x").unwrap());
        assert!(Store::open_read_only(dir.path(), "x").unwrap().is_none());
    }
}

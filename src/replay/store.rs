//! The replay's output store: the state folded into SQLite, so that a
//! replay's memory is bounded by SQLite's page cache, not by the length of
//! the topic or the size of the tenant.
//!
//! `replay --out sqlite:FILE` leaves this database behind; `--out FILE.jsonl`
//! folds into a private temporary database and writes it out as lines. The
//! folding rule is `materialize::transition`, shared with the
//! in-memory [`super::Materializer`].
//!
//! # Schema (the `sqlite:` output)
//! ```sql
//! objects    (id TEXT PRIMARY KEY, object_type TEXT, deleted INTEGER, -- 1: soft-deleted
//!             version INTEGER, properties TEXT)                      -- JSON object
//! members    (object_id TEXT, relationship TEXT, member_id TEXT)     -- groups' member sets
//! tombstones (id TEXT PRIMARY KEY, version INTEGER)                  -- hard-deleted objects
//! replay     (key TEXT PRIMARY KEY, value TEXT)                      -- stream, source, counters
//! ```
//! Hard-deleted objects are not in `objects`; their last version stays in
//! `tombstones` so that a late duplicate of an older event is recognised.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    ReplayError,
    materialize::{Materialized, ObjectStatus, ReplayStats, merge, transition},
};
use crate::proto::v1::{ChangeEvent, MemberChangeType};

/// Events applied per SQLite transaction.
const COMMIT_EVERY: usize = 5_000;

/// The folded state of one stream, in SQLite.
pub struct ReplayStore {
    pub(super) conn: Connection,
    /// Where it is written; `None` for a temporary store.
    path: Option<PathBuf>,
    /// Events applied in the open transaction (0: none open).
    pending: usize,
    stats: ReplayStats,
}

impl std::fmt::Debug for ReplayStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One line of the `.jsonl` output.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    id: &'a str,
    object_type: &'a str,
    deleted: bool,
    version: u64,
    properties: &'a Map<String, Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    members: &'a BTreeMap<String, BTreeSet<String>>,
}

impl ReplayStore {
    /// A new, empty store in `path` (an existing file there is replaced).
    pub fn create(path: &Path) -> Result<Self, ReplayError> {
        remove_database(path)?;
        let conn = Connection::open(path).map_err(|e| store_err(Some(path), e))?;
        Self::init(conn, Some(path.to_path_buf()))
    }

    /// A new store in a private temporary file that SQLite removes when the
    /// store is dropped.
    pub fn temporary() -> Result<Self, ReplayError> {
        // An empty file name: SQLite's private on-disk temporary database.
        let conn = Connection::open("").map_err(|e| store_err(None, e))?;
        Self::init(conn, None)
    }

    /// Opens a store written by an earlier replay (read it, or verify it).
    pub fn open(path: &Path) -> Result<Self, ReplayError> {
        if !path.exists() {
            return Err(ReplayError::Config(format!(
                "replay output `{}` does not exist; write it first with `graphdelta replay --out sqlite:{}`",
                path.display(),
                path.display()
            )));
        }
        let conn = Connection::open(path).map_err(|e| store_err(Some(path), e))?;
        let mut store = Self::init(conn, Some(path.to_path_buf()))?;
        store.stats = store.load_stats()?;
        Ok(store)
    }

    fn init(conn: Connection, path: Option<PathBuf>) -> Result<Self, ReplayError> {
        // The output is written to a side file and renamed only when
        // complete, so a crash never leaves a half state under the final
        // name: no rollback journal is needed.
        conn.pragma_update(None, "journal_mode", "OFF")
            .and_then(|()| conn.pragma_update(None, "synchronous", "OFF"))
            // A small page cache: memory must not grow with the tenant.
            .and_then(|()| conn.pragma_update(None, "cache_size", -16384))
            .map_err(|e| store_err(path.as_deref(), e))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS objects (
                 id TEXT PRIMARY KEY, object_type TEXT NOT NULL, deleted INTEGER NOT NULL,
                 version INTEGER NOT NULL, properties TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS members (
                 object_id TEXT NOT NULL, relationship TEXT NOT NULL, member_id TEXT NOT NULL,
                 PRIMARY KEY (object_id, relationship, member_id)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS tombstones (
                 id TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS replay (
                 key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;",
        )
        .map_err(|e| store_err(path.as_deref(), e))?;
        Ok(Self {
            conn,
            path,
            pending: 0,
            stats: ReplayStats::default(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> ReplayError {
        store_err(self.path.as_deref(), e)
    }

    /// Counters so far.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// Counts a Kafka tombstone (a null-value record).
    pub fn note_tombstone(&mut self) {
        self.stats.tombstones += 1;
    }

    /// Counts a record of another stream (shared topic, queue or file).
    pub fn note_other_stream(&mut self) {
        self.stats.other_streams += 1;
    }

    /// Applies one event (in stream order). Returns false for a duplicate
    /// (its `object_version` is not above the object's current one).
    pub fn apply(&mut self, event: &ChangeEvent) -> Result<bool, ReplayError> {
        self.stats.events += 1;
        let applied = self.apply_inner(event).map_err(|e| self.err(e))?;
        if applied {
            self.stats.applied += 1;
        } else {
            self.stats.duplicates += 1;
        }
        Ok(applied)
    }

    fn apply_inner(&mut self, event: &ChangeEvent) -> rusqlite::Result<bool> {
        if self.pending == 0 {
            self.conn.execute_batch("BEGIN")?;
        }
        let id = event.object_id.as_str();
        let row: Option<(String, bool, i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT object_type, deleted, version, properties FROM objects WHERE id = ?1",
            )?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        let (status, version, mut properties, mut object_type, tombstone) = match row {
            Some((object_type, deleted, version, properties)) => (
                if deleted {
                    ObjectStatus::SoftDeleted
                } else {
                    ObjectStatus::Live
                },
                version as u64,
                serde_json::from_str::<Map<String, Value>>(&properties)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
                object_type,
                false,
            ),
            None => {
                let version: Option<i64> = self
                    .conn
                    .prepare_cached("SELECT version FROM tombstones WHERE id = ?1")?
                    .query_row([id], |r| r.get(0))
                    .optional()?;
                (
                    ObjectStatus::HardDeleted,
                    version.unwrap_or(0) as u64,
                    Map::new(),
                    String::new(),
                    version.is_some(),
                )
            }
        };
        if event.object_version <= version {
            return Ok(false);
        }
        let step = transition(status, event.change_type());
        let existed = status != ObjectStatus::HardDeleted;
        if step.reset {
            properties.clear();
            if existed {
                self.conn
                    .prepare_cached("DELETE FROM members WHERE object_id = ?1")?
                    .execute([id])?;
            }
        }
        let version = event.object_version as i64;
        if step.status == ObjectStatus::HardDeleted {
            if existed {
                self.conn
                    .prepare_cached("DELETE FROM objects WHERE id = ?1")?
                    .execute([id])?;
            }
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO tombstones (id, version) VALUES (?1, ?2)")?
                .execute(params![id, version])?;
        } else {
            if tombstone {
                self.conn
                    .prepare_cached("DELETE FROM tombstones WHERE id = ?1")?
                    .execute([id])?;
            }
            if let Some(p) = &event.properties {
                merge(&mut properties, p.fields.clone().into_map());
            }
            if !event.object_type.is_empty() {
                object_type.clone_from(&event.object_type);
            }
            let text = serde_json::to_string(&properties).expect("a JSON map serializes");
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO objects (id, object_type, deleted, version, properties)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    id,
                    object_type,
                    step.status == ObjectStatus::SoftDeleted,
                    version,
                    text
                ])?;
            for m in &event.member_changes {
                match m.change() {
                    MemberChangeType::MemberChangeAdded => {
                        self.conn
                            .prepare_cached(
                                "INSERT OR IGNORE INTO members (object_id, relationship, member_id)
                                 VALUES (?1, ?2, ?3)",
                            )?
                            .execute(params![id, m.relationship, m.member_id])?;
                    }
                    MemberChangeType::MemberChangeRemoved => {
                        self.conn
                            .prepare_cached(
                                "DELETE FROM members
                                 WHERE object_id = ?1 AND relationship = ?2 AND member_id = ?3",
                            )?
                            .execute(params![id, m.relationship, m.member_id])?;
                    }
                    MemberChangeType::Unspecified => {}
                }
            }
        }
        self.pending += 1;
        if self.pending >= COMMIT_EVERY {
            self.commit_inner()?;
        }
        Ok(true)
    }

    fn commit_inner(&mut self) -> rusqlite::Result<()> {
        if self.pending > 0 {
            self.conn.execute_batch("COMMIT")?;
            self.pending = 0;
        }
        Ok(())
    }

    /// Commits what was applied and records the counters and where the
    /// events came from (the `replay` table).
    pub fn commit(&mut self, stream: &str, source: &str) -> Result<(), ReplayError> {
        let stats = self.stats;
        let result = (|| {
            self.commit_inner()?;
            let tx = self.conn.transaction()?;
            {
                let mut put =
                    tx.prepare("INSERT OR REPLACE INTO replay (key, value) VALUES (?1, ?2)")?;
                put.execute(["stream", stream])?;
                put.execute(["source", source])?;
                for (k, v) in [
                    ("events", stats.events),
                    ("applied", stats.applied),
                    ("duplicates", stats.duplicates),
                    ("tombstones", stats.tombstones),
                    ("other_streams", stats.other_streams),
                ] {
                    put.execute(params![k, v.to_string()])?;
                }
            }
            tx.commit()
        })();
        result.map_err(|e| self.err(e))
    }

    fn load_stats(&self) -> Result<ReplayStats, ReplayError> {
        let get = |key: &str| -> Result<u64, ReplayError> {
            let v: Option<String> = self
                .conn
                .query_row("SELECT value FROM replay WHERE key = ?1", [key], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(|e| self.err(e))?;
            Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
        };
        Ok(ReplayStats {
            events: get("events")?,
            applied: get("applied")?,
            duplicates: get("duplicates")?,
            tombstones: get("tombstones")?,
            other_streams: get("other_streams")?,
        })
    }

    /// Objects in the state (live and soft-deleted).
    pub fn object_count(&self) -> Result<(u64, u64), ReplayError> {
        self.conn
            .query_row(
                "SELECT count(*), coalesce(sum(deleted), 0) FROM objects",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(|e| self.err(e))
    }

    /// One object, if it exists (live or soft-deleted).
    pub fn object(&self, id: &str) -> Result<Option<Materialized>, ReplayError> {
        let mut found = None;
        self.scan(Some(id), |oid, m| {
            if oid == id {
                found = Some(m);
            }
        })?;
        Ok(found)
    }

    /// Every object (live and soft-deleted) with its members, in id order.
    pub fn for_each_object(&self, f: impl FnMut(String, Materialized)) -> Result<(), ReplayError> {
        self.scan(None, f)
    }

    fn scan(
        &self,
        only: Option<&str>,
        mut f: impl FnMut(String, Materialized),
    ) -> Result<(), ReplayError> {
        self.scan_inner(only, &mut f).map_err(|e| self.err(e))
    }

    fn scan_inner(
        &self,
        only: Option<&str>,
        f: &mut dyn FnMut(String, Materialized),
    ) -> rusqlite::Result<()> {
        let (filter, member_filter) = match only {
            Some(_) => ("WHERE id = ?1", "WHERE object_id = ?1"),
            None => ("", ""),
        };
        let mut objects = self.conn.prepare(&format!(
            "SELECT id, object_type, deleted, version, properties FROM objects {filter} ORDER BY id"
        ))?;
        let mut members = self.conn.prepare(&format!(
            "SELECT object_id, relationship, member_id FROM members {member_filter}
             ORDER BY object_id, relationship, member_id"
        ))?;
        let args: Vec<&dyn rusqlite::ToSql> = match &only {
            Some(id) => vec![id as &dyn rusqlite::ToSql],
            None => vec![],
        };
        let mut rows = objects.query(args.as_slice())?;
        let mut member_rows = members.query(args.as_slice())?;
        let mut member = next_member(&mut member_rows)?;
        while let Some(row) = rows.next()? {
            let id: String = row.get(0)?;
            let text: String = row.get(4)?;
            let properties = serde_json::from_str(&text)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let mut object = Materialized {
                object_type: row.get(1)?,
                status: if row.get::<_, bool>(2)? {
                    ObjectStatus::SoftDeleted
                } else {
                    ObjectStatus::Live
                },
                version: row.get::<_, i64>(3)? as u64,
                properties,
                members: BTreeMap::new(),
            };
            // Both scans are in id order, and members never outlive their
            // object (they are deleted with it).
            while let Some((group, relationship, member_id)) = member.take() {
                if group.as_str() > id.as_str() {
                    member = Some((group, relationship, member_id));
                    break;
                }
                if group == id {
                    object
                        .members
                        .entry(relationship)
                        .or_default()
                        .insert(member_id);
                }
                member = next_member(&mut member_rows)?;
            }
            f(id, object);
        }
        Ok(())
    }

    /// Writes the state as JSON lines (one object per line, in id order) to
    /// `out`; returns the number of lines.
    pub fn write_jsonl(&self, out: &mut dyn Write) -> Result<u64, ReplayError> {
        let mut lines = 0;
        let mut failed: Option<std::io::Error> = None;
        self.for_each_object(|id, o| {
            if failed.is_some() {
                return;
            }
            let line = Line {
                id: &id,
                object_type: &o.object_type,
                deleted: o.status == ObjectStatus::SoftDeleted,
                version: o.version,
                properties: &o.properties,
                members: &o.members,
            };
            let result = serde_json::to_writer(&mut *out, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            match result {
                Ok(()) => lines += 1,
                Err(e) => failed = Some(e),
            }
        })?;
        match failed {
            Some(e) => Err(ReplayError::Output(format!("writing the JSON lines: {e}"))),
            None => Ok(lines),
        }
    }

    /// Closes the store (for a file store: everything is on disk after).
    pub fn close(self) -> Result<(), ReplayError> {
        let path = self.path.clone();
        self.conn
            .close()
            .map_err(|(_, e)| store_err(path.as_deref(), e))
    }
}

/// Parses one line of the `.jsonl` output back (tests and tools).
pub fn parse_jsonl_line(line: &str) -> Result<(String, Materialized), serde_json::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Owned {
        id: String,
        object_type: String,
        deleted: bool,
        version: u64,
        properties: Map<String, Value>,
        #[serde(default)]
        members: BTreeMap<String, BTreeSet<String>>,
    }
    let o: Owned = serde_json::from_str(line)?;
    Ok((
        o.id,
        Materialized {
            object_type: o.object_type,
            status: if o.deleted {
                ObjectStatus::SoftDeleted
            } else {
                ObjectStatus::Live
            },
            version: o.version,
            properties: o.properties,
            members: o.members,
        },
    ))
}

/// The next (object id, relationship, member id) of a members scan.
fn next_member(
    rows: &mut rusqlite::Rows<'_>,
) -> rusqlite::Result<Option<(String, String, String)>> {
    rows.next()?
        .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .transpose()
}

fn store_err(path: Option<&Path>, e: rusqlite::Error) -> ReplayError {
    ReplayError::Store {
        path: path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(temporary)".to_string()),
        message: e.to_string(),
    }
}

/// Removes a SQLite database and its side files, if present.
pub fn remove_database(path: &Path) -> Result<(), ReplayError> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ReplayError::Output(format!(
                    "cannot replace `{}`: {e}",
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        proto::{
            JsonStruct,
            v1::{ChangeType, MemberChange},
        },
        replay::Materializer,
    };

    fn event(
        id: &str,
        change: ChangeType,
        version: u64,
        properties: Value,
        members: &[(&str, bool)],
    ) -> ChangeEvent {
        ChangeEvent {
            event_id: format!("{id}-{version}"),
            stream: "groups".into(),
            object_type: "microsoft.graph.group".into(),
            object_id: id.into(),
            change_type: change as i32,
            object_version: version,
            properties: Some(JsonStruct::from(
                properties.as_object().cloned().unwrap_or_default(),
            )),
            member_changes: members
                .iter()
                .map(|(m, added)| MemberChange {
                    member_id: m.to_string(),
                    member_type: String::new(),
                    change: if *added {
                        MemberChangeType::MemberChangeAdded
                    } else {
                        MemberChangeType::MemberChangeRemoved
                    } as i32,
                    relationship: "members".into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// The SQLite store and the in-memory materializer fold alike,
    /// duplicates and all.
    #[test]
    fn folds_like_the_materializer() {
        use ChangeType::*;
        let events = vec![
            event(
                "g",
                Created,
                1,
                json!({"displayName": "G", "description": "d"}),
                &[("u1", true), ("u2", true)],
            ),
            event(
                "g",
                Updated,
                2,
                json!({"description": null}),
                &[("u1", false)],
            ),
            event(
                "s",
                Created,
                1,
                json!({"displayName": "S"}),
                &[("u9", true)],
            ),
            event("s", SoftDeleted, 2, json!({}), &[]),
            event("r", Created, 1, json!({"displayName": "R"}), &[]),
            event("r", SoftDeleted, 2, json!({}), &[]),
            event("r", Restored, 3, json!({"displayName": "R2"}), &[]),
            event(
                "h",
                Created,
                1,
                json!({"displayName": "H"}),
                &[("u1", true)],
            ),
            event("h", HardDeleted, 2, json!({}), &[]),
            // Re-created after a hard delete: a new lifecycle.
            event(
                "k",
                Created,
                1,
                json!({"displayName": "K", "x": 1}),
                &[("u3", true)],
            ),
            event("k", HardDeleted, 2, json!({}), &[]),
            event("k", Created, 3, json!({"displayName": "K2"}), &[]),
        ];
        let mut store = ReplayStore::temporary().unwrap();
        let mut memory = Materializer::new();
        for e in events
            .iter()
            .chain(events.iter())
            .chain(events[3..7].iter())
        {
            store.apply(e).unwrap();
            memory.apply(e);
        }
        store.commit("groups", "test").unwrap();
        assert_eq!(store.stats().applied, events.len() as u64);
        assert_eq!(store.stats().duplicates, events.len() as u64 + 4);
        let mut folded = Vec::new();
        store.for_each_object(|id, o| folded.push((id, o))).unwrap();
        let want: Vec<(String, Materialized)> = memory
            .objects()
            .map(|(id, o)| (id.clone(), o.clone()))
            .collect();
        assert_eq!(folded, want);
        let g = store.object("g").unwrap().unwrap();
        assert_eq!(
            g.properties,
            json!({"displayName": "G"}).as_object().unwrap().clone()
        );
        assert_eq!(g.members["members"], BTreeSet::from(["u2".to_string()]));
        assert_eq!(
            store.object("s").unwrap().unwrap().status,
            ObjectStatus::SoftDeleted
        );
        assert!(store.object("h").unwrap().is_none());
        let k = store.object("k").unwrap().unwrap();
        assert_eq!(
            k.properties,
            json!({"displayName": "K2"}).as_object().unwrap().clone()
        );
        assert!(k.members.is_empty());
        assert_eq!(store.object_count().unwrap(), (4, 1));

        let mut out = Vec::new();
        assert_eq!(store.write_jsonl(&mut out).unwrap(), 4);
        let lines: Vec<(String, Materialized)> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| parse_jsonl_line(l).unwrap())
            .collect();
        assert_eq!(lines, want);
    }
}

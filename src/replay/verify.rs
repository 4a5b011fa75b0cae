//! `replay --verify`: the rebuilt state against the connector's own memory.
//!
//! The checkpoint store remembers, per object, its version, whether it is
//! soft-deleted and a pair of hashes per property ([`crate::normalize::hash`]);
//! and every membership. The replayed state is reduced to the same form
//! with the same hash functions, so the two compare exactly: same ids, same
//! versions, same deleted flags, same property hashes, same member sets.
//!
//! Both sides are scanned in id order and merged, so memory stays flat
//! whatever the tenant's size. Compare a store and a topic that describe the
//! same moment: stop the connector (or let `run --once` finish) first; a
//! batch published but not yet committed (at-least-once, after a crash)
//! shows up as a difference until the connector commits it again.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

use super::{ReplayError, ReplayStore};
use crate::{
    checkpoint::{Store, store_path},
    normalize::{hash, memory::StateWrites},
    proto::v1::{CheckpointRecord, ObjectState},
};

/// Differences printed in full; beyond, only counted.
const EXAMPLES: usize = 50;

/// The outcome of a verification.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Objects (live or soft-deleted) in the checkpoint store.
    pub objects: u64,
    /// Memberships in the checkpoint store.
    pub memberships: u64,
    /// Objects the store has and the replay lacks.
    pub missing: u64,
    /// Objects the replay has and the store lacks.
    pub extra: u64,
    /// Objects on both sides that differ (version, deleted flag, properties).
    pub differing: u64,
    /// Memberships the store has and the replay lacks.
    pub missing_members: u64,
    /// Memberships the replay has and the store lacks.
    pub extra_members: u64,
    /// The first differences, one line each.
    pub examples: Vec<String>,
}

impl VerifyReport {
    /// True when the two agree completely.
    pub fn agrees(&self) -> bool {
        self.missing + self.extra + self.differing + self.missing_members + self.extra_members == 0
    }

    /// Total number of differences.
    pub fn differences(&self) -> u64 {
        self.missing + self.extra + self.differing + self.missing_members + self.extra_members
    }

    fn note(&mut self, line: String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(line);
        }
    }
}

/// A replayed object, reduced to what the memory keeps.
struct Replayed {
    id: String,
    deleted: bool,
    version: u64,
    properties: Map<String, Value>,
}

/// The memory's `property_hashes` of a property map: sorted `(name hash,
/// value hash)` pairs; nulls have no hash (a null is remembered as absent).
pub fn property_hashes(properties: &Map<String, Value>) -> Vec<u64> {
    let mut pairs: Vec<(u64, u64)> = properties
        .iter()
        .filter_map(|(k, v)| Some((hash::name_hash(k), hash::value_hash(v)?)))
        .collect();
    pairs.sort_unstable_by_key(|p| p.0);
    pairs.dedup_by_key(|p| p.0);
    pairs.into_iter().flat_map(|(n, v)| [n, v]).collect()
}

/// Compares the replayed state with the checkpoint store's memory.
pub fn verify(replayed: &ReplayStore, memory: &Store) -> Result<VerifyReport, ReplayError> {
    let mut report = VerifyReport::default();
    compare_objects(replayed, memory, &mut report)?;
    compare_members(replayed, memory, &mut report)?;
    Ok(report)
}

fn compare_objects(
    replayed: &ReplayStore,
    memory: &Store,
    report: &mut VerifyReport,
) -> Result<(), ReplayError> {
    let store_err = |e: rusqlite::Error| ReplayError::Store {
        path: "(replay)".into(),
        message: e.to_string(),
    };
    let mut stmt = replayed
        .conn
        .prepare("SELECT id, deleted, version, properties FROM objects ORDER BY id")
        .map_err(store_err)?;
    let mut rows = stmt.query([]).map_err(store_err)?;
    let mut next = move || -> Result<Option<Replayed>, ReplayError> {
        let Some(row) = rows.next().map_err(store_err)? else {
            return Ok(None);
        };
        let text: String = row.get(3).map_err(store_err)?;
        Ok(Some(Replayed {
            id: row.get(0).map_err(store_err)?,
            deleted: row.get(1).map_err(store_err)?,
            version: row.get::<_, i64>(2).map_err(store_err)? as u64,
            properties: serde_json::from_str(&text).map_err(|e| ReplayError::Store {
                path: "(replay)".into(),
                message: format!("object properties are not JSON: {e}"),
            })?,
        }))
    };
    let mut pending = next()?;
    let mut failed: Option<ReplayError> = None;
    memory.for_each_object(|id, state| {
        if failed.is_some() || state.hard_deleted {
            return;
        }
        report.objects += 1;
        let mut step = || -> Result<(), ReplayError> {
            while let Some(r) = pending.as_ref().filter(|r| r.id.as_str() < id) {
                extra(report, r);
                pending = next()?;
            }
            match pending.take() {
                Some(r) if r.id == id => {
                    compare_one(report, &r, state);
                    pending = next()?;
                }
                other => {
                    pending = other;
                    report.missing += 1;
                    report.note(format!(
                        "missing from the replay: {id} (version {}, {})",
                        state.version,
                        if state.soft_deleted {
                            "soft-deleted"
                        } else {
                            "live"
                        }
                    ));
                }
            }
            Ok(())
        };
        if let Err(e) = step() {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    while let Some(r) = pending {
        extra(report, &r);
        pending = next()?;
    }
    Ok(())
}

fn extra(report: &mut VerifyReport, r: &Replayed) {
    report.extra += 1;
    report.note(format!(
        "extra in the replay: {} (version {}, {})",
        r.id,
        r.version,
        if r.deleted { "soft-deleted" } else { "live" }
    ));
}

fn compare_one(report: &mut VerifyReport, r: &Replayed, state: &ObjectState) {
    let mut why = Vec::new();
    if r.version != state.version {
        why.push(format!(
            "version {} in the replay, {} in the store",
            r.version, state.version
        ));
    }
    if r.deleted != state.soft_deleted {
        why.push(format!(
            "{} in the replay, {} in the store",
            if r.deleted { "soft-deleted" } else { "live" },
            if state.soft_deleted {
                "soft-deleted"
            } else {
                "live"
            }
        ));
    }
    let hashes = property_hashes(&r.properties);
    if hashes != state.property_hashes {
        let remembered: BTreeSet<(u64, u64)> = state
            .property_hashes
            .chunks_exact(2)
            .map(|p| (p[0], p[1]))
            .collect();
        let names: BTreeSet<u64> = remembered.iter().map(|p| p.0).collect();
        let mut differ: Vec<&str> = Vec::new();
        let mut present = BTreeSet::new();
        for (k, v) in &r.properties {
            let Some(vh) = hash::value_hash(v) else {
                continue;
            };
            let nh = hash::name_hash(k);
            present.insert(nh);
            if !remembered.contains(&(nh, vh)) {
                differ.push(k);
            }
        }
        let absent = names.difference(&present).count();
        let mut what = String::from("properties differ");
        if !differ.is_empty() {
            what.push_str(&format!(" ({})", differ.join(", ")));
        }
        if absent > 0 {
            what.push_str(&format!(
                "; {absent} remembered propert{} absent from the replay",
                if absent == 1 { "y" } else { "ies" }
            ));
        }
        why.push(what);
    }
    if !why.is_empty() {
        report.differing += 1;
        report.note(format!("differs: {}: {}", r.id, why.join("; ")));
    }
}

fn compare_members(
    replayed: &ReplayStore,
    memory: &Store,
    report: &mut VerifyReport,
) -> Result<(), ReplayError> {
    let store_err = |e: rusqlite::Error| ReplayError::Store {
        path: "(replay)".into(),
        message: e.to_string(),
    };
    let mut relationships: BTreeSet<String> = ["members".to_string(), "owners".to_string()].into();
    {
        let mut stmt = replayed
            .conn
            .prepare("SELECT DISTINCT relationship FROM members")
            .map_err(store_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(store_err)?;
        for r in rows {
            relationships.insert(r.map_err(store_err)?);
        }
    }
    for relationship in relationships {
        let mut stmt = replayed
            .conn
            .prepare(
                "SELECT object_id, member_id FROM members WHERE relationship = ?1
                 ORDER BY object_id, member_id",
            )
            .map_err(store_err)?;
        let mut rows = stmt.query([&relationship]).map_err(store_err)?;
        let mut next = move || -> Result<Option<(String, String)>, ReplayError> {
            match rows.next().map_err(store_err)? {
                Some(row) => Ok(Some((
                    row.get(0).map_err(store_err)?,
                    row.get(1).map_err(store_err)?,
                ))),
                None => Ok(None),
            }
        };
        let mut pending = next()?;
        let mut failed: Option<ReplayError> = None;
        let extra_member = |report: &mut VerifyReport, (g, m): &(String, String)| {
            report.extra_members += 1;
            report.note(format!("extra in the replay: {g} {relationship} {m}"));
        };
        memory.for_each_member(&relationship, |group, member| {
            if failed.is_some() {
                return;
            }
            report.memberships += 1;
            let key = (group, member);
            let mut step = || -> Result<(), ReplayError> {
                while let Some(r) = pending
                    .as_ref()
                    .filter(|r| (r.0.as_str(), r.1.as_str()) < key)
                {
                    extra_member(report, r);
                    pending = next()?;
                }
                match pending.take() {
                    Some(r) if (r.0.as_str(), r.1.as_str()) == key => pending = next()?,
                    other => {
                        pending = other;
                        report.missing_members += 1;
                        report.note(format!(
                            "missing from the replay: {group} {relationship} {member}"
                        ));
                    }
                }
                Ok(())
            };
            if let Err(e) = step() {
                failed = Some(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        while let Some(r) = pending {
            extra_member(report, &r);
            pending = next()?;
        }
    }
    Ok(())
}

/// A copy of a stream's checkpoint store with the batch only the Kafka
/// checkpoint topic has (exactly-once: a crash between the two commits),
/// applied as the connector applies it on its next start. The copy lives
/// in a private temporary directory, removed when this is dropped; the
/// store itself is not touched.
pub struct RolledForward {
    pub store: Store,
    /// The batch the copy was rolled forward to.
    pub batch_seq: u64,
    /// The batch the store itself is at.
    pub store_batch_seq: u64,
    // Dropped after `store` (fields drop in order).
    _dir: TempDir,
}

/// A private temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rolls a copy of the store in `dir` forward to `record` if the record is
/// ahead of it; `None` if it is not (nothing to do).
pub fn roll_forward(
    dir: &Path,
    stream: &str,
    store: &Store,
    record: CheckpointRecord,
) -> Result<Option<RolledForward>, ReplayError> {
    let store_batch_seq = store.load_checkpoint()?.map_or(0, |c| c.batch_seq);
    let Some(checkpoint) = record.checkpoint.filter(|c| c.batch_seq > store_batch_seq) else {
        return Ok(None);
    };
    let copy_dir = std::env::temp_dir().join(format!(
        "graphdelta-verify-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let io = |what: &str, p: &Path, e: std::io::Error| {
        ReplayError::Output(format!("{what} `{}`: {e}", p.display()))
    };
    std::fs::create_dir(&copy_dir).map_err(|e| io("cannot create", &copy_dir, e))?;
    // Removes the directory on every path from here on.
    let guard = TempDir(copy_dir);
    let original = store_path(dir, stream);
    let target = store_path(&guard.0, stream);
    for suffix in ["", "-wal"] {
        let from = PathBuf::from(format!("{}{suffix}", original.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", target.display()));
            std::fs::copy(&from, &to).map_err(|e| io("cannot copy", &from, e))?;
        }
    }
    let mut copy = Store::open(&guard.0, stream)?;
    copy.commit(
        &checkpoint,
        &StateWrites::from_proto(record.state.unwrap_or_default()),
    )?;
    let rolled = RolledForward {
        store: copy,
        batch_seq: checkpoint.batch_seq,
        store_batch_seq,
        _dir: guard,
    };
    Ok(Some(rolled))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        normalize::{RoundContext, StreamContext, memory::StateWrites, normalize_page},
        proto::v1::StreamCheckpoint,
    };

    /// Normalizes pages into a real checkpoint store, folds the events into
    /// a replay store, and verifies; then tampers with either side.
    #[test]
    fn agrees_with_the_memory_that_produced_the_events() {
        let dir = std::env::temp_dir().join(format!("gd-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut memory = Store::open(&dir, "g").unwrap();
        let ctx = StreamContext::new("t", "g", "groups", "microsoft.graph.group", true);
        let mut replayed = ReplayStore::temporary().unwrap();
        let pages = vec![
            json!([{"id": "g1", "displayName": "G", "description": "d", "members@delta": [{"id": "u1"}, {"id": "u2"}]},
                   {"id": "g2", "displayName": "Two"}, {"id": "g3", "displayName": "Three"}]),
            json!([{"id": "g1", "description": null, "members@delta": [{"id": "u1", "@removed": {"reason": "deleted"}}]},
                   {"id": "g2", "@removed": {"reason": "changed"}},
                   {"id": "g3", "@removed": {"reason": "deleted"}}]),
        ];
        for (seq, page) in pages.into_iter().enumerate() {
            let objects = page
                .as_array()
                .unwrap()
                .iter()
                .map(|o| crate::proto::Fields::from(o.as_object().unwrap().clone()))
                .collect();
            let overlay = crate::normalize::memory::Overlay::default();
            let n = {
                let written = crate::normalize::filter::WrittenFilter::default();
                let mut view = overlay.view(&memory, &written);
                normalize_page(&ctx, &RoundContext::now(1, false), objects, &mut view).unwrap()
            };
            let cp = StreamCheckpoint {
                batch_seq: seq as u64 + 1,
                ..Default::default()
            };
            memory.commit(&cp, &n.writes).unwrap();
            for e in &n.events {
                replayed.apply(e).unwrap();
            }
        }
        replayed.commit("g", "test").unwrap();
        let report = verify(&replayed, &memory).unwrap();
        assert!(report.agrees(), "{:?}", report.examples);
        assert_eq!((report.objects, report.memberships), (2, 1));

        // The store forgets a membership and changes a property hash.
        let mut w = StateWrites::default();
        let mut g1 = memory.object("g1").unwrap().unwrap();
        g1.property_hashes[1] ^= 1;
        w.objects.insert("g1".into(), Some(g1));
        w.members.insert(
            crate::normalize::memory::MemberKey {
                group: "g1".into(),
                relationship: "members".into(),
                member: "u2".into(),
            },
            None,
        );
        w.objects.insert(
            "g4".into(),
            Some(ObjectState {
                version: 1,
                ..Default::default()
            }),
        );
        memory.commit(&StreamCheckpoint::default(), &w).unwrap();
        let report = verify(&replayed, &memory).unwrap();
        assert!(!report.agrees());
        assert_eq!(
            (report.differing, report.extra_members, report.missing),
            (1, 1, 1),
            "{:?}",
            report.examples
        );
        assert!(
            report
                .examples
                .iter()
                .any(|l| l.contains("g1") && l.contains("displayName")),
            "{:?}",
            report.examples
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

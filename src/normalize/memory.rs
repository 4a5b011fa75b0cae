//! The connector's memory of objects and memberships, as the normalizer sees
//! it: committed state from the checkpoint store, overlaid by the state
//! changes of batches that were normalized but are not committed yet (they
//! may still be in flight to the broker).
//!
//! A batch's [`StateWrites`] are the final states of what the batch touched;
//! they are committed in the same transaction as the batch's checkpoint, and
//! dropped from the [`Overlay`] once that commit happened. After a crash the
//! overlay is gone and the memory is exactly the committed state, so replayed
//! pages produce the same events with the same ids.

// Fx hashing: these maps are keyed by Graph object ids and rebuilt per
// page; SipHash's DoS resistance buys nothing here and cost 9% of the CPU.
use super::filter::WrittenFilter;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::{
    checkpoint::{CheckpointError, Store},
    proto::v1::{BatchState, ObjectState, batch_state},
};

/// A membership: `member` is in `group`'s `relationship` (e.g. `members`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub group: String,
    pub relationship: String,
    pub member: String,
}

/// What is remembered of a membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    /// `@odata.type` of the member without `#`, or empty.
    pub member_type: String,
    /// The full round in which the membership was last listed.
    pub seen_round: u64,
}

/// Read access to what the connector remembers.
pub trait MemoryView {
    /// Hint: these objects are about to be looked up (one query instead of
    /// one per object).
    fn prefetch(&mut self, _ids: &[&str]) -> Result<(), CheckpointError> {
        Ok(())
    }
    fn object(&mut self, id: &str) -> Result<Option<ObjectState>, CheckpointError>;
    fn member(&mut self, key: &MemberKey) -> Result<Option<MemberRow>, CheckpointError>;
}

/// The state changes of one batch: final values, applied in one transaction.
#[derive(Debug, Default, Clone)]
pub struct StateWrites {
    /// Objects to store (`Some`) or forget (`None`, hard-deleted).
    pub objects: HashMap<String, Option<ObjectState>>,
    /// Groups whose every membership is forgotten (the group was
    /// hard-deleted); applied before `members`.
    pub forgotten_groups: HashSet<String>,
    /// Memberships to store (`Some`) or forget (`None`).
    pub members: HashMap<MemberKey, Option<MemberRow>>,
    /// Objects the store has no row for yet (first sightings): inserted
    /// without looking for a row to update first.
    pub new_objects: HashSet<String>,
}

impl StateWrites {
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.forgotten_groups.is_empty() && self.members.is_empty()
    }

    /// Folds the writes of a later batch into these, so that committing the
    /// result equals committing both in order.
    pub fn merge(&mut self, later: StateWrites) {
        // Into nothing: the later writes are the result (their maps, with
        // no rehashing into new ones).
        if self.is_empty() && self.new_objects.is_empty() {
            *self = later;
            return;
        }
        for group in &later.forgotten_groups {
            self.members.retain(|k, _| &k.group != group);
        }
        self.forgotten_groups.extend(later.forgotten_groups);
        self.members.extend(later.members);
        self.objects.extend(later.objects);
        self.new_objects.extend(later.new_objects);
    }

    /// Room for `objects` more objects (and first sightings) without
    /// growing the maps on the way.
    pub fn reserve(&mut self, objects: usize) {
        self.objects.reserve(objects);
        self.new_objects.reserve(objects);
    }

    /// Forgets all of `group`'s memberships, including ones written earlier
    /// in this batch.
    pub fn forget_group(&mut self, group: &str) {
        self.members.retain(|k, _| k.group != group);
        self.forgotten_groups.insert(group.to_string());
    }
}

impl StateWrites {
    /// The protobuf form, for sinks that store it with the checkpoint.
    pub fn to_proto(&self) -> BatchState {
        let mut objects: Vec<_> = self
            .objects
            .iter()
            .map(|(id, state)| batch_state::ObjectWrite {
                id: id.clone(),
                state: state.clone(),
            })
            .collect();
        objects.sort_by(|a, b| a.id.cmp(&b.id));
        let mut forgotten_groups: Vec<String> = self.forgotten_groups.iter().cloned().collect();
        forgotten_groups.sort();
        let mut members: Vec<_> = self
            .members
            .iter()
            .map(|(k, row)| batch_state::MemberWrite {
                group_id: k.group.clone(),
                relationship: k.relationship.clone(),
                member_id: k.member.clone(),
                present: row.is_some(),
                member_type: row
                    .as_ref()
                    .map(|r| r.member_type.clone())
                    .unwrap_or_default(),
                seen_round: row.as_ref().map(|r| r.seen_round).unwrap_or_default(),
            })
            .collect();
        members.sort_by(|a, b| {
            (&a.group_id, &a.relationship, &a.member_id).cmp(&(
                &b.group_id,
                &b.relationship,
                &b.member_id,
            ))
        });
        BatchState {
            objects,
            forgotten_groups,
            members,
        }
    }

    /// Appends [`to_proto`](Self::to_proto)'s message as field `tag` of
    /// an enclosing message (key, length, then the message), as prost
    /// encodes it, without building it: the outbox records every batch's
    /// writes, and copying each id and state into a `BatchState` cost
    /// ≈ 0.8k instructions an object (callgrind). Each length is computed
    /// once. The objects come in the map's order, not sorted by id as in
    /// `to_proto`: they are read back into a map, and sorting a page's ids
    /// cost ≈ 0.6k instructions an object.
    pub fn encode_proto_field(&self, tag: u32, buf: &mut Vec<u8>) {
        use prost::Message;
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        use prost::encoding::{bool as pbool, string, uint64};

        let delimited = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
        // proto3 leaves empty strings out.
        let text = |tag: u32, s: &str| {
            if s.is_empty() {
                0
            } else {
                delimited(tag, s.len())
            }
        };
        let put_text = |tag: u32, s: &String, buf: &mut Vec<u8>| {
            if !s.is_empty() {
                string::encode(tag, s, buf);
            }
        };
        // (id, state and its length, the object's length).
        let objects: Vec<_> = self
            .objects
            .iter()
            .map(|(id, state)| {
                let state = state.as_ref().map(|s| (s, s.encoded_len()));
                let len = text(1, id) + state.map_or(0, |(_, n)| delimited(2, n));
                (id, state, len)
            })
            .collect();
        let mut groups: Vec<&String> = self.forgotten_groups.iter().collect();
        groups.sort_unstable();
        let mut members: Vec<_> = self
            .members
            .iter()
            .map(|(key, row)| {
                let len = text(1, &key.group)
                    + text(2, &key.relationship)
                    + text(3, &key.member)
                    + row.as_ref().map_or(0, |r| {
                        pbool::encoded_len(4, &true)
                            + text(5, &r.member_type)
                            + if r.seen_round == 0 {
                                0
                            } else {
                                uint64::encoded_len(6, &r.seen_round)
                            }
                    });
                (key, row, len)
            })
            .collect();
        members.sort_unstable_by(|a: &(&MemberKey, _, usize), b| a.0.cmp(b.0));

        let len = objects.iter().map(|o| delimited(1, o.2)).sum::<usize>()
            + groups.iter().map(|g| delimited(2, g.len())).sum::<usize>()
            + members.iter().map(|m| delimited(3, m.2)).sum::<usize>();
        buf.reserve(delimited(tag, len));
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
        for (id, state, len) in objects {
            encode_key(1, WireType::LengthDelimited, buf);
            encode_varint(len as u64, buf);
            put_text(1, id, buf);
            if let Some((state, len)) = state {
                encode_key(2, WireType::LengthDelimited, buf);
                encode_varint(len as u64, buf);
                state.encode_raw(buf);
            }
        }
        for group in groups {
            string::encode(2, group, buf);
        }
        for (key, row, len) in members {
            encode_key(3, WireType::LengthDelimited, buf);
            encode_varint(len as u64, buf);
            put_text(1, &key.group, buf);
            put_text(2, &key.relationship, buf);
            put_text(3, &key.member, buf);
            if let Some(row) = row {
                pbool::encode(4, &true, buf);
                put_text(5, &row.member_type, buf);
                if row.seen_round != 0 {
                    uint64::encode(6, &row.seen_round, buf);
                }
            }
        }
    }

    /// Back from the protobuf form.
    pub fn from_proto(p: BatchState) -> Self {
        StateWrites {
            new_objects: HashSet::default(),
            objects: p.objects.into_iter().map(|o| (o.id, o.state)).collect(),
            forgotten_groups: p.forgotten_groups.into_iter().collect(),
            members: p
                .members
                .into_iter()
                .map(|m| {
                    let key = MemberKey {
                        group: m.group_id,
                        relationship: m.relationship,
                        member: m.member_id,
                    };
                    let row = m.present.then_some(MemberRow {
                        member_type: m.member_type,
                        seen_round: m.seen_round,
                    });
                    (key, row)
                })
                .collect(),
        }
    }
}

/// State changes of normalized but uncommitted batches, newest wins.
#[derive(Debug, Default)]
pub struct Overlay {
    objects: HashMap<String, (u64, Option<ObjectState>)>,
    members: HashMap<MemberKey, (u64, Option<MemberRow>)>,
    forgotten_groups: HashMap<String, u64>,
}

impl Overlay {
    /// Records batch `seq`'s writes (batches are applied in sequence order).
    pub fn apply(&mut self, seq: u64, writes: &StateWrites) {
        for group in &writes.forgotten_groups {
            self.members.retain(|k, _| &k.group != group);
            self.forgotten_groups.insert(group.clone(), seq);
        }
        for (key, row) in &writes.members {
            self.members.insert(key.clone(), (seq, row.clone()));
        }
        for (id, state) in &writes.objects {
            self.objects.insert(id.clone(), (seq, state.clone()));
        }
    }

    /// Drops what batches up to `committed_seq` wrote: the store has it now.
    pub fn release(&mut self, committed_seq: u64) {
        self.objects.retain(|_, (seq, _)| *seq > committed_seq);
        self.members.retain(|_, (seq, _)| *seq > committed_seq);
        self.forgotten_groups.retain(|_, seq| *seq > committed_seq);
    }

    pub fn clear(&mut self) {
        *self = Overlay::default();
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.members.is_empty() && self.forgotten_groups.is_empty()
    }

    /// The overlay in front of the committed store; `written` rules out
    /// rows the store cannot have.
    pub fn view<'a>(&'a self, store: &'a Store, written: &'a WrittenFilter) -> OverlayView<'a> {
        OverlayView {
            overlay: self,
            store,
            written,
            prefetched: HashMap::default(),
        }
    }
}

/// [`MemoryView`] of the overlay in front of the store.
pub struct OverlayView<'a> {
    overlay: &'a Overlay,
    store: &'a Store,
    written: &'a WrittenFilter,
    /// Store rows fetched by [`MemoryView::prefetch`] (`None`: no row).
    prefetched: HashMap<String, Option<ObjectState>>,
}

impl MemoryView for OverlayView<'_> {
    fn prefetch(&mut self, ids: &[&str]) -> Result<(), CheckpointError> {
        // Ids the filter rules out need no entry: `object` asks it again.
        let missing: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| {
                !self.overlay.objects.contains_key(*id) && self.written.object_may_exist(id)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let found = self.store.objects(&missing)?;
        // An id can be listed twice (Graph replays an object within a
        // page): every occurrence must find the row, not only the first.
        for id in missing {
            self.prefetched
                .insert(id.to_string(), found.get(id).cloned());
        }
        Ok(())
    }

    fn object(&mut self, id: &str) -> Result<Option<ObjectState>, CheckpointError> {
        if let Some((_, state)) = self.overlay.objects.get(id) {
            return Ok(state.clone());
        }
        match self.prefetched.get(id) {
            Some(state) => Ok(state.clone()),
            None if !self.written.object_may_exist(id) => Ok(None),
            None => self.store.object(id),
        }
    }

    fn member(&mut self, key: &MemberKey) -> Result<Option<MemberRow>, CheckpointError> {
        if let Some((_, row)) = self.overlay.members.get(key) {
            return Ok(row.clone());
        }
        if self.overlay.forgotten_groups.contains_key(&key.group)
            || !self.written.member_may_exist(key)
        {
            return Ok(None);
        }
        self.store.member(key)
    }
}

/// A plain in-memory [`MemoryView`], for tests and tools.
#[derive(Debug, Default)]
pub struct MapMemory {
    pub objects: HashMap<String, ObjectState>,
    pub members: HashMap<MemberKey, MemberRow>,
}

impl MapMemory {
    /// Applies a batch's writes as a commit would.
    pub fn commit(&mut self, writes: &StateWrites) {
        for group in &writes.forgotten_groups {
            self.members.retain(|k, _| &k.group != group);
        }
        for (key, row) in &writes.members {
            match row {
                Some(row) => {
                    self.members.insert(key.clone(), row.clone());
                }
                None => {
                    self.members.remove(key);
                }
            }
        }
        for (id, state) in &writes.objects {
            match state {
                Some(state) => {
                    self.objects.insert(id.clone(), state.clone());
                }
                None => {
                    self.objects.remove(id);
                }
            }
        }
    }
}

impl MemoryView for MapMemory {
    fn object(&mut self, id: &str) -> Result<Option<ObjectState>, CheckpointError> {
        Ok(self.objects.get(id).cloned())
    }

    fn member(&mut self, key: &MemberKey) -> Result<Option<MemberRow>, CheckpointError> {
        Ok(self.members.get(key).cloned())
    }
}

/// Accessors for the sorted `(name hash, value hash)` pairs of an
/// [`ObjectState`].
pub trait PropertyHashes {
    fn property_hash(&self, name: u64) -> Option<u64>;
    fn set_property_hash(&mut self, name: u64, value: Option<u64>);
    fn property_count(&self) -> usize;
}

impl PropertyHashes for ObjectState {
    fn property_hash(&self, name: u64) -> Option<u64> {
        let pairs = &self.property_hashes;
        let n = pairs.len() / 2;
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match pairs[2 * mid].cmp(&name) {
                std::cmp::Ordering::Equal => return Some(pairs[2 * mid + 1]),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    fn set_property_hash(&mut self, name: u64, value: Option<u64>) {
        let pairs = &mut self.property_hashes;
        let n = pairs.len() / 2;
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match pairs[2 * mid].cmp(&name) {
                std::cmp::Ordering::Equal => {
                    match value {
                        Some(v) => pairs[2 * mid + 1] = v,
                        None => {
                            pairs.drain(2 * mid..2 * mid + 2);
                        }
                    }
                    return;
                }
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        if let Some(v) = value {
            pairs.splice(2 * lo..2 * lo, [name, v]);
        }
    }

    fn property_count(&self) -> usize {
        self.property_hashes.len() / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_listed_twice_is_found_both_times() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "users").unwrap();
        let mut writes = StateWrites::default();
        let known = ObjectState {
            version: 3,
            ..Default::default()
        };
        writes.objects.insert("x".into(), Some(known));
        store
            .commit(&crate::proto::v1::StreamCheckpoint::default(), &writes)
            .unwrap();
        let overlay = Overlay::default();
        let written = WrittenFilter::default();
        let mut view = overlay.view(&store, &written);
        view.prefetch(&["x", "y", "x"]).unwrap();
        assert_eq!(view.object("x").unwrap().map(|s| s.version), Some(3));
        assert_eq!(view.object("y").unwrap(), None);
    }

    #[test]
    fn rows_written_this_round_are_found_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "users").unwrap();
        assert_eq!(store.is_empty().unwrap(), (true, true));
        let mut written = WrittenFilter::new(true, true);
        // The round writes "x" and a membership; they are committed and
        // leave the overlay before the ids come again.
        let mut writes = StateWrites::default();
        writes.objects.insert(
            "x".into(),
            Some(ObjectState {
                version: 2,
                ..Default::default()
            }),
        );
        let key = MemberKey {
            group: "g".into(),
            relationship: "members".into(),
            member: "m".into(),
        };
        let row = MemberRow {
            member_type: "#microsoft.graph.user".into(),
            seen_round: 1,
        };
        writes.members.insert(key.clone(), Some(row.clone()));
        written.add_object("x");
        written.add_member(&key);
        store
            .commit(&crate::proto::v1::StreamCheckpoint::default(), &writes)
            .unwrap();
        assert_eq!(store.is_empty().unwrap(), (false, false));
        let overlay = Overlay::default();
        let mut view = overlay.view(&store, &written);
        view.prefetch(&["x", "y"]).unwrap();
        assert_eq!(view.object("x").unwrap().map(|s| s.version), Some(2));
        assert_eq!(view.object("y").unwrap(), None);
        assert_eq!(view.object("z").unwrap(), None);
        assert_eq!(view.member(&key).unwrap(), Some(row));
        let other = MemberKey {
            member: "n".into(),
            ..key
        };
        assert_eq!(view.member(&other).unwrap(), None);
    }

    #[test]
    fn property_hashes_stay_sorted() {
        let mut s = ObjectState::default();
        for (n, v) in [(5u64, 50u64), (1, 10), (9, 90), (3, 30)] {
            s.set_property_hash(n, Some(v));
        }
        assert_eq!(s.property_hashes, vec![1, 10, 3, 30, 5, 50, 9, 90]);
        assert_eq!(s.property_hash(5), Some(50));
        assert_eq!(s.property_hash(4), None);
        s.set_property_hash(5, Some(55));
        s.set_property_hash(3, None);
        assert_eq!(s.property_hashes, vec![1, 10, 5, 55, 9, 90]);
        s.set_property_hash(7, None);
        assert_eq!(s.property_count(), 3);
    }

    #[test]
    fn merged_writes_commit_like_both_in_order() {
        let key = |g: &str, m: &str| MemberKey {
            group: g.into(),
            relationship: "members".into(),
            member: m.into(),
        };
        let row = |n| {
            Some(MemberRow {
                member_type: String::new(),
                seen_round: n,
            })
        };
        let mut a = StateWrites::default();
        a.members.insert(key("g", "1"), row(1));
        a.members.insert(key("h", "1"), row(1));
        a.objects.insert("x".into(), Some(ObjectState::default()));
        let mut b = StateWrites::default();
        b.forget_group("g");
        b.members.insert(key("g", "2"), row(2));
        b.objects.insert("x".into(), None);
        let (mut sequential, mut merged) = (MapMemory::default(), MapMemory::default());
        sequential.members.insert(key("g", "0"), row(0).unwrap());
        merged.members.insert(key("g", "0"), row(0).unwrap());
        a.new_objects.insert("x".into());
        sequential.commit(&a);
        sequential.commit(&b);
        // Merged into nothing first (the later writes are taken whole),
        // sized up on the way, then into something.
        let mut staged = StateWrites::default();
        let mut first = a.clone();
        first.reserve(100);
        staged.merge(first);
        staged.merge(b.clone());
        a.merge(b);
        assert_eq!(staged.new_objects, a.new_objects);
        merged.commit(&a);
        assert_eq!(sequential.members, merged.members);
        assert_eq!(sequential.objects, merged.objects);
        assert!(
            merged.members.contains_key(&key("g", "2"))
                && !merged.members.contains_key(&key("g", "1"))
        );
        let mut from_staged = MapMemory::default();
        from_staged.members.insert(key("g", "0"), row(0).unwrap());
        from_staged.commit(&staged);
        assert_eq!(sequential.members, from_staged.members);
        assert_eq!(sequential.objects, from_staged.objects);
    }

    #[test]
    fn overlay_forgets_group_members_and_releases_in_order() {
        let mut o = Overlay::default();
        let key = |m: &str| MemberKey {
            group: "g".into(),
            relationship: "members".into(),
            member: m.into(),
        };
        let row = MemberRow {
            member_type: String::new(),
            seen_round: 1,
        };
        let mut w1 = StateWrites::default();
        w1.members.insert(key("a"), Some(row.clone()));
        o.apply(1, &w1);
        let mut w2 = StateWrites::default();
        w2.forget_group("g");
        o.apply(2, &w2);
        assert!(!o.members.contains_key(&key("a")));
        assert_eq!(o.forgotten_groups.get("g"), Some(&2));
        o.release(1);
        assert!(!o.is_empty());
        o.release(2);
        assert!(o.is_empty());
    }
}

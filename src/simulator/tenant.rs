//! The tenant: the state of every object, the change log that delta windows
//! are cut from, the mutations that feed it, and the ground truth.
//!
//! # Memory model
//!
//! The initial population is not stored: object `i` of a kind is generated
//! from `(seed, kind, i)` on demand (`GenCtx::generate` in [`super::model`]).
//! Only objects that were created or mutated live in a per-kind overlay map,
//! so a million-user tenant starts instantly and costs memory in proportion to
//! the churn applied to it. Group memberships follow the same rule: a group's
//! member list is generated until its first membership change.
//!
//! # Sequence numbers
//!
//! Every mutation gets the next sequence number (`seq`, starting at 1; 0 is
//! "the initial population") and one entry in the change log; the log is
//! therefore contiguous in `seq`. A delta window `(since, upto]` is the set of
//! log entries between two sequence numbers. Each object also remembers the
//! sequence number of its creation, restore, removal and of the last change to
//! each property, which is what `Prefer: return=minimal` needs. Each group
//! keeps its own membership log so that its member list as of any `seq` (a
//! round's snapshot) can be reconstructed; that keeps member slices of one
//! round consistent while the tenant keeps changing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::SimError;
use super::model::{GenCtx, Key, MEMBERS_BIT, ObjectKind, Props, Value};
use super::rng::{SplitMix64, mix};

/// How many change-log entries are kept. A deltaLink older than the oldest
/// kept entry answers `syncStateNotFound`, like an expired Graph token.
pub(crate) const LOG_RETENTION: usize = 2_000_000;

/// How many recent hard deletes per kind an initial round reports as
/// `@removed: deleted` (Graph's initial rounds include recent deletions).
pub(crate) const RECENT_HARD_DELETES: usize = 100;

/// The kind of one change-log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// An object was created.
    Create,
    /// Properties of a live object changed.
    Update,
    /// An object moved to deleted items (`@removed: changed`).
    SoftDelete,
    /// An object was permanently deleted (`@removed: deleted`).
    HardDelete,
    /// A soft-deleted object was restored.
    Restore,
    /// A member was added to a group (the entry's object is the group).
    MemberAdd,
    /// A member was removed from a group, or the member was deleted.
    MemberRemove,
}

impl ChangeKind {
    const ALL: [ChangeKind; 7] = [
        ChangeKind::Create,
        ChangeKind::Update,
        ChangeKind::SoftDelete,
        ChangeKind::HardDelete,
        ChangeKind::Restore,
        ChangeKind::MemberAdd,
        ChangeKind::MemberRemove,
    ];

    const fn index(self) -> usize {
        match self {
            ChangeKind::Create => 0,
            ChangeKind::Update => 1,
            ChangeKind::SoftDelete => 2,
            ChangeKind::HardDelete => 3,
            ChangeKind::Restore => 4,
            ChangeKind::MemberAdd => 5,
            ChangeKind::MemberRemove => 6,
        }
    }
}

/// One entry of the change log, as [`super::Simulator::changes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// The mutation's sequence number (1, 2, ...; contiguous).
    pub seq: u64,
    /// What happened.
    pub change: ChangeKind,
    /// The kind of the changed object.
    pub kind: ObjectKind,
    /// The changed object's id (for member changes: the group's).
    pub id: String,
    /// Properties set by a create or changed by an update, in schema order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<String>,
    /// For member changes: the member's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// For member changes: the member's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_kind: Option<ObjectKind>,
}

/// Whether an object of the ground truth is live or in deleted items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectState {
    /// Live.
    Live,
    /// Soft-deleted (restorable).
    SoftDeleted,
}

/// One existing object of the ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthObject {
    /// The object id.
    pub id: String,
    /// `#microsoft.graph.user` etc.
    #[serde(rename = "@odata.type")]
    pub odata_type: String,
    /// Live or soft-deleted.
    pub state: ObjectState,
    /// Every property that was ever set (`null` if set to null), without `id`.
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// For groups: the member ids, sorted as strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
}

/// The tenant's complete current state, for checking what a client computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// The sequence number of the last mutation (0: none yet).
    pub seq: u64,
    /// Number of mutations applied, by kind (every kind present, 0 included).
    pub mutations: BTreeMap<ChangeKind, u64>,
    /// Existing (live or soft-deleted) users, in creation order.
    pub users: Vec<TruthObject>,
    /// Existing groups, in creation order.
    pub groups: Vec<TruthObject>,
    /// Existing applications, in creation order.
    pub applications: Vec<TruthObject>,
    /// Existing devices, in creation order.
    pub devices: Vec<TruthObject>,
    /// Existing service principals, in creation order.
    pub service_principals: Vec<TruthObject>,
}

impl GroundTruth {
    /// The objects of one kind.
    pub fn objects(&self, kind: ObjectKind) -> &[TruthObject] {
        match kind {
            ObjectKind::User => &self.users,
            ObjectKind::Group => &self.groups,
            ObjectKind::Application => &self.applications,
            ObjectKind::Device => &self.devices,
            ObjectKind::ServicePrincipal => &self.service_principals,
        }
    }

    /// The object with this id, of any kind.
    pub fn find(&self, id: &str) -> Option<&TruthObject> {
        ObjectKind::ALL
            .into_iter()
            .flat_map(|k| self.objects(k))
            .find(|o| o.id == id)
    }
}

/// How many mutations of each kind churn applies to one object kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChurnCounts {
    /// New objects (generated like the initial population).
    pub creates: usize,
    /// Updates of live objects: 1–3 random properties, sometimes one set to null.
    pub updates: usize,
    /// Live objects moved to deleted items.
    pub soft_deletes: usize,
    /// Permanent deletes of live or soft-deleted objects.
    pub hard_deletes: usize,
    /// Restores of soft-deleted objects.
    pub restores: usize,
    /// Users added to groups (read under `groups` only).
    pub member_adds: usize,
    /// Members removed from groups (read under `groups` only).
    pub member_removes: usize,
}

impl ChurnCounts {
    /// The sum of all counts.
    pub fn total(&self) -> usize {
        self.creates
            + self.updates
            + self.soft_deletes
            + self.hard_deletes
            + self.restores
            + self.member_adds
            + self.member_removes
    }
}

/// A batch of random mutations, per object kind (all counts default to 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChurnSpec {
    /// Mutations of users.
    pub users: ChurnCounts,
    /// Mutations of groups, including membership changes.
    pub groups: ChurnCounts,
    /// Mutations of applications.
    pub applications: ChurnCounts,
    /// Mutations of devices.
    pub devices: ChurnCounts,
    /// Mutations of service principals.
    pub service_principals: ChurnCounts,
}

impl ChurnSpec {
    /// The counts of one kind.
    pub fn kind(&self, kind: ObjectKind) -> &ChurnCounts {
        match kind {
            ObjectKind::User => &self.users,
            ObjectKind::Group => &self.groups,
            ObjectKind::Application => &self.applications,
            ObjectKind::Device => &self.devices,
            ObjectKind::ServicePrincipal => &self.service_principals,
        }
    }

    /// The counts of one kind, mutably.
    pub fn kind_mut(&mut self, kind: ObjectKind) -> &mut ChurnCounts {
        match kind {
            ObjectKind::User => &mut self.users,
            ObjectKind::Group => &mut self.groups,
            ObjectKind::Application => &mut self.applications,
            ObjectKind::Device => &mut self.devices,
            ObjectKind::ServicePrincipal => &mut self.service_principals,
        }
    }

    /// The number of mutations asked for.
    pub fn total(&self) -> usize {
        ObjectKind::ALL.iter().map(|&k| self.kind(k).total()).sum()
    }

    /// A realistic mix of about `size` mutations: mostly user updates, some
    /// creates and deletes, group membership changes, a few app/device updates.
    pub fn mixed(size: usize) -> Self {
        let part = |pct: usize| size * pct / 100;
        let mut s = ChurnSpec {
            users: ChurnCounts {
                creates: part(10),
                updates: part(36),
                soft_deletes: part(6),
                hard_deletes: part(3),
                restores: part(3),
                ..ChurnCounts::default()
            },
            groups: ChurnCounts {
                creates: part(1),
                updates: part(6),
                member_adds: part(12),
                member_removes: part(8),
                ..ChurnCounts::default()
            },
            applications: ChurnCounts {
                updates: part(5),
                ..ChurnCounts::default()
            },
            devices: ChurnCounts {
                creates: part(2),
                updates: part(5),
                ..ChurnCounts::default()
            },
            service_principals: ChurnCounts {
                updates: part(3),
                ..ChurnCounts::default()
            },
        };
        s.users.updates += size.saturating_sub(s.total());
        s
    }
}

/// What a churn call did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Mutations applied, per kind.
    pub applied: ChurnSpec,
    /// Mutations asked for but impossible (nothing soft-deleted to restore, ...).
    pub skipped: ChurnSpec,
    /// Sequence number before the churn; the changes are `(seq_before, seq_after]`.
    pub seq_before: u64,
    /// Sequence number after the churn (includes cascaded member removals).
    pub seq_after: u64,
}

/// One direct mutation, as `POST /_sim/mutate` accepts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Mutation {
    /// Create an object; unspecified properties are generated.
    Create {
        /// The kind to create.
        kind: ObjectKind,
        /// Properties overriding the generated ones (`null` sets null).
        #[serde(default)]
        properties: serde_json::Value,
    },
    /// Change properties of a live object.
    Update {
        /// The object id.
        id: String,
        /// The new values (`null` sets null).
        properties: serde_json::Value,
    },
    /// Move a live object to deleted items.
    SoftDelete {
        /// The object id.
        id: String,
    },
    /// Delete a live or soft-deleted object permanently.
    HardDelete {
        /// The object id.
        id: String,
    },
    /// Restore a soft-deleted object.
    Restore {
        /// The object id.
        id: String,
    },
    /// Add a live member to a live group.
    AddMember {
        /// The group id.
        group: String,
        /// The member id (user, group, device or service principal).
        member: String,
    },
    /// Remove a member from a live group.
    RemoveMember {
        /// The group id.
        group: String,
        /// The member id.
        member: String,
    },
}

/// The result of one direct mutation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MutationOutcome {
    /// The created object's id (for `create`), else the mutated object's.
    pub id: String,
    /// The tenant's sequence number after the mutation.
    pub seq: u64,
}

/// Lifecycle state of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Life {
    Live,
    SoftDeleted,
    HardDeleted,
}

impl Life {
    const fn describe(self) -> &'static str {
        match self {
            Life::Live => "live",
            Life::SoftDeleted => "soft-deleted",
            Life::HardDeleted => "hard-deleted",
        }
    }
}

/// A materialized (created or mutated) object.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub life: Life,
    pub props: Props,
    /// Sequence number of the last change of each property (0: initial value).
    pub prop_seq: Vec<u64>,
    /// Sequence number of the creation (0: initial population).
    pub created_seq: u64,
    /// Sequence number of the last restore (0: never restored).
    pub restored_seq: u64,
}

/// A read-only view of one object, materialized or generated.
#[derive(Debug)]
pub(crate) struct ObjView<'a> {
    pub life: Life,
    pub props: Cow<'a, Props>,
    /// `None` for an unmutated initial object (every property from seq 0).
    pub prop_seq: Option<&'a [u64]>,
    pub created_seq: u64,
    pub restored_seq: u64,
    /// For a hard-deleted object: the seq of the delete.
    pub removed_seq: u64,
}

impl ObjView<'_> {
    /// The sequence number of the last change of property `i`.
    pub(crate) fn prop_seq(&self, i: usize) -> u64 {
        self.prop_seq.and_then(|s| s.get(i).copied()).unwrap_or(0)
    }
}

/// A set of indices with O(1) insert, remove and random pick.
#[derive(Debug, Default)]
struct IdxSet {
    items: Vec<u32>,
    pos: HashMap<u32, usize>,
}

impl IdxSet {
    fn insert(&mut self, v: u32) {
        if !self.pos.contains_key(&v) {
            self.pos.insert(v, self.items.len());
            self.items.push(v);
        }
    }

    fn remove(&mut self, v: u32) {
        if let Some(i) = self.pos.remove(&v) {
            self.items.swap_remove(i);
            if let Some(&moved) = self.items.get(i) {
                self.pos.insert(moved, i);
            }
        }
    }

    fn pick(&self, r: &mut SplitMix64) -> Option<u32> {
        self.items.get(r.below_usize(self.items.len())).copied()
    }
}

/// Per-kind storage.
#[derive(Debug)]
struct KindStore {
    /// Size of the initial (generated) population.
    base: u32,
    /// Creation seq of each created object (index `base + i`); increasing.
    created_seqs: Vec<u64>,
    /// Created or mutated objects.
    overlay: HashMap<u32, Record>,
    /// Hard-deleted objects: index → seq of the delete.
    hard_deleted: HashMap<u32, u64>,
    /// Soft-deleted objects, for restore picks.
    soft: IdxSet,
    /// Seqs of the most recent hard deletes (at most [`RECENT_HARD_DELETES`]).
    recent_hard: VecDeque<u64>,
    /// id → index of the initial population, sorted; built on first lookup.
    base_index: OnceLock<Vec<(u128, u32)>>,
    /// id → index of created objects.
    created_index: HashMap<u128, u32>,
}

impl KindStore {
    fn new(base: u32) -> Self {
        Self {
            base,
            created_seqs: Vec::new(),
            overlay: HashMap::new(),
            hard_deleted: HashMap::new(),
            soft: IdxSet::default(),
            recent_hard: VecDeque::new(),
            base_index: OnceLock::new(),
            created_index: HashMap::new(),
        }
    }

    fn total(&self) -> u32 {
        let created = u32::try_from(self.created_seqs.len()).unwrap_or(u32::MAX);
        self.base.saturating_add(created)
    }

    fn life(&self, idx: u32) -> Option<Life> {
        if self.hard_deleted.contains_key(&idx) {
            return Some(Life::HardDeleted);
        }
        match self.overlay.get(&idx) {
            Some(r) => Some(r.life),
            None if idx < self.total() => Some(Life::Live),
            None => None,
        }
    }
}

/// A group's materialized membership.
#[derive(Debug, Default)]
struct Membership {
    current: BTreeSet<Key>,
    /// `(seq, member, added)`, in seq order.
    log: Vec<(u64, Key, bool)>,
}

/// One change-log entry (compact; ids are computed when reported).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogEntry {
    pub seq: u64,
    pub key: Key,
    pub change: ChangeKind,
    /// Bit `i` set: property `i` of the schema was set/changed.
    pub props: u32,
    pub member: Option<Key>,
}

impl LogEntry {
    /// Whether this entry matters to a round tracking `select` (a mask) of its kind:
    /// Graph tracks only selected properties, and members only when selected.
    pub(crate) fn relevant_to(&self, select: u32) -> bool {
        match self.change {
            ChangeKind::Update => self.props & select != 0,
            ChangeKind::MemberAdd | ChangeKind::MemberRemove => select & MEMBERS_BIT != 0,
            _ => true,
        }
    }
}

/// The window `(since, upto]` starts before the oldest kept log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowExpired;

/// Initial population sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Population {
    pub users: u32,
    pub groups: u32,
    pub applications: u32,
    pub devices: u32,
    pub service_principals: u32,
}

/// The whole tenant state. Guarded by the simulator's `RwLock`.
#[derive(Debug)]
pub(crate) struct Tenant {
    pub ctx: GenCtx,
    kinds: [KindStore; 5],
    groups: HashMap<u32, Membership>,
    /// member → groups containing it; built on the first member deletion.
    member_of: Option<HashMap<Key, Vec<u32>>>,
    log: VecDeque<LogEntry>,
    /// Entries kept ([`LOG_RETENTION`]; smaller in tests).
    log_retention: usize,
    seq: u64,
    counts: [u64; 7],
    rng: SplitMix64,
}

impl Tenant {
    /// A tenant with the initial population `pop` and no mutations.
    pub(crate) fn new(ctx: GenCtx, pop: Population) -> Self {
        let rng = SplitMix64::new(mix(&[ctx.seed, 0xC4_0A_2D]));
        Self {
            kinds: [
                KindStore::new(pop.users),
                KindStore::new(pop.groups),
                KindStore::new(pop.applications),
                KindStore::new(pop.devices),
                KindStore::new(pop.service_principals),
            ],
            ctx,
            groups: HashMap::new(),
            member_of: None,
            log: VecDeque::new(),
            log_retention: LOG_RETENTION,
            seq: 0,
            counts: [0; 7],
            rng,
        }
    }

    /// Keeps only the last `n` log entries (tests of token expiry).
    #[cfg(test)]
    pub(crate) fn set_log_retention(&mut self, n: usize) {
        self.log_retention = n;
    }

    // ----- reading ---------------------------------------------------------

    /// The sequence number of the last mutation.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    fn store(&self, kind: ObjectKind) -> &KindStore {
        &self.kinds[kind.index()]
    }

    fn store_mut(&mut self, kind: ObjectKind) -> &mut KindStore {
        &mut self.kinds[kind.index()]
    }

    /// Number of objects of `kind` ever created (indices `0..total`).
    pub(crate) fn total(&self, kind: ObjectKind) -> u32 {
        self.store(kind).total()
    }

    /// Number of objects of `kind` that existed (in any state) at `seq`.
    pub(crate) fn count_at(&self, kind: ObjectKind, seq: u64) -> u32 {
        let s = self.store(kind);
        let created = s.created_seqs.partition_point(|&c| c <= seq);
        s.base
            .saturating_add(u32::try_from(created).unwrap_or(u32::MAX))
    }

    /// The seq from which a hard-deleted object still shows in initial rounds.
    pub(crate) fn recent_hard_threshold(&self, kind: ObjectKind) -> u64 {
        let s = self.store(kind);
        if s.recent_hard.len() < RECENT_HARD_DELETES {
            0
        } else {
            s.recent_hard.front().copied().unwrap_or(0)
        }
    }

    /// The id of `key`.
    pub(crate) fn id(&self, key: Key) -> Uuid {
        self.ctx.id(key)
    }

    /// The lifecycle state of `key`, `None` if it was never created.
    pub(crate) fn life(&self, key: Key) -> Option<Life> {
        self.store(key.kind).life(key.idx)
    }

    /// A view of `key`'s current state.
    pub(crate) fn view(&self, key: Key) -> Option<ObjView<'_>> {
        let store = self.store(key.kind);
        if let Some(&removed_seq) = store.hard_deleted.get(&key.idx) {
            return Some(ObjView {
                life: Life::HardDeleted,
                props: Cow::Owned(Vec::new()),
                prop_seq: None,
                created_seq: 0,
                restored_seq: 0,
                removed_seq,
            });
        }
        match store.overlay.get(&key.idx) {
            Some(r) => Some(ObjView {
                life: r.life,
                props: Cow::Borrowed(&r.props),
                prop_seq: Some(&r.prop_seq),
                created_seq: r.created_seq,
                restored_seq: r.restored_seq,
                removed_seq: 0,
            }),
            None if key.idx < store.base => Some(ObjView {
                life: Life::Live,
                props: Cow::Owned(self.ctx.generate(key)),
                prop_seq: None,
                created_seq: 0,
                restored_seq: 0,
                removed_seq: 0,
            }),
            None => None,
        }
    }

    /// Finds the object with id `id` among all kinds.
    pub(crate) fn resolve(&self, id: Uuid) -> Option<Key> {
        let want = id.as_u128();
        ObjectKind::ALL.into_iter().find_map(|kind| {
            let store = self.store(kind);
            if let Some(&idx) = store.created_index.get(&want) {
                return Some(Key::new(kind, idx));
            }
            let index = store.base_index.get_or_init(|| {
                let mut v: Vec<(u128, u32)> = (0..store.base)
                    .map(|i| (self.ctx.id(Key::new(kind, i)).as_u128(), i))
                    .collect();
                v.sort_unstable();
                v
            });
            index
                .binary_search_by_key(&want, |e| e.0)
                .ok()
                .and_then(|p| index.get(p))
                .map(|e| Key::new(kind, e.1))
        })
    }

    /// Parses and resolves an id string.
    pub(crate) fn resolve_str(&self, id: &str) -> Result<Key, SimError> {
        let uuid = Uuid::parse_str(id).map_err(|_| SimError::InvalidId { id: id.to_owned() })?;
        self.resolve(uuid)
            .ok_or_else(|| SimError::UnknownObject { id: id.to_owned() })
    }

    /// The member list of group `g` as of `seq`, sorted.
    pub(crate) fn members_at(&self, g: u32, seq: u64) -> Vec<Key> {
        match self.groups.get(&g) {
            Some(m) => {
                let mut set = m.current.clone();
                for &(s, member, added) in m.log.iter().rev() {
                    if s <= seq {
                        break;
                    }
                    if added {
                        set.remove(&member);
                    } else {
                        set.insert(member);
                    }
                }
                set.into_iter().collect()
            }
            None if g < self.store(ObjectKind::Group).base => self.ctx.base_members(g),
            None => Vec::new(),
        }
    }

    /// Net membership change of group `g` over `(since, upto]`: (added, removed), sorted.
    pub(crate) fn member_delta(&self, g: u32, since: u64, upto: u64) -> (Vec<Key>, Vec<Key>) {
        let Some(m) = self.groups.get(&g) else {
            return (Vec::new(), Vec::new());
        };
        if m.log.last().is_none_or(|e| e.0 <= since) {
            return (Vec::new(), Vec::new());
        }
        let mut set = m.current.clone();
        let mut at_upto = None;
        for &(s, member, added) in m.log.iter().rev() {
            if s <= since {
                break;
            }
            if s <= upto && at_upto.is_none() {
                at_upto = Some(set.clone());
            }
            if added {
                set.remove(&member);
            } else {
                set.insert(member);
            }
        }
        let at_since = set;
        let at_upto = at_upto.unwrap_or_else(|| at_since.clone());
        (
            at_upto.difference(&at_since).copied().collect(),
            at_since.difference(&at_upto).copied().collect(),
        )
    }

    /// Everyone who was ever a member of `g` up to `upto` but is not at `upto`.
    pub(crate) fn former_members(&self, g: u32, upto: u64, current: &[Key]) -> Vec<Key> {
        let mut ever: BTreeSet<Key> = if g < self.store(ObjectKind::Group).base {
            self.ctx.base_members(g).into_iter().collect()
        } else {
            BTreeSet::new()
        };
        if let Some(m) = self.groups.get(&g) {
            ever.extend(m.log.iter().filter(|e| e.0 <= upto).map(|e| e.1));
        }
        for k in current {
            ever.remove(k);
        }
        ever.into_iter().collect()
    }

    /// Distinct objects with a change in `(since, upto]` accepted by `keep`,
    /// in order of their first change in the window.
    pub(crate) fn window(
        &self,
        since: u64,
        upto: u64,
        mut keep: impl FnMut(&LogEntry) -> bool,
    ) -> Result<Vec<Key>, WindowExpired> {
        if upto <= since {
            return Ok(Vec::new());
        }
        let first = self.log.front().map_or(self.seq + 1, |e| e.seq);
        if since + 1 < first {
            return Err(WindowExpired);
        }
        let start = (since + 1 - first) as usize;
        let end = ((upto + 1).saturating_sub(first) as usize).min(self.log.len());
        let start = start.min(end);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for e in self.log.range(start..end) {
            if keep(e) && seen.insert(e.key) {
                out.push(e.key);
            }
        }
        Ok(out)
    }

    /// The change log from `since` (exclusive), as public records.
    pub(crate) fn changes(&self, since: u64) -> Vec<ChangeRecord> {
        self.log
            .iter()
            .filter(|e| e.seq > since)
            .map(|e| ChangeRecord {
                seq: e.seq,
                change: e.change,
                kind: e.key.kind,
                id: self.id(e.key).to_string(),
                properties: e
                    .key
                    .kind
                    .schema()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| e.props & (1 << i) != 0)
                    .map(|(_, p)| p.name.to_owned())
                    .collect(),
                member: e.member.map(|m| self.id(m).to_string()),
                member_kind: e.member.map(|m| m.kind),
            })
            .collect()
    }

    /// The complete current state.
    pub(crate) fn truth(&self) -> GroundTruth {
        let objects = |kind: ObjectKind| -> Vec<TruthObject> {
            (0..self.total(kind))
                .filter_map(|idx| {
                    let key = Key::new(kind, idx);
                    let view = self.view(key)?;
                    let state = match view.life {
                        Life::Live => ObjectState::Live,
                        Life::SoftDeleted => ObjectState::SoftDeleted,
                        Life::HardDeleted => return None,
                    };
                    let properties = kind
                        .schema()
                        .iter()
                        .zip(view.props.iter())
                        .filter_map(|(def, v)| {
                            v.as_ref().map(|v| (def.name.to_owned(), v.to_json()))
                        })
                        .collect();
                    let members = (kind == ObjectKind::Group).then(|| {
                        let mut ids: Vec<String> = self
                            .members_at(idx, self.seq)
                            .into_iter()
                            .map(|m| self.id(m).to_string())
                            .collect();
                        ids.sort_unstable();
                        ids
                    });
                    Some(TruthObject {
                        id: self.id(key).to_string(),
                        odata_type: kind.odata_type().to_owned(),
                        state,
                        properties,
                        members,
                    })
                })
                .collect()
        };
        GroundTruth {
            seq: self.seq,
            mutations: ChangeKind::ALL
                .into_iter()
                .map(|c| (c, self.counts[c.index()]))
                .collect(),
            users: objects(ObjectKind::User),
            groups: objects(ObjectKind::Group),
            applications: objects(ObjectKind::Application),
            devices: objects(ObjectKind::Device),
            service_principals: objects(ObjectKind::ServicePrincipal),
        }
    }

    // ----- mutating --------------------------------------------------------

    /// Appends a change-log entry and returns its seq.
    fn log(&mut self, key: Key, change: ChangeKind, props: u32, member: Option<Key>) -> u64 {
        self.seq += 1;
        self.counts[change.index()] += 1;
        self.log.push_back(LogEntry {
            seq: self.seq,
            key,
            change,
            props,
            member,
        });
        while self.log.len() > self.log_retention {
            self.log.pop_front();
        }
        self.seq
    }

    /// The record of `key`, materializing an initial object on first mutation.
    fn record_mut(&mut self, key: Key) -> Option<&mut Record> {
        let ctx = &self.ctx;
        let store = &mut self.kinds[key.kind.index()];
        if store.hard_deleted.contains_key(&key.idx) {
            return None;
        }
        if key.idx >= store.base && !store.overlay.contains_key(&key.idx) {
            return None;
        }
        Some(store.overlay.entry(key.idx).or_insert_with(|| {
            let props = ctx.generate(key);
            let n = props.len();
            Record {
                life: Life::Live,
                props,
                prop_seq: vec![0; n],
                created_seq: 0,
                restored_seq: 0,
            }
        }))
    }

    /// Converts a JSON properties object into schema-indexed values.
    pub(crate) fn parse_props(
        kind: ObjectKind,
        props: &serde_json::Value,
        allow_read_only: bool,
    ) -> Result<Vec<(usize, Value)>, SimError> {
        let map = match props {
            serde_json::Value::Null => return Ok(Vec::new()),
            serde_json::Value::Object(m) => m,
            _ => return Err(SimError::PropertiesNotAnObject),
        };
        let mut out = Vec::with_capacity(map.len());
        for (name, v) in map {
            let Some(i) = kind.prop_index(name) else {
                return Err(SimError::UnknownProperty {
                    kind,
                    name: name.clone(),
                });
            };
            let def = &kind.schema()[i];
            if !def.mutable && !allow_read_only {
                return Err(SimError::ReadOnlyProperty {
                    kind,
                    name: name.clone(),
                });
            }
            let value = Value::from_json(def.ty, v).ok_or_else(|| SimError::InvalidValue {
                kind,
                name: name.clone(),
                value: v.to_string(),
            })?;
            out.push((i, value));
        }
        Ok(out)
    }

    /// Creates an object of `kind`: generated properties, then `overrides`.
    pub(crate) fn create(
        &mut self,
        kind: ObjectKind,
        overrides: Vec<(usize, Value)>,
    ) -> Result<Key, SimError> {
        let idx = self.total(kind);
        if idx == u32::MAX {
            return Err(SimError::TenantFull { kind });
        }
        let key = Key::new(kind, idx);
        let mut props = self.ctx.generate(key);
        for (i, v) in overrides {
            if let Some(slot) = props.get_mut(i) {
                *slot = Some(v);
            }
        }
        let mask = props
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .fold(0u32, |m, (i, _)| m | (1 << i));
        let seq = self.log(key, ChangeKind::Create, mask, None);
        let id = self.ctx.id(key).as_u128();
        let n = props.len();
        let store = self.store_mut(kind);
        store.created_seqs.push(seq);
        store.created_index.insert(id, idx);
        store.overlay.insert(
            idx,
            Record {
                life: Life::Live,
                props,
                prop_seq: vec![seq; n],
                created_seq: seq,
                restored_seq: 0,
            },
        );
        Ok(key)
    }

    fn expect_life(&self, key: Key, want: &[Life], op: &'static str) -> Result<(), SimError> {
        match self.life(key) {
            Some(l) if want.contains(&l) => Ok(()),
            Some(l) => Err(SimError::WrongState {
                id: self.id(key).to_string(),
                state: l.describe(),
                op,
            }),
            None => Err(SimError::UnknownObject {
                id: self.id(key).to_string(),
            }),
        }
    }

    /// Sets properties of a live object; returns the seq, or `None` if nothing changed.
    pub(crate) fn update(
        &mut self,
        key: Key,
        changes: Vec<(usize, Value)>,
    ) -> Result<Option<u64>, SimError> {
        self.expect_life(key, &[Life::Live], "update")?;
        let seq = self.seq + 1;
        let Some(rec) = self.record_mut(key) else {
            return Ok(None);
        };
        let mut mask = 0u32;
        for (i, v) in changes {
            if let (Some(slot), Some(ps)) = (rec.props.get_mut(i), rec.prop_seq.get_mut(i)) {
                if slot.as_ref() != Some(&v) {
                    *slot = Some(v);
                    *ps = seq;
                    mask |= 1 << i;
                }
            }
        }
        if mask == 0 {
            return Ok(None);
        }
        Ok(Some(self.log(key, ChangeKind::Update, mask, None)))
    }

    /// Moves a live object to deleted items, dropping its group memberships.
    pub(crate) fn soft_delete(&mut self, key: Key) -> Result<u64, SimError> {
        self.expect_life(key, &[Life::Live], "soft-delete")?;
        let seq = self.log(key, ChangeKind::SoftDelete, 0, None);
        if let Some(rec) = self.record_mut(key) {
            rec.life = Life::SoftDeleted;
        }
        self.store_mut(key.kind).soft.insert(key.idx);
        self.drop_memberships(key);
        Ok(seq)
    }

    /// Deletes a live or soft-deleted object permanently.
    pub(crate) fn hard_delete(&mut self, key: Key) -> Result<u64, SimError> {
        self.expect_life(key, &[Life::Live, Life::SoftDeleted], "hard-delete")?;
        let was_live = self.life(key) == Some(Life::Live);
        let seq = self.log(key, ChangeKind::HardDelete, 0, None);
        if was_live {
            self.drop_memberships(key);
        }
        if key.kind == ObjectKind::Group {
            let members = self.members_at(key.idx, self.seq);
            if let Some(index) = self.member_of.as_mut() {
                for m in members {
                    if let Some(gs) = index.get_mut(&m) {
                        gs.retain(|&g| g != key.idx);
                    }
                }
            }
            self.groups.remove(&key.idx);
        }
        let store = self.store_mut(key.kind);
        store.overlay.remove(&key.idx);
        store.soft.remove(key.idx);
        store.hard_deleted.insert(key.idx, seq);
        store.recent_hard.push_back(seq);
        if store.recent_hard.len() > RECENT_HARD_DELETES {
            store.recent_hard.pop_front();
        }
        Ok(seq)
    }

    /// Restores a soft-deleted object (its former memberships are not restored).
    pub(crate) fn restore(&mut self, key: Key) -> Result<u64, SimError> {
        self.expect_life(key, &[Life::SoftDeleted], "restore")?;
        let seq = self.log(key, ChangeKind::Restore, 0, None);
        if let Some(rec) = self.record_mut(key) {
            rec.life = Life::Live;
            rec.restored_seq = seq;
        }
        self.store_mut(key.kind).soft.remove(key.idx);
        Ok(seq)
    }

    fn ensure_membership(&mut self, g: u32) -> &mut Membership {
        let base = self.store(ObjectKind::Group).base;
        let ctx = &self.ctx;
        self.groups.entry(g).or_insert_with(|| Membership {
            current: if g < base {
                ctx.base_members(g).into_iter().collect()
            } else {
                BTreeSet::new()
            },
            log: Vec::new(),
        })
    }

    fn ensure_member_of(&mut self) {
        if self.member_of.is_some() {
            return;
        }
        let mut index: HashMap<Key, Vec<u32>> = HashMap::new();
        for g in 0..self.total(ObjectKind::Group) {
            if self.life(Key::new(ObjectKind::Group, g)) == Some(Life::HardDeleted) {
                continue;
            }
            for m in self.members_at(g, self.seq) {
                index.entry(m).or_default().push(g);
            }
        }
        self.member_of = Some(index);
    }

    /// Removes `member` from every group containing it (logged per group).
    fn drop_memberships(&mut self, member: Key) {
        self.ensure_member_of();
        let groups = self
            .member_of
            .as_mut()
            .and_then(|i| i.remove(&member))
            .unwrap_or_default();
        for g in groups {
            if self.ensure_membership(g).current.remove(&member) {
                let seq = self.log(
                    Key::new(ObjectKind::Group, g),
                    ChangeKind::MemberRemove,
                    0,
                    Some(member),
                );
                self.ensure_membership(g).log.push((seq, member, false));
            }
        }
    }

    fn expect_group(&self, g: Key) -> Result<(), SimError> {
        if g.kind != ObjectKind::Group {
            return Err(SimError::NotAGroup {
                id: self.id(g).to_string(),
            });
        }
        self.expect_life(g, &[Life::Live], "change members of")
    }

    /// Adds a live member to a live group.
    pub(crate) fn add_member(&mut self, g: Key, m: Key) -> Result<u64, SimError> {
        self.expect_group(g)?;
        if m.kind == ObjectKind::Application || m == g {
            return Err(SimError::InvalidMember {
                id: self.id(m).to_string(),
                kind: m.kind,
            });
        }
        self.expect_life(m, &[Life::Live], "add as a member")?;
        if !self.ensure_membership(g.idx).current.insert(m) {
            return Err(SimError::AlreadyMember {
                group: self.id(g).to_string(),
                member: self.id(m).to_string(),
            });
        }
        let seq = self.log(g, ChangeKind::MemberAdd, 0, Some(m));
        self.ensure_membership(g.idx).log.push((seq, m, true));
        if let Some(index) = self.member_of.as_mut() {
            index.entry(m).or_default().push(g.idx);
        }
        Ok(seq)
    }

    /// Removes a member from a live group.
    pub(crate) fn remove_member(&mut self, g: Key, m: Key) -> Result<u64, SimError> {
        self.expect_group(g)?;
        if !self.ensure_membership(g.idx).current.remove(&m) {
            return Err(SimError::NotAMember {
                group: self.id(g).to_string(),
                member: self.id(m).to_string(),
            });
        }
        let seq = self.log(g, ChangeKind::MemberRemove, 0, Some(m));
        self.ensure_membership(g.idx).log.push((seq, m, false));
        if let Some(gs) = self.member_of.as_mut().and_then(|i| i.get_mut(&m)) {
            gs.retain(|&x| x != g.idx);
        }
        Ok(seq)
    }

    // ----- churn -----------------------------------------------------------

    /// A random object of `kind` in state `life`.
    fn pick(&mut self, kind: ObjectKind, life: Life) -> Option<Key> {
        if life == Life::SoftDeleted {
            let store = &self.kinds[kind.index()];
            return store.soft.pick(&mut self.rng).map(|i| Key::new(kind, i));
        }
        let total = self.total(kind);
        if total == 0 {
            return None;
        }
        for _ in 0..64 {
            let idx = self.rng.below(u64::from(total)) as u32;
            if self.store(kind).life(idx) == Some(life) {
                return Some(Key::new(kind, idx));
            }
        }
        // Mostly deleted tenant: scan from a random start.
        let start = self.rng.below(u64::from(total)) as u32;
        (0..total)
            .map(|i| (start + i) % total)
            .find(|&idx| self.store(kind).life(idx) == Some(life))
            .map(|idx| Key::new(kind, idx))
    }

    /// 1–3 random property changes for a live object, sometimes one to null.
    fn random_changes(&mut self, key: Key) -> Vec<(usize, Value)> {
        let schema = key.kind.schema();
        let mut mutable: Vec<usize> = (0..schema.len()).filter(|&i| schema[i].mutable).collect();
        self.rng.shuffle(&mut mutable);
        let n = 1 + self.rng.below_usize(3);
        let null_one = self.rng.chance(0.2);
        let current = self
            .view(key)
            .map(|v| v.props.into_owned())
            .unwrap_or_default();
        let mut out = Vec::new();
        for (pos, &i) in mutable.iter().take(n).enumerate() {
            let def = &schema[i];
            let mut value = if null_one && pos == 0 && def.nullable {
                Value::Null
            } else {
                self.ctx.random_value(&mut self.rng, key.kind, def)
            };
            // Make sure it is a change; regenerate a few times if needed.
            for _ in 0..4 {
                if current.get(i).and_then(Option::as_ref) != Some(&value) {
                    break;
                }
                value = self.ctx.random_value(&mut self.rng, key.kind, def);
            }
            out.push((i, value));
        }
        out
    }

    /// Applies a batch of random mutations.
    pub(crate) fn churn(&mut self, spec: &ChurnSpec) -> ChurnReport {
        let mut report = ChurnReport {
            seq_before: self.seq,
            ..ChurnReport::default()
        };
        for kind in ObjectKind::ALL {
            let want = *spec.kind(kind);
            let mut done = ChurnCounts::default();
            for _ in 0..want.creates {
                if self.create(kind, Vec::new()).is_ok() {
                    done.creates += 1;
                }
            }
            for _ in 0..want.updates {
                if let Some(key) = self.pick(kind, Life::Live) {
                    let changes = self.random_changes(key);
                    if matches!(self.update(key, changes), Ok(Some(_))) {
                        done.updates += 1;
                    }
                }
            }
            for _ in 0..want.restores {
                if let Some(key) = self.pick(kind, Life::SoftDeleted) {
                    if self.restore(key).is_ok() {
                        done.restores += 1;
                    }
                }
            }
            for _ in 0..want.soft_deletes {
                if let Some(key) = self.pick(kind, Life::Live) {
                    if self.soft_delete(key).is_ok() {
                        done.soft_deletes += 1;
                    }
                }
            }
            for _ in 0..want.hard_deletes {
                let from_soft = self.rng.chance(0.5);
                let key = if from_soft {
                    self.pick(kind, Life::SoftDeleted)
                        .or_else(|| self.pick(kind, Life::Live))
                } else {
                    self.pick(kind, Life::Live)
                        .or_else(|| self.pick(kind, Life::SoftDeleted))
                };
                if let Some(key) = key {
                    if self.hard_delete(key).is_ok() {
                        done.hard_deletes += 1;
                    }
                }
            }
            if kind == ObjectKind::Group {
                for _ in 0..want.member_adds {
                    if self.churn_member_add() {
                        done.member_adds += 1;
                    }
                }
                for _ in 0..want.member_removes {
                    if self.churn_member_remove() {
                        done.member_removes += 1;
                    }
                }
            }
            let skipped = report.skipped.kind_mut(kind);
            skipped.creates = want.creates - done.creates;
            skipped.updates = want.updates - done.updates;
            skipped.restores = want.restores - done.restores;
            skipped.soft_deletes = want.soft_deletes - done.soft_deletes;
            skipped.hard_deletes = want.hard_deletes - done.hard_deletes;
            skipped.member_adds = want.member_adds - done.member_adds;
            skipped.member_removes = want.member_removes - done.member_removes;
            *report.applied.kind_mut(kind) = done;
        }
        report.seq_after = self.seq;
        report
    }

    fn churn_member_add(&mut self) -> bool {
        for _ in 0..16 {
            let (Some(g), Some(u)) = (
                self.pick(ObjectKind::Group, Life::Live),
                self.pick(ObjectKind::User, Life::Live),
            ) else {
                return false;
            };
            if self.add_member(g, u).is_ok() {
                return true;
            }
        }
        false
    }

    fn churn_member_remove(&mut self) -> bool {
        for _ in 0..16 {
            let Some(g) = self.pick(ObjectKind::Group, Life::Live) else {
                return false;
            };
            let members = self.members_at(g.idx, self.seq);
            if members.is_empty() {
                continue;
            }
            let m = members[self.rng.below_usize(members.len())];
            if self.remove_member(g, m).is_ok() {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(users: u32, groups: u32) -> Tenant {
        let ctx = GenCtx::new(7, "contoso.onmicrosoft.com", 10, users, 5);
        Tenant::new(
            ctx,
            Population {
                users,
                groups,
                applications: 5,
                devices: 5,
                service_principals: 5,
            },
        )
    }

    const U: ObjectKind = ObjectKind::User;
    const G: ObjectKind = ObjectKind::Group;

    #[test]
    fn a_million_users_cost_nothing_until_touched() {
        let t = tenant(1_000_000, 10);
        assert_eq!(t.total(U), 1_000_000);
        assert!(t.store(U).overlay.is_empty());
        let v = t.view(Key::new(U, 999_999)).unwrap();
        assert_eq!(v.life, Life::Live);
    }

    #[test]
    fn mutations_log_contiguous_seqs_and_track_properties() {
        let mut t = tenant(10, 2);
        let u = Key::new(U, 3);
        let s1 = t
            .update(u, vec![(5, Value::Str("Pilot".into())), (8, Value::Null)])
            .unwrap()
            .unwrap();
        assert_eq!(s1, 1);
        // A no-op update logs nothing.
        assert_eq!(
            t.update(u, vec![(5, Value::Str("Pilot".into()))]).unwrap(),
            None
        );
        let v = t.view(u).unwrap();
        assert_eq!(v.prop_seq(5), 1);
        assert_eq!(v.props[8], Some(Value::Null));
        assert_eq!(v.prop_seq(0), 0);
        let s2 = t.soft_delete(u).unwrap();
        assert_eq!(s2, 2);
        // Member removals cascade after the delete itself.
        assert!(
            t.changes(s2)
                .iter()
                .all(|c| c.change == ChangeKind::MemberRemove)
        );
        assert!(matches!(
            t.update(u, vec![(0, Value::Str("x".into()))]),
            Err(SimError::WrongState { .. })
        ));
        t.restore(u).unwrap();
        t.hard_delete(u).unwrap();
        assert_eq!(t.life(u), Some(Life::HardDeleted));
        assert!(t.restore(u).is_err());
        let seqs: Vec<u64> = t.changes(0).iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (1..=t.seq()).collect::<Vec<_>>());
    }

    #[test]
    fn deleting_a_user_removes_and_logs_its_memberships() {
        let mut t = tenant(30, 3);
        let g = Key::new(G, 0);
        let before = t.members_at(0, 0);
        let victim = before[0];
        t.soft_delete(victim).unwrap();
        let after = t.members_at(0, t.seq());
        assert!(!after.contains(&victim));
        assert_eq!(after.len(), before.len() - 1);
        // The membership as of seq 0 is still reconstructible.
        assert_eq!(t.members_at(0, 0), before);
        let (added, removed) = t.member_delta(0, 0, t.seq());
        assert!(added.is_empty());
        assert_eq!(removed, vec![victim]);
        assert!(
            t.changes(0)
                .iter()
                .any(|c| c.change == ChangeKind::MemberRemove && c.id == t.id(g).to_string())
        );
    }

    #[test]
    fn member_delta_is_net_and_window_bounded() {
        let mut t = tenant(30, 2);
        let g = Key::new(G, 1);
        let outsider = (0..30)
            .map(|i| Key::new(U, i))
            .find(|k| !t.members_at(1, 0).contains(k))
            .unwrap();
        let s1 = t.add_member(g, outsider).unwrap();
        let s2 = t.remove_member(g, outsider).unwrap();
        assert_eq!(
            t.member_delta(1, 0, s2),
            (vec![], vec![]),
            "add+remove nets out"
        );
        assert_eq!(t.member_delta(1, 0, s1), (vec![outsider], vec![]));
        assert_eq!(t.member_delta(1, s1, s2), (vec![], vec![outsider]));
        assert!(t.add_member(g, outsider).is_ok());
        assert!(matches!(
            t.add_member(g, outsider),
            Err(SimError::AlreadyMember { .. })
        ));
    }

    #[test]
    fn window_dedupes_and_respects_select_relevance() {
        let mut t = tenant(10, 2);
        let a = Key::new(U, 1);
        let b = Key::new(U, 2);
        t.update(a, vec![(5, Value::Str("A".into()))]).unwrap();
        t.update(b, vec![(0, Value::Str("B".into()))]).unwrap();
        t.update(a, vec![(0, Value::Str("C".into()))]).unwrap();
        let all = t.window(0, t.seq(), |_| true).unwrap();
        assert_eq!(all, vec![a, b]);
        // Select only jobTitle (bit 5): b's displayName change is not tracked.
        let sel = t.window(0, t.seq(), |e| e.relevant_to(1 << 5)).unwrap();
        assert_eq!(sel, vec![a]);
        assert_eq!(t.window(1, 2, |_| true).unwrap(), vec![b]);
    }

    #[test]
    fn ids_resolve_for_initial_and_created_objects() {
        let mut t = tenant(100, 2);
        let k = Key::new(U, 42);
        assert_eq!(t.resolve(t.id(k)), Some(k));
        let c = t.create(ObjectKind::Device, vec![]).unwrap();
        assert_eq!(t.resolve(t.id(c)), Some(c));
        assert_eq!(t.resolve(Uuid::nil()), None);
        assert_eq!(t.count_at(ObjectKind::Device, 0), 5);
        assert_eq!(t.count_at(ObjectKind::Device, t.seq()), 6);
    }

    #[test]
    fn old_windows_expire_with_the_log() {
        let mut t = tenant(10, 1);
        t.log_retention = 3;
        for i in 0..6 {
            t.update(Key::new(U, i), vec![(5, Value::Str(format!("t{i}")))])
                .unwrap();
        }
        assert_eq!(t.changes(0).len(), 3);
        assert_eq!(t.window(0, 6, |_| true), Err(WindowExpired));
        assert_eq!(t.window(3, 6, |_| true).unwrap().len(), 3);
    }

    #[test]
    fn churn_is_deterministic_and_reports() {
        let spec = ChurnSpec::mixed(200);
        assert_eq!(spec.total(), 200);
        let mut a = tenant(500, 20);
        let mut b = tenant(500, 20);
        let ra = a.churn(&spec);
        let rb = b.churn(&spec);
        assert_eq!(ra, rb);
        assert_eq!(a.truth(), b.truth());
        assert!(ra.seq_after >= ra.seq_before + ra.applied.total() as u64);
        assert_eq!(ra.applied.total() + ra.skipped.total(), 200);
        assert!(ra.applied.users.updates > 0);
    }

    #[test]
    fn truth_reports_states_and_sorted_members() {
        let mut t = tenant(20, 2);
        t.soft_delete(Key::new(U, 0)).unwrap();
        t.hard_delete(Key::new(U, 1)).unwrap();
        let truth = t.truth();
        assert_eq!(truth.users.len(), 19);
        assert_eq!(truth.users[0].state, ObjectState::SoftDeleted);
        let members = truth.groups[0].members.as_ref().unwrap();
        assert!(members.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(truth.mutations[&ChangeKind::SoftDelete], 1);
        assert_eq!(truth.mutations[&ChangeKind::HardDelete], 1);
    }
}

//! The synthetic directory's object model: kinds, property schemas, values,
//! ids, and the deterministic generator of every object's initial state.
//!
//! Nothing here holds state. An object of the initial population is a pure
//! function of `(seed, kind, index)`, so a tenant of a million users costs no
//! memory until an object is mutated (see [`super::tenant`]).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::rng::{SplitMix64, mix};

/// A directory object type the simulator models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// `microsoft.graph.user`, served at `/users/delta`.
    User,
    /// `microsoft.graph.group`, served at `/groups/delta`, with `members@delta`.
    Group,
    /// `microsoft.graph.application`, served at `/applications/delta`.
    Application,
    /// `microsoft.graph.device`, served at `/devices/delta`.
    Device,
    /// `microsoft.graph.servicePrincipal`, served at `/servicePrincipals/delta`.
    ServicePrincipal,
}

impl ObjectKind {
    /// Every kind, in the order `/directoryObjects/delta` enumerates them.
    pub const ALL: [ObjectKind; 5] = [
        ObjectKind::User,
        ObjectKind::Group,
        ObjectKind::Application,
        ObjectKind::Device,
        ObjectKind::ServicePrincipal,
    ];

    /// Position in [`ObjectKind::ALL`].
    pub const fn index(self) -> usize {
        match self {
            ObjectKind::User => 0,
            ObjectKind::Group => 1,
            ObjectKind::Application => 2,
            ObjectKind::Device => 3,
            ObjectKind::ServicePrincipal => 4,
        }
    }

    /// The OData type name without `#`, e.g. `microsoft.graph.user`.
    pub const fn type_name(self) -> &'static str {
        match self {
            ObjectKind::User => "microsoft.graph.user",
            ObjectKind::Group => "microsoft.graph.group",
            ObjectKind::Application => "microsoft.graph.application",
            ObjectKind::Device => "microsoft.graph.device",
            ObjectKind::ServicePrincipal => "microsoft.graph.servicePrincipal",
        }
    }

    /// The `@odata.type` annotation value, e.g. `#microsoft.graph.user`.
    pub const fn odata_type(self) -> &'static str {
        match self {
            ObjectKind::User => "#microsoft.graph.user",
            ObjectKind::Group => "#microsoft.graph.group",
            ObjectKind::Application => "#microsoft.graph.application",
            ObjectKind::Device => "#microsoft.graph.device",
            ObjectKind::ServicePrincipal => "#microsoft.graph.servicePrincipal",
        }
    }

    /// The collection's URL segment, e.g. `users`.
    pub const fn collection(self) -> &'static str {
        match self {
            ObjectKind::User => "users",
            ObjectKind::Group => "groups",
            ObjectKind::Application => "applications",
            ObjectKind::Device => "devices",
            ObjectKind::ServicePrincipal => "servicePrincipals",
        }
    }

    /// The kind whose OData type name is `name` (`microsoft.graph.user`), ignoring case.
    pub fn from_type_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.type_name().eq_ignore_ascii_case(name))
    }

    /// The property schema of this kind, in the order objects are serialized.
    pub(crate) const fn schema(self) -> &'static [PropDef] {
        match self {
            ObjectKind::User => USER_PROPS,
            ObjectKind::Group => GROUP_PROPS,
            ObjectKind::Application => APPLICATION_PROPS,
            ObjectKind::Device => DEVICE_PROPS,
            ObjectKind::ServicePrincipal => SERVICE_PRINCIPAL_PROPS,
        }
    }

    /// The index of property `name` in [`ObjectKind::schema`].
    pub(crate) fn prop_index(self, name: &str) -> Option<usize> {
        self.schema().iter().position(|p| p.name == name)
    }

    /// A select mask with every property (and, for groups, `members`).
    pub(crate) const fn full_mask(self) -> u32 {
        let props = (1u32 << self.schema().len()) - 1;
        match self {
            ObjectKind::Group => props | MEMBERS_BIT,
            _ => props,
        }
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.collection())
    }
}

/// The bit of a select mask that stands for the `members` navigation property.
pub(crate) const MEMBERS_BIT: u32 = 1 << 31;

/// The JSON type of a property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropType {
    /// A string.
    Str,
    /// A boolean.
    Bool,
    /// An array of strings.
    StrList,
}

/// One property of a kind's schema.
#[derive(Debug)]
pub(crate) struct PropDef {
    /// The Graph property name.
    pub name: &'static str,
    /// Its JSON type.
    pub ty: PropType,
    /// Whether updates may change it (ids and creation times may not).
    pub mutable: bool,
    /// Whether churn may set it to `null`.
    pub nullable: bool,
}

const fn p(name: &'static str, ty: PropType, mutable: bool, nullable: bool) -> PropDef {
    PropDef {
        name,
        ty,
        mutable,
        nullable,
    }
}

use PropType::{Bool, Str, StrList};

static USER_PROPS: &[PropDef] = &[
    p("displayName", Str, true, false),
    p("givenName", Str, true, true),
    p("surname", Str, true, true),
    p("userPrincipalName", Str, true, false),
    p("mail", Str, true, true),
    p("jobTitle", Str, true, true),
    p("department", Str, true, true),
    p("officeLocation", Str, true, true),
    p("mobilePhone", Str, true, true),
    p("businessPhones", StrList, true, false),
    p("accountEnabled", Bool, true, false),
    p("usageLocation", Str, true, true),
    p("createdDateTime", Str, false, false),
];

static GROUP_PROPS: &[PropDef] = &[
    p("displayName", Str, true, false),
    p("description", Str, true, true),
    p("mailNickname", Str, true, false),
    p("mailEnabled", Bool, true, false),
    p("securityEnabled", Bool, true, false),
    p("groupTypes", StrList, true, false),
    p("createdDateTime", Str, false, false),
];

static APPLICATION_PROPS: &[PropDef] = &[
    p("displayName", Str, true, false),
    p("appId", Str, false, false),
    p("signInAudience", Str, true, false),
];

static DEVICE_PROPS: &[PropDef] = &[
    p("displayName", Str, true, false),
    p("deviceId", Str, false, false),
    p("operatingSystem", Str, true, true),
    p("accountEnabled", Bool, true, false),
];

static SERVICE_PRINCIPAL_PROPS: &[PropDef] = &[
    p("displayName", Str, true, false),
    p("appId", Str, false, false),
    p("servicePrincipalType", Str, true, false),
];

/// A property value. "Never set" is represented outside, as `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    /// Explicitly set to `null` (Graph returns it as `null`).
    Null,
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// An array of strings.
    List(Vec<String>),
}

impl Value {
    /// Converts to `serde_json::Value`.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::List(l) => serde_json::Value::Array(
                l.iter()
                    .map(|s| serde_json::Value::String(s.clone()))
                    .collect(),
            ),
        }
    }

    /// Converts from JSON, checking the type against the property's; `None` on mismatch.
    pub(crate) fn from_json(ty: PropType, v: &serde_json::Value) -> Option<Self> {
        match (ty, v) {
            (_, serde_json::Value::Null) => Some(Value::Null),
            (PropType::Str, serde_json::Value::String(s)) => Some(Value::Str(s.clone())),
            (PropType::Bool, serde_json::Value::Bool(b)) => Some(Value::Bool(*b)),
            (PropType::StrList, serde_json::Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(Value::List),
            _ => None,
        }
    }

    /// Appends the JSON encoding to `out`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(true) => out.extend_from_slice(b"true"),
            Value::Bool(false) => out.extend_from_slice(b"false"),
            Value::Str(s) => write_json_str(out, s),
            Value::List(items) => {
                out.push(b'[');
                for (i, s) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_json_str(out, s);
                }
                out.push(b']');
            }
        }
    }
}

/// Appends `s` as a JSON string literal (quoted and escaped) to `out`.
///
/// Most strings need no escaping, so 8 bytes at a time are checked for a
/// control character, `"` or `\\` (SWAR); only a word that has one goes
/// through the byte-by-byte path. This matters: strings are most of a page.
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Whether some byte of `w` is below 0x20, or equals 0x22 or 0x5C.
    // (Bytes >= 0x80 never match: `!w & HI` masks them out.)
    const fn special(w: u64) -> bool {
        let below_space = w.wrapping_sub(LO * 0x20) & !w & HI;
        let q = w ^ (LO * 0x22);
        let quote = q.wrapping_sub(LO) & !q & HI;
        let b = w ^ (LO * 0x5C);
        let backslash = b.wrapping_sub(LO) & !b & HI;
        below_space | quote | backslash != 0
    }
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut clean = 0;
    while let Some(chunk) = bytes.get(clean..clean + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if special(u64::from_le_bytes(word)) {
            break;
        }
        clean += 8;
    }
    out.extend_from_slice(&bytes[..clean]);
    let mut start = clean;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            let hex = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(hex[usize::from(b >> 4)]);
            out.push(hex[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The properties of one object: `None` means never set (absent from responses).
pub(crate) type Props = Vec<Option<Value>>;

/// Identity of an object inside the simulator: its kind and creation index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    /// The object's kind.
    pub kind: ObjectKind,
    /// Its index in creation order within the kind (initial objects first).
    pub idx: u32,
}

impl Key {
    /// The key of object `idx` of `kind`.
    pub(crate) const fn new(kind: ObjectKind, idx: u32) -> Self {
        Self { kind, idx }
    }
}

/// Everything generation depends on: fixed for a simulator's lifetime.
#[derive(Debug, Clone)]
pub(crate) struct GenCtx {
    /// The tenant seed.
    pub seed: u64,
    /// The uuid v5 namespace derived from the seed.
    pub ns: Uuid,
    /// Mail domain of users and groups.
    pub domain: String,
    /// Average group size of the initial population.
    pub members_per_group: usize,
    /// Initial number of users (base group members are drawn from them).
    pub base_users: u32,
    /// Initial number of applications (the first service principals mirror them).
    pub base_applications: u32,
}

impl GenCtx {
    /// A generation context for `seed`.
    pub(crate) fn new(
        seed: u64,
        tenant: &str,
        members_per_group: usize,
        base_users: u32,
        base_applications: u32,
    ) -> Self {
        let ns = Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("graphdelta-simulator/{seed}").as_bytes(),
        );
        let domain = if tenant.contains('.') {
            tenant.to_ascii_lowercase()
        } else {
            "contoso.onmicrosoft.com".to_owned()
        };
        Self {
            seed,
            ns,
            domain,
            members_per_group,
            base_users,
            base_applications,
        }
    }

    /// A v5 uuid for `(label, idx)`, hashed without allocating.
    fn uuid(&self, label: &str, idx: u32) -> Uuid {
        let mut buf = [0u8; 48];
        let mut w = ByteWriter::new(&mut buf);
        let _ = write!(w, "{label}/{idx}");
        let len = w.len;
        Uuid::new_v5(&self.ns, &buf[..len])
    }

    /// The object id of `key`: uuid v5 of (seed, kind, index).
    pub(crate) fn id(&self, key: Key) -> Uuid {
        self.uuid(key.kind.collection(), key.idx)
    }

    /// The PRNG that determines object `key`'s generated properties.
    fn rng(&self, key: Key, salt: u64) -> SplitMix64 {
        SplitMix64::new(mix(&[
            self.seed,
            key.kind.index() as u64,
            u64::from(key.idx),
            salt,
        ]))
    }

    /// The generated (initial) properties of `key`.
    pub(crate) fn generate(&self, key: Key) -> Props {
        let mut r = self.rng(key, 0);
        let created = created_at(&mut r, key.idx);
        match key.kind {
            ObjectKind::User => self.gen_user(&mut r, key.idx, created),
            ObjectKind::Group => gen_group(&mut r, key.idx, created),
            ObjectKind::Application => self.gen_application(key.idx),
            ObjectKind::Device => self.gen_device(&mut r, key.idx),
            ObjectKind::ServicePrincipal => self.gen_service_principal(&mut r, key.idx),
        }
    }

    fn gen_user(&self, r: &mut SplitMix64, idx: u32, created: String) -> Props {
        let given = r.pick(GIVEN_NAMES);
        let sur = r.pick(SURNAMES);
        let upn = format!(
            "{}.{}{idx}@{}",
            given.to_ascii_lowercase(),
            sur.to_ascii_lowercase(),
            self.domain
        );
        let mail = (!r.chance(0.08)).then(|| Value::Str(upn.clone()));
        let mobile =
            (!r.chance(0.35)).then(|| Value::Str(format!("+1 425 555 {:04}", r.below(10_000))));
        let phones = if r.chance(0.7) {
            vec![format!("+1 206 555 {:04}", r.below(10_000))]
        } else {
            Vec::new()
        };
        vec![
            Some(Value::Str(format!("{given} {sur}"))),
            Some(Value::Str(given.to_owned())),
            Some(Value::Str(sur.to_owned())),
            Some(Value::Str(upn)),
            mail,
            Some(Value::Str(r.pick(JOB_TITLES).to_owned())),
            Some(Value::Str(r.pick(DEPARTMENTS).to_owned())),
            Some(Value::Str(office(r))),
            mobile,
            Some(Value::List(phones)),
            Some(Value::Bool(!r.chance(0.05))),
            Some(Value::Str(r.pick(USAGE_LOCATIONS).to_owned())),
            Some(Value::Str(created)),
        ]
    }

    fn gen_application(&self, idx: u32) -> Props {
        let mut r = self.rng(Key::new(ObjectKind::Application, idx), 0);
        let name = format!("{} {}", r.pick(APP_WORDS), r.pick(APP_NOUNS));
        vec![
            Some(Value::Str(name)),
            Some(Value::Str(self.uuid("appId", idx).to_string())),
            Some(Value::Str(r.pick(SIGN_IN_AUDIENCES).to_owned())),
        ]
    }

    fn gen_device(&self, r: &mut SplitMix64, idx: u32) -> Props {
        let os = r.pick(OPERATING_SYSTEMS);
        let name = match os {
            "Windows" => format!("DESKTOP-{:07X}", r.below(0x1000_0000)),
            "iOS" => format!("{}'s iPhone", r.pick(GIVEN_NAMES)),
            "Android" => format!("{}'s Pixel", r.pick(GIVEN_NAMES)),
            _ => format!("{}-{:04}", os.to_ascii_lowercase(), r.below(10_000)),
        };
        vec![
            Some(Value::Str(name)),
            Some(Value::Str(self.uuid("deviceId", idx).to_string())),
            Some(Value::Str(os.to_owned())),
            Some(Value::Bool(!r.chance(0.03))),
        ]
    }

    fn gen_service_principal(&self, r: &mut SplitMix64, idx: u32) -> Props {
        // The first service principals are the enterprise apps of the
        // tenant's own applications (same appId), as in a real tenant.
        if idx < self.base_applications {
            let app = self.gen_application(idx);
            let mut it = app.into_iter();
            let name = it.next().flatten();
            let app_id = it.next().flatten();
            return vec![name, app_id, Some(Value::Str("Application".to_owned()))];
        }
        let ty = if r.chance(0.25) {
            "ManagedIdentity"
        } else {
            "Application"
        };
        vec![
            Some(Value::Str(format!(
                "{} {}",
                r.pick(APP_WORDS),
                r.pick(APP_NOUNS)
            ))),
            Some(Value::Str(self.uuid("spAppId", idx).to_string())),
            Some(Value::Str(ty.to_owned())),
        ]
    }

    /// The initial member list of group `idx` (users of the initial population), sorted.
    pub(crate) fn base_members(&self, idx: u32) -> Vec<Key> {
        let users = u64::from(self.base_users);
        let avg = self.members_per_group as u64;
        if users == 0 || avg == 0 {
            return Vec::new();
        }
        let mut r = self.rng(Key::new(ObjectKind::Group, idx), 1);
        let want = (avg / 2)
            .saturating_add(r.below(avg.saturating_add(1)))
            .min(users) as usize;
        let mut picked: Vec<u32> = Vec::with_capacity(want);
        // Rejection sampling; the cap keeps it bounded when `want` ≈ `users`.
        let mut tries = 0usize;
        while picked.len() < want && tries < want * 8 + 64 {
            tries += 1;
            let u = r.below(users) as u32;
            if !picked.contains(&u) {
                picked.push(u);
            }
        }
        picked.sort_unstable();
        picked
            .into_iter()
            .map(|u| Key::new(ObjectKind::User, u))
            .collect()
    }

    /// A fresh random value for a mutable property (used by churn).
    pub(crate) fn random_value(
        &self,
        r: &mut SplitMix64,
        kind: ObjectKind,
        prop: &PropDef,
    ) -> Value {
        match (kind, prop.name) {
            (_, "accountEnabled" | "mailEnabled" | "securityEnabled") => Value::Bool(r.chance(0.5)),
            (ObjectKind::User, "displayName") => {
                Value::Str(format!("{} {}", r.pick(GIVEN_NAMES), r.pick(SURNAMES)))
            }
            (_, "givenName") => Value::Str(r.pick(GIVEN_NAMES).to_owned()),
            (_, "surname") => Value::Str(r.pick(SURNAMES).to_owned()),
            (_, "userPrincipalName" | "mail") => Value::Str(format!(
                "{}.{}{}@{}",
                r.pick(GIVEN_NAMES).to_ascii_lowercase(),
                r.pick(SURNAMES).to_ascii_lowercase(),
                r.below(1_000_000),
                self.domain
            )),
            (_, "jobTitle") => Value::Str(r.pick(JOB_TITLES).to_owned()),
            (_, "department") => Value::Str(r.pick(DEPARTMENTS).to_owned()),
            (_, "officeLocation") => Value::Str(office(r)),
            (_, "mobilePhone") => Value::Str(format!("+1 425 555 {:04}", r.below(10_000))),
            (_, "businessPhones") => Value::List(
                (0..r.below(3))
                    .map(|_| format!("+1 206 555 {:04}", r.below(10_000)))
                    .collect(),
            ),
            (_, "usageLocation") => Value::Str(r.pick(USAGE_LOCATIONS).to_owned()),
            (ObjectKind::Group, "displayName") => Value::Str(format!(
                "{} {} {}",
                r.pick(DEPARTMENTS),
                r.pick(GROUP_WORDS),
                r.below(10_000)
            )),
            (_, "description") => Value::Str(format!(
                "{} {} ({})",
                r.pick(GROUP_WORDS),
                r.pick(DESCRIPTION_TAILS),
                r.below(1000)
            )),
            (_, "mailNickname") => Value::Str(format!(
                "{}{}",
                r.pick(GROUP_WORDS).to_ascii_lowercase(),
                r.below(1_000_000)
            )),
            (_, "groupTypes") => Value::List(if r.chance(0.5) {
                vec!["Unified".to_owned()]
            } else {
                Vec::new()
            }),
            (_, "signInAudience") => Value::Str(r.pick(SIGN_IN_AUDIENCES).to_owned()),
            (_, "operatingSystem") => Value::Str(r.pick(OPERATING_SYSTEMS).to_owned()),
            (_, "servicePrincipalType") => Value::Str(
                if r.chance(0.5) {
                    "Application"
                } else {
                    "ManagedIdentity"
                }
                .to_owned(),
            ),
            (_, "displayName") => Value::Str(format!(
                "{} {} {}",
                r.pick(APP_WORDS),
                r.pick(APP_NOUNS),
                r.below(1000)
            )),
            _ => match prop.ty {
                PropType::Str => Value::Str(format!("value-{}", r.below(1_000_000))),
                PropType::Bool => Value::Bool(r.chance(0.5)),
                PropType::StrList => Value::List(Vec::new()),
            },
        }
    }
}

fn gen_group(r: &mut SplitMix64, idx: u32, created: String) -> Props {
    let dept = r.pick(DEPARTMENTS);
    let word = r.pick(GROUP_WORDS);
    let flavor = r.below(10);
    // 40% Microsoft 365 groups, 50% security groups, 10% mail-enabled security.
    let (mail_enabled, security_enabled, types) = match flavor {
        0..=3 => (true, false, vec!["Unified".to_owned()]),
        4..=8 => (false, true, Vec::new()),
        _ => (true, true, Vec::new()),
    };
    let description = (!r.chance(0.2)).then(|| {
        Value::Str(format!(
            "{dept} {} {}",
            word.to_ascii_lowercase(),
            r.pick(DESCRIPTION_TAILS)
        ))
    });
    vec![
        Some(Value::Str(format!("{dept} {word} {idx}"))),
        description,
        Some(Value::Str(format!(
            "{}{}{idx}",
            dept.to_ascii_lowercase().replace(' ', ""),
            word.to_ascii_lowercase()
        ))),
        Some(Value::Bool(mail_enabled)),
        Some(Value::Bool(security_enabled)),
        Some(Value::List(types)),
        Some(Value::Str(created)),
    ]
}

fn office(r: &mut SplitMix64) -> String {
    format!("{}/{}", 1 + r.below(40), 1000 + r.below(3000))
}

/// Creation time: objects are spread over the years after 2019-03-01 in
/// creation order (about one every 97 s), so later indices are newer.
fn created_at(r: &mut SplitMix64, idx: u32) -> String {
    const T0: u64 = 1_551_398_400; // 2019-03-01T00:00:00Z
    format_rfc3339(T0 + u64::from(idx) * 97 + r.below(60))
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub(crate) fn format_rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// The current UTC time as RFC 3339 (for error bodies).
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_rfc3339(secs)
}

/// `fmt::Write` into a fixed byte buffer, truncating silently when full.
struct ByteWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> ByteWriter<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }
}

impl std::fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

static GIVEN_NAMES: &[&str] = &[
    "Adele",
    "Alex",
    "Allan",
    "Anika",
    "Bianca",
    "Cameron",
    "Christie",
    "Debra",
    "Delia",
    "Diego",
    "Emily",
    "Enrico",
    "Grady",
    "Henrietta",
    "Irvin",
    "Isaiah",
    "Johanna",
    "Joni",
    "Lee",
    "Lidia",
    "Lynne",
    "Mallory",
    "Megan",
    "Miriam",
    "Nestor",
    "Patti",
    "Pradeep",
    "Raul",
    "Sakura",
    "Tomas",
    "Wei",
    "Yusuf",
    "Zara",
    "Amara",
    "Bruno",
    "Chloe",
    "Dmitri",
    "Elif",
    "Farah",
    "Gustav",
];

static SURNAMES: &[&str] = &[
    "Vance",
    "Wilber",
    "Deyoung",
    "Kowalski",
    "Herrera",
    "White",
    "Cline",
    "Berger",
    "Dennis",
    "Sicilian",
    "Braun",
    "Bernardi",
    "Archie",
    "Cheng",
    "Sink",
    "Langer",
    "Lambert",
    "Zorn",
    "Gu",
    "Holloway",
    "Robbins",
    "Cortez",
    "Bowen",
    "Caldwell",
    "Wilke",
    "Fernandez",
    "Gupta",
    "Mendoza",
    "Tanaka",
    "Novak",
    "Zhang",
    "Aydin",
    "Okafor",
    "Silva",
    "Moreau",
    "Petrov",
    "Yilmaz",
    "Haddad",
    "Lindqvist",
    "Nakamura",
];

static JOB_TITLES: &[&str] = &[
    "Retail Manager",
    "Marketing Assistant",
    "Product Manager",
    "Developer",
    "Senior Engineer",
    "Designer",
    "HR Manager",
    "Attorney",
    "Sales Representative",
    "Director",
    "IT Admin",
    "Accountant",
    "Support Engineer",
    "Data Scientist",
];

static DEPARTMENTS: &[&str] = &[
    "Retail",
    "Marketing",
    "Engineering",
    "Sales",
    "Human Resources",
    "Legal",
    "Finance",
    "Operations",
    "Research",
    "Support",
    "IT",
    "Executive",
];

static USAGE_LOCATIONS: &[&str] = &["US", "GB", "DE", "FR", "NL", "JP", "IN", "BR", "CA", "AU"];

static GROUP_WORDS: &[&str] = &[
    "Team",
    "Leads",
    "Project",
    "Champions",
    "Guild",
    "Admins",
    "Readers",
    "Council",
    "Crew",
    "Squad",
];

static DESCRIPTION_TAILS: &[&str] = &[
    "for planning and coordination",
    "with access to shared resources",
    "managed by IT",
    "created for the annual review",
    "for on-call rotations",
];

static APP_WORDS: &[&str] = &[
    "Contoso",
    "Fabrikam",
    "Northwind",
    "Tailspin",
    "Litware",
    "Proseware",
    "Adventure",
    "Woodgrove",
];

static APP_NOUNS: &[&str] = &[
    "Portal",
    "Payroll",
    "Reporting",
    "Sync",
    "Gateway",
    "Scheduler",
    "Analytics",
    "Backup",
];

static SIGN_IN_AUDIENCES: &[&str] = &[
    "AzureADMyOrg",
    "AzureADMultipleOrgs",
    "AzureADandPersonalMicrosoftAccount",
];

static OPERATING_SYSTEMS: &[&str] = &["Windows", "iOS", "Android", "MacMDM", "Linux"];

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> GenCtx {
        GenCtx::new(1, "contoso.onmicrosoft.com", 10, 1000, 20)
    }

    #[test]
    fn generation_is_deterministic_and_matches_schema() {
        let c = ctx();
        for kind in ObjectKind::ALL {
            for idx in [0, 1, 999] {
                let a = c.generate(Key::new(kind, idx));
                assert_eq!(a, c.generate(Key::new(kind, idx)));
                assert_eq!(a.len(), kind.schema().len(), "{kind}");
                for (v, def) in a.iter().zip(kind.schema()) {
                    if let Some(v) = v {
                        let ok = matches!(
                            (def.ty, v),
                            (PropType::Str, Value::Str(_))
                                | (PropType::Bool, Value::Bool(_))
                                | (PropType::StrList, Value::List(_))
                        );
                        assert!(ok, "{kind}.{} has {v:?}", def.name);
                    }
                }
            }
        }
    }

    #[test]
    fn ids_are_distinct_per_kind_and_index() {
        let c = ctx();
        let a = c.id(Key::new(ObjectKind::User, 1));
        assert_ne!(a, c.id(Key::new(ObjectKind::User, 2)));
        assert_ne!(a, c.id(Key::new(ObjectKind::Group, 1)));
        assert_eq!(a.get_version_num(), 5);
        let other_seed = GenCtx::new(2, "contoso.onmicrosoft.com", 10, 1000, 20);
        assert_ne!(a, other_seed.id(Key::new(ObjectKind::User, 1)));
    }

    #[test]
    fn service_principals_mirror_applications() {
        let c = ctx();
        let app = c.generate(Key::new(ObjectKind::Application, 3));
        let sp = c.generate(Key::new(ObjectKind::ServicePrincipal, 3));
        assert_eq!(app[1], sp[1], "same appId");
    }

    #[test]
    fn base_members_are_sorted_distinct_users() {
        let c = ctx();
        let m = c.base_members(4);
        assert!(!m.is_empty());
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert!(m.iter().all(|k| k.kind == ObjectKind::User && k.idx < 1000));
        let none = GenCtx::new(1, "t", 0, 1000, 0);
        assert!(none.base_members(4).is_empty());
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_551_398_400), "2019-03-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400 + 86_399), "2000-02-29T23:59:59Z");
    }

    #[test]
    fn json_escaping_agrees_with_serde_json() {
        let samples = [
            "",
            "plain ascii that is longer than sixteen bytes",
            "exactly8",
            "Zoë Müller-Łukasiewicz 日本",
            "tab\there",
            "12345678\"quote after a clean word",
            "1234567\\",
            "\u{1f}\u{7f}\u{0}x",
            "ends with a backslash \\",
        ];
        for s in samples {
            let mut out = Vec::new();
            write_json_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        write_json_str(&mut out, "a\"b\\c\nd\u{1}é");
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001é\"");
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
    }
}

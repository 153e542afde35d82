//! Namespace patterns, the include/exclude filter and the rename map (DESIGN §2.1).
//!
//! A pattern is `<db>.<collection>`: each side is either `*` or a literal name. Database names
//! cannot contain dots, so everything after the first dot is the collection name, which may
//! itself contain dots (`db.a.b` is collection `a.b` in database `db`).

use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Databases that are never synced, whatever the patterns say.
pub const SYSTEM_DATABASES: &[&str] = &["admin", "local", "config"];

/// Collections with this prefix are server-internal and never synced.
pub const SYSTEM_COLLECTION_PREFIX: &str = "system.";

/// MongoDB's limit on database name length (bytes).
const MAX_DB_NAME_BYTES: usize = 64;

/// Characters MongoDB forbids in database names (on any platform we may sync to).
const FORBIDDEN_DB_CHARS: &[char] = &['/', '\\', '.', ' ', '"', '$', '*', '<', '>', ':', '|', '?'];

/// Checks a database name; returns why it is not acceptable.
pub fn check_db_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("database name is empty".to_owned());
    }
    if name.len() > MAX_DB_NAME_BYTES {
        return Err(format!(
            "database name {name:?} is longer than {MAX_DB_NAME_BYTES} bytes"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| FORBIDDEN_DB_CHARS.contains(c) || *c == '\0')
    {
        return Err(format!(
            "database name {name:?} contains the forbidden character {c:?}"
        ));
    }
    Ok(())
}

/// Checks a collection name; returns why it is not acceptable.
pub fn check_collection_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("collection name is empty".to_owned());
    }
    if name.contains('$') || name.contains('\0') {
        return Err(format!(
            "collection name {name:?} contains '$' or a NUL character"
        ));
    }
    if name.starts_with('.') || name.ends_with('.') {
        return Err(format!(
            "collection name {name:?} starts or ends with a dot"
        ));
    }
    Ok(())
}

/// Whether a database is never synced: a system database or the daemon's metadata database.
pub fn is_reserved_db(db: &str, metadata_db: &str) -> bool {
    SYSTEM_DATABASES.contains(&db) || db == metadata_db
}

/// One side of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Any,
    Exact(String),
}

impl Part {
    fn matches(&self, name: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Exact(exact) => exact == name,
        }
    }
}

/// A parsed namespace pattern: `db.coll`, `db.*`, `*.coll` or `*.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePattern {
    raw: String,
    db: Part,
    coll: Part,
}

impl NamespacePattern {
    /// Whether this pattern matches the namespace.
    pub fn matches(&self, db: &str, coll: &str) -> bool {
        self.db.matches(db) && self.coll.matches(coll)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The database and collection the pattern names literally (`None` for `*`).
    pub(crate) fn exact_parts(&self) -> (Option<&str>, Option<&str>) {
        fn exact(part: &Part) -> Option<&str> {
            match part {
                Part::Any => None,
                Part::Exact(name) => Some(name.as_str()),
            }
        }
        (exact(&self.db), exact(&self.coll))
    }
}

impl fmt::Display for NamespacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for NamespacePattern {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let Some((db, coll)) = raw.split_once('.') else {
            return Err(format!(
                "invalid namespace pattern {raw:?}: expected \"<db>.<collection>\", \"<db>.*\" or \"*.*\""
            ));
        };
        let db = if db == "*" {
            Part::Any
        } else {
            check_db_name(db).map_err(|e| format!("invalid namespace pattern {raw:?}: {e}"))?;
            Part::Exact(db.to_owned())
        };
        let coll = if coll == "*" {
            Part::Any
        } else {
            if coll.contains('*') {
                return Err(format!(
                    "invalid namespace pattern {raw:?}: '*' must be the whole collection name"
                ));
            }
            check_collection_name(coll)
                .map_err(|e| format!("invalid namespace pattern {raw:?}: {e}"))?;
            Part::Exact(coll.to_owned())
        };
        Ok(Self {
            raw: raw.to_owned(),
            db,
            coll,
        })
    }
}

impl<'de> Deserialize<'de> for NamespacePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for NamespacePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

/// Decides which source namespaces are synced (DESIGN §2.1).
///
/// `admin`, `local`, `config`, every `system.*` collection and the metadata database are always
/// excluded, whatever the patterns say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceFilter {
    include: Vec<NamespacePattern>,
    exclude: Vec<NamespacePattern>,
    metadata_db: String,
    /// Only the namespaces of this partition (a term under `ha.partitions`).
    partition: Option<(super::partition::Partitioner, u32)>,
}

impl NamespaceFilter {
    /// A filter from include and exclude patterns; `metadata_db` is `checkpoint.database`.
    pub fn new(
        include: Vec<NamespacePattern>,
        exclude: Vec<NamespacePattern>,
        metadata_db: impl Into<String>,
    ) -> Self {
        Self {
            include,
            exclude,
            metadata_db: metadata_db.into(),
            partition: None,
        }
    }

    /// The same filter, restricted to the namespaces of `partition`.
    pub fn within_partition(
        mut self,
        partitioner: super::partition::Partitioner,
        partition: u32,
    ) -> Self {
        self.partition = Some((partitioner, partition));
        self
    }

    /// Whether the source namespace `db.coll` is synced.
    pub fn matches(&self, db: &str, coll: &str) -> bool {
        if is_reserved_db(db, &self.metadata_db) || coll.starts_with(SYSTEM_COLLECTION_PREFIX) {
            return false;
        }
        self.include.iter().any(|p| p.matches(db, coll))
            && !self.exclude.iter().any(|p| p.matches(db, coll))
            && self
                .partition
                .as_ref()
                .is_none_or(|(partitioner, p)| partitioner.partition_of(db, coll) == *p)
    }

    /// Whether the patterns take in `db.coll` (the reserved databases and the partition
    /// aside): what a change stream's [`change_stream_scope`](Self::change_stream_scope) lets
    /// through.
    pub fn patterns_match(&self, db: &str, coll: &str) -> bool {
        self.include.iter().any(|p| p.matches(db, coll))
            && !self.exclude.iter().any(|p| p.matches(db, coll))
    }

    /// A `$match` condition on change events that holds for the namespaces the patterns take
    /// in ([`patterns_match`](Self::patterns_match)) outside the reserved databases: a pattern
    /// names its database and collection literally or as `*`, so each is an equality.
    pub fn change_stream_scope(&self) -> bson::Document {
        fn condition(p: &NamespacePattern) -> bson::Document {
            let mut d = bson::Document::new();
            let (db, coll) = p.exact_parts();
            if let Some(db) = db {
                d.insert("ns.db", db);
            }
            if let Some(coll) = coll {
                d.insert("ns.coll", coll);
            }
            d
        }
        let reserved: Vec<&str> = SYSTEM_DATABASES
            .iter()
            .copied()
            .chain([self.metadata_db.as_str()])
            .collect();
        let mut all = vec![bson::doc! {"ns.db": {"$nin": reserved}}];
        if !self.include.iter().any(|p| p.exact_parts() == (None, None)) {
            let include: Vec<bson::Document> = self.include.iter().map(condition).collect();
            all.push(match include.len() {
                0 => bson::doc! {"ns.db": {"$in": []}},
                1 => include.into_iter().next().expect("one"),
                _ => bson::doc! {"$or": include},
            });
        }
        if !self.exclude.is_empty() {
            let exclude: Vec<bson::Document> = self.exclude.iter().map(condition).collect();
            all.push(bson::doc! {"$nor": exclude});
        }
        match all.len() {
            1 => all.into_iter().next().expect("one"),
            _ => bson::doc! {"$and": all},
        }
    }

    /// The include patterns.
    pub(crate) fn include(&self) -> &[NamespacePattern] {
        &self.include
    }

    /// Whether any collection of database `db` could be synced (used to skip whole databases
    /// when listing the source).
    pub fn may_match_db(&self, db: &str) -> bool {
        !is_reserved_db(db, &self.metadata_db) && self.include.iter().any(|p| p.db.matches(db))
    }
}

/// Maps source namespaces to destination namespaces (`sync.rename`).
///
/// Keys and values are `"db"` (whole database) or `"db.coll"` (one collection). A collection
/// mapping wins over a database mapping; unmapped namespaces keep their names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RenameMap {
    raw: BTreeMap<String, String>,
    databases: BTreeMap<String, String>,
    collections: BTreeMap<(String, String), (String, String)>,
}

impl RenameMap {
    /// Builds the map; the error names the offending key.
    pub fn new(raw: BTreeMap<String, String>) -> Result<Self, (String, String)> {
        let mut databases = BTreeMap::new();
        let mut collections = BTreeMap::new();
        for (from, to) in &raw {
            match (from.split_once('.'), to.split_once('.')) {
                (None, None) => {
                    check_db_name(from).map_err(|e| (from.clone(), e))?;
                    check_db_name(to).map_err(|e| (from.clone(), format!("target: {e}")))?;
                    databases.insert(from.clone(), to.clone());
                }
                (Some((fdb, fcoll)), Some((tdb, tcoll))) => {
                    check_db_name(fdb).map_err(|e| (from.clone(), e))?;
                    check_collection_name(fcoll).map_err(|e| (from.clone(), e))?;
                    check_db_name(tdb).map_err(|e| (from.clone(), format!("target: {e}")))?;
                    check_collection_name(tcoll)
                        .map_err(|e| (from.clone(), format!("target: {e}")))?;
                    collections.insert(
                        (fdb.to_owned(), fcoll.to_owned()),
                        (tdb.to_owned(), tcoll.to_owned()),
                    );
                }
                (None, Some(_)) => {
                    let why = format!("a database maps to a database: {to:?} names a collection");
                    return Err((from.clone(), why));
                }
                (Some(_), None) => {
                    let why = format!(
                        "a collection maps to a collection (\"db.coll\"): {to:?} names a database"
                    );
                    return Err((from.clone(), why));
                }
            }
        }
        Ok(Self {
            raw,
            databases,
            collections,
        })
    }

    /// The destination namespace for source namespace `db.coll`.
    pub fn target(&self, db: &str, coll: &str) -> (String, String) {
        if let Some((tdb, tcoll)) = self.collections.get(&(db.to_owned(), coll.to_owned())) {
            return (tdb.clone(), tcoll.clone());
        }
        if let Some(tdb) = self.databases.get(db) {
            return (tdb.clone(), coll.to_owned());
        }
        (db.to_owned(), coll.to_owned())
    }

    /// Whether no renames are configured.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// The entries as written (`from` → `to`).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.raw.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Database-level mappings.
    pub(crate) fn database_entries(&self) -> impl Iterator<Item = (&String, &String)> {
        self.databases.iter()
    }

    /// The `sync.rename` key that moves source `db.coll` (`None`: synced under its own name).
    fn key_for(&self, db: &str, coll: Option<&str>) -> Option<String> {
        if let Some(coll) = coll {
            if self
                .collections
                .contains_key(&(db.to_owned(), coll.to_owned()))
            {
                return Some(format!("{db}.{coll}"));
            }
        }
        self.databases.contains_key(db).then(|| db.to_owned())
    }

    /// The destination database of the collections of `db` that have no mapping of their own.
    fn database_target<'a>(&'a self, db: &'a str) -> &'a str {
        self.databases.get(db).map_or(db, String::as_str)
    }

    /// Collisions visible without listing the source: two source namespaces (or whole
    /// databases) that the filter names literally, or that a rename names, and that would end
    /// up in one destination namespace. Each is `(rename key, why)`; collisions between two
    /// renames of the same kind are reported by validation already and are not repeated here.
    pub(crate) fn static_collisions(&self, filter: &NamespaceFilter) -> Vec<(String, String)> {
        // Known sources: (db, Some(coll)) = one collection, (db, None) = a whole database.
        let mut known: std::collections::BTreeSet<(String, Option<String>)> = Default::default();
        for pattern in filter.include() {
            match pattern.exact_parts() {
                (Some(db), Some(coll)) if filter.matches(db, coll) => {
                    known.insert((db.to_owned(), Some(coll.to_owned())));
                }
                (Some(db), None) if filter.may_match_db(db) => {
                    known.insert((db.to_owned(), None));
                }
                _ => {}
            }
        }
        for db in self.databases.keys() {
            if filter.may_match_db(db) {
                known.insert((db.clone(), None));
            }
        }
        for (db, coll) in self.collections.keys() {
            if filter.matches(db, coll) {
                known.insert((db.clone(), Some(coll.clone())));
            }
        }
        let describe = |db: &str, coll: Option<&str>| match coll {
            Some(coll) => format!("source namespace \"{db}.{coll}\""),
            None => format!("source database \"{db}\""),
        };
        let known: Vec<_> = known.into_iter().collect();
        let mut out = Vec::new();
        for (i, (d1, c1)) in known.iter().enumerate() {
            for (d2, c2) in &known[i + 1..] {
                let (c1, c2) = (c1.as_deref(), c2.as_deref());
                let (k1, k2) = (self.key_for(d1, c1), self.key_for(d2, c2));
                let target = match (c1, c2) {
                    _ if d1 == d2 && (c1.is_none() || c2.is_none()) => None,
                    (Some(c1), Some(c2)) => {
                        let t = self.target(d1, c1);
                        (t == self.target(d2, c2)).then(|| format!("{}.{}", t.0, t.1))
                    }
                    (None, None) => {
                        let t = self.database_target(d1);
                        (t == self.database_target(d2)).then(|| t.to_owned())
                    }
                    (None, Some(c)) | (Some(c), None) => {
                        let (whole, (db, coll)) = if c1.is_none() {
                            (d1, (d2, c))
                        } else {
                            (d2, (d1, c))
                        };
                        let (tdb, tcoll) = self.target(db, coll);
                        let free = !self
                            .collections
                            .contains_key(&(whole.clone(), tcoll.clone()));
                        (free && tdb == self.database_target(whole))
                            .then(|| format!("{tdb}.{tcoll}"))
                    }
                };
                let Some(target) = target else { continue };
                let same_kind = c1.is_some() == c2.is_some();
                let (key, other) = match (&k1, &k2) {
                    (Some(_), Some(_)) if same_kind => continue,
                    // A collection mapping and a database mapping: blame the narrower one.
                    (Some(_), Some(k)) if c2.is_some() => (k, describe(d1, c1)),
                    (Some(k), _) => (k, describe(d2, c2)),
                    (None, Some(k)) => (k, describe(d1, c1)),
                    (None, None) => continue,
                };
                out.push((
                    key.clone(),
                    format!("target \"{target}\" collides with {other}, which is also synced there (two sources, one target)"),
                ));
            }
        }
        out
    }

    /// Groups source namespaces by destination namespace and returns those that share one
    /// with another (each with the others it collides with).
    pub fn collisions<'a>(
        &self,
        namespaces: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeMap<(String, String), Vec<String>> {
        let mut by_target: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (db, coll) in namespaces {
            by_target
                .entry(self.target(db, coll))
                .or_default()
                .push(format!("{db}.{coll}"));
        }
        by_target.retain(|_, sources| sources.len() > 1);
        by_target
    }

    /// Collection-level mappings.
    pub(crate) fn collection_entries(
        &self,
    ) -> impl Iterator<Item = (&(String, String), &(String, String))> {
        self.collections.iter()
    }
}

impl<'de> Deserialize<'de> for RenameMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        RenameMap::new(raw).map_err(|(key, e)| serde::de::Error::custom(format!("{key:?}: {e}")))
    }
}

impl Serialize for RenameMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(list: &[&str]) -> Vec<NamespacePattern> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn a_change_streams_scope_match_takes_in_exactly_what_the_patterns_do() {
        let namespaces = [
            ("shop", "orders"),
            ("shop", "skip"),
            ("shop", "a.b"),
            ("crm", "orders"),
            ("crm", "people"),
            ("logs", "x"),
            ("admin", "orders"),
            ("config", "c"),
            ("mongo_syncd", "checkpoints"),
        ];
        let cases: [(&[&str], &[&str]); 6] = [
            (&["*.*"], &[]),
            (&["shop.*"], &[]),
            (&["shop.*", "*.orders"], &["shop.skip"]),
            (&["crm.people", "logs.*"], &["*.x"]),
            (&["*.*"], &["crm.*", "shop.orders"]),
            (&[], &[]),
        ];
        for (include, exclude) in cases {
            let filter = NamespaceFilter::new(pats(include), pats(exclude), "mongo_syncd");
            let scope = filter.change_stream_scope();
            let matcher = mongo_sim::query::Matcher::new(&scope).unwrap();
            for (db, coll) in namespaces {
                let event = bson::doc! {"operationType": "insert", "ns": {"db": db, "coll": coll}};
                let expected =
                    filter.patterns_match(db, coll) && !is_reserved_db(db, "mongo_syncd");
                assert_eq!(
                    matcher.matches(&event),
                    expected,
                    "{db}.{coll} with {include:?} minus {exclude:?}: {scope}"
                );
            }
        }
    }

    #[test]
    fn pattern_parsing() {
        for ok in [
            "db.*",
            "db.coll",
            "*.*",
            "*.coll",
            "db.a.b",
            "db.system_like",
        ] {
            assert!(ok.parse::<NamespacePattern>().is_ok(), "{ok}");
        }
        for bad in [
            "db", "", ".coll", "db.", "d*b.coll", "db.co*", "db.c$", "a/b.c", "*", "db..x",
        ] {
            assert!(bad.parse::<NamespacePattern>().is_err(), "{bad}");
        }
        let p: NamespacePattern = "db.a.b".parse().unwrap();
        assert!(p.matches("db", "a.b"));
        assert!(!p.matches("db.a", "b"));
    }

    #[test]
    fn filter_matching_table() {
        let filter = NamespaceFilter::new(
            pats(&["shop.*", "crm.contacts", "*.audit", "logs.a.b"]),
            pats(&["shop.tmp", "*.cache"]),
            "mongo_syncd",
        );
        let table = [
            ("shop", "orders", true),
            ("shop", "tmp", false),          // excluded
            ("shop", "cache", false),        // excluded by *.cache
            ("shop", "system.views", false), // system collections never
            ("crm", "contacts", true),
            ("crm", "leads", false), // not included
            ("billing", "audit", true),
            ("logs", "a.b", true), // dotted collection name
            ("logs", "a", false),
            ("admin", "audit", false),       // system db never
            ("local", "audit", false),       // system db never
            ("config", "audit", false),      // system db never
            ("mongo_syncd", "audit", false), // metadata db never
        ];
        for (db, coll, want) in table {
            assert_eq!(filter.matches(db, coll), want, "{db}.{coll}");
        }
        assert!(filter.may_match_db("shop"));
        assert!(filter.may_match_db("anything")); // *.audit
        assert!(!filter.may_match_db("admin"));
    }

    #[test]
    fn wildcard_filter_still_excludes_system_namespaces() {
        let filter = NamespaceFilter::new(pats(&["*.*"]), vec![], "meta");
        assert!(filter.matches("app", "users"));
        assert!(!filter.matches("app", "system.profile"));
        assert!(!filter.matches("meta", "checkpoints"));
        assert!(!filter.matches("config", "system.sessions"));
        assert!(!filter.matches("local", "oplog.rs"));
        let nothing = NamespaceFilter::new(vec![], vec![], "meta");
        assert!(!nothing.matches("app", "users"));
    }

    #[test]
    fn rename_mapping_collection_wins_over_database() {
        let map = RenameMap::new(BTreeMap::from([
            ("shop".to_owned(), "shop_dr".to_owned()),
            ("shop.orders".to_owned(), "archive.orders2".to_owned()),
            ("crm.a.b".to_owned(), "crm2.c.d".to_owned()),
        ]))
        .unwrap();
        assert_eq!(
            map.target("shop", "orders"),
            ("archive".into(), "orders2".into())
        );
        assert_eq!(
            map.target("shop", "items"),
            ("shop_dr".into(), "items".into())
        );
        assert_eq!(map.target("crm", "a.b"), ("crm2".into(), "c.d".into()));
        assert_eq!(map.target("crm", "x"), ("crm".into(), "x".into()));
        assert_eq!(map.target("other", "x"), ("other".into(), "x".into()));
    }

    #[test]
    fn rename_shape_errors_name_the_key() {
        let err =
            RenameMap::new(BTreeMap::from([("shop".to_owned(), "a.b".to_owned())])).unwrap_err();
        assert_eq!(err.0, "shop");
        let err =
            RenameMap::new(BTreeMap::from([("shop.x".to_owned(), "a".to_owned())])).unwrap_err();
        assert_eq!(err.0, "shop.x");
        let err =
            RenameMap::new(BTreeMap::from([("sh$op".to_owned(), "a".to_owned())])).unwrap_err();
        assert_eq!(err.0, "sh$op");
    }
}

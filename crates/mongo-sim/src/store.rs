//! In-memory catalog: databases, collections (documents in `_id` order), indexes, validators.
//!
//! Collections use persistent maps (`imbl`), so cloning one is O(1): transactions work on
//! private copies and a commit swaps the new versions in atomically.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bson::{doc, Bson, Document};

use crate::{
    collation::Collation,
    error::{codes, CommandError, CommandResult},
    query::{compare::IdKey, matcher::Matcher, update::UpdateDescription},
    schema::Validator,
};

/// A document version as the catalog stores it and the oplog keeps it while live (see
/// [`crate::oplog::Version`]): the document, and the sequence number of the newest oplog entry
/// that wrote this very version (0: none yet), by which the oplog finds that entry when a later
/// write replaces the version, without a map from versions to entries.
#[derive(Debug, Default)]
pub struct Stored {
    doc: Document,
    writer: AtomicU64,
}

impl Stored {
    pub fn new(doc: Document) -> Stored {
        Stored {
            doc,
            writer: AtomicU64::new(0),
        }
    }

    /// The sequence number of the newest oplog entry that wrote this version (0: none).
    pub fn writer(&self) -> u64 {
        // Read and written under the engine's lock (the oplog's owner): no ordering needed.
        self.writer.load(Ordering::Relaxed)
    }

    pub fn set_writer(&self, seq: u64) {
        self.writer.store(seq, Ordering::Relaxed);
    }

    /// A new shared version of `doc`.
    pub fn shared(doc: Document) -> DocRef {
        Arc::new(Stored::new(doc))
    }

    /// The document of a shared version (moved out when nothing else holds it).
    pub fn unwrap_or_clone(d: DocRef) -> Document {
        match Arc::try_unwrap(d) {
            Ok(stored) => stored.doc,
            Err(shared) => shared.doc.clone(),
        }
    }
}

impl std::ops::Deref for Stored {
    type Target = Document;
    fn deref(&self) -> &Document {
        &self.doc
    }
}

impl AsRef<Document> for Stored {
    fn as_ref(&self) -> &Document {
        &self.doc
    }
}

impl From<Document> for Stored {
    fn from(doc: Document) -> Stored {
        Stored::new(doc)
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Stored) -> bool {
        self.doc == other.doc
    }
}

pub type DocRef = Arc<Stored>;

/// A namespace shared by the oplog entries of a collection.
pub type NsRef = Arc<Namespace>;

/// Largest document a collection accepts (`maxBsonObjectSize`).
pub const MAX_BSON_OBJECT_SIZE: usize = 16 * 1024 * 1024;

/// `db.coll`; `coll` may itself contain dots.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    pub db: String,
    pub coll: String,
}

impl Namespace {
    pub fn new(db: impl Into<String>, coll: impl Into<String>) -> Self {
        Self {
            db: db.into(),
            coll: coll.into(),
        }
    }

    /// Parses `"db.coll"` (splitting at the first dot).
    pub fn parse(full: &str) -> CommandResult<Self> {
        match full.split_once('.') {
            Some((db, coll)) if !db.is_empty() && !coll.is_empty() => Ok(Self::new(db, coll)),
            _ => Err(CommandError::new(
                codes::INVALID_NAMESPACE,
                format!("Invalid namespace specified '{full}'"),
            )),
        }
    }

    pub fn is_system(&self) -> bool {
        self.coll.starts_with("system.")
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.db, self.coll)
    }
}

/// Validates database and collection names the way the server does (a subset of its rules).
pub fn check_names(ns: &Namespace) -> CommandResult<()> {
    let bad_db = ns.db.is_empty()
        || ns.db.len() > 63
        || ns
            .db
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '.' | ' ' | '"' | '$' | '\0'));
    if bad_db {
        return Err(CommandError::new(
            codes::INVALID_NAMESPACE,
            format!("Invalid database name: '{}'", ns.db),
        ));
    }
    if ns.coll.is_empty()
        || ns.coll.contains('\0')
        || ns.coll.starts_with('.')
        || ns.coll.contains('$')
    {
        return Err(CommandError::new(
            codes::INVALID_NAMESPACE,
            format!("Invalid collection name: {}", ns.coll),
        ));
    }
    Ok(())
}

/// One index of a collection. Only unique indexes keep entries (for enforcement); the others
/// are metadata that `listIndexes` reports and TTL uses.
#[derive(Clone, Debug)]
pub struct Index {
    pub name: String,
    pub key: Document,
    /// The spec exactly as `listIndexes` shows it.
    pub spec: Document,
    pub unique: bool,
    pub sparse: bool,
    partial: Option<Arc<Matcher>>,
    /// The index's collation (its own, else the collection's default); `None` is simple.
    pub collation: Option<Arc<Collation>>,
    /// Whether the spec named a collation (else it inherits the collection's default).
    collation_given: bool,
    entries: imbl::OrdMap<Vec<IdKey>, IdKey>,
}

impl Index {
    pub fn id_index() -> Index {
        Index {
            name: "_id_".into(),
            key: doc! {"_id": 1},
            spec: doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            unique: false, // enforced by the document map itself
            sparse: false,
            partial: None,
            collation: None,
            collation_given: false,
            entries: imbl::OrdMap::new(),
        }
    }

    /// Builds an index from a `createIndexes` spec.
    pub fn from_spec(spec: &Document) -> CommandResult<Index> {
        let key = spec
            .get_document("key")
            .map_err(|_| {
                CommandError::failed_to_parse("index specification must have a 'key' document")
            })?
            .clone();
        if key.is_empty() {
            return Err(CommandError::new(
                codes::CANNOT_CREATE_INDEX,
                "Index keys cannot be empty.",
            ));
        }
        let name = match spec.get("name") {
            Some(Bson::String(n)) => n.clone(),
            _ => {
                return Err(CommandError::failed_to_parse(
                    "index specification must have a 'name'",
                ))
            }
        };
        let unique = spec.get_bool("unique").unwrap_or(false);
        let sparse = spec.get_bool("sparse").unwrap_or(false);
        let partial = match spec.get("partialFilterExpression") {
            Some(Bson::Document(f)) => Some(Arc::new(Matcher::new(f)?)),
            Some(_) => {
                return Err(CommandError::type_mismatch(
                    "partialFilterExpression must be an object",
                ))
            }
            None => None,
        };
        let (collation, collation_given) = match spec.get("collation") {
            Some(v) => match crate::collation::parse_arg("collation", v)? {
                Some(c) => (c, true),
                None => (None, false),
            },
            None => (None, false),
        };
        let mut listed = doc! {"v": 2, "key": key.clone(), "name": name.clone()};
        for (k, v) in spec {
            if !matches!(k.as_str(), "v" | "key" | "name" | "ns" | "collation") {
                listed.insert(k.clone(), v.clone());
            }
        }
        if let Some(c) = &collation {
            listed.insert("collation", c.to_document());
        }
        Ok(Index {
            name,
            key,
            spec: listed,
            unique,
            sparse,
            partial,
            collation,
            collation_given,
            entries: imbl::OrdMap::new(),
        })
    }

    /// Two specs "are the same index" when key and options match (name aside).
    pub fn same_definition(&self, other: &Index) -> bool {
        let strip = |d: &Document| {
            let mut d = d.clone();
            d.remove("name");
            d.remove("v");
            d
        };
        strip(&self.spec) == strip(&other.spec)
    }

    pub fn ttl_seconds(&self) -> Option<f64> {
        match self.spec.get("expireAfterSeconds") {
            Some(Bson::Int32(v)) => Some(*v as f64),
            Some(Bson::Int64(v)) => Some(*v as f64),
            Some(Bson::Double(v)) => Some(*v),
            _ => None,
        }
    }

    /// Gives an index without a collation of its own the collection's default, as the server
    /// does (and shows it in the spec).
    fn inherit_collation(&mut self, default: Option<&Arc<Collation>>) {
        if self.collation_given {
            return;
        }
        if let Some(c) = default {
            self.collation = Some(Arc::clone(c));
            self.spec.insert("collation", c.to_document());
        }
    }

    /// The keys a document produces in this index (several for an array field), or none when
    /// a sparse/partial index skips it. Strings are collation keys under a collated index.
    fn keys_for(&self, doc: &Document) -> Vec<Vec<IdKey>> {
        if let Some(p) = &self.partial {
            if !p.matches(doc) {
                return Vec::new();
            }
        }
        let mut keys: Vec<Vec<IdKey>> = vec![Vec::new()];
        let mut all_missing = true;
        for (field, _) in &self.key {
            let values = values_at_path(doc, field);
            if !values.is_empty() {
                all_missing = false;
            }
            let values = if values.is_empty() {
                vec![Bson::Null]
            } else {
                values
            };
            let mut next = Vec::with_capacity(keys.len() * values.len());
            for prefix in &keys {
                for v in &values {
                    let mut k = prefix.clone();
                    k.push(IdKey(crate::collation::key_of(self.collation.as_ref(), v)));
                    next.push(k);
                }
            }
            keys = next;
        }
        if self.sparse && all_missing {
            return Vec::new();
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// The duplicate-key error for `key`, produced by `doc` (whose values it shows).
    fn duplicate_error(&self, coll: &Namespace, key: &[IdKey], doc: &Document) -> CommandError {
        let mut key_value = Document::new();
        let mut shown = Vec::new();
        for ((field, _), k) in self.key.iter().zip(key) {
            // The document's value whose key this is (the key itself is a collation key
            // under a collated index).
            let value = values_at_path(doc, field)
                .into_iter()
                .find(|v| crate::collation::key_of(self.collation.as_ref(), v) == k.0)
                .unwrap_or_else(|| k.0.clone());
            shown.push(format!("{field}: {value}"));
            key_value.insert(field.clone(), value);
        }
        CommandError::new(
            codes::DUPLICATE_KEY,
            format!(
                "E11000 duplicate key error collection: {coll} index: {} dup key: {{ {} }}",
                self.name,
                shown.join(", ")
            ),
        )
        .with_extra(doc! {"keyPattern": self.key.clone(), "keyValue": key_value})
    }
}

/// Values at a dotted path, expanding arrays (one value per element) like a multikey index.
pub fn values_at_path(doc: &Document, path: &str) -> Vec<Bson> {
    fn walk(value: &Bson, parts: &[&str], out: &mut Vec<Bson>) {
        if parts.is_empty() {
            match value {
                Bson::Array(items) if !items.is_empty() => out.extend(items.iter().cloned()),
                other => out.push(other.clone()),
            }
            return;
        }
        match value {
            Bson::Document(d) => {
                if let Some(v) = d.get(parts[0]) {
                    walk(v, &parts[1..], out);
                }
            }
            Bson::Array(items) => {
                if let Ok(i) = parts[0].parse::<usize>() {
                    if let Some(v) = items.get(i) {
                        walk(v, &parts[1..], out);
                    }
                } else {
                    for item in items {
                        if let Bson::Document(_) = item {
                            walk(item, parts, out);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let parts: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    if let Some(v) = doc.get(parts[0]) {
        walk(v, &parts[1..], &mut out);
    }
    out
}

/// A collection: options, documents by `_id`, indexes.
#[derive(Clone, Debug)]
pub struct Collection {
    /// Change it with [`Collection::set_ns`].
    pub ns: Namespace,
    /// `ns` for the oplog entries of the collection's writes ([`Collection::shared_ns`]).
    shared_ns: NsRef,
    pub uuid: bson::Uuid,
    /// Options as given to `create`/`collMod` and reported by `listCollections`.
    pub options: Document,
    /// Documents by `_id` (a collation key under a default collation: [`Collection::id_key`]).
    pub docs: imbl::OrdMap<IdKey, DocRef>,
    /// The default collation (`create`'s `collation`); `None` is simple.
    pub collation: Option<Arc<Collation>>,
    pub indexes: Vec<Index>,
    validator: Option<Arc<Validator>>,
    /// Insertion order, for capped collections only.
    capped_order: imbl::Vector<IdKey>,
    capped_bytes: usize,
}

/// A write that happened to a collection, for the oplog.
#[derive(Clone, Debug)]
pub enum DocChange {
    Insert {
        doc: DocRef,
    },
    Update {
        pre: DocRef,
        post: DocRef,
        description: Arc<UpdateDescription>,
    },
    Replace {
        pre: DocRef,
        post: DocRef,
    },
    Delete {
        pre: DocRef,
    },
}

impl Collection {
    pub fn new(ns: Namespace, options: Document) -> CommandResult<Collection> {
        let validator = match options.get("validator") {
            Some(Bson::Document(v)) if !v.is_empty() => Some(Arc::new(Validator::new(v)?)),
            Some(Bson::Document(_)) | None => None,
            Some(_) => return Err(CommandError::type_mismatch("'validator' must be an object")),
        };
        if options.get_bool("capped").unwrap_or(false) && !options.contains_key("size") {
            return Err(CommandError::new(
                codes::INVALID_OPTIONS,
                "the 'size' field is required when 'capped' is true",
            ));
        }
        let collation = match options.get("collation") {
            Some(Bson::Document(c)) if !c.is_empty() => crate::collation::parse(c)?,
            _ => None,
        };
        let mut id_index = Index::id_index();
        id_index.inherit_collation(collation.as_ref());
        Ok(Collection {
            shared_ns: Arc::new(ns.clone()),
            ns,
            uuid: bson::Uuid::new(),
            options,
            docs: imbl::OrdMap::new(),
            collation,
            indexes: vec![id_index],
            validator,
            capped_order: imbl::Vector::new(),
            capped_bytes: 0,
        })
    }

    /// Renames the collection.
    pub fn set_ns(&mut self, ns: Namespace) {
        self.shared_ns = Arc::new(ns.clone());
        self.ns = ns;
    }

    /// The namespace as the oplog entries of the collection's writes hold it: one shared
    /// allocation, not two strings per entry.
    pub fn shared_ns(&self) -> NsRef {
        if *self.shared_ns == self.ns {
            Arc::clone(&self.shared_ns)
        } else {
            Arc::new(self.ns.clone())
        }
    }

    // Both read per written document: `get` and a match, not `get_bool`/`get_document`, whose
    // answer for a missing field is an error that allocates.
    pub fn is_capped(&self) -> bool {
        matches!(self.options.get("capped"), Some(Bson::Boolean(true)))
    }

    pub fn pre_and_post_images(&self) -> bool {
        match self.options.get("changeStreamPreAndPostImages") {
            Some(Bson::Document(d)) => matches!(d.get("enabled"), Some(Bson::Boolean(true))),
            _ => false,
        }
    }

    /// Replaces the options (collMod), recompiling the validator.
    pub fn set_options(&mut self, options: Document) -> CommandResult<()> {
        self.validator = match options.get("validator") {
            Some(Bson::Document(v)) if !v.is_empty() => Some(Arc::new(Validator::new(v)?)),
            _ => None,
        };
        self.options = options;
        Ok(())
    }

    /// The key of `_id` value `id` in `docs`: the value itself, or its collation key under the
    /// collection's default collation ("Bob" and "bob" are one `_id` under strength 2).
    pub fn id_key(&self, id: &Bson) -> IdKey {
        IdKey(crate::collation::key_of(self.collation.as_ref(), id))
    }

    pub fn get(&self, id: &Bson) -> Option<&DocRef> {
        self.docs.get(&self.id_key(id))
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    fn check_document(&self, doc: &Document, bypass_validation: bool) -> CommandResult<()> {
        let size = bson_size(doc);
        if size > MAX_BSON_OBJECT_SIZE {
            return Err(CommandError::new(
                codes::BSON_OBJECT_TOO_LARGE,
                format!("object to insert too large. size in bytes: {size}, max size: {MAX_BSON_OBJECT_SIZE}"),
            ));
        }
        if !bypass_validation {
            if let Some(v) = &self.validator {
                v.check(doc)?;
            }
        }
        Ok(())
    }

    fn index_add(&mut self, doc: &Document, id: &IdKey) -> CommandResult<()> {
        // Check every unique index before touching any, so a failure leaves no trace.
        for index in self.indexes.iter().filter(|i| i.unique) {
            for key in index.keys_for(doc) {
                if let Some(owner) = index.entries.get(&key) {
                    if owner != id {
                        return Err(index.duplicate_error(&self.ns, &key, doc));
                    }
                }
            }
        }
        for index in self.indexes.iter_mut().filter(|i| i.unique) {
            for key in index.keys_for(doc) {
                index.entries.insert(key, id.clone());
            }
        }
        Ok(())
    }

    fn index_remove(&mut self, doc: &Document) {
        for index in self.indexes.iter_mut().filter(|i| i.unique) {
            for key in index.keys_for(doc) {
                index.entries.remove(&key);
            }
        }
    }

    /// Inserts a document (which must already carry its `_id`).
    pub fn insert(&mut self, doc: Document, bypass_validation: bool) -> CommandResult<DocChange> {
        let raw_id = doc
            .get("_id")
            .cloned()
            .ok_or_else(|| CommandError::new(codes::INTERNAL_ERROR, "document without _id"))?;
        let id = self.id_key(&raw_id);
        self.check_document(&doc, bypass_validation)?;
        if self.docs.contains_key(&id) {
            let mut key_value = Document::new();
            key_value.insert("_id", raw_id.clone());
            return Err(CommandError::new(
                codes::DUPLICATE_KEY,
                format!(
                    "E11000 duplicate key error collection: {} index: _id_ dup key: {{ _id: {} }}",
                    self.ns, raw_id
                ),
            )
            .with_extra(doc! {"keyPattern": {"_id": 1}, "keyValue": key_value}));
        }
        self.store_new(doc, id)
    }

    /// [`Collection::insert`] of a document whose `_id` key `id` ([`Collection::id_key`]) the
    /// caller found absent from `docs` under the same lock (an upsert that inserts): the same
    /// checks and result without looking the key up a second time.
    pub fn insert_absent(
        &mut self,
        doc: Document,
        id: IdKey,
        bypass_validation: bool,
    ) -> CommandResult<DocChange> {
        debug_assert!(
            !self.docs.contains_key(&id),
            "insert_absent of a present _id"
        );
        self.check_document(&doc, bypass_validation)?;
        self.store_new(doc, id)
    }

    /// The end of an insert, once the document is checked and its `_id` known to be new.
    fn store_new(&mut self, doc: Document, id: IdKey) -> CommandResult<DocChange> {
        self.index_add(&doc, &id)?;
        let doc = Arc::new(Stored::new(doc));
        self.docs.insert(id.clone(), Arc::clone(&doc));
        if self.is_capped() {
            self.capped_order.push_back(id);
            self.capped_bytes += bson_size(&doc);
        }
        Ok(DocChange::Insert { doc })
    }

    /// Replaces the stored document with `new` (same `_id`), as an update or a replacement.
    pub fn replace(
        &mut self,
        new: Document,
        description: Option<UpdateDescription>,
        bypass_validation: bool,
    ) -> CommandResult<DocChange> {
        let id = self.id_key(new.get("_id").unwrap_or(&Bson::Null));
        let pre = self.docs.get(&id).cloned().ok_or_else(|| {
            CommandError::new(codes::NO_MATCHING_DOCUMENT, "document to replace not found")
        })?;
        self.replace_found(id, pre, new, description, bypass_validation)
    }

    /// [`Collection::replace`] of the document `pre` stored under `id` (the key of `new`'s
    /// `_id`), which the caller looked up under the same lock: the same checks and result
    /// without looking it up a second time.
    pub fn replace_found(
        &mut self,
        id: IdKey,
        pre: DocRef,
        new: Document,
        description: Option<UpdateDescription>,
        bypass_validation: bool,
    ) -> CommandResult<DocChange> {
        debug_assert!(
            self.docs.get(&id).is_some_and(|d| Arc::ptr_eq(d, &pre)),
            "replace_found of a document not stored under its key"
        );
        self.check_document(&new, bypass_validation)?;
        self.index_remove(&pre);
        if let Err(e) = self.index_add(&new, &id) {
            self.index_add(&pre, &id)
                .expect("restoring the previous index entries cannot conflict");
            return Err(e);
        }
        if self.is_capped() {
            self.capped_bytes =
                self.capped_bytes + bson_size(&new) - bson_size(&pre).min(self.capped_bytes);
        }
        let post = Arc::new(Stored::new(new));
        self.docs.insert(id, Arc::clone(&post));
        Ok(if let Some(mut description) = description {
            description.shrink_to_fit();
            DocChange::Update {
                pre,
                post,
                description: Arc::new(description),
            }
        } else {
            DocChange::Replace { pre, post }
        })
    }

    pub fn delete(&mut self, id: &Bson) -> Option<DocChange> {
        let key = self.id_key(id);
        let pre = self.docs.remove(&key)?;
        self.index_remove(&pre);
        if self.is_capped() {
            if let Some(pos) = self.capped_order.index_of(&key) {
                self.capped_order.remove(pos);
            }
            self.capped_bytes = self.capped_bytes.saturating_sub(bson_size(&pre));
        }
        Some(DocChange::Delete { pre })
    }

    /// Puts back an earlier version of document `id` (`None`: it did not exist), keeping the
    /// unique-index entries in step, without checks: snapshot reads undo the oplog newest
    /// first, so every intermediate state is one the collection had. A version the oplog still
    /// holds live is the very `DocRef` of the history; a packed one is a decoded copy. Either
    /// way it is never the catalog's current `DocRef` (the document was written after the
    /// snapshot time), so the pointer identity by which transactions detect conflicts answers
    /// as before.
    pub fn restore_version(&mut self, id: &Bson, version: Option<DocRef>) {
        let key = IdKey(id.clone());
        let existed = match self.docs.remove(&key) {
            Some(current) => {
                self.index_remove(&current);
                if self.is_capped() {
                    self.capped_bytes = self.capped_bytes.saturating_sub(bson_size(&current));
                }
                true
            }
            None => false,
        };
        match version {
            Some(doc) => {
                for index in self.indexes.iter_mut().filter(|i| i.unique) {
                    for k in index.keys_for(&doc) {
                        index.entries.insert(k, key.clone());
                    }
                }
                if self.is_capped() {
                    self.capped_bytes += bson_size(&doc);
                    if !existed {
                        // Undoing a delete: capped collections delete their oldest first.
                        self.capped_order.push_front(key.clone());
                    }
                }
                self.docs.insert(key, doc);
            }
            None if existed && self.is_capped() => {
                if let Some(pos) = self.capped_order.index_of(&key) {
                    self.capped_order.remove(pos);
                }
            }
            None => {}
        }
    }

    /// For capped collections: the oldest documents to delete after an insert.
    pub fn capped_overflow(&self) -> Vec<Bson> {
        if !self.is_capped() {
            return Vec::new();
        }
        let max_docs = self.options.get("max").and_then(as_i64).filter(|m| *m > 0);
        let max_bytes = self
            .options
            .get("size")
            .and_then(as_i64)
            .unwrap_or(i64::MAX)
            .max(4096) as usize;
        let mut count = self.docs.len();
        let mut bytes = self.capped_bytes;
        let mut out = Vec::new();
        for id in self.capped_order.iter() {
            let over = max_docs.is_some_and(|m| count as i64 > m) || bytes > max_bytes;
            if !over || count <= 1 {
                break;
            }
            if let Some(d) = self.docs.get(id) {
                bytes = bytes.saturating_sub(bson_size(d));
            }
            count -= 1;
            out.push(id.0.clone());
        }
        out
    }

    /// Documents in the order a snapshot must re-insert them (insertion order when capped).
    pub fn docs_in_storage_order(&self) -> Box<dyn Iterator<Item = &DocRef> + '_> {
        if self.is_capped() {
            Box::new(self.capped_order.iter().filter_map(|id| self.docs.get(id)))
        } else {
            Box::new(self.docs.values())
        }
    }

    /// Applies the `index` part of a `collMod` (`expireAfterSeconds`, `hidden`) to the index
    /// named or keyed by `spec`; returns false when no index matches.
    pub fn modify_index(&mut self, spec: &Document) -> bool {
        let Some(target) =
            self.indexes
                .iter_mut()
                .find(|i| match (spec.get("name"), spec.get("keyPattern")) {
                    (Some(Bson::String(n)), _) => i.name == *n,
                    (_, Some(Bson::Document(kp))) => i.key == *kp,
                    _ => false,
                })
        else {
            return false;
        };
        for (k, v) in spec {
            if matches!(k.as_str(), "expireAfterSeconds" | "hidden") {
                target.spec.insert(k.clone(), v.clone());
            }
        }
        true
    }

    pub fn find_index(&self, name: &str) -> Option<&Index> {
        self.indexes.iter().find(|i| i.name == name)
    }

    /// Adds an index, building its entries; fails with 11000 if existing documents violate it.
    pub fn add_index(&mut self, mut index: Index) -> CommandResult<bool> {
        index.inherit_collation(self.collation.as_ref());
        if let Some(existing) = self.indexes.iter().find(|i| i.name == index.name) {
            if existing.same_definition(&index) {
                return Ok(false);
            }
            return Err(CommandError::new(
                codes::INDEX_KEY_SPECS_CONFLICT,
                format!(
                    "An existing index has the same name as the requested index. Requested index: {}, existing index: {}",
                    index.spec, existing.spec
                ),
            ));
        }
        if let Some(existing) = self.indexes.iter().find(|i| i.key == index.key) {
            if existing.same_definition(&index) {
                return Ok(false);
            }
            return Err(CommandError::new(
                codes::INDEX_OPTIONS_CONFLICT,
                format!(
                    "An equivalent index already exists with a different name and options. Requested index: {}, existing index: {}",
                    index.spec, existing.spec
                ),
            ));
        }
        if index.unique {
            for (id, doc) in self.docs.iter() {
                for key in index.keys_for(doc) {
                    if let Some(owner) = index.entries.get(&key) {
                        if owner != id {
                            return Err(index.duplicate_error(&self.ns, &key, doc));
                        }
                    }
                    index.entries.insert(key, id.clone());
                }
            }
        }
        self.indexes.push(index);
        Ok(true)
    }

    pub fn drop_index(&mut self, name: &str) -> Option<Index> {
        let pos = self.indexes.iter().position(|i| i.name == name)?;
        Some(self.indexes.remove(pos))
    }

    /// Collection info as `listCollections` reports it.
    pub fn list_entry(&self) -> Document {
        doc! {
            "name": self.ns.coll.clone(),
            "type": "collection",
            "options": self.options.clone(),
            "info": {"readOnly": false, "uuid": Bson::Binary(bson::Binary::from_uuid(self.uuid))},
            "idIndex": self.find_index("_id_").map_or_else(|| doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"}, |i| i.spec.clone()),
        }
    }
}

pub fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

/// Appends the BSON encoding of `doc` to `out`, reserving its exact size first
/// ([`bson_size`]): the `bson` crate's encoding goes through a buffer of its own that grows
/// as it is written and is then copied. `None` (with `out` as it was) for what this encoder
/// leaves to the crate: a key, regular expression or code string the crate refuses (a NUL in
/// a cstring), and DBPointers (whose fields are private).
pub fn encode_document(doc: &Document, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    out.reserve(bson_size(doc));
    let written = write_document(doc, out);
    if written.is_none() {
        out.truncate(start);
    }
    written
}

/// [`encode_document`] of a document whose field `path` stands for an array encoded apart:
/// that field's value is written as `array` (the bytes of a BSON array), whatever it holds in
/// `doc`. `path` is a top-level field, or `outer.inner` for a field one document down (a
/// cursor's `cursor.nextBatch`). `None` (nothing written) when `doc` cannot be encoded this
/// way, or has no such field.
pub fn encode_document_with_array(
    doc: &Document,
    path: &str,
    array: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let placeholder = value_at_path(doc, path)?;
    let start = out.len();
    out.reserve(bson_size(doc) - value_size(placeholder) + array.len());
    let written = write_document_with_array(doc, path, array, out);
    if written.is_none() {
        out.truncate(start);
    }
    written
}

fn write_document_with_array(
    doc: &Document,
    path: &str,
    array: &[u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let (head, rest) = match path.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (path, None),
    };
    for (k, v) in doc {
        match (k == head, rest, v) {
            (true, None, _) => {
                out.push(bson::spec::ElementType::Array as u8);
                write_cstring(k, out)?;
                out.extend_from_slice(array);
            }
            (true, Some(rest), Bson::Document(inner)) => {
                out.push(bson::spec::ElementType::EmbeddedDocument as u8);
                write_cstring(k, out)?;
                write_document_with_array(inner, rest, array, out)?;
            }
            _ => write_element(k, v, out)?,
        }
    }
    out.push(0);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    Some(())
}

/// The value of `doc` at `path`: a top-level field, or `outer.inner` one document down.
pub fn value_at_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    match path.split_once('.') {
        None => doc.get(path),
        Some((head, rest)) => value_at_path(doc.get_document(head).ok()?, rest),
    }
}

/// Sets `doc`'s field at `path` ([`value_at_path`]) to `value`; false when a document on
/// the way is missing.
pub fn set_value_at_path(doc: &mut Document, path: &str, value: Bson) -> bool {
    match path.split_once('.') {
        None => {
            doc.insert(path, value);
            true
        }
        Some((head, rest)) => match doc.get_document_mut(head) {
            Ok(inner) => set_value_at_path(inner, rest, value),
            Err(_) => false,
        },
    }
}

/// Appends the BSON element `key: v` (type byte, key, value) to `out`; `None` (with a partial
/// element written) when `v` cannot be encoded field by field.
pub fn encode_element(key: &str, v: &Bson, out: &mut Vec<u8>) -> Option<()> {
    write_element(key, v, out)
}

/// The BSON bytes of `doc` ([`encode_document`], else the `bson` crate's encoding); `None`
/// when it cannot be encoded.
pub fn document_bytes(doc: &Document) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match encode_document(doc, &mut out) {
        Some(()) => Some(out),
        None => bson::RawDocumentBuf::try_from(doc)
            .ok()
            .map(bson::RawDocumentBuf::into_bytes),
    }
}

/// Writes a document whose elements `fields` writes (its length patched in once written):
/// for callers that build a document's bytes without building the document.
pub fn encode_fields(
    out: &mut Vec<u8>,
    fields: impl FnOnce(&mut Vec<u8>) -> Option<()>,
) -> Option<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    fields(out)?;
    out.push(0);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    Some(())
}

/// An embedded-document element `key` whose elements `fields` writes ([`encode_fields`]).
pub fn encode_subdocument(
    key: &str,
    out: &mut Vec<u8>,
    fields: impl FnOnce(&mut Vec<u8>) -> Option<()>,
) -> Option<()> {
    out.push(bson::spec::ElementType::EmbeddedDocument as u8);
    write_cstring(key, out)?;
    encode_fields(out, fields)
}

/// A string element, without making a [`Bson::String`] of it.
pub fn encode_str_element(key: &str, value: &str, out: &mut Vec<u8>) -> Option<()> {
    out.push(bson::spec::ElementType::String as u8);
    write_cstring(key, out)?;
    write_string(value, out);
    Some(())
}

fn write_cstring(s: &str, out: &mut Vec<u8>) -> Option<()> {
    if s.as_bytes().contains(&0) {
        return None;
    }
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Some(())
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as i32 + 1).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Writes a document (its length patched in once written).
fn write_document(doc: &Document, out: &mut Vec<u8>) -> Option<()> {
    encode_fields(out, |out| {
        for (k, v) in doc {
            write_element(k, v, out)?;
        }
        Some(())
    })
}

fn write_array(items: &[Bson], out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut key = ArrayKey::default();
    for v in items {
        write_element(key.as_str(), v, out)?;
        key.increment();
    }
    out.push(0);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    Some(())
}

/// An array element's key ("0", "1", …) kept as decimal digits and counted up in place: the
/// keys of a large array (an `update` that upserts answers an entry per statement) are not
/// each formatted anew.
pub struct ArrayKey {
    /// The digits, right-aligned: `digits[start..]`.
    digits: [u8; 20],
    start: usize,
}

impl Default for ArrayKey {
    fn default() -> Self {
        let mut digits = [b'0'; 20];
        digits[19] = b'0';
        ArrayKey { digits, start: 19 }
    }
}

impl ArrayKey {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.digits[self.start..]).expect("ASCII digits")
    }

    pub fn increment(&mut self) {
        let mut i = self.digits.len();
        while i > 0 {
            i -= 1;
            if self.digits[i] == b'9' {
                self.digits[i] = b'0';
            } else {
                self.digits[i] += 1;
                self.start = self.start.min(i);
                return;
            }
        }
    }
}

fn write_element(key: &str, v: &Bson, out: &mut Vec<u8>) -> Option<()> {
    use bson::spec::BinarySubtype;
    if matches!(v, Bson::DbPointer(_)) {
        return None;
    }
    out.push(v.element_type() as u8);
    write_cstring(key, out)?;
    match v {
        Bson::Double(d) => out.extend_from_slice(&d.to_le_bytes()),
        Bson::String(s) | Bson::JavaScriptCode(s) | Bson::Symbol(s) => write_string(s, out),
        Bson::Document(d) => write_document(d, out)?,
        Bson::Array(a) => write_array(a, out)?,
        Bson::Binary(b) => {
            if matches!(b.subtype, BinarySubtype::BinaryOld) {
                out.extend_from_slice(&(b.bytes.len() as i32 + 4).to_le_bytes());
                out.push(u8::from(b.subtype));
                out.extend_from_slice(&(b.bytes.len() as i32).to_le_bytes());
            } else {
                out.extend_from_slice(&(b.bytes.len() as i32).to_le_bytes());
                out.push(u8::from(b.subtype));
            }
            out.extend_from_slice(&b.bytes);
        }
        Bson::ObjectId(id) => out.extend_from_slice(&id.bytes()),
        Bson::Boolean(b) => out.push(u8::from(*b)),
        Bson::DateTime(d) => out.extend_from_slice(&d.timestamp_millis().to_le_bytes()),
        Bson::Null | Bson::Undefined | Bson::MinKey | Bson::MaxKey => {}
        Bson::RegularExpression(r) => {
            write_cstring(r.pattern.as_str(), out)?;
            write_cstring(r.options.as_str(), out)?;
        }
        Bson::JavaScriptCodeWithScope(c) => {
            let start = out.len();
            out.extend_from_slice(&[0; 4]);
            write_string(&c.code, out);
            write_document(&c.scope, out)?;
            let len = (out.len() - start) as i32;
            out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        }
        Bson::Int32(i) => out.extend_from_slice(&i.to_le_bytes()),
        Bson::Timestamp(t) => {
            out.extend_from_slice(&t.increment.to_le_bytes());
            out.extend_from_slice(&t.time.to_le_bytes());
        }
        Bson::Int64(i) => out.extend_from_slice(&i.to_le_bytes()),
        Bson::Decimal128(d) => out.extend_from_slice(&d.bytes()),
        Bson::DbPointer(_) => unreachable!("refused above"),
    }
    Some(())
}

/// Encoded size of a document in bytes, computed without encoding it (writes, batches and
/// change events need it for every document, so it must not allocate).
pub fn bson_size(doc: &Document) -> usize {
    4 + doc
        .iter()
        .map(|(k, v)| 1 + k.len() + 1 + value_size(v))
        .sum::<usize>()
        + 1
}

fn array_size(items: &[Bson]) -> usize {
    let mut total = 4 + 1;
    for (i, v) in items.iter().enumerate() {
        total += 1 + decimal_digits(i) + 1 + value_size(v);
    }
    total
}

fn decimal_digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Encoded size of a string value: length prefix, bytes, terminating NUL.
fn string_size(s: &str) -> usize {
    4 + s.len() + 1
}

/// Encoded size of one BSON value (without its type byte and key).
pub fn value_size(v: &Bson) -> usize {
    use bson::spec::BinarySubtype;
    match v {
        Bson::Double(_) | Bson::DateTime(_) | Bson::Int64(_) | Bson::Timestamp(_) => 8,
        Bson::String(s) | Bson::JavaScriptCode(s) | Bson::Symbol(s) => string_size(s),
        Bson::Document(d) => bson_size(d),
        Bson::Array(a) => array_size(a),
        Bson::Binary(b) => {
            let old = matches!(b.subtype, BinarySubtype::BinaryOld);
            4 + 1 + if old { 4 } else { 0 } + b.bytes.len()
        }
        Bson::ObjectId(_) => 12,
        Bson::Boolean(_) => 1,
        Bson::Null | Bson::Undefined | Bson::MinKey | Bson::MaxKey => 0,
        Bson::RegularExpression(r) => r.pattern.len() + 1 + r.options.len() + 1,
        Bson::JavaScriptCodeWithScope(c) => 4 + string_size(&c.code) + bson_size(&c.scope),
        Bson::Int32(_) => 4,
        Bson::Decimal128(_) => 16,
        Bson::DbPointer(_) => {
            // Not constructible field by field; fall back to encoding.
            let mut d = Document::new();
            d.insert("", v.clone());
            d.to_vec().map(|b| b.len() - 4 - 1 - 2).unwrap_or(0)
        }
    }
}

/// Databases and their collections.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub dbs: BTreeMap<String, BTreeMap<String, Collection>>,
}

impl Catalog {
    pub fn get(&self, ns: &Namespace) -> Option<&Collection> {
        self.dbs.get(&ns.db).and_then(|d| d.get(&ns.coll))
    }

    pub fn get_mut(&mut self, ns: &Namespace) -> Option<&mut Collection> {
        self.dbs.get_mut(&ns.db).and_then(|d| d.get_mut(&ns.coll))
    }

    pub fn insert(&mut self, coll: Collection) {
        self.dbs
            .entry(coll.ns.db.clone())
            .or_default()
            .insert(coll.ns.coll.clone(), coll);
    }

    pub fn remove(&mut self, ns: &Namespace) -> Option<Collection> {
        let db = self.dbs.get_mut(&ns.db)?;
        let removed = db.remove(&ns.coll);
        if db.is_empty() {
            self.dbs.remove(&ns.db);
        }
        removed
    }

    pub fn collections(&self, db: &str) -> Vec<&Collection> {
        self.dbs
            .get(db)
            .map(|d| d.values().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_keys_count_in_decimal() {
        let mut key = ArrayKey::default();
        for i in 0..100_123usize {
            assert_eq!(key.as_str(), i.to_string());
            key.increment();
        }
        let many: Vec<Bson> = (0..1_234).map(Bson::Int32).collect();
        let d = doc! {"a": many};
        let mut out = Vec::new();
        encode_document(&d, &mut out).unwrap();
        assert_eq!(out, d.to_vec().unwrap());
    }

    #[test]
    fn computed_size_equals_encoded_size() {
        let many: Vec<Bson> = (0..123).map(Bson::Int32).collect();
        let docs = vec![
            doc! {},
            doc! {"_id": 1, "s": "héllo", "d": 1.5, "l": 2i64, "b": true, "n": Bson::Null},
            doc! {"a": many, "nested": {"x": [[1, 2], {"y": "z"}], "e": {}}},
            doc! {
                "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
                "old": bson::Binary { subtype: bson::spec::BinarySubtype::BinaryOld, bytes: vec![9; 7] },
                "uuid": bson::Binary::from_uuid(bson::Uuid::new()),
                "oid": bson::oid::ObjectId::new(),
                "dt": bson::DateTime::now(),
                "ts": bson::Timestamp { time: 5, increment: 6 },
                "re": bson::Regex { pattern: "^a.*".try_into().unwrap(), options: "im".try_into().unwrap() },
                "js": Bson::JavaScriptCode("function(){}".into()),
                "jsw": Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope { code: "x".into(), scope: doc! {"x": 1} }),
                "sym": Bson::Symbol("sym".into()),
                "dec": bson::Decimal128::from_bytes([1; 16]),
                "min": Bson::MinKey, "max": Bson::MaxKey, "undef": Bson::Undefined,
            },
        ];
        for d in docs {
            let expected = d.to_vec().unwrap();
            assert_eq!(bson_size(&d), expected.len(), "{d}");
            let mut out = vec![9];
            encode_document(&d, &mut out).expect("encodable");
            assert_eq!(out[1..], expected[..], "{d}");
            assert_eq!(document_bytes(&d), Some(expected), "{d}");
        }
        // What the encoder leaves to the crate, which encodes or refuses it as before.
        let pointer = bson::RawDocumentBuf::from_bytes(vec![
            0x1a, 0, 0, 0, 0x0c, b'p', 0, 2, 0, 0, 0, b'n', 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
            12, 0,
        ])
        .and_then(|raw| Document::try_from(raw.as_ref()));
        let with_pointer = pointer.expect("a document with a DBPointer");
        let mut out = vec![9];
        assert!(encode_document(&with_pointer, &mut out).is_none());
        assert_eq!(out, vec![9]);
        assert_eq!(
            document_bytes(&with_pointer),
            Some(with_pointer.to_vec().unwrap())
        );
        let nul_key = doc! {"a\0b": 1};
        assert!(encode_document(&nul_key, &mut Vec::new()).is_none());
        assert_eq!(document_bytes(&nul_key), None);
        assert!(nul_key.to_vec().is_err());
    }

    #[test]
    fn an_array_encoded_apart_one_document_down_gives_the_whole_document() {
        let batch = vec![
            Bson::Document(doc! {"_id": {"_data": "82"}, "n": 1}),
            Bson::Int64(2),
        ];
        let whole = doc! {"cursor": {"nextBatch": batch.clone(), "id": 0i64}, "ok": 1.0};
        let array = doc! {"a": batch}.to_vec().unwrap();
        // The array alone: the one-field document's value, after its header, type and key.
        let array = array[4 + 1 + 2..array.len() - 1].to_vec();
        let placeholder = doc! {"cursor": {"nextBatch": [], "id": 0i64}, "ok": 1.0};
        let mut out = Vec::new();
        encode_document_with_array(&placeholder, "cursor.nextBatch", &array, &mut out).unwrap();
        assert_eq!(out, whole.to_vec().unwrap());
        assert!(value_at_path(&placeholder, "cursor.nextBatch").is_some());
        assert!(value_at_path(&placeholder, "cursor.firstBatch").is_none());
        assert!(
            encode_document_with_array(&placeholder, "cursor.firstBatch", &array, &mut out)
                .is_none()
        );
        let mut filled = placeholder.clone();
        assert!(set_value_at_path(
            &mut filled,
            "cursor.nextBatch",
            crate::wire::array_from_bytes(&array)
        ));
        assert_eq!(filled, whole);
        assert!(!set_value_at_path(
            &mut filled,
            "missing.nextBatch",
            Bson::Null
        ));
    }
}

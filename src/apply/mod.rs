//! Idempotent, batched writes to the destination.
//!
//! A batch of change events becomes, per document `_id`, a short queue of writes (earlier
//! events folded into a later insert, replace or delete; non-overlapping deltas merged).
//! Round `r` holds the `r`-th write of every queue, so within a round every `_id` appears
//! once and the round's statements go out as a few unordered bulk commands; rounds run in
//! order, which keeps per-document order. Every statement is keyed by `_id` and replays are
//! harmless: upserts replace, deletes of missing documents do nothing, and a delta that
//! matches nothing is repaired from the source's current document.

pub use crate::bounded_write;
pub mod conflict;
mod encode;
pub mod lanes;
pub mod transaction;
pub mod turn;

use std::{collections::HashMap, time::Instant};

use bson::{
    doc, rawdoc, Bson, Document, RawArrayBuf, RawBson, RawBsonRef, RawDocument, RawDocumentBuf,
    Timestamp,
};
use futures::TryStreamExt;
use mongodb::Database;

use self::lanes::{lane_count, LaneTuner};
use crate::{
    apply::conflict::{
        not_newer_filter, plan, unchanged_filter, value_at, Conditional, ConflictSettings,
    },
    config::UpdateMode,
    error::{ErrorKind, SyncError},
    metadata::Metadata,
    metrics::{ApplyOp, ConflictOutcome, Metrics},
    model::event::{ts_key, ChangeEvent, OpKind},
    model::id_key::IdKey,
    source::{Namespace, Source},
};

/// Statements per bulk command: far below the server's 100,000, small enough to keep replies
/// and retries cheap.
const MAX_STATEMENTS_PER_COMMAND: usize = 5_000;
/// Bytes of statements per bulk command (the command body must stay under 16 MiB).
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;
/// Write errors that mean "this one document cannot be stored as it is".
const REJECTED_DOCUMENT_CODES: &[i32] = &[2, 52, 53, 55, 56, 57, 121, 10334, 17280, 17419, 17420];
/// Update errors that mean "the destination document does not have the shape the delta
/// expects" (a path through a scalar, a non-array `$push`, ...).
/// 40 ConflictingUpdateOperators: one `$set` that both extends an array and sets an index in
/// it ("Updating the path 'arr.5' would create a conflict at 'arr'").
const SHAPE_ERROR_CODES: &[i32] = &[2, 9, 14, 28, 40, 54, 66];
const DUPLICATE_KEY: i32 = crate::error::DUPLICATE_KEY;
/// How long the destination catalog (unique indexes, validator) is trusted before it is read
/// again.
const CATALOG_CACHE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the destination collection's catalog means for writing it.
#[derive(Debug, Clone, Copy)]
struct Catalog {
    /// A unique index other than `_id_`: batches are applied in strict source order.
    unique_secondary: bool,
    /// Replication writes carry `bypassDocumentValidation`.
    bypass_validation: bool,
}

/// What one batch did.
#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    pub applied: [u64; 5],
    /// Write statements issued.
    pub writes: u64,
    pub replay_skipped: u64,
    pub dead_letters: u64,
    /// Documents re-read from the source to repair a delta that could not apply.
    pub repaired: u64,
}

impl ApplyStats {
    fn count(&mut self, op: ApplyOp) {
        let i = ApplyOp::ALL
            .iter()
            .position(|o| *o == op)
            .expect("known op");
        self.applied[i] += 1;
    }
}

/// A write to one document.
#[derive(Debug, Clone)]
enum DocWrite {
    /// Replace-with-upsert by `_id`.
    Upsert(RawDocumentBuf),
    Delete,
    /// `$push: {f: {$each: [], $slice: n}}` for each truncated array.
    Truncate(Vec<(String, i32)>),
    /// `$set`/`$unset` of a delta: `set` is the `$set` document itself (the event's
    /// `updatedFields`, merged deltas appended), so it goes out without being rebuilt.
    Delta {
        set: RawDocumentBuf,
        unset: Vec<String>,
    },
    /// Replace with the source's current document (or delete if it is gone).
    Refetch,
}

#[derive(Debug, Clone)]
struct Pending {
    write: DocWrite,
    /// Index of the (last) event this write comes from.
    event: usize,
}

/// Per-document write queues, in order of first appearance.
#[derive(Default)]
struct Queues {
    /// Each document's key, `_id` and writes, in order of first appearance.
    docs: Vec<(IdKey, RawBson, Vec<Pending>)>,
    /// Where a key's entry is in `docs`.
    index: HashMap<IdKey, usize>,
}

/// Whether an event is a replay of something the destination may already hold (see
/// [`Applier::apply_events`]).
fn in_replay(ev: &ChangeEvent, replay_until: Option<Timestamp>) -> bool {
    replay_until.is_some_and(|r| ts_key(ev.cluster_time) <= ts_key(r))
}

/// The cluster time of a batch's last event: refetches read the source as of then, so the
/// document they write holds every change of the batch and none after it.
fn batch_end(events: &[ChangeEvent]) -> Timestamp {
    events
        .iter()
        .map(|e| e.cluster_time)
        .max_by_key(|t| ts_key(*t))
        .unwrap_or(Timestamp {
            time: 0,
            increment: 0,
        })
}

/// The key under which the same `_id` always lands: MongoDB's `_id` equality, exactly
/// (`crate::model::id_key`).
fn id_key(id: &RawBson) -> IdKey {
    IdKey::of_raw(id)
}

/// A document key from a field path (field names cannot contain NUL).
fn cstr_key(s: &str) -> Result<&bson::raw::CStr, SyncError> {
    <&bson::raw::CStr>::try_from(s).map_err(|e| {
        SyncError::with_source(ErrorKind::SourceRead, "a field name contains a NUL byte", e)
    })
}

/// The order in which update operators process paths (MongoDB 5.0+): component by
/// component, numeric names numerically, other names lexicographically.
fn update_path_order(a: &str, b: &str) -> std::cmp::Ordering {
    let mut ai = a.split('.');
    let mut bi = b.split('.');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(p), Ok(q)) => p.cmp(&q),
                    _ => x.cmp(y),
                };
                if o.is_ne() {
                    return o;
                }
            }
        }
    }
}

fn paths_overlap(a: &str, b: &str) -> bool {
    a == b
        || (a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'.')
        || (b.len() > a.len() && b.starts_with(a) && b.as_bytes()[a.len()] == b'.')
}

/// The field paths a `$set` document names.
fn set_paths(set: &RawDocument) -> impl Iterator<Item = &str> {
    set.iter().filter_map(|e| e.ok().map(|(k, _)| k.as_str()))
}

impl Queues {
    fn push(&mut self, id: RawBson, write: DocWrite, event: usize) {
        let key = id_key(&id);
        let at = match self.index.get(&key) {
            Some(at) => *at,
            None => {
                self.index.insert(key.clone(), self.docs.len());
                self.docs.push((key, id, Vec::new()));
                self.docs.len() - 1
            }
        };
        let queue = &mut self.docs[at].2;
        if let Some(Pending {
            write: DocWrite::Refetch,
            event: last,
        }) = queue.last_mut()
        {
            // A refetch reads the document as of the batch's last event: this write is in it.
            *last = event;
            return;
        }
        match &write {
            // A total write supersedes everything before it on this document.
            DocWrite::Upsert(_) | DocWrite::Delete | DocWrite::Refetch => {
                queue.clear();
                queue.push(Pending { write, event });
            }
            DocWrite::Delta { set, unset } => {
                if let Some(Pending {
                    write:
                        DocWrite::Delta {
                            set: prev_set,
                            unset: prev_unset,
                        },
                    event: prev_event,
                }) = queue.last_mut()
                {
                    let old_paths: Vec<&str> = set_paths(prev_set)
                        .chain(prev_unset.iter().map(String::as_str))
                        .collect();
                    let overlap = set_paths(set)
                        .chain(unset.iter().map(String::as_str))
                        .any(|n| old_paths.iter().any(|o| paths_overlap(n, o)));
                    // `$set` appends new fields in field-name order: merging two deltas would
                    // reorder new fields unless every earlier path sorts before every later one.
                    let order_safe = set_paths(prev_set)
                        .all(|o| set_paths(set).all(|n| update_path_order(o, n).is_lt()));
                    if !overlap && order_safe {
                        for (k, v) in set.iter().flatten() {
                            prev_set.append(k, v);
                        }
                        prev_unset.extend(unset.iter().cloned());
                        *prev_event = event;
                        return;
                    }
                }
                queue.push(Pending { write, event });
            }
            DocWrite::Truncate(_) => queue.push(Pending { write, event }),
        }
    }

    fn rounds(&self) -> usize {
        self.docs.iter().map(|(_, _, q)| q.len()).max().unwrap_or(0)
    }

    /// The statements of each round, in order of first appearance: round `r` holds every
    /// document's `r`-th write. The writes move out (nothing is copied but keys and `_id`s of
    /// documents written in more than one round).
    fn into_rounds(self) -> Vec<Vec<Statement>> {
        let mut rounds: Vec<Vec<Statement>> = (0..self.rounds()).map(|_| Vec::new()).collect();
        if let Some(first) = rounds.first_mut() {
            first.reserve(self.docs.len());
        }
        for (key, id, queue) in self.docs {
            let last = queue.len().saturating_sub(1);
            let (mut key, mut id) = (Some(key), Some(id));
            for (round, p) in queue.into_iter().enumerate() {
                let (k, i) = if round == last {
                    (key.take(), id.take())
                } else {
                    (key.clone(), id.clone())
                };
                rounds[round].push(Statement {
                    key: k.expect("taken at the last round only"),
                    id: i.expect("taken at the last round only"),
                    write: p.write,
                    event: p.event,
                });
            }
        }
        rounds
    }
}

/// The writes an update event's `updateDescription` asks for. `disambiguated`: the source
/// is 6.1+ and marks ambiguous paths with `disambiguatedPaths`; a 6.0 source never does, so
/// there any dotted path could be a field name containing a dot and the document is refetched
/// instead (correct on 6.0 at the cost of one source read per nested update).
fn delta_writes(ud: &RawDocument, disambiguated: bool) -> Result<Vec<DocWrite>, SyncError> {
    let malformed = |what: &str| {
        SyncError::new(
            ErrorKind::SourceRead,
            format!("malformed updateDescription: {what}"),
        )
    };
    // One walk over the description (a lookup by name walks it from the start each time).
    let (mut updated, mut removed, mut truncated) = (None, None, None);
    for item in ud {
        let (name, value) = item.map_err(|_| malformed("unreadable field"))?;
        match (name.as_str(), value) {
            ("updatedFields", RawBsonRef::Document(d)) => updated = Some(d),
            ("removedFields", RawBsonRef::Array(a)) => removed = Some(a),
            ("truncatedArrays", RawBsonRef::Array(a)) => truncated = Some(a),
            ("disambiguatedPaths", RawBsonRef::Document(paths)) if !paths.is_empty() => {
                // Field names with dots or made of digits cannot be addressed by `$set`
                // paths: take the whole current document instead.
                return Ok(vec![DocWrite::Refetch]);
            }
            _ => {}
        }
    }
    // A `$`-prefixed component cannot be a `$set`/`$unset` path; without
    // `disambiguatedPaths` a dotted path may name a field that contains dots.
    let ambiguous =
        |p: &str| p.split('.').any(|c| c.starts_with('$')) || (!disambiguated && p.contains('.'));
    let updated = updated.ok_or_else(|| malformed("updatedFields"))?;
    let mut refetch = false;
    for item in updated {
        let (path, _) = item.map_err(|_| malformed("updatedFields entry"))?;
        refetch |= ambiguous(path.as_str());
    }
    let mut unset = Vec::new();
    for item in removed.ok_or_else(|| malformed("removedFields"))? {
        match item.map_err(|_| malformed("removedFields entry"))? {
            RawBsonRef::String(s) => {
                refetch |= ambiguous(s);
                unset.push(s.to_string());
            }
            _ => return Err(malformed("removedFields entry is not a string")),
        }
    }
    if refetch {
        return Ok(vec![DocWrite::Refetch]);
    }
    let set = updated.to_owned();
    let mut truncate = Vec::new();
    if let Some(arrays) = truncated {
        for item in arrays {
            let d = match item.map_err(|_| malformed("truncatedArrays entry"))? {
                RawBsonRef::Document(d) => d,
                _ => return Err(malformed("truncatedArrays entry")),
            };
            let field = d
                .get_str("field")
                .map_err(|_| malformed("truncatedArrays.field"))?;
            let size = d
                .get_i32("newSize")
                .map_err(|_| malformed("truncatedArrays.newSize"))?;
            truncate.push((field.to_string(), size));
        }
    }
    let mut out = Vec::new();
    if !truncate.is_empty() {
        out.push(DocWrite::Truncate(truncate));
    }
    if !set.is_empty() || !unset.is_empty() {
        out.push(DocWrite::Delta { set, unset });
    }
    Ok(out)
}

/// One statement of a round (or one step of the strict source order).
#[derive(Clone)]
struct Statement {
    key: IdKey,
    id: RawBson,
    write: DocWrite,
    event: usize,
}

/// The command a group of strict-order statements goes out as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Upsert,
    Delta,
    Delete,
    Refetch,
}

impl StepKind {
    fn of(w: &DocWrite) -> StepKind {
        match w {
            DocWrite::Upsert(_) => StepKind::Upsert,
            DocWrite::Truncate(_) | DocWrite::Delta { .. } => StepKind::Delta,
            DocWrite::Delete => StepKind::Delete,
            DocWrite::Refetch => StepKind::Refetch,
        }
    }

    fn command(self) -> (&'static str, &'static str) {
        match self {
            StepKind::Delete => ("delete", "deletes"),
            _ => ("update", "updates"),
        }
    }
}

/// A write that failed on a duplicate key in strict source order.
struct DeferredWrite {
    step: Statement,
    code: i32,
    msg: String,
}

/// Deferred writes of a batch, by document, in order of first failure.
#[derive(Default)]
struct Deferred {
    order: Vec<IdKey>,
    first: HashMap<IdKey, DeferredWrite>,
    /// Documents refetched in this batch: read as of its last event, so their later writes in
    /// the batch are already applied.
    covered: std::collections::HashSet<IdKey>,
}

impl Deferred {
    fn contains(&self, key: &IdKey) -> bool {
        self.first.contains_key(key)
    }

    /// Whether a later write of `key` in this batch is left out (deferred or refetched).
    fn skips(&self, key: &IdKey) -> bool {
        self.contains(key) || self.covered.contains(key)
    }

    fn add(&mut self, s: &Statement, code: i32, msg: &str) {
        if !self.first.contains_key(&s.key) {
            self.order.push(s.key.clone());
            self.first.insert(
                s.key.clone(),
                DeferredWrite {
                    step: s.clone(),
                    code,
                    msg: msg.to_owned(),
                },
            );
        }
    }
}

/// `{q: {_id}, u: doc, upsert: true}`; a document with a top-level `$`-prefixed field (legal
/// since 5.0) cannot be a replacement document (the server would read it as operators), so it
/// is stored with a pipeline `[{$replaceWith: {$literal: doc}}]`.
fn upsert_statement(id: &RawBson, doc: &RawDocumentBuf) -> RawDocumentBuf {
    let dollar = doc
        .iter()
        .any(|e| e.is_ok_and(|(k, _)| k.as_str().starts_with('$')));
    if dollar {
        let mut pipeline = RawArrayBuf::new();
        pipeline.push(rawdoc! {"$replaceWith": {"$literal": doc.clone()}});
        rawdoc! {"q": {"_id": id.clone()}, "u": pipeline, "upsert": true}
    } else {
        rawdoc! {"q": {"_id": id.clone()}, "u": doc.clone(), "upsert": true}
    }
}

/// Whether a document can be sent with `insert` as it is: one with a top-level `$`-prefixed
/// field goes the replace way (see [`upsert_statement`]).
fn insertable(doc: &RawDocumentBuf) -> bool {
    !doc.iter()
        .any(|e| e.is_ok_and(|(k, _)| k.as_str().starts_with('$')))
}

/// Whether a duplicate-key error is on the `_id` index (`... index: _id_ dup key: ...`): the
/// document exists, and a replace settles it; any other index is a unique secondary index,
/// decided in strict source order.
fn duplicate_on_id(msg: &str) -> bool {
    msg.contains("index: _id_ ")
}

/// `{q: {_id}, u: ...}`: a delta's `$set`/`$unset`, or a truncation's `$push` with `$slice`.
fn delta_statement(id: &RawBson, w: &DocWrite) -> Result<RawDocumentBuf, SyncError> {
    match w {
        DocWrite::Delta { set, unset } => {
            for name in unset {
                cstr_key(name)?;
            }
            Ok(encode::delta_statement(id.as_raw_bson_ref(), set, unset))
        }
        DocWrite::Truncate(fields) => {
            let mut push = RawDocumentBuf::new();
            for (f, n) in fields {
                push.append(cstr_key(f)?, rawdoc! {"$each": [], "$slice": *n});
            }
            Ok(rawdoc! {"q": {"_id": id.clone()}, "u": {"$push": push}})
        }
        _ => unreachable!("deltas hold deltas"),
    }
}

/// Parsed reply of a bulk `update`/`delete`.
struct BulkReply {
    n: i64,
    /// `(statement index, code, message)`.
    errors: Vec<(usize, i32, String)>,
}

/// Writes one namespace's changes to the destination.
pub struct Applier {
    pub source_ns: Namespace,
    pub target: Namespace,
    /// Label used in metrics and logs: the source namespace.
    pub label: String,
    dest_db: Database,
    source: Source,
    metadata: Metadata,
    metrics: Metrics,
    sync_id: String,
    update_mode: UpdateMode,
    /// Bounds each bulk command (`destination.socket_timeout_ms`).
    op_timeout: Option<std::time::Duration>,
    conflict: ConflictSettings,
    /// What the destination's catalog says, and when we looked.
    catalog: parking_lot::Mutex<Option<(Catalog, Instant)>>,
    /// The source collection's current validator (see [`Applier::with_source_validator`]).
    source_validator: SourceValidator,
    /// `apply.write_lanes` (see [`lanes`]).
    lanes: LanePlan,
}

/// How an applier chooses the lane count of its bulk writes (`apply.write_lanes`).
#[derive(Debug, Clone)]
pub enum LanePlan {
    Fixed(usize),
    /// `auto`: the worker's tuner, kept across the appliers the worker builds.
    Tuned(std::sync::Arc<parking_lot::Mutex<LaneTuner>>),
}

/// What [`Applier::upsert_documents`] did.
#[derive(Debug, Default)]
pub struct Upserted {
    pub written: u64,
    pub dead_lettered: u64,
    /// Documents a unique secondary index refused (E11000), with the server's message.
    pub duplicates: Vec<(RawDocumentBuf, String)>,
}

/// The source collection's current validator, shared by a worker and its appliers: set when
/// the worker aligns the destination's options and on every `modify` event.
pub type SourceValidator = std::sync::Arc<parking_lot::Mutex<Option<Document>>>;

fn write_error(context: &str, e: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::DestinationWrite, context, e)
}

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source_ns: Namespace,
        target: Namespace,
        dest: &mongodb::Client,
        source: Source,
        metadata: Metadata,
        metrics: Metrics,
        sync_id: String,
        update_mode: UpdateMode,
        op_timeout: Option<std::time::Duration>,
        conflict: ConflictSettings,
    ) -> Applier {
        Applier {
            conflict,
            label: source_ns.to_string(),
            dest_db: dest.database(&target.db),
            source_ns,
            target,
            source,
            metadata,
            metrics,
            sync_id,
            update_mode,
            op_timeout,
            catalog: parking_lot::Mutex::new(None),
            source_validator: SourceValidator::default(),
            lanes: LanePlan::Fixed(1),
        }
    }

    /// How each round's statements of one kind are cut into concurrent commands
    /// (`apply.write_lanes`).
    pub fn with_lanes(mut self, lanes: LanePlan) -> Applier {
        self.lanes = lanes;
        self
    }

    /// Whether a batch may be prepared while the batch before it is still being written
    /// ([`turn`]): source-wins writes read nothing from the destination before they write;
    /// conflict detection reads the documents it compares.
    pub fn may_overlap_batches(&self) -> bool {
        !self.conflict.detects_conflicts()
    }

    pub fn destination_collection(&self) -> mongodb::Collection<RawDocumentBuf> {
        self.dest_db.collection(&self.target.coll)
    }

    /// Applies the data events of a batch (DDL is handled by the worker). Events at or before
    /// `replay_until` are replays of what the copy wrote: shape and duplicate-key errors there
    /// are expected and counted as `replay_skipped`.
    pub async fn apply_events(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
    ) -> Result<ApplyStats, SyncError> {
        self.catalog().await?;
        if self.conflict.detects_conflicts() {
            // Conflicts are detected only after the replay: the copy and its replays apply
            // source-wins. Events arrive in cluster-time order, so replays come first.
            let split = events
                .iter()
                .position(|e| replay_until.is_none_or(|r| ts_key(e.cluster_time) > ts_key(r)))
                .unwrap_or(events.len());
            let mut stats = self
                .apply_source_wins(&events[..split], replay_until)
                .await?;
            self.apply_conditional(&events[split..], &mut stats).await?;
            return Ok(stats);
        }
        self.apply_source_wins(events, replay_until).await
    }

    async fn apply_source_wins(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
    ) -> Result<ApplyStats, SyncError> {
        if self.has_unique_secondary_index().await? {
            return self.apply_in_source_order(events, replay_until).await;
        }
        match self.apply_coalesced(events, replay_until).await? {
            Some(stats) => Ok(stats),
            None => {
                // A round met a duplicate key: the destination has a unique secondary index we
                // did not know of (or a round reordered writes it constrains). Coalesced rounds
                // may have applied part of the batch; every write is an exact image or a
                // refetch keyed by `_id`, so re-applying the whole batch in source order from
                // its first event converges and decides errors as the rule requires.
                self.remember_unique_index();
                tracing::debug!(namespace = %self.label, "a duplicate key in a coalesced round: applying the batch in source order");
                self.apply_in_source_order(events, replay_until).await
            }
        }
    }

    /// The writes one data event asks for (`None`: not a data event). A replayed update
    /// (`in_replay`) is a refetch: the destination may already hold later changes of the
    /// document, and a delta applied on top of them would move the fields it unsets and sets.
    fn event_writes(
        &self,
        ev: &ChangeEvent,
        in_replay: bool,
    ) -> Result<Option<Vec<DocWrite>>, SyncError> {
        let writes = self.event_writes_in_order(ev)?;
        Ok(writes.map(|w| {
            let delta = w
                .iter()
                .any(|w| matches!(w, DocWrite::Delta { .. } | DocWrite::Truncate(_)));
            if in_replay && delta {
                vec![DocWrite::Refetch]
            } else {
                w
            }
        }))
    }

    fn event_writes_in_order(&self, ev: &ChangeEvent) -> Result<Option<Vec<DocWrite>>, SyncError> {
        Ok(Some(match ev.kind {
            OpKind::Insert | OpKind::Replace => match ev.full_document() {
                Some(d) => vec![DocWrite::Upsert(d.to_owned())],
                None => vec![DocWrite::Refetch],
            },
            OpKind::Delete => vec![DocWrite::Delete],
            OpKind::Update => match (ev.full_document(), self.update_mode) {
                (Some(d), _) => vec![DocWrite::Upsert(d.to_owned())],
                // updateLookup found nothing: the document is gone; its delete follows.
                (None, UpdateMode::Lookup) if ev.full_document_is_null() => Vec::new(),
                _ => match ev.update_description() {
                    Some(ud) => delta_writes(ud, self.source.disambiguates_paths())?,
                    None => vec![DocWrite::Refetch],
                },
            },
            _ => return Ok(None),
        }))
    }

    /// The fast path for collections without unique secondary indexes: per-`_id` queues in
    /// concurrent rounds. Returns `None` when a round met a duplicate key (the caller then
    /// applies the batch in strict source order).
    async fn apply_coalesced(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
    ) -> Result<Option<ApplyStats>, SyncError> {
        let mut stats = ApplyStats::default();
        let mut queues = Queues::default();
        for (i, ev) in events.iter().enumerate() {
            let Some(id) = ev.document_key() else {
                continue;
            };
            let Some(writes) = self.event_writes(ev, in_replay(ev, replay_until))? else {
                continue;
            };
            stats.count(ev.kind.apply_op());
            for w in writes {
                queues.push(id.clone(), w, i);
            }
        }
        // Documents refetched in an earlier round: their later writes are in what was read.
        let mut refetched = std::collections::HashSet::new();
        for round in queues.into_rounds() {
            let mut statements: Vec<Statement> = if refetched.is_empty() {
                round
            } else {
                round
                    .into_iter()
                    .filter(|s| !refetched.contains(&s.key))
                    .collect()
            };
            // Repairs can cascade once (a delta that matched nothing becomes a refetch).
            for _ in 0..3 {
                if statements.is_empty() {
                    break;
                }
                match self
                    .run_round(statements, events, &mut refetched, &mut stats)
                    .await?
                {
                    Some(again) => statements = again,
                    None => return Ok(None),
                }
            }
            if !statements.is_empty() {
                return Err(SyncError::new(
                    ErrorKind::InvariantViolated,
                    format!(
                        "writes to {} could not be settled after repeated repairs",
                        self.target
                    ),
                ));
            }
        }
        Ok(Some(stats))
    }

    /// Executes one round; returns statements that need another pass (repairs), or `None`
    /// when a statement met a duplicate key (the batch is then applied in source order).
    async fn run_round(
        &self,
        statements: Vec<Statement>,
        events: &[ChangeEvent],
        refetched: &mut std::collections::HashSet<IdKey>,
        stats: &mut ApplyStats,
    ) -> Result<Option<Vec<Statement>>, SyncError> {
        // Resolve refetches first: they become upserts or deletes.
        let refetch_ids: Vec<Bson> = statements
            .iter()
            .filter(|s| matches!(s.write, DocWrite::Refetch))
            .filter_map(|s| Bson::try_from(s.id.clone()).ok())
            .collect();
        let mut current: HashMap<IdKey, RawDocumentBuf> = HashMap::new();
        if !refetch_ids.is_empty() {
            for doc in self
                .source
                .fetch_documents_at(&self.source_ns, &refetch_ids, batch_end(events))
                .await?
            {
                if let Ok(Some(id)) = doc.get("_id") {
                    current.insert(id_key(&RawBson::from(id)), doc);
                }
            }
            stats.repaired += refetch_ids.len() as u64;
        }
        let mut inserts = Vec::new();
        let mut upserts = Vec::new();
        let mut deltas = Vec::new();
        let mut deletes = Vec::new();
        for s in statements {
            match &s.write {
                // An insert event's document goes in at insert speed; the ids the destination
                // already holds (a replay, a copy that saw the document) fall back to a
                // replace below.
                DocWrite::Upsert(doc)
                    if events[s.event].kind == OpKind::Insert && insertable(doc) =>
                {
                    inserts.push(s)
                }
                DocWrite::Upsert(_) => upserts.push(s),
                DocWrite::Delete => deletes.push(s),
                DocWrite::Truncate(_) | DocWrite::Delta { .. } => deltas.push(s),
                DocWrite::Refetch => {
                    refetched.insert(s.key.clone());
                    match current.remove(&s.key) {
                        Some(doc) => upserts.push(Statement {
                            write: DocWrite::Upsert(doc),
                            ..s
                        }),
                        None => deletes.push(Statement {
                            write: DocWrite::Delete,
                            ..s
                        }),
                    }
                }
            }
        }
        let (ins, up, de, dl) = futures::join!(
            self.run_inserts(&inserts),
            self.run_upserts(&upserts),
            self.run_deltas(&deltas),
            self.run_deletes(&deletes),
        );
        let (ins, mut up, de, dl) = (ins?, up?, de?, dl?);
        stats.writes += (inserts.len() + upserts.len() + deltas.len() + deletes.len()) as u64;
        // Inserts that found their `_id` taken are sent again as replaces; their other errors
        // are judged with the upserts' (the statement joins the upserts so the index names it).
        let mut retry = Vec::new();
        for (idx, code, msg) in ins.errors {
            let s = inserts[idx].clone();
            if code == DUPLICATE_KEY && duplicate_on_id(&msg) {
                retry.push(s);
            } else {
                up.errors.push((upserts.len(), code, msg));
                upserts.push(s);
            }
        }
        if !retry.is_empty() {
            let again = self.run_upserts(&retry).await?;
            stats.writes += retry.len() as u64;
            let base = upserts.len();
            for (idx, code, msg) in again.errors {
                up.errors.push((base + idx, code, msg));
            }
            upserts.extend(retry);
        }
        // Duplicate keys are decided in strict source order; transient statement errors retry
        // the batch.
        for (code, msg) in up
            .errors
            .iter()
            .chain(&de.errors)
            .chain(&dl.errors)
            .map(|(_, c, m)| (*c, m))
        {
            if code == DUPLICATE_KEY {
                return Ok(None);
            }
            self.check_transient(code, msg)?;
        }
        let mut again = Vec::new();
        // Upserts: a rejected document is dead-lettered.
        for (idx, code, msg) in up.errors {
            let s = &upserts[idx];
            if REJECTED_DOCUMENT_CODES.contains(&code) {
                let DocWrite::Upsert(doc) = &s.write else {
                    unreachable!("upserts hold upserts")
                };
                self.dead_letter(&s.id, &events[s.event], Some(doc), code, &msg)
                    .await?;
                stats.dead_letters += 1;
            } else {
                return Err(SyncError::new(
                    ErrorKind::DestinationWrite,
                    format!("upsert into {} failed with code {code}: {msg}", self.target),
                ));
            }
        }
        // Deltas: shape errors are repaired from the source.
        let mut failed = vec![false; deltas.len()];
        for (idx, code, msg) in &de.errors {
            failed[*idx] = true;
            let s = &deltas[*idx];
            if SHAPE_ERROR_CODES.contains(code) {
                again.push(Statement {
                    write: DocWrite::Refetch,
                    key: s.key.clone(),
                    id: s.id.clone(),
                    event: s.event,
                });
            } else if REJECTED_DOCUMENT_CODES.contains(code) {
                self.dead_letter(&s.id, &events[s.event], None, *code, msg)
                    .await?;
                stats.dead_letters += 1;
            } else {
                return Err(SyncError::new(
                    ErrorKind::DestinationWrite,
                    format!("update of {} failed with code {code}: {msg}", self.target),
                ));
            }
        }
        let attempted = deltas.len() - de.errors.len();
        if (de.n as usize) < attempted {
            // Some deltas matched nothing: those documents are missing on the destination.
            let ids: Vec<RawBson> = deltas
                .iter()
                .zip(&failed)
                .filter(|(_, f)| !**f)
                .map(|(s, _)| s.id.clone())
                .collect();
            let present = self.existing_ids(&ids).await?;
            for (s, f) in deltas.iter().zip(&failed) {
                if !*f && !present.contains(&s.key) {
                    again.push(Statement {
                        write: DocWrite::Refetch,
                        key: s.key.clone(),
                        id: s.id.clone(),
                        event: s.event,
                    });
                }
            }
        }
        if let Some((_, code, msg)) = dl.errors.first() {
            return Err(SyncError::new(
                ErrorKind::DestinationWrite,
                format!("delete from {} failed with code {code}: {msg}", self.target),
            ));
        }
        Ok(Some(again))
    }

    /// What the destination collection's catalog says about how to write it (cached for
    /// [`CATALOG_CACHE`]; a duplicate key in a coalesced round marks a unique index at once).
    async fn catalog(&self) -> Result<Catalog, SyncError> {
        if let Some((c, at)) = *self.catalog.lock() {
            if at.elapsed() < CATALOG_CACHE {
                return Ok(c);
            }
        }
        let specs: Vec<Document> = match self
            .dest_db
            .run_command(doc! {"listIndexes": self.target.coll.as_str()})
            .await
        {
            Ok(reply) => reply
                .get_document("cursor")
                .ok()
                .and_then(|c| c.get_array("firstBatch").ok())
                .map(|b| b.iter().filter_map(|d| d.as_document().cloned()).collect())
                .unwrap_or_default(),
            Err(e) if crate::source::is_namespace_not_found(&e) => Vec::new(),
            Err(e) => return Err(write_error("listing destination indexes", e)),
        };
        let unique_secondary = specs.iter().any(|spec| {
            spec.get_bool("unique").unwrap_or(false)
                && spec
                    .get_document("key")
                    .is_ok_and(|k| k != &doc! {"_id": 1})
        });
        let listed: Vec<Document> = self
            .dest_db
            .run_command(doc! {"listCollections": 1, "filter": {"name": self.target.coll.as_str()}})
            .await
            .ok()
            .and_then(|r| r.get_document("cursor").ok().cloned())
            .and_then(|c| c.get_array("firstBatch").ok().cloned())
            .map(|b| {
                b.into_iter()
                    .filter_map(|d| d.as_document().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let dest_validator = listed
            .first()
            .and_then(|c| c.get_document("options").ok())
            .and_then(|o| o.get_document("validator").ok())
            .filter(|v| !v.is_empty());
        // Replication writes bypass validation (the source accepted the document, maybe under a
        // `moderate` validator that old documents predate), unless the destination has a
        // validator of its own: then a rejection is a real, dead-lettered document error.
        let bypass_validation = match dest_validator {
            None => true,
            Some(v) => self.source_validator.lock().as_ref() == Some(v),
        };
        let c = Catalog {
            unique_secondary,
            bypass_validation,
        };
        *self.catalog.lock() = Some((c, Instant::now()));
        Ok(c)
    }

    async fn has_unique_secondary_index(&self) -> Result<bool, SyncError> {
        Ok(self.catalog().await?.unique_secondary)
    }

    fn remember_unique_index(&self) {
        if let Some((c, _)) = self.catalog.lock().as_mut() {
            c.unique_secondary = true;
        }
    }

    /// Whether replication writes carry `bypassDocumentValidation` (see [`Applier::catalog`]).
    fn bypass_validation(&self) -> bool {
        self.catalog
            .lock()
            .map(|(c, _)| c.bypass_validation)
            .unwrap_or(true)
    }

    /// DDL changed the destination's indexes or options: look them up again before the next
    /// write.
    pub fn forget_catalog(&self) {
        *self.catalog.lock() = None;
    }

    /// The source collection's validator: a destination validator equal to it is a copied one,
    /// which replication writes bypass.
    pub fn with_source_validator(mut self, validator: SourceValidator) -> Applier {
        self.source_validator = validator;
        self
    }

    /// A statement's write error that is transient (the one classifier in `error`) becomes a
    /// retryable error for the whole batch; anything else is left to the caller.
    fn check_transient(&self, code: i32, msg: &str) -> Result<(), SyncError> {
        if crate::error::is_transient_write_error(code) {
            return Err(SyncError::new(
                ErrorKind::DestinationConnection,
                format!(
                    "a write to {} failed transiently with code {code}: {msg}; retrying the batch",
                    self.target
                ),
            ));
        }
        Ok(())
    }

    /// Applies a batch in strict source order (DESIGN §2.10, issue 9 item 2): one write per
    /// event, no coalescing, consecutive writes of one kind in ordered bulk commands. A write
    /// that fails on a duplicate key is deferred (its later writes in the batch are skipped)
    /// and settled at the end of the batch from the source's current document; only what
    /// still fails then is dead-lettered (or, in a replay window, counted as skipped).
    async fn apply_in_source_order(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
    ) -> Result<ApplyStats, SyncError> {
        let mut stats = ApplyStats::default();
        let mut steps: Vec<Statement> = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let Some(id) = ev.document_key() else {
                continue;
            };
            let Some(writes) = self.event_writes(ev, in_replay(ev, replay_until))? else {
                continue;
            };
            stats.count(ev.kind.apply_op());
            let key = id_key(&id);
            for write in writes {
                steps.push(Statement {
                    key: key.clone(),
                    id: id.clone(),
                    write,
                    event: i,
                });
            }
        }
        let mut deferred = Deferred::default();
        let mut start = 0;
        while start < steps.len() {
            let kind = StepKind::of(&steps[start].write);
            let mut end = start;
            while end < steps.len() && StepKind::of(&steps[end].write) == kind {
                end += 1;
            }
            let group: Vec<&Statement> = steps[start..end]
                .iter()
                .filter(|s| !deferred.skips(&s.key))
                .collect();
            self.run_ordered_group(kind, &group, events, &mut deferred, &mut stats)
                .await?;
            start = end;
        }
        self.settle_deferred(deferred, events, replay_until, &mut stats)
            .await?;
        Ok(stats)
    }

    /// Runs one group of same-kind statements as ordered bulk commands, handling each failed
    /// statement at its position and continuing after it.
    async fn run_ordered_group(
        &self,
        kind: StepKind,
        group: &[&Statement],
        events: &[ChangeEvent],
        deferred: &mut Deferred,
        stats: &mut ApplyStats,
    ) -> Result<(), SyncError> {
        if kind == StepKind::Refetch {
            // Each refetch becomes an upsert or a delete of the source's current document.
            for s in group {
                if !deferred.skips(&s.key) {
                    self.refetch_in_order(s, events, deferred, stats).await?;
                }
            }
            return Ok(());
        }
        let mut pos = 0;
        let mut matched = 0i64;
        let mut succeeded: Vec<&Statement> = Vec::new();
        while pos < group.len() {
            // A deferred id's later writes are skipped (the refetch at the end covers them), as
            // are a refetched id's (the refetch read them).
            let rest: Vec<&Statement> = group[pos..]
                .iter()
                .copied()
                .filter(|s| !deferred.skips(&s.key))
                .collect();
            if rest.is_empty() {
                break;
            }
            let built = rest
                .iter()
                .map(|s| self.statement(s))
                .collect::<Result<Vec<_>, _>>()?;
            let (command, field) = kind.command();
            let reply = self.bulk_with(command, field, built, true).await?;
            stats.writes += rest.len() as u64;
            matched += reply.n;
            let Some((idx, code, msg)) = reply.errors.into_iter().next() else {
                succeeded.extend(rest.iter().copied());
                break;
            };
            succeeded.extend(rest[..idx].iter().copied());
            let failed = rest[idx];
            self.check_transient(code, &msg)?;
            self.handle_failed_step(failed, code, &msg, events, deferred, stats)
                .await?;
            // Continue after the failed statement.
            pos = group
                .iter()
                .position(|s| std::ptr::eq(*s, failed))
                .expect("the failed statement is in its group")
                + 1;
        }
        if kind == StepKind::Delta && (matched as usize) < succeeded.len() {
            // Deltas that matched nothing: the document is missing on the destination (deltas
            // never create one, so the group leaves it missing): repair from the source.
            let ids: Vec<RawBson> = succeeded.iter().map(|s| s.id.clone()).collect();
            let present = self.existing_ids(&ids).await?;
            let mut repaired = std::collections::HashSet::new();
            for s in succeeded {
                if !present.contains(&s.key)
                    && !deferred.skips(&s.key)
                    && repaired.insert(s.key.clone())
                {
                    self.refetch_in_order(s, events, deferred, stats).await?;
                }
            }
        }
        Ok(())
    }

    /// Decides one statement that failed in strict source order.
    async fn handle_failed_step(
        &self,
        s: &Statement,
        code: i32,
        msg: &str,
        events: &[ChangeEvent],
        deferred: &mut Deferred,
        stats: &mut ApplyStats,
    ) -> Result<(), SyncError> {
        let is_delta = matches!(s.write, DocWrite::Delta { .. } | DocWrite::Truncate(_));
        if code == DUPLICATE_KEY {
            deferred.add(s, code, msg);
        } else if is_delta && SHAPE_ERROR_CODES.contains(&code) {
            // The destination refuses the delta for its shape: take the source's document.
            self.refetch_in_order(s, events, deferred, stats).await?;
        } else if REJECTED_DOCUMENT_CODES.contains(&code) {
            let doc = match &s.write {
                DocWrite::Upsert(d) => Some(d),
                _ => None,
            };
            self.dead_letter(&s.id, &events[s.event], doc, code, msg)
                .await?;
            stats.dead_letters += 1;
        } else {
            return Err(SyncError::new(
                ErrorKind::DestinationWrite,
                format!("a write to {} failed with code {code}: {msg}", self.target),
            ));
        }
        Ok(())
    }

    /// Replaces (or deletes) one document with the source's version as of the batch's last
    /// event, at this point of the source order; the batch's later writes to it are skipped.
    async fn refetch_in_order(
        &self,
        s: &Statement,
        events: &[ChangeEvent],
        deferred: &mut Deferred,
        stats: &mut ApplyStats,
    ) -> Result<(), SyncError> {
        let id = Bson::try_from(s.id.clone()).map_err(|e| {
            SyncError::with_source(ErrorKind::InvariantViolated, "decoding an _id", e)
        })?;
        let current = self
            .source
            .fetch_documents_at(
                &self.source_ns,
                std::slice::from_ref(&id),
                batch_end(events),
            )
            .await?
            .into_iter()
            .next();
        deferred.covered.insert(s.key.clone());
        stats.repaired += 1;
        stats.writes += 1;
        let write = match current {
            Some(doc) => DocWrite::Upsert(doc),
            None => DocWrite::Delete,
        };
        let step = Statement {
            key: s.key.clone(),
            id: s.id.clone(),
            write,
            event: s.event,
        };
        let kind = StepKind::of(&step.write);
        let (command, field) = kind.command();
        let reply = self
            .bulk_with(command, field, vec![self.statement(&step)?], true)
            .await?;
        if let Some((_, code, msg)) = reply.errors.into_iter().next() {
            self.check_transient(code, &msg)?;
            if code == DUPLICATE_KEY {
                deferred.add(&step, code, &msg);
            } else if REJECTED_DOCUMENT_CODES.contains(&code) {
                let doc = match &step.write {
                    DocWrite::Upsert(d) => Some(d),
                    _ => None,
                };
                self.dead_letter(&step.id, &events[step.event], doc, code, &msg)
                    .await?;
                stats.dead_letters += 1;
            } else {
                return Err(SyncError::new(
                    ErrorKind::DestinationWrite,
                    format!(
                        "replacing a document of {} failed with code {code}: {msg}",
                        self.target
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Settles writes deferred on a duplicate key: with the rest of the batch applied, each is
    /// retried from the source's current document, in passes while any pass makes progress.
    async fn settle_deferred(
        &self,
        mut deferred: Deferred,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
        stats: &mut ApplyStats,
    ) -> Result<(), SyncError> {
        while !deferred.order.is_empty() {
            let pending = std::mem::take(&mut deferred);
            let before = pending.order.len();
            let still = self.retry_deferred(&pending, events, stats).await?;
            if still.order.len() >= before {
                deferred = still;
                break;
            }
            deferred = still;
        }
        if !deferred.order.is_empty() {
            deferred = self.rewrite_stuck(deferred, events, stats).await?;
        }
        for key in &deferred.order {
            let first = &deferred.first[key];
            let ev = &events[first.step.event];
            if in_replay(ev, replay_until) {
                tracing::warn!(namespace = %self.label, code = first.code, "a replayed write still conflicts with a unique index after the batch; skipped");
                stats.replay_skipped += 1;
            } else {
                let doc = match &first.step.write {
                    DocWrite::Upsert(d) => Some(d),
                    _ => None,
                };
                self.dead_letter(&first.step.id, ev, doc, first.code, &first.msg)
                    .await?;
                stats.dead_letters += 1;
            }
        }
        Ok(())
    }

    /// Breaks a cycle of deferred writes: each stuck document wants a key that another stuck
    /// one still holds on the destination (a swap whose middle step a refetch covered). Read
    /// as of the batch's end the source holds every key once, so deleting the stuck documents
    /// and writing them again from that read frees the keys among them, as a re-copy's settle
    /// does. Returns what a unique index still refuses.
    async fn rewrite_stuck(
        &self,
        stuck: Deferred,
        events: &[ChangeEvent],
        stats: &mut ApplyStats,
    ) -> Result<Deferred, SyncError> {
        let ids = stuck
            .order
            .iter()
            .map(|key| {
                Bson::try_from(stuck.first[key].step.id.clone()).map_err(|e| {
                    SyncError::with_source(ErrorKind::InvariantViolated, "decoding an _id", e)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.delete_ids(&ids).await?;
        self.retry_deferred(&stuck, events, stats).await
    }

    /// Writes each deferred document again from the source's version as of the batch's end;
    /// returns those still refused, each with its first failure (the write that failed in
    /// source order).
    async fn retry_deferred(
        &self,
        pending: &Deferred,
        events: &[ChangeEvent],
        stats: &mut ApplyStats,
    ) -> Result<Deferred, SyncError> {
        let mut still = Deferred::default();
        for (key, first) in pending.order.iter().map(|k| (k, &pending.first[k])) {
            self.refetch_in_order(&first.step, events, &mut still, stats)
                .await?;
            if let Some(again) = still.first.get_mut(key) {
                again.step.event = first.step.event;
                again.code = first.code;
                again.msg = first.msg.clone();
            }
        }
        Ok(still)
    }

    /// The bulk statement of one write (refetches must be resolved first).
    fn statement(&self, s: &Statement) -> Result<RawDocumentBuf, SyncError> {
        Ok(match &s.write {
            DocWrite::Upsert(doc) => upsert_statement(&s.id, doc),
            DocWrite::Delete => rawdoc! {"q": {"_id": s.id.clone()}, "limit": 1},
            DocWrite::Truncate(_) | DocWrite::Delta { .. } => delta_statement(&s.id, &s.write)?,
            DocWrite::Refetch => unreachable!("refetches are resolved before they are sent"),
        })
    }

    /// Applies events under a conflict-detecting policy: one conditional write per event (no
    /// coalescing: each write's condition is the state the previous one left), in rounds that
    /// keep per-document order.
    async fn apply_conditional(
        &self,
        events: &[ChangeEvent],
        stats: &mut ApplyStats,
    ) -> Result<(), SyncError> {
        let mut order: Vec<IdKey> = Vec::new();
        let mut queues: HashMap<IdKey, Vec<(RawBson, Conditional, usize)>> = HashMap::new();
        for (i, ev) in events.iter().enumerate() {
            let Some(id) = ev.document_key() else {
                continue;
            };
            stats.count(ev.kind.apply_op());
            let key = id_key(&id);
            let q = queues.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                Vec::new()
            });
            q.push((id, plan(ev, &self.conflict), i));
        }
        let rounds = queues.values().map(Vec::len).max().unwrap_or(0);
        for round in 0..rounds {
            let statements: Vec<(RawBson, Conditional, usize)> = order
                .iter()
                .filter_map(|k| queues[k].get(round).cloned())
                .collect();
            let conflicts = self
                .run_conditional_round(&statements, events, stats)
                .await?;
            self.record_conflicts(&conflicts, events).await?;
        }
        Ok(())
    }

    /// Executes one round of conditional writes; returns the writes that were not applied
    /// (`(id, write, event index, outcome is unknown)`).
    async fn run_conditional_round(
        &self,
        statements: &[(RawBson, Conditional, usize)],
        events: &[ChangeEvent],
        stats: &mut ApplyStats,
    ) -> Result<Vec<(RawBson, Conditional, usize, bool)>, SyncError> {
        let mut inserts = Vec::new();
        let mut unchanged = Vec::new();
        let mut delete_unchanged = Vec::new();
        let mut not_newer = Vec::new();
        let mut deletes = Vec::new();
        let mut lost = Vec::new();
        // destination-wins equality is exact: the destination document must be byte-for-byte
        // the source's pre-image (1, 1.0 and NumberLong(1) differ; so do "Bob" and "bob" under
        // a case-insensitive collation). `$expr: {$eq: [$$ROOT, pre]}` compares values, so it
        // cannot decide this; it is only the guard of the write after the exact read decided
        // (it catches any value change between the read and the write).
        let conditional_ids: Vec<RawBson> = statements
            .iter()
            .filter(|s| {
                matches!(
                    s.1,
                    Conditional::ReplaceIfUnchanged { .. } | Conditional::DeleteIfUnchanged { .. }
                )
            })
            .map(|s| s.0.clone())
            .collect();
        let before = if conditional_ids.is_empty() {
            HashMap::new()
        } else {
            self.destination_documents(&conditional_ids).await?
        };
        let exactly_pre = |id: &RawBson, pre: &RawDocumentBuf| {
            before.get(&id_key(id)).map(|d| d.as_bytes()) == Some(pre.as_bytes())
        };
        for s in statements {
            match &s.1 {
                Conditional::InsertIfAbsent(_) => inserts.push(s),
                Conditional::ReplaceIfUnchanged { pre, .. } if !exactly_pre(&s.0, pre) => {
                    lost.push((s.0.clone(), s.1.clone(), s.2, false))
                }
                Conditional::DeleteIfUnchanged { pre } if !exactly_pre(&s.0, pre) => {
                    lost.push((s.0.clone(), s.1.clone(), s.2, false))
                }
                Conditional::ReplaceIfUnchanged { .. } => unchanged.push(s),
                Conditional::DeleteIfUnchanged { .. } => delete_unchanged.push(s),
                Conditional::ReplaceIfNotNewer { .. } => not_newer.push(s),
                Conditional::Delete => deletes.push(s),
                Conditional::Unknown => lost.push((s.0.clone(), s.1.clone(), s.2, true)),
                Conditional::Skip => {}
            }
        }
        let field = self.conflict.field.clone().unwrap_or_default();
        let mut not_newer_statements = Vec::with_capacity(not_newer.len());
        for (id, c, _) in &not_newer {
            let Conditional::ReplaceIfNotNewer { doc } = c else {
                unreachable!("partitioned")
            };
            let filter = not_newer_filter(id, &field, value_at(doc, &field)).map_err(|e| {
                SyncError::with_source(
                    ErrorKind::Config,
                    "conflict.field is not a valid field path",
                    e,
                )
            })?;
            not_newer_statements.push(rawdoc! {"q": filter, "u": doc.clone(), "upsert": true});
        }
        let insert_docs: Vec<RawDocumentBuf> = inserts
            .iter()
            .map(|(_, c, _)| match c {
                Conditional::InsertIfAbsent(d) => d.clone(),
                _ => unreachable!("partitioned"),
            })
            .collect();
        let unchanged_statements: Vec<RawDocumentBuf> = unchanged
            .iter()
            .map(|(id, c, _)| match c {
                // Binary equality, whatever the collection's default collation: "Bob" and
                // "bob" are different documents (issue 9).
                Conditional::ReplaceIfUnchanged { pre, post } => {
                    rawdoc! {"q": unchanged_filter(id, pre), "u": post.clone(), "collation": {"locale": "simple"}}
                }
                _ => unreachable!("partitioned"),
            })
            .collect();
        let delete_unchanged_statements: Vec<RawDocumentBuf> = delete_unchanged
            .iter()
            .map(|(id, c, _)| match c {
                Conditional::DeleteIfUnchanged { pre } => {
                    rawdoc! {"q": unchanged_filter(id, pre), "limit": 1, "collation": {"locale": "simple"}}
                }
                _ => unreachable!("partitioned"),
            })
            .collect();
        let delete_statements: Vec<RawDocumentBuf> = deletes
            .iter()
            .map(|(id, _, _)| rawdoc! {"q": {"_id": id.clone()}, "limit": 1})
            .collect();
        let (ins, unch, del_unch, newer, del) = futures::join!(
            self.bulk("insert", "documents", insert_docs),
            self.bulk("update", "updates", unchanged_statements),
            self.bulk("delete", "deletes", delete_unchanged_statements),
            self.bulk("update", "updates", not_newer_statements),
            self.bulk("delete", "deletes", delete_statements),
        );
        let (ins, unch, del_unch, newer, del) = (ins?, unch?, del_unch?, newer?, del?);
        stats.writes += statements.len() as u64;
        let fail = |what: &str, (code, msg): (i32, &str)| {
            SyncError::new(
                ErrorKind::DestinationWrite,
                format!("{what} into {} failed with code {code}: {msg}", self.target),
            )
        };
        // Inserts and not-newer upserts: a duplicate `_id` means the destination wins.
        for (_, code, msg) in ins
            .errors
            .iter()
            .chain(&unch.errors)
            .chain(&del_unch.errors)
            .chain(&newer.errors)
            .chain(&del.errors)
        {
            self.check_transient(*code, msg)?;
        }
        for (reply, group) in [(&ins, &inserts), (&newer, &not_newer)] {
            for (idx, code, msg) in &reply.errors {
                let s = group[*idx];
                if *code == DUPLICATE_KEY {
                    lost.push((s.0.clone(), s.1.clone(), s.2, false));
                } else if REJECTED_DOCUMENT_CODES.contains(code) {
                    let doc = match &s.1 {
                        Conditional::InsertIfAbsent(d)
                        | Conditional::ReplaceIfNotNewer { doc: d } => Some(d),
                        _ => None,
                    };
                    self.dead_letter(&s.0, &events[s.2], doc, *code, msg)
                        .await?;
                    stats.dead_letters += 1;
                } else {
                    return Err(fail("a conditional write", (*code, msg)));
                }
            }
        }
        if let Some((_, code, msg)) = unch
            .errors
            .first()
            .or(del_unch.errors.first())
            .or(del.errors.first())
        {
            return Err(fail("a conditional write", (*code, msg)));
        }
        // Conditional replaces and deletes report only a total: when it falls short, read the
        // destination to see which ones did not apply.
        if (unch.n as usize) < unchanged.len() || (del_unch.n as usize) < delete_unchanged.len() {
            let ids: Vec<RawBson> = unchanged
                .iter()
                .chain(delete_unchanged.iter())
                .map(|s| s.0.clone())
                .collect();
            let current = self.destination_documents(&ids).await?;
            for s in &unchanged {
                let Conditional::ReplaceIfUnchanged { post, .. } = &s.1 else {
                    unreachable!("partitioned")
                };
                if current.get(&id_key(&s.0)).map(|d| d.as_bytes()) != Some(post.as_bytes()) {
                    lost.push((s.0.clone(), s.1.clone(), s.2, false));
                }
            }
            for s in &delete_unchanged {
                if current.contains_key(&id_key(&s.0)) {
                    lost.push((s.0.clone(), s.1.clone(), s.2, false));
                }
            }
        }
        Ok(lost)
    }

    /// Counts and (when configured) journals writes a conflict policy did not apply.
    async fn record_conflicts(
        &self,
        lost: &[(RawBson, Conditional, usize, bool)],
        events: &[ChangeEvent],
    ) -> Result<(), SyncError> {
        if lost.is_empty() {
            return Ok(());
        }
        let journal = self.conflict.journals();
        let current = if journal {
            self.destination_documents(&lost.iter().map(|l| l.0.clone()).collect::<Vec<_>>())
                .await?
        } else {
            HashMap::new()
        };
        for (id, write, event, unknown) in lost {
            let outcome = if *unknown {
                ConflictOutcome::Unknown
            } else if journal {
                ConflictOutcome::Journaled
            } else {
                ConflictOutcome::Skipped
            };
            self.metrics
                .conflict(&self.label, self.conflict.label(), outcome);
            let ev = &events[*event];
            tracing::debug!(namespace = %self.label, policy = %self.conflict.policy.as_str(), outcome = outcome.as_str(), op = ev.kind.metric_label(), "conflict: source write not applied");
            if journal {
                let source_version = match write {
                    Conditional::InsertIfAbsent(d)
                    | Conditional::ReplaceIfUnchanged { post: d, .. }
                    | Conditional::ReplaceIfNotNewer { doc: d } => Some(d.clone()),
                    Conditional::DeleteIfUnchanged { .. } | Conditional::Delete => None,
                    Conditional::Unknown => ev.full_document().map(|d| d.to_owned()),
                    Conditional::Skip => None,
                };
                let doc_id = Bson::try_from(id.clone()).unwrap_or(Bson::Null);
                self.metadata
                    .conflict(
                        &self.sync_id,
                        &self.label,
                        &doc_id,
                        self.conflict.policy.as_str(),
                        outcome.as_str(),
                        ev.kind.metric_label(),
                        source_version.as_deref(),
                        current.get(&id_key(id)).map(|d| d.as_ref()),
                        ev.cluster_time,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Current destination documents with these `_id`s, keyed like the write queues.
    async fn destination_documents(
        &self,
        ids: &[RawBson],
    ) -> Result<HashMap<IdKey, RawDocumentBuf>, SyncError> {
        turn::wait().await?;
        let mut arr = RawArrayBuf::new();
        for id in ids {
            arr.push(id.clone());
        }
        let filter: Document = rawdoc! {"_id": {"$in": arr}}.try_into().map_err(|e| {
            SyncError::with_source(ErrorKind::InvariantViolated, "building a lookup filter", e)
        })?;
        let found: Vec<RawDocumentBuf> = self
            .destination_collection()
            .find(filter)
            .await
            .map_err(|e| write_error("reading destination documents", e))?
            .try_collect()
            .await
            .map_err(|e| write_error("reading destination documents", e))?;
        Ok(found
            .into_iter()
            .filter_map(|d| {
                let key = id_key(&RawBson::from(d.get("_id").ok().flatten()?));
                Some((key, d))
            })
            .collect())
    }

    async fn dead_letter(
        &self,
        id: &RawBson,
        event: &ChangeEvent,
        doc: Option<&RawDocumentBuf>,
        code: i32,
        msg: &str,
    ) -> Result<(), SyncError> {
        turn::wait().await?;
        let id = Bson::try_from(id.clone()).unwrap_or(Bson::Null);
        tracing::warn!(
            namespace = %self.label,
            code,
            id_type = ?id.element_type(),
            "destination rejected a document; recorded as a dead letter"
        );
        self.metrics.dead_letter(&self.label);
        self.metadata
            .dead_letter(
                &self.sync_id,
                &self.label,
                &id,
                event.kind.metric_label(),
                doc.map(|d| d.as_ref()),
                code,
                msg,
                Some(event.cluster_time),
            )
            .await
    }

    /// Keys of the given `_id`s that exist on the destination.
    async fn existing_ids(
        &self,
        ids: &[RawBson],
    ) -> Result<std::collections::HashSet<IdKey>, SyncError> {
        turn::wait().await?;
        let mut arr = RawArrayBuf::new();
        for id in ids {
            arr.push(id.clone());
        }
        let filter = rawdoc! {"_id": {"$in": arr}};
        let filter: Document = filter.try_into().map_err(|e| {
            SyncError::with_source(ErrorKind::InvariantViolated, "building a lookup filter", e)
        })?;
        let found: Vec<RawDocumentBuf> = self
            .destination_collection()
            .find(filter)
            .projection(doc! {"_id": 1})
            .await
            .map_err(|e| write_error("checking destination documents", e))?
            .try_collect()
            .await
            .map_err(|e| write_error("checking destination documents", e))?;
        Ok(found
            .iter()
            .filter_map(|d| {
                d.get("_id")
                    .ok()
                    .flatten()
                    .map(|id| id_key(&RawBson::from(id)))
            })
            .collect())
    }

    async fn run_inserts(&self, statements: &[Statement]) -> Result<BulkReply, SyncError> {
        let built = statements.iter().map(|s| {
            let DocWrite::Upsert(doc) = &s.write else {
                unreachable!("inserts hold whole documents")
            };
            doc.clone()
        });
        self.bulk_in_lanes("insert", "documents", built.collect())
            .await
    }

    async fn run_upserts(&self, statements: &[Statement]) -> Result<BulkReply, SyncError> {
        let built = statements.iter().map(|s| {
            let DocWrite::Upsert(doc) = &s.write else {
                unreachable!("upserts hold upserts")
            };
            upsert_statement(&s.id, doc)
        });
        self.bulk_in_lanes("update", "updates", built.collect())
            .await
    }

    async fn run_deltas(&self, statements: &[Statement]) -> Result<BulkReply, SyncError> {
        let mut built = Vec::with_capacity(statements.len());
        for s in statements {
            built.push(delta_statement(&s.id, &s.write)?);
        }
        self.bulk_in_lanes("update", "updates", built).await
    }

    async fn run_deletes(&self, statements: &[Statement]) -> Result<BulkReply, SyncError> {
        let built = statements
            .iter()
            .map(|s| rawdoc! {"q": {"_id": s.id.clone()}, "limit": 1});
        self.bulk_in_lanes("delete", "deletes", built.collect())
            .await
    }

    /// Writes copied documents the destination does not hold yet (a range a copy found empty,
    /// or nearly): one unordered `insert`, at insert speed, then replace-upserts
    /// ([`Applier::upsert_documents`]) for the ids the insert found taken (E11000, on `_id`
    /// or on a unique secondary index, whose conflicts the upserts then report). The result
    /// is the one `upsert_documents` gives for the same documents.
    pub async fn insert_documents(&self, docs: &[RawDocumentBuf]) -> Result<Upserted, SyncError> {
        self.catalog().await?;
        let reply = self.bulk("insert", "documents", docs.to_vec()).await?;
        let mut out = Upserted::default();
        let taken: Vec<RawDocumentBuf> = self
            .copy_errors(docs, reply.errors, &mut out)
            .await?
            .into_iter()
            .map(|(doc, _)| doc)
            .collect();
        let inserted = docs.len() as u64 - out.dead_lettered - taken.len() as u64;
        let upserted = if taken.is_empty() {
            Upserted::default()
        } else {
            self.upsert_documents(&taken).await?
        };
        out.written = inserted + upserted.written;
        out.dead_lettered += upserted.dead_lettered;
        out.duplicates = upserted.duplicates;
        Ok(out)
    }

    /// Replace-upserts documents (the copy, reconciliation and repair path). Documents the
    /// destination rejects are dead-lettered; those that hit a unique index (E11000) are
    /// returned, not dead-lettered: while a copy is still writing, another destination document
    /// may hold the key only until its own range or the replay fixes it (see
    /// `worker::unique_conflicts`).
    pub async fn upsert_documents(&self, docs: &[RawDocumentBuf]) -> Result<Upserted, SyncError> {
        self.catalog().await?;
        let mut statements = Vec::with_capacity(docs.len());
        for d in docs {
            let id = d
                .get("_id")
                .ok()
                .flatten()
                .map(RawBson::from)
                .ok_or_else(|| SyncError::new(ErrorKind::SourceRead, "document without _id"))?;
            statements.push(upsert_statement(&id, d));
        }
        let reply = self.bulk("update", "updates", statements).await?;
        let mut out = Upserted::default();
        out.duplicates = self.copy_errors(docs, reply.errors, &mut out).await?;
        out.written = docs.len() as u64 - out.dead_lettered - out.duplicates.len() as u64;
        Ok(out)
    }

    /// Sorts the write errors of copied `docs`: documents the destination rejects are
    /// dead-lettered (counted in `out`), duplicate keys (E11000) are returned with the server's
    /// message, anything else fails the copy.
    async fn copy_errors(
        &self,
        docs: &[RawDocumentBuf],
        errors: Vec<(usize, i32, String)>,
        out: &mut Upserted,
    ) -> Result<Vec<(RawDocumentBuf, String)>, SyncError> {
        let mut duplicates = Vec::new();
        for (idx, code, msg) in errors {
            if code == 11000 {
                duplicates.push((docs[idx].clone(), msg));
            } else if REJECTED_DOCUMENT_CODES.contains(&code) {
                self.dead_letter_copied(&docs[idx], code, &msg).await?;
                out.dead_lettered += 1;
            } else {
                return Err(SyncError::new(
                    ErrorKind::DestinationWrite,
                    format!(
                        "copying into {} failed with code {code}: {msg}",
                        self.target
                    ),
                ));
            }
        }
        Ok(duplicates)
    }

    /// Records a copied document the destination refused as a dead letter (operation `copy`).
    pub async fn dead_letter_copied(
        &self,
        doc: &RawDocumentBuf,
        code: i32,
        msg: &str,
    ) -> Result<(), SyncError> {
        let id = doc
            .get("_id")
            .ok()
            .flatten()
            .map(RawBson::from)
            .unwrap_or(RawBson::Null);
        let id = Bson::try_from(id).unwrap_or(Bson::Null);
        tracing::warn!(namespace = %self.label, code, "destination rejected a copied document; recorded as a dead letter");
        self.metrics.dead_letter(&self.label);
        self.metadata
            .dead_letter(
                &self.sync_id,
                &self.label,
                &id,
                "copy",
                Some(doc.as_ref()),
                code,
                msg,
                None,
            )
            .await
    }

    /// Deletes documents by `_id`.
    pub async fn delete_ids(&self, ids: &[Bson]) -> Result<u64, SyncError> {
        let mut statements = Vec::with_capacity(ids.len());
        for id in ids {
            let id = RawBson::try_from(id.clone()).map_err(|e| {
                SyncError::with_source(ErrorKind::InvariantViolated, "encoding _id", e)
            })?;
            statements.push(rawdoc! {"q": {"_id": id}, "limit": 1});
        }
        let reply = self.bulk("delete", "deletes", statements).await?;
        if let Some((_, code, msg)) = reply.errors.first() {
            return Err(SyncError::new(
                ErrorKind::DestinationWrite,
                format!("delete from {} failed with code {code}: {msg}", self.target),
            ));
        }
        Ok(reply.n as u64)
    }

    /// [`Applier::bulk`] for statements that each address a different document: cut into
    /// [`lane_count`] commands sent at once, as [`LanePlan`] chooses. Error indexes refer to
    /// `statements`.
    async fn bulk_in_lanes(
        &self,
        command: &str,
        field: &str,
        statements: Vec<RawDocumentBuf>,
    ) -> Result<BulkReply, SyncError> {
        let count = statements.len();
        let choice = match &self.lanes {
            LanePlan::Fixed(lanes) => {
                return self
                    .bulk_cut(command, field, statements, lane_count(count, *lanes))
                    .await;
            }
            // Only writes that more lanes would cut are measured.
            LanePlan::Tuned(tuner) if lane_count(count, tuner.lock().max()) > 1 => {
                (tuner, tuner.lock().begin())
            }
            LanePlan::Tuned(_) => return self.bulk(command, field, statements).await,
        };
        let (tuner, choice) = choice;
        let started = Instant::now();
        let reply = self
            .bulk_cut(command, field, statements, lane_count(count, choice.lanes))
            .await?;
        let outcome = tuner.lock().record(choice, count, started.elapsed());
        if let Some(t) = outcome {
            if t.now != t.from {
                tracing::info!(namespace = %self.label, lanes = t.now, was = t.from, speed = format!("{:.2}", t.ratio), "write lanes tuned from {} to {}: {:.2}× the statements per second in the trial", t.from, t.now, t.ratio);
            } else {
                tracing::debug!(namespace = %self.label, lanes = t.now, tried = t.tried, speed = format!("{:.2}", t.ratio), "write lanes kept");
            }
        }
        Ok(reply)
    }

    /// [`Applier::bulk`] cut into `lanes` commands sent at once; error indexes refer to
    /// `statements`.
    async fn bulk_cut(
        &self,
        command: &str,
        field: &str,
        statements: Vec<RawDocumentBuf>,
        lanes: usize,
    ) -> Result<BulkReply, SyncError> {
        if lanes <= 1 {
            return self.bulk(command, field, statements).await;
        }
        let per_lane = statements.len().div_ceil(lanes);
        tracing::trace!(namespace = %self.label, statements = statements.len(), lanes, "{command} cut into lanes");
        let mut rest = statements;
        let mut parts = Vec::with_capacity(lanes);
        while !rest.is_empty() {
            let tail = rest.split_off(per_lane.min(rest.len()));
            parts.push(std::mem::replace(&mut rest, tail));
        }
        let replies =
            futures::future::join_all(parts.into_iter().map(|p| self.bulk(command, field, p)))
                .await;
        let mut out = BulkReply {
            n: 0,
            errors: Vec::new(),
        };
        for (lane, reply) in replies.into_iter().enumerate() {
            let reply = reply?;
            out.n += reply.n;
            out.errors.extend(
                reply
                    .errors
                    .into_iter()
                    .map(|(i, code, msg)| (lane * per_lane + i, code, msg)),
            );
        }
        Ok(out)
    }

    /// Runs `statements` as unordered bulk commands (split by count and size), majority
    /// journaled. Write errors are returned with statement indexes; anything else is an error.
    async fn bulk(
        &self,
        command: &str,
        field: &str,
        statements: Vec<RawDocumentBuf>,
    ) -> Result<BulkReply, SyncError> {
        self.bulk_with(command, field, statements, false).await
    }

    /// [`Applier::bulk`], ordered or not. Ordered: the first write error stops the bulk (no
    /// later command is sent) and is the only error returned.
    ///
    /// Every command is a replication write: `bypassDocumentValidation` (inserts and updates;
    /// the source already accepted the document, as mongorestore and mongosync do) and, when
    /// `destination.socket_timeout_ms` bounds it on the client, `maxTimeMS` below that bound so
    /// the server gives up first. After a client-side timeout the call waits out the server's
    /// bound before returning, so the abandoned command is dead before anything writes this
    /// namespace again (issue 9 item 6).
    async fn bulk_with(
        &self,
        command: &str,
        field: &str,
        statements: Vec<RawDocumentBuf>,
        ordered: bool,
    ) -> Result<BulkReply, SyncError> {
        let mut out = BulkReply {
            n: 0,
            errors: Vec::new(),
        };
        let mut start = 0;
        while start < statements.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < statements.len() && end - start < MAX_STATEMENTS_PER_COMMAND {
                let size = statements[end].as_bytes().len();
                if end > start && bytes + size > MAX_COMMAND_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let mut cmd = encode::bulk_command(
                cstr_key(command)?,
                self.target.coll.as_str(),
                cstr_key(field)?,
                &statements[start..end],
            );
            cmd.append(bson::cstr!("ordered"), ordered);
            if command != "delete" && self.bypass_validation() {
                cmd.append(bson::cstr!("bypassDocumentValidation"), true);
            }
            if let Some(limit) = self.op_timeout {
                cmd.append(
                    bson::cstr!("maxTimeMS"),
                    crate::bounded_write::max_time_ms(limit),
                );
            }
            cmd.append(
                bson::cstr!("writeConcern"),
                rawdoc! {"w": "majority", "j": true},
            );
            turn::wait().await?;
            let started = Instant::now();
            let reply =
                crate::bounded_write::run(self.op_timeout, self.dest_db.run_raw_command(cmd))
                    .await
                    .map_err(|abandoned| {
                        abandoned.into_error(&format!("a bulk write to {}", self.target))
                    })?
                    .map_err(|e| write_error(&format!("writing to {}", self.target), e))?;
            // Microseconds: `perf --timeline` rebuilds from these lines when the destination had
            // no command of this daemon to run.
            tracing::trace!(namespace = %self.label, statements = end - start, elapsed_us = started.elapsed().as_micros() as u64, "bulk {command}");
            if let Ok(wce) = reply.get_document("writeConcernError") {
                return Err(SyncError::new(
                    ErrorKind::DestinationConnection,
                    format!(
                        "write concern error from the destination (code {}): {}; retrying",
                        wce.get_i32("code").unwrap_or(0),
                        wce.get_str("errmsg").unwrap_or("")
                    ),
                ));
            }
            out.n += match reply.get("n") {
                Some(Bson::Int32(n)) => *n as i64,
                Some(Bson::Int64(n)) => *n,
                _ => 0,
            };
            if let Ok(errors) = reply.get_array("writeErrors") {
                for e in errors.iter().filter_map(|e| e.as_document()) {
                    let index = e.get_i32("index").unwrap_or(0) as usize;
                    out.errors.push((
                        start + index,
                        e.get_i32("code").unwrap_or(0),
                        e.get_str("errmsg").unwrap_or("").to_string(),
                    ));
                }
            }
            if ordered && !out.errors.is_empty() {
                break;
            }
            start = end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(n: i32) -> DocWrite {
        DocWrite::Upsert(rawdoc! {"_id": 1, "v": n})
    }

    fn delta(set: &[&str], unset: &[&str]) -> DocWrite {
        DocWrite::Delta {
            set: set
                .iter()
                .map(|p| (cstr_key(p).unwrap(), RawBson::Int32(1)))
                .collect(),
            unset: unset.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn total_writes_supersede_earlier_ones() {
        let mut q = Queues::default();
        q.push(RawBson::Int32(1), delta(&["a"], &[]), 0);
        q.push(RawBson::Int32(1), upsert(2), 1);
        q.push(RawBson::Int32(1), delta(&["b"], &[]), 2);
        q.push(RawBson::Int32(1), DocWrite::Delete, 3);
        assert_eq!(q.rounds(), 1);
        let queue = &q.docs[0].2;
        assert!(matches!(queue[0].write, DocWrite::Delete));
        assert_eq!(queue[0].event, 3);
    }

    #[test]
    fn non_overlapping_deltas_merge_overlapping_ones_queue() {
        let mut q = Queues::default();
        q.push(RawBson::Int32(1), delta(&["a.b"], &[]), 0);
        q.push(RawBson::Int32(1), delta(&["a.c"], &["x"]), 1);
        assert_eq!(q.rounds(), 1);
        // `txn` then `bulk` must not merge: one $set would append them as bulk, txn.
        q.push(RawBson::Int32(2), delta(&["txn"], &[]), 2);
        q.push(RawBson::Int32(2), delta(&["bulk"], &[]), 3);
        assert_eq!(q.docs[1].2.len(), 2);
        q.push(RawBson::Int32(1), delta(&["a"], &[]), 2);
        assert_eq!(q.rounds(), 2);
        q.push(
            RawBson::Int32(1),
            DocWrite::Truncate(vec![("arr".into(), 1)]),
            3,
        );
        assert_eq!(q.rounds(), 3);
    }

    #[test]
    fn merged_deltas_go_out_as_one_set_in_event_order() {
        let mut q = Queues::default();
        q.push(RawBson::Int64(7), delta(&["a"], &[]), 0);
        q.push(RawBson::Int64(7), delta(&["b"], &["z"]), 1);
        let rounds = q.into_rounds();
        assert_eq!(rounds.len(), 1);
        let s = &rounds[0][0];
        assert_eq!(s.event, 1);
        let statement = Document::try_from(delta_statement(&s.id, &s.write).unwrap()).unwrap();
        assert_eq!(
            statement,
            doc! {"q": {"_id": 7i64}, "u": {"$set": {"a": 1, "b": 1}, "$unset": {"z": ""}}}
        );
    }

    #[test]
    fn rounds_hold_each_documents_nth_write_in_order_of_first_appearance() {
        let mut q = Queues::default();
        q.push(RawBson::Int32(2), delta(&["a"], &[]), 0);
        q.push(RawBson::Int32(1), upsert(1), 1);
        q.push(RawBson::Int32(2), delta(&["a"], &[]), 2);
        q.push(RawBson::Int32(2), delta(&["a"], &[]), 3);
        let rounds = q.into_rounds();
        let events: Vec<Vec<usize>> = rounds
            .iter()
            .map(|r| r.iter().map(|s| s.event).collect())
            .collect();
        assert_eq!(events, vec![vec![0, 1], vec![2], vec![3]]);
        assert!(rounds[1..]
            .iter()
            .flatten()
            .all(|s| s.key == id_key(&RawBson::Int32(2)) && s.id == RawBson::Int32(2)));
    }

    #[test]
    fn numeric_ids_of_different_types_share_a_queue() {
        let mut q = Queues::default();
        q.push(RawBson::Int32(1), upsert(1), 0);
        q.push(RawBson::Int64(1), DocWrite::Delete, 1);
        q.push(RawBson::Double(1.0), upsert(3), 2);
        q.push(RawBson::String("1".into()), upsert(3), 3);
        assert_eq!(q.docs.len(), 2);
    }

    #[test]
    fn update_paths_sort_like_the_server() {
        assert!(update_path_order("a", "b").is_lt());
        assert!(update_path_order("a.9", "a.10").is_lt());
        assert!(update_path_order("a", "a.b").is_lt());
        assert!(update_path_order("b", "a.z").is_gt());
    }

    #[test]
    fn overlap_is_by_path_component() {
        assert!(paths_overlap("a", "a.b"));
        assert!(paths_overlap("a.b", "a"));
        assert!(paths_overlap("a.b", "a.b"));
        assert!(!paths_overlap("a.b", "a.bc"));
        assert!(!paths_overlap("ab", "a"));
    }

    #[test]
    fn delta_writes_refuse_malformed_descriptions_and_refetch_ambiguous_removals() {
        assert!(delta_writes(&rawdoc! {"removedFields": []}, true).is_err());
        assert!(delta_writes(&rawdoc! {"updatedFields": {}}, true).is_err());
        let bad = rawdoc! {"updatedFields": {}, "removedFields": [1]};
        assert!(delta_writes(&bad, true).is_err());
        // An empty disambiguatedPaths (6.1+, nothing ambiguous) keeps the delta.
        let plain =
            rawdoc! {"updatedFields": {"a": 1}, "removedFields": [], "disambiguatedPaths": {}};
        assert!(matches!(
            delta_writes(&plain, true).unwrap()[0],
            DocWrite::Delta { .. }
        ));
        // A `$`-prefixed component in a removed path alone forces a refetch.
        let dollar = rawdoc! {"updatedFields": {"a": 1}, "removedFields": ["b.$c"]};
        assert!(matches!(
            delta_writes(&dollar, true).unwrap()[0],
            DocWrite::Refetch
        ));
    }

    #[test]
    fn truncations_and_deltas_become_their_update_statements() {
        let id = RawBson::Int64(7);
        let truncate = DocWrite::Truncate(vec![("arr".to_string(), 2), ("n.list".to_string(), 0)]);
        assert_eq!(
            delta_statement(&id, &truncate).unwrap(),
            rawdoc! {"q": {"_id": 7_i64}, "u": {"$push": {
            "arr": {"$each": [], "$slice": 2}, "n.list": {"$each": [], "$slice": 0}}}}
        );
        let ud = rawdoc! {"updatedFields": {"a": 1, "b.c": "x"}, "removedFields": ["d"]};
        let delta = delta_writes(&ud, true).unwrap().pop().unwrap();
        assert_eq!(
            delta_statement(&id, &delta).unwrap(),
            rawdoc! {"q": {"_id": 7_i64}, "u": {"$set": {"a": 1, "b.c": "x"}, "$unset": {"d": ""}}}
        );
        let nul = DocWrite::Delta {
            set: RawDocumentBuf::new(),
            unset: vec!["a\0b".to_string()],
        };
        assert!(delta_statement(&id, &nul).is_err());
    }

    #[test]
    fn delta_writes_split_truncation_first() {
        let ud = rawdoc! {"updatedFields": {"a": 1}, "removedFields": ["b"], "truncatedArrays": [{"field": "arr", "newSize": 2}]};
        let w = delta_writes(&ud, true).unwrap();
        assert!(matches!(&w[0], DocWrite::Truncate(t) if t == &vec![("arr".to_string(), 2)]));
        assert!(
            matches!(&w[1], DocWrite::Delta { set, unset } if set.iter().count() == 1 && unset == &vec!["b".to_string()])
        );
        let ud = rawdoc! {"updatedFields": {"a.b": 1}, "removedFields": [], "disambiguatedPaths": {"a.b": ["a.b"]}};
        assert!(matches!(
            delta_writes(&ud, true).unwrap()[0],
            DocWrite::Refetch
        ));
        // 6.0: no disambiguatedPaths ever, so a dotted path may be a literal field name.
        let ud = rawdoc! {"updatedFields": {"a.b": 1}, "removedFields": []};
        assert!(matches!(
            delta_writes(&ud, false).unwrap()[0],
            DocWrite::Refetch
        ));
        assert!(matches!(
            delta_writes(&ud, true).unwrap()[0],
            DocWrite::Delta { .. }
        ));
        let ud = rawdoc! {"updatedFields": {"$price": 1}, "removedFields": []};
        assert!(matches!(
            delta_writes(&ud, true).unwrap()[0],
            DocWrite::Refetch
        ));
    }
}

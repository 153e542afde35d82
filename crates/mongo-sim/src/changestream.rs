//! Change streams: `$changeStream` options, resume tokens, event documents, oplog tailing.
//!
//! Tokens are `{_data: hex}` whose first 18 hex digits are a KeyString-style timestamp
//! (`82` + big-endian `(t << 32) | i`), as real servers emit, so tools can read the cluster
//! time from them. The rest identifies the oplog position; lexicographic order = stream order.

use std::collections::VecDeque;

use bson::{doc, Bson, Document, Timestamp};

use crate::{
    engine::Data,
    error::{codes, CommandError, CommandResult},
    oplog::{OplogEntry, OplogOp},
    query::{
        aggregate::{run_pipeline, PipelineContext},
        path::PathPart,
        update::{dotted, UpdateDescription},
    },
    store::{bson_size, Namespace, MAX_BSON_OBJECT_SIZE},
};

pub const NON_RESUMABLE_LABEL: &str = "NonResumableChangeStreamError";

/// Stages allowed after `$changeStream` (MongoDB manual, "Modify Change Stream Output").
const ALLOWED_STAGES: &[&str] = &[
    "$match",
    "$project",
    "$addFields",
    "$set",
    "$unset",
    "$replaceRoot",
    "$replaceWith",
    "$redact",
    "$changeStreamSplitLargeEvent",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    Collection(Namespace),
    Database(String),
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FullDocument {
    Default,
    UpdateLookup,
    WhenAvailable,
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BeforeChange {
    Off,
    WhenAvailable,
    Required,
}

/// The token kinds, in the order they sort at one oplog position: a high-water mark at
/// position p means "scanned through p", so it sorts after the event (and invalidate) of p and
/// a postBatchResumeToken never moves backwards when an empty batch follows an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Event = 0x80,
    Invalidate = 0x81,
    HighWaterMark = 0xF0,
}

/// A decoded resume token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Token {
    pub ts: Timestamp,
    epoch: u32,
    /// Oplog position: the event's entry, or (high-water mark) the last entry scanned.
    pub seq: u64,
    kind: TokenKind,
    /// For split events: index of the fragment (1-based); 0 otherwise.
    fragment: u16,
}

impl Token {
    pub fn encode(&self) -> Document {
        doc! {"_data": self.data()}
    }

    /// The token's `_data` string.
    fn data(&self) -> String {
        let t = ((self.ts.time as u64) << 32) | self.ts.increment as u64;
        format!(
            "82{t:016X}{:08X}{:016X}{:02X}{:04X}",
            self.epoch, self.seq, self.kind as u8, self.fragment
        )
    }

    pub fn decode(token: &Bson) -> CommandResult<Token> {
        let invalid = || {
            CommandError::new(
                codes::INVALID_RESUME_TOKEN,
                "Invalid resume token: not a token of this deployment",
            )
        };
        let data = token
            .as_document()
            .and_then(|d| d.get_str("_data").ok())
            .ok_or_else(|| {
                CommandError::new(
                    codes::FAILED_TO_PARSE,
                    "resume token must be a document with a '_data' string",
                )
            })?;
        if data.len() != 48 || !data.starts_with("82") || !data.is_ascii() {
            return Err(invalid());
        }
        let hex = |range: std::ops::Range<usize>| {
            u64::from_str_radix(&data[range], 16).map_err(|_| invalid())
        };
        let t = hex(2..18)?;
        let kind = match hex(42..44)? {
            // 0x01: high-water marks written before they sorted after events (data dirs).
            0x01 | 0xF0 => TokenKind::HighWaterMark,
            0x80 => TokenKind::Event,
            0x81 => TokenKind::Invalidate,
            _ => return Err(invalid()),
        };
        Ok(Token {
            ts: Timestamp {
                time: (t >> 32) as u32,
                increment: t as u32,
            },
            epoch: hex(18..26)? as u32,
            seq: hex(26..42)?,
            kind,
            fragment: hex(44..48)? as u16,
        })
    }
}

/// The oplog epoch: tokens of another simulator instance are not ours.
pub fn epoch_of(replica_set_id: &bson::oid::ObjectId) -> u32 {
    let b = replica_set_id.bytes();
    u32::from_be_bytes([b[8], b[9], b[10], b[11]])
}

/// Parsed `$changeStream` stage and the stages that follow it.
#[derive(Debug, Clone)]
pub struct ChangeStreamSpec {
    pub scope: Scope,
    pub full_document: FullDocument,
    pub before_change: BeforeChange,
    pub show_expanded_events: bool,
    pub post_stages: Vec<Document>,
    pub split_large_events: bool,
}

/// Where a new stream starts.
#[derive(Debug, Clone)]
pub enum StartAt {
    Now,
    ResumeAfter(Bson),
    StartAfter(Bson),
    OperationTime(Timestamp),
}

pub fn parse(scope: Scope, pipeline: &[Bson]) -> CommandResult<(ChangeStreamSpec, StartAt)> {
    let first = pipeline
        .first()
        .and_then(|s| s.as_document())
        .and_then(|s| s.get_document("$changeStream").ok())
        .ok_or_else(|| CommandError::bad_value("$changeStream must be the first stage"))?;
    crate::commands::fields::check_change_stream_spec(first)?;
    let full_document = match first.get_str("fullDocument").unwrap_or("default") {
        "default" => FullDocument::Default,
        "updateLookup" => FullDocument::UpdateLookup,
        "whenAvailable" => FullDocument::WhenAvailable,
        "required" => FullDocument::Required,
        other => {
            return Err(CommandError::bad_value(format!(
                "unrecognized value for fullDocument: {other}"
            )))
        }
    };
    let before_change = match first.get_str("fullDocumentBeforeChange").unwrap_or("off") {
        "off" => BeforeChange::Off,
        "whenAvailable" => BeforeChange::WhenAvailable,
        "required" => BeforeChange::Required,
        other => {
            return Err(CommandError::bad_value(format!(
                "unrecognized value for fullDocumentBeforeChange: {other}"
            )))
        }
    };
    let starts: Vec<&str> = ["resumeAfter", "startAfter", "startAtOperationTime"]
        .into_iter()
        .filter(|k| first.contains_key(*k))
        .collect();
    if starts.len() > 1 {
        return Err(CommandError::new(
            40674,
            "Only one type of resume option is allowed, but multiple were found.",
        ));
    }
    let start = if let Some(t) = first.get("resumeAfter") {
        StartAt::ResumeAfter(t.clone())
    } else if let Some(t) = first.get("startAfter") {
        StartAt::StartAfter(t.clone())
    } else if let Some(t) = first.get("startAtOperationTime") {
        match t {
            Bson::Timestamp(ts) => StartAt::OperationTime(*ts),
            _ => {
                return Err(CommandError::type_mismatch(
                    "startAtOperationTime must be a timestamp",
                ))
            }
        }
    } else {
        StartAt::Now
    };
    let mut post_stages = Vec::new();
    let mut split_large_events = false;
    for (i, stage) in pipeline.iter().enumerate().skip(1) {
        let stage = stage
            .as_document()
            .ok_or_else(|| CommandError::type_mismatch("each pipeline stage must be an object"))?;
        let name = stage.keys().next().map(String::as_str).unwrap_or("");
        if !ALLOWED_STAGES.contains(&name) {
            return Err(CommandError::new(
                codes::CHANGE_STREAM_NOT_SUPPORTED_STAGE,
                format!("{name} is not permitted in a $changeStream pipeline"),
            ));
        }
        if name == "$changeStreamSplitLargeEvent" {
            if i != pipeline.len() - 1 {
                return Err(CommandError::new(
                    7182802,
                    "$changeStreamSplitLargeEvent must be the last stage in the pipeline",
                ));
            }
            split_large_events = true;
        } else {
            post_stages.push(stage.clone());
        }
    }
    Ok((
        ChangeStreamSpec {
            scope,
            full_document,
            before_change,
            show_expanded_events: first.get_bool("showExpandedEvents").unwrap_or(false),
            post_stages,
            split_large_events,
        },
        start,
    ))
}

/// A change-stream cursor: where it is in the oplog and what it still has to deliver.
#[derive(Debug)]
pub struct ChangeStreamCursor {
    pub spec: ChangeStreamSpec,
    /// Last oplog sequence number fully consumed.
    pub position: u64,
    epoch: u32,
    /// Events (or fragments) produced but not yet returned, encoded, with their oplog
    /// position.
    pending: VecDeque<(Vec<u8>, u64)>,
    /// Set once the stream has produced `invalidate` (nothing is scanned past it). The cursor
    /// closes only once that event has been returned too: see [`ChangeStreamCursor::finished`].
    pub invalidated: bool,
    /// Cluster time of the last scanned position (for the high-water-mark token).
    scanned_ts: Timestamp,
}

impl ChangeStreamCursor {
    /// Positions a new stream, failing like a real server when the start point is gone.
    pub fn open(
        spec: ChangeStreamSpec,
        start: StartAt,
        data: &Data,
        epoch: u32,
    ) -> CommandResult<Self> {
        let history_lost = || {
            CommandError::new(
                codes::CHANGE_STREAM_HISTORY_LOST,
                "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
            )
            .with_label(NON_RESUMABLE_LABEL)
        };
        let oplog = &data.oplog;
        let mut skip_fragments = 0u16;
        let position = match &start {
            StartAt::Now => oplog.last_seq(),
            StartAt::OperationTime(ts) => {
                if let Some(dropped) = oplog.dropped_through_ts() {
                    if crate::oplog::ts_cmp(dropped, *ts).is_ge() {
                        return Err(history_lost());
                    }
                }
                oplog.seq_before_ts(*ts)
            }
            StartAt::ResumeAfter(token) | StartAt::StartAfter(token) => {
                let t = Token::decode(token)?;
                if t.epoch != epoch {
                    return Err(history_lost());
                }
                if t.kind == TokenKind::Invalidate && matches!(start, StartAt::ResumeAfter(_)) {
                    return Err(CommandError::new(
                        codes::INVALID_RESUME_TOKEN,
                        "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification.",
                    ));
                }
                match t.kind {
                    TokenKind::HighWaterMark => {
                        if t.seq < oplog.dropped_through_seq() {
                            return Err(history_lost());
                        }
                        t.seq
                    }
                    TokenKind::Event | TokenKind::Invalidate => {
                        if t.seq <= oplog.dropped_through_seq() {
                            return Err(history_lost());
                        }
                        if t.seq > oplog.last_seq() {
                            return Err(CommandError::new(
                                codes::CHANGE_STREAM_FATAL_ERROR,
                                "cannot resume stream; the resume token was not found.",
                            )
                            .with_label(NON_RESUMABLE_LABEL));
                        }
                        if t.fragment > 0 {
                            skip_fragments = t.fragment;
                            t.seq - 1
                        } else {
                            t.seq
                        }
                    }
                }
            }
        };
        let scanned_ts = oplog
            .get(position)
            .map(|e| e.ts)
            .unwrap_or_else(|| data.clock.current());
        let mut cursor = ChangeStreamCursor {
            spec,
            position,
            epoch,
            pending: VecDeque::new(),
            invalidated: false,
            scanned_ts,
        };
        if skip_fragments > 0 {
            // Resuming inside a split event: re-produce it and drop the fragments already seen.
            if let Some(entry) = oplog.get(position + 1) {
                let events = cursor.events_for(entry, data)?;
                cursor.position = entry.seq;
                cursor.scanned_ts = entry.ts;
                for (i, e) in events.into_iter().enumerate() {
                    if i >= skip_fragments as usize {
                        cursor.pending.push_back((e, entry.seq));
                    }
                }
            }
        }
        Ok(cursor)
    }

    /// True once the `invalidate` has been returned: the reply that carries it closes the
    /// cursor (`id: 0`). A batch that fills just before it leaves the cursor open, so the
    /// next `getMore` delivers it, as on a real server.
    pub fn finished(&self) -> bool {
        self.invalidated && self.pending.is_empty()
    }

    /// The high-water-mark token for the current position.
    fn high_water_mark(&self) -> Document {
        Token {
            ts: self.scanned_ts,
            epoch: self.epoch,
            seq: self.position,
            kind: TokenKind::HighWaterMark,
            fragment: 0,
        }
        .encode()
    }

    /// Scans the oplog for up to `max_events` events. Returns the batch and its
    /// `postBatchResumeToken`.
    pub fn poll(
        &mut self,
        data: &Data,
        max_events: usize,
    ) -> CommandResult<(EventBatch, Document)> {
        if self.position < data.oplog.dropped_through_seq() {
            return Err(CommandError::new(
                codes::CHANGE_STREAM_HISTORY_LOST,
                "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
            )
            .with_label(NON_RESUMABLE_LABEL));
        }
        let mut out = EventBatch::default();
        loop {
            while let Some((event, _)) = self.pending.front() {
                if out.len() >= max_events
                    || (!out.is_empty()
                        && out.event_bytes + event.len() > crate::cursor::MAX_BATCH_BYTES)
                {
                    let pbrt = out.last_token().unwrap_or_else(|| self.high_water_mark());
                    return Ok((out, pbrt));
                }
                let (event, _) = self.pending.pop_front().expect("front exists");
                out.push(&event);
            }
            if self.invalidated || out.len() >= max_events {
                break;
            }
            let Some(entry) = data.oplog.get(self.position + 1) else {
                break;
            };
            let events = match self.events_for(entry, data) {
                Ok(events) => events,
                // Like a real server, return what the batch already holds; the failing entry
                // is met again (and fails) on the next getMore.
                Err(_) if !out.is_empty() => break,
                Err(e) => return Err(e),
            };
            self.position = entry.seq;
            self.scanned_ts = entry.ts;
            for e in events {
                self.pending.push_back((e, entry.seq));
            }
        }
        // The batch ended because the oplog is exhausted: the token is the last event's if
        // there was one and nothing was scanned past it, else the high-water mark.
        let pbrt = match out.last_token() {
            Some(t) if self.pending.is_empty() && self.last_event_was_at_position(&t) => t,
            _ => self.high_water_mark(),
        };
        Ok((out, pbrt))
    }

    fn last_event_was_at_position(&self, token: &Document) -> bool {
        Token::decode(&Bson::Document(token.clone())).is_ok_and(|t| t.seq == self.position)
    }

    fn in_scope(&self, ns: &Namespace) -> bool {
        if ns.is_system() {
            return false;
        }
        match &self.spec.scope {
            Scope::Collection(w) => w == ns,
            Scope::Database(db) => *db == ns.db,
            Scope::Cluster => !matches!(ns.db.as_str(), "admin" | "config" | "local"),
        }
    }

    /// The events (after the user's stages, encoded) one oplog entry produces for this stream.
    fn events_for(&mut self, entry: &OplogEntry, data: &Data) -> CommandResult<Vec<Vec<u8>>> {
        let mut raw = Vec::new();
        // Events already encoded (see `plain_update_event`); an entry makes either these or
        // documents in `raw`, never both.
        let mut out: Vec<Vec<u8>> = Vec::new();
        let expanded = self.spec.show_expanded_events;
        match &entry.op {
            OplogOp::Noop => {}
            OplogOp::DropDatabase { db } => match &self.spec.scope {
                Scope::Database(w) if w == db => {
                    raw.push(self.base_event(entry, "dropDatabase", doc! {"db": db.clone()}, None));
                    raw.push(self.invalidate_event(entry));
                }
                Scope::Cluster if !matches!(db.as_str(), "admin" | "config" | "local") => {
                    raw.push(self.base_event(entry, "dropDatabase", doc! {"db": db.clone()}, None));
                }
                _ => {}
            },
            op if op.ns().is_some_and(crate::views::is_views_collection) => {
                if let Some(e) = self.view_event(entry, op) {
                    raw.push(e);
                }
            }
            op => {
                let ns = op.ns().expect("non-database ops have a namespace");
                if !self.in_scope(ns) {
                    return Ok(Vec::new());
                }
                let ns_doc = doc! {"db": ns.db.clone(), "coll": ns.coll.clone()};
                match op {
                    OplogOp::Insert { uuid, doc, .. } => {
                        let mut e = self.base_event_with_document(
                            entry,
                            "insert",
                            ns_doc,
                            expanded.then_some(*uuid),
                            Some(Bson::Document(doc.document().into_owned())),
                        );
                        e.insert("documentKey", doc! {"_id": doc.id().unwrap_or(Bson::Null)});
                        raw.push(e);
                    }
                    OplogOp::Update {
                        uuid,
                        post,
                        description,
                        ..
                    } if self.is_plain_update(entry) => {
                        let uuid = expanded.then_some(*uuid);
                        match self.plain_update_event(entry, ns, uuid, post, description) {
                            Some(bytes) => out.push(bytes),
                            // Too large for one event: the document path splits it.
                            None => {
                                raw.push(self.update_event(entry, ns_doc, uuid, post, description))
                            }
                        }
                    }
                    OplogOp::Update {
                        uuid,
                        pre,
                        post,
                        description,
                        ..
                    } => {
                        let mut e = self.update_event(
                            entry,
                            ns_doc,
                            expanded.then_some(*uuid),
                            post,
                            description,
                        );
                        self.add_full_document(&mut e, entry, ns, post, data)?;
                        self.add_before_change(&mut e, entry, pre)?;
                        raw.push(e);
                    }
                    OplogOp::Replace {
                        uuid, pre, post, ..
                    } => {
                        let mut e = self.base_event_with_document(
                            entry,
                            "replace",
                            ns_doc,
                            expanded.then_some(*uuid),
                            Some(Bson::Document(post.document().into_owned())),
                        );
                        e.insert("documentKey", doc! {"_id": post.id().unwrap_or(Bson::Null)});
                        self.add_before_change(&mut e, entry, pre)?;
                        raw.push(e);
                    }
                    OplogOp::Delete { uuid, pre, .. } => {
                        let mut e =
                            self.base_event(entry, "delete", ns_doc, expanded.then_some(*uuid));
                        e.insert("documentKey", doc! {"_id": pre.id().unwrap_or(Bson::Null)});
                        self.add_before_change(&mut e, entry, pre)?;
                        raw.push(e);
                    }
                    OplogOp::Drop { uuid, .. } => {
                        raw.push(self.base_event(entry, "drop", ns_doc, expanded.then_some(*uuid)));
                        if matches!(self.spec.scope, Scope::Collection(_)) {
                            raw.push(self.invalidate_event(entry));
                        }
                    }
                    OplogOp::Rename {
                        to,
                        uuid,
                        drop_target,
                        ..
                    } => {
                        let mut e =
                            self.base_event(entry, "rename", ns_doc, expanded.then_some(*uuid));
                        let to_doc = doc! {"db": to.db.clone(), "coll": to.coll.clone()};
                        e.insert("to", to_doc.clone());
                        if expanded {
                            let mut desc = doc! {"to": to_doc};
                            if let Some(t) = drop_target {
                                desc.insert("dropTarget", bson::Binary::from_uuid(*t));
                            }
                            e.insert("operationDescription", desc);
                        }
                        raw.push(e);
                        if matches!(self.spec.scope, Scope::Collection(_)) {
                            raw.push(self.invalidate_event(entry));
                        }
                    }
                    OplogOp::Create { uuid, options, .. } if expanded => {
                        let mut e = self.base_event(entry, "create", ns_doc, Some(*uuid));
                        let mut desc =
                            doc! {"idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}};
                        for (k, v) in options.iter() {
                            desc.insert(k.clone(), v.clone());
                        }
                        e.insert("operationDescription", desc);
                        e.insert("nsType", "collection");
                        raw.push(e);
                    }
                    OplogOp::CreateIndexes { uuid, indexes, .. } if expanded => {
                        let mut e = self.base_event(entry, "createIndexes", ns_doc, Some(*uuid));
                        e.insert("operationDescription", doc! {"indexes": indexes.clone()});
                        raw.push(e);
                    }
                    OplogOp::DropIndexes { uuid, indexes, .. } if expanded => {
                        let mut e = self.base_event(entry, "dropIndexes", ns_doc, Some(*uuid));
                        e.insert("operationDescription", doc! {"indexes": indexes.clone()});
                        raw.push(e);
                    }
                    OplogOp::Modify {
                        uuid,
                        changed,
                        previous,
                        ..
                    } if expanded => {
                        let mut e = self.base_event(entry, "modify", ns_doc, Some(*uuid));
                        e.insert("operationDescription", (**changed).clone());
                        e.insert(
                            "stateBeforeChange",
                            doc! {"collectionOptions": (**previous).clone()},
                        );
                        raw.push(e);
                    }
                    _ => {}
                }
            }
        }
        if let Some(txn) = &entry.txn {
            for e in raw.iter_mut() {
                if e.get_str("operationType").ok() != Some("invalidate") {
                    e.insert("txnNumber", txn.txn_number);
                    e.insert("lsid", txn.lsid.clone());
                }
            }
        }
        for e in raw {
            let is_invalidate = e.get_str("operationType").ok() == Some("invalidate");
            if self.spec.post_stages.is_empty() || is_invalidate {
                out.extend(self.maybe_split(e, entry)?);
                if is_invalidate {
                    self.invalidated = true;
                }
                continue;
            }
            let id = e.get("_id").cloned();
            let transformed = run_pipeline(
                vec![e],
                &self.spec.post_stages,
                &PipelineContext {
                    now: entry.wall,
                    cluster_time: Some(entry.ts),
                    lets: Default::default(),
                },
            )?;
            for t in transformed {
                if t.get("_id") != id.as_ref() {
                    return Err(CommandError::new(
                        codes::CHANGE_STREAM_FATAL_ERROR,
                        "Encountered an event whose _id field, which contains the resume token, was modified by the pipeline. Modifying the _id field of an event makes it impossible to resume the stream from that point. Only transformations that retain the unmodified _id field are allowed.",
                    )
                    .with_label(NON_RESUMABLE_LABEL));
                }
                out.extend(self.maybe_split(t, entry)?);
            }
        }
        Ok(out)
    }

    /// A write to `<db>.system.views` as the view event it is under `showExpandedEvents`:
    /// insert → `create`, replacement → `modify`, delete → `drop`, each naming the view (the
    /// document's `_id`) and without `collectionUUID` (a view has none). Only database and
    /// deployment streams see them: a collection stream never opens on a view.
    fn view_event(&self, entry: &OplogEntry, op: &OplogOp) -> Option<Document> {
        if !self.spec.show_expanded_events || matches!(self.spec.scope, Scope::Collection(_)) {
            return None;
        }
        let (op_type, stored) = match op {
            OplogOp::Insert { doc, .. } => ("create", doc),
            OplogOp::Replace { post, .. } | OplogOp::Update { post, .. } => ("modify", post),
            OplogOp::Delete { pre, .. } => ("drop", pre),
            _ => return None,
        };
        let stored = stored.document();
        let view = Namespace::parse(stored.get_str("_id").ok()?).ok()?;
        if !self.in_scope(&view) {
            return None;
        }
        let ns_doc = doc! {"db": view.db.clone(), "coll": view.coll.clone()};
        let mut e = self.base_event(entry, op_type, ns_doc, None);
        if op_type != "drop" {
            let def = crate::views::ViewDef::from_stored(&stored)?;
            e.insert("operationDescription", def.options());
        }
        if op_type == "create" {
            // As the collection `create` events of the simulator carry it.
            e.insert("nsType", "view");
        }
        Some(e)
    }

    fn token(&self, entry: &OplogEntry, kind: TokenKind, fragment: u16) -> Document {
        Token {
            ts: entry.ts,
            epoch: self.epoch,
            seq: entry.seq,
            kind,
            fragment,
        }
        .encode()
    }

    fn base_event(
        &self,
        entry: &OplogEntry,
        op_type: &str,
        ns: Document,
        uuid: Option<bson::Uuid>,
    ) -> Document {
        self.base_event_with_document(entry, op_type, ns, uuid, None)
    }

    /// The common event fields in server order, with `fullDocument` (when given) before `ns`.
    fn base_event_with_document(
        &self,
        entry: &OplogEntry,
        op_type: &str,
        ns: Document,
        uuid: Option<bson::Uuid>,
        full_document: Option<Bson>,
    ) -> Document {
        let mut e = doc! {
            "_id": self.token(entry, TokenKind::Event, 0),
            "operationType": op_type,
            "clusterTime": entry.ts,
        };
        if let Some(u) = uuid {
            e.insert("collectionUUID", bson::Binary::from_uuid(u));
        }
        e.insert("wallTime", entry.wall);
        if let Some(d) = full_document {
            e.insert("fullDocument", d);
        }
        e.insert("ns", ns);
        e
    }

    /// An update event: the common fields, `documentKey` and `updateDescription` (images are
    /// the caller's to add).
    fn update_event(
        &self,
        entry: &OplogEntry,
        ns_doc: Document,
        uuid: Option<bson::Uuid>,
        post: &crate::oplog::Version,
        description: &UpdateDescription,
    ) -> Document {
        let mut e = self.base_event(entry, "update", ns_doc, uuid);
        e.insert("documentKey", doc! {"_id": post.id().unwrap_or(Bson::Null)});
        e.insert(
            "updateDescription",
            update_description(description, self.spec.show_expanded_events),
        );
        e
    }

    /// Whether an update event of `entry` is exactly [`Self::update_event`]: no image, no
    /// transaction fields, no user stage.
    fn is_plain_update(&self, entry: &OplogEntry) -> bool {
        matches!(self.spec.full_document, FullDocument::Default)
            && matches!(self.spec.before_change, BeforeChange::Off)
            && entry.txn.is_none()
            && self.spec.post_stages.is_empty()
    }

    /// The bytes of [`Self::update_event`], written without building it as a document (a
    /// document per event and per sub-document was most of the simulator's cost of serving
    /// a backlog of updates); `None` when it would not fit one event (the document path then
    /// splits it).
    fn plain_update_event(
        &self,
        entry: &OplogEntry,
        ns: &Namespace,
        uuid: Option<bson::Uuid>,
        post: &crate::oplog::Version,
        description: &UpdateDescription,
    ) -> Option<Vec<u8>> {
        use crate::store::{encode_element, encode_fields, encode_str_element, encode_subdocument};
        let token = Token {
            ts: entry.ts,
            epoch: self.epoch,
            seq: entry.seq,
            kind: TokenKind::Event,
            fragment: 0,
        };
        let mut out = Vec::with_capacity(320);
        encode_fields(&mut out, |o| {
            encode_subdocument("_id", o, |o| encode_str_element("_data", &token.data(), o))?;
            encode_str_element("operationType", "update", o)?;
            encode_element("clusterTime", &Bson::Timestamp(entry.ts), o)?;
            if let Some(u) = uuid {
                encode_element("collectionUUID", &bson::Binary::from_uuid(u).into(), o)?;
            }
            encode_element("wallTime", &Bson::DateTime(entry.wall), o)?;
            encode_subdocument("ns", o, |o| {
                encode_str_element("db", &ns.db, o)?;
                encode_str_element("coll", &ns.coll, o)
            })?;
            encode_subdocument("documentKey", o, |o| {
                encode_element("_id", &post.id().unwrap_or(Bson::Null), o)
            })?;
            encode_element(
                "updateDescription",
                &Bson::Document(update_description(
                    description,
                    self.spec.show_expanded_events,
                )),
                o,
            )
        })?;
        (out.len() <= MAX_BSON_OBJECT_SIZE).then_some(out)
    }

    fn invalidate_event(&self, entry: &OplogEntry) -> Document {
        doc! {
            "_id": self.token(entry, TokenKind::Invalidate, 0),
            "operationType": "invalidate",
            "clusterTime": entry.ts,
            "wallTime": entry.wall,
        }
    }

    fn add_full_document(
        &self,
        e: &mut Document,
        entry: &OplogEntry,
        ns: &Namespace,
        post: &crate::oplog::Version,
        data: &Data,
    ) -> CommandResult<()> {
        let value = match self.spec.full_document {
            FullDocument::Default => return Ok(()),
            FullDocument::UpdateLookup => data
                .catalog
                .get(ns)
                .and_then(|c| c.get(&post.id().unwrap_or(Bson::Null)))
                .map(|d| Bson::Document((**d).clone()))
                .unwrap_or(Bson::Null),
            FullDocument::WhenAvailable => {
                if entry.images {
                    Bson::Document(post.document().into_owned())
                } else {
                    Bson::Null
                }
            }
            FullDocument::Required => {
                if entry.images {
                    Bson::Document(post.document().into_owned())
                } else {
                    return Err(CommandError::new(
                        codes::NO_MATCHING_DOCUMENT,
                        format!(
                            "Change stream was configured to require a post-image for all update, delete and replace events, but the post-image was not found for event: {}",
                            e.get_document("_id").map(|d| d.to_string()).unwrap_or_default()
                        ),
                    ));
                }
            }
        };
        insert_before(e, "ns", "fullDocument", value);
        Ok(())
    }

    fn add_before_change(
        &self,
        e: &mut Document,
        entry: &OplogEntry,
        pre: &crate::oplog::Version,
    ) -> CommandResult<()> {
        match self.spec.before_change {
            BeforeChange::Off => {}
            BeforeChange::WhenAvailable => {
                e.insert(
                    "fullDocumentBeforeChange",
                    if entry.images {
                        Bson::Document(pre.document().into_owned())
                    } else {
                        Bson::Null
                    },
                );
            }
            BeforeChange::Required => {
                if !entry.images {
                    return Err(CommandError::new(
                        codes::NO_MATCHING_DOCUMENT,
                        format!(
                            "Change stream was configured to require a pre-image for all update, delete and replace events, but the pre-image was not found for event: {}",
                            e.get_document("_id").map(|d| d.to_string()).unwrap_or_default()
                        ),
                    ));
                }
                e.insert(
                    "fullDocumentBeforeChange",
                    Bson::Document(pre.document().into_owned()),
                );
            }
        }
        Ok(())
    }

    /// Events over 16 MiB are split into fragments when the stream asked for it (each
    /// fragment carries `splitEvent: {fragment, of}` and its own token); otherwise they fail
    /// like on a real server. Returns the event, or its fragments, encoded.
    fn maybe_split(&self, event: Document, entry: &OplogEntry) -> CommandResult<Vec<Vec<u8>>> {
        let size = bson_size(&event);
        if size <= MAX_BSON_OBJECT_SIZE {
            return Ok(vec![encoded(&event)?]);
        }
        if !self.spec.split_large_events {
            return Err(CommandError::new(
                codes::BSON_OBJECT_TOO_LARGE,
                format!(
                    "BSONObj size: {size} is invalid. Size must be between 0 and 16793600(16MB)"
                ),
            ));
        }
        // Greedily pack top-level fields (other than `_id`) into fragments of at most 16 MiB,
        // counting each fragment's own `_id` and `splitEvent` exactly, as the server does.
        let framing = bson_size(&doc! {
            "_id": self.token(entry, TokenKind::Event, u16::MAX),
            "splitEvent": {"fragment": i32::MAX, "of": i32::MAX},
        });
        let budget = MAX_BSON_OBJECT_SIZE - framing;
        let mut groups: Vec<Document> = vec![Document::new()];
        let mut group_bytes = 0usize;
        for (k, v) in event.iter().filter(|(k, _)| *k != "_id") {
            let mut single = Document::new();
            single.insert(k.clone(), v.clone());
            // The element alone: a one-field document minus its length prefix and terminator.
            let field_size = bson_size(&single) - 5;
            if field_size > budget {
                return Err(CommandError::new(
                    codes::BSON_OBJECT_TOO_LARGE,
                    format!("field {k} of a change event is too large to split"),
                ));
            }
            if group_bytes + field_size > budget && !groups.last().expect("non-empty").is_empty() {
                groups.push(Document::new());
                group_bytes = 0;
            }
            group_bytes += field_size;
            groups
                .last_mut()
                .expect("non-empty")
                .insert(k.clone(), v.clone());
        }
        let of = groups.len() as i32;
        groups
            .into_iter()
            .enumerate()
            .map(|(i, fields)| {
                let mut f = doc! {"_id": self.token(entry, TokenKind::Event, (i + 1) as u16)};
                f.extend(fields);
                f.insert("splitEvent", doc! {"fragment": (i + 1) as i32, "of": of});
                encoded(&f)
            })
            .collect()
    }
}

/// The BSON bytes of a change event.
fn encoded(event: &Document) -> CommandResult<Vec<u8>> {
    crate::store::document_bytes(event).ok_or_else(|| {
        CommandError::new(
            codes::CHANGE_STREAM_FATAL_ERROR,
            "a change event could not be encoded as BSON",
        )
    })
}

/// A batch of change events as the reply's `nextBatch` / `firstBatch` array, each event
/// encoded once, when the stream produced it. Building the reply as documents sized the
/// batch, then the reply, then encoded it: more of the source's CPU, per event, than making
/// the event.
#[derive(Default)]
pub struct EventBatch {
    /// The array's elements so far (after a 4-byte length placeholder).
    elements: Vec<u8>,
    key: crate::store::ArrayKey,
    len: usize,
    /// The events' own sizes, summed: what a batch's 16 MiB bound counts.
    event_bytes: usize,
    /// Where the last event's bytes start in `elements`.
    last_event_at: Option<usize>,
}

impl EventBatch {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, event: &[u8]) {
        if self.elements.is_empty() {
            self.elements.extend_from_slice(&[0; 4]);
        }
        self.elements
            .push(bson::spec::ElementType::EmbeddedDocument as u8);
        self.elements
            .extend_from_slice(self.key.as_str().as_bytes());
        self.elements.push(0);
        self.last_event_at = Some(self.elements.len());
        self.elements.extend_from_slice(event);
        self.key.increment();
        self.len += 1;
        self.event_bytes += event.len();
    }

    /// The `_id` (resume token) of the batch's last event.
    fn last_token(&self) -> Option<Document> {
        let at = self.last_event_at?;
        let len = i32::from_le_bytes(self.elements.get(at..at + 4)?.try_into().ok()?) as usize;
        let event = bson::RawDocument::from_bytes(self.elements.get(at..at + len)?).ok()?;
        let id = event.get_document("_id").ok()?;
        Document::try_from(id).ok()
    }

    /// The BSON bytes of the batch as an array.
    pub fn into_array(mut self) -> Vec<u8> {
        if self.elements.is_empty() {
            self.elements.extend_from_slice(&[0; 4]);
        }
        self.elements.push(0);
        let len = self.elements.len() as i32;
        self.elements[..4].copy_from_slice(&len.to_le_bytes());
        self.elements
    }
}

/// Inserts `key` just before `anchor` (real events put `fullDocument` before `ns`).
fn insert_before(doc: &mut Document, anchor: &str, key: &str, value: Bson) {
    let mut out = Document::new();
    let mut inserted = false;
    for (k, v) in std::mem::take(doc) {
        if k == anchor && !inserted {
            out.insert(key, value.clone());
            inserted = true;
        }
        out.insert(k, v);
    }
    if !inserted {
        out.insert(key, value);
    }
    *doc = out;
}

/// `updateDescription` as real servers render it; `disambiguatedPaths` (with expanded events)
/// for the updated, removed and truncated paths that are ambiguous: as the server's
/// `DeltaUpdateDescriptionBuilder` decides, a path is ambiguous when a field name in it
/// contains a dot, or when a field name other than the first is a strict numeric component
/// (`0`, `1`, `12`, not `01`); array indexes are reported as ints but make no path ambiguous.
fn update_description(d: &UpdateDescription, expanded: bool) -> Document {
    let mut updated = Document::new();
    // Made only when a path needs it (most updates have none).
    let mut disambiguated: Option<Document> = None;
    let needs_disambiguation = |path: &[PathPart]| {
        path.iter().enumerate().any(|(i, p)| match p {
            PathPart::Field(f) => f.contains('.') || (i > 0 && is_numeric_component_strict(f)),
            PathPart::Index(_) => false,
        })
    };
    let components = |path: &[PathPart]| -> Bson {
        Bson::Array(
            path.iter()
                .map(|p| match p {
                    PathPart::Field(f) => Bson::String(f.clone()),
                    PathPart::Index(i) => Bson::Int32(*i as i32),
                })
                .collect(),
        )
    };
    for (path, value) in &d.updated_fields {
        let key = dotted(path);
        if expanded && needs_disambiguation(path) {
            disambiguated
                .get_or_insert_with(Document::new)
                .insert(key.clone(), components(path));
        }
        updated.insert(key, value.clone());
    }
    let mut removed = Vec::new();
    for path in &d.removed_fields {
        let key = dotted(path);
        if expanded && needs_disambiguation(path) {
            disambiguated
                .get_or_insert_with(Document::new)
                .insert(key.clone(), components(path));
        }
        removed.push(Bson::String(key));
    }
    let mut truncated = Vec::new();
    for (path, size) in &d.truncated_arrays {
        let key = dotted(path);
        if expanded && needs_disambiguation(path) {
            disambiguated
                .get_or_insert_with(Document::new)
                .insert(key.clone(), components(path));
        }
        truncated.push(Bson::Document(doc! {"field": key, "newSize": *size as i32}));
    }
    let mut out =
        doc! {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated};
    if let Some(disambiguated) = disambiguated {
        out.insert("disambiguatedPaths", disambiguated);
    }
    out
}

/// `FieldRef::isNumericPathComponentStrict`: digits only, no leading zero (except `0`).
fn is_numeric_component_strict(f: &str) -> bool {
    !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) && !(f.len() > 1 && f.starts_with('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disambiguated_paths_follow_the_servers_rule() {
        let f = |s: &str| PathPart::Field(s.to_string());
        let d = UpdateDescription {
            updated_fields: vec![
                (vec![f("0")], Bson::Int32(1)),
                (vec![f("a"), f("1")], Bson::Int32(2)),
                (vec![f("a"), f("01")], Bson::Int32(3)),
                (vec![f("a.b")], Bson::Int32(4)),
                (vec![f("x"), PathPart::Index(0), f("y")], Bson::Int32(5)),
                (vec![f("x"), PathPart::Index(0), f("2")], Bson::Int32(6)),
                (vec![f("$p"), f("q")], Bson::Int32(7)),
            ],
            removed_fields: vec![vec![f("c"), f("d.e")]],
            truncated_arrays: vec![(vec![f("m.n")], 1)],
        };
        let out = update_description(&d, true);
        assert_eq!(
            out.get_document("disambiguatedPaths").unwrap(),
            &doc! {
                "a.1": ["a", "1"],
                "a.b": ["a.b"],
                "x.0.2": ["x", 0, "2"],
                "c.d.e": ["c", "d.e"],
                "m.n": ["m.n"],
            }
        );
        assert!(!update_description(&d, false).contains_key("disambiguatedPaths"));
    }

    #[test]
    fn token_round_trips_and_orders() {
        let a = Token {
            ts: Timestamp {
                time: 100,
                increment: 2,
            },
            epoch: 7,
            seq: 10,
            kind: TokenKind::Event,
            fragment: 0,
        };
        let b = Token {
            ts: Timestamp {
                time: 100,
                increment: 3,
            },
            epoch: 7,
            seq: 11,
            kind: TokenKind::HighWaterMark,
            fragment: 0,
        };
        let ea = a.encode();
        let eb = b.encode();
        assert!(ea.get_str("_data").unwrap().starts_with("82"));
        assert_eq!(
            &ea.get_str("_data").unwrap()[2..18],
            format!("{:016X}", (100u64 << 32) | 2)
        );
        assert!(ea.get_str("_data").unwrap() < eb.get_str("_data").unwrap());
        assert_eq!(Token::decode(&Bson::Document(ea)).unwrap(), a);
        assert!(Token::decode(&Bson::Document(doc! {"_data": "zz"})).is_err());
        assert!(Token::decode(&Bson::Int32(1)).is_err());
    }

    #[test]
    fn a_high_water_mark_sorts_after_the_event_at_its_position() {
        let at = |kind| Token {
            ts: Timestamp {
                time: 100,
                increment: 2,
            },
            epoch: 7,
            seq: 10,
            kind,
            fragment: 0,
        };
        let event = at(TokenKind::Event).encode();
        let invalidate = at(TokenKind::Invalidate).encode();
        let hwm = at(TokenKind::HighWaterMark).encode();
        assert!(event.get_str("_data").unwrap() < hwm.get_str("_data").unwrap());
        assert!(invalidate.get_str("_data").unwrap() < hwm.get_str("_data").unwrap());
        assert_eq!(
            Token::decode(&Bson::Document(hwm)).unwrap(),
            at(TokenKind::HighWaterMark)
        );
    }

    #[test]
    fn an_event_batch_is_the_array_of_its_events_and_knows_its_last_token() {
        let events = [
            doc! {"_id": {"_data": "8201"}, "operationType": "insert", "n": 1},
            doc! {"_id": {"_data": "8202"}, "operationType": "update", "s": "x".repeat(300)},
        ];
        let mut batch = EventBatch::default();
        assert!(batch.last_token().is_none());
        for e in &events {
            batch.push(&e.to_vec().unwrap());
        }
        assert_eq!(batch.len(), 2);
        assert_eq!(
            batch.event_bytes,
            events
                .iter()
                .map(|e| e.to_vec().unwrap().len())
                .sum::<usize>()
        );
        assert_eq!(batch.last_token(), Some(doc! {"_data": "8202"}));
        let expected = Bson::Array(events.iter().cloned().map(Bson::Document).collect());
        assert_eq!(crate::wire::array_from_bytes(&batch.into_array()), expected);
        assert_eq!(
            crate::wire::array_from_bytes(&EventBatch::default().into_array()),
            Bson::Array(Vec::new())
        );
    }
}

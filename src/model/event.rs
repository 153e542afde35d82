//! Change events as the daemon sees them: a parsed header over the raw BSON the server sent.
//!
//! Documents travel as raw BSON end to end (never re-encoded through structs or JSON), so
//! numeric types and field order reach the destination exactly as the source stored them.

use std::ops::Range;

use bson::{raw::RawDocument, Bson, DateTime, RawBson, RawBsonRef, RawDocumentBuf, Timestamp};

use crate::error::{ErrorKind, SyncError};

/// What a change event does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Insert,
    Update,
    Replace,
    Delete,
    Drop,
    Rename,
    DropDatabase,
    Invalidate,
    Create,
    CreateIndexes,
    DropIndexes,
    Modify,
    /// An operation type this version does not know (new server versions add some).
    Other(String),
}

impl OpKind {
    pub fn parse(s: &str) -> OpKind {
        match s {
            "insert" => OpKind::Insert,
            "update" => OpKind::Update,
            "replace" => OpKind::Replace,
            "delete" => OpKind::Delete,
            "drop" => OpKind::Drop,
            "rename" => OpKind::Rename,
            "dropDatabase" => OpKind::DropDatabase,
            "invalidate" => OpKind::Invalidate,
            "create" => OpKind::Create,
            "createIndexes" => OpKind::CreateIndexes,
            "dropIndexes" => OpKind::DropIndexes,
            "modify" => OpKind::Modify,
            other => OpKind::Other(other.to_string()),
        }
    }

    /// Data events change documents; everything else is DDL or control.
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            OpKind::Insert | OpKind::Update | OpKind::Replace | OpKind::Delete
        )
    }

    /// The `op` of `events_applied_total` for a data event.
    pub fn apply_op(&self) -> crate::metrics::ApplyOp {
        use crate::metrics::ApplyOp;
        match self {
            OpKind::Insert => ApplyOp::Insert,
            OpKind::Update => ApplyOp::Update,
            OpKind::Replace => ApplyOp::Replace,
            OpKind::Delete => ApplyOp::Delete,
            _ => ApplyOp::Ddl,
        }
    }

    /// The `op` label of `events_applied_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            OpKind::Insert => "insert",
            OpKind::Update => "update",
            OpKind::Replace => "replace",
            OpKind::Delete => "delete",
            _ => "ddl",
        }
    }
}

/// One change event.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub kind: OpKind,
    /// The event's `_id`: its resume token.
    pub token: RawDocumentBuf,
    pub cluster_time: Timestamp,
    pub wall_time: Option<DateTime>,
    /// The whole event as the server sent it.
    raw: RawDocumentBuf,
    /// When the daemon read it: a partial batch waits for more events until its first event
    /// is `apply.batch_max_wait_ms` old, so time spent queued counts toward the wait.
    pub received: std::time::Instant,
    /// Boxed: events travel by value through the stream's queues.
    fields: Box<FieldIndex>,
}

/// Where the fields the apply path reads sit in an event's bytes, found in one pass when the
/// event is parsed. A lookup by name walks (and validates) every field before the one it
/// wants, and an absent field costs a walk of the whole event: with half a dozen lookups per
/// event that was a fifth of the daemon's CPU during a drain.
#[derive(Debug, Clone, Default)]
struct FieldIndex {
    id: Slot,
    operation_type: Option<Range<usize>>,
    cluster_time: Option<Timestamp>,
    wall_time: Option<DateTime>,
    document_key: Slot,
    full_document: Slot,
    pre_image: Slot,
    update_description: Slot,
    operation_description: Slot,
    ns: Slot,
    to: Slot,
    lsid: Slot,
    split_event: Slot,
    txn_number: Option<i64>,
}

/// A document-valued field: absent, explicitly null, a document (its byte range in the
/// event), or a value of another type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Slot {
    #[default]
    Absent,
    Null,
    Document(Range<usize>),
    Other,
}

impl FieldIndex {
    /// One walk over the top-level fields of `raw`.
    fn scan(raw: &RawDocument) -> Result<FieldIndex, SyncError> {
        let base = raw.as_bytes().as_ptr() as usize;
        let range_of = |bytes: &[u8]| {
            let start = bytes.as_ptr() as usize - base;
            start..start + bytes.len()
        };
        let slot_of = |v: RawBsonRef<'_>| match v {
            RawBsonRef::Document(d) => Slot::Document(range_of(d.as_bytes())),
            RawBsonRef::Null => Slot::Null,
            _ => Slot::Other,
        };
        let mut f = FieldIndex::default();
        for item in raw.iter() {
            let (key, value) = item.map_err(|_| field_error("unreadable field"))?;
            match key.as_str() {
                "_id" => f.id = slot_of(value),
                "operationType" => {
                    if let RawBsonRef::String(s) = value {
                        f.operation_type = Some(range_of(s.as_bytes()));
                    }
                }
                "clusterTime" => {
                    if let RawBsonRef::Timestamp(ts) = value {
                        f.cluster_time = Some(ts);
                    }
                }
                "wallTime" => {
                    if let RawBsonRef::DateTime(d) = value {
                        f.wall_time = Some(d);
                    }
                }
                "documentKey" => f.document_key = slot_of(value),
                "fullDocument" => f.full_document = slot_of(value),
                "fullDocumentBeforeChange" => f.pre_image = slot_of(value),
                "updateDescription" => f.update_description = slot_of(value),
                "operationDescription" => f.operation_description = slot_of(value),
                "ns" => f.ns = slot_of(value),
                "to" => f.to = slot_of(value),
                "lsid" => f.lsid = slot_of(value),
                "splitEvent" => f.split_event = slot_of(value),
                "txnNumber" => {
                    if let RawBsonRef::Int64(n) = value {
                        f.txn_number = Some(n);
                    }
                }
                _ => {}
            }
        }
        Ok(f)
    }
}

/// The document at `slot` of `raw` (the index was made from these bytes).
fn document_at<'a>(raw: &'a RawDocumentBuf, slot: &Slot) -> Option<&'a RawDocument> {
    match slot {
        Slot::Document(r) => RawDocument::from_bytes(&raw.as_bytes()[r.clone()]).ok(),
        _ => None,
    }
}

fn field_error(what: &str) -> SyncError {
    SyncError::new(
        ErrorKind::SourceRead,
        format!("malformed change event: {what}"),
    )
}

impl ChangeEvent {
    pub fn parse(raw: RawDocumentBuf) -> Result<ChangeEvent, SyncError> {
        let fields = FieldIndex::scan(&raw)?;
        ChangeEvent::from_index(raw, fields)
    }

    fn from_index(raw: RawDocumentBuf, fields: FieldIndex) -> Result<ChangeEvent, SyncError> {
        let token = document_at(&raw, &fields.id)
            .ok_or_else(|| field_error("missing _id (resume token)"))?
            .to_owned();
        let kind = match &fields.operation_type {
            Some(r) => OpKind::parse(
                std::str::from_utf8(&raw.as_bytes()[r.clone()])
                    .map_err(|_| field_error("unreadable operationType"))?,
            ),
            None => return Err(field_error("missing operationType")),
        };
        let cluster_time = match fields.cluster_time {
            Some(ts) => ts,
            None => token_cluster_time(&token).ok_or_else(|| field_error("missing clusterTime"))?,
        };
        Ok(ChangeEvent {
            kind,
            token,
            cluster_time,
            wall_time: fields.wall_time,
            raw,
            received: std::time::Instant::now(),
            fields: Box::new(fields),
        })
    }

    /// The whole event as the server sent it.
    pub fn raw(&self) -> &RawDocument {
        &self.raw
    }

    pub fn size(&self) -> usize {
        self.raw.as_bytes().len()
    }

    fn document(&self, slot: &Slot) -> Option<&RawDocument> {
        document_at(&self.raw, slot)
    }

    /// `documentKey._id` as raw BSON (how writes address the document).
    pub fn document_key(&self) -> Option<RawBson> {
        let key = self.document(&self.fields.document_key)?;
        key.get("_id").ok().flatten().map(RawBson::from)
    }

    /// `documentKey._id`.
    pub fn document_id(&self) -> Option<Bson> {
        let key = self.document(&self.fields.document_key)?;
        let id = key.get("_id").ok()??;
        Bson::try_from(id).ok()
    }

    /// `fullDocument` when present and not null.
    pub fn full_document(&self) -> Option<&RawDocument> {
        self.document(&self.fields.full_document)
    }

    /// Whether the event carries `fullDocument: null` (lookup found nothing).
    pub fn full_document_is_null(&self) -> bool {
        self.fields.full_document == Slot::Null
    }

    /// `fullDocumentBeforeChange` when present and not null.
    pub fn pre_image(&self) -> Option<&RawDocument> {
        self.document(&self.fields.pre_image)
    }

    pub fn update_description(&self) -> Option<&RawDocument> {
        self.document(&self.fields.update_description)
    }

    pub fn operation_description(&self) -> Option<&RawDocument> {
        self.document(&self.fields.operation_description)
    }

    /// `lsid` of a transactional write.
    pub fn lsid(&self) -> Option<&RawDocument> {
        self.document(&self.fields.lsid)
    }

    /// `ns.db` and `ns.coll` (coll absent for `dropDatabase`).
    pub fn ns(&self) -> Option<(String, Option<String>)> {
        let ns = self.document(&self.fields.ns)?;
        let db = ns.get_str("db").ok()?.to_string();
        Some((db, ns.get_str("coll").ok().map(str::to_string)))
    }

    /// `to` of a rename.
    pub fn rename_target(&self) -> Option<(String, String)> {
        let to = self.document(&self.fields.to)?;
        Some((
            to.get_str("db").ok()?.to_string(),
            to.get_str("coll").ok()?.to_string(),
        ))
    }

    /// `lsid`/`txnNumber` of a transactional write.
    pub fn txn_number(&self) -> Option<i64> {
        self.fields.txn_number
    }
}

/// Reassembles the fragments of an event split by `$changeStreamSplitLargeEvent` (only the
/// first fragment carries the header fields).
#[derive(Default, Debug)]
pub struct FragmentAssembler {
    parts: Vec<RawDocumentBuf>,
}

fn split_of(raw: &RawDocumentBuf, fields: &FieldIndex) -> Option<(i32, i32)> {
    let s = document_at(raw, &fields.split_event)?;
    Some((s.get_i32("fragment").ok()?, s.get_i32("of").ok()?))
}

impl FragmentAssembler {
    /// Feeds one raw event; returns a complete event when one is available.
    pub fn push(&mut self, raw: RawDocumentBuf) -> Result<Option<ChangeEvent>, SyncError> {
        let fields = FieldIndex::scan(&raw)?;
        let Some((fragment, of)) = split_of(&raw, &fields) else {
            if !self.parts.is_empty() {
                return Err(field_error("an unsplit event arrived inside a split event"));
            }
            return ChangeEvent::from_index(raw, fields).map(Some);
        };
        if fragment as usize != self.parts.len() + 1 {
            return Err(field_error("split event fragments out of order"));
        }
        self.parts.push(raw);
        if fragment < of {
            return Ok(None);
        }
        // Merge: every fragment's fields; the token is the last fragment's, so a checkpoint
        // lands only after the whole event.
        let parts = std::mem::take(&mut self.parts);
        let last_token = match parts.last().and_then(|p| p.get_document("_id").ok()) {
            Some(t) => t.to_owned(),
            None => return Err(field_error("fragment without _id")),
        };
        let mut merged = RawDocumentBuf::new();
        merged.append(bson::cstr!("_id"), last_token);
        for part in &parts {
            for item in part.iter() {
                let (k, v) = item.map_err(|_| field_error("unreadable fragment"))?;
                if k == "_id" || k == "splitEvent" || merged.get(k).ok().flatten().is_some() {
                    continue;
                }
                merged.append(k, RawBson::from(v));
            }
        }
        ChangeEvent::parse(merged).map(Some)
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// The cluster time at the start of a resume token's `_data` (KeyString type byte `0x82`
/// followed by the big-endian `(t << 32) | i`), as real servers and mongo-sim encode it.
pub fn token_cluster_time(token: &RawDocument) -> Option<Timestamp> {
    let data = token.get_str("_data").ok()?;
    if data.len() < 18 || !data.starts_with("82") {
        return None;
    }
    let v = u64::from_str_radix(data.get(2..18)?, 16).ok()?;
    Some(Timestamp {
        time: (v >> 32) as u32,
        increment: v as u32,
    })
}

/// Orders timestamps (bson's `Timestamp` has no `Ord`).
/// A resume token as raw BSON (how positions are compared and carried).
pub fn raw_token(token: &bson::Document) -> Option<RawDocumentBuf> {
    RawDocumentBuf::try_from(token).ok()
}

/// A raw resume token as a document (how checkpoints store it).
pub fn token_document(token: &RawDocument) -> bson::Document {
    bson::Document::try_from(token).unwrap_or_default()
}

/// A resume token's `_data`: MongoDB's is the hex of a KeyString, so comparing two of them as
/// strings compares stream positions (same server version). None for a token without it.
pub fn token_data(token: &RawDocument) -> Option<&str> {
    token.get_str("_data").ok()
}

/// Stream order of two resume tokens by `_data` (see [`token_data`]); None when either has none.
pub fn token_cmp(a: &RawDocument, b: &RawDocument) -> Option<std::cmp::Ordering> {
    Some(token_data(a)?.cmp(token_data(b)?))
}

/// True when token `a` is strictly after token `b` in stream order (false when not comparable).
pub fn token_after(a: &RawDocument, b: &RawDocument) -> bool {
    token_cmp(a, b) == Some(std::cmp::Ordering::Greater)
}

pub fn ts_key(ts: Timestamp) -> (u32, u32) {
    (ts.time, ts.increment)
}

pub fn ts_max(a: Timestamp, b: Timestamp) -> Timestamp {
    if ts_key(a) >= ts_key(b) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    fn event(op: &str, extra: RawDocumentBuf) -> RawDocumentBuf {
        let mut d = rawdoc! {"_id": {"_data": "8200000064000000020000000000000001000000000000000380000"}, "operationType": op, "clusterTime": Timestamp { time: 100, increment: 2 }};
        for item in extra.iter() {
            let (k, v) = item.unwrap();
            d.append(k, RawBson::from(v));
        }
        d
    }

    #[test]
    fn parses_header_and_fields() {
        let e = ChangeEvent::parse(event(
            "update",
            rawdoc! {"ns": {"db": "d", "coll": "c"}, "documentKey": {"_id": 7}, "updateDescription": {"updatedFields": {"a": 1}, "removedFields": []}},
        ))
        .unwrap();
        assert_eq!(e.kind, OpKind::Update);
        assert_eq!(e.document_id(), Some(Bson::Int32(7)));
        assert_eq!(e.ns(), Some(("d".into(), Some("c".into()))));
        assert_eq!(ts_key(e.cluster_time), (100, 2));
        assert!(e.update_description().is_some());
    }

    /// The one-pass index answers exactly what a lookup by name would, for every accessor,
    /// whether a field is present, null, of another type or absent, and wherever it sits.
    #[test]
    fn indexed_fields_answer_as_lookups_by_name() {
        let lookup_doc = |raw: &RawDocument, key: &str| match raw.get(key) {
            Ok(Some(RawBsonRef::Document(d))) => Some(d.to_owned()),
            _ => None,
        };
        let cases = [
            rawdoc! {"ns": {"db": "d", "coll": "c"}, "documentKey": {"_id": 7i64}, "fullDocument": {"_id": 7i64, "a": "x"}, "txnNumber": 3i64, "lsid": {"id": 1}},
            rawdoc! {"fullDocument": null, "documentKey": {"_id": "s"}, "updateDescription": {"updatedFields": {}, "removedFields": ["a"]}},
            rawdoc! {"fullDocument": 5, "fullDocumentBeforeChange": {"_id": 1}, "txnNumber": 4, "to": {"db": "d", "coll": "e"}, "operationDescription": {"to": {}}},
            rawdoc! {"wallTime": bson::DateTime::from_millis(1_000), "documentKey": {"_id": {"k": [1, 2]}}, "ns": {"db": "d"}},
            rawdoc! {},
        ];
        for extra in cases {
            let raw = event("update", extra);
            let e = ChangeEvent::parse(raw.clone()).unwrap();
            assert_eq!(
                e.full_document().map(|d| d.to_owned()),
                lookup_doc(&raw, "fullDocument")
            );
            assert_eq!(
                e.full_document_is_null(),
                matches!(raw.get("fullDocument"), Ok(Some(RawBsonRef::Null)))
            );
            assert_eq!(
                e.pre_image().map(|d| d.to_owned()),
                lookup_doc(&raw, "fullDocumentBeforeChange")
            );
            assert_eq!(
                e.update_description().map(|d| d.to_owned()),
                lookup_doc(&raw, "updateDescription")
            );
            assert_eq!(
                e.operation_description().map(|d| d.to_owned()),
                lookup_doc(&raw, "operationDescription")
            );
            assert_eq!(e.lsid().map(|d| d.to_owned()), lookup_doc(&raw, "lsid"));
            assert_eq!(e.txn_number(), raw.get_i64("txnNumber").ok());
            let key_id = raw
                .get_document("documentKey")
                .ok()
                .and_then(|k| k.get("_id").ok().flatten().map(RawBson::from));
            assert_eq!(e.document_key(), key_id);
            let ns = raw.get_document("ns").ok().and_then(|ns| {
                Some((
                    ns.get_str("db").ok()?.to_string(),
                    ns.get_str("coll").ok().map(str::to_string),
                ))
            });
            assert_eq!(e.ns(), ns);
            assert_eq!(e.wall_time, raw.get_datetime("wallTime").ok());
            assert_eq!(e.raw().as_bytes(), raw.as_bytes());
        }
    }

    #[test]
    fn token_time_decodes() {
        let t = rawdoc! {"_data": format!("82{:016X}FF", (1_700_000_000u64 << 32) | 5)};
        assert_eq!(ts_key(token_cluster_time(&t).unwrap()), (1_700_000_000, 5));
        assert!(token_cluster_time(&rawdoc! {"_data": "00"}).is_none());
    }

    #[test]
    fn fragments_reassemble_with_last_token() {
        let mut a = FragmentAssembler::default();
        let f1 = rawdoc! {"_id": {"_data": "8200000064000000020001"}, "operationType": "update", "clusterTime": Timestamp { time: 100, increment: 2 }, "ns": {"db": "d", "coll": "c"}, "splitEvent": {"fragment": 1, "of": 2}};
        let f2 = rawdoc! {"_id": {"_data": "8200000064000000020002"}, "fullDocumentBeforeChange": {"_id": 1}, "splitEvent": {"fragment": 2, "of": 2}};
        assert!(a.push(f1).unwrap().is_none());
        let whole = a.push(f2).unwrap().unwrap();
        assert_eq!(
            whole.token.get_str("_data").unwrap(),
            "8200000064000000020002"
        );
        assert!(whole.pre_image().is_some());
        assert_eq!(whole.kind, OpKind::Update);
        assert!(a.is_empty());
    }
}

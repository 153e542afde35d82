//! The cluster clock and a bounded oplog: every write gets a cluster time and an entry; the
//! oldest entries fall off when the capacity is exceeded, so history loss can be provoked.

use std::{borrow::Cow, collections::VecDeque, sync::Arc};

use bson::{Bson, Document, RawDocument, Timestamp};

use crate::store::{DocRef, Namespace, NsRef};

/// A document version an oplog entry keeps (the document of an insert, the pre- and
/// post-image of an update, a replacement or a delete).
///
/// A version is written `Live`: the very `DocRef` the collection (or the transaction) stored,
/// which costs the oplog nothing while the catalog still holds it. Once nothing but the oplog
/// holds it, it is `Packed` as its BSON bytes (a `Document` of a small record takes ~10x its
/// BSON size on the heap): the oplog packs the pre-image of every update, replacement and
/// delete (the catalog just replaced it), sharing the bytes with the entry that wrote that
/// version, and sweeps the versions only it holds (see [`Oplog::append`]).
#[derive(Debug, Clone)]
pub enum Version {
    Live(DocRef),
    Packed(Arc<[u8]>),
}

impl From<DocRef> for Version {
    fn from(doc: DocRef) -> Self {
        Version::Live(doc)
    }
}

impl Version {
    /// The BSON bytes of `doc` in one allocation of the exact size (`None` when it cannot be
    /// encoded: it then stays live).
    fn pack_document(doc: &Document) -> Option<Arc<[u8]>> {
        crate::store::document_bytes(doc).map(Arc::from)
    }

    /// A version stored as its BSON bytes (recovery).
    pub fn packed(doc: &Document) -> Version {
        match Self::pack_document(doc) {
            Some(bytes) => Version::Packed(bytes),
            None => Version::Live(crate::store::Stored::shared(doc.clone())),
        }
    }

    fn raw(bytes: &[u8]) -> &RawDocument {
        RawDocument::from_bytes(bytes).expect("packed from a valid document")
    }

    /// The document (borrowed when live, decoded when packed).
    pub fn document(&self) -> Cow<'_, Document> {
        match self {
            Version::Live(doc) => Cow::Borrowed(doc),
            Version::Packed(bytes) => Cow::Owned(
                Document::try_from(Self::raw(bytes)).expect("packed from a valid document"),
            ),
        }
    }

    /// The document as a `DocRef` (the same one when live, a decoded copy when packed).
    pub fn doc_ref(&self) -> DocRef {
        match self {
            Version::Live(doc) => Arc::clone(doc),
            Version::Packed(_) => crate::store::Stored::shared(self.document().into_owned()),
        }
    }

    /// The document's `_id`.
    pub fn id(&self) -> Option<Bson> {
        match self {
            Version::Live(doc) => doc.get("_id").cloned(),
            Version::Packed(bytes) => Self::raw(bytes)
                .get("_id")
                .ok()
                .flatten()
                .and_then(|v| Bson::try_from(v).ok()),
        }
    }

    fn live(&self) -> Option<&DocRef> {
        match self {
            Version::Live(doc) => Some(doc),
            Version::Packed(_) => None,
        }
    }

    /// Heap bytes this version keeps that nothing else shares (for tests and diagnostics):
    /// the encoded size when packed, 0 while live (the catalog holds the document).
    pub fn packed_len(&self) -> usize {
        match self {
            Version::Live(_) => 0,
            Version::Packed(bytes) => bytes.len(),
        }
    }
}

/// Monotonic cluster time: `Timestamp(unix seconds, counter)`.
#[derive(Debug, Clone)]
pub struct ClusterClock {
    last: Timestamp,
}

impl Default for ClusterClock {
    fn default() -> Self {
        Self {
            last: Timestamp {
                time: now_secs(),
                increment: 0,
            },
        }
    }
}

pub fn now_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

impl ClusterClock {
    pub fn tick(&mut self) -> Timestamp {
        let now = now_secs();
        self.last = if now > self.last.time {
            Timestamp {
                time: now,
                increment: 1,
            }
        } else {
            Timestamp {
                time: self.last.time,
                increment: self.last.increment + 1,
            }
        };
        self.last
    }

    pub fn current(&self) -> Timestamp {
        self.last
    }

    /// Never goes back before `ts` (recovery from a data directory).
    pub fn restore(&mut self, ts: Timestamp) {
        if ts_cmp(ts, self.last).is_gt() {
            self.last = ts;
        }
    }
}

pub fn ts_cmp(a: Timestamp, b: Timestamp) -> std::cmp::Ordering {
    (a.time, a.increment).cmp(&(b.time, b.increment))
}

/// Transaction identity carried by the entries of a committed transaction.
#[derive(Debug, Clone)]
pub struct TxnInfo {
    pub lsid: Document,
    pub txn_number: i64,
}

#[derive(Debug, Clone)]
pub enum OplogOp {
    Insert {
        ns: NsRef,
        uuid: bson::Uuid,
        doc: Version,
    },
    Update {
        ns: NsRef,
        uuid: bson::Uuid,
        pre: Version,
        post: Version,
        description: Arc<crate::query::update::UpdateDescription>,
    },
    Replace {
        ns: NsRef,
        uuid: bson::Uuid,
        pre: Version,
        post: Version,
    },
    Delete {
        ns: NsRef,
        uuid: bson::Uuid,
        pre: Version,
    },
    Create {
        ns: NsRef,
        uuid: bson::Uuid,
        /// Boxed, as the documents of the other rare variants: every entry is as large as
        /// the largest variant.
        options: Box<Document>,
    },
    CreateIndexes {
        ns: NsRef,
        uuid: bson::Uuid,
        indexes: Vec<Document>,
    },
    DropIndexes {
        ns: NsRef,
        uuid: bson::Uuid,
        indexes: Vec<Document>,
    },
    /// collMod: the options that changed (new values) and the previous values.
    Modify {
        ns: NsRef,
        uuid: bson::Uuid,
        changed: Box<Document>,
        previous: Box<Document>,
    },
    Drop {
        ns: NsRef,
        uuid: bson::Uuid,
    },
    Rename {
        from: NsRef,
        to: NsRef,
        uuid: bson::Uuid,
        drop_target: Option<bson::Uuid>,
    },
    DropDatabase {
        db: String,
    },
    /// Periodic no-op that only advances the cluster time.
    Noop,
}

impl OplogOp {
    /// The namespace the entry belongs to (the source namespace for renames).
    pub fn ns(&self) -> Option<&Namespace> {
        match self {
            OplogOp::Insert { ns, .. }
            | OplogOp::Update { ns, .. }
            | OplogOp::Replace { ns, .. }
            | OplogOp::Delete { ns, .. }
            | OplogOp::Create { ns, .. }
            | OplogOp::CreateIndexes { ns, .. }
            | OplogOp::DropIndexes { ns, .. }
            | OplogOp::Modify { ns, .. }
            | OplogOp::Drop { ns, .. } => Some(ns),
            OplogOp::Rename { from, .. } => Some(from),
            OplogOp::DropDatabase { .. } | OplogOp::Noop => None,
        }
    }

    pub fn db(&self) -> Option<&str> {
        match self {
            OplogOp::DropDatabase { db } => Some(db),
            other => other.ns().map(|n| n.db.as_str()),
        }
    }

    pub fn document_id(&self) -> Option<Bson> {
        match self {
            OplogOp::Insert { doc, .. } => doc.id(),
            OplogOp::Update { post, .. } | OplogOp::Replace { post, .. } => post.id(),
            OplogOp::Delete { pre, .. } => pre.id(),
            _ => None,
        }
    }

    /// The version the entry wrote (insert: the document; update, replace: the post-image).
    fn written_mut(&mut self) -> Option<&mut Version> {
        match self {
            OplogOp::Insert { doc, .. } => Some(doc),
            OplogOp::Update { post, .. } | OplogOp::Replace { post, .. } => Some(post),
            _ => None,
        }
    }

    /// The version the entry replaced (update, replace, delete: the pre-image).
    fn replaced_mut(&mut self) -> Option<&mut Version> {
        match self {
            OplogOp::Update { pre, .. }
            | OplogOp::Replace { pre, .. }
            | OplogOp::Delete { pre, .. } => Some(pre),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OplogEntry {
    /// Position in the oplog; strictly increasing, never reused.
    pub seq: u64,
    pub ts: Timestamp,
    pub wall: bson::DateTime,
    pub op: OplogOp,
    /// Shared by the entries of one transaction.
    pub txn: Option<Arc<TxnInfo>>,
    /// Index of this operation within its transaction (0 outside transactions).
    pub txn_op_index: u32,
    /// Whether the collection recorded pre- and post-images when this write happened.
    pub images: bool,
}

/// A bounded oplog.
#[derive(Debug)]
pub struct Oplog {
    entries: VecDeque<OplogEntry>,
    capacity: usize,
    next_seq: u64,
    /// Highest sequence number that has been dropped for capacity (0: none).
    dropped_through_seq: u64,
    dropped_through_ts: Option<Timestamp>,
    /// With `--data-dir`: encoded records of the entries appended since the last flush.
    journal: Option<Vec<u8>>,
    /// Next entry the sweep of [`Oplog::sweep`] looks at.
    sweep_seq: u64,
}

/// Entries the sweep looks at per append: the oplog is swept once per `len / SWEEP_STEP`
/// appends.
const SWEEP_STEP: usize = 2;

impl Oplog {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            next_seq: 1,
            dropped_through_seq: 0,
            dropped_through_ts: None,
            journal: None,
            sweep_seq: 0,
        }
    }

    /// Starts recording appended entries for the journal (see [`crate::persist`]).
    pub fn enable_journal(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// The records appended since the last call (empty without a journal).
    pub fn take_journal(&mut self) -> Vec<u8> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Recovery: counters of a snapshot (entries follow through [`Oplog::restore_entry`]).
    pub fn restore_counters(
        &mut self,
        last_seq: u64,
        dropped_seq: u64,
        dropped_ts: Option<Timestamp>,
    ) {
        self.next_seq = last_seq + 1;
        self.dropped_through_seq = dropped_seq;
        self.dropped_through_ts = dropped_ts;
    }

    /// Recovery: re-appends an entry with its original sequence number.
    pub fn restore_entry(&mut self, entry: OplogEntry) {
        self.next_seq = self.next_seq.max(entry.seq + 1);
        if let Some(last) = self.entries.back() {
            if entry.seq <= last.seq {
                return;
            }
        }
        self.entries.push_back(entry);
        self.compact_last();
        self.trim();
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Shrinks or grows the capacity, dropping the oldest entries if needed.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        self.trim();
    }

    pub fn append(
        &mut self,
        ts: Timestamp,
        op: OplogOp,
        txn: Option<Arc<TxnInfo>>,
        txn_op_index: u32,
        images: bool,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(OplogEntry {
            seq,
            ts,
            wall: bson::DateTime::now(),
            op,
            txn,
            txn_op_index,
            images,
        });
        if let Some(journal) = &mut self.journal {
            let entry = self.entries.back().expect("just pushed");
            crate::persist::encode_entry(entry, journal);
        }
        self.compact_last();
        self.sweep();
        self.trim();
        seq
    }

    /// Packs the pre-image of the newest entry (the collection no longer holds it), sharing
    /// the bytes with the entry that wrote that version if it still holds it live, and
    /// records in the version the newest entry wrote that it wrote it ([`Stored::writer`]).
    fn compact_last(&mut self) {
        let Some(last) = self.entries.back_mut() else {
            return;
        };
        let seq = last.seq;
        if let Some(pre) = last.op.replaced_mut() {
            if let Version::Live(doc) = pre {
                if let Some(bytes) = Version::pack_document(doc) {
                    let doc = Arc::clone(doc);
                    *pre = Version::Packed(Arc::clone(&bytes));
                    // The entry that wrote this version, if the oplog still holds it (and
                    // holds it live: the very `Arc`).
                    let writer = doc.writer();
                    if writer != 0 && writer != seq {
                        if let Some(written) = self.get_mut(writer).and_then(|e| e.op.written_mut())
                        {
                            if written.live().is_some_and(|d| Arc::ptr_eq(d, &doc)) {
                                *written = Version::Packed(bytes);
                            }
                        }
                    }
                }
            }
        }
        let last = self.entries.back_mut().expect("checked above");
        if let Some(Version::Live(doc)) = last.op.written_mut() {
            doc.set_writer(seq);
        }
    }

    /// Packs, a few entries per append, the live versions nothing but the oplog holds any
    /// more (the catalog dropped them: a dropped collection, a committed transaction's copies).
    fn sweep(&mut self) {
        for _ in 0..SWEEP_STEP {
            let Some(first) = self.entries.front().map(|e| e.seq) else {
                return;
            };
            if self.sweep_seq < first || self.sweep_seq > self.last_seq() {
                self.sweep_seq = first;
            }
            let seq = self.sweep_seq;
            self.sweep_seq += 1;
            let entry = self
                .entries
                .get_mut((seq - first) as usize)
                .expect("within the oplog");
            if let Some(written) = entry.op.written_mut() {
                if let Some(doc) = written.live().filter(|d| Arc::strong_count(d) == 1) {
                    if let Some(bytes) = Version::pack_document(doc) {
                        *written = Version::Packed(bytes);
                    }
                }
            }
            if let Some(pre) = entry.op.replaced_mut() {
                if let Some(doc) = pre.live().filter(|d| Arc::strong_count(d) == 1) {
                    if let Some(bytes) = Version::pack_document(doc) {
                        *pre = Version::Packed(bytes);
                    }
                }
            }
        }
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut OplogEntry> {
        let first = self.entries.front()?.seq;
        if seq < first {
            return None;
        }
        self.entries.get_mut((seq - first) as usize)
    }

    fn trim(&mut self) {
        while self.entries.len() > self.capacity {
            if let Some(e) = self.entries.pop_front() {
                self.dropped_through_seq = e.seq;
                self.dropped_through_ts = Some(e.ts);
            }
        }
    }

    /// Sequence number of the newest entry (0 when nothing was ever written).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn dropped_through_seq(&self) -> u64 {
        self.dropped_through_seq
    }

    pub fn dropped_through_ts(&self) -> Option<Timestamp> {
        self.dropped_through_ts
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, seq: u64) -> Option<&OplogEntry> {
        let first = self.entries.front()?.seq;
        if seq < first {
            return None;
        }
        self.entries.get((seq - first) as usize)
    }

    /// Entries with a sequence number greater than `seq`, in order.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &OplogEntry> {
        let skip = match self.entries.front() {
            Some(first) if seq >= first.seq => (seq - first.seq + 1) as usize,
            _ => 0,
        };
        self.entries.iter().skip(skip)
    }

    /// The sequence number of the last entry at or before `ts` (entries after it are newer
    /// than `ts`; the snapshot reads of [`crate::snapshot`] undo them).
    pub fn seq_through_ts(&self, ts: Timestamp) -> u64 {
        let idx = self.entries.partition_point(|e| ts_cmp(e.ts, ts).is_le());
        match self.entries.get(idx) {
            Some(e) => e.seq - 1,
            None => self.last_seq(),
        }
    }

    /// The sequence number just before the first entry at or after `ts`.
    pub fn seq_before_ts(&self, ts: Timestamp) -> u64 {
        // Entries are in ts order; binary search on the deque.
        let idx = self.entries.partition_point(|e| ts_cmp(e.ts, ts).is_lt());
        match self.entries.get(idx) {
            Some(e) => e.seq - 1,
            None => self.last_seq(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_monotonic() {
        let mut c = ClusterClock::default();
        let a = c.tick();
        let b = c.tick();
        assert!(ts_cmp(a, b).is_lt());
    }

    #[test]
    fn capacity_drops_oldest_and_records_loss() {
        let mut o = Oplog::new(3);
        let mut c = ClusterClock::default();
        for _ in 0..5 {
            o.append(c.tick(), OplogOp::Noop, None, 0, false);
        }
        assert_eq!(o.len(), 3);
        assert_eq!(o.dropped_through_seq(), 2);
        assert_eq!(o.after(0).next().unwrap().seq, 3);
        assert_eq!(o.after(3).next().unwrap().seq, 4);
        assert!(o.get(2).is_none());
        assert_eq!(o.get(4).unwrap().seq, 4);
        assert_eq!(o.last_seq(), 5);
    }

    fn encoded(d: &Document) -> Vec<u8> {
        let mut out = Vec::new();
        d.to_writer(&mut out).unwrap();
        out
    }

    fn packed_bytes(v: &Version) -> &Arc<[u8]> {
        match v {
            Version::Packed(b) => b,
            Version::Live(_) => panic!("expected a packed version"),
        }
    }

    fn ns() -> NsRef {
        Arc::new(Namespace::new("db", "c"))
    }

    /// Insert, update, replace, delete of one document as a collection hands them over: the
    /// replaced versions are packed once (shared by the entry that wrote them and the one
    /// that replaced them), the current one stays live, and every reader sees the same
    /// documents (same fields, same order, same types) as before packing.
    #[test]
    fn replaced_versions_are_packed_once_and_read_back_unchanged() {
        let uuid = bson::Uuid::new();
        let v1 = crate::store::Stored::shared(
            bson::doc! {"_id": 7, "a": 1.5, "s": "x", "arr": [1, {"b": null}]},
        );
        let v2 = crate::store::Stored::shared(
            bson::doc! {"_id": 7, "a": 2.5, "s": "x", "arr": [1, {"b": null}], "n": 1i64},
        );
        let v3 = crate::store::Stored::shared(
            bson::doc! {"_id": 7, "z": bson::Timestamp { time: 1, increment: 2 }},
        );
        let mut catalog = Some(Arc::clone(&v1)); // what the collection holds
        let mut o = Oplog::new(100);
        let mut c = ClusterClock::default();
        o.append(
            c.tick(),
            OplogOp::Insert {
                ns: ns(),
                uuid,
                doc: Arc::clone(&v1).into(),
            },
            None,
            0,
            true,
        );
        catalog = catalog.map(|_| Arc::clone(&v2));
        o.append(
            c.tick(),
            OplogOp::Update {
                ns: ns(),
                uuid,
                pre: Arc::clone(&v1).into(),
                post: Arc::clone(&v2).into(),
                description: Arc::default(),
            },
            None,
            0,
            true,
        );
        catalog = catalog.map(|_| Arc::clone(&v3));
        o.append(
            c.tick(),
            OplogOp::Replace {
                ns: ns(),
                uuid,
                pre: Arc::clone(&v2).into(),
                post: Arc::clone(&v3).into(),
            },
            None,
            0,
            true,
        );
        let entries: Vec<&OplogEntry> = o.after(0).collect();
        let (
            OplogOp::Insert { doc: ins, .. },
            OplogOp::Update {
                pre: upre,
                post: upost,
                ..
            },
            OplogOp::Replace {
                pre: rpre,
                post: rpost,
                ..
            },
        ) = (&entries[0].op, &entries[1].op, &entries[2].op)
        else {
            panic!("entry kinds")
        };
        assert!(
            Arc::ptr_eq(packed_bytes(ins), packed_bytes(upre)),
            "v1 packed once"
        );
        assert!(
            Arc::ptr_eq(packed_bytes(upost), packed_bytes(rpre)),
            "v2 packed once"
        );
        assert!(
            matches!(rpost, Version::Live(d) if Arc::ptr_eq(d, &v3)),
            "v3 is the catalog's"
        );
        for (version, original) in [
            (ins, &v1),
            (upre, &v1),
            (upost, &v2),
            (rpre, &v2),
            (rpost, &v3),
        ] {
            assert_eq!(encoded(&version.document()), encoded(original));
            assert_eq!(encoded(&version.doc_ref()), encoded(original));
            assert_eq!(version.id(), Some(Bson::Int32(7)));
        }
        // The delete packs the last version; the sweep leaves live what the catalog holds.
        drop(catalog.take());
        o.append(
            c.tick(),
            OplogOp::Delete {
                ns: ns(),
                uuid,
                pre: Arc::clone(&v3).into(),
            },
            None,
            0,
            true,
        );
        let last: Vec<&OplogEntry> = o.after(0).collect();
        let (OplogOp::Replace { post: rpost, .. }, OplogOp::Delete { pre: dpre, .. }) =
            (&last[2].op, &last[3].op)
        else {
            panic!("entry kinds")
        };
        assert!(
            Arc::ptr_eq(packed_bytes(rpost), packed_bytes(dpre)),
            "v3 packed once"
        );
        assert_eq!(encoded(&dpre.document()), encoded(&v3));
        assert_eq!(
            o.after(0).next().unwrap().op.document_id(),
            Some(Bson::Int32(7))
        );
    }

    /// Versions only the oplog still holds (the collection was dropped, a transaction's
    /// copies) are packed by the sweep; versions the catalog holds stay shared.
    #[test]
    fn the_sweep_packs_what_only_the_oplog_holds() {
        let uuid = bson::Uuid::new();
        let held = crate::store::Stored::shared(bson::doc! {"_id": 1});
        let mut o = Oplog::new(100);
        let mut c = ClusterClock::default();
        o.append(
            c.tick(),
            OplogOp::Insert {
                ns: ns(),
                uuid,
                doc: Arc::clone(&held).into(),
            },
            None,
            0,
            false,
        );
        o.append(
            c.tick(),
            OplogOp::Insert {
                ns: ns(),
                uuid,
                doc: crate::store::Stored::shared(bson::doc! {"_id": 2}).into(),
            },
            None,
            0,
            false,
        );
        for _ in 0..10 {
            o.append(c.tick(), OplogOp::Noop, None, 0, false);
        }
        let docs: Vec<&Version> = o
            .after(0)
            .filter_map(|e| match &e.op {
                OplogOp::Insert { doc, .. } => Some(doc),
                _ => None,
            })
            .collect();
        assert!(matches!(docs[0], Version::Live(d) if Arc::ptr_eq(d, &held)));
        assert!(matches!(docs[1], Version::Packed(_)));
        assert_eq!(
            encoded(&docs[1].document()),
            encoded(&bson::doc! {"_id": 2})
        );
        assert_eq!(docs[1].packed_len(), encoded(&bson::doc! {"_id": 2}).len());
    }

    /// Every BSON type survives packing with its bytes.
    #[test]
    fn packing_round_trips_every_type() {
        let d = bson::doc! {
            "_id": bson::oid::ObjectId::new(), "f": 1.25, "s": "é", "d": {"x": [1, 2i64, {"y": true}]},
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "undef": Bson::Undefined, "b": false, "dt": bson::DateTime::from_millis(12345), "nul": Bson::Null,
            "re": bson::Regex { pattern: "a.*".try_into().unwrap(), options: "im".try_into().unwrap() }, "js": Bson::JavaScriptCode("f()".into()),
            "jsw": bson::JavaScriptCodeWithScope { code: "g()".into(), scope: bson::doc! {"v": 1} },
            "i": 3, "ts": bson::Timestamp { time: 5, increment: 6 }, "l": 4i64,
            "dec": "1.5".parse::<bson::Decimal128>().unwrap(), "min": Bson::MinKey, "max": Bson::MaxKey,
            "sym": Bson::Symbol("sym".into()), "nan": f64::NAN, "neg0": -0.0,
        };
        let v = Version::packed(&d);
        assert!(v.packed_len() > 0);
        assert_eq!(encoded(&v.document()), encoded(&d));
        assert_eq!(v.id(), d.get("_id").cloned());
    }
}

//! `--data-dir`: the simulator's state survives a clean stop and a SIGKILL.
//!
//! Layout of the directory:
//! - `snapshot.bson`: a sequence of BSON documents: a header (format, replica-set identity,
//!   term, cluster time, oplog counters), one record per collection (name, UUID, options,
//!   index specs), its documents in chunks, then the retained oplog entries.
//! - `journal.bson`: a write-ahead journal of every oplog entry appended after the snapshot,
//!   plus `{term: N}` records when the term changes. Every write of the catalog produces an
//!   oplog entry (DDL included), so replaying the journal over the snapshot rebuilds the
//!   catalog, the oplog and the identity exactly.
//!
//! Durability policy: the journal bytes of a command are written to the file (a `write(2)`,
//! so in the kernel's page cache) before the command's reply is sent, which makes every
//! acknowledged write survive a crash of the process (SIGKILL). `fdatasync` runs at most every
//! [`SYNC_INTERVAL`] (MongoDB's journal commit interval is 100 ms as well), at every snapshot
//! and at a clean stop, so a crash of the whole machine loses at most that window.
//! A journal whose last record was cut by a crash is truncated at the last whole record.
//! The journal is folded into a new snapshot at start-up, at a clean stop and whenever it
//! grows past [`COMPACT_BYTES`]; the snapshot is written to a temporary file, synced and
//! renamed over the old one, so a crash at any point leaves one complete snapshot.
//!
//! Not persisted (as on a real server, or deliberately): cursors, sessions and the
//! retryable-write history (a retry after a restart re-executes), fail points.

use std::{
    fs::{File, OpenOptions},
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bson::{doc, oid::ObjectId, Bson, Document};

use crate::{
    oplog::{ClusterClock, Oplog, OplogEntry, OplogOp, TxnInfo, Version},
    query::{path::PathPart, update::UpdateDescription},
    store::{Catalog, Collection, Index, Namespace},
};

/// Longest time journal bytes stay in the page cache unsynced.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Journal size beyond which it is folded into a new snapshot.
pub const COMPACT_BYTES: u64 = 256 * 1024 * 1024;
const FORMAT: i32 = 1;
const SNAPSHOT: &str = "snapshot.bson";
const SNAPSHOT_TMP: &str = "snapshot.bson.tmp";
const JOURNAL: &str = "journal.bson";
/// Documents per snapshot record (keeps records far below 16 MiB for ordinary documents).
const DOCS_PER_RECORD: usize = 1000;

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// State recovered from a data directory.
pub struct Recovered {
    pub catalog: Catalog,
    pub oplog: Oplog,
    pub clock: ClusterClock,
    pub replica_set_id: ObjectId,
    pub term: i64,
    pub journal: Journal,
}

/// The open journal file.
pub struct Journal {
    dir: PathBuf,
    file: Arc<File>,
    len: u64,
    unsynced: bool,
    last_sync: Instant,
}

impl Journal {
    fn open(dir: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(JOURNAL))?;
        let len = file.metadata()?.len();
        Ok(Journal {
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            len,
            unsynced: false,
            last_sync: Instant::now(),
        })
    }

    /// Writes encoded records (one `write(2)`), syncing when the last sync is old enough.
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        (&*self.file).write_all(bytes)?;
        self.len += bytes.len() as u64;
        self.unsynced = true;
        if self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether unsynced bytes are older than [`SYNC_INTERVAL`].
    pub fn sync_due(&self) -> bool {
        self.unsynced && self.last_sync.elapsed() >= SYNC_INTERVAL
    }

    /// Appends a `{term: N}` record.
    pub fn write_term(&mut self, term: i64) -> std::io::Result<()> {
        let bytes = doc! {"term": term}
            .to_vec()
            .map_err(|e| invalid(e.to_string()))?;
        self.write(&bytes)?;
        self.sync()
    }

    /// Writes a snapshot of the whole state and empties the journal.
    pub fn compact(
        &mut self,
        identity: &Identity,
        catalog: &Catalog,
        oplog: &Oplog,
        clock: &ClusterClock,
    ) -> std::io::Result<()> {
        write_snapshot(&self.dir, identity, catalog, oplog, clock)?;
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// What makes a restarted simulator the same replica set.
#[derive(Debug, Clone)]
pub struct Identity {
    pub set_name: String,
    pub replica_set_id: ObjectId,
    pub term: i64,
}

fn path_to_bson(p: &[PathPart]) -> Bson {
    Bson::Array(
        p.iter()
            .map(|part| match part {
                PathPart::Field(s) => Bson::String(s.clone()),
                PathPart::Index(i) => Bson::Int64(*i as i64),
            })
            .collect(),
    )
}

fn path_from_bson(b: &Bson) -> std::io::Result<Vec<PathPart>> {
    let items = b
        .as_array()
        .ok_or_else(|| invalid("path must be an array"))?;
    items
        .iter()
        .map(|i| match i {
            Bson::String(s) => Ok(PathPart::Field(s.clone())),
            Bson::Int64(n) => Ok(PathPart::Index(*n as usize)),
            _ => Err(invalid("bad path part")),
        })
        .collect()
}

fn description_to_doc(d: &UpdateDescription) -> Document {
    doc! {
        "u": d.updated_fields.iter().map(|(p, v)| Bson::Array(vec![path_to_bson(p), v.clone()])).collect::<Vec<_>>(),
        "r": d.removed_fields.iter().map(|p| path_to_bson(p)).collect::<Vec<_>>(),
        "t": d.truncated_arrays.iter().map(|(p, n)| Bson::Array(vec![path_to_bson(p), Bson::Int64(*n as i64)])).collect::<Vec<_>>(),
    }
}

fn description_from_doc(d: &Document) -> std::io::Result<UpdateDescription> {
    let arr = |k: &str| {
        d.get_array(k)
            .map_err(|_| invalid(format!("description.{k}")))
    };
    let pair = |b: &Bson| -> std::io::Result<(Vec<PathPart>, Bson)> {
        match b.as_array().map(Vec::as_slice) {
            Some([p, v]) => Ok((path_from_bson(p)?, v.clone())),
            _ => Err(invalid("bad description pair")),
        }
    };
    Ok(UpdateDescription {
        updated_fields: arr("u")?.iter().map(pair).collect::<Result<_, _>>()?,
        removed_fields: arr("r")?
            .iter()
            .map(path_from_bson)
            .collect::<Result<_, _>>()?,
        truncated_arrays: arr("t")?
            .iter()
            .map(|b| {
                let (p, n) = pair(b)?;
                Ok((p, n.as_i64().unwrap_or(0) as u32))
            })
            .collect::<Result<_, std::io::Error>>()?,
    })
}

fn uuid_bson(u: &bson::Uuid) -> Bson {
    Bson::Binary(bson::Binary::from_uuid(*u))
}

fn uuid_from(d: &Document, k: &str) -> std::io::Result<bson::Uuid> {
    match d.get(k) {
        Some(Bson::Binary(b)) => b.to_uuid().map_err(|e| invalid(e.to_string())),
        _ => Err(invalid(format!("missing uuid '{k}'"))),
    }
}

fn ns_from(d: &Document, k: &str) -> std::io::Result<Namespace> {
    let s = d
        .get_str(k)
        .map_err(|_| invalid(format!("missing '{k}'")))?;
    Namespace::parse(s).map_err(|e| invalid(e.message))
}

fn doc_from(d: &Document, k: &str) -> std::io::Result<Document> {
    d.get_document(k)
        .cloned()
        .map_err(|_| invalid(format!("missing document '{k}'")))
}

fn docs_from(d: &Document, k: &str) -> std::io::Result<Vec<Document>> {
    d.get_array(k)
        .map_err(|_| invalid(format!("missing array '{k}'")))?
        .iter()
        .map(|b| {
            b.as_document()
                .cloned()
                .ok_or_else(|| invalid("array of documents expected"))
        })
        .collect()
}

fn op_to_doc(op: &OplogOp) -> Document {
    match op {
        OplogOp::Insert { ns, uuid, doc } => {
            doc! {"op": "i", "ns": ns.to_string(), "ui": uuid_bson(uuid), "o": doc.document().into_owned()}
        }
        OplogOp::Update {
            ns,
            uuid,
            pre,
            post,
            description,
        } => doc! {
            "op": "u", "ns": ns.to_string(), "ui": uuid_bson(uuid),
            "pre": pre.document().into_owned(), "o": post.document().into_owned(), "d": description_to_doc(description),
        },
        OplogOp::Replace {
            ns,
            uuid,
            pre,
            post,
        } => doc! {
            "op": "r", "ns": ns.to_string(), "ui": uuid_bson(uuid),
            "pre": pre.document().into_owned(), "o": post.document().into_owned(),
        },
        OplogOp::Delete { ns, uuid, pre } => {
            doc! {"op": "d", "ns": ns.to_string(), "ui": uuid_bson(uuid), "pre": pre.document().into_owned()}
        }
        OplogOp::Create { ns, uuid, options } => {
            doc! {"op": "create", "ns": ns.to_string(), "ui": uuid_bson(uuid), "o": (**options).clone()}
        }
        OplogOp::CreateIndexes { ns, uuid, indexes } => doc! {
            "op": "createIndexes", "ns": ns.to_string(), "ui": uuid_bson(uuid), "o": indexes.clone(),
        },
        OplogOp::DropIndexes { ns, uuid, indexes } => doc! {
            "op": "dropIndexes", "ns": ns.to_string(), "ui": uuid_bson(uuid), "o": indexes.clone(),
        },
        OplogOp::Modify {
            ns,
            uuid,
            changed,
            previous,
        } => doc! {
            "op": "collMod", "ns": ns.to_string(), "ui": uuid_bson(uuid),
            "o": (**changed).clone(), "prev": (**previous).clone(),
        },
        OplogOp::Drop { ns, uuid } => {
            doc! {"op": "drop", "ns": ns.to_string(), "ui": uuid_bson(uuid)}
        }
        OplogOp::Rename {
            from,
            to,
            uuid,
            drop_target,
        } => {
            let mut d = doc! {"op": "rename", "ns": from.to_string(), "to": to.to_string(), "ui": uuid_bson(uuid)};
            if let Some(t) = drop_target {
                d.insert("dropTarget", uuid_bson(t));
            }
            d
        }
        OplogOp::DropDatabase { db } => doc! {"op": "dropDatabase", "db": db.clone()},
        OplogOp::Noop => doc! {"op": "n"},
    }
}

fn op_from_doc(d: &Document) -> std::io::Result<OplogOp> {
    let op = d.get_str("op").map_err(|_| invalid("missing 'op'"))?;
    Ok(match op {
        "i" => OplogOp::Insert {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            doc: Version::packed(&doc_from(d, "o")?),
        },
        "u" => OplogOp::Update {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            pre: Version::packed(&doc_from(d, "pre")?),
            post: Version::packed(&doc_from(d, "o")?),
            description: Arc::new(description_from_doc(&doc_from(d, "d")?)?),
        },
        "r" => OplogOp::Replace {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            pre: Version::packed(&doc_from(d, "pre")?),
            post: Version::packed(&doc_from(d, "o")?),
        },
        "d" => OplogOp::Delete {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            pre: Version::packed(&doc_from(d, "pre")?),
        },
        "create" => OplogOp::Create {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            options: Box::new(doc_from(d, "o")?),
        },
        "createIndexes" => OplogOp::CreateIndexes {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            indexes: docs_from(d, "o")?,
        },
        "dropIndexes" => OplogOp::DropIndexes {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            indexes: docs_from(d, "o")?,
        },
        "collMod" => OplogOp::Modify {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
            changed: Box::new(doc_from(d, "o")?),
            previous: Box::new(doc_from(d, "prev")?),
        },
        "drop" => OplogOp::Drop {
            ns: ns_from(d, "ns")?.into(),
            uuid: uuid_from(d, "ui")?,
        },
        "rename" => OplogOp::Rename {
            from: ns_from(d, "ns")?.into(),
            to: ns_from(d, "to")?.into(),
            uuid: uuid_from(d, "ui")?,
            drop_target: match d.get("dropTarget") {
                Some(_) => Some(uuid_from(d, "dropTarget")?),
                None => None,
            },
        },
        "dropDatabase" => OplogOp::DropDatabase {
            db: d
                .get_str("db")
                .map_err(|_| invalid("missing 'db'"))?
                .to_string(),
        },
        "n" => OplogOp::Noop,
        other => return Err(invalid(format!("unknown journal op '{other}'"))),
    })
}

/// One oplog entry as a journal/snapshot record.
pub fn entry_to_doc(e: &OplogEntry) -> Document {
    let mut d = doc! {
        "seq": e.seq as i64, "ts": e.ts, "wall": e.wall, "x": op_to_doc(&e.op),
        "i": e.txn_op_index as i64, "im": e.images,
    };
    if let Some(t) = &e.txn {
        d.insert("txn", doc! {"lsid": t.lsid.clone(), "n": t.txn_number});
    }
    d
}

/// Appends the encoded record of `e` to `out`.
pub fn encode_entry(e: &OplogEntry, out: &mut Vec<u8>) {
    entry_to_doc(e)
        .to_writer(out)
        .expect("writing BSON to a Vec cannot fail");
}

fn entry_from_doc(d: &Document) -> std::io::Result<OplogEntry> {
    let txn = match d.get_document("txn") {
        Ok(t) => Some(Arc::new(TxnInfo {
            lsid: doc_from(t, "lsid")?,
            txn_number: t.get_i64("n").map_err(|_| invalid("txn.n"))?,
        })),
        Err(_) => None,
    };
    Ok(OplogEntry {
        seq: d.get_i64("seq").map_err(|_| invalid("seq"))? as u64,
        ts: d.get_timestamp("ts").map_err(|_| invalid("ts"))?,
        wall: *d.get_datetime("wall").map_err(|_| invalid("wall"))?,
        op: op_from_doc(&doc_from(d, "x")?)?,
        txn,
        txn_op_index: d.get_i64("i").unwrap_or(0) as u32,
        images: d.get_bool("im").unwrap_or(false),
    })
}

/// Replays one oplog operation onto the catalog (the journal's redo step).
pub fn apply(catalog: &mut Catalog, op: &OplogOp) -> std::io::Result<()> {
    let fail = |e: crate::error::CommandError| invalid(format!("replay: {}", e.message));
    match op {
        OplogOp::Insert { ns, doc, .. } => {
            if let Some(c) = catalog.get_mut(ns) {
                c.insert(doc.document().into_owned(), true).map_err(fail)?;
            }
        }
        OplogOp::Update { ns, post, .. } | OplogOp::Replace { ns, post, .. } => {
            if let Some(c) = catalog.get_mut(ns) {
                c.replace(post.document().into_owned(), None, true)
                    .map_err(fail)?;
            }
        }
        OplogOp::Delete { ns, pre, .. } => {
            if let Some(c) = catalog.get_mut(ns) {
                c.delete(&pre.id().unwrap_or(Bson::Null));
            }
        }
        OplogOp::Create { ns, uuid, options } => {
            let mut c = Collection::new((**ns).clone(), (**options).clone()).map_err(fail)?;
            c.uuid = *uuid;
            catalog.insert(c);
        }
        OplogOp::CreateIndexes { ns, indexes, .. } => {
            if let Some(c) = catalog.get_mut(ns) {
                for spec in indexes {
                    c.add_index(Index::from_spec(spec).map_err(fail)?)
                        .map_err(fail)?;
                }
            }
        }
        OplogOp::DropIndexes { ns, indexes, .. } => {
            if let Some(c) = catalog.get_mut(ns) {
                for spec in indexes {
                    if let Ok(name) = spec.get_str("name") {
                        c.drop_index(name);
                    }
                }
            }
        }
        OplogOp::Modify { ns, changed, .. } => {
            if let Some(c) = catalog.get_mut(ns) {
                let mut options = c.options.clone();
                for (k, v) in changed.iter() {
                    if k == "index" {
                        if let Some(spec) = v.as_document() {
                            c.modify_index(spec);
                        }
                    } else {
                        options.insert(k.clone(), v.clone());
                    }
                }
                c.set_options(options).map_err(fail)?;
            }
        }
        OplogOp::Drop { ns, .. } => {
            catalog.remove(ns);
        }
        OplogOp::Rename {
            from,
            to,
            drop_target,
            ..
        } => {
            if drop_target.is_some() {
                catalog.remove(to);
            }
            if let Some(mut c) = catalog.remove(from) {
                c.set_ns((**to).clone());
                catalog.insert(c);
            }
        }
        OplogOp::DropDatabase { db } => {
            catalog.dbs.remove(db);
        }
        OplogOp::Noop => {}
    }
    Ok(())
}

fn write_snapshot(
    dir: &Path,
    identity: &Identity,
    catalog: &Catalog,
    oplog: &Oplog,
    clock: &ClusterClock,
) -> std::io::Result<()> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let file = File::create(&tmp)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let put = |d: Document, w: &mut BufWriter<File>| -> std::io::Result<()> {
        d.to_writer(w).map_err(|e| invalid(e.to_string()))
    };
    let mut header = doc! {
        "format": FORMAT,
        "setName": identity.set_name.clone(),
        "replicaSetId": identity.replica_set_id,
        "term": identity.term,
        "clock": clock.current(),
        "lastSeq": oplog.last_seq() as i64,
        "droppedThroughSeq": oplog.dropped_through_seq() as i64,
    };
    if let Some(ts) = oplog.dropped_through_ts() {
        header.insert("droppedThroughTs", ts);
    }
    put(header, &mut w)?;
    for colls in catalog.dbs.values() {
        for c in colls.values() {
            let indexes: Vec<Document> = c
                .indexes
                .iter()
                .filter(|i| i.name != "_id_")
                .map(|i| i.spec.clone())
                .collect();
            put(
                doc! {
                    "coll": c.ns.to_string(), "ui": uuid_bson(&c.uuid),
                    "options": c.options.clone(), "indexes": indexes,
                },
                &mut w,
            )?;
            let mut chunk = Vec::with_capacity(DOCS_PER_RECORD);
            for d in c.docs_in_storage_order() {
                chunk.push(Bson::Document((**d).clone()));
                if chunk.len() == DOCS_PER_RECORD {
                    put(
                        doc! {"docs": c.ns.to_string(), "d": std::mem::take(&mut chunk)},
                        &mut w,
                    )?;
                }
            }
            if !chunk.is_empty() {
                put(doc! {"docs": c.ns.to_string(), "d": chunk}, &mut w)?;
            }
            if c.indexes.len() > 1 {
                put(doc! {"built": c.ns.to_string()}, &mut w)?;
            }
        }
    }
    for e in oplog.after(0) {
        put(doc! {"entry": entry_to_doc(e)}, &mut w)?;
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(SNAPSHOT))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads consecutive BSON documents; stops cleanly at the end or at a torn last record and
/// returns the byte offset just past the last whole record.
fn read_records(
    path: &Path,
    mut each: impl FnMut(Document) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut good = 0u64;
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(good),
            Err(e) => return Err(e),
        }
        let n = i32::from_le_bytes(len);
        if n < 5 {
            return Ok(good);
        }
        buf.clear();
        buf.extend_from_slice(&len);
        buf.resize(n as usize, 0);
        match r.read_exact(&mut buf[4..]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(good),
            Err(e) => return Err(e),
        }
        let Ok(d) = Document::from_reader(&mut buf.as_slice()) else {
            return Ok(good);
        };
        each(d)?;
        good += n as u64;
    }
}

/// Opens (or initialises) a data directory and recovers its state.
pub fn open(dir: &Path, set_name: &str, oplog_capacity: usize) -> std::io::Result<Recovered> {
    std::fs::create_dir_all(dir)?;
    let mut catalog = Catalog::default();
    let mut oplog = Oplog::new(oplog_capacity);
    let mut clock = ClusterClock::default();
    let mut identity: Option<Identity> = None;
    let mut snapshot_last_seq = 0u64;
    let mut pending_index_specs: Vec<(Namespace, Vec<Document>)> = Vec::new();
    let snapshot = dir.join(SNAPSHOT);
    let snapshot_len = std::fs::metadata(&snapshot).map(|m| m.len()).unwrap_or(0);
    let read = read_records(&snapshot, |d| {
        if d.contains_key("format") {
            if d.get_i32("format").ok() != Some(FORMAT) {
                return Err(invalid("unknown snapshot format"));
            }
            identity = Some(Identity {
                set_name: d.get_str("setName").unwrap_or_default().to_string(),
                replica_set_id: d
                    .get_object_id("replicaSetId")
                    .map_err(|_| invalid("replicaSetId"))?,
                term: d.get_i64("term").unwrap_or(1),
            });
            clock.restore(d.get_timestamp("clock").map_err(|_| invalid("clock"))?);
            snapshot_last_seq = d.get_i64("lastSeq").unwrap_or(0) as u64;
            oplog.restore_counters(
                snapshot_last_seq,
                d.get_i64("droppedThroughSeq").unwrap_or(0) as u64,
                d.get_timestamp("droppedThroughTs").ok(),
            );
        } else if let Ok(name) = d.get_str("coll") {
            let ns = Namespace::parse(name).map_err(|e| invalid(e.message))?;
            let mut c = Collection::new(ns.clone(), doc_from(&d, "options")?)
                .map_err(|e| invalid(e.message))?;
            c.uuid = uuid_from(&d, "ui")?;
            catalog.insert(c);
            pending_index_specs.push((ns, docs_from(&d, "indexes")?));
        } else if let Ok(name) = d.get_str("docs") {
            let ns = Namespace::parse(name).map_err(|e| invalid(e.message))?;
            let c = catalog
                .get_mut(&ns)
                .ok_or_else(|| invalid("documents of an unknown collection"))?;
            for b in d.get_array("d").map_err(|_| invalid("docs.d"))? {
                if let Bson::Document(doc) = b {
                    c.insert(doc.clone(), true)
                        .map_err(|e| invalid(e.message))?;
                }
            }
        } else if let Ok(entry) = d.get_document("entry") {
            oplog.restore_entry(entry_from_doc(entry)?);
        }
        Ok(())
    })?;
    if read != snapshot_len {
        return Err(invalid(format!(
            "{} is damaged (valid through byte {read} of {snapshot_len})",
            snapshot.display()
        )));
    }
    // Indexes are built after the documents are loaded (unique entries included).
    for (ns, specs) in pending_index_specs {
        let c = catalog.get_mut(&ns).expect("inserted above");
        for spec in specs {
            let index = Index::from_spec(&spec).map_err(|e| invalid(e.message))?;
            c.add_index(index).map_err(|e| invalid(e.message))?;
        }
    }
    let mut identity = identity.unwrap_or_else(|| Identity {
        set_name: set_name.to_string(),
        replica_set_id: ObjectId::new(),
        term: 1,
    });
    if identity.set_name != set_name {
        return Err(invalid(format!(
            "{} holds replica set '{}', not '{set_name}'",
            dir.display(),
            identity.set_name
        )));
    }
    // Redo the journal over the snapshot.
    let journal_path = dir.join(JOURNAL);
    let mut replay_error = None;
    let good = read_records(&journal_path, |d| {
        if let Ok(term) = d.get_i64("term") {
            identity.term = identity.term.max(term);
            return Ok(());
        }
        let e = entry_from_doc(&d)?;
        if e.seq <= oplog.last_seq() {
            return Ok(()); // already in the snapshot (crash between snapshot and truncation)
        }
        if let Err(err) = apply(&mut catalog, &e.op) {
            replay_error.get_or_insert(err);
        }
        clock.restore(e.ts);
        oplog.restore_entry(e);
        Ok(())
    })?;
    if let Some(e) = replay_error {
        return Err(e);
    }
    let journal_len = std::fs::metadata(&journal_path)
        .map(|m| m.len())
        .unwrap_or(0);
    if good != journal_len {
        tracing::warn!(
            valid = good,
            len = journal_len,
            "journal ends in a torn record (crash mid-write); truncating it"
        );
        OpenOptions::new()
            .write(true)
            .open(&journal_path)?
            .set_len(good)?;
    }
    let mut journal = Journal::open(dir)?;
    journal.compact(&identity, &catalog, &oplog, &clock)?;
    oplog.enable_journal();
    Ok(Recovered {
        catalog,
        oplog,
        clock,
        replica_set_id: identity.replica_set_id,
        term: identity.term,
        journal,
    })
}

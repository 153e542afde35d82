//! Forward-only checkpoints, stored in the destination (`<checkpoint.database>.checkpoints`).
//!
//! Guarantee: a checkpoint is written only after the batch it covers was acknowledged by the
//! destination (majority, journaled), and never moves backwards: at-least-once delivery plus
//! idempotent apply means the destination converges across crashes at any point.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::{options::ReadConcern, Collection, Database};

use crate::{
    bounded_write::{BoundedWrites, WriteOutcome},
    error::{ErrorKind, SyncError},
    model::event::ts_key,
};

pub const CHECKPOINTS_COLLECTION: &str = "checkpoints";
/// Applied high-water marks: what a worker may have written past its checkpoint.
pub const APPLY_MARKS_COLLECTION: &str = "apply_marks";
/// Shared change streams' watermarks (DESIGN §2.11): one document per (`sync.id`, stream).
pub const STREAM_CHECKPOINTS_COLLECTION: &str = "stream_checkpoints";

/// A shared stream's watermark checkpoint: where it resumes (the minimum over its workers) and
/// how far each worker that read it had applied (each resumes from the larger of this and its
/// own checkpoint).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamWatermark {
    pub resume_token: Document,
    /// (source namespace, collection UUID) → applied-through token.
    pub positions: Vec<(String, Option<bson::Uuid>, Document)>,
}

/// Where a namespace is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Initial copy in progress (resumable from `copy.last_range`).
    #[default]
    Copying,
    /// Copy finished; applying the change stream.
    Streaming,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Streaming => "streaming",
        }
    }
}

/// Progress of an initial copy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CopyProgress {
    /// Lower bound (inclusive `_id`) of the next range to copy; `None` = from MinKey.
    pub last_range: Option<Bson>,
    pub copied: i64,
    /// All ranges copied.
    pub done: bool,
    /// The `_id` range lanes of a copy cut into parallel parts (`copy.parallel_ranges`);
    /// empty for a copy made as one sequence of ranges (`last_range`).
    pub lanes: Vec<CopyLane>,
}

/// One `_id` lane of a parallel copy: `[next, upper)` is left to copy.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyLane {
    /// Lower bound (inclusive) of the lane's next range; `None` = from MinKey.
    pub next: Option<Bson>,
    /// Upper bound (exclusive) of the lane; `None` = to MaxKey.
    pub upper: Option<Bson>,
    pub done: bool,
}

/// An optional bound as stored: `[]` for none, `[value]` otherwise (an `_id` may be null).
fn bound_to_bson(b: &Option<Bson>) -> Bson {
    Bson::Array(b.iter().cloned().collect())
}

fn bound_from_bson(b: Option<&Bson>) -> Option<Bson> {
    match b {
        Some(Bson::Array(a)) => a.first().cloned(),
        _ => None,
    }
}

impl CopyLane {
    fn to_document(&self) -> Document {
        doc! {"next": bound_to_bson(&self.next), "upper": bound_to_bson(&self.upper), "done": self.done}
    }

    fn from_document(d: &Document) -> CopyLane {
        CopyLane {
            next: bound_from_bson(d.get("next")),
            upper: bound_from_bson(d.get("upper")),
            done: d.get_bool("done").unwrap_or(false),
        }
    }
}

/// One namespace's checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub phase: Phase,
    /// `_id` of the last event of the last acknowledged batch (or an idle postBatchResumeToken).
    pub resume_token: Option<Document>,
    /// Cluster time of `resume_token` (informational; never used to resume).
    pub applied_through: Option<Timestamp>,
    /// The stream position taken before the copy started (T0).
    pub start_token: Option<Document>,
    pub copy: CopyProgress,
    /// Events up to this cluster time are replays of what the copy already wrote.
    pub replay_until: Option<Timestamp>,
    /// Unique indexes wait until replay has passed `replay_until`.
    pub unique_indexes_pending: bool,
    /// TTL indexes created with expiry disabled: index name → original `expireAfterSeconds`.
    pub ttl_indexes: Document,
    /// Consecutive re-copies caused by history loss.
    pub history_lost_recopies: i32,
    /// The destination namespace (`db.coll`) this checkpoint's copy and events were written
    /// to; a different target (`sync.rename` changed) needs a new copy. `None` in checkpoints
    /// written before it was recorded.
    pub target: Option<String>,
    /// A force-sync in progress: the lower bound of its next range (`Some(None)` = from
    /// MinKey), so a restart resumes it there instead of dropping or restarting it.
    pub reconcile_next: Option<Option<Bson>>,
    /// The validation options (`validator`, `validationLevel`, `validationAction`) this daemon
    /// last gave the destination collection. A destination that still carries them is aligned
    /// with the source's at every start; one carrying others was changed by someone else and
    /// is left alone. Survives re-copies of the same incarnation.
    pub destination_validation: Option<Document>,
    /// The validation options mongo-syncd is about to give the destination (persisted before
    /// the `create`/`collMod`, cleared after it): a crash in between still counts them as its own.
    pub destination_validation_next: Option<Document>,
    /// `_id`s of copied documents a unique index refused (E11000) while a copy, force-sync or
    /// repair was still writing: retried from the source later, dead-lettered only if they
    /// still conflict once replay has caught up (see `unique_conflicts`).
    pub copy_duplicates: Vec<Bson>,
    /// Names of the destination indexes mongo-syncd created from the source's. A re-copy drops
    /// those the source no longer has; any other destination index is someone else's and stays.
    /// Survives re-copies of the same incarnation.
    pub destination_indexes: Vec<String>,
    pub updated_at: Option<DateTime>,
}

/// The last event of a batch about to be applied, persisted before its writes are sent:
/// after a crash between the batch and its checkpoint, the re-read events up to and including
/// this one are replays (DESIGN §2.3 step 5). Events sharing one cluster time (a transaction)
/// are told apart by the token.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyMark {
    pub cluster_time: Timestamp,
    pub token: Document,
}

/// Identifies a checkpoint: pipeline, source namespace, collection incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointKey {
    pub sync_id: String,
    /// `db.coll` on the source.
    pub ns: String,
    pub uuid: Option<bson::Uuid>,
}

impl CheckpointKey {
    fn id(&self) -> Document {
        doc! {
            "sync_id": self.sync_id.clone(),
            "ns": self.ns.clone(),
            "uuid": self.uuid.map(|u| Bson::Binary(bson::Binary::from_uuid(u))).unwrap_or(Bson::Null),
        }
    }

    fn from_id(id: &Document) -> Option<CheckpointKey> {
        Some(CheckpointKey {
            sync_id: id.get_str("sync_id").ok()?.to_string(),
            ns: id.get_str("ns").ok()?.to_string(),
            uuid: match id.get("uuid") {
                Some(Bson::Binary(b)) => b.to_uuid().ok(),
                _ => None,
            },
        })
    }
}

impl Checkpoint {
    /// This checkpoint, keeping what an earlier one of the same incarnation recorded about the
    /// destination state mongo-syncd owns (validation options, indexes): a re-copy must know
    /// what it may change there.
    pub fn owning_destination_state_of(self, old: Option<Checkpoint>) -> Checkpoint {
        match old {
            Some(old) => Checkpoint {
                destination_validation: old.destination_validation,
                destination_validation_next: old.destination_validation_next,
                destination_indexes: old.destination_indexes,
                ..self
            },
            None => self,
        }
    }

    pub fn to_document(&self, key: &CheckpointKey) -> Document {
        let opt_doc = |d: &Option<Document>| d.clone().map(Bson::Document).unwrap_or(Bson::Null);
        let opt_ts = |t: &Option<Timestamp>| t.map(Bson::Timestamp).unwrap_or(Bson::Null);
        doc! {
            "_id": key.id(),
            "phase": self.phase.as_str(),
            "resume_token": opt_doc(&self.resume_token),
            "applied_through": opt_ts(&self.applied_through),
            "start_token": opt_doc(&self.start_token),
            "copy": {
                "last_range": self.copy.last_range.clone().unwrap_or(Bson::Null),
                "copied": self.copy.copied,
                "done": self.copy.done,
                "lanes": self.copy.lanes.iter().map(|l| Bson::Document(l.to_document())).collect::<Vec<_>>(),
            },
            "replay_until": opt_ts(&self.replay_until),
            "unique_indexes_pending": self.unique_indexes_pending,
            "ttl_indexes": self.ttl_indexes.clone(),
            "history_lost_recopies": self.history_lost_recopies,
            "target": self.target.clone().map(Bson::String).unwrap_or(Bson::Null),
            "reconcile": match &self.reconcile_next {
                Some(next) => Bson::Document(doc! {"next": next.clone().unwrap_or(Bson::Null)}),
                None => Bson::Null,
            },
            "destination_validation": opt_doc(&self.destination_validation),
            "destination_validation_next": opt_doc(&self.destination_validation_next),
            "copy_duplicates": self.copy_duplicates.clone(),
            "destination_indexes": self.destination_indexes.clone(),
            "updated_at": DateTime::now(),
        }
    }

    pub fn from_document(d: &Document) -> Checkpoint {
        let ts = |k: &str| match d.get(k) {
            Some(Bson::Timestamp(t)) => Some(*t),
            _ => None,
        };
        let copy = d.get_document("copy").ok();
        Checkpoint {
            phase: if d.get_str("phase").ok() == Some("streaming") {
                Phase::Streaming
            } else {
                Phase::Copying
            },
            resume_token: d.get_document("resume_token").ok().cloned(),
            applied_through: ts("applied_through"),
            start_token: d.get_document("start_token").ok().cloned(),
            copy: CopyProgress {
                last_range: copy
                    .and_then(|c| c.get("last_range"))
                    .filter(|b| !matches!(b, Bson::Null))
                    .cloned(),
                copied: copy.and_then(|c| c.get_i64("copied").ok()).unwrap_or(0),
                done: copy.and_then(|c| c.get_bool("done").ok()).unwrap_or(false),
                lanes: copy
                    .and_then(|c| c.get_array("lanes").ok())
                    .map(|a| {
                        a.iter()
                            .filter_map(|l| l.as_document().map(CopyLane::from_document))
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            replay_until: ts("replay_until"),
            unique_indexes_pending: d.get_bool("unique_indexes_pending").unwrap_or(false),
            ttl_indexes: d.get_document("ttl_indexes").cloned().unwrap_or_default(),
            history_lost_recopies: d.get_i32("history_lost_recopies").unwrap_or(0),
            target: d.get_str("target").ok().map(str::to_owned),
            reconcile_next: d
                .get_document("reconcile")
                .ok()
                .map(|r| r.get("next").filter(|b| !matches!(b, Bson::Null)).cloned()),
            destination_validation: d.get_document("destination_validation").ok().cloned(),
            destination_validation_next: d
                .get_document("destination_validation_next")
                .ok()
                .cloned(),
            copy_duplicates: d.get_array("copy_duplicates").cloned().unwrap_or_default(),
            destination_indexes: d
                .get_array("destination_indexes")
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            updated_at: d.get_datetime("updated_at").ok().copied(),
        }
    }
}

/// Checkpoints in the destination's metadata database. Reads are majority; writes go through
/// [`BoundedWrites`] (majority, journaled, bounded by `destination.socket_timeout_ms`).
#[derive(Clone)]
pub struct CheckpointStore {
    coll: Collection<Document>,
    marks: Collection<Document>,
    streams: Collection<Document>,
    writes: BoundedWrites,
    /// The lease epoch every write is conditional on (`ha.enabled`, DESIGN §2.12): a write
    /// meets no document stamped by a later epoch.
    epoch: Option<i64>,
    /// `ha.fencing = "transaction"`: a streaming batch and its checkpoint are written in one
    /// destination transaction ([`fencing_write`](Self::fencing_write)).
    transaction_fencing: bool,
}

fn checkpoint_error(context: &str, err: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::Checkpoint, context, err)
}

impl CheckpointStore {
    pub fn new(metadata_db: &Database, op_timeout: Option<Duration>) -> CheckpointStore {
        let options = || {
            mongodb::options::CollectionOptions::builder()
                .read_concern(ReadConcern::majority())
                .build()
        };
        CheckpointStore {
            coll: metadata_db.collection_with_options(CHECKPOINTS_COLLECTION, options()),
            marks: metadata_db.collection_with_options(APPLY_MARKS_COLLECTION, options()),
            streams: metadata_db.collection_with_options(STREAM_CHECKPOINTS_COLLECTION, options()),
            writes: BoundedWrites::new(metadata_db, op_timeout, ErrorKind::Checkpoint),
            epoch: None,
            transaction_fencing: false,
        }
    }

    /// The same store, fencing streaming batches with destination transactions.
    pub fn with_transaction_fencing(mut self) -> CheckpointStore {
        self.transaction_fencing = true;
        self
    }

    /// Whether streaming batches are written with their checkpoint in one transaction.
    pub fn fences_by_transaction(&self) -> bool {
        self.transaction_fencing && self.epoch.is_some()
    }

    /// Under `ha.fencing = "transaction"` with a lease held: the checkpoint write of a batch,
    /// to run in the batch's destination transaction. Its filter holds only while no later
    /// epoch has stamped the checkpoint (and `applied_through` does not move backwards); its
    /// failure aborts the transaction.
    pub fn fencing_write(
        &self,
        key: &CheckpointKey,
        cp: &Checkpoint,
    ) -> Result<Option<crate::model::transaction::TxnWrite>, SyncError> {
        if !self.transaction_fencing || self.epoch.is_none() {
            return Ok(None);
        }
        let mut filter = doc! {"_id": key.id()};
        if let Some(ts) = cp.applied_through {
            filter.insert(
                "$or",
                vec![
                    doc! {"applied_through": {"$lte": ts}},
                    doc! {"applied_through": Bson::Null},
                ],
            );
        }
        let statement = doc! {
            "q": self.fenced(filter),
            "u": self.stamped(cp.to_document(key)),
            "upsert": true,
        };
        let statement = bson::RawDocumentBuf::try_from(&statement).map_err(|e| {
            SyncError::with_source(
                ErrorKind::InvariantViolated,
                "encoding a checkpoint write",
                e,
            )
        })?;
        let namespace = self.coll.namespace();
        Ok(Some(crate::model::transaction::TxnWrite {
            db: namespace.db,
            coll: namespace.coll,
            command: "update",
            statement,
            must_match: false,
            bypass_validation: false,
            fence: true,
        }))
    }

    /// The same store, writing as the holder of lease `epoch`.
    pub fn with_epoch(mut self, epoch: i64) -> CheckpointStore {
        self.epoch = Some(epoch);
        self
    }

    /// `filter`, restricted to documents no later epoch has stamped.
    fn fenced(&self, mut filter: Document) -> Document {
        if let Some(epoch) = self.epoch {
            filter.insert(
                "$and",
                vec![doc! {"$or": [{"epoch": {"$lte": epoch}}, {"epoch": {"$exists": false}}]}],
            );
        }
        filter
    }

    /// `document`, stamped with this store's epoch.
    fn stamped(&self, mut document: Document) -> Document {
        if let Some(epoch) = self.epoch {
            document.insert("epoch", epoch);
        }
        document
    }

    /// A write met a document of a later epoch: another instance holds the lease now.
    fn fenced_out(&self, what: &str) -> SyncError {
        SyncError::new(
            ErrorKind::Cancelled,
            format!(
                "{what} refused: another instance took the lease over (epoch after {})",
                self.epoch.unwrap_or(0)
            ),
        )
    }

    /// Stamps every checkpoint of `sync_id` with this store's epoch, so a deposed owner's
    /// checkpoint writes (conditional on its older epoch) fail from now on.
    pub async fn stamp_epoch(&self, sync_id: &str) -> Result<(), SyncError> {
        let Some(epoch) = self.epoch else {
            return Ok(());
        };
        let older = doc! {"_id.sync_id": sync_id, "$or": [{"epoch": {"$lt": epoch}}, {"epoch": {"$exists": false}}]};
        for coll in [
            CHECKPOINTS_COLLECTION,
            APPLY_MARKS_COLLECTION,
            STREAM_CHECKPOINTS_COLLECTION,
        ] {
            self.writes
                .update_many(
                    coll,
                    older.clone(),
                    doc! {"$set": {"epoch": epoch}},
                    "stamping checkpoints with the lease epoch",
                )
                .await?;
        }
        Ok(())
    }

    /// [`stamp_epoch`](Self::stamp_epoch) for one partition (`ha.partitions`): only the
    /// checkpoints and marks of the namespaces `owns` accepts, and the stream watermarks named
    /// with `stream_prefix`. Other partitions' documents keep their owners' epochs.
    pub async fn stamp_partition_epoch(
        &self,
        sync_id: &str,
        owns: impl Fn(&str) -> bool,
        stream_prefix: &str,
    ) -> Result<(), SyncError> {
        let Some(epoch) = self.epoch else {
            return Ok(());
        };
        let older = doc! {"$or": [{"epoch": {"$lt": epoch}}, {"epoch": {"$exists": false}}]};
        for (coll, field, handle) in [
            (CHECKPOINTS_COLLECTION, "ns", &self.coll),
            (APPLY_MARKS_COLLECTION, "ns", &self.marks),
            (STREAM_CHECKPOINTS_COLLECTION, "stream", &self.streams),
        ] {
            let path = format!("_id.{field}");
            let names = handle
                .distinct(&path, doc! {"_id.sync_id": sync_id})
                .await
                .map_err(|e| checkpoint_error("listing checkpoints to stamp", e))?;
            let owned: Vec<&str> = names
                .iter()
                .filter_map(Bson::as_str)
                .filter(|name| match field {
                    "stream" => name.starts_with(stream_prefix),
                    _ => owns(name),
                })
                .collect();
            if owned.is_empty() {
                continue;
            }
            let mut filter = doc! {"_id.sync_id": sync_id, path: {"$in": owned}};
            filter.extend(older.clone());
            self.writes
                .update_many(
                    coll,
                    filter,
                    doc! {"$set": {"epoch": epoch}},
                    "stamping a partition's checkpoints with the lease epoch",
                )
                .await?;
        }
        Ok(())
    }

    /// Persists the applied high-water mark of a batch before its writes are sent.
    pub async fn save_mark(&self, key: &CheckpointKey, mark: &ApplyMark) -> Result<(), SyncError> {
        let outcome = self
            .writes
            .replace(
                APPLY_MARKS_COLLECTION,
                self.fenced(doc! {"_id": key.id()}),
                self.stamped(doc! {"_id": key.id(), "cluster_time": mark.cluster_time, "token": mark.token.clone(), "updated_at": DateTime::now()}),
                true,
                "saving the applied high-water mark",
            )
            .await?;
        match outcome {
            WriteOutcome::DuplicateKey => {
                Err(self.fenced_out("saving the applied high-water mark"))
            }
            WriteOutcome::Done { .. } => Ok(()),
        }
    }

    /// The applied high-water mark of a namespace, if any.
    pub async fn load_mark(&self, key: &CheckpointKey) -> Result<Option<ApplyMark>, SyncError> {
        let found = self
            .marks
            .find_one(doc! {"_id": key.id()})
            .await
            .map_err(|e| checkpoint_error("loading the applied high-water mark", e))?;
        Ok(found.and_then(|d| {
            Some(ApplyMark {
                cluster_time: d.get_timestamp("cluster_time").ok()?,
                token: d.get_document("token").ok()?.clone(),
            })
        }))
    }

    pub async fn load(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, SyncError> {
        let found = self
            .coll
            .find_one(doc! {"_id": key.id()})
            .await
            .map_err(|e| checkpoint_error("loading checkpoint", e))?;
        Ok(found.map(|d| Checkpoint::from_document(&d)))
    }

    /// Every checkpoint of a pipeline.
    pub async fn list(&self, sync_id: &str) -> Result<Vec<(CheckpointKey, Checkpoint)>, SyncError> {
        use futures::TryStreamExt;
        let docs: Vec<Document> = self
            .coll
            .find(doc! {"_id.sync_id": sync_id})
            .await
            .map_err(|e| checkpoint_error("listing checkpoints", e))?
            .try_collect()
            .await
            .map_err(|e| checkpoint_error("listing checkpoints", e))?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                let key = CheckpointKey::from_id(d.get_document("_id").ok()?)?;
                Some((key, Checkpoint::from_document(d)))
            })
            .collect())
    }

    /// Saves a checkpoint, refusing to move `applied_through` backwards.
    pub async fn save(&self, key: &CheckpointKey, cp: &Checkpoint) -> Result<(), SyncError> {
        let mut filter = doc! {"_id": key.id()};
        match cp.applied_through {
            Some(ts) => {
                filter.insert(
                    "$or",
                    vec![
                        doc! {"applied_through": {"$lte": ts}},
                        doc! {"applied_through": Bson::Null},
                    ],
                );
            }
            None => {
                filter.insert("applied_through", Bson::Null);
            }
        }
        let outcome = self
            .writes
            .replace(
                CHECKPOINTS_COLLECTION,
                self.fenced(filter),
                self.stamped(cp.to_document(key)),
                true,
                "saving checkpoint",
            )
            .await?;
        match outcome {
            WriteOutcome::DuplicateKey
                if self.stamped_later(CHECKPOINTS_COLLECTION, key).await? =>
            {
                Err(self.fenced_out("saving checkpoint"))
            }
            // The filter missed a newer checkpoint and the upsert collided with it.
            WriteOutcome::DuplicateKey => Err(SyncError::new(
                ErrorKind::InvariantViolated,
                format!("checkpoint of {} would move backwards; refused", key.ns),
            )),
            WriteOutcome::Done { .. } => Ok(()),
        }
    }

    /// True when the document of `key` in `coll` carries an epoch later than this store's.
    async fn stamped_later(&self, coll: &str, key: &CheckpointKey) -> Result<bool, SyncError> {
        let Some(epoch) = self.epoch else {
            return Ok(false);
        };
        let collection = match coll {
            CHECKPOINTS_COLLECTION => &self.coll,
            _ => &self.marks,
        };
        Ok(collection
            .find_one(doc! {"_id": key.id(), "epoch": {"$gt": epoch}})
            .await
            .map_err(|e| checkpoint_error("reading a checkpoint's epoch", e))?
            .is_some())
    }

    /// Replaces a checkpoint unconditionally (but for the lease epoch): only for deliberate
    /// restarts of a namespace (re-copy after history loss, force-sync of a parked worker, a
    /// new collection).
    pub async fn reset(&self, key: &CheckpointKey, cp: &Checkpoint) -> Result<(), SyncError> {
        let outcome = self
            .writes
            .replace(
                CHECKPOINTS_COLLECTION,
                self.fenced(doc! {"_id": key.id()}),
                self.stamped(cp.to_document(key)),
                true,
                "resetting checkpoint",
            )
            .await?;
        match outcome {
            WriteOutcome::DuplicateKey => Err(self.fenced_out("resetting checkpoint")),
            WriteOutcome::Done { .. } => Ok(()),
        }
    }

    pub async fn delete(&self, key: &CheckpointKey) -> Result<(), SyncError> {
        self.delete_matching(doc! {"_id": key.id()}, "deleting checkpoint")
            .await?;
        Ok(())
    }

    /// Deletes checkpoints of `ns` that belong to other incarnations of the collection.
    pub async fn delete_stale(&self, key: &CheckpointKey) -> Result<u64, SyncError> {
        let uuid = key
            .uuid
            .map(|u| Bson::Binary(bson::Binary::from_uuid(u)))
            .unwrap_or(Bson::Null);
        let stale = doc! {"_id.sync_id": key.sync_id.clone(), "_id.ns": key.ns.clone(), "_id.uuid": {"$ne": uuid}};
        self.delete_matching(stale, "deleting stale checkpoints")
            .await
    }

    /// Deletes the checkpoints matching `filter` and their applied high-water marks; returns
    /// how many checkpoints.
    async fn delete_matching(&self, filter: Document, what: &str) -> Result<u64, SyncError> {
        let filter = self.fenced(filter);
        let deleted = self
            .writes
            .delete_many(CHECKPOINTS_COLLECTION, filter.clone(), what)
            .await?;
        self.writes
            .delete_many(APPLY_MARKS_COLLECTION, filter, what)
            .await?;
        Ok(deleted)
    }

    /// Deletes every checkpoint of a pipeline (`--reset-identity`), shared streams' included.
    pub async fn delete_all(&self, sync_id: &str) -> Result<u64, SyncError> {
        self.writes
            .delete_many(
                STREAM_CHECKPOINTS_COLLECTION,
                self.fenced(doc! {"_id.sync_id": sync_id}),
                "deleting stream checkpoints",
            )
            .await?;
        self.delete_matching(doc! {"_id.sync_id": sync_id}, "deleting checkpoints")
            .await
    }

    /// Persists a shared stream's watermark (majority, like every checkpoint).
    pub async fn save_stream(
        &self,
        sync_id: &str,
        stream: &str,
        watermark: &StreamWatermark,
    ) -> Result<(), SyncError> {
        let id = doc! {"sync_id": sync_id, "stream": stream};
        let positions: Vec<Document> = watermark
            .positions
            .iter()
            .map(|(ns, uuid, token)| {
                doc! {
                    "ns": ns.clone(),
                    "uuid": uuid.map(|u| Bson::Binary(bson::Binary::from_uuid(u))).unwrap_or(Bson::Null),
                    "token": token.clone(),
                }
            })
            .collect();
        let outcome = self
            .writes
            .replace(
                STREAM_CHECKPOINTS_COLLECTION,
                self.fenced(doc! {"_id": id.clone()}),
                self.stamped(doc! {
                    "_id": id,
                    "resume_token": watermark.resume_token.clone(),
                    "positions": positions,
                    "updated_at": DateTime::now(),
                }),
                true,
                "saving a shared stream's watermark",
            )
            .await?;
        match outcome {
            WriteOutcome::DuplicateKey => {
                Err(self.fenced_out("saving a shared stream's watermark"))
            }
            WriteOutcome::Done { .. } => Ok(()),
        }
    }

    /// A shared stream's watermark, if one was saved.
    pub async fn load_stream(
        &self,
        sync_id: &str,
        stream: &str,
    ) -> Result<Option<StreamWatermark>, SyncError> {
        let found = self
            .streams
            .find_one(doc! {"_id": {"sync_id": sync_id, "stream": stream}})
            .await
            .map_err(|e| checkpoint_error("loading a shared stream's watermark", e))?;
        Ok(found.and_then(|d| {
            let resume_token = d.get_document("resume_token").ok()?.clone();
            let positions = d
                .get_array("positions")
                .map(|a| {
                    a.iter()
                        .filter_map(|p| {
                            let p = p.as_document()?;
                            let uuid = match p.get("uuid") {
                                Some(Bson::Binary(b)) => b.to_uuid().ok(),
                                _ => None,
                            };
                            Some((
                                p.get_str("ns").ok()?.to_string(),
                                uuid,
                                p.get_document("token").ok()?.clone(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(StreamWatermark {
                resume_token,
                positions,
            })
        }))
    }

    /// How far a shared stream's last watermark says `key`'s namespace had applied (a quiet
    /// member's own checkpoint does not move; DESIGN §2.11).
    pub async fn applied_by_shared_stream(
        &self,
        key: &CheckpointKey,
    ) -> Result<Option<Timestamp>, SyncError> {
        let found = self
            .streams
            .find_one(doc! {"_id.sync_id": key.sync_id.clone(), "positions.ns": key.ns.clone()})
            .await
            .map_err(|e| checkpoint_error("loading a shared stream's watermark", e))?;
        let Some(found) = found else {
            return Ok(None);
        };
        let uuid = key
            .uuid
            .map(|u| Bson::Binary(bson::Binary::from_uuid(u)))
            .unwrap_or(Bson::Null);
        Ok(found
            .get_array("positions")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Bson::as_document)
            .filter(|p| p.get_str("ns").ok() == Some(key.ns.as_str()))
            .filter(|p| p.get("uuid").unwrap_or(&Bson::Null) == &uuid)
            .filter_map(|p| p.get_document("token").ok())
            .filter_map(crate::model::event::raw_token)
            .filter_map(|t| crate::model::event::token_cluster_time(&t))
            .max_by_key(|ts| ts_key(*ts)))
    }

    /// Forgets a shared stream's watermark (its history was lost: it starts again at "now").
    pub async fn delete_stream(&self, sync_id: &str, stream: &str) -> Result<(), SyncError> {
        self.writes
            .delete_many(
                STREAM_CHECKPOINTS_COLLECTION,
                self.fenced(doc! {"_id": {"sync_id": sync_id, "stream": stream}}),
                "deleting a shared stream's watermark",
            )
            .await?;
        Ok(())
    }
}

/// True when `a` is at or after `b`.
pub fn at_or_after(a: Timestamp, b: Timestamp) -> bool {
    ts_key(a) >= ts_key(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_round_trip() {
        let key = CheckpointKey {
            sync_id: "default".into(),
            ns: "d.c".into(),
            uuid: Some(bson::Uuid::new()),
        };
        let cp = Checkpoint {
            phase: Phase::Streaming,
            resume_token: Some(doc! {"_data": "82AB"}),
            applied_through: Some(Timestamp {
                time: 5,
                increment: 1,
            }),
            start_token: Some(doc! {"_data": "8201"}),
            copy: CopyProgress {
                last_range: Some(Bson::Int32(10)),
                copied: 10,
                done: true,
                // A null `_id` is a bound like any other.
                lanes: vec![
                    CopyLane {
                        next: None,
                        upper: Some(Bson::Null),
                        done: true,
                    },
                    CopyLane {
                        next: Some(Bson::Null),
                        upper: Some(Bson::String("m".into())),
                        done: false,
                    },
                    CopyLane {
                        next: Some(Bson::String("q".into())),
                        upper: None,
                        done: false,
                    },
                ],
            },
            replay_until: Some(Timestamp {
                time: 4,
                increment: 9,
            }),
            unique_indexes_pending: true,
            ttl_indexes: doc! {"ttl_1": 60},
            history_lost_recopies: 1,
            target: Some("x.y".into()),
            reconcile_next: Some(Some(Bson::Int32(7))),
            destination_validation: Some(doc! {"validator": {"n": {"$gte": 1}}}),
            destination_validation_next: Some(doc! {"validator": {"n": {"$gte": 2}}}),
            copy_duplicates: vec![Bson::Int64(1 << 60), Bson::String("x".into())],
            destination_indexes: vec!["email_1".into()],
            updated_at: None,
        };
        let d = cp.to_document(&key);
        let mut back = Checkpoint::from_document(&d);
        assert!(back.updated_at.is_some());
        back.updated_at = None;
        assert_eq!(back, cp);
        assert_eq!(
            CheckpointKey::from_id(d.get_document("_id").unwrap()).unwrap(),
            key
        );
    }
}

//! The daemon's own records in the destination's metadata database (besides checkpoints):
//! the source identity and dead letters.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document, RawDocument, Timestamp};
use mongodb::{Collection, Database};
use sha2::{Digest, Sha256};

use crate::{
    bounded_write::BoundedWrites,
    error::{ErrorKind, SyncError},
};

pub const IDENTITY_COLLECTION: &str = "identity";
pub const DEAD_LETTERS_COLLECTION: &str = "dead_letters";
pub const CONFLICTS_COLLECTION: &str = "conflicts";
/// Documents above this size are dead-lettered as `_id` + SHA-256 only.
pub const DEAD_LETTER_MAX_DOCUMENT_BYTES: usize = 4 * 1024 * 1024;

/// What identifies a source deployment (DESIGN §2.1): the replica set's `replicaSetId`, or,
/// where `replSetGetConfig` is not permitted, the set name plus its host list.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceIdentity {
    pub replica_set_id: Option<bson::oid::ObjectId>,
    pub set_name: Option<String>,
    pub hosts: Vec<String>,
}

impl SourceIdentity {
    pub(crate) fn to_document(&self) -> Document {
        doc! {
            "replica_set_id": self.replica_set_id.map(Bson::ObjectId).unwrap_or(Bson::Null),
            "set_name": self.set_name.clone().map(Bson::String).unwrap_or(Bson::Null),
            "hosts": self.hosts.clone(),
        }
    }

    pub(crate) fn from_document(d: &Document) -> SourceIdentity {
        SourceIdentity {
            replica_set_id: d.get_object_id("replica_set_id").ok(),
            set_name: d.get_str("set_name").ok().map(str::to_string),
            hosts: d
                .get_array("hosts")
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Same deployment? The replica set id decides when both sides have one.
    pub fn matches(&self, other: &SourceIdentity) -> bool {
        match (self.replica_set_id, other.replica_set_id) {
            (Some(a), Some(b)) => a == b,
            _ => self.set_name == other.set_name && self.hosts == other.hosts,
        }
    }

    pub fn describe(&self) -> String {
        match self.replica_set_id {
            Some(id) => format!("replica set id {id}"),
            None => format!(
                "replica set {:?} on {}",
                self.set_name.as_deref().unwrap_or("?"),
                self.hosts.join(",")
            ),
        }
    }
}

/// Outcome of the identity check at start-up.
#[derive(Debug, PartialEq)]
pub enum IdentityCheck {
    /// First start of this pipeline: identity recorded.
    Recorded,
    Matches,
    /// `--reset-identity`: the new source was accepted (checkpoints must be discarded).
    Reset,
}

#[derive(Clone)]
pub struct Metadata {
    identity: Collection<Document>,
    dead_letters: Collection<Document>,
    /// Every write (majority, journaled, bounded by `destination.socket_timeout_ms`).
    writes: BoundedWrites,
}

/// A document as journaled: itself, or `_id` + SHA-256 when it is over 4 MB.
fn journal_version(doc: Option<&RawDocument>) -> Result<Bson, SyncError> {
    let Some(raw) = doc else {
        return Ok(Bson::Null);
    };
    let bytes = raw.as_bytes();
    if bytes.len() > DEAD_LETTER_MAX_DOCUMENT_BYTES {
        return Ok(Bson::Document(doc! {
            "_id": raw.get("_id").ok().flatten().and_then(|v| Bson::try_from(v).ok()).unwrap_or(Bson::Null),
            "sha256": hex::encode(Sha256::digest(bytes)),
            "size_bytes": bytes.len() as i64,
        }));
    }
    let parsed: Document = raw.try_into().map_err(|e| {
        SyncError::with_source(
            ErrorKind::InvariantViolated,
            "decoding a journaled document",
            e,
        )
    })?;
    Ok(Bson::Document(parsed))
}

fn meta_error(context: &str, err: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::DestinationWrite, context, err)
}

impl Metadata {
    pub fn new(db: &Database, op_timeout: Option<Duration>) -> Metadata {
        Metadata {
            identity: db.collection(IDENTITY_COLLECTION),
            dead_letters: db.collection(DEAD_LETTERS_COLLECTION),
            writes: BoundedWrites::new(db, op_timeout, ErrorKind::DestinationWrite),
        }
    }

    /// Compares the source with the identity recorded by an earlier start.
    pub async fn check_identity(
        &self,
        sync_id: &str,
        observed: &SourceIdentity,
        reset: bool,
    ) -> Result<IdentityCheck, SyncError> {
        let stored = self
            .identity
            .find_one(doc! {"_id": sync_id})
            .await
            .map_err(|e| meta_error("reading source identity", e))?;
        let record = || {
            let mut d = observed.to_document();
            d.insert("_id", sync_id);
            d.insert("recorded_at", DateTime::now());
            self.writes.replace(
                IDENTITY_COLLECTION,
                doc! {"_id": sync_id},
                d,
                true,
                "recording source identity",
            )
        };
        match stored {
            None => {
                // Only if still absent: an instance starting at the same time (ha.partitions)
                // may have recorded it, and a replacement would erase its metadata epoch.
                let mut d = observed.to_document();
                d.insert("recorded_at", DateTime::now());
                self.writes
                    .update(
                        IDENTITY_COLLECTION,
                        doc! {"_id": sync_id},
                        doc! {"$setOnInsert": d},
                        true,
                        "recording source identity",
                    )
                    .await?;
                let now = self
                    .identity
                    .find_one(doc! {"_id": sync_id})
                    .await
                    .map_err(|e| meta_error("reading source identity", e))?
                    .unwrap_or_default();
                if SourceIdentity::from_document(&now).matches(observed) {
                    Ok(IdentityCheck::Recorded)
                } else {
                    Err(SyncError::new(
                        ErrorKind::SourceIdentityMismatch,
                        format!(
                            "the source is {} but another instance of pipeline {sync_id:?} has just recorded {}",
                            observed.describe(),
                            SourceIdentity::from_document(&now).describe()
                        ),
                    ))
                }
            }
            Some(d) if SourceIdentity::from_document(&d).matches(observed) => Ok(IdentityCheck::Matches),
            Some(_) if reset => {
                record().await?;
                Ok(IdentityCheck::Reset)
            }
            Some(d) => Err(SyncError::new(
                ErrorKind::SourceIdentityMismatch,
                format!(
                    "the source is {} but pipeline {sync_id:?} was started against {}; refusing to resume with foreign resume tokens (run with --reset-identity to accept the new source and re-copy)",
                    observed.describe(),
                    SourceIdentity::from_document(&d).describe()
                ),
            )),
        }
    }

    /// Records a document the destination rejected, so one bad document never stalls a stream.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        sync_id: &str,
        ns: &str,
        doc_id: &Bson,
        op: &str,
        document: Option<&RawDocument>,
        code: i32,
        message: &str,
        cluster_time: Option<Timestamp>,
    ) -> Result<(), SyncError> {
        let mut d = doc! {
            "sync_id": sync_id,
            "ns": ns,
            "doc_id": doc_id.clone(),
            "op": op,
            "error": {"code": code, "message": message},
            "cluster_time": cluster_time.map(Bson::Timestamp).unwrap_or(Bson::Null),
            "at": DateTime::now(),
        };
        if let Some(raw) = document {
            let bytes = raw.as_bytes();
            d.insert("size_bytes", bytes.len() as i64);
            if bytes.len() > DEAD_LETTER_MAX_DOCUMENT_BYTES {
                d.insert("document_sha256", hex::encode(Sha256::digest(bytes)));
            } else {
                let parsed: Document = raw.try_into().map_err(|e| {
                    SyncError::with_source(
                        ErrorKind::InvariantViolated,
                        "decoding rejected document",
                        e,
                    )
                })?;
                d.insert("document", parsed);
            }
        }
        self.writes
            .insert(DEAD_LETTERS_COLLECTION, d, "recording dead letter")
            .await?;
        Ok(())
    }

    /// Journals a source write a conflict policy did not apply, with both versions.
    #[allow(clippy::too_many_arguments)]
    pub async fn conflict(
        &self,
        sync_id: &str,
        ns: &str,
        doc_id: &Bson,
        policy: &str,
        outcome: &str,
        op: &str,
        source: Option<&RawDocument>,
        destination: Option<&RawDocument>,
        cluster_time: Timestamp,
    ) -> Result<(), SyncError> {
        let d = doc! {
            "sync_id": sync_id,
            "ns": ns,
            "doc_id": doc_id.clone(),
            "policy": policy,
            "outcome": outcome,
            "op": op,
            "source": journal_version(source)?,
            "destination": journal_version(destination)?,
            "cluster_time": cluster_time,
            "at": DateTime::now(),
        };
        self.writes
            .insert(CONFLICTS_COLLECTION, d, "journaling a conflict")
            .await?;
        Ok(())
    }

    pub fn dead_letters(&self) -> &Collection<Document> {
        &self.dead_letters
    }
}

//! The lease document and its conditional writes (DESIGN §2.12).
//!
//! One document per (`sync.id`, partition) in `<checkpoint.database>.leases`:
//! `{_id: {sync_id, partition}, owner, address, epoch, released, acquired_at, renewed_at,
//! expires_at}`. Expiry is judged by the destination's clock (`$$NOW` in the write itself),
//! never by ours: the hosts of two instances may disagree about the time, the server is one
//! clock. Every write is a conditional `findAndModify`/`update` with write concern majority,
//! so two instances can never both succeed: the epoch grows with every change of owner.

use std::time::{Duration, Instant};

use bson::{doc, Bson, DateTime, Document};
use mongodb::Database;

use crate::error::{ErrorKind, SyncError};

pub const LEASES_COLLECTION: &str = "leases";

/// Reads and writes one lease, as one instance (`owner`).
#[derive(Clone)]
pub struct LeaseStore {
    db: Database,
    sync_id: String,
    partition: u32,
    id: Document,
    owner: String,
    address: String,
    lease: Duration,
    /// Bound of one lease command on the client.
    timeout: Duration,
}

/// A lease this instance has just acquired.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub epoch: i64,
    /// When the acquiring command was sent (the lease runs from no earlier than this).
    pub sent: Instant,
    /// The previous owner's lease was taken over after it expired (not released): its last
    /// writes may still be running on the server.
    pub took_over_from: Option<String>,
}

/// Who holds the lease, as the destination says.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub owner: Option<String>,
    pub address: Option<String>,
    pub epoch: i64,
    pub released: bool,
    pub expires_at: DateTime,
}

fn lease_error(what: &str, e: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::DestinationWrite, what, e)
}

impl LeaseStore {
    pub fn new(
        db: &Database,
        sync_id: &str,
        partition: u32,
        owner: String,
        address: String,
        lease: Duration,
        timeout: Duration,
    ) -> LeaseStore {
        LeaseStore {
            db: db.clone(),
            sync_id: sync_id.to_owned(),
            partition,
            id: doc! {"sync_id": sync_id, "partition": partition as i64},
            owner,
            address,
            lease,
            timeout,
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The same instance's store for another partition's lease.
    pub fn for_partition(&self, partition: u32) -> LeaseStore {
        LeaseStore {
            partition,
            id: doc! {"sync_id": self.sync_id.as_str(), "partition": partition as i64},
            ..self.clone()
        }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn sync_id(&self) -> &str {
        &self.sync_id
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    async fn command(&self, mut cmd: Document, what: &str) -> Result<Document, SyncError> {
        cmd.insert(
            "maxTimeMS",
            (self.timeout.as_millis() as i64 * 3 / 4).max(1),
        );
        if !cmd.contains_key("find") {
            cmd.insert("writeConcern", doc! {"w": "majority", "j": true});
        }
        match tokio::time::timeout(self.timeout, self.db.run_command(cmd)).await {
            Ok(reply) => reply.map_err(|e| lease_error(what, e)),
            Err(_) => Err(SyncError::new(
                ErrorKind::DestinationConnection,
                format!("{what} timed out after {} ms", self.timeout.as_millis()),
            )),
        }
    }

    /// Takes the lease when it has expired by the destination's clock, was released, or is
    /// already ours; `None` when another instance holds it. The new epoch is above
    /// `epoch_floor` too (under partitions, the highest epoch of any lease of the sync: a
    /// namespace that changes partition meets only checkpoints stamped by lower epochs).
    pub async fn try_acquire(&self, epoch_floor: i64) -> Result<Option<Acquired>, SyncError> {
        for _ in 0..2 {
            let sent = Instant::now();
            let reply = self
                .command(
                    doc! {
                        "findAndModify": LEASES_COLLECTION,
                        "query": {
                            "_id": self.id.clone(),
                            "$or": [
                                {"owner": self.owner.as_str()},
                                {"$expr": {"$lte": ["$expires_at", "$$NOW"]}},
                            ],
                        },
                        "update": [{"$set": {
                            "owner": self.owner.as_str(),
                            "address": self.address.as_str(),
                            "epoch": {"$add": [{"$max": ["$epoch", epoch_floor]}, 1_i64]},
                            "released": false,
                            "acquired_at": "$$NOW",
                            "renewed_at": "$$NOW",
                            "expires_at": {"$add": ["$$NOW", self.lease_ms()]},
                        }}],
                        "new": false,
                    },
                    "acquiring the lease",
                )
                .await?;
            match reply.get("value") {
                Some(Bson::Document(before)) => {
                    let before = holder_of(before);
                    let took_over_from = match (&before.owner, before.released) {
                        (Some(owner), false) if owner != &self.owner => Some(owner.clone()),
                        _ => None,
                    };
                    return Ok(Some(Acquired {
                        epoch: before.epoch.max(epoch_floor) + 1,
                        sent,
                        took_over_from,
                    }));
                }
                _ if self.holder().await?.is_some() => return Ok(None),
                // First start of this sync id: create the lease, released at epoch 0.
                _ => self.create().await?,
            }
        }
        Ok(None)
    }

    async fn create(&self) -> Result<(), SyncError> {
        let reply = self
            .command(
                doc! {
                    "insert": LEASES_COLLECTION,
                    "documents": [{
                        "_id": self.id.clone(),
                        "owner": Bson::Null,
                        "address": Bson::Null,
                        "epoch": 0_i64,
                        "released": true,
                        "expires_at": DateTime::from_millis(0),
                    }],
                },
                "creating the lease",
            )
            .await?;
        match reply
            .get_array("writeErrors")
            .ok()
            .and_then(|e| e.first())
            .and_then(Bson::as_document)
        {
            // Another instance created it first.
            Some(e) if e.get_i32("code").ok() == Some(11000) => Ok(()),
            Some(e) => Err(SyncError::new(
                ErrorKind::DestinationWrite,
                format!(
                    "creating the lease: the destination refused it (code {}): {}",
                    e.get_i32("code").unwrap_or(0),
                    e.get_str("errmsg").unwrap_or("")
                ),
            )),
            None => Ok(()),
        }
    }

    /// Extends the lease held at `epoch`; `None` when it is no longer ours (another instance
    /// took it). Returns when the renewal was sent: the lease runs from no earlier than that.
    pub async fn renew(&self, epoch: i64) -> Result<Option<Instant>, SyncError> {
        let sent = Instant::now();
        let reply = self
            .command(
                doc! {
                    "findAndModify": LEASES_COLLECTION,
                    "query": {"_id": self.id.clone(), "owner": self.owner.as_str(), "epoch": epoch},
                    "update": [{"$set": {
                        "renewed_at": "$$NOW",
                        "expires_at": {"$add": ["$$NOW", self.lease_ms()]},
                    }}],
                    "new": true,
                },
                "renewing the lease",
            )
            .await?;
        Ok(match reply.get("value") {
            Some(Bson::Document(_)) => Some(sent),
            _ => None,
        })
    }

    /// Gives the lease up at once (a standby may take it without waiting for it to expire).
    pub async fn release(&self, epoch: i64) -> Result<bool, SyncError> {
        let reply = self
            .command(
                doc! {
                    "update": LEASES_COLLECTION,
                    "updates": [{
                        "q": {"_id": self.id.clone(), "owner": self.owner.as_str(), "epoch": epoch},
                        "u": [{"$set": {"released": true, "expires_at": "$$NOW"}}],
                    }],
                },
                "releasing the lease",
            )
            .await?;
        Ok(matches!(
            reply.get("n"),
            Some(Bson::Int32(1)) | Some(Bson::Int64(1))
        ))
    }

    /// The lease as the destination has it (majority read), if it exists.
    pub async fn holder(&self) -> Result<Option<Holder>, SyncError> {
        let reply = self
            .command(
                doc! {
                    "find": LEASES_COLLECTION,
                    "filter": {"_id": self.id.clone()},
                    "limit": 1,
                    "singleBatch": true,
                    "readConcern": {"level": "majority"},
                },
                "reading the lease",
            )
            .await?;
        let holder = first_batch(&reply).next().map(holder_of);
        Ok(holder)
    }
}

/// One lease of a sync as the destination has it, judged live by the destination's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionLease {
    pub partition: u32,
    pub holder: Holder,
    /// Held: not released and not expired.
    pub live: bool,
}

impl LeaseStore {
    /// Every lease of this sync (majority read), with its liveness by the server's clock.
    pub async fn all(&self) -> Result<Vec<PartitionLease>, SyncError> {
        let reply = self
            .command(
                doc! {
                    "aggregate": LEASES_COLLECTION,
                    "pipeline": [
                        {"$match": {"_id.sync_id": self.sync_id.as_str()}},
                        {"$addFields": {"live": {"$and": [
                            {"$gt": ["$expires_at", "$$NOW"]},
                            {"$ne": ["$released", true]},
                        ]}}},
                    ],
                    "cursor": {"batchSize": 10_000},
                    "readConcern": {"level": "majority"},
                },
                "reading the leases",
            )
            .await?;
        Ok(first_batch(&reply)
            .filter_map(|d| {
                let partition = match d.get_document("_id").ok()?.get("partition")? {
                    Bson::Int64(p) => u32::try_from(*p).ok()?,
                    Bson::Int32(p) => u32::try_from(*p).ok()?,
                    _ => return None,
                };
                Some(PartitionLease {
                    partition,
                    holder: holder_of(d),
                    live: d.get_bool("live").unwrap_or(false),
                })
            })
            .collect())
    }
}

/// The documents of a single-batch cursor reply (`find`, `aggregate`).
pub(super) fn first_batch(reply: &Document) -> impl Iterator<Item = &Document> {
    reply
        .get_document("cursor")
        .ok()
        .and_then(|c| c.get_array("firstBatch").ok())
        .into_iter()
        .flatten()
        .filter_map(Bson::as_document)
}

fn holder_of(d: &Document) -> Holder {
    Holder {
        owner: d.get_str("owner").ok().map(str::to_owned),
        address: d.get_str("address").ok().map(str::to_owned),
        epoch: match d.get("epoch") {
            Some(Bson::Int64(e)) => *e,
            Some(Bson::Int32(e)) => *e as i64,
            _ => 0,
        },
        released: d.get_bool("released").unwrap_or(true),
        expires_at: d
            .get_datetime("expires_at")
            .copied()
            .unwrap_or(DateTime::from_millis(0)),
    }
}

//! Which instances are alive (`ha.partitions`, DESIGN §2.12): each instance keeps one document
//! in `<checkpoint.database>.instances`, `{_id: {sync_id, instance}, address, layout,
//! partitions, expires_at}`, refreshed every poll and expiring after a lease by the
//! destination's clock. The live count N sets how many partitions an instance may hold,
//! ceil(P/N); the layout lets instances see that they disagree on the partitioning.

use bson::{doc, Document};

use crate::error::{ErrorKind, SyncError};

use super::lease::LeaseStore;

pub const INSTANCES_COLLECTION: &str = "instances";

/// An instance as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub instance: String,
    pub address: Option<String>,
    pub layout: Option<String>,
}

/// This instance's membership, written through its lease store's database and timings.
#[derive(Clone)]
pub struct Members {
    leases: LeaseStore,
    layout: String,
}

impl Members {
    pub fn new(leases: LeaseStore, layout: String) -> Members {
        Members { leases, layout }
    }

    pub fn layout(&self) -> &str {
        &self.layout
    }

    fn id(&self) -> Document {
        doc! {"sync_id": self.leases.sync_id(), "instance": self.leases.owner()}
    }

    async fn command(&self, mut cmd: Document, what: &str) -> Result<Document, SyncError> {
        let timeout = self.leases.lease() / 3;
        cmd.insert("maxTimeMS", (timeout.as_millis() as i64 * 3 / 4).max(1));
        let db = self.leases.database();
        match tokio::time::timeout(timeout, db.run_command(cmd)).await {
            Ok(reply) => reply.map_err(|e| SyncError::mongo(ErrorKind::DestinationWrite, what, e)),
            Err(_) => Err(SyncError::new(
                ErrorKind::DestinationConnection,
                format!("{what} timed out after {} ms", timeout.as_millis()),
            )),
        }
    }

    /// Says this instance is alive for another lease, holding `partitions`.
    pub async fn beat(&self, address: &str, partitions: &[u32]) -> Result<(), SyncError> {
        let held: Vec<i64> = partitions.iter().map(|p| i64::from(*p)).collect();
        self.command(
            doc! {
                "update": INSTANCES_COLLECTION,
                "updates": [{
                    "q": {"_id": self.id()},
                    "u": [{"$set": {
                        "address": address,
                        "layout": self.layout.as_str(),
                        "partitions": held,
                        "expires_at": {"$add": ["$$NOW", self.leases.lease().as_millis() as i64]},
                    }}],
                    "upsert": true,
                }],
                "writeConcern": {"w": "majority"},
            },
            "recording this instance as alive",
        )
        .await
        .map(|_| ())
    }

    /// The instances alive by the destination's clock (this one included once it has beaten).
    pub async fn live(&self) -> Result<Vec<Member>, SyncError> {
        let reply = self
            .command(
                doc! {
                    "aggregate": INSTANCES_COLLECTION,
                    "pipeline": [
                        {"$match": {"_id.sync_id": self.leases.sync_id()}},
                        {"$match": {"$expr": {"$gt": ["$expires_at", "$$NOW"]}}},
                    ],
                    "cursor": {"batchSize": 10_000},
                    "readConcern": {"level": "majority"},
                },
                "reading the live instances",
            )
            .await?;
        Ok(super::lease::first_batch(&reply)
            .filter_map(|d| {
                Some(Member {
                    instance: d
                        .get_document("_id")
                        .ok()?
                        .get_str("instance")
                        .ok()?
                        .to_owned(),
                    address: d.get_str("address").ok().map(str::to_owned),
                    layout: d.get_str("layout").ok().map(str::to_owned),
                })
            })
            .collect())
    }

    /// Leaves (a clean stop): the others rebalance at once instead of after a lease.
    pub async fn leave(&self) -> Result<(), SyncError> {
        self.command(
            doc! {
                "delete": INSTANCES_COLLECTION,
                "deletes": [{"q": {"_id": self.id()}, "limit": 1}],
                "writeConcern": {"w": "majority"},
            },
            "removing this instance from the live ones",
        )
        .await
        .map(|_| ())
    }
}

/// How many partitions one of `live` instances may hold: ceil(P/N).
pub fn fair_share(partitions: u32, live: usize) -> usize {
    let live = live.max(1);
    (partitions as usize).div_ceil(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fair_share_is_the_ceiling_of_partitions_over_instances() {
        assert_eq!(fair_share(6, 3), 2);
        assert_eq!(fair_share(6, 2), 3);
        assert_eq!(fair_share(6, 4), 2);
        assert_eq!(fair_share(6, 1), 6);
        assert_eq!(fair_share(6, 0), 6, "no one seen yet: this instance alone");
        assert_eq!(fair_share(1, 5), 1);
    }
}

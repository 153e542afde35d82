//! Reads at a point in time: `readConcern: {level: "snapshot", atClusterTime}`.
//!
//! Normal writes pay nothing for it: the oplog already holds every document version a write
//! replaced (`pre` of updates, replacements and deletes; the document of inserts), so the
//! catalog as of cluster time `T` is rebuilt on demand by undoing, newest first, the entries
//! with `ts > T` on an O(1) copy of today's catalog. The history a read can reach is what a
//! server keeps: `minSnapshotHistoryWindowInSeconds` (300 s by default) before the latest
//! cluster time, no earlier than the oldest entry the bounded oplog still holds, and nothing
//! before the process (re)started (a server's storage engine keeps no history across restarts).

use std::collections::HashMap;

use bson::{Bson, Timestamp};

use crate::{
    engine::Data,
    error::{codes, CommandError, CommandResult},
    oplog::{ts_cmp, OplogOp},
    store::{Catalog, Namespace},
};

/// `minSnapshotHistoryWindowInSeconds` of MongoDB 5.0+.
pub const DEFAULT_HISTORY_WINDOW_SECS: u64 = 300;

pub const SNAPSHOT_TOO_OLD: i32 = 239;
pub const SNAPSHOT_UNAVAILABLE: i32 = 246;

/// How a server prints a `Timestamp` in messages.
pub fn ts_string(ts: Timestamp) -> String {
    format!("Timestamp({}, {})", ts.time, ts.increment)
}

/// Namespaces whose catalog entry changed (create, drop, rename, dropDatabase) after the
/// snapshot time, with the time of the latest such change.
#[derive(Debug, Default, Clone)]
pub struct CatalogChanges {
    collections: HashMap<Namespace, Timestamp>,
    databases: HashMap<String, Timestamp>,
}

impl CatalogChanges {
    fn mark(&mut self, ns: &Namespace, ts: Timestamp) {
        // Entries are visited newest first: the first time seen is the latest change.
        self.collections.entry(ns.clone()).or_insert(ts);
    }

    /// SnapshotUnavailable (246) when `ns` changed in the catalog after `at`, as a server
    /// answers when a collection's minimum visible snapshot is newer than the read time.
    pub fn check(&self, ns: &Namespace, at: Timestamp) -> CommandResult<()> {
        let changed = [
            self.collections.get(ns).copied(),
            self.databases.get(&ns.db).copied(),
        ]
        .into_iter()
        .flatten()
        .max_by(|a, b| ts_cmp(*a, *b));
        match changed {
            None => Ok(()),
            Some(min) => Err(CommandError::new(
                SNAPSHOT_UNAVAILABLE,
                format!(
                    "Unable to read from a snapshot due to pending collection catalog changes; please retry the operation. Snapshot timestamp is {}. Collection minimum is {}",
                    ts_string(at),
                    ts_string(min)
                ),
            )),
        }
    }
}

/// The catalog as of a cluster time.
pub struct Snapshot {
    pub catalog: Catalog,
    pub at: Timestamp,
    pub changes: CatalogChanges,
}

/// History retention of the engine (kept with the data, under its lock).
#[derive(Debug, Clone, Copy)]
pub struct History {
    /// `minSnapshotHistoryWindowInSeconds`.
    pub window_secs: u64,
    /// No history before this time: the cluster time when the process (re)started.
    pub floor: Timestamp,
}

/// The oldest time a snapshot read can use now.
pub fn oldest_available(data: &Data) -> Timestamp {
    let current = data.clock.current();
    let by_window = Timestamp {
        time: current
            .time
            .saturating_sub(data.history.window_secs.min(u32::MAX as u64) as u32),
        increment: 0,
    };
    let mut oldest = by_window;
    if ts_cmp(data.history.floor, oldest).is_gt() {
        oldest = data.history.floor;
    }
    // Entries dropped for capacity took their document versions with them.
    if let Some(dropped) = data.oplog.dropped_through_ts() {
        if ts_cmp(dropped, oldest).is_gt() {
            oldest = dropped;
        }
    }
    oldest
}

/// Checks `at` against the cluster clock and the retained history (future → 72 InvalidOptions,
/// too old → 239 SnapshotTooOld, with the servers' messages).
pub fn check_time(data: &Data, at: Timestamp) -> CommandResult<()> {
    let current = data.clock.current();
    if ts_cmp(at, current).is_gt() {
        return Err(CommandError::new(
            codes::INVALID_OPTIONS,
            format!(
                "readConcern atClusterTime value must not be greater than the current clusterTime. Requested clusterTime: {}; current clusterTime: {}",
                ts_string(at),
                ts_string(current)
            ),
        ));
    }
    if ts_cmp(at, oldest_available(data)).is_lt() {
        return Err(CommandError::new(
            SNAPSHOT_TOO_OLD,
            format!(
                "Read timestamp {} is older than the oldest available timestamp.",
                ts_string(at)
            ),
        ));
    }
    Ok(())
}

/// Rebuilds the catalog as of `at` (documents as they were after every entry with
/// `ts <= at`, none after).
pub fn catalog_at(data: &Data, at: Timestamp) -> CommandResult<Snapshot> {
    check_time(data, at)?;
    let mut catalog = data.catalog.clone();
    let mut changes = CatalogChanges::default();
    let newer: Vec<_> = data.oplog.after(data.oplog.seq_through_ts(at)).collect();
    for entry in newer.into_iter().rev() {
        match &entry.op {
            OplogOp::Insert { ns, uuid, doc } => restore(&mut catalog, ns, *uuid, doc.id(), None),
            OplogOp::Update { ns, uuid, pre, .. }
            | OplogOp::Replace { ns, uuid, pre, .. }
            | OplogOp::Delete { ns, uuid, pre } => {
                restore(&mut catalog, ns, *uuid, pre.id(), Some(pre))
            }
            OplogOp::Create { ns, .. } | OplogOp::Drop { ns, .. } => changes.mark(ns, entry.ts),
            OplogOp::Rename { from, to, .. } => {
                changes.mark(from, entry.ts);
                changes.mark(to, entry.ts);
            }
            OplogOp::DropDatabase { db } => {
                changes.databases.entry(db.clone()).or_insert(entry.ts);
            }
            OplogOp::CreateIndexes { .. }
            | OplogOp::DropIndexes { .. }
            | OplogOp::Modify { .. }
            | OplogOp::Noop => {}
        }
    }
    Ok(Snapshot {
        catalog,
        at,
        changes,
    })
}

fn restore(
    catalog: &mut Catalog,
    ns: &Namespace,
    uuid: bson::Uuid,
    id: Option<Bson>,
    version: Option<&crate::oplog::Version>,
) {
    let (Some(coll), Some(id)) = (catalog.get_mut(ns), id) else {
        return;
    };
    // Another incarnation of the name (dropped and created again): the namespace is marked
    // as changed, its documents are not read.
    if coll.uuid == uuid {
        coll.restore_version(&id, version.map(crate::oplog::Version::doc_ref));
    }
}

//! Server-side cursors: materialised query results and change-stream tailers.

use std::collections::{HashMap, VecDeque};

use bson::Document;

use crate::{changestream::ChangeStreamCursor, query::projection::Projection, store::DocRef};

/// Reply batches stay under the 16 MiB document limit with room for the envelope.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;
/// `find`/`aggregate` first batch size when the client does not set one.
pub const DEFAULT_FIRST_BATCH: usize = 101;

pub enum CursorKind {
    Documents {
        remaining: VecDeque<DocRef>,
        projection: Option<Projection>,
    },
    ChangeStream(Box<ChangeStreamCursor>),
}

pub struct Cursor {
    pub id: i64,
    /// `db.coll` as reported in replies (`db.$cmd.aggregate` for database streams).
    pub ns: String,
    pub kind: CursorKind,
    pub lsid: Option<Vec<u8>>,
    /// Snapshot read time of a cursor opened by a snapshot read outside a transaction.
    pub at_cluster_time: Option<bson::Timestamp>,
}

#[derive(Default)]
pub struct Cursors {
    pub map: HashMap<i64, Cursor>,
    /// Cursors checked out by a running `getMore` (an awaiting change stream spends most of
    /// its life there); still open, as `serverStatus` counts them.
    in_use: std::collections::HashSet<i64>,
    /// Checked-out cursors a `killCursors` named: closed when their `getMore` returns.
    killed: std::collections::HashSet<i64>,
}

/// A cursor checked out of [`Cursors`] by a `getMore`: counted as open until it is given
/// back or, dropped, closed.
pub struct CheckedOut<'a> {
    cursors: &'a parking_lot::Mutex<Cursors>,
    id: i64,
    returned: bool,
}

impl<'a> CheckedOut<'a> {
    /// Takes cursor `id` out for a `getMore`.
    pub fn take(
        cursors: &'a parking_lot::Mutex<Cursors>,
        id: i64,
    ) -> Option<(Cursor, CheckedOut<'a>)> {
        let mut guard = cursors.lock();
        let cursor = guard.map.remove(&id)?;
        guard.in_use.insert(id);
        Some((
            cursor,
            CheckedOut {
                cursors,
                id,
                returned: false,
            },
        ))
    }

    /// Puts the cursor back (it stays open, unless a `killCursors` named it meanwhile).
    pub fn give_back(mut self, cursor: Cursor) {
        let mut guard = self.cursors.lock();
        guard.in_use.remove(&self.id);
        if !guard.killed.remove(&self.id) {
            guard.map.insert(cursor.id, cursor);
        }
        self.returned = true;
    }
}

impl Drop for CheckedOut<'_> {
    fn drop(&mut self) {
        if !self.returned {
            let mut guard = self.cursors.lock();
            guard.in_use.remove(&self.id);
            guard.killed.remove(&self.id);
        }
    }
}

impl Cursors {
    pub fn insert(&mut self, cursor: Cursor) {
        self.map.insert(cursor.id, cursor);
    }

    pub fn take(&mut self, id: i64) -> Option<Cursor> {
        self.map.remove(&id)
    }

    /// `killCursors` of one id: an idle cursor closes now, one a `getMore` is using closes
    /// when that `getMore` returns (mongod interrupts it). False for an unknown id.
    pub fn kill(&mut self, id: i64) -> bool {
        if self.map.remove(&id).is_some() {
            return true;
        }
        if self.in_use.contains(&id) {
            self.killed.insert(id);
            return true;
        }
        false
    }

    pub fn kill_session(&mut self, lsid: &[u8]) {
        self.map.retain(|_, c| c.lsid.as_deref() != Some(lsid));
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Open cursors, those a `getMore` is using included.
    pub fn open(&self) -> usize {
        self.map.len() + self.in_use.len() - self.killed.len()
    }
}

/// Takes up to `limit` documents (and at most [`MAX_BATCH_BYTES`]) from a result queue.
pub fn next_batch(
    remaining: &mut VecDeque<DocRef>,
    projection: Option<&Projection>,
    limit: usize,
) -> crate::error::CommandResult<Vec<Document>> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while out.len() < limit {
        let Some(doc) = remaining.front() else { break };
        let doc = match projection {
            Some(p) => p.apply(doc)?,
            None => (**doc).clone(),
        };
        let size = crate::store::bson_size(&doc);
        if !out.is_empty() && bytes + size > MAX_BATCH_BYTES {
            break;
        }
        bytes += size;
        remaining.pop_front();
        out.push(doc);
    }
    Ok(out)
}

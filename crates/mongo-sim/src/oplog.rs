//! The cluster clock and a bounded oplog: every write gets a cluster time and an entry; the
//! oldest entries fall off when the capacity is exceeded, so history loss can be provoked.

use std::collections::VecDeque;

use bson::{Bson, Document, Timestamp};

use crate::store::{DocRef, Namespace};

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
        ns: Namespace,
        uuid: bson::Uuid,
        doc: DocRef,
    },
    Update {
        ns: Namespace,
        uuid: bson::Uuid,
        pre: DocRef,
        post: DocRef,
        description: std::sync::Arc<crate::query::update::UpdateDescription>,
    },
    Replace {
        ns: Namespace,
        uuid: bson::Uuid,
        pre: DocRef,
        post: DocRef,
    },
    Delete {
        ns: Namespace,
        uuid: bson::Uuid,
        pre: DocRef,
    },
    Create {
        ns: Namespace,
        uuid: bson::Uuid,
        options: Document,
    },
    CreateIndexes {
        ns: Namespace,
        uuid: bson::Uuid,
        indexes: Vec<Document>,
    },
    DropIndexes {
        ns: Namespace,
        uuid: bson::Uuid,
        indexes: Vec<Document>,
    },
    /// collMod: the options that changed (new values) and the previous values.
    Modify {
        ns: Namespace,
        uuid: bson::Uuid,
        changed: Document,
        previous: Document,
    },
    Drop {
        ns: Namespace,
        uuid: bson::Uuid,
    },
    Rename {
        from: Namespace,
        to: Namespace,
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

    pub fn document_id(&self) -> Option<&Bson> {
        match self {
            OplogOp::Insert { doc, .. } => doc.get("_id"),
            OplogOp::Update { post, .. } | OplogOp::Replace { post, .. } => post.get("_id"),
            OplogOp::Delete { pre, .. } => pre.get("_id"),
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
    pub txn: Option<TxnInfo>,
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
}

impl Oplog {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            next_seq: 1,
            dropped_through_seq: 0,
            dropped_through_ts: None,
            journal: None,
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
        txn: Option<TxnInfo>,
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
        self.trim();
        seq
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
}

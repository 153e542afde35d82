//! Logical sessions: retryable-write deduplication and multi-document transactions.

use std::collections::HashMap;

use bson::{Bson, Document, Timestamp};

use crate::{
    engine::{log_transaction, Data},
    error::{codes, CommandError, CommandResult},
    oplog::{OplogOp, TxnInfo},
    store::{Catalog, Collection, DocRef, Namespace},
};

pub const TRANSIENT_TRANSACTION_ERROR: &str = "TransientTransactionError";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    InProgress,
    Committed,
    Aborted,
}

/// An open (or finished) multi-document transaction.
pub struct Transaction {
    pub txn_number: i64,
    pub state: TxnState,
    /// Private working copy of the catalog: the transaction's snapshot plus its own writes.
    pub catalog: Catalog,
    /// The catalog as it was when the transaction started, to detect concurrent writes.
    pub base: Catalog,
    pub ops: Vec<(OplogOp, bool)>,
    pub read_ts: Timestamp,
    /// `readConcern.level` of the transaction (given by its first statement); `None` = the
    /// default, `local`.
    pub read_concern_level: Option<String>,
    /// With `readConcern.atClusterTime`: the namespaces whose catalog entry changed after it
    /// (reading them answers 246 SnapshotUnavailable).
    pub snapshot_changes: Option<crate::snapshot::CatalogChanges>,
    /// When it started: past `transactionLifetimeLimitSeconds` it is aborted.
    pub started: std::time::Instant,
}

#[derive(Default)]
pub struct SessionState {
    pub lsid: Document,
    /// Highest `txnNumber` seen on this session.
    pub txn_number: i64,
    /// Reply of the retryable write executed with `txn_number` (replayed on a retry).
    pub retry_reply: Option<(i64, Document)>,
    pub txn: Option<Transaction>,
}

/// MongoDB's default `transactionLifetimeLimitSeconds`.
pub const DEFAULT_TXN_LIFETIME_SECS: u64 = 60;

pub struct Sessions {
    pub map: HashMap<Vec<u8>, SessionState>,
    /// `transactionLifetimeLimitSeconds` (setParameter): an open transaction older than this
    /// is aborted, so a client that died mid-transaction does not hold its documents forever.
    pub txn_lifetime_secs: u64,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            map: HashMap::new(),
            txn_lifetime_secs: DEFAULT_TXN_LIFETIME_SECS,
        }
    }
}

/// What a retryable write should do.
pub enum RetryCheck {
    Execute,
    /// Already executed with this `txnNumber`: answer with the recorded reply.
    Replay(Document),
}

impl Sessions {
    /// Aborts the open transactions older than the lifetime limit (the server's periodic
    /// transaction reaper; here run before every transaction statement, conflict check and
    /// commit, which is when an expired transaction could be observed). Returns how many.
    pub fn expire_transactions(&mut self) -> usize {
        let limit = std::time::Duration::from_secs(self.txn_lifetime_secs);
        let mut expired = 0;
        for s in self.map.values_mut() {
            let old = s
                .txn
                .as_ref()
                .is_some_and(|t| t.state == TxnState::InProgress && t.started.elapsed() >= limit);
            if old {
                abort_open(s);
                expired += 1;
            }
        }
        expired
    }

    pub fn session(&mut self, key: &[u8], lsid: &Document) -> &mut SessionState {
        self.map
            .entry(key.to_vec())
            .or_insert_with(|| SessionState {
                lsid: lsid.clone(),
                ..Default::default()
            })
    }

    pub fn end(&mut self, key: &[u8]) {
        self.map.remove(key);
    }

    /// Checks a retryable write's `txnNumber` against the session.
    pub fn check_retry(
        &mut self,
        key: &[u8],
        lsid: &Document,
        txn_number: i64,
    ) -> CommandResult<RetryCheck> {
        let s = self.session(key, lsid);
        if txn_number < s.txn_number {
            return Err(CommandError::new(
                codes::TRANSACTION_TOO_OLD,
                format!(
                    "Retryable write with txnNumber {txn_number} is prohibited on session because a newer retryable write with txnNumber {} has already started on this session.",
                    s.txn_number
                ),
            ));
        }
        if let Some((n, reply)) = &s.retry_reply {
            if *n == txn_number {
                return Ok(RetryCheck::Replay(reply.clone()));
            }
        }
        if txn_number > s.txn_number {
            s.txn_number = txn_number;
            abort_open(s);
        }
        Ok(RetryCheck::Execute)
    }

    pub fn record_retry(&mut self, key: &[u8], txn_number: i64, reply: Document) {
        if let Some(s) = self.map.get_mut(key) {
            s.retry_reply = Some((txn_number, reply));
        }
    }

    /// Transactions other than `except` that are still open, for write-conflict checks.
    fn other_open_txns<'a>(
        &'a self,
        except: &'a [u8],
    ) -> impl Iterator<Item = &'a Transaction> + 'a {
        self.map
            .iter()
            .filter(move |(k, _)| k.as_slice() != except)
            .filter_map(|(_, s)| s.txn.as_ref())
            .filter(|t| t.state == TxnState::InProgress)
    }
}

fn abort_open(s: &mut SessionState) {
    if let Some(t) = &mut s.txn {
        if t.state == TxnState::InProgress {
            t.state = TxnState::Aborted;
            t.ops.clear();
        }
    }
}

/// Aborts the open transaction `txn_number` of a session after a statement of it failed
/// (MongoDB aborts a transaction on any error of one of its statements). Does nothing when
/// that transaction is not the session's open one.
pub fn abort_after_error(data: &mut Data, key: &[u8], txn_number: i64) {
    if let Some(s) = data.sessions.map.get_mut(key) {
        if s.txn.as_ref().is_some_and(|t| t.txn_number == txn_number) {
            abort_open(s);
        }
    }
}

fn no_such_transaction(txn_number: i64) -> CommandError {
    CommandError::new(
        codes::NO_SUCH_TRANSACTION,
        format!("Transaction with {{ txnNumber: {txn_number} }} has been aborted."),
    )
}

/// Opens or continues the transaction `txn_number` for a command with `autocommit: false`.
pub fn begin_or_continue(
    data: &mut Data,
    key: &[u8],
    lsid: &Document,
    txn_number: i64,
    start: bool,
    read_concern_level: Option<&str>,
    at_cluster_time: Option<Timestamp>,
) -> CommandResult<()> {
    // A transaction reads from its snapshot: today's catalog, or the one of `atClusterTime`
    // (checked before the transaction exists: a refused time leaves none open).
    let (base, now, snapshot_changes) = match at_cluster_time {
        Some(at) if start => {
            let snap = crate::snapshot::catalog_at(data, at)?;
            (snap.catalog, at, Some(snap.changes))
        }
        _ => (data.catalog.clone(), data.clock.current(), None),
    };
    data.sessions.expire_transactions();
    let s = data.sessions.session(key, lsid);
    if txn_number < s.txn_number {
        return Err(CommandError::new(
            codes::TRANSACTION_TOO_OLD,
            format!(
                "txnNumber {txn_number} is less than last txnNumber {} seen in session",
                s.txn_number
            ),
        ));
    }
    if start {
        if txn_number == s.txn_number && s.txn.is_some() {
            return Err(CommandError::new(
                codes::CONFLICTING_OPERATION_IN_PROGRESS,
                format!("Cannot start transaction {txn_number} on session because a newer transaction has already started"),
            ));
        }
        abort_open(s);
        s.txn_number = txn_number;
        s.txn = Some(Transaction {
            txn_number,
            state: TxnState::InProgress,
            catalog: base.clone(),
            base,
            ops: Vec::new(),
            read_ts: now,
            read_concern_level: read_concern_level.map(str::to_string),
            snapshot_changes,
            started: std::time::Instant::now(),
        });
        return Ok(());
    }
    match &s.txn {
        Some(t) if t.txn_number == txn_number && t.state == TxnState::InProgress => Ok(()),
        Some(t) if t.txn_number == txn_number && t.state == TxnState::Committed => {
            Err(CommandError::new(
                codes::TRANSACTION_COMMITTED,
                format!("Transaction {txn_number} has been committed."),
            ))
        }
        _ => Err(no_such_transaction(txn_number).with_label(TRANSIENT_TRANSACTION_ERROR)),
    }
}

fn same_version(a: Option<&DocRef>, b: Option<&DocRef>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
        _ => false,
    }
}

fn op_key(op: &OplogOp) -> Option<(Namespace, Bson)> {
    Some((op.ns()?.clone(), op.document_id()?))
}

fn write_conflict() -> CommandError {
    CommandError::new(
        codes::WRITE_CONFLICT,
        "Write conflict during plan execution and yielding is disabled. :: Please retry your operation or multi-document transaction.",
    )
    .with_label(TRANSIENT_TRANSACTION_ERROR)
}

/// Checks the writes a transaction statement just made (ops from `first_new` on): a document
/// changed since the snapshot, or written by another open transaction, is a write conflict,
/// which aborts the transaction.
pub fn check_statement_conflicts(
    data: &mut Data,
    key: &[u8],
    first_new: usize,
) -> CommandResult<()> {
    data.sessions.expire_transactions();
    let conflict = {
        let s = data
            .sessions
            .map
            .get(key)
            .expect("session exists during its transaction");
        let t = s.txn.as_ref().expect("transaction exists");
        t.ops[first_new..]
            .iter()
            .filter_map(|(op, _)| op_key(op))
            .any(|(ns, id)| {
                let now = data.catalog.get(&ns).and_then(|c| c.get(&id));
                let then = t.base.get(&ns).and_then(|c| c.get(&id));
                !same_version(now, then)
                    || data.sessions.other_open_txns(key).any(|other| {
                        other
                            .ops
                            .iter()
                            .any(|(o, _)| op_key(o).is_some_and(|(n2, id2)| n2 == ns && id2 == id))
                    })
            })
    };
    if conflict {
        if let Some(s) = data.sessions.map.get_mut(key) {
            abort_open(s);
        }
        return Err(write_conflict());
    }
    Ok(())
}

/// Commits: re-checks conflicts against writes made outside the transaction, applies the
/// transaction's writes to the shared catalog atomically and logs them with one cluster time.
pub fn commit(data: &mut Data, key: &[u8], lsid: &Document, txn_number: i64) -> CommandResult<()> {
    data.sessions.expire_transactions();
    let s = data.sessions.session(key, lsid);
    let t = match &mut s.txn {
        Some(t) if t.txn_number == txn_number => t,
        _ => return Err(no_such_transaction(txn_number)),
    };
    match t.state {
        TxnState::Committed => return Ok(()), // a retried commit is a no-op
        TxnState::Aborted => return Err(no_such_transaction(txn_number)),
        TxnState::InProgress => {}
    }
    let ops = std::mem::take(&mut t.ops);
    let txn_catalog = std::mem::take(&mut t.catalog);
    let base = std::mem::take(&mut t.base);
    // Apply onto copies of the shared collections; swap them in only if everything succeeds.
    let mut staged: HashMap<Namespace, Option<Collection>> = HashMap::new();
    let result = (|| -> CommandResult<()> {
        for (op, _) in &ops {
            if let Some((ns, id)) = op_key(op) {
                let now = data.catalog.get(&ns).and_then(|c| c.get(&id));
                let then = base.get(&ns).and_then(|c| c.get(&id));
                if !same_version(now, then) {
                    return Err(write_conflict());
                }
            }
        }
        for (op, _) in &ops {
            let ns = match op.ns() {
                Some(ns) => ns.clone(),
                None => continue,
            };
            let slot = staged
                .entry(ns.clone())
                .or_insert_with(|| data.catalog.get(&ns).cloned());
            match op {
                OplogOp::Create { .. } => {
                    if slot.is_none() {
                        let mut c = txn_catalog.get(&ns).cloned().ok_or_else(|| {
                            CommandError::new(
                                codes::INTERNAL_ERROR,
                                "created collection missing from transaction",
                            )
                        })?;
                        c.docs = imbl::OrdMap::new();
                        c.indexes.retain(|i| i.name == "_id_");
                        *slot = Some(c);
                    }
                }
                OplogOp::Insert { doc, .. } => {
                    let c = slot.as_mut().ok_or_else(write_conflict)?;
                    c.insert(doc.document().into_owned(), true)?;
                }
                OplogOp::Update {
                    post, description, ..
                } => {
                    let c = slot.as_mut().ok_or_else(write_conflict)?;
                    c.replace(
                        post.document().into_owned(),
                        Some((**description).clone()),
                        true,
                    )?;
                }
                OplogOp::Replace { post, .. } => {
                    let c = slot.as_mut().ok_or_else(write_conflict)?;
                    c.replace(post.document().into_owned(), None, true)?;
                }
                OplogOp::Delete { pre, .. } => {
                    let c = slot.as_mut().ok_or_else(write_conflict)?;
                    c.delete(&pre.id().unwrap_or(Bson::Null));
                }
                OplogOp::CreateIndexes { indexes, .. } => {
                    // Only on a collection the transaction created (checked by createIndexes).
                    let c = slot.as_mut().ok_or_else(write_conflict)?;
                    for spec in indexes {
                        c.add_index(crate::store::Index::from_spec(spec)?)?;
                    }
                }
                _ => {
                    return Err(CommandError::new(
                        codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                        "DDL is not supported in transactions",
                    ))
                }
            }
        }
        Ok(())
    })();
    let s = data.sessions.map.get_mut(key).expect("session exists");
    let t = s.txn.as_mut().expect("transaction exists");
    match result {
        Err(e) => {
            t.state = TxnState::Aborted;
            Err(e)
        }
        Ok(()) => {
            t.state = TxnState::Committed;
            for (ns, coll) in staged {
                if let Some(c) = coll {
                    data.catalog.insert(c);
                } else {
                    data.catalog.remove(&ns);
                }
            }
            if !ops.is_empty() {
                log_transaction(
                    data,
                    ops,
                    TxnInfo {
                        lsid: lsid.clone(),
                        txn_number,
                    },
                );
            }
            Ok(())
        }
    }
}

pub fn abort(data: &mut Data, key: &[u8], lsid: &Document, txn_number: i64) -> CommandResult<()> {
    let s = data.sessions.session(key, lsid);
    match &mut s.txn {
        Some(t) if t.txn_number == txn_number => match t.state {
            TxnState::InProgress => {
                t.state = TxnState::Aborted;
                t.ops.clear();
                Ok(())
            }
            TxnState::Committed => Err(CommandError::new(
                codes::TRANSACTION_COMMITTED,
                format!("Transaction {txn_number} has been committed."),
            )),
            TxnState::Aborted => Err(no_such_transaction(txn_number)),
        },
        _ => Err(no_such_transaction(txn_number)),
    }
}

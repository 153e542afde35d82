//! Source transactions written as destination transactions (`apply.transactions = "atomic"`,
//! DESIGN §2.4). The rendezvous of the member workers is [`crate::model::transaction`]; this
//! module turns one member's events into its part and writes every part in one transaction.
//!
//! Only the plain case is written atomically: source-wins, no replay, every event an insert,
//! replace, delete or a delta that addresses its fields directly. Anything else (a conflict
//! policy, a refetch, a write error, a delta that finds no document) declines, and every
//! member applies its events per document, which converges the same way.
//!
//! `ha.fencing = "transaction"` writes one namespace's batch, or one copied range, with its
//! checkpoint in one transaction the same way; there replays and refetches are resolved from
//! the source first (a batch is one namespace's, so nothing needs a common snapshot).

use std::time::Duration;

use bson::{rawdoc, RawArrayBuf, RawDocumentBuf, Timestamp};
use mongodb::{options::WriteConcern, Client};
use tokio_util::sync::CancellationToken;

use super::{
    batch_end, delta_statement, id_key, in_replay, upsert_statement, Applier, ApplyStats, DocWrite,
};
use crate::{
    error::SyncError,
    model::{
        event::ChangeEvent,
        transaction::{TxnGroup, TxnOutcome, TxnPart, TxnTurn, TxnWrite},
    },
};

/// How long a member waits for the others before it gives up on atomicity for this
/// transaction (a member far behind, or one that never comes).
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts of one destination transaction that fails with `TransientTransactionError` (a
/// write conflict with a concurrent write, an election), as drivers' `withTransaction` does.
const TRANSACTION_ATTEMPTS: usize = 3;
/// The wait before the second attempt, doubled before the third (150 ms in all).
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(50);

/// Why a destination transaction did not commit.
struct NotCommitted {
    /// The server labelled the error `TransientTransactionError`: the whole transaction may
    /// be tried again.
    transient: bool,
    /// The fencing checkpoint write failed: a later lease epoch stamped the checkpoint.
    fenced: bool,
    message: String,
}

impl NotCommitted {
    fn of(what: String, e: &mongodb::error::Error) -> NotCommitted {
        NotCommitted {
            transient: e.contains_label("TransientTransactionError"),
            fenced: false,
            message: format!("{what}: {e}"),
        }
    }

    fn fatal(message: String) -> NotCommitted {
        NotCommitted {
            transient: false,
            fenced: false,
            message,
        }
    }
}

impl Applier {
    /// This namespace's writes for a source transaction, with what they count as, or why they
    /// cannot be written in a destination transaction.
    pub async fn transaction_part(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
    ) -> Result<Result<(TxnPart, ApplyStats), String>, SyncError> {
        self.writes_in_transaction(events, replay_until, false)
            .await
    }

    /// The writes of `events` as one transaction's statements. With `refetch`, the events that
    /// need the source's current document (replays of deltas in a copy's replay window, events
    /// without one) read it as of the batch's end first, as the per-document path does, and a
    /// document's later writes in the batch are left out (what was read holds them);
    /// without, they decline.
    async fn writes_in_transaction(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
        refetch: bool,
    ) -> Result<Result<(TxnPart, ApplyStats), String>, SyncError> {
        if self.conflict.detects_conflicts() {
            return Ok(Err(format!(
                "{} applies conditional writes ({:?})",
                self.label, self.conflict.policy
            )));
        }
        self.catalog().await?;
        let bypass = self.bypass_validation();
        let mut stats = ApplyStats::default();
        let mut planned = Vec::with_capacity(events.len());
        for ev in events {
            let replay = in_replay(ev, replay_until);
            if replay && !refetch {
                return Ok(Err(format!("{} is replaying", self.label)));
            }
            let Some(id) = ev.document_key() else {
                return Ok(Err(format!("a {:?} event in a transaction", ev.kind)));
            };
            let Some(doc_writes) = self.event_writes(ev, replay)? else {
                return Ok(Err(format!("a {:?} event in a transaction", ev.kind)));
            };
            stats.count(ev.kind.apply_op());
            planned.push((id, doc_writes));
        }
        let refetch_ids: Vec<bson::Bson> = planned
            .iter()
            .filter(|(_, w)| w.iter().any(|w| matches!(w, DocWrite::Refetch)))
            .filter_map(|(id, _)| bson::Bson::try_from(id.clone()).ok())
            .collect();
        let mut current = std::collections::HashMap::new();
        if !refetch_ids.is_empty() {
            if !refetch {
                return Ok(Err(format!(
                    "an event of {} needs the source's current document",
                    self.label
                )));
            }
            for doc in self
                .source
                .fetch_documents_at(&self.source_ns, &refetch_ids, batch_end(events))
                .await?
            {
                if let Ok(Some(id)) = doc.get("_id") {
                    current.insert(id_key(&bson::RawBson::from(id)), doc);
                }
            }
            stats.repaired += refetch_ids.len() as u64;
        }
        let mut refetched = std::collections::HashSet::new();
        let mut writes = Vec::with_capacity(planned.len());
        for (id, doc_writes) in planned {
            let key = id_key(&id);
            if refetched.contains(&key) {
                continue;
            }
            for w in doc_writes {
                let (command, statement, must_match) = match &w {
                    DocWrite::Upsert(doc) => ("update", upsert_statement(&id, doc), false),
                    DocWrite::Delete => (
                        "delete",
                        rawdoc! {"q": {"_id": id.clone()}, "limit": 1},
                        false,
                    ),
                    DocWrite::Truncate(_) | DocWrite::Delta { .. } => {
                        ("update", delta_statement(&id, &w)?, true)
                    }
                    DocWrite::Refetch => {
                        refetched.insert(key.clone());
                        match current.get(&key) {
                            Some(doc) => ("update", upsert_statement(&id, doc), false),
                            // Gone from the source as of the batch's end.
                            None => (
                                "delete",
                                rawdoc! {"q": {"_id": id.clone()}, "limit": 1},
                                false,
                            ),
                        }
                    }
                };
                stats.writes += 1;
                writes.push(TxnWrite {
                    db: self.target.db.clone(),
                    coll: self.target.coll.clone(),
                    command,
                    statement,
                    must_match,
                    bypass_validation: bypass && command == "update",
                    fence: false,
                });
                if refetched.contains(&key) {
                    break;
                }
            }
        }
        Ok(Ok((
            TxnPart {
                namespace: self.label.clone(),
                writes,
            },
            stats,
        )))
    }

    /// `ha.fencing = "transaction"`: writes `events` and `checkpoint` (the fenced checkpoint
    /// write of the batch) in one destination transaction, so the batch lands only if no later
    /// lease epoch has stamped the checkpoint — whatever the timing. `Ok(None)`: the batch
    /// needs a conflict policy's conditional writes, or the transaction failed on a data write
    /// (a replay meeting a unique index, a rejected document); the caller applies it per
    /// document (lease-fenced).
    pub async fn apply_fenced(
        &self,
        events: &[ChangeEvent],
        replay_until: Option<Timestamp>,
        checkpoint: TxnWrite,
    ) -> Result<Option<ApplyStats>, SyncError> {
        let (part, stats) = match self
            .writes_in_transaction(events, replay_until, true)
            .await?
        {
            Ok(part) => part,
            Err(why) => {
                tracing::debug!(namespace = %self.label, reason = %why, "batch applied per document, under lease fencing");
                return Ok(None);
            }
        };
        let parts = [
            part,
            TxnPart {
                namespace: self.label.clone(),
                writes: vec![checkpoint],
            },
        ];
        Ok(self.commit_fenced(&parts, "batch").await?.then_some(stats))
    }

    /// `ha.fencing = "transaction"`: writes one copied range — the deletion of each destination
    /// extra in it (`extras`, already charged to the mass-delete guard), a replace-upsert of
    /// each document — and `checkpoint` (the copy's fenced checkpoint write) in one destination
    /// transaction, so a range read by a deposed owner never lands after a takeover. `false`:
    /// it did not commit for another reason than the fence (a unique index, a document the
    /// destination rejects, a size limit); the caller writes the range the usual way.
    pub async fn copy_range_fenced(
        &self,
        extras: &[bson::Bson],
        docs: &[RawDocumentBuf],
        checkpoint: TxnWrite,
    ) -> Result<bool, SyncError> {
        self.catalog().await?;
        let bypass = self.bypass_validation();
        let write = |command: &'static str, statement: RawDocumentBuf| TxnWrite {
            db: self.target.db.clone(),
            coll: self.target.coll.clone(),
            command,
            statement,
            must_match: false,
            bypass_validation: bypass && command == "update",
            fence: false,
        };
        let mut writes = Vec::with_capacity(extras.len() + docs.len());
        for id in extras {
            let id = bson::RawBson::try_from(id.clone()).map_err(|e| {
                SyncError::with_source(
                    crate::error::ErrorKind::InvariantViolated,
                    "encoding _id",
                    e,
                )
            })?;
            writes.push(write("delete", rawdoc! {"q": {"_id": id}, "limit": 1}));
        }
        for doc in docs {
            let id = doc
                .get("_id")
                .ok()
                .flatten()
                .map(bson::RawBson::from)
                .ok_or_else(|| {
                    SyncError::new(crate::error::ErrorKind::SourceRead, "document without _id")
                })?;
            writes.push(write("update", upsert_statement(&id, doc)));
        }
        let parts = [
            TxnPart {
                namespace: self.label.clone(),
                writes,
            },
            TxnPart {
                namespace: self.label.clone(),
                writes: vec![checkpoint],
            },
        ];
        self.commit_fenced(&parts, "copied range").await
    }

    /// Commits `parts`, the last of them a fencing checkpoint write, retrying transient
    /// failures. `false`: not committed for another reason than the fence (logged).
    async fn commit_fenced(&self, parts: &[TxnPart], what: &str) -> Result<bool, SyncError> {
        let client = self.dest_db.client();
        let mut attempt = 1;
        loop {
            match commit(client, parts, self.op_timeout).await {
                Ok(()) => return Ok(true),
                Err(e) if e.fenced => {
                    return Err(SyncError::new(
                        crate::error::ErrorKind::Cancelled,
                        format!("{}: {}", self.label, e.message),
                    ))
                }
                Err(e) if e.transient && attempt < TRANSACTION_ATTEMPTS => {
                    tokio::time::sleep(RETRY_FIRST_WAIT * (1 << (attempt - 1))).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::debug!(namespace = %self.label, error = %e.message, "the fenced {what} transaction did not commit; writing it the usual way, under lease fencing");
                    return Ok(false);
                }
            }
        }
    }

    /// Brings `part` to `group` and waits for the outcome; writes every part if this member
    /// is the first to find them all.
    pub async fn take_part(
        &self,
        group: &TxnGroup,
        part: TxnPart,
        stop: &CancellationToken,
    ) -> TxnOutcome {
        take_part(group, part, self.dest_db.client(), self.op_timeout, stop).await
    }
}

async fn take_part(
    group: &TxnGroup,
    part: TxnPart,
    client: &Client,
    op_timeout: Option<Duration>,
    stop: &CancellationToken,
) -> TxnOutcome {
    group.arrive(part);
    let deadline = tokio::time::Instant::now() + RENDEZVOUS_TIMEOUT;
    loop {
        let mut changed = group.subscribe();
        match group.turn() {
            TxnTurn::Done(outcome) => return outcome,
            TxnTurn::Execute(parts) => {
                let mut attempt = 1;
                let outcome = loop {
                    match commit(client, &parts, op_timeout).await {
                        Ok(()) => break TxnOutcome::Committed,
                        Err(e) if e.transient && attempt < TRANSACTION_ATTEMPTS => {
                            tracing::debug!(attempt, error = %e.message, "the destination transaction met a transient error; trying it again");
                            tokio::time::sleep(RETRY_FIRST_WAIT * (1 << (attempt - 1))).await;
                            attempt += 1;
                        }
                        Err(e) => break TxnOutcome::PerDocument(e.message),
                    }
                };
                group.finish(outcome.clone());
                return outcome;
            }
            TxnTurn::Wait => {}
        }
        tokio::select! {
            _ = stop.cancelled() => group.decline("shutting down"),
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => group.decline(&format!(
                "not every member reached the transaction within {} s",
                RENDEZVOUS_TIMEOUT.as_secs()
            )),
        }
    }
}

/// Writes every part in one destination transaction (write concern majority). Consecutive
/// writes to one collection go out as one ordered command; any write error, or a delta that
/// finds no document, aborts the transaction.
async fn commit(
    client: &Client,
    parts: &[TxnPart],
    op_timeout: Option<Duration>,
) -> Result<(), NotCommitted> {
    let mut session = client
        .start_session()
        .await
        .map_err(|e| NotCommitted::of("starting a destination session".into(), &e))?;
    let mut start = session
        .start_transaction()
        .write_concern(WriteConcern::majority());
    if let Some(limit) = op_timeout {
        start = start.max_commit_time(super::bounded_write::server_time_limit(limit));
    }
    start
        .await
        .map_err(|e| NotCommitted::of("starting a destination transaction".into(), &e))?;
    let writes: Vec<&TxnWrite> = parts.iter().flat_map(|p| p.writes.iter()).collect();
    let mut i = 0;
    while i < writes.len() {
        let first = writes[i];
        let mut end = i + 1;
        while end < writes.len()
            && writes[end].db == first.db
            && writes[end].coll == first.coll
            && writes[end].command == first.command
            && end - i < super::MAX_STATEMENTS_PER_COMMAND
        {
            end += 1;
        }
        let group = &writes[i..end];
        let mut statements = RawArrayBuf::new();
        for w in group {
            statements.push(w.statement.clone());
        }
        let field = if first.command == "delete" {
            "deletes"
        } else {
            "updates"
        };
        let mut cmd = RawDocumentBuf::new();
        let command =
            super::cstr_key(first.command).map_err(|e| NotCommitted::fatal(e.to_string()))?;
        let field = super::cstr_key(field).map_err(|e| NotCommitted::fatal(e.to_string()))?;
        cmd.append(command, first.coll.as_str());
        cmd.append(field, statements);
        cmd.append(bson::cstr!("ordered"), true);
        if first.bypass_validation {
            cmd.append(bson::cstr!("bypassDocumentValidation"), true);
        }
        if let Some(limit) = op_timeout {
            cmd.append(
                bson::cstr!("maxTimeMS"),
                super::bounded_write::max_time_ms(limit),
            );
        }
        let sent = super::bounded_write::run(
            op_timeout,
            client
                .database(&first.db)
                .run_raw_command(cmd)
                .session(&mut session),
        )
        .await;
        let reply = match sent {
            Err(abandoned) => {
                return Err(NotCommitted::fatal(
                    abandoned
                        .into_error("a write of the destination transaction")
                        .to_string(),
                ))
            }
            Ok(Err(e)) => {
                let _ = session.abort_transaction().await;
                return Err(NotCommitted::of(
                    format!("writing {}.{}", first.db, first.coll),
                    &e,
                ));
            }
            Ok(Ok(reply)) => reply,
        };
        if let Ok(errors) = reply.get_array("writeErrors") {
            if let Some(e) = errors.iter().filter_map(|e| e.as_document()).next() {
                let _ = session.abort_transaction().await;
                if group.iter().any(|w| w.fence) {
                    return Err(NotCommitted {
                        transient: false,
                        fenced: true,
                        message: format!(
                            "the fencing checkpoint write was refused (code {}): another instance holds the lease",
                            e.get_i32("code").unwrap_or(0)
                        ),
                    });
                }
                return Err(NotCommitted::fatal(format!(
                    "{}.{} refused a write (code {}): {}",
                    first.db,
                    first.coll,
                    e.get_i32("code").unwrap_or(0),
                    e.get_str("errmsg").unwrap_or("")
                )));
            }
        }
        if first.command == "update" {
            let n = match reply.get("n") {
                Some(bson::Bson::Int32(n)) => *n as i64,
                Some(bson::Bson::Int64(n)) => *n,
                _ => 0,
            };
            if group.iter().any(|w| w.fence) && n < group.len() as i64 {
                let _ = session.abort_transaction().await;
                return Err(NotCommitted {
                    transient: false,
                    fenced: true,
                    message: "the fencing checkpoint write matched nothing: another instance holds the lease".into(),
                });
            }
            if group.iter().any(|w| w.must_match) && n < group.len() as i64 {
                let _ = session.abort_transaction().await;
                return Err(NotCommitted::fatal(format!(
                    "an update of {}.{} found no document (the destination diverged)",
                    first.db, first.coll
                )));
            }
        }
        i = end;
    }
    let committed = super::bounded_write::run(op_timeout, session.commit_transaction()).await;
    match committed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NotCommitted::of(
            "committing the destination transaction".into(),
            &e,
        )),
        Err(abandoned) => Err(NotCommitted::fatal(
            abandoned
                .into_error("committing the destination transaction")
                .to_string(),
        )),
    }
}

//! Copied documents a unique secondary index refused (E11000) while a copy, force-sync or
//! repair was writing.
//!
//! Re-copies write into a destination collection that already has its unique indexes. Until
//! every range is written and the replay has caught up, another destination document may hold
//! a key only because it is stale: an extra the copy has not deleted yet, a document whose
//! range comes later, two documents that swapped keys. Such a refusal is not the document's
//! fault, so it is never dead-lettered on the spot (issue 9: a write may be dead-lettered only
//! after it failed in source order). Instead:
//! 1. within the range, after its extras are deleted, the refused documents are deleted on the
//!    destination and written again from the source's current version (this breaks swaps
//!    among them);
//! 2. what still conflicts is remembered in the checkpoint (`copy_duplicates`) and settled the
//!    same way after the last range, and again once the replay has caught up;
//! 3. only what still conflicts after [`FINAL_ATTEMPTS`] settles past the replay is
//!    dead-lettered, with the source's current document.

use std::collections::HashSet;

use bson::{Bson, RawDocumentBuf, Timestamp};

use crate::{
    apply::Applier, checkpoint::Checkpoint, error::SyncError, model::event::ts_key,
    model::id_key::IdKey, source::raw_id, worker::WorkerContext,
};

/// At most this many `_id`s wait in a checkpoint; beyond it a refused document is
/// dead-lettered at once (the checkpoint stays small).
pub const MAX_PENDING: usize = 10_000;
/// Settles after the replay caught up before a document that still conflicts is
/// dead-lettered (the stream may still be fixing the holder of its key).
pub const FINAL_ATTEMPTS: u32 = 3;

/// When a settle runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// While the copy (or force-sync, repair) is still writing: nothing is dead-lettered.
    Writing,
    /// After the replay caught up: the `attempt`-th settle there.
    CaughtUp { attempt: u32 },
}

/// Settles the documents of one range that a unique index refused, right after the range's
/// extras were deleted; what still conflicts joins `cp.copy_duplicates`.
pub async fn settle_range(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    refused: Vec<(RawDocumentBuf, String)>,
) -> Result<u64, SyncError> {
    if refused.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(refused.len());
    for (doc, _) in &refused {
        ids.push(raw_id(doc)?);
    }
    let (written, still) = rewrite(ctx, applier, &ids).await?;
    remember(applier, cp, still).await?;
    Ok(written)
}

/// The settles after the replay caught up, in memory (a restart starts counting again).
#[derive(Debug, Default)]
pub struct CaughtUpSettles {
    attempts: u32,
    /// The source's cluster time at the last settle's read: the next one waits until the
    /// stream has applied past it, so every event that could free a key was applied first.
    wait_for: Option<Timestamp>,
}

impl CaughtUpSettles {
    /// Whether the next settle may run now that the stream applied through `applied`.
    pub fn due(&self, applied: Option<Timestamp>) -> bool {
        match (self.wait_for, applied) {
            (None, _) => true,
            (Some(w), Some(a)) => ts_key(a) >= ts_key(w),
            (Some(_), None) => false,
        }
    }

    /// Settles `cp.copy_duplicates` once more, if due; true when none is left.
    pub async fn settle(
        &mut self,
        ctx: &WorkerContext,
        applier: &Applier,
        cp: &mut Checkpoint,
    ) -> Result<bool, SyncError> {
        if cp.copy_duplicates.is_empty() {
            return Ok(true);
        }
        if !self.due(cp.applied_through) {
            return Ok(false);
        }
        self.wait_for = Some(ctx.pipeline.source.cluster_time().await?);
        self.attempts += 1;
        settle_pending(
            ctx,
            applier,
            cp,
            Settle::CaughtUp {
                attempt: self.attempts,
            },
        )
        .await?;
        ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
        Ok(cp.copy_duplicates.is_empty())
    }
}

/// Settles `cp.copy_duplicates`; returns how many were written.
pub async fn settle_pending(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    when: Settle,
) -> Result<u64, SyncError> {
    if cp.copy_duplicates.is_empty() {
        return Ok(0);
    }
    let ids = std::mem::take(&mut cp.copy_duplicates);
    let (written, still) = rewrite(ctx, applier, &ids).await?;
    let label = ctx.label();
    match when {
        Settle::CaughtUp { attempt } if attempt >= FINAL_ATTEMPTS => {
            for (doc, msg) in &still {
                applier.dead_letter_copied(doc, 11000, msg).await?;
            }
            if !still.is_empty() {
                tracing::warn!(namespace = %label, documents = still.len(), "copied documents still conflict with a unique index after the replay caught up; dead-lettered");
            }
        }
        _ => {
            cp.copy_duplicates = still.iter().filter_map(|(d, _)| raw_id(d).ok()).collect();
            if !cp.copy_duplicates.is_empty() {
                tracing::info!(namespace = %label, documents = cp.copy_duplicates.len(), "copied documents wait for a unique key to be freed; retried after the replay");
            }
        }
    }
    Ok(written)
}

/// Deletes the destination's version of each `_id`, then writes the source's current one;
/// returns how many were written and those a unique index still refuses. An `_id` the source
/// no longer has stays deleted: its delete event is in the stream.
async fn rewrite(
    ctx: &WorkerContext,
    applier: &Applier,
    ids: &[Bson],
) -> Result<(u64, Vec<(RawDocumentBuf, String)>), SyncError> {
    let current = ctx.pipeline.source.fetch_documents(&ctx.ns, ids).await?;
    applier.delete_ids(ids).await?;
    let upserted = applier.upsert_documents(&current).await?;
    Ok((upserted.written, upserted.duplicates))
}

/// Adds what still conflicts to the checkpoint, dead-lettering beyond [`MAX_PENDING`].
async fn remember(
    applier: &Applier,
    cp: &mut Checkpoint,
    still: Vec<(RawDocumentBuf, String)>,
) -> Result<(), SyncError> {
    let mut known: HashSet<IdKey> = cp.copy_duplicates.iter().map(IdKey::of_bson).collect();
    for (doc, msg) in still {
        let id = raw_id(&doc)?;
        if !known.insert(IdKey::of_bson(&id)) {
            continue;
        }
        if cp.copy_duplicates.len() >= MAX_PENDING {
            applier.dead_letter_copied(&doc, 11000, &msg).await?;
        } else {
            cp.copy_duplicates.push(id);
        }
    }
    Ok(())
}

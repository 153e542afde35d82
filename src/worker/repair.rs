//! Repair of one `_id` range, run by the namespace worker between two batches (DESIGN §2.8):
//! apply is paused at position P (the worker's `applied_through`; nothing is in flight between
//! batches), the source range is read with `afterClusterTime ≥ P` in chunks of at most
//! [`RANGE_MAX_DOCS`] documents, source documents are upserted and destination documents the
//! source does not have are deleted, and the stream then resumes from P. Events after P that
//! the stream re-applies are replays of what the repair wrote (`replay_until` moves past the
//! repair), so the two cannot race.

use std::collections::HashSet;

use bson::Bson;

use super::{delete_budget, delete_extras, WorkerContext, RANGE_MAX_DOCS};
use crate::{
    apply::Applier,
    checkpoint::Checkpoint,
    error::{ErrorKind, SyncError},
    guard::GuardTrigger,
    model::event::ts_max,
    validate::{
        digest::IdKey,
        request::{RepairDone, RepairRequest},
        scan::{self, Side},
        throttle::Throttle,
    },
};

/// Handles a [`RepairRequest`] inside the worker's streaming loop. A failed repair is reported
/// to the requester; the stream goes on (its own failures surface on their own).
pub(super) async fn handle(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    request: RepairRequest,
) -> Result<(), SyncError> {
    if request.reply.is_closed() {
        // The validator gave up waiting (shutdown, timeout): nothing to do.
        return Ok(());
    }
    // Gated by the policy this worker runs (a reload may not have reached it yet, or may
    // have been refused): under any policy but source-wins the destination may differ on
    // purpose, and a repair would overwrite it.
    let conflict = ctx.current_conflict();
    if conflict.detects_conflicts() {
        let _ = request.reply.send(Err(format!(
            "not repaired: the worker runs conflict policy {}, which keeps destination changes",
            conflict.policy.as_str()
        )));
        return Ok(());
    }
    let result = repair_range(
        ctx,
        applier,
        cp,
        request.lower.as_ref(),
        request.upper.as_ref(),
    )
    .await;
    if let Err(e) = &result {
        tracing::warn!(namespace = %ctx.label(), error = %e, "repair of a validation range failed");
    }
    match result {
        Ok(done) => {
            let _ = request.reply.send(Ok(done));
            Ok(())
        }
        // The mass-delete guard pauses the namespace; a changed deployment stops it.
        Err(e)
            if matches!(
                e.kind,
                ErrorKind::MassDeleteGuard
                    | ErrorKind::SourceIdentityMismatch
                    | ErrorKind::DestinationReset
            ) =>
        {
            let _ = request.reply.send(Err(e.to_string()));
            Err(e)
        }
        Err(e) => {
            let _ = request.reply.send(Err(e.to_string()));
            Ok(())
        }
    }
}

async fn repair_range(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
) -> Result<RepairDone, SyncError> {
    let paused_at = cp.applied_through;
    let source = Side::source(
        ctx.pipeline.source.client(),
        &ctx.ns,
        &ctx.options,
        ctx.pipeline.source.op_timeout(),
    );
    let mut budget = delete_budget(ctx, GuardTrigger::Repair).await?;
    // Apply is paused while this runs: it is not throttled, so lag stays short.
    let unthrottled = Throttle::new(0);
    let mut done = RepairDone {
        paused_at,
        ..RepairDone::default()
    };
    let mut from = lower.cloned();
    loop {
        let (docs, next) = scan::read_range(
            &source,
            from.as_ref(),
            upper,
            RANGE_MAX_DOCS,
            paused_at,
            &unthrottled,
        )
        .await?;
        // The scan may have reached a replaced source: check before writing what it returned.
        ctx.pipeline.identity.verify().await?;
        let present: HashSet<IdKey> =
            docs.iter()
                .map(|d| {
                    d.get("_id").ok().flatten().map(IdKey::of).ok_or_else(|| {
                        SyncError::new(ErrorKind::SourceRead, "a document without _id")
                    })
                })
                .collect::<Result<_, _>>()?;
        let chunk_upper = next.as_ref().or(upper);
        // Extras first (a destination-only document may hold a unique key a source one needs),
        // scanned and deleted page by page: bounded memory even for the last, unbounded range.
        done.deleted += delete_extras(
            ctx,
            applier,
            from.as_ref(),
            chunk_upper,
            &present,
            &mut budget,
        )
        .await?
        .deleted;
        let upserted = applier.upsert_documents(&docs).await?;
        drop(docs);
        done.upserted += upserted.written;
        done.upserted +=
            crate::worker::unique_conflicts::settle_range(ctx, applier, cp, upserted.duplicates)
                .await?;
        match next {
            Some(n) => from = Some(n),
            None => break,
        }
    }
    done.upserted += crate::worker::unique_conflicts::settle_pending(
        ctx,
        applier,
        cp,
        crate::worker::unique_conflicts::Settle::Writing,
    )
    .await?;
    let end = ctx.pipeline.source.cluster_time().await?;
    cp.replay_until = Some(match cp.replay_until {
        Some(prev) => ts_max(prev, end),
        None => end,
    });
    ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    Ok(done)
}

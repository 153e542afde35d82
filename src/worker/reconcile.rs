//! Force-sync: every `_id` range re-read from the source and written over the destination,
//! extras deleted, resumable by range.

use super::*;

/// Copies (or reconciles) one `_id` range: writes the source documents, deletes destination
/// documents the source scan did not return. Returns (documents written, next lower bound).
pub(super) async fn sync_range(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    lower: Option<&Bson>,
    after: Option<Timestamp>,
    budget: &mut DeleteBudget,
) -> Result<(u64, Option<Bson>), SyncError> {
    let collation = ctx.options.get_document("collation").ok();
    let scanned = scan_range(&ctx.pipeline.source, &ctx.ns, collation, lower, None, after).await?;
    write_range(
        ctx,
        applier,
        &AsyncMutex::new(cp),
        &AsyncMutex::new(budget),
        lower,
        None,
        scanned,
    )
    .await
}

/// Force-sync (DESIGN §2.8): with apply paused at P, every range is re-read from the source
/// at a time ≥ P and written over the destination (extras deleted); events after P that the
/// stream then re-applies are replays.
///
/// Progress is checkpointed after every range (the next lower bound, and `replay_until`
/// moved past the range's writes), so a restart resumes at the next range. A stop request is
/// honoured between ranges (never in the middle of a write, which would be abandoned): the
/// force-sync is left recorded and resumes on the next run.
pub(super) async fn reconcile(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    stop: &CancellationToken,
) -> Result<(), SyncError> {
    let label = ctx.label();
    let key = ctx.key();
    let mut lower: Option<Bson> = match cp.reconcile_next.take() {
        Some(next) => {
            tracing::info!(namespace = %label, "force-sync resuming at its next range");
            next
        }
        None => {
            tracing::info!(namespace = %label, "force-sync: reconciling every range while the stream is paused");
            None
        }
    };
    cp.reconcile_next = Some(lower.clone());
    ctx.pipeline.checkpoints.save(&key, cp).await?;
    let started = Instant::now();
    let mut budget = delete_budget(ctx, GuardTrigger::ForceSync).await?;
    let mut total = 0u64;
    loop {
        if stop.is_cancelled() {
            tracing::info!(namespace = %label, documents = total, "force-sync interrupted by shutdown; it resumes at its next range on the next start");
            return Ok(());
        }
        let paused_at = cp.applied_through;
        let (written, next) =
            sync_range(ctx, applier, cp, lower.as_ref(), paused_at, &mut budget).await?;
        total += written;
        if next.is_none() {
            total +=
                crate::worker::unique_conflicts::settle_pending(ctx, applier, cp, Settle::Writing)
                    .await?;
        }
        // Events re-applied over this range up to now are replays of what it wrote.
        let end = ctx.pipeline.source.cluster_time().await?;
        cp.replay_until = Some(match cp.replay_until {
            Some(prev) => ts_max(prev, end),
            None => end,
        });
        cp.reconcile_next = next.clone().map(Some);
        ctx.pipeline.checkpoints.save(&key, cp).await?;
        ctx.made_progress();
        match next {
            Some(n) => lower = Some(n),
            None => break,
        }
    }
    tracing::info!(namespace = %label, documents = total, elapsed_ms = started.elapsed().as_millis() as u64, "force-sync finished");
    Ok(())
}

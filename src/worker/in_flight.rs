//! Read and apply overlapped (issue 11 item 4): a batch's writes run in a task of their own
//! while the worker reads the next batch, persists its applied mark and builds its statements;
//! the next batch writes only when this one has finished (an [`apply::turn`] chain), so the
//! destination sees every batch in stream order and never waits for the daemon between two.
//!
//! A batch is checkpointed by the worker once its writes are acknowledged, in order, so the
//! checkpoint still moves forward only, after durable writes (DESIGN §2.5). A crash while a
//! batch is in flight leaves the mark of the batch after it: both are replays on restart.

use super::*;
use crate::apply::turn::{self, Turn};
use tokio_util::task::AbortOnDropHandle;

/// A batch whose writes are running.
pub(super) struct InFlightBatch {
    events: Arc<[ChangeEvent]>,
    /// The events' bytes, counted in the daemon's budget until the batch is written.
    _buffered: Vec<BufferedBytes>,
    started: Instant,
    writes: AbortOnDropHandle<Result<ApplyStats, SyncError>>,
    /// The turn of the batch read after this one.
    next: Turn,
}

/// Whether a batch may be written in a task of its own, the worker reading on: plain data
/// events, no crash replay, source-wins writes (DDL, crash replays and conflict detection go
/// through [`process_batch`] with nothing else in flight).
pub(super) fn may_start(applier: &Applier, events: &[ChangeEvent], replays: usize) -> bool {
    replays == 0 && applier.may_overlap_batches() && events.iter().all(|e| e.kind.is_data())
}

/// Whether the batch in flight may still be checkpointed while the next one writes: its
/// checkpoint cannot end a copy's replay, whose end settles documents, builds unique indexes
/// and closes a history-loss streak, all of which must see every batch before it written and
/// none after it.
pub(super) fn may_commit_behind(
    ctx: &WorkerContext,
    cp: &Checkpoint,
    in_flight: Option<&InFlightBatch>,
) -> bool {
    let Some(batch) = in_flight else {
        return true;
    };
    let replay_over = ctx.caught_up.load(Ordering::Relaxed)
        && !cp.unique_indexes_pending
        && cp.history_lost_recopies == 0;
    let ends_before_replay_end = match (batch.events.last(), cp.replay_until) {
        (Some(last), Some(until)) => !at_or_after(last.cluster_time, until),
        _ => false,
    };
    replay_over || ends_before_replay_end
}

/// Persists the batch's applied mark, then starts its writes after those of `previous` (the
/// batch in flight, if any).
pub(super) async fn start(
    ctx: &WorkerContext,
    applier: &Arc<Applier>,
    cp: &Checkpoint,
    events: Vec<ChangeEvent>,
    buffered: Vec<BufferedBytes>,
    previous: Option<&InFlightBatch>,
) -> Result<InFlightBatch, SyncError> {
    let started = Instant::now();
    save_apply_mark(ctx, &events).await?;
    let events: Arc<[ChangeEvent]> = events.into();
    let (done, next) = turn::chain();
    let after = previous.map(|b| b.next.clone());
    let (applier, batch, replay_until) =
        (Arc::clone(applier), Arc::clone(&events), cp.replay_until);
    let writes = tokio::spawn(async move {
        let applied = turn::in_turn(after, applier.apply_events(&batch, replay_until)).await;
        done.finish(applied.is_ok());
        applied
    });
    Ok(InFlightBatch {
        events,
        _buffered: buffered,
        started,
        writes: AbortOnDropHandle::new(writes),
        next,
    })
}

/// Waits for the writes of the batch in flight (forever when there is none: a `select!`
/// branch guarded by `in_flight.is_some()`).
pub(super) async fn written(
    in_flight: &mut Option<InFlightBatch>,
) -> Result<ApplyStats, SyncError> {
    match in_flight {
        Some(batch) => (&mut batch.writes).await.unwrap_or_else(|e| {
            Err(SyncError::new(
                ErrorKind::InvariantViolated,
                format!("a batch's write task ended abnormally: {e}"),
            ))
        }),
        None => std::future::pending().await,
    }
}

/// Checkpoints a batch whose writes ended with `writes`.
pub(super) async fn commit(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    settles: &mut CaughtUpSettles,
    batch: InFlightBatch,
    writes: Result<ApplyStats, SyncError>,
) -> Result<(), SyncError> {
    let stats = writes?;
    commit_batch(
        ctx,
        applier,
        cp,
        &batch.events,
        false,
        stats,
        batch.started,
        settles,
        false,
    )
    .await
}

/// Waits for the batch in flight, if any, and checkpoints it; true when there was one.
pub(super) async fn finish(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    settles: &mut CaughtUpSettles,
    in_flight: &mut Option<InFlightBatch>,
) -> Result<bool, SyncError> {
    if in_flight.is_none() {
        return Ok(false);
    }
    let writes = written(in_flight).await;
    let batch = in_flight.take().expect("checked above");
    commit(ctx, applier, cp, settles, batch, writes).await?;
    Ok(true)
}

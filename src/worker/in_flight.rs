//! Read and apply overlapped (issue 11 item 4): a batch's writes run in a task of their own
//! while the worker reads the next batch and builds its statements; each batch writes only
//! when the one before has finished (an [`apply::turn`] chain), so the destination sees every
//! batch in stream order and never waits for the daemon between two.
//!
//! A batch's task saves its applied mark, after the mark of the batch before (marks only
//! move forward) and while that batch may still be writing, and builds its statements
//! meanwhile; it writes nothing before the mark is saved. When the worker saved the
//! mark itself, the save queued at the destination behind the writing batch's commands and
//! the worker could not start the next batch meanwhile: the destination sat idle between two
//! batches for 5–10 % of a drain. Up to [`MAX_BATCHES_IN_FLIGHT`] batches are started at once.
//!
//! A batch is checkpointed by the worker once its writes are acknowledged, in order, so the
//! checkpoint still moves forward only, after durable writes (DESIGN §2.5). A crash while
//! batches are in flight leaves the mark of the last one started: all of them are replays on
//! restart.

use std::collections::VecDeque;

use super::*;
use crate::apply::turn::{self, Turn};
use tokio_util::task::AbortOnDropHandle;

/// Batches started at once: one writing, the rest waiting for their turn.
pub(super) const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// The batches started and not yet checkpointed, oldest first.
#[derive(Default)]
pub(super) struct InFlight(VecDeque<InFlightBatch>);

impl InFlight {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The batch started last, which the next one writes after.
    pub(super) fn newest(&self) -> Option<&InFlightBatch> {
        self.0.back()
    }

    pub(super) fn push(&mut self, batch: InFlightBatch) {
        self.0.push_back(batch);
    }

    /// Waits for the writes of the oldest batch (forever when there is none: a `select!`
    /// branch guarded by `!is_empty()`), and takes it.
    pub(super) async fn oldest_written(
        &mut self,
    ) -> (InFlightBatch, Result<ApplyStats, SyncError>) {
        let writes = match self.0.front_mut() {
            Some(batch) => (&mut batch.writes).await.unwrap_or_else(|e| {
                Err(SyncError::new(
                    ErrorKind::InvariantViolated,
                    format!("a batch's write task ended abnormally: {e}"),
                ))
            }),
            None => std::future::pending().await,
        };
        (self.0.pop_front().expect("awaited above"), writes)
    }

    /// After an error: lets the batches still in flight end without checkpointing them (a
    /// write is never abandoned midway; a batch behind a failed one fails before it writes).
    /// Their marks make them replays for the next incarnation.
    pub(super) async fn wait_out(&mut self) {
        while !self.is_empty() {
            let _ = self.oldest_written().await;
        }
    }
}

/// A batch whose writes are running.
pub(super) struct InFlightBatch {
    events: Arc<[ChangeEvent]>,
    /// The events' bytes, counted in the daemon's budget until the batch is written.
    _buffered: Vec<BufferedBytes>,
    started: Instant,
    writes: AbortOnDropHandle<Result<ApplyStats, SyncError>>,
    /// Resolves when this batch's applied mark is saved (the next batch's mark waits for it).
    mark_saved: Turn,
    /// The turn of the batch read after this one.
    next: Turn,
}

/// Whether a batch may be written in a task of its own, the worker reading on: plain data
/// events, no crash replay, source-wins writes (DDL, crash replays and conflict detection go
/// through [`process_batch`] with nothing else in flight).
pub(super) fn may_start(applier: &Applier, events: &[ChangeEvent], replays: usize) -> bool {
    replays == 0 && applier.may_overlap_batches() && events.iter().all(|e| e.kind.is_data())
}

/// Whether the batches in flight may still be checkpointed while the next one writes: no
/// checkpoint of theirs can end a copy's replay, whose end settles documents, builds unique
/// indexes and closes a history-loss streak, all of which must see every batch before it
/// written and none after it. The newest batch ends last, so it decides for all of them.
pub(super) fn may_commit_behind(
    ctx: &WorkerContext,
    cp: &Checkpoint,
    in_flight: &InFlight,
) -> bool {
    let Some(batch) = in_flight.newest() else {
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

/// Starts a batch's task: its applied mark, saved after the newest batch in flight saved its
/// own, then its writes, after that batch's writes.
pub(super) fn start(
    ctx: &WorkerContext,
    applier: &Arc<Applier>,
    cp: &Checkpoint,
    events: Vec<ChangeEvent>,
    buffered: Vec<BufferedBytes>,
    in_flight: &InFlight,
) -> Result<InFlightBatch, SyncError> {
    let started = Instant::now();
    let mark = apply_mark(&events)?;
    let (marks, key) = (ctx.pipeline.checkpoints.clone(), ctx.key());
    let (mark_done, mark_saved) = turn::chain();
    let mark_after = in_flight.newest().map(|b| b.mark_saved.clone());
    let events: Arc<[ChangeEvent]> = events.into();
    let (done, next) = turn::chain();
    let after = in_flight.newest().map(|b| b.next.clone());
    let (applier, batch, replay_until) =
        (Arc::clone(applier), Arc::clone(&events), cp.replay_until);
    // The batch writes once the batch before has written and its own mark is saved.
    let turn = match after {
        Some(before) => before.and(mark_saved.clone()),
        None => mark_saved.clone(),
    };
    let writes = tokio::spawn(async move {
        // The mark is saved before the batch writes, after the mark of the batch before
        // (a mark never moves back), while that batch may still be writing: the worker
        // does not wait for it behind the writes queued at the destination.
        let save_mark = async {
            let previous_saved = match mark_after {
                Some(t) => t.come().await,
                None => true,
            };
            let saved = if !previous_saved {
                Err(SyncError::new(
                    ErrorKind::Cancelled,
                    "the batch before this one did not save its applied mark",
                ))
            } else if let Some(mark) = mark {
                marks.save_mark(&key, &mark).await
            } else {
                Ok(())
            };
            mark_done.finish(saved.is_ok());
            saved
        };
        // The statements are built while the mark is saved; only the writes wait for it.
        // The save often queues at the destination behind the batch before's writes, and
        // building the statements after it left the destination idle for 1–4 ms (a
        // `perf --timeline` drain: 7 of its 9 gaps over 1 ms ended just after a mark).
        let (saved, applied) = tokio::join!(
            save_mark,
            turn::in_turn(Some(turn), applier.apply_events(&batch, replay_until))
        );
        // A failed save is the batch's error (its writes then stopped on the turn).
        let result = saved.and(applied);
        done.finish(result.is_ok());
        result
    });
    Ok(InFlightBatch {
        events,
        _buffered: buffered,
        started,
        writes: AbortOnDropHandle::new(writes),
        mark_saved,
        next,
    })
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

/// Waits for the batches in flight, if any, and checkpoints them in order; true when there
/// was one.
pub(super) async fn finish(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    settles: &mut CaughtUpSettles,
    in_flight: &mut InFlight,
) -> Result<bool, SyncError> {
    finish_beyond(ctx, applier, cp, settles, in_flight, 0).await
}

/// Finishes the oldest batches until no more than [`MAX_BATCHES_IN_FLIGHT`] are in flight;
/// true when one was checkpointed.
pub(super) async fn finish_over_limit(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    settles: &mut CaughtUpSettles,
    in_flight: &mut InFlight,
) -> Result<bool, SyncError> {
    finish_beyond(ctx, applier, cp, settles, in_flight, MAX_BATCHES_IN_FLIGHT).await
}

/// Waits for the oldest batches and checkpoints them in order until `keep` are left in
/// flight; true when one was checkpointed. After an error the rest are waited out.
async fn finish_beyond(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    settles: &mut CaughtUpSettles,
    in_flight: &mut InFlight,
    keep: usize,
) -> Result<bool, SyncError> {
    let mut any = false;
    while in_flight.0.len() > keep {
        let (batch, writes) = in_flight.oldest_written().await;
        if let Err(e) = commit(ctx, applier, cp, settles, batch, writes).await {
            in_flight.wait_out().await;
            return Err(e);
        }
        any = true;
    }
    Ok(any)
}

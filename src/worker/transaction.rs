//! `apply.transactions = "atomic"` in the worker: one source transaction's part, collected
//! from the queue and written with the other members' parts (see `crate::model::transaction`).

use super::*;

/// Under `apply.transactions = "atomic"`: the group of the source transaction `ev` belongs to,
/// if this namespace's shared stream is routing one.
pub(super) fn transaction_group(ctx: &WorkerContext, ev: &ChangeEvent) -> Option<Arc<TxnGroup>> {
    transaction_group_of(ctx, &TxnKey::of(ev)?)
}

/// The open group of the source transaction `key` on this namespace's shared stream.
pub(super) fn transaction_group_of(ctx: &WorkerContext, key: &TxnKey) -> Option<Arc<TxnGroup>> {
    let registry = ctx.pipeline.streams.transactions.as_ref()?;
    let stream = ctx.pipeline.streams.stream_for(&ctx.ns.db)?;
    registry.find(&stream.name(), key)
}

/// Where a source transaction's part begins (see [`apply_transaction`]).
pub(super) struct TransactionStart<'a> {
    pub(super) group: Arc<TxnGroup>,
    pub(super) first: ChangeEvent,
    /// Receives an item read past the part that belongs to the next batch.
    pub(super) held: &'a mut Option<StreamItem>,
}

/// `apply.transactions = "atomic"`: this namespace's events of one source transaction, written
/// with the other members' parts in one destination transaction when every member can take
/// part, per document otherwise (which converges the same way). Everything before the
/// transaction has been applied when this runs.
#[allow(clippy::too_many_arguments)]
pub(super) async fn apply_transaction(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    feed: &mut Feed,
    start: TransactionStart<'_>,
    crash_replay: &mut CrashReplay,
    settles: &mut CaughtUpSettles,
    stop: &CancellationToken,
) -> Result<Option<WorkerExit>, SyncError> {
    let TransactionStart { group, first, held } = start;
    let label = ctx.label();
    // Events read from the own stream (a worker still joining) are not the shared reader's:
    // this worker cannot be counted on to bring them.
    let member = feed.is_shared();
    let mut events = vec![first];
    // The rest of the part follows in the queue; its size is known once the reader has seen
    // the end of the transaction.
    let complete = member
        && loop {
            let mut changed = group.subscribe();
            if let Some(n) = group.expected_for(&label) {
                if events.len() >= n {
                    break events.len() == n;
                }
            }
            tokio::select! {
                biased;
                _ = changed.changed() => {}
                item = feed.recv() => match item {
                    Some(StreamItem::Event(ev, _permit)) if TxnKey::of(&ev).as_ref() == Some(&group.key) => {
                        events.push(ev);
                    }
                    // A position mark: the next one comes within a second.
                    Some(StreamItem::Idle { .. }) => {}
                    other => {
                        *held = other;
                        // The reader closes a group before it routes anything after it, so
                        // a worker that wakes to both sees the count here: the part may be
                        // whole (only a stall or an eviction cuts one short).
                        break group.expected_for(&label) == Some(events.len());
                    }
                },
            }
        };
    record_read(ctx, &events);
    let replays = crash_replay.leading_replays(&events);
    let outcome = if !complete {
        if member {
            // Its part was cut short (a stall, an eviction): nobody can write it whole.
            group.member_left(&label);
        } else {
            // Read from its own stream while joining: applied per document here, the others
            // still write theirs together.
            group.excuse(&label);
        }
        TxnOutcome::PerDocument(format!("{label} did not receive its whole part"))
    } else if replays > 0 {
        group.decline(&format!("{label} is replaying a batch of a crashed run"));
        TxnOutcome::PerDocument("replaying".into())
    } else {
        match applier.transaction_part(&events, cp.replay_until).await? {
            Err(why) => {
                group.decline(&why);
                TxnOutcome::PerDocument(why)
            }
            Ok((part, stats)) => {
                save_apply_mark(ctx, &events).await?;
                match applier.take_part(&group, part, stop).await {
                    TxnOutcome::Committed => {
                        ctx.pipeline.metrics.transaction_part(true);
                        return process_batch(
                            ctx,
                            applier,
                            cp,
                            &events,
                            replays,
                            settles,
                            Some(stats),
                        )
                        .await;
                    }
                    other => other,
                }
            }
        }
    };
    if let TxnOutcome::PerDocument(why) = &outcome {
        tracing::debug!(namespace = %label, reason = %why, "a source transaction is applied per document");
    }
    ctx.pipeline.metrics.transaction_part(false);
    process_batch(ctx, applier, cp, &events, replays, settles, None).await
}

/// Records that the batch ending with `events`' last event may be applied past the
/// checkpoint, before any of it is written (see [`CrashReplay`]).
pub(super) async fn save_apply_mark(
    ctx: &WorkerContext,
    events: &[ChangeEvent],
) -> Result<(), SyncError> {
    let Some(mark) = apply_mark(events)? else {
        return Ok(());
    };
    ctx.pipeline.checkpoints.save_mark(&ctx.key(), &mark).await
}

/// The applied mark of `events`: their last event (none when empty).
pub(super) fn apply_mark(events: &[ChangeEvent]) -> Result<Option<ApplyMark>, SyncError> {
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let token = Document::try_from(last.token.clone()).map_err(|e| {
        SyncError::with_source(ErrorKind::InvariantViolated, "decoding a resume token", e)
    })?;
    Ok(Some(ApplyMark {
        cluster_time: last.cluster_time,
        token,
    }))
}

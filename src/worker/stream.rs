//! The streaming phase: read → batch → apply → checkpoint, from the namespace's own change
//! stream or the shared one it joined, with crash replays recognised and the end of a replay
//! settled.

use super::in_flight::{self, InFlight};
use super::*;

/// Events re-read after a crash between a batch and its checkpoint: everything up to and
/// including the persisted [`ApplyMark`] was possibly applied already, so it is a replay.
pub(super) struct CrashReplay {
    mark: Option<ApplyMark>,
}

impl CrashReplay {
    /// How many leading events of `events` are replays; consumes the mark once passed.
    pub(super) fn leading_replays(&mut self, events: &[ChangeEvent]) -> usize {
        let Some(mark) = self.mark.clone() else {
            return 0;
        };
        let mut n = 0;
        for ev in events {
            let (t, m) = (ts_key(ev.cluster_time), ts_key(mark.cluster_time));
            if t > m {
                self.mark = None;
                return n;
            }
            n += 1;
            if t == m && token_matches(ev, &mark.token) {
                self.mark = None;
                return n;
            }
        }
        n
    }
}

pub(super) fn token_matches(ev: &ChangeEvent, token: &Document) -> bool {
    Document::try_from(ev.token.clone()).is_ok_and(|t| t == *token)
}

/// The streaming phase.
pub(super) async fn stream(
    ctx: &WorkerContext,
    mut cp: Checkpoint,
    stop: &CancellationToken,
    abort: &CancellationToken,
    commands: &mut mpsc::Receiver<WorkerCommand>,
) -> Result<WorkerExit, SyncError> {
    let label = ctx.label();
    let key = ctx.key();
    ctx.set_state(WorkerState::Streaming);
    // A crash may have left a batch applied past the checkpoint: its events are replays.
    let mut crash_replay = CrashReplay {
        mark: ctx
            .pipeline
            .checkpoints
            .load_mark(&key)
            .await?
            // A mark the checkpoint reached (the batch was checkpointed) or passed is spent.
            .filter(|m| cp.resume_token.as_ref() != Some(&m.token))
            .filter(|m| {
                cp.applied_through
                    .is_none_or(|a| ts_key(m.cluster_time) >= ts_key(a))
            }),
    };
    let mut feed = Feed::new(stop, label.clone());
    join_shared_at_start(ctx, &mut feed, &mut cp, stop).await;
    if !feed.is_shared() && feed.own_settings().is_none() {
        feed.open_own(
            &ctx.own_stream(),
            cp.resume_token.as_ref(),
            ctx.configured_start(&cp),
        );
    }
    let mut settings = ctx.current_settings();
    let mut applier = Arc::new(ctx.applier());
    let mut last_checkpoint = Instant::now();
    // The batches whose writes run while the next one is read and prepared (see `in_flight`).
    let mut writing = InFlight::default();
    let mut settles = CaughtUpSettles::default();
    let mut last_join_attempt = Instant::now();
    // A force-sync interrupted by a restart resumes at its next range before anything else.
    let mut reconcile_pending = cp.reconcile_next.is_some();
    let mut described: Option<String> = None;
    // An item read while a batch was being collected that must start the next one (the
    // first event of a source transaction under `apply.transactions = "atomic"`).
    let mut held: Option<StreamItem> = None;
    // Waits for the batches in flight and checkpoints them in order: all of them (no
    // argument) before anything that needs every batch read so far applied (DDL, a
    // transaction, a reopened stream, an idle token, a command), or with `finish_over_limit`
    // only the oldest beyond `in_flight::MAX_BATCHES_IN_FLIGHT`.
    macro_rules! finish_writing {
        () => {
            finish_writing!(finish)
        };
        ($how:ident) => {
            // Some callers checkpoint again at once, so this time is not always read.
            #[allow(unused_assignments)]
            match in_flight::$how(ctx, &applier, &mut cp, &mut settles, &mut writing).await {
                Ok(true) => {
                    last_checkpoint = Instant::now();
                    feed.acknowledge(cp.resume_token.as_ref());
                }
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
    }
    let result = loop {
        let now_reading = feed.describe();
        if now_reading != described {
            ctx.pipeline
                .status
                .update(&label, |s| s.change_stream = now_reading.clone());
            described = now_reading;
        }
        // Batch boundary: adopt reloaded settings, run a requested force-sync.
        if ctx.adopt_reload().await {
            finish_writing!();
            settings = ctx.current_settings();
            applier = Arc::new(ctx.applier());
            ctx.report_write_lanes();
            let wanted = ctx.stream_settings();
            let changed = match feed.own_settings() {
                Some(own) => !same_stream(own, &wanted),
                None => !same_stream(&ctx.pipeline.streams.stream_settings(), &wanted),
            };
            if changed {
                tracing::info!(namespace = %label, "reopening the change stream for the reloaded settings");
                feed.leave_shared();
                feed.open_own(
                    &ctx.own_stream(),
                    cp.resume_token.as_ref(),
                    ctx.configured_start(&cp),
                );
            }
        }
        if ctx.signals.take_force_sync() || reconcile_pending {
            finish_writing!();
            reconcile_pending = false;
            match reconcile(ctx, &applier, &mut cp, stop).await {
                Ok(()) => {}
                Err(e) => break Err(e),
            }
            continue;
        }
        let first = match held.take() {
            Some(item) => Some(item),
            None => tokio::select! {
                biased;
                _ = abort.cancelled() => break Err(cancelled()),
                _ = ctx.signals.notify.notified() => continue,
                Some(cmd) = commands.recv() => {
                    finish_writing!();
                    match cmd {
                        WorkerCommand::RepairRange(request) => {
                            if let Err(e) = super::repair::handle(ctx, &applier, &mut cp, *request).await {
                                break Err(e);
                            }
                        }
                    }
                    continue;
                }
                item = feed.recv() => item,
                (batch, writes) = writing.oldest_written(), if !writing.is_empty() => {
                    if let Err(e) = in_flight::commit(ctx, &applier, &mut cp, &mut settles, batch, writes).await {
                        break Err(e);
                    }
                    last_checkpoint = Instant::now();
                    feed.acknowledge(cp.resume_token.as_ref());
                    // Joining picks up at the checkpoint: only once nothing is in flight.
                    if writing.is_empty() {
                        join_when_caught_up(ctx, &mut feed, &cp, stop, &mut last_join_attempt).await;
                    }
                    continue;
                }
            },
        };
        let first = match first {
            Some(StreamItem::Event(ev, permit)) => match transaction_group(ctx, &ev) {
                Some(group) => {
                    drop(permit);
                    finish_writing!();
                    let applied = apply_transaction(
                        ctx,
                        &applier,
                        &mut cp,
                        &mut feed,
                        TransactionStart {
                            group,
                            first: ev,
                            held: &mut held,
                        },
                        &mut crash_replay,
                        &mut settles,
                        stop,
                    )
                    .await;
                    match applied {
                        Ok(Some(exit)) => break Ok(exit),
                        Ok(None) => {
                            last_checkpoint = Instant::now();
                            feed.acknowledge(cp.resume_token.as_ref());
                        }
                        Err(e) => break Err(e),
                    }
                    continue;
                }
                None => Some(StreamItem::Event(ev, permit)),
            },
            other => other,
        };
        let mut batch: Vec<(ChangeEvent, BufferedBytes)> = Vec::new();
        let mut failure = None;
        let mut stalled = false;
        // An idle token received after every event of this batch (the reader sends it only
        // once its buffer is empty, so nothing read before it is still queued).
        let mut idle_after_batch: Option<(Document, Option<Timestamp>)> = None;
        match first {
            None => break Ok(WorkerExit::Stopped),
            Some(StreamItem::Failed(e)) => break Err(e),
            Some(StreamItem::Stalled) => stalled = true,
            Some(StreamItem::Idle {
                token,
                cluster_time,
            }) => idle_after_batch = Some((token, cluster_time)),
            Some(StreamItem::Event(ev, permit)) => {
                let mut bytes = ev.size();
                batch.push((ev, permit));
                // The wait counts from when the first event was read, not from when this
                // loop got to it: events that queued while the last batch was applied are
                // already late, so a busy stream sends what it has at once (the batch holds
                // everything queued meanwhile) and a quiet one still gathers bursts.
                let deadline =
                    tokio::time::Instant::from_std(batch[0].0.received) + settings.batch_max_wait;
                while batch.len() < settings.batch_max_events && bytes < settings.batch_max_bytes {
                    let next = tokio::select! {
                        biased;
                        n = feed.recv() => n,
                        _ = tokio::time::sleep_until(deadline) => break,
                    };
                    match next {
                        Some(StreamItem::Event(ev, permit)) => {
                            if transaction_group(ctx, &ev).is_some() {
                                // A source transaction starts: what came before is applied first.
                                held = Some(StreamItem::Event(ev, permit));
                                break;
                            }
                            bytes += ev.size();
                            batch.push((ev, permit));
                        }
                        Some(StreamItem::Idle {
                            token,
                            cluster_time,
                        }) => {
                            idle_after_batch = Some((token, cluster_time));
                            break;
                        }
                        Some(StreamItem::Stalled) => {
                            stalled = true;
                            break;
                        }
                        Some(StreamItem::Failed(e)) => {
                            failure = Some(e);
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        if !batch.is_empty() {
            ctx.pipeline.metrics.set_queue(&label, feed.queued() as u64);
            // The events' bytes stay counted in the daemon's budget until they are written.
            let (events, buffered): (Vec<ChangeEvent>, Vec<BufferedBytes>) =
                batch.into_iter().unzip();
            let buffered = BufferedBytes::merge_runs(buffered);
            record_read(ctx, &events);
            let replays = crash_replay.leading_replays(&events);
            // Under ha.fencing = "transaction" a batch and its checkpoint are one transaction:
            // batches are written one at a time.
            if in_flight::may_start(&applier, &events, replays)
                && !ctx.pipeline.checkpoints.fences_by_transaction()
            {
                // This batch is prepared while the ones before are written, then written
                // while the next ones are read.
                if !in_flight::may_commit_behind(ctx, &cp, &writing) {
                    finish_writing!();
                }
                let started = in_flight::start(ctx, &applier, &cp, events, buffered, &writing);
                match started {
                    Ok(started) => writing.push(started),
                    Err(e) => break Err(e),
                }
                finish_writing!(finish_over_limit);
            } else {
                finish_writing!();
                match process_batch(ctx, &applier, &mut cp, &events, replays, &mut settles, None)
                    .await
                {
                    Ok(Some(exit)) => break Ok(exit),
                    Ok(None) => {
                        last_checkpoint = Instant::now();
                        feed.acknowledge(cp.resume_token.as_ref());
                        join_when_caught_up(ctx, &mut feed, &cp, stop, &mut last_join_attempt)
                            .await;
                    }
                    Err(e) => break Err(e),
                }
                drop(buffered);
            }
        }
        let skipped = feed.take_skipped();
        if skipped > 0 {
            ctx.pipeline.metrics.already_applied(&label, skipped);
        }
        // A transaction this namespace had applied before a restart: its other members write
        // theirs without waiting for this one.
        for txn in feed.take_skipped_transactions() {
            if let Some(group) = transaction_group_of(ctx, &txn) {
                group.excuse(&label);
            }
        }
        if let Some(e) = failure {
            finish_writing!();
            break Err(e);
        }
        if stalled {
            finish_writing!();
            // Everything read before the stall (or the shared stream's end) is applied and
            // checkpointed: reopen there.
            feed.leave_shared();
            feed.open_own(
                &ctx.own_stream(),
                cp.resume_token.as_ref(),
                ctx.configured_start(&cp),
            );
            continue;
        }
        // Idle: every event read before the token is applied and checkpointed, so the
        // postBatchResumeToken may be checkpointed (DESIGN §2.5), unless more was read since.
        if let Some((token, cluster_time)) = idle_after_batch.take() {
            finish_writing!();
            if let Some(ts) = cluster_time {
                ctx.observe_source_time(ts);
            }
            if feed.is_shared() {
                // The shared stream's watermark checkpoints this namespace (DESIGN §2.11): an
                // idle mark only moves its applied position.
                feed.note_position(&token);
                feed.acknowledge(cp.resume_token.as_ref());
                let advanced = cluster_time
                    .filter(|ts| cp.applied_through.is_none_or(|a| ts_key(*ts) > ts_key(a)));
                if let Some(ts) = advanced {
                    cp.applied_through = Some(ts);
                }
                // The end of a replay (settles, unique indexes, a history-loss streak) is
                // reached while quiet too; it is done before the status says caught up.
                let replay_open = !ctx.caught_up.load(Ordering::Relaxed)
                    || cp.unique_indexes_pending
                    || cp.history_lost_recopies > 0;
                if replay_open {
                    maybe_finish_replay(ctx, &applier, &mut cp, &mut settles).await?;
                }
                if advanced.is_some() {
                    ctx.pipeline.status.record_checkpoint(
                        &ctx.pipeline.metrics,
                        &label,
                        None,
                        cp.applied_through,
                    );
                }
                continue;
            }
            if feed.queued() == 0 && !feed.is_joining() {
                // The own stream is caught up: join the shared stream if the plan has one.
                feed.note_position(&token);
                join_shared(ctx, &mut feed, &cp, stop).await;
                if feed.is_shared() {
                    continue;
                }
            }
            if feed.queued() == 0 && last_checkpoint.elapsed() >= settings.checkpoint_interval {
                let advances = match (cluster_time, cp.applied_through) {
                    (Some(new), Some(old)) => ts_key(new) >= ts_key(old),
                    _ => true,
                };
                if advances {
                    cp.resume_token = Some(token);
                    if let Some(ts) = cluster_time {
                        cp.applied_through = Some(ts);
                    }
                    ctx.pipeline.checkpoints.save(&key, &cp).await?;
                    ctx.record_checkpoint(cp.applied_through);
                    last_checkpoint = Instant::now();
                    maybe_finish_replay(ctx, &applier, &mut cp, &mut settles).await?;
                }
            }
            ctx.pipeline.metrics.set_queue(&label, feed.queued() as u64);
        }
    };
    // Batches still being written are finished and checkpointed (a clean stop drains them);
    // an aborted worker abandons them like a crash would (their marks make them replays).
    let result = if abort.is_cancelled() {
        drop(writing);
        result
    } else {
        match in_flight::finish(ctx, &applier, &mut cp, &mut settles, &mut writing).await {
            Err(e) if result.is_ok() => Err(e),
            _ => result,
        }
    };
    feed.close().await;
    result
}

/// Under steady writes an own stream is never idle: a drained queue after a checkpointed
/// batch means caught up too, so the worker tries to join its shared stream (at most once
/// every [`JOIN_ATTEMPT_EVERY`]).
async fn join_when_caught_up(
    ctx: &WorkerContext,
    feed: &mut Feed,
    cp: &Checkpoint,
    stop: &CancellationToken,
    last_join_attempt: &mut Instant,
) {
    if !feed.is_shared()
        && !feed.is_joining()
        && feed.queued() == 0
        && last_join_attempt.elapsed() >= JOIN_ATTEMPT_EVERY
    {
        *last_join_attempt = Instant::now();
        join_shared(ctx, feed, cp, stop).await;
    }
}

/// The shared stream this namespace reads under the plan, unless its stream settings differ
/// from the shared ones (a policy that needs full documents or pre-images) or it is not
/// streaming yet.
pub(super) fn shared_stream_of(ctx: &WorkerContext) -> Option<SharedStreamKey> {
    let streams = &ctx.pipeline.streams;
    let key = streams.stream_for(&ctx.ns.db)?;
    same_stream(&streams.stream_settings(), &ctx.stream_settings()).then_some(key)
}

/// How often a worker on its own stream under steady writes tries to join its shared stream.
pub(super) const JOIN_ATTEMPT_EVERY: Duration = Duration::from_secs(1);

/// How long a worker waits for a shared reader to answer before reading on by itself.
pub(super) const SHARED_STREAM_ANSWER: Duration = Duration::from_secs(10);

/// At the start of streaming: a namespace the last shared watermark recorded resumes from the
/// later of its checkpoint and that position, and joins at once when it is not behind the
/// shared reader.
pub(super) async fn join_shared_at_start(
    ctx: &WorkerContext,
    feed: &mut Feed,
    cp: &mut Checkpoint,
    stop: &CancellationToken,
) {
    let Some(key) = shared_stream_of(ctx) else {
        return;
    };
    let streams = Arc::clone(&ctx.pipeline.streams);
    let label = ctx.label();
    let probe = tokio::select! {
        _ = stop.cancelled() => return,
        p = tokio::time::timeout(SHARED_STREAM_ANSWER, streams.probe(&key, &label, ctx.uuid)) => p,
    };
    let Ok(Some(probe)) = probe else {
        return;
    };
    if let Some(applied) = &probe.applied {
        feed.note_position(applied);
        if let Some(ts) = raw_token(applied).and_then(|t| token_cluster_time(&t)) {
            if cp.applied_through.is_none_or(|a| ts_key(ts) > ts_key(a)) {
                cp.applied_through = Some(ts);
            }
        }
    }
    let at = raw_token(&probe.at);
    let caught_up = match (feed.effective(cp.resume_token.as_ref()), at) {
        (Some(applied), Some(at)) => !token_after(&at, &applied),
        _ => false,
    };
    if caught_up {
        join_shared(ctx, feed, cp, stop).await;
        if feed.is_joining() {
            // The reader moved on between the probe and the join: read up to it.
            feed.open_own(
                &ctx.own_stream(),
                cp.resume_token.as_ref(),
                ctx.configured_start(cp),
            );
        }
    }
}

/// Joins the namespace's shared stream, if the plan has one (see [`Feed::join`]).
pub(super) async fn join_shared(
    ctx: &WorkerContext,
    feed: &mut Feed,
    cp: &Checkpoint,
    stop: &CancellationToken,
) {
    if cp.phase != Phase::Streaming {
        return;
    }
    let Some(key) = shared_stream_of(ctx) else {
        return;
    };
    // Only a worker that knows where it is can say what the shared stream must not skip.
    let Some(applied) = feed.effective(cp.resume_token.as_ref()) else {
        return;
    };
    let streams = Arc::clone(&ctx.pipeline.streams);
    let label = ctx.label();
    let joined = tokio::select! {
        _ = stop.cancelled() => return,
        j = tokio::time::timeout(SHARED_STREAM_ANSWER, streams.join(&key, &label, ctx.uuid, applied)) => j,
    };
    if let Ok(Some(subscription)) = joined {
        let stream = subscription.stream.clone();
        feed.join(subscription, cp.resume_token.as_ref());
        tracing::info!(namespace = %ctx.label(), stream = %stream, switched = feed.is_shared(), "joined the shared change stream");
    }
}

/// Once replay has passed the copy's end: copied documents a unique index refused are settled
/// (the namespace is not caught up until they are), unique indexes can be built, and a
/// history-loss streak is over.
pub(super) async fn maybe_finish_replay(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    settles: &mut CaughtUpSettles,
) -> Result<(), SyncError> {
    if let (Some(applied), Some(until)) = (cp.applied_through, cp.replay_until) {
        if !at_or_after(applied, until) {
            return Ok(());
        }
    }
    if !settles.settle(ctx, applier, cp).await? {
        return Ok(());
    }
    ctx.caught_up.store(true, Ordering::Relaxed);
    if cp.replay_until.is_none() {
        return Ok(());
    }
    if cp.unique_indexes_pending || cp.history_lost_recopies > 0 {
        if cp.unique_indexes_pending {
            crate::worker::dest_collection::create_indexes(ctx, cp, true).await?;
            cp.unique_indexes_pending = false;
        }
        cp.history_lost_recopies = 0;
        ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    }
    Ok(())
}

/// Applies one batch in order (data runs through the applier; DDL events one at a time),
/// then checkpoints the last event's token. The first `replays` events were possibly applied
/// before a crash (see [`CrashReplay`]) and are applied as replays. Before any write, the
/// batch's last event is persisted as the applied high-water mark, so a crash before the
/// checkpoint makes its events replays on the next run.
/// Applies a batch and checkpoints it. `applied`: the batch's data events were already
/// written (a source transaction written atomically) and counted so; only the checkpoint and
/// the accounting remain.
pub(super) async fn process_batch(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    events: &[ChangeEvent],
    replays: usize,
    settles: &mut CaughtUpSettles,
    applied: Option<ApplyStats>,
) -> Result<Option<WorkerExit>, SyncError> {
    let label = ctx.label();
    let started = Instant::now();
    if applied.is_none() {
        if let Some(stats) = apply_fenced_by_transaction(ctx, applier, cp, events, replays).await? {
            commit_batch(
                ctx, applier, cp, events, false, stats, started, settles, true,
            )
            .await?;
            return Ok(None);
        }
    }
    if replays < events.len() && applied.is_none() {
        save_apply_mark(ctx, events).await?;
    }
    let already_applied = applied.is_some();
    let mut stats = applied.unwrap_or_default();
    let mut exit = None;
    let mut segment_start = if already_applied { events.len() } else { 0 };
    let mut applied_events = segment_start;
    for (i, ev) in events.iter().enumerate().skip(segment_start) {
        if ev.kind.is_data() {
            continue;
        }
        if segment_start < i {
            merge(
                &mut stats,
                apply_segment(applier, events, segment_start..i, replays, cp.replay_until).await?,
            );
        }
        segment_start = i + 1;
        applied_events = i + 1;
        let ddl_exit = apply_ddl(ctx, cp, ev).await?;
        // Indexes or validation options may have changed: look at the catalog again.
        applier.forget_catalog();
        if let Some(e) = ddl_exit {
            exit = Some(e);
            break;
        }
        ctx.pipeline.metrics.events_applied(&label, ApplyOp::Ddl, 1);
    }
    if exit.is_none() && segment_start < events.len() {
        merge(
            &mut stats,
            apply_segment(
                applier,
                events,
                segment_start..events.len(),
                replays,
                cp.replay_until,
            )
            .await?,
        );
        applied_events = events.len();
    }
    commit_batch(
        ctx,
        applier,
        cp,
        &events[..applied_events],
        exit == Some(WorkerExit::NamespaceGone),
        stats,
        started,
        settles,
        false,
    )
    .await?;
    Ok(exit)
}

/// `ha.fencing = "transaction"`: a batch of data events is written with its checkpoint in one
/// destination transaction that a later lease epoch makes fail. Replays (the copy's replay
/// window, and the first `replays` events, possibly applied before a crash) read the
/// documents they need from the source first, as the per-document path does. `None`: not
/// this mode, or not such a batch; it is applied the usual way (lease-fenced).
async fn apply_fenced_by_transaction(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    events: &[ChangeEvent],
    replays: usize,
) -> Result<Option<ApplyStats>, SyncError> {
    let Some(last) = events.last() else {
        return Ok(None);
    };
    if !events.iter().all(|ev| ev.kind.is_data()) {
        return Ok(None);
    }
    let mut next = cp.clone();
    advance_checkpoint(&mut next, last)?;
    let Some(write) = ctx.pipeline.checkpoints.fencing_write(&ctx.key(), &next)? else {
        return Ok(None);
    };
    let replay_until = match replays.checked_sub(1).and_then(|i| events.get(i)) {
        Some(crashed) => Some(match cp.replay_until {
            Some(r) => ts_max(r, crashed.cluster_time),
            None => crashed.cluster_time,
        }),
        None => cp.replay_until,
    };
    let stats = applier.apply_fenced(events, replay_until, write).await?;
    if stats.is_some() {
        *cp = next;
    }
    Ok(stats)
}

/// Moves `cp` to just after `last`.
fn advance_checkpoint(cp: &mut Checkpoint, last: &ChangeEvent) -> Result<(), SyncError> {
    cp.resume_token = Some(last.token.clone().try_into().map_err(|e| {
        SyncError::with_source(ErrorKind::InvariantViolated, "decoding a resume token", e)
    })?);
    cp.applied_through = Some(match cp.applied_through {
        Some(prev) => ts_max(prev, last.cluster_time),
        None => last.cluster_time,
    });
    Ok(())
}

/// After a batch's writes (`applied`: its events up to a DDL event that ended the namespace,
/// if one did): checkpoints the last one's token (or, the namespace gone, deletes the
/// checkpoint; `checkpoint_saved`: the batch's transaction wrote it) and counts what was
/// applied.
#[allow(clippy::too_many_arguments)]
pub(super) async fn commit_batch(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    applied: &[ChangeEvent],
    namespace_gone: bool,
    stats: ApplyStats,
    started: Instant,
    settles: &mut CaughtUpSettles,
    checkpoint_saved: bool,
) -> Result<(), SyncError> {
    let label = ctx.label();
    if namespace_gone {
        ctx.pipeline.checkpoints.delete(&ctx.key()).await?;
    } else if let Some(last) = applied.last() {
        advance_checkpoint(cp, last)?;
        if !checkpoint_saved {
            ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
        }
        ctx.record_checkpoint(cp.applied_through);
        maybe_finish_replay(ctx, applier, cp, settles).await?;
    }
    ctx.made_progress();
    for (op, n) in ApplyOp::ALL.iter().zip(stats.applied) {
        if n > 0 {
            ctx.pipeline.metrics.events_applied(&label, *op, n);
        }
    }
    ctx.pipeline.metrics.writes(&label, stats.writes);
    if stats.replay_skipped > 0 {
        ctx.pipeline
            .metrics
            .replay_skipped(&label, stats.replay_skipped);
    }
    let now = SystemTime::now();
    for ev in applied {
        if let Some(wall) = ev.wall_time {
            let secs = now
                .duration_since(wall.to_system_time())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            ctx.pipeline.metrics.observe_replication_latency(secs);
        }
    }
    ctx.pipeline.metrics.observe_batch(started.elapsed());
    let total: u64 = stats.applied.iter().sum();
    ctx.pipeline
        .status
        .update(&label, |s| s.events_applied += total);
    ctx.report_write_lanes();
    Ok(())
}

/// Applies the data events `events[range]`: those before index `replays` as replays of a
/// crashed run, the rest with the checkpoint's `replay_until`.
pub(super) async fn apply_segment(
    applier: &Applier,
    events: &[ChangeEvent],
    range: std::ops::Range<usize>,
    replays: usize,
    replay_until: Option<Timestamp>,
) -> Result<ApplyStats, SyncError> {
    let split = replays.clamp(range.start, range.end);
    let mut stats = ApplyStats::default();
    if range.start < split {
        let through = events[split - 1].cluster_time;
        let until = Some(match replay_until {
            Some(r) => ts_max(r, through),
            None => through,
        });
        merge(
            &mut stats,
            applier
                .apply_events(&events[range.start..split], until)
                .await?,
        );
    }
    if split < range.end {
        merge(
            &mut stats,
            applier
                .apply_events(&events[split..range.end], replay_until)
                .await?,
        );
    }
    Ok(stats)
}

pub(super) fn merge(into: &mut ApplyStats, from: ApplyStats) {
    for (a, b) in into.applied.iter_mut().zip(from.applied) {
        *a += b;
    }
    into.writes += from.writes;
    into.replay_skipped += from.replay_skipped;
    into.dead_letters += from.dead_letters;
    into.repaired += from.repaired;
}

/// Counts events read for a batch and moves the source's cluster time to its latest event.
pub(super) fn record_read(ctx: &WorkerContext, events: &[ChangeEvent]) {
    ctx.pipeline
        .metrics
        .events_read(&ctx.label(), events.len() as u64);
    if let Some(latest) = events
        .iter()
        .map(|e| e.cluster_time)
        .max_by_key(|t| ts_key(*t))
    {
        ctx.observe_source_time(latest);
    }
}

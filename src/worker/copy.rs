//! The initial copy (DESIGN §2.3): T0, the destination collection, `_id` ranges written at
//! insert speed with the next one read meanwhile, parallel lanes (`copy.parallel_ranges`),
//! destination extras deleted under the mass-delete guard, every finished range checkpointed.

use super::*;

/// `sync.initial_copy = "skip"`: persists where the first stream starts before anything is
/// applied, as T0 is for a copy, so a restart before the first checkpoint resumes there
/// instead of at a new "now". With `sync.start_at_operation_time` the configured time is that
/// position already (the stream reopens there until its first checkpoint).
pub(super) async fn skip_copy_start(ctx: &WorkerContext) -> Result<Checkpoint, SyncError> {
    let mut cp = Checkpoint {
        phase: Phase::Streaming,
        copy: CopyProgress {
            done: true,
            ..CopyProgress::default()
        },
        ..Checkpoint::default()
    };
    if ctx.current_settings().start_at_operation_time.is_none() {
        let stream = ctx
            .pipeline
            .source
            .open_stream(&ctx.ns, StreamStart::Now, &ctx.stream_settings())
            .await?;
        let token = stream.resume_token().ok_or_else(|| {
            SyncError::new(
                ErrorKind::SourceRead,
                "the change stream gave no start token",
            )
        })?;
        let token = serialize_token(&token)?;
        cp.applied_through = RawDocumentBuf::try_from(&token)
            .ok()
            .and_then(|t| token_cluster_time(&t));
        cp.start_token = Some(token.clone());
        cp.resume_token = Some(token);
    }
    ctx.pipeline.checkpoints.reset(&ctx.key(), &cp).await?;
    tracing::info!(namespace = %ctx.label(), "initial copy skipped by configuration; streaming from the configured start, persisted before applying anything");
    Ok(cp)
}

/// What [`delete_extras`] found in a range of the destination.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RangeOnDestination {
    /// Documents whose `_id` the source range also holds (left in place).
    pub kept: u64,
    /// Documents only the destination held (deleted).
    pub deleted: u64,
}

/// Deletes the destination documents in `[lower, upper)` (`None` = unbounded) whose `_id` is
/// not in `present`. The destination's `_id`s are read in pages of [`EXTRAS_PAGE_IDS`] (index
/// order, the collection's collation) and each page's extras are deleted before the next page
/// is read, so memory stays bounded however many documents the range holds on the
/// destination. A page starts at the last `_id` of the previous one (inclusive): that
/// document is either in `present` or already deleted, so nothing is scanned twice as extra.
pub(crate) async fn delete_extras(
    ctx: &WorkerContext,
    applier: &Applier,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    present: &HashSet<IdKey>,
    budget: &mut DeleteBudget,
) -> Result<RangeOnDestination, SyncError> {
    let mut pages = DestinationIds::new(ctx, lower, upper);
    let mut found = RangeOnDestination::default();
    while let Some((kept, extras)) = pages.next_page(present).await? {
        found.kept += kept;
        if !extras.is_empty() {
            // The mass-delete guard decides before anything of this page is deleted.
            budget.charge(extras.len() as u64)?;
            found.deleted += applier.delete_ids(&extras).await?;
        }
    }
    Ok(found)
}

/// The destination's extras in `[lower, upper)` (see [`delete_extras`]) without deleting
/// them, with the count of documents kept; `None` past `max` extras.
async fn extras_in_range(
    ctx: &WorkerContext,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    present: &HashSet<IdKey>,
    max: usize,
) -> Result<Option<(u64, Vec<Bson>)>, SyncError> {
    let mut pages = DestinationIds::new(ctx, lower, upper);
    let (mut kept, mut all) = (0, Vec::new());
    while let Some((page_kept, extras)) = pages.next_page(present).await? {
        kept += page_kept;
        all.extend(extras);
        if all.len() > max {
            return Ok(None);
        }
    }
    Ok(Some((kept, all)))
}

/// The destination's `_id`s in a range, read in pages of [`EXTRAS_PAGE_IDS`] (index order,
/// the collection's collation), so memory stays bounded however many documents the range
/// holds. A page starts at the last `_id` of the previous one (inclusive), which it skips.
struct DestinationIds<'a> {
    coll: mongodb::Collection<RawDocumentBuf>,
    upper: Option<&'a Bson>,
    from: Option<Bson>,
    continued: bool,
    done: bool,
}

impl<'a> DestinationIds<'a> {
    fn new(ctx: &WorkerContext, lower: Option<&Bson>, upper: Option<&'a Bson>) -> Self {
        DestinationIds {
            coll: ctx
                .pipeline
                .dest
                .database(&ctx.target.db)
                .collection::<RawDocumentBuf>(&ctx.target.coll),
            upper,
            from: lower.cloned(),
            continued: false,
            done: false,
        }
    }

    /// The next page: how many of its `_id`s `present` holds, and the others (extras).
    async fn next_page(
        &mut self,
        present: &HashSet<IdKey>,
    ) -> Result<Option<(u64, Vec<Bson>)>, SyncError> {
        if self.done {
            return Ok(None);
        }
        let list_error = |e| {
            SyncError::mongo(
                ErrorKind::DestinationWrite,
                "listing destination documents",
                e,
            )
        };
        let mut find = self
            .coll
            .find(doc! {})
            .hint(Hint::Keys(doc! {"_id": 1}))
            .min(doc! {"_id": self.from.clone().unwrap_or(Bson::MinKey)})
            .projection(doc! {"_id": 1})
            .limit(EXTRAS_PAGE_IDS as i64)
            .batch_size(EXTRAS_PAGE_IDS as u32);
        if let Some(u) = self.upper {
            find = find.max(doc! {"_id": u.clone()});
        }
        let page: Vec<RawDocumentBuf> = match find.await {
            Ok(c) => c.try_collect().await.map_err(list_error)?,
            Err(e) if crate::source::is_namespace_not_found(&e) => Vec::new(),
            Err(e) => return Err(list_error(e)),
        };
        let full = page.len() >= EXTRAS_PAGE_IDS;
        let (mut kept, mut extras, mut last) = (0, Vec::new(), None);
        for d in &page {
            let id = raw_id(d)?;
            if self.continued && self.from.as_ref() == Some(&id) {
                // The previous page's last `_id`: counted there (an extra is gone by now, or
                // collected there).
            } else if present.contains(&IdKey::of_bson(&id)) {
                kept += 1;
            } else {
                extras.push(id.clone());
            }
            last = Some(id);
        }
        match last {
            Some(id) if full => {
                self.from = Some(id);
                self.continued = true;
            }
            _ => self.done = true,
        }
        Ok(Some((kept, extras)))
    }
}

pub(super) fn id_set(docs: &[RawDocumentBuf]) -> Result<HashSet<IdKey>, SyncError> {
    docs.iter()
        .map(|d| raw_id(d).map(|id| IdKey::of_bson(&id)))
        .collect()
}

/// One source `_id` range as a copy reads it: its documents and the next range's lower bound
/// (`None` after the last).
pub(super) type ScannedRange = (Vec<RawDocumentBuf>, Option<Bson>);

/// Reads the source range starting at `lower`, below `upper` (a lane's end) when given (see
/// [`crate::source::Source::scan_range`]).
pub(super) async fn scan_range(
    source: &crate::source::Source,
    ns: &Namespace,
    collation: Option<&Document>,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    after: Option<Timestamp>,
) -> Result<ScannedRange, SyncError> {
    source
        .scan_range_below(
            ns,
            lower,
            upper,
            RANGE_MAX_DOCS,
            RANGE_MAX_BYTES,
            after,
            collation,
        )
        .await
}

/// Reads the source range starting at `lower` in a task of its own, so a copy reads range
/// i+1 while it writes range i (issue 11 item 6). Dropping the handle stops the read.
pub(super) fn prefetch_range(
    ctx: &WorkerContext,
    lower: Option<Bson>,
    upper: Option<Bson>,
    after: Option<Timestamp>,
) -> tokio_util::task::AbortOnDropHandle<Result<ScannedRange, SyncError>> {
    let source = ctx.pipeline.source.clone();
    let ns = ctx.ns.clone();
    let collation = ctx.options.get_document("collation").ok().cloned();
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        scan_range(
            &source,
            &ns,
            collation.as_ref(),
            lower.as_ref(),
            upper.as_ref(),
            after,
        )
        .await
    }))
}

/// Writes one scanned range `[lower, next)` (`next` is `upper` at a lane's end) to the
/// destination (see [`sync_range`]). The checkpoint and the delete budget are locked only
/// around their own steps, so the lanes of one copy write at the same time.
pub(super) async fn write_range(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &AsyncMutex<&mut Checkpoint>,
    budget: &AsyncMutex<&mut DeleteBudget>,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    (docs, next): ScannedRange,
) -> Result<(u64, Option<Bson>), SyncError> {
    // The scan may have reached a replaced source: check before writing what it returned.
    ctx.pipeline.identity.verify().await?;
    let present = id_set(&docs)?;
    // Extras first: a destination-only document may hold a unique key a copied one needs.
    let on_destination = {
        let mut budget = budget.lock().await;
        delete_extras(
            ctx,
            applier,
            lower,
            next.as_ref().or(upper),
            &present,
            &mut budget,
        )
        .await?
    };
    // A range the destination holds little of (a first copy) is written at insert speed.
    let upserted = if on_destination.kept * 2 < docs.len() as u64 {
        applier.insert_documents(&docs).await?
    } else {
        applier.upsert_documents(&docs).await?
    };
    drop(docs);
    let settled = {
        let mut cp = cp.lock().await;
        crate::worker::unique_conflicts::settle_range(ctx, applier, &mut cp, upserted.duplicates)
            .await?
    };
    Ok((upserted.written + settled, next))
}

/// At most this many destination extras in one range are deleted inside a fenced range
/// transaction; a range holding more is written the usual way (lease-fenced).
const FENCED_RANGE_EXTRAS_MAX: usize = 10_000;
/// Documents per fenced copy transaction: MongoDB advises modifying no more than 1,000
/// documents in one transaction (production considerations), and a long commit delays the
/// lease renewals behind it.
const FENCED_TRANSACTION_DOCS: usize = 1_000;

/// What of a range is left to write the usual way: its lower bound and its documents.
type RangeRest = (Option<Bson>, ScannedRange);

/// `ha.fencing = "transaction"`: writes one scanned range `[lower, next)` in destination
/// transactions of [`FENCED_TRANSACTION_DOCS`] documents, each with the lane's checkpoint
/// (its next lower bound: the first `_id` of the next part), so a range a deposed owner read
/// never lands after a takeover ([`Applier::copy_range_fenced`]). The destination's extras
/// of the range are deleted in the first. The checkpoint is locked for each transaction: the
/// lanes of one copy share its document. Returns the documents written so, and what is left
/// for the usual (lease-fenced) write: everything when not in this mode, the rest when a
/// transaction did not commit for another reason than the fence.
#[allow(clippy::too_many_arguments)]
async fn write_range_fenced(
    ctx: &WorkerContext,
    applier: &Applier,
    slot: LaneSlot,
    cp: &AsyncMutex<&mut Checkpoint>,
    budget: &AsyncMutex<&mut DeleteBudget>,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    (mut docs, next): ScannedRange,
) -> Result<(u64, Option<RangeRest>), SyncError> {
    if !ctx.pipeline.checkpoints.fences_by_transaction() {
        return Ok((0, Some((lower.cloned(), (docs, next)))));
    }
    // The scan may have reached a replaced source: check before writing what it returned.
    ctx.pipeline.identity.verify().await?;
    let present = id_set(&docs)?;
    let Some((_, mut extras)) = extras_in_range(
        ctx,
        lower,
        next.as_ref().or(upper),
        &present,
        FENCED_RANGE_EXTRAS_MAX,
    )
    .await?
    else {
        return Ok((0, Some((lower.cloned(), (docs, next)))));
    };
    drop(present);
    let mut part_lower = lower.cloned();
    let mut written = 0;
    // At least once: an empty range still moves the checkpoint (to `next`, or done).
    loop {
        let rest = docs.split_off(docs.len().min(FENCED_TRANSACTION_DOCS));
        let part_next = match rest.first() {
            Some(d) => Some(raw_id(d)?),
            None => next.clone(),
        };
        budget.lock().await.charge(extras.len() as u64)?;
        let committed = {
            let mut cp = cp.lock().await;
            let mut after = (**cp).clone();
            after.copy.copied += docs.len() as i64;
            slot.record(&mut after, part_next.clone());
            let committed = match ctx.pipeline.checkpoints.fencing_write(&ctx.key(), &after)? {
                Some(write) => applier.copy_range_fenced(&extras, &docs, write).await?,
                None => false,
            };
            if committed {
                **cp = after;
            }
            committed
        };
        if !committed {
            budget.lock().await.refund(extras.len() as u64);
            docs.extend(rest);
            return Ok((written, Some((part_lower, (docs, next)))));
        }
        written += docs.len() as u64;
        if rest.is_empty() {
            return Ok((written, None));
        }
        extras.clear();
        docs = rest;
        part_lower = part_next;
    }
}

/// Where a copy lane records its progress in the checkpoint.
#[derive(Debug, Clone, Copy)]
pub(super) enum LaneSlot {
    /// A copy made as one sequence of ranges (`copy.last_range`).
    Single,
    /// Lane `i` of a copy cut into parallel lanes (`copy.lanes[i]`).
    Lane(usize),
}

impl LaneSlot {
    /// The lane's next lower bound, its upper bound, and whether it is done.
    fn bounds(self, cp: &Checkpoint) -> (Option<Bson>, Option<Bson>, bool) {
        match self {
            LaneSlot::Single => (cp.copy.last_range.clone(), None, cp.copy.done),
            LaneSlot::Lane(i) => {
                let lane = &cp.copy.lanes[i];
                (lane.next.clone(), lane.upper.clone(), lane.done)
            }
        }
    }

    fn record(self, cp: &mut Checkpoint, next: Option<Bson>) {
        match self {
            LaneSlot::Single => {
                cp.copy.done = next.is_none();
                cp.copy.last_range = next;
            }
            LaneSlot::Lane(i) => {
                let lane = &mut cp.copy.lanes[i];
                lane.done = next.is_none();
                lane.next = next;
            }
        }
    }
}

/// How many lanes a collection of `estimate` documents is copied with: at most
/// `copy.parallel_ranges`, and no more than it has full ranges.
pub fn lane_count(parallel_ranges: usize, estimate: u64) -> usize {
    parallel_ranges
        .min((estimate / RANGE_MAX_DOCS as u64) as usize)
        .max(1)
}

/// A fresh copy of a collection that holds several full ranges is cut into lanes at evenly
/// spaced `_id`s (read from the source's `_id` index). The lanes are checkpointed before any
/// of them is copied, so a restart resumes each where it stopped.
pub(super) async fn plan_lanes(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    estimate: u64,
) -> Result<(), SyncError> {
    let fresh = cp.copy.lanes.is_empty()
        && cp.copy.last_range.is_none()
        && cp.copy.copied == 0
        && !cp.copy.done;
    let lanes = lane_count(ctx.current_settings().copy_parallel_ranges, estimate);
    if !fresh || lanes < 2 {
        return Ok(());
    }
    let collation = ctx.options.get_document("collation").ok();
    let points = ctx
        .pipeline
        .source
        .id_split_points(&ctx.ns, lanes, estimate, collation)
        .await?;
    if points.is_empty() {
        return Ok(());
    }
    let mut lower = None;
    for point in points {
        cp.copy.lanes.push(CopyLane {
            next: lower.take(),
            upper: Some(point.clone()),
            done: false,
        });
        lower = Some(point);
    }
    cp.copy.lanes.push(CopyLane {
        next: lower,
        upper: None,
        done: false,
    });
    ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    tracing::info!(namespace = %ctx.label(), lanes = cp.copy.lanes.len(), "copying in parallel range lanes (copy.parallel_ranges)");
    Ok(())
}

/// Copies one lane range by range, reading its next range while it writes one; each finished
/// range is checkpointed. A failing lane cancels `halt`, and the others stop after the range
/// they are writing (a write is never abandoned midway).
#[allow(clippy::too_many_arguments)]
pub(super) async fn copy_lane(
    ctx: &WorkerContext,
    applier: &Applier,
    slot: LaneSlot,
    cp: &AsyncMutex<&mut Checkpoint>,
    budget: &AsyncMutex<&mut DeleteBudget>,
    start_ts: Option<Timestamp>,
    stop: &CancellationToken,
    halt: &CancellationToken,
) -> Result<(), SyncError> {
    let copied = copy_lane_ranges(ctx, applier, slot, cp, budget, start_ts, stop, halt).await;
    if copied.is_err() {
        halt.cancel();
    }
    copied
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn copy_lane_ranges(
    ctx: &WorkerContext,
    applier: &Applier,
    slot: LaneSlot,
    cp: &AsyncMutex<&mut Checkpoint>,
    budget: &AsyncMutex<&mut DeleteBudget>,
    start_ts: Option<Timestamp>,
    stop: &CancellationToken,
    halt: &CancellationToken,
) -> Result<(), SyncError> {
    let label = ctx.label();
    let key = ctx.key();
    let (mut lower, upper, done) = slot.bounds(&**cp.lock().await);
    let mut reading = (!done).then(|| prefetch_range(ctx, lower.clone(), upper.clone(), start_ts));
    while let Some(read) = reading.take() {
        if stop.is_cancelled() {
            return Err(cancelled());
        }
        if halt.is_cancelled() {
            return Ok(());
        }
        let scanned = read.await.map_err(|e| {
            SyncError::new(ErrorKind::SourceRead, format!("a range read failed: {e}"))
        })??;
        // Range i+1 is read while range i is written.
        reading = scanned
            .1
            .clone()
            .map(|next| prefetch_range(ctx, Some(next), upper.clone(), start_ts));
        let next = scanned.1.clone();
        let (mut written, rest) = write_range_fenced(
            ctx,
            applier,
            slot,
            cp,
            budget,
            lower.as_ref(),
            upper.as_ref(),
            scanned,
        )
        .await?;
        if let Some((rest_lower, rest)) = rest {
            let (rest_written, _) = write_range(
                ctx,
                applier,
                cp,
                budget,
                rest_lower.as_ref(),
                upper.as_ref(),
                rest,
            )
            .await?;
            written += rest_written;
            let mut cp = cp.lock().await;
            cp.copy.copied += rest_written as i64;
            slot.record(&mut cp, next.clone());
            ctx.pipeline.checkpoints.save(&key, &cp).await?;
        }
        let copied = cp.lock().await.copy.copied;
        ctx.record_checkpoint(start_ts);
        ctx.made_progress();
        ctx.pipeline.metrics.copied(&label, written);
        ctx.pipeline
            .status
            .update(&label, |s| s.copied = copied.max(0) as u64);
        lower = next;
    }
    Ok(())
}

/// Counts both sides of the namespace, then asks the mass-delete guard for this run's budget.
pub async fn delete_budget(
    ctx: &WorkerContext,
    trigger: GuardTrigger,
) -> Result<DeleteBudget, SyncError> {
    let source = ctx.pipeline.source.estimated_count(&ctx.ns).await?;
    let dest = crate::guard::count(
        &ctx.pipeline.dest,
        &ctx.target.db,
        &ctx.target.coll,
        ErrorKind::DestinationWrite,
    )
    .await?;
    ctx.pipeline
        .guard
        .start(&ctx.label(), trigger, source, dest)
}

/// Waits for one of the `copy.concurrent_collections` slots: copies beyond it would only share
/// the destination's speed while each holds its ranges in memory and its connections open.
pub(super) async fn copy_slot(
    ctx: &WorkerContext,
    stop: &CancellationToken,
) -> Result<tokio::sync::OwnedSemaphorePermit, SyncError> {
    let slots = Arc::clone(&ctx.pipeline.copy_slots);
    if let Ok(slot) = Arc::clone(&slots).try_acquire_owned() {
        return Ok(slot);
    }
    let label = ctx.label();
    tracing::debug!(namespace = %label, "waiting for a copy slot (copy.concurrent_collections)");
    ctx.pipeline
        .status
        .update(&label, |s| s.copy_waiting_for_slot = true);
    let slot = tokio::select! {
        _ = stop.cancelled() => Err(cancelled()),
        slot = slots.acquire_owned() => slot.map_err(|_| cancelled()),
    };
    ctx.pipeline
        .status
        .update(&label, |s| s.copy_waiting_for_slot = false);
    slot
}

/// DESIGN §2.3: take T0, persist it, copy range by range (resumable), build indexes.
pub(super) async fn initial_copy(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    stop: &CancellationToken,
) -> Result<Option<WorkerExit>, SyncError> {
    let label = ctx.label();
    let key = ctx.key();
    ctx.set_state(WorkerState::Copying);
    // Before T0 is taken, so the copy's catch-up starts from when it really began.
    let _slot = copy_slot(ctx, stop).await?;
    if cp.start_token.is_none() {
        let stream = ctx
            .pipeline
            .source
            .open_stream(&ctx.ns, StreamStart::Now, &ctx.stream_settings())
            .await?;
        let token = stream.resume_token().ok_or_else(|| {
            SyncError::new(
                ErrorKind::SourceRead,
                "the change stream gave no start token",
            )
        })?;
        *cp = Checkpoint {
            phase: Phase::Copying,
            start_token: Some(serialize_token(&token)?),
            history_lost_recopies: cp.history_lost_recopies,
            target: Some(ctx.target.to_string()),
            ..Checkpoint::default().owning_destination_state_of(Some(std::mem::take(cp)))
        };
        ctx.pipeline.checkpoints.reset(&key, cp).await?;
        tracing::info!(namespace = %label, target = %ctx.target, "initial copy starting");
    } else {
        tracing::info!(namespace = %label, copied = cp.copy.copied, "initial copy resuming from its last finished range");
    }
    let start_ts = cp
        .start_token
        .as_ref()
        .and_then(|t| bson::RawDocumentBuf::try_from(t).ok())
        .and_then(|t| token_cluster_time(&t));
    // The copy's checkpoint exists: lag is measured from T0 while copying (DESIGN §2.9).
    ctx.record_checkpoint(start_ts);
    if !crate::worker::dest_collection::prepare(ctx, cp).await? {
        tracing::info!(namespace = %label, "this incarnation of the collection left the source before its copy's start point (dropped, renamed or re-created); stopping, discovery finishes it");
        return Ok(Some(WorkerExit::NamespaceGone));
    }
    let estimate = ctx
        .pipeline
        .source
        .estimated_count(&ctx.ns)
        .await
        .unwrap_or(0);
    ctx.pipeline.metrics.set_copy_estimate(&label, estimate);
    warn_if_copy_outlasts_oplog(ctx, estimate).await;
    ctx.pipeline.status.update(&label, |s| {
        s.copy_estimate = estimate;
        s.copied = cp.copy.copied.max(0) as u64;
    });
    let applier = ctx.applier();
    let mut budget = delete_budget(ctx, GuardTrigger::Copy).await?;
    let started = Instant::now();
    plan_lanes(ctx, cp, estimate).await?;
    let slots: Vec<LaneSlot> = if cp.copy.lanes.is_empty() {
        vec![LaneSlot::Single]
    } else {
        (0..cp.copy.lanes.len()).map(LaneSlot::Lane).collect()
    };
    {
        let shared_cp = AsyncMutex::new(&mut *cp);
        let shared_budget = AsyncMutex::new(&mut budget);
        let halt = CancellationToken::new();
        let lanes = slots.into_iter().map(|slot| {
            copy_lane(
                ctx,
                &applier,
                slot,
                &shared_cp,
                &shared_budget,
                start_ts,
                stop,
                &halt,
            )
        });
        // The lanes that did not fail stopped after their range: the failure is the result.
        for lane in futures::future::join_all(lanes).await {
            lane?;
        }
    }
    if !cp.copy.lanes.is_empty() {
        cp.copy.done = cp.copy.lanes.iter().all(|l| l.done);
    }
    // Before the copy's end is taken: what they write from the source is then a replay.
    crate::worker::unique_conflicts::settle_pending(ctx, &applier, cp, Settle::Writing).await?;
    crate::worker::dest_collection::create_indexes(ctx, cp, false).await?;
    let end = ctx.pipeline.source.cluster_time().await?;
    cp.phase = Phase::Streaming;
    cp.resume_token = cp.start_token.clone();
    cp.applied_through = start_ts;
    cp.replay_until = Some(end);
    ctx.pipeline.checkpoints.save(&key, cp).await?;
    ctx.record_checkpoint(start_ts);
    ctx.made_progress();
    tracing::info!(
        namespace = %label,
        copied = cp.copy.copied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "initial copy finished; replaying changes made during the copy"
    );
    Ok(None)
}

/// DESIGN §2.3: before a copy whose estimated duration exceeds the source's oplog window, log
/// a warning and show it in status; the stream's start point may fall off the oplog before
/// the copy ends (history lost, re-copy, `oplog_too_small`). See [`projected_oplog_window`];
/// when the oplog cannot be read (no `local` access) nothing is claimed.
pub(super) async fn warn_if_copy_outlasts_oplog(ctx: &WorkerContext, documents: u64) {
    let label = ctx.label();
    let copy_seconds = documents.div_ceil(COPY_ESTIMATE_DOCS_PER_SECOND);
    let window = match oplog_window(ctx).await {
        Ok(Some(w)) => w,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(namespace = %label, error = %e, "could not read the source's oplog window");
            return;
        }
    };
    let exceeds = copy_seconds > window;
    ctx.pipeline.status.update(&label, |s| {
        s.copy_exceeds_oplog_window = exceeds.then_some((copy_seconds, window));
    });
    if exceeds {
        tracing::warn!(namespace = %label, documents, estimated_copy_s = copy_seconds, oplog_window_s = window, "the initial copy is estimated to take longer than the source's oplog window: history may be lost before it ends; enlarge the source oplog");
    }
}

/// The source's oplog window in seconds, as [`projected_oplog_window`] computes it from the
/// oldest and newest `local.oplog.rs` entries and the oplog's `collStats`.
pub(super) async fn oplog_window(
    ctx: &WorkerContext,
) -> Result<Option<u64>, mongodb::error::Error> {
    let local = ctx.pipeline.source.client().database("local");
    let oplog = local.collection::<Document>("oplog.rs");
    let first = oplog.find_one(doc! {}).sort(doc! {"$natural": 1}).await?;
    let last = oplog.find_one(doc! {}).sort(doc! {"$natural": -1}).await?;
    let ts = |d: Option<Document>| d.and_then(|d| d.get_timestamp("ts").ok());
    let (Some(oldest), Some(newest)) = (ts(first), ts(last)) else {
        return Ok(None);
    };
    let stats = local.run_command(doc! {"collStats": "oplog.rs"}).await?;
    let number = |key: &str| {
        stats
            .get(key)
            .and_then(|v| match v {
                Bson::Int32(n) => Some(f64::from(*n)),
                Bson::Int64(n) => Some(*n as f64),
                Bson::Double(n) => Some(*n),
                _ => None,
            })
            .unwrap_or(0.0)
    };
    Ok(projected_oplog_window(
        u64::from(newest.time.saturating_sub(oldest.time)),
        number("size"),
        number("maxSize"),
    ))
}

/// How full an oplog must be (size / maxSize) for its oldest entry to be the edge of history.
pub(super) const OPLOG_FULL_FRACTION: f64 = 0.9;

/// The time history stays in the oplog. A full oplog keeps exactly the span between its oldest
/// and newest entries. A young one has dropped nothing yet: its span says only how long the
/// daemon's source has been writing, so the window is the span scaled to the whole capacity
/// (how long the oplog takes to fill at the rate seen so far). `None` when nothing is known.
pub fn projected_oplog_window(span_secs: u64, size: f64, max_size: f64) -> Option<u64> {
    if size <= 0.0 || max_size <= 0.0 {
        return None;
    }
    if size >= max_size * OPLOG_FULL_FRACTION {
        return Some(span_secs);
    }
    // A young oplog written within one second has no measurable rate: nothing to project.
    if span_secs == 0 {
        return None;
    }
    Some((span_secs as f64 * max_size / size).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::{lane_count, projected_oplog_window, RANGE_MAX_DOCS};

    #[test]
    fn a_collection_gets_at_most_one_lane_per_full_range() {
        assert_eq!(lane_count(4, 0), 1);
        assert_eq!(lane_count(4, RANGE_MAX_DOCS as u64 - 1), 1);
        assert_eq!(lane_count(4, 2 * RANGE_MAX_DOCS as u64 + 5), 2);
        assert_eq!(lane_count(4, 1_000_000), 4);
        assert_eq!(lane_count(1, 1_000_000), 1);
    }

    #[test]
    fn a_full_oplog_keeps_its_span() {
        assert_eq!(projected_oplog_window(3_600, 950.0, 1_000.0), Some(3_600));
    }

    #[test]
    fn a_young_oplog_is_projected_to_its_capacity() {
        // 2 s of writes filled 5% of the oplog: it holds about 40 s at that rate.
        assert_eq!(projected_oplog_window(2, 50.0, 1_000.0), Some(40));
    }

    #[test]
    fn nothing_is_claimed_without_sizes_or_a_rate() {
        assert_eq!(projected_oplog_window(10, 0.0, 1_000.0), None);
        assert_eq!(projected_oplog_window(10, 50.0, 0.0), None);
        assert_eq!(projected_oplog_window(0, 50.0, 1_000.0), None);
    }
}

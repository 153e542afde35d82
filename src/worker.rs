//! One namespace: initial copy (resumable by `_id` range), then read → batch → apply →
//! checkpoint, forever. The reader task and the applier loop are joined by a queue bounded in
//! events and bytes, so a slow destination slows the reader instead of growing memory.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongodb::{options::Hint, Client};
use tokio::sync::{mpsc, Mutex as AsyncMutex, Notify};

use crate::source::buffer_budget::BufferedBytes;
use crate::{
    source::feed::{same_stream, Feed, OwnStreamSpec},
    source::serialize_token,
    source::shared_stream::{SharedStreamKey, SharedStreams, StreamItem},
};
use tokio_util::sync::CancellationToken;

use crate::{
    apply::conflict::ConflictSettings,
    apply::unique_conflicts::{CaughtUpSettles, Settle},
    apply::{Applier, ApplyStats},
    checkpoint::{
        at_or_after, ApplyMark, Checkpoint, CheckpointKey, CheckpointStore, CopyLane, CopyProgress,
        Phase,
    },
    config::{InitialCopy, OnCollationMismatch, UpdateMode},
    error::{ErrorKind, SyncError},
    guard::{DeleteBudget, DeleteGuard, GuardTrigger},
    identity::IdentityWatch,
    metadata::Metadata,
    metrics::{ApplyOp, Metrics, WorkerState},
    model::event::{
        raw_token, token_after, token_cluster_time, ts_key, ts_max, ChangeEvent, OpKind,
    },
    model::id_key::IdKey,
    model::transaction::{TxnGroup, TxnKey, TxnOutcome},
    source::{raw_id, Namespace, Source, StreamSettings, StreamStart},
    status::StatusRegistry,
};

/// Documents per copy/reconcile range (DESIGN §2.8: ≤ 10,000).
pub const RANGE_MAX_DOCS: usize = 10_000;
/// Bytes per copy range, so huge documents do not make a range huge.
pub const RANGE_MAX_BYTES: usize = 16 * 1024 * 1024;
/// How long an idle `getMore` waits on the server before answering with an empty batch.
pub const STREAM_MAX_AWAIT: Duration = Duration::from_millis(1000);
/// TTL indexes are created on the destination with this expiry (effectively never): source
/// TTL deletions arrive as events; an active destination TTL would fight them.
pub const TTL_DISABLED_SECONDS: i32 = i32::MAX;
/// Destination `_id`s scanned per page when looking for extras: a range's extras are found and
/// deleted page by page, so memory stays bounded however many the destination holds.
pub const EXTRAS_PAGE_IDS: usize = 1_000;
/// Copy throughput assumed when comparing a copy's estimated duration with the source's oplog
/// window (DESIGN §2.3), deliberately conservative: documents per second.
pub const COPY_ESTIMATE_DOCS_PER_SECOND: u64 = 5_000;

/// Settings every worker shares (from the config).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub sync_id: String,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub batch_max_wait: Duration,
    pub update_mode: UpdateMode,
    pub checkpoint_interval: Duration,
    pub initial_copy: InitialCopy,
    pub start_at_operation_time: Option<Timestamp>,
    /// `destination.socket_timeout_ms`: bounds every destination write.
    pub destination_timeout: Option<Duration>,
    /// `sync.on_collation_mismatch`.
    pub on_collation_mismatch: OnCollationMismatch,
    /// `copy.parallel_ranges`: range lanes of one collection's copy.
    pub copy_parallel_ranges: usize,
}

/// Whether a worker run starts over with a fresh copy, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recopy {
    /// Resume from the checkpoint (or start a namespace without one).
    No,
    /// The stream's history was lost: re-copy, counting one more consecutive re-copy in the
    /// checkpoint (the streak survives restarts).
    HistoryLost,
    /// An operator asked for it (force-sync of a namespace whose checkpoint is unusable).
    Operator,
}

/// Shared, long-lived parts of the pipeline: the clients and stores every worker uses.
#[derive(Clone)]
pub struct Pipeline {
    pub source: Source,
    pub dest: Client,
    pub checkpoints: CheckpointStore,
    pub metadata: Metadata,
    pub metrics: Metrics,
    pub status: Arc<StatusRegistry>,
    /// Source and destination identity, checked before writes (DESIGN §2.10).
    pub identity: Arc<IdentityWatch>,
    /// The mass-delete guard (`sync.max_delete_fraction`).
    pub guard: Arc<DeleteGuard>,
    /// `apply.max_buffered_bytes`: every reader's read-ahead, one budget.
    pub buffer: Arc<crate::source::buffer_budget::BufferBudget>,
    /// The stream plan and its shared readers (DESIGN §2.11).
    pub streams: Arc<SharedStreams>,
    /// `copy.concurrent_collections`: one permit per namespace copying.
    pub copy_slots: Arc<tokio::sync::Semaphore>,
}

/// Everything one namespace worker needs.
pub struct WorkerContext {
    pub ns: Namespace,
    pub target: Namespace,
    pub uuid: Option<bson::Uuid>,
    /// The source collection's options (validator, collation, capped, ...) when discovery
    /// listed it; [`crate::apply::dest_collection::prepare`] reads them again before a copy.
    pub options: Document,
    /// The source collection's current validator, shared with this worker's appliers.
    pub source_validator: crate::apply::SourceValidator,
    pub pipeline: Pipeline,
    pub settings: Arc<WorkerSettings>,
    /// Incremented on every durable step (a copied range, a checkpointed batch); the
    /// supervisor resets its failure count when it moves.
    pub progress: AtomicU64,
    /// Set once the stream has applied past `replay_until` (history-loss streaks end there).
    pub caught_up: std::sync::atomic::AtomicBool,
    /// This namespace's conflict policy.
    pub conflict: ConflictSettings,
    /// `conflict.enable_pre_images`: turn on pre-/post-images on the source when a policy needs them.
    pub enable_pre_images: bool,
    /// Whether the source collection records pre- and post-images (checked at start).
    pub images_enabled: std::sync::atomic::AtomicBool,
    /// Force-sync requests and reloaded settings from the supervisor.
    pub signals: Arc<WorkerSignals>,
}

/// Requests a worker handles between batches.
#[derive(Debug)]
pub enum WorkerCommand {
    /// Re-copy one `_id` range for validation repair (DESIGN §2.8); see `validate::repair`.
    RepairRange(Box<crate::validate::repair::RepairRequest>),
}

/// Settings a reload (SIGHUP) hands to a running worker.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub settings: Arc<WorkerSettings>,
    pub conflict: ConflictSettings,
}

/// What the supervisor tells a worker outside its command queue, picked up at the next batch
/// boundary: force-sync requests (coalesced: any number of requests made while one is
/// pending or running make one more reconcile, never a dropped one) and reloaded settings
/// (the latest wins).
#[derive(Debug, Default)]
pub struct WorkerSignals {
    force_sync: AtomicBool,
    pending: Mutex<Option<Reloaded>>,
    /// The settings in force once a reload has been adopted (before that: the context's).
    current: Mutex<Option<Reloaded>>,
    notify: Notify,
}

impl WorkerSignals {
    /// Asks for a force-sync; false when one was already pending (the requests coalesce).
    pub fn request_force_sync(&self) -> bool {
        let newly = !self.force_sync.swap(true, Ordering::SeqCst);
        self.notify.notify_one();
        newly
    }

    fn take_force_sync(&self) -> bool {
        self.force_sync.swap(false, Ordering::SeqCst)
    }

    /// Waits for a force-sync request and consumes it (a parked worker waits here).
    pub async fn force_sync_requested(&self) {
        loop {
            let notified = self.notify.notified();
            if self.take_force_sync() {
                return;
            }
            notified.await;
        }
    }

    /// Hands reloaded settings to the worker; it adopts them at its next batch boundary.
    pub fn reconfigure(&self, reloaded: Reloaded) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(reloaded);
        self.notify.notify_one();
    }

    fn take_pending(&self) -> Option<Reloaded> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn current(&self) -> Option<Reloaded> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_current(&self, reloaded: Reloaded) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(reloaded);
    }
}

/// Why a worker returned without error.
#[derive(Debug, PartialEq)]
pub enum WorkerExit {
    /// Shutdown: in-flight batches were applied and checkpointed.
    Stopped,
    /// The collection was dropped or renamed on the source; its stream is over.
    NamespaceGone,
}

impl WorkerContext {
    pub fn key(&self) -> CheckpointKey {
        CheckpointKey {
            sync_id: self.settings.sync_id.clone(),
            ns: self.ns.to_string(),
            uuid: self.uuid,
        }
    }

    pub fn label(&self) -> String {
        self.ns.to_string()
    }

    /// The settings the worker runs with: the last reload it adopted, else the ones it was
    /// started with.
    pub fn current_settings(&self) -> Arc<WorkerSettings> {
        self.signals
            .current()
            .map(|r| r.settings)
            .unwrap_or_else(|| Arc::clone(&self.settings))
    }

    /// The conflict policy the worker runs (see [`WorkerContext::current_settings`]).
    pub fn current_conflict(&self) -> ConflictSettings {
        self.signals
            .current()
            .map(|r| r.conflict)
            .unwrap_or_else(|| self.conflict.clone())
    }

    fn applier(&self) -> Applier {
        let settings = self.current_settings();
        Applier::new(
            self.ns.clone(),
            self.target.clone(),
            &self.pipeline.dest,
            self.pipeline.source.clone(),
            self.pipeline.metadata.clone(),
            self.pipeline.metrics.clone(),
            settings.sync_id.clone(),
            settings.update_mode,
            settings.destination_timeout,
            self.current_conflict(),
        )
        .with_source_validator(Arc::clone(&self.source_validator))
    }

    /// Adopts reloaded settings if the supervisor handed some over. A policy that needs
    /// pre-images the source does not record (and may not enable) is refused with an error
    /// log; the running settings stay. Returns whether anything changed.
    async fn adopt_reload(&self) -> bool {
        let Some(reloaded) = self.signals.take_pending() else {
            return false;
        };
        let label = self.label();
        let before = self.current_conflict();
        if let Err(e) = check_images(self, &reloaded.conflict).await {
            tracing::error!(namespace = %label, error = %e, "the reloaded conflict policy cannot run on this namespace; keeping the running one");
            let mut kept = reloaded;
            kept.conflict = before;
            self.signals.set_current(kept);
            return true;
        }
        if reloaded.conflict.detects_conflicts() {
            self.pipeline
                .metrics
                .register_conflict_policy(&label, reloaded.conflict.label());
        }
        if before.policy != reloaded.conflict.policy {
            tracing::info!(namespace = %label, from = before.policy.as_str(), to = reloaded.conflict.policy.as_str(), "conflict policy changed by a reload");
        }
        self.signals.set_current(reloaded);
        true
    }

    pub fn set_state_public(&self, state: WorkerState) {
        self.set_state(state);
    }

    fn set_state(&self, state: WorkerState) {
        let label = self.label();
        self.pipeline.metrics.set_worker_state(&label, state);
        let mut previous = None;
        self.pipeline.status.update(&label, |s| {
            previous = Some(s.state);
            s.state = state;
            if state != WorkerState::Parked {
                s.parked_reason = None;
            }
        });
        // One event per state change (the parked reason is logged where the worker parks).
        if let Some(from) = previous.filter(|p| *p != state) {
            tracing::info!(namespace = %label, from = from.as_str(), to = state.as_str(), "worker state changed");
        }
    }

    fn made_progress(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn stream_settings(&self) -> StreamSettings {
        let images = self.images_enabled.load(Ordering::Relaxed);
        let conflict = self.current_conflict();
        let full = conflict.needs_full_documents();
        StreamSettings {
            update_lookup: self.current_settings().update_mode == UpdateMode::Lookup
                || (full && !images),
            post_images: full && images,
            pre_images: conflict.needs_pre_images(),
            max_await: STREAM_MAX_AWAIT,
            // Replies of one apply batch, not 16 MiB ones: the source builds the next reply
            // while the reader's queue feeds this batch to the destination (issue 11 item 4),
            // and the driver's reply buffer stays bounded.
            batch_size: Some(
                self.current_settings()
                    .batch_max_events
                    .clamp(1, u32::MAX as usize) as u32,
            ),
        }
    }

    /// This namespace's own collection stream.
    fn own_stream(&self) -> OwnStreamSpec {
        let settings = self.current_settings();
        OwnStreamSpec {
            source: self.pipeline.source.clone(),
            ns: self.ns.clone(),
            settings: self.stream_settings(),
            batch_max_events: settings.batch_max_events,
            batch_max_bytes: settings.batch_max_bytes,
            budget: Arc::clone(&self.pipeline.buffer),
        }
    }

    /// Where a stream starts when the checkpoint has no token yet.
    fn configured_start(&self, cp: &Checkpoint) -> Option<Timestamp> {
        if cp.resume_token.is_none() {
            self.current_settings().start_at_operation_time
        } else {
            None
        }
    }

    /// The source's cluster time is at least `ts`, a time the change stream just returned (an
    /// event's, or a batch's postBatchResumeToken's): DESIGN §2.9 "from every reply", so lag
    /// does not wait for the next periodic `hello` (issue 11 item 9).
    fn observe_source_time(&self, ts: Timestamp) {
        let status = &self.pipeline.status;
        status.set_source_cluster_time(ts);
        if let Some(latest) = status.source_cluster_time() {
            self.pipeline
                .metrics
                .set_source_cluster_time(latest.time as f64);
        }
    }

    fn record_checkpoint(&self, applied_through: Option<Timestamp>) {
        self.pipeline.status.record_checkpoint(
            &self.pipeline.metrics,
            &self.label(),
            Some(SystemTime::now()),
            applied_through,
        );
    }
}

fn cancelled() -> SyncError {
    SyncError::new(ErrorKind::Cancelled, "shutting down")
}

/// Runs a namespace until shutdown, the end of its collection, or an error.
///
/// Checkpoints of earlier incarnations of the collection were finished by the supervisor
/// before this one started (DESIGN §2.10); `recopy` discards the checkpoint and starts with a
/// fresh initial copy.
pub async fn run(
    ctx: &WorkerContext,
    stop: &CancellationToken,
    abort: &CancellationToken,
    commands: &mut mpsc::Receiver<WorkerCommand>,
    recopy: Recopy,
) -> Result<WorkerExit, SyncError> {
    let key = ctx.key();
    // Every (re)start is a (re)connection: never read or write for a deployment that changed.
    ctx.pipeline.identity.verify().await?;
    ctx.adopt_reload().await;
    check_images(ctx, &ctx.current_conflict()).await?;
    let target = ctx.target.to_string();
    let mut cp = match (ctx.pipeline.checkpoints.load(&key).await?, recopy) {
        // `sync.rename` changed since this namespace was copied: the new target is copied
        // like a new collection, never streamed into empty.
        (Some(old), Recopy::No) if old.target.as_deref().is_some_and(|t| t != target) => {
            tracing::warn!(
                namespace = %ctx.label(),
                old_target = old.target.as_deref().unwrap_or_default(),
                target = %target,
                "sync.rename changed: copying into the new target; the old target is left as it is"
            );
            Checkpoint {
                history_lost_recopies: old.history_lost_recopies,
                ..Checkpoint::default()
            }
        }
        (Some(cp), Recopy::No) => cp,
        (old, Recopy::HistoryLost) => Checkpoint {
            history_lost_recopies: old.as_ref().map_or(0, |o| o.history_lost_recopies.max(0)) + 1,
            ..Checkpoint::default().owning_destination_state_of(old)
        },
        (old, Recopy::Operator) => Checkpoint::default().owning_destination_state_of(old),
        (None, Recopy::No) if ctx.current_settings().initial_copy == InitialCopy::Skip => {
            skip_copy_start(ctx).await?
        }
        (None, Recopy::No) => Checkpoint::default(),
    };
    cp.target = Some(target);
    if cp.phase == Phase::Copying {
        if let Some(exit) = initial_copy(ctx, &mut cp, stop).await? {
            return Ok(exit);
        }
    }
    stream(ctx, cp, stop, abort, commands).await
}

/// `sync.initial_copy = "skip"`: persists where the first stream starts before anything is
/// applied, as T0 is for a copy, so a restart before the first checkpoint resumes there
/// instead of at a new "now". With `sync.start_at_operation_time` the configured time is that
/// position already (the stream reopens there until its first checkpoint).
async fn skip_copy_start(ctx: &WorkerContext) -> Result<Checkpoint, SyncError> {
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

/// Conflict policies that compare against the source's pre-image need the collection to record
/// pre- and post-images: enable them (`conflict.enable_pre_images`) or refuse the config.
async fn check_images(ctx: &WorkerContext, conflict: &ConflictSettings) -> Result<(), SyncError> {
    if !conflict.detects_conflicts() {
        return Ok(());
    }
    let options = ctx
        .pipeline
        .source
        .collection_options(&ctx.ns)
        .await?
        .unwrap_or_default();
    let enabled = options
        .get_document("changeStreamPreAndPostImages")
        .ok()
        .and_then(|d| d.get_bool("enabled").ok())
        .unwrap_or(false);
    if enabled || !conflict.needs_pre_images() {
        ctx.images_enabled.store(enabled, Ordering::Relaxed);
        return Ok(());
    }
    if ctx.enable_pre_images {
        ctx.pipeline
            .source
            .enable_pre_and_post_images(&ctx.ns)
            .await?;
        tracing::warn!(namespace = %ctx.label(), policy = conflict.policy.as_str(), "enabled changeStreamPreAndPostImages on the source collection (conflict.enable_pre_images); every source update and delete now also writes a pre-image");
        ctx.images_enabled.store(true, Ordering::Relaxed);
        return Ok(());
    }
    Err(SyncError::new(
        ErrorKind::Config,
        format!(
            "conflict policy {:?} for {} compares destination documents with the source's pre-images, but the source collection does not record them; enable them with db.getSiblingDB({:?}).runCommand({{collMod: {:?}, changeStreamPreAndPostImages: {{enabled: true}}}}) or set conflict.enable_pre_images = true",
            conflict.policy.as_str(),
            ctx.ns,
            ctx.ns.db,
            ctx.ns.coll
        ),
    ))
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
    let coll = ctx
        .pipeline
        .dest
        .database(&ctx.target.db)
        .collection::<RawDocumentBuf>(&ctx.target.coll);
    let list_error = |e| {
        SyncError::mongo(
            ErrorKind::DestinationWrite,
            "listing destination documents",
            e,
        )
    };
    let mut from = lower.cloned();
    let mut found = RangeOnDestination::default();
    let mut continued = false;
    loop {
        let mut find = coll
            .find(doc! {})
            .hint(Hint::Keys(doc! {"_id": 1}))
            .min(doc! {"_id": from.clone().unwrap_or(Bson::MinKey)})
            .projection(doc! {"_id": 1})
            .limit(EXTRAS_PAGE_IDS as i64)
            .batch_size(EXTRAS_PAGE_IDS as u32);
        if let Some(u) = upper {
            find = find.max(doc! {"_id": u.clone()});
        }
        let page: Vec<RawDocumentBuf> = match find.await {
            Ok(c) => c.try_collect().await.map_err(list_error)?,
            Err(e) if crate::source::is_namespace_not_found(&e) => Vec::new(),
            Err(e) => return Err(list_error(e)),
        };
        let full = page.len() >= EXTRAS_PAGE_IDS;
        let mut last = None;
        let mut extras = Vec::new();
        for d in &page {
            let id = raw_id(d)?;
            if !present.contains(&IdKey::of_bson(&id)) {
                extras.push(id.clone());
            } else if !(continued && from.as_ref() == Some(&id)) {
                // (A later page starts at the previous page's last `_id`: counted once.)
                found.kept += 1;
            }
            last = Some(id);
        }
        drop(page);
        if !extras.is_empty() {
            // The mass-delete guard decides before anything of this page is deleted.
            budget.charge(extras.len() as u64)?;
            found.deleted += applier.delete_ids(&extras).await?;
        }
        match last {
            Some(id) if full => {
                from = Some(id);
                continued = true;
            }
            _ => return Ok(found),
        }
    }
}

fn id_set(docs: &[RawDocumentBuf]) -> Result<HashSet<IdKey>, SyncError> {
    docs.iter()
        .map(|d| raw_id(d).map(|id| IdKey::of_bson(&id)))
        .collect()
}

/// One source `_id` range as a copy reads it: its documents and the next range's lower bound
/// (`None` after the last).
type ScannedRange = (Vec<RawDocumentBuf>, Option<Bson>);

/// Reads the source range starting at `lower`, below `upper` (a lane's end) when given (see
/// [`crate::source::Source::scan_range`]).
async fn scan_range(
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
fn prefetch_range(
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

/// Copies (or reconciles) one `_id` range: writes the source documents, deletes destination
/// documents the source scan did not return. Returns (documents written, next lower bound).
async fn sync_range(
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

/// Writes one scanned range `[lower, next)` (`next` is `upper` at a lane's end) to the
/// destination (see [`sync_range`]). The checkpoint and the delete budget are locked only
/// around their own steps, so the lanes of one copy write at the same time.
async fn write_range(
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
        crate::apply::unique_conflicts::settle_range(ctx, applier, &mut cp, upserted.duplicates)
            .await?
    };
    Ok((upserted.written + settled, next))
}

/// Where a copy lane records its progress in the checkpoint.
#[derive(Debug, Clone, Copy)]
enum LaneSlot {
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
async fn plan_lanes(
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
async fn copy_lane(
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
async fn copy_lane_ranges(
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
        let (written, next) = write_range(
            ctx,
            applier,
            cp,
            budget,
            lower.as_ref(),
            upper.as_ref(),
            scanned,
        )
        .await?;
        let copied = {
            let mut cp = cp.lock().await;
            cp.copy.copied += written as i64;
            slot.record(&mut cp, next.clone());
            ctx.pipeline.checkpoints.save(&key, &cp).await?;
            cp.copy.copied
        };
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
async fn copy_slot(
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
async fn initial_copy(
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
    if !crate::apply::dest_collection::prepare(ctx, cp).await? {
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
    crate::apply::unique_conflicts::settle_pending(ctx, &applier, cp, Settle::Writing).await?;
    crate::apply::dest_collection::create_indexes(ctx, cp, false).await?;
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
async fn warn_if_copy_outlasts_oplog(ctx: &WorkerContext, documents: u64) {
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
async fn oplog_window(ctx: &WorkerContext) -> Result<Option<u64>, mongodb::error::Error> {
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
const OPLOG_FULL_FRACTION: f64 = 0.9;

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

/// Events re-read after a crash between a batch and its checkpoint: everything up to and
/// including the persisted [`ApplyMark`] was possibly applied already, so it is a replay.
struct CrashReplay {
    mark: Option<ApplyMark>,
}

impl CrashReplay {
    /// How many leading events of `events` are replays; consumes the mark once passed.
    fn leading_replays(&mut self, events: &[ChangeEvent]) -> usize {
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

fn token_matches(ev: &ChangeEvent, token: &Document) -> bool {
    Document::try_from(ev.token.clone()).is_ok_and(|t| t == *token)
}

/// The streaming phase.
async fn stream(
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
    let mut applier = ctx.applier();
    let mut last_checkpoint = Instant::now();
    let mut settles = CaughtUpSettles::default();
    let mut last_join_attempt = Instant::now();
    // A force-sync interrupted by a restart resumes at its next range before anything else.
    let mut reconcile_pending = cp.reconcile_next.is_some();
    let mut described: Option<String> = None;
    // An item read while a batch was being collected that must start the next one (the
    // first event of a source transaction under `apply.transactions = "atomic"`).
    let mut held: Option<StreamItem> = None;
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
            settings = ctx.current_settings();
            applier = ctx.applier();
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
                    match cmd {
                        WorkerCommand::RepairRange(request) => {
                            if let Err(e) = crate::validate::repair::handle(ctx, &applier, &mut cp, *request).await {
                                break Err(e);
                            }
                        }
                    }
                    continue;
                }
                item = feed.recv() => item,
            },
        };
        let first = match first {
            Some(StreamItem::Event(ev, permit)) => match transaction_group(ctx, &ev) {
                Some(group) => {
                    drop(permit);
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
            ctx.pipeline.metrics.events_read(&label, batch.len() as u64);
            ctx.pipeline.metrics.set_queue(&label, feed.queued() as u64);
            let events: Vec<ChangeEvent> = batch.into_iter().map(|(e, _permit)| e).collect();
            if let Some(latest) = events
                .iter()
                .map(|e| e.cluster_time)
                .max_by_key(|t| ts_key(*t))
            {
                ctx.observe_source_time(latest);
            }
            let replays = crash_replay.leading_replays(&events);
            match process_batch(ctx, &applier, &mut cp, &events, replays, &mut settles, None).await
            {
                Ok(Some(exit)) => break Ok(exit),
                Ok(None) => {
                    last_checkpoint = Instant::now();
                    feed.acknowledge(cp.resume_token.as_ref());
                    // Under steady writes the own stream is never idle: a drained queue after
                    // a batch means caught up too (at most one join attempt a second).
                    if !feed.is_shared()
                        && !feed.is_joining()
                        && feed.queued() == 0
                        && last_join_attempt.elapsed() >= JOIN_ATTEMPT_EVERY
                    {
                        last_join_attempt = Instant::now();
                        join_shared(ctx, &mut feed, &cp, stop).await;
                    }
                }
                Err(e) => break Err(e),
            }
        }
        let skipped = feed.take_skipped();
        if skipped > 0 {
            ctx.pipeline.metrics.already_applied(&label, skipped);
        }
        if let Some(e) = failure {
            break Err(e);
        }
        if stalled {
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
    feed.close().await;
    result
}

/// Under `apply.transactions = "atomic"`: the group of the source transaction `ev` belongs to,
/// if this namespace's shared stream is routing one.
fn transaction_group(ctx: &WorkerContext, ev: &ChangeEvent) -> Option<Arc<TxnGroup>> {
    let registry = ctx.pipeline.streams.transactions.as_ref()?;
    let key = TxnKey::of(ev)?;
    let stream = ctx.pipeline.streams.stream_for(&ctx.ns.db)?;
    registry.find(&stream.name(), &key)
}

/// Where a source transaction's part begins (see [`apply_transaction`]).
struct TransactionStart<'a> {
    group: Arc<TxnGroup>,
    first: ChangeEvent,
    /// Receives an item read past the part that belongs to the next batch.
    held: &'a mut Option<StreamItem>,
}

/// `apply.transactions = "atomic"`: this namespace's events of one source transaction, written
/// with the other members' parts in one destination transaction when every member can take
/// part, per document otherwise (which converges the same way). Everything before the
/// transaction has been applied when this runs.
#[allow(clippy::too_many_arguments)]
async fn apply_transaction(
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
                item = feed.recv() => match item {
                    Some(StreamItem::Event(ev, _permit)) if TxnKey::of(&ev).as_ref() == Some(&group.key) => {
                        events.push(ev);
                    }
                    // A position mark: the next one comes within a second.
                    Some(StreamItem::Idle { .. }) => {}
                    other => {
                        *held = other;
                        break false;
                    }
                },
                _ = changed.changed() => {}
            }
        };
    ctx.pipeline
        .metrics
        .events_read(&label, events.len() as u64);
    if let Some(latest) = events
        .iter()
        .map(|e| e.cluster_time)
        .max_by_key(|t| ts_key(*t))
    {
        ctx.observe_source_time(latest);
    }
    let replays = crash_replay.leading_replays(&events);
    let outcome = if !complete {
        group.member_left(&label);
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
async fn save_apply_mark(ctx: &WorkerContext, events: &[ChangeEvent]) -> Result<(), SyncError> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    let token = Document::try_from(last.token.clone()).map_err(|e| {
        SyncError::with_source(ErrorKind::InvariantViolated, "decoding a resume token", e)
    })?;
    ctx.pipeline
        .checkpoints
        .save_mark(
            &ctx.key(),
            &ApplyMark {
                cluster_time: last.cluster_time,
                token,
            },
        )
        .await
}

/// The shared stream this namespace reads under the plan, unless its stream settings differ
/// from the shared ones (a policy that needs full documents or pre-images) or it is not
/// streaming yet.
fn shared_stream_of(ctx: &WorkerContext) -> Option<SharedStreamKey> {
    let streams = &ctx.pipeline.streams;
    let key = streams.stream_for(&ctx.ns.db)?;
    same_stream(&streams.stream_settings(), &ctx.stream_settings()).then_some(key)
}

/// How often a worker on its own stream under steady writes tries to join its shared stream.
const JOIN_ATTEMPT_EVERY: Duration = Duration::from_secs(1);

/// How long a worker waits for a shared reader to answer before reading on by itself.
const SHARED_STREAM_ANSWER: Duration = Duration::from_secs(10);

/// At the start of streaming: a namespace the last shared watermark recorded resumes from the
/// later of its checkpoint and that position, and joins at once when it is not behind the
/// shared reader.
async fn join_shared_at_start(
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
async fn join_shared(
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
async fn maybe_finish_replay(
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
            crate::apply::dest_collection::create_indexes(ctx, cp, true).await?;
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
async fn process_batch(
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
    let last = &events[applied_events.max(1) - 1];
    if exit == Some(WorkerExit::NamespaceGone) {
        ctx.pipeline.checkpoints.delete(&ctx.key()).await?;
    } else {
        cp.resume_token = Some(last.token.clone().try_into().map_err(|e| {
            SyncError::with_source(ErrorKind::InvariantViolated, "decoding a resume token", e)
        })?);
        cp.applied_through = Some(match cp.applied_through {
            Some(prev) => ts_max(prev, last.cluster_time),
            None => last.cluster_time,
        });
        ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
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
    for ev in &events[..applied_events] {
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
    Ok(exit)
}

/// Applies the data events `events[range]`: those before index `replays` as replays of a
/// crashed run, the rest with the checkpoint's `replay_until`.
async fn apply_segment(
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

fn merge(into: &mut ApplyStats, from: ApplyStats) {
    for (a, b) in into.applied.iter_mut().zip(from.applied) {
        *a += b;
    }
    into.writes += from.writes;
    into.replay_skipped += from.replay_skipped;
    into.dead_letters += from.dead_letters;
    into.repaired += from.repaired;
}

/// Applies a DDL or control event to the destination.
async fn apply_ddl(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    ev: &ChangeEvent,
) -> Result<Option<WorkerExit>, SyncError> {
    let label = ctx.label();
    let db = ctx.pipeline.dest.database(&ctx.target.db);
    let dest_err = |what: &str, e: mongodb::error::Error| {
        SyncError::mongo(ErrorKind::DestinationWrite, what.to_string(), e)
    };
    let limit = ctx.current_settings().destination_timeout;
    match &ev.kind {
        OpKind::Drop => {
            crate::apply::dest_collection::drop_collection(
                &db,
                &ctx.target.coll,
                limit,
                "dropping the destination collection",
            )
            .await?;
            tracing::info!(namespace = %label, target = %ctx.target, "collection dropped on the source; dropped on the destination");
        }
        OpKind::Rename => {
            crate::apply::dest_collection::drop_collection(
                &db,
                &ctx.target.coll,
                limit,
                "dropping the renamed collection",
            )
            .await?;
            let to = ev
                .rename_target()
                .map(|(d, c)| format!("{d}.{c}"))
                .unwrap_or_default();
            tracing::info!(namespace = %label, renamed_to = %to, "collection renamed on the source; the old name was dropped on the destination (the new name is synced by its own worker when in scope)");
        }
        OpKind::DropDatabase => {}
        OpKind::Invalidate => {
            tracing::info!(namespace = %label, "change stream invalidated; this namespace is finished");
            return Ok(Some(WorkerExit::NamespaceGone));
        }
        OpKind::Create => {
            crate::apply::dest_collection::ensure(ctx).await?;
        }
        OpKind::CreateIndexes => {
            if let Some(desc) = ev.operation_description() {
                let mut specs = Vec::new();
                if let Ok(indexes) = desc.get_array("indexes") {
                    for spec in indexes.into_iter().flatten() {
                        let Some(spec) = spec.as_document() else {
                            continue;
                        };
                        let mut spec: Document = spec.try_into().map_err(|e| {
                            SyncError::with_source(
                                ErrorKind::SourceRead,
                                "decoding an index spec",
                                e,
                            )
                        })?;
                        if spec.get_bool("unique").unwrap_or(false) && cp.unique_indexes_pending {
                            continue;
                        }
                        spec.remove("v");
                        if let Some(secs) = spec.get("expireAfterSeconds").cloned() {
                            if let Ok(name) = spec.get_str("name") {
                                cp.ttl_indexes.insert(name.to_string(), secs);
                            }
                            spec.insert("expireAfterSeconds", TTL_DISABLED_SECONDS);
                        }
                        specs.push(spec);
                    }
                }
                if !specs.is_empty() {
                    let names: Vec<String> = specs
                        .iter()
                        .filter_map(|s| s.get_str("name").ok().map(str::to_string))
                        .collect();
                    let intended =
                        crate::apply::dest_collection::intend_indexes(ctx, cp, &names).await?;
                    let command = doc! {"createIndexes": ctx.target.coll.clone(), "indexes": specs, "writeConcern": {"w": "majority", "j": true}};
                    match crate::apply::bounded_write::ddl(&db, command, limit, "creating indexes")
                        .await?
                    {
                        Ok(_) => {}
                        Err(e) => {
                            if crate::error::classify_mongo(&e)
                                == crate::error::ErrorClass::Transient
                            {
                                return Err(dest_err("creating indexes", e));
                            }
                            tracing::error!(namespace = %label, error = %crate::config::redact_text(&e.to_string()), "could not create an index on the destination");
                            crate::apply::dest_collection::disown_indexes(cp, &intended);
                        }
                    }
                }
            }
        }
        OpKind::DropIndexes => {
            if let Some(desc) = ev.operation_description() {
                if let Ok(indexes) = desc.get_array("indexes") {
                    for spec in indexes.into_iter().flatten() {
                        let Some(name) = spec.as_document().and_then(|s| s.get_str("name").ok())
                        else {
                            continue;
                        };
                        cp.ttl_indexes.remove(name);
                        cp.destination_indexes.retain(|n| n != name);
                        let command = doc! {"dropIndexes": ctx.target.coll.clone(), "index": name};
                        match crate::apply::bounded_write::ddl(
                            &db,
                            command,
                            limit,
                            "dropping an index",
                        )
                        .await?
                        {
                            Ok(_) => {}
                            Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 27 || c.code == 26) =>
                                {}
                            Err(e) => return Err(dest_err("dropping an index", e)),
                        }
                    }
                }
            }
        }
        OpKind::Modify => {
            if let Some(desc) = ev.operation_description() {
                let desc: Document = desc.try_into().map_err(|e| {
                    SyncError::with_source(ErrorKind::SourceRead, "decoding a modify event", e)
                })?;
                let mut cmd = doc! {"collMod": ctx.target.coll.clone()};
                for key in ["validator", "validationLevel", "validationAction"] {
                    if let Some(v) = desc.get(key) {
                        cmd.insert(key, v.clone());
                    }
                }
                if let Ok(index) = desc.get_document("index") {
                    if let (Ok(name), Some(secs)) =
                        (index.get_str("name"), index.get("expireAfterSeconds"))
                    {
                        // Keep the destination TTL disabled; remember the source's new value.
                        cp.ttl_indexes.insert(name.to_string(), secs.clone());
                    }
                    if let Ok(hidden) = index.get_bool("hidden") {
                        let mut idx = doc! {"hidden": hidden};
                        if let Ok(name) = index.get_str("name") {
                            idx.insert("name", name);
                        }
                        cmd.insert("index", idx);
                    }
                }
                if cmd.len() > 1 {
                    let what = "modifying the destination collection";
                    match crate::apply::bounded_write::ddl(&db, cmd.clone(), limit, what).await? {
                        Ok(_) => crate::apply::dest_collection::record_modify(ctx, cp, &cmd),
                        Err(e) => {
                            if crate::error::classify_mongo(&e)
                                == crate::error::ErrorClass::Transient
                            {
                                return Err(dest_err("modifying the destination collection", e));
                            }
                            tracing::error!(namespace = %label, error = %crate::config::redact_text(&e.to_string()), "could not apply a collMod to the destination");
                        }
                    }
                }
            }
        }
        OpKind::Other(op) => {
            tracing::debug!(namespace = %label, operation = %op, "ignoring an unknown change event type");
        }
        OpKind::Insert | OpKind::Update | OpKind::Replace | OpKind::Delete => {}
    }
    Ok(None)
}

/// Force-sync (DESIGN §2.8): with apply paused at P, every range is re-read from the source
/// at a time ≥ P and written over the destination (extras deleted); events after P that the
/// stream then re-applies are replays.
///
/// Progress is checkpointed after every range (the next lower bound, and `replay_until`
/// moved past the range's writes), so a restart resumes at the next range. A stop request is
/// honoured between ranges (never in the middle of a write, which would be abandoned): the
/// force-sync is left recorded and resumes on the next run.
async fn reconcile(
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
                crate::apply::unique_conflicts::settle_pending(ctx, applier, cp, Settle::Writing)
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

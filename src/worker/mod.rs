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
    apply::{Applier, ApplyStats, LanePlan},
    checkpoint::{
        at_or_after, ApplyMark, Checkpoint, CheckpointKey, CheckpointStore, CopyLane, CopyProgress,
        Phase,
    },
    config::{InitialCopy, OnCollationMismatch, UpdateMode, WriteLanes},
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
    worker::unique_conflicts::{CaughtUpSettles, Settle},
};

mod copy;
mod ddl;
pub mod dest_collection;
mod in_flight;
mod reconcile;
mod repair;
mod stream;
mod transaction;
pub mod unique_conflicts;

pub(crate) use self::copy::delete_extras;
pub use self::copy::{delete_budget, lane_count, projected_oplog_window};
use self::{copy::*, ddl::*, reconcile::*, stream::*, transaction::*};

pub use crate::model::RANGE_MAX_DOCS;
pub use crate::validate::request::WorkerCommand;
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
    /// `apply.write_lanes`: concurrent commands of one batch's writes.
    pub write_lanes: WriteLanes,
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
    /// listed it; [`crate::worker::dest_collection::prepare`] reads them again before a copy.
    pub options: Document,
    /// The source collection's current validator, shared with this worker's appliers.
    pub source_validator: crate::apply::SourceValidator,
    /// `apply.write_lanes = "auto"`: the lane count this worker's writes measured best, kept
    /// across its appliers (restarts of its stream, reloads).
    pub lane_tuner: Arc<parking_lot::Mutex<crate::apply::lanes::LaneTuner>>,
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
        .with_lanes(match settings.write_lanes {
            WriteLanes::Auto => LanePlan::Tuned(Arc::clone(&self.lane_tuner)),
            WriteLanes::Fixed(n) => LanePlan::Fixed(n as usize),
        })
    }

    /// The lane count the worker's writes use now: the fixed `apply.write_lanes`, or the one
    /// its tuner keeps.
    pub fn write_lanes_now(&self) -> usize {
        match self.current_settings().write_lanes {
            WriteLanes::Auto => self.lane_tuner.lock().current(),
            WriteLanes::Fixed(n) => n as usize,
        }
    }

    /// Shows [`write_lanes_now`](Self::write_lanes_now) in the status and the metrics.
    pub fn report_write_lanes(&self) {
        let lanes = self.write_lanes_now();
        let label = self.label();
        self.pipeline.metrics.set_write_lanes(&label, lanes);
        self.pipeline
            .status
            .update(&label, |s| s.write_lanes = lanes as u64);
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
    ctx.report_write_lanes();
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

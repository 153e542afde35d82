//! One namespace: initial copy (resumable by `_id` range), then read → batch → apply →
//! checkpoint, forever. The reader task and the applier loop are joined by a queue bounded in
//! events and bytes, so a slow destination slows the reader instead of growing memory.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongodb::{options::Hint, Client};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    apply::{Applier, ApplyStats},
    checkpoint::{at_or_after, Checkpoint, CheckpointKey, CheckpointStore, CopyProgress, Phase},
    config::{InitialCopy, UpdateMode},
    conflict::ConflictSettings,
    error::{ErrorKind, SyncError},
    event::{token_cluster_time, ts_key, ts_max, ChangeEvent, FragmentAssembler, OpKind},
    guard::{DeleteBudget, DeleteGuard, GuardTrigger},
    identity::IdentityWatch,
    metadata::Metadata,
    metrics::{ApplyOp, Metrics, WorkerState},
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
}

/// Everything one namespace worker needs.
pub struct WorkerContext {
    pub ns: Namespace,
    pub target: Namespace,
    pub uuid: Option<bson::Uuid>,
    /// The source collection's options (validator, collation, capped, ...).
    pub options: Document,
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
}

/// Requests a worker handles between batches.
#[derive(Debug)]
pub enum WorkerCommand {
    /// Re-copy and reconcile every range while the stream keeps its position.
    ForceSync,
    /// Re-copy one `_id` range for validation repair (DESIGN §2.8); see `validate::repair`.
    RepairRange(Box<crate::validate::repair::RepairRequest>),
}

/// Why a worker returned without error.
#[derive(Debug, PartialEq)]
pub enum WorkerExit {
    /// Shutdown: in-flight batches were applied and checkpointed.
    Stopped,
    /// The collection was dropped or renamed on the source; its stream is over.
    NamespaceGone,
}

enum ReaderItem {
    Event(ChangeEvent, OwnedSemaphorePermit),
    /// The stream is caught up: the reader's buffer is empty.
    Idle {
        token: Document,
        cluster_time: Option<Timestamp>,
    },
    Failed(SyncError),
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

    fn applier(&self) -> Applier {
        Applier::new(
            self.ns.clone(),
            self.target.clone(),
            &self.pipeline.dest,
            self.pipeline.source.clone(),
            self.pipeline.metadata.clone(),
            self.pipeline.metrics.clone(),
            self.settings.sync_id.clone(),
            self.settings.update_mode,
            self.settings.destination_timeout,
            self.conflict.clone(),
        )
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
        let full = self.conflict.needs_full_documents();
        StreamSettings {
            update_lookup: self.settings.update_mode == UpdateMode::Lookup || (full && !images),
            post_images: full && images,
            pre_images: self.conflict.needs_pre_images(),
            max_await: STREAM_MAX_AWAIT,
            batch_size: None,
        }
    }

    fn record_checkpoint(&self, applied_through: Option<Timestamp>) {
        let now = SystemTime::now();
        let label = self.label();
        self.pipeline.metrics.record_checkpoint(&label, now);
        if let Some(ts) = applied_through {
            self.pipeline
                .metrics
                .set_applied_through(&label, ts.time as f64);
        }
        let lag = self.pipeline.status.compute_lag(applied_through);
        self.pipeline.status.update(&label, |s| {
            s.last_checkpoint = Some(now);
            if applied_through.is_some() {
                s.applied_through = applied_through;
                s.lag_seconds = lag;
            }
        });
        self.pipeline.metrics.set_lag(&label, lag);
    }
}

fn serialize_token(
    token: &mongodb::change_stream::event::ResumeToken,
) -> Result<Document, SyncError> {
    match bson::serialize_to_bson(token) {
        Ok(Bson::Document(d)) => Ok(d),
        Ok(_) => Err(SyncError::new(
            ErrorKind::SourceRead,
            "resume token is not a document",
        )),
        Err(e) => Err(SyncError::with_source(
            ErrorKind::SourceRead,
            "encoding a resume token",
            e,
        )),
    }
}

fn cancelled() -> SyncError {
    SyncError::new(ErrorKind::Cancelled, "shutting down")
}

/// Runs a namespace until shutdown, the end of its collection, or an error.
///
/// `recopy` discards the checkpoint and starts with a fresh initial copy (history lost,
/// force-sync of a parked worker).
pub async fn run(
    ctx: &WorkerContext,
    stop: &CancellationToken,
    abort: &CancellationToken,
    commands: &mut mpsc::Receiver<WorkerCommand>,
    recopy: bool,
) -> Result<WorkerExit, SyncError> {
    let key = ctx.key();
    // Every (re)start is a (re)connection: never read or write for a deployment that changed.
    ctx.pipeline.identity.verify().await?;
    check_images(ctx).await?;
    let stale = ctx.pipeline.checkpoints.delete_stale(&key).await?;
    if stale > 0 {
        tracing::info!(namespace = %ctx.label(), "discarded checkpoints of an earlier incarnation of the collection");
    }
    let mut cp = match ctx.pipeline.checkpoints.load(&key).await? {
        Some(cp) if !recopy => cp,
        Some(old) => Checkpoint {
            history_lost_recopies: old.history_lost_recopies,
            ..Checkpoint::default()
        },
        None if ctx.settings.initial_copy == InitialCopy::Skip => {
            tracing::info!(namespace = %ctx.label(), "initial copy skipped by configuration; streaming from the configured start");
            Checkpoint {
                phase: Phase::Streaming,
                copy: CopyProgress {
                    done: true,
                    ..CopyProgress::default()
                },
                ..Checkpoint::default()
            }
        }
        None => Checkpoint::default(),
    };
    if cp.phase == Phase::Copying {
        initial_copy(ctx, &mut cp, stop).await?;
    }
    stream(ctx, cp, stop, abort, commands).await
}

/// Conflict policies that compare against the source's pre-image need the collection to record
/// pre- and post-images: enable them (`conflict.enable_pre_images`) or refuse the config.
async fn check_images(ctx: &WorkerContext) -> Result<(), SyncError> {
    if !ctx.conflict.detects_conflicts() {
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
    if enabled || !ctx.conflict.needs_pre_images() {
        ctx.images_enabled.store(enabled, Ordering::Relaxed);
        return Ok(());
    }
    if ctx.enable_pre_images {
        ctx.pipeline
            .source
            .enable_pre_and_post_images(&ctx.ns)
            .await?;
        tracing::warn!(namespace = %ctx.label(), policy = ctx.conflict.policy.as_str(), "enabled changeStreamPreAndPostImages on the source collection (conflict.enable_pre_images); every source update and delete now also writes a pre-image");
        ctx.images_enabled.store(true, Ordering::Relaxed);
        return Ok(());
    }
    Err(SyncError::new(
        ErrorKind::Config,
        format!(
            "conflict policy {:?} for {} compares destination documents with the source's pre-images, but the source collection does not record them; enable them with db.getSiblingDB({:?}).runCommand({{collMod: {:?}, changeStreamPreAndPostImages: {{enabled: true}}}}) or set conflict.enable_pre_images = true",
            ctx.conflict.policy.as_str(),
            ctx.ns,
            ctx.ns.db,
            ctx.ns.coll
        ),
    ))
}

/// Creates the destination collection with the source's options if it is missing. Capped
/// collections become uncapped: the source's capped deletions arrive as delete events.
async fn ensure_destination_collection(ctx: &WorkerContext) -> Result<(), SyncError> {
    let db = ctx.pipeline.dest.database(&ctx.target.db);
    let existing = db
        .list_collection_names()
        .filter(doc! {"name": ctx.target.coll.clone()})
        .await
        .map_err(|e| {
            SyncError::mongo(
                ErrorKind::DestinationWrite,
                "listing destination collections",
                e,
            )
        })?;
    if !existing.is_empty() {
        return Ok(());
    }
    let mut cmd = doc! {"create": ctx.target.coll.clone()};
    for (k, v) in &ctx.options {
        match k.as_str() {
            "validator" | "validationLevel" | "validationAction" | "collation" => {
                cmd.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    match db.run_command(cmd).await {
        Ok(_) => Ok(()),
        // Created concurrently (e.g. by an upsert): fine.
        Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 48) => {
            Ok(())
        }
        Err(e) => Err(SyncError::mongo(
            ErrorKind::DestinationWrite,
            format!("creating {}", ctx.target),
            e,
        )),
    }
}

/// `_id`s of destination documents in `[lower, upper)` (`None` = unbounded).
async fn destination_ids(
    ctx: &WorkerContext,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
) -> Result<Vec<Bson>, SyncError> {
    let coll = ctx
        .pipeline
        .dest
        .database(&ctx.target.db)
        .collection::<Document>(&ctx.target.coll);
    let mut find = coll
        .find(doc! {})
        .hint(Hint::Keys(doc! {"_id": 1}))
        .min(doc! {"_id": lower.cloned().unwrap_or(Bson::MinKey)})
        .projection(doc! {"_id": 1});
    if let Some(u) = upper {
        find = find.max(doc! {"_id": u.clone()});
    }
    let docs: Vec<Document> = match find.await {
        Ok(c) => c.try_collect().await.map_err(|e| {
            SyncError::mongo(
                ErrorKind::DestinationWrite,
                "listing destination documents",
                e,
            )
        })?,
        Err(e) if crate::source::is_namespace_not_found(&e) => Vec::new(),
        Err(e) => {
            return Err(SyncError::mongo(
                ErrorKind::DestinationWrite,
                "listing destination documents",
                e,
            ))
        }
    };
    Ok(docs
        .into_iter()
        .filter_map(|mut d| d.remove("_id"))
        .collect())
}

fn id_set(docs: &[RawDocumentBuf]) -> Result<HashSet<Vec<u8>>, SyncError> {
    docs.iter()
        .map(|d| raw_id(d).map(|id| canonical_id(&id)))
        .collect()
}

fn canonical_id(id: &Bson) -> Vec<u8> {
    match id {
        Bson::Int32(v) => (*v as f64).to_bits().to_le_bytes().to_vec(),
        Bson::Int64(v) => (*v as f64).to_bits().to_le_bytes().to_vec(),
        Bson::Double(v) => v.to_bits().to_le_bytes().to_vec(),
        other => {
            let mut d = Document::new();
            d.insert("_id", other.clone());
            d.to_vec().unwrap_or_default()
        }
    }
}

/// Copies (or reconciles) one `_id` range: upserts the source documents, deletes destination
/// documents the source scan did not return. Returns (documents written, next lower bound).
async fn sync_range(
    ctx: &WorkerContext,
    applier: &Applier,
    lower: Option<&Bson>,
    after: Option<Timestamp>,
    budget: &mut DeleteBudget,
) -> Result<(u64, Option<Bson>), SyncError> {
    let collation = ctx.options.get_document("collation").ok();
    let (docs, next) = ctx
        .pipeline
        .source
        .scan_range(
            &ctx.ns,
            lower,
            RANGE_MAX_DOCS,
            RANGE_MAX_BYTES,
            after,
            collation,
        )
        .await?;
    // The scan may have reached a replaced source: check before writing what it returned.
    ctx.pipeline.identity.verify().await?;
    let present = id_set(&docs)?;
    let extras: Vec<Bson> = destination_ids(ctx, lower, next.as_ref())
        .await?
        .into_iter()
        .filter(|id| !present.contains(&canonical_id(id)))
        .collect();
    budget.charge(extras.len() as u64)?;
    let (written, _dead) = applier.upsert_documents(&docs).await?;
    if !extras.is_empty() {
        applier.delete_ids(&extras).await?;
    }
    Ok((written, next))
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

/// DESIGN §2.3: take T0, persist it, copy range by range (resumable), build indexes.
async fn initial_copy(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    stop: &CancellationToken,
) -> Result<(), SyncError> {
    let label = ctx.label();
    let key = ctx.key();
    ctx.set_state(WorkerState::Copying);
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
            ..Checkpoint::default()
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
    if let Some(ts) = start_ts {
        ctx.pipeline
            .status
            .update(&label, |s| s.applied_through = Some(ts));
    }
    ensure_destination_collection(ctx).await?;
    let estimate = ctx
        .pipeline
        .source
        .estimated_count(&ctx.ns)
        .await
        .unwrap_or(0);
    ctx.pipeline.metrics.set_copy_estimate(&label, estimate);
    ctx.pipeline.status.update(&label, |s| {
        s.copy_estimate = estimate;
        s.copied = cp.copy.copied.max(0) as u64;
    });
    let applier = ctx.applier();
    let mut budget = delete_budget(ctx, GuardTrigger::Copy).await?;
    let mut lower = cp.copy.last_range.clone();
    let started = Instant::now();
    while !cp.copy.done {
        if stop.is_cancelled() {
            return Err(cancelled());
        }
        let (written, next) =
            sync_range(ctx, &applier, lower.as_ref(), start_ts, &mut budget).await?;
        cp.copy.copied += written as i64;
        cp.copy.done = next.is_none();
        cp.copy.last_range = next.clone();
        ctx.pipeline.checkpoints.save(&key, cp).await?;
        ctx.made_progress();
        ctx.pipeline.metrics.copied(&label, written);
        ctx.pipeline
            .status
            .update(&label, |s| s.copied = cp.copy.copied.max(0) as u64);
        lower = next;
    }
    create_indexes(ctx, cp, false).await?;
    let end = ctx.pipeline.source.cluster_time().await?;
    cp.phase = Phase::Streaming;
    cp.resume_token = cp.start_token.clone();
    cp.applied_through = start_ts;
    cp.replay_until = Some(end);
    ctx.pipeline.checkpoints.save(&key, cp).await?;
    ctx.made_progress();
    tracing::info!(
        namespace = %label,
        copied = cp.copy.copied,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "initial copy finished; replaying changes made during the copy"
    );
    Ok(())
}

/// Copies the source's indexes. Non-unique ones (`unique_only = false`) right after the copy,
/// recording unique ones as pending; unique ones once replay has passed the copy's end.
async fn create_indexes(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    unique_only: bool,
) -> Result<(), SyncError> {
    let specs = ctx.pipeline.source.list_indexes(&ctx.ns).await?;
    let mut to_create = Vec::new();
    let mut pending_unique = false;
    for mut spec in specs {
        if spec.get_str("name").ok() == Some("_id_") {
            continue;
        }
        let unique = spec.get_bool("unique").unwrap_or(false);
        if unique != unique_only {
            pending_unique |= unique;
            continue;
        }
        spec.remove("v");
        spec.remove("ns");
        if let Some(secs) = spec.get("expireAfterSeconds").cloned() {
            if let Ok(name) = spec.get_str("name") {
                cp.ttl_indexes.insert(name.to_string(), secs);
            }
            spec.insert("expireAfterSeconds", TTL_DISABLED_SECONDS);
        }
        to_create.push(spec);
    }
    if !unique_only {
        cp.unique_indexes_pending = pending_unique;
    }
    if to_create.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = to_create
        .iter()
        .filter_map(|s| s.get_str("name").ok().map(str::to_string))
        .collect();
    let result = ctx
        .pipeline.dest
        .database(&ctx.target.db)
        .run_command(doc! {"createIndexes": ctx.target.coll.clone(), "indexes": to_create, "writeConcern": {"w": "majority", "j": true}})
        .await;
    match result {
        Ok(_) => {
            tracing::info!(namespace = %ctx.label(), indexes = ?names, unique = unique_only, "indexes created on the destination");
            Ok(())
        }
        Err(e) => {
            let class = crate::error::classify_mongo(&e);
            if class == crate::error::ErrorClass::Transient {
                return Err(SyncError::mongo(
                    ErrorKind::DestinationWrite,
                    "creating indexes",
                    e,
                ));
            }
            // An index that cannot be built (conflicting definition, duplicates on the
            // destination) must not stop replication: report it and go on.
            tracing::error!(namespace = %ctx.label(), indexes = ?names, error = %crate::config::redact_text(&e.to_string()), "could not create indexes on the destination");
            Ok(())
        }
    }
}

/// Reads the change stream into the bounded queue.
#[allow(clippy::too_many_arguments)]
async fn read_events(
    source: Source,
    ns: Namespace,
    start_after: Option<Document>,
    start_at: Option<Timestamp>,
    settings: StreamSettings,
    tx: mpsc::Sender<ReaderItem>,
    budget: Arc<Semaphore>,
    budget_total: usize,
    stop: CancellationToken,
) {
    let result: Result<(), SyncError> = async {
        let start = match (&start_after, start_at) {
            (Some(token), _) => StreamStart::After(token),
            (None, Some(ts)) => StreamStart::AtOperationTime(ts),
            (None, None) => StreamStart::Now,
        };
        let mut stream = source.open_stream(&ns, start, &settings).await?;
        let mut assembler = FragmentAssembler::default();
        loop {
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                r = stream.next_if_any() => r,
            };
            match next.map_err(|e| SyncError::mongo(ErrorKind::SourceRead, format!("reading the change stream of {ns}"), e))? {
                Some(raw) => {
                    let Some(event) = assembler.push(raw)? else { continue };
                    let need = event.size().clamp(1, budget_total) as u32;
                    let permit = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        p = Arc::clone(&budget).acquire_many_owned(need) => p.map_err(|_| cancelled())?,
                    };
                    if tx.send(ReaderItem::Event(event, permit)).await.is_err() {
                        return Ok(());
                    }
                }
                None => {
                    if assembler.is_empty() {
                        if let Some(token) = stream.resume_token() {
                            let token = serialize_token(&token)?;
                            let cluster_time = RawDocumentBuf::try_from(&token).ok().and_then(|t| token_cluster_time(&t));
                            if tx.send(ReaderItem::Idle { token, cluster_time }).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    if !stream.is_alive() {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = tx.send(ReaderItem::Failed(e)).await;
    }
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
    let settings = &ctx.settings;
    let budget_total = (settings.batch_max_bytes * 2).max(32 * 1024 * 1024);
    let budget = Arc::new(Semaphore::new(budget_total));
    let (tx, mut rx) = mpsc::channel::<ReaderItem>(settings.batch_max_events * 2);
    let reader_stop = stop.child_token();
    let start_at = if cp.resume_token.is_none() {
        settings.start_at_operation_time
    } else {
        None
    };
    let reader = tokio::spawn(read_events(
        ctx.pipeline.source.clone(),
        ctx.ns.clone(),
        cp.resume_token.clone(),
        start_at,
        ctx.stream_settings(),
        tx,
        Arc::clone(&budget),
        budget_total,
        reader_stop.clone(),
    ));
    // Whatever happens below, the reader stops with us.
    let _stop_reader = reader_stop.clone().drop_guard();
    let applier = ctx.applier();
    let mut last_checkpoint = Instant::now();
    let mut pending_idle: Option<(Document, Option<Timestamp>)> = None;
    let result = loop {
        let first = tokio::select! {
            biased;
            _ = abort.cancelled() => break Err(cancelled()),
            Some(cmd) = commands.recv() => {
                match cmd {
                    WorkerCommand::ForceSync => {
                        if let Err(e) = reconcile(ctx, &applier, &mut cp).await {
                            break Err(e);
                        }
                    }
                    WorkerCommand::RepairRange(request) => {
                        if let Err(e) = crate::validate::repair::handle(ctx, &applier, &mut cp, *request).await {
                            break Err(e);
                        }
                    }
                }
                continue;
            }
            item = rx.recv() => item,
        };
        let mut batch: Vec<(ChangeEvent, OwnedSemaphorePermit)> = Vec::new();
        let mut failure = None;
        match first {
            None => break Ok(WorkerExit::Stopped),
            Some(ReaderItem::Failed(e)) => break Err(e),
            Some(ReaderItem::Idle {
                token,
                cluster_time,
            }) => pending_idle = Some((token, cluster_time)),
            Some(ReaderItem::Event(ev, permit)) => {
                let mut bytes = ev.size();
                batch.push((ev, permit));
                let deadline = tokio::time::Instant::now() + settings.batch_max_wait;
                while batch.len() < settings.batch_max_events && bytes < settings.batch_max_bytes {
                    let next = tokio::select! {
                        biased;
                        n = rx.recv() => n,
                        _ = tokio::time::sleep_until(deadline) => break,
                    };
                    match next {
                        Some(ReaderItem::Event(ev, permit)) => {
                            bytes += ev.size();
                            batch.push((ev, permit));
                        }
                        Some(ReaderItem::Idle {
                            token,
                            cluster_time,
                        }) => {
                            pending_idle = Some((token, cluster_time));
                            break;
                        }
                        Some(ReaderItem::Failed(e)) => {
                            failure = Some(e);
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        if !batch.is_empty() {
            // A newer event supersedes an idle token seen before it.
            if pending_idle.as_ref().is_some_and(|_| false) {
                pending_idle = None;
            }
            ctx.pipeline.metrics.events_read(&label, batch.len() as u64);
            ctx.pipeline.metrics.set_queue(&label, rx.len() as u64);
            let events: Vec<ChangeEvent> = batch.into_iter().map(|(e, _permit)| e).collect();
            match process_batch(ctx, &applier, &mut cp, &events).await {
                Ok(Some(exit)) => break Ok(exit),
                Ok(None) => {
                    last_checkpoint = Instant::now();
                }
                Err(e) => break Err(e),
            }
        }
        if let Some(e) = failure {
            break Err(e);
        }
        // Idle: nothing queued or in flight, so the postBatchResumeToken may be checkpointed.
        if let Some((token, cluster_time)) = pending_idle.take() {
            if rx.is_empty() && last_checkpoint.elapsed() >= settings.checkpoint_interval {
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
                    maybe_finish_replay(ctx, &mut cp).await?;
                }
            }
            ctx.pipeline.metrics.set_queue(&label, rx.len() as u64);
        }
    };
    reader_stop.cancel();
    let _ = reader.await;
    result
}

/// Once replay has passed the copy's end: unique indexes can be built, and a history-loss
/// streak is over.
async fn maybe_finish_replay(ctx: &WorkerContext, cp: &mut Checkpoint) -> Result<(), SyncError> {
    let (Some(applied), Some(until)) = (cp.applied_through, cp.replay_until) else {
        ctx.caught_up.store(true, Ordering::Relaxed);
        return Ok(());
    };
    if !at_or_after(applied, until) {
        return Ok(());
    }
    ctx.caught_up.store(true, Ordering::Relaxed);
    if cp.unique_indexes_pending || cp.history_lost_recopies > 0 {
        if cp.unique_indexes_pending {
            create_indexes(ctx, cp, true).await?;
            cp.unique_indexes_pending = false;
        }
        cp.history_lost_recopies = 0;
        ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    }
    Ok(())
}

/// Applies one batch in order (data runs through the applier; DDL events one at a time),
/// then checkpoints the last event's token.
async fn process_batch(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
    events: &[ChangeEvent],
) -> Result<Option<WorkerExit>, SyncError> {
    let label = ctx.label();
    let started = Instant::now();
    let mut stats = ApplyStats::default();
    let mut exit = None;
    let mut segment_start = 0;
    let mut applied_events = 0usize;
    for (i, ev) in events.iter().enumerate() {
        if ev.kind.is_data() {
            continue;
        }
        if segment_start < i {
            merge(
                &mut stats,
                applier
                    .apply_events(&events[segment_start..i], cp.replay_until)
                    .await?,
            );
        }
        segment_start = i + 1;
        applied_events = i + 1;
        if let Some(e) = apply_ddl(ctx, cp, ev).await? {
            exit = Some(e);
            break;
        }
        ctx.pipeline.metrics.events_applied(&label, ApplyOp::Ddl, 1);
    }
    if exit.is_none() && segment_start < events.len() {
        merge(
            &mut stats,
            applier
                .apply_events(&events[segment_start..], cp.replay_until)
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
        maybe_finish_replay(ctx, cp).await?;
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
    match &ev.kind {
        OpKind::Drop => {
            db.collection::<Document>(&ctx.target.coll)
                .drop()
                .await
                .map_err(|e| dest_err("dropping the destination collection", e))?;
            tracing::info!(namespace = %label, target = %ctx.target, "collection dropped on the source; dropped on the destination");
        }
        OpKind::Rename => {
            db.collection::<Document>(&ctx.target.coll)
                .drop()
                .await
                .map_err(|e| dest_err("dropping the renamed collection", e))?;
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
            ensure_destination_collection(ctx).await?;
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
                    if let Err(e) = db
                        .run_command(doc! {"createIndexes": ctx.target.coll.clone(), "indexes": specs, "writeConcern": {"w": "majority", "j": true}})
                        .await
                    {
                        if crate::error::classify_mongo(&e) == crate::error::ErrorClass::Transient {
                            return Err(dest_err("creating indexes", e));
                        }
                        tracing::error!(namespace = %label, error = %crate::config::redact_text(&e.to_string()), "could not create an index on the destination");
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
                        match db
                            .run_command(
                                doc! {"dropIndexes": ctx.target.coll.clone(), "index": name},
                            )
                            .await
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
                    if let Err(e) = db.run_command(cmd).await {
                        if crate::error::classify_mongo(&e) == crate::error::ErrorClass::Transient {
                            return Err(dest_err("modifying the destination collection", e));
                        }
                        tracing::error!(namespace = %label, error = %crate::config::redact_text(&e.to_string()), "could not apply a collMod to the destination");
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
async fn reconcile(
    ctx: &WorkerContext,
    applier: &Applier,
    cp: &mut Checkpoint,
) -> Result<(), SyncError> {
    let label = ctx.label();
    tracing::info!(namespace = %label, "force-sync: reconciling every range while the stream is paused");
    let started = Instant::now();
    let mut budget = delete_budget(ctx, GuardTrigger::ForceSync).await?;
    let mut lower: Option<Bson> = None;
    let mut total = 0u64;
    loop {
        let (written, next) = sync_range(
            ctx,
            applier,
            lower.as_ref(),
            cp.applied_through,
            &mut budget,
        )
        .await?;
        total += written;
        if next.is_none() {
            break;
        }
        lower = next;
    }
    let end = ctx.pipeline.source.cluster_time().await?;
    cp.replay_until = Some(match cp.replay_until {
        Some(prev) => ts_max(prev, end),
        None => end,
    });
    ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    ctx.made_progress();
    tracing::info!(namespace = %label, documents = total, elapsed_ms = started.elapsed().as_millis() as u64, "force-sync finished");
    Ok(())
}

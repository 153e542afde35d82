//! The supervisor: discovers source namespaces, runs one worker per namespace, restarts
//! failed workers with backoff, parks the ones that keep failing, and drains everything on
//! shutdown within a deadline.

use std::{
    collections::{BTreeMap, HashSet},
    panic::AssertUnwindSafe,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bson::Timestamp;
use futures::FutureExt;
use mongodb::Client;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    apply::conflict::ConflictSettings,
    config::{Config, NamespaceFilter, OnDestinationReset, OnHistoryLost},
    error::{policy, Backoff, ErrorKind, RetryDirective, SyncError},
    exit,
    identity::Side,
    metrics::{ErrorKindLabel, Trigger, WorkerState},
    source::{Namespace, Source, SourceCollection},
    status::LastError,
    validate::{schedule::ValidationDeps, NamespacePlan, Registration, ValidationService},
    worker::{
        self, Pipeline, Recopy, Reloaded, WorkerCommand, WorkerContext, WorkerExit, WorkerSettings,
        WorkerSignals,
    },
};

/// How often the source is listed for new collections (a small deployment read with collection
/// streams, where a listing is the only way to see a new collection).
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// The slowest listing: a listing costs both sides time in proportion to the collections it
/// returns (at 1,000 collections every 2 s it was a third of the daemon's idle CPU), and
/// under a deployment stream it is only a safety net, since the stream reports creations and
/// renames as they happen.
pub const DISCOVERY_INTERVAL_MAX: Duration = Duration::from_secs(30);
/// Namespaces a listing every [`DISCOVERY_INTERVAL`] stays cheap for; beyond, the period grows
/// in proportion.
pub const DISCOVERY_NAMESPACES_PER_INTERVAL: usize = 100;
/// How often the source's cluster time is sampled (DESIGN §2.9: every 5 s).
pub const CLUSTER_TIME_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on the cluster-time and destination pings: an unreachable cluster reads as
/// disconnected after this long, not after `serverSelectionTimeoutMS`.
pub const SUPERVISOR_IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one listing of the source's namespaces (several round trips on a large deployment).
/// Listings run beside the supervisor loop; only a reload waits for one.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// After this many consecutive history-lost re-copies a namespace is parked.
pub const MAX_HISTORY_LOST_RECOPIES: u32 = 2;

/// Operator requests, from signals or the HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Drain and stop.
    Shutdown,
    /// Re-copy and reconcile these namespaces (all when empty); restart parked workers.
    ForceSync {
        namespaces: Vec<String>,
        trigger: Trigger,
    },
    /// Replace the running configuration (already validated).
    Reload(Box<Config>),
    /// Validate these namespaces now (all when empty).
    Validate { namespaces: Vec<String> },
    /// An operator confirmed the deletions of these namespaces, paused by the mass-delete
    /// guard: they are copied again without its limit (once).
    Confirm { namespaces: Vec<String> },
}

/// What a worker's runner tells the supervisor.
#[derive(Debug)]
enum WorkerReport {
    /// The process must stop with this exit code.
    Fatal {
        ns: Namespace,
        exit_code: u8,
        error: String,
    },
    /// The incarnation is gone (dropped or renamed on the source). Keyed by the incarnation:
    /// a late report of an old incarnation never stops a newer one of the same namespace.
    Gone {
        ns: Namespace,
        uuid: Option<bson::Uuid>,
    },
}

struct WorkerHandle {
    uuid: Option<bson::Uuid>,
    /// Coalesced force-sync requests and reloaded settings.
    signals: Arc<WorkerSignals>,
    stop: CancellationToken,
    abort: CancellationToken,
    /// Cancelled once the worker's runner has returned (or panicked).
    exited: CancellationToken,
    /// The runner: awaited before a new incarnation starts (destination reset).
    task: tokio::task::JoinHandle<()>,
}

/// A worker asked to stop whose runner may still be running: no other incarnation of its
/// namespace starts until it has exited (DESIGN §2.10).
struct Retiring {
    ns: Namespace,
    uuid: Option<bson::Uuid>,
    exited: CancellationToken,
}

/// The incarnations the supervisor runs, as seen when a listing starts.
#[derive(Debug, Clone, Default)]
struct Incarnations {
    /// Running workers and retiring workers that have not exited yet.
    active: Vec<(Namespace, Option<bson::Uuid>)>,
    /// Retiring workers that had exited when the listing started: their checkpoints may be
    /// finished by this listing, and their namespaces may start a new incarnation after it.
    exited: Vec<(Namespace, Option<bson::Uuid>)>,
}

/// Parked reason of namespaces that `sync.rename` maps onto one destination namespace.
pub const RENAME_COLLISION: &str = "rename_collision";

pub struct Supervisor {
    config: Arc<Config>,
    pipeline: Pipeline,
    settings: Arc<WorkerSettings>,
    filter: NamespaceFilter,
    workers: BTreeMap<Namespace, WorkerHandle>,
    tracker: TaskTracker,
    /// Graceful stop for every worker (stop reading, drain, checkpoint).
    stop: CancellationToken,
    /// Hard stop once the shutdown deadline has passed.
    abort: CancellationToken,
    reports_tx: mpsc::Sender<WorkerReport>,
    reports_rx: mpsc::Receiver<WorkerReport>,
    /// Stopped workers that may still be running (see [`Retiring`]).
    retiring: Vec<Retiring>,
    warned_skipped: HashSet<Namespace>,
    /// Whether the last listing's stream plan fitted the source pool (warned once when not).
    pool_fits: bool,
    /// Namespaces parked because another source namespace has the same destination.
    collided: HashSet<Namespace>,
    /// Validation scheduler (DESIGN §2.7): passes per namespace, repairs through the workers.
    validation: ValidationService,
    /// Set by [`Supervisor::run`]'s loop on every iteration, for the systemd watchdog.
    pub heartbeat: Arc<std::sync::atomic::AtomicU64>,
}

pub fn worker_settings(config: &Config) -> WorkerSettings {
    WorkerSettings {
        sync_id: config.sync.id.clone(),
        batch_max_events: config.apply.batch_max_events as usize,
        batch_max_bytes: config.apply.batch_max_bytes as usize,
        batch_max_wait: config.apply.batch_max_wait(),
        update_mode: config.apply.update_mode,
        checkpoint_interval: Duration::from_secs(config.checkpoint.interval_seconds),
        initial_copy: config.sync.initial_copy,
        start_at_operation_time: config
            .sync
            .start_at_operation_time
            .map(|t| t.to_timestamp()),
        destination_timeout: config.destination.socket_timeout(),
        on_collation_mismatch: config.sync.on_collation_mismatch,
        copy_parallel_ranges: config.copy.parallel_ranges as usize,
        write_lanes: config.apply.write_lanes,
    }
}

/// The class of an error for logs (DESIGN §2.2): transient, history_lost, document, fatal, or
/// unclassified (parked rather than retried).
fn error_class(error: &SyncError) -> &'static str {
    match policy(error) {
        RetryDirective::Backoff => "transient",
        RetryDirective::Resync => "history_lost",
        RetryDirective::Fatal { .. } => "fatal",
        RetryDirective::Stop => "cancelled",
        RetryDirective::Park { .. } if error.kind == ErrorKind::DocumentRejected => "document",
        RetryDirective::Park { .. } => "unclassified",
    }
}

fn error_label(kind: ErrorKind) -> ErrorKindLabel {
    match kind {
        ErrorKind::ChangeStreamHistoryLost => ErrorKindLabel::HistoryLost,
        ErrorKind::DocumentRejected => ErrorKindLabel::Document,
        _ => ErrorKindLabel::Transient,
    }
}

impl Supervisor {
    pub fn new(config: Arc<Config>, pipeline: Pipeline) -> Supervisor {
        let (reports_tx, reports_rx) = mpsc::channel(64);
        let validation = ValidationService::new(
            &config,
            ValidationDeps {
                source: pipeline.source.clone(),
                dest: pipeline.dest.clone(),
                dest_timeout: config.destination.socket_timeout(),
                sync_id: config.sync.id.clone(),
                metadata_db: pipeline.dest.database(&config.checkpoint.database),
                checkpoints: pipeline.checkpoints.clone(),
                metrics: pipeline.metrics.clone(),
                status: Arc::clone(&pipeline.status),
            },
        );
        Supervisor {
            settings: Arc::new(worker_settings(&config)),
            filter: config.namespace_filter(),
            config,
            pipeline,
            workers: BTreeMap::new(),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            abort: CancellationToken::new(),
            reports_tx,
            reports_rx,
            retiring: Vec::new(),
            warned_skipped: HashSet::new(),
            pool_fits: true,
            collided: HashSet::new(),
            validation,
            heartbeat: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Runs until a `Shutdown` control, the `shutdown` token, or a fatal worker error.
    /// Returns the process exit code.
    pub async fn run(
        mut self,
        control: &mut mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> u8 {
        let mut discovery = tokio::time::interval(DISCOVERY_INTERVAL);
        let mut clock = tokio::time::interval(CLUSTER_TIME_INTERVAL);
        let mut lag = tokio::time::interval(Duration::from_secs(1));
        for t in [&mut discovery, &mut clock, &mut lag] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut exit_code = 0u8;
        self.validation
            .start(&self.tracker, self.stop.child_token());
        let identity = Arc::clone(&self.pipeline.identity);
        let streams = Arc::clone(&self.pipeline.streams);
        let hint = &streams.discovery_hint;
        let mut listing: Option<tokio::task::JoinHandle<(Listing, Incarnations)>> = None;
        let mut probe: Option<tokio::task::JoinHandle<(Result<Timestamp, SyncError>, bool)>> = None;
        loop {
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ctrl = control.recv() => match ctrl {
                    None | Some(Control::Shutdown) => break,
                    Some(Control::ForceSync { namespaces, trigger }) => self.force_sync(&namespaces, trigger),
                    Some(Control::Reload(cfg)) => {
                        self.reload(*cfg);
                        // Pick up namespaces now in scope (after the listing in flight, if any).
                        if listing.is_none() {
                            discovery.reset_immediately();
                        }
                    }
                    Some(Control::Validate { namespaces }) => self.validate(&namespaces),
                    Some(Control::Confirm { namespaces }) => self.confirm(&namespaces),
                },
                trip = identity.wait_tripped() => {
                    // The watch logged the one clear line; every worker stops before it writes.
                    match (trip.side, self.config.sync.on_destination_reset) {
                        (Side::Source, _) => {
                            tracing::error!(reason = %trip.reason, exit_code = exit::INVALID_CONFIG, "the source is not the deployment this pipeline was started against; stopping (run with --reset-identity to accept it and copy everything again)");
                            self.abort.cancel();
                            exit_code = exit::INVALID_CONFIG;
                            break;
                        }
                        (Side::Destination, OnDestinationReset::Stop) => {
                            identity.count_reset(OnDestinationReset::Stop);
                            tracing::error!(reason = %trip.reason, exit_code = exit::INVALID_CONFIG, "the destination was wiped or replaced; stopping (sync.on_destination_reset = \"stop\"; restart with --reset-identity to copy everything again)");
                            self.abort.cancel();
                            exit_code = exit::INVALID_CONFIG;
                            break;
                        }
                        (Side::Destination, OnDestinationReset::Recopy) if self.config.ha.partitions > 1 => {
                            // One instance cannot re-base the metadata under the others: each
                            // would take the next one's new epoch for another reset.
                            identity.count_reset(OnDestinationReset::Stop);
                            tracing::error!(reason = %trip.reason, exit_code = exit::INVALID_CONFIG, "the destination was wiped or replaced; stopping: with ha.partitions > 1 a reset is not re-copied automatically (stop every instance, then run one with ha.partitions = 1 and --reset-identity, or with the metadata as it is now)");
                            self.abort.cancel();
                            exit_code = exit::INVALID_CONFIG;
                            break;
                        }
                        (Side::Destination, OnDestinationReset::Recopy) => {
                            if let Err(e) = self.recopy_destination().await {
                                tracing::error!(error = %e, "cannot re-copy into the reset destination yet; retrying");
                                tokio::select! {
                                    _ = shutdown.cancelled() => break,
                                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                }
                            }
                        }
                    }
                }
                Some(report) = self.reports_rx.recv() => match report {
                    WorkerReport::Fatal { ns, exit_code: code, error } => {
                        tracing::error!(namespace = %ns, class = "fatal", exit_code = code, error = %error, "fatal error; stopping");
                        exit_code = code;
                        break;
                    }
                    WorkerReport::Gone { ns, uuid } => {
                        if self.workers.get(&ns).is_some_and(|h| h.uuid == uuid) {
                            self.retire_worker(&ns, false);
                            // Its next incarnation (if any) starts at the next listing.
                            if listing.is_none() {
                                discovery.reset_after(DISCOVERY_INTERVAL.min(discovery.period()));
                            }
                        }
                    }
                },
                // Network round trips run in their own tasks: an unreachable cluster never
                // holds this loop (and with it /healthz and the systemd watchdog). One listing
                // at a time: it finishes old incarnations before new ones start.
                _ = discovery.tick(), if listing.is_none() => {
                    listing = Some(tokio::spawn(self.discovery_task()));
                }
                // A shared stream saw a collection created or renamed that no worker reads.
                _ = hint.notified(), if listing.is_none() => {
                    discovery.reset_immediately();
                }
                done = async { listing.as_mut().expect("guarded by the branch condition").await }, if listing.is_some() => {
                    listing = None;
                    match done {
                        Ok((found, seen)) => {
                            self.apply_listing(found, &seen);
                            let period = discovery_period(
                                self.workers.len(),
                                self.pipeline.streams.stream_for("")
                                    == Some(crate::source::shared_stream::SharedStreamKey::Deployment),
                            );
                            if period != discovery.period() {
                                tracing::debug!(period_ms = period.as_millis() as u64, "source listing period");
                                discovery = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                                discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            }
                            // A new incarnation waits for a listing after its old worker exits.
                            if !self.retiring.is_empty() {
                                discovery.reset_after(DISCOVERY_INTERVAL.min(period));
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "listing the source failed unexpectedly"),
                    }
                }
                _ = clock.tick(), if probe.is_none() => {
                    let (source, dest) = (self.pipeline.source.clone(), self.pipeline.dest.clone());
                    probe = Some(tokio::spawn(async move { probe_clusters(&source, &dest).await }));
                }
                done = async { probe.as_mut().expect("guarded by the branch condition").await }, if probe.is_some() => {
                    probe = None;
                    match done {
                        Ok((source, dest_ok)) => self.apply_probe(source, dest_ok),
                        Err(e) => tracing::error!(error = %e, "probing the clusters failed unexpectedly"),
                    }
                }
                _ = lag.tick() => self.update_lag(),
            }
        }
        for task in [
            listing.take().map(|t| t.abort_handle()),
            probe.take().map(|t| t.abort_handle()),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
        self.shutdown().await;
        exit_code
    }

    /// Stops reading, lets every worker finish and checkpoint its in-flight batches, and
    /// aborts what is still running after `shutdown.timeout_seconds`.
    async fn shutdown(&mut self) {
        let deadline = Duration::from_secs(self.config.shutdown.timeout_seconds);
        tracing::info!(
            workers = self.workers.len(),
            timeout_s = deadline.as_secs(),
            "draining workers"
        );
        self.stop.cancel();
        self.tracker.close();
        let started = Instant::now();
        let mut report = tokio::time::interval(Duration::from_secs(5));
        report.tick().await;
        loop {
            tokio::select! {
                _ = self.tracker.wait() => break,
                _ = report.tick() => {
                    let draining: Vec<String> = self
                        .pipeline
                        .status
                        .snapshot()
                        .into_iter()
                        .filter(|(_, s)| s.state != WorkerState::Stopped && s.state != WorkerState::Parked)
                        .map(|(ns, _)| ns)
                        .collect();
                    tracing::info!(still_draining = ?draining, "waiting for workers to drain");
                }
                _ = tokio::time::sleep(deadline.saturating_sub(started.elapsed())) => {
                    tracing::warn!("shutdown deadline passed; aborting workers that are still draining");
                    self.abort.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
                    break;
                }
            }
        }
        // The shared readers save their watermarks once the workers have acknowledged all
        // they applied.
        self.pipeline.streams.shutdown(Duration::from_secs(5)).await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "all workers stopped"
        );
    }

    /// Records the result of [`probe_clusters`].
    fn apply_probe(&mut self, source: Result<Timestamp, SyncError>, dest_ok: bool) {
        let status = &self.pipeline.status;
        match source {
            Ok(ts) => {
                status.set_source_cluster_time(ts);
                status.set_source_connected(true);
                self.pipeline.metrics.set_source_connected(true);
                self.pipeline
                    .metrics
                    .set_source_cluster_time(ts.time as f64);
            }
            Err(e) => {
                if status.source_connected() {
                    tracing::warn!(error = %e, "source unreachable");
                }
                status.set_source_connected(false);
                self.pipeline.metrics.set_source_connected(false);
            }
        }
        if status.destination_connected() && !dest_ok {
            tracing::warn!("destination unreachable");
        }
        status.set_destination_connected(dest_ok);
        self.pipeline.metrics.set_destination_connected(dest_ok);
    }

    fn update_lag(&self) {
        let status = &self.pipeline.status;
        for (ns, s) in status.snapshot() {
            if matches!(
                s.state,
                WorkerState::Copying | WorkerState::Streaming | WorkerState::Backoff
            ) {
                if let Some(lag) = status.compute_lag(s.applied_through) {
                    self.pipeline.metrics.set_lag(&ns, lag);
                    status.update(&ns, |n| n.lag_seconds = Some(lag));
                }
            }
        }
    }

    /// The incarnations running now, for a listing about to start.
    fn incarnations(&self) -> Incarnations {
        let mut seen = Incarnations {
            active: self
                .workers
                .iter()
                .map(|(ns, h)| (ns.clone(), h.uuid))
                .collect(),
            exited: Vec::new(),
        };
        for r in &self.retiring {
            let entry = (r.ns.clone(), r.uuid);
            if r.exited.is_cancelled() {
                seen.exited.push(entry);
            } else {
                seen.active.push(entry);
            }
        }
        seen
    }

    /// Destination reset under `sync.on_destination_reset = "recopy"`: stops every worker and
    /// waits for it to exit (no incarnation touches the next one), discards every checkpoint,
    /// records the destination as it is now with a new metadata epoch, and starts every
    /// namespace again with a fresh copy.
    async fn recopy_destination(&mut self) -> Result<(), SyncError> {
        tracing::warn!(
            namespaces = self.workers.len(),
            "destination reset: stopping every worker, discarding the checkpoints and copying every namespace again (sync.on_destination_reset = \"recopy\")"
        );
        let deadline = Duration::from_secs(self.config.shutdown.timeout_seconds);
        let handles: Vec<(Namespace, WorkerHandle)> =
            std::mem::take(&mut self.workers).into_iter().collect();
        for (ns, h) in &handles {
            self.validation.unregister(&ns.to_string());
            h.stop.cancel();
            h.abort.cancel();
        }
        for (ns, mut h) in handles {
            if tokio::time::timeout(deadline, &mut h.task).await.is_err() {
                tracing::warn!(namespace = %ns, "worker did not stop in time; aborting it");
                h.task.abort();
                let _ = h.task.await;
            }
        }
        self.pipeline
            .checkpoints
            .delete_all(&self.config.sync.id)
            .await?;
        self.pipeline.identity.rebase_destination().await?;
        self.pipeline
            .identity
            .count_reset(OnDestinationReset::Recopy);
        tracing::info!("destination re-based with a new metadata epoch; copying every namespace");
        self.discover().await;
        Ok(())
    }

    /// Lists the source (finishing gone incarnations first) and starts workers for the
    /// in-scope collections.
    async fn discover(&mut self) {
        let (found, seen) = self.discovery_task().await;
        self.apply_listing(found, &seen);
    }

    /// A listing of the source that first finishes the checkpoints of incarnations gone from
    /// it (see [`finish_gone_incarnations`]).
    fn discovery_task(
        &self,
    ) -> impl std::future::Future<Output = (Listing, Incarnations)> + Send + 'static {
        let seen = self.incarnations();
        let pipeline = self.pipeline.clone();
        let config = Arc::clone(&self.config);
        async move {
            let found = match list_source(&pipeline.source).await {
                Ok(found) => finish_gone_incarnations(&pipeline, &config, &seen, &found.0)
                    .await
                    .map(|()| found),
                Err(e) => Err(e),
            };
            (found, seen)
        }
    }

    /// Starts workers for the in-scope collections of a listing, and retires the workers of
    /// incarnations the listing no longer shows (dropped, renamed, or re-created with a new
    /// UUID). A namespace's new incarnation starts only once its old worker has exited and the
    /// old incarnation was finished by a listing (DESIGN §2.10).
    fn apply_listing(&mut self, found: Listing, seen: &Incarnations) {
        let (collections, skipped) = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "could not list source collections, or could not finish the collections gone from it; retrying");
                return;
            }
        };
        // Retired workers that had exited before this listing were finished by it.
        self.retiring
            .retain(|r| !seen.exited.contains(&(r.ns.clone(), r.uuid)));
        if self.pipeline.identity.tripped().is_some() {
            // Workers start again once the supervisor has handled the trip.
            return;
        }
        for (ns, kind) in skipped {
            if self.filter.matches(&ns.db, &ns.coll) && self.warned_skipped.insert(ns.clone()) {
                tracing::warn!(namespace = %ns, kind = %kind, "skipping: views and time-series collections are not synced in this version");
            }
        }
        // Every collection the source has, in scope or not: a namespace taken out of scope
        // keeps its watermark position for when it comes back (its own checkpoint may be far
        // older); only collections gone from the source leave the watermark.
        self.pipeline.streams.set_listed(
            collections
                .iter()
                .map(|c| (c.ns.to_string(), c.uuid))
                .collect(),
        );
        let collections: Vec<SourceCollection> = collections
            .into_iter()
            .filter(|coll| self.filter.matches(&coll.ns.db, &coll.ns.coll))
            .collect();
        let colliding = self.park_rename_collisions(&collections);
        let gone: Vec<Namespace> = self
            .workers
            .iter()
            .filter(|(ns, h)| !collections.iter().any(|c| same_incarnation(c, ns, h.uuid)))
            .map(|(ns, _)| ns.clone())
            .collect();
        for ns in gone {
            tracing::info!(namespace = %ns, "this incarnation of the collection is gone from the source (dropped, renamed or re-created); stopping its worker without draining");
            self.retire_worker(&ns, true);
        }
        for coll in collections {
            if colliding.contains(&coll.ns) {
                continue;
            }
            if self.workers.contains_key(&coll.ns) {
                continue;
            }
            if self.retiring.iter().any(|r| r.ns == coll.ns) {
                tracing::debug!(namespace = %coll.ns, "waiting for the previous incarnation's worker to exit before starting this one");
                continue;
            }
            self.spawn_worker(coll);
        }
        // `source.stream_scope = "auto"` decides by how many namespaces run.
        self.pipeline.streams.set_namespaces(self.workers.len());
        self.check_pool_fits_the_plan();
        // After the workers are registered: /readyz never sees "listed, but nothing to sync".
        self.pipeline.status.set_discovered();
    }

    /// Warns (once, until it fits again) when the stream plan needs more source connections
    /// than `source.max_pool_size`: every collection stream holds one for its awaiting
    /// `getMore`, each copy up to two, and streams beyond the pool would queue for one.
    fn check_pool_fits_the_plan(&mut self) {
        let namespaces = self.workers.len();
        let collection_streams = match self.pipeline.streams.stream_for("") {
            Some(_) => 0,
            None => namespaces,
        };
        let copies = (self.config.copy.concurrent_collections as usize).min(namespaces);
        let needed = pool_needed(collection_streams, copies);
        let pool = self.config.source.effective_max_pool_size() as usize;
        let fits = needed <= pool;
        if !fits && self.pool_fits {
            tracing::warn!(
                collection_streams,
                needed,
                max_pool_size = pool,
                "the stream plan needs more source connections than source.max_pool_size allows: change streams will queue for a connection and lag grows; raise source.max_pool_size or set source.stream_scope = \"deployment\""
            );
        }
        self.pool_fits = fits;
    }

    /// Two source namespaces that `sync.rename` maps onto one destination namespace would
    /// merge, each copy deleting the other's documents: both are parked with reason
    /// [`RENAME_COLLISION`] (their workers stopped) until the config or the source changes.
    /// Returns the colliding namespaces; namespaces that no longer collide are released.
    fn park_rename_collisions(&mut self, collections: &[SourceCollection]) -> HashSet<Namespace> {
        let collisions = self.config.rename_map().collisions(
            collections
                .iter()
                .map(|c| (c.ns.db.as_str(), c.ns.coll.as_str())),
        );
        let mut colliding = HashSet::new();
        for ((tdb, tcoll), sources) in collisions {
            let target = format!("{tdb}.{tcoll}");
            for source in &sources {
                let Some(ns) = collections.iter().find(|c| c.ns.to_string() == *source) else {
                    continue;
                };
                let ns = ns.ns.clone();
                colliding.insert(ns.clone());
                if self.collided.insert(ns.clone()) {
                    let others: Vec<&str> = sources
                        .iter()
                        .filter(|o| *o != source)
                        .map(String::as_str)
                        .collect();
                    tracing::error!(
                        namespace = %ns,
                        target = %target,
                        also_renamed_there = %others.join(", "),
                        reason = RENAME_COLLISION,
                        "parked: sync.rename maps several source namespaces onto one destination namespace; fix sync.rename (nothing is written to the target meanwhile)"
                    );
                }
                if self.workers.contains_key(&ns) {
                    self.retire_worker(&ns, false);
                }
                // Set at every listing: a stopping worker's last report cannot unpark it.
                let label = ns.to_string();
                self.pipeline.metrics.register_namespace(&label);
                self.pipeline
                    .metrics
                    .set_worker_state(&label, WorkerState::Parked);
                self.pipeline.status.register(&label, &target);
                self.pipeline.status.update(&label, |s| {
                    s.target = target.clone();
                    s.state = WorkerState::Parked;
                    s.parked_reason = Some(RENAME_COLLISION.to_string());
                });
            }
        }
        // Released: a worker starts again (below); gone from the source: forgotten.
        let released: Vec<Namespace> = self
            .collided
            .iter()
            .filter(|ns| !colliding.contains(*ns))
            .cloned()
            .collect();
        for ns in released {
            self.collided.remove(&ns);
            let label = ns.to_string();
            if !collections.iter().any(|c| c.ns == ns) {
                self.pipeline.metrics.remove_namespace(&label);
            }
            self.pipeline.status.remove(&label);
        }
        colliding
    }

    fn spawn_worker(&mut self, coll: SourceCollection) {
        let label = coll.ns.to_string();
        let (tdb, tcoll) = self.config.rename_map().target(&coll.ns.db, &coll.ns.coll);
        let target = Namespace::new(tdb, tcoll);
        tracing::info!(namespace = %label, target = %target, "starting worker");
        self.pipeline.metrics.register_namespace(&label);
        self.pipeline.status.register(&label, &target.to_string());
        let ctx = WorkerContext {
            ns: coll.ns.clone(),
            target,
            uuid: coll.uuid,
            source_validator: std::sync::Arc::new(parking_lot::Mutex::new(
                coll.options
                    .get_document("validator")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .cloned(),
            )),
            lane_tuner: Arc::new(parking_lot::Mutex::new(
                crate::apply::lanes::LaneTuner::new(crate::config::MAX_WRITE_LANES as usize),
            )),
            options: coll.options,
            pipeline: self.pipeline.clone(),
            settings: Arc::clone(&self.settings),
            progress: Default::default(),
            caught_up: Default::default(),
            conflict: {
                let (policy, field) = self.config.conflict_for(&coll.ns.db, &coll.ns.coll);
                ConflictSettings {
                    policy,
                    field,
                    journal: self.config.conflict.journal,
                }
            },
            enable_pre_images: self.config.conflict.enable_pre_images,
            images_enabled: Default::default(),
            signals: Arc::default(),
        };
        let signals = Arc::clone(&ctx.signals);
        // Every namespace: a dashboard's conflict panel has data (0) on a healthy daemon.
        self.pipeline
            .metrics
            .register_conflict_policy(&label, ctx.conflict.label());
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        self.validation.register(Registration {
            plan: NamespacePlan {
                ns: ctx.ns.clone(),
                target: ctx.target.clone(),
                uuid: ctx.uuid,
                options: ctx.options.clone(),
            },
            commands: cmd_tx,
        });
        let stop = self.stop.child_token();
        let abort = self.abort.child_token();
        let runner = supervise_worker(
            ctx,
            stop.clone(),
            abort.clone(),
            cmd_rx,
            self.reports_tx.clone(),
            SupervisionPolicy {
                max_restarts: self.config.supervisor.max_restarts,
                max_backoff: Duration::from_secs(self.config.supervisor.max_backoff_seconds),
                on_history_lost: self.config.sync.on_history_lost,
            },
        );
        let exited = CancellationToken::new();
        let exited_guard = exited.clone().drop_guard();
        let runner = async move {
            // Dropped when the runner returns, panics or is aborted.
            let _exited = exited_guard;
            runner.await
        };
        let span = tracing::info_span!("worker", namespace = %label);
        let task = self
            .tracker
            .spawn(tracing::Instrument::instrument(runner, span));
        self.workers.insert(
            coll.ns,
            WorkerHandle {
                uuid: coll.uuid,
                signals,
                stop,
                abort,
                exited,
                task,
            },
        );
    }

    /// Stops a worker and deletes its metrics series and status. `abort_now` (its incarnation
    /// is gone from the source) stops it without draining its queue: what it has not applied
    /// is finished by the next listing, after it has exited. Otherwise it drains within the
    /// shutdown deadline. Until it has exited, no other worker of its namespace starts.
    fn retire_worker(&mut self, ns: &Namespace, abort_now: bool) {
        if let Some(h) = self.workers.remove(ns) {
            self.validation.unregister(&ns.to_string());
            h.stop.cancel();
            if abort_now {
                h.abort.cancel();
            } else {
                // Give it the shutdown deadline to drain, then abort.
                let abort = h.abort.clone();
                let deadline = Duration::from_secs(self.config.shutdown.timeout_seconds);
                tokio::spawn(async move {
                    tokio::time::sleep(deadline).await;
                    abort.cancel();
                });
            }
            self.retiring.push(Retiring {
                ns: ns.clone(),
                uuid: h.uuid,
                exited: h.exited,
            });
        }
        let label = ns.to_string();
        self.pipeline.metrics.remove_namespace(&label);
        self.pipeline.status.remove(&label);
    }

    fn force_sync(&mut self, namespaces: &[String], trigger: Trigger) {
        self.pipeline.metrics.force_sync(trigger);
        // A force-sync naming a namespace the mass-delete guard paused confirms its deletions
        // (one for every namespace does not: a blanket signal authorises no mass deletion).
        for ns in namespaces {
            if self.paused_by_guard(ns) {
                self.pipeline.guard.confirm(ns);
            }
        }
        let mut count = 0;
        for (ns, h) in &self.workers {
            let chosen = namespaces.is_empty() || namespaces.iter().any(|n| *n == ns.to_string());
            if chosen {
                count += 1;
                if !h.signals.request_force_sync() {
                    tracing::info!(namespace = %ns, "force-sync already pending for this namespace; the requests are coalesced");
                }
            }
        }
        tracing::info!(trigger = %trigger.as_str(), namespaces = count, "force-sync requested");
    }

    fn paused_by_guard(&self, ns: &str) -> bool {
        self.pipeline.status.get(ns).is_some_and(|s| {
            s.state == WorkerState::Parked
                && s.parked_reason.as_deref() == Some(crate::guard::PARK_REASON)
        })
    }

    /// `POST /api/v1/confirm`: the namespaces' paused copies run again without the limit.
    fn confirm(&mut self, namespaces: &[String]) {
        for ns in namespaces {
            if !self.paused_by_guard(ns) {
                tracing::info!(namespace = %ns, "confirmation ignored: the namespace is not paused by the mass-delete guard");
                continue;
            }
            self.pipeline.guard.confirm(ns);
            if let Some((_, h)) = self.workers.iter().find(|(k, _)| k.to_string() == *ns) {
                h.signals.request_force_sync();
            }
        }
    }

    fn validate(&mut self, namespaces: &[String]) {
        self.validation.request(namespaces);
    }

    /// Applies a new configuration; the caller lists the source right after.
    fn reload(&mut self, config: Config) {
        let old = Arc::clone(&self.config);
        let endpoints_changed =
            old.source != config.source || old.destination != config.destination;
        if endpoints_changed {
            tracing::warn!("source or destination settings changed; they take effect at the next restart of the daemon");
        }
        if old.source.stream_scope() != config.source.stream_scope()
            || old.source.collection_streams_max() != config.source.collection_streams_max()
        {
            tracing::warn!("source.stream_scope or source.collection_streams_max changed; the stream plan is made at start, so it takes effect at the next restart of the daemon");
        }
        if old.apply.transactions != config.apply.transactions {
            tracing::warn!("apply.transactions changed; the shared streams group transactions from start, so it takes effect at the next restart of the daemon");
        }
        if old.apply.max_buffered_bytes != config.apply.max_buffered_bytes {
            tracing::warn!("apply.max_buffered_bytes changed; the budget is sized at start, so it takes effect at the next restart of the daemon");
        }
        if old.copy.concurrent_collections != config.copy.concurrent_collections {
            tracing::warn!("copy.concurrent_collections changed; the copy slots are made at start, so it takes effect at the next restart of the daemon");
        }
        if old.runtime != config.runtime {
            tracing::warn!("runtime.worker_threads changed; the runtime is built at start, so it takes effect at the next restart of the daemon");
        }
        self.filter = config.namespace_filter();
        // Before discovery starts a worker for a namespace the new scope takes in.
        self.pipeline.streams.set_scope(self.filter.clone());
        self.settings = Arc::new(worker_settings(&config));
        self.pipeline
            .guard
            .set_fraction(config.sync.max_delete_fraction);
        self.validation.reconfigure(&config);
        self.config = Arc::new(config);
        // Workers for namespaces no longer in scope stop; their series go away.
        let out_of_scope: Vec<Namespace> = self
            .workers
            .keys()
            .filter(|ns| !self.filter.matches(&ns.db, &ns.coll))
            .cloned()
            .collect();
        for ns in out_of_scope {
            tracing::info!(namespace = %ns, "namespace no longer in scope after reload; stopping its worker");
            self.retire_worker(&ns, false);
        }
        // A changed `sync.rename` target: the worker stops, and its successor starts only once
        // it has exited (so no late checkpoint of the old target survives); discovery starts it
        // again, and it copies into the new target (see `worker::run`).
        let retargeted: Vec<Namespace> = self
            .workers
            .keys()
            .filter(|ns| {
                old.rename_map().target(&ns.db, &ns.coll)
                    != self.config.rename_map().target(&ns.db, &ns.coll)
            })
            .cloned()
            .collect();
        for ns in retargeted {
            let (tdb, tcoll) = self.config.rename_map().target(&ns.db, &ns.coll);
            tracing::info!(namespace = %ns, target = %format!("{tdb}.{tcoll}"), "sync.rename changed for a namespace in sync; restarting its worker to copy into the new target");
            self.retire_worker(&ns, false);
        }
        // Parked workers restart with the new settings.
        let parked: Vec<Namespace> = self
            .pipeline
            .status
            .snapshot()
            .into_iter()
            .filter(|(_, s)| s.state == WorkerState::Parked)
            .filter_map(|(ns, _)| self.workers.keys().find(|k| k.to_string() == ns).cloned())
            .collect();
        for ns in parked {
            if let Some(h) = self.workers.get(&ns) {
                h.signals.request_force_sync();
            }
        }
        // Running workers adopt changed policies and apply settings at their next batch
        // boundary, without a restart.
        for (ns, h) in &self.workers {
            let (policy, field) = self.config.conflict_for(&ns.db, &ns.coll);
            h.signals.reconfigure(Reloaded {
                settings: Arc::clone(&self.settings),
                conflict: ConflictSettings {
                    policy,
                    field,
                    journal: self.config.conflict.journal,
                },
            });
        }
        tracing::info!("configuration reloaded");
    }
}

/// The source's collections, or why they could not be listed.
type Listing = Result<(Vec<SourceCollection>, Vec<(Namespace, String)>), SyncError>;

/// How often the source is listed: every [`DISCOVERY_INTERVAL`] for up to
/// [`DISCOVERY_NAMESPACES_PER_INTERVAL`] namespaces, proportionally slower beyond, at most
/// [`DISCOVERY_INTERVAL_MAX`], which a deployment stream (it reports creations and renames at
/// once) always uses.
pub fn discovery_period(namespaces: usize, deployment_stream: bool) -> Duration {
    if deployment_stream {
        return DISCOVERY_INTERVAL_MAX;
    }
    let intervals = namespaces
        .div_ceil(DISCOVERY_NAMESPACES_PER_INTERVAL)
        .max(1) as u32;
    (DISCOVERY_INTERVAL * intervals).min(DISCOVERY_INTERVAL_MAX)
}

/// Source connections a stream plan keeps busy: one per collection stream (its awaiting
/// `getMore`), two per copy (the range written and the one read ahead), one shared reader, and
/// a few for lookups, discovery and validation.
pub fn pool_needed(collection_streams: usize, copies: usize) -> usize {
    collection_streams + 2 * copies + 1 + 4
}

/// Lists the source's collections within [`DISCOVERY_TIMEOUT`].
async fn list_source(source: &Source) -> Listing {
    tokio::time::timeout(DISCOVERY_TIMEOUT, source.list_collections())
        .await
        .unwrap_or_else(|_| {
            Err(SyncError::new(
                ErrorKind::SourceConnection,
                "listing the source's collections timed out",
            ))
        })
}

/// Whether a listed collection is the incarnation `(ns, uuid)` (an unknown UUID on either
/// side matches by name).
fn same_incarnation(coll: &SourceCollection, ns: &Namespace, uuid: Option<bson::Uuid>) -> bool {
    coll.ns == *ns && (coll.uuid == uuid || coll.uuid.is_none() || uuid.is_none())
}

/// DESIGN §2.10: every checkpoint of this `sync.id` whose incarnation (namespace, collection
/// UUID) is not on the source any more, and whose worker is not running, is finished before a
/// new incarnation of its namespace starts. The collection was dropped (alone or with its
/// database), renamed, or re-created while the daemon was stopped or before its worker applied
/// that: every remaining event of the old stream ends in a drop, rename or dropDatabase of the
/// old name, and each of them drops the old name on the destination (§2.4; a rename's new name
/// is a namespace of its own, copied by its worker). So the outcome is decided from the
/// listing: the old target is dropped on the destination, then the checkpoint deleted. A
/// re-created collection is then created afresh with its new options.
async fn finish_gone_incarnations(
    pipeline: &Pipeline,
    config: &Config,
    seen: &Incarnations,
    collections: &[SourceCollection],
) -> Result<(), SyncError> {
    let filter = config.namespace_filter();
    for (key, _) in pipeline.checkpoints.list(&config.sync.id).await? {
        let Some((db, coll)) = key.ns.split_once('.') else {
            continue;
        };
        let ns = Namespace::new(db, coll);
        if !filter.matches(&ns.db, &ns.coll)
            || collections
                .iter()
                .any(|c| same_incarnation(c, &ns, key.uuid))
            || seen.active.contains(&(ns.clone(), key.uuid))
        {
            continue;
        }
        let renamed_to = key.uuid.and_then(|u| {
            collections
                .iter()
                .find(|c| c.uuid == Some(u))
                .map(|c| c.ns.to_string())
        });
        if seen.active.iter().any(|(n, _)| *n == ns) {
            // Another incarnation of the namespace already runs on the destination collection:
            // only the stale checkpoint goes.
            tracing::info!(namespace = %ns, "discarding the checkpoint of an earlier incarnation of the collection");
        } else {
            let (tdb, tcoll) = config.rename_map().target(&ns.db, &ns.coll);
            let target = Namespace::new(tdb, tcoll);
            crate::worker::dest_collection::drop_collection(
                &pipeline.dest.database(&target.db),
                &target.coll,
                config.destination.socket_timeout(),
                &format!("dropping {target}, whose source collection is gone"),
            )
            .await?;
            tracing::info!(namespace = %ns, target = %target, renamed_to = renamed_to.as_deref().unwrap_or(""), "finished an earlier incarnation of the collection: it is gone from the source (dropped, renamed or re-created); dropped it on the destination");
        }
        pipeline.checkpoints.delete(&key).await?;
    }
    Ok(())
}

/// The source's cluster time and whether the destination answers a ping, each within
/// [`SUPERVISOR_IO_TIMEOUT`].
async fn probe_clusters(source: &Source, dest: &Client) -> (Result<Timestamp, SyncError>, bool) {
    let admin = dest.database("admin");
    let (source, dest) = tokio::join!(
        tokio::time::timeout(SUPERVISOR_IO_TIMEOUT, source.cluster_time()),
        tokio::time::timeout(
            SUPERVISOR_IO_TIMEOUT,
            admin.run_command(bson::doc! {"ping": 1}),
        ),
    );
    let source = source.unwrap_or_else(|_| {
        Err(SyncError::new(
            ErrorKind::SourceConnection,
            "no answer to a ping within the supervisor's timeout",
        ))
    });
    (source, dest.is_ok_and(|r| r.is_ok()))
}

/// Restart policy of one runner.
#[derive(Debug, Clone, Copy)]
struct SupervisionPolicy {
    max_restarts: u32,
    max_backoff: Duration,
    on_history_lost: OnHistoryLost,
}

/// Runs one namespace's worker, restarting it on failure (classified by [`policy`]), parking
/// it when it keeps failing, re-copying on history loss.
async fn supervise_worker(
    ctx: WorkerContext,
    stop: CancellationToken,
    abort: CancellationToken,
    mut commands: mpsc::Receiver<WorkerCommand>,
    reports: mpsc::Sender<WorkerReport>,
    rules: SupervisionPolicy,
) {
    let label = ctx.label();
    let mut backoff = Backoff::new(
        Duration::from_millis(crate::error::DEFAULT_BACKOFF_BASE_MS),
        rules.max_backoff,
    );
    let mut failures = 0u32;
    let mut recopy = Recopy::No;
    loop {
        let progress_before = ctx.progress.load(Ordering::Relaxed);
        let outcome = AssertUnwindSafe(worker::run(&ctx, &stop, &abort, &mut commands, recopy))
            .catch_unwind()
            .await;
        recopy = Recopy::No;
        let error = match outcome {
            Ok(Ok(WorkerExit::Stopped)) => {
                ctx.set_state_public(WorkerState::Stopped);
                return;
            }
            Ok(Ok(WorkerExit::NamespaceGone)) => {
                ctx.set_state_public(WorkerState::Stopped);
                let _ = reports
                    .send(WorkerReport::Gone {
                        ns: ctx.ns.clone(),
                        uuid: ctx.uuid,
                    })
                    .await;
                return;
            }
            Ok(Err(e)) => e,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                SyncError::new(
                    ErrorKind::WorkerPanicked,
                    format!("worker panicked: {what}"),
                )
            }
        };
        if stop.is_cancelled() && matches!(error.kind, ErrorKind::Cancelled) {
            ctx.set_state_public(WorkerState::Stopped);
            return;
        }
        if ctx.progress.load(Ordering::Relaxed) != progress_before {
            failures = 0;
            backoff.reset();
        }
        let directive = policy(&error);
        if !matches!(directive, RetryDirective::Stop) {
            ctx.pipeline.metrics.error(&label, error_label(error.kind));
            ctx.pipeline.status.update(&label, |s| {
                s.last_error = Some(LastError {
                    kind: error.kind.as_str().to_string(),
                    message: error.to_string(),
                    at: std::time::SystemTime::now(),
                })
            });
        }
        let park_reason: Option<(String, String)> = match directive {
            RetryDirective::Stop => {
                ctx.set_state_public(WorkerState::Stopped);
                return;
            }
            RetryDirective::Fatal { exit_code } => {
                let _ = reports
                    .send(WorkerReport::Fatal {
                        ns: ctx.ns.clone(),
                        exit_code,
                        error: error.to_string(),
                    })
                    .await;
                ctx.set_state_public(WorkerState::Stopped);
                return;
            }
            RetryDirective::Resync => {
                // Consecutive history-lost re-copies, persisted in the checkpoint: the streak
                // survives restarts, and ends once a re-copy's replay has caught up.
                let history_lost_streak = match ctx.pipeline.checkpoints.load(&ctx.key()).await {
                    Ok(cp) => cp.map_or(0, |c| c.history_lost_recopies.max(0) as u32),
                    Err(e) => {
                        tracing::warn!(namespace = %label, error = %e, "could not read the history-loss streak from the checkpoint; counting from zero");
                        0
                    }
                };
                if rules.on_history_lost == OnHistoryLost::Park {
                    Some((
                        "history_lost".into(),
                        "the change stream's resume point fell off the source oplog; force-sync the namespace to re-copy it".into(),
                    ))
                } else if history_lost_streak >= MAX_HISTORY_LOST_RECOPIES {
                    Some((
                        "oplog_too_small".into(),
                        format!(
                            "history was lost {} times in a row: the source oplog window is shorter than a copy of this collection; enlarge the oplog, then force-sync",
                            history_lost_streak + 1
                        ),
                    ))
                } else {
                    tracing::warn!(namespace = %label, class = "history_lost", kind = error.kind.as_str(), error = %error, streak = history_lost_streak + 1, "change stream history lost; re-copying the namespace");
                    recopy = Recopy::HistoryLost;
                    ctx.pipeline.metrics.worker_restart(&label);
                    ctx.pipeline.status.update(&label, |s| s.restarts += 1);
                    None
                }
            }
            RetryDirective::Backoff => {
                failures += 1;
                if failures > rules.max_restarts {
                    Some((
                        "max_restarts".into(),
                        format!("the worker failed {failures} times in a row; last error: {error}; fix the cause, then force-sync or reload"),
                    ))
                } else {
                    tracing::warn!(namespace = %label, class = "transient", kind = error.kind.as_str(), error = %error, attempt = failures, "worker failed; restarting after backoff");
                    ctx.set_state_public(WorkerState::Backoff);
                    ctx.pipeline.metrics.worker_restart(&label);
                    ctx.pipeline.status.update(&label, |s| s.restarts += 1);
                    if !backoff.sleep(&stop).await {
                        ctx.set_state_public(WorkerState::Stopped);
                        return;
                    }
                    None
                }
            }
            RetryDirective::Park { reason, solution } => Some((reason.to_string(), solution)),
        };
        if let Some((reason, solution)) = park_reason {
            tracing::error!(namespace = %label, class = error_class(&error), kind = error.kind.as_str(), reason = %reason, error = %error, solution = %solution, "worker parked");
            ctx.set_state_public(WorkerState::Parked);
            ctx.pipeline
                .status
                .update(&label, |s| s.parked_reason = Some(reason.clone()));
            // Parked: wait for a force-sync (or a reload) to try again, from a fresh copy.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ctx.signals.force_sync_requested() => break,
                    cmd = commands.recv() => match cmd {
                        Some(WorkerCommand::RepairRange(request)) => {
                            let _ = request.reply.send(Err("the worker is parked".into()));
                        }
                        None => return,
                    },
                }
            }
            failures = 0;
            backoff.reset();
            // Un-parking re-copies only when the checkpoint cannot be resumed (its history is
            // gone); otherwise the worker resumes where it stopped.
            if matches!(reason.as_str(), "history_lost" | "oplog_too_small") {
                tracing::info!(namespace = %label, "parked worker restarting with a fresh copy (its stream history is gone)");
                recopy = Recopy::Operator;
            } else {
                // The force-sync (or reload) that un-parked it runs once the worker streams
                // again: a reconcile from the checkpoint's position, not a re-copy.
                tracing::info!(namespace = %label, "parked worker restarting from its checkpoint, then reconciling");
                ctx.signals.request_force_sync();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_slows_down_with_the_namespaces_and_under_a_deployment_stream() {
        assert_eq!(discovery_period(0, false), DISCOVERY_INTERVAL);
        assert_eq!(discovery_period(100, false), DISCOVERY_INTERVAL);
        assert_eq!(discovery_period(101, false), DISCOVERY_INTERVAL * 2);
        assert_eq!(discovery_period(1_000, false), Duration::from_secs(20));
        assert_eq!(discovery_period(100_000, false), DISCOVERY_INTERVAL_MAX);
        assert_eq!(discovery_period(3, true), DISCOVERY_INTERVAL_MAX);
    }

    #[test]
    fn the_pool_a_plan_needs_counts_collection_streams_and_copies() {
        // The default pool (100) holds the default plan: 16 collection streams, 4 copies.
        assert!(pool_needed(16, 4) <= crate::config::DEFAULT_MAX_POOL_SIZE as usize);
        assert_eq!(pool_needed(0, 4), 13);
        assert!(pool_needed(100, 4) > crate::config::DEFAULT_MAX_POOL_SIZE as usize);
    }
}

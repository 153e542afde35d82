//! The daemon's validation scheduler. The supervisor registers every namespace worker (with
//! its command channel, through which repairs go) and forwards `Control::Validate`; this task
//! runs one pass at a time per namespace (at most [`MAX_CONCURRENT_PASSES`] namespaces at
//! once), every `validation.interval_seconds` with ±10 % jitter (the first pass after start-up
//! at a random point of the first interval, so restarts do not align passes), at once on
//! request, and at once for a pass a restart interrupted. Only streaming namespaces are
//! validated: during a copy there is nothing stable to compare.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mongodb::Client;
use parking_lot::Mutex;
use rand::Rng;
use tokio::{
    sync::mpsc,
    task::{AbortHandle, JoinSet},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    pass::{AppliedPosition, Pass, PassSettings},
    report::{Report, ReportStore, Runner},
    NamespacePlan, Throttles,
};
use crate::{
    checkpoint::{CheckpointKey, CheckpointStore},
    config::{Config, ConflictPolicy, ValidationConfig},
    metrics::{Metrics, ValidationResult, WorkerState},
    source::Source,
    status::{LastValidation, StatusRegistry},
};

use super::request::WorkerCommand;

/// Namespaces validated at the same time (each pass holds two cursors open).
pub const MAX_CONCURRENT_PASSES: usize = 2;
/// A due namespace that is not streaming yet is looked at again after this long.
const NOT_STREAMING_RETRY: Duration = Duration::from_secs(2);
/// How long a re-check waits for the worker to apply past the re-check time.
pub const DAEMON_RECHECK_WAIT: Duration = Duration::from_secs(120);

/// A namespace worker, as the scheduler knows it.
#[derive(Debug, Clone)]
pub struct Registration {
    pub plan: NamespacePlan,
    /// The worker's command channel (repairs).
    pub commands: mpsc::Sender<WorkerCommand>,
}

enum Message {
    Register(Registration),
    Unregister(String),
    Request(Vec<String>),
    Reconfigure(Box<Config>),
}

/// What the passes share.
struct Shared {
    source: Source,
    dest: Client,
    dest_timeout: Option<Duration>,
    sync_id: String,
    checkpoints: CheckpointStore,
    reports: ReportStore,
    metrics: Metrics,
    status: Arc<StatusRegistry>,
    throttles: Throttles,
}

/// The supervisor's handle on the scheduler. Its methods never block.
pub struct ValidationService {
    tx: mpsc::UnboundedSender<Message>,
    pending: Mutex<Option<Scheduler>>,
}

struct Scheduler {
    rx: mpsc::UnboundedReceiver<Message>,
    shared: Arc<Shared>,
    config: ValidationConfig,
    /// The whole configuration, for the per-namespace conflict policy.
    root: Box<Config>,
}

/// The pieces of the pipeline validation uses.
pub struct ValidationDeps {
    pub source: Source,
    pub dest: Client,
    /// `destination.socket_timeout_ms`.
    pub dest_timeout: Option<Duration>,
    pub sync_id: String,
    pub metadata_db: mongodb::Database,
    pub checkpoints: CheckpointStore,
    pub metrics: Metrics,
    pub status: Arc<StatusRegistry>,
}

impl ValidationService {
    pub fn new(root: &Config, deps: ValidationDeps) -> ValidationService {
        let config = &root.validation;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            reports: ReportStore::new(&deps.metadata_db, deps.dest_timeout),
            source: deps.source,
            dest: deps.dest,
            dest_timeout: deps.dest_timeout,
            sync_id: deps.sync_id,
            checkpoints: deps.checkpoints,
            metrics: deps.metrics,
            status: deps.status,
            throttles: Throttles::new(config.max_docs_per_second),
        });
        ValidationService {
            tx,
            pending: Mutex::new(Some(Scheduler {
                rx,
                shared,
                config: config.clone(),
                root: Box::new(root.clone()),
            })),
        }
    }

    /// Starts the scheduler on `tracker`; it stops when `cancel` fires (an interrupted pass
    /// stays `running` in its report and continues after the next start).
    pub fn start(&self, tracker: &TaskTracker, cancel: CancellationToken) {
        if let Some(scheduler) = self.pending.lock().take() {
            let span = tracing::info_span!("validation");
            tracker.spawn(tracing::Instrument::instrument(scheduler.run(cancel), span));
        }
    }

    pub fn register(&self, registration: Registration) {
        let _ = self.tx.send(Message::Register(registration));
    }

    pub fn unregister(&self, ns: &str) {
        let _ = self.tx.send(Message::Unregister(ns.to_string()));
    }

    /// Validate these namespaces now (all when empty).
    pub fn request(&self, namespaces: &[String]) {
        let _ = self.tx.send(Message::Request(namespaces.to_vec()));
    }

    pub fn reconfigure(&self, config: &Config) {
        let _ = self.tx.send(Message::Reconfigure(Box::new(config.clone())));
    }
}

struct Entry {
    registration: Registration,
    /// When the next scheduled pass is due (`None`: not scheduled).
    due: Option<Instant>,
    /// Asked for (SIGUSR2, HTTP) or a pass to continue: run as soon as possible.
    requested: Option<&'static str>,
    running: Option<AbortHandle>,
}

fn jittered(interval: Duration, low: f64, high: f64) -> Duration {
    interval.mul_f64(rand::rng().random_range(low..high))
}

impl Scheduler {
    fn first_due(&self) -> Option<Instant> {
        (self.config.interval_seconds > 0).then(|| {
            Instant::now() + jittered(Duration::from_secs(self.config.interval_seconds), 0.1, 1.0)
        })
    }

    fn next_due(&self) -> Option<Instant> {
        (self.config.interval_seconds > 0).then(|| {
            Instant::now() + jittered(Duration::from_secs(self.config.interval_seconds), 0.9, 1.1)
        })
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut running: JoinSet<(String, Report)> = JoinSet::new();
        loop {
            self.start_due(&mut entries, &mut running);
            let wake = entries
                .values()
                .filter(|e| e.running.is_none())
                .filter_map(|e| e.due)
                .min();
            let sleep = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                message = self.rx.recv() => match message {
                    None => break,
                    Some(m) => self.handle(m, &mut entries).await,
                },
                Some(joined) = running.join_next(), if !running.is_empty() => {
                    let Ok((ns, report)) = joined else { continue };
                    record(&self.shared, &report);
                    let next = self.next_due();
                    if let Some(e) = entries.get_mut(&ns) {
                        e.running = None;
                        e.due = next;
                    }
                }
                _ = sleep => {}
            }
        }
        // Interrupted passes keep their `running` reports and continue after a restart.
        running.shutdown().await;
    }

    async fn handle(&mut self, message: Message, entries: &mut BTreeMap<String, Entry>) {
        match message {
            Message::Register(registration) => {
                let ns = registration.plan.ns.to_string();
                // A pass a restart interrupted continues at once.
                let resume = match self
                    .shared
                    .reports
                    .running(&self.shared.sync_id, &ns, Runner::Daemon)
                    .await
                {
                    Ok(Some(r)) => r.collection_uuid == registration.plan.uuid,
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(namespace = %ns, error = %e, "cannot look for an interrupted validation pass");
                        false
                    }
                };
                let due = self.first_due();
                if let Some(old) = entries.insert(
                    ns,
                    Entry {
                        registration,
                        due,
                        // The resumed report keeps its own trigger; this only schedules it now.
                        requested: resume.then_some("resume"),
                        running: None,
                    },
                ) {
                    if let Some(h) = old.running {
                        h.abort();
                    }
                }
            }
            Message::Unregister(ns) => {
                if let Some(e) = entries.remove(&ns) {
                    if let Some(h) = e.running {
                        h.abort();
                    }
                }
            }
            Message::Request(namespaces) => {
                let mut matched = 0;
                for (ns, e) in entries.iter_mut() {
                    if namespaces.is_empty() || namespaces.iter().any(|n| n == ns) {
                        e.requested = Some("request");
                        matched += 1;
                    }
                }
                for unknown in namespaces.iter().filter(|n| !entries.contains_key(*n)) {
                    tracing::warn!(namespace = %unknown, "validation requested for a namespace that is not synced");
                }
                tracing::info!(namespaces = matched, "validation requested");
            }
            Message::Reconfigure(root) => {
                let config = root.validation.clone();
                self.shared.throttles.set_rate(config.max_docs_per_second);
                let interval_changed = config.interval_seconds != self.config.interval_seconds;
                self.config = config;
                self.root = root;
                if interval_changed {
                    for e in entries.values_mut().filter(|e| e.running.is_none()) {
                        e.due = self.first_due();
                    }
                }
            }
        }
    }

    fn start_due(
        &self,
        entries: &mut BTreeMap<String, Entry>,
        running: &mut JoinSet<(String, Report)>,
    ) {
        let now = Instant::now();
        for (ns, e) in entries.iter_mut() {
            if running.len() >= MAX_CONCURRENT_PASSES {
                return;
            }
            if e.running.is_some() {
                continue;
            }
            let due = e.requested.is_some() || e.due.is_some_and(|d| d <= now);
            if !due {
                continue;
            }
            let streaming = self
                .shared
                .status
                .get(ns)
                .is_some_and(|s| s.state == WorkerState::Streaming);
            if !streaming {
                e.due = Some(now + NOT_STREAMING_RETRY);
                continue;
            }
            let trigger = e.requested.take().unwrap_or("schedule");
            // A repair re-copies source documents over the destination: that is source-wins.
            // Under any other conflict policy the destination may differ on purpose, so drift
            // is reported but not repaired.
            let plan = &e.registration.plan;
            let (policy, _) = self.root.conflict_for(&plan.ns.db, &plan.ns.coll);
            let repair_blocked =
                (self.config.repair && policy != ConflictPolicy::SourceWins).then(|| {
                    format!(
                        "drift not repaired: conflict policy {} keeps destination changes",
                        policy.as_str()
                    )
                });
            let settings = PassSettings {
                mode: self.config.mode,
                strict_order: self.config.strict_order,
                repair: self.config.repair && repair_blocked.is_none(),
                repair_blocked,
                recheck_wait: DAEMON_RECHECK_WAIT,
                runner: Runner::Daemon,
                trigger: trigger.to_string(),
            };
            let shared = Arc::clone(&self.shared);
            let registration = e.registration.clone();
            let ns_owned = ns.clone();
            e.due = None;
            e.running = Some(running.spawn(async move {
                let report = run_pass(&shared, &registration, settings).await;
                (ns_owned, report)
            }));
        }
    }
}

async fn run_pass(shared: &Shared, registration: &Registration, settings: PassSettings) -> Report {
    let plan = &registration.plan;
    let key = CheckpointKey {
        sync_id: shared.sync_id.clone(),
        ns: plan.ns.to_string(),
        uuid: plan.uuid,
    };
    tracing::info!(namespace = %plan.ns, trigger = %settings.trigger, mode = ?settings.mode, "validation pass starting");
    let pass = Pass {
        source: &shared.source,
        dest: &shared.dest,
        dest_timeout: shared.dest_timeout,
        sync_id: &shared.sync_id,
        plan,
        settings,
        throttles: &shared.throttles,
        reports: &shared.reports,
        applied: AppliedPosition::new(shared.checkpoints.clone(), key),
        worker: Some(registration.commands.clone()),
    };
    pass.run(true).await
}

/// A finished pass: metrics, status, one log line.
fn record(shared: &Shared, report: &Report) {
    let ns = report.namespace.as_str();
    let result = report.result.unwrap_or(ValidationResult::Error);
    shared.metrics.validation_run(ns, result);
    if result != ValidationResult::Error {
        shared
            .metrics
            .set_validation_mismatched(ns, report.mismatched_documents);
    }
    let now = SystemTime::now();
    if result == ValidationResult::Match {
        let unix = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        shared.metrics.set_validation_last_success(ns, unix);
    }
    shared.status.update(ns, |s| {
        s.last_validation = Some(LastValidation {
            result: result.as_str().to_string(),
            at: now,
            ranges_checked: report.ranges_checked,
            mismatched_documents: report.mismatched_documents,
            repaired: report.documents_repaired,
        })
    });
    let fields = (
        report.ranges_checked,
        report.source_documents,
        report.destination_documents,
        report.mismatched_documents,
        report.unverified_documents,
        report.documents_repaired,
    );
    let report_id = report.id.to_hex();
    let rate = report.documents_per_second().round() as u64;
    let elapsed_ms = report.elapsed.as_millis() as u64;
    match result {
        ValidationResult::Match => tracing::info!(
            namespace = %ns, result = %result, ranges = fields.0, source_documents = fields.1,
            destination_documents = fields.2, elapsed_ms, documents_per_second = rate,
            report = %report_id, "validation pass finished"
        ),
        ValidationResult::Error => tracing::error!(
            namespace = %ns, result = %result, ranges = fields.0,
            error = %report.error.as_deref().unwrap_or("unknown"), report = %report_id,
            "validation pass failed"
        ),
        _ => tracing::warn!(
            namespace = %ns, result = %result, ranges = fields.0, source_documents = fields.1,
            destination_documents = fields.2, mismatched_documents = fields.3,
            unverified_documents = fields.4, repaired = fields.5,
            options_differ = report.options_differ.len(), elapsed_ms, report = %report_id,
            "validation pass finished with findings; details in the validations collection"
        ),
    }
}

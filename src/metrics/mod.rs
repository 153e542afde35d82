//! Prometheus metrics of the daemon (DESIGN.md §6).
//!
//! Every metric name and label key is a `pub const` of this module; nothing else in the daemon
//! spells them (STYLE.md convention 12). The daemon calls the typed methods of [`Metrics`];
//! `GET /metrics` answers [`Metrics::render`] with [`CONTENT_TYPE`].
//!
//! Labels are bounded:
//! - non-namespace labels take their values from the enums in [`labels`];
//! - at most `metrics.max_namespaces` namespaces get their own `namespace` label value; the series
//!   of any further namespace aggregate under `namespace="_other"` (counters add up; of the gauges,
//!   lag and checkpoint age take the worst value, the recovery point and the last validation
//!   success the oldest, queue, copy estimate and mismatched documents the sum, and
//!   `worker_state` counts the workers in each state);
//! - [`Metrics::remove_namespace`] deletes every series of a namespace that is no longer synced.
//!
//! Additions to DESIGN §6 (documented in `deploy/README.md`):
//! `mongo_syncd_config_reloads_total{result}`, `mongo_syncd_start_time_seconds`,
//! `mongo_syncd_overflow_namespaces`, `mongo_syncd_identity_mismatch{side}`,
//! `mongo_syncd_destination_resets_total{action}`, `mongo_syncd_mass_delete_guard_total{trigger}`
//! (the last three registered by `identity` and `guard`, which own their label values),
//! `mongo_syncd_buffered_bytes` and `mongo_syncd_buffer_budget_bytes` (registered by
//! `buffer_budget`, which owns the budget), `mongo_syncd_connections{side}` (registered by
//! `connections`, fed by the clients' pool events), `mongo_syncd_transaction_parts_total{outcome}`
//! (`apply.transactions = "atomic"`), `mongo_syncd_role{role}`, `mongo_syncd_lease_epoch` and
//! `mongo_syncd_lease_losses_total` (registered by `ha` under `ha.enabled`).

mod labels;
mod namespaces;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, Opts, Registry, TextEncoder,
};

pub use labels::{
    ApplyOp, ConflictOutcome, ConflictPolicyLabel, ErrorKindLabel, ReloadResult, Trigger,
    ValidationResult, WorkerState,
};
use namespaces::{NamespaceGauges, NamespaceTable, Slot};

/// `Content-Type` of `GET /metrics`: the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Default of `metrics.max_namespaces`.
pub const DEFAULT_MAX_NAMESPACES: usize = 500;

/// `namespace` label value that aggregates the namespaces beyond `metrics.max_namespaces`.
/// A real namespace always contains a dot, so it cannot collide.
pub const OTHER_NAMESPACE: &str = "_other";

// ---- metric names (DESIGN §6) ----
pub const BUILD_INFO: &str = "mongo_syncd_build_info";
// High availability (`ha.enabled`; registered by `crate::ha`, absent otherwise).
/// `mongo_syncd_role{role}`: 1 for this instance's role (`active` or `standby`).
pub const ROLE: &str = "mongo_syncd_role";
/// `mongo_syncd_lease_epoch`: the (highest) epoch of the leases this instance holds; 0 as a standby.
pub const LEASE_EPOCH: &str = "mongo_syncd_lease_epoch";
/// `mongo_syncd_lease_losses_total`: active terms that ended because a lease could not be
/// renewed in time or was taken over.
pub const LEASE_LOSSES_TOTAL: &str = "mongo_syncd_lease_losses_total";
/// `mongo_syncd_partitions_held`: partitions (leases) this instance holds and syncs.
pub const PARTITIONS_HELD: &str = "mongo_syncd_partitions_held";
/// `mongo_syncd_ha_partitions`: `ha.partitions`, the leases the instances share (1 for
/// active/standby): the instances of one pipeline never hold more than this together.
pub const HA_PARTITIONS: &str = "mongo_syncd_ha_partitions";
pub const LAG_SECONDS: &str = "mongo_syncd_lag_seconds";
pub const APPLIED_THROUGH_TIMESTAMP_SECONDS: &str = "mongo_syncd_applied_through_timestamp_seconds";
pub const SOURCE_CLUSTER_TIME_SECONDS: &str = "mongo_syncd_source_cluster_time_seconds";
pub const REPLICATION_LATENCY_SECONDS: &str = "mongo_syncd_replication_latency_seconds";
pub const EVENTS_READ_TOTAL: &str = "mongo_syncd_events_read_total";
pub const EVENTS_APPLIED_TOTAL: &str = "mongo_syncd_events_applied_total";
pub const WRITES_TOTAL: &str = "mongo_syncd_writes_total";
pub const REPLAY_SKIPPED_TOTAL: &str = "mongo_syncd_replay_skipped_total";
/// Events a shared change stream delivered that the namespace had applied already (DESIGN §2.11).
pub const EVENTS_ALREADY_APPLIED_TOTAL: &str = "mongo_syncd_events_already_applied_total";
pub const APPLY_BATCH_DURATION_SECONDS: &str = "mongo_syncd_apply_batch_duration_seconds";
pub const QUEUE_EVENTS: &str = "mongo_syncd_queue_events";
pub const CHECKPOINT_AGE_SECONDS: &str = "mongo_syncd_checkpoint_age_seconds";
pub const WORKER_STATE: &str = "mongo_syncd_worker_state";
pub const WORKER_RESTARTS_TOTAL: &str = "mongo_syncd_worker_restarts_total";
pub const ERRORS_TOTAL: &str = "mongo_syncd_errors_total";
pub const INITIAL_SYNC_DOCUMENTS_COPIED_TOTAL: &str =
    "mongo_syncd_initial_sync_documents_copied_total";
pub const INITIAL_SYNC_DOCUMENTS_ESTIMATED: &str = "mongo_syncd_initial_sync_documents_estimated";
pub const VALIDATION_RUNS_TOTAL: &str = "mongo_syncd_validation_runs_total";
pub const VALIDATION_MISMATCHED_DOCUMENTS: &str = "mongo_syncd_validation_mismatched_documents";
pub const VALIDATION_LAST_SUCCESS_TIMESTAMP_SECONDS: &str =
    "mongo_syncd_validation_last_success_timestamp_seconds";
pub const CONFLICTS_TOTAL: &str = "mongo_syncd_conflicts_total";
pub const DEAD_LETTERS_TOTAL: &str = "mongo_syncd_dead_letters_total";
pub const FORCE_SYNCS_TOTAL: &str = "mongo_syncd_force_syncs_total";
pub const SOURCE_CONNECTED: &str = "mongo_syncd_source_connected";
pub const DESTINATION_CONNECTED: &str = "mongo_syncd_destination_connected";

// ---- additions to DESIGN §6 ----
/// Config reloads (SIGHUP) by result; a failed reload keeps the old config.
pub const CONFIG_RELOADS_TOTAL: &str = "mongo_syncd_config_reloads_total";
/// Unix time the process created its metrics (uptime = `time() - x`).
pub const START_TIME_SECONDS: &str = "mongo_syncd_start_time_seconds";
/// Namespaces aggregated under `namespace="_other"`.
pub const OVERFLOW_NAMESPACES: &str = "mongo_syncd_overflow_namespaces";
/// 1 while the source or destination is not the deployment recorded at start (`side`).
pub const IDENTITY_MISMATCH: &str = "mongo_syncd_identity_mismatch";
/// Destinations found wiped or replaced while running, by `action` (`sync.on_destination_reset`).
pub const DESTINATION_RESETS_TOTAL: &str = "mongo_syncd_destination_resets_total";
/// Copies, force-syncs and repairs paused by the mass-delete guard, by `trigger`.
pub const MASS_DELETE_GUARD_TOTAL: &str = "mongo_syncd_mass_delete_guard_total";
/// Change-event bytes read and not yet applied, all namespaces (`apply.max_buffered_bytes`).
pub const BUFFERED_BYTES: &str = "mongo_syncd_buffered_bytes";
/// `apply.max_buffered_bytes`.
pub const BUFFER_BUDGET_BYTES: &str = "mongo_syncd_buffer_budget_bytes";
/// Pooled connections open to each cluster (`side`).
pub const CONNECTIONS: &str = "mongo_syncd_connections";
/// Parts of source transactions (one namespace's events of one transaction) applied under
/// `apply.transactions = "atomic"`, by `outcome`: `atomic` (in one destination transaction
/// with the other parts) or `per_document` (some member could not take part).
pub const TRANSACTION_PARTS_TOTAL: &str = "mongo_syncd_transaction_parts_total";
/// Concurrent bulk commands a namespace's batches are cut into (`apply.write_lanes`: the fixed
/// count, or the one `auto` keeps now).
pub const WRITE_LANES: &str = "mongo_syncd_write_lanes";

/// Every metric family name the daemon exports, for tests and tooling.
pub const METRIC_NAMES: &[&str] = &[
    BUILD_INFO,
    LAG_SECONDS,
    APPLIED_THROUGH_TIMESTAMP_SECONDS,
    SOURCE_CLUSTER_TIME_SECONDS,
    REPLICATION_LATENCY_SECONDS,
    EVENTS_READ_TOTAL,
    EVENTS_APPLIED_TOTAL,
    WRITES_TOTAL,
    REPLAY_SKIPPED_TOTAL,
    EVENTS_ALREADY_APPLIED_TOTAL,
    APPLY_BATCH_DURATION_SECONDS,
    QUEUE_EVENTS,
    CHECKPOINT_AGE_SECONDS,
    WORKER_STATE,
    WORKER_RESTARTS_TOTAL,
    ERRORS_TOTAL,
    INITIAL_SYNC_DOCUMENTS_COPIED_TOTAL,
    INITIAL_SYNC_DOCUMENTS_ESTIMATED,
    VALIDATION_RUNS_TOTAL,
    VALIDATION_MISMATCHED_DOCUMENTS,
    VALIDATION_LAST_SUCCESS_TIMESTAMP_SECONDS,
    CONFLICTS_TOTAL,
    DEAD_LETTERS_TOTAL,
    FORCE_SYNCS_TOTAL,
    SOURCE_CONNECTED,
    DESTINATION_CONNECTED,
    CONFIG_RELOADS_TOTAL,
    START_TIME_SECONDS,
    OVERFLOW_NAMESPACES,
    IDENTITY_MISMATCH,
    DESTINATION_RESETS_TOTAL,
    MASS_DELETE_GUARD_TOTAL,
    BUFFERED_BYTES,
    BUFFER_BUDGET_BYTES,
    CONNECTIONS,
    TRANSACTION_PARTS_TOTAL,
    WRITE_LANES,
];

/// `outcome` values of [`TRANSACTION_PARTS_TOTAL`].
pub const TRANSACTION_OUTCOMES: [&str; 2] = ["atomic", "per_document"];

// ---- label keys ----
pub const LABEL_NAMESPACE: &str = "namespace";
/// `source` or `destination`.
pub const LABEL_SIDE: &str = "side";
pub const LABEL_OP: &str = "op";
pub const LABEL_STATE: &str = "state";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_RESULT: &str = "result";
pub const LABEL_POLICY: &str = "policy";
pub const LABEL_OUTCOME: &str = "outcome";
pub const LABEL_TRIGGER: &str = "trigger";
pub const LABEL_VERSION: &str = "version";

/// Buckets of `replication_latency_seconds`: 5 ms to one hour.
pub const REPLICATION_LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];

/// Buckets of `apply_batch_duration_seconds`: 1 ms to one minute.
pub const APPLY_BATCH_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Counters with a `namespace` label, by the number and kind of their other labels.
#[derive(Clone)]
struct NsCounters {
    events_read: IntCounterVec,
    events_applied: IntCounterVec,
    writes: IntCounterVec,
    replay_skipped: IntCounterVec,
    already_applied: IntCounterVec,
    worker_restarts: IntCounterVec,
    errors: IntCounterVec,
    copied: IntCounterVec,
    validation_runs: IntCounterVec,
    conflicts: IntCounterVec,
    dead_letters: IntCounterVec,
}

impl NsCounters {
    /// The counters labelled by namespace alone.
    fn namespace_only(&self) -> [&IntCounterVec; 7] {
        [
            &self.events_read,
            &self.writes,
            &self.replay_skipped,
            &self.already_applied,
            &self.worker_restarts,
            &self.copied,
            &self.dead_letters,
        ]
    }

    /// Series that must exist at zero as soon as a namespace is known, so that `rate()` and
    /// `increase()` see the first increment and dashboards show 0 rather than "no data".
    fn pre_initialise(&self, label: &str) {
        for vec in self.namespace_only() {
            vec.with_label_values(&[label]);
        }
        for op in ApplyOp::ALL {
            self.events_applied.with_label_values(&[label, op.as_str()]);
        }
        for kind in ErrorKindLabel::ALL {
            self.errors.with_label_values(&[label, kind.as_str()]);
        }
        for result in ValidationResult::ALL {
            self.validation_runs
                .with_label_values(&[label, result.as_str()]);
        }
    }

    /// Deletes every series of `label`. Missing series are not an error.
    fn remove(&self, label: &str) {
        for vec in self.namespace_only() {
            let _ = vec.remove_label_values(&[label]);
        }
        for op in ApplyOp::ALL {
            let _ = self
                .events_applied
                .remove_label_values(&[label, op.as_str()]);
        }
        for kind in ErrorKindLabel::ALL {
            let _ = self.errors.remove_label_values(&[label, kind.as_str()]);
        }
        for result in ValidationResult::ALL {
            let _ = self
                .validation_runs
                .remove_label_values(&[label, result.as_str()]);
        }
        for policy in ConflictPolicyLabel::ALL {
            for outcome in ConflictOutcome::ALL {
                let _ =
                    self.conflicts
                        .remove_label_values(&[label, policy.as_str(), outcome.as_str()]);
            }
        }
    }
}

/// The daemon's metrics, in a registry of their own (not the global default registry, so tests
/// can create several). Cheap to clone: clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    table: Arc<Mutex<NamespaceTable>>,
    ns: NsCounters,
    source_cluster_time: GaugeVec,
    replication_latency: Histogram,
    apply_batch_duration: Histogram,
    force_syncs: IntCounterVec,
    transactions: IntCounterVec,
    config_reloads: IntCounterVec,
    source_connected: Gauge,
    destination_connected: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.lock();
        f.debug_struct("Metrics")
            .field("overflow_namespaces", &table.overflow_count())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_NAMESPACES)
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Negative, NaN and infinite values become 0 (clock skew between source and daemon).
fn non_negative(secs: f64) -> f64 {
    if secs.is_finite() && secs > 0.0 {
        secs
    } else {
        0.0
    }
}

impl Metrics {
    /// Creates every metric in a fresh registry. `max_namespaces` is `metrics.max_namespaces`.
    ///
    /// # Panics
    /// Only if the constant names above were invalid or duplicated, which the unit tests rule
    /// out.
    pub fn new(max_namespaces: usize) -> Self {
        Self::try_new(max_namespaces).expect("metric names and labels are valid constants")
    }

    fn try_new(max_namespaces: usize) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let table = Arc::new(Mutex::new(NamespaceTable::new(max_namespaces)));
        let ns_label = &[LABEL_NAMESPACE][..];

        let ns = NsCounters {
            events_read: counter(
                EVENTS_READ_TOTAL,
                "Change events received from the source change stream.",
                ns_label,
            )?,
            events_applied: counter(
                EVENTS_APPLIED_TOTAL,
                "Source change events applied to the destination, by operation (insert, update, replace, delete, ddl).",
                &[LABEL_NAMESPACE, LABEL_OP],
            )?,
            writes: counter(
                WRITES_TOTAL,
                "Write statements issued to the destination.",
                ns_label,
            )?,
            replay_skipped: counter(
                REPLAY_SKIPPED_TOTAL,
                "Replayed events (up to replay_until after an initial copy or crash) whose write was moot.",
                ns_label,
            )?,
            already_applied: counter(
                EVENTS_ALREADY_APPLIED_TOTAL,
                "Events a shared change stream delivered that the namespace had applied already (after a restart from the stream's watermark): skipped, not written.",
                ns_label,
            )?,
            worker_restarts: counter(
                WORKER_RESTARTS_TOTAL,
                "Restarts of the namespace worker after a failure.",
                ns_label,
            )?,
            errors: counter(
                ERRORS_TOTAL,
                "Errors of the namespace by class (transient, history_lost, document).",
                &[LABEL_NAMESPACE, LABEL_KIND],
            )?,
            copied: counter(
                INITIAL_SYNC_DOCUMENTS_COPIED_TOTAL,
                "Documents copied to the destination by initial copies and re-copies.",
                ns_label,
            )?,
            validation_runs: counter(
                VALIDATION_RUNS_TOTAL,
                "Validation runs of the namespace by result (match, mismatch, unverified, error).",
                &[LABEL_NAMESPACE, LABEL_RESULT],
            )?,
            conflicts: counter(
                CONFLICTS_TOTAL,
                "Conflicts with independent destination changes, by conflict policy and outcome.",
                &[LABEL_NAMESPACE, LABEL_POLICY, LABEL_OUTCOME],
            )?,
            dead_letters: counter(
                DEAD_LETTERS_TOTAL,
                "Documents the destination rejected, written to the dead_letters collection.",
                ns_label,
            )?,
        };

        let build_info = GaugeVec::new(
            Opts::new(
                BUILD_INFO,
                "Build information of the running daemon; always 1.",
            ),
            &[LABEL_VERSION],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);

        let source_cluster_time = GaugeVec::new(
            Opts::new(
                SOURCE_CLUSTER_TIME_SECONDS,
                "Latest cluster time (operationTime) seen from the source, as Unix seconds.",
            ),
            &[],
        )?;
        let replication_latency = Histogram::with_opts(
            HistogramOpts::new(
                REPLICATION_LATENCY_SECONDS,
                "Time from an event's wall time on the source to its acknowledgement by the destination (negative values clamped to 0).",
            )
            .buckets(REPLICATION_LATENCY_BUCKETS.to_vec()),
        )?;
        let apply_batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                APPLY_BATCH_DURATION_SECONDS,
                "Duration of one bulk write to the destination plus its checkpoint.",
            )
            .buckets(APPLY_BATCH_DURATION_BUCKETS.to_vec()),
        )?;
        let force_syncs = counter(
            FORCE_SYNCS_TOTAL,
            "Force-sync requests by trigger (signal = SIGUSR1, http = POST /api/v1/force-sync).",
            &[LABEL_TRIGGER],
        )?;
        for trigger in Trigger::ALL {
            force_syncs.with_label_values(&[trigger.as_str()]);
        }
        let transactions = counter(
            TRANSACTION_PARTS_TOTAL,
            "Parts of source transactions (one namespace's events of one transaction) applied with apply.transactions = \"atomic\", by outcome: atomic (in one destination transaction) or per_document (a member namespace could not take part).",
            &[LABEL_OUTCOME],
        )?;
        for outcome in TRANSACTION_OUTCOMES {
            transactions.with_label_values(&[outcome]);
        }
        let config_reloads = counter(
            CONFIG_RELOADS_TOTAL,
            "Configuration reloads (SIGHUP) by result; on failure the previous configuration stays in effect.",
            &[LABEL_RESULT],
        )?;
        for result in ReloadResult::ALL {
            config_reloads.with_label_values(&[result.as_str()]);
        }
        let source_connected = Gauge::new(
            SOURCE_CONNECTED,
            "1 while the source deployment answered within the last 10 seconds, else 0.",
        )?;
        let destination_connected = Gauge::new(
            DESTINATION_CONNECTED,
            "1 while the destination deployment is reachable, else 0.",
        )?;
        let start_time = Gauge::new(START_TIME_SECONDS, "Unix time at which the daemon started.")?;
        start_time.set(unix_now());

        let gauges = NamespaceGauges::new(Arc::clone(&table))?;

        for c in [
            &ns.events_read,
            &ns.events_applied,
            &ns.writes,
            &ns.replay_skipped,
            &ns.already_applied,
            &ns.worker_restarts,
            &ns.errors,
            &ns.copied,
            &ns.validation_runs,
            &ns.conflicts,
            &ns.dead_letters,
            &force_syncs,
            &transactions,
            &config_reloads,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(source_cluster_time.clone()))?;
        registry.register(Box::new(replication_latency.clone()))?;
        registry.register(Box::new(apply_batch_duration.clone()))?;
        registry.register(Box::new(source_connected.clone()))?;
        registry.register(Box::new(destination_connected.clone()))?;
        registry.register(Box::new(start_time))?;
        registry.register(Box::new(gauges))?;

        Ok(Self {
            registry,
            table,
            ns,
            source_cluster_time,
            replication_latency,
            apply_batch_duration,
            force_syncs,
            transactions,
            config_reloads,
            source_connected,
            destination_connected,
        })
    }

    /// The registry holding every metric (for an HTTP handler that gathers by itself).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Registers `collector`, replacing one registered earlier under the same names: each
    /// active term of an instance (`ha`) creates its collectors again, and the exposition must
    /// follow the live ones, not the first term's.
    pub fn register_replacing<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        collector: C,
    ) {
        let _ = self.registry.unregister(Box::new(collector.clone()));
        let _ = self.registry.register(Box::new(collector));
    }

    /// The exposition, text format 0.0.4 (serve it with [`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|error| {
                // Only reachable with an empty or nameless family, which gather() prunes.
                tracing::error!(error = %error, "encoding metrics failed");
                String::new()
            })
    }

    /// Runs `f` with the label value of `ns`, registering (and pre-initialising) it if new. The
    /// table lock is held throughout so that a concurrent `remove_namespace` cannot leave a
    /// stale series behind.
    /// Runs `f` with the label of `ns` (registering it if needed); `None`, without running
    /// `f`, for a namespace removed by [`remove_namespace`](Self::remove_namespace).
    fn with_ns<R>(&self, ns: &str, f: impl FnOnce(&str, &mut NamespaceTable) -> R) -> Option<R> {
        let mut table = self.table.lock();
        if table.is_retired(ns) {
            return None;
        }
        let lookup = table.lookup(ns);
        let label = match lookup.slot {
            Slot::Own => ns,
            Slot::Other => OTHER_NAMESPACE,
        };
        if lookup.new {
            self.ns.pre_initialise(label);
            // Gauges whose "nothing yet" is 0 exist from the start; lag, the recovery point and
            // the checkpoint age have no such value and are reported by the worker before it
            // can be ready (issue 12).
            table.update(ns, |g| {
                g.state = Some(WorkerState::Stopped);
                g.queue_events = Some(0.0);
                g.copy_estimate = Some(0.0);
                g.validation_mismatched = Some(0.0);
                g.validation_last_success = Some(0.0);
                // One lane until the worker reports its settings (as in the status).
                g.write_lanes = Some(1.0);
            });
        }
        Some(f(label, &mut table))
    }

    fn update_gauges(&self, ns: &str, f: impl FnOnce(&mut namespaces::NsGauges)) {
        self.with_ns(ns, |_, table| {
            table.update(ns, f);
        });
    }

    /// Makes a namespace known: its counters exist at 0 (events by op, errors by kind, validation
    /// runs by result, ...) and its `worker_state` is `stopped` until the worker reports. Every
    /// other method registers an unknown namespace implicitly; calling this first is what makes
    /// dashboards show 0 instead of "no data". It is also the only way back for a namespace
    /// removed by [`remove_namespace`](Self::remove_namespace).
    pub fn register_namespace(&self, ns: &str) {
        self.table.lock().revive(ns);
        self.with_ns(ns, |_, _| ());
    }

    /// Pre-initialises `conflicts_total` for the namespace's conflict policy (all outcomes);
    /// the supervisor calls it for every namespace, whatever its policy. Not done by
    /// [`register_namespace`](Self::register_namespace): five policies times four outcomes per
    /// namespace would be mostly dead series.
    pub fn register_conflict_policy(&self, ns: &str, policy: ConflictPolicyLabel) {
        self.with_ns(ns, |label, _| {
            for outcome in ConflictOutcome::ALL {
                self.ns
                    .conflicts
                    .with_label_values(&[label, policy.as_str(), outcome.as_str()]);
            }
        });
    }

    /// Deletes every series of a namespace that is no longer synced, and frees its slot under
    /// `metrics.max_namespaces`. For a namespace aggregated under `_other`, its gauges leave
    /// the aggregate; the `_other` counters are removed once no namespace is left in it.
    pub fn remove_namespace(&self, ns: &str) {
        let mut table = self.table.lock();
        match table.remove(ns) {
            Some((Slot::Own, _)) => self.ns.remove(ns),
            Some((Slot::Other, true)) => self.ns.remove(OTHER_NAMESPACE),
            Some((Slot::Other, false)) | None => {}
        }
    }

    /// Change events received from the namespace's stream.
    pub fn events_read(&self, ns: &str, n: u64) {
        self.with_ns(ns, |l, _| {
            self.ns.events_read.with_label_values(&[l]).inc_by(n)
        });
    }

    /// Source events applied to the destination.
    pub fn events_applied(&self, ns: &str, op: ApplyOp, n: u64) {
        self.with_ns(ns, |l, _| {
            self.ns
                .events_applied
                .with_label_values(&[l, op.as_str()])
                .inc_by(n)
        });
    }

    /// Write statements issued to the destination.
    pub fn writes(&self, ns: &str, n: u64) {
        self.with_ns(ns, |l, _| self.ns.writes.with_label_values(&[l]).inc_by(n));
    }

    /// Replayed events whose write was moot (DESIGN §2.3 step 5).
    /// Events a shared stream delivered that were applied already (skipped).
    pub fn already_applied(&self, ns: &str, n: u64) {
        self.with_ns(ns, |l, _| {
            self.ns.already_applied.with_label_values(&[l]).inc_by(n)
        });
    }

    pub fn replay_skipped(&self, ns: &str, n: u64) {
        self.with_ns(ns, |l, _| {
            self.ns.replay_skipped.with_label_values(&[l]).inc_by(n)
        });
    }

    /// One bulk write plus its checkpoint took `duration`.
    pub fn observe_batch(&self, duration: Duration) {
        self.apply_batch_duration.observe(duration.as_secs_f64());
    }

    /// Event wall time → destination acknowledgement, in seconds; negative values (clock skew)
    /// count as 0.
    pub fn observe_replication_latency(&self, secs: f64) {
        self.replication_latency.observe(non_negative(secs));
    }

    /// Same as [`observe_replication_latency`](Self::observe_replication_latency) from the
    /// event's `wallTime`, acknowledged now.
    pub fn observe_replication_latency_since(&self, event_wall_time: SystemTime) {
        let secs = namespaces::age_seconds(SystemTime::now(), event_wall_time);
        self.observe_replication_latency(secs);
    }

    /// Events read but not yet applied.
    pub fn set_queue(&self, ns: &str, n: u64) {
        self.update_gauges(ns, |g| g.queue_events = Some(n as f64));
    }

    /// The lane count the namespace's writes use now (`apply.write_lanes`).
    pub fn set_write_lanes(&self, ns: &str, lanes: usize) {
        self.update_gauges(ns, |g| g.write_lanes = Some(lanes as f64));
    }

    /// Replication lag (DESIGN §2.9); negative values become 0.
    pub fn set_lag(&self, ns: &str, secs: f64) {
        self.update_gauges(ns, |g| g.lag_seconds = Some(non_negative(secs)));
    }

    /// Cluster time of the last applied event (or checkpointed token when idle), Unix seconds.
    pub fn set_applied_through(&self, ns: &str, unix_secs: f64) {
        self.update_gauges(ns, |g| g.applied_through = Some(unix_secs));
    }

    /// The source's latest cluster time, Unix seconds. The series is absent until first set.
    pub fn set_source_cluster_time(&self, unix_secs: f64) {
        self.source_cluster_time
            .with_label_values::<&str>(&[])
            .set(unix_secs);
    }

    /// A checkpoint of the namespace was written at `at`; `checkpoint_age_seconds` is
    /// `now - at`, computed at each scrape.
    pub fn record_checkpoint(&self, ns: &str, at: SystemTime) {
        self.update_gauges(ns, |g| g.checkpoint_at = Some(at));
    }

    /// The namespace worker's current state (one-hot over all states).
    pub fn set_worker_state(&self, ns: &str, state: WorkerState) {
        self.update_gauges(ns, |g| g.state = Some(state));
    }

    /// The namespace worker restarted after a failure.
    pub fn worker_restart(&self, ns: &str) {
        self.with_ns(ns, |l, _| {
            self.ns.worker_restarts.with_label_values(&[l]).inc()
        });
    }

    /// A classified, non-fatal error of the namespace.
    pub fn error(&self, ns: &str, kind: ErrorKindLabel) {
        self.with_ns(ns, |l, _| {
            self.ns.errors.with_label_values(&[l, kind.as_str()]).inc()
        });
    }

    /// Documents copied by an initial copy or re-copy.
    pub fn copied(&self, ns: &str, n: u64) {
        self.with_ns(ns, |l, _| self.ns.copied.with_label_values(&[l]).inc_by(n));
    }

    /// The source's estimated document count when the copy started.
    pub fn set_copy_estimate(&self, ns: &str, n: u64) {
        self.update_gauges(ns, |g| g.copy_estimate = Some(n as f64));
    }

    /// One validation run of the namespace finished.
    pub fn validation_run(&self, ns: &str, result: ValidationResult) {
        self.with_ns(ns, |l, _| {
            self.ns
                .validation_runs
                .with_label_values(&[l, result.as_str()])
                .inc()
        });
    }

    /// Documents found different by the last validation run.
    pub fn set_validation_mismatched(&self, ns: &str, n: u64) {
        self.update_gauges(ns, |g| g.validation_mismatched = Some(n as f64));
    }

    /// Unix time of the last validation run with result `match`.
    pub fn set_validation_last_success(&self, ns: &str, unix_secs: f64) {
        self.update_gauges(ns, |g| g.validation_last_success = Some(unix_secs));
    }

    /// A conflict under `policy` with `outcome`.
    pub fn conflict(&self, ns: &str, policy: ConflictPolicyLabel, outcome: ConflictOutcome) {
        self.with_ns(ns, |l, _| {
            self.ns
                .conflicts
                .with_label_values(&[l, policy.as_str(), outcome.as_str()])
                .inc()
        });
    }

    /// A document went to the dead-letter collection.
    pub fn dead_letter(&self, ns: &str) {
        self.with_ns(ns, |l, _| {
            self.ns.dead_letters.with_label_values(&[l]).inc()
        });
    }

    /// A force-sync was requested.
    /// One namespace's part of a source transaction was applied.
    pub fn transaction_part(&self, atomic: bool) {
        let outcome = if atomic {
            TRANSACTION_OUTCOMES[0]
        } else {
            TRANSACTION_OUTCOMES[1]
        };
        self.transactions.with_label_values(&[outcome]).inc();
    }

    pub fn force_sync(&self, trigger: Trigger) {
        self.force_syncs
            .with_label_values(&[trigger.as_str()])
            .inc();
    }

    /// A config reload finished (addition to DESIGN §6).
    pub fn config_reload(&self, result: ReloadResult) {
        self.config_reloads
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn set_source_connected(&self, connected: bool) {
        self.source_connected.set(f64::from(u8::from(connected)));
    }

    pub fn set_destination_connected(&self, connected: bool) {
        self.destination_connected
            .set(f64::from(u8::from(connected)));
    }
}

#[cfg(test)]
pub(crate) mod tests;

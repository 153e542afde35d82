//! Per-namespace gauges, the `metrics.max_namespaces` cap and the `_other` aggregate.
//!
//! Gauges are not written into `GaugeVec`s when the daemon reports them: the latest values are
//! kept in [`NamespaceTable`] and turned into series by [`NamespaceGauges`], a custom
//! [`Collector`], at scrape time. That gives three things at once:
//! - `checkpoint_age_seconds` is computed at scrape time from the last checkpoint instant;
//! - the `_other` series of namespaces beyond the cap are a meaningful aggregate (max of lags,
//!   sum of queues, oldest recovery point, ...) instead of "whoever wrote last";
//! - removing a namespace removes its gauges simply by forgetting it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, Opts};

use super::labels::WorkerState;
use super::{
    APPLIED_THROUGH_TIMESTAMP_SECONDS, CHECKPOINT_AGE_SECONDS, INITIAL_SYNC_DOCUMENTS_ESTIMATED,
    LABEL_NAMESPACE, LABEL_STATE, LAG_SECONDS, OTHER_NAMESPACE, OVERFLOW_NAMESPACES, QUEUE_EVENTS,
    VALIDATION_LAST_SUCCESS_TIMESTAMP_SECONDS, VALIDATION_MISMATCHED_DOCUMENTS, WORKER_STATE,
    WRITE_LANES,
};

/// Where a namespace's series go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The namespace has its own `namespace` label value.
    Own,
    /// The cap was reached when the namespace was first seen: its series aggregate under
    /// `namespace="_other"`.
    Other,
}

/// Latest gauge values of one namespace. `None` means "never reported": no series.
#[derive(Debug, Clone, Default)]
pub(crate) struct NsGauges {
    pub lag_seconds: Option<f64>,
    pub applied_through: Option<f64>,
    pub queue_events: Option<f64>,
    pub checkpoint_at: Option<SystemTime>,
    pub state: Option<WorkerState>,
    pub copy_estimate: Option<f64>,
    pub validation_mismatched: Option<f64>,
    pub validation_last_success: Option<f64>,
    pub write_lanes: Option<f64>,
}

#[derive(Debug)]
struct Entry {
    slot: Slot,
    gauges: NsGauges,
}

/// Every namespace the metrics know, with its slot and gauge values.
#[derive(Debug)]
pub(crate) struct NamespaceTable {
    max_namespaces: usize,
    own: usize,
    entries: HashMap<String, Entry>,
    /// Namespaces removed because they are no longer synced. Reports about them (a worker
    /// that is still draining says "stopped") are ignored, so their series do not come back,
    /// until they are registered again explicitly.
    retired: HashSet<String>,
}

/// Result of looking a namespace up, possibly registering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lookup {
    pub slot: Slot,
    /// True when this call registered the namespace (series must be pre-initialised).
    pub new: bool,
}

impl NamespaceTable {
    pub fn new(max_namespaces: usize) -> Self {
        Self {
            max_namespaces,
            own: 0,
            entries: HashMap::new(),
            retired: HashSet::new(),
        }
    }

    /// Whether `ns` was removed and not registered again.
    pub fn is_retired(&self, ns: &str) -> bool {
        self.retired.contains(ns)
    }

    /// Makes a removed namespace reportable again.
    pub fn revive(&mut self, ns: &str) {
        self.retired.remove(ns);
    }

    /// Finds or registers `ns`. A new namespace gets its own label while fewer than
    /// `max_namespaces` namespaces have one, else it goes to `_other` (and stays there until it
    /// is removed, so its counters never split across two label values).
    pub fn lookup(&mut self, ns: &str) -> Lookup {
        if let Some(entry) = self.entries.get(ns) {
            return Lookup {
                slot: entry.slot,
                new: false,
            };
        }
        let slot = if self.own < self.max_namespaces && ns != OTHER_NAMESPACE {
            self.own += 1;
            Slot::Own
        } else {
            Slot::Other
        };
        self.entries.insert(
            ns.to_owned(),
            Entry {
                slot,
                gauges: NsGauges::default(),
            },
        );
        Lookup { slot, new: true }
    }

    /// Updates the gauges of `ns` (registering it if needed).
    pub fn update(&mut self, ns: &str, f: impl FnOnce(&mut NsGauges)) -> Lookup {
        let lookup = self.lookup(ns);
        if let Some(entry) = self.entries.get_mut(ns) {
            f(&mut entry.gauges);
        }
        lookup
    }

    /// Forgets `ns`. Returns its slot and whether `_other` is now empty.
    pub fn remove(&mut self, ns: &str) -> Option<(Slot, bool)> {
        self.retired.insert(ns.to_owned());
        let entry = self.entries.remove(ns)?;
        if entry.slot == Slot::Own {
            self.own -= 1;
        }
        let other_empty = !self.entries.values().any(|e| e.slot == Slot::Other);
        Some((entry.slot, other_empty))
    }

    pub fn overflow_count(&self) -> usize {
        self.entries.len() - self.own
    }
}

/// Folds the gauges of the namespaces under `_other` into one set of values.
#[derive(Debug, Default)]
struct OtherAggregate {
    any: bool,
    /// Worst lag.
    lag_seconds: Option<f64>,
    /// Oldest recovery point.
    applied_through: Option<f64>,
    /// Total queued events.
    queue_events: Option<f64>,
    /// Oldest checkpoint.
    checkpoint_at: Option<SystemTime>,
    /// Number of workers in each state.
    states: [f64; 5],
    any_state: bool,
    copy_estimate: Option<f64>,
    validation_mismatched: Option<f64>,
    /// Oldest last success.
    validation_last_success: Option<f64>,
    /// Most lanes.
    write_lanes: Option<f64>,
}

fn fold(acc: Option<f64>, v: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (acc, v) {
        (Some(a), Some(b)) => Some(f(a, b)),
        (a, b) => a.or(b),
    }
}

impl OtherAggregate {
    fn add(&mut self, g: &NsGauges) {
        self.any = true;
        self.lag_seconds = fold(self.lag_seconds, g.lag_seconds, f64::max);
        self.applied_through = fold(self.applied_through, g.applied_through, f64::min);
        self.queue_events = fold(self.queue_events, g.queue_events, |a, b| a + b);
        self.checkpoint_at = match (self.checkpoint_at, g.checkpoint_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(state) = g.state {
            self.any_state = true;
            self.states[state_index(state)] += 1.0;
        }
        self.copy_estimate = fold(self.copy_estimate, g.copy_estimate, |a, b| a + b);
        self.validation_mismatched = fold(
            self.validation_mismatched,
            g.validation_mismatched,
            |a, b| a + b,
        );
        self.validation_last_success = fold(
            self.validation_last_success,
            g.validation_last_success,
            f64::min,
        );
        self.write_lanes = fold(self.write_lanes, g.write_lanes, f64::max);
    }
}

fn state_index(state: WorkerState) -> usize {
    WorkerState::ALL
        .iter()
        .position(|s| *s == state)
        .unwrap_or_default()
}

/// Seconds from `at` to `now`; 0 when `at` is in the future (clock step).
pub(crate) fn age_seconds(now: SystemTime, at: SystemTime) -> f64 {
    now.duration_since(at)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The custom collector exporting every per-namespace gauge.
pub(crate) struct NamespaceGauges {
    table: Arc<Mutex<NamespaceTable>>,
    lag_seconds: GaugeVec,
    applied_through: GaugeVec,
    queue_events: GaugeVec,
    checkpoint_age: GaugeVec,
    worker_state: GaugeVec,
    copy_estimate: GaugeVec,
    validation_mismatched: GaugeVec,
    validation_last_success: GaugeVec,
    write_lanes: GaugeVec,
    overflow_namespaces: GaugeVec,
}

fn ns_gauge(name: &str, help: &str) -> prometheus::Result<GaugeVec> {
    GaugeVec::new(Opts::new(name, help), &[LABEL_NAMESPACE])
}

impl NamespaceGauges {
    pub fn new(table: Arc<Mutex<NamespaceTable>>) -> prometheus::Result<Self> {
        Ok(Self {
            table,
            lag_seconds: ns_gauge(
                LAG_SECONDS,
                "Replication lag of the namespace in seconds: source cluster time minus the cluster time applied through; 0 when caught up, grows while the source is unreachable. Max over namespaces under namespace=\"_other\".",
            )?,
            applied_through: ns_gauge(
                APPLIED_THROUGH_TIMESTAMP_SECONDS,
                "Source cluster time (Unix seconds) of the last event applied to the destination, or of the checkpointed postBatchResumeToken when idle. Oldest under namespace=\"_other\".",
            )?,
            queue_events: ns_gauge(
                QUEUE_EVENTS,
                "Change events read from the source but not yet applied to the destination.",
            )?,
            checkpoint_age: ns_gauge(
                CHECKPOINT_AGE_SECONDS,
                "Seconds since the namespace's last checkpoint write, computed at scrape time. Oldest under namespace=\"_other\".",
            )?,
            worker_state: GaugeVec::new(
                Opts::new(
                    WORKER_STATE,
                    "1 for the namespace worker's current state, 0 for the others (under namespace=\"_other\": the number of workers in each state).",
                ),
                &[LABEL_NAMESPACE, LABEL_STATE],
            )?,
            copy_estimate: ns_gauge(
                INITIAL_SYNC_DOCUMENTS_ESTIMATED,
                "Source's estimated document count of the namespace when its initial copy started.",
            )?,
            validation_mismatched: ns_gauge(
                VALIDATION_MISMATCHED_DOCUMENTS,
                "Documents found different (drift) by the namespace's last validation run.",
            )?,
            validation_last_success: ns_gauge(
                VALIDATION_LAST_SUCCESS_TIMESTAMP_SECONDS,
                "Unix time of the namespace's last validation run whose result was match. Oldest under namespace=\"_other\".",
            )?,
            write_lanes: ns_gauge(
                WRITE_LANES,
                "Concurrent bulk write commands the namespace's batches are cut into (apply.write_lanes: the fixed count, or the count auto keeps now). Most under namespace=\"_other\".",
            )?,
            overflow_namespaces: GaugeVec::new(
                Opts::new(
                    OVERFLOW_NAMESPACES,
                    "Namespaces whose series are aggregated under namespace=\"_other\" because metrics.max_namespaces was reached.",
                ),
                &[],
            )?,
        })
    }

    fn all(&self) -> [&GaugeVec; 10] {
        [
            &self.lag_seconds,
            &self.applied_through,
            &self.queue_events,
            &self.checkpoint_age,
            &self.worker_state,
            &self.copy_estimate,
            &self.validation_mismatched,
            &self.validation_last_success,
            &self.write_lanes,
            &self.overflow_namespaces,
        ]
    }

    fn write(&self, label: &str, g: &NsGauges, now: SystemTime) {
        let set = |vec: &GaugeVec, v: Option<f64>| {
            if let Some(v) = v {
                vec.with_label_values(&[label]).set(v);
            }
        };
        set(&self.lag_seconds, g.lag_seconds);
        set(&self.applied_through, g.applied_through);
        set(&self.queue_events, g.queue_events);
        set(
            &self.checkpoint_age,
            g.checkpoint_at.map(|at| age_seconds(now, at)),
        );
        if let Some(current) = g.state {
            for state in WorkerState::ALL {
                let v = if *state == current { 1.0 } else { 0.0 };
                self.worker_state
                    .with_label_values(&[label, state.as_str()])
                    .set(v);
            }
        }
        set(&self.copy_estimate, g.copy_estimate);
        set(&self.validation_mismatched, g.validation_mismatched);
        set(&self.validation_last_success, g.validation_last_success);
        set(&self.write_lanes, g.write_lanes);
    }

    fn write_other(&self, agg: &OtherAggregate, now: SystemTime) {
        let label = OTHER_NAMESPACE;
        let g = NsGauges {
            lag_seconds: agg.lag_seconds,
            applied_through: agg.applied_through,
            queue_events: agg.queue_events,
            checkpoint_at: agg.checkpoint_at,
            state: None,
            copy_estimate: agg.copy_estimate,
            validation_mismatched: agg.validation_mismatched,
            validation_last_success: agg.validation_last_success,
            write_lanes: agg.write_lanes,
        };
        self.write(label, &g, now);
        if agg.any_state {
            for (state, count) in WorkerState::ALL.iter().zip(agg.states) {
                self.worker_state
                    .with_label_values(&[label, state.as_str()])
                    .set(count);
            }
        }
    }
}

impl Collector for NamespaceGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.all().into_iter().flat_map(|v| v.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let table = self.table.lock();
        let now = SystemTime::now();
        for vec in self.all() {
            vec.reset();
        }
        let mut other = OtherAggregate::default();
        for (ns, entry) in &table.entries {
            match entry.slot {
                Slot::Own => self.write(ns, &entry.gauges, now),
                Slot::Other => other.add(&entry.gauges),
            }
        }
        if other.any {
            self.write_other(&other, now);
        }
        self.overflow_namespaces
            .with_label_values::<&str>(&[])
            .set(table.overflow_count() as f64);
        self.all().into_iter().flat_map(|v| v.collect()).collect()
    }
}

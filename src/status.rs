//! What every part of the daemon knows about the pipeline's health, in one place: workers
//! write their state here; the HTTP API, `/readyz`, systemd `STATUS=`, the lag sampler and
//! the demo display read it.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use bson::Timestamp;
use parking_lot::RwLock;
use serde_json::{json, Value};

use crate::{metrics::WorkerState, model::event::ts_key};

/// Open pooled connections to one cluster, counted from the driver's pool events
/// (`ops::connections`).
#[derive(Debug, Clone, Default)]
pub struct OpenConnections(Arc<AtomicI64>);

impl OpenConnections {
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts `delta` more (or fewer) open connections; returns the new count.
    pub fn add(&self, delta: i64) -> i64 {
        self.0.fetch_add(delta, Ordering::Relaxed) + delta
    }
}

/// The two sides' counts, shared by the clients' event handlers, the status and the metrics.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounts {
    pub source: OpenConnections,
    pub destination: OpenConnections,
}

/// The last error a namespace hit (no document values, credentials redacted).
#[derive(Debug, Clone)]
pub struct LastError {
    pub kind: String,
    pub message: String,
    pub at: SystemTime,
}

/// The last validation of a namespace.
#[derive(Debug, Clone)]
pub struct LastValidation {
    pub result: String,
    pub at: SystemTime,
    pub ranges_checked: u64,
    pub mismatched_documents: u64,
    pub repaired: u64,
}

#[derive(Debug, Clone)]
pub struct NamespaceStatus {
    pub target: String,
    pub state: WorkerState,
    pub parked_reason: Option<String>,
    pub applied_through: Option<Timestamp>,
    /// `None` until both the applied position and the source's cluster time are known.
    pub lag_seconds: Option<f64>,
    pub last_checkpoint: Option<SystemTime>,
    pub last_error: Option<LastError>,
    pub copied: u64,
    pub copy_estimate: u64,
    /// Set when the last copy was estimated to take longer than the source's oplog window
    /// (DESIGN §2.3): `(estimated copy seconds, oplog window seconds)`.
    pub copy_exceeds_oplog_window: Option<(u64, u64)>,
    /// Set while the copy waits for one of `copy.concurrent_collections` slots.
    pub copy_waiting_for_slot: bool,
    pub events_applied: u64,
    pub restarts: u64,
    pub last_validation: Option<LastValidation>,
    /// The change stream the worker reads (DESIGN §2.11): `collection`, a shared stream's name
    /// (`deployment`, `database:<db>`), or `joining <name>` while its own stream catches up.
    pub change_stream: Option<String>,
    /// Concurrent commands the worker's last batch could cut its writes into
    /// (`apply.write_lanes`: the fixed count, or the count `auto` keeps now).
    pub write_lanes: u64,
}

impl NamespaceStatus {
    fn new(target: String) -> Self {
        NamespaceStatus {
            target,
            state: WorkerState::Stopped,
            parked_reason: None,
            applied_through: None,
            lag_seconds: None,
            last_checkpoint: None,
            last_error: None,
            copied: 0,
            copy_estimate: 0,
            copy_exceeds_oplog_window: None,
            copy_waiting_for_slot: false,
            events_applied: 0,
            restarts: 0,
            last_validation: None,
            change_stream: None,
            write_lanes: 1,
        }
    }
}

/// Shared status of the whole pipeline.
pub struct StatusRegistry {
    started: Instant,
    namespaces: RwLock<BTreeMap<String, NamespaceStatus>>,
    source_cluster_time: AtomicU64,
    /// Unix milliseconds of the last successful contact with the source.
    source_contact_ms: AtomicU64,
    source_connected: AtomicBool,
    destination_connected: AtomicBool,
    /// Set once the supervisor has listed the source's namespaces (until then, zero namespaces
    /// means "not known yet", not "nothing to do").
    discovered: AtomicBool,
    /// Set while the source or destination identity does not match (DESIGN §2.10).
    safety_alarm: RwLock<Option<String>>,
    /// The instance's role under `ha.enabled` (DESIGN §2.12); `None` without HA.
    ha: RwLock<Option<HaStatus>>,
    /// Hosts of the source and destination, credentials removed.
    pub source_hosts: RwLock<String>,
    pub destination_hosts: RwLock<String>,
    /// Pooled connections open to each cluster.
    pub connections: ConnectionCounts,
    /// The shared change streams running now, by watermark name (DESIGN §2.11).
    shared_streams: RwLock<BTreeMap<String, Arc<SharedStreamCounters>>>,
}

/// What one shared change stream has read and routed, shown in `/api/v1/status`.
#[derive(Debug, Default)]
pub struct SharedStreamCounters {
    /// Events the source returned on the stream.
    pub events_read: AtomicU64,
    /// Events sent to a member worker.
    pub events_routed: AtomicU64,
    /// Data events of another partition's namespaces that reached the stream: namespaces its
    /// `$match` did not exclude yet (created since it was opened).
    pub foreign_events: AtomicU64,
    /// Namespaces of other partitions its `$match` excludes (`ha.partitions` > 1).
    pub excluded_namespaces: AtomicU64,
    /// Namespaces that read it now.
    pub members: AtomicU64,
}

impl Default for StatusRegistry {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            namespaces: RwLock::new(BTreeMap::new()),
            source_cluster_time: AtomicU64::new(0),
            source_contact_ms: AtomicU64::new(0),
            source_connected: AtomicBool::new(false),
            destination_connected: AtomicBool::new(false),
            discovered: AtomicBool::new(false),
            safety_alarm: RwLock::new(None),
            ha: RwLock::new(None),
            source_hosts: RwLock::new(String::new()),
            destination_hosts: RwLock::new(String::new()),
            connections: Default::default(),
            shared_streams: RwLock::new(BTreeMap::new()),
        }
    }
}

/// This instance's role and lease (DESIGN §2.12).
#[derive(Debug, Clone)]
pub struct HaStatus {
    /// `active` or `standby`.
    pub role: &'static str,
    pub instance: String,
    /// The epoch of the lease held (active only).
    pub epoch: Option<i64>,
    /// The active instance and its HTTP address, as the lease says (standby only).
    pub active_instance: Option<String>,
    pub active_address: Option<String>,
    /// The last time the lease document was read or written successfully.
    pub lease_contact: Option<Instant>,
    /// Under `ha.partitions` > 1: who holds which partition.
    pub partitions: Option<PartitionsView>,
}

/// The partitions of a sync as this instance last saw them (`ha.partitions` > 1).
#[derive(Debug, Clone)]
pub struct PartitionsView {
    pub partitioner: crate::config::partition::Partitioner,
    /// The partitions this instance runs, with their lease epochs.
    pub held: std::collections::BTreeMap<u32, i64>,
    /// Live holders of every partition (this instance included).
    pub owners: std::collections::BTreeMap<u32, PartitionOwner>,
    pub live_instances: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PartitionOwner {
    pub instance: String,
    pub address: Option<String>,
    pub epoch: i64,
}

impl PartitionsView {
    /// Where `ns` is synced, when not here: its partition and that partition's live holder.
    pub fn elsewhere(&self, ns: &str) -> Option<(u32, Option<&PartitionOwner>)> {
        let partition = self.partitioner.partition_of_ns(ns);
        (!self.held.contains_key(&partition)).then(|| (partition, self.owners.get(&partition)))
    }
}

/// A standby is not ready to take over when it has not reached the lease for this long.
pub const STANDBY_LEASE_CONTACT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    let d = bson::DateTime::from_system_time(t);
    d.try_to_rfc3339_string().unwrap_or_default()
}

fn ts_json(ts: Option<Timestamp>) -> Value {
    match ts {
        Some(t) => json!({"t": t.time, "i": t.increment}),
        None => Value::Null,
    }
}

impl StatusRegistry {
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn register(&self, ns: &str, target: &str) {
        self.namespaces
            .write()
            .entry(ns.to_string())
            .or_insert_with(|| NamespaceStatus::new(target.to_string()));
    }

    pub fn remove(&self, ns: &str) {
        self.namespaces.write().remove(ns);
    }

    pub fn update(&self, ns: &str, f: impl FnOnce(&mut NamespaceStatus)) {
        if let Some(s) = self.namespaces.write().get_mut(ns) {
            f(s);
        }
    }

    pub fn get(&self, ns: &str) -> Option<NamespaceStatus> {
        self.namespaces.read().get(ns).cloned()
    }

    pub fn snapshot(&self) -> BTreeMap<String, NamespaceStatus> {
        self.namespaces.read().clone()
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces.read().keys().cloned().collect()
    }

    pub fn set_source_cluster_time(&self, ts: Timestamp) {
        let v = ((ts.time as u64) << 32) | ts.increment as u64;
        self.source_cluster_time.fetch_max(v, Ordering::Relaxed);
        self.source_contact_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
    }

    pub fn source_cluster_time(&self) -> Option<Timestamp> {
        let v = self.source_cluster_time.load(Ordering::Relaxed);
        (v != 0).then_some(Timestamp {
            time: (v >> 32) as u32,
            increment: v as u32,
        })
    }

    /// Seconds since the source was last reached (0 if never).
    pub fn seconds_since_source_contact(&self) -> f64 {
        let last = self.source_contact_ms.load(Ordering::Relaxed);
        if last == 0 {
            return 0.0;
        }
        (unix_ms(SystemTime::now()).saturating_sub(last)) as f64 / 1000.0
    }

    /// Raises (or clears) the identity alarm shown by `/readyz` and the status.
    pub fn set_safety_alarm(&self, alarm: Option<String>) {
        *self.safety_alarm.write() = alarm;
    }

    pub fn set_ha(&self, ha: HaStatus) {
        *self.ha.write() = Some(ha);
    }

    /// The lease was reached just now (a renewal).
    pub fn touch_ha(&self) {
        if let Some(ha) = self.ha.write().as_mut() {
            ha.lease_contact = Some(Instant::now());
        }
    }

    pub fn ha(&self) -> Option<HaStatus> {
        self.ha.read().clone()
    }

    /// True while this instance is a standby (HA on, lease held by another or nobody).
    pub fn is_standby(&self) -> bool {
        self.ha.read().as_ref().is_some_and(|h| h.role == "standby")
    }

    /// Forgets the namespaces `drop` says (a partition handed over or lost).
    pub fn clear_namespaces_where(&self, drop: impl Fn(&str) -> bool) {
        self.namespaces.write().retain(|ns, _| !drop(ns));
    }

    /// Forgets every namespace (a standby runs none).
    pub fn clear_namespaces(&self) {
        self.namespaces.write().clear();
        self.discovered.store(false, Ordering::Relaxed);
    }

    pub fn safety_alarm(&self) -> Option<String> {
        self.safety_alarm.read().clone()
    }

    pub fn set_source_connected(&self, v: bool) {
        self.source_connected.store(v, Ordering::Relaxed);
    }

    pub fn set_destination_connected(&self, v: bool) {
        self.destination_connected.store(v, Ordering::Relaxed);
    }

    /// The supervisor listed the source's namespaces at least once.
    pub fn set_discovered(&self) {
        self.discovered.store(true, Ordering::Relaxed);
    }

    pub fn discovered(&self) -> bool {
        self.discovered.load(Ordering::Relaxed)
    }

    pub fn source_connected(&self) -> bool {
        self.source_connected.load(Ordering::Relaxed)
    }

    pub fn destination_connected(&self) -> bool {
        self.destination_connected.load(Ordering::Relaxed)
    }

    /// DESIGN §2.9: `max(0, source_cluster_time − applied_through)` while the source is
    /// reachable; while it has not been reached for 10 s, lag also grows with wall time.
    /// `None` while either end is unknown: an unknown lag is never reported as 0.
    pub fn compute_lag(&self, applied_through: Option<Timestamp>) -> Option<f64> {
        let (Some(src), Some(applied)) = (self.source_cluster_time(), applied_through) else {
            return None;
        };
        let mut lag = if ts_key(src) > ts_key(applied) {
            (src.time as f64 - applied.time as f64).max(0.0)
        } else {
            0.0
        };
        let silent = self.seconds_since_source_contact();
        if silent > 10.0 {
            lag += silent;
        }
        Some(lag)
    }

    /// A namespace checkpointed at `at` (None: no checkpoint was written, its applied
    /// position moved) through `applied_through`: its metrics first, so once the status has a
    /// lag (what /readyz waits for) every gauge a dashboard reads already has a value.
    pub fn record_checkpoint(
        &self,
        metrics: &crate::metrics::Metrics,
        label: &str,
        at: Option<SystemTime>,
        applied_through: Option<Timestamp>,
    ) {
        if let Some(at) = at {
            metrics.record_checkpoint(label, at);
        }
        let lag = self.compute_lag(applied_through);
        if let Some(ts) = applied_through {
            metrics.set_applied_through(label, ts.time as f64);
        }
        if let Some(lag) = lag {
            metrics.set_lag(label, lag);
        }
        self.update(label, |s| {
            if at.is_some() {
                s.last_checkpoint = at;
            }
            if applied_through.is_some() {
                s.applied_through = applied_through;
                if lag.is_some() {
                    s.lag_seconds = lag;
                }
            }
        });
    }

    /// Reasons the pipeline is not ready (`/readyz`): any namespace not streaming, or lagging
    /// more than `max_lag_seconds`.
    pub fn not_ready_reasons(&self, max_lag_seconds: f64) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(alarm) = self.safety_alarm() {
            reasons.push(alarm);
        }
        if !self.source_connected() {
            reasons.push("source unreachable".to_string());
        }
        if !self.destination_connected() {
            reasons.push("destination unreachable".to_string());
        }
        // A standby is ready when it could take over: both clusters and the lease reachable.
        if let Some(ha) = self.ha().filter(|h| h.role == "standby") {
            if ha
                .lease_contact
                .is_none_or(|at| at.elapsed() > STANDBY_LEASE_CONTACT_MAX)
            {
                reasons.push("standby: the lease has not been read recently".to_string());
            }
            return reasons;
        }
        if !self.discovered() {
            reasons.push("source namespaces not listed yet".to_string());
        }
        for (ns, s) in self.namespaces.read().iter() {
            match (s.state, s.lag_seconds) {
                (WorkerState::Streaming, None) => reasons.push(format!("{ns}: lag not known yet")),
                (WorkerState::Streaming, Some(lag)) if lag > max_lag_seconds => {
                    reasons.push(format!("{ns}: lag {lag:.0}s exceeds {max_lag_seconds:.0}s"))
                }
                (WorkerState::Streaming, Some(_)) => {}
                (WorkerState::Parked, _) => reasons.push(format!(
                    "{ns}: parked ({})",
                    s.parked_reason.as_deref().unwrap_or("unknown")
                )),
                (other, _) => reasons.push(format!("{ns}: {}", other.as_str())),
            }
        }
        reasons
    }

    /// A one-line summary for systemd `STATUS=` and logs.
    pub fn summary(&self) -> String {
        let map = self.namespaces.read();
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut max_lag = 0.0f64;
        for s in map.values() {
            *counts.entry(s.state.as_str()).or_default() += 1;
            max_lag = max_lag.max(s.lag_seconds.unwrap_or(0.0));
        }
        let states: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        let role = match self.ha() {
            Some(HaStatus {
                partitions: Some(p),
                ..
            }) => {
                if p.held.is_empty() {
                    return format!(
                        "standby (no partition of {}; {} live instances)",
                        p.partitioner.count(),
                        p.live_instances
                    );
                }
                let held: Vec<String> = p.held.keys().map(u32::to_string).collect();
                format!(
                    "active (partitions {} of {}); ",
                    held.join(","),
                    p.partitioner.count()
                )
            }
            Some(h) if h.role == "standby" => {
                return format!(
                    "standby (active: {})",
                    h.active_instance.as_deref().unwrap_or("none")
                )
            }
            Some(h) => format!("active (epoch {}); ", h.epoch.unwrap_or(0)),
            None => String::new(),
        };
        format!(
            "{role}{} namespaces ({}); max lag {:.0}s",
            map.len(),
            if states.is_empty() {
                "none".to_string()
            } else {
                states.join(", ")
            },
            max_lag
        )
    }

    /// The counters of shared stream `name`, registered while it runs.
    pub fn shared_stream(&self, name: &str) -> Arc<SharedStreamCounters> {
        Arc::clone(
            self.shared_streams
                .write()
                .entry(name.to_string())
                .or_default(),
        )
    }

    /// Shared stream `name` stopped.
    pub fn forget_shared_stream(&self, name: &str) {
        self.shared_streams.write().remove(name);
    }

    /// `/api/v1/status` body.
    pub fn to_json(&self, version: &str) -> Value {
        let namespaces: serde_json::Map<String, Value> = self
            .namespaces
            .read()
            .iter()
            .map(|(ns, s)| {
                (
                    ns.clone(),
                    json!({
                        "target": s.target,
                        "state": s.state.as_str(),
                        "parked_reason": s.parked_reason,
                        "lag_seconds": s.lag_seconds,
                        "applied_through": ts_json(s.applied_through),
                        "last_checkpoint": s.last_checkpoint.map(rfc3339),
                        "last_error": s.last_error.as_ref().map(|e| json!({"kind": e.kind, "message": e.message, "at": rfc3339(e.at)})),
                        "copy": {"copied": s.copied, "estimated": s.copy_estimate,
                            "waiting_for_slot": s.copy_waiting_for_slot,
                            "oplog_window_warning": s.copy_exceeds_oplog_window.map(|(copy, window)| json!({"estimated_copy_seconds": copy, "oplog_window_seconds": window}))},
                        "events_applied": s.events_applied,
                        "restarts": s.restarts,
                        "change_stream": s.change_stream,
                        "write_lanes": s.write_lanes,
                        "last_validation": s.last_validation.as_ref().map(|v| json!({
                            "result": v.result, "at": rfc3339(v.at), "ranges_checked": v.ranges_checked,
                            "mismatched_documents": v.mismatched_documents, "repaired": v.repaired,
                        })),
                    }),
                )
            })
            .collect();
        json!({
            "version": version,
            "uptime_seconds": self.uptime_seconds(),
            "source": {"connected": self.source_connected(), "hosts": *self.source_hosts.read(), "cluster_time": ts_json(self.source_cluster_time()), "connections": self.connections.source.get()},
            "destination": {"connected": self.destination_connected(), "hosts": *self.destination_hosts.read(), "connections": self.connections.destination.get()},
            "summary": self.summary(),
            "safety_alarm": self.safety_alarm(),
            "ha": self.ha().map(|h| json!({
                "role": h.role, "instance": h.instance, "epoch": h.epoch,
                "active_instance": h.active_instance, "active_address": h.active_address,
                "lease_contact_seconds_ago": h.lease_contact.map(|at| at.elapsed().as_secs_f64()),
                "partitions": h.partitions.as_ref().map(|p| json!({
                    "count": p.partitioner.count(),
                    "held": p.held.iter().map(|(p, e)| json!({"partition": p, "epoch": e})).collect::<Vec<_>>(),
                    "owners": p.owners.iter().map(|(p, o)| json!({"partition": p, "instance": o.instance, "address": o.address, "epoch": o.epoch})).collect::<Vec<_>>(),
                    "live_instances": p.live_instances,
                })),
            })),
            "shared_streams": self.shared_streams.read().iter().map(|(name, c)| {
                let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
                (name.clone(), json!({
                    "members": get(&c.members),
                    "events_read": get(&c.events_read),
                    "events_routed": get(&c.events_routed),
                    "foreign_events": get(&c.foreign_events),
                    "excluded_namespaces": get(&c.excluded_namespaces),
                }))
            }).collect::<serde_json::Map<String, Value>>(),
            "namespaces": namespaces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_zero_when_caught_up_and_positive_behind() {
        let s = StatusRegistry::default();
        s.set_source_cluster_time(Timestamp {
            time: 100,
            increment: 5,
        });
        assert_eq!(
            s.compute_lag(Some(Timestamp {
                time: 100,
                increment: 5
            })),
            Some(0.0)
        );
        assert_eq!(
            s.compute_lag(Some(Timestamp {
                time: 100,
                increment: 9
            })),
            Some(0.0)
        );
        assert_eq!(
            s.compute_lag(Some(Timestamp {
                time: 90,
                increment: 1
            })),
            Some(10.0)
        );
    }

    #[test]
    fn readiness_reports_each_namespace_that_is_not_streaming() {
        let s = StatusRegistry::default();
        s.set_source_connected(true);
        s.set_destination_connected(true);
        assert_eq!(s.not_ready_reasons(30.0).len(), 1, "nothing listed yet");
        s.set_discovered();
        assert!(s.not_ready_reasons(30.0).is_empty());
        s.register("d.a", "d.a");
        s.register("d.b", "d.b");
        s.update("d.a", |n| {
            n.state = WorkerState::Streaming;
            n.lag_seconds = Some(0.0);
        });
        s.update("d.b", |n| {
            n.state = WorkerState::Parked;
            n.parked_reason = Some("max_restarts".into());
        });
        let reasons = s.not_ready_reasons(30.0);
        assert_eq!(reasons, vec!["d.b: parked (max_restarts)".to_string()]);
        s.update("d.a", |n| n.lag_seconds = Some(45.0));
        assert_eq!(s.not_ready_reasons(30.0).len(), 2);
        assert!(s.summary().contains("1 parked"));
    }

    #[test]
    fn lag_is_unknown_until_both_ends_are_known_and_then_readiness_needs_it() {
        let s = StatusRegistry::default();
        s.set_source_connected(true);
        s.set_destination_connected(true);
        s.set_discovered();
        s.register("d.a", "d.a");
        s.update("d.a", |n| n.state = WorkerState::Streaming);
        // Neither the source's cluster time nor the applied position known: no lag, not 0.
        assert_eq!(s.compute_lag(None), None);
        assert_eq!(
            s.compute_lag(Some(Timestamp {
                time: 5,
                increment: 1
            })),
            None
        );
        assert!(s.to_json("v")["namespaces"]["d.a"]["lag_seconds"].is_null());
        assert_eq!(
            s.not_ready_reasons(30.0),
            vec!["d.a: lag not known yet".to_string()]
        );
        s.set_source_cluster_time(Timestamp {
            time: 10,
            increment: 1,
        });
        let lag = s.compute_lag(Some(Timestamp {
            time: 5,
            increment: 1,
        }));
        assert_eq!(lag, Some(5.0));
        s.update("d.a", |n| n.lag_seconds = lag);
        assert_eq!(s.to_json("v")["namespaces"]["d.a"]["lag_seconds"], 5.0);
        assert!(s.not_ready_reasons(30.0).is_empty());
    }
}

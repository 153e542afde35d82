//! Several instances, one copy (DESIGN §2.12): a lease in the destination decides which
//! instance writes; the others are standbys that take over when the lease expires or is
//! released.
//!
//! - [`lease`]: the lease document and its conditional writes, timed by the destination's clock.
//! - [`crate::fence`]: the process's write deadline on the monotonic clock, checked before every write.
//! - [`Coordinator`]: acquiring (standby), renewing (active) and releasing (SIGTERM).
//!
//! The arithmetic, with `L` = `ha.lease_seconds` and `W` = the server-side bound of one write
//! (`maxTimeMS`, three quarters of `destination.socket_timeout_ms`, at most `L/4`): an active
//! renews every `L/3` and may write until `sent + L - W`, where `sent` is when its last
//! successful renewal was sent; the lease expires on the server no earlier than `sent + L`; a
//! new owner that took an expired (not released) lease waits `W` more before it writes. So a
//! write the old owner started before its deadline is dead before the new owner's first write.

pub mod lease;
pub mod members;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, status::StatusRegistry};
pub use lease::{Acquired, Holder, LeaseStore};

pub use crate::metrics::{HA_PARTITIONS, LEASE_EPOCH, LEASE_LOSSES_TOTAL, PARTITIONS_HELD, ROLE};

/// An instance's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

/// A unique name for this process: host, pid and a random part (a restarted process on the
/// same host is another instance: it must not inherit a lease it cannot prove it holds).
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let random = bson::oid::ObjectId::new().to_hex();
    format!(
        "{host}:{}:{}",
        std::process::id(),
        &random[random.len() - 8..]
    )
}

/// The HTTP address other instances and operators can reach this one at: the listen address,
/// with the host name when it listens on every interface.
pub fn advertised_address(listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        format!("{host}:{}", listen.port())
    } else {
        listen.to_string()
    }
}

/// Why an active term ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermEnd {
    /// Another instance holds the lease now.
    TakenOver,
    /// No renewal succeeded before the write deadline.
    NotRenewed(String),
    /// The term was stopped by its owner (shutdown, a fatal error).
    Stopped,
}

/// Role metrics (the module owns its label values).
#[derive(Clone)]
struct RoleMetrics {
    role: IntGaugeVec,
    epoch: IntGauge,
    losses: IntCounter,
    held: IntGauge,
    partitions: IntGauge,
}

impl RoleMetrics {
    fn new(metrics: &Metrics) -> RoleMetrics {
        let role = IntGaugeVec::new(
            Opts::new(
                ROLE,
                "1 for this instance's role under ha.enabled (active, standby).",
            ),
            &["role"],
        )
        .expect("valid metric");
        let epoch = IntGauge::new(
            LEASE_EPOCH,
            "Epoch of the lease this instance holds; 0 while it is a standby.",
        )
        .expect("valid metric");
        let losses = IntCounter::new(
            LEASE_LOSSES_TOTAL,
            "Active terms ended because the lease was not renewed in time or was taken over.",
        )
        .expect("valid metric");
        let held = IntGauge::new(
            PARTITIONS_HELD,
            "Partitions (leases) this instance holds and syncs under ha.enabled.",
        )
        .expect("valid metric");
        let _ = metrics.registry().register(Box::new(role.clone()));
        let _ = metrics.registry().register(Box::new(epoch.clone()));
        let _ = metrics.registry().register(Box::new(losses.clone()));
        let partitions = IntGauge::new(
            HA_PARTITIONS,
            "ha.partitions: the leases the instances of this pipeline share (1 for active/standby).",
        )
        .expect("valid metric");
        partitions.set(1);
        let _ = metrics.registry().register(Box::new(held.clone()));
        let _ = metrics.registry().register(Box::new(partitions.clone()));
        RoleMetrics {
            role,
            epoch,
            losses,
            held,
            partitions,
        }
    }

    fn set(&self, role: Role, epoch: i64) {
        self.held.set(i64::from(role == Role::Active));
        for r in [Role::Active, Role::Standby] {
            self.role
                .with_label_values(&[r.as_str()])
                .set(i64::from(r == role));
        }
        self.epoch.set(epoch);
    }
}

/// Acquires, renews and releases this instance's lease, and keeps its role visible.
#[derive(Clone)]
pub struct Coordinator {
    store: LeaseStore,
    /// `W`: the server-side bound of one destination write.
    write_bound: Duration,
    status: Arc<StatusRegistry>,
    metrics: RoleMetrics,
    /// One of several partitions' leases: the instance's role is shown by the partition
    /// manager, not by this coordinator.
    partitioned: bool,
}

impl Coordinator {
    pub fn new(
        store: LeaseStore,
        write_bound: Duration,
        status: Arc<StatusRegistry>,
        metrics: &Metrics,
    ) -> Coordinator {
        let coordinator = Coordinator {
            store,
            write_bound,
            status,
            metrics: RoleMetrics::new(metrics),
            partitioned: false,
        };
        crate::fence::PROCESS.arm();
        coordinator.show(Role::Standby, None, None);
        coordinator
    }

    /// The coordinator of another partition's lease, for the same instance.
    pub fn for_partition(&self, partition: u32) -> Coordinator {
        Coordinator {
            store: self.store.for_partition(partition),
            partitioned: true,
            ..self.clone()
        }
    }

    pub fn instance(&self) -> &str {
        self.store.owner()
    }

    pub fn partition(&self) -> u32 {
        self.store.partition()
    }

    pub fn store(&self) -> &LeaseStore {
        &self.store
    }

    /// `W`: how long a new owner of an expired lease waits before writing.
    pub fn write_bound(&self) -> Duration {
        self.write_bound
    }

    /// Exports `ha.partitions` (what the instances together may hold).
    pub fn set_partition_count(&self, partitions: u32) {
        self.metrics.partitions.set(i64::from(partitions));
    }

    /// Shows the role of a partitioned instance: active while it holds any partition.
    pub fn show_partitions(
        &self,
        view: crate::status::PartitionsView,
        lease_contact: Option<Instant>,
    ) {
        let role = if view.held.is_empty() {
            Role::Standby
        } else {
            Role::Active
        };
        let epoch = view.held.values().copied().max();
        self.metrics.set(role, epoch.unwrap_or(0));
        self.metrics.held.set(view.held.len() as i64);
        self.status.set_ha(crate::status::HaStatus {
            role: role.as_str(),
            instance: self.store.owner().to_owned(),
            epoch,
            active_instance: None,
            active_address: None,
            lease_contact,
            partitions: Some(view),
        });
    }

    /// Takes this partition's lease when it is free, with an epoch above `epoch_floor`; the
    /// caller waits [`write_bound`](Self::write_bound) before writing when it was taken over.
    pub async fn acquire(
        &self,
        epoch_floor: i64,
    ) -> Result<Option<Acquired>, crate::error::SyncError> {
        let acquired = self.store.try_acquire(epoch_floor).await?;
        if let Some(acquired) = &acquired {
            crate::fence::PROCESS.allow_until(self.partition(), self.write_deadline(acquired.sent));
            tracing::info!(partition = self.partition(), epoch = acquired.epoch, took_over_from = ?acquired.took_over_from, "partition lease acquired");
        }
        Ok(acquired)
    }

    fn renew_every(&self) -> Duration {
        self.store.lease() / 3
    }

    /// How often a standby looks at the lease: a released lease is taken within this.
    pub fn poll_every(&self) -> Duration {
        self.renew_every().min(Duration::from_secs(1))
    }

    /// The monotonic deadline of writes after a renewal sent at `sent`.
    fn write_deadline(&self, sent: Instant) -> Instant {
        sent + self.store.lease().saturating_sub(self.write_bound)
    }

    fn show(&self, role: Role, epoch: Option<i64>, holder: Option<&Holder>) {
        if self.partitioned {
            return;
        }
        self.metrics.set(role, epoch.unwrap_or(0));
        self.status.set_ha(crate::status::HaStatus {
            role: role.as_str(),
            instance: self.store.owner().to_owned(),
            epoch,
            active_instance: holder.filter(|h| !h.released).and_then(|h| h.owner.clone()),
            active_address: holder
                .filter(|h| !h.released)
                .and_then(|h| h.address.clone()),
            lease_contact: Some(Instant::now()),
            partitions: None,
        });
    }

    /// One standby look at the lease: takes it when it is free. A lease taken over from a live
    /// owner (expired, not released) returns only after that owner's last write is dead.
    pub async fn try_take(&self) -> Result<Option<Acquired>, crate::error::SyncError> {
        let Some(acquired) = self.store.try_acquire(0).await? else {
            let holder = self.store.holder().await?;
            self.show(Role::Standby, None, holder.as_ref());
            return Ok(None);
        };
        crate::fence::PROCESS.allow_until(self.partition(), self.write_deadline(acquired.sent));
        if let Some(previous) = &acquired.took_over_from {
            tracing::warn!(previous = %previous, epoch = acquired.epoch, wait_ms = self.write_bound.as_millis() as u64,
                "took over an expired lease; waiting out the previous owner's last writes");
            tokio::time::sleep(self.write_bound).await;
        }
        tracing::info!(instance = %self.store.owner(), epoch = acquired.epoch, "lease acquired; this instance is active");
        self.show(Role::Active, Some(acquired.epoch), None);
        Ok(Some(acquired))
    }

    /// Keeps the lease until `stop`: renews every third of the lease and moves the write
    /// deadline; when no renewal succeeds before the deadline, or another instance holds the
    /// lease, refuses every write and cancels `term`. `stop` is not the term's own token: a term
    /// that was asked to end (SIGTERM) still drains and checkpoints, under a renewed lease.
    pub fn spawn_renewal(
        &self,
        acquired: &Acquired,
        term: CancellationToken,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<TermEnd> {
        let this = self.clone();
        let epoch = acquired.epoch;
        let mut last_sent = acquired.sent;
        tokio::spawn(async move {
            // Asked to stop after the write deadline passed, the term may have ended on a
            // refused write: that is a lost lease (the caller steps down), not a stop.
            let stopped = |deadline: Instant| {
                if Instant::now() < deadline {
                    None
                } else {
                    Some(TermEnd::NotRenewed(
                        "the write deadline passed before a renewal succeeded".to_owned(),
                    ))
                }
            };
            let end = loop {
                let deadline = this.write_deadline(last_sent);
                crate::fence::PROCESS.allow_until(this.partition(), deadline);
                let next = (last_sent + this.renew_every()).max(Instant::now());
                tokio::select! {
                    _ = stop.cancelled() => match stopped(deadline) {
                        Some(lost) => break lost,
                        None => return TermEnd::Stopped,
                    },
                    _ = tokio::time::sleep_until(next.into()) => {}
                }
                let mut last_error = String::from(
                    "the write deadline passed before a renewal could be sent (was the process paused or starved?)",
                );
                let renewed = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break None;
                    }
                    let attempt = tokio::select! {
                        _ = stop.cancelled() => match stopped(deadline) {
                            Some(_) => break None,
                            None => return TermEnd::Stopped,
                        },
                        r = tokio::time::timeout(left, this.store.renew(epoch)) => r,
                    };
                    match attempt {
                        Ok(Ok(Some(sent))) => break Some(Ok(sent)),
                        Ok(Ok(None)) => break Some(Err(())),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot renew the lease; retrying until the write deadline");
                            last_error = e.to_string();
                            // The attempt took time: wait from now, never past the deadline.
                            let left = deadline.saturating_duration_since(Instant::now());
                            tokio::select! {
                                _ = stop.cancelled() => match stopped(deadline) {
                                    Some(_) => break None,
                                    None => return TermEnd::Stopped,
                                },
                                _ = tokio::time::sleep(this.poll_every().min(left)) => {}
                            }
                        }
                        Err(_) => last_error = "renewal timed out".to_owned(),
                    }
                };
                match renewed {
                    Some(Ok(sent)) => {
                        last_sent = sent;
                        if !this.partitioned {
                            this.status.touch_ha();
                        }
                    }
                    Some(Err(())) => break TermEnd::TakenOver,
                    None => break TermEnd::NotRenewed(last_error),
                }
            };
            crate::fence::PROCESS.revoke(this.partition());
            this.metrics.losses.inc();
            tracing::error!(epoch, partition = this.partition(), reason = ?end, "lost the lease; stopped writing, stepping down to standby");
            term.cancel();
            end
        })
    }

    /// Ends an active term: refuses further writes, then gives the lease up so a standby takes
    /// over at once.
    pub async fn release(&self, epoch: i64) {
        let partition = self.partition();
        if self.partitioned {
            // The partition's term has ended, so none of its writes is in flight; revoking
            // would stop the other partitions' writes (the fence is their earliest deadline).
            crate::fence::PROCESS.forget(partition);
        } else {
            crate::fence::PROCESS.revoke(partition);
        }
        match self.store.release(epoch).await {
            Ok(true) => tracing::info!(epoch, partition, "lease released"),
            Ok(false) => tracing::info!(epoch, partition, "lease already held by another instance"),
            Err(e) => {
                tracing::warn!(error = %e, partition, "cannot release the lease; a standby takes over when it expires")
            }
        }
        self.show(Role::Standby, None, None);
    }

    /// Back to standby after a lost term.
    pub fn step_down(&self) {
        crate::fence::PROCESS.revoke(self.partition());
        self.show(Role::Standby, None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_name_the_host_and_differ_per_call() {
        let (a, b) = (instance_id(), instance_id());
        assert_ne!(a, b);
        assert!(a.contains(&format!(":{}:", std::process::id())), "{a}");
        assert!(!a.starts_with("unknown-host"), "{a}");
    }

    #[test]
    fn a_wildcard_listener_is_advertised_by_host_name() {
        let any: std::net::SocketAddr = "0.0.0.0:9290".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:9290".parse().unwrap();
        assert_eq!(advertised_address(local), "127.0.0.1:9290");
        let advertised = advertised_address(any);
        assert!(advertised.ends_with(":9290") && !advertised.starts_with("0.0.0.0"));
    }
}

//! The mass-delete guard (`sync.max_delete_fraction`, DESIGN §2.10), in the spirit of rsync's
//! `--max-delete`: a copy or re-copy (history loss included), a force-sync or a repair never
//! deletes more than that fraction of a namespace's destination documents without an
//! operator's confirmation.
//!
//! Before anything is deleted, both sides are counted: when the destination holds more
//! documents beyond the source's count than the fraction allows, the namespace is paused at
//! once (nothing deleted). Otherwise the run gets a [`DeleteBudget`] of `fraction × destination
//! count` deletions, charged range by range before each range's deletions: a run whose deletions
//! would exceed it pauses before that range. A paused namespace is parked with reason
//! [`PARK_REASON`] until an operator confirms it (`POST /api/v1/confirm` naming it, or a
//! force-sync naming it); the confirmed run then deletes without a budget, once.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bson::Document;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, Opts};

use crate::{
    error::{ErrorKind, SyncError},
    metrics::{Metrics, MASS_DELETE_GUARD_TOTAL},
};

/// The parked reason of a namespace the guard paused.
pub use crate::error::MASS_DELETE_PARK_REASON as PARK_REASON;
/// What was about to delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardTrigger {
    /// An initial copy or a re-copy (history lost, a parked worker restarted).
    Copy,
    ForceSync,
    Repair,
}

impl GuardTrigger {
    pub const ALL: [GuardTrigger; 3] = [
        GuardTrigger::Copy,
        GuardTrigger::ForceSync,
        GuardTrigger::Repair,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GuardTrigger::Copy => "copy",
            GuardTrigger::ForceSync => "force_sync",
            GuardTrigger::Repair => "repair",
        }
    }
}

/// The guard's verdict on counts taken before a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Deletions the run may make; `None` = unlimited (fraction 1, or confirmed).
    pub allowed: Option<u64>,
    /// Deletions the counts alone already imply (destination count beyond the source's).
    pub projected: u64,
}

impl Decision {
    pub fn pauses(&self) -> bool {
        self.allowed.is_some_and(|a| self.projected > a)
    }
}

/// Deletions a run may always make: a handful of documents is no mass deletion, and a
/// fraction of a tiny collection (one extra document in a copy of two) must not need an
/// operator.
pub const FREE_DELETIONS: u64 = 10;

/// Pure decision on counts: `fraction` of the destination's documents may be deleted (and
/// always [`FREE_DELETIONS`]).
pub fn decide(fraction: f64, source_count: u64, dest_count: u64) -> Decision {
    let allowed = (fraction < 1.0)
        .then(|| ((fraction * dest_count as f64).floor() as u64).max(FREE_DELETIONS));
    Decision {
        allowed,
        projected: dest_count.saturating_sub(source_count),
    }
}

/// The daemon-wide guard: the configured fraction, operator confirmations, the counter.
pub struct DeleteGuard {
    fraction_bits: AtomicU64,
    confirmed: Mutex<HashSet<String>>,
    /// `run --reset-identity`: the operator accepted a new source and asked for a re-copy, so
    /// the first run of every namespace is confirmed; the namespaces that used it.
    blanket: Mutex<Option<HashSet<String>>>,
    trips: IntCounterVec,
}

impl DeleteGuard {
    pub fn new(fraction: f64, metrics: &Metrics) -> Arc<DeleteGuard> {
        let trips = IntCounterVec::new(
            Opts::new(
                MASS_DELETE_GUARD_TOTAL,
                "Copies, force-syncs and repairs paused by the mass-delete guard (sync.max_delete_fraction), by trigger.",
            ),
            &["trigger"],
        )
        .expect("valid metric");
        for t in GuardTrigger::ALL {
            trips.with_label_values(&[t.as_str()]);
        }
        metrics.register_replacing(trips.clone());
        Arc::new(DeleteGuard {
            fraction_bits: AtomicU64::new(fraction.to_bits()),
            confirmed: Mutex::new(HashSet::new()),
            blanket: Mutex::new(None),
            trips,
        })
    }

    /// `sync.max_delete_fraction` (a reload changes it for the next runs).
    pub fn set_fraction(&self, fraction: f64) {
        self.fraction_bits
            .store(fraction.to_bits(), Ordering::Relaxed);
    }

    pub fn fraction(&self) -> f64 {
        f64::from_bits(self.fraction_bits.load(Ordering::Relaxed))
    }

    /// An operator confirmed the deletions of `ns`: its next run is not limited.
    pub fn confirm(&self, ns: &str) {
        tracing::warn!(namespace = %ns, "mass deletion confirmed by an operator; the next copy of the namespace deletes without limit");
        self.confirmed.lock().insert(ns.to_string());
    }

    /// Confirms the first run of every namespace (`run --reset-identity`).
    pub fn confirm_first_runs(&self) {
        *self.blanket.lock() = Some(HashSet::new());
    }

    fn take_confirmation(&self, ns: &str) -> bool {
        if self.confirmed.lock().remove(ns) {
            return true;
        }
        self.blanket
            .lock()
            .as_mut()
            .is_some_and(|used| used.insert(ns.to_string()))
    }

    /// Starts a run on `ns` after counting both sides: a budget, or the pause error
    /// ([`ErrorKind::MassDeleteGuard`]) when the counts alone exceed the fraction.
    pub fn start(
        self: &Arc<Self>,
        ns: &str,
        trigger: GuardTrigger,
        source_count: u64,
        dest_count: u64,
    ) -> Result<DeleteBudget, SyncError> {
        if self.take_confirmation(ns) {
            return Ok(DeleteBudget {
                guard: Arc::clone(self),
                ns: ns.to_string(),
                trigger,
                allowed: None,
                deleted: 0,
                dest_count,
            });
        }
        let fraction = self.fraction();
        let decision = decide(fraction, source_count, dest_count);
        let budget = DeleteBudget {
            guard: Arc::clone(self),
            ns: ns.to_string(),
            trigger,
            allowed: decision.allowed,
            deleted: 0,
            dest_count,
        };
        if decision.pauses() {
            return Err(budget.pause(format!(
                "the source has {source_count} documents and the destination {dest_count}: at least {} deletions, more than sync.max_delete_fraction = {fraction} allows",
                decision.projected
            )));
        }
        Ok(budget)
    }
}

/// How many more deletions one run may make.
pub struct DeleteBudget {
    guard: Arc<DeleteGuard>,
    ns: String,
    trigger: GuardTrigger,
    allowed: Option<u64>,
    deleted: u64,
    dest_count: u64,
}

impl DeleteBudget {
    /// Charges `n` deletions before they are made; the pause error when they would exceed the
    /// budget (nothing of them deleted).
    pub fn charge(&mut self, n: u64) -> Result<(), SyncError> {
        if let Some(allowed) = self.allowed {
            if self.deleted + n > allowed {
                return Err(self.pause(format!(
                    "deleting {n} more documents would bring this run to {} of the destination's {} ({} allowed by sync.max_delete_fraction = {})",
                    self.deleted + n,
                    self.dest_count,
                    allowed,
                    self.guard.fraction()
                )));
            }
        }
        self.deleted += n;
        Ok(())
    }

    pub fn deleted(&self) -> u64 {
        self.deleted
    }

    /// Gives back `n` charged deletions that were not made (a transaction that did not
    /// commit), so the range's usual write charges them once.
    pub fn refund(&mut self, n: u64) {
        self.deleted = self.deleted.saturating_sub(n);
    }

    fn pause(&self, why: String) -> SyncError {
        self.guard
            .trips
            .with_label_values(&[self.trigger.as_str()])
            .inc();
        tracing::error!(namespace = %self.ns, trigger = self.trigger.as_str(), reason = PARK_REASON, detail = %why, "mass-delete guard: pausing the namespace before it deletes; confirm with POST /api/v1/confirm or a force-sync naming it");
        SyncError::new(
            ErrorKind::MassDeleteGuard,
            format!("{} of {} paused: {why}", self.trigger.as_str(), self.ns),
        )
    }
}

/// Counts a collection's documents (the server's count; 0 when it does not exist).
pub async fn count(
    client: &mongodb::Client,
    db: &str,
    coll: &str,
    area: ErrorKind,
) -> Result<u64, SyncError> {
    match client
        .database(db)
        .collection::<Document>(coll)
        .estimated_document_count()
        .await
    {
        Ok(n) => Ok(n),
        Err(e) if crate::source::is_namespace_not_found(&e) => Ok(0),
        Err(e) => Err(SyncError::mongo(
            area,
            format!("counting {db}.{coll} for the mass-delete guard"),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_decide_before_anything_is_deleted() {
        // An empty source against 9,000 destination documents: paused.
        assert!(decide(0.5, 0, 9_000).pauses());
        // Nearly empty: still paused.
        assert!(decide(0.5, 1, 9_000).pauses());
        // Half deleted is allowed, more is not.
        assert!(!decide(0.5, 50, 100).pauses());
        assert!(decide(0.5, 49, 100).pauses());
        // A growing source never pauses; 1 turns the guard off.
        assert!(!decide(0.5, 200, 100).pauses());
        assert!(!decide(1.0, 0, 100).pauses());
        assert_eq!(decide(0.5, 0, 0).allowed, Some(FREE_DELETIONS));
        // A handful of deletions never pauses, whatever the fraction.
        assert!(!decide(0.5, 0, FREE_DELETIONS).pauses());
        assert!(decide(0.5, 0, FREE_DELETIONS + 11).pauses());
        assert!(!decide(0.5, 0, 0).pauses());
    }

    #[test]
    fn the_budget_stops_before_the_range_that_would_exceed_it() {
        let guard = DeleteGuard::new(0.5, &Metrics::default());
        let mut budget = guard
            .start("d.c", GuardTrigger::ForceSync, 100, 100)
            .unwrap();
        budget.charge(30).unwrap();
        budget.charge(20).unwrap();
        let err = budget.charge(1).expect_err("51 of 100 exceeds one half");
        assert_eq!(err.kind, ErrorKind::MassDeleteGuard);
        assert_eq!(budget.deleted(), 50);
        assert_eq!(
            guard.trips.with_label_values(&["force_sync"]).get(),
            1,
            "counted"
        );
    }

    #[test]
    fn a_confirmation_lifts_the_limit_once() {
        let guard = DeleteGuard::new(0.5, &Metrics::default());
        assert!(guard.start("d.c", GuardTrigger::Copy, 0, 100).is_err());
        guard.confirm("d.c");
        let mut budget = guard.start("d.c", GuardTrigger::Copy, 0, 100).unwrap();
        budget.charge(10).unwrap();
        assert!(
            guard.start("d.c", GuardTrigger::Copy, 0, 100).is_err(),
            "the confirmation is used up"
        );
        // --reset-identity: the first run of every namespace.
        guard.confirm_first_runs();
        assert!(guard.start("d.c", GuardTrigger::Copy, 0, 100).is_ok());
        assert!(guard.start("d.e", GuardTrigger::Copy, 0, 100).is_ok());
        assert!(guard.start("d.c", GuardTrigger::Copy, 0, 100).is_err());
    }
}

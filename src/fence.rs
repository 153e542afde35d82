//! The process's permission to write to the destination (`ha.fencing = "lease"`, DESIGN §2.12).
//!
//! An active instance may write until a deadline on the monotonic clock: the moment it sent its
//! last successful renewal, plus the lease, minus the server-side bound of one write. Every
//! destination write checks the deadline before it starts and again each time it resumes
//! ([`crate::bounded_write::run_fenced`]), so an instance that was paused (SIGSTOP, a VM
//! freeze) past its lease refuses to write the moment it runs again, before any task of it
//! learns that the lease is gone, and a write that waited past the deadline for a pooled
//! connection is dropped before it is sent.
//!
//! The permit is process-wide because every destination write of the process goes through
//! `bounded_write`, and a process runs one daemon with `ha.enabled` (the lease owner names the
//! process). Under `ha.partitions` it is the earliest deadline of the leases held. Unarmed, it
//! allows everything: instances without HA are not affected.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

/// The permit of this process.
pub static PROCESS: Fence = Fence::new();

/// A write deadline on the monotonic clock, the earliest of the deadlines of the leases
/// (partitions) the process holds: a process that fails to renew one lease stops writing for
/// all of them (they are renewed together, against the same destination).
pub struct Fence {
    armed: AtomicBool,
    /// Nanoseconds after [`origin`] before which writes are allowed (the earliest deadline).
    until: AtomicU64,
    /// Per partition: nanoseconds after [`origin`] (0: revoked).
    deadlines: Mutex<BTreeMap<u32, u64>>,
}

/// Writes are refused: this instance does not hold a live lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn nanos_since_origin(at: Instant) -> u64 {
    at.saturating_duration_since(origin()).as_nanos() as u64
}

impl Fence {
    pub const fn new() -> Fence {
        Fence {
            armed: AtomicBool::new(false),
            until: AtomicU64::new(0),
            deadlines: Mutex::new(BTreeMap::new()),
        }
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<u32, u64>)) {
        let mut deadlines = self.deadlines.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut deadlines);
        // No lease held: nothing may be written.
        let earliest = deadlines.values().copied().min().unwrap_or(0);
        self.until.store(earliest, Ordering::SeqCst);
    }

    /// From now on writes need a deadline; none is granted yet.
    pub fn arm(&self) {
        let _ = origin();
        self.update(BTreeMap::clear);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Allows writes until `deadline` as far as `partition` is concerned (a renewal moves it).
    pub fn allow_until(&self, partition: u32, deadline: Instant) {
        let at = nanos_since_origin(deadline).max(1);
        self.update(|d| {
            d.insert(partition, at);
        });
    }

    /// Refuses every write from now on (the lease of `partition` is lost or being released)
    /// until the partition is [`forget`](Self::forget)-ten.
    pub fn revoke(&self, partition: u32) {
        self.update(|d| {
            d.insert(partition, 0);
        });
    }

    /// `partition` no longer counts: its term has ended and its lease is given up.
    pub fn forget(&self, partition: u32) {
        self.update(|d| {
            d.remove(&partition);
        });
    }

    /// Ok when a write may be sent now.
    pub fn check(&self) -> Result<(), Fenced> {
        if !self.armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let until = self.until.load(Ordering::SeqCst);
        if until > 0 && nanos_since_origin(Instant::now()) < until {
            Ok(())
        } else {
            Err(Fenced)
        }
    }

    /// How long writes remain allowed (zero when refused or unarmed).
    pub fn remaining(&self) -> Duration {
        let until = self.until.load(Ordering::SeqCst);
        Duration::from_nanos(until.saturating_sub(nanos_since_origin(Instant::now())))
    }
}

impl Default for Fence {
    fn default() -> Self {
        Fence::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unarmed_allows_and_armed_needs_a_deadline_in_the_future() {
        let fence = Fence::new();
        assert_eq!(fence.check(), Ok(()));
        fence.arm();
        assert_eq!(fence.check(), Err(Fenced), "armed without a deadline");
        fence.allow_until(0, Instant::now() + Duration::from_secs(60));
        assert_eq!(fence.check(), Ok(()));
        assert!(fence.remaining() > Duration::from_secs(59));
        fence.revoke(0);
        assert_eq!(fence.check(), Err(Fenced));
    }

    #[test]
    fn the_earliest_partition_deadline_decides_and_a_forgotten_one_no_longer_counts() {
        let fence = Fence::new();
        fence.arm();
        fence.allow_until(0, Instant::now() + Duration::from_secs(60));
        fence.allow_until(3, Instant::now() + Duration::from_secs(30));
        assert!(fence.remaining() <= Duration::from_secs(30));
        fence.revoke(3);
        assert_eq!(
            fence.check(),
            Err(Fenced),
            "one lost lease stops every write"
        );
        fence.forget(3);
        assert_eq!(fence.check(), Ok(()), "the other lease still allows writes");
        fence.forget(0);
        assert_eq!(
            fence.check(),
            Err(Fenced),
            "no lease held: nothing is written"
        );
    }

    #[test]
    fn a_deadline_in_the_past_refuses_even_without_a_revoke() {
        // A process paused past its deadline finds it passed when it runs again.
        let fence = Fence::new();
        fence.arm();
        fence.allow_until(0, Instant::now() + Duration::from_millis(30));
        assert_eq!(fence.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(fence.check(), Err(Fenced));
        assert_eq!(fence.remaining(), Duration::ZERO);
    }
}

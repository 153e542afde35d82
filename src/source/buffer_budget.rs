//! One memory budget for the whole daemon (`apply.max_buffered_bytes`, DESIGN §2.11, issue 11
//! item 7): every change event read from the source but not yet applied holds its size in
//! bytes from it, whichever namespace read it. A destination that stops accepting writes
//! therefore stops the readers once the budget is spent, however many namespaces are
//! backlogged, instead of each namespace buffering its own share.
//!
//! Each reader also has a share ([`BufferBudget::reader_share`]) it cannot exceed, so one
//! backlogged namespace never takes the whole budget from the others.

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Metrics, BUFFERED_BYTES, BUFFER_BUDGET_BYTES};

/// A reader's share is at most this fraction of the budget (with at least two batches)...
const READER_SHARE_DIVISOR: usize = 8;
/// ...and never more than this (what one reader's queue held before the budget existed).
const READER_SHARE_MAX: usize = 32 * 1024 * 1024;

#[derive(Debug)]
pub struct BufferBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    buffered: IntGauge,
}

/// Bytes of one buffered event, held from the daemon's budget and from its reader's share
/// until it is dropped (applied, or discarded with its queue).
#[derive(Debug)]
pub struct BufferedBytes {
    _daemon: OwnedSemaphorePermit,
    _reader: OwnedSemaphorePermit,
    bytes: usize,
    gauge: IntGauge,
}

impl BufferedBytes {
    /// The holds of a batch's events as few holds as possible: consecutive holds from the same
    /// reader become one, released at once when the batch is written (one release per batch
    /// instead of one per event).
    pub fn merge_runs(holds: Vec<BufferedBytes>) -> Vec<BufferedBytes> {
        let mut merged: Vec<BufferedBytes> = Vec::new();
        for mut hold in holds {
            match merged.last_mut() {
                Some(last)
                    if Arc::ptr_eq(last._reader.semaphore(), hold._reader.semaphore())
                        && Arc::ptr_eq(last._daemon.semaphore(), hold._daemon.semaphore()) =>
                {
                    let all = |p: &mut OwnedSemaphorePermit| {
                        p.split(p.num_permits()).expect("splits what it holds")
                    };
                    last._reader.merge(all(&mut hold._reader));
                    last._daemon.merge(all(&mut hold._daemon));
                    last.bytes += std::mem::take(&mut hold.bytes);
                }
                _ => merged.push(hold),
            }
        }
        merged
    }
}

impl Drop for BufferedBytes {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes as i64);
    }
}

impl BufferBudget {
    /// A budget of `total` bytes; registers `mongo_syncd_buffered_bytes` and
    /// `mongo_syncd_buffer_budget_bytes` (a second budget on the same registry replaces the
    /// first one's series: each active term of an instance creates its own).
    pub fn new(total: usize, metrics: &Metrics) -> Arc<BufferBudget> {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        let buffered = IntGauge::new(
            BUFFERED_BYTES,
            "Bytes of change events read from the source and not yet applied, all namespaces (bounded by apply.max_buffered_bytes).",
        )
        .expect("valid metric");
        let budget = IntGauge::new(
            BUFFER_BUDGET_BYTES,
            "apply.max_buffered_bytes: the most change-event bytes the daemon buffers.",
        )
        .expect("valid metric");
        budget.set(total as i64);
        metrics.register_replacing(buffered.clone());
        metrics.register_replacing(budget);
        Arc::new(BufferBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            buffered,
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held right now.
    pub fn buffered(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// The most one reader may hold: an eighth of the budget, at least two batches of
    /// `batch_max_bytes` (so a reader always reads ahead of its batch) and at most 32 MiB, never
    /// more than the whole budget.
    pub fn reader_share(&self, batch_max_bytes: usize) -> usize {
        (self.total / READER_SHARE_DIVISOR)
            .min(READER_SHARE_MAX)
            .max(batch_max_bytes.saturating_mul(2))
            .min(self.total)
            .max(1)
    }

    /// Waits until `bytes` fit both `reader` (a semaphore of [`Self::reader_share`] permits)
    /// and the daemon's budget. The reader's share is taken first, so a reader waiting for the
    /// daemon's budget holds no more than its share. `bytes` is clamped to what both can ever
    /// give (an event larger than the budget waits for the budget to be empty).
    pub async fn acquire(
        &self,
        reader: &Arc<Semaphore>,
        reader_share: usize,
        bytes: usize,
    ) -> Result<BufferedBytes, AcquireError> {
        let bytes = bytes.clamp(1, reader_share.min(self.total));
        let need = bytes as u32;
        // Most of the time both have room: take it without queueing (a waiter, if any, holds
        // every free permit, so this never overtakes one).
        let reader = match Arc::clone(reader).try_acquire_many_owned(need) {
            Ok(permit) => permit,
            Err(_) => Arc::clone(reader).acquire_many_owned(need).await?,
        };
        let daemon = match Arc::clone(&self.bytes).try_acquire_many_owned(need) {
            Ok(permit) => permit,
            Err(_) => Arc::clone(&self.bytes).acquire_many_owned(need).await?,
        };
        self.buffered.add(bytes as i64);
        Ok(BufferedBytes {
            _daemon: daemon,
            _reader: reader,
            bytes,
            gauge: self.buffered.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: usize) -> Arc<BufferBudget> {
        BufferBudget::new(total, &Metrics::new(500))
    }

    #[test]
    fn a_reader_share_is_an_eighth_within_two_batches_and_32_mib() {
        let mib = 1024 * 1024;
        assert_eq!(budget(256 * mib).reader_share(8 * mib), 32 * mib);
        assert_eq!(budget(1024 * mib).reader_share(8 * mib), 32 * mib);
        assert_eq!(budget(64 * mib).reader_share(mib), 8 * mib);
        assert_eq!(budget(16 * mib).reader_share(4 * mib), 8 * mib);
        // Never more than the whole budget.
        assert_eq!(budget(4 * mib).reader_share(8 * mib), 4 * mib);
    }

    #[tokio::test]
    async fn held_bytes_count_against_the_daemon_until_dropped() {
        let b = budget(1000);
        let (r1, r2) = (Arc::new(Semaphore::new(600)), Arc::new(Semaphore::new(600)));
        let a = b.acquire(&r1, 600, 500).await.unwrap();
        let c = b.acquire(&r2, 600, 400).await.unwrap();
        assert_eq!(b.buffered(), 900);
        assert_eq!(b.buffered.get(), 900);
        // A third event does not fit the daemon's budget although its reader has room.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            b.acquire(&r2, 600, 200),
        )
        .await;
        assert!(waiting.is_err(), "the daemon's budget is spent");
        drop(a);
        assert_eq!(b.buffered.get(), 400);
        let d = b.acquire(&r2, 600, 200).await.unwrap();
        assert_eq!(b.buffered(), 600);
        drop((c, d));
        assert_eq!(b.buffered(), 0);
        assert_eq!(b.buffered.get(), 0);
    }

    #[tokio::test]
    async fn merged_holds_release_everything_once_and_keep_readers_apart() {
        let b = budget(1000);
        let (r1, r2) = (Arc::new(Semaphore::new(600)), Arc::new(Semaphore::new(600)));
        let holds = vec![
            b.acquire(&r1, 600, 100).await.unwrap(),
            b.acquire(&r1, 600, 200).await.unwrap(),
            b.acquire(&r2, 600, 50).await.unwrap(),
            b.acquire(&r1, 600, 10).await.unwrap(),
        ];
        let merged = BufferedBytes::merge_runs(holds);
        assert_eq!(merged.len(), 3, "r1, r2, r1: three runs");
        assert_eq!(merged[0].bytes, 300);
        assert_eq!(b.buffered(), 360);
        assert_eq!(b.buffered.get(), 360);
        assert_eq!(r1.available_permits(), 290);
        drop(merged);
        assert_eq!(b.buffered(), 0);
        assert_eq!(b.buffered.get(), 0);
        assert_eq!(r1.available_permits(), 600);
        assert_eq!(r2.available_permits(), 600);
    }

    #[tokio::test]
    async fn one_reader_cannot_take_more_than_its_share() {
        let b = budget(1000);
        let r = Arc::new(Semaphore::new(300));
        let _held = b.acquire(&r, 300, 300).await.unwrap();
        let more =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.acquire(&r, 300, 1)).await;
        assert!(more.is_err(), "the reader's share is spent");
        assert_eq!(
            b.buffered(),
            300,
            "the reader took nothing from the daemon while waiting"
        );
    }

    #[tokio::test]
    async fn an_event_larger_than_everything_is_clamped_not_stuck() {
        let b = budget(100);
        let r = Arc::new(Semaphore::new(100));
        let held = b.acquire(&r, 100, 10_000).await.unwrap();
        assert_eq!(held.bytes, 100);
    }
}

//! `validation.max_docs_per_second`: a pacing throttle shared by every validation scan of the
//! process (so the limit holds for the daemon as a whole, not per namespace). Each side has its
//! own throttle: at most N documents per second are read from the source, and at most N from
//! the destination.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

/// Scans report documents in chunks of this many, so pacing costs one lock per chunk.
pub const THROTTLE_CHUNK: u64 = 256;

/// Paces document reads to a rate; 0 = unthrottled.
#[derive(Debug, Default)]
pub struct Throttle {
    per_second: AtomicU64,
    /// When the next chunk may be read.
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn new(per_second: u64) -> Throttle {
        Throttle {
            per_second: AtomicU64::new(per_second),
            next: Mutex::new(None),
        }
    }

    /// Changes the rate (config reload).
    pub fn set_rate(&self, per_second: u64) {
        self.per_second.store(per_second, Ordering::Relaxed);
    }

    pub fn rate(&self) -> u64 {
        self.per_second.load(Ordering::Relaxed)
    }

    /// Accounts for `docs` documents just read, sleeping as long as the rate requires. Time
    /// not used (an idle throttle) is not banked: bursts never exceed one chunk.
    pub async fn acquire(&self, docs: u64) {
        let rate = self.rate();
        if rate == 0 || docs == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock();
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + Duration::from_secs_f64(docs as f64 / rate as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Counts documents of one scan and hands them to the throttle in chunks.
pub struct Pacer<'a> {
    throttle: &'a Throttle,
    pending: u64,
}

impl<'a> Pacer<'a> {
    pub fn new(throttle: &'a Throttle) -> Pacer<'a> {
        Pacer {
            throttle,
            pending: 0,
        }
    }

    pub async fn add(&mut self, docs: u64) {
        self.pending += docs;
        if self.pending >= THROTTLE_CHUNK {
            let n = std::mem::take(&mut self.pending);
            self.throttle.acquire(n).await;
        }
    }

    pub async fn flush(&mut self) {
        let n = std::mem::take(&mut self.pending);
        self.throttle.acquire(n).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_configured_rate() {
        let t = Throttle::new(1_000);
        let started = Instant::now();
        let mut pacer = Pacer::new(&t);
        for _ in 0..5_000 {
            pacer.add(1).await;
        }
        pacer.flush().await;
        let elapsed = started.elapsed();
        // 5,000 documents at 1,000/s: the last chunk may start at ~4.75 s.
        assert!(elapsed >= Duration::from_millis(4_700), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(5_100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unthrottled_and_rate_changes_apply() {
        let t = Throttle::new(0);
        let started = Instant::now();
        t.acquire(1_000_000).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        t.set_rate(100);
        t.acquire(100).await;
        t.acquire(100).await;
        assert!(started.elapsed() >= Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_not_banked() {
        let t = Throttle::new(100);
        t.acquire(100).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let started = Instant::now();
        t.acquire(100).await;
        t.acquire(100).await;
        assert!(started.elapsed() >= Duration::from_secs(1));
    }
}

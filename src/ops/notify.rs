//! systemd notifications (`sd_notify`): `READY=1`, `STATUS=`, `WATCHDOG=1` (only while the
//! supervisor loop is alive), `RELOADING=1`, `STOPPING=1`. Without `NOTIFY_SOCKET` these
//! are no-ops.

use std::{
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::status::StatusRegistry;

/// The supervisor loop beats at least once a second; the watchdog tolerates at least this long
/// without a beat before it stops pinging (whatever `WATCHDOG_USEC` is).
pub const WATCHDOG_MIN_STALL: Duration = Duration::from_secs(3);
/// How often `STATUS=` is refreshed (when it changed) without a watchdog.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining workers"),
    ]);
}

pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// Decides whether a watchdog tick may ping: only while the supervisor's heartbeat counter
/// moved within the last `stall`. A loop that hangs stops the pings after `stall`; systemd
/// then restarts the service once `WatchdogSec` passes without one.
#[derive(Debug)]
pub struct WatchdogGate {
    stall: Duration,
    last_beat: u64,
    last_change: Instant,
}

impl WatchdogGate {
    pub fn new(stall: Duration, beat: u64, now: Instant) -> WatchdogGate {
        WatchdogGate {
            stall,
            last_beat: beat,
            last_change: now,
        }
    }

    /// The stall tolerated for a given `WATCHDOG_USEC`: half of it, at least
    /// [`WATCHDOG_MIN_STALL`].
    pub fn stall_for(watchdog: Duration) -> Duration {
        (watchdog / 2).max(WATCHDOG_MIN_STALL)
    }

    /// Records the heartbeat seen at `now`; returns whether to send `WATCHDOG=1`.
    pub fn observe(&mut self, beat: u64, now: Instant) -> bool {
        if beat != self.last_beat {
            self.last_beat = beat;
            self.last_change = now;
        }
        now.saturating_duration_since(self.last_change) <= self.stall
    }
}

/// Sends `WATCHDOG=1` four times per watchdog interval while [`WatchdogGate`] allows it (the
/// supervisor loop bumps `heartbeat` at least once a second), and refreshes `STATUS=` with
/// the one-line summary when it changes.
pub fn spawn_watchdog(
    heartbeat: Arc<AtomicU64>,
    status_registry: Arc<StatusRegistry>,
    cancel: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog
        .map(|d| (d / 4).clamp(Duration::from_millis(100), STATUS_EVERY))
        .unwrap_or(STATUS_EVERY);
    if let Some(d) = watchdog {
        tracing::info!(
            watchdog_ms = d.as_millis() as u64,
            ping_every_ms = every.as_millis() as u64,
            "systemd watchdog enabled"
        );
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut gate = watchdog.map(|d| {
            WatchdogGate::new(
                WatchdogGate::stall_for(d),
                heartbeat.load(Ordering::Relaxed),
                Instant::now(),
            )
        });
        let mut last_status = String::new();
        let mut last_status_at = Instant::now();
        let mut silent = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(gate) = gate.as_mut() {
                if gate.observe(heartbeat.load(Ordering::Relaxed), Instant::now()) {
                    send(&[NotifyState::Watchdog]);
                    if silent {
                        tracing::info!("supervisor loop alive again; watchdog pings resumed");
                        silent = false;
                    }
                } else if !silent {
                    tracing::error!("supervisor loop stalled; withholding watchdog pings");
                    silent = true;
                }
            }
            if last_status_at.elapsed() >= STATUS_EVERY || last_status.is_empty() {
                let line = status_registry.summary();
                if line != last_status {
                    status(&line);
                    last_status = line;
                }
                last_status_at = Instant::now();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_only_while_the_heartbeat_moves() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut gate = WatchdogGate::new(Duration::from_secs(3), 0, t0);
        // Beating once a second: every tick pings.
        for i in 1..=5u64 {
            assert!(gate.observe(i, s(i as f64)));
        }
        // Frozen at beat 5 (last change at 5 s): pings until the stall passes, then none.
        assert!(gate.observe(5, s(6.0)));
        assert!(gate.observe(5, s(8.0)));
        assert!(!gate.observe(5, s(8.5)));
        assert!(!gate.observe(5, s(30.0)));
        // The loop comes back: pings resume at once.
        assert!(gate.observe(6, s(31.0)));
    }

    #[test]
    fn stall_is_half_the_watchdog_but_never_below_the_minimum() {
        assert_eq!(
            WatchdogGate::stall_for(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            WatchdogGate::stall_for(Duration::from_secs(1)),
            WATCHDOG_MIN_STALL
        );
    }
}

//! systemd notifications (`sd_notify`): `READY=1`, `STATUS=`, `WATCHDOG=1` (only while the
//! supervisor loop is alive), `RELOADING=1`, `STOPPING=1`. Without `NOTIFY_SOCKET` these
//! are no-ops.

use std::{
    sync::{atomic::AtomicU64, atomic::Ordering, Arc},
    time::Duration,
};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::status::StatusRegistry;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[NotifyState::Reloading]);
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

/// Sends `WATCHDOG=1` at half the watchdog interval, but only while `heartbeat` keeps moving
/// (the supervisor loop bumps it every iteration, at least once a second): a hung supervisor
/// stops the pings and systemd restarts the service. Also refreshes `STATUS=`.
pub fn spawn_watchdog(
    heartbeat: Arc<AtomicU64>,
    status_registry: Arc<StatusRegistry>,
    cancel: CancellationToken,
) {
    let interval = sd_notify::watchdog_enabled().map(|d| d / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(
            interval
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5)),
        );
        let mut last_seen = heartbeat.load(Ordering::Relaxed);
        let mut last_status = String::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = heartbeat.load(Ordering::Relaxed);
            if interval.is_some() && now != last_seen {
                send(&[NotifyState::Watchdog]);
            }
            last_seen = now;
            let line = status_registry.summary();
            if line != last_status {
                status(&line);
                last_status = line;
            }
        }
    });
}

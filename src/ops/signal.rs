//! Unix signals become one typed [`Signal`] stream, in one place (workers never install
//! handlers): SIGTERM/SIGINT drain, SIGHUP reloads, SIGUSR1 force-syncs, SIGUSR2 validates.

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use tokio::sync::mpsc;

/// What an operator asked for with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM / SIGINT: stop reading, drain, checkpoint, exit 0.
    Shutdown,
    /// SIGHUP: reload the configuration file.
    Reload,
    /// SIGUSR1: force-sync every namespace.
    ForceSync,
    /// SIGUSR2: validate every namespace now.
    Validate,
}

impl Signal {
    pub fn from_raw(sig: i32) -> Option<Signal> {
        match sig {
            SIGTERM | SIGINT => Some(Signal::Shutdown),
            SIGHUP => Some(Signal::Reload),
            SIGUSR1 => Some(Signal::ForceSync),
            SIGUSR2 => Some(Signal::Validate),
            _ => None,
        }
    }
}

/// Starts listening for signals; a second shutdown signal exits the process at once.
pub fn listen() -> std::io::Result<mpsc::Receiver<Signal>> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2])?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut shutdown_seen = false;
        while let Some(raw) = signals.next().await {
            let Some(sig) = Signal::from_raw(raw) else {
                continue;
            };
            if sig == Signal::Shutdown {
                if shutdown_seen {
                    tracing::warn!("second shutdown signal; exiting immediately");
                    std::process::exit(crate::exit::RUNTIME_FAILURE as i32);
                }
                shutdown_seen = true;
            }
            if tx.send(sig).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_handled_signal() {
        assert_eq!(Signal::from_raw(SIGTERM), Some(Signal::Shutdown));
        assert_eq!(Signal::from_raw(SIGINT), Some(Signal::Shutdown));
        assert_eq!(Signal::from_raw(SIGHUP), Some(Signal::Reload));
        assert_eq!(Signal::from_raw(SIGUSR1), Some(Signal::ForceSync));
        assert_eq!(Signal::from_raw(SIGUSR2), Some(Signal::Validate));
        assert_eq!(Signal::from_raw(signal_hook::consts::SIGQUIT), None);
    }
}

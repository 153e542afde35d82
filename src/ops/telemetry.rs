//! Logging bootstrap: one subscriber for the whole process, configured from `[log]`.
//!
//! - `log.level` is an `EnvFilter` directive; a non-empty `RUST_LOG` overrides it (for one-off
//!   debugging without editing the config).
//! - `log.format = "text"` writes human-readable lines, `"json"` one JSON object per line. Both go
//!   to **stderr**: stdout is reserved for command output (`check-config`, `validate --json`).
//! - The returned [`LogReloadHandle`] changes the level at runtime (SIGHUP reload).
//!
//! House style (STYLE convention 13): lowercase messages, key/value fields, errors as
//! `error = %err`.

use std::io::IsTerminal;

use tracing_subscriber::{
    filter::EnvFilter, fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, Registry,
};

use crate::config::{LogConfig, LogFormat};

/// The variable that overrides `log.level`.
pub const RUST_LOG: &str = "RUST_LOG";

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The directive (from `log.level` or `RUST_LOG`) does not parse.
    #[error("{origin}: not a valid filter directive: {message}")]
    InvalidFilter {
        /// `log.level` or `RUST_LOG`.
        origin: &'static str,
        /// The parser's message.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("logging is already initialised")]
    AlreadyInitialised,
    /// The subscriber is gone (the process is shutting down).
    #[error("cannot change the log level: {0}")]
    Reload(String),
}

/// Changes the active log filter at runtime. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogReloadHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    env_override: bool,
}

impl LogReloadHandle {
    /// Applies a new `log.level`. Returns `Ok(false)` without changing anything while `RUST_LOG`
    /// overrides the config (the operator asked for that filter explicitly).
    pub fn set_level(&self, level: &str) -> Result<bool, TelemetryError> {
        if self.env_override {
            return Ok(false);
        }
        let filter = parse_filter(level, "log.level")?;
        self.handle
            .reload(filter)
            .map_err(|e| TelemetryError::Reload(e.to_string()))?;
        Ok(true)
    }

    /// Whether `RUST_LOG` is in charge of the filter.
    pub fn is_overridden_by_env(&self) -> bool {
        self.env_override
    }
}

fn parse_filter(directive: &str, origin: &'static str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::builder()
        .parse(directive)
        .map_err(|e| TelemetryError::InvalidFilter {
            origin,
            message: e.to_string(),
        })
}

/// The filter to start with: `RUST_LOG` when set and non-empty, else `log.level`.
fn initial_filter(cfg: &LogConfig) -> Result<(EnvFilter, bool), TelemetryError> {
    match std::env::var(RUST_LOG) {
        Ok(directive) if !directive.trim().is_empty() => {
            Ok((parse_filter(&directive, "RUST_LOG")?, true))
        }
        _ => Ok((parse_filter(&cfg.level, "log.level")?, false)),
    }
}

/// Installs the global subscriber. Call once, before the tokio runtime starts.
pub fn init(cfg: &LogConfig) -> Result<LogReloadHandle, TelemetryError> {
    let (filter, env_override) = initial_filter(cfg)?;
    let (filter, handle) = reload::Layer::new(filter);
    let (text, json) = match cfg.format {
        LogFormat::Text => (
            Some(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .with_span_list(false),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    Ok(LogReloadHandle {
        handle,
        env_override,
    })
}

/// How often a namespace that is copying gets a progress line.
pub const COPY_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a streaming namespace gets a progress line.
pub const STREAM_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a parked namespace is reported again.
pub const PARKED_REMINDER_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// Logs one periodic progress line per namespace: every [`COPY_PROGRESS_EVERY`] while it
/// copies (copied/estimated), every [`STREAM_PROGRESS_EVERY`] while it streams (events applied,
/// lag, applied-through), every [`PARKED_REMINDER_EVERY`] while it is parked. Counts only: never
/// document contents.
pub fn spawn_progress_log(
    status: std::sync::Arc<crate::status::StatusRegistry>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use crate::metrics::WorkerState;
    use std::{collections::HashMap, time::Instant};
    tokio::spawn(async move {
        // Per namespace: (state, when the state was entered or last reported, events applied then).
        let mut last: HashMap<String, (WorkerState, Instant, u64)> = HashMap::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let snapshot = status.snapshot();
            last.retain(|ns, _| snapshot.contains_key(ns));
            for (ns, s) in snapshot {
                let entry = last
                    .entry(ns.clone())
                    .or_insert((s.state, now, s.events_applied));
                if entry.0 != s.state {
                    *entry = (s.state, now, s.events_applied);
                    continue;
                }
                let every = match s.state {
                    WorkerState::Copying => COPY_PROGRESS_EVERY,
                    WorkerState::Streaming => STREAM_PROGRESS_EVERY,
                    WorkerState::Parked => PARKED_REMINDER_EVERY,
                    WorkerState::Backoff | WorkerState::Stopped => continue,
                };
                if now.duration_since(entry.1) < every {
                    continue;
                }
                let since = s.events_applied.saturating_sub(entry.2);
                match s.state {
                    WorkerState::Copying => tracing::info!(
                        namespace = %ns,
                        copied = s.copied,
                        estimated = s.copy_estimate,
                        lag_seconds = s.lag_seconds,
                        "copy progress"
                    ),
                    WorkerState::Streaming => tracing::info!(
                        namespace = %ns,
                        events_applied = s.events_applied,
                        events_applied_since_last = since,
                        interval_s = every.as_secs(),
                        lag_seconds = s.lag_seconds,
                        applied_through = s.applied_through.map(|t| t.time).unwrap_or(0),
                        "streaming progress"
                    ),
                    _ => tracing::warn!(
                        namespace = %ns,
                        reason = s.parked_reason.as_deref().unwrap_or("unknown"),
                        "still parked; force-sync or reload to restart it"
                    ),
                }
                *entry = (s.state, now, s.events_applied);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_or_name_their_origin() {
        assert!(parse_filter("info", "log.level").is_ok());
        assert!(parse_filter("mongo_syncd=debug,mongodb=warn", "log.level").is_ok());
        let err = parse_filter("mongo_syncd=loud", "log.level").unwrap_err();
        assert!(err.to_string().starts_with("log.level: "), "{err}");
    }

    #[test]
    fn reload_handle_changes_the_level() {
        // A local (non-global) subscriber, so tests do not fight over the global one.
        let (layer, handle) = reload::Layer::new(parse_filter("info", "log.level").unwrap());
        let subscriber = tracing_subscriber::registry().with(layer);
        let handle = LogReloadHandle {
            handle,
            env_override: false,
        };
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(tracing::Level::DEBUG));
            assert!(handle.set_level("debug").unwrap());
            tracing::callsite::rebuild_interest_cache();
            assert!(tracing::enabled!(tracing::Level::DEBUG));
            assert!(handle.set_level("not=a=filter").is_err());
        });
        let overridden = LogReloadHandle {
            env_override: true,
            ..handle
        };
        assert!(!overridden.set_level("debug").unwrap());
    }
}

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

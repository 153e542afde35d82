//! Wiring of the daemon's commands. The bodies are placeholders: the integrator replaces them
//! with the supervisor, validation and demo wiring at merge.

use std::process::ExitCode;

use crate::{
    cli::{DemoOptions, RunOptions, ValidateOptions},
    config::Config,
    exit,
};

/// `mongo-syncd run`: the daemon.
#[allow(
    clippy::unused_async,
    reason = "placeholder; the real body awaits the supervisor"
)]
pub async fn run(config: Config, options: RunOptions) -> ExitCode {
    let _ = (config, options);
    tracing::error!(command = "run", "not wired yet");
    ExitCode::from(exit::RUNTIME_FAILURE)
}

/// `mongo-syncd validate`: one validation pass.
#[allow(
    clippy::unused_async,
    reason = "placeholder; the real body awaits the validation pass"
)]
pub async fn validate(config: Config, options: ValidateOptions) -> ExitCode {
    let _ = (config, options);
    tracing::error!(command = "validate", "not wired yet");
    ExitCode::from(exit::RUNTIME_FAILURE)
}

/// `mongo-syncd demo`: two simulators, sample data, live writes, synced.
#[allow(
    clippy::unused_async,
    reason = "placeholder; the real body awaits the demo"
)]
pub async fn demo(options: DemoOptions) -> ExitCode {
    let _ = options;
    tracing::error!(command = "demo", "not wired yet");
    ExitCode::from(exit::RUNTIME_FAILURE)
}

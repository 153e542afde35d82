//! Two-phase start (STYLE convention 9): everything synchronous and fallible — command line,
//! config load and validation, logging — happens before the tokio runtime exists, so a bad
//! config is a one-line message and exit 78, never a half-started daemon.

use std::{future::Future, io::Write, path::Path, process::ExitCode};

use clap::Parser;
use mongo_syncd::{
    app,
    cli::{Cli, Command},
    config::{self, Config, LogConfig},
    exit,
    ops::{rlimit, runtime, telemetry},
};

/// `mongo-syncd demo`: the binary's, not the library's (the daemon never links the simulator).
#[cfg(feature = "demo")]
mod demo;

/// mimalloc rather than glibc malloc: glibc's malloc and free were ~18 % of the daemon's CPU
/// in a backlog drain (every change event and statement is a short-lived buffer); with mimalloc
/// the daemon used 6–12 % less CPU in a drain, depending on how soon it returns freed memory
/// (`PURGE_DELAY_MS`; README, Performance). Built without transparent huge pages (`no_thp`):
/// with them its RSS doubled, each touched region taking a 2 MiB page.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mimalloc.h` (the sys crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays committed before mimalloc returns it to the OS, unless the
/// operator sets `MIMALLOC_PURGE_DELAY`. mimalloc 3's default, 1 s, let a copy that scans
/// destination `_id`s in 16 MiB replies hold several of them at once (peak RSS 71–87 MiB
/// against 65–70 on glibc); 100 ms peaked at 62–68 MiB. 10 ms peaked lower (53–58) but gave
/// back the CPU saved: a drain's buffers, freed and taken again every few milliseconds, went
/// back to the OS and faulted in again.
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Sets the allocator's options. Called first in `main`, before any other thread exists:
/// `mi_option_set` is not thread-safe.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of a process-wide option, called while this is the only thread.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS)
        };
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // Phase 1: synchronous bootstrap. clap prints usage errors and exits 2 by itself.
    let command = Cli::parse().into_command();
    // Before any thread or socket exists; reported once logging is up.
    let nofile = match command {
        Command::Run(_) | Command::Demo(_) => Some(rlimit::raise_nofile()),
        _ => None,
    };
    match command {
        Command::CheckConfig(args) => check_config(&args.config),
        Command::Run(args) => {
            let config = match load_config(&args.config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let log = match init_logging(&config.log) {
                Ok(log) => log,
                Err(code) => return code,
            };
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %args.config.config.display(),
                "starting"
            );
            log_config_warnings(&config);
            log_nofile(nofile);
            // Phase 2: the runtime.
            let threads = config.runtime.worker_threads;
            block_on(threads, app::run(config, args.options(Some(log))))
        }
        Command::Validate(args) => {
            let config = match load_config(&args.config.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            if let Err(code) = init_logging(&config.log) {
                return code;
            }
            log_config_warnings(&config);
            let threads = config.runtime.worker_threads;
            block_on(threads, app::validate(config, args.options()))
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo(_) => {
            eprintln!(
                "mongo-syncd: this build has no demo (built without the `demo` feature, which \
                 brings the simulator); build with the default features to run it"
            );
            ExitCode::from(exit::USAGE)
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => {
            let log = match init_logging(&LogConfig::default()) {
                Ok(log) => log,
                Err(code) => return code,
            };
            log_nofile(nofile);
            block_on(
                config::DEFAULT_WORKER_THREADS,
                demo::run(args.options(Some(log))),
            )
        }
    }
}

/// Loads and validates the config; on failure prints one line to stderr and returns exit 78.
fn load_config(path: &Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|err| {
        eprintln!("mongo-syncd: invalid configuration: {err}");
        ExitCode::from(exit::INVALID_CONFIG)
    })
}

/// Reports the open-files limit raised at start-up (see [`rlimit`]).
fn log_nofile(nofile: Option<std::io::Result<(rlimit::NofileLimit, rlimit::NofileLimit)>>) {
    match nofile {
        Some(Ok((before, after))) if before != after => tracing::info!(
            from = before.soft,
            to = after.soft,
            "raised the open-files soft limit to the hard limit"
        ),
        Some(Ok(_)) | None => {}
        Some(Err(error)) => {
            tracing::warn!(error = %error, "cannot raise the open-files soft limit")
        }
    }
}

/// Warnings about a valid config (e.g. a credential file readable by others), once logging is up.
fn log_config_warnings(config: &Config) {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

fn init_logging(cfg: &LogConfig) -> Result<telemetry::LogReloadHandle, ExitCode> {
    telemetry::init(cfg).map_err(|err| {
        eprintln!("mongo-syncd: cannot set up logging: {err}");
        ExitCode::from(exit::INVALID_CONFIG)
    })
}

/// `check-config`: validate, then print the effective config with secrets redacted.
fn check_config(path: &Path) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        eprintln!("mongo-syncd: warning: {warning}");
    }
    let text = match config.redacted().to_toml() {
        Ok(text) => text,
        Err(err) => {
            eprintln!("mongo-syncd: cannot render the effective configuration: {err}");
            return ExitCode::from(exit::RUNTIME_FAILURE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let written = writeln!(
        stdout,
        "# effective configuration of {} (secrets redacted)",
        path.display()
    )
    .and_then(|()| stdout.write_all(text.as_bytes()))
    .and_then(|()| stdout.flush());
    match written {
        Ok(()) => ExitCode::from(exit::OK),
        Err(err) => {
            eprintln!("mongo-syncd: cannot write to stdout: {err}");
            ExitCode::from(exit::RUNTIME_FAILURE)
        }
    }
}

/// Builds the multi-thread runtime (`runtime.worker_threads` worker threads, see
/// [`runtime::worker_threads`]) and runs one command future on it.
fn block_on(worker_threads: usize, command: impl Future<Output = ExitCode>) -> ExitCode {
    let threads = match runtime::worker_threads_from_env(worker_threads) {
        Ok(threads) => threads,
        Err(err) => {
            eprintln!("mongo-syncd: invalid configuration: {err}");
            return ExitCode::from(exit::INVALID_CONFIG);
        }
    };
    let runtime = match runtime::build(threads) {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(exit::RUNTIME_FAILURE);
        }
    };
    tracing::info!(
        worker_threads = runtime.metrics().num_workers(),
        "async runtime started"
    );
    // Boxed: the daemon's future is large, and a boxed future keeps the main stack small.
    runtime.block_on(Box::pin(command))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index is mimalloc's purge delay: the option reads mimalloc 3's documented default
    /// (1,000 ms) before `tune_allocator` runs, and this daemon's value after.
    #[test]
    fn tune_allocator_sets_mimallocs_purge_delay() {
        #[allow(unsafe_code)]
        let read = || unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(
            read(),
            1000,
            "not mimalloc 3's purge_delay, or MIMALLOC_PURGE_DELAY is set"
        );
        tune_allocator();
        assert_eq!(read(), PURGE_DELAY_MS);
    }
}

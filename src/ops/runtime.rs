//! The async runtime the daemon runs on, and how many threads run its tasks.
//!
//! Tokio's default is one worker thread per CPU the process may use, or `TOKIO_WORKER_THREADS`
//! when that is set; tokio panics on a malformed `TOKIO_WORKER_THREADS`. `runtime.worker_threads`
//! sets the count in the config instead, and a malformed variable is a one-line error here.
//!
//! Why an operator would lower it: the daemon mostly waits on its two clusters, and on a small
//! host it shares (with a database or its agents), its threads running on every core at once
//! take CPU from its neighbours. On two cores shared with both simulators, one worker thread
//! drained a backlog ~5 % faster than two (README, Performance).

use crate::config::MAX_WORKER_THREADS;

/// The environment variable tokio reads when no count is configured.
pub const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The worker thread count to build the runtime with: `configured` (`runtime.worker_threads`)
/// when it is not 0, else `env` (`TOKIO_WORKER_THREADS`) when set, else `None` (one per CPU).
pub fn worker_threads(configured: usize, env: Option<&str>) -> Result<Option<usize>, String> {
    if configured > 0 {
        return Ok(Some(configured));
    }
    let Some(value) = env else {
        return Ok(None);
    };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKER_THREADS).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "{WORKER_THREADS_ENV}={value:?} is not a thread count: expected 1 to {MAX_WORKER_THREADS} (or unset it, or set runtime.worker_threads)"
        )),
    }
}

/// [`worker_threads`] with `TOKIO_WORKER_THREADS` read from the process's environment.
pub fn worker_threads_from_env(configured: usize) -> Result<Option<usize>, String> {
    let env = std::env::var(WORKER_THREADS_ENV).ok();
    worker_threads(configured, env.as_deref())
}

/// Builds the multi-thread runtime (threads named `mongo-syncd`) with `threads` worker threads
/// (`None`: one per CPU).
pub fn build(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("mongo-syncd");
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_count_wins_over_the_environment() {
        assert_eq!(worker_threads(3, Some("7")), Ok(Some(3)));
        assert_eq!(worker_threads(1, Some("nonsense")), Ok(Some(1)));
    }

    #[test]
    fn without_a_configured_count_the_environment_then_tokio_decide() {
        assert_eq!(worker_threads(0, Some("2")), Ok(Some(2)));
        assert_eq!(worker_threads(0, Some(" 4 ")), Ok(Some(4)));
        assert_eq!(worker_threads(0, None), Ok(None));
    }

    #[test]
    fn a_malformed_environment_value_is_an_error_not_a_panic() {
        for bad in ["", "0", "-1", "two", "1.5", "100000"] {
            let err = worker_threads(0, Some(bad)).unwrap_err();
            assert!(err.contains(WORKER_THREADS_ENV), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_runtime_runs_on_the_configured_threads() {
        let runtime = build(Some(2)).unwrap();
        assert_eq!(runtime.metrics().num_workers(), 2);
    }
}

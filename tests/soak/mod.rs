//! The randomized differential soak in CI (issue 9): `SOAK_SEEDS` seeds (default 500), in
//! rounds of `SOAK_PER_ROUND` seeds sharing one daemon, each seed in its own database. Every
//! failure prints its seed, the fault schedule, the operation log and the command that re-runs
//! it; `SOAK_OPS` / `SOAK_FAULTS` switch operation and fault kinds (`all`, `a,b`, `-a,-b`).
//! Longer runs: `cargo run --release --example soak -- --seed S --minutes M`.

pub mod engine;

use std::{path::PathBuf, time::Instant};

/// Seeds CI runs when `SOAK_SEEDS` is not set.
const CI_SEEDS: u64 = 500;
/// Operation kinds CI runs when `SOAK_OPS` is not set: all of them.
const CI_OPS: &str = "all";
/// Fault kinds CI runs when `SOAK_FAULTS` is not set: all of them (SIGKILL during copy, stream
/// and checkpoint writes, the daemon stopped across DDL, history loss, transient errors,
/// blocked writes, closed source connections).
const CI_FAULTS: &str = "all";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_seeds() {
    let opts = engine::Options::from_env(
        PathBuf::from(env!("CARGO_BIN_EXE_mongo-syncd")),
        CI_SEEDS,
        CI_OPS,
        CI_FAULTS,
    )
    .unwrap_or_else(|e| panic!("bad SOAK_* setting: {e}"));
    let started = Instant::now();
    let reports = engine::run(&opts).await;
    let totals = engine::totals(&reports);
    eprintln!(
        "{totals}\n  wall time {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    assert!(
        reports.iter().map(|r| r.seeds).sum::<u64>() == opts.seeds,
        "every seed ran"
    );
    assert!(
        failures.is_empty(),
        "{} problem report(s):\n\n{}\n\n{totals}",
        failures.len(),
        failures
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join("\n\n")
    );
}

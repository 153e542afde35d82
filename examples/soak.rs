//! The long-run driver of the randomized differential soak (issue 9).
//!
//! ```text
//! cargo build --release --bin mongo-syncd
//! cargo run --release --example soak -- --seed S --minutes M
//! cargo run --release --example soak -- --seed S --seeds N [--per-round K] [--parallel P]
//!     [--ops-per-seed O] [--ops all|a,b|-a,-b] [--faults all|none|a,b|-a,-b]
//!     [--stream-scope rotate|collection|deployment|database|auto]
//!     [--batch-events 0|N] [--verbose]
//! ```
//!
//! It runs rounds of `--per-round` seeds (one daemon, one database per seed) starting at
//! `--seed`, either `--seeds N` seeds or until `--minutes M` have passed, and prints every
//! failure (seed, fault schedule, operation log, the command that re-runs it) and the totals.
//! The daemon is the `mongo-syncd` binary beside this example's directory
//! (`target/release/mongo-syncd`), or `MONGO_SYNCD_BIN`. Exit 0 when no seed failed, 1 otherwise.

#[path = "../tests/soak/engine.rs"]
mod engine;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

fn daemon_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MONGO_SYNCD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/soak → target/<profile>/mongo-syncd
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("mongo-syncd"))
        .expect("target directory")
}

fn main() -> ExitCode {
    let bin = daemon_bin();
    if !bin.exists() {
        eprintln!(
            "{} not found: build it first (cargo build --release --bin mongo-syncd) or set MONGO_SYNCD_BIN",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let mut opts = match engine::Options::from_env(bin, 0, "", "") {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut minutes: Option<f64> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let num = |v: &str| -> u64 {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{flag} needs a number, got {v:?}");
                std::process::exit(2)
            })
        };
        let kinds = |v: &str, all: &[&'static str]| {
            engine::Kinds::parse(v, all).unwrap_or_else(|e| {
                eprintln!("{flag}: {e}");
                std::process::exit(2)
            })
        };
        match flag {
            "--seed" => opts.first_seed = num(&value),
            "--seeds" => opts.seeds = num(&value),
            "--per-round" => opts.per_round = num(&value).max(1),
            "--parallel" => opts.parallel = num(&value).max(1) as usize,
            "--ops-per-seed" => opts.ops_per_seed = num(&value) as usize,
            "--minutes" => {
                minutes = Some(value.parse().unwrap_or_else(|_| {
                    eprintln!("--minutes needs a number");
                    std::process::exit(2)
                }))
            }
            "--ops" => opts.ops = kinds(&value, engine::OP_KINDS),
            "--faults" => opts.faults = kinds(&value, engine::FAULT_KINDS),
            "--stream-scope" => {
                if value != "rotate" && !engine::STREAM_SCOPES.contains(&value.as_str()) {
                    eprintln!(
                        "--stream-scope: one of rotate, {}",
                        engine::STREAM_SCOPES.join(", ")
                    );
                    std::process::exit(2)
                }
                opts.stream_scope = value
            }
            // `apply.batch_max_events` of every round; 0 rotates through 1000, 4 and 32.
            "--batch-events" => {
                opts.batch_events = value.parse().unwrap_or_else(|_| {
                    eprintln!("--batch-events needs a number");
                    std::process::exit(2)
                })
            }
            "--verbose" => {
                opts.verbose = true;
                i += 1;
                continue;
            }
            other => {
                eprintln!(
                    "unknown argument {other:?} (see the comment at the top of examples/soak.rs)"
                );
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    if opts.seeds == 0 && minutes.is_none() {
        opts.seeds = opts.per_round;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reports = rt.block_on(async {
        let started = Instant::now();
        let mut reports = Vec::new();
        match minutes {
            None => reports = engine::run(&opts).await,
            Some(m) => {
                let until = started + Duration::from_secs_f64(m * 60.0);
                let mut next = opts.first_seed;
                while Instant::now() < until {
                    let mut o = opts.clone();
                    o.first_seed = next;
                    o.seeds = o.per_round * o.parallel as u64;
                    next += o.seeds;
                    o.verbose = true;
                    let round = engine::run(&o).await;
                    // Printed as they happen: a long run cut short still shows what it found.
                    for f in round.iter().flat_map(|r| &r.failures) {
                        println!("{f}\n");
                    }
                    reports.extend(round);
                }
            }
        }
        eprintln!("wall time {:.1}s", started.elapsed().as_secs_f64());
        reports
    });
    let failed = reports.iter().any(|r| !r.failures.is_empty());
    if minutes.is_none() {
        for f in reports.iter().flat_map(|r| &r.failures) {
            println!("{f}\n");
        }
    }
    println!("{}", engine::totals(&reports));
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

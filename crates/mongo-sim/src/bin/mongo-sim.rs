//! `mongo-sim --bind 127.0.0.1 --port 0 --replset rs0 [--oplog-max-events N]
//! [--auth-user U --auth-password P] [--data-dir DIR] [--stepdown-every SECONDS]
//! [--min-snapshot-history-window-seconds SECONDS]`
//!
//! Prints `listening on HOST:PORT` as its first stdout line, then serves until SIGTERM/SIGINT
//! (a clean stop: with `--data-dir`, a final snapshot is written).

use std::{io::Write, time::Duration};

use clap::Parser;

/// mimalloc rather than glibc malloc: under a write load the simulator frees every replaced
/// document version, and glibc spent ~40 % of its CPU there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "mongo-sim",
    version,
    about = "In-memory MongoDB replica-set simulator (test and demo tool)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Replica set name reported in `hello`.
    #[arg(long, default_value = "rs0")]
    replset: String,
    /// Oplog capacity in entries; older entries are dropped (provokes history loss).
    #[arg(long, default_value_t = 1_000_000)]
    oplog_max_events: usize,
    /// Interval of the TTL monitor in seconds.
    #[arg(long, default_value_t = 60)]
    ttl_interval_seconds: u64,
    /// Interval of the periodic no-op writes in seconds.
    #[arg(long, default_value_t = 10)]
    noop_interval_seconds: u64,
    /// Delay every reply by this many milliseconds (imitates a network round trip).
    #[arg(long, default_value_t = 0)]
    reply_delay_ms: u64,
    /// Require SCRAM-SHA-256 authentication as this user (on `admin`).
    #[arg(long, requires = "auth_password")]
    auth_user: Option<String>,
    /// Password of `--auth-user`.
    #[arg(long, requires = "auth_user")]
    auth_password: Option<String>,
    /// Keep data, indexes, oplog and replica-set identity in DIR: a restart with the same DIR
    /// (even after SIGKILL) is the same replica set. Without it everything is in memory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Fault injection: step down every SECONDS (the node is secondary for
    /// `--stepdown-for-seconds`, then primary again with a higher term).
    #[arg(long, value_name = "SECONDS")]
    stepdown_every: Option<f64>,
    /// `minSnapshotHistoryWindowInSeconds`: how far back snapshot reads with `atClusterTime`
    /// reach (also settable with the `setParameter` command).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    min_snapshot_history_window_seconds: u64,
    /// How long an automatic step-down lasts.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    stepdown_for_seconds: f64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = mongo_sim::MongoSim::builder();
    if let (Some(user), Some(password)) = (&args.auth_user, &args.auth_password) {
        builder = builder.auth(user, password);
    }
    if let Some(dir) = &args.data_dir {
        builder = builder.data_dir(dir);
    }
    if let Some(every) = args.stepdown_every {
        builder = builder.stepdown_every(
            Duration::from_secs_f64(every.max(0.1)),
            Duration::from_secs_f64(args.stepdown_for_seconds.max(0.0)),
        );
    }
    let sim = match builder
        .bind(args.bind)
        .port(args.port)
        .replica_set(args.replset)
        .oplog_max_events(args.oplog_max_events)
        .ttl_interval(Duration::from_secs(args.ttl_interval_seconds.max(1)))
        .noop_interval(Duration::from_secs(args.noop_interval_seconds.max(1)))
        .reply_delay(Duration::from_millis(args.reply_delay_ms))
        .snapshot_history_window(args.min_snapshot_history_window_seconds)
        .start()
        .await
    {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("mongo-sim: cannot start: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    println!("listening on {}", sim.host());
    let _ = std::io::stdout().flush();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    sim.shutdown().await;
    std::process::ExitCode::SUCCESS
}

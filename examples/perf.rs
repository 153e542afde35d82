//! Throughput of the daemon against ceilings measured in the same run (issue 11's evidence),
//! with both simulated replica sets in their own processes (the `mongo-sim` binary).
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release --example perf -- [--docs 200000] [--events 100000] [--naive 5000] [--rounds 3] [--ha]
//! cargo run --release --example perf -- --all
//! ```
//!
//! `--all` makes every run issue 11 asks for, one after the other, each in a process of its own
//! with fresh simulators (`ALL_RUNS`): copy and drain of 1, 4 and 8 collections, latency at
//! 2,000 and 5,000 writes/s, 100 and 1,000 collections, and a blocked destination with 4 and 64
//! backlogged namespaces.
//!
//! Printed side by side, in one run on the same two simulators:
//! - **copy ceilings**: a fast Rust client writing the same documents to the destination with
//!   `insert_many` (10,000 per call) and with replace-upserts by `_id` (1,000 per bulk);
//! - **copy of one collection** by `mongo-syncd`, from its start to the last document copied,
//!   as a ratio of the `insert_many` ceiling (target ≥ 0.5);
//! - **drain ceiling**: the statements the daemon sends for a backlog of `$inc` updates (`$set`
//!   of the field by `_id`, unordered bulks of 1,000) sent by a fast client;
//! - **drain of one collection**: the daemon restarted over that backlog, from its start to the
//!   last event applied, as a ratio of the drain ceiling (target ≥ 0.9). The machine is noisy
//!   (one ceiling moved 15 % between two runs, and up to 16 % between a measurement right
//!   before a drain and one right after it), so the ceiling is measured on both sides of each
//!   drain and the ratio is to their mean (the ratio to the one before is printed too), and
//!   `--rounds R` (default 3) repeats backlog, ceiling and drain R times and reports the round
//!   of the median ratio, with every round's, and where that round's CPU went (shares of one
//!   core: the destination simulator during the first ceiling and during the drain, the source
//!   simulator and the daemon during the drain), and the share of the machine's CPU time the
//!   hypervisor stole in the ceiling and in each drain (`/proc/stat`'s `steal`: on a shared
//!   host it slows whichever phase it falls in);
//! - **the drain ceiling in lanes**: the same statements with each bulk of 1,000 sent as 4
//!   concurrent commands of 250, as `apply.write_lanes = 4` cuts a batch, against the usual
//!   ceiling measured right before and after it: what concurrent commands cost the simulator,
//!   which runs each write command whole under one lock (`auto`, the default, measures this
//!   per worker and keeps the faster count);
//! - **naive loops**: one `update_one` per event from a fast Rust client that reads no stream,
//!   and the naive replicator the issue measured (`examples/naive_replicator.py`: PyMongo reads
//!   the backlog's change stream and writes each event with one acknowledged `update_one`); the
//!   daemon's drain as a multiple of each (target ≥ 12 against the replicator). The replicator
//!   runs when a Python with PyMongo is found (`PERF_PYTHON`, else the workspace's `.venv`).
//!
//! The machine is shared and the simulator is the limit: read the ratios, not the absolutes.
//!
//! `--ha` also drains the same backlog again with `ha.enabled`, once with `ha.fencing = "lease"`
//! and once with `"transaction"`, and prints each one's ratio to the ceiling and to the drain
//! without HA; then copies the same documents into three fresh collections, without HA and
//! with each mode.
//! `--spread N` runs the copy and the drain over N collections (the same totals);
//! `--latency 2000,5000` measures replication latency at those write rates;
//! `--memory K` measures peak RSS with a blocked destination and K backlogged namespaces.
//! `--write-lanes auto,4,1` alternates the drain rounds between those `apply.write_lanes` and
//! prints each one's rows, so lane counts are compared against the same ceilings in one run.
//! `--timeline` runs the drains with the daemon's bulk writes traced and prints, for the round
//! of the median, how long the destination had no command of the daemon to run (the gaps
//! between batches) and the rate while it had one, against the ceiling; tracing costs the
//! daemon some CPU, so that run's drain figures are not the ones to compare.
//! `PERF_DAEMON_THREADS=N` runs every daemon of the run with N worker threads
//! (`TOKIO_WORKER_THREADS`, as `runtime.worker_threads` would); the output's first line says
//! which.
//!
//! `--collections N [--stream-scope S]` measures scale instead (issue 11's 100 / 1,000
//! collections): N collections of one document, the time until every namespace streams, then
//! over a quiet window the source connections the daemon holds, its CPU, its checkpoint writes
//! per second, and the latency of single writes to random quiet collections (p50, p99, max).

use std::future::IntoFuture;
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bson::{doc, Document};
use mongodb::Client;

const DB: &str = "perf";
const COLL: &str = "docs";

struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim(bin: &Path, set: &str) -> (Process, String) {
    let mut child = Command::new(bin)
        .args([
            "--port",
            "0",
            "--replset",
            set,
            "--noop-interval-seconds",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let host = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line from mongo-sim: {line:?}"))
        .to_string();
    (
        Process { child },
        format!("mongodb://{host}/?replicaSet={set}"),
    )
}

fn document(i: i64) -> Document {
    doc! {
        "_id": i,
        "name": format!("customer-{i:08}"),
        "email": format!("customer{i}@example.com"),
        "balance": (i % 10_000) as f64 / 100.0,
        "active": i % 3 != 0,
        "tags": ["alpha", "beta", format!("t{}", i % 97)],
        "address": {"street": format!("{} Main St", i % 1000), "city": "Springfield", "zip": format!("{:05}", i % 100_000)},
        "visits": 0,
    }
}

async fn insert_all(client: &Client, coll: &str, docs: i64) -> Duration {
    let coll = client.database(DB).collection::<Document>(coll);
    let started = Instant::now();
    let mut start = 0;
    while start < docs {
        let end = (start + 10_000).min(docs);
        coll.insert_many((start..end).map(document).collect::<Vec<_>>())
            .await
            .unwrap();
        start = end;
    }
    started.elapsed()
}

/// Sends `statements` as unordered `update` bulks of 1,000 with majority write concern, one
/// command at a time.
async fn bulk_update(client: &Client, coll: &str, statements: Vec<Document>) -> Duration {
    bulk_update_in_lanes(client, coll, statements, 1).await
}

/// Sends `statements` as unordered `update` bulks of 1,000 with majority write concern, each
/// cut into `lanes` commands sent at once, as the daemon cuts a batch (`apply.write_lanes`).
async fn bulk_update_in_lanes(
    client: &Client,
    coll: &str,
    statements: Vec<Document>,
    lanes: usize,
) -> Duration {
    let db = client.database(DB);
    let started = Instant::now();
    for chunk in statements.chunks(1_000) {
        let per_lane = chunk.len().div_ceil(lanes);
        let commands = chunk.chunks(per_lane).map(|part| {
            db.run_command(doc! {
                "update": coll,
                "updates": part.to_vec(),
                "ordered": false,
                "writeConcern": {"w": "majority", "j": true},
            })
            .into_future()
        });
        for r in futures::future::join_all(commands).await {
            let r = r.unwrap();
            assert!(!r.contains_key("writeErrors"), "{r}");
        }
    }
    started.elapsed()
}

/// How long to wait before polling a counter again that stood at `value` after `elapsed`
/// and must reach `target`: half the time the rest should take at the rate so far, within
/// 2–100 ms (20 ms before it moves). Each poll costs the daemon being measured a metrics
/// render; this keeps polls to a few per second while the end is still seen within a few ms.
fn poll_pause(value: f64, target: f64, elapsed: Duration) -> Duration {
    if value <= 0.0 {
        return Duration::from_millis(20);
    }
    let rate = value / elapsed.as_secs_f64().max(1e-3);
    Duration::from_secs_f64(((target - value) / rate / 2.0).clamp(0.002, 0.1))
}

/// The `_id` the `k`-th backlog event updates (spread over the collection, repeats included).
fn event_id(k: i64, docs: i64) -> i64 {
    (k * 7_919) % docs
}

fn rate(n: i64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

struct Daemon {
    process: Process,
    http: String,
    /// One keep-alive client for every poll: a new connection per poll would cost the daemon
    /// (and this process) more than the work being measured needs.
    client: reqwest::Client,
}

fn start_daemon(bin: &Path, dir: &Path, source: &str, dest: &str) -> Daemon {
    start_daemon_with(bin, dir, source, dest, &format!("\"{DB}.{COLL}\""), "auto")
}

fn start_daemon_with(
    bin: &Path,
    dir: &Path,
    source: &str,
    dest: &str,
    namespaces: &str,
    scope: &str,
) -> Daemon {
    spawn_daemon(bin, dir, source, dest, namespaces, scope, "")
}

/// The default daemon with `ha.enabled` (lease fencing, a 15 s lease, every destination write
/// bounded by a 5 s socket timeout): the cost of HA, side by side with [`start_daemon`].
/// `fencing`: `ha.fencing`, `lease` or `transaction`.
fn start_daemon_ha(bin: &Path, dir: &Path, source: &str, dest: &str, fencing: &str) -> Daemon {
    spawn_daemon(
        bin,
        dir,
        source,
        dest,
        &format!("\"{DB}.{COLL}\""),
        "auto",
        &ha_settings(fencing),
    )
}

/// The `[ha]` section of the HA runs: a 15 s lease and `fencing` (`lease` or `transaction`).
fn ha_settings(fencing: &str) -> String {
    format!("[ha]\nenabled = true\nlease_seconds = 15\nfencing = \"{fencing}\"\n")
}

/// A backlog of `events` `$inc` updates spread over `docs` documents (repeats included).
fn inc_statements(events: i64, docs: i64) -> Vec<Document> {
    (0..events)
        .map(|k| doc! {"q": {"_id": event_id(k, docs)}, "u": {"$inc": {"visits": 1}}})
        .collect()
}

fn spawn_daemon(
    bin: &Path,
    dir: &Path,
    source: &str,
    dest: &str,
    namespaces: &str,
    scope: &str,
    extra: &str,
) -> Daemon {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("perf.toml");
    let write_bound = if extra.contains("[ha]") {
        "socket_timeout_ms = 5000\n"
    } else {
        ""
    };
    std::fs::write(
        &config,
        format!(
            "[source]\nuri = \"{source}\"\nstream_scope = \"{scope}\"\n\n[destination]\nuri = \"{dest}\"\n{write_bound}\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[sync]\nnamespaces = [{namespaces}]\n\n[validation]\ninterval_seconds = 0\n\n[log]\nlevel = \"info\"\n\n{extra}",
        ),
    )
    .unwrap();
    // The daemon's log, for a run that goes wrong: PERF_DAEMON_LOG=path.
    let log = match std::env::var("PERF_DAEMON_LOG") {
        Ok(path) => Stdio::from(std::fs::File::create(path).expect("PERF_DAEMON_LOG is writable")),
        Err(_) => Stdio::null(),
    };
    let mut command = Command::new(bin);
    command.args(["run", "--config"]).arg(&config);
    // The daemon's worker threads (`runtime.worker_threads`), for A/B runs: PERF_DAEMON_THREADS=N.
    if let Ok(threads) = std::env::var("PERF_DAEMON_THREADS") {
        command.env("TOKIO_WORKER_THREADS", threads);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("mongo-syncd starts");
    Daemon {
        process: Process { child },
        http: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
    }
}

impl Daemon {
    /// A GET of `path` on the daemon's HTTP listener, over the kept-alive connection.
    async fn get(&self, path: &str) -> Option<reqwest::Response> {
        self.client
            .get(format!("{}{path}", self.http))
            .send()
            .await
            .ok()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let body = self.get("/metrics").await?.text().await.ok()?;
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .reduce(|a, b| a + b)
    }

    /// Waits (bounded) until the series `name` sums to at least `at_least`.
    async fn wait_metric(&self, name: &str, at_least: f64, bound: Duration) {
        let started = Instant::now();
        loop {
            let value = self.metric(name).await.unwrap_or(0.0);
            if value >= at_least {
                return;
            }
            assert!(
                started.elapsed() < bound,
                "{name} did not reach {at_least} within {bound:?}"
            );
            tokio::time::sleep(poll_pause(value, at_least, started.elapsed())).await;
        }
    }

    /// Sum of the series starting with `prefix` whose line also contains `containing`.
    async fn metric_matching(&self, prefix: &str, containing: &str) -> f64 {
        let Some(resp) = self.get("/metrics").await else {
            return 0.0;
        };
        let body = resp.text().await.unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(containing))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }

    /// Namespaces whose status says they read the change stream `name`.
    async fn namespaces_reading(&self, name: &str) -> usize {
        let Some(resp) = self.get("/api/v1/status").await else {
            return 0;
        };
        let Ok(status) = resp.json::<serde_json::Value>().await else {
            return 0;
        };
        status["namespaces"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter(|n| n["change_stream"].as_str() == Some(name))
                    .count()
            })
            .unwrap_or(0)
    }

    async fn stop(self) {
        let pid = self.process.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let mut process = self.process;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = process.child.wait();
            process
        })
        .await;
    }
}

/// `serverStatus` of a simulator.
async fn server_status(client: &Client) -> Document {
    client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap()
}

fn int(d: &Document, path: &[&str]) -> i64 {
    let mut cur = d;
    for key in &path[..path.len() - 1] {
        cur = cur.get_document(key).unwrap();
    }
    match cur.get(path[path.len() - 1]) {
        Some(bson::Bson::Int32(n)) => *n as i64,
        Some(bson::Bson::Int64(n)) => *n,
        other => panic!("{path:?}: {other:?}"),
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the file; 12 and 13 after the command name and state.
    (ticks(11) + ticks(12)) / 100.0
}

/// The machine's CPU ticks so far: (stolen by the hypervisor, all), from `/proc/stat`'s first
/// line (`cpu user nice system idle iowait irq softirq steal ...`).
fn host_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    (ticks.get(7).copied().unwrap_or(0), ticks.iter().sum())
}

/// The share of the machine's CPU time the hypervisor stole since `before` (a shared host
/// takes it from whichever process runs: one source of the noise between rounds).
fn stolen_since(before: (u64, u64)) -> f64 {
    let (steal, total) = host_ticks();
    let all = total.saturating_sub(before.1);
    if all == 0 {
        return 0.0;
    }
    steal.saturating_sub(before.0) as f64 / all as f64
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The scale measurement (`--collections N`).
async fn scale(daemon_bin: &Path, source_uri: &str, dest_uri: &str, collections: i64, scope: &str) {
    let work = tempfile::tempdir().unwrap();
    let src = Client::with_uri_str(source_uri).await.unwrap();
    let dst = Client::with_uri_str(dest_uri).await.unwrap();
    let db = "scale";
    for i in 0..collections {
        src.database(db)
            .collection::<Document>(&format!("c{i:04}"))
            .insert_one(doc! {"_id": 0})
            .await
            .unwrap();
    }
    let baseline = int(&server_status(&src).await, &["connections", "current"]);
    let started = Instant::now();
    let daemon = start_daemon_with(
        daemon_bin,
        work.path(),
        source_uri,
        dest_uri,
        &format!("\"{db}.*\""),
        scope,
    );
    let bound = Duration::from_secs(900);
    loop {
        let streaming = daemon
            .metric_matching("mongo_syncd_worker_state{", "state=\"streaming\"")
            .await;
        if streaming >= collections as f64 {
            break;
        }
        assert!(
            started.elapsed() < bound,
            "not all streaming after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_streaming = started.elapsed();
    // Under a shared stream: until every namespace has joined it.
    if scope != "collection" {
        loop {
            let joined = daemon.namespaces_reading("deployment").await;
            if joined >= collections as usize {
                break;
            }
            assert!(
                started.elapsed() < bound,
                "only {joined} joined after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let all_joined = started.elapsed();
    // Let joins and copies settle, and the connections the start-up burst opened close
    // (`max_idle_time_ms`, 30 s by default): until the count has not changed for 35 s, at
    // most 120 s. (Not "until it is within the target": that would read the first count at
    // the target, whatever the daemon settles to.)
    let settling = Instant::now();
    let mut count = int(&server_status(&src).await, &["connections", "current"]);
    let mut changed = Instant::now();
    while settling.elapsed() < Duration::from_secs(120)
        && changed.elapsed() < Duration::from_secs(35)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = int(&server_status(&src).await, &["connections", "current"]);
        if now != count {
            count = now;
            changed = Instant::now();
        }
    }
    let connections_settled = started.elapsed() - changed.elapsed();
    let window = Duration::from_secs(10);
    let pid = daemon.process.child.id();
    let (cpu0, upd0) = (
        cpu_seconds(pid),
        int(&server_status(&dst).await, &["opcounters", "update"]),
    );
    tokio::time::sleep(window).await;
    let (cpu1, upd1) = (
        cpu_seconds(pid),
        int(&server_status(&dst).await, &["opcounters", "update"]),
    );
    let connections = int(&server_status(&src).await, &["connections", "current"]) - baseline;
    let idle_cpu = (cpu1 - cpu0) / window.as_secs_f64();
    let idle_writes = (upd1 - upd0) as f64 / window.as_secs_f64();
    // Single writes to random quiet collections: time until each is on the destination.
    let mut latencies = Vec::new();
    for k in 0..100i64 {
        let name = format!("c{:04}", (k * 7919) % collections);
        let id = format!("probe{k}");
        let written = Instant::now();
        src.database(db)
            .collection::<Document>(&name)
            .insert_one(doc! {"_id": &id})
            .await
            .unwrap();
        let target = dst.database(db).collection::<Document>(&name);
        loop {
            if target.find_one(doc! {"_id": &id}).await.unwrap().is_some() {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(60),
                "{name} {id} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(written.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    daemon.stop().await;
    println!("| {collections} collections, stream_scope {scope} | value |");
    println!("| --- | ---: |");
    println!(
        "| time until every namespace streams | {:.1} s |",
        all_streaming.as_secs_f64()
    );
    println!(
        "| time until every namespace reads the shared stream | {:.1} s |",
        all_joined.as_secs_f64()
    );
    println!(
        "| time until the source connections settle (their last change; then unchanged for 35 s, looked at up to 120 s after joining) | {:.1} s |",
        connections_settled.as_secs_f64()
    );
    println!("| source connections held (idle) | {connections} (target ≤ 10) |");
    println!(
        "| daemon CPU while idle | {:.1} % of a core (target < 5) |",
        idle_cpu * 100.0
    );
    println!("| destination update statements while idle | {idle_writes:.1} /s (target ≤ 2) |");
    println!(
        "| single write to a quiet collection, p50 / p99 / max | {:.0} / {:.0} / {:.0} ms (target p99 < 200) |",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
}

/// `--name 2000,5000` as numbers (empty when absent).
fn list_arg(args: &[String], name: &str) -> Vec<i64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{name} N[,N...]"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `--write-lanes auto,4,1`: the `apply.write_lanes` values to alternate, as TOML values.
fn write_lanes_arg(args: &[String]) -> Vec<String> {
    args.iter()
        .position(|a| a == "--write-lanes")
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .map(|w| match w.trim() {
                    "auto" => "\"auto\"".to_string(),
                    n => {
                        n.parse::<u32>()
                            .unwrap_or_else(|_| panic!("--write-lanes auto|N[,auto|N...]"));
                        n.to_string()
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Replication latency at steady write rates (`--latency 2000,5000`): for each rate, 10 s of
/// single-document inserts into one streaming collection, paced by 8 writers; each insert's
/// latency is from just before the client sends it to the moment a change stream on the
/// destination reports it (so it includes that stream's own notification delay: an upper
/// bound of the daemon's).
async fn latency(daemon_bin: &Path, source_uri: &str, dest_uri: &str, rates: &[i64]) {
    let work = tempfile::tempdir().unwrap();
    let src = Client::with_uri_str(source_uri).await.unwrap();
    let dst = Client::with_uri_str(dest_uri).await.unwrap();
    let coll = "latency";
    src.database(DB)
        .collection::<Document>(coll)
        .insert_one(doc! {"_id": "seed"})
        .await
        .unwrap();
    let daemon = start_daemon_with(
        daemon_bin,
        work.path(),
        source_uri,
        dest_uri,
        &format!("\"{DB}.{coll}\""),
        "auto",
    );
    daemon
        .wait_metric(
            &format!("mongo_syncd_worker_state{{namespace=\"{DB}.{coll}\",state=\"streaming\"}}"),
            1.0,
            Duration::from_secs(120),
        )
        .await;
    println!("| write rate (ops/s) | achieved | p50 | p99 | max | target |");
    println!("| ---: | ---: | ---: | ---: | ---: | --- |");
    for (round, &rate_wanted) in rates.iter().enumerate() {
        let seconds = 10u64;
        let total = rate_wanted as u64 * seconds;
        let sent: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, Instant>>> =
            Default::default();
        // Arrivals, from a change stream on the destination collection.
        let mut stream = dst
            .database(DB)
            .collection::<Document>(coll)
            .watch()
            .await
            .unwrap();
        let base = (round as i64 + 1) * 10_000_000;
        let watcher = {
            let sent = std::sync::Arc::clone(&sent);
            tokio::spawn(async move {
                use futures::StreamExt;
                let mut latencies = Vec::with_capacity(total as usize);
                while (latencies.len() as u64) < total {
                    let Some(Ok(ev)) = stream.next().await else {
                        break;
                    };
                    let arrived = Instant::now();
                    let id = ev.document_key.as_ref().and_then(|k| k.get_i64("_id").ok());
                    if let Some(id) = id.filter(|id| *id >= base) {
                        if let Some(at) = sent.lock().unwrap().remove(&id) {
                            latencies.push(arrived - at);
                        }
                    }
                }
                latencies
            })
        };
        let writers = 8u64;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..writers {
            let coll = src.database(DB).collection::<Document>(coll);
            let sent = std::sync::Arc::clone(&sent);
            let per_writer = total / writers;
            let period = Duration::from_secs_f64(writers as f64 / rate_wanted as f64);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for k in 0..per_writer {
                    tick.tick().await;
                    let id = base + (k * writers + w) as i64;
                    sent.lock().unwrap().insert(id, Instant::now());
                    coll.insert_one(doc! {"_id": id, "w": w as i64})
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let achieved = (total / writers * writers) as f64 / started.elapsed().as_secs_f64();
        let mut latencies = tokio::time::timeout(Duration::from_secs(120), watcher)
            .await
            .expect("every insert arrives within 2 minutes")
            .unwrap();
        latencies.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "| {rate_wanted} | {achieved:.0} | {:.1} ms | {:.1} ms | {:.1} ms | p99 < 50 ms at 5,000 |",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        );
    }
    daemon.stop().await;
}

/// Peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Memory with a blocked destination (`--memory K [--memory-writes N]`): K streaming
/// namespaces, the destination then holding every daemon write, and N updates spread over the
/// K collections on the source; the daemon's peak RSS against `apply.max_buffered_bytes` (the
/// default, 256 MiB) + 64 MiB.
async fn memory(daemon_bin: &Path, source_uri: &str, dest_uri: &str, namespaces: i64, writes: i64) {
    let work = tempfile::tempdir().unwrap();
    let src = Client::with_uri_str(source_uri).await.unwrap();
    let dst = Client::with_uri_str(dest_uri).await.unwrap();
    let db = "memory";
    let per = 1_000i64;
    for n in 0..namespaces {
        let docs: Vec<Document> = (0..per).map(document).collect();
        src.database(db)
            .collection::<Document>(&format!("m{n:03}"))
            .insert_many(docs)
            .await
            .unwrap();
    }
    let daemon = start_daemon_with(
        daemon_bin,
        work.path(),
        source_uri,
        dest_uri,
        &format!("\"{db}.*\""),
        "auto",
    );
    let started = Instant::now();
    while daemon
        .metric_matching("mongo_syncd_worker_state{", "state=\"streaming\"")
        .await
        < namespaces as f64
    {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = daemon.process.child.id();
    let before = peak_rss(pid);
    dst.database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["update", "insert", "delete"], "appName": "mongo-syncd", "blockConnection": true, "blockTimeMS": 120_000},
        })
        .await
        .unwrap();
    // A padded `$set`, so the backlog's bytes (not only its count) are large.
    let pad = "x".repeat(200);
    let mut written = 0i64;
    let write_started = Instant::now();
    while written < writes {
        let n = written % namespaces;
        let statements: Vec<Document> = (0..1_000)
            .map(|k| doc! {"q": {"_id": (written + k) / namespaces % per}, "u": {"$set": {"pad": &pad, "k": written + k}}})
            .collect();
        src.database(db)
            .run_command(
                doc! {"update": format!("m{n:03}"), "updates": statements, "ordered": false},
            )
            .await
            .unwrap();
        written += 1_000;
    }
    let write_time = write_started.elapsed();
    // Let the readers fill the budget, then read the peak.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let peak = peak_rss(pid);
    let read = daemon
        .metric("mongo_syncd_events_read_total")
        .await
        .unwrap_or(0.0);
    let applied = daemon
        .metric("mongo_syncd_events_applied_total")
        .await
        .unwrap_or(0.0);
    let buffered = daemon
        .metric("mongo_syncd_buffered_bytes")
        .await
        .unwrap_or(0.0);
    let budget = daemon
        .metric("mongo_syncd_buffer_budget_bytes")
        .await
        .unwrap_or(0.0);
    dst.database("admin")
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .await
        .unwrap();
    daemon.stop().await;
    let mib = |b: f64| b / 1024.0 / 1024.0;
    println!("| blocked destination, {namespaces} backlogged namespaces | value |");
    println!("| --- | ---: |");
    println!(
        "| source updates written while blocked | {writes} in {:.1} s |",
        write_time.as_secs_f64()
    );
    println!("| events read / applied by the workers (the destination holds every write) | {read:.0} / {applied:.0} |");
    println!(
        "| peak RSS before the block | {:.0} MiB |",
        mib(before as f64)
    );
    println!(
        "| peak RSS with the backlog | {:.0} MiB (target ≤ budget + 64 = {:.0} MiB) |",
        mib(peak as f64),
        mib(budget) + 64.0
    );
    println!(
        "| read ahead at the end (mongo_syncd_buffered_bytes / budget) | {:.0} / {:.0} MiB |",
        mib(buffered),
        mib(budget)
    );
}

/// One round of a drain: a backlog written while the daemon is stopped, its ceiling, and the
/// daemon's drain of it.
#[derive(Clone)]
struct DrainRound {
    /// The drain's statements from a fast client, right before the drain and right after it.
    ceiling_before: f64,
    ceiling_after: f64,
    /// A fast client reading the backlog's change stream.
    read: f64,
    drain: f64,
    /// Share of one core the destination simulator used while the ceiling ran, and while the
    /// daemon drained; the source simulator's and the daemon's during the drain.
    cpu: RoundCpu,
    /// Daemon process start to the first event applied.
    startup: Duration,
    total: Duration,
    /// The source's operation time right before the round's backlog was written.
    backlog_start: bson::Timestamp,
}

impl DrainRound {
    /// The ceiling over the drain's window: the mean of the measurements on either side.
    fn ceiling(&self) -> f64 {
        (self.ceiling_before + self.ceiling_after) / 2.0
    }

    fn ratio(&self) -> f64 {
        self.drain / self.ceiling()
    }
}

/// Round `round` of a drain over the collections `names` (`docs_each` documents each): a
/// backlog of `events_each` `$inc` updates per collection while the daemon is stopped; the
/// ceiling, the same number of `$set`s by `_id` (the statements the daemon sends) from a fast
/// client on `ceiling_drain` (`docs` documents; the values change every round, so every round
/// writes, and from the second one on both sides update a field that exists); then the
/// daemon (`start`) from its start to the last event applied; then the ceiling again.
#[allow(clippy::too_many_arguments)]
async fn drain_round(
    round: i64,
    src: &Client,
    dst: &Client,
    names: &[String],
    docs_each: i64,
    events_each: i64,
    docs: i64,
    sims: SimPids,
    start: &dyn Fn() -> Daemon,
) -> DrainRound {
    let backlog_start = operation_time(src).await;
    for name in names {
        bulk_update(src, name, inc_statements(events_each, docs_each)).await;
    }
    let events = events_each * names.len() as i64;
    let statements: Vec<Document> = (0..events)
        .map(|k| doc! {"q": {"_id": event_id(k, docs)}, "u": {"$set": {"visits": k + round * events}}})
        .collect();
    let (dest_before, host_before) = (cpu_seconds(sims.dest), host_ticks());
    let ceiling_took = bulk_update(dst, "ceiling_drain", statements).await;
    let dest_in_ceiling = (cpu_seconds(sims.dest) - dest_before) / ceiling_took.as_secs_f64();
    let stolen_in_ceiling = stolen_since(host_before);
    let ceiling_before = rate(events, ceiling_took);
    let read = read_ceiling(src, names, backlog_start, events).await;
    let (dest_before, source_before) = (cpu_seconds(sims.dest), cpu_seconds(sims.source));
    let host_before = host_ticks();
    let daemon = start();
    let started = Instant::now();
    daemon
        .wait_metric(
            "mongo_syncd_events_applied_total",
            1.0,
            Duration::from_secs(600),
        )
        .await;
    let startup = started.elapsed();
    daemon
        .wait_metric(
            "mongo_syncd_events_applied_total",
            events as f64,
            Duration::from_secs(600),
        )
        .await;
    let total = started.elapsed();
    let busy = |before: f64, pid: u32| (cpu_seconds(pid) - before) / total.as_secs_f64();
    let cpu = RoundCpu {
        dest_in_ceiling,
        dest_in_drain: busy(dest_before, sims.dest),
        source_in_drain: busy(source_before, sims.source),
        daemon_in_drain: busy(0.0, daemon.process.child.id()),
        stolen_in_ceiling,
        stolen_in_drain: stolen_since(host_before),
    };
    daemon.stop().await;
    // The same statements with other values, so every one of them writes again.
    let statements: Vec<Document> = (0..events)
        .map(|k| doc! {"q": {"_id": event_id(k, docs)}, "u": {"$set": {"visits": -(k + round * events)}}})
        .collect();
    let ceiling_after = rate(events, bulk_update(dst, "ceiling_drain", statements).await);
    DrainRound {
        ceiling_before,
        ceiling_after,
        read,
        cpu,
        drain: rate(events, total),
        startup,
        total,
        backlog_start,
    }
}

/// How fast a client reads the `events` change events of the collections `names` written
/// since `from`: one database change stream, `batchSize` 1,000 (the daemon's), each event
/// taken as raw BSON. The drain cannot be faster than this either.
async fn read_ceiling(src: &Client, names: &[String], from: bson::Timestamp, events: i64) -> f64 {
    use futures::StreamExt;
    let started = Instant::now();
    let mut stream = src
        .database(DB)
        .watch()
        .pipeline([doc! {"$match": {"ns.coll": {"$in": names}}}])
        .start_at_operation_time(from)
        .batch_size(1_000)
        .await
        .unwrap()
        .with_type::<bson::RawDocumentBuf>();
    for _ in 0..events {
        stream
            .next()
            .await
            .expect("the change stream ended")
            .unwrap();
    }
    rate(events, started.elapsed())
}

/// Where the CPU went in one drain round, as shares of one core.
#[derive(Clone, Copy, Default)]
struct RoundCpu {
    dest_in_ceiling: f64,
    dest_in_drain: f64,
    source_in_drain: f64,
    daemon_in_drain: f64,
    /// Shares of the machine's CPU time stolen by the hypervisor.
    stolen_in_ceiling: f64,
    stolen_in_drain: f64,
}

/// The simulators' process ids, for CPU accounting.
#[derive(Clone, Copy)]
struct SimPids {
    source: u32,
    dest: u32,
}

/// The round of median ratio (rounds sorted by ratio; the lower middle of an even count).
fn median_round(rounds: &[DrainRound]) -> &DrainRound {
    let mut order: Vec<&DrainRound> = rounds.iter().collect();
    order.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    order[(order.len() - 1) / 2]
}

/// The drain rows of the table: the median round, and every round's ratio.
fn print_drain(what: &str, events: i64, rounds: &[DrainRound]) {
    let m = median_round(rounds);
    let all: Vec<String> = rounds.iter().map(|r| format!("{:.2}", r.ratio())).collect();
    let to_before: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.drain / r.ceiling_before))
        .collect();
    println!(
        "| ceiling: the drain's statements, {events} events (round of the median ratio) | {:.0} | mean of {:.0} right before the drain and {:.0} right after it |",
        m.ceiling(),
        m.ceiling_before,
        m.ceiling_after
    );
    println!(
        "| mongo-syncd drain, {what} | {:.0} | {:.2}× the ceiling, median of {} rounds (target ≥ 0.9); every round: {}; to the ceiling before the drain only: {} |",
        m.drain,
        m.ratio(),
        rounds.len(),
        all.join(", "),
        to_before.join(", ")
    );
    println!(
        "| of which: process start to the first event applied | {:.0} ms of {:.0} ms | past it: {:.2}× the ceiling |",
        m.startup.as_secs_f64() * 1e3,
        m.total.as_secs_f64() * 1e3,
        rate(events, m.total.saturating_sub(m.startup)) / m.ceiling()
    );
    let reads: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2}", r.drain / r.read.min(r.ceiling())))
        .collect();
    println!(
        "| read ceiling: a fast client reading the backlog's change stream (same round) | {:.0} | drain = {:.2}× the slower of the two ceilings; every round: {} |",
        m.read,
        m.drain / m.read.min(m.ceiling()),
        reads.join(", ")
    );
    println!(
        "| CPU, shares of one core (same round) | | destination simulator: {:.2} in the ceiling, {:.2} in the drain; source simulator {:.2}, daemon {:.2} in the drain |",
        m.cpu.dest_in_ceiling, m.cpu.dest_in_drain, m.cpu.source_in_drain, m.cpu.daemon_in_drain
    );
    let stolen: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.1}", r.cpu.stolen_in_drain * 100.0))
        .collect();
    println!(
        "| CPU time the hypervisor stole from this machine (same round) | | {:.1} % in the ceiling before the drain, {:.1} % in the drain; in every round's drain: {} % |",
        m.cpu.stolen_in_ceiling * 100.0,
        m.cpu.stolen_in_drain * 100.0,
        stolen.join(", ")
    );
}

/// Copy and drain spread over several collections (`--spread N`): the same documents and
/// events as the one-collection run, cut into N collections, against the same ceilings.
#[allow(clippy::too_many_arguments)]
async fn spread_over(
    daemon_bin: &Path,
    source_uri: &str,
    dest_uri: &str,
    sims: SimPids,
    collections: i64,
    docs: i64,
    events: i64,
    repeats: i64,
) {
    let work = tempfile::tempdir().unwrap();
    let src = Client::with_uri_str(source_uri).await.unwrap();
    let dst = Client::with_uri_str(dest_uri).await.unwrap();
    let insert_ceiling = rate(docs, insert_all(&dst, "ceiling_insert", docs).await);
    let per = docs / collections;
    let names: Vec<String> = (0..collections).map(|n| format!("s{n:02}")).collect();
    for name in &names {
        insert_all(&src, name, per).await;
    }
    let patterns = names
        .iter()
        .map(|n| format!("\"{DB}.{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let daemon = start_daemon_with(
        daemon_bin,
        work.path(),
        source_uri,
        dest_uri,
        &patterns,
        "auto",
    );
    let started = Instant::now();
    daemon
        .wait_metric(
            "mongo_syncd_initial_sync_documents_copied_total",
            (per * collections) as f64,
            Duration::from_secs(600),
        )
        .await;
    let copy = rate(per * collections, started.elapsed());
    while daemon
        .metric_matching("mongo_syncd_worker_state{", "state=\"streaming\"")
        .await
        < collections as f64
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
    // Rounds of a backlog spread evenly, written while the daemon is stopped.
    insert_all(&dst, "ceiling_drain", docs).await;
    let per_events = events / collections;
    let start = || {
        start_daemon_with(
            daemon_bin,
            work.path(),
            source_uri,
            dest_uri,
            &patterns,
            "auto",
        )
    };
    let mut rounds = Vec::new();
    for round in 0..repeats {
        rounds.push(
            drain_round(
                round, &src, &dst, &names, per, per_events, docs, sims, &start,
            )
            .await,
        );
    }
    println!("| {collections} collections | per second | ratio |");
    println!("| --- | ---: | --- |");
    println!("| ceiling: insert_many, {docs} documents | {insert_ceiling:.0} | |");
    println!(
        "| mongo-syncd copy, {collections} collections | {copy:.0} | {:.2}× insert_many |",
        copy / insert_ceiling
    );
    print_drain(
        &format!("{collections} collections"),
        per_events * collections,
        &rounds,
    );
}

/// When the daemon had bulk commands outstanding at the destination during one drain, rebuilt
/// from its `bulk ...` trace lines (each one's end time and `elapsed_us`).
struct CommandTimeline {
    statements: u64,
    /// From the first command sent to the last reply.
    window: Duration,
    /// The spans with at least one command outstanding.
    busy: Duration,
    /// The spans between two busy ones: the destination had no command of the daemon to run.
    gaps: Vec<Duration>,
}

impl CommandTimeline {
    fn of_log(log: &str) -> CommandTimeline {
        let mut spans: Vec<(f64, f64)> = Vec::new();
        let mut statements = 0;
        let mut day_offset = 0.0;
        let mut last_end = f64::MIN;
        for line in log.lines().filter(|l| l.contains(" bulk ")) {
            let (Some(at), Some(n), Some(us)) = (
                seconds_of_day(line),
                field(line, "statements="),
                field(line, "elapsed_us="),
            ) else {
                continue;
            };
            if at + day_offset < last_end - 43_200.0 {
                day_offset += 86_400.0; // the run passed midnight
            }
            let end = at + day_offset;
            last_end = end;
            spans.push((end - us as f64 / 1e6, end));
            statements += n;
        }
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut merged: Vec<(f64, f64)> = Vec::new();
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
        CommandTimeline {
            statements,
            window: match (merged.first(), merged.last()) {
                (Some(first), Some(last)) => secs(last.1 - first.0),
                _ => Duration::ZERO,
            },
            busy: merged.iter().map(|(s, e)| secs(e - s)).sum(),
            gaps: merged.windows(2).map(|w| secs(w[1].0 - w[0].1)).collect(),
        }
    }
}

/// `HH:MM:SS.ffffff` of a log line that starts with an RFC 3339 timestamp, in seconds.
fn seconds_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The number after `name` (e.g. `statements=`) in a log line.
fn field(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(name)? + name.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn print_timeline(t: &CommandTimeline, ceiling: f64) {
    let mut gaps = t.gaps.clone();
    gaps.sort();
    let idle: Duration = gaps.iter().sum();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| timeline (round of the median, traced): destination without a command of the daemon | {:.1} ms of {:.1} ms ({:.1} %) | {} gaps between busy spans: median {:.2} ms, p90 {:.2} ms, max {:.2} ms |",
        ms(idle),
        ms(t.window),
        100.0 * idle.as_secs_f64() / t.window.as_secs_f64().max(1e-9),
        gaps.len(),
        ms(percentile(&gaps, 0.5)),
        ms(percentile(&gaps, 0.9)),
        ms(gaps.last().copied().unwrap_or_default()),
    );
    let busy_rate = t.statements as f64 / t.busy.as_secs_f64().max(1e-9);
    println!(
        "| timeline: statements per second while a command was outstanding | {busy_rate:.0} | {:.2}× the ceiling |",
        busy_rate / ceiling
    );
}

fn arg(args: &[String], name: &str, default: i64) -> i64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} N")))
        .unwrap_or(default)
}

/// The runs `--all` makes, each as a process of its own with simulators of its own (a scale
/// or memory run leaves thousands of collections or a full oplog behind it): every figure issue
/// 11 asks for, from one command. The drains against their targets take the median of 5
/// rounds: single rounds on this shared machine range from 0.73× to 1.14× of their ceiling.
const ALL_RUNS: &[(&str, &[&str])] = &[
    (
        "copy and drain of 1 collection, ceilings, naive loops",
        &["--rounds", "5"],
    ),
    (
        "drain of 1 collection with write lanes tuned (the default), 4 and 1, rounds alternating",
        &[
            "--rounds",
            "9",
            "--naive",
            "100",
            "--write-lanes",
            "auto,4,1",
        ],
    ),
    (
        "copy and drain of 4 collections",
        &["--spread", "4", "--rounds", "5"],
    ),
    (
        "copy and drain of 8 collections",
        &["--spread", "8", "--rounds", "1"],
    ),
    (
        "replication latency at 2,000 and 5,000 writes/s",
        &["--latency", "2000,5000"],
    ),
    (
        "100 collections",
        &["--collections", "100", "--stream-scope", "auto"],
    ),
    (
        "1,000 collections",
        &["--collections", "1000", "--stream-scope", "auto"],
    ),
    (
        "blocked destination, 4 backlogged namespaces",
        &["--memory", "4"],
    ),
    (
        "blocked destination, 64 backlogged namespaces",
        &["--memory", "64"],
    ),
];

/// `--all`: every run of [`ALL_RUNS`] in turn, each one's output under a heading with the
/// command that reproduces it. Stops at the first run that fails.
fn run_all() {
    let me = std::env::current_exe().expect("the benchmark's own path");
    let started = Instant::now();
    for (what, run_args) in ALL_RUNS {
        println!("## {what}: `perf {}`\n", run_args.join(" "));
        let run_started = Instant::now();
        let status = Command::new(&me)
            .args(*run_args)
            .status()
            .expect("the benchmark starts itself");
        assert!(
            status.success(),
            "`perf {}` failed: {status}",
            run_args.join(" ")
        );
        println!("\n({what}: {:.0} s)\n", run_started.elapsed().as_secs_f64());
    }
    println!(
        "all {} runs in {:.0} s",
        ALL_RUNS.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--all") {
        run_all();
        return;
    }
    let docs = arg(&args, "--docs", 200_000);
    let events = arg(&args, "--events", 100_000);
    let naive = arg(&args, "--naive", 5_000);
    let repeats = arg(&args, "--rounds", 3).max(1);
    match std::env::var("PERF_DAEMON_THREADS") {
        Ok(threads) => println!("daemon worker threads: {threads} (PERF_DAEMON_THREADS)\n"),
        Err(_) => println!("daemon worker threads: one per CPU (the default)\n"),
    }
    let bin_dir: PathBuf = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let daemon_bin = bin_dir.join("mongo-syncd");
    let sim_bin = bin_dir.join("mongo-sim");
    for b in [&daemon_bin, &sim_bin] {
        assert!(
            b.exists(),
            "{} is missing: run `cargo build --release --workspace --bins` first",
            b.display()
        );
    }
    let (_source, source_uri) = start_sim(&sim_bin, "src");
    let (_dest, dest_uri) = start_sim(&sim_bin, "dst");
    let sims = SimPids {
        source: _source.child.id(),
        dest: _dest.child.id(),
    };
    let collections = arg(&args, "--collections", 0);
    if collections > 0 {
        let scope = args
            .iter()
            .position(|a| a == "--stream-scope")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| "auto".to_string());
        scale(&daemon_bin, &source_uri, &dest_uri, collections, &scope).await;
        return;
    }
    let latency_rates = list_arg(&args, "--latency");
    if !latency_rates.is_empty() {
        latency(&daemon_bin, &source_uri, &dest_uri, &latency_rates).await;
        return;
    }
    let backlogged = arg(&args, "--memory", 0);
    if backlogged > 0 {
        let writes = arg(&args, "--memory-writes", 500_000);
        memory(&daemon_bin, &source_uri, &dest_uri, backlogged, writes).await;
        return;
    }
    let spread = arg(&args, "--spread", 0);
    if spread > 0 {
        spread_over(
            &daemon_bin,
            &source_uri,
            &dest_uri,
            sims,
            spread,
            docs,
            events,
            repeats,
        )
        .await;
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = Client::with_uri_str(&source_uri).await.unwrap();
    let dst = Client::with_uri_str(&dest_uri).await.unwrap();

    // Copy ceilings, on the destination simulator.
    let insert_ceiling = rate(docs, insert_all(&dst, "ceiling_insert", docs).await);
    let upserts: Vec<Document> = (0..docs)
        .map(|i| doc! {"q": {"_id": i}, "u": document(i), "upsert": true})
        .collect();
    let upsert_ceiling = rate(docs, bulk_update(&dst, "ceiling_upsert", upserts).await);

    // The daemon's copy.
    insert_all(&src, COLL, docs).await;
    let daemon = start_daemon(&daemon_bin, work.path(), &source_uri, &dest_uri);
    let started = Instant::now();
    daemon
        .wait_metric(
            "mongo_syncd_initial_sync_documents_copied_total",
            docs as f64,
            Duration::from_secs(600),
        )
        .await;
    let copy = rate(docs, started.elapsed());
    daemon
        .wait_metric(
            "mongo_syncd_worker_state{namespace=\"perf.docs\",state=\"streaming\"}",
            1.0,
            Duration::from_secs(120),
        )
        .await;
    daemon.stop().await;

    // Rounds of a backlog written while the daemon is stopped: `$inc` updates, applied as
    // `$set` deltas, each against its ceiling measured just before it.
    let coll = src.database(DB).collection::<Document>(COLL);
    insert_all(&dst, "ceiling_drain", docs).await;
    let start = || start_daemon(&daemon_bin, work.path(), &source_uri, &dest_uri);
    // `--write-lanes auto,4,1`: the rounds alternate between these `apply.write_lanes`, side by
    // side against the same ceilings (round 0, the coldest, goes to the first value).
    let write_lanes = write_lanes_arg(&args);
    let mut rounds = Vec::new();
    let trace_log = work.path().join("drain.log");
    let timeline = args.iter().any(|a| a == "--timeline");
    if timeline {
        // Read by `spawn_daemon` (the daemon's stderr) and by the daemon (its log filter).
        std::env::set_var("PERF_DAEMON_LOG", &trace_log);
        std::env::set_var("RUST_LOG", "info,mongo_syncd::apply=trace");
    }
    let mut timelines = Vec::new();
    for round in 0..repeats {
        let lanes =
            (!write_lanes.is_empty()).then(|| &write_lanes[round as usize % write_lanes.len()]);
        let start_with_lanes = || {
            spawn_daemon(
                &daemon_bin,
                work.path(),
                &source_uri,
                &dest_uri,
                &format!("\"{DB}.{COLL}\""),
                "auto",
                &format!(
                    "[apply]\nwrite_lanes = {}\n",
                    lanes.cloned().unwrap_or_default()
                ),
            )
        };
        let start: &dyn Fn() -> Daemon = match lanes {
            Some(_) => &start_with_lanes,
            None => &start,
        };
        rounds.push(
            drain_round(
                round,
                &src,
                &dst,
                &[COLL.to_string()],
                docs,
                events,
                docs,
                sims,
                start,
            )
            .await,
        );
        if timeline {
            let log = std::fs::read_to_string(&trace_log).expect("the daemon's log");
            timelines.push(CommandTimeline::of_log(&log));
        }
    }
    if timeline {
        std::env::remove_var("PERF_DAEMON_LOG");
        std::env::remove_var("RUST_LOG");
    }
    let (drain_ceiling, drain) = {
        let m = median_round(&rounds);
        (m.ceiling(), m.drain)
    };

    // `--ha`: the same backlog again, drained by the daemon with `ha.enabled`, once per
    // fencing mode.
    let mut drains_ha = Vec::new();
    if args.iter().any(|a| a == "--ha") {
        for fencing in ["lease", "transaction"] {
            bulk_update(&src, COLL, inc_statements(events, docs)).await;
            let daemon = start_daemon_ha(&daemon_bin, work.path(), &source_uri, &dest_uri, fencing);
            let started = Instant::now();
            // A new process: its counter starts at 0.
            daemon
                .wait_metric(
                    "mongo_syncd_events_applied_total",
                    events as f64,
                    Duration::from_secs(600),
                )
                .await;
            drains_ha.push((fencing, rate(events, started.elapsed())));
            daemon.stop().await;
        }
    }
    // The ceiling again with the daemon's 4 lanes (the simulator runs every write under one
    // lock, so concurrent commands only add to its cost), between two of the usual ceiling.
    let lanes_ceiling = {
        let statements = |sign: i64| -> Vec<Document> {
            (0..events)
                .map(|k| doc! {"q": {"_id": event_id(k, docs)}, "u": {"$set": {"visits": sign * (k + 7)}}})
                .collect()
        };
        let before = rate(
            events,
            bulk_update(&dst, "ceiling_drain", statements(1)).await,
        );
        let lanes = rate(
            events,
            bulk_update_in_lanes(&dst, "ceiling_drain", statements(-1), 4).await,
        );
        let after = rate(
            events,
            bulk_update(&dst, "ceiling_drain", statements(2)).await,
        );
        (lanes, (before + after) / 2.0)
    };
    // The naive loop: one acknowledged write per event.
    let naive_coll = dst.database(DB).collection::<Document>("ceiling_drain");
    let started = Instant::now();
    for k in 0..naive {
        naive_coll
            .update_one(
                doc! {"_id": event_id(k, docs)},
                doc! {"$set": {"visits": -k}},
            )
            .await
            .unwrap();
    }
    let naive_rate = rate(naive, started.elapsed());
    // From the last round's backlog: the oplog need not hold every round (`--events` ×
    // `--rounds` may pass the simulator's 1,000,000 entries).
    let last_backlog = rounds.last().expect("at least one round").backlog_start;
    let pymongo_rate = naive_pymongo(&source_uri, &dest_uri, last_backlog, naive.min(events));
    // `--ha`: copies of the same documents into fresh collections, without HA and with each
    // fencing mode, one after the other (after the naive loops: they write far more than
    // the oplog keeps of the backlog).
    let mut copies_ha = Vec::new();
    if args.iter().any(|a| a == "--ha") {
        for fencing in ["none", "lease", "transaction"] {
            let name = format!("copy_{fencing}");
            insert_all(&src, &name, docs).await;
            let extra = match fencing {
                "none" => String::new(),
                mode => ha_settings(mode),
            };
            let daemon = spawn_daemon(
                &daemon_bin,
                work.path(),
                &source_uri,
                &dest_uri,
                &format!("\"{DB}.{name}\""),
                "auto",
                &extra,
            );
            let started = Instant::now();
            daemon
                .wait_metric(
                    "mongo_syncd_initial_sync_documents_copied_total",
                    docs as f64,
                    Duration::from_secs(600),
                )
                .await;
            copies_ha.push((fencing, rate(docs, started.elapsed())));
            daemon.stop().await;
        }
    }

    drop(coll);

    println!("| what | per second | ratio |");
    println!("| --- | ---: | --- |");
    println!("| ceiling: insert_many, {docs} documents | {insert_ceiling:.0} | |");
    println!(
        "| ceiling: replace-upserts by _id | {upsert_ceiling:.0} | {:.2}× insert_many |",
        upsert_ceiling / insert_ceiling
    );
    println!(
        "| mongo-syncd copy, 1 collection | {copy:.0} | {:.2}× insert_many (target ≥ 0.5) |",
        copy / insert_ceiling
    );
    if write_lanes.is_empty() {
        print_drain("1 collection", events, &rounds);
    } else {
        for (i, lanes) in write_lanes.iter().enumerate() {
            let of_lanes: Vec<DrainRound> = rounds
                .iter()
                .skip(i)
                .step_by(write_lanes.len())
                .cloned()
                .collect();
            print_drain(
                &format!("1 collection, apply.write_lanes = {lanes}"),
                events,
                &of_lanes,
            );
        }
    }
    println!(
        "| ceiling sent as 4 concurrent commands of 250 (apply.write_lanes = 4 cuts a batch so) | {:.0} | {:.2}× the ceiling measured right before and after it |",
        lanes_ceiling.0,
        lanes_ceiling.0 / lanes_ceiling.1
    );
    if timeline {
        let median = median_round(&rounds);
        let at = rounds
            .iter()
            .position(|r| std::ptr::eq(r, median))
            .expect("the median is one of the rounds");
        print_timeline(&timelines[at], median.ceiling());
    }
    for (fencing, drain_ha) in drains_ha {
        println!(
            "| mongo-syncd drain with ha.enabled, ha.fencing = \"{fencing}\" | {drain_ha:.0} | {:.2}× the ceiling, {:.2}× the drain without |",
            drain_ha / drain_ceiling,
            drain_ha / drain
        );
    }
    let copy_without = copies_ha
        .iter()
        .find(|(f, _)| *f == "none")
        .map(|(_, r)| *r);
    for (fencing, copy_ha) in &copies_ha {
        let what = match *fencing {
            "none" => "without ha".to_string(),
            mode => format!("with ha.enabled, ha.fencing = \"{mode}\""),
        };
        println!(
            "| mongo-syncd copy of a fresh collection, {what} | {copy_ha:.0} | {:.2}× insert_many, {:.2}× the copy without |",
            copy_ha / insert_ceiling,
            copy_without.map_or(f64::NAN, |w| copy_ha / w)
        );
    }
    println!(
        "| naive loop, one update_one per event (Rust, no stream to read) | {naive_rate:.0} | drain = {:.1}× this loop |",
        drain / naive_rate
    );
    match pymongo_rate {
        Some(r) => println!(
            "| naive replicator: PyMongo change stream, one update_one per event | {r:.0} | drain = {:.1}× naive (target ≥ 12) |",
            drain / r
        ),
        None => println!(
            "| naive replicator: PyMongo change stream, one update_one per event | not run | no python with pymongo (set PERF_PYTHON) |"
        ),
    }
}

/// The source's `operationTime`: a change stream started there sees every later write.
async fn operation_time(client: &Client) -> bson::Timestamp {
    let reply = client
        .database(DB)
        .run_command(doc! {"insert": "perf_marker", "documents": [{}]})
        .await
        .unwrap();
    reply
        .get_timestamp("operationTime")
        .unwrap_or_else(|_| panic!("no operationTime in {reply}"))
}

/// The naive replicator issue 11 measured (a PyMongo loop reading the change stream and
/// writing each event with one acknowledged `update_one`), over the first `events` events of
/// the drain's backlog, into a copy of the collection. `None` without a Python that has
/// PyMongo (`PERF_PYTHON`, else the workspace's `.venv`).
fn naive_pymongo(source: &str, dest: &str, from: bson::Timestamp, events: i64) -> Option<f64> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("PERF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    if !python.exists() {
        return None;
    }
    let output = Command::new(&python)
        .arg(root.join("examples/naive_replicator.py"))
        .args([source, dest, DB, COLL, "ceiling_drain"])
        .args([
            from.time.to_string(),
            from.increment.to_string(),
            events.to_string(),
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "naive_replicator.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("naive_replicator.py prints a rate"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_merges_overlapping_commands_and_measures_the_gaps_between_them() {
        // Two batches of two lanes: 10:00:00.000–.010 and .002–.012, then .0125–.020 and
        // .013–.021 (the second lane starts 1 ms after the first one ends).
        let log = "\
2026-12-06T10:00:00.010000Z TRACE mongo_syncd::apply: bulk update namespace=p.d statements=250 elapsed_us=10000
2026-12-06T10:00:00.012000Z TRACE mongo_syncd::apply: bulk update namespace=p.d statements=250 elapsed_us=10000
2026-12-06T10:00:00.005000Z  INFO mongo_syncd::worker: worker state changed
2026-12-06T10:00:00.020000Z TRACE mongo_syncd::apply: bulk update namespace=p.d statements=250 elapsed_us=7500
2026-12-06T10:00:00.021000Z TRACE mongo_syncd::apply: bulk update namespace=p.d statements=250 elapsed_us=8000
";
        let t = CommandTimeline::of_log(log);
        assert_eq!(t.statements, 1000);
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        assert_eq!(ms(t.window), 21.0);
        assert_eq!(t.gaps.iter().map(|g| ms(*g)).collect::<Vec<_>>(), [0.5]);
        assert_eq!(ms(t.busy), 20.5);
    }

    #[test]
    fn a_timeline_spans_midnight() {
        let log = "\
2026-12-06T23:59:59.999000Z TRACE mongo_syncd::apply: bulk update namespace=p.d statements=1 elapsed_us=1000
2026-12-07T00:00:00.002000Z TRACE mongo_syncd::apply: bulk update namespace=p.d statements=1 elapsed_us=1000
";
        let t = CommandTimeline::of_log(log);
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        assert_eq!(ms(t.window), 4.0);
        assert_eq!(t.gaps.iter().map(|g| ms(*g)).collect::<Vec<_>>(), [2.0]);
    }
}

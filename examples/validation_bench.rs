//! Memory and throughput of validation on a large collection, with the two simulated replica
//! sets in their own processes (the `mongo-sim` binary) so the daemon's peak RSS is its own.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release --example validation_bench -- [--docs 1000000] [--cli]
//! ```
//!
//! It seeds the same documents into both simulators, runs `mongo-syncd run` under
//! `/usr/bin/time -v` with `sync.initial_copy = "skip"` (the destination is seeded, like a
//! restored backup), asks for one validation pass over HTTP, waits for its report in
//! `mongo_syncd.validations`, stops the daemon and prints the pass's scan rate and the daemon's
//! peak RSS (`/usr/bin/time`'s "Maximum resident set size", cross-checked with the kernel's
//! `VmHWM`). With `--cli` it then also measures `mongo-syncd validate --json`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bson::{doc, Document};
use mongodb::Client;

const DB: &str = "bench";
const COLL: &str = "docs";
const TOKEN: &str = "bench-token";

struct Sim {
    child: Child,
    uri: String,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sim(bin: &Path, set: &str) -> Sim {
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
    Sim {
        child,
        uri: format!("mongodb://{host}/?replicaSet={set}"),
    }
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
        "created": bson::DateTime::from_millis(1_700_000_000_000 + i),
    }
}

async fn seed(uri: &str, docs: i64) {
    let client = Client::with_uri_str(uri).await.unwrap();
    let coll = client.database(DB).collection::<Document>(COLL);
    let mut start = 0;
    while start < docs {
        let end = (start + 10_000).min(docs);
        coll.insert_many((start..end).map(document).collect::<Vec<_>>())
            .await
            .unwrap();
        start = end;
    }
}

fn peak_rss_kib(time_output: &str) -> Option<u64> {
    time_output
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The pid of the only child of `parent` (the daemon under `/usr/bin/time`).
fn child_pid(parent: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let docs: i64 = args
        .iter()
        .position(|a| a == "--docs")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--docs N"))
        .unwrap_or(1_000_000);
    let measure_cli = args.iter().any(|a| a == "--cli");
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
    let work = tempfile::tempdir().unwrap();

    let source = start_sim(&sim_bin, "src");
    let dest = start_sim(&sim_bin, "dst");
    let seeding = Instant::now();
    tokio::join!(seed(&source.uri, docs), seed(&dest.uri, docs));
    eprintln!(
        "seeded {docs} documents on each side in {:.1}s",
        seeding.elapsed().as_secs_f64()
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = work.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nuri = \"{}\"\n\n[destination]\nuri = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n\n[sync]\nnamespaces = [\"{DB}.*\"]\ninitial_copy = \"skip\"\n\n[validation]\ninterval_seconds = 0\n\n[log]\nlevel = \"info\"\n",
            source.uri, dest.uri
        ),
    )
    .unwrap();
    let time_log = work.path().join("daemon.time");
    let mut timed = Command::new("/usr/bin/time")
        .arg("-v")
        .arg("-o")
        .arg(&time_log)
        .arg(&daemon_bin)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("/usr/bin/time runs");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let ns = format!("{DB}.{COLL}");
        let streaming = match http.get(format!("{base}/api/v1/status")).send().await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .is_some_and(|s| s["namespaces"][&ns]["state"] == "streaming"),
            Err(_) => false,
        };
        if streaming {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the daemon did not start streaming"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let daemon_pid = child_pid(timed.id()).expect("the daemon runs under /usr/bin/time");
    let status = http
        .post(format!("{base}/api/v1/validate"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    let dst = Client::with_uri_str(&dest.uri).await.unwrap();
    let validations = dst
        .database("mongo_syncd")
        .collection::<Document>("validations");
    let report = loop {
        if let Some(r) = validations
            .find_one(doc! {"state": "finished", "runner": "daemon"})
            .await
            .unwrap()
        {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "no report after 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let hwm = vm_hwm_kib(daemon_pid);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(daemon_pid.to_string())
        .status();
    let exit = timed.wait().unwrap();
    let time_text = std::fs::read_to_string(&time_log).unwrap_or_default();
    let rss = peak_rss_kib(&time_text);
    let elapsed = report.get_f64("elapsed_seconds").unwrap_or(0.0);
    let compared = report
        .get_document("documents")
        .ok()
        .and_then(|d| d.get_i64("source").ok())
        .unwrap_or(0);
    println!("daemon pass: result {} over {compared} documents ({} ranges) in {elapsed:.2}s = {:.0} documents/s compared",
        report.get_str("result").unwrap_or("?"),
        report.get_i64("ranges_checked").unwrap_or(0),
        compared as f64 / elapsed.max(1e-9));
    println!(
        "daemon peak RSS: {} KiB ({:.1} MiB) by /usr/bin/time -v; VmHWM {} KiB; exit {:?}",
        rss.map_or("?".into(), |v| v.to_string()),
        rss.unwrap_or(0) as f64 / 1024.0,
        hwm.map_or("?".into(), |v| v.to_string()),
        exit.code()
    );

    if measure_cli {
        let cli_time = work.path().join("cli.time");
        let out = Command::new("/usr/bin/time")
            .arg("-v")
            .arg("-o")
            .arg(&cli_time)
            .arg(&daemon_bin)
            .args(["validate", "--json", "--wait-seconds", "5", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let ns = &json["namespaces"][0];
        println!(
            "validate command: exit {:?}, result {}, {} documents in {:.2}s = {:.0} documents/s; peak RSS {} KiB",
            out.status.code(),
            ns["result"],
            ns["documents"]["source"],
            ns["elapsed_seconds"].as_f64().unwrap_or(0.0),
            ns["documents_per_second"].as_f64().unwrap_or(0.0),
            peak_rss_kib(&std::fs::read_to_string(&cli_time).unwrap_or_default())
                .map_or("?".into(), |v| v.to_string()),
        );
    }
}

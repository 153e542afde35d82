//! Two simulated replica sets (source and destination) and a `mongo-syncd` process between
//! them, plus the comparisons the tests assert with.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bson::{doc, Document, RawDocumentBuf};
use futures::TryStreamExt;
use mongo_sim::{MongoSim, SimHandle};
use mongodb::Client;

/// Polls `condition` until it holds or `timeout` passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        if started.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct Clusters {
    pub source: SimHandle,
    pub dest: SimHandle,
    pub src: Client,
    pub dst: Client,
}

impl Clusters {
    pub async fn start() -> Clusters {
        Self::start_with_oplog(1_000_000).await
    }

    pub async fn start_with_oplog(oplog_max_events: usize) -> Clusters {
        let source = MongoSim::builder()
            .replica_set("src")
            .oplog_max_events(oplog_max_events)
            .noop_interval(Duration::from_secs(1))
            .start()
            .await
            .expect("source simulator starts");
        let dest = MongoSim::builder()
            .replica_set("dst")
            .noop_interval(Duration::from_secs(1))
            .start()
            .await
            .expect("destination simulator starts");
        let src = Client::with_uri_str(source.uri())
            .await
            .expect("source client");
        let dst = Client::with_uri_str(dest.uri())
            .await
            .expect("destination client");
        Clusters {
            source,
            dest,
            src,
            dst,
        }
    }
}

/// A free port for a daemon or simulator started by a test (see [`super::ports`]).
pub use super::ports::free_port;

/// A `mongo-syncd run` process.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub http: SocketAddr,
    log_path: PathBuf,
    runs: usize,
}

/// Settings that make tests fast: quick idle checkpoints and short backoffs.
pub const TEST_SETTINGS: &str = r#"
[checkpoint]
interval_seconds = 1

[supervisor]
max_backoff_seconds = 1
max_restarts = 50

[shutdown]
timeout_seconds = 10

[log]
level = "info"
"#;

impl Daemon {
    /// Writes a config (source/destination URIs, a free HTTP port, `extra` TOML appended) and
    /// starts the daemon.
    pub fn start(clusters: &Clusters, dir: &Path, extra: &str) -> Daemon {
        let mut d = Self::configure(clusters, dir, extra);
        d.spawn(&[]);
        d
    }

    /// Writes the config like [`Daemon::start`] without starting the process (start it with
    /// [`Daemon::spawn`] or [`Daemon::spawn_with_env`]).
    pub fn configure(clusters: &Clusters, dir: &Path, extra: &str) -> Daemon {
        let port = free_port();
        // A leading `[source]` block in `extra` joins the source section the config opens with.
        let (source_keys, extra) = match extra.strip_prefix("[source]\n") {
            Some(rest) => match rest.find("\n[") {
                Some(end) => (&rest[..end], &rest[end..]),
                None => (rest, ""),
            },
            None => ("", extra),
        };
        let config = format!(
            "[source]\nuri = \"{}\"\n{source_keys}\n\n[destination]\nuri = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n{}",
            clusters.source.uri(),
            clusters.dest.uri(),
            if extra.contains("[checkpoint]") { "" } else { TEST_SETTINGS },
        );
        let config_path = dir.join("mongo-syncd.toml");
        std::fs::write(&config_path, config).unwrap();
        Daemon {
            child: None,
            dir: dir.to_path_buf(),
            config_path,
            http: format!("127.0.0.1:{port}").parse().unwrap(),
            log_path: dir.join("daemon-0.log"),
            runs: 0,
        }
    }

    /// Starts the daemon with a config already written to `dir/mongo-syncd.toml`.
    pub fn start_with_config(dir: &Path, http_port: u16) -> Daemon {
        let mut d = Daemon {
            child: None,
            dir: dir.to_path_buf(),
            config_path: dir.join("mongo-syncd.toml"),
            http: format!("127.0.0.1:{http_port}").parse().unwrap(),
            log_path: dir.join("daemon-0.log"),
            runs: 0,
        };
        d.spawn(&[]);
        d
    }

    /// (Re)starts the process with the same config.
    pub fn spawn(&mut self, extra_args: &[&str]) {
        self.spawn_with_env(extra_args, &[]);
    }

    /// (Re)starts the process with the same config and extra environment variables.
    pub fn spawn_with_env(&mut self, extra_args: &[&str], env: &[(&str, &str)]) {
        self.log_path = self.dir.join(format!("daemon-{}.log", self.runs));
        self.runs += 1;
        let log = std::fs::File::create(&self.log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mongo-syncd"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .args(extra_args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("MONGO_SYNCD_") {
                cmd.env_remove(&name);
            }
        }
        cmd.env_remove("RUST_LOG").env_remove("NOTIFY_SOCKET");
        cmd.envs(env.iter().copied());
        cmd.stdout(Stdio::null()).stderr(log);
        self.child = Some(super::isolated::spawn_isolated(&mut cmd).expect("daemon starts"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGKILL: no chance to drain or checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    self.child = None;
                    return status.code();
                }
            } else {
                return None;
            }
            if started.elapsed() > timeout {
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// Everything the current run logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Everything every run logged.
    pub fn all_logs(&self) -> String {
        (0..self.runs)
            .map(|i| {
                std::fs::read_to_string(self.dir.join(format!("daemon-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.text().await.ok()?))
    }

    pub async fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.get("/api/v1/status").await?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// State of one namespace in `/api/v1/status`.
    pub async fn namespace_state(&self, ns: &str) -> Option<String> {
        let s = self.status().await?;
        s["namespaces"][ns]["state"].as_str().map(str::to_string)
    }

    /// Waits until the namespace's worker is streaming.
    pub async fn wait_streaming(&self, ns: &str) {
        wait_until(
            &format!("{ns} streaming"),
            Duration::from_secs(60),
            || async { self.namespace_state(ns).await.as_deref() == Some("streaming") },
        )
        .await;
    }

    /// Value of a metric series whose line starts with `prefix` (name + labels), if present.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .reduce(|a, b| a + b)
    }

    /// Waits until the series `prefix` reads exactly `expected`.
    pub async fn wait_metric(&self, prefix: &str, expected: f64, timeout: Duration) {
        self.wait_metric_where(prefix, &format!("= {expected}"), timeout, |v| {
            v == Some(expected)
        })
        .await;
    }

    /// Waits until the series `prefix` reads at least `at_least` (absent counts as 0).
    pub async fn wait_metric_at_least(&self, prefix: &str, at_least: f64, timeout: Duration) {
        self.wait_metric_where(prefix, &format!(">= {at_least}"), timeout, |v| {
            v.unwrap_or(0.0) >= at_least
        })
        .await;
    }

    /// Polls the series until `holds`; on timeout panics with the last value seen.
    async fn wait_metric_where(
        &self,
        prefix: &str,
        condition: &str,
        timeout: Duration,
        holds: impl Fn(Option<f64>) -> bool,
    ) {
        let started = Instant::now();
        loop {
            let value = self.metric(prefix).await;
            if holds(value) {
                return;
            }
            if started.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {prefix} {condition} (last value {value:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// All documents of a collection in `_id` order, as raw BSON.
pub async fn dump(client: &Client, db: &str, coll: &str) -> Vec<RawDocumentBuf> {
    client
        .database(db)
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Compares two collections document by document; returns a description of the first
/// difference.
pub async fn diff(
    src: &Client,
    dst: &Client,
    (db, coll): (&str, &str),
    (tdb, tcoll): (&str, &str),
) -> Option<String> {
    let a = dump(src, db, coll).await;
    let b = dump(dst, tdb, tcoll).await;
    if a.len() != b.len() {
        return Some(format!(
            "{db}.{coll}: {} documents on the source, {} on the destination",
            a.len(),
            b.len()
        ));
    }
    for (x, y) in a.iter().zip(&b) {
        if x.as_bytes() != y.as_bytes() {
            let x: Document = x.try_into().unwrap();
            let y: Document = y.try_into().unwrap();
            return Some(format!("{db}.{coll}: source {x} != destination {y}"));
        }
    }
    None
}

/// Waits until every namespace is identical on both sides (same `_id`s, byte-identical BSON).
pub async fn wait_converged(c: &Clusters, namespaces: &[(&str, &str)], timeout: Duration) {
    wait_converged_clients(&c.src, &c.dst, namespaces, timeout).await;
}

/// [`wait_converged`] between any two deployments.
pub async fn wait_converged_clients(
    src: &Client,
    dst: &Client,
    namespaces: &[(&str, &str)],
    timeout: Duration,
) {
    let started = Instant::now();
    loop {
        let mut first_diff = None;
        for (db, coll) in namespaces {
            if let Some(d) = diff(src, dst, (db, coll), (db, coll)).await {
                first_diff = Some(d);
                break;
            }
        }
        match first_diff {
            None => return,
            Some(d) if started.elapsed() > timeout => {
                panic!("not converged after {timeout:?}: {d}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

//! Operating the real binary: metric values under a workload, lag under a blocked destination,
//! force-sync (HTTP and SIGUSR1) repairing a tampered destination, SIGHUP reloads, SIGTERM,
//! the systemd notify protocol, and what the logs may and may not contain.

use std::{
    os::unix::net::UnixDatagram,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bson::{doc, oid::ObjectId, Document};
use tokio_util::sync::CancellationToken;

use crate::support::cluster::{diff, wait_converged, wait_until, Clusters, Daemon};

const TOKEN: &str = "ops-token-51d2";
const ORDERS: (&str, &str) = ("shop", "orders");

async fn seed_orders(c: &Clusters, n: i32) {
    let docs: Vec<Document> = (0..n)
        .map(|i| doc! {"_id": i, "n": i, "items": [{"sku": "a", "qty": 1}], "status": "new"})
        .collect();
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_many(docs)
        .await
        .unwrap();
}

async fn metric(d: &Daemon, series: &str) -> f64 {
    d.metric(series).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_a_workload_and_lag_follows_a_blocked_destination() {
    let c = Clusters::start().await;
    seed_orders(&c, 100).await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    d.wait_streaming("shop.orders").await;

    let ns = "namespace=\"shop.orders\"";
    let read0 = metric(&d, &format!("mongo_syncd_events_read_total{{{ns}}}")).await;
    let ins0 = metric(
        &d,
        &format!("mongo_syncd_events_applied_total{{{ns},op=\"insert\"}}"),
    )
    .await;
    let upd0 = metric(
        &d,
        &format!("mongo_syncd_events_applied_total{{{ns},op=\"update\"}}"),
    )
    .await;
    let del0 = metric(
        &d,
        &format!("mongo_syncd_events_applied_total{{{ns},op=\"delete\"}}"),
    )
    .await;
    let writes0 = metric(&d, &format!("mongo_syncd_writes_total{{{ns}}}")).await;
    let latency0 = metric(&d, "mongo_syncd_replication_latency_seconds_count").await;

    let orders = c.src.database("shop").collection::<Document>("orders");
    for i in 1_000..1_050 {
        orders.insert_one(doc! {"_id": i, "n": i}).await.unwrap();
    }
    for i in 0..30 {
        orders
            .update_one(doc! {"_id": i}, doc! {"$set": {"status": "paid"}})
            .await
            .unwrap();
    }
    for i in 50..70 {
        orders.delete_one(doc! {"_id": i}).await.unwrap();
    }
    let t = Duration::from_secs(30);
    d.wait_metric_at_least(
        &format!("mongo_syncd_events_applied_total{{{ns},op=\"insert\"}}"),
        ins0 + 50.0,
        t,
    )
    .await;
    d.wait_metric_at_least(
        &format!("mongo_syncd_events_applied_total{{{ns},op=\"update\"}}"),
        upd0 + 30.0,
        t,
    )
    .await;
    d.wait_metric_at_least(
        &format!("mongo_syncd_events_applied_total{{{ns},op=\"delete\"}}"),
        del0 + 20.0,
        t,
    )
    .await;
    d.wait_metric_at_least(
        &format!("mongo_syncd_events_read_total{{{ns}}}"),
        read0 + 100.0,
        t,
    )
    .await;
    // Coalescing may fold statements, but each of the 100 events needs a write unless folded
    // into a later one on the same _id (none here): at least one statement per document.
    d.wait_metric_at_least(
        &format!("mongo_syncd_writes_total{{{ns}}}"),
        writes0 + 100.0,
        t,
    )
    .await;
    d.wait_metric_at_least(
        "mongo_syncd_replication_latency_seconds_count",
        latency0 + 100.0,
        t,
    )
    .await;
    assert!(metric(&d, "mongo_syncd_apply_batch_duration_seconds_count").await >= 1.0);
    wait_converged(&c, &[ORDERS], t).await;

    // Idle and caught up: lag is exactly 0 (cluster time, not wall clocks).
    let lag = format!("mongo_syncd_lag_seconds{{{ns}}}");
    d.wait_metric(&lag, 0.0, t).await;
    assert!(metric(&d, "mongo_syncd_source_cluster_time_seconds").await > 1.7e9);
    assert!(
        metric(
            &d,
            &format!("mongo_syncd_applied_through_timestamp_seconds{{{ns}}}")
        )
        .await
            > 1.7e9
    );
    let age = metric(&d, &format!("mongo_syncd_checkpoint_age_seconds{{{ns}}}")).await;
    assert!(
        age < 10.0,
        "idle namespaces are checkpointed every second; age {age}"
    );

    // The destination holds the next write for 12 s while the source keeps changing.
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 12_000},
        })
        .unwrap();
    let stop = CancellationToken::new();
    let writer = {
        let (orders, stop) = (orders.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 2_000;
            while !stop.is_cancelled() {
                orders.insert_one(doc! {"_id": i, "n": i}).await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    wait_until(
        "lag rises to >= 3 s while the destination is blocked",
        Duration::from_secs(20),
        || async { d.metric(&lag).await.unwrap_or(0.0) >= 3.0 },
    )
    .await;
    let status = d.status().await.unwrap();
    assert!(
        status["namespaces"]["shop.orders"]["lag_seconds"]
            .as_f64()
            .unwrap()
            >= 3.0
    );
    stop.cancel();
    writer.await.unwrap();
    // The lag falls back to 0 after the block.
    d.wait_metric(&lag, 0.0, Duration::from_secs(40)).await;
    wait_converged(&c, &[ORDERS], t).await;

    // A periodic progress line per streaming namespace (every 30 s).
    wait_until(
        "a streaming progress line",
        Duration::from_secs(45),
        || async {
            d.logs().lines().any(|l| {
                l.contains("streaming progress")
                    && l.contains("shop.orders")
                    && l.contains("lag_seconds")
            })
        },
    )
    .await;
    // One event per state change.
    assert!(d.logs().contains("worker state changed"), "{}", d.logs());
}

/// Deletes, modifies and adds documents on the destination behind the daemon's back.
async fn tamper(c: &Clusters) {
    let dst = c.dst.database("shop").collection::<Document>("orders");
    dst.delete_many(doc! {"_id": {"$lt": 10}}).await.unwrap();
    dst.update_many(
        doc! {"_id": {"$gte": 10, "$lt": 20}},
        doc! {"$set": {"status": "tampered"}, "$unset": {"items": ""}},
    )
    .await
    .unwrap();
    dst.insert_many(vec![
        doc! {"_id": 100_000, "extra": true},
        doc! {"_id": 100_001, "extra": true},
        doc! {"_id": "string-id", "extra": true},
        doc! {"_id": ObjectId::new(), "extra": true},
        doc! {"_id": -5, "extra": true},
    ])
    .await
    .unwrap();
    assert!(
        diff(&c.src, &c.dst, ORDERS, ORDERS).await.is_some(),
        "tampering must be visible"
    );
}

async fn count_dst(c: &Clusters, filter: Document) -> u64 {
    c.dst
        .database("shop")
        .collection::<Document>("orders")
        .count_documents(filter)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_sync_over_http_repairs_a_tampered_destination() {
    let c = Clusters::start().await;
    seed_orders(&c, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &format!("token = \"{TOKEN}\"\n\n[sync]\nnamespaces = [\"shop.*\"]\n"),
    );
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    d.wait_streaming("shop.orders").await;
    tamper(&c).await;

    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/v1/force-sync", d.http))
        .bearer_auth(TOKEN)
        .body("{\"namespaces\": [\"shop.orders\"]}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    // The stream keeps running during the force-sync.
    let orders = c.src.database("shop").collection::<Document>("orders");
    for i in 300..320 {
        orders.insert_one(doc! {"_id": i, "n": i}).await.unwrap();
    }
    orders
        .update_one(doc! {"_id": 15}, doc! {"$set": {"status": "paid"}})
        .await
        .unwrap();
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    assert_eq!(
        count_dst(&c, doc! {"extra": true}).await,
        0,
        "extras deleted"
    );
    assert_eq!(
        metric(&d, "mongo_syncd_force_syncs_total{trigger=\"http\"}").await,
        1.0
    );
    assert!(d.logs().contains("force-sync finished"), "{}", d.logs());
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_restarts_a_parked_worker_and_repairs_a_tampered_destination() {
    let c = Clusters::start().await;
    seed_orders(&c, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    d.wait_streaming("shop.orders").await;

    // An error the classifier does not know parks the worker (never retried in a loop).
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["update"], "errorCode": 96},
        })
        .unwrap();
    let orders = c.src.database("shop").collection::<Document>("orders");
    orders
        .insert_one(doc! {"_id": 500, "n": 500})
        .await
        .unwrap();
    wait_until("the worker is parked", Duration::from_secs(30), || async {
        d.namespace_state("shop.orders").await.as_deref() == Some("parked")
    })
    .await;
    d.wait_metric(
        "mongo_syncd_worker_state{namespace=\"shop.orders\",state=\"parked\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let (code, body) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("parked"), "{body}");
    let logs = d.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("worker parked") && l.contains("class") && l.contains("kind")),
        "the parked error is logged with its class:\n{logs}"
    );

    tamper(&c).await;
    d.signal("USR1");
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    d.wait_streaming("shop.orders").await;
    assert_eq!(
        count_dst(&c, doc! {"extra": true}).await,
        0,
        "extras deleted"
    );
    assert_eq!(
        metric(&d, "mongo_syncd_force_syncs_total{trigger=\"signal\"}").await,
        1.0
    );

    // A second SIGUSR1 on a streaming worker reconciles while the stream runs.
    tamper(&c).await;
    d.signal("USR1");
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    assert_eq!(
        count_dst(&c, doc! {"extra": true}).await,
        0,
        "extras deleted"
    );
    assert_eq!(
        metric(&d, "mongo_syncd_force_syncs_total{trigger=\"signal\"}").await,
        2.0
    );
    wait_until("/readyz 200 again", Duration::from_secs(30), || async {
        d.get("/readyz").await.is_some_and(|(code, _)| code == 200)
    })
    .await;
}

fn config_with_namespaces(d: &Daemon, c: &Clusters, namespaces: &str) -> String {
    format!(
        "[source]\nuri = \"{}\"\n\n[destination]\nuri = \"{}\"\n\n[http]\nlisten = \"{}\"\n\n\
         [sync]\nnamespaces = {namespaces}\n\n[checkpoint]\ninterval_seconds = 1\n\n\
         [supervisor]\nmax_backoff_seconds = 1\n\n[shutdown]\ntimeout_seconds = 10\n",
        c.source.uri(),
        c.dest.uri(),
        d.http
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_namespaces_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let c = Clusters::start().await;
    seed_orders(&c, 200).await;
    let customers = c.src.database("shop").collection::<Document>("customers");
    customers
        .insert_many((0..150).map(|i| doc! {"_id": i, "name": format!("c{i}")}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), "");
    std::fs::write(
        &d.config_path,
        config_with_namespaces(&d, &c, "[\"shop.orders\"]"),
    )
    .unwrap();
    d.spawn(&[]);
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    d.wait_streaming("shop.orders").await;
    assert!(d.namespace_state("shop.customers").await.is_none());
    let dst_customers = c.dst.database("shop").collection::<Document>("customers");
    assert_eq!(dst_customers.count_documents(doc! {}).await.unwrap(), 0);

    // Add a namespace (and change a setting read only at start: it is reported, not applied).
    std::fs::write(
        &d.config_path,
        config_with_namespaces(&d, &c, "[\"shop.orders\", \"shop.customers\"]")
            + "\n[runtime]\nworker_threads = 1\n",
    )
    .unwrap();
    d.signal("HUP");
    wait_converged(
        &c,
        &[ORDERS, ("shop", "customers")],
        Duration::from_secs(60),
    )
    .await;
    d.wait_streaming("shop.customers").await;
    assert_eq!(
        metric(&d, "mongo_syncd_config_reloads_total{result=\"success\"}").await,
        1.0
    );
    assert!(
        d.logs().contains("runtime.worker_threads changed")
            && d.logs().contains("takes effect at the next restart"),
        "{}",
        d.logs()
    );

    // A bad config is rejected and logged; the old one keeps running.
    std::fs::write(
        &d.config_path,
        "[sync]\nnamespaces = 42\nnot_a_key = true\n",
    )
    .unwrap();
    d.signal("HUP");
    // The failed reload is counted.
    d.wait_metric(
        "mongo_syncd_config_reloads_total{result=\"failure\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        d.logs()
            .contains("new configuration rejected; keeping the running one"),
        "{}",
        d.logs()
    );
    customers
        .insert_one(doc! {"_id": 1_000, "name": "after a bad reload"})
        .await
        .unwrap();
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_one(doc! {"_id": 1_000})
        .await
        .unwrap();
    wait_converged(
        &c,
        &[ORDERS, ("shop", "customers")],
        Duration::from_secs(30),
    )
    .await;

    // Remove a namespace: its worker stops and its series go away.
    std::fs::write(
        &d.config_path,
        config_with_namespaces(&d, &c, "[\"shop.orders\"]"),
    )
    .unwrap();
    d.signal("HUP");
    wait_until(
        "shop.customers is gone from status and metrics",
        Duration::from_secs(30),
        || async {
            let gone_from_status = d
                .status()
                .await
                .is_some_and(|s| s["namespaces"]["shop.customers"].is_null());
            let (_, metrics) = d.get("/metrics").await.unwrap_or_default();
            gone_from_status && !metrics.contains("namespace=\"shop.customers\"")
        },
    )
    .await;
    customers
        .insert_one(doc! {"_id": 2_000, "name": "no longer synced"})
        .await
        .unwrap();
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_one(doc! {"_id": 2_000})
        .await
        .unwrap();
    wait_converged(&c, &[ORDERS], Duration::from_secs(30)).await;
    assert_eq!(
        dst_customers
            .count_documents(doc! {"_id": 2_000})
            .await
            .unwrap(),
        0
    );
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_with_checkpoints_written() {
    let c = Clusters::start().await;
    seed_orders(&c, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    d.wait_streaming("shop.orders").await;
    let orders = c.src.database("shop").collection::<Document>("orders");
    for i in 200..260 {
        orders.insert_one(doc! {"_id": i}).await.unwrap();
    }
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    let logs = d.logs();
    assert!(logs.contains("stopped cleanly"), "{logs}");
    let checkpoints = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints");
    let cp = checkpoints
        .find_one(doc! {"_id.sync_id": "default", "_id.ns": "shop.orders"})
        .await
        .unwrap()
        .expect("a checkpoint for shop.orders");
    assert_eq!(cp.get_str("phase").unwrap(), "streaming", "{cp}");
    assert!(cp.get_document("resume_token").is_ok(), "{cp}");
    assert!(cp.get("applied_through").is_some(), "{cp}");
    // A restart resumes from the checkpoint: no re-copy, and what changed meanwhile arrives.
    for i in 260..280 {
        orders.insert_one(doc! {"_id": i}).await.unwrap();
    }
    d.spawn(&[]);
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    assert!(!d.logs().contains("initial copy starting"), "{}", d.logs());
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    assert_eq!(
        d.all_logs().matches("initial copy starting").count(),
        1,
        "one copy over both runs"
    );
}

/// A fake systemd: an `AF_UNIX` datagram socket collecting `sd_notify` messages.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (messages, stop) = (Arc::clone(&messages), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        messages.lock().unwrap().push((Instant::now(), text));
                    }
                }
            });
        }
        NotifySocket {
            _dir: dir,
            path,
            messages,
            stop,
        }
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    /// Index of the first message at or after `from` containing the field `field`.
    fn find(&self, from: usize, field: &str) -> Option<usize> {
        self.all()
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, (_, m))| {
                m.lines()
                    .any(|l| l == field || (field.ends_with('=') && l.starts_with(field)))
            })
            .map(|(i, _)| i)
    }

    async fn wait(&self, from: usize, field: &str, timeout: Duration) -> usize {
        let started = Instant::now();
        loop {
            if let Some(i) = self.find(from, field) {
                return i;
            }
            if started.elapsed() > timeout {
                panic!(
                    "no {field} after message {from} within {timeout:?}: {:#?}",
                    self.all()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Arrival times of `WATCHDOG=1` messages.
    fn watchdogs(&self) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(t, _)| t)
            .collect()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Starts the daemon as systemd would with `Type=notify` and `WatchdogSec`: a notify socket
/// and `WATCHDOG_USEC`. The temporary directory holds the config and must outlive the daemon.
fn spawn_under_systemd(
    c: &Clusters,
    watchdog: Duration,
) -> (NotifySocket, tempfile::TempDir, Daemon) {
    let sock = NotifySocket::bind();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    let path = sock.path.to_str().unwrap().to_string();
    let usec = watchdog.as_micros().to_string();
    d.spawn_with_env(&[], &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", &usec)]);
    (sock, dir, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_sequence() {
    let c = Clusters::start().await;
    seed_orders(&c, 50).await;
    let (sock, _dir, mut d) = spawn_under_systemd(&c, Duration::from_secs(1));
    let t = Duration::from_secs(30);

    let ready = sock.wait(0, "READY=1", t).await;
    assert!(
        sock.all()[ready].1.contains("STATUS="),
        "READY=1 comes with a STATUS= line: {:?}",
        sock.all()[ready]
    );
    d.wait_streaming("shop.orders").await;
    sock.wait(ready, "WATCHDOG=1", t).await;
    wait_until("three watchdog pings", t, || async {
        sock.watchdogs().len() >= 3
    })
    .await;
    let summary = sock.wait(ready + 1, "STATUS=", t).await;
    wait_until("STATUS= reports the streaming namespace", t, || async {
        sock.all()
            .iter()
            .skip(summary)
            .any(|(_, m)| m.contains("STATUS=1 namespaces (1 streaming)"))
    })
    .await;

    // Reload: RELOADING=1, then READY=1 again.
    let before = sock.all().len();
    d.signal("HUP");
    let reloading = sock.wait(before, "RELOADING=1", t).await;
    sock.wait(reloading, "READY=1", t).await;

    // Stop: STOPPING=1 and exit 0.
    let before = sock.all().len();
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    sock.find(before, "STOPPING=1")
        .unwrap_or_else(|| panic!("no STOPPING=1 after SIGTERM: {:#?}", sock.all()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_keeps_beating_while_the_source_is_down() {
    let c = Clusters::start().await;
    seed_orders(&c, 50).await;
    let (sock, _dir, mut d) = spawn_under_systemd(&c, Duration::from_secs(2));
    sock.wait(0, "READY=1", Duration::from_secs(30)).await;
    d.wait_streaming("shop.orders").await;

    // The supervisor loop waits for the network only with bounded timeouts, so a source
    // outage is not a hung supervisor: the pings go on and systemd does not kill the daemon.
    c.source.stop().await;
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    // /healthz stays 200 (the loop is alive) and /readyz says why it is not ready.
    assert_eq!(d.get("/healthz").await.unwrap().0, 200);
    wait_until(
        "/readyz reports the unreachable source",
        Duration::from_secs(10),
        || async {
            d.get("/readyz")
                .await
                .is_some_and(|(code, body)| code == 503 && body.contains("source unreachable"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed())).await;
    let pings: Vec<Instant> = sock
        .watchdogs()
        .into_iter()
        .filter(|t| *t >= outage)
        .collect();
    c.source.restart().await.unwrap();
    let mut last = outage;
    let mut largest = Duration::ZERO;
    for t in &pings {
        largest = largest.max(t.duration_since(last));
        last = *t;
    }
    largest = largest.max(outage.elapsed().saturating_sub(last.duration_since(outage)));
    eprintln!(
        "largest gap between WATCHDOG=1 during the outage: {largest:?} ({} pings)",
        pings.len()
    );
    // Below http::HEALTHZ_STALL (15 s) and far below the unit's WatchdogSec (30 s).
    assert!(
        largest < Duration::from_secs(14),
        "largest gap between WATCHDOG=1 during a source outage: {largest:?} ({} pings)",
        pings.len()
    );
    assert_eq!(d.get("/healthz").await.unwrap().0, 200);
    d.wait_streaming("shop.orders").await;
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_one(doc! {"_id": 777})
        .await
        .unwrap();
    wait_converged(&c, &[ORDERS], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_never_contain_document_contents() {
    const SECRET_VALUE: &str = "doc-value-never-logged-8e2a";
    let c = Clusters::start().await;
    // The source allows the same email twice; the destination has a unique index on it, so
    // the second document is rejected (E11000, whose server message quotes the key value).
    let customers = c.src.database("shop").collection::<Document>("customers");
    customers
        .insert_many(vec![
            doc! {"_id": 1, "email": SECRET_VALUE, "note": SECRET_VALUE},
            doc! {"_id": 2, "email": SECRET_VALUE, "note": SECRET_VALUE},
        ])
        .await
        .unwrap();
    c.dst
        .database("shop")
        .collection::<Document>("customers")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"shop.*\"]\n\n[log]\nformat = \"json\"\nlevel = \"debug,mongodb=warn\"\n\n\
         [checkpoint]\ninterval_seconds = 1\n\n[shutdown]\ntimeout_seconds = 10\n",
    );
    d.wait_streaming("shop.customers").await;
    // Streamed changes, one at a time (in one batch, the delete of _id 1 could be written before
    // the insert of _id 3, and that insert would then not collide): an update, another
    // duplicate (a second dead letter), a delete.
    customers
        .update_one(
            doc! {"_id": 1},
            doc! {"$set": {"note": format!("{SECRET_VALUE}-2")}},
        )
        .await
        .unwrap();
    customers
        .insert_one(doc! {"_id": 3, "email": SECRET_VALUE})
        .await
        .unwrap();
    d.wait_metric_at_least(
        "mongo_syncd_dead_letters_total{namespace=\"shop.customers\"}",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    customers.delete_one(doc! {"_id": 1}).await.unwrap();
    d.wait_metric_at_least(
        "mongo_syncd_events_applied_total{namespace=\"shop.customers\",op=\"delete\"}",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());

    let logs = d.logs();
    let mut messages = Vec::new();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("log line is not JSON ({e}): {line}\n--- whole log:\n{logs}")
        });
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(messages.len() > 5, "{logs}");
    assert!(messages.iter().any(|m| m.contains("dead letter")), "{logs}");
    assert!(
        messages.iter().any(|m| m == "worker state changed"),
        "{logs}"
    );
    assert!(
        !logs.contains(SECRET_VALUE),
        "a document value reached the log:\n{logs}"
    );
}

/// Every per-namespace series a dashboard or alert reads, for one namespace.
const PER_NAMESPACE_FAMILIES: &[&str] = &[
    "mongo_syncd_lag_seconds",
    "mongo_syncd_applied_through_timestamp_seconds",
    "mongo_syncd_checkpoint_age_seconds",
    "mongo_syncd_queue_events",
    "mongo_syncd_worker_state",
    "mongo_syncd_initial_sync_documents_estimated",
    "mongo_syncd_validation_mismatched_documents",
    "mongo_syncd_validation_last_success_timestamp_seconds",
    "mongo_syncd_events_read_total",
    "mongo_syncd_events_applied_total",
    "mongo_syncd_writes_total",
    "mongo_syncd_replay_skipped_total",
    "mongo_syncd_worker_restarts_total",
    "mongo_syncd_errors_total",
    "mongo_syncd_initial_sync_documents_copied_total",
    "mongo_syncd_validation_runs_total",
    "mongo_syncd_conflicts_total",
    "mongo_syncd_dead_letters_total",
];

/// Polls `/readyz` until its first 200, then at once reads `/metrics` and the status.
async fn first_ready_scrape(d: &Daemon) -> (String, serde_json::Value) {
    let started = Instant::now();
    loop {
        if let Some((200, _)) = d.get("/readyz").await {
            let (_, metrics) = d.get("/metrics").await.expect("/metrics answers");
            let status = d.status().await.expect("status answers");
            return (metrics, status);
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "/readyz never said 200; log:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_every_series_present(metrics: &str, ns: &str, when: &str) {
    let label = format!("namespace=\"{ns}\"");
    let has = |family: &str, extra: &str| {
        metrics.lines().any(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&label))
                && l.contains(extra)
        })
    };
    let missing: Vec<&str> = PER_NAMESPACE_FAMILIES
        .iter()
        .copied()
        .filter(|f| !has(f, ""))
        .collect();
    assert!(
        missing.is_empty(),
        "{when}: no series for {missing:?}:\n{metrics}"
    );
    for kind in ["transient", "history_lost", "document"] {
        assert!(
            has("mongo_syncd_errors_total", &format!("kind=\"{kind}\"")),
            "{when}: errors_total kind {kind}"
        );
    }
    for outcome in ["applied", "skipped", "journaled"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("mongo_syncd_conflicts_total{")
                    && l.contains(&label)
                    && l.contains("policy=\"source-wins\"")
                    && l.contains(&format!("outcome=\"{outcome}\""))),
            "{when}: conflicts_total outcome {outcome}:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_exists_when_readyz_first_says_200() {
    let c = Clusters::start().await;
    seed_orders(&c, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    let (metrics, status) = first_ready_scrape(&d).await;
    assert_every_series_present(&metrics, "shop.orders", "first start");
    assert!(
        status["namespaces"]["shop.orders"]["lag_seconds"].is_number(),
        "ready with an unknown lag: {status}"
    );

    // After a restart the worker resumes from its checkpoint, without a copy: the series
    // are there as soon as it is ready again.
    assert_eq!(d.terminate().await, Some(0));
    d.spawn(&[]);
    let (metrics, status) = first_ready_scrape(&d).await;
    assert_every_series_present(&metrics, "shop.orders", "after a restart");
    assert!(
        status["namespaces"]["shop.orders"]["lag_seconds"].is_number(),
        "ready with an unknown lag after a restart: {status}"
    );
}

/// DESIGN §2.9 / issue 11 item 9: the source's cluster time is taken from the change stream's
/// replies too, not only from the `hello` every 5 s: a write's cluster time shows in the
/// status as soon as its event is read. Three writes in a row must each show within 1.5 s;
/// with the 5 s `hello` alone, at most one of them could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_cluster_time_follows_the_stream_not_only_the_periodic_hello() {
    let c = Clusters::start().await;
    seed_orders(&c, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    d.wait_streaming("shop.orders").await;
    let orders = c.src.database("shop").collection::<Document>("orders");
    let mut session = c.src.start_session().await.unwrap();
    for i in 0..3 {
        orders
            .insert_one(doc! {"_id": 1_000 + i})
            .session(&mut session)
            .await
            .unwrap();
        let written = session.operation_time().expect("an operation time");
        wait_until(
            &format!("the status shows write {i}'s cluster time"),
            Duration::from_millis(1_500),
            || async {
                let Some(status) = d.status().await else {
                    return false;
                };
                let t = &status["source"]["cluster_time"];
                let seen = (t["t"].as_u64().unwrap_or(0), t["i"].as_u64().unwrap_or(0));
                seen >= (written.time as u64, written.increment as u64)
            },
        )
        .await;
    }
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 11 item 7: one memory budget for the whole daemon. Eight namespaces take a backlog
/// of ~13 MB while the destination is blocked; the events read ahead never exceed
/// `apply.max_buffered_bytes` (2 MiB) in total, yet the readers do fill it (the budget, not
/// the workload, is what bounds them). Once the destination answers again, everything lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_destination_buffers_at_most_the_daemon_wide_budget() {
    const BUDGET: f64 = 2_097_152.0;
    let c = Clusters::start().await;
    let db = c.src.database("budget");
    let names: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    for n in &names {
        db.collection::<Document>(n)
            .insert_one(doc! {"_id": -1})
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"budget.*\"]\n[apply]\nbatch_max_bytes = 1048576\nmax_buffered_bytes = 2097152\n",
    );
    for n in &names {
        d.wait_streaming(&format!("budget.{n}")).await;
    }
    assert_eq!(
        d.metric("mongo_syncd_buffer_budget_bytes").await,
        Some(BUDGET)
    );
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["insert", "update", "delete"], "blockConnection": true, "blockTimeMS": 1_500},
        })
        .unwrap();
    let pad = "p".repeat(4_000);
    for n in &names {
        let docs: Vec<Document> = (0..400).map(|i| doc! {"_id": i, "pad": &pad}).collect();
        db.collection::<Document>(n)
            .insert_many(docs)
            .await
            .unwrap();
    }
    let mut peak = 0.0f64;
    let sampling = Instant::now();
    while sampling.elapsed() < Duration::from_secs(6) {
        let held = d.metric("mongo_syncd_buffered_bytes").await.unwrap_or(0.0);
        assert!(held <= BUDGET, "{held} bytes buffered, over the budget");
        peak = peak.max(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peak >= BUDGET / 2.0,
        "the readers never filled the budget: peak {peak}"
    );
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    let namespaces: Vec<(&str, &str)> = names.iter().map(|n| ("budget", n.as_str())).collect();
    wait_converged(&c, &namespaces, Duration::from_secs(120)).await;
    d.wait_metric("mongo_syncd_buffered_bytes", 0.0, Duration::from_secs(30))
        .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 11 item 7: the budget covers a batch until it is written, not only the events queued
/// for it: a batch the destination holds still counts in `mongo_syncd_buffered_bytes` (with
/// batches written while the next is prepared, two batches per namespace would otherwise sit
/// outside the budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_being_written_still_counts_against_the_budget() {
    let c = Clusters::start().await;
    let coll = c.src.database("budget").collection::<Document>("held");
    coll.insert_one(doc! {"_id": -1}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"budget.held\"]\n");
    d.wait_streaming("budget.held").await;
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["insert"], "blockConnection": true, "blockTimeMS": 4_000,
                     "namespace": "budget.held"},
        })
        .unwrap();
    let pad = "p".repeat(4_000);
    coll.insert_many((0..50).map(|i| doc! {"_id": i, "pad": &pad}))
        .await
        .unwrap();
    // The batch is read and sent; while the destination holds it, its bytes stay counted.
    d.wait_metric_at_least(
        "mongo_syncd_events_read_total",
        50.0,
        Duration::from_secs(30),
    )
    .await;
    let held = d.metric("mongo_syncd_buffered_bytes").await.unwrap_or(0.0);
    assert!(
        held >= 50.0 * 4_000.0,
        "a batch held by the destination counts {held} bytes, not its ~200 kB"
    );
    wait_converged(&c, &[("budget", "held")], Duration::from_secs(60)).await;
    d.wait_metric("mongo_syncd_buffered_bytes", 0.0, Duration::from_secs(30))
        .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 11 item 8: the connections the daemon holds to each cluster are in the status and in
/// `mongo_syncd_connections{side}`, and they are the simulator's own count of them, give or
/// take the driver's monitoring connections (outside the pool) and this test's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_the_connections_held_to_each_cluster() {
    let c = Clusters::start().await;
    seed_orders(&c, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    d.wait_streaming("shop.orders").await;
    let open_on = |client: mongodb::Client| async move {
        client
            .database("admin")
            .run_command(doc! {"serverStatus": 1})
            .await
            .unwrap()
            .get_document("connections")
            .unwrap()
            .get_i32("current")
            .unwrap() as i64
    };
    for side in ["source", "destination"] {
        wait_until(
            &format!("the {side} connections agree in the status, the metric and the server"),
            Duration::from_secs(20),
            || async {
                let Some(status) = d.status().await else {
                    return false;
                };
                let reported = status[side]["connections"].as_i64().unwrap_or(-1);
                let metric = d
                    .metric(&format!("mongo_syncd_connections{{side=\"{side}\"}}"))
                    .await
                    .unwrap_or(-1.0) as i64;
                let server = open_on(if side == "source" {
                    c.src.clone()
                } else {
                    c.dst.clone()
                })
                .await;
                reported >= 1 && reported == metric && reported <= server
            },
        )
        .await;
    }
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

//! The HTTP API of the real binary (DESIGN §5): authentication of the mutating endpoints, JSON
//! errors, `/readyz` before and after the copy, `/metrics` content type, and status redaction.

use std::time::Duration;

use bson::{doc, Document};
use reqwest::StatusCode;

use crate::support::cluster::{free_port, wait_until, Clusters, Daemon};

const TOKEN: &str = "api-token-7f3e9a";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs `body` to `path`, with `Authorization: Bearer <token>` when given.
async fn post(
    d: &Daemon,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let mut req = client()
        .post(format!("http://{}{path}", d.http))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("http request");
    let code = resp.status();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{path} answered {code} with non-JSON {text:?}: {e}"));
    (code, json)
}

/// An error answer: the expected code and a JSON body `{"error": "<non-empty>"}`.
fn assert_error(what: &str, got: (StatusCode, serde_json::Value), code: StatusCode) {
    assert_eq!(got.0, code, "{what}: body {}", got.1);
    let message = got.1["error"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no error message in {}", got.1);
}

async fn wait_http(d: &Daemon) {
    wait_until(
        "the http listener answers",
        Duration::from_secs(30),
        || async { d.get("/healthz").await.is_some() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_endpoints_need_the_bearer_token() {
    let c = Clusters::start().await;
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &c,
        dir.path(),
        &format!("token = \"{TOKEN}\"\n\n[sync]\nnamespaces = [\"shop.*\"]\n"),
    );
    wait_http(&d).await;
    // Force-sync and validate naming shop.orders need the namespace to be known (404 before).
    d.wait_streaming("shop.orders").await;

    for path in ["/api/v1/force-sync", "/api/v1/validate"] {
        assert_error(
            &format!("{path} without a token"),
            post(&d, path, None, "").await,
            StatusCode::UNAUTHORIZED,
        );
        assert_error(
            &format!("{path} with a wrong token"),
            post(&d, path, Some("api-token-7f3e9b"), "").await,
            StatusCode::UNAUTHORIZED,
        );
        assert_error(
            &format!("{path} with a prefix of the token"),
            post(&d, path, Some("api-token"), "").await,
            StatusCode::UNAUTHORIZED,
        );
        for body in [
            "{",
            "[]",
            "{\"namespaces\": \"shop.orders\"}",
            "{\"namespaces\": [42]}",
            "{\"namespaces\": [\"nodot\"]}",
            "{\"unknown\": 1}",
        ] {
            assert_error(
                &format!("{path} with body {body}"),
                post(&d, path, Some(TOKEN), body).await,
                StatusCode::BAD_REQUEST,
            );
        }
        let (code, json) = post(&d, path, Some(TOKEN), "").await;
        assert_eq!(code, StatusCode::ACCEPTED, "{path}: {json}");
        assert_eq!(json["accepted"], true);
        let (code, json) = post(&d, path, Some(TOKEN), "{\"namespaces\": [\"shop.orders\"]}").await;
        assert_eq!(code, StatusCode::ACCEPTED, "{path}: {json}");
        assert_eq!(json["namespaces"][0], "shop.orders");
    }
    // GET on a POST endpoint and unknown paths answer JSON errors too.
    let resp = client()
        .get(format!("http://{}/api/v1/force-sync", d.http))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let (code, body) = d.get("/nope").await.unwrap();
    assert_eq!(code, 404);
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string());

    // The two accepted force-syncs are counted with trigger="http".
    d.wait_metric(
        "mongo_syncd_force_syncs_total{trigger=\"http\"}",
        2.0,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_mutating_endpoints_answer_403() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "");
    wait_http(&d).await;
    for path in ["/api/v1/force-sync", "/api/v1/validate"] {
        assert_error(
            &format!("{path} without a token configured"),
            post(&d, path, None, "").await,
            StatusCode::FORBIDDEN,
        );
        assert_error(
            &format!("{path} with some token, none configured"),
            post(&d, path, Some(TOKEN), "").await,
            StatusCode::FORBIDDEN,
        );
    }
    // Nothing was triggered.
    assert_eq!(
        d.metric("mongo_syncd_force_syncs_total")
            .await
            .unwrap_or(0.0),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_flips_from_503_to_200_once_the_copy_is_done_and_metrics_has_the_right_type() {
    let c = Clusters::start().await;
    let docs: Vec<Document> = (0..2_000).map(|i| doc! {"_id": i, "v": i}).collect();
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_many(docs)
        .await
        .unwrap();
    // The destination holds the copy's first write for 3 s: the copy cannot finish early.
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 3000},
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_http(&d).await;

    let (code, body) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503, "/readyz before the copy: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["ready"], false);
    assert!(
        !json["reasons"].as_array().unwrap().is_empty(),
        "503 without reasons: {body}"
    );
    // /healthz is about the process, not the pipeline: 200 already.
    assert_eq!(d.get("/healthz").await.unwrap().0, 200);

    wait_until("/readyz answers 200", Duration::from_secs(60), || async {
        d.get("/readyz").await.is_some_and(|(code, _)| code == 200)
    })
    .await;
    let status = d.status().await.unwrap();
    assert_eq!(status["namespaces"]["shop.orders"]["state"], "streaming");
    assert_eq!(status["namespaces"]["shop.orders"]["copy"]["copied"], 2_000);

    let resp = client()
        .get(format!("http://{}/metrics", d.http))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4"
    );
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("mongo_syncd_worker_state{namespace=\"shop.orders\",state=\"streaming\"} 1")
    );
    assert!(body.contains(
        "mongo_syncd_initial_sync_documents_copied_total{namespace=\"shop.orders\"} 2000"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_logs_never_show_credentials() {
    const PASSWORD: &str = "pw-never-shown-31c7";
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    // mongo-sim does not implement authentication (no saslStart), so a URI with credentials
    // cannot reach a running pipeline; a source that is not listening keeps the daemon waiting
    // for it with the HTTP API up, which is where credentials could leak.
    let mut d = Daemon::configure(&c, dir.path(), "");
    let dead = free_port();
    let config = format!(
        "[source]\nuri = \"mongodb://syncer:{PASSWORD}@127.0.0.1:{dead}/?replicaSet=src&serverSelectionTimeoutMS=500\"\n\n\
         [destination]\nuri = \"mongodb://writer:{PASSWORD}@{}/?replicaSet=dst\"\n\n\
         [http]\nlisten = \"{}\"\n\n[log]\nlevel = \"debug,mongodb=debug\"\n",
        c.dest.host(),
        d.http
    );
    std::fs::write(&d.config_path, config).unwrap();
    d.spawn(&[]);
    wait_http(&d).await;
    wait_until(
        "the daemon logs that it waits for the source",
        Duration::from_secs(30),
        || async { d.logs().contains("waiting for the source cluster") },
    )
    .await;
    let (code, body) = d.get("/api/v1/status").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        !body.contains(PASSWORD),
        "status leaks the password: {body}"
    );
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let hosts = status["source"]["hosts"].as_str().unwrap();
    assert!(hosts.contains(&format!("127.0.0.1:{dead}")), "{hosts}");
    assert!(
        hosts.contains("***"),
        "the redacted URI shows where credentials were: {hosts}"
    );
    assert_eq!(status["source"]["connected"], false);
    let (code, body) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("source unreachable"), "{body}");
    let (_, metrics) = d.get("/metrics").await.unwrap();
    assert!(!metrics.contains(PASSWORD));
    assert!(
        !d.logs().contains(PASSWORD),
        "logs leak the password:\n{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    assert!(
        !d.logs().contains(PASSWORD),
        "logs leak the password:\n{}",
        d.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pipeline_with_credentials_never_shows_them() {
    const SRC_PASSWORD: &str = "src-pw-4b1d9e";
    const DST_PASSWORD: &str = "dst-pw-c07a55";
    let source = mongo_sim::MongoSim::builder()
        .replica_set("src")
        .auth("syncer", SRC_PASSWORD)
        .noop_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let dest = mongo_sim::MongoSim::builder()
        .replica_set("dst")
        .auth("writer", DST_PASSWORD)
        .noop_interval(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let src_uri = format!(
        "mongodb://syncer:{SRC_PASSWORD}@{}/?replicaSet=src&authSource=admin",
        source.host()
    );
    let dst_uri = format!(
        "mongodb://writer:{DST_PASSWORD}@{}/?replicaSet=dst&authSource=admin",
        dest.host()
    );
    let c = Clusters {
        src: mongodb::Client::with_uri_str(&src_uri).await.unwrap(),
        dst: mongodb::Client::with_uri_str(&dst_uri).await.unwrap(),
        source,
        dest,
    };
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_many((0..100).map(|i| doc! {"_id": i, "n": i}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), "");
    std::fs::write(
        &d.config_path,
        format!(
            "[source]\nuri = \"{src_uri}\"\n\n[destination]\nuri = \"{dst_uri}\"\n\n\
             [http]\nlisten = \"{}\"\ntoken = \"{TOKEN}\"\n\n[sync]\nnamespaces = [\"shop.*\"]\n\n\
             [log]\nlevel = \"debug\"\n",
            d.http
        ),
    )
    .unwrap();
    d.spawn(&[]);
    crate::support::cluster::wait_converged(&c, &[("shop", "orders")], Duration::from_secs(60))
        .await;
    wait_until("shop.orders streams", Duration::from_secs(30), || async {
        d.namespace_state("shop.orders").await.as_deref() == Some("streaming")
    })
    .await;
    let (code, json) = post(&d, "/api/v1/force-sync", Some(TOKEN), "").await;
    assert_eq!(code, StatusCode::ACCEPTED, "{json}");

    let secrets = [SRC_PASSWORD, DST_PASSWORD, TOKEN];
    let (_, status) = d.get("/api/v1/status").await.unwrap();
    let (_, metrics) = d.get("/metrics").await.unwrap();
    let (_, readyz) = d.get("/readyz").await.unwrap();
    for (what, text) in [
        ("status", &status),
        ("metrics", &metrics),
        ("readyz", &readyz),
    ] {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows {secret:?}: {text}");
        }
    }
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["source"]["connected"], true);
    let hosts = status["source"]["hosts"].as_str().unwrap();
    assert!(hosts.contains("syncer:***@"), "{hosts}");
    // The force-sync's own log lines are checked too: a stop before it ends would interrupt it
    // (it resumes on the next start), so wait for it.
    wait_until(
        "the force-sync finishes",
        Duration::from_secs(30),
        || async { d.logs().contains("force-sync finished") },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    let logs = d.logs();
    for secret in secrets {
        assert!(!logs.contains(secret), "the log shows {secret:?}:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_answer_json_413_and_unknown_namespaces_404() {
    let c = Clusters::start().await;
    c.src
        .database("shop")
        .collection::<Document>("orders")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &c,
        dir.path(),
        &format!("token = \"{TOKEN}\"\n\n[sync]\nnamespaces = [\"shop.*\"]\n"),
    );
    wait_http(&d).await;
    d.wait_streaming("shop.orders").await;

    for path in ["/api/v1/force-sync", "/api/v1/validate"] {
        // A body far larger than any list of namespaces: 413, as JSON like every error.
        let huge = format!("{{\"namespaces\": [\"{}.x\"]}}", "a".repeat(256 << 10));
        assert_error(
            &format!("{path} with a 256 KiB body"),
            post(&d, path, Some(TOKEN), &huge).await,
            StatusCode::PAYLOAD_TOO_LARGE,
        );
        // A namespace the daemon does not sync: 404, and nothing is triggered.
        let got = post(
            &d,
            path,
            Some(TOKEN),
            "{\"namespaces\": [\"shop.orders\", \"shop.nope\"]}",
        )
        .await;
        assert!(
            got.1["error"]
                .as_str()
                .unwrap_or_default()
                .contains("shop.nope"),
            "{path}: {}",
            got.1
        );
        assert_error(
            &format!("{path} naming an unknown namespace"),
            got,
            StatusCode::NOT_FOUND,
        );
    }
    assert_eq!(
        d.metric("mongo_syncd_force_syncs_total{trigger=\"http\"}")
            .await
            .unwrap_or(0.0),
        0.0,
        "a refused force-sync must not be counted"
    );
}

/// Slowloris: a few hundred connections that send nothing, or half a request, must neither
/// keep `/healthz` and `/metrics` from answering nor stop replication, and must be closed by
/// the server within its header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_do_not_starve_the_listener() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let c = Clusters::start().await;
    let orders = c.src.database("shop").collection::<Document>("orders");
    orders.insert_one(doc! {"_id": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_http(&d).await;
    d.wait_streaming("shop.orders").await;

    let mut idle = Vec::new();
    let mut half_sent = Vec::new();
    for i in 0..300 {
        let mut conn = tokio::net::TcpStream::connect(d.http).await.unwrap();
        if i % 2 == 0 {
            conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            half_sent.push(conn);
        } else {
            idle.push(conn);
        }
    }

    // For a few seconds, with every slow connection open: the probes answer promptly and
    // writes keep arriving on the destination.
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let mut written = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for path in ["/healthz", "/metrics"] {
            let resp = quick
                .get(format!("http://{}{path}", d.http))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path} under slowloris: {e}"));
            assert_eq!(resp.status(), StatusCode::OK, "{path} under slowloris");
        }
        written += 1;
        orders.insert_one(doc! {"_id": written}).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target = c.dst.database("shop").collection::<Document>("orders");
    wait_until(
        "replication keeps moving under slowloris",
        Duration::from_secs(30),
        || async { target.count_documents(doc! {}).await.unwrap_or(0) == written as u64 + 1 },
    )
    .await;

    // The server closes both kinds within its header timeout (plus slack for a loaded host).
    let closed = |mut conn: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                // A 408 answer before the close is fine.
                Ok(Ok(_)) => continue,
            }
        }
    };
    let results = futures::future::join_all(half_sent.into_iter().chain(idle).map(closed)).await;
    let open = results.iter().filter(|closed| !**closed).count();
    assert_eq!(
        open,
        0,
        "{open} of {} slow connections still open after 30 s",
        results.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_soft_limit_is_raised_to_the_hard_limit() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::configure(&c, dir.path(), "");
    let log = std::fs::File::create(dir.path().join("prlimit.log")).unwrap();
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .unwrap();
    // Started with a soft limit of 256 (the hard limit stays the test's own).
    let mut child = std::process::Command::new("prlimit")
        .arg(format!("--nofile=256:{hard}"))
        .arg(env!("CARGO_BIN_EXE_mongo-syncd"))
        .args(["run", "--config"])
        .arg(&d.config_path)
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_http(&d).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], hard, "soft limit not raised: {line}");
}

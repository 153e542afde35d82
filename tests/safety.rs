//! Operating safely (DESIGN §2.10): a replaced source or a wiped destination never destroys the
//! copy, the source under another host name is refused, and the mass-delete guard pauses
//! copies, force-syncs and repairs that would delete most of a namespace.

use std::time::Duration;

use bson::{doc, Document};
use mongo_sim::{MongoSim, SimHandle};
use mongodb::Client;

use crate::support::cluster::{free_port, wait_converged, wait_until, Clusters, Daemon};

const TOKEN: &str = "safety-token";

/// A new, empty simulated replica set on `port` (a new `replicaSetId`), as if another cluster
/// now answered at the old address.
async fn start_sim_on(port: u16, set_name: &str) -> SimHandle {
    for _ in 0..100 {
        match MongoSim::builder()
            .replica_set(set_name)
            .port(port)
            .noop_interval(Duration::from_secs(1))
            .start()
            .await
        {
            Ok(sim) => return sim,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot bind a new simulator on port {port}");
}

async fn count(client: &Client, db: &str, coll: &str) -> u64 {
    client
        .database(db)
        .collection::<Document>(coll)
        .count_documents(doc! {})
        .await
        .unwrap()
}

async fn insert_range(client: &Client, db: &str, coll: &str, ids: std::ops::Range<i32>) {
    client
        .database(db)
        .collection::<Document>(coll)
        .insert_many(ids.map(|i| doc! {"_id": i, "n": i}).collect::<Vec<_>>())
        .await
        .unwrap();
}

async fn drop_all_databases(client: &Client) {
    for db in client.list_database_names().await.unwrap() {
        if !matches!(db.as_str(), "admin" | "local" | "config") {
            client.database(&db).drop().await.unwrap();
        }
    }
}

async fn post(d: &Daemon, path: &str, body: serde_json::Value) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}{path}", d.http))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    (code, resp.text().await.unwrap_or_default())
}

async fn parked_reason(d: &Daemon, ns: &str) -> Option<String> {
    d.status().await.and_then(|s| {
        s["namespaces"][ns]["parked_reason"]
            .as_str()
            .map(str::to_string)
    })
}

async fn wait_paused_by_guard(d: &Daemon, ns: &str) {
    wait_until(
        &format!("{ns} paused by the mass-delete guard"),
        Duration::from_secs(90),
        || async { parked_reason(d, ns).await.as_deref() == Some("mass_delete_guard") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_replaced_while_running_stops_the_daemon_before_it_deletes() {
    let c = Clusters::start().await;
    insert_range(&c.src, "dr", "items", 0..900).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"dr.*\"]\n");
    d.wait_streaming("dr.items").await;
    wait_converged(&c, &[("dr", "items")], Duration::from_secs(60)).await;

    // Another cluster answers at the source's address: same set name, empty, new identity.
    let port = c.source.addr().port();
    c.source.stop().await;
    let replacement = start_sim_on(port, "src").await;
    assert_ne!(replacement.replica_set_id(), c.source.replica_set_id());

    let code = d.wait_exit(Duration::from_secs(90)).await;
    let logs = d.all_logs();
    assert_eq!(code, Some(78), "exits as a fresh start would; log:\n{logs}");
    assert_eq!(
        count(&c.dst, "dr", "items").await,
        900,
        "the destination keeps every document; log:\n{logs}"
    );
    assert!(
        logs.contains("source identity changed while running"),
        "one clear line; log:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_under_another_host_name_is_refused_before_anything_is_written() {
    let c = Clusters::start().await;
    insert_range(&c.src, "dr", "items", 0..10).await;
    let dir = tempfile::tempdir().unwrap();
    let port = c.source.addr().port();
    let http = free_port();
    let config = format!(
        "[source]\nuri = \"mongodb://127.0.0.1:{port}/?replicaSet=src\"\n\n[destination]\nuri = \"mongodb://localhost:{port}/?replicaSet=src\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n{}",
        crate::support::cluster::TEST_SETTINGS
    );
    std::fs::write(dir.path().join("mongo-syncd.toml"), config).unwrap();
    let mut d = Daemon::start_with_config(dir.path(), http);
    let code = d.wait_exit(Duration::from_secs(60)).await;
    let logs = d.logs();
    assert_eq!(code, Some(78), "log:\n{logs}");
    assert!(logs.contains("same deployment"), "{logs}");
    let dbs = c.src.list_database_names().await.unwrap();
    assert!(
        !dbs.iter().any(|db| db == "mongo_syncd"),
        "no metadata written into the source: {dbs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_wiped_while_running_is_copied_again() {
    let c = Clusters::start().await;
    insert_range(&c.src, "dr", "items", 0..600).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"dr.*\"]\n");
    d.wait_streaming("dr.items").await;
    wait_converged(&c, &[("dr", "items")], Duration::from_secs(60)).await;

    drop_all_databases(&c.dst).await;
    // Writes go on while the daemon notices.
    insert_range(&c.src, "dr", "items", 600..700).await;

    wait_converged(&c, &[("dr", "items")], Duration::from_secs(90)).await;
    d.wait_metric_at_least(
        "mongo_syncd_destination_resets_total{action=\"recopy\"}",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        d.logs()
            .contains("destination identity changed while running"),
        "{}",
        d.logs()
    );
    // It keeps streaming into the re-copied destination, with its metadata back.
    insert_range(&c.src, "dr", "items", 700..750).await;
    wait_converged(&c, &[("dr", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("dr.items").await;
    assert_eq!(
        d.metric("mongo_syncd_identity_mismatch{side=\"destination\"}")
            .await,
        Some(0.0)
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_wiped_while_running_stops_the_daemon_when_configured_to() {
    let c = Clusters::start().await;
    insert_range(&c.src, "dr", "items", 0..300).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"dr.*\"]\non_destination_reset = \"stop\"\n",
    );
    d.wait_streaming("dr.items").await;
    wait_converged(&c, &[("dr", "items")], Duration::from_secs(60)).await;

    drop_all_databases(&c.dst).await;
    insert_range(&c.src, "dr", "items", 300..310).await;

    let code = d.wait_exit(Duration::from_secs(60)).await;
    let logs = d.logs();
    assert_eq!(code, Some(78), "log:\n{logs}");
    assert!(
        logs.contains("the destination was wiped or replaced; stopping"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_replaced_while_running_is_copied_again() {
    let c = Clusters::start().await;
    insert_range(&c.src, "dr", "items", 0..500).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"dr.*\"]\n");
    d.wait_streaming("dr.items").await;
    wait_converged(&c, &[("dr", "items")], Duration::from_secs(60)).await;

    let port = c.dest.addr().port();
    c.dest.stop().await;
    let replacement = start_sim_on(port, "dst").await;
    let fresh = Client::with_uri_str(replacement.uri()).await.unwrap();
    insert_range(&c.src, "dr", "items", 500..550).await;

    wait_until(
        "the replacement destination holds the whole collection",
        Duration::from_secs(90),
        || async { count(&fresh, "dr", "items").await == 550 },
    )
    .await;
    d.wait_metric_at_least(
        "mongo_syncd_destination_resets_total{action=\"recopy\"}",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        d.logs()
            .contains("destination identity changed while running"),
        "{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_loss_recopy_of_an_emptied_source_waits_for_a_confirmation() {
    let c = Clusters::start_with_oplog(300).await;
    insert_range(&c.src, "g", "items", 0..100).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &format!("token = \"{TOKEN}\"\n[sync]\nnamespaces = [\"g.*\"]\n"),
    );
    d.wait_streaming("g.items").await;
    wait_converged(&c, &[("g", "items")], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());

    // While the daemon is down the collection is emptied and the oplog wraps past its token.
    c.src
        .database("g")
        .collection::<Document>("items")
        .delete_many(doc! {})
        .await
        .unwrap();
    insert_range(&c.src, "noise", "x", 0..600).await;
    d.spawn(&[]);

    wait_paused_by_guard(&d, "g.items").await;
    assert_eq!(count(&c.dst, "g", "items").await, 100, "nothing deleted");
    d.wait_metric_at_least(
        "mongo_syncd_mass_delete_guard_total{trigger=\"copy\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    let (code, body) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("mass_delete_guard"), "{body}");
    assert!(d.logs().contains("mass-delete guard"), "{}", d.logs());

    // Confirmation: unknown and unpaused namespaces are refused, the paused one goes on.
    assert_eq!(
        post(
            &d,
            "/api/v1/confirm",
            serde_json::json!({"namespaces": ["g.nope"]})
        )
        .await
        .0,
        404
    );
    assert_eq!(
        post(&d, "/api/v1/confirm", serde_json::json!({})).await.0,
        400
    );
    let (code, body) = post(
        &d,
        "/api/v1/confirm",
        serde_json::json!({"namespaces": ["g.items"]}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    wait_converged(&c, &[("g", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("g.items").await;
    assert_eq!(count(&c.dst, "g", "items").await, 0);
    assert_eq!(
        post(
            &d,
            "/api/v1/confirm",
            serde_json::json!({"namespaces": ["g.items"]})
        )
        .await
        .0,
        409,
        "no longer paused"
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// 150 documents on the destination that the source does not have, beside its 100.
async fn add_destination_extras(c: &Clusters, db: &str) {
    insert_range(&c.dst, db, "items", 1_000..1_150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_sync_that_would_delete_most_documents_waits_for_a_force_sync_naming_it() {
    let c = Clusters::start().await;
    insert_range(&c.src, "f", "items", 0..100).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &format!("token = \"{TOKEN}\"\n[sync]\nnamespaces = [\"f.*\"]\n"),
    );
    d.wait_streaming("f.items").await;
    wait_converged(&c, &[("f", "items")], Duration::from_secs(60)).await;
    add_destination_extras(&c, "f").await;

    // A force-sync of everything would delete 150 of 250: paused, nothing deleted.
    assert_eq!(
        post(&d, "/api/v1/force-sync", serde_json::json!({}))
            .await
            .0,
        202
    );
    wait_paused_by_guard(&d, "f.items").await;
    assert_eq!(count(&c.dst, "f", "items").await, 250);
    d.wait_metric_at_least(
        "mongo_syncd_mass_delete_guard_total{trigger=\"force_sync\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;

    // A force-sync naming it is the operator's confirmation.
    assert_eq!(
        post(
            &d,
            "/api/v1/force-sync",
            serde_json::json!({"namespaces": ["f.items"]})
        )
        .await
        .0,
        202
    );
    wait_converged(&c, &[("f", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("f.items").await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_would_delete_most_documents_is_paused() {
    let c = Clusters::start().await;
    insert_range(&c.src, "r", "items", 0..100).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &format!(
            "token = \"{TOKEN}\"\n[sync]\nnamespaces = [\"r.*\"]\n[validation]\ninterval_seconds = 0\nrepair = true\n"
        ),
    );
    d.wait_streaming("r.items").await;
    wait_converged(&c, &[("r", "items")], Duration::from_secs(60)).await;
    add_destination_extras(&c, "r").await;

    assert_eq!(
        post(&d, "/api/v1/validate", serde_json::json!({})).await.0,
        202
    );
    wait_paused_by_guard(&d, "r.items").await;
    assert_eq!(count(&c.dst, "r", "items").await, 250, "nothing deleted");
    d.wait_metric_at_least(
        "mongo_syncd_mass_delete_guard_total{trigger=\"repair\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    // The confirmation endpoint lifts it.
    let (code, body) = post(
        &d,
        "/api/v1/confirm",
        serde_json::json!({"namespaces": ["r.items"]}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    wait_converged(&c, &[("r", "items")], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

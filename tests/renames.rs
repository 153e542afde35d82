//! `sync.rename` changes for namespaces already in sync (issue 12 item 4): the new target is
//! copied, never streamed into empty, and the old target is left alone; two sources renamed
//! into one target are parked, never merged.

use std::time::Duration;

use bson::{doc, Document};

use crate::support::cluster::{wait_until, Clusters, Daemon};

async fn count(c: &Clusters, db: &str, coll: &str) -> u64 {
    c.dst
        .database(db)
        .collection::<Document>(coll)
        .count_documents(doc! {})
        .await
        .unwrap_or(0)
}

async fn wait_count(c: &Clusters, db: &str, coll: &str, n: u64) {
    wait_until(
        &format!("{n} documents in {db}.{coll} on the destination"),
        Duration::from_secs(90),
        || async { count(c, db, coll).await == n },
    )
    .await;
}

/// Rewrites the daemon's config with `extra` (the daemon's own settings kept).
fn rewrite(d: &Daemon, c: &Clusters, extra: &str) {
    let fresh = Daemon::configure(c, &d.dir, extra);
    let text = std::fs::read_to_string(&fresh.config_path)
        .unwrap()
        .replace(&fresh.http.to_string(), &d.http.to_string());
    std::fs::write(&d.config_path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rename_copies_the_new_target_by_sighup_and_across_a_restart() {
    let c = Clusters::start().await;
    let orders = c.src.database("shop").collection::<Document>("orders");
    orders
        .insert_many((0..1_000).map(|i| doc! {"_id": i, "v": i}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_count(&c, "shop", "orders", 1_000).await;
    d.wait_streaming("shop.orders").await;

    // A rename added by SIGHUP: the new target gets the whole collection, not just new events.
    rewrite(
        &d,
        &c,
        "[sync]\nnamespaces = [\"shop.*\"]\n[sync.rename]\n\"shop.orders\" = \"shop.orders_v2\"\n",
    );
    d.signal("HUP");
    // Writes made before the reload takes effect may still reach the old target: wait for it.
    wait_until(
        "the reload took effect",
        Duration::from_secs(30),
        || async {
            d.status()
                .await
                .is_some_and(|s| s["namespaces"]["shop.orders"]["target"] == "shop.orders_v2")
        },
    )
    .await;
    orders.insert_one(doc! {"_id": 1_000}).await.unwrap();
    wait_count(&c, "shop", "orders_v2", 1_001).await;
    d.wait_streaming("shop.orders").await;
    let status = d.status().await.unwrap();
    assert_eq!(
        status["namespaces"]["shop.orders"]["target"],
        "shop.orders_v2"
    );
    // The old target is left as it was, and the log says so.
    assert_eq!(count(&c, "shop", "orders").await, 1_000);
    assert!(
        d.logs().contains("old target is left as it is"),
        "{}",
        d.logs()
    );

    // A rename changed while the daemon is down: the next start copies the new target.
    assert_eq!(d.terminate().await, Some(0));
    orders.insert_one(doc! {"_id": 1_001}).await.unwrap();
    rewrite(
        &d,
        &c,
        "[sync]\nnamespaces = [\"shop.*\"]\n[sync.rename]\nshop = \"archive\"\n",
    );
    d.spawn(&[]);
    wait_count(&c, "archive", "orders", 1_002).await;
    d.wait_streaming("shop.orders").await;
    assert_eq!(count(&c, "shop", "orders_v2").await, 1_001);
    assert!(
        d.logs().contains("old target is left as it is"),
        "{}",
        d.logs()
    );
    // And it keeps streaming into the new target.
    orders.insert_one(doc! {"_id": 1_002}).await.unwrap();
    wait_count(&c, "archive", "orders", 1_003).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_renamed_into_one_target_are_parked_not_merged() {
    let c = Clusters::start().await;
    for db in ["a", "b"] {
        c.src
            .database(db)
            .collection::<Document>("x")
            .insert_many((0..50).map(|i| doc! {"_id": i, "from": db}))
            .await
            .unwrap();
    }
    c.src
        .database("a")
        .collection::<Document>("y")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Wildcards: check-config cannot see that `b` exists; discovery does.
    let d = Daemon::start(
        &c,
        dir.path(),
        "token = \"rename-token\"\n\n[sync.rename]\na = \"b\"\n",
    );
    let parked = |status: &serde_json::Value, ns: &str| {
        status["namespaces"][ns]["state"] == "parked"
            && status["namespaces"][ns]["parked_reason"] == "rename_collision"
    };
    wait_until(
        "a.x and b.x parked with reason rename_collision",
        Duration::from_secs(60),
        || async {
            d.status()
                .await
                .is_some_and(|s| parked(&s, "a.x") && parked(&s, "b.x"))
        },
    )
    .await;
    // a.y has no twin: it is synced into b.y as configured.
    wait_count(&c, "b", "y", 1).await;
    // Nothing was merged into b.x.
    assert_eq!(count(&c, "b", "x").await, 0);
    let (code, body) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("rename_collision"), "{body}");
    assert!(d.logs().contains("rename_collision"), "{}", d.logs());
    // A force-sync or validation of a colliding namespace would do nothing: refused with 409.
    for path in ["/api/v1/force-sync", "/api/v1/validate"] {
        let resp = reqwest::Client::new()
            .post(format!("http://{}{path}", d.http))
            .bearer_auth("rename-token")
            .header("content-type", "application/json")
            .body(r#"{"namespaces": ["a.x"]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 409, "{path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("rename_collision"),
            "{path}: {body}"
        );
    }
}

//! End-to-end replication: initial copy, then streamed inserts, updates, replaces, deletes.

use std::time::Duration;

use bson::{doc, Document};

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_then_streams_every_kind_of_change() {
    let c = Clusters::start().await;
    let orders = c.src.database("shop").collection::<Document>("orders");
    let docs: Vec<Document> = (0..500)
        .map(|i| doc! {"_id": i, "n": i, "tags": ["a", "b"], "nested": {"x": i}})
        .collect();
    orders.insert_many(docs).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_converged(&c, &[("shop", "orders")], Duration::from_secs(60)).await;
    wait_until("orders is streaming", Duration::from_secs(30), || async {
        d.namespace_state("shop.orders").await.as_deref() == Some("streaming")
    })
    .await;

    orders.insert_one(doc! {"_id": 1000, "n": 1}).await.unwrap();
    orders
        .update_one(
            doc! {"_id": 1},
            doc! {"$set": {"nested.x": "changed", "new": true}, "$unset": {"n": ""}},
        )
        .await
        .unwrap();
    orders
        .update_one(
            doc! {"_id": 2},
            doc! {"$inc": {"n": 5}, "$push": {"tags": "c"}},
        )
        .await
        .unwrap();
    orders
        .update_one(doc! {"_id": 3}, doc! {"$pop": {"tags": 1}})
        .await
        .unwrap();
    orders
        .replace_one(doc! {"_id": 4}, doc! {"replaced": "yes"})
        .await
        .unwrap();
    orders.delete_one(doc! {"_id": 5}).await.unwrap();
    orders
        .update_many(doc! {"n": {"$gte": 400}}, doc! {"$set": {"bulk": 1}})
        .await
        .unwrap();
    orders
        .delete_many(doc! {"n": {"$lt": 20, "$gt": 10}})
        .await
        .unwrap();
    wait_converged(&c, &[("shop", "orders")], Duration::from_secs(30)).await;

    let code = d.terminate().await;
    assert_eq!(code, Some(0), "log:\n{}", d.logs());
}

/// Indexes of a collection as `(name, key, unique, expireAfterSeconds)`, sorted by name.
async fn index_summary(
    client: &mongodb::Client,
    db: &str,
    coll: &str,
) -> Vec<(String, Document, bool, Option<i64>)> {
    use futures::TryStreamExt;
    let mut out: Vec<(String, Document, bool, Option<i64>)> = client
        .database(db)
        .run_cursor_command(doc! {"listIndexes": coll})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            (
                s.get_str("name").unwrap().to_string(),
                s.get_document("key").unwrap().clone(),
                s.get_bool("unique").unwrap_or(false),
                s.get("expireAfterSeconds")
                    .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from))),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_with_transactions_converges_with_indexes_and_options() {
    use crate::support::workload::{seed, Workload, NAMESPACES};
    let c = Clusters::start().await;
    let shop = c.src.database("shop");
    shop.run_command(doc! {"create": "orders", "validator": {"$jsonSchema": {"bsonType": "object", "required": ["_id"]}}})
        .await
        .unwrap();
    shop.run_command(doc! {"create": "customers", "collation": {"locale": "simple"}})
        .await
        .unwrap();
    shop.run_command(doc! {"createIndexes": "orders", "indexes": [
        {"key": {"name": 1}, "name": "name_1"},
        {"key": {"n": 1, "name": -1}, "name": "n_1_name_-1"},
        {"key": {"nested.a": 1}, "name": "by_a", "partialFilterExpression": {"n": {"$gt": 10}}},
        {"key": {"created": 1}, "name": "ttl", "expireAfterSeconds": 3600},
    ]})
    .await
    .unwrap();
    c.src
        .database("crm")
        .run_command(doc! {"createIndexes": "contacts", "indexes": [{"key": {"email": 1}, "name": "email_unique", "unique": true, "sparse": true}]})
        .await
        .unwrap();
    seed(&c.src, 3000).await;
    let workload = Workload::start(&c.src, 3, Duration::from_millis(2), 11);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "");
    wait_until(
        "the workload ran while syncing",
        Duration::from_secs(60),
        || async { workload.ops() > 1500 },
    )
    .await;
    let ops = workload.stop().await;
    assert!(ops > 1500);
    wait_converged(&c, NAMESPACES, Duration::from_secs(60)).await;

    // Indexes: same names, keys and uniqueness; TTL disabled on the destination.
    wait_until(
        "unique indexes are built after replay",
        Duration::from_secs(30),
        || async {
            index_summary(&c.dst, "crm", "contacts")
                .await
                .iter()
                .any(|i| i.0 == "email_unique" && i.2)
        },
    )
    .await;
    for (db, coll) in NAMESPACES {
        let src = index_summary(&c.src, db, coll).await;
        let dst = index_summary(&c.dst, db, coll).await;
        assert_eq!(
            src.len(),
            dst.len(),
            "{db}.{coll} indexes: {src:?} vs {dst:?}"
        );
        for (s, t) in src.iter().zip(&dst) {
            assert_eq!((&s.0, &s.1, s.2), (&t.0, &t.1, t.2), "{db}.{coll}");
            if s.3.is_some() {
                assert_eq!(
                    t.3,
                    Some(i32::MAX as i64),
                    "TTL disabled on the destination"
                );
            }
        }
    }
    // Options: validator and collation copied.
    let opts = |client: &mongodb::Client, coll: &'static str| {
        let client = client.clone();
        async move {
            use futures::TryStreamExt;
            let specs: Vec<Document> = client
                .database("shop")
                .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll}})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            specs[0].get_document("options").unwrap().clone()
        }
    };
    assert_eq!(
        opts(&c.src, "orders").await.get("validator"),
        opts(&c.dst, "orders").await.get("validator")
    );
    assert_eq!(
        opts(&c.src, "customers").await.get("collation"),
        opts(&c.dst, "customers").await.get("collation")
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

async fn opcounters(client: &mongodb::Client) -> Document {
    client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap()
        .get_document("opcounters")
        .unwrap()
        .clone()
}

/// Issue 11 item 6: a range the destination does not hold is copied as inserts (insert
/// speed), and ids the destination already holds fall back to replacements: a destination
/// that already holds stale versions of some documents and documents the source lacks still
/// ends exactly equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_writes_inserts_and_replaces_only_what_the_destination_already_holds() {
    let c = Clusters::start().await;
    let items = c.src.database("bulk").collection::<Document>("items");
    let docs: Vec<Document> = (0..3_000)
        .map(|i| doc! {"_id": i, "v": 1, "pad": "x".repeat(64)})
        .collect();
    items.insert_many(docs).await.unwrap();
    // Stale versions of 100 source documents, in another field order, and 10 the source lacks.
    let stale: Vec<Document> = (0..100)
        .map(|i| doc! {"v": 0, "_id": i, "stale": true})
        .chain((10_000..10_010).map(|i| doc! {"_id": i, "extra": true}))
        .collect();
    c.dst
        .database("bulk")
        .collection::<Document>("items")
        .insert_many(stale)
        .await
        .unwrap();
    let before = opcounters(&c.dst).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"bulk.*\"]\n");
    wait_converged(&c, &[("bulk", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("bulk.items").await;
    let after = opcounters(&c.dst).await;
    let delta = |k: &str| after.get_i64(k).unwrap() - before.get_i64(k).unwrap();
    // Every source document was sent as an insert once (the 100 held ones refused with E11000)…
    assert!(delta("insert") >= 3_000, "{before} -> {after}");
    // …and only those 100, plus the daemon's own checkpoint and status writes, as updates.
    assert!(delta("update") < 3_000 / 10, "{before} -> {after}");
    let code = d.terminate().await;
    assert_eq!(code, Some(0), "log:\n{}", d.logs());
}

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

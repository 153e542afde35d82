//! DDL on the source (drop, rename, dropDatabase, index changes, new collections) is
//! reflected on the destination without a restart.

use std::time::Duration;

use bson::{doc, Document};
use futures::TryStreamExt;

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

async fn collections(client: &mongodb::Client, db: &str) -> Vec<String> {
    let mut names = client.database(db).list_collection_names().await.unwrap();
    names.sort();
    names
}

async fn index_names(client: &mongodb::Client, db: &str, coll: &str) -> Vec<String> {
    let specs: Vec<Document> = match client
        .database(db)
        .run_cursor_command(doc! {"listIndexes": coll})
        .await
    {
        Ok(c) => c.try_collect().await.unwrap(),
        Err(_) => return Vec::new(),
    };
    let mut names: Vec<String> = specs
        .iter()
        .map(|s| s.get_str("name").unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_rename_drop_database_and_new_collections_are_reflected() {
    let c = Clusters::start().await;
    let app = c.src.database("app");
    for coll in ["keep", "gone", "old_name"] {
        app.collection::<Document>(coll)
            .insert_many(
                (0..50)
                    .map(|i| doc! {"_id": i, "c": coll})
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
    }
    let tmp = c.src.database("tmp");
    tmp.collection::<Document>("a")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    tmp.collection::<Document>("b")
        .insert_one(doc! {"_id": 1})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"app.*\", \"tmp.*\"]\n",
    );
    wait_converged(
        &c,
        &[
            ("app", "keep"),
            ("app", "gone"),
            ("app", "old_name"),
            ("tmp", "a"),
            ("tmp", "b"),
        ],
        Duration::from_secs(60),
    )
    .await;
    for ns in ["app.keep", "app.gone", "app.old_name", "tmp.a", "tmp.b"] {
        wait_until(
            &format!("{ns} streaming"),
            Duration::from_secs(30),
            || async { d.namespace_state(ns).await.as_deref() == Some("streaming") },
        )
        .await;
    }

    // drop
    app.collection::<Document>("gone").drop().await.unwrap();
    wait_until(
        "app.gone dropped on the destination",
        Duration::from_secs(30),
        || async {
            !collections(&c.dst, "app")
                .await
                .contains(&"gone".to_string())
        },
    )
    .await;
    // rename: the old name disappears, the new one is copied by its own worker
    c.src
        .database("admin")
        .run_command(doc! {"renameCollection": "app.old_name", "to": "app.new_name"})
        .await
        .unwrap();
    app.collection::<Document>("new_name")
        .insert_one(doc! {"_id": 100, "after": "rename"})
        .await
        .unwrap();
    wait_until("rename reflected", Duration::from_secs(30), || async {
        let names = collections(&c.dst, "app").await;
        !names.contains(&"old_name".to_string()) && names.contains(&"new_name".to_string())
    })
    .await;
    wait_converged(&c, &[("app", "new_name")], Duration::from_secs(30)).await;
    // dropDatabase
    tmp.drop().await.unwrap();
    wait_until(
        "tmp dropped on the destination",
        Duration::from_secs(30),
        || async { collections(&c.dst, "tmp").await.is_empty() },
    )
    .await;
    // a collection created later is picked up without a restart
    app.collection::<Document>("later")
        .insert_many((0..10).map(|i| doc! {"_id": i}).collect::<Vec<_>>())
        .await
        .unwrap();
    wait_converged(&c, &[("app", "later")], Duration::from_secs(30)).await;
    // index changes while streaming
    app.run_command(doc! {"createIndexes": "keep", "indexes": [{"key": {"c": 1}, "name": "c_1"}]})
        .await
        .unwrap();
    wait_until(
        "index created on the destination",
        Duration::from_secs(30),
        || async {
            index_names(&c.dst, "app", "keep")
                .await
                .contains(&"c_1".to_string())
        },
    )
    .await;
    app.run_command(doc! {"dropIndexes": "keep", "index": "c_1"})
        .await
        .unwrap();
    wait_until(
        "index dropped on the destination",
        Duration::from_secs(30),
        || async {
            !index_names(&c.dst, "app", "keep")
                .await
                .contains(&"c_1".to_string())
        },
    )
    .await;
    // finished namespaces leave status and metrics
    wait_until(
        "dropped namespaces leave the status",
        Duration::from_secs(30),
        || async {
            let s = d.status().await.unwrap();
            s["namespaces"]["app.gone"].is_null() && s["namespaces"]["tmp.a"].is_null()
        },
    )
    .await;
    let (_, metrics) = d.get("/metrics").await.unwrap();
    assert!(
        !metrics.contains("namespace=\"app.gone\""),
        "series of a dropped namespace are removed"
    );
    wait_converged(
        &c,
        &[("app", "keep"), ("app", "later"), ("app", "new_name")],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// A view on the source is skipped with a warning naming it; the collection it is defined on
/// is synced, and nothing of the view (nor `system.views`) appears on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_on_the_source_is_skipped_with_a_warning_and_its_collection_synced() {
    let c = Clusters::start().await;
    let shop = c.src.database("shop");
    shop.collection::<Document>("orders")
        .insert_many((0..20).map(|i| doc! {"_id": i, "total": i * 10}))
        .await
        .unwrap();
    shop.run_command(doc! {"create": "big_orders", "viewOn": "orders", "pipeline": [{"$match": {"total": {"$gte": 100}}}]})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"shop.*\"]\n");
    wait_converged(&c, &[("shop", "orders")], Duration::from_secs(60)).await;
    wait_until("the skip is logged", Duration::from_secs(30), || async {
        d.logs()
            .lines()
            .any(|l| l.contains("skipping: views") && l.contains("shop.big_orders"))
    })
    .await;
    // Writes keep flowing to the real collection, never to the view.
    shop.collection::<Document>("orders")
        .insert_one(doc! {"_id": 100, "total": 1000})
        .await
        .unwrap();
    wait_converged(&c, &[("shop", "orders")], Duration::from_secs(30)).await;
    assert_eq!(
        collections(&c.dst, "shop").await,
        vec!["orders".to_string()]
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

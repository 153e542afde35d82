//! Divergences the randomized soak (tests/soak) found, each minimised to a short scenario,
//! plus replays of whole seeds (one seed alone, no faults) where the seed itself is the short
//! scenario. The comment of each test names the seed that found it and the issue-9 item it
//! matches.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::Client;

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

async fn collection_names(client: &Client, db: &str) -> Vec<String> {
    let mut names = client.database(db).list_collection_names().await.unwrap();
    names.retain(|n| !n.starts_with("system."));
    names.sort();
    names
}

async fn dead_letters(dst: &Client) -> Vec<Document> {
    use futures::TryStreamExt;
    dst.database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Seed 215 (no faults): delete C{email: e1} then insert D{email: e1} under a unique index, in
/// one batch. D was dead-lettered (E11000) and missing on the destination. Issue 9 item 2 (c-apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_unique_delete_then_reinsert_is_applied_in_source_order() {
    let c = Clusters::start().await;
    let db = c.src.database("s215");
    let a = db.collection::<Document>("a");
    a.insert_many([
        doc! {"_id": 7, "email": "e1"},
        doc! {"_id": "x", "email": "e2"},
    ])
    .await
    .unwrap();
    db.run_command(doc! {"createIndexes": "a", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "");
    d.wait_streaming("s215.a").await;
    wait_until(
        "unique index on the destination",
        Duration::from_secs(30),
        || async {
            let names: Vec<String> = c
                .dst
                .database("s215")
                .collection::<Document>("a")
                .list_index_names()
                .await
                .unwrap_or_default();
            names.iter().any(|n| n == "email_1")
        },
    )
    .await;
    a.delete_one(doc! {"_id": 7}).await.unwrap();
    a.insert_one(doc! {"_id": 2, "email": "e1"}).await.unwrap();
    wait_converged(&c, &[("s215", "a")], Duration::from_secs(60)).await;
    assert_eq!(dead_letters(&c.dst).await, Vec::<Document>::new());
}

/// Seed 2 (SIGKILL fault): `renameCollection a -> c` while the daemon is stopped. The
/// destination kept `a` forever. Issue 9 item 4 (DDL while stopped, c-incarnation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rename_while_stopped_is_applied() {
    let c = Clusters::start().await;
    let db = c.src.database("s2");
    db.collection::<Document>("a")
        .insert_one(doc! {"_id": 1, "email": "e1"})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "");
    d.wait_streaming("s2.a").await;
    wait_converged(&c, &[("s2", "a")], Duration::from_secs(60)).await;
    d.kill9();
    c.src
        .database("admin")
        .run_command(doc! {"renameCollection": "s2.a", "to": "s2.c"})
        .await
        .unwrap();
    d.spawn(&[]);
    wait_until(
        "destination has only s2.c",
        Duration::from_secs(60),
        || async { collection_names(&c.dst, "s2").await == ["c"] },
    )
    .await;
    wait_converged(&c, &[("s2", "c")], Duration::from_secs(60)).await;
}

/// Seeds 1083 and 1085 (round 1050..1100): documents with the adjacent `_id`s 2^53 and
/// 2^53 + 1 written in one batch. The upsert failed with code 66 ("the (immutable) field '_id'
/// was found to have been altered") and the namespace was parked "unclassified". Issue 9 item 1
/// (exact `_id` keys, c-apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_adjacent_large_int64_ids_in_one_batch() {
    let c = Clusters::start().await;
    let b = c.src.database("s1083").collection::<Document>("b");
    b.insert_one(doc! {"_id": "seed", "email": "e0"})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&c, dir.path(), "");
    d.wait_streaming("s1083.b").await;
    let big = 1i64 << 53;
    b.insert_one(doc! {"_id": big, "email": "e1", "arr": [1]})
        .await
        .unwrap();
    b.insert_one(doc! {"_id": big + 1, "email": "e2", "arr": [2]})
        .await
        .unwrap();
    b.update_one(doc! {"_id": big}, doc! {"$set": {"n": 1}})
        .await
        .unwrap();
    b.delete_one(doc! {"_id": big + 1}).await.unwrap();
    wait_converged(&c, &[("s1083", "b")], Duration::from_secs(60)).await;
    assert_eq!(
        d.namespace_state("s1083.b").await.as_deref(),
        Some("streaming"),
        "log:\n{}",
        d.logs()
    );
}

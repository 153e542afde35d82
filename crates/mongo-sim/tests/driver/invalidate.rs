//! `invalidate` at batch cuts (issue 10, item 1): a change-stream cursor is closed only in the
//! reply that returns the `invalidate`, never while it is still pending, whether the batch that
//! fills is the `aggregate`'s first batch or a `getMore`'s, for collection, database and
//! deployment streams, at batch sizes 1, 2, 3 and unbounded.

use bson::{doc, Bson, Document};
use mongodb::Client;

use crate::common::*;

#[derive(Debug, Clone, Copy)]
enum StreamScope {
    Collection,
    Database,
    Deployment,
}

#[derive(Debug, Clone, Copy)]
enum Ddl {
    Drop,
    Rename,
    DropDatabase,
}

/// Where the batch cut is exercised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// The events are already in the oplog when the stream opens (`startAfter` a high-water
    /// mark taken before them): the `aggregate`'s first batch fills at the cut.
    Aggregate,
    /// The stream is open (empty first batch) before the events: `getMore` batches fill.
    GetMore,
}

fn ops(batch: &[Bson]) -> Vec<String> {
    batch
        .iter()
        .map(|e| {
            e.as_document()
                .and_then(|d| d.get_str("operationType").ok())
                .expect("event with operationType")
                .to_string()
        })
        .collect()
}

/// `(db, collection argument of aggregate, collection argument of getMore)`.
fn target(scope: StreamScope, db: &str) -> (String, Bson, String) {
    match scope {
        StreamScope::Collection => (db.to_string(), Bson::String("c".into()), "c".into()),
        StreamScope::Database => (db.to_string(), Bson::Int32(1), "$cmd.aggregate".into()),
        StreamScope::Deployment => ("admin".into(), Bson::Int32(1), "$cmd.aggregate".into()),
    }
}

fn stage(scope: StreamScope, start_after: Option<&Document>) -> Document {
    let mut cs = Document::new();
    if matches!(scope, StreamScope::Deployment) {
        cs.insert("allChangesForCluster", true);
    }
    if let Some(t) = start_after {
        cs.insert("startAfter", t.clone());
    }
    doc! {"$changeStream": cs}
}

fn cursor_opt(batch: Option<i32>) -> Document {
    match batch {
        Some(b) => doc! {"batchSize": b},
        None => Document::new(),
    }
}

/// One scenario: `inserts` inserts into `db.c`, then the DDL; returns every reply's
/// `(operation types, cursor id)` until the cursor closes or the expected events were seen.
#[allow(clippy::too_many_arguments)] // one scenario of the matrix, spelled out
async fn scenario(
    c: &Client,
    db: &str,
    scope: StreamScope,
    ddl: Ddl,
    path: Path,
    batch: Option<i32>,
    inserts: i32,
    expected: usize,
) -> Vec<(Vec<String>, i64)> {
    let (run_db, agg_target, gm_coll) = target(scope, db);
    let run_db = c.database(&run_db);
    let col = c.database(db).collection::<Document>("c");
    col.insert_one(doc! {"_id": -1}).await.unwrap();
    // Open a stream at "now" to take its high-water mark (before the scenario's writes).
    let first = run_db
        .run_command(doc! {
            "aggregate": agg_target.clone(),
            "pipeline": [stage(scope, None)],
            "cursor": cursor_opt(batch),
        })
        .await
        .unwrap();
    let first = first.get_document("cursor").unwrap().clone();
    assert!(first.get_array("firstBatch").unwrap().is_empty());
    let hwm = first.get_document("postBatchResumeToken").unwrap().clone();
    let mut id = first.get_i64("id").unwrap();
    assert_ne!(id, 0);
    let writes = async {
        let docs: Vec<Document> = (0..inserts).map(|i| doc! {"_id": i}).collect();
        if !docs.is_empty() {
            col.insert_many(docs).await.unwrap();
        }
        match ddl {
            Ddl::Drop => col.drop().await.unwrap(),
            Ddl::Rename => {
                admin(
                    c,
                    doc! {"renameCollection": format!("{db}.c"), "to": format!("{db}.renamed")},
                )
                .await
                .unwrap();
            }
            Ddl::DropDatabase => c.database(db).drop().await.unwrap(),
        }
    };
    let mut replies = Vec::new();
    if path == Path::Aggregate {
        run_db
            .run_command(doc! {"killCursors": gm_coll.clone(), "cursors": [id]})
            .await
            .unwrap();
        writes.await;
        let r = run_db
            .run_command(doc! {
                "aggregate": agg_target,
                "pipeline": [stage(scope, Some(&hwm))],
                "cursor": cursor_opt(batch),
            })
            .await
            .unwrap();
        let cur = r.get_document("cursor").unwrap();
        id = cur.get_i64("id").unwrap();
        replies.push((ops(cur.get_array("firstBatch").unwrap()), id));
    } else {
        writes.await;
    }
    let mut seen: usize = replies.iter().map(|(o, _)| o.len()).sum();
    // Bounded: at most one reply per event plus a few empty awaits.
    for _ in 0..expected + 20 {
        if id == 0 || seen >= expected {
            break;
        }
        let mut gm = doc! {"getMore": id, "collection": gm_coll.clone(), "maxTimeMS": 200i64};
        if let Some(b) = batch {
            gm.insert("batchSize", b);
        }
        let r = run_db.run_command(gm).await.unwrap();
        let cur = r.get_document("cursor").unwrap();
        id = cur.get_i64("id").unwrap();
        let batch_ops = ops(cur.get_array("nextBatch").unwrap());
        seen += batch_ops.len();
        if !batch_ops.is_empty() || id == 0 {
            replies.push((batch_ops, id));
        }
    }
    replies
}

fn expected_ops(scope: StreamScope, ddl: Ddl, inserts: i32) -> Vec<String> {
    let mut v: Vec<String> = (0..inserts).map(|_| "insert".to_string()).collect();
    let tail: &[&str] = match (scope, ddl) {
        (StreamScope::Collection, Ddl::Drop) => &["drop", "invalidate"],
        (StreamScope::Collection, Ddl::Rename) => &["rename", "invalidate"],
        (StreamScope::Collection, Ddl::DropDatabase) => &["drop", "invalidate"],
        (StreamScope::Database, Ddl::Drop) => &["drop"],
        (StreamScope::Database, Ddl::Rename) => &["rename"],
        (StreamScope::Database, Ddl::DropDatabase) => &["drop", "dropDatabase", "invalidate"],
        (StreamScope::Deployment, Ddl::Drop) => &["drop"],
        (StreamScope::Deployment, Ddl::Rename) => &["rename"],
        (StreamScope::Deployment, Ddl::DropDatabase) => &["drop", "dropDatabase"],
    };
    v.extend(tail.iter().map(|s| s.to_string()));
    v
}

/// Every scope × DDL × path × batch size, with insert counts that put the batch cut just
/// before, at and just after the DDL event and the invalidate.
async fn check_scope(scope: StreamScope) {
    let (_sim, c) = start_with_client().await;
    let mut n = 0;
    for ddl in [Ddl::Drop, Ddl::Rename, Ddl::DropDatabase] {
        for path in [Path::Aggregate, Path::GetMore] {
            for batch in [Some(1), Some(2), Some(3), None] {
                // Unbounded: the aggregate's default first batch is 101 events (the issue's
                // reproduction: 100 inserts and a drop fill it exactly); getMore has no cap.
                let counts: Vec<i32> = match (batch, path) {
                    (None, Path::Aggregate) => vec![98, 99, 100, 101],
                    (None, Path::GetMore) => vec![0, 100],
                    (Some(b), _) => (0..=b + 1).collect(),
                };
                for inserts in counts {
                    n += 1;
                    let db = format!("inv{n}");
                    let want = expected_ops(scope, ddl, inserts);
                    let replies =
                        scenario(&c, &db, scope, ddl, path, batch, inserts, want.len()).await;
                    let label = format!(
                        "{scope:?} {ddl:?} {path:?} batch {batch:?} inserts {inserts}: {replies:?}"
                    );
                    let got: Vec<String> = replies.iter().flat_map(|(o, _)| o.clone()).collect();
                    assert_eq!(got, want, "{label}");
                    for (i, (batch_ops, id)) in replies.iter().enumerate() {
                        if let Some(b) = batch {
                            assert!(batch_ops.len() <= b as usize, "{label}");
                        }
                        let last = i + 1 == replies.len();
                        let invalidates = want.last().map(String::as_str) == Some("invalidate");
                        if last && invalidates {
                            assert_eq!(id, &0, "closed with the invalidate: {label}");
                            assert_eq!(
                                batch_ops.last().map(String::as_str),
                                Some("invalidate"),
                                "{label}"
                            );
                        } else {
                            assert_ne!(id, &0, "open while events remain: {label}");
                        }
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn invalidate_survives_batch_cuts_on_collection_streams() {
    bounded(check_scope(StreamScope::Collection)).await
}

#[tokio::test]
async fn invalidate_survives_batch_cuts_on_database_streams() {
    bounded(check_scope(StreamScope::Database)).await
}

#[tokio::test]
async fn deployment_streams_stay_open_across_drops_at_batch_cuts() {
    bounded(check_scope(StreamScope::Deployment)).await
}

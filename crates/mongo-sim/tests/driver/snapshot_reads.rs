//! Reads at a point in time (issue 10 item 8): `readConcern: {level: "snapshot",
//! atClusterTime}` on find, aggregate and distinct outside transactions and at the start of a
//! transaction; getMore keeps the snapshot; too old → 239, in the future → 72; catalog changes
//! after the time → 246; `count` refuses level snapshot (72) as MongoDB does.

use bson::{doc, Bson, Document, Timestamp};
use mongodb::{error::ErrorKind, Database};

use crate::common::*;

fn ts(reply: &Document, key: &str) -> Timestamp {
    match reply.get(key) {
        Some(Bson::Timestamp(t)) => *t,
        other => panic!("{key} is not a timestamp in {reply}: {other:?}"),
    }
}

fn snapshot_at(at: Timestamp) -> Document {
    doc! {"level": "snapshot", "atClusterTime": at}
}

async fn command_error(db: &Database, cmd: Document) -> (i32, String, String) {
    let e = db
        .run_command(cmd.clone())
        .await
        .expect_err(&format!("{cmd} must fail"));
    match e.kind.as_ref() {
        ErrorKind::Command(c) => (c.code, c.code_name.clone(), c.message.clone()),
        other => panic!("{cmd}: not a command error: {other:?}"),
    }
}

fn ids(batch: &[Bson]) -> Vec<i32> {
    batch
        .iter()
        .map(|d| d.as_document().unwrap().get_i32("_id").unwrap())
        .collect()
}

/// Five documents, then the time after them; then an update, a delete and an insert.
async fn history(db: &Database) -> Timestamp {
    for i in 1..=5 {
        db.run_command(doc! {"insert": "c", "documents": [{"_id": i, "v": i}]})
            .await
            .unwrap();
    }
    let at = ts(
        &db.run_command(doc! {"ping": 1}).await.unwrap(),
        "operationTime",
    );
    db.run_command(doc! {"update": "c", "updates": [{"q": {"_id": 1}, "u": {"$set": {"v": 100}}}]})
        .await
        .unwrap();
    db.run_command(doc! {"delete": "c", "deletes": [{"q": {"_id": 2}, "limit": 1}]})
        .await
        .unwrap();
    db.run_command(doc! {"insert": "c", "documents": [{"_id": 6, "v": 6}]})
        .await
        .unwrap();
    at
}

#[tokio::test]
async fn find_aggregate_distinct_read_the_past() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        let at = history(&db).await;

        let r = db
            .run_command(doc! {"find": "c", "sort": {"_id": 1}, "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        let batch = cursor.get_array("firstBatch").unwrap();
        // The delete and the insert after the time are invisible; the update too.
        assert_eq!(ids(batch), vec![1, 2, 3, 4, 5]);
        assert_eq!(
            batch[0].as_document().unwrap(),
            &doc! {"_id": 1, "v": 1},
            "the version before the update"
        );
        assert_eq!(ts(cursor, "atClusterTime"), at);

        let r = db
            .run_command(doc! {"aggregate": "c", "pipeline": [{"$group": {"_id": null, "n": {"$sum": 1}, "s": {"$sum": "$v"}}}],
                "cursor": {}, "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        let group = cursor.get_array("firstBatch").unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        assert_eq!(group.get_i32("n").unwrap(), 5);
        assert_eq!(group.get_i32("s").unwrap(), 15);
        assert_eq!(ts(cursor, "atClusterTime"), at);

        let r = db
            .run_command(doc! {"distinct": "c", "key": "v", "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        assert_eq!(
            r.get_array("values").unwrap(),
            &vec![
                Bson::Int32(1),
                Bson::Int32(2),
                Bson::Int32(3),
                Bson::Int32(4),
                Bson::Int32(5)
            ]
        );
        assert_eq!(ts(&r, "atClusterTime"), at);

        // Today's state is unchanged, and a plain read reports no atClusterTime.
        let r = db
            .run_command(doc! {"find": "c", "sort": {"_id": 1}})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(ids(cursor.get_array("firstBatch").unwrap()), vec![1, 3, 4, 5, 6]);
        assert!(!cursor.contains_key("atClusterTime"));

        // count does not take level snapshot (MongoDB: supportsReadConcern → 72).
        let (code, _, msg) = command_error(
            &db,
            doc! {"count": "c", "readConcern": {"level": "snapshot"}},
        )
        .await;
        assert_eq!(code, 72, "{msg}");
        assert_eq!(
            msg,
            "Command count does not support { readConcern: { level: \"snapshot\" } } :: caused by :: read concern snapshot not supported"
        );
    })
    .await
}

#[tokio::test]
async fn get_more_continues_the_snapshot() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        let at = history(&db).await;
        let r = db
            .run_command(doc! {"find": "c", "sort": {"_id": 1}, "batchSize": 2, "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        let id = cursor.get_i64("id").unwrap();
        assert_ne!(id, 0);
        assert_eq!(ids(cursor.get_array("firstBatch").unwrap()), vec![1, 2]);
        // Writes between the batches change nothing in the snapshot.
        db.run_command(doc! {"delete": "c", "deletes": [{"q": {"_id": 4}, "limit": 1}]})
            .await
            .unwrap();
        db.run_command(doc! {"insert": "c", "documents": [{"_id": 7}]})
            .await
            .unwrap();
        let r = db
            .run_command(doc! {"getMore": id, "collection": "c"})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(ids(cursor.get_array("nextBatch").unwrap()), vec![3, 4, 5]);
        assert_eq!(cursor.get_i64("id").unwrap(), 0);
        assert_eq!(ts(cursor, "atClusterTime"), at);
    })
    .await
}

#[tokio::test]
async fn snapshot_without_at_cluster_time_reads_now_and_reports_it() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        let inserted = db
            .run_command(doc! {"insert": "c", "documents": [{"_id": 1}]})
            .await
            .unwrap();
        let write_time = ts(&inserted, "operationTime");
        let r = db
            .run_command(doc! {"find": "c", "readConcern": {"level": "snapshot"}})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(ids(cursor.get_array("firstBatch").unwrap()), vec![1]);
        let at = ts(cursor, "atClusterTime");
        assert!((at.time, at.increment) >= (write_time.time, write_time.increment));
        // Reading again at the reported time gives the same answer after a later write.
        db.run_command(doc! {"insert": "c", "documents": [{"_id": 2}]})
            .await
            .unwrap();
        let r = db
            .run_command(doc! {"find": "c", "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(ids(cursor.get_array("firstBatch").unwrap()), vec![1]);
    })
    .await
}

#[tokio::test]
async fn too_old_future_and_malformed_times_fail_as_mongodb() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        db.run_command(doc! {"insert": "c", "documents": [{"_id": 1}]})
            .await
            .unwrap();
        // Before the server's history (it keeps none from before it started).
        let old = Timestamp {
            time: 1,
            increment: 1,
        };
        let (code, name, msg) = command_error(
            &db,
            doc! {"find": "c", "readConcern": snapshot_at(old)},
        )
        .await;
        assert_eq!((code, name.as_str()), (239, "SnapshotTooOld"));
        assert_eq!(
            msg,
            "Read timestamp Timestamp(1, 1) is older than the oldest available timestamp."
        );

        let now = ts(
            &db.run_command(doc! {"ping": 1}).await.unwrap(),
            "operationTime",
        );
        let future = Timestamp {
            time: now.time + 1000,
            increment: 1,
        };
        let (code, _, msg) = command_error(
            &db,
            doc! {"aggregate": "c", "pipeline": [], "cursor": {}, "readConcern": snapshot_at(future)},
        )
        .await;
        assert_eq!(code, 72, "{msg}");
        assert!(
            msg.starts_with(&format!(
                "readConcern atClusterTime value must not be greater than the current clusterTime. Requested clusterTime: Timestamp({}, 1); current clusterTime: ",
                future.time
            )),
            "{msg}"
        );

        for (rc, code, msg) in [
            (
                doc! {"level": "majority", "atClusterTime": now},
                72,
                "atClusterTime field can be set only if level is equal to snapshot",
            ),
            (
                doc! {"atClusterTime": now},
                72,
                "atClusterTime field can be set only if level is equal to snapshot",
            ),
            (
                doc! {"level": "snapshot", "atClusterTime": now, "afterClusterTime": now},
                72,
                "Can not specify both afterClusterTime and atClusterTime",
            ),
            (
                doc! {"level": "snapshot", "atClusterTime": Timestamp { time: 0, increment: 0 }},
                72,
                "atClusterTime cannot be a null timestamp",
            ),
        ] {
            let cmd = doc! {"find": "c", "readConcern": rc};
            let (got, _, got_msg) = command_error(&db, cmd.clone()).await;
            assert_eq!((got, got_msg.as_str()), (code, msg), "{cmd}");
        }
        let (code, _, _) = command_error(
            &db,
            doc! {"find": "c", "readConcern": {"level": "snapshot", "atClusterTime": "bad"}},
        )
        .await;
        assert_eq!(code, 14);
    })
    .await
}

#[tokio::test]
async fn history_window_is_set_by_set_parameter() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        let admin = c.database("admin");
        let r = admin
            .run_command(doc! {"getParameter": 1, "minSnapshotHistoryWindowInSeconds": 1})
            .await
            .unwrap();
        assert_eq!(r.get_i32("minSnapshotHistoryWindowInSeconds").unwrap(), 300);
        let r = admin
            .run_command(doc! {"setParameter": 1, "minSnapshotHistoryWindowInSeconds": 1})
            .await
            .unwrap();
        assert_eq!(r.get_i32("was").unwrap(), 300);
        let at = ts(
            &db.run_command(doc! {"insert": "c", "documents": [{"_id": 1}]})
                .await
                .unwrap(),
            "operationTime",
        );
        db.run_command(doc! {"find": "c", "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        // Two seconds and a write later, the time has left the one-second window.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        db.run_command(doc! {"insert": "c", "documents": [{"_id": 2}]})
            .await
            .unwrap();
        let (code, _, msg) =
            command_error(&db, doc! {"find": "c", "readConcern": snapshot_at(at)}).await;
        assert_eq!(code, 239, "{msg}");
        // Unknown parameters are refused loudly, and only on admin.
        let (code, _, _) = command_error(
            &admin,
            doc! {"setParameter": 1, "notAParameterOfTheSimulator": 1},
        )
        .await;
        assert_eq!(code, 115);
        let (code, _, _) = command_error(
            &db,
            doc! {"setParameter": 1, "minSnapshotHistoryWindowInSeconds": 5},
        )
        .await;
        assert_eq!(code, 13);
    })
    .await
}

#[tokio::test]
async fn catalog_changes_after_the_time_are_snapshot_unavailable() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        db.run_command(doc! {"insert": "kept", "documents": [{"_id": 1}]})
            .await
            .unwrap();
        let at = ts(
            &db.run_command(doc! {"insert": "dropped", "documents": [{"_id": 1}]})
                .await
                .unwrap(),
            "operationTime",
        );
        db.run_command(doc! {"insert": "created", "documents": [{"_id": 1}]})
            .await
            .unwrap();
        db.run_command(doc! {"drop": "dropped"}).await.unwrap();
        for coll in ["created", "dropped"] {
            let (code, name, msg) = command_error(
                &db,
                doc! {"find": coll, "readConcern": snapshot_at(at)},
            )
            .await;
            assert_eq!((code, name.as_str()), (246, "SnapshotUnavailable"), "{coll}");
            assert!(
                msg.starts_with(&format!(
                    "Unable to read from a snapshot due to pending collection catalog changes; please retry the operation. Snapshot timestamp is Timestamp({}, {}). Collection minimum is Timestamp(",
                    at.time, at.increment
                )),
                "{msg}"
            );
        }
        let r = db
            .run_command(doc! {"find": "kept", "readConcern": snapshot_at(at)})
            .await
            .unwrap();
        assert_eq!(
            ids(r
                .get_document("cursor")
                .unwrap()
                .get_array("firstBatch")
                .unwrap()),
            vec![1]
        );
    })
    .await
}

#[tokio::test]
async fn transaction_starting_at_a_cluster_time() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("snap");
        let at = history(&db).await;
        let lsid = doc! {"id": bson::Binary::from_uuid(bson::Uuid::new())};
        let r = db
            .run_command(doc! {"find": "c", "sort": {"_id": 1}, "readConcern": snapshot_at(at),
                "lsid": lsid.clone(), "txnNumber": 1i64, "startTransaction": true, "autocommit": false})
            .await
            .unwrap();
        assert_eq!(
            ids(r
                .get_document("cursor")
                .unwrap()
                .get_array("firstBatch")
                .unwrap()),
            vec![1, 2, 3, 4, 5]
        );
        // The next statement reads the same snapshot.
        let r = db
            .run_command(doc! {"find": "c", "filter": {"_id": 1}, "lsid": lsid.clone(), "txnNumber": 1i64, "autocommit": false})
            .await
            .unwrap();
        let first = r.get_document("cursor").unwrap().get_array("firstBatch").unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        assert_eq!(first, doc! {"_id": 1, "v": 1});
        // A write to a document changed after the snapshot is a write conflict.
        let e = db
            .run_command(doc! {"update": "c", "updates": [{"q": {"_id": 1}, "u": {"$set": {"w": 1}}}],
                "lsid": lsid.clone(), "txnNumber": 1i64, "autocommit": false})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(112));

        // A transaction whose time is in the future never opens.
        let future = Timestamp {
            time: at.time + 1000,
            increment: 1,
        };
        let e = db
            .run_command(doc! {"find": "c", "readConcern": snapshot_at(future),
                "lsid": lsid.clone(), "txnNumber": 2i64, "startTransaction": true, "autocommit": false})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(72));
        let e = c
            .database("admin")
            .run_command(doc! {"abortTransaction": 1, "lsid": lsid.clone(), "txnNumber": 2i64, "autocommit": false})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(251));

        // A snapshot transaction that only reads commits.
        db.run_command(doc! {"find": "c", "readConcern": snapshot_at(at),
            "lsid": lsid.clone(), "txnNumber": 3i64, "startTransaction": true, "autocommit": false})
            .await
            .unwrap();
        c.database("admin")
            .run_command(doc! {"commitTransaction": 1, "lsid": lsid.clone(), "txnNumber": 3i64, "autocommit": false})
            .await
            .unwrap();
    })
    .await
}

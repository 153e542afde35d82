//! `--data-dir`: data, indexes, collection options and UUIDs, the oplog (resume tokens) and the
//! replica-set identity survive a clean stop and a SIGKILL of the `mongo-sim` process.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{change_stream::event::ResumeToken, Client, Collection};

use crate::common::*;

/// A `mongo-sim` process; killed (SIGKILL) when dropped.
struct SimProcess {
    child: Child,
    port: u16,
}

impl SimProcess {
    fn spawn(dir: &Path, port: u16) -> SimProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mongo-sim"))
            .args(["--port", &port.to_string(), "--replset", "rs0"])
            .args(["--noop-interval-seconds", "1"])
            .arg("--data-dir")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mongo-sim binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout piped"))
            .read_line(&mut line)
            .expect("first line");
        let port = line
            .trim()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        SimProcess { child, port }
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?replicaSet=rs0", self.port)
    }

    fn sigkill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    fn sigterm(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let exit = self.child.wait().expect("reaped");
        assert!(exit.success(), "clean stop exits 0: {exit:?}");
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn replica_set_id(client: &Client) -> bson::oid::ObjectId {
    admin(client, doc! {"replSetGetConfig": 1})
        .await
        .expect("replSetGetConfig")
        .get_document("config")
        .and_then(|c| c.get_document("settings"))
        .and_then(|s| s.get_object_id("replicaSetId"))
        .expect("settings.replicaSetId")
}

async fn collection_info(client: &Client, db: &str, coll: &str) -> Document {
    let mut cursor = client
        .database(db)
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll}})
        .await
        .expect("listCollections");
    cursor
        .try_next()
        .await
        .expect("listCollections batch")
        .expect("collection listed")
}

async fn index_names(col: &Collection<Document>) -> Vec<String> {
    let mut names = col.list_index_names().await.expect("listIndexes");
    names.sort();
    names
}

#[tokio::test]
async fn sigkill_mid_writes_keeps_data_oplog_tokens_and_identity() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let first = SimProcess::spawn(dir.path(), 0);
        let port = first.port;
        let c = client_for(&first.uri()).await;
        let db = c.database("persist");
        db.run_command(doc! {
            "create": "c",
            "validator": {"n": {"$type": "int"}},
            "changeStreamPreAndPostImages": {"enabled": true},
        })
        .await
        .unwrap();
        let col: Collection<Document> = db.collection("c");
        col.create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"u": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .name("u_1".to_string())
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
        let rs_id = replica_set_id(&c).await;
        let info_before = collection_info(&c, "persist", "c").await;
        col.insert_one(doc! {"_id": -1, "n": 0, "u": -1})
            .await
            .unwrap();
        col.update_one(doc! {"_id": -1}, doc! {"$set": {"n": 1}})
            .await
            .unwrap();
        let stream = col.watch().await.unwrap();
        let token: ResumeToken = stream.resume_token().expect("initial token");
        // Writes run concurrently with the kill; every acknowledged one must survive.
        let acked = Arc::new(AtomicI64::new(-1));
        let writer = {
            let col = col.clone();
            let acked = Arc::clone(&acked);
            tokio::spawn(async move {
                for i in 0i64.. {
                    if col
                        .insert_one(doc! {"_id": i, "n": i as i32, "u": i})
                        .await
                        .is_err()
                    {
                        return;
                    }
                    acked.store(i, Ordering::SeqCst);
                }
            })
        };
        eventually(Duration::from_secs(30), || {
            let acked = Arc::clone(&acked);
            async move { acked.load(Ordering::SeqCst) >= 200 }
        })
        .await;
        first.sigkill();
        let last_acked = acked.load(Ordering::SeqCst);
        writer.abort();
        drop(stream);

        let second = SimProcess::spawn(dir.path(), port);
        assert_eq!(second.port, port);
        let c2 = client_for(&second.uri()).await;
        let col2: Collection<Document> = c2.database("persist").collection("c");
        // Identity and catalog.
        assert_eq!(replica_set_id(&c2).await, rs_id);
        let info_after = collection_info(&c2, "persist", "c").await;
        assert_eq!(info_after.get("info"), info_before.get("info"), "same UUID");
        assert_eq!(info_after.get("options"), info_before.get("options"));
        assert_eq!(index_names(&col2).await, vec!["_id_", "u_1"]);
        // Data: every acknowledged insert, at most the one in flight beyond it.
        let n = col2.count_documents(doc! {}).await.unwrap() as i64;
        assert!(
            n == last_acked + 2 || n == last_acked + 3,
            "{n} documents for {last_acked} acknowledged inserts"
        );
        for i in [0, last_acked / 2, last_acked] {
            let d = col2.find_one(doc! {"_id": i}).await.unwrap();
            assert_eq!(d, Some(doc! {"_id": i, "n": i as i32, "u": i}));
        }
        assert_eq!(
            col2.find_one(doc! {"_id": -1}).await.unwrap(),
            Some(doc! {"_id": -1, "n": 1, "u": -1})
        );
        // The unique index and the validator still hold.
        let dup = col2
            .insert_one(doc! {"_id": "dup", "n": 1, "u": 0i64})
            .await
            .unwrap_err();
        assert_eq!(code(&dup), Some(11000));
        let invalid = col2
            .insert_one(doc! {"_id": "bad", "n": "text"})
            .await
            .unwrap_err();
        assert_eq!(code(&invalid), Some(121));
        // The oplog: a token from before the kill resumes right after its position.
        let mut resumed = col2
            .watch()
            .resume_after(token.clone())
            .full_document_before_change(mongodb::options::FullDocumentBeforeChangeType::Required)
            .await
            .unwrap();
        for i in 0..=last_acked {
            let ev = next(&mut resumed).await;
            assert_eq!(
                ev.document_key,
                Some(doc! {"_id": i}),
                "event {i} after the resume token"
            );
        }
        // New writes after the restart get later cluster times and flow to the same stream.
        col2.delete_one(doc! {"_id": -1}).await.unwrap();
        let ev = loop {
            let ev = next(&mut resumed).await;
            if ev.operation_type == mongodb::change_stream::event::OperationType::Delete {
                break ev;
            }
        };
        assert_eq!(
            ev.full_document_before_change,
            Some(doc! {"_id": -1, "n": 1, "u": -1}),
            "pre-images recorded before the kill survive"
        );
        // A third start after a clean stop (SIGTERM) is still the same replica set.
        second.sigterm();
        let third = SimProcess::spawn(dir.path(), port);
        let c3 = client_for(&third.uri()).await;
        assert_eq!(replica_set_id(&c3).await, rs_id);
        let col3: Collection<Document> = c3.database("persist").collection("c");
        assert_eq!(col3.count_documents(doc! {}).await.unwrap() as i64, n - 1);
        let mut again = col3.watch().resume_after(token).await.unwrap();
        assert_eq!(
            next(&mut again).await.document_key,
            Some(doc! {"_id": 0i64})
        );
    })
    .await
}

#[tokio::test]
async fn clean_shutdown_and_reopen_through_the_builder() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let sim = builder().data_dir(dir.path()).start().await.unwrap();
        let c = client(&sim).await;
        let col: Collection<Document> = c.database("persist").collection("b");
        col.insert_many((0..10).map(|i| doc! {"_id": i, "v": i}))
            .await
            .unwrap();
        col.update_many(doc! {"v": {"$gte": 5}}, doc! {"$inc": {"v": 100}})
            .await
            .unwrap();
        col.delete_one(doc! {"_id": 0}).await.unwrap();
        c.database("persist")
            .collection::<Document>("gone")
            .insert_one(doc! {})
            .await
            .unwrap();
        c.database("persist")
            .collection::<Document>("gone")
            .drop()
            .await
            .unwrap();
        admin(
            &c,
            doc! {"renameCollection": "persist.b", "to": "persist.renamed"},
        )
        .await
        .unwrap();
        let before = db_hash(&c, "persist").await;
        let rs_id = sim.replica_set_id();
        let cluster_time = sim.engine().cluster_time();
        sim.shutdown().await;
        drop(c);

        let sim = builder().data_dir(dir.path()).start().await.unwrap();
        assert_eq!(sim.replica_set_id(), rs_id);
        assert!(mongo_sim::oplog::ts_cmp(sim.engine().cluster_time(), cluster_time).is_ge());
        let c = client(&sim).await;
        let after = db_hash(&c, "persist").await;
        assert_eq!(after.get("collections"), before.get("collections"));
        assert_eq!(after.get("uuids"), before.get("uuids"));
        let names = c.database("persist").list_collection_names().await.unwrap();
        assert_eq!(names, vec!["renamed".to_string()]);
        // Another replica-set name is refused: the directory belongs to rs0.
        sim.shutdown().await;
        let err = builder()
            .data_dir(dir.path())
            .replica_set("other")
            .start()
            .await
            .err()
            .expect("a foreign data dir is refused");
        assert!(err.to_string().contains("rs0"), "{err}");
    })
    .await
}

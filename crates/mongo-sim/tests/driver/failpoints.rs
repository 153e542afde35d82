//! `configureFailPoint` / `failCommand`: every mode and data field.

use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use mongodb::Collection;

use crate::common::*;

async fn ping(c: &mongodb::Client) -> mongodb::error::Result<Document> {
    admin(c, doc! {"ping": 1}).await
}

#[tokio::test]
async fn times_skip_off_and_count() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        fail_command(
            &c,
            Bson::Document(doc! {"times": 2}),
            doc! {"failCommands": ["ping"], "errorCode": 2},
        )
        .await;
        assert_eq!(code(&ping(&c).await.unwrap_err()), Some(2));
        assert_eq!(code(&ping(&c).await.unwrap_err()), Some(2));
        ping(&c).await.unwrap();
        // skip: the first N matching commands pass, then it is always on.
        fail_command(
            &c,
            Bson::Document(doc! {"skip": 2}),
            doc! {"failCommands": ["ping"], "errorCode": 8},
        )
        .await;
        ping(&c).await.unwrap();
        ping(&c).await.unwrap();
        for _ in 0..3 {
            assert_eq!(code(&ping(&c).await.unwrap_err()), Some(8));
        }
        let r = admin(&c, doc! {"configureFailPoint": "failCommand", "mode": "off"})
            .await
            .unwrap();
        assert!(r.get("count").is_some());
        ping(&c).await.unwrap();
        // alwaysOn, for a command that is not listed nothing happens.
        fail_command(
            &c,
            Bson::from("alwaysOn"),
            doc! {"failCommands": ["find"], "errorCode": 2},
        )
        .await;
        ping(&c).await.unwrap();
        let col: Collection<Document> = c.database("fp").collection("c");
        for _ in 0..3 {
            assert_eq!(code(&col.find_one(doc! {}).await.unwrap_err()), Some(2));
        }
        // configureFailPoint itself is never failed, even if listed.
        fail_command(
            &c,
            Bson::from("alwaysOn"),
            doc! {"failCommands": ["configureFailPoint"], "errorCode": 2},
        )
        .await;
        fail_command_off(&c).await;
        col.find_one(doc! {}).await.unwrap();
        // Invalid configurations are refused.
        let err = admin(&c, doc! {"configureFailPoint": "failCommand", "mode": {"times": 1, "skip": 1}, "data": {"failCommands": ["ping"]}})
            .await
            .unwrap_err();
        assert!(code(&err).is_some());
        let err = admin(&c, doc! {"configureFailPoint": "noSuchFailPoint", "mode": "off"})
            .await
            .unwrap_err();
        assert!(code(&err).is_some());
    })
    .await
}

#[tokio::test]
async fn error_reply_shape_and_labels_override() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["ping"], "errorCode": 91, "errorLabels": ["CustomLabel"]},
        )
        .await;
        let err = ping(&c).await.unwrap_err();
        assert_eq!(code(&err), Some(91));
        assert!(err.contains_label("CustomLabel"));
        match err.kind.as_ref() {
            mongodb::error::ErrorKind::Command(e) => {
                assert_eq!(e.code_name, "ShutdownInProgress");
                assert!(!e.message.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
        let col: Collection<Document> = c.database("fp").collection("labels");
        // An empty errorLabels removes the RetryableWriteError label the server would add,
        // so the driver does not retry.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "errorCode": 91, "errorLabels": []},
        )
        .await;
        let err = col.insert_one(doc! {"_id": 1}).await.unwrap_err();
        assert_eq!(code(&err), Some(91));
        assert!(!err.contains_label("RetryableWriteError"));
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 0);
        // errorExtraInfo is merged into the reply.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["ping"], "errorCode": 2, "errorExtraInfo": {"extra": "x"}},
        )
        .await;
        let err = ping(&c).await.unwrap_err();
        let raw = err.server_response().expect("server response");
        assert_eq!(raw.get_str("extra").unwrap(), "x");
    })
    .await
}

#[tokio::test]
async fn block_connection_delays_the_command() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        ping(&c).await.unwrap();
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["ping"], "blockConnection": true, "blockTimeMS": 300},
        )
        .await;
        let started = Instant::now();
        ping(&c).await.unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(290), "not blocked: {took:?}");
        assert!(took < Duration::from_secs(3));
        // Block then fail.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["ping"], "blockConnection": true, "blockTimeMS": 200, "errorCode": 2},
        )
        .await;
        let started = Instant::now();
        assert_eq!(code(&ping(&c).await.unwrap_err()), Some(2));
        assert!(started.elapsed() >= Duration::from_millis(190));
        let err = admin(&c, doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": {"failCommands": ["ping"], "blockConnection": true}})
            .await
            .unwrap_err();
        assert!(code(&err).is_some(), "blockTimeMS is required");
    })
    .await
}

#[tokio::test]
async fn write_concern_error_is_appended_after_executing() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("fp").collection("wce");
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "writeConcernError": {"code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out", "errInfo": {"wtimeout": true}}},
        )
        .await;
        let err = col.insert_one(doc! {"_id": 1}).await.unwrap_err();
        match err.kind.as_ref() {
            mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(w)) => {
                assert_eq!(w.code, 64);
                assert_eq!(w.message, "waiting for replication timed out");
            }
            other => panic!("unexpected {other:?}"),
        }
        // The write itself happened.
        assert_eq!(col.count_documents(doc! {"_id": 1}).await.unwrap(), 1);
        // A retriable write-concern error code is labelled and the retry is not re-applied.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "writeConcernError": {"code": 91, "errmsg": "shutting down"}},
        )
        .await;
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 2);
        // Raw reply shape: ok 1 with writeConcernError.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "writeConcernError": {"code": 64, "errmsg": "x"}},
        )
        .await;
        let r = c
            .database("fp")
            .run_command(doc! {"insert": "wce", "documents": [{"_id": 3}]})
            .await;
        // run_command surfaces a write concern error as an error or as the reply; accept both
        // but require the code to be 64.
        match r {
            Ok(d) => assert_eq!(d.get_document("writeConcernError").unwrap().get_i32("code").unwrap(), 64),
            Err(e) => assert_eq!(code(&e), Some(64)),
        }
    })
    .await
}

#[tokio::test]
async fn app_name_targets_only_that_client() {
    bounded(async {
        let sim = start().await;
        let a = client_for(&format!("{}&appName=alpha", sim.uri())).await;
        let b = client_for(&format!("{}&appName=beta", sim.uri())).await;
        ping(&a).await.unwrap();
        ping(&b).await.unwrap();
        fail_command(
            &b,
            Bson::from("alwaysOn"),
            doc! {"failCommands": ["ping"], "errorCode": 2, "appName": "alpha"},
        )
        .await;
        assert_eq!(code(&ping(&a).await.unwrap_err()), Some(2));
        ping(&b).await.unwrap();
        fail_command_off(&b).await;
        ping(&a).await.unwrap();
        // namespace filter
        fail_command(
            &b,
            Bson::from("alwaysOn"),
            doc! {"failCommands": ["find"], "errorCode": 2, "namespace": "fp.target"},
        )
        .await;
        let t: Collection<Document> = a.database("fp").collection("target");
        let o: Collection<Document> = a.database("fp").collection("other");
        assert_eq!(code(&t.find_one(doc! {}).await.unwrap_err()), Some(2));
        o.find_one(doc! {}).await.unwrap();
        fail_command_off(&b).await;
    })
    .await
}

#[tokio::test]
async fn change_stream_get_more_failures_and_resumability() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("fp").collection("cs");
        // failCommand on getMore: no ResumableChangeStreamError label, so no resume.
        let mut s = col.watch().await.unwrap();
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["getMore"], "errorCode": 6},
        )
        .await;
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        let err = next_result(&mut s).await.unwrap_err();
        assert_eq!(code(&err), Some(6));
        assert!(!err.contains_label("ResumableChangeStreamError"));
        // With the label given explicitly the driver resumes.
        let mut s = col.watch().await.unwrap();
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["getMore"], "errorCode": 50, "errorLabels": ["ResumableChangeStreamError"]},
        )
        .await;
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        let e = next(&mut s).await;
        assert_eq!(e.document_key, Some(doc! {"_id": 2}));
        // failGetMoreAfterCursorCheckout: the server labels retriable codes itself.
        let mut s = col.watch().await.unwrap();
        admin(
            &c,
            doc! {"configureFailPoint": "failGetMoreAfterCursorCheckout", "mode": {"times": 1}, "data": {"errorCode": 6}},
        )
        .await
        .unwrap();
        col.insert_one(doc! {"_id": 3}).await.unwrap();
        let e = next(&mut s).await;
        assert_eq!(e.document_key, Some(doc! {"_id": 3}));
        // ...but not non-retriable ones.
        admin(
            &c,
            doc! {"configureFailPoint": "failGetMoreAfterCursorCheckout", "mode": {"times": 1}, "data": {"errorCode": 216}},
        )
        .await
        .unwrap();
        col.insert_one(doc! {"_id": 4}).await.unwrap();
        let err = next_result(&mut s).await.unwrap_err();
        assert_eq!(code(&err), Some(216));
    })
    .await
}

#[tokio::test]
async fn max_time_ms_expires_a_write_blocked_past_its_deadline() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fp");
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 300},
        )
        .await;
        // MongoDB counts the time blocked by a fail point against maxTimeMS: the write fails
        // with MaxTimeMSExpired and writes nothing.
        let update = doc! {
            "update": "mt",
            "updates": [{"q": {"_id": 1}, "u": {"_id": 1, "v": 1}, "upsert": true}],
            "maxTimeMS": 100,
        };
        let err = db.run_command(update.clone()).await.unwrap_err();
        assert_eq!(code(&err), Some(50));
        let col: Collection<Document> = db.collection("mt");
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 0);
        // Within its deadline the same write succeeds.
        db.run_command(update).await.unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
    })
    .await
}

#[tokio::test]
async fn max_time_ms_expires_ddl_blocked_past_its_deadline() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fp");
        db.create_collection("ddl").await.unwrap();
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["createIndexes"], "blockConnection": true, "blockTimeMS": 300},
        )
        .await;
        // A DDL command held past its maxTimeMS (as a server holds one waiting for its lock)
        // fails with MaxTimeMSExpired and builds nothing.
        let create = doc! {
            "createIndexes": "ddl",
            "indexes": [{"key": {"n": 1}, "name": "n_1"}],
            "maxTimeMS": 100,
        };
        let err = db.run_command(create.clone()).await.unwrap_err();
        assert_eq!(code(&err), Some(50));
        let names = db
            .collection::<Document>("ddl")
            .list_index_names()
            .await
            .unwrap();
        assert_eq!(names, vec!["_id_".to_string()]);
        // Within its deadline the same command builds the index.
        db.run_command(create).await.unwrap();
        let names = db
            .collection::<Document>("ddl")
            .list_index_names()
            .await
            .unwrap();
        assert!(names.contains(&"n_1".to_string()), "{names:?}");
    })
    .await
}

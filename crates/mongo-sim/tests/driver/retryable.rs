//! Retryable writes: a retry with the same (lsid, txnNumber) is never applied twice.

use bson::{doc, Bson, Document};
use mongodb::{change_stream::event::ChangeStreamEvent, options::ReturnDocument, Collection};

use crate::common::*;

/// Inserts after a `closeConnection` fail point on `insert`: the command never ran, the
/// driver retries once, the document exists exactly once.
#[tokio::test]
async fn close_connection_before_insert_then_retry_inserts_once() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("rw").collection("before");
        let mut stream = col.watch().await.unwrap();
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "closeConnection": true},
        )
        .await;
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        col.insert_one(doc! {"_id": "after"}).await.unwrap();
        assert_eq!(col.count_documents(doc! {"_id": 1}).await.unwrap(), 1);
        let e: ChangeStreamEvent<Document> = next(&mut stream).await;
        assert_eq!(e.document_key, Some(doc! {"_id": 1}));
        let e: ChangeStreamEvent<Document> = next(&mut stream).await;
        assert_eq!(e.document_key, Some(doc! {"_id": "after"}));
    })
    .await
}

async fn on_primary_transactional_write(c: &mongodb::Client, times: i32) {
    admin(
        c,
        doc! {"configureFailPoint": "onPrimaryTransactionalWrite", "mode": {"times": times}, "data": {"closeConnection": true}},
    )
    .await
    .unwrap();
}

async fn on_primary_transactional_write_off(c: &mongodb::Client) -> i64 {
    let r = admin(
        c,
        doc! {"configureFailPoint": "onPrimaryTransactionalWrite", "mode": "off"},
    )
    .await
    .unwrap();
    r.get("count")
        .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
        .unwrap()
}

/// The lost-acknowledgement case: the write commits, the connection closes before the reply,
/// the driver retries with the same txnNumber, the server answers from its record.
#[tokio::test]
async fn lost_ack_retry_is_not_applied_twice() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("rw").collection("lostack");
        col.insert_one(doc! {"_id": "counter", "n": 0})
            .await
            .unwrap();
        let mut stream = col.watch().await.unwrap().with_type::<Document>();

        on_primary_transactional_write(&c, 1).await;
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        assert_eq!(on_primary_transactional_write_off(&c).await, 1);

        on_primary_transactional_write(&c, 1).await;
        let r = col
            .update_one(doc! {"_id": "counter"}, doc! {"$inc": {"n": 1}})
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (1, 1));
        assert_eq!(on_primary_transactional_write_off(&c).await, 1);

        on_primary_transactional_write(&c, 1).await;
        let d = col
            .find_one_and_update(doc! {"_id": "counter"}, doc! {"$inc": {"n": 1}})
            .return_document(ReturnDocument::After)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.get_i32("n").unwrap(), 2);
        assert_eq!(on_primary_transactional_write_off(&c).await, 1);

        on_primary_transactional_write(&c, 1).await;
        let r = col.delete_one(doc! {"_id": 1}).await.unwrap();
        assert_eq!(r.deleted_count, 1);
        assert_eq!(on_primary_transactional_write_off(&c).await, 1);

        assert_eq!(
            col.find_one(doc! {"_id": "counter"})
                .await
                .unwrap()
                .unwrap()
                .get_i32("n")
                .unwrap(),
            2
        );
        col.insert_one(doc! {"_id": "end"}).await.unwrap();
        let mut kinds = Vec::new();
        loop {
            let e = next(&mut stream).await;
            if e.get_document("documentKey").unwrap().get("_id") == Some(&Bson::from("end")) {
                break;
            }
            kinds.push(e.get_str("operationType").unwrap().to_string());
        }
        assert_eq!(kinds, vec!["insert", "update", "update", "delete"]);
    })
    .await
}

#[tokio::test]
async fn retryable_error_codes_are_labelled_and_retried() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("rw").collection("labels");
        // 91 ShutdownInProgress is retriable: labelled RetryableWriteError, retried once.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "errorCode": 91},
        )
        .await;
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
        // Twice in a row: the retry fails too and the error carries the label.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 2}),
            doc! {"failCommands": ["insert"], "errorCode": 91},
        )
        .await;
        let err = col.insert_one(doc! {"_id": 2}).await.unwrap_err();
        assert_eq!(code(&err), Some(91));
        assert!(err.contains_label("RetryableWriteError"));
        // A non-retriable code is not labelled.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "errorCode": 2},
        )
        .await;
        let err = col.insert_one(doc! {"_id": 3}).await.unwrap_err();
        assert_eq!(code(&err), Some(2));
        assert!(!err.contains_label("RetryableWriteError"));
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
    })
    .await
}

#[tokio::test]
async fn raw_txn_numbers_replay_and_too_old() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("rw");
        let lsid = doc! {"id": bson::Binary::from_uuid(bson::Uuid::new())};
        let cmd = doc! {"update": "raw", "updates": [{"q": {"_id": 1}, "u": {"$inc": {"n": 1}}, "upsert": true}], "lsid": lsid.clone(), "txnNumber": 5i64};
        let r1 = db.run_command(cmd.clone()).await.unwrap();
        let r2 = db.run_command(cmd.clone()).await.unwrap();
        assert_eq!(r1.get_i32("n").unwrap(), r2.get_i32("n").unwrap());
        assert_eq!(r1.get_array("upserted").unwrap(), r2.get_array("upserted").unwrap());
        let d = db.collection::<Document>("raw").find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(d.get_i32("n").unwrap(), 1);
        let mut newer = cmd.clone();
        newer.insert("txnNumber", 6i64);
        db.run_command(newer).await.unwrap();
        let mut older = cmd.clone();
        older.insert("txnNumber", 4i64);
        let err = db.run_command(older).await.unwrap_err();
        assert_eq!(code(&err), Some(225));
        let d = db.collection::<Document>("raw").find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(d.get_i32("n").unwrap(), 2);
    })
    .await
}

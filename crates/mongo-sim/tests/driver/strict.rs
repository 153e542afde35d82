//! Strict parsing (issue 10, item 2): unknown fields, unknown `$changeStream` options, an
//! update statement with `sort`, `hint` naming a missing index, `$changeStream` read concern,
//! and unimplemented features all fail as (or as loudly as) MongoDB 7.0, never ignored.

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{error::ErrorKind, Database};

use crate::common::*;

/// The raw command error (code, codeName, errmsg) of a `run_command`.
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

#[tokio::test]
async fn unknown_fields_are_40415() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("strict");
        db.collection::<Document>("c")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        let (code, name, msg) = command_error(&db, doc! {"find": "c", "bogus": 1}).await;
        assert_eq!(
            (code, name.as_str(), msg.as_str()),
            (
                40415,
                "Location40415",
                "BSON field 'find.bogus' is an unknown field."
            )
        );
        for (cmd, path) in [
            (
                doc! {"aggregate": "c", "pipeline": [], "cursor": {}, "bogus": true},
                "aggregate.bogus",
            ),
            (
                doc! {"aggregate": "c", "pipeline": [], "cursor": {"batchSize": 1, "x": 1}},
                "aggregate.cursor.x",
            ),
            (
                doc! {"insert": "c", "documents": [{"_id": 2}], "bogus": 1},
                "insert.bogus",
            ),
            (
                doc! {"delete": "c", "deletes": [{"q": {}, "limit": 1, "sort": {"_id": 1}}]},
                "delete.deletes.sort",
            ),
            (doc! {"count": "c", "bogus": 1}, "count.bogus"),
            (
                doc! {"distinct": "c", "key": "a", "hint": {"_id": 1}},
                "distinct.hint",
            ),
            (
                doc! {"findAndModify": "c", "query": {}, "remove": true, "bogus": 1},
                "findAndModify.bogus",
            ),
            (
                doc! {"listCollections": 1, "bogus": 1},
                "listCollections.bogus",
            ),
            (doc! {"dbHash": 1, "bogus": 1}, "dbHash.bogus"),
            (
                doc! {"find": "c", "readConcern": {"level": "local", "x": 1}},
                "readConcern.x",
            ),
        ] {
            let (code, _, msg) = command_error(&db, cmd.clone()).await;
            assert_eq!(code, 40415, "{cmd}");
            assert_eq!(
                msg,
                format!("BSON field '{path}' is an unknown field."),
                "{cmd}"
            );
        }
        // Nothing was written by the refused insert.
        assert_eq!(
            db.collection::<Document>("c")
                .count_documents(doc! {})
                .await
                .unwrap(),
            1
        );
    })
    .await
}

#[tokio::test]
async fn update_statement_with_sort_is_rejected_as_in_7_0() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("strict");
        let col = db.collection::<Document>("c");
        col.insert_many(vec![doc! {"_id": 1, "a": 1}, doc! {"_id": 2, "a": 1}])
            .await
            .unwrap();
        let (code, name, msg) = command_error(
            &db,
            doc! {"update": "c", "updates": [{"q": {"a": 1}, "u": {"$set": {"b": 1}}, "sort": {"_id": -1}}]},
        )
        .await;
        assert_eq!(code, 40415);
        assert_eq!(name, "Location40415");
        assert_eq!(msg, "BSON field 'update.updates.sort' is an unknown field.");
        assert_eq!(col.count_documents(doc! {"b": 1}).await.unwrap(), 0);
    })
    .await
}

#[tokio::test]
async fn unknown_change_stream_options_are_rejected() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("strict");
        let (code, _, msg) = command_error(
            &db,
            doc! {"aggregate": "c", "pipeline": [{"$changeStream": {"bogus": 1}}], "cursor": {}},
        )
        .await;
        assert_eq!(code, 40415);
        assert_eq!(msg, "BSON field '$changeStream.bogus' is an unknown field.");
        // Known but unimplemented: loud.
        let (code, _, msg) = command_error(
            &db,
            doc! {"aggregate": "c", "pipeline": [{"$changeStream": {"showSystemEvents": true}}], "cursor": {}},
        )
        .await;
        assert_eq!(code, 115, "{msg}");
        assert!(msg.contains("showSystemEvents"), "{msg}");
        // The driver's own options go through.
        let mut s = db
            .collection::<Document>("c")
            .watch()
            .show_expanded_events(true)
            .full_document(mongodb::options::FullDocumentType::UpdateLookup)
            .await
            .unwrap()
            .with_type::<Document>();
        db.collection::<Document>("c")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        let e = next(&mut s).await;
        assert_eq!(e.get_str("operationType").unwrap(), "create");
    })
    .await
}

#[tokio::test]
async fn change_stream_read_concern_must_be_majority() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("strict");
        for level in ["local", "linearizable", "available", "snapshot"] {
            let (code, name, msg) = command_error(
                &db,
                doc! {"aggregate": "c", "pipeline": [{"$changeStream": {}}], "cursor": {}, "readConcern": {"level": level}},
            )
            .await;
            assert_eq!((code, name.as_str()), (72, "InvalidOptions"), "{level}");
            assert_eq!(
                msg,
                format!("Aggregation stage $changeStream cannot run with a readConcern other than 'majority'. Current readConcern: {level}")
            );
        }
        for rc in [Some(doc! {"level": "majority"}), Some(doc! {}), None] {
            let mut cmd =
                doc! {"aggregate": "c", "pipeline": [{"$changeStream": {}}], "cursor": {}};
            if let Some(rc) = rc {
                cmd.insert("readConcern", rc);
            }
            let r = db.run_command(cmd.clone()).await.unwrap();
            assert_ne!(r.get_document("cursor").unwrap().get_i64("id").unwrap(), 0);
        }
    })
    .await
}

#[tokio::test]
async fn hint_naming_a_missing_index_is_bad_value() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("strict");
        let col = db.collection::<Document>("c");
        col.insert_many(vec![doc! {"_id": 1, "a": 1}, doc! {"_id": 2, "a": 2}])
            .await
            .unwrap();
        db.run_command(doc! {"createIndexes": "c", "indexes": [{"key": {"a": 1}, "name": "a_1"}]})
            .await
            .unwrap();
        for hint in [
            bson::Bson::String("nope".into()),
            bson::Bson::Document(doc! {"b": 1}),
            bson::Bson::Document(doc! {"a": -1}),
        ] {
            for cmd in [
                doc! {"find": "c", "hint": hint.clone()},
                doc! {"count": "c", "hint": hint.clone()},
                doc! {"aggregate": "c", "pipeline": [], "cursor": {}, "hint": hint.clone()},
                doc! {"findAndModify": "c", "query": {}, "update": {"$set": {"x": 1}}, "hint": hint.clone()},
            ] {
                let (code, name, msg) = command_error(&db, cmd.clone()).await;
                assert_eq!((code, name.as_str()), (2, "BadValue"), "{cmd}");
                assert!(
                    msg.contains("hint provided does not correspond to an existing index"),
                    "{msg}"
                );
            }
            // Statement-level hints are write errors.
            for cmd in [
                doc! {"update": "c", "updates": [{"q": {}, "u": {"$set": {"x": 1}}, "hint": hint.clone()}]},
                doc! {"delete": "c", "deletes": [{"q": {}, "limit": 0, "hint": hint.clone()}]},
            ] {
                let r = db.run_command(cmd.clone()).await.unwrap();
                let we = r.get_array("writeErrors").expect("writeErrors");
                let we = we[0].as_document().unwrap();
                assert_eq!(we.get_i32("code").unwrap(), 2, "{cmd}");
                assert_eq!(r.get_i32("n").unwrap(), 0);
            }
        }
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 2);
        assert_eq!(col.count_documents(doc! {"x": 1}).await.unwrap(), 0);
        // Existing indexes, by name and by key (any numeric type), and $natural are fine.
        for hint in [
            bson::Bson::String("a_1".into()),
            bson::Bson::String("_id_".into()),
            bson::Bson::Document(doc! {"a": 1.0}),
            bson::Bson::Document(doc! {"_id": 1i64}),
            bson::Bson::Document(doc! {"$natural": -1}),
        ] {
            let r = db
                .run_command(doc! {"find": "c", "hint": hint.clone()})
                .await
                .unwrap();
            assert_eq!(
                r.get_document("cursor")
                    .unwrap()
                    .get_array("firstBatch")
                    .unwrap()
                    .len(),
                2,
                "{hint}"
            );
        }
        let found: Vec<Document> = col
            .find(doc! {})
            .hint(mongodb::options::Hint::Keys(doc! {"_id": 1}))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(found.len(), 2);
        // A hint on a collection that does not exist is not checked (EOF plan).
        db.run_command(doc! {"find": "missing", "hint": "nope"})
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn unimplemented_features_fail_loudly() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("strict");
        db.collection::<Document>("c")
            .insert_one(doc! {"_id": 1, "a": "A"})
            .await
            .unwrap();
        for (cmd, feature) in [
            (doc! {"find": "c", "tailable": true}, "tailable"),
            (doc! {"find": "c", "returnKey": true}, "returnKey"),
            (doc! {"find": "c", "showRecordId": true}, "showRecordId"),
            (
                doc! {"find": "c", "collation": {"locale": "de@collation=phonebook"}},
                "collation locale variants",
            ),
            (
                doc! {"aggregate": "c", "pipeline": [], "explain": true},
                "explain",
            ),
            (
                doc! {"update": "c", "updates": [{"q": {}, "u": {"$set": {"b": 1}}, "collation": {"locale": "fr", "backwards": true}}]},
                "backwards",
            ),
        ] {
            let (code, name, msg) = command_error(&db, cmd.clone()).await;
            assert_eq!(
                (code, name.as_str()),
                (115, "CommandNotSupported"),
                "{cmd}: {msg}"
            );
            assert!(msg.contains(feature), "{cmd}: {msg}");
        }
        // The defaults of the same options are accepted.
        for cmd in [
            doc! {"find": "c", "tailable": false, "returnKey": false, "showRecordId": false,
                  "collation": {"locale": "simple"}, "allowDiskUse": true, "noCursorTimeout": true,
                  "comment": "x", "maxTimeMS": 1000, "readConcern": {"level": "majority"}},
            doc! {"aggregate": "c", "pipeline": [], "cursor": {}, "explain": false, "allowDiskUse": false},
        ] {
            db.run_command(cmd.clone())
                .await
                .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        }
    })
    .await
}

//! Change streams through the driver: event shapes, every start option, fullDocument modes,
//! pre/post images, expanded events, user stages, scopes, PBRT, awaiting getMore, resume.

use std::time::{Duration, Instant};

use bson::{doc, Bson, Document, Timestamp};
use futures::StreamExt;
use mongodb::{
    change_stream::{
        event::{ChangeStreamEvent, OperationType, ResumeToken},
        ChangeStream,
    },
    options::{FullDocumentBeforeChangeType, FullDocumentType},
    Collection,
};

use crate::common::*;

type RawStream = ChangeStream<Document>;

async fn raw_watch(col: &Collection<Document>, pipeline: Vec<Document>) -> RawStream {
    col.watch()
        .pipeline(pipeline)
        .await
        .expect("watch")
        .with_type::<Document>()
}

fn token_of(event: &Document) -> ResumeToken {
    bson::deserialize_from_bson(event.get("_id").expect("_id").clone()).expect("token")
}

fn op(event: &Document) -> &str {
    event.get_str("operationType").unwrap()
}

#[tokio::test]
async fn event_shapes_for_crud_operations() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("shapes");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let mut s = raw_watch(&col, vec![]).await;
        // Array elements large enough that the server reports the truncation as a delta
        // (`truncatedArrays`) rather than the whole new array.
        let long = "l".repeat(40);
        let arr = vec![long.clone(), long.clone(), long.clone()];
        col.insert_one(doc! {"_id": 1, "a": 1, "arr": arr.clone(), "gone": true})
            .await
            .unwrap();
        col.update_one(
            doc! {"_id": 1},
            doc! {"$set": {"a": 2, "b.c": 1}, "$unset": {"gone": ""}},
        )
        .await
        .unwrap();
        // A pipeline update is described by a diff: the shrunk array is a truncation.
        col.update_one(
            doc! {"_id": 1},
            vec![doc! {"$set": {"arr": [{"$arrayElemAt": ["$arr", 0]}]}}],
        )
        .await
        .unwrap();
        col.replace_one(doc! {"_id": 1}, doc! {"r": 1})
            .await
            .unwrap();
        col.delete_one(doc! {"_id": 1}).await.unwrap();

        let ins = next(&mut s).await;
        assert_eq!(op(&ins), "insert");
        let keys: Vec<&str> = ins.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec![
                "_id",
                "operationType",
                "clusterTime",
                "wallTime",
                "fullDocument",
                "ns",
                "documentKey"
            ]
        );
        assert!(matches!(ins.get("clusterTime"), Some(Bson::Timestamp(_))));
        assert!(matches!(ins.get("wallTime"), Some(Bson::DateTime(_))));
        assert_eq!(
            ins.get_document("ns").unwrap(),
            &doc! {"db": "cs", "coll": "shapes"}
        );
        assert_eq!(ins.get_document("documentKey").unwrap(), &doc! {"_id": 1});
        assert_eq!(
            ins.get_document("fullDocument").unwrap(),
            &doc! {"_id": 1, "a": 1, "arr": arr, "gone": true}
        );
        assert!(ins
            .get_document("_id")
            .unwrap()
            .get_str("_data")
            .unwrap()
            .starts_with("82"));

        let upd = next(&mut s).await;
        assert_eq!(op(&upd), "update");
        assert!(upd.get("fullDocument").is_none());
        let desc = upd.get_document("updateDescription").unwrap();
        assert_eq!(
            desc.get_document("updatedFields").unwrap(),
            &doc! {"a": 2, "b": {"c": 1}}
        );
        assert_eq!(
            desc.get_array("removedFields").unwrap(),
            &vec![Bson::from("gone")]
        );
        assert!(desc.get_array("truncatedArrays").unwrap().is_empty());
        let upd2 = next(&mut s).await;
        let desc = upd2.get_document("updateDescription").unwrap();
        assert!(desc.get_document("updatedFields").unwrap().is_empty());
        assert_eq!(
            desc.get_array("truncatedArrays").unwrap(),
            &vec![Bson::Document(doc! {"field": "arr", "newSize": 1})]
        );

        let rep = next(&mut s).await;
        assert_eq!(op(&rep), "replace");
        assert_eq!(
            rep.get_document("fullDocument").unwrap(),
            &doc! {"_id": 1, "r": 1}
        );
        assert_eq!(rep.get_document("documentKey").unwrap(), &doc! {"_id": 1});

        let del = next(&mut s).await;
        assert_eq!(op(&del), "delete");
        assert_eq!(del.get_document("documentKey").unwrap(), &doc! {"_id": 1});
        assert!(del.get("fullDocument").is_none());

        // Cluster times strictly increase between non-transactional events.
        let ts: Vec<Timestamp> = [&ins, &upd, &upd2, &rep, &del]
            .iter()
            .map(|e| e.get_timestamp("clusterTime").unwrap())
            .collect();
        assert!(ts
            .windows(2)
            .all(|w| (w[0].time, w[0].increment) < (w[1].time, w[1].increment)));
        // Typed decoding works as well.
        let mut typed = col.watch().await.unwrap();
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        let e: ChangeStreamEvent<Document> = next(&mut typed).await;
        assert_eq!(e.operation_type, OperationType::Insert);
        assert_eq!(e.document_key, Some(doc! {"_id": 2}));
        assert!(e.cluster_time.is_some() && e.wall_time.is_some());
    })
    .await
}

#[tokio::test]
async fn resume_after_a_saved_token_delivers_the_rest() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("resume");
        let mut s = raw_watch(&col, vec![]).await;
        for i in 0..5 {
            col.insert_one(doc! {"_id": i}).await.unwrap();
        }
        let first = next(&mut s).await;
        drop(s);
        let mut resumed = col
            .watch()
            .resume_after(token_of(&first))
            .await
            .unwrap()
            .with_type::<Document>();
        for i in 1..5 {
            let e = next(&mut resumed).await;
            assert_eq!(e.get_document("documentKey").unwrap(), &doc! {"_id": i});
        }
        // The driver's cached resume token resumes too.
        let token = resumed.resume_token().unwrap();
        col.insert_one(doc! {"_id": 5}).await.unwrap();
        let mut again = col
            .watch()
            .start_after(token)
            .await
            .unwrap()
            .with_type::<Document>();
        let e = next(&mut again).await;
        assert_eq!(e.get_document("documentKey").unwrap(), &doc! {"_id": 5});
        // A token that is not one of ours is rejected.
        let bogus: ResumeToken =
            bson::deserialize_from_bson(Bson::Document(doc! {"_data": "00"})).unwrap();
        let err = col.watch().resume_after(bogus).await.unwrap_err();
        assert_eq!(code(&err), Some(260));
    })
    .await
}

#[tokio::test]
async fn drop_invalidates_and_start_after_resumes_past_it() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("inv");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let mut s = raw_watch(&col, vec![]).await;
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        col.drop().await.unwrap();
        assert_eq!(op(&next(&mut s).await), "insert");
        let drop_event = next(&mut s).await;
        assert_eq!(op(&drop_event), "drop");
        assert_eq!(
            drop_event.get_document("ns").unwrap(),
            &doc! {"db": "cs", "coll": "inv"}
        );
        let inv = next(&mut s).await;
        assert_eq!(op(&inv), "invalidate");
        let keys: Vec<&str> = inv.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec!["_id", "operationType", "clusterTime", "wallTime"]
        );
        // The cursor is closed after invalidate.
        assert!(tokio::time::timeout(EVENT_TIMEOUT, s.next())
            .await
            .unwrap()
            .is_none());
        assert!(!s.is_alive());
        // resumeAfter an invalidate is refused, startAfter starts after it.
        let err = col.watch().resume_after(token_of(&inv)).await.unwrap_err();
        assert_eq!(code(&err), Some(260));
        let mut after = col
            .watch()
            .start_after(token_of(&inv))
            .await
            .unwrap()
            .with_type::<Document>();
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        let e = next(&mut after).await;
        assert_eq!(op(&e), "insert");
        assert_eq!(e.get_document("documentKey").unwrap(), &doc! {"_id": 2});
        // A rename invalidates a collection stream too.
        let mut s = raw_watch(&col, vec![]).await;
        admin(&c, doc! {"renameCollection": "cs.inv", "to": "cs.inv2"})
            .await
            .unwrap();
        let r = next(&mut s).await;
        assert_eq!(op(&r), "rename");
        assert_eq!(
            r.get_document("to").unwrap(),
            &doc! {"db": "cs", "coll": "inv2"}
        );
        assert_eq!(op(&next(&mut s).await), "invalidate");
    })
    .await
}

#[tokio::test]
async fn start_at_operation_time_includes_that_time() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("sat");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let r = c.database("cs").run_command(doc! {"insert": "sat", "documents": [{"_id": 1}]}).await.unwrap();
        let t1 = r.get_timestamp("operationTime").unwrap();
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        let mut s = col
            .watch()
            .start_at_operation_time(t1)
            .await
            .unwrap()
            .with_type::<Document>();
        let e = next(&mut s).await;
        assert_eq!(e.get_document("documentKey").unwrap(), &doc! {"_id": 1});
        assert_eq!(e.get_timestamp("clusterTime").unwrap(), t1);
        assert_eq!(next(&mut s).await.get_document("documentKey").unwrap(), &doc! {"_id": 2});
        // Mutually exclusive start options are refused by the server.
        let tok = token_of(&e);
        let err = c
            .database("cs")
            .run_command(doc! {"aggregate": "sat", "pipeline": [{"$changeStream": {"startAtOperationTime": t1, "resumeAfter": bson::serialize_to_bson(&tok).unwrap()}}], "cursor": {}})
            .await
            .unwrap_err();
        assert!(code(&err).is_some());
    })
    .await
}

#[tokio::test]
async fn full_document_modes() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("cs");
        let col = db.collection::<Document>("fd");
        col.insert_many(vec![doc! {"_id": 1, "v": 0}, doc! {"_id": 2, "v": 0}])
            .await
            .unwrap();
        let mut lookup = col
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut when = col
            .watch()
            .full_document(FullDocumentType::WhenAvailable)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut required = col
            .watch()
            .full_document(FullDocumentType::Required)
            .await
            .unwrap()
            .with_type::<Document>();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 1}})
            .await
            .unwrap();
        col.update_one(doc! {"_id": 2}, doc! {"$set": {"v": 1}})
            .await
            .unwrap();
        col.delete_one(doc! {"_id": 2}).await.unwrap();
        // updateLookup: the current document, or null once it is gone.
        let e = next(&mut lookup).await;
        assert_eq!(
            e.get_document("fullDocument").unwrap(),
            &doc! {"_id": 1, "v": 1}
        );
        let e = next(&mut lookup).await;
        assert_eq!(e.get("fullDocument"), Some(&Bson::Null));
        // whenAvailable without post-images: null.
        let e = next(&mut when).await;
        assert_eq!(e.get("fullDocument"), Some(&Bson::Null));
        // required without post-images: error 47 when the update is reached.
        let err = next_result(&mut required).await.unwrap_err();
        assert_eq!(code(&err), Some(47));

        // With changeStreamPreAndPostImages the post-image is available.
        db.run_command(doc! {"collMod": "fd", "changeStreamPreAndPostImages": {"enabled": true}})
            .await
            .unwrap();
        let mut required = col
            .watch()
            .full_document(FullDocumentType::Required)
            .await
            .unwrap()
            .with_type::<Document>();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 2}})
            .await
            .unwrap();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 3}})
            .await
            .unwrap();
        // The post-image is the document as of this event, not the current one.
        let e = next(&mut required).await;
        assert_eq!(
            e.get_document("fullDocument").unwrap(),
            &doc! {"_id": 1, "v": 2}
        );
    })
    .await
}

#[tokio::test]
async fn full_document_before_change_with_and_without_images() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("cs");
        // Enabled at create.
        db.run_command(doc! {"create": "pre", "changeStreamPreAndPostImages": {"enabled": true}})
            .await
            .unwrap();
        let col = db.collection::<Document>("pre");
        col.insert_one(doc! {"_id": 1, "v": 1}).await.unwrap();
        let mut s = col
            .watch()
            .full_document_before_change(FullDocumentBeforeChangeType::Required)
            .full_document(FullDocumentType::WhenAvailable)
            .await
            .unwrap()
            .with_type::<Document>();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 2}})
            .await
            .unwrap();
        col.replace_one(doc! {"_id": 1}, doc! {"w": 1})
            .await
            .unwrap();
        col.delete_one(doc! {"_id": 1}).await.unwrap();
        let e = next(&mut s).await;
        assert_eq!(
            e.get_document("fullDocumentBeforeChange").unwrap(),
            &doc! {"_id": 1, "v": 1}
        );
        assert_eq!(
            e.get_document("fullDocument").unwrap(),
            &doc! {"_id": 1, "v": 2}
        );
        let e = next(&mut s).await;
        assert_eq!(op(&e), "replace");
        assert_eq!(
            e.get_document("fullDocumentBeforeChange").unwrap(),
            &doc! {"_id": 1, "v": 2}
        );
        let e = next(&mut s).await;
        assert_eq!(op(&e), "delete");
        assert_eq!(
            e.get_document("fullDocumentBeforeChange").unwrap(),
            &doc! {"_id": 1, "w": 1}
        );

        // Disabled via collMod: whenAvailable gives null, required fails, off omits the field.
        db.run_command(doc! {"collMod": "pre", "changeStreamPreAndPostImages": {"enabled": false}})
            .await
            .unwrap();
        let mut when = col
            .watch()
            .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut off = col
            .watch()
            .full_document_before_change(FullDocumentBeforeChangeType::Off)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut required = col
            .watch()
            .full_document_before_change(FullDocumentBeforeChangeType::Required)
            .await
            .unwrap()
            .with_type::<Document>();
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        col.delete_one(doc! {"_id": 2}).await.unwrap();
        assert_eq!(op(&next(&mut when).await), "insert");
        let e = next(&mut when).await;
        assert_eq!(e.get("fullDocumentBeforeChange"), Some(&Bson::Null));
        next(&mut off).await;
        assert!(!next(&mut off)
            .await
            .contains_key("fullDocumentBeforeChange"));
        next(&mut required).await;
        let err = next_result(&mut required).await.unwrap_err();
        assert_eq!(code(&err), Some(47));
    })
    .await
}

#[tokio::test]
async fn show_expanded_events_reports_ddl_with_operation_description() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("cx");
        let mut s = db
            .watch()
            .show_expanded_events(true)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut plain = db.watch().await.unwrap().with_type::<Document>();
        db.create_collection("e").await.unwrap();
        let col = db.collection::<Document>("e");
        col.create_index(mongodb::IndexModel::builder().keys(doc! {"a": 1}).build())
            .await
            .unwrap();
        col.drop_index("a_1").await.unwrap();
        db.run_command(doc! {"collMod": "e", "changeStreamPreAndPostImages": {"enabled": true}})
            .await
            .unwrap();
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        admin(&c, doc! {"renameCollection": "cx.e", "to": "cx.f"})
            .await
            .unwrap();

        let e = next(&mut s).await;
        assert_eq!(op(&e), "create");
        assert!(matches!(e.get("collectionUUID"), Some(Bson::Binary(_))));
        assert!(e
            .get_document("operationDescription")
            .unwrap()
            .contains_key("idIndex"));
        let e = next(&mut s).await;
        assert_eq!(op(&e), "createIndexes");
        let ix = e
            .get_document("operationDescription")
            .unwrap()
            .get_array("indexes")
            .unwrap();
        assert_eq!(ix[0].as_document().unwrap().get_str("name").unwrap(), "a_1");
        let e = next(&mut s).await;
        assert_eq!(op(&e), "dropIndexes");
        let ix = e
            .get_document("operationDescription")
            .unwrap()
            .get_array("indexes")
            .unwrap();
        assert_eq!(
            ix[0].as_document().unwrap().get_document("key").unwrap(),
            &doc! {"a": 1}
        );
        let e = next(&mut s).await;
        assert_eq!(op(&e), "modify");
        assert!(e
            .get_document("operationDescription")
            .unwrap()
            .contains_key("changeStreamPreAndPostImages"));
        let e = next(&mut s).await;
        assert_eq!(op(&e), "insert");
        assert!(e.contains_key("collectionUUID"));
        let e = next(&mut s).await;
        assert_eq!(op(&e), "rename");
        assert_eq!(
            e.get_document("operationDescription")
                .unwrap()
                .get_document("to")
                .unwrap(),
            &doc! {"db": "cx", "coll": "f"}
        );
        // Without showExpandedEvents only the insert and the rename are reported.
        assert_eq!(op(&next(&mut plain).await), "insert");
        let r = next(&mut plain).await;
        assert_eq!(op(&r), "rename");
        assert!(!r.contains_key("operationDescription"));
    })
    .await
}

#[tokio::test]
async fn user_stages_match_project_and_id_removal_is_fatal() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("stages");
        let mut only_deletes = raw_watch(
            &col,
            vec![
                doc! {"$match": {"operationType": {"$in": ["delete", "replace"]}}},
                doc! {"$project": {"documentKey": 1, "operationType": 1}},
            ],
        )
        .await;
        let mut no_id = raw_watch(&col, vec![doc! {"$project": {"_id": 0}}]).await;
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        col.delete_one(doc! {"_id": 1}).await.unwrap();
        let e = next(&mut only_deletes).await;
        let keys: Vec<&str> = e.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["_id", "operationType", "documentKey"]);
        assert_eq!(op(&e), "delete");
        let err = next_result(&mut no_id).await.unwrap_err();
        assert_eq!(code(&err), Some(280));
        assert!(err.contains_label("NonResumableChangeStreamError"));
        // A stage that is not allowed after $changeStream.
        let err = col
            .watch()
            .pipeline(vec![doc! {"$group": {"_id": 1}}])
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(40324));
    })
    .await
}

#[tokio::test]
async fn database_and_cluster_streams() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("dbs");
        db.collection::<Document>("pre")
            .insert_one(doc! {"_id": 0})
            .await
            .unwrap();
        let mut dbs = db.watch().await.unwrap().with_type::<Document>();
        let mut cluster = c.watch().await.unwrap().with_type::<Document>();
        db.collection::<Document>("a")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        c.database("other")
            .collection::<Document>("b")
            .insert_one(doc! {"_id": 2})
            .await
            .unwrap();
        db.collection::<Document>("b")
            .insert_one(doc! {"_id": 3})
            .await
            .unwrap();
        db.drop().await.unwrap();
        // Database stream: its own db only, then drops, dropDatabase, invalidate.
        let e = next(&mut dbs).await;
        assert_eq!(
            e.get_document("ns").unwrap(),
            &doc! {"db": "dbs", "coll": "a"}
        );
        let e = next(&mut dbs).await;
        assert_eq!(
            e.get_document("ns").unwrap(),
            &doc! {"db": "dbs", "coll": "b"}
        );
        let mut dropped = Vec::new();
        loop {
            let e = next(&mut dbs).await;
            if op(&e) == "drop" {
                dropped.push(
                    e.get_document("ns")
                        .unwrap()
                        .get_str("coll")
                        .unwrap()
                        .to_string(),
                );
                continue;
            }
            assert_eq!(op(&e), "dropDatabase");
            assert_eq!(e.get_document("ns").unwrap(), &doc! {"db": "dbs"});
            break;
        }
        dropped.sort();
        assert_eq!(dropped, vec!["a", "b", "pre"]);
        assert_eq!(op(&next(&mut dbs).await), "invalidate");
        // Cluster stream: every database, never invalidated by dropDatabase.
        let seen: Vec<(String, String)> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                let e = next(&mut cluster).await;
                let ns = e.get_document("ns").unwrap();
                v.push((ns.get_str("db").unwrap().to_string(), op(&e).to_string()));
            }
            v
        };
        assert_eq!(
            seen,
            vec![
                ("dbs".to_string(), "insert".to_string()),
                ("other".to_string(), "insert".to_string()),
                ("dbs".to_string(), "insert".to_string())
            ]
        );
        let mut kinds = Vec::new();
        for _ in 0..4 {
            kinds.push(op(&next(&mut cluster).await).to_string());
        }
        assert_eq!(kinds, vec!["drop", "drop", "drop", "dropDatabase"]);
        c.database("later")
            .collection::<Document>("x")
            .insert_one(doc! {"_id": 9})
            .await
            .unwrap();
        assert_eq!(
            next(&mut cluster)
                .await
                .get_document("ns")
                .unwrap()
                .get_str("db")
                .unwrap(),
            "later"
        );
    })
    .await
}

/// Raw `aggregate` + `getMore` through `run_command`, to see `postBatchResumeToken` directly.
async fn open_raw(c: &mongodb::Client, db: &str, coll: &str) -> (i64, Document) {
    let r = c
        .database(db)
        .run_command(doc! {"aggregate": coll, "pipeline": [{"$changeStream": {}}], "cursor": {}})
        .await
        .unwrap();
    assert!(matches!(r.get("operationTime"), Some(Bson::Timestamp(_))));
    let cursor = r.get_document("cursor").unwrap().clone();
    (cursor.get_i64("id").unwrap(), cursor)
}

async fn get_more(c: &mongodb::Client, db: &str, coll: &str, id: i64, max_ms: i64) -> Document {
    c.database(db)
        .run_command(doc! {"getMore": id, "collection": coll, "maxTimeMS": max_ms})
        .await
        .unwrap()
        .get_document("cursor")
        .unwrap()
        .clone()
}

fn pbrt(cursor: &Document) -> String {
    cursor
        .get_document("postBatchResumeToken")
        .unwrap()
        .get_str("_data")
        .unwrap()
        .to_string()
}

/// A postBatchResumeToken never moves backwards: a batch that ends on an event reports that
/// event's token, and the empty batch after it reports a high-water mark that sorts at or after
/// it (tools order positions by `_data`, as MongoDB's KeyString order allows).
#[tokio::test]
async fn post_batch_resume_token_never_moves_backwards_after_an_event() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let (id, first) = open_raw(&c, "cs", "mono").await;
        let mut last = pbrt(&first);
        c.database("cs")
            .collection::<Document>("mono")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        let with_event = get_more(&c, "cs", "mono", id, 1000).await;
        assert_eq!(with_event.get_array("nextBatch").unwrap().len(), 1);
        let now = pbrt(&with_event);
        assert!(now >= last, "PBRT moved backwards: {now} < {last}");
        last = now;
        for _ in 0..2 {
            let cur = get_more(&c, "cs", "mono", id, 100).await;
            assert!(cur.get_array("nextBatch").unwrap().is_empty());
            let now = pbrt(&cur);
            assert!(now >= last, "PBRT moved backwards: {now} < {last}");
            last = now;
        }
    })
    .await
}

#[tokio::test]
async fn post_batch_resume_token_advances_while_idle() {
    bounded(async {
        let sim = builder()
            .noop_interval(Duration::from_millis(100))
            .start()
            .await
            .unwrap();
        let c = client(&sim).await;
        let (id, first) = open_raw(&c, "cs", "idle").await;
        assert!(first.get_array("firstBatch").unwrap().is_empty());
        assert_ne!(id, 0);
        let mut last = pbrt(&first);
        for _ in 0..3 {
            let cur = get_more(&c, "cs", "idle", id, 300).await;
            assert!(cur.get_array("nextBatch").unwrap().is_empty());
            assert_eq!(cur.get_i64("id").unwrap(), id);
            let now = pbrt(&cur);
            assert!(now > last, "PBRT did not advance: {now} <= {last}");
            last = now;
        }
        // The driver caches the PBRT as its resume token while idle.
        let mut s = c
            .database("cs")
            .collection::<Document>("idle")
            .watch()
            .await
            .unwrap();
        let t0 = s.resume_token().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(s.next_if_any().await.unwrap().is_none());
            if s.resume_token() != Some(t0.clone()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "driver resume token never advanced"
            );
        }
    })
    .await
}

#[tokio::test]
async fn awaiting_get_more_honours_max_await_time() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let (id, _) = open_raw(&c, "cs", "await").await;
        let started = Instant::now();
        let cur = get_more(&c, "cs", "await", id, 400).await;
        let took = started.elapsed();
        assert!(cur.get_array("nextBatch").unwrap().is_empty());
        assert!(
            took >= Duration::from_millis(350),
            "returned too early: {took:?}"
        );
        assert!(
            took < Duration::from_millis(2000),
            "returned too late: {took:?}"
        );
        // An event arriving while waiting ends the wait early.
        let c2 = c.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.database("cs")
                .collection::<Document>("await")
                .insert_one(doc! {"_id": 1})
                .await
                .unwrap();
        });
        let started = Instant::now();
        let cur = get_more(&c, "cs", "await", id, 10_000).await;
        assert_eq!(cur.get_array("nextBatch").unwrap().len(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        writer.await.unwrap();
        // Through the driver: max_await_time bounds next_if_any.
        let mut s = c
            .database("cs")
            .collection::<Document>("await")
            .watch()
            .max_await_time(Duration::from_millis(300))
            .await
            .unwrap();
        let started = Instant::now();
        assert!(s.next_if_any().await.unwrap().is_none());
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await
}

/// Counts the events a watcher sees for `n` inserts while `disturb` runs between batches.
async fn watch_through_disturbances<F, Fut>(sim_client: mongodb::Client, n: i32, mut disturb: F)
where
    F: FnMut(i32) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let col = sim_client
        .database("cs")
        .collection::<Document>("disturbed");
    let mut s = col.watch().await.unwrap();
    let writer_client = sim_client.clone();
    let writer = tokio::spawn(async move {
        let col = writer_client
            .database("cs")
            .collection::<Document>("disturbed");
        for i in 0..n {
            col.insert_one(doc! {"_id": i}).await.unwrap();
        }
    });
    let mut seen = Vec::new();
    while seen.len() < n as usize {
        let e: ChangeStreamEvent<Document> = next(&mut s).await;
        let id = e.document_key.unwrap().get_i32("_id").unwrap();
        seen.push(id);
        if id % 25 == 10 {
            disturb(id).await;
        }
    }
    writer.await.unwrap();
    assert_eq!(
        seen,
        (0..n).collect::<Vec<_>>(),
        "events lost, repeated or reordered"
    );
    // Nothing extra arrives afterwards.
    let mut s2 = col
        .watch()
        .resume_after(s.resume_token().unwrap())
        .await
        .unwrap();
    assert!(s2.next_if_any().await.unwrap().is_none());
}

#[tokio::test]
async fn resume_after_dropped_connections_loses_and_repeats_nothing() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let sim = std::sync::Arc::new(sim);
        let s2 = std::sync::Arc::clone(&sim);
        watch_through_disturbances(c, 200, move |_| {
            s2.drop_connections();
            async {}
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn resume_after_get_more_close_connection_loses_and_repeats_nothing() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let c2 = c.clone();
        watch_through_disturbances(c, 200, move |_| {
            let c2 = c2.clone();
            async move {
                fail_command(
                    &c2,
                    Bson::Document(doc! {"times": 1}),
                    doc! {"failCommands": ["getMore"], "closeConnection": true},
                )
                .await;
            }
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn history_loss_is_non_resumable_286() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("lost");
        let mut s = raw_watch(&col, vec![]).await;
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let first = next(&mut s).await;
        drop(s);
        for i in 1..20 {
            col.insert_one(doc! {"_id": i}).await.unwrap();
        }
        sim.set_oplog_capacity(5);
        let err = col
            .watch()
            .resume_after(token_of(&first))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(286));
        assert!(err.contains_label("NonResumableChangeStreamError"));
        // An open stream that falls behind the oplog fails the same way.
        let mut behind = raw_watch(&col, vec![]).await;
        for i in 20..40 {
            col.insert_one(doc! {"_id": i}).await.unwrap();
        }
        // The first batch is delivered from the window still present... then history is lost.
        let mut got = None;
        for _ in 0..40 {
            match next_result(&mut behind).await {
                Ok(_) => continue,
                Err(e) => {
                    got = Some(e);
                    break;
                }
            }
        }
        let err = got.expect("the lagging stream fails");
        assert_eq!(code(&err), Some(286));
        // startAtOperationTime before the window fails too.
        let err = col
            .watch()
            .start_at_operation_time(first.get_timestamp("clusterTime").unwrap())
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(286));
    })
    .await
}

#[tokio::test]
async fn split_large_events_into_fragments() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("cs");
        db.run_command(doc! {"create": "large", "changeStreamPreAndPostImages": {"enabled": true}})
            .await
            .unwrap();
        let col = db.collection::<Document>("large");
        let big = "x".repeat(9 * 1024 * 1024);
        col.insert_one(doc! {"_id": 1, "a": big.clone(), "b": ""})
            .await
            .unwrap();
        let mut split = col
            .watch()
            .full_document(FullDocumentType::Required)
            .full_document_before_change(FullDocumentBeforeChangeType::Required)
            .pipeline(vec![doc! {"$changeStreamSplitLargeEvent": {}}])
            .await
            .unwrap()
            .with_type::<Document>();
        let mut unsplit = col
            .watch()
            .full_document(FullDocumentType::Required)
            .full_document_before_change(FullDocumentBeforeChangeType::Required)
            .await
            .unwrap()
            .with_type::<Document>();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"b": "y"}})
            .await
            .unwrap();
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        let f1 = next(&mut split).await;
        let of = f1
            .get_document("splitEvent")
            .unwrap()
            .get_i32("of")
            .unwrap();
        assert!(of >= 2, "expected several fragments, got {of}");
        assert_eq!(
            f1.get_document("splitEvent")
                .unwrap()
                .get_i32("fragment")
                .unwrap(),
            1
        );
        assert_eq!(op(&f1), "update");
        let mut merged = f1.clone();
        let mut tokens = vec![token_of(&f1)];
        for i in 2..=of {
            let f = next(&mut split).await;
            assert_eq!(
                f.get_document("splitEvent").unwrap(),
                &doc! {"fragment": i, "of": of}
            );
            tokens.push(token_of(&f));
            for (k, v) in f {
                if k != "_id" && k != "splitEvent" {
                    merged.insert(k, v);
                }
            }
        }
        assert_eq!(
            merged
                .get_document("fullDocument")
                .unwrap()
                .get_str("b")
                .unwrap(),
            "y"
        );
        assert_eq!(
            merged
                .get_document("fullDocumentBeforeChange")
                .unwrap()
                .get_str("b")
                .unwrap(),
            ""
        );
        assert!(merged.contains_key("updateDescription") && merged.contains_key("ns"));
        let after = next(&mut split).await;
        assert_eq!(op(&after), "insert");
        // Every fragment token is distinct and resumable: resuming after fragment 1 yields
        // fragment 2.
        let mut resumed = col
            .watch()
            .full_document(FullDocumentType::Required)
            .full_document_before_change(FullDocumentBeforeChangeType::Required)
            .pipeline(vec![doc! {"$changeStreamSplitLargeEvent": {}}])
            .resume_after(tokens[0].clone())
            .await
            .unwrap()
            .with_type::<Document>();
        let f2 = next(&mut resumed).await;
        assert_eq!(
            f2.get_document("splitEvent")
                .unwrap()
                .get_i32("fragment")
                .unwrap(),
            2
        );
        // Without the split stage the oversized event fails with BSONObjectTooLarge.
        let err = next_result(&mut unsplit).await.unwrap_err();
        assert_eq!(code(&err), Some(10334));
    })
    .await
}

/// An update event with no image and no stage is written as bytes (`plain_update_event`);
/// one too large for 16 MiB takes the document path instead, and fails as it does there and
/// as on a server: BSONObjectTooLarge, even with `$changeStreamSplitLargeEvent`, which splits
/// an event between its top-level fields but not inside one (here `updateDescription`).
#[tokio::test]
async fn an_update_event_over_16_mib_leaves_the_byte_path_for_the_document_path() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("huge_update");
        // The largest document that fits 16 MiB with `_id: 1`: its `$set` alone, in an
        // event's updateDescription, does not.
        let len = 16 * 1024 * 1024 - 200;
        col.insert_one(doc! {"_id": 1, "a": "x".repeat(len)})
            .await
            .unwrap();
        let watch = |pipeline: Vec<Document>| {
            std::future::IntoFuture::into_future(col.watch().pipeline(pipeline))
        };
        let mut plain = watch(vec![]).await.unwrap().with_type::<Document>();
        let mut matched = watch(vec![doc! {"$match": {}}])
            .await
            .unwrap()
            .with_type::<Document>();
        let mut split = watch(vec![doc! {"$changeStreamSplitLargeEvent": {}}])
            .await
            .unwrap()
            .with_type::<Document>();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"a": "y".repeat(len)}})
            .await
            .unwrap();
        let plain = next_result(&mut plain).await.unwrap_err();
        let matched = next_result(&mut matched).await.unwrap_err();
        let split = next_result(&mut split).await.unwrap_err();
        for err in [&plain, &matched, &split] {
            assert_eq!(code(err), Some(10334), "{err}");
        }
        assert_eq!(plain.to_string(), matched.to_string());
    })
    .await
}

#[tokio::test]
async fn ttl_monitor_produces_delete_events() {
    bounded(async {
        let sim = builder()
            .ttl_interval(Duration::from_millis(100))
            .start()
            .await
            .unwrap();
        let c = client(&sim).await;
        let col = c.database("cs").collection::<Document>("ttl");
        col.create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"at": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .expire_after(Duration::from_secs(0))
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
        let mut s = raw_watch(&col, vec![]).await;
        let old = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 60_000);
        let future =
            bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 3_600_000);
        col.insert_many(vec![
            doc! {"_id": 1, "at": old},
            doc! {"_id": 2, "at": future},
            doc! {"_id": 3, "at": "not a date"},
        ])
        .await
        .unwrap();
        for _ in 0..3 {
            assert_eq!(op(&next(&mut s).await), "insert");
        }
        let e = next(&mut s).await;
        assert_eq!(op(&e), "delete");
        assert_eq!(e.get_document("documentKey").unwrap(), &doc! {"_id": 1});
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 2);
    })
    .await
}

/// `serverStatus.metrics.cursor.open.total`.
async fn open_cursors(c: &mongodb::Client) -> i64 {
    c.database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap()
        .get_document("metrics")
        .unwrap()
        .get_document("cursor")
        .unwrap()
        .get_document("open")
        .unwrap()
        .get_i64("total")
        .unwrap()
}

/// `serverStatus.metrics.cursor.open.total` counts a change stream's cursor while its awaiting
/// `getMore` has it checked out, as mongod does (an idle stream spends most of its life there).
#[tokio::test]
async fn server_status_counts_a_cursor_while_its_get_more_awaits() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        assert_eq!(open_cursors(&c).await, 0);
        let (id, _) = open_raw(&c, "cs", "counted").await;
        assert_eq!(open_cursors(&c).await, 1);
        let awaiting = {
            let c = c.clone();
            tokio::spawn(async move { get_more(&c, "cs", "counted", id, 2000).await })
        };
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                open_cursors(&c).await,
                1,
                "an awaiting getMore's cursor is open"
            );
        }
        awaiting.await.unwrap();
        assert_eq!(open_cursors(&c).await, 1);
        c.database("cs")
            .run_command(doc! {"killCursors": "counted", "cursors": [id]})
            .await
            .unwrap();
        assert_eq!(open_cursors(&c).await, 0);
    })
    .await
}

/// `killCursors` of a cursor whose `getMore` is awaiting closes it when that `getMore`
/// returns: the cursor is not given back (a driver dropping a change stream mid-`getMore`
/// must not leak it on the server).
#[tokio::test]
async fn kill_cursors_during_an_awaiting_get_more_closes_the_cursor() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let (id, _) = open_raw(&c, "cs", "killed").await;
        let awaiting = {
            let c = c.clone();
            tokio::spawn(async move { get_more(&c, "cs", "killed", id, 1000).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = c
            .database("cs")
            .run_command(doc! {"killCursors": "killed", "cursors": [id]})
            .await
            .unwrap();
        assert_eq!(reply.get_array("cursorsKilled").unwrap().len(), 1);
        assert_eq!(open_cursors(&c).await, 0);
        let _ = awaiting.await;
        assert_eq!(open_cursors(&c).await, 0);
        let again = c
            .database("cs")
            .run_command(doc! {"getMore": id, "collection": "killed"})
            .await;
        assert!(again.is_err(), "the killed cursor is gone");
    })
    .await
}

/// Update events without images, transactions or user stages are written straight to bytes
/// (`plain_update_event`); with a stage that changes nothing they take the document path.
/// Both must give the same bytes, expanded or not, for every shape of update description.
#[tokio::test]
async fn update_events_are_the_same_bytes_on_the_fast_and_the_document_path() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("cs").collection::<Document>("fast_path");
        let long = "l".repeat(40);
        col.insert_one(doc! {
            "_id": 1, "n": 1, "gone": true, "sub": {"1": "x", "k": {"d": 1}},
            "arr": [long.clone(), long.clone(), long.clone()],
        })
        .await
        .unwrap();
        for expanded in [false, true] {
            let watch = |pipeline: Vec<Document>| {
                std::future::IntoFuture::into_future(
                    col.watch()
                        .pipeline(pipeline)
                        .show_expanded_events(expanded),
                )
            };
            let mut fast = watch(vec![])
                .await
                .unwrap()
                .with_type::<bson::RawDocumentBuf>();
            let mut slow = watch(vec![doc! {"$match": {}}])
                .await
                .unwrap()
                .with_type::<bson::RawDocumentBuf>();
            // Values differ between the two passes, so no update is a no-op.
            let v = if expanded { 20 } else { 10 };
            let updates = vec![
                doc! {"$inc": {"n": 1}},
                doc! {"$set": {"sub.k.d": v, "new": {"a": [1, v]}}, "$unset": {"gone": ""}},
                // A numeric field name under a document: reported in disambiguatedPaths.
                doc! {"$set": {"sub.1": v}},
                doc! {"$set": {"gone": v}},
            ];
            for u in updates {
                col.update_one(doc! {"_id": 1}, u).await.unwrap();
            }
            // A shrunk array: a truncation.
            col.update_one(
                doc! {"_id": 1},
                vec![doc! {"$set": {"arr": [{"$arrayElemAt": ["$arr", 0]}]}}],
            )
            .await
            .unwrap();
            col.update_one(
                doc! {"_id": 1},
                vec![doc! {"$set": {"arr": ["$n", "$n", "$n"]}}],
            )
            .await
            .unwrap();
            for i in 0..6 {
                let a = next(&mut fast).await;
                let b = next(&mut slow).await;
                assert_eq!(a.get_str("operationType").unwrap(), "update");
                assert_eq!(
                    a.as_bytes(),
                    b.as_bytes(),
                    "event {i} (expanded: {expanded}): {:?} != {:?}",
                    Document::try_from(a.clone()),
                    Document::try_from(b.clone())
                );
                if expanded && i == 2 {
                    let ud = a.get_document("updateDescription").unwrap();
                    assert!(ud.get_document("disambiguatedPaths").is_ok(), "{ud:?}");
                }
            }
        }
    })
    .await;
}

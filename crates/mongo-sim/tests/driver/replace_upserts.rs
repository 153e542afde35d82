//! Replacement upserts by `_id` (`{q: {_id: X}, u: <document>, upsert: true}`), the statement
//! copy and apply tools send in bulk: the simulator runs them on a fast path (statements read
//! in place, the replacement stored as it came). Everything observable must stay what the
//! general path, and MongoDB, answer: results, stored documents, change events, index and
//! validator errors, collation, transactions.

use bson::{doc, Bson, Document};
use mongodb::{options::ChangeStreamOptions, Database};

use crate::common::*;

async fn update(db: &Database, cmd: Document) -> Document {
    db.run_command(cmd).await.expect("update")
}

fn upsert(id: impl Into<Bson>, u: Document) -> Document {
    doc! {"q": {"_id": id.into()}, "u": u, "upsert": true}
}

#[tokio::test]
async fn results_and_stored_documents() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("rup");
        // Into an empty collection: every statement inserts, `_id` first.
        let r = update(
            &db,
            doc! {"update": "c", "updates": [
                upsert(1, doc! {"_id": 1, "a": 1}),
                upsert(2, doc! {"a": 2}),
                upsert("s", doc! {"a": 3, "_id": "s"}),
            ]},
        )
        .await;
        assert_eq!(r.get_i32("n").unwrap(), 3, "{r}");
        assert_eq!(r.get_i32("nModified").unwrap(), 0, "{r}");
        assert_eq!(
            r.get_array("upserted").unwrap(),
            &vec![
                Bson::Document(doc! {"index": 0, "_id": 1}),
                Bson::Document(doc! {"index": 1, "_id": 2}),
                Bson::Document(doc! {"index": 2, "_id": "s"}),
            ]
        );
        let col = db.collection::<Document>("c");
        for (id, want) in [
            (Bson::Int32(1), doc! {"_id": 1, "a": 1}),
            (Bson::Int32(2), doc! {"_id": 2, "a": 2}),
            (Bson::String("s".into()), doc! {"_id": "s", "a": 3}),
        ] {
            let got = col.find_one(doc! {"_id": id}).await.unwrap().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.keys().next().map(String::as_str), Some("_id"));
        }
        // Over the existing documents: matched and modified, nothing upserted; an identical
        // replacement matches without modifying; a replacement without `_id` keeps it.
        let r = update(
            &db,
            doc! {"update": "c", "updates": [
                upsert(1, doc! {"_id": 1, "a": 10}),
                upsert(2, doc! {"_id": 2, "a": 2}),
                upsert("s", doc! {"b": 1}),
            ]},
        )
        .await;
        assert_eq!(r.get_i32("n").unwrap(), 3, "{r}");
        assert_eq!(r.get_i32("nModified").unwrap(), 2, "{r}");
        assert!(r.get("upserted").is_none(), "{r}");
        assert_eq!(
            col.find_one(doc! {"_id": 1}).await.unwrap().unwrap(),
            doc! {"_id": 1, "a": 10}
        );
        assert_eq!(
            col.find_one(doc! {"_id": "s"}).await.unwrap().unwrap(),
            doc! {"_id": "s", "b": 1}
        );
        // Without `upsert`, a missing document is neither matched nor inserted.
        let r = update(
            &db,
            doc! {"update": "c", "updates": [{"q": {"_id": 99}, "u": {"a": 1}}]},
        )
        .await;
        assert_eq!((r.get_i32("n").ok(), r.get_i32("nModified").ok()), (Some(0), Some(0)));
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 3);
        // The driver's replace_one sends the statement as a document sequence.
        let r = col
            .replace_one(doc! {"_id": 7}, doc! {"_id": 7, "z": 1})
            .upsert(true)
            .await
            .unwrap();
        assert_eq!(r.upserted_id, Some(Bson::Int32(7)));
        let r = col
            .replace_one(doc! {"_id": 7}, doc! {"z": 2})
            .upsert(true)
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (1, 1));
        assert_eq!(r.upserted_id, None);
        // An empty timestamp is filled in with the write's time, as for an insert.
        update(
            &db,
            doc! {"update": "c", "updates": [upsert(8, doc! {"_id": 8, "t": bson::Timestamp { time: 0, increment: 0 }})]},
        )
        .await;
        let t = col
            .find_one(doc! {"_id": 8})
            .await
            .unwrap()
            .unwrap()
            .get_timestamp("t")
            .unwrap();
        assert!(t.time > 0, "{t:?}");
        // A replacement that changes `_id` fails as MongoDB's (66 ImmutableField).
        let r = update(
            &db,
            doc! {"update": "c", "updates": [upsert(1, doc! {"_id": 2, "a": 1})]},
        )
        .await;
        let errors = r.get_array("writeErrors").unwrap();
        assert_eq!(
            errors[0].as_document().unwrap().get_i32("code").unwrap(),
            66,
            "{r}"
        );
        // An unknown statement field is refused as before (the statements are read raw).
        let e = db
            .run_command(doc! {"update": "c", "updates": [{"q": {"_id": 1}, "u": {"a": 1}, "upsert": true, "bogus": 1}]})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(40415), "{e}");
    })
    .await
}

#[tokio::test]
async fn change_events_of_inserting_and_replacing_upserts() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("rup");
        let col = db.collection::<Document>("ev");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let opts = ChangeStreamOptions::builder().build();
        let mut s = col.watch().with_options(opts).await.unwrap();
        update(
            &db,
            doc! {"update": "ev", "updates": [
                upsert(1, doc! {"_id": 1, "a": 1}),
                upsert(1, doc! {"_id": 1, "a": 2}),
                upsert(1, doc! {"_id": 1, "a": 2}),
                upsert(2, doc! {"b": 1}),
            ]},
        )
        .await;
        let ins = next(&mut s).await;
        assert_eq!(
            ins.operation_type,
            mongodb::change_stream::event::OperationType::Insert
        );
        assert_eq!(ins.full_document, Some(doc! {"_id": 1, "a": 1}));
        assert_eq!(ins.document_key, Some(doc! {"_id": 1}));
        let rep = next(&mut s).await;
        assert_eq!(
            rep.operation_type,
            mongodb::change_stream::event::OperationType::Replace
        );
        assert_eq!(rep.full_document, Some(doc! {"_id": 1, "a": 2}));
        assert_eq!(rep.document_key, Some(doc! {"_id": 1}));
        // The identical replacement wrote nothing: the next event is the last insert.
        let ins2 = next(&mut s).await;
        assert_eq!(
            ins2.operation_type,
            mongodb::change_stream::event::OperationType::Insert
        );
        assert_eq!(ins2.full_document, Some(doc! {"_id": 2, "b": 1}));
    })
    .await
}

#[tokio::test]
async fn unique_index_validator_and_collation() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("rup");
        db.run_command(doc! {"createIndexes": "u", "indexes": [{"key": {"e": 1}, "name": "e_1", "unique": true}]})
            .await
            .unwrap();
        update(&db, doc! {"update": "u", "updates": [upsert(1, doc! {"_id": 1, "e": "a"})]}).await;
        // Ordered: the batch stops at the conflicting insert; the error names the index.
        let r = update(
            &db,
            doc! {"update": "u", "updates": [
                upsert(2, doc! {"_id": 2, "e": "b"}),
                upsert(3, doc! {"_id": 3, "e": "a"}),
                upsert(4, doc! {"_id": 4, "e": "d"}),
            ]},
        )
        .await;
        assert_eq!(r.get_i32("n").unwrap(), 1, "{r}");
        let e = r.get_array("writeErrors").unwrap()[0].as_document().unwrap().clone();
        assert_eq!(e.get_i32("index").unwrap(), 1, "{e}");
        assert_eq!(e.get_i32("code").unwrap(), 11000, "{e}");
        assert_eq!(e.get_document("keyPattern").unwrap(), &doc! {"e": 1});
        assert_eq!(e.get_document("keyValue").unwrap(), &doc! {"e": "a"});
        // Unordered: a replacement that would collide fails, the others apply.
        let r = update(
            &db,
            doc! {"update": "u", "ordered": false, "updates": [
                upsert(2, doc! {"_id": 2, "e": "a"}),
                upsert(4, doc! {"_id": 4, "e": "d"}),
            ]},
        )
        .await;
        assert_eq!(r.get_i32("n").unwrap(), 1, "{r}");
        let errors = r.get_array("writeErrors").unwrap();
        assert_eq!(errors.len(), 1, "{r}");
        let e = errors[0].as_document().unwrap();
        assert_eq!((e.get_i32("index").ok(), e.get_i32("code").ok()), (Some(0), Some(11000)));
        let col = db.collection::<Document>("u");
        assert_eq!(
            col.find_one(doc! {"_id": 2}).await.unwrap().unwrap(),
            doc! {"_id": 2, "e": "b"}
        );
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 3);

        // A validator applies unless bypassed.
        db.run_command(doc! {"create": "v", "validator": {"n": {"$type": "int"}}})
            .await
            .unwrap();
        let r = update(&db, doc! {"update": "v", "updates": [upsert(1, doc! {"n": "x"})]}).await;
        let e = r.get_array("writeErrors").unwrap()[0].as_document().unwrap().clone();
        assert_eq!(e.get_i32("code").unwrap(), 121, "{e}");
        let r = update(
            &db,
            doc! {"update": "v", "bypassDocumentValidation": true, "updates": [upsert(1, doc! {"n": "x"})]},
        )
        .await;
        assert_eq!(r.get_i32("n").unwrap(), 1, "{r}");
        assert!(r.get("writeErrors").is_none(), "{r}");

        // Under a case-insensitive default collation, `_id` "bob" is the stored "Bob".
        db.run_command(doc! {"create": "coll", "collation": {"locale": "en", "strength": 2}})
            .await
            .unwrap();
        update(&db, doc! {"update": "coll", "updates": [upsert("Bob", doc! {"v": 1})]}).await;
        let r = update(&db, doc! {"update": "coll", "updates": [upsert("bob", doc! {"v": 2})]}).await;
        assert_eq!((r.get_i32("n").ok(), r.get_i32("nModified").ok()), (Some(1), Some(1)), "{r}");
        assert!(r.get("upserted").is_none(), "{r}");
        let all: Vec<Document> = {
            use futures::TryStreamExt;
            db.collection::<Document>("coll")
                .find(doc! {})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap()
        };
        assert_eq!(all, vec![doc! {"_id": "Bob", "v": 2}]);
    })
    .await
}

#[tokio::test]
async fn inside_a_transaction() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("rup");
        let col = db.collection::<Document>("t");
        col.insert_one(doc! {"_id": 0, "v": 0}).await.unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        db.run_command(doc! {"update": "t", "updates": [
            upsert(0, doc! {"v": 1}),
            upsert(1, doc! {"v": 1}),
        ]})
        .session(&mut session)
        .await
        .unwrap();
        // Not visible outside the transaction before it commits.
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
        session.abort_transaction().await.unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
        session.start_transaction().await.unwrap();
        db.run_command(doc! {"update": "t", "updates": [
            upsert(0, doc! {"v": 2}),
            upsert(1, doc! {"v": 2}),
        ]})
        .session(&mut session)
        .await
        .unwrap();
        session.commit_transaction().await.unwrap();
        assert_eq!(
            col.count_documents(doc! {"v": 2}).await.unwrap(),
            2,
            "both statements committed"
        );
    })
    .await
}

/// A large batch into an existing empty collection, with statements of other shapes among the
/// replacements by `_id` (decoded as such when the message arrives): every `upserted` entry
/// names its statement's index and `_id`, every inserting statement is one insert event, and
/// the statements the fast path leaves to the general one answer as before.
#[tokio::test]
async fn large_batch_into_empty_collection() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("rup");
        db.run_command(doc! {"create": "big"}).await.unwrap();
        let col = db.collection::<Document>("big");
        let mut s = col.watch().await.unwrap();
        const N: i32 = 1_500;
        let mut updates: Vec<Document> =
            (0..N).map(|i| upsert(i, doc! {"_id": i, "v": i})).collect();
        // Other shapes among them: an operator upsert, an `_id` that is a document (not looked
        // up directly), a statement with another field, and a replacement of an `_id` the
        // batch already inserted.
        updates[10] = doc! {"q": {"_id": 10}, "u": {"$set": {"v": 10}}, "upsert": true};
        updates[20] = upsert(doc! {"k": 20}, doc! {"v": 20});
        updates[30] =
            doc! {"q": {"_id": 30}, "u": {"_id": 30, "v": 30}, "upsert": true, "hint": {"_id": 1}};
        updates[40] = upsert(0, doc! {"_id": 0, "v": "again"});
        let r = update(&db, doc! {"update": "big", "updates": updates}).await;
        assert_eq!(r.get_i32("n").unwrap(), N, "{r}");
        assert_eq!(r.get_i32("nModified").unwrap(), 1, "{r}");
        let want: Vec<Bson> = (0..N)
            .filter(|i| *i != 40)
            .map(|i| {
                let id = if i == 20 {
                    Bson::Document(doc! {"k": 20})
                } else {
                    Bson::Int32(i)
                };
                Bson::Document(doc! {"index": i, "_id": id})
            })
            .collect();
        assert_eq!(r.get_array("upserted").unwrap(), &want);
        // Statement 40 replaced what statement 0 inserted.
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), N as u64 - 1);
        assert_eq!(
            col.find_one(doc! {"_id": 0}).await.unwrap().unwrap(),
            doc! {"_id": 0, "v": "again"}
        );
        assert_eq!(
            col.find_one(doc! {"_id": {"k": 20}})
                .await
                .unwrap()
                .unwrap(),
            doc! {"_id": {"k": 20}, "v": 20}
        );
        assert_eq!(
            col.find_one(doc! {"_id": 10}).await.unwrap().unwrap(),
            doc! {"_id": 10, "v": 10}
        );
        // The change events: an insert per upserted statement, in order, and the replacement.
        use mongodb::change_stream::event::OperationType;
        for i in 0..N {
            let e = next(&mut s).await;
            if i == 40 {
                assert_eq!(e.operation_type, OperationType::Replace);
                assert_eq!(e.full_document, Some(doc! {"_id": 0, "v": "again"}));
                continue;
            }
            assert_eq!(e.operation_type, OperationType::Insert, "statement {i}");
            let id = e.document_key.unwrap().get("_id").cloned().unwrap();
            let at = (if i < 40 { i } else { i - 1 }) as usize;
            assert_eq!(Bson::Document(doc! {"index": i, "_id": id}), want[at]);
        }
    })
    .await
}

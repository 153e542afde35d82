//! `$out` and `$merge` as the last stage of `aggregate`, writing through the oplog.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{Collection, Database};

use crate::common::*;

fn op(e: &Document) -> &str {
    e.get_str("operationType").unwrap()
}

async fn all(col: &Collection<Document>) -> Vec<Document> {
    col.find(doc! {})
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn agg(
    db: &Database,
    coll: &str,
    pipeline: Vec<Document>,
) -> mongodb::error::Result<Document> {
    db.run_command(doc! {"aggregate": coll, "pipeline": pipeline, "cursor": {}})
        .await
}

fn uuid_of(h: &Document, coll: &str) -> Bson {
    h.get_document("uuids").unwrap().get(coll).unwrap().clone()
}

#[tokio::test]
async fn out_replaces_the_target_through_a_rename() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("wo");
        let src = db.collection::<Document>("src");
        src.insert_many((1..=4).map(|i| doc! {"_id": i, "v": i}))
            .await
            .unwrap();
        let target = db.collection::<Document>("t");
        target.insert_one(doc! {"_id": "old"}).await.unwrap();
        target
            .create_index(mongodb::IndexModel::builder().keys(doc! {"w": 1}).build())
            .await
            .unwrap();
        let before = db_hash(&c, "wo").await;
        let mut s = db.watch().await.unwrap().with_type::<Document>();

        let reply = agg(
            &db,
            "src",
            vec![
                doc! {"$match": {"v": {"$gte": 3}}},
                doc! {"$project": {"w": {"$multiply": ["$v", 2]}}},
                doc! {"$out": "t"},
            ],
        )
        .await
        .unwrap();
        let cursor = reply.get_document("cursor").unwrap();
        assert_eq!(cursor.get_i64("id").unwrap(), 0);
        assert!(cursor.get_array("firstBatch").unwrap().is_empty());
        assert_eq!(
            all(&target).await,
            vec![doc! {"_id": 3, "w": 6}, doc! {"_id": 4, "w": 8}]
        );
        // The target's indexes are kept; it is a new collection (new UUID).
        let names = target.list_index_names().await.unwrap();
        assert_eq!(names, vec!["_id_".to_string(), "w_1".to_string()]);
        let after = db_hash(&c, "wo").await;
        assert_ne!(uuid_of(&before, "t"), uuid_of(&after, "t"));
        // The writes go through the oplog: inserts into tmp.agg_out.*, then the rename.
        for _ in 0..2 {
            let e = next(&mut s).await;
            assert_eq!(op(&e), "insert");
            let coll = e.get_document("ns").unwrap().get_str("coll").unwrap();
            assert!(coll.starts_with("tmp.agg_out."), "{e}");
        }
        let e = next(&mut s).await;
        assert_eq!(op(&e), "rename");
        assert_eq!(
            e.get_document("to").unwrap(),
            &doc! {"db": "wo", "coll": "t"}
        );
        // No temporary collection is left behind.
        let colls = db.list_collection_names().await.unwrap();
        assert!(colls.iter().all(|n| !n.starts_with("tmp.")), "{colls:?}");

        // {db, coll} form, to another database (created on the way).
        agg(
            &db,
            "src",
            vec![doc! {"$out": {"db": "wo2", "coll": "copy"}}],
        )
        .await
        .unwrap();
        assert_eq!(all(&c.database("wo2").collection("copy")).await.len(), 4);
        // An empty result empties the target.
        agg(
            &db,
            "src",
            vec![doc! {"$match": {"v": 99}}, doc! {"$out": "t"}],
        )
        .await
        .unwrap();
        assert!(all(&target).await.is_empty());
    })
    .await
}

#[tokio::test]
async fn out_and_merge_refuse_what_they_do_not_support() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("wr");
        db.collection::<Document>("src")
            .insert_many(vec![doc! {"_id": 1, "a": 1}, doc! {"_id": 2, "a": 1}])
            .await
            .unwrap();
        db.run_command(doc! {"create": "v", "viewOn": "src"})
            .await
            .unwrap();
        db.run_command(doc! {"create": "capped", "capped": true, "size": 4096})
            .await
            .unwrap();
        let cases: Vec<(Vec<Document>, i32)> = vec![
            (vec![doc! {"$out": "x"}, doc! {"$match": {}}], 40601),
            (vec![doc! {"$merge": "x"}, doc! {"$match": {}}], 40601),
            (vec![doc! {"$out": "v"}], 166),
            (vec![doc! {"$merge": "v"}], 166),
            (vec![doc! {"$out": "capped"}], 17152),
            (vec![doc! {"$out": "system.js"}], 17385),
            (
                vec![doc! {"$out": {"db": "wr", "coll": "x", "timeseries": {"timeField": "t"}}}],
                115,
            ),
            (
                vec![doc! {"$out": {"db": "wr", "coll": "x", "bogus": 1}}],
                40415,
            ),
            (vec![doc! {"$merge": {"into": "x", "on": "a"}}], 115),
            (
                vec![doc! {"$merge": {"into": "x", "whenMatched": [{"$set": {"b": 1}}]}}],
                115,
            ),
            (vec![doc! {"$merge": {"into": "x", "let": {"a": 1}}}], 115),
            (vec![doc! {"$merge": {"into": "x", "bogus": 1}}], 40415),
            (
                vec![doc! {"$merge": {"into": "x", "whenMatched": "nope"}}],
                2,
            ),
            (vec![doc! {"$merge": {"on": "_id"}}], 9),
            // A duplicate _id in $out's output: nothing is written.
            (
                vec![doc! {"$project": {"_id": "$a"}}, doc! {"$out": "dup"}],
                11000,
            ),
        ];
        for (pipeline, want) in cases {
            let err = agg(&db, "src", pipeline.clone()).await.unwrap_err();
            assert_eq!(code(&err), Some(want), "{pipeline:?}: {err}");
        }
        let colls = db.list_collection_names().await.unwrap();
        assert!(!colls.contains(&"dup".to_string()), "{colls:?}");
        assert!(!colls.contains(&"x".to_string()), "{colls:?}");
        assert!(colls.iter().all(|n| !n.starts_with("tmp.")), "{colls:?}");
    })
    .await
}

#[tokio::test]
async fn merge_modes_write_as_mongodb_does() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("wm");
        let src = db.collection::<Document>("src");
        src.insert_many(vec![doc! {"_id": 1, "a": 10}, doc! {"_id": 2, "a": 20}])
            .await
            .unwrap();
        let target = db.collection::<Document>("t");
        let reset = || async {
            target.delete_many(doc! {}).await.unwrap();
            target
                .insert_one(doc! {"_id": 1, "a": 0, "keep": true})
                .await
                .unwrap();
        };
        let merge = |when_matched: &str, when_not_matched: &str| {
            vec![doc! {"$merge": {"into": "t", "on": "_id", "whenMatched": when_matched, "whenNotMatched": when_not_matched}}]
        };
        // (whenMatched, whenNotMatched) → the target afterwards.
        let table: Vec<(&str, &str, Vec<Document>)> = vec![
            ("merge", "insert", vec![doc! {"_id": 1, "a": 10, "keep": true}, doc! {"_id": 2, "a": 20}]),
            ("replace", "insert", vec![doc! {"_id": 1, "a": 10}, doc! {"_id": 2, "a": 20}]),
            ("keepExisting", "insert", vec![doc! {"_id": 1, "a": 0, "keep": true}, doc! {"_id": 2, "a": 20}]),
            ("merge", "discard", vec![doc! {"_id": 1, "a": 10, "keep": true}]),
            ("replace", "discard", vec![doc! {"_id": 1, "a": 10}]),
        ];
        for (m, n, want) in table {
            reset().await;
            agg(&db, "src", merge(m, n)).await.unwrap();
            assert_eq!(all(&target).await, want, "{m}/{n}");
        }
        // whenMatched: fail → duplicate key; whenNotMatched: fail → 13113.
        reset().await;
        let err = agg(&db, "src", merge("fail", "insert")).await.unwrap_err();
        assert_eq!(code(&err), Some(11000));
        reset().await;
        let err = agg(&db, "src", merge("merge", "fail")).await.unwrap_err();
        assert_eq!(code(&err), Some(13113));
        // The string form: merge/insert into a new collection, created implicitly.
        agg(&db, "src", vec![doc! {"$merge": "fresh"}]).await.unwrap();
        assert_eq!(all(&db.collection("fresh")).await.len(), 2);
        // Documents without _id get one.
        agg(&db, "src", vec![doc! {"$project": {"_id": 0, "a": 1}}, doc! {"$merge": "noid"}])
            .await
            .unwrap();
        let docs = all(&db.collection("noid")).await;
        assert_eq!(docs.len(), 2);
        assert!(docs.iter().all(|d| matches!(d.get("_id"), Some(Bson::ObjectId(_)))));

        // Change events: update (merge), replace (replace), insert (insert).
        reset().await;
        let mut s = target.watch().await.unwrap().with_type::<Document>();
        agg(&db, "src", merge("merge", "insert")).await.unwrap();
        let e = next(&mut s).await;
        assert_eq!(op(&e), "update");
        assert_eq!(
            e.get_document("updateDescription").unwrap().get_document("updatedFields").unwrap(),
            &doc! {"a": 10}
        );
        assert_eq!(op(&next(&mut s).await), "insert");
        agg(&db, "src", merge("replace", "discard")).await.unwrap();
        let e = next(&mut s).await;
        assert_eq!(op(&e), "replace");
        assert_eq!(e.get_document("fullDocument").unwrap(), &doc! {"_id": 1, "a": 10});
    })
    .await
}

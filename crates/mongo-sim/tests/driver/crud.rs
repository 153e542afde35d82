//! CRUD commands and the reply shapes the driver relies on.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{
    options::{FindOneAndUpdateOptions, FindOptions, ReturnDocument},
    Collection,
};

use crate::common::*;

fn coll(c: &mongodb::Client, name: &str) -> Collection<Document> {
    c.database("crud").collection(name)
}

#[tokio::test]
async fn insert_one_and_many_report_ids_and_store_id_first() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "ins");
        let r = col.insert_one(doc! {"a": 1, "_id": 7}).await.unwrap();
        assert_eq!(r.inserted_id, Bson::Int32(7));
        let r = col
            .insert_many(vec![
                doc! {"x": 1},
                doc! {"x": 2},
                doc! {"_id": "s", "x": 3},
            ])
            .await
            .unwrap();
        assert_eq!(r.inserted_ids.len(), 3);
        assert_eq!(r.inserted_ids[&2], Bson::String("s".into()));
        // The server stores `_id` first even when the client put it elsewhere.
        let d = col.find_one(doc! {"_id": 7}).await.unwrap().unwrap();
        assert_eq!(d.keys().next().map(String::as_str), Some("_id"));
        assert_eq!(d, doc! {"_id": 7, "a": 1});
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 4);
    })
    .await
}

#[tokio::test]
async fn insert_without_id_through_raw_command_gets_object_id() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("crud");
        let r = db
            .run_command(doc! {"insert": "noid", "documents": [{"a": 1}]})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 1);
        assert_eq!(r.get_f64("ok").unwrap(), 1.0);
        let d = coll(&c, "noid").find_one(doc! {}).await.unwrap().unwrap();
        assert!(matches!(d.get("_id"), Some(Bson::ObjectId(_))));
        assert_eq!(d.keys().next().map(String::as_str), Some("_id"));
    })
    .await
}

#[tokio::test]
async fn duplicate_keys_ordered_and_unordered() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("crud");
        db.run_command(doc! {"insert": "dup", "documents": [{"_id": 1}]})
            .await
            .unwrap();
        // Ordered: stops at the first error.
        let r = db
            .run_command(doc! {"insert": "dup", "documents": [{"_id": 2}, {"_id": 1}, {"_id": 3}], "ordered": true})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 1);
        let errs = r.get_array("writeErrors").unwrap();
        assert_eq!(errs.len(), 1);
        let e = errs[0].as_document().unwrap();
        assert_eq!(e.get_i32("index").unwrap(), 1);
        assert_eq!(e.get_i32("code").unwrap(), 11000);
        assert!(e.get_str("errmsg").unwrap().contains("E11000"));
        assert_eq!(e.get_document("keyValue").unwrap(), &doc! {"_id": 1});
        // Unordered: continues after the error.
        let r = db
            .run_command(doc! {"insert": "dup", "documents": [{"_id": 1}, {"_id": 4}, {"_id": 2}, {"_id": 5}], "ordered": false})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 2);
        let idx: Vec<i32> = r
            .get_array("writeErrors")
            .unwrap()
            .iter()
            .map(|e| e.as_document().unwrap().get_i32("index").unwrap())
            .collect();
        assert_eq!(idx, vec![0, 2]);
        // Through the driver API.
        let err = coll(&c, "dup")
            .insert_many(vec![doc! {"_id": 10}, doc! {"_id": 10}, doc! {"_id": 11}])
            .ordered(false)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(11000));
        // {1, 2} + {4, 5} + {10, 11}
        assert_eq!(coll(&c, "dup").count_documents(doc! {}).await.unwrap(), 6);
    })
    .await
}

#[tokio::test]
async fn update_reply_shapes_and_upserts() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "upd");
        col.insert_many(vec![
            doc! {"_id": 1, "n": 1, "g": "a"},
            doc! {"_id": 2, "n": 2, "g": "a"},
            doc! {"_id": 3, "n": 3, "g": "b"},
        ])
        .await
        .unwrap();
        let r = col
            .update_one(doc! {"_id": 1}, doc! {"$set": {"x": 1}})
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (1, 1));
        assert!(r.upserted_id.is_none());
        // A no-op update matches but does not modify.
        let r = col
            .update_one(doc! {"_id": 1}, doc! {"$set": {"x": 1}})
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (1, 0));
        let r = col
            .update_many(doc! {"g": "a"}, doc! {"$inc": {"n": 10}})
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (2, 2));
        let r = col
            .update_one(doc! {"_id": 9}, doc! {"$set": {"y": 1}})
            .upsert(true)
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (0, 0));
        assert_eq!(r.upserted_id, Some(Bson::Int32(9)));
        assert_eq!(
            col.find_one(doc! {"_id": 9}).await.unwrap().unwrap(),
            doc! {"_id": 9, "y": 1}
        );
        // Raw reply: n, nModified, upserted [{index, _id}] for a multi-statement update.
        let r = c
            .database("crud")
            .run_command(doc! {"update": "upd", "updates": [
                {"q": {"_id": 2}, "u": {"$set": {"z": 1}}},
                {"q": {"_id": 20}, "u": {"$set": {"z": 2}}, "upsert": true},
                {"q": {"_id": 3}, "u": {"$set": {"n": 3}}},
            ]})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 3);
        assert_eq!(r.get_i32("nModified").unwrap(), 1);
        let ups = r.get_array("upserted").unwrap();
        assert_eq!(ups.len(), 1);
        assert_eq!(ups[0].as_document().unwrap(), &doc! {"index": 1, "_id": 20});
        // Replacement.
        let r = col
            .replace_one(doc! {"_id": 2}, doc! {"only": true})
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (1, 1));
        assert_eq!(
            col.find_one(doc! {"_id": 2}).await.unwrap().unwrap(),
            doc! {"_id": 2, "only": true}
        );
    })
    .await
}

#[tokio::test]
async fn update_operators_beyond_set() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "ops");
        col.insert_one(doc! {"_id": 1, "a": {"b": 1}, "arr": [1, 2, 3], "n": 5})
            .await
            .unwrap();
        col.update_one(
            doc! {"_id": 1},
            doc! {"$set": {"a.c": 2}, "$push": {"arr": 4}, "$mul": {"n": 2}, "$rename": {"a.b": "a.bb"}},
        )
        .await
        .unwrap();
        assert_eq!(
            col.find_one(doc! {"_id": 1}).await.unwrap().unwrap(),
            doc! {"_id": 1, "a": {"c": 2, "bb": 1}, "arr": [1, 2, 3, 4], "n": 10}
        );
        col.update_one(doc! {"_id": 1}, doc! {"$pull": {"arr": {"$gte": 3}}, "$unset": {"a": ""}})
            .await
            .unwrap();
        assert_eq!(
            col.find_one(doc! {"_id": 1}).await.unwrap().unwrap(),
            doc! {"_id": 1, "arr": [1, 2], "n": 10}
        );
        // Pipeline-style update.
        col.update_one(doc! {"_id": 1}, vec![doc! {"$set": {"total": {"$sum": "$arr"}}}])
            .await
            .unwrap();
        assert_eq!(
            col.find_one(doc! {"_id": 1}).await.unwrap().unwrap().get_i32("total").unwrap(),
            3
        );
        // Changing _id is refused.
        let err = col
            .update_one(doc! {"_id": 1}, doc! {"$set": {"_id": 2}})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(66));
    })
    .await
}

#[tokio::test]
async fn delete_one_and_many() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "del");
        col.insert_many((0..10).map(|i| doc! {"_id": i, "even": i % 2 == 0}))
            .await
            .unwrap();
        assert_eq!(
            col.delete_one(doc! {"even": true})
                .await
                .unwrap()
                .deleted_count,
            1
        );
        assert_eq!(
            col.delete_many(doc! {"even": true})
                .await
                .unwrap()
                .deleted_count,
            4
        );
        assert_eq!(
            col.delete_many(doc! {"nothing": 1})
                .await
                .unwrap()
                .deleted_count,
            0
        );
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 5);
        let r = c
            .database("crud")
            .run_command(doc! {"delete": "del", "deletes": [{"q": {}, "limit": 0}]})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 5);
    })
    .await
}

#[tokio::test]
async fn find_filter_sort_projection_skip_limit() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "find");
        col.insert_many(
            (0..20).map(|i| doc! {"_id": i, "k": i % 3, "v": 100 - i, "name": format!("n{i}")}),
        )
        .await
        .unwrap();
        let docs: Vec<Document> = col
            .find(doc! {"k": 1, "v": {"$lt": 95}})
            .sort(doc! {"v": 1})
            .projection(doc! {"name": 1, "_id": 0})
            .skip(1)
            .limit(3)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        // k == 1 and v < 95: _id 7 (93), 10 (90), 13 (87), 16 (84), 19 (81); ascending v, skip 1.
        assert_eq!(
            docs,
            vec![
                doc! {"name": "n16"},
                doc! {"name": "n13"},
                doc! {"name": "n10"}
            ]
        );
        let docs: Vec<Document> = col
            .find(doc! {"$or": [{"_id": {"$in": [1, 2]}}, {"name": {"$regex": "^n1[89]$"}}]})
            .sort(doc! {"k": -1, "_id": 1})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let ids: Vec<i32> = docs.iter().map(|d| d.get_i32("_id").unwrap()).collect();
        // k descending (2, 1, 1, 0), then _id ascending.
        assert_eq!(ids, vec![2, 1, 19, 18]);
    })
    .await
}

#[tokio::test]
async fn cursors_iterate_in_small_batches_and_get_killed() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "cur");
        col.insert_many((0..250).map(|i| doc! {"_id": i}))
            .await
            .unwrap();
        let opts = FindOptions::builder().batch_size(7).build();
        let docs: Vec<Document> = col
            .find(doc! {})
            .with_options(opts)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(docs.len(), 250);
        assert!(docs
            .iter()
            .enumerate()
            .all(|(i, d)| d.get_i32("_id").unwrap() == i as i32));
        // Raw find/getMore/killCursors shapes.
        let db = c.database("crud");
        let r = db
            .run_command(doc! {"find": "cur", "batchSize": 2})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(cursor.get_str("ns").unwrap(), "crud.cur");
        assert_eq!(cursor.get_array("firstBatch").unwrap().len(), 2);
        let id = cursor.get_i64("id").unwrap();
        assert_ne!(id, 0);
        let r = db
            .run_command(doc! {"getMore": id, "collection": "cur", "batchSize": 3})
            .await
            .unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(cursor.get_array("nextBatch").unwrap().len(), 3);
        assert_eq!(cursor.get_i64("id").unwrap(), id);
        let r = db
            .run_command(doc! {"killCursors": "cur", "cursors": [id]})
            .await
            .unwrap();
        assert_eq!(
            r.get_array("cursorsKilled").unwrap(),
            &vec![Bson::Int64(id)]
        );
        let err = db
            .run_command(doc! {"getMore": id, "collection": "cur"})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(43));
        // A driver cursor dropped early is killed on the server.
        {
            let mut cursor = col
                .find(doc! {})
                .with_options(FindOptions::builder().batch_size(5).build())
                .await
                .unwrap();
            let _ = cursor.try_next().await.unwrap();
        }
        eventually(std::time::Duration::from_secs(5), || async {
            open_cursors(&c).await == 0
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn counts_distinct_and_aggregations() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "agg");
        col.insert_many((0..30).map(|i| doc! {"_id": i, "g": format!("g{}", i % 3), "v": i}))
            .await
            .unwrap();
        assert_eq!(col.estimated_document_count().await.unwrap(), 30);
        assert_eq!(col.count_documents(doc! {"g": "g1"}).await.unwrap(), 10);
        assert_eq!(
            col.count_documents(doc! {})
                .skip(5)
                .limit(10)
                .await
                .unwrap(),
            10
        );
        assert_eq!(
            col.count_documents(doc! {"v": {"$gte": 25}}).await.unwrap(),
            5
        );
        let mut d = col.distinct("g", doc! {}).await.unwrap();
        d.sort_by_key(|b| b.as_str().unwrap().to_string());
        assert_eq!(
            d,
            vec![Bson::from("g0"), Bson::from("g1"), Bson::from("g2")]
        );
        let out: Vec<Document> = col
            .aggregate(vec![
                doc! {"$match": {"v": {"$gte": 3}}},
                doc! {"$group": {"_id": "$g", "total": {"$sum": "$v"}, "n": {"$sum": 1}}},
                doc! {"$sort": {"_id": 1}},
                doc! {"$skip": 1},
                doc! {"$limit": 1},
                doc! {"$project": {"_id": 1, "total": 1, "n": 1}},
            ])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        // g1 without v=1: 4+7+...+28 = 144, 9 docs.
        assert_eq!(out, vec![doc! {"_id": "g1", "total": 144, "n": 9}]);
        let out: Vec<Document> = col
            .aggregate(vec![doc! {"$match": {"g": "g2"}}, doc! {"$count": "c"}])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, vec![doc! {"c": 10}]);
        let r = c
            .database("crud")
            .run_command(doc! {"count": "agg", "query": {"g": "g0"}})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 10);
    })
    .await
}

#[tokio::test]
async fn find_and_modify_variants() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "fam");
        col.insert_many(vec![doc! {"_id": 1, "n": 1}, doc! {"_id": 2, "n": 2}])
            .await
            .unwrap();
        let before = col
            .find_one_and_update(doc! {"_id": 1}, doc! {"$inc": {"n": 5}})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(before, doc! {"_id": 1, "n": 1});
        let after = col
            .find_one_and_update(doc! {"_id": 1}, doc! {"$inc": {"n": 1}})
            .with_options(
                FindOneAndUpdateOptions::builder()
                    .return_document(ReturnDocument::After)
                    .build(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after, doc! {"_id": 1, "n": 7});
        let upserted = col
            .find_one_and_update(doc! {"_id": 3}, doc! {"$set": {"n": 3}})
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .unwrap();
        assert_eq!(upserted, Some(doc! {"_id": 3, "n": 3}));
        let none = col
            .find_one_and_update(doc! {"_id": 99}, doc! {"$set": {"n": 3}})
            .await
            .unwrap();
        assert!(none.is_none());
        let replaced = col
            .find_one_and_replace(doc! {"_id": 2}, doc! {"r": true})
            .return_document(ReturnDocument::After)
            .await
            .unwrap();
        assert_eq!(replaced, Some(doc! {"_id": 2, "r": true}));
        let deleted = col.find_one_and_delete(doc! {"_id": 3}).await.unwrap();
        assert_eq!(deleted, Some(doc! {"_id": 3, "n": 3}));
        let r = c
            .database("crud")
            .run_command(doc! {"findAndModify": "fam", "query": {"_id": 50}, "update": {"$set": {"a": 1}}, "upsert": true})
            .await
            .unwrap();
        let leo = r.get_document("lastErrorObject").unwrap();
        assert_eq!(leo.get_i32("n").unwrap(), 1);
        assert!(!leo.get_bool("updatedExisting").unwrap());
        assert_eq!(leo.get("upserted"), Some(&Bson::Int32(50)));
        assert_eq!(r.get("value"), Some(&Bson::Null));
    })
    .await
}

#[tokio::test]
async fn bulk_writes_through_insert_many_with_large_batches() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = coll(&c, "big");
        // More than one OP_MSG document sequence worth of documents.
        let docs: Vec<Document> = (0..120_000).map(|i| doc! {"_id": i}).collect();
        col.insert_many(docs).await.unwrap();
        assert_eq!(col.estimated_document_count().await.unwrap(), 120_000);
    })
    .await
}

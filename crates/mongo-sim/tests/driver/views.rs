//! Views: `create` with `viewOn`, `listCollections`, reads through the view, writes refused
//! with 166, `collMod`, `drop`, change events under `showExpandedEvents`, `dbHash`, restarts.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{Client, Database};

use crate::common::*;

fn op(e: &Document) -> &str {
    e.get_str("operationType").unwrap()
}

async fn create_view(db: &Database, name: &str, on: &str, pipeline: Vec<Document>) {
    db.run_command(doc! {"create": name, "viewOn": on, "pipeline": pipeline})
        .await
        .unwrap();
}

async fn list_entry(db: &Database, name: &str) -> Document {
    let reply = db
        .run_command(doc! {"listCollections": 1, "filter": {"name": name}})
        .await
        .unwrap();
    let batch = reply
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap();
    assert_eq!(batch.len(), 1, "{reply}");
    batch[0].as_document().unwrap().clone()
}

async fn seeded(c: &Client) -> Database {
    let db = c.database("vw");
    db.collection::<Document>("base")
        .insert_many((1..=5).map(|i| doc! {"_id": i, "a": i, "b": i * 10, "secret": "x"}))
        .await
        .unwrap();
    create_view(
        &db,
        "big",
        "base",
        vec![
            doc! {"$match": {"a": {"$gte": 2}}},
            doc! {"$project": {"a": 1, "b": 1}},
        ],
    )
    .await;
    db
}

#[tokio::test]
async fn list_collections_shows_a_view_as_mongodb_does() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = seeded(&c).await;
        let e = list_entry(&db, "big").await;
        assert_eq!(
            e,
            doc! {
                "name": "big",
                "type": "view",
                "options": {"viewOn": "base", "pipeline": [{"$match": {"a": {"$gte": 2}}}, {"$project": {"a": 1, "b": 1}}]},
                "info": {"readOnly": true},
            }
        );
        // nameOnly keeps the type; system.views is a collection of its own, as on a server.
        let reply = db
            .run_command(doc! {"listCollections": 1, "nameOnly": true})
            .await
            .unwrap();
        let mut names: Vec<Document> = reply
            .get_document("cursor")
            .unwrap()
            .get_array("firstBatch")
            .unwrap()
            .iter()
            .map(|d| d.as_document().unwrap().clone())
            .collect();
        names.sort_by_key(|d| d.get_str("name").unwrap().to_string());
        assert_eq!(
            names,
            vec![
                doc! {"name": "base", "type": "collection"},
                doc! {"name": "big", "type": "view"},
                doc! {"name": "system.views", "type": "collection"},
            ]
        );
        // Filtering on type works like on any field.
        let reply = db
            .run_command(doc! {"listCollections": 1, "filter": {"type": "view"}, "nameOnly": true})
            .await
            .unwrap();
        let batch = reply.get_document("cursor").unwrap().get_array("firstBatch").unwrap();
        assert_eq!(batch.len(), 1);
        // A view on a missing collection is allowed (and empty).
        create_view(&db, "nothing", "missing", vec![]).await;
        let n = db
            .collection::<Document>("nothing")
            .count_documents(doc! {})
            .await
            .unwrap();
        assert_eq!(n, 0);
        // The view is never in dbHash's collections; system.views is skipped like every
        // system collection the simulator's dbHash skips.
        let h = db_hash(&c, "vw").await;
        let colls: Vec<&String> = h.get_document("collections").unwrap().keys().collect();
        assert_eq!(colls, vec!["base"]);
    })
    .await
}

#[tokio::test]
async fn reads_run_the_view_pipeline_first() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = seeded(&c).await;
        let v = db.collection::<Document>("big");
        // find: filter, sort, projection, skip, limit after the view's pipeline.
        let got: Vec<Document> = v
            .find(doc! {"a": {"$lte": 4}})
            .sort(doc! {"a": -1})
            .projection(doc! {"_id": 0, "a": 1})
            .skip(1)
            .limit(2)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got, vec![doc! {"a": 3}, doc! {"a": 2}]);
        // The view's $project hides fields of the base collection.
        let one = v.find_one(doc! {"_id": 2}).await.unwrap().unwrap();
        assert_eq!(one, doc! {"_id": 2, "a": 2, "b": 20});
        // A filter on a field the view removed matches nothing.
        assert!(v.find_one(doc! {"secret": "x"}).await.unwrap().is_none());
        // aggregate, countDocuments (an aggregate), count (estimatedDocumentCount), distinct.
        let got: Vec<Document> = v
            .aggregate(vec![doc! {"$group": {"_id": null, "s": {"$sum": "$b"}}}])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got, vec![doc! {"_id": Bson::Null, "s": 140}]);
        assert_eq!(v.count_documents(doc! {"a": {"$gt": 3}}).await.unwrap(), 2);
        assert_eq!(v.estimated_document_count().await.unwrap(), 4);
        let reply = db
            .run_command(doc! {"count": "big", "query": {"b": {"$gte": 30}}, "skip": 1})
            .await
            .unwrap();
        assert_eq!(reply.get_i32("n").unwrap(), 2);
        let values = v.distinct("a", doc! {"a": {"$ne": 3}}).await.unwrap();
        assert_eq!(values, vec![Bson::Int32(2), Bson::Int32(4), Bson::Int32(5)]);
        // A view on a view applies both pipelines, innermost first.
        create_view(&db, "top", "big", vec![doc! {"$match": {"a": {"$gte": 4}}}]).await;
        let ids: Vec<Bson> = db
            .collection::<Document>("top")
            .distinct("_id", doc! {})
            .await
            .unwrap();
        assert_eq!(ids, vec![Bson::Int32(4), Bson::Int32(5)]);
        // The view follows writes to its base collection.
        db.collection::<Document>("base")
            .insert_one(doc! {"_id": 6, "a": 6, "b": 60})
            .await
            .unwrap();
        assert_eq!(v.estimated_document_count().await.unwrap(), 5);
    })
    .await
}

#[tokio::test]
async fn writes_to_a_view_fail_with_166() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = seeded(&c).await;
        let msg = "Namespace vw.big is a view, not a collection";
        // insert/update/delete: a write error per statement (the first only when ordered).
        let reply = db
            .run_command(doc! {"insert": "big", "documents": [{"_id": 9}, {"_id": 10}], "ordered": false})
            .await
            .unwrap();
        assert_eq!(reply.get_i32("n").unwrap(), 0);
        let errors = reply.get_array("writeErrors").unwrap();
        assert_eq!(errors.len(), 2);
        let e0 = errors[0].as_document().unwrap();
        assert_eq!(e0.get_i32("code").unwrap(), 166);
        assert_eq!(e0.get_str("errmsg").unwrap(), msg);
        for reply in [
            db.run_command(doc! {"update": "big", "updates": [{"q": {}, "u": {"$set": {"a": 0}}}, {"q": {}, "u": {"$set": {"a": 1}}}]})
                .await
                .unwrap(),
            db.run_command(doc! {"delete": "big", "deletes": [{"q": {}, "limit": 0}]})
                .await
                .unwrap(),
        ] {
            let errors = reply.get_array("writeErrors").unwrap();
            assert_eq!(errors.len(), 1, "{reply}");
            assert_eq!(errors[0].as_document().unwrap().get_i32("code").unwrap(), 166);
        }
        let v = db.collection::<Document>("big");
        let err = v.insert_one(doc! {"_id": 11}).await.unwrap_err();
        assert_eq!(code(&err), Some(166));
        let err = v
            .find_one_and_update(doc! {}, doc! {"$set": {"a": 1}})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(166));
        assert!(err.to_string().contains(msg), "{err}");
        let err = v
            .create_index(mongodb::IndexModel::builder().keys(doc! {"a": 1}).build())
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(166));
        assert!(err.to_string().contains("Cannot create indexes on a view"), "{err}");
        let err = v.list_index_names().await.unwrap_err();
        assert_eq!(code(&err), Some(166));
        // A view is not watchable.
        let err = v.watch().await.unwrap_err();
        assert_eq!(code(&err), Some(166));
        // Nothing reached the base collection.
        assert_eq!(
            db.collection::<Document>("base").count_documents(doc! {}).await.unwrap(),
            5
        );
        // The name is taken: a collection cannot be created over it, a different view
        // neither; the same definition again is accepted.
        let err = db.create_collection("big").await.unwrap_err();
        assert_eq!(code(&err), Some(48));
        let err = db
            .run_command(doc! {"create": "big", "viewOn": "base", "pipeline": []})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(48));
        db.run_command(doc! {"create": "big", "viewOn": "base", "pipeline": [{"$match": {"a": {"$gte": 2}}}, {"$project": {"a": 1, "b": 1}}]})
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn create_and_coll_mod_check_their_options() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = seeded(&c).await;
        let cases: Vec<(Document, i32)> = vec![
            (
                doc! {"create": "v2", "viewOn": "base", "pipeline": [{"$out": "x"}]},
                167,
            ),
            (
                doc! {"create": "v2", "viewOn": "base", "pipeline": [{"$merge": "x"}]},
                167,
            ),
            (
                doc! {"create": "v2", "viewOn": "base", "pipeline": {"$match": {}}},
                14,
            ),
            (
                doc! {"create": "v2", "viewOn": "base", "capped": true, "size": 100},
                72,
            ),
            (
                doc! {"create": "v2", "viewOn": "base", "validator": {"a": 1}},
                72,
            ),
            (doc! {"create": "v2", "viewOn": ""}, 2),
            (doc! {"create": "v2", "viewOn": 1}, 14),
            (doc! {"create": "v2", "pipeline": []}, 72),
            (doc! {"create": "v2", "viewOn": "base", "bogus": 1}, 40415),
            (
                doc! {"create": "v2", "viewOn": "base", "pipeline": [{"$nope": {}}]},
                40324,
            ),
            (doc! {"collMod": "big", "validator": {"a": 1}}, 72),
            (doc! {"collMod": "base", "viewOn": "other"}, 72),
            (doc! {"collMod": "big", "pipeline": [{"$out": "x"}]}, 167),
        ];
        for (cmd, want) in cases {
            let err = db.run_command(cmd.clone()).await.unwrap_err();
            assert_eq!(code(&err), Some(want), "{cmd}: {err}");
        }
        // collMod replaces viewOn and/or pipeline.
        db.collection::<Document>("other")
            .insert_one(doc! {"_id": "o"})
            .await
            .unwrap();
        db.run_command(doc! {"collMod": "big", "viewOn": "other", "pipeline": []})
            .await
            .unwrap();
        let e = list_entry(&db, "big").await;
        assert_eq!(
            e.get_document("options").unwrap(),
            &doc! {"viewOn": "other", "pipeline": []}
        );
        let all: Vec<Document> = db
            .collection::<Document>("big")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(all, vec![doc! {"_id": "o"}]);
        // drop removes the view (and not the base collection).
        let reply = db.run_command(doc! {"drop": "big"}).await.unwrap();
        assert_eq!(reply.get_str("ns").unwrap(), "vw.big");
        assert!(!reply.contains_key("nIndexesWas"));
        let names = db.list_collection_names().await.unwrap();
        assert!(!names.contains(&"big".to_string()), "{names:?}");
        assert!(names.contains(&"other".to_string()));
        // The name is free again.
        db.create_collection("big").await.unwrap();
    })
    .await
}

#[tokio::test]
async fn view_ddl_appears_as_create_modify_drop_events() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("vx");
        db.collection::<Document>("base")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        let mut s = db
            .watch()
            .show_expanded_events(true)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut plain = db.watch().await.unwrap().with_type::<Document>();
        let mut on_base = db
            .collection::<Document>("base")
            .watch()
            .show_expanded_events(true)
            .await
            .unwrap()
            .with_type::<Document>();
        let pipeline = vec![doc! {"$match": {"a": 2}}, doc! {"$project": {"a": 1}}];
        create_view(&db, "view", "base", pipeline.clone()).await;
        db.run_command(
            doc! {"collMod": "view", "viewOn": "base", "pipeline": [{"$match": {"a": 1}}]},
        )
        .await
        .unwrap();
        db.collection::<Document>("view").drop().await.unwrap();
        db.collection::<Document>("base")
            .insert_one(doc! {"_id": 2})
            .await
            .unwrap();

        let e = next(&mut s).await;
        // system.views itself is created first: a system collection, never reported.
        assert_eq!(op(&e), "create");
        assert_eq!(
            e.get_document("ns").unwrap(),
            &doc! {"db": "vx", "coll": "view"}
        );
        assert_eq!(
            e.get_document("operationDescription").unwrap(),
            &doc! {"viewOn": "base", "pipeline": pipeline}
        );
        assert!(!e.contains_key("collectionUUID"), "{e}");
        let e = next(&mut s).await;
        assert_eq!(op(&e), "modify");
        assert_eq!(
            e.get_document("operationDescription").unwrap(),
            &doc! {"viewOn": "base", "pipeline": [{"$match": {"a": 1}}]}
        );
        let e = next(&mut s).await;
        assert_eq!(op(&e), "drop");
        assert_eq!(
            e.get_document("ns").unwrap(),
            &doc! {"db": "vx", "coll": "view"}
        );
        assert!(!e.contains_key("collectionUUID"), "{e}");
        let resume = e.get("_id").unwrap().clone();
        assert_eq!(op(&next(&mut s).await), "insert");
        // Without showExpandedEvents, and on the base collection's stream, view DDL is not
        // reported: both see only the insert.
        assert_eq!(op(&next(&mut plain).await), "insert");
        assert_eq!(op(&next(&mut on_base).await), "insert");
        // The drop event's token resumes the stream.
        let mut again = db
            .watch()
            .show_expanded_events(true)
            .resume_after(
                bson::deserialize_from_document::<mongodb::change_stream::event::ResumeToken>(
                    resume.as_document().unwrap().clone(),
                )
                .unwrap(),
            )
            .await
            .unwrap()
            .with_type::<Document>();
        assert_eq!(op(&next(&mut again).await), "insert");
    })
    .await
}

#[tokio::test]
async fn views_survive_a_restart_from_the_data_directory() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let sim = builder().data_dir(dir.path()).start().await.unwrap();
        let c = client(&sim).await;
        let db = seeded(&c).await;
        create_view(&db, "gone", "base", vec![]).await;
        db.collection::<Document>("gone").drop().await.unwrap();
        sim.shutdown().await;
        drop(c);

        let sim = builder().data_dir(dir.path()).start().await.unwrap();
        let c = client(&sim).await;
        let db = c.database("vw");
        let e = list_entry(&db, "big").await;
        assert_eq!(e.get_str("type").unwrap(), "view");
        assert_eq!(
            db.collection::<Document>("big")
                .count_documents(doc! {})
                .await
                .unwrap(),
            4
        );
        let names = db.list_collection_names().await.unwrap();
        assert!(!names.contains(&"gone".to_string()), "{names:?}");
        sim.shutdown().await;
    })
    .await
}

//! Databases, collections, indexes, validators, capped collections, admin commands, dbHash.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{options::IndexOptions, Client, IndexModel};

use crate::common::*;

#[tokio::test]
async fn validator_rejects_with_121_and_bypass_works() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("ddl");
        db.create_collection("people")
            .validator(doc! {"$jsonSchema": {
                "bsonType": "object",
                "required": ["name", "age"],
                "properties": {"name": {"bsonType": "string"}, "age": {"bsonType": "int", "minimum": 0}},
            }})
            .await
            .unwrap();
        let col = db.collection::<Document>("people");
        col.insert_one(doc! {"name": "ann", "age": 3}).await.unwrap();
        let err = col.insert_one(doc! {"name": "bob"}).await.unwrap_err();
        assert_eq!(code(&err), Some(121));
        let err = col
            .insert_one(doc! {"name": 5, "age": 1})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(121));
        let err = col
            .update_one(doc! {"name": "ann"}, doc! {"$unset": {"age": ""}})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(121));
        col.insert_one(doc! {"name": "bob"})
            .bypass_document_validation(true)
            .await
            .unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 2);
        // The validator is listed with the collection.
        let specs: Vec<_> = db
            .list_collections()
            .filter(doc! {"name": "people"})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(specs.len(), 1);
        assert!(specs[0].options.validator.is_some());
        // collMod replaces the validator.
        db.run_command(doc! {"collMod": "people", "validator": {"$jsonSchema": {"required": ["name"]}}})
            .await
            .unwrap();
        col.insert_one(doc! {"name": "cy"}).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn capped_collections_keep_the_newest_documents() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("ddl");
        db.create_collection("cap")
            .capped(true)
            .size(4096)
            .max(3)
            .await
            .unwrap();
        let col = db.collection::<Document>("cap");
        for i in 0..5 {
            col.insert_one(doc! {"_id": i}).await.unwrap();
        }
        let ids: Vec<i32> = col
            .find(doc! {})
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .iter()
            .map(|d| d.get_i32("_id").unwrap())
            .collect();
        assert_eq!(ids, vec![2, 3, 4]);
        let info = db
            .run_command(doc! {"listCollections": 1, "filter": {"name": "cap"}})
            .await
            .unwrap();
        let entry = info
            .get_document("cursor")
            .unwrap()
            .get_array("firstBatch")
            .unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        let options = entry.get_document("options").unwrap();
        assert!(options.get_bool("capped").unwrap());
        assert_eq!(
            options
                .get("max")
                .and_then(|m| m.as_i64().or(m.as_i32().map(i64::from))),
            Some(3)
        );
        let h = db_hash(&c, "ddl").await;
        assert_eq!(h.get_array("capped").unwrap(), &vec![Bson::from("cap")]);
    })
    .await
}

#[tokio::test]
async fn collections_listing_options_uuid_collation() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("ddl");
        db.run_command(doc! {"create": "coll1", "collation": {"locale": "en", "strength": 2}})
            .await
            .unwrap();
        db.create_collection("coll2").await.unwrap();
        // Creating an existing collection with other options fails with NamespaceExists.
        let err = db
            .run_command(doc! {"create": "coll2", "capped": true, "size": 1000})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(48));
        let mut names = db.list_collection_names().await.unwrap();
        names.sort();
        assert_eq!(names, vec!["coll1", "coll2"]);
        let r = db.run_command(doc! {"listCollections": 1}).await.unwrap();
        let cursor = r.get_document("cursor").unwrap();
        assert_eq!(cursor.get_str("ns").unwrap(), "ddl.$cmd.listCollections");
        assert_eq!(cursor.get_i64("id").unwrap(), 0);
        let batch = cursor.get_array("firstBatch").unwrap();
        let c1 = batch
            .iter()
            .map(|b| b.as_document().unwrap())
            .find(|d| d.get_str("name").unwrap() == "coll1")
            .unwrap();
        assert_eq!(c1.get_str("type").unwrap(), "collection");
        let collation = c1.get_document("options").unwrap().get_document("collation").unwrap();
        assert_eq!(collation.get_str("locale").unwrap(), "en");
        let info = c1.get_document("info").unwrap();
        assert!(!info.get_bool("readOnly").unwrap());
        assert!(matches!(info.get("uuid"), Some(Bson::Binary(b)) if b.subtype == bson::spec::BinarySubtype::Uuid));
        // nameOnly
        let r = db
            .run_command(doc! {"listCollections": 1, "nameOnly": true})
            .await
            .unwrap();
        let first = r.get_document("cursor").unwrap().get_array("firstBatch").unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        assert!(first.get("options").is_none());
    })
    .await
}

#[tokio::test]
async fn databases_drop_and_rename() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        c.database("d1")
            .collection::<Document>("a")
            .insert_one(doc! {"x": 1})
            .await
            .unwrap();
        c.database("d2")
            .collection::<Document>("b")
            .insert_one(doc! {"x": 1})
            .await
            .unwrap();
        let dbs = c.list_databases().await.unwrap();
        let names: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
        assert!(names.contains(&"d1") && names.contains(&"d2") && names.contains(&"admin"));
        assert!(dbs.iter().all(|d| d.size_on_disk > 0));
        let names = c
            .list_database_names()
            .filter(doc! {"name": "d1"})
            .await
            .unwrap();
        assert_eq!(names, vec!["d1"]);
        // drop of a missing collection succeeds, of an existing one removes it.
        c.database("d1")
            .collection::<Document>("missing")
            .drop()
            .await
            .unwrap();
        c.database("d1")
            .collection::<Document>("a")
            .drop()
            .await
            .unwrap();
        assert!(c
            .database("d1")
            .list_collection_names()
            .await
            .unwrap()
            .is_empty());
        c.database("d2").drop().await.unwrap();
        let names = c.list_database_names().await.unwrap();
        assert!(!names.iter().any(|n| n == "d2" || n == "d1"));
        // renameCollection, with and without dropTarget.
        let db = c.database("r");
        db.collection::<Document>("src")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        db.collection::<Document>("dst")
            .insert_one(doc! {"_id": 2})
            .await
            .unwrap();
        let err = admin(&c, doc! {"renameCollection": "r.src", "to": "r.dst"})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(48));
        admin(
            &c,
            doc! {"renameCollection": "r.src", "to": "r.dst", "dropTarget": true},
        )
        .await
        .unwrap();
        let docs: Vec<Document> = db
            .collection::<Document>("dst")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(docs, vec![doc! {"_id": 1}]);
        let err = admin(&c, doc! {"renameCollection": "r.nope", "to": "r.x"})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(26));
        // Dropping admin is refused.
        let err = admin(&c, doc! {"dropDatabase": 1}).await.unwrap_err();
        assert_eq!(code(&err), Some(20));
    })
    .await
}

#[tokio::test]
async fn indexes_create_list_drop_and_unique_enforcement() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("ix").collection::<Document>("c");
        col.insert_many(vec![
            doc! {"_id": 1, "e": "a", "t": bson::DateTime::now()},
            doc! {"_id": 2, "e": "b"},
        ])
        .await
        .unwrap();
        let r = col
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"e": 1})
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .name("e_u".to_string())
                            .build(),
                    )
                    .build(),
            )
            .await
            .unwrap();
        assert_eq!(r.index_name, "e_u");
        col.create_index(
            IndexModel::builder()
                .keys(doc! {"t": 1})
                .options(
                    IndexOptions::builder()
                        .expire_after(std::time::Duration::from_secs(3600))
                        .partial_filter_expression(doc! {"e": {"$exists": true}})
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
        let err = col.insert_one(doc! {"_id": 3, "e": "a"}).await.unwrap_err();
        assert_eq!(code(&err), Some(11000));
        let err = col
            .update_one(doc! {"_id": 2}, doc! {"$set": {"e": "a"}})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(11000));
        let specs: Vec<IndexModel> = col
            .list_indexes()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let names: Vec<String> = specs
            .iter()
            .map(|m| m.options.as_ref().unwrap().name.clone().unwrap())
            .collect();
        assert_eq!(names, vec!["_id_", "e_u", "t_1"]);
        let t = specs[2].options.as_ref().unwrap();
        assert_eq!(t.expire_after, Some(std::time::Duration::from_secs(3600)));
        assert!(t.partial_filter_expression.is_some());
        assert_eq!(specs[1].options.as_ref().unwrap().unique, Some(true));
        // A unique index cannot be built over duplicates.
        // (distinct `e` values: a unique index treats a missing field as null)
        col.insert_one(doc! {"_id": 4, "e": "c", "d": 1})
            .await
            .unwrap();
        col.insert_one(doc! {"_id": 5, "e": "d", "d": 1})
            .await
            .unwrap();
        let err = col
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"d": 1})
                    .options(IndexOptions::builder().unique(true).build())
                    .build(),
            )
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(11000));
        col.drop_index("e_u").await.unwrap();
        col.insert_one(doc! {"_id": 6, "e": "a"}).await.unwrap();
        // Missing fields are null keys in a unique index.
        col.create_index(
            IndexModel::builder()
                .keys(doc! {"m": 1})
                .options(IndexOptions::builder().unique(true).build())
                .build(),
        )
        .await
        .unwrap_err();
        let err = col.drop_index("nope").await.unwrap_err();
        assert_eq!(code(&err), Some(27));
        col.drop_indexes().await.unwrap();
        let names = col.list_index_names().await.unwrap();
        assert_eq!(names, vec!["_id_"]);
        let err = c
            .database("ix")
            .collection::<Document>("missing")
            .list_index_names()
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(26));
    })
    .await
}

#[tokio::test]
async fn admin_commands_and_unknown_command() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let r = admin(&c, doc! {"ping": 1}).await.unwrap();
        assert_eq!(r.get_f64("ok").unwrap(), 1.0);
        assert!(matches!(r.get("operationTime"), Some(Bson::Timestamp(_))));
        assert!(r
            .get_document("$clusterTime")
            .unwrap()
            .contains_key("signature"));
        let b = admin(&c, doc! {"buildInfo": 1}).await.unwrap();
        assert!(b.get_str("version").unwrap().starts_with("7.0."));
        let s = admin(&c, doc! {"serverStatus": 1}).await.unwrap();
        assert_eq!(s.get_str("process").unwrap(), "mongod");
        let h = admin(&c, doc! {"hello": 1}).await.unwrap();
        assert!(h.get_bool("isWritablePrimary").unwrap());
        assert_eq!(h.get_str("setName").unwrap(), "rs0");
        assert_eq!(
            h.get_array("hosts").unwrap(),
            &vec![Bson::String(sim.host())]
        );
        assert_eq!(h.get_i32("maxWireVersion").unwrap(), 21);
        assert_eq!(h.get_i32("logicalSessionTimeoutMinutes").unwrap(), 30);
        let err = admin(&c, doc! {"frobnicate": 1}).await.unwrap_err();
        assert_eq!(code(&err), Some(59));
        match err.kind.as_ref() {
            mongodb::error::ErrorKind::Command(e) => assert_eq!(e.code_name, "CommandNotFound"),
            other => panic!("unexpected error {other:?}"),
        }
        let cfg = admin(&c, doc! {"replSetGetConfig": 1}).await.unwrap();
        let id = cfg
            .get_document("config")
            .unwrap()
            .get_document("settings")
            .unwrap()
            .get_object_id("replicaSetId")
            .unwrap();
        assert_eq!(id, sim.replica_set_id());
        // endSessions is accepted.
        admin(
            &c,
            doc! {"endSessions": [{"id": bson::Binary::from_uuid(bson::Uuid::new())}]},
        )
        .await
        .unwrap();
        // The direct-connection URI works too.
        let direct = client_for(&sim.direct_uri()).await;
        admin(&direct, doc! {"ping": 1}).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn db_hash_equal_for_equal_data_and_sensitive_to_one_field() {
    bounded(async {
        let (_s1, c1) = start_with_client().await;
        let (_s2, c2) = start_with_client().await;
        for c in [&c1, &c2] {
            let col = c.database("h").collection::<Document>("c");
            col.insert_many((0..100).map(|i| doc! {"_id": i, "v": i * 2, "s": "x"}))
                .await
                .unwrap();
            c.database("h")
                .collection::<Document>("other")
                .insert_one(doc! {"_id": "a"})
                .await
                .unwrap();
        }
        let h1 = db_hash(&c1, "h").await;
        let h2 = db_hash(&c2, "h").await;
        assert_eq!(h1.get_str("md5").unwrap(), h2.get_str("md5").unwrap());
        assert_eq!(
            h1.get_document("collections").unwrap(),
            h2.get_document("collections").unwrap()
        );
        assert_eq!(
            db_hash(&c1, "h").await.get_str("md5").unwrap(),
            h1.get_str("md5").unwrap()
        );
        c2.database("h")
            .collection::<Document>("c")
            .update_one(doc! {"_id": 50}, doc! {"$set": {"s": "y"}})
            .await
            .unwrap();
        let h2b = db_hash(&c2, "h").await;
        assert_ne!(h1.get_str("md5").unwrap(), h2b.get_str("md5").unwrap());
        assert_ne!(
            h1.get_document("collections")
                .unwrap()
                .get_str("c")
                .unwrap(),
            h2b.get_document("collections")
                .unwrap()
                .get_str("c")
                .unwrap()
        );
        assert_eq!(
            h1.get_document("collections")
                .unwrap()
                .get_str("other")
                .unwrap(),
            h2b.get_document("collections")
                .unwrap()
                .get_str("other")
                .unwrap()
        );
        // A numeric type change (int32 -> int64) alone changes the hash too.
        c1.database("h")
            .collection::<Document>("c")
            .update_one(doc! {"_id": 1}, doc! {"$set": {"v": 2i64}})
            .await
            .unwrap();
        assert_ne!(
            db_hash(&c1, "h").await.get_str("md5").unwrap(),
            h1.get_str("md5").unwrap()
        );
        // Restricting to some collections.
        let only = c1
            .database("h")
            .run_command(doc! {"dbHash": 1, "collections": ["other"]})
            .await
            .unwrap();
        assert_eq!(only.get_document("collections").unwrap().len(), 1);
        assert!(only.get_document("uuids").unwrap().contains_key("other"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_insert_exact_counts() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let mut tasks = Vec::new();
        for t in 0..8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let col = c.database("conc").collection::<Document>("c");
                for i in 0..1000 {
                    col.insert_one(doc! {"_id": t * 1000 + i, "t": t})
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let col = c.database("conc").collection::<Document>("c");
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 8000);
        assert_eq!(col.count_documents(doc! {"t": 3}).await.unwrap(), 1000);
        let h1 = db_hash(&c, "conc").await;
        let h2 = db_hash(&c, "conc").await;
        assert_eq!(h1.get_str("md5").unwrap(), h2.get_str("md5").unwrap());
    })
    .await
}

/// `serverStatus.opcounters` counts as a mongod does: inserts per document (a duplicate
/// included, as DOCS-4551 shows the server doing), updates and deletes per statement, `find`
/// and `aggregate` as queries, `getMore` apart, everything else as a command.
#[tokio::test]
async fn server_status_counts_operations_as_mongod() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let counters = || async {
            admin(&c, doc! {"serverStatus": 1})
                .await
                .unwrap()
                .get_document("opcounters")
                .unwrap()
                .clone()
        };
        let before = counters().await;
        let db = c.database("ops");
        db.run_command(doc! {"insert": "c", "documents": [{"_id": 1}, {"_id": 2}, {"_id": 1}], "ordered": false})
            .await
            .unwrap();
        db.run_command(doc! {"update": "c", "updates": [
            {"q": {"_id": 1}, "u": {"a": 1}},
            {"q": {"_id": 2}, "u": {"$set": {"a": 2}}},
        ]})
        .await
        .unwrap();
        db.run_command(doc! {"delete": "c", "deletes": [{"q": {"_id": 2}, "limit": 1}]})
            .await
            .unwrap();
        db.run_command(doc! {"find": "c", "batchSize": 0}).await.unwrap();
        db.run_command(doc! {"aggregate": "c", "pipeline": [], "cursor": {}})
            .await
            .unwrap();
        let after = counters().await;
        let delta = |k: &str| after.get_i64(k).unwrap() - before.get_i64(k).unwrap();
        assert_eq!(delta("insert"), 3, "{before} -> {after}");
        assert_eq!(delta("update"), 2, "{before} -> {after}");
        assert_eq!(delta("delete"), 1, "{before} -> {after}");
        assert_eq!(delta("query"), 2, "{before} -> {after}");
        assert_eq!(delta("getmore"), 0, "{before} -> {after}");
        // The second serverStatus itself is a command.
        assert!(delta("command") >= 1, "{before} -> {after}");
    })
    .await;
}

/// `serverStatus.connections`: `current` counts the connections open now (a second client's
/// show up, and go away when it shuts down), `totalCreated` only grows.
#[tokio::test]
async fn server_status_counts_open_connections() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let connections = |c: Client| async move {
            admin(&c, doc! {"serverStatus": 1})
                .await
                .unwrap()
                .get_document("connections")
                .unwrap()
                .clone()
        };
        let before = connections(c.clone()).await;
        let other = client(&sim).await;
        admin(&other, doc! {"ping": 1}).await.unwrap();
        let during = connections(c.clone()).await;
        assert!(
            during.get_i32("current").unwrap() > before.get_i32("current").unwrap(),
            "{before} -> {during}"
        );
        assert!(during.get_i64("totalCreated").unwrap() > before.get_i64("totalCreated").unwrap());
        other.shutdown().await;
        loop {
            let after = connections(c.clone()).await;
            if after.get_i32("current").unwrap() <= before.get_i32("current").unwrap() {
                assert!(
                    after.get_i64("totalCreated").unwrap()
                        >= during.get_i64("totalCreated").unwrap()
                );
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

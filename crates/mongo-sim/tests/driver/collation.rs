//! Collation (issue 10 item 3): parsing and checks, query matching and sort, a collection's
//! default collation, `_id` and unique-index equality, `distinct`, `count`, writes.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{options::Collation, Database};

use crate::common::*;

async fn run(db: &Database, cmd: Document) -> mongodb::error::Result<Document> {
    db.run_command(cmd).await
}

fn strings(docs: &[Document], field: &str) -> Vec<String> {
    docs.iter()
        .map(|d| d.get_str(field).unwrap().to_string())
        .collect()
}

async fn find_all(db: &Database, cmd: Document) -> Vec<Document> {
    let r = run(db, cmd).await.unwrap();
    r.get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()
        .iter()
        .map(|d| d.as_document().unwrap().clone())
        .collect()
}

#[tokio::test]
async fn invalid_collations_are_rejected_with_the_server_codes() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("coll_bad");
        let cases: Vec<(Document, i32)> = vec![
            (doc! {"locale": "en", "bogus": 1}, 40415),
            (doc! {"strength": 2}, 40414),
            (doc! {"locale": "xx"}, 2),
            (doc! {"locale": ""}, 2),
            (doc! {"locale": "en", "strength": 6}, 51024),
            (doc! {"locale": "en", "strength": 0}, 2),
            (doc! {"locale": "en", "caseLevel": 1}, 14),
            (doc! {"locale": "en", "alternate": "ignore"}, 2),
            (
                doc! {"locale": "en", "strength": 1, "caseFirst": "upper"},
                2,
            ),
            (doc! {"locale": "en", "version": "99.1"}, 161),
        ];
        for (spec, want) in cases {
            let e = run(
                &db,
                doc! {"find": "c", "filter": {}, "collation": spec.clone()},
            )
            .await
            .unwrap_err();
            assert_eq!(code(&e), Some(want), "{spec}");
            let e = run(&db, doc! {"create": "c2", "collation": spec.clone()})
                .await
                .unwrap_err();
            assert_eq!(code(&e), Some(want), "create {spec}");
        }
        let e = run(&db, doc! {"find": "c", "collation": {"locale": "xx"}})
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("Field 'locale' is invalid in: { locale: \"xx\" }"),
            "{e}"
        );
    })
    .await
}

#[tokio::test]
async fn query_collation_matches_and_sorts() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("coll_q");
        let col = db.collection::<Document>("words");
        col.insert_many(vec![
            doc! {"_id": 1, "w": "bob"},
            doc! {"_id": 2, "w": "Bob"},
            doc! {"_id": 3, "w": "BOB"},
            doc! {"_id": 4, "w": "böb"},
            doc! {"_id": 5, "w": "alice"},
        ])
        .await
        .unwrap();
        // Binary without a collation.
        assert_eq!(col.count_documents(doc! {"w": "bob"}).await.unwrap(), 1);
        let s2 = Collation::builder()
            .locale("en")
            .strength(mongodb::options::CollationStrength::Secondary)
            .build();
        let s1 = Collation::builder()
            .locale("en")
            .strength(mongodb::options::CollationStrength::Primary)
            .build();
        assert_eq!(
            col.count_documents(doc! {"w": "bob"})
                .collation(s2.clone())
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            col.count_documents(doc! {"w": "bob"})
                .collation(s1.clone())
                .await
                .unwrap(),
            4
        );
        assert_eq!(
            col.count_documents(doc! {"w": {"$in": ["BoB"]}})
                .collation(s2.clone())
                .await
                .unwrap(),
            3
        );
        assert_eq!(
            col.count_documents(doc! {"w": {"$gt": "b"}})
                .collation(s2.clone())
                .await
                .unwrap(),
            4
        );
        // `count` command, `delete` and `update` filters honour it too.
        let n = run(
            &db,
            doc! {"count": "words", "query": {"w": "BOB"}, "collation": {"locale": "en", "strength": 2}},
        )
        .await
        .unwrap();
        assert_eq!(n.get_i32("n").unwrap(), 3);
        let r = col
            .update_many(doc! {"w": "bob"}, doc! {"$set": {"seen": true}})
            .collation(s2.clone())
            .await
            .unwrap();
        assert_eq!(r.matched_count, 3);
        let r = col
            .delete_many(doc! {"w": "BÖB"})
            .collation(s2.clone())
            .await
            .unwrap();
        assert_eq!(r.deleted_count, 1);
        // Sort: binary puts uppercase first; en puts "alice" first and lowercase before upper.
        let docs = find_all(
            &db,
            doc! {"find": "words", "sort": {"w": 1}, "collation": {"locale": "en"}},
        )
        .await;
        assert_eq!(strings(&docs, "w"), vec!["alice", "bob", "Bob", "BOB"]);
        let docs = find_all(
            &db,
            doc! {"find": "words", "sort": {"w": 1}, "collation": {"locale": "en", "caseFirst": "upper"}},
        )
        .await;
        assert_eq!(strings(&docs, "w"), vec!["alice", "BOB", "Bob", "bob"]);
        let docs = find_all(&db, doc! {"find": "words", "sort": {"w": 1}}).await;
        assert_eq!(strings(&docs, "w"), vec!["BOB", "Bob", "alice", "bob"]);
    })
    .await
}

#[tokio::test]
async fn numeric_ordering_and_locales_sort_words() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("coll_sort");
        let col = db.collection::<Document>("n");
        for s in ["10", "9", "100", "2"] {
            col.insert_one(doc! {"s": s}).await.unwrap();
        }
        let docs = find_all(
            &db,
            doc! {"find": "n", "sort": {"s": 1}, "collation": {"locale": "en", "numericOrdering": true}},
        )
        .await;
        assert_eq!(strings(&docs, "s"), vec!["2", "9", "10", "100"]);
        let n = run(
            &db,
            doc! {"count": "n", "query": {"s": {"$gt": "9"}}, "collation": {"locale": "en", "numericOrdering": true}},
        )
        .await
        .unwrap();
        assert_eq!(n.get_i32("n").unwrap(), 2);

        let de = db.collection::<Document>("de");
        for w in ["Zebra", "Äpfel", "Apfel", "Bär", "Baum"] {
            de.insert_one(doc! {"w": w}).await.unwrap();
        }
        let docs = find_all(
            &db,
            doc! {"find": "de", "sort": {"w": 1}, "collation": {"locale": "de"}},
        )
        .await;
        assert_eq!(
            strings(&docs, "w"),
            vec!["Apfel", "Äpfel", "Bär", "Baum", "Zebra"]
        );
        let fr = db.collection::<Document>("fr");
        for w in ["côte", "cote", "côté", "coté"] {
            fr.insert_one(doc! {"w": w}).await.unwrap();
        }
        // French: accents compare from the start of the word.
        let docs = find_all(
            &db,
            doc! {"find": "fr", "sort": {"w": 1}, "collation": {"locale": "fr"}},
        )
        .await;
        assert_eq!(strings(&docs, "w"), vec!["cote", "coté", "côte", "côté"]);
        // French (Canada): backwards secondary weights, accents compare from the end.
        let docs = find_all(
            &db,
            doc! {"find": "fr", "sort": {"w": 1}, "collation": {"locale": "fr_CA"}},
        )
        .await;
        assert_eq!(strings(&docs, "w"), vec!["cote", "côte", "coté", "côté"]);
    })
    .await
}

#[tokio::test]
async fn default_collation_makes_id_and_unique_indexes_case_insensitive() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("coll_default");
        run(
            &db,
            doc! {"create": "people", "collation": {"locale": "en", "strength": 2}},
        )
        .await
        .unwrap();
        // listCollections shows the full spec, idIndex included.
        let info = find_all(
            &db,
            doc! {"listCollections": 1, "filter": {"name": "people"}},
        )
        .await;
        let want = doc! {"locale": "en", "caseLevel": false, "caseFirst": "off", "strength": 2,
        "numericOrdering": false, "alternate": "non-ignorable", "maxVariable": "punct",
        "normalization": false, "backwards": false, "version": "57.1"};
        let options = info[0].get_document("options").unwrap();
        assert_eq!(options.get_document("collation").unwrap(), &want);
        assert_eq!(
            info[0]
                .get_document("idIndex")
                .unwrap()
                .get_document("collation")
                .unwrap(),
            &want
        );
        let col = db.collection::<Document>("people");
        col.insert_one(doc! {"_id": "Bob", "email": "bob@example.com"})
            .await
            .unwrap();
        let e = col.insert_one(doc! {"_id": "bob"}).await.unwrap_err();
        assert_eq!(code(&e), Some(11000));
        // The default applies to queries without a collation of their own.
        let d = col.find_one(doc! {"_id": "BOB"}).await.unwrap().unwrap();
        assert_eq!(d.get_str("_id").unwrap(), "Bob");
        assert_eq!(
            col.count_documents(doc! {"email": "BOB@example.com"})
                .await
                .unwrap(),
            1
        );
        // A command's own simple collation overrides the default.
        let docs = find_all(
            &db,
            doc! {"find": "people", "filter": {"_id": "bob"}, "collation": {"locale": "simple"}},
        )
        .await;
        assert!(docs.is_empty());
        // Unique secondary index inherits the default (and shows it).
        col.create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
        let e = col
            .insert_one(doc! {"_id": "alice", "email": "BOB@EXAMPLE.COM"})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(11000));
        let idx = find_all(&db, doc! {"listIndexes": "people"}).await;
        assert!(
            idx.iter().all(|i| i.get_document("collation").is_ok()),
            "{idx:?}"
        );
        // An index with an explicit simple collation is binary.
        col.create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"nick": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .collation(Collation::builder().locale("simple").build())
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
        col.insert_one(doc! {"_id": "x", "email": "x", "nick": "Al"})
            .await
            .unwrap();
        col.insert_one(doc! {"_id": "y", "email": "y", "nick": "al"})
            .await
            .unwrap();
        // `distinct` under the default collation folds case.
        col.insert_one(doc! {"_id": "z", "email": "z", "nick": "AL"})
            .await
            .unwrap();
        let r = run(&db, doc! {"distinct": "people", "key": "nick"})
            .await
            .unwrap();
        assert_eq!(r.get_array("values").unwrap().len(), 1);
        let r = run(
            &db,
            doc! {"distinct": "people", "key": "nick", "collation": {"locale": "simple"}},
        )
        .await
        .unwrap();
        assert_eq!(r.get_array("values").unwrap().len(), 3);
        // `_id` range scan with min/max follows the collection's collation.
        let docs = find_all(
            &db,
            doc! {"find": "people", "min": {"_id": "X"}, "max": {"_id": "Z"}, "hint": {"_id": 1}},
        )
        .await;
        assert_eq!(
            docs.iter()
                .map(|d| d.get("_id").unwrap().clone())
                .collect::<Vec<_>>(),
            vec![Bson::from("x"), Bson::from("y")]
        );
        // `_id` stays immutable byte for byte: "Bob" → "bob" is a change, even under strength 2.
        let e = col
            .update_one(doc! {"_id": "Bob"}, doc! {"$set": {"_id": "bob"}})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(66));
        // `$group` groups by the collation.
        let out: Vec<Document> = col
            .aggregate(vec![
                doc! {"$match": {"nick": {"$exists": true}}},
                doc! {"$group": {"_id": "$nick", "n": {"$sum": 1}}},
            ])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].get_i32("n").unwrap(), 3);
    })
    .await
}

fn message(e: &mongodb::error::Error) -> String {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => c.message.clone(),
        other => format!("{other:?}"),
    }
}

/// Views (manual "Create a View with Default Collation"): a view has its own default collation
/// (simple when none; it does not inherit its collection's), reads on it use it, a different
/// per-operation collation is refused with 167, and a view on a view must share its collation.
#[tokio::test]
async fn views_have_their_own_default_collation() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("coll_views");
        run(
            &db,
            doc! {"create": "people", "collation": {"locale": "en", "strength": 2}},
        )
        .await
        .unwrap();
        let col = db.collection::<Document>("people");
        col.insert_many(vec![
            doc! {"_id": 1, "name": "Bob"},
            doc! {"_id": 2, "name": "bob"},
            doc! {"_id": 3, "name": "alice"},
        ])
        .await
        .unwrap();
        // No collation: simple, not the collection's default.
        run(&db, doc! {"create": "plain", "viewOn": "people", "pipeline": []})
            .await
            .unwrap();
        let docs = find_all(&db, doc! {"find": "plain", "filter": {"name": "bob"}}).await;
        assert_eq!(docs.len(), 1, "{docs:?}");
        // With a collation: stored resolved, listed, and used by find/count/distinct/aggregate.
        run(
            &db,
            doc! {"create": "folded", "viewOn": "people", "pipeline": [{"$match": {"name": "BOB"}}],
            "collation": {"locale": "en", "strength": 2}},
        )
        .await
        .unwrap();
        let info = find_all(
            &db,
            doc! {"listCollections": 1, "filter": {"name": "folded"}},
        )
        .await;
        let listed = info[0]
            .get_document("options")
            .unwrap()
            .get_document("collation")
            .unwrap();
        assert_eq!(listed.get_i32("strength").unwrap(), 2);
        assert_eq!(listed.get_str("version").unwrap(), "57.1");
        let docs = find_all(&db, doc! {"find": "folded", "filter": {}}).await;
        assert_eq!(docs.len(), 2, "the view pipeline runs under the view's collation");
        let r = run(&db, doc! {"count": "folded", "query": {"name": "BOB"}})
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 2);
        let r = run(&db, doc! {"distinct": "folded", "key": "name"})
            .await
            .unwrap();
        assert_eq!(r.get_array("values").unwrap().len(), 1);
        // The same collation again is accepted; another one, on any read, is 167.
        let docs = find_all(
            &db,
            doc! {"find": "folded", "filter": {}, "collation": {"locale": "en", "strength": 2}},
        )
        .await;
        assert_eq!(docs.len(), 2);
        for cmd in [
            doc! {"find": "folded", "filter": {}, "collation": {"locale": "fr"}},
            doc! {"find": "plain", "filter": {}, "collation": {"locale": "en", "strength": 2}},
            doc! {"aggregate": "folded", "pipeline": [], "cursor": {}, "collation": {"locale": "simple"}},
            doc! {"count": "folded", "collation": {"locale": "en"}},
            doc! {"distinct": "folded", "key": "name", "collation": {"locale": "en"}},
        ] {
            let e = run(&db, cmd.clone()).await.unwrap_err();
            assert_eq!(code(&e), Some(167), "{cmd}");
            assert_eq!(message(&e), "Cannot override a view's default collation");
        }
        // `{locale: "simple"}` on a view without a collation matches it.
        let docs = find_all(
            &db,
            doc! {"find": "plain", "filter": {}, "collation": {"locale": "simple"}},
        )
        .await;
        assert_eq!(docs.len(), 3);
        // A view on a view: the same collation, else 167 (also when the inner view comes
        // later, and through collMod).
        run(
            &db,
            doc! {"create": "folded2", "viewOn": "folded", "collation": {"locale": "en", "strength": 2}},
        )
        .await
        .unwrap();
        let e = run(&db, doc! {"create": "bad", "viewOn": "folded"})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(167));
        assert_eq!(
            message(&e),
            "View coll_views.bad has a collation that does not match the collation of view coll_views.folded"
        );
        let e = run(&db, doc! {"collMod": "plain", "viewOn": "folded"})
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(167));
        run(&db, doc! {"create": "later_child", "viewOn": "later"})
            .await
            .unwrap();
        let e = run(
            &db,
            doc! {"create": "later", "viewOn": "people", "collation": {"locale": "fr"}},
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), Some(167));
        // An invalid view collation fails as a collection's does.
        let e = run(
            &db,
            doc! {"create": "v_bad", "viewOn": "people", "collation": {"locale": "xx"}},
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), Some(2));
    })
    .await;
}

/// `$out` recreates the target with its options, so a target's default collation survives
/// (`_id` stays case-insensitive); `$merge` writes into a collated target under its `_id`
/// index.
#[tokio::test]
async fn out_and_merge_keep_the_target_default_collation() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("coll_out");
        db.collection::<Document>("src")
            .insert_many(vec![doc! {"_id": "Bob", "n": 1}, doc! {"_id": "carol", "n": 2}])
            .await
            .unwrap();
        run(
            &db,
            doc! {"create": "target", "collation": {"locale": "en", "strength": 2}},
        )
        .await
        .unwrap();
        run(
            &db,
            doc! {"aggregate": "src", "pipeline": [{"$out": "target"}], "cursor": {}},
        )
        .await
        .unwrap();
        let info = find_all(
            &db,
            doc! {"listCollections": 1, "filter": {"name": "target"}},
        )
        .await;
        assert_eq!(
            info[0]
                .get_document("options")
                .unwrap()
                .get_document("collation")
                .unwrap()
                .get_i32("strength")
                .unwrap(),
            2
        );
        let target = db.collection::<Document>("target");
        let e = target.insert_one(doc! {"_id": "BOB"}).await.unwrap_err();
        assert_eq!(code(&e), Some(11000));
        // $merge with whenMatched fail: "bob" is "Bob" under the target's `_id` index.
        db.collection::<Document>("src2")
            .insert_one(doc! {"_id": "bob", "n": 3})
            .await
            .unwrap();
        let e = run(
            &db,
            doc! {"aggregate": "src2", "pipeline": [{"$merge": {"into": "target", "whenMatched": "fail"}}], "cursor": {}},
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), Some(11000));
        assert_eq!(target.count_documents(doc! {}).await.unwrap(), 2);
    })
    .await;
}

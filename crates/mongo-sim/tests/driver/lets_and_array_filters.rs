//! Command-level `let` (issue 10, item 4) in find, aggregate, update, delete and
//! findAndModify, undefined variables (17276), and `arrayFilters` with `$[<id>]` / `$[]` in
//! update and findAndModify (item 7), through the driver.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::options::{ReturnDocument, UpdateModifications};

use crate::common::*;

async fn seeded(c: &mongodb::Client, coll: &str) -> mongodb::Collection<Document> {
    let col = c.database("lets").collection::<Document>(coll);
    col.insert_many(vec![
        doc! {"_id": 1, "qty": 5, "tag": "a"},
        doc! {"_id": 2, "qty": 15, "tag": "b"},
        doc! {"_id": 3, "qty": 25, "tag": "a"},
    ])
    .await
    .unwrap();
    col
}

fn ids(docs: &[Document]) -> Vec<i32> {
    docs.iter().map(|d| d.get_i32("_id").unwrap()).collect()
}

#[tokio::test]
async fn let_binds_variables_in_find_and_aggregate() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = seeded(&c, "rd").await;
        let found: Vec<Document> = col
            .find(doc! {"$expr": {"$gt": ["$qty", "$$min"]}})
            .let_vars(doc! {"min": {"$add": [4, 6]}})
            .sort(doc! {"_id": 1})
            .projection(doc! {"_id": 1, "over": {"$subtract": ["$qty", "$$min"]}})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            found,
            vec![doc! {"_id": 2, "over": 5}, doc! {"_id": 3, "over": 15}]
        );
        let out: Vec<Document> = col
            .aggregate(vec![
                doc! {"$match": {"$expr": {"$eq": ["$tag", "$$t"]}}},
                doc! {"$project": {"_id": 1, "t": "$$t"}},
                doc! {"$sort": {"_id": 1}},
            ])
            .let_vars(doc! {"t": "a"})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![doc! {"_id": 1, "t": "a"}, doc! {"_id": 3, "t": "a"}]
        );
    })
    .await
}

#[tokio::test]
async fn let_binds_variables_in_writes() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = seeded(&c, "wr").await;
        let r = col
            .update_many(
                doc! {"$expr": {"$eq": ["$tag", "$$t"]}},
                vec![doc! {"$set": {"qty": {"$add": ["$qty", "$$inc"]}}}],
            )
            .let_vars(doc! {"t": "a", "inc": 100})
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (2, 2));
        let all: Vec<Document> = col
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            all.iter()
                .map(|d| d.get_i32("qty").unwrap())
                .collect::<Vec<_>>(),
            vec![105, 15, 125]
        );
        let old = col
            .find_one_and_update(
                doc! {"$expr": {"$eq": ["$_id", "$$id"]}},
                UpdateModifications::Pipeline(vec![doc! {"$set": {"tag": "$$nt"}}]),
            )
            .let_vars(doc! {"id": 2, "nt": "z"})
            .return_document(ReturnDocument::After)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(old, doc! {"_id": 2, "qty": 15, "tag": "z"});
        let d = col
            .delete_many(doc! {"$expr": {"$gt": ["$qty", "$$cut"]}})
            .let_vars(doc! {"cut": 110})
            .await
            .unwrap();
        assert_eq!(d.deleted_count, 1);
        let left: Vec<Document> = col
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(ids(&left), vec![1, 2]);
        // Statement constants `c` in a pipeline update.
        let r = c
            .database("lets")
            .run_command(doc! {"update": "wr", "updates": [
                {"q": {"_id": 1}, "u": [{"$set": {"k": "$$k"}}], "c": {"k": 7}}
            ]})
            .await
            .unwrap();
        assert_eq!(r.get_i32("nModified").unwrap(), 1);
        assert_eq!(
            col.find_one(doc! {"_id": 1})
                .await
                .unwrap()
                .unwrap()
                .get_i32("k")
                .unwrap(),
            7
        );
    })
    .await
}

#[tokio::test]
async fn undefined_variables_are_17276_even_without_documents() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("lets");
        for cmd in [
            doc! {"find": "empty", "filter": {"$expr": {"$eq": ["$a", "$$undefined"]}}},
            doc! {"find": "empty", "filter": {}, "let": {"x": 1}, "projection": {"v": "$$y"}},
            doc! {"aggregate": "empty", "pipeline": [{"$set": {"v": "$$nope"}}], "cursor": {}},
            doc! {"findAndModify": "empty", "query": {"$expr": "$$u"}, "remove": true},
            doc! {"find": "empty", "let": {"x": "$$undefined"}},
        ] {
            let e = db.run_command(cmd.clone()).await.unwrap_err();
            assert_eq!(code(&e), Some(17276), "{cmd}: {e}");
        }
        for (cmd, expected) in [
            (doc! {"find": "empty", "let": {"Bad": 1}}, 16867),
            (doc! {"find": "empty", "let": {"x": "$field"}}, 4890500),
        ] {
            let e = db.run_command(cmd.clone()).await.unwrap_err();
            assert_eq!(code(&e), Some(expected), "{cmd}: {e}");
        }
        // Write statements report the undefined variable as a write error.
        let r = db
            .run_command(
                doc! {"delete": "empty", "deletes": [{"q": {"$expr": "$$zz"}, "limit": 0}]},
            )
            .await
            .unwrap();
        let we = r.get_array("writeErrors").unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        assert_eq!(we.get_i32("code").unwrap(), 17276);
        // Outside $expr a "$$" string is a literal.
        db.run_command(doc! {"find": "empty", "filter": {"a": "$$literal"}})
            .await
            .unwrap();
    })
    .await
}

#[tokio::test]
async fn array_filters_update_matching_elements() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("af").collection::<Document>("c");
        col.insert_many(vec![
            doc! {"_id": 1, "grades": [95, 92, 90], "items": [{"n": "x", "q": 1}, {"n": "y", "q": 5}]},
            doc! {"_id": 2, "grades": [98, 100, 102], "items": [{"n": "x", "q": 9}]},
        ])
        .await
        .unwrap();
        let r = col
            .update_many(doc! {}, doc! {"$set": {"grades.$[g]": 100}})
            .array_filters(vec![doc! {"g": {"$gte": 100}}])
            .await
            .unwrap();
        assert_eq!((r.matched_count, r.modified_count), (2, 1));
        assert_eq!(
            col.find_one(doc! {"_id": 2}).await.unwrap().unwrap().get_array("grades").unwrap(),
            &vec![Bson::Int32(98), Bson::Int32(100), Bson::Int32(100)]
        );
        // Nested field of the element, and $[] on every element.
        col.update_one(doc! {"_id": 1}, doc! {"$inc": {"items.$[it].q": 10, "grades.$[]": 1}})
            .array_filters(vec![doc! {"it.n": "y"}])
            .await
            .unwrap();
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(
            d,
            doc! {"_id": 1, "grades": [96, 93, 91], "items": [{"n": "x", "q": 1}, {"n": "y", "q": 15}]}
        );
        // findAndModify with arrayFilters.
        let after = col
            .find_one_and_update(doc! {"_id": 2}, doc! {"$set": {"items.$[e].q": 0}})
            .array_filters(vec![doc! {"e.q": {"$gt": 5}}])
            .return_document(ReturnDocument::After)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            after.get_array("items").unwrap(),
            &vec![Bson::Document(doc! {"n": "x", "q": 0})]
        );
        // The change stream sees concrete paths.
        let mut s = col.watch().await.unwrap();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"grades.$[g]": 0}})
            .array_filters(vec![doc! {"g": {"$lt": 92}}])
            .await
            .unwrap();
        let e = next(&mut s).await;
        let updated = e.update_description.unwrap().updated_fields;
        assert_eq!(updated, doc! {"grades.2": 0});
    })
    .await
}

#[tokio::test]
async fn array_filter_errors_match_mongodb() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("af");
        db.collection::<Document>("e")
            .insert_one(doc! {"_id": 1, "a": [1, 2], "s": 5})
            .await
            .unwrap();
        for (u, filters, expected) in [
            // A filter no path uses.
            (doc! {"$set": {"a.$[x]": 0}}, vec![doc! {"x": 1}, doc! {"y": 2}], 9),
            // A path identifier with no filter.
            (doc! {"$set": {"a.$[z]": 0}}, vec![], 2),
            // Two identifiers in one filter.
            (doc! {"$set": {"a.$[x]": 0}}, vec![doc! {"x": 1, "y": 1}], 9),
            // An identifier that is not lowercase alphanumeric.
            (doc! {"$set": {"a.$[X]": 0}}, vec![doc! {"X": 1}], 2),
            // Duplicated identifiers.
            (doc! {"$set": {"a.$[x]": 0}}, vec![doc! {"x": 1}, doc! {"x": 2}], 9),
            // $[] on a non-array, and on a missing path.
            (doc! {"$set": {"s.$[]": 0}}, vec![], 2),
            (doc! {"$set": {"m.$[]": 0}}, vec![], 2),
        ] {
            let r = db
                .run_command(doc! {"update": "e", "updates": [{"q": {"_id": 1}, "u": u.clone(), "arrayFilters": filters.clone()}]})
                .await
                .unwrap();
            let we = r
                .get_array("writeErrors")
                .unwrap_or_else(|_| panic!("{u} {filters:?}: {r}"))[0]
                .as_document()
                .unwrap()
                .clone();
            assert_eq!(we.get_i32("code").unwrap(), expected, "{u} {filters:?}: {we}");
        }
        assert_eq!(
            db.collection::<Document>("e").find_one(doc! {}).await.unwrap().unwrap(),
            doc! {"_id": 1, "a": [1, 2], "s": 5}
        );
        // The query-positional `$` is not implemented: loud, not ignored.
        let r = db
            .run_command(doc! {"update": "e", "updates": [{"q": {"a": 2}, "u": {"$set": {"a.$": 9}}}]})
            .await
            .unwrap();
        let we = r.get_array("writeErrors").unwrap()[0].as_document().unwrap().clone();
        assert_eq!(we.get_i32("code").unwrap(), 115);
    })
    .await
}

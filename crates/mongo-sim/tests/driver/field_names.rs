//! `$`-prefixed and dotted field names, as MongoDB 5.0+ stores and serves them (the manual's
//! "Field Names with Periods and Dollar Signs" pages and the server's
//! `jstests/core/field_name_validation.js`): inserts keep them verbatim at every level, a
//! replacement may not have them at its top level, operators cannot address them by path,
//! `$getField` / `$setField` / `$unsetField` / `$replaceWith: {$literal}` can, and they come
//! back byte for byte through find, aggregate, change events and dbHash.

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::{Collection, Database};

use crate::common::*;

fn bytes(d: &Document) -> Vec<u8> {
    let mut out = Vec::new();
    d.to_writer(&mut out).unwrap();
    out
}

/// The one write error of a single-statement write command reply.
fn write_error(reply: &Document) -> (i32, String) {
    let errs = reply.get_array("writeErrors").expect("writeErrors");
    assert_eq!(errs.len(), 1, "{reply}");
    let e = errs[0].as_document().unwrap();
    (
        e.get_i32("code").unwrap(),
        e.get_str("errmsg").unwrap().to_string(),
    )
}

async fn update_raw(db: &Database, coll: &str, q: Document, u: Bson, upsert: bool) -> Document {
    db.run_command(doc! {
        "update": coll,
        "updates": [{"q": q, "u": u, "upsert": upsert}],
    })
    .await
    .unwrap()
}

async fn find_all(col: &Collection<Document>, filter: Document) -> Vec<Document> {
    col.find(filter)
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn sample() -> Document {
    doc! {
        "_id": 1,
        "$price": 50.0,
        "quantity": 30,
        "a.b": 1,
        "location": {"$db": "novels", "$ref": "2007042768", "$inc": true, "c.d": [ {"$x": 1} ]},
    }
}

#[tokio::test]
async fn inserts_keep_dollar_and_dotted_names_verbatim() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fn");
        let col = db.collection::<Document>("ins");
        col.insert_one(sample()).await.unwrap();
        // Reserved DBRef words and operator names are plain field names in an insert.
        col.insert_one(doc! {"_id": 2, "$id": "h1961-01", "$db": 1, "$ref": 2, "$inc": 3})
            .await
            .unwrap();
        // The raw command (no driver-side checks) answers the same.
        let r = db
            .run_command(
                doc! {"insert": "ins", "documents": [{"_id": 3, "_id.$gt": 4, "$a": {"$b": 1}}]},
            )
            .await
            .unwrap();
        assert_eq!(r.get_i32("n").unwrap(), 1, "{r}");

        let found = find_all(&col, doc! {}).await;
        assert_eq!(found.len(), 3);
        assert_eq!(bytes(&found[0]), bytes(&sample()));
        assert_eq!(
            bytes(&found[1]),
            bytes(&doc! {"_id": 2, "$id": "h1961-01", "$db": 1, "$ref": 2, "$inc": 3})
        );
        let agg: Vec<Document> = col
            .aggregate(vec![doc! {"$match": {"_id": 1}}])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(bytes(&agg[0]), bytes(&sample()));

        // `_id` sub-documents may not hold `$`-prefixed names, at any depth (52).
        for id in [
            doc! {"$b": 1},
            doc! {"a": 1, "$b": 1},
            doc! {"a": {"$b": 1}},
        ] {
            let r = db
                .run_command(doc! {"insert": "ins", "documents": [{"_id": id.clone()}]})
                .await
                .unwrap();
            let (code, msg) = write_error(&r);
            assert_eq!(code, 52, "{id}: {msg}");
            assert!(msg.starts_with("_id fields may not contain '$'-prefixed fields: $b"));
        }
        // Dotted names inside `_id` are fine.
        col.insert_one(doc! {"_id": {"a.b": 1}}).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn queries_walk_paths_and_get_field_reaches_literal_names() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col = c.database("fn").collection::<Document>("q");
        col.insert_many(vec![
            sample(),
            doc! {"_id": 2, "a": {"b": 1}, "location": {"$inc": false}},
        ])
        .await
        .unwrap();
        let ids = |v: Vec<Document>| -> Vec<i32> {
            v.iter().map(|d| d.get_i32("_id").unwrap()).collect()
        };
        // A dotted query path walks into sub-document `a`: the field named "a.b" is not it.
        assert_eq!(ids(find_all(&col, doc! {"a.b": 1}).await), vec![2]);
        // A nested `$` name is an ordinary path component.
        assert_eq!(
            ids(find_all(&col, doc! {"location.$inc": true}).await),
            vec![1]
        );
        // `$getField` in `$expr` reads the literal names.
        let f = doc! {"$expr": {"$eq": [{"$getField": "a.b"}, 1]}};
        assert_eq!(ids(find_all(&col, f).await), vec![1]);
        let f = doc! {"$expr": {"$gt": [{"$getField": {"$literal": "$price"}}, 10]}};
        assert_eq!(ids(find_all(&col, f).await), vec![1]);
        let f = doc! {"$expr": {"$eq": [
            {"$getField": {"field": "c.d", "input": "$location"}},
            {"$literal": [{"$x": 1}]},
        ]}};
        assert_eq!(ids(find_all(&col, f).await), vec![1]);
        // A `$`-prefixed top-level query key is an operator: unknown → 2.
        let err = col.find_one(doc! {"$price": 50.0}).await.unwrap_err();
        assert_eq!(code(&err), Some(2));
    })
    .await
}

#[tokio::test]
async fn replacement_updates_refuse_top_level_dollar_names() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fn");
        let col = db.collection::<Document>("r");
        col.insert_one(doc! {"_id": 1, "v": 1}).await.unwrap();

        // A first key with `$` makes the document an operator update: unknown modifier → 9.
        let r = update_raw(&db, "r", doc! {"_id": 1}, Bson::Document(doc! {"$c": 1}), false).await;
        assert_eq!(
            write_error(&r),
            (
                9,
                "Unknown modifier: $c. Expected a valid update modifier or pipeline-style update specified as an array".to_string()
            )
        );
        for first in ["$ref", "$id", "$db"] {
            let r = update_raw(&db, "r", doc! {"_id": 1}, Bson::Document(doc! {first: 1}), false)
                .await;
            assert_eq!(write_error(&r).0, 9, "{first}");
        }
        // A later top-level `$` key → 52 with the server's storage-validation message.
        let r = update_raw(
            &db,
            "r",
            doc! {"_id": 1},
            Bson::Document(doc! {"x": 1, "$c": 1}),
            false,
        )
        .await;
        assert_eq!(
            write_error(&r),
            (
                52,
                "The dollar ($) prefixed field '$c' in '$c' is not allowed in the context of an update's replacement document. Consider using an aggregation pipeline with $replaceWith.".to_string()
            )
        );
        // A well-formed DBRef at the top level passes; a misplaced `$id` → InvalidDBRef 55.
        let r = update_raw(
            &db,
            "r",
            doc! {"_id": 1},
            Bson::Document(doc! {"x": 1, "$ref": "c", "$id": 5}),
            false,
        )
        .await;
        assert_eq!(r.get_i32("nModified").unwrap(), 1, "{r}");
        let r = update_raw(
            &db,
            "r",
            doc! {"_id": 1},
            Bson::Document(doc! {"x": 1, "$id": 5}),
            false,
        )
        .await;
        assert_eq!(
            write_error(&r),
            (
                55,
                "Found $id field without a $ref before it, which is invalid.".to_string()
            )
        );
        // Nested `$` names and dotted names are stored verbatim by a replacement.
        col.replace_one(
            doc! {"_id": 1},
            doc! {"a": {"$c": 1, "bar": {"$d": 4}}, "d.e": 1},
        )
        .await
        .unwrap();
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(
            bytes(&d),
            bytes(&doc! {"_id": 1, "a": {"$c": 1, "bar": {"$d": 4}}, "d.e": 1})
        );
        // findAndModify answers the same as a command error.
        let err = db
            .run_command(doc! {"findAndModify": "r", "query": {"_id": 1}, "update": {"_id": 1, "$invalid": 1}})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(52));
        db.run_command(doc! {"findAndModify": "r", "query": {"_id": 1}, "update": {"_id": 1, "out": {"$in": 1, "x": 2}}})
            .await
            .unwrap();
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(bytes(&d), bytes(&doc! {"_id": 1, "out": {"$in": 1, "x": 2}}));
    })
    .await
}

#[tokio::test]
async fn operators_treat_dots_as_paths_and_check_only_what_they_touch() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fn");
        let col = db.collection::<Document>("o");
        col.insert_one(doc! {
            "_id": 1, "part": "AB305", "$bin": 200, "quantity": 100, "a.b": 1,
            "address": {"$street": "Elm Road"},
        })
        .await
        .unwrap();
        // Stored top-level `$` fields do not stop updates of other fields.
        col.update_one(doc! {"_id": 1}, doc! {"$inc": {"quantity": 1}})
            .await
            .unwrap();
        // A nested `$` name is reachable by path.
        col.update_one(
            doc! {"_id": 1},
            doc! {"$set": {"address.$street": "Elm Ave"}},
        )
        .await
        .unwrap();
        // The dot is a path separator: `$set: {"a.b": 2}` creates `a: {b: 2}` and leaves the
        // field named "a.b" alone.
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"a.b": 2}})
            .await
            .unwrap();
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(
            bytes(&d),
            bytes(&doc! {
                "_id": 1, "part": "AB305", "$bin": 200, "quantity": 101, "a.b": 1,
                "address": {"$street": "Elm Ave"}, "a": {"b": 2},
            })
        );
        // An operator that creates or changes a top-level `$` field of a stored document → 52.
        for u in [doc! {"$set": {"$hotel": 1}}, doc! {"$inc": {"$bin": 1}}] {
            let r = update_raw(&db, "o", doc! {"_id": 1}, Bson::Document(u.clone()), false).await;
            let (code, msg) = write_error(&r);
            assert_eq!(code, 52, "{u}: {msg}");
        }
        // The document an upsert inserts is validated as an insert: it may.
        let r = update_raw(
            &db,
            "o",
            doc! {"date": "2021-07-07"},
            Bson::Document(doc! {"$set": {"phone": 25.17, "$hotel": 320.10}}),
            true,
        )
        .await;
        assert_eq!(r.get_i32("n").unwrap(), 1, "{r}");
        let d = col
            .find_one(doc! {"date": "2021-07-07"})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.get_f64("$hotel").unwrap(), 320.10);
        // The same update on the now-existing document fails.
        let r = update_raw(
            &db,
            "o",
            doc! {"date": "2021-07-07"},
            Bson::Document(doc! {"$set": {"phone": 25.17, "$hotel": 1.0}}),
            true,
        )
        .await;
        assert_eq!(write_error(&r).0, 52);
        // `_id` sub-fields stay refused in upserts.
        let r = update_raw(
            &db,
            "o",
            doc! {"x": 9},
            Bson::Document(doc! {"$set": {"_id": {"$invalid": 1}}}),
            true,
        )
        .await;
        assert_eq!(write_error(&r).0, 52);
    })
    .await
}

#[tokio::test]
async fn pipeline_updates_set_get_and_unset_literal_names() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fn");
        let col = db.collection::<Document>("p");
        col.insert_one(doc! {"_id": 1, "v": 1}).await.unwrap();
        let pipeline = |stages: Vec<Document>| {
            Bson::Array(stages.into_iter().map(Bson::Document).collect())
        };
        // `$replaceWith: {$literal}` stores `$` and dotted keys verbatim.
        let r = update_raw(
            &db,
            "p",
            doc! {"_id": 1},
            pipeline(vec![doc! {"$replaceWith": {"$literal": {"_id": 1, "$in": 2, "x.y": 3}}}]),
            false,
        )
        .await;
        assert_eq!(r.get_i32("nModified").unwrap(), 1, "{r}");
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(bytes(&d), bytes(&doc! {"_id": 1, "$in": 2, "x.y": 3}));
        // `$setField` changes the literal names in place; `$unsetField` removes one.
        update_raw(
            &db,
            "p",
            doc! {"_id": 1},
            pipeline(vec![
                doc! {"$replaceWith": {"$setField": {"field": "x.y", "input": "$$ROOT", "value": 4}}},
                doc! {"$replaceWith": {"$setField": {
                    "field": {"$literal": "$in"}, "input": "$$ROOT",
                    "value": {"$add": [{"$getField": {"$literal": "$in"}}, 10]},
                }}},
            ]),
            false,
        )
        .await;
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(bytes(&d), bytes(&doc! {"_id": 1, "$in": 12, "x.y": 4}));
        update_raw(
            &db,
            "p",
            doc! {"_id": 1},
            pipeline(vec![doc! {"$replaceWith": {"$unsetField": {"field": "x.y", "input": "$$ROOT"}}}]),
            false,
        )
        .await;
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(bytes(&d), bytes(&doc! {"_id": 1, "$in": 12}));
        // A `$`-prefixed name given as a plain string is a field path: refused.
        let err = col
            .aggregate(vec![doc! {"$replaceWith": {"$setField": {"field": "$in", "input": "$$ROOT", "value": 1}}}])
            .await
            .unwrap_err();
        assert!(code(&err).is_some());
        // Aggregation reads them with `$getField`.
        let out: Vec<Document> = col
            .aggregate(vec![doc! {"$project": {"_id": 0, "v": {"$getField": {"$literal": "$in"}}}}])
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, vec![doc! {"v": 12}]);
        // An upsert through a pipeline inserts the literal document as given.
        update_raw(
            &db,
            "p",
            doc! {"_id": 2},
            pipeline(vec![doc! {"$replaceWith": {"$literal": {"_id": 2, "$ref": 1, "a": {"$a": 1}}}}]),
            true,
        )
        .await;
        let d = col.find_one(doc! {"_id": 2}).await.unwrap().unwrap();
        assert_eq!(bytes(&d), bytes(&doc! {"_id": 2, "$ref": 1, "a": {"$a": 1}}));
    })
    .await
}

#[tokio::test]
async fn change_events_carry_the_names_and_disambiguated_paths() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("fn");
        let col = db.collection::<Document>("cs");
        db.create_collection("cs").await.unwrap();
        let mut expanded = col
            .watch()
            .show_expanded_events(true)
            .await
            .unwrap()
            .with_type::<Document>();
        let mut plain = col.watch().await.unwrap().with_type::<Document>();
        // A long filler keeps the pipeline diffs smaller than the document (so the server
        // logs a delta, reported as an `update` event).
        let filler = "f".repeat(200);
        let inserted = doc! {
            "_id": 1, "filler": filler.clone(), "$p": 1, "x.y": 1, "a": {"1": 1, "b": 1},
            "0": 1,
        };
        col.insert_one(inserted.clone()).await.unwrap();
        let pipeline = |stage: Document| Bson::Array(vec![Bson::Document(stage)]);
        // 1. A pipeline `$setField` of the dotted top-level name.
        update_raw(
            &db,
            "cs",
            doc! {"_id": 1},
            pipeline(doc! {"$replaceWith": {"$setField": {"field": "x.y", "input": "$$ROOT", "value": 2}}}),
            false,
        )
        .await;
        // 2. `$set` of a numeric-looking nested name (the drivers' spec test).
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"a.1": 2}})
            .await
            .unwrap();
        // 3. `$set` of a top-level numeric name: not ambiguous.
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"0": 2}})
            .await
            .unwrap();
        // 4. `$unsetField` of the dotted name.
        update_raw(
            &db,
            "cs",
            doc! {"_id": 1},
            pipeline(doc! {"$replaceWith": {"$unsetField": {"field": "x.y", "input": "$$ROOT"}}}),
            false,
        )
        .await;
        // 5. A replacement with nested `$` names.
        col.replace_one(doc! {"_id": 1}, doc! {"r": {"$q": 1}, "d.e": 1})
            .await
            .unwrap();

        let e = next(&mut expanded).await;
        assert_eq!(e.get_str("operationType").unwrap(), "insert");
        assert_eq!(bytes(e.get_document("fullDocument").unwrap()), bytes(&inserted));
        let e = next(&mut expanded).await;
        assert_eq!(e.get_str("operationType").unwrap(), "update");
        assert_eq!(
            e.get_document("updateDescription").unwrap(),
            &doc! {
                "updatedFields": {"x.y": 2}, "removedFields": [], "truncatedArrays": [],
                "disambiguatedPaths": {"x.y": ["x.y"]},
            }
        );
        let e = next(&mut expanded).await;
        let ud = e.get_document("updateDescription").unwrap();
        assert_eq!(ud.get_document("updatedFields").unwrap(), &doc! {"a.1": 2});
        assert_eq!(
            ud.get_document("disambiguatedPaths").unwrap(),
            &doc! {"a.1": ["a", "1"]}
        );
        let e = next(&mut expanded).await;
        let ud = e.get_document("updateDescription").unwrap();
        assert_eq!(ud.get_document("updatedFields").unwrap(), &doc! {"0": 2});
        assert!(!ud.contains_key("disambiguatedPaths"), "{ud}");
        let e = next(&mut expanded).await;
        let ud = e.get_document("updateDescription").unwrap();
        assert_eq!(ud.get_array("removedFields").unwrap(), &vec![Bson::from("x.y")]);
        assert_eq!(
            ud.get_document("disambiguatedPaths").unwrap(),
            &doc! {"x.y": ["x.y"]}
        );
        let e = next(&mut expanded).await;
        assert_eq!(e.get_str("operationType").unwrap(), "replace");
        assert_eq!(
            bytes(e.get_document("fullDocument").unwrap()),
            bytes(&doc! {"_id": 1, "r": {"$q": 1}, "d.e": 1})
        );

        // Without showExpandedEvents (a 7.0 server) there is no disambiguatedPaths.
        let e = next(&mut plain).await;
        assert_eq!(bytes(e.get_document("fullDocument").unwrap()), bytes(&inserted));
        for _ in 0..4 {
            let e = next(&mut plain).await;
            let ud = e.get_document("updateDescription").unwrap();
            assert!(!ud.contains_key("disambiguatedPaths"), "{ud}");
        }
    })
    .await
}

#[tokio::test]
async fn db_hash_sees_the_same_bytes_however_they_were_written() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let sim = builder().data_dir(dir.path()).start().await.unwrap();
        let c = client(&sim).await;
        let target = doc! {"_id": 1, "$p": 1, "x.y": {"$q": [1, {"a.b": 2}]}, "z": 3};
        // h1: inserted as is.
        c.database("h1")
            .collection::<Document>("c")
            .insert_one(target.clone())
            .await
            .unwrap();
        // h2: built by updates (insert, then a pipeline with `$setField` and `$literal`).
        let h2 = c.database("h2");
        h2.collection::<Document>("c")
            .insert_one(doc! {"_id": 1, "z": 3})
            .await
            .unwrap();
        update_raw(
            &h2,
            "c",
            doc! {"_id": 1},
            Bson::Array(vec![Bson::Document(
                doc! {"$replaceWith": {"$literal": target.clone()}},
            )]),
            false,
        )
        .await;
        let a = db_hash(&c, "h1").await;
        let b = db_hash(&c, "h2").await;
        assert_eq!(
            a.get_document("collections").unwrap(),
            b.get_document("collections").unwrap()
        );
        // A different key order is a different document, and a different hash.
        c.database("h3")
            .collection::<Document>("c")
            .insert_one(doc! {"_id": 1, "x.y": {"$q": [1, {"a.b": 2}]}, "$p": 1, "z": 3})
            .await
            .unwrap();
        let h3 = db_hash(&c, "h3").await;
        assert_ne!(
            a.get_document("collections").unwrap(),
            h3.get_document("collections").unwrap()
        );
        // The names survive a restart from the data directory unchanged.
        sim.shutdown().await;
        drop(c);
        let sim = builder().data_dir(dir.path()).start().await.unwrap();
        let c = client(&sim).await;
        assert_eq!(db_hash(&c, "h1").await.get("md5"), a.get("md5"));
        assert_eq!(db_hash(&c, "h2").await.get("md5"), b.get("md5"));
        let d = c
            .database("h2")
            .collection::<Document>("c")
            .find_one(doc! {})
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bytes(&d), bytes(&target));
        sim.shutdown().await;
    })
    .await
}

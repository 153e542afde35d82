//! Multi-document transactions: atomic visibility, abort, write conflicts, driver retries.

use std::time::Duration;

use bson::{doc, Bson, Document};
use mongodb::{change_stream::event::ChangeStreamEvent, Collection};

use crate::common::*;

#[tokio::test]
async fn commit_is_atomic_with_one_cluster_time_and_session_fields() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("tx");
        let a: Collection<Document> = db.collection("a");
        let b: Collection<Document> = db.collection("b");
        a.insert_one(doc! {"_id": 0}).await.unwrap();
        b.insert_one(doc! {"_id": 0}).await.unwrap();
        let mut stream = db
            .watch()
            .max_await_time(Duration::from_millis(200))
            .await
            .unwrap()
            .with_type::<Document>();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        a.insert_one(doc! {"_id": 1})
            .session(&mut session)
            .await
            .unwrap();
        b.insert_one(doc! {"_id": 1})
            .session(&mut session)
            .await
            .unwrap();
        a.update_one(doc! {"_id": 0}, doc! {"$set": {"t": 1}})
            .session(&mut session)
            .await
            .unwrap();
        // The transaction sees its own writes; others do not.
        assert_eq!(
            a.count_documents(doc! {})
                .session(&mut session)
                .await
                .unwrap(),
            2
        );
        assert_eq!(a.count_documents(doc! {}).await.unwrap(), 1);
        assert!(a
            .find_one(doc! {"_id": 0})
            .await
            .unwrap()
            .unwrap()
            .get("t")
            .is_none());
        assert!(stream.next_if_any().await.unwrap().is_none());
        session.commit_transaction().await.unwrap();
        assert_eq!(a.count_documents(doc! {}).await.unwrap(), 2);
        assert_eq!(b.count_documents(doc! {}).await.unwrap(), 2);
        let mut events = Vec::new();
        for _ in 0..3 {
            events.push(next(&mut stream).await);
        }
        let ts: Vec<_> = events
            .iter()
            .map(|e| e.get_timestamp("clusterTime").unwrap())
            .collect();
        assert!(
            ts.iter().all(|t| *t == ts[0]),
            "one cluster time for the transaction"
        );
        let lsid = session.id().clone();
        for e in &events {
            assert_eq!(e.get_document("lsid").unwrap(), &lsid);
            assert!(matches!(e.get("txnNumber"), Some(Bson::Int64(_))));
        }
        let tokens: Vec<String> = events
            .iter()
            .map(|e| {
                e.get_document("_id")
                    .unwrap()
                    .get_str("_data")
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "tokens order the transaction's events"
        );
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e.get_str("operationType").unwrap())
            .collect();
        assert_eq!(kinds, vec!["insert", "insert", "update"]);
        // Typed events carry them too.
        let mut typed = a.watch().await.unwrap();
        session.start_transaction().await.unwrap();
        a.insert_one(doc! {"_id": 2})
            .session(&mut session)
            .await
            .unwrap();
        session.commit_transaction().await.unwrap();
        let e: ChangeStreamEvent<Document> = next(&mut typed).await;
        assert_eq!(e.lsid.as_ref(), Some(&lsid));
        assert!(e.txn_number.is_some());
    })
    .await
}

#[tokio::test]
async fn abort_is_invisible() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("tx").collection("abort");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let mut stream = col.watch().await.unwrap().with_type::<Document>();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        col.insert_one(doc! {"_id": 1}).session(&mut session).await.unwrap();
        col.delete_one(doc! {"_id": 0}).session(&mut session).await.unwrap();
        session.abort_transaction().await.unwrap();
        col.insert_one(doc! {"_id": "marker"}).await.unwrap();
        let e = next(&mut stream).await;
        assert_eq!(e.get_document("documentKey").unwrap(), &doc! {"_id": "marker"});
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 2);
        assert!(col.find_one(doc! {"_id": 0}).await.unwrap().is_some());
        // Committing an aborted transaction: NoSuchTransaction.
        let err = c
            .database("admin")
            .run_command(doc! {"commitTransaction": 1, "lsid": session.id().clone(), "txnNumber": 1i64, "autocommit": false})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(251));
    })
    .await
}

#[tokio::test]
async fn write_conflict_between_sessions_is_transient() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("tx").collection("conflict");
        col.insert_one(doc! {"_id": 1, "n": 0}).await.unwrap();
        let mut s1 = c.start_session().await.unwrap();
        let mut s2 = c.start_session().await.unwrap();
        s1.start_transaction().await.unwrap();
        s2.start_transaction().await.unwrap();
        col.update_one(doc! {"_id": 1}, doc! {"$inc": {"n": 1}})
            .session(&mut s1)
            .await
            .unwrap();
        let err = col
            .update_one(doc! {"_id": 1}, doc! {"$inc": {"n": 10}})
            .session(&mut s2)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(112));
        assert!(err.contains_label("TransientTransactionError"));
        s1.commit_transaction().await.unwrap();
        let _ = s2.abort_transaction().await;
        assert_eq!(
            col.find_one(doc! {"_id": 1})
                .await
                .unwrap()
                .unwrap()
                .get_i32("n")
                .unwrap(),
            1
        );
        // A non-transactional write to the same document before commit also conflicts.
        s1.start_transaction().await.unwrap();
        col.update_one(doc! {"_id": 1}, doc! {"$inc": {"n": 1}})
            .session(&mut s1)
            .await
            .unwrap();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"other": true}})
            .await
            .unwrap();
        let err = s1.commit_transaction().await.unwrap_err();
        assert_eq!(code(&err), Some(112));
        assert!(err.contains_label("TransientTransactionError"));
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(d.get_i32("n").unwrap(), 1);
    })
    .await
}

#[tokio::test]
async fn with_transaction_retries_after_a_transient_conflict() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("tx").collection("retry");
        col.insert_one(doc! {"_id": 1, "n": 0}).await.unwrap();
        // Another session holds an uncommitted write to the same document.
        let mut blocker = c.start_session().await.unwrap();
        blocker.start_transaction().await.unwrap();
        col.update_one(doc! {"_id": 1}, doc! {"$set": {"blocker": true}})
            .session(&mut blocker)
            .await
            .unwrap();
        let mut session = c.start_session().await.unwrap();
        let mut attempts = 0;
        let col2 = col.clone();
        session
            .start_transaction()
            .and_run2(async |s| {
                attempts += 1;
                if attempts == 2 {
                    blocker.commit_transaction().await?;
                }
                col2.update_one(doc! {"_id": 1}, doc! {"$inc": {"n": 1}})
                    .session(&mut *s)
                    .await?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(attempts, 2);
        let d = col.find_one(doc! {"_id": 1}).await.unwrap().unwrap();
        assert_eq!(d, doc! {"_id": 1, "n": 1, "blocker": true});
        // A labelled error injected by a fail point is retried the same way.
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "errorCode": 112, "errorLabels": ["TransientTransactionError"]},
        )
        .await;
        let mut runs = 0;
        session
            .start_transaction()
            .and_run2(async |s| {
                runs += 1;
                col2.insert_one(doc! {"_id": 2}).session(&mut *s).await?;
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(runs, 2);
        assert_eq!(col.count_documents(doc! {"_id": 2}).await.unwrap(), 1);
    })
    .await
}

#[tokio::test]
async fn change_streams_are_refused_inside_transactions() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("tx").collection("nocs");
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        col.insert_one(doc! {"_id": 2})
            .session(&mut session)
            .await
            .unwrap();
        let err = c
            .database("tx")
            .run_command(
                doc! {"aggregate": "nocs", "pipeline": [{"$changeStream": {}}], "cursor": {}},
            )
            .session(&mut session)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(263));
    })
    .await
}

/// A duplicate key inside a transaction is a write error (`ok: 1`, `writeErrors`, the batch
/// stops at it even unordered, no label) that aborts the transaction: the next statement and
/// the commit answer NoSuchTransaction with TransientTransactionError.
#[tokio::test]
async fn write_error_aborts_the_transaction() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("tx");
        let col: Collection<Document> = db.collection("dup");
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        let reply = db
            .run_command(doc! {
                "insert": "dup",
                "documents": [{"_id": 2}, {"_id": 1}, {"_id": 3}],
                "ordered": false,
            })
            .session(&mut session)
            .await
            .unwrap();
        assert_eq!(reply.get_f64("ok").unwrap(), 1.0);
        assert_eq!(reply.get_i32("n").unwrap(), 1);
        let errors = reply.get_array("writeErrors").unwrap();
        assert_eq!(errors.len(), 1, "{reply}");
        let first = errors[0].as_document().unwrap();
        assert_eq!(first.get_i32("index").unwrap(), 1);
        assert_eq!(first.get_i32("code").unwrap(), 11000);
        assert!(reply.get("errorLabels").is_none(), "{reply}");
        // The next statement of the transaction: NoSuchTransaction, transient.
        let err = col
            .find_one(doc! {})
            .session(&mut session)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(251));
        assert!(err.contains_label("TransientTransactionError"), "{err:?}");
        let err = session.commit_transaction().await.unwrap_err();
        assert_eq!(code(&err), Some(251));
        assert!(err.contains_label("TransientTransactionError"), "{err:?}");
        let ids: Vec<Bson> = col.distinct("_id", doc! {}).await.unwrap();
        assert_eq!(ids, vec![Bson::Int32(1)]);

        // Through the driver's CRUD API: a DuplicateKey write error without transient label.
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        let err = col
            .insert_one(doc! {"_id": 1})
            .session(&mut session)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(11000));
        assert!(!err.contains_label("TransientTransactionError"));
        let err = session.commit_transaction().await.unwrap_err();
        assert_eq!(code(&err), Some(251));
    })
    .await
}

/// Any failing statement aborts the transaction (here a command refused in transactions).
#[tokio::test]
async fn drop_is_refused_inside_transactions_and_aborts_them() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("tx");
        let col: Collection<Document> = db.collection("nodrop");
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        col.insert_one(doc! {"_id": 2})
            .session(&mut session)
            .await
            .unwrap();
        let err = db
            .run_command(doc! {"drop": "nodrop"})
            .session(&mut session)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(263));
        let err = session.commit_transaction().await.unwrap_err();
        assert_eq!(code(&err), Some(251));
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
    })
    .await
}

/// `create` and `createIndexes` on a new collection inside a transaction: invisible until the
/// commit, then there with its index (which is enforced).
#[tokio::test]
async fn create_and_create_indexes_inside_a_transaction_appear_at_commit() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("txddl");
        db.collection::<Document>("other")
            .insert_one(doc! {"_id": 0})
            .await
            .unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        db.run_command(doc! {"create": "fresh"})
            .session(&mut session)
            .await
            .unwrap();
        let reply = db
            .run_command(doc! {"createIndexes": "fresh", "indexes": [{"key": {"x": 1}, "name": "x_1", "unique": true}]})
            .session(&mut session)
            .await
            .unwrap();
        assert_eq!(reply.get_i32("numIndexesAfter").unwrap(), 2, "{reply}");
        // createIndexes on a collection that does not exist creates it too.
        db.run_command(doc! {"createIndexes": "implicit", "indexes": [{"key": {"y": 1}, "name": "y_1"}]})
            .session(&mut session)
            .await
            .unwrap();
        let fresh: Collection<Document> = db.collection("fresh");
        fresh
            .insert_one(doc! {"_id": 1, "x": 1})
            .session(&mut session)
            .await
            .unwrap();
        let names = db.list_collection_names().await.unwrap();
        assert!(!names.contains(&"fresh".to_string()), "{names:?}");
        assert!(!names.contains(&"implicit".to_string()), "{names:?}");
        session.commit_transaction().await.unwrap();
        let names = db.list_collection_names().await.unwrap();
        assert!(names.contains(&"fresh".to_string()), "{names:?}");
        assert!(names.contains(&"implicit".to_string()), "{names:?}");
        let indexes = fresh.list_index_names().await.unwrap();
        assert_eq!(indexes, vec!["_id_".to_string(), "x_1".to_string()]);
        let implicit = db.collection::<Document>("implicit").list_index_names().await.unwrap();
        assert_eq!(implicit, vec!["_id_".to_string(), "y_1".to_string()]);
        assert_eq!(fresh.count_documents(doc! {}).await.unwrap(), 1);
        let err = fresh.insert_one(doc! {"_id": 2, "x": 1}).await.unwrap_err();
        assert_eq!(code(&err), Some(11000));
    })
    .await
}

/// The restrictions: a new index on an existing collection → 263 (an identical existing index
/// is a no-op); `create`/`createIndexes` in a `snapshot` transaction → 72; each aborts.
#[tokio::test]
async fn ddl_restrictions_inside_transactions() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("txddl2");
        db.run_command(
            doc! {"createIndexes": "old", "indexes": [{"key": {"a": 1}, "name": "a_1"}]},
        )
        .await
        .unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        let same = db
            .run_command(
                doc! {"createIndexes": "old", "indexes": [{"key": {"a": 1}, "name": "a_1"}]},
            )
            .session(&mut session)
            .await
            .unwrap();
        assert_eq!(
            same.get_i32("numIndexesBefore").unwrap(),
            same.get_i32("numIndexesAfter").unwrap()
        );
        let err = db
            .run_command(
                doc! {"createIndexes": "old", "indexes": [{"key": {"b": 1}, "name": "b_1"}]},
            )
            .session(&mut session)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(263));
        assert_eq!(
            code(&session.commit_transaction().await.unwrap_err()),
            Some(251)
        );
        assert_eq!(
            db.collection::<Document>("old")
                .list_index_names()
                .await
                .unwrap(),
            vec!["_id_".to_string(), "a_1".to_string()]
        );

        for cmd in [
            doc! {"create": "snap"},
            doc! {"createIndexes": "snap", "indexes": [{"key": {"b": 1}, "name": "b_1"}]},
        ] {
            session
                .start_transaction()
                .read_concern(mongodb::options::ReadConcern::snapshot())
                .await
                .unwrap();
            let err = db.run_command(cmd).session(&mut session).await.unwrap_err();
            assert_eq!(code(&err), Some(72));
            assert_eq!(
                code(&session.commit_transaction().await.unwrap_err()),
                Some(251)
            );
        }
        assert!(!db
            .list_collection_names()
            .await
            .unwrap()
            .contains(&"snap".to_string()));
    })
    .await
}

/// MongoDB aborts a transaction that outlives `transactionLifetimeLimitSeconds` (default 60,
/// settable at runtime): a client that died mid-transaction does not hold its documents
/// forever. Another transaction then writes them without a WriteConflict, and the expired
/// transaction's next statement or commit answers NoSuchTransaction (251).
#[tokio::test]
async fn a_transaction_past_its_lifetime_limit_is_aborted_and_releases_its_documents() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let got = admin(
            &c,
            doc! {"getParameter": 1, "transactionLifetimeLimitSeconds": 1},
        )
        .await
        .unwrap();
        assert_eq!(got.get_i32("transactionLifetimeLimitSeconds").unwrap(), 60);
        let refused = admin(
            &c,
            doc! {"setParameter": 1, "transactionLifetimeLimitSeconds": 0},
        )
        .await
        .unwrap_err();
        assert_eq!(code(&refused), Some(2), "{refused}");
        let set = admin(
            &c,
            doc! {"setParameter": 1, "transactionLifetimeLimitSeconds": 1},
        )
        .await
        .unwrap();
        assert_eq!(set.get_i32("was").unwrap(), 60);

        let coll: Collection<Document> = c.database("tx").collection("held");
        coll.insert_one(doc! {"_id": 1, "n": 0}).await.unwrap();
        let mut abandoned = c.start_session().await.unwrap();
        abandoned.start_transaction().await.unwrap();
        coll.update_one(doc! {"_id": 1}, doc! {"$set": {"n": 1}})
            .session(&mut abandoned)
            .await
            .unwrap();

        // While the transaction lives, another one conflicts on the document.
        let mut other = c.start_session().await.unwrap();
        other.start_transaction().await.unwrap();
        let conflict = coll
            .update_one(doc! {"_id": 1}, doc! {"$set": {"n": 2}})
            .session(&mut other)
            .await
            .unwrap_err();
        assert_eq!(code(&conflict), Some(112), "{conflict}");
        let _ = other.abort_transaction().await;

        // Past the limit it is gone: the document can be written in a transaction again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = c.start_session().await.unwrap();
            s.start_transaction().await.unwrap();
            match coll
                .update_one(doc! {"_id": 1}, doc! {"$set": {"n": 3}})
                .session(&mut s)
                .await
            {
                Ok(_) => {
                    s.commit_transaction().await.unwrap();
                    break;
                }
                Err(e) => {
                    assert_eq!(code(&e), Some(112), "{e}");
                    let _ = s.abort_transaction().await;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the expired transaction still holds the document"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let expired = abandoned.commit_transaction().await.unwrap_err();
        assert_eq!(code(&expired), Some(251), "{expired}");
        assert_eq!(
            coll.find_one(doc! {"_id": 1})
                .await
                .unwrap()
                .unwrap()
                .get_i32("n")
                .unwrap(),
            3
        );
    })
    .await;
}

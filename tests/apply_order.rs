//! Issue 9, the apply path: exact `_id` identity, strict source order under unique indexes,
//! no abandoned writes, replication writes that bypass copied validators, exact
//! destination-wins equality, `$`-prefixed field names.
//!
//! Several writes land "in one batch" by stopping the daemon, writing on the source, and
//! starting it again: the stream then resumes with all of them queued.

use std::time::Duration;

use bson::{doc, Bson, Document};

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

const T: Duration = Duration::from_secs(60);

async fn dead_letters(c: &Clusters) -> Vec<Document> {
    use futures::TryStreamExt;
    c.dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Waits until the daemon has checkpointed what it streamed, then stops it cleanly.
async fn stop(d: &mut Daemon) {
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjacent_int64_ids_above_2_53_are_different_documents() {
    let c = Clusters::start().await;
    let base: i64 = 1 << 60;
    let (a, b, extra) = (base + 1, base + 2, base + 3);
    let src = c.src.database("ids").collection::<Document>("big");
    src.insert_many(vec![doc! {"_id": a, "v": 0}, doc! {"_id": b, "v": 0}])
        .await
        .unwrap();
    // An extra document on the destination, adjacent to both: the copy must delete it.
    c.dst
        .database("ids")
        .collection::<Document>("big")
        .insert_one(doc! {"_id": extra, "v": "stale"})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"ids.*\"]\n");
    wait_converged(&c, &[("ids", "big")], T).await;
    d.wait_streaming("ids.big").await;
    stop(&mut d).await;
    // One batch: update A, delete B; two inserts of adjacent ids.
    src.update_one(doc! {"_id": a}, doc! {"$set": {"v": 1}})
        .await
        .unwrap();
    src.delete_one(doc! {"_id": b}).await.unwrap();
    src.insert_one(doc! {"_id": base + 10, "v": 10})
        .await
        .unwrap();
    src.insert_one(doc! {"_id": base + 11, "v": 11})
        .await
        .unwrap();
    d.spawn(&[]);
    wait_converged(&c, &[("ids", "big")], T).await;
    let dst = c.dst.database("ids").collection::<Document>("big");
    assert_eq!(dst.count_documents(doc! {}).await.unwrap(), 3);
    assert_eq!(
        dst.find_one(doc! {"_id": a})
            .await
            .unwrap()
            .unwrap()
            .get_i32("v")
            .unwrap(),
        1
    );
    assert!(dead_letters(&c).await.is_empty());
    stop(&mut d).await;
}

/// Every history here is valid on a source with a unique index on `email`; applied in another
/// order, each hits a duplicate key.
async fn unique_histories(coll: &mongodb::Collection<Document>) {
    // delete C{x} then insert D{x}
    coll.delete_one(doc! {"_id": "C"}).await.unwrap();
    coll.insert_one(doc! {"_id": "D", "email": "c@x"})
        .await
        .unwrap();
    // A x→y then insert B{x}
    coll.update_one(doc! {"_id": "A"}, doc! {"$set": {"email": "a2@x"}})
        .await
        .unwrap();
    coll.insert_one(doc! {"_id": "B", "email": "a@x"})
        .await
        .unwrap();
    // swap P and Q through a temporary value
    coll.update_one(doc! {"_id": "P"}, doc! {"$set": {"email": "tmp@x"}})
        .await
        .unwrap();
    coll.update_one(doc! {"_id": "Q"}, doc! {"$set": {"email": "p@x"}})
        .await
        .unwrap();
    coll.update_one(doc! {"_id": "P"}, doc! {"$set": {"email": "q@x"}})
        .await
        .unwrap();
    // chain: K3 z→w, K2 y→z, K1 x→y
    coll.update_one(doc! {"_id": "K3"}, doc! {"$set": {"email": "w@x"}})
        .await
        .unwrap();
    coll.update_one(doc! {"_id": "K2"}, doc! {"$set": {"email": "z@x"}})
        .await
        .unwrap();
    coll.update_one(doc! {"_id": "K1"}, doc! {"$set": {"email": "y@x"}})
        .await
        .unwrap();
    // a replace that takes a freed key, then a delete and re-insert of the same _id
    coll.replace_one(doc! {"_id": "R"}, doc! {"_id": "R", "email": "x@x", "r": 1})
        .await
        .unwrap();
    coll.delete_one(doc! {"_id": "S"}).await.unwrap();
    coll.insert_one(doc! {"_id": "S", "email": "s@x", "again": true})
        .await
        .unwrap();
}

async fn seed_unique(c: &Clusters) -> mongodb::Collection<Document> {
    let coll = c.src.database("uq").collection::<Document>("users");
    c.src
        .database("uq")
        .run_command(doc! {"createIndexes": "users", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]})
        .await
        .unwrap();
    coll.insert_many(vec![
        doc! {"_id": "A", "email": "a@x"},
        doc! {"_id": "C", "email": "c@x"},
        doc! {"_id": "P", "email": "p@x"},
        doc! {"_id": "Q", "email": "q@x"},
        doc! {"_id": "K1", "email": "x@x"},
        doc! {"_id": "K2", "email": "y@x"},
        doc! {"_id": "K3", "email": "z@x"},
        doc! {"_id": "R", "email": "r@x"},
        doc! {"_id": "S", "email": "s@x"},
    ])
    .await
    .unwrap();
    coll
}

async fn destination_has_unique_index(c: &Clusters) -> bool {
    let reply = c
        .dst
        .database("uq")
        .run_command(doc! {"listIndexes": "users"})
        .await;
    reply.is_ok_and(|r| {
        r.get_document("cursor")
            .and_then(|c| c.get_array("firstBatch"))
            .is_ok_and(|b| {
                b.iter().any(|i| {
                    i.as_document()
                        .is_some_and(|i| i.get_bool("unique").ok() == Some(true))
                })
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_index_histories_in_one_batch_converge_without_dead_letters() {
    let c = Clusters::start().await;
    let coll = seed_unique(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"uq.*\"]\n");
    wait_converged(&c, &[("uq", "users")], T).await;
    d.wait_streaming("uq.users").await;
    wait_until("the unique index is copied", T, || {
        destination_has_unique_index(&c)
    })
    .await;
    stop(&mut d).await;
    unique_histories(&coll).await;
    d.spawn(&[]);
    wait_converged(&c, &[("uq", "users")], T).await;
    d.wait_streaming("uq.users").await;
    assert_eq!(dead_letters(&c).await, Vec::<Document>::new());
    let skipped = d
        .metric("mongo_syncd_replay_skipped_total{namespace=\"uq.users\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(skipped, 0.0);
    stop(&mut d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_index_histories_replayed_after_a_crash_converge_without_dead_letters() {
    let c = Clusters::start().await;
    let coll = seed_unique(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"uq.*\"]\n");
    wait_converged(&c, &[("uq", "users")], T).await;
    d.wait_streaming("uq.users").await;
    wait_until("the unique index is copied", T, || {
        destination_has_unique_index(&c)
    })
    .await;
    // The daemon applies the histories and is killed before (or around) its next checkpoint:
    // the restart replays them onto a destination that already holds their result.
    unique_histories(&coll).await;
    wait_converged(&c, &[("uq", "users")], T).await;
    d.kill9();
    // ...and once more, after further changes, from whatever checkpoint survived.
    coll.update_one(doc! {"_id": "A"}, doc! {"$set": {"email": "a3@x"}})
        .await
        .unwrap();
    coll.update_one(doc! {"_id": "B"}, doc! {"$set": {"email": "a2@x"}})
        .await
        .unwrap();
    d.spawn(&[]);
    wait_converged(&c, &[("uq", "users")], T).await;
    d.wait_streaming("uq.users").await;
    assert_eq!(dead_letters(&c).await, Vec::<Document>::new());
    stop(&mut d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_write_never_lands_after_a_newer_one() {
    let c = Clusters::start().await;
    let src = c.src.database("slow").collection::<Document>("docs");
    src.insert_one(doc! {"_id": 1, "v": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), "[sync]\nnamespaces = [\"slow.*\"]\n");
    d.spawn_with_env(
        &[],
        &[("MONGO_SYNCD_DESTINATION__SOCKET_TIMEOUT_MS", "1000")],
    );
    wait_converged(&c, &[("slow", "docs")], T).await;
    d.wait_streaming("slow.docs").await;
    // The next update is held by the destination far longer than the client waits.
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            // The data write only (the batch's apply mark and checkpoint are updates too).
            "data": {"failCommands": ["update"], "namespace": "slow.docs", "blockConnection": true, "blockTimeMS": 5_000},
        })
        .unwrap();
    src.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 1}})
        .await
        .unwrap();
    let dst = c.dst.database("slow").collection::<Document>("docs");
    wait_until("v=1 arrives after the retry", T, || async {
        dst.find_one(doc! {"_id": 1})
            .await
            .unwrap()
            .is_some_and(|d| d.get_i32("v").ok() == Some(1))
    })
    .await;
    src.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 2}})
        .await
        .unwrap();
    wait_converged(&c, &[("slow", "docs")], T).await;
    // Past the fail point's block: the abandoned v=1 must not have landed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    wait_converged(&c, &[("slow", "docs")], Duration::from_secs(1)).await;
    assert!(
        d.all_logs().contains("timed out after 1000 ms"),
        "the client gave up on the blocked write; log:\n{}",
        d.all_logs()
    );
    stop(&mut d).await;
}

/// Checkpoint writes are bounded like data writes (issue 9 item 6): a checkpoint save the
/// destination holds is given up after `destination.socket_timeout_ms` and retried, so one
/// hung connection does not stall the namespace; the held write carries `maxTimeMS` and dies
/// on the server instead of landing later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_write_held_by_the_destination_is_given_up_and_retried() {
    let c = Clusters::start().await;
    let src = c.src.database("slowcp").collection::<Document>("docs");
    src.insert_one(doc! {"_id": 1, "v": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), "[sync]\nnamespaces = [\"slowcp.*\"]\n");
    d.spawn_with_env(
        &[],
        &[("MONGO_SYNCD_DESTINATION__SOCKET_TIMEOUT_MS", "1000")],
    );
    wait_converged(&c, &[("slowcp", "docs")], T).await;
    d.wait_streaming("slowcp.docs").await;
    // The next checkpoint save is held far longer than the client waits (and than this test).
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["update"], "namespace": "mongo_syncd.checkpoints", "blockConnection": true, "blockTimeMS": 120_000},
        })
        .unwrap();
    for v in 1..=3 {
        src.update_one(doc! {"_id": 1}, doc! {"$set": {"v": v}})
            .await
            .unwrap();
        wait_converged(&c, &[("slowcp", "docs")], Duration::from_secs(20)).await;
    }
    // The checkpoint moved past the held save.
    let checkpoints = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints");
    let before = checkpoints
        .find_one(doc! {"_id.ns": "slowcp.docs"})
        .await
        .unwrap()
        .and_then(|cp| cp.get_datetime("updated_at").ok().copied())
        .expect("a checkpoint");
    wait_until(
        "the checkpoint is saved again",
        Duration::from_secs(20),
        || async {
            checkpoints
                .find_one(doc! {"_id.ns": "slowcp.docs"})
                .await
                .unwrap()
                .and_then(|cp| cp.get_datetime("updated_at").ok().copied())
                .is_some_and(|t| t > before)
        },
    )
    .await;
    assert!(
        d.all_logs().contains("timed out after 1000 ms"),
        "the client gave up on the held checkpoint save; log:\n{}",
        d.all_logs()
    );
    stop(&mut d).await;
}

/// Index names on a destination collection, `_id_` left out.
async fn secondary_indexes(c: &mongodb::Client, db: &str, coll: &str) -> Vec<String> {
    let mut names = c
        .database(db)
        .collection::<Document>(coll)
        .list_index_names()
        .await
        .unwrap_or_default();
    names.retain(|n| n != "_id_");
    names.sort();
    names
}

/// Issue 9 item 6 for DDL: an index build the destination holds (a lock, a stuck node) is given
/// up after `destination.socket_timeout_ms` and retried, instead of stalling the namespace for as
/// long as the destination holds it; the abandoned build carries `maxTimeMS`, so it cannot land
/// after the index was dropped again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_build_held_by_the_destination_is_given_up_and_retried() {
    let c = Clusters::start().await;
    let src = c.src.database("slowddl").collection::<Document>("docs");
    src.insert_one(doc! {"_id": 1, "n": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), "[sync]\nnamespaces = [\"slowddl.*\"]\n");
    d.spawn_with_env(
        &[],
        &[("MONGO_SYNCD_DESTINATION__SOCKET_TIMEOUT_MS", "1000")],
    );
    wait_converged(&c, &[("slowddl", "docs")], T).await;
    d.wait_streaming("slowddl.docs").await;
    // The next createIndexes is held far longer than the client waits (and than this test).
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["createIndexes"], "blockConnection": true, "blockTimeMS": 120_000},
        })
        .unwrap();
    src.create_index(mongodb::IndexModel::builder().keys(doc! {"n": 1}).build())
        .await
        .unwrap();
    wait_until(
        "n_1 built on the destination",
        Duration::from_secs(20),
        || async { secondary_indexes(&c.dst, "slowddl", "docs").await == vec!["n_1".to_string()] },
    )
    .await;
    src.drop_index("n_1").await.unwrap();
    wait_until(
        "n_1 dropped on the destination",
        Duration::from_secs(20),
        || async {
            secondary_indexes(&c.dst, "slowddl", "docs")
                .await
                .is_empty()
        },
    )
    .await;
    assert!(
        d.all_logs().contains("timed out after 1000 ms"),
        "the client gave up on the held index build; log:\n{}",
        d.all_logs()
    );
    stop(&mut d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_older_than_a_moderate_source_validator_replicate() {
    let c = Clusters::start().await;
    let db = c.src.database("val");
    let src = db.collection::<Document>("items");
    src.insert_many(vec![
        doc! {"_id": 1, "qty": "many"},
        doc! {"_id": 2, "qty": 3},
    ])
    .await
    .unwrap();
    // The validator comes after the old documents, which it would reject.
    db.run_command(doc! {
        "collMod": "items",
        "validator": {"qty": {"$type": "int"}},
        "validationLevel": "moderate",
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"val.*\"]\n");
    wait_converged(&c, &[("val", "items")], T).await;
    d.wait_streaming("val.items").await;
    // A later valid change still streams (and the copied validator stays on the destination).
    src.insert_one(doc! {"_id": 3, "qty": 4}).await.unwrap();
    wait_converged(&c, &[("val", "items")], T).await;
    assert_eq!(dead_letters(&c).await, Vec::<Document>::new());
    stop(&mut d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_wins_equality_is_exact() {
    let c = Clusters::start().await;
    let src = c.src.database("dw").collection::<Document>("items");
    c.src
        .database("dw")
        .run_command(doc! {"create": "items", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    src.insert_many(vec![doc! {"_id": 1, "v": 1}, doc! {"_id": 2, "v": 1}])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"dw.*\"]\n\n[conflict]\npolicy = \"destination-wins\"\n",
    );
    wait_converged(&c, &[("dw", "items")], T).await;
    d.wait_streaming("dw.items").await;
    // Behind the daemon's back the destination changes 1 to 1.0 and NumberLong(1): equal
    // values, different documents.
    let dst = c.dst.database("dw").collection::<Document>("items");
    dst.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 1.0}})
        .await
        .unwrap();
    dst.update_one(doc! {"_id": 2}, doc! {"$set": {"v": Bson::Int64(1)}})
        .await
        .unwrap();
    src.update_many(doc! {}, doc! {"$set": {"v": 5}})
        .await
        .unwrap();
    d.wait_metric_at_least("mongo_syncd_conflicts_total", 2.0, T)
        .await;
    assert_eq!(
        dst.find_one(doc! {"_id": 1})
            .await
            .unwrap()
            .unwrap()
            .get("v"),
        Some(&Bson::Double(1.0))
    );
    assert_eq!(
        dst.find_one(doc! {"_id": 2})
            .await
            .unwrap()
            .unwrap()
            .get("v"),
        Some(&Bson::Int64(1))
    );
    stop(&mut d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_level_dollar_prefixed_fields_are_stored_literally() {
    let c = Clusters::start().await;
    let src = c.src.database("dollar").collection::<Document>("docs");
    src.insert_one(doc! {"_id": 1, "v": 1}).await.unwrap();
    let set_price = |id: i32, price: i32| {
        let src = src.clone();
        async move {
            src.update_one(
                doc! {"_id": id},
                vec![doc! {"$replaceWith": {"$setField": {"field": {"$literal": "$price"}, "input": "$$ROOT", "value": price}}}],
            )
            .upsert(true)
            .await
            .unwrap();
        }
    };
    set_price(1, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"dollar.*\"]\n");
    wait_converged(&c, &[("dollar", "docs")], T).await;
    d.wait_streaming("dollar.docs").await;
    set_price(1, 11).await;
    set_price(2, 20).await;
    wait_converged(&c, &[("dollar", "docs")], T).await;
    assert_eq!(dead_letters(&c).await, Vec::<Document>::new());
    stop(&mut d).await;
}

/// The source's operation time after a read of `app.<coll>`: every later write is after it.
async fn source_time(c: &Clusters, coll: &str) -> bson::Timestamp {
    c.src
        .database("app")
        .run_command(doc! {"find": coll, "limit": 1})
        .await
        .unwrap()
        .get_timestamp("operationTime")
        .unwrap()
}

/// Waits until the namespace's applied mark is later than `after`.
async fn wait_for_mark_after(c: &Clusters, what: &str, after: bson::Timestamp) {
    let marks = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("apply_marks");
    wait_until(what, T, || async {
        marks
            .find_one(doc! {})
            .await
            .unwrap()
            .and_then(|m| m.get_timestamp("cluster_time").ok())
            .is_some_and(|t| t > after)
    })
    .await;
}

/// Issue 11 item 4: a batch is read, marked and prepared while the batch before it is still
/// being written, and writes only after it. Round 4 deletes every document and round 5
/// inserts them again, in two batches; the destination holds round 4's deletes for a while.
/// The daemon must persist round 5's mark during the hold (the overlap happens) and must not
/// send round 5's inserts before the deletes (they would be deleted again: an empty copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_prepared_while_the_one_before_is_written_lands_after_it() {
    let c = Clusters::start().await;
    let src = c.src.database("app").collection::<Document>("overlap");
    src.insert_many((0..100).map(|i| doc! {"_id": i, "v": 0}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = "[sync]\nnamespaces = [\"app.overlap\"]\n\n[apply]\nbatch_max_events = 100\n";
    let mut d = Daemon::start(&c, dir.path(), config);
    d.wait_streaming("app.overlap").await;
    stop(&mut d).await;
    // The backlog: five rounds of 100 events, one batch each.
    for round in 1..=3 {
        src.update_many(doc! {}, doc! {"$set": {"v": round}})
            .await
            .unwrap();
    }
    src.delete_many(doc! {}).await.unwrap();
    // Every event of round 5 is later than this.
    let round_4_done = source_time(&c, "overlap").await;
    src.insert_many((0..100).map(|i| doc! {"_id": i, "v": 5}))
        .await
        .unwrap();
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["delete"], "blockConnection": true, "blockTimeMS": 3_000,
                     "namespace": "app.overlap"}},
        )
        .unwrap();
    let mut d = Daemon::start(&c, dir.path(), config);
    let dst = c.dst.database("app").collection::<Document>("overlap");
    // While the deletes are held, round 5 is already marked: it was read and prepared.
    wait_for_mark_after(&c, "round 5's mark is persisted", round_4_done).await;
    assert_eq!(
        dst.count_documents(doc! {"v": 3}).await.unwrap(),
        100,
        "round 5 was marked only after round 4 was written (no overlap), or it was written \
         before round 4's held deletes; log:\n{}",
        d.logs()
    );
    wait_until("round 5 is applied", T, || async {
        dst.count_documents(doc! {"v": 5}).await.unwrap() == 100
    })
    .await;
    stop(&mut d).await;
    assert_eq!(
        crate::support::cluster::dump(&c.dst, "app", "overlap").await,
        crate::support::cluster::dump(&c.src, "app", "overlap").await,
        "log:\n{}",
        d.logs()
    );
}

/// Issue 11 item 4, the pipeline's depth: while one batch is held at the destination, the two
/// read after it are both started and marked (each batch's task saves its own mark, so the
/// worker never waits for a mark queued behind the held writes). A SIGKILL with the three in
/// flight loses and repeats nothing: the restart replays them from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batches_are_marked_while_the_one_before_is_held_and_a_kill_then_loses_nothing() {
    let c = Clusters::start().await;
    let src = c.src.database("app").collection::<Document>("depth");
    src.insert_many((0..100).map(|i| doc! {"_id": i, "v": 0}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = "[sync]\nnamespaces = [\"app.depth\"]\n\n[apply]\nbatch_max_events = 100\n";
    let mut d = Daemon::start(&c, dir.path(), config);
    d.wait_streaming("app.depth").await;
    stop(&mut d).await;
    // The backlog, one batch of 100 events per round: an update, the held deletes, the
    // inserts, and the update whose mark shows the pipeline's depth.
    src.update_many(doc! {}, doc! {"$set": {"v": 1}})
        .await
        .unwrap();
    src.delete_many(doc! {}).await.unwrap();
    src.insert_many((0..100).map(|i| doc! {"_id": i, "v": 3}))
        .await
        .unwrap();
    let round_3_done = source_time(&c, "depth").await;
    src.update_many(doc! {}, doc! {"$set": {"v": 4}})
        .await
        .unwrap();
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["delete"], "blockConnection": true, "blockTimeMS": 4_000,
                     "namespace": "app.depth"}},
        )
        .unwrap();
    let mut d = Daemon::start(&c, dir.path(), config);
    let dst = c.dst.database("app").collection::<Document>("depth");
    wait_for_mark_after(&c, "round 4's mark is persisted", round_3_done).await;
    assert_eq!(
        dst.count_documents(doc! {"v": 1}).await.unwrap(),
        100,
        "round 4 was marked only after the held deletes were written, or a batch was written \
         before them; log:\n{}",
        d.logs()
    );
    d.kill9();
    // The held deletes still land (a server finishes a command whose client died): the
    // restart begins after them, as it would after a real crash.
    wait_until("the held deletes land", T, || async {
        dst.count_documents(doc! {}).await.unwrap() == 0
    })
    .await;
    let mut d = Daemon::start(&c, dir.path(), config);
    wait_until("round 4 is applied after the restart", T, || async {
        dst.count_documents(doc! {"v": 4}).await.unwrap() == 100
    })
    .await;
    stop(&mut d).await;
    assert_eq!(
        crate::support::cluster::dump(&c.dst, "app", "depth").await,
        crate::support::cluster::dump(&c.src, "app", "depth").await,
        "log:\n{}",
        d.logs()
    );
    assert_eq!(dead_letters(&c).await, Vec::<Document>::new());
}

//! Collection incarnations (namespace + collection UUID) never touch each other (DESIGN
//! §2.10): drop + re-create while the old worker lags, DDL while the daemon is stopped, the
//! start point of `initial_copy = "skip"`, collation mismatches, and the failures that park
//! one namespace instead of stopping the daemon.

use std::time::Duration;

use bson::{doc, Bson, Document};
use futures::TryStreamExt;

use crate::support::cluster::{dump, wait_converged, wait_until, Clusters, Daemon};

const CHECKPOINTS: (&str, &str) = ("mongo_syncd", "checkpoints");

/// Checkpoints of one source namespace.
async fn checkpoints(c: &Clusters, ns: &str) -> Vec<Document> {
    c.dst
        .database(CHECKPOINTS.0)
        .collection::<Document>(CHECKPOINTS.1)
        .find(doc! {"_id.ns": ns})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// The source collection's UUID.
async fn source_uuid(c: &Clusters, db: &str, coll: &str) -> Bson {
    let specs: Vec<Document> = c
        .src
        .database(db)
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    specs[0]
        .get_document("info")
        .unwrap()
        .get("uuid")
        .unwrap()
        .clone()
}

async fn collection_names(client: &mongodb::Client, db: &str) -> Vec<String> {
    let mut names = client.database(db).list_collection_names().await.unwrap();
    names.sort();
    names
}

/// `listCollections` options of a collection (`None` when it does not exist).
async fn options(client: &mongodb::Client, db: &str, coll: &str) -> Option<Document> {
    let specs: Vec<Document> = client
        .database(db)
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    specs
        .first()
        .map(|s| s.get_document("options").cloned().unwrap_or_default())
}

async fn index_names(client: &mongodb::Client, db: &str, coll: &str) -> Vec<String> {
    let specs: Vec<Document> = client
        .database(db)
        .run_cursor_command(doc! {"listIndexes": coll})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut names: Vec<String> = specs
        .iter()
        .map(|s| s.get_str("name").unwrap().to_string())
        .collect();
    names.sort();
    names
}

async fn insert_range(c: &Clusters, db: &str, coll: &str, ids: std::ops::Range<i32>, tag: &str) {
    c.src
        .database(db)
        .collection::<Document>(coll)
        .insert_many(ids.map(|i| doc! {"_id": i, "tag": tag}).collect::<Vec<_>>())
        .await
        .unwrap();
}

fn fail_point(c: &Clusters, data: Document) {
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": data},
        )
        .unwrap();
}

fn fail_point_off(c: &Clusters) {
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
}

/// Issue 9, item 3: the old worker still has a backlog (ending in its `drop`) when the
/// collection is re-created; it must not drop what the new incarnation copied, and its
/// "gone" report must not stop the new worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_and_recreate_while_the_old_worker_lags_keeps_the_new_collection() {
    let c = Clusters::start().await;
    insert_range(&c, "app", "c", 0..100, "old").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"app.*\"]\n\n[apply]\nbatch_max_events = 5\n",
    );
    wait_converged(&c, &[("app", "c")], Duration::from_secs(60)).await;
    d.wait_streaming("app.c").await;
    let old_uuid = source_uuid(&c, "app", "c").await;
    // Every destination update is slow: the old worker builds a backlog of 300 updates, then
    // its drop.
    fail_point(
        &c,
        doc! {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 300},
    );
    let coll = c.src.database("app").collection::<Document>("c");
    for i in 0..300 {
        coll.update_one(doc! {"_id": i % 100}, doc! {"$inc": {"n": 1}})
            .await
            .unwrap();
    }
    coll.drop().await.unwrap();
    insert_range(&c, "app", "c", 0..100, "new").await;
    let new_uuid = source_uuid(&c, "app", "c").await;
    assert_ne!(old_uuid, new_uuid);
    wait_until(
        "the new incarnation streams",
        Duration::from_secs(120),
        || async {
            checkpoints(&c, "app.c").await.iter().any(|cp| {
                cp.get_document("_id").unwrap().get("uuid") == Some(&new_uuid)
                    && cp.get_str("phase").ok() == Some("streaming")
            })
        },
    )
    .await;
    fail_point_off(&c);
    coll.insert_one(doc! {"_id": 1_000, "tag": "after"})
        .await
        .unwrap();
    wait_converged(&c, &[("app", "c")], Duration::from_secs(60)).await;
    // SIGTERM drains every worker: whatever the old incarnation still had to write has landed
    // once the process has exited.
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.all_logs());
    let diff = crate::support::cluster::diff(&c.src, &c.dst, ("app", "c"), ("app", "c")).await;
    assert_eq!(diff, None, "log:\n{}", d.all_logs());
    assert_eq!(dump(&c.dst, "app", "c").await.len(), 101);
    let cps = checkpoints(&c, "app.c").await;
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert_eq!(
        cps[0].get_document("_id").unwrap().get("uuid"),
        Some(&new_uuid)
    );
}

/// Starts a daemon on `app.*` and `tmp.*`, waits until `namespaces` are copied and
/// streaming, and stops it.
async fn sync_then_stop(
    c: &Clusters,
    dir: &std::path::Path,
    namespaces: &[(&str, &str)],
) -> Daemon {
    let mut d = Daemon::start(c, dir, "[sync]\nnamespaces = [\"app.*\", \"tmp.*\"]\n");
    wait_converged(c, namespaces, Duration::from_secs(60)).await;
    for (db, coll) in namespaces {
        d.wait_streaming(&format!("{db}.{coll}")).await;
    }
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    d
}

/// Issue 9, item 4: a drop while the daemon is stopped is applied at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_while_stopped_is_applied_at_start_up() {
    let c = Clusters::start().await;
    insert_range(&c, "app", "gone", 0..50, "x").await;
    insert_range(&c, "app", "keep", 0..50, "x").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = sync_then_stop(&c, dir.path(), &[("app", "gone"), ("app", "keep")]).await;
    c.src
        .database("app")
        .collection::<Document>("gone")
        .drop()
        .await
        .unwrap();
    d.spawn(&[]);
    wait_until(
        "app.gone dropped on the destination",
        Duration::from_secs(60),
        || async { collection_names(&c.dst, "app").await == ["keep"] },
    )
    .await;
    wait_until(
        "its checkpoint is finished",
        Duration::from_secs(30),
        || async { checkpoints(&c, "app.gone").await.is_empty() },
    )
    .await;
    insert_range(&c, "app", "keep", 50..60, "later").await;
    wait_converged(&c, &[("app", "keep")], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, item 4: a rename while the daemon is stopped drops the old name and copies the
/// new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_while_stopped_is_applied_at_start_up() {
    let c = Clusters::start().await;
    insert_range(&c, "app", "old_name", 0..50, "x").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = sync_then_stop(&c, dir.path(), &[("app", "old_name")]).await;
    c.src
        .database("admin")
        .run_command(doc! {"renameCollection": "app.old_name", "to": "app.new_name"})
        .await
        .unwrap();
    d.spawn(&[]);
    wait_until("the rename is applied", Duration::from_secs(60), || async {
        collection_names(&c.dst, "app").await == ["new_name"]
    })
    .await;
    wait_converged(&c, &[("app", "new_name")], Duration::from_secs(60)).await;
    wait_until(
        "the old name's checkpoint is finished",
        Duration::from_secs(30),
        || async { checkpoints(&c, "app.old_name").await.is_empty() },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, item 4: a dropDatabase while the daemon is stopped drops its synced collections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_database_while_stopped_is_applied_at_start_up() {
    let c = Clusters::start().await;
    insert_range(&c, "tmp", "a", 0..20, "x").await;
    insert_range(&c, "tmp", "b", 0..20, "x").await;
    insert_range(&c, "app", "keep", 0..20, "x").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = sync_then_stop(
        &c,
        dir.path(),
        &[("tmp", "a"), ("tmp", "b"), ("app", "keep")],
    )
    .await;
    c.src.database("tmp").drop().await.unwrap();
    d.spawn(&[]);
    wait_until(
        "tmp dropped on the destination",
        Duration::from_secs(60),
        || async { collection_names(&c.dst, "tmp").await.is_empty() },
    )
    .await;
    wait_until(
        "their checkpoints are finished",
        Duration::from_secs(30),
        || async {
            checkpoints(&c, "tmp.a").await.is_empty() && checkpoints(&c, "tmp.b").await.is_empty()
        },
    )
    .await;
    wait_converged(&c, &[("app", "keep")], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, item 4: after drop + re-create with other options while the daemon is stopped,
/// the destination collection is re-created with the new options: the old validator and
/// unique index are gone, and documents they would refuse are replicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreate_with_other_options_while_stopped_gets_the_new_options() {
    let c = Clusters::start().await;
    let app = c.src.database("app");
    app.run_command(doc! {"create": "v", "validator": {"v": {"$type": "int"}}})
        .await
        .unwrap();
    app.run_command(doc! {"createIndexes": "v", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]})
        .await
        .unwrap();
    let v = app.collection::<Document>("v");
    v.insert_many(
        (0..20)
            .map(|i| doc! {"_id": i, "v": i, "email": format!("u{i}")})
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_converged(&c, &[("app", "v")], Duration::from_secs(60)).await;
    // Unique indexes are built once replay has passed the copy's end.
    wait_until(
        "the old options are on the destination",
        Duration::from_secs(60),
        || async {
            index_names(&c.dst, "app", "v")
                .await
                .contains(&"email_1".to_string())
                && options(&c.dst, "app", "v")
                    .await
                    .is_some_and(|o| o.contains_key("validator"))
        },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    v.drop().await.unwrap();
    app.run_command(doc! {"create": "v"}).await.unwrap();
    // Documents the old validator and unique index would refuse.
    v.insert_many(
        (0..20)
            .map(|i| doc! {"_id": i, "v": format!("s{i}"), "email": "same"})
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    d.spawn(&[]);
    wait_converged(&c, &[("app", "v")], Duration::from_secs(60)).await;
    d.wait_streaming("app.v").await;
    assert_eq!(index_names(&c.dst, "app", "v").await, ["_id_"]);
    let dest_options = options(&c.dst, "app", "v").await.unwrap();
    assert!(
        !dest_options.contains_key("validator"),
        "options: {dest_options}"
    );
    let dead: u64 = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(dead, 0);
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, item 5: `initial_copy = "skip"` persists its start point before applying
/// anything; writes made after a SIGKILL that came before the first checkpoint are not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_copy_skip_persists_its_start_point() {
    let c = Clusters::start().await;
    insert_range(&c, "s", "items", 0..1, "seed").await;
    let dir = tempfile::tempdir().unwrap();
    // No idle checkpoint during the test: only the start point can be resumed from.
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"s.*\"]\ninitial_copy = \"skip\"\n\n[checkpoint]\ninterval_seconds = 600\n\n[supervisor]\nmax_backoff_seconds = 1\nmax_restarts = 50\n\n[shutdown]\ntimeout_seconds = 10\n",
    );
    d.wait_streaming("s.items").await;
    d.kill9();
    insert_range(&c, "s", "items", 1..21, "while stopped").await;
    d.spawn(&[]);
    wait_until(
        "the writes made while stopped are applied",
        Duration::from_secs(60),
        || async { dump(&c.dst, "s", "items").await.len() == 20 },
    )
    .await;
    insert_range(&c, "s", "items", 21..31, "after").await;
    wait_until("later writes too", Duration::from_secs(60), || async {
        dump(&c.dst, "s", "items").await.len() == 30
    })
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, item 8: a destination collection pre-created with another collation is detected
/// before copying: the namespace parks naming both collations; the others sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collation_mismatch_parks_the_namespace_naming_both_collations() {
    let c = Clusters::start().await;
    c.src
        .database("app")
        .run_command(doc! {"create": "ci", "collation": {"locale": "en", "strength": 2}})
        .await
        .unwrap();
    insert_range(&c, "app", "ci", 0..10, "x").await;
    insert_range(&c, "app", "plain", 0..10, "x").await;
    // Restored without options.
    c.dst
        .database("app")
        .run_command(doc! {"create": "ci"})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_until("app.ci parked", Duration::from_secs(60), || async {
        d.namespace_state("app.ci").await.as_deref() == Some("parked")
    })
    .await;
    let status = d.status().await.unwrap();
    let ci = &status["namespaces"]["app.ci"];
    assert_eq!(ci["parked_reason"], "collation_mismatch", "{ci}");
    let message = ci["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"en\"") && message.contains("simple"),
        "{message}"
    );
    assert!(dump(&c.dst, "app", "ci").await.is_empty());
    wait_converged(&c, &[("app", "plain")], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, item 8: with `sync.on_collation_mismatch = "recreate"` the destination collection
/// is re-created with the source's options, then copied. The source collection uses the
/// simple collation and the destination was pre-created with an ICU one: the simulator refuses
/// non-simple collations in reads (it does not implement them yet), and the copy reads the
/// source in the source collection's collation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collation_mismatch_is_recreated_when_configured() {
    let c = Clusters::start().await;
    insert_range(&c, "app", "ci", 0..10, "x").await;
    c.dst
        .database("app")
        .run_command(doc! {"create": "ci", "collation": {"locale": "en", "strength": 2}})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"app.*\"]\non_collation_mismatch = \"recreate\"\n",
    );
    wait_converged(&c, &[("app", "ci")], Duration::from_secs(60)).await;
    d.wait_streaming("app.ci").await;
    let options = options(&c.dst, "app", "ci").await.unwrap_or_default();
    assert!(
        options.get("collation").is_none(),
        "the destination keeps the source's (simple) collation: {options}"
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, liveness: a checkpoint that would move backwards parks that worker only; the
/// daemon and the other namespaces go on (DESIGN §2.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_moving_backwards_parks_only_that_worker() {
    let c = Clusters::start().await;
    insert_range(&c, "app", "a", 0..10, "x").await;
    insert_range(&c, "app", "b", 0..10, "x").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_converged(&c, &[("app", "a"), ("app", "b")], Duration::from_secs(60)).await;
    d.wait_streaming("app.a").await;
    d.wait_streaming("app.b").await;
    // Another writer moved app.a's checkpoint far ahead.
    c.dst
        .database(CHECKPOINTS.0)
        .collection::<Document>(CHECKPOINTS.1)
        .update_one(
            doc! {"_id.ns": "app.a"},
            doc! {"$set": {"applied_through": bson::Timestamp { time: u32::MAX - 1, increment: 0 }}},
        )
        .await
        .unwrap();
    insert_range(&c, "app", "a", 10..20, "after").await;
    wait_until("app.a parked", Duration::from_secs(60), || async {
        d.namespace_state("app.a").await.as_deref() == Some("parked")
    })
    .await;
    let status = d.status().await.unwrap();
    assert_eq!(
        status["namespaces"]["app.a"]["parked_reason"],
        "invariant_violated"
    );
    insert_range(&c, "app", "b", 10..20, "after").await;
    wait_converged(&c, &[("app", "b")], Duration::from_secs(60)).await;
    assert_eq!(
        d.namespace_state("app.b").await.as_deref(),
        Some("streaming")
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, liveness: code 13 (Unauthorized) on one namespace parks it with reason
/// `unauthorized` (the daemon does not exit 77); force-sync resumes it from its checkpoint and
/// reconciles, without a re-copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_on_one_namespace_parks_it_and_unparking_resumes_without_a_recopy() {
    let c = Clusters::start().await;
    insert_range(&c, "app", "a", 0..10, "x").await;
    insert_range(&c, "app", "b", 0..10, "x").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_converged(&c, &[("app", "a"), ("app", "b")], Duration::from_secs(60)).await;
    d.wait_streaming("app.a").await;
    d.wait_streaming("app.b").await;
    fail_point(
        &c,
        doc! {"failCommands": ["insert", "update"], "errorCode": 13, "namespace": "app.a"},
    );
    insert_range(&c, "app", "a", 10..20, "denied").await;
    wait_until("app.a parked", Duration::from_secs(60), || async {
        d.namespace_state("app.a").await.as_deref() == Some("parked")
    })
    .await;
    let status = d.status().await.unwrap();
    assert_eq!(
        status["namespaces"]["app.a"]["parked_reason"],
        "unauthorized"
    );
    insert_range(&c, "app", "b", 10..20, "after").await;
    wait_converged(&c, &[("app", "b")], Duration::from_secs(60)).await;
    // The privilege is granted again; force-sync un-parks.
    fail_point_off(&c);
    d.signal("USR1");
    wait_converged(&c, &[("app", "a")], Duration::from_secs(60)).await;
    d.wait_streaming("app.a").await;
    let logs = d.logs();
    assert!(
        logs.contains("parked worker restarting from its checkpoint"),
        "log:\n{logs}"
    );
    let copies = logs
        .lines()
        .filter(|l| l.contains("initial copy starting") && l.contains("app.a"))
        .count();
    assert_eq!(copies, 1, "app.a was copied once; log:\n{logs}");
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 9, liveness: the history-loss streak is persisted: two consecutive re-copies recorded
/// before a restart, then history lost again after it, park the namespace with
/// `oplog_too_small` instead of re-copying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_loss_streak_survives_restarts() {
    let c = Clusters::start_with_oplog(500).await;
    insert_range(&c, "h", "items", 0..50, "x").await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"h.*\"]\n");
    wait_converged(&c, &[("h", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("h.items").await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    // The daemon had re-copied twice in a row after history loss when it stopped.
    c.dst
        .database(CHECKPOINTS.0)
        .collection::<Document>(CHECKPOINTS.1)
        .update_one(
            doc! {"_id.ns": "h.items"},
            doc! {"$set": {"history_lost_recopies": 2}},
        )
        .await
        .unwrap();
    // The oplog wraps while it is stopped.
    let items = c.src.database("h").collection::<Document>("items");
    for i in 0..1_000 {
        items
            .update_one(doc! {"_id": i % 50}, doc! {"$set": {"v": i}})
            .await
            .unwrap();
    }
    d.spawn(&[]);
    wait_until("h.items parked", Duration::from_secs(60), || async {
        d.namespace_state("h.items").await.as_deref() == Some("parked")
    })
    .await;
    let status = d.status().await.unwrap();
    assert_eq!(
        status["namespaces"]["h.items"]["parked_reason"],
        "oplog_too_small"
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

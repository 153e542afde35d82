//! Stream scopes (DESIGN §2.11, issue 11 items 1–3): one shared change stream routed to the
//! per-collection workers, the exact handoff from a worker's own collection stream, and
//! watermark checkpoints that a restart resumes from.

use std::time::Duration;

use bson::{doc, Document};
use futures::StreamExt;
use mongodb::Client;

use crate::support::cluster::*;

/// Open cursors on the simulator (change streams, once every copy has finished).
async fn open_cursors(client: &Client) -> i64 {
    let status = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap();
    status
        .get_document("metrics")
        .and_then(|m| m.get_document("cursor"))
        .and_then(|c| c.get_document("open"))
        .map(|o| match o.get("total") {
            Some(bson::Bson::Int64(n)) => *n,
            Some(bson::Bson::Int32(n)) => *n as i64,
            _ => -1,
        })
        .unwrap_or(-1)
}

/// Update statements the destination has executed (checkpoints are replace-upserts).
/// Commands of kind `op` (`insert`, `update`, ...) the simulator has executed.
async fn executed(client: &Client, op: &str) -> i64 {
    let status = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap();
    let counters = status.get_document("opcounters").unwrap();
    match counters.get(op) {
        Some(bson::Bson::Int64(n)) => *n,
        Some(bson::Bson::Int32(n)) => *n as i64,
        _ => panic!("opcounters.{op} missing"),
    }
}

async fn seed(c: &Clusters, db: &str, collections: usize, docs: i32) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..collections {
        let name = format!("c{i:03}");
        let coll = c.src.database(db).collection::<Document>(&name);
        let batch: Vec<Document> = (0..docs).map(|k| doc! {"_id": k, "v": 0}).collect();
        if batch.is_empty() {
            c.src.database(db).create_collection(&name).await.unwrap();
        } else {
            coll.insert_many(batch).await.unwrap();
        }
        names.push(name);
    }
    names
}

/// Writes to every collection: updates, inserts and deletes.
async fn churn(c: &Clusters, db: &str, names: &[String], round: i32) {
    for name in names {
        let coll = c.src.database(db).collection::<Document>(name);
        coll.update_one(doc! {"_id": 0}, doc! {"$inc": {"v": 1}})
            .await
            .unwrap();
        coll.insert_one(doc! {"_id": 1000 + round, "r": round})
            .await
            .unwrap();
        coll.delete_one(doc! {"_id": 1}).await.unwrap();
    }
}

/// [`wait_converged`], printing the daemon's log when it does not converge.
async fn converged(c: &Clusters, d: &Daemon, namespaces: &[(&str, &str)], timeout: Duration) {
    let started = std::time::Instant::now();
    loop {
        let mut first = None;
        for (db, coll) in namespaces {
            if let Some(x) = diff(&c.src, &c.dst, (db, coll), (db, coll)).await {
                first = Some(x);
                break;
            }
        }
        match first {
            None => return,
            Some(x) if started.elapsed() > timeout => {
                panic!(
                    "not converged after {timeout:?}: {x}\nlog:\n{}",
                    d.all_logs()
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A daemon syncing `db.*` over one deployment stream; `extra` is TOML that follows the
/// `[sync]` namespaces line (more `[sync]` keys, or further sections).
fn start_on_deployment_stream(
    c: &Clusters,
    dir: &std::path::Path,
    db: &str,
    extra: &str,
) -> Daemon {
    Daemon::start(
        c,
        dir,
        &format!(
            "[source]\nstream_scope = \"deployment\"\n\n[sync]\nnamespaces = [\"{db}.*\"]\n{extra}"
        ),
    )
}

fn pairs<'a>(db: &'a str, names: &'a [String]) -> Vec<(&'a str, &'a str)> {
    names.iter().map(|n| (db, n.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_stream_serves_every_namespace_with_one_cursor_and_one_checkpoint_a_second() {
    let c = Clusters::start().await;
    let names = seed(&c, "many", 40, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_on_deployment_stream(&c, dir.path(), "many", "");
    converged(&c, &d, &pairs("many", &names), Duration::from_secs(90)).await;
    for n in &names {
        d.wait_streaming(&format!("many.{n}")).await;
    }
    wait_until(
        "every namespace reads the shared stream",
        Duration::from_secs(60),
        || async { d.logs().matches("joined the shared change stream").count() >= names.len() },
    )
    .await;
    for round in 0..3 {
        churn(&c, "many", &names, round).await;
    }
    converged(&c, &d, &pairs("many", &names), Duration::from_secs(60)).await;

    // Idle: one change-stream cursor on the source for 40 collections (a collection stream
    // per namespace would hold 40), and about one checkpoint write a second, not 40.
    wait_until(
        "the source holds one change-stream cursor",
        Duration::from_secs(30),
        || async { open_cursors(&c.src).await == 1 },
    )
    .await;
    let before = executed(&c.dst, "update").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_writes = executed(&c.dst, "update").await - before;
    assert!(
        idle_writes <= 15,
        "{idle_writes} update statements on the destination in 5 idle seconds"
    );
    // Lag of a quiet namespace follows the stream (idle marks), not its last event.
    let status = d.status().await.unwrap();
    let lag = status["namespaces"]["many.c000"]["lag_seconds"]
        .as_f64()
        .unwrap_or(f64::MAX);
    assert!(lag <= 2.0, "lag of a quiet namespace: {lag}");
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_the_shared_stream_skips_and_repeats_nothing() {
    let c = Clusters::start().await;
    let quiet = seed(&c, "j", 4, 3).await;
    let hot = c.src.database("j").collection::<Document>("hot");
    let docs: Vec<Document> = (0..3000).map(|k| doc! {"_id": k, "v": 0}).collect();
    hot.insert_many(docs).await.unwrap();

    // Writes flow while the hot collection copies, catches up on its own stream and joins.
    let writer = {
        let hot = hot.clone();
        tokio::spawn(async move {
            let mut k = 0i64;
            loop {
                hot.update_one(doc! {"_id": (k % 3000) as i32}, doc! {"$inc": {"v": 1}})
                    .await
                    .unwrap();
                hot.insert_one(doc! {"_id": format!("w{k}")}).await.unwrap();
                k += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_on_deployment_stream(&c, dir.path(), "j", "");
    // It joins either at once (the shared reader was behind it: it skips what it applied) or
    // after reading its own stream up to the reader's position: both must be exact.
    wait_until(
        "j.hot joins the shared change stream while writes flow",
        Duration::from_secs(90),
        || async {
            d.all_logs()
                .lines()
                .any(|l| l.contains("joined the shared change stream") && l.contains("j.hot"))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.abort();
    let _ = writer.await;
    hot.insert_one(doc! {"_id": "end"}).await.unwrap();
    let mut all = pairs("j", &quiet);
    all.push(("j", "hot"));
    converged(&c, &d, &all, Duration::from_secs(90)).await;

    // Every event after the copy's start was applied exactly once: count them on the source.
    let checkpoint = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints")
        .find_one(doc! {"_id.ns": "j.hot"})
        .await
        .unwrap()
        .expect("checkpoint of j.hot");
    let start: mongodb::change_stream::event::ResumeToken =
        bson::deserialize_from_document(checkpoint.get_document("start_token").unwrap().clone())
            .unwrap();
    let mut events = hot.watch().start_after(start).await.unwrap();
    let mut expected = 0u64;
    while let Some(ev) = events.next().await {
        let ev = ev.unwrap();
        expected += 1;
        let is_end = ev
            .document_key
            .as_ref()
            .and_then(|k| k.get_str("_id").ok())
            .is_some_and(|id| id == "end");
        if is_end {
            break;
        }
    }
    let applied_series = "mongo_syncd_events_applied_total{namespace=\"j.hot\"";
    wait_until(
        "the applied count settles",
        Duration::from_secs(10),
        || async { d.metric(applied_series).await.unwrap_or(0.0) as u64 >= expected },
    )
    .await;
    let applied = d.metric(applied_series).await.unwrap_or(0.0) as u64;
    assert_eq!(
        applied, expected,
        "events applied for j.hot vs change events after its copy started on the source"
    );
    // Every event's hold on the memory budget is released, those of the batches read across
    // the join (the own stream's read-ahead, then the shared stream's) included.
    d.wait_metric("mongo_syncd_buffered_bytes", 0.0, Duration::from_secs(10))
        .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_resumes_every_namespace_from_the_shared_watermark() {
    let c = Clusters::start().await;
    let names = seed(&c, "wm", 12, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_on_deployment_stream(&c, dir.path(), "wm", "");
    converged(&c, &d, &pairs("wm", &names), Duration::from_secs(90)).await;
    wait_until(
        "the shared stream's watermark is saved",
        Duration::from_secs(60),
        || async { watermark_namespaces(&c).await.len() >= names.len() },
    )
    .await;
    churn(&c, "wm", &names, 0).await;
    d.kill9();
    churn(&c, "wm", &names, 1).await;
    d.spawn(&[]);
    churn(&c, "wm", &names, 2).await;
    converged(&c, &d, &pairs("wm", &names), Duration::from_secs(90)).await;
    let second_run = d.logs();
    assert!(
        second_run.contains("shared change stream resumes from its watermark"),
        "log:\n{second_run}"
    );
    // `validate` knows quiet namespaces are applied through the stream's watermark (their own
    // checkpoints do not move): every namespace in sync, none indeterminate.
    let config = d.config_path.display().to_string();
    let report = tokio::task::spawn_blocking(move || {
        crate::support::run(&["validate", "--config", &config, "--wait-seconds", "30"])
    })
    .await
    .unwrap();
    assert_eq!(report.code, Some(0), "{}\n{}", report.stdout, report.stderr);
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Soak seed 350027: a batch failed while the batch before it was being checkpointed. With
/// batches in flight the worker told the shared stream it had applied every event it had
/// received, so the restarted worker took the reader's position as applied and never wrote
/// the failed batch's documents. Here the first batch's insert is held for 600 ms, the next
/// batches are read and started meanwhile, and the next insert fails once; one more event
/// makes the reader record where the worker left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_behind_a_checkpointed_one_is_written_after_the_restart() {
    let c = Clusters::start().await;
    let names = seed(&c, "inflight", 1, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_on_deployment_stream(
        &c,
        dir.path(),
        "inflight",
        "\n[apply]\nbatch_max_events = 2\n",
    );
    converged(&c, &d, &pairs("inflight", &names), Duration::from_secs(60)).await;
    wait_until(
        "the namespace reads the shared stream",
        Duration::from_secs(60),
        || async { d.logs().contains("joined the shared change stream") },
    )
    .await;
    let coll = c.src.database("inflight").collection::<Document>(&names[0]);
    let inserts_before = executed(&c.dst, "insert").await;
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["insert"], "blockConnection": true, "blockTimeMS": 600},
        })
        .unwrap();
    for k in 100..102 {
        coll.insert_one(doc! {"_id": k}).await.unwrap();
    }
    wait_until(
        "the first batch's insert is held at the destination",
        Duration::from_secs(30),
        || async { executed(&c.dst, "insert").await > inserts_before },
    )
    .await;
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["insert"], "errorCode": 189},
        })
        .unwrap();
    for k in 102..104 {
        coll.insert_one(doc! {"_id": k}).await.unwrap();
    }
    wait_until(
        "the batch behind the held one failed",
        Duration::from_secs(30),
        || async { d.logs().contains("worker failed; restarting") },
    )
    .await;
    // The reader learns that the worker left when it routes the namespace's next event.
    coll.insert_one(doc! {"_id": 200}).await.unwrap();
    converged(&c, &d, &pairs("inflight", &names), Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_reads_collection_streams_up_to_the_limit_and_one_shared_stream_beyond() {
    let c = Clusters::start().await;
    let names = seed(&c, "auto", 6, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[source]\ncollection_streams_max = 4\n\n[sync]\nnamespaces = [\"auto.*\"]\n",
    );
    converged(&c, &d, &pairs("auto", &names), Duration::from_secs(90)).await;
    wait_until(
        "six namespaces (over the limit of four) joined the shared stream",
        Duration::from_secs(60),
        || async { d.logs().matches("joined the shared change stream").count() >= names.len() },
    )
    .await;
    wait_until(
        "six namespaces (over the limit of four) share one stream",
        Duration::from_secs(60),
        || async { open_cursors(&c.src).await == 1 },
    )
    .await;
    churn(&c, "auto", &names, 0).await;
    converged(&c, &d, &pairs("auto", &names), Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());

    // At or under the limit, each namespace keeps its own collection stream.
    let c2 = Clusters::start().await;
    let few = seed(&c2, "auto", 3, 2).await;
    let dir2 = tempfile::tempdir().unwrap();
    let mut d2 = Daemon::start(
        &c2,
        dir2.path(),
        "[source]\ncollection_streams_max = 4\n\n[sync]\nnamespaces = [\"auto.*\"]\n",
    );
    converged(&c2, &d2, &pairs("auto", &few), Duration::from_secs(90)).await;
    wait_until(
        "three namespaces read three collection streams",
        Duration::from_secs(30),
        || async { open_cursors(&c2.src).await == 3 },
    )
    .await;
    assert!(!d2.logs().contains("joined the shared change stream"));
    assert_eq!(d2.terminate().await, Some(0), "log:\n{}", d2.logs());
}

/// The shared stream loses its history while the daemon runs (its getMore is held while the
/// oplog wraps): its namespaces re-copy, and a unique index created meanwhile, which no event
/// will bring, is built at the end of the replay although the namespace stays quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_stream_that_loses_its_history_recopies_with_what_changed_meanwhile() {
    let c = Clusters::start_with_oplog(40).await;
    let db = c.src.database("s5300");
    let a = db.collection::<Document>("a");
    a.insert_many([
        doc! {"_id": 1, "email": "e1"},
        doc! {"_id": 2, "email": "e2"},
    ])
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = start_on_deployment_stream(&c, dir.path(), "s5300", "");
    d.wait_streaming("s5300.a").await;
    wait_until(
        "s5300.a reads the shared stream",
        Duration::from_secs(30),
        || async { d.logs().contains("joined the shared change stream") },
    )
    .await;
    // The shared stream's next getMore is held while the oplog wraps past its position.
    c.source
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": {"times": 1},
            "data": {"failCommands": ["getMore"], "blockConnection": true, "blockTimeMS": 3000},
        })
        .unwrap();
    // The unique index is created while the history is lost: only the re-copy can build it.
    db.run_command(doc! {"createIndexes": "a", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]})
        .await
        .unwrap();
    // 100 writes elsewhere: a 40-entry oplog no longer holds the stream's position.
    let filler = c.src.database("s5300_filler").collection::<Document>("f");
    for i in 0..100 {
        filler.insert_one(doc! {"_id": i}).await.unwrap();
    }
    wait_until(
        "the shared stream lost its history and s5300.a was copied again",
        Duration::from_secs(60),
        || async { d.logs().matches("initial copy finished").count() >= 2 },
    )
    .await;
    wait_converged(&c, &[("s5300", "a")], Duration::from_secs(60)).await;
    wait_until(
        "the re-copied namespace builds its unique index while quiet",
        Duration::from_secs(30),
        || async {
            c.dst
                .database("s5300")
                .collection::<Document>("a")
                .list_index_names()
                .await
                .unwrap_or_default()
                .contains(&"email_1".to_string())
        },
    )
    .await;
}

/// `copy.concurrent_collections` (issue 11 item 6): however many namespaces start at once, at
/// most that many copy; the others wait in the copying state, shown in status, and every one
/// of them ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_at_once_are_bounded_by_the_copy_slots() {
    let c = Clusters::start().await;
    let names = seed(&c, "slots", 6, 500).await;
    // Every copied range takes at least 300 ms to write, so the copies overlap in time.
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {"failCommands": ["insert"], "appName": "mongo-syncd", "blockConnection": true, "blockTimeMS": 300},
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[copy]\nconcurrent_collections = 2\n\n[sync]\nnamespaces = [\"slots.*\"]\n",
    );
    let mut waiting_seen = 0usize;
    let all = pairs("slots", &names);
    let started = std::time::Instant::now();
    loop {
        let status = d.status().await.unwrap_or_default();
        let namespaces = status["namespaces"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let waiting = namespaces
            .values()
            .filter(|s| s["copy"]["waiting_for_slot"] == true)
            .count();
        waiting_seen = waiting_seen.max(waiting);
        if namespaces.len() == names.len() && namespaces.values().all(|s| s["state"] == "streaming")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not all streaming; log:\n{}",
            d.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The log orders each copy's start after its slot is taken and its end before the slot
    // is given back: counted in that order, never more than two run.
    let (mut running, mut most) = (0i32, 0i32);
    for line in d.all_logs().lines() {
        if line.contains("initial copy starting") {
            running += 1;
            most = most.max(running);
        } else if line.contains("initial copy finished") {
            running -= 1;
        }
    }
    assert_eq!(most, 2, "copies running at once; log:\n{}", d.all_logs());
    assert!(
        waiting_seen >= 1,
        "status never showed a namespace waiting for a copy slot"
    );
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    churn(&c, "slots", &names, 0).await;
    converged(&c, &d, &all, Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// The namespaces a shared stream's watermark records.
async fn watermark_namespaces(c: &Clusters) -> Vec<String> {
    let w = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("stream_checkpoints")
        .find_one(doc! {"_id.stream": "deployment"})
        .await
        .unwrap();
    let mut names: Vec<String> = w
        .and_then(|w| w.get_array("positions").ok().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.as_document()?.get_str("ns").ok().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// A collection dropped or renamed on the source while the daemon was stopped leaves the
/// shared stream's watermark at the next run (its position would otherwise be kept forever:
/// the watermark would grow with every collection that ever passed through the stream), and
/// the others still resume from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_gone_from_the_source_leave_the_watermark() {
    let c = Clusters::start().await;
    let names = seed(&c, "gone", 4, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_on_deployment_stream(&c, dir.path(), "gone", "");
    converged(&c, &d, &pairs("gone", &names), Duration::from_secs(90)).await;
    let all: Vec<String> = names.iter().map(|n| format!("gone.{n}")).collect();
    wait_until(
        "the watermark records every namespace",
        Duration::from_secs(60),
        || async { watermark_namespaces(&c).await == all },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    c.src
        .database("gone")
        .collection::<Document>("c000")
        .drop()
        .await
        .unwrap();
    c.src
        .database("admin")
        .run_command(doc! {"renameCollection": "gone.c001", "to": "gone.r001"})
        .await
        .unwrap();
    let remaining = vec!["c002".to_string(), "c003".to_string(), "r001".to_string()];
    churn(&c, "gone", &remaining, 0).await;
    d.spawn(&[]);
    let expected = vec![
        "gone.c002".to_string(),
        "gone.c003".to_string(),
        "gone.r001".to_string(),
    ];
    wait_until(
        "the watermark forgets the dropped and renamed-away collections",
        Duration::from_secs(60),
        || async { watermark_namespaces(&c).await == expected },
    )
    .await;
    churn(&c, "gone", &remaining, 1).await;
    converged(&c, &d, &pairs("gone", &remaining), Duration::from_secs(90)).await;
    assert!(
        d.logs()
            .contains("shared change stream resumes from its watermark"),
        "log:\n{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Issue 11 item 8: a plan that needs more source connections than `source.max_pool_size`
/// (collection streams hold one each) is named in the log instead of silently queueing,
/// and the copy still converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_plan_that_outgrows_the_source_pool_is_named_in_the_log() {
    let c = Clusters::start().await;
    let names = seed(&c, "pool", 4, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[source]\nstream_scope = \"collection\"\nmax_pool_size = 6\n\n[sync]\nnamespaces = [\"pool.*\"]\n",
    );
    converged(&c, &d, &pairs("pool", &names), Duration::from_secs(90)).await;
    wait_until(
        "the log names the pool the plan outgrows",
        Duration::from_secs(30),
        || async {
            d.logs().lines().any(|l| {
                l.contains("needs more source connections") && l.contains("max_pool_size=6")
            })
        },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// The events a shared stream of `d` has read, as its status shows (0 before it runs).
async fn shared_stream_read(d: &Daemon, stream: &str) -> u64 {
    d.status().await.unwrap()["shared_streams"][stream]["events_read"]
        .as_u64()
        .unwrap_or(0)
}

/// A deployment stream's `$match` lets through only the data events of the namespaces in
/// scope (issue 11 item 1): writes to another database and to an excluded collection never
/// reach the daemon. A reload that takes a new database in starts its worker, which joins the
/// stream; the stream reopens at its position with the wider scope and delivers every later
/// event of the new namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_streams_match_takes_in_only_the_namespaces_in_scope_and_widens_on_reload() {
    let c = Clusters::start().await;
    let shop = seed(&c, "shop", 3, 20).await;
    let noise = seed(&c, "noise", 1, 20).await;
    let skip = c.src.database("shop").collection::<Document>("skip");
    skip.insert_one(doc! {"_id": 0, "v": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_on_deployment_stream(&c, dir.path(), "shop", "exclude = [\"shop.skip\"]\n");
    converged(&c, &d, &pairs("shop", &shop), Duration::from_secs(60)).await;
    wait_until(
        "every namespace reads the shared stream",
        Duration::from_secs(60),
        || async { d.logs().matches("joined the shared change stream").count() >= shop.len() },
    )
    .await;
    let before = shared_stream_read(&d, "deployment").await;
    let noisy = c.src.database("noise").collection::<Document>(&noise[0]);
    for round in 0..200 {
        noisy
            .update_one(doc! {"_id": 0}, doc! {"$set": {"v": round}})
            .await
            .unwrap();
        skip.update_one(doc! {"_id": 0}, doc! {"$set": {"v": round}})
            .await
            .unwrap();
    }
    churn(&c, "shop", &shop, 0).await;
    converged(&c, &d, &pairs("shop", &shop), Duration::from_secs(60)).await;
    let read = shared_stream_read(&d, "deployment").await - before;
    // The churn: an update, an insert and a delete per collection; not one of the 400
    // out-of-scope writes.
    assert!(
        read <= 3 * shop.len() as u64 + 5,
        "the deployment stream read {read} events for {} writes in scope",
        3 * shop.len()
    );

    // Take the noise database in.
    let config = std::fs::read_to_string(&d.config_path).unwrap().replace(
        "namespaces = [\"shop.*\"]",
        "namespaces = [\"shop.*\", \"noise.*\"]",
    );
    std::fs::write(&d.config_path, config).unwrap();
    d.signal("HUP");
    let mut all = pairs("shop", &shop);
    all.extend(pairs("noise", &noise));
    converged(&c, &d, &all, Duration::from_secs(60)).await;
    wait_until(
        "the new namespace joins the shared stream",
        Duration::from_secs(60),
        || async { d.logs().matches("joined the shared change stream").count() > shop.len() },
    )
    .await;
    for round in 0..50 {
        noisy
            .update_one(doc! {"_id": 0}, doc! {"$set": {"v": 1000 + round}})
            .await
            .unwrap();
        noisy.insert_one(doc! {"_id": 5000 + round}).await.unwrap();
    }
    converged(&c, &d, &all, Duration::from_secs(60)).await;
    assert!(
        d.logs().contains("reopening the stream with the new scope"),
        "{}",
        d.logs()
    );
    assert_eq!(
        d.status().await.unwrap()["namespaces"]["noise.c000"]["change_stream"],
        "deployment",
        "{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

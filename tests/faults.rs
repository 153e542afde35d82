//! Faults: dropped connections, failing commands, a rejected document, a source restart and
//! an oplog too small for the backlog — each ends with an exact copy and counted errors.

use std::time::Duration;

use bson::{doc, Document};
use futures::TryStreamExt;

use crate::support::{
    cluster::{dump, wait_converged, wait_until, Clusters, Daemon},
    workload::{seed, Workload, NAMESPACES},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_getmore_connection_drops_lose_nothing() {
    let c = Clusters::start().await;
    seed(&c.src, 500).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "");
    for (db, coll) in NAMESPACES {
        d.wait_streaming(&format!("{db}.{coll}")).await;
    }
    let workload = Workload::start(&c.src, 2, Duration::from_millis(2), 5);
    for _ in 0..5 {
        c.source
            .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 2},
                "data": {"failCommands": ["getMore"], "closeConnection": true, "appName": "mongo-syncd"}})
            .unwrap();
        let before = workload.ops();
        wait_until("writes continue", Duration::from_secs(20), || async {
            workload.ops() > before + 200
        })
        .await;
    }
    workload.stop().await;
    wait_converged(&c, NAMESPACES, Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_destination_errors_are_retried_and_counted() {
    let c = Clusters::start().await;
    seed(&c.src, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "");
    for (db, coll) in NAMESPACES {
        d.wait_streaming(&format!("{db}.{coll}")).await;
    }
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 4},
            "data": {"failCommands": ["update", "delete"], "errorCode": 91, "errorLabels": ["RetryableWriteError"]}})
        .unwrap();
    let workload = Workload::start(&c.src, 2, Duration::from_millis(2), 6);
    wait_until("writes happen", Duration::from_secs(20), || async {
        workload.ops() > 600
    })
    .await;
    workload.stop().await;
    wait_converged(&c, NAMESPACES, Duration::from_secs(60)).await;
    let restarts = d
        .metric("mongo_syncd_worker_restarts_total")
        .await
        .unwrap_or(0.0);
    let logs = d.logs();
    assert!(
        logs.contains("worker failed; restarting after backoff"),
        "log:\n{logs}"
    );
    assert!(restarts >= 1.0, "restarts counted: {restarts}");
    let errors: f64 = {
        let (_, body) = d.get("/metrics").await.unwrap();
        body.lines()
            .filter(|l| {
                l.starts_with("mongo_syncd_errors_total{") && l.contains("kind=\"transient\"")
            })
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    };
    assert!(errors >= 1.0, "transient errors counted: {errors}");
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_the_destination_rejects_is_dead_lettered_and_the_stream_continues() {
    let c = Clusters::start().await;
    let src = c.src.database("app").collection::<Document>("users");
    src.insert_one(doc! {"_id": 1, "email": "a@example.com"})
        .await
        .unwrap();
    // The destination insists on an email; the source does not.
    c.dst
        .database("app")
        .run_command(
            doc! {"create": "users", "validator": {"$jsonSchema": {"required": ["email"]}}},
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    d.wait_streaming("app.users").await;
    src.insert_one(doc! {"_id": 2, "name": "no email"})
        .await
        .unwrap();
    src.insert_one(doc! {"_id": 3, "email": "c@example.com"})
        .await
        .unwrap();
    let dst = c.dst.database("app").collection::<Document>("users");
    wait_until(
        "the document after the rejected one arrives",
        Duration::from_secs(30),
        || async { dst.find_one(doc! {"_id": 3}).await.unwrap().is_some() },
    )
    .await;
    assert!(dst.find_one(doc! {"_id": 2}).await.unwrap().is_none());
    let dead = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .find_one(doc! {"doc_id": 2})
        .await
        .unwrap()
        .expect("dead letter recorded");
    assert_eq!(dead.get_str("ns").unwrap(), "app.users");
    assert_eq!(
        dead.get_document("error").unwrap().get_i32("code").unwrap(),
        121
    );
    assert_eq!(
        dead.get_document("document")
            .unwrap()
            .get_str("name")
            .unwrap(),
        "no email"
    );
    assert_eq!(
        d.metric("mongo_syncd_dead_letters_total{namespace=\"app.users\"}")
            .await,
        Some(1.0)
    );
    assert!(d.logs().contains("recorded as a dead letter"));
    assert!(
        !d.logs().contains("no email"),
        "document contents must not be logged"
    );
    assert_eq!(d.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restart_is_survived() {
    let c = Clusters::start().await;
    seed(&c.src, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "");
    for (db, coll) in NAMESPACES {
        d.wait_streaming(&format!("{db}.{coll}")).await;
    }
    let workload = Workload::start(&c.src, 2, Duration::from_millis(2), 7);
    wait_until("writes happen", Duration::from_secs(20), || async {
        workload.ops() > 300
    })
    .await;
    c.source.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // the primary is down for a while
    c.source.restart().await.unwrap();
    let before = workload.ops();
    wait_until("writes resume", Duration::from_secs(30), || async {
        workload.ops() > before + 300
    })
    .await;
    workload.stop().await;
    wait_converged(&c, NAMESPACES, Duration::from_secs(90)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oplog_too_small_for_the_backlog_triggers_a_recopy() {
    let c = Clusters::start_with_oplog(3_000).await;
    let items = c.src.database("big").collection::<Document>("items");
    let docs: Vec<Document> = (0..20_000).map(|i| doc! {"_id": i, "v": i}).collect();
    items.insert_many(docs).await.unwrap();
    // A slow destination: the copy takes long enough for the oplog to wrap under it.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 300}},
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"big.*\"]\n");
    wait_until("the copy started", Duration::from_secs(30), || async {
        d.namespace_state("big.items").await.as_deref() == Some("copying")
    })
    .await;
    // Overflow the oplog while the copy runs.
    for i in 0..4_000 {
        items
            .update_one(doc! {"_id": i}, doc! {"$set": {"v": -i}})
            .await
            .unwrap();
    }
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    wait_until(
        "history loss detected and re-copied",
        Duration::from_secs(90),
        || async {
            d.logs()
                .contains("change stream history lost; re-copying the namespace")
        },
    )
    .await;
    wait_converged(&c, &[("big", "items")], Duration::from_secs(120)).await;
    let lost = d
        .metric("mongo_syncd_errors_total{kind=\"history_lost\",namespace=\"big.items\"}")
        .await
        .or(d
            .metric("mongo_syncd_errors_total{namespace=\"big.items\",kind=\"history_lost\"}")
            .await)
        .unwrap_or(0.0);
    assert!(lost >= 1.0, "history loss counted: {lost}");
    d.wait_streaming("big.items").await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_failing_is_parked_then_revived_by_force_sync() {
    let c = Clusters::start().await;
    let items = c.src.database("p").collection::<Document>("items");
    items.insert_one(doc! {"_id": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"p.*\"]\n\n[checkpoint]\ninterval_seconds = 1\n\n[supervisor]\nmax_restarts = 2\nmax_backoff_seconds = 1\n\n[shutdown]\ntimeout_seconds = 10\n",
    );
    d.wait_streaming("p.items").await;
    // The destination refuses every write of the daemon.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "errorCode": 91, "appName": "mongo-syncd"}},
        )
        .unwrap();
    items.insert_one(doc! {"_id": 1}).await.unwrap();
    wait_until(
        "parked after max_restarts",
        Duration::from_secs(60),
        || async { d.namespace_state("p.items").await.as_deref() == Some("parked") },
    )
    .await;
    let status = d.status().await.unwrap();
    assert_eq!(
        status["namespaces"]["p.items"]["parked_reason"],
        "max_restarts"
    );
    let (code, body) = d.get("/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("p.items: parked (max_restarts)"), "{body}");
    assert_eq!(
        d.metric("mongo_syncd_worker_state{namespace=\"p.items\",state=\"parked\"}")
            .await,
        Some(1.0)
    );
    assert!(d.logs().contains("worker parked"), "log:\n{}", d.logs());
    // Fix the cause, then force-sync: the worker restarts with a fresh copy and catches up.
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    d.signal("USR1");
    wait_converged(&c, &[("p", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("p.items").await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_loss_parks_when_configured_to() {
    let c = Clusters::start_with_oplog(500).await;
    let items = c.src.database("h").collection::<Document>("items");
    items
        .insert_many((0..5_000).map(|i| doc! {"_id": i}).collect::<Vec<_>>())
        .await
        .unwrap();
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 300, "appName": "mongo-syncd"}})
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"h.*\"]\non_history_lost = \"park\"\n",
    );
    wait_until("copying", Duration::from_secs(30), || async {
        d.namespace_state("h.items").await.as_deref() == Some("copying")
    })
    .await;
    for i in 0..1_000 {
        items
            .update_one(doc! {"_id": i}, doc! {"$set": {"v": i}})
            .await
            .unwrap();
    }
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    wait_until("parked: history lost", Duration::from_secs(60), || async {
        d.status()
            .await
            .is_some_and(|s| s["namespaces"]["h.items"]["parked_reason"] == "history_lost")
    })
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Soak seeds 11651-11700 (60-minute run): the daemon was restarted while `failCommand` failed
/// the destination's writes with HostUnreachable; recording the metadata epoch failed twice
/// (the driver's one retry included) and the daemon exited instead of waiting, as it does for
/// the connection checks. Start-up metadata steps now retry transient failures with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_destination_errors_while_starting_are_waited_out() {
    let c = Clusters::start().await;
    c.src
        .database("app")
        .collection::<Document>("items")
        .insert_many((0..10).map(|i| doc! {"_id": i}))
        .await
        .unwrap();
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": {"times": 4},
            "data": {"failCommands": ["update"], "namespace": "mongo_syncd.identity",
                     "errorCode": 6, "errorLabels": ["RetryableWriteError"], "appName": "mongo-syncd"}})
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_converged(&c, &[("app", "items")], Duration::from_secs(60)).await;
    assert!(
        d.logs().contains("waiting for the destination cluster"),
        "the failure was met and waited out:\n{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// A backlog is written in concurrent lanes (a round's statements of one kind cut into
/// several commands): a lane that fails replays the batch, and a document a lane's command
/// rejects is dead-lettered as itself — error indexes map back to the right statement —
/// for inserts, deltas and deletes alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_written_in_concurrent_lanes_converges_and_dead_letters_the_right_document() {
    let c = Clusters::start().await;
    let src = c.src.database("app").collection::<Document>("lanes");
    src.insert_many((0..1_000).map(|i| doc! {"_id": i, "v": 1}))
        .await
        .unwrap();
    // The destination refuses one value the source accepts.
    c.dst
        .database("app")
        .run_command(doc! {"create": "lanes", "validator": {"v": {"$ne": 666}}})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = "[sync]\nnamespaces = [\"app.lanes\"]\n";
    let mut d = Daemon::start(&c, dir.path(), config);
    d.wait_streaming("app.lanes").await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    // The backlog: 3,000 inserts, 3,000 deltas, 1,000 deletes; batches of 1,000 events on
    // distinct documents, so every batch goes out in four lanes. `_id` 3600 is the 601st
    // insert of its batch: the third lane.
    src.insert_many((1_000..4_000).map(|i| doc! {"_id": i, "v": if i == 3_600 { 666 } else { 1 }}))
        .await
        .unwrap();
    src.update_many(doc! {"_id": {"$gte": 1_000}}, doc! {"$set": {"w": 2}})
        .await
        .unwrap();
    src.delete_many(doc! {"_id": {"$lt": 1_000}}).await.unwrap();
    // One command of each kind fails once (a transient error): its batch is replayed.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": {"times": 3},
            "data": {"failCommands": ["insert", "update", "delete"], "errorCode": 91,
                     "errorLabels": ["RetryableWriteError"], "namespace": "app.lanes"}},
        )
        .unwrap();
    let mut d = Daemon::start(&c, dir.path(), config);
    let dst = c.dst.database("app").collection::<Document>("lanes");
    wait_until(
        "the backlog is applied",
        Duration::from_secs(90),
        || async {
            dst.count_documents(doc! {}).await.unwrap() == 2_999
                && dst.count_documents(doc! {"w": 2}).await.unwrap() == 2_999
        },
    )
    .await;
    let expected: Vec<_> = dump(&c.src, "app", "lanes")
        .await
        .into_iter()
        .filter(|d| d.get_i32("_id").ok() != Some(3_600))
        .collect();
    assert_eq!(dump(&c.dst, "app", "lanes").await, expected);
    let dead: Vec<Document> = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .find(doc! {"ns": "app.lanes"})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!dead.is_empty(), "log:\n{}", d.logs());
    for letter in &dead {
        assert_eq!(
            letter.get("doc_id"),
            Some(&bson::Bson::Int32(3_600)),
            "{letter}"
        );
    }
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

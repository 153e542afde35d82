//! Crash safety: the daemon killed with SIGKILL at random points, under a running workload,
//! converges exactly after restarts; an interrupted copy resumes from its last range.

use std::time::Duration;

use bson::{doc, Document};
use rand::{Rng, SeedableRng};

use crate::support::{
    cluster::{wait_converged, wait_until, Clusters, Daemon},
    workload::{seed, Workload, NAMESPACES},
};

async fn checkpoint(c: &Clusters, ns: &str) -> Option<Document> {
    c.dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints")
        .find_one(doc! {"_id.ns": ns})
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_under_load_converges_exactly() {
    let c = Clusters::start().await;
    seed(&c.src, 25_000).await;
    let workload = Workload::start(&c.src, 2, Duration::from_millis(1), 99);
    let dir = tempfile::tempdir().unwrap();
    // One lane, and every write of `shop.orders` held 300 ms by the destination during the
    // copy rounds: the copy must last long enough for the first kills to land in it, however
    // fast the machine (parallel lanes have their own SIGKILL test below). A write a kill
    // leaves blocked lands after the kill, as a real in-flight write can.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["insert", "update"], "namespace": "shop.orders",
                     "blockConnection": true, "blockTimeMS": 300}},
        )
        .unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[apply]\nbatch_max_events = 200\n\n[copy]\nparallel_ranges = 1\n",
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let mut phases = Vec::new();
    for round in 0..12 {
        // The first kills land during the copy (after a range or two), the rest at random
        // points while streaming, where a kill often falls between a batch and its checkpoint.
        let want = if round < 4 { "copying" } else { "streaming" };
        if round == 4 {
            c.dest
                .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
                .unwrap();
        }
        wait_until(
            &format!("round {round}: phase {want}"),
            Duration::from_secs(60),
            || async {
                // A copy in parallel lanes may finish between two early kills: streaming is
                // then where the next kill lands (the assertion below still wants one kill
                // during the copy).
                checkpoint(&c, "shop.orders").await.is_some_and(|cp| {
                    let phase = cp.get_str("phase").ok();
                    (phase == Some(want) || phase == Some("streaming"))
                        && (phase == Some("streaming")
                            || cp
                                .get_document("copy")
                                .ok()
                                .and_then(|c| c.get_i64("copied").ok())
                                .unwrap_or(0)
                                > 0)
                })
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(
            rng.random_range(0..if round < 4 { 200 } else { 1500 }),
        ))
        .await;
        phases.push(
            checkpoint(&c, "shop.orders")
                .await
                .unwrap()
                .get_str("phase")
                .unwrap()
                .to_string(),
        );
        d.kill9();
        if round < 11 {
            d.spawn(&[]);
        }
    }
    assert!(
        phases.iter().any(|p| p == "copying"),
        "some kills landed during the copy: {phases:?}"
    );
    assert!(
        phases.iter().any(|p| p == "streaming"),
        "some kills landed while streaming: {phases:?}"
    );
    d.spawn(&[]);
    wait_until(
        "the workload keeps running",
        Duration::from_secs(30),
        || async { workload.ops() > 3000 },
    )
    .await;
    workload.stop().await;
    wait_converged(&c, NAMESPACES, Duration::from_secs(120)).await;
    let logs = d.all_logs();
    assert!(
        !logs.contains("would move backwards"),
        "a checkpoint tried to move backwards"
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_copy_resumes_from_its_last_range_not_from_zero() {
    let c = Clusters::start().await;
    let coll = c.src.database("big").collection::<Document>("items");
    for chunk in 0..6 {
        let docs: Vec<Document> = (0..10_000)
            .map(|i| doc! {"_id": chunk * 10_000 + i, "v": i})
            .collect();
        coll.insert_many(docs).await.unwrap();
    }
    // Slow the destination down so the copy is certainly caught in the middle.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 400}},
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"big.*\"]\n");
    wait_until(
        "at least one range copied",
        Duration::from_secs(60),
        || async {
            match checkpoint(&c, "big.items").await {
                Some(cp) => {
                    let copy = cp.get_document("copy").unwrap();
                    copy.get_i64("copied").unwrap_or(0) > 0
                        && !copy.get_bool("done").unwrap_or(false)
                }
                None => false,
            }
        },
    )
    .await;
    d.kill9();
    let copied_before = checkpoint(&c, "big.items")
        .await
        .unwrap()
        .get_document("copy")
        .unwrap()
        .get_i64("copied")
        .unwrap();
    assert!(
        (10_000..60_000).contains(&copied_before),
        "copied before the kill: {copied_before}"
    );
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    d.spawn(&[]);
    wait_converged(&c, &[("big", "items")], Duration::from_secs(120)).await;
    let logs = d.logs();
    assert!(
        logs.contains("initial copy resuming from its last finished range"),
        "log:\n{logs}"
    );
    // The second run copied only what was left: its counter is below the collection size.
    let copied_after = d
        .metric("mongo_syncd_initial_sync_documents_copied_total{namespace=\"big.items\"}")
        .await
        .unwrap();
    assert!(
        copied_after as i64 <= 60_000 - copied_before,
        "second run copied {copied_after} documents, first run {copied_before}: the copy restarted from zero"
    );
    let cp = checkpoint(&c, "big.items").await.unwrap();
    assert_eq!(
        cp.get_document("copy").unwrap().get_i64("copied").unwrap(),
        60_000
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// `copy.parallel_ranges` (issue 11 item 6): a large collection is cut into lanes at evenly
/// spaced `_id`s, across `_id` types; a SIGKILL leaves each lane at its own last range, and the
/// restarted copy finishes every lane without copying a range twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_in_parallel_lanes_resumes_every_lane_where_it_stopped() {
    let c = Clusters::start().await;
    let coll = c.src.database("big").collection::<Document>("mixed");
    // Numbers, then strings, in `_id` order: a lane boundary falls between the types.
    coll.insert_many((0..25_000).map(|i| doc! {"_id": i, "v": i}))
        .await
        .unwrap();
    coll.insert_many((0..20_000).map(|i| doc! {"_id": format!("s{i:05}"), "v": i}))
        .await
        .unwrap();
    // Checkpoint writes are slowed so the copy is caught in the middle.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": 300}},
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"big.*\"]\n\n[copy]\nparallel_ranges = 4\n",
    );
    let lanes_of = |cp: &Document| -> Vec<Document> {
        cp.get_document("copy")
            .ok()
            .and_then(|c| c.get_array("lanes").ok())
            .map(|a| a.iter().filter_map(|l| l.as_document().cloned()).collect())
            .unwrap_or_default()
    };
    wait_until(
        "a lane has copied a range",
        Duration::from_secs(60),
        || async {
            match checkpoint(&c, "big.mixed").await {
                Some(cp) => lanes_of(&cp).iter().any(|l| {
                    l.get_array("next").is_ok_and(|n| !n.is_empty())
                        || l.get_bool("done").unwrap_or(false)
                }),
                None => false,
            }
        },
    )
    .await;
    d.kill9();
    let cp = checkpoint(&c, "big.mixed").await.unwrap();
    let lanes = lanes_of(&cp);
    assert_eq!(lanes.len(), 4, "lanes: {lanes:?}");
    assert!(
        !cp.get_document("copy").unwrap().get_bool("done").unwrap(),
        "the copy finished before the kill"
    );
    let copied_before = cp.get_document("copy").unwrap().get_i64("copied").unwrap();
    // Consecutive lanes meet: each one's upper bound is the next one's first lower bound.
    assert!(lanes[0].get_array("upper").unwrap().len() == 1);
    assert!(lanes[3].get_array("upper").unwrap().is_empty());
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    d.spawn(&[]);
    wait_converged(&c, &[("big", "mixed")], Duration::from_secs(120)).await;
    let logs = d.all_logs();
    assert!(
        logs.contains("copying in parallel range lanes"),
        "log:\n{logs}"
    );
    let cp = checkpoint(&c, "big.mixed").await.unwrap();
    assert_eq!(
        cp.get_document("copy").unwrap().get_i64("copied").unwrap(),
        45_000,
        "every document counted once across the two runs"
    );
    let copied_after = d
        .metric("mongo_syncd_initial_sync_documents_copied_total{namespace=\"big.mixed\"}")
        .await
        .unwrap();
    assert_eq!(copied_after as i64, 45_000 - copied_before);
    assert!(lanes_of(&cp)
        .iter()
        .all(|l| l.get_bool("done").unwrap_or(false)));
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

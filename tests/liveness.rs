//! Worker liveness and bookkeeping (issue 9): replays after a crash, bounded extras scans,
//! settings reloaded into running workers, the reader watchdog, coalesced and cancellable
//! force-syncs.

use std::time::{Duration, Instant};

use bson::{doc, Document};

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

const APP: (&str, &str) = ("app", "items");

/// Test settings without idle checkpoints (the interval is an hour), so the only checkpoint
/// writes are the ones after each batch.
fn settings(extra: &str) -> String {
    format!(
        "[sync]\nnamespaces = [\"app.*\"]\n\n{extra}\n\n[checkpoint]\ninterval_seconds = 3600\n\n[supervisor]\nmax_backoff_seconds = 1\nmax_restarts = 50\n\n[log]\nlevel = \"info\"\n"
    )
}

fn items(client: &mongodb::Client) -> mongodb::Collection<Document> {
    client.database(APP.0).collection(APP.1)
}

/// Lines of the current run's log containing `needle`.
fn count_lines(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

/// The checkpoint of `app.items`.
async fn checkpoint(c: &Clusters) -> Option<Document> {
    c.dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints")
        .find_one(doc! {"_id.ns": "app.items"})
        .await
        .unwrap()
}

/// Writes a sentinel document on the source and waits for it on the destination.
async fn barrier(c: &Clusters, id: &str) {
    items(&c.src).insert_one(doc! {"_id": id}).await.unwrap();
    let dst = items(&c.dst);
    wait_until("the sentinel arrives", Duration::from_secs(60), || async {
        dst.find_one(doc! {"_id": id}).await.unwrap().is_some()
    })
    .await;
}

async fn conflicts_total(d: &Daemon) -> f64 {
    d.metric("mongo_syncd_conflicts_total{")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_batch_and_its_checkpoint_replays_without_false_conflicts() {
    let c = Clusters::start().await;
    c.src
        .database("app")
        .run_command(doc! {"create": "items", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    items(&c.src)
        .insert_one(doc! {"_id": 0, "v": 0})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        // A batch waits 3 s for more events: the insert and the update below are one batch.
        &settings("[conflict]\npolicy = \"destination-wins\"\n\n[apply]\nbatch_max_wait_ms = 3000\n\n[shutdown]\ntimeout_seconds = 10"),
    );
    d.wait_streaming("app.items").await;
    // Past the copy's replay window: conflicts are detected from here on.
    let warm_up = bson::DateTime::now();
    barrier(&c, "warm-up").await;
    wait_until(
        "the warm-up batch is checkpointed",
        Duration::from_secs(60),
        || async {
            checkpoint(&c)
                .await
                .and_then(|cp| cp.get_datetime("updated_at").ok().copied())
                .is_some_and(|at| at > warm_up)
        },
    )
    .await;
    // Every checkpoint write now hangs: the next batch is applied, its checkpoint never lands.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "namespace": "mongo_syncd.checkpoints",
                     "blockConnection": true, "blockTimeMS": 30_000}},
        )
        .unwrap();
    let cp_before = checkpoint(&c).await.unwrap();
    items(&c.src)
        .insert_one(doc! {"_id": 1, "v": 1})
        .await
        .unwrap();
    items(&c.src)
        .update_one(doc! {"_id": 1}, doc! {"$set": {"v": 2}})
        .await
        .unwrap();
    let dst = items(&c.dst);
    wait_until("the batch is applied", Duration::from_secs(60), || async {
        dst.find_one(doc! {"_id": 1})
            .await
            .unwrap()
            .is_some_and(|doc| doc.get_i32("v").ok() == Some(2))
    })
    .await;
    // Give the blocked checkpoint write time to be attempted (it hangs for 30 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        checkpoint(&c).await.unwrap().get("resume_token"),
        cp_before.get("resume_token"),
        "the checkpoint must still be the one before the batch"
    );
    assert_eq!(
        conflicts_total(&d).await,
        0.0,
        "no conflict before the crash"
    );
    d.kill9();
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    d.spawn(&[]);
    d.wait_streaming("app.items").await;
    // The re-read batch has been applied again once a later event is through.
    barrier(&c, "after-restart").await;
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;
    let journal = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("conflicts")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(
        journal,
        0,
        "replays were journaled as conflicts; log:\n{}",
        d.all_logs()
    );
    assert_eq!(conflicts_total(&d).await, 0.0, "log:\n{}", d.all_logs());
    let dead = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(dead, 0);
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Peak resident memory of a process (kB), from `/proc/<pid>/status`.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_copy_range_deletes_many_destination_extras_in_bounded_memory() {
    const EXTRAS: usize = 24_000;
    const ID_BYTES: usize = 4_000;
    let c = Clusters::start().await;
    items(&c.src)
        .insert_many((0..10).map(|i| doc! {"_id": format!("k{i:03}"), "v": i}))
        .await
        .unwrap();
    // The destination holds ~96 MB of extra `_id`s, all inside the copy's last range.
    let pad = "x".repeat(ID_BYTES);
    for chunk in 0..(EXTRAS / 1_000) {
        items(&c.dst)
            .insert_many(
                (0..1_000).map(|i| doc! {"_id": format!("z{:06}{pad}", chunk * 1_000 + i)}),
            )
            .await
            .unwrap();
    }
    // The extras interleave with the source's documents too.
    items(&c.dst)
        .insert_many((0..10).map(|i| doc! {"_id": format!("k{i:03}-extra")}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The guard would (rightly) pause a copy deleting 24,000 of 24,010 documents: this test is
    // about the memory of the extras scan, so it is off here.
    let mut d = Daemon::start(&c, dir.path(), &settings("max_delete_fraction = 1.0"));
    wait_converged(&c, &[APP], Duration::from_secs(240)).await;
    d.wait_streaming("app.items").await;
    // Bounded: the daemon's whole peak (binary and runtime included) stays below the size of
    // the extras' `_id`s alone, so it never held them all at once.
    let peak_mb = peak_rss_kb(d.pid()) / 1024;
    let extras_mb = (EXTRAS * ID_BYTES / (1024 * 1024)) as u64;
    assert!(
        peak_mb < extras_mb,
        "peak RSS {peak_mb} MB >= {extras_mb} MB of extra _ids: the extras scan held them all at once"
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_policy_and_batch_size_of_running_workers() {
    let c = Clusters::start().await;
    c.src
        .database("app")
        .run_command(doc! {"create": "items", "changeStreamPreAndPostImages": {"enabled": true}})
        .await
        .unwrap();
    items(&c.src)
        .insert_many((0..5).map(|i| doc! {"_id": i, "v": 0}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &settings("[apply]\nbatch_max_events = 1000\nbatch_max_wait_ms = 500"),
    );
    d.wait_streaming("app.items").await;
    barrier(&c, "warm-up").await;
    let batches = "mongo_syncd_apply_batch_duration_seconds_count";
    // Source-wins: a destination change is overwritten.
    items(&c.dst)
        .update_one(doc! {"_id": 1}, doc! {"$set": {"v": 100}})
        .await
        .unwrap();
    items(&c.src)
        .update_one(doc! {"_id": 1}, doc! {"$set": {"v": 1}})
        .await
        .unwrap();
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;

    let config = std::fs::read_to_string(&d.config_path).unwrap().replace(
        "[apply]\nbatch_max_events = 1000",
        "[conflict]\npolicy = \"destination-wins\"\n\n[apply]\nbatch_max_events = 1",
    );
    std::fs::write(&d.config_path, config).unwrap();
    d.signal("HUP");
    d.wait_metric(
        "mongo_syncd_config_reloads_total{result=\"success\"}",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    // The new settings take effect at the worker's next batch boundary.
    barrier(&c, "after-reload").await;

    // Destination-wins: a destination change is kept.
    items(&c.dst)
        .update_one(doc! {"_id": 2}, doc! {"$set": {"v": 200}})
        .await
        .unwrap();
    items(&c.src)
        .update_one(doc! {"_id": 2}, doc! {"$set": {"v": 2}})
        .await
        .unwrap();
    // One event per batch: 20 inserts in one command are 20 batches.
    let before = d.metric(batches).await.unwrap_or(0.0);
    items(&c.src)
        .insert_many((100..120).map(|i| doc! {"_id": i}))
        .await
        .unwrap();
    d.wait_metric_at_least("mongo_syncd_conflicts_total{", 1.0, Duration::from_secs(60))
        .await;
    let dst = items(&c.dst);
    wait_until("the 20 inserts arrive", Duration::from_secs(60), || async {
        dst.count_documents(doc! {"_id": {"$gte": 100, "$lt": 120}})
            .await
            .unwrap()
            == 20
    })
    .await;
    let after = d.metric(batches).await.unwrap_or(0.0);
    assert!(
        after - before >= 20.0,
        "batch_max_events = 1 applies one event per batch: {} batches",
        after - before
    );
    assert_eq!(
        dst.find_one(doc! {"_id": 2})
            .await
            .unwrap()
            .unwrap()
            .get_i32("v")
            .ok(),
        Some(200),
        "destination-wins keeps the destination's change"
    );
    let logs = d.logs();
    assert_eq!(
        count_lines(&logs, "starting worker"),
        1,
        "no worker restart:\n{logs}"
    );
    assert_eq!(
        d.metric("mongo_syncd_worker_restarts_total")
            .await
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_getmore_that_never_answers_is_abandoned_and_the_stream_resumes() {
    let c = Clusters::start().await;
    items(&c.src).insert_one(doc! {"_id": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), &settings(""));
    d.wait_streaming("app.items").await;
    barrier(&c, "warm-up").await;
    // A half-open connection: the next awaiting getMore gets no answer for two minutes.
    c.source
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["getMore"], "appName": "mongo-syncd",
                     "blockConnection": true, "blockTimeMS": 120_000}},
        )
        .unwrap();
    // Let the blocked getMore be issued, then write behind it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    items(&c.src)
        .insert_many((1..=50).map(|i| doc! {"_id": i}))
        .await
        .unwrap();
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;
    assert!(
        d.logs().contains("change stream stalled"),
        "log:\n{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_sync_requests_while_a_worker_is_busy_are_coalesced() {
    let c = Clusters::start().await;
    items(&c.src)
        .insert_many((0..100).map(|i| doc! {"_id": i, "v": i}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &settings("[shutdown]\ntimeout_seconds = 60"),
    );
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;
    d.wait_streaming("app.items").await;
    // Every reconcile spends 3 s writing its range.
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "namespace": "app.items",
                     "blockConnection": true, "blockTimeMS": 3_000}},
        )
        .unwrap();
    d.signal("USR1");
    wait_until(
        "the first force-sync runs",
        Duration::from_secs(30),
        || async { d.logs().contains("force-sync: reconciling") },
    )
    .await;
    // Ten more requests while it runs: one more reconcile, not ten, and none dropped.
    for _ in 0..10 {
        d.signal("USR1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    items(&c.dst).delete_one(doc! {"_id": 99}).await.unwrap();
    wait_until(
        "two force-syncs finished",
        Duration::from_secs(60),
        || async { count_lines(&d.logs(), "force-sync finished") >= 2 },
    )
    .await;
    // Long enough for a third reconcile (3 s each) to show up if requests were queued.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            count_lines(&d.logs(), "force-sync finished"),
            2,
            "requests were queued instead of coalesced:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_sync_stops_promptly_on_sigterm_and_resumes_at_the_next_range() {
    let c = Clusters::start().await;
    // 1 MiB documents: a copy range holds 16 MiB, so 80 documents are five ranges.
    let big = "b".repeat(1024 * 1024);
    for i in 0..80 {
        items(&c.src)
            .insert_one(doc! {"_id": i, "big": big.clone()})
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        &settings("[shutdown]\ntimeout_seconds = 60"),
    );
    wait_converged(&c, &[APP], Duration::from_secs(120)).await;
    d.wait_streaming("app.items").await;
    // Tampered in the first and the last range.
    items(&c.dst).delete_one(doc! {"_id": 0}).await.unwrap();
    items(&c.dst).delete_one(doc! {"_id": 79}).await.unwrap();
    // Each range write takes at least 4 s (two or three bulk commands of 2 s).
    c.dest
        .configure_fail_point(
            &doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "namespace": "app.items",
                     "blockConnection": true, "blockTimeMS": 2_000}},
        )
        .unwrap();
    d.signal("USR1");
    wait_until(
        "the first range is reconciled",
        Duration::from_secs(60),
        || async {
            checkpoint(&c)
                .await
                .and_then(|cp| cp.get_document("reconcile").ok().cloned())
                .is_some_and(|r| r.get("next").is_some_and(|n| *n != bson::Bson::Null))
        },
    )
    .await;
    let stopping = Instant::now();
    d.signal("TERM");
    assert_eq!(
        d.wait_exit(Duration::from_secs(60)).await,
        Some(0),
        "log:\n{}",
        d.logs()
    );
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "SIGTERM during a force-sync took {took:?}; log:\n{}",
        d.logs()
    );
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    d.spawn(&[]);
    wait_until(
        "the force-sync finishes after the restart",
        Duration::from_secs(120),
        || async { d.logs().contains("force-sync finished") },
    )
    .await;
    assert!(
        d.logs().contains("force-sync resuming at its next range"),
        "log:\n{}",
        d.logs()
    );
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_estimated_longer_than_the_oplog_window_is_warned_about() {
    // Three oplog entries with a no-op every second: a window of two seconds at most.
    let c = Clusters::start_with_oplog(3).await;
    for chunk in 0..20 {
        items(&c.src)
            .insert_many((0..1_000).map(|i| doc! {"_id": chunk * 1_000 + i}))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), &settings(""));
    wait_until(
        "the oplog-window warning",
        Duration::from_secs(60),
        || async {
            d.logs()
                .contains("estimated to take longer than the source's oplog window")
        },
    )
    .await;
    let status = d.status().await.expect("status");
    let warning = &status["namespaces"]["app.items"]["copy"]["oplog_window_warning"];
    let copy = warning["estimated_copy_seconds"]
        .as_u64()
        .expect("in status");
    let window = warning["oplog_window_seconds"].as_u64().expect("in status");
    assert!(copy > window, "{warning}");
    assert!(window <= 2, "{warning}");
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_young_oplog_is_not_mistaken_for_a_short_window() {
    // A freshly loaded source: its oplog spans a second or two but is far from full, so
    // history is not about to be lost and the copy must not be warned about.
    let c = Clusters::start().await;
    for chunk in 0..20 {
        items(&c.src)
            .insert_many((0..1_000).map(|i| doc! {"_id": chunk * 1_000 + i}))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), &settings(""));
    wait_converged(&c, &[APP], Duration::from_secs(60)).await;
    let status = d.status().await.expect("status");
    assert!(
        status["namespaces"]["app.items"]["copy"]["oplog_window_warning"].is_null(),
        "{status}"
    );
    assert!(!d.logs().contains("oplog window"), "log:\n{}", d.logs());
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

//! How changes are applied: repairs from the source, renames, lookup mode, field names that
//! `$set` paths cannot address, and a queue bounded under backlog.

use std::time::Duration;

use bson::{doc, Document};

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_matching_nothing_is_repaired_from_the_source() {
    let c = Clusters::start().await;
    let src = c.src.database("app").collection::<Document>("items");
    src.insert_many(
        (0..20)
            .map(|i| doc! {"_id": i, "v": i, "name": format!("n{i}")})
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_converged(&c, &[("app", "items")], Duration::from_secs(30)).await;
    d.wait_streaming("app.items").await;
    // Behind the daemon's back: the destination loses a document.
    let dst = c.dst.database("app").collection::<Document>("items");
    dst.delete_one(doc! {"_id": 7}).await.unwrap();
    // A delta on the source cannot apply to a missing document: it is repaired from the source.
    src.update_one(doc! {"_id": 7}, doc! {"$set": {"v": 700}})
        .await
        .unwrap();
    wait_converged(&c, &[("app", "items")], Duration::from_secs(30)).await;
    assert_eq!(
        dst.find_one(doc! {"_id": 7})
            .await
            .unwrap()
            .unwrap()
            .get_str("name")
            .unwrap(),
        "n7"
    );
    assert_eq!(d.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_targets_and_lookup_mode() {
    let c = Clusters::start().await;
    let orders = c.src.database("shop").collection::<Document>("orders");
    orders
        .insert_many((0..50).map(|i| doc! {"_id": i, "v": i}).collect::<Vec<_>>())
        .await
        .unwrap();
    let people = c.src.database("crm").collection::<Document>("contacts");
    people
        .insert_one(doc! {"_id": "p1", "name": "Ada"})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"shop.*\", \"crm.*\"]\nrename = { \"shop\" = \"shop_dr\", \"crm.contacts\" = \"crm_dr.people\" }\n\n[apply]\nupdate_mode = \"lookup\"\n",
    );
    d.wait_streaming("shop.orders").await;
    d.wait_streaming("crm.contacts").await;
    for i in 0..50 {
        orders
            .update_one(
                doc! {"_id": i},
                doc! {"$inc": {"v": 1000}, "$set": {"paid": true}},
            )
            .await
            .unwrap();
    }
    orders.delete_one(doc! {"_id": 3}).await.unwrap();
    people
        .update_one(doc! {"_id": "p1"}, doc! {"$set": {"name": "Ada L."}})
        .await
        .unwrap();
    let check = |db: &'static str, coll: &'static str, tdb: &'static str, tcoll: &'static str| {
        let (src, dst) = (c.src.clone(), c.dst.clone());
        async move {
            crate::support::cluster::diff(&src, &dst, (db, coll), (tdb, tcoll))
                .await
                .is_none()
        }
    };
    wait_until(
        "renamed targets converge",
        Duration::from_secs(30),
        || async {
            check("shop", "orders", "shop_dr", "orders").await
                && check("crm", "contacts", "crm_dr", "people").await
        },
    )
    .await;
    let names = c.dst.list_database_names().await.unwrap();
    assert!(
        !names.contains(&"shop".to_string()) && !names.contains(&"crm".to_string()),
        "{names:?}"
    );
    assert_eq!(d.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_names_with_dots_or_digits_are_copied_exactly() {
    let c = Clusters::start().await;
    let src = c.src.database("odd").collection::<Document>("names");
    src.insert_one(doc! {"_id": 1, "a.b": 1, "0": {"1": "x"}, "plain": {"k": 1}})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"odd.*\"]\n");
    wait_converged(&c, &[("odd", "names")], Duration::from_secs(30)).await;
    d.wait_streaming("odd.names").await;
    // Pipeline updates are the only way to write literal dotted names; the event carries
    // disambiguatedPaths and must still land exactly.
    src.update_one(
        doc! {"_id": 1},
        vec![doc! {"$replaceWith": {"$setField": {"field": "a.b", "input": "$$ROOT", "value": 2}}}],
    )
    .await
    .unwrap();
    src.update_one(doc! {"_id": 1}, doc! {"$set": {"0.1": "y", "plain.k": 2}})
        .await
        .unwrap();
    wait_converged(&c, &[("odd", "names")], Duration::from_secs(30)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_stays_bounded_while_the_destination_is_stuck() {
    let c = Clusters::start().await;
    let src = c.src.database("load").collection::<Document>("events");
    src.insert_one(doc! {"_id": -1}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"load.*\"]\n\n[apply]\nbatch_max_events = 100\n",
    );
    d.wait_streaming("load.events").await;
    let baseline = rss_kib(d.pid());
    // The destination stops acknowledging writes for a while; a backlog builds on the source.
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update", "delete"], "blockConnection": true, "blockTimeMS": 3000, "appName": "mongo-syncd"}})
        .unwrap();
    let payload = "x".repeat(2000);
    for chunk in 0..20 {
        let docs: Vec<Document> = (0..1000)
            .map(|i| doc! {"_id": chunk * 1000 + i, "payload": payload.clone()})
            .collect();
        src.insert_many(docs).await.unwrap();
    }
    let mut max_queue = 0.0f64;
    let mut max_rss = 0;
    for _ in 0..20 {
        if let Some(q) = d
            .metric("mongo_syncd_queue_events{namespace=\"load.events\"}")
            .await
        {
            max_queue = max_queue.max(q);
        }
        max_rss = max_rss.max(rss_kib(d.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    wait_converged(&c, &[("load", "events")], Duration::from_secs(120)).await;
    // 20,000 events of ~2 KB (40 MB) were pending; the reader holds at most two batches' worth
    // of events (and bytes) in memory.
    assert!(max_queue <= 200.0, "queue grew to {max_queue} events");
    assert!(
        max_rss < baseline + 60 * 1024,
        "resident memory grew from {baseline} KiB to {max_rss} KiB under a 40 MB backlog"
    );
    assert_eq!(d.terminate().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_16_mib_are_split_and_reassembled() {
    let c = Clusters::start().await;
    let src = c.src.database("big").collection::<Document>("docs");
    src.insert_one(doc! {"_id": 0}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"big.*\"]\n");
    d.wait_streaming("big.docs").await;
    // A document just under 16 MiB: its insert event (document + event fields) is over 16 MiB.
    let blob = "x".repeat(16 * 1024 * 1024 - 200);
    src.insert_one(doc! {"_id": 1, "blob": blob}).await.unwrap();
    src.insert_one(doc! {"_id": 2, "after": true})
        .await
        .unwrap();
    wait_converged(&c, &[("big", "docs")], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// The scenario behind both refetch tests, in collection `order.<coll>` with `extra` config: a
/// field named "5" in a sub-document (its path is ambiguous, `disambiguatedPaths` says so, and the
/// daemon refetches the document), then `f` unset and set again (moved to the end) and a new field
/// `g` after it, issued while the daemon is stopped so that it reads them as a backlog on
/// restart; the destination must end byte-identical to the source.
async fn refetch_backlog_converges_exactly(coll: &str, extra: &str) {
    let c = Clusters::start().await;
    let src = c.src.database("order").collection::<Document>(coll);
    src.insert_one(doc! {"_id": 1, "o": {}, "f": "a"})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[sync]\nnamespaces = [\"order.*\"]\n{extra}");
    let mut d = Daemon::start(&c, dir.path(), &config);
    wait_converged(&c, &[("order", coll)], Duration::from_secs(30)).await;
    d.wait_streaming(&format!("order.{coll}")).await;
    assert_eq!(d.terminate().await, Some(0));
    for update in [
        doc! {"$set": {"o.5": 1}},
        doc! {"$unset": {"f": ""}},
        doc! {"$set": {"f": "b"}},
        doc! {"$set": {"g": 1}},
    ] {
        src.update_one(doc! {"_id": 1}, update).await.unwrap();
    }
    d.spawn(&[]);
    wait_converged(&c, &[("order", coll)], Duration::from_secs(30)).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Found by the 60-minute soak (seeds 40100, 48555, 52036): after a restart the backlog came
/// as one batch; a refetch in it read the document with every change of the batch, and the
/// batch's later deltas were applied on top of that, moving `f` after `g`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_a_refetch_in_the_same_batch_keep_the_source_field_order() {
    refetch_backlog_converges_exactly("one_batch", "").await;
}

/// The same history read one event per batch: the refetch must read the document as of its
/// own batch (a snapshot read at the batch's cluster time), not the source's current one,
/// or the later batches' deltas land on a document that already holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refetch_reads_the_document_as_of_its_batch() {
    refetch_backlog_converges_exactly("per_event", "\n[apply]\nbatch_max_events = 1\n").await;
}

/// `serverStatus.opcounters.<op>` of a simulator.
async fn opcounter(client: &mongodb::Client, op: &str) -> i64 {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_events_are_written_as_inserts_and_a_taken_id_falls_back_to_a_replace() {
    let c = Clusters::start().await;
    let src = c.src.database("app").collection::<Document>("items");
    src.insert_many((0..5).map(|i| doc! {"_id": i, "v": i}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), "[sync]\nnamespaces = [\"app.*\"]\n");
    wait_converged(&c, &[("app", "items")], Duration::from_secs(30)).await;
    d.wait_streaming("app.items").await;
    // Behind the daemon's back the destination already holds an id the source will insert
    // (as a replay would find it): that insert fails on `_id` and is written as a replace.
    let dst = c.dst.database("app").collection::<Document>("items");
    dst.insert_one(doc! {"_id": 1000, "stale": true})
        .await
        .unwrap();
    let inserts_before = opcounter(&c.dst, "insert").await;
    src.insert_many((1000..1200).map(|i| doc! {"_id": i, "v": i, "name": format!("n{i}")}))
        .await
        .unwrap();
    wait_converged(&c, &[("app", "items")], Duration::from_secs(30)).await;
    // The 199 new documents went in with `insert` (a replace-upsert counts as an update).
    let inserted = opcounter(&c.dst, "insert").await - inserts_before;
    assert!(
        inserted >= 199,
        "{inserted} documents inserted on the destination for 200 insert events\nlog:\n{}",
        d.logs()
    );
    let taken = dst.find_one(doc! {"_id": 1000}).await.unwrap().unwrap();
    assert_eq!(taken, doc! {"_id": 1000, "v": 1000, "name": "n1000"});
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Connections the destination opened so far (`serverStatus.connections.totalCreated`).
async fn connections_created(client: &mongodb::Client) -> i64 {
    let status = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
        .unwrap();
    status
        .get_document("connections")
        .unwrap()
        .get_i64("totalCreated")
        .unwrap()
}

/// The daemon's config for the write-lanes tests: batches of up to 8,000 events (16 lanes of
/// at least 250 statements each from 4,000 on) written with `lanes` lanes.
fn lanes_config(lanes: u32) -> String {
    format!("[sync]\nnamespaces = [\"lanes.*\"]\n\n[apply]\nbatch_max_events = 8000\nwrite_lanes = {lanes}\n")
}

/// `lanes.items` on the source with 8,000 documents, and a daemon started with `config` that
/// has copied them and streams.
async fn lanes_collection_synced(c: &Clusters, dir: &std::path::Path, config: &str) -> Daemon {
    let src = c.src.database("lanes").collection::<Document>("items");
    src.insert_many((0..8000).map(|i| doc! {"_id": i, "round": 0}))
        .await
        .unwrap();
    let d = Daemon::start(c, dir, config);
    wait_converged(c, &[("lanes", "items")], Duration::from_secs(60)).await;
    d.wait_streaming("lanes.items").await;
    d
}

/// Runs `drain` (which must end with the destination converged) with every destination
/// `update` held 300 ms, so the commands of one batch are in flight together, and returns the
/// connections the destination opened meanwhile: one per command the daemon had in flight at
/// once, at most.
async fn connections_opened_with_updates_held(
    c: &Clusters,
    drain: impl std::future::Future<Output = ()>,
) -> i64 {
    hold_daemon_updates(c, 300);
    let before = connections_created(&c.dst).await;
    drain.await;
    let opened = connections_created(&c.dst).await - before;
    release_destination_commands(c);
    opened
}

/// Holds every `update` the daemon sends to the destination `ms` milliseconds before it runs,
/// as a distant server's round trip would, until [`release_destination_commands`].
fn hold_daemon_updates(c: &Clusters, ms: i32) {
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update"], "blockConnection": true, "blockTimeMS": ms, "appName": "mongo-syncd"}})
        .unwrap();
}

/// Turns the destination's `failCommand` fail point off.
fn release_destination_commands(c: &Clusters) {
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
}

/// Drains a backlog of 8,000 updates of distinct documents, written while the daemon is
/// stopped, with `apply.write_lanes = lanes`; returns the connections the destination opened
/// for it ([`connections_opened_with_updates_held`]).
async fn drain_with_write_lanes(c: &Clusters, round: i32, lanes: u32) -> i64 {
    let src = c.src.database("lanes").collection::<Document>("items");
    src.update_many(doc! {}, doc! {"$set": {"round": round}})
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = None;
    let opened = connections_opened_with_updates_held(c, async {
        daemon = Some(Daemon::start(c, dir.path(), &lanes_config(lanes)));
        wait_converged(c, &[("lanes", "items")], Duration::from_secs(60)).await;
    })
    .await;
    let mut d = daemon.expect("started in the drain");
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
    opened
}

/// `apply.write_lanes` bounds how many commands one batch's writes are cut into: with 1 the
/// daemon writes a batch as one command at a time, with 16 a batch of 4,000 statements or
/// more goes out as 16 commands at once; both drains end in an exact copy. The connections
/// the destination opened for each drain show it (pooled ones are reused, so the margin is
/// below 15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_lanes_bound_the_commands_one_batch_sends_at_once() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d =
        lanes_collection_synced(&c, dir.path(), "[sync]\nnamespaces = [\"lanes.*\"]\n").await;
    assert_eq!(d.terminate().await, Some(0));

    let one_lane = drain_with_write_lanes(&c, 1, 1).await;
    let sixteen_lanes = drain_with_write_lanes(&c, 2, 16).await;
    eprintln!("connections opened: {one_lane} with 1 write lane, {sixteen_lanes} with 16");
    assert!(
        sixteen_lanes >= one_lane + 8,
        "16 write lanes opened {sixteen_lanes} destination connections, 1 lane {one_lane}: the lanes did not run at once"
    );
}

/// `apply.write_lanes` is reloaded by SIGHUP: a worker started with one lane cuts its next
/// batches into 16 commands once the reload reaches its batch boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_write_lanes_of_a_running_worker() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = lanes_collection_synced(&c, dir.path(), &lanes_config(1)).await;

    let config = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .replace("write_lanes = 1", "write_lanes = 16");
    std::fs::write(&d.config_path, config).unwrap();
    d.signal("HUP");
    d.wait_metric(
        "mongo_syncd_config_reloads_total{result=\"success\"}",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    // One event through the worker: it has passed a batch boundary since the reload.
    let src = c.src.database("lanes").collection::<Document>("items");
    src.insert_one(doc! {"_id": "after-reload"}).await.unwrap();
    wait_converged(&c, &[("lanes", "items")], Duration::from_secs(60)).await;
    d.wait_metric(
        "mongo_syncd_write_lanes{namespace=\"lanes.items\"}",
        16.0,
        Duration::from_secs(30),
    )
    .await;

    let opened = connections_opened_with_updates_held(&c, async {
        src.update_many(doc! {}, doc! {"$set": {"round": 1}})
            .await
            .unwrap();
        wait_converged(&c, &[("lanes", "items")], Duration::from_secs(60)).await;
    })
    .await;
    eprintln!("connections opened after the reload to 16 write lanes: {opened}");
    assert!(
        opened >= 6,
        "after the reload to 16 write lanes the drain opened {opened} destination connections: the worker still writes with one lane\nlog:\n{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// `apply.write_lanes = "auto"` (the default) adds lanes where they write faster. Every
/// destination `update` is held 200 ms, as a distant server's round trip would hold it, and
/// batches are 8,000 statements: one lane sends them as two commands in turn (5,000 is the
/// most one command carries), two lanes as two commands at once, so two lanes write a batch in
/// about half the time. The worker's trials measure that and move it to two lanes; the drain
/// still ends in an exact copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_write_lanes_move_to_more_lanes_when_they_write_faster() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Full batches even on a loaded machine, where the reader may lag the writes: a batch of
    // 5,000 statements or fewer is one command with any lane count.
    let config = "[sync]\nnamespaces = [\"lanes.*\"]\n\n[apply]\nbatch_max_events = 8000\nbatch_max_wait_ms = 5000\n";
    let mut d = lanes_collection_synced(&c, dir.path(), config).await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());

    // A backlog of 24 batches, enough for the first trial (after 4 writes, 12 writes long).
    let src = c.src.database("lanes").collection::<Document>("items");
    for round in 1..=24 {
        src.update_many(doc! {}, doc! {"$set": {"round": round}})
            .await
            .unwrap();
    }
    hold_daemon_updates(&c, 200);
    // Trials that keep the count are logged at debug.
    d.spawn_with_env(&[], &[("RUST_LOG", "info,mongo_syncd::apply=debug")]);
    wait_converged(&c, &[("lanes", "items")], Duration::from_secs(120)).await;
    release_destination_commands(&c);
    let logs = d.logs();
    assert!(
        logs.contains("write lanes tuned from 1 to 2:"),
        "the worker never moved to 2 write lanes\nlog:\n{logs}"
    );
    // The status shows the count the worker keeps: the last one it moved to.
    let kept: u64 = logs
        .rsplit("write lanes tuned from ")
        .next()
        .and_then(|l| l.split(" to ").nth(1))
        .and_then(|l| l.split(':').next())
        .and_then(|n| n.parse().ok())
        .expect("a tuned line names its counts");
    assert!(kept >= 2, "log:\n{logs}");
    let lanes = &d.status().await.unwrap()["namespaces"]["lanes.items"]["write_lanes"];
    assert_eq!(lanes, kept, "log:\n{logs}");
    let metric = d
        .metric("mongo_syncd_write_lanes{namespace=\"lanes.items\"}")
        .await;
    assert_eq!(metric, Some(kept as f64), "log:\n{logs}");
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// A statement the destination refuses in a later lane repairs that lane's document, not
/// another one. With `apply.write_lanes = 4`, a backlog of one `$set` of `a.b` per document
/// goes out in lanes; the last document, whose `a` was made a number on the destination out
/// of band, sits in the last lane, where its delta fails for its shape (code 28) and the
/// worker takes it from the source. An error index read without its lane's offset would
/// repair a document of the first lane instead and leave this one diverged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_statement_in_a_later_lane_repairs_its_own_document() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    let src = c.src.database("lanes").collection::<Document>("shapes");
    src.insert_many((0..2000).map(|i| doc! {"_id": i, "a": {"b": 0}}))
        .await
        .unwrap();
    let config =
        "[sync]\nnamespaces = [\"lanes.*\"]\n\n[apply]\nbatch_max_events = 2000\nwrite_lanes = 4\n";
    let mut d = Daemon::start(&c, dir.path(), config);
    wait_converged(&c, &[("lanes", "shapes")], Duration::from_secs(60)).await;
    d.wait_streaming("lanes.shapes").await;
    // A fixed count is shown from the worker's start, before any batch.
    let series = "mongo_syncd_write_lanes{namespace=\"lanes.shapes\"}";
    assert_eq!(d.metric(series).await, Some(4.0));
    let status = d.status().await.unwrap();
    assert_eq!(status["namespaces"]["lanes.shapes"]["write_lanes"], 4);
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());

    let dst = c.dst.database("lanes").collection::<Document>("shapes");
    dst.update_one(doc! {"_id": 1999}, doc! {"$set": {"a": 5}})
        .await
        .unwrap();
    src.update_many(doc! {}, doc! {"$set": {"a.b": 1}})
        .await
        .unwrap();
    let mut d = Daemon::start(&c, dir.path(), config);
    wait_converged(&c, &[("lanes", "shapes")], Duration::from_secs(60)).await;
    let repaired = dst.find_one(doc! {"_id": 1999}).await.unwrap();
    assert_eq!(repaired, Some(doc! {"_id": 1999, "a": {"b": 1}}));
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

//! Several instances, one copy (DESIGN §2.12): a lease in the destination makes one instance
//! active and the others standbys; a standby takes over when the active dies, hangs or hands
//! over, and a deposed instance never writes again.

use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::Client;

use crate::support::cluster::{wait_converged, wait_until, Clusters, Daemon};

const T: Duration = Duration::from_secs(60);
const LEASE_SECONDS: u64 = 3;
/// A standby takes over within a lease and a renew period (DESIGN §2.12), plus the write
/// bound it waits out after an expired lease, plus scheduling slack on a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(LEASE_SECONDS + 1 + 1 + 3);
const ACTIVE: &str = "mongo_syncd_role{role=\"active\"}";
const STANDBY: &str = "mongo_syncd_role{role=\"standby\"}";

fn ha_config(namespaces: &str) -> String {
    format!("[sync]\nnamespaces = [\"{namespaces}\"]\n\n[ha]\nenabled = true\nlease_seconds = {LEASE_SECONDS}\n")
}

/// Starts an instance with HA on; `app` names its destination connections (for fail points).
fn instance(c: &Clusters, dir: &std::path::Path, namespaces: &str, app: &str) -> Daemon {
    instance_with(c, dir, &ha_config(namespaces), app)
}

fn instance_with(c: &Clusters, dir: &std::path::Path, config: &str, app: &str) -> Daemon {
    let mut d = Daemon::configure(c, dir, config);
    spawn(&mut d, app);
    d
}

fn spawn(d: &mut Daemon, app: &str) {
    d.spawn_with_env(
        &[],
        &[
            ("MONGO_SYNCD_DESTINATION__SOCKET_TIMEOUT_MS", "1000"),
            ("MONGO_SYNCD_DESTINATION__APP_NAME", app),
            ("MONGO_SYNCD_SOURCE__APP_NAME", &format!("{app}-src")),
        ],
    );
}

async fn role(d: &Daemon) -> Option<&'static str> {
    if d.metric(ACTIVE).await == Some(1.0) {
        Some("active")
    } else if d.metric(STANDBY).await == Some(1.0) {
        Some("standby")
    } else {
        None
    }
}

async fn wait_role(d: &Daemon, want: &'static str, timeout: Duration) {
    wait_until(&format!("instance {want}"), timeout, || async {
        role(d).await == Some(want)
    })
    .await;
}

/// Two instances with `config`: the first active, the second a standby. The directories keep
/// their configs and logs for as long as the test holds them.
async fn active_and_standby(
    c: &Clusters,
    config: &str,
) -> (Daemon, Daemon, tempfile::TempDir, tempfile::TempDir) {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = instance_with(c, dir_a.path(), config, "syncd-a");
    wait_role(&a, "active", T).await;
    let b = instance_with(c, dir_b.path(), config, "syncd-b");
    wait_role(&b, "standby", T).await;
    (a, b, dir_a, dir_b)
}

/// Every (`_id`, older version, newer version seen before it) where a version decreased.
fn version_regressions(seen: &[(i64, i64)]) -> Vec<(i64, i64, i64)> {
    let mut latest: std::collections::HashMap<i64, i64> = Default::default();
    seen.iter()
        .filter_map(|&(id, v)| {
            let before = latest.insert(id, v).unwrap_or(0);
            (v < before).then_some((id, v, before))
        })
        .collect()
}

/// Counts the destination write commands sent by connections named `app` from now on (the
/// fail point only delays them by a millisecond).
fn count_writes_of(c: &Clusters, app: &str) {
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["insert", "update", "delete", "createIndexes", "create", "drop", "commitTransaction"],
                     "appName": app, "blockConnection": true, "blockTimeMS": 1},
        })
        .unwrap();
}

/// How many write commands the counting fail point saw; turns it off.
fn writes_counted(c: &Clusters) -> i64 {
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap()
}

async fn seed(src: &Client, db: &str, coll: &str, n: i64) {
    let docs: Vec<Document> = (0..n)
        .map(|i| doc! {"_id": i, "v": 0_i64, "pad": "x".repeat(200)})
        .collect();
    for chunk in docs.chunks(5_000) {
        src.database(db)
            .collection::<Document>(coll)
            .insert_many(chunk.to_vec())
            .await
            .unwrap();
    }
}

/// Writes increasing versions (`v`) to documents `0..docs` of `db.coll` until stopped.
fn versioned_writer(
    src: &Client,
    db: &str,
    coll: &str,
    docs: i64,
) -> (
    tokio::task::JoinHandle<i64>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let coll = src.database(db).collection::<Document>(coll);
    let flag = std::sync::Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut version = 0_i64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            version += 1;
            let id = version % docs;
            coll.update_one(doc! {"_id": id}, doc! {"$set": {"v": version}})
                .await
                .unwrap();
            if version % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        version
    });
    (task, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_is_active_and_the_standby_writes_nothing() {
    let c = Clusters::start().await;
    seed(&c.src, "ha", "docs", 2_000).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = instance(&c, dir_a.path(), "ha.*", "syncd-a");
    wait_role(&a, "active", T).await;
    count_writes_of(&c, "syncd-b");
    let mut b = instance(&c, dir_b.path(), "ha.*", "syncd-b");
    wait_role(&b, "standby", T).await;

    // The standby is ready (able to take over) and names the active instance.
    wait_until("the standby is ready", T, || async {
        b.get("/readyz").await.map(|(code, _)| code) == Some(200)
    })
    .await;
    let status_a = a.status().await.unwrap();
    let status_b = b.status().await.unwrap();
    assert_eq!(status_a["ha"]["role"], "active");
    assert_eq!(status_b["ha"]["role"], "standby");
    assert_eq!(
        status_b["ha"]["active_instance"], status_a["ha"]["instance"],
        "{status_b}"
    );
    assert_eq!(
        status_b["ha"]["active_address"].as_str(),
        Some(a.http.to_string().as_str())
    );
    assert!(status_b["namespaces"].as_object().unwrap().is_empty());
    // Mutating requests to a standby answer with the active's address.
    let refused = reqwest::Client::new()
        .post(format!("http://{}/api/v1/force-sync", b.http))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 409);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(
        body["active_address"].as_str(),
        Some(a.http.to_string().as_str())
    );

    let (writer, stop) = versioned_writer(&c.src, "ha", "docs", 2_000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &[("ha", "docs")], T).await;
    assert_eq!(writes_counted(&c), 0, "the standby sent write commands");
    assert_eq!(role(&b).await, Some("standby"));
    assert_eq!(
        b.metric("mongo_syncd_writes_total").await.unwrap_or(0.0),
        0.0
    );
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_active_is_replaced_during_the_copy_and_the_copy_resumes_from_its_last_range() {
    let c = Clusters::start().await;
    const N: i64 = 40_000;
    seed(&c.src, "ha", "big", N).await;
    // The first instance's copy writes crawl, so it is killed in the middle of the copy.
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["insert"], "namespace": "ha.big", "appName": "syncd-a",
                     "blockConnection": true, "blockTimeMS": 150},
        })
        .unwrap();
    // One range lane: ranges finish (and are checkpointed) one after the other.
    let config = format!("{}\n[copy]\nparallel_ranges = 1\n", ha_config("ha.*"));
    let (mut a, mut b, _dir_a, _dir_b) = active_and_standby(&c, &config).await;
    let dst = c.dst.database("ha").collection::<Document>("big");
    let checkpoints = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("checkpoints");
    wait_until("a copy range checkpointed", T, || async {
        checkpoints
            .find_one(doc! {"_id.ns": "ha.big", "copy.copied": {"$gt": 0_i64}})
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let copied_by_a = dst.count_documents(doc! {}).await.unwrap() as i64;
    assert!(copied_by_a < N, "the copy finished before the kill");
    a.kill9();
    let killed = Instant::now();
    wait_role(&b, "active", TAKEOVER_BOUND + Duration::from_secs(5)).await;
    let took = killed.elapsed();
    eprintln!("takeover after SIGKILL during the copy: {took:?}");
    assert!(
        took <= TAKEOVER_BOUND,
        "takeover took {took:?} (bound {TAKEOVER_BOUND:?})"
    );
    wait_converged(&c, &[("ha", "big")], T).await;
    let copied_by_b = b
        .metric("mongo_syncd_initial_sync_documents_copied_total")
        .await
        .unwrap_or(0.0) as i64;
    assert!(
        copied_by_b < N,
        "the new active copied {copied_by_b} of {N} documents: the copy started over"
    );
    assert!(b.all_logs().contains("took over an expired lease"));

    // Then during streaming: a new standby, a workload, the active killed again.
    spawn(&mut a, "syncd-a2");
    wait_role(&a, "standby", T).await;
    let (writer, stop) = versioned_writer(&c.src, "ha", "big", 500);
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill9();
    let killed = Instant::now();
    wait_role(&a, "active", TAKEOVER_BOUND + Duration::from_secs(5)).await;
    let took = killed.elapsed();
    eprintln!("takeover after SIGKILL while streaming: {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &[("ha", "big")], T).await;
    assert!(
        took <= TAKEOVER_BOUND,
        "takeover took {took:?} (bound {TAKEOVER_BOUND:?})"
    );
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_hands_the_lease_over_at_once() {
    let c = Clusters::start().await;
    seed(&c.src, "ha", "docs", 500).await;
    let (mut a, mut b, _dir_a, _dir_b) = active_and_standby(&c, &ha_config("ha.*")).await;
    wait_converged(&c, &[("ha", "docs")], T).await;
    let (writer, stop) = versioned_writer(&c.src, "ha", "docs", 500);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Instant::now();
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
    wait_role(&b, "active", T).await;
    let took = stopped.elapsed();
    eprintln!("handover after SIGTERM: {took:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &[("ha", "docs")], T).await;
    assert!(a.all_logs().contains("lease released"), "{}", a.all_logs());
    assert!(!b.all_logs().contains("took over an expired lease"));
    // Drain + release + one standby poll (1 s), far below a lease period plus its wait.
    assert!(
        took < Duration::from_secs(LEASE_SECONDS),
        "handover took {took:?}"
    );
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
}

/// (`_id`, `v`) of a destination change that wrote a version.
fn versioned_change(
    event: &mongodb::change_stream::event::ChangeStreamEvent<Document>,
) -> Option<(i64, i64)> {
    let id = event
        .document_key
        .as_ref()
        .and_then(|k| k.get_i64("_id").ok())?;
    let version = event
        .update_description
        .as_ref()
        .and_then(|u| u.updated_fields.get("v"))
        .or_else(|| event.full_document.as_ref().and_then(|d| d.get("v")));
    match version {
        Some(Bson::Int64(v)) => Some((id, *v)),
        _ => None,
    }
}

/// Every destination change of `db.coll` as (`_id`, `v`), in the destination's order.
fn record_destination_versions(
    dst: &Client,
    db: &str,
    coll: &str,
) -> (
    tokio::task::JoinHandle<Vec<(i64, i64)>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let coll = dst.database(db).collection::<Document>(coll);
    let task = tokio::spawn(async move {
        let mut stream = coll.watch().await.unwrap();
        let mut seen = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let next = tokio::time::timeout(Duration::from_millis(200), stream.try_next()).await;
            let Ok(Ok(Some(event))) = next else { continue };
            if let Some(change) = versioned_change(&event) {
                seen.push(change);
            }
        }
        seen
    });
    (task, stop)
}

/// [`ha_config`] for `ha.*` with `ha.fencing = "transaction"`.
fn transaction_fencing_config() -> String {
    format!("{}fencing = \"transaction\"\n", ha_config("ha.*"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_active_steps_down_and_no_older_version_ever_lands() {
    paused_active_steps_down_and_no_older_version_lands(&ha_config("ha.*")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_transaction_fencing_a_paused_active_steps_down_and_no_older_version_ever_lands() {
    let config = transaction_fencing_config();
    let commits = paused_active_steps_down_and_no_older_version_lands(&config).await;
    assert!(
        commits > 0,
        "the active wrote no batch in a destination transaction"
    );
}

/// SIGSTOP the active past its lease while a writer writes increasing versions; the standby
/// takes over and applies newer versions; SIGCONT the old one: it steps down, and no
/// document's version ever goes back on the destination.
/// Returns how many destination transactions the first active committed while streaming.
async fn paused_active_steps_down_and_no_older_version_lands(config: &str) -> i64 {
    let c = Clusters::start().await;
    seed(&c.src, "ha", "docs", 200).await;
    let (mut a, mut b, _dir_a, _dir_b) = active_and_standby(&c, config).await;
    wait_converged(&c, &[("ha", "docs")], T).await;
    let (recorder, stop_recording) = record_destination_versions(&c.dst, "ha", "docs");
    let (writer, stop) = versioned_writer(&c.src, "ha", "docs", 200);
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["commitTransaction"], "appName": "syncd-a",
                     "blockConnection": true, "blockTimeMS": 1},
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let commits = writes_counted(&c);

    a.signal("STOP");
    wait_role(&b, "active", TAKEOVER_BOUND + Duration::from_secs(5)).await;
    // The new active applies newer versions while the old one is frozen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("CONT");
    wait_role(&a, "standby", T).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last_version = writer.await.unwrap();
    wait_converged(&c, &[("ha", "docs")], T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_recording.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.await.unwrap();
    assert!(
        seen.len() > 100,
        "only {} destination changes seen",
        seen.len()
    );
    if let Some((id, v, before)) = version_regressions(&seen).first() {
        panic!("document {id}: version {v} landed after {before} (of {last_version})");
    }
    assert!(a.all_logs().contains("lost the lease"), "{}", a.all_logs());
    assert_eq!(role(&b).await, Some("active"));
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
    commits
}

#[tokio::test]
async fn ha_needs_a_write_bound_within_a_third_of_the_lease() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), &ha_config("ha.*"));
    d.spawn(&[]);
    assert_eq!(d.wait_exit(T).await, Some(78), "{}", d.logs());
    assert!(
        d.logs().contains("destination.socket_timeout_ms"),
        "{}",
        d.logs()
    );
}

/// A frozen active holds copy ranges it read before the freeze. When it runs again, nothing
/// of its own metadata stands between those ranges and the destination (a copy writes data
/// before its checkpoint), and source reads have no client timeout that would fail them: only
/// the write deadline keeps the older versions out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_active_frozen_in_the_middle_of_its_copy_never_writes_what_it_read_before() {
    frozen_copy_never_writes_what_it_read_before(&ha_config("ha.*")).await;
}

/// The same under `ha.fencing = "transaction"`: each copied range is written with its
/// checkpoint in one destination transaction, which a takeover makes fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_transaction_fencing_a_frozen_copy_never_writes_what_it_read_before() {
    let config = transaction_fencing_config();
    let commits = frozen_copy_never_writes_what_it_read_before(&config).await;
    assert!(
        commits > 0,
        "the active wrote no copied range in a destination transaction"
    );
}

/// Returns how many destination transactions the first active committed before its freeze.
async fn frozen_copy_never_writes_what_it_read_before(config: &str) -> i64 {
    let c = Clusters::start().await;
    const N: i64 = 100_000;
    seed(&c.src, "ha", "big", N).await;
    // The first instance's copy reads crawl: it is mostly waiting for a source answer.
    c.source
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["find", "getMore"], "namespace": "ha.big", "appName": "syncd-a-src",
                     "blockConnection": true, "blockTimeMS": 1000},
        })
        .unwrap();
    // Counts the first instance's destination transactions (a 1 ms block on each commit).
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["commitTransaction"], "appName": "syncd-a",
                     "blockConnection": true, "blockTimeMS": 1},
        })
        .unwrap();
    let (mut a, mut b, _dir_a, _dir_b) = active_and_standby(&c, config).await;
    let (recorder, stop_recording) = record_destination_versions(&c.dst, "ha", "big");
    let (writer, stop) = versioned_writer(&c.src, "ha", "big", N);
    let dst = c.dst.database("ha").collection::<Document>("big");
    // A range is written; the lanes are reading their next ranges.
    wait_until("part of the copy written", T, || async {
        dst.count_documents(doc! {}).await.unwrap() >= 1_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal("STOP");
    let commits = writes_counted(&c);
    assert!(
        dst.count_documents(doc! {}).await.unwrap() < N as u64,
        "the copy finished before the freeze"
    );
    wait_role(&b, "active", TAKEOVER_BOUND + Duration::from_secs(5)).await;
    // The new active copies and streams newer versions while the old one is frozen.
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.signal("CONT");
    wait_role(&a, "standby", T).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &[("ha", "big")], T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_recording.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.await.unwrap();
    let regressions = version_regressions(&seen);
    assert!(
        regressions.is_empty(),
        "{} older versions landed after newer ones, e.g. {:?}",
        regressions.len(),
        &regressions[..regressions.len().min(5)]
    );
    if std::env::var("HA_TEST_LOGS").is_ok() {
        eprintln!("{}\n-----\n{}", a.all_logs(), b.all_logs());
    }
    assert!(a.all_logs().contains("lost the lease"), "{}", a.all_logs());
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
    commits
}

/// A rolling restart of three instances under a mixed workload: each is stopped with SIGTERM
/// (the active hands its lease over), started again and waited for, in turn. The copy stays
/// exact and no lease is ever lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_three_instances_under_load_loses_and_duplicates_nothing() {
    use crate::support::workload::{self, Workload, NAMESPACES};
    let c = Clusters::start().await;
    workload::seed(&c.src, 300).await;
    let config = format!(
        "[sync]\nnamespaces = [\"shop.*\", \"crm.*\"]\n\n[ha]\nenabled = true\nlease_seconds = {LEASE_SECONDS}\n"
    );
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut instances = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let d = instance_with(&c, dir.path(), &config, &format!("syncd-{i}"));
        wait_role(&d, if i == 0 { "active" } else { "standby" }, T).await;
        instances.push(d);
    }
    let load = Workload::start(&c.src, 3, Duration::from_millis(2), 41);
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let d = &mut instances[round];
        assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
        spawn(d, &format!("syncd-{round}"));
        wait_until("the restarted instance is ready", T, || async {
            d.get("/readyz").await.map(|(code, _)| code) == Some(200)
        })
        .await;
        wait_until("one instance is active", T, || async {
            let mut active = 0;
            for other in &instances {
                active += usize::from(role(other).await == Some("active"));
            }
            active == 1
        })
        .await;
    }
    let ops = load.stop().await;
    assert!(ops > 100, "only {ops} workload operations");
    wait_converged(&c, NAMESPACES, T).await;
    let mut active = 0;
    for d in &instances {
        active += usize::from(role(d).await == Some("active"));
        assert_eq!(
            d.metric("mongo_syncd_lease_losses_total").await,
            Some(0.0),
            "a graceful restart lost a lease:\n{}",
            d.all_logs()
        );
        assert!(!d.all_logs().contains("took over an expired lease"));
    }
    assert_eq!(active, 1);
    for d in &mut instances {
        assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    }
}

/// The active is cut off from the lease but not from the data (its lease commands fail, its
/// data writes still reach the destination): it must stop writing by its own deadline, before
/// the standby takes over, and no older version may land.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_active_that_cannot_renew_stops_writing_before_the_standby_takes_over() {
    let c = Clusters::start().await;
    seed(&c.src, "ha", "docs", 200).await;
    let (mut a, mut b, _dir_a, _dir_b) = active_and_standby(&c, &ha_config("ha.*")).await;
    wait_converged(&c, &[("ha", "docs")], T).await;
    let (recorder, stop_recording) = record_destination_versions(&c.dst, "ha", "docs");
    let (writer, stop) = versioned_writer(&c.src, "ha", "docs", 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every renewal of the active fails from now on (the connection is closed under it).
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["findAndModify"], "appName": "syncd-a", "closeConnection": true},
        })
        .unwrap();
    let cut = Instant::now();
    wait_until("the active deposes itself", T, || async {
        a.all_logs().contains("lost the lease")
    })
    .await;
    let deposed = cut.elapsed();
    wait_role(&b, "active", T).await;
    let taken_over = cut.elapsed();
    // Its own deadline (lease - write bound after its last renewal) comes before the lease
    // expires for the standby.
    assert!(
        deposed < taken_over,
        "deposed after {deposed:?}, taken over after {taken_over:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    wait_role(&a, "standby", T).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &[("ha", "docs")], T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_recording.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.await.unwrap();
    if let Some((id, v, before)) = version_regressions(&seen).first() {
        panic!("document {id}: version {v} landed after {before}");
    }
    assert!(a.all_logs().contains("NotRenewed"), "{}", a.all_logs());
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
}

/// SIGTERM asks the active to drain; a slow drain keeps renewing the lease (it must not run
/// out of its write deadline half-way and leave its checkpoints unwritten), then releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_drain_keeps_renewing_the_lease_until_it_hands_it_over() {
    let c = Clusters::start().await;
    seed(&c.src, "ha", "docs", 200).await;
    let (mut a, mut b, _dir_a, _dir_b) = active_and_standby(&c, &ha_config("ha.*")).await;
    wait_converged(&c, &[("ha", "docs")], T).await;
    let (writer, stop) = versioned_writer(&c.src, "ha", "docs", 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The active's next writes (marks, data, checkpoints: all `update`) take 0.7 s each, so
    // the batch it drains outlasts a renew period (1 s).
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": {"times": 6},
            "data": {"failCommands": ["update"], "appName": "syncd-a",
                     "blockConnection": true, "blockTimeMS": 700},
        })
        .unwrap();
    let asked = bson::DateTime::now();
    a.signal("TERM");
    assert_eq!(a.wait_exit(T).await, Some(0), "{}", a.logs());
    wait_role(&b, "active", T).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &[("ha", "docs")], T).await;
    let lease = the_lease(&c).await;
    // A kept its lease through the drain (never fenced, never deposed) and released it: B took
    // it after the SIGTERM, without waiting for it to expire.
    let history = a.all_logs();
    assert!(history.contains("lease released"), "{history}");
    assert!(!history.contains("lost the lease"), "{history}");
    assert!(!history.contains("destination write refused"), "{history}");
    assert!(!b.all_logs().contains("took over an expired lease"));
    let acquired_by_b = *lease.get_datetime("acquired_at").unwrap();
    assert!(acquired_by_b > asked, "{lease}");
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
}

/// The collections of the partition tests: enough that six partitions all get some.
const PARTITIONED_COLLECTIONS: usize = 12;

/// Clusters whose source holds `part.c0`..`part.c<n-1>`, `docs` documents each.
async fn clusters_with_partitioned_collections(n: usize, docs: i64) -> Clusters {
    let c = Clusters::start().await;
    for name in partitioned_collections(n) {
        seed(&c.src, "part", &name, docs).await;
    }
    c
}

/// The names of `part.c0`..`part.c<n-1>`; [`in_part`] makes them namespaces.
fn partitioned_collections(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i}")).collect()
}

/// `collections` as (database, collection) pairs of the `part` database.
fn in_part(collections: &[String]) -> Vec<(&str, &str)> {
    collections.iter().map(|c| ("part", c.as_str())).collect()
}

fn partitioned_config(partitions: u32) -> String {
    format!("[sync]\nnamespaces = [\"part.*\"]\n\n[ha]\nenabled = true\nlease_seconds = {LEASE_SECONDS}\npartitions = {partitions}\n")
}

/// The partitions an instance says it holds, with their epochs (`None`: not answering).
async fn held_partitions(d: &Daemon) -> Option<std::collections::BTreeMap<u64, i64>> {
    let status = d.status().await?;
    let held = status["ha"]["partitions"]["held"].as_array()?;
    Some(
        held.iter()
            .filter_map(|h| Some((h["partition"].as_u64()?, h["epoch"].as_i64()?)))
            .collect(),
    )
}

/// Waits until `instances` hold `per_instance` partitions each, every partition exactly once;
/// returns who holds what.
async fn wait_balanced(
    instances: &[&Daemon],
    partitions: u64,
    per_instance: usize,
    what: &str,
) -> Vec<std::collections::BTreeMap<u64, i64>> {
    let mut last = Vec::new();
    let started = Instant::now();
    while started.elapsed() < T {
        last.clear();
        for d in instances {
            last.push(held_partitions(d).await.unwrap_or_default());
        }
        let mut all: Vec<u64> = last.iter().flat_map(|h| h.keys().copied()).collect();
        all.sort_unstable();
        if last.iter().all(|h| h.len() == per_instance)
            && all == (0..partitions).collect::<Vec<_>>()
        {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = instances.iter().map(|d| d.all_logs()).collect();
    panic!(
        "{what}: not balanced after {T:?}: {last:?}\n{}",
        logs.join("\n----\n")
    );
}

/// Writes increasing versions to documents of every `part.cN` collection until stopped.
fn partitioned_writer(
    src: &Client,
) -> (
    tokio::task::JoinHandle<i64>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let db = src.database("part");
    let flag = std::sync::Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut version = 0_i64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            version += 1;
            let coll = version as usize % PARTITIONED_COLLECTIONS;
            let id = (version / PARTITIONED_COLLECTIONS as i64) % 40;
            db.collection::<Document>(&format!("c{coll}"))
                .update_one(doc! {"_id": id}, doc! {"$set": {"v": version}})
                .await
                .unwrap();
            if version % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        version
    });
    (task, stop)
}

/// Every destination change of database `part` as (collection × 1000 + `_id`, `v`).
fn record_partitioned_versions(
    dst: &Client,
) -> (
    tokio::task::JoinHandle<Vec<(i64, i64)>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let db = dst.database("part");
    let task = tokio::spawn(async move {
        let mut stream = db.watch().await.unwrap();
        let mut seen = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let next = tokio::time::timeout(Duration::from_millis(200), stream.try_next()).await;
            let Ok(Ok(Some(event))) = next else { continue };
            let coll: Option<i64> = event
                .ns
                .as_ref()
                .and_then(|ns| ns.coll.as_deref())
                .and_then(|c| c.strip_prefix('c'))
                .and_then(|n| n.parse().ok());
            if let (Some(coll), Some((id, v))) = (coll, versioned_change(&event)) {
                seen.push((coll * 1000 + id, v));
            }
        }
        seen
    });
    (task, stop)
}

/// Three instances, six partitions: two each. SIGKILL one: its two partitions move to the
/// survivors (three each) and the survivors' own partitions stay where they were, at the same
/// epoch. Then a rolling restart of all three under load. The copy is exact at the end and no
/// document's version ever goes back on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_six_partitions_and_a_failure_moves_only_the_failed_ones() {
    let c = clusters_with_partitioned_collections(PARTITIONED_COLLECTIONS, 200).await;
    let config = partitioned_config(6);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut instances: Vec<Daemon> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| instance_with(&c, dir.path(), &config, &format!("syncd-{i}")))
        .collect();
    let all: Vec<&Daemon> = instances.iter().collect();
    wait_balanced(&all, 6, 2, "three instances started").await;
    let collections = partitioned_collections(PARTITIONED_COLLECTIONS);
    let namespaces = in_part(&collections);
    wait_converged(&c, &namespaces, T).await;
    for d in &instances {
        assert_eq!(d.metric("mongo_syncd_partitions_held").await, Some(2.0));
        assert_eq!(d.metric("mongo_syncd_ha_partitions").await, Some(6.0));
        assert_eq!(role(d).await, Some("active"));
    }
    requests_go_to_the_owner_of_the_namespace(&instances[0], &instances[1]).await;

    let (recorder, stop_recording) = record_partitioned_versions(&c.dst);
    let (writer, stop_writing) = partitioned_writer(&c.src);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before: Vec<_> = {
        let all: Vec<&Daemon> = instances.iter().collect();
        wait_balanced(&all, 6, 2, "under load").await
    };
    instances[2].kill9();
    let killed_at = Instant::now();
    let after = {
        let survivors: Vec<&Daemon> = instances[..2].iter().collect();
        wait_balanced(&survivors, 6, 3, "after a kill").await
    };
    let moved_in = killed_at.elapsed();
    for i in 0..2 {
        for (partition, epoch) in &before[i] {
            assert_eq!(
                after[i].get(partition),
                Some(epoch),
                "instance {i} lost or re-took partition {partition} although it never failed: {before:?} → {after:?}"
            );
        }
    }
    for partition in before[2].keys() {
        assert!(after.iter().any(|h| h.contains_key(partition)));
    }
    eprintln!("partitions of the killed instance moved in {moved_in:?}");
    assert!(
        moved_in < TAKEOVER_BOUND + Duration::from_secs(LEASE_SECONDS),
        "the killed instance's partitions took {moved_in:?} to move"
    );

    // A rolling restart under load: the killed one comes back, then each of the others is
    // stopped with SIGTERM and started again.
    spawn(&mut instances[2], "syncd-2");
    for round in [None, Some(0), Some(1)] {
        if let Some(i) = round {
            let d = &mut instances[i];
            assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
            spawn(d, &format!("syncd-{i}"));
        }
        let all: Vec<&Daemon> = instances.iter().collect();
        wait_balanced(&all, 6, 2, &format!("rolling restart, round {round:?}")).await;
    }

    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    let versions = writer.await.unwrap();
    assert!(versions > 500, "only {versions} writes");
    wait_converged(&c, &namespaces, T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_recording.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.await.unwrap();
    assert!(
        seen.len() > 100,
        "the destination recorded only {} changes",
        seen.len()
    );
    assert_eq!(version_regressions(&seen), vec![], "older versions landed");
    for d in &instances[..2] {
        // Graceful handovers only: no lease lost, and no write of a partition kept was ever
        // refused while another partition was handed over.
        let logs = d.all_logs();
        assert!(!logs.contains("lost the lease"), "{logs}");
        assert!(!logs.contains("destination write refused"), "{logs}");
    }
    for d in &mut instances {
        assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    }
}

/// A request naming a namespace of a partition another instance holds answers 409 with that
/// instance's address; one naming a namespace held here goes on (here: 403, no token set).
async fn requests_go_to_the_owner_of_the_namespace(here: &Daemon, owner: &Daemon) {
    let status = owner.status().await.expect("status");
    let theirs = status["namespaces"]
        .as_object()
        .and_then(|n| n.keys().next().cloned())
        .expect("the owner syncs a namespace");
    let ours = here.status().await.expect("status")["namespaces"]
        .as_object()
        .and_then(|n| n.keys().next().cloned())
        .expect("this instance syncs a namespace");
    let post = |d: &Daemon, ns: &str| {
        let url = format!("http://{}/api/v1/validate", d.http);
        let body = serde_json::json!({"namespaces": [ns]}).to_string();
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .body(body)
                .send()
                .await
                .unwrap();
            let code = resp.status().as_u16();
            (
                code,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    // The instance's view of the owners is refreshed every poll (a second at most).
    let owner_address = owner.http.to_string();
    wait_until("a 409 naming the owner's address", T, || async {
        let (code, body) = post(here, &theirs).await;
        assert_eq!(code, 409, "{body}");
        body["owners"][&theirs]["address"].as_str() == Some(owner_address.as_str())
    })
    .await;
    let (code, body) = post(here, &ours).await;
    assert_eq!(code, 403, "a namespace held here is not redirected: {body}");
}

/// Several instances of one sync starting at once on a fresh destination (partitions run
/// concurrently) record one source identity and one metadata epoch, which every one of them
/// then holds: none sees "the metadata epoch changed" and takes the destination for reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_agree_on_one_identity_and_metadata_epoch() {
    use mongo_syncd::{
        identity::{self, IdentityWatch},
        metadata::Metadata,
        metrics::Metrics,
        source::Source,
        status::StatusRegistry,
    };
    let c = Clusters::start().await;
    let source = Source::new(c.src.clone(), None);
    let expected = source.identity().await.unwrap();
    let observed = identity::observe(&c.dst, mongo_syncd::error::ErrorKind::DestinationConnection)
        .await
        .unwrap();
    let db = c.dst.database("mongo_syncd");
    let checks = (0..8).map(|_| {
        let (db, expected) = (db.clone(), expected.clone());
        tokio::spawn(async move {
            Metadata::new(&db, None)
                .check_identity("default", &expected, false)
                .await
        })
    });
    for check in futures::future::join_all(checks).await {
        check.unwrap().expect("every instance accepts the identity");
    }
    let watches = (0..8).map(|_| {
        let (db, source, dst, expected, observed) = (
            db.clone(),
            source.clone(),
            c.dst.clone(),
            expected.clone(),
            observed.clone(),
        );
        tokio::spawn(async move {
            IdentityWatch::establish(
                source,
                dst,
                &db,
                None,
                "default",
                expected,
                &observed,
                &Metrics::new(10),
                std::sync::Arc::new(StatusRegistry::default()),
            )
            .await
        })
    });
    let watches: Vec<_> = futures::future::join_all(watches)
        .await
        .into_iter()
        .map(|w| w.unwrap().expect("established"))
        .collect();
    for w in &watches {
        w.verify_destination()
            .await
            .expect("every instance holds the recorded metadata epoch");
    }
}

/// Partitions read shared change streams of their own: with `stream_scope = "deployment"` each
/// partition's term keeps its watermark under its own name (`p<N>/deployment`), and a partition
/// handed over resumes from it on the other instance, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_partition_reads_its_own_shared_stream_and_its_watermark_moves_with_it() {
    let c = clusters_with_partitioned_collections(8, 100).await;
    let config = format!(
        "[source]\nstream_scope = \"deployment\"\n\n{}",
        partitioned_config(4)
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = instance_with(&c, dir_a.path(), &config, "syncd-a");
    let mut b = instance_with(&c, dir_b.path(), &config, "syncd-b");
    wait_balanced(&[&a, &b], 4, 2, "two instances").await;
    let collections = partitioned_collections(8);
    let namespaces = in_part(&collections);
    let (writer, stop_writing) = partitioned_writer(&c.src);
    let watermarks = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("stream_checkpoints");
    let names = || async {
        let mut names: Vec<String> = watermarks
            .distinct("_id.stream", doc! {})
            .await
            .unwrap()
            .into_iter()
            .filter_map(|b| b.as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    };
    wait_until("every partition saved its own watermark", T, || async {
        names().await
            == vec![
                "p0/deployment".to_owned(),
                "p1/deployment".to_owned(),
                "p2/deployment".to_owned(),
                "p3/deployment".to_owned(),
            ]
    })
    .await;
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
    wait_balanced(&[&a], 4, 4, "after a handover").await;
    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &namespaces, T).await;
    let logs = a.all_logs();
    assert!(
        logs.contains("shared change stream resumes from its watermark"),
        "the partitions taken over did not resume from their watermarks:\n{logs}"
    );
    assert!(!names().await.contains(&"deployment".to_owned()));
}

/// The shared streams of `d`, as its status shows them: name → counters.
async fn shared_streams(d: &Daemon) -> Vec<(String, serde_json::Value)> {
    d.status()
        .await
        .and_then(|s| s["shared_streams"].as_object().cloned())
        .map(|m| m.into_iter().collect())
        .unwrap_or_default()
}

/// Each partition's shared stream carries only its own namespaces' data events: its `$match`
/// leaves out every listed namespace of the other partitions (without it, each of the four
/// streams would read every write). A collection created later in another partition reaches
/// the stream until a listing has seen it; the stream then reopens with it left out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitions_stream_leaves_out_the_other_partitions_data_events() {
    let c = clusters_with_partitioned_collections(PARTITIONED_COLLECTIONS, 50).await;
    let config = format!(
        "[source]\nstream_scope = \"deployment\"\n\n{}",
        partitioned_config(4)
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = instance_with(&c, dir_a.path(), &config, "syncd-a");
    let b = instance_with(&c, dir_b.path(), &config, "syncd-b");
    wait_balanced(&[&a, &b], 4, 2, "two instances").await;
    let streams = || async {
        let mut all = shared_streams(&a).await;
        all.extend(shared_streams(&b).await);
        all
    };
    let count = |v: &serde_json::Value, field: &str| v[field].as_u64().unwrap_or(0);
    let mut collections = partitioned_collections(PARTITIONED_COLLECTIONS);
    wait_until(
        "every namespace joined its partition's stream",
        T,
        || async {
            let all = streams().await;
            all.iter().map(|(_, v)| count(v, "members")).sum::<u64>()
                == PARTITIONED_COLLECTIONS as u64
        },
    )
    .await;
    let before: u64 = streams()
        .await
        .iter()
        .map(|(_, v)| count(v, "events_read"))
        .sum();
    let (writer, stop_writing) = partitioned_writer(&c.src);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap() as u64;
    wait_converged(&c, &in_part(&collections), T).await;
    let all = streams().await;
    let read: u64 = all
        .iter()
        .map(|(_, v)| count(v, "events_read"))
        .sum::<u64>()
        - before;
    for (name, v) in &all {
        assert_eq!(count(v, "foreign_events"), 0, "{name}: {v}");
        assert_eq!(
            count(v, "excluded_namespaces") + count(v, "members"),
            PARTITIONED_COLLECTIONS as u64,
            "{name} leaves out exactly the others' namespaces: {v}"
        );
    }
    assert!(
        written > 200 && read <= written + 20,
        "{written} writes, read {read} times by the partitions' streams: {all:?}"
    );

    // New collections, most of them in other partitions than any one stream's.
    let (more_writer, stop_more) = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let db = c.src.database("part");
        let task = tokio::spawn(async move {
            let mut version = 0_i64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                version += 1;
                db.collection::<Document>(&format!("n{}", version % 8))
                    .update_one(doc! {"_id": 0_i64}, doc! {"$set": {"v": version}})
                    .upsert(true)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        (task, stop)
    };
    collections.extend((0..8).map(|i| format!("n{i}")));
    let total = collections.len() as u64;
    wait_until(
        "every partition's stream left out the new namespaces of the others",
        T,
        || async {
            let all = streams().await;
            all.iter().map(|(_, v)| count(v, "members")).sum::<u64>() == total
                && all
                    .iter()
                    .all(|(_, v)| count(v, "excluded_namespaces") + count(v, "members") == total)
        },
    )
    .await;
    let leaked: Vec<u64> = streams()
        .await
        .iter()
        .map(|(_, v)| count(v, "foreign_events"))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<u64> = streams()
        .await
        .iter()
        .map(|(_, v)| count(v, "foreign_events"))
        .collect();
    assert_eq!(
        leaked, after,
        "narrowed again, no other partition's event arrives"
    );
    stop_more.store(true, std::sync::atomic::Ordering::Relaxed);
    more_writer.await.unwrap();
    wait_converged(&c, &in_part(&collections), T).await;
}

/// `ha.fencing = "transaction"`: the batch of a deposed owner that reaches the destination
/// only after the new owner stamped the checkpoints (a process paused between its deadline
/// check and its send, a packet held in the network) is refused as a whole, data included:
/// the transaction's checkpoint write no longer matches. The same batch written per document
/// (what lease fencing relies on timing to prevent) would have put an older version back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_transaction_fencing_a_batch_arriving_after_a_takeover_never_lands() {
    use mongo_syncd::{
        apply::{conflict::ConflictSettings, Applier},
        checkpoint::{Checkpoint, CheckpointKey, CheckpointStore},
        config::UpdateMode,
        metadata::Metadata,
        metrics::Metrics,
        model::event::ChangeEvent,
        source::{Namespace, Source},
    };
    let c = Clusters::start().await;
    let src = c.src.database("ha").collection::<Document>("docs");
    src.insert_one(doc! {"_id": 1_i64, "v": 1_i64})
        .await
        .unwrap();
    let mut stream = src
        .watch()
        .await
        .unwrap()
        .with_type::<bson::RawDocumentBuf>();
    src.update_one(doc! {"_id": 1_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();
    let raw = stream.try_next().await.unwrap().expect("an update event");
    let event = ChangeEvent::parse(raw).unwrap();
    // The new owner has already applied a newer version.
    let dst = c.dst.database("ha").collection::<Document>("docs");
    dst.insert_one(doc! {"_id": 1_i64, "v": 5_i64})
        .await
        .unwrap();

    let meta = c.dst.database("mongo_syncd");
    let bound = Some(Duration::from_secs(1));
    let key = CheckpointKey {
        sync_id: "default".into(),
        ns: "ha.docs".into(),
        uuid: None,
    };
    let old_owner = CheckpointStore::new(&meta, bound)
        .with_epoch(1)
        .with_transaction_fencing();
    old_owner.save(&key, &Checkpoint::default()).await.unwrap();
    let new_owner = CheckpointStore::new(&meta, bound).with_epoch(2);
    new_owner.stamp_epoch("default").await.unwrap();

    let ns = Namespace::new("ha", "docs");
    let applier = Applier::new(
        ns.clone(),
        ns,
        &c.dst,
        Source::new(c.src.clone(), bound),
        Metadata::new(&meta, bound),
        Metrics::new(10),
        "default".into(),
        UpdateMode::Delta,
        bound,
        ConflictSettings::default(),
    );
    let next = Checkpoint {
        applied_through: Some(event.cluster_time),
        ..Default::default()
    };
    let write = old_owner
        .fencing_write(&key, &next)
        .unwrap()
        .expect("a fencing write under transaction fencing");
    let refused = applier
        .apply_fenced(std::slice::from_ref(&event), None, write)
        .await
        .expect_err("the deposed owner's batch must be refused");
    assert_eq!(
        refused.kind,
        mongo_syncd::error::ErrorKind::Cancelled,
        "{refused}"
    );
    let now = dst.find_one(doc! {"_id": 1_i64}).await.unwrap().unwrap();
    assert_eq!(
        now.get_i64("v").ok(),
        Some(5),
        "the older version landed: {now}"
    );

    // Per document, the same batch puts the older version back.
    applier
        .apply_events(std::slice::from_ref(&event), None)
        .await
        .unwrap();
    let now = dst.find_one(doc! {"_id": 1_i64}).await.unwrap().unwrap();
    assert_eq!(now.get_i64("v").ok(), Some(2), "{now}");

    // The current owner's batch in a copy's replay window is fenced the same way: its delta
    // is a replay, so the document is read from the source as of the batch's end and
    // written in the transaction with the checkpoint.
    dst.replace_one(doc! {"_id": 1_i64}, doc! {"_id": 1_i64, "v": 9_i64})
        .await
        .unwrap();
    let current = CheckpointStore::new(&meta, bound)
        .with_epoch(2)
        .with_transaction_fencing();
    let write = current.fencing_write(&key, &next).unwrap().unwrap();
    let stats = applier
        .apply_fenced(
            std::slice::from_ref(&event),
            Some(event.cluster_time),
            write,
        )
        .await
        .unwrap()
        .expect("a replayed batch written in a fenced transaction");
    assert_eq!(stats.repaired, 1, "the replayed delta was not read again");
    let now = dst.find_one(doc! {"_id": 1_i64}).await.unwrap().unwrap();
    assert_eq!(now.get_i64("v").ok(), Some(2), "{now}");
    let saved = current.load(&key).await.unwrap().expect("the checkpoint");
    assert_eq!(saved.applied_through, Some(event.cluster_time));
}

/// `ha.fencing = "transaction"`: a copied range that reaches the destination after a takeover
/// (read by the deposed owner before it) is refused whole — its deletions of destination
/// extras, its documents and its checkpoint. The holder of the current epoch writes the same
/// range in one transaction, checkpoint included; written per document, the deposed owner's
/// range would have put the older version back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_transaction_fencing_a_copied_range_arriving_after_a_takeover_never_lands() {
    use mongo_syncd::{
        apply::{conflict::ConflictSettings, Applier},
        checkpoint::{Checkpoint, CheckpointKey, CheckpointStore},
        config::UpdateMode,
        metadata::Metadata,
        metrics::Metrics,
        source::{Namespace, Source},
    };
    let c = Clusters::start().await;
    let dst = c.dst.database("ha").collection::<Document>("docs");
    // The new owner has already applied a newer version of 1, and holds 3 (an extra to the
    // range the old owner read).
    dst.insert_many([
        doc! {"_id": 1_i64, "v": 5_i64},
        doc! {"_id": 3_i64, "v": 5_i64},
    ])
    .await
    .unwrap();
    let range: Vec<bson::RawDocumentBuf> = [1_i64, 2]
        .iter()
        .map(|&id| bson::RawDocumentBuf::try_from(&doc! {"_id": id, "v": 2_i64}).unwrap())
        .collect();
    let extras = [bson::Bson::Int64(3)];

    let meta = c.dst.database("mongo_syncd");
    let bound = Some(Duration::from_secs(1));
    let key = CheckpointKey {
        sync_id: "default".into(),
        ns: "ha.docs".into(),
        uuid: None,
    };
    let old_owner = CheckpointStore::new(&meta, bound)
        .with_epoch(1)
        .with_transaction_fencing();
    old_owner.save(&key, &Checkpoint::default()).await.unwrap();
    let new_owner = CheckpointStore::new(&meta, bound)
        .with_epoch(2)
        .with_transaction_fencing();
    new_owner.stamp_epoch("default").await.unwrap();

    let ns = Namespace::new("ha", "docs");
    let applier = Applier::new(
        ns.clone(),
        ns,
        &c.dst,
        Source::new(c.src.clone(), bound),
        Metadata::new(&meta, bound),
        Metrics::new(10),
        "default".into(),
        UpdateMode::Delta,
        bound,
        ConflictSettings::default(),
    );
    let mut after = Checkpoint::default();
    after.copy.copied = 2;
    after.copy.last_range = Some(bson::Bson::Int64(3));
    let write = old_owner
        .fencing_write(&key, &after)
        .unwrap()
        .expect("a fencing write under transaction fencing");
    let refused = applier
        .copy_range_fenced(&extras, &range, write)
        .await
        .expect_err("the deposed owner's range must be refused");
    assert_eq!(
        refused.kind,
        mongo_syncd::error::ErrorKind::Cancelled,
        "{refused}"
    );
    let held = |id: i64| {
        let dst = dst.clone();
        async move {
            dst.find_one(doc! {"_id": id})
                .await
                .unwrap()
                .and_then(|d| d.get_i64("v").ok())
        }
    };
    assert_eq!(held(1).await, Some(5), "the older version landed");
    assert_eq!(
        held(2).await,
        None,
        "a document of the refused range landed"
    );
    assert_eq!(held(3).await, Some(5), "the refused range deleted an extra");

    // The current owner's range commits with its checkpoint.
    let write = new_owner.fencing_write(&key, &after).unwrap().unwrap();
    assert!(applier
        .copy_range_fenced(&extras, &range, write)
        .await
        .unwrap());
    assert_eq!(
        (held(1).await, held(2).await, held(3).await),
        (Some(2), Some(2), None)
    );
    let saved = new_owner.load(&key).await.unwrap().expect("the checkpoint");
    assert_eq!(saved.copy.copied, 2);
    assert_eq!(saved.copy.last_range, Some(bson::Bson::Int64(3)));

    // Per document, the deposed owner's range puts the older version back.
    dst.replace_one(doc! {"_id": 1_i64}, doc! {"_id": 1_i64, "v": 7_i64})
        .await
        .unwrap();
    applier.upsert_documents(&range[..1]).await.unwrap();
    assert_eq!(held(1).await, Some(2));
}

/// Two instances, two partitions, one each. SIGSTOP one past its lease: the other takes its
/// partition. SIGCONT: the paused one finds its deadline passed, steps down from every
/// partition without writing, then takes its share again. No version ever goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_partition_holder_steps_down_from_all_and_no_older_version_lands() {
    let c = clusters_with_partitioned_collections(PARTITIONED_COLLECTIONS, 50).await;
    let config = partitioned_config(2);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = instance_with(&c, dir_a.path(), &config, "syncd-a");
    let mut b = instance_with(&c, dir_b.path(), &config, "syncd-b");
    wait_balanced(&[&a, &b], 2, 1, "two instances").await;
    let collections = partitioned_collections(PARTITIONED_COLLECTIONS);
    let namespaces = in_part(&collections);
    wait_converged(&c, &namespaces, T).await;
    let (recorder, stop_recording) = record_partitioned_versions(&c.dst);
    let (writer, stop_writing) = partitioned_writer(&c.src);
    tokio::time::sleep(Duration::from_millis(500)).await;

    a.signal("STOP");
    wait_balanced(&[&b], 2, 2, "the paused instance's partition moved").await;
    // The survivor applies newer versions of the moved partition while the old holder sleeps.
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.signal("CONT");
    wait_balanced(&[&a, &b], 2, 1, "balanced again").await;
    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    wait_converged(&c, &namespaces, T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_recording.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = recorder.await.unwrap();
    assert!(seen.len() > 100, "only {} destination changes", seen.len());
    assert_eq!(version_regressions(&seen), vec![], "older versions landed");
    let logs = a.all_logs();
    assert!(
        logs.contains("stepping down from every partition"),
        "{logs}"
    );
    let logs = b.all_logs();
    assert!(!logs.contains("lost the lease"), "{logs}");
    assert!(
        !logs.contains("destination write refused"),
        "a handover refused the other partition's writes:\n{logs}"
    );
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
    assert_eq!(b.terminate().await, Some(0), "{}", b.logs());
}

/// `--reset-identity` discards every checkpoint and re-copies: with partitions, other
/// instances may be syncing at that moment, so it is refused before anything is written.
#[tokio::test]
async fn reset_identity_is_refused_with_partitions() {
    let c = Clusters::start().await;
    seed(&c.src, "part", "c0", 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(&c, dir.path(), &partitioned_config(2));
    d.spawn_with_env(
        &["--reset-identity"],
        &[("MONGO_SYNCD_DESTINATION__SOCKET_TIMEOUT_MS", "1000")],
    );
    assert_eq!(d.wait_exit(T).await, Some(78), "{}", d.logs());
    assert!(
        d.logs()
            .contains("--reset-identity cannot run with ha.partitions > 1"),
        "{}",
        d.logs()
    );
    let written = c
        .dst
        .database("mongo_syncd")
        .list_collection_names()
        .await
        .unwrap();
    assert!(
        !written.iter().any(|n| n == "checkpoints" || n == "leases"),
        "something was written: {written:?}"
    );
}

/// Soak round 90300 (a handover with 98 namespaces draining): every pooled destination
/// connection was held by a data write, a lease renewal waited for one past its deadline, and
/// a healthy active lost its lease. The leases have connections of their own: with the data
/// writes holding the only pooled connection (`max_pool_size = 1`, every write delayed by
/// 900 ms), the active keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewals_never_wait_behind_the_data_writes_for_a_connection() {
    let c = Clusters::start().await;
    const COLLECTIONS: [&str; 6] = ["c0", "c1", "c2", "c3", "c4", "c5"];
    let namespaces: Vec<(&str, &str)> = COLLECTIONS.iter().map(|n| ("ha", *n)).collect();
    for name in COLLECTIONS {
        seed(&c.src, "ha", name, 20).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut a = Daemon::configure(&c, dir.path(), &ha_config("ha.*"));
    a.spawn_with_env(
        &[],
        &[
            ("MONGO_SYNCD_DESTINATION__SOCKET_TIMEOUT_MS", "1000"),
            ("MONGO_SYNCD_DESTINATION__MAX_POOL_SIZE", "1"),
            ("MONGO_SYNCD_DESTINATION__APP_NAME", "syncd-a"),
        ],
    );
    wait_role(&a, "active", T).await;
    wait_converged(&c, &namespaces, T).await;
    c.dest
        .configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["insert", "update", "delete"],
                     "appName": "syncd-a", "blockConnection": true, "blockTimeMS": 900},
        })
        .unwrap();
    // Three leases of writes to six collections: six workers wait for the one pooled
    // connection.
    let until = Instant::now() + Duration::from_secs(3 * LEASE_SECONDS);
    let mut round = 0_i64;
    while Instant::now() < until {
        round += 1;
        for name in COLLECTIONS {
            c.src
                .database("ha")
                .collection::<Document>(name)
                .update_one(doc! {"_id": round % 20}, doc! {"$set": {"v": round}})
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.dest
        .configure_fail_point(&doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .unwrap();
    wait_converged(&c, &namespaces, T).await;
    assert_eq!(
        a.metric("mongo_syncd_lease_losses_total").await,
        Some(0.0),
        "the active lost its lease:\n{}",
        a.logs()
    );
    assert_eq!(role(&a).await, Some("active"));
    assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
}

/// The lease of the only instance, as the destination has it.
async fn the_lease(c: &Clusters) -> Document {
    c.dst
        .database("mongo_syncd")
        .collection::<Document>("leases")
        .find_one(doc! {})
        .await
        .unwrap()
        .expect("a lease")
}

/// Soak round 90300: an instance asked to stop lost its lease while it drained, went back to
/// standby, and took the free lease again (a new epoch) on its way out; its release then
/// failed, and the real standby waited for that lease to expire. Here the active is paused
/// past its lease, then stopped: it steps down and exits without a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_instance_whose_lease_lapsed_takes_no_lease() {
    let c = Clusters::start().await;
    seed(&c.src, "ha", "items", 10).await;
    let dir = tempfile::tempdir().unwrap();
    let mut a = instance(&c, dir.path(), "ha.*", "syncd-a");
    wait_role(&a, "active", T).await;
    wait_converged(&c, &[("ha", "items")], T).await;
    a.signal("STOP");
    wait_until("the paused active's lease expires", T, || async {
        let expires = the_lease(&c).await.get_datetime("expires_at").copied();
        expires.is_ok_and(|at| at < bson::DateTime::now())
    })
    .await;
    a.signal("TERM");
    a.signal("CONT");
    assert_eq!(a.wait_exit(T).await, Some(0), "{}", a.logs());
    let lease = the_lease(&c).await;
    assert_eq!(
        lease.get_i64("epoch").ok(),
        Some(1),
        "{lease}\n{}",
        a.logs()
    );
    assert!(a.logs().contains("lost the lease"), "{}", a.logs());
}

/// CI run of 718a89d: the survivor of two partitioned instances, stopped just after the
/// other one left, did not exit 0. Here the survivor is stopped at several moments around
/// taking over the released partition: each time it drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_stopped_while_it_takes_over_a_released_partition_exits_0() {
    let c = clusters_with_partitioned_collections(PARTITIONED_COLLECTIONS, 20).await;
    let config = partitioned_config(2);
    for delay_ms in [0_u64, 300, 600, 900, 1200] {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut a = instance_with(&c, dir_a.path(), &config, "syncd-a");
        let mut b = instance_with(&c, dir_b.path(), &config, "syncd-b");
        wait_balanced(&[&a, &b], 2, 1, "two instances").await;
        assert_eq!(a.terminate().await, Some(0), "{}", a.logs());
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        assert_eq!(
            b.terminate().await,
            Some(0),
            "stopped {delay_ms} ms after the other instance left:\n{}",
            b.logs()
        );
    }
}

//! Continuous validation with repair (DESIGN §2.7, §2.8): tampering behind the daemon's back is
//! reported exactly (by `mongo-syncd validate` and by the daemon), repaired through the worker,
//! and live writes never raise a false alarm.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::Client;
use rand::Rng;
use serde_json::{json, Value};

use crate::support::{
    self,
    cluster::{free_port, wait_converged, wait_until, Clusters, Daemon},
};

const TOKEN: &str = "validation-test-token";
const DB: &str = "shop";
const COLL: &str = "orders";
const NS: &str = "shop.orders";

/// Config lines appended after `[http] listen = ...`: the first line still belongs to `[http]`.
fn extra(validation: &str) -> String {
    format!(
        "token = \"{TOKEN}\"\n\n[sync]\nnamespaces = [\"{DB}.*\"]\n\n[validation]\n{validation}\n"
    )
}

async fn seed(client: &Client, n: i32) {
    let coll = client.database(DB).collection::<Document>(COLL);
    let mut start = 0;
    while start < n {
        let end = (start + 5_000).min(n);
        let docs: Vec<Document> = (start..end)
            .map(|i| doc! {"_id": i, "n": i, "pad": "0123456789abcdef", "tags": ["a", "b"]})
            .collect();
        coll.insert_many(docs).await.unwrap();
        start = end;
    }
}

async fn start_synced(c: &Clusters, dir: &Path, validation: &str) -> Daemon {
    let d = Daemon::start(c, dir, &extra(validation));
    wait_converged(c, &[(DB, COLL)], Duration::from_secs(120)).await;
    wait_until(
        "the namespace is streaming",
        Duration::from_secs(60),
        || async { d.namespace_state(NS).await.as_deref() == Some("streaming") },
    )
    .await;
    d
}

/// Runs `mongo-syncd validate --config <daemon's config> --json ...` off the runtime's
/// threads (the simulators live on them).
async fn cli(config: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let mut all: Vec<String> = vec![
        "validate".into(),
        "--config".into(),
        config.display().to_string(),
        "--json".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let run = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        support::run(&refs)
    })
    .await
    .unwrap();
    let json = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        )
    });
    (run.code, json, run.stderr)
}

fn namespace_report<'a>(report: &'a Value, ns: &str) -> &'a Value {
    report["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["namespace"] == ns)
        .unwrap_or_else(|| panic!("no report for {ns} in {report:#}"))
}

fn ids(list: &Value) -> Vec<Value> {
    list["ids"].as_array().cloned().unwrap_or_default()
}

/// Tampering on the destination, behind the daemon's back: in the first range two documents
/// deleted, one modified and one with its fields reordered; the whole second range missing;
/// two documents added in the last range.
async fn tamper(c: &Clusters) {
    let dst = c.dst.database(DB).collection::<Document>(COLL);
    dst.delete_many(doc! {"_id": {"$in": [5, 17]}})
        .await
        .unwrap();
    dst.update_one(doc! {"_id": 25}, doc! {"$set": {"n": -1}})
        .await
        .unwrap();
    dst.replace_one(
        doc! {"_id": 33},
        doc! {"_id": 33, "pad": "0123456789abcdef", "tags": ["a", "b"], "n": 33},
    )
    .await
    .unwrap();
    dst.delete_many(doc! {"_id": {"$gte": 10_000, "$lt": 20_000}})
        .await
        .unwrap();
    dst.insert_many(vec![
        doc! {"_id": 20_000.5, "n": 0},
        doc! {"_id": "zzz", "n": 0},
    ])
    .await
    .unwrap();
}

/// The exact findings [`tamper`] must produce, in a report's JSON.
fn assert_tampering_reported(r: &Value) {
    assert_eq!(r["result"], "mismatch", "{r:#}");
    assert_eq!(r["ranges_checked"], 3, "{r:#}");
    assert_eq!(r["documents"]["source"], 25_000, "{r:#}");
    assert_eq!(
        r["documents"]["destination"],
        25_000 - 2 - 10_000 + 2,
        "{r:#}"
    );
    // 2 deleted + 1 modified + 10,000 missing + 2 added; the field reorder is not drift.
    assert_eq!(r["mismatched_documents"], 10_005, "{r:#}");
    assert_eq!(r["order_only_documents"], 1, "{r:#}");
    assert_eq!(r["unverified_documents"], 0, "{r:#}");
    let ranges = r["mismatched_ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 3, "{r:#}");
    let first = &ranges[0];
    assert_eq!(first["lower"], json!({"$minKey": 1}));
    assert_eq!(first["upper"], json!(10_000));
    assert_eq!(ids(&first["missing"]), vec![json!(5), json!(17)]);
    assert_eq!(ids(&first["content"]), vec![json!(25)]);
    assert_eq!(ids(&first["order_only"]), vec![json!(33)]);
    assert_eq!(first["extra"]["count"], 0);
    let second = &ranges[1];
    assert_eq!(second["lower"], json!(10_000));
    assert_eq!(second["upper"], json!(20_000));
    assert_eq!(second["missing"]["count"], 10_000);
    let listed = ids(&second["missing"]);
    assert_eq!(listed.len(), 1_000, "id lists are capped, counts exact");
    assert_eq!(listed[0], json!(10_000));
    let third = &ranges[2];
    assert_eq!(third["lower"], json!(20_000));
    assert_eq!(third["upper"], json!({"$maxKey": 1}));
    assert_eq!(ids(&third["extra"]), vec![json!(20_000.5), json!("zzz")]);
    assert_eq!(third["missing"]["count"], 0);
    assert_eq!(third["content"]["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reports_exactly_the_tampered_ids_and_ranges() {
    let c = Clusters::start().await;
    seed(&c.src, 25_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_synced(&c, dir.path(), "interval_seconds = 0").await;

    let (code, report, stderr) = cli(&d.config_path, &["--wait-seconds", "30"]).await;
    assert_eq!(code, Some(0), "{report:#}\n{stderr}");
    assert_eq!(report["result"], "match");
    let r = namespace_report(&report, NS);
    assert_eq!(r["result"], "match");
    assert_eq!(r["ranges_checked"], 3);
    assert_eq!(r["mismatched_ranges"], json!([]));

    tamper(&c).await;
    let (code, report, stderr) = cli(&d.config_path, &["--wait-seconds", "30"]).await;
    assert_eq!(code, Some(1), "{report:#}\n{stderr}");
    assert_eq!(report["exit_code"], 1);
    assert_tampering_reported(namespace_report(&report, NS));

    // The human report names the same _ids.
    let config = d.config_path.display().to_string();
    let text = tokio::task::spawn_blocking(move || {
        support::run(&["validate", "--config", &config, "--wait-seconds", "30"])
    })
    .await
    .unwrap();
    assert_eq!(text.code, Some(1), "{}", text.stderr);
    for line in [
        "shop.orders -> shop.orders: MISMATCH",
        "range [MinKey, 10000):",
        "missing on destination: 2 (_id 5, 17)",
        "content differs: 1 (_id 25)",
        "field order differs: 1 (_id 33)",
        "range [10000, 20000):",
        "missing on destination: 10000 (_id 10000, 10001,",
        "range [20000, MaxKey):",
        "extra on destination: 2 (_id 20000.5, \"zzz\")",
        "result: drift found (exit 1)",
    ] {
        assert!(
            text.stdout.contains(line),
            "{line:?} not in:\n{}",
            text.stdout
        );
    }
    // The CLI never repairs: the destination is still tampered with.
    let dst = c.dst.database(DB).collection::<Document>(COLL);
    assert_eq!(dst.count_documents(doc! {}).await.unwrap(), 15_000);

    // A destination collection whose options differ from the source's is reported.
    c.dst
        .database(DB)
        .run_command(doc! {"collMod": COLL, "validator": {"n": {"$exists": true}}})
        .await
        .unwrap();
    let (code, report, _) = cli(&d.config_path, &["--wait-seconds", "30"]).await;
    assert_eq!(code, Some(1), "{report:#}");
    let differ = &namespace_report(&report, NS)["options_differ"];
    let validator = differ
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["option"] == "validator")
        .unwrap_or_else(|| panic!("no validator difference in {differ:#}"));
    assert_eq!(validator["source"], Value::Null);
    assert_eq!(validator["destination"], json!({"n": {"$exists": true}}));

    // Every run left its report in the validations collection.
    let stored: Vec<Document> = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("validations")
        .find(doc! {"namespace": NS, "runner": "cli", "state": "finished"})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

async fn post_validate(d: &Daemon) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{}/api/v1/validate", d.http))
        .bearer_auth(TOKEN)
        .json(&json!({"namespaces": [NS]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn finished_daemon_reports(c: &Clusters) -> Vec<Document> {
    c.dst
        .database("mongo_syncd")
        .collection::<Document>("validations")
        .find(doc! {"namespace": NS, "runner": "daemon", "state": "finished"})
        .sort(doc! {"finished_at": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn wait_reports(c: &Clusters, n: usize, timeout: Duration) -> Vec<Document> {
    wait_until(
        &format!("{n} finished validation passes"),
        timeout,
        || async { finished_daemon_reports(c).await.len() >= n },
    )
    .await;
    finished_daemon_reports(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_reports_and_repairs_then_the_next_pass_matches() {
    let c = Clusters::start().await;
    seed(&c.src, 25_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_synced(&c, dir.path(), "interval_seconds = 0\nrepair = true").await;

    tamper(&c).await;
    // SIGUSR2: validate everything now.
    d.signal("USR2");
    let reports = wait_reports(&c, 1, Duration::from_secs(120)).await;
    let first = Bson::Document(reports[0].clone()).into_relaxed_extjson();
    assert_tampering_reported(&first);
    assert_eq!(first["trigger"], "request");
    assert_eq!(first["documents_repaired"], 10_005, "{first:#}");
    for range in first["mismatched_ranges"].as_array().unwrap() {
        assert_eq!(range["repair"]["after"], "match", "{range:#}");
    }
    assert_eq!(
        first["mismatched_ranges"][1]["repair"]["upserted"], 10_000,
        "{first:#}"
    );
    assert_eq!(first["mismatched_ranges"][2]["repair"]["deleted"], 2);
    // The repair went through the worker: the destination equals the source again.
    wait_converged(&c, &[(DB, COLL)], Duration::from_secs(30)).await;

    // The status and metrics carry the result.
    let status = d.status().await.unwrap();
    let last = &status["namespaces"][NS]["last_validation"];
    assert_eq!(last["result"], "mismatch", "{status:#}");
    assert_eq!(last["mismatched_documents"], 10_005);
    assert_eq!(last["repaired"], 10_005);
    let runs = |result: &'static str| {
        let d = &d;
        async move {
            d.metric(&format!(
                "mongo_syncd_validation_runs_total{{namespace=\"{NS}\",result=\"{result}\"}}"
            ))
            .await
        }
    };
    assert_eq!(runs("mismatch").await, Some(1.0));

    // The next pass (HTTP this time) finds nothing.
    assert_eq!(post_validate(&d).await, 202);
    let reports = wait_reports(&c, 2, Duration::from_secs(120)).await;
    let second = Bson::Document(reports[1].clone()).into_relaxed_extjson();
    assert_eq!(second["result"], "match", "{second:#}");
    assert_eq!(second["mismatched_ranges"], json!([]));
    assert_eq!(second["ranges_checked"], 3);
    assert_eq!(runs("match").await, Some(1.0));
    assert_eq!(
        d.metric(&format!(
            "mongo_syncd_validation_mismatched_documents{{namespace=\"{NS}\"}}"
        ))
        .await,
        Some(0.0)
    );
    let success = d
        .metric(&format!(
            "mongo_syncd_validation_last_success_timestamp_seconds{{namespace=\"{NS}\"}}"
        ))
        .await
        .unwrap();
    assert!(success > 1.0e9, "{success}");
    // _id values never reach the logs.
    let logs = d.all_logs();
    assert!(
        !logs.contains("zzz"),
        "an _id leaked into the logs:\n{logs}"
    );
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

/// Writers doing inserts, updates, replaces and deletes on random `_id`s until `stop`.
fn spawn_writers(
    c: &Clusters,
    writers: usize,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let coll = c.src.database(DB).collection::<Document>(COLL);
            let stop = Arc::clone(&stop);
            let ops = Arc::clone(&ops);
            tokio::spawn(async move {
                let mut next_insert = 1_000_000 + w as i32 * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let (op, id) = {
                        let mut rng = rand::rng();
                        (rng.random_range(0..10u8), rng.random_range(0..30_000i32))
                    };
                    let r = match op {
                        0..=3 => coll
                            .update_one(
                                doc! {"_id": id},
                                doc! {"$inc": {"n": 1}, "$set": {"w": w as i32}},
                            )
                            .await
                            .map(|_| ()),
                        4 => coll
                            .replace_one(doc! {"_id": id}, doc! {"replaced": w as i32, "n": id})
                            .await
                            .map(|_| ()),
                        5 => coll.delete_one(doc! {"_id": id}).await.map(|_| ()),
                        6 => coll
                            .update_one(doc! {"_id": id}, doc! {"$set": {"n": id}})
                            .upsert(true)
                            .await
                            .map(|_| ()),
                        _ => {
                            next_insert += 1;
                            coll.insert_one(doc! {"_id": next_insert, "n": 0})
                                .await
                                .map(|_| ())
                        }
                    };
                    r.unwrap();
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_live_writes_raise_no_false_mismatch_over_repeated_passes() {
    let c = Clusters::start().await;
    seed(&c.src, 30_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_synced(&c, dir.path(), "interval_seconds = 1").await;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writers = spawn_writers(&c, 4, Arc::clone(&stop), Arc::clone(&ops));
    // Passes that ran entirely while the writers were writing.
    let before = finished_daemon_reports(&c).await.len();
    let during = wait_reports(&c, before + 3, Duration::from_secs(240)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let ops = ops.load(Ordering::Relaxed);
    assert!(ops > 1_000, "the workload was not heavy: {ops} writes");
    let (mut rechecked, mut rechecked_docs, mut unverified) = (0, 0, 0);
    for r in &during {
        let r = Bson::Document(r.clone()).into_relaxed_extjson();
        assert_ne!(
            r["result"], "mismatch",
            "a false alarm under live writes: {r:#}"
        );
        assert_ne!(r["result"], "error", "{r:#}");
        assert_eq!(r["mismatched_documents"], 0, "{r:#}");
        rechecked += r["ranges_rechecked"].as_i64().unwrap();
        rechecked_docs += r["documents_rechecked"].as_i64().unwrap();
        unverified += r["unverified_documents"].as_i64().unwrap();
    }
    // The writes did reach the ranges being compared: the re-check was exercised, and it
    // resolved every difference.
    assert!(
        rechecked > 0,
        "no range ever differed at first sight: the test proves nothing"
    );
    // Once the writes stop and the stream has caught up, a pass matches.
    wait_converged(&c, &[(DB, COLL)], Duration::from_secs(60)).await;
    let n = finished_daemon_reports(&c).await.len();
    let after = wait_reports(&c, n + 2, Duration::from_secs(120)).await;
    let last = Bson::Document(after.last().unwrap().clone()).into_relaxed_extjson();
    assert_eq!(last["result"], "match", "{last:#}");
    assert_eq!(
        d.metric(&format!(
            "mongo_syncd_validation_runs_total{{namespace=\"{NS}\",result=\"mismatch\"}}"
        ))
        .await,
        Some(0.0)
    );
    eprintln!(
        "{} passes under {ops} live writes; {rechecked} ranges ({rechecked_docs} documents) re-checked, {unverified} left unverified; no mismatch",
        during.len() - before
    );
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_under_live_writes_is_found_exactly_and_repaired_through_the_worker() {
    let c = Clusters::start().await;
    seed(&c.src, 30_000).await;
    // Documents the writers never touch (string _ids sort after every number).
    let quiet: Vec<Document> = (0..10)
        .map(|i| doc! {"_id": format!("quiet-{i}"), "n": i})
        .collect();
    c.src
        .database(DB)
        .collection::<Document>(COLL)
        .insert_many(quiet)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_synced(&c, dir.path(), "interval_seconds = 1\nrepair = true").await;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writers = spawn_writers(&c, 3, Arc::clone(&stop), Arc::clone(&ops));
    wait_until("writes flowing", Duration::from_secs(10), || async {
        ops.load(Ordering::Relaxed) > 100
    })
    .await;
    let before = finished_daemon_reports(&c).await.len();
    // Both tamperings in one transaction, so no pass can see only one of them.
    let dst = c.dst.database(DB).collection::<Document>(COLL);
    let mut session = c.dst.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    dst.update_one(doc! {"_id": "quiet-3"}, doc! {"$set": {"n": -1}})
        .session(&mut session)
        .await
        .unwrap();
    dst.delete_one(doc! {"_id": "quiet-5"})
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    // Passes finished since the tampering: the first with findings names exactly the two
    // tampered documents (whatever the writers did meanwhile), repairs them, and every later
    // pass is clean.
    wait_until(
        "a pass found the drift",
        Duration::from_secs(120),
        || async {
            finished_daemon_reports(&c)
                .await
                .iter()
                .any(|r| r.get_str("result").ok() == Some("mismatch"))
        },
    )
    .await;
    let found = finished_daemon_reports(&c).await.len();
    let reports = wait_reports(&c, found + 2, Duration::from_secs(120)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let mut mismatches = 0;
    for r in &reports[before..] {
        let r = Bson::Document(r.clone()).into_relaxed_extjson();
        assert_ne!(r["result"], "error", "{r:#}");
        if r["result"] != "mismatch" {
            assert_eq!(r["mismatched_documents"], 0, "{r:#}");
            continue;
        }
        mismatches += 1;
        assert_eq!(
            mismatches, 1,
            "the drift was reported again after its repair: {r:#}"
        );
        assert_eq!(r["mismatched_documents"], 2, "{r:#}");
        assert_eq!(r["documents_repaired"], 2, "{r:#}");
        let drifted: Vec<&Value> = r["mismatched_ranges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["missing"]["count"] != 0 || x["content"]["count"] != 0)
            .collect();
        assert_eq!(drifted.len(), 1, "{r:#}");
        assert_eq!(ids(&drifted[0]["content"]), vec![json!("quiet-3")]);
        assert_eq!(ids(&drifted[0]["missing"]), vec![json!("quiet-5")]);
        assert_eq!(drifted[0]["extra"]["count"], 0);
        assert_eq!(drifted[0]["repair"]["after"], "match", "{r:#}");
    }
    assert_eq!(mismatches, 1);
    // The repair raced nothing: once the stream has applied the last writes, the sides are equal.
    wait_converged(&c, &[(DB, COLL)], Duration::from_secs(60)).await;
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_interrupted_by_a_restart_continues_from_its_last_finished_range() {
    let c = Clusters::start().await;
    seed(&c.src, 50_000).await;
    let dir = tempfile::tempdir().unwrap();
    // 10,000 documents per second per side: a pass over 5 ranges takes about 5 s.
    let mut d = start_synced(
        &c,
        dir.path(),
        "interval_seconds = 0\nmax_docs_per_second = 10000",
    )
    .await;
    let validations = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("validations");
    d.signal("USR2");
    wait_until("two ranges checked", Duration::from_secs(60), || async {
        validations
            .find_one(doc! {"namespace": NS, "state": "running", "ranges_checked": {"$gte": 2}})
            .await
            .unwrap()
            .is_some()
    })
    .await;
    d.kill9();
    let interrupted = validations
        .find_one(doc! {"namespace": NS, "state": "running"})
        .await
        .unwrap()
        .expect("the interrupted pass is still running in its report");
    let checked = interrupted.get_i64("ranges_checked").unwrap();
    assert!(
        checked < 5,
        "the pass finished before the kill: {interrupted}"
    );
    assert_eq!(
        interrupted.get("next_lower"),
        Some(&Bson::Int32(checked as i32 * 10_000))
    );
    let id = interrupted.get_object_id("_id").unwrap();

    d.spawn(&[]);
    wait_until(
        "the interrupted pass finished",
        Duration::from_secs(120),
        || async {
            validations
                .find_one(doc! {"_id": id, "state": "finished"})
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    let done = validations
        .find_one(doc! {"_id": id})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.get_str("result").unwrap(), "match", "{done}");
    assert_eq!(done.get_i32("resumes").unwrap(), 1, "{done}");
    assert_eq!(done.get_str("trigger").unwrap(), "request");
    // Resumed at the next range, not from zero: every range counted once.
    assert_eq!(done.get_i64("ranges_checked").unwrap(), 5, "{done}");
    assert_eq!(
        done.get_document("documents")
            .unwrap()
            .get_i64("source")
            .unwrap(),
        50_000
    );
    // The throttle held: 50,000 documents at 10,000 per second take about 5 s of scanning.
    let elapsed = done.get_f64("elapsed_seconds").unwrap();
    assert!(
        elapsed >= 4.5,
        "{elapsed}s: max_docs_per_second was not honoured"
    );
    assert!(d
        .logs()
        .contains("continuing an interrupted validation pass"));
    assert_eq!(
        validations
            .count_documents(doc! {"namespace": NS})
            .await
            .unwrap(),
        1,
        "a restart must not start a second pass"
    );
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_mode_compares_counts_only_when_quiet() {
    let c = Clusters::start().await;
    seed(&c.src, 2_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_synced(&c, dir.path(), "interval_seconds = 0\nmode = \"count\"").await;
    let (code, report, stderr) = cli(&d.config_path, &["--wait-seconds", "30"]).await;
    assert_eq!(code, Some(0), "{report:#}\n{stderr}");
    let r = namespace_report(&report, NS);
    assert_eq!(r["mode"], "count");
    assert_eq!(
        r["documents"],
        json!({"source": 2_000, "destination": 2_000})
    );

    // A content change is invisible to counts; deletions are not.
    let dst = c.dst.database(DB).collection::<Document>(COLL);
    dst.update_one(doc! {"_id": 1}, doc! {"$set": {"n": -1}})
        .await
        .unwrap();
    dst.delete_many(doc! {"_id": {"$in": [2, 3, 4]}})
        .await
        .unwrap();
    let (code, report, _) = cli(&d.config_path, &["--wait-seconds", "30"]).await;
    assert_eq!(code, Some(1), "{report:#}");
    let r = namespace_report(&report, NS);
    assert_eq!(r["mismatched_documents"], 3);
    assert_eq!(
        r["documents"],
        json!({"source": 2_000, "destination": 1_997})
    );

    // Under continuous writes the counts are not comparable: unverified, exit 3.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let writers = spawn_writers(&c, 2, Arc::clone(&stop), Arc::clone(&ops));
    wait_until("writes flowing", Duration::from_secs(10), || async {
        ops.load(Ordering::Relaxed) > 50
    })
    .await;
    let (code, report, _) = cli(&d.config_path, &["--wait-seconds", "30"]).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(code, Some(3), "{report:#}");
    let r = namespace_report(&report, NS);
    assert_eq!(r["result"], "unverified");
    assert!(
        r["notes"][0].as_str().unwrap().contains("never quiet"),
        "{r:#}"
    );
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_exit_codes_for_indeterminate_and_could_not_run() {
    let c = Clusters::start().await;
    let dir = tempfile::tempdir().unwrap();
    // No checkpoints yet (the daemon never ran against this destination): exit 4.
    let port = free_port();
    let config = support::write_file(
        dir.path(),
        "never-ran.toml",
        &format!(
            "[source]\nuri = \"{}\"\n\n[destination]\nuri = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            c.source.uri(),
            c.dest.uri()
        ),
    );
    seed(&c.src, 100).await;
    let (code, report, _) = cli(&config, &[]).await;
    assert_eq!(code, Some(4), "{report:#}");
    assert!(
        report["error"].as_str().unwrap().contains("no checkpoints"),
        "{report:#}"
    );

    // An unreachable destination: exit 4.
    let closed = free_port();
    let config = support::write_file(
        dir.path(),
        "unreachable.toml",
        &format!(
            "[source]\nuri = \"{}\"\n\n[destination]\nuri = \"mongodb://127.0.0.1:{closed}/?directConnection=true&serverSelectionTimeoutMS=300\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            c.source.uri()
        ),
    );
    let (code, report, _) = cli(&config, &["--wait-seconds", "1"]).await;
    assert_eq!(code, Some(4), "{report:#}");

    // A destination behind a stopped daemon: the difference cannot be confirmed (the worker
    // never applies past the re-check time), so the answer is "indeterminate", exit 3.
    let mut d = start_synced(&c, dir.path(), "interval_seconds = 0").await;
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
    c.src
        .database(DB)
        .collection::<Document>(COLL)
        .update_one(doc! {"_id": 7}, doc! {"$set": {"n": "changed"}})
        .await
        .unwrap();
    let (code, report, _) = cli(&d.config_path, &["--wait-seconds", "1"]).await;
    assert_eq!(code, Some(3), "{report:#}");
    let r = namespace_report(&report, NS);
    assert_eq!(r["result"], "unverified");
    assert_eq!(r["unverified_documents"], 1);
    assert_eq!(
        ids(&r["mismatched_ranges"][0]["unverified"]),
        vec![json!(7)]
    );
    assert!(
        r["notes"].to_string().contains("did not apply past"),
        "{r:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_never_overrides_a_destination_wins_policy() {
    let c = Clusters::start().await;
    seed(&c.src, 2_000).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_synced(
        &c,
        dir.path(),
        "interval_seconds = 0\nrepair = true\n\n[conflict]\npolicy = \"destination-wins\"\nenable_pre_images = true",
    )
    .await;
    let dst = c.dst.database(DB).collection::<Document>(COLL);
    dst.update_one(doc! {"_id": 25}, doc! {"$set": {"n": -1}})
        .await
        .unwrap();
    d.signal("USR2");
    let reports = wait_reports(&c, 1, Duration::from_secs(60)).await;
    let r = Bson::Document(reports[0].clone()).into_relaxed_extjson();
    // Reported as the difference it is, but not repaired: under destination-wins the
    // destination may differ on purpose.
    assert_eq!(r["result"], "mismatch", "{r:#}");
    assert_eq!(ids(&r["mismatched_ranges"][0]["content"]), vec![json!(25)]);
    assert_eq!(r["mismatched_ranges"][0].get("repair"), None, "{r:#}");
    assert_eq!(r["documents_repaired"], 0);
    assert!(
        r["notes"]
            .to_string()
            .contains("conflict policy destination-wins"),
        "{r:#}"
    );
    let doc = dst.find_one(doc! {"_id": 25}).await.unwrap().unwrap();
    assert_eq!(doc.get_i32("n").unwrap(), -1);
    assert_eq!(d.terminate().await, Some(0), "{}", d.logs());
}

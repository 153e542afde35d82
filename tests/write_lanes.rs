//! Write lanes under random bulk histories and SIGKILLs. The differential soak (tests/soak)
//! never fills a batch with more than 250 statements of one kind, so it never cuts writes into
//! lanes: this test does, with seeded random rounds of bulk updates, delete-and-reinserts,
//! inserts and replaces of thousands of documents, drained with 2 to 16 lanes by a daemon that
//! is killed mid-drain, and checks the exact copy, document by document.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::Collection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::cluster::{diff, wait_converged, Clusters, Daemon};

/// Documents in the collection at the start: every round touches hundreds to thousands of
/// them, so batches of 4,000 events cut their writes into several lanes of ≥ 250 statements.
const DOCUMENTS: i32 = 3_000;

fn document(id: i32, round: i32, rng: &mut StdRng) -> Document {
    doc! {"_id": id, "n": rng.random_range(0..1_000), "round": round, "sub": {"x": id % 7, "tag": format!("t{}", id % 13)}}
}

/// One random bulk operation on the source; returns a description and the change events it
/// makes (one per document written).
async fn random_bulk_op(
    src: &Collection<Document>,
    rng: &mut StdRng,
    round: i32,
    next_id: &mut i32,
) -> (String, u64) {
    let m = rng.random_range(2..5);
    let r = rng.random_range(0..m);
    let filter = doc! {"_id": {"$mod": [m, r]}};
    match rng.random_range(0..6) {
        0 => {
            let v = rng.random_range(0..1_000);
            let n = src
                .update_many(
                    filter.clone(),
                    doc! {"$set": {"n": v, "sub.x": v, "round": round}},
                )
                .await
                .unwrap()
                .modified_count;
            (format!("$set where {filter}"), n)
        }
        1 => {
            let n = src
                .update_many(filter.clone(), doc! {"$inc": {"n": 1, "sub.x": -1}})
                .await
                .unwrap()
                .modified_count;
            (format!("$inc where {filter}"), n)
        }
        2 => {
            // Removes a field, then gives it back with another shape on some of the documents.
            let a = src
                .update_many(filter.clone(), doc! {"$unset": {"sub": ""}})
                .await
                .unwrap()
                .modified_count;
            let back = doc! {"_id": {"$mod": [m * 2, r]}};
            let b = src
                .update_many(back, doc! {"$set": {"sub": {"y": [round, round + 1]}}})
                .await
                .unwrap()
                .modified_count;
            (format!("$unset sub where {filter}, then a new sub"), a + b)
        }
        3 => {
            // Delete and reinsert the same `_id`s with new contents.
            let ids: Vec<i32> = src
                .distinct("_id", filter.clone())
                .await
                .unwrap()
                .into_iter()
                .filter_map(|b| b.as_i32())
                .collect();
            let deleted = src.delete_many(filter.clone()).await.unwrap().deleted_count;
            if !ids.is_empty() {
                let docs: Vec<Document> = ids.iter().map(|&id| document(id, round, rng)).collect();
                src.insert_many(docs).await.unwrap();
            }
            (
                format!("delete and reinsert where {filter}"),
                deleted + ids.len() as u64,
            )
        }
        4 => {
            let count = rng.random_range(300..1_500);
            let docs: Vec<Document> = (*next_id..*next_id + count)
                .map(|id| document(id, round, rng))
                .collect();
            *next_id += count;
            src.insert_many(docs).await.unwrap();
            (format!("insert {count} new documents"), count as u64)
        }
        _ => {
            // Replaces (full documents), one statement each, then deletes without reinsertion.
            let ids: Vec<i32> = src
                .distinct("_id", filter.clone())
                .await
                .unwrap()
                .into_iter()
                .filter_map(|b| b.as_i32())
                .take(300)
                .collect();
            for &id in &ids {
                src.replace_one(doc! {"_id": id}, document(id, round, rng))
                    .await
                    .unwrap();
            }
            let gone = doc! {"_id": {"$mod": [m * 3, r]}};
            let deleted = src.delete_many(gone.clone()).await.unwrap().deleted_count;
            (
                format!("replace {} documents, delete where {gone}", ids.len()),
                ids.len() as u64 + deleted,
            )
        }
    }
}

/// Seeded rounds of random bulk histories, each drained by a daemon with a random lane count
/// (2, 4 or 16) and batch size, killed with SIGKILL once it has applied a random part of the
/// round; the next round's daemon resumes from its checkpoint and replays what the killed one
/// wrote without a checkpoint. At the end the destination must equal the source document by
/// document, nothing may be dead-lettered, and the daemon's trace must show writes cut into
/// lanes. `LANES_SEED` picks the seed (default: three fixed ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bulk_histories_drained_in_lanes_with_kills_stay_exact() {
    let seeds: Vec<u64> = match std::env::var("LANES_SEED") {
        Ok(s) => vec![s.parse().expect("LANES_SEED is a number")],
        Err(_) => vec![11, 12, 13],
    };
    for seed in seeds {
        run_seed(seed).await;
    }
}

async fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Clusters::start().await;
    let src = c.src.database("lanes").collection::<Document>("random");
    let docs: Vec<Document> = (0..DOCUMENTS).map(|id| document(id, 0, &mut rng)).collect();
    src.insert_many(docs).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::configure(
        &c,
        dir.path(),
        "[sync]\nnamespaces = [\"lanes.*\"]\n\n[apply]\nbatch_max_wait_ms = 1000\n",
    );
    d.spawn_with_env(&[], &[]);
    wait_converged(&c, &[("lanes", "random")], Duration::from_secs(60)).await;
    d.wait_streaming("lanes.random").await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());

    let mut next_id = DOCUMENTS;
    let mut history = Vec::new();
    let mut lanes_seen = 0;
    for round in 1..=5 {
        // A backlog written while the daemon is stopped.
        let mut events = 0;
        for _ in 0..rng.random_range(2..5) {
            let (what, n) = random_bulk_op(&src, &mut rng, round, &mut next_id).await;
            history.push(format!("round {round}: {what} ({n} events)"));
            events += n;
        }
        let lanes = [2, 4, 16][rng.random_range(0..3)];
        let batch = [2_000, 4_000, 8_000][rng.random_range(0..3)];
        let kill_after = rng.random_range(1..events.max(2));
        history.push(format!(
            "round {round}: {events} events, write_lanes = {lanes}, batch_max_events = {batch}, SIGKILL after {kill_after} applied"
        ));
        d.spawn_with_env(
            &[],
            &[
                ("MONGO_SYNCD_APPLY__WRITE_LANES", &lanes.to_string()),
                ("MONGO_SYNCD_APPLY__BATCH_MAX_EVENTS", &batch.to_string()),
                ("RUST_LOG", "info,mongo_syncd::apply=trace"),
            ],
        );
        // Killed once it applied part of the round, or when it has finished it.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let applied = d
                .metric("mongo_syncd_events_applied_total{")
                .await
                .unwrap_or(0.0);
            if applied >= kill_after as f64 || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lanes_seen += lane_cut_writes(&d.logs());
        d.kill9();
    }
    // The last run drains what is left and stays up.
    d.spawn_with_env(
        &[],
        &[
            ("MONGO_SYNCD_APPLY__WRITE_LANES", "4"),
            ("RUST_LOG", "info,mongo_syncd::apply=trace"),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while let Some(difference) =
        diff(&c.src, &c.dst, ("lanes", "random"), ("lanes", "random")).await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: not converged after 120 s: {difference}\nhistory:\n{}\nlog:\n{}",
            history.join("\n"),
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lanes_seen += lane_cut_writes(&d.logs());
    let dead: u64 = c
        .dst
        .database("mongo_syncd")
        .collection::<Document>("dead_letters")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(dead, 0, "seed {seed}: dead letters\n{}", history.join("\n"));
    assert!(
        lanes_seen > 0,
        "seed {seed}: no write was cut into lanes\nhistory:\n{}",
        history.join("\n")
    );
    eprintln!(
        "seed {seed}: {} writes cut into lanes; {} documents at the end\n{}",
        lanes_seen,
        src.count_documents(doc! {}).await.unwrap(),
        history.join("\n")
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Writes in `log` that the applier cut into lanes (its `... cut into lanes` trace lines).
fn lane_cut_writes(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" cut into lanes"))
        .count()
}

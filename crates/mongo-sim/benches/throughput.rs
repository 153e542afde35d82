//! Throughput of the simulator through the real driver:
//! (a) `insert_many` of small documents in batches of 1,000 → documents/s;
//! (b) one change-stream watcher receiving those inserts → events/s (watcher started first,
//!     measured until the last event arrives);
//! (c) the same documents as replacement upserts by `_id` (`update` with `upsert: true`, 1,000
//!     statements per command), first into an empty collection (each inserts), then over the
//!     existing documents (each replaces) → documents/s, side by side with (a).
//!
//! (a) and (c) run in `ROUNDS` rounds, each into fresh collections, and the ratios are reported
//! per round and as medians: on this VM a run's figures swing with the cost of faulting in new
//! memory (up to half the CPU in the kernel's page clearing), which one pair cannot separate.
//!
//! `cargo bench -p mongo-sim --bench throughput [-- DOCS]` (default 200,000 documents).

use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures::StreamExt;
use mongo_sim::MongoSim;
use mongodb::{options::ChangeStreamOptions, Client};

/// The allocator the `mongo-sim` binary runs on, so the bench measures what it serves.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1_000;

fn batches(total: usize, offset: usize) -> impl Iterator<Item = Vec<Document>> {
    (0..total / BATCH).map(move |b| {
        (0..BATCH)
            .map(|i| {
                let n = (offset + b * BATCH + i) as i64;
                doc! {"_id": n, "name": format!("user{n}"), "score": n % 100, "active": n % 2 == 0}
            })
            .collect()
    })
}

/// Rounds of insert / upsert pairs.
const ROUNDS: usize = 3;

async fn inserts(client: &Client, coll: &str, total: usize) -> f64 {
    let col = client.database("bench").collection::<Document>(coll);
    let docs: Vec<Vec<Document>> = batches(total, 0).collect();
    let started = Instant::now();
    for batch in docs {
        col.insert_many(batch).await.expect("insert_many");
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        col.estimated_document_count().await.expect("count") as usize,
        total
    );
    total as f64 / secs
}

/// Replacement upserts by `_id`, `BATCH` statements per `update` command.
async fn upserts(client: &Client, coll: &str, total: usize, generation: i64) -> f64 {
    let db = client.database("bench");
    let commands: Vec<Document> = batches(total, 0)
        .map(|batch| {
            let updates: Vec<Document> = batch
                .into_iter()
                .map(|mut d| {
                    d.insert("generation", generation);
                    let id = d.get("_id").cloned().expect("_id");
                    doc! {"q": {"_id": id}, "u": d, "upsert": true}
                })
                .collect();
            doc! {"update": coll, "updates": updates, "ordered": true}
        })
        .collect();
    let started = Instant::now();
    for cmd in commands {
        let reply = db.run_command(cmd).await.expect("update");
        assert_eq!(reply.get_i32("n").ok(), Some(BATCH as i32), "{reply}");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn events(client: &Client, total: usize) -> f64 {
    let col = client.database("bench").collection::<Document>("events");
    let opts = ChangeStreamOptions::builder()
        .batch_size(Some(10_000))
        .max_await_time(Some(Duration::from_millis(500)))
        .build();
    let mut stream = col.watch().with_options(opts).await.expect("watch");
    let docs: Vec<Vec<Document>> = batches(total, 0).collect();
    let started = Instant::now();
    let watcher = tokio::spawn(async move {
        let mut n = 0usize;
        while n < total {
            match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                Ok(Some(Ok(_))) => n += 1,
                other => panic!("watcher stopped after {n} events: {other:?}"),
            }
        }
        Instant::now()
    });
    for batch in docs {
        col.insert_many(batch).await.expect("insert_many");
    }
    let last_event = watcher.await.expect("watcher");
    total as f64 / (last_event - started).as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let total: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let sim = MongoSim::builder().start().await.expect("simulator");
        let client = Client::with_uri_str(sim.uri()).await.expect("client");
        let (mut inserting_ratios, mut replacing_ratios) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let docs_per_sec = inserts(&client, &format!("inserts{round}"), total).await;
            println!(
                "round {round}: insert_many ({total} docs, batches of {BATCH}): {docs_per_sec:.0} docs/s"
            );
            let coll = format!("upserts{round}");
            let inserting = upserts(&client, &coll, total, 1).await;
            let replacing = upserts(&client, &coll, total, 2).await;
            inserting_ratios.push(docs_per_sec / inserting);
            replacing_ratios.push(docs_per_sec / replacing);
            println!(
                "round {round}: replace-upsert by _id ({total} docs, batches of {BATCH}): {inserting:.0} docs/s inserting ({:.2}x insert_many's time), {replacing:.0} docs/s replacing ({:.2}x)",
                docs_per_sec / inserting,
                docs_per_sec / replacing
            );
        }
        println!(
            "replace-upsert / insert_many time, median of {ROUNDS} rounds: {:.2}x inserting, {:.2}x replacing",
            median(&mut inserting_ratios),
            median(&mut replacing_ratios)
        );
        let sim2 = MongoSim::builder().start().await.expect("simulator");
        let client2 = Client::with_uri_str(sim2.uri()).await.expect("client");
        let events_per_sec = events(&client2, total).await;
        println!(
            "change stream ({total} insert events, one watcher): {events_per_sec:.0} events/s"
        );
        drop(client);
        drop(client2);
        sim.shutdown().await;
        sim2.shutdown().await;
    });
}

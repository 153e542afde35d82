//! Throughput of the simulator through the real driver:
//! (a) `insert_many` of small documents in batches of 1,000 → documents/s;
//! (b) one change-stream watcher receiving those inserts → events/s (watcher started first,
//!     measured until the last event arrives).
//!
//! `cargo bench -p mongo-sim --bench throughput [-- DOCS]` (default 200,000 documents).

use std::time::{Duration, Instant};

use bson::{doc, Document};
use futures::StreamExt;
use mongo_sim::MongoSim;
use mongodb::{options::ChangeStreamOptions, Client};

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

async fn inserts(client: &Client, total: usize) -> f64 {
    let col = client.database("bench").collection::<Document>("inserts");
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
        let docs_per_sec = inserts(&client, total).await;
        println!("insert_many ({total} docs, batches of {BATCH}): {docs_per_sec:.0} docs/s");
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

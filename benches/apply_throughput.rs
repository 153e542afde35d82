//! Apply-path throughput: mongo-syncd versus a naive loop that applies each change event with
//! one `replace_one` (or `delete_one`), on the same backlog of change events, side by side in
//! one run. Run with `cargo bench --bench apply_throughput [-- EVENTS]`.
//!
//! Both consumers start from the same `startAtOperationTime` and must end with a destination
//! identical to the source; the figure is events applied per second of wall time.

use std::time::{Duration, Instant};

use bson::{doc, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongo_sim::{MongoSim, SimHandle};
use mongo_syncd::{
    app::{run_daemon, DaemonOptions},
    config::{Config, InitialCopy, OperationTime},
};
use mongodb::{
    change_stream::event::{ChangeStreamEvent, OperationType},
    options::FullDocumentType,
    Client,
};
use tokio_util::sync::CancellationToken;

const DB: &str = "bench";
const COLLS: &[&str] = &["orders", "events"];

async fn sim(name: &str, rtt: Duration) -> (SimHandle, Client) {
    let s = MongoSim::builder()
        .replica_set(name)
        .reply_delay(rtt)
        .start()
        .await
        .unwrap();
    let c = Client::with_uri_str(s.uri()).await.unwrap();
    (s, c)
}

/// Writes the backlog: inserts, then updates and deletes of part of them. Returns the
/// cluster time before the first write and the number of change events produced.
async fn write_backlog(src: &Client, sim: &SimHandle, events: usize) -> (Timestamp, usize) {
    let start = sim.engine().cluster_time();
    let per_coll = events / COLLS.len();
    let inserts = per_coll * 6 / 10;
    let updates = per_coll * 3 / 10;
    let deletes = per_coll - inserts - updates;
    let mut produced = 0;
    for coll in COLLS {
        let c = src.database(DB).collection::<Document>(coll);
        for chunk in (0..inserts).collect::<Vec<_>>().chunks(1000) {
            let docs: Vec<Document> = chunk
                .iter()
                .map(|i| doc! {"_id": *i as i64, "customer": format!("c{}", i % 97), "total": (*i as f64) * 1.5, "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}], "status": "new"})
                .collect();
            c.insert_many(docs).await.unwrap();
        }
        for i in 0..updates {
            c.update_one(
                doc! {"_id": i as i64},
                doc! {"$set": {"status": "paid"}, "$inc": {"total": 1.0}},
            )
            .await
            .unwrap();
        }
        for i in 0..deletes {
            c.delete_one(doc! {"_id": (inserts - 1 - i) as i64})
                .await
                .unwrap();
        }
        produced += inserts + updates + deletes;
    }
    (start, produced)
}

async fn same(src: &Client, dst: &Client) -> bool {
    for coll in COLLS {
        let a: Vec<RawDocumentBuf> = src
            .database(DB)
            .collection(coll)
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let b: Vec<RawDocumentBuf> = dst
            .database(DB)
            .collection(coll)
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        if a.len() != b.len() || a.iter().zip(&b).any(|(x, y)| x.as_bytes() != y.as_bytes()) {
            return false;
        }
    }
    true
}

/// One change stream per collection, one write per event.
async fn naive(src: &Client, dst: &Client, start: Timestamp, expected: usize) -> Duration {
    let t = Instant::now();
    let mut handles = Vec::new();
    for coll in COLLS {
        let (src, dst) = (src.clone(), dst.clone());
        let per = expected / COLLS.len();
        handles.push(tokio::spawn(async move {
            let s = src.database(DB).collection::<Document>(coll);
            let d = dst.database(DB).collection::<Document>(coll);
            let mut stream = s
                .watch()
                .start_at_operation_time(start)
                .full_document(FullDocumentType::UpdateLookup)
                .await
                .unwrap();
            let mut seen = 0;
            while seen < per {
                let Some(ev): Option<ChangeStreamEvent<Document>> =
                    stream.try_next().await.unwrap()
                else {
                    continue;
                };
                seen += 1;
                let id = ev
                    .document_key
                    .as_ref()
                    .and_then(|k| k.get("_id"))
                    .cloned()
                    .unwrap();
                match ev.operation_type {
                    OperationType::Delete => {
                        d.delete_one(doc! {"_id": id}).await.unwrap();
                    }
                    _ => match ev.full_document {
                        Some(full) => {
                            d.replace_one(doc! {"_id": id}, full)
                                .upsert(true)
                                .await
                                .unwrap();
                        }
                        None => {
                            d.delete_one(doc! {"_id": id}).await.unwrap();
                        }
                    },
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    t.elapsed()
}

async fn daemon(
    source: &SimHandle,
    dest: &SimHandle,
    start: Timestamp,
    expected: usize,
) -> Duration {
    let mut config = Config::from_uris(&source.uri(), &dest.uri()).unwrap();
    config.sync.initial_copy = InitialCopy::Skip;
    config.sync.start_at_operation_time = Some(OperationTime {
        t: start.time,
        i: start.increment,
    });
    config.sync.namespaces = vec![format!("{DB}.*").parse().unwrap()];
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let t = Instant::now();
    let task = tokio::spawn(run_daemon(
        config,
        DaemonOptions {
            config_path: None,
            reset_identity: false,
            log_reload: None,
            handle_signals: false,
            shutdown: shutdown.clone(),
            on_ready: Some(ready_tx),
        },
    ));
    let running = ready_rx.await.expect("daemon started");
    // Done when every event was applied (checked against the source afterwards).
    loop {
        let applied: u64 = running
            .status
            .snapshot()
            .values()
            .map(|s| s.events_applied)
            .sum();
        if applied as usize >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t.elapsed();
    shutdown.cancel();
    assert_eq!(task.await.unwrap(), 0);
    elapsed
}

/// One side-by-side run with every simulated round trip delayed by `rtt`.
async fn compare(events: usize, rtt: Duration) {
    let (source, src) = sim("src", Duration::ZERO).await;
    let (_dest_naive, dst_naive) = sim("naive", rtt).await;
    let (dest_daemon, dst_daemon) = sim("daemon", rtt).await;
    let (start, produced) = write_backlog(&src, &source, events).await;
    println!(
        "backlog: {produced} change events in {} collections; destination round trip {rtt:?}",
        COLLS.len()
    );
    let naive_time = naive(&src, &dst_naive, start, produced).await;
    assert!(
        same(&src, &dst_naive).await,
        "the naive loop produced an exact copy"
    );
    let daemon_time = daemon(&source, &dest_daemon, start, produced).await;
    assert!(
        same(&src, &dst_daemon).await,
        "mongo-syncd produced an exact copy"
    );
    let naive_rate = produced as f64 / naive_time.as_secs_f64();
    let daemon_rate = produced as f64 / daemon_time.as_secs_f64();
    println!(
        "naive replace_one loop: {:>8.0} events/s ({:.2?})",
        naive_rate, naive_time
    );
    println!(
        "mongo-syncd:            {:>8.0} events/s ({:.2?})",
        daemon_rate, daemon_time
    );
    println!(
        "ratio mongo-syncd / naive: {:.1}x",
        daemon_rate / naive_rate
    );
}

fn main() {
    let events: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(40_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Loopback speed: the simulator's own per-statement cost dominates both consumers.
        compare(events, Duration::ZERO).await;
        // A same-region network (1 ms per round trip to the destination).
        compare(events / 4, Duration::from_millis(1)).await;
    });
}

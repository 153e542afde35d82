//! A mixed source workload: inserts, updates with `$set/$unset/$inc/$push/$pop`, replaces,
//! deletes and multi-document transactions, across several collections, until stopped.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bson::{doc, Document};
use mongodb::Client;
use rand::{rngs::StdRng, Rng, SeedableRng};

pub struct Workload {
    stop: Arc<AtomicBool>,
    pub ops: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Namespaces the workload writes to.
pub const NAMESPACES: &[(&str, &str)] = &[
    ("shop", "orders"),
    ("shop", "customers"),
    ("crm", "contacts"),
];

fn random_doc(rng: &mut StdRng, id: i64) -> Document {
    doc! {
        "_id": id,
        "n": rng.random_range(0..1000),
        "name": format!("item-{}", rng.random_range(0..100_000)),
        "tags": (0..rng.random_range(0..4)).map(|i| format!("t{i}")).collect::<Vec<_>>(),
        "nested": {"a": rng.random_range(0..10), "b": {"c": rng.random_bool(0.5)}},
    }
}

impl Workload {
    /// Starts `writers` tasks, each owning a disjoint `_id` space, with a delay between ops.
    pub fn start(client: &Client, writers: usize, pause: Duration, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let client = client.clone();
            let stop = Arc::clone(&stop);
            let ops = Arc::clone(&ops);
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed + w as u64);
                let base = (w as i64 + 1) * 1_000_000;
                let mut next = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let (db, coll) = NAMESPACES[rng.random_range(0..NAMESPACES.len())];
                    let c = client.database(db).collection::<Document>(coll);
                    let pick = |rng: &mut StdRng, next: i64| base + rng.random_range(0..next.max(1));
                    let r = match rng.random_range(0..100) {
                        0..=34 => {
                            next += 1;
                            c.insert_one(random_doc(&mut rng, base + next)).await.map(|_| ())
                        }
                        35..=49 => c
                            .update_one(doc! {"_id": pick(&mut rng, next)}, doc! {"$set": {"nested.a": rng.random_range(0..10), "touched": true}})
                            .await
                            .map(|_| ()),
                        50..=59 => c
                            .update_one(doc! {"_id": pick(&mut rng, next)}, doc! {"$inc": {"n": 1}, "$push": {"tags": "p"}})
                            .await
                            .map(|_| ()),
                        60..=64 => c
                            .update_one(doc! {"_id": pick(&mut rng, next)}, doc! {"$unset": {"name": ""}, "$pop": {"tags": 1}})
                            .await
                            .map(|_| ()),
                        65..=74 => {
                            let id = pick(&mut rng, next);
                            c.replace_one(doc! {"_id": id}, random_doc(&mut rng, id)).await.map(|_| ())
                        }
                        75..=84 => c.delete_one(doc! {"_id": pick(&mut rng, next)}).await.map(|_| ()),
                        85..=89 => c
                            .update_many(doc! {"_id": {"$gte": pick(&mut rng, next), "$lt": base + next}, "n": {"$lt": 100}}, doc! {"$set": {"bulk": true}})
                            .await
                            .map(|_| ()),
                        _ => {
                            // A transaction touching two collections.
                            next += 2;
                            let (a, b) = (base + next - 1, base + next);
                            let mut s = client.start_session().await.unwrap();
                            s.start_transaction().await.unwrap();
                            let orders = client.database("shop").collection::<Document>("orders");
                            let contacts = client.database("crm").collection::<Document>("contacts");
                            let r1 = orders.insert_one(random_doc(&mut rng, a)).session(&mut s).await;
                            let r2 = contacts.insert_one(random_doc(&mut rng, b)).session(&mut s).await;
                            let r3 = orders
                                .update_one(doc! {"_id": pick(&mut rng, next)}, doc! {"$set": {"txn": true}})
                                .session(&mut s)
                                .await;
                            if r1.is_ok() && r2.is_ok() && r3.is_ok() {
                                s.commit_transaction().await.map(|_| ())
                            } else {
                                let _ = s.abort_transaction().await;
                                Ok(())
                            }
                        }
                    };
                    if r.is_ok() {
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }));
        }
        Workload { stop, ops, tasks }
    }

    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer task did not panic");
        }
        self.ops.load(Ordering::Relaxed)
    }
}

/// Seeds `n` documents into each workload namespace.
pub async fn seed(client: &Client, n: i64) {
    let mut rng = StdRng::seed_from_u64(7);
    for (db, coll) in NAMESPACES {
        let docs: Vec<Document> = (0..n).map(|i| random_doc(&mut rng, i)).collect();
        if !docs.is_empty() {
            client
                .database(db)
                .collection::<Document>(coll)
                .insert_many(docs)
                .await
                .unwrap();
        }
    }
}

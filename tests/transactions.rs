//! `apply.transactions = "atomic"` (issue 11 item 5, DESIGN §2.4): the events of one source
//! transaction, across collections, reach the destination as one destination transaction;
//! what the destination cannot take whole is applied per document and still converges.

use std::{collections::HashMap, time::Duration};

use bson::{doc, Document};
use futures::{StreamExt, TryStreamExt};
use mongodb::change_stream::event::ChangeStreamEvent;

use crate::support::cluster::*;

const ATOMIC: &str = "[apply]\ntransactions = \"atomic\"\n\n[sync]\nnamespaces = [\"bank.*\"]\n";
const NAMESPACES: [(&str, &str); 3] = [("bank", "accounts"), ("bank", "ledger"), ("bank", "audit")];

async fn seed(c: &Clusters) {
    let db = c.src.database("bank");
    db.collection::<Document>("accounts")
        .insert_many((1..=4).map(|k| doc! {"_id": k, "bal": 100}))
        .await
        .unwrap();
    db.create_collection("ledger").await.unwrap();
    db.create_collection("audit").await.unwrap();
}

/// A transfer between two accounts with its ledger entry, in one source transaction; a plain
/// write to another collection after it.
async fn transfer(c: &Clusters, i: i32, from: i32, to: i32) {
    transfer_alone(c, i, from, to).await;
    c.src
        .database("bank")
        .collection::<Document>("audit")
        .insert_one(doc! {"_id": i})
        .await
        .unwrap();
}

/// The transfer only: nothing follows it on the source.
async fn transfer_alone(c: &Clusters, i: i32, from: i32, to: i32) {
    let db = c.src.database("bank");
    let accounts = db.collection::<Document>("accounts");
    let ledger = db.collection::<Document>("ledger");
    let mut s = c.src.start_session().await.unwrap();
    s.start_transaction().await.unwrap();
    accounts
        .update_one(doc! {"_id": from}, doc! {"$inc": {"bal": -10}})
        .session(&mut s)
        .await
        .unwrap();
    accounts
        .update_one(doc! {"_id": to}, doc! {"$inc": {"bal": 10}})
        .session(&mut s)
        .await
        .unwrap();
    ledger
        .insert_one(doc! {"_id": i, "from": from, "to": to})
        .session(&mut s)
        .await
        .unwrap();
    s.commit_transaction().await.unwrap();
}

async fn start_streaming(c: &Clusters, d: &Daemon) {
    wait_converged(c, &NAMESPACES, Duration::from_secs(60)).await;
    for (db, coll) in NAMESPACES {
        d.wait_streaming(&format!("{db}.{coll}")).await;
    }
    // Transactions are written atomically once the workers read the shared stream only (a
    // worker still joining reads its part from its own stream and applies it per document).
    wait_until(
        "every namespace reads the shared stream only",
        Duration::from_secs(60),
        || async {
            let Some(status) = d.status().await else {
                return false;
            };
            NAMESPACES.iter().all(|(db, coll)| {
                status["namespaces"][format!("{db}.{coll}")]["change_stream"] == "deployment"
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_transaction_across_collections_lands_as_one_destination_transaction() {
    let c = Clusters::start().await;
    seed(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), ATOMIC);
    start_streaming(&c, &d).await;

    let mut watch = c
        .dst
        .database("bank")
        .watch()
        .await
        .unwrap()
        .with_type::<ChangeStreamEvent<Document>>();
    const TRANSFERS: i32 = 20;
    for i in 0..TRANSFERS {
        transfer(&c, i, i % 4 + 1, (i + 1) % 4 + 1).await;
    }
    wait_converged(&c, &NAMESPACES, Duration::from_secs(60)).await;

    // Every destination write to the accounts and the ledger came in a transaction of exactly
    // one transfer: two account updates and one ledger entry, committed together.
    let mut by_txn: HashMap<(String, i64), Vec<String>> = HashMap::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen < 3 * TRANSFERS as usize {
        let ev = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{seen} destination events of the transfers within 30 s\nlog:\n{}",
                    d.logs()
                )
            })
            .unwrap()
            .unwrap();
        let coll = ev
            .ns
            .as_ref()
            .and_then(|n| n.coll.clone())
            .unwrap_or_default();
        if coll == "audit" {
            assert!(
                ev.txn_number.is_none(),
                "a plain write became a transaction"
            );
            continue;
        }
        seen += 1;
        let (Some(lsid), Some(txn)) = (ev.lsid.as_ref(), ev.txn_number) else {
            panic!(
                "a destination write to bank.{coll} outside a transaction: {:?}\nlog:\n{}",
                ev.operation_type,
                d.logs()
            )
        };
        by_txn
            .entry((format!("{lsid}"), txn))
            .or_default()
            .push(coll);
    }
    assert_eq!(by_txn.len(), TRANSFERS as usize, "{by_txn:?}");
    for (txn, mut colls) in by_txn {
        colls.sort();
        assert_eq!(
            colls,
            ["accounts", "accounts", "ledger"],
            "transaction {txn:?}"
        );
    }
    d.wait_metric_at_least(
        "mongo_syncd_transaction_parts_total{outcome=\"atomic\"}",
        2.0 * TRANSFERS as f64,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        d.metric("mongo_syncd_transaction_parts_total{outcome=\"per_document\"}")
            .await,
        Some(0.0)
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_destination_cannot_take_whole_is_applied_per_document() {
    let c = Clusters::start().await;
    seed(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), ATOMIC);
    start_streaming(&c, &d).await;

    // The destination lost an account: the transfer's delta on it finds nothing, the
    // destination transaction aborts, and both parts are applied per document (the missing
    // account is read again from the source).
    c.dst
        .database("bank")
        .collection::<Document>("accounts")
        .delete_one(doc! {"_id": 4})
        .await
        .unwrap();
    transfer(&c, 100, 4, 1).await;
    wait_converged(&c, &NAMESPACES, Duration::from_secs(60)).await;
    d.wait_metric_at_least(
        "mongo_syncd_transaction_parts_total{outcome=\"per_document\"}",
        2.0,
        Duration::from_secs(10),
    )
    .await;
    // Later transfers are atomic again.
    transfer(&c, 101, 1, 2).await;
    wait_converged(&c, &NAMESPACES, Duration::from_secs(60)).await;
    d.wait_metric_at_least(
        "mongo_syncd_transaction_parts_total{outcome=\"atomic\"}",
        2.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// SIGKILLs with transfers in flight: after each restart every namespace skips what it had
/// applied and the rest converges exactly. (Whether later transfers are atomic again depends on
/// the destination: a transaction left open by the killed daemon holds its documents until the
/// server expires it, 60 s by default on MongoDB and never on the simulator, and transactions
/// touching them meanwhile are applied per document.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_around_sigkills_converge_exactly() {
    let c = Clusters::start().await;
    seed(&c).await;
    let dir = tempfile::tempdir().unwrap();
    // A SIGKILLed daemon may leave a destination transaction open; the server aborts it
    // after this limit (60 s by default), and its documents are free again.
    c.dst
        .database("admin")
        .run_command(doc! {"setParameter": 1, "transactionLifetimeLimitSeconds": 2})
        .await
        .unwrap();
    let mut d = Daemon::start(&c, dir.path(), ATOMIC);
    start_streaming(&c, &d).await;
    let mut i = 0;
    for _ in 0..2 {
        for _ in 0..30 {
            transfer(&c, i, i % 4 + 1, (i + 3) % 4 + 1).await;
            i += 1;
        }
        d.kill9();
        for _ in 0..10 {
            transfer(&c, i, i % 4 + 1, (i + 3) % 4 + 1).await;
            i += 1;
        }
        d.spawn(&[]);
        wait_converged(&c, &NAMESPACES, Duration::from_secs(60)).await;
    }
    start_streaming(&c, &d).await;
    transfer(&c, i, 1, 2).await;
    wait_converged(&c, &NAMESPACES, Duration::from_secs(60)).await;
    let balances: i64 = c
        .dst
        .database("bank")
        .collection::<Document>("accounts")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|a| a.get_i32("bal").unwrap() as i64)
        .sum();
    assert_eq!(
        balances, 400,
        "money was created or lost on the destination"
    );
    // Once what the killed runs left open has expired, transfers are atomic again.
    let metric = "mongo_syncd_transaction_parts_total{outcome=\"atomic\"}";
    let before = d.metric(metric).await.unwrap_or(0.0);
    wait_until(
        "a transfer applied as one destination transaction after the SIGKILLs",
        Duration::from_secs(30),
        || {
            i += 1;
            let (c, d, i) = (&c, &d, i);
            async move {
                transfer(c, i, 1, 2).await;
                wait_converged(c, &NAMESPACES, Duration::from_secs(30)).await;
                d.metric(metric).await.unwrap_or(0.0) >= before + 2.0
            }
        },
    )
    .await;
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.all_logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_ends_the_stream_is_applied_once_a_reply_shows_nothing_follows() {
    let c = Clusters::start().await;
    seed(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), ATOMIC);
    start_streaming(&c, &d).await;
    // Nothing is written after it: the reader learns the transaction is complete from an
    // empty reply (at most maxAwaitTimeMS, 1 s, later), not from a following event.
    let started = std::time::Instant::now();
    transfer_alone(&c, 7, 1, 2).await;
    wait_converged(&c, &NAMESPACES, Duration::from_secs(10)).await;
    d.wait_metric_at_least(
        "mongo_syncd_transaction_parts_total{outcome=\"atomic\"}",
        2.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a lone transaction took {:?}",
        started.elapsed()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

/// Regression (CI on 1efe1e7): a member waiting for the rest of its part that is next polled
/// only once the reader has both closed the group and routed the next transaction's first
/// event must still write its part atomically. It took that event for a part cut short and
/// turned the transaction per document. SIGSTOP holds every task while the next transfer
/// commits, so on SIGCONT the reader closes the group and routes on in one go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_woken_by_the_next_transaction_still_writes_its_part_atomically() {
    let c = Clusters::start().await;
    seed(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&c, dir.path(), ATOMIC);
    start_streaming(&c, &d).await;
    const ROUNDS: i32 = 4;
    for round in 0..ROUNDS {
        // Nothing follows this transfer: its group stays open (up to the 1 s empty reply)
        // while its members wait for the rest of their parts.
        transfer_alone(&c, 2 * round, 1, 2).await;
        d.signal("STOP");
        transfer(&c, 2 * round + 1, 3, 4).await;
        d.signal("CONT");
        wait_converged(&c, &NAMESPACES, Duration::from_secs(30)).await;
    }
    d.wait_metric_at_least(
        "mongo_syncd_transaction_parts_total{outcome=\"atomic\"}",
        4.0 * ROUNDS as f64,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        d.metric("mongo_syncd_transaction_parts_total{outcome=\"per_document\"}")
            .await,
        Some(0.0),
        "log:\n{}",
        d.logs()
    );
    assert_eq!(d.terminate().await, Some(0), "log:\n{}", d.logs());
}

//! `replSetStepDown` and `--stepdown-every`: the node is secondary for a while (hello says so,
//! writes get 10107, held-up writes 11602), then primary again with a higher term.

use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::{change_stream::event::OperationType, Client, Collection};

use crate::common::*;

async fn hello(c: &Client) -> Document {
    admin(c, doc! {"hello": 1}).await.expect("hello")
}

fn counter(hello: &Document) -> i64 {
    hello
        .get_document("topologyVersion")
        .and_then(|t| t.get_i64("counter"))
        .expect("topologyVersion.counter")
}

async fn direct(sim: &mongo_sim::SimHandle) -> Client {
    client_for(&format!("{}&retryWrites=false", sim.direct_uri())).await
}

#[tokio::test]
async fn step_down_refusals_then_step_up_with_a_higher_term() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let d = direct(&sim).await;
        let before = hello(&d).await;
        assert_eq!(before.get_bool("isWritablePrimary").ok(), Some(true));
        let election_before = before.get_object_id("electionId").unwrap();
        // A single-member set steps down only with force; the period must exceed the catch-up.
        let e = admin(
            &c,
            doc! {"replSetStepDown": 20, "secondaryCatchUpPeriodSecs": 0},
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), Some(262));
        let e = admin(
            &c,
            doc! {"replSetStepDown": 2, "secondaryCatchUpPeriodSecs": 5, "force": true},
        )
        .await
        .unwrap_err();
        assert_eq!(code(&e), Some(2));
        let e = c
            .database("x")
            .run_command(
                doc! {"replSetStepDown": 2, "force": true, "secondaryCatchUpPeriodSecs": 0},
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), Some(13), "admin only");

        admin(
            &c,
            doc! {"replSetStepDown": 2, "secondaryCatchUpPeriodSecs": 0, "force": true},
        )
        .await
        .expect("forced step-down");
        let during = hello(&d).await;
        assert_eq!(during.get_bool("isWritablePrimary").ok(), Some(false));
        assert_eq!(during.get_bool("secondary").ok(), Some(true));
        assert!(!during.contains_key("electionId"), "{during}");
        assert!(!during.contains_key("primary"), "{during}");
        assert!(counter(&during) > counter(&before));
        let status = admin(&d, doc! {"replSetGetStatus": 1}).await.unwrap();
        assert_eq!(status.get_i32("myState").ok(), Some(2));
        // Writes refused with NotWritablePrimary; reads with a secondary-ok preference work.
        let col: Collection<Document> = d.database("sd").collection("c");
        let e = col.insert_one(doc! {"_id": 1}).await.unwrap_err();
        assert_eq!(code(&e), Some(10107));
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 0);
        // Back to primary by itself after the period, with a higher term.
        eventually(Duration::from_secs(20), || {
            let d = d.clone();
            async move { hello(&d).await.get_bool("isWritablePrimary").ok() == Some(true) }
        })
        .await;
        let after = hello(&d).await;
        let election_after: ObjectId = after.get_object_id("electionId").unwrap();
        assert!(
            election_after > election_before,
            "{election_after} > {election_before}"
        );
        assert!(counter(&after) > counter(&during));
        let term = admin(&d, doc! {"replSetGetStatus": 1})
            .await
            .unwrap()
            .get_i64("term")
            .unwrap();
        assert_eq!(term, 2);
        col.insert_one(doc! {"_id": 1}).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn writes_retry_and_change_streams_continue_across_a_step_down() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("sd").collection("stream");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let mut stream = col.watch().await.unwrap();
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        admin(
            &c,
            doc! {"replSetStepDown": 1, "secondaryCatchUpPeriodSecs": 0, "force": true},
        )
        .await
        .unwrap();
        // The retryable insert meets NotWritablePrimary, waits for a primary, and lands.
        col.insert_one(doc! {"_id": 2}).await.unwrap();
        col.insert_one(doc! {"_id": 3}).await.unwrap();
        for i in 1..=3 {
            let ev = next(&mut stream).await;
            assert_eq!(ev.operation_type, OperationType::Insert);
            assert_eq!(ev.document_key, Some(doc! {"_id": i}));
        }
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 4);
    })
    .await
}

#[tokio::test]
async fn a_write_held_up_across_the_step_down_is_interrupted() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let d = direct(&sim).await;
        let col: Collection<Document> = d.database("sd").collection("held");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        fail_command(
            &c,
            Bson::Document(doc! {"times": 1}),
            doc! {"failCommands": ["insert"], "blockConnection": true, "blockTimeMS": 1500},
        )
        .await;
        let held = tokio::spawn({
            let col = col.clone();
            async move { col.insert_one(doc! {"_id": 1}).await }
        });
        // The fail point fired: the insert is being held up.
        eventually(Duration::from_secs(20), || {
            let empty = sim.engine().failpoints.lock().is_empty();
            async move { empty }
        })
        .await;
        admin(
            &c,
            doc! {"replSetStepDown": 1, "secondaryCatchUpPeriodSecs": 0, "force": true},
        )
        .await
        .unwrap();
        let e = held.await.unwrap().unwrap_err();
        assert_eq!(code(&e), Some(11602), "{e}");
        eventually(Duration::from_secs(20), || {
            let engine = std::sync::Arc::clone(sim.engine());
            async move { engine.is_primary() }
        })
        .await;
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
    })
    .await
}

#[tokio::test]
async fn stepdown_every_option_cycles_the_primary() {
    bounded(async {
        let sim = builder()
            .stepdown_every(Duration::from_millis(300), Duration::from_millis(300))
            .start()
            .await
            .unwrap();
        let c = client(&sim).await;
        let col: Collection<Document> = c.database("sd").collection("cycle");
        let mut stream = col.watch().await.unwrap();
        let term = || async {
            admin(&c, doc! {"replSetGetStatus": 1})
                .await
                .unwrap()
                .get_i64("term")
                .unwrap()
        };
        // Keep writing (each retryable insert rides over the step-downs) until at least two
        // elections happened.
        let mut n = 0;
        while term().await < 3 {
            col.insert_one(doc! {"_id": n}).await.unwrap();
            n += 1;
        }
        for i in 0..n {
            assert_eq!(next(&mut stream).await.document_key, Some(doc! {"_id": i}));
        }
    })
    .await
}

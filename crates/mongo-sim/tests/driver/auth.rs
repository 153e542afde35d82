//! Optional SCRAM-SHA-256 authentication, through the driver.

use bson::{doc, Document};

use crate::common::*;

fn uri(sim: &mongo_sim::SimHandle, user: &str, password: &str) -> String {
    format!(
        "mongodb://{user}:{password}@{}/?replicaSet=rs0&authSource=admin",
        sim.host()
    )
}

#[tokio::test]
async fn right_password_works_wrong_password_is_refused() {
    bounded(async {
        let sim = builder().auth("alice", "s3cret").start().await.unwrap();
        let good = client_for(&uri(&sim, "alice", "s3cret")).await;
        let col = good.database("a").collection::<Document>("c");
        col.insert_one(doc! {"_id": 1}).await.unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 1);
        let status = admin(&good, doc! {"connectionStatus": 1}).await.unwrap();
        assert!(status.contains_key("authInfo"));

        // SCRAM-SHA-256 named explicitly works too.
        let explicit = client_for(&format!(
            "{}&authMechanism=SCRAM-SHA-256",
            uri(&sim, "alice", "s3cret")
        ))
        .await;
        admin(&explicit, doc! {"ping": 1}).await.unwrap();

        for (user, password) in [("alice", "wrong"), ("mallory", "s3cret")] {
            let bad = client_for(&uri(&sim, user, password)).await;
            let err = bad
                .database("a")
                .collection::<Document>("c")
                .find_one(doc! {})
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err.kind.as_ref(),
                    mongodb::error::ErrorKind::Authentication { .. }
                ),
                "expected an authentication error, got {err:?}"
            );
        }
        // An unsupported mechanism is refused.
        let sha1 = client_for(&format!(
            "{}&authMechanism=SCRAM-SHA-1",
            uri(&sim, "alice", "s3cret")
        ))
        .await;
        let err = admin(&sha1, doc! {"ping": 1}).await.unwrap_err();
        assert!(matches!(
            err.kind.as_ref(),
            mongodb::error::ErrorKind::Authentication { .. }
        ));
    })
    .await
}

#[tokio::test]
async fn unauthenticated_connections_may_only_handshake_and_ping() {
    bounded(async {
        let sim = builder().auth("alice", "s3cret").start().await.unwrap();
        let anon = client(&sim).await;
        admin(&anon, doc! {"ping": 1}).await.unwrap();
        admin(&anon, doc! {"buildInfo": 1}).await.unwrap();
        let err = anon
            .database("a")
            .collection::<Document>("c")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap_err();
        assert_eq!(code(&err), Some(13));
        let err = anon.list_database_names().await.unwrap_err();
        assert_eq!(code(&err), Some(13));
        // hello advertises the mechanism for the user asked about.
        let h = admin(
            &anon,
            doc! {"hello": 1, "saslSupportedMechs": "admin.alice"},
        )
        .await
        .unwrap();
        assert_eq!(
            h.get_array("saslSupportedMechs").unwrap(),
            &vec![bson::Bson::from("SCRAM-SHA-256")]
        );
        let h = admin(&anon, doc! {"hello": 1, "saslSupportedMechs": "admin.bob"})
            .await
            .unwrap();
        assert!(!h.contains_key("saslSupportedMechs"));
    })
    .await
}

//! Unsatisfiable write concerns: the write is applied and the reply carries a
//! `writeConcernError` (100 UnsatisfiableWriteConcern for `w` above the member count, 79
//! UnknownReplWriteConcern for an unknown mode name), as on a one-member replica set.

use bson::{doc, Document};
use mongodb::{
    error::{ErrorKind, WriteFailure},
    options::{Acknowledgment, WriteConcern},
    Collection,
};

use crate::common::*;

fn wce_code(err: &mongodb::error::Error) -> Option<(i32, String, String)> {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            Some((w.code, w.code_name.clone(), w.message.clone()))
        }
        ErrorKind::Command(c) => Some((c.code, c.code_name.clone(), c.message.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn w_above_the_members_is_unsatisfiable_and_the_write_applies() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("wc");
        let reply = db
            .run_command(doc! {"insert": "t", "documents": [{"_id": 1}], "writeConcern": {"w": 5}})
            .await
            .unwrap();
        let wce = reply.get_document("writeConcernError").unwrap();
        assert_eq!(wce.get_i32("code").unwrap(), 100, "{reply}");
        assert_eq!(
            wce.get_str("codeName").unwrap(),
            "UnsatisfiableWriteConcern"
        );
        assert_eq!(
            wce.get_str("errmsg").unwrap(),
            "Not enough data-bearing nodes"
        );
        assert_eq!(reply.get_i32("n").unwrap(), 1);

        let five = WriteConcern::builder().w(Acknowledgment::Nodes(5)).build();
        let col: Collection<Document> = db.collection_with_options(
            "t",
            mongodb::options::CollectionOptions::builder()
                .write_concern(five.clone())
                .build(),
        );
        let err = col.insert_one(doc! {"_id": 2}).await.unwrap_err();
        assert_eq!(wce_code(&err).map(|w| w.0), Some(100), "{err:?}");
        let err = col
            .update_one(doc! {"_id": 2}, doc! {"$set": {"u": 1}})
            .await
            .unwrap_err();
        assert_eq!(wce_code(&err).map(|w| w.0), Some(100), "{err:?}");
        let err = col
            .find_one_and_update(doc! {"_id": 2}, doc! {"$set": {"f": 1}})
            .await
            .unwrap_err();
        assert_eq!(wce_code(&err).map(|w| w.0), Some(100), "{err:?}");
        let plain: Collection<Document> = db.collection("t");
        assert_eq!(
            plain.find_one(doc! {"_id": 2}).await.unwrap().unwrap(),
            doc! {"_id": 2, "u": 1, "f": 1}
        );
        let err = col.delete_one(doc! {"_id": 2}).await.unwrap_err();
        assert_eq!(wce_code(&err).map(|w| w.0), Some(100), "{err:?}");
        assert!(plain.find_one(doc! {"_id": 2}).await.unwrap().is_none());

        // w: 1 and "majority" are satisfied by the one member.
        let reply = db
            .run_command(
                doc! {"insert": "t", "documents": [{"_id": 3}], "writeConcern": {"w": "majority"}},
            )
            .await
            .unwrap();
        assert!(reply.get("writeConcernError").is_none(), "{reply}");
    })
    .await
}

#[tokio::test]
async fn unknown_write_concern_mode_is_79() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let db = c.database("wc");
        let reply = db
            .run_command(
                doc! {"insert": "m", "documents": [{"_id": 1}], "writeConcern": {"w": "dc2"}},
            )
            .await
            .unwrap();
        let wce = reply.get_document("writeConcernError").unwrap();
        assert_eq!(wce.get_i32("code").unwrap(), 79, "{reply}");
        assert_eq!(wce.get_str("codeName").unwrap(), "UnknownReplWriteConcern");
        assert_eq!(
            wce.get_str("errmsg").unwrap(),
            "No write concern mode named 'dc2' found in replica set configuration"
        );
        assert_eq!(
            db.collection::<Document>("m")
                .count_documents(doc! {})
                .await
                .unwrap(),
            1
        );
    })
    .await
}

#[tokio::test]
async fn commit_with_unsatisfiable_write_concern_commits_and_reports_it() {
    bounded(async {
        let (_sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("wc").collection("tx");
        col.insert_one(doc! {"_id": 0}).await.unwrap();
        let mut session = c.start_session().await.unwrap();
        session
            .start_transaction()
            .write_concern(WriteConcern::builder().w(Acknowledgment::Nodes(5)).build())
            .await
            .unwrap();
        col.insert_one(doc! {"_id": 1})
            .session(&mut session)
            .await
            .unwrap();
        let err = session.commit_transaction().await.unwrap_err();
        assert_eq!(wce_code(&err).map(|w| w.0), Some(100), "{err:?}");
        assert!(
            !err.contains_label("UnknownTransactionCommitResult"),
            "{err:?}"
        );
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 2);
    })
    .await
}

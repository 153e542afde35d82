use bson::{doc, Document};
use futures::TryStreamExt;
use mongo_sim::MongoSim;
use mongodb::Client;

#[tokio::test]
async fn driver_connects_inserts_finds_and_watches() {
    let sim = MongoSim::builder().start().await.unwrap();
    let client = Client::with_uri_str(sim.uri()).await.unwrap();
    let coll = client.database("d").collection::<Document>("c");
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! {"_id": 1, "a": 1}).await.unwrap();
    coll.insert_many(vec![doc! {"_id": 2}, doc! {"_id": 3}])
        .await
        .unwrap();
    let all: Vec<Document> = coll
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let ev = stream.next_if_any().await.unwrap();
    let ev = match ev {
        Some(e) => e,
        None => stream.try_next().await.unwrap().unwrap(),
    };
    assert_eq!(
        ev.operation_type,
        mongodb::change_stream::event::OperationType::Insert
    );
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 3);
    let direct = Client::with_uri_str(sim.direct_uri()).await.unwrap();
    assert_eq!(
        direct
            .database("d")
            .collection::<Document>("c")
            .estimated_document_count()
            .await
            .unwrap(),
        3
    );
}

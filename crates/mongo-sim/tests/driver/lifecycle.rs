//! Stopping, restarting and disturbing a running simulator through its handle.

use bson::{doc, Document};
use mongodb::Collection;

use crate::common::*;

#[tokio::test]
async fn stop_and_restart_on_the_same_port_keeps_data() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("life").collection("c");
        col.insert_many((0..10).map(|i| doc! {"_id": i}))
            .await
            .unwrap();
        let addr = sim.addr();
        sim.stop().await;
        // While stopped nothing listens on the port.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        sim.restart().await.unwrap();
        assert_eq!(sim.addr(), addr);
        // The same client reconnects by itself.
        let mut n = 0;
        for _ in 0..100 {
            match col.count_documents(doc! {}).await {
                Ok(v) => {
                    n = v;
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        assert_eq!(n, 10);
        col.insert_one(doc! {"_id": 10}).await.unwrap();
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 11);
        // restart() on a running simulator also works.
        sim.restart().await.unwrap();
        let fresh = client(&sim).await;
        assert_eq!(
            fresh
                .database("life")
                .collection::<Document>("c")
                .count_documents(doc! {})
                .await
                .unwrap(),
            11
        );
    })
    .await
}

#[tokio::test]
async fn drop_connections_is_transparent_to_retrying_clients() {
    bounded(async {
        let (sim, c) = start_with_client().await;
        let col: Collection<Document> = c.database("life").collection("drop");
        for i in 0..50 {
            if i % 10 == 5 {
                sim.drop_connections();
            }
            col.insert_one(doc! {"_id": i}).await.unwrap();
        }
        assert_eq!(col.count_documents(doc! {}).await.unwrap(), 50);
    })
    .await
}

//! Shared helpers: start a simulator, connect the real driver, bound every test in time.

use std::{future::Future, time::Duration};

use bson::{doc, Document};
use futures::{Stream, StreamExt};
use mongo_sim::{MongoSim, SimBuilder, SimHandle};
use mongodb::{error::ErrorKind, options::ClientOptions, Client};

/// Upper bound for one whole test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for waiting on one change event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a test body with a time bound.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

pub fn builder() -> SimBuilder {
    MongoSim::builder()
}

pub async fn start() -> SimHandle {
    builder().start().await.expect("simulator starts")
}

/// A client with short server-selection and heartbeat settings.
pub async fn client_for(uri: &str) -> Client {
    let sep = if uri.contains('?') { '&' } else { '?' };
    let uri = format!("{uri}{sep}serverSelectionTimeoutMS=10000&heartbeatFrequencyMS=500");
    let opts = ClientOptions::parse(uri).await.expect("valid uri");
    Client::with_options(opts).expect("client")
}

pub async fn client(sim: &SimHandle) -> Client {
    client_for(&sim.uri()).await
}

pub async fn start_with_client() -> (SimHandle, Client) {
    let sim = start().await;
    let c = client(&sim).await;
    (sim, c)
}

/// The server error code of a driver error, whatever its shape.
pub fn code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|w| w.first())
            .map(|w| w.code)
            .or_else(|| m.write_concern_error.as_ref().map(|w| w.code)),
        ErrorKind::BulkWrite(b) => b.write_errors.values().next().map(|w| w.code),
        _ => None,
    }
}

/// The next item of a stream, within [`EVENT_TIMEOUT`].
pub async fn next<S, T>(s: &mut S) -> T
where
    S: Stream<Item = mongodb::error::Result<T>> + Unpin,
{
    tokio::time::timeout(EVENT_TIMEOUT, s.next())
        .await
        .expect("no event within the time bound")
        .expect("stream ended")
        .expect("stream error")
}

/// The next item or the error, within [`EVENT_TIMEOUT`].
pub async fn next_result<S, T>(s: &mut S) -> mongodb::error::Result<T>
where
    S: Stream<Item = mongodb::error::Result<T>> + Unpin,
{
    tokio::time::timeout(EVENT_TIMEOUT, s.next())
        .await
        .expect("no event within the time bound")
        .expect("stream ended")
}

/// Runs an admin command through the driver.
pub async fn admin(client: &Client, cmd: Document) -> mongodb::error::Result<Document> {
    client.database("admin").run_command(cmd).await
}

/// Configures `failCommand` through the driver, as the driver test suites do.
pub async fn fail_command(client: &Client, mode: bson::Bson, data: Document) {
    admin(
        client,
        doc! {"configureFailPoint": "failCommand", "mode": mode, "data": data},
    )
    .await
    .expect("configureFailPoint");
}

pub async fn fail_command_off(client: &Client) {
    admin(
        client,
        doc! {"configureFailPoint": "failCommand", "mode": "off"},
    )
    .await
    .expect("configureFailPoint off");
}

/// Polls `check` until it returns true, at most `within`.
pub async fn eventually<F, Fut>(within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `dbHash` of a database through the driver.
pub async fn db_hash(client: &Client, db: &str) -> Document {
    client
        .database(db)
        .run_command(doc! {"dbHash": 1})
        .await
        .expect("dbHash")
}

/// Open cursors as `serverStatus` reports them.
pub async fn open_cursors(client: &Client) -> i64 {
    let s = admin(client, doc! {"serverStatus": 1})
        .await
        .expect("serverStatus");
    s.get_document("metrics")
        .and_then(|m| m.get_document("cursor"))
        .and_then(|c| c.get_document("open"))
        .and_then(|o| o.get_i64("total"))
        .expect("metrics.cursor.open.total")
}

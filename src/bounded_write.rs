//! Destination writes bounded in time (issue 9 item 6), for data, checkpoints and metadata.
//!
//! `destination.socket_timeout_ms` bounds a write on the client. The command carries `maxTimeMS`
//! below that bound, so the server gives up first; and after the client gave up, the caller
//! waits out the server's bound before it reports the failure. An abandoned write is therefore
//! dead before anything writes the same documents again: it can never land after a newer one.
//!
//! The driver's typed helpers (`replace_one`, `insert_one`, ...) cannot send `maxTimeMS`, so the
//! daemon's own metadata writes go through [`BoundedWrites`], which sends the write commands.

use std::{future::IntoFuture, time::Duration};

use bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::Database;

use crate::error::{is_transient_write_error, ErrorKind, SyncError};
use crate::fence::Fence;

/// Code of a duplicate key on a unique index.
const DUPLICATE_KEY: i32 = 11000;

/// The `maxTimeMS` sent with a write bounded by `limit` on the client: three quarters of it
/// (at least 1 ms), so the server gives up before the client does.
pub fn server_time_limit(limit: Duration) -> Duration {
    (limit * 3 / 4).max(Duration::from_millis(1))
}

/// [`server_time_limit`] in milliseconds, as the `maxTimeMS` field of a command.
pub fn max_time_ms(limit: Duration) -> i64 {
    server_time_limit(limit).as_millis() as i64
}

/// A write that did not run to an answer.
#[derive(Debug, Clone, Copy)]
pub enum Abandoned {
    /// The client gave up after `limit`, and the write's server bound has passed since.
    TimedOut { limit: Duration },
    /// Not sent: this instance no longer holds its lease (DESIGN §2.12).
    Fenced,
}

impl Abandoned {
    /// An error naming what did not run: retryable after a timeout; a stop when fenced.
    pub fn into_error(self, what: &str) -> SyncError {
        match self {
            Abandoned::TimedOut { limit } => SyncError::new(
                ErrorKind::DestinationConnection,
                format!(
                    "{what} timed out after {} ms (destination.socket_timeout_ms)",
                    limit.as_millis()
                ),
            ),
            Abandoned::Fenced => SyncError::new(
                ErrorKind::Cancelled,
                format!("{what} not sent: this instance no longer holds its lease (ha)"),
            ),
        }
    }
}

/// Runs `write`, a command that carries `maxTimeMS` = [`max_time_ms`]`(limit)`, giving up after
/// `limit`. After giving up it waits out the server's bound, so the write is dead on return.
/// Nothing is sent once this process's lease deadline has passed ([`crate::fence`]).
pub async fn run<T>(
    limit: Option<Duration>,
    write: impl IntoFuture<Output = T>,
) -> Result<T, Abandoned> {
    run_fenced(&crate::fence::PROCESS, limit, write).await
}

/// [`run`] under `fence`. The fence is checked before every poll of `write`, not only before
/// it starts: a write suspended before its bytes left (waiting for a pooled connection, or in a
/// process paused by SIGSTOP) is dropped unsent when it resumes past the deadline. A later poll
/// cannot tell whether the bytes left already, so a write stopped there is waited out like a
/// timed-out one before `Fenced` is returned.
pub async fn run_fenced<T>(
    fence: &Fence,
    limit: Option<Duration>,
    write: impl IntoFuture<Output = T>,
) -> Result<T, Abandoned> {
    if fence.check().is_err() {
        tracing::warn!("destination write refused: this instance no longer holds its lease");
        return Err(Abandoned::Fenced);
    }
    let write = while_allowed(fence, write.into_future());
    let stopped = match limit {
        None => return write.await.map_err(|_| Abandoned::Fenced),
        Some(limit) => match tokio::time::timeout(limit, write).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(_)) => Abandoned::Fenced,
            Err(_) => Abandoned::TimedOut { limit },
        },
    };
    if let Abandoned::Fenced = stopped {
        tracing::warn!("destination write refused after it started: the lease deadline passed while it waited for a connection or a paused process; waiting out its server bound");
    }
    if let Some(limit) = limit {
        tokio::time::sleep(server_time_limit(limit)).await;
    }
    Err(stopped)
}

/// Polls `write` only while `fence` allows writes; dropped (unsent if it had not sent yet) at
/// the first poll after the deadline.
async fn while_allowed<F: std::future::Future>(
    fence: &Fence,
    write: F,
) -> Result<F::Output, crate::fence::Fenced> {
    let mut write = std::pin::pin!(write);
    std::future::poll_fn(|cx| match fence.check() {
        Ok(()) => write.as_mut().poll(cx).map(Ok),
        Err(fenced) => std::task::Poll::Ready(Err(fenced)),
    })
    .await
}

/// Runs a destination DDL command (`create`, `drop`, `collMod`, `createIndexes`,
/// `dropIndexes`) bounded like the writes: it carries `maxTimeMS` below `limit`, and when the
/// client gives up, the command is dead on return and the result is a retryable error naming
/// `what`. Otherwise the server's reply (or its error) is returned for the caller to judge.
pub async fn ddl(
    db: &Database,
    mut command: Document,
    limit: Option<Duration>,
    what: &str,
) -> Result<Result<Document, mongodb::error::Error>, SyncError> {
    if let Some(limit) = limit {
        command.insert("maxTimeMS", max_time_ms(limit));
    }
    run(limit, db.run_command(command))
        .await
        .map_err(|abandoned| abandoned.into_error(what))
}

/// What one bounded write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Applied: `n` documents matched, inserted or deleted (an upsert counts 1).
    Done { n: i64 },
    /// Refused by a unique index (11000): the caller decides what that means.
    DuplicateKey,
}

/// The daemon's own writes to one destination database (checkpoints, identity, dead letters,
/// conflicts), majority-acknowledged and journaled, bounded by `destination.socket_timeout_ms`.
#[derive(Clone)]
pub struct BoundedWrites {
    db: Database,
    limit: Option<Duration>,
    /// The area named by errors that are not transient.
    area: ErrorKind,
}

impl BoundedWrites {
    pub fn new(db: &Database, limit: Option<Duration>, area: ErrorKind) -> BoundedWrites {
        BoundedWrites {
            db: db.clone(),
            limit,
            area,
        }
    }

    /// Replaces the document matching `filter` (inserting it when `upsert`).
    pub async fn replace(
        &self,
        coll: &str,
        filter: Document,
        replacement: Document,
        upsert: bool,
        what: &str,
    ) -> Result<WriteOutcome, SyncError> {
        self.update(coll, filter, replacement, upsert, what).await
    }

    /// Updates (`$`-operators) or replaces the first document matching `filter`.
    pub async fn update(
        &self,
        coll: &str,
        filter: Document,
        update: Document,
        upsert: bool,
        what: &str,
    ) -> Result<WriteOutcome, SyncError> {
        let cmd = doc! {
            "update": coll,
            "updates": [{"q": filter, "u": update, "upsert": upsert}],
        };
        self.send(cmd, what).await
    }

    /// Inserts `document`, giving it an `_id` first when it has none (as the driver does), so a
    /// retried insert is the same document.
    pub async fn insert(
        &self,
        coll: &str,
        mut document: Document,
        what: &str,
    ) -> Result<WriteOutcome, SyncError> {
        if !document.contains_key("_id") {
            let mut with_id = doc! {"_id": ObjectId::new()};
            with_id.extend(document);
            document = with_id;
        }
        self.send(doc! {"insert": coll, "documents": [document]}, what)
            .await
    }

    /// Updates every document matching `filter` with `update` (`$`-operators); returns how
    /// many matched.
    pub async fn update_many(
        &self,
        coll: &str,
        filter: Document,
        update: Document,
        what: &str,
    ) -> Result<u64, SyncError> {
        let cmd = doc! {
            "update": coll,
            "updates": [{"q": filter, "u": update, "multi": true}],
        };
        match self.send(cmd, what).await? {
            WriteOutcome::Done { n } => Ok(n.max(0) as u64),
            WriteOutcome::DuplicateKey => Ok(0),
        }
    }

    /// Deletes every document matching `filter`; returns how many.
    pub async fn delete_many(
        &self,
        coll: &str,
        filter: Document,
        what: &str,
    ) -> Result<u64, SyncError> {
        let cmd = doc! {"delete": coll, "deletes": [{"q": filter, "limit": 0}]};
        match self.send(cmd, what).await? {
            WriteOutcome::Done { n } => Ok(n.max(0) as u64),
            WriteOutcome::DuplicateKey => Ok(0),
        }
    }

    async fn send(&self, mut cmd: Document, what: &str) -> Result<WriteOutcome, SyncError> {
        cmd.insert("ordered", true);
        if let Some(limit) = self.limit {
            cmd.insert("maxTimeMS", max_time_ms(limit));
        }
        cmd.insert("writeConcern", doc! {"w": "majority", "j": true});
        let reply = run(self.limit, self.db.run_command(cmd))
            .await
            .map_err(|abandoned| abandoned.into_error(what))?
            .map_err(|e| SyncError::mongo(self.area, what, e))?;
        outcome(&reply, self.area, what)
    }
}

/// Reads a write command's reply: its first write error, its write concern error, or `n`.
fn outcome(reply: &Document, area: ErrorKind, what: &str) -> Result<WriteOutcome, SyncError> {
    if let Some(Bson::Document(first)) = reply
        .get_array("writeErrors")
        .ok()
        .and_then(|errors| errors.first())
    {
        let code = first.get_i32("code").unwrap_or(0);
        let message = first.get_str("errmsg").unwrap_or("");
        if code == DUPLICATE_KEY {
            return Ok(WriteOutcome::DuplicateKey);
        }
        let kind = if is_transient_write_error(code) {
            ErrorKind::DestinationConnection
        } else {
            area
        };
        return Err(SyncError::new(
            kind,
            format!("{what}: the destination refused the write (code {code}): {message}"),
        ));
    }
    if let Ok(wce) = reply.get_document("writeConcernError") {
        return Err(SyncError::new(
            ErrorKind::DestinationConnection,
            format!(
                "{what}: write concern error from the destination (code {}): {}; retrying",
                wce.get_i32("code").unwrap_or(0),
                wce.get_str("errmsg").unwrap_or("")
            ),
        ));
    }
    let n = match reply.get("n") {
        Some(Bson::Int32(n)) => *n as i64,
        Some(Bson::Int64(n)) => *n,
        _ => 0,
    };
    Ok(WriteOutcome::Done { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that waited for a pooled connection (or sat in a paused process) until after the
    /// lease deadline must not be sent when it resumes: the deadline is checked again, not only
    /// before the write started. The one pooled connection is held by a blocked insert; the
    /// fenced insert is allowed for 200 ms and gets the connection after ~1 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_waited_past_the_deadline_for_a_connection_is_never_sent() {
        let sim = mongo_sim::MongoSim::builder()
            .replica_set("fence")
            .start()
            .await
            .unwrap();
        let app = "fenced-writes";
        let client =
            mongodb::Client::with_uri_str(format!("{}&maxPoolSize=1&appName={app}", sim.uri()))
                .await
                .unwrap();
        let observer = mongodb::Client::with_uri_str(sim.uri()).await.unwrap();
        let db = client.database("fence");
        sim.configure_fail_point(&doc! {
            "configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["insert"], "appName": app,
                     "blockConnection": true, "blockTimeMS": 1000},
        })
        .unwrap();
        let holder = {
            let db = db.clone();
            tokio::spawn(async move {
                db.run_command(doc! {"insert": "c", "documents": [{"_id": 1}]})
                    .await
            })
        };
        // The holder is at the server (counted before its block) and holds the only connection.
        let admin = observer.database("admin");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = admin.run_command(doc! {"serverStatus": 1}).await.unwrap();
            let inserts = status
                .get_document("opcounters")
                .ok()
                .and_then(|o| o.get("insert"))
                .and_then(|n| match n {
                    Bson::Int32(n) => Some(i64::from(*n)),
                    Bson::Int64(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(0);
            if inserts >= 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the holder never reached the server"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fence = Fence::new();
        fence.arm();
        fence.allow_until(0, std::time::Instant::now() + Duration::from_millis(200));
        let write = run_fenced(
            &fence,
            Some(Duration::from_millis(1500)),
            db.run_command(doc! {"insert": "c", "documents": [{"_id": 2}], "maxTimeMS": 1125}),
        )
        .await;
        holder.await.unwrap().unwrap();
        let written = observer
            .database("fence")
            .collection::<Document>("c")
            .count_documents(doc! {"_id": 2})
            .await
            .unwrap();
        assert_eq!(written, 0, "the write was sent after the deadline");
        assert!(matches!(write, Err(Abandoned::Fenced)), "{write:?}");
    }

    #[test]
    fn the_server_gives_up_before_the_client() {
        assert_eq!(
            server_time_limit(Duration::from_millis(1000)),
            Duration::from_millis(750)
        );
        assert_eq!(max_time_ms(Duration::from_millis(1)), 1);
    }

    #[test]
    fn a_duplicate_key_is_an_outcome_not_an_error() {
        let reply = doc! {"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000"}]};
        assert_eq!(
            outcome(&reply, ErrorKind::Checkpoint, "saving").unwrap(),
            WriteOutcome::DuplicateKey
        );
    }

    #[test]
    fn transient_write_errors_retry_and_others_keep_their_area() {
        let transient = doc! {"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 11602, "errmsg": "interrupted"}]};
        assert_eq!(
            outcome(&transient, ErrorKind::Checkpoint, "saving")
                .unwrap_err()
                .kind,
            ErrorKind::DestinationConnection
        );
        let refused = doc! {"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 121, "errmsg": "validation"}]};
        assert_eq!(
            outcome(&refused, ErrorKind::Checkpoint, "saving")
                .unwrap_err()
                .kind,
            ErrorKind::Checkpoint
        );
        let wce = doc! {"ok": 1, "n": 1, "writeConcernError": {"code": 100, "errmsg": "not enough nodes"}};
        assert_eq!(
            outcome(&wce, ErrorKind::Checkpoint, "saving")
                .unwrap_err()
                .kind,
            ErrorKind::DestinationConnection
        );
        assert_eq!(
            outcome(&doc! {"ok": 1, "n": 3}, ErrorKind::Checkpoint, "saving").unwrap(),
            WriteOutcome::Done { n: 3 }
        );
    }
}

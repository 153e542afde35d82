//! The server's shared state: catalog, oplog, clock, sessions, cursors, fail points.
//!
//! One mutex guards the data (catalog + oplog + clock + sessions): every command executes
//! atomically under it, which is what makes retryable writes and transactions simple to get
//! right. Awaiting operations (change-stream `getMore`, `blockConnection`) never hold it.

use std::sync::{
    atomic::{AtomicI32, AtomicI64, Ordering},
    Arc,
};

use bson::{oid::ObjectId, Document, Timestamp};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::{
    cursor::Cursors,
    failpoint::FailPoints,
    oplog::{ClusterClock, Oplog, OplogOp, TxnInfo},
    session::Sessions,
    store::{Catalog, Collection, DocChange},
};

/// Settings of one simulated replica set.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub replica_set: String,
    /// Maximum number of oplog entries kept (`--oplog-max-events`).
    pub oplog_max_events: usize,
    /// `maxWireVersion` advertised (21 = MongoDB 7.0).
    pub max_wire_version: i32,
    /// Interval of the periodic no-op writes that advance the cluster time (real primaries: 10 s).
    pub noop_interval: std::time::Duration,
    /// Interval of the TTL monitor (real servers: 60 s).
    pub ttl_interval: std::time::Duration,
    /// Delay before every reply, to imitate a network round trip (0 = loopback speed).
    pub reply_delay: std::time::Duration,
    /// The one user of `--auth-user`/`--auth-password`; `None` runs without authentication.
    pub auth: Option<crate::auth::Credential>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            replica_set: "rs0".into(),
            oplog_max_events: 1_000_000,
            max_wire_version: 21,
            noop_interval: std::time::Duration::from_secs(10),
            ttl_interval: std::time::Duration::from_secs(60),
            reply_delay: std::time::Duration::ZERO,
            auth: None,
        }
    }
}

/// Data guarded by the engine lock.
pub struct Data {
    pub catalog: Catalog,
    pub oplog: Oplog,
    pub clock: ClusterClock,
    pub sessions: Sessions,
}

impl Data {
    /// Appends one non-transactional oplog entry with a fresh cluster time.
    pub fn log(&mut self, op: OplogOp, images: bool) -> Timestamp {
        let ts = self.clock.tick();
        self.oplog.append(ts, op, None, 0, images);
        ts
    }
}

pub struct Engine {
    pub config: SimConfig,
    pub data: Mutex<Data>,
    pub cursors: Mutex<Cursors>,
    pub failpoints: Mutex<FailPoints>,
    /// Last oplog sequence number, for waking awaiting change streams.
    oplog_watch: watch::Sender<u64>,
    /// The advertised `host:port`; set once the listener is bound.
    pub host: Mutex<String>,
    /// `settings.replicaSetId`: unique per simulated replica set, stable across restarts.
    pub replica_set_id: ObjectId,
    /// Changes at every (simulated) process restart.
    pub process_id: Mutex<ObjectId>,
    next_connection_id: AtomicI32,
    next_cursor_id: AtomicI64,
    /// Per-session checkout: a retryable write and its retry (possibly on another
    /// connection) never execute concurrently, as on a real server.
    session_checkouts: Mutex<std::collections::HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    pub fn new(config: SimConfig) -> Arc<Engine> {
        let oplog = Oplog::new(config.oplog_max_events);
        Arc::new(Engine {
            data: Mutex::new(Data {
                catalog: Catalog::default(),
                oplog,
                clock: ClusterClock::default(),
                sessions: Sessions::default(),
            }),
            cursors: Mutex::new(Cursors::default()),
            failpoints: Mutex::new(FailPoints::default()),
            oplog_watch: watch::channel(0).0,
            host: Mutex::new(String::new()),
            replica_set_id: ObjectId::new(),
            process_id: Mutex::new(ObjectId::new()),
            next_connection_id: AtomicI32::new(1),
            next_cursor_id: AtomicI64::new(1_000_000 + rand::random::<u32>() as i64),
            session_checkouts: Mutex::new(std::collections::HashMap::new()),
            config,
        })
    }

    pub fn next_connection_id(&self) -> i32 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks a session out for one retryable write (waits while another holds it).
    pub async fn check_out_session(&self, key: &[u8]) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.session_checkouts.lock();
            if map.len() > 10_000 {
                // Forget sessions nobody holds (bounded memory for long runs).
                map.retain(|_, l| Arc::strong_count(l) > 1);
            }
            Arc::clone(map.entry(key.to_vec()).or_default())
        };
        lock.lock_owned().await
    }

    pub fn next_cursor_id(&self) -> i64 {
        self.next_cursor_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Wakes change streams waiting for new oplog entries. Call after releasing the data lock.
    pub fn notify_oplog(&self, last_seq: u64) {
        self.oplog_watch.send_replace(last_seq);
    }

    pub fn subscribe_oplog(&self) -> watch::Receiver<u64> {
        self.oplog_watch.subscribe()
    }

    pub fn cluster_time(&self) -> Timestamp {
        self.data.lock().clock.current()
    }

    /// Appends a no-op entry (what a real primary does every 10 s while idle).
    pub fn write_noop(&self) {
        let seq = {
            let mut data = self.data.lock();
            data.log(OplogOp::Noop, false);
            data.oplog.last_seq()
        };
        self.notify_oplog(seq);
    }
}

/// Where the writes of a command go: straight to the oplog, or into a transaction.
pub trait WriteSink {
    fn emit(&mut self, op: OplogOp, images: bool);
    /// The cluster time writes of this command will carry (for `$currentDate` timestamps).
    fn now_ts(&self) -> Timestamp;
}

/// Writes outside transactions: one oplog entry, one cluster time each.
pub struct DirectSink<'a> {
    pub oplog: &'a mut Oplog,
    pub clock: &'a mut ClusterClock,
}

impl WriteSink for DirectSink<'_> {
    fn emit(&mut self, op: OplogOp, images: bool) {
        let ts = self.clock.tick();
        self.oplog.append(ts, op, None, 0, images);
    }

    fn now_ts(&self) -> Timestamp {
        self.clock.current()
    }
}

/// Writes inside a transaction: collected, logged together at commit.
pub struct TxnSink<'a> {
    pub ops: &'a mut Vec<(OplogOp, bool)>,
    pub now: Timestamp,
}

impl WriteSink for TxnSink<'_> {
    fn emit(&mut self, op: OplogOp, images: bool) {
        self.ops.push((op, images));
    }

    fn now_ts(&self) -> Timestamp {
        self.now
    }
}

/// Turns a collection-level change into its oplog operation.
pub fn change_to_op(coll: &Collection, change: DocChange) -> OplogOp {
    let ns = coll.ns.clone();
    let uuid = coll.uuid;
    match change {
        DocChange::Insert { doc } => OplogOp::Insert { ns, uuid, doc },
        DocChange::Update {
            pre,
            post,
            description,
        } => OplogOp::Update {
            ns,
            uuid,
            pre,
            post,
            description,
        },
        DocChange::Replace { pre, post } => OplogOp::Replace {
            ns,
            uuid,
            pre,
            post,
        },
        DocChange::Delete { pre } => OplogOp::Delete { ns, uuid, pre },
    }
}

/// Appends the entries of a committed transaction: one cluster time, increasing op index.
pub fn log_transaction(data: &mut Data, ops: Vec<(OplogOp, bool)>, txn: TxnInfo) -> Timestamp {
    let ts = data.clock.tick();
    for (index, (op, images)) in ops.into_iter().enumerate() {
        data.oplog
            .append(ts, op, Some(txn.clone()), index as u32, images);
    }
    ts
}

/// `lsid` documents compare by their `id` field.
pub fn lsid_key(lsid: &Document) -> Vec<u8> {
    match lsid.get("id") {
        Some(bson::Bson::Binary(b)) => b.bytes.clone(),
        Some(other) => other.to_string().into_bytes(),
        None => Vec::new(),
    }
}

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
    /// `--data-dir`: where the state survives restarts (see [`crate::persist`]); `None` keeps
    /// everything in memory.
    pub data_dir: Option<std::path::PathBuf>,
    /// `--stepdown-every`: the primary steps down on its own at this interval (fault injection).
    pub stepdown_every: Option<std::time::Duration>,
    /// How long an automatic step-down keeps the node secondary.
    pub stepdown_for: std::time::Duration,
    /// `minSnapshotHistoryWindowInSeconds`: how far back snapshot reads at `atClusterTime`
    /// reach (also settable at run time with `setParameter`).
    pub snapshot_history_window_secs: u64,
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
            data_dir: None,
            stepdown_every: None,
            stepdown_for: std::time::Duration::from_secs(2),
            snapshot_history_window_secs: crate::snapshot::DEFAULT_HISTORY_WINDOW_SECS,
        }
    }
}

/// Data guarded by the engine lock.
pub struct Data {
    pub catalog: Catalog,
    pub oplog: Oplog,
    pub clock: ClusterClock,
    pub sessions: Sessions,
    /// With `--data-dir`: the write-ahead journal.
    pub journal: Option<crate::persist::Journal>,
    /// How far back snapshot reads reach (see [`crate::snapshot`]).
    pub history: crate::snapshot::History,
}

impl Data {
    /// Appends one non-transactional oplog entry with a fresh cluster time.
    pub fn log(&mut self, op: OplogOp, images: bool) -> Timestamp {
        let ts = self.clock.tick();
        self.oplog.append(ts, op, None, 0, images);
        ts
    }

    /// Writes the journal records of the entries appended since the last flush.
    pub fn flush_journal(&mut self) -> std::io::Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        let bytes = self.oplog.take_journal();
        journal.write(&bytes)
    }
}

/// Replica-set state of the one member: its term and whether it is primary right now.
#[derive(Debug, Clone)]
pub struct ReplState {
    /// Election term; grows at every election (step-up).
    pub term: i64,
    /// While stepped down: when the node stands for election again.
    pub secondary_until: Option<std::time::Instant>,
    /// `topologyVersion.counter`: grows at every state change of this process.
    pub topology_counter: i64,
}

impl ReplState {
    pub fn is_primary(&self) -> bool {
        self.secondary_until.is_none()
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
    /// Term, primary/secondary state.
    pub repl: Mutex<ReplState>,
    /// Wakes tasks waiting for a replica-set state change (`hello` long polling, step-ups).
    pub repl_watch: watch::Sender<u64>,
    /// Changes at every (simulated) process restart.
    pub process_id: Mutex<ObjectId>,
    next_connection_id: AtomicI32,
    next_cursor_id: AtomicI64,
    /// `serverStatus.opcounters`: operations received since the process started.
    pub opcounters: OpCounters,
    /// Client connections open now (`serverStatus.connections.current`).
    pub open_connections: AtomicI64,
    /// Per-session checkout: a retryable write and its retry (possibly on another
    /// connection) never execute concurrently, as on a real server.
    session_checkouts: Mutex<std::collections::HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
}

impl Engine {
    /// An in-memory engine (`config.data_dir` must be `None`; see [`Engine::open`]).
    pub fn new(config: SimConfig) -> Arc<Engine> {
        assert!(
            config.data_dir.is_none(),
            "use Engine::open with a data dir"
        );
        Engine::open(config).expect("an in-memory engine cannot fail to open")
    }

    /// Opens an engine, recovering its state from `config.data_dir` when set.
    pub fn open(config: SimConfig) -> std::io::Result<Arc<Engine>> {
        let (catalog, oplog, clock, replica_set_id, term, journal) = match &config.data_dir {
            Some(dir) => {
                let mut r =
                    crate::persist::open(dir, &config.replica_set, config.oplog_max_events)?;
                // A restarted member wins a new election: a higher term than before.
                let term = r.term + 1;
                r.journal.write_term(term)?;
                (
                    r.catalog,
                    r.oplog,
                    r.clock,
                    r.replica_set_id,
                    term,
                    Some(r.journal),
                )
            }
            None => (
                Catalog::default(),
                Oplog::new(config.oplog_max_events),
                ClusterClock::default(),
                ObjectId::new(),
                1,
                None,
            ),
        };
        let history = crate::snapshot::History {
            window_secs: config.snapshot_history_window_secs,
            floor: clock.current(),
        };
        Ok(Arc::new(Engine {
            data: Mutex::new(Data {
                catalog,
                oplog,
                clock,
                sessions: Sessions::default(),
                journal,
                history,
            }),
            cursors: Mutex::new(Cursors::default()),
            failpoints: Mutex::new(FailPoints::default()),
            oplog_watch: watch::channel(0).0,
            host: Mutex::new(String::new()),
            replica_set_id,
            repl: Mutex::new(ReplState {
                term,
                secondary_until: None,
                topology_counter: 0,
            }),
            repl_watch: watch::channel(0).0,
            process_id: Mutex::new(ObjectId::new()),
            next_connection_id: AtomicI32::new(1),
            next_cursor_id: AtomicI64::new(1_000_000 + rand::random::<u32>() as i64),
            session_checkouts: Mutex::new(std::collections::HashMap::new()),
            opcounters: OpCounters::default(),
            open_connections: AtomicI64::new(0),
            config,
        }))
    }

    /// Makes the journal bytes of the commands run so far durable against a process crash
    /// (called before a reply leaves). A journal that cannot be written is fatal, as for a
    /// real server: the process aborts rather than acknowledge writes it cannot keep.
    pub fn flush_journal(&self) {
        if self.config.data_dir.is_none() {
            return;
        }
        if let Err(e) = self.data.lock().flush_journal() {
            tracing::error!(error = %e, "cannot write the journal; aborting");
            std::process::abort();
        }
    }

    /// Syncs the journal when unsynced bytes are older than the sync interval, and folds a
    /// journal grown past its limit into a new snapshot.
    pub fn sync_journal(&self) {
        if self.config.data_dir.is_none() {
            return;
        }
        let identity = self.identity();
        let mut data = self.data.lock();
        let result = data.flush_journal().and_then(|()| {
            let Data {
                catalog,
                oplog,
                clock,
                journal,
                ..
            } = &mut *data;
            let journal = journal.as_mut().expect("data dir has a journal");
            if journal.len() > crate::persist::COMPACT_BYTES {
                journal.compact(&identity, catalog, oplog, clock)
            } else if journal.sync_due() {
                journal.sync()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write the journal; aborting");
            std::process::abort();
        }
    }

    /// Clean stop: writes a snapshot (the journal becomes empty).
    pub fn checkpoint(&self) -> std::io::Result<()> {
        if self.config.data_dir.is_none() {
            return Ok(());
        }
        let identity = self.identity();
        let mut data = self.data.lock();
        data.flush_journal()?;
        let Data {
            catalog,
            oplog,
            clock,
            journal,
            ..
        } = &mut *data;
        journal
            .as_mut()
            .expect("data dir has a journal")
            .compact(&identity, catalog, oplog, clock)
    }

    pub fn is_primary(&self) -> bool {
        self.repl.lock().is_primary()
    }

    /// Steps down for `for_` (the node is secondary, then stands for election again): open
    /// transactions are aborted, blocked writes fail with 11602 when they resume, new writes
    /// get 10107. Returns false when the node is not primary.
    pub fn step_down(&self, for_: std::time::Duration) -> bool {
        let counter = {
            let mut repl = self.repl.lock();
            if !repl.is_primary() {
                return false;
            }
            repl.secondary_until = Some(std::time::Instant::now() + for_);
            repl.topology_counter += 1;
            repl.topology_counter
        };
        {
            let mut data = self.data.lock();
            for s in data.sessions.map.values_mut() {
                if let Some(t) = s.txn.as_mut() {
                    if matches!(t.state, crate::session::TxnState::InProgress) {
                        t.state = crate::session::TxnState::Aborted;
                        t.ops.clear();
                    }
                }
            }
        }
        tracing::info!(seconds = for_.as_secs_f64(), "stepping down");
        self.repl_watch.send_replace(counter as u64);
        true
    }

    /// Wins the (single-member) election once the step-down period is over: a higher term and
    /// a "new primary" no-op entry, as a real primary writes at step-up.
    pub fn step_up_if_due(&self) -> bool {
        let (term, counter) = {
            let mut repl = self.repl.lock();
            match repl.secondary_until {
                Some(until) if until <= std::time::Instant::now() => {}
                _ => return false,
            }
            repl.secondary_until = None;
            repl.term += 1;
            repl.topology_counter += 1;
            (repl.term, repl.topology_counter)
        };
        let seq = {
            let mut data = self.data.lock();
            data.log(OplogOp::Noop, false);
            if let Some(j) = data.journal.as_mut() {
                if let Err(e) = j.write_term(term) {
                    tracing::error!(error = %e, "cannot write the journal; aborting");
                    std::process::abort();
                }
            }
            data.oplog.last_seq()
        };
        tracing::info!(term, "stepped up: primary again");
        self.notify_oplog(seq);
        self.flush_journal();
        self.repl_watch.send_replace(counter as u64);
        true
    }

    fn identity(&self) -> crate::persist::Identity {
        crate::persist::Identity {
            set_name: self.config.replica_set.clone(),
            replica_set_id: self.replica_set_id,
            term: self.repl.lock().term,
        }
    }

    /// `serverStatus.connections`: open now, and created since the process started.
    pub fn connections_document(&self) -> Document {
        bson::doc! {
            "current": self.open_connections.load(Ordering::Relaxed) as i32,
            "totalCreated": (self.next_connection_id.load(Ordering::Relaxed) - 1) as i64,
        }
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
        if !self.is_primary() {
            return; // secondaries do not write
        }
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
    let ns = coll.shared_ns();
    let uuid = coll.uuid;
    match change {
        DocChange::Insert { doc } => OplogOp::Insert {
            ns,
            uuid,
            doc: doc.into(),
        },
        DocChange::Update {
            pre,
            post,
            description,
        } => OplogOp::Update {
            ns,
            uuid,
            pre: pre.into(),
            post: post.into(),
            description,
        },
        DocChange::Replace { pre, post } => OplogOp::Replace {
            ns,
            uuid,
            pre: pre.into(),
            post: post.into(),
        },
        DocChange::Delete { pre } => OplogOp::Delete {
            ns,
            uuid,
            pre: pre.into(),
        },
    }
}

/// Appends the entries of a committed transaction: one cluster time, increasing op index.
pub fn log_transaction(data: &mut Data, ops: Vec<(OplogOp, bool)>, txn: TxnInfo) -> Timestamp {
    let ts = data.clock.tick();
    let txn = Arc::new(txn);
    for (index, (op, images)) in ops.into_iter().enumerate() {
        data.oplog
            .append(ts, op, Some(Arc::clone(&txn)), index as u32, images);
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

/// `serverStatus.opcounters`, counted as a mongod counts them: `insert` per document an
/// insert command carries (failed ones included), `update` and `delete` per statement, `query`
/// per `find` or `aggregate`, `getmore` per `getMore`, `command` for every other command.
#[derive(Debug, Default)]
pub struct OpCounters {
    pub insert: AtomicI64,
    pub query: AtomicI64,
    pub update: AtomicI64,
    pub delete: AtomicI64,
    pub getmore: AtomicI64,
    pub command: AtomicI64,
}

impl OpCounters {
    /// Counts one received command (`statements`: its documents or statements, for writes).
    pub fn count(&self, command: &str, statements: usize) {
        let (counter, by) = match command {
            "insert" => (&self.insert, statements),
            "update" => (&self.update, statements),
            "delete" => (&self.delete, statements),
            "find" | "aggregate" => (&self.query, 1),
            "getMore" => (&self.getmore, 1),
            _ => (&self.command, 1),
        };
        counter.fetch_add(by as i64, Ordering::Relaxed);
    }

    pub fn to_document(&self) -> Document {
        let read = |c: &AtomicI64| c.load(Ordering::Relaxed);
        bson::doc! {
            "insert": read(&self.insert),
            "query": read(&self.query),
            "update": read(&self.update),
            "delete": read(&self.delete),
            "getmore": read(&self.getmore),
            "command": read(&self.command),
        }
    }
}

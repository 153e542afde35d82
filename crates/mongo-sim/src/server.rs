//! TCP listener, per-connection protocol loop, background tasks (no-op writer, TTL monitor),
//! and the handle tests use to stop, restart and disturb a running simulator.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bson::{Bson, Document};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    commands::{self, ConnInfo, Outcome},
    engine::{change_to_op, Engine, SimConfig},
    error::codes,
    oplog::OplogOp,
    query::compare::IdKey,
    wire::{self, MsgHeader, Request, HEADER_LEN},
};

/// Builds and starts a simulated replica set.
#[derive(Debug, Clone)]
pub struct SimBuilder {
    config: SimConfig,
    bind: String,
    port: u16,
}

impl Default for SimBuilder {
    fn default() -> Self {
        Self {
            config: SimConfig::default(),
            bind: "127.0.0.1".into(),
            port: 0,
        }
    }
}

impl SimBuilder {
    pub fn replica_set(mut self, name: impl Into<String>) -> Self {
        self.config.replica_set = name.into();
        self
    }

    pub fn oplog_max_events(mut self, n: usize) -> Self {
        self.config.oplog_max_events = n;
        self
    }

    pub fn bind(mut self, addr: impl Into<String>) -> Self {
        self.bind = addr.into();
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub fn noop_interval(mut self, every: Duration) -> Self {
        self.config.noop_interval = every;
        self
    }

    pub fn ttl_interval(mut self, every: Duration) -> Self {
        self.config.ttl_interval = every;
        self
    }

    /// Delays every reply by `delay`, imitating a network round trip, so benchmarks can
    /// compare clients under realistic latency.
    /// `minSnapshotHistoryWindowInSeconds` (default 300).
    pub fn snapshot_history_window(mut self, secs: u64) -> Self {
        self.config.snapshot_history_window_secs = secs;
        self
    }

    pub fn reply_delay(mut self, delay: Duration) -> Self {
        self.config.reply_delay = delay;
        self
    }

    /// Requires SCRAM-SHA-256 authentication as `user` (on `admin`) with `password`.
    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.config.auth = Some(crate::auth::Credential::new(user, password));
        self
    }

    /// Keeps the state in `dir` (created if missing), so a simulator started again with the
    /// same directory is the same replica set with the same data (see [`crate::persist`]).
    pub fn data_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.config.data_dir = Some(dir.into());
        self
    }

    /// Fault injection: the primary steps down every `every`, staying secondary for `for_`.
    pub fn stepdown_every(mut self, every: Duration, for_: Duration) -> Self {
        self.config.stepdown_every = Some(every);
        self.config.stepdown_for = for_;
        self
    }

    pub fn max_wire_version(mut self, v: i32) -> Self {
        self.config.max_wire_version = v;
        self
    }

    pub async fn start(self) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind((self.bind.as_str(), self.port)).await?;
        let addr = listener.local_addr()?;
        let engine = Engine::open(self.config)?;
        let advertised = if addr.ip().is_unspecified() {
            format!("localhost:{}", addr.port())
        } else {
            addr.to_string()
        };
        *engine.host.lock() = advertised;
        let running = Running::spawn(Arc::clone(&engine), listener);
        Ok(SimHandle {
            engine,
            addr,
            running: Mutex::new(Some(running)),
        })
    }
}

/// One "process lifetime" of the simulator: listener, connections, background tasks.
struct Running {
    cancel: CancellationToken,
    /// Child of `cancel`, replaced by `drop_connections`.
    connections: Arc<Mutex<CancellationToken>>,
    tracker: TaskTracker,
}

impl Running {
    fn spawn(engine: Arc<Engine>, listener: TcpListener) -> Running {
        let cancel = CancellationToken::new();
        let connections = Arc::new(Mutex::new(cancel.child_token()));
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(
            Arc::clone(&engine),
            listener,
            cancel.clone(),
            Arc::clone(&connections),
            tracker.clone(),
        ));
        tracker.spawn(noop_writer(Arc::clone(&engine), cancel.clone()));
        if engine.config.data_dir.is_some() {
            tracker.spawn(journal_syncer(Arc::clone(&engine), cancel.clone()));
        }
        tracker.spawn(repl_monitor(Arc::clone(&engine), cancel.clone()));
        tracker.spawn(ttl_monitor(engine, cancel.clone()));
        Running {
            cancel,
            connections,
            tracker,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// A running simulator. Dropping it stops the listener and every connection.
pub struct SimHandle {
    engine: Arc<Engine>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(r) = self.running.lock().take() {
            r.cancel.cancel();
        }
    }
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` as advertised in `hello`.
    pub fn host(&self) -> String {
        self.engine.host.lock().clone()
    }

    /// A replica-set connection string (`?replicaSet=<name>`).
    pub fn uri(&self) -> String {
        format!(
            "mongodb://{}/?replicaSet={}",
            self.host(),
            self.engine.config.replica_set
        )
    }

    /// A direct connection string (`?directConnection=true`).
    pub fn direct_uri(&self) -> String {
        format!("mongodb://{}/?directConnection=true", self.host())
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn replica_set_id(&self) -> bson::oid::ObjectId {
        self.engine.replica_set_id
    }

    /// Closes every open client connection (the listener keeps accepting new ones).
    pub fn drop_connections(&self) {
        if let Some(r) = self.running.lock().as_ref() {
            let mut token = r.connections.lock();
            token.cancel();
            *token = r.cancel.child_token();
        }
    }

    /// Stops serving (like a crashed or stopped `mongod`), keeping the data.
    pub async fn stop(&self) {
        let running = self.running.lock().take();
        if let Some(r) = running {
            r.stop().await;
        }
        // Cursors and sessions live in memory of the process: a restart loses them.
        self.engine.cursors.lock().clear();
        self.engine.data.lock().sessions.map.clear();
    }

    /// Starts serving again on the same port with the same data (a new process id).
    pub async fn restart(&self) -> std::io::Result<()> {
        self.stop().await;
        let listener = bind_with_retry(self.addr).await?;
        *self.engine.process_id.lock() = bson::oid::ObjectId::new();
        *self.running.lock() = Some(Running::spawn(Arc::clone(&self.engine), listener));
        Ok(())
    }

    /// Stops the simulator and waits for its tasks to finish; with a data directory, writes
    /// a final snapshot (a clean stop).
    pub async fn shutdown(self) {
        self.stop().await;
        if let Err(e) = self.engine.checkpoint() {
            tracing::error!(error = %e, "cannot write the final snapshot");
        }
    }

    /// Changes the oplog capacity, dropping the oldest entries when shrinking.
    pub fn set_oplog_capacity(&self, n: usize) {
        self.engine.data.lock().oplog.set_capacity(n);
    }

    /// Writes a no-op oplog entry (advances the cluster time) now.
    pub fn write_noop(&self) {
        self.engine.write_noop();
    }

    /// Configures a fail point directly (same document as the `configureFailPoint` command).
    pub fn configure_fail_point(&self, cmd: &Document) -> Result<i64, crate::error::CommandError> {
        self.engine.failpoints.lock().configure(cmd)
    }
}

async fn bind_with_retry(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

async fn accept_loop(
    engine: Arc<Engine>,
    listener: TcpListener,
    cancel: CancellationToken,
    connections: Arc<Mutex<CancellationToken>>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let token = connections.lock().clone();
                tracker.spawn(serve_connection(Arc::clone(&engine), stream, peer, token));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_message(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<Option<(MsgHeader, Vec<u8>)>> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header = MsgHeader::parse(&header);
    let len = header
        .body_len()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Some((header, body)))
}

fn refused_as_not_primary(reply: &Document) -> bool {
    matches!(
        reply.get_i32("code"),
        Ok(codes::NOT_WRITABLE_PRIMARY
            | codes::INTERRUPTED_DUE_TO_REPL_STATE_CHANGE
            | codes::NOT_PRIMARY_NO_SECONDARY_OK)
    )
}

/// `client.application.name` from a handshake, for `failCommand`'s `appName` filter.
fn app_name_of(cmd: &Document) -> Option<String> {
    cmd.get_document("client")
        .ok()?
        .get_document("application")
        .ok()?
        .get_str("name")
        .ok()
        .map(str::to_string)
}

/// Counts a client connection in `serverStatus.connections.current` while it is served.
struct OpenConnection(Arc<Engine>);

impl OpenConnection {
    fn count(engine: &Arc<Engine>) -> OpenConnection {
        engine
            .open_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        OpenConnection(Arc::clone(engine))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn serve_connection(
    engine: Arc<Engine>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let _open = OpenConnection::count(&engine);
    let mut conn = ConnInfo {
        id: engine.next_connection_id(),
        app_name: None,
        auth: Default::default(),
    };
    let mut next_reply_id: i32 = 1;
    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => return,
            m = read_message(&mut reader) => m,
        };
        let (header, body) = match message {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection: unreadable message");
                return;
            }
        };
        let request = match wire::decode_request(&header, &body) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing connection: malformed message");
                return;
            }
        };
        next_reply_id = next_reply_id.wrapping_add(1);
        // The reply's document, freed once the reply is written: a large reply (an `update`
        // that upserts answers an entry per statement) is then freed while the client reads.
        let mut answered: Option<Document> = None;
        let reply = match request {
            Request::Query(q) => {
                let name = q.query.keys().next().cloned().unwrap_or_default();
                let query = match q.query.get("$query") {
                    Some(Bson::Document(inner)) => inner.clone(),
                    _ => q.query.clone(),
                };
                let name = if name == "$query" {
                    query.keys().next().cloned().unwrap_or_default()
                } else {
                    name
                };
                let doc = if q.full_collection_name.ends_with(".$cmd")
                    && (name == "isMaster" || name == "ismaster")
                {
                    if conn.app_name.is_none() {
                        conn.app_name = app_name_of(&query);
                    }
                    commands::hello_reply(&engine, &conn, &query, false)
                } else {
                    let err = crate::error::CommandError::new(
                        codes::UNSUPPORTED_OP_QUERY_COMMAND,
                        format!("Unsupported OP_QUERY command: {name}. The client driver may require an upgrade."),
                    );
                    commands::error_reply(&engine, &err, &[])
                };
                wire::encode_op_reply(next_reply_id, header.request_id, &doc)
            }
            Request::Msg(m) => {
                let more_to_come = m.more_to_come();
                let (cmd, raw_updates) = m.into_parts();
                if conn.app_name.is_none() {
                    if let Some(name) = cmd.keys().next() {
                        if matches!(name.as_str(), "hello" | "isMaster" | "ismaster") {
                            conn.app_name = app_name_of(&cmd);
                        }
                    }
                }
                let outcome = tokio::select! {
                    _ = cancel.cancelled() => return,
                    o = commands::execute_with_batch(&engine, &mut conn, cmd, raw_updates) => o,
                };
                // The journal records of this command reach the file before its reply.
                engine.flush_journal();
                match outcome {
                    Outcome::Close => return,
                    // An unacknowledged write refused by a non-primary: the client cannot see
                    // the error, so the connection is closed (SERVER-38512).
                    Outcome::Reply(doc) | Outcome::ReplyWithArray { body: doc, .. }
                        if more_to_come && refused_as_not_primary(&doc) =>
                    {
                        return
                    }
                    Outcome::Reply(_) | Outcome::ReplyWithArray { .. } if more_to_come => continue,
                    Outcome::Reply(doc) => {
                        let bytes =
                            wire::encode_op_msg_reply(next_reply_id, header.request_id, &doc);
                        answered = Some(doc);
                        bytes
                    }
                    Outcome::ReplyWithArray { body, key, array } => {
                        let bytes = wire::encode_op_msg_reply_with_array(
                            next_reply_id,
                            header.request_id,
                            &body,
                            key,
                            &array,
                        );
                        answered = Some(body);
                        bytes
                    }
                }
            }
        };
        if !engine.config.reply_delay.is_zero() {
            tokio::time::sleep(engine.config.reply_delay).await;
        }
        let written = tokio::select! {
            _ = cancel.cancelled() => return,
            w = write.write_all(&reply) => w,
        };
        if let Err(e) = written {
            tracing::debug!(%peer, error = %e, "client went away");
            return;
        }
        drop(answered);
    }
}

/// Syncs the journal every [`crate::persist::SYNC_INTERVAL`] (and writes what background
/// tasks appended).
async fn journal_syncer(engine: Arc<Engine>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(crate::persist::SYNC_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => engine.sync_journal(),
        }
    }
}

/// Step-ups when a step-down period ends, and `--stepdown-every` step-downs.
async fn repl_monitor(engine: Arc<Engine>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    // The next automatic step-down: `every` after the node (last) became primary.
    let mut next_stepdown: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                engine.step_up_if_due();
                if let Some(every) = engine.config.stepdown_every {
                    if engine.is_primary() {
                        let at = *next_stepdown
                            .get_or_insert_with(|| tokio::time::Instant::now() + every);
                        if tokio::time::Instant::now() >= at {
                            engine.step_down(engine.config.stepdown_for);
                            next_stepdown = None;
                        }
                    }
                }
            }
        }
    }
}

async fn noop_writer(engine: Arc<Engine>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(engine.config.noop_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => engine.write_noop(),
        }
    }
}

/// Deletes documents whose TTL-indexed date is older than `expireAfterSeconds`, as delete
/// events, like the server's TTL monitor.
async fn ttl_monitor(engine: Arc<Engine>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(engine.config.ttl_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => run_ttl_pass(&engine),
        }
    }
}

pub fn run_ttl_pass(engine: &Engine) {
    if !engine.is_primary() {
        return; // the TTL monitor deletes on primaries only
    }
    let now_ms = bson::DateTime::now().timestamp_millis();
    let last = {
        let mut guard = engine.data.lock();
        let data = &mut *guard;
        let mut expired: Vec<(crate::store::Namespace, Vec<Bson>)> = Vec::new();
        for colls in data.catalog.dbs.values() {
            for coll in colls.values() {
                for index in coll.indexes.iter() {
                    let (Some(secs), true) = (index.ttl_seconds(), index.key.len() == 1) else {
                        continue;
                    };
                    let field = index.key.keys().next().expect("one key").clone();
                    let cutoff = now_ms - (secs * 1000.0) as i64;
                    let ids: Vec<Bson> = coll
                        .docs
                        .iter()
                        .filter(|(_, d)| {
                            crate::store::values_at_path(d, &field)
                                .iter()
                                .filter_map(|v| v.as_datetime().map(|t| t.timestamp_millis()))
                                .min()
                                .is_some_and(|t| t < cutoff)
                        })
                        .map(|(_, d): (&IdKey, _)| d.get("_id").cloned().unwrap_or(Bson::Null))
                        .collect();
                    if !ids.is_empty() {
                        expired.push((coll.ns.clone(), ids));
                    }
                }
            }
        }
        for (ns, ids) in expired {
            for id in ids {
                let Some(coll) = data.catalog.get_mut(&ns) else {
                    continue;
                };
                if let Some(change) = coll.delete(&id) {
                    let images = coll.pre_and_post_images();
                    let op: OplogOp = change_to_op(coll, change);
                    data.log(op, images);
                }
            }
        }
        data.oplog.last_seq()
    };
    engine.notify_oplog(last);
}

//! Shared change streams (DESIGN §2.11): one reader per database or for the deployment routes
//! events to the namespace workers that joined it, through bounded queues, and checkpoints one
//! watermark for all of them.
//!
//! A worker joins at the reader's position J: from then on it is sent every event of its
//! namespace after J. It must itself have applied everything up to J, from its own collection
//! stream if need be (it drops own events after J and switches). What each worker has applied
//! is tracked from its acknowledgements; the watermark, saved once per checkpoint interval, is
//! the smallest position any worker still owes plus each worker's own position, so a restart
//! resumes the shared stream there and every worker skips what it had already applied.
//! Positions are compared by their resume tokens' `_data` (KeyString order).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bson::{doc, Document, RawDocumentBuf, Timestamp};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint::{CheckpointStore, StreamWatermark},
    config::{StreamScope, UpdateMode},
    error::{policy, Backoff, ErrorKind, RetryDirective, SyncError},
    metrics::Metrics,
    model::event::{
        raw_token, token_after, token_cluster_time, token_document, ChangeEvent, FragmentAssembler,
        OpKind,
    },
    model::transaction::{TxnGroup, TxnKey, TxnRegistry},
    source::buffer_budget::{BufferBudget, BufferedBytes},
    source::{Source, StreamSettings, StreamStart, StreamTarget},
    status::StatusRegistry,
};

/// A member whose queue stays full this long is evicted: it reads its own collection stream
/// until it has caught up, and the shared stream serves everyone else meanwhile.
pub const EVICT_AFTER: Duration = Duration::from_secs(5);
/// How often an idle mark (the reader's position) is sent to every member, so quiet
/// namespaces' applied position and lag follow the stream.
pub const IDLE_MARK_EVERY: Duration = Duration::from_secs(1);
/// At start from a watermark, the reader waits for its workers to join until none has
/// joined for this long (bounded by [`JOIN_GRACE_MAX`]): a worker that joins at the
/// watermark needs no collection stream of its own.
pub const JOIN_GRACE_QUIET: Duration = Duration::from_millis(500);
pub const JOIN_GRACE_MAX: Duration = Duration::from_secs(5);
/// How long an awaiting `getMore` may stay unanswered beyond `maxAwaitTimeMS`.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(15);
/// Databases never read by a deployment stream.
const SYSTEM_DATABASES: [&str; 3] = ["admin", "config", "local"];
/// A partition's stream reopens, narrowed again, at most this often when data events of a
/// namespace created since it opened (another partition's) reach it.
const RENARROW_EVERY: Duration = Duration::from_secs(10);
/// Above this many namespaces to leave out, a stream's `$match` excludes none (the routing
/// drops them): the command stays far below 16 MiB.
const EXCLUDED_NAMESPACES_MAX: usize = 20_000;
/// The change events that carry one document's data; every other kind (DDL) passes a
/// partition's `$match`, so renames into it and creations are seen.
const DATA_OPERATION_TYPES: [&str; 4] = ["insert", "update", "replace", "delete"];

/// What a change-stream reader hands a worker.
pub enum StreamItem {
    Event(ChangeEvent, BufferedBytes),
    /// Every event before `token` was sent: the reader is caught up to it.
    Idle {
        token: Document,
        cluster_time: Option<Timestamp>,
    },
    /// The stream stopped serving this worker (a stalled connection, an eviction, the shared
    /// reader's end): reopen a collection stream from the worker's position.
    Stalled,
    Failed(SyncError),
}

/// Which shared stream a namespace reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SharedStreamKey {
    Deployment,
    Database(String),
}

impl SharedStreamKey {
    /// The stream's name in checkpoints and logs.
    pub fn name(&self) -> String {
        match self {
            SharedStreamKey::Deployment => "deployment".to_string(),
            SharedStreamKey::Database(db) => format!("database:{db}"),
        }
    }
}

/// Settings the shared readers run with.
#[derive(Debug, Clone)]
pub struct SharedStreamSettings {
    pub scope: StreamScope,
    pub collection_streams_max: usize,
    pub sync_id: String,
    pub batch_max_events: usize,
    pub batch_max_bytes: usize,
    pub checkpoint_interval: Duration,
    pub update_mode: UpdateMode,
    pub max_await: Duration,
    /// `apply.transactions = "atomic"`: readers group each source transaction's events for
    /// its member workers, and `auto` reads a deployment stream whatever the namespace count.
    pub atomic_transactions: bool,
    /// Prefixed to the streams' names in their watermarks: each partition (`ha.partitions`)
    /// has its own readers and watermarks.
    pub watermark_prefix: String,
    /// Under `ha.partitions` > 1: the partitioner and this term's partition. The streams'
    /// `$match` leaves out the data events of namespaces that belong to other partitions.
    pub partition: Option<(crate::config::partition::Partitioner, u32)>,
    /// The namespaces in scope at start (`sync.namespaces`, `sync.exclude`); a reload replaces
    /// them ([`SharedStreams::set_scope`]).
    pub namespaces: crate::config::NamespaceFilter,
}

/// The daemon's stream plan and its shared readers.
pub struct SharedStreams {
    settings: SharedStreamSettings,
    /// How many namespaces the supervisor runs (decides `auto`).
    namespaces: AtomicUsize,
    /// The source's collections at the last listing (namespace → UUID), `None` until one is
    /// done: a watermark keeps no position for a collection the source no longer has.
    listed: Mutex<Option<HashMap<String, Option<bson::Uuid>>>>,
    routers: Mutex<HashMap<SharedStreamKey, RouterHandle>>,
    /// The namespaces in scope now: the streams' `$match` lets through only their data events.
    scope: Mutex<crate::config::NamespaceFilter>,
    source: Source,
    checkpoints: CheckpointStore,
    metrics: Metrics,
    status: Arc<StatusRegistry>,
    buffer: Arc<BufferBudget>,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    /// A shared stream saw a collection created or renamed that no worker reads yet:
    /// discovery should look now rather than at its next interval.
    pub discovery_hint: Notify,
    /// The open source transactions of every reader (`apply.transactions = "atomic"` only).
    pub transactions: Option<Arc<TxnRegistry>>,
}

#[derive(Clone)]
struct RouterHandle {
    ctrl: mpsc::Sender<Control>,
}

enum Control {
    Probe {
        ns: String,
        uuid: Option<bson::Uuid>,
        reply: oneshot::Sender<Probe>,
    },
    Join {
        ns: String,
        uuid: Option<bson::Uuid>,
        /// What the worker has applied through.
        applied: RawDocumentBuf,
        reply: oneshot::Sender<Subscription>,
    },
}

/// The reader's position, and what the last watermark says this namespace had applied.
pub struct Probe {
    pub at: Document,
    pub applied: Option<Document>,
}

/// A worker's membership in a shared stream. Dropping it leaves the stream.
pub struct Subscription {
    pub rx: mpsc::Receiver<StreamItem>,
    /// The reader's position at the join: events after it are sent to this worker.
    pub at: RawDocumentBuf,
    /// The stream's name (logs).
    pub stream: String,
    member: Arc<Member>,
}

impl Subscription {
    /// A subscription fed by `rx` from position `at` (tests of the worker's feed).
    #[cfg(test)]
    pub(crate) fn for_test(rx: mpsc::Receiver<StreamItem>, at: RawDocumentBuf) -> Subscription {
        Subscription {
            rx,
            at,
            stream: "test".into(),
            member: Arc::new(Member::default()),
        }
    }

    /// All the worker's events up to `position` are applied (or skipped) and checkpointed;
    /// `switched`: it reads the shared stream now (everything of it up to the join position
    /// is applied).
    pub fn acknowledge(&self, position: &RawDocumentBuf, switched: bool) {
        self.member.acknowledge(position, switched);
    }
}

/// The reader's side of a [`Subscription`], for tests of what a worker acknowledges.
#[cfg(test)]
pub(crate) struct ReaderView(Arc<Member>);

#[cfg(test)]
impl Subscription {
    pub(crate) fn reader_view(&self) -> ReaderView {
        ReaderView(Arc::clone(&self.member))
    }
}

#[cfg(test)]
impl ReaderView {
    /// An event is about to be sent; `before` is the reader's position before it.
    pub(crate) fn routing(&self, before: &RawDocumentBuf, token: &RawDocumentBuf) {
        self.0.routing(before, token);
    }

    /// Where a shared stream resumed with the reader at `reader` must start for this member
    /// (`None`: it owes nothing).
    pub(crate) fn owes_from(&self, reader: &RawDocumentBuf) -> Option<RawDocumentBuf> {
        let applied = self.0.applied(reader);
        applied.holds_resume.then_some(applied.position)
    }
}

/// What the reader knows of one member's progress.
#[derive(Default)]
struct Member {
    state: Mutex<MemberState>,
}

#[derive(Default)]
struct MemberState {
    /// The token of the last event sent to the member.
    last_routed: Option<RawDocumentBuf>,
    /// The furthest position the member acknowledged: everything of it up to there is applied
    /// and checkpointed. A position, not a count of events received: events received are not
    /// yet applied while the batches holding them are written (soak seed 350027).
    acked: Option<RawDocumentBuf>,
    /// While events are outstanding, or while joining: a position the member has applied
    /// everything up to.
    floor: Option<RawDocumentBuf>,
    /// Joined behind the reader: its own stream is still reading up to the join position, so
    /// the reader's position says nothing of what it applied.
    joining: bool,
}

impl MemberState {
    /// An event sent to the member is past what it acknowledged (or cannot be compared with
    /// it: then it is owed).
    fn outstanding(&self) -> bool {
        match (&self.last_routed, &self.acked) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(routed), Some(acked)) => !matches!(
                crate::model::event::token_cmp(routed, acked),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            ),
        }
    }
}

/// What a member has applied, as the watermark records it.
struct Applied {
    position: RawDocumentBuf,
    /// The shared stream must resume at or before it (the member relies on the shared stream
    /// for what follows); false while joining (its own stream covers what it has not applied).
    holds_resume: bool,
}

/// Moves `current` forward to `position` when that is later (a position never moves back).
fn later(current: &mut Option<RawDocumentBuf>, position: &RawDocumentBuf) {
    if current.as_ref().is_none_or(|c| token_after(position, c)) {
        *current = Some(position.clone());
    }
}

impl Member {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The event `token` is about to be sent; `before` is the reader's position before it.
    fn routing(&self, before: &RawDocumentBuf, token: &RawDocumentBuf) {
        let mut s = self.lock();
        // A joining member's floor is what it applied from its own stream, not the reader's.
        if !s.outstanding() && !s.joining {
            s.floor = Some(before.clone());
        }
        later(&mut s.last_routed, token);
    }

    /// A member that joined behind the reader, having applied through `position`.
    fn joining_from(position: RawDocumentBuf) -> Member {
        Member {
            state: Mutex::new(MemberState {
                floor: Some(position),
                joining: true,
                ..MemberState::default()
            }),
        }
    }

    /// Everything of the member up to `position` is applied and checkpointed; `switched`: it
    /// reads the shared stream now.
    fn acknowledge(&self, position: &RawDocumentBuf, switched: bool) {
        let mut s = self.lock();
        later(&mut s.acked, position);
        if switched {
            s.joining = false;
        }
        if s.joining || s.outstanding() {
            later(&mut s.floor, position);
        }
    }

    /// What the member has applied, given the reader's position.
    fn applied(&self, reader: &RawDocumentBuf) -> Applied {
        let s = self.lock();
        match (&s.floor, s.joining, s.outstanding()) {
            (Some(floor), true, _) => Applied {
                position: floor.clone(),
                holds_resume: false,
            },
            (Some(floor), false, true) => Applied {
                position: floor.clone(),
                holds_resume: true,
            },
            _ => Applied {
                position: reader.clone(),
                holds_resume: false,
            },
        }
    }
}

impl SharedStreams {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: SharedStreamSettings,
        source: Source,
        checkpoints: CheckpointStore,
        metrics: Metrics,
        status: Arc<StatusRegistry>,
        buffer: Arc<BufferBudget>,
    ) -> Arc<SharedStreams> {
        let transactions = settings
            .atomic_transactions
            .then(|| Arc::new(TxnRegistry::default()));
        Arc::new(SharedStreams {
            transactions,
            scope: Mutex::new(settings.namespaces.clone()),
            settings,
            namespaces: AtomicUsize::new(0),
            listed: Mutex::new(None),
            routers: Mutex::new(HashMap::new()),
            source,
            checkpoints,
            metrics,
            status,
            buffer,
            stop: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            discovery_hint: Notify::new(),
        })
    }

    /// The supervisor runs `n` namespaces (`auto` switches to a deployment stream beyond
    /// `source.collection_streams_max`).
    pub fn set_namespaces(&self, n: usize) {
        self.namespaces.store(n, Ordering::Relaxed);
    }

    /// The namespaces in scope after a reload. A stream opened with the old scope reopens,
    /// with the new one, when a namespace it does not let through joins it.
    pub fn set_scope(&self, scope: crate::config::NamespaceFilter) {
        *self.scope.lock().unwrap_or_else(|e| e.into_inner()) = scope;
    }

    /// The source's collections at a finished listing (see `listed`).
    pub fn set_listed(&self, listed: HashMap<String, Option<bson::Uuid>>) {
        *self.listed.lock().unwrap_or_else(|e| e.into_inner()) = Some(listed);
    }

    /// Whether a former member's position is still worth keeping: its collection (this
    /// incarnation) was in the last listing, or no listing has finished yet.
    fn still_listed(&self, ns: &str, uuid: Option<bson::Uuid>) -> bool {
        let listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(listed) = listed.as_ref() else {
            return true;
        };
        match (listed.get(ns), uuid) {
            (None, _) => false,
            (Some(Some(now)), Some(then)) => *now == then,
            (Some(_), _) => true,
        }
    }

    pub fn scope(&self) -> StreamScope {
        self.settings.scope
    }

    /// The settings of every shared stream: a worker whose own settings differ (a conflict
    /// policy that needs full documents or pre-images) keeps its collection stream.
    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            update_lookup: self.settings.update_mode == UpdateMode::Lookup,
            post_images: false,
            pre_images: false,
            max_await: self.settings.max_await,
            batch_size: Some(self.settings.batch_max_events.clamp(1, u32::MAX as usize) as u32),
        }
    }

    /// The shared stream `db` should read under the current plan, if any.
    pub fn stream_for(&self, db: &str) -> Option<SharedStreamKey> {
        match self.settings.scope {
            StreamScope::Collection => None,
            StreamScope::Database => Some(SharedStreamKey::Database(db.to_string())),
            StreamScope::Deployment => Some(SharedStreamKey::Deployment),
            // Atomic transactions need one stream that sees every collection of one.
            StreamScope::Auto => (self.settings.atomic_transactions
                || self.namespaces.load(Ordering::Relaxed) > self.settings.collection_streams_max)
                .then_some(SharedStreamKey::Deployment),
        }
    }

    fn handle(self: &Arc<Self>, key: &SharedStreamKey) -> Option<RouterHandle> {
        if self.stop.is_cancelled() {
            return None;
        }
        let mut routers = self.routers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = routers.get(key) {
            if !h.ctrl.is_closed() {
                return Some(h.clone());
            }
        }
        let (ctrl, rx) = mpsc::channel(1024);
        let handle = RouterHandle { ctrl };
        routers.insert(key.clone(), handle.clone());
        let router = Router::new(Arc::clone(self), key.clone());
        self.tasks.spawn(router.run(rx));
        Some(handle)
    }

    /// The reader's position and this namespace's applied position from the last watermark.
    pub async fn probe(
        self: &Arc<Self>,
        key: &SharedStreamKey,
        ns: &str,
        uuid: Option<bson::Uuid>,
    ) -> Option<Probe> {
        let handle = self.handle(key)?;
        let (reply, rx) = oneshot::channel();
        handle
            .ctrl
            .send(Control::Probe {
                ns: ns.to_string(),
                uuid,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Joins the shared stream `key` (see the module documentation), having applied through
    /// `applied`.
    pub async fn join(
        self: &Arc<Self>,
        key: &SharedStreamKey,
        ns: &str,
        uuid: Option<bson::Uuid>,
        applied: RawDocumentBuf,
    ) -> Option<Subscription> {
        let handle = self.handle(key)?;
        let (reply, rx) = oneshot::channel();
        handle
            .ctrl
            .send(Control::Join {
                ns: ns.to_string(),
                uuid,
                applied,
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Stops the readers after the workers have stopped: each saves its watermark first.
    pub async fn shutdown(&self, bound: Duration) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(bound, self.tasks.wait()).await;
    }
}

struct Slot {
    uuid: Option<bson::Uuid>,
    tx: mpsc::Sender<StreamItem>,
    member: Arc<Member>,
}

/// One shared reader: its stream, its members and its watermark.
struct Router {
    streams: Arc<SharedStreams>,
    key: SharedStreamKey,
    name: String,
    members: HashMap<String, Slot>,
    /// Applied positions of namespaces that are not members now (from the last watermark, or
    /// left since): kept in the watermark until they join again.
    known: HashMap<String, (Option<bson::Uuid>, RawDocumentBuf)>,
    position: Option<RawDocumentBuf>,
    saved: Option<RawDocumentBuf>,
    last_save: Instant,
    last_idle_mark: Instant,
    share: Arc<Semaphore>,
    share_bytes: usize,
    /// The source transaction whose events are being routed (atomic transactions only).
    open_txn: Option<Arc<TxnGroup>>,
    counters: Arc<crate::status::SharedStreamCounters>,
    /// The other partitions' namespaces the stream's `$match` leaves out since it was opened.
    excluded: std::collections::HashSet<String>,
    opened_at: Instant,
    /// A data event of another partition's listed namespace reached the stream: reopen it
    /// narrowed again (at most every [`RENARROW_EVERY`]).
    renarrow: bool,
    /// The scope the open stream's `$match` was built from.
    covers: Option<crate::config::NamespaceFilter>,
    /// A namespace outside `covers` joined (a reload widened the scope): reopen the stream
    /// at its position, with the new scope, before routing anything else.
    widen: bool,
}

enum ReadEnd {
    /// Reopen from the position (a transient error, a stall, an invalidate).
    Reopen { backoff: bool },
    /// Stop reading: shutdown, or an error every member was told about.
    Exit,
}

impl Router {
    fn new(streams: Arc<SharedStreams>, key: SharedStreamKey) -> Router {
        let share_bytes = streams
            .buffer
            .reader_share(streams.settings.batch_max_bytes);
        let name = key.name();
        let counters = streams
            .status
            .shared_stream(&format!("{}{name}", streams.settings.watermark_prefix));
        Router {
            name,
            key,
            members: HashMap::new(),
            known: HashMap::new(),
            position: None,
            saved: None,
            last_save: Instant::now(),
            last_idle_mark: Instant::now(),
            share: Arc::new(Semaphore::new(share_bytes)),
            share_bytes,
            open_txn: None,
            counters,
            excluded: Default::default(),
            opened_at: Instant::now(),
            renarrow: false,
            covers: None,
            widen: false,
            streams,
        }
    }

    /// The name of this stream's watermark document.
    fn watermark_name(&self) -> String {
        format!("{}{}", self.streams.settings.watermark_prefix, self.name)
    }

    fn target(&self) -> StreamTarget<'_> {
        match &self.key {
            SharedStreamKey::Deployment => StreamTarget::Deployment,
            SharedStreamKey::Database(db) => StreamTarget::Database(db),
        }
    }

    /// The stream's `$match`: no system database, the data events of the namespaces in scope
    /// only (DDL passes, for renames into the scope and new collections), and under
    /// `ha.partitions` none of the data events of the listed namespaces that belong to other
    /// partitions (remembered in `excluded`).
    fn filter(&mut self) -> Option<Document> {
        let (db, system) = match &self.key {
            SharedStreamKey::Deployment => (
                None,
                Some(doc! {"ns.db": {"$nin": SYSTEM_DATABASES.to_vec()}}),
            ),
            SharedStreamKey::Database(db) => (Some(db.as_str()), None),
        };
        let scope = self
            .streams
            .scope
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.excluded = match &self.streams.settings.partition {
            Some((partitioner, mine)) => {
                let listed = self
                    .streams
                    .listed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                // Namespaces out of scope are left out by the scope's condition already.
                let in_scope = |db: &str, coll: &str| scope.patterns_match(db, coll);
                listed
                    .as_ref()
                    .map(|l| other_partitions(l.keys(), partitioner, *mine, db, in_scope))
                    .unwrap_or_default()
            }
            None => Default::default(),
        };
        if self.excluded.len() > EXCLUDED_NAMESPACES_MAX {
            tracing::info!(stream = %self.name, namespaces = self.excluded.len(), max = EXCLUDED_NAMESPACES_MAX, "too many other partitions' namespaces to leave out in the stream's $match; they are dropped as they are read");
            self.excluded.clear();
        }
        self.counters
            .excluded_namespaces
            .store(self.excluded.len() as u64, Ordering::Relaxed);
        self.renarrow = false;
        self.widen = false;
        self.opened_at = Instant::now();
        let clause = scope.change_stream_scope();
        self.covers = Some(scope);
        narrowed(system, Some(clause), &self.excluded)
    }

    async fn run(self, mut ctrl: mpsc::Receiver<Control>) {
        let status = Arc::clone(&self.streams.status);
        let name = self.watermark_name();
        self.read_until_stopped(&mut ctrl).await;
        // Before `ctrl` closes: no router of the same name can have started yet.
        status.forget_shared_stream(&name);
    }

    async fn read_until_stopped(mut self, ctrl: &mut mpsc::Receiver<Control>) {
        let stop = self.streams.stop.clone();
        let sync_id = self.streams.settings.sync_id.clone();
        match self
            .streams
            .checkpoints
            .load_stream(&sync_id, &self.watermark_name())
            .await
        {
            Ok(Some(w)) => {
                self.position = raw_token(&w.resume_token);
                self.saved = self.position.clone();
                for (ns, uuid, token) in w.positions {
                    if let Some(t) = raw_token(&token) {
                        self.known.insert(ns, (uuid, t));
                    }
                }
                tracing::info!(stream = %self.name, namespaces = self.known.len(), "shared change stream resumes from its watermark");
                // Let the namespaces of the watermark join at it before reading on.
                let deadline = tokio::time::Instant::now() + JOIN_GRACE_MAX;
                loop {
                    let quiet = tokio::time::Instant::now() + JOIN_GRACE_QUIET;
                    let msg = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        m = ctrl.recv() => m,
                        _ = tokio::time::sleep_until(quiet.min(deadline)) => break,
                    };
                    match msg {
                        Some(m) => self.control(m),
                        None => return,
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(stream = %self.name, error = %e, "could not load the shared stream's watermark; it starts at the current time and its namespaces read their own streams until they catch up");
            }
        }
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        while let ReadEnd::Reopen { backoff: wait } = self.read(ctrl, &stop).await {
            if wait && !backoff.sleep(&stop).await {
                break;
            }
            if !wait {
                backoff.reset();
            }
        }
        if let Some(group) = self.open_txn.take() {
            group.decline("the shared change stream stopped");
        }
        if stop.is_cancelled() {
            // The workers have stopped and acknowledged what they applied: a restart resumes here.
            self.save_watermark().await;
        }
    }

    /// Before routing `event`: the transaction being routed ends at an event that is not part
    /// of it, and a transactional event opens its group.
    fn track_transaction(&mut self, event: &ChangeEvent) -> bool {
        let Some(registry) = self.streams.transactions.clone() else {
            return false;
        };
        let key = TxnKey::of(event);
        if let (Some(open), Some(k)) = (&self.open_txn, &key) {
            if &open.key == k {
                return true;
            }
        }
        self.close_transaction();
        match key {
            Some(k) => {
                self.open_txn = Some(registry.open(&self.name, k));
                true
            }
            None => false,
        }
    }

    /// The stream showed what follows the open transaction: its members are known.
    fn close_transaction(&mut self) {
        if let Some(group) = self.open_txn.take() {
            group.close();
        }
    }

    fn control(&mut self, msg: Control) {
        match msg {
            Control::Probe { ns, uuid, reply } => {
                let Some(at) = self.position.as_ref().map(|t| token_document(t)) else {
                    return;
                };
                let applied = self
                    .known
                    .get(&ns)
                    .filter(|(u, _)| *u == uuid)
                    .map(|(_, t)| token_document(t));
                let _ = reply.send(Probe { at, applied });
            }
            Control::Join {
                ns,
                uuid,
                applied,
                reply,
            } => {
                let Some(at) = self.position.clone() else {
                    return;
                };
                let capacity = (self.streams.settings.batch_max_events * 2).max(2);
                let (tx, rx) = mpsc::channel(capacity);
                let member = Arc::new(if token_after(&at, &applied) {
                    Member::joining_from(applied)
                } else {
                    Member::default()
                });
                let subscription = Subscription {
                    rx,
                    at,
                    stream: self.name.clone(),
                    member: Arc::clone(&member),
                };
                if reply.send(subscription).is_ok() {
                    let (db, coll) = ns.split_once('.').unwrap_or((ns.as_str(), ""));
                    if self
                        .covers
                        .as_ref()
                        .is_some_and(|c| !c.patterns_match(db, coll))
                    {
                        self.widen = true;
                    }
                    self.known.remove(&ns);
                    tracing::debug!(stream = %self.name, namespace = %ns, "namespace joined the shared change stream");
                    self.members.insert(ns, Slot { uuid, tx, member });
                    self.counters
                        .members
                        .store(self.members.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Opens the stream at the position and routes it until it must be reopened or stopped.
    async fn read(
        &mut self,
        ctrl: &mut mpsc::Receiver<Control>,
        stop: &CancellationToken,
    ) -> ReadEnd {
        let settings = self.streams.stream_settings();
        let watchdog = settings.max_await + WATCHDOG_MARGIN;
        let token = self.position.as_ref().map(|t| token_document(t));
        let start = match &token {
            Some(t) => StreamStart::After(t),
            None => StreamStart::Now,
        };
        let source = self.streams.source.clone();
        let filter = self.filter();
        let opened = tokio::select! {
            biased;
            _ = stop.cancelled() => return ReadEnd::Exit,
            r = tokio::time::timeout(watchdog, source.open_scoped_stream(self.target(), start, &settings, filter)) => r,
        };
        let mut stream = match opened {
            Err(_) => {
                tracing::warn!(stream = %self.name, "opening the shared change stream stalled; retrying");
                return ReadEnd::Reopen { backoff: true };
            }
            Ok(Err(e)) => return self.failed_sync(e).await,
            Ok(Ok(s)) => s,
        };
        if self.position.is_none() {
            match stream
                .resume_token()
                .map(|t| crate::source::serialize_token(&t))
            {
                Some(Ok(t)) => self.position = raw_token(&t),
                _ => {
                    tracing::warn!(stream = %self.name, "the shared change stream reported no position; retrying");
                    return ReadEnd::Reopen { backoff: true };
                }
            }
        }
        let mut assembler = FragmentAssembler::default();
        loop {
            while let Ok(m) = ctrl.try_recv() {
                self.control(m);
            }
            if self.widen {
                // Nothing was routed past the member's join position: reading on from it
                // with the wider scope skips none of its events.
                tracing::info!(stream = %self.name, "a namespace outside the stream's scope joined it (the scope was reloaded); reopening the stream with the new scope");
                return ReadEnd::Reopen { backoff: false };
            }
            if self.last_save.elapsed() >= self.streams.settings.checkpoint_interval {
                self.save_watermark().await;
            }
            if self.last_idle_mark.elapsed() >= IDLE_MARK_EVERY {
                self.send_idle_marks();
            }
            // Joins wait for the next reply (at most `maxAwaitTimeMS`): a getMore is never
            // interrupted for them.
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return ReadEnd::Exit,
                r = tokio::time::timeout(watchdog, stream.next_if_any()) => r,
            };
            let Ok(next) = next else {
                tracing::warn!(stream = %self.name, watchdog_s = watchdog.as_secs(), "shared change stream stalled: the source did not answer within the watchdog bound; reopening it");
                return ReadEnd::Reopen { backoff: false };
            };
            match next {
                Err(e) => {
                    let e = SyncError::mongo(
                        ErrorKind::SourceRead,
                        format!("reading the shared change stream of {}", self.target()),
                        e,
                    );
                    return self.failed_sync(e).await;
                }
                Ok(Some(raw)) => {
                    let event = match assembler.push(raw) {
                        Ok(Some(ev)) => ev,
                        Ok(None) => continue,
                        Err(e) => return self.failed_sync(e).await,
                    };
                    if event.kind == OpKind::Invalidate {
                        // A database stream ends at dropDatabase: read on after it.
                        self.position = Some(event.token.clone());
                        return ReadEnd::Reopen { backoff: false };
                    }
                    self.counters.events_read.fetch_add(1, Ordering::Relaxed);
                    if !self.route(event, stop).await {
                        return ReadEnd::Exit;
                    }
                    if self.renarrow
                        && self.open_txn.is_none()
                        && self.opened_at.elapsed() >= RENARROW_EVERY
                    {
                        tracing::info!(stream = %self.name, "another partition's new namespaces reach this stream; reopening it with them left out");
                        return ReadEnd::Reopen { backoff: false };
                    }
                }
                Ok(None) => {
                    // An empty reply: a transaction commits all its entries at once, so the
                    // one being routed is complete.
                    self.close_transaction();
                    if assembler.is_empty() {
                        if let Some(Ok(t)) = stream
                            .resume_token()
                            .map(|t| crate::source::serialize_token(&t))
                        {
                            if let Some(t) = raw_token(&t) {
                                if self.position.as_ref().is_none_or(|p| token_after(&t, p)) {
                                    self.position = Some(t);
                                }
                            }
                        }
                        if let Some(ts) = self.position.as_ref().and_then(|p| token_cluster_time(p))
                        {
                            self.streams.status.set_source_cluster_time(ts);
                        }
                        self.send_idle_marks();
                    }
                    if !stream.is_alive() {
                        return ReadEnd::Reopen { backoff: false };
                    }
                }
            }
        }
    }

    /// Sends one event to its namespace's member (if any). False on shutdown.
    async fn route(&mut self, event: ChangeEvent, stop: &CancellationToken) -> bool {
        let in_transaction = self.track_transaction(&event);
        let token = event.token.clone();
        // The position moves past the event only once it is delivered (or no member wants
        // it): a watermark saved at shutdown never claims an undelivered event as applied.
        let delivered = self.deliver(event, in_transaction, stop).await;
        if delivered {
            self.position = Some(token);
        }
        delivered
    }

    async fn deliver(
        &mut self,
        event: ChangeEvent,
        in_transaction: bool,
        stop: &CancellationToken,
    ) -> bool {
        let before = self.position.clone();
        let Some((db, coll)) = event.ns() else {
            return true;
        };
        let Some(coll) = coll else {
            return true;
        };
        let ns = format!("{db}.{coll}");
        let Some(slot) = self.members.get(&ns) else {
            if matches!(event.kind, OpKind::Create | OpKind::Rename) {
                self.streams.discovery_hint.notify_one();
            }
            if event.kind.is_data() {
                self.count_foreign(&db, &coll, &ns);
            }
            return true;
        };
        if let (Some(event_uuid), Some(uuid)) = (event_uuid(&event), slot.uuid) {
            if event_uuid != uuid {
                // Another incarnation of the name: its own worker reads it, once a listing
                // has started it.
                if event.kind == OpKind::Create {
                    self.streams.discovery_hint.notify_one();
                }
                return true;
            }
        }
        let ends_namespace = matches!(event.kind, OpKind::Drop | OpKind::Rename);
        if event.kind == OpKind::Rename {
            self.streams.discovery_hint.notify_one();
        }
        let mut items = Vec::with_capacity(2);
        let invalidate = ends_namespace.then(|| synthetic_invalidate(&event));
        items.push(event);
        if let Some(Some(inv)) = invalidate {
            items.push(inv);
        }
        let before = before.unwrap_or_else(|| items[0].token.clone());
        for ev in items {
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                p = self.streams.buffer.acquire(&self.share, self.share_bytes, ev.size()) => match p {
                    Ok(p) => p,
                    Err(_) => return false,
                },
            };
            let Some(slot) = self.members.get(&ns) else {
                return true;
            };
            slot.member.routing(&before, &ev.token);
            if in_transaction && ev.kind != OpKind::Invalidate {
                if let Some(group) = &self.open_txn {
                    group.routed(&ns);
                }
            }
            let delivered = match slot.tx.try_send(StreamItem::Event(ev, permit)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(item)) => {
                    let tx = slot.tx.clone();
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return false,
                        r = tokio::time::timeout(EVICT_AFTER, tx.send(item)) => match r {
                            Ok(Ok(())) => true,
                            Ok(Err(_)) => false,
                            Err(_) => {
                                tracing::warn!(stream = %self.name, namespace = %ns, evict_after_s = EVICT_AFTER.as_secs(), "namespace left the shared change stream: its queue stayed full; it reads its own stream until it catches up");
                                false
                            }
                        },
                    }
                }
            };
            if !delivered {
                self.leave(&ns);
                return true;
            }
            self.counters.events_routed.fetch_add(1, Ordering::Relaxed);
        }
        if ends_namespace {
            // Its worker finishes at the invalidate; nothing of this incarnation follows.
            self.members.remove(&ns);
        }
        true
    }

    /// A data event no member reads: one of another partition's namespaces that the `$match`
    /// did not leave out is counted, and the stream is narrowed again once a listing has
    /// seen the namespace.
    fn count_foreign(&mut self, db: &str, coll: &str, ns: &str) {
        let Some((partitioner, mine)) = &self.streams.settings.partition else {
            return;
        };
        if partitioner.partition_of(db, coll) == *mine {
            return;
        }
        self.counters.foreign_events.fetch_add(1, Ordering::Relaxed);
        if !self.renarrow && !self.excluded.contains(ns) {
            let listed = self
                .streams
                .listed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.renarrow = listed.as_ref().is_some_and(|l| l.contains_key(ns))
                && self.excluded.len() < EXCLUDED_NAMESPACES_MAX;
        }
    }

    /// A member is gone (its worker stopped, or it was evicted): keep what it had applied.
    fn leave(&mut self, ns: &str) {
        if let Some(registry) = &self.streams.transactions {
            registry.member_left(&self.name, ns);
        }
        if let Some(slot) = self.members.remove(ns) {
            if let Some(reader) = &self.position {
                let applied = slot.member.applied(reader);
                self.known
                    .insert(ns.to_string(), (slot.uuid, applied.position));
            }
        }
    }

    fn send_idle_marks(&mut self) {
        self.last_idle_mark = Instant::now();
        self.counters
            .members
            .store(self.members.len() as u64, Ordering::Relaxed);
        let Some(position) = self.position.clone() else {
            return;
        };
        let token = token_document(&position);
        let cluster_time = token_cluster_time(&position);
        let mut closed = Vec::new();
        for (ns, slot) in &self.members {
            let item = StreamItem::Idle {
                token: token.clone(),
                cluster_time,
            };
            if let Err(mpsc::error::TrySendError::Closed(_)) = slot.tx.try_send(item) {
                closed.push(ns.clone());
            }
        }
        for ns in closed {
            self.leave(&ns);
        }
    }

    /// The watermark: the smallest position a member still owes (or the reader's position),
    /// and every member's and former member's applied position.
    fn watermark(&self) -> Option<StreamWatermark> {
        let position = self.position.as_ref()?;
        let mut resume = position.clone();
        let mut positions = Vec::with_capacity(self.members.len() + self.known.len());
        for (ns, slot) in &self.members {
            let applied = slot.member.applied(position);
            if applied.holds_resume && token_after(&resume, &applied.position) {
                resume = applied.position.clone();
            }
            positions.push((ns.clone(), slot.uuid, token_document(&applied.position)));
        }
        for (ns, (uuid, token)) in &self.known {
            positions.push((ns.clone(), *uuid, token_document(token)));
        }
        // Forward only (DESIGN §2.5).
        if let Some(saved) = &self.saved {
            if token_after(saved, &resume) {
                resume = saved.clone();
            }
        }
        Some(StreamWatermark {
            resume_token: token_document(&resume),
            positions,
        })
    }

    async fn save_watermark(&mut self) {
        self.last_save = Instant::now();
        // Dropped or renamed-away collections leave the watermark, which would otherwise grow
        // with every collection that ever passed through the stream.
        let streams = Arc::clone(&self.streams);
        self.known
            .retain(|ns, (uuid, _)| streams.still_listed(ns, *uuid));
        let Some(w) = self.watermark() else {
            return;
        };
        let sync_id = self.streams.settings.sync_id.clone();
        match self
            .streams
            .checkpoints
            .save_stream(&sync_id, &self.watermark_name(), &w)
            .await
        {
            Ok(()) => {
                self.saved = raw_token(&w.resume_token);
                let now = std::time::SystemTime::now();
                for (ns, _, token) in &w.positions {
                    if !self.members.contains_key(ns) {
                        continue;
                    }
                    let applied = raw_token(token).and_then(|t| token_cluster_time(&t));
                    self.streams.status.record_checkpoint(
                        &self.streams.metrics,
                        ns,
                        Some(now),
                        applied,
                    );
                }
            }
            Err(e) => {
                tracing::warn!(stream = %self.name, error = %e, "could not save the shared stream's watermark; retrying at the next interval");
            }
        }
    }

    /// Transient errors reopen the stream; anything else ends it for every member, who
    /// handle the error as their own (history loss: re-copy, per `sync.on_history_lost`).
    async fn failed_sync(&mut self, e: SyncError) -> ReadEnd {
        match policy(&e) {
            RetryDirective::Backoff => {
                tracing::warn!(stream = %self.name, error = %e, "shared change stream interrupted; reopening it from its position");
                ReadEnd::Reopen { backoff: true }
            }
            directive => {
                tracing::error!(stream = %self.name, error = %e, "shared change stream failed; its namespaces handle the error");
                if matches!(directive, RetryDirective::Resync) {
                    let sync_id = self.streams.settings.sync_id.clone();
                    if let Err(err) = self
                        .streams
                        .checkpoints
                        .delete_stream(&sync_id, &self.watermark_name())
                        .await
                    {
                        tracing::warn!(stream = %self.name, error = %err, "could not delete the lost watermark");
                    }
                }
                let context = format!("the shared change stream {} failed: {e}", self.name);
                for (_, slot) in self.members.drain() {
                    let _ = slot
                        .tx
                        .try_send(StreamItem::Failed(SyncError::new(e.kind, context.clone())));
                }
                ReadEnd::Exit
            }
        }
    }
}

/// The `collectionUUID` of an event, when the server reports it.
fn event_uuid(event: &ChangeEvent) -> Option<bson::Uuid> {
    match event.raw().get("collectionUUID") {
        Ok(Some(bson::RawBsonRef::Binary(b))) => b.to_binary().to_uuid().ok(),
        _ => None,
    }
}

/// The `invalidate` a collection stream would have returned after its drop or rename.
fn synthetic_invalidate(after: &ChangeEvent) -> Option<ChangeEvent> {
    let token = Document::try_from(after.token.as_ref()).ok()?;
    let raw = RawDocumentBuf::try_from(&doc! {
        "_id": token,
        "operationType": "invalidate",
        "clusterTime": after.cluster_time,
    })
    .ok()?;
    ChangeEvent::parse(raw).ok()
}

/// The listed namespaces (`db.coll`, of database `db` only when given) in scope that belong
/// to partitions other than `mine`.
fn other_partitions<'a>(
    listed: impl Iterator<Item = &'a String>,
    partitioner: &crate::config::partition::Partitioner,
    mine: u32,
    db: Option<&str>,
    in_scope: impl Fn(&str, &str) -> bool,
) -> std::collections::HashSet<String> {
    listed
        .filter(|ns| {
            let (ns_db, coll) = ns.split_once('.').unwrap_or((ns.as_str(), ""));
            db.is_none_or(|db| db == ns_db)
                && !SYSTEM_DATABASES.contains(&ns_db)
                && in_scope(ns_db, coll)
                && partitioner.partition_of(ns_db, coll) != mine
        })
        .cloned()
        .collect()
}

/// `base` and a clause on data events only: they must meet `scope` and not be of the
/// `excluded` namespaces (listed in a stable order, so the same plan sends the same command).
fn narrowed(
    base: Option<Document>,
    scope: Option<Document>,
    excluded: &std::collections::HashSet<String>,
) -> Option<Document> {
    let mut conditions: Vec<Document> = scope.into_iter().collect();
    if !excluded.is_empty() {
        let mut names: Vec<&String> = excluded.iter().collect();
        names.sort();
        let namespaces: Vec<Document> = names
            .into_iter()
            .map(|ns| {
                let (db, coll) = ns.split_once('.').unwrap_or((ns.as_str(), ""));
                doc! {"db": db, "coll": coll}
            })
            .collect();
        conditions.push(doc! {"ns": {"$nin": namespaces}});
    }
    let data = match conditions.len() {
        0 => return base,
        1 => conditions.pop().expect("one"),
        _ => doc! {"$and": conditions},
    };
    let clause = doc! {"$or": [
        {"operationType": {"$nin": DATA_OPERATION_TYPES.to_vec()}},
        data,
    ]};
    Some(match base {
        Some(base) => doc! {"$and": [base, clause]},
        None => clause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_leaves_out_exactly_the_other_partitions_listed_namespaces() {
        let partitioner = crate::config::partition::Partitioner::new(3, Vec::new());
        let listed: Vec<String> = (0..30)
            .map(|i| format!("app.c{i}"))
            .chain((0..10).map(|i| format!("logs.l{i}")))
            .chain([
                "admin.system.users".to_string(),
                "local.oplog.rs".to_string(),
            ])
            .collect();
        for mine in 0..3 {
            let out = other_partitions(listed.iter(), &partitioner, mine, None, |_, _| true);
            for ns in &listed {
                let system = ns.starts_with("admin.") || ns.starts_with("local.");
                let elsewhere = partitioner.partition_of_ns(ns) != mine;
                assert_eq!(out.contains(ns), elsewhere && !system, "{ns} in {mine}");
            }
            let in_logs =
                other_partitions(listed.iter(), &partitioner, mine, Some("logs"), |_, _| true);
            assert!(in_logs.iter().all(|ns| ns.starts_with("logs.")));
            assert!(!in_logs.is_empty());
            // Out of scope: the scope's own condition leaves them out.
            let app_only =
                other_partitions(listed.iter(), &partitioner, mine, None, |db, _| db == "app");
            assert!(app_only.iter().all(|ns| ns.starts_with("app.")));
            assert_eq!(
                app_only.len(),
                out.iter().filter(|ns| ns.starts_with("app.")).count()
            );
        }
    }

    #[test]
    fn a_narrowed_match_passes_ddl_and_leaves_out_only_the_excluded_data_events() {
        let base = doc! {"ns.db": {"$nin": ["admin"]}};
        assert_eq!(
            narrowed(Some(base.clone()), None, &Default::default()),
            Some(base.clone())
        );
        assert_eq!(narrowed(None, None, &Default::default()), None);
        let excluded: std::collections::HashSet<String> =
            ["b.y".to_string(), "a.x".to_string()].into();
        let filter = narrowed(Some(base.clone()), None, &excluded).unwrap();
        assert_eq!(
            filter,
            doc! {"$and": [base.clone(), {"$or": [
                {"operationType": {"$nin": ["insert", "update", "replace", "delete"]}},
                {"ns": {"$nin": [{"db": "a", "coll": "x"}, {"db": "b", "coll": "y"}]}},
            ]}]}
        );
        let scope = doc! {"ns.db": "a"};
        let filter = narrowed(None, Some(scope.clone()), &excluded).unwrap();
        assert_eq!(
            filter,
            doc! {"$or": [
                {"operationType": {"$nin": ["insert", "update", "replace", "delete"]}},
                {"$and": [scope, {"ns": {"$nin": [{"db": "a", "coll": "x"}, {"db": "b", "coll": "y"}]}}]},
            ]}
        );
    }

    fn token(n: u64) -> RawDocumentBuf {
        raw_token(&doc! {"_data": format!("82{n:016X}")}).unwrap()
    }

    fn owes_from(m: &Member) -> Option<RawDocumentBuf> {
        let a = m.applied(&token(1000));
        a.holds_resume.then_some(a.position)
    }

    #[test]
    fn a_member_with_nothing_outstanding_owes_nothing() {
        let m = Member::default();
        assert!(owes_from(&m).is_none());
        m.routing(&token(5), &token(6));
        m.acknowledge(&token(6), true);
        assert_eq!(m.applied(&token(9)).position, token(9));
        assert!(!m.applied(&token(9)).holds_resume);
    }

    #[test]
    fn a_member_owes_from_the_position_before_its_first_unacknowledged_event() {
        let m = Member::default();
        m.routing(&token(5), &token(6)); // event 6 sent
        m.routing(&token(6), &token(7)); // event 7 sent
        m.routing(&token(7), &token(8)); // event 8 sent
        assert_eq!(owes_from(&m), Some(token(5)));
        // Events 6 and 7 applied and checkpointed: it owes from 7 on.
        m.acknowledge(&token(7), true);
        assert_eq!(owes_from(&m), Some(token(7)));
        // A stale acknowledgement never moves the floor back.
        m.acknowledge(&token(6), true);
        assert_eq!(owes_from(&m), Some(token(7)));
        m.acknowledge(&token(8), true);
        assert!(owes_from(&m).is_none());
        // The next event after an idle period: owed from the reader's position before it.
        m.routing(&token(20), &token(21));
        assert_eq!(owes_from(&m), Some(token(20)));
    }

    #[test]
    fn an_event_that_cannot_be_compared_with_the_acknowledged_position_is_owed() {
        let m = Member::default();
        let odd = raw_token(&doc! {"no_data": 1}).unwrap();
        m.routing(&token(5), &odd);
        m.acknowledge(&token(9), true);
        assert_eq!(owes_from(&m), Some(token(9)));
    }

    #[test]
    fn a_joining_member_is_recorded_at_what_it_applied_until_it_switches() {
        // Joined at 10 having applied through 4: its own stream reads 5..10.
        let m = Member::joining_from(token(4));
        assert_eq!(m.applied(&token(12)).position, token(4));
        assert!(
            !m.applied(&token(12)).holds_resume,
            "its own stream covers 5..10"
        );
        m.routing(&token(10), &token(11)); // event 11 queued for it
        m.acknowledge(&token(7), false); // own events through 7 applied
        assert_eq!(m.applied(&token(12)).position, token(7));
        // Switched; events through 10 (own) and 11 (shared) applied.
        m.acknowledge(&token(11), true);
        assert_eq!(m.applied(&token(12)).position, token(12));
    }

    #[test]
    fn a_synthetic_invalidate_follows_a_drop_with_its_token_and_time() {
        let drop = ChangeEvent::parse(
            raw_token(&doc! {
                "_id": {"_data": "8200000001"},
                "operationType": "drop",
                "clusterTime": bson::Timestamp { time: 7, increment: 1 },
                "ns": {"db": "d", "coll": "c"},
            })
            .unwrap(),
        )
        .unwrap();
        let inv = synthetic_invalidate(&drop).unwrap();
        assert_eq!(inv.kind, OpKind::Invalidate);
        assert_eq!(inv.token, drop.token);
        assert_eq!(inv.cluster_time, drop.cluster_time);
    }
}

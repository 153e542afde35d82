//! Everything the daemon reads from the source: topology and identity, namespaces, change
//! streams, `_id`-range scans for the copy (and validation), and single-document lookups.

pub mod buffer_budget;
pub mod feed;
pub mod shared_stream;

use std::time::Duration;

use bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use futures::TryStreamExt;
use mongodb::{
    change_stream::{event::ResumeToken, ChangeStream},
    options::{
        ChangeStreamOptions, FullDocumentBeforeChangeType, FullDocumentType, Hint, ReadConcern,
        SelectionCriteria,
    },
    Client, Collection,
};

use crate::{
    error::{ErrorKind, SyncError},
    metadata::SourceIdentity,
};

/// A source namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace {
    pub db: String,
    pub coll: String,
}

impl Namespace {
    pub fn new(db: impl Into<String>, coll: impl Into<String>) -> Namespace {
        Namespace {
            db: db.into(),
            coll: coll.into(),
        }
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.db, self.coll)
    }
}

/// A collection found on the source.
#[derive(Debug, Clone)]
pub struct SourceCollection {
    pub ns: Namespace,
    pub uuid: Option<bson::Uuid>,
    /// `listCollections` options (validator, collation, capped, ...).
    pub options: Document,
}

/// Where a change stream starts.
#[derive(Debug, Clone, Copy)]
pub enum StreamStart<'a> {
    /// Now (the first reply's `postBatchResumeToken` is the start point).
    Now,
    /// `startAfter` a stored token.
    After(&'a Document),
    /// `startAtOperationTime` (only for `initial_copy = "skip"`).
    AtOperationTime(Timestamp),
}

/// What a change stream watches.
#[derive(Debug, Clone, Copy)]
pub enum StreamTarget<'a> {
    Collection(&'a Namespace),
    Database(&'a str),
    Deployment,
}

impl std::fmt::Display for StreamTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamTarget::Collection(ns) => write!(f, "{ns}"),
            StreamTarget::Database(db) => write!(f, "database {db}"),
            StreamTarget::Deployment => f.write_str("the deployment"),
        }
    }
}

/// What the stream should carry.
#[derive(Debug, Clone, Default)]
pub struct StreamSettings {
    /// `updateLookup` instead of deltas.
    pub update_lookup: bool,
    /// `fullDocument: whenAvailable` (post-images) instead of deltas.
    pub post_images: bool,
    pub pre_images: bool,
    pub max_await: Duration,
    pub batch_size: Option<u32>,
}

/// Source reads.
#[derive(Clone)]
pub struct Source {
    client: Client,
    /// `source.socket_timeout_ms`: bounds every read except awaiting change-stream getMores.
    op_timeout: Option<Duration>,
    /// Whether the server supports `$changeStreamSplitLargeEvent` (set by [`Source::detect_features`]).
    split_large_events: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The source is 6.1+: update events carry `disambiguatedPaths` when a path is ambiguous
    /// (6.0 never does). False until `detect_features` says otherwise.
    disambiguates_paths: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn read_error(context: impl Into<String>, e: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::SourceRead, context, e)
}

impl Source {
    pub fn new(client: Client, op_timeout: Option<Duration>) -> Source {
        Source {
            client,
            op_timeout,
            split_large_events: Default::default(),
            disambiguates_paths: Default::default(),
        }
    }

    /// Reads the server version: `$changeStreamSplitLargeEvent` exists from 6.0.9 and 7.0.
    pub async fn detect_features(&self) -> Result<String, SyncError> {
        let info = self
            .client
            .database("admin")
            .run_command(doc! {"buildInfo": 1})
            .await
            .map_err(|e| {
                SyncError::mongo(ErrorKind::SourceConnection, "reading the source version", e)
            })?;
        let version = info.get_str("version").unwrap_or("0.0.0").to_string();
        let parts: Vec<u32> = version
            .split(['.', '-'])
            .take(3)
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        let (major, minor, patch) = (
            parts[0],
            *parts.get(1).unwrap_or(&0),
            *parts.get(2).unwrap_or(&0),
        );
        let supported = major >= 7 || (major == 6 && (minor > 0 || patch >= 9));
        self.split_large_events
            .store(supported, std::sync::atomic::Ordering::Relaxed);
        self.disambiguates_paths.store(
            major >= 7 || (major == 6 && minor >= 1),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(version)
    }

    /// Whether update events of this source carry `disambiguatedPaths` (6.1+).
    pub fn disambiguates_paths(&self) -> bool {
        self.disambiguates_paths
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs a read under the configured operation timeout (a hung connection becomes a
    /// transient error instead of a stuck worker).
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, SyncError>>,
    ) -> Result<T, SyncError> {
        match self.op_timeout {
            None => fut.await,
            Some(limit) => tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
                Err(SyncError::new(
                    ErrorKind::SourceConnection,
                    format!(
                        "{what} timed out after {} ms (source.socket_timeout_ms)",
                        limit.as_millis()
                    ),
                ))
            }),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `source.socket_timeout_ms`, for readers outside this module (validation scans).
    pub fn op_timeout(&self) -> Option<Duration> {
        self.op_timeout
    }

    fn raw_collection(&self, ns: &Namespace) -> Collection<RawDocumentBuf> {
        self.client.database(&ns.db).collection_with_options(
            &ns.coll,
            mongodb::options::CollectionOptions::builder()
                .read_concern(ReadConcern::majority())
                .selection_criteria(SelectionCriteria::ReadPreference(
                    mongodb::options::ReadPreference::Primary,
                ))
                .build(),
        )
    }

    /// The source's cluster time (`operationTime` of a `ping`).
    pub async fn cluster_time(&self) -> Result<Timestamp, SyncError> {
        let reply = self
            .client
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .map_err(|e| SyncError::mongo(ErrorKind::SourceConnection, "pinging the source", e))?;
        match reply.get("operationTime") {
            Some(Bson::Timestamp(ts)) => Ok(*ts),
            _ => match reply
                .get_document("$clusterTime")
                .ok()
                .and_then(|c| c.get_timestamp("clusterTime").ok())
            {
                Some(ts) => Ok(ts),
                None => Err(SyncError::new(
                    ErrorKind::SourceRead,
                    "the source reply carries no operationTime: is it a replica set?",
                )),
            },
        }
    }

    /// The replica set's identity (DESIGN §2.1).
    pub async fn identity(&self) -> Result<SourceIdentity, SyncError> {
        let admin = self.client.database("admin");
        let hello = admin.run_command(doc! {"hello": 1}).await.map_err(|e| {
            SyncError::mongo(
                ErrorKind::SourceConnection,
                "reading the source topology",
                e,
            )
        })?;
        let set_name = hello.get_str("setName").ok().map(str::to_string);
        if set_name.is_none() {
            return Err(SyncError::new(
                ErrorKind::Config,
                "the source is not a replica set (no setName in hello): change streams need a replica set",
            ));
        }
        let mut hosts: Vec<String> = hello
            .get_array("hosts")
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str().map(str::to_lowercase))
                    .collect()
            })
            .unwrap_or_default();
        hosts.sort();
        let replica_set_id = match admin.run_command(doc! {"replSetGetConfig": 1}).await {
            Ok(reply) => reply
                .get_document("config")
                .ok()
                .and_then(|c| c.get_document("settings").ok())
                .and_then(|s| s.get_object_id("replicaSetId").ok()),
            // Not permitted (no clusterMonitor role): fall back to name + hosts.
            Err(_) => None,
        };
        Ok(SourceIdentity {
            replica_set_id,
            set_name,
            hosts,
        })
    }

    /// Collections of every database, with their UUID and options; views and time-series
    /// collections are returned separately so the caller can warn about them.
    pub async fn list_collections(
        &self,
    ) -> Result<(Vec<SourceCollection>, Vec<(Namespace, String)>), SyncError> {
        let dbs = self
            .client
            .list_database_names()
            .await
            .map_err(|e| read_error("listing source databases", e))?;
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for db in dbs {
            if matches!(db.as_str(), "admin" | "local" | "config") {
                continue;
            }
            let specs: Vec<Document> = self
                .client
                .database(&db)
                .run_cursor_command(doc! {"listCollections": 1})
                .await
                .map_err(|e| read_error(format!("listing collections of {db}"), e))?
                .try_collect()
                .await
                .map_err(|e| read_error(format!("listing collections of {db}"), e))?;
            for spec in specs {
                let Ok(name) = spec.get_str("name") else {
                    continue;
                };
                let ns = Namespace::new(db.clone(), name);
                let kind = spec.get_str("type").unwrap_or("collection");
                if kind != "collection" {
                    skipped.push((ns, kind.to_string()));
                    continue;
                }
                let uuid = listed_uuid(&spec);
                out.push(SourceCollection {
                    ns,
                    uuid,
                    options: spec.get_document("options").cloned().unwrap_or_default(),
                });
            }
        }
        Ok((out, skipped))
    }

    /// A collection's current `listCollections` options (`None` if it does not exist).
    /// See also [`listed_collection`], which gives its UUID too.
    pub async fn collection_options(&self, ns: &Namespace) -> Result<Option<Document>, SyncError> {
        let specs: Vec<Document> = self
            .client
            .database(&ns.db)
            .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": ns.coll.clone()}})
            .await
            .map_err(|e| read_error(format!("reading the options of {ns}"), e))?
            .try_collect()
            .await
            .map_err(|e| read_error(format!("reading the options of {ns}"), e))?;
        Ok(specs
            .first()
            .map(|s| s.get_document("options").cloned().unwrap_or_default()))
    }

    /// Turns on `changeStreamPreAndPostImages` for a collection (`conflict.enable_pre_images`).
    pub async fn enable_pre_and_post_images(&self, ns: &Namespace) -> Result<(), SyncError> {
        self.client
            .database(&ns.db)
            .run_command(doc! {"collMod": ns.coll.clone(), "changeStreamPreAndPostImages": {"enabled": true}})
            .await
            .map_err(|e| read_error(format!("enabling pre- and post-images on {ns}"), e))?;
        Ok(())
    }

    pub async fn list_indexes(&self, ns: &Namespace) -> Result<Vec<Document>, SyncError> {
        let cursor = self
            .client
            .database(&ns.db)
            .collection::<Document>(&ns.coll)
            .list_indexes()
            .await;
        let cursor = match cursor {
            Ok(c) => c,
            Err(e) if is_namespace_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(read_error(format!("listing indexes of {ns}"), e)),
        };
        let models: Vec<mongodb::IndexModel> = cursor
            .try_collect()
            .await
            .map_err(|e| read_error(format!("listing indexes of {ns}"), e))?;
        let mut out = Vec::new();
        for m in models {
            let mut spec = doc! {"key": m.keys.clone()};
            if let Some(opts) = m.options {
                let opts = bson::serialize_to_document(&opts).map_err(|e| {
                    SyncError::with_source(ErrorKind::SourceRead, "reading index options", e)
                })?;
                for (k, v) in opts {
                    spec.insert(k, v);
                }
            }
            out.push(spec);
        }
        Ok(out)
    }

    pub async fn estimated_count(&self, ns: &Namespace) -> Result<u64, SyncError> {
        self.client
            .database(&ns.db)
            .collection::<Document>(&ns.coll)
            .estimated_document_count()
            .await
            .map_err(|e| read_error(format!("counting {ns}"), e))
    }

    /// Opens (or resumes, with `startAfter`) a change stream on one collection.
    pub async fn open_stream(
        &self,
        ns: &Namespace,
        start: StreamStart<'_>,
        settings: &StreamSettings,
    ) -> Result<ChangeStream<RawDocumentBuf>, SyncError> {
        self.open_scoped_stream(StreamTarget::Collection(ns), start, settings, None)
            .await
    }

    /// Opens (or resumes) a change stream on a collection, a database or the deployment, with
    /// an optional `$match` on the events (shared streams, DESIGN §2.11).
    pub async fn open_scoped_stream(
        &self,
        target: StreamTarget<'_>,
        start: StreamStart<'_>,
        settings: &StreamSettings,
        filter: Option<Document>,
    ) -> Result<ChangeStream<RawDocumentBuf>, SyncError> {
        let mut options = ChangeStreamOptions::default();
        options.show_expanded_events = Some(true);
        options.max_await_time = Some(settings.max_await);
        options.batch_size = settings.batch_size;
        options.full_document = if settings.post_images {
            Some(FullDocumentType::WhenAvailable)
        } else if settings.update_lookup {
            Some(FullDocumentType::UpdateLookup)
        } else {
            None
        };
        if settings.pre_images {
            options.full_document_before_change = Some(FullDocumentBeforeChangeType::WhenAvailable);
        }
        if let StreamStart::AtOperationTime(ts) = start {
            options.start_at_operation_time = Some(ts);
        }
        if let StreamStart::After(token) = start {
            let token: ResumeToken =
                bson::deserialize_from_document(token.clone()).map_err(|e| {
                    SyncError::with_source(
                        ErrorKind::InvariantViolated,
                        "decoding stored resume token",
                        e,
                    )
                })?;
            options.start_after = Some(token);
        }
        let mut pipeline = Vec::new();
        if let Some(filter) = filter {
            pipeline.push(doc! {"$match": filter});
        }
        // Events over 16 MiB (large documents with pre-images) arrive in fragments that the
        // reader reassembles, instead of failing the stream (MongoDB 6.0.9+ / 7.0+). The split
        // stage must come last.
        if self
            .split_large_events
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            pipeline.push(doc! {"$changeStreamSplitLargeEvent": {}});
        }
        let what = target.to_string();
        let opened = match target {
            StreamTarget::Collection(ns) => {
                self.client
                    .database(&ns.db)
                    .collection::<Document>(&ns.coll)
                    .watch()
                    .pipeline(pipeline)
                    .with_options(options)
                    .await
            }
            StreamTarget::Database(db) => {
                self.client
                    .database(db)
                    .watch()
                    .pipeline(pipeline)
                    .with_options(options)
                    .await
            }
            StreamTarget::Deployment => {
                self.client
                    .watch()
                    .pipeline(pipeline)
                    .with_options(options)
                    .await
            }
        };
        let stream =
            opened.map_err(|e| read_error(format!("opening the change stream of {what}"), e))?;
        Ok(stream.with_type::<RawDocumentBuf>())
    }

    /// Reads one range of `_id` order starting at `lower` (inclusive, `None` = MinKey): at most
    /// `max_docs` documents and about `max_bytes`. Returns the documents and the lower bound of
    /// the next range (`None` when the collection is exhausted). Uses `hint: {_id: 1}` with
    /// `min` index bounds, never `$gt` on `_id`, so mixed-type `_id`s are all visited.
    pub async fn scan_range(
        &self,
        ns: &Namespace,
        lower: Option<&Bson>,
        max_docs: usize,
        max_bytes: usize,
        after: Option<Timestamp>,
        collation: Option<&Document>,
    ) -> Result<(Vec<RawDocumentBuf>, Option<Bson>), SyncError> {
        self.timed(
            "scanning a range",
            self.scan_range_inner(ns, lower, None, max_docs, max_bytes, after, collation),
        )
        .await
    }

    /// [`Source::scan_range`] within a lane: documents below `upper` (exclusive) only; the
    /// next bound is `None` at the lane's end.
    #[allow(clippy::too_many_arguments)]
    pub async fn scan_range_below(
        &self,
        ns: &Namespace,
        lower: Option<&Bson>,
        upper: Option<&Bson>,
        max_docs: usize,
        max_bytes: usize,
        after: Option<Timestamp>,
        collation: Option<&Document>,
    ) -> Result<(Vec<RawDocumentBuf>, Option<Bson>), SyncError> {
        self.timed(
            "scanning a range",
            self.scan_range_inner(ns, lower, upper, max_docs, max_bytes, after, collation),
        )
        .await
    }

    /// `_id`s that cut the collection into `parts` lanes of about `estimate / parts`
    /// documents each, in `_id` index order (strictly increasing; fewer when the collection
    /// is smaller than estimated).
    pub async fn id_split_points(
        &self,
        ns: &Namespace,
        parts: usize,
        estimate: u64,
        collation: Option<&Document>,
    ) -> Result<Vec<Bson>, SyncError> {
        let coll = self.raw_collection(ns);
        let mut points: Vec<Bson> = Vec::new();
        for k in 1..parts {
            let skip = estimate * k as u64 / parts as u64;
            let mut find = coll
                .find(doc! {})
                .hint(Hint::Keys(doc! {"_id": 1}))
                .sort(doc! {"_id": 1})
                .projection(doc! {"_id": 1})
                .skip(skip)
                .limit(1);
            if let Some(c) = collation {
                if let Ok(c) =
                    bson::deserialize_from_document::<mongodb::options::Collation>(c.clone())
                {
                    find = find.collation(c);
                }
            }
            let found: Vec<RawDocumentBuf> = self
                .timed("finding the copy's split points", async {
                    let cursor = find
                        .await
                        .map_err(|e| read_error(format!("finding split points of {ns}"), e))?;
                    cursor
                        .try_collect()
                        .await
                        .map_err(|e| read_error(format!("finding split points of {ns}"), e))
                })
                .await?;
            let Some(doc) = found.first() else {
                break;
            };
            let id = raw_id(doc)?;
            if points.last() != Some(&id) {
                points.push(id);
            }
        }
        Ok(points)
    }

    #[allow(clippy::too_many_arguments)]
    async fn scan_range_inner(
        &self,
        ns: &Namespace,
        lower: Option<&Bson>,
        upper: Option<&Bson>,
        max_docs: usize,
        max_bytes: usize,
        after: Option<Timestamp>,
        collation: Option<&Document>,
    ) -> Result<(Vec<RawDocumentBuf>, Option<Bson>), SyncError> {
        let coll = self.raw_collection(ns);
        let min = doc! {"_id": lower.cloned().unwrap_or(Bson::MinKey)};
        let mut find = coll
            .find(doc! {})
            .hint(Hint::Keys(doc! {"_id": 1}))
            .min(min)
            .sort(doc! {"_id": 1})
            .batch_size(max_docs.min(10_000) as u32 + 1);
        if let Some(u) = upper {
            find = find.max(doc! {"_id": u.clone()});
        }
        if let Some(c) = collation {
            if let Ok(c) = bson::deserialize_from_document::<mongodb::options::Collation>(c.clone())
            {
                find = find.collation(c);
            }
        }
        let mut session = self
            .client
            .start_session()
            .causal_consistency(true)
            .await
            .map_err(|e| read_error("starting a read session", e))?;
        if let Some(ts) = after {
            // afterClusterTime >= T0: the copy never reads a state older than its stream start.
            session.advance_operation_time(ts);
        }
        let mut cursor = find
            .session(&mut session)
            .await
            .map_err(|e| read_error(format!("scanning {ns}"), e))?;
        let mut docs = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        while let Some(doc) = cursor
            .next(&mut session)
            .await
            .transpose()
            .map_err(|e| read_error(format!("scanning {ns}"), e))?
        {
            if docs.len() >= max_docs
                || (!docs.is_empty() && bytes + doc.as_bytes().len() > max_bytes)
            {
                next = Some(raw_id(&doc)?);
                break;
            }
            bytes += doc.as_bytes().len();
            docs.push(doc);
        }
        Ok((docs, next))
    }

    /// The current source documents with these `_id`s (majority read), keyed by `_id`.
    pub async fn fetch_documents(
        &self,
        ns: &Namespace,
        ids: &[Bson],
    ) -> Result<Vec<RawDocumentBuf>, SyncError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.timed("looking up documents", self.fetch_documents_inner(ns, ids))
            .await
    }

    /// The source documents with these `_id`s as they were at cluster time `at` (a snapshot
    /// read), so that every change up to `at` is in them and none after it. When the source
    /// cannot read at `at` (older than its snapshot history, `minSnapshotHistoryWindowInSeconds`,
    /// 300 s by default; a collection re-created since; no snapshot support), the current
    /// documents are read instead: they hold every change up to `at` and possibly later ones.
    pub async fn fetch_documents_at(
        &self,
        ns: &Namespace,
        ids: &[Bson],
        at: Timestamp,
    ) -> Result<Vec<RawDocumentBuf>, SyncError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let snapshot = self
            .timed("looking up documents", self.fetch_snapshot(ns, ids, at))
            .await?;
        match snapshot {
            Some(docs) => Ok(docs),
            None => self.fetch_documents(ns, ids).await,
        }
    }

    /// `None` when the source cannot serve a snapshot read at `at`.
    async fn fetch_snapshot(
        &self,
        ns: &Namespace,
        ids: &[Bson],
        at: Timestamp,
    ) -> Result<Option<Vec<RawDocumentBuf>>, SyncError> {
        let context = || format!("looking up documents in {ns} as of {at}");
        let command = doc! {
            "find": ns.coll.clone(),
            "filter": {"_id": {"$in": ids}},
            "readConcern": {"level": "snapshot", "atClusterTime": at},
        };
        let cursor = match self
            .client
            .database(&ns.db)
            .run_cursor_command(command)
            .await
        {
            Ok(c) => c,
            Err(e) if snapshot_unavailable(&e) => {
                tracing::debug!(namespace = %ns, error = %e, "no snapshot read at the batch's cluster time; reading the current documents");
                return Ok(None);
            }
            Err(e) => return Err(read_error(context(), e)),
        };
        match cursor.with_type::<RawDocumentBuf>().try_collect().await {
            Ok(docs) => Ok(Some(docs)),
            Err(e) if snapshot_unavailable(&e) => Ok(None),
            Err(e) => Err(read_error(context(), e)),
        }
    }

    async fn fetch_documents_inner(
        &self,
        ns: &Namespace,
        ids: &[Bson],
    ) -> Result<Vec<RawDocumentBuf>, SyncError> {
        self.raw_collection(ns)
            .find(doc! {"_id": {"$in": ids}})
            .await
            .map_err(|e| read_error(format!("looking up documents in {ns}"), e))?
            .try_collect()
            .await
            .map_err(|e| read_error(format!("looking up documents in {ns}"), e))
    }
}

/// The `_id` of a raw document.
pub fn raw_id(doc: &RawDocumentBuf) -> Result<Bson, SyncError> {
    match doc.get("_id") {
        Ok(Some(v)) => Bson::try_from(v)
            .map_err(|e| SyncError::with_source(ErrorKind::SourceRead, "decoding _id", e)),
        _ => Err(SyncError::new(
            ErrorKind::SourceRead,
            "document without _id",
        )),
    }
}

/// The source cannot read at the requested cluster time: 239 SnapshotTooOld, 246
/// SnapshotUnavailable (the collection changed since), 72 InvalidOptions and 115
/// CommandNotSupported (no snapshot reads there).
fn snapshot_unavailable(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if matches!(c.code, 239 | 246 | 72 | 115))
}

pub fn is_namespace_not_found(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 26)
}

/// The UUID of a `listCollections` entry (`info.uuid`).
pub fn listed_uuid(spec: &Document) -> Option<bson::Uuid> {
    spec.get_document("info")
        .ok()
        .and_then(|i| match i.get("uuid") {
            Some(Bson::Binary(b)) => b.to_uuid().ok(),
            _ => None,
        })
}

/// The `listCollections` entry of `name` in `db` (either cluster): its UUID and options.
pub async fn listed_collection(
    db: &mongodb::Database,
    name: &str,
) -> Result<Option<(Option<bson::Uuid>, Document)>, mongodb::error::Error> {
    let specs: Vec<Document> = db
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": name}})
        .await?
        .try_collect()
        .await?;
    Ok(specs.first().map(|spec| {
        (
            listed_uuid(spec),
            spec.get_document("options").cloned().unwrap_or_default(),
        )
    }))
}

/// A resume token as a document (what checkpoints store).
pub fn serialize_token(
    token: &mongodb::change_stream::event::ResumeToken,
) -> Result<Document, SyncError> {
    match bson::serialize_to_bson(token) {
        Ok(Bson::Document(d)) => Ok(d),
        Ok(_) => Err(SyncError::new(
            ErrorKind::SourceRead,
            "resume token is not a document",
        )),
        Err(e) => Err(SyncError::with_source(
            ErrorKind::SourceRead,
            "encoding a resume token",
            e,
        )),
    }
}

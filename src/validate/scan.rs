//! The reads validation makes. Range scans walk the `_id` index (`hint: {_id: 1}` with `min` /
//! `max` index bounds in the collection's collation, like the copy: never `$gt`/`$lt` on `_id`,
//! which would skip mixed-type `_id`s) and are streamed batch by batch from the driver's raw
//! replies: a document is hashed where it lies in the reply buffer and never copied, so memory
//! is one reply per open cursor, whatever the collection's size.

use std::{collections::HashMap, time::Duration};

use bson::{doc, Bson, Document, RawBson, RawDocument, RawDocumentBuf, Timestamp};
use futures::{StreamExt, TryStreamExt};
use mongodb::{
    action::Find,
    options::{Collation, Hint, ReadConcern, ReadPreference, SelectionCriteria},
    Client, ClientSession, Collection,
};

use super::{
    digest::{document_digest, IdKey, RangeDocs},
    throttle::{Pacer, Throttle},
};
use crate::{
    error::{ErrorKind, SyncError},
    model::event::{token_cluster_time, ts_key},
    source::Namespace,
};

/// Documents per reply of a scan: large enough that round trips do not dominate, small enough
/// that a reply of average documents stays a few MiB (the server caps a reply at 16 MiB anyway).
pub const SCAN_BATCH_DOCS: u32 = 2_000;
/// `_id`s per `$in` lookup when documents are re-read one by one.
pub const FETCH_CHUNK: usize = 500;
/// The bound of a round trip when `socket_timeout_ms` is not set (effectively none).
const NO_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Above this many `_id`s the change-stream check filters on the client instead of in `$match`.
const MAX_IDS_IN_MATCH: usize = 10_000;

/// One side of a comparison: a client and the collection on it.
#[derive(Clone)]
pub struct Side {
    pub client: Client,
    pub ns: Namespace,
    pub collation: Option<Collation>,
    /// The error area of this side's failures.
    area: ErrorKind,
    /// `socket_timeout_ms` of this side: bounds every round trip.
    timeout: Option<Duration>,
}

impl Side {
    pub fn source(
        client: &Client,
        ns: &Namespace,
        options: &Document,
        timeout: Option<Duration>,
    ) -> Side {
        Side::new(client, ns, options, ErrorKind::SourceRead, timeout)
    }

    pub fn destination(
        client: &Client,
        ns: &Namespace,
        options: &Document,
        timeout: Option<Duration>,
    ) -> Side {
        Side::new(
            client,
            ns,
            options,
            ErrorKind::DestinationConnection,
            timeout,
        )
    }

    fn new(
        client: &Client,
        ns: &Namespace,
        options: &Document,
        area: ErrorKind,
        timeout: Option<Duration>,
    ) -> Side {
        let collation = options
            .get_document("collation")
            .ok()
            .and_then(|c| bson::deserialize_from_document::<Collation>(c.clone()).ok());
        Side {
            client: client.clone(),
            ns: ns.clone(),
            collation,
            area,
            timeout,
        }
    }

    /// One round trip under this side's `socket_timeout_ms` (a plain `Timeout` future, not
    /// an `async fn`, so the futures that use it stay provably `Send`). Await it and map the
    /// elapsed error with [`Side::timed_out`].
    fn timed<F: std::future::IntoFuture>(&self, fut: F) -> tokio::time::Timeout<F::IntoFuture> {
        tokio::time::timeout(self.timeout.unwrap_or(NO_TIMEOUT), fut.into_future())
    }

    fn timed_out(&self, what: &str) -> SyncError {
        SyncError::new(
            self.area,
            format!(
                "{what} {} timed out after {} ms (socket_timeout_ms)",
                self.ns,
                self.timeout.unwrap_or(NO_TIMEOUT).as_millis()
            ),
        )
    }

    fn collection(&self) -> Collection<RawDocumentBuf> {
        self.client.database(&self.ns.db).collection_with_options(
            &self.ns.coll,
            mongodb::options::CollectionOptions::builder()
                .read_concern(ReadConcern::majority())
                .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
                .build(),
        )
    }

    fn error(&self, what: &str, e: mongodb::error::Error) -> SyncError {
        SyncError::mongo(self.area, format!("{what} {}", self.ns), e)
    }

    async fn session(&self, after: Option<Timestamp>) -> Result<ClientSession, SyncError> {
        let mut session = self
            .client
            .start_session()
            .causal_consistency(true)
            .await
            .map_err(|e| self.error("starting a session to read", e))?;
        if let Some(ts) = after {
            // readConcern {afterClusterTime: ts}: never read a state older than `ts`.
            session.advance_operation_time(ts);
        }
        Ok(session)
    }

    /// A `find` over `[lower, upper)` in `_id` index order (`None` = MinKey / MaxKey).
    fn range_find<'a>(
        &self,
        coll: &'a Collection<RawDocumentBuf>,
        lower: Option<&Bson>,
        upper: Option<&Bson>,
        limit: Option<usize>,
    ) -> Find<'a, RawDocumentBuf> {
        let mut find = coll
            .find(doc! {})
            .hint(Hint::Keys(doc! {"_id": 1}))
            .min(doc! {"_id": lower.cloned().unwrap_or(Bson::MinKey)})
            .batch_size(SCAN_BATCH_DOCS);
        if let Some(u) = upper {
            find = find.max(doc! {"_id": u.clone()});
        }
        if let Some(n) = limit {
            find = find.limit(n as i64);
        }
        if let Some(c) = &self.collation {
            find = find.collation(c.clone());
        }
        find
    }
}

fn later(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if ts_key(x) >= ts_key(y) { x } else { y }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Streams `[lower, upper)` (at most `limit` documents) in raw batches, calling `each` for every
/// document where it lies in the reply. Returns the latest `operationTime` of the replies.
async fn stream_range<F>(
    side: &Side,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    limit: Option<usize>,
    after: Option<Timestamp>,
    throttle: &Throttle,
    mut each: F,
) -> Result<Option<Timestamp>, SyncError>
where
    F: FnMut(&RawDocument) -> Result<(), SyncError>,
{
    let coll = side.collection();
    let mut session = side.session(after).await?;
    let mut cursor = side
        .timed(
            side.range_find(&coll, lower, upper, limit)
                .session(&mut session)
                .batch(),
        )
        .await
        .map_err(|_| side.timed_out("scanning"))?
        .map_err(|e| side.error("scanning", e))?;
    let mut pacer = Pacer::new(throttle);
    let mut op_time = None;
    {
        let mut batches = cursor.stream(&mut session);
        while let Some(batch) = side
            .timed(batches.next())
            .await
            .map_err(|_| side.timed_out("scanning"))?
        {
            let batch = batch.map_err(|e| side.error("scanning", e))?;
            op_time = later(
                op_time,
                batch.as_raw_document().get_timestamp("operationTime").ok(),
            );
            let docs = batch
                .doc_slices()
                .map_err(|e| side.error("reading a reply while scanning", e))?;
            let mut n = 0u64;
            for item in docs {
                let doc = item.ok().and_then(|v| v.as_document()).ok_or_else(|| {
                    SyncError::new(side.area, format!("malformed document in {}", side.ns))
                })?;
                each(doc)?;
                n += 1;
            }
            pacer.add(n).await;
        }
    }
    pacer.flush().await;
    Ok(later(op_time, session.operation_time()))
}

fn raw_id(side: &Side, doc: &RawDocument) -> Result<RawBson, SyncError> {
    match doc.get("_id") {
        Ok(Some(id)) => Ok(RawBson::from(id)),
        _ => Err(SyncError::new(
            side.area,
            format!("a document without _id in {}", side.ns),
        )),
    }
}

/// The source side of a range: its documents' digests, the lower bound of the next range, and
/// the cluster time of the read (T).
#[derive(Debug)]
pub struct SourceRange {
    pub docs: RangeDocs,
    /// `None`: the range runs to MaxKey.
    pub next: Option<Bson>,
    pub read_at: Option<Timestamp>,
}

/// Digests the source range starting at `lower`: at most `max_docs` documents, or everything
/// below `upper` when it is given (a re-check of a known range).
pub async fn digest_source(
    side: &Side,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    max_docs: usize,
    throttle: &Throttle,
) -> Result<SourceRange, SyncError> {
    let mut docs = RangeDocs::default();
    let mut next = None;
    let limit = upper.is_none().then_some(max_docs + 1);
    let read_at = stream_range(side, lower, upper, limit, None, throttle, |doc| {
        let id = raw_id(side, doc)?;
        if upper.is_none() && docs.docs.len() >= max_docs {
            next = Some(
                Bson::try_from(id)
                    .map_err(|e| SyncError::with_source(side.area, "decoding an _id", e))?,
            );
        } else {
            docs.push(id, document_digest(doc.as_bytes()), doc.as_bytes().len());
        }
        Ok(())
    })
    .await?;
    Ok(SourceRange {
        docs,
        next: if upper.is_some() {
            upper.cloned()
        } else {
            next
        },
        read_at,
    })
}

/// Digests the destination's documents in `[lower, upper)`.
pub async fn digest_destination(
    side: &Side,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    throttle: &Throttle,
) -> Result<RangeDocs, SyncError> {
    let mut docs = RangeDocs::default();
    stream_range(side, lower, upper, None, None, throttle, |doc| {
        docs.push(
            raw_id(side, doc)?,
            document_digest(doc.as_bytes()),
            doc.as_bytes().len(),
        );
        Ok(())
    })
    .await?;
    Ok(docs)
}

/// Full documents of `[lower, upper)`, at most `max_docs`, read at a cluster time ≥ `after`;
/// also the lower bound of what is left of the range (`None` when it was read to its end).
pub async fn read_range(
    side: &Side,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    max_docs: usize,
    after: Option<Timestamp>,
    throttle: &Throttle,
) -> Result<(Vec<RawDocumentBuf>, Option<Bson>), SyncError> {
    let mut docs = Vec::new();
    let mut next = None;
    stream_range(
        side,
        lower,
        upper,
        Some(max_docs + 1),
        after,
        throttle,
        |doc| {
            if docs.len() >= max_docs {
                next = Some(
                    Bson::try_from(raw_id(side, doc)?)
                        .map_err(|e| SyncError::with_source(side.area, "decoding an _id", e))?,
                );
            } else {
                docs.push(doc.to_owned());
            }
            Ok(())
        },
    )
    .await?;
    Ok((docs, next))
}

/// `_id`s of `[lower, upper)`.
pub async fn ids_in_range(
    side: &Side,
    lower: Option<&Bson>,
    upper: Option<&Bson>,
    throttle: &Throttle,
) -> Result<Vec<Bson>, SyncError> {
    let mut ids = Vec::new();
    stream_range(side, lower, upper, None, None, throttle, |doc| {
        ids.push(
            Bson::try_from(raw_id(side, doc)?)
                .map_err(|e| SyncError::with_source(side.area, "decoding an _id", e))?,
        );
        Ok(())
    })
    .await?;
    Ok(ids)
}

/// The current documents with these `_id`s, keyed by `_id`, and the cluster time of the read.
pub async fn fetch(
    side: &Side,
    ids: &[Bson],
) -> Result<(HashMap<IdKey, RawDocumentBuf>, Option<Timestamp>), SyncError> {
    let mut out = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok((out, None));
    }
    let coll = side.collection();
    let mut session = side.session(None).await?;
    let mut find = coll.find(doc! {"_id": {"$in": ids.to_vec()}});
    if let Some(c) = &side.collation {
        find = find.collation(c.clone());
    }
    let mut cursor = side
        .timed(find.session(&mut session))
        .await
        .map_err(|_| side.timed_out("looking up documents in"))?
        .map_err(|e| side.error("looking up documents in", e))?;
    while let Some(doc) = side
        .timed(cursor.next(&mut session))
        .await
        .map_err(|_| side.timed_out("looking up documents in"))?
        .transpose()
        .map_err(|e| side.error("looking up documents in", e))?
    {
        let key = IdKey::of(
            doc.get("_id")
                .ok()
                .flatten()
                .ok_or_else(|| SyncError::new(side.area, "a document without _id"))?,
        );
        out.insert(key, doc);
    }
    Ok((out, session.operation_time()))
}

/// The number of documents, and the cluster time of the count.
pub async fn count(side: &Side) -> Result<(u64, Option<Timestamp>), SyncError> {
    let coll = side.collection();
    let mut session = side.session(None).await?;
    let n = side
        .timed(
            coll.count_documents(doc! {})
                .hint(Hint::Keys(doc! {"_id": 1}))
                .session(&mut session),
        )
        .await
        .map_err(|_| side.timed_out("counting"))?
        .map_err(|e| side.error("counting", e))?;
    Ok((n, session.operation_time()))
}

/// The collection's `listCollections` options, or `None` when it does not exist.
pub async fn collection_options(side: &Side) -> Result<Option<Document>, SyncError> {
    let list = async {
        side.client
            .database(&side.ns.db)
            .run_cursor_command(
                doc! {"listCollections": 1, "filter": {"name": side.ns.coll.clone()}},
            )
            .await?
            .try_collect::<Vec<Document>>()
            .await
    };
    let specs = side
        .timed(list)
        .await
        .map_err(|_| side.timed_out("listing"))?
        .map_err(|e| side.error("listing", e))?;
    Ok(specs
        .into_iter()
        .next()
        .map(|s| s.get_document("options").cloned().unwrap_or_default()))
}

/// Change events of a source collection with cluster times in `[from, to]`.
#[derive(Debug, Default)]
pub struct Changes {
    /// `_id`s of the documents that changed.
    pub ids: std::collections::HashSet<IdKey>,
    /// Any event at all (data or DDL).
    pub any: bool,
    /// The collection itself was dropped, renamed or invalidated.
    pub collection_changed: bool,
}

/// Reads the source's change stream of `ns` from `from` (inclusive) until it has passed `to`,
/// collecting the `_id`s (restricted to `ids` when given) that had events. An event exactly at
/// `from` counts: its transaction may be half-applied by a worker whose checkpoint is `from`.
pub async fn changes_between(
    source: &Client,
    ns: &Namespace,
    ids: Option<&[Bson]>,
    from: Timestamp,
    to: Timestamp,
    timeout: Duration,
) -> Result<Changes, SyncError> {
    let err = |e| {
        SyncError::mongo(
            ErrorKind::SourceRead,
            format!("reading the change stream of {ns} to re-check"),
            e,
        )
    };
    let wanted: Option<std::collections::HashSet<IdKey>> =
        ids.map(|ids| ids.iter().map(IdKey::of_bson).collect());
    let mut pipeline = Vec::new();
    if let Some(ids) = ids.filter(|ids| ids.len() <= MAX_IDS_IN_MATCH) {
        pipeline.push(doc! {"$match": {"$or": [
            {"documentKey._id": {"$in": ids.to_vec()}},
            {"operationType": {"$in": ["drop", "rename", "dropDatabase", "invalidate"]}},
        ]}});
    }
    let mut stream = source
        .database(&ns.db)
        .collection::<Document>(&ns.coll)
        .watch()
        .pipeline(pipeline)
        .start_at_operation_time(from)
        .max_await_time(Duration::from_millis(500))
        .await
        .map_err(err)?
        .with_type::<RawDocumentBuf>();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Changes::default();
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next_if_any())
            .await
            .map_err(|_| {
                SyncError::new(
                    ErrorKind::SourceRead,
                    format!("the change stream of {ns} did not reach the re-check time within {timeout:?}"),
                )
            })?
            .map_err(err)?;
        match next {
            Some(event) => {
                let at = event.get_timestamp("clusterTime").ok();
                if at.is_some_and(|t| ts_key(t) > ts_key(to)) {
                    return Ok(out);
                }
                out.any = true;
                let op = event.get_str("operationType").unwrap_or_default();
                if matches!(op, "drop" | "rename" | "dropDatabase" | "invalidate") {
                    out.collection_changed = true;
                }
                if let Some(id) = event
                    .get_document("documentKey")
                    .ok()
                    .and_then(|k| k.get("_id").ok().flatten())
                {
                    let key = IdKey::of(id);
                    if wanted.as_ref().is_none_or(|w| w.contains(&key)) {
                        out.ids.insert(key);
                    }
                }
            }
            None => {
                let reached = stream
                    .resume_token()
                    .and_then(|t| bson::serialize_to_document(&t).ok())
                    .and_then(|t| RawDocumentBuf::try_from(&t).ok())
                    .and_then(|t| token_cluster_time(&t))
                    .is_some_and(|t| ts_key(t) >= ts_key(to));
                if reached || !stream.is_alive() {
                    return Ok(out);
                }
            }
        }
    }
}

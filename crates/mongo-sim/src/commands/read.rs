//! Reads: `find`, cursors, `aggregate` (including `$changeStream`), `count`, `distinct`,
//! `dbHash`, and the catalog listings.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bson::{doc, Bson, Document};
use md5::{Digest, Md5};

use super::{coll_arg, fields, int_arg, lets, write_stages, Ctx};
use crate::{
    changestream::{self, epoch_of, ChangeStreamCursor, Scope},
    cursor::{next_batch, Cursor, CursorKind, DEFAULT_FIRST_BATCH},
    error::{codes, CommandError, CommandResult},
    failpoint::FAIL_GET_MORE_AFTER_CURSOR_CHECKOUT,
    query::{
        aggregate::{run_pipeline, PipelineContext},
        compare::{compare_values, IdKey},
        matcher::Matcher,
        projection::Projection,
        sort::SortSpec,
    },
    store::{Collection, DocRef, Namespace, Stored},
    views,
};

/// Builds a cursor reply, registering a cursor when documents remain.
fn cursor_reply(
    ctx: &Ctx<'_>,
    ns: String,
    mut remaining: VecDeque<DocRef>,
    projection: Option<Projection>,
    first_batch: usize,
    single_batch: bool,
) -> CommandResult<Document> {
    let batch = next_batch(&mut remaining, projection.as_ref(), first_batch)?;
    let at_cluster_time = *ctx.snapshot_read_at.lock();
    let id = if remaining.is_empty() || single_batch {
        0
    } else {
        let id = ctx.engine.next_cursor_id();
        ctx.engine.cursors.lock().insert(Cursor {
            id,
            ns: ns.clone(),
            kind: CursorKind::Documents {
                remaining,
                projection,
            },
            lsid: ctx.session.as_ref().map(|s| s.key.clone()),
            at_cluster_time,
        });
        id
    };
    let mut cursor = doc! {"firstBatch": batch, "id": id, "ns": ns};
    if let Some(at) = at_cluster_time {
        // Snapshot reads outside transactions report their read time.
        cursor.insert("atClusterTime", at);
    }
    Ok(doc! {"cursor": cursor})
}

fn batch_size(cmd: &Document, key: &str) -> CommandResult<Option<usize>> {
    match int_arg(cmd, key)? {
        Some(n) if n < 0 => Err(CommandError::bad_value(format!(
            "{key} must be non-negative"
        ))),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

fn id_bound(bound: Option<&Document>, hint: Option<&Bson>) -> CommandResult<Option<Bson>> {
    let Some(bound) = bound else { return Ok(None) };
    let is_id_hint = match hint {
        Some(Bson::Document(h)) => h.len() == 1 && h.contains_key("_id"),
        Some(Bson::String(s)) => s == "_id_",
        _ => false,
    };
    if !is_id_hint {
        return Err(CommandError::new(
            51173,
            "When using min()/max() a hint of which index to use must be provided",
        ));
    }
    if bound.len() != 1 || !bound.contains_key("_id") {
        return Err(CommandError::new(
            51174,
            "The index chosen is not consistent with min/max",
        ));
    }
    Ok(Some(bound.get("_id").cloned().unwrap_or(Bson::Null)))
}

/// Documents of a collection matching a query, honouring `_id` index bounds (`min`
/// inclusive, `max` exclusive) and the `_id` fast path.
fn scan(
    coll: &Collection,
    matcher: &Matcher,
    min: Option<Bson>,
    max: Option<Bson>,
    limit: Option<usize>,
) -> Vec<DocRef> {
    if min.is_none() && max.is_none() {
        return super::crud::matching(coll, matcher, limit);
    }
    // Bounds are keys of the `_id` index: collation keys under a default collation.
    let (min, max): (Option<IdKey>, Option<IdKey>) =
        (min.map(|b| coll.id_key(&b)), max.map(|b| coll.id_key(&b)));
    use std::ops::Bound;
    let lower = min.map(Bound::Included).unwrap_or(Bound::Unbounded);
    let upper = max.map(Bound::Excluded).unwrap_or(Bound::Unbounded);
    let mut out = Vec::new();
    if let (Bound::Included(l), Bound::Excluded(u)) = (&lower, &upper) {
        if l >= u {
            return out;
        }
    }
    for (_, d) in coll.docs.range((lower, upper)) {
        if matcher.matches(d) {
            out.push(Arc::clone(d));
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
        }
    }
    out
}

pub fn find(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let cmd = ctx.cmd;
    let filter = match cmd.get("filter") {
        Some(Bson::Document(f)) => f.clone(),
        None | Some(Bson::Null) => Document::new(),
        Some(_) => return Err(CommandError::type_mismatch("'filter' must be an object")),
    };
    let lets = lets::parse(
        "find.let",
        cmd.get("let"),
        bson::DateTime::now(),
        ctx.engine.cluster_time(),
        &lets::Lets::default(),
    )?;
    lets::check_filter(&filter, &lets)?;
    let matcher = Matcher::new(&filter)?.with_lets(std::sync::Arc::clone(&lets));
    let _collation = super::install_collation(ctx, Some(&ns))?;
    let oplog = ns.db == "local" && ns.coll == "oplog.rs";
    let sort = match cmd.get_document("sort") {
        // The oplog's `$natural` order is handled by `oplog_entries`.
        Ok(s) if !s.is_empty() && !oplog => Some(SortSpec::new(s)?),
        _ => None,
    };
    let projection = match cmd.get_document("projection") {
        Ok(p) if !p.is_empty() => {
            lets::check_projection(p, &lets)?;
            Some(Projection::new(p)?.with_lets(std::sync::Arc::clone(&lets)))
        }
        _ => None,
    };
    let skip = int_arg(cmd, "skip")?.unwrap_or(0);
    if skip < 0 {
        return Err(CommandError::bad_value("skip value must be non-negative"));
    }
    let limit = int_arg(cmd, "limit")?.unwrap_or(0);
    if limit < 0 {
        return Err(CommandError::bad_value("limit value must be non-negative"));
    }
    let single_batch = cmd.get_bool("singleBatch").unwrap_or(false);
    let batch = batch_size(cmd, "batchSize")?.unwrap_or(DEFAULT_FIRST_BATCH);
    let min = id_bound(cmd.get_document("min").ok(), cmd.get("hint"))?;
    let max = id_bound(cmd.get_document("max").ok(), cmd.get("hint"))?;
    let scan_limit = if sort.is_none() && limit > 0 {
        Some((skip + limit) as usize)
    } else {
        None
    };
    let view_ctx = view_context(ctx);
    let mut docs = if oplog {
        oplog_entries(ctx, cmd, &matcher)?
    } else {
        ctx.read(|cat, _| {
            if let Some((base, pipeline)) = views::resolve(cat, &ns)? {
                // A find on a view is an aggregation: the view's pipeline, then the query.
                if min.is_some() || max.is_some() {
                    return Err(CommandError::new(
                        codes::COMMAND_NOT_SUPPORTED,
                        "min/max on a view are not supported by the simulator",
                    ));
                }
                fields::check_hint(cat.get(&base), cmd.get("hint"))?;
                let docs = views::documents(cat, &base, &pipeline, &view_ctx)?;
                return Ok(docs
                    .into_iter()
                    .filter(|d| matcher.matches(d))
                    .map(Stored::shared)
                    .collect());
            }
            fields::check_hint(cat.get(&ns), cmd.get("hint"))?;
            Ok(match cat.get(&ns) {
                Some(c) => scan(c, &matcher, min, max, scan_limit),
                None => Vec::new(),
            })
        })?
    };
    if let Some(s) = &sort {
        docs.sort_by(|a, b| s.compare(a, b));
    }
    let mut remaining: VecDeque<DocRef> = docs.into_iter().skip(skip as usize).collect();
    if limit > 0 {
        remaining.truncate(limit as usize);
    }
    let first = if limit > 0 {
        batch.min(limit as usize)
    } else {
        batch
    };
    cursor_reply(
        ctx,
        ns.to_string(),
        remaining,
        projection,
        first,
        single_batch || (limit > 0 && first >= limit as usize),
    )
}

/// What a view's pipeline sees as `$$NOW` and `$$CLUSTER_TIME` (taken before the catalog is
/// locked: the cluster time takes the same lock).
fn view_context(ctx: &Ctx<'_>) -> PipelineContext {
    PipelineContext {
        now: bson::DateTime::now(),
        cluster_time: Some(ctx.engine.cluster_time()),
        lets: Default::default(),
    }
}

/// The documents a read sees: a collection's (matching `filter`), or a view's computed from
/// its base collection and then filtered.
fn read_source(
    view_ctx: &PipelineContext,
    cat: &crate::store::Catalog,
    ns: &Namespace,
    filter: Option<&Matcher>,
) -> CommandResult<Vec<DocRef>> {
    let keep = |d: &Document| filter.is_none_or(|m| m.matches(d));
    if let Some((base, pipeline)) = views::resolve(cat, ns)? {
        let docs = views::documents(cat, &base, &pipeline, view_ctx)?;
        return Ok(docs
            .into_iter()
            .filter(|d| keep(d))
            .map(Stored::shared)
            .collect());
    }
    Ok(cat
        .get(ns)
        .map(|c| {
            c.docs
                .values()
                .filter(|d| keep(d))
                .map(Arc::clone)
                .collect()
        })
        .unwrap_or_default())
}

/// `local.oplog.rs` in natural order (`sort: {$natural: -1}`: newest first), as far as tools
/// read it to measure the oplog window (`rs.printReplicationInfo()`, mongo-syncd's copy
/// estimate): each entry carries `ts`, `t`, `wall` and `op` (`"n"` for every entry: the
/// simulator keeps its oplog in its own form, not as MongoDB's oplog documents).
fn oplog_entries(ctx: &Ctx<'_>, cmd: &Document, matcher: &Matcher) -> CommandResult<Vec<DocRef>> {
    let newest_first = cmd
        .get_document("sort")
        .ok()
        .and_then(|s| s.get("$natural"))
        .and_then(crate::store::as_i64)
        == Some(-1);
    let limit = int_arg(cmd, "limit")?.unwrap_or(0).max(0) as usize;
    ctx.read(|_, data| {
        let entry = |e: &crate::oplog::OplogEntry| {
            doc! {"ts": e.ts, "t": 1i64, "wall": e.wall, "op": "n"}
        };
        let all: Box<dyn Iterator<Item = &crate::oplog::OplogEntry>> = if newest_first {
            Box::new(data.oplog.after(0).collect::<Vec<_>>().into_iter().rev())
        } else {
            Box::new(data.oplog.after(0))
        };
        let mut out = Vec::new();
        for e in all {
            let d = entry(e);
            if matcher.matches(&d) {
                out.push(Stored::shared(d));
                if limit > 0 && out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    })
}

pub async fn get_more(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let id = match ctx.cmd.get("getMore") {
        Some(Bson::Int64(id)) => *id,
        _ => return Err(CommandError::type_mismatch("getMore must be a long")),
    };
    let coll = ctx.cmd.get_str("collection").map_err(|_| {
        CommandError::failed_to_parse(
            "BSON field 'getMore.collection' is missing but a required field",
        )
    })?;
    let batch = batch_size(ctx.cmd, "batchSize")?.filter(|b| *b > 0);
    let Some((mut cursor, checked_out)) = crate::cursor::CheckedOut::take(&ctx.engine.cursors, id)
    else {
        return Err(CommandError::new(
            codes::CURSOR_NOT_FOUND,
            format!("cursor id {id} not found"),
        ));
    };
    let expected_ns = format!("{}.{coll}", ctx.db);
    if cursor.ns != expected_ns {
        let reply_err = CommandError::new(
            13,
            format!("Requested getMore on namespace '{expected_ns}', but cursor belongs to a different namespace {}", cursor.ns),
        );
        checked_out.give_back(cursor);
        return Err(reply_err);
    }
    match &mut cursor.kind {
        CursorKind::Documents {
            remaining,
            projection,
        } => {
            // The results were computed when the cursor opened: a snapshot cursor keeps
            // returning its snapshot.
            let docs = next_batch(remaining, projection.as_ref(), batch.unwrap_or(usize::MAX))?;
            let done = remaining.is_empty();
            let ns = cursor.ns.clone();
            let at_cluster_time = cursor.at_cluster_time;
            if !done {
                checked_out.give_back(cursor);
            }
            let mut reply = doc! {"nextBatch": docs, "id": if done { 0i64 } else { id }, "ns": ns};
            if let Some(at) = at_cluster_time {
                reply.insert("atClusterTime", at);
            }
            Ok(doc! {"cursor": reply})
        }
        CursorKind::ChangeStream(stream) => {
            // failGetMoreAfterCursorCheckout: the cursor is checked out, so the normal
            // resumable-error labels apply.
            let action = ctx.engine.failpoints.lock().evaluate(
                FAIL_GET_MORE_AFTER_CURSOR_CHECKOUT,
                "getMore",
                ctx.conn.app_name.as_deref(),
                None,
            );
            if let Some(a) = action {
                if let Some(e) = a.error {
                    return Err(e);
                }
            }
            let max_wait = int_arg(ctx.cmd, "maxTimeMS")?.unwrap_or(1000).max(0) as u64;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(max_wait);
            let mut watch = ctx.engine.subscribe_oplog();
            let max_events = batch.unwrap_or(usize::MAX);
            let (events, pbrt) = loop {
                watch.borrow_and_update();
                let polled = {
                    let data = ctx.engine.data.lock();
                    stream.poll(&data, max_events)
                };
                let (events, pbrt) = polled?;
                if !events.is_empty()
                    || stream.finished()
                    || tokio::time::Instant::now() >= deadline
                {
                    break (events, pbrt);
                }
                if tokio::time::timeout_at(deadline, watch.changed())
                    .await
                    .is_err()
                {
                    let data = ctx.engine.data.lock();
                    break stream.poll(&data, max_events)?;
                }
            };
            let ns = cursor.ns.clone();
            let closed = stream.finished();
            if !closed {
                checked_out.give_back(cursor);
            }
            // The events travel encoded; the reply holds a placeholder for them.
            *ctx.encoded_array.lock() = Some(("cursor.nextBatch", events.into_array()));
            Ok(
                doc! {"cursor": {"nextBatch": [], "postBatchResumeToken": pbrt, "id": if closed { 0i64 } else { id }, "ns": ns}},
            )
        }
    }
}

pub fn kill_cursors(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ids = ctx
        .cmd
        .get_array("cursors")
        .map_err(|_| CommandError::failed_to_parse("'cursors' must be an array"))?;
    let mut killed = Vec::new();
    let mut not_found = Vec::new();
    let mut cursors = ctx.engine.cursors.lock();
    for id in ids {
        let id = match id {
            Bson::Int64(i) => *i,
            Bson::Int32(i) => *i as i64,
            _ => continue,
        };
        if cursors.kill(id) {
            killed.push(id);
        } else {
            not_found.push(id);
        }
    }
    Ok(
        doc! {"cursorsKilled": killed, "cursorsNotFound": not_found, "cursorsAlive": [], "cursorsUnknown": []},
    )
}

fn open_change_stream(ctx: &Ctx<'_>, pipeline: &[Bson]) -> CommandResult<Document> {
    // Change streams read at majority: without a level the server upconverts, any explicit
    // level other than "majority" (even "local") is refused (`supportsReadConcern` of
    // `$changeStream`, jstests change_stream_require_majority_read_concern.js).
    if let Some(level) = fields::read_concern_level(ctx.cmd).filter(|l| *l != "majority") {
        return Err(CommandError::new(
            codes::INVALID_OPTIONS,
            format!("Aggregation stage $changeStream cannot run with a readConcern other than 'majority'. Current readConcern: {level}"),
        ));
    }
    let (scope, reply_ns) = match ctx.cmd.get("aggregate") {
        Some(Bson::String(coll)) => {
            let ns = Namespace::new(ctx.db.clone(), coll.clone());
            (Scope::Collection(ns.clone()), ns.to_string())
        }
        Some(Bson::Int32(1)) | Some(Bson::Int64(1)) | Some(Bson::Double(_)) => {
            let all = pipeline
                .first()
                .and_then(|s| s.as_document())
                .and_then(|s| s.get_document("$changeStream").ok())
                .and_then(|s| s.get_bool("allChangesForCluster").ok())
                .unwrap_or(false);
            if all {
                if ctx.db != "admin" {
                    return Err(CommandError::bad_value(
                        "$changeStream may only be run against the 'admin' database if allChangesForCluster: true",
                    ));
                }
                (Scope::Cluster, "admin.$cmd.aggregate".to_string())
            } else {
                if ctx.db == "admin" {
                    return Err(CommandError::bad_value(
                        "$changeStream on the admin database requires allChangesForCluster: true",
                    ));
                }
                (
                    Scope::Database(ctx.db.clone()),
                    format!("{}.$cmd.aggregate", ctx.db),
                )
            }
        }
        _ => {
            return Err(CommandError::type_mismatch(
                "'aggregate' must be a collection name or 1",
            ))
        }
    };
    if let Scope::Collection(ns) = &scope {
        if ctx.read(|cat, _| Ok(views::is_view(cat, ns)))? {
            return Err(views::not_a_collection(ns));
        }
    }
    let (spec, start) = changestream::parse(scope, pipeline)?;
    let first_batch = ctx
        .cmd
        .get_document("cursor")
        .ok()
        .and_then(|c| int_arg(c, "batchSize").ok().flatten())
        .map(|b| b.max(0) as usize)
        .unwrap_or(DEFAULT_FIRST_BATCH);
    let epoch = epoch_of(&ctx.engine.replica_set_id);
    let (stream, events, pbrt) = {
        let data = ctx.engine.data.lock();
        let mut stream = ChangeStreamCursor::open(spec, start, &data, epoch)?;
        let (events, pbrt) = stream.poll(&data, first_batch)?;
        (stream, events, pbrt)
    };
    let closed = stream.finished();
    let id = if closed {
        0
    } else {
        ctx.engine.next_cursor_id()
    };
    if !closed {
        ctx.engine.cursors.lock().insert(Cursor {
            id,
            ns: reply_ns.clone(),
            kind: CursorKind::ChangeStream(Box::new(stream)),
            lsid: ctx.session.as_ref().map(|s| s.key.clone()),
            at_cluster_time: None,
        });
    }
    *ctx.encoded_array.lock() = Some(("cursor.firstBatch", events.into_array()));
    Ok(doc! {"cursor": {"firstBatch": [], "postBatchResumeToken": pbrt, "id": id, "ns": reply_ns}})
}

pub fn aggregate(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let pipeline = ctx
        .cmd
        .get_array("pipeline")
        .map_err(|_| CommandError::failed_to_parse("'pipeline' must be an array"))?
        .clone();
    if !ctx.cmd.contains_key("cursor") && !ctx.cmd.get_bool("explain").unwrap_or(false) {
        return Err(CommandError::failed_to_parse(
            "The 'cursor' option is required, except for aggregate with the explain argument",
        ));
    }
    let is_change_stream = pipeline
        .first()
        .and_then(|s| s.as_document())
        .is_some_and(|s| s.contains_key("$changeStream"));
    if is_change_stream {
        return open_change_stream(ctx, &pipeline);
    }
    let mut stages: Vec<Document> = pipeline
        .iter()
        .map(|s| {
            s.as_document()
                .cloned()
                .ok_or_else(|| CommandError::type_mismatch("each stage must be an object"))
        })
        .collect::<CommandResult<_>>()?;
    if stages
        .iter()
        .skip(1)
        .any(|s| s.contains_key("$changeStream"))
    {
        return Err(CommandError::new(
            40602,
            "$changeStream is only valid as the first stage in a pipeline",
        ));
    }
    let write_stage = write_stages::split(&mut stages, &ctx.db)?;
    if write_stage.is_some()
        && !ctx.in_transaction()
        && fields::read_concern_level(ctx.cmd) == Some("snapshot")
    {
        return Err(CommandError::new(
            codes::COMMAND_NOT_SUPPORTED,
            "$out/$merge with readConcern level snapshot is not supported by the simulator",
        ));
    }
    let (ns, reply_ns) = match ctx.cmd.get("aggregate") {
        Some(Bson::String(coll)) => {
            let ns = Namespace::new(ctx.db.clone(), coll.clone());
            (Some(ns.clone()), ns.to_string())
        }
        _ => (None, format!("{}.$cmd.aggregate", ctx.db)),
    };
    let now = bson::DateTime::now();
    let cluster_time = ctx.engine.cluster_time();
    let lets = lets::parse(
        "aggregate.let",
        ctx.cmd.get("let"),
        now,
        cluster_time,
        &lets::Lets::default(),
    )?;
    lets::check_pipeline(&stages, &lets)?;
    // Push a leading $match down to the scan so large collections are not copied whole.
    let (leading_match, rest) = match stages.first().and_then(|s| s.get_document("$match").ok()) {
        Some(m) => (
            Some(Matcher::new(m)?.with_lets(std::sync::Arc::clone(&lets))),
            &stages[1..],
        ),
        None => (None, &stages[..]),
    };
    let _collation = super::install_collation(ctx, ns.as_ref())?;
    let view_ctx = view_context(ctx);
    let input: Vec<Document> = ctx.read(|cat, _| {
        let Some(ns) = &ns else { return Ok(Vec::new()) };
        if let Some((base, _)) = views::resolve(cat, ns)? {
            fields::check_hint(cat.get(&base), ctx.cmd.get("hint"))?;
            return Ok(read_source(&view_ctx, cat, ns, leading_match.as_ref())?
                .into_iter()
                .map(Stored::unwrap_or_clone)
                .collect());
        }
        fields::check_hint(cat.get(ns), ctx.cmd.get("hint"))?;
        let Some(c) = cat.get(ns) else {
            return Ok(Vec::new());
        };
        Ok(c.docs
            .values()
            .filter(|d| leading_match.as_ref().is_none_or(|m| m.matches(d)))
            .map(|d| (**d).clone())
            .collect())
    })?;
    let out = run_pipeline(
        input,
        rest,
        &PipelineContext {
            now,
            cluster_time: Some(cluster_time),
            lets,
        },
    )?;
    if let Some(stage) = &write_stage {
        // The output went to the target: the cursor is empty.
        write_stages::run(ctx, stage, out)?;
        return cursor_reply(ctx, reply_ns, VecDeque::new(), None, 0, false);
    }
    let first_batch = ctx
        .cmd
        .get_document("cursor")
        .ok()
        .and_then(|c| int_arg(c, "batchSize").ok().flatten())
        .map(|b| b.max(0) as usize)
        .unwrap_or(DEFAULT_FIRST_BATCH);
    cursor_reply(
        ctx,
        reply_ns,
        out.into_iter().map(Stored::shared).collect(),
        None,
        first_batch,
        false,
    )
}

pub fn count(ctx: &Ctx<'_>) -> CommandResult<Document> {
    ctx.check_snapshot_support()?;
    let ns = coll_arg(ctx)?;
    let query = ctx.cmd.get_document("query").cloned().unwrap_or_default();
    let skip = int_arg(ctx.cmd, "skip")?.unwrap_or(0).max(0) as usize;
    let limit = int_arg(ctx.cmd, "limit")?.unwrap_or(0).unsigned_abs() as usize;
    lets::check_filter(&query, &[])?;
    let matcher = Matcher::new(&query)?;
    let _collation = super::install_collation(ctx, Some(&ns))?;
    let view_ctx = view_context(ctx);
    let n = ctx.read(|cat, _| {
        let total = if let Some((base, _)) = views::resolve(cat, &ns)? {
            fields::check_hint(cat.get(&base), ctx.cmd.get("hint"))?;
            read_source(&view_ctx, cat, &ns, Some(&matcher))?.len()
        } else if let Some(c) = cat.get(&ns) {
            fields::check_hint(Some(c), ctx.cmd.get("hint"))?;
            if query.is_empty() {
                c.len()
            } else {
                c.docs.values().filter(|d| matcher.matches(d)).count()
            }
        } else {
            fields::check_hint(None, ctx.cmd.get("hint"))?;
            0
        };
        let after_skip = total.saturating_sub(skip);
        Ok(if limit > 0 {
            after_skip.min(limit)
        } else {
            after_skip
        })
    })?;
    Ok(doc! {"n": n as i32})
}

pub fn distinct(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let key = ctx
        .cmd
        .get_str("key")
        .map_err(|_| CommandError::failed_to_parse("'key' must be a string"))?
        .to_string();
    let query = ctx.cmd.get_document("query").cloned().unwrap_or_default();
    lets::check_filter(&query, &[])?;
    let matcher = Matcher::new(&query)?;
    let _collation = super::install_collation(ctx, Some(&ns))?;
    let view_ctx = view_context(ctx);
    let mut values: Vec<Bson> = ctx.read(|cat, _| {
        let mut out = Vec::new();
        for d in read_source(&view_ctx, cat, &ns, Some(&matcher))? {
            out.extend(crate::store::values_at_path(&d, &key));
        }
        Ok(out)
    })?;
    values.sort_by(compare_values);
    values.dedup_by(|a, b| compare_values(a, b).is_eq());
    let mut reply = doc! {"values": values};
    if let Some(at) = *ctx.snapshot_read_at.lock() {
        reply.insert("atClusterTime", at);
    }
    Ok(reply)
}

/// `dbHash`: MD5 over the raw bytes of every document in `_id` order, per collection, and an
/// MD5 over the per-collection hex digests in name order.
pub fn db_hash(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let only: Option<Vec<String>> = ctx.cmd.get_array("collections").ok().map(|a| {
        a.iter()
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect()
    });
    ctx.read(|cat, _| {
        let mut collections = Document::new();
        let mut uuids = Document::new();
        let mut capped = Vec::new();
        let mut all = Md5::new();
        for c in cat.collections(&ctx.db) {
            if c.ns.is_system() || only.as_ref().is_some_and(|o| !o.contains(&c.ns.coll)) {
                continue;
            }
            let mut h = Md5::new();
            for d in c.docs.values() {
                h.update(
                    d.to_vec()
                        .map_err(|e| CommandError::new(codes::INTERNAL_ERROR, e.to_string()))?,
                );
            }
            let hex = hex_string(&h.finalize());
            all.update(hex.as_bytes());
            collections.insert(c.ns.coll.clone(), hex);
            uuids.insert(c.ns.coll.clone(), bson::Binary::from_uuid(c.uuid));
            if c.is_capped() {
                capped.push(c.ns.coll.clone());
            }
        }
        Ok(doc! {
            "host": ctx.engine.host.lock().clone(),
            "collections": collections,
            "capped": capped,
            "uuids": uuids,
            "md5": hex_string(&all.finalize()),
            "timeMillis": 0,
        })
    })
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn db_size(cat: &crate::store::Catalog, db: &str) -> i64 {
    cat.collections(db)
        .iter()
        .map(|c| {
            c.docs
                .values()
                .map(|d| crate::store::bson_size(d) as i64)
                .sum::<i64>()
        })
        .sum()
}

pub fn list_databases(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let name_only = ctx.cmd.get_bool("nameOnly").unwrap_or(false);
    let filter = ctx
        .cmd
        .get_document("filter")
        .ok()
        .map(Matcher::new)
        .transpose()?;
    ctx.read(|cat, _| {
        let mut dbs = Vec::new();
        let mut total = 0i64;
        // A real replica set always has these.
        let mut names: Vec<String> = vec!["admin".into(), "config".into(), "local".into()];
        names.extend(cat.dbs.keys().cloned());
        names.sort();
        names.dedup();
        for name in names {
            // Sizes touch every document: only compute them when the reply or filter needs them
            // (drivers' list_database_names sends nameOnly).
            let size = if name_only && filter.is_none() {
                0
            } else {
                db_size(cat, &name).max(if cat.dbs.contains_key(&name) {
                    4096
                } else {
                    8192
                })
            };
            let entry = if name_only {
                doc! {"name": name.clone()}
            } else {
                doc! {"name": name.clone(), "sizeOnDisk": size, "empty": false}
            };
            if filter.as_ref().is_some_and(|f| {
                !f.matches(&doc! {"name": name.clone(), "sizeOnDisk": size, "empty": false})
            }) {
                continue;
            }
            total += size;
            dbs.push(entry);
        }
        let mut reply = doc! {"databases": dbs};
        if !name_only {
            reply.insert("totalSize", total);
            reply.insert("totalSizeMb", total / (1024 * 1024));
        }
        Ok(reply)
    })
}

pub fn list_collections(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let filter = ctx
        .cmd
        .get_document("filter")
        .ok()
        .map(Matcher::new)
        .transpose()?;
    let name_only = ctx.cmd.get_bool("nameOnly").unwrap_or(false);
    let entries = ctx.read(|cat, _| {
        let mut entries: Vec<Document> = cat
            .collections(&ctx.db)
            .iter()
            .map(|c| c.list_entry())
            .collect();
        // A view: `options` as created, `info.readOnly: true`, no `uuid` and no `idIndex`.
        entries.extend(views::list(cat, &ctx.db).into_iter().map(|(name, def)| {
            doc! {"name": name, "type": "view", "options": def.options(), "info": {"readOnly": true}}
        }));
        entries.sort_by(|a, b| a.get_str("name").ok().cmp(&b.get_str("name").ok()));
        Ok(entries
            .into_iter()
            .filter(|e| filter.as_ref().is_none_or(|f| f.matches(e)))
            .map(|e| {
                if name_only {
                    doc! {"name": e.get("name").cloned().unwrap_or(Bson::Null), "type": e.get("type").cloned().unwrap_or(Bson::Null)}
                } else {
                    e
                }
            })
            .map(Stored::shared)
            .collect::<VecDeque<_>>())
    })?;
    let first = ctx
        .cmd
        .get_document("cursor")
        .ok()
        .and_then(|c| int_arg(c, "batchSize").ok().flatten())
        .map(|b| b as usize)
        .unwrap_or(usize::MAX);
    cursor_reply(
        ctx,
        format!("{}.$cmd.listCollections", ctx.db),
        entries,
        None,
        first,
        false,
    )
}

pub fn list_indexes(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let specs = ctx.read(|cat, _| {
        if views::is_view(cat, &ns) {
            return Err(views::not_a_collection(&ns));
        }
        let c = cat.get(&ns).ok_or_else(|| {
            CommandError::new(
                codes::NAMESPACE_NOT_FOUND,
                format!("ns does not exist: {ns}"),
            )
        })?;
        Ok(c.indexes
            .iter()
            .map(|i| Stored::shared(i.spec.clone()))
            .collect::<VecDeque<_>>())
    })?;
    let first = ctx
        .cmd
        .get_document("cursor")
        .ok()
        .and_then(|c| int_arg(c, "batchSize").ok().flatten())
        .map(|b| b.max(0) as usize)
        .unwrap_or(usize::MAX);
    cursor_reply(ctx, ns.to_string(), specs, None, first, false)
}

/// Nominal size of one oplog entry in `collStats` of `local.oplog.rs`: the simulator bounds
/// its oplog by entries (`--oplog-max-events`), MongoDB by bytes, so `size` and `maxSize` are
/// entries × this, which keeps what tools compute from them (how full the oplog is) exact.
pub const OPLOG_NOMINAL_ENTRY_BYTES: i64 = 128;

pub fn coll_stats(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    if ns.db == "local" && ns.coll == "oplog.rs" {
        return ctx.read(|_, data| {
            let count = data.oplog.len() as i64;
            let size = count * OPLOG_NOMINAL_ENTRY_BYTES;
            Ok(doc! {
                "ns": ns.to_string(), "count": count, "size": size,
                "avgObjSize": OPLOG_NOMINAL_ENTRY_BYTES, "storageSize": size,
                "nindexes": 0i32, "capped": true,
                "maxSize": data.oplog.capacity() as i64 * OPLOG_NOMINAL_ENTRY_BYTES,
            })
        });
    }
    ctx.read(|cat, _| {
        let c = cat.get(&ns).ok_or_else(|| {
            CommandError::new(
                codes::NAMESPACE_NOT_FOUND,
                format!("Collection [{ns}] not found."),
            )
        })?;
        let size: i64 = c
            .docs
            .values()
            .map(|d| crate::store::bson_size(d) as i64)
            .sum();
        let count = c.len() as i64;
        Ok(doc! {
            "ns": ns.to_string(), "count": count, "size": size,
            "avgObjSize": if count > 0 { size / count } else { 0 },
            "storageSize": size, "nindexes": c.indexes.len() as i32, "capped": c.is_capped(),
        })
    })
}

pub fn db_stats(ctx: &Ctx<'_>) -> CommandResult<Document> {
    ctx.read(|cat, _| {
        let colls = cat.collections(&ctx.db);
        let objects: i64 = colls.iter().map(|c| c.len() as i64).sum();
        let size = db_size(cat, &ctx.db);
        Ok(doc! {"db": ctx.db.clone(), "collections": colls.len() as i32, "objects": objects, "dataSize": size, "storageSize": size})
    })
}

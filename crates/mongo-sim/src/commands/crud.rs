//! `insert`, `update`, `delete`, `findAndModify`.

use bson::{doc, Bson, Document};

use super::{
    coll_arg, int_arg,
    lets::{self, Lets},
    Ctx,
};
use crate::{
    engine::{change_to_op, WriteSink},
    error::{codes, CommandError, CommandResult},
    oplog::OplogOp,
    query::{
        matcher::Matcher,
        projection::Projection,
        sort::SortSpec,
        update::{
            apply_update_with_outcome, build_upsert_document, prepare_for_insert,
            validate_stored_document, validate_updated_document, UpdateContext,
            UpdateOutcome as WriteOutcome, UpdateSpec,
        },
    },
    store::{Catalog, Collection, DocRef, Namespace},
    views,
};

/// The collection, created implicitly (with a `create` oplog entry) when missing.
pub fn ensure_collection<'c>(
    cat: &'c mut Catalog,
    sink: &mut dyn WriteSink,
    ns: &Namespace,
) -> CommandResult<&'c mut Collection> {
    if cat.get(ns).is_none() {
        if views::is_view(cat, ns) {
            return Err(views::not_a_collection(ns));
        }
        crate::store::check_names(ns)?;
        if matches!(ns.db.as_str(), "admin" | "local" | "config") && !ns.is_system() {
            // Real servers allow some of these; the simulator keeps them read-only and empty.
            return Err(CommandError::new(
                codes::INVALID_NAMESPACE,
                format!("cannot write to '{ns}' in the simulator"),
            ));
        }
        let coll = Collection::new(ns.clone(), Document::new())?;
        sink.emit(
            OplogOp::Create {
                ns: ns.clone().into(),
                uuid: coll.uuid,
                options: Box::default(),
            },
            false,
        );
        cat.insert(coll);
    }
    Ok(cat.get_mut(ns).expect("just ensured"))
}

fn write_error(index: usize, e: &CommandError) -> Bson {
    let mut d = doc! {"index": index as i32, "code": e.code, "errmsg": e.message.clone()};
    if let Some(extra) = &e.extra {
        for (k, v) in extra.iter() {
            d.insert(k.clone(), v.clone());
        }
    }
    Bson::Document(d)
}

fn bypass(ctx: &Ctx<'_>) -> bool {
    ctx.cmd
        .get_bool("bypassDocumentValidation")
        .unwrap_or(false)
}

/// Deletes the oldest documents of a capped collection that exceed its limits.
pub(super) fn enforce_capped(coll: &mut Collection, sink: &mut dyn WriteSink) {
    for id in coll.capped_overflow() {
        if let Some(change) = coll.delete(&id) {
            let images = coll.pre_and_post_images();
            sink.emit(change_to_op(coll, change), images);
        }
    }
}

pub(super) fn emit(coll: &Collection, sink: &mut dyn WriteSink, change: crate::store::DocChange) {
    let images = coll.pre_and_post_images();
    sink.emit(change_to_op(coll, change), images);
}

/// `prepare_for_insert` without a copy in the common case (drivers put `_id` first and send
/// no empty timestamps to fill in).
fn prepare_owned(d: Document, now_ts: bson::Timestamp) -> CommandResult<Document> {
    let id_first = d.keys().next().map(String::as_str) == Some("_id");
    let empty_ts = d
        .values()
        .any(|v| matches!(v, Bson::Timestamp(t) if t.time == 0 && t.increment == 0));
    if id_first && !empty_ts {
        validate_stored_document(&d)?;
        Ok(d)
    } else {
        prepare_for_insert(&d, now_ts)
    }
}

/// A required array argument, borrowed from the command (no copy of large batches).
fn array_arg<'c>(ctx: &Ctx<'c>, key: &str) -> CommandResult<&'c [Bson]> {
    match ctx.cmd.get(key) {
        Some(Bson::Array(a)) => Ok(a),
        Some(_) => Err(CommandError::type_mismatch(format!(
            "'{key}' must be an array"
        ))),
        None => Err(CommandError::failed_to_parse(format!(
            "BSON field '{}.{key}' is missing but a required field",
            ctx.name
        ))),
    }
}

/// Whether a batch stops at its first write error: `ordered` batches do, and in a
/// transaction every batch does (the error aborts the transaction).
fn stops_at_first_error(ctx: &Ctx<'_>) -> bool {
    ctx.cmd.get_bool("ordered").unwrap_or(true) || ctx.in_transaction()
}

/// Adds `writeErrors` to a write reply. In a transaction the batch stopped at its one error,
/// which MongoDB reports the same way (`ok: 1`, `n` = the writes before it, no error label)
/// and which aborts the transaction: its next statement and its commit answer
/// NoSuchTransaction (jstests `core/txns/transactions_write_errors.js`). Transient errors
/// (WriteConflict) are top-level command errors instead, from [`Ctx::write`].
fn finish_write(
    ctx: &Ctx<'_>,
    mut reply: Document,
    errors: Vec<(usize, CommandError)>,
) -> CommandResult<Document> {
    if !errors.is_empty() {
        if ctx.in_transaction() {
            ctx.abort_transaction_after_error();
        }
        reply.insert(
            "writeErrors",
            errors
                .iter()
                .map(|(i, e)| write_error(*i, e))
                .collect::<Vec<_>>(),
        );
    }
    Ok(reply)
}

pub fn insert(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let docs = match ctx.documents.lock().take() {
        Some(docs) => docs,
        None => array_arg(ctx, "documents")?.to_vec(),
    };
    let ordered = stops_at_first_error(ctx);
    let bypass = bypass(ctx);
    let (n, errors) = ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            return Ok((0, view_write_errors(&ns, docs.len(), ordered)));
        }
        let coll = ensure_collection(cat, sink, &ns)?;
        let mut n = 0i32;
        let mut errors = Vec::new();
        for (i, d) in docs.into_iter().enumerate() {
            let result = match d {
                Bson::Document(d) => {
                    prepare_owned(d, sink.now_ts()).and_then(|d| coll.insert(d, bypass))
                }
                _ => Err(CommandError::type_mismatch(
                    "documents to insert must be objects",
                )),
            };
            match result {
                Ok(change) => {
                    emit(coll, sink, change);
                    enforce_capped(coll, sink);
                    n += 1;
                }
                Err(e) => {
                    errors.push((i, e));
                    if ordered {
                        break;
                    }
                }
            }
        }
        Ok((n, errors))
    })?;
    finish_write(ctx, doc! {"n": n}, errors)
}

/// A write to a view fails statement by statement (the first only when ordered).
fn view_write_errors(
    ns: &Namespace,
    statements: usize,
    ordered: bool,
) -> Vec<(usize, CommandError)> {
    let n = if ordered {
        statements.min(1)
    } else {
        statements
    };
    (0..n).map(|i| (i, views::not_a_collection(ns))).collect()
}

/// `_id`s of the documents matching a filter, in `_id` order (at most `limit`).
pub fn matching(coll: &Collection, matcher: &Matcher, limit: Option<usize>) -> Vec<DocRef> {
    // The `_id` lookup finds what the collection's collation calls equal: only right when the
    // query runs under that same collation.
    let same_collation = crate::collation::same(
        crate::collation::current().as_ref(),
        coll.collation.as_ref(),
    );
    if let Some(id) = matcher.id_equality().filter(|_| same_collation) {
        return coll
            .get(id)
            .filter(|d| matcher.matches(d))
            .cloned()
            .into_iter()
            .collect();
    }
    let mut out = Vec::new();
    for (_, d) in coll.docs.iter() {
        if matcher.matches(d) {
            out.push(std::sync::Arc::clone(d));
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
        }
    }
    out
}

pub(super) fn update_context(
    sink: &dyn WriteSink,
    upsert_insert: bool,
    array_filters: Vec<Document>,
    lets: &Lets,
) -> UpdateContext {
    UpdateContext {
        is_upsert_insert: upsert_insert,
        now: bson::DateTime::now(),
        now_ts: sink.now_ts(),
        array_filters,
        lets: std::sync::Arc::clone(lets),
    }
}

/// The command's `let`, evaluated once for the whole command.
fn command_lets(ctx: &Ctx<'_>, field: &str) -> CommandResult<Lets> {
    lets::parse(
        field,
        ctx.cmd.get("let"),
        bson::DateTime::now(),
        ctx.engine.cluster_time(),
        &Lets::default(),
    )
}

/// Parse-time checks of an update: undefined variables (17276) in its pipeline and array
/// filters.
fn check_update_variables(
    spec: &UpdateSpec,
    array_filters: &[Document],
    lets: &Lets,
) -> CommandResult<()> {
    if let UpdateSpec::Pipeline(stages) = spec {
        lets::check_pipeline(stages, lets)?;
    }
    for f in array_filters {
        lets::check_filter(f, lets)?;
    }
    Ok(())
}

/// The document an upsert inserts.
fn upsert_document(
    query: &Document,
    spec: &UpdateSpec,
    sink: &dyn WriteSink,
    array_filters: Vec<Document>,
    lets: &Lets,
) -> CommandResult<Document> {
    let new = build_upsert_document(
        query,
        spec,
        &update_context(sink, true, array_filters, lets),
    )?;
    prepare_for_insert(&new, sink.now_ts())
}

struct UpdateOutcome {
    matched: i64,
    modified: i64,
    upserted: Option<Bson>,
}

/// A replacement by `_id` equality (`{q: {_id: X}, u: {...}, upsert}`), the statement copy and
/// apply tools send: the same result as the general path without its copies (parse, replace,
/// `_id` first, insert preparation): the replacement document is moved out of the statement
/// and stored as it came when it already starts with its `_id`. `None` when the statement is
/// not of that exact shape (the general path then handles it, errors included; the statement
/// is then untouched).
fn replace_by_id(
    coll_ns: &Namespace,
    cat: &mut Catalog,
    sink: &mut dyn WriteSink,
    stmt: &mut Document,
    bypass: bool,
) -> CommandResult<Option<UpdateOutcome>> {
    let (Some(Bson::Document(q)), Some(Bson::Document(r))) = (stmt.get("q"), stmt.get("u")) else {
        return Ok(None);
    };
    let Some(id) = q.get("_id").filter(|_| q.len() == 1) else {
        return Ok(None);
    };
    let plain_stmt = stmt
        .keys()
        .all(|k| matches!(k.as_str(), "q" | "u" | "upsert" | "multi"))
        && !stmt.get_bool("multi").unwrap_or(false);
    let replacement = r.keys().next().is_some_and(|k| !k.starts_with('$'));
    if !plain_id(id) || !plain_stmt || !replacement {
        return Ok(None);
    }
    let upsert = stmt.get_bool("upsert").unwrap_or(false);
    let id = id.clone();
    let Some(Bson::Document(slot)) = stmt.get_mut("u") else {
        unreachable!("checked above");
    };
    match replace_by_id_with(
        coll_ns,
        cat,
        sink,
        &id,
        upsert,
        std::mem::take(slot),
        bypass,
    )? {
        Ok(outcome) => Ok(Some(outcome)),
        Err(r) => {
            // The general path's case: the statement as it came.
            *slot = r;
            Ok(None)
        }
    }
}

/// An `_id` a replacement by `_id` can look up directly (the general path handles the
/// others: documents, arrays and regular expressions match differently, null matches a missing
/// `_id`, …).
fn plain_id(id: &Bson) -> bool {
    !matches!(
        id,
        Bson::Document(_)
            | Bson::Array(_)
            | Bson::RegularExpression(_)
            | Bson::Undefined
            | Bson::Null
            | Bson::Timestamp(_)
    )
}

/// [`replace_by_id`] of a statement kept raw ([`crate::wire::RawBatch`]) and converted as a
/// [`crate::wire::ReplaceById`] when the message was decoded. `None` when the general path must
/// answer (an `_id` that is not looked up directly, a replacement that changes `_id`).
fn raw_replace_by_id(
    coll_ns: &Namespace,
    cat: &mut Catalog,
    sink: &mut dyn WriteSink,
    stmt: Box<crate::wire::ReplaceById>,
    bypass: bool,
) -> CommandResult<Option<UpdateOutcome>> {
    if !plain_id(&stmt.id) {
        return Ok(None);
    }
    let crate::wire::ReplaceById {
        id,
        replacement: r,
        upsert,
    } = *stmt;
    Ok(replace_by_id_with(coll_ns, cat, sink, &id, upsert, r, bypass)?.ok())
}

/// The replacement by `_id` of [`replace_by_id`] with the replacement `r` in hand; gives `r`
/// back when the general path must answer (a replacement that changes `_id`).
fn replace_by_id_with(
    coll_ns: &Namespace,
    cat: &mut Catalog,
    sink: &mut dyn WriteSink,
    id: &Bson,
    upsert: bool,
    r: Document,
    bypass: bool,
) -> CommandResult<Result<UpdateOutcome, Document>> {
    let now_ts = sink.now_ts();
    const NOT_FOUND: UpdateOutcome = UpdateOutcome {
        matched: 0,
        modified: 0,
        upserted: None,
    };
    // One lookup of the collection and of the document; an upsert that inserts reuses the
    // key it was not found under.
    let Some(coll) = cat.get_mut(coll_ns) else {
        if !upsert {
            return Ok(Ok(NOT_FOUND));
        }
        let new = match upserted_document(id, r, now_ts)? {
            Ok(new) => new,
            Err(r) => return Ok(Err(r)),
        };
        let coll = ensure_collection(cat, sink, coll_ns)?;
        let change = coll.insert(new, bypass)?;
        emit(coll, sink, change);
        enforce_capped(coll, sink);
        return Ok(Ok(UpdateOutcome {
            matched: 0,
            modified: 0,
            upserted: Some(id.clone()),
        }));
    };
    let key = coll.id_key(id);
    let Some(old) = coll.docs.get(&key).cloned() else {
        if !upsert {
            return Ok(Ok(NOT_FOUND));
        }
        let new = match upserted_document(id, r, now_ts)? {
            Ok(new) => new,
            Err(r) => return Ok(Err(r)),
        };
        let change = coll.insert_absent(new, key, bypass)?;
        emit(coll, sink, change);
        enforce_capped(coll, sink);
        return Ok(Ok(UpdateOutcome {
            matched: 0,
            modified: 0,
            upserted: Some(id.clone()),
        }));
    };
    // Stored documents and most replacements start with their `_id` (no hash lookup then).
    let old_id = first_id(&old).unwrap_or(id);
    let rid = first_id(&r);
    if rid.is_some_and(|rid| rid != old_id) {
        return Ok(Err(r));
    }
    let replacement_has_id = rid.is_some();
    // The stored `_id` (first when the replacement has none), then the replacement's fields.
    let new = if replacement_has_id {
        let mut new = r;
        for (_, v) in new.iter_mut() {
            fill_empty_timestamp(v, now_ts);
        }
        new
    } else {
        let mut new = Document::new();
        new.insert("_id", old_id.clone());
        for (k, mut v) in r {
            fill_empty_timestamp(&mut v, now_ts);
            new.insert(k, v);
        }
        new
    };
    validate_updated_document(&new, false)?;
    if crate::query::compare::documents_binary_equal(&old, &new) {
        return Ok(Ok(UpdateOutcome {
            matched: 1,
            modified: 0,
            upserted: None,
        }));
    }
    // The key the general path stores under is the new `_id`'s: the lookup's when the
    // filter's `_id` is the stored one (not merely equal to it, as `5` and `5L` are).
    let key = if id == old_id {
        key
    } else {
        coll.id_key(old_id)
    };
    let change = coll.replace_found(key, old, new, None, bypass)?;
    emit(coll, sink, change);
    Ok(Ok(UpdateOutcome {
        matched: 1,
        modified: 1,
        upserted: None,
    }))
}

/// The document a replacement upsert by `_id` inserts (`_id` first, then the replacement's
/// other fields), validated as an insert; `Err(r)` (the replacement given back) when the
/// replacement's own `_id` differs from the filter's, which the general path answers.
fn upserted_document(
    id: &Bson,
    r: Document,
    now_ts: bson::Timestamp,
) -> CommandResult<Result<Document, Document>> {
    // The replacement's `_id`: its first field when drivers put it there (no lookup).
    let id_first = r.keys().next().is_some_and(|k| k == "_id");
    let rid = if id_first {
        r.values().next()
    } else {
        r.get("_id")
    };
    if rid.is_some_and(|rid| rid != id) {
        return Ok(Err(r));
    }
    // `_id` first, then the replacement's other fields: the replacement itself when it
    // starts with `_id` (whose value becomes the filter's, as the general path stores).
    let new = if id_first {
        let mut new = r;
        for (k, v) in new.iter_mut() {
            if k == "_id" {
                *v = id.clone();
            } else {
                fill_empty_timestamp(v, now_ts);
            }
        }
        new
    } else {
        let mut new = Document::new();
        new.insert("_id", id.clone());
        for (k, mut v) in r {
            if k != "_id" {
                fill_empty_timestamp(&mut v, now_ts);
                new.insert(k, v);
            }
        }
        new
    };
    // The document an upsert inserts is validated as an insert.
    validate_updated_document(&new, true)?;
    validate_stored_document(&new)?;
    Ok(Ok(new))
}

/// The `_id` of `d`: its first field when that is `_id` (as stored documents and drivers'
/// documents have it), else found by name.
fn first_id(d: &Document) -> Option<&Bson> {
    match d.iter().next() {
        Some((k, v)) if k == "_id" => Some(v),
        Some(_) => d.get("_id"),
        None => None,
    }
}

/// A top-level empty timestamp (`Timestamp(0, 0)`) of a stored document becomes the write's
/// cluster time, as the server fills it in.
fn fill_empty_timestamp(v: &mut Bson, now_ts: bson::Timestamp) {
    if matches!(v, Bson::Timestamp(t) if t.time == 0 && t.increment == 0) {
        *v = Bson::Timestamp(now_ts);
    }
}

fn apply_one_update(
    coll_ns: &Namespace,
    cat: &mut Catalog,
    sink: &mut dyn WriteSink,
    stmt: &mut Document,
    bypass: bool,
    lets: &Lets,
) -> CommandResult<UpdateOutcome> {
    if let Some(outcome) = replace_by_id(coll_ns, cat, sink, stmt, bypass)? {
        return Ok(outcome);
    }
    let stmt: &Document = stmt;
    let q = match stmt.get("q") {
        Some(Bson::Document(q)) => q.clone(),
        None => Document::new(),
        Some(_) => return Err(CommandError::type_mismatch("'q' must be an object")),
    };
    let u = stmt.get("u").ok_or_else(|| {
        CommandError::failed_to_parse(
            "BSON field 'update.updates.u' is missing but a required field",
        )
    })?;
    let spec = UpdateSpec::parse(u)?;
    let multi = stmt.get_bool("multi").unwrap_or(false);
    let upsert = stmt.get_bool("upsert").unwrap_or(false);
    let array_filters: Vec<Document> = stmt
        .get_array("arrayFilters")
        .map(|a| a.iter().filter_map(|f| f.as_document().cloned()).collect())
        .unwrap_or_default();
    if multi && matches!(spec, UpdateSpec::Replacement(_)) {
        return Err(CommandError::failed_to_parse(
            "multi update is not supported for replacement-style update",
        ));
    }
    // Constants `c` are variables of a pipeline update only; the filter sees `let` alone.
    if stmt.contains_key("c") && !matches!(spec, UpdateSpec::Pipeline(_)) {
        return Err(CommandError::new(
            51198,
            "Constant values may only be specified for pipeline updates",
        ));
    }
    let update_lets = lets::parse(
        "update.updates.c",
        stmt.get("c"),
        bson::DateTime::now(),
        sink.now_ts(),
        lets,
    )?;
    check_update_variables(&spec, &array_filters, &update_lets)?;
    lets::check_filter(&q, lets)?;
    let matcher = Matcher::new(&q)?.with_lets(std::sync::Arc::clone(lets));
    super::fields::check_hint(cat.get(coll_ns), stmt.get("hint"))?;
    let _collation = crate::collation::install(crate::collation::effective(
        stmt.get("collation"),
        cat.get(coll_ns).and_then(|c| c.collation.as_ref()),
    )?);
    let targets = match cat.get(coll_ns) {
        Some(c) => matching(c, &matcher, if multi { None } else { Some(1) }),
        None => Vec::new(),
    };
    let mut out = UpdateOutcome {
        matched: 0,
        modified: 0,
        upserted: None,
    };
    if targets.is_empty() {
        if upsert {
            let new = upsert_document(&q, &spec, sink, array_filters, &update_lets)?;
            let id = new.get("_id").cloned().unwrap_or(Bson::Null);
            let coll = ensure_collection(cat, sink, coll_ns)?;
            let change = coll.insert(new, bypass)?;
            emit(coll, sink, change);
            enforce_capped(coll, sink);
            out.upserted = Some(id);
        }
        return Ok(out);
    }
    let coll = cat.get_mut(coll_ns).expect("targets came from it");
    for old in targets {
        let ctx = update_context(sink, false, array_filters.clone(), &update_lets);
        let (new, outcome) = apply_update_with_outcome(&old, &spec, &ctx)?;
        out.matched += 1;
        let description = match outcome {
            WriteOutcome::NoOp => continue,
            WriteOutcome::Delta(d) => Some(d),
            WriteOutcome::Replacement => None,
        };
        // A replacement may not store top-level `$`-prefixed fields (a pipeline may; an
        // operator update was checked on the fields it touched).
        validate_updated_document(&new, !matches!(spec, UpdateSpec::Replacement(_)))?;
        let change = coll.replace(new, description, bypass)?;
        emit(coll, sink, change);
        out.modified += 1;
    }
    Ok(out)
}

/// One statement of an `update`: kept raw by the wire decoding (with its replacement by `_id`
/// when it has that shape), or a value of `updates`.
enum Statement<'a> {
    Raw(&'a bson::RawDocument, Option<Box<crate::wire::ReplaceById>>),
    Value(Bson),
}

pub fn update(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let mut raw = ctx.raw_updates.lock().take();
    let updates: Vec<Statement<'_>> = match (&mut raw, ctx.documents.lock().take()) {
        (Some(batch), _) => {
            let replacements = batch.take_replacements();
            replacements
                .into_iter()
                .enumerate()
                .map(|(i, r)| Statement::Raw(batch.get(i), r))
                .collect()
        }
        (None, Some(updates)) => updates.into_iter().map(Statement::Value).collect(),
        (None, None) => array_arg(ctx, "updates")?
            .iter()
            .cloned()
            .map(Statement::Value)
            .collect(),
    };
    let ordered = stops_at_first_error(ctx);
    let bypass = bypass(ctx);
    let lets = command_lets(ctx, "update.let")?;
    // A retryable write's (or a transaction's) reply is kept, for a retry to replay: a
    // document. Any other is only sent.
    let encoded = ctx.session.as_ref().is_none_or(|s| s.txn_number.is_none());
    let (n, modified, upserted, errors) = ctx.write(|cat, sink| {
        let mut n = 0i64;
        let mut modified = 0i64;
        let mut upserted = Upserted::new(encoded);
        if views::is_view(cat, &ns) {
            let errors = view_write_errors(&ns, updates.len(), ordered);
            return Ok((n, modified, upserted, errors));
        }
        let mut errors = Vec::new();
        let updates_len = updates.len();
        for (i, stmt) in updates.into_iter().enumerate() {
            let result = match stmt {
                Statement::Raw(raw, replacement) => match replacement
                    .map(|r| raw_replace_by_id(&ns, cat, sink, r, bypass))
                    .transpose()
                    .map(Option::flatten)
                {
                    Ok(Some(outcome)) => Ok(outcome),
                    Ok(None) => crate::wire::raw_to_document(raw)
                        .map_err(|e| CommandError::failed_to_parse(e.to_string()))
                        .and_then(|mut stmt| {
                            apply_one_update(&ns, cat, sink, &mut stmt, bypass, &lets)
                        }),
                    Err(e) => Err(e),
                },
                Statement::Value(Bson::Document(mut stmt)) => {
                    apply_one_update(&ns, cat, sink, &mut stmt, bypass, &lets)
                }
                _ => Err(CommandError::type_mismatch(
                    "update statements must be objects",
                )),
            };
            match result {
                Ok(o) => {
                    n += o.matched;
                    modified += o.modified;
                    if let Some(id) = o.upserted {
                        n += 1;
                        if upserted.is_empty() {
                            // Statements that upsert usually come in batches of them.
                            upserted.reserve(updates_len - i);
                        }
                        upserted.push(i as i32, id);
                    }
                }
                Err(e) => {
                    errors.push((i, e));
                    if ordered {
                        break;
                    }
                }
            }
        }
        Ok((n, modified, upserted, errors))
    })?;
    let mut reply = doc! {"n": n as i32, "nModified": modified as i32};
    if let Some(array) = upserted.into_reply(&mut reply) {
        *ctx.encoded_array.lock() = Some(("upserted", array));
    }
    finish_write(ctx, reply, errors)
}

/// The `upserted` entries (`{index, _id}`) of an `update` reply, as they come.
///
/// Encoded as BSON right away when the reply is only sent: a `Document` per entry (an index
/// map and its two keys, to build, encode and free) cost an upsert that inserts more than
/// anything else it does besides the insert. Documents when the reply is kept (retryable
/// writes, transactions) or an `_id` cannot be encoded field by field.
enum Upserted {
    Encoded {
        /// The array so far: its length placeholder, then its elements.
        bytes: Vec<u8>,
        key: crate::store::ArrayKey,
        len: usize,
    },
    Documents(Vec<Bson>),
}

/// Encoded size of an entry with an `_id` of 8 bytes: what batches of upserts reserve.
const UPSERTED_ENTRY_SIZE: usize = 32;

impl Upserted {
    fn new(encoded: bool) -> Self {
        if encoded {
            Upserted::Encoded {
                bytes: vec![0; 4],
                key: crate::store::ArrayKey::default(),
                len: 0,
            }
        } else {
            Upserted::Documents(Vec::new())
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Upserted::Encoded { len, .. } => *len == 0,
            Upserted::Documents(docs) => docs.is_empty(),
        }
    }

    fn reserve(&mut self, entries: usize) {
        match self {
            Upserted::Encoded { bytes, .. } => bytes.reserve(entries * UPSERTED_ENTRY_SIZE),
            Upserted::Documents(docs) => docs.reserve(entries),
        }
    }

    fn push(&mut self, index: i32, id: Bson) {
        let Upserted::Encoded { bytes, key, len } = self else {
            let Upserted::Documents(docs) = self else {
                unreachable!()
            };
            docs.push(Bson::Document(doc! {"index": index, "_id": id}));
            return;
        };
        let start = bytes.len();
        bytes.push(bson::spec::ElementType::EmbeddedDocument as u8);
        bytes.extend_from_slice(key.as_str().as_bytes());
        bytes.push(0);
        let doc_start = bytes.len();
        bytes.extend_from_slice(&[0; 4]);
        bytes.push(bson::spec::ElementType::Int32 as u8);
        bytes.extend_from_slice(b"index\0");
        bytes.extend_from_slice(&index.to_le_bytes());
        if crate::store::encode_element("_id", &id, bytes).is_none() {
            bytes.truncate(start);
            let mut docs = match self.finish() {
                Some(Bson::Array(docs)) => docs,
                _ => Vec::new(),
            };
            docs.push(Bson::Document(doc! {"index": index, "_id": id}));
            *self = Upserted::Documents(docs);
            return;
        }
        bytes.push(0);
        let doc_len = (bytes.len() - doc_start) as i32;
        bytes[doc_start..doc_start + 4].copy_from_slice(&doc_len.to_le_bytes());
        key.increment();
        *len += 1;
    }

    /// The entries so far as an array (`None` when there are none).
    fn finish(&mut self) -> Option<Bson> {
        match std::mem::replace(self, Upserted::Documents(Vec::new())) {
            Upserted::Documents(docs) if docs.is_empty() => None,
            Upserted::Documents(docs) => Some(Bson::Array(docs)),
            Upserted::Encoded { len: 0, .. } => None,
            Upserted::Encoded { bytes, .. } => {
                Some(crate::wire::array_from_bytes(&encoded_array(bytes)))
            }
        }
    }

    /// Adds `upserted` to `reply` when there are entries: the array itself, or (encoded) a
    /// placeholder and the array's bytes to send in its place.
    fn into_reply(self, reply: &mut Document) -> Option<Vec<u8>> {
        match self {
            Upserted::Encoded { len: 0, .. } => None,
            Upserted::Encoded { bytes, .. } => {
                reply.insert("upserted", Bson::Array(Vec::new()));
                Some(encoded_array(bytes))
            }
            Upserted::Documents(docs) => {
                if !docs.is_empty() {
                    reply.insert("upserted", docs);
                }
                None
            }
        }
    }
}

/// An array's elements (after a 4-byte length placeholder) completed as its BSON bytes.
fn encoded_array(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.push(0);
    let len = bytes.len() as i32;
    bytes[..4].copy_from_slice(&len.to_le_bytes());
    bytes
}

pub fn delete(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let deletes = array_arg(ctx, "deletes")?;
    let ordered = stops_at_first_error(ctx);
    let lets = command_lets(ctx, "delete.let")?;
    let (n, errors) = ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            return Ok((0, view_write_errors(&ns, deletes.len(), ordered)));
        }
        let mut n = 0i32;
        let mut errors = Vec::new();
        for (i, stmt) in deletes.iter().enumerate() {
            let result = (|| -> CommandResult<i32> {
                let stmt = stmt.as_document().ok_or_else(|| {
                    CommandError::type_mismatch("delete statements must be objects")
                })?;
                let q = stmt.get_document("q").cloned().unwrap_or_default();
                let limit = int_arg(stmt, "limit")?.unwrap_or(0);
                if limit != 0 && limit != 1 {
                    return Err(CommandError::failed_to_parse(
                        "The limit field in delete objects must be 0 or 1",
                    ));
                }
                lets::check_filter(&q, &lets)?;
                let matcher = Matcher::new(&q)?.with_lets(std::sync::Arc::clone(&lets));
                super::fields::check_hint(cat.get(&ns), stmt.get("hint"))?;
                let _collation = crate::collation::install(crate::collation::effective(
                    stmt.get("collation"),
                    cat.get(&ns).and_then(|c| c.collation.as_ref()),
                )?);
                let Some(coll) = cat.get_mut(&ns) else {
                    return Ok(0);
                };
                let targets = matching(coll, &matcher, if limit == 1 { Some(1) } else { None });
                let mut count = 0;
                for d in targets {
                    if let Some(change) = coll.delete(d.get("_id").unwrap_or(&Bson::Null)) {
                        emit(coll, sink, change);
                        count += 1;
                    }
                }
                Ok(count)
            })();
            match result {
                Ok(c) => n += c,
                Err(e) => {
                    errors.push((i, e));
                    if ordered {
                        break;
                    }
                }
            }
        }
        Ok((n, errors))
    })?;
    finish_write(ctx, doc! {"n": n}, errors)
}

pub fn find_and_modify(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let cmd = ctx.cmd;
    let query = cmd.get_document("query").cloned().unwrap_or_default();
    let sort = cmd
        .get_document("sort")
        .ok()
        .map(SortSpec::new)
        .transpose()?;
    let remove = cmd.get_bool("remove").unwrap_or(false);
    let return_new = cmd.get_bool("new").unwrap_or(false);
    let upsert = cmd.get_bool("upsert").unwrap_or(false);
    let lets = command_lets(ctx, "findAndModify.let")?;
    let fields = match cmd.get_document("fields") {
        Ok(p) => {
            lets::check_projection(p, &lets)?;
            Some(Projection::new(p)?.with_lets(std::sync::Arc::clone(&lets)))
        }
        Err(_) => None,
    };
    let bypass = bypass(ctx);
    let spec = match (remove, cmd.get("update")) {
        (true, Some(_)) => {
            return Err(CommandError::failed_to_parse(
                "Cannot specify both an update and remove=true",
            ))
        }
        (true, None) => None,
        (false, Some(u)) => Some(UpdateSpec::parse(u)?),
        (false, None) => {
            return Err(CommandError::failed_to_parse(
                "Either an update or remove=true must be specified",
            ))
        }
    };
    if remove && (upsert || return_new) {
        return Err(CommandError::failed_to_parse(
            "Cannot specify both upsert=true and remove=true",
        ));
    }
    let array_filters: Vec<Document> = cmd
        .get_array("arrayFilters")
        .map(|a| a.iter().filter_map(|f| f.as_document().cloned()).collect())
        .unwrap_or_default();
    if let Some(spec) = &spec {
        check_update_variables(spec, &array_filters, &lets)?;
    }
    lets::check_filter(&query, &lets)?;
    let matcher = Matcher::new(&query)?.with_lets(std::sync::Arc::clone(&lets));
    let (last_error, value) = ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            return Err(views::not_a_collection(&ns));
        }
        super::fields::check_hint(cat.get(&ns), cmd.get("hint"))?;
        let _collation = crate::collation::install(crate::collation::effective(
            cmd.get("collation"),
            cat.get(&ns).and_then(|c| c.collation.as_ref()),
        )?);
        let target = match cat.get(&ns) {
            Some(c) => {
                let mut all = matching(c, &matcher, if sort.is_some() { None } else { Some(1) });
                if let Some(s) = &sort {
                    all.sort_by(|a, b| s.compare(a, b));
                }
                all.into_iter().next()
            }
            None => None,
        };
        match (target, &spec) {
            (Some(old), None) => {
                let coll = cat.get_mut(&ns).expect("target came from it");
                if let Some(change) = coll.delete(old.get("_id").unwrap_or(&Bson::Null)) {
                    emit(coll, sink, change);
                }
                Ok((doc! {"n": 1}, Some((*old).clone())))
            }
            (Some(old), Some(spec)) => {
                let (new, outcome) = apply_update_with_outcome(
                    &old,
                    spec,
                    &update_context(sink, false, array_filters.clone(), &lets),
                )?;
                let coll = cat.get_mut(&ns).expect("target came from it");
                let description = match outcome {
                    WriteOutcome::NoOp => None,
                    WriteOutcome::Delta(d) => Some(Some(d)),
                    WriteOutcome::Replacement => Some(None),
                };
                if let Some(description) = description {
                    // A replacement may not store top-level `$`-prefixed fields (a pipeline
                    // may; an operator update was checked on the fields it touched).
                    validate_updated_document(&new, !matches!(spec, UpdateSpec::Replacement(_)))?;
                    let change = coll.replace(new.clone(), description, bypass)?;
                    emit(coll, sink, change);
                }
                let stored = new;
                let value = if return_new { stored } else { (*old).clone() };
                Ok((doc! {"n": 1, "updatedExisting": true}, Some(value)))
            }
            (None, Some(spec)) if upsert => {
                let new = upsert_document(&query, spec, sink, array_filters.clone(), &lets)?;
                let id = new.get("_id").cloned().unwrap_or(Bson::Null);
                let coll = ensure_collection(cat, sink, &ns)?;
                let change = coll.insert(new.clone(), bypass)?;
                emit(coll, sink, change);
                enforce_capped(coll, sink);
                Ok((
                    doc! {"n": 1, "updatedExisting": false, "upserted": id},
                    if return_new { Some(new) } else { None },
                ))
            }
            (None, Some(_)) => Ok((doc! {"n": 0, "updatedExisting": false}, None)),
            (None, None) => Ok((doc! {"n": 0}, None)),
        }
    })?;
    let value = match (value, &fields) {
        (Some(v), Some(p)) => Bson::Document(p.apply(&v)?),
        (Some(v), None) => Bson::Document(v),
        (None, _) => Bson::Null,
    };
    Ok(doc! {"lastErrorObject": last_error, "value": value})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DBPointer (not encodable field by field: the entries fall back to documents).
    fn db_pointer() -> Bson {
        let mut raw = Vec::new();
        raw.extend_from_slice(&[0; 4]);
        raw.push(0x0C);
        raw.extend_from_slice(b"p\0");
        raw.extend_from_slice(&3i32.to_le_bytes());
        raw.extend_from_slice(b"db\0");
        raw.extend_from_slice(&[7; 12]);
        raw.push(0);
        let len = raw.len() as i32;
        raw[..4].copy_from_slice(&len.to_le_bytes());
        let doc = bson::RawDocument::from_bytes(&raw).unwrap();
        crate::wire::raw_to_bson(doc.get("p").unwrap().unwrap()).unwrap()
    }

    /// The reply `update` answers with these `upserted` entries, as it is sent.
    fn sent(entries: &[(i32, Bson)], encoded: bool) -> Vec<u8> {
        let mut upserted = Upserted::new(encoded);
        upserted.reserve(entries.len());
        for (i, id) in entries {
            upserted.push(*i, id.clone());
        }
        let mut reply = doc! {"n": 3, "nModified": 0};
        let array = upserted.into_reply(&mut reply);
        reply.insert("ok", 1.0);
        match array {
            Some(array) => {
                crate::wire::encode_op_msg_reply_with_array(1, 2, &reply, "upserted", &array)
            }
            None => crate::wire::encode_op_msg_reply(1, 2, &reply),
        }
    }

    #[test]
    fn encoded_upserted_entries_are_the_documents() {
        let mut entries: Vec<(i32, Bson)> = vec![
            (0, Bson::Int64(5)),
            (2, Bson::String("é".into())),
            (3, Bson::Document(doc! {"a": [1, {"b": 2}]})),
            (7, Bson::ObjectId(bson::oid::ObjectId::new())),
            (8, Bson::Null),
            (9, Bson::Double(1.5)),
        ];
        entries.extend((10..1_234).map(|i| (i, Bson::Int32(i))));
        let expected = {
            let upserted: Vec<Bson> = entries
                .iter()
                .map(|(i, id)| Bson::Document(doc! {"index": *i, "_id": id.clone()}))
                .collect();
            let reply = doc! {"n": 3, "nModified": 0, "upserted": upserted, "ok": 1.0};
            crate::wire::encode_op_msg_reply(1, 2, &reply)
        };
        assert_eq!(sent(&entries, true), expected);
        assert_eq!(sent(&entries, false), expected);
        // No entries: no field.
        let none =
            crate::wire::encode_op_msg_reply(1, 2, &doc! {"n": 3, "nModified": 0, "ok": 1.0});
        assert_eq!(sent(&[], true), none);
        // An `_id` the simulator does not encode: documents from there on, the same entries.
        entries.insert(3, (4, db_pointer()));
        let mut upserted = Upserted::new(true);
        for (i, id) in &entries {
            upserted.push(*i, id.clone());
        }
        let mut reply = doc! {"n": 3};
        assert_eq!(upserted.into_reply(&mut reply), None);
        let expected: Vec<Bson> = entries
            .iter()
            .map(|(i, id)| Bson::Document(doc! {"index": *i, "_id": id.clone()}))
            .collect();
        assert_eq!(reply.get_array("upserted").unwrap(), &expected);
    }

    #[test]
    fn outcome_with_an_encoded_array_gives_the_whole_reply() {
        let mut upserted = Upserted::new(true);
        upserted.push(0, Bson::Int32(1));
        upserted.push(1, Bson::String("x".into()));
        let mut body = doc! {"n": 2};
        let array = upserted.into_reply(&mut body).unwrap();
        body.insert("ok", 1.0);
        let reply = super::super::Outcome::ReplyWithArray {
            body,
            key: "upserted",
            array,
        }
        .into_reply()
        .unwrap();
        assert_eq!(
            reply,
            doc! {"n": 2, "upserted": [{"index": 0, "_id": 1}, {"index": 1, "_id": "x"}], "ok": 1.0}
        );
    }
}

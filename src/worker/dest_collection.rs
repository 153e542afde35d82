//! The destination collection itself, before documents go in: created with the source's
//! options, its validation options kept aligned with the source's, and its collation checked
//! (DESIGN §2.2, §2.10).
//!
//! Validation options are state, not history: a `collMod` that happened before the stream's
//! start point (while the namespace was being discovered, before a restart, before history was
//! lost) is never delivered as an event. So every copy reads the source's options *after* its
//! start point is taken and aligns the destination with them; later changes arrive as `modify`
//! events. The daemon only changes validation options it set itself (recorded in the
//! checkpoint as `destination_validation`) or that are absent: a validator someone added on the
//! destination alone is left in place, with a warning.

use bson::{doc, Bson, Document};
use mongodb::Database;

use crate::{
    bounded_write,
    checkpoint::Checkpoint,
    config::OnCollationMismatch,
    error::{ErrorKind, SyncError},
    source::listed_collection,
    worker::WorkerContext,
};

/// The collection options that say how documents are validated.
const VALIDATION_KEYS: [&str; 3] = ["validator", "validationLevel", "validationAction"];

/// What each validation option is when it is not set (how a `collMod` removes one).
fn validation_default(key: &str) -> Bson {
    match key {
        "validator" => Bson::Document(Document::new()),
        "validationLevel" => Bson::String("strict".into()),
        _ => Bson::String("error".into()),
    }
}

/// The validation options of a collection's `listCollections` options.
pub fn validation_options(options: &Document) -> Document {
    let mut out = Document::new();
    for key in VALIDATION_KEYS {
        if let Some(v) = options.get(key) {
            out.insert(key, v.clone());
        }
    }
    out
}

/// Whether two sets of validation options are the same, whatever their key order.
fn same_validation(a: &Document, b: &Document) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k) == Some(v))
}

/// The `collMod` fields that turn `have` into `want` (a key `want` lacks is reset to its
/// default).
fn validation_changes(have: &Document, want: &Document) -> Document {
    let mut changes = Document::new();
    for key in VALIDATION_KEYS {
        match (have.get(key), want.get(key)) {
            (h, Some(w)) if h != Some(w) => {
                changes.insert(key, w.clone());
            }
            (Some(h), None) if *h != validation_default(key) => {
                changes.insert(key, validation_default(key));
            }
            _ => {}
        }
    }
    changes
}

fn dest_error(context: &str, e: mongodb::error::Error) -> SyncError {
    SyncError::mongo(ErrorKind::DestinationWrite, context.to_string(), e)
}

/// `destination.socket_timeout_ms`: the bound of every destination command.
fn limit(ctx: &WorkerContext) -> Option<std::time::Duration> {
    ctx.current_settings().destination_timeout
}

/// Drops a destination collection (majority, journaled, bounded in time); one that is not there
/// is already dropped.
pub async fn drop_collection(
    db: &Database,
    coll: &str,
    limit: Option<std::time::Duration>,
    what: &str,
) -> Result<(), SyncError> {
    let command = doc! {"drop": coll, "writeConcern": {"w": "majority", "j": true}};
    match bounded_write::ddl(db, command, limit, what).await? {
        Ok(_) => Ok(()),
        Err(e) if crate::source::is_namespace_not_found(&e) => Ok(()),
        Err(e) => Err(dest_error(what, e)),
    }
}

/// Before a copy writes (called after its start point is taken): the destination collection
/// exists with the source's current options, its validation options match the source's
/// unless they are the operator's own, and its collation is the source's.
///
/// `Ok(false)`, with nothing touched on the destination, when this incarnation of the
/// collection is no longer on the source under its name: dropped, renamed away or re-created
/// before the start point was taken, so its stream will never say so. The worker then stops
/// and leaves its checkpoint to discovery, which finishes a gone incarnation from the listing
/// (or resumes it if the collection comes back under this name).
pub async fn prepare(ctx: &WorkerContext, cp: &mut Checkpoint) -> Result<bool, SyncError> {
    let source_db = ctx.pipeline.source.client().database(&ctx.ns.db);
    let source_options = match listed_collection(&source_db, &ctx.ns.coll).await {
        Ok(Some((uuid, options))) if ctx.uuid.is_none() || uuid == ctx.uuid => options,
        Ok(_) => return Ok(false),
        Err(e) => {
            return Err(SyncError::mongo(
                ErrorKind::SourceRead,
                format!("reading the options of {}", ctx.ns),
                e,
            ))
        }
    };
    let want = validation_options(&source_options);
    *ctx.source_validator.lock() = want
        .get_document("validator")
        .ok()
        .filter(|v| !v.is_empty())
        .cloned();
    let dest_db = ctx.pipeline.dest.database(&ctx.target.db);
    let dest_listed = listed_collection(&dest_db, &ctx.target.coll)
        .await
        .map_err(|e| dest_error("reading the destination collection's options", e))?;
    match dest_listed {
        None => {
            intend(ctx, cp, &want).await?;
            create(ctx, &dest_db, &source_options).await?;
            record(ctx, cp, want).await?;
        }
        Some((_, dest_options)) => {
            if must_recreate_for_collation(ctx, &source_options, &dest_options)? {
                intend(ctx, cp, &want).await?;
                drop_collection(
                    &dest_db,
                    &ctx.target.coll,
                    limit(ctx),
                    "dropping a destination collection with another collation",
                )
                .await?;
                create(ctx, &dest_db, &source_options).await?;
                record(ctx, cp, want).await?;
            } else {
                align_validation(ctx, &dest_db, &dest_options, want, cp).await?;
            }
        }
    }
    Ok(true)
}

/// Persists the validation options about to be given to the destination before giving them:
/// a crash right after the change still finds them recorded as mongo-syncd's.
async fn intend(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    want: &Document,
) -> Result<(), SyncError> {
    cp.destination_validation_next = Some(want.clone());
    ctx.pipeline.checkpoints.save(&ctx.key(), cp).await
}

/// The destination now has `set`: recorded as mongo-syncd's (persisted).
async fn record(ctx: &WorkerContext, cp: &mut Checkpoint, set: Document) -> Result<(), SyncError> {
    let changed = cp.destination_validation.as_ref() != Some(&set)
        || cp.destination_validation_next.is_some();
    cp.destination_validation = Some(set);
    cp.destination_validation_next = None;
    if changed {
        ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    }
    Ok(())
}

/// Brings the destination's validation options to `want` when the daemon may change them.
async fn align_validation(
    ctx: &WorkerContext,
    dest_db: &Database,
    dest_options: &Document,
    want: Document,
    cp: &mut Checkpoint,
) -> Result<(), SyncError> {
    let have = validation_options(dest_options);
    if same_validation(&have, &want) {
        return record(ctx, cp, want).await;
    }
    let ours = have.is_empty()
        || [&cp.destination_validation, &cp.destination_validation_next]
            .into_iter()
            .flatten()
            .any(|set| same_validation(set, &have));
    if !ours {
        tracing::warn!(namespace = %ctx.label(), target = %ctx.target, destination = %have, source = %want, "the destination collection has validation options of its own (not the source's, not set by mongo-syncd); left as they are: documents it rejects are dead-lettered");
        return Ok(());
    }
    intend(ctx, cp, &want).await?;
    let mut cmd = doc! {"collMod": ctx.target.coll.clone()};
    cmd.extend(validation_changes(&have, &want));
    let what = "aligning the destination collection's validation options";
    bounded_write::ddl(dest_db, cmd, limit(ctx), what)
        .await?
        .map_err(|e| dest_error(what, e))?;
    tracing::info!(namespace = %ctx.label(), target = %ctx.target, from = %have, to = %want, "aligned the destination collection's validation options with the source's");
    record(ctx, cp, want).await
}

/// A `modify` event applied to the destination: the validation options it set are now the
/// daemon's, and the source's validator is what replication writes compare with.
pub fn record_modify(ctx: &WorkerContext, cp: &mut Checkpoint, applied: &Document) {
    let changed = validation_options(applied);
    if changed.is_empty() {
        return;
    }
    let mut set = cp.destination_validation.clone().unwrap_or_default();
    for (k, v) in changed {
        if k == "validator" {
            *ctx.source_validator.lock() = v.as_document().filter(|d| !d.is_empty()).cloned();
        }
        set.insert(k, v);
    }
    cp.destination_validation = Some(set);
}

/// Creates the destination collection with `options` (the source's). Capped collections
/// become uncapped: the source's capped deletions arrive as delete events.
async fn create(ctx: &WorkerContext, db: &Database, options: &Document) -> Result<(), SyncError> {
    let mut cmd = doc! {"create": ctx.target.coll.clone()};
    for (k, v) in options {
        if VALIDATION_KEYS.contains(&k.as_str()) || k == "collation" {
            cmd.insert(k.clone(), v.clone());
        }
    }
    match bounded_write::ddl(db, cmd, limit(ctx), "creating the destination collection").await? {
        Ok(_) => Ok(()),
        // Created concurrently (e.g. by an upsert): fine.
        Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 48) => {
            Ok(())
        }
        Err(e) => Err(SyncError::mongo(
            ErrorKind::DestinationWrite,
            format!("creating {}", ctx.target),
            e,
        )),
    }
}

/// Creates the destination collection with the source's options (as discovery saw them) if it
/// is missing: a `create` event.
pub async fn ensure(ctx: &WorkerContext) -> Result<(), SyncError> {
    let db = ctx.pipeline.dest.database(&ctx.target.db);
    match listed_collection(&db, &ctx.target.coll).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => create(ctx, &db, &ctx.options).await,
        Err(e) => Err(dest_error("listing destination collections", e)),
    }
}

/// A collation as compared: absent and `{locale: "simple"}` are the binary comparison.
fn effective_collation(options: &Document) -> Option<&Document> {
    options
        .get_document("collation")
        .ok()
        .filter(|c| c.get_str("locale").ok() != Some("simple"))
}

/// Whether two collation documents are the same, whatever their field order and numeric types.
fn same_collation(a: Option<&Document>, b: Option<&Document>) -> bool {
    fn same_value(x: &Bson, y: &Bson) -> bool {
        let num = |v: &Bson| match v {
            Bson::Int32(n) => Some(f64::from(*n)),
            Bson::Int64(n) => Some(*n as f64),
            Bson::Double(n) => Some(*n),
            _ => None,
        };
        match (num(x), num(y)) {
            (Some(p), Some(q)) => p == q,
            _ => x == y,
        }
    }
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => false,
    }
}

fn describe_collation(c: Option<&Document>) -> String {
    c.map_or_else(|| "simple (binary)".to_string(), |c| c.to_string())
}

/// DESIGN §2.10: a destination collection whose collation differs from the source's (created
/// beforehand, restored without options) is never copied into blindly: the copy's extras scan
/// would walk another `_id` order. Parks the namespace naming both collations, or answers that
/// the destination collection must be re-created with the source's options
/// (`sync.on_collation_mismatch`).
fn must_recreate_for_collation(
    ctx: &WorkerContext,
    source_options: &Document,
    dest_options: &Document,
) -> Result<bool, SyncError> {
    let source = effective_collation(source_options);
    let dest = effective_collation(dest_options);
    if same_collation(source, dest) {
        return Ok(false);
    }
    let (source, dest) = (describe_collation(source), describe_collation(dest));
    match ctx.current_settings().on_collation_mismatch {
        OnCollationMismatch::Park => Err(SyncError::new(
            ErrorKind::CollationMismatch,
            format!(
                "the destination collection {} has collation {dest}, the source collection {} has collation {source}; copying would delete what it copied; drop or re-create the destination collection with the source's collation (or set sync.on_collation_mismatch = \"recreate\"), then force-sync",
                ctx.target, ctx.ns
            ),
        )),
        OnCollationMismatch::Recreate => {
            tracing::warn!(namespace = %ctx.label(), target = %ctx.target, source_collation = %source, destination_collation = %dest, "the destination collection has another collation; dropping it and re-creating it with the source's options (sync.on_collation_mismatch = \"recreate\")");
            Ok(true)
        }
    }
}

/// Copies the source's indexes. Non-unique ones (`unique_only = false`) right after the copy,
/// recording unique ones as pending; unique ones once replay has passed the copy's end. Right
/// after a copy, the indexes mongo-syncd created that the source no longer has are dropped
/// (a `dropIndexes` lost with history or made while stopped).
pub async fn create_indexes(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    unique_only: bool,
) -> Result<(), SyncError> {
    let specs = ctx.pipeline.source.list_indexes(&ctx.ns).await?;
    if !unique_only {
        drop_indexes_gone_from_source(ctx, cp, &specs).await?;
    }
    let mut to_create = Vec::new();
    let mut pending_unique = false;
    for mut spec in specs {
        if spec.get_str("name").ok() == Some("_id_") {
            continue;
        }
        let unique = spec.get_bool("unique").unwrap_or(false);
        if unique != unique_only {
            pending_unique |= unique;
            continue;
        }
        spec.remove("v");
        spec.remove("ns");
        if let Some(secs) = spec.get("expireAfterSeconds").cloned() {
            if let Ok(name) = spec.get_str("name") {
                cp.ttl_indexes.insert(name.to_string(), secs);
            }
            spec.insert("expireAfterSeconds", crate::worker::TTL_DISABLED_SECONDS);
        }
        to_create.push(spec);
    }
    if !unique_only {
        cp.unique_indexes_pending = pending_unique;
    }
    if to_create.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = to_create
        .iter()
        .filter_map(|s| s.get_str("name").ok().map(str::to_string))
        .collect();
    let intended = intend_indexes(ctx, cp, &names).await?;
    let result = bounded_write::ddl(
        &ctx.pipeline.dest.database(&ctx.target.db),
        doc! {"createIndexes": ctx.target.coll.clone(), "indexes": to_create, "writeConcern": {"w": "majority", "j": true}},
        limit(ctx),
        "creating indexes",
    )
    .await?;
    match result {
        Ok(_) => {
            tracing::info!(namespace = %ctx.label(), indexes = ?names, unique = unique_only, "indexes created on the destination");
            Ok(())
        }
        Err(e) => {
            let class = crate::error::classify_mongo(&e);
            if class == crate::error::ErrorClass::Transient {
                return Err(SyncError::mongo(
                    ErrorKind::DestinationWrite,
                    "creating indexes",
                    e,
                ));
            }
            // An index that cannot be built (conflicting definition, duplicates on the
            // destination) must not stop replication: report it and go on.
            tracing::error!(namespace = %ctx.label(), indexes = ?names, error = %crate::config::redact_text(&e.to_string()), "could not create indexes on the destination");
            disown_indexes(cp, &intended);
            Ok(())
        }
    }
}

/// Records the destination indexes mongo-syncd is about to create as its own (see
/// `Checkpoint::destination_indexes`) and persists the checkpoint when that added any, before
/// the `createIndexes` is sent: a crash right after the index is built still finds it recorded,
/// so a later copy drops it when the source no longer has it. Returns the names added.
pub async fn intend_indexes(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    names: &[String],
) -> Result<Vec<String>, SyncError> {
    let added: Vec<String> = names
        .iter()
        .filter(|n| !cp.destination_indexes.contains(n))
        .cloned()
        .collect();
    if !added.is_empty() {
        cp.destination_indexes.extend(added.iter().cloned());
        ctx.pipeline.checkpoints.save(&ctx.key(), cp).await?;
    }
    Ok(added)
}

/// Forgets intended indexes whose `createIndexes` failed (persisted with the next checkpoint).
pub fn disown_indexes(cp: &mut Checkpoint, intended: &[String]) {
    cp.destination_indexes.retain(|n| !intended.contains(n));
}

/// Drops the destination indexes mongo-syncd created whose name the source no longer has.
async fn drop_indexes_gone_from_source(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    source_specs: &[Document],
) -> Result<(), SyncError> {
    let on_source: Vec<&str> = source_specs
        .iter()
        .filter_map(|s| s.get_str("name").ok())
        .collect();
    let gone: Vec<String> = cp
        .destination_indexes
        .iter()
        .filter(|n| !on_source.contains(&n.as_str()))
        .cloned()
        .collect();
    let db = ctx.pipeline.dest.database(&ctx.target.db);
    for name in gone {
        let command = doc! {"dropIndexes": ctx.target.coll.clone(), "index": name.as_str()};
        match bounded_write::ddl(&db, command, limit(ctx), "dropping an index").await? {
            Ok(_) => {
                tracing::info!(namespace = %ctx.label(), index = %name, "dropped a destination index the source no longer has");
            }
            // Already gone (index or collection not found).
            Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 27 || c.code == 26) =>
                {}
            Err(e) => return Err(dest_error("dropping an index the source no longer has", e)),
        }
        cp.destination_indexes.retain(|n| n != &name);
        cp.ttl_indexes.remove(&name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_options_are_the_three_keys() {
        let o = doc! {"validator": {"n": 1}, "collation": {"locale": "fr"}, "validationLevel": "moderate", "capped": true};
        assert_eq!(
            validation_options(&o),
            doc! {"validator": {"n": 1}, "validationLevel": "moderate"}
        );
    }

    #[test]
    fn changes_set_what_differs_and_reset_what_is_gone() {
        let have =
            doc! {"validator": {"n": 1}, "validationLevel": "moderate", "validationAction": "warn"};
        let want = doc! {"validator": {"m": 1}, "validationAction": "warn"};
        assert_eq!(
            validation_changes(&have, &want),
            doc! {"validator": {"m": 1}, "validationLevel": "strict"}
        );
        assert_eq!(validation_changes(&want, &want), doc! {});
        // An empty validator on the source is copied literally.
        assert_eq!(
            validation_changes(&doc! {}, &doc! {"validator": {}}),
            doc! {"validator": {}}
        );
    }

    #[test]
    fn same_validation_ignores_key_order() {
        assert!(same_validation(
            &doc! {"validator": {"n": 1}, "validationLevel": "moderate"},
            &doc! {"validationLevel": "moderate", "validator": {"n": 1}}
        ));
        assert!(!same_validation(&doc! {}, &doc! {"validator": {}}));
    }

    #[test]
    fn collations_compare_by_value() {
        let a = doc! {"locale": "fr", "strength": 2};
        let b = doc! {"strength": 2i64, "locale": "fr"};
        assert!(same_collation(Some(&a), Some(&b)));
        assert!(same_collation(
            effective_collation(&doc! {"collation": {"locale": "simple"}}),
            None
        ));
    }
}

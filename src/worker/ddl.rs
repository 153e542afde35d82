//! DDL and control events applied to the destination: drops, renames, indexes, `collMod`,
//! invalidates.

use super::*;

/// Applies a DDL or control event to the destination.
pub(super) async fn apply_ddl(
    ctx: &WorkerContext,
    cp: &mut Checkpoint,
    ev: &ChangeEvent,
) -> Result<Option<WorkerExit>, SyncError> {
    let label = ctx.label();
    let db = ctx.pipeline.dest.database(&ctx.target.db);
    let dest_err = |what: &str, e: mongodb::error::Error| {
        SyncError::mongo(ErrorKind::DestinationWrite, what.to_string(), e)
    };
    let limit = ctx.current_settings().destination_timeout;
    match &ev.kind {
        OpKind::Drop => {
            crate::worker::dest_collection::drop_collection(
                &db,
                &ctx.target.coll,
                limit,
                "dropping the destination collection",
            )
            .await?;
            tracing::info!(namespace = %label, target = %ctx.target, "collection dropped on the source; dropped on the destination");
            return Ok(Some(WorkerExit::NamespaceGone));
        }
        OpKind::Rename => {
            crate::worker::dest_collection::drop_collection(
                &db,
                &ctx.target.coll,
                limit,
                "dropping the renamed collection",
            )
            .await?;
            let to = ev
                .rename_target()
                .map(|(d, c)| format!("{d}.{c}"))
                .unwrap_or_default();
            tracing::info!(namespace = %label, renamed_to = %to, "collection renamed on the source; the old name was dropped on the destination (the new name is synced by its own worker when in scope)");
            // This incarnation has left the name, and its target is gone: its checkpoint goes
            // too. A shared stream sends no invalidate, and a rename round trip brings the
            // same collection UUID back under this name: it must be copied again, not resumed
            // past the drop.
            return Ok(Some(WorkerExit::NamespaceGone));
        }
        OpKind::DropDatabase => {}
        OpKind::Invalidate => {
            tracing::info!(namespace = %label, "change stream invalidated; this namespace is finished");
            return Ok(Some(WorkerExit::NamespaceGone));
        }
        OpKind::Create => {
            crate::worker::dest_collection::ensure(ctx).await?;
        }
        OpKind::CreateIndexes => {
            if let Some(desc) = ev.operation_description() {
                let mut specs = Vec::new();
                if let Ok(indexes) = desc.get_array("indexes") {
                    for spec in indexes.into_iter().flatten() {
                        let Some(spec) = spec.as_document() else {
                            continue;
                        };
                        let mut spec: Document = spec.try_into().map_err(|e| {
                            SyncError::with_source(
                                ErrorKind::SourceRead,
                                "decoding an index spec",
                                e,
                            )
                        })?;
                        if spec.get_bool("unique").unwrap_or(false) && cp.unique_indexes_pending {
                            continue;
                        }
                        spec.remove("v");
                        if let Some(secs) = spec.get("expireAfterSeconds").cloned() {
                            if let Ok(name) = spec.get_str("name") {
                                cp.ttl_indexes.insert(name.to_string(), secs);
                            }
                            spec.insert("expireAfterSeconds", TTL_DISABLED_SECONDS);
                        }
                        specs.push(spec);
                    }
                }
                if !specs.is_empty() {
                    let names: Vec<String> = specs
                        .iter()
                        .filter_map(|s| s.get_str("name").ok().map(str::to_string))
                        .collect();
                    let intended =
                        crate::worker::dest_collection::intend_indexes(ctx, cp, &names).await?;
                    let command = doc! {"createIndexes": ctx.target.coll.clone(), "indexes": specs, "writeConcern": {"w": "majority", "j": true}};
                    match crate::bounded_write::ddl(&db, command, limit, "creating indexes").await?
                    {
                        Ok(_) => {}
                        Err(e) => {
                            if crate::error::classify_mongo(&e)
                                == crate::error::ErrorClass::Transient
                            {
                                return Err(dest_err("creating indexes", e));
                            }
                            tracing::error!(namespace = %label, error = %crate::config::redact_text(&e.to_string()), "could not create an index on the destination");
                            crate::worker::dest_collection::disown_indexes(cp, &intended);
                        }
                    }
                }
            }
        }
        OpKind::DropIndexes => {
            if let Some(desc) = ev.operation_description() {
                if let Ok(indexes) = desc.get_array("indexes") {
                    for spec in indexes.into_iter().flatten() {
                        let Some(name) = spec.as_document().and_then(|s| s.get_str("name").ok())
                        else {
                            continue;
                        };
                        cp.ttl_indexes.remove(name);
                        cp.destination_indexes.retain(|n| n != name);
                        let command = doc! {"dropIndexes": ctx.target.coll.clone(), "index": name};
                        match crate::bounded_write::ddl(&db, command, limit, "dropping an index")
                            .await?
                        {
                            Ok(_) => {}
                            Err(e) if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if c.code == 27 || c.code == 26) =>
                                {}
                            Err(e) => return Err(dest_err("dropping an index", e)),
                        }
                    }
                }
            }
        }
        OpKind::Modify => {
            if let Some(desc) = ev.operation_description() {
                let desc: Document = desc.try_into().map_err(|e| {
                    SyncError::with_source(ErrorKind::SourceRead, "decoding a modify event", e)
                })?;
                let mut cmd = doc! {"collMod": ctx.target.coll.clone()};
                for key in ["validator", "validationLevel", "validationAction"] {
                    if let Some(v) = desc.get(key) {
                        cmd.insert(key, v.clone());
                    }
                }
                if let Ok(index) = desc.get_document("index") {
                    if let (Ok(name), Some(secs)) =
                        (index.get_str("name"), index.get("expireAfterSeconds"))
                    {
                        // Keep the destination TTL disabled; remember the source's new value.
                        cp.ttl_indexes.insert(name.to_string(), secs.clone());
                    }
                    if let Ok(hidden) = index.get_bool("hidden") {
                        let mut idx = doc! {"hidden": hidden};
                        if let Ok(name) = index.get_str("name") {
                            idx.insert("name", name);
                        }
                        cmd.insert("index", idx);
                    }
                }
                if cmd.len() > 1 {
                    let what = "modifying the destination collection";
                    match crate::bounded_write::ddl(&db, cmd.clone(), limit, what).await? {
                        Ok(_) => crate::worker::dest_collection::record_modify(ctx, cp, &cmd),
                        Err(e) => {
                            if crate::error::classify_mongo(&e)
                                == crate::error::ErrorClass::Transient
                            {
                                return Err(dest_err("modifying the destination collection", e));
                            }
                            tracing::error!(namespace = %label, error = %crate::config::redact_text(&e.to_string()), "could not apply a collMod to the destination");
                        }
                    }
                }
            }
        }
        OpKind::Other(op) => {
            tracing::debug!(namespace = %label, operation = %op, "ignoring an unknown change event type");
        }
        OpKind::Insert | OpKind::Update | OpKind::Replace | OpKind::Delete => {}
    }
    Ok(None)
}

//! DDL: `create`, `drop`, `dropDatabase`, `renameCollection`, `collMod`, `createIndexes`,
//! `dropIndexes`. Each produces the oplog entries real servers produce, so change streams
//! see `drop`/`rename`/`dropDatabase` and the expanded events.

use bson::{doc, Bson, Document};

use super::{coll_arg, Ctx};
use crate::{
    engine::change_to_op,
    error::{codes, CommandError, CommandResult},
    oplog::OplogOp,
    store::{check_names, Collection, Index, Namespace},
    views::{self, ViewDef},
};

/// `create` options stored on the collection (and reported by `listCollections`).
const CREATE_OPTIONS: &[&str] = &[
    "capped",
    "size",
    "max",
    "validator",
    "validationLevel",
    "validationAction",
    "collation",
    "changeStreamPreAndPostImages",
    "storageEngine",
    "indexOptionDefaults",
    "clusteredIndex",
    "expireAfterSeconds",
    "comment",
];

fn not_found(ns: &Namespace) -> CommandError {
    CommandError::new(
        codes::NAMESPACE_NOT_FOUND,
        format!("ns does not exist: {ns}"),
    )
}

pub fn create(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    if ctx.cmd.contains_key("timeseries") {
        return Err(CommandError::new(
            codes::COMMAND_NOT_SUPPORTED,
            "time-series collections are not supported by the simulator",
        ));
    }
    if ctx.cmd.contains_key("viewOn") {
        return create_view(ctx, ns);
    }
    if ctx.cmd.contains_key("pipeline") {
        return Err(CommandError::new(
            codes::INVALID_OPTIONS,
            "'pipeline' requires 'viewOn' to also be specified",
        ));
    }
    let mut options = Document::new();
    for (k, v) in ctx.cmd {
        if CREATE_OPTIONS.contains(&k.as_str()) && k != "comment" {
            options.insert(k.clone(), v.clone());
        } else if !k.starts_with('$') && k != "create" && !is_generic_argument(k) {
            return Err(CommandError::new(
                codes::LOCATION_40415_UNKNOWN_FIELD,
                format!("BSON field 'create.{k}' is an unknown field."),
            ));
        }
    }
    // The catalog keeps the full collation spec (every field resolved); simple is no
    // collation at all.
    if let Some(c) = options.get("collation").cloned() {
        match crate::collation::parse_arg("create.collation", &c)? {
            Some(Some(c)) => {
                options.insert("collation", c.to_document());
            }
            _ => {
                options.remove("collation");
            }
        }
    }
    if let Some(size) = options.get("size").and_then(crate::store::as_i64) {
        // The server rounds capped sizes up to a multiple of 256.
        options.insert("size", ((size + 255) / 256 * 256).max(4096));
    }
    let new = Collection::new(ns.clone(), options.clone())?;
    if let Some((level, _)) = ctx.transaction_view(&ns) {
        check_ddl_in_transaction(&ns, level.as_deref(), "create a collection")?;
    }
    ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            return Err(view_exists(&ns));
        }
        if let Some(existing) = cat.get(&ns) {
            if existing.options == options {
                return Ok(());
            }
            return Err(CommandError::new(
                codes::NAMESPACE_EXISTS,
                format!("Collection {ns} already exists."),
            ));
        }
        sink.emit(
            OplogOp::Create {
                ns: ns.clone().into(),
                uuid: new.uuid,
                options: Box::new(options.clone()),
            },
            false,
        );
        cat.insert(new);
        Ok(())
    })?;
    Ok(Document::new())
}

fn view_exists(ns: &Namespace) -> CommandError {
    CommandError::new(
        codes::NAMESPACE_EXISTS,
        format!("A view already exists. NS: {ns}"),
    )
}

/// `create` with `viewOn`: a document in `<db>.system.views` (the collection is created
/// first when missing), as the server stores views. The collection a view is defined on need
/// not exist.
fn create_view(ctx: &Ctx<'_>, ns: Namespace) -> CommandResult<Document> {
    check_names(&ns)?;
    let view_on = match ctx.cmd.get("viewOn") {
        Some(Bson::String(s)) if !s.is_empty() => s.clone(),
        Some(Bson::String(_)) => {
            return Err(CommandError::bad_value("'viewOn' cannot be empty"));
        }
        _ => {
            return Err(CommandError::type_mismatch(
                "BSON field 'create.viewOn' is the wrong type, expected type 'string'",
            ))
        }
    };
    let pipeline = match ctx.cmd.get("pipeline") {
        Some(p) => views::check_pipeline(p)?,
        None => Vec::new(),
    };
    for k in ctx.cmd.keys() {
        match k.as_str() {
            "create" | "viewOn" | "pipeline" => {}
            "collation" => {}
            k if CREATE_OPTIONS.contains(&k) && k != "comment" => {
                return Err(CommandError::new(
                    codes::INVALID_OPTIONS,
                    format!("option not supported on a view: {k}"),
                ));
            }
            k if k.starts_with('$') || is_generic_argument(k) => {}
            k => {
                return Err(CommandError::new(
                    codes::LOCATION_40415_UNKNOWN_FIELD,
                    format!("BSON field 'create.{k}' is an unknown field."),
                ))
            }
        }
    }
    if ns.is_system() {
        return Err(CommandError::new(
            codes::INVALID_NAMESPACE,
            format!("Invalid namespace specified '{ns}': a view cannot be a system collection"),
        ));
    }
    if ctx.in_transaction() {
        return Err(CommandError::new(
            codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            "Cannot create a view in a multi-document transaction.",
        ));
    }
    // The view's own default collation, resolved as a collection's; simple is none.
    let collation = match ctx.cmd.get("collation") {
        Some(c) => match crate::collation::parse_arg("create.collation", c)? {
            Some(Some(c)) => Some(c.to_document()),
            _ => None,
        },
        None => None,
    };
    let def = ViewDef {
        view_on,
        pipeline,
        collation,
    };
    ctx.write(|cat, sink| {
        if let Some(existing) = views::lookup(cat, &ns) {
            if existing == def {
                return Ok(());
            }
            return Err(view_exists(&ns));
        }
        if cat.get(&ns).is_some() {
            return Err(CommandError::new(
                codes::NAMESPACE_EXISTS,
                format!("Collection {ns} already exists."),
            ));
        }
        views::check_collation_chain(cat, &ns, &def)?;
        // The pipeline must be one the simulator can run (on an empty input it checks the
        // stage names and their arguments).
        let probe = crate::query::aggregate::PipelineContext::new(bson::DateTime::now());
        let stages: Vec<Document> = def
            .pipeline
            .iter()
            .filter_map(|s| s.as_document().cloned())
            .collect();
        crate::query::aggregate::run_pipeline(Vec::new(), &stages, &probe)?;
        let views_ns = views::views_ns(&ns.db);
        if cat.get(&views_ns).is_none() {
            let coll = Collection::new(views_ns.clone(), Document::new())?;
            sink.emit(
                OplogOp::Create {
                    ns: views_ns.clone().into(),
                    uuid: coll.uuid,
                    options: Box::default(),
                },
                false,
            );
            cat.insert(coll);
        }
        let views = cat.get_mut(&views_ns).expect("just ensured");
        let change = views.insert(def.stored(&ns), true)?;
        sink.emit(change_to_op(views, change), false);
        Ok(())
    })?;
    Ok(Document::new())
}

/// MongoDB 4.4+ lets a transaction create collections and indexes, with restrictions (manual
/// "Create Collections and Indexes in a Transaction"; the server's jstests expect
/// InvalidOptions for `create`/`createIndexes` in a `snapshot` transaction): the transaction's
/// read concern must be `local` (else 72 InvalidOptions) and the namespace may not be a system
/// collection (263). The messages are the simulator's own.
fn check_ddl_in_transaction(ns: &Namespace, level: Option<&str>, what: &str) -> CommandResult<()> {
    if ns.is_system() {
        return Err(CommandError::new(
            codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            format!("Cannot write to system collection {ns} within a transaction."),
        ));
    }
    match level {
        None | Some("local") => Ok(()),
        Some(other) => Err(CommandError::new(
            codes::INVALID_OPTIONS,
            format!(
                "Cannot {what} in a multi-document transaction with read concern level '{other}': only 'local' is allowed"
            ),
        )),
    }
}

/// Arguments every command may carry.
pub fn is_generic_argument(k: &str) -> bool {
    matches!(
        k,
        "lsid"
            | "txnNumber"
            | "autocommit"
            | "startTransaction"
            | "writeConcern"
            | "readConcern"
            | "maxTimeMS"
            | "comment"
            | "apiVersion"
            | "apiStrict"
            | "apiDeprecationErrors"
    )
}

pub fn drop(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let n_indexes = ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            let views = cat
                .get_mut(&views::views_ns(&ns.db))
                .expect("a view is a document of system.views");
            if let Some(change) = views.delete(&Bson::String(ns.to_string())) {
                sink.emit(change_to_op(views, change), false);
            }
            return Ok(Some(None));
        }
        let Some(coll) = cat.remove(&ns) else {
            return Ok(None);
        };
        sink.emit(
            OplogOp::Drop {
                ns: ns.clone().into(),
                uuid: coll.uuid,
            },
            false,
        );
        Ok(Some(Some(coll.indexes.len() as i32)))
    })?;
    Ok(match n_indexes {
        Some(Some(n)) => doc! {"nIndexesWas": n, "ns": ns.to_string()},
        // A view has no indexes.
        Some(None) => doc! {"ns": ns.to_string()},
        None => Document::new(),
    })
}

pub fn drop_database(ctx: &Ctx<'_>) -> CommandResult<Document> {
    if matches!(ctx.db.as_str(), "admin" | "local" | "config") {
        return Err(CommandError::new(
            codes::ILLEGAL_OPERATION,
            format!("Dropping the '{}' database is prohibited.", ctx.db),
        ));
    }
    ctx.write(|cat, sink| {
        let names: Vec<String> = cat
            .collections(&ctx.db)
            .iter()
            .map(|c| c.ns.coll.clone())
            .collect();
        for name in names {
            let ns = Namespace::new(ctx.db.clone(), name);
            if let Some(coll) = cat.remove(&ns) {
                sink.emit(
                    OplogOp::Drop {
                        ns: ns.into(),
                        uuid: coll.uuid,
                    },
                    false,
                );
            }
        }
        sink.emit(OplogOp::DropDatabase { db: ctx.db.clone() }, false);
        Ok(())
    })?;
    Ok(doc! {"dropped": ctx.db.clone()})
}

pub fn rename_collection(ctx: &Ctx<'_>) -> CommandResult<Document> {
    if ctx.db != "admin" {
        return Err(CommandError::new(
            codes::UNAUTHORIZED,
            "renameCollection may only be run against the admin database.",
        ));
    }
    let from = Namespace::parse(
        ctx.cmd
            .get_str("renameCollection")
            .map_err(|_| CommandError::type_mismatch("'renameCollection' must be a string"))?,
    )?;
    let to = Namespace::parse(
        ctx.cmd
            .get_str("to")
            .map_err(|_| CommandError::type_mismatch("'to' must be a string"))?,
    )?;
    check_names(&to)?;
    let drop_target = ctx.cmd.get_bool("dropTarget").unwrap_or(false);
    if from == to {
        return Err(CommandError::new(
            codes::ILLEGAL_OPERATION,
            "Can't rename a collection to itself",
        ));
    }
    ctx.write(|cat, sink| {
        let Some(mut coll) = cat.get(&from).cloned() else {
            return Err(CommandError::new(
                codes::NAMESPACE_NOT_FOUND,
                "Source collection does not exist",
            ));
        };
        let mut dropped = None;
        if let Some(target) = cat.get(&to) {
            if !drop_target {
                return Err(CommandError::new(
                    codes::NAMESPACE_EXISTS,
                    "target namespace exists",
                ));
            }
            dropped = Some(target.uuid);
        }
        cat.remove(&from);
        if dropped.is_some() {
            cat.remove(&to);
        }
        coll.set_ns(to.clone());
        let uuid = coll.uuid;
        cat.insert(coll);
        sink.emit(
            OplogOp::Rename {
                from: from.clone().into(),
                to: to.clone().into(),
                uuid,
                drop_target: dropped,
            },
            false,
        );
        Ok(())
    })?;
    Ok(Document::new())
}

pub fn coll_mod(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let mut reply = Document::new();
    ctx.write(|cat, sink| {
        if let Some(def) = views::lookup(cat, &ns) {
            return coll_mod_view(ctx, cat, sink, &ns, def);
        }
        let coll = cat.get_mut(&ns).ok_or_else(|| not_found(&ns))?;
        let mut options = coll.options.clone();
        let mut changed = Document::new();
        let mut previous = Document::new();
        for (k, v) in ctx.cmd {
            match k.as_str() {
                "collMod" => {}
                "validator"
                | "validationLevel"
                | "validationAction"
                | "changeStreamPreAndPostImages"
                | "expireAfterSeconds" => {
                    if let Some(old) = options.get(k) {
                        previous.insert(k.clone(), old.clone());
                    }
                    options.insert(k.clone(), v.clone());
                    changed.insert(k.clone(), v.clone());
                }
                "viewOn" | "pipeline" => {
                    return Err(CommandError::new(
                        codes::INVALID_OPTIONS,
                        format!("option only supported on a view: {k}"),
                    ))
                }
                "index" => {
                    let spec = v
                        .as_document()
                        .ok_or_else(|| CommandError::type_mismatch("'index' must be an object"))?;
                    let target = coll
                        .indexes
                        .iter_mut()
                        .find(|i| match (spec.get("name"), spec.get("keyPattern")) {
                            (Some(Bson::String(n)), _) => i.name == *n,
                            (_, Some(Bson::Document(kp))) => i.key == *kp,
                            _ => false,
                        })
                        .ok_or_else(|| {
                            CommandError::new(
                                codes::INDEX_NOT_FOUND,
                                "cannot find index for collMod",
                            )
                        })?;
                    let mut old_values = Document::new();
                    for (ik, iv) in spec {
                        if matches!(ik.as_str(), "expireAfterSeconds" | "hidden") {
                            if let Some(old) = target.spec.get(ik) {
                                old_values.insert(format!("{ik}_old"), old.clone());
                                reply.insert(format!("{ik}_old"), old.clone());
                            }
                            target.spec.insert(ik.clone(), iv.clone());
                            reply.insert(format!("{ik}_new"), iv.clone());
                        }
                    }
                    changed.insert("index", spec.clone());
                    if !old_values.is_empty() {
                        previous.insert("index", old_values);
                    }
                }
                other if other.starts_with('$') || is_generic_argument(other) => {}
                other => {
                    return Err(CommandError::new(
                        codes::INVALID_OPTIONS,
                        format!("unknown option to collMod: {other}"),
                    ))
                }
            }
        }
        let before = coll.options.clone();
        coll.set_options(options)?;
        let uuid = coll.uuid;
        let _ = previous;
        sink.emit(
            OplogOp::Modify {
                ns: ns.clone().into(),
                uuid,
                changed: Box::new(changed),
                previous: Box::new(before),
            },
            false,
        );
        Ok(())
    })?;
    Ok(reply)
}

/// `collMod` of a view: `viewOn` and/or `pipeline` replace the stored definition (a
/// replacement of its `system.views` document, which change streams report as `modify`).
fn coll_mod_view(
    ctx: &Ctx<'_>,
    cat: &mut crate::store::Catalog,
    sink: &mut dyn crate::engine::WriteSink,
    ns: &Namespace,
    mut def: ViewDef,
) -> CommandResult<()> {
    for (k, v) in ctx.cmd {
        match k.as_str() {
            "collMod" => {}
            "viewOn" => match v {
                Bson::String(s) if !s.is_empty() => def.view_on = s.clone(),
                _ => {
                    return Err(CommandError::new(
                        codes::INVALID_OPTIONS,
                        "'viewOn' option must be a string",
                    ))
                }
            },
            "pipeline" => def.pipeline = views::check_pipeline(v)?,
            other if other.starts_with('$') || is_generic_argument(other) => {}
            other => {
                return Err(CommandError::new(
                    codes::INVALID_OPTIONS,
                    format!("option not supported on a view: {other}"),
                ))
            }
        }
    }
    views::check_collation_chain(cat, ns, &def)?;
    let views = cat
        .get_mut(&views::views_ns(&ns.db))
        .expect("a view is a document of system.views");
    let change = views.replace(def.stored(ns), None, true)?;
    sink.emit(change_to_op(views, change), false);
    Ok(())
}

pub fn create_indexes(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let specs = ctx
        .cmd
        .get_array("indexes")
        .map_err(|_| CommandError::failed_to_parse("'indexes' must be an array"))?
        .clone();
    // In a transaction a new index may only go on a collection the transaction created and
    // that is still empty; indexes that already exist are accepted as no-ops.
    let txn = ctx.transaction_view(&ns);
    if let Some((level, _)) = &txn {
        check_ddl_in_transaction(&ns, level.as_deref(), "create indexes")?;
    }
    let existed_before_txn = txn.as_ref().is_some_and(|(_, existed)| *existed);
    ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            return Err(CommandError::new(
                codes::COMMAND_NOT_SUPPORTED_ON_VIEW,
                "Cannot create indexes on a view",
            ));
        }
        let created_automatically = cat.get(&ns).is_none();
        let coll = super::crud::ensure_collection(cat, sink, &ns)?;
        let new_indexes_allowed = txn.is_none() || (!existed_before_txn && coll.docs.is_empty());
        let before = coll.indexes.len() as i32;
        let mut created = Vec::new();
        let mut staged = coll.clone();
        for spec in &specs {
            let spec = spec.as_document().ok_or_else(|| CommandError::type_mismatch("index specs must be objects"))?;
            let index = Index::from_spec(spec)?;
            let listed = index.spec.clone();
            if staged.add_index(index)? {
                if !new_indexes_allowed {
                    return Err(CommandError::new(
                        codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
                        format!("Cannot create new indexes on existing collection {ns} in a multi-document transaction."),
                    ));
                }
                created.push(listed);
            }
        }
        let uuid = staged.uuid;
        *coll = staged;
        let after = coll.indexes.len() as i32;
        if !created.is_empty() {
            sink.emit(OplogOp::CreateIndexes { ns: ns.clone().into(), uuid, indexes: created }, false);
        }
        let mut reply = doc! {"numIndexesBefore": before, "numIndexesAfter": after, "createdCollectionAutomatically": created_automatically};
        if before == after {
            reply.insert("note", "all indexes already exist");
        }
        Ok(reply)
    })
}

pub fn drop_indexes(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let which = ctx.cmd.get("index").cloned().ok_or_else(|| {
        CommandError::failed_to_parse(
            "BSON field 'dropIndexes.index' is missing but a required field",
        )
    })?;
    ctx.write(|cat, sink| {
        if views::is_view(cat, &ns) {
            return Err(views::not_a_collection(&ns));
        }
        let coll = cat.get_mut(&ns).ok_or_else(|| not_found(&ns))?;
        let was = coll.indexes.len() as i32;
        let names: Vec<String> = match &which {
            Bson::String(s) if s == "*" => coll
                .indexes
                .iter()
                .filter(|i| i.name != "_id_")
                .map(|i| i.name.clone())
                .collect(),
            Bson::String(s) => vec![s.clone()],
            Bson::Array(a) => a
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect(),
            Bson::Document(key) => coll
                .indexes
                .iter()
                .filter(|i| i.key == *key)
                .map(|i| i.name.clone())
                .collect::<Vec<_>>(),
            _ => {
                return Err(CommandError::type_mismatch(
                    "'index' must be a string, array or object",
                ))
            }
        };
        if names.is_empty() && !matches!(&which, Bson::String(s) if s == "*") {
            return Err(CommandError::new(
                codes::INDEX_NOT_FOUND,
                format!("can't find index with key: {which}"),
            ));
        }
        if names.iter().any(|n| n == "_id_") {
            return Err(CommandError::new(72, "cannot drop _id index"));
        }
        let mut dropped = Vec::new();
        for n in &names {
            if coll.find_index(n).is_none() {
                return Err(CommandError::new(
                    codes::INDEX_NOT_FOUND,
                    format!("index not found with name [{n}]"),
                ));
            }
        }
        for n in names {
            if let Some(i) = coll.drop_index(&n) {
                dropped.push(i.spec);
            }
        }
        let uuid = coll.uuid;
        if !dropped.is_empty() {
            sink.emit(
                OplogOp::DropIndexes {
                    ns: ns.clone().into(),
                    uuid,
                    indexes: dropped,
                },
                false,
            );
        }
        Ok(doc! {"nIndexesWas": was})
    })
}

//! DDL: `create`, `drop`, `dropDatabase`, `renameCollection`, `collMod`, `createIndexes`,
//! `dropIndexes`. Each produces the oplog entries real servers produce, so change streams
//! see `drop`/`rename`/`dropDatabase` and the expanded events.

use bson::{doc, Bson, Document};

use super::{coll_arg, Ctx};
use crate::{
    error::{codes, CommandError, CommandResult},
    oplog::OplogOp,
    store::{check_names, Collection, Index, Namespace},
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
    if ctx.cmd.contains_key("viewOn") || ctx.cmd.contains_key("timeseries") {
        return Err(CommandError::new(
            codes::COMMAND_NOT_SUPPORTED,
            "views and time-series collections are not supported by the simulator",
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
    ctx.write(|cat, sink| {
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
                ns: ns.clone(),
                uuid: new.uuid,
                options: options.clone(),
            },
            false,
        );
        cat.insert(new);
        Ok(())
    })?;
    Ok(Document::new())
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
        let Some(coll) = cat.remove(&ns) else {
            return Ok(None);
        };
        sink.emit(
            OplogOp::Drop {
                ns: ns.clone(),
                uuid: coll.uuid,
            },
            false,
        );
        Ok(Some(coll.indexes.len() as i32))
    })?;
    Ok(match n_indexes {
        Some(n) => doc! {"nIndexesWas": n, "ns": ns.to_string()},
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
                        ns,
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
        coll.ns = to.clone();
        let uuid = coll.uuid;
        cat.insert(coll);
        sink.emit(
            OplogOp::Rename {
                from: from.clone(),
                to: to.clone(),
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
                ns: ns.clone(),
                uuid,
                changed,
                previous: before,
            },
            false,
        );
        Ok(())
    })?;
    Ok(reply)
}

pub fn create_indexes(ctx: &Ctx<'_>) -> CommandResult<Document> {
    let ns = coll_arg(ctx)?;
    let specs = ctx
        .cmd
        .get_array("indexes")
        .map_err(|_| CommandError::failed_to_parse("'indexes' must be an array"))?
        .clone();
    ctx.write(|cat, sink| {
        let created_automatically = cat.get(&ns).is_none();
        let coll = super::crud::ensure_collection(cat, sink, &ns)?;
        let before = coll.indexes.len() as i32;
        let mut created = Vec::new();
        let mut staged = coll.clone();
        for spec in &specs {
            let spec = spec.as_document().ok_or_else(|| CommandError::type_mismatch("index specs must be objects"))?;
            let index = Index::from_spec(spec)?;
            let listed = index.spec.clone();
            if staged.add_index(index)? {
                created.push(listed);
            }
        }
        let uuid = staged.uuid;
        *coll = staged;
        let after = coll.indexes.len() as i32;
        if !created.is_empty() {
            sink.emit(OplogOp::CreateIndexes { ns: ns.clone(), uuid, indexes: created }, false);
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
                    ns: ns.clone(),
                    uuid,
                    indexes: dropped,
                },
                false,
            );
        }
        Ok(doc! {"nIndexesWas": was})
    })
}

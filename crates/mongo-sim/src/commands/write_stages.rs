//! `$out` and `$merge`, the writing last stages of `aggregate`, in their minimal forms. Both
//! write through the catalog and the oplog like the write commands do, so change streams and
//! `--data-dir` see every write:
//! - `$out` (a name or `{db, coll}`) fills a `tmp.agg_out.<uuid>` collection (created with the
//!   target's options and indexes) and renames it over the target (`dropTarget`), as the server
//!   does; nothing is logged when a document is refused (MongoDB would log and then drop the
//!   temporary collection).
//! - `$merge` with `on: "_id"` only, `whenMatched` `replace | keepExisting | merge | fail`,
//!   `whenNotMatched` `insert | discard | fail`; one oplog entry per write, earlier writes kept
//!   when a later document fails, as on a server. A pipeline `whenMatched`, another `on`, and
//!   `let` are refused with 115 naming the option.

use bson::{doc, Bson, Document};

use super::{
    crud::{emit, enforce_capped, ensure_collection, update_context},
    Ctx,
};
use crate::{
    engine::{change_to_op, WriteSink},
    error::{codes, CommandError, CommandResult},
    oplog::OplogOp,
    query::update::{apply_update_with_outcome, prepare_for_insert, UpdateOutcome, UpdateSpec},
    store::{check_names, Catalog, Collection, Index, Namespace},
    views,
};

/// The writing stage ending a pipeline, parsed.
#[derive(Debug, Clone)]
pub enum WriteStage {
    Out(Namespace),
    Merge(MergeSpec),
}

#[derive(Debug, Clone)]
pub struct MergeSpec {
    into: Namespace,
    when_matched: WhenMatched,
    when_not_matched: WhenNotMatched,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum WhenMatched {
    Replace,
    KeepExisting,
    Merge,
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum WhenNotMatched {
    Insert,
    Discard,
    Fail,
}

fn unknown_field(stage: &str, field: &str) -> CommandError {
    CommandError::new(
        codes::LOCATION_40415_UNKNOWN_FIELD,
        format!("BSON field '{stage}.{field}' is an unknown field."),
    )
}

fn unsupported(what: &str) -> CommandError {
    CommandError::new(
        codes::COMMAND_NOT_SUPPORTED,
        format!("{what} is not supported by mongo-sim"),
    )
}

/// A target given as a name (in the command's database) or `{db, coll}`.
fn target(stage: &str, v: &Bson, db: &str) -> CommandResult<Namespace> {
    match v {
        Bson::String(coll) => Ok(Namespace::new(db, coll.clone())),
        Bson::Document(d) => {
            let mut out_db = db.to_string();
            let mut coll = None;
            for (k, v) in d {
                match (k.as_str(), v) {
                    ("db", Bson::String(s)) => out_db = s.clone(),
                    ("coll", Bson::String(s)) => coll = Some(s.clone()),
                    ("db" | "coll", _) => {
                        return Err(CommandError::type_mismatch(format!(
                            "BSON field '{stage}.{k}' is the wrong type, expected type 'string'"
                        )))
                    }
                    ("timeseries", _) if stage == "$out" => {
                        return Err(unsupported("$out with 'timeseries'"))
                    }
                    (k, _) => return Err(unknown_field(stage, k)),
                }
            }
            let coll = coll.ok_or_else(|| {
                CommandError::failed_to_parse(format!(
                    "BSON field '{stage}.coll' is missing but a required field"
                ))
            })?;
            Ok(Namespace::new(out_db, coll))
        }
        _ => Err(CommandError::failed_to_parse(format!(
            "{stage} only supports a string or object argument"
        ))),
    }
}

fn parse_merge(v: &Bson, db: &str) -> CommandResult<MergeSpec> {
    let mut spec = MergeSpec {
        into: Namespace::new(db, ""),
        when_matched: WhenMatched::Merge,
        when_not_matched: WhenNotMatched::Insert,
    };
    let d = match v {
        Bson::String(_) => {
            spec.into = target("$merge", v, db)?;
            return Ok(spec);
        }
        Bson::Document(d) => d,
        _ => {
            return Err(CommandError::failed_to_parse(
                "$merge only supports a string or object argument",
            ))
        }
    };
    let mut into = None;
    for (k, v) in d {
        match k.as_str() {
            "into" => into = Some(target("$merge", v, db)?),
            "on" => {
                let only_id = match v {
                    Bson::String(s) => s == "_id",
                    Bson::Array(a) => a.len() == 1 && a[0].as_str() == Some("_id"),
                    _ => false,
                };
                if !only_id {
                    return Err(unsupported("$merge 'on' other than \"_id\""));
                }
            }
            "whenMatched" => {
                spec.when_matched = match v {
                    Bson::String(s) => match s.as_str() {
                        "replace" => WhenMatched::Replace,
                        "keepExisting" => WhenMatched::KeepExisting,
                        "merge" => WhenMatched::Merge,
                        "fail" => WhenMatched::Fail,
                        other => {
                            return Err(CommandError::bad_value(format!(
                                "Enumeration value '{other}' for field '$merge.whenMatched' is not a valid value."
                            )))
                        }
                    },
                    Bson::Array(_) => return Err(unsupported("$merge 'whenMatched' pipeline")),
                    _ => {
                        return Err(CommandError::type_mismatch(
                            "BSON field '$merge.whenMatched' must be a string or an array",
                        ))
                    }
                }
            }
            "whenNotMatched" => {
                spec.when_not_matched = match v.as_str() {
                    Some("insert") => WhenNotMatched::Insert,
                    Some("discard") => WhenNotMatched::Discard,
                    Some("fail") => WhenNotMatched::Fail,
                    _ => {
                        return Err(CommandError::bad_value(format!(
                            "Enumeration value '{v}' for field '$merge.whenNotMatched' is not a valid value."
                        )))
                    }
                }
            }
            "let" => return Err(unsupported("$merge 'let'")),
            other => return Err(unknown_field("$merge", other)),
        }
    }
    spec.into = into.ok_or_else(|| {
        CommandError::failed_to_parse("BSON field '$merge.into' is missing but a required field")
    })?;
    Ok(spec)
}

/// Splits a writing last stage off `stages`. A `$out`/`$merge` anywhere else fails with
/// 40601, as on a server.
pub fn split(stages: &mut Vec<Document>, db: &str) -> CommandResult<Option<WriteStage>> {
    for (i, s) in stages.iter().enumerate() {
        let Some(name) = s.keys().next() else {
            continue;
        };
        if (name == "$out" || name == "$merge") && i + 1 != stages.len() {
            return Err(CommandError::new(
                40601,
                format!("{name} can only be the final stage in the pipeline"),
            ));
        }
    }
    let Some(last) = stages.last() else {
        return Ok(None);
    };
    let stage = if let Some(v) = last.get("$out") {
        WriteStage::Out(target("$out", v, db)?)
    } else if let Some(v) = last.get("$merge") {
        WriteStage::Merge(parse_merge(v, db)?)
    } else {
        return Ok(None);
    };
    stages.pop();
    Ok(Some(stage))
}

fn check_target(cat: &Catalog, stage: &str, ns: &Namespace) -> CommandResult<()> {
    check_names(ns)?;
    if views::is_view(cat, ns) {
        return Err(views::not_a_collection(ns));
    }
    if ns.is_system() {
        return Err(CommandError::new(
            17385,
            format!("Can't {stage} to special collection: {}", ns.coll),
        ));
    }
    if matches!(ns.db.as_str(), "admin" | "local" | "config") {
        return Err(CommandError::new(
            31321,
            format!("Can't {stage} to internal database: {}", ns.db),
        ));
    }
    Ok(())
}

/// Runs the writing stage over the pipeline's output.
pub fn run(ctx: &Ctx<'_>, stage: &WriteStage, docs: Vec<Document>) -> CommandResult<()> {
    let name = match stage {
        WriteStage::Out(_) => "$out",
        WriteStage::Merge(_) => "$merge",
    };
    if ctx.in_transaction() {
        return Err(CommandError::new(
            codes::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            format!("{name} cannot be used in a transaction"),
        ));
    }
    let bypass = ctx
        .cmd
        .get_bool("bypassDocumentValidation")
        .unwrap_or(false);
    ctx.write(|cat, sink| match stage {
        WriteStage::Out(target) => out(cat, sink, target, docs, bypass),
        WriteStage::Merge(spec) => merge(cat, sink, spec, docs, bypass),
    })
}

fn out(
    cat: &mut Catalog,
    sink: &mut dyn WriteSink,
    target: &Namespace,
    docs: Vec<Document>,
    bypass: bool,
) -> CommandResult<()> {
    check_target(cat, "$out", target)?;
    let existing = cat.get(target);
    if existing.is_some_and(Collection::is_capped) {
        return Err(CommandError::new(
            17152,
            format!("namespace '{target}' is capped so it can't be used for $out"),
        ));
    }
    let options = existing.map(|c| c.options.clone()).unwrap_or_default();
    let indexes: Vec<Document> = existing
        .map(|c| {
            c.indexes
                .iter()
                .filter(|i| i.name != "_id_")
                .map(|i| i.spec.clone())
                .collect()
        })
        .unwrap_or_default();
    let dropped = existing.map(|c| c.uuid);
    let tmp_ns = Namespace::new(
        target.db.clone(),
        format!("tmp.agg_out.{}", bson::Uuid::new()),
    );
    // Stage everything first: a refused document leaves no trace.
    let mut tmp = Collection::new(tmp_ns.clone(), options.clone())?;
    for spec in &indexes {
        tmp.add_index(Index::from_spec(spec)?)?;
    }
    let mut inserts = Vec::with_capacity(docs.len());
    for d in docs {
        let d = prepare_for_insert(&d, sink.now_ts())?;
        let change = tmp.insert(d, bypass)?;
        inserts.push(change_to_op(&tmp, change));
    }
    sink.emit(
        OplogOp::Create {
            ns: tmp_ns.clone().into(),
            uuid: tmp.uuid,
            options: Box::new(options),
        },
        false,
    );
    if !indexes.is_empty() {
        sink.emit(
            OplogOp::CreateIndexes {
                ns: tmp_ns.clone().into(),
                uuid: tmp.uuid,
                indexes,
            },
            false,
        );
    }
    for op in inserts {
        sink.emit(op, false);
    }
    if dropped.is_some() {
        cat.remove(target);
    }
    let uuid = tmp.uuid;
    tmp.set_ns(target.clone());
    cat.insert(tmp);
    sink.emit(
        OplogOp::Rename {
            from: tmp_ns.into(),
            to: target.clone().into(),
            uuid,
            drop_target: dropped,
        },
        false,
    );
    Ok(())
}

fn merge(
    cat: &mut Catalog,
    sink: &mut dyn WriteSink,
    spec: &MergeSpec,
    docs: Vec<Document>,
    bypass: bool,
) -> CommandResult<()> {
    check_target(cat, "$merge", &spec.into)?;
    let lets = Default::default();
    for d in docs {
        let d = prepare_for_insert(&d, sink.now_ts())?;
        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
        let existing = cat.get(&spec.into).and_then(|c| c.get(&id)).cloned();
        match (existing, spec.when_matched, spec.when_not_matched) {
            (Some(_), WhenMatched::KeepExisting, _) | (None, _, WhenNotMatched::Discard) => {}
            (Some(_), WhenMatched::Fail, _) | (None, _, WhenNotMatched::Insert) => {
                // An insert: with an existing `_id` it fails with the duplicate key error.
                let coll = ensure_collection(cat, sink, &spec.into)?;
                let change = coll.insert(d, bypass)?;
                emit(coll, sink, change);
                enforce_capped(coll, sink);
            }
            (None, _, WhenNotMatched::Fail) => {
                return Err(CommandError::new(
                    codes::MERGE_STAGE_NO_MATCHING_DOCUMENT,
                    "$merge could not find a matching document in the target collection for at least one document in the source collection",
                ));
            }
            (Some(_), WhenMatched::Replace, _) => {
                let coll = ensure_collection(cat, sink, &spec.into)?;
                let change = coll.replace(d, None, bypass)?;
                emit(coll, sink, change);
            }
            (Some(old), WhenMatched::Merge, _) => {
                // The server merges with `$set` of the document's top-level fields.
                let mut set = d;
                set.remove("_id");
                if set.is_empty() {
                    continue;
                }
                let update = UpdateSpec::parse(&Bson::Document(doc! {"$set": set}))?;
                let (new, outcome) = apply_update_with_outcome(
                    &old,
                    &update,
                    &update_context(sink, false, Vec::new(), &lets),
                )?;
                let description = match outcome {
                    UpdateOutcome::NoOp => continue,
                    UpdateOutcome::Delta(delta) => Some(delta),
                    UpdateOutcome::Replacement => None,
                };
                let coll = ensure_collection(cat, sink, &spec.into)?;
                let change = coll.replace(new, description, bypass)?;
                emit(coll, sink, change);
            }
        }
    }
    Ok(())
}
